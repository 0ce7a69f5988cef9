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

/// Runs the binary on the test guest with `cmdline`; returns (status, stderr).
fn run_testguest(cmdline: &str) -> (Option<i32>, String) {
    let guest = image("testguest");
    let out = run_vmm(&["--kernel", guest.to_str().unwrap(), "--cmdline", cmdline]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn a_triple_fault_ends_the_vmm_with_one_line_naming_it() {
    let (status, stderr) = run_testguest("crash=triple-fault");
    assert_eq!(status, Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr
            .starts_with("vmm: the VM failed: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x"),
        "{stderr}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
#[cfg_attr(
    not(pvm_host),
    ignore = "needs a PVM host: hardware KVM runs the guest's popcnt natively, so nothing fails to emulate"
)]
fn an_emulation_failure_names_the_guest_rip_and_instruction_bytes() {
    let (status, stderr) = run_testguest("crash=emulation");
    assert_eq!(status, Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("KVM could not emulate an instruction (emulation failure) at RIP 0x"),
        "{stderr}"
    );
    // popcnt %rax,%rax, the guest's deliberate instruction.
    assert!(
        stderr.contains("instruction bytes f3 48 0f b8 c0"),
        "{stderr}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn an_idle_guest_is_killed_through_its_handle() {
    let mut config = VmConfig::new(image("testguest"));
    config.cpus = 2;
    config.cmdline = "idle".into();
    let vm = boot(&config);
    tests::expect_line(&vm, "testguest: idle", Duration::from_secs(30));
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(200)),
        None,
        "an idle guest keeps running"
    );
    vm.kill();
    assert_eq!(
        vm.wait_timeout(Duration::from_secs(10)),
        Some(VmExit::Killed)
    );
    assert_eq!(vm.wait(), VmExit::Killed);
}
