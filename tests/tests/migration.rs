//! Live migration between two `vmm` processes and snapshot/restore, with
//! the test guest in the middle of a workload whose reads check what it
//! wrote before and after the move (from the RAM that moved).
//!
//! The source runs in this process (its QMP and serial log at hand); each
//! destination is a `vmm` process, whose exit status is the guest's.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{boot, expect_line, fnv1a64_file, testguest, vmm_binary, TempDir};
use vmm::VmHandle;

const DISK: u64 = 16 << 20;
/// About five seconds of random I/O here, then the disk's checksum.
const WORKLOAD: &str = "blk=random,checksum blk.ops=600000 blk.qd=8";
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sparse(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(DISK).unwrap();
}

/// A destination `vmm --incoming URI` with `disk` options; output piped.
fn destination(incoming: &str, disk: &str) -> Child {
    Command::new(vmm_binary())
        .args(["--incoming", incoming, "--memory", "128M", "--disk", disk])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination vmm")
}

/// Waits until `dest` listens at `uri` (without connecting: it takes one
/// connection only); a destination that ends first is reported with what
/// it said.
fn wait_listening(dest: &mut Child, uri: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let listening = || match uri.strip_prefix("unix:") {
        Some(path) => Path::new(path).exists(),
        None => {
            let port = uri.rsplit(':').next().unwrap().parse::<u16>().unwrap();
            let needle = format!(":{port:04X} 00000000:0000 0A");
            std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&needle))
        }
    };
    while !listening() {
        if dest.try_wait().unwrap().is_some() || Instant::now() >= deadline {
            let _ = dest.kill();
            let mut stderr = String::new();
            let _ = dest.stderr.take().unwrap().read_to_string(&mut stderr);
            panic!("the destination never listened at {uri}; its stderr: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How a destination ended: its status and output.
struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn wait(mut child: Child) -> Ended {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = String::new();
            let mut stderr = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut stdout)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return Ended {
                code: status.code(),
                stdout,
                stderr,
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the destination did not end within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's `testguest: blk checksum vda: fnv1a64=...` value.
fn checksum(out: &str) -> &str {
    let at = out
        .find("testguest: blk checksum vda: fnv1a64=")
        .unwrap_or_else(|| panic!("no checksum line in:\n{out}"));
    &out[at + 37..at + 53]
}

/// Checks a destination ran the rest of the workload: every read matched
/// what the guest wrote (before and after the move), the checksum it
/// printed is the disk's, and its status is the guest's.
fn assert_finished(ended: &Ended, disk: &Path) {
    assert_eq!(
        ended.code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        ended.stdout,
        ended.stderr
    );
    assert!(
        ended.stdout.contains("testguest: blk random vda: ok"),
        "{}",
        ended.stdout
    );
    assert!(
        ended.stdout.contains("testguest: exit=0"),
        "{}",
        ended.stdout
    );
    assert_eq!(checksum(&ended.stdout), fnv1a64_file(disk));
}

/// Starts the source guest with `disk_options` and waits until its
/// workload runs.
fn source(dir: &TempDir, disk_options: &str) -> (VmHandle, Qmp) {
    let qmp = dir.file("src.qmp");
    let vm = boot(&testguest(
        WORKLOAD,
        &[disk_options.to_string()],
        Some(&qmp),
    ));
    let mut qmp = Qmp::connect(&qmp);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));
    // Into the workload: the guest has written blocks it will read back.
    std::thread::sleep(Duration::from_millis(300));
    qmp.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    (vm, qmp)
}

/// Waits for `query-migrate` to say completed or failed; the reply.
fn wait_migration(qmp: &mut Qmp) -> Value {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let info = qmp.ok("query-migrate", json!({}));
        if info["status"] == "completed" || info["status"] == "failed" {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn statuses(qmp: &Qmp) -> Vec<String> {
    qmp.history
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_busy_guest_moves_over_a_unix_socket_on_shared_storage() {
    let dir = TempDir::new("mig-unix");
    let disk = dir.file("disk.img");
    sparse(&disk);
    let (vm, mut qmp) = source(&dir, &format!("path={},id=vda", s(&disk)));
    let sock = dir.file("mig.sock");
    let mut dest = destination(&format!("unix:{}", s(&sock)), &format!("path={}", s(&disk)));
    wait_listening(&mut dest, &format!("unix:{}", s(&sock)));
    qmp.ok("migrate", json!({"uri": format!("unix:{}", s(&sock))}));
    let info = wait_migration(&mut qmp);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["ram"]["transferred"].as_u64().unwrap() > 0, "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap() >= 2,
        "{info}"
    );
    assert!(info.get("downtime").is_some(), "{info}");
    assert!(info.get("disk").is_none(), "no disk was copied: {info}");
    let status = qmp.ok("query-status", json!({}));
    assert_eq!(status["status"], "postmigrate");
    // While the destination runs it holds the image: `cont` is refused,
    // naming the lock, and the source stays stopped.
    let err = qmp.err("cont", json!({}));
    assert!(
        err.desc.contains("lock") && err.desc.contains(s(&disk)),
        "{}",
        err.desc
    );
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "postmigrate");
    let ended = wait(dest);
    assert_finished(&ended, &disk);
    let seen = statuses(&qmp);
    assert_eq!(seen, ["setup", "active", "completed"], "{seen:?}");
    assert!(qmp.history.iter().any(|e| e["event"] == "MIGRATION_PASS"));
    qmp.ok("quit", json!({}));
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn block_migration_over_tcp_copies_a_running_guests_disk_hosted_by_its_dataplane() {
    let dir = TempDir::new("mig-tcp-block");
    let (src_disk, dst_disk) = (dir.file("src.img"), dir.file("dst.img"));
    sparse(&src_disk);
    sparse(&dst_disk);
    let (vm, mut qmp) = source(
        &dir,
        &format!("path={},id=vda,node-name=drive0,live-jobs=on", s(&src_disk)),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dest = destination(&uri, &format!("path={}", s(&dst_disk)));
    wait_listening(&mut dest, &uri);
    qmp.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "block", "state": true}]}),
    );
    qmp.ok("migrate", json!({"uri": uri}));
    let info = wait_migration(&mut qmp);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(info["disk"]["total"], DISK, "{info}");
    assert_eq!(info["disk"]["remaining"], 0, "{info}");
    assert!(
        info["disk"]["transferred"].as_u64().unwrap() >= DISK,
        "{info}"
    );
    let ended = wait(dest);
    assert_finished(&ended, &dst_disk);
    qmp.ok("quit", json!({}));
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn block_migration_is_refused_by_a_serving_dataplane_and_runs_once_the_guest_is_stopped() {
    let dir = TempDir::new("mig-offline");
    let (src_disk, dst_disk) = (dir.file("src.img"), dir.file("dst.img"));
    sparse(&src_disk);
    sparse(&dst_disk);
    let (vm, mut qmp) = source(
        &dir,
        &format!("path={},id=vda,node-name=drive0", s(&src_disk)),
    );
    qmp.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "block", "state": true}]}),
    );
    let sock = dir.file("mig.sock");
    let uri = format!("unix:{}", s(&sock));
    // live-jobs=off: the dataplane refuses; nothing starts.
    let err = qmp.err("migrate", json!({"uri": uri}));
    assert_eq!(
        err.desc,
        "Node 'drive0' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    assert_eq!(qmp.ok("query-migrate", json!({})), json!({}));
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");
    assert!(statuses(&qmp).is_empty());
    // Offline: stopped, the disk is free to copy.
    let mut dest = destination(&uri, &format!("path={}", s(&dst_disk)));
    wait_listening(&mut dest, &uri);
    qmp.ok("stop", json!({}));
    // A job on the disk cannot hand it over at switchover: refused first.
    let target = dir.file("backup.img");
    sparse(&target);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tgt", "filename": target}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "job0", "device": "drive0", "target": "tgt", "sync": "full", "speed": 1024}),
    );
    let err = qmp.err("migrate", json!({"uri": uri}));
    assert_eq!(
        err.desc,
        "Node 'drive0' of device 'vda' is in use by block job 'job0': finish or cancel it before migrating"
    );
    qmp.ok("job-cancel", json!({"id": "job0"}));
    qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(30), |d| {
        d["device"] == "job0"
    });
    qmp.ok("migrate", json!({"uri": uri}));
    let info = wait_migration(&mut qmp);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(info["disk"]["transferred"], DISK, "{info}");
    let ended = wait(dest);
    assert_finished(&ended, &dst_disk);
    // The source's own image was never handed over: it may run on.
    qmp.ok("cont", json!({}));
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");
    qmp.ok("quit", json!({}));
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_snapshot_taken_mid_workload_restores_twice_and_saves_again_the_same() {
    let dir = TempDir::new("mig-snapshot");
    let disk = dir.file("disk.img");
    sparse(&disk);
    let (vm, mut qmp) = source(&dir, &format!("path={},id=vda", s(&disk)));
    // A state file over the guest's own disk is refused, the disk untouched.
    let err = qmp.err("migrate", json!({"uri": format!("file:{}", s(&disk))}));
    assert!(
        err.desc.contains("is an image this VM has open")
            && err.desc.contains("would overwrite it"),
        "{}",
        err.desc
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), DISK);
    assert_eq!(qmp.ok("query-migrate", json!({})), json!({}));
    let state = dir.file("vm.state");
    qmp.ok("migrate", json!({"uri": format!("file:{}", s(&state))}));
    let info = wait_migration(&mut qmp);
    assert_eq!(info["status"], "completed", "{info}");
    // The disk as the snapshot left it, twice.
    let copies = [dir.file("copy1.img"), dir.file("copy2.img")];
    for c in &copies {
        std::fs::copy(&disk, c).unwrap();
    }
    qmp.ok("quit", json!({}));
    vm.wait();
    let incoming = format!("file:{}", s(&state));
    let restored: Vec<Child> = copies
        .iter()
        .map(|c| destination(&incoming, &format!("path={}", s(c))))
        .collect();
    for (child, copy) in restored.into_iter().zip(&copies) {
        assert_finished(&wait(child), copy);
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn restoring_a_snapshot_then_saving_it_gives_the_same_device_and_vcpu_state() {
    let dir = TempDir::new("mig-stable");
    let disk = dir.file("disk.img");
    sparse(&disk);
    // A guest that set its device up, then halts: nothing of its own changes.
    let qmp_path = dir.file("src.qmp");
    let vm = boot(&testguest(
        "blk=verify blk.bytes=64K idle",
        &[format!("path={},id=vda", s(&disk))],
        Some(&qmp_path),
    ));
    let mut qmp = Qmp::connect(&qmp_path);
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));
    let first = dir.file("first.state");
    qmp.ok("migrate", json!({"uri": format!("file:{}", s(&first))}));
    assert_eq!(wait_migration(&mut qmp)["status"], "completed");
    qmp.ok("quit", json!({}));
    vm.wait();

    let qmp2 = dir.file("restored.qmp");
    let mut restored = Command::new(vmm_binary())
        .args([
            "--incoming",
            &format!("file:{}", s(&first)),
            "--memory",
            "128M",
        ])
        .args(["--disk", &format!("path={}", s(&disk)), "--qmp", s(&qmp2)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut qmp = Qmp::connect(&qmp2);
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");
    let second = dir.file("second.state");
    qmp.ok("migrate", json!({"uri": format!("file:{}", s(&second))}));
    assert_eq!(wait_migration(&mut qmp)["status"], "completed");
    qmp.ok("quit", json!({}));
    restored.wait().unwrap();
    let diffs = vmm::migration::inspect::state_differences(&first, &second).unwrap();
    assert!(diffs.is_empty(), "differences: {diffs:?}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vm_with_a_pit_restores_only_into_a_vm_with_one() {
    let dir = TempDir::new("mig-pit");
    let disk = dir.file("disk.img");
    sparse(&disk);
    let qmp_path = dir.file("src.qmp");
    let mut config = testguest(
        WORKLOAD,
        &[format!("path={},id=vda", s(&disk))],
        Some(&qmp_path),
    );
    config.pit = true;
    let vm = boot(&config);
    let mut qmp = Qmp::connect(&qmp_path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    qmp.ok("stop", json!({}));
    let state = dir.file("vm.state");
    qmp.ok("migrate", json!({"uri": format!("file:{}", s(&state))}));
    assert_eq!(wait_migration(&mut qmp)["status"], "completed");
    qmp.ok("quit", json!({}));
    vm.wait();
    let incoming = format!("file:{}", s(&state));
    let disk_opt = format!("path={}", s(&disk));
    // Without a PIT here: refused, naming it, before any guest runs.
    let refused = wait(destination(&incoming, &disk_opt));
    assert_ne!(refused.code, Some(0));
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("the source has a PIT, this VM no PIT"),
        "{}",
        refused.stderr
    );
    assert!(!refused.stdout.contains("testguest:"), "{}", refused.stdout);
    // With one: the guest finishes from where it was.
    let child = Command::new(vmm_binary())
        .args([
            "--incoming",
            &incoming,
            "--memory",
            "128M",
            "--pit",
            "on",
            "--disk",
            &disk_opt,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_finished(&wait(child), &disk);
}
