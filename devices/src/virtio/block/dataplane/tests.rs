//! A hostile driver against the dataplane: requests laid out in real guest
//! memory by virtio-queue's mock, served by `service()` on this thread (or
//! by `run()` on one of ours), with engines whose completions the test
//! controls.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{AsyncIo, Completion, IoError, NullIo};
use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::{ActiveQueue, F_VERSION_1};

const SIZE: u16 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// What the test engine has been given and may complete.
#[derive(Default)]
struct HeldState {
    /// Queued, not yet handed over by `submit`.
    queued: Vec<Completion>,
    /// Handed over; completed once `complete` is set.
    submitted: Vec<Completion>,
    /// How many more `submit` calls are refused as the kernel's EBUSY
    /// would be (operations stay queued).
    busy: u32,
    complete: bool,
    /// How many operations each `submit` that had any handed over.
    batches: Vec<usize>,
}

/// An engine whose operations complete only when the test says so.
struct Held {
    state: Arc<Mutex<HeldState>>,
    notifier: EventFd,
}

impl Held {
    fn new(busy: u32, complete: bool) -> (Self, Arc<Mutex<HeldState>>) {
        let state = Arc::new(Mutex::new(HeldState {
            busy,
            complete,
            ..HeldState::default()
        }));
        let engine = Self {
            state: state.clone(),
            notifier: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        (engine, state)
    }

    fn queue(&mut self, user_data: u64, result: i32) -> Result<(), IoError> {
        let done = Completion { user_data, result };
        self.state.lock().unwrap().queued.push(done);
        Ok(())
    }
}

fn total(iovecs: &[libc::iovec]) -> i32 {
    iovecs.iter().map(|v| v.iov_len as i32).sum()
}

impl AsyncIo for Held {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }
    unsafe fn read_vectored(
        &mut self,
        _: u64,
        iov: &[libc::iovec],
        tag: u64,
    ) -> Result<(), IoError> {
        self.queue(tag, total(iov))
    }
    unsafe fn write_vectored(
        &mut self,
        _: u64,
        iov: &[libc::iovec],
        tag: u64,
    ) -> Result<(), IoError> {
        self.queue(tag, total(iov))
    }
    fn flush(&mut self, tag: u64) -> Result<(), IoError> {
        self.queue(tag, 0)
    }
    fn punch_hole(&mut self, _: u64, _: u64, tag: u64) -> Result<(), IoError> {
        self.queue(tag, 0)
    }
    fn write_zeroes(&mut self, _: u64, _: u64, tag: u64) -> Result<(), IoError> {
        self.queue(tag, 0)
    }
    fn submit(&mut self) -> Result<(), IoError> {
        let mut s = self.state.lock().unwrap();
        if s.busy > 0 {
            s.busy -= 1;
            return Ok(());
        }
        let queued = std::mem::take(&mut s.queued);
        if !queued.is_empty() {
            s.batches.push(queued.len());
        }
        s.submitted.extend(queued);
        if s.complete && !s.submitted.is_empty() {
            let _ = self.notifier.write(1);
        }
        Ok(())
    }
    fn next_completion(&mut self) -> Option<Completion> {
        let mut s = self.state.lock().unwrap();
        if s.complete && !s.submitted.is_empty() {
            Some(s.submitted.remove(0))
        } else {
            None
        }
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn limits() -> DiskLimits {
    DiskLimits {
        capacity: 2048,
        read_only: false,
        max_segments: 8,
        discard: true,
        write_zeroes: true,
    }
}

fn header(mem: &GuestMemoryMmap, at: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Writes DISCARD / WRITE_ZEROES segments (sector, sectors, flags) at `at`.
fn segments(mem: &GuestMemoryMmap, at: u64, segs: &[(u64, u32, u32)]) {
    let mut raw = Vec::new();
    for (sector, sectors, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&sectors.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// A driver's view of one queue: its descriptor table and rings.
struct Driver<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    avail: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with_size(mem, SIZE)
    }

    fn with_size(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self {
            mock: MockSplitQueue::new(mem, size),
            avail: 0,
            size,
        }
    }

    /// Writes descriptors from `first` on, chained in order.
    fn chain(&self, first: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let at = first + i as u16;
            let more = i + 1 < descs.len();
            let flags = if more { flags | NEXT } else { flags };
            let d = SplitDescriptor::new(addr, len, flags, if more { at + 1 } else { 0 });
            self.mock
                .desc_table()
                .store(at, RawDescriptor::from(d))
                .unwrap();
        }
    }

    /// Makes `head` available (the avail index moves by one).
    fn post(&mut self, head: u16) {
        let ring = self.mock.avail().ring();
        ring.ref_at(usize::from(self.avail % self.size))
            .unwrap()
            .store(u16::to_le(head));
        self.avail = self.avail.wrapping_add(1);
        self.set_avail_idx(self.avail);
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mock.avail().idx().store(u16::to_le(idx));
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(self.mock.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// (id, len) of used element `i`.
    fn used(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.mock.used_addr().unchecked_add(4 + 8 * u64::from(i));
        (
            mem.read_obj(at).unwrap(),
            mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }
}

/// A dataplane over the driver's queue, and its interrupt and stop signal.
fn dataplane(
    mem: &GuestMemoryMmap,
    driver: &Driver,
    engine: Box<dyn AsyncIo>,
) -> (Dataplane, Arc<Interrupt>, Arc<StopSignal>) {
    let (make, interrupt, stop) = later(mem, driver, engine);
    (make(), interrupt, stop)
}

/// As [`dataplane`], built by the returned function on whichever thread
/// calls it (a dataplane holds raw iovecs: it is not `Send`).
fn later(
    mem: &GuestMemoryMmap,
    driver: &Driver,
    engine: Box<dyn AsyncIo>,
) -> (
    impl FnOnce() -> Dataplane + Send + 'static,
    Arc<Interrupt>,
    Arc<StopSignal>,
) {
    let mut queue: virtio_queue::Queue = driver.mock.create_queue().unwrap();
    queue.set_event_idx(false);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let stop = Arc::new(StopSignal::new().unwrap());
    let activation = Activation {
        mem: mem.clone(),
        queues: vec![ActiveQueue {
            index: 0,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }],
        interrupt: interrupt.clone(),
        acked_features: F_VERSION_1,
        dirty: Arc::new(crate::dirty::DirtyPages::new(0)),
    };
    let mut id = [0u8; request::ID_BYTES as usize];
    id[..4].copy_from_slice(b"SN-1");
    let stop_for_thread = stop.clone();
    let make = move || {
        Dataplane::new(
            "vdt".into(),
            activation,
            engine,
            limits(),
            id,
            Duration::ZERO,
            stop_for_thread,
        )
    };
    (make, interrupt, stop)
}

fn null() -> Box<dyn AsyncIo> {
    Box::new(NullIo::new().unwrap())
}

#[test]
fn a_status_the_device_cannot_write_puts_the_device_in_needs_reset() {
    let m = mem();
    let driver = Driver::new(&m);
    header(&m, HDR, T_IN, 0);
    // A read whose status is not device-writable...
    driver.chain(0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, 0)]);
    // ...and a write with nothing device-writable at all.
    header(&m, HDR + 16, T_OUT, 0);
    driver.chain(3, &[(HDR + 16, 16, 0), (DATA, 512, 0), (STATUS, 1, 0)]);
    for head in [0, 3] {
        let mut driver = Driver::new(&m);
        driver.post(head);
        m.write_obj(0u8, GuestAddress(STATUS)).unwrap();
        let (mut dp, interrupt, _) = dataplane(&m, &driver, null());
        dp.service();
        assert!(interrupt.is_broken(), "head {head}: not DEVICE_NEEDS_RESET");
        assert_eq!(driver.used_idx(&m), 0, "head {head} was returned as served");
    }
}

#[test]
fn a_corrupt_avail_index_stops_the_dataplane_polling() {
    let m = mem();
    let driver = Driver::new(&m);
    driver.set_avail_idx(1000);
    let (make, interrupt, stop) = later(&m, &driver, null());
    let (tid_tx, tid_rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        make().run().queues.len()
    });
    let tid = tid_rx.recv().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !interrupt.is_broken() {
        assert!(
            Instant::now() < deadline,
            "the corrupt index went unnoticed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // CPU time (user + system, in clock ticks) of the dataplane thread.
    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_millis(50));
    let before = cpu();
    std::thread::sleep(Duration::from_millis(1000));
    let used = cpu() - before;
    assert!(
        used <= 2,
        "the dataplane used {used} ticks of CPU in 1 s after DEVICE_NEEDS_RESET"
    );
    stop.request().unwrap();
    assert_eq!(thread.join().unwrap(), 1);
}

/// Posts eight flushes, two descriptors each: they fill the table.
fn post_eight_flushes(m: &GuestMemoryMmap, driver: &mut Driver) {
    for k in 0..8u16 {
        let hdr = HDR + 16 * u64::from(k);
        header(m, hdr, T_FLUSH, 0);
        driver.chain(2 * k, &[(hdr, 16, 0), (STATUS + u64::from(k), 1, W)]);
        driver.post(2 * k);
    }
}

#[test]
fn requests_in_flight_are_capped_at_the_queue_size() {
    let m = mem();
    let mut driver = Driver::new(&m);
    post_eight_flushes(&m, &mut driver);
    let (engine, _) = Held::new(0, false);
    let (mut dp, interrupt, _) = dataplane(&m, &driver, Box::new(engine));
    dp.service();
    assert_eq!(dp.in_flight(), 8);
    assert!(!interrupt.is_broken());

    // Head 0 again while it is still in flight.
    driver.post(0);
    dp.service();
    assert!(interrupt.is_broken(), "a head posted twice went unnoticed");
    assert_eq!(dp.in_flight(), 8, "the re-posted head was started");

    // The avail index more than the queue size ahead of the used one
    // (but not of the device's own next index, which virtio-queue checks).
    let mut driver = Driver::new(&m);
    for k in 0..8u16 {
        driver.post(2 * k);
    }
    let (engine, _) = Held::new(0, false);
    let (mut dp, interrupt, _) = dataplane(&m, &driver, Box::new(engine));
    dp.service();
    assert_eq!(dp.in_flight(), 8);
    driver.set_avail_idx(8 + SIZE);
    dp.service();
    assert!(
        interrupt.is_broken(),
        "avail idx 24 with used idx 0 went unnoticed"
    );
    assert_eq!(dp.in_flight(), 8);
}

#[test]
fn a_round_of_requests_reaches_the_engine_in_batches_of_submit_batch() {
    let m = mem();
    let mut driver = Driver::new(&m);
    post_eight_flushes(&m, &mut driver);
    for (batch, want) in [
        (0, vec![8]),
        (1, vec![1; 8]),
        (3, vec![3, 3, 2]),
        (8, vec![8]),
    ] {
        let (engine, state) = Held::new(0, false);
        let (dp, interrupt, _) = dataplane(&m, &driver, Box::new(engine));
        let mut dp = dp.with_submit_batch(batch);
        dp.service();
        assert_eq!(state.lock().unwrap().batches, want, "submit-batch={batch}");
        // Every request still completes, once, in the used ring.
        state.lock().unwrap().complete = true;
        dp.service();
        assert_eq!(dp.in_flight(), 0, "submit-batch={batch}");
        assert_eq!(driver.used_idx(&m), 8, "submit-batch={batch}");
        assert!(!interrupt.is_broken());
        // The next dataplane starts from a fresh used ring.
        m.write_obj(0u16, driver.mock.used_addr().unchecked_add(2))
            .unwrap();
    }
}

#[test]
fn huge_sectors_in_any_request_type_are_answered_not_a_panic() {
    let m = mem();
    segments(&m, DATA, &[(1 << 60, 8, 0)]);
    for (kind, data_flags, want) in [
        (T_FLUSH, 0, status::OK),
        (T_GET_ID, W, status::OK),
        (T_DISCARD, 0, status::IOERR),
        (T_WRITE_ZEROES, 0, status::IOERR),
        (T_IN, W, status::IOERR),
    ] {
        let mut driver = Driver::new(&m);
        header(&m, HDR, kind, 1 << 60);
        let len = if kind == T_FLUSH { 0 } else { 512 };
        driver.chain(
            0,
            &[(HDR, 16, 0), (DATA + 4096, len, data_flags), (STATUS, 1, W)],
        );
        if matches!(kind, T_DISCARD | T_WRITE_ZEROES) {
            driver.chain(0, &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)]);
        }
        driver.post(0);
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (mut dp, interrupt, _) = dataplane(&m, &driver, null());
        dp.service();
        assert!(!interrupt.is_broken(), "type {kind}");
        assert_eq!(driver.used_idx(&m), 1, "type {kind}");
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            want,
            "type {kind}"
        );
    }
}

