//! The destination side: writes what the stream carries into each disk
//! through its own lease.

use super::{wait, AlignedBuf, Chunk, Iovec, MigrationError, CHUNK, IO_TIMEOUT};
use crate::error::BlockError;
use crate::graph::{Graph, Holder, Lease};
use crate::io::AsyncIo;

/// The tag of the one operation in flight.
const OP: u64 = 1;

/// One disk being received. The engine closes before the lease goes.
struct Disk {
    device: String,
    node: String,
    size: u64,
    io: Box<dyn AsyncIo>,
    buf: AlignedBuf,
    iov: Iovec,
    /// An operation never completed: its buffers must never be freed.
    stuck: bool,
    _lease: Lease,
}

impl Drop for Disk {
    fn drop(&mut self) {
        if self.stuck {
            self.buf.leak();
            self.iov.leak();
        }
    }
}

impl Disk {
    /// Runs the operation `queue` queued (tagged [`OP`]) and checks it
    /// did `len` bytes (or succeeded, for `len` 0).
    fn run(
        &mut self,
        what: &'static str,
        offset: u64,
        len: u64,
        queue: impl FnOnce(&mut dyn AsyncIo) -> Result<(), crate::io::IoError>,
    ) -> Result<(), BlockError> {
        let stalled = |d: &Self| MigrationError::Stalled {
            what,
            device: d.device.clone(),
            node: d.node.clone(),
            waited: IO_TIMEOUT,
        };
        if self.stuck {
            // The operation that never came back may still complete, and
            // its completion would pass for this one's.
            return Err(stalled(self).into());
        }
        let engine = |source| MigrationError::Engine {
            what,
            device: self.device.clone(),
            node: self.node.clone(),
            source,
        };
        queue(self.io.as_mut()).map_err(engine)?;
        self.io.submit().map_err(engine)?;
        let Some(result) = wait(self.io.as_mut(), OP, IO_TIMEOUT).map_err(engine)? else {
            self.stuck = true;
            return Err(stalled(self).into());
        };
        let failed = if result < 0 {
            Some(std::io::Error::from_raw_os_error(-result))
        } else if len > 0 && result as u64 != len {
            Some(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("only {result} bytes were written"),
            ))
        } else {
            None
        };
        match failed {
            Some(source) => Err(MigrationError::Io {
                what,
                device: self.device.clone(),
                node: self.node.clone(),
                offset,
                len,
                source,
            }
            .into()),
            None => Ok(()),
        }
    }
}

/// The destination side of block migration; see the module doc.
pub struct BlockSink {
    disks: Vec<Disk>,
    received: u64,
}

impl BlockSink {
    /// Opens `disks` (device id, node-name, the source's size in bytes),
    /// in the source's order, for `holder`: takes each node's lease (the
    /// destination guest has not started) and checks its size is the
    /// source's. A disk whose size differs, or that is read-only, is
    /// refused naming it, with nothing kept.
    pub fn open(
        graph: &Graph,
        disks: &[(String, String, u64)],
        holder: Holder,
    ) -> Result<Self, BlockError> {
        let mut out = Vec::new();
        for (device, name, source_size) in disks {
            let node = graph.get(name, holder.clone())?;
            let size = node.driver().size();
            if size != *source_size {
                return Err(MigrationError::SizeMismatch {
                    device: device.clone(),
                    node: name.clone(),
                    size,
                    source_size: *source_size,
                }
                .into());
            }
            if node.read_only() {
                return Err(MigrationError::ReadOnly {
                    device: device.clone(),
                    node: name.clone(),
                }
                .into());
            }
            let lease = node.take_lease(holder.clone())?;
            let io = lease.open_io(2)?;
            out.push(Disk {
                device: device.clone(),
                node: name.clone(),
                size,
                io,
                buf: AlignedBuf::new(CHUNK as usize),
                iov: Iovec::new(),
                stuck: false,
                _lease: lease,
            });
        }
        Ok(Self {
            disks: out,
            received: 0,
        })
    }

    /// Writes one chunk: `data` for a data chunk, nothing for a zero
    /// chunk (its range is deallocated, reading zeros). A chunk naming no
    /// disk, reaching outside its disk, longer than [`CHUNK`] or with
    /// data of another length is refused, writing nothing.
    pub fn write(&mut self, chunk: &Chunk, data: &[u8]) -> Result<(), BlockError> {
        let disks = self.disks.len();
        let d = self
            .disks
            .get_mut(chunk.disk)
            .ok_or(MigrationError::UnknownDisk {
                disk: chunk.disk,
                disks,
            })?;
        let len = u64::from(chunk.len);
        if chunk.offset.checked_add(len).is_none_or(|end| end > d.size) {
            return Err(MigrationError::OutOfRange {
                device: d.device.clone(),
                offset: chunk.offset,
                len: chunk.len,
                size: d.size,
            }
            .into());
        }
        if chunk.len > CHUNK {
            return Err(MigrationError::TooLong {
                device: d.device.clone(),
                len: chunk.len,
            }
            .into());
        }
        if chunk.zero {
            if !data.is_empty() {
                return Err(MigrationError::DataLength {
                    device: d.device.clone(),
                    len: 0,
                    got: data.len(),
                }
                .into());
            }
            if len > 0 {
                d.run("zeroing", chunk.offset, 0, |io| {
                    io.punch_hole(chunk.offset, len, OP)
                })?;
            }
        } else {
            if data.len() != chunk.len as usize {
                return Err(MigrationError::DataLength {
                    device: d.device.clone(),
                    len: chunk.len,
                    got: data.len(),
                }
                .into());
            }
            if len > 0 {
                let dst = d.buf.slice_mut(data.len());
                dst.copy_from_slice(data);
                let iov: *const [libc::iovec] = d.iov.set(dst);
                d.run("writing", chunk.offset, len, |io| {
                    // SAFETY: the iovec and the buffer it points into are
                    // the disk's own, kept alive and untouched until the
                    // completion is drained (or for good, if it never
                    // comes: `stuck`).
                    unsafe { io.write_vectored(chunk.offset, &*iov, OP) }
                })?;
            }
        }
        self.received += len;
        Ok(())
    }

    /// Bytes written so far (zero chunks count their length).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Makes everything written durable, then lets go of the disks.
    pub fn finish(mut self) -> Result<(), BlockError> {
        for d in &mut self.disks {
            d.run("flushing", 0, 0, |io| io.flush(OP))?;
        }
        Ok(())
    }
}
