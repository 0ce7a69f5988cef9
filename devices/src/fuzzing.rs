//! Entry points for the fuzz targets in `fuzz/` and for the test that
//! replays their corpus (`devices/tests/fuzz_corpus.rs`). Each takes
//! arbitrary bytes and must never panic, hang, or touch memory outside
//! guest RAM, whatever they hold.
//!
//! Guest RAM is two adjacent regions (a buffer may try to run from one
//! into the next), each its own host mapping with an inaccessible page on
//! either side, so a buffer the device wrongly takes past a region's end
//! faults at once instead of landing in some other host memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::graph::{DriverOptions, NodeOptions};
use block::{AsyncIo, Completion, Graph, IoError};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::virtio::block::dataplane::{Dataplane, StopSignal};
use crate::virtio::block::request::{DiskLimits, ID_BYTES, SECTOR_SIZE, T_IN, T_OUT};
use crate::virtio::block::stats::BlockStats;
use crate::virtio::block::{device_holder, Block, BlockConfig};
use crate::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::virtio::{Activation, ActiveQueue, Interrupt, F_VERSION_1};

/// Guest RAM: (guest address, bytes) of each region.
const REGIONS: [(u64, usize); 2] = [(0, 0x8_0000), (0x8_0000, 0x8_0000)];
const PAGE: usize = 4096;

/// Guest RAM whose regions each have a guard page on either side.
struct GuardedRam {
    mem: GuestMemoryMmap,
    /// Our own reference to each region, to tell when no one else has one.
    regions: Vec<Arc<GuestRegionMmap>>,
    /// Each host mapping (start, bytes), guard pages included.
    mappings: Vec<(usize, usize)>,
}

impl GuardedRam {
    fn new() -> Self {
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (start, len) in REGIONS {
            let total = len + 2 * PAGE;
            // SAFETY: a fresh anonymous mapping that nothing else refers to.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    total,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED, "cannot map guest RAM");
            mappings.push((base as usize, total));
            // SAFETY: `ram..ram + len` lies inside the mapping just made,
            // one page from either end.
            let ram = unsafe { base.cast::<u8>().add(PAGE) };
            // SAFETY: as above; only our own mapping changes protection.
            let rc = unsafe { libc::mprotect(ram.cast(), len, libc::PROT_READ | libc::PROT_WRITE) };
            assert_eq!(rc, 0, "cannot make guest RAM accessible");
            // SAFETY: `ram` is `len` readable, writable bytes that stay
            // mapped until `close` has seen every other user of the region
            // gone (or forever, when that check fails).
            let region = unsafe {
                MmapRegion::build_raw(
                    ram,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("a guest RAM region");
            let region = GuestRegionMmap::new(region, GuestAddress(start)).expect("a guest region");
            regions.push(Arc::new(region));
        }
        let mem = GuestMemoryMmap::from_arc_regions(regions.clone()).expect("guest RAM");
        Self {
            mem,
            regions,
            mappings,
        }
    }

    /// Host (start, end) of each region's accessible bytes.
    fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.mappings
            .iter()
            .map(|&(base, total)| (base + PAGE, base + total - PAGE))
            .collect()
    }

    /// Unmaps guest RAM; every other user of it must be gone by now.
    fn close(mut self) {
        self.mem = GuestMemoryMmap::default();
        let users = self
            .regions
            .iter()
            .map(|r| Arc::strong_count(r) - 1)
            .max()
            .unwrap_or(0);
        assert_eq!(
            users, 0,
            "guest RAM is still referenced after the device stopped (a dataplane that did not drain)"
        );
        self.regions.clear();
        for (base, total) in std::mem::take(&mut self.mappings) {
            // SAFETY: our own mapping, whose only users are gone (above).
            unsafe { libc::munmap(base as *mut libc::c_void, total) };
        }
    }
}

// On a failed check `close` is not reached: the mappings stay, so nothing
// that might still point into them can fault or write elsewhere.

/// An engine over an in-memory disk that checks what the dataplane hands
/// it: every iovec inside guest RAM, every range inside the disk.
struct RamDisk {
    disk: Vec<u8>,
    ram: Vec<(usize, usize)>,
    done: VecDeque<Completion>,
    /// While set, completions are held back, so requests stay in flight.
    held: Arc<AtomicBool>,
    notifier: EventFd,
}

impl RamDisk {
    fn check_iovecs(&self, iovecs: &[libc::iovec]) -> usize {
        let mut total = 0usize;
        for v in iovecs {
            let start = v.iov_base as usize;
            let end = start.checked_add(v.iov_len);
            assert!(
                end.is_some_and(|end| self.ram.iter().any(|&(s, e)| s <= start && end <= e)),
                "an iovec of {} bytes at {start:#x} leaves guest RAM {:x?}",
                v.iov_len,
                self.ram
            );
            total += v.iov_len;
        }
        total
    }

