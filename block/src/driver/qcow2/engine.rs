//! The qcow2 I/O engine: guest requests in, data operations on the file
//! node's own engine (the dataplane's io_uring) out, at host offsets the
//! metadata maps them to. Guest buffers go straight to the kernel; only
//! copy-on-write edges, zeros and compressed clusters pass through our
//! own buffers.
//!
//! A request is split into segments, one per run of clusters that map
//! alike (contiguous host clusters, the backing file, zeros). A write to a
//! cluster that is not allocated for writing in place gets a new cluster:
//! the old contents of the parts it does not cover are read (from the
//! backing node, the old cluster or a compressed one) and written with the
//! guest's data in one vectored write, and only when that write has
//! completed does the L2 entry point at the new cluster. A second write to
//! a cluster being allocated waits for the first, so two writes never
//! allocate the same guest cluster twice.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use base::sync::lock;
use vmm_sys_util::eventfd::EventFd;

use super::meta::{Mapping, Meta, MetaError, COPIED, ZERO};
use crate::io::{AsyncIo, Completion, IoError};

/// A buffer aligned for `O_DIRECT` (4 KiB covers every logical block size
/// a host disk reports).
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

const ALIGN: usize = 4096;

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(ALIGN), ALIGN)
            .expect("a cluster-sized layout is valid");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `len` initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn iovec(&self, range: Range<usize>) -> libc::iovec {
        libc::iovec {
            // SAFETY: `range` lies inside the allocation (callers slice
            // within `len`).
            iov_base: unsafe { self.ptr.add(range.start) }.cast(),
            iov_len: range.len(),
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout =
            std::alloc::Layout::from_size_align(self.len.max(ALIGN), ALIGN).expect("as allocated");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// SAFETY: the buffer is plain memory owned by one `Aligned`.
unsafe impl Send for Aligned {}

/// What kind of outer operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// Zero a range (DISCARD and WRITE_ZEROES: both read back as zeros).
    Zero,
    Flush,
}

/// Where the old contents of a cluster being allocated come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Old {
    /// Zeros (or already in the edge buffer: a compressed cluster).
    Ready,
    Backing,
    Host(u64),
}

/// An edge of a new cluster whose old contents are read first.
#[derive(Debug, Clone, Copy)]
struct EdgeRead {
    part: u8,
    /// The iovec in the op's arena to read into.
    iov: usize,
    /// Offset in the backing node or the file.
    from: u64,
    len: usize,
}

#[derive(Debug)]
enum SegKind {
    /// Read the segment's bytes from the file at `host`.
    Read { host: u64 },
    /// Read them from the backing node at the segment's guest offset.
    Backing,
    /// Write them to the file at `host`.
    Write { host: u64 },
    /// A new cluster `new` for guest cluster `g`, written whole: edges of
    /// old contents around the guest's bytes, read first where needed.
    Alloc {
        g: u64,
        new: u64,
        old: Old,
        edges: Vec<EdgeRead>,
        /// Host clusters the old mapping held, freed once the new L2
        /// entry is on disk.
        frees: Vec<u64>,
        /// Edge reads still outstanding.
        reads: u8,
    },
    /// The file's `fdatasync`.
    Sync,
}

struct Seg {
    kind: SegKind,
    guest: u64,
    /// The bytes, as iovecs in the op's arena.
    iov: Range<usize>,
}

/// Sub-operation parts of a segment.
const PART_DATA: u8 = 0;
const PART_HEAD: u8 = 1;
const PART_TAIL: u8 = 2;

struct Op {
    user_data: u64,
    kind: Kind,
    offset: u64,
    len: u64,
    /// The caller's iovecs (valid until completion: the trait's contract),
    /// or `own`'s.
    iovecs: *const libc::iovec,
    iov_count: usize,
    /// Iovecs over our zero buffer, for a zeroing op's partial clusters.
    own: Vec<libc::iovec>,
    segs: Vec<Seg>,
    /// Sub-iovecs the segments point into; never grown once submitted.
    arena: Vec<libc::iovec>,
    /// Edge buffers of new clusters.
    buffers: Vec<Aligned>,
    pending: u32,
    error: i32,
    /// Guest clusters this op is allocating.
    allocating: Vec<u64>,
}

// SAFETY: the raw iovec pointers are the caller's buffers (which the
// trait's contract keeps valid and unused elsewhere until completion) or
// the op's own; the engine moves between threads only as a whole.
unsafe impl Send for Op {}

