//! Header tests: a corpus of real `qemu-img create` headers
//! (`testdata/make.sh`), checked against what `qemu-img info` says of the
//! same images, then hand-broken copies of them.

use super::*;

/// (name, first 4 KiB of the image, `qemu-img info` of it).
macro_rules! fixtures {
    ($($name:literal),* $(,)?) => {
        &[$(($name,
            include_bytes!(concat!("testdata/", $name, ".bin")) as &[u8],
            include_str!(concat!("testdata/", $name, ".json")))),*]
    };
}

const FIXTURES: &[(&str, &[u8], &str)] = fixtures!(
    "v2",
    "v3",
    "v3-c512",
    "v3-c4k",
    "v2-c4k",
    "v3-c2m",
    "v3-r1",
    "v3-r8",
    "v3-r64",
    "v3-backing-raw",
    "v3-backing-qcow2",
    "v2-backing-raw",
    "v3-lazy",
    "v3-extl2",
    "v3-zstd",
    "v3-4t",
    "v3-4t-c4k",
    "v3-c512-backing",
    "v3-odd-size",
    "v3-empty",
);

/// The fixtures this driver refuses, and why.
const REFUSED: &[(&str, &str)] = &[
    (
        "v3-extl2",
        "qcow2 image uses extended L2 entries, which this driver does not support",
    ),
    (
        "v3-zstd",
        "qcow2 image uses zstd compression, which this driver does not support",
    ),
];

/// The image's file size, from the manifest `make.sh` wrote.
fn file_size(name: &str) -> u64 {
    include_str!("testdata/MANIFEST")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, size) = l.split_once(' ')?;
            (n == name).then(|| size.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{name} is not in testdata/MANIFEST"))
}

fn fixture(name: &str) -> (Vec<u8>, u64) {
    let (_, bytes, _) = FIXTURES.iter().find(|(n, _, _)| *n == name).unwrap();
    (bytes.to_vec(), file_size(name))
}

