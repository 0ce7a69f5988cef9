//! The backup job (`blockdev-backup`, `sync=full`): copies every byte of
//! a source node to a target node of the same size. It holds both nodes'
//! leases while it runs, so nobody writes the source under the copy and
//! nobody else writes the target; it only ever reads the source, so a
//! failed or cancelled backup leaves the source as it was.

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::error::BlockError;
use crate::graph::{Holder, Lease, NodeRef};
use crate::io::AsyncIo;

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

/// A full copy of one node to another.
pub struct Backup {
    // Engines first: they drop before the leases that opened them.
    src: Box<dyn AsyncIo>,
    dst: Box<dyn AsyncIo>,
    source: Lease,
    target: Lease,
    len: u64,
    offset: u64,
    buffers: Vec<AlignedBuf>,
    epoll_src: Epoll,
    epoll_dst: Epoll,
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
        let epoll_src = epoll_on(src.as_ref()).map_err(|e| setup(source.name(), e))?;
        let epoll_dst = epoll_on(dst.as_ref()).map_err(|e| setup(target.name(), e))?;
        Ok(Self {
            src,
            dst,
            source: source_lease,
            target: target_lease,
            len: source_size,
            offset: 0,
            buffers: (0..BATCH).map(|_| AlignedBuf::new(CHUNK)).collect(),
            epoll_src,
            epoll_dst,
        })
    }

    /// Bytes to copy in all.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes copied so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The source node's name.
    pub fn source_name(&self) -> &str {
        self.source.node().name()
    }

    /// Copies the next batch (up to `BATCH` chunks, never more than
    /// `limit` bytes); returns the bytes copied, 0 once everything is
    /// copied and the target flushed.
    pub fn copy_next(&mut self, limit: u64) -> Result<u64, String> {
        if self.offset >= self.len {
            return Ok(0);
        }
        let mut chunks: Vec<(u64, usize)> = Vec::with_capacity(BATCH);
        let mut at = self.offset;
        let mut budget = limit.max(ALIGN as u64);
        while chunks.len() < BATCH && at < self.len && budget > 0 {
            let n = (self.len - at).min(CHUNK as u64).min(budget) as usize;
            // Whole sectors only: node sizes are multiples of 512.
            let n = if n < 512 { 512.min((self.len - at) as usize) } else { n / 512 * 512 };
            chunks.push((at, n));
            at += n as u64;
            budget = budget.saturating_sub(n as u64);
        }
        let iovecs: Vec<[libc::iovec; 1]> = chunks
            .iter()
            .zip(self.buffers.iter_mut())
            .map(|(&(_, n), buf)| [buf.iovec(n)])
            .collect();
        for (i, (&(off, _), iov)) in chunks.iter().zip(&iovecs).enumerate() {
            // SAFETY: each iovec points into one of our own buffers, which
            // live in `self` and are not touched until wait_all below has
            // reaped every completion of this batch.
            unsafe { self.src.read_vectored(off, iov, i as u64) }.map_err(|e| e.to_string())?;
        }
        self.src.submit().map_err(|e| e.to_string())?;
        wait_all(self.src.as_mut(), &self.epoll_src, &chunks, "read from", self.source.node().name())?;
        for (i, (&(off, _), iov)) in chunks.iter().zip(&iovecs).enumerate() {
            // SAFETY: as above; the buffers now hold what was read.
            unsafe { self.dst.write_vectored(off, iov, i as u64) }.map_err(|e| e.to_string())?;
        }
        self.dst.submit().map_err(|e| e.to_string())?;
        wait_all(self.dst.as_mut(), &self.epoll_dst, &chunks, "write to", self.target.node().name())?;
        let copied = at - self.offset;
        self.offset = at;
        if self.offset >= self.len {
            // Done means durable: the target is flushed before the job ends.
            self.dst.flush(u64::MAX).map_err(|e| e.to_string())?;
            self.dst.submit().map_err(|e| e.to_string())?;
            let flushed = wait_one(self.dst.as_mut(), &self.epoll_dst)?;
            if flushed.result < 0 {
                return Err(format!(
                    "Could not flush node '{}': {}",
                    self.target.node().name(),
                    std::io::Error::from_raw_os_error(-flushed.result)
                ));
            }
        }
        Ok(copied)
    }
}

fn wait_one(io: &mut dyn AsyncIo, epoll: &Epoll) -> Result<crate::io::Completion, String> {
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
            Err(e) => return Err(format!("waiting for I/O failed: {e}")),
        }
    }
}

/// Waits for one completion per chunk; any error or short transfer fails
/// the batch, naming the node and offset.
fn wait_all(
    io: &mut dyn AsyncIo,
    epoll: &Epoll,
    chunks: &[(u64, usize)],
    verb: &str,
    node: &str,
) -> Result<(), String> {
    let mut first_error = None;
    for _ in chunks {
        let c = wait_one(io, epoll)?;
        let (off, n) = chunks[c.user_data as usize];
        if c.result != n as i32 && first_error.is_none() {
            let why = if c.result < 0 {
                std::io::Error::from_raw_os_error(-c.result).to_string()
            } else {
                format!("{} of {n} bytes", c.result)
            };
            first_error = Some(format!("Could not {verb} node '{node}' at offset {off}: {why}"));
        }
    }
    first_error.map_or(Ok(()), Err)
}
