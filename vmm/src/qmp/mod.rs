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
pub use protocol::{version_triple, Next, Request, Session, MAX_INPUT};
pub use server::{
    EventSink, QmpServer, QmpServerError, QmpThread, ShutdownHandle, MAX_CLIENTS, MAX_OUTPUT,
    NEGOTIATION_TIMEOUT,
};

use serde_json::{Map, Value};

/// What the VMM does for each QMP command.
///
/// Commands run only after the client has negotiated capabilities;
/// `qmp_capabilities` and `query-commands` are answered by the protocol
/// and never reach here. A client's commands run one at a time, in order.
/// Most run on the QMP thread; those [`Commands::may_wait`] names run on
/// a thread of their own, so that while one waits (a drain, a slow file
/// system) other clients' commands and events go on. Their replies come
/// when they finish. So commands may run concurrently, from any thread.
pub trait Commands: Send + Sync {
    /// Names of the commands it implements (for query-commands and dispatch).
    fn names(&self) -> Vec<&'static str>;
    /// Runs one command; Ok is the `return` value (often `{}`).
    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError>;
    /// Whether `name` may wait for something outside the VMM's control
    /// (the kernel draining I/O, a file system): it then runs off the
    /// QMP thread. A command the QMP thread runs must never wait on a
    /// lock that such a command holds while it waits.
    fn may_wait(&self, _name: &str) -> bool {
        false
    }
}
