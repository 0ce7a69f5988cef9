//! The PVH boot protocol: an `hvm_start_info` with the command line, the
//! memory map and the initrd as module 0, its address in `ebx`.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Initrd;
use crate::error::{Error, Result};
use crate::memory::MapEntry;

/// Where the start info, the module list and the memory map go.
pub const START_INFO_ADDR: u64 = 0x6000;
const MODLIST_ADDR: u64 = 0x6040;
const MEMMAP_ADDR: u64 = 0x6100;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

fn guest_write(e: vm_memory::GuestMemoryError) -> Error {
    Error::GuestWrite {
        what: "PVH start info",
        reason: e.to_string(),
    }
}

/// Writes the start info; returns its address for `ebx`.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    cmdline_addr: u64,
    initrd: Option<Initrd>,
    map: &[MapEntry],
) -> Result<u64> {
    for (i, entry) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind as u32,
            reserved: 0,
        };
        let at = MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at)).map_err(guest_write)?;
    }
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(MODLIST_ADDR))
            .map_err(guest_write)?;
    }
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { MODLIST_ADDR } else { 0 },
        cmdline_paddr: cmdline_addr,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    mem.write_obj(info, GuestAddress(START_INFO_ADDR))
        .map_err(guest_write)?;
    Ok(START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memory_map;

    #[test]
    fn start_info_points_at_cmdline_memmap_and_initrd() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = memory_map(64 << 20);
        let rd = Initrd {
            addr: 0x300_0000,
            size: 1234,
        };
        let at = write_start_info(&mem, 0x20000, Some(rd), &map).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(
            (info.cmdline_paddr, info.memmap_entries as usize),
            (0x20000, map.len())
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(
            (module.paddr, module.size, info.nr_modules),
            (0x300_0000, 1234, 1)
        );
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                info.memmap_paddr + 24 * (map.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!(last.addr + last.size, 64 << 20);
    }
}
