//! QMP, the QEMU Machine Protocol: the JSON control socket QEMU's tools
//! and libraries speak, served by the VMM so they can drive it.
//!
//! - `error.rs`: the error a client sees ([`QmpError`], [`ErrorClass`]).
//! - `args.rs`: typed command arguments with QEMU's messages ([`Args`]).
//! - `wire.rs`: JSON written the way QEMU writes it.
//! - `event.rs`: events and their timestamps ([`Event`]).

mod args;
mod error;
mod event;
mod wire;

pub use args::{expects, invalid_type, missing, unexpected, Args};
pub use error::{ErrorClass, QmpError};
pub use event::{Event, Timestamp};
