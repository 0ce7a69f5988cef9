//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine: Linux's `reboot=k` writes command 0xfe (pulse the reset line) to
//! port 0x64. There is no keyboard behind it.

use crate::bus::{BusDevice, GuestRequest};

/// First port of the controller (data port 0x60; command/status is 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u64 = 5;

const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The keyboard controller's reset line.
#[derive(Debug, Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so a guest that
        // polls before writing a command never waits.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        (offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU))
            .then_some(GuestRequest::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets_and_nothing_else_does() {
        let mut kbd = I8042;
        assert_eq!(kbd.write(4, &[0xfe]), Some(GuestRequest::Reset));
        assert_eq!(kbd.write(4, &[0xad]), None);
        assert_eq!(kbd.write(0, &[0xfe]), None);
        let mut status = [0xff];
        kbd.read(4, &mut status);
        assert_eq!(status, [0]);
    }
}