fn parse(name: &str) -> Header {
    let (buf, size) = fixture(name);
    Header::parse(&buf, size).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The error text for `name`'s header after `edit`.
fn broken(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let (mut buf, size) = fixture(name);
    edit(&mut buf);
    match Header::parse(&buf, size) {
        Ok(h) => panic!("{name}: a broken header parsed: {h:?}"),
        Err(e) => e.to_string(),
    }
}

fn edited(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> Header {
    let (mut buf, size) = fixture(name);
    edit(&mut buf);
    Header::parse(&buf, size).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_fixture_agrees_with_qemu_img_info() {
    for (name, bytes, info) in FIXTURES {
        if REFUSED.iter().any(|(n, _)| n == name) {
            continue;
        }
        let info: serde_json::Value = serde_json::from_str(info).unwrap();
        let h = Header::parse(bytes, file_size(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let data = &info["format-specific"]["data"];
        assert_eq!(Some(h.size), info["virtual-size"].as_u64(), "{name}");
        assert_eq!(
            Some(h.cluster_size()),
            info["cluster-size"].as_u64(),
            "{name}"
        );
        let compat = if h.version == 2 { "0.10" } else { "1.1" };
        assert_eq!(Some(compat), data["compat"].as_str(), "{name}");
        assert_eq!(
            Some(u64::from(h.refcount_bits())),
            data["refcount-bits"].as_u64(),
            "{name}"
        );
        assert_eq!(Some("zlib"), data["compression-type"].as_str(), "{name}");
        assert_eq!(h.compression_type, 0, "{name}");
        if h.version == 3 {
            let lazy = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
            assert_eq!(Some(lazy), data["lazy-refcounts"].as_bool(), "{name}");
            assert_eq!(Some(false), data["corrupt"].as_bool(), "{name}");
            assert_eq!(h.header_length, 112, "{name}");
        } else {
            assert!(data.get("lazy-refcounts").is_none(), "{name}");
            assert_eq!((h.header_length, h.refcount_order), (72, 4), "{name}");
        }
        assert_eq!(
            h.backing_file.as_deref(),
            info["backing-filename"].as_str(),
            "{name}"
        );
        assert_eq!(
            h.backing_format.as_deref(),
            info["backing-filename-format"].as_str(),
            "{name}"
        );
        assert!(u64::from(h.l1_size) >= h.l1_entries_needed(), "{name}");
        assert_eq!(h.write_refusal(), None, "{name}");
        assert_eq!(
            (h.nb_snapshots, h.data_file.as_deref()),
            (0, None),
            "{name}"
        );
        assert!(!h.has_bitmaps_extension, "{name}");
    }
}

#[test]
fn fixtures_are_all_listed() {
    let listed = include_str!("testdata/MANIFEST")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    assert_eq!(listed, FIXTURES.len());
}

#[test]
fn refused_fixtures_say_why() {
    for (name, why) in REFUSED {
        let (buf, size) = fixture(name);
        assert_eq!(Header::parse(&buf, size).unwrap_err().to_string(), *why);
    }
}

#[test]
fn layout_fields_of_a_default_image() {
    // qemu-img's layout: header, refcount table, one refcount block, L1.
    let h = parse("v3");
    assert_eq!(h.refcount_table_offset, 0x10000);
    assert_eq!(h.refcount_table_clusters, 1);
    assert_eq!(h.l1_table_offset, 0x30000);
    assert_eq!(h.l1_size, 2);
    assert_eq!(h.l1_entries_needed(), 2);
    assert_eq!(h.l2_entries(), 8192);
    assert_eq!(h.snapshots_offset, 0);
    assert_eq!(
        h.incompatible_features | h.compatible_features | h.autoclear_features,
        0
    );
    for feature in [
        (0, 0, "dirty bit"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ] {
        assert!(
            h.feature_names
                .contains(&(feature.0, feature.1, feature.2.to_owned())),
            "{feature:?}"
        );
    }
    // 4 TiB at 4 KiB clusters: an L1 table of many clusters.
    let h = parse("v3-4t-c4k");
    assert_eq!(h.l1_size, 2 << 20);
    assert_eq!(h.l1_entries_needed(), 2 << 20);
    // An empty disk has no L1 table at all.
    let h = parse("v3-empty");
    assert_eq!((h.l1_size, h.l1_table_offset), (0, 0));
    // A size that is not a whole number of clusters rounds its L1 up.
    let h = parse("v3-odd-size");
    assert_eq!((h.size, h.l1_size), (1_000_000_000, 2));
    assert_eq!(
        parse("v3-c512-backing").backing_file.as_deref(),
        Some("base.raw")
    );
}

#[test]
fn each_fixed_field_broken_in_turn() {
    type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("v3", Box::new(|b| b[0] = b'q'), "not a qcow2 image (bad magic)"),
        ("v3", Box::new(|b| put32(b, 4, 4)), "qcow2 header: version 4 is not supported (2 and 3 are)"),
        ("v3", Box::new(|b| put32(b, 4, 1)), "qcow2 header: version 1 is not supported (2 and 3 are)"),
        ("v3", Box::new(|b| put32(b, 20, 8)), "qcow2 header: cluster_bits 8 is out of range (9..=21)"),
        ("v3", Box::new(|b| put32(b, 20, 22)), "qcow2 header: cluster_bits 22 is out of range (9..=21)"),
        ("v3", Box::new(|b| put32(b, 20, u32::MAX)), "qcow2 header: cluster_bits 4294967295 is out of range (9..=21)"),
        (
            "v3",
            Box::new(|b| put64(b, 24, 1 << 63)),
            "qcow2 header: size 9223372036854775808 is larger than the limit of 9223372036854775807",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 32, 1)),
            "qcow2 image is encrypted (crypt_method 1, AES), which this driver does not support",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 32, 2)),
            "qcow2 image is encrypted (crypt_method 2, LUKS), which this driver does not support",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 36, 1)),
            "qcow2 header: l1_size 1 is too small for the virtual size 1073741824 (it needs 2 entries)",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 36, 5 << 20)),
            "qcow2 header: l1_size 5242880 is larger than the limit of 4194304",
        ),
        (
            "v3",
            Box::new(|b| put64(b, 40, 0x30200)),
            "qcow2 header: l1_table_offset 0x30200 is not aligned to the cluster size 65536",
        ),
        (
            "v3",
            Box::new(|b| put64(b, 40, 0x40000)),
            "qcow2 header: the L1 table (offset 0x40000, 2 entries) lies past the end of the file (0x30010 bytes)",
        ),
        (
            "v3",
            Box::new(|b| put64(b, 40, u64::MAX << 16)),
            "qcow2 header: the L1 table (offset 0xffffffffffff0000, 2 entries) lies past the end of the file (0x30010 bytes)",
        ),
        ("v3", Box::new(|b| put64(b, 40, 0)), "qcow2 header: the L1 table overlaps the header cluster"),
        ("v3", Box::new(|b| put64(b, 40, 0x10000)), "qcow2 header: the refcount table overlaps the L1 table"),
        ("v3", Box::new(|b| put64(b, 48, 0)), "qcow2 header: the refcount table overlaps the header cluster"),
        (
            "v3",
            Box::new(|b| put64(b, 48, 0x10008)),
            "qcow2 header: refcount_table_offset 0x10008 is not aligned to the cluster size 65536",
        ),
        (
            "v3",
            Box::new(|b| put64(b, 48, 0x30000)),
            "qcow2 header: the refcount table (offset 0x30000, 1 clusters) lies past the end of the file (0x30010 bytes)",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 56, 0)),
            "qcow2 header: refcount_table_clusters is 0 (an image needs a refcount table)",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 56, 3)),
            "qcow2 header: the refcount table (offset 0x10000, 3 clusters) lies past the end of the file (0x30010 bytes)",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 56, 129)),
            "qcow2 header: refcount_table_clusters 129 is larger than the limit of 128",
        ),
        ("v3", Box::new(|b| put32(b, 60, 1)), "qcow2 header: the snapshot table overlaps the header cluster"),
        (
            "v3",
            Box::new(|b| put32(b, 60, 70000)),
            "qcow2 header: nb_snapshots 70000 is larger than the limit of 65536",
        ),
        (
            "v3",
            Box::new(|b| {
                put32(b, 60, 1);
                put64(b, 64, 0x10000);
            }),
            "qcow2 header: the snapshot table overlaps the refcount table",
        ),
        (
            "v3",
            Box::new(|b| put64(b, 64, 0x123)),
            "qcow2 header: snapshots_offset 0x123 is not aligned to the cluster size 65536",
        ),
        ("v3", Box::new(|b| put64(b, 72, 0x40)), "qcow2 header: unknown incompatible features 0x40"),
        (
            "v3",
            Box::new(|b| {
                put64(b, 72, 1 << 40 | 0x40);
                // Rename the "dirty bit" entry of the feature name table.
                b[0x79] = 40;
                b[0x7a..0x7a + 12].copy_from_slice(b"frobnication");
            }),
            "qcow2 header: unknown incompatible features 0x10000000040 (frobnication)",
        ),
        (
            "v3",
            Box::new(|b| put64(b, 72, INCOMPAT_DATA_FILE)),
            "qcow2 image keeps its data in an external data file, which this driver does not support",
        ),
        (
            "v3",
            Box::new(|b| put64(b, 72, INCOMPAT_COMPRESSION)),
            "qcow2 header: compression_type 0 is deflate, but the compression type feature bit is set",
        ),
        (
            "v3",
            Box::new(|b| {
                put64(b, 72, INCOMPAT_COMPRESSION);
                b[104] = 2;
            }),
            "qcow2 header: compression_type 2 is unknown",
        ),
        (
            "v3",
            Box::new(|b| b[104] = 1),
            "qcow2 header: compression_type 1 is not deflate, but the compression type feature bit is clear",
        ),
        ("v3", Box::new(|b| put32(b, 96, 7)), "qcow2 header: refcount_order 7 is out of range (0..=6)"),
        (
            "v3",
            Box::new(|b| put32(b, 100, 96)),
            "qcow2 header: header_length 96 is below 104, the minimum for version 3",
        ),
        ("v3", Box::new(|b| put32(b, 100, 108)), "qcow2 header: header_length 108 is not a multiple of 8"),
        (
            "v3",
            Box::new(|b| put32(b, 100, 65544)),
            "qcow2 header: header_length 65544 is larger than the cluster size 65536",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| put32(b, 16, 1024)),
            "qcow2 header: the backing file name (offset 0x210, 1024 bytes) is longer than 1023 bytes",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| put32(b, 16, 0)),
            "qcow2 header: the backing file name (offset 0x210, 0 bytes) is empty",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| put64(b, 8, 0x10000 - 4)),
            "qcow2 header: the backing file name (offset 0xfffc, 8 bytes) does not end within the first cluster (65536 bytes)",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| put64(b, 8, u64::MAX)),
            "qcow2 header: the backing file name (offset 0xffffffffffffffff, 8 bytes) does not end within the first cluster (65536 bytes)",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| put64(b, 8, 64)),
            "qcow2 header: the backing file name (offset 0x40, 8 bytes) starts inside the header, which is 112 bytes",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| b[0x210] = 0xff),
            "qcow2 header: the backing file name is not valid UTF-8",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| b[0x78] = 0xff),
            "qcow2 header: the backing format name is not valid UTF-8",
        ),
        (
            "v3-backing-raw",
            Box::new(|b| put32(b, 0x74, 16)),
            "qcow2 header: the header extension at offset 0x70 holds a backing format name of 16 bytes, longer than 15",
        ),
        (
            // The backing format extension's length runs over the backing name.
            "v3-backing-raw",
            Box::new(|b| put32(b, 0x74, 0x200)),
            "qcow2 header: the header extension at offset 0x70 (type 0xe2792aca, 512 bytes) runs past offset 0x210, the end of the extension area",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 0x74, 47)),
            "qcow2 header: the header extension at offset 0x70 is a feature name table of 47 bytes, not a multiple of 48",
        ),
        (
            "v3",
            Box::new(|b| put32(b, 0x74, u32::MAX)),
            "qcow2 header: the header extension at offset 0x70 (type 0x6803f857, 4294967295 bytes) runs past offset 0x10000, the end of the extension area",
        ),
        (
            // A second feature name table where the end marker was.
            "v3",
            Box::new(|b| {
                put32(b, 0x1f8, EXT_FEATURE_TABLE);
                put32(b, 0x1fc, 0);
            }),
            "qcow2 header: the header extension at offset 0x1f8 repeats extension type 0x6803f857, which may appear only once",
        ),
        (
            "v3",
            Box::new(|b| {
                put64(b, 72, INCOMPAT_DATA_FILE);
                // The end marker becomes a data file name extension "d.img".
                put32(b, 0x1f8, EXT_DATA_FILE);
                put32(b, 0x1fc, 5);
                b[0x200..0x205].copy_from_slice(b"d.img");
            }),
            "qcow2 image keeps its data in an external data file 'd.img', which this driver does not support",
        ),
    ];
    for (name, edit, want) in cases {
        assert_eq!(broken(name, edit), want);
    }
}

