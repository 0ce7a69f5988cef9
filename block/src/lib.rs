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
//! Above them sits the block graph (`graph`): nodes opened by drivers
//! (`driver`: file, raw, null-co), kept alive by counted references and
//! guarded by an exclusive, named in-use lease. Block jobs (`job`: backup)
//! take leases and run on their own threads through QEMU's job state
//! machine. Block migration (`migration`) copies disks to another
//! process through the same leases. This crate knows nothing of KVM or
//! virtio.

pub mod bitmap;
pub mod driver;
pub mod error;
pub mod export;
pub mod file;
pub mod graph;
pub mod io;
pub mod job;
pub mod lock;
pub mod migration;
pub mod name;
pub mod throttle;

pub use error::BlockError;
pub use file::{DiskError, DiskFile, DiskOptions, FileId};
pub use graph::{
    BackingOptions, ChildOptions, DriverOptions, FileOptions, Graph, Holder, ImageFormat,
    ImageInfo, Lease, NodeInfo, NodeOptions, NodeRef,
};
pub use io::{Aio, AsyncIo, Completion, IoError, NullIo, SyncIo, UringIo};
pub use lock::Locking;
