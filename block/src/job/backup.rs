//! The backup job (`blockdev-backup`, `sync=full`): copies every byte of
//! a source node to a target node of the same size. It holds both nodes'
//! leases while it runs, so nobody writes the source under the copy and
//! nobody else writes the target; it only ever reads the source, so a
//! failed or cancelled backup leaves the source as it was.

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{IoOperation, JobDriver, JobFailure, Step};
use crate::error::BlockError;
use crate::graph::{Holder, Lease, NodeRef};
use crate::io::{AsyncIo, Completion};

/// Bytes per read or write.
const CHUNK: usize = 1 << 20;
/// Chunks in flight at once: reads of one batch, then its writes.
const BATCH: usize = 4;
/// O_DIRECT wants buffers aligned to the logical block size; a page is safe.
const ALIGN: usize = 4096;

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

/// The engines of a running backup, each with the epoll that waits on it.
struct Engines {
    src: Box<dyn AsyncIo>,
    dst: Box<dyn AsyncIo>,
    wait_src: Epoll,
    wait_dst: Epoll,
}

/// A full copy of one node to another.
pub struct Backup {
    // Engines first: they must close before the leases that opened them.
    io: Option<Engines>,
    leases: Option<(Lease, Lease)>,
    source_name: String,
    target_name: String,
    len: u64,
    offset: u64,
    buffers: Vec<AlignedBuf>,
}

fn epoll_on(io: &dyn AsyncIo) -> std::io::Result<Epoll> {
    use std::os::fd::AsRawFd;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        io.notifier().as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    Ok(epoll)
}

impl Backup {
    /// Takes both leases for job `job` (refused at once if anyone holds
    /// either) and opens an engine on each.
    pub fn new(job: &str, source: &NodeRef, target: &NodeRef) -> Result<Self, BackupError> {
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
        let source_lease = source.take_lease(holder.clone())?;
        let target_lease = target.take_lease(holder)?;
        let depth = BATCH as u32 + 1;
        let src = source_lease.open_io(depth)?;
        let dst = target_lease.open_io(depth)?;
        let setup = |node: &str, e: std::io::Error| BlockError::Options {
            node: node.into(),
            reason: format!("cannot wait for its I/O: {e}"),
        };
        let wait_src = epoll_on(src.as_ref()).map_err(|e| setup(source.name(), e))?;
        let wait_dst = epoll_on(dst.as_ref()).map_err(|e| setup(target.name(), e))?;
        Ok(Self {
            io: Some(Engines {
                src,
                dst,
                wait_src,
                wait_dst,
            }),
            leases: Some((source_lease, target_lease)),
            source_name: source.name().into(),
            target_name: target.name().into(),
            len: source_size,
            offset: 0,
            buffers: (0..BATCH).map(|_| AlignedBuf::new(CHUNK)).collect(),
        })
    }

