//! The 16550 UART on COM1 (vm-superio's model), raising its interrupt
//! through an eventfd that the VMM registers as an irqfd.

use std::io::{self, Write};

use vm_superio::{serial::NoEvents, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, GuestRequest};

/// COM1's I/O ports.
pub const COM1_BASE: u64 = 0x3f8;
/// A 16550 has 8 registers.
pub const COM1_LEN: u64 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The interrupt eventfd could not be created or duplicated.
    #[error("cannot create the serial port's interrupt eventfd: {0}")]
    InterruptFd(#[source] io::Error),
    /// Input for the guest could not be queued.
    #[error("cannot pass input to the guest's serial port: {0}")]
    Input(String),
}

/// Raises the UART's interrupt by signalling an eventfd.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1: guest output goes to a writer, host input is queued for the guest.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART that writes guest output to `out` and interrupts through `irq`.
    pub fn new(irq: &EventFd, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let irq = irq.try_clone().map_err(SerialError::InterruptFd)?;
        Ok(Self {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        })
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| SerialError::Input(format!("{e:?}")))
    }

    /// How many more input bytes the FIFO takes now.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(reg), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if let (Ok(reg), Some(&value)) = (u8::try_from(offset), data.first()) {
            // A host writer that went away (closed pipe) must not stop the
            // guest: the byte is lost, the guest goes on.
            if let Err(e) = self.uart.write(reg, value) {
                log::debug!("serial: write to register {reg} failed: {e:?}");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let irq = EventFd::new(0).unwrap();
        let sink = Sink::default();
        let mut serial = Serial::new(&irq, Box::new(sink.clone())).unwrap();
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn host_input_is_readable_and_raises_the_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(&irq, Box::new(io::sink())).unwrap();
        // Enable the "received data available" interrupt (IER bit 0).
        serial.write(1, &[1]);
        assert_eq!(serial.enqueue_input(b"x").unwrap(), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data-ready bit set");
        let mut data = [0];
        serial.read(0, &mut data);
        assert_eq!(data, *b"x");
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let irq = EventFd::new(0).unwrap();
        let mut serial = Serial::new(&irq, Box::new(io::sink())).unwrap();
        let mut data = [0x55];
        serial.read(1 << 20, &mut data);
        assert_eq!(data, [0x55]);
        assert_eq!(serial.write(1 << 20, &[1]), None);
        assert_eq!(serial.write(0, &[]), None);
    }
}