#[test]
fn requests_are_accounted_by_kind_and_refusals_as_invalid() {
    let m = mem();
    segments(&m, DATA, &[(1 << 60, 8, 0)]);
    let stats = Arc::new(BlockStats::new(true));
    // (type, sector, data length, data flags)
    for (kind, sector, len, flags) in [
        (T_IN, 1 << 60, 512, W),
        (T_DISCARD, 0, 16, 0),
        (T_WRITE_ZEROES, 0, 16, 0),
        (T_IN, 8, 1024, W),
        (T_OUT, 2040, 4096, 0),
        (T_FLUSH, 0, 0, 0),
        (T_GET_ID, 0, 512, W),
    ] {
        let mut driver = Driver::new(&m);
        header(&m, HDR, kind, sector);
        let data = if kind == T_IN || kind == T_OUT {
            DATA + 4096
        } else {
            DATA
        };
        driver.chain(0, &[(HDR, 16, 0), (data, len, flags), (STATUS, 1, W)]);
        driver.post(0);
        let (dp, _, _) = dataplane(&m, &driver, null());
        let mut dp = dp.with_stats(stats.clone());
        dp.service();
        assert!(dp.drain(), "type {kind}");
        assert_eq!(driver.used_idx(&m), 1, "type {kind}");
    }
    let get = |k| stats.kind(k);
    use super::stats::Kind;
    assert_eq!(get(Kind::Read).invalid, 1);
    assert_eq!(get(Kind::Unmap).invalid, 1);
    assert_eq!(get(Kind::Write).invalid, 1);
    assert_eq!(
        (get(Kind::Read).operations, get(Kind::Read).bytes),
        (1, 1024)
    );
    assert_eq!(
        (get(Kind::Write).operations, get(Kind::Write).bytes),
        (1, 4096)
    );
    assert_eq!(get(Kind::Flush).operations, 1);
    // The write ends at the last byte of the 1 MiB disk.
    assert_eq!(stats.wr_highest_offset(), 1 << 20);
}

