//! VM-wide KVM state: the in-kernel interrupt controllers (two PICs and
//! the IOAPIC), the PIT, and the kvmclock base.

use base::state::{StateError, StateReader, StateWriter};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use zerocopy::IntoBytes;

use super::cpu::kvm_struct;
use super::MigrationError;

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "the master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "the slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "the IOAPIC"),
];

/// The VM's interrupt controllers, PIT and clock.
pub struct MachineState {
    pub irqchips: [kvm_irqchip; 3],
    /// The PIT's state, if the VM has one.
    pub pit: Option<kvm_pit_state2>,
    pub clock: u64,
}

impl MachineState {
    /// Reads the state of a VM whose vCPUs are parked; `pit` says whether
    /// it has one.
    pub fn save(vm: &VmFd, pit: bool) -> Result<Self, MigrationError> {
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (chip, (id, _)) in irqchips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            vm.get_irqchip(chip)
                .map_err(|e| MigrationError::kvm("read the interrupt controllers", e))?;
        }
        Ok(Self {
            irqchips,
            pit: pit
                .then(|| vm.get_pit2())
                .transpose()
                .map_err(|e| MigrationError::kvm("read the PIT", e))?,
            clock: vm
                .get_clock()
                .map_err(|e| MigrationError::kvm("read the kvmclock", e))?
                .clock,
        })
    }

    /// Loads the state into a VM whose vCPUs have not run yet; `pit` says
    /// whether this VM has one, which must agree with the state.
    pub fn restore(&self, vm: &VmFd, pit: bool) -> Result<(), MigrationError> {
        if self.pit.is_some() != pit {
            let has = |p: bool| if p { "a PIT" } else { "no PIT" };
            return Err(MigrationError::Config(format!(
                "the source has {}, this VM {} (--pit)",
                has(self.pit.is_some()),
                has(pit)
            )));
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(|e| MigrationError::kvm("set the interrupt controllers", e))?;
        }
        if let Some(state) = &self.pit {
            vm.set_pit2(state)
                .map_err(|e| MigrationError::kvm("set the PIT", e))?;
        }
        let clock = kvm_clock_data {
            clock: self.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| MigrationError::kvm("set the kvmclock", e))
    }

    /// Appends the state to `w`.
    pub fn encode(&self, w: &mut StateWriter) {
        for chip in &self.irqchips {
            w.bytes(chip.as_bytes());
        }
        w.bool(self.pit.is_some());
        if let Some(pit) = &self.pit {
            w.bytes(pit.as_bytes());
        }
        w.u64(self.clock);
    }

    /// Reads a state written by [`encode`](Self::encode); each controller
    /// must be the one its place says.
    pub fn decode(r: &mut StateReader) -> Result<Self, StateError> {
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (chip, (id, name)) in irqchips.iter_mut().zip(CHIPS) {
            *chip = kvm_struct(r, "interrupt controller")?;
            if chip.chip_id != id {
                return Err(StateError::invalid(
                    "interrupt controller",
                    format!("chip {} where {name} (chip {id}) belongs", chip.chip_id),
                ));
            }
        }
        Ok(Self {
            irqchips,
            pit: match r.bool("PIT present")? {
                true => Some(kvm_struct(r, "PIT")?),
                false => None,
            },
            clock: r.u64("kvmclock")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_in_the_wrong_place_are_refused() {
        let mut state = MachineState {
            irqchips: [kvm_irqchip::default(); 3],
            pit: Some(kvm_pit_state2::default()),
            clock: 5,
        };
        for (chip, (id, _)) in state.irqchips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
        }
        let mut w = StateWriter::new();
        state.encode(&mut w);
        let bytes = w.into_vec();
        let mut r = StateReader::new(&bytes);
        let back = MachineState::decode(&mut r).unwrap();
        r.finish("machine").unwrap();
        assert_eq!(back.clock, 5);
        state.irqchips.swap(0, 2);
        let mut w = StateWriter::new();
        state.encode(&mut w);
        let bytes = w.into_vec();
        let err = MachineState::decode(&mut StateReader::new(&bytes))
            .err()
            .unwrap();
        assert!(err.to_string().contains("master PIC"), "{err}");
    }
}