    fn check_range(&self, offset: u64, len: u64) -> usize {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= self.disk.len() as u64),
            "an operation of {len} bytes at {offset} reaches past the {}-byte disk",
            self.disk.len()
        );
        offset as usize
    }

    /// Copies between the disk at `offset` and `iovecs`, into guest
    /// memory when `to_guest`, after checking both sides.
    fn copy(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
        to_guest: bool,
    ) -> Result<(), IoError> {
        let total = self.check_iovecs(iovecs);
        let mut at = self.check_range(offset, total as u64);
        for v in iovecs {
            let guest = v.iov_base.cast::<u8>();
            let disk = self.disk[at..].as_mut_ptr();
            let (from, to) = if to_guest {
                (disk.cast_const(), guest)
            } else {
                (guest.cast_const(), disk)
            };
            // SAFETY: the iovec was checked above to lie inside guest RAM's
            // mappings; the disk holds `v.iov_len` bytes from `at` (range
            // checked); a disk on the heap never overlaps guest RAM.
            unsafe { std::ptr::copy_nonoverlapping(from, to, v.iov_len) };
            at += v.iov_len;
        }
        self.complete(user_data, total)
    }

    fn complete(&mut self, user_data: u64, result: usize) -> Result<(), IoError> {
        let result = i32::try_from(result).expect("a request is at most 16 MiB");
        self.done.push_back(Completion { user_data, result });
        Ok(())
    }
}

impl AsyncIo for RamDisk {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        self.copy(offset, iovecs, user_data, true)
    }

    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        self.copy(offset, iovecs, user_data, false)
    }

    fn flush(&mut self, user_data: u64) -> Result<(), IoError> {
        self.complete(user_data, 0)
    }

    fn punch_hole(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        let at = self.check_range(offset, len);
        self.disk[at..at + len as usize].fill(0);
        self.complete(user_data, 0)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        self.punch_hole(offset, len, user_data)
    }

    fn submit(&mut self) -> Result<(), IoError> {
        if !self.done.is_empty() && !self.held.load(Ordering::Relaxed) {
            self.notifier.write(1).map_err(IoError::Submit)?;
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        if self.held.load(Ordering::Relaxed) {
            return None;
        }
        self.done.pop_front()
    }
}

// Where the request target lays out its queue.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// The end of what the rings of a queue of at most `MAX_SIZE` occupy.
const RINGS_END: u64 = USED + 6 + 8 * MAX_SIZE as u64;
/// Where the input's tail goes: just below the second region, so that
/// requests may place buffers on either side of the boundary.
const DATA: u64 = 0x7_f000;
const DATA_MAX: usize = 0x2000;
const MAX_SIZE: u16 = 16;
/// config, start index, two batch sizes, avail flags, used_event.
const FIXED: usize = 9;
const PREFIX: usize = FIXED + 2 * MAX_SIZE as usize + 16 * MAX_SIZE as usize;
const DISK_BYTES: usize = 64 << 10;

