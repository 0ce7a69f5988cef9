//! x86 port I/O. Every access is a VM exit (8-9 µs on PVM hosts).

use core::arch::asm;

#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
#[allow(dead_code)] // for later issues (virtio, serial input)
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects visible to Rust.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}
