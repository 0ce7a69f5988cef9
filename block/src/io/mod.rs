//! I/O engines: submit operations tagged with a `user_data`, wait on one
//! eventfd, drain completions. The dataplane does not care which engine
//! it has.

mod null;
mod sync;
mod uring;

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

pub use null::NullIo;
pub use sync::SyncIo;
pub use uring::UringIo;

/// A finished operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag given at submission.
    pub user_data: u64,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
}

/// Errors of an engine.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The engine could not be set up.
    #[error("cannot set up the {engine} I/O engine: {source}")]
    Setup {
        engine: &'static str,
        #[source]
        source: io::Error,
    },
    /// No room for another operation until completions are drained.
    #[error("the I/O engine's submission queue is full")]
    Full,
    /// Submitting to the kernel failed.
    #[error("submitting I/O failed: {0}")]
    Submit(#[source] io::Error),
}

impl IoError {
    /// Whether the engine is missing or refused on this host (an old
    /// kernel, `kernel.io_uring_disabled`, a container's seccomp filter),
    /// as opposed to failing for this file.
    pub fn is_unavailable(&self) -> bool {
        let IoError::Setup { source, .. } = self else {
            return false;
        };
        matches!(
            source.raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EOPNOTSUPP)
        )
    }
}

/// Which engine a `file` node uses (the `aio` option).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Aio {
    /// io_uring, or plain system calls where io_uring is missing or
    /// refused (logged once per node).
    #[default]
    Auto,
    /// io_uring only: opening the engine fails where it is missing.
    IoUring,
    /// Plain system calls on the dataplane's own thread.
    Sync,
}

impl std::str::FromStr for Aio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Aio::Auto),
            "io_uring" => Ok(Aio::IoUring),
            "sync" => Ok(Aio::Sync),
            _ => Err(format!("'{s}' is not one of auto, io_uring, sync")),
        }
    }
}

/// An I/O engine over one open file.
pub trait AsyncIo: Send {
    /// Signalled when completions are ready to drain.
    fn notifier(&self) -> &EventFd;

    /// Queues a vectored read at `offset`.
    ///
    /// # Safety
    /// Every iovec, and the iovec array itself, must stay valid and
    /// otherwise unused until the operation's completion is drained.
    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError>;

    /// Queues a vectored write at `offset`.
    ///
    /// # Safety
    /// As for [`AsyncIo::read_vectored`].
    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError>;

    /// Queues an `fdatasync`: writes completed before it are made durable.
    fn flush(&mut self, user_data: u64) -> Result<(), IoError>;

    /// Queues deallocating a range (reads back as zeros).
    fn punch_hole(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError>;

    /// Queues zeroing a range, keeping it allocated.
    fn write_zeroes(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError>;

    /// Hands queued operations to the kernel.
    fn submit(&mut self) -> Result<(), IoError>;

    /// The next finished operation, if any; never blocks.
    fn next_completion(&mut self) -> Option<Completion>;

    /// Hands queued operations to the kernel, then sleeps until at least
    /// `min_complete` completions are ready or `timeout` has passed. This
    /// default waits on [`AsyncIo::notifier`], which an engine signals
    /// when completions are ready (a wake-up may come early; the caller
    /// drains what is there).
    fn submit_and_wait(&mut self, min_complete: u32, timeout: Duration) -> Result<(), IoError> {
        self.submit()?;
        if min_complete == 0 {
            return Ok(());
        }
        wait_readable(self.notifier(), timeout)
    }
}

/// A non-blocking eventfd for an engine to signal completions on.
pub fn new_notifier(engine: &'static str) -> Result<EventFd, IoError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| IoError::Setup { engine, source })
}

/// Sleeps until `notifier` is signalled or `timeout` has passed.
pub(crate) fn wait_readable(notifier: &EventFd, timeout: Duration) -> Result<(), IoError> {
    let mut pfd = libc::pollfd {
        fd: notifier.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(IoError::Submit(e));
        }
    }
    Ok(())
}

/// `fallocate` modes for the two range operations.
pub(crate) const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub(crate) const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

#[cfg(test)]
mod tests {
    //! Each engine runs the same checks.
    use super::*;

    #[test]
    fn only_a_missing_or_refused_engine_counts_as_unavailable() {
        let setup = |errno| IoError::Setup {
            engine: "io_uring",
            source: io::Error::from_raw_os_error(errno),
        };
        for errno in [libc::ENOSYS, libc::EPERM, libc::EACCES, libc::EOPNOTSUPP] {
            assert!(setup(errno).is_unavailable(), "errno {errno}");
        }
        // Out of memory or a bad file is this open's problem, not the host's.
        assert!(!setup(libc::ENOMEM).is_unavailable());
        assert!(!setup(libc::EBADF).is_unavailable());
        assert!(!IoError::Full.is_unavailable());
        assert_eq!("sync".parse::<Aio>(), Ok(Aio::Sync));
        assert_eq!("io_uring".parse::<Aio>(), Ok(Aio::IoUring));
        assert!("threads".parse::<Aio>().is_err());
    }
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;

