//! The qcow2 header: parsing and checking the first cluster of an image.
//!
//! ```text
//!  0        72 (v2) / header_length (v3)                       cluster_size
//!  | header | extensions ... | end marker | backing file name |   ...   |
//! ```
//!
//! Every number on disk is untrusted: all arithmetic on them is checked, and
//! every table the header names must lie inside the file, aligned, and clear
//! of the header cluster and of the other tables. A bad header gives a
//! [`HeaderError`] naming the field; no input makes the parser panic.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

/// The magic number at byte 0: "QFI\xfb".
pub const MAGIC: u32 = 0x514649fb;

/// Incompatible feature bit: refcounts may be stale (lazy refcounts, not
/// closed cleanly).
pub const INCOMPAT_DIRTY: u64 = 1;
/// Incompatible feature bit: the image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 2;
/// Incompatible feature bit: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 4;
/// Incompatible feature bit: compression_type is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 8;
/// Incompatible feature bit: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 16;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Autoclear feature bit: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
/// Autoclear feature bit: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 2;

/// Byte offset of `refcount_table_offset` (u64); `refcount_table_clusters`
/// (u32) follows at 56.
pub const OFFSET_REFCOUNT_TABLE: u64 = 48;
/// Byte offset of `incompatible_features` (u64, version 3).
pub const OFFSET_INCOMPATIBLE: u64 = 72;
/// Byte offset of `autoclear_features` (u64, version 3).
pub const OFFSET_AUTOCLEAR: u64 = 88;

/// The incompatible feature bits this driver understands.
const KNOWN_INCOMPAT: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header length of a version 2 image, and the fixed part of version 3's.
pub const V2_HEADER_LENGTH: u32 = 72;
/// The smallest version 3 header (through `header_length`).
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Smallest and largest cluster_bits (QEMU's limits: 512 B to 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The longest backing file name the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// The longest backing format name QEMU accepts.
pub const MAX_BACKING_FORMAT: u32 = 15;
/// QEMU's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name (a string).
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table: 48-byte entries.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name (a string).
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Size of one feature name table entry.
pub const FEATURE_ENTRY: usize = 48;

/// A header we cannot use, or could not read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The first four bytes are not qcow2's magic.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// The file ends inside the header.
    #[error("qcow2 header: truncated: the file is {have} bytes, the header needs {need}")]
    Truncated { have: u64, need: u64 },
    /// A version other than 2 or 3.
    #[error("qcow2 header: version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// Clusters smaller than 512 B or larger than 2 MiB.
    #[error(
        "qcow2 header: cluster_bits {0} is out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
    )]
    ClusterBits(u32),
    /// A refcount width above 64 bits.
    #[error("qcow2 header: refcount_order {0} is out of range (0..=6)")]
    RefcountOrder(u32),
    /// A version 3 header_length that is too short, unaligned or too long.
    #[error("qcow2 header: header_length {length} {why}")]
    HeaderLength { length: u32, why: String },
    /// A table offset that is not on a cluster boundary.
    #[error("qcow2 header: {field} {value:#x} is not aligned to the cluster size {cluster_size}")]
    Misaligned {
        field: &'static str,
        value: u64,
        cluster_size: u64,
    },
    /// A field above the limit this driver (and QEMU) accepts.
    #[error("qcow2 header: {field} {value} is larger than the limit of {max}")]
    TooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
    /// An L1 table too small to map the whole virtual disk.
    #[error("qcow2 header: l1_size {l1_size} is too small for the virtual size {size} (it needs {needed} entries)")]
    L1TooSmall {
        l1_size: u32,
        size: u64,
        needed: u64,
    },
    /// The image has no refcount table.
    #[error("qcow2 header: refcount_table_clusters is 0 (an image needs a refcount table)")]
    NoRefcountTable,
    /// A table that runs past the end of the file (or of 2^64).
    #[error("qcow2 header: the {table} (offset {offset:#x}, {extent}) lies past the end of the file ({file_size:#x} bytes)")]
    PastEnd {
        table: &'static str,
        offset: u64,
        extent: String,
        file_size: u64,
    },
    /// Two metadata areas share bytes.
    #[error("qcow2 header: the {0} overlaps the {1}")]
    Overlap(&'static str, &'static str),
    /// Incompatible feature bits this driver does not know.
    #[error(
        "qcow2 header: unknown incompatible features {bits:#x}{}",
        names_suffix(names)
    )]
    UnknownIncompatible { bits: u64, names: Vec<String> },
    /// Subcluster allocation.
    #[error("qcow2 image uses extended L2 entries, which this driver does not support")]
    ExtendedL2,
    /// zstd-compressed clusters.
    #[error("qcow2 image uses zstd compression, which this driver does not support")]
    Zstd,
    /// A compression type that is not deflate or zstd, or disagrees with
    /// the compression type feature bit.
    #[error("qcow2 header: compression_type {value} {why}")]
    CompressionType { value: u8, why: &'static str },
    /// Encrypted data.
    #[error("qcow2 image is encrypted (crypt_method {method}, {}), which this driver does not support", crypt_name(*method))]
    Encrypted { method: u32 },
    /// Guest data in a separate file.
    #[error("qcow2 image keeps its data in an external data file{}, which this driver does not support", name.as_ref().map(|n| format!(" '{n}'")).unwrap_or_default())]
    DataFile { name: Option<String> },
    /// A malformed header extension.
    #[error("qcow2 header: the header extension at offset {offset:#x} {why}")]
    Extension { offset: u64, why: String },
    /// A malformed backing file name.
    #[error("qcow2 header: the backing file name (offset {offset:#x}, {size} bytes) {why}")]
    BackingFile { offset: u64, size: u32, why: String },
    /// A name that is not UTF-8.
    #[error("qcow2 header: the {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// Reading the image file failed.
    #[error("qcow2 header: cannot read the image file: {0}")]
    Io(#[from] std::io::Error),
}

fn names_suffix(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

fn crypt_name(method: u32) -> &'static str {
    match method {
        1 => "AES",
        2 => "LUKS",
        _ => "unknown",
    }
}

/// A parsed, checked qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0: none (anything else is refused by [`Header::parse`]).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the active L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table starts.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for version 2).
    pub incompatible_features: u64,
    /// Compatible feature bits (0 for version 2).
    pub compatible_features: u64,
    /// Autoclear feature bits (0 for version 2).
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order; 0..=6, 4 for version 2.
    pub refcount_order: u32,
    /// Bytes of the header proper; 72 for version 2.
    pub header_length: u32,
    /// 0: deflate, 1: zstd (refused by [`Header::parse`]).
    pub compression_type: u8,
    /// The backing file's name as recorded.
    pub backing_file: Option<String>,
    /// The backing file's format, from the backing format extension.
    pub backing_format: Option<String>,
    /// The feature name table: (type: 0 incompatible, 1 compatible,
    /// 2 autoclear; bit; name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// The external data file's name, from its extension.
    pub data_file: Option<String>,
    /// Whether the bitmaps extension is present.
    pub has_bitmaps_extension: bool,
}

