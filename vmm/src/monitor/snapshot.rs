//! External snapshots: `blockdev-snapshot` and `blockdev-snapshot-sync`.
//!
//! A new qcow2 overlay goes on top of a node; the node becomes its
//! read-only backing node and every device that served the node serves
//! the overlay from the next `cont`. While a dataplane holds the node's
//! lease (the guest runs) both are refused at once, naming the holder:
//! `stop` first.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use block::driver::qcow2::create::{self, CreateOptions};
use block::{
    BackingOptions, ChildOptions, DriverOptions, FileOptions, Holder, NodeOptions, NodeRef,
};
use serde_json::{json, Value};

use super::block::error;
use super::Monitor;
use crate::qmp::{Args, QmpError};

/// Puts `overlay` above `top` and moves the devices that served `top`.
fn append(m: &Monitor, top: &str, overlay: &str) -> Result<(), QmpError> {
    let appended = m
        .graph
        .append_overlay(top, overlay, Holder::Monitor)
        .map_err(error)?;
    // Still under the old top's lease: no dataplane starts on it meanwhile.
    for disk in m.disks.iter() {
        if disk.node.name() == top {
            disk.node.replace(&appended.overlay);
        }
    }
    Ok(())
}

/// The node a command names by `device` (a guest device's id) or by
/// node-name, as QEMU's `bdrv_lookup_bs` does.
fn lookup(m: &Monitor, device: Option<&str>, node: Option<&str>) -> Result<String, QmpError> {
    if let Some(d) = device.and_then(|d| m.disks.get(d)) {
        return Ok(d.node.name());
    }
    if let Some(node) = node {
        if m.graph.get(node, Holder::Monitor).is_ok() {
            return Ok(node.to_string());
        }
    }
    Err(QmpError::generic(format!(
        "Cannot find device='{}' nor node-name='{}'",
        device.unwrap_or(""),
        node.unwrap_or("")
    )))
}

/// `blockdev-snapshot`: `overlay` (added with `backing: null`) goes on top
/// of `node` (a node-name or a device).
pub(super) fn blockdev_snapshot(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let node = args.str("node")?;
    let overlay = args.str("overlay")?;
    args.finish()?;
    let top = lookup(m, Some(&node), Some(&node))?;
    append(m, &top, &overlay)?;
    Ok(json!({}))
}

/// The options of the host file at the bottom of `node`'s `file` children.
fn file_options(node: &NodeRef) -> Option<FileOptions> {
    let driver = node.driver();
    if let Some(options) = driver.file_options() {
        return Some(options);
    }
    let children = driver.children();
    let (_, file) = children.iter().find(|(role, _)| *role == "file")?;
    file_options(file)
}

/// `path` made absolute (links resolved), as `absolute-paths` records it.
fn absolute(path: &str) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| PathBuf::from(path))
    })
}

/// Creates the overlay `file` for `mode=absolute-paths`: a qcow2 image of
/// `size` bytes whose backing file is `backing` of `format`. Refuses a
/// file that exists (QEMU would overwrite it, even the disk's own).
fn create_overlay(file: &Path, size: u64, backing: &Path, format: &str) -> Result<(), QmpError> {
    let fail =
        |why: String| QmpError::generic(format!("Could not create '{}': {why}", file.display()));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| fail(e.to_string()))?;
    let options = CreateOptions {
        backing: Some((backing.display().to_string(), format.to_string())),
        ..CreateOptions::new(size)
    };
    let made = create::create(&f, &options)
        .map_err(|e| e.to_string())
        .and_then(|()| f.sync_all().map_err(|e| e.to_string()));
    if let Err(why) = made {
        let _ = std::fs::remove_file(file);
        return Err(fail(why));
    }
    Ok(())
}

