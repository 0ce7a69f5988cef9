//! Block drivers: what each kind of node does. A node asks its driver for
//! its size, its children and an I/O engine; the graph does the rest.

mod file;
mod null;
pub mod qcow2;
mod raw;

pub use file::{File, FileOptions};
pub use null::{Null, DEFAULT_SIZE as NULL_DEFAULT_SIZE};
pub use raw::Raw;

use crate::error::BlockError;
use crate::file::DiskFile;
use crate::io::AsyncIo;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// A child node as its parent's driver sees it: the graph's `NodeRef`.
/// Drivers name their children only through this trait, so they need
/// nothing from the graph above them.
pub trait Child: Sized + Send + Sync {
    /// The child's node-name.
    fn name(&self) -> &str;

    /// The driver serving the child.
    fn driver(&self) -> &dyn Driver<Self>;
}

/// One kind of block node, whose children are `C`s.
pub trait Driver<C>: Send + Sync {
    /// QEMU's driver name: `file`, `raw`, `null-co`.
    fn name(&self) -> &'static str;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// The host file at the bottom of this node, as QEMU's `file` field.
    fn filename(&self) -> String;

    /// Child edges: role and child.
    fn children(&self) -> Vec<(&'static str, &C)> {
        Vec::new()
    }

    /// The alignment in bytes of offsets and lengths this node's I/O needs
    /// (a host disk's logical block size under `O_DIRECT`); at least 512.
    fn io_alignment(&self) -> u32 {
        512
    }

    /// The open host file this node is, for a format driver above it that
    /// reads and writes its metadata directly; `None` for anything but a
    /// `file` node.
    fn disk_file(&self) -> Option<Arc<DiskFile>> {
        None
    }

    /// An I/O engine on this node for up to `depth` operations in flight,
    /// signalling (a duplicate of) `notifier` when completions are ready;
    /// the engines of one node tree share it, so one wait covers them all.
    /// `node` is this node's name, for errors.
    fn open_io(
        &self,
        node: &str,
        depth: u32,
        notifier: &EventFd,
    ) -> Result<Box<dyn AsyncIo>, BlockError>;
}
