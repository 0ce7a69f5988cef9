//! The CPUID a vCPU sees: KVM's supported set, with each vCPU's APIC ID and
//! topology filled in and, on PVM hosts, without the features PVM's
//! instruction emulator cannot run.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_EXT_FEATURES: u32 = 7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

// Leaf 1.
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

// Leaf 7, subleaf 0: FSGSBASE, AVX2, INVPCID, AVX-512 (F, DQ, IFMA, PF, ER,
// CD, BW, VL), RDSEED, SMAP.
const L7_EBX_PVM_HIDDEN: u32 = (1 << 0)
    | (1 << 5)
    | (1 << 10)
    | (1 << 16)
    | (1 << 17)
    | (1 << 18)
    | (1 << 20)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
// AVX-512 VBMI, VBMI2, VAES, VPCLMULQDQ, VNNI, BITALG, VPOPCNTDQ; RDPID.
const L7_ECX_PVM_HIDDEN: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14) | (1 << 22);
// AVX-512 4VNNIW, 4FMAPS, VP2INTERSECT, FP16; AMX (needs XSAVE).
const L7_EDX_PVM_HIDDEN: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
// Subleaf 1: AVX-VNNI, AVX512-BF16.
const L7_1_EAX_PVM_HIDDEN: u32 = (1 << 4) | (1 << 5);

/// Features that need XSAVE-managed state or instructions PVM's emulator
/// lacks (seen stopping guests: cmpxchg16b, popcnt, xrstor, clac/stac, rdpid...).
const L1_ECX_PVM_HIDDEN: u32 =
    ECX_FMA | ECX_CX16 | ECX_POPCNT | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_F16C | ECX_RDRAND;

/// KVM paravirtual features that make a hypercall (`vmcall`), which PVM's
/// emulator was seen to spin on forever: PV_UNHALT (kick a halted vCPU),
/// PV_SEND_IPI (hung a two-vCPU boot in `__send_ipi_mask`), PV_SCHED_YIELD.
const KVM_PVM_HIDDEN: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// Kernel parameters that keep Linux off those instructions on PVM hosts,
/// where hiding them in CPUID alone was seen not to be enough.
/// `no_int3_selftest` and `no_fpu_drop_fwait` are our kernel patches'
/// switches (kernel-images/patches): int3 and fwait stop the VM there.
pub const PVM_KERNEL_PARAMS: &[&str] = &[
    "clearcpuid=cx16,popcnt,rdrand,rdseed,fsgsbase,smap,invpcid,rdpid",
    "noxsave",
    "no_int3_selftest",
    "no_fpu_drop_fwait",
];

/// Bits needed to number `n` items (ceil(log2 n)).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID entries for vCPU `id` of `cpus`, from KVM's supported set.
pub fn for_vcpu(
    supported: &[kvm_cpuid_entry2],
    id: u32,
    cpus: u32,
    pvm: bool,
) -> Vec<kvm_cpuid_entry2> {
    let mut out = Vec::with_capacity(supported.len());
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (cpus.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
                if pvm {
                    e.ecx &= !L1_ECX_PVM_HIDDEN;
                }
            }
            LEAF_CACHE => {
                // Cores per package - 1, in bits 31..26: all our vCPUs are
                // cores of one package.
                e.eax = (e.eax & 0x03ff_ffff) | ((cpus.clamp(1, 64) - 1) << 26);
            }
            LEAF_EXT_FEATURES if pvm && e.index == 0 => {
                e.ebx &= !L7_EBX_PVM_HIDDEN;
                e.ecx &= !L7_ECX_PVM_HIDDEN;
                e.edx &= !L7_EDX_PVM_HIDDEN;
            }
            LEAF_EXT_FEATURES if pvm && e.index == 1 => e.eax &= !L7_1_EAX_PVM_HIDDEN,
            LEAF_XSAVE if pvm => continue,
            LEAF_KVM_FEATURES if pvm => e.eax &= !KVM_PVM_HIDDEN,
            LEAF_AMD_SIZES => {
                // ECX: APIC ID bits for cores, and cores per package - 1.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(cpus) << 12) | (cpus.clamp(1, 256) - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                // Extended APIC ID, core ID (one thread per core), node 0.
                (e.eax, e.ebx, e.ecx) = (id, id & 0xff, 0);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                // Level 0: one thread per core; level 1: `cpus` cores.
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, 1 << 8),
                    1 => (id_bits(cpus), cpus, (2 << 8) | 1),
                    n => (0, 0, n),
                };
                e.edx = id;
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32, ebx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ebx,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id_and_the_cpu_count() {
        let supported = [
            entry(1, 0, 0, 0x0000_0800),
            entry(0xb, 0, 0, 0),
            entry(0xb, 1, 0, 0),
        ];
        let cpuid = for_vcpu(&supported, 2, 4, false);
        let leaf1 = find(&cpuid, 1, 0).unwrap();
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(find(&cpuid, 0xb, 0).unwrap().edx, 2);
        let cores = find(&cpuid, 0xb, 1).unwrap();
        assert_eq!((cores.eax, cores.ebx), (2, 4));
    }

    #[test]
    fn pvm_hosts_hide_what_the_emulator_cannot_run() {
        let all = u32::MAX;
        let supported = [
            entry(1, 0, all & !ECX_HYPERVISOR, 0),
            entry(7, 0, all, all),
            entry(0xd, 0, all, all),
            entry(0xd, 1, all, all),
            kvm_cpuid_entry2 {
                function: LEAF_KVM_FEATURES,
                eax: 0x0100_7efb,
                ..Default::default()
            },
        ];
        let cpuid = for_vcpu(&supported, 0, 1, true);
        let leaf1 = find(&cpuid, 1, 0).unwrap();
        for bit in [ECX_CX16, ECX_POPCNT, ECX_XSAVE, ECX_RDRAND, ECX_AVX] {
            assert_eq!(leaf1.ecx & bit, 0, "bit {bit:#x} hidden");
        }
        let leaf7 = find(&cpuid, 7, 0).unwrap();
        assert_eq!(leaf7.ebx & (1 << 20), 0, "SMAP hidden");
        assert_eq!(leaf7.ecx & (1 << 22), 0, "RDPID hidden");
        assert!(find(&cpuid, 0xd, 0).is_none() && find(&cpuid, 0xd, 1).is_none());
        let kvm = find(&cpuid, LEAF_KVM_FEATURES, 0).unwrap();
        assert_eq!(kvm.eax & (1 << 11), 0, "PV send-IPI hypercall hidden");
        assert_ne!(kvm.eax & 1, 0, "kvmclock kept");

        let native = for_vcpu(&supported, 0, 1, false);
        assert_ne!(find(&native, 1, 0).unwrap().ecx & ECX_POPCNT, 0);
        assert!(find(&native, 0xd, 0).is_some());
    }

    #[test]
    fn id_bits_round_up() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
