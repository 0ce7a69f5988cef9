//! I/O limits on a virtio-blk device: the control the VMM changes
//! (`--disk throttling.*`, QMP `block_set_io_throttle`) and the gate the
//! dataplane passes each request through.
//!
//! ```text
//!  QMP thread ── ThrottleControl::set ── limits + generation + wake fd
//!                                                   │
//!  dataplane: request ─► Gate::admit ─ yes ─► engine│
//!                            │ no                   ▼
//!                            └─► waiting (FIFO per direction) ─ timerfd ─► engine
//! ```
//!
//! A throttled guest waits: a request that must wait is kept, in order,
//! until its buckets have leaked enough, and nothing is dropped. Reads and
//! writes wait in separate lines, as in QEMU, so a write limit never holds
//! up reads. FLUSH, GET_ID and DISCARD are not limited (QEMU's throttling
//! covers reads and writes only); WRITE_ZEROES counts as a write of its
//! length.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base::sync::lock;
use block::throttle::{Direction, Limits, LimitsError, Throttle};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// A device's limits, changeable from any thread while its dataplane runs.
pub struct ThrottleControl {
    limits: Mutex<Limits>,
    /// Bumped by every change, so the dataplane notices with one load.
    generation: AtomicU64,
    /// Wakes the running dataplane, if any, so it applies a change at once.
    waker: Mutex<Option<EventFd>>,
}

impl ThrottleControl {
    /// A control starting with `limits` (already validated).
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Mutex::new(limits),
            generation: AtomicU64::new(0),
            waker: Mutex::new(None),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        *lock(&self.limits)
    }

    /// Replaces the limits, after checking them by QEMU's rules; the
    /// buckets start empty, as in QEMU.
    pub fn set(&self, limits: Limits) -> Result<(), LimitsError> {
        limits.validate()?;
        *lock(&self.limits) = limits;
        self.generation.fetch_add(1, Ordering::Release);
        if let Some(waker) = lock(&self.waker).as_ref() {
            // A full eventfd counter already wakes the dataplane.
            let _ = waker.write(1);
        }
        Ok(())
    }

    /// Has `waker` signalled on every change from now on (the running
    /// dataplane's); `None` when it stops.
    pub(crate) fn set_waker(&self, waker: Option<EventFd>) {
        *lock(&self.waker) = waker;
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the limits changed since `gate` last took them up.
    pub(crate) fn changed_since<T>(&self, gate: &Gate<T>) -> bool {
        self.generation() != gate.seen
    }
}

/// A request the gate holds back, with what the dataplane needs to start it.
pub(crate) struct Held<T> {
    /// How many bytes it moves, for the byte buckets.
    pub bytes: u64,
    /// The dataplane's own record of it.
    pub item: T,
}

/// The dataplane's side: the buckets, the lines of waiting requests, a
/// timer for the first of them, and the eventfd a change of limits wakes.
pub(crate) struct Gate<T> {
    throttle: Throttle,
    seen: u64,
    waiting: [VecDeque<Held<T>>; 2],
    timer: TimerFd,
    armed: bool,
    waker: EventFd,
}

fn line(dir: Direction) -> usize {
    match dir {
        Direction::Read => 0,
        Direction::Write => 1,
    }
}

const DIRECTIONS: [Direction; 2] = [Direction::Read, Direction::Write];

