//! Block migration: a disk's contents copied into another process's disk
//! of the same size, in the migration stream (QEMU's `block` capability).
//!
//! ```text
//!  source (BlockMigration)                    destination (BlockSink)
//!  take_access(Migration, hosted)             take_lease(Migration)
//!  internal dirty bitmap on, then:            sizes checked against the source's
//!  bulk pass: each disk front to back  ──►    write(chunk, data)
//!            1 MiB chunks, zeros as `zero`    zero chunks punch holes
//!  dirty passes: what writes marked since ──► write(chunk, data)
//!                                             finish: flush, release
//! ```
//!
//! The source contends for each disk's lease like any job: a free node
//! gives it the lease (the guest is stopped, or the disk not served); a
//! holder that hosts (a dataplane with `live-jobs=on`) carries out its
//! reads between the guest's, and marks the bitmap as each guest write
//! completes; any other holder refuses at once, naming itself. Reads are
//! blocking: the caller is the migration thread. Dropping either side
//! (cancel, failure) gives everything back and leaves the source disks as
//! they were.

mod sink;
mod source;

#[cfg(test)]
pub(crate) mod tests;

use std::time::{Duration, Instant};

pub use sink::BlockSink;
pub use source::BlockMigration;

use crate::io::{AsyncIo, IoError};

/// The most bytes one chunk carries (the bulk pass's chunk size).
pub const CHUNK: u32 = 1 << 20;

/// How long one read or write may take before the migration gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// O_DIRECT's strictest alignment we meet (a 4 KiB-sector disk).
const ALIGN: usize = 4096;

/// One piece of one disk, as the stream carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Which disk: an index into the list the source migrates
    /// ([`BlockMigration::disks`]), the same on the destination.
    pub disk: usize,
    /// Where on the disk.
    pub offset: u64,
    /// How many bytes.
    pub len: u32,
    /// The range reads as zeros: no data follows.
    pub zero: bool,
}

/// Why block migration refused a disk, a chunk or failed an I/O.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A chunk names a disk that is not migrated.
    #[error("Block migration: the stream names disk {disk}, but only {disks} disks are migrated")]
    UnknownDisk { disk: usize, disks: usize },
    /// The destination's disk has another size than the source's.
    #[error("Block migration: disk '{device}' (node '{node}') is {size} bytes here, but {source_size} bytes on the source")]
    SizeMismatch {
        device: String,
        node: String,
        size: u64,
        source_size: u64,
    },
    /// A destination disk that cannot be written.
    #[error("Block migration: disk '{device}' (node '{node}') is read-only and cannot receive the source's contents")]
    ReadOnly { device: String, node: String },
    /// A chunk reaching past the end of its disk.
    #[error("Block migration: a chunk of {len} bytes at offset {offset} lies outside disk '{device}' ({size} bytes)")]
    OutOfRange {
        device: String,
        offset: u64,
        len: u32,
        size: u64,
    },
    /// A chunk longer than a chunk may be.
    #[error("Block migration: a chunk of {len} bytes for disk '{device}' is longer than the {max} bytes a chunk may carry", max = CHUNK)]
    TooLong { device: String, len: u32 },
    /// A chunk whose data is not as long as it says.
    #[error("Block migration: a chunk for disk '{device}' says {len} bytes but carries {got}")]
    DataLength {
        device: String,
        len: u32,
        got: usize,
    },
    /// A read or write failed.
    #[error("Block migration: {what} {len} bytes at offset {offset} of disk '{device}' (node '{node}') failed: {source}")]
    Io {
        what: &'static str,
        device: String,
        node: String,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    /// The engine refused the operation.
    #[error("Block migration: {what} disk '{device}' (node '{node}'): {source}")]
    Engine {
        what: &'static str,
        device: String,
        node: String,
        #[source]
        source: IoError,
    },
    /// An operation did not complete in time.
    #[error("Block migration: {what} disk '{device}' (node '{node}') did not complete within {} ms", .waited.as_millis())]
    Stalled {
        what: &'static str,
        device: String,
        node: String,
        waited: Duration,
    },
}

/// A buffer aligned for O_DIRECT, without unsafe: a larger Vec, used from
/// its first aligned byte.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let bytes = vec![0u8; len + ALIGN];
        let start = bytes.as_ptr().align_offset(ALIGN);
        Self { bytes, start, len }
    }

    fn slice(&self, len: usize) -> &[u8] {
        &self.bytes[self.start..self.start + len.min(self.len)]
    }

    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.len);
        &mut self.bytes[self.start..self.start + len]
    }

    /// Leaves the memory allocated for good: an operation that never
    /// completed may still land in it.
    fn leak(&mut self) {
        std::mem::forget(std::mem::take(&mut self.bytes));
    }
}

/// The one iovec a disk hands its engine; boxed, so it stays put while
/// the disk moves.
struct Iovec(Box<[libc::iovec; 1]>);

// SAFETY: it points into the buffer of the disk that owns it, which moves
// with it; no other thread holds the pointer but the engine carrying out
// the operation, which does not care which thread owns the disk.
unsafe impl Send for Iovec {}

impl Iovec {
    fn new() -> Self {
        Self(Box::new([libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }]))
    }

    /// Leaves the array allocated for good, as [`AlignedBuf::leak`].
    fn leak(&mut self) {
        std::mem::forget(std::mem::replace(self, Self::new()));
    }

    /// Points it at `buf`.
    fn set(&mut self, buf: &mut [u8]) -> &[libc::iovec] {
        self.0[0] = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        &self.0[..]
    }
}

/// Waits for the completion tagged `user_data`: its result, or `None`
/// after `timeout`.
fn wait(io: &mut dyn AsyncIo, user_data: u64, timeout: Duration) -> Result<Option<i32>, IoError> {
    let deadline = Instant::now() + timeout;
    loop {
        while let Some(c) = io.next_completion() {
            if c.user_data == user_data {
                return Ok(Some(c.result));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        io.submit_and_wait(1, (deadline - now).min(Duration::from_millis(100)))?;
        // A wake-up may be early or stale; the loop looks again.
        let _ = io.notifier().read();
    }
}
