//! The backup job (`blockdev-backup`): copies a source node to a target
//! node of the same size, every byte (`sync=full`) or only the extents a
//! dirty bitmap marks (`sync=bitmap`, `sync=incremental`; the bitmap is
//! frozen while the job runs and settled when it ends, see
//! [`crate::bitmap`]). The copy loop takes what to copy as a [`CopySet`]. It holds both nodes'
//! leases while it runs, so nobody writes the source under the copy and
//! nobody else writes the target; it only ever reads the source, so a
//! failed or cancelled backup leaves the source as it was.
//!
//! The leases are released only once every read and write issued under
//! them has completed. If the kernel stops completing them (a hung file
//! system, say) for [`IO_TIMEOUT`], the job fails and keeps its buffers,
//! engines and both leases for the rest of the process's life: a write
//! that lands late then lands on nodes nobody else may use, never on the
//! data of whoever would have taken the lease next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::cbw::{Cbw, GRANULE};
use super::{IoOperation, JobDriver, JobFailure, Step};
use crate::bitmap::{BitmapError, BitmapSyncMode, DirtyBitmap, Frozen};
use crate::error::BlockError;
use crate::graph::{Access, Holder, Host, HostedRead, Lease, NodeRef};
use crate::io::AsyncIo;

/// Bytes per read or write.
const CHUNK: usize = 1 << 20;
/// Chunks in flight at once, reads and writes together: reads of the next
/// chunks overlap writes of the last ones.
const SLOTS: usize = 8;
/// Bytes a step writes before it lets the runtime pause, cancel or
/// throttle the job.
const STEP_BYTES: u64 = 4 << 20;
/// O_DIRECT wants buffers aligned to the logical block size; a page is safe.
const ALIGN: usize = 4096;
/// The tag of the final flush.
const FLUSH: u64 = u64::MAX;
/// Tags of reads of the target on behalf of those the job hosts: this bit
/// and an index.
const EXPORT_TAG: u64 = 1 << 62;
/// How long operations in flight may go without one completing before
/// the backup gives up on them (and keeps its leases for ever).
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a backup could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A node is busy, missing, or cannot do I/O.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// Source and target differ in size.
    #[error("Source and target image have different sizes (node '{source_node}' is {source_size} bytes, node '{target}' is {target_size})")]
    SizeMismatch {
        source_node: String,
        source_size: u64,
        target: String,
        target_size: u64,
    },
    /// The target refuses writes.
    #[error("Node '{0}' is read-only and cannot be a backup target")]
    ReadOnlyTarget(String),
    /// Source and target are the same node.
    #[error("Node '{0}' cannot be the backup's source and target at once")]
    SameNode(String),
    /// `sync=none` on a node no running guest's dataplane hosts.
    #[error("sync=none copies what a running guest is about to overwrite: node '{0}' must be served by a running guest's disk with live-jobs=on")]
    NeedsLiveGuest(String),
    /// The sync bitmap is missing or busy.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// Which bytes a backup copies (QMP's `sync`, once QEMU's checks have
/// turned `incremental` into `bitmap` with `on-success`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every byte.
    Full,
    /// The extents the sync bitmap marks as the job starts.
    Bitmap,
    /// Only what the guest is about to overwrite, until cancelled
    /// (`none`: a point-in-time view for fleecing). Needs a running guest
    /// whose dataplane hosts the job.
    None,
}

/// The dirty bitmap a backup uses (QMP's `bitmap` and `bitmap-mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncBitmap {
    /// A bitmap of the source node.
    pub name: String,
    /// What becomes of it when the job ends.
    pub mode: BitmapSyncMode,
}

/// What the copy loop copies: the whole node, or the extents of a frozen
/// bitmap, in order.
#[derive(Debug, Clone)]
pub enum CopySet {
    /// Bytes `[0, len)`.
    All(u64),
    /// The dirty extents of this bitmap.
    Dirty(DirtyBitmap),
}

impl CopySet {
    /// The bytes to copy.
    pub fn total(&self) -> u64 {
        match self {
            CopySet::All(len) => *len,
            CopySet::Dirty(b) => b.extents().map(|(_, len)| len).sum(),
        }
    }

    /// The next piece to copy at or after `from`, at most `max` bytes.
    pub fn next_chunk(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let (start, end) = match self {
            CopySet::All(len) => (from, *len),
            // An extent may begin before `from` when a granule is larger
            // than a chunk: its first part is copied already.
            CopySet::Dirty(b) => {
                let (offset, len) = b.extents_from(from).next()?;
                (offset.max(from), offset + len)
            }
        };
        (start < end).then(|| (start, (end - start).min(max)))
    }
}

/// QEMU's checks of `sync`, `bitmap` and `bitmap-mode` (`sync` being
/// `full`, `incremental` or `bitmap`), against the source's bitmaps:
/// what to copy and which bitmap to freeze.
pub fn check_sync(
    sync: &str,
    bitmap: Option<&str>,
    mode: Option<BitmapSyncMode>,
    source: &NodeRef,
) -> Result<(SyncMode, Option<SyncBitmap>), SyncError> {
    if matches!(sync, "bitmap" | "incremental") && bitmap.is_none() {
        return Err(SyncError::NoBitmap(sync.into()));
    }
    let Some(name) = bitmap else {
        if mode.is_some() {
            return Err(SyncError::ModeWithoutBitmap);
        }
        return Ok((SyncMode::Full, None));
    };
    if !source.bitmaps().contains(name) {
        return Err(SyncError::BitmapNotFound(name.into()));
    }
    let mode = match (sync, mode) {
        ("incremental", None | Some(BitmapSyncMode::OnSuccess)) => BitmapSyncMode::OnSuccess,
        ("incremental", Some(_)) => return Err(SyncError::IncrementalMode),
        (_, None) => return Err(SyncError::NoMode),
        (_, Some(mode)) => mode,
    };
    source.bitmaps().check_usable(name)?;
    let sync = if sync == "full" {
        if mode == BitmapSyncMode::Never {
            return Err(SyncError::Useless(mode.as_str(), "full"));
        }
        SyncMode::Full
    } else {
        SyncMode::Bitmap
    };
    Ok((
        sync,
        Some(SyncBitmap {
            name: name.into(),
            mode,
        }),
    ))
}

/// Why `sync`, `bitmap` and `bitmap-mode` do not go together; QEMU's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// `sync=bitmap` or `incremental` without `bitmap`.
    #[error("must provide a valid bitmap name for '{0}' sync mode")]
    NoBitmap(String),
    /// `bitmap-mode` without `bitmap`.
    #[error("Cannot specify bitmap sync mode without a bitmap")]
    ModeWithoutBitmap,
    /// The source has no such bitmap.
    #[error("Bitmap '{0}' could not be found")]
    BitmapNotFound(String),
    /// `bitmap` without `bitmap-mode` (only `incremental` implies one).
    #[error("Bitmap sync mode must be given when providing a bitmap")]
    NoMode,
    /// `incremental` with a mode other than `on-success`.
    #[error("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")]
    IncrementalMode,
    /// `bitmap-mode=never` with `sync=full`.
    #[error("Bitmap sync mode '{0}' has no meaningful effect when combined with sync mode '{1}'")]
    Useless(&'static str, &'static str),
    /// The bitmap is busy.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// A buffer aligned for O_DIRECT, without unsafe: a larger Vec, used from
