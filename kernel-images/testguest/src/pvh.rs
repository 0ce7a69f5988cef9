//! The PVH start info (`struct hvm_start_info`, Xen's
//! public/arch-x86/hvm/start_info.h) that the VMM passes in %ebx.

use crate::phys;
use crate::serial::warning;

pub const MAGIC: u32 = 0x336e_c578;

// Offsets in struct hvm_start_info.
const OFF_MAGIC: u64 = 0;
const OFF_VERSION: u64 = 4;
const OFF_CMDLINE_PADDR: u64 = 24;
const OFF_MEMMAP_PADDR: u64 = 40;
const OFF_MEMMAP_ENTRIES: u64 = 48;
/// Size of the version 0 structure (fields up to rsdp_paddr).
const SIZE_V0: u64 = 40;
/// Size of the version 1 structure (adds memmap_paddr, memmap_entries, reserved).
const SIZE_V1: u64 = 56;

/// struct hvm_memmap_table_entry: addr u64, size u64, type u32, reserved u32.
const MEMMAP_ENTRY_SIZE: u64 = 24;
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// More entries than this means a broken table (Linux's E820 has 128).
const MEMMAP_MAX_ENTRIES: u64 = 1024;

/// Longest command line read (Linux's x86 COMMAND_LINE_SIZE is 2048).
const CMDLINE_MAX: u64 = 4096;

/// The parts of the start info the test guest uses, validated.
pub struct StartInfo {
    pub cmdline: &'static [u8],
    /// (paddr, entries) of the memory map, if version >= 1 and it is in range.
    memmap: Option<(u64, u64)>,
}

impl StartInfo {
    /// Reads the start info at `paddr`; prints a warning and returns
    /// None if there is none (bad address or magic).
    pub fn read(paddr: u64) -> Option<StartInfo> {
        if !phys::range_ok(paddr, SIZE_V0) {
            warning!("no hvm_start_info (ebx={:#x})", paddr);
            return None;
        }
        let magic = phys::read_u32(paddr + OFF_MAGIC);
        if magic != MAGIC {
            warning!("bad hvm_start_info magic {:#x} at {:#x}", magic, paddr);
            return None;
        }
        let version = phys::read_u32(paddr + OFF_VERSION);
        let cmdline = read_cmdline(phys::read_u64(paddr + OFF_CMDLINE_PADDR));

        let memmap = if version < 1 || !phys::range_ok(paddr, SIZE_V1) {
            warning!("hvm_start_info version {} has no memory map", version);
            None
        } else {
            let table = phys::read_u64(paddr + OFF_MEMMAP_PADDR);
            let entries = phys::read_u32(paddr + OFF_MEMMAP_ENTRIES) as u64;
            if entries == 0 {
                warning!("empty memory map");
                None
            } else if entries > MEMMAP_MAX_ENTRIES
                || !phys::range_ok(table, entries * MEMMAP_ENTRY_SIZE)
            {
                warning!("bad memory map: {} entries at {:#x}", entries, table);
                None
            } else {
                Some((table, entries))
            }
        };
        Some(StartInfo { cmdline, memmap })
    }

    /// The RAM (type 1) entry of the memory map that contains `addr`, as
    /// (start, end); None without a map or if no entry does.
    pub fn ram_region_containing(&self, addr: u64) -> Option<(u64, u64)> {
        let (table, entries) = self.memmap?;
        (0..entries).find_map(|i| {
            let e = table + i * MEMMAP_ENTRY_SIZE;
            let start = phys::read_u64(e);
            let end = start.saturating_add(phys::read_u64(e + 8));
            (phys::read_u32(e + 16) == MEMMAP_TYPE_RAM && start <= addr && addr < end)
                .then_some((start, end))
        })
    }

    /// The highest end address of any memory map entry (0 without a map).
    pub fn top_of_memory(&self) -> u64 {
        let Some((table, entries)) = self.memmap else {
            return 0;
        };
        (0..entries)
            .map(|i| {
                let e = table + i * MEMMAP_ENTRY_SIZE;
                phys::read_u64(e).saturating_add(phys::read_u64(e + 8))
            })
            .max()
            .unwrap_or(0)
    }

    /// Sum of the sizes of the RAM (type 1) entries of the memory map, in
    /// bytes; 0 without a map.
    pub fn ram_bytes(&self) -> u64 {
        let Some((table, entries)) = self.memmap else {
            return 0;
        };
        let mut total = 0u64;
        for i in 0..entries {
            let e = table + i * MEMMAP_ENTRY_SIZE;
            if phys::read_u32(e + 16) == MEMMAP_TYPE_RAM {
                total = total.saturating_add(phys::read_u64(e + 8));
            }
        }
        total
    }
}

/// The NUL-terminated command line at `paddr`; empty if `paddr` is 0.
fn read_cmdline(paddr: u64) -> &'static [u8] {
    if paddr == 0 {
        return &[];
    }
    // Clip the window at the end of the identity map.
    let window = CMDLINE_MAX.min(phys::MAPPED_END.saturating_sub(paddr));
    if window == 0 || !phys::range_ok(paddr, window) {
        warning!("command line at {:#x} is not mapped", paddr);
        return &[];
    }
    let bytes = phys::bytes(paddr, window);
    match bytes.iter().position(|&b| b == 0) {
        Some(len) => &bytes[..len],
        None => {
            warning!("command line longer than {} bytes, truncated", CMDLINE_MAX);
            bytes
        }
    }
}
