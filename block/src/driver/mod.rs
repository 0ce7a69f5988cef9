//! Block drivers: what each kind of node does. A node asks its driver for
//! its size, its children and an I/O engine; the graph does the rest.

mod file;
mod null;
pub mod qcow2;
mod raw;

pub use file::{File, FileOptions};
pub use null::{Null, DEFAULT_SIZE as NULL_DEFAULT_SIZE};
pub use qcow2::Qcow2;
pub use raw::Raw;

use crate::error::BlockError;
use crate::file::DiskFile;
use crate::io::AsyncIo;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// What a format node tells about its image, as QEMU's `ImageInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDetails {
    /// The cluster size in bytes.
    pub cluster_size: u64,
    /// The backing file name exactly as the image records it.
    pub backing_filename: Option<String>,
    /// The backing file's format as the image records it.
    pub backing_format: Option<String>,
    /// Format-specific data (`format-specific`).
    pub specific: Option<FormatSpecific>,
    /// The image says it was not closed cleanly (QEMU's `dirty-flag`).
    pub dirty: bool,
}

/// QEMU's `ImageInfoSpecific`, for the formats we have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSpecific {
    /// `{"type": "qcow2", "data": ...}`.
    Qcow2(Qcow2Specific),
}

/// QEMU's `ImageInfoSpecificQCow2`. The optional fields are the ones QEMU
/// shows only for version 3 images (`compat` "1.1").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Specific {
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: String,
    /// Version 3 only: the lazy-refcounts compatible feature.
    pub lazy_refcounts: Option<bool>,
    /// Version 3 only: the corrupt incompatible feature.
    pub corrupt: Option<bool>,
    /// Version 3 only: the extended L2 entries incompatible feature.
    pub extended_l2: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// "zlib" or "zstd".
    pub compression_type: String,
}

/// How a range of a node is stored, as QEMU's block status and NBD's
/// `base:allocation` context tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Nothing is allocated for it here or below (NBD's `NBD_STATE_HOLE`).
    pub hole: bool,
    /// It reads as zeros (NBD's `NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Allocation {
    /// Allocated data, contents unknown.
    pub const DATA: Allocation = Allocation {
        hole: false,
        zero: false,
    };
    /// Unallocated, reading as zeros.
    pub const HOLE: Allocation = Allocation {
        hole: true,
        zero: true,
    };
    /// Allocated but known to read as zeros.
    pub const ZERO: Allocation = Allocation {
        hole: false,
        zero: true,
    };
}

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

    /// The `backing` child, for a format with backing files.
    fn backing(&self) -> Option<&C> {
        None
    }

    /// What QEMU's `ImageInfo` shows beyond name, format and size (cluster
    /// size, the recorded backing file, format-specific data); `None` for
    /// drivers that have none (`file`, `raw`, `null-co`).
    fn image_details(&self) -> Option<ImageDetails> {
        None
    }

    /// Stops writing for good, as the backing node of a new overlay: a
    /// format writes back what it cached, a `file` node gives up its write
    /// lock. `node` is this node's name, for errors.
    fn give_up_write(&self, _node: &str) -> Result<(), BlockError> {
        Ok(())
    }

    /// Lets go of the image for another process (a migration's handover):
    /// a format writes back what it cached and writes nothing more, a
    /// `file` node drops its image locks; until [`Driver::activate`].
    /// Nothing holds the node's lease meanwhile.
    fn inactivate(&self, _node: &str) -> Result<(), BlockError> {
        Ok(())
    }

    /// Takes the image back after [`Driver::inactivate`] (or an open
    /// without locks): a `file` node locks it as a `read_only` (or
    /// writing) open does, a format reads its metadata again, which the
    /// other process may have changed.
    fn activate(&self, _node: &str, _read_only: bool) -> Result<(), BlockError> {
        Ok(())
    }

    /// How a `file` node opened its host file, so that a backing file
    /// opened from an image's header opens the same way; `None` for
    /// anything but a `file` node.
    fn file_options(&self) -> Option<FileOptions> {
        None
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

    /// The allocation status of the bytes from `offset` (below the size)
    /// on: the status of the first run of bytes stored alike, and its
    /// length, at least 1 and at most `len`. The default says "data" for
    /// the whole range, which is never wrong, only less useful.
    fn block_status(&self, _offset: u64, len: u64) -> std::io::Result<(Allocation, u64)> {
        Ok((Allocation::DATA, len))
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
