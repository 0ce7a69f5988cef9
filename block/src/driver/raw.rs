//! The `raw` format: the guest sees its `file` child byte for byte.

use super::{Allocation, Child, Driver};
use crate::error::BlockError;
use crate::io::AsyncIo;
use vmm_sys_util::eventfd::EventFd;

/// A raw format node over one child.
pub struct Raw<C> {
    file: C,
}

impl<C> Raw<C> {
    /// A raw node over `file` (a reference the node now owns).
    pub fn new(file: C) -> Self {
        Self { file }
    }
}

impl<C: Child> Driver<C> for Raw<C> {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.file.driver().size()
    }

    fn filename(&self) -> String {
        self.file.driver().filename()
    }

    fn children(&self) -> Vec<(&'static str, &C)> {
        vec![("file", &self.file)]
    }

    fn io_alignment(&self) -> u32 {
        self.file.driver().io_alignment()
    }

    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<(Allocation, u64)> {
        self.file.driver().block_status(offset, len)
    }

    fn open_io(
        &self,
        _node: &str,
        depth: u32,
        notifier: &EventFd,
    ) -> Result<Box<dyn AsyncIo>, BlockError> {
        // Raw adds nothing to the path: the child's engine serves it.
        self.file
            .driver()
            .open_io(self.file.name(), depth, notifier)
    }
}
