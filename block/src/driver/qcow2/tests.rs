//! The qcow2 driver against images `qemu-img` makes and checks: every
//! test keeps a plain byte model of the disk, drives the engine the way
//! the dataplane does, and compares the image's contents (through
//! `qemu-img convert -O raw`) with the model at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::driver::{File, FileOptions};
use crate::io::{new_notifier, Completion};
use crate::lock::Locking;
use base::sync::lock;

/// A child for tests: a driver with a name, no graph around it.
struct TestChild {
    name: String,
    driver: Box<dyn Driver<TestChild>>,
}

impl Child for TestChild {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &dyn Driver<TestChild> {
        self.driver.as_ref()
    }
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("qcow2-{}-{name}", std::process::id()))
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs (scripts/test.sh installs qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn file_child(path: &Path, read_only: bool, direct: bool) -> TestChild {
    let mut options = FileOptions::new(path.to_path_buf());
    options.locking = Locking::Off;
    options.direct = direct;
    TestChild {
        name: format!("file-{}", path.display()),
        driver: Box::new(File::open("file", &options, read_only).unwrap()),
    }
}

fn open(path: &Path, backing: Option<TestChild>, read_only: bool) -> Qcow2<TestChild> {
    Qcow2::open(
        "top",
        file_child(path, read_only, false),
        backing,
        read_only,
    )
    .unwrap()
}

/// The dataplane's side: requests in, completions out.
struct Driver2 {
    io: Box<dyn AsyncIo>,
    next: u64,
}

impl Driver2 {
    fn new(q: &Qcow2<TestChild>, depth: u32) -> Self {
        let notifier = new_notifier("test").unwrap();
        Self {
            io: q.open_io("top", depth, &notifier).unwrap(),
            next: 1,
        }
    }

    fn wait(&mut self, n: usize) -> Vec<Completion> {
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.len() < n {
            assert!(Instant::now() < deadline, "completions did not arrive");
            match self.io.next_completion() {
                Some(c) => done.push(c),
                None => {
                    let _ = self.io.submit_and_wait(1, Duration::from_millis(10));
                    let _ = self.io.notifier().read();
                }
            }
        }
        done
    }

    /// Writes each `(offset, data)` with all of them in flight at once.
    fn write_all(&mut self, writes: &[(u64, Vec<u8>)]) {
        let iovs: Vec<[libc::iovec; 1]> = writes
            .iter()
            .map(|(_, d)| {
                [libc::iovec {
                    iov_base: d.as_ptr() as *mut _,
                    iov_len: d.len(),
                }]
            })
            .collect();
        for ((off, _), iov) in writes.iter().zip(&iovs) {
            // SAFETY: the buffers and iovecs outlive the wait below.
            unsafe { self.io.write_vectored(*off, iov, self.next).unwrap() };
            self.next += 1;
        }
        self.io.submit().unwrap();
        for c in self.wait(writes.len()) {
            assert!(c.result >= 0, "write failed: {}", c.result);
        }
    }

    fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len];
        // Two iovecs, split unevenly, to exercise slicing.
        let cut = len / 3 / 512 * 512;
        let (a, b) = buf.split_at_mut(cut);
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the buffer outlives the wait.
        unsafe { self.io.read_vectored(off, &iov, self.next).unwrap() };
        self.next += 1;
        self.io.submit().unwrap();
        let c = self.wait(1);
        assert_eq!(c[0].result, len as i32, "read of {len} at {off}");
        buf
    }

    fn flush(&mut self) {
        self.io.flush(self.next).unwrap();
        self.next += 1;
        self.io.submit().unwrap();
        assert_eq!(self.wait(1)[0].result, 0);
    }

    fn zero(&mut self, off: u64, len: u64, unmap: bool) {
        if unmap {
            self.io.punch_hole(off, len, self.next).unwrap();
        } else {
            self.io.write_zeroes(off, len, self.next).unwrap();
        }
        self.next += 1;
        self.io.submit().unwrap();
        assert_eq!(self.wait(1)[0].result, 0);
    }
}

// A small xorshift, so failures replay.
use base::xorshift::XorShift64 as Rng;

fn check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("\"corruptions\""),
        "qemu-img check found problems: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` finds no corruption; leaked clusters (exit status 3)
/// are what a crash may leave.
fn check_no_corruption(path: &Path, crash_point: u64) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 3)) && !text.contains("\"corruptions\""),
        "crash at metadata write {crash_point}: qemu-img check found corruption: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn contents(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("converted.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    data
}