/// Big-endian reads from the header buffer; a read past its end is a
/// truncation error naming how much the header needs.
struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn bytes(&self, offset: u64, len: u64) -> Result<&[u8], HeaderError> {
        let end = offset.checked_add(len).ok_or(HeaderError::Truncated {
            have: self.buf.len() as u64,
            need: u64::MAX,
        })?;
        if end > self.buf.len() as u64 {
            return Err(HeaderError::Truncated {
                have: self.buf.len() as u64,
                need: end,
            });
        }
        Ok(&self.buf[offset as usize..end as usize])
    }

    fn u8(&self, offset: u64) -> Result<u8, HeaderError> {
        Ok(self.bytes(offset, 1)?[0])
    }

    fn u32(&self, offset: u64) -> Result<u32, HeaderError> {
        let b = self.bytes(offset, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, offset: u64) -> Result<u64, HeaderError> {
        let b = self.bytes(offset, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}

/// What the header extensions say.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    feature_names: Vec<(u8, u8, String)>,
    data_file: Option<String>,
    has_bitmaps: bool,
}

/// A byte range of the image file that a metadata area occupies.
struct Area {
    name: &'static str,
    start: u64,
    end: u64,
}

impl Area {
    fn overlaps(&self, other: &Area) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl Header {
    /// Parses and checks the header from the start of the image file (a
    /// prefix of its first cluster that holds at least the header, its
    /// extensions and the backing file name); `file_size` is the image
    /// file's length.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header, HeaderError> {
        let r = Reader { buf };
        if buf.len() >= 4 && r.u32(0)? != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        // Until the version is known, the smallest header is version 2's.
        if buf.len() < 8 {
            return Err(HeaderError::Truncated {
                have: buf.len() as u64,
                need: u64::from(V2_HEADER_LENGTH),
            });
        }
        let version = r.u32(4)?;
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let fixed = if version == 2 {
            V2_HEADER_LENGTH
        } else {
            V3_MIN_HEADER_LENGTH
        };
        r.bytes(0, u64::from(fixed))?;

        let backing_file_offset = r.u64(8)?;
        let backing_file_size = r.u32(16)?;
        let cluster_bits = r.u32(20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut h = Header {
            version,
            cluster_bits,
            size: r.u64(24)?,
            crypt_method: r.u32(32)?,
            l1_size: r.u32(36)?,
            l1_table_offset: r.u64(40)?,
            refcount_table_offset: r.u64(48)?,
            refcount_table_clusters: r.u32(56)?,
            nb_snapshots: r.u32(60)?,
            snapshots_offset: r.u64(64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            data_file: None,
            has_bitmaps_extension: false,
        };

        if version == 3 {
            h.incompatible_features = r.u64(72)?;
            h.compatible_features = r.u64(80)?;
            h.autoclear_features = r.u64(88)?;
            h.refcount_order = r.u32(96)?;
            h.header_length = r.u32(100)?;
            check_header_length(h.header_length, cluster_size)?;
            // The compression type byte is present only in a header long
            // enough to hold it; absent means deflate.
            if h.header_length > V3_MIN_HEADER_LENGTH {
                r.bytes(0, u64::from(h.header_length))?;
                h.compression_type = r.u8(104)?;
            }
            if h.refcount_order > 6 {
                return Err(HeaderError::RefcountOrder(h.refcount_order));
            }
        }

        // The extension area runs from the end of the header to the backing
        // file name, or to the end of the first cluster.
        let ext_start = u64::from(h.header_length);
        let ext_end = if backing_file_offset != 0 {
            check_backing_place(
                backing_file_offset,
                backing_file_size,
                ext_start,
                cluster_size,
            )?;
            backing_file_offset
        } else {
            cluster_size
        };
        let ext = read_extensions(&r, ext_start, ext_end)?;
        h.backing_format = ext.backing_format;
        h.feature_names = ext.feature_names;
        h.data_file = ext.data_file;
        h.has_bitmaps_extension = ext.has_bitmaps;

        if backing_file_offset != 0 {
            let name = r.bytes(backing_file_offset, u64::from(backing_file_size))?;
            let name =
                std::str::from_utf8(name).map_err(|_| HeaderError::NotUtf8("backing file name"))?;
            h.backing_file = Some(name.to_owned());
        }

        h.check_features()?;
        h.check_tables(file_size)?;
        Ok(h)
    }

    /// Reads the header from `file` (pread; the file is NOT opened
    /// O_DIRECT) and parses it.
    pub fn read_from(file: &File) -> Result<Header, HeaderError> {
        // A block device's metadata says 0 bytes; seeking to its end does not.
        let file_size = (&*file).seek(SeekFrom::End(0))?;
        // First the fixed fields, to learn the cluster size; then the whole
        // first cluster (or file), where the extensions and backing name lie.
        let mut buf = vec![0u8; file_size.min(u64::from(V3_MIN_HEADER_LENGTH)) as usize];
        file.read_exact_at(&mut buf, 0)?;
        let cluster_bits = if buf.len() >= 24 {
            u32::from_be_bytes([buf[20], buf[21], buf[22], buf[23]])
        } else {
            0
        };
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            let len = file_size.min(1u64 << cluster_bits) as usize;
            if len > buf.len() {
                buf.resize(len, 0);
                file.read_exact_at(&mut buf, 0)?;
            }
        }
        Header::parse(&buf, file_size)
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Bits per refcount entry.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Why we must not write this image, as one sentence, or None.
    pub fn write_refusal(&self) -> Option<String> {
        if self.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Some(
                "the image is marked corrupt (repair it with `qemu-img check -r all`)".to_owned(),
            );
        }
        if self.incompatible_features & INCOMPAT_DIRTY != 0 {
            return Some(
                "the image was not closed cleanly and its refcounts may be stale (lazy refcounts; repair it with `qemu-img check -r all`)"
                    .to_owned(),
            );
        }
        if self.nb_snapshots > 0 {
            return Some(format!(
                "the image has {} internal snapshot{}, which this driver does not maintain",
                self.nb_snapshots,
                if self.nb_snapshots == 1 { "" } else { "s" }
            ));
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 || self.data_file.is_some() {
            return Some(
                "the image uses an external data file, which this driver does not support"
                    .to_owned(),
            );
        }
        if self.crypt_method != 0 {
            return Some(format!(
                "the image is encrypted ({}), which this driver does not support",
                crypt_name(self.crypt_method)
            ));
        }
        None
    }

    /// The entries in one L2 table (cluster_size / 8).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// The L1 entries needed to map `size` bytes.
    pub fn l1_entries_needed(&self) -> u64 {
        l1_entries_for(self.size, self.cluster_bits)
    }

    fn check_features(&self) -> Result<(), HeaderError> {
        let unknown = self.incompatible_features & !KNOWN_INCOMPAT;
        if unknown != 0 {
            let names = self
                .feature_names
                .iter()
                .filter(|(kind, bit, _)| *kind == 0 && *bit < 64 && unknown & (1u64 << bit) != 0)
                .map(|(_, _, name)| name.clone())
                .collect();
            return Err(HeaderError::UnknownIncompatible {
                bits: unknown,
                names,
            });
        }
        if self.crypt_method != 0 {
            return Err(HeaderError::Encrypted {
                method: self.crypt_method,
            });
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::DataFile {
                name: self.data_file.clone(),
            });
        }
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(HeaderError::ExtendedL2);
        }
        let value = self.compression_type;
        if self.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            match value {
                0 => {
                    return Err(HeaderError::CompressionType {
                        value,
                        why: "is deflate, but the compression type feature bit is set",
                    })
                }
                1 => return Err(HeaderError::Zstd),
                _ => {
                    return Err(HeaderError::CompressionType {
                        value,
                        why: "is unknown",
                    })
                }
            }
        }
        if value != 0 {
            return Err(HeaderError::CompressionType {
                value,
                why: "is not deflate, but the compression type feature bit is clear",
            });
        }
        Ok(())
    }

    fn check_tables(&self, file_size: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        if self.size > i64::MAX as u64 {
            return Err(HeaderError::TooLarge {
                field: "size",
                value: self.size,
                max: i64::MAX as u64,
            });
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(HeaderError::TooLarge {
                field: "l1_size",
                value: self.l1_size.into(),
                max: MAX_L1_BYTES / 8,
            });
        }
        let needed = self.l1_entries_needed();
        if u64::from(self.l1_size) < needed {
            return Err(HeaderError::L1TooSmall {
                l1_size: self.l1_size,
                size: self.size,
                needed,
            });
        }
        if self.refcount_table_clusters == 0 {
            return Err(HeaderError::NoRefcountTable);
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cs;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(HeaderError::TooLarge {
                field: "refcount_table_clusters",
                value: self.refcount_table_clusters.into(),
                max: MAX_REFTABLE_BYTES / cs,
            });
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(HeaderError::TooLarge {
                field: "nb_snapshots",
                value: self.nb_snapshots.into(),
                max: MAX_SNAPSHOTS.into(),
            });
        }
        for (field, value) in [
            ("l1_table_offset", self.l1_table_offset),
            ("refcount_table_offset", self.refcount_table_offset),
            ("snapshots_offset", self.snapshots_offset),
        ] {
            if value % cs != 0 {
                return Err(HeaderError::Misaligned {
                    field,
                    value,
                    cluster_size: cs,
                });
            }
        }

        let mut areas = vec![Area {
            name: "header cluster",
            start: 0,
            end: cs,
        }];
        let mut table = |name, offset: u64, len: u64, extent: String| match offset.checked_add(len)
        {
            Some(end) if end <= file_size => {
                areas.push(Area {
                    name,
                    start: offset,
                    end,
                });
                Ok(())
            }
            _ => Err(HeaderError::PastEnd {
                table: name,
                offset,
                extent,
                file_size,
            }),
        };
        if self.l1_size > 0 {
            table(
                "L1 table",
                self.l1_table_offset,
                l1_bytes,
                format!("{} entries", self.l1_size),
            )?;
        }
        table(
            "refcount table",
            self.refcount_table_offset,
            reftable_bytes,
            format!("{} clusters", self.refcount_table_clusters),
        )?;
        if self.nb_snapshots > 0 {
            // Entries vary in length; each is at least 40 bytes.
            table(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
                format!("{} snapshots", self.nb_snapshots),
            )?;
        }
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[..i] {
                if a.overlaps(b) {
                    return Err(HeaderError::Overlap(a.name, b.name));
                }
            }
        }
        Ok(())
    }
}