/// its first aligned byte.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let bytes = vec![0u8; len + ALIGN];
        let start = bytes.as_ptr().align_offset(ALIGN);
        Self { bytes, start }
    }

    fn iovec(&mut self, len: usize) -> libc::iovec {
        let slice = &mut self.bytes[self.start..self.start + len];
        libc::iovec {
            iov_base: slice.as_mut_ptr().cast(),
            iov_len: len,
        }
    }
}

/// What a backup holds while it runs: an engine on each node, one epoll
/// that waits on both, and the leases that opened them (declared last, so
/// the engines close first).
struct Running {
    src: Box<dyn AsyncIo>,
    dst: Box<dyn AsyncIo>,
    wait: Epoll,
    /// Copy-before-write, when the source's holder hosts the job.
    cbw: Option<Cbw>,
    /// Fleecing: reads of the target by those the job hosts (an export).
    fleece: Option<Fleece>,
    source: Access,
    target: Lease,
}

/// Fleecing (`sync=none` into an overlay whose backing node is the
/// source): the job, holding the target's lease, hosts reads of it. A read
/// waits until every granule it covers is on the target, copying the ones
/// that are not (copy-on-read, through the source's holder like any copy):
/// a read of the target then never falls through to the backing node,
/// where a guest write could have landed after the job started.
struct Fleece {
    host: Arc<Host>,
    /// Taken from the host, waiting for their granules.
    waiting: Vec<HostedRead>,
    /// Out on the target's engine, by index.
    out: Vec<Option<HostedRead>>,
}

/// Where one chunk buffer is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Reading { offset: u64, len: usize },
    Full { offset: u64, len: usize },
    Writing { offset: u64, len: usize },
}

/// One iovec per slot, kept where the kernel can read it until the
/// operation completes (io_uring may read an iovec array after submission).
struct SlotIovecs([[libc::iovec; 1]; SLOTS]);

// SAFETY: the iovecs point into the `buffers` of the same `Backup`, heap
// memory that moves with it; no other thread holds these pointers except
// the kernel, which does not care which thread owns the struct.
unsafe impl Send for SlotIovecs {}

/// A copy of one node, or of its dirty extents, to another.
pub struct Backup {
    /// Until `clean`.
    running: Option<Running>,
    /// What to copy.
    copy: CopySet,
    /// Its bytes.
    len: u64,
    /// The sync bitmap, frozen until the job ends.
    frozen: Option<Frozen>,
    /// With a sync bitmap: what is still to copy, at its granularity, for
    /// `bitmap-mode=always` after a failure.
    not_copied: Option<DirtyBitmap>,
    /// Where the next read starts.
    next_read: u64,
    /// Bytes written to the target so far.
    written: u64,
    slots: [Slot; SLOTS],
    iovecs: SlotIovecs,
    buffers: Vec<AlignedBuf>,
    in_flight: usize,
    /// Bytes of writes this step may still start: a step writes at most
    /// `STEP_BYTES`, so the speed limit and pauses see every byte.
    write_budget: u64,
    flushed: bool,
    /// When an operation last completed (or the first was issued).
    last_completion: Instant,
    /// [`IO_TIMEOUT`], shorter in tests.
    io_timeout: Duration,
    /// Bytes per read: [`CHUNK`], or the granule of copy-before-write.
    chunk: usize,
    sync: SyncMode,
    /// Serving copy-before-write only (paused or held back by the speed
    /// limit): no background reads start.
    serving: bool,
    /// Bytes written while serving, reported with the next step.
    served: u64,
    /// A failure while serving, reported by the next step.
    serve_error: Option<JobFailure>,
}

fn watch(epoll: &Epoll, io: &dyn AsyncIo, token: u64) -> std::io::Result<()> {
    watch_fd(epoll, io.notifier(), token)
}

fn watch_fd(epoll: &Epoll, fd: &vmm_sys_util::eventfd::EventFd, token: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    epoll.ctl(
        ControlOperation::Add,
        fd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, token),
    )
}

fn failure(op: IoOperation, result: i32) -> JobFailure {
    // A short transfer means the node ended early: an I/O error for the job.
    let errno = if result < 0 { -result } else { libc::EIO };
    JobFailure::io(op, &std::io::Error::from_raw_os_error(errno))
}

impl Backup {
    /// A full copy (`sync=full` without a bitmap): takes both leases for
    /// job `job` (refused at once if anyone holds either) and opens an
    /// engine on each.
    pub fn new(job: &str, source: &NodeRef, target: &NodeRef) -> Result<Self, BackupError> {
        Self::with_sync(job, source, target, SyncMode::Full, None)
    }

    /// As [`Backup::new`], copying what `sync` says and, with `bitmap`,
    /// freezing that bitmap of the source (see [`check_sync`]).
    pub fn with_sync(
        job: &str,
        source: &NodeRef,
        target: &NodeRef,
        sync: SyncMode,
        bitmap: Option<SyncBitmap>,
    ) -> Result<Self, BackupError> {
        let mut backup =
            Self::with_engines(job, source, target, |lease, depth| lease.open_io(depth))?;
        backup.sync_with(source, sync, bitmap)?;
        Ok(backup)
    }

    /// Freezes the sync bitmap and sets what to copy; called once both
    /// leases are held, so no write of the source slips between the
    /// freeze and the copy.
    fn sync_with(
        &mut self,
        source: &NodeRef,
        sync: SyncMode,
        bitmap: Option<SyncBitmap>,
    ) -> Result<(), BackupError> {
        let Some(bitmap) = bitmap else {
            debug_assert_eq!(sync, SyncMode::Full, "sync=bitmap needs a bitmap");
            return Ok(());
        };
        let frozen = source.bitmaps().freeze(&bitmap.name, bitmap.mode)?;
        let mut not_copied = frozen.bitmap().clone();
        if sync == SyncMode::Bitmap {
            self.copy = CopySet::Dirty(frozen.bitmap().clone());
            self.len = self.copy.total();
        } else {
            not_copied.fill();
        }
        self.not_copied = Some(not_copied);
        self.frozen = Some(frozen);
        Ok(())
    }

