//! Our NBD exports read and written by tools no one here wrote: `nbdinfo`
//! (`--map` equal to `qemu-img map` of the same image, raw and a qcow2
//! overlay over raw), `nbdcopy` (bytes equal, one and four connections),
//! `qemu-img info`/`convert`/`compare` over `nbd+unix://` and `nbd://`,
//! `qemu-io` writing a writable export, dirty bitmaps those writes mark
//! read back as `qemu:dirty-bitmap:` contexts (`nbdinfo`, `qemu-img map`
//! with `x-dirty-bitmap`). The VMM runs the test guest
//! idling on its own disk, and the exported nodes are extra
//! `blockdev-add` nodes no dataplane holds. Then bad input over the real
//! socket: garbage, a client stalled in its handshake, a client gone
//! mid-request, while others copy and QMP answers.
//!
//! Needs `nbdinfo`, `nbdcopy` (Debian `libnbd-bin`) and `qemu-img`,
//! `qemu-io` (`qemu-utils`); `scripts/test.sh` installs them. Without
//! them the tests fail and say so.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{boot, expect_line, temp_path, testguest, TempDisk};
use vmm::VmHandle;

const MIB: u64 = 1 << 20;

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {name} ({e}): install libnbd-bin and qemu-utils (scripts/test.sh does)")
    });
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A map as (offset, length, NBD flags: 1 hole, 2 zero), alike neighbours merged.
fn merged(extents: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (off, len, flags) in extents {
        match out.last_mut() {
            Some(last) if last.2 == flags && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, flags)),
        }
    }
    out
}

/// `qemu-img map` of an image, in NBD's terms (`data: false` is a hole).
fn qemu_map(format: &str, path: &Path) -> Vec<(u64, u64, u32)> {
    let out = tool(
        "qemu-img",
        &["map", "--output=json", "-f", format, path.to_str().unwrap()],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    merged(v.as_array().unwrap().iter().map(|e| {
        let hole = !e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            u32::from(hole) | (u32::from(zero) << 1),
        )
    }))
}

/// `nbdinfo --map` of an export.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = tool("nbdinfo", &["--map", uri]);
    merged(out.lines().map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    }))
}

/// A sparse raw image: data at 0-1 MiB and 5-6.5 MiB, holes elsewhere.
fn sparse_raw(name: &str) -> TempDisk {
    let disk = TempDisk::new(name, 16 * MIB);
    let p = disk.path.to_str().unwrap();
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 5M 1536k",
            p,
        ],
    );
    disk
}

struct Vm {
    vm: VmHandle,
    qmp: Qmp,
    _disk: TempDisk,
}

/// The test guest idling with QMP on `socket`.
fn start(name: &str) -> Vm {
    let disk = TempDisk::new(&format!("{name}-vda"), MIB);
    let socket = temp_path(&format!("{name}.qmp"));
    let config = testguest("idle", &[disk.option("id=vda")], Some(&socket));
    let vm = boot(&config);
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));
    let qmp = Qmp::connect(&socket);
    Vm {
        vm,
        qmp,
        _disk: disk,
    }
}

