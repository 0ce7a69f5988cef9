//! The 16550 UART on COM1 (vm-superio's model), raising its interrupt
//! through an eventfd that the VMM registers as an irqfd.

use std::io::{self, Write};

use base::state::{StateError, StateReader, StateWriter};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Trigger;
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

    /// Writes the UART's registers and the input bytes the guest has not
    /// read yet.
    pub fn save(&self, w: &mut StateWriter) {
        let s = self.uart.state();
        w.u8(s.baud_divisor_low)
            .u8(s.baud_divisor_high)
            .u8(s.interrupt_enable)
            .u8(s.interrupt_identification)
            .u8(s.line_control)
            .u8(s.line_status)
            .u8(s.modem_control)
            .u8(s.modem_status)
            .u8(s.scratch)
            .bytes(&s.in_buffer);
    }

    /// Takes the registers and pending input [`save`](Self::save) wrote;
    /// output keeps going to this port's writer. On error nothing changed.
    pub fn restore(&mut self, r: &mut StateReader) -> Result<(), StateError> {
        let state = SerialState {
            baud_divisor_low: r.u8("serial baud divisor low")?,
            baud_divisor_high: r.u8("serial baud divisor high")?,
            interrupt_enable: r.u8("serial interrupt enable")?,
            interrupt_identification: r.u8("serial interrupt identification")?,
            line_control: r.u8("serial line control")?,
            line_status: r.u8("serial line status")?,
            modem_control: r.u8("serial modem control")?,
            modem_status: r.u8("serial modem status")?,
            scratch: r.u8("serial scratch")?,
            in_buffer: r.bytes("serial input FIFO")?.to_vec(),
        };
        // The FIFO's size is vm-superio's; what it holds when empty is its room.
        let fifo = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if state.in_buffer.len() > fifo {
            return Err(StateError::invalid(
                "serial input FIFO",
                format!(
                    "{} bytes do not fit the {fifo}-byte FIFO",
                    state.in_buffer.len()
                ),
            ));
        }
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(|e| {
            StateError::invalid(
                "serial interrupt",
                format!("cannot duplicate its eventfd: {e}"),
            )
        })?;
        // Built with a stand-in writer, so that a failure keeps the real one.
        let sink: Box<dyn Write + Send> = Box::new(io::sink());
        let mut uart = vm_superio::Serial::from_state(&state, IrqTrigger(irq), NoEvents, sink)
            .map_err(|e| StateError::invalid("serial", format!("{e:?}")))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
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
    fn save_then_restore_gives_the_same_registers_and_pending_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut serial = Serial::new(&irq, Box::new(sink.clone())).unwrap();
        serial.write(3, &[0x80]); // DLAB on
        serial.write(0, &[0x0c]); // 9600 baud
        serial.write(3, &[0x03]); // 8n1, DLAB off
        serial.write(1, &[0x01]); // received-data interrupt
        serial.write(7, &[0xa5]); // scratch
        serial.write(4, &[0x0b]); // DTR, RTS, OUT2
        serial.enqueue_input(b"x").unwrap();
        let mut data = [0];
        serial.read(0, &mut data);
        assert_eq!(data, *b"x");
        serial.enqueue_input(b"abc").unwrap();
        let mut w = StateWriter::new();
        serial.save(&mut w);
        let saved = w.into_vec();

        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink2 = Sink::default();
        let mut other = Serial::new(&irq2, Box::new(sink2.clone())).unwrap();
        let mut r = StateReader::new(&saved);
        other.restore(&mut r).unwrap();
        r.finish("serial").unwrap();
        assert_eq!(other.uart.state(), serial.uart.state());
        assert!(
            irq2.read().unwrap() >= 1,
            "pending input raises the interrupt"
        );
        let mut w = StateWriter::new();
        other.save(&mut w);
        assert_eq!(w.into_vec(), saved, "save after restore is the same state");
        for want in *b"abc" {
            other.read(0, &mut data);
            assert_eq!(data, [want]);
        }
        other.write(0, b"z");
        assert_eq!(
            &*sink2.0.lock().unwrap(),
            b"z",
            "output still goes to its writer"
        );
    }

    #[test]
    fn truncated_or_oversized_serial_state_is_refused_and_changes_nothing() {
        let irq = EventFd::new(0).unwrap();
        let mut serial = Serial::new(&irq, Box::new(io::sink())).unwrap();
        serial.enqueue_input(b"q").unwrap();
        let mut w = StateWriter::new();
        serial.save(&mut w);
        let saved = w.into_vec();
        let before = serial.uart.state();
        for cut in 0..saved.len() {
            let err = serial.restore(&mut StateReader::new(&saved[..cut]));
            assert!(matches!(err, Err(StateError::Truncated { .. })), "{cut}");
        }
        let mut w = StateWriter::new();
        w.raw(&[0; 9]).bytes(&[1; 65]);
        let big = w.into_vec();
        let err = serial.restore(&mut StateReader::new(&big)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the saved state is invalid: serial input FIFO: 65 bytes do not fit the 64-byte FIFO"
        );
        assert_eq!(serial.uart.state(), before);
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
