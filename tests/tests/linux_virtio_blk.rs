//! Linux's own virtio-blk driver against our device, in guest kernel mode
//! (so it runs on PVM hosts): the kernel probes every disk with the right
//! size, mounts an ext4 root read-write, and leaves it clean; a read-only
//! disk is not changed.

use std::process::Command;

use tests::{boot, expect_line, fnv1a64_file, image, TempDisk, LINUX_BOOT_TIMEOUT};
use vmm::{DiskConfig, MemorySize, VmConfig, VmExit};

fn mkfs_ext4(disk: &TempDisk) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vmmroot"])
        .arg(&disk.path)
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn linux_mounts_an_ext4_root_read_write_and_leaves_it_clean() {
    let root = TempDisk::new("root", 32 << 20);
    mkfs_ext4(&root);
    let data = TempDisk::patterned("data", 3 << 20);
    let data_before = fnv1a64_file(&data.path);

    let mut config = VmConfig::new(image("vmlinux"));
    config.memory = MemorySize::mib(128);
    config.cmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw".into();
    config.disks = [root.option("queues=2,poll=50"), data.option("readonly=on")]
        .iter()
        .map(|d| d.parse::<DiskConfig>().unwrap())
        .collect();
    let vm = boot(&config);

    // Both disks are probed with their sizes in 512-byte sectors.
    let vda = expect_line(&vm, "[vda]", LINUX_BOOT_TIMEOUT);
    assert!(vda.contains("65536 512-byte logical blocks"), "{vda}");
    let vdb = expect_line(&vm, "[vdb]", LINUX_BOOT_TIMEOUT);
    assert!(vdb.contains("6144 512-byte logical blocks"), "{vdb}");
    expect_line(&vm, "EXT4-fs (vda): mounted filesystem", LINUX_BOOT_TIMEOUT);
    // Linux 6.1 says "Mounted root (ext4 filesystem) readonly on device"
    // for a read-only root; this one must be read-write.
    let root_line = expect_line(
        &vm,
        "VFS: Mounted root (ext4 filesystem)",
        LINUX_BOOT_TIMEOUT,
    );
    assert!(
        root_line.contains(" on device ") && !root_line.contains("readonly"),
        "{root_line}"
    );
    // No init on the disk: the kernel panics, syncs nothing more, resets.
    assert_eq!(vm.wait(), VmExit::Reset);

    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&root.path)
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert_eq!(
        fnv1a64_file(&data.path),
        data_before,
        "the read-only disk changed"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
#[cfg_attr(
    pvm_host,
    ignore = "needs hardware KVM: on PVM hosts guest user space cannot make system calls, so fio cannot run in the guest"
)]
fn fio_in_the_guest_verifies_what_it_wrote_through_the_dataplane() {
    let disk = TempDisk::new("fio", 64 << 20);
    let kernel = image("vmlinux");
    let initrd = image("initramfs.cpio.gz");
    let out = tests::run_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "256M",
        "--cpus",
        "2",
        "--disk",
        &disk.option("queues=2,poll=100"),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 -- fio --name=verify --filename=/dev/vda --rw=randwrite \
         --bs=4k --size=32M --ioengine=io_uring --iodepth=32 --direct=1 --verify=crc32c --do_verify=1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("vmm-initramfs: ready"), "{stdout}");
    assert!(!stdout.contains("verify: bad"), "{stdout}");
    assert_eq!(out.status.code(), Some(0), "fio failed:\n{stdout}");
}