fn file_node(qmp: &mut Qmp, name: &str, path: &Path, driver: &str) {
    qmp.ok(
        "blockdev-add",
        json!({"driver": driver, "node-name": name,
               "file": {"driver": "file", "filename": path.display().to_string()}}),
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn real_clients_read_map_copy_and_write_our_exports() {
    let raw = sparse_raw("nbd-raw");
    // A qcow2 overlay over another raw base: its own data, a zero
    // cluster over the base's data, and the base showing through.
    let base = sparse_raw("nbd-base");
    let over = temp_path("nbd-over.qcow2");
    let b = base.path.to_str().unwrap();
    let o = over.to_str().unwrap();
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", o],
    );
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 2M 256k",
            "-c",
            "write -z 5M 64k",
            o,
        ],
    );
    let over_flat = temp_path("nbd-over-flat.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", o, over_flat.to_str().unwrap()],
    );
    // The maps before we open them (our image locks keep qemu-img out).
    let raw_map = qemu_map("raw", &raw.path);
    let over_map = qemu_map("qcow2", &over);
    let writable = TempDisk::new("nbd-rw", 4 * MIB);

    let mut v = start("nbd-clients");
    let sock = temp_path("nbd-clients.nbd");
    let s = sock.display().to_string();
    v.qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s}}}),
    );
    file_node(&mut v.qmp, "raw0", &raw.path, "raw");
    file_node(&mut v.qmp, "over0", &over, "qcow2");
    file_node(&mut v.qmp, "rw0", &writable.path, "raw");
    // The running guest's own disk: its dataplane holds it.
    let busy = v.qmp.err(
        "block-export-add",
        json!({"type": "nbd", "id": "e-vda", "node-name": "vda"}),
    );
    assert_eq!(
        busy.desc,
        "Node 'vda' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    v.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e-raw", "node-name": "raw0", "description": "sparse raw"}),
    );
    v.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e-over", "node-name": "over0", "name": "overlay"}),
    );
    v.qmp.ok(
        "nbd-server-add",
        json!({"device": "rw0", "name": "rw", "writable": true}),
    );
    let exports = v.qmp.ok("query-block-exports", json!({}));
    assert_eq!(
        exports,
        json!([
            {"type": "nbd", "id": "e-over", "node-name": "over0", "shutting-down": false},
            {"type": "nbd", "id": "e-raw", "node-name": "raw0", "shutting-down": false},
            {"type": "nbd", "id": "rw", "node-name": "rw0", "shutting-down": false},
        ])
    );
    let nodes = v.qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let raw0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "raw0")
        .unwrap();
    assert_eq!(raw0["in-use-by"], "block export 'e-raw'");
    assert!(raw0["references"]
        .as_array()
        .unwrap()
        .contains(&json!("block export 'e-raw'")));

    let uri = |name: &str| format!("nbd+unix:///{name}?socket={s}");
    let info = tool("nbdinfo", &["--json", &uri("raw0")]);
    let info: Value = serde_json::from_str(&info).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB);
    assert_eq!(e["description"], "sparse raw");
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert_eq!(nbd_map(&uri("raw0")), raw_map);
    assert_eq!(nbd_map(&uri("overlay")), over_map);

    for (name, reference) in [("raw0", raw.path.clone()), ("overlay", over_flat.clone())] {
        for connections in ["1", "4"] {
            let copy = temp_path(&format!("nbd-copy-{name}-{connections}.raw"));
            tool(
                "nbdcopy",
                &[
                    &format!("--connections={connections}"),
                    &uri(name),
                    copy.to_str().unwrap(),
                ],
            );
            assert!(
                std::fs::read(&copy).unwrap() == std::fs::read(&reference).unwrap(),
                "nbdcopy of {name} with {connections} connections"
            );
            let _ = std::fs::remove_file(&copy);
        }
        let r = reference.to_str().unwrap();
        tool("qemu-img", &["compare", "-f", "raw", r, &uri(name)]);
    }
    let info = tool("qemu-img", &["info", "--output=json", &uri("overlay")]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB);

    // Writes through qemu-io land in the image.
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x44 64k 128k",
            "-c",
            "flush",
            &uri("rw"),
        ],
    );
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x44 64k 128k", &uri("rw")],
    );
    let bytes = std::fs::read(&writable.path).unwrap();
    assert!(bytes[65536..65536 + 131072].iter().all(|&b| b == 0x44));
    assert!(bytes[..65536].iter().all(|&b| b == 0));

    // Stopping the server deletes every export; then the same over TCP.
    v.qmp.ok("nbd-server-stop", json!({}));
    v.qmp.events_until(Duration::from_secs(10), |events| {
        events
            .iter()
            .filter(|e| e["event"] == "BLOCK_EXPORT_DELETED")
            .count()
            == 3
    });
    assert!(v
        .qmp
        .ok("query-block-exports", json!({}))
        .as_array()
        .unwrap()
        .is_empty());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    v.qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}}),
    );
    v.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e-raw", "node-name": "raw0"}),
    );
    let tcp = format!("nbd://127.0.0.1:{port}/raw0");
    let converted = temp_path("nbd-converted.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", &tcp, converted.to_str().unwrap()],
    );
    assert!(std::fs::read(&converted).unwrap() == std::fs::read(&raw.path).unwrap());
    tool(
        "qemu-img",
        &["compare", "-f", "raw", raw.path.to_str().unwrap(), &tcp],
    );
    assert_eq!(nbd_map(&tcp), raw_map);
    let _ = std::fs::remove_file(converted);
    let _ = std::fs::remove_file(over_flat);
    let _ = std::fs::remove_file(&over);
    v.qmp.ok("quit", json!({}));
    v.vm.wait();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn garbage_stalled_and_vanishing_clients_leave_the_vmm_and_other_clients_going() {
    let raw = sparse_raw("nbd-bad");
    let mut v = start("nbd-bad");
    let sock = temp_path("nbd-bad.nbd");
    let s = sock.display().to_string();
    v.qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s}}}),
    );
    file_node(&mut v.qmp, "raw0", &raw.path, "raw");
    v.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "raw0"}),
    );
    let uri = format!("nbd+unix:///raw0?socket={s}");
    // A client that connects and says nothing: it holds only its thread.
    let stalled = UnixStream::connect(&sock).unwrap();
    // Garbage in place of the handshake.
    let mut garbage = UnixStream::connect(&sock).unwrap();
    let _ = garbage.write_all(&[0xffu8; 4096]);
    let mut sink = Vec::new();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = garbage.read_to_end(&mut sink);
    // A client gone in the middle of a request, by hand: fixed newstyle,
    // EXPORT_NAME, then half a READ header.
    let mut gone = UnixStream::connect(&sock).unwrap();
    let mut greeting = [0u8; 18];
    gone.read_exact(&mut greeting).unwrap();
    let mut hello = 3u32.to_be_bytes().to_vec();
    hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    hello.extend_from_slice(&1u32.to_be_bytes());
    hello.extend_from_slice(&4u32.to_be_bytes());
    hello.extend_from_slice(b"raw0");
    gone.write_all(&hello).unwrap();
    let mut export = [0u8; 10];
    gone.read_exact(&mut export).unwrap();
    gone.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
    drop(gone);
    // Others carry on, QMP answers and the guest runs.
    let copy = temp_path("nbd-bad-copy.raw");
    tool(
        "nbdcopy",
        &["--connections=4", &uri, copy.to_str().unwrap()],
    );
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&raw.path).unwrap());
    let _ = std::fs::remove_file(copy);
    assert_eq!(v.qmp.ok("query-status", json!({}))["status"], "running");
    // The stalled client is still attached to nothing: a safe delete goes.
    v.qmp.delete_export("e0");
    drop(stalled);
    v.qmp.ok("quit", json!({}));
    v.vm.wait();
}

