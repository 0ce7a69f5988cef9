//! Broken qcow2 images and backing chains: on the command line each gets
//! one line of error and status 1 from the `vmm` binary, never a panic;
//! over QMP each `blockdev-add` gets an error and the VM runs on. An image
//! cut short in its data reads as QEMU reads it (zeros past the end).

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::json;
use tests::images::{qemu_img, qemu_io, RawCopy};
use tests::qmp::Qmp;
use tests::{boot, expect_line, fnv1a64_file, image, run_vmm, temp_path, testguest, TempDir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An 8 MiB qcow2 image (64 KiB clusters) with its first MiB written:
/// header at 0, refcount table at 0x10000, a refcount block, the L1
/// table at 0x30000, an L2 table at 0x40000, data from 0x50000.
fn good_image(path: &Path) {
    qemu_img(&["create", "-q", "-f", "qcow2", s(path), "8M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x5a 0 1M", s(path)]);
    let map = qemu_img(&["map", "--output=json", s(path)]);
    assert!(
        map.contains("\"offset\": 327680"),
        "the layout changed: {map}"
    );
}

/// Overwrites the big-endian u64 at `at` in `path`.
fn patch_u64(path: &Path, at: u64, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_be_bytes(), at).unwrap();
}

/// The bad images: (what, file, words the error must contain).
fn bad_images(dir: &TempDir) -> Vec<(&'static str, PathBuf, Vec<String>)> {
    let good = dir.file("good.qcow2");
    good_image(&good);
    let copy = |name: &str| {
        let p = dir.file(name);
        std::fs::copy(&good, &p).unwrap();
        p
    };
    let truncate = |p: &Path, len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len)
            .unwrap()
    };
    let header = copy("header-cut.qcow2");
    truncate(&header, 100);
    let tables = copy("tables-cut.qcow2");
    truncate(&tables, 0x30000);
    let l1 = copy("l1-past-end.qcow2");
    patch_u64(&l1, 40, 1 << 30); // l1_table_offset
    let refcounts = copy("refcounts-on-header.qcow2");
    patch_u64(&refcounts, 48, 0); // refcount_table_offset
    let (a, b) = (dir.file("a.qcow2"), dir.file("b.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
    ]);
    qemu_img(&["rebase", "-q", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    let orphan = dir.file("orphan.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        s(&orphan),
        "8M",
    ]);
    let w = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("a header cut short", header, w(&["truncated", "100 bytes"])),
        (
            "tables cut off",
            tables,
            w(&["L1 table", "past the end of the file"]),
        ),
        (
            "an L1 table past the end",
            l1,
            w(&["L1 table", "0x40000000", "past the end of the file"]),
        ),
        (
            "a refcount table on the header",
            refcounts,
            w(&["refcount table", "overlaps the header"]),
        ),
        (
            "a backing loop a -> b -> a",
            a,
            w(&["a.qcow2", "already in this backing chain"]),
        ),
        (
            "a missing backing file",
            orphan,
            w(&["gone.raw", "No such file or directory"]),
        ),
    ]
}

/// Asserts a failed start: status 1, one stderr line `vmm: disk 'vda': ...`
/// with every word of `words`, no guest output.
fn assert_one_error_line(what: &str, out: &Output, words: &[String]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: exactly one line of error, got: {stderr}"
    );
    assert!(
        lines[0].starts_with("vmm: disk 'vda': "),
        "{what}: {stderr}"
    );
    for w in words {
        assert!(
            lines[0].contains(w.as_str()),
            "{what}: no '{w}' in: {stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "{what}: the guest must not have run");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn each_broken_image_is_one_error_line_on_the_command_line() {
    let dir = TempDir::new("qcow2-bad-cli");
    let guest = image("testguest");
    for (what, path, words) in bad_images(&dir) {
        for mode in ["", ",readonly=on"] {
            let disk = format!("path={},format=qcow2{mode}", path.display());
            let out = run_vmm(&["--kernel", s(&guest), "--memory", "64M", "--disk", &disk]);
            assert_one_error_line(&format!("{what}{mode}"), &out, &words);
        }
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn each_broken_image_is_a_qmp_error_and_the_vm_runs_on() {
    let dir = TempDir::new("qcow2-bad-qmp");
    let sock = temp_path("qcow2-bad.qmp");
    let vm = boot(&testguest("idle", &[], Some(&sock)));
    let mut qmp = Qmp::connect(&sock);
    expect_line(&vm, "testguest: idle", std::time::Duration::from_secs(60));
    for (n, (what, path, words)) in bad_images(&dir).into_iter().enumerate() {
        let err = qmp.err(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": format!("bad{n}"),
                "read-only": true,
                "file": {"driver": "file", "filename": s(&path)},
            }),
        );
        assert_eq!(err.class, "GenericError", "{what}: {}", err.desc);
        for w in &words {
            assert!(
                err.desc.contains(w.as_str()),
                "{what}: no '{w}' in {}",
                err.desc
            );
        }
    }
    // Nothing half-added is left, and the VM still answers and runs.
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes, json!([]), "{nodes}");
    let status = qmp.ok("query-status", json!({}));
    assert_eq!(status["status"], "running", "{status}");
    assert!(vm.is_running());
    vm.kill();
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_image_cut_short_in_its_data_reads_as_qemu_reads_it() {
    // The L2 table half there, the data cluster it points at gone: QEMU
    // reads zeros past the end of the file, and so must we.
    let dir = TempDir::new("qcow2-bad-data");
    let cut = dir.file("cut.qcow2");
    good_image(&cut);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(0x48000)
        .unwrap();
    let want = fnv1a64_file(&RawCopy::of(&cut, "qcow2").path);
    let vm = boot(&testguest(
        "blk=checksum",
        &[format!("path={},format=qcow2,readonly=on", cut.display())],
        None,
    ));
    let line = expect_line(
        &vm,
        "testguest: blk checksum vda:",
        std::time::Duration::from_secs(120),
    );
    assert!(
        line.contains(&format!("fnv1a64={want}")),
        "{line}, qemu-img reads {want}"
    );
    assert_eq!(vm.wait(), vmm::VmExit::Status(0));
}
