//! PC legacy devices at fixed I/O ports: the 16550 serial port, the exit
//! port and the keyboard controller's reset line.

mod exit_port;
mod i8042;
mod serial;

pub use exit_port::{ExitPort, EXIT_PORT, EXIT_PORT_LEN};
pub use i8042::{I8042, I8042_BASE, I8042_LEN};
pub use serial::{Serial, SerialError, COM1_BASE, COM1_IRQ, COM1_LEN};
