//! The `file` driver: a host file, I/O through io_uring.

use std::path::Path;
use std::sync::Arc;

use super::Driver;
use crate::error::BlockError;
use crate::file::{DiskFile, DiskOptions};
use crate::io::{AsyncIo, UringIo};

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

    fn io_alignment(&self) -> u32 {
        self.disk.io_alignment()
    }

    fn open_io(&self, node: &str, depth: u32) -> Result<Box<dyn AsyncIo>, BlockError> {
        let ring =
            UringIo::with_owner(self.disk.clone(), depth).map_err(|source| BlockError::Io {
                node: node.into(),
                source,
            })?;
        Ok(Box::new(ring))
    }
}
