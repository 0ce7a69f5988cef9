//! create() tests: images made for a grid of options must pass
//! `qemu-img check`, read back in `qemu-img info` as asked, take writes
//! from `qemu-io`, and parse with our own header code.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::driver::qcow2::header::Header;

/// A temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qcow2-create-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (qemu-utils installed?)"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn make(path: &Path, o: &CreateOptions) {
    let file = std::fs::File::create(path).unwrap();
    create(&file, o).unwrap_or_else(|e| panic!("{o:?}: {e}"));
}

/// `qemu-img check`: clean, no leaks, no corruption.
fn check_clean(path: &Path, what: &str) {
    let (ok, text) = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    assert!(
        ok && text.contains("No errors were found on the image."),
        "{what}: {text}"
    );
}

/// What `qemu-img info` says of an image, less where it is.
fn info(path: &Path) -> serde_json::Value {
    let (ok, text) = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path));
    assert!(ok, "{text}");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keep = [
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "format-specific",
    ];
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| keep.contains(&k.as_str()));
    v
}

/// The same image made by `qemu-img create`.
fn qemu_img_create(path: &Path, o: &CreateOptions) {
    let mut opts = format!(
        "cluster_size={},refcount_bits={},compat={},lazy_refcounts={}",
        o.cluster_size,
        o.refcount_bits,
        if o.compat_v3 { "1.1" } else { "0.10" },
        if o.lazy_refcounts { "on" } else { "off" }
    );
    if let Some((name, format)) = &o.backing {
        opts += &format!(",backing_file={name},backing_fmt={format}");
    }
    let (ok, text) = run(Command::new("qemu-img")
        .args(["create", "-q", "-u", "-f", "qcow2", "-o", &opts])
        .arg(path)
        .arg(o.size.to_string()));
    assert!(ok, "{opts}: {text}");
}

/// Everything an image made with `o` must pass. `like_qemu_img`: also
/// make one with `qemu-img create` and compare (which takes qemu-img half
/// a minute for the largest images with small clusters).
fn check_image(dir: &Path, o: &CreateOptions, like_qemu_img: bool) {
    let what = format!("{o:?}");
    let ours = dir.join("ours.qcow2");
    make(&ours, o);
    check_clean(&ours, &what);
    // qemu-img reads it as the options said, as it reads its own.
    let ours_info = info(&ours);
    let data = &ours_info["format-specific"]["data"];
    assert_eq!(ours_info["virtual-size"].as_u64(), Some(o.size), "{what}");
    assert_eq!(
        ours_info["cluster-size"].as_u64(),
        Some(o.cluster_size.into()),
        "{what}"
    );
    assert_eq!(
        data["refcount-bits"].as_u64(),
        Some(o.refcount_bits.into()),
        "{what}"
    );
    assert_eq!(
        data["compat"].as_str(),
        Some(if o.compat_v3 { "1.1" } else { "0.10" }),
        "{what}"
    );
    assert_eq!(
        ours_info["backing-filename"].as_str(),
        o.backing.as_ref().map(|b| b.0.as_str()),
        "{what}"
    );
    if o.compat_v3 {
        assert_eq!(
            data["lazy-refcounts"].as_bool(),
            Some(o.lazy_refcounts),
            "{what}"
        );
    }
    if like_qemu_img {
        let theirs = dir.join("theirs.qcow2");
        qemu_img_create(&theirs, o);
        assert_eq!(ours_info, info(&theirs), "{what}");
    }
    // Our header code reads back what we wrote.
    let h = Header::read_from(&std::fs::File::open(&ours).unwrap())
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(h.size, o.size, "{what}");
    assert_eq!(h.cluster_size(), u64::from(o.cluster_size), "{what}");
    assert_eq!(h.refcount_bits(), o.refcount_bits, "{what}");
    assert_eq!(h.version, if o.compat_v3 { 3 } else { 2 }, "{what}");
    assert_eq!(
        h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
        o.lazy_refcounts,
        "{what}"
    );
    assert_eq!(
        h.backing_file.as_deref(),
        o.backing.as_ref().map(|b| b.0.as_str()),
        "{what}"
    );
    assert_eq!(
        h.backing_format.as_deref(),
        o.backing.as_ref().map(|b| b.1.as_str()),
        "{what}"
    );
    assert_eq!(u64::from(h.l1_size), h.l1_entries_needed(), "{what}");
    assert_eq!(h.write_refusal(), None, "{what}");
    // QEMU can allocate in it: the refcount structures it extends are ours.
    // Write at the start and the end of the disk, read back, check again.
    if o.size >= 4096 {
        let end = o.size - 4096;
        let (ok, text) = run(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0xa5 0 4096",
                "-c",
                &format!("write -P 0x5a {end} 4096"),
            ])
            .args([
                "-c",
                "read -P 0xa5 0 4096",
                "-c",
                &format!("read -P 0x5a {end} 4096"),
            ])
            .arg(&ours));
        assert!(
            ok && !text.contains("Pattern verification failed"),
            "{what}: {text}"
        );
        check_clean(&ours, &what);
    }
}