    fn temp(name: &str) -> (PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!("block-io-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(64 << 10).unwrap();
        (path, file)
    }

    fn wait(engine: &mut dyn AsyncIo, n: usize) -> Vec<Completion> {
        let mut done = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "completions did not arrive"
            );
            match engine.next_completion() {
                Some(c) => done.push(c),
                None => {
                    let _ = engine.notifier().read();
                }
            }
        }
        done.sort_by_key(|c| c.user_data);
        done
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    fn exercise(engine: &mut dyn AsyncIo) {
        let mut a = vec![0xaau8; 4096];
        let mut b = vec![0xbbu8; 4096];
        let write = [iov(&mut a), iov(&mut b)];
        // SAFETY: the buffers and the iovec array outlive the wait below.
        unsafe { engine.write_vectored(8192, &write, 1).unwrap() };
        engine.submit().unwrap();
        assert_eq!(
            wait(engine, 1),
            vec![Completion {
                user_data: 1,
                result: 8192
            }]
        );

        engine.flush(2).unwrap();
        engine.punch_hole(8192, 4096, 3).unwrap();
        engine.write_zeroes(12288 + 512, 512, 4).unwrap();
        engine.submit().unwrap();
        let done = wait(engine, 3);
        assert!(done.iter().all(|c| c.result == 0), "{done:?}");

        let mut back = vec![0u8; 8192];
        let read = [iov(&mut back)];
        // SAFETY: as above.
        unsafe { engine.read_vectored(8192, &read, 5).unwrap() };
        engine.submit().unwrap();
        assert_eq!(wait(engine, 1)[0].result, 8192);
        assert!(
            back[..4096].iter().all(|&x| x == 0),
            "punched range reads as zeros"
        );
        assert!(back[4096..4608].iter().all(|&x| x == 0xbb));
        assert!(back[4608..5120].iter().all(|&x| x == 0), "zeroed range");
        assert!(back[5120..].iter().all(|&x| x == 0xbb));
    }

    #[test]
    fn uring_engine_reads_writes_flushes_and_punches() {
        let (path, file) = temp("uring");
        let mut engine = UringIo::new(file.as_raw_fd(), 16).unwrap();
        exercise(&mut engine);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn sync_engine_does_the_same() {
        let (path, file) = temp("sync");
        let mut engine = SyncIo::new(file.as_raw_fd()).unwrap();
        exercise(&mut engine);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn null_engine_reads_zeros_and_accepts_everything() {
        let mut engine = NullIo::new().unwrap();
        let mut buf = vec![0xffu8; 4096];
        let read = [iov(&mut buf)];
        // SAFETY: the buffer outlives the wait.
        unsafe { engine.read_vectored(0, &read, 1).unwrap() };
        let mut data = vec![7u8; 512];
        let write = [iov(&mut data)];
        // SAFETY: as above.
        unsafe { engine.write_vectored(1 << 40, &write, 2).unwrap() };
        engine.flush(3).unwrap();
        engine.submit().unwrap();
        let done = wait(&mut engine, 3);
        assert_eq!(
            done.iter().map(|c| c.result).collect::<Vec<_>>(),
            vec![4096, 512, 0]
        );
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(data, vec![7u8; 512], "a write leaves its buffer alone");
    }

    /// A wait returns once the completion is there, and after the timeout
    /// when nothing is coming.
    fn waits_for_completions(engine: &mut dyn AsyncIo) {
        let mut buf = vec![0u8; 4096];
        let read = [iov(&mut buf)];
        // SAFETY: the buffer outlives the wait.
        unsafe { engine.read_vectored(0, &read, 7).unwrap() };
        engine
            .submit_and_wait(1, std::time::Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            engine.next_completion(),
            Some(Completion {
                user_data: 7,
                result: 4096
            }),
            "the completion is ready when the wait returns"
        );
        let started = std::time::Instant::now();
        engine
            .submit_and_wait(1, std::time::Duration::from_millis(30))
            .unwrap();
        assert!(engine.next_completion().is_none());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the wait ends at its timeout"
        );
    }

    #[test]
    fn uring_engine_waits_inside_the_kernel() {
        let (path, file) = temp("uring-wait");
        let mut engine = UringIo::new(file.as_raw_fd(), 4).unwrap();
        waits_for_completions(&mut engine);
        let started = std::time::Instant::now();
        engine
            .submit_and_wait(1, std::time::Duration::from_millis(30))
            .unwrap();
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(25),
            "an empty ring sleeps for the timeout"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn sync_engine_wait_returns_at_once() {
        let (path, file) = temp("sync-wait");
        let mut engine = SyncIo::new(file.as_raw_fd()).unwrap();
        waits_for_completions(&mut engine);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn errors_come_back_as_negative_errno() {
        let (path, file) = temp("ro");
        drop(file);
        let ro = std::fs::File::open(&path).unwrap();
        let mut engine = UringIo::new(ro.as_raw_fd(), 4).unwrap();
        let mut buf = vec![0u8; 512];
        let write = [iov(&mut buf)];
        // SAFETY: the buffer outlives the wait.
        unsafe { engine.write_vectored(0, &write, 9).unwrap() };
        engine.submit().unwrap();
        assert_eq!(
            wait(&mut engine, 1)[0],
            Completion {
                user_data: 9,
                result: -libc::EBADF
            }
        );
        std::fs::remove_file(path).unwrap();
    }
}
