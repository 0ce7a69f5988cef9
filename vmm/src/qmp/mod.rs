//! QMP, the QEMU Machine Protocol: the JSON control socket QEMU's tools
//! and libraries speak, served by the VMM so they can drive it.
//!
//! ```text
//!  client ─┐                ┌───────────── server.rs (thread "qmp") ──────────────┐
//!  client ─┼─ Unix socket ─►│ epoll: listener, clients, wake eventfd              │
//!  client ─┘                │   per client: Session (protocol.rs) + output buffer │
//!                           │     bytes ─► split.rs ─► serde_json ─► Commands     │
//!                           └───────────────────────▲─────────────────────────────┘
//!  any thread ── EventSink::emit ── queue + eventfd ┘
//! ```
//!
//! The layers, one idea per file:
//!
//! - `error.rs`: the error a client sees ([`QmpError`], [`ErrorClass`]).
//! - `args.rs`: typed command arguments with QEMU's messages ([`Args`]).
//! - `split.rs`: cutting the input byte stream into JSON texts.
//! - `wire.rs`: JSON written the way QEMU writes it.
//! - `event.rs`: events and their timestamps ([`Event`]).
//! - `protocol.rs`: one connection's rules, with no socket ([`Session`]).
//! - `client.rs`: one connected client's socket and output buffer.
//! - `server.rs`: the socket, the clients and the thread ([`QmpServer`]).
//!
//! The VMM plugs its commands in by implementing [`Commands`].

mod args;
mod client;
mod error;
mod event;
mod protocol;
mod server;
mod split;
mod wire;

pub use args::{expects, invalid_type, missing, unexpected, Args};
pub use error::{ErrorClass, QmpError};
pub use event::{Event, Timestamp};
pub use protocol::{Session, MAX_INPUT};
pub use server::{
    EventSink, QmpServer, QmpServerError, QmpThread, ShutdownHandle, MAX_CLIENTS, MAX_OUTPUT,
};

use serde_json::{Map, Value};

/// What the VMM does for each QMP command.
///
/// Commands run on the QMP thread, one at a time, and only after the
/// client has negotiated capabilities; `qmp_capabilities` and
/// `query-commands` are answered by the protocol and never reach here.
/// A command that takes long blocks every client (and events) meanwhile:
/// start long work elsewhere and report it with events, as block jobs do.
pub trait Commands: Send {
    /// Names of the commands it implements (for query-commands and dispatch).
    fn names(&self) -> Vec<&'static str>;
    /// Runs one command; Ok is the `return` value (often `{}`).
    fn execute(&mut self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError>;
}
