//! Guest RAM on the move: which pages changed since the last pass (KVM's
//! dirty log for the vCPUs' writes, [`DirtyPages`] for our own threads'),
//! sending runs of pages as frames, and taking them in.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use base::state::{StateError, StateReader};
use devices::dirty::DirtyPages;
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::format::{self, Kind, RAM_FRAME_PAGES};
use super::MigrationError;

/// Bytes in a page.
pub const PAGE: u64 = 4096;

/// A set of guest pages, by guest page number.
#[derive(Debug, Clone)]
pub struct PageSet {
    words: Vec<u64>,
}

impl PageSet {
    /// No pages, for guest addresses below `end`.
    pub fn empty(end: u64) -> Self {
        Self {
            words: vec![0; end.div_ceil(PAGE).div_ceil(64) as usize],
        }
    }

    /// Every page of guest RAM.
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        let mut set = Self::empty(ram_end(mem));
        for region in mem.iter() {
            let first = region.start_addr().0 / PAGE;
            for page in first..first + region.len() / PAGE {
                set.insert(page);
            }
        }
        set
    }

    /// Adds page `page`; pages beyond the set's end are ignored.
    pub fn insert(&mut self, page: u64) {
        if let Some(w) = self.words.get_mut((page / 64) as usize) {
            *w |= 1 << (page % 64);
        }
    }

    /// Adds every page of a KVM dirty bitmap for the slot starting at `first`.
    fn insert_bitmap(&mut self, first: u64, bitmap: &[u64]) {
        for (i, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                self.insert(first + i as u64 * 64 + bit);
                bits &= bits - 1;
            }
        }
    }

    /// How many pages are in the set.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Runs of consecutive pages, as (first page, count), each at most
    /// `max` long.
    pub fn runs(&self, max: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut page = 0u64;
        let end = self.words.len() as u64 * 64;
        std::iter::from_fn(move || {
            while page < end {
                let word = self.words[(page / 64) as usize] >> (page % 64);
                if word == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                page += u64::from(word.trailing_zeros());
                let first = page;
                while page < end
                    && page - first < max
                    && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
                {
                    page += 1;
                }
                return Some((first, page - first));
            }
            None
        })
    }
}

/// The end of guest RAM's highest region.
pub fn ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

/// Turns KVM's dirty logging of guest RAM on or off (each memory slot is
/// registered again with the flag, as KVM allows for flags alone).
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), MigrationError> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    crate::memory::register_slots(vm, mem, flags)
        .map_err(|e| MigrationError::kvm("switch dirty logging of guest RAM", e))
}

/// Takes the pages written since the last call: by vCPUs (KVM's log,
/// which this clears) and by our own threads (`dirty`, cleared too).
pub fn sync_dirty(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    dirty: &DirtyPages,
    into: &mut PageSet,
) -> Result<(), MigrationError> {
    for (slot, region) in mem.iter().enumerate() {
        let bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| MigrationError::kvm("read the dirty log of guest RAM", e))?;
        into.insert_bitmap(region.start_addr().0 / PAGE, &bitmap);
    }
    dirty.harvest(|page| into.insert(page));
    Ok(())
}

/// What a RAM pass sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Pages sent with their contents.
    pub normal: u64,
    /// Pages sent as "all zero" (or, in a first pass, skipped as such).
    pub zero: u64,
    /// Bytes written, frames included.
    pub bytes: u64,
}

/// Whether the guest page at `gpa` reads as all zeros, looked at where it
/// is: most of an idle guest's RAM is zero, and copying it out only to
/// find that costs more than the rest of a migration.
fn page_is_zero(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    let Ok(slice) = mem.get_slice(GuestAddress(gpa), PAGE as usize) else {
        return false;
    };
    let guard = slice.ptr_guard();
    let words = guard.as_ptr().cast::<u64>();
    let mut acc = 0u64;
    for i in 0..(PAGE / 8) as usize {
        // SAFETY: `get_slice` checked that the whole page lies in one guest
        // RAM region, which `mem` keeps mapped while we read; regions and
        // `gpa` are page aligned, so each u64 read is aligned and in
        // bounds. The reads are volatile because the guest may write the
        // page meanwhile: a stale value only means the page is sent (or
        // skipped) now, and the dirty log has it again for the next pass.
        acc |= unsafe { std::ptr::read_volatile(words.add(i)) };
    }
    acc == 0
}

