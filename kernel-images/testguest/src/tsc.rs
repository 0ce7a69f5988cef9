//! The time-stamp counter: reading it (ring 0 and ring 3: CR4.TSD is
//! off) and finding its frequency, for timeouts and the benchmark.
//!
//! Sources, first that works wins:
//! 1. `cpuid-0x40000010`: the hypervisor timing leaf (EAX = TSC kHz), if
//!    the hypervisor's maximum leaf reaches it (VMware convention, QEMU
//!    with `vmware-cpuid-freq`).
//! 2. `cpuid-0x15`: Intel's TSC/crystal ratio times the crystal frequency
//!    (ECX, or 0x16's base MHz if ECX is 0 is not used: too coarse).
//! 3. `kvmclock`: KVM's pvclock (CPUID 0x40000001 bit 3, MSR 0x4b564d01):
//!    the TSC-to-nanoseconds multiplier and shift give the frequency.
//! 4. `pit`: counts TSC ticks over 50 ms of PIT channel 0 (see `pit`).
//! 5. `assumed`: 3 GHz, if nothing else works.

use crate::port;
use core::arch::asm;
use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, Ordering};

static HZ: AtomicU64 = AtomicU64::new(3_000_000_000);

#[inline(always)]
pub fn now() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (hi as u64) << 32 | lo as u64
}

pub fn hz() -> u64 {
    HZ.load(Ordering::Relaxed)
}

/// TSC value `ms` milliseconds from now.
pub fn deadline_ms(ms: u64) -> u64 {
    now().wrapping_add(hz() / 1000 * ms)
}

/// Ticks in `us` microseconds.
pub fn ticks_us(us: u64) -> u64 {
    hz() / 1_000_000 * us
}

/// Finds the TSC frequency; returns (hz, source name).
pub fn calibrate() -> (u64, &'static str) {
    let (hz, source) = detect();
    HZ.store(hz, Ordering::Relaxed);
    (hz, source)
}

fn detect() -> (u64, &'static str) {
    let hv = __cpuid(0x4000_0000);
    let kvm = hv.ebx == u32::from_le_bytes(*b"KVMK")
        && hv.ecx == u32::from_le_bytes(*b"VMKV")
        && hv.edx == u32::from_le_bytes(*b"M\0\0\0");
    // A hypervisor range exists if leaf 0x40000000 returns a sane max leaf.
    if (0x4000_0010..0x4000_0100).contains(&hv.eax) {
        let khz = __cpuid(0x4000_0010).eax as u64;
        if khz != 0 {
            return (khz * 1000, "cpuid-0x40000010");
        }
    }
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return (l.ecx as u64 * l.ebx as u64 / l.eax as u64, "cpuid-0x15");
        }
    }
    if kvm && hv.eax >= 0x4000_0001 {
        let features = __cpuid(0x4000_0001).eax;
        if features & (1 << 3) != 0 {
            if let Some(hz) = kvmclock() {
                return (hz, "kvmclock");
            }
        }
    }
    // A long preemption of the vCPU spoils an attempt: try again.
    for _ in 0..3 {
        if let Some(hz) = pit() {
            return (hz, "pit");
        }
    }
    (3_000_000_000, "assumed")
}

/// struct pvclock_vcpu_time_info (32 bytes), written by KVM.
#[repr(C, align(64))]
struct Pvclock([u8; 64]);
static mut PVCLOCK: Pvclock = Pvclock([0; 64]);

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: only called for the kvmclock MSR, which KVM advertised.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

fn kvmclock() -> Option<u64> {
    let p = core::ptr::addr_of_mut!(PVCLOCK) as u64;
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, p | 1);
    // SAFETY: KVM wrote the structure synchronously on the MSR write;
    // volatile reads of our own static.
    let (version, mul, shift) = unsafe {
        (
            core::ptr::read_volatile(p as *const u32),
            core::ptr::read_volatile((p + 24) as *const u32),
            core::ptr::read_volatile((p + 28) as *const i8),
        )
    };
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
    if version == 0 || mul == 0 {
        return None;
    }
    // ns = ((tsc << shift) * mul) >> 32  (shift < 0: >> -shift)
    // => hz = 1e9 * 2^32 / mul, then / 2^shift.
    let mut hz = (1_000_000_000u128 << 32) / mul as u128;
    if shift >= 0 {
        hz >>= shift as u32;
    } else {
        hz <<= (-shift) as u32;
    }
    Some(hz as u64)
}

/// PIT channel 0 as a free-running rate generator (mode 2, reload 65536,
/// 1.193182 MHz), its count read with latch commands while the TSC runs
/// for 50 ms of PIT time. Channel 0 is used rather than the usual channel
/// 2 because QEMU microvm has no port 0x61 (the channel 2 gate); its IRQ 0
/// is never delivered (interrupts stay off). Each port access is an exit,
/// so a poll takes ~30 µs on PVM: 0.06% of the interval.
fn pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const SPAN: u64 = PIT_HZ / 20; // 50 ms
    /// The count, the TSC in the middle of the read, the read's length.
    fn sample() -> (u16, u64, u64) {
        let a = now();
        port::outb(0x43, 0x00); // latch channel 0
        let lo = port::inb(0x40);
        let hi = port::inb(0x40);
        let b = now();
        (u16::from_le_bytes([lo, hi]), a + (b - a) / 2, b - a)
    }
    port::outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2, binary
    port::outb(0x40, 0);
    port::outb(0x40, 0); // reload 65536
    if sample().0 == sample().0 && sample().0 == sample().0 {
        return None; // not counting: no PIT (reads of nothing give 0xffff)
    }
    // The vCPU may be preempted in the middle of a read: the first and the
    // last 5 samples each give the pair (PIT ticks, TSC) of the shortest
    // read.
    const BEST_OF: u32 = 5;
    let mut prev = sample().0;
    let mut elapsed = 0u64;
    let (mut polls, mut still, mut tail) = (0u32, 0u32, 0u32);
    let mut first: Option<(u64, u64, u64)> = None; // (elapsed, tsc, width)
    let mut last: Option<(u64, u64, u64)> = None;
    loop {
        let (c, t, w) = sample();
        // Counts down; a step of more than half the period means no PIT.
        let step = prev.wrapping_sub(c) as u64;
        if step > 0x8000 {
            return None;
        }
        elapsed += step;
        prev = c;
        polls += 1;
        if polls <= BEST_OF {
            if first.map_or(true, |f| w < f.2) {
                first = Some((elapsed, t, w));
            }
        } else if elapsed >= first.map_or(0, |f| f.0) + SPAN {
            if last.map_or(true, |l| w < l.2) {
                last = Some((elapsed, t, w));
            }
            tail += 1;
            if tail == BEST_OF {
                break;
            }
        }
        // A poll takes 1-30 µs, a PIT tick 0.84 µs: a count that stands
        // still for 100 polls is no PIT. 50 ms is a few thousand polls.
        still = if step == 0 { still + 1 } else { 0 };
        if still > 100 || polls > 200_000 {
            return None;
        }
    }
    let (first, last) = (first?, last?);
    let ticks = last.0 - first.0;
    let hz = (last.1.wrapping_sub(first.1) as u128 * PIT_HZ as u128 / ticks as u128) as u64;
    // Plausible TSC: 100 MHz .. 10 GHz.
    (100_000_000..10_000_000_000).contains(&hz).then_some(hz)
}
