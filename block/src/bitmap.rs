//! Dirty bitmaps: which parts of a node were written since a point in
//! time, at a granularity, for incremental backups and NBD's
//! `qemu:dirty-bitmap:` contexts (an export reads a claimed bitmap live).
//!
//! ```text
//!  node ── Bitmaps (one per node, `NodeRef::bitmaps()`)
//!            ├─ 'b0'  DirtyBitmap, enabled      ◄── mark(offset, len)
//!            └─ 'b1'  frozen by backup 'job0'       (writes go to its
//!                      └─ successor  ◄── mark        successor instead)
//! ```
//!
//! Whoever writes a node marks what it wrote once the write has landed
//! (the virtio-blk dataplane and writable NBD exports at each write's
//! completion, as QEMU does in
//! `bdrv_co_write_req_finish`): a mark before the data lands could be
//! copied by a backup reading the old data, and then be lost with the
//! frozen bitmap. A write that failed is marked too: it may have changed
//! part of its range.
//!
//! A backup freezes its bitmap ([`Bitmaps::freeze`]): the bitmap stops
//! changing and is busy (no remove, clear, enable, disable), new writes go
//! to an anonymous successor, and when the job ends the two become one
//! bitmap again as its [`BitmapSyncMode`] says (QEMU's "abdicate" and
//! "reclaim"), so no dirty bit is ever lost.
//!
//! Block migration keeps internal bitmaps beside the named ones
//! ([`Bitmaps::add_internal`]): marked by the same writers, never listed
//! or touched by the user, taken and cleared range by range as the
//! migration copies them.
//!
//! [`Bitmaps::mark`] costs two atomic loads while no bitmap records, so a
//! node without bitmaps pays nothing more on its write path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base::sync::lock;

/// The smallest granularity QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;
/// The largest: QMP's `granularity` is a `uint32`, and a power of two.
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// QEMU's limit on a bitmap's name (`BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME: usize = 1023;

/// Why a bitmap operation was refused; the texts are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// `block-dirty-bitmap-add` with `name: ""`.
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    /// A name over [`MAX_NAME`] bytes.
    #[error("Bitmap name too long: {0}")]
    NameTooLong(String),
    /// The node already has a bitmap of this name.
    #[error("Bitmap already exists: {0}")]
    Exists(String),
    /// No bitmap of this name on the node.
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    /// Not a power of two in 512..=2^31.
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    /// A backup (or an export) is using it.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    /// `persistent: true`: no driver of ours stores bitmaps in its image
    /// (QEMU's words for raw; qcow2's bitmap extension is not written).
    #[error("Can't store persistent bitmaps to {0}: Operation not supported")]
    CannotPersist(String),
    /// Two bitmaps of different sizes cannot be merged.
    #[error("Bitmaps are of different sizes ({0} and {1} bytes) and cannot be merged")]
    SizeMismatch(u64, u64),
}

/// QEMU's default granularity for a node: its cluster size held to
/// 4 KiB..64 KiB where it has one (qcow2), else 64 KiB
/// (`bdrv_get_default_bitmap_granularity`).
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// `block-dirty-bitmap-add` on `node`: a bitmap over the node's size, of
/// `granularity` or the node's default.
pub fn add_to_node(
    node: &crate::graph::Node,
    name: &str,
    granularity: Option<u64>,
    persistent: bool,
    disabled: bool,
) -> Result<(), BitmapError> {
    if name.is_empty() {
        return Err(BitmapError::EmptyName);
    }
    let driver = node.driver();
    let granularity = match granularity {
        Some(g) => {
            check_granularity(g)?;
            g
        }
        None => default_granularity(driver.image_details().map(|d| d.cluster_size)),
    };
    if persistent {
        return Err(BitmapError::CannotPersist(node.name().into()));
    }
    node.bitmaps()
        .add(name, driver.size(), granularity, persistent, disabled)
}