/// The L1 entries needed to map `size` bytes with 2^`cluster_bits` clusters.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    // One L1 entry maps cluster_size / 8 clusters: 2^(2 * bits - 3) bytes,
    // at most 2^39 for 2 MiB clusters.
    let shift = 2 * cluster_bits - 3;
    size.div_ceil(1u64 << shift)
}

fn check_header_length(length: u32, cluster_size: u64) -> Result<(), HeaderError> {
    let why = if length < V3_MIN_HEADER_LENGTH {
        format!("is below {V3_MIN_HEADER_LENGTH}, the minimum for version 3")
    } else if !length.is_multiple_of(8) {
        "is not a multiple of 8".to_owned()
    } else if u64::from(length) > cluster_size {
        format!("is larger than the cluster size {cluster_size}")
    } else {
        return Ok(());
    };
    Err(HeaderError::HeaderLength { length, why })
}

fn check_backing_place(
    offset: u64,
    size: u32,
    ext_start: u64,
    cluster_size: u64,
) -> Result<(), HeaderError> {
    let why = if size == 0 {
        "is empty".to_owned()
    } else if size > MAX_BACKING_NAME {
        format!("is longer than {MAX_BACKING_NAME} bytes")
    } else if offset < ext_start {
        format!("starts inside the header, which is {ext_start} bytes")
    } else if offset.saturating_add(size.into()) > cluster_size {
        format!("does not end within the first cluster ({cluster_size} bytes)")
    } else {
        return Ok(());
    };
    Err(HeaderError::BackingFile { offset, size, why })
}