    /// A backup that may run on a running guest: if the source's lease
    /// holder hosts jobs (`live-jobs=on`), its reads go through the holder
    /// and every write the holder is about to make waits until the old
    /// data is read (copy-before-write). With `SyncMode::None` only that is
    /// copied, until the job is cancelled.
    pub fn live(
        job: &str,
        source: &NodeRef,
        target: &NodeRef,
        sync: SyncMode,
        bitmap: Option<SyncBitmap>,
    ) -> Result<Self, BackupError> {
        let mut backup = Self::with_access(job, source, target, true, |access, depth| {
            access.open_io(depth)
        })?;
        if sync != SyncMode::None {
            backup.sync_with(source, sync, bitmap)?;
        }
        let copy = backup.copy.clone();
        let running = backup.running.as_mut().expect("just made");
        // Fleecing: the target's backing node is the source.
        let fleecing = sync == SyncMode::None
            && target
                .driver()
                .backing()
                .is_some_and(|b| b.same_node(source));
        match running.source.host().cloned() {
            Some(host) => {
                // A granule covers whole clusters of the target, so that a
                // copy never makes the target read its backing node.
                let cluster = target
                    .driver()
                    .image_details()
                    .map_or(0, |d| d.cluster_size);
                let granule = GRANULE
                    .max(u64::from(target.driver().io_alignment()))
                    .max(cluster);
                // A copy of a bitmap's extents copies whole granules, and
                // holds only writes to those.
                if let CopySet::Dirty(b) = &copy {
                    if b.granularity() % granule != 0 {
                        return Err(BlockError::Options {
                            node: source.name().into(),
                            reason: format!(
                                "a backup of a running guest's dirty bitmap needs a granularity that is a multiple of {granule} bytes (the bitmap's is {})",
                                b.granularity()
                            ),
                        }
                        .into());
                    }
                }
                let size = source.driver().size();
                let cbw = Cbw::start(host, size, granule, |g| match &copy {
                    CopySet::Dirty(b) => b.is_dirty(g * granule),
                    CopySet::All(_) => true,
                })
                .map_err(|e| BlockError::Options {
                    node: source.name().into(),
                    reason: format!("cannot hook into its writes: {e}"),
                })?;
                watch_fd(&running.wait, cbw.wake(), 2).map_err(|e| BlockError::Options {
                    node: source.name().into(),
                    reason: format!("cannot wait for the backup's I/O: {e}"),
                })?;
                backup.chunk = granule as usize;
                running.cbw = Some(cbw);
                if fleecing {
                    let setup = |e: std::io::Error| BlockError::Options {
                        node: target.name().into(),
                        reason: format!("cannot host reads of it: {e}"),
                    };
                    let host = running.target.offer_hosting().map_err(setup)?;
                    watch_fd(&running.wait, host.kick(), 3).map_err(setup)?;
                    running.fleece = Some(Fleece {
                        host,
                        waiting: Vec::new(),
                        out: Vec::new(),
                    });
                }
            }
            None if sync == SyncMode::None => {
                return Err(BackupError::NeedsLiveGuest(source.name().into()));
            }
            None => {}
        }
        backup.sync = sync;
        if sync == SyncMode::None {
            // Nothing to copy but what writes are about to change.
            backup.next_read = backup.len;
        }
        Ok(backup)
    }

    /// As [`Backup::new`], with `open` giving the engine for each lease
    /// (tests give engines that misbehave).
    fn with_engines(
        job: &str,
        source: &NodeRef,
        target: &NodeRef,
        mut open: impl FnMut(&Lease, u32) -> Result<Box<dyn AsyncIo>, BlockError>,
    ) -> Result<Self, BackupError> {
        Self::with_access(job, source, target, false, |access, depth| match access {
            Access::Lease(lease) => open(lease, depth),
            Access::Hosted(_) => unreachable!("hosting was not asked for"),
        })
    }

