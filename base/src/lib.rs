//! What every crate's worker threads start through.
//!
//! [`thread::spawn`] names a thread, installs the seccomp filter of its
//! [`ThreadKind`] before the thread runs any of its own code, runs it
//! under `catch_unwind`, and turns a panic into one log line and a
//! callback the caller chose (a device goes to `DEVICE_NEEDS_RESET`, a job
//! fails). Which filter each kind gets is the caller's choice, made once in
//! a [`Sandbox`]; this crate only knows how to install one.
//!
//! [`socket::listen_unix`] makes a listening socket's path appear only
//! once it accepts connections.
//!
//! [`sync::lock`] and its `Condvar` companions take a mutex's data even
//! when a panicking holder poisoned it; every crate locks through them.

#[doc(hidden)]
pub mod alloc_count;
pub mod cpus;
pub mod seccomp;
pub mod socket;
pub mod state;
pub mod sync;
pub mod thread;
#[doc(hidden)]
pub mod xorshift;

pub use seccomp::SeccompError;
pub use sync::lock;
pub use thread::{spawn, spawn_on, Sandbox, ThreadKind};
