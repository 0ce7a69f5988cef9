//! Output on the 16550 UART at I/O port 0x3f8 (COM1).
//!
//! Plain writes to the transmit holding register, no LSR polling: the
//! VMMs we run under (ours, QEMU, Cloud Hypervisor) take each byte
//! synchronously, and an extra `in` per byte would double the cost of
//! output (each port access is an exit). No UART set-up either: writes
//! to THR work in the reset state (DLAB = 0).

use crate::port;
use core::fmt;

const COM1_THR: u16 = 0x3f8;

/// Every line the guest prints starts with this.
pub const PREFIX: &str = "testguest: ";

pub fn put_bytes(bytes: &[u8]) {
    for &b in bytes {
        port::outb(COM1_THR, b);
    }
}

pub fn put(s: &str) {
    put_bytes(s.as_bytes());
}

/// Writes `n` in decimal without core::fmt (fewer emulated instructions).
pub fn put_dec(mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put_bytes(&buf[i..]);
}

/// A core::fmt sink for the rare paths (warnings, panics).
pub struct Writer;

impl fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        put(s);
        Ok(())
    }
}

/// Prints one line: `testguest: <args>\n`.
pub fn say(args: fmt::Arguments) {
    put(PREFIX);
    let _ = fmt::write(&mut Writer, args);
    put("\n");
}

/// `testguest: warning: ...` line, formatted like format!().
macro_rules! warning {
    ($($arg:tt)*) => {
        $crate::serial::say(format_args!("warning: {}", format_args!($($arg)*)))
    };
}
pub(crate) use warning;
