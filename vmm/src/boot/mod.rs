//! Putting a kernel, its initrd, command line and boot tables into guest
//! memory, and deciding how the boot vCPU enters it.
//!
//! Two protocols: PVH (an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note: Linux
//! built with `CONFIG_PVH`, and our test guest), entered in 32-bit protected
//! mode; and Linux's 64-bit boot protocol (an ELF vmlinux without that note,
//! or a bzImage), entered in long mode with a zero page.

pub mod cmdline;
pub mod linux;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::memory::{self, EBDA_START, HIMEM_START};
use crate::x86::mptable;
use crate::x86::regs::{self, EntryMode};

/// Where the kernel command line goes.
pub const CMDLINE_ADDR: u64 = 0x20000;
const PAGE: u64 = 4096;
/// A bzImage's 64-bit entry point is this far into its protected-mode code.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;

/// The two kernel formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux (with or without a PVH note).
    Elf,
    /// A bzImage.
    BzImage,
}

/// A kernel file, opened and recognised, not yet loaded.
#[derive(Debug)]
pub struct KernelImage {
    path: PathBuf,
    file: File,
    format: KernelFormat,
}

impl KernelImage {
    /// Opens `path` and tells an ELF from a bzImage by their magic numbers.
    pub fn open(path: &Path) -> Result<Self> {
        let read_err = |source| Error::KernelRead {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        if file.metadata().map_err(read_err)?.is_dir() {
            return Err(read_err(std::io::Error::other("it is a directory")));
        }
        let mut head = [0u8; 0x206];
        let mut len = 0;
        while len < head.len() {
            match file.read(&mut head[len..]).map_err(read_err)? {
                0 => break,
                n => len += n,
            }
        }
        let format = if len >= 4 && head[..4] == *b"\x7fELF" {
            KernelFormat::Elf
        } else if len >= 0x206 && head[0x202..0x206] == *b"HdrS" {
            KernelFormat::BzImage
        } else {
            return Err(Error::NotAKernel(path.to_path_buf()));
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            format,
        })
    }

    /// Which format the file is.
    pub fn format(&self) -> KernelFormat {
        self.format
    }
}

/// An initrd file, opened, not yet loaded.
#[derive(Debug)]
pub struct InitrdImage {
    path: PathBuf,
    file: File,
    size: u64,
}

impl InitrdImage {
    /// Opens `path` and takes its size.
    pub fn open(path: &Path) -> Result<Self> {
        let read_err = |source| Error::InitrdRead {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if meta.is_dir() {
            return Err(read_err(std::io::Error::other("it is a directory")));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size: meta.len(),
        })
    }
}

/// Where an initrd landed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// What loading a kernel told us.
struct LoadedKernel {
    /// PVH entry, or the 64-bit entry with the bzImage's header if any.
    entry: Entry,
    /// The first address above everything the kernel will occupy.
    footprint_end: u64,
    /// Highest address an initrd may end at (the bzImage's `initrd_addr_max`).
    initrd_limit: u64,
}

enum Entry {
    Pvh(u64),
    Linux64(u64, Option<setup_header>),
}

fn load_error(path: &Path, reason: impl ToString) -> Error {
    Error::KernelLoad {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn load_kernel(mem: &GuestMemoryMmap, image: &mut KernelImage) -> Result<LoadedKernel> {
    let path = image.path.clone();
    let himem = Some(GuestAddress(HIMEM_START));
    match image.format {
        KernelFormat::Elf => {
            let res = Elf::load(mem, None, &mut image.file, himem)
                .map_err(|e| load_error(&path, format!("{e} (does it fit in --memory?)")))?;
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Entry::Pvh(addr.0),
                _ => Entry::Linux64(res.kernel_load.0, None),
            };
            Ok(LoadedKernel {
                entry,
                footprint_end: res.kernel_end,
                initrd_limit: u64::MAX,
            })
        }
        KernelFormat::BzImage => {
            let res = BzImage::load(mem, None, &mut image.file, himem)
                .map_err(|e| load_error(&path, format!("{e} (does it fit in --memory?)")))?;
            let hdr = res
                .setup_header
                .ok_or_else(|| load_error(&path, "the bzImage has no setup header"))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(load_error(&path, "the bzImage has no 64-bit entry point"));
            }
            // The decompressor works in place at the preferred address (or
            // where it was loaded) and needs `init_size` bytes there.
            let base = res.kernel_load.0.max(hdr.pref_address);
            let footprint_end = res.kernel_end.max(base + u64::from(hdr.init_size));
            Ok(LoadedKernel {
                entry: Entry::Linux64(res.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET, Some(hdr)),
                footprint_end,
                initrd_limit: u64::from(hdr.initrd_addr_max) + 1,
            })
        }
    }
}