/// The dirty extents of bitmap `b`.
fn dirty(bitmaps: &block::bitmap::Bitmaps) -> Vec<(u64, u64)> {
    bitmaps.snapshot("b").unwrap().extents().collect()
}

#[test]
fn writes_zeroes_and_discards_are_marked_when_they_complete_reads_never() {
    let m = mem();
    let bitmaps = Arc::new(block::bitmap::Bitmaps::new());
    // 512-byte granules over the 1 MiB disk: exact ranges.
    bitmaps.add("b", 1 << 20, 512, false, false).unwrap();
    let (engine, state) = Held::new(0, false);
    let mut driver = Driver::new(&m);
    let (dp, _, _) = dataplane(&m, &driver, Box::new(engine));
    let mut dp = dp.with_bitmaps(bitmaps.clone());
    // (type, sector, data address, data length, data flags), each its own
    // three descriptors.
    segments(&m, DATA, &[(100, 2, 0), (300, 1, 0)]);
    segments(&m, DATA + 64, &[(500, 4, 1)]);
    let requests = [
        (T_OUT, 8, DATA + 4096, 1024, 0),
        (T_IN, 40, DATA + 8192, 512, W),
        (T_DISCARD, 0, DATA, 32, 0),
        (T_WRITE_ZEROES, 0, DATA + 64, 16, 0),
    ];
    for (i, &(kind, sector, data, len, flags)) in requests.iter().enumerate() {
        let at = HDR + 64 * i as u64;
        header(&m, at, kind, sector);
        let head = 3 * i as u16;
        driver.chain(
            head,
            &[(at, 16, 0), (data, len, flags), (STATUS + i as u64, 1, W)],
        );
        driver.post(head);
    }
    dp.service();
    assert_eq!(state.lock().unwrap().submitted.len(), 5, "all submitted");
    assert_eq!(dirty(&bitmaps), [], "nothing marked before it lands");
    state.lock().unwrap().complete = true;
    assert!(dp.drain());
    assert_eq!(driver.used_idx(&m), 4);
    assert_eq!(
        dirty(&bitmaps),
        [
            (8 * 512, 1024),
            (100 * 512, 1024),
            (300 * 512, 512),
            (500 * 512, 2048)
        ],
        "the read at sector 40 is not marked"
    );
}