/// The runs of `set` (at most a frame's worth each) split further into
/// runs of pages on which `zero` agrees: (first page, count, zero).
fn split_runs<'a>(
    set: &'a PageSet,
    zero: impl Fn(u64) -> bool + Copy + 'a,
) -> impl Iterator<Item = (u64, u64, bool)> + 'a {
    set.runs(RAM_FRAME_PAGES as u64)
        .flat_map(move |(first, count)| {
            let end = first + count;
            let mut page = first;
            std::iter::from_fn(move || {
                if page >= end {
                    return None;
                }
                let start = page;
                let z = zero(page);
                page += 1;
                while page < end && zero(page) == z {
                    page += 1;
                }
                Some((start, page - start, z))
            })
        })
}

/// Sends the pages of `set` as `Ram` frames: runs of non-zero pages with
/// their contents, runs of zero pages as a flag alone. In a first pass
/// (`skip_zero`) zero pages are not sent at all: the destination's RAM
/// starts zeroed. `pace` is called after each frame with the bytes it
/// took, to keep to a bandwidth and to notice a cancel.
pub fn send_pages<W: Write + ?Sized>(
    w: &mut W,
    mem: &GuestMemoryMmap,
    set: &PageSet,
    skip_zero: bool,
    buf: &mut Vec<u8>,
    mut pace: impl FnMut(u64) -> Result<(), MigrationError>,
) -> Result<Sent, MigrationError> {
    let mut sent = Sent::default();
    for (start, pages, zero) in split_runs(set, move |p| page_is_zero(mem, p * PAGE)) {
        if zero {
            sent.zero += pages;
            if skip_zero {
                continue;
            }
        } else {
            sent.normal += pages;
            buf.resize((pages * PAGE) as usize, 0);
            mem.read_slice(buf, GuestAddress(start * PAGE))
                .map_err(|e| MigrationError::Guest(format!("cannot read guest RAM: {e}")))?;
        }
        let mut head = [0u8; 13];
        head[..8].copy_from_slice(&(start * PAGE).to_le_bytes());
        head[8..12].copy_from_slice(&(pages as u32).to_le_bytes());
        head[12] = u8::from(zero);
        let data: &[u8] = if zero { &[] } else { buf };
        format::write_frame(w, Kind::Ram, &[&head, data]).map_err(MigrationError::send)?;
        let bytes = format::FRAME_OVERHEAD + head.len() as u64 + data.len() as u64;
        sent.bytes += bytes;
        pace(bytes)?;
    }
    Ok(sent)
}

/// Writes a `Ram` frame's pages into guest RAM; a run outside RAM (or a
/// malformed frame) is refused before anything is written.
pub fn receive_pages(mem: &GuestMemoryMmap, payload: &[u8]) -> Result<u64, MigrationError> {
    let mut r = StateReader::new(payload);
    let addr = r.u64("RAM frame address")?;
    let count = u64::from(r.u32("RAM frame page count")?);
    let zero = r.bool("RAM frame zero flag")?;
    if addr % PAGE != 0 || count == 0 || count > RAM_FRAME_PAGES as u64 {
        return Err(StateError::invalid(
            "RAM frame",
            format!("{count} pages at {addr:#x} is not a run of whole pages the format allows"),
        )
        .into());
    }
    let len = count * PAGE;
    let inside = mem
        .find_region(GuestAddress(addr))
        .is_some_and(|r| addr + len <= r.start_addr().0 + r.len());
    if !inside {
        return Err(StateError::invalid(
            "RAM frame",
            format!("{count} pages at {addr:#x} are outside guest RAM"),
        )
        .into());
    }
    let write = |data: &[u8]| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| MigrationError::Guest(format!("cannot write guest RAM: {e}")))
    };
    if zero {
        r.finish("RAM frame")?;
        let zeros = [0u8; PAGE as usize];
        for i in 0..count {
            mem.write_slice(&zeros, GuestAddress(addr + i * PAGE))
                .map_err(|e| MigrationError::Guest(format!("cannot write guest RAM: {e}")))?;
        }
    } else {
        let data = r.raw("RAM frame pages", len as usize)?;
        r.finish("RAM frame")?;
        write(data)?;
    }
    Ok(count)
}

