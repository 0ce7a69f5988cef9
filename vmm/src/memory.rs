//! The guest physical address map and guest RAM.
//!
//! ```text
//! 0x0000_0000  RAM (boot structures, page tables, command line)
//! 0x0009_fc00  reserved: EBDA, MP table, legacy holes
//! 0x0010_0000  RAM (kernel at 1 MiB or 16 MiB, initrd at the top)
//! 0xc000_0000  MMIO gap up to 4 GiB (devices, IOAPIC, LAPIC)
//! 0x1_0000_0000 RAM beyond 3 GiB, if any
//! ```

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};

/// Where the reserved low area starts (the EBDA, which holds our MP table).
pub const EBDA_START: u64 = 0x9_fc00;
/// Where RAM resumes above the legacy holes.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the hole below 4 GiB kept for device MMIO.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of that hole.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Where the first virtio-mmio device's registers go (inside the MMIO gap).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Bytes between consecutive virtio-mmio devices.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// The interrupt line of the first virtio-mmio device; the others follow.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The smallest guest we build: below this not even a small kernel fits.
pub const MIN_MEMORY_MIB: u64 = 16;
const PAGE_SIZE: u64 = 4096;

/// E820 / PVH memory-map entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Usable RAM (type 1).
    Ram = 1,
    /// Reserved (type 2).
    Reserved = 2,
}

/// One entry of the memory map the guest is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: RegionKind,
}

/// Checks a requested RAM size against our limits and the host's memory.
pub fn validate_size(size: u64, host_total: Option<u64>) -> Result<()> {
    if size < MIN_MEMORY_MIB << 20 {
        return Err(Error::MemoryTooSmall {
            size,
            min: MIN_MEMORY_MIB,
        });
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(Error::MemoryUnaligned(size));
    }
    if let Some(host) = host_total {
        if size > host {
            return Err(Error::MemoryTooLarge {
                size_mib: size >> 20,
                host_mib: host >> 20,
            });
        }
    }
    Ok(())
}

/// The RAM ranges of a guest with `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// The end of RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// The memory map the guest sees (E820 for Linux, the PVH memmap otherwise).
pub fn memory_map(size: u64) -> Vec<MapEntry> {
    let mut map = vec![
        MapEntry {
            addr: 0,
            size: EBDA_START,
            kind: RegionKind::Ram,
        },
        MapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: RegionKind::Reserved,
        },
        MapEntry {
            addr: HIMEM_START,
            size: low_ram_end(size) - HIMEM_START,
            kind: RegionKind::Ram,
        },
    ];
    if size > MMIO_GAP_START {
        map.push(MapEntry {
            addr: MMIO_GAP_END,
            size: size - MMIO_GAP_START,
            kind: RegionKind::Ram,
        });
    }
    map
}