impl<T> Gate<T> {
    /// A gate applying `control`'s limits from `now`.
    pub fn new(control: &ThrottleControl, now: Instant) -> std::io::Result<Self> {
        Ok(Self {
            throttle: Throttle::new(control.limits(), now),
            seen: control.generation(),
            waiting: [VecDeque::new(), VecDeque::new()],
            timer: TimerFd::new()?,
            armed: false,
            waker: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The timer the dataplane waits on.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// What the dataplane waits on for a change of limits: give
    /// [`ThrottleControl::set_waker`] a clone.
    pub fn waker(&self) -> &EventFd {
        &self.waker
    }

    /// Takes up `control`'s limits if they changed since last looked at.
    pub fn refresh(&mut self, control: &ThrottleControl, now: Instant) {
        let generation = control.generation();
        if generation != self.seen {
            // Cleared before the limits are read: a later change wakes
            // again, and one in between is seen at the next look.
            let _ = self.waker.read();
            self.seen = generation;
            self.throttle = Throttle::new(control.limits(), now);
        }
    }

    /// Whether a request of `bytes` in `dir` may start now: then it is
    /// counted and handed back; otherwise the gate keeps it, at the end of
    /// its direction's line, and `None` comes back.
    pub fn admit(
        &mut self,
        dir: Direction,
        bytes: u64,
        item: T,
        now: Instant,
    ) -> std::io::Result<Option<T>> {
        let wait = self.throttle.wait(dir, now);
        let waiting = &mut self.waiting[line(dir)];
        if waiting.is_empty() && wait.is_none() {
            self.throttle.account(dir, bytes);
            return Ok(Some(item));
        }
        waiting.push_back(Held { bytes, item });
        if !self.armed {
            self.arm(Some(wait.unwrap_or_default()))?;
        }
        Ok(None)
    }

    /// Requests whose turn has come, in order; re-arms or clears the timer
    /// for the ones still waiting.
    pub fn release(&mut self, now: Instant, out: &mut Vec<T>) -> std::io::Result<()> {
        let mut next: Option<Duration> = None;
        for dir in DIRECTIONS {
            while let Some(first) = self.waiting[line(dir)].front() {
                match self.throttle.wait(dir, now) {
                    None => {
                        let bytes = first.bytes;
                        self.throttle.account(dir, bytes);
                        let held = self.waiting[line(dir)].pop_front().expect("front exists");
                        out.push(held.item);
                    }
                    Some(wait) => {
                        next = Some(next.map_or(wait, |n| n.min(wait)));
                        break;
                    }
                }
            }
        }
        self.arm(next)
    }

    fn arm(&mut self, next: Option<Duration>) -> std::io::Result<()> {
        match next {
            // A timerfd given zero is disarmed; wait at least a nanosecond.
            Some(wait) => {
                self.timer.reset(wait.max(Duration::from_nanos(1)), None)?;
                self.armed = true;
            }
            None if self.armed => {
                self.timer.clear()?;
                self.armed = false;
            }
            None => {}
        }
        Ok(())
    }

    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.throttle.enabled()
    }

    /// Whether any request waits.
    pub fn is_holding(&self) -> bool {
        self.waiting.iter().any(|w| !w.is_empty())
    }

    /// How many requests wait.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }

    /// Every waiting request, limits ignored (the dataplane is stopping and
    /// serves everything it took before it hands the queues back).
    pub fn drain(&mut self, out: &mut Vec<T>) -> std::io::Result<()> {
        for w in &mut self.waiting {
            out.extend(w.drain(..).map(|h| h.item));
        }
        self.arm(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::throttle::Limit;

    fn iops(avg: u64) -> Limits {
        Limits {
            iops_total: Limit {
                avg,
                ..Limit::default()
            },
            ..Limits::default()
        }
    }

    #[test]
    fn requests_over_the_limit_wait_in_order_and_none_is_lost() {
        let control = ThrottleControl::new(iops(10));
        let start = Instant::now();
        let mut gate = Gate::new(&control, start).unwrap();
        let mut went = Vec::new();
        for n in 0..20u32 {
            if let Some(n) = gate.admit(Direction::Read, 512, n, start).unwrap() {
                went.push(n);
            }
        }
        // One tenth of a second's worth passes at once (plus the one that
        // fills the bucket); the rest wait.
        assert_eq!(went, vec![0, 1]);
        assert_eq!(gate.held(), 18);
        assert!(gate.timer().is_armed().unwrap());
        // Over the next second, as the timer fires, ten more go, in the
        // order they came.
        for tenth in 1..=10 {
            gate.release(start + Duration::from_millis(100 * tenth), &mut went)
                .unwrap();
        }
        assert_eq!(went, (0..12).collect::<Vec<_>>());
        assert!(gate.timer().is_armed().unwrap());
        // Stopping serves the rest, limits or not.
        gate.drain(&mut went).unwrap();
        assert_eq!(went, (0..20).collect::<Vec<_>>());
        assert!(!gate.is_holding());
        assert!(!gate.timer().is_armed().unwrap());
    }

    #[test]
    fn a_write_limit_never_holds_up_reads() {
        let limits = Limits {
            iops_write: Limit {
                avg: 1,
                ..Limit::default()
            },
            ..Limits::default()
        };
        let control = ThrottleControl::new(limits);
        let now = Instant::now();
        let mut gate = Gate::new(&control, now).unwrap();
        assert_eq!(
            gate.admit(Direction::Write, 512, "w1", now).unwrap(),
            Some("w1")
        );
        assert_eq!(gate.admit(Direction::Write, 512, "w2", now).unwrap(), None);
        assert_eq!(
            gate.admit(Direction::Read, 512, "r1", now).unwrap(),
            Some("r1")
        );
        assert_eq!(gate.held(), 1);
    }

    #[test]
    fn a_change_of_limits_applies_at_the_next_look_and_wakes_the_dataplane() {
        let control = ThrottleControl::new(iops(1));
        let waker = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        control.set_waker(Some(waker.try_clone().unwrap()));
        let now = Instant::now();
        let mut gate = Gate::new(&control, now).unwrap();
        assert!(gate.admit(Direction::Read, 512, 1, now).unwrap().is_some());
        assert!(gate.admit(Direction::Read, 512, 2, now).unwrap().is_none());
        control.set(Limits::default()).unwrap();
        assert_eq!(waker.read().unwrap(), 1);
        gate.refresh(&control, now);
        let mut went = Vec::new();
        gate.release(now, &mut went).unwrap();
        assert_eq!(went, vec![2]);
        assert!(gate.admit(Direction::Read, 512, 3, now).unwrap().is_some());
        // Bad limits are refused and change nothing.
        let mut bad = iops(5);
        bad.iops_read.avg = 1;
        assert!(control.set(bad).is_err());
        assert_eq!(control.limits(), Limits::default());
    }
}