/// The virtio-blk request parser and dataplane over a split virtqueue whose
/// every byte comes from `data`, served on this thread by the real
/// [`Dataplane`] over an in-memory disk.
///
/// `data` is, in order: a config byte (bits 0-2: log2 of the queue size,
/// at most 16; 3: EVENT_IDX; 4: read-only disk; 5: DISCARD and
/// WRITE_ZEROES offered; 6: completions held until the end, with a second
/// batch posted while the first is in flight; 7: two segments at most), the
/// starting ring index (u16), the first and second batch sizes (u8 each),
/// the avail ring's flags and used_event (u16 each), 16 avail ring entries
/// (u16), 16 raw descriptors (addr u64, len u32, flags u16, next u16), all
/// little endian; the rest goes into guest RAM at 0x7f000 (headers,
/// indirect tables, segments), the second region starting at 0x80000.
///
/// Checks: no iovec outside guest RAM, no disk range outside the disk, the
/// dataplane drains; unless a device-writable buffer overlaps the rings:
/// every used length fits the chain's writable bytes, and a device not in
/// DEVICE_NEEDS_RESET has answered every request posted.
pub fn virtio_blk_request(data: &[u8]) {
    let mut prefix = [0u8; PREFIX];
    let n = data.len().min(PREFIX);
    prefix[..n].copy_from_slice(&data[..n]);
    let tail = data.get(PREFIX..).unwrap_or_default();
    let tail = &tail[..tail.len().min(DATA_MAX)];
    let u16_at = |at: usize| u16::from_le_bytes([prefix[at], prefix[at + 1]]);

    let config = prefix[0];
    let size: u16 = 1 << (config & 7).min(4);
    let event_idx = config & 0x08 != 0;
    let read_only = config & 0x10 != 0;
    let offered = config & 0x20 != 0 && !read_only;
    let hold = config & 0x40 != 0;
    let start = u16_at(1);
    let (first, second) = (u16::from(prefix[3]), u16::from(prefix[4]));

    let ram = GuardedRam::new();
    let mem = &ram.mem;
    let put = |bytes: &[u8], at: u64| mem.write_slice(bytes, GuestAddress(at)).expect("in RAM");
    let table = &prefix[FIXED + 2 * usize::from(MAX_SIZE)..];
    put(&table[..16 * usize::from(size)], DESC);
    put(&prefix[5..7], AVAIL);
    put(&start.wrapping_add(first).to_le_bytes(), AVAIL + 2);
    put(&prefix[FIXED..FIXED + 2 * usize::from(size)], AVAIL + 4);
    put(&prefix[7..9], AVAIL + 4 + 2 * u64::from(size));
    put(&start.to_le_bytes(), USED + 2);
    put(tail, DATA);

    let mut queue = Queue::new(MAX_SIZE).expect("a valid size");
    queue.try_set_size(size).expect("a power of two");
    queue
        .try_set_desc_table_address(GuestAddress(DESC))
        .expect("aligned");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("aligned");
    queue
        .try_set_used_ring_address(GuestAddress(USED))
        .expect("aligned");
    queue.set_ready(true);
    queue.set_event_idx(event_idx);
    queue.set_next_avail(start);
    queue.set_next_used(start);
    assert!(queue.is_valid(mem));

    let interrupt = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    let held = Arc::new(AtomicBool::new(hold));
    let engine = RamDisk {
        disk: vec![0; DISK_BYTES],
        ram: ram.host_ranges(),
        done: VecDeque::new(),
        held: held.clone(),
        notifier: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    };
    let limits = DiskLimits {
        capacity: DISK_BYTES as u64 / SECTOR_SIZE,
        read_only,
        max_segments: if config & 0x80 != 0 {
            2
        } else {
            u32::from(size.saturating_sub(2).max(1))
        },
        discard: offered,
        write_zeroes: offered,
    };
    let mut features = F_VERSION_1;
    if event_idx {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let activation = Activation {
        mem: mem.clone(),
        queues: vec![ActiveQueue {
            index: 0,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }],
        interrupt: interrupt.clone(),
        acked_features: features,
        dirty: Arc::new(crate::dirty::DirtyPages::new(0)),
    };
    let mut id = [0u8; ID_BYTES as usize];
    id[..4].copy_from_slice(b"FUZZ");
    let stop = Arc::new(StopSignal::new().expect("eventfd"));
    let mut dataplane = Dataplane::new(
        "fuzz".into(),
        activation,
        Box::new(engine),
        limits,
        id,
        Duration::ZERO,
        stop,
    );

    let (mut bounds, mut rings_writable) = writable_bounds(mem, size);
    dataplane.service();
    let mut posted = first;
    if hold {
        // A second batch while the first is still in flight: heads posted
        // again must put the device in NEEDS_RESET, not be served twice.
        posted += second;
        put(&start.wrapping_add(posted).to_le_bytes(), AVAIL + 2);
        let (again, writable) = writable_bounds(mem, size);
        for (b, a) in bounds.iter_mut().zip(again) {
            *b = (*b).max(a);
        }
        rings_writable |= writable;
        dataplane.service();
        held.store(false, Ordering::Relaxed);
    }
    let stopped = dataplane.end();
    assert!(stopped.drained, "the dataplane did not drain its engine");
    drop(stopped);

    // A driver that lets the device write into its rings gets what it
    // asked for; there is nothing to check then.
    if !rings_writable {
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("in RAM");
        let served = used_idx.wrapping_sub(start);
        assert!(
            served <= posted,
            "{served} requests answered of {posted} posted"
        );
        if !interrupt.is_broken() {
            assert_eq!(
                served, posted,
                "a device not in NEEDS_RESET left requests unanswered"
            );
        }
        for k in 0..served.min(size) {
            let slot = start.wrapping_add(k) % size;
            let at = GuestAddress(USED + 4 + 8 * u64::from(slot));
            let id: u32 = mem.read_obj(at).expect("in RAM");
            let len: u32 = mem.read_obj(GuestAddress(at.0 + 4)).expect("in RAM");
            assert!(id < u32::from(size), "used id {id} is not a head");
            assert!(
                u64::from(len) <= bounds[id as usize],
                "used length {len} of head {id} is more than its {} writable bytes",
                bounds[id as usize]
            );
        }
    }
    ram.close();
}

// Where `Bursts` lays out its queue and requests.
const B_DESC: u64 = 0x1_0000;
const B_AVAIL: u64 = 0x1_4000;
const B_USED: u64 = 0x1_5000;
const B_HEADERS: u64 = 0x1_8000;
const B_STATUS: u64 = 0x1_9000;
const B_DATA: u64 = 0x2_0000;
const B_QUEUE: u16 = 1024;

/// The dataplane served on the calling thread over one split queue and an
/// in-memory disk, fed bursts of reads and writes: for tests of what the
/// request path costs (`devices/tests/no_alloc.rs`). Everything is set up
/// in [`Bursts::new`], so a burst itself runs only the device's code.
#[doc(hidden)]
pub struct Bursts {
    ram: GuardedRam,
    dataplane: Dataplane,
    interrupt: Arc<Interrupt>,
    avail_idx: u16,
    dirty: Arc<crate::dirty::DirtyPages>,
}

impl Bursts {
    /// The most requests one burst may post.
    pub const MAX: u16 = 128;

    /// A dataplane over a fresh queue whose descriptors already describe
    /// [`Bursts::MAX`] requests of one sector each: even ones read, odd
    /// ones write; `timed` times them in the device's I/O accounting.
    pub fn new(timed: bool) -> Self {
        const WRITE: u16 = VRING_DESC_F_WRITE as u16;
        const NEXT: u16 = VRING_DESC_F_NEXT as u16;
        let ram = GuardedRam::new();
        let mem = ram.mem.clone();
        let put_desc = |index: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(B_DESC + 16 * u64::from(index)))
                .expect("in RAM");
        };
        for i in 0..Self::MAX {
            let (head, n) = (3 * i, u64::from(i));
            let read = i % 2 == 0;
            let mut header = [0u8; 16];
            let kind = if read { T_IN } else { T_OUT };
            header[0..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&n.to_le_bytes());
            mem.write_slice(&header, GuestAddress(B_HEADERS + 16 * n))
                .expect("in RAM");
            put_desc(head, B_HEADERS + 16 * n, 16, NEXT, head + 1);
            let data_flags = if read { NEXT | WRITE } else { NEXT };
            put_desc(head + 1, B_DATA + 512 * n, 512, data_flags, head + 2);
            put_desc(head + 2, B_STATUS + n, 1, WRITE, 0);
        }
        let mut queue = Queue::new(B_QUEUE).expect("a valid size");
        queue
            .try_set_desc_table_address(GuestAddress(B_DESC))
            .expect("aligned");
        queue
            .try_set_avail_ring_address(GuestAddress(B_AVAIL))
            .expect("aligned");
        queue
            .try_set_used_ring_address(GuestAddress(B_USED))
            .expect("aligned");
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        let interrupt = Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ));
        let engine = RamDisk {
            disk: vec![0; DISK_BYTES],
            ram: ram.host_ranges(),
            done: VecDeque::new(),
            held: Arc::new(AtomicBool::new(false)),
            notifier: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        };
        let limits = DiskLimits {
            capacity: DISK_BYTES as u64 / SECTOR_SIZE,
            read_only: false,
            max_segments: 8,
            discard: true,
            write_zeroes: true,
        };
        // Up to the end of the last RAM region.
        let (last, len) = REGIONS[REGIONS.len() - 1];
        let dirty = Arc::new(crate::dirty::DirtyPages::new(last + len as u64));
        let activation = Activation {
            mem: mem.clone(),
            queues: vec![ActiveQueue {
                index: 0,
                queue,
                notify: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            }],
            interrupt: interrupt.clone(),
            acked_features: F_VERSION_1,
            dirty: dirty.clone(),
        };
        let dataplane = Dataplane::new(
            "bursts".into(),
            activation,
            Box::new(engine),
            limits,
            [0; ID_BYTES as usize],
            Duration::ZERO,
            Arc::new(StopSignal::new().expect("eventfd")),
        )
        .with_stats(Arc::new(BlockStats::new(timed)));
        Self {
            ram,
            dataplane,
            interrupt,
            avail_idx: 0,
            dirty,
        }
    }

    /// The pages the dataplane marks as it writes guest memory (not
    /// logging until started).
    pub fn dirty(&self) -> &crate::dirty::DirtyPages {
        &self.dirty
    }

    /// Posts the first `n` requests (at most [`Bursts::MAX`]) and serves
    /// them; how many the used ring gained and how many of those got OK.
    pub fn burst(&mut self, n: u16) -> (u16, u16) {
        assert!(n <= Self::MAX, "at most {} requests a burst", Self::MAX);
        let mem = &self.ram.mem;
        let used_before: u16 = mem.read_obj(GuestAddress(B_USED + 2)).expect("in RAM");
        for i in 0..n {
            mem.write_obj(0xffu8, GuestAddress(B_STATUS + u64::from(i)))
                .expect("in RAM");
            let slot = self.avail_idx.wrapping_add(i) % B_QUEUE;
            mem.write_obj(3 * i, GuestAddress(B_AVAIL + 4 + 2 * u64::from(slot)))
                .expect("in RAM");
        }
        self.avail_idx = self.avail_idx.wrapping_add(n);
        mem.write_obj(self.avail_idx, GuestAddress(B_AVAIL + 2))
            .expect("in RAM");
        while self.dataplane.service() {}
        assert!(!self.interrupt.is_broken(), "the device needs a reset");
        let used: u16 = mem.read_obj(GuestAddress(B_USED + 2)).expect("in RAM");
        let mut ok = 0;
        for i in 0..n {
            let status: u8 = mem
                .read_obj(GuestAddress(B_STATUS + u64::from(i)))
                .expect("in RAM");
            ok += u16::from(status == 0);
        }
        (used.wrapping_sub(used_before), ok)
    }

    /// Stops the dataplane, checks it drained, and unmaps guest RAM.
    pub fn finish(self) {
        let stopped = self.dataplane.end();
        assert!(stopped.drained, "the dataplane did not drain its engine");
        drop(stopped);
        self.ram.close();
    }
}

