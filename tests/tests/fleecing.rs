//! Image fleecing, QEMU's way, with the test guest writing all the time:
//! a qcow2 overlay whose backing node is the guest's disk, a
//! `blockdev-backup sync=none` into it hosted by the disk's dataplane
//! (`live-jobs=on`), and a read-only NBD export of the overlay. Whole
//! reads of the export seconds apart, by `nbdcopy` (a client no one here
//! wrote), are the disk as it was when the backup started, while the
//! disk itself keeps changing.
//!
//! Needs `nbdcopy` (Debian `libnbd-bin`) and `qemu-img`; `scripts/test.sh`
//! installs them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::qmp::Qmp;
use tests::{boot, expect_line, temp_path, testguest, TempDir, TempDisk};

const DISK: u64 = 16 << 20;

fn run(name: &str, args: &[&str]) {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {name} ({e}): install libnbd-bin and qemu-utils (scripts/test.sh does)")
    });
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The whole export, read by nbdcopy.
fn read_export(socket: &Path, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    let uri = format!("nbd+unix:///e0?socket={}", socket.display());
    run("nbdcopy", &[&uri, out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

/// Adds an overlay over `drive0` (the guest's disk) as node `fleece`,
/// backs it up into it with sync=none and exports it read-only.
fn fleece(qmp: &mut Qmp, disk: &TempDisk, dir: &Path, nbd: &Path) {
    let overlay = dir.join("fleece.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            disk.path.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ],
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fleece", "backing": "drive0",
               "file": {"driver": "file", "filename": overlay}}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "fl0", "device": "drive0", "target": "fleece", "sync": "none"}),
    );
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "fleece", "name": "e0"}),
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let fleece = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fleece")
        .unwrap();
    assert_eq!(fleece["in-use-by"], "block job 'fl0'");
    assert_eq!(fleece["hosted"], json!(["block export 'e0'"]), "{fleece}");
}

fn guest(disk: &TempDisk, qmp: &Path) -> vmm::VmConfig {
    testguest(
        "blk=random blk.ops=3000000 blk.qd=8 blk.timeout=300 idle",
        &[disk.option("id=vda,node-name=drive0,live-jobs=on")],
        Some(qmp),
    )
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_fleecing_export_holds_the_disk_as_it_was_while_the_guest_writes() {
    let dir = TempDir::new("fleecing");
    let disk = TempDisk::patterned("fleece-src", DISK);
    let path = temp_path("fleecing.qmp");
    let nbd = dir.0.join("nbd.sock");
    let vm = boot(&guest(&disk, &path));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    // Stopped: the reference is the disk file now.
    qmp.ok("stop", json!({}));
    let reference = std::fs::read(&disk.path).unwrap();
    fleece(&mut qmp, &disk, &dir.0, &nbd);
    qmp.ok("cont", json!({}));
    let first = read_export(&nbd, &dir.0, "first.raw");
    std::thread::sleep(Duration::from_secs(2));
    let second = read_export(&nbd, &dir.0, "second.raw");
    assert!(
        first == reference,
        "the export is the disk at the backup's start"
    );
    assert!(second == reference, "and still is, seconds later");
    let now = std::fs::read(&disk.path).unwrap();
    assert!(now != reference, "while the guest kept writing");
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");

    // Tear down as QEMU's users do: export, job, overlay; the guest goes on.
    qmp.delete_export("e0");
    qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10), |d| {
        d["id"] == "e0"
    });
    qmp.ok("job-cancel", json!({"id": "fl0"}));
    qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(30), |d| {
        d["device"] == "fl0"
    });
    qmp.ok("nbd-server-stop", json!({}));
    qmp.ok("blockdev-del", json!({"node-name": "fleece"}));
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");
    qmp.ok("quit", json!({}));
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_fleecing_export_started_on_a_running_guest_stays_put() {
    let dir = TempDir::new("fleecing-live");
    let disk = TempDisk::patterned("fleece-live-src", DISK);
    let path = temp_path("fleecing-live.qmp");
    let nbd = dir.0.join("nbd.sock");
    let vm = boot(&guest(&disk, &path));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    // No stop: the point in time is whenever the job began.
    fleece(&mut qmp, &disk, &dir.0, &nbd);
    let first = read_export(&nbd, &dir.0, "first.raw");
    let before = std::fs::read(&disk.path).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let second = read_export(&nbd, &dir.0, "second.raw");
    let after = std::fs::read(&disk.path).unwrap();
    assert!(
        first == second,
        "two reads of the export seconds apart agree"
    );
    assert!(before != after, "while the disk kept changing");
    qmp.ok("quit", json!({}));
    vm.wait();
}