#[derive(Clone, Copy)]
struct Sub {
    op: usize,
    seg: usize,
    part: u8,
}

impl Sub {
    fn user_data(self) -> u64 {
        ((self.op as u64) << 24) | ((self.seg as u64) << 8) | u64::from(self.part)
    }

    fn from_user_data(ud: u64) -> Self {
        Self {
            op: (ud >> 24) as usize,
            seg: ((ud >> 8) & 0xffff) as usize,
            part: (ud & 0xff) as u8,
        }
    }
}

/// The most segments one request may split into (the sub-operation tag
/// has 16 bits for it): 2048 clusters of 512 bytes, more than a request
/// the dataplane takes can span.
const MAX_SEGS: usize = 1 << 16;

/// One cluster's part of a request: `n` bytes at guest offset `pos`, which
/// is `in_cluster` bytes into guest cluster `g`.
#[derive(Clone, Copy)]
struct Piece {
    g: u64,
    in_cluster: u64,
    n: u64,
    pos: u64,
}

/// The pieces of `[offset, offset + len)`, cluster by cluster, for clusters
/// of `cs` bytes.
fn pieces(offset: u64, len: u64, cs: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let in_cluster = pos % cs;
        let piece = Piece {
            g: pos / cs,
            in_cluster,
            n: (cs - in_cluster).min(end - pos),
            pos,
        };
        pos += piece.n;
        Some(piece)
    })
}

/// The engine of a qcow2 node.
pub struct Qcow2Io {
    meta: Arc<Mutex<Meta>>,
    file: Box<dyn AsyncIo>,
    backing: Option<Box<dyn AsyncIo>>,
    /// Bytes the backing node has; past them the backing reads as zeros.
    backing_size: u64,
    notifier: EventFd,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    ready: VecDeque<Completion>,
    /// Ops waiting for another op's allocation of a cluster they touch.
    parked: VecDeque<usize>,
    /// Guest clusters being allocated, and by which op.
    allocating: HashMap<u64, usize>,
    /// Sub-operations the inner engines had no room for yet.
    backlog: VecDeque<Sub>,
    /// Whether sub-operations were queued since the last submission.
    unsubmitted: bool,
    /// Sub-operations out in the inner engines, and how many may be: an
    /// io_uring's completion queue must never overflow, so one request
    /// that splits into many waits for room instead.
    subs_out: u32,
    sub_cap: u32,
    /// A cluster of zeros, for zeroing parts of clusters.
    zeros: Option<Aligned>,
    /// Finished ops, kept for their lists' memory.
    spare: Vec<Op>,
    /// The sub-operation list `plan` reuses.
    subs: Vec<Sub>,
    /// A cluster to inflate compressed data into.
    scratch: Vec<u8>,
    cluster_size: u64,
    cluster_bits: u32,
    version: u32,
    size: u64,
}

impl Qcow2Io {
    /// An engine over `file`'s engine and (if any) `backing`'s engine and
    /// size, signalling `notifier` (which they share) itself too.
    pub(crate) fn new(
        meta: Arc<Mutex<Meta>>,
        file: Box<dyn AsyncIo>,
        backing: Option<(Box<dyn AsyncIo>, u64)>,
        notifier: EventFd,
        sub_cap: u32,
    ) -> Self {
        let (cluster_bits, version, size) = {
            let m = lock(&meta);
            (m.cluster_bits, m.version, m.size)
        };
        let (backing, backing_size) = match backing {
            Some((engine, size)) => (Some(engine), size),
            None => (None, 0),
        };
        Self {
            meta,
            file,
            backing,
            backing_size,
            notifier,
            ops: Vec::new(),
            free_ops: Vec::new(),
            ready: VecDeque::new(),
            parked: VecDeque::new(),
            allocating: HashMap::new(),
            backlog: VecDeque::new(),
            unsubmitted: false,
            subs_out: 0,
            sub_cap: sub_cap.max(1),
            zeros: None,
            spare: Vec::new(),
            subs: Vec::new(),
            scratch: Vec::new(),
            cluster_size: 1 << cluster_bits,
            cluster_bits,
            version,
            size,
        }
    }

    fn in_flight(&self) -> usize {
        self.ops.len() - self.free_ops.len()
    }

    fn op(&mut self, i: usize) -> &mut Op {
        self.ops[i].as_mut().expect("a live op")
    }

