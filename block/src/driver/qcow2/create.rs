//! Creating an empty qcow2 image, laid out as `qemu-img create` lays it
//! out: every metadata cluster packed at the start of the file.
//!
//! ```text
//!  cluster 0   1 .. rt      rt+1 .. rt+rb     then l1 clusters
//!  | header | refcount table | refcount blocks | L1 table (all zero) |
//! ```
//!
//! The refcount blocks count exactly these clusters, once each; the file
//! ends at the end of the last one.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::header::{
    l1_entries_for, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, FEATURE_ENTRY,
    MAGIC, MAX_BACKING_FORMAT, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
};

/// The version 3 header we write: through the compression type byte,
/// padded to 8 bytes, as QEMU writes it.
const V3_HEADER_LENGTH: u32 = 112;

/// The feature name table we record: what each bit this driver knows is.
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// What image to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; a multiple of 512.
    pub size: u64,
    /// Bytes per cluster: a power of two from 512 to 2 MiB.
    pub cluster_size: u32,
    /// Bits per refcount: a power of two from 1 to 64 (16 for version 2).
    pub refcount_bits: u32,
    /// Version 3 (QEMU's `compat=1.1`) rather than 2 (`compat=0.10`).
    pub compat_v3: bool,
    /// Set the lazy refcounts compatible feature (version 3 only).
    pub lazy_refcounts: bool,
    /// The backing file's name as it is to be recorded, and its format.
    pub backing: Option<(String, String)>,
}