#[test]
fn a_bitmap_added_while_a_write_is_in_flight_records_it() {
    let m = mem();
    let bitmaps = Arc::new(block::bitmap::Bitmaps::new());
    let (engine, state) = Held::new(0, false);
    let mut driver = Driver::new(&m);
    let (dp, _, _) = dataplane(&m, &driver, Box::new(engine));
    let mut dp = dp.with_bitmaps(bitmaps.clone());
    header(&m, HDR, T_OUT, 16);
    driver.chain(0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    driver.post(0);
    dp.service();
    bitmaps.add("b", 1 << 20, 512, false, false).unwrap();
    state.lock().unwrap().complete = true;
    assert!(dp.drain());
    assert_eq!(dirty(&bitmaps), [(16 * 512, 512)]);
}

#[test]
fn a_merged_data_and_status_descriptor_is_served_in_full() {
    let m = mem();
    let mut driver = Driver::new(&m);
    header(&m, HDR, T_IN, 0);
    m.write_slice(&[0xaa; 1024], GuestAddress(DATA)).unwrap();
    // Data and status in one descriptor: 512 bytes of data, then status.
    driver.chain(0, &[(HDR, 16, 0), (DATA, 513, W)]);
    driver.post(0);
    let (mut dp, interrupt, _) = dataplane(&m, &driver, null());
    dp.service();
    assert!(!interrupt.is_broken());
    assert_eq!(
        driver.used(&m, 0),
        (0, 513),
        "512 bytes read plus the status"
    );
    let mut back = [0u8; 513];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(
        back[..512].iter().all(|&b| b == 0),
        "the null engine reads zeros"
    );
    assert_eq!(back[512], status::OK);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 513)).unwrap(), 0xaa);
}