    fn with_access(
        job: &str,
        source: &NodeRef,
        target: &NodeRef,
        hosted: bool,
        mut open: impl FnMut(&Access, u32) -> Result<Box<dyn AsyncIo>, BlockError>,
    ) -> Result<Self, BackupError> {
        if source.same_node(target) {
            return Err(BackupError::SameNode(source.name().into()));
        }
        let (source_size, target_size) = (source.driver().size(), target.driver().size());
        if source_size != target_size {
            return Err(BackupError::SizeMismatch {
                source_node: source.name().into(),
                source_size,
                target: target.name().into(),
                target_size,
            });
        }
        if target.read_only() {
            return Err(BackupError::ReadOnlyTarget(target.name().into()));
        }
        let holder = Holder::Job { id: job.into() };
        let source_access = source.take_access(holder.clone(), hosted)?;
        let target_lease = target.take_lease(holder)?;
        let depth = SLOTS as u32 + 1;
        let src = open(&source_access, depth)?;
        let target_access = Access::Lease(target_lease);
        let dst = open(&target_access, depth)?;
        let Access::Lease(target_lease) = target_access else {
            unreachable!("made above")
        };
        let setup = |e: std::io::Error| BlockError::Options {
            node: source.name().into(),
            reason: format!("cannot wait for the backup's I/O: {e}"),
        };
        let wait = Epoll::new().map_err(setup)?;
        watch(&wait, src.as_ref(), 0).map_err(setup)?;
        watch(&wait, dst.as_ref(), 1).map_err(setup)?;
        Ok(Self {
            running: Some(Running {
                src,
                dst,
                wait,
                cbw: None,
                fleece: None,
                source: source_access,
                target: target_lease,
            }),
            copy: CopySet::All(source_size),
            len: source_size,
            frozen: None,
            not_copied: None,
            next_read: 0,
            written: 0,
            slots: [Slot::Free; SLOTS],
            iovecs: SlotIovecs(
                [[libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }]; SLOTS],
            ),
            buffers: (0..SLOTS).map(|_| AlignedBuf::new(CHUNK)).collect(),
            in_flight: 0,
            write_budget: 0,
            flushed: false,
            last_completion: Instant::now(),
            io_timeout: IO_TIMEOUT,
            chunk: CHUNK,
            sync: SyncMode::Full,
            serving: false,
            served: 0,
            serve_error: None,
        })
    }

    /// Starts reads into free buffers and writes from full ones.
    fn submit(&mut self) -> Result<(), JobFailure> {
        if self.in_flight == 0 {
            // The clock for a stall starts with the first operation issued.
            self.last_completion = Instant::now();
        }
        self.serve_fleece();
        let io = self.running.as_mut().expect("engines live until clean");
        let queue = |op, e: crate::io::IoError| JobFailure::io(op, &std::io::Error::other(e));
        let chunk = self.chunk as u64;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            // Reads held writes wait for come first.
            if *slot == Slot::Free {
                if let Some((g, size)) = io
                    .cbw
                    .as_ref()
                    .and_then(|c| Some((c.next_wanted()?, c.source_size())))
                {
                    let offset = g * chunk;
                    let len = (size - offset).min(chunk) as usize;
                    self.iovecs.0[i] = [self.buffers[i].iovec(len)];
                    let iov = &self.iovecs.0[i];
                    // SAFETY: as for the reads below.
                    unsafe { io.src.read_vectored(offset, iov, i as u64) }
                        .map_err(|e| queue(IoOperation::Read, e))?;
                    *slot = Slot::Reading { offset, len };
                    self.in_flight += 1;
                    continue;
                }
            }
            // Granules already read for a held write need no second read.
            if let Some(cbw) = io.cbw.as_ref() {
                while let Some((offset, _)) = self.copy.next_chunk(self.next_read, chunk) {
                    if cbw.unread(offset / chunk) {
                        break;
                    }
                    self.next_read = offset + chunk;
                }
            }
            match *slot {
                Slot::Free if !self.serving => {
                    let Some((offset, len)) = self.copy.next_chunk(self.next_read, chunk) else {
                        continue;
                    };
                    let len = len as usize;
                    self.iovecs.0[i] = [self.buffers[i].iovec(len)];
                    let iov = &self.iovecs.0[i];
                    // SAFETY: the iovec (kept in `self.iovecs`) points into
                    // buffer i, owned by `self`; slot i stays Reading (so
                    // nothing else touches either) until its completion is
                    // reaped, and `drain` reaps every one before they go.
                    unsafe { io.src.read_vectored(offset, iov, i as u64) }
                        .map_err(|e| queue(IoOperation::Read, e))?;
                    *slot = Slot::Reading { offset, len };
                    self.next_read = offset + len as u64;
                    self.in_flight += 1;
                }
                Slot::Full { offset, len } if self.write_budget >= len as u64 => {
                    self.iovecs.0[i] = [self.buffers[i].iovec(len)];
                    let iov = &self.iovecs.0[i];
                    // SAFETY: as above; the buffer holds what was read and
                    // stays untouched while the slot is Writing.
                    unsafe { io.dst.write_vectored(offset, iov, i as u64) }
                        .map_err(|e| queue(IoOperation::Write, e))?;
                    *slot = Slot::Writing { offset, len };
                    self.write_budget -= len as u64;
                    self.in_flight += 1;
                }
                _ => {}
            }
        }
        io.src.submit().map_err(|e| queue(IoOperation::Read, e))?;
        io.dst.submit().map_err(|e| queue(IoOperation::Write, e))
    }

    /// Takes the reads of the target those the job hosts asked for, asks
    /// for the granules they need copied, and starts those whose granules
    /// are all on the target.
    fn serve_fleece(&mut self) {
        let chunk = self.chunk as u64;
        let len = self.len;
        let Some(io) = self.running.as_mut() else {
            return;
        };
        let (Some(fleece), Some(cbw)) = (io.fleece.as_mut(), io.cbw.as_ref()) else {
            return;
        };
        if fleece.host.has_work() {
            let mut new = Vec::new();
            fleece.host.take_reads(&mut new);
            for read in new {
                let bytes: u64 = read.iovecs.iter().map(|v| v.iov_len as u64).sum();
                match read.offset.checked_add(bytes) {
                    Some(end) if end <= len => {}
                    _ => {
                        read.reply.complete(read.user_data, -libc::EINVAL);
                        continue;
                    }
                }
                if bytes > 0 {
                    for g in read.offset / chunk..=(read.offset + bytes - 1) / chunk {
                        cbw.want(g);
                    }
                }
                fleece.waiting.push(read);
            }
        }
        let mut i = 0;
        while i < fleece.waiting.len() {
            let read = &fleece.waiting[i];
            let bytes: u64 = read.iovecs.iter().map(|v| v.iov_len as u64).sum();
            let ready = bytes == 0
                || cbw.all_written(read.offset / chunk, (read.offset + bytes - 1) / chunk);
            if !ready {
                i += 1;
                continue;
            }
            let read = fleece.waiting.swap_remove(i);
            let k = match fleece.out.iter().position(Option::is_none) {
                Some(k) => k,
                None => {
                    fleece.out.push(None);
                    fleece.out.len() - 1
                }
            };
            // SAFETY: the iovecs point into the hosted reader's buffers,
            // which its engine's contract keeps valid until it has this
            // read's completion, handed back only when the target's engine
            // is done (reap); the iovec array lives in `out[k]` till then.
            let queued = unsafe {
                io.dst.read_vectored(
                    read.offset,
                    std::slice::from_raw_parts(read.iovecs.as_ptr(), read.iovecs.len()),
                    EXPORT_TAG | k as u64,
                )
            };
            match queued {
                Ok(()) => {
                    fleece.out[k] = Some(read);
                    self.in_flight += 1;
                }
                Err(_) => read.reply.complete(read.user_data, -libc::EIO),
            }
        }
    }

    /// Moves the slots of finished operations on, waiting up to a second
    /// for one; the bytes written.
    fn reap(&mut self) -> Result<u64, JobFailure> {
        self.reap_within(1000)
    }

    /// As [`Backup::reap`], waiting at most `wait_ms` for a completion.
    fn reap_within(&mut self, wait_ms: i32) -> Result<u64, JobFailure> {
        let io = self.running.as_mut().expect("engines live until clean");
        let mut events = [EpollEvent::default(); 4];
        let mut written = 0;
        let mut error = None;
        let mut any = false;
        for round in 0..2 {
            while let Some(c) = io.src.next_completion() {
                any = true;
                self.in_flight -= 1;
                let i = c.user_data as usize;
                if let Some(Slot::Reading { offset, len }) = self.slots.get(i).copied() {
                    let first = io.cbw.as_ref().is_none_or(|cbw| {
                        c.result != len as i32 || cbw.claim(offset / self.chunk as u64)
                    });
                    if !first {
                        // Another read of this granule came first: this
                        // one may have seen a write that followed it.
                        self.slots[i] = Slot::Free;
                    } else if c.result == len as i32 {
                        self.slots[i] = Slot::Full { offset, len };
                    } else {
                        self.slots[i] = Slot::Free;
                        error.get_or_insert(failure(IoOperation::Read, c.result));
                    }
                }
            }
            while let Some(c) = io.dst.next_completion() {
                any = true;
                self.in_flight -= 1;
                if c.user_data == FLUSH {
                    if c.result < 0 {
                        error.get_or_insert(failure(IoOperation::Write, c.result));
                    }
                    continue;
                }
                if c.user_data & EXPORT_TAG != 0 {
                    let k = (c.user_data & !EXPORT_TAG) as usize;
                    if let Some(read) = io.fleece.as_mut().and_then(|f| f.out.get_mut(k)?.take()) {
                        read.reply.complete(read.user_data, c.result);
                    }
                    continue;
                }
                let i = c.user_data as usize;
                if let Some(Slot::Writing { offset, len }) = self.slots.get(i).copied() {
                    self.slots[i] = Slot::Free;
                    if c.result == len as i32 {
                        written += len as u64;
                        if let Some(cbw) = io.cbw.as_ref() {
                            cbw.written(offset / self.chunk as u64);
                        }
                        if let Some(rest) = &mut self.not_copied {
                            rest.unmark(offset, len as u64);
                        }
                    } else {
                        error.get_or_insert(failure(IoOperation::Write, c.result));
                    }
                }
            }
            if !any && round == 0 {
                match io.wait.wait(wait_ms, &mut events) {
                    Ok(n) => {
                        for e in &events[..n] {
                            let _ = match e.data() {
                                0 => io.src.notifier().read(),
                                1 => io.dst.notifier().read(),
                                3 => io.fleece.as_ref().map_or(Ok(0), |f| f.host.kick().read()),
                                _ => io.cbw.as_ref().map_or(Ok(0), |c| c.wake().read()),
                            };
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(JobFailure::new(format!("waiting for I/O failed: {e}"))),
                }
            }
        }
        if any {
            self.last_completion = Instant::now();
        }
        self.written += written;
        error.map_or(Ok(written), Err)
    }

    /// Gives up on operations in flight that have not completed for
    /// `io_timeout`: see [`Backup::abandon`].
    fn check_stall(&mut self) -> Result<(), JobFailure> {
        if self.in_flight > 0 && self.last_completion.elapsed() >= self.io_timeout {
            return Err(self.abandon());
        }
        Ok(())
    }

    /// Leaks the buffers, the engines and both leases: the kernel may
    /// still write into the buffers and onto both nodes, so neither the
    /// memory nor the nodes may go to anyone else. The nodes stay in use
    /// by this job (as `query-named-block-nodes` shows) until the process
    /// ends.
    fn abandon(&mut self) -> JobFailure {
        let in_flight = std::mem::take(&mut self.in_flight);
        let Some(running) = self.running.take() else {
            return JobFailure::new("the backup's I/O never completed");
        };
        let message = format!(
            "{in_flight} I/O operations on nodes '{}' and '{}' did not complete within {}s; \
             both nodes stay in use by this job until the VMM ends",
            running.source.node().name(),
            running.target.node().name(),
            self.io_timeout.as_secs_f64()
        );
        log::error!("backup: {message}");
        // The guest's held writes must not wait for a job that gave up.
        if let Some(cbw) = running.cbw.as_ref() {
            cbw.finish();
        }
        std::mem::forget(std::mem::take(&mut self.buffers));
        std::mem::forget(running);
        JobFailure::new(message)
    }

    /// Reaps everything in flight, so no buffer is in the kernel's hands;
    /// if that stalls for `io_timeout`, abandons it (see [`Backup::abandon`]).
    fn drain(&mut self) -> Result<(), JobFailure> {
        while self.running.is_some() && self.in_flight > 0 {
            self.check_stall()?;
            if let Err(e) = self.reap() {
                log::debug!("backup: while draining: {e}");
            }
        }
        Ok(())
    }

    /// Fails the job after every operation in flight has ended.
    /// If they never end, the job fails with that instead.
    fn fail(&mut self, e: JobFailure) -> Result<Step, JobFailure> {
        self.drain()?;
        Err(e)
    }
}

impl JobDriver for Backup {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    fn total(&self) -> u64 {
        self.len
    }

    /// Keeps up to `SLOTS` chunks moving until `STEP_BYTES` more are
    /// written; reads of the next chunks may stay in flight between steps.
    fn step(&mut self) -> Result<Step, JobFailure> {
        if self.flushed || self.running.is_none() {
            return Ok(Step::Done);
        }
        if let Some(e) = self.serve_error.take() {
            return self.fail(e);
        }
        let mut done = std::mem::take(&mut self.served);
        // Reads run ahead across steps; writes stay within the step.
        self.write_budget = STEP_BYTES;
        if self.sync == SyncMode::None {
            // Copies what writes are about to change, until cancelled; a
            // step waits about a second for that, then lets the runtime
            // look at pause and cancel.
            if let Err(e) = self.submit() {
                return self.fail(e);
            }
            return match self.reap() {
                Ok(n) => Ok(Step::Progress(done + n)),
                Err(e) => self.fail(e),
            };
        }
        while self.written < self.len && done < STEP_BYTES {
            if let Err(e) = self.submit() {
                return self.fail(e);
            }
            if self.in_flight == 0 {
                // Nothing could start within this step's budget.
                break;
            }
            let before = self.last_completion;
            match self.reap() {
                Ok(n) => done += n,
                Err(e) => return self.fail(e),
            }
            if self.last_completion == before {
                // A second without a completion: let the runtime look at
                // pause and cancel, unless the I/O has stalled for good.
                self.check_stall()?;
                break;
            }
        }
        if self.written >= self.len {
            // Done means durable: the target is flushed before the job ends.
            let io = self.running.as_mut().expect("checked above");
            let queued = io.dst.flush(FLUSH).and_then(|_| io.dst.submit());
            if let Err(e) = queued {
                return self.fail(JobFailure::io(
                    IoOperation::Write,
                    &std::io::Error::other(e),
                ));
            }
            self.in_flight += 1;
            while self.in_flight > 0 {
                if let Err(e) = self.reap() {
                    return self.fail(e);
                }
                self.check_stall()?;
            }
            self.flushed = true;
        }
        Ok(Step::Progress(done))
    }

    fn serves(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.cbw.is_some() || r.fleece.is_some())
    }

    fn serve(&mut self, wait: Duration) -> bool {
        let hosted = self
            .running
            .as_ref()
            .is_some_and(|r| r.cbw.is_some() || r.fleece.is_some());
        if !hosted || self.flushed {
            return false;
        }
        // Copies a held write waits for, and writes of what was read, are
        // not the job's progress: neither pause nor the speed limit holds
        // them back (the guest would stall), as in QEMU's write path.
        self.serving = true;
        let budget = std::mem::replace(&mut self.write_budget, u64::MAX);
        let result = self
            .submit()
            .and_then(|_| self.reap_within(wait.as_millis().clamp(1, 1000) as i32));
        self.write_budget = budget;
        self.serving = false;
        match result {
            Ok(n) => self.served += n,
            Err(e) => {
                self.serve_error.get_or_insert(e);
            }
        }
        true
    }

    fn commit(&mut self) {
        if let Some(frozen) = self.frozen.take() {
            frozen.finish(true, None);
        }
    }

    fn abort(&mut self) {
        if let Some(frozen) = self.frozen.take() {
            frozen.finish(false, self.not_copied.as_ref());
        }
    }

    fn clean(&mut self) {
        // A stall here is logged by `abandon`; the job's outcome (cancelled,
        // most likely) is already decided.
        let _ = self.drain();
        if let Some(fleece) = self.running.as_mut().and_then(|r| r.fleece.as_mut()) {
            // Reads still waiting for copies that will not come.
            fleece.host.close();
            for read in fleece.waiting.drain(..) {
                read.reply.complete(read.user_data, -libc::EIO);
            }
        }
        if let Some(running) = self.running.take() {
            log::debug!(
                "backup of '{}' to '{}' releases both nodes",
                running.source.node().name(),
                running.target.node().name()
            );
            // Engines close before the leases go; the nodes stay open for
            // whoever else references them.
        }
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        // A job dropped without clean (its creation failed) may not leave
        // buffers in the kernel's hands.
        let _ = self.drain();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::graph::{DriverOptions, FileOptions, Graph, NodeOptions};
    use crate::job::{JobEvent, JobManager, JobOptions, JobStatus};

    struct Image(PathBuf);

    impl Image {
        /// `len` bytes of a pattern seeded by `seed` (0: all zeros).
        fn new(name: &str, len: usize, seed: u64) -> Self {
            let path =
                std::env::temp_dir().join(format!("block-backup-{}-{name}", std::process::id()));
            let mut x = seed;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if seed == 0 {
                        return 0;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(&path, bytes).unwrap();
            Self(path)
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file_node(graph: &Graph, name: &str, image: &Image) {
        graph
            .add(NodeOptions {
                node_name: Some(name.into()),
                read_only: false,
                driver: DriverOptions::File(FileOptions::new(image.0.clone())),
            })
            .unwrap();
    }

    type Seen = Arc<Mutex<Vec<JobEvent>>>;

    fn recorder() -> (crate::job::EventSink, Seen) {
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        (Arc::new(move |e| sink.lock().unwrap().push(e)), seen)
    }

    fn job(id: &str) -> Holder {
        Holder::Job { id: id.into() }
    }

    /// Starts a backup of `src` to `dst` as job `id`, kept once concluded.
    fn start(graph: &Graph, jobs: &JobManager, id: &str, speed: i64) -> Seen {
        let source = graph.get("src", job(id)).unwrap();
        let target = graph.get("dst", job(id)).unwrap();
        let backup = Backup::new(id, &source, &target).unwrap();
        launch(jobs, id, backup, speed)
    }

    /// Creates and starts job `id` running `backup`, kept once concluded.
    fn launch(jobs: &JobManager, id: &str, backup: Backup, speed: i64) -> Seen {
        let (events, seen) = recorder();
        let options = JobOptions {
            auto_finalize: true,
            auto_dismiss: false,
            speed,
        };
        jobs.create(id, Box::new(backup), options, events).unwrap();
        jobs.start(id).unwrap();
        seen
    }

    #[test]
    fn backup_copies_every_byte_and_releases_both_nodes() {
        // Not a whole number of chunks, to cover the last short one.
        let len = 9 * CHUNK + 512;
        let src = Image::new("copy-src", len, 7);
        let dst = Image::new("copy-dst", len, 0);
        let before = src.bytes();
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let jobs = JobManager::new();
        let seen = start(&graph, &jobs, "b0", 0);
        jobs.wait_for("b0", JobStatus::Concluded, Duration::from_secs(30))
            .unwrap();
        let info = jobs.info("b0").unwrap();
        assert_eq!(info.error, None);
        assert_eq!(
            (info.current_progress, info.total_progress),
            (len as u64, len as u64)
        );
        assert!(dst.bytes() == before, "the target equals the source");
        assert!(src.bytes() == before, "the source is unchanged");
        let completed = seen
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, JobEvent::Completed { error: None, offset, .. } if *offset == len as u64));
        assert!(completed, "{:?}", seen.lock().unwrap());
        for name in ["src", "dst"] {
            let node = graph.get(name, job("check")).unwrap();
            assert_eq!(graph.info(&node).lease, None, "{name} released");
        }
        jobs.dismiss("b0").unwrap();
        // Nothing holds the nodes any more: the user may delete them.
        graph.remove("src").unwrap();
        graph.remove("dst").unwrap();
    }

    #[test]
    fn backup_is_refused_at_once_while_another_holder_has_a_lease() {
        let src = Image::new("busy-src", CHUNK, 3);
        let dst = Image::new("busy-dst", CHUNK, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let source = graph.get("src", job("b1")).unwrap();
        let target = graph.get("dst", job("b1")).unwrap();
        let dataplane = Holder::Dataplane {
            kind: "virtio-blk",
            id: "vda".into(),
        };
        let held = source.take_lease(dataplane.clone()).unwrap();
        let err = Backup::new("b1", &source, &target).err().unwrap();
        assert_eq!(
            err.to_string(),
            "Node 'src' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
        );
        assert_eq!(graph.info(&target).lease, None, "nothing half-taken");
        drop(held);
        let held = target.take_lease(dataplane).unwrap();
        assert!(Backup::new("b1", &source, &target).is_err());
        assert_eq!(
            graph.info(&source).lease,
            None,
            "the source lease went back"
        );
        drop(held);
        let err = Backup::new("b1", &source, &source).err().unwrap();
        assert!(matches!(err, BackupError::SameNode(_)), "{err}");
    }

    #[test]
    fn sizes_must_match_and_the_target_must_be_writable() {
        let src = Image::new("size-src", CHUNK, 3);
        let dst = Image::new("size-dst", 2 * CHUNK, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let source = graph.get("src", job("b2")).unwrap();
        let target = graph.get("dst", job("b2")).unwrap();
        let err = Backup::new("b2", &source, &target).err().unwrap();
        assert!(
            err.to_string()
                .starts_with("Source and target image have different sizes"),
            "{err}"
        );
        // Its own image: a read-only node on `src` would be refused while
        // the node 'src' has it open for writing.
        let ro_image = Image::new("size-ro", CHUNK, 0);
        graph
            .add(NodeOptions {
                node_name: Some("ro".into()),
                read_only: true,
                driver: DriverOptions::File(FileOptions::new(ro_image.0.clone())),
            })
            .unwrap();
        let ro = graph.get("ro", job("b2")).unwrap();
        let err = Backup::new("b2", &source, &ro).err().unwrap();
        assert!(matches!(err, BackupError::ReadOnlyTarget(_)), "{err}");
    }

    #[test]
    fn a_cancelled_backup_leaves_the_source_intact_and_releases_both_nodes() {
        let len = 16 * CHUNK;
        let src = Image::new("cancel-src", len, 11);
        let dst = Image::new("cancel-dst", len, 0);
        let before = src.bytes();
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let jobs = JobManager::new();
        // 1 MiB/s: the first step goes at once, then the job waits.
        let seen = start(&graph, &jobs, "b3", 1 << 20);
        std::thread::sleep(Duration::from_millis(100));
        jobs.cancel("b3").unwrap();
        jobs.wait_for("b3", JobStatus::Concluded, Duration::from_secs(10))
            .unwrap();
        let offset = jobs.info("b3").unwrap().current_progress;
        assert!(offset < len as u64, "cancelled before the end ({offset})");
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, JobEvent::Cancelled { .. })),
            "{:?}",
            seen.lock().unwrap()
        );
        assert!(src.bytes() == before, "the source is unchanged");
        let source = graph.get("src", job("check")).unwrap();
        assert_eq!(graph.info(&source).lease, None);
        source.take_lease(job("next")).unwrap();
    }

    #[test]
    fn a_failed_backup_reports_the_error_and_releases_both_nodes() {
        let len = 8 * CHUNK;
        let src = Image::new("fail-src", len, 13);
        let dst = Image::new("fail-dst", len, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        // The file shrinks under its node: reads past 2 MiB come back short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&src.0)
            .unwrap()
            .set_len(2 * CHUNK as u64)
            .unwrap();
        let before = src.bytes();
        let jobs = JobManager::new();
        let seen = start(&graph, &jobs, "b5", 0);
        jobs.wait_for("b5", JobStatus::Concluded, Duration::from_secs(30))
            .unwrap();
        let info = jobs.info("b5").unwrap();
        assert_eq!(info.error.as_deref(), Some("Input/output error"));
        assert!(info.current_progress < len as u64);
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter().any(|e| matches!(
                e,
                JobEvent::IoError {
                    operation: IoOperation::Read,
                    ..
                }
            )),
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .any(|e| matches!(e, JobEvent::Completed { error: Some(_), .. })),
            "{seen:?}"
        );
        assert!(src.bytes() == before, "the source is unchanged");
        for name in ["src", "dst"] {
            let node = graph.get(name, job("check")).unwrap();
            assert_eq!(graph.info(&node).lease, None, "{name} released");
        }
    }

    /// An engine that takes every operation and never completes one, as
    /// io_uring on a hung file system would.
    struct StuckIo(vmm_sys_util::eventfd::EventFd);

    impl StuckIo {
        fn boxed() -> Box<dyn AsyncIo> {
            Box::new(Self(
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ))
        }
    }

    impl AsyncIo for StuckIo {
        fn notifier(&self) -> &vmm_sys_util::eventfd::EventFd {
            &self.0
        }
        unsafe fn read_vectored(
            &mut self,
            _: u64,
            _: &[libc::iovec],
            _: u64,
        ) -> Result<(), crate::io::IoError> {
            Ok(())
        }
        unsafe fn write_vectored(
            &mut self,
            _: u64,
            _: &[libc::iovec],
            _: u64,
        ) -> Result<(), crate::io::IoError> {
            Ok(())
        }
        fn flush(&mut self, _: u64) -> Result<(), crate::io::IoError> {
            Ok(())
        }
        fn punch_hole(&mut self, _: u64, _: u64, _: u64) -> Result<(), crate::io::IoError> {
            Ok(())
        }
        fn write_zeroes(&mut self, _: u64, _: u64, _: u64) -> Result<(), crate::io::IoError> {
            Ok(())
        }
        fn submit(&mut self) -> Result<(), crate::io::IoError> {
            Ok(())
        }
        fn next_completion(&mut self) -> Option<crate::io::Completion> {
            None
        }
    }

    /// A backup of `src` to `dst` whose source engine never completes,
    /// giving up after a short while instead of a minute.
    fn stuck_backup(graph: &Graph, jobs: &JobManager, id: &str, speed: i64) -> Seen {
        let source = graph.get("src", job(id)).unwrap();
        let target = graph.get("dst", job(id)).unwrap();
        let mut backup = Backup::with_engines(id, &source, &target, |lease, depth| {
            if lease.node().name() == "src" {
                Ok(StuckIo::boxed())
            } else {
                lease.open_io(depth)
            }
        })
        .unwrap();
        backup.io_timeout = Duration::from_millis(1500);
        launch(jobs, id, backup, speed)
    }

    fn assert_still_held(graph: &Graph, id: &str) {
        for name in ["src", "dst"] {
            let node = graph.get(name, job("check")).unwrap();
            assert_eq!(graph.info(&node).lease, Some(job(id)), "{name} kept");
            let err = node.take_lease(job("next")).unwrap_err();
            assert!(err.to_string().contains(id), "{err}");
        }
    }

    #[test]
    fn a_backup_whose_io_never_completes_fails_and_keeps_both_leases() {
        let src = Image::new("stuck-src", 4 * CHUNK, 3);
        let dst = Image::new("stuck-dst", 4 * CHUNK, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let jobs = JobManager::new();
        let seen = stuck_backup(&graph, &jobs, "b6", 0);
        jobs.wait_for("b6", JobStatus::Concluded, Duration::from_secs(20))
            .unwrap();
        let error = jobs.info("b6").unwrap().error.unwrap();
        assert!(
            error.contains("did not complete") && error.contains("'src' and 'dst'"),
            "{error}"
        );
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, JobEvent::Completed { error: Some(_), .. })),
            "{:?}",
            seen.lock().unwrap()
        );
        assert_still_held(&graph, "b6");
    }

    #[test]
    fn a_cancelled_backup_whose_io_never_completes_keeps_both_leases() {
        let src = Image::new("stuck-cancel-src", 4 * CHUNK, 3);
        let dst = Image::new("stuck-cancel-dst", 4 * CHUNK, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let jobs = JobManager::new();
        stuck_backup(&graph, &jobs, "b7", 0);
        std::thread::sleep(Duration::from_millis(100));
        jobs.cancel("b7").unwrap();
        jobs.wait_for("b7", JobStatus::Concluded, Duration::from_secs(20))
            .unwrap();
        assert_still_held(&graph, "b7");
    }

    #[test]
    fn the_speed_limit_holds_the_copy_back() {
        // 16 MiB at 16 MiB/s: after the first step goes at once, the
        // other three wait their turn, so the copy cannot end before
        // three quarters of a second.
        let len = 16 * CHUNK;
        let src = Image::new("speed-src", len, 5);
        let dst = Image::new("speed-dst", len, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let jobs = JobManager::new();
        let started = Instant::now();
        start(&graph, &jobs, "b4", 16 << 20);
        jobs.wait_for("b4", JobStatus::Concluded, Duration::from_secs(30))
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(700),
            "16 MiB at 16 MiB/s took only {took:?}"
        );
        assert_eq!(jobs.info("b4").unwrap().error, None);
        assert!(dst.bytes() == src.bytes());
    }

    const K64: u64 = 64 << 10;

    /// Writes `len` bytes of a fresh pattern at `offset` of `image`, as a
    /// guest would, and marks them as the dataplane does.
    fn guest_write(image: &Image, node: &NodeRef, offset: u64, len: usize, seed: u8) {
        use std::os::unix::fs::FileExt;
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image.0)
            .unwrap();
        file.write_all_at(&data, offset).unwrap();
        node.bitmaps().mark(offset, len as u64);
    }

    fn add_bitmap(node: &NodeRef) {
        crate::bitmap::add_to_node(node, "b", Some(K64), false, false).unwrap();
    }

    fn dirty(node: &NodeRef) -> Vec<(u64, u64)> {
        node.bitmaps().snapshot("b").unwrap().extents().collect()
    }

    fn run_to_end(jobs: &JobManager, id: &str, backup: Backup) -> crate::job::JobInfo {
        launch(jobs, id, backup, 0);
        jobs.wait_for(id, JobStatus::Concluded, Duration::from_secs(30))
            .unwrap();
        jobs.info(id).unwrap()
    }

    fn sync_bitmap(mode: BitmapSyncMode) -> Option<SyncBitmap> {
        Some(SyncBitmap {
            name: "b".into(),
            mode,
        })
    }

    #[test]
    fn an_incremental_backup_copies_exactly_the_dirty_extents() {
        let len = 8 * CHUNK;
        let src = Image::new("inc-src", len, 17);
        let dst = Image::new("inc-dst", len, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let source = graph.get("src", job("i0")).unwrap();
        let target = graph.get("dst", job("i0")).unwrap();
        add_bitmap(&source);
        // One byte, a range across two granules and past a chunk, and the
        // disk's last sector.
        guest_write(&src, &source, K64 + 7, 1, 1);
        guest_write(&src, &source, (1 << 20) - 100, 200_000, 2);
        guest_write(&src, &source, len as u64 - 512, 512, 3);
        let expected_extents = [
            (K64, K64),
            ((1 << 20) - K64, 5 * K64),
            (len as u64 - K64, K64),
        ];
        assert_eq!(dirty(&source), expected_extents);
        let count = source.bitmaps().info()[0].count;
        assert_eq!(count, 7 * K64);

        let backup = Backup::with_sync(
            "i0",
            &source,
            &target,
            SyncMode::Bitmap,
            sync_bitmap(BitmapSyncMode::OnSuccess),
        )
        .unwrap();
        let info = run_to_end(&JobManager::new(), "i0", backup);
        assert_eq!(info.error, None);
        assert_eq!((info.current_progress, info.total_progress), (count, count));
        // The dirty extents hold the source's bytes; the rest is untouched.
        let (s, d) = (src.bytes(), dst.bytes());
        let mut expected = vec![0u8; len];
        for (offset, n) in expected_extents {
            let r = offset as usize..(offset + n) as usize;
            expected[r.clone()].copy_from_slice(&s[r]);
        }
        assert!(d == expected, "only the dirty extents were copied");
        assert_eq!(dirty(&source), [], "on success the bitmap starts afresh");
        assert!(!source.bitmaps().info()[0].busy);
    }

    #[test]
    fn a_full_backup_with_a_bitmap_copies_everything_and_clears_it() {
        let len = 2 * CHUNK;
        let src = Image::new("fullbm-src", len, 19);
        let dst = Image::new("fullbm-dst", len, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let source = graph.get("src", job("i1")).unwrap();
        let target = graph.get("dst", job("i1")).unwrap();
        add_bitmap(&source);
        guest_write(&src, &source, 0, 4096, 4);
        let backup = Backup::with_sync(
            "i1",
            &source,
            &target,
            SyncMode::Full,
            sync_bitmap(BitmapSyncMode::OnSuccess),
        )
        .unwrap();
        let info = run_to_end(&JobManager::new(), "i1", backup);
        assert_eq!((info.error, info.total_progress), (None, len as u64));
        assert!(dst.bytes() == src.bytes());
        assert_eq!(dirty(&source), []);
    }

    /// A bitmap backup in `mode` of a source whose file shrinks to 2 MiB
    /// under it, dirty at 0 and at 3 MiB: reading 3 MiB fails. The
    /// bitmap's extents after the job.
    fn failing_bitmap_backup(name: &str, mode: BitmapSyncMode) -> Vec<(u64, u64)> {
        let len = 4 * CHUNK;
        let src = Image::new(&format!("{name}-src"), len, 23);
        let dst = Image::new(&format!("{name}-dst"), len, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let source = graph.get("src", job(name)).unwrap();
        let target = graph.get("dst", job(name)).unwrap();
        add_bitmap(&source);
        guest_write(&src, &source, 0, 4096, 5);
        guest_write(&src, &source, 3 << 20, 4096, 6);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&src.0)
            .unwrap()
            .set_len(2 * CHUNK as u64)
            .unwrap();
        let backup =
            Backup::with_sync(name, &source, &target, SyncMode::Bitmap, sync_bitmap(mode)).unwrap();
        let info = run_to_end(&JobManager::new(), name, backup);
        assert_eq!(info.error.as_deref(), Some("Input/output error"));
        let copied = dst.bytes()[..4096] != [0u8; 4096][..];
        let after = dirty(&source);
        assert!(after.contains(&(3 << 20, K64)), "{after:?}");
        // Only `always` may forget a granule, and only one it copied.
        if after.len() == 1 {
            assert!(
                mode == BitmapSyncMode::Always && copied,
                "{mode:?} {after:?}"
            );
        }
        after
    }

    #[test]
    fn a_failed_bitmap_backup_loses_no_dirty_extent_it_did_not_copy() {
        for mode in [BitmapSyncMode::OnSuccess, BitmapSyncMode::Never] {
            assert_eq!(
                failing_bitmap_backup(&format!("fail-{}", mode.as_str()), mode),
                [(0, K64), (3 << 20, K64)]
            );
        }
        failing_bitmap_backup("fail-always", BitmapSyncMode::Always);
    }

    #[test]
    fn bitmap_mode_never_leaves_the_bitmap_as_it_was() {
        let len = CHUNK;
        let src = Image::new("never-src", len, 29);
        let dst = Image::new("never-dst", len, 0);
        let graph = Graph::new();
        file_node(&graph, "src", &src);
        file_node(&graph, "dst", &dst);
        let source = graph.get("src", job("i2")).unwrap();
        let target = graph.get("dst", job("i2")).unwrap();
        add_bitmap(&source);
        guest_write(&src, &source, 2 * K64, 10, 7);
        let backup = Backup::with_sync(
            "i2",
            &source,
            &target,
            SyncMode::Bitmap,
            sync_bitmap(BitmapSyncMode::Never),
        )
        .unwrap();
        let info = run_to_end(&JobManager::new(), "i2", backup);
        assert_eq!((info.error, info.total_progress), (None, K64));
        assert_eq!(dirty(&source), [(2 * K64, K64)]);
    }

    #[test]
    fn sync_arguments_are_checked_as_qemu_checks_them() {
        let graph = Graph::new();
        graph
            .add(NodeOptions {
                node_name: Some("n".into()),
                read_only: false,
                driver: DriverOptions::Null { size: 1 << 20 },
            })
            .unwrap();
        let node = graph.get("n", job("c")).unwrap();
        add_bitmap(&node);
        use BitmapSyncMode::*;
        let check =
            |sync, bitmap, mode| check_sync(sync, bitmap, mode, &node).map_err(|e| e.to_string());
        let err = |sync, bitmap, mode| check(sync, bitmap, mode).unwrap_err();
        assert_eq!(
            err("incremental", None, None),
            "must provide a valid bitmap name for 'incremental' sync mode"
        );
        assert_eq!(
            err("bitmap", None, Some(Always)),
            "must provide a valid bitmap name for 'bitmap' sync mode"
        );
        assert_eq!(
            err("full", None, Some(Always)),
            "Cannot specify bitmap sync mode without a bitmap"
        );
        assert_eq!(
            err("bitmap", Some("x"), None),
            "Bitmap 'x' could not be found"
        );
        assert_eq!(
            err("bitmap", Some("b"), None),
            "Bitmap sync mode must be given when providing a bitmap"
        );
        assert_eq!(
            err("full", Some("b"), None),
            "Bitmap sync mode must be given when providing a bitmap"
        );
        assert_eq!(
            err("incremental", Some("b"), Some(Never)),
            "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
        );
        assert_eq!(
            err("full", Some("b"), Some(Never)),
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"
        );
        let on_success = sync_bitmap(OnSuccess);
        assert_eq!(
            check("incremental", Some("b"), None),
            Ok((SyncMode::Bitmap, on_success.clone()))
        );
        assert_eq!(
            check("full", Some("b"), Some(OnSuccess)),
            Ok((SyncMode::Full, on_success))
        );
        assert_eq!(check("full", None, None), Ok((SyncMode::Full, None)));
        let frozen = node.bitmaps().freeze("b", Always).unwrap();
        assert_eq!(
            err("bitmap", Some("b"), Some(Always)),
            "Bitmap 'b' is currently in use by another operation and cannot be used"
        );
        drop(frozen);
    }

    #[test]
    fn copy_sets_give_chunks_in_order() {
        assert_eq!(CopySet::All(10).next_chunk(0, 4), Some((0, 4)));
        assert_eq!(CopySet::All(10).next_chunk(8, 4), Some((8, 2)));
        assert_eq!(CopySet::All(10).next_chunk(10, 4), None);
        // A 2 MiB granule larger than the chunk: copied a chunk at a time.
        let mut b = DirtyBitmap::new(8 << 20, 2 << 20).unwrap();
        b.mark(2 << 20, 1);
        let set = CopySet::Dirty(b);
        assert_eq!(set.total(), 2 << 20);
        let mb = 1 << 20;
        assert_eq!(set.next_chunk(0, mb), Some((2 * mb, mb)));
        assert_eq!(set.next_chunk(3 * mb, mb), Some((3 * mb, mb)));
        assert_eq!(set.next_chunk(4 * mb, mb), None);
    }
}

#[cfg(test)]
#[path = "fleece_tests.rs"]
mod fleece_tests;