/// `nbdinfo --map=qemu:dirty-bitmap:NAME`: the dirty extents (flag 1,
/// described `dirty`), after checking the clean ones say `clean`.
fn nbd_dirty(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let out = tool(
        "nbdinfo",
        &[&format!("--map=qemu:dirty-bitmap:{bitmap}"), uri],
    );
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (off, len) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            match (f[2], f[3]) {
                ("1", "dirty") => Some((off, len)),
                ("0", "clean") => None,
                _ => panic!("unexpected map line {l:?}"),
            }
        })
        .collect()
}

/// The dirty extents as QEMU's NBD client sees them: `qemu-img map` with
/// `x-dirty-bitmap` shows a dirty extent as `data: false`.
fn qemu_dirty(socket: &str, export: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={socket},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    );
    let out = tool("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let v: Value = serde_json::from_str(&out).unwrap();
    merged(v.as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            u32::from(!e["data"].as_bool().unwrap()),
        )
    }))
    .into_iter()
    .filter(|e| e.2 == 1)
    .map(|(off, len, _)| (off, len))
    .collect()
}

/// Node `node`'s bitmap `name` as `query-named-block-nodes` shows it.
fn bitmap_info(qmp: &mut Qmp, node: &str, name: &str) -> Value {
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["dirty-bitmaps"].as_array())
        .and_then(|b| b.iter().find(|b| b["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no bitmap '{name}' on '{node}'"))
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dirty_bitmap_contexts_show_what_writes_through_a_writable_export_marked() {
    const K64: u64 = 64 << 10;
    let disk = TempDisk::new("nbd-bm", 4 * MIB);
    let mut v = start("nbd-bm");
    let sock = temp_path("nbd-bm.nbd");
    let s = sock.display().to_string();
    v.qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s}}}),
    );
    file_node(&mut v.qmp, "rw0", &disk.path, "raw");
    v.qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "rw0", "name": "b0"}),
    );
    v.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "rw0", "writable": true,
               "bitmaps": ["b0"]}),
    );
    assert_eq!(bitmap_info(&mut v.qmp, "rw0", "b0")["busy"], true);
    let uri = format!("nbd+unix:///rw0?socket={s}");
    assert_eq!(nbd_dirty(&uri, "b0"), []);
    // A write inside one granule, zeroes over three, a trim of one (ours
    // punches a hole: the data changes; QEMU's default `discard: ignore`
    // would leave it and its bitmap alone), a write across a granule's
    // start and end.
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x55 68k 4k",
            "-c",
            "write -z 1M 192k",
            "-c",
            "discard 2M 64k",
            "-c",
            "write -P 0x66 3004k 8k",
            &uri,
        ],
    );
    let dirty = [
        (K64, K64),
        (MIB, 3 * K64),
        (2 * MIB, K64),
        (3004 * 1024 / K64 * K64, K64),
        (3004 * 1024 / K64 * K64 + K64, K64),
    ];
    let merged_dirty = [
        (K64, K64),
        (MIB, 3 * K64),
        (2 * MIB, K64),
        (3004 * 1024 / K64 * K64, 2 * K64),
    ];
    let info = bitmap_info(&mut v.qmp, "rw0", "b0");
    assert_eq!(info["count"], dirty.iter().map(|d| d.1).sum::<u64>());
    assert_eq!(info["granularity"], K64);
    assert_eq!(nbd_dirty(&uri, "b0"), merged_dirty);
    assert_eq!(qemu_dirty(&s, "rw0", "b0"), merged_dirty);
    let busy = v.qmp.err(
        "block-dirty-bitmap-remove",
        json!({"node": "rw0", "name": "b0"}),
    );
    assert_eq!(
        busy.desc,
        "Bitmap 'b0' is currently in use by another operation and cannot be used"
    );

    // Read-only, an enabled bitmap of a writable node is refused, as in
    // QEMU; disabled, it is offered, and `nbd-server-add` takes it too.
    v.qmp.delete_export("w");
    v.qmp.events_until(Duration::from_secs(10), |events| {
        events.iter().any(|e| e["event"] == "BLOCK_EXPORT_DELETED")
    });
    assert_eq!(bitmap_info(&mut v.qmp, "rw0", "b0")["busy"], false);
    let refused = v.qmp.err(
        "block-export-add",
        json!({"type": "nbd", "id": "r", "node-name": "rw0", "bitmaps": ["b0"]}),
    );
    assert_eq!(
        refused.desc,
        "Enabled bitmap 'b0' incompatible with readonly export"
    );
    v.qmp.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "rw0", "name": "b0"}),
    );
    v.qmp.ok(
        "nbd-server-add",
        json!({"device": "rw0", "name": "r", "bitmap": "b0"}),
    );
    let uri = format!("nbd+unix:///r?socket={s}");
    assert_eq!(nbd_dirty(&uri, "b0"), merged_dirty);
    assert_eq!(qemu_dirty(&s, "r", "b0"), merged_dirty);
    v.qmp.ok("nbd-server-stop", json!({}));
    v.qmp.ok("quit", json!({}));
    v.vm.wait();
}