/// Checks a granularity the user gave.
pub fn check_granularity(granularity: u64) -> Result<(), BitmapError> {
    if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) || !granularity.is_power_of_two()
    {
        return Err(BitmapError::Granularity);
    }
    Ok(())
}

/// A set of dirty granules over `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    shift: u32,
    size: u64,
    words: Vec<u64>,
    /// Dirty granules.
    dirty: u64,
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes; `granularity` must pass
    /// [`check_granularity`].
    pub fn new(size: u64, granularity: u64) -> Result<Self, BitmapError> {
        check_granularity(granularity)?;
        let shift = granularity.trailing_zeros();
        let granules = size.div_ceil(granularity);
        Ok(Self {
            shift,
            size,
            words: vec![0; granules.div_ceil(64) as usize],
            dirty: 0,
        })
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// The bytes it covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn granules(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Dirty bytes as QEMU counts them: dirty granules times the
    /// granularity (a partial last granule counts whole).
    pub fn count(&self) -> u64 {
        self.dirty << self.shift
    }

    /// Whether nothing is dirty.
    pub fn is_clean(&self) -> bool {
        self.dirty == 0
    }

    /// Whether the granule holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let g = offset >> self.shift;
        self.words[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    /// Whether the byte at `offset` is dirty, and how many bytes from
    /// there (at least 1 when `len` is, at most `len`) are alike: the run
    /// an NBD `qemu:dirty-bitmap:` extent reports. Bytes past the end
    /// are clean.
    pub fn extent(&self, offset: u64, len: u64) -> (bool, u64) {
        if offset >= self.size {
            return (false, len);
        }
        let g = offset >> self.shift;
        let dirty = self.is_dirty(offset);
        let end = self.find(g, !dirty);
        if !dirty && end >= self.granules() {
            return (false, len);
        }
        let stop = (end << self.shift).min(self.size);
        (dirty, (stop - offset).min(len))
    }

    /// Marks every granule `[offset, offset + len)` touches; bytes past
    /// the end are ignored.
    pub fn mark(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        self.set_granules(first, last + 1, true);
    }

    /// Clears the granules lying wholly inside `[offset, offset + len)`
    /// (the end of the node counts as covering a partial last granule): a
    /// granule partly outside keeps its other bytes' dirt.
    pub fn unmark(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let first = offset.div_ceil(self.granularity());
        let last = if end == self.size {
            self.granules()
        } else {
            end >> self.shift
        };
        if first < last {
            self.set_granules(first, last, false);
        }
    }

    /// Marks everything.
    pub fn fill(&mut self) {
        let granules = self.granules();
        self.set_granules(0, granules, true);
    }

    /// Clears everything.
    pub fn clear(&mut self) {
        self.words.fill(0);
        self.dirty = 0;
    }

    /// Sets (or clears) granules `[first, end)`, a word at a time.
    fn set_granules(&mut self, first: u64, end: u64, dirty: bool) {
        let mut g = first;
        while g < end {
            let bit = g % 64;
            let n = (64 - bit).min(end - g);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let word = &mut self.words[(g / 64) as usize];
            let before = word.count_ones();
            if dirty {
                *word |= mask;
            } else {
                *word &= !mask;
            }
            let after = word.count_ones();
            self.dirty = self.dirty + u64::from(after) - u64::from(before);
            g += n;
        }
    }

    /// The dirty extents, in order, each as long as possible, as
    /// `(offset, len)` in bytes, the last one ending at the node's end.
    pub fn extents(&self) -> Extents<'_> {
        self.extents_from(0)
    }

    /// The dirty extents from the granule holding `offset` on.
    pub fn extents_from(&self, offset: u64) -> Extents<'_> {
        Extents {
            bitmap: self,
            next: offset >> self.shift,
        }
    }

    /// The first granule at or after `g` whose bit is `dirty`, or the
    /// number of granules.
    fn find(&self, mut g: u64, dirty: bool) -> u64 {
        let granules = self.granules();
        while g < granules {
            let bit = g % 64;
            let word = self.words[(g / 64) as usize];
            let word = if dirty { word } else { !word };
            let rest = word >> bit;
            if rest != 0 {
                return (g + u64::from(rest.trailing_zeros())).min(granules);
            }
            g += 64 - bit;
        }
        granules
    }

    /// Marks everything `other` has dirty (any granularity, same size).
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        if other.size != self.size {
            return Err(BitmapError::SizeMismatch(self.size, other.size));
        }
        if other.shift == self.shift {
            for (w, o) in self.words.iter_mut().zip(&other.words) {
                *w |= o;
            }
            self.dirty = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        } else {
            for (offset, len) in other.extents() {
                self.mark(offset, len);
            }
        }
        Ok(())
    }
}