    /// Ends op `i`, handing its result to the caller.
    fn finish(&mut self, i: usize) {
        let mut op = self.ops[i].take().expect("a live op");
        self.free_ops.push(i);
        let result = if op.error != 0 {
            op.error
        } else if matches!(op.kind, Kind::Read | Kind::Write) {
            i32::try_from(op.len).unwrap_or(i32::MAX)
        } else {
            0
        };
        self.ready.push_back(Completion {
            user_data: op.user_data,
            result,
        });
        let mut woke = false;
        for g in &op.allocating {
            if self.allocating.get(g) == Some(&i) {
                self.allocating.remove(g);
                woke = true;
            }
        }
        if op.kind == Kind::Flush && self.in_flight() == 0 {
            // The L2 changes that dropped these clusters are durable now
            // (this flush's fdatasync), and nothing can still write there.
            lock(&self.meta).apply_frees();
        }
        // Keep its lists' memory for the next request: the usual path
        // allocates nothing once warm.
        op.segs.clear();
        op.arena.clear();
        op.buffers.clear();
        op.allocating.clear();
        op.own.clear();
        self.spare.push(op);
        if woke {
            let parked: Vec<usize> = self.parked.drain(..).collect();
            for p in parked {
                self.plan(p);
            }
        }
    }

    /// Records `errno` as op `i`'s failure (the first one counts).
    fn fail(&mut self, i: usize, errno: i32) {
        let op = self.op(i);
        if op.error == 0 {
            op.error = -errno;
        }
    }

    fn done_if_idle(&mut self, i: usize) {
        if self.ops[i].as_ref().is_some_and(|op| op.pending == 0) {
            self.finish(i);
        }
    }

    /// Works out op `i`'s segments and starts them, or parks it.
    fn plan(&mut self, i: usize) {
        let kind = self.op(i).kind;
        if self.op(i).error == 0 {
            let result = match kind {
                Kind::Flush => self.plan_flush(i),
                Kind::Read => self.plan_read(i),
                Kind::Write | Kind::Zero => {
                    if self.blocked(i) {
                        self.parked.push_back(i);
                        return;
                    }
                    if kind == Kind::Write {
                        self.plan_write(i)
                    } else {
                        self.plan_zero(i)
                    }
                }
            };
            if let Err(e) = result {
                log::warn!("qcow2: {e}");
                self.fail(i, e.errno());
            }
            if self.op(i).segs.len() > MAX_SEGS {
                self.fail(i, libc::EINVAL);
            }
        }
        if self.op(i).error != 0 {
            // Nothing of a failed plan goes out; clusters it allocated
            // were never pointed at.
            let op = self.op(i);
            let news: Vec<u64> = op
                .segs
                .iter()
                .filter_map(|s| match s.kind {
                    SegKind::Alloc { new, .. } => Some(new),
                    _ => None,
                })
                .collect();
            op.segs.clear();
            let mut meta = lock(&self.meta);
            for n in news {
                meta.free_now(n);
            }
        }
        let subs = self.subs_of(i);
        for &s in &subs {
            self.issue(s);
        }
        self.subs = subs;
        self.done_if_idle(i);
    }

    /// Whether a cluster op `i` touches is being allocated by another op.
    fn blocked(&mut self, i: usize) -> bool {
        let cs = self.cluster_size;
        let op = self.op(i);
        if op.len == 0 {
            return false;
        }
        let (first, last) = (op.offset / cs, (op.offset + op.len - 1) / cs);
        (first..=last).any(|g| self.allocating.get(&g).is_some_and(|&o| o != i))
    }

    /// The sub-operations op `i`'s segments start with, counted as pending
    /// (in a list the caller hands back to `self.subs`).
    fn subs_of(&mut self, i: usize) -> Vec<Sub> {
        let mut subs = std::mem::take(&mut self.subs);
        subs.clear();
        let op = self.ops[i].as_mut().expect("a live op");
        for (s, seg) in op.segs.iter_mut().enumerate() {
            match &mut seg.kind {
                SegKind::Alloc { edges, reads, .. } if !edges.is_empty() => {
                    *reads = edges.len() as u8;
                    subs.extend(edges.iter().map(|e| Sub {
                        op: i,
                        seg: s,
                        part: e.part,
                    }));
                }
                _ => subs.push(Sub {
                    op: i,
                    seg: s,
                    part: PART_DATA,
                }),
            }
        }
        op.pending += subs.len() as u32;
        subs
    }

