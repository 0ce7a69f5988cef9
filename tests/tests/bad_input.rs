//! Bad input that is only found out with /dev/kvm at hand (or without it):
//! each gets one line of error and a non-zero status from the `vmm` binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use tests::{image, run_vmm, temp_path, vmm_binary};

/// Asserts a failed start: status 1, one stderr line `vmm: ...` containing `needle`.
fn assert_start_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line of error, got: {stderr}");
    assert!(
        lines[0].starts_with("vmm: ") && lines[0].contains(needle),
        "expected '{needle}' in: {stderr}"
    );
    assert!(out.stdout.is_empty(), "the guest must not have run");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn more_cpus_than_kvm_allows_are_refused_with_the_limit() {
    let guest = image("testguest");
    let out = run_vmm(&["--kernel", guest.to_str().unwrap(), "--cpus", "100000"]);
    assert_start_error(
        &out,
        "--cpus 100000 is out of range: this host allows 1 to ",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_initrd_larger_than_guest_memory_is_refused_with_sizes() {
    let guest = image("testguest");
    let initrd = temp_path("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let out = run_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "32M",
    ]);
    std::fs::remove_file(&initrd).unwrap();
    assert_start_error(&out, "(40 MiB) does not fit in guest memory");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn a_kernel_larger_than_guest_memory_is_refused() {
    // Linux loads at 16 MiB; a 16 MiB guest cannot hold it.
    let kernel = image("vmlinux");
    let out = run_vmm(&["--kernel", kernel.to_str().unwrap(), "--memory", "16M"]);
    assert_start_error(&out, "cannot load kernel");
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root to hide /dev/kvm in a private mount namespace"
)]
fn missing_dev_kvm_is_reported_plainly() {
    let guest = image("testguest");
    // A private mount namespace with an empty /dev: no /dev/kvm there.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --kernel {}",
        vmm_binary().display(),
        guest.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare (util-linux)");
    assert_start_error(&out, "/dev/kvm does not exist");
}

#[test]
#[cfg_attr(not_root, ignore = "needs root to run the vmm as user 'nobody'")]
fn dev_kvm_without_permission_is_reported_plainly() {
    let mode = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode());
    assert!(
        matches!(mode, Ok(m) if m & 0o006 == 0),
        "this test expects a /dev/kvm that 'nobody' may not open, found mode {mode:?}"
    );
    // 'nobody' must be able to read the kernel and run the binary, so the
    // first thing it is refused is /dev/kvm.
    let guest = temp_path("guest");
    let exe = temp_path("vmm");
    std::fs::copy(image("testguest"), &guest).unwrap();
    std::fs::copy(vmm_binary(), &exe).unwrap();
    for (path, mode) in [(&guest, 0o644), (&exe, 0o755)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([exe.as_os_str(), "--kernel".as_ref(), guest.as_os_str()])
        .output()
        .expect("run setpriv (util-linux)");
    std::fs::remove_file(&guest).unwrap();
    std::fs::remove_file(&exe).unwrap();
    assert!(Path::new("/dev/kvm").exists());
    assert_start_error(&out, "/dev/kvm may not be opened by this user");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn a_qmp_path_that_cannot_be_a_socket_is_refused_and_left_alone() {
    let guest = image("testguest");
    let file = temp_path("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let out = run_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--qmp",
        file.to_str().unwrap(),
    ]);
    assert_start_error(
        &out,
        &format!(
            "cannot create QMP socket '{}': the path exists and is not a socket",
            file.display()
        ),
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    std::fs::remove_file(&file).unwrap();
    let out = run_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--qmp",
        "/nonexistent-dir/vmm.qmp",
    ]);
    assert_start_error(&out, "/nonexistent-dir/vmm.qmp");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn a_disk_node_name_taken_twice_is_refused() {
    let guest = image("testguest");
    let disk = temp_path("dup-node");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let a = format!("path={},id=vda,node-name=root", disk.display());
    let b = format!("path={},id=vdb,node-name=root", disk.display());
    let out = run_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--disk",
        &a,
        "--disk",
        &b,
    ]);
    std::fs::remove_file(&disk).unwrap();
    assert_start_error(&out, "disk 'vdb': Duplicate nodes with node-name='root'");
}

/// CPUs past what this process may use, in either affinity option, and a
/// vCPU the VM lacks: refused before the guest runs, naming the option.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn affinities_naming_cpus_or_vcpus_that_are_not_there_are_refused() {
    let guest = image("testguest");
    let guest = guest.to_str().unwrap();
    let disk = temp_path("affinity-disk");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let allowed = base::cpus::CpuList::allowed().unwrap();
    if allowed.contains(1023) {
        std::fs::remove_file(&disk).unwrap();
        eprintln!("skipped: this process may run on CPU 1023, the one the test names as absent");
        return;
    }
    let pinned_disk = format!("path={},dataplane-cpus=0:1023", disk.display());
    let out = run_vmm(&["--kernel", guest, "--disk", &pinned_disk]);
    assert_start_error(
        &out,
        &format!("disk 'vda' dataplane-cpus: CPU 1023 is not one this process may run on (it may run on {allowed})"),
    );
    let out = run_vmm(&["--kernel", guest, "--vcpu-affinity", "1023"]);
    assert_start_error(
        &out,
        &format!("--vcpu-affinity for every vCPU: CPU 1023 is not one this process may run on (it may run on {allowed})"),
    );
    let out = run_vmm(&["--kernel", guest, "--vcpu-affinity", "1=0"]);
    assert_start_error(
        &out,
        "--vcpu-affinity names vCPU 1, but the VM has 1 (numbered from 0)",
    );
    let out = run_vmm(&["--kernel", guest, "--vcpu-affinity", "0=1-0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "clap's usage error: {stderr}");
    assert!(
        stderr.contains("the range '1-0' ends before it starts"),
        "{stderr}"
    );
    std::fs::remove_file(&disk).unwrap();
}
