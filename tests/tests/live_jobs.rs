//! Block jobs on a running guest (`--disk ...,live-jobs=on`): the
//! dataplane hosts a backup of its own node, whose copy is the disk as it
//! was when the job started, whatever the guest writes meanwhile.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tests::qmp::Qmp;
use tests::{boot, expect_line, node_named as node, temp_path, testguest, TempDisk};
use vmm::VmConfig;

const DISK: u64 = 16 << 20;
const GRANULE: usize = 64 << 10;

/// A test guest writing and verifying random 4 KiB blocks on `vda`
/// (node `drive0`, live-jobs=on) for a long while; QMP on `qmp`.
fn guest(disk: &TempDisk, qmp: &Path) -> VmConfig {
    testguest(
        "blk=random blk.ops=2000000 blk.qd=8 blk.timeout=300 idle",
        &[disk.option("id=vda,node-name=drive0,live-jobs=on")],
        Some(qmp),
    )
}

/// Stops the guest, copies the disk as the reference, starts a backup
/// with `sync` into a fresh target (at 4 MiB/s, so that the guest writes
/// into ranges not copied yet) and lets the guest run on; the reference.
fn start_backup(qmp: &mut Qmp, disk: &TempDisk, target: &TempDisk, sync: &str) -> Vec<u8> {
    qmp.ok("stop", json!({}));
    let reference = std::fs::read(&disk.path).unwrap();
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tgt", "filename": target.path}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "job0", "device": "drive0", "target": "tgt", "sync": sync, "speed": 4 << 20}),
    );
    // Hosted by the dataplane, which keeps its lease while paused.
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let drive0 = node(&nodes, "drive0");
    assert_eq!(drive0["in-use-by"], "virtio-blk dataplane of device 'vda'");
    assert_eq!(drive0["hosted"], json!(["block job 'job0'"]), "{drive0}");
    qmp.ok("cont", json!({}));
    reference
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_full_backup_on_a_running_guest_holds_the_disk_as_it_was_at_the_start() {
    let disk = TempDisk::patterned("live-full-src", DISK);
    let target = TempDisk::new("live-full-dst", DISK);
    let path = temp_path("live-full.qmp");
    let vm = boot(&guest(&disk, &path));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    let reference = start_backup(&mut qmp, &disk, &target, "full");
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(120), |d| {
        d["device"] == "job0"
    });
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], DISK);
    assert_eq!(
        qmp.ok("query-status", json!({}))["status"],
        "running",
        "the guest ran through the whole backup"
    );
    let copy = std::fs::read(&target.path).unwrap();
    assert!(
        copy == reference,
        "the target is the disk as the job found it"
    );
    let now = std::fs::read(&disk.path).unwrap();
    assert!(now != reference, "the guest wrote meanwhile");
    // The job is gone; the guest's writes go on without a hook.
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    assert!(node(&nodes, "drive0").get("hosted").is_none());
    qmp.ok("quit", json!({}));
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sync_none_copies_what_the_running_guest_overwrites_until_cancelled() {
    let disk = TempDisk::patterned("live-none-src", DISK);
    let target = TempDisk::new("live-none-dst", DISK);
    let path = temp_path("live-none.qmp");
    let vm = boot(&guest(&disk, &path));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    let reference = start_backup(&mut qmp, &disk, &target, "none");
    std::thread::sleep(Duration::from_secs(3));
    // Paused first: every write that landed was copied before it did
    // (stopping waits for held writes), and none lands after.
    qmp.ok("stop", json!({}));
    qmp.ok("job-cancel", json!({"id": "job0"}));
    qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(30), |d| {
        d["device"] == "job0"
    });
    let copy = std::fs::read(&target.path).unwrap();
    let now = std::fs::read(&disk.path).unwrap();
    let mut copied = 0;
    for (g, (c, r)) in copy
        .chunks(GRANULE)
        .zip(reference.chunks(GRANULE))
        .enumerate()
    {
        if c.iter().any(|&b| b != 0) {
            assert!(
                c == r,
                "granule {g} of the target is not the disk as it was"
            );
            copied += 1;
        }
    }
    let changed = now
        .chunks(GRANULE)
        .zip(reference.chunks(GRANULE))
        .filter(|(n, r)| n != r)
        .count();
    assert!(changed > 0, "the guest wrote meanwhile");
    assert!(
        copied >= changed,
        "every granule the guest changed was copied first ({copied} copied, {changed} changed)"
    );
    qmp.ok("cont", json!({}));
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");
    qmp.ok("quit", json!({}));
    vm.wait();
}