    /// Hands `sub` to its engine, or queues it until there is room.
    fn issue(&mut self, sub: Sub) {
        if !self.backlog.is_empty() || self.subs_out >= self.sub_cap {
            self.backlog.push_back(sub);
            return;
        }
        match self.push(sub) {
            Ok(()) => {
                self.subs_out += 1;
                self.unsubmitted = true;
            }
            Err(IoError::Full) => self.backlog.push_back(sub),
            Err(e) => {
                log::warn!("qcow2: {e}");
                self.sub_done(sub, -libc::EIO);
            }
        }
    }

    fn push(&mut self, sub: Sub) -> Result<(), IoError> {
        let ud = sub.user_data();
        let op = self.ops[sub.op].as_ref().expect("a live op");
        let seg = &op.segs[sub.seg];
        let iov = &op.arena[seg.iov.clone()];
        // SAFETY (every vectored call below): the iovecs point into the
        // caller's buffers (valid until this op completes, after every
        // sub-operation) or into the op's own edge and zero buffers, which
        // live as long as the op; the arena is never changed once its
        // sub-operations are out.
        match &seg.kind {
            SegKind::Sync => self.file.flush(ud),
            SegKind::Read { host } => unsafe { self.file.read_vectored(*host, iov, ud) },
            SegKind::Backing => {
                let engine = self.backing.as_mut().expect("planned only with a backing");
                unsafe { engine.read_vectored(seg.guest, iov, ud) }
            }
            SegKind::Write { host } => unsafe { self.file.write_vectored(*host, iov, ud) },
            SegKind::Alloc { new, .. } if sub.part == PART_DATA => unsafe {
                self.file.write_vectored(*new, iov, ud)
            },
            SegKind::Alloc { old, edges, .. } => {
                let edge = edges
                    .iter()
                    .find(|e| e.part == sub.part)
                    .expect("a sub-operation of a planned edge");
                let one = std::slice::from_ref(&op.arena[edge.iov]);
                match old {
                    Old::Backing => {
                        let engine = self.backing.as_mut().expect("planned only with a backing");
                        unsafe { engine.read_vectored(edge.from, one, ud) }
                    }
                    Old::Host(_) => unsafe { self.file.read_vectored(edge.from, one, ud) },
                    Old::Ready => unreachable!("no edge reads are planned for ready edges"),
                }
            }
        }
    }

    /// A sub-operation finished with `result`.
    fn sub_done(&mut self, sub: Sub, result: i32) {
        let Some(op) = self.ops.get_mut(sub.op).and_then(Option::as_mut) else {
            log::error!("qcow2: completion for an unknown operation");
            return;
        };
        let Some(seg) = op.segs.get(sub.seg) else {
            log::error!("qcow2: completion for an unknown segment");
            return;
        };
        op.pending = op.pending.saturating_sub(1);
        let want: usize = match &seg.kind {
            SegKind::Sync => 0,
            SegKind::Alloc { edges, .. } if sub.part != PART_DATA => edges
                .iter()
                .find(|e| e.part == sub.part)
                .map_or(0, |e| e.len),
            _ => op.arena[seg.iov.clone()].iter().map(|v| v.iov_len).sum(),
        };
        let reading =
            sub.part != PART_DATA || matches!(seg.kind, SegKind::Read { .. } | SegKind::Backing);
        let ok = match usize::try_from(result) {
            Ok(n) if n == want => true,
            // A read that ends early met the end of the file: the rest
            // reads as zeros, as it would from a hole.
            Ok(n) if reading && n < want => {
                if sub.part == PART_DATA {
                    let mut skip = n;
                    for v in &op.arena[seg.iov.clone()] {
                        if skip >= v.iov_len {
                            skip -= v.iov_len;
                            continue;
                        }
                        // SAFETY: a read's buffer, inside this iovec.
                        unsafe {
                            std::ptr::write_bytes(
                                v.iov_base.cast::<u8>().add(skip),
                                0,
                                v.iov_len - skip,
                            )
                        };
                        skip = 0;
                    }
                }
                // Edge buffers start zeroed: nothing to do for them.
                true
            }
            _ => false,
        };
        if !ok && op.error == 0 {
            op.error = if result < 0 { result } else { -libc::EIO };
        }
        let failed = op.error != 0;
        let seg = &mut op.segs[sub.seg];
        let SegKind::Alloc {
            g,
            new,
            frees,
            reads,
            ..
        } = &mut seg.kind
        else {
            self.done_if_idle(sub.op);
            return;
        };
        let (g, new) = (*g, *new);
        if sub.part != PART_DATA {
            *reads = reads.saturating_sub(1);
            if *reads == 0 {
                if failed {
                    lock(&self.meta).free_now(new);
                } else {
                    op.pending += 1;
                    self.issue(Sub {
                        op: sub.op,
                        seg: sub.seg,
                        part: PART_DATA,
                    });
                }
            }
            self.done_if_idle(sub.op);
            return;
        }
        let frees = std::mem::take(frees);
        let mut meta = lock(&self.meta);
        if !ok {
            meta.free_now(new);
            drop(meta);
        } else {
            // The data is in place: only now may the table point at it.
            match meta.set_l2(g, new | COPIED) {
                Ok(()) => {
                    for h in frees {
                        meta.free_later(h);
                    }
                    drop(meta);
                }
                Err(e) => {
                    drop(meta);
                    log::warn!("qcow2: {e}");
                    self.fail(sub.op, e.errno());
                }
            }
        }
        self.done_if_idle(sub.op);
    }