#[test]
fn an_extension_area_without_room_for_an_end_marker_is_refused() {
    // The feature name table grows by 48 zero bytes (an entry) and the
    // backing name moves to 4 bytes past its end: no end marker fits.
    let err = broken("v3", |b| {
        put32(b, 0x74, 0x180 + 48);
        b[0x1f8..0x228].fill(0);
        put64(b, 8, 0x228 + 4);
        put32(b, 16, 4);
        b[0x22c..0x230].copy_from_slice(b"base");
    });
    assert_eq!(
        err,
        "qcow2 header: the header extension at offset 0x228 has no room for its type and length before offset 0x22c, and there is no end marker"
    );
}

#[test]
fn an_extension_area_that_ends_at_the_backing_name_needs_no_end_marker() {
    // QEMU reads extensions up to the backing file name; so do we.
    let h = edited("v3-backing-raw", |b| {
        put64(b, 8, 0x80);
        b.copy_within(0x210..0x218, 0x80);
    });
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
}

#[test]
fn unknown_extensions_and_autoclear_bits_are_ignored() {
    let h = edited("v3", |b| {
        put64(b, 88, 1 << 7 | AUTOCLEAR_BITMAPS);
        put32(b, 0x1f8, 0x1234_5678);
        put32(b, 0x1fc, 3);
    });
    assert_eq!(h.autoclear_features, 1 << 7 | AUTOCLEAR_BITMAPS);
    let h = edited("v3", |b| {
        put32(b, 0x1f8, EXT_BITMAPS);
        put32(b, 0x1fc, 24);
    });
    assert!(h.has_bitmaps_extension);
}

