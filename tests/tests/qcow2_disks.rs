//! qcow2 disks from the command line with the test guest: a qcow2 overlay
//! over a raw base (`format=qcow2`), and a raw disk under a throwaway
//! overlay (`snapshot=on`). In both the base is never written.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{boot, expect_line, fnv1a64_file, temp_path, testguest, TempDisk};
use vmm::{VmExit, VmHandle};

const DISK: u64 = 8 << 20;
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(120);

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

/// Waits for `testguest: blk <what>` and asserts it reports ok.
fn expect_ok(vm: &VmHandle, what: &str) {
    let line = expect_line(vm, &format!("testguest: blk {what}"), WORKLOAD_TIMEOUT);
    assert!(line.contains(": ok"), "{line}");
}

/// The guest's FNV-1a checksum of `vda`.
fn guest_checksum(vm: &VmHandle) -> String {
    let line = expect_line(vm, "testguest: blk checksum vda:", WORKLOAD_TIMEOUT);
    let at = line.find("fnv1a64=").expect("fnv1a64=") + "fnv1a64=".len();
    line[at..].split_whitespace().next().unwrap().to_string()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_test_guest_runs_on_a_qcow2_overlay_over_a_raw_base() {
    let base = TempDisk::patterned("qcow2-base", DISK);
    let before = fnv1a64_file(&base.path);
    let overlay = temp_path("qcow2-over.qcow2");
    let _ = std::fs::remove_file(&overlay);
    let over = overlay.display().to_string();
    let base_path = base.path.display().to_string();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base_path, "-F", "raw", &over,
    ]);
    let vm = boot(&testguest(
        "blk=verify,random,checksum",
        &[format!("path={over},format=qcow2")],
        None,
    ));
    expect_ok(&vm, "verify vda");
    expect_ok(&vm, "random vda");
    let sum = guest_checksum(&vm);
    assert_eq!(vm.wait(), VmExit::Status(0), "a workload failed");
    assert_eq!(fnv1a64_file(&base.path), before, "the base was written");
    qemu_img(&["check", "-q", &over]);
    // What the guest saw is what qemu-img reads through the chain.
    let flat = temp_path("qcow2-flat.img");
    qemu_img(&["convert", "-O", "raw", &over, &flat.display().to_string()]);
    assert_eq!(fnv1a64_file(&flat), sum);
    let _ = std::fs::remove_file(flat);
    let _ = std::fs::remove_file(overlay);
}

/// This process's `snapshot=on` overlays left in the temp folder.
fn overlays_left() -> Vec<String> {
    let prefix = format!("vmm-snapshot-{}-", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn snapshot_on_leaves_the_disk_file_unchanged_and_no_overlay_behind() {
    let disk = TempDisk::patterned("snapshot-on", DISK);
    let before = fnv1a64_file(&disk.path);
    let vm = boot(&testguest(
        "blk=verify,random,checksum",
        &[disk.option("snapshot=on")],
        None,
    ));
    expect_ok(&vm, "verify vda");
    assert_eq!(
        overlays_left(),
        Vec::<String>::new(),
        "unlinked while in use"
    );
    expect_ok(&vm, "random vda");
    let sum = guest_checksum(&vm);
    assert_eq!(vm.wait(), VmExit::Status(0), "a workload failed");
    assert_ne!(sum, before, "the guest's writes went somewhere");
    assert_eq!(
        fnv1a64_file(&disk.path),
        before,
        "the disk file was written"
    );
    assert_eq!(overlays_left(), Vec::<String>::new());
    assert!(Path::new(&disk.path).exists());
}
