#!/usr/bin/env python3
"""Start-up benchmark: our vmm against QEMU microvm, in one run.

Measures, with the test guest (kernel-images/out/testguest):

1. VMM start-up: process start to vCPU 0's first KVM_RUN, wall and CPU
   time (our vmm's VMM_TRACE_STARTUP=1 line), median and min of --runs.
2. VMM memory: RSS of the VMM process while the guest idles, minus the
   RSS of the guest-memory mapping; ours and QEMU microvm.
3. Test guest boot: process start to the first serial line and to process
   exit, median of --boot-runs; ours and QEMU microvm.

Prints one table (see bench/README.md). Python 3 standard library only.

    python3 bench/startup.py [--runs N] [--boot-runs N] [--json FILE]

QEMU 7.2 (Debian qemu-system-x86) is installed beside qemu-utils into
/var/cache/vmm-bench/qemu if missing: apt-get download + dpkg -x, plus
apt-get install of the shared libraries it lacks.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

from common import (KERNEL, QEMU_BIN, REPO, SEABIOS_DIR, VMM, BenchError, Run, check_kvm,
                    ensure_kernel, ensure_qemu, ensure_vmm, fmt_ratio, log, machine, ms, run_main)

# Boot and start-up runs: same guest size for both VMMs.
BOOT_MEMORY_MIB = 64
MEMORY_TEST_MIB = 128
CPUS = 1

TRACE_RE = re.compile(
    rb"vmm: vcpu0 first KVM_RUN: monotonic_ns=(\d+) process_cpu_ns=(\d+)"
)

QUOTED = (
    "quoted, not measured here (issue figures, other machine, same kernel): "
    "VMM memory Firecracker 4.2 MiB, Cloud Hypervisor 6.7 MiB, "
    "QEMU microvm 76.5 MiB; Firecracker publishes at most 8 CPU ms to start"
)


# ---------------------------------------------------------------- commands


def vmm_cmd(cmdline, memory_mib, cpus=CPUS):
    return [str(VMM), "--kernel", str(KERNEL), "--cmdline", cmdline,
            "--cpus", str(cpus), "--memory", f"{memory_mib}M"]


def qemu_cmd(cmdline, memory_mib, cpus=CPUS):
    return [
        str(QEMU_BIN), "-L", str(SEABIOS_DIR),
        "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", str(memory_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(KERNEL), "-append", cmdline,
    ]


# ---------------------------------------------------------------- running


def boot_once(cmd, want_status):
    run = Run(cmd)
    t_first = run.wait_line(b"testguest: start")
    t_exit, status = run.wait_exit()
    run.kill()
    if status != want_status:
        raise BenchError(run.describe(f"exit status {status}, expected {want_status}"))
    if not any(b"testguest: exit=0" == line for _, line in run.lines):
        raise BenchError(run.describe("no 'testguest: exit=0' line"))
    return t_first - run.t0, t_exit - run.t0


def startup_once():
    env = {**os.environ, "VMM_TRACE_STARTUP": "1"}
    run = Run(vmm_cmd("exit=0", BOOT_MEMORY_MIB), env=env)
    _, status = run.wait_exit()
    run.kill()
    m = TRACE_RE.search(run.stderr)
    if status != 0:
        raise BenchError(run.describe(f"exit status {status}, expected 0"))
    if not m:
        raise BenchError(run.describe("no 'vmm: vcpu0 first KVM_RUN' line on stderr with VMM_TRACE_STARTUP=1 "
                                      "(is target/x86_64-unknown-linux-gnu/release/vmm older than that feature? rebuild it)"))
    return int(m.group(1)) - run.t0, int(m.group(2))


def smaps_rss(pid, guest_bytes):
    """(total RSS, guest-memory mapping RSS) in bytes, from /proc/PID/smaps."""
    total = 0
    candidates = []  # (rss, header) of anonymous mappings of exactly guest_bytes
    header, size, rss = None, 0, 0

    def finish():
        nonlocal total
        if header is None:
            return
        total += rss
        fields = header.split()
        anonymous = len(fields) < 6 or fields[5].startswith("[anon")
        if anonymous and size == guest_bytes:
            candidates.append((rss, header))

    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                finish()
                header, size, rss = line.strip(), 0, 0
            elif line.startswith("Size:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
        finish()
    if len(candidates) != 1:
        raise BenchError(f"expected one anonymous {guest_bytes >> 20} MiB mapping (the guest memory) "
                         f"in /proc/{pid}/smaps, found {len(candidates)}: {candidates}")
    return total, candidates[0][0]


def memory_once(cmd):
    run = Run(cmd)
    try:
        run.wait_line(b"testguest: idle")
        if run.proc.poll() is not None:
            raise BenchError(run.describe("the VMM ended while its guest idles"))
        total, guest = smaps_rss(run.proc.pid, MEMORY_TEST_MIB << 20)
    finally:
        run.kill()
    return {"total_rss_bytes": total, "guest_rss_bytes": guest, "vmm_bytes": total - guest}


# ---------------------------------------------------------------- report


def summary(samples_ns):
    return {"median_ms": ms(statistics.median(samples_ns)), "min_ms": ms(min(samples_ns)),
            "samples_ms": [round(ms(s), 3) for s in samples_ns]}


def table(res):
    s, m, b = res["startup"], res["memory"], res["boot"]
    rows = [
        (f"VMM start-up to first KVM_RUN, wall, median ({s['runs']} runs)", s["wall"]["median_ms"], None, "ms"),
        ("VMM start-up to first KVM_RUN, wall, min", s["wall"]["min_ms"], None, "ms"),
        ("VMM start-up to first KVM_RUN, CPU, median", s["cpu"]["median_ms"], None, "ms"),
        ("VMM start-up to first KVM_RUN, CPU, min", s["cpu"]["min_ms"], None, "ms"),
        (f"VMM memory (RSS minus {MEMORY_TEST_MIB} MiB guest RAM), guest idle",
         m["ours"]["vmm_mib"], m["qemu"]["vmm_mib"], "MiB"),
        ("  total RSS", m["ours"]["total_rss_mib"], m["qemu"]["total_rss_mib"], "MiB"),
        ("  guest RAM mapping RSS", m["ours"]["guest_rss_mib"], m["qemu"]["guest_rss_mib"], "MiB"),
        (f"Boot: process start to 'testguest: start', median ({b['runs']} runs)",
         b["ours"]["first_line"]["median_ms"], b["qemu"]["first_line"]["median_ms"], "ms"),
        ("Boot: process start to process exit, median",
         b["ours"]["exit"]["median_ms"], b["qemu"]["exit"]["median_ms"], "ms"),
    ]
    w = max(len(r[0]) for r in rows)
    out = [f"{'':{w}}  {'ours':>9}  {'QEMU':>9}  {'ours/QEMU':>9}",
           f"{'-' * w}  {'-' * 9}  {'-' * 9}  {'-' * 9}"]
    for name, ours, qemu, unit in rows:
        q = f"{qemu:9.2f}" if qemu is not None else f"{'-':>9}"
        out.append(f"{name:{w}}  {ours:9.2f}  {q}  {fmt_ratio(ours, qemu) if qemu is not None else '-':>9}  {unit}")
    mc = res["machine"]
    out.append("")
    out.append(f"machine: nproc={mc['nproc']}, kernel {mc['kernel']}, "
               f"kvm_pvm {'loaded (PVM, not hardware KVM)' if mc['kvm_pvm'] else 'not loaded'}"
               f"{', ' + mc['cpu'] if mc['cpu'] else ''}")
    out.append(f"guest: {KERNEL.relative_to(REPO)}, {CPUS} vCPU, {BOOT_MEMORY_MIB} MiB "
               f"(memory test: {MEMORY_TEST_MIB} MiB, 'idle'); QEMU: {res['qemu_version']}, microvm")
    out.append(QUOTED)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="VMM start-up runs (default 20)")
    ap.add_argument("--boot-runs", type=int, default=10, help="boot runs per VMM (default 10)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args()
    if args.runs < 1 or args.boot_runs < 1:
        ap.error("--runs and --boot-runs must be at least 1")

    check_kvm()
    ensure_kernel()
    ensure_vmm()
    qemu_version = ensure_qemu()
    started = time.monotonic()

    # Warm-up (page cache, dynamic linker): one unmeasured run of each.
    boot_once(vmm_cmd("exit=0", BOOT_MEMORY_MIB), 0)
    boot_once(qemu_cmd("exit=0", BOOT_MEMORY_MIB), 1)

    log(f"VMM start-up: {args.runs} runs")
    wall, cpu = [], []
    for _ in range(args.runs):
        w, c = startup_once()
        wall.append(w)
        cpu.append(c)

    log("VMM memory: ours and QEMU, guest idle")
    mem = {}
    for name, cmd in (("ours", vmm_cmd("idle", MEMORY_TEST_MIB)), ("qemu", qemu_cmd("idle", MEMORY_TEST_MIB))):
        r = memory_once(cmd)
        mem[name] = {**r, "vmm_mib": r["vmm_bytes"] / 2**20, "total_rss_mib": r["total_rss_bytes"] / 2**20,
                     "guest_rss_mib": r["guest_rss_bytes"] / 2**20}

    log(f"test guest boot: {args.boot_runs} runs each, alternating")
    boots = {"ours": ([], []), "qemu": ([], [])}
    for _ in range(args.boot_runs):
        for name, cmd, status in (("ours", vmm_cmd("exit=0", BOOT_MEMORY_MIB), 0),
                                  ("qemu", qemu_cmd("exit=0", BOOT_MEMORY_MIB), 1)):
            first, end = boot_once(cmd, status)
            boots[name][0].append(first)
            boots[name][1].append(end)

    res = {
        "machine": machine(),
        "qemu_version": qemu_version,
        "guest": {"kernel": str(KERNEL), "cpus": CPUS, "boot_memory_mib": BOOT_MEMORY_MIB,
                  "memory_test_mib": MEMORY_TEST_MIB},
        "startup": {"runs": args.runs, "wall": summary(wall), "cpu": summary(cpu)},
        "memory": mem,
        "boot": {"runs": args.boot_runs,
                 **{n: {"first_line": summary(f), "exit": summary(e)} for n, (f, e) in boots.items()}},
        "quoted_not_measured": {"firecracker_vmm_mib": 4.2, "cloud_hypervisor_vmm_mib": 6.7,
                                "qemu_microvm_vmm_mib": 76.5, "firecracker_startup_cpu_ms_max": 8},
        "duration_s": round(time.monotonic() - started, 1),
    }
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    run_main(main, "bench/startup.py")
