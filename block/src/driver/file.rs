//! The `file` driver: a host file, I/O through io_uring (or plain system
//! calls where io_uring is missing or refused).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::Driver;
use crate::error::BlockError;
use crate::file::{DiskFile, DiskOptions, FileId};
use crate::io::{Aio, AsyncIo, IoError, SyncIo, UringIo};
use crate::lock::Locking;
use vmm_sys_util::eventfd::EventFd;

/// How a `file` node opens its host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// The host file.
    pub filename: PathBuf,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// Image locks other processes see.
    pub locking: Locking,
    /// Which I/O engine serves it.
    pub aio: Aio,
}

impl FileOptions {
    /// `filename` with the defaults: cached, locked, the best engine.
    pub fn new(filename: PathBuf) -> Self {
        Self {
            filename,
            direct: false,
            locking: Locking::Auto,
            aio: Aio::Auto,
        }
    }
}

/// A host file.
pub struct File {
    path: String,
    disk: Arc<DiskFile>,
    aio: Aio,
    /// Whether the io_uring fallback was already logged for this node.
    fell_back: AtomicBool,
}

impl File {
    /// Opens the file `options` name for node `node`.
    pub fn open(node: &str, options: &FileOptions, read_only: bool) -> Result<Self, BlockError> {
        let disk_options = DiskOptions {
            read_only,
            direct: options.direct,
            locking: options.locking,
        };
        let disk =
            DiskFile::open(&options.filename, disk_options).map_err(|source| BlockError::Open {
                node: node.into(),
                source,
            })?;
        Ok(Self {
            path: options.filename.display().to_string(),
            disk: Arc::new(disk),
            aio: options.aio,
            fell_back: AtomicBool::new(false),
        })
    }
}

impl File {
    /// Which host file it has open.
    pub fn id(&self) -> FileId {
        self.disk.id()
    }
}

impl<C> Driver<C> for File {
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

    fn disk_file(&self) -> Option<Arc<DiskFile>> {
        Some(self.disk.clone())
    }

    fn give_up_write(&self, _node: &str) -> Result<(), BlockError> {
        self.disk.release_write();
        Ok(())
    }

    fn file_options(&self) -> Option<FileOptions> {
        let options = self.disk.options();
        Some(FileOptions {
            filename: PathBuf::from(&self.path),
            direct: options.direct,
            locking: options.locking,
            aio: self.aio,
        })
    }

    fn open_io(
        &self,
        node: &str,
        depth: u32,
        notifier: &EventFd,
    ) -> Result<Box<dyn AsyncIo>, BlockError> {
        let io_err = |source| BlockError::Io {
            node: node.into(),
            source,
        };
        let dup = |engine| {
            notifier
                .try_clone()
                .map_err(|source| io_err(IoError::Setup { engine, source }))
        };
        let sync = || -> Result<Box<dyn AsyncIo>, BlockError> {
            Ok(Box::new(
                SyncIo::with_owner(self.disk.clone(), dup("sync")?).map_err(io_err)?,
            ))
        };
        match self.aio {
            Aio::Sync => sync(),
            Aio::IoUring => Ok(Box::new(
                UringIo::with_owner(self.disk.clone(), depth, dup("io_uring")?).map_err(io_err)?,
            )),
            Aio::Auto => match UringIo::with_owner(self.disk.clone(), depth, dup("io_uring")?) {
                Ok(ring) => Ok(Box::new(ring)),
                Err(e) if e.is_unavailable() => {
                    if !self.fell_back.swap(true, Ordering::Relaxed) {
                        log::warn!("node '{node}': {e}; serving it with plain system calls");
                    }
                    sync()
                }
                Err(e) => Err(io_err(e)),
            },
        }
    }
}
