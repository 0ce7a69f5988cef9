//! The `file` driver: a host file, I/O through io_uring.

use std::path::Path;
use std::sync::Arc;

use super::Driver;
use crate::error::BlockError;
use crate::file::{DiskFile, DiskOptions, FileId};
use crate::io::{AsyncIo, UringIo};
use crate::lock::Locking;

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
        locking: Locking,
    ) -> Result<Self, BlockError> {
        let options = DiskOptions {
            read_only,
            direct,
            locking,
        };
        let disk = DiskFile::open(path, options).map_err(|source| BlockError::Open {
            node: node.into(),
            source,
        })?;
        Ok(Self {
            path: path.display().to_string(),
            disk: Arc::new(disk),
        })
    }
}

impl File {
    /// Which host file it has open.
    pub fn id(&self) -> FileId {
        self.disk.id()
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
        let ring =
            UringIo::with_owner(self.disk.clone(), depth).map_err(|source| BlockError::Io {
                node: node.into(),
                source,
            })?;
        Ok(Box::new(ring))
    }
}