/// Where a guest page lives in a state file's RAM image: regions follow
/// each other in guest address order, without the holes between them.
pub fn image_offset(mem: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
    let mut offset = 0;
    for region in mem.iter() {
        let start = region.start_addr().0;
        if gpa >= start && gpa < start + region.len() {
            return Some(offset + gpa - start);
        }
        offset += region.len();
    }
    None
}

/// Writes the pages of `set` into a state file's RAM image at `base`; in
/// a first pass (`skip_zero`) pages that read as zero stay holes.
pub fn write_image(
    file: &File,
    base: u64,
    mem: &GuestMemoryMmap,
    set: &PageSet,
    skip_zero: bool,
    buf: &mut Vec<u8>,
    mut pace: impl FnMut(u64) -> Result<(), MigrationError>,
) -> Result<Sent, MigrationError> {
    use std::os::unix::fs::FileExt;
    let mut sent = Sent::default();
    // In a first pass zero pages stay holes; later a page that became
    // zero must overwrite what the image had.
    let skip = move |p: u64| skip_zero && page_is_zero(mem, p * PAGE);
    for (start, pages, skipped) in split_runs(set, skip) {
        if skipped {
            sent.zero += pages;
            continue;
        }
        let len = (pages * PAGE) as usize;
        buf.resize(len, 0);
        let gpa = start * PAGE;
        mem.read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MigrationError::Guest(format!("cannot read guest RAM: {e}")))?;
        let offset = image_offset(mem, gpa).expect("runs come from guest RAM");
        file.write_all_at(buf, base + offset)
            .map_err(MigrationError::send)?;
        sent.normal += pages;
        sent.bytes += len as u64;
        pace(len as u64)?;
    }
    Ok(sent)
}