#[test]
fn images_we_must_not_write_say_why() {
    let dirty = edited("v3-lazy", |b| put64(b, 72, INCOMPAT_DIRTY));
    assert!(
        dirty
            .write_refusal()
            .unwrap()
            .contains("qemu-img check -r all"),
        "{:?}",
        dirty.write_refusal()
    );
    let corrupt = edited("v3", |b| put64(b, 72, INCOMPAT_CORRUPT));
    assert_eq!(
        corrupt.write_refusal().unwrap(),
        "the image is marked corrupt (repair it with `qemu-img check -r all`)"
    );
    let snapshots = edited("v3", |b| {
        put32(b, 60, 2);
        put64(b, 64, 0x20000);
    });
    assert_eq!(
        snapshots.write_refusal().unwrap(),
        "the image has 2 internal snapshots, which this driver does not maintain"
    );
    let mut encrypted = parse("v3");
    encrypted.crypt_method = 2;
    assert_eq!(
        encrypted.write_refusal().unwrap(),
        "the image is encrypted (LUKS), which this driver does not support"
    );
    let mut data_file = parse("v3");
    data_file.data_file = Some("d.img".into());
    assert!(data_file
        .write_refusal()
        .unwrap()
        .contains("external data file"));
}

#[test]
fn every_truncation_is_an_error() {
    for name in FIXTURES
        .iter()
        .map(|f| f.0)
        .filter(|n| !REFUSED.iter().any(|r| r.0 == *n))
    {
        let (buf, size) = fixture(name);
        // Every prefix is truncated until the first that holds the whole
        // header area, which ends no earlier than the last byte in use.
        let whole = (0..=buf.len())
            .find(|&len| Header::parse(&buf[..len], size).is_ok())
            .unwrap();
        for len in 0..whole {
            match Header::parse(&buf[..len], size) {
                Err(HeaderError::Truncated { have, need }) => {
                    assert_eq!(have, len as u64);
                    assert!(need > have, "{name}[..{len}]: needs {need}");
                }
                other => panic!("{name}[..{len}]: {other:?}"),
            }
        }
        let first_cluster = &buf[..buf.len().min(parse(name).cluster_size() as usize)];
        let in_use = first_cluster.iter().rposition(|&b| b != 0).unwrap() + 1;
        assert!(whole >= in_use, "{name}: {whole} < {in_use}");
        assert_eq!(Header::parse(&buf[..whole], size).unwrap(), parse(name));
    }
    assert_eq!(
        Header::parse(&fixture("v3").0[..100], 100)
            .unwrap_err()
            .to_string(),
        "qcow2 header: truncated: the file is 100 bytes, the header needs 104"
    );
    assert_eq!(
        Header::parse(b"QFI", 3).unwrap_err().to_string(),
        "qcow2 header: truncated: the file is 3 bytes, the header needs 72"
    );
    assert_eq!(
        Header::parse(b"\0\0\0\0", 4).unwrap_err().to_string(),
        "not a qcow2 image (bad magic)"
    );
}