/// `blockdev-snapshot-sync`: opens (`mode=existing`) or creates
/// (`absolute-paths`, the default) the qcow2 image `snapshot-file`, adds
/// it as `snapshot-node-name` and puts it on top of `device`/`node-name`.
pub(super) fn blockdev_snapshot_sync(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let device = args.opt_str("device")?;
    let node_name = args.opt_str("node-name")?;
    let file = args.str("snapshot-file")?;
    let name = args.opt_str("snapshot-node-name")?;
    let format = args.opt_str("format")?.unwrap_or_else(|| "qcow2".into());
    let existing = match args.opt_str("mode")?.as_deref() {
        None | Some("absolute-paths") => false,
        Some("existing") => true,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'mode' does not accept value '{other}'"
            )))
        }
    };
    args.finish()?;
    let top = lookup(m, device.as_deref(), node_name.as_deref())?;
    // QEMU's rule is for node-name only; a graph root needs a name here.
    let Some(name) = name else {
        return Err(QmpError::generic("New overlay node-name missing"));
    };
    match format.as_str() {
        "qcow2" => {}
        "raw" => {
            return Err(QmpError::generic(
                "Backing file not supported for file format 'raw'",
            ))
        }
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'format' does not accept value '{other}' (only qcow2 overlays are supported)"
            )))
        }
    }
    let top_ref = m.graph.get(&top, Holder::Monitor).map_err(error)?;
    let (size, backing, backing_format) = {
        let d = top_ref.driver();
        (d.size(), absolute(&d.filename()), d.name())
    };
    let path = PathBuf::from(&file);
    let options = FileOptions {
        filename: path.clone(),
        ..file_options(&top_ref).unwrap_or_else(|| FileOptions::new(path.clone()))
    };
    drop(top_ref);
    if !existing {
        create_overlay(&path, size, &backing, backing_format)?;
    }
    let undo = |m: &Monitor, added: bool| {
        if added {
            let _ = m.graph.remove(&name);
        }
        if !existing {
            let _ = std::fs::remove_file(&path);
        }
    };
    let overlay = NodeOptions {
        node_name: Some(name.clone()),
        read_only: false,
        driver: DriverOptions::Qcow2 {
            file: ChildOptions::Inline(Box::new(NodeOptions {
                node_name: None,
                read_only: false,
                driver: DriverOptions::File(options),
            })),
            backing: BackingOptions::None,
        },
    };
    if let Err(e) = m.graph.add(overlay) {
        undo(m, false);
        return Err(error(e));
    }
    if let Err(e) = append(m, &top, &name) {
        undo(m, true);
        return Err(e);
    }
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;

    use block::Graph;
    use devices::virtio::block::dataplane_holder;
    use serde_json::Map;

    use super::*;
    use crate::disk::DiskConfig;
    use crate::qmp::Commands;
    use crate::virtio::{controls, open_disks};

    fn qemu_img(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("qemu-img is needed for this test (Debian: qemu-utils)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn object(v: Value) -> Map<String, Value> {
        let Value::Object(m) = v else { panic!("{v}") };
        m
    }

    #[test]
    fn snapshots_move_the_device_to_a_new_overlay_and_are_refused_while_it_runs() {
        let dir = std::env::temp_dir().join(format!("vmm-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.raw");
        qemu_img(&dir, &["create", "-q", "-f", "raw", "base.raw", "1M"]);
        let graph = Arc::new(Graph::new());
        let disk: DiskConfig = format!("path={},aio=sync", base.display()).parse().unwrap();
        let open = open_disks(&graph, &[disk]).unwrap();
        let disks = controls(&open);
        let run = Arc::new(crate::runstate::RunState::new(
            Arc::new(crate::shared::Shared::new().unwrap()),
            Vec::new(),
        ));
        let m = Monitor::new(
            run,
            graph.clone(),
            Arc::new(block::job::JobManager::new()),
            disks,
            crate::qmp::EventSink::discarding(),
            Box::new(|| {}),
        );
        let exec = |name: &str, args: Value| m.execute(name, object(args));
        let s1 = dir.join("s1.qcow2").display().to_string();
        let sync = json!({"device": "vda", "snapshot-file": s1, "snapshot-node-name": "s1"});

        // The guest runs: its dataplane holds the lease.
        let node = graph.get("vda", Holder::Monitor).unwrap();
        let lease = node.take_lease(dataplane_holder("vda")).unwrap();
        let busy =
            "Node 'vda' is busy: block device is in use by virtio-blk dataplane of device 'vda'";
        assert_eq!(
            exec("blockdev-snapshot-sync", sync.clone())
                .unwrap_err()
                .desc,
            busy
        );
        assert!(
            !Path::new(&s1).exists(),
            "a refused snapshot leaves no file"
        );
        assert!(graph.get("s1", Holder::Monitor).is_err());
        drop(lease);
        drop(node);

        // Stopped: it runs, and the device moves.
        exec("blockdev-snapshot-sync", sync).unwrap();
        assert_eq!(m.disks.get("vda").unwrap().node.name(), "s1");
        let info = qemu_img(&dir, &["info", "--output=json", "-U", "s1.qcow2"]);
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["backing-filename"], json!(base.display().to_string()));
        assert_eq!(info["backing-filename-format"], "raw");
        let block = exec("query-block", json!({})).unwrap();
        let inserted = &block[0]["inserted"];
        assert_eq!(inserted["node-name"], "s1");
        assert_eq!(inserted["backing_file_depth"], 1);
        assert_eq!(inserted["image"]["backing-image"]["format"], "raw");
        // The device's dataplane can lease the new top, chain included.
        let top = graph.get("s1", Holder::Monitor).unwrap();
        drop(top.take_lease(dataplane_holder("vda")).unwrap());
        drop(top);

        // blockdev-snapshot with an overlay added with backing: null.
        qemu_img(
            &dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", "s1.qcow2", "-F", "qcow2", "s2.qcow2",
            ],
        );
        let s2 = dir.join("s2.qcow2").display().to_string();
        exec(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "s2", "backing": null,
            "file": {"driver": "file", "filename": s2}}),
        )
        .unwrap();
        exec("blockdev-snapshot", json!({"node": "vda", "overlay": "s2"})).unwrap();
        assert_eq!(m.disks.get("vda").unwrap().node.name(), "s2");
        let block = exec("query-block", json!({})).unwrap();
        assert_eq!(block[0]["inserted"]["backing_file_depth"], 2);
        let nodes = exec("query-named-block-nodes", json!({"flat": true})).unwrap();
        let ro = |name: &str| {
            nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node-name"] == name)
                .unwrap()["ro"]
                .clone()
        };
        assert_eq!(
            (ro("vda"), ro("s1"), ro("s2")),
            (json!(true), json!(true), json!(false))
        );

        // Refusals in QEMU's words.
        let err = |args: Value| exec("blockdev-snapshot-sync", args).unwrap_err().desc;
        assert_eq!(
            err(json!({"node-name": "s2", "snapshot-file": "/x"})),
            "New overlay node-name missing"
        );
        assert_eq!(
            err(json!({"snapshot-file": "/x", "snapshot-node-name": "n"})),
            "Cannot find device='' nor node-name=''"
        );
        assert_eq!(
            err(
                json!({"node-name": "s2", "snapshot-file": "/x", "snapshot-node-name": "n", "format": "raw"})
            ),
            "Backing file not supported for file format 'raw'"
        );
        assert_eq!(
            err(
                json!({"node-name": "s2", "snapshot-file": "/x", "snapshot-node-name": "n", "mode": "bogus"})
            ),
            "Parameter 'mode' does not accept value 'bogus'"
        );
        assert_eq!(
            err(json!({"node-name": "s2", "snapshot-file": s1, "snapshot-node-name": "n"})),
            format!("Could not create '{s1}': File exists (os error 17)")
        );
        let gone = dir.join("gone.qcow2").display().to_string();
        assert_eq!(
            err(
                json!({"node-name": "s2", "snapshot-file": gone, "snapshot-node-name": "n", "mode": "existing"})
            ),
            format!("cannot open disk '{gone}': No such file or directory (os error 2)")
        );
        assert!(graph.get("n", Holder::Monitor).is_err());
        drop(m);
        drop(open);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
