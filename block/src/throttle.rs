//! I/O throttling as QEMU does it: leaky buckets for bytes and operations,
//! each a total, read or write limit with an optional burst.
//!
//! ```text
//!   request ──► must it wait? ──no──► account it (level += size or 1) ──► go
//!                   │ yes
//!                   ▼
//!           wait for the time the fullest bucket needs to leak below its size
//! ```
//!
//! A bucket leaks at its average rate. Without a burst rate it may hold a
//! tenth of a second of its average before requests wait, so a guest
//! may issue short bursts; with a burst rate `max` it may hold
//! `max * burst_length` (seconds), and a second, burst level leaking at
//! `max` keeps the rate within a burst at or below `max`. The request
//! that fills a bucket still goes; the ones after it wait. Nothing is
//! dropped: a throttled caller only waits.

use std::time::{Duration, Instant};

/// QEMU's ceiling for every rate and burst (`THROTTLE_VALUE_MAX`).
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// A direction of I/O: what a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reads.
    Read,
    /// Writes (and the other requests that change the disk).
    Write,
}

/// One limit: an average rate, and an optional burst rate and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Units per second on average; 0 means no limit.
    pub avg: u64,
    /// Units per second during a burst; 0 means no burst.
    pub max: u64,
    /// How many seconds a burst at `max` may last.
    pub max_length: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Self {
            avg: 0,
            max: 0,
            max_length: 1,
        }
    }
}

/// The six limits of QEMU's `ThrottleLimits`, each for bytes and for
/// operations: total, read, write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per second, reads and writes together.
    pub bps_total: Limit,
    /// Bytes per second read.
    pub bps_read: Limit,
    /// Bytes per second written.
    pub bps_write: Limit,
    /// Operations per second, reads and writes together.
    pub iops_total: Limit,
    /// Read operations per second.
    pub iops_read: Limit,
    /// Write operations per second.
    pub iops_write: Limit,
    /// An operation larger than this counts as `size / iops_size`
    /// operations; 0: every operation counts as one.
    pub iops_size: u64,
}

/// Why a set of limits was refused; the texts are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A total limit together with a read or write limit.
    #[error("bps/iops/max total values and read/write values cannot be used at the same time")]
    TotalAndSplit,
    /// `iops_size` without an iops limit.
    #[error("iops size requires an iops value to be set")]
    SizeWithoutIops,
    /// A rate above [`VALUE_MAX`].
    #[error("bps/iops/max values must be within [0, {VALUE_MAX}]")]
    TooLarge,
    /// A burst length of 0.
    #[error("the burst length cannot be 0")]
    ZeroLength,
    /// A burst length without a burst rate.
    #[error("burst length set without burst rate")]
    LengthWithoutMax,
    /// A burst that would hold more than [`VALUE_MAX`].
    #[error("burst length too high for this burst rate")]
    LengthTooHigh,
    /// A burst rate without an average rate.
    #[error("bps_max/iops_max require corresponding bps/iops values")]
    MaxWithoutAvg,
    /// A burst rate below the average.
    #[error("bps_max/iops_max cannot be lower than bps/iops")]
    MaxBelowAvg,
}

impl Limits {
    fn all(&self) -> [&Limit; 6] {
        [
            &self.bps_total,
            &self.bps_read,
            &self.bps_write,
            &self.iops_total,
            &self.iops_read,
            &self.iops_write,
        ]
    }

    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.all().iter().any(|l| l.avg > 0)
    }

    /// Checks the limits by QEMU's rules.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let split = |total: &Limit, read: &Limit, write: &Limit, f: fn(&Limit) -> u64| {
            f(total) > 0 && (f(read) > 0 || f(write) > 0)
        };
        let avg = |l: &Limit| l.avg;
        let max = |l: &Limit| l.max;
        if split(&self.bps_total, &self.bps_read, &self.bps_write, avg)
            || split(&self.iops_total, &self.iops_read, &self.iops_write, avg)
            || split(&self.bps_total, &self.bps_read, &self.bps_write, max)
            || split(&self.iops_total, &self.iops_read, &self.iops_write, max)
        {
            return Err(LimitsError::TotalAndSplit);
        }
        if self.iops_size > 0
            && self.iops_total.avg == 0
            && self.iops_read.avg == 0
            && self.iops_write.avg == 0
        {
            return Err(LimitsError::SizeWithoutIops);
        }
        for l in self.all() {
            if l.avg > VALUE_MAX || l.max > VALUE_MAX {
                return Err(LimitsError::TooLarge);
            }
            if l.max_length == 0 {
                return Err(LimitsError::ZeroLength);
            }
            if l.max_length > 1 && l.max == 0 {
                return Err(LimitsError::LengthWithoutMax);
            }
            if l.max > 0 && l.max_length > VALUE_MAX / l.max {
                return Err(LimitsError::LengthTooHigh);
            }
            if l.max > 0 && l.avg == 0 {
                return Err(LimitsError::MaxWithoutAvg);
            }
            if l.max > 0 && l.max < l.avg {
                return Err(LimitsError::MaxBelowAvg);
            }
        }
        Ok(())
    }
}

