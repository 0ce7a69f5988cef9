//! The io_uring engine: one ring per dataplane, the disk registered as a
//! fixed file, and the ring restricted to the opcodes a disk needs, so a
//! bug elsewhere cannot turn it into a general-purpose syscall engine.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::{AsyncIo, Completion, IoError, PUNCH_HOLE, ZERO_RANGE};

const ENGINE: &str = "io_uring";
/// The disk is fixed file 0.
const DISK: types::Fixed = types::Fixed(0);

/// io_uring on one file.
pub struct UringIo {
    ring: IoUring,
    notifier: EventFd,
    /// Whatever keeps the registered fd open; dropped after the ring.
    _owner: Option<Arc<dyn Send + Sync>>,
}

impl UringIo {
    /// A ring over a file it keeps open as long as the ring lives.
    pub fn with_owner<F: AsRawFd + Send + Sync + 'static>(
        file: Arc<F>,
        entries: u32,
        notifier: EventFd,
    ) -> Result<Self, IoError> {
        let mut ring = Self::with_notifier(file.as_raw_fd(), entries, notifier)?;
        ring._owner = Some(file);
        Ok(ring)
    }

    /// A ring of `entries` submissions (rounded up to a power of two) over
    /// `fd`, which the caller keeps open while the ring lives.
    pub fn new(fd: RawFd, entries: u32) -> Result<Self, IoError> {
        Self::with_notifier(fd, entries, super::new_notifier(ENGINE)?)
    }

    /// As [`UringIo::new`], signalling `notifier` when completions are
    /// ready (shared with other engines of one node tree).
    pub fn with_notifier(fd: RawFd, entries: u32, notifier: EventFd) -> Result<Self, IoError> {
        let setup = |source: io::Error| IoError::Setup {
            engine: ENGINE,
            source,
        };
        let entries = entries.max(1).next_power_of_two();
        // Completions are posted when the submitting thread next enters
        // the kernel, instead of by an interrupt sent to wherever it runs,
        // which stops whatever spins there (the dataplane, or a vCPU). The
        // dataplane enters often anyway, and `next_completion` enters when
        // the ring flags completions waiting. Kernels before 5.19 refuse
        // the flags and get the interrupting default.
        let ring = match IoUring::builder()
            .setup_r_disabled()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
        {
            Ok(ring) => ring,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_r_disabled()
                .build(entries)
                .map_err(setup)?,
            Err(e) => return Err(setup(e)),
        };
        let submitter = ring.submitter();
        // Registration first: once restricted, the ring refuses register ops too.
        submitter.register_files(&[fd]).map_err(setup)?;
        submitter
            .register_eventfd(notifier.as_raw_fd())
            .map_err(setup)?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Fallocate::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        submitter
            .register_restrictions(&mut allowed)
            .map_err(setup)?;
        submitter.register_enable_rings().map_err(setup)?;
        Ok(Self {
            ring,
            notifier,
            _owner: None,
        })
    }

    /// The next completion the kernel has posted to the queue.
    fn posted(&mut self) -> Option<Completion> {
        self.ring.completion().next().map(|cqe| Completion {
            user_data: cqe.user_data(),
            result: cqe.result(),
        })
    }

    fn push(&mut self, entry: squeue::Entry) -> Result<(), IoError> {
        // SAFETY: the entry's buffers are the caller's promise (see the
        // unsafe trait methods); the other opcodes carry no pointers.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        // Full: hand what is queued to the kernel and try once more.
        self.submit()?;
        // SAFETY: as above.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| IoError::Full)
    }
}