/// The dirty extents of a [`DirtyBitmap`]: see [`DirtyBitmap::extents`].
pub struct Extents<'a> {
    bitmap: &'a DirtyBitmap,
    next: u64,
}

impl Iterator for Extents<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let b = self.bitmap;
        let start = b.find(self.next, true);
        if start >= b.granules() {
            self.next = start;
            return None;
        }
        let end = b.find(start, false);
        self.next = end;
        let offset = start << b.shift;
        let stop = (end << b.shift).min(b.size);
        Some((offset, stop - offset))
    }
}

/// What happens to a frozen bitmap when its backup ends (QMP's
/// `bitmap-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapSyncMode {
    /// Cleared of what was copied if the backup succeeded; as it was
    /// (plus new writes) if not.
    OnSuccess,
    /// Never changed by the backup: a read-only list of what to copy.
    Never,
    /// Cleared of what was copied, whether the backup succeeded or not.
    Always,
}

impl BitmapSyncMode {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapSyncMode::OnSuccess => "on-success",
            BitmapSyncMode::Never => "never",
            BitmapSyncMode::Always => "always",
        }
    }
}

impl std::str::FromStr for BitmapSyncMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "on-success" => Ok(Self::OnSuccess),
            "never" => Ok(Self::Never),
            "always" => Ok(Self::Always),
            _ => Err(()),
        }
    }
}

/// What `query-block` shows of one bitmap (QEMU's `BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name; `None` for a frozen bitmap's successor.
    pub name: Option<String>,
    /// Dirty bytes (granules times the granularity).
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether writes are being recorded in it (a frozen bitmap records
    /// through its successor).
    pub recording: bool,
    /// Whether an operation uses it, so it cannot be changed.
    pub busy: bool,
    /// Whether it is stored in the image.
    pub persistent: bool,
}

/// One named bitmap and its state.
struct Entry {
    name: String,
    bitmap: DirtyBitmap,
    enabled: bool,
    persistent: bool,
    /// While frozen: where writes go meanwhile, enabled as the bitmap was.
    successor: Option<DirtyBitmap>,
    /// Users other than a freeze (an export reading it).
    claims: u32,
}

impl Entry {
    fn busy(&self) -> bool {
        self.successor.is_some() || self.claims > 0
    }

    fn check_free(&self) -> Result<(), BitmapError> {
        if self.busy() {
            return Err(BitmapError::Busy(self.name.clone()));
        }
        Ok(())
    }
}

/// A node's named dirty bitmaps.
#[derive(Default)]
pub struct Bitmaps {
    /// Whether any bitmap (or successor) records writes: the one thing a
    /// writer looks at when there is none.
    recording: AtomicBool,
    /// Newest first, as QEMU lists them.
    entries: Mutex<Vec<Entry>>,
    /// Whether any internal bitmap exists (they always record).
    internal_recording: AtomicBool,
    /// Bitmaps of the block layer's own (block migration's dirty
    /// tracking), by id: never listed, named or touched by the user.
    internal: Mutex<Vec<(u64, DirtyBitmap)>>,
}

