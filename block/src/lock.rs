//! Image locks that QEMU and other `vmm` processes see: open-file-description
//! (OFD) locks on the bytes QEMU's `file-posix` driver uses.
//!
//! ```text
//!  byte 100 + i   shared lock: "I hold permission i"
//!  byte 200 + i   shared lock: "I do not let others hold permission i"
//!  i: 0 consistent read, 1 write, 2 write unchanged, 3 resize
//! ```
//!
//! Every lock taken is a shared (read) lock, so takers never block each
//! other; a conflict is found by asking the kernel (`F_OFD_GETLK`) whether a
//! write lock *could* be taken on a byte, which fails exactly when another
//! open file description holds a lock there. Locks held through our own
//! descriptor never count, so we lock first and check after: two openers
//! racing each other both see the other's locks.
//!
//! OFD locks belong to the open file description, so they go away when the
//! file is closed (the node's last reference and engine gone), and two
//! descriptors in one process conflict just as two processes do.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

/// QEMU's `locking` option of the `file` driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock where the kernel has OFD locks (every Linux since 3.15).
    #[default]
    Auto,
    /// Lock, and fail to open where OFD locks are missing.
    On,
    /// Take no image locks and check none: for users who must share.
    Off,
}

impl FromStr for Locking {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            _ => Err(format!("'{s}' is not one of on, off, auto")),
        }
    }
}

/// One of QEMU's block permissions, numbered as its lock bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// Reading sees data others cannot change under it.
    ConsistentRead = 0,
    /// Writing.
    Write = 1,
    /// Writing data that does not change what a reader sees.
    WriteUnchanged = 2,
    /// Changing the size.
    Resize = 3,
}

impl Perm {
    const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    /// QEMU's name for it, as its lock errors say it.
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Byte of the lock that says "I hold permission i".
const PERM_BASE: i64 = 100;
/// Byte of the lock that says "I do not share permission i".
const SHARED_BASE: i64 = 200;

/// The permissions a node holds and those it lets others hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    held: u8,
    shared: u8,
}

impl Perms {
    /// What a `file` node under a guest disk takes, as QEMU's virtio-blk
    /// over `raw` does: consistent read (and write, unless read-only);
    /// it shares everything but write. So nobody else writes the image
    /// while we use it, read-only or not, and while we write it, a reader
    /// that does not let others write (`qemu-img convert`, a read-only
    /// disk of another VM) is kept out.
    pub fn for_image(read_only: bool) -> Self {
        let mut held = Perm::ConsistentRead.bit();
        if !read_only {
            held |= Perm::Write.bit();
        }
        let shared = Perm::ConsistentRead.bit() | Perm::WriteUnchanged.bit() | Perm::Resize.bit();
        Self { held, shared }
    }

    /// Whether `perm` is held.
    pub fn holds(self, perm: Perm) -> bool {
        self.held & perm.bit() != 0
    }

    /// Whether others may hold `perm`.
    pub fn shares(self, perm: Perm) -> bool {
        self.shared & perm.bit() != 0
    }
}

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open of the image holds a permission we do not share, or
    /// does not share one we want. QEMU's words.
    #[error("Failed to get {}\"{}\" lock: Is another process using the image [{}]?", if *.shared { "shared " } else { "" }, .perm.name(), .path.display())]
    Conflict {
        path: PathBuf,
        perm: Perm,
        /// The lock we could not get is the shared one (we do not share
        /// `perm`, and someone holds it).
        shared: bool,
    },
    /// The kernel refused a lock or a probe.
    #[error("Failed to lock byte {byte} of image '{}': {source}", .path.display())]
    Kernel {
        path: PathBuf,
        byte: i64,
        #[source]
        source: std::io::Error,
    },
    /// `locking=on` where the kernel has no OFD locks.
    #[error("image '{}': locking=on, but this kernel has no OFD locks (F_OFD_SETLK)", .0.display())]
    Unsupported(PathBuf),
}

/// Whether the kernel knows OFD locks; asked once, of `/dev/null`, as
/// QEMU does.
fn ofd_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Ok(null) = std::fs::File::open("/dev/null") else {
            return false;
        };
        probe(std::os::fd::AsRawFd::as_raw_fd(&null), 0).is_ok()
    })
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value, and
    // l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes a shared lock on `byte`.
