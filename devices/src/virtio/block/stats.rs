//! I/O accounting of one virtio-blk device, as QEMU's `query-blockstats`
//! reports it: operations, bytes, failures, refusals, time spent, the
//! highest byte written and latency histograms.
//!
//! The dataplane thread is the only writer. It bumps plain counters with a
//! relaxed load and store each (no locked instruction), and the monitor
//! reads them whenever it likes: a reply may mix counters from either side
//! of one request, as QEMU's may. Latency needs the clock, read once when a
//! request starts and once when it ends; with `timed` off (`stats=off`)
//! the clock is never read for accounting, times stay 0 and histograms
//! stay empty. Histogram settings change rarely: the monitor bumps a
//! generation number and the dataplane takes the new settings under a
//! lock only when that number moved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::request::{self, Request, RequestKind, Segment};

/// What a request does, as QEMU accounts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// IN.
    Read = 0,
    /// OUT and WRITE_ZEROES.
    Write = 1,
    /// FLUSH.
    Flush = 2,
    /// DISCARD.
    Unmap = 3,
}

/// The counters of one kind.
#[derive(Debug, Default)]
pub struct Counters {
    operations: AtomicU64,
    bytes: AtomicU64,
    total_time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// One reading of a kind's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindSnapshot {
    /// Completed without error.
    pub operations: u64,
    /// Bytes of those.
    pub bytes: u64,
    /// Nanoseconds from start to end, over completed and failed requests.
    pub total_time_ns: u64,
    /// Ended with an error.
    pub failed: u64,
    /// Refused before reaching the disk (out of range, bad length...).
    pub invalid: u64,
}

/// Latency bins over `boundaries` (ns): `[0, b0)`, `[b0, b1)`, ...,
/// `[bn, inf)`.
#[derive(Debug)]
pub struct Histogram {
    boundaries: Vec<u64>,
    bins: Vec<AtomicU64>,
}

impl Histogram {
    /// An empty histogram; `None` unless `boundaries` are positive and
    /// strictly increasing (as QEMU requires; none at all is one bin).
    pub fn new(boundaries: Vec<u64>) -> Option<Self> {
        if boundaries.first() == Some(&0) || boundaries.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        let bins = (0..=boundaries.len()).map(|_| AtomicU64::new(0)).collect();
        Some(Self { boundaries, bins })
    }

    fn account(&self, latency_ns: u64) {
        let i = self.boundaries.partition_point(|&b| b <= latency_ns);
        bump(&self.bins[i], 1);
    }

    /// The boundaries and the count in each bin.
    pub fn read(&self) -> (Vec<u64>, Vec<u64>) {
        let bins = self
            .bins
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        (self.boundaries.clone(), bins)
    }
}

/// The histograms set for reads, writes and flushes.
#[derive(Debug, Clone, Default)]
pub struct Histograms {
    /// Read latency.
    pub read: Option<Arc<Histogram>>,
    /// Write latency.
    pub write: Option<Arc<Histogram>>,
    /// Flush latency.
    pub flush: Option<Arc<Histogram>>,
}

impl Histograms {
    fn of(&self, kind: Kind) -> Option<&Histogram> {
        match kind {
            Kind::Read => self.read.as_deref(),
            Kind::Write => self.write.as_deref(),
            Kind::Flush => self.flush.as_deref(),
            Kind::Unmap => None,
        }
    }
}

/// A device's accounting, shared by its dataplane (the writer) and the
/// monitor (readers).
#[derive(Debug)]
pub struct BlockStats {
    timed: bool,
    epoch: Instant,
    kinds: [Counters; 4],
    wr_highest_offset: AtomicU64,
    /// When the last request ended, in ns after `epoch` plus one (0: never).
    last_done: AtomicU64,
    histograms: Mutex<Histograms>,
    generation: AtomicU64,
}

