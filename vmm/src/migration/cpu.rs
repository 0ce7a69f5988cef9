//! A vCPU's KVM state, saved while the vCPU is parked and restored before
//! its first `KVM_RUN`.
//!
//! Restore order matters (KVM's documentation; Firecracker and Cloud
//! Hypervisor found the same): CPUID first, since it decides which MSRs
//! and XSAVE features exist; special registers before the LAPIC (the
//! APIC base MSR lives in them) and the LAPIC before MSRs (the TSC
//! deadline MSR needs the LAPIC in TSC-deadline mode); the TSC MSR before
//! the TSC deadline; vCPU events (pending exceptions and interrupts,
//! NMI and SMI state) last, so nothing after them clears what they set.

use base::state::{StateError, StateReader, StateWriter};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::{FromBytes, IntoBytes};

use super::MigrationError;

/// `MSR_IA32_TSC`: restored before every other MSR (the TSC deadline is
/// relative to it).
const MSR_IA32_TSC: u32 = 0x10;
/// The most CPUID entries a saved vCPU may have.
const MAX_CPUID_ENTRIES: usize = 256;
/// The most MSRs a saved vCPU may have.
const MAX_MSRS: usize = 1024;

/// Everything KVM keeps about one vCPU that a guest can see.
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value), the TSC first.
    pub msrs: Vec<(u32, u64)>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency in kHz.
    pub tsc_khz: u32,
}

/// The MSRs KVM lists as saveable that this vCPU can read back: probed once
/// per VM, since a listed MSR may still be refused (a feature the CPUID
/// leaves out), and `KVM_GET_MSRS` stops at the first one it refuses.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, MigrationError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| MigrationError::kvm("list the saveable MSRs", e))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    // The TSC first: on restore, the deadline MSR is relative to it.
    indices.sort_by_key(|&i| i != MSR_IA32_TSC);
    loop {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| MigrationError::kvm("list the saveable MSRs", libc::E2BIG))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| MigrationError::kvm("read MSRs", e))?;
        if read >= indices.len() {
            return Ok(indices);
        }
        indices.remove(read);
    }
}