fn lock_byte(fd: RawFd, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: fcntl with F_OFD_SETLK reads the flock we pass and nothing else.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether someone else (another open file description) holds a lock on
/// `byte`: asks whether a write lock there would conflict.
fn probe(fd: RawFd, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: fcntl with F_OFD_GETLK writes only into the flock we pass.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Locks the image open on `fd` for `perms`, or says who is in the way.
/// Returns whether locks were taken (`locking=off`, or `auto` without OFD
/// locks, take none). On an error the caller closes `fd`, which drops
/// whatever was locked.
pub fn lock_image(
    fd: RawFd,
    path: &Path,
    perms: Perms,
    locking: Locking,
) -> Result<bool, LockError> {
    match locking {
        Locking::Off => return Ok(false),
        Locking::Auto if !ofd_supported() => return Ok(false),
        Locking::On if !ofd_supported() => return Err(LockError::Unsupported(path.into())),
        _ => {}
    }
    let kernel = |byte: i64| {
        move |source| LockError::Kernel {
            path: path.into(),
            byte,
            source,
        }
    };
    for perm in Perm::ALL {
        if perms.holds(perm) {
            let byte = PERM_BASE + perm as i64;
            lock_byte(fd, byte).map_err(kernel(byte))?;
        }
        if !perms.shares(perm) {
            let byte = SHARED_BASE + perm as i64;
            lock_byte(fd, byte).map_err(kernel(byte))?;
        }
    }
    for perm in Perm::ALL {
        // Someone who does not share a permission we hold...
        if perms.holds(perm) {
            let byte = SHARED_BASE + perm as i64;
            if probe(fd, byte).map_err(kernel(byte))? {
                return Err(LockError::Conflict {
                    path: path.into(),
                    perm,
                    shared: false,
                });
            }
        }
        // ...or who holds one we do not share.
        if !perms.shares(perm) {
            let byte = PERM_BASE + perm as i64;
            if probe(fd, byte).map_err(kernel(byte))? {
                return Err(LockError::Conflict {
                    path: path.into(),
                    perm,
                    shared: true,
                });
            }
        }
    }
    Ok(true)
}

/// Lets go of the write permission's byte on `fd`, leaving the image
/// locked as a read-only open locks it (`Perms::for_image(true)`): what a
/// writer shares and a reader shares are the same.
pub fn release_write(fd: RawFd) {
    let fl = flock(
        libc::F_UNLCK as libc::c_short,
        PERM_BASE + Perm::Write as i64,
    );
    // SAFETY: fcntl with F_OFD_SETLK reads the flock we pass and nothing else.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } < 0 {
        log::warn!(
            "cannot release an image's write lock: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Lets go of every lock `lock_image` may have taken on `fd`. Closing the
/// file would too, but not at once when io_uring has it registered: the
/// kernel tears a ring down later, and the file's last reference with it.
pub fn unlock_image(fd: RawFd) {
    let mut fl = flock(libc::F_UNLCK as libc::c_short, PERM_BASE);
    fl.l_len = SHARED_BASE + Perm::ALL.len() as i64 - PERM_BASE;
    // SAFETY: fcntl with F_OFD_SETLK reads the flock we pass and nothing else.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } < 0 {
        log::warn!(
            "cannot release image locks: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsRawFd;

    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("block-lock-{}-{name}", std::process::id()));
            File::create(&path).unwrap().set_len(1 << 16).unwrap();
            Self(path)
        }

        fn open(&self) -> File {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.0)
                .unwrap()
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn lock(file: &File, path: &Path, read_only: bool) -> Result<bool, LockError> {
        lock_image(
            file.as_raw_fd(),
            path,
            Perms::for_image(read_only),
            Locking::Auto,
        )
    }

    /// The locked byte ranges of `path` in /proc/locks, as "start-end".
    fn locked_bytes(path: &Path) -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(path).unwrap().ino();
        let mut out: Vec<String> = std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .filter(|l| l.contains("OFDLCK"))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let at = f.iter().position(|x| x.ends_with(&format!(":{ino}")))?;
                Some(format!("{}-{}", f[at + 1], f[at + 2]))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_writer_takes_qemus_bytes_and_drops_them_on_close() {
        let t = Temp::new("bytes");
        let f = t.open();
        assert!(lock(&f, &t.0, false).unwrap());
        // Held: consistent read (100), write (101); not shared: write (201).
        // /proc/locks shows adjacent locks of one owner as one range.
        assert_eq!(locked_bytes(&t.0), ["100-101", "201-201"]);
        unlock_image(f.as_raw_fd());
        assert!(locked_bytes(&t.0).is_empty());
        drop(f);
        let r = t.open();
        assert!(lock(&r, &t.0, true).unwrap());
        assert_eq!(locked_bytes(&t.0), ["100-100", "201-201"]);
    }

    #[test]
    fn writers_exclude_each_other_and_readers_while_readers_share() {
        let t = Temp::new("excl");
        let w = t.open();
        lock(&w, &t.0, false).unwrap();
        let second = t.open();
        let err = lock(&second, &t.0, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "Failed to get \"write\" lock: Is another process using the image [{}]?",
                t.0.display()
            )
        );
        drop(second);
        let reader = t.open();
        let err = lock(&reader, &t.0, true).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Failed to get shared \"write\" lock"),
            "{err}"
        );
        drop(reader);
        drop(w);
        // Two readers share; a writer is kept out by either.
        let r1 = t.open();
        lock(&r1, &t.0, true).unwrap();
        let r2 = t.open();
        lock(&r2, &t.0, true).unwrap();
        let w = t.open();
        assert!(matches!(
            lock(&w, &t.0, false),
            Err(LockError::Conflict {
                perm: Perm::Write,
                shared: false,
                ..
            })
        ));
        // locking=off neither takes nor checks.
        assert!(!lock_image(w.as_raw_fd(), &t.0, Perms::for_image(false), Locking::Off).unwrap());
    }

    #[test]
    fn locking_values_parse_as_qemus() {
        assert_eq!("on".parse::<Locking>(), Ok(Locking::On));
        assert_eq!("off".parse::<Locking>(), Ok(Locking::Off));
        assert_eq!("auto".parse::<Locking>(), Ok(Locking::Auto));
        assert!("yes".parse::<Locking>().is_err());
    }
}