/// The `vmm` binary (whose main thread runs under its seccomp filter, as
/// the library's caller's thread does not) with a live-jobs disk: paused
/// and resumed, paused again and quit, it ends with 0 and says nothing.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_binary_pauses_resumes_and_quits_with_a_live_jobs_disk() {
    let disk = TempDisk::patterned("live-bin", DISK);
    let path = temp_path("live-bin.qmp");
    let guest = tests::image("testguest");
    let child = std::process::Command::new(tests::vmm_binary())
        .args(["--kernel", guest.to_str().unwrap(), "--memory", "64M"])
        .args([
            "--disk",
            &disk.option("id=vda,node-name=drive0,live-jobs=on"),
        ])
        .args(["--qmp", path.to_str().unwrap()])
        .args([
            "--cmdline",
            "blk=random blk.ops=200000 blk.qd=4 blk.timeout=300 idle",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut qmp = Qmp::connect(&path);
    std::thread::sleep(Duration::from_millis(300));
    qmp.ok("stop", json!({}));
    qmp.ok("cont", json!({}));
    std::thread::sleep(Duration::from_millis(200));
    qmp.ok("stop", json!({}));
    qmp.ok("quit", json!({}));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("system call"), "{stderr}");
}

/// The guest ends the VM while a live-jobs disk's dataplane runs: the
/// binary's main thread stops it without starting anything new.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_binary_ends_with_the_guest_on_a_live_jobs_disk() {
    let disk = TempDisk::patterned("live-exit", DISK);
    let guest = tests::image("testguest");
    let option = disk.option("id=vda,live-jobs=on");
    let out = tests::run_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "64M",
        "--disk",
        &option,
        "--cmdline",
        "blk=verify blk.bytes=1M exit=0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

/// Guest writes completed so far, from `query-blockstats`.
fn writes(qmp: &mut Qmp) -> u64 {
    qmp.ok("query-blockstats", json!({}))[0]["stats"]["wr_operations"]
        .as_u64()
        .unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_paused_live_backup_does_not_hold_up_the_guest() {
    let disk = TempDisk::patterned("live-pause-src", DISK);
    let target = TempDisk::new("live-pause-dst", DISK);
    let path = temp_path("live-pause.qmp");
    let vm = boot(&guest(&disk, &path));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    let reference = start_backup(&mut qmp, &disk, &target, "full");
    qmp.ok("job-pause", json!({"id": "job0"}));
    std::thread::sleep(Duration::from_millis(300));
    let before = writes(&mut qmp);
    std::thread::sleep(Duration::from_secs(1));
    let after = writes(&mut qmp);
    assert!(
        after > before + 100,
        "the guest kept writing while the job was paused ({before} -> {after})"
    );
    qmp.ok("job-resume", json!({"id": "job0"}));
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(120), |d| {
        d["device"] == "job0"
    });
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], DISK);
    let copy = std::fs::read(&target.path).unwrap();
    assert!(
        copy == reference,
        "the target is the disk as the job found it"
    );
    qmp.ok("quit", json!({}));
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn an_incremental_backup_of_a_running_guest_adds_up_with_the_full_one() {
    let disk = TempDisk::patterned("live-inc-src", DISK);
    let full = TempDisk::new("live-inc-full", DISK);
    let overlay = temp_path("live-inc.qcow2");
    let path = temp_path("live-inc.qmp");
    let vm = boot(&guest(&disk, &path));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    // A full backup and a bitmap from the same moment.
    qmp.ok("stop", json!({}));
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "drive0", "name": "b0"}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "full", "filename": full.path}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "j1", "device": "drive0", "target": "full", "sync": "full"}),
    );
    qmp.ok("cont", json!({}));
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |d| {
        d["device"] == "j1"
    });
    assert!(done["data"].get("error").is_none(), "{done}");
    qmp.ok("blockdev-del", json!({"node-name": "full"}));
    std::thread::sleep(Duration::from_millis(500));

    // The incremental one, started at a stop for a reference, runs while
    // the guest writes on (at 4 MiB/s, so writes meet it).
    qmp.ok("stop", json!({}));
    let reference = std::fs::read(&disk.path).unwrap();
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&full.path)
        .arg(&overlay)
        .status()
        .expect("qemu-img runs (scripts/test.sh installs qemu-utils)");
    assert!(status.success());
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "inc",
               "file": {"driver": "file", "filename": overlay}}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "j2", "device": "drive0", "target": "inc",
               "sync": "incremental", "bitmap": "b0", "speed": 4 << 20}),
    );
    qmp.ok("cont", json!({}));
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(120), |d| {
        d["device"] == "j2"
    });
    assert!(done["data"].get("error").is_none(), "{done}");
    qmp.ok("blockdev-del", json!({"node-name": "inc"}));
    let raw = temp_path("live-inc.raw");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&overlay)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(status.success());
    let sum = std::fs::read(&raw).unwrap();
    assert!(
        sum == reference,
        "the full backup plus the incremental one is the disk at the incremental's start"
    );
    let now = std::fs::read(&disk.path).unwrap();
    assert!(
        now != reference,
        "the guest wrote during the incremental backup"
    );
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&overlay);
    qmp.ok("quit", json!({}));
    vm.wait();
}
