//! Commands on the block graph: adding, deleting and listing nodes.

use std::path::PathBuf;

use block::driver::{FormatSpecific, ImageDetails, NULL_DEFAULT_SIZE};
use block::{
    Aio, BackingOptions, BlockError, ChildOptions, DriverOptions, FileOptions, Holder, ImageInfo,
    Locking, NodeInfo, NodeOptions,
};
use serde_json::{json, Value};

use super::Monitor;
use crate::qmp::{Args, QmpError};

/// Block-layer errors are GenericError in QEMU, all of them.
pub(super) fn error(e: BlockError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// A node as `query-named-block-nodes` shows it: QEMU's fields, plus its
/// children, who references it and who holds its lease.
fn node_json(n: &NodeInfo) -> Value {
    let mut v = json!({
        "node-name": n.name,
        "drv": n.driver,
        "file": n.filename,
        "ro": n.read_only,
        "encrypted": false,
        "detect_zeroes": "off",
        "backing_file_depth": n.backing_file_depth,
        "active": true,
        "image": image_json(&n.image),
        "children": n.children.iter().map(|(role, child)| json!({"child": role, "node-name": child})).collect::<Vec<_>>(),
        "references": n.references.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    });
    if let Some(holder) = &n.lease {
        v["in-use-by"] = json!(holder.to_string());
    }
    if !n.hosted.is_empty() {
        v["hosted"] = json!(n.hosted.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    }
    if let Some(backing) = &n.backing_file {
        v["backing_file"] = json!(backing);
    }
    if let Some(bitmaps) = super::bitmap::dirty_bitmaps_json(&n.bitmaps) {
        v["dirty-bitmaps"] = bitmaps;
    }
    v
}

/// QEMU's `ImageInfo`: the image, its format's details and, down the
/// chain, `backing-image`.
fn image_json(image: &ImageInfo) -> Value {
    let mut v = json!({
        "filename": image.filename,
        "format": image.format,
        "virtual-size": image.virtual_size,
    });
    // What the host file takes on disk, as QEMU's `actual-size`.
    if let Ok(meta) = std::fs::metadata(&image.filename) {
        use std::os::unix::fs::MetadataExt;
        v["actual-size"] = json!(meta.blocks() * 512);
    }
    if let Some(details) = &image.details {
        details_json(&mut v, details);
    }
    if let Some(full) = &image.full_backing_filename {
        v["full-backing-filename"] = json!(full);
    }
    if let Some(backing) = &image.backing {
        v["backing-image"] = image_json(backing);
    }
    v
}

fn details_json(v: &mut Value, d: &ImageDetails) {
    v["cluster-size"] = json!(d.cluster_size);
    v["dirty-flag"] = json!(d.dirty);
    if let Some(name) = &d.backing_filename {
        v["backing-filename"] = json!(name);
    }
    if let Some(format) = &d.backing_format {
        v["backing-filename-format"] = json!(format);
    }
    if let Some(FormatSpecific::Qcow2(q)) = &d.specific {
        let mut data = json!({
            "compat": q.compat,
            "compression-type": q.compression_type,
            "refcount-bits": q.refcount_bits,
        });
        // Version 3 only, as QEMU shows them.
        for (key, value) in [
            ("lazy-refcounts", q.lazy_refcounts),
            ("corrupt", q.corrupt),
            ("extended-l2", q.extended_l2),
        ] {
            if let Some(value) = value {
                data[key] = json!(value);
            }
        }
        v["format-specific"] = json!({"type": "qcow2", "data": data});
    }
}

/// `query-named-block-nodes`.
pub(super) fn query_named_block_nodes(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    // Every node is listed either way; `flat` only trims the backing chains.
    let flat = args.opt_bool("flat")?.unwrap_or(false);
    args.finish()?;
    Ok(Value::Array(
        m.graph
            .nodes_flat(flat)
            .iter()
            .map(|n| {
                let mut v = node_json(n);
                // QEMU lists the limit fields for every node: zeros here.
                if let Value::Object(fields) = &mut v {
                    fields.extend(super::throttle::device_fields(m, None));
                }
                v
            })
            .collect(),
    ))
}

/// `query-block`: one entry per guest device, with its node.
pub(super) fn query_block(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let mut devices: Vec<(String, Value)> = Vec::new();
    for node in m.graph.nodes() {
        for holder in &node.references {
            if let Holder::Device { id, .. } = holder {
                let mut inserted = node_json(&node);
                if let Value::Object(fields) = &mut inserted {
                    fields.extend(super::throttle::device_fields(m, Some(id)));
                }
                devices.push((
                    id.clone(),
                    json!({
                        "device": id,
                        "qdev": id,
                        "type": "unknown",
                        "removable": false,
                        "locked": false,
                        "inserted": inserted,
                    }),
                ));
            }
        }
    }
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Value::Array(devices.into_iter().map(|(_, v)| v).collect()))
}

fn bad_value(key: &str, value: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{key}' does not accept value '{value}'"))
}

/// Reads `blockdev-add` arguments (or an inline child's) into node options.
fn node_options(mut args: Args) -> Result<NodeOptions, QmpError> {
    let driver = args.str("driver")?;
    let node_name = args.opt_str("node-name")?;
    let read_only = args.opt_bool("read-only")?.unwrap_or(false);
    let driver = match driver.as_str() {
        "file" => {
            let filename = PathBuf::from(args.str("filename")?);
            let mut direct = false;
            if let Some(cache) = args.opt_object("cache")? {
                let mut cache = Args::new(cache);
                direct = cache.opt_bool("direct")?.unwrap_or(false);
                if cache.opt_bool("no-flush")? == Some(true) {
                    return Err(bad_value("cache.no-flush", "true"));
                }
                cache.finish()?;
            }
            // Ours: auto (io_uring, else plain system calls), io_uring, sync.
            let aio = match args.opt_str("aio")? {
                Some(value) => value.parse().map_err(|why: String| {
                    QmpError::generic(format!(
                        "Parameter 'aio' does not accept value '{value}': {why}"
                    ))
                })?,
                None => Aio::Auto,
            };
            // QEMU's `locking`: on, off or auto (the default).
            let locking = match args.opt_str("locking")? {
                Some(value) => value.parse().map_err(|_| bad_value("locking", &value))?,
                None => Locking::Auto,
            };
            DriverOptions::File(FileOptions {
                filename,
                direct,
                locking,
                aio,
            })
        }
        "raw" => DriverOptions::Raw {
            file: child_ref("file", args.value("file")?)?,
        },
        "qcow2" => {
            let file = child_ref("file", args.value("file")?)?;
            // Absent: the image's own; null: none (BlockdevRefOrNull).
            let backing = match args.opt_value("backing")? {
                None => BackingOptions::FromImage,
                Some(Value::Null) => BackingOptions::None,
                Some(v) => BackingOptions::Child(child_ref("backing", v)?),
            };
            DriverOptions::Qcow2 { file, backing }
        }
        "null-co" => {
            let size = match args.opt_i64("size")? {
                Some(n) if n < 0 => return Err(bad_value("size", &n.to_string())),
                Some(n) => n as u64,
                None => NULL_DEFAULT_SIZE,
            };
            if args.opt_bool("read-zeroes")? == Some(false) {
                return Err(QmpError::generic(
                    "Parameter 'read-zeroes' does not accept value 'false': null-co nodes always read zeros",
                ));
            }
            DriverOptions::Null { size }
        }
        other => return Err(bad_value("driver", other)),
    };
    args.finish()?;
    Ok(NodeOptions {
        node_name,
        read_only,
        driver,
    })
}

/// A `BlockdevRef`: an existing node's name, or a node defined inline.
fn child_ref(key: &str, value: Value) -> Result<ChildOptions, QmpError> {
    match value {
        Value::String(name) => Ok(ChildOptions::Node(name)),
        Value::Object(child) => Ok(ChildOptions::Inline(Box::new(node_options(Args::new(
            child,
        ))?))),
        _ => Err(QmpError::generic(format!(
            "Invalid parameter type for '{key}', expected: BlockdevRef (a node-name or an object)"
        ))),
    }
}

/// `blockdev-add` (file, raw, qcow2, null-co).
pub(super) fn blockdev_add(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    let options = node_options(args)?;
    m.graph.add(options).map_err(error)?;
    Ok(json!({}))
}

/// `blockdev-del`: drops the user's name; refused while others hold the node.
pub(super) fn blockdev_del(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let name = args.str("node-name")?;
    args.finish()?;
    m.graph.remove(&name).map_err(error)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<NodeOptions, QmpError> {
        let Value::Object(map) = v else { panic!() };
        node_options(Args::new(map))
    }

    #[test]
    fn blockdev_add_reads_each_driver_and_inline_children() {
        let raw = parse(json!({
            "driver": "raw", "node-name": "r0", "read-only": true,
            "file": {"driver": "file", "filename": "/tmp/x.img", "cache": {"direct": true}, "aio": "sync", "locking": "off"},
        }))
        .unwrap();
        assert_eq!(
            raw,
            NodeOptions {
                node_name: Some("r0".into()),
                read_only: true,
                driver: DriverOptions::Raw {
                    file: ChildOptions::Inline(Box::new(NodeOptions {
                        node_name: None,
                        read_only: false,
                        driver: DriverOptions::File(FileOptions {
                            direct: true,
                            locking: Locking::Off,
                            aio: Aio::Sync,
                            ..FileOptions::new("/tmp/x.img".into())
                        }),
                    })),
                },
            }
        );
        let over = parse(json!({"driver": "raw", "node-name": "r1", "file": "f0"})).unwrap();
        assert_eq!(
            over.driver,
            DriverOptions::Raw {
                file: ChildOptions::Node("f0".into())
            }
        );
        let null = parse(json!({"driver": "null-co", "node-name": "n"})).unwrap();
        assert_eq!(
            null.driver,
            DriverOptions::Null {
                size: NULL_DEFAULT_SIZE
            }
        );
    }

    #[test]
    fn blockdev_add_reads_qcow2_backing_absent_null_named_or_inline() {
        let file = json!({"driver": "file", "filename": "/tmp/o.qcow2"});
        let backing = |v: Value| match parse(v).unwrap().driver {
            DriverOptions::Qcow2 { backing, .. } => backing,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            backing(json!({"driver": "qcow2", "node-name": "o", "file": file})),
            BackingOptions::FromImage
        );
        assert_eq!(
            backing(json!({"driver": "qcow2", "node-name": "o", "file": file, "backing": null})),
            BackingOptions::None
        );
        assert_eq!(
            backing(json!({"driver": "qcow2", "node-name": "o", "file": "f", "backing": "base"})),
            BackingOptions::Child(ChildOptions::Node("base".into()))
        );
        assert!(matches!(
            backing(
                json!({"driver": "qcow2", "node-name": "o", "file": "f", "backing": {"driver": "null-co"}})
            ),
            BackingOptions::Child(ChildOptions::Inline(_))
        ));
        let desc = |v: Value| parse(v).unwrap_err().desc;
        assert_eq!(
            desc(json!({"driver": "qcow2", "node-name": "o", "file": "f", "backing": 1})),
            "Invalid parameter type for 'backing', expected: BlockdevRef (a node-name or an object)"
        );
        assert_eq!(
            desc(json!({"driver": "qcow2", "node-name": "o"})),
            "Parameter 'file' is missing"
        );
    }

    /// A monitor over `graph` with no VM behind it.
    fn monitor(graph: std::sync::Arc<block::Graph>) -> Monitor {
        use std::sync::Arc;
        let run = Arc::new(crate::runstate::RunState::new(
            Arc::new(crate::shared::Shared::new().unwrap()),
            Vec::new(),
        ));
        Monitor::new(
            run,
            graph,
            Arc::new(block::job::JobManager::new()),
            crate::virtio::Disks::default(),
            crate::qmp::EventSink::discarding(),
            Box::new(|| {}),
        )
    }

    fn qemu_img(dir: &std::path::Path, args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("qemu-img is needed for this test (Debian: qemu-utils)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn qcow2_chains_show_as_qemu_shows_them() {
        use crate::qmp::Commands;
        let dir = std::env::temp_dir().join(format!("vmm-qcow2-query-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        qemu_img(&dir, &["create", "-q", "-f", "raw", "base.raw", "1M"]);
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "top.qcow2",
            ],
        );
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "solo.qcow2",
                "2M",
            ],
        );
        let m = monitor(std::sync::Arc::new(block::Graph::new()));
        let run = |name: &str, args: Value| {
            let Value::Object(args) = args else { panic!() };
            m.execute(name, args)
        };
        let top = dir.join("top.qcow2").display().to_string();
        let base = dir.join("base.raw").display().to_string();
        run("blockdev-add", json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": top}})).unwrap();
        let solo = dir.join("solo.qcow2").display().to_string();
        run("blockdev-add", json!({"driver": "qcow2", "node-name": "solo", "backing": null, "file": {"driver": "file", "filename": solo}})).unwrap();
        let nodes = run("query-named-block-nodes", json!({})).unwrap();
        let find = |nodes: &Value, name: &str| {
            nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node-name"] == name)
                .unwrap()
                .clone()
        };
        let t = find(&nodes, "top");
        assert_eq!(t["drv"], "qcow2");
        assert_eq!(t["backing_file"], json!(base));
        assert_eq!(t["backing_file_depth"], 1);
        use std::os::unix::fs::MetadataExt;
        let actual = |p: &str| std::fs::metadata(p).unwrap().blocks() * 512;
        assert_eq!(
            t["image"],
            json!({
                "filename": top,
                "format": "qcow2",
                "virtual-size": 1 << 20,
                "actual-size": actual(&top),
                "dirty-flag": false,
                "cluster-size": 65536,
                "backing-filename": "base.raw",
                "full-backing-filename": base,
                "backing-filename-format": "raw",
                "format-specific": {"type": "qcow2", "data": {
                    "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false,
                    "refcount-bits": 16, "corrupt": false, "extended-l2": false,
                }},
                "backing-image": {"filename": base, "format": "raw", "virtual-size": 1 << 20,
                                  "actual-size": actual(&base)},
            })
        );
        let s = find(&nodes, "solo");
        assert!(s.get("backing_file").is_none(), "{s}");
        assert_eq!(s["backing_file_depth"], 0);
        assert_eq!(
            s["image"]["format-specific"],
            json!({"type": "qcow2", "data": {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}})
        );
        // `flat` leaves the backing images out, as QEMU does.
        let flat = run("query-named-block-nodes", json!({"flat": true})).unwrap();
        let t = find(&flat, "top");
        assert!(t["image"].get("backing-image").is_none(), "{t}");
        assert_eq!(t["backing_file_depth"], 0);
        drop(m);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn blockdev_add_refuses_what_it_cannot_honour() {
        let desc = |v: Value| parse(v).unwrap_err().desc;
        assert_eq!(
            desc(json!({"driver": "file", "node-name": "f", "filename": "/x", "aio": "threads"})),
            "Parameter 'aio' does not accept value 'threads': 'threads' is not one of auto, io_uring, sync"
        );
        assert_eq!(
            desc(json!({"driver": "file", "node-name": "f", "filename": "/x", "locking": "maybe"})),
            "Parameter 'locking' does not accept value 'maybe'"
        );
        assert_eq!(
            desc(json!({"driver": "null-co", "node-name": "n", "read-zeroes": false})),
            "Parameter 'read-zeroes' does not accept value 'false': null-co nodes always read zeros"
        );
        assert_eq!(
            desc(json!({"driver": "null-co", "node-name": "n", "size": -1})),
            "Parameter 'size' does not accept value '-1'"
        );
        assert_eq!(
            desc(json!({"driver": "file", "node-name": "f", "filename": "/x", "discard": "unmap"})),
            "Parameter 'discard' is unexpected"
        );
        assert_eq!(
            desc(json!({"driver": "raw", "node-name": "r", "file": {"driver": "file"}})),
            "Parameter 'filename' is missing"
        );
    }
}