/// Guest RAM of `ranges` mapped privately from a state file's RAM image
/// at `base`: pages are read from the file when the guest first touches
/// them, and a guest's writes stay its own (copy-on-write), so many VMs
/// restored from one file share the pages none of them changed.
pub fn map_image(
    file: &Arc<File>,
    base: u64,
    ranges: &[(GuestAddress, u64)],
) -> Result<GuestMemoryMmap, MigrationError> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = base;
    for &(addr, len) in ranges {
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .build()
            .map_err(|e| MigrationError::Guest(format!("cannot map the state file's RAM: {e}")))?;
        regions.push(GuestRegionMmap::new(mapping, addr).ok_or_else(|| {
            MigrationError::Guest("guest RAM overflows the address space".into())
        })?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| MigrationError::Guest(format!("cannot lay out guest RAM: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps_and_at_the_maximum() {
        let mut set = PageSet::empty(1 << 30);
        for p in [0, 1, 2, 63, 64, 65, 200] {
            set.insert(p);
        }
        for p in 1000..1600 {
            set.insert(p);
        }
        let runs: Vec<_> = set.runs(256).collect();
        assert_eq!(
            runs,
            vec![
                (0, 3),
                (63, 3),
                (200, 1),
                (1000, 256),
                (1256, 256),
                (1512, 88)
            ]
        );
        assert_eq!(set.len(), 3 + 3 + 1 + 600);
        set.insert(u64::MAX / 2);
        assert_eq!(set.len(), 607, "pages past the end are ignored");
    }

    #[test]
    fn runs_split_where_the_zero_look_changes() {
        let mut set = PageSet::empty(1 << 30);
        for p in (0..6).chain(10..12) {
            set.insert(p);
        }
        let zero = |p: u64| p == 2 || p == 3 || p == 11;
        let runs: Vec<_> = split_runs(&set, zero).collect();
        assert_eq!(
            runs,
            vec![
                (0, 2, false),
                (2, 2, true),
                (4, 2, false),
                (10, 1, false),
                (11, 1, true)
            ]
        );
    }

    #[test]
    fn pages_sent_arrive_and_zero_pages_are_skipped_only_in_a_first_pass() {
        let ranges = [(GuestAddress(0), 1 << 20)];
        let src = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        src.write_slice(&[0xab; 5000], GuestAddress(0x3000))
            .unwrap();
        let mut set = PageSet::all(&src);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let sent = send_pages(&mut out, &src, &set, true, &mut buf, |_| Ok(())).unwrap();
        // Only pages 3 and 4 hold data; the rest is zero and skipped.
        assert_eq!(sent.normal, 2);
        assert_eq!(sent.zero, 254);
        let dst = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        dst.write_slice(&[0x11; 4096], GuestAddress(0x80000))
            .unwrap();
        let mut r = &out[..];
        let mut payload = Vec::new();
        while !r.is_empty() {
            assert_eq!(format::read_frame(&mut r, &mut payload).unwrap(), Kind::Ram);
            receive_pages(&dst, &payload).unwrap();
        }
        let mut got = vec![0u8; 5000];
        dst.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(got, vec![0xab; 5000]);
        // A later pass sends the zeroed page, so stale data goes.
        set.clear();
        set.insert(0x80);
        let mut out = Vec::new();
        let sent = send_pages(&mut out, &src, &set, false, &mut buf, |_| Ok(())).unwrap();
        assert_eq!((sent.normal, sent.zero), (0, 1));
        let mut r = &out[..];
        format::read_frame(&mut r, &mut payload).unwrap();
        receive_pages(&dst, &payload).unwrap();
        let mut page = vec![1u8; 4096];
        dst.read_slice(&mut page, GuestAddress(0x80000)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
    }

    #[test]
    fn frames_outside_ram_or_malformed_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let frame = |addr: u64, count: u32, zero: u8, data: usize| {
            let mut p = addr.to_le_bytes().to_vec();
            p.extend_from_slice(&count.to_le_bytes());
            p.push(zero);
            p.extend(std::iter::repeat_n(0u8, data));
            p
        };
        assert!(receive_pages(&mem, &frame(0xff000, 2, 1, 0)).is_err());
        assert!(receive_pages(&mem, &frame(0x10_0000, 1, 1, 0)).is_err());
        assert!(receive_pages(&mem, &frame(u64::MAX - 4095, 1, 1, 0)).is_err());
        assert!(receive_pages(&mem, &frame(0x1001, 1, 1, 0)).is_err());
        assert!(receive_pages(&mem, &frame(0, 0, 1, 0)).is_err());
        assert!(receive_pages(&mem, &frame(0, 1, 0, 100)).is_err());
        assert!(receive_pages(&mem, &frame(0, 1, 2, 0)).is_err());
        assert!(receive_pages(&mem, &frame(0, 1, 1, 1)).is_err());
        assert_eq!(receive_pages(&mem, &frame(0, 1, 0, 4096)).unwrap(), 1);
    }

    #[test]
    fn the_image_skips_the_hole_between_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        assert_eq!(image_offset(&mem, 0x1000), Some(0x1000));
        assert_eq!(image_offset(&mem, 1 << 32), Some(1 << 20));
        assert_eq!(image_offset(&mem, 1 << 21), None);
    }
}
