//! Compressed clusters: where an L2 entry says their bytes lie, and
//! inflating them (raw deflate, qcow2's default compression type).

use miniz_oxide::inflate::core::inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// qcow2 counts compressed data in 512-byte sectors.
const SECTOR: u64 = 512;

/// A compressed cluster that does not inflate to a cluster.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompressedError {
    /// The deflate stream is malformed.
    #[error("compressed cluster: the deflate data is corrupt ({0})")]
    Corrupt(&'static str),
    /// The stream (or the bytes read for it) ended before a whole cluster.
    #[error(
        "compressed cluster: the data inflates to {got} bytes, short of the {want}-byte cluster"
    )]
    Short { got: usize, want: usize },
}

/// Where a compressed cluster's bytes lie: (host offset, length in bytes to
/// read), from an L2 entry (flags already known to say compressed), per the
/// spec's x = 62 - (cluster_bits - 8) split.
///
/// The range may run past the end of the image file when the last
/// compressed cluster does not fill its final sector: read what is there.
/// `cluster_bits` must be a parsed header's (9..=21); others are clamped.
pub fn extent(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 70 - cluster_bits.clamp(9, 21);
    let offset = entry & ((1u64 << x) - 1);
    // Bits x..=61: sectors used beyond the one holding the offset.
    let more = (entry >> x) & ((1u64 << (62 - x)) - 1);
    let len = (more + 1) * SECTOR - offset % SECTOR;
    (offset, len)
}

/// Inflates raw deflate `input` into exactly `out.len()` bytes (one
/// cluster); error if the data is bad or ends short. Bytes past the stream
/// (qemu's sector padding, or a neighbour's data) are ignored, and so, as
/// QEMU does, is any output past the cluster: the cluster is what counts.
pub fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), CompressedError> {
    // About 11 KiB of state on the stack, so the data path allocates nothing.
    let mut state = DecompressorOxide::new();
    let (status, _, produced) = decompress(
        &mut state,
        input,
        out,
        0,
        TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    match status {
        TINFLStatus::Failed => Err(CompressedError::Corrupt("bad block or code")),
        TINFLStatus::Adler32Mismatch => Err(CompressedError::Corrupt("checksum mismatch")),
        TINFLStatus::BadParam => Err(CompressedError::Corrupt("bad parameter")),
        // Done, out of input, or out of room: fine once the cluster is full.
        _ if produced == out.len() => Ok(()),
        _ => Err(CompressedError::Short {
            got: produced,
            want: out.len(),
        }),
    }
}

#[cfg(test)]
#[path = "compressed_tests.rs"]
mod tests;