/// Starts `dp` with one read in flight, asks it to stop, and waits up to
/// `wait` for `run` to return.
fn stop_with_a_read_in_flight(
    m: &GuestMemoryMmap,
    engine: Held,
    drain_deadline: Duration,
    wait: Duration,
) -> (Option<bool>, Arc<Interrupt>, u16) {
    let mut driver = Driver::new(m);
    header(m, HDR, T_IN, 0);
    driver.chain(0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
    driver.post(0);
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let (make, interrupt, stop) = later(m, &driver, Box::new(engine));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut dp = make();
        dp.drain_deadline = drain_deadline;
        dp.service();
        assert_eq!(dp.in_flight(), 1);
        stop.request().unwrap();
        let stopped = dp.run();
        let _ = tx.send(stopped.drained);
    });
    let stopped = rx.recv_timeout(wait).ok();
    (stopped, interrupt, driver.used_idx(m))
}

#[test]
fn a_drain_that_cannot_end_gives_up_and_keeps_what_the_io_may_touch() {
    let m = mem();
    let (engine, _) = Held::new(0, false);
    let started = Instant::now();
    let (stopped, interrupt, used) = stop_with_a_read_in_flight(
        &m,
        engine,
        Duration::from_millis(300),
        Duration::from_secs(10),
    );
    let drained = stopped.expect("the drain never ended");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!drained, "a stuck read was reported drained");
    assert!(
        interrupt.is_broken(),
        "the device is not in DEVICE_NEEDS_RESET"
    );
    assert_eq!(used, 0, "the stuck read was returned as served");
}

#[test]
fn a_drain_resubmits_what_the_engine_refused() {
    let m = mem();
    // The engine refuses three submissions, as io_uring does with EBUSY
    // while its completion queue is full, then takes them.
    let (engine, _) = Held::new(3, true);
    let (stopped, interrupt, used) =
        stop_with_a_read_in_flight(&m, engine, DRAIN_DEADLINE, Duration::from_secs(10));
    let drained = stopped.expect("the drain never ended");
    assert!(drained);
    assert!(!interrupt.is_broken());
    assert_eq!(used, 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), status::OK);
}

