//! The block graph, its leases and the backup job, driven over QMP with a
//! real guest doing verified I/O on the disk the whole time.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tests::qmp::Qmp;
use tests::{boot, expect_line, fnv1a64_file, node_named as node, temp_path, testguest, TempDisk};
use vmm::{VmConfig, VmExit};

const DISK: u64 = 16 << 20;

/// A test guest writing and verifying random blocks on `vda` (node
/// `drive0`) for a few seconds, then idling; QMP on `qmp`.
fn guest(disk: &TempDisk, qmp: &Path) -> VmConfig {
    // Requests may wait out the pauses below: give them time.
    testguest(
        "blk=random blk.ops=300000 blk.qd=8 blk.timeout=300 idle",
        &[disk.option("id=vda,node-name=drive0")],
        Some(qmp),
    )
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn backup_refused_while_dataplane_holds_lease_then_copies_the_stopped_disk() {
    let disk = TempDisk::patterned("backup-src", DISK);
    let target = TempDisk::new("backup-dst", DISK);
    let path = temp_path("backup.qmp");
    let vm = boot(&guest(&disk, &path));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    // The dataplane holds the lease while the guest runs.
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");
    let block = qmp.ok("query-block", json!({}));
    assert_eq!(block[0]["device"], "vda");
    let inserted = &block[0]["inserted"];
    assert_eq!(inserted["node-name"], "drive0");
    assert_eq!(inserted["drv"], "raw");
    assert_eq!(
        inserted["in-use-by"],
        "virtio-blk dataplane of device 'vda'"
    );
    let refs = inserted["references"].to_string();
    assert!(refs.contains("virtio-blk device 'vda'"), "{refs}");
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tgt", "filename": target.path}),
    );
    let backup = json!({"job-id": "job0", "device": "drive0", "target": "tgt", "sync": "full"});
    let err = qmp.err("blockdev-backup", backup.clone());
    assert_eq!(err.class, "GenericError");
    assert_eq!(
        err.desc,
        "Node 'drive0' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    assert_eq!(
        qmp.ok("query-jobs", json!({})),
        json!([]),
        "refused at once"
    );
    let err = qmp.err("blockdev-del", json!({"node-name": "drive0"}));
    assert_eq!(
        err.desc,
        "Node 'drive0' is in use by virtio-blk device 'vda', virtio-blk dataplane of device 'vda'"
    );

    // Stopped, the dataplane has drained and let go.
    qmp.ok("stop", json!({}));
    qmp.wait_event("STOP", Duration::from_secs(5), |_| true);
    assert_eq!(
        qmp.ok("query-status", json!({})),
        json!({"running": false, "status": "paused"})
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    assert!(node(&nodes, "drive0").get("in-use-by").is_none(), "{nodes}");
    let frozen = fnv1a64_file(&disk.path);

    // 16 MiB at 8 MiB/s: long enough to try `cont` meanwhile.
    let mut slow = backup.clone();
    slow["speed"] = json!(8 << 20);
    qmp.ok("blockdev-backup", slow);
    let err = qmp.err("cont", json!({}));
    assert_eq!(err.class, "GenericError");
    assert_eq!(
        err.desc,
        "Node 'drive0' is busy: block device is in use by block job 'job0'"
    );
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "paused");
    let err = qmp.err("blockdev-del", json!({"node-name": "tgt"}));
    assert!(err.desc.contains("block job 'job0'"), "{}", err.desc);
    let jobs = qmp.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["id"], "job0");
    assert_eq!(jobs[0]["type"], "backup");
    assert_eq!(jobs[0]["total-progress"], DISK);

    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |d| {
        d["device"] == "job0"
    });
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], DISK);
    qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(5), |d| {
        d["id"] == "job0" && d["status"] == "null"
    });
    // QEMU's sequence, down to the pause of its drained start.
    assert_eq!(
        qmp.job_statuses("job0"),
        [
            "created",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    assert_eq!(fnv1a64_file(&target.path), frozen, "target equals source");
    assert_eq!(fnv1a64_file(&disk.path), frozen, "source untouched");

    // A cancelled backup leaves the source as it was, too.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink", "size": DISK}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "job1", "device": "drive0", "target": "sink", "sync": "full", "speed": 1 << 20}),
    );
    qmp.ok("job-cancel", json!({"id": "job1"}));
    let cancelled = qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(30), |d| {
        d["device"] == "job1"
    });
    assert!(cancelled["data"]["offset"].as_u64().unwrap() < DISK);
    qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(5), |d| {
        d["id"] == "job1" && d["status"] == "null"
    });
    assert_eq!(
        fnv1a64_file(&disk.path),
        frozen,
        "source untouched by the cancel"
    );

    // The job is over: cont takes the lease back and the guest's I/O,
    // checked by the guest itself, carries on.
    qmp.ok("cont", json!({}));
    qmp.wait_event("RESUME", Duration::from_secs(5), |_| true);
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    assert_eq!(
        node(&nodes, "drive0")["in-use-by"],
        "virtio-blk dataplane of device 'vda'"
    );
    qmp.ok("blockdev-del", json!({"node-name": "tgt"}));
    qmp.ok("blockdev-del", json!({"node-name": "sink"}));
    let line = expect_line(&vm, "testguest: blk random vda:", Duration::from_secs(120));
    assert!(line.contains(": ok"), "{line}");
    expect_line(&vm, "testguest: idle", Duration::from_secs(10));

    qmp.ok("quit", json!({}));
    let shutdown = qmp.wait_event("SHUTDOWN", Duration::from_secs(10), |_| true);
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(vm.wait(), VmExit::Quit);
    assert!(!path.exists(), "the socket is removed when the VM ends");
}