impl CreateOptions {
    /// `qemu-img create`'s defaults: 64 KiB clusters, 16-bit refcounts,
    /// version 3, no backing file.
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
    /// The size is not whole sectors.
    #[error("qcow2 create: size {0} is not a multiple of 512")]
    Size(u64),
    /// The size needs a bigger L1 table than QEMU would open.
    #[error("qcow2 create: size {size} is too large for {cluster_size}-byte clusters (the L1 table would exceed 32 MiB; use larger clusters)")]
    SizeTooLarge { size: u64, cluster_size: u32 },
    /// A cluster size qcow2 (as QEMU implements it) cannot have.
    #[error("qcow2 create: cluster size {0} is not a power of two from 512 to 2097152")]
    ClusterSize(u32),
    /// A refcount width qcow2 cannot have.
    #[error("qcow2 create: refcount bits {0} is not a power of two from 1 to 64")]
    RefcountBits(u32),
    /// A version 3 feature asked of a version 2 image.
    #[error("qcow2 create: compat=0.10 (version 2) images {0}")]
    Version2(&'static str),
    /// A backing file name or format that cannot be recorded.
    #[error("qcow2 create: the backing file {0}")]
    Backing(String),
    /// Writing the image failed.
    #[error("qcow2 create: cannot write the image: {0}")]
    Io(#[from] std::io::Error),
}

/// Where each part of a new image goes, in clusters.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    reftable_clusters: u64,
    refblocks: u64,
    l1_entries: u64,
    l1_clusters: u64,
}

impl Layout {
    fn total(&self) -> u64 {
        1 + self.reftable_clusters + self.refblocks + self.l1_clusters
    }
}

fn layout(o: &CreateOptions) -> Layout {
    let cs = u64::from(o.cluster_size);
    let l1_entries = l1_entries_for(o.size, o.cluster_size.trailing_zeros());
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let per_refblock = cs * 8 / u64::from(o.refcount_bits);
    let per_reftable_cluster = cs / 8;
    // The refcount blocks count themselves and the refcount table: grow
    // both until they cover everything. Each round only grows them, and
    // a refcount block covers at least 64 clusters, so this ends quickly.
    let mut l = Layout {
        reftable_clusters: 1,
        refblocks: 1,
        l1_entries,
        l1_clusters,
    };
    loop {
        let refblocks = l.total().div_ceil(per_refblock);
        let reftable_clusters = refblocks.div_ceil(per_reftable_cluster);
        if (refblocks, reftable_clusters) == (l.refblocks, l.reftable_clusters) {
            return l;
        }
        l.refblocks = refblocks.max(l.refblocks);
        l.reftable_clusters = reftable_clusters.max(l.reftable_clusters);
    }
}

fn validate(o: &CreateOptions) -> Result<(), CreateError> {
    if !o.size.is_multiple_of(512) {
        return Err(CreateError::Size(o.size));
    }
    let cs = o.cluster_size;
    if !cs.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
    {
        return Err(CreateError::ClusterSize(cs));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(CreateError::RefcountBits(o.refcount_bits));
    }
    if !o.compat_v3 {
        if o.refcount_bits != 16 {
            return Err(CreateError::Version2("have 16-bit refcounts only"));
        }
        if o.lazy_refcounts {
            return Err(CreateError::Version2("cannot have lazy refcounts"));
        }
    }
    if l1_entries_for(o.size, cs.trailing_zeros()) * 8 > MAX_L1_BYTES {
        return Err(CreateError::SizeTooLarge {
            size: o.size,
            cluster_size: cs,
        });
    }
    if let Some((name, format)) = &o.backing {
        let why = if name.is_empty() {
            "name is empty".to_owned()
        } else if name.len() > MAX_BACKING_NAME as usize {
            format!(
                "name is {} bytes, longer than {MAX_BACKING_NAME}",
                name.len()
            )
        } else if format.is_empty() {
            "format is empty".to_owned()
        } else if format.len() > MAX_BACKING_FORMAT as usize {
            format!("format '{format}' is longer than {MAX_BACKING_FORMAT} bytes")
        } else {
            return Ok(());
        };
        return Err(CreateError::Backing(why));
    }
    Ok(())
}

/// Appends a header extension, padded to 8 bytes.
fn push_extension(buf: &mut Vec<u8>, kind: u32, data: &[u8]) {
    buf.extend_from_slice(&kind.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(8), 0);
}

/// The header cluster: header, extensions, end marker, backing name.
fn header_cluster(o: &CreateOptions, l: &Layout) -> Result<Vec<u8>, CreateError> {
    let cs = u64::from(o.cluster_size);
    let header_length = if o.compat_v3 {
        V3_HEADER_LENGTH
    } else {
        V2_HEADER_LENGTH
    };
    let mut extensions = Vec::new();
    if let Some((_, format)) = &o.backing {
        push_extension(&mut extensions, EXT_BACKING_FORMAT, format.as_bytes());
    }
    let backing_len = o.backing.as_ref().map_or(0, |(name, _)| name.len() as u64);
    // The feature name table (version 3) only helps messages: like QEMU,
    // leave it out when the backing name needs its room in a small cluster.
    if o.compat_v3 {
        let mut table = Vec::with_capacity(FEATURE_NAMES.len() * FEATURE_ENTRY);
        for (kind, bit, name) in FEATURE_NAMES {
            let mut entry = [0u8; FEATURE_ENTRY];
            entry[0] = *kind;
            entry[1] = *bit;
            entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
            table.extend_from_slice(&entry);
        }
        let with_table =
            u64::from(header_length) + extensions.len() as u64 + 8 + table.len() as u64 + 8;
        if with_table + backing_len <= cs {
            push_extension(&mut extensions, EXT_FEATURE_TABLE, &table);
        }
    }
    extensions.extend_from_slice(&[0u8; 8]); // the end marker
    let backing_offset = u64::from(header_length) + extensions.len() as u64;
    if backing_offset + backing_len > cs {
        return Err(CreateError::Backing(format!(
            "name and format need {} bytes of the header cluster, which has {cs}",
            backing_offset + backing_len
        )));
    }

    let reftable = cs;
    let l1 = if l.l1_entries == 0 {
        0
    } else {
        (1 + l.reftable_clusters + l.refblocks) * cs
    };
    let mut buf = Vec::with_capacity(cs as usize);
    buf.extend_from_slice(&MAGIC.to_be_bytes());
    buf.extend_from_slice(&(if o.compat_v3 { 3u32 } else { 2 }).to_be_bytes());
    buf.extend_from_slice(
        &(if o.backing.is_some() {
            backing_offset
        } else {
            0
        })
        .to_be_bytes(),
    );
    buf.extend_from_slice(&(backing_len as u32).to_be_bytes());
    buf.extend_from_slice(&o.cluster_size.trailing_zeros().to_be_bytes());
    buf.extend_from_slice(&o.size.to_be_bytes());
    buf.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    buf.extend_from_slice(&(l.l1_entries as u32).to_be_bytes());
    buf.extend_from_slice(&l1.to_be_bytes());
    buf.extend_from_slice(&reftable.to_be_bytes());
    buf.extend_from_slice(&(l.reftable_clusters as u32).to_be_bytes());
    buf.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    buf.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    if o.compat_v3 {
        let compat = if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        };
        buf.extend_from_slice(&0u64.to_be_bytes()); // incompatible
        buf.extend_from_slice(&compat.to_be_bytes());
        buf.extend_from_slice(&0u64.to_be_bytes()); // autoclear
        buf.extend_from_slice(&o.refcount_bits.trailing_zeros().to_be_bytes());
        buf.extend_from_slice(&header_length.to_be_bytes());
        buf.resize(header_length as usize, 0); // compression type 0 (deflate), padding
    }
    buf.extend_from_slice(&extensions);
    if let Some((name, _)) = &o.backing {
        buf.extend_from_slice(name.as_bytes());
    }
    buf.resize(cs as usize, 0);
    Ok(buf)
}

