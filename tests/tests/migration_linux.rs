//! A Linux guest with two vCPUs migrated in the middle of its boot (guest
//! kernel mode, where PVM hosts run it): the destination, started with
//! `--incoming defer` and told where to listen over QMP, finishes the boot
//! and mounts the ext4 root read-write, and the file system is clean.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tests::qmp::Qmp;
use tests::{boot, expect_line, image, vmm_binary, TempDir, LINUX_BOOT_TIMEOUT};
use vmm::{DiskConfig, MemorySize, VmConfig, VmExit};

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn linux_migrated_during_its_boot_mounts_its_root_on_the_destination() {
    let dir = TempDir::new("mig-linux");
    let root = dir.file("root.img");
    std::fs::File::create(&root)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vmmroot"])
        .arg(&root)
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(mkfs.status.success());
    let disk = format!("path={},id=vda", root.display());

    let src_qmp = dir.file("src.qmp");
    let mut config = VmConfig::new(image("vmlinux"));
    config.cpus = 2;
    config.memory = MemorySize::mib(128);
    config.cmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw".into();
    config.disks = vec![disk.parse::<DiskConfig>().unwrap()];
    config.qmp = Some(src_qmp.clone());
    let vm = boot(&config);
    let mut src = Qmp::connect(&src_qmp);

    let dst_qmp = dir.file("dst.qmp");
    let mut dest = Command::new(vmm_binary())
        .args(["--incoming", "defer", "--cpus", "2", "--memory", "128M"])
        .args(["--disk", &disk, "--qmp"])
        .arg(&dst_qmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut dst = Qmp::connect(&dst_qmp);
    assert_eq!(dst.ok("query-status", json!({}))["status"], "inmigrate");
    let err = dst.err("cont", json!({}));
    assert_eq!(err.desc, "Guest is waiting for an incoming migration");
    let sock = dir.file("mig.sock");
    let uri = format!("unix:{}", sock.display());
    dst.ok("migrate-incoming", json!({"uri": uri}));
    let again = dst.err("migrate-incoming", json!({"uri": uri}));
    assert_eq!(
        again.desc,
        "The incoming migration has already been started"
    );

    // Both vCPUs are up and the kernel is still booting: move it now.
    expect_line(&vm, "smp: Brought up", LINUX_BOOT_TIMEOUT);
    src.ok("migrate", json!({"uri": uri}));
    let deadline = Instant::now() + LINUX_BOOT_TIMEOUT;
    let info = loop {
        let info = src.ok("query-migrate", json!({}));
        if info["status"] == "completed" || info["status"] == "failed" {
            break info;
        }
        assert!(Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(info["status"], "completed", "{info}");
    let source_log = vm.serial().unwrap().text();
    assert!(
        !source_log.contains("VFS: Mounted root"),
        "the source finished the boot before it moved:\n{source_log}"
    );
    src.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);

    // The destination boots on, mounts the root, panics without an init
    // and resets: status 0.
    let status = loop {
        if let Some(status) = dest.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the destination did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    dest.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    dest.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let mounted = out
        .lines()
        .find(|l| l.contains("VFS: Mounted root (ext4 filesystem)"))
        .unwrap_or_else(|| panic!("no root mounted on the destination:\n{out}"));
    assert!(!mounted.contains("readonly"), "{mounted}");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}
