//! Dirty bitmaps with a real guest writing: a full backup and a bitmap
//! made at one stop, an incremental backup at the next, and the full plus
//! the incremental must be the disk, byte for byte, with the incremental
//! holding exactly what the guest changed in between.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tests::images::qemu_img;
use tests::qmp::Qmp;
use tests::{boot, expect_line, temp_path, testguest, TempDisk};
use vmm::VmExit;

const DISK: u64 = 16 << 20;
const GRANULE: u64 = 64 << 10;

/// The granules of 64 KiB where `a` and `b` differ.
fn changed_granules(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(GRANULE as usize)
        .zip(b.chunks(GRANULE as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

fn bitmaps(qmp: &mut Qmp) -> Value {
    let block = qmp.ok("query-block", json!({}));
    block[0]["inserted"]["dirty-bitmaps"].clone()
}

/// Runs `args` as a backup job to its end; its BLOCK_JOB_COMPLETED data.
fn backup(qmp: &mut Qmp, args: Value) -> Value {
    let id = args["job-id"].clone();
    qmp.ok("blockdev-backup", args);
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |d| {
        d["device"] == id
    });
    assert!(done["data"].get("error").is_none(), "{done}");
    qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(5), |d| {
        d["id"] == id && d["status"] == "null"
    });
    done["data"].clone()
}

fn stop(qmp: &mut Qmp) {
    qmp.ok("stop", json!({}));
    qmp.wait_event("STOP", Duration::from_secs(5), |_| true);
}

/// The allocated bytes of the top layer of qcow2 image `path`.
fn top_layer_bytes(path: &Path) -> u64 {
    let map: Value = serde_json::from_str(&qemu_img(&[
        "map",
        "--output=json",
        &path.display().to_string(),
    ]))
    .unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn full_then_incremental_backup_of_a_guest_writing_equals_the_disk() {
    let disk = TempDisk::patterned("bitmap-src", DISK);
    let full = TempDisk::new("bitmap-full", DISK);
    let inc = temp_path("bitmap-inc.qcow2");
    let path = temp_path("bitmap.qmp");
    let vm = boot(&testguest(
        // Only the first 4 MiB: the rest must stay out of the incremental.
        "blk=random blk.bytes=4M blk.ops=10000000 blk.qd=8 blk.timeout=300 idle",
        &[disk.option("id=vda,node-name=drive0")],
        Some(&path),
    ));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));
    // Let the guest write a while first, so the full backup is not the
    // pattern the disk started with.
    std::thread::sleep(Duration::from_millis(500));

    // First stop: a bitmap and a full backup of the same moment.
    stop(&mut qmp);
    assert_eq!(bitmaps(&mut qmp), Value::Null, "no bitmaps, no field");
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "drive0", "name": "b0"}),
    );
    assert_eq!(
        bitmaps(&mut qmp),
        json!([{"name": "b0", "count": 0, "granularity": GRANULE, "recording": true, "busy": false, "persistent": false}])
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "full", "file": {"driver": "file", "filename": full.path}}),
    );
    let done = backup(
        &mut qmp,
        json!({"job-id": "full0", "device": "drive0", "target": "full", "sync": "full"}),
    );
    assert_eq!(done["len"], DISK);
    qmp.ok("blockdev-del", json!({"node-name": "full"}));
    let before = std::fs::read(&disk.path).unwrap();
    assert_eq!(std::fs::read(&full.path).unwrap(), before);

    // The guest writes on; the dataplane marks what it writes.
    qmp.ok("cont", json!({}));
    qmp.wait_event("RESUME", Duration::from_secs(5), |_| true);
    std::thread::sleep(Duration::from_millis(300));
    stop(&mut qmp);
    let after = std::fs::read(&disk.path).unwrap();
    let changed = changed_granules(&before, &after);
    assert!(!changed.is_empty(), "the guest wrote nothing");
    assert!(changed.iter().all(|&g| g < 64), "{changed:?}");
    eprintln!("the guest changed {} granules of 64 KiB", changed.len());
    let count = bitmaps(&mut qmp)[0]["count"].as_u64().unwrap();
    // Every 4 KiB write is of a new pattern version: each granule written
    // differs, so the count is exactly what changed.
    assert_eq!(
        count,
        changed.len() as u64 * GRANULE,
        "{} granules changed",
        changed.len()
    );

    // Second stop: an incremental backup into an overlay of the full one.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &full.path.display().to_string(),
        "-F",
        "raw",
        &inc.display().to_string(),
    ]);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "inc", "file": {"driver": "file", "filename": inc}}),
    );
    let done = backup(
        &mut qmp,
        json!({"job-id": "inc0", "device": "drive0", "target": "inc", "sync": "incremental", "bitmap": "b0"}),
    );
    assert_eq!(done["len"], count, "the job copies the dirty extents only");
    assert_eq!(done["offset"], count);
    let b0 = &bitmaps(&mut qmp)[0];
    assert_eq!(
        (b0["name"].clone(), b0["count"].clone(), b0["busy"].clone()),
        (json!("b0"), json!(0), json!(false)),
        "on success the bitmap starts afresh"
    );
    qmp.ok("blockdev-del", json!({"node-name": "inc"}));
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &inc.display().to_string(),
        &disk.path.display().to_string(),
    ]);
    assert_eq!(
        top_layer_bytes(&inc),
        count,
        "the overlay holds exactly the dirty granules"
    );

    qmp.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
    let _ = std::fs::remove_file(&inc);
}
