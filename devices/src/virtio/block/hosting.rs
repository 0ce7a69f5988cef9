//! The holder's side of hosting (`live-jobs=on`): reads that hosted jobs
//! queue with the dataplane's [`Host`] are carried out on the dataplane's
//! own engine, between the guest's requests, and their completions handed
//! back. While the VM is paused, a small loop keeps serving them alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::graph::{Host, HostedRead};
use block::{AsyncIo, Completion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::dataplane::StopSignal;

/// Tags of hosted reads on the engine: this bit and a slot number (the
/// guest's requests use small slot numbers).
pub(crate) const HOSTED_TAG: u64 = 1 << 62;

/// Hosted reads in flight on one engine.
pub(crate) struct Hosting {
    pub host: Arc<Host>,
    slots: Vec<Option<HostedRead>>,
    free: Vec<usize>,
    reads: Vec<HostedRead>,
    released: Vec<u64>,
}

impl Hosting {
    pub fn new(host: Arc<Host>) -> Self {
        Self {
            host,
            slots: Vec::new(),
            free: Vec::new(),
            reads: Vec::new(),
            released: Vec::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues the reads hosted jobs asked for on `engine` (the caller
    /// submits), and takes the tickets released since; false if there was
    /// nothing.
    pub fn take_work(&mut self, engine: &mut dyn AsyncIo) -> bool {
        if !self.host.has_work() {
            return false;
        }
        self.host.take_released(&mut self.released);
        let mut reads = std::mem::take(&mut self.reads);
        self.host.take_reads(&mut reads);
        for read in reads.drain(..) {
            let slot = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let tag = HOSTED_TAG | slot as u64;
            // SAFETY: the iovecs point into the hosted job's buffers, which
            // its engine's contract keeps valid until it has drained this
            // read's completion, which is only handed back (below) once
            // the kernel is done; the iovec array lives in the slot.
            let queued = unsafe {
                let iov = &read.iovecs;
                engine.read_vectored(
                    read.offset,
                    std::slice::from_raw_parts(iov.as_ptr(), iov.len()),
                    tag,
                )
            };
            match queued {
                Ok(()) => self.slots[slot] = Some(read),
                Err(e) => {
                    log::debug!("hosted read not queued: {e}");
                    read.reply.complete(read.user_data, -libc::EIO);
                    self.free.push(slot);
                }
            }
        }
        self.reads = reads;
        true
    }

    /// Tickets released since the last call.
    pub fn released(&mut self) -> &mut Vec<u64> {
        &mut self.released
    }

    /// Hands a hosted read's completion back; false if `done` is not one.
    pub fn complete(&mut self, done: Completion) -> bool {
        if done.user_data & HOSTED_TAG == 0 {
            return false;
        }
        let slot = (done.user_data & !HOSTED_TAG) as usize;
        match self.slots.get_mut(slot).and_then(Option::take) {
            Some(read) => {
                read.reply.complete(read.user_data, done.result);
                self.free.push(slot);
            }
            None => log::error!("completion for an unknown hosted read {slot}"),
        }
        true
    }
}

/// How long the paused loop waits in epoll before it looks at the stop
/// signal again.
const IDLE_WAIT_MS: i32 = 100;

/// Serves hosted reads alone, while the VM is paused, until `stop`; then
/// waits (at most `deadline`) for the reads in flight. False if some never
/// completed (the engine is then leaked with them, as the dataplane does).
pub(crate) fn serve_paused(
    mut hosting: Hosting,
    mut engine: Box<dyn AsyncIo>,
    stop: Arc<StopSignal>,
    deadline: Duration,
) -> bool {
    use std::os::fd::AsRawFd;
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            log::error!("cannot set up the paused dataplane's epoll: {e}");
            return drain(&mut hosting, engine, deadline);
        }
    };
    for (fd, token) in [
        (hosting.host.kick().as_raw_fd(), 0),
        (engine.notifier().as_raw_fd(), 1),
        (stop.wake_fd(), 2),
    ] {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            log::error!("cannot set up the paused dataplane's epoll: {e}");
            return drain(&mut hosting, engine, deadline);
        }
    }
    let mut events = [EpollEvent::default(); 3];
    while !stop.is_requested() {
        if hosting.take_work(engine.as_mut()) {
            let _ = engine.submit();
        }
        while let Some(done) = engine.next_completion() {
            hosting.complete(done);
        }
        if let Ok(n) = epoll.wait(IDLE_WAIT_MS, &mut events) {
            for ev in &events[..n] {
                let _ = match ev.data() {
                    0 => hosting.host.kick().read(),
                    1 => engine.notifier().read(),
                    _ => Ok(0),
                };
            }
        }
    }
    drain(&mut hosting, engine, deadline)
}

/// Waits (at most `deadline`) for the hosted reads in flight on `engine`;
/// false if some never completed (the engine is then leaked with them).
pub(crate) fn drain(
    hosting: &mut Hosting,
    mut engine: Box<dyn AsyncIo>,
    deadline: Duration,
) -> bool {
    let end = Instant::now() + deadline;
    while hosting.in_flight() > 0 {
        if Instant::now() >= end {
            log::error!(
                "{} hosted reads still in flight after {deadline:?}; keeping their engine",
                hosting.in_flight()
            );
            std::mem::forget(engine);
            return false;
        }
        let _ = engine.submit_and_wait(1, Duration::from_millis(10));
        while let Some(done) = engine.next_completion() {
            hosting.complete(done);
        }
    }
    true
}
