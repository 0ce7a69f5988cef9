//! A command that waits (here `blockdev-add` opening a file whose open(2)
//! blocks) holds up its own client only: other clients' commands and
//! events go on, and its reply comes, in order, once the open returns.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{boot, expect_line, temp_path, testguest, TempDisk};
use vmm::VmExit;

/// A client that reads line by line, keeping events apart from replies.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    partial: String,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut raw = Self {
            reader: BufReader::new(stream),
            writer,
            partial: String::new(),
        };
        let greeting = raw.reply_within(Duration::from_secs(10)).unwrap();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        raw.send(json!({"execute": "qmp_capabilities"}));
        assert_eq!(
            raw.reply_within(Duration::from_secs(10)).unwrap(),
            json!({"return": {}})
        );
        raw
    }

    fn send(&mut self, msg: Value) {
        self.writer.write_all(msg.to_string().as_bytes()).unwrap();
    }

    /// The next reply (events skipped), or None if none came in `timeout`.
    fn reply_within(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.reader.read_line(&mut self.partial) {
                Ok(0) => panic!("the QMP server closed the connection"),
                Ok(_) if self.partial.ends_with('\n') => {
                    let line = std::mem::take(&mut self.partial);
                    let v: Value = serde_json::from_str(&line).unwrap();
                    if v.get("event").is_none() {
                        return Some(v);
                    }
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("QMP read: {e}"),
            }
        }
    }
}

/// A read lease on a file: while it is held, an open(2) of the file for
/// writing blocks until the holder lets go (or `lease-break-time`, 45 s
/// by default, passes).
struct ReadLease {
    file: std::fs::File,
}

impl ReadLease {
    fn take(path: &std::path::Path) -> Self {
        // The kernel tells the holder of a lease that someone wants it with
        // SIGIO, whose default action ends the process.
        // SAFETY: ignoring a signal changes no memory; this test binary
        // has no SIGIO handler to lose.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: F_SETLEASE on a file descriptor this struct owns.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        assert_eq!(rc, 0, "F_SETLEASE: {}", std::io::Error::last_os_error());
        Self { file }
    }

    fn release(self) {
        // SAFETY: as in `take`.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        assert_eq!(rc, 0, "F_SETLEASE: {}", std::io::Error::last_os_error());
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(not_root, ignore = "a lease on a file needs its owner or CAP_LEASE")]
fn a_blockdev_add_blocked_in_open_stalls_no_other_client() {
    let image_file = TempDisk::new("leased", 1 << 20);
    let path = temp_path("waiting.qmp");
    let vm = boot(&testguest("idle", &[], Some(&path)));
    let mut a = Raw::connect(&path);
    let mut b = Qmp::connect(&path);
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));

    a.send(json!({"execute": "query-status", "id": "a1"}));
    let a1 = a.reply_within(Duration::from_secs(10)).unwrap();
    assert_eq!(a1["id"], "a1", "{a1}");

    let lease = ReadLease::take(&image_file.path);
    a.send(json!({"execute": "blockdev-add", "id": "a2", "arguments":
        {"driver": "file", "node-name": "leased", "filename": image_file.path}}));
    // Queued behind a2: a client's commands run one after another.
    a.send(json!({"execute": "query-status", "id": "a3"}));

    // The open is really blocked...
    let early = a.reply_within(Duration::from_millis(1500));
    assert!(early.is_none(), "blockdev-add did not wait: {early:?}");

    // ...and B is served meanwhile: commands and events.
    for _ in 0..3 {
        let asked = Instant::now();
        assert_eq!(b.ok("query-status", json!({}))["status"], "running");
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(1), "query-status took {took:?}");
    }
    b.ok("stop", json!({}));
    b.wait_event("STOP", Duration::from_secs(5), |_| true);
    b.ok("cont", json!({}));
    b.wait_event("RESUME", Duration::from_secs(5), |_| true);
    assert!(
        a.reply_within(Duration::from_millis(100)).is_none(),
        "the open ended while the lease was held"
    );

    // Once the lease goes, A's replies come, in the order it asked.
    lease.release();
    let a2 = a
        .reply_within(Duration::from_secs(10))
        .expect("blockdev-add's reply");
    assert_eq!(a2, json!({"return": {}, "id": "a2"}));
    let a3 = a.reply_within(Duration::from_secs(10)).unwrap();
    assert_eq!(a3["id"], "a3", "{a3}");
    let nodes = b.ok("query-named-block-nodes", json!({}));
    assert!(nodes.to_string().contains("\"leased\""), "{nodes}");

    assert!(vm.exit().is_none());
    b.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
}
