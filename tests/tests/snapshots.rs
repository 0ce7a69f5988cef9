//! External snapshots on a running VM, over QMP: refused while the guest
//! runs (naming the dataplane), done after `stop`, the device moved to the
//! overlay and the old image left with one writer no more.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::qmp::Qmp;
use tests::{boot, expect_line, fnv1a64_file, temp_path, testguest, TempDisk};

const DISK: u64 = 16 << 20;

/// `qemu-img ARGS`, which must succeed.
fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed (Debian: qemu-utils; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `qemu-img convert`, a reader that lets nobody write, may open
/// `path` now.
fn others_may_read(path: &Path) -> bool {
    let copy = temp_path("snapshot-copy.img");
    let ok = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(path)
        .arg(&copy)
        .output()
        .expect("qemu-img")
        .status
        .success();
    let _ = std::fs::remove_file(copy);
    ok
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_snapshot_waits_for_stop_then_moves_the_device_to_the_overlay() {
    let disk = TempDisk::patterned("snapshot-base", DISK);
    let overlay = temp_path("snapshot-over.qcow2");
    let _ = std::fs::remove_file(&overlay);
    let base = disk.path.display().to_string();
    let over = overlay.display().to_string();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &over,
    ]);
    let path = temp_path("snapshot.qmp");
    let config = testguest(
        "blk=random blk.ops=300000 blk.qd=8 blk.timeout=300 idle",
        &[disk.option("id=vda,node-name=drive0")],
        Some(&path),
    );
    let vm = boot(&config);
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));
    assert!(
        !others_may_read(&disk.path),
        "the guest's disk has a writer"
    );

    let sync = json!({"device": "vda", "snapshot-file": over, "snapshot-node-name": "s1", "mode": "existing"});
    let err = qmp.err("blockdev-snapshot-sync", sync.clone());
    assert_eq!(
        err.desc,
        "Node 'drive0' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let names: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();
    assert!(
        !names.contains(&json!("s1")),
        "a refused snapshot adds nothing: {names:?}"
    );

    qmp.ok("stop", json!({}));
    qmp.ok("blockdev-snapshot-sync", sync);
    let block = qmp.ok("query-block", json!({}));
    let inserted = &block[0]["inserted"];
    assert_eq!(inserted["node-name"], "s1");
    assert_eq!(inserted["drv"], "qcow2");
    assert_eq!(inserted["backing_file"], json!(base));
    assert_eq!(inserted["backing_file_depth"], 1);
    assert_eq!(inserted["image"]["backing-image"]["filename"], json!(base));
    let refs = inserted["references"].to_string();
    assert!(refs.contains("virtio-blk device 'vda'"), "{refs}");
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let drive0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "drive0")
        .unwrap();
    assert_eq!(drive0["ro"], true);
    assert!(drive0["references"]
        .to_string()
        .contains("node 's1' (as its 'backing' child)"));
    // The old image has one writer no more: the overlay took its writes.
    assert!(others_may_read(&disk.path));

    // A second one, the overlay created here (`absolute-paths`) over the
    // first, which becomes read-only in turn.
    let second = temp_path("snapshot-second.qcow2");
    let _ = std::fs::remove_file(&second);
    let second_path = second.display().to_string();
    qmp.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "s1", "snapshot-file": second_path, "snapshot-node-name": "s2"}),
    );
    let block = qmp.ok("query-block", json!({}));
    let inserted = &block[0]["inserted"];
    assert_eq!(inserted["node-name"], "s2");
    assert_eq!(inserted["backing_file_depth"], 2);
    assert_eq!(inserted["image"]["backing-filename"], json!(over));
    assert_eq!(inserted["image"]["backing-filename-format"], "qcow2");

    // `cont` serves the guest from the overlay: its verified random I/O
    // goes on there, and the old images stay as they were.
    let at_snapshot = fnv1a64_file(&disk.path);
    let first_at_snapshot = fnv1a64_file(&overlay);
    qmp.ok("cont", json!({}));
    let line = expect_line(&vm, "testguest: blk random vda", Duration::from_secs(300));
    assert!(line.contains(": ok"), "{line}");
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));
    let block = qmp.ok("query-block", json!({}));
    assert_eq!(
        block[0]["inserted"]["in-use-by"],
        "virtio-blk dataplane of device 'vda'"
    );
    qmp.ok("quit", json!({}));
    vm.wait();
    assert_eq!(
        fnv1a64_file(&disk.path),
        at_snapshot,
        "the base was written"
    );
    assert_eq!(
        fnv1a64_file(&overlay),
        first_at_snapshot,
        "the first overlay was written"
    );
    qemu_img(&["check", "-q", &over]);
    qemu_img(&["check", "-q", &second_path]);
    let _ = std::fs::remove_file(&overlay);
    let _ = std::fs::remove_file(&second);
}
