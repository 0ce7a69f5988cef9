//! virtio-blk with the test guest's own driver (kernel and user mode,
//! so it runs on PVM hosts): data written and flushed reaches the host
//! file, every request type works, a read-only disk refuses writes, and
//! malformed requests get errors while good ones go on being served.

use std::time::Duration;

use tests::{boot, fnv1a64_file, image, TempDisk};
use vmm::{DiskConfig, VmConfig, VmExit, VmHandle};

const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(120);

fn guest(cmdline: &str, disks: &[String]) -> VmConfig {
    let mut config = VmConfig::new(image("testguest"));
    config.cmdline = cmdline.into();
    config.disks = disks
        .iter()
        .map(|d| d.parse::<DiskConfig>().expect("disk option"))
        .collect();
    config
}

/// Waits for `testguest: blk <what>` and asserts it reports ok.
fn expect_ok(vm: &VmHandle, what: &str) -> String {
    let line = tests::expect_line(vm, &format!("testguest: blk {what}"), WORKLOAD_TIMEOUT);
    assert!(line.contains(": ok"), "{line}");
    line
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 1;
    line[start..].split_whitespace().next().unwrap()
}

/// Every workload on a read-write and a read-only disk, in one boot.
fn all_workloads(dataplane: &str) {
    let vda = TempDisk::new("vda", 4 << 20);
    let vdb = TempDisk::patterned("vdb", 1 << 20);
    let vdb_before = fnv1a64_file(&vdb.path);
    let config = guest(
        "blk=verify,random,discard,writezeroes,checksum,malformed,getid,readonly@vdb,checksum@vdb blk.queues=2",
        &[
            vda.option(&format!("queues=2,serial=SN-0042,{dataplane}")),
            vdb.option(&format!("readonly=on,{dataplane}")),
        ],
    );
    let vm = boot(&config);
    let info = tests::expect_line(&vm, "testguest: blk vda: capacity=", WORKLOAD_TIMEOUT);
    assert_eq!(value(&info, "capacity"), "8192");
    assert_eq!(value(&info, "queues"), "2");
    assert_eq!(value(&info, "ro"), "0");
    let info = tests::expect_line(&vm, "testguest: blk vdb: capacity=", WORKLOAD_TIMEOUT);
    assert_eq!(value(&info, "ro"), "1");

    expect_ok(&vm, "verify vda");
    expect_ok(&vm, "random vda");
    expect_ok(&vm, "discard vda");
    expect_ok(&vm, "writezeroes vda");
    let sum = tests::expect_line(&vm, "testguest: blk checksum vda:", WORKLOAD_TIMEOUT);
    // A request with nowhere to put a status is never returned as served.
    for case in ["status-not-writable", "write-nothing-writable", "no-status"] {
        let line = tests::expect_line(
            &vm,
            &format!("testguest: blk malformed vda: {case}:"),
            WORKLOAD_TIMEOUT,
        );
        assert!(line.contains(": needs_reset"), "{line}");
    }
    // Virtio 1.x message framing: data and status sharing a descriptor,
    // the header over two, are served like any request.
    for case in [
        "data-and-status-in-one-descriptor",
        "header-in-two-descriptors",
    ] {
        let line = tests::expect_line(
            &vm,
            &format!("testguest: blk malformed vda: {case}:"),
            WORKLOAD_TIMEOUT,
        );
        assert!(line.contains(": status=0 len="), "{line}");
    }
    let malformed = expect_ok(&vm, "malformed vda: ok");
    assert!(malformed.contains("resets="), "{malformed}");
    let id = tests::expect_line(&vm, "testguest: blk getid vda:", WORKLOAD_TIMEOUT);
    assert_eq!(value(&id, "id"), "SN-0042");
    let ro = expect_ok(&vm, "readonly vdb");
    assert_eq!(
        value(&ro, "write_status"),
        "1",
        "a write to a read-only disk gets IOERR"
    );
    let sum_b = tests::expect_line(&vm, "testguest: blk checksum vdb:", WORKLOAD_TIMEOUT);
    assert_eq!(vm.wait(), VmExit::Status(0), "a workload failed");

    // What the guest read back is what is on the host, and the read-only
    // disk is unchanged.
    assert_eq!(value(&sum, "fnv1a64"), fnv1a64_file(&vda.path));
    assert_eq!(value(&sum_b, "fnv1a64"), vdb_before);
    assert_eq!(fnv1a64_file(&vdb.path), vdb_before);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn every_request_type_works_with_a_sleeping_dataplane() {
    all_workloads("poll=0");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn every_request_type_works_with_a_polling_dataplane_on_an_o_direct_file() {
    all_workloads("poll=200,direct=on");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn every_request_type_works_with_the_sync_engine() {
    // The engine a host without io_uring gets (aio=auto falls back to it).
    all_workloads("aio=sync");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn random_io_is_verified_at_queue_depths_1_to_128_over_several_queues() {
    for (qd, queues) in [(1, 1), (32, 2), (128, 4)] {
        let disk = TempDisk::new(&format!("qd{qd}"), 8 << 20);
        let config = guest(
            &format!("blk=random,checksum blk.qd={qd} blk.queues={queues} blk.ops=2000"),
            &[disk.option(&format!("queues={queues},queue-size=256"))],
        );
        let vm = boot(&config);
        let line = expect_ok(&vm, "random vda");
        assert_eq!(
            (value(&line, "qd"), value(&line, "queues")),
            (qd.to_string().as_str(), queues.to_string().as_str())
        );
        let sum = tests::expect_line(&vm, "testguest: blk checksum vda:", WORKLOAD_TIMEOUT);
        assert_eq!(vm.wait(), VmExit::Status(0));
        assert_eq!(value(&sum, "fnv1a64"), fnv1a64_file(&disk.path), "qd {qd}");
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn the_dataplane_thread_is_named_after_the_device_and_ends_with_the_vm() {
    let disk = TempDisk::new("thread", 1 << 20);
    let vm = boot(&guest("idle blk=verify", &[disk.option("id=rootdisk")]));
    // The guest names disks vda, vdb... by position, whatever their id.
    expect_ok(&vm, "verify vda");
    tests::expect_line(&vm, "testguest: idle", WORKLOAD_TIMEOUT);
    let threads = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|s| s.trim().to_string())
            .collect()
    };
    assert!(
        threads().iter().any(|t| t == "blk-rootdisk"),
        "{:?}",
        threads()
    );
    vm.kill();
    assert_eq!(vm.wait(), VmExit::Killed);
    assert!(
        !threads().iter().any(|t| t == "blk-rootdisk"),
        "{:?}",
        threads()
    );
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    /// A loop device with 4096-byte logical sectors over `file`; None where
    /// `losetup` may not make one (not root, no loop module).
    fn with_4k_sectors(file: &std::path::Path) -> Option<Self> {
        let out = std::process::Command::new("losetup")
            .args(["--sector-size", "4096", "-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| Self(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
#[cfg_attr(
    no_loop,
    ignore = "needs root and the loop driver (/dev/loop-control) for a 4K-sector loop device"
)]
fn direct_on_a_4k_sector_disk_gives_the_guest_4k_blocks_and_serves_it() {
    let disk = TempDisk::new("4k", 4 << 20);
    let dev = LoopDevice::with_4k_sectors(&disk.path)
        .expect("losetup --sector-size 4096 failed although root and /dev/loop-control are here");
    let config = guest(
        "blk=verify,random,discard,writezeroes,checksum",
        &[format!("path={},direct=on", dev.0)],
    );
    let vm = boot(&config);
    let info = tests::expect_line(&vm, "testguest: blk vda: capacity=", WORKLOAD_TIMEOUT);
    assert_eq!(value(&info, "blk_size"), "4096", "{info}");
    expect_ok(&vm, "verify vda");
    expect_ok(&vm, "random vda");
    expect_ok(&vm, "discard vda");
    expect_ok(&vm, "writezeroes vda");
    let sum = tests::expect_line(&vm, "testguest: blk checksum vda:", WORKLOAD_TIMEOUT);
    assert_eq!(vm.wait(), VmExit::Status(0), "a workload failed");
    drop(dev);
    assert_eq!(value(&sum, "fnv1a64"), fnv1a64_file(&disk.path));
}
