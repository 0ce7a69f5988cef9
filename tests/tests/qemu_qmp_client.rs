//! QEMU's own Python QMP client, `qemu.qmp` from PyPI, unchanged, against
//! our VMM: `tests/qmp/qemu_qmp_client.py` connects to the VM's QMP socket
//! and checks what a client written for QEMU relies on (see the script).
//!
//! Needs `python3` with `qemu.qmp` (pinned in `scripts/test.sh`, which
//! installs it); without it the test fails and says how to install it.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{boot, expect_line, fnv1a64_file, repo_root, temp_path, testguest, TempDisk};
use vmm::{VmConfig, VmExit, VmHandle};

const DISK: u64 = 4 << 20;

/// The script may wait up to 30 s for one event; this bounds the whole run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The test guest, idle, with `disk` as `vda` (node `drive0`) and QMP on `qmp`.
fn guest(disk: &TempDisk, qmp: &Path) -> VmConfig {
    testguest("idle", &[disk.option("id=vda,node-name=drive0")], Some(qmp))
}

/// Runs the script with `args`; its exit status and output, or a failed
/// test that says what went wrong.
fn run_script(args: &[String]) -> (i32, String) {
    let script = repo_root().join("tests/qmp/qemu_qmp_client.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install Python 3 (apt-get install -y python3) and qemu.qmp (scripts/test.sh does)")
        });
    // Read both pipes while the script runs, so a full pipe cannot stall it.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for python3") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = format!("{}{}", out.join().unwrap(), err.join().unwrap());
    let Some(status) = status else {
        panic!(
            "the script ran longer than {SCRIPT_TIMEOUT:?} and was killed; its output:\n{output}"
        );
    };
    let code = status.code().unwrap_or(-1);
    if code == 3 {
        // The script's own message says which interpreter lacked it and how to install it.
        panic!("qemu.qmp is missing:\n{output}");
    }
    (code, output)
}

/// Runs the script with `args` against `vm` until the script's `quit` ends
/// the VM; the VM's exit, the script's status and output. A script that
/// ends without ending the VM (it failed before its `quit`) gets the VM
/// killed, so the test reports the script's failure instead of hanging.
fn run_against(vm: VmHandle, args: Vec<String>) -> (Option<VmExit>, i32, String) {
    let script = std::thread::spawn(move || run_script(&args));
    let exit = loop {
        if vm.wait_timeout(Duration::from_millis(100)).is_some() {
            break Some(vm.wait());
        }
        if script.is_finished() {
            // The script ended without ending the VM: it failed before its `quit`.
            vm.kill();
            break None;
        }
    };
    let (code, output) = script
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    (exit, code, output)
}

fn assert_passed(code: i32, output: &str) {
    assert_eq!(code, 0, "the qemu.qmp script failed; its output:\n{output}");
    let last = output.lines().last().unwrap_or("");
    assert!(
        last.starts_with("qemu_qmp_client: all ") && last.ends_with(" checks passed"),
        "the script ended without its summary line; its output:\n{output}"
    );
    assert!(!output.contains("FAIL"), "{output}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn qemu_qmp_client_drives_the_machine_and_gets_qemu_errors() {
    let disk = TempDisk::patterned("qmpclient", DISK);
    let path = temp_path("qmpclient.qmp");
    let vm = boot(&guest(&disk, &path));
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));

    let (exit, code, output) = run_against(
        vm,
        vec![
            path.display().to_string(),
            "--parts".into(),
            "machine,errors".into(),
            "--device".into(),
            "vda".into(),
            "--node".into(),
            "drive0".into(),
        ],
    );
    assert_passed(code, &output);
    assert_eq!(exit, Some(VmExit::Quit), "script output:\n{output}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn qemu_qmp_client_runs_a_backup_job_and_hears_its_events() {
    let disk = TempDisk::patterned("qmpclient-disk", DISK);
    let source = TempDisk::patterned("qmpclient-src", DISK);
    let target = TempDisk::new("qmpclient-dst", DISK);
    let path = temp_path("qmpclient-jobs.qmp");
    let vm = boot(&guest(&disk, &path));
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));
    let expected = fnv1a64_file(&source.path);

    let (exit, code, output) = run_against(
        vm,
        vec![
            path.display().to_string(),
            "--parts".into(),
            "jobs".into(),
            "--backup-source".into(),
            source.path.display().to_string(),
            "--backup-target".into(),
            target.path.display().to_string(),
            "--size".into(),
            DISK.to_string(),
        ],
    );
    assert_passed(code, &output);
    assert_eq!(exit, Some(VmExit::Quit), "script output:\n{output}");
    assert_eq!(
        fnv1a64_file(&target.path),
        expected,
        "the backup target equals its source"
    );
}