    /// Slices the op's iovecs `[from, from + len)` (bytes into the
    /// request) onto the end of its arena.
    fn slice(op: &mut Op, from: u64, len: u64) {
        // SAFETY: the op's iovec array, valid until completion.
        let iovecs = unsafe { std::slice::from_raw_parts(op.iovecs, op.iov_count) };
        let mut skip = from;
        let mut left = len;
        for v in iovecs {
            if left == 0 {
                break;
            }
            let vlen = v.iov_len as u64;
            if skip >= vlen {
                skip -= vlen;
                continue;
            }
            let take = (vlen - skip).min(left);
            op.arena.push(libc::iovec {
                // SAFETY: `skip` lies inside this iovec.
                iov_base: unsafe { v.iov_base.cast::<u8>().add(skip as usize) }.cast(),
                iov_len: take as usize,
            });
            left -= take;
            skip = 0;
        }
    }

    /// Copies `data` (or zeros, if `None`) into `[from, from + len)` of a
    /// read op's buffers.
    fn fill(op: &Op, from: u64, len: u64, data: Option<&[u8]>) {
        // SAFETY: the op's iovec array, valid until completion.
        let iovecs = unsafe { std::slice::from_raw_parts(op.iovecs, op.iov_count) };
        let mut skip = from;
        let mut done = 0u64;
        for v in iovecs {
            if done == len {
                break;
            }
            let vlen = v.iov_len as u64;
            if skip >= vlen {
                skip -= vlen;
                continue;
            }
            let take = (vlen - skip).min(len - done);
            // SAFETY: a read's buffers are the caller's to fill, and the
            // range lies inside this iovec; `data` is our own buffer.
            unsafe {
                let dst = v.iov_base.cast::<u8>().add(skip as usize);
                match data {
                    Some(d) => std::ptr::copy_nonoverlapping(
                        d[done as usize..].as_ptr(),
                        dst,
                        take as usize,
                    ),
                    None => std::ptr::write_bytes(dst, 0, take as usize),
                }
            };
            done += take;
            skip = 0;
        }
    }

    fn plan_flush(&mut self, i: usize) -> Result<(), MetaError> {
        // Metadata first, then one fdatasync for the data, the last step
        // of the write-back and whatever else is in the file.
        lock(&self.meta).write_back()?;
        self.op(i).segs.push(Seg {
            kind: SegKind::Sync,
            guest: 0,
            iov: 0..0,
        });
        Ok(())
    }

    fn plan_read(&mut self, i: usize) -> Result<(), MetaError> {
        let cs = self.cluster_size;
        let has_backing = self.backing.is_some();
        let backing_size = self.backing_size;
        let (offset, len) = {
            let op = self.op(i);
            (op.offset, op.len)
        };
        for Piece {
            g,
            in_cluster,
            n,
            pos,
        } in pieces(offset, len, cs)
        {
            let rel = pos - offset;
            let mapping = lock(&self.meta).lookup(g)?;
            match mapping {
                Mapping::Data { host, .. } => self.add_seg(
                    i,
                    SegKind::Read {
                        host: host + in_cluster,
                    },
                    pos,
                    rel,
                    n,
                ),
                Mapping::Unallocated if has_backing && pos < backing_size => {
                    let m = n.min(backing_size - pos);
                    self.add_seg(i, SegKind::Backing, pos, rel, m);
                    if m < n {
                        Self::fill(self.op(i), rel + m, n - m, None);
                    }
                }
                Mapping::Zero { .. } | Mapping::Unallocated => Self::fill(self.op(i), rel, n, None),
                Mapping::Compressed { entry } => {
                    let mut scratch = std::mem::take(&mut self.scratch);
                    scratch.resize(cs as usize, 0);
                    let r = lock(&self.meta).read_compressed(entry, &mut scratch);
                    if r.is_ok() {
                        let part = &scratch[in_cluster as usize..(in_cluster + n) as usize];
                        Self::fill(self.op(i), rel, n, Some(part));
                    }
                    self.scratch = scratch;
                    r?;
                }
            }
        }
        Ok(())
    }

