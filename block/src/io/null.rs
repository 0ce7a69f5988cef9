//! The null engine: reads fill the buffers with zeros, writes and the rest
//! succeed without touching anything. Completions are queued at once, so
//! it measures the path above the engine and nothing else.

use std::collections::VecDeque;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{AsyncIo, Completion, IoError};

/// An engine with no file under it.
pub struct NullIo {
    done: VecDeque<Completion>,
    notifier: EventFd,
}

impl NullIo {
    /// A new engine.
    pub fn new() -> Result<Self, IoError> {
        Self::with_notifier(super::new_notifier("null")?)
    }

    /// An engine that signals `notifier`.
    pub fn with_notifier(notifier: EventFd) -> Result<Self, IoError> {
        Ok(Self {
            done: VecDeque::new(),
            notifier,
        })
    }

    fn complete(&mut self, user_data: u64, result: i32) -> Result<(), IoError> {
        self.done.push_back(Completion { user_data, result });
        Ok(())
    }
}

fn total(iovecs: &[libc::iovec]) -> i32 {
    let sum: usize = iovecs.iter().map(|v| v.iov_len).sum();
    i32::try_from(sum).unwrap_or(i32::MAX)
}

impl AsyncIo for NullIo {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    unsafe fn read_vectored(
        &mut self,
        _offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        for v in iovecs {
            // SAFETY: the caller promises each iovec is valid, writable
            // memory of iov_len bytes that nothing else uses meanwhile.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
        self.complete(user_data, total(iovecs))
    }

    unsafe fn write_vectored(
        &mut self,
        _offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        self.complete(user_data, total(iovecs))
    }

    fn flush(&mut self, user_data: u64) -> Result<(), IoError> {
        self.complete(user_data, 0)
    }

    fn punch_hole(&mut self, _offset: u64, _len: u64, user_data: u64) -> Result<(), IoError> {
        self.complete(user_data, 0)
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64, user_data: u64) -> Result<(), IoError> {
        self.complete(user_data, 0)
    }

    fn submit(&mut self) -> Result<(), IoError> {
        // One wake-up per batch, as a ring gives.
        if !self.done.is_empty() {
            self.notifier.write(1).map_err(IoError::Submit)?;
        }
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