/// Adds `n` to a counter only this thread writes: no locked instruction.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl BlockStats {
    /// Empty counters; `timed` says whether requests are timed.
    pub fn new(timed: bool) -> Self {
        Self {
            timed,
            epoch: Instant::now(),
            kinds: Default::default(),
            wr_highest_offset: AtomicU64::new(0),
            last_done: AtomicU64::new(0),
            histograms: Mutex::new(Histograms::default()),
            generation: AtomicU64::new(0),
        }
    }

    /// Whether requests are timed.
    pub fn timed(&self) -> bool {
        self.timed
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The counters of `kind` now.
    pub fn kind(&self, kind: Kind) -> KindSnapshot {
        let c = &self.kinds[kind as usize];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KindSnapshot {
            operations: get(&c.operations),
            bytes: get(&c.bytes),
            total_time_ns: get(&c.total_time_ns),
            failed: get(&c.failed),
            invalid: get(&c.invalid),
        }
    }

    /// One past the highest byte written (or zeroed) so far.
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest_offset.load(Ordering::Relaxed)
    }

    /// Nanoseconds since the last request ended; `None` before the first
    /// or when requests are not timed.
    pub fn idle_time_ns(&self) -> Option<u64> {
        match self.last_done.load(Ordering::Relaxed) {
            0 => None,
            t => Some(self.now_ns().saturating_sub(t - 1)),
        }
    }

    /// The histograms as set now.
    pub fn histograms(&self) -> Histograms {
        self.histograms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the histograms (empty ones start counting from zero).
    pub fn set_histograms(&self, histograms: Histograms) {
        *self.histograms.lock().unwrap_or_else(|e| e.into_inner()) = histograms;
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A request being accounted, from its start to its end.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    kind: Kind,
    bytes: u64,
    /// One past its last byte, for writes.
    end: u64,
    /// ns after the epoch; 0 when untimed.
    at: u64,
}

/// The dataplane's side: its own copy of the histogram settings.
#[derive(Debug)]
pub struct Recorder {
    shared: Arc<BlockStats>,
    generation: u64,
    histograms: Histograms,
}

impl Recorder {
    /// Writes into `shared`.
    pub fn new(shared: Arc<BlockStats>) -> Self {
        Self {
            generation: u64::MAX,
            histograms: Histograms::default(),
            shared,
        }
    }

    /// The counters this writes.
    pub fn shared(&self) -> &Arc<BlockStats> {
        &self.shared
    }

    /// A request of `kind` over `bytes` from `offset` starts.
    pub fn start(&self, kind: Kind, offset: u64, bytes: u64) -> Started {
        Started {
            kind,
            bytes,
            end: offset.saturating_add(bytes),
            at: if self.shared.timed {
                self.shared.now_ns()
            } else {
                0
            },
        }
    }

    /// The request `started` ended, `ok` or with an error.
    pub fn done(&mut self, started: Started, ok: bool) {
        let s = &*self.shared;
        let c = &s.kinds[started.kind as usize];
        if ok {
            bump(&c.operations, 1);
            bump(&c.bytes, started.bytes);
            if started.kind == Kind::Write && started.end > s.wr_highest_offset() {
                s.wr_highest_offset.store(started.end, Ordering::Relaxed);
            }
        } else {
            bump(&c.failed, 1);
        }
        if !s.timed {
            return;
        }
        let now = s.now_ns();
        let latency = now.saturating_sub(started.at);
        bump(&c.total_time_ns, latency);
        s.last_done.store(now + 1, Ordering::Relaxed);
        let generation = s.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.histograms = s.histograms();
            self.generation = generation;
        }
        if let Some(h) = self.histograms.of(started.kind) {
            h.account(latency);
        }
    }

    /// A request of `kind` was refused before it reached the disk.
    pub fn invalid(&self, kind: Kind) {
        bump(&self.shared.kinds[kind as usize].invalid, 1);
    }
}

/// How `req` is accounted: its kind, first byte and bytes; `None` for
/// GET_ID, which QEMU does not account.
pub fn of_request(req: &Request) -> Option<(Kind, u64, u64)> {
    let ranges = |segs: &[Segment]| {
        let start = segs.iter().map(|s| s.offset).min().unwrap_or(0);
        let end = segs.iter().map(|s| s.offset + s.len).max().unwrap_or(0);
        (start, segs.iter().map(|s| s.len).sum::<u64>(), end)
    };
    match &req.kind {
        RequestKind::In => Some((Kind::Read, req.offset, req.data_len)),
        RequestKind::Out => Some((Kind::Write, req.offset, req.data_len)),
        RequestKind::Flush => Some((Kind::Flush, 0, 0)),
        RequestKind::GetId => None,
        RequestKind::Discard(segs) => {
            let (start, bytes, _) = ranges(segs);
            Some((Kind::Unmap, start, bytes))
        }
        // Zeroed ranges may be apart: the highest offset is that of the
        // last, so account the span's start and the bytes zeroed apart.
        RequestKind::WriteZeroes(segs) => {
            let (_, bytes, end) = ranges(segs);
            Some((Kind::Write, end - bytes.min(end), bytes))
        }
    }
}