    /// Adds a data segment, merging it into the last one when it continues
    /// it on the host (or in the backing node).
    fn add_seg(&mut self, i: usize, kind: SegKind, guest: u64, rel: u64, n: u64) {
        let op = self.op(i);
        if let Some(last) = op.segs.last_mut() {
            let last_len: u64 = op.arena[last.iov.clone()]
                .iter()
                .map(|v| v.iov_len as u64)
                .sum();
            let continues = last.iov.end == op.arena.len()
                && last.guest + last_len == guest
                && match (&last.kind, &kind) {
                    (SegKind::Read { host: a }, SegKind::Read { host: b })
                    | (SegKind::Write { host: a }, SegKind::Write { host: b }) => {
                        a + last_len == *b
                    }
                    (SegKind::Backing, SegKind::Backing) => true,
                    _ => false,
                };
            if continues {
                Self::slice(op, rel, n);
                let end = op.arena.len();
                op.segs.last_mut().expect("checked above").iov.end = end;
                return;
            }
        }
        let start = op.arena.len();
        Self::slice(op, rel, n);
        let end = op.arena.len();
        op.segs.push(Seg {
            kind,
            guest,
            iov: start..end,
        });
    }

    fn plan_write(&mut self, i: usize) -> Result<(), MetaError> {
        let cs = self.cluster_size;
        let (offset, len) = {
            let op = self.op(i);
            (op.offset, op.len)
        };
        for Piece {
            g,
            in_cluster,
            n,
            pos,
        } in pieces(offset, len, cs)
        {
            let rel = pos - offset;
            let mapping = self.lookup_for_write(g)?;
            match mapping {
                Mapping::Data { host, copied: true } => self.add_seg(
                    i,
                    SegKind::Write {
                        host: host + in_cluster,
                    },
                    pos,
                    rel,
                    n,
                ),
                other => self.plan_alloc(i, g, other, in_cluster, rel, n)?,
            }
        }
        Ok(())
    }

    /// What guest cluster `g` maps to, for a change to it: refused once
    /// writes are (looking up may itself find a table pointing data at
    /// metadata, which refuses them from then on).
    fn lookup_for_write(&self, g: u64) -> Result<Mapping, MetaError> {
        let mut meta = lock(&self.meta);
        let mapping = meta.lookup(g)?;
        meta.writable()?;
        Ok(mapping)
    }

    /// The host clusters a compressed cluster's data touches.
    fn compressed_clusters(&self, entry: u64) -> Vec<u64> {
        let (off, len) = super::compressed::extent(entry, self.cluster_bits);
        let cs = self.cluster_size;
        let first = off / cs;
        let last = (off + len.max(1) - 1) / cs;
        (first..=last).map(|c| c * cs).collect()
    }

