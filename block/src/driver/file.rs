//! The `file` driver: a host file, I/O through io_uring (or plain system
//! calls where io_uring is missing or refused).

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{Allocation, Driver};
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
        Self::open_with(node, options, read_only, true)
    }

    /// Opens it as [`File::open`] does but takes no image locks, for a
    /// graph whose images are inactive (a migration destination).
    pub fn open_unlocked(
        node: &str,
        options: &FileOptions,
        read_only: bool,
    ) -> Result<Self, BlockError> {
        Self::open_with(node, options, read_only, false)
    }

    fn open_with(
        node: &str,
        options: &FileOptions,
        read_only: bool,
        take_locks: bool,
    ) -> Result<Self, BlockError> {
        let disk_options = DiskOptions {
            read_only,
            direct: options.direct,
            locking: options.locking,
        };
        let open = if take_locks {
            DiskFile::open
        } else {
            DiskFile::open_unlocked
        };
        let disk = open(&options.filename, disk_options).map_err(|source| BlockError::Open {
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

    fn inactivate(&self, _node: &str) -> Result<(), BlockError> {
        self.disk.unlock();
        Ok(())
    }

    fn activate(&self, node: &str, read_only: bool) -> Result<(), BlockError> {
        self.disk.relock(read_only).map_err(|e| BlockError::Open {
            node: node.into(),
            source: e.into(),
        })
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

    /// Holes and data as the host file system tells them
    /// (`SEEK_DATA`/`SEEK_HOLE`); a file system that cannot tell says
    /// "data" for the whole file, which is what the kernel then answers.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(Allocation, u64)> {
        let end = offset.saturating_add(len).min(self.disk.size());
        if offset >= end {
            return Ok((Allocation::DATA, len.max(1)));
        }
        let fd = self.disk.as_raw_fd();
        let seek = |whence| -> io::Result<Option<u64>> {
            let at = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: lseek on a descriptor the DiskFile keeps open; it
            // moves the file position, which no I/O of ours uses (every
            // read and write names its offset).
            let r = unsafe { libc::lseek(fd, at, whence) };
            if r >= 0 {
                return Ok(Some(r as u64));
            }
            let e = io::Error::last_os_error();
            // ENXIO: no data from `offset` to the end of the file.
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        };
        let data = seek(libc::SEEK_DATA)?;
        match data {
            Some(d) if d <= offset => {
                let hole = seek(libc::SEEK_HOLE)?.unwrap_or(end).min(end);
                Ok((Allocation::DATA, hole.saturating_sub(offset).max(1)))
            }
            Some(d) => Ok((Allocation::HOLE, d.min(end) - offset)),
            None => Ok((Allocation::HOLE, end - offset)),
        }
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