/// A bucket's fill: how much was done and has not leaked away yet.
#[derive(Debug, Clone, Copy, Default)]
struct Level {
    level: f64,
    burst: f64,
}

impl Level {
    fn leak(&mut self, limit: &Limit, seconds: f64) {
        self.level = (self.level - limit.avg as f64 * seconds).max(0.0);
        if limit.max_length > 1 {
            self.burst = (self.burst - limit.max as f64 * seconds).max(0.0);
        }
    }

    fn add(&mut self, limit: &Limit, units: f64) {
        self.level += units;
        if limit.max_length > 1 {
            self.burst += units;
        }
    }

    /// Seconds until this bucket lets the next request go; 0 if it may.
    fn wait(&self, limit: &Limit) -> f64 {
        if limit.avg == 0 {
            return 0.0;
        }
        let (size, burst_size) = if limit.max == 0 {
            // Without a burst rate a tenth of a second's worth may still
            // pass at once, or every other request would wait.
            (limit.avg as f64 / 10.0, 0.0)
        } else {
            (
                limit.max as f64 * limit.max_length as f64,
                limit.max as f64 / 10.0,
            )
        };
        let over = self.level - size;
        if over > 0.0 {
            return over / limit.avg as f64;
        }
        if limit.max_length > 1 {
            let over = self.burst - burst_size;
            if over > 0.0 {
                return over / limit.max as f64;
            }
        }
        0.0
    }
}

/// The buckets of one device, in the order of [`Limits::all`].
#[derive(Debug, Clone)]
pub struct Throttle {
    limits: Limits,
    levels: [Level; 6],
    last_leak: Instant,
}

const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const IOPS_TOTAL: usize = 3;
const IOPS_READ: usize = 4;
const IOPS_WRITE: usize = 5;

impl Throttle {
    /// Empty buckets for `limits` (already validated).
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            levels: [Level::default(); 6],
            last_leak: now,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether anything is limited at all.
    pub fn enabled(&self) -> bool {
        self.limits.enabled()
    }

    fn leak(&mut self, now: Instant) {
        let seconds = now.saturating_duration_since(self.last_leak).as_secs_f64();
        self.last_leak = now;
        if seconds <= 0.0 {
            return;
        }
        let limits = self.limits.all();
        for (level, limit) in self.levels.iter_mut().zip(limits) {
            level.leak(limit, seconds);
        }
    }

