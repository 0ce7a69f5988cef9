//! qcow2 images and backing chains under the test guest (runs on PVM
//! hosts), made and checked by QEMU's own tools: every request type on an
//! overlay over a raw base of random data, on a 3-deep chain, with 512-byte
//! and 2 MiB clusters, over a compressed base and into compressed
//! clusters; afterwards `qemu-img check` is clean, what the guest read is
//! what `qemu-img convert` reads, and the backing files are unchanged.
//! `snapshot=on` leaves the disk file and `$TMPDIR` as they were, and
//! images go both ways between QEMU and us.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::images::{
    assert_check_clean, guest_pattern, qemu_img, qemu_io, random_bytes, RawCopy, SALT_VERIFY,
};
use tests::{boot, fnv1a64_file, testguest, vmm_binary, TempDir};
use vmm::VmExit;

const MIB: u64 = 1 << 20;
/// How long one test guest run may take (a few seconds on a quiet PVM host).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Every request type, between a checksum of what the chain held before
/// (reads falling through to the backing files) and one of the result;
/// `verify` and `random` on the first half only, so the second half still
/// shows the backing files' data at the end.
const WORKLOADS: &str = "blk=checksum,verify,random,discard,writezeroes,checksum blk.bytes=4M";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw image of `len` bytes of random data.
fn random_raw(path: &Path, seed: u64, len: u64) {
    std::fs::write(path, random_bytes(seed, len as usize)).unwrap();
}

/// `qemu-img create -f qcow2` over `backing` (of format `backing_fmt`),
/// with `options` (`-o`) if any.
fn overlay(path: &Path, backing: &Path, backing_fmt: &str, options: &str) {
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(backing),
        "-F",
        backing_fmt,
    ];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.push(s(path));
    qemu_img(&args);
}

/// The guest's `testguest: blk ...` result lines, in order, after it ended.
struct Run {
    exit: VmExit,
    lines: Vec<String>,
}

impl Run {
    /// Every result line of `what` (e.g. `checksum vda`).
    fn results(&self, what: &str) -> Vec<&str> {
        let needle = format!("testguest: blk {what}: ");
        self.lines
            .iter()
            .filter_map(|l| l.find(&needle).map(|at| &l[at + needle.len()..]))
            .collect()
    }

    /// The `fnv1a64=` values of `checksum` on `dev`, in order.
    fn checksums(&self, dev: &str) -> Vec<String> {
        self.results(&format!("checksum {dev}"))
            .into_iter()
            .map(|r| value(r, "fnv1a64").to_string())
            .collect()
    }

    /// Asserts the guest ended with 0 and each of `works` on `dev` said ok.
    fn assert_ok(&self, dev: &str, works: &[&str]) {
        for w in works {
            let r = self.results(&format!("{w} {dev}"));
            assert!(
                !r.is_empty() && r.iter().all(|l| l.starts_with("ok")),
                "{w} on {dev}: {r:?}\n{}",
                self.lines.join("\n")
            );
        }
        assert_eq!(
            self.exit,
            VmExit::Status(0),
            "a workload failed:\n{}",
            self.lines.join("\n")
        );
    }
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 1;
    line[start..].split_whitespace().next().unwrap()
}

/// Boots the test guest with `cmdline` and `disks` and waits for it to end.
fn run(cmdline: &str, disks: &[String]) -> Run {
    let vm = boot(&testguest(cmdline, disks, None));
    let log = vm.serial().unwrap().clone();
    if vm.wait_timeout(RUN_TIMEOUT).is_none() {
        vm.kill();
    }
    let exit = vm.wait();
    Run {
        exit,
        lines: log.lines(),
    }
}

/// The FNV-1a of the image's contents as `qemu-img convert` reads them.
fn converted_fnv(path: &Path, format: &str) -> String {
    fnv1a64_file(&RawCopy::of(path, format).path)
}

