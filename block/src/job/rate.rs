//! The speed limit: keeps a job's average rate at or under its speed.
//!
//! The job may start a step only once the bytes it has done since the
//! limiter was (re)started fit in the time elapsed at the set speed, so
//! over any run the rate exceeds the limit by at most one step's bytes.

use std::time::{Duration, Instant};

/// Most credit a slow job may save up, so that it cannot burst far past
/// the limit once its I/O speeds up.
const MAX_CREDIT: Duration = Duration::from_millis(100);

/// Longest single sleep; the job re-checks after it, so a huge delay (a
/// speed of a few bytes per second) never overflows a deadline.
const MAX_SLEEP: Duration = Duration::from_secs(10);

/// Bytes done since a point in time.
#[derive(Debug, Clone, Copy)]
pub(super) struct RateLimit {
    since: Instant,
    bytes: u64,
}

impl RateLimit {
    /// A limiter that starts counting at `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            since: now,
            bytes: 0,
        }
    }

    /// Forgets what was done before `now` (after a pause or a new speed).
    pub(super) fn restart(&mut self, now: Instant) {
        *self = Self::new(now);
    }

    /// Counts a finished step's bytes.
    pub(super) fn account(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// How long to sleep before the next step at `speed` bytes per second
    /// (0: no limit), or `None` to go on now.
    pub(super) fn delay(&mut self, speed: u64, now: Instant) -> Option<Duration> {
        if speed == 0 {
            return None;
        }
        let due = Duration::try_from_secs_f64(self.bytes as f64 / speed as f64)
            .ok()
            .and_then(|earned| self.since.checked_add(earned));
        let Some(due) = due else {
            return Some(MAX_SLEEP);
        };
        if due > now {
            return Some((due - now).min(MAX_SLEEP));
        }
        if now - due > MAX_CREDIT {
            self.restart(now);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn no_limit_never_waits() {
        let now = Instant::now();
        let mut rate = RateLimit::new(now);
        rate.account(u64::MAX);
        assert_eq!(rate.delay(0, now), None);
    }

    #[test]
    fn waits_until_the_bytes_done_fit_the_speed() {
        let start = Instant::now();
        let mut rate = RateLimit::new(start);
        assert_eq!(rate.delay(MIB, start), None, "the first step is free");
        rate.account(MIB / 4);
        let wait = rate.delay(MIB, start).unwrap();
        assert!(wait > Duration::from_millis(249) && wait <= Duration::from_millis(250));
        assert_eq!(rate.delay(MIB, start + Duration::from_millis(250)), None);
    }

    #[test]
    fn long_waits_are_cut_into_bounded_sleeps() {
        let start = Instant::now();
        let mut rate = RateLimit::new(start);
        rate.account(MIB);
        assert_eq!(rate.delay(1, start), Some(MAX_SLEEP));
        rate.account(u64::MAX);
        assert_eq!(rate.delay(1, start), Some(MAX_SLEEP));
    }

    #[test]
    fn saved_up_credit_is_capped() {
        let start = Instant::now();
        let mut rate = RateLimit::new(start);
        rate.account(MIB);
        // Idle for 10 s at 1 MiB/s: without the cap, 9 MiB could go at once.
        let later = start + Duration::from_secs(10);
        assert_eq!(rate.delay(MIB, later), None);
        rate.account(MIB);
        assert!(rate.delay(MIB, later).unwrap() > Duration::from_millis(900));
    }
}
