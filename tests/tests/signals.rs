//! The VMM ends on SIGTERM, SIGINT and SIGHUP as QEMU does: QMP clients
//! get SHUTDOWN (not the guest's doing, reason host-signal), the socket
//! file goes, and the exit status is 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::qmp::Qmp;
use tests::{image, temp_path, vmm_binary};

fn ends_cleanly_on(name: &str) {
    let path = temp_path(&format!("signal-{name}.qmp"));
    let kernel = image("testguest");
    let mut child = Command::new(vmm_binary())
        .args(["--kernel".as_ref(), kernel.as_os_str()])
        .args(["--cmdline", "idle", "--qmp"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start vmm");
    let mut qmp = Qmp::connect(&path);
    assert_eq!(
        qmp.ok("query-status", serde_json::json!({}))["status"],
        "running"
    );
    let sent = Command::new("kill")
        .args(["-s", name, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let event = qmp.wait_event("SHUTDOWN", Duration::from_secs(20), |_| true);
    assert_eq!(
        event["data"],
        serde_json::json!({"guest": false, "reason": "host-signal"}),
        "{event}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "vmm did not end after {name}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "after {name}");
    assert!(!path.exists(), "the QMP socket was left behind");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sigterm_ends_the_vmm_with_a_host_signal_shutdown() {
    ends_cleanly_on("TERM");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sigint_and_sighup_end_it_the_same_way() {
    ends_cleanly_on("INT");
    ends_cleanly_on("HUP");
}
