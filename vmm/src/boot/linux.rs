//! The Linux x86 boot protocol's zero page (`boot_params`) for 64-bit entry.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Initrd;
use crate::error::{Error, Result};
use crate::memory::MapEntry;

/// Where the zero page goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Writes the zero page; `header` is the bzImage's setup header (None for an
/// ELF vmlinux, which has none). Returns its address for `rsi`.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_addr: u64,
    cmdline_len: usize,
    initrd: Option<Initrd>,
    map: &[MapEntry],
) -> Result<u64> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = cmdline_addr as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    if map.len() > params.e820_table.len() {
        return Err(Error::GuestWrite {
            what: "zero page",
            reason: format!("{} memory map entries do not fit", map.len()),
        });
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| Error::GuestWrite {
            what: "zero page",
            reason: e.to_string(),
        })?;
    Ok(ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memory_map;

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = memory_map(256 << 20);
        let rd = Initrd {
            addr: 0x800_0000,
            size: 4096,
        };
        write_zero_page(&mem, None, 0x20000, 30, Some(rd), &map).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!(
            ({ p.hdr.cmd_line_ptr }, { p.hdr.cmdline_size }),
            (0x20000, 30)
        );
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x800_0000, 4096)
        );
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        assert_eq!({ last.addr } + { last.size }, 256 << 20);
    }
}
