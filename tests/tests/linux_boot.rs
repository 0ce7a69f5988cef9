//! Linux guests from `kernel-images/out/`. On PVM hosts guest user space
//! cannot make system calls, so these check the kernel's own lines up to
//! `Run /init`; the VMM then ends when the guest resets (reboot=k after the
//! panic that follows). There they boot a tiny initramfs, since unpacking
//! the real one takes minutes of emulated gunzip. On hardware KVM the real
//! initramfs's /init also runs.

use std::path::PathBuf;
use std::process::Command;

use tests::{boot, expect_line, image, initramfs_for_host, temp_path, LINUX_BOOT_TIMEOUT};
use vmm::{MemorySize, VmConfig, VmExit, VmHandle};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 vmm.test_marker=42";

fn linux(kernel: PathBuf, cpus: u32, mib: u64) -> VmConfig {
    let mut config = VmConfig::new(kernel);
    config.cpus = cpus;
    config.memory = MemorySize::mib(mib);
    config.cmdline = CMDLINE.into();
    config
}

/// Checks the kernel's report of its command line, CPUs and memory.
fn check_kernel_lines(vm: &VmHandle, cpus: u32, mib: u64) {
    let cmdline = expect_line(vm, "Command line:", LINUX_BOOT_TIMEOUT);
    assert!(cmdline.contains(CMDLINE), "{cmdline}");

    let smp = expect_line(vm, "smp: Brought up", LINUX_BOOT_TIMEOUT);
    let plural = if cpus == 1 { "CPU" } else { "CPUs" };
    assert!(smp.contains(&format!(" {cpus} {plural}")), "{smp}");

    // "Memory: 101484K/130684K available (...)": the second figure is the
    // RAM the kernel found; only the legacy area below 1 MiB and pages the
    // kernel reserves early are missing from it.
    let line = expect_line(vm, "Memory: ", LINUX_BOOT_TIMEOUT);
    let total_kib: u64 = line
        .split('/')
        .nth(1)
        .and_then(|s| s.split('K').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected memory line: {line}"));
    let given_kib = mib << 10;
    assert!(
        total_kib <= given_kib && total_kib + 4096 >= given_kib,
        "kernel found {total_kib} KiB of {given_kib} KiB: {line}"
    );
}

fn expect_reset_or_status_0(vm: VmHandle) {
    let exit = vm.wait();
    // PVM: init dies at its first system call, the kernel panics and resets.
    // Hardware KVM: /init runs no command and reports status 0.
    assert!(
        matches!(exit, VmExit::Reset | VmExit::Status(0)),
        "{exit:?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn pvh_vmlinux_boots_with_the_cpus_memory_and_command_line_given() {
    let mut config = linux(image("vmlinux"), 2, 128);
    config.initrd = Some(initramfs_for_host());
    let vm = boot(&config);
    check_kernel_lines(&vm, 2, 128);
    let init = expect_line(&vm, "Run /init as init process", LINUX_BOOT_TIMEOUT);
    assert!(init.contains("/init"));
    expect_reset_or_status_0(vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn vmlinux_without_pvh_note_boots_through_the_64_bit_entry() {
    // The same kernel with its PVH note removed: the VMM must fall back to
    // Linux's 64-bit boot protocol (zero page, long mode).
    let copy = temp_path("vmlinux-nopvh");
    let status = Command::new("objcopy")
        .args(["--remove-section=.notes"])
        .arg(image("vmlinux"))
        .arg(&copy)
        .status()
        .expect("run objcopy (binutils)");
    assert!(status.success());
    let vm = boot(&linux(copy.clone(), 1, 64));
    check_kernel_lines(&vm, 1, 64);
    // No initrd and no disk: the kernel cannot mount a root, panics, resets.
    expect_line(&vm, "VFS: Unable to mount root fs", LINUX_BOOT_TIMEOUT);
    assert_eq!(vm.wait(), VmExit::Reset);
    std::fs::remove_file(copy).unwrap();
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn bzimage_boots_to_init() {
    let mut config = linux(image("bzImage"), 1, 96);
    config.initrd = Some(initramfs_for_host());
    let vm = boot(&config);
    check_kernel_lines(&vm, 1, 96);
    expect_line(&vm, "Run /init as init process", LINUX_BOOT_TIMEOUT);
    expect_reset_or_status_0(vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
#[cfg_attr(
    pvm_host,
    ignore = "needs hardware KVM: on PVM hosts guest user space cannot make system calls, so /init cannot run"
)]
fn initramfs_runs_the_command_after_double_dash_and_its_status_ends_the_vmm() {
    let kernel = image("vmlinux");
    let initrd = image("initramfs.cpio.gz");
    let out = tests::run_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 -- exit 3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("vmm-initramfs: ready"), "{stdout}");
    assert_eq!(out.status.code(), Some(3), "{stdout}");
}
