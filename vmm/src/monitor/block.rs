//! Commands on the block graph: adding, deleting and listing nodes.

use std::path::PathBuf;

use block::{
    driver::NULL_DEFAULT_SIZE, Aio, BlockError, ChildOptions, DriverOptions, FileOptions, Holder,
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
        "backing_file_depth": 0,
        "active": true,
        "image": {
            "filename": n.filename,
            "format": n.driver,
            "virtual-size": n.size,
        },
        "children": n.children.iter().map(|(role, child)| json!({"child": role, "node-name": child})).collect::<Vec<_>>(),
        "references": n.references.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    });
    if let Some(holder) = &n.lease {
        v["in-use-by"] = json!(holder.to_string());
    }
    v
}

/// `query-named-block-nodes`.
pub(super) fn query_named_block_nodes(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    // Every node is listed either way; `flat` only trims QEMU's backing chains.
    let _flat = args.opt_bool("flat")?;
    args.finish()?;
    Ok(Value::Array(
        m.graph
            .nodes()
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
        "raw" => {
            let file = match args.value("file")? {
                Value::String(name) => ChildOptions::Node(name),
                Value::Object(child) => {
                    ChildOptions::Inline(Box::new(node_options(Args::new(child))?))
                }
                _ => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'file', expected: BlockdevRef (a node-name or an object)",
                    ))
                }
            };
            DriverOptions::Raw { file }
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

/// `blockdev-add` (file, raw, null-co).
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