/// Tells KVM where guest RAM lives in this process, one memory slot per
/// region (slot `i` is region `i`), with `flags` (`KVM_MEM_LOG_DIRTY_PAGES`
/// while a migration tracks writes). Registering a slot again with only
/// its flags changed is how KVM switches dirty logging.
pub fn register_slots(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    flags: u32,
) -> std::result::Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let table = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size`
        // bytes, owned by `mem`, which the VM keeps (or leaks) until every
        // vCPU has stopped; slots do not overlap (one per region).
        unsafe { vm.set_user_memory_region(table) }?;
    }
    Ok(())
}

/// Maps anonymous, unreserved memory for the guest's RAM.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| (addr, len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::MemoryAlloc {
        size_mib: size >> 20,
        reason: e.to_string(),
    })?;
    Ok(mem)
}

/// Folds into huge pages the 2 MiB blocks of fresh guest RAM the VMM wrote
/// in 4 KiB pages before [`advise_huge_pages`] (the kernel, its command
/// line and boot tables, at the bottom of RAM); blocks nobody touched are
/// left alone. Called once the guest runs: folding a block allocates a
/// huge page, which can take milliseconds here. Without it, the guest
/// buffers that share a block with the kernel stay in 4 KiB pages for the
/// guest's whole life (bench/blk.py, the test guest's 128k sequential
/// reads: 19.0k IOPS before, 23.6k after, medians of 5). Best effort: a
/// block with I/O in flight, or a kernel without MADV_COLLAPSE (before
/// Linux 6.1), stays as it is.
pub fn collapse_huge_pages(mem: &GuestMemoryMmap) {
    advise(mem, libc::MADV_COLLAPSE, "MADV_COLLAPSE");
}

/// Asks for huge pages for guest RAM where the host's THP mode is
/// "madvise": large transfers into guest RAM pin fewer pages (in
/// bench/blk.py QEMU's 128k sequential reads fell from 13.0k to 7.7k IOPS
/// without them). Called once the guest runs, not before the VMM writes
/// the kernel: a first fault of a 2 MiB page whose memory the host has not
/// backed yet took about 5 ms on our PVM machines (against 2-12 µs for a
/// 4 KiB page), and start-up touches only a few pages; RAM the guest first
/// touches from then on gets huge pages, and khugepaged may merge the rest.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    advise(mem, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE");
}

/// `madvise(advice)` over each region of guest RAM; a refusal is only
/// logged (both advices are about how RAM is backed, not what it holds).
fn advise(mem: &GuestMemoryMmap, advice: libc::c_int, name: &str) {
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        // SAFETY: the range is exactly one mapping `mem` owns; the callers'
        // advices change how it is backed, never its contents or validity.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
        if rc != 0 {
            log::debug!(
                "guest RAM: {name} refused: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_range_and_large_ones_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let big = 4u64 << 30;
        assert_eq!(
            ram_ranges(big),
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), big - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn memory_map_covers_all_ram_but_the_legacy_area() {
        for size in [16u64 << 20, 128 << 20, 5 << 30] {
            let map = memory_map(size);
            let ram: u64 = map
                .iter()
                .filter(|e| e.kind == RegionKind::Ram)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram, size - (HIMEM_START - EBDA_START));
            // Entries are sorted and do not overlap.
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr);
            }
        }
    }

    #[test]
    fn folding_written_ram_into_huge_pages_keeps_every_byte() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(16 << 20).unwrap();
        // As the loader does: a few pages written before the advice, in
        // the block that also holds untouched ones, and one block apart.
        let spots = [0x1000u64, 0x10_0000, 0x1f_f000, 0x60_0000];
        for (i, &at) in spots.iter().enumerate() {
            let page: Vec<u8> = (0..4096).map(|b| (b as u8) ^ (i as u8 * 37)).collect();
            mem.write_slice(&page, GuestAddress(at)).unwrap();
        }
        advise_huge_pages(&mem);
        collapse_huge_pages(&mem);
        for (i, &at) in spots.iter().enumerate() {
            let mut page = vec![0u8; 4096];
            mem.read_slice(&mut page, GuestAddress(at)).unwrap();
            let want: Vec<u8> = (0..4096).map(|b| (b as u8) ^ (i as u8 * 37)).collect();
            assert_eq!(page, want, "the page at {at:#x} changed");
        }
        // What was never written still reads as zeros.
        let mut page = vec![0xffu8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
    }

    #[test]
    fn sizes_outside_the_limits_are_refused() {
        assert!(matches!(
            validate_size(8 << 20, None),
            Err(Error::MemoryTooSmall { .. })
        ));
        assert!(matches!(
            validate_size((64 << 20) + 1, None),
            Err(Error::MemoryUnaligned(_))
        ));
        let err = validate_size(64 << 30, Some(24 << 30)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest memory of 65536 MiB is more than this host's 24576 MiB"
        );
        assert!(validate_size(64 << 20, Some(24 << 30)).is_ok());
    }
}
