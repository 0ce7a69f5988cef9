//! `crash=...`: stopping the VM on purpose, to test how the VMM reports a
//! failed guest.
//!
//! - `triple_fault`: loads an IDT with limit 0 and executes `ud2`. The #UD
//!   gate is beyond the limit (#GP), so is the #GP gate (#DF), so is the
//!   #DF gate: the CPU shuts down, which KVM reports as
//!   `KVM_EXIT_SHUTDOWN` (QEMU without `-no-reboot` resets instead).
//! - `emulation`: executes `popcnt %rax,%rax` in kernel mode. PVM hosts
//!   emulate all guest kernel code and their emulator lacks `popcnt`: KVM
//!   stops the VM with `KVM_EXIT_INTERNAL_ERROR` (emulation failure). On
//!   hardware KVM the instruction just runs and the function returns.

use core::arch::{asm, global_asm};

// The one deliberate site of an instruction PVM's emulator lacks. It is
// hand-encoded and labelled `tg_deliberate_popcnt`: build.sh's check for
// forbidden instructions allows exactly the instruction at that symbol,
// and only if it is this popcnt. No braces here (global_asm! formatting).
global_asm!(
    r#"
    .section .text.tg_deliberate_popcnt, "ax", @progbits
    .balign 16
    .global tg_deliberate_popcnt
    .type tg_deliberate_popcnt, @function
tg_deliberate_popcnt:
    .byte 0xf3, 0x48, 0x0f, 0xb8, 0xc0      # popcnt %rax, %rax
    ret
    .size tg_deliberate_popcnt, . - tg_deliberate_popcnt
"#,
    options(att_syntax)
);

extern "C" {
    /// Runs the popcnt above; returns its result (the popcount of
    /// whatever %rax held).
    fn tg_deliberate_popcnt() -> u64;
}

/// Executes the popcnt; returns only where the CPU runs it natively.
pub fn emulation() {
    // SAFETY: reads and writes only %rax (caller-saved, the return
    // register); no memory, no stack beyond the call's return address.
    unsafe {
        tg_deliberate_popcnt();
    }
}

/// The IDT register value for an empty IDT: limit 0, base 0.
#[repr(C, packed)]
struct IdtPtr {
    limit: u16,
    base: u64,
}

static NO_IDT: IdtPtr = IdtPtr { limit: 0, base: 0 };

/// Triple fault: never returns (the VM shuts down).
pub fn triple_fault() -> ! {
    // SAFETY: deliberately makes every exception unrecoverable; the CPU
    // shuts down at the ud2, so nothing after it runs.
    unsafe {
        asm!(
            "cli",
            "lidt [{idt}]",
            "ud2",
            idt = in(reg) &NO_IDT,
            options(noreturn, nostack)
        )
    }
}
