//! `query-blockstats` against what the test guest did: a verify pass over
//! the first MiB (writes, one flush, reads) and a random 4K write
//! benchmark in that MiB must show up as exactly those bytes, operations
//! and highest offset; `block-latency-histogram-set` resets and reports
//! histograms; and the reply's keys are qemu-storage-daemon's.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{boot, expect_line, temp_path, testguest, TempDisk};
use vmm::{VmExit, VmHandle};

const TIMEOUT: Duration = Duration::from_secs(120);
const AREA: u64 = 1 << 20;
const WRITES: u64 = 300;

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// Runs the workload on a disk with `options`; the device's entry and the
/// `query-nodes` reply, taken while the guest idles after it.
fn run(name: &str, options: &str) -> (Value, Value, Qmp, VmHandle) {
    let disk = TempDisk::new(name, 32 << 20);
    let path = temp_path(&format!("{name}.qmp"));
    let vm = boot(&testguest(
        &format!("blk=verify blk.bench=randwrite4k blk.ops={WRITES} blk.bytes={AREA} idle"),
        &[disk.option(options)],
        Some(&path),
    ));
    let mut qmp = Qmp::connect(&path);
    // Jobs (`blk=`) run before benchmarks: this line ends both.
    let line = expect_line(&vm, "testguest: blk bench randwrite4k vda:", TIMEOUT);
    assert!(!line.contains("FAIL"), "{line}");
    let devices = qmp.ok("query-blockstats", json!({}));
    assert_eq!(devices.as_array().unwrap().len(), 1, "{devices}");
    let nodes = qmp.ok("query-blockstats", json!({"query-nodes": true}));
    (devices[0].clone(), nodes, qmp, vm)
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn counters_match_what_the_guest_did() {
    let (dev, nodes, mut qmp, vm) = run("blockstats", "id=vda,node-name=drive0");
    assert_eq!(dev["device"], json!("vda"));
    assert_eq!(dev["node-name"], json!("drive0"));
    let s = &dev["stats"];
    assert_eq!(s["wr_bytes"], json!(AREA + WRITES * 4096), "{s}");
    assert_eq!(s["rd_bytes"], json!(AREA), "{s}");
    assert_eq!(s["flush_operations"], json!(1), "{s}");
    assert_eq!(s["wr_highest_offset"], json!(AREA), "{s}");
    // The verify pass's requests are at most the whole MiB each.
    let wr_ops = s["wr_operations"].as_u64().unwrap();
    assert!(wr_ops > WRITES && wr_ops <= WRITES + AREA / 4096, "{s}");
    assert!(s["rd_operations"].as_u64().unwrap() >= 1, "{s}");
    for kind in ["rd", "wr", "flush", "unmap"] {
        assert_eq!(s[format!("failed_{kind}_operations")], json!(0), "{s}");
        assert_eq!(s[format!("invalid_{kind}_operations")], json!(0), "{s}");
    }
    assert_eq!(s["unmap_operations"], json!(0));
    assert!(s["wr_total_time_ns"].as_u64().unwrap() > 0, "{s}");
    assert!(s["rd_total_time_ns"].as_u64().unwrap() > 0, "{s}");
    assert!(s["idle_time_ns"].as_u64().is_some(), "{s}");
    // The file node under the raw node saw the same highest write.
    assert_eq!(dev["parent"]["stats"]["wr_highest_offset"], json!(AREA));
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == json!("drive0"))
        .unwrap_or_else(|| panic!("{nodes}"));
    assert_eq!(node["stats"]["wr_bytes"], json!(0), "{node}");
    assert_eq!(node["stats"]["wr_highest_offset"], json!(AREA), "{node}");

    // Histograms: set, reported empty, refused when not increasing,
    // removed with only `id`.
    qmp.ok(
        "block-latency-histogram-set",
        json!({"id": "vda", "boundaries": [1000, 1000000], "boundaries-flush": [5]}),
    );
    let s = &qmp.ok("query-blockstats", json!({}))[0]["stats"];
    assert_eq!(
        s["rd_latency_histogram"],
        json!({"boundaries": [1000, 1000000], "bins": [0, 0, 0]})
    );
    assert_eq!(s["flush_latency_histogram"]["boundaries"], json!([5]));
    assert_eq!(
        qmp.err(
            "block-latency-histogram-set",
            json!({"id": "vda", "boundaries-write": [10, 10]})
        )
        .desc,
        "Device 'vda' set write boundaries fail"
    );
    assert_eq!(
        qmp.err("block-latency-histogram-set", json!({"id": "vdz"}))
            .desc,
        "Device 'vdz' not found"
    );
    qmp.ok("block-latency-histogram-set", json!({"id": "vda"}));
    let s = &qmp.ok("query-blockstats", json!({}))[0]["stats"];
    assert!(s.get("rd_latency_histogram").is_none(), "{s}");
    qmp.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn stats_off_counts_without_timing() {
    let (dev, _, mut qmp, vm) = run("blockstats-off", "id=vda,stats=off");
    let s = &dev["stats"];
    assert_eq!(s["wr_bytes"], json!(AREA + WRITES * 4096), "{s}");
    assert_eq!(s["wr_total_time_ns"], json!(0), "{s}");
    assert!(s.get("idle_time_ns").is_none(), "{s}");
    qmp.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
}

/// qemu-storage-daemon's `query-blockstats` for a raw node over a file
/// node, by `query-nodes`.
fn qsd_nodes() -> Value {
    let socket = temp_path("blockstats-qsd.qmp");
    let disk = TempDisk::new("blockstats-qsd", 1 << 20);
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=mon",
            socket.display()
        ))
        .args(["--monitor", "chardev=mon", "--blockdev"])
        .arg(format!(
            "driver=file,filename={},node-name=f0",
            disk.path.display()
        ))
        .args(["--blockdev", "driver=raw,file=f0,node-name=r0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run qemu-storage-daemon: install it with `apt-get install -y qemu-utils`");
    let mut qmp = Qmp::connect(&socket);
    let nodes = qmp.ok("query-blockstats", json!({"query-nodes": true}));
    let _ = child.kill();
    let _ = child.wait();
    nodes
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn fields_are_qemu_storage_daemons() {
    let theirs = qsd_nodes();
    let raw = |nodes: &Value| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n.get("parent").is_some())
            .unwrap_or_else(|| panic!("no node with a parent in {nodes}"))
            .clone()
    };
    let theirs = raw(&theirs);
    let (dev, ours, mut qmp, vm) = run("blockstats-keys", "id=vda");
    let ours = raw(&ours);
    // QEMU's file driver adds `driver-specific` (its discard counts),
    // which we do not keep.
    let mut their_parent = keys(&theirs["parent"]);
    their_parent.remove("driver-specific");
    assert_eq!(keys(&ours), keys(&theirs));
    assert_eq!(keys(&ours["parent"]), their_parent);
    assert_eq!(keys(&ours["stats"]), keys(&theirs["stats"]));
    assert_eq!(
        keys(&ours["parent"]["stats"]),
        keys(&theirs["parent"]["stats"])
    );
    // A device's stats add what a node's lack: idle time once it has
    // worked.
    let mut dev_stats = keys(&dev["stats"]);
    assert!(dev_stats.remove("idle_time_ns"));
    assert_eq!(dev_stats, keys(&theirs["stats"]));
    qmp.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
}
