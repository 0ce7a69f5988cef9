//! The `file` driver: a host file, I/O through io_uring.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::Driver;
use crate::error::BlockError;
use crate::file::{DiskFile, DiskOptions};
use crate::io::{AsyncIo, Completion, IoError, UringIo};

/// A host file.
pub struct File {
    path: String,
    disk: Arc<DiskFile>,
}

impl File {
    /// Opens `path` for node `node`.
    pub fn open(
        node: &str,
        path: &Path,
        read_only: bool,
        direct: bool,
    ) -> Result<Self, BlockError> {
        let disk = DiskFile::open(path, DiskOptions { read_only, direct }).map_err(|source| {
            BlockError::Open {
                node: node.into(),
                source,
            }
        })?;
        Ok(Self {
            path: path.display().to_string(),
            disk: Arc::new(disk),
        })
    }
}

impl Driver for File {
    fn name(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn filename(&self) -> String {
        self.path.clone()
    }

    fn open_io(&self, node: &str, depth: u32) -> Result<Box<dyn AsyncIo>, BlockError> {
        let ring = UringIo::new(self.disk.as_raw_fd(), depth).map_err(|source| BlockError::Io {
            node: node.into(),
            source,
        })?;
        Ok(Box::new(FileIo {
            ring,
            _disk: self.disk.clone(),
        }))
    }
}

/// A ring that keeps its file open: the ring has the fd registered, so the
/// file must outlive it (fields drop in order: ring first).
struct FileIo {
    ring: UringIo,
    _disk: Arc<DiskFile>,
}

impl AsyncIo for FileIo {
    fn notifier(&self) -> &EventFd {
        self.ring.notifier()
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { self.ring.read_vectored(offset, iovecs, user_data) }
    }

    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { self.ring.write_vectored(offset, iovecs, user_data) }
    }

    fn flush(&mut self, user_data: u64) -> Result<(), IoError> {
        self.ring.flush(user_data)
    }

    fn punch_hole(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        self.ring.punch_hole(offset, len, user_data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        self.ring.write_zeroes(offset, len, user_data)
    }

    fn submit(&mut self) -> Result<(), IoError> {
        self.ring.submit()
    }

    fn next_completion(&mut self) -> Option<Completion> {
        self.ring.next_completion()
    }
}