    /// Copies the next batch (up to `BATCH` chunks); the bytes copied, or
    /// 0 once everything is copied and the target flushed.
    fn copy_next(&mut self) -> Result<u64, JobFailure> {
        if self.offset >= self.len {
            return Ok(0);
        }
        let Some(io) = self.io.as_mut() else {
            return Err(JobFailure::new("the backup has already ended"));
        };
        let mut chunks: Vec<(u64, usize)> = Vec::with_capacity(BATCH);
        let mut at = self.offset;
        while chunks.len() < BATCH && at < self.len {
            let n = (self.len - at).min(CHUNK as u64) as usize;
            chunks.push((at, n));
            at += n as u64;
        }
        let iovecs: Vec<[libc::iovec; 1]> = chunks
            .iter()
            .zip(self.buffers.iter_mut())
            .map(|(&(_, n), buf)| [buf.iovec(n)])
            .collect();
        let submit = |op, e: crate::io::IoError| JobFailure::io(op, &std::io::Error::other(e));
        for (i, (&(off, _), iov)) in chunks.iter().zip(&iovecs).enumerate() {
            // SAFETY: each iovec points into one of our own buffers, which
            // live in `self` and are not touched until wait_all below has
            // reaped every completion of this batch.
            unsafe { io.src.read_vectored(off, iov, i as u64) }
                .map_err(|e| submit(IoOperation::Read, e))?;
        }
        io.src.submit().map_err(|e| submit(IoOperation::Read, e))?;
        wait_all(io.src.as_mut(), &io.wait_src, &chunks, IoOperation::Read)?;
        for (i, (&(off, _), iov)) in chunks.iter().zip(&iovecs).enumerate() {
            // SAFETY: as above; the buffers now hold what was read.
            unsafe { io.dst.write_vectored(off, iov, i as u64) }
                .map_err(|e| submit(IoOperation::Write, e))?;
        }
        io.dst.submit().map_err(|e| submit(IoOperation::Write, e))?;
        wait_all(io.dst.as_mut(), &io.wait_dst, &chunks, IoOperation::Write)?;
        let copied = at - self.offset;
        self.offset = at;
        if self.offset >= self.len {
            // Done means durable: the target is flushed before the job ends.
            io.dst
                .flush(u64::MAX)
                .and_then(|_| io.dst.submit())
                .map_err(|e| submit(IoOperation::Write, e))?;
            let flushed = wait_one(io.dst.as_mut(), &io.wait_dst)?;
            if flushed.result < 0 {
                return Err(JobFailure::io(
                    IoOperation::Write,
                    &std::io::Error::from_raw_os_error(-flushed.result),
                ));
            }
        }
        Ok(copied)
    }
}

impl JobDriver for Backup {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    fn total(&self) -> u64 {
        self.len
    }

    fn step(&mut self) -> Result<Step, JobFailure> {
        match self.copy_next()? {
            0 => Ok(Step::Done),
            n => Ok(Step::Progress(n)),
        }
    }

    fn clean(&mut self) {
        // Engines close before the leases go; the nodes stay open for
        // whoever else references them.
        self.io = None;
        self.leases = None;
        log::debug!(
            "backup of '{}' to '{}' released both nodes",
            self.source_name,
            self.target_name
        );
    }
}

fn wait_one(io: &mut dyn AsyncIo, epoll: &Epoll) -> Result<Completion, JobFailure> {
    let mut events = [EpollEvent::default(); 1];
    loop {
        if let Some(c) = io.next_completion() {
            return Ok(c);
        }
        match epoll.wait(1000, &mut events) {
            Ok(_) => {
                let _ = io.notifier().read();
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(JobFailure::new(format!("waiting for I/O failed: {e}"))),
        }
    }
}

/// Waits for one completion per chunk (all of them, so no buffer is in
/// use afterwards); an error or a short transfer fails the batch.
fn wait_all(
    io: &mut dyn AsyncIo,
    epoll: &Epoll,
    chunks: &[(u64, usize)],
    op: IoOperation,
) -> Result<(), JobFailure> {
    let mut first_error = None;
    for _ in chunks {
        let c = wait_one(io, epoll)?;
        let n = chunks.get(c.user_data as usize).map_or(0, |&(_, n)| n);
        if c.result != n as i32 && first_error.is_none() {
            let err = if c.result < 0 {
                std::io::Error::from_raw_os_error(-c.result)
            } else {
                // A short transfer: the node ended early.
                std::io::Error::from_raw_os_error(libc::EIO)
            };
            first_error = Some(JobFailure::io(op, &err));
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::graph::{DriverOptions, Graph, NodeOptions};
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
                driver: DriverOptions::File {
                    filename: image.0.clone(),
                    direct: false,
                },
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
        graph
            .add(NodeOptions {
                node_name: Some("ro".into()),
                read_only: true,
                driver: DriverOptions::File {
                    filename: src.0.clone(),
                    direct: false,
                },
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
    fn the_speed_limit_holds_the_copy_back() {
        // 16 MiB at 16 MiB/s: after the first batch goes at once, the
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
}
