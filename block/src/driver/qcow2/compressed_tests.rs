//! Compressed cluster tests: entries split as the spec says, and clusters
//! `qemu-img convert -c` wrote, found by walking L1 and L2 by hand,
//! inflate to what was written.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;

use miniz_oxide::deflate::compress_to_vec;

use super::*;
use crate::driver::qcow2::header::Header;

/// The L1/L2 entry bits that hold a standard offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;

#[test]
fn extent_splits_the_entry_at_x() {
    // 64 KiB clusters: x = 54. Offset 0x12345, 3 more sectors: the data
    // runs from 0x12345 to the end of the fourth sector from 0x12200.
    let entry = COMPRESSED | 3 << 54 | 0x12345;
    assert_eq!(extent(entry, 16), (0x12345, 4 * 512 - 0x145));
    // 512-byte clusters: x = 61, one bit of sector count.
    assert_eq!(extent(1 << 61 | 0x200, 9), (0x200, 1024));
    assert_eq!(extent(0x1fff_ffff_ffff_ffff, 9), (0x1fff_ffff_ffff_ffff, 1));
    // 2 MiB clusters: x = 49, 13 bits of sector count.
    let entry = COMPRESSED | 0x1fff << 49 | ((1 << 49) - 1);
    assert_eq!(extent(entry, 21), ((1 << 49) - 1, 0x2000 * 512 - 511));
    // The copied bit and the compressed flag are not part of the extent.
    assert_eq!(extent(1 << 63 | COMPRESSED | 0x400, 16), (0x400, 512));
}

fn pattern(cluster: usize, len: usize) -> Vec<u8> {
    // Compressible, and different in every cluster.
    (0..len)
        .map(|i| ((i / 64 + cluster * 7) % 251) as u8 ^ (i % 3) as u8)
        .collect()
}

/// Reads what there is of `len` bytes at `offset`: a compressed cluster at
/// the end of the file may claim a sector it does not fill.
fn read_some(file: &std::fs::File, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    buf
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

#[test]
fn clusters_qemu_img_compressed_inflate_to_what_was_written() {
    for cluster_size in [512usize, 4096, 65536, 2 << 20] {
        let clusters = 6;
        let dir = std::env::temp_dir();
        let tag = format!("qcow2-compressed-{}-{cluster_size}", std::process::id());
        let raw: PathBuf = dir.join(format!("{tag}.raw"));
        let qcow2: PathBuf = dir.join(format!("{tag}.qcow2"));
        let mut data = Vec::new();
        for c in 0..clusters {
            data.extend(pattern(c, cluster_size));
        }
        std::fs::write(&raw, &data).unwrap();
        let out = Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o"])
            .arg(format!("cluster_size={cluster_size}"))
            .args([&raw, &qcow2])
            .output()
            .expect("qemu-img (qemu-utils) is needed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let file = std::fs::File::open(&qcow2).unwrap();
        let h = Header::read_from(&file).unwrap();
        let cs = h.cluster_size();
        let mut found = 0;
        let l1 = read_some(&file, h.l1_table_offset, u64::from(h.l1_size) * 8);
        for (i, l1e) in l1.chunks_exact(8).enumerate() {
            let l2_offset = be64(l1e) & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let l2 = read_some(&file, l2_offset, cs);
            for (j, l2e) in l2.chunks_exact(8).enumerate() {
                let entry = be64(l2e);
                if entry & COMPRESSED == 0 {
                    continue;
                }
                let guest_cluster = i * h.l2_entries() as usize + j;
                let (offset, len) = extent(entry, h.cluster_bits);
                let input = read_some(&file, offset, len);
                let mut out = vec![0u8; cs as usize];
                inflate(&input, &mut out)
                    .unwrap_or_else(|e| panic!("cluster {guest_cluster}: {e}"));
                assert!(
                    out == pattern(guest_cluster, cs as usize),
                    "cluster {guest_cluster} of {cs}"
                );
                found += 1;
            }
        }
        assert_eq!(
            found, clusters,
            "compressed clusters at cluster size {cluster_size}"
        );
        std::fs::remove_file(&raw).unwrap();
        std::fs::remove_file(&qcow2).unwrap();
    }
}

#[test]
fn bad_data_is_an_error() {
    let cluster = pattern(1, 4096);
    let stream = compress_to_vec(&cluster, 6);
    let mut out = vec![0u8; 4096];
    inflate(&stream, &mut out).unwrap();
    assert_eq!(out, cluster);

    // Whatever follows the stream in its last sector does not matter.
    let mut padded = stream.clone();
    padded.extend_from_slice(&[0xa5; 700]);
    inflate(&padded, &mut out).unwrap();
    assert_eq!(out, cluster);

    // A stream that goes on past the cluster: the cluster is what counts.
    let mut two = cluster.clone();
    two.extend(pattern(2, 4096));
    inflate(&compress_to_vec(&two, 6), &mut out).unwrap();
    assert_eq!(out, cluster);

    // Cut short: the stream ends before the cluster is full.
    let err = inflate(&stream[..stream.len() / 2], &mut out).unwrap_err();
    assert!(
        matches!(err, CompressedError::Short { want: 4096, .. }),
        "{err}"
    );
    assert_eq!(
        inflate(&[], &mut out).unwrap_err().to_string(),
        "compressed cluster: the data inflates to 0 bytes, short of the 4096-byte cluster"
    );

    // A whole stream of less than a cluster.
    let half = compress_to_vec(&cluster[..2048], 6);
    assert_eq!(
        inflate(&half, &mut out).unwrap_err(),
        CompressedError::Short {
            got: 2048,
            want: 4096
        }
    );

    // Not deflate: block type 3 is reserved.
    let err = inflate(&[0xff; 64], &mut out).unwrap_err();
    assert!(matches!(err, CompressedError::Corrupt(_)), "{err}");

    // Random damage gives an error or (rarely) other bytes; never a panic.
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut errors = 0;
    for _ in 0..2000 {
        let mut bad = stream.clone();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = (seed % bad.len() as u64) as usize;
        bad[at] ^= 1 << ((seed >> 32) % 8);
        let short = if seed >> 40 & 1 == 1 {
            bad.len() - (seed >> 48) as usize % bad.len()
        } else {
            bad.len()
        };
        if inflate(&bad[..short], &mut out).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 1000, "{errors}");
}
