//! Our kernel-mode test guest (runs on PVM hosts as on hardware KVM): the
//! exit status it asks for is the VMM's, and it sees the CPUs and memory
//! the command line gave.

use std::time::Duration;

use tests::{boot, image, run_vmm, testguest_value};
use vmm::{MemorySize, VmConfig, VmExit};

/// RAM the guest's memory map leaves out: the EBDA and legacy holes below 1 MiB.
const LEGACY_HOLE: u64 = 0x10_0000 - 0x9_fc00;

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn exit_n_on_the_command_line_is_the_vmm_exit_status() {
    let guest = image("testguest");
    for status in [0u8, 1, 7, 255] {
        let cmdline = format!("exit={status}");
        let out = run_vmm(&["--kernel", guest.to_str().unwrap(), "--cmdline", &cmdline]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(i32::from(status)),
            "stdout: {stdout}"
        );
        assert!(
            stdout.contains(&format!("testguest: exit={status}")),
            "{stdout}"
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn guest_sees_the_cpus_memory_and_command_line_it_was_given() {
    // The last size puts RAM on both sides of the 3-4 GiB MMIO gap; guest
    // memory is not touched, so it costs nothing on the host.
    for (cpus, mib) in [(1u32, 16u64), (3, 96), (2, 3584)] {
        let mut config = VmConfig::new(image("testguest"));
        config.cpus = cpus;
        config.memory = MemorySize::mib(mib);
        config.cmdline = "exit=9 marker=abc".into();
        let vm = boot(&config);
        assert_eq!(testguest_value(&vm, "cpus"), cpus.to_string());
        let memory: u64 = testguest_value(&vm, "memory").parse().unwrap();
        assert_eq!(
            memory,
            (mib << 20) - LEGACY_HOLE,
            "RAM reported for {mib} MiB"
        );
        let cmdline = testguest_value(&vm, "cmdline");
        assert!(cmdline.starts_with("exit=9 marker=abc"), "{cmdline}");
        assert_eq!(vm.wait(), VmExit::Status(9));
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn a_bad_exit_value_is_reported_by_the_guest_and_fails() {
    let mut config = VmConfig::new(image("testguest"));
    config.cmdline = "exit=300".into();
    let vm = boot(&config);
    tests::expect_line(
        &vm,
        "testguest: error: bad exit value '300'",
        Duration::from_secs(30),
    );
    assert_eq!(vm.wait(), VmExit::Status(1));
}
