//! Disks for the VMM's block devices: a host file opened the way the user
//! asked, and the I/O engines that read and write it.
//!
//! ```text
//!  DiskFile (path, size, read-only, O_DIRECT)
//!      │ fd
//!      ▼
//!  AsyncIo ── UringIo  (io_uring: registered file, restricted opcodes)
//!          └─ SyncIo   (plain system calls, same interface)
//! ```
//!
//! Block jobs (`job`) run on their own threads through QEMU's job state
//! machine. The block graph (nodes, leases) grows here later; this crate
//! knows nothing of KVM or virtio.

pub mod file;
pub mod io;
pub mod job;

pub use file::{DiskError, DiskFile, DiskOptions};
pub use io::{AsyncIo, Completion, IoError, SyncIo, UringIo};
