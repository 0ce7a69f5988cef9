//! Every thread of a running `vmm` is under a seccomp filter unless
//! `--seccomp=off` says otherwise (`Seccomp: 2` in
//! `/proc/PID/task/*/status`), with a guest doing I/O through its
//! dataplane and a backup job's thread alive. The same runs pin the vCPU
//! and dataplane threads (`--vcpu-affinity`, `dataplane-cpus=`), which
//! they do before their filters go in: each must run where it was told
//! (`Cpus_allowed_list`), in every mode.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tests::qmp::Qmp;
use tests::{image, temp_path, vmm_binary, TempDisk};

const DISK: u64 = 16 << 20;

/// Each thread's name and its `Seccomp:` mode.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    thread_fields(pid, "Seccomp:")
}

/// Each thread's name and the value of its status line `field`.
fn thread_fields(pid: u32, field: &str) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let read = |file: &str| std::fs::read_to_string(task.path().join(file));
        // A thread may end between the listing and the read.
        let (Ok(comm), Ok(status)) = (read("comm"), read("status")) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        modes.push((comm.trim().to_string(), mode));
    }
    modes
}

/// Waits until threads named `prefixes` all exist; their modes then.
fn wait_for_threads(pid: u32, prefixes: &[&str]) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let modes = thread_modes(pid);
        if prefixes
            .iter()
            .all(|p| modes.iter().any(|(name, _)| name.starts_with(p)))
        {
            return modes;
        }
        assert!(
            Instant::now() < deadline,
            "threads {prefixes:?} not all up: {modes:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The host CPUs the threads are pinned to: the lowest and the highest
/// this process may use (the same one on a 1-CPU host).
fn pins() -> (String, String) {
    let allowed: Vec<String> = thread_fields(std::process::id(), "Cpus_allowed_list:")
        .into_iter()
        .map(|(_, cpus)| cpus)
        .collect();
    let list = base::cpus::CpuList::parse(&allowed[0], ',').unwrap();
    let first = list.iter().next().unwrap();
    let last = list.iter().last().unwrap();
    (first.to_string(), last.to_string())
}

/// Starts the binary with a guest doing I/O on `vda` and QMP on `socket`;
/// vCPU 0 and the dataplane pinned to the first CPU of [`pins`], vCPU 1
/// to the last.
fn start(disk: &TempDisk, socket: &Path, seccomp: &str) -> (Child, Qmp) {
    let kernel = image("testguest");
    let (first, last) = pins();
    let child = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--cpus", "2", "--disk"])
        .arg(disk.option(&format!("id=vda,node-name=drive0,dataplane-cpus={first}")))
        .args([
            "--vcpu-affinity",
            &first,
            "--vcpu-affinity",
            &format!("1={last}"),
        ])
        .arg("--qmp")
        .arg(socket)
        .args([
            "--cmdline",
            "blk=random blk.ops=300000 blk.qd=8 blk.timeout=300 idle",
        ])
        .arg(format!("--seccomp={seccomp}"))
        // A pipe kept open, so the serial input thread stays up.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Waits for the socket to appear.
    (child, Qmp::connect(socket))
}

/// The modes of every thread of a VMM run with `--seccomp=MODE`, taken
/// while the guest does I/O and a (slow) backup job runs.
fn modes_under(mode: &str) -> Vec<(String, String)> {
    let disk = TempDisk::new(&format!("seccomp-{mode}"), DISK);
    let source = TempDisk::patterned(&format!("seccomp-src-{mode}"), DISK);
    let socket = temp_path(&format!("seccomp-{mode}.qmp"));
    let (child, mut qmp) = start(&disk, &socket, mode);
    // The guest's driver starts the dataplane; a backup of another file
    // into a null node runs beside it, slowly, on its own thread.
    wait_for_threads(child.id(), &["blk-vda"]);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "src", "filename": source.path}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "nul", "size": DISK}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "job0", "device": "src", "target": "nul", "sync": "full", "speed": 1 << 20}),
    );
    // The NBD server's listener and a client's thread, in its handshake.
    let nbd = temp_path(&format!("seccomp-{mode}.nbd"));
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd.display().to_string()}}}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "exp", "size": DISK}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "exp"}),
    );
    let _client = std::os::unix::net::UnixStream::connect(&nbd).unwrap();
    let mut threads = vec![
        "nbd-server",
        "nbd-client",
        "vmm",
        "vcpu0",
        "vcpu1",
        "qmp",
        "serial-input",
        "blk-vda",
        "job-job0",
    ];
    if mode != "off" {
        // The thread that starts the others, so that filters do not stack.
        threads.push("spawner");
    }
    let modes = wait_for_threads(child.id(), &threads);
    let (first, last) = pins();
    let cpus = thread_fields(child.id(), "Cpus_allowed_list:");
    let of = |name: &str| {
        cpus.iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.as_str())
    };
    assert_eq!(
        (of("vcpu0"), of("vcpu1"), of("blk-vda")),
        (
            Some(first.as_str()),
            Some(last.as_str()),
            Some(first.as_str())
        ),
        "--seccomp={mode}: {cpus:?}"
    );
    // Threads nobody pinned keep the whole set.
    assert_eq!(of("qmp"), of("vmm"), "--seccomp={mode}: {cpus:?}");
    qmp.ok("job-cancel", json!({"id": "job0"}));
    qmp.ok("quit", json!({}));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    modes
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn every_thread_is_filtered_by_default_and_in_log_mode() {
    for mode in ["on", "log"] {
        let modes = modes_under(mode);
        let unfiltered: Vec<_> = modes.iter().filter(|(_, m)| m != "2").collect();
        assert!(
            unfiltered.is_empty(),
            "--seccomp={mode}: {unfiltered:?} of {modes:?}"
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn seccomp_off_leaves_every_thread_unfiltered() {
    let modes = modes_under("off");
    let filtered: Vec<_> = modes.iter().filter(|(_, m)| m != "0").collect();
    assert!(filtered.is_empty(), "{filtered:?} of {modes:?}");
}
