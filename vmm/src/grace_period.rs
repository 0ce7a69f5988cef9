//! Ending the KVM grace period that VM start-up leaves pending, so that a
//! short-lived VM does not wait for it when it is destroyed.
//!
//! Adding the in-kernel irqchip and the queues' ioeventfds changes KVM's
//! I/O buses, and the kernel finishes that change after a normal SRCU grace
//! period of the VM's. On our hosts (250 Hz tick) that period runs for
//! ~14 ms after start-up, and destroying the VM waits for what is still
//! pending: a test guest that ended 8 ms after start paid ~7 ms more at
//! exit. A memory slot update waits for an expedited grace period instead,
//! which takes the pending one with it; once it has, the VM closes at once.
//! `python3 bench/kvm_order.py` measures both (a VM set up like ours,
//! closed 8 ms after creation: 6.89 ms to close, 0.34 ms after the update;
//! medians, in bench/README.md).

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The transient slot's alignment.
const ALIGN: u64 = 1 << 30;

/// Where the transient slot goes: at the first 1 GiB boundary at or above
/// both the end of guest RAM and the MMIO gap's.
fn transient_slot_address(mem: &GuestMemoryMmap) -> u64 {
    let top = mem
        .iter()
        .map(|r| r.last_addr().raw_value() + 1)
        .max()
        .unwrap_or(0)
        .max(crate::memory::MMIO_GAP_END);
    top.div_ceil(ALIGN) * ALIGN
}

/// Adds a one-page, read-only memory slot far above guest RAM (an alias of
/// guest RAM's first page) and deletes it again: the first update waits
/// for the grace period start-up left pending, the delete is quick. Blocks
/// the caller for what was left of that period (~6-8 ms here, none if it
/// had ended). Best effort: a KVM without read-only slots, or one that
/// refuses the slot, is left as it is.
pub fn end_pending(vm: &VmFd, mem: &GuestMemoryMmap) {
    // Read-only, so the guest cannot write through the alias behind the
    // dirty log's back while it exists.
    if !vm.check_extension(Cap::ReadonlyMem) {
        return;
    }
    let Ok(host) = mem.get_host_address(GuestAddress(0)) else {
        return;
    };
    let mut slot = kvm_userspace_memory_region {
        slot: mem.num_regions() as u32,
        flags: KVM_MEM_READONLY,
        guest_phys_addr: transient_slot_address(mem),
        memory_size: 4096,
        userspace_addr: host as u64,
    };
    // SAFETY: the slot maps guest RAM's first page, which `mem` keeps
    // mapped for longer than this call, read-only at a guest address no
    // other slot uses; it is deleted below before this returns.
    if let Err(e) = unsafe { vm.set_user_memory_region(slot) } {
        log::debug!("no transient memory slot to end KVM's grace period: {e}");
        return;
    }
    slot.memory_size = 0;
    // SAFETY: a zero size deletes the slot added above.
    if let Err(e) = unsafe { vm.set_user_memory_region(slot) } {
        log::warn!(
            "the transient read-only memory slot at {:#x} could not be deleted: {e}",
            slot.guest_phys_addr
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transient_slot_lies_above_guest_ram_and_the_mmio_gap() {
        for mib in [16u64, 64, 3 << 10, 5 << 10, (6 << 10) + 3] {
            let mem = crate::memory::create_guest_memory(mib << 20).unwrap();
            let at = transient_slot_address(&mem);
            assert_eq!(at % ALIGN, 0, "{mib} MiB: aligned");
            assert!(
                at >= crate::memory::MMIO_GAP_END,
                "{mib} MiB: above the MMIO gap"
            );
            for region in mem.iter() {
                assert!(
                    region.last_addr().raw_value() < at,
                    "{mib} MiB: above the region at {:#x}",
                    region.start_addr().raw_value()
                );
            }
        }
    }
}
