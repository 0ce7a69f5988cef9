//! The synchronous engine: each operation is a plain system call made at
//! submission, its result queued as a completion. For hosts or files where
//! io_uring is not available, and as a reference for the io_uring engine.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{AsyncIo, Completion, IoError, PUNCH_HOLE, ZERO_RANGE};

/// Plain system calls on one file.
pub struct SyncIo {
    fd: RawFd,
    done: VecDeque<Completion>,
    notifier: EventFd,
    /// Whatever keeps `fd` open, if the engine owns it.
    _owner: Option<Arc<dyn Send + Sync>>,
}

fn result(rc: isize) -> i32 {
    if rc < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(rc).unwrap_or(i32::MAX)
    }
}

impl SyncIo {
    /// An engine over `fd`, which the caller keeps open.
    pub fn new(fd: RawFd) -> Result<Self, IoError> {
        Self::with_notifier(fd, super::new_notifier("sync")?)
    }

    /// An engine over `fd` that signals `notifier` (shared with other
    /// engines of one node tree, so one wait covers them all).
    pub fn with_notifier(fd: RawFd, notifier: EventFd) -> Result<Self, IoError> {
        Ok(Self {
            fd,
            done: VecDeque::new(),
            notifier,
            _owner: None,
        })
    }

    /// An engine over a file it keeps open as long as it lives.
    pub fn with_owner<F: AsRawFd + Send + Sync + 'static>(
        file: Arc<F>,
        notifier: EventFd,
    ) -> Result<Self, IoError> {
        let mut engine = Self::with_notifier(file.as_raw_fd(), notifier)?;
        engine._owner = Some(file);
        Ok(engine)
    }

    fn complete(&mut self, user_data: u64, result: i32) -> Result<(), IoError> {
        self.done.push_back(Completion { user_data, result });
        self.notifier.write(1).map_err(IoError::Submit)
    }

    /// `preadv` or `pwritev` at `offset`, its result queued as a completion.
    ///
    /// # Safety
    /// The iovecs must be valid for the call.
    unsafe fn vectored(
        &mut self,
        call: unsafe extern "C" fn(i32, *const libc::iovec, i32, libc::off_t) -> isize,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        // SAFETY: the caller promises the iovecs are valid; the count is theirs.
        let rc = unsafe {
            call(
                self.fd,
                iovecs.as_ptr(),
                iovecs.len() as i32,
                offset as libc::off_t,
            )
        };
        self.complete(user_data, result(rc))
    }

    fn fallocate(
        &mut self,
        mode: i32,
        offset: u64,
        len: u64,
        user_data: u64,
    ) -> Result<(), IoError> {
        // SAFETY: fallocate takes no pointers; a bad fd or range is an errno.
        let rc =
            unsafe { libc::fallocate(self.fd, mode, offset as libc::off_t, len as libc::off_t) };
        self.complete(user_data, result(rc as isize))
    }
}

impl AsyncIo for SyncIo {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        // SAFETY: the caller promises the iovecs are valid (trait contract).
        unsafe { self.vectored(libc::preadv, offset, iovecs, user_data) }
    }

    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        // SAFETY: the caller promises the iovecs are valid (trait contract).
        unsafe { self.vectored(libc::pwritev, offset, iovecs, user_data) }
    }

    fn flush(&mut self, user_data: u64) -> Result<(), IoError> {
        // SAFETY: fdatasync takes no pointers.
        let rc = unsafe { libc::fdatasync(self.fd) };
        self.complete(user_data, result(rc as isize))
    }

    fn punch_hole(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        self.fallocate(PUNCH_HOLE, offset, len, user_data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        self.fallocate(ZERO_RANGE, offset, len, user_data)
    }

    fn submit(&mut self) -> Result<(), IoError> {
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    fn submit_and_wait(&mut self, _min_complete: u32, _timeout: Duration) -> Result<(), IoError> {
        // Operations complete when queued: whatever is still to come
        // cannot come by waiting.
        self.submit()
    }
}
