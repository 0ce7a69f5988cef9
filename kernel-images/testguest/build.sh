#!/usr/bin/env bash
# Builds the test guest (a PVH ELF kernel) and copies it to OUT_FILE.
#
#   kernel-images/testguest/build.sh OUT_FILE
#
# Needs: cargo/rustc with the x86_64-unknown-none target (installed here
# with rustup if missing), objdump and readelf (binutils).
#
# After building it checks the code for instructions that the KVM
# instruction emulator of PVM hosts lacks (see /work/shared/KVM-HOSTS.md;
# all guest kernel code is emulated there) and for any SSE/MMX/x87 use,
# and that the PVH entry note is present and points at the entry code.
set -euo pipefail

TARGET=x86_64-unknown-none
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
    echo "testguest/build.sh: error: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 OUT_FILE"
out=$1
# Resolve OUT_FILE against the caller's directory before the cd below.
case $out in
/*) ;;
*) out="$PWD/$out" ;;
esac

for tool in cargo rustc objdump readelf nm; do
    command -v "$tool" >/dev/null || die "'$tool' not found in PATH (cargo/rustc: Rust toolchain; objdump, readelf, nm: binutils)"
done

cd "$here"

# The Rust target: a no_std, soft-float (no SSE) bare-metal target.
sysroot=$(rustc --print sysroot)
if ! ls "$sysroot/lib/rustlib/$TARGET/lib"/libcore-*.rlib >/dev/null 2>&1; then
    command -v rustup >/dev/null ||
        die "the Rust target $TARGET is not installed in $sysroot and there is no rustup to install it; install the target's standard library (rust-std for $TARGET) and run this again"
    echo "testguest/build.sh: installing the Rust target $TARGET (rustup target add $TARGET)" >&2
    rustup target add "$TARGET" ||
        die "'rustup target add $TARGET' failed (see its message above; it downloads from static.rust-lang.org, so it needs network access). The test guest cannot be built without that target."
    ls "$sysroot/lib/rustlib/$TARGET/lib"/libcore-*.rlib >/dev/null 2>&1 ||
        die "'rustup target add $TARGET' succeeded but $sysroot has no libcore for $TARGET: is rustc from a different toolchain than rustup's active one?"
fi

# .cargo/config.toml (picked up because we run in this directory) sets the
# target and the static relocation model; outer RUSTFLAGS would replace
# those flags, so drop them.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET CARGO_BUILD_RUSTFLAGS
export CARGO_TARGET_DIR="$here/target"
cargo build --release --locked --target "$TARGET" ||
    die "cargo build failed"
elf="$here/target/$TARGET/release/testguest"
[ -f "$elf" ] || die "cargo did not produce $elf"

# ---- ELF shape: a static, non-relocatable executable loaded at >= 1 MiB.
readelf -h "$elf" | grep -Eq 'Type:[[:space:]]+EXEC' ||
    die "$elf is not an ET_EXEC executable (relocation-model=static lost?)"
if readelf -lW "$elf" | grep -q 'INTERP\|DYNAMIC'; then
    die "$elf has dynamic linking segments"
fi
low=$(readelf -lW "$elf" | awk '$1 == "LOAD" { print $4 }' | sort | head -n1)
[ -n "$low" ] && (( low >= 0x100000 )) ||
    die "$elf has a PT_LOAD segment below 1 MiB (lowest physical address $low)"

# ---- The PVH note: name "Xen", type 18, 8-byte payload = pvh_start32, in
# a 4-byte aligned PT_NOTE.
sym() {
    nm "$elf" | awk -v s="$1" '$3 == s { print "0x" $1 }'
}
entry=$(sym pvh_start32)
start64=$(sym tg_start64)
[ -n "$entry" ] && [ -n "$start64" ] || die "symbols pvh_start32/tg_start64 not found in $elf"
notes=$(readelf -nW "$elf")
note=$(printf '%s\n' "$notes" | grep -E '^[[:space:]]+Xen[[:space:]]+0x00000008[[:space:]].*\(0x00000012\)' || true)
[ -n "$note" ] || die "no PVH note (Xen, type 18 XEN_ELFNOTE_PHYS32_ENTRY, 8 bytes) in $elf; readelf -n says:
$notes"
# "description data: 20 00 10 00 00 00 00 00" -> little-endian u64
payload=$(printf '%s\n' "$note" | sed -n 's/.*description data: *//p' |
    awk '{ v = ""; for (i = NF; i >= 1; i--) v = v $i; print "0x" v }')
