//! The `null-co` driver: reads zeros, drops writes. For benchmarks: it
//! measures everything but the disk.

use super::{Allocation, Driver};
use crate::error::BlockError;
use crate::io::{AsyncIo, IoError, NullIo};
use vmm_sys_util::eventfd::EventFd;

/// QEMU's default size for a null node: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// A disk of zeros.
pub struct Null {
    size: u64,
}

impl Null {
    /// A null node of `size` bytes (a whole number of 512-byte sectors).
    pub fn new(node: &str, size: u64) -> Result<Self, BlockError> {
        if !size.is_multiple_of(512) {
            return Err(BlockError::Options {
                node: node.into(),
                reason: format!("size {size} is not a whole number of 512-byte sectors"),
            });
        }
        Ok(Self { size })
    }
}

impl<C> Driver<C> for Null {
    fn name(&self) -> &'static str {
        "null-co"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> String {
        "null-co://".into()
    }

    /// Zeros and no data throughout, as QEMU's `null-co` says.
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<(Allocation, u64)> {
        Ok((
            Allocation::HOLE,
            len.min(self.size.saturating_sub(offset)).max(1),
        ))
    }

    fn open_io(
        &self,
        node: &str,
        _depth: u32,
        notifier: &EventFd,
    ) -> Result<Box<dyn AsyncIo>, BlockError> {
        let io_err = |source| BlockError::Io {
            node: node.into(),
            source,
        };
        let notifier = notifier.try_clone().map_err(|source| {
            io_err(IoError::Setup {
                engine: "null",
                source,
            })
        })?;
        let io = NullIo::with_notifier(notifier).map_err(io_err)?;
        Ok(Box::new(io))
    }
}