#[test]
fn images_for_a_grid_of_options_pass_qemu_img_check() {
    let dir = TempDir::new("grid");
    std::fs::write(dir.0.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
    let mut n = 0;
    for cluster_size in [512, 4096, 65536, 2 << 20] {
        for refcount_bits in [1, 2, 4, 8, 16, 32, 64] {
            for compat_v3 in [true, false] {
                if !compat_v3 && refcount_bits != 16 {
                    continue;
                }
                // Vary the rest along the grid rather than multiplying it out.
                let size = [1u64 << 30, 0, 7 * 512, (3 << 30) + 512][n % 4];
                let backing = (n % 3 == 1).then(|| ("base.raw".to_owned(), "raw".to_owned()));
                let o = CreateOptions {
                    size,
                    cluster_size,
                    refcount_bits,
                    compat_v3,
                    lazy_refcounts: compat_v3 && n % 2 == 0,
                    backing,
                };
                check_image(&dir.0, &o, true);
                n += 1;
            }
        }
    }
    assert_eq!(n, 4 * 8);
}

#[test]
fn large_images_need_many_l1_clusters_and_refcount_blocks() {
    let dir = TempDir::new("large");
    let cases = [
        // 4 TiB at 4 KiB clusters: a 16 MiB L1 table, three refblocks.
        (4u64 << 40, 4096, 16),
        // 4 TiB with 1-bit refcounts at 64 KiB clusters.
        (4 << 40, 65536, 1),
        // 100 GiB at 512 B clusters with 64-bit refcounts: 813 refblocks,
        // a refcount table of 13 clusters.
        (100 << 30, 512, 64),
        // The largest disk 512-byte clusters allow: a 32 MiB L1 table.
        (128 << 30, 512, 16),
        // 16 TiB at 2 MiB clusters.
        (16 << 40, 2 << 20, 8),
    ];
    for (size, cluster_size, refcount_bits) in cases {
        let o = CreateOptions {
            cluster_size,
            refcount_bits,
            ..CreateOptions::new(size)
        };
        let l = layout(&o);
        check_image(&dir.0, &o, !(cluster_size == 512 && refcount_bits == 64));
        if cluster_size == 512 && refcount_bits == 64 {
            assert_eq!((l.refblocks, l.reftable_clusters), (813, 13), "{l:?}");
        }
        if cluster_size == 4096 {
            assert_eq!((l.l1_clusters, l.refblocks), (4096, 3), "{l:?}");
        }
    }
}

#[test]
fn default_layout_is_qemu_img_s() {
    // Same header, same tables, same places: byte for byte in the first
    // four clusters, as in the corpus's "v3" and "v2" images.
    let dir = TempDir::new("default");
    for o in [
        CreateOptions::new(1 << 30),
        CreateOptions {
            compat_v3: false,
            ..CreateOptions::new(1 << 30)
        },
        CreateOptions {
            backing: Some(("../images/base.qcow2".into(), "qcow2".into())),
            ..CreateOptions::new(1 << 30)
        },
    ] {
        let ours = dir.0.join("ours.qcow2");
        let theirs = dir.0.join("theirs.qcow2");
        make(&ours, &o);
        qemu_img_create(&theirs, &o);
        let a = std::fs::read(&ours).unwrap();
        let b = std::fs::read(&theirs).unwrap();
        // qemu-img ends the file at the end of the L1 table's entries; we
        // end it at the end of its cluster.
        assert_eq!(a.len(), 0x40000);
        assert_eq!(a[..b.len()], b[..], "{o:?}");
    }
}

#[test]
fn options_are_checked() {
    let file = tempfile("options");
    let bad = [
        (CreateOptions::new(1000), "qcow2 create: size 1000 is not a multiple of 512"),
        (
            CreateOptions { cluster_size: 1000, ..CreateOptions::new(1 << 20) },
            "qcow2 create: cluster size 1000 is not a power of two from 512 to 2097152",
        ),
        (
            CreateOptions { cluster_size: 256, ..CreateOptions::new(1 << 20) },
            "qcow2 create: cluster size 256 is not a power of two from 512 to 2097152",
        ),
        (
            CreateOptions { cluster_size: 4 << 20, ..CreateOptions::new(1 << 20) },
            "qcow2 create: cluster size 4194304 is not a power of two from 512 to 2097152",
        ),
        (
            CreateOptions { refcount_bits: 128, ..CreateOptions::new(1 << 20) },
            "qcow2 create: refcount bits 128 is not a power of two from 1 to 64",
        ),
        (
            CreateOptions { refcount_bits: 0, ..CreateOptions::new(1 << 20) },
            "qcow2 create: refcount bits 0 is not a power of two from 1 to 64",
        ),
        (
            CreateOptions { refcount_bits: 12, ..CreateOptions::new(1 << 20) },
            "qcow2 create: refcount bits 12 is not a power of two from 1 to 64",
        ),
        (
            CreateOptions { compat_v3: false, refcount_bits: 8, ..CreateOptions::new(1 << 20) },
            "qcow2 create: compat=0.10 (version 2) images have 16-bit refcounts only",
        ),
        (
            CreateOptions { compat_v3: false, lazy_refcounts: true, ..CreateOptions::new(1 << 20) },
            "qcow2 create: compat=0.10 (version 2) images cannot have lazy refcounts",
        ),
        (
            CreateOptions { cluster_size: 512, ..CreateOptions::new((128 << 30) + 512) },
            "qcow2 create: size 137438953984 is too large for 512-byte clusters (the L1 table would exceed 32 MiB; use larger clusters)",
        ),
        (
            CreateOptions::new(u64::MAX - 511),
            "qcow2 create: size 18446744073709551104 is too large for 65536-byte clusters (the L1 table would exceed 32 MiB; use larger clusters)",
        ),
        (
            CreateOptions { backing: Some(("b".repeat(1024), "raw".into())), ..CreateOptions::new(1 << 20) },
            "qcow2 create: the backing file name is 1024 bytes, longer than 1023",
        ),
        (
            CreateOptions { backing: Some((String::new(), "raw".into())), ..CreateOptions::new(1 << 20) },
            "qcow2 create: the backing file name is empty",
        ),
        (
            CreateOptions { backing: Some(("b".into(), "a-very-long-format".into())), ..CreateOptions::new(1 << 20) },
            "qcow2 create: the backing file format 'a-very-long-format' is longer than 15 bytes",
        ),
        (
            CreateOptions {
                cluster_size: 512,
                backing: Some(("b".repeat(400), "qcow2".into())),
                ..CreateOptions::new(1 << 20)
            },
            "qcow2 create: the backing file name and format need 536 bytes of the header cluster, which has 512",
        ),
    ];
    for (o, want) in bad {
        assert_eq!(create(&file.1, &o).unwrap_err().to_string(), want);
    }
    // A 512-byte cluster holds a backing name by leaving out the feature
    // name table, as qemu-img does.
    let o = CreateOptions {
        cluster_size: 512,
        backing: Some(("b".repeat(370), "qcow2".into())),
        ..CreateOptions::new(1 << 20)
    };
    create(&file.1, &o).unwrap();
    let h = Header::read_from(&file.1).unwrap();
    assert!(h.feature_names.is_empty());
    assert_eq!(h.backing_file.unwrap().len(), 370);
    create(&file.1, &CreateOptions::new(1 << 20)).unwrap();
    assert_eq!(Header::read_from(&file.1).unwrap().feature_names.len(), 8);
    std::fs::remove_file(&file.0).unwrap();
}

#[test]
fn create_truncates_what_was_there() {
    let file = tempfile("truncates");
    file.1.set_len(64 << 20).unwrap();
    file.1.write_all_at(&[0xffu8; 4096], 0x30000).unwrap();
    create(&file.1, &CreateOptions::new(1 << 30)).unwrap();
    assert_eq!(file.1.metadata().unwrap().len(), 0x40000);
    check_clean(&file.0, "over an old file");
    std::fs::remove_file(&file.0).unwrap();
}

#[test]
fn refcounts_of_every_width_are_placed_as_the_spec_says() {
    // Entry 0 .. 2 set in a block of each width.
    let mut block = [0u8; 16];
    for i in 0..3 {
        set_refcount_one(&mut block, i, 1);
    }
    assert_eq!(block[..2], [0b0000_0111, 0]);
    let mut block = [0u8; 16];
    for i in 0..3 {
        set_refcount_one(&mut block, i, 4);
    }
    assert_eq!(block[..3], [0x11, 0x01, 0]);
    let mut block = [0u8; 32];
    for i in 0..3 {
        set_refcount_one(&mut block, i, 64);
    }
    assert_eq!(block[..24], [[0, 0, 0, 0, 0, 0, 0, 1]; 3].concat()[..]);
}

fn tempfile(name: &str) -> (PathBuf, std::fs::File) {
    let path =
        std::env::temp_dir().join(format!("qcow2-create-{}-{name}.qcow2", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    (path, file)
}