impl Bitmaps {
    /// No bitmaps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any bitmap records writes (two atomic loads).
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Acquire) || self.internal_recording.load(Ordering::Acquire)
    }

    fn update_recording(&self, entries: &[Entry]) {
        // A frozen bitmap records through its successor, which records
        // as the bitmap did.
        let any = entries.iter().any(|e| e.enabled);
        self.recording.store(any, Ordering::Release);
    }

    fn find<'a>(entries: &'a mut [Entry], name: &str) -> Result<&'a mut Entry, BitmapError> {
        entries
            .iter_mut()
            .find(|e| e.name == name)
            .ok_or_else(|| BitmapError::NotFound(name.into()))
    }

    /// Records that `[offset, offset + len)` was written, in every
    /// recording bitmap (a frozen one's successor instead of it).
    pub fn mark(&self, offset: u64, len: u64) {
        if self.recording.load(Ordering::Acquire) {
            let mut entries = lock(&self.entries);
            for e in entries.iter_mut().filter(|e| e.enabled) {
                match &mut e.successor {
                    Some(s) => s.mark(offset, len),
                    None => e.bitmap.mark(offset, len),
                }
            }
        }
        if self.internal_recording.load(Ordering::Acquire) {
            for (_, b) in lock(&self.internal).iter_mut() {
                b.mark(offset, len);
            }
        }
    }

    /// A new clean internal bitmap over `size` bytes, recording from now
    /// on until [`Bitmaps::remove_internal`]; its id.
    pub fn add_internal(&self, size: u64, granularity: u64) -> Result<u64, BitmapError> {
        let bitmap = DirtyBitmap::new(size, granularity)?;
        let id = crate::graph::next_id();
        let mut internal = lock(&self.internal);
        internal.push((id, bitmap));
        self.internal_recording.store(true, Ordering::Release);
        Ok(id)
    }

    /// Removes internal bitmap `id`.
    pub fn remove_internal(&self, id: u64) {
        let mut internal = lock(&self.internal);
        internal.retain(|(i, _)| *i != id);
        self.internal_recording
            .store(!internal.is_empty(), Ordering::Release);
    }

    /// Dirty bytes in internal bitmap `id` (0 if there is none).
    pub fn internal_count(&self, id: u64) -> u64 {
        lock(&self.internal)
            .iter()
            .find(|(i, _)| *i == id)
            .map_or(0, |(_, b)| b.count())
    }

    /// Dirty bytes of internal bitmap `id` below `end`.
    pub fn internal_count_below(&self, id: u64, end: u64) -> u64 {
        lock(&self.internal)
            .iter()
            .find(|(i, _)| *i == id)
            .map_or(0, |(_, b)| {
                b.extents()
                    .take_while(|&(offset, _)| offset < end)
                    .map(|(offset, len)| len.min(end - offset))
                    .sum()
            })
    }

    /// Clears `[offset, offset + len)` in internal bitmap `id`: the
    /// caller is about to copy it anyway.
    pub fn clear_internal(&self, id: u64, offset: u64, len: u64) {
        if let Some((_, b)) = lock(&self.internal).iter_mut().find(|(i, _)| *i == id) {
            b.unmark(offset, len);
        }
    }

    /// Marks `[offset, offset + len)` in internal bitmap `id` only: a
    /// copy of it failed, so it is still to copy.
    pub fn mark_internal(&self, id: u64, offset: u64, len: u64) {
        if let Some((_, b)) = lock(&self.internal).iter_mut().find(|(i, _)| *i == id) {
            b.mark(offset, len);
        }
    }

    /// Takes the first dirty extent of internal bitmap `id` at or after
    /// `from` (else from the start), at most `max` bytes (a multiple of
    /// its granularity), and clears it: the caller copies it now, and a
    /// write landing from here on marks it again.
    pub fn take_internal(&self, id: u64, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut internal = lock(&self.internal);
        let (_, b) = internal.iter_mut().find(|(i, _)| *i == id)?;
        let (offset, len) = b.extents_from(from).next().or_else(|| b.extents().next())?;
        let len = len.min(max);
        b.unmark(offset, len);
        Some((offset, len))
    }

    /// `block-dirty-bitmap-add`: a new clean bitmap over `size` bytes.
    /// Whether the node can store it (`persistent`) is the caller's
    /// question.
    pub fn add(
        &self,
        name: &str,
        size: u64,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), BitmapError> {
        if name.is_empty() {
            return Err(BitmapError::EmptyName);
        }
        check_granularity(granularity)?;
        let mut entries = lock(&self.entries);
        if entries.iter().any(|e| e.name == name) {
            return Err(BitmapError::Exists(name.into()));
        }
        if name.len() > MAX_NAME {
            return Err(BitmapError::NameTooLong(name.into()));
        }
        entries.insert(
            0,
            Entry {
                name: name.into(),
                bitmap: DirtyBitmap::new(size, granularity)?,
                enabled: !disabled,
                persistent,
                successor: None,
                claims: 0,
            },
        );
        self.update_recording(&entries);
        Ok(())
    }

    /// `block-dirty-bitmap-remove`; refused while it is busy.
    pub fn remove(&self, name: &str) -> Result<(), BitmapError> {
        let mut entries = lock(&self.entries);
        Self::find(&mut entries, name)?.check_free()?;
        entries.retain(|e| e.name != name);
        self.update_recording(&entries);
        Ok(())
    }

    /// `block-dirty-bitmap-clear`; refused while it is busy.
    pub fn clear(&self, name: &str) -> Result<(), BitmapError> {
        let mut entries = lock(&self.entries);
        let e = Self::find(&mut entries, name)?;
        e.check_free()?;
        e.bitmap.clear();
        Ok(())
    }

    /// `block-dirty-bitmap-enable` (`true`) or `-disable`; refused while
    /// it is busy.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), BitmapError> {
        let mut entries = lock(&self.entries);
        let e = Self::find(&mut entries, name)?;
        e.check_free()?;
        e.enabled = enabled;
        self.update_recording(&entries);
        Ok(())
    }

    /// Whether a bitmap of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        lock(&self.entries).iter().any(|e| e.name == name)
    }

    /// Fails with QEMU's words if `name` is missing or busy.
    pub fn check_usable(&self, name: &str) -> Result<(), BitmapError> {
        let mut entries = lock(&self.entries);
        Self::find(&mut entries, name)?.check_free()
    }

    /// A copy of bitmap `name` as it is now.
    pub fn snapshot(&self, name: &str) -> Result<DirtyBitmap, BitmapError> {
        let mut entries = lock(&self.entries);
        Ok(Self::find(&mut entries, name)?.bitmap.clone())
    }

    /// What `query-block` shows, newest first; frozen bitmaps' successors
    /// come first, unnamed, as in QEMU (they are the newest).
    pub fn info(&self) -> Vec<BitmapInfo> {
        let entries = lock(&self.entries);
        let mut out = Vec::new();
        for e in entries.iter() {
            if let Some(s) = &e.successor {
                out.push(BitmapInfo {
                    name: None,
                    count: s.count(),
                    granularity: s.granularity(),
                    recording: e.enabled,
                    busy: false,
                    persistent: false,
                });
            }
        }
        for e in entries.iter() {
            out.push(BitmapInfo {
                name: Some(e.name.clone()),
                count: e.bitmap.count(),
                granularity: e.bitmap.granularity(),
                recording: e.enabled,
                busy: e.busy(),
                persistent: e.persistent,
            });
        }
        out
    }

    /// Freezes bitmap `name` for a backup: it stops changing and is busy
    /// until the returned handle finishes (or is dropped, which counts as
    /// a failure); new writes go to a successor meanwhile.
    pub fn freeze(
        self: &Arc<Self>,
        name: &str,
        mode: BitmapSyncMode,
    ) -> Result<Frozen, BitmapError> {
        let mut entries = lock(&self.entries);
        let e = Self::find(&mut entries, name)?;
        e.check_free()?;
        let successor = DirtyBitmap::new(e.bitmap.size(), e.bitmap.granularity())?;
        e.successor = Some(successor);
        let bitmap = e.bitmap.clone();
        self.update_recording(&entries);
        Ok(Frozen {
            bitmaps: self.clone(),
            name: name.into(),
            mode,
            bitmap,
            finished: false,
        })
    }

    /// Makes bitmap `name` busy (it can be read, not changed or removed)
    /// until the returned claim is dropped: for an export offering it.
    pub fn claim(self: &Arc<Self>, name: &str) -> Result<Claim, BitmapError> {
        let mut entries = lock(&self.entries);
        let e = Self::find(&mut entries, name)?;
        e.claims += 1;
        Ok(Claim {
            bitmaps: self.clone(),
            name: name.into(),
        })
    }
}