    /// Plans a new cluster for guest cluster `g` (now `mapping`) holding
    /// the `n` bytes at `in_cluster` that start `rel` bytes into the op.
    fn plan_alloc(
        &mut self,
        i: usize,
        g: u64,
        mapping: Mapping,
        in_cluster: u64,
        rel: u64,
        n: u64,
    ) -> Result<(), MetaError> {
        let cs = self.cluster_size;
        let cluster_start = g * cs;
        let head = in_cluster as usize;
        let tail = (cs - in_cluster - n) as usize;
        let mut edge = Aligned::zeroed(cs as usize);
        let (old, frees) = match mapping {
            Mapping::Data { host, .. } => (Old::Host(host), vec![host]),
            Mapping::Compressed { entry } => {
                if head > 0 || tail > 0 {
                    lock(&self.meta).read_compressed(entry, edge.as_mut_slice())?;
                }
                (Old::Ready, self.compressed_clusters(entry))
            }
            Mapping::Zero { host } => (Old::Ready, if host != 0 { vec![host] } else { vec![] }),
            Mapping::Unallocated if self.backing.is_some() && cluster_start < self.backing_size => {
                (Old::Backing, vec![])
            }
            Mapping::Unallocated => (Old::Ready, vec![]),
        };
        let new = {
            let mut meta = lock(&self.meta);
            meta.ensure_l2(g)?;
            meta.alloc()?
        };
        let backing_size = self.backing_size;
        let op = self.op(i);
        let seg = op.segs.len();
        let start = op.arena.len();
        let mut edges = Vec::new();
        let mut edge_read = |part: u8, iov: usize, at: usize, len: usize| {
            let (from, len) = match old {
                Old::Ready => return,
                Old::Host(h) => (h + at as u64, len),
                Old::Backing => {
                    let from = cluster_start + at as u64;
                    // Past the backing node's end the edge stays zero.
                    let inside = backing_size.saturating_sub(from).min(len as u64) as usize;
                    (from, inside)
                }
            };
            if len > 0 {
                edges.push(EdgeRead {
                    part,
                    iov,
                    from,
                    len,
                });
            }
        };
        if head > 0 {
            edge_read(PART_HEAD, op.arena.len(), 0, head);
            op.arena.push(edge.iovec(0..head));
        }
        Self::slice(op, rel, n);
        if tail > 0 {
            edge_read(PART_TAIL, op.arena.len(), cs as usize - tail, tail);
            op.arena.push(edge.iovec(cs as usize - tail..cs as usize));
        }
        let end = op.arena.len();
        // The edge reads land in the same buffer the write sends, but a
        // read past the backing node's end must not run over the zeros.
        let mut reads_iov = Vec::new();
        for e in &mut edges {
            let base = op.arena[e.iov];
            reads_iov.push(libc::iovec {
                iov_base: base.iov_base,
                iov_len: e.len,
            });
        }
        for (e, v) in edges.iter_mut().zip(reads_iov) {
            e.iov = op.arena.len();
            op.arena.push(v);
        }
        op.buffers.push(edge);
        op.segs.push(Seg {
            kind: SegKind::Alloc {
                g,
                new,
                old,
                edges,
                frees,
                reads: 0,
            },
            guest: cluster_start + in_cluster,
            iov: start..end,
        });
        let _ = seg;
        op.allocating.push(g);
        self.allocating.insert(g, i);
        Ok(())
    }

    fn plan_zero(&mut self, i: usize) -> Result<(), MetaError> {
        let cs = self.cluster_size;
        let (offset, len) = {
            let op = self.op(i);
            (op.offset, op.len)
        };
        let has_backing = self.backing.is_some();
        // A whole cluster reads as zeros by its L2 entry: unallocated
        // without a backing node, the zero flag (version 3) with one.
        let whole = match (self.version >= 3, has_backing) {
            (_, false) => Some(0),
            (true, true) => Some(ZERO),
            // Version 2 over a backing node cannot say "zeros": write them.
            (false, true) => None,
        };
        let mut parts: Vec<(u64, u64)> = Vec::new();
        for Piece { g, n, pos, .. } in pieces(offset, len, cs) {
            match whole {
                Some(entry) if n == cs => self.zero_cluster(g, entry)?,
                _ => parts.push((pos, n)),
            }
        }
        if parts.is_empty() {
            return Ok(());
        }
        let zeros = self
            .zeros
            .get_or_insert_with(|| Aligned::zeroed(cs as usize));
        let own: Vec<libc::iovec> = parts
            .iter()
            .map(|&(_, n)| zeros.iovec(0..n as usize))
            .collect();
        let op = self.op(i);
        op.own = own;
        op.iovecs = op.own.as_ptr();
        op.iov_count = op.own.len();
        let mut rel = 0u64;
        for (pos, n) in parts {
            let g = pos / cs;
            let in_cluster = pos % cs;
            let mapping = self.lookup_for_write(g)?;
            match mapping {
                Mapping::Data { host, copied: true } => self.add_seg(
                    i,
                    SegKind::Write {
                        host: host + in_cluster,
                    },
                    pos,
                    rel,
                    n,
                ),
                Mapping::Zero { .. } => {}
                Mapping::Unallocated if !has_backing => {}
                other => self.plan_alloc(i, g, other, in_cluster, rel, n)?,
            }
            rel += n;
        }
        Ok(())
    }

    /// Points whole guest cluster `g` at `entry` (0 or the zero flag),
    /// freeing what it held once that is on disk.
    fn zero_cluster(&mut self, g: u64, entry: u64) -> Result<(), MetaError> {
        let mapping = self.lookup_for_write(g)?;
        let frees = match mapping {
            Mapping::Unallocated if entry == 0 => return Ok(()),
            Mapping::Zero { host: 0 } => return Ok(()),
            Mapping::Unallocated => vec![],
            Mapping::Zero { host } | Mapping::Data { host, .. } => vec![host],
            Mapping::Compressed { entry } => self.compressed_clusters(entry),
        };
        let mut meta = lock(&self.meta);
        meta.ensure_l2(g)?;
        meta.set_l2(g, entry)?;
        for h in frees {
            meta.free_later(h);
        }
        Ok(())
    }