fn read_extensions(r: &Reader, start: u64, end: u64) -> Result<Extensions, HeaderError> {
    let mut ext = Extensions::default();
    let mut seen: Vec<u32> = Vec::new();
    let mut pos = start;
    // The area ends at an end marker, or (as QEMU reads it) exactly where
    // the backing file name or the first cluster begins.
    while pos < end {
        let bad = |why: String| HeaderError::Extension { offset: pos, why };
        if end - pos < 8 {
            return Err(bad(format!(
                "has no room for its type and length before offset {end:#x}, and there is no end marker"
            )));
        }
        let kind = r.u32(pos)?;
        if kind == EXT_END {
            break;
        }
        let len = r.u32(pos + 4)?;
        let data_start = pos + 8;
        let padded = u64::from(len).div_ceil(8) * 8;
        let next = data_start + padded;
        if next > end {
            return Err(bad(format!(
                "(type {kind:#010x}, {len} bytes) runs past offset {end:#x}, the end of the extension area"
            )));
        }
        let data = r.bytes(data_start, len.into())?;
        if matches!(
            kind,
            EXT_BACKING_FORMAT | EXT_FEATURE_TABLE | EXT_BITMAPS | EXT_DATA_FILE | EXT_CRYPTO
        ) {
            if seen.contains(&kind) {
                return Err(bad(format!(
                    "repeats extension type {kind:#010x}, which may appear only once"
                )));
            }
            seen.push(kind);
        }
        match kind {
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT {
                    return Err(bad(format!(
                        "holds a backing format name of {len} bytes, longer than {MAX_BACKING_FORMAT}"
                    )));
                }
                let name = std::str::from_utf8(data)
                    .map_err(|_| HeaderError::NotUtf8("backing format name"))?;
                ext.backing_format = Some(name.to_owned());
            }
            EXT_FEATURE_TABLE => {
                if data.len() % FEATURE_ENTRY != 0 {
                    return Err(bad(format!(
                        "is a feature name table of {len} bytes, not a multiple of {FEATURE_ENTRY}"
                    )));
                }
                for entry in data.chunks_exact(FEATURE_ENTRY) {
                    let name = &entry[2..];
                    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                    // Names only make messages better; a bad byte is no reason to refuse.
                    ext.feature_names.push((
                        entry[0],
                        entry[1],
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                }
            }
            EXT_DATA_FILE => {
                let name = std::str::from_utf8(data)
                    .map_err(|_| HeaderError::NotUtf8("external data file name"))?;
                ext.data_file = Some(name.to_owned());
            }
            EXT_BITMAPS => ext.has_bitmaps = true,
            // The encryption pointer matters only to encrypted images, which
            // are refused; unknown extensions may be ignored.
            _ => {}
        }
        pos = next;
    }
    Ok(ext)
}

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
