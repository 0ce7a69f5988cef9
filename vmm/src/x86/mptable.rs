//! The Intel MultiProcessor table (MP spec 1.4) that tells a guest without
//! ACPI how many CPUs it has, where the IOAPIC is, and how ISA interrupts
//! are wired to it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};

/// The IOAPIC's MMIO address (the PC standard one, as KVM's in-kernel IOAPIC uses).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
/// APIC IDs are 8 bits in the MP table, and one ID goes to the IOAPIC.
pub const MAX_CPUS: u32 = 254;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS: u8 = 0;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Builds the floating pointer and the configuration table for `cpus` CPUs,
/// the pointer at `addr` and the table right behind it.
pub fn build(addr: u64, cpus: u32) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::CpuCount {
            cpus,
            max: MAX_CPUS,
        });
    }
    let table_addr = u32::try_from(addr + 16).map_err(|_| Error::GuestWrite {
        what: "MP table",
        reason: format!("address {addr:#x} is above 4 GiB"),
    })?;
    let ioapic_id = cpus as u8;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus as u8 {
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        // CPU signature (family 6) and feature flags (FPU, APIC), as firmware
        // reports them; Linux reads only the APIC ID and flags.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Polarity and trigger "conform to bus" (0): edge, active high on ISA.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS, pin]);
        entries.extend_from_slice(&[ioapic_id, pin]);
        count += 1;
    }
    // LINT0 of every CPU is the 8259's ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let table_len = u16::try_from(HEADER_LEN + entries.len()).map_err(|_| Error::GuestWrite {
        what: "MP table",
        reason: "too many entries".into(),
    })?;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMM     ");
    table.extend_from_slice(b"VMM-0.1     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REV);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: table present, virtual wire
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` CPUs at `addr` in guest memory.
pub fn write(mem: &GuestMemoryMmap, addr: u64, cpus: u32) -> Result<()> {
    let bytes = build(addr, cpus)?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| Error::GuestWrite {
            what: "MP table",
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn table_lists_each_cpu_and_checksums_hold() {
        let addr = 0x9fc00;
        let bytes = build(addr, 3).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert!(sums_to_zero(&bytes[0..16]));
        let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, addr + 16);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert!(sums_to_zero(table));

        // Walk the entries as a guest would and count enabled CPUs.
        let count = u16::from_le_bytes([table[34], table[35]]);
        let (mut off, mut cpus, mut bsp) = (HEADER_LEN, 0, 0);
        for _ in 0..count {
            match table[off] {
                ENTRY_PROCESSOR => {
                    assert_eq!(table[off + 1], cpus, "APIC IDs in order");
                    cpus += 1;
                    bsp += (table[off + 3] & CPU_BSP != 0) as u8;
                    off += 20;
                }
                1..=4 => off += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(off, len);
        assert_eq!((cpus, bsp), (3, 1));
    }

    #[test]
    fn cpu_counts_outside_the_table_limits_are_refused() {
        assert!(build(0x9fc00, 0).is_err());
        assert!(build(0x9fc00, MAX_CPUS + 1).is_err());
        assert!(build(0x9fc00, MAX_CPUS).is_ok());
    }
}