impl AsyncIo for UringIo {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        let entry = opcode::Readv::new(DISK, iovecs.as_ptr(), iovecs.len() as u32)
            .offset(offset)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        let entry = opcode::Writev::new(DISK, iovecs.as_ptr(), iovecs.len() as u32)
            .offset(offset)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    fn flush(&mut self, user_data: u64) -> Result<(), IoError> {
        let entry = opcode::Fsync::new(DISK)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    fn punch_hole(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        let entry = opcode::Fallocate::new(DISK, len)
            .offset(offset)
            .mode(PUNCH_HOLE)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        let entry = opcode::Fallocate::new(DISK, len)
            .offset(offset)
            .mode(ZERO_RANGE)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    fn submit(&mut self) -> Result<(), IoError> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            // The completion queue is full: the caller drains it and calls again.
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    || e.raw_os_error() == Some(libc::EAGAIN) =>
            {
                Ok(())
            }
            Err(e) => Err(IoError::Submit(e)),
        }
    }

    fn submit_and_wait(&mut self, min_complete: u32, timeout: Duration) -> Result<(), IoError> {
        if min_complete == 0 {
            return self.submit();
        }
        if !self.ring.params().is_feature_ext_arg() {
            // Before Linux 5.11 an enter cannot time out: wait on the
            // eventfd the ring signals instead.
            self.submit()?;
            return super::wait_readable(&self.notifier, timeout);
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self
            .ring
            .submitter()
            .submit_with_args(min_complete as usize, &args)
        {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // The timeout passed, a signal came, or the completion
                // queue is full (the caller drains it): all mean "look
                // again".
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => Ok(()),
                _ => Err(IoError::Submit(e)),
            },
        }
    }

    fn next_completion(&mut self) -> Option<Completion> {
        if let Some(done) = self.posted() {
            return Some(done);
        }
        if !self.ring.submission().taskrun() {
            return None;
        }
        // Finished operations wait for this thread to enter the kernel
        // (cooperative task running): enter once to have them posted,
        // handing over whatever is queued on the way. A busy or
        // interrupted enter is simply tried again on the next call.
        let _ = self.ring.submit();
        self.posted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::Instant;

    /// A direct read completes from the disk's interrupt, and with
    /// cooperative task running the kernel posts its completion only when
    /// this thread next enters it (at the latest on its next timer tick),
    /// flagging the ring meanwhile. A thread that spins on the completion
    /// queue must get the completion from the first look after the flag
    /// is up, not a tick later. (Where the interrupt lands on the spinning
    /// thread's own CPU the completion is posted at once and the flag is
    /// never seen up.)
    #[test]
    fn a_completion_the_ring_flags_as_waiting_is_taken_at_the_first_look() {
        let path = std::env::temp_dir().join(format!("block-uring-spin-{}", std::process::id()));
        std::fs::write(&path, vec![0x3cu8; 128 << 10]).unwrap();
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                std::fs::remove_file(&path).unwrap();
                eprintln!("skipped: the temp folder does not take O_DIRECT ({e})");
                return;
            }
        };
        let mut engine = UringIo::new(file.as_raw_fd(), 4).unwrap();
        let mut backing = vec![0u8; 8192];
        let skip = backing.as_ptr().align_offset(4096);
        let buf = &mut backing[skip..skip + 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        for round in 0..32u64 {
            // SAFETY: the buffer and the iovec outlive the loop below,
            // which waits for the read's completion.
            unsafe { engine.read_vectored(round * 4096, &iov, round).unwrap() };
            engine.submit().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut spins = 0u64;
            let done = loop {
                let flagged =
                    engine.ring.completion().is_empty() && engine.ring.submission().taskrun();
                let next = engine.next_completion();
                if flagged {
                    assert!(next.is_some(), "read {round}: flagged, but not taken");
                }
                if let Some(c) = next {
                    break c;
                }
                spins += 1;
                // The clock is read through the vDSO: no kernel entry.
                if spins.is_multiple_of(1 << 16) {
                    assert!(Instant::now() < deadline, "read {round} never completed");
                }
                std::hint::spin_loop();
            };
            assert_eq!((done.user_data, done.result), (round, 4096));
        }
        assert!(buf.iter().all(|&b| b == 0x3c));
        std::fs::remove_file(&path).unwrap();
    }
}
