//! Block exports over QMP: the NBD server (`nbd-server-start`,
//! `nbd-server-stop`), exports (`block-export-add`, `block-export-del`,
//! the deprecated `nbd-server-add`), `query-block-exports`, and the event
//! `BLOCK_EXPORT_DELETED`. QEMU 10's argument shapes and messages.

use std::path::PathBuf;
use std::sync::Arc;

use block::export::{BitmapSpec, DelMode, ExportError, ExportOptions, Exports, NbdAddr};
use block::{BlockError, Holder};
use serde_json::{json, Value};

use super::block::error as block_error;
use super::Monitor;
use crate::qmp::{expects, invalid_type, unexpected};
use crate::qmp::{Args, EventSink, QmpError};

/// The export registry, whose deletions become `BLOCK_EXPORT_DELETED`.
pub(super) fn exports(events: EventSink) -> Exports {
    Exports::new(Arc::new(move |id| {
        events.emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
    }))
}

fn error(e: ExportError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// QEMU's legacy `SocketAddress`: `{"type": ..., "data": {...}}`.
fn address(mut addr: Args) -> Result<NbdAddr, QmpError> {
    let kind = addr.str("type")?;
    let mut data = addr.args("data")?;
    addr.finish()?;
    let out = match kind.as_str() {
        "unix" => {
            let path = data.str("path")?;
            // Linux's abstract namespace: accepted by QEMU, not by us.
            if data.has("abstract") || data.has("tight") {
                let name = if data.has("abstract") { "abstract" } else { "tight" };
                return Err(unexpected(&format!("data.{name}")));
            }
            NbdAddr::Unix(PathBuf::from(path))
        }
        "inet" => {
            let host = data.str("host")?;
            let port = data.str("port")?;
            NbdAddr::Inet { host, port }
        }
        "vsock" | "fd" => {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{kind}' here: only 'unix' and 'inet' are supported"
            )))
        }
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{other}'"
            )))
        }
    };
    data.finish()?;
    Ok(out)
}

/// `nbd-server-start`.
pub(super) fn nbd_server_start(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let addr = address(args.args("addr")?)?;
    let max = args.opt_i64("max-connections")?.unwrap_or(0);
    if args.has("tls-creds") || args.has("tls-authz") {
        return Err(QmpError::generic("TLS is not supported by this NBD server"));
    }
    args.finish()?;
    let max = u32::try_from(max).map_err(|_| expects("max-connections", "uint32"))?;
    m.exports.start_nbd(addr, max).map_err(error)?;
    Ok(json!({}))
}

/// `nbd-server-stop`.
pub(super) fn nbd_server_stop(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    m.exports.stop_nbd().map_err(error)?;
    Ok(json!({}))
}

/// One item of `block-export-add`'s `bitmaps` (QAPI's
/// `BlockDirtyBitmapOrStr`): a bitmap name, or `{"node", "name"}`.
enum BitmapArg {
    Local(String),
    External { node: String, name: String },
}

fn bitmap_arg(name: &str, v: Value) -> Result<BitmapArg, QmpError> {
    match v {
        Value::String(s) => Ok(BitmapArg::Local(s)),
        v @ Value::Object(_) => {
            let mut a = Args::from_value(name, v)?;
            let node = a.str("node")?;
            let name = a.str("name")?;
            a.finish()?;
            Ok(BitmapArg::External { node, name })
        }
        // QEMU names the item 'null' here, not `bitmaps[i]`.
        _ => Err(invalid_type("null", "BlockDirtyBitmapOrStr")),
    }
}

/// The bitmaps named for an export, as its `qemu:dirty-bitmap:` contexts;
/// a node named by `{"node", "name"}` is looked up here, its absence left
/// for the export to report in QEMU's order.
fn bitmaps(m: &Monitor, args: Vec<BitmapArg>) -> Vec<BitmapSpec> {
    args.into_iter()
        .map(|a| match a {
            BitmapArg::Local(name) => BitmapSpec::Local(name),
            BitmapArg::External { node, name } => BitmapSpec::External {
                bitmaps: m
                    .graph
                    .get(&node, Holder::Monitor)
                    .ok()
                    .map(|n| n.bitmaps().clone()),
                node,
                name,
            },
        })
        .collect()
}

/// Adds the export `options` describe of `node_name`, looked up as
/// `block-export-add` does (`by_node_name`) or as `nbd-server-add`'s
/// `device`.
fn add(
    m: &Monitor,
    node_name: &str,
    by_node_name: bool,
    options: ExportOptions,
) -> Result<Value, QmpError> {
    let holder = Holder::Export {
        id: options.id.clone(),
    };
    let node = m.graph.get(node_name, holder).map_err(|e| match e {
        // QEMU looks the node up by node-name only, with no device.
        BlockError::NotFound { name } if by_node_name => {
            QmpError::generic(format!("Cannot find device='' nor node-name='{name}'"))
        }
        e => block_error(e),
    })?;
    m.exports.add(options, &node).map_err(error)?;
    Ok(json!({}))
}

/// `block-export-add`, flat: `type`, `id`, `node-name`, `writable`, and
/// NBD's `name`, `description`, `bitmaps`.
pub(super) fn block_export_add(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let kind = args.str("type")?;
    if kind != "nbd" {
        return Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{kind}'"
        )));
    }
    let id = args.str("id")?;
    let node_name = args.str("node-name")?;
    let writable = args.opt_bool("writable")?.unwrap_or(false);
    let name = args.opt_str("name")?;
    let description = args.opt_str("description")?;
    let bitmap_args = args.opt_list("bitmaps", bitmap_arg)?.unwrap_or_default();
    args.finish()?;
    let options = ExportOptions {
        name: name.unwrap_or_else(|| node_name.clone()),
        id,
        description,
        writable,
        bitmaps: bitmaps(m, bitmap_args),
    };
    add(m, &node_name, true, options)
}

/// `nbd-server-add` (deprecated in QEMU, still taken): `device`, `name`
/// (also the export's id), `description`, `writable`, `bitmap`.
pub(super) fn nbd_server_add(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let device = args.str("device")?;
    let name = args.opt_str("name")?.unwrap_or_else(|| device.clone());
    let description = args.opt_str("description")?;
    let writable = args.opt_bool("writable")?.unwrap_or(false);
    let bitmap = args.opt_str("bitmap")?;
    args.finish()?;
    let options = ExportOptions {
        id: name.clone(),
        name,
        description,
        writable,
        bitmaps: bitmap.into_iter().map(BitmapSpec::Local).collect(),
    };
    add(m, &device, false, options)
}

/// `block-export-del`: `id`, `mode` (`safe`, the default, or `hard`).
pub(super) fn block_export_del(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    let mode = match args.opt_str("mode")?.as_deref() {
        None | Some("safe") => DelMode::Safe,
        Some("hard") => DelMode::Hard,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'mode' does not accept value '{other}'"
            )))
        }
    };
    args.finish()?;
    m.exports.del(&id, mode).map_err(error)?;
    Ok(json!({}))
}

/// `query-block-exports`.
pub(super) fn query_block_exports(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(
        m.exports
            .list()
            .into_iter()
            .map(|e| {
                json!({
                    "type": "nbd",
                    "id": e.id,
                    "node-name": e.node_name,
                    "shutting-down": e.shutting_down,
                })
            })
            .collect(),
    ))
}
