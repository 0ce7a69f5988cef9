//! The `vmm` binary against bad input that is refused before KVM is
//! touched: one line of error, a non-zero status, never a panic. The checks
//! that need /dev/kvm are in `tests/tests/bad_input.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn testguest() -> PathBuf {
    let path = repo_root().join("kernel-images/out/testguest");
    assert!(
        path.exists(),
        "{} is missing: build the guest images with kernel-images/build.sh",
        path.display()
    );
    path
}

fn vmm(args: &[&str]) -> Output {
    Command::new(VMM).args(args).output().expect("run vmm")
}

/// Asserts a failed start: status `code`, one stderr line `vmm: ...` containing `needle`.
fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line of error, got: {stderr}");
    assert!(lines[0].starts_with("vmm: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected '{needle}' in: {stderr}"
    );
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
    assert!(out.stdout.is_empty(), "no guest output on a failed start");
}

#[test]
fn usage_errors_name_the_flag_and_exit_2() {
    assert_one_line_error(&vmm(&[]), 2, "--kernel");
    assert_one_line_error(
        &vmm(&["--kernel", "k", "--memory", "lots"]),
        2,
        "'lots' is not a size",
    );
    assert_one_line_error(&vmm(&["--kernel", "k", "--cpus", "-1"]), 2, "--cpus");
    assert_one_line_error(&vmm(&["--kernel", "k", "--cpus", "two"]), 2, "--cpus");
    assert_one_line_error(&vmm(&["--kernel", "k", "--frobnicate"]), 2, "--frobnicate");
    assert_one_line_error(
        &vmm(&["--kernel", "k", "--disk", "path=x,node-name=#block1"]),
        2,
        "node-name='#block1' is invalid",
    );
    assert_one_line_error(&vmm(&["--kernel", "k", "--qmp"]), 2, "--qmp");
}

#[test]
fn missing_unreadable_and_non_kernel_files_are_refused() {
    assert_one_line_error(
        &vmm(&["--kernel", "/nonexistent/vmlinux"]),
        1,
        "cannot read kernel '/nonexistent/vmlinux': No such file or directory",
    );
    // Opens, but every read fails: the kernel is unreadable even for root.
    assert_one_line_error(
        &vmm(&["--kernel", "/proc/self/mem"]),
        1,
        "cannot read kernel '/proc/self/mem'",
    );
    assert_one_line_error(
        &vmm(&["--kernel", "/"]),
        1,
        "cannot read kernel '/': it is a directory",
    );
    let script = std::env::temp_dir().join(format!("vmm-cli-notakernel-{}", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\necho not a kernel\n").unwrap();
    let out = vmm(&["--kernel", script.to_str().unwrap()]);
    std::fs::remove_file(&script).unwrap();
    assert_one_line_error(
        &out,
        1,
        "is not a kernel: it is neither an ELF vmlinux nor a bzImage",
    );

    let guest = testguest();
    let out = vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_one_line_error(&out, 1, "cannot read initrd '/nonexistent/initrd'");
}

#[test]
fn memory_sizes_outside_the_limits_are_refused() {
    let guest = testguest();
    let g = guest.to_str().unwrap();
    assert_one_line_error(
        &vmm(&["--kernel", g, "--memory", "8M"]),
        1,
        "is too small: at least 16 MiB",
    );
    assert_one_line_error(
        &vmm(&["--kernel", g, "--memory", "100T"]),
        1,
        "is more than this host's",
    );
    assert_one_line_error(
        &vmm(&["--kernel", g, "--memory", "65537K"]),
        1,
        "not a multiple of 4 KiB",
    );
}

#[test]
fn a_zero_cpu_count_is_refused() {
    let guest = testguest();
    let out = vmm(&["--kernel", guest.to_str().unwrap(), "--cpus", "0"]);
    assert_one_line_error(&out, 1, "--cpus 0 is out of range");
}

#[test]
fn a_command_line_longer_than_linux_reads_is_refused() {
    let guest = testguest();
    let long = "x".repeat(3000);
    let out = vmm(&["--kernel", guest.to_str().unwrap(), "--cmdline", &long]);
    // The length reported includes whatever the VMM adds on this host.
    assert_one_line_error(&out, 1, "kernel command line is invalid: it is ");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("bytes long (with the VMM's own parameters); the limit is 2047"));
}

#[test]
fn a_bad_seccomp_mode_is_a_usage_error() {
    let kernel = testguest();
    let kernel = kernel.to_str().unwrap();
    for bad in ["--seccomp=maybe", "--seccomp=", "--seccomp=ON"] {
        let out = vmm(&["--kernel", kernel, bad]);
        assert_one_line_error(&out, 2, "--seccomp");
    }
}
