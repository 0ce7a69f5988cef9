//! The qcow2 format: a `qcow2` node over a `file` node holding the image,
//! with an optional `backing` node whose data shows through wherever the
//! image has none.
//!
//! The header, image creation and compressed clusters are plain format
//! code (`header.rs`, `create.rs`, `compressed.rs`); the tables and their
//! write-back order are `meta.rs`; guest I/O is `engine.rs`, on the file
//! node's own engine, so data goes to the host at the mapped offsets with
//! no copy and no extra thread.

pub mod compressed;
pub mod create;
mod engine;
pub mod header;
mod info;
mod meta;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use base::sync::lock;
use vmm_sys_util::eventfd::EventFd;

pub use engine::Qcow2Io;
use header::{Header, HeaderError};
use meta::Meta;
pub use meta::MetaError;

use super::{Child, Driver};
use crate::error::BlockError;
use crate::io::{AsyncIo, IoError};

/// Why a qcow2 image cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The header is bad or uses what we do not support.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The tables could not be read, or are corrupt.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The file child is not a host file.
    #[error("its 'file' child '{0}' is not a host file, which a qcow2 node needs")]
    NotAFile(String),
    /// A second descriptor for metadata could not be opened.
    #[error("cannot reopen the image '{path}' for its metadata: {source}")]
    Reopen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Clusters smaller than the host's `O_DIRECT` alignment: a cluster
    /// could not be written on its own.
    #[error("its clusters ({cluster} bytes) are smaller than the {align}-byte alignment direct I/O needs on this host; use larger clusters or direct=off")]
    ClustersTooSmall { cluster: u64, align: u32 },
    /// Writes were asked for an image we must not write.
    #[error("image '{path}' cannot be opened for writing: {why}; open it read-only")]
    NotWritable { path: String, why: String },
    /// The image another process wrote while ours was inactive has
    /// another virtual size now; a device cannot follow that.
    #[error("image '{path}' is {now} bytes now, but was {was} bytes when it was opened")]
    Resized { path: String, was: u64, now: u64 },
}

/// A qcow2 node.
pub struct Qcow2<C> {
    file: C,
    backing: Option<C>,
    header: Header,
    meta: Arc<Mutex<Meta>>,
}

/// Opens a descriptor of the image for metadata I/O: a new open of the
/// same file without `O_DIRECT`, so tables need no alignment (the data
/// descriptor may bypass the page cache; the kernel keeps the two
/// coherent).
fn metadata_file<C: Child>(file: &C, read_only: bool) -> Result<std::fs::File, Qcow2Error> {
    let disk = file
        .driver()
        .disk_file()
        .ok_or_else(|| Qcow2Error::NotAFile(file.name().to_string()))?;
    let path = file.driver().filename();
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(format!("/proc/self/fd/{}", disk.as_raw_fd()))
        .map_err(|source| Qcow2Error::Reopen { path, source })
}

impl<C: Child> Qcow2<C> {
    /// Opens the image in `file` (a `file` node), with `backing` under it.
    pub fn open(
        node: &str,
        file: C,
        backing: Option<C>,
        read_only: bool,
    ) -> Result<Self, BlockError> {
        let err = |source: Qcow2Error| BlockError::Qcow2 {
            node: node.to_string(),
            source,
        };
        let meta_file = metadata_file(&file, read_only).map_err(err)?;
        let header = Header::read_from(&meta_file).map_err(|e| err(e.into()))?;
        if !read_only {
            if let Some(why) = header.write_refusal() {
                return Err(err(Qcow2Error::NotWritable {
                    path: file.driver().filename(),
                    why,
                }));
            }
        }
        let align = file.driver().io_alignment();
        if header.cluster_size() < u64::from(align) {
            return Err(err(Qcow2Error::ClustersTooSmall {
                cluster: header.cluster_size(),
                align,
            }));
        }
        let meta = Meta::open(meta_file, &header, read_only).map_err(|e| err(e.into()))?;
        if !read_only {
            if let Some(why) = meta.refusal() {
                return Err(err(Qcow2Error::NotWritable {
                    path: file.driver().filename(),
                    why: why.to_string(),
                }));
            }
        }
        Ok(Self {
            file,
            backing,
            header,
            meta: Arc::new(Mutex::new(meta)),
        })
    }

    /// The backing file the image in `file` records: its name as written
    /// in the header and its format, if recorded.
    pub fn header_backing(
        node: &str,
        file: &C,
    ) -> Result<Option<(String, Option<String>)>, BlockError> {
        let err = |source: Qcow2Error| BlockError::Qcow2 {
            node: node.to_string(),
            source,
        };
        let meta_file = metadata_file(file, true).map_err(err)?;
        let header = Header::read_from(&meta_file).map_err(|e| err(e.into()))?;
        Ok(header
            .backing_file
            .map(|name| (name, header.backing_format.clone())))
    }

    /// The image's header as opened.
    pub fn header(&self) -> &Header {
        &self.header
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
        let mut children = vec![("file", &self.file)];
        if let Some(b) = &self.backing {
            children.push(("backing", b));
        }
        children
    }

    fn io_alignment(&self) -> u32 {
        self.file.driver().io_alignment()
    }

    fn backing(&self) -> Option<&C> {
        self.backing.as_ref()
    }

    fn image_details(&self) -> Option<super::ImageDetails> {
        Some(self.details())
    }