/// A bitmap held busy by an export; see [`Bitmaps::claim`].
pub struct Claim {
    bitmaps: Arc<Bitmaps>,
    name: String,
}

impl Claim {
    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A copy of the bitmap as it is now.
    pub fn snapshot(&self) -> DirtyBitmap {
        self.bitmaps
            .snapshot(&self.name)
            .expect("a claimed bitmap cannot be removed")
    }

    /// [`DirtyBitmap::extent`] of the bitmap as it is now: the state of
    /// `offset` and how far it runs, within `len`.
    pub fn extent(&self, offset: u64, len: u64) -> (bool, u64) {
        let mut entries = lock(&self.bitmaps.entries);
        Bitmaps::find(&mut entries, &self.name)
            .expect("a claimed bitmap cannot be removed")
            .bitmap
            .extent(offset, len)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut entries = lock(&self.bitmaps.entries);
        if let Ok(e) = Bitmaps::find(&mut entries, &self.name) {
            e.claims = e.claims.saturating_sub(1);
        }
    }
}

/// A bitmap frozen for a backup; see [`Bitmaps::freeze`].
pub struct Frozen {
    bitmaps: Arc<Bitmaps>,
    name: String,
    mode: BitmapSyncMode,
    /// The bitmap as frozen: what the backup copies.
    bitmap: DirtyBitmap,
    finished: bool,
}

