//! I/O limits, as QEMU's: `--disk throttling.*` holds the test guest's
//! benchmark to its limit, and `block_set_io_throttle` changes the limits
//! of a running guest, with `query-block` showing them.

use std::time::Duration;

use serde_json::json;
use tests::qmp::Qmp;
use tests::{boot, expect_line, temp_path, testguest, TempDisk};
use vmm::VmExit;

const TIMEOUT: Duration = Duration::from_secs(60);

fn value(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .parse()
        .unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn the_benchmark_under_an_iops_limit_of_500_reports_500() {
    let disk = TempDisk::new("throttle-iops", 32 << 20);
    let vm = boot(&testguest(
        "blk.bench=randread4k blk.qd=8 blk.seconds=4 exit=0",
        &[disk.option("throttling.iops-total=500")],
        None,
    ));
    let line = expect_line(&vm, "testguest: blk bench randread4k vda:", TIMEOUT);
    assert_eq!(vm.wait(), VmExit::Status(0));
    let iops = value(&line, "iops");
    // 500 a second, plus the tenth of a second the bucket holds at start.
    assert!((450.0..=550.0).contains(&iops), "{line}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn a_write_byte_limit_holds_writes_and_leaves_reads_alone() {
    let disk = TempDisk::new("throttle-bps", 32 << 20);
    let vm = boot(&testguest(
        "blk.bench=randwrite4k,randread4k blk.qd=8 blk.seconds=3 exit=0",
        &[disk.option("throttling.bps-write=1048576,poll=100")],
        None,
    ));
    let writes = expect_line(&vm, "testguest: blk bench randwrite4k vda:", TIMEOUT);
    let reads = expect_line(&vm, "testguest: blk bench randread4k vda:", TIMEOUT);
    assert_eq!(vm.wait(), VmExit::Status(0));
    // 1 MiB/s in 4 KiB writes: 256 a second (and the first tenth's burst).
    let w = value(&writes, "mbps");
    assert!((0.9..=1.25).contains(&w), "{writes}");
    assert!(value(&reads, "iops") > 5_000.0, "{reads}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn block_set_io_throttle_changes_a_running_guests_limits() {
    let disk = TempDisk::new("throttle-qmp", 32 << 20);
    let path = temp_path("throttle.qmp");
    let vm = boot(&testguest(
        "blk.bench=randread4k blk.qd=8 blk.seconds=4 exit=0",
        &[disk.option("id=vda,throttling.iops-total=50")],
        Some(&path),
    ));
    let mut qmp = Qmp::connect(&path);

    let inserted = |qmp: &mut Qmp| qmp.ok("query-block", json!({}))[0]["inserted"].clone();
    let before = inserted(&mut qmp);
    assert_eq!(before["iops"], json!(50), "{before}");
    assert_eq!(before["iops_max"], json!(0), "{before}");
    assert_eq!(before["group"], json!("vda"), "{before}");

    // Refusals in QEMU's words, and nothing changes.
    let base =
        json!({"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 100, "iops_rd": 10, "iops_wr": 0});
    let mut args = base.clone();
    args["id"] = json!("vda");
    assert_eq!(
        qmp.err("block_set_io_throttle", args).desc,
        "bps/iops/max total values and read/write values cannot be used at the same time"
    );
    let mut args = base.clone();
    args["id"] = json!("vdz");
    args["iops_rd"] = json!(0);
    assert_eq!(
        qmp.err("block_set_io_throttle", args.clone()).desc,
        "Device 'vdz' not found"
    );
    args["device"] = json!("vda");
    assert_eq!(
        qmp.err("block_set_io_throttle", args).desc,
        "Need exactly one of 'device' and 'id'"
    );
    assert_eq!(
        qmp.err("block_set_io_throttle", json!({"id": "vda", "bps": 0}))
            .desc,
        "Parameter 'bps_rd' is missing"
    );
    assert_eq!(inserted(&mut qmp)["iops"], json!(50));

    // Lifting every limit while the benchmark runs lets it go at once: at
    // 50 a second it would report about 50.
    let zeros = json!({"id": "vda", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0});
    qmp.ok("block_set_io_throttle", zeros);
    let after = inserted(&mut qmp);
    assert_eq!(after["iops"], json!(0), "{after}");
    assert!(after.get("group").is_none(), "{after}");
    let line = expect_line(&vm, "testguest: blk bench randread4k vda:", TIMEOUT);
    assert_eq!(vm.wait(), VmExit::Status(0));
    assert!(value(&line, "iops") > 1_000.0, "{line}");
}
