//! qcow2 metadata: the L1 table, a cache of L2 tables, the refcount table
//! and a cache of refcount blocks, cluster allocation, and writing it all
//! back in the order that keeps the image consistent on disk at every
//! moment:
//!
//! 1. refcount blocks (a cluster is counted before anything points at it),
//! 2. L2 tables (after the data they point at has been written: an entry
//!    is only set once its write completed),
//! 3. L1 entries (after the L2 table they point at is on disk),
//!
//! with an `fdatasync` between the steps. A cluster whose last reference
//! goes is not uncounted at once: the free waits until the L2 entry that
//! dropped it is on disk and no request is in flight that could still
//! touch it, so a crash can leak a cluster but never leave one counted
//! free while something points at it.
//!
//! Metadata I/O is synchronous, on the caller's thread, through a
//! descriptor without `O_DIRECT` (so tables need no alignment). Guest data
//! never goes through here.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::header::{Header, OFFSET_AUTOCLEAR, OFFSET_REFCOUNT_TABLE};

/// An L1 or L2 entry's host offset bits (9..=55).
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster's refcount is exactly one: it may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
/// The cluster is compressed (L2 entries).
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (L2 entries, version 3).
pub(crate) const ZERO: u64 = 1;

/// L2 tables kept in memory, in bytes of tables (QEMU's default covers
/// 32 MiB of guest data with 64 KiB clusters; this covers 8 GiB).
const L2_CACHE_BYTES: u64 = 1 << 20;
/// Refcount blocks kept in memory, in bytes.
const REFBLOCK_CACHE_BYTES: u64 = 256 << 10;
/// The furthest into a file a host offset may point (QEMU's limit).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// What a guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Nothing here: the backing file's data, or zeros without one.
    Unallocated,
    /// Reads as zeros; `host` is kept allocated if non-zero.
    Zero { host: u64 },
    /// Data at `host`; `copied` when it may be written in place.
    Data { host: u64, copied: bool },
    /// Compressed data; the raw L2 entry.
    Compressed { entry: u64 },
}

/// Why metadata could not be read or written. Each names the table.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A read or write of a table failed.
    #[error("qcow2 metadata I/O failed ({what} at 0x{offset:x}): {source}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// An on-disk pointer is not where a table or cluster may be.
    #[error("qcow2 image is corrupt: {0}")]
    Corrupt(String),
    /// The image cannot grow further.
    #[error("qcow2 image is full: no cluster can be allocated below 2^56 bytes")]
    Full,
    /// A write on an image opened read-only, or after an earlier metadata
    /// write failed (the image is left alone from then on).
    #[error("qcow2 image is not writable: {0}")]
    NotWritable(String),
}

impl MetaError {
    /// The errno a request failing on this gets.
    pub(crate) fn errno(&self) -> i32 {
        match self {
            MetaError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            MetaError::Full => libc::ENOSPC,
            MetaError::NotWritable(_) => libc::EROFS,
            MetaError::Corrupt(_) => libc::EIO,
        }
    }
}

type Result<T> = std::result::Result<T, MetaError>;

/// Tables by host offset, least recently used first out.
struct Cache {
    capacity: usize,
    slots: Vec<Slot>,
    index: HashMap<u64, usize>,
    clock: u64,
}

struct Slot {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

impl Cache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            slots: Vec::new(),
            index: HashMap::new(),
            clock: 0,
        }
    }

    fn find(&mut self, offset: u64) -> Option<usize> {
        let i = *self.index.get(&offset)?;
        self.clock += 1;
        self.slots[i].used = self.clock;
        Some(i)
    }

    /// The slot to reuse when full: the least recently used one.
    fn victim(&self) -> Option<usize> {
        if self.slots.len() < self.capacity {
            return None;
        }
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }

    /// Puts `data` in (replacing slot `reuse` if given).
    fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool, reuse: Option<usize>) -> usize {
        self.clock += 1;
        let slot = Slot {
            offset,
            data,
            dirty,
            used: self.clock,
        };
        let i = match reuse {
            Some(i) => {
                self.index.remove(&self.slots[i].offset);
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.index.insert(offset, i);
        i
    }

    fn dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }
}

fn be64(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[i * 8..i * 8 + 8]);
    u64::from_be_bytes(b)
}