impl Frozen {
    /// The bitmap as it was frozen.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// The frozen bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its sync mode.
    pub fn mode(&self) -> BitmapSyncMode {
        self.mode
    }

    /// Ends the freeze. If the backup `succeeded` (or the mode is
    /// `always`, and never with `never`), the bitmap becomes its successor:
    /// only what was written since the freeze stays dirty; then, after a
    /// failure, `not_copied` (what the backup did not copy) is added back.
    /// Otherwise the bitmap keeps its bits and gains the successor's.
    pub fn finish(mut self, succeeded: bool, not_copied: Option<&DirtyBitmap>) {
        self.end(succeeded, not_copied);
    }

    fn end(&mut self, succeeded: bool, not_copied: Option<&DirtyBitmap>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let mut entries = lock(&self.bitmaps.entries);
        let Ok(e) = Bitmaps::find(&mut entries, &self.name) else {
            return;
        };
        let Some(successor) = e.successor.take() else {
            return;
        };
        let sync = (succeeded || self.mode == BitmapSyncMode::Always)
            && self.mode != BitmapSyncMode::Never;
        if sync {
            e.bitmap = successor;
            if !succeeded {
                // What was not copied is still to copy; without a list of
                // it, everything the freeze held is.
                let rest = not_copied.unwrap_or(&self.bitmap);
                let _ = e.bitmap.merge(rest);
            }
        } else {
            let _ = e.bitmap.merge(&successor);
        }
        self.bitmaps.update_recording(&entries);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // A backup that never finished (its creation failed, it was
        // abandoned) loses no dirty bit.
        self.end(false, None);
    }
}

#[cfg(test)]
mod tests;
