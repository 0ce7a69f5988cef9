//! Ending the guest with a status.

use crate::port;
use core::arch::asm;

/// isa-debug-exit style port: our VMM exits with the byte written,
/// QEMU's `isa-debug-exit,iobase=0xf4` with `(byte << 1) | 1`.
const EXIT_PORT: u16 = 0xf4;

/// Cloud Hypervisor ignores 0xf4; its ACPI shutdown device at 0x600
/// powers off on S5 (SLP_TYP 5 << 2 | SLP_EN 1 << 5 = 0x34). The status
/// is lost there (it exits 0), but the guest does end.
const CH_SHUTDOWN_PORT: u16 = 0x600;
const CH_S5: u8 = 0x34;

pub fn exit(status: u8) -> ! {
    port::outb(EXIT_PORT, status);
    port::outb(CH_SHUTDOWN_PORT, CH_S5);
    // No exit device: stop here.
    halt_forever()
}

/// `cli; hlt` forever: the vCPU sleeps in KVM until the VMM is killed.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the CPU; nothing after it relies on state.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
