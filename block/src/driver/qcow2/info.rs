//! What a qcow2 node tells about its image (QEMU's `ImageInfo` and
//! `ImageInfoSpecificQCow2`), and giving up writes when an overlay goes
//! on top of it.

use base::sync::lock;

use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2};
use super::{Qcow2, Qcow2Error};
use crate::driver::{FormatSpecific, ImageDetails, Qcow2Specific};
use crate::error::BlockError;

impl<C> Qcow2<C> {
    /// Cluster size, the recorded backing file and the format-specific
    /// data, as QEMU 10 shows them: the feature flags only for version 3
    /// images (`compat` "1.1").
    pub(super) fn details(&self) -> ImageDetails {
        let h = &self.header;
        let v3 = h.version >= 3;
        let flag = |bits: u64, bit: u64| v3.then_some(bits & bit != 0);
        ImageDetails {
            cluster_size: 1 << h.cluster_bits,
            dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
            backing_filename: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            specific: Some(FormatSpecific::Qcow2(Qcow2Specific {
                compat: if v3 { "1.1" } else { "0.10" }.into(),
                lazy_refcounts: flag(h.compatible_features, COMPAT_LAZY_REFCOUNTS),
                corrupt: flag(h.incompatible_features, INCOMPAT_CORRUPT),
                extended_l2: flag(h.incompatible_features, INCOMPAT_EXTL2),
                refcount_bits: 1 << h.refcount_order,
                compression_type: if h.compression_type == 1 {
                    "zstd"
                } else {
                    "zlib"
                }
                .into(),
            })),
        }
    }

    /// Writes back every table it cached and makes them durable, so the
    /// image is whole on disk before it becomes a read-only backing node.
    pub(super) fn write_back(&self, node: &str) -> Result<(), BlockError> {
        lock(&self.meta).settle().map_err(|e| BlockError::Qcow2 {
            node: node.to_string(),
            source: Qcow2Error::Meta(e),
        })
    }
}
