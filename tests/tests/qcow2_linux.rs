//! Linux (in guest kernel mode, so it runs on PVM hosts) on a qcow2
//! overlay over a raw ext4 image: it mounts the root read-write through
//! the overlay, and afterwards `qemu-img check` is clean, the file system
//! read through the chain is clean, and the base is unchanged.

use std::path::Path;
use std::process::Command;

use tests::images::{assert_check_clean, qemu_img, RawCopy};
use tests::{boot, expect_line, image, temp_path, LINUX_BOOT_TIMEOUT};
use vmm::{DiskConfig, MemorySize, VmConfig, VmExit};

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?}:\n{text}");
    text
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn linux_mounts_an_ext4_root_read_write_through_a_qcow2_overlay() {
    let dir = temp_path("qcow2-linux");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("content/etc")).unwrap();
    std::fs::write(dir.join("content/etc/hostname"), "qcow2-guest\n").unwrap();
    let (base, top) = (dir.join("base.raw"), dir.join("top.qcow2"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    std::fs::File::create(&base)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "vmmroot",
            "-d",
            &s(&dir.join("content")),
            &s(&base),
        ],
    );
    let base_before = std::fs::read(&base).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&base),
        "-F",
        "raw",
        &s(&top),
    ]);

    let mut config = VmConfig::new(image("vmlinux"));
    config.memory = MemorySize::mib(128);
    config.cmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw".into();
    config.disks = vec![format!("path={},format=qcow2,poll=50", top.display())
        .parse::<DiskConfig>()
        .unwrap()];
    let vm = boot(&config);
    let vda = expect_line(&vm, "[vda]", LINUX_BOOT_TIMEOUT);
    assert!(vda.contains("65536 512-byte logical blocks"), "{vda}");
    expect_line(&vm, "EXT4-fs (vda): mounted filesystem", LINUX_BOOT_TIMEOUT);
    let root = expect_line(
        &vm,
        "VFS: Mounted root (ext4 filesystem)",
        LINUX_BOOT_TIMEOUT,
    );
    assert!(
        root.contains(" on device ") && !root.contains("readonly"),
        "{root}"
    );
    // No init on the disk: the kernel panics and resets.
    assert_eq!(vm.wait(), VmExit::Reset);

    assert_check_clean(&top);
    let map = qemu_img(&["map", "--output=json", "-f", "qcow2", &s(&top)]);
    assert!(
        map.contains("\"depth\": 0, \"present\": true"),
        "the mount wrote nothing to the overlay: {map}"
    );
    let raw = RawCopy::of(&top, "qcow2");
    run("e2fsck", &["-fn", &s(&raw.path)]);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base image changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