impl VcpuState {
    /// Reads a parked vCPU's state; `msrs` from [`saveable_msrs`].
    pub fn save(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Self, MigrationError> {
        let k = |what| move |e| MigrationError::kvm(what, e);
        let cpuid = vcpu
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(k("read the vCPU's CPUID"))?
            .as_slice()
            .to_vec();
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut table = Msrs::from_entries(&entries)
            .map_err(|_| MigrationError::kvm("read MSRs", libc::E2BIG))?;
        let read = vcpu.get_msrs(&mut table).map_err(k("read MSRs"))?;
        if read != msrs.len() {
            return Err(MigrationError::Kvm {
                what: "read MSRs",
                reason: format!(
                    "KVM read {read} of {} MSRs, stopping at {:#x}",
                    msrs.len(),
                    msrs[read]
                ),
            });
        }
        Ok(Self {
            cpuid,
            regs: vcpu.get_regs().map_err(k("read registers"))?,
            sregs: vcpu.get_sregs().map_err(k("read special registers"))?,
            xsave: vcpu.get_xsave().map_err(k("read the XSAVE area"))?,
            xcrs: vcpu.get_xcrs().map_err(k("read XCRs"))?,
            debugregs: vcpu.get_debug_regs().map_err(k("read debug registers"))?,
            lapic: vcpu.get_lapic().map_err(k("read the local APIC"))?,
            msrs: table.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            mp_state: vcpu.get_mp_state().map_err(k("read the MP state"))?,
            events: vcpu.get_vcpu_events().map_err(k("read vCPU events"))?,
            tsc_khz: vcpu.get_tsc_khz().map_err(k("read the TSC frequency"))?,
        })
    }

    /// Loads the state into a vCPU that has not run yet.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), MigrationError> {
        let k = |what| move |e| MigrationError::kvm(what, e);
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| MigrationError::kvm("set CPUID", libc::E2BIG))?;
        vcpu.set_cpuid2(&cpuid).map_err(k("set CPUID"))?;
        let here = vcpu.get_tsc_khz().map_err(k("read the TSC frequency"))?;
        if here != self.tsc_khz {
            vcpu.set_tsc_khz(self.tsc_khz)
                .map_err(|e| MigrationError::Config(format!(
                    "the source's TSC runs at {} kHz, this host's at {here} kHz, and KVM here cannot scale it ({e})",
                    self.tsc_khz
                )))?;
        }
        vcpu.set_sregs(&self.sregs)
            .map_err(k("set special registers"))?;
        vcpu.set_regs(&self.regs).map_err(k("set registers"))?;
        // SAFETY: the area was read by KVM_GET_XSAVE on a vCPU with the
        // same CPUID (set just above), and is the legacy 4 KiB layout that
        // call fills: KVM validates its contents and refuses what it does
        // not support.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(k("set the XSAVE area"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(k("set XCRs"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(k("set the local APIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let table = Msrs::from_entries(&entries)
            .map_err(|_| MigrationError::kvm("set MSRs", libc::E2BIG))?;
        let set = vcpu.set_msrs(&table).map_err(k("set MSRs"))?;
        if set != entries.len() {
            return Err(MigrationError::Kvm {
                what: "set MSRs",
                reason: format!(
                    "KVM took {set} of {} MSRs, refusing MSR {:#x}",
                    entries.len(),
                    entries[set].index
                ),
            });
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(k("set debug registers"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(k("set the MP state"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(k("set vCPU events"))?;
        Ok(())
    }

    /// Appends the state to `w`.
    pub fn encode(&self, w: &mut StateWriter) {
        w.u32(self.cpuid.len() as u32);
        for e in &self.cpuid {
            w.raw(e.as_bytes());
        }
        w.bytes(self.regs.as_bytes())
            .bytes(self.sregs.as_bytes())
            .bytes(self.xsave.as_bytes())
            .bytes(self.xcrs.as_bytes())
            .bytes(self.debugregs.as_bytes())
            .bytes(self.lapic.as_bytes());
        w.u32(self.msrs.len() as u32);
        for &(index, data) in &self.msrs {
            w.u32(index).u64(data);
        }
        w.bytes(self.mp_state.as_bytes())
            .bytes(self.events.as_bytes())
            .u32(self.tsc_khz);
    }

    /// Reads a state written by [`encode`](Self::encode).
    pub fn decode(r: &mut StateReader) -> Result<Self, StateError> {
        let count = r.u32("CPUID entry count")? as usize;
        if count > MAX_CPUID_ENTRIES {
            return Err(StateError::invalid(
                "CPUID entry count",
                format!("{count} is more than {MAX_CPUID_ENTRIES}"),
            ));
        }
        let mut cpuid = Vec::with_capacity(count);
        for _ in 0..count {
            let raw = r.raw("CPUID entry", std::mem::size_of::<kvm_cpuid_entry2>())?;
            cpuid.push(kvm_cpuid_entry2::read_from_bytes(raw).expect("exact size"));
        }
        let regs = kvm_struct(r, "registers")?;
        let sregs = kvm_struct(r, "special registers")?;
        let xsave = kvm_struct(r, "XSAVE area")?;
        let xcrs = kvm_struct(r, "XCRs")?;
        let debugregs = kvm_struct(r, "debug registers")?;
        let lapic = kvm_struct(r, "local APIC")?;
        let count = r.u32("MSR count")? as usize;
        if count > MAX_MSRS {
            return Err(StateError::invalid(
                "MSR count",
                format!("{count} is more than {MAX_MSRS}"),
            ));
        }
        let mut msrs = Vec::with_capacity(count);
        for _ in 0..count {
            msrs.push((r.u32("MSR index")?, r.u64("MSR value")?));
        }
        Ok(Self {
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            mp_state: kvm_struct(r, "MP state")?,
            events: kvm_struct(r, "vCPU events")?,
            tsc_khz: r.u32("TSC frequency")?,
        })
    }
}

/// Reads a KVM structure saved with its length; a length that is not the
/// structure's is invalid (another KVM's layout).
pub fn kvm_struct<T: FromBytes>(r: &mut StateReader, what: &'static str) -> Result<T, StateError> {
    let raw = r.bytes(what)?;
    T::read_from_bytes(raw).map_err(|_| {
        StateError::invalid(
            what,
            format!(
                "{} bytes where this build's KVM structure has {}",
                raw.len(),
                std::mem::size_of::<T>()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let regs = kvm_regs {
            rip: 0x1234,
            rax: 7,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr0: 0x8000_0011,
            ..Default::default()
        };
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806e9,
                ..Default::default()
            }],
            regs,
            sregs,
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![(MSR_IA32_TSC, 99), (0x6e0, 100)],
            mp_state: kvm_mp_state::default(),
            events: kvm_vcpu_events::default(),
            tsc_khz: 2_600_000,
        }
    }

    #[test]
    fn a_vcpu_state_reads_back_as_written() {
        let state = sample();
        let mut w = StateWriter::new();
        state.encode(&mut w);
        let bytes = w.into_vec();
        let mut r = StateReader::new(&bytes);
        let back = VcpuState::decode(&mut r).unwrap();
        r.finish("vCPU").unwrap();
        assert_eq!(back.regs, state.regs);
        assert_eq!(back.sregs.cr0, state.sregs.cr0);
        assert_eq!(back.msrs, state.msrs);
        assert_eq!(back.cpuid[0].eax, 0x806e9);
        assert_eq!(back.tsc_khz, state.tsc_khz);
        // Same bytes again: encoding is stable.
        let mut again = StateWriter::new();
        back.encode(&mut again);
        assert_eq!(again.into_vec(), bytes);
    }

    #[test]
    fn a_truncated_or_resized_vcpu_state_is_refused() {
        let mut w = StateWriter::new();
        sample().encode(&mut w);
        let bytes = w.into_vec();
        for cut in 0..bytes.len() {
            assert!(VcpuState::decode(&mut StateReader::new(&bytes[..cut])).is_err());
        }
        // A registers block of the wrong size (another layout).
        let mut w = StateWriter::new();
        w.u32(0).bytes(&[0; 8]);
        let bytes = w.into_vec();
        let err = VcpuState::decode(&mut StateReader::new(&bytes))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("registers: 8 bytes where"),
            "{err}"
        );
        let mut w = StateWriter::new();
        w.u32(100_000);
        let bytes = w.into_vec();
        assert!(VcpuState::decode(&mut StateReader::new(&bytes)).is_err());
    }
}
