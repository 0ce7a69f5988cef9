//! The dataplane's adaptive poll window: how long the thread keeps
//! looking for work after it ran out, before it sleeps in epoll.
//!
//! The idea is QEMU's (`util/aio-posix.c`): a wait that ended inside the
//! window says the window paid; one that ended after it but within the
//! `poll=` maximum says a longer window would have caught the work without
//! a sleep and a wake-up, so it doubles; one longer than the maximum says
//! polling only burnt CPU, so it halves, down to nothing. A guest that goes
//! idle therefore ends with a thread that sleeps straight away.
//!
//! ```text
//!   waited ≤ window          keep
//!   window < waited ≤ max    grow  ×2 (from nothing: FIRST), never past max
//!   waited > max             shrink ÷2 (below FIRST: nothing)
//! ```

use std::time::Duration;

/// The window a first grow gives, in nanoseconds (QEMU's is 4 µs too:
/// about the cost of one sleep and wake-up on a loaded host).
const FIRST_NS: u64 = 4_000;

/// The poll window, adjusted after every wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollWindow {
    max_ns: u64,
    now_ns: u64,
}

impl PollWindow {
    /// A window that may grow up to `max`; it starts small.
    pub fn new(max: Duration) -> Self {
        let max_ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Self {
            max_ns,
            now_ns: FIRST_NS.min(max_ns),
        }
    }

    /// How long to poll now; zero: sleep at once.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.now_ns)
    }

    /// Whether waits can change the window (false without `poll`): the
    /// caller need not time them otherwise.
    pub fn adapts(&self) -> bool {
        self.max_ns > 0
    }

    /// Takes into account a wait for work that lasted `waited` from the
    /// moment the thread ran out of it (polling included).
    pub fn waited(&mut self, waited: Duration) {
        let waited = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        if waited <= self.now_ns {
            return;
        }
        if waited > self.max_ns {
            self.now_ns /= 2;
            if self.now_ns < FIRST_NS {
                self.now_ns = 0;
            }
        } else {
            self.now_ns = self.now_ns.saturating_mul(2).max(FIRST_NS).min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn starts_small_and_grows_when_work_comes_just_after_it() {
        let mut w = PollWindow::new(1000 * US);
        assert!(w.adapts());
        assert_eq!(w.window(), 4 * US);
        w.waited(6 * US);
        assert_eq!(w.window(), 8 * US);
        w.waited(100 * US);
        assert_eq!(w.window(), 16 * US);
        // Work found inside the window changes nothing.
        w.waited(10 * US);
        assert_eq!(w.window(), 16 * US);
    }

    #[test]
    fn never_grows_past_the_maximum() {
        let mut w = PollWindow::new(50 * US);
        for _ in 0..20 {
            w.waited(49 * US);
            assert!(w.window() <= 50 * US, "{:?}", w.window());
        }
        assert_eq!(w.window(), 50 * US);
        // A maximum below the first step caps the very first window.
        assert_eq!(PollWindow::new(2 * US).window(), 2 * US);
    }

    #[test]
    fn shrinks_when_the_wait_outlasts_the_maximum() {
        let mut w = PollWindow::new(1000 * US);
        for _ in 0..10 {
            w.waited(999 * US);
        }
        assert_eq!(w.window(), 1000 * US);
        w.waited(5000 * US);
        assert_eq!(w.window(), 500 * US);
        w.waited(5000 * US);
        assert_eq!(w.window(), 250 * US);
    }

    #[test]
    fn an_idle_guest_ends_with_a_thread_that_sleeps_at_once() {
        let mut w = PollWindow::new(1000 * US);
        for _ in 0..10 {
            w.waited(999 * US);
        }
        // Long sleeps: the window halves to nothing in a few waits.
        for _ in 0..10 {
            w.waited(Duration::from_secs(1));
        }
        assert_eq!(w.window(), Duration::ZERO);
        // And it comes back when work comes back soon enough.
        w.waited(10 * US);
        assert_eq!(w.window(), 4 * US);
    }

    #[test]
    fn no_maximum_means_no_polling() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert_eq!(w.window(), Duration::ZERO);
        assert!(!w.adapts());
        w.waited(US);
        w.waited(Duration::ZERO);
        assert_eq!(w.window(), Duration::ZERO);
    }
}
