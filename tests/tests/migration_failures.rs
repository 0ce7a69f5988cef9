//! Failed migrations and bad input (issue 12): whatever goes wrong, the
//! source keeps running its guest with its disks as before and says why in
//! `query-migrate`, and a destination that fails exits non-zero with one
//! line, never having started a guest from half a state.
//!
//! Sources are in-process VMs (their guest's output and exit status are at
//! hand); destinations are `vmm` processes, which a test can kill.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{boot, expect_line, fnv1a64_file, second_vmm, testguest, TempDir};
use vmm::{MemorySize, VmExit, VmHandle};

const DISK: u64 = 16 << 20;
const MEMORY: &str = "64M";

/// A `vmm` process, its output collected when it ends.
struct Process(Option<Child>);

/// How a process ended.
struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Process {
    fn spawn(args: &[&str]) -> Self {
        let child = Command::new(tests::vmm_binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the vmm binary");
        Self(Some(child))
    }

    /// `vmm --incoming URI --memory MEMORY --disk DISK`.
    fn incoming(uri: &str, memory: &str, disk: &str) -> Self {
        Self::spawn(&["--incoming", uri, "--memory", memory, "--disk", disk])
    }

    /// A destination waiting at `unix:SOCKET` with `disks`, `memory` and
    /// `extra` options; returns once it listens.
    fn destination(socket: &Path, disks: &[&Path], memory: &str, extra: &[&str]) -> Self {
        let _ = std::fs::remove_file(socket);
        let incoming = format!("unix:{}", socket.display());
        let disk_opts: Vec<String> = disks
            .iter()
            .map(|d| format!("path={}", d.display()))
            .collect();
        let mut args = vec!["--incoming", &incoming, "--memory", memory];
        for d in &disk_opts {
            args.extend(["--disk", d]);
        }
        args.extend(extra);
        let mut p = Self::spawn(&args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if p.running().is_none() {
                let end = p.wait(Duration::from_secs(1));
                panic!("the destination ended before listening: {}", end.stderr);
            }
            assert!(Instant::now() < deadline, "the destination did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    /// Some(pid) while it runs.
    fn running(&mut self) -> Option<u32> {
        let child = self.0.as_mut()?;
        match child.try_wait().unwrap() {
            None => Some(child.id()),
            Some(_) => None,
        }
    }

    /// Waits for the end (killing it after `timeout`, which fails the test).
    fn wait(&mut self, timeout: Duration) -> Ended {
        let mut child = self.0.take().expect("waited once");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "vmm did not end within {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        Ended {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn kill(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Ended {
    /// A failed destination: a non-zero status, exactly one line on
    /// stderr (returned), no panic, and no guest output.
    fn one_line_failure(&self) -> String {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "status {:?}; stderr: {}",
            self.code,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "not one line: {:?}",
            self.stderr
        );
        assert!(
            !self.stdout.contains("testguest:"),
            "a guest ran: {}",
            self.stdout
        );
        self.stderr.trim_end().to_string()
    }

    /// A guest that finished its workload: status 0, `ok` and the
    /// checksum of `disk` on its serial output.
    fn finished_ok(&self, disk: &Path) {
        assert_eq!(self.code, Some(0), "{}{}", self.stdout, self.stderr);
        assert!(
            self.stdout.contains("testguest: blk random vda: ok"),
            "{}",
            self.stdout
        );
        assert!(self.stdout.contains(&fnv1a64_file(disk)), "{}", self.stdout);
    }
}

/// The test guest running a long `blk=random,checksum` workload on `disk`
/// with 64 MiB of RAM and QMP at `qmp`.
fn source(disk: &Path, ops: u32, qmp: &Path) -> (VmHandle, Qmp) {
    let mut config = testguest(
        &format!("blk=random,checksum blk.ops={ops} blk.qd=8"),
        &[format!("path={}", disk.display())],
        Some(qmp),
    );
    config.memory = MemorySize::mib(64);
    let vm = boot(&config);
    let q = Qmp::connect(qmp);
    (vm, q)
}

fn disk(dir: &TempDir, name: &str, len: u64) -> PathBuf {
    let path = dir.file(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(len))
        .unwrap();
    path
}

/// Polls `query-migrate` until its status is one of `statuses`.
fn migration_reaches(q: &mut Qmp, statuses: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = q.ok("query-migrate", json!({}));
        if statuses.iter().any(|s| info["status"] == *s) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "query-migrate did not reach {statuses:?} within {timeout:?}: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The source still runs its guest.
fn still_running(vm: &VmHandle, q: &mut Qmp) {
    assert!(
        vm.exit().is_none(),
        "the source's guest ended: {:?}",
        vm.exit()
    );
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
}

/// `migrate` to `uri` that fails; the `error-desc`.
fn failed_migration(q: &mut Qmp, uri: &str) -> String {
    // QEMU answers `migrate` at once and fails later; either is fine here,
    // as long as the failure is reported.
    let _ = q.execute("migrate", json!({"uri": uri}));
    let info = migration_reaches(q, &["failed"], Duration::from_secs(30));
    info["error-desc"]
        .as_str()
        .unwrap_or_else(|| panic!("no error-desc: {info}"))
        .to_string()
}

/// A second `vmm` writing `disk`, which must be refused: its stderr.
fn second_writer(disk: &Path) -> String {
    let (code, stderr) = second_vmm(disk);
    assert_eq!(code, Some(1), "{stderr}");
    stderr
}

/// A fake destination at `socket` for one source: it answers Ready to the
/// Config frame, reads every frame up to End, then answers an error with
/// `at_end`'s text, or closes without a word. Returns the frame kinds.
fn fake_destination(
    socket: &Path,
    at_end: Option<&'static str>,
) -> std::thread::JoinHandle<Vec<u8>> {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut back = conn.try_clone().unwrap();
        let mut r = std::io::BufReader::new(conn);
        let mut head = [0u8; 12];
        std::io::Read::read_exact(&mut r, &mut head).unwrap();
        let mut kinds = Vec::new();
        let mut payload = Vec::new();
        loop {
            let mut head = [0u8; 9];
            std::io::Read::read_exact(&mut r, &mut head).unwrap();
            let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
            payload.resize(len, 0);
            std::io::Read::read_exact(&mut r, &mut payload).unwrap();
            kinds.push(head[0]);
            match head[0] {
                1 => back.write_all(&[1, 0, 0, 0, 0]).unwrap(),
                8 => break,
                _ => {}
            }
        }
        if let Some(text) = at_end {
            let mut reply = vec![3];
            reply.extend_from_slice(&(text.len() as u32).to_le_bytes());
            reply.extend_from_slice(text.as_bytes());
            back.write_all(&reply).unwrap();
        }
        kinds
    })
}

/// The source's guest ends with its workload done: `ok`, the checksum of
/// the disk, status 0.
fn finishes_ok(vm: VmHandle, disk: &Path) {
    expect_line(
        &vm,
        "testguest: blk random vda: ok",
        Duration::from_secs(120),
    );
    let sum = expect_line(&vm, "testguest: blk checksum vda:", Duration::from_secs(30));
    assert!(sum.contains(&fnv1a64_file(disk)), "{sum}");
    assert_eq!(vm.wait(), VmExit::Status(0));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_running_source_survives_every_failed_migration() {
    let dir = TempDir::new("migfail-source");
    let disk_path = disk(&dir, "disk.img", DISK);
    let (vm, mut q) = source(&disk_path, 450_000, &dir.file("q.sock"));
    let started = Instant::now();

    // Bad input: QEMU's error shape, nothing started.
    let e = q.err("migrate", json!({"uri": "exec:cat"}));
    assert_eq!(e.class, "GenericError");
    assert_eq!(e.desc, "unknown migration protocol: exec:cat");
    let e = q.err("migrate", json!({"uri": "tcp:127.0.0.1"}));
    assert_eq!(e.class, "GenericError");
    assert!(e.desc.contains("tcp:127.0.0.1"), "{}", e.desc);
    let e = q.err("migrate-incoming", json!({"uri": "unix:/nonexistent"}));
    assert_eq!(e.class, "GenericError");
    assert_eq!(e.desc, "'-incoming' was not specified on the command line");
    assert_eq!(q.ok("query-migrate", json!({})), json!({}));

    // A state file that cannot be made.
    let desc = failed_migration(&mut q, "file:/nonexistent/vm.state");
    assert_eq!(
        desc,
        "cannot create the state file: No such file or directory (os error 2)"
    );
    still_running(&vm, &mut q);

    // Nobody listening.
    let nobody = dir.file("nobody.sock");
    let desc = failed_migration(&mut q, &format!("unix:{}", nobody.display()));
    assert!(desc.contains("cannot connect to the destination"), "{desc}");
    assert!(desc.contains("No such file or directory"), "{desc}");
    still_running(&vm, &mut q);
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = refused.local_addr().unwrap().port();
    drop(refused);
    let desc = failed_migration(&mut q, &format!("tcp:127.0.0.1:{port}"));
    assert!(desc.contains("Connection refused"), "{desc}");
    still_running(&vm, &mut q);

    // Configurations the destination refuses, each named with both values.
    let socket = dir.file("m.sock");
    let uri = format!("unix:{}", socket.display());
    let second = disk(&dir, "second.img", DISK);
    let small = disk(&dir, "small.img", DISK / 2);
    let cases: [(&[&Path], &str, &str); 3] = [
        (
            &[&disk_path],
            "128M",
            "the source has 64 MiB of RAM, this VM 128 MiB",
        ),
        (
            &[&disk_path, &second],
            MEMORY,
            "the source has 1 disks, this VM 2",
        ),
        (
            &[&small],
            MEMORY,
            "disk 'vda' has 16777216 bytes on the source, 8388608 here",
        ),
    ];
    for (disks, memory, difference) in cases {
        let mut dest = Process::destination(&socket, disks, memory, &[]);
        let desc = failed_migration(&mut q, &uri);
        assert!(desc.contains(difference), "{desc}");
        let line = dest.wait(Duration::from_secs(10)).one_line_failure();
        assert!(line.contains(difference), "{line}");
        still_running(&vm, &mut q);
    }

    // The destination dies mid-stream.
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1 << 20, "downtime-limit": 0}),
    );
    let mut dest = Process::destination(&socket, &[&disk_path], MEMORY, &[]);
    q.ok("migrate", json!({"uri": uri}));
    migration_reaches(&mut q, &["active"], Duration::from_secs(10));
    let e = q.err("migrate", json!({"uri": uri}));
    assert_eq!(e.class, "GenericError");
    assert_eq!(e.desc, "There's a migration process in progress");
    dest.kill();
    let info = migration_reaches(&mut q, &["failed"], Duration::from_secs(30));
    let desc = info["error-desc"].as_str().unwrap();
    assert!(desc.contains("cannot send the migration stream"), "{desc}");
    let _ = dest.wait(Duration::from_secs(10));
    still_running(&vm, &mut q);
    // The source still holds its image: a second writer is refused.
    let other = second_writer(&disk_path);
    assert!(other.contains("\"write\" lock"), "{other}");

    // A destination that takes the whole stream and then fails (or just
    // goes): the source had stopped and let go of its image for it, and
    // takes both back.
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 30, "downtime-limit": 300}),
    );
    for (at_end, said) in [
        (
            Some("cannot start here"),
            "the destination failed: cannot start here",
        ),
        (None, "it closed the connection without saying why"),
    ] {
        let fake = fake_destination(&socket, at_end);
        let desc = failed_migration(&mut q, &uri);
        assert!(desc.contains(said), "{desc}");
        let kinds = fake.join().unwrap();
        assert_eq!(
            kinds.last(),
            Some(&8),
            "the stream went to its End: {kinds:?}"
        );
        still_running(&vm, &mut q);
        let other = second_writer(&disk_path);
        assert!(other.contains("\"write\" lock"), "{other}");
    }

    // A destination that never answers: `migrate_cancel` ends the wait.
    let _ = std::fs::remove_file(&socket);
    let silent = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    q.ok("migrate", json!({"uri": uri}));
    std::thread::sleep(Duration::from_millis(200));
    let info = q.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "setup", "{info}");
    let cancelled_at = Instant::now();
    q.ok("migrate_cancel", json!({}));
    migration_reaches(&mut q, &["cancelled"], Duration::from_secs(5));
    assert!(cancelled_at.elapsed() < Duration::from_secs(5));
    drop(silent);
    still_running(&vm, &mut q);

    eprintln!("failure cases took {:?}", started.elapsed());
    still_running(&vm, &mut q);
    finishes_ok(vm, &disk_path);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_cancelled_migration_leaves_the_source_running_and_the_next_one_completes() {
    let dir = TempDir::new("migfail-cancel");
    let disk_path = disk(&dir, "disk.img", DISK);
    let (vm, mut q) = source(&disk_path, 250_000, &dir.file("q.sock"));
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1 << 20, "downtime-limit": 0}),
    );
    let socket = dir.file("m.sock");
    let uri = format!("unix:{}", socket.display());
    let mut dest = Process::destination(&socket, &[&disk_path], MEMORY, &[]);
    q.ok("migrate", json!({"uri": uri}));
    let is = |status: &'static str| move |d: &Value| d["status"] == status;
    q.wait_event("MIGRATION", Duration::from_secs(10), is("active"));
    q.ok("migrate_cancel", json!({}));
    q.wait_event("MIGRATION", Duration::from_secs(10), is("cancelling"));
    q.wait_event("MIGRATION", Duration::from_secs(30), is("cancelled"));
    let info = q.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "cancelled", "{info}");
    still_running(&vm, &mut q);
    let line = dest.wait(Duration::from_secs(10)).one_line_failure();
    assert!(
        line.starts_with("vmm: the VM failed: incoming migration failed: "),
        "{line}"
    );

    // A destination waiting for its stream does not run on `cont`.
    let qd_path = dir.file("qd.sock");
    let qd_arg = qd_path.to_str().unwrap();
    let mut dest = Process::destination(&socket, &[&disk_path], MEMORY, &["--qmp", qd_arg]);
    let mut qd = Qmp::connect(&qd_path);
    assert_eq!(qd.ok("query-status", json!({}))["status"], "inmigrate");
    let e = qd.err("cont", json!({}));
    assert_eq!(e.class, "GenericError");
    assert_eq!(e.desc, "Guest is waiting for an incoming migration");
    let e = qd.err("migrate", json!({"uri": "unix:/nonexistent"}));
    assert_eq!(e.class, "GenericError");
    assert_eq!(e.desc, "Guest is waiting for an incoming migration");
    let e = qd.err("migrate-incoming", json!({"uri": uri}));
    assert_eq!(e.class, "GenericError");
    assert_eq!(e.desc, "The incoming migration has already been started");

    // The next migration goes through; the guest finishes there.
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 30, "downtime-limit": 300}),
    );
    q.ok("migrate", json!({"uri": uri}));
    q.wait_event("MIGRATION", Duration::from_secs(60), is("completed"));
    assert_eq!(q.ok("query-status", json!({}))["status"], "postmigrate");
    // The destination holds the image now: the source cannot take it back.
    let e = q.err("cont", json!({}));
    assert_eq!(e.class, "GenericError");
    assert!(e.desc.contains("\"write\" lock"), "{}", e.desc);
    let end = dest.wait(Duration::from_secs(120));
    end.finished_ok(&disk_path);
    drop(qd);
    vm.kill();
    vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_silent_then_garbage_source_starts_no_guest() {
    let dir = TempDir::new("migfail-garbage");
    let disk_path = disk(&dir, "disk.img", DISK);
    let socket = dir.file("m.sock");
    let qd_path = dir.file("qd.sock");
    let mut dest = Process::destination(
        &socket,
        &[&disk_path],
        MEMORY,
        &["--qmp", qd_path.to_str().unwrap()],
    );
    let mut qd = Qmp::connect(&qd_path);
    // A second destination at the same address is refused, and the first
    // keeps waiting for its source.
    let incoming = format!("unix:{}", socket.display());
    let disk_opt = format!("path={}", disk_path.display());
    let second = Process::incoming(&incoming, MEMORY, &disk_opt).wait(Duration::from_secs(10));
    assert_eq!(second.code, Some(1), "{}", second.stderr);
    assert_eq!(
        second.stderr,
        format!(
            "vmm: incoming migration failed: cannot listen for the incoming migration: \
             something already listens on {}\n",
            socket.display()
        )
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(dest.running().is_some(), "the first destination ended");
    assert_eq!(qd.ok("query-migrate", json!({}))["status"], "setup");
    let mut conn = UnixStream::connect(&socket).unwrap();
    // Connected and silent: the destination waits (up to its 60 s read
    // timeout) for the stream to begin; no guest runs.
    std::thread::sleep(Duration::from_millis(300));
    assert!(dest.running().is_some());
    assert_eq!(qd.ok("query-migrate", json!({}))["status"], "setup");
    assert_eq!(qd.ok("query-status", json!({}))["status"], "inmigrate");
    let started = Instant::now();
    conn.write_all(b"QEVM\0\0\0\x03garbage").unwrap();
    drop(conn);
    let line = dest.wait(Duration::from_secs(10)).one_line_failure();
    assert_eq!(
        line,
        "vmm: the VM failed: incoming migration failed: \
         not a vmm migration stream or state file (wrong magic)"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(qd);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn migrate_incoming_after_defer_refuses_what_it_cannot_take() {
    let dir = TempDir::new("migfail-defer");
    let disk_path = disk(&dir, "disk.img", DISK);
    let qd_path = dir.file("qd.sock");
    let disk_opt = format!("path={}", disk_path.display());
    let mut dest = Process::spawn(&[
        "--incoming",
        "defer",
        "--memory",
        MEMORY,
        "--disk",
        &disk_opt,
        "--qmp",
        qd_path.to_str().unwrap(),
    ]);
    let mut qd = Qmp::connect(&qd_path);
    assert_eq!(qd.ok("query-status", json!({}))["status"], "inmigrate");
    assert_eq!(qd.ok("query-migrate", json!({})), json!({}));
    for (uri, desc) in [
        ("exec:cat", "unknown migration protocol: exec:cat"),
        (
            "tcp:127.0.0.1",
            "invalid migration URI 'tcp:127.0.0.1': a TCP address is HOST:PORT",
        ),
        (
            "file:/tmp/x",
            "a state file is restored with --incoming file:PATH on the command line",
        ),
    ] {
        let e = qd.err("migrate-incoming", json!({ "uri": uri }));
        assert_eq!((e.class.as_str(), e.desc.as_str()), ("GenericError", desc));
    }
    let socket = dir.file("m.sock");
    let uri = format!("unix:{}", socket.display());
    qd.ok("migrate-incoming", json!({ "uri": uri }));
    assert!(socket.exists());
    let e = qd.err("migrate-incoming", json!({ "uri": uri }));
    assert_eq!(e.desc, "The incoming migration has already been started");
    drop(qd);
    dest.kill();
    let _ = dest.wait(Duration::from_secs(10));
}

/// CRC-32 (IEEE), as the stream's frames carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A frame in a state file: kind, where its 9-byte head starts, payload length.
#[derive(Clone, Copy, Debug)]
struct Frame {
    kind: u8,
    at: usize,
    len: usize,
}

impl Frame {
    fn payload(self) -> std::ops::Range<usize> {
        self.at + 9..self.at + 9 + self.len
    }
}

fn frame_at(bytes: &[u8], at: usize) -> Frame {
    Frame {
        kind: bytes[at],
        at,
        len: u32::from_le_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize,
    }
}

/// The frames after the RAM image of a state file (`Pass`, `Devices`,
/// `Machine`, `Vcpu`, `End`), and where the RAM image starts.
fn state_frames(bytes: &[u8], memory: usize) -> (usize, Vec<Frame>) {
    let config = frame_at(bytes, 12);
    assert_eq!(config.kind, 1, "Config first");
    let end = config.payload().end;
    let ram = u64::from_le_bytes(bytes[end - 8..end].try_into().unwrap()) as usize;
    let mut frames = Vec::new();
    let mut at = ram + memory;
    while at < bytes.len() {
        let f = frame_at(bytes, at);
        frames.push(f);
        at = f.payload().end;
    }
    assert_eq!(at, bytes.len());
    (ram, frames)
}

/// Every whole frame of a stream, after its header.
fn walk(bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut at = 12;
    while at + 9 <= bytes.len() {
        let f = frame_at(bytes, at);
        frames.push(f);
        at = f.payload().end;
    }
    frames
}

/// What a source would have sent for the state in a state file: its
/// header and Config (without a RAM offset), RAM frames of the image's
/// non-zero pages, then the same state frames.
fn stream_from_state(file: &[u8], memory: usize) -> Vec<u8> {
    let config = frame_at(file, 12);
    let (ram, frames) = state_frames(file, memory);
    let mut out = file[..config.payload().end].to_vec();
    let end = out.len();
    out[end - 8..].copy_from_slice(&0u64.to_le_bytes());
    reseal(&mut out, config);
    let mut frame = |kind: u8, payload: &[u8]| {
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32(payload).to_le_bytes());
        out.extend_from_slice(payload);
    };
    let image = &file[ram..ram + memory];
    for (i, run) in image.chunks(256 * 4096).enumerate() {
        if run.iter().all(|&b| b == 0) {
            continue;
        }
        // u64 address, u32 page count, the zero flag, the pages.
        let mut payload = ((i * 256 * 4096) as u64).to_le_bytes().to_vec();
        payload.extend_from_slice(&((run.len() / 4096) as u32).to_le_bytes());
        payload.push(0);
        payload.extend_from_slice(run);
        frame(2, &payload);
    }
    for f in frames {
        out.extend_from_slice(&file[f.at..f.payload().end]);
    }
    out
}

/// Connects to a destination at `socket` as a source would, sends
/// `bytes` (as far as the destination takes them), and returns the
/// replies it sent back: (code, text), 1 ready, 2 done, 3 error.
fn fake_source(socket: &Path, bytes: &[u8]) -> Vec<(u8, String)> {
    let mut conn = UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // A destination that refuses stops reading: the rest cannot go.
    let _ = conn.write_all(bytes);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    let _ = std::io::Read::read_to_end(&mut conn, &mut back);
    let mut replies = Vec::new();
    let mut r = &back[..];
    while r.len() >= 5 {
        let len = u32::from_le_bytes(r[1..5].try_into().unwrap()) as usize;
        let text = String::from_utf8_lossy(&r[5..5 + len]).into_owned();
        replies.push((r[0], text));
        r = &r[5 + len..];
    }
    replies
}

/// Rewrites a frame's payload checksum after an edit.
fn reseal(bytes: &mut [u8], f: Frame) {
    let crc = crc32(&bytes[f.payload()]);
    bytes[f.at + 5..f.at + 9].copy_from_slice(&crc.to_le_bytes());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn corrupt_and_truncated_state_files_are_refused_with_one_line() {
    let dir = TempDir::new("migfail-files");
    let disk_path = disk(&dir, "disk.img", DISK);
    let (vm, mut q) = source(&disk_path, 60_000, &dir.file("q.sock"));
    expect_line(&vm, "testguest: blk vda: capacity", Duration::from_secs(30));
    q.ok("stop", json!({}));
    let state = dir.file("vm.state");
    q.ok(
        "migrate",
        json!({"uri": format!("file:{}", state.display())}),
    );
    migration_reaches(&mut q, &["completed"], Duration::from_secs(60));
    vm.kill();
    vm.wait();

    let good = std::fs::read(&state).unwrap();
    let memory = 64 << 20;
    let (ram, frames) = state_frames(&good, memory);
    let kinds: Vec<u8> = frames.iter().map(|f| f.kind).collect();
    // Pass, Devices, Machine, Vcpu, End.
    assert_eq!(kinds, [7, 4, 5, 6, 8]);
    let (devices, vcpu, end) = (frames[1], frames[3], frames[4]);

    let mut cases: Vec<(&str, Vec<u8>, String)> = Vec::new();
    let truncated = "the migration stream ended early (truncated)".to_string();
    for (what, at) in [
        ("in the header", 6),
        ("in the Config frame", 12 + 9 + 3),
        ("in the RAM image", ram + memory / 2),
        ("in the Devices frame", devices.at + 9 + devices.len / 2),
        ("before End", end.at),
    ] {
        cases.push((what, good[..at].to_vec(), truncated.clone()));
    }
    let mut bad = good.clone();
    bad[devices.at + 9 + devices.len / 2] ^= 0x10;
    let checksum = |kind| format!("the {kind} frame is corrupt (checksum mismatch)");
    cases.push(("a flipped Devices byte", bad, checksum("Devices")));
    let mut bad = good.clone();
    bad[vcpu.at + 9 + vcpu.len / 2] ^= 0x10;
    cases.push(("a flipped Vcpu byte", bad, checksum("Vcpu")));
    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"QEVM");
    cases.push((
        "a wrong magic",
        bad,
        "not a vmm migration stream or state file (wrong magic)".into(),
    ));
    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&2u32.to_le_bytes());
    cases.push((
        "a wrong version",
        bad,
        "unsupported migration format version 2 (this vmm reads version 1)".into(),
    ));
    let mut bad = good.clone();
    bad[vcpu.payload().start..][..4].copy_from_slice(&5u32.to_le_bytes());
    reseal(&mut bad, vcpu);
    cases.push(("a vCPU beyond the VM's", bad, "vCPU index".into()));
    // Devices: the serial port (9 registers, its pending input as u32
    // length + bytes), then the virtio device count.
    let mut bad = good.clone();
    let p = devices.payload().start;
    let input = u32::from_le_bytes(bad[p + 9..p + 13].try_into().unwrap()) as usize;
    let count = p + 13 + input;
    assert_eq!(
        bad[count..count + 4],
        1u32.to_le_bytes(),
        "one virtio device"
    );
    bad[count..count + 4].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut bad, devices);
    cases.push((
        "a device count that does not match",
        bad,
        "the source has 2 virtio devices, this VM 1".into(),
    ));

    let file = dir.file("bad.state");
    let incoming = format!("file:{}", file.display());
    let disk_opt = format!("path={}", disk_path.display());
    for (what, bytes, error) in &cases {
        std::fs::write(&file, bytes).unwrap();
        let end = Process::incoming(&incoming, MEMORY, &disk_opt).wait(Duration::from_secs(20));
        let line = end.one_line_failure();
        assert!(
            line.starts_with("vmm: incoming migration failed: ") && line.contains(error.as_str()),
            "{what}: {line}"
        );
    }

    // A state file of another shape: the difference, named.
    std::fs::write(&file, &good).unwrap();
    let small = disk(&dir, "small.img", DISK / 2);
    let small_opt = format!("path={}", small.display());
    for (memory, disk_opt, difference) in [
        (
            "128M",
            &disk_opt,
            "the source has 64 MiB of RAM, this VM 128 MiB",
        ),
        (
            MEMORY,
            &small_opt,
            "disk 'vda' has 16777216 bytes on the source, 8388608 here",
        ),
    ] {
        let end = Process::incoming(&incoming, memory, disk_opt).wait(Duration::from_secs(20));
        let line = end.one_line_failure();
        assert!(line.contains(difference), "{line}");
    }

    // The same state forged into a stream by a fake source: each bad
    // frame is refused on the return path and by the destination.
    let copy = dir.file("copy.img");
    std::fs::copy(&disk_path, &copy).unwrap();
    let stream = stream_from_state(&good, memory);
    let frames = walk(&stream);
    let find = |kind| *frames.iter().rev().find(|f| f.kind == kind).unwrap();
    let (ram, devices, vcpu) = (find(2), find(4), find(6));
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut bad = stream.clone();
    bad[vcpu.payload().start..][..4].copy_from_slice(&5u32.to_le_bytes());
    reseal(&mut bad, vcpu);
    cases.push(("a vCPU beyond the VM's", bad, "there is no such vCPU here"));
    let mut bad = stream.clone();
    let p = devices.payload().start;
    let input = u32::from_le_bytes(bad[p + 9..p + 13].try_into().unwrap()) as usize;
    bad[p + 13 + input..][..4].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut bad, devices);
    cases.push((
        "a device count that does not match",
        bad,
        "the source has 2 virtio devices, this VM 1",
    ));
    let mut bad = stream.clone();
    bad[ram.payload().start..][..8].copy_from_slice(&(64u64 << 20).to_le_bytes());
    reseal(&mut bad, ram);
    cases.push(("a RAM frame past the end of RAM", bad, "outside guest RAM"));
    let mut bad = stream[..vcpu.at].to_vec();
    bad.extend_from_slice(&stream[vcpu.payload().end..]);
    cases.push(("no Vcpu frame", bad, "a vCPU's state never came"));
    cases.push((
        "a stream that stops in a RAM frame",
        stream[..ram.at + 100].to_vec(),
        "the migration stream ended early (truncated)",
    ));
    let socket = dir.file("m.sock");
    let copy_opt: &Path = &copy;
    for (what, bytes, error) in &cases {
        let mut dest = Process::destination(&socket, &[copy_opt], MEMORY, &[]);
        let replies = fake_source(&socket, bytes);
        let last = replies.last().unwrap_or_else(|| panic!("{what}: no reply"));
        assert!(last.0 == 3 && last.1.contains(error), "{what}: {replies:?}");
        let line = dest.wait(Duration::from_secs(20)).one_line_failure();
        assert!(
            line.starts_with("vmm: the VM failed: incoming migration failed: ")
                && line.contains(error),
            "{what}: {line}"
        );
    }
    let mut dest = Process::destination(&socket, &[copy_opt], MEMORY, &[]);
    let replies = fake_source(&socket, &stream);
    assert_eq!(replies, [(1, String::new()), (2, String::new())]);
    let end = dest.wait(Duration::from_secs(120));
    end.finished_ok(&copy);

    // The file these came from restores, and its guest finishes.
    let incoming = format!("file:{}", state.display());
    let end = Process::incoming(&incoming, MEMORY, &disk_opt).wait(Duration::from_secs(120));
    end.finished_ok(&disk_path);
}
