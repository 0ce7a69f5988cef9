//! TEMPORARY SHIM, branch `qgraph` only: never merge. It stands in for
//! the lead's `driver/qcow2/` (same public API: `Qcow2::open`,
//! `Qcow2::header_backing`) so the graph, QMP and CLI code compiles and its
//! tests can open real `qemu-img` images before the driver lands. It reads
//! only what the graph needs from the header and does no guest I/O.

use std::os::fd::AsRawFd;

use super::{Child, Driver, FormatSpecific, ImageDetails, Qcow2Specific};
use crate::error::BlockError;
use crate::io::AsyncIo;
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x5146_49fb;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

struct Header {
    version: u32,
    cluster_bits: u32,
    size: u64,
    incompatible: u64,
    compatible: u64,
    refcount_order: u32,
    backing: Option<(String, Option<String>)>,
}

fn read_at(fd: i32, off: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf has len bytes; fd is an open file the caller holds.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, off as libc::off_t) };
    (n == len as isize).then_some(buf)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn header<C: Child>(node: &str, file: &C) -> Result<Header, BlockError> {
    let bad = |why: &str| BlockError::Options {
        node: node.into(),
        reason: format!("not a qcow2 image: {why}"),
    };
    let disk = file
        .driver()
        .disk_file()
        .ok_or_else(|| bad("no host file"))?;
    let fd = disk.as_raw_fd();
    let h = read_at(fd, 0, 104).ok_or_else(|| bad("short header"))?;
    if be32(&h, 0) != MAGIC {
        return Err(bad("bad magic"));
    }
    let version = be32(&h, 4);
    let (incompatible, compatible, refcount_order, header_len) = if version >= 3 {
        (be64(&h, 72), be64(&h, 80), be32(&h, 96), be32(&h, 100))
    } else {
        (0, 0, 4, 72)
    };
    let mut backing = None;
    let (boff, blen) = (be64(&h, 8), be32(&h, 16));
    if boff != 0 && blen > 0 && blen <= 1023 {
        let name = read_at(fd, boff, blen as usize).ok_or_else(|| bad("backing name"))?;
        let name = String::from_utf8(name).map_err(|_| bad("backing name"))?;
        let mut format = None;
        let mut at = u64::from(header_len);
        while let Some(e) = read_at(fd, at, 8) {
            let (kind, len) = (be32(&e, 0), be32(&e, 4));
            if kind == 0 || len > 4096 {
                break;
            }
            if kind == EXT_BACKING_FORMAT {
                let f = read_at(fd, at + 8, len as usize).ok_or_else(|| bad("ext"))?;
                format = String::from_utf8(f).ok();
            }
            at += 8 + u64::from(len).next_multiple_of(8);
        }
        backing = Some((name, format));
    }
    Ok(Header {
        version,
        cluster_bits: be32(&h, 20),
        size: be64(&h, 24),
        incompatible,
        compatible,
        refcount_order,
        backing,
    })
}

/// TEMPORARY SHIM of the lead's qcow2 driver.
pub struct Qcow2<C> {
    file: C,
    backing: Option<C>,
    header: Header,
}

impl<C: Child> Qcow2<C> {
    /// Opens the image on `file`, over `backing`.
    pub fn open(
        node: &str,
        file: C,
        backing: Option<C>,
        _read_only: bool,
    ) -> Result<Self, BlockError> {
        let header = header(node, &file)?;
        Ok(Self {
            file,
            backing,
            header,
        })
    }

    /// The backing file name and format the image records.
    pub fn header_backing(
        node: &str,
        file: &C,
    ) -> Result<Option<(String, Option<String>)>, BlockError> {
        Ok(header(node, file)?.backing)
    }
}

impl<C: Child> Driver<C> for Qcow2<C> {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn filename(&self) -> String {
        self.file.driver().filename()
    }

    fn children(&self) -> Vec<(&'static str, &C)> {
        let mut c = vec![("file", &self.file)];
        if let Some(b) = &self.backing {
            c.push(("backing", b));
        }
        c
    }

    fn backing(&self) -> Option<&C> {
        self.backing.as_ref()
    }

    fn image_details(&self) -> Option<ImageDetails> {
        let h = &self.header;
        let v3 = h.version >= 3;
        Some(ImageDetails {
            cluster_size: 1 << h.cluster_bits,
            backing_filename: h.backing.as_ref().map(|b| b.0.clone()),
            backing_format: h.backing.as_ref().and_then(|b| b.1.clone()),
            specific: Some(FormatSpecific::Qcow2(Qcow2Specific {
                compat: if v3 { "1.1" } else { "0.10" }.into(),
                lazy_refcounts: v3.then_some(h.compatible & 1 != 0),
                corrupt: v3.then_some(h.incompatible & 2 != 0),
                extended_l2: v3.then_some(h.incompatible & 16 != 0),
                refcount_bits: 1 << h.refcount_order,
                compression_type: "zlib".into(),
            })),
        })
    }

    fn open_io(
        &self,
        node: &str,
        _depth: u32,
        _notifier: &EventFd,
    ) -> Result<Box<dyn AsyncIo>, BlockError> {
        Err(BlockError::Options {
            node: node.into(),
            reason: "TEMPORARY SHIM: no qcow2 I/O in this branch".into(),
        })
    }
}

/// TEMPORARY SHIM of helper A's `qcow2::create` (same API), through
/// `qemu-img create` on the file's descriptor.
pub mod create {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// What image to create.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct CreateOptions {
        /// Virtual size in bytes.
        pub size: u64,
        /// Bytes per cluster.
        pub cluster_size: u32,
        /// Bits per refcount.
        pub refcount_bits: u32,
        /// Version 3.
        pub compat_v3: bool,
        /// Lazy refcounts.
        pub lazy_refcounts: bool,
        /// Backing file name as recorded, and its format.
        pub backing: Option<(String, String)>,
    }

    impl CreateOptions {
        /// qemu-img's defaults.
        pub fn new(size: u64) -> Self {
            CreateOptions {
                size,
                cluster_size: 65536,
                refcount_bits: 16,
                compat_v3: true,
                lazy_refcounts: false,
                backing: None,
            }
        }
    }

    /// Why an image could not be created.
    #[derive(Debug, thiserror::Error)]
    pub enum CreateError {
        /// Writing the image failed.
        #[error("qcow2 create: cannot write the image: {0}")]
        Io(#[from] std::io::Error),
    }

    /// Writes a fresh qcow2 image into `file`.
    pub fn create(file: &File, o: &CreateOptions) -> Result<(), CreateError> {
        let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
        let opts = format!(
            "cluster_size={},refcount_bits={},compat={},lazy_refcounts={}",
            o.cluster_size,
            o.refcount_bits,
            if o.compat_v3 { "1.1" } else { "0.10" },
            if o.lazy_refcounts { "on" } else { "off" }
        );
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2", "-u", "-o", &opts]);
        if let Some((b, f)) = &o.backing {
            cmd.args(["-b", b, "-F", f]);
        }
        let out = cmd.arg(&path).arg(o.size.to_string()).output()?;
        if !out.status.success() {
            return Err(
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).to_string()).into(),
            );
        }
        // Whole sectors, as the file driver still wants them.
        let len = file.metadata()?.len();
        file.set_len(len.next_multiple_of(512))?;
        Ok(())
    }
}