/// Random writes (whole, partial and multi-cluster), reads checked
/// against the model as they go, zeroing, flushes; then the image is
/// closed, checked clean and compared byte for byte.
fn exercise(path: &Path, size: u64, model: &mut [u8], backing: Option<TestChild>, seed: u64) {
    exercise_with(path, size, model, backing, seed, None)
}

fn exercise_with(
    path: &Path,
    size: u64,
    model: &mut [u8],
    backing: Option<TestChild>,
    seed: u64,
    cache_tables: Option<usize>,
) {
    let q = open(path, backing, false);
    if let Some(n) = cache_tables {
        lock(&q.meta).set_cache_capacity(n);
    }
    let mut d = Driver2::new(&q, 16);
    let mut rng = Rng(seed);
    let sectors = size / 512;
    for round in 0..40 {
        let batch: Vec<(u64, Vec<u8>)> = (0..8)
            .map(|_| {
                let len = (1 + rng.next() % 64) * 512;
                let start = rng.next() % (sectors - len / 512 + 1) * 512;
                (start, rng.bytes(len as usize))
            })
            .collect();
        // In-flight writes may overlap: apply them to the model only when
        // they do not, and skip overlapping ones.
        let mut chosen: Vec<(u64, Vec<u8>)> = Vec::new();
        for (off, data) in batch {
            let end = off + data.len() as u64;
            if chosen
                .iter()
                .all(|(o, d)| end <= *o || off >= *o + d.len() as u64)
            {
                chosen.push((off, data));
            }
        }
        d.write_all(&chosen);
        for (off, data) in &chosen {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        let len = (1 + rng.next() % 128) * 512;
        let off = rng.next() % (sectors - len / 512 + 1) * 512;
        let got = d.read(off, len as usize);
        assert!(
            got == model[off as usize..(off + len) as usize],
            "round {round}: read of {len} at {off} differs from what was written"
        );
        if round % 7 == 3 {
            let len = (1 + rng.next() % 300) * 512;
            let off = rng.next() % (sectors - len / 512 + 1) * 512;
            d.zero(off, len, round % 2 == 0);
            model[off as usize..(off + len) as usize].fill(0);
        }
        if round % 5 == 0 {
            d.flush();
        }
    }
    let whole = d.read(0, size as usize);
    assert!(whole == model, "the whole disk differs from the model");
    d.flush();
    drop(d);
    drop(q);
    check_clean(path);
    assert!(contents(path) == model, "qemu-img reads what we wrote");
}

#[test]
fn writes_reads_and_zeroes_on_images_of_every_cluster_size_and_refcount_width() {
    let size = 4u64 << 20;
    for (cluster, refbits, compat) in [
        ("65536", "16", "1.1"),
        ("512", "16", "1.1"),
        ("2097152", "16", "1.1"),
        ("4096", "1", "1.1"),
        ("65536", "64", "1.1"),
        ("65536", "16", "0.10"),
    ] {
        let path = temp(&format!("grid-{cluster}-{refbits}-{compat}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster},refcount_bits={refbits},compat={compat}"),
            path.to_str().unwrap(),
            &size.to_string(),
        ]);
        let mut model = vec![0u8; size as usize];
        exercise(&path, size, &mut model, None, 0x9e37_79b9_7f4a_7c15);
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn tables_evicted_from_tiny_caches_are_written_back_in_order() {
    // 4 KiB clusters: an L2 table maps 2 MiB, so 8 MiB needs 4 of them
    // and a cache of 2 must write back and reload all the time.
    let size = 8u64 << 20;
    let path = temp("evict.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,refcount_bits=64",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut model = vec![0u8; size as usize];
    exercise_with(&path, size, &mut model, None, 21, Some(2));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn an_overlay_copies_up_from_its_raw_backing_and_leaves_it_unchanged() {
    let size = 3u64 << 20;
    for compat in ["1.1", "0.10"] {
        let base = temp(&format!("base-{compat}.raw"));
        let mut rng = Rng(0x1234_5678);
        let data = rng.bytes(size as usize - 4096);
        // A base shorter than the overlay: past its end reads as zeros.
        std::fs::write(&base, &data).unwrap();
        let top = temp(&format!("top-{compat}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            top.to_str().unwrap(),
            &size.to_string(),
        ]);
        let mut model = data.clone();
        model.resize(size as usize, 0);
        let backing = file_child(&base, true, false);
        exercise(&top, size, &mut model, Some(backing), 77);
        assert!(
            std::fs::read(&base).unwrap() == data,
            "the base is untouched"
        );
        std::fs::remove_file(top).unwrap();
        std::fs::remove_file(base).unwrap();
    }
}

#[test]
fn compressed_clusters_read_and_copy_on_write() {
    let size = 1u64 << 20;
    let raw = temp("cmp-src.raw");
    let mut rng = Rng(99);
    // Compressible: runs of repeated bytes.
    let data: Vec<u8> = (0..size as usize)
        .map(|i| (i / 100) as u8 ^ (rng.next() % 2) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    let img = temp("cmp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    {
        let q = open(&img, None, true);
        let mut d = Driver2::new(&q, 4);
        assert!(
            d.read(0, size as usize) == data,
            "compressed data reads back"
        );
    }
    let mut model = data.clone();
    exercise(&img, size, &mut model, None, 5);
    std::fs::remove_file(raw).unwrap();
    std::fs::remove_file(img).unwrap();
}

#[test]
fn concurrent_writes_into_one_unallocated_cluster_all_land() {
    let size = 1u64 << 20;
    let base = temp("conc-base.raw");
    let data = Rng(3).bytes(size as usize);
    std::fs::write(&base, &data).unwrap();
    let top = temp("conc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut model = data.clone();
    {
        let q = open(&top, Some(file_child(&base, true, false)), false);
        let mut d = Driver2::new(&q, 32);
        // 16 writes of 4 KiB into the same 64 KiB cluster, all in flight.
        let writes: Vec<(u64, Vec<u8>)> = (0..16u64)
            .map(|k| (65536 + k * 4096, vec![k as u8 + 1; 4096]))
            .collect();
        d.write_all(&writes);
        for (off, w) in &writes {
            model[*off as usize..*off as usize + w.len()].copy_from_slice(w);
        }
        assert!(d.read(0, size as usize) == model);
        d.flush();
    }
    check_clean(&top);
    assert!(contents(&top) == model);
    std::fs::remove_file(top).unwrap();
    std::fs::remove_file(base).unwrap();
}

#[test]
fn a_small_cluster_image_grows_its_refcount_table() {
    // 512-byte clusters and 16-bit refcounts: one table cluster counts
    // 8 MiB of clusters, so writing 12 MiB must move the table.
    let size = 16u64 << 20;
    let path = temp("grow.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut model = vec![0u8; size as usize];
    {
        let q = open(&path, None, false);
        let mut d = Driver2::new(&q, 8);
        let mut rng = Rng(11);
        for k in 0..48u64 {
            let data = rng.bytes(256 << 10);
            let off = k * (256 << 10);
            d.write_all(&[(off, data.clone())]);
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        d.flush();
    }
    check_clean(&path);
    assert!(contents(&path) == model);
    let info = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    assert!(info.contains("\"cluster-size\": 512"), "{info}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn an_image_qemu_wrote_reads_back_the_same() {
    let path = temp("qemu-wrote.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "2M"]);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 4096 12288",
            "-c",
            "write -z 1048576 65536",
            "-c",
            "write -P 0x11 1114112 512",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let q = open(&path, None, true);
    let mut d = Driver2::new(&q, 4);
    let got = d.read(0, 2 << 20);
    let mut want = vec![0u8; 2 << 20];
    want[4096..16384].fill(0xab);
    want[1114112..1114624].fill(0x11);
    assert!(got == want);
    drop(d);
    drop(q);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_read_only_image_refuses_writes_and_a_dirty_one_refuses_a_writable_open() {
    let path = temp("ro.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    {
        let q = open(&path, None, true);
        let mut d = Driver2::new(&q, 4);
        let data = [1u8; 512];
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: 512,
        }];
        // SAFETY: the buffer outlives the wait.
        unsafe { d.io.write_vectored(0, &iov, 9).unwrap() };
        d.io.submit().unwrap();
        assert_eq!(d.wait(1)[0].result, -libc::EROFS);
    }
    // Set the dirty bit (incompatible bit 0) by hand.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[79] |= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = Qcow2::open("top", file_child(&path, false, false), None, false)
        .err()
        .expect("a dirty image is not opened for writing")
        .to_string();
    assert!(
        err.contains("Node 'top'") && err.contains("read-only"),
        "{err}"
    );
    assert!(Qcow2::open("top", file_child(&path, true, false), None, true).is_ok());
    std::fs::remove_file(path).unwrap();
}

/// Reads the big-endian u64 at `at` in `bytes`.
fn be64_at(bytes: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(bytes[at as usize..at as usize + 8].try_into().unwrap())
}

/// An image with guest cluster 0 allocated, and where its L2 entry and the
/// L1 table lie.
fn one_cluster_image(name: &str) -> (PathBuf, u64, u64) {
    let path = temp(name);
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 65536"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&path).unwrap();
    let l1 = be64_at(&bytes, 40);
    let l2 = be64_at(&bytes, l1) & meta::OFFSET_MASK;
    (path, l1, l2)
}

#[test]
fn guest_data_pointed_at_metadata_is_never_written() {
    let (path, l1, l2) = one_cluster_image("hostile-l2.qcow2");
    // Point guest cluster 1 at the L1 table's cluster.
    let mut bytes = std::fs::read(&path).unwrap();
    let entry = (l1 | meta::COPIED).to_be_bytes();
    bytes[l2 as usize + 8..l2 as usize + 16].copy_from_slice(&entry);
    std::fs::write(&path, &bytes).unwrap();
    {
        let q = open(&path, None, false);
        let mut d = Driver2::new(&q, 4);
        let data = vec![0xffu8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        }];
        // SAFETY: the buffer outlives the wait.
        unsafe { d.io.write_vectored(65536, &iov, 1).unwrap() };
        d.io.submit().unwrap();
        assert!(d.wait(1)[0].result < 0, "the write is refused");
        assert!(
            d.read(0, 4096).iter().all(|&b| b == 0x5a),
            "reads still work"
        );
    }
    let after = std::fs::read(&path).unwrap();
    assert!(
        after[l1 as usize..l1 as usize + 512] == bytes[l1 as usize..l1 as usize + 512],
        "the L1 table is untouched"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_metadata_cluster_counted_free_is_never_allocated() {
    let (path, l1, _) = one_cluster_image("hostile-rc.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    // Uncount the L1 table's cluster (16-bit refcounts, first refblock).
    let reftable = be64_at(&bytes, 48);
    let block = be64_at(&bytes, reftable);
    let at = (block + (l1 >> 16) * 2) as usize;
    bytes[at..at + 2].copy_from_slice(&[0, 0]);
    std::fs::write(&path, &bytes).unwrap();
    {
        let q = open(&path, None, false);
        let mut d = Driver2::new(&q, 4);
        let data = vec![0xffu8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        }];
        // SAFETY: the buffer outlives the wait.
        unsafe { d.io.write_vectored(512 << 10, &iov, 1).unwrap() };
        d.io.submit().unwrap();
        assert!(d.wait(1)[0].result < 0, "the allocation is refused");
    }
    let after = std::fs::read(&path).unwrap();
    assert!(after[l1 as usize..l1 as usize + 512] == bytes[l1 as usize..l1 as usize + 512]);
    std::fs::remove_file(path).unwrap();
}

/// A workload that allocates L2 tables and clusters, zeroes, flushes,
/// and (with 512-byte clusters) makes new refcount blocks and moves the
/// refcount table: every kind of metadata update.
fn metadata_workload(path: &Path) {
    let q = open(path, None, false);
    let mut d = Driver2::new(&q, 8);
    let mut rng = Rng(42);
    for round in 0..6u64 {
        let writes: Vec<(u64, Vec<u8>)> = (0..4u64)
            .map(|k| {
                (
                    (round * 4 + k) * (640 << 10) % (15 << 20),
                    rng.bytes(96 << 10),
                )
            })
            .collect();
        // A failed write is expected once the crash point is passed.
        let iovs: Vec<[libc::iovec; 1]> = writes
            .iter()
            .map(|(_, b)| {
                [libc::iovec {
                    iov_base: b.as_ptr() as *mut _,
                    iov_len: b.len(),
                }]
            })
            .collect();
        for ((off, _), iov) in writes.iter().zip(&iovs) {
            // SAFETY: the buffers outlive the wait below.
            unsafe { d.io.write_vectored(*off, iov, d.next).unwrap() };
            d.next += 1;
        }
        d.io.submit().unwrap();
        d.wait(writes.len());
        d.io.write_zeroes(round * (1 << 20), 8192, d.next).unwrap();
        d.next += 1;
        d.io.flush(d.next).unwrap();
        d.next += 1;
        d.io.submit().unwrap();
        d.wait(2);
    }
}

#[test]
fn a_crash_at_any_metadata_write_leaves_no_corruption() {
    // 512-byte clusters: 9 MiB of writes need new refcount blocks and a
    // bigger refcount table, besides L2 tables and L1 entries.
    for n in 0u64.. {
        let path = temp(&format!("crash-{n}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            path.to_str().unwrap(),
            "16M",
        ]);
        meta::WRITES_LEFT.with(|w| w.set(Some(n)));
        metadata_workload(&path);
        let left = meta::WRITES_LEFT.with(|w| w.replace(None));
        check_no_corruption(&path, n);
        std::fs::remove_file(&path).unwrap();
        if left != Some(0) {
            // The workload (and the close) finished before the crash
            // point: every prefix of its metadata writes was checked.
            assert!(n > 20, "only {n} crash points");
            eprintln!("{n} crash points checked");
            break;
        }
    }
}