/// The kind of a refused request of virtio type `request_type`, if it has
/// one QEMU accounts.
pub fn of_type(request_type: u32) -> Option<Kind> {
    match request_type {
        request::T_IN => Some(Kind::Read),
        request::T_OUT | request::T_WRITE_ZEROES => Some(Kind::Write),
        request::T_FLUSH => Some(Kind::Flush),
        request::T_DISCARD => Some(Kind::Unmap),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_count_operations_bytes_failures_and_highest_write() {
        let shared = Arc::new(BlockStats::new(true));
        let mut r = Recorder::new(shared.clone());
        let w = r.start(Kind::Write, 8192, 4096);
        r.done(w, true);
        let w = r.start(Kind::Write, 0, 512);
        r.done(w, true);
        let failed = r.start(Kind::Write, 1 << 20, 512);
        r.done(failed, false);
        let rd = r.start(Kind::Read, 0, 1024);
        r.done(rd, true);
        r.invalid(Kind::Read);
        let f = r.start(Kind::Flush, 0, 0);
        r.done(f, true);
        let wr = shared.kind(Kind::Write);
        assert_eq!((wr.operations, wr.bytes, wr.failed), (2, 4608, 1));
        // A failed write moves nothing on disk, so not the highest offset.
        assert_eq!(shared.wr_highest_offset(), 12288);
        let rd = shared.kind(Kind::Read);
        assert_eq!((rd.operations, rd.bytes, rd.invalid), (1, 1024, 1));
        assert_eq!(shared.kind(Kind::Flush).operations, 1);
        assert!(shared.idle_time_ns().is_some());
    }

    #[test]
    fn untimed_stats_never_read_the_clock_for_requests() {
        let shared = Arc::new(BlockStats::new(false));
        let mut r = Recorder::new(shared.clone());
        shared.set_histograms(Histograms {
            read: Histogram::new(vec![1]).map(Arc::new),
            ..Default::default()
        });
        let rd = r.start(Kind::Read, 0, 512);
        std::thread::sleep(std::time::Duration::from_millis(2));
        r.done(rd, true);
        assert_eq!(shared.kind(Kind::Read).operations, 1);
        assert_eq!(shared.kind(Kind::Read).total_time_ns, 0);
        assert_eq!(shared.idle_time_ns(), None);
        assert_eq!(shared.histograms().read.unwrap().read().1, vec![0, 0]);
    }

    #[test]
    fn histograms_bin_latencies_and_settings_reach_the_writer() {
        assert_eq!(Histogram::new(vec![]).unwrap().read().1, vec![0]);
        assert!(Histogram::new(vec![0, 5]).is_none());
        assert!(Histogram::new(vec![10, 10]).is_none());
        let h = Histogram::new(vec![10, 100]).unwrap();
        for l in [0, 9, 10, 99, 100, 5000] {
            h.account(l);
        }
        assert_eq!(h.read(), (vec![10, 100], vec![2, 2, 2]));

        let shared = Arc::new(BlockStats::new(true));
        let mut r = Recorder::new(shared.clone());
        let rd = r.start(Kind::Read, 0, 512);
        r.done(rd, true);
        // Set after the writer has cached "none": it must see the change.
        shared.set_histograms(Histograms {
            read: Histogram::new(vec![1_000_000_000_000]).map(Arc::new),
            ..Default::default()
        });
        let rd = r.start(Kind::Read, 0, 512);
        r.done(rd, true);
        let (_, bins) = shared.histograms().read.unwrap().read();
        assert_eq!(bins, vec![1, 0]);
        assert!(shared.histograms().write.is_none());
    }
}