(( payload == entry )) ||
    die "PVH note payload $payload is not the entry point pvh_start32 ($entry)"
(( entry < 0x100000000 )) || die "PVH entry $entry is not a 32-bit address"
readelf -lW "$elf" | awk '$1 == "NOTE" { print $NF }' | grep -qx '0x4' ||
    die "the PT_NOTE segment of $elf is not 4-byte aligned (QEMU's note reader needs p_align 4)"

# ---- Forbidden instructions. The 32-bit entry code is disassembled as
# i386, the rest as x86-64. Rejected: what PVM's instruction emulator
# lacks (popcnt, cmpxchg16b, int3, xsave/xrstor family, clac/stac, fwait,
# rdrand/rdseed, and fsgsbase/invpcid/rdpid which the Linux guest also
# masks), any x87 instruction (mnemonics starting with f), any SSE/AVX/MMX
# register or MXCSR access, and undecodable bytes in code.
read -r text_addr text_size < <(readelf -SW "$elf" | sed 's/^ *\[ *[0-9]*\]//' | awk '$1 == ".text" { print $3, $5 }') ||
    die "no .text section in $elf"
text_end=$(printf '0x%x' $(( 0x$text_addr + 0x$text_size )))
disasm=$(
    objdump -d --no-show-raw-insn -m i386 --start-address="$entry" --stop-address="$start64" "$elf"
    objdump -d --no-show-raw-insn --start-address="$start64" --stop-address="$text_end" "$elf"
)
ninsn=$(printf '%s\n' "$disasm" | grep -cE '^[[:space:]]+[0-9a-f]+:' || true)
(( ninsn > 100 )) || die "objdump found only $ninsn instructions in $elf: is the disassembly check working?"
# The one deliberate exception: `crash=emulation` (src/crash.rs) executes
# a popcnt at the symbol tg_deliberate_popcnt to stop the VM on PVM
# hosts. Exactly that instruction is allowed, and only if it is a popcnt.
allowed=$(sym tg_deliberate_popcnt)
[ -n "$allowed" ] || die "symbol tg_deliberate_popcnt (the crash=emulation site, src/crash.rs) not found in $elf"
allowed_hex=$(printf '%x' "$allowed")
allowed_line=$(printf '%s\n' "$disasm" | grep -E "^[[:space:]]+$allowed_hex:" || true)
printf '%s\n' "$allowed_line" | grep -qE $'\tpopcnt[[:space:]]+%rax,%rax$' ||
    die "the instruction at tg_deliberate_popcnt ($allowed) is not 'popcnt %rax,%rax': objdump says '$allowed_line'"
bad=$(printf '%s\n' "$disasm" | awk -F'\t' -v allowed="$allowed_hex:" '
    /^[[:space:]]+[0-9a-f]+:/ && NF >= 2 {
        addr = $1
        gsub(/[[:space:]]/, "", addr)
        if (addr == allowed) next
        insn = $NF
        n = split(insn, w, /[[:space:]]+/)
        # skip prefixes objdump prints as words
        m = 1
        while (m < n && w[m] ~ /^(lock|rep|repz|repnz|repe|repne|data16|cs|ds|es|ss|fs|gs|addr32|notrack|bnd)$/) m++
        op = w[m]
        if (op ~ /^(popcnt|cmpxchg16b|int3|xsave|xsaves|xsavec|xsaveopt|xrstor|xrstors|xsave64|xrstor64|xsaves64|xrstors64|xsavec64|xsaveopt64|xgetbv|xsetbv|clac|stac|fwait|wait|rdrand|rdseed|rdfsbase|rdgsbase|wrfsbase|wrgsbase|invpcid|rdpid|ldmxcsr|stmxcsr|vldmxcsr|vstmxcsr|emms|femms|\(bad\))$/ ||
            op ~ /^f/ ||
            insn ~ /%[xyz]mm[0-9]|%mm[0-7]|%st(\([0-7]\))?([^a-z]|$)|%k[0-7]/ ||
            (op == "int" && insn ~ /\$0x3([^0-9a-f]|$)/)) {
            print
        }
    }')
if [ -n "$bad" ]; then
    die "forbidden instructions in $elf (PVM's instruction emulator lacks them, or they use SSE/x87):
$bad"
fi

mkdir -p "$(dirname "$out")"
cp "$elf" "$out.tmp.$$"
mv -f "$out.tmp.$$" "$out"
echo "testguest/build.sh: built $out ($(stat -c %s "$out") bytes, PVH entry $entry, $ninsn instructions checked)" >&2