/// Sets refcount entry `index` of a refcount block to 1.
fn set_refcount_one(block: &mut [u8], index: u64, refcount_bits: u32) {
    let bit = index * u64::from(refcount_bits);
    if refcount_bits < 8 {
        // Sub-byte entries fill each byte from its least significant bit.
        block[(bit / 8) as usize] |= 1 << (bit % 8);
    } else {
        // Wider ones are big-endian: the 1 goes in the entry's last byte.
        block[((bit + u64::from(refcount_bits)) / 8 - 1) as usize] = 1;
    }
}

/// Writes a fresh, empty qcow2 image into `file` (truncating it), laid out
/// as qemu-img does: header cluster with the backing-format and
/// feature-name-table extensions, refcount table, refcount block(s), L1
/// table; every used cluster counted. The caller syncs the file if it
/// needs the image durable.
pub fn create(file: &File, options: &CreateOptions) -> Result<(), CreateError> {
    validate(options)?;
    let l = layout(options);
    let header = header_cluster(options, &l)?;
    let cs = u64::from(options.cluster_size);
    let total = l.total();

    let mut reftable = vec![0u8; (l.reftable_clusters * cs) as usize];
    let first_refblock = 1 + l.reftable_clusters;
    for (i, entry) in reftable
        .chunks_exact_mut(8)
        .take(l.refblocks as usize)
        .enumerate()
    {
        entry.copy_from_slice(&((first_refblock + i as u64) * cs).to_be_bytes());
    }
    let per_refblock = cs * 8 / u64::from(options.refcount_bits);
    let mut refblocks = vec![0u8; (l.refblocks * cs) as usize];
    for cluster in 0..total {
        let block = &mut refblocks[((cluster / per_refblock) * cs) as usize..][..cs as usize];
        set_refcount_one(block, cluster % per_refblock, options.refcount_bits);
    }

    // Zero the whole layout first (the L1 table stays all holes), then
    // fill in the tables.
    file.set_len(0)?;
    file.set_len(total * cs)?;
    file.write_all_at(&reftable, cs)?;
    file.write_all_at(&refblocks, first_refblock * cs)?;
    // The header last: until it is written, the file is not a qcow2 image.
    file.write_all_at(&header, 0)?;
    Ok(())
}

#[cfg(test)]
#[path = "create_tests.rs"]
mod tests;