/// One descriptor as the driver wrote it: (addr, len, flags, next).
fn descriptor(mem: &GuestMemoryMmap, at: u64) -> Option<(u64, u32, u16, u16)> {
    let raw: [u8; 16] = mem.read_obj(GuestAddress(at)).ok()?;
    Some((
        u64::from_le_bytes(raw[0..8].try_into().unwrap()),
        u32::from_le_bytes(raw[8..12].try_into().unwrap()),
        u16::from_le_bytes(raw[12..14].try_into().unwrap()),
        u16::from_le_bytes(raw[14..16].try_into().unwrap()),
    ))
}

/// For each head, at least the device-writable bytes of its chain (every
/// descriptor a chain walk might reach, indirect tables included), and
/// whether any device-writable buffer overlaps the rings.
fn writable_bounds(mem: &GuestMemoryMmap, size: u16) -> (Vec<u64>, bool) {
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    let mut rings = false;
    let mut count = |(addr, len, flags, _): (u64, u32, u16, u16)| -> u64 {
        if flags & WRITE == 0 {
            return 0;
        }
        let end = addr.saturating_add(u64::from(len));
        rings |= addr < RINGS_END && end > DESC;
        u64::from(len)
    };
    let mut bounds = Vec::new();
    for head in 0..size {
        let mut sum = 0;
        let mut index = head;
        for _ in 0..size {
            let Some(d) = descriptor(mem, DESC + 16 * u64::from(index)) else {
                break;
            };
            sum += count(d);
            let (addr, len, flags, next) = d;
            if flags & INDIRECT != 0 {
                // A chain that comes back to a descriptor loops, and a
                // looping chain is never answered: each one counts once.
                // (Tables of more than u16::MAX entries are refused.)
                let entries = (len / 16).min(u32::from(u16::MAX));
                let mut seen = vec![false; entries as usize];
                let mut i = 0;
                while let Some(visited) = seen.get_mut(usize::from(i)) {
                    if std::mem::replace(visited, true) {
                        break;
                    }
                    let Some(e) = descriptor(mem, addr.wrapping_add(16 * u64::from(i))) else {
                        break;
                    };
                    sum += count(e);
                    if e.2 & NEXT == 0 {
                        break;
                    }
                    i = e.3;
                }
            }
            if flags & NEXT == 0 || next >= size {
                break;
            }
            index = next;
        }
        bounds.push(sum);
    }
    (bounds, rings)
}

