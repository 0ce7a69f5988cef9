//! A host file used as a disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::lock::{self, LockError, Locking, Perms};

/// How to open a disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// Open read-only; the device refuses writes.
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// Image locks other processes see (QEMU's `locking`).
    pub locking: Locking,
}

/// Which host file an open disk is, whatever path or link led to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file `path` names now (links followed).
    pub fn of_path(path: &Path) -> io::Result<Self> {
        Ok(Self::of(&std::fs::metadata(path)?))
    }

    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file could not be opened.
    #[error("cannot open disk '{path}': {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a regular file or block device.
    #[error("disk '{0}' is neither a regular file nor a block device")]
    NotAFile(PathBuf),
    /// Its size could not be read.
    #[error("cannot read the size of disk '{path}': {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Its size is not a whole number of 512-byte sectors (a raw disk
    /// must be; a qcow2 image file need not).
    #[error("disk '{path}' is {size} bytes, not a whole number of 512-byte sectors")]
    PartialSector { path: PathBuf, size: u64 },
    /// Another open of the image is in the way, or it could not be locked.
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// An open disk file.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    size: u64,
    id: FileId,
    options: DiskOptions,
    /// Whether it holds image locks now: dropped while its graph's images
    /// are inactive (migration's handover), taken again on activation.
    locked: AtomicBool,
}

impl DiskFile {
    /// Opens `path` as a disk.
    pub fn open(path: &Path, options: DiskOptions) -> Result<Self, DiskError> {
        Self::open_with(path, options, true)
    }

    /// Opens `path` as a disk without taking image locks: for a migration
    /// destination, whose source still writes the image; [`Self::relock`]
    /// takes them once the source has let go.
    pub fn open_unlocked(path: &Path, options: DiskOptions) -> Result<Self, DiskError> {
        Self::open_with(path, options, false)
    }

    fn open_with(path: &Path, options: DiskOptions, take_locks: bool) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Look before opening: opening a FIFO read-only would block until
        // a writer came, and a QMP client must not be able to hang us.
        let kind = std::fs::metadata(path).map_err(open_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = if meta.file_type().is_block_device() {
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|source| DiskError::Size {
                    path: path.to_path_buf(),
                    source,
                })?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        };
        // Our own descriptor's locks stay with it: closing the file (the
        // last engine and node gone) releases them.
        let locked = take_locks
            && lock::lock_image(
                file.as_raw_fd(),
                path,
                Perms::for_image(options.read_only),
                options.locking,
            )?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            id: FileId::of(&meta),
            options,
            locked: AtomicBool::new(locked),
        })
    }

    /// Which host file this is.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How it was opened.
    pub fn options(&self) -> DiskOptions {
        self.options
    }

    /// The alignment, in bytes, of file offsets and lengths the host
    /// accepts for I/O on this file: with `O_DIRECT`, a block device's
    /// logical block size (`BLKSSZGET`) or a file's `STATX_DIOALIGN`
    /// offset alignment; 512 when buffered or when the host does not say.
    pub fn io_alignment(&self) -> u32 {
        if !self.options.direct {
            return 512;
        }
        let fd = self.file.as_raw_fd();
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int; it fails harmlessly with
        // ENOTTY on anything but a block device.
        let align = if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut ssz) } == 0 {
            u32::try_from(ssz).unwrap_or(0)
        } else {
            // SAFETY: an all-zero statx is a valid value to be overwritten.
            let mut stx: libc::statx = unsafe { std::mem::zeroed() };
            // SAFETY: a valid fd, an empty path with AT_EMPTY_PATH, and a
            // statx buffer the call fills.
            let ok = unsafe {
                libc::statx(
                    fd,
                    c"".as_ptr(),
                    libc::AT_EMPTY_PATH,
                    libc::STATX_DIOALIGN,
                    &mut stx,
                )
            } == 0;
            if ok && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
                stx.stx_dio_offset_align
            } else {
                0
            }
        };
        if align.is_power_of_two() {
            align.max(512)
        } else {
            512
        }
    }
}

impl DiskFile {
    /// Gives up the write permission's image lock: this process will not
    /// write the image through this open again (an overlay above took
    /// over), so another may read it. The descriptor stays open as it was.
    pub fn release_write(&self) {
        if self.locked.load(Ordering::Acquire) {
            lock::release_write(self.file.as_raw_fd());
        }
    }

    /// Lets go of every image lock, keeping the file open: another
    /// process (a migration's other side) may take the image over.
    pub fn unlock(&self) {
        if self.locked.swap(false, Ordering::AcqRel) {
            lock::unlock_image(self.file.as_raw_fd());
        }
    }

    /// Takes the image locks again, as a `read_only` (or writing) open
    /// takes them, with the `locking` it was opened with; on a conflict
    /// it holds none and says who is in the way.
    pub fn relock(&self, read_only: bool) -> Result<(), LockError> {
        if self.locked.load(Ordering::Acquire) {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        match lock::lock_image(
            fd,
            &self.path,
            Perms::for_image(read_only),
            self.options.locking,
        ) {
            Ok(locked) => {
                self.locked.store(locked, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Some bytes may be locked before the conflict was found;
                // the descriptor stays open, so drop them here.
                lock::unlock_image(fd);
                Err(e)
            }
        }
    }
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        // At once: the close that follows may release them only later.
        if *self.locked.get_mut() {
            lock::unlock_image(self.file.as_raw_fd());
        }
    }
}

impl AsRawFd for DiskFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, len: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("block-file-{}-{name}", std::process::id()));
        File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    #[test]
    fn size_and_options_are_kept() {
        let path = temp("ok", 1 << 20);
        let disk = DiskFile::open(
            &path,
            DiskOptions {
                read_only: true,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        assert_eq!(disk.size(), 1 << 20);
        assert!(disk.options().read_only);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_disks_are_refused_with_their_path() {
        let err =
            DiskFile::open(Path::new("/nonexistent/disk.img"), DiskOptions::default()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot open disk '/nonexistent/disk.img'"),
            "{err}"
        );
        let err = DiskFile::open(Path::new("/dev/null"), DiskOptions::default()).unwrap_err();
        assert!(matches!(err, DiskError::NotAFile(_)), "{err}");
        // A FIFO with no writer is refused, not waited on.
        let fifo = std::env::temp_dir().join(format!("block-file-{}-fifo", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let read_only = DiskOptions {
            read_only: true,
            ..DiskOptions::default()
        };
        let err = DiskFile::open(&fifo, read_only).unwrap_err();
        std::fs::remove_file(&fifo).unwrap();
        assert!(matches!(err, DiskError::NotAFile(_)), "{err}");
        // Any size is a file's business: qcow2 images end anywhere. The
        // raw format above one checks for whole sectors.
        let path = temp("odd", 1000);
        assert_eq!(
            DiskFile::open(&path, DiskOptions::default())
                .unwrap()
                .size(),
            1000
        );
        std::fs::remove_file(path).unwrap();
    }
}
