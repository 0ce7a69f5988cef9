//! Counting processors in the Intel MultiProcessor Specification 1.4
//! table.
//!
//! The MP floating pointer structure ("_MP_", 16 bytes, on a 16-byte
//! boundary) is searched in the first KiB of the EBDA (segment at 0x40e),
//! the last KiB of base memory (0x9fc00) and the BIOS area
//! 0xf0000..0x100000, in that order (the usual VMM places are first; the
//! 64 KiB BIOS scan is 4096 probes, 10-25 ms of emulated code). It points
//! to the configuration table ("PCMP"), whose entries are processors
//! (type 0, 20 bytes, flags bit 0 = enabled) and buses, I/O APICs and
//! interrupt assignments (types 1..4, 8 bytes). A table that fails a
//! check gives a warning line and counts as no table (1 CPU).

use crate::phys;
use crate::serial::warning;

const FPS_SIGNATURE: u32 = u32::from_le_bytes(*b"_MP_");
const CFG_SIGNATURE: u32 = u32::from_le_bytes(*b"PCMP");
const FPS_SIZE: u64 = 16;
const CFG_HEADER_SIZE: u64 = 44;

const BDA_EBDA_SEGMENT: u64 = 0x40e;
const BASE_MEMORY_END: u64 = 0xa0000;
const LAST_KIB_OF_BASE: u64 = BASE_MEMORY_END - 1024;
const BIOS_AREA: (u64, u64) = (0xf0000, 0x10000);

/// The result of the search.
pub enum Cpus {
    /// A valid table with this many enabled processors.
    Found(u64),
    /// No MP floating pointer structure anywhere.
    NoTable,
    /// A table that failed validation (a warning was printed).
    Broken,
}

pub fn count_cpus() -> Cpus {
    let ebda = (phys::read_u16(BDA_EBDA_SEGMENT) as u64) << 4;
    let ebda_ok = ebda >= 0x500 && ebda + 1024 <= BASE_MEMORY_END && ebda != LAST_KIB_OF_BASE;
    // The scan works in 128-byte units: widen the EBDA's first KiB to
    // them (the extra bytes are base memory too).
    let (ebda_start, ebda_len) = if ebda_ok {
        let start = ebda & !127;
        let end = ((ebda + 1024 + 127) & !127).min(BASE_MEMORY_END);
        (start, end - start)
    } else {
        (0, 0)
    };
    let areas = [
        (ebda_ok, ebda_start, ebda_len),
        (true, LAST_KIB_OF_BASE, 1024),
        (true, BIOS_AREA.0, BIOS_AREA.1),
    ];
    let mut bad_fps = None;
    for (wanted, start, len) in areas {
        if !wanted {
            continue;
        }
        // Eight 16-byte slots per iteration: the whole BIOS area is
        // 4096 slots, and every instruction is emulated (~0.25-1 µs), so
        // the loop is unrolled to about 2.5 instructions per slot.
        let mut block = start;
        while block < start + len {
            let hit = (0..8).any(|i| phys::read_u32(block + 16 * i) == FPS_SIGNATURE);
            if hit {
                for addr in (block..block + 128).step_by(16) {
                    if phys::read_u32(addr) != FPS_SIGNATURE {
                        continue;
                    }
                    if fps_valid(addr) {
                        return config(addr);
                    }
                    bad_fps.get_or_insert(addr);
                }
            }
            block += 128;
        }
    }
    match bad_fps {
        Some(addr) => {
            warning!("MP floating pointer at {:#x}: bad length or checksum", addr);
            Cpus::Broken
        }
        None => Cpus::NoTable,
    }
}

/// Length 1 (x 16 bytes) and checksum 0.
fn fps_valid(addr: u64) -> bool {
    phys::read_u8(addr + 8) == 1 && phys::checksum(phys::bytes(addr, FPS_SIZE)) == 0
}

/// Counts the enabled processors of the configuration table the valid
/// floating pointer at `fps` points to.
fn config(fps: u64) -> Cpus {
    let table = phys::read_u32(fps + 4) as u64;
    let default_config = phys::read_u8(fps + 11);
    if default_config != 0 {
        // MP spec 1.4 section 4.1: no table, one of the default
        // configurations, all of which have two processors.
        return Cpus::Found(2);
    }
    if !phys::range_ok(table, CFG_HEADER_SIZE) {
        warning!("MP table: config table address {:#x} out of range", table);
        return Cpus::Broken;
    }
    if phys::read_u32(table) != CFG_SIGNATURE {
        warning!("MP table: no PCMP signature at {:#x}", table);
        return Cpus::Broken;
    }
    let len = phys::read_u16(table + 4) as u64;
    if len < CFG_HEADER_SIZE || !phys::range_ok(table, len) {
        warning!("MP table at {:#x}: bad length {}", table, len);
        return Cpus::Broken;
    }
    let bytes = phys::bytes(table, len);
    if phys::checksum(bytes) != 0 {
        warning!("MP table at {:#x}: bad checksum", table);
        return Cpus::Broken;
    }
    // Entries are walked by the base table length, as Linux does: the
    // entry count field is not reliable (QEMU microvm's firmware leaves it
    // 0 in front of a complete table).
    let mut off = CFG_HEADER_SIZE as usize;
    let mut enabled = 0u64;
    let mut i = 0;
    while off < bytes.len() {
        let kind = bytes[off];
        let size = match kind {
            0 => 20,
            1..=4 => 8,
            _ => {
                warning!(
                    "MP table at {:#x}: entry {} has unknown type {}",
                    table,
                    i,
                    kind
                );
                return Cpus::Broken;
            }
        };
        if off + size > bytes.len() {
            warning!(
                "MP table at {:#x}: entry {} overruns its length {}",
                table,
                i,
                len
            );
            return Cpus::Broken;
        }
        if kind == 0 && bytes[off + 3] & 1 != 0 {
            enabled += 1;
        }
        off += size;
        i += 1;
    }
    if enabled == 0 {
        warning!("MP table at {:#x}: no enabled processor", table);
        return Cpus::Broken;
    }
    Cpus::Found(enabled)
}