    /// Pushes queued sub-operations while the inner engines take them.
    fn drain_backlog(&mut self) {
        while self.subs_out < self.sub_cap {
            let Some(sub) = self.backlog.pop_front() else {
                return;
            };
            match self.push(sub) {
                Ok(()) => {
                    self.subs_out += 1;
                    self.unsubmitted = true;
                }
                Err(IoError::Full) => {
                    self.backlog.push_front(sub);
                    return;
                }
                Err(e) => {
                    log::warn!("qcow2: {e}");
                    self.sub_done(sub, -libc::EIO);
                }
            }
        }
    }

    fn start(&mut self, op: Op) -> Result<(), IoError> {
        let i = match self.free_ops.pop() {
            Some(i) => i,
            None => {
                if self.ops.len() >= 1 << 24 {
                    return Err(IoError::Full);
                }
                self.ops.push(None);
                self.ops.len() - 1
            }
        };
        self.ops[i] = Some(op);
        self.plan(i);
        if !self.ready.is_empty() {
            // Finished without I/O: make sure the caller looks.
            let _ = self.notifier.write(1);
        }
        Ok(())
    }

    fn new_op(&mut self, kind: Kind, offset: u64, len: u64, iovecs: &[libc::iovec], ud: u64) -> Op {
        let in_range = offset.checked_add(len).is_some_and(|end| end <= self.size);
        let error = if in_range || kind == Kind::Flush {
            0
        } else {
            -libc::EINVAL
        };
        match self.spare.pop() {
            Some(mut op) => {
                op.user_data = ud;
                op.kind = kind;
                op.offset = offset;
                op.len = len;
                op.iovecs = iovecs.as_ptr();
                op.iov_count = iovecs.len();
                op.pending = 0;
                op.error = error;
                op
            }
            None => Op {
                user_data: ud,
                kind,
                offset,
                len,
                iovecs: iovecs.as_ptr(),
                iov_count: iovecs.len(),
                own: Vec::new(),
                segs: Vec::new(),
                arena: Vec::new(),
                buffers: Vec::new(),
                pending: 0,
                error,
                allocating: Vec::new(),
            },
        }
    }
}

impl AsyncIo for Qcow2Io {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        let len: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let op = self.new_op(Kind::Read, offset, len, iovecs, user_data);
        self.start(op)
    }

    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        let len: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let op = self.new_op(Kind::Write, offset, len, iovecs, user_data);
        self.start(op)
    }

    fn flush(&mut self, user_data: u64) -> Result<(), IoError> {
        let op = self.new_op(Kind::Flush, 0, 0, &[], user_data);
        self.start(op)
    }

    fn punch_hole(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        self.write_zeroes(offset, len, user_data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), IoError> {
        let op = self.new_op(Kind::Zero, offset, len, &[], user_data);
        self.start(op)
    }

    fn submit(&mut self) -> Result<(), IoError> {
        self.drain_backlog();
        self.unsubmitted = false;
        self.file.submit()?;
        if let Some(b) = self.backing.as_mut() {
            b.submit()?;
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        loop {
            if let Some(done) = self.ready.pop_front() {
                return Some(done);
            }
            let inner = self
                .file
                .next_completion()
                .or_else(|| self.backing.as_mut().and_then(|b| b.next_completion()));
            let inner = inner?;
            self.subs_out = self.subs_out.saturating_sub(1);
            self.sub_done(Sub::from_user_data(inner.user_data), inner.result);
            // New sub-operations (copy-on-write writes, woken ops) go out
            // now: the caller submits only when it has new requests.
            self.drain_backlog();
            if std::mem::take(&mut self.unsubmitted) {
                let _ = self.file.submit();
                if let Some(b) = self.backing.as_mut() {
                    let _ = b.submit();
                }
            }
        }
    }
}

impl Drop for Qcow2Io {
    fn drop(&mut self) {
        if self.in_flight() > 0 {
            // Data may still land: leave the metadata as it is, consistent
            // on disk, and the cache to the node.
            return;
        }
        if let Err(e) = lock(&self.meta).settle() {
            log::warn!("qcow2: writing metadata back on close failed: {e}");
        }
    }
}