fn any_descriptor() -> impl Strategy<Value = (u64, u32, u16)> {
    let addr = prop_oneof![
        Just(HDR),
        Just(DATA),
        Just(STATUS),
        0u64..(4 << 20),
        any::<u64>()
    ];
    let len = prop_oneof![
        Just(16u32),
        Just(1),
        Just(512),
        Just(513),
        0u32..4096,
        any::<u32>()
    ];
    let flags = prop_oneof![Just(0u16), Just(W)];
    (addr, len, flags)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    /// Random headers and segments: parsing and starting never panics, and
    /// every request is either answered or sends the device to NEEDS_RESET.
    #[test]
    fn any_header_and_segments_are_parsed_and_started_without_a_panic(
        req_type in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), Just(T_DISCARD), Just(T_WRITE_ZEROES), any::<u32>()],
        sector in prop_oneof![0u64..4096, Just(1u64 << 55), Just(u64::MAX), any::<u64>()],
        segments in proptest::collection::vec((any::<u64>(), any::<u32>(), any::<u32>()), 0..4),
        descs in proptest::collection::vec(any_descriptor(), 1..6),
    ) {
        let m = mem();
        header(&m, HDR, req_type, sector);
        self::segments(&m, DATA, &segments);
        let mut driver = Driver::new(&m);
        let mut chain = vec![(HDR, 16, 0)];
        chain.extend(descs);
        driver.chain(0, &chain);
        driver.post(0);
        let (mut dp, interrupt, _) = dataplane(&m, &driver, null());
        dp.service();
        prop_assert!(interrupt.is_broken() || driver.used_idx(&m) == 1);
    }
}

#[test]
fn batches_grow_to_an_eighth_of_what_the_disk_already_has() {
    // An idle or lightly loaded disk gets requests as soon as
    // submit-batch of them are taken.
    for at_host in [0, 1, 31, 32, 39] {
        assert_eq!(batch_limit(4, at_host), 4, "{at_host} at the host");
    }
    assert_eq!(batch_limit(1, 7), 1);
    assert_eq!(batch_limit(1, 8), 1);
    assert_eq!(batch_limit(1, 16), 2);
    // A deep queue: fewer, larger calls.
    assert_eq!(batch_limit(4, 40), 5);
    assert_eq!(batch_limit(4, 120), 15);
    assert_eq!(batch_limit(4, 1024), 128);
    assert_eq!(batch_limit(64, 128), 64);
}

#[test]
fn a_disk_with_many_requests_in_flight_gets_the_next_in_larger_batches() {
    let m = mem();
    let mut driver = Driver::with_size(&m, 64);
    for k in 0..32u16 {
        let hdr = HDR + 16 * u64::from(k);
        header(&m, hdr, T_FLUSH, 0);
        driver.chain(2 * k, &[(hdr, 16, 0), (STATUS + u64::from(k), 1, W)]);
    }
    let (engine, state) = Held::new(0, false);
    let (dp, interrupt, _) = dataplane(&m, &driver, Box::new(engine));
    let mut dp = dp.with_submit_batch(1);
    // The first 16 find at most 15 at the host: one a call.
    for k in 0..16 {
        driver.post(2 * k);
    }
    dp.service();
    assert_eq!(
        std::mem::take(&mut state.lock().unwrap().batches),
        vec![1; 16]
    );
    // The next 16 find 16 to 30 there: twos, then threes from 24 on,
    // and what is left at the round's end.
    for k in 16..32 {
        driver.post(2 * k);
    }
    dp.service();
    assert_eq!(
        state.lock().unwrap().batches,
        vec![2, 2, 2, 2, 3, 3, 2],
        "batches with 16 or more at the host"
    );
    state.lock().unwrap().complete = true;
    dp.service();
    assert_eq!(dp.in_flight(), 0);
    assert_eq!(driver.used_idx(&m), 32);
    assert!(!interrupt.is_broken());
}