// Register offsets of the virtio-mmio transport (virtio 1.2, 4.2.2).
const STATUS: u64 = 0x70;
/// Registers an op may name by a 4-bit index; 14 is any aligned offset
/// (the next byte times 4), 15 any offset at all (the next two bytes).
const REGISTERS: [u64; 14] = [
    STATUS, 0x10, 0x14, 0x20, 0x24, 0x30, 0x38, 0x44, 0x80, 0x90, 0xa0, 0x50, 0x64, 0x60,
];

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// The virtio-mmio transport over a real virtio-blk device on a 1 MiB
/// `null-co` node, driven by a random sequence of register accesses and
/// guest RAM writes, then a notify of every queue and a reset.
///
/// `data[0]` sets the device up (bits 0-1: queues - 1; 2: read-only;
/// 3-4: queue size 8, 16, 64 or 256). Then ops, one byte each plus
/// operands: bit 7 set is a guest RAM write of `op & 0x7f` bytes at the
/// 20-bit address in the next three bytes (zero bytes: a 200 µs pause that
/// lets the dataplane run); else bit 6 is write (with its value following)
/// or read, bits 4-5 the width (1, 2, 4, 8 bytes) and bits 0-3 the register
/// ([`REGISTERS`]).
///
/// Checks: the reset brings the status to 0, the device lets go of its
/// node (no dataplane panicked or was left with I/O in flight), nothing
/// refers to guest RAM afterwards and no thread is left over.
pub fn virtio_mmio(data: &[u8]) {
    let Some((&setup, mut ops)) = data.split_first() else {
        return;
    };
    let threads_before = threads();
    let ram = GuardedRam::new();
    let graph = Graph::new();
    let read_only = setup & 4 != 0;
    let queues = u16::from(setup & 3) + 1;
    graph
        .add(NodeOptions {
            node_name: Some("fuzz0".into()),
            read_only,
            driver: DriverOptions::Null { size: 1 << 20 },
        })
        .expect("a null node");
    let node = graph.get("fuzz0", device_holder("vfz")).expect("the node");
    let config = BlockConfig {
        id: "vfz".into(),
        read_only,
        queues,
        queue_size: [8, 16, 64, 256][usize::from(setup >> 3) & 3],
        serial: "fuzz".into(),
        poll: Duration::ZERO,
        // Whole rounds, one a call, and batches that split them.
        submit_batch: [0, 1, 4, 16][usize::from(setup >> 5) & 3],
        live_jobs: false,
        dataplane_cpus: None,
    };
    let interrupt = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    let mut transport = MmioTransport::new(
        Box::new(Block::new(config, node)),
        ram.mem.clone(),
        interrupt.clone(),
        {
            // Logging on: the marking paths are fuzzed too.
            let (last, len) = REGIONS[REGIONS.len() - 1];
            let dirty = crate::dirty::DirtyPages::new(last + len as u64);
            dirty.start();
            Arc::new(dirty)
        },
    )
    .expect("a transport");

    let mut take = |n: usize| -> &[u8] {
        let (now, rest) = ops.split_at(n.min(ops.len()));
        ops = rest;
        now
    };
    while let Some(&op) = take(1).first() {
        if op & 0x80 != 0 {
            let mut addr = [0u8; 4];
            let a = take(3);
            addr[..a.len()].copy_from_slice(a);
            let addr = u64::from(u32::from_le_bytes(addr) & 0xf_ffff);
            let len = usize::from(op & 0x7f);
            if len == 0 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                // A write past the end of RAM is refused; that is fine.
                let _ = ram.mem.write_slice(take(len), GuestAddress(addr));
            }
            continue;
        }
        let offset = match usize::from(op & 0xf) {
            14 => u64::from(take(1).first().copied().unwrap_or(0)) * 4,
            15 => {
                let mut raw = [0u8; 2];
                let r = take(2);
                raw[..r.len()].copy_from_slice(r);
                u64::from(u16::from_le_bytes(raw) & 0x1fff)
            }
            i => REGISTERS[i],
        };
        let width = 1 << ((op >> 4) & 3);
        if op & 0x40 != 0 {
            let mut value = [0u8; 8];
            let v = take(width);
            value[..v.len()].copy_from_slice(v);
            // No guest request can come from a virtio-mmio register.
            assert!(transport.write(offset, &value[..width]).is_none());
        } else {
            let mut value = [0u8; 8];
            transport.read(offset, &mut value[..width]);
        }
    }
    for q in 0..u32::from(queues) {
        transport.write(NOTIFY_OFFSET, &q.to_le_bytes());
    }
    transport.write(STATUS, &0u32.to_le_bytes());
    let mut status = [0u8; 4];
    transport.read(STATUS, &mut status);
    assert_eq!(u32::from_le_bytes(status), 0, "status after a reset");
    assert_eq!(interrupt.status(), 0, "interrupt causes after a reset");
    drop(transport);
    if let Err(e) = graph.remove("fuzz0") {
        panic!(
            "the device did not let go of its node (a dataplane panicked or did not drain): {e}"
        );
    }
    ram.close();
    // A joined thread may linger a moment in /proc before it is reaped.
    let deadline = Instant::now() + Duration::from_secs(2);
    while threads() > threads_before {
        assert!(
            Instant::now() < deadline,
            "{} threads before the input, {} after",
            threads_before,
            threads()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_disk(ram: &GuardedRam) -> RamDisk {
        RamDisk {
            disk: vec![0; DISK_BYTES],
            ram: ram.host_ranges(),
            done: VecDeque::new(),
            held: Arc::new(AtomicBool::new(false)),
            notifier: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    #[test]
    #[should_panic(expected = "leaves guest RAM")]
    fn the_checking_engine_refuses_an_iovec_running_past_a_region() {
        let ram = GuardedRam::new();
        let (_, end) = ram.host_ranges()[0];
        let engine = ram_disk(&ram);
        engine.check_iovecs(&[libc::iovec {
            iov_base: (end - 16) as *mut libc::c_void,
            iov_len: 32,
        }]);
    }

    #[test]
    #[should_panic(expected = "past the")]
    fn the_checking_engine_refuses_a_range_past_the_disk() {
        let ram = GuardedRam::new();
        ram_disk(&ram).check_range(DISK_BYTES as u64 - 512, 1024);
    }

    #[test]
    fn writable_bounds_count_indirect_tables_and_see_writes_into_the_rings() {
        let ram = GuardedRam::new();
        let put = |d: (u64, u32, u16, u16), at: u64| {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.0.to_le_bytes());
            raw[8..12].copy_from_slice(&d.1.to_le_bytes());
            raw[12..14].copy_from_slice(&d.2.to_le_bytes());
            raw[14..16].copy_from_slice(&d.3.to_le_bytes());
            ram.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        };
        let (w, n, i) = (
            VRING_DESC_F_WRITE as u16,
            VRING_DESC_F_NEXT as u16,
            VRING_DESC_F_INDIRECT as u16,
        );
        // Head 0: an indirect table of a header and two writable buffers.
        put((DATA, 48, i, 0), DESC);
        put((0x40000, 16, n, 1), DATA);
        put((0x50000, 512, w | n, 2), DATA + 16);
        put((0x51000, 1, w, 0), DATA + 32);
        let (bounds, rings) = writable_bounds(&ram.mem, 2);
        assert_eq!(bounds, vec![513, 0]);
        assert!(!rings);
        // Head 1: a writable buffer over the used ring.
        put((USED, 8, w, 0), DESC + 16);
        let (bounds, rings) = writable_bounds(&ram.mem, 2);
        assert_eq!(bounds, vec![513, 8]);
        assert!(rings);
        ram.close();
    }
}
