//! The source side: reads each disk through its lease or its holder,
//! with dirty tracking.

use std::time::Duration;

use super::{wait, AlignedBuf, Chunk, Iovec, MigrationError, CHUNK, IO_TIMEOUT};
use crate::bitmap::default_granularity;
use crate::error::BlockError;
use crate::graph::{Access, Graph, Holder, NodeRef};
use crate::io::AsyncIo;

/// The tag of the one read in flight.
const READ: u64 = 1;

/// One disk being copied. Fields drop in order: the engine closes before
/// the access (lease or hosting) that opened it goes.
struct Disk {
    device: String,
    size: u64,
    /// Its internal dirty bitmap's id.
    bitmap: u64,
    /// Where its dirty pass looks next.
    cursor: u64,
    io: Box<dyn AsyncIo>,
    buf: AlignedBuf,
    /// The one iovec handed to the engine.
    iov: Iovec,
    /// A read never completed: its buffers must never be freed.
    stuck: bool,
    /// How long a read may take.
    timeout: Duration,
    access: Access,
    node: NodeRef,
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.node.bitmaps().remove_internal(self.bitmap);
        if self.stuck {
            self.buf.leak();
            self.iov.leak();
        }
    }
}

impl Disk {
    /// Reads `[offset, offset + len)` into `buf`, waiting for it.
    fn read(&mut self, offset: u64, len: u32) -> Result<(), BlockError> {
        let node = self.node.name().to_string();
        let stalled = || MigrationError::Stalled {
            what: "reading",
            device: self.device.clone(),
            node: node.clone(),
            waited: self.timeout,
        };
        if self.stuck {
            // The read that never came back may still land in the buffer,
            // and its completion would pass for the next read's.
            return Err(stalled().into());
        }
        let io_err = |what, source| MigrationError::Engine {
            what,
            device: self.device.clone(),
            node: node.clone(),
            source,
        };
        let mut done = 0usize;
        let len = len as usize;
        while done < len {
            let iov = self.iov.set(&mut self.buf.slice_mut(len)[done..]);
            // SAFETY: `buf` and the boxed iovec stay alive and untouched
            // until the completion is drained below; if it never comes,
            // `stuck` keeps the buffer allocated for good and no other
            // read is started.
            unsafe {
                self.io
                    .read_vectored(offset + done as u64, iov, READ)
                    .map_err(|e| io_err("reading", e))?;
            }
            self.io.submit().map_err(|e| io_err("reading", e))?;
            let result = match wait(self.io.as_mut(), READ, self.timeout)
                .map_err(|e| io_err("reading", e))?
            {
                Some(r) => r,
                None => {
                    self.stuck = true;
                    return Err(stalled().into());
                }
            };
            if result <= 0 {
                let source = if result < 0 {
                    std::io::Error::from_raw_os_error(-result)
                } else {
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
                };
                return Err(MigrationError::Io {
                    what: "reading",
                    device: self.device.clone(),
                    node,
                    offset: offset + done as u64,
                    len: (len - done) as u64,
                    source,
                }
                .into());
            }
            done += result as usize;
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` reads as zeros by the driver's
    /// word, without reading it.
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        matches!(
            self.node.driver().block_status(offset, len),
            Ok((status, run)) if status.zero && run >= len
        )
    }
}

/// The source side of block migration; see the module doc.
pub struct BlockMigration {
    disks: Vec<Disk>,
    /// The bulk pass's position: disk and offset.
    bulk_disk: usize,
    bulk_offset: u64,
    bulk_left: u64,
    total: u64,
    transferred: u64,
    /// The disk the dirty passes look at first.
    dirty_disk: usize,
}

impl BlockMigration {
    /// Starts copying `disks` (device id, node-name) for `holder`: takes
    /// each node's lease, or hosting by its holder, and starts dirty
    /// tracking on it. Name the node the device serves: its holder marks
    /// that node's bitmaps as writes complete, not those of nodes below. Read-only nodes are skipped. A node whose holder
    /// neither lets go nor hosts fails the whole start at once, naming
    /// node and holder, with nothing kept.
    pub fn start(
        graph: &Graph,
        disks: &[(String, String)],
        holder: Holder,
    ) -> Result<Self, BlockError> {
        let mut out = Vec::new();
        for (device, name) in disks {
            let node = graph.get(name, holder.clone())?;
            if node.read_only() {
                continue;
            }
            let access = node.take_access(holder.clone(), true)?;
            let io = access.open_io(2)?;
            let driver = node.driver();
            let size = driver.size();
            let granularity = default_granularity(driver.image_details().map(|d| d.cluster_size));
            // Before the bulk pass reads anything: every write completed
            // from here on is copied again.
            let bitmap = node
                .bitmaps()
                .add_internal(size, granularity)
                .map_err(|e| BlockError::Options {
                    node: name.clone(),
                    reason: format!("cannot track its writes for block migration: {e}"),
                })?;
            out.push(Disk {
                device: device.clone(),
                size,
                bitmap,
                cursor: 0,
                io,
                buf: AlignedBuf::new(CHUNK as usize),
                iov: Iovec::new(),
                stuck: false,
                timeout: IO_TIMEOUT,
                access,
                node,
            });
        }
        let total = out.iter().map(|d| d.size).sum();
        Ok(Self {
            disks: out,
            bulk_disk: 0,
            bulk_offset: 0,
            bulk_left: total,
            total,
            transferred: 0,
            dirty_disk: 0,
        })
    }

    /// The disks copied, as (device id, size in bytes), in the order a
    /// [`Chunk`]'s `disk` counts them: what the destination checks.
    pub fn disks(&self) -> Vec<(String, u64)> {
        self.disks
            .iter()
            .map(|d| (d.device.clone(), d.size))
            .collect()
    }

    /// Whether the disk's node is read through its lease holder (the
    /// guest keeps running) rather than its own lease.
    pub fn is_hosted(&self, disk: usize) -> bool {
        self.disks
            .get(disk)
            .is_some_and(|d| matches!(d.access, Access::Hosted(_)))
    }

    /// The next chunk to send, its data in `buf` (emptied for a zero
    /// chunk): the bulk pass first, then ranges written since, each
    /// cleared as it is read. `None` when nothing is left for now (a
    /// later write makes more). Blocks while it reads.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>) -> Result<Option<Chunk>, BlockError> {
        while let Some(d) = self.disks.get(self.bulk_disk) {
            if self.bulk_offset >= d.size {
                self.bulk_disk += 1;
                self.bulk_offset = 0;
                continue;
            }
            let (disk, offset) = (self.bulk_disk, self.bulk_offset);
            let len = (d.size - offset).min(u64::from(CHUNK)) as u32;
            // What was written here so far this read copies: only writes
            // landing from now on need another pass.
            d.node
                .bitmaps()
                .clear_internal(d.bitmap, offset, u64::from(len));
            // A failed read leaves the position here: a retry reads the
            // chunk again, so nothing needs marking.
            let chunk = self.read_chunk(disk, offset, len, buf)?;
            self.bulk_offset += u64::from(len);
            self.bulk_left -= u64::from(len);
            return Ok(Some(chunk));
        }
        let n = self.disks.len();
        for i in 0..n {
            let disk = (self.dirty_disk + i) % n;
            let d = &mut self.disks[disk];
            let Some((offset, len)) =
                d.node
                    .bitmaps()
                    .take_internal(d.bitmap, d.cursor, u64::from(CHUNK))
            else {
                continue;
            };
            d.cursor = offset + len;
            self.dirty_disk = disk;
            return match self.read_chunk(disk, offset, len as u32, buf) {
                Ok(chunk) => Ok(Some(chunk)),
                Err(e) => {
                    // Not copied: still dirty.
                    let d = &self.disks[disk];
                    d.node.bitmaps().mark_internal(d.bitmap, offset, len);
                    Err(e)
                }
            };
        }
        Ok(None)
    }

    fn read_chunk(
        &mut self,
        disk: usize,
        offset: u64,
        len: u32,
        buf: &mut Vec<u8>,
    ) -> Result<Chunk, BlockError> {
        let d = &mut self.disks[disk];
        buf.clear();
        let zero = if d.known_zero(offset, u64::from(len)) {
            true
        } else {
            d.read(offset, len)?;
            let data = d.buf.slice(len as usize);
            let zero = data.iter().all(|&b| b == 0);
            if !zero {
                buf.extend_from_slice(data);
            }
            zero
        };
        self.transferred += u64::from(len);
        Ok(Chunk {
            disk,
            offset,
            len,
            zero,
        })
    }

    /// How long each read may take before it fails (tests shorten it).
    #[cfg(test)]
    pub(super) fn set_timeout(&mut self, timeout: Duration) {
        for d in &mut self.disks {
            d.timeout = timeout;
        }
    }

    /// Bytes still to send: what the bulk pass has left and what writes
    /// marked since.
    pub fn remaining(&self) -> u64 {
        self.bulk_left + self.dirty()
    }

    /// Bytes marked dirty and not yet sent again. Marks ahead of the bulk
    /// pass do not count: the bulk pass reads those ranges anyway.
    pub fn dirty(&self) -> u64 {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let bitmaps = d.node.bitmaps();
                match i.cmp(&self.bulk_disk) {
                    std::cmp::Ordering::Less => bitmaps.internal_count(d.bitmap),
                    std::cmp::Ordering::Equal => {
                        bitmaps.internal_count_below(d.bitmap, self.bulk_offset)
                    }
                    std::cmp::Ordering::Greater => 0,
                }
            })
            .sum()
    }

    /// The bytes of every disk copied.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes sent so far (zero chunks count their length), passes over
    /// dirty ranges included.
    pub fn transferred(&self) -> u64 {
        self.transferred
    }
}