/// Every workload on `top`, a qcow2 image whose chain ends in the files
/// `backing` (checked unchanged afterwards), with `--disk` options `extra`.
fn workloads_on(top: &Path, backing: &[&Path], extra: &str) {
    let before: Vec<Vec<u8>> = backing.iter().map(|b| std::fs::read(b).unwrap()).collect();
    let chain_before = converted_fnv(top, "qcow2");
    let run = run(
        WORKLOADS,
        &[format!("path={},format=qcow2,{extra}", top.display())],
    );
    run.assert_ok("vda", &["verify", "random", "discard", "writezeroes"]);
    let sums = run.checksums("vda");
    assert_eq!(sums.len(), 2, "{:?}", run.lines);
    assert_eq!(
        sums[0], chain_before,
        "the guest read something else than the chain holds"
    );
    assert_check_clean(top);
    assert_eq!(
        sums[1],
        converted_fnv(top, "qcow2"),
        "what the guest read back is not what qemu-img reads"
    );
    for (b, before) in backing.iter().zip(before) {
        assert!(
            std::fs::read(b).unwrap() == before,
            "the backing file {} changed",
            b.display()
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_overlay_over_a_random_raw_base_with_a_sleeping_dataplane() {
    let dir = TempDir::new("qcow2-sleeping");
    let (base, top) = (dir.file("base.raw"), dir.file("top.qcow2"));
    random_raw(&base, 1, 8 * MIB);
    overlay(&top, &base, "raw", "");
    workloads_on(&top, &[&base], "poll=0");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_overlay_over_a_random_raw_base_with_o_direct() {
    let dir = TempDir::new("qcow2-direct");
    let (base, top) = (dir.file("base.raw"), dir.file("top.qcow2"));
    random_raw(&base, 2, 8 * MIB);
    overlay(&top, &base, "raw", "");
    workloads_on(&top, &[&base], "direct=on,poll=100");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn a_three_deep_chain_each_layer_holding_data() {
    // raw <- l1 <- l2 <- top, backing paths relative to the folder; l1 and
    // l2 each hold data of their own (written by qemu-io) in parts that
    // the guest's first checksum reads through.
    let dir = TempDir::new("qcow2-chain");
    let base = dir.file("base.raw");
    random_raw(&base, 3, 8 * MIB);
    let (l1, l2, top) = (
        dir.file("l1.qcow2"),
        dir.file("l2.qcow2"),
        dir.file("top.qcow2"),
    );
    overlay(&l1, Path::new("base.raw"), "raw", "");
    overlay(&l2, Path::new("l1.qcow2"), "qcow2", "cluster_size=4096");
    overlay(&top, Path::new("l2.qcow2"), "qcow2", "");
    // (created in the folder: relative backing names resolve against it)
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 5M 200k",
        "-c",
        "write -z 6M 64k",
        s(&l1),
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 5100k 7k",
        "-c",
        "write -P 0x33 7M 1M",
        s(&l2),
    ]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x44 1M 3k", s(&top)]);
    let (l1_copy, l2_copy) = (std::fs::read(&l1).unwrap(), std::fs::read(&l2).unwrap());
    workloads_on(&top, &[&base, &l1, &l2], "poll=0");
    assert!(std::fs::read(&l1).unwrap() == l1_copy);
    assert!(std::fs::read(&l2).unwrap() == l2_copy);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_overlay_with_512_byte_clusters() {
    let dir = TempDir::new("qcow2-c512");
    let (base, top) = (dir.file("base.raw"), dir.file("top.qcow2"));
    random_raw(&base, 4, 8 * MIB);
    overlay(&top, &base, "raw", "cluster_size=512");
    workloads_on(&top, &[&base], "poll=0");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_overlay_with_2_mib_clusters() {
    let dir = TempDir::new("qcow2-c2m");
    let (base, top) = (dir.file("base.raw"), dir.file("top.qcow2"));
    random_raw(&base, 5, 16 * MIB);
    overlay(&top, &base, "raw", "cluster_size=2M");
    workloads_on(&top, &[&base], "poll=0");
}

/// Data that deflate shrinks (each sector one random word repeated), so
/// `qemu-img convert -c` really stores compressed clusters.
fn compressible(seed: u64, len: u64) -> Vec<u8> {
    random_bytes(seed, len as usize / 64)
        .chunks(8)
        .flat_map(|w| w.repeat(64))
        .collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_overlay_over_a_compressed_base_and_writes_into_compressed_clusters() {
    let dir = TempDir::new("qcow2-compressed");
    let (raw, base, top) = (
        dir.file("data.raw"),
        dir.file("base.qcow2"),
        dir.file("top.qcow2"),
    );
    std::fs::write(&raw, compressible(6, 8 * MIB)).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&base),
    ]);
    let map = qemu_img(&["map", "--output=json", "-f", "qcow2", s(&base)]);
    assert!(map.contains("\"compressed\": true"), "{map}");
    overlay(&top, &base, "qcow2", "");
    // Reads of compressed clusters through a backing file, and partial
    // writes that copy them up.
    workloads_on(&top, &[&base], "poll=0");

    // Writes into the compressed image itself: each partial write copies
    // its compressed cluster into a new, uncompressed one.
    workloads_on(&base, &[], "poll=0");
    let map = qemu_img(&["map", "--output=json", "-f", "qcow2", s(&base)]);
    assert!(
        map.contains("\"compressed\": true"),
        "the clusters the guest left alone stay compressed: {map}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn snapshot_on_leaves_the_disk_files_and_tmpdir_as_they_were() {
    // The vmm binary, so that its $TMPDIR is a folder of this test's own.
    let dir = TempDir::new("qcow2-snapshot");
    let tmpdir = dir.file("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let (raw, base, top) = (
        dir.file("disk.raw"),
        dir.file("base.raw"),
        dir.file("top.qcow2"),
    );
    random_raw(&raw, 7, 8 * MIB);
    random_raw(&base, 8, 8 * MIB);
    overlay(&top, &base, "raw", "");
    let files = [&raw, &base, &top].map(|p| std::fs::read(p).unwrap());
    let raw_fnv = fnv1a64_file(&raw);
    let top_fnv = converted_fnv(&top, "qcow2");

    let guest = tests::image("testguest");
    let mut child = Command::new(vmm_binary())
        .env("TMPDIR", &tmpdir)
        .args(["--kernel", s(&guest), "--memory", "64M", "--cmdline"])
        .arg(format!(
            "{WORKLOADS} blk=verify@vdb,random@vdb,discard@vdb,writezeroes@vdb,checksum@vdb"
        ))
        .args(["--disk", &format!("path={},snapshot=on", raw.display())])
        .args([
            "--disk",
            &format!("path={},format=qcow2,snapshot=on", top.display()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the vmm binary");
    // While the guest writes, the overlays' names are already gone.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut seen_during_writes = None;
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            break;
        }
        if line.contains("testguest: blk verify vda:") {
            seen_during_writes = Some(std::fs::read_dir(&tmpdir).unwrap().count());
        }
        lines.push(line.trim_end().to_string());
    }
    let out = child.wait_with_output().unwrap();
    let run = Run {
        exit: match out.status.code() {
            Some(c) => VmExit::Status(c as u8),
            None => VmExit::Killed,
        },
        lines,
    };
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run.assert_ok("vda", &["verify", "random", "discard", "writezeroes"]);
    run.assert_ok("vdb", &["verify", "random", "discard", "writezeroes"]);
    assert_eq!(
        seen_during_writes,
        Some(0),
        "a file in $TMPDIR while the VM ran"
    );
    let left: Vec<_> = std::fs::read_dir(&tmpdir).unwrap().collect();
    assert!(left.is_empty(), "left in $TMPDIR: {left:?}");
    // The guest saw the files' data first, then its own writes.
    let sums = run.checksums("vda");
    assert_eq!(sums[0], raw_fnv);
    assert_ne!(sums[1], raw_fnv, "the guest's writes did not show");
    let sums = run.checksums("vdb");
    assert_ne!(sums[0], top_fnv, "the guest's writes did not show");
    for (p, before) in [&raw, &base, &top].iter().zip(files) {
        assert!(
            std::fs::read(p).unwrap() == before,
            "{} changed",
            p.display()
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn images_go_both_ways_between_qemu_and_us() {
    let dir = TempDir::new("qcow2-interop");
    let base = dir.file("base.raw");
    random_raw(&base, 9, 8 * MIB);

    // Ours to QEMU: the guest's verify pattern over the first 3 MiB and a
    // bit, the rest the base's; qemu-img compare must see just that.
    let ours = dir.file("ours.qcow2");
    overlay(&ours, &base, "raw", "");
    let seed = 0x5eed_0042u64;
    let bytes = 3 * MIB + 5 * 512;
    let run1 = run(
        &format!("blk=verify blk.seed={seed} blk.bytes={bytes}"),
        &[format!("path={},format=qcow2", ours.display())],
    );
    run1.assert_ok("vda", &["verify"]);
    assert_check_clean(&ours);
    let mut expected = std::fs::read(&base).unwrap();
    expected[..bytes as usize].copy_from_slice(&guest_pattern(seed ^ SALT_VERIFY, 0, bytes / 512));
    let expected_path = dir.file("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&expected_path),
        s(&ours),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // QEMU's to ours: an overlay qemu-io wrote (data, zero clusters over
    // backing data, a discard) and a version 2 image of its own, read
    // through our chain.
    let theirs = dir.file("theirs.qcow2");
    overlay(&theirs, &base, "raw", "");
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0x5c 1000k 7k",
        "-c",
        "write -z 2M 128k",
        "-c",
        "write -P 0x77 3M 1M",
        "-c",
        "discard 3M 64k",
        s(&theirs),
    ]);
    let v2 = dir.file("v2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&v2),
        "4M",
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x9 512 1M",
        "-c",
        "write -P 0xee 3M 4k",
        s(&v2),
    ]);
    let run2 = run(
        "blk=checksum@vda,checksum@vdb",
        &[
            format!("path={},format=qcow2,readonly=on", theirs.display()),
            format!("path={},format=qcow2", v2.display()),
        ],
    );
    assert_eq!(run2.exit, VmExit::Status(0), "{:?}", run2.lines);
    assert_eq!(run2.checksums("vda"), [converted_fnv(&theirs, "qcow2")]);
    assert_eq!(run2.checksums("vdb"), [converted_fnv(&v2, "qcow2")]);
}