fn set_be64(data: &mut [u8], i: usize, v: u64) {
    data[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// A refcount of width `1 << order` bits at `i` in a refcount block.
fn get_refcount(data: &[u8], order: u32, i: u64) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let byte = data[i / per];
            u64::from((byte >> ((i % per) * bits)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(data[i]),
        4 => u64::from(u16::from_be_bytes([data[2 * i], data[2 * i + 1]])),
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&data[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(b))
        }
        _ => be64(data, i),
    }
}

fn set_refcount(data: &mut [u8], order: u32, i: u64, v: u64) {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = (i % per) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut data[i / per];
            *byte = (*byte & !mask) | (((v as u8) << shift) & mask);
        }
        3 => data[i] = v as u8,
        4 => data[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => data[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => set_be64(data, i, v),
    }
}

/// Moves `len` bytes at `offset` with `call(done, at)` (one `preadv` or
/// `pwritev` of the bytes from `done` on, at file offset `at`), again
/// after a short transfer or an interruption; the bytes moved before the
/// file ended (a call returned 0).
fn transfer(
    len: usize,
    offset: u64,
    what: &'static str,
    mut call: impl FnMut(usize, i64) -> isize,
) -> Result<usize> {
    let err = |source| MetaError::Io {
        what,
        offset,
        source,
    };
    let mut done = 0usize;
    while done < len {
        let at = i64::try_from(offset + done as u64)
            .map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let n = call(done, at);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err(e));
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

fn read_at(file: &File, buf: &mut [u8], offset: u64, what: &'static str) -> Result<()> {
    let done = transfer(buf.len(), offset, what, |done, at| {
        let tail = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: tail.as_mut_ptr().cast(),
            iov_len: tail.len(),
        };
        // SAFETY: one iovec over the live tail of `buf`.
        unsafe { libc::preadv(file.as_raw_fd(), &iov, 1, at) }
    })?;
    // Past the end of the file reads as zeros, as a hole would.
    buf[done..].fill(0);
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Metadata writes (and syncs) this thread may still make before every
    /// further one fails, as if the process had died there; `None`: no
    /// limit. For tests of the write-back order.
    pub(crate) static WRITES_LEFT: std::cell::Cell<Option<u64>> =
        const { std::cell::Cell::new(None) };
}

/// Counts one metadata write or sync against [`WRITES_LEFT`].
#[cfg(test)]
fn crash_point() -> io::Result<()> {
    WRITES_LEFT.with(|left| match left.get() {
        Some(0) => Err(io::Error::other("injected crash")),
        Some(n) => {
            left.set(Some(n - 1));
            Ok(())
        }
        None => Ok(()),
    })
}

#[cfg(not(test))]
fn crash_point() -> io::Result<()> {
    Ok(())
}

fn write_at(file: &File, buf: &[u8], offset: u64, what: &'static str) -> Result<()> {
    crash_point().map_err(|source| MetaError::Io {
        what,
        offset,
        source,
    })?;
    let done = transfer(buf.len(), offset, what, |done, at| {
        let iov = libc::iovec {
            iov_base: buf[done..].as_ptr() as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: one iovec over the live tail of `buf`; pwritev only reads it.
        unsafe { libc::pwritev(file.as_raw_fd(), &iov, 1, at) }
    })?;
    if done < buf.len() {
        return Err(MetaError::Io {
            what,
            offset,
            source: io::Error::from_raw_os_error(libc::EIO),
        });
    }
    Ok(())
}

/// A qcow2 image's metadata.
pub(crate) struct Meta {
    file: File,
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    /// Entries per L2 table.
    l2_entries: u64,
    /// Virtual size in bytes.
    pub(crate) size: u64,
    pub(crate) version: u32,
    refcount_order: u32,
    /// log2 of the clusters one refcount block counts.
    rb_bits: u32,
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: Vec<usize>,
    l2: Cache,
    reftable: Vec<u64>,
    reftable_offset: u64,
    refblocks: Cache,
    /// No cluster below this one is free (a search starts here).
    free_hint: u64,
    /// One past the last cluster in use or in the file.
    end: u64,
    /// The file is at least this long: what it was at open, grown ahead of
    /// allocation with `fallocate` (see [`Meta::ensure_room`]).
    file_len: u64,
    /// Whether the file was grown past what is in use (trimmed on close).
    grown: bool,
    /// `fallocate` failed once (a file system without it): do not retry.
    no_prealloc: bool,
    /// Frees waiting for the L2 change that dropped the cluster to be
    /// written back.
    frees_waiting: Vec<u64>,
    /// Frees whose L2 change is written: applied once nothing is in flight.
    frees_ready: Vec<u64>,
    /// Why writes are refused, if they are.
    refusal: Option<String>,
    /// Clusters holding metadata (header, L1, refcount table and blocks,
    /// L2 tables): a hostile image may point data at them, and its
    /// refcounts may call them free; neither is let through.
    meta_clusters: HashSet<u64>,
}

impl Meta {
    /// Loads the tables of the image in `file` (opened without `O_DIRECT`)
    /// whose header is `header`.
    pub(crate) fn open(file: File, header: &Header, read_only: bool) -> Result<Self> {
        let cluster_bits = header.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        let file_size = file
            .metadata()
            .map_err(|source| MetaError::Io {
                what: "image size",
                offset: 0,
                source,
            })?
            .len();
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        read_at(&file, &mut raw, header.l1_table_offset, "L1 table")?;
        let l1: Vec<u64> = (0..header.l1_size as usize)
            .map(|i| be64(&raw, i))
            .collect();
        let reftable_len = (u64::from(header.refcount_table_clusters) << cluster_bits) / 8;
        let mut raw = vec![0u8; reftable_len as usize * 8];
        read_at(
            &file,
            &mut raw,
            header.refcount_table_offset,
            "refcount table",
        )?;
        let reftable: Vec<u64> = (0..reftable_len as usize).map(|i| be64(&raw, i)).collect();
        let rb_bits = cluster_bits + 3 - header.refcount_order;
        let mut refusal = if read_only {
            Some("it was opened read-only".to_string())
        } else {
            header.write_refusal()
        };
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off & (cluster_size - 1) != 0 {
                return Err(MetaError::Corrupt(format!(
                    "L1 entry {i} points at 0x{off:x}, not aligned to a cluster"
                )));
            }
            if off != 0 && e & COPIED == 0 && refusal.is_none() {
                refusal = Some(format!(
                    "L1 entry {i} points at an L2 table shared with an internal snapshot"
                ));
            }
        }
        for (i, &e) in reftable.iter().enumerate() {
            if e & (cluster_size - 1) != 0 {
                return Err(MetaError::Corrupt(format!(
                    "refcount table entry {i} points at 0x{e:x}, not aligned to a cluster"
                )));
            }
        }
        let mut meta_clusters = HashSet::new();
        let mut span = |off: u64, bytes: u64| {
            let first = off >> cluster_bits;
            let last = (off + bytes.max(1) - 1) >> cluster_bits;
            meta_clusters.extend(first..=last);
        };
        span(0, 1);
        span(header.l1_table_offset, u64::from(header.l1_size) * 8);
        span(header.refcount_table_offset, reftable_len * 8);
        for &e in reftable.iter().chain(l1.iter()) {
            let off = e & OFFSET_MASK;
            if off != 0 {
                span(off, 1);
            }
        }
        let l2_cap = (L2_CACHE_BYTES >> cluster_bits) as usize;
        let rb_cap = (REFBLOCK_CACHE_BYTES >> cluster_bits) as usize;
        let meta = Self {
            file,
            cluster_bits,
            cluster_size,
            l2_entries: cluster_size / 8,
            size: header.size,
            version: header.version,
            refcount_order: header.refcount_order,
            rb_bits,
            l1,
            l1_offset: header.l1_table_offset,
            l1_dirty: Vec::new(),
            l2: Cache::new(l2_cap.max(16)),
            reftable,
            reftable_offset: header.refcount_table_offset,
            refblocks: Cache::new(rb_cap.max(4)),
            free_hint: 0,
            end: file_size.div_ceil(cluster_size),
            file_len: file_size,
            grown: false,
            no_prealloc: false,
            frees_waiting: Vec::new(),
            frees_ready: Vec::new(),
            refusal,
            meta_clusters,
        };
        if meta.refusal.is_none() && header.autoclear_features != 0 {
            // Autoclear bits (bitmaps, a raw external data file) name
            // extensions kept in step with the data; we keep none of them
            // in step, so a writer must clear them.
            write_at(&meta.file, &0u64.to_be_bytes(), OFFSET_AUTOCLEAR, "header")?;
            meta.sync()?;
        }
        Ok(meta)
    }

    /// Why writes are refused, if they are.
    pub(crate) fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// Refuses a write if writes are refused (read-only, a failed
    /// metadata update, a table found pointing data at metadata).
    pub(crate) fn writable(&self) -> Result<()> {
        match &self.refusal {
            Some(why) => Err(MetaError::NotWritable(why.clone())),
            None => Ok(()),
        }
    }

    /// Refuses writes from now on, for `why`.
    pub(crate) fn refuse_writes(&mut self, why: &str) {
        if self.refusal.is_none() {
            self.refusal = Some(why.to_string());
        }
    }

    /// Refuses every write from now on: a metadata write failed half-way,
    /// and more writes could only make the image worse.
    fn fail<T>(&mut self, e: MetaError) -> Result<T> {
        if self.refusal.is_none() {
            log::error!("{e}; refusing writes to this image from now on");
            self.refusal = Some(format!("an earlier metadata update failed: {e}"));
        }
        Err(e)
    }

    fn check_host(&self, off: u64, what: &str) -> Result<()> {
        if off & (self.cluster_size - 1) != 0 || off == 0 || off >= MAX_HOST_OFFSET {
            return Err(MetaError::Corrupt(format!(
                "{what} points at 0x{off:x}, which is not a cluster a table or data may use"
            )));
        }
        Ok(())
    }

    /// The cluster index of guest cluster `g`'s L1 entry and its place in
    /// its L2 table.
    fn split(&self, g: u64) -> (usize, usize) {
        (
            (g / self.l2_entries) as usize,
            (g % self.l2_entries) as usize,
        )
    }

    /// Makes room in the L2 cache: the slot to reuse, its table written
    /// back first if dirty.
    fn evict_l2(&mut self) -> Result<Option<usize>> {
        let reuse = self.l2.victim();
        if let Some(v) = reuse {
            if self.l2.slots[v].dirty {
                // The table's new entries may count on clusters whose
                // refcounts are not on disk yet.
                self.write_refblocks()?;
                let slot = &self.l2.slots[v];
                write_at(&self.file, &slot.data, slot.offset, "L2 table")?;
                self.l2.slots[v].dirty = false;
            }
        }
        Ok(reuse)
    }

    /// Makes room in the refcount block cache, as [`Meta::evict_l2`].
    fn evict_refblock(&mut self) -> Result<Option<usize>> {
        let reuse = self.refblocks.victim();
        if let Some(v) = reuse {
            if self.refblocks.slots[v].dirty {
                let slot = &self.refblocks.slots[v];
                write_at(&self.file, &slot.data, slot.offset, "refcount block")?;
                self.refblocks.slots[v].dirty = false;
            }
        }
        Ok(reuse)
    }

    /// The cache slot of the L2 table at `offset`, loading it.
    fn l2_slot(&mut self, offset: u64) -> Result<usize> {
        if let Some(i) = self.l2.find(offset) {
            return Ok(i);
        }
        self.check_host(offset, "an L1 entry")?;
        let reuse = self.evict_l2()?;
        let mut data = vec![0u8; self.cluster_size as usize];
        read_at(&self.file, &mut data, offset, "L2 table")?;
        self.check_l2(offset, &data);
        Ok(self.l2.insert(offset, data, false, reuse))
    }

    /// Refuses writes from now on if the L2 table at `offset` points guest
    /// data at metadata: a guest write there would overwrite the image's
    /// own tables. Reads stay allowed, as QEMU allows them.
    fn check_l2(&mut self, offset: u64, data: &[u8]) {
        let bad = (0..self.l2_entries as usize)
            .map(|i| be64(data, i))
            .filter(|e| e & COMPRESSED == 0)
            .map(|e| (e & OFFSET_MASK) >> self.cluster_bits)
            .find(|&c| c != 0 && self.meta_clusters.contains(&c));
        if let Some(c) = bad {
            let e = MetaError::Corrupt(format!(
                "the L2 table at 0x{offset:x} points guest data at cluster 0x{:x}, which holds metadata",
                c << self.cluster_bits
            ));
            let _ = self.fail::<()>(e);
        }
    }

    /// What guest cluster `g` maps to.
    pub(crate) fn lookup(&mut self, g: u64) -> Result<Mapping> {
        let (l1i, l2i) = self.split(g);
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok(Mapping::Unallocated);
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let slot = self.l2_slot(l2_off)?;
        let e = be64(&self.l2.slots[slot].data, l2i);
        self.decode(e, g)
    }

    fn decode(&self, e: u64, g: u64) -> Result<Mapping> {
        if e & COMPRESSED != 0 {
            return Ok(Mapping::Compressed { entry: e });
        }
        let host = e & OFFSET_MASK;
        if self.version >= 3 && e & ZERO != 0 {
            return Ok(Mapping::Zero { host });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        if host & (self.cluster_size - 1) != 0 || host >= MAX_HOST_OFFSET {
            return Err(MetaError::Corrupt(format!(
                "the L2 entry of guest cluster {g} points at 0x{host:x}, not a cluster"
            )));
        }
        Ok(Mapping::Data {
            host,
            copied: e & COPIED != 0,
        })
    }

    /// Makes sure guest cluster `g` has an L2 table, allocating one.
    pub(crate) fn ensure_l2(&mut self, g: u64) -> Result<()> {
        self.writable()?;
        let (l1i, _) = self.split(g);
        if l1i >= self.l1.len() {
            return Err(MetaError::Corrupt(format!(
                "guest cluster {g} lies past the L1 table's {} entries",
                self.l1.len()
            )));
        }
        if self.l1[l1i] & OFFSET_MASK != 0 {
            return Ok(());
        }
        let off = self.alloc()?;
        let reuse = match self.evict_l2() {
            Ok(reuse) => reuse,
            Err(e) => return self.fail(e),
        };
        self.meta_clusters.insert(off >> self.cluster_bits);
        // Dirty and zeroed: written back before the L1 entry that points
        // at it, so the cluster's old contents are never read as a table.
        self.l2
            .insert(off, vec![0u8; self.cluster_size as usize], true, reuse);
        self.l1[l1i] = off | COPIED;
        self.l1_dirty.push(l1i);
        Ok(())
    }

    /// Sets guest cluster `g`'s L2 entry (its table exists: see
    /// [`Meta::ensure_l2`]).
    pub(crate) fn set_l2(&mut self, g: u64, entry: u64) -> Result<()> {
        self.writable()?;
        let (l1i, l2i) = self.split(g);
        let l2_off = self.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            return Err(MetaError::Corrupt(format!(
                "guest cluster {g} has no L2 table to update"
            )));
        }
        let slot = self.l2_slot(l2_off)?;
        let s = &mut self.l2.slots[slot];
        set_be64(&mut s.data, l2i, entry);
        s.dirty = true;
        Ok(())
    }

    /// The cache slot of the refcount block counting cluster `c`, if it
    /// exists.
    fn refblock_slot(&mut self, c: u64) -> Result<Option<usize>> {
        let ri = (c >> self.rb_bits) as usize;
        let Some(&off) = self.reftable.get(ri) else {
            return Ok(None);
        };
        if off == 0 {
            return Ok(None);
        }
        if let Some(i) = self.refblocks.find(off) {
            return Ok(Some(i));
        }
        self.check_host(off, "a refcount table entry")?;
        let reuse = self.evict_refblock()?;
        let mut data = vec![0u8; self.cluster_size as usize];
        read_at(&self.file, &mut data, off, "refcount block")?;
        Ok(Some(self.refblocks.insert(off, data, false, reuse)))
    }

    /// Cluster `c`'s refcount.
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64> {
        let Some(slot) = self.refblock_slot(c)? else {
            return Ok(0);
        };
        let i = c & ((1 << self.rb_bits) - 1);
        Ok(get_refcount(
            &self.refblocks.slots[slot].data,
            self.refcount_order,
            i,
        ))
    }

    fn set_count(&mut self, c: u64, v: u64) -> Result<()> {
        let slot = match self.refblock_slot(c)? {
            Some(slot) => slot,
            None => {
                return Err(MetaError::Corrupt(format!(
                    "cluster {c} has no refcount block"
                )))
            }
        };
        let i = c & ((1 << self.rb_bits) - 1);
        let s = &mut self.refblocks.slots[slot];
        set_refcount(&mut s.data, self.refcount_order, i, v);
        s.dirty = true;
        Ok(())
    }

    /// Allocates one cluster (counted once, in the cache) and returns its
    /// host offset.
    pub(crate) fn alloc(&mut self) -> Result<u64> {
        self.writable()?;
        match self.alloc_inner() {
            Ok(off) => Ok(off),
            Err(e @ MetaError::Full) => Err(e),
            Err(e) => self.fail(e),
        }
    }

    fn alloc_inner(&mut self) -> Result<u64> {
        let mut c = self.free_hint.max(1);
        loop {
            if c << self.cluster_bits >= MAX_HOST_OFFSET {
                return Err(MetaError::Full);
            }
            let ri = (c >> self.rb_bits) as usize;
            if ri >= self.reftable.len() {
                self.grow_reftable(c)?;
                // The new table took clusters at the end; look again.
                continue;
            }
            if self.reftable[ri] == 0 {
                // No block counts this range yet: the first free cluster
                // of it (this one) becomes the block, counting itself.
                self.new_refblock(c)?;
                c += 1;
                continue;
            }
            if self.refcount(c)? == 0 {
                self.ensure_room(c + 1);
                if self.meta_clusters.contains(&c) {
                    return Err(MetaError::Corrupt(format!(
                        "cluster 0x{:x} holds metadata but its refcount is 0",
                        c << self.cluster_bits
                    )));
                }
                self.set_count(c, 1)?;
                self.free_hint = c + 1;
                self.end = self.end.max(c + 1);
                return Ok(c << self.cluster_bits);
            }
            c += 1;
        }
    }

    /// Makes sure the file reaches past cluster `end - 1`, growing it in
    /// steps with `fallocate`. A direct write past the end of a file
    /// extends it, and ext4 serialises extending direct writes (each
    /// holds the inode lock until it completes): allocating clusters one
    /// by one at the end of the image would run one write at a time.
    /// Writes into blocks `fallocate` reserved run in parallel.
    fn ensure_room(&mut self, end: u64) {
        let need = end << self.cluster_bits;
        if need <= self.file_len || self.no_prealloc {
            return;
        }
        // A quarter of what the image has, between 1 and 32 MiB.
        let step = (self.file_len / 4).clamp(1 << 20, 32 << 20);
        let target = (need + step).div_ceil(self.cluster_size) * self.cluster_size;
        let (Ok(at), Ok(len)) = (
            i64::try_from(self.file_len),
            i64::try_from(target - self.file_len),
        ) else {
            return;
        };
        // SAFETY: fallocate on a descriptor this struct owns.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), 0, at, len) } != 0 {
            log::debug!(
                "qcow2: cannot grow the image ahead of writes: {}",
                io::Error::last_os_error()
            );
            self.no_prealloc = true;
            return;
        }
        self.file_len = target;
        self.grown = true;
    }

    /// Trims what [`Meta::ensure_room`] grew beyond the last cluster in
    /// use, so the file ends where the image does.
    pub(crate) fn trim(&mut self) {
        let end = self.end << self.cluster_bits;
        if !self.grown || end >= self.file_len || self.refusal.is_some() {
            return;
        }
        // SAFETY: ftruncate on a descriptor this struct owns.
        if unsafe { libc::ftruncate(self.file.as_raw_fd(), end as i64) } == 0 {
            self.file_len = end;
            self.grown = false;
        } else {
            log::debug!(
                "qcow2: cannot trim the image to 0x{end:x}: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// Writes a refcount block at cluster `c` counting its own range,
    /// itself included, and points the refcount table at it.
    fn new_refblock(&mut self, c: u64) -> Result<()> {
        let ri = (c >> self.rb_bits) as usize;
        let off = c << self.cluster_bits;
        let mut data = vec![0u8; self.cluster_size as usize];
        set_refcount(
            &mut data,
            self.refcount_order,
            c & ((1 << self.rb_bits) - 1),
            1,
        );
        // Through to disk at once, block before table entry: the table
        // must never point at a block that is not there.
        write_at(&self.file, &data, off, "refcount block")?;
        self.sync()?;
        write_at(
            &self.file,
            &off.to_be_bytes(),
            self.reftable_offset + ri as u64 * 8,
            "refcount table",
        )?;
        self.reftable[ri] = off;
        self.meta_clusters.insert(c);
        self.end = self.end.max(c + 1);
        let reuse = self.evict_refblock()?;
        self.refblocks.insert(off, data, false, reuse);
        Ok(())
    }

    /// Moves the refcount table to the end of the file, grown to count at
    /// least cluster `c`: the new table and the refcount blocks that count
    /// it are written first, then the header points at it, then the old
    /// table is freed.
    fn grow_reftable(&mut self, c: u64) -> Result<()> {
        let per_block = 1u64 << self.rb_bits;
        let entries_per_cluster = self.cluster_size / 8;
        let start = self.end.max(c);
        let mut entries = (self.reftable.len() as u64 * 2).max((c >> self.rb_bits) + 1);
        let (table_clusters, blocks) = loop {
            let table_clusters = entries.div_ceil(entries_per_cluster);
            // New blocks for every range the new area touches that has
            // none; they sit right after the table, inside the area.
            let mut blocks = 0u64;
            loop {
                let area_end = start + table_clusters + blocks;
                let first = start >> self.rb_bits;
                let last = (area_end - 1) >> self.rb_bits;
                let missing = (first..=last)
                    .filter(|&r| self.reftable.get(r as usize).is_none_or(|&o| o == 0))
                    .count() as u64;
                if missing == blocks {
                    break;
                }
                blocks = missing;
            }
            let area_end = start + table_clusters + blocks;
            let needed = ((area_end - 1) >> self.rb_bits) + 1;
            if needed <= entries {
                break (table_clusters, blocks);
            }
            entries = needed;
        };
        let area_end = start + table_clusters + blocks;
        if area_end << self.cluster_bits >= MAX_HOST_OFFSET {
            return Err(MetaError::Full);
        }
        let mut table = self.reftable.clone();
        table.resize((table_clusters * entries_per_cluster) as usize, 0);
        let first = start >> self.rb_bits;
        let last = (area_end - 1) >> self.rb_bits;
        let mut next_block = start + table_clusters;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for r in first..=last {
            if table[r as usize] == 0 {
                table[r as usize] = next_block << self.cluster_bits;
                new_blocks.push((
                    next_block << self.cluster_bits,
                    vec![0u8; self.cluster_size as usize],
                ));
                next_block += 1;
            }
        }
        // Count the whole area: in the new blocks directly, in existing
        // blocks through the cache (written back below).
        for k in start..area_end {
            let r = k >> self.rb_bits;
            let i = k & (per_block - 1);
            let block_off = table[r as usize];
            if let Some((_, data)) = new_blocks.iter_mut().find(|(o, _)| *o == block_off) {
                set_refcount(data, self.refcount_order, i, 1);
            } else {
                self.set_count(k, 1)?;
            }
        }
        for (off, data) in &new_blocks {
            write_at(&self.file, data, *off, "refcount block")?;
        }
        self.write_refblocks()?;
        let mut raw = vec![0u8; table.len() * 8];
        for (i, &e) in table.iter().enumerate() {
            set_be64(&mut raw, i, e);
        }
        let table_off = start << self.cluster_bits;
        write_at(&self.file, &raw, table_off, "refcount table")?;
        self.sync()?;
        let mut field = [0u8; 12];
        field[..8].copy_from_slice(&table_off.to_be_bytes());
        field[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        write_at(&self.file, &field, OFFSET_REFCOUNT_TABLE, "header")?;
        self.sync()?;
        let old_off = self.reftable_offset;
        let old_clusters = (self.reftable.len() as u64 * 8).div_ceil(self.cluster_size);
        self.reftable = table;
        self.reftable_offset = table_off;
        self.meta_clusters
            .extend(start..start + table_clusters + blocks);
        for (off, data) in new_blocks {
            let reuse = self.evict_refblock()?;
            self.refblocks.insert(off, data, false, reuse);
        }
        self.end = self.end.max(area_end);
        // Nothing points at the old table any more: the header moved on
        // and is on disk.
        for k in 0..old_clusters {
            let oc = (old_off >> self.cluster_bits) + k;
            self.meta_clusters.remove(&oc);
            self.set_count(oc, 0)?;
            self.free_hint = self.free_hint.min(oc);
        }
        Ok(())
    }

    /// Gives back a cluster nothing on disk ever pointed at (an
    /// allocation whose write failed).
    pub(crate) fn free_now(&mut self, host: u64) {
        let c = host >> self.cluster_bits;
        if let Err(e) = self.set_count(c, 0) {
            log::warn!("cannot free qcow2 cluster at 0x{host:x}: {e}; it stays leaked");
            return;
        }
        self.free_hint = self.free_hint.min(c);
    }

    /// Frees `host` once the L2 change that dropped it is on disk and
    /// nothing in flight can touch it.
    pub(crate) fn free_later(&mut self, host: u64) {
        self.frees_waiting.push(host);
    }

    fn write_refblocks(&mut self) -> Result<()> {
        if !self.refblocks.dirty() {
            return Ok(());
        }
        for s in self.refblocks.slots.iter_mut().filter(|s| s.dirty) {
            write_at(&self.file, &s.data, s.offset, "refcount block")?;
            s.dirty = false;
        }
        self.sync()
    }

    /// Whether a write-back has anything to write.
    pub(crate) fn dirty(&self) -> bool {
        !self.l1_dirty.is_empty() || self.l2.dirty() || self.refblocks.dirty()
    }

    /// Writes every cached change back, in order (refcount blocks, sync,
    /// L2 tables, sync, L1 entries). The caller syncs after it. Frees whose
    /// L2 change this wrote become ready.
    pub(crate) fn write_back(&mut self) -> Result<()> {
        match self.write_back_inner() {
            Ok(()) => Ok(()),
            Err(e) => self.fail(e),
        }
    }

    fn write_back_inner(&mut self) -> Result<()> {
        self.write_refblocks()?;
        if self.l2.dirty() {
            for s in self.l2.slots.iter_mut().filter(|s| s.dirty) {
                write_at(&self.file, &s.data, s.offset, "L2 table")?;
                s.dirty = false;
            }
            if !self.l1_dirty.is_empty() {
                self.sync()?;
            }
        }
        let mut dirty = std::mem::take(&mut self.l1_dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for i in dirty {
            write_at(
                &self.file,
                &self.l1[i].to_be_bytes(),
                self.l1_offset + i as u64 * 8,
                "L1 table",
            )?;
        }
        self.frees_ready.append(&mut self.frees_waiting);
        Ok(())
    }

    /// Uncounts the clusters whose last reference is gone on disk; only
    /// when no request is in flight (one could still be writing there).
    pub(crate) fn apply_frees(&mut self) {
        for host in std::mem::take(&mut self.frees_ready) {
            let c = host >> self.cluster_bits;
            match self.refcount(c) {
                Ok(n) if n > 0 => {
                    if let Err(e) = self.set_count(c, n - 1) {
                        log::warn!("cannot free qcow2 cluster at 0x{host:x}: {e}");
                    } else if n == 1 {
                        self.free_hint = self.free_hint.min(c);
                    }
                }
                Ok(_) => log::warn!("qcow2 cluster at 0x{host:x} freed twice; left alone"),
                Err(e) => log::warn!("cannot free qcow2 cluster at 0x{host:x}: {e}"),
            }
        }
    }

    /// `fdatasync` of the image file.
    pub(crate) fn sync(&self) -> Result<()> {
        crash_point().map_err(|source| MetaError::Io {
            what: "fdatasync",
            offset: 0,
            source,
        })?;
        // SAFETY: fdatasync on a descriptor this struct owns.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
            return Err(MetaError::Io {
                what: "fdatasync",
                offset: 0,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Writes everything back and applies the frees (nothing may be in
    /// flight), then makes it durable: for closing the image or an engine.
    pub(crate) fn settle(&mut self) -> Result<()> {
        if self.refusal.is_some() && !self.dirty() {
            return Ok(());
        }
        self.write_back()?;
        // The L2 changes that dropped the clusters must be durable before
        // the refcount blocks that uncount them are written.
        self.sync()?;
        self.apply_frees();
        self.write_back()?;
        self.sync()
    }

    /// Reads compressed cluster `entry` and inflates it into `out` (one
    /// cluster).
    pub(crate) fn read_compressed(&mut self, entry: u64, out: &mut [u8]) -> Result<()> {
        let (off, len) = super::compressed::extent(entry, self.cluster_bits);
        if off >= MAX_HOST_OFFSET || len > 2 * self.cluster_size + 512 {
            return Err(MetaError::Corrupt(format!(
                "a compressed cluster descriptor points at 0x{off:x}+{len}"
            )));
        }
        let mut raw = vec![0u8; len as usize];
        read_at(&self.file, &mut raw, off, "compressed cluster")?;
        super::compressed::inflate(&raw, out)
            .map_err(|e| MetaError::Corrupt(format!("compressed cluster at 0x{off:x}: {e}")))
    }

    /// Shrinks both caches to `tables` tables, so tests reach eviction.
    #[cfg(test)]
    pub(crate) fn set_cache_capacity(&mut self, tables: usize) {
        self.l2.capacity = tables;
        self.refblocks.capacity = tables;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut data = vec![0u8; 64];
            let n = 64 * 8 / u64::from(bits);
            for i in 0..n {
                set_refcount(&mut data, order, i, i % (max.min(7) + 1));
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&data, order, i),
                    i % (max.min(7) + 1),
                    "order {order} index {i}"
                );
            }
            set_refcount(&mut data, order, 1, max);
            assert_eq!(get_refcount(&data, order, 1), max);
            assert_eq!(get_refcount(&data, order, 0), 0, "order {order}");
            assert_eq!(get_refcount(&data, order, 2), 2 % (max.min(7) + 1));
        }
        // QEMU's layout for narrow refcounts: the lowest bits first.
        let mut data = vec![0u8; 1];
        set_refcount(&mut data, 0, 0, 1);
        assert_eq!(data[0], 1);
        set_refcount(&mut data, 1, 1, 3);
        assert_eq!(data[0], 0b1101);
    }

    #[test]
    fn the_cache_hands_out_its_least_recently_used_slot() {
        let mut c = Cache::new(2);
        let a = c.insert(0x1000, vec![1], false, None);
        let b = c.insert(0x2000, vec![2], true, None);
        assert_eq!(c.find(0x1000), Some(a));
        assert_eq!(c.victim(), Some(b), "0x2000 was used longest ago");
        c.insert(0x3000, vec![3], false, Some(b));
        assert_eq!(c.find(0x2000), None);
        assert_eq!(c.find(0x3000), Some(b));
        assert!(!c.dirty());
    }
}