#[test]
fn a_file_too_short_for_its_tables_is_refused() {
    // The L1 table's last entry is cut off.
    let (buf, _) = fixture("v3");
    assert_eq!(
        Header::parse(&buf, 0x30008).unwrap_err().to_string(),
        "qcow2 header: the L1 table (offset 0x30000, 2 entries) lies past the end of the file (0x30008 bytes)"
    );
}

/// xorshift64*: a fixed, reproducible sequence of random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_damage_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut parsed = 0;
    for round in 0..60_000 {
        let (name, bytes, _) = FIXTURES[round % FIXTURES.len()];
        let mut buf = bytes.to_vec();
        // Most damage goes where the parser looks: the header and the
        // first extensions.
        for _ in 0..=rng.below(4) {
            let at = if rng.below(4) == 0 {
                rng.below(buf.len() as u64)
            } else {
                rng.below(0x210)
            } as usize;
            match rng.below(3) {
                0 => buf[at] ^= 1 << rng.below(8),
                1 => buf[at] = rng.next() as u8,
                _ => buf[at] = [0, 0xff, 0x80, 0x7f][rng.below(4) as usize],
            }
        }
        let len = if rng.below(8) == 0 {
            rng.below(buf.len() as u64 + 1) as usize
        } else {
            buf.len()
        };
        let size = match rng.below(8) {
            0 => rng.next(),
            1 => rng.below(1 << 20),
            _ => file_size(name),
        };
        if Header::parse(&buf[..len], size).is_ok() {
            parsed += 1;
        }
    }
    // Some damage lands where it does no harm; most does not.
    assert!(parsed > 0 && parsed < 60_000, "{parsed}");
    // Noise that starts like a qcow2 header.
    for _ in 0..20_000 {
        let mut buf: Vec<u8> = (0..rng.below(1024)).map(|_| rng.next() as u8).collect();
        if buf.len() >= 8 {
            buf[..4].copy_from_slice(&MAGIC.to_be_bytes());
            buf[4..8].copy_from_slice(&(2 + rng.below(2) as u32).to_be_bytes());
        }
        if buf.len() >= 24 {
            buf[20..24].copy_from_slice(&(9 + rng.below(13) as u32).to_be_bytes());
        }
        let _ = Header::parse(&buf, rng.next());
    }
}

#[test]
fn read_from_a_file() {
    let path = std::env::temp_dir().join(format!("qcow2-header-{}-read", std::process::id()));
    let (buf, size) = fixture("v3-backing-qcow2");
    std::fs::write(&path, &buf).unwrap();
    // The fixture is the first 4 KiB; extend it to the image's full size.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(size).unwrap();
    let h = Header::read_from(&file).unwrap();
    assert_eq!(h, parse("v3-backing-qcow2"));
    // A file shorter than a cluster holds all it has.
    file.set_len(100).unwrap();
    assert_eq!(
        Header::read_from(&file).unwrap_err().to_string(),
        "qcow2 header: truncated: the file is 100 bytes, the header needs 104"
    );
    file.set_len(0).unwrap();
    assert!(matches!(
        Header::read_from(&file),
        Err(HeaderError::Truncated { have: 0, .. })
    ));
    std::fs::remove_file(&path).unwrap();
}