    /// From the L2 entries: unallocated clusters as the backing chain
    /// says (a hole without one), zero clusters a hole of zeros, data
    /// clusters as data (or zeros where the host file has a hole under
    /// them), compressed clusters as data; as QEMU's block status.
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<(super::Allocation, u64)> {
        use super::Allocation;
        use meta::Mapping;
        let end = offset.saturating_add(len).min(self.header.size);
        if offset >= end {
            return Ok((Allocation::HOLE, len.max(1)));
        }
        let errno = |e: MetaError| std::io::Error::from_raw_os_error(e.errno());
        let (first, run_end) = {
            let mut meta = lock(&self.meta);
            let bits = meta.cluster_bits;
            let g0 = offset >> bits;
            let first = meta.lookup(g0).map_err(errno)?;
            let mut run_end = ((g0 + 1) << bits).min(end);
            let mut g = g0 + 1;
            // A bounded walk: the caller asks again for the rest.
            while run_end < end && g - g0 < 1 << 16 {
                let next = meta.lookup(g).map_err(errno)?;
                let alike = match (first, next) {
                    (Mapping::Data { host: a, .. }, Mapping::Data { host: b, .. }) => {
                        b == a + ((g - g0) << bits)
                    }
                    (Mapping::Unallocated, Mapping::Unallocated)
                    | (Mapping::Zero { .. }, Mapping::Zero { .. })
                    | (Mapping::Compressed { .. }, Mapping::Compressed { .. }) => true,
                    _ => false,
                };
                if !alike {
                    break;
                }
                run_end = ((g + 1) << bits).min(end);
                g += 1;
            }
            (first, run_end)
        };
        let run = run_end - offset;
        Ok(match first {
            Mapping::Unallocated => match &self.backing {
                Some(b) => {
                    let backing_size = b.driver().size();
                    if offset >= backing_size {
                        (Allocation::HOLE, run)
                    } else {
                        b.driver()
                            .block_status(offset, run.min(backing_size - offset))?
                    }
                }
                None => (Allocation::HOLE, run),
            },
            Mapping::Zero { .. } => (Allocation::HOLE, run),
            Mapping::Compressed { .. } => (Allocation::DATA, run),
            Mapping::Data { host, .. } => {
                let in_cluster = offset & ((1u64 << self.header.cluster_bits) - 1);
                let (below, n) = self.file.driver().block_status(host + in_cluster, run)?;
                let status = if below.zero {
                    Allocation::ZERO
                } else {
                    Allocation::DATA
                };
                (status, n.min(run))
            }
        })
    }

    fn give_up_write(&self, node: &str) -> Result<(), BlockError> {
        self.write_back(node)?;
        // From now on nothing may allocate or change a table here, even
        // through an engine opened before: the image is someone's backing.
        lock(&self.meta).refuse_writes("it is now a read-only backing image");
        Ok(())
    }

    fn inactivate(&self, node: &str) -> Result<(), BlockError> {
        self.write_back(node)?;
        // The other process owns the tables now: nothing may allocate,
        // trim or write a table here until they are read again.
        lock(&self.meta).refuse_writes("its image is inactive (handed over for migration)");
        Ok(())
    }

    fn activate(&self, node: &str, read_only: bool) -> Result<(), BlockError> {
        let err = |source: Qcow2Error| BlockError::Qcow2 {
            node: node.to_string(),
            source,
        };
        // What we cached is stale: the other process may have allocated
        // clusters and moved tables. Read everything again.
        let meta_file = metadata_file(&self.file, read_only).map_err(err)?;
        let header = Header::read_from(&meta_file).map_err(|e| err(e.into()))?;
        if header.size != self.header.size {
            return Err(err(Qcow2Error::Resized {
                path: self.file.driver().filename(),
                was: self.header.size,
                now: header.size,
            }));
        }
        let meta = Meta::open(meta_file, &header, read_only).map_err(|e| err(e.into()))?;
        if !read_only {
            // What the other process left may be what an open for
            // writing refuses (marked corrupt, an internal snapshot).
            if let Some(why) = meta.refusal() {
                return Err(err(Qcow2Error::NotWritable {
                    path: self.file.driver().filename(),
                    why: why.to_string(),
                }));
            }
        }
        *lock(&self.meta) = meta;
        Ok(())
    }

    fn open_io(
        &self,
        node: &str,
        depth: u32,
        notifier: &EventFd,
    ) -> Result<Box<dyn AsyncIo>, BlockError> {
        // A request may split into a data write and two copy-on-write
        // reads per cluster; more than that waits in the engine.
        let inner_depth = depth.saturating_mul(4).clamp(8, 4096);
        let file = self
            .file
            .driver()
            .open_io(self.file.name(), inner_depth, notifier)?;
        let backing = match &self.backing {
            Some(b) => Some((
                b.driver().open_io(b.name(), inner_depth, notifier)?,
                b.driver().size(),
            )),
            None => None,
        };
        let own = notifier.try_clone().map_err(|source| BlockError::Io {
            node: node.to_string(),
            source: IoError::Setup {
                engine: "qcow2",
                source,
            },
        })?;
        Ok(Box::new(Qcow2Io::new(
            self.meta.clone(),
            file,
            backing,
            own,
            inner_depth,
        )))
    }
}

impl<C> Drop for Qcow2<C> {
    fn drop(&mut self) {
        // An engine lives only under a lease, and a lease holds a
        // reference to its node: nothing is in flight now. Write the
        // tables back and let go of the clusters whose last user went.
        let mut meta = lock(&self.meta);
        match meta.settle() {
            Ok(()) => meta.trim(),
            Err(e) => log::warn!("qcow2: writing metadata back on close failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests;