    /// How long a request in `dir` must wait before it may go; `None` if it
    /// may go now.
    pub fn wait(&mut self, dir: Direction, now: Instant) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        self.leak(now);
        let (bps, iops) = match dir {
            Direction::Read => (BPS_READ, IOPS_READ),
            Direction::Write => (BPS_WRITE, IOPS_WRITE),
        };
        let limits = self.limits.all();
        let seconds = [BPS_TOTAL, IOPS_TOTAL, bps, iops]
            .into_iter()
            .map(|i| self.levels[i].wait(limits[i]))
            .fold(0.0, f64::max);
        // Round up to whole nanoseconds so the caller never wakes early
        // and finds it must wait again for a few nanoseconds.
        (seconds > 0.0).then(|| Duration::from_nanos((seconds * 1e9).ceil() as u64))
    }

    /// Counts a request of `bytes` in `dir` that goes now.
    pub fn account(&mut self, dir: Direction, bytes: u64) {
        if !self.enabled() {
            return;
        }
        let size = self.limits.iops_size;
        let units = if size > 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        let (bps, iops) = match dir {
            Direction::Read => (BPS_READ, IOPS_READ),
            Direction::Write => (BPS_WRITE, IOPS_WRITE),
        };
        let limits = self.limits;
        let limits = limits.all();
        for i in [BPS_TOTAL, bps] {
            self.levels[i].add(limits[i], bytes as f64);
        }
        for i in [IOPS_TOTAL, iops] {
            self.levels[i].add(limits[i], units);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iops(avg: u64) -> Limits {
        Limits {
            iops_total: Limit {
                avg,
                ..Limit::default()
            },
            ..Limits::default()
        }
    }

    /// Runs `seconds` of a caller that issues a request whenever allowed;
    /// how many went.
    fn simulate(limits: Limits, dir: Direction, bytes: u64, seconds: f64) -> u64 {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(seconds);
        let mut t = Throttle::new(limits, start);
        let mut now = start;
        let mut done = 0;
        while now < end {
            match t.wait(dir, now) {
                None => {
                    t.account(dir, bytes);
                    done += 1;
                }
                Some(wait) => now += wait,
            }
        }
        done
    }

    #[test]
    fn no_limits_never_wait() {
        let mut t = Throttle::new(Limits::default(), Instant::now());
        for _ in 0..10_000 {
            assert_eq!(t.wait(Direction::Write, Instant::now()), None);
            t.account(Direction::Write, 1 << 20);
        }
    }

    #[test]
    fn an_iops_limit_holds_over_time_after_a_tenth_of_a_second_burst() {
        // 500 per second for 10 s, plus the 50 the bucket holds at start.
        let done = simulate(iops(500), Direction::Read, 4096, 10.0);
        assert!((5000..=5051).contains(&done), "{done}");
    }

    #[test]
    fn a_bps_limit_counts_bytes() {
        let limits = Limits {
            bps_write: Limit {
                avg: 1 << 20,
                ..Limit::default()
            },
            ..Limits::default()
        };
        // 1 MiB/s in 64 KiB writes: 16 per second.
        let done = simulate(limits, Direction::Write, 64 << 10, 10.0);
        assert!((160..=163).contains(&done), "{done}");
        // Reads are not limited by a write limit.
        let mut t = Throttle::new(limits, Instant::now());
        for _ in 0..1000 {
            assert_eq!(t.wait(Direction::Read, Instant::now()), None);
            t.account(Direction::Read, 64 << 10);
        }
    }

    #[test]
    fn a_burst_goes_at_the_burst_rate_then_the_average() {
        let limits = Limits {
            iops_total: Limit {
                avg: 100,
                max: 1000,
                max_length: 2,
            },
            ..Limits::default()
        };
        assert_eq!(limits.validate(), Ok(()));
        // The first 2 s may reach the burst rate, never faster: at most
        // 2000 (plus the burst bucket's tenth of a second).
        let burst = simulate(limits, Direction::Read, 512, 2.0);
        assert!((1900..=2100).contains(&burst), "{burst}");
        // Over 20 s the average wins: 2000 of burst plus 100/s after.
        let long = simulate(limits, Direction::Read, 512, 20.0);
        assert!((3700..=4200).contains(&long), "{long}");
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let mut limits = iops(100);
        limits.iops_size = 4096;
        assert_eq!(limits.validate(), Ok(()));
        let small = simulate(limits, Direction::Read, 4096, 10.0);
        let large = simulate(limits, Direction::Read, 16384, 10.0);
        assert!(large * 4 <= small + 20, "{small} vs {large}");
    }

    #[test]
    fn limits_are_checked_with_qemus_messages() {
        let mut l = iops(100);
        l.iops_read.avg = 10;
        assert_eq!(
            l.validate().unwrap_err().to_string(),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        let l = Limits {
            iops_size: 512,
            ..Limits::default()
        };
        assert_eq!(l.validate(), Err(LimitsError::SizeWithoutIops));
        let mut l = iops(VALUE_MAX + 1);
        assert_eq!(l.validate(), Err(LimitsError::TooLarge));
        l = iops(10);
        l.iops_total.max_length = 0;
        assert_eq!(l.validate(), Err(LimitsError::ZeroLength));
        l.iops_total.max_length = 5;
        assert_eq!(l.validate(), Err(LimitsError::LengthWithoutMax));
        l.iops_total.max = 5;
        assert_eq!(l.validate(), Err(LimitsError::MaxBelowAvg));
        l.iops_total.max = VALUE_MAX;
        assert_eq!(l.validate(), Err(LimitsError::LengthTooHigh));
        let mut l = Limits::default();
        l.bps_read.max = 100;
        assert_eq!(l.validate(), Err(LimitsError::MaxWithoutAvg));
    }

    #[test]
    fn a_wait_is_never_too_short() {
        let start = Instant::now();
        let mut t = Throttle::new(iops(1000), start);
        let mut now = start;
        for _ in 0..500 {
            while let Some(wait) = t.wait(Direction::Write, now) {
                now += wait;
                // After waiting as told, the request may go.
                assert_eq!(t.wait(Direction::Write, now), None);
            }
            t.account(Direction::Write, 512);
        }
    }
}
