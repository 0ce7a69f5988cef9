//! The exit port: a byte written to I/O port 0xf4 ends the VM with that
//! status. QEMU's `isa-debug-exit` sits at the same port, so a guest built
//! for one works with the other (QEMU reports `(v << 1) | 1`, we report `v`).

use crate::bus::{BusDevice, GuestRequest};

/// The I/O port of the exit device.
pub const EXIT_PORT: u64 = 0xf4;
/// Its width: QEMU's device is 4 ports wide; we take the same range.
pub const EXIT_PORT_LEN: u64 = 4;

/// Ends the VM with the status the guest writes.
#[derive(Debug, Default)]
pub struct ExitPort;

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        // Only the first port carries the status; a wider write's low byte is it.
        (offset == 0).then(|| GuestRequest::Exit(data.first().copied().unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_written_becomes_exit_status() {
        let mut port = ExitPort;
        assert_eq!(port.write(0, &[3]), Some(GuestRequest::Exit(3)));
        assert_eq!(
            port.write(0, &[0xff, 0, 0, 0]),
            Some(GuestRequest::Exit(255))
        );
        assert_eq!(port.write(0, &[]), Some(GuestRequest::Exit(0)));
    }

    #[test]
    fn writes_to_other_ports_of_the_range_are_ignored() {
        let mut port = ExitPort;
        assert_eq!(port.write(1, &[3]), None);
        let mut data = [0xaa; 2];
        port.read(0, &mut data);
        assert_eq!(data, [0, 0]);
    }
}