/// Places the initrd as high as it may go, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    image: &mut InitrdImage,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<Initrd> {
    let top = memory::low_ram_end(mem_size).min(kernel.initrd_limit);
    let floor = kernel.footprint_end.next_multiple_of(PAGE);
    let room = top.saturating_sub(floor);
    if image.size > room {
        return Err(Error::InitrdTooLarge {
            path: image.path.clone(),
            size_mib: image.size.div_ceil(1 << 20),
            room_mib: room >> 20,
        });
    }
    let addr = (top - image.size) & !(PAGE - 1);
    let size = usize::try_from(image.size).map_err(|_| Error::InitrdTooLarge {
        path: image.path.clone(),
        size_mib: image.size >> 20,
        room_mib: room >> 20,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut image.file, size)
        .map_err(|e| Error::InitrdRead {
            path: image.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(Initrd {
        addr,
        size: image.size,
    })
}

/// Loads the kernel, initrd, command line and boot tables for a guest of
/// `mem_size` bytes and `cpus` vCPUs; returns how the boot vCPU enters.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &mut KernelImage,
    initrd: Option<&mut InitrdImage>,
    cmdline: &str,
    mem_size: u64,
    cpus: u32,
) -> Result<EntryMode> {
    let loaded = load_kernel(mem, kernel)?;
    let initrd = initrd
        .map(|rd| load_initrd(mem, rd, &loaded, mem_size))
        .transpose()?;

    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::GuestWrite {
            what: "kernel command line",
            reason: e.to_string(),
        })?;
    regs::write_tables(mem)?;
    mptable::write(mem, EBDA_START, cpus)?;

    let map = memory::memory_map(mem_size);
    Ok(match loaded.entry {
        Entry::Pvh(entry) => {
            let start_info = pvh::write_start_info(mem, CMDLINE_ADDR, initrd, &map)?;
            EntryMode::Pvh { entry, start_info }
        }
        Entry::Linux64(entry, header) => {
            let zero_page =
                linux::write_zero_page(mem, header, CMDLINE_ADDR, cmdline.len(), initrd, &map)?;
            EntryMode::Linux64 { entry, zero_page }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("vmm-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    #[test]
    fn files_that_are_not_kernels_are_named_in_the_error() {
        let path = temp_file("notakernel", b"#!/bin/sh\necho hi\n");
        let err = KernelImage::open(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "'{}' is not a kernel: it is neither an ELF vmlinux nor a bzImage",
                path.display()
            )
        );
        let empty = temp_file("empty", b"");
        assert!(matches!(
            KernelImage::open(&empty),
            Err(Error::NotAKernel(_))
        ));
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(empty).unwrap();
    }

    #[test]
    fn missing_kernel_and_directories_are_read_errors() {
        let err = KernelImage::open(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read kernel '/nonexistent/vmlinux'"),
            "{err}"
        );
        assert!(matches!(
            KernelImage::open(Path::new("/")),
            Err(Error::KernelRead { .. })
        ));
        assert!(matches!(
            InitrdImage::open(Path::new("/")),
            Err(Error::InitrdRead { .. })
        ));
    }

    #[test]
    fn formats_are_told_apart_by_magic() {
        let elf = temp_file("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(KernelImage::open(&elf).unwrap().format(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = temp_file("bz", &bz);
        assert_eq!(
            KernelImage::open(&bz).unwrap().format(),
            KernelFormat::BzImage
        );
        std::fs::remove_file(elf).unwrap();
        std::fs::remove_file(bz).unwrap();
    }

    #[test]
    fn an_initrd_too_large_for_the_guest_is_refused_with_sizes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let path = temp_file("bigrd", &vec![0u8; 2 << 20]);
        let mut rd = InitrdImage::open(&path).unwrap();
        let kernel = LoadedKernel {
            entry: Entry::Pvh(0x100000),
            footprint_end: 15 << 20,
            initrd_limit: u64::MAX,
        };
        let err = load_initrd(&mem, &mut rd, &kernel, 16 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InitrdTooLarge {
                    size_mib: 2,
                    room_mib: 1,
                    ..
                }
            ),
            "{err}"
        );
        let small = LoadedKernel {
            footprint_end: 2 << 20,
            ..kernel
        };
        let placed = load_initrd(&mem, &mut rd, &small, 16 << 20).unwrap();
        assert_eq!(
            placed,
            Initrd {
                addr: 14 << 20,
                size: 2 << 20
            }
        );
        std::fs::remove_file(path).unwrap();
    }
}
