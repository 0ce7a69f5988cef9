//! Dirty bitmaps over QMP: `block-dirty-bitmap-add`, `-remove`, `-clear`,
//! `-enable`, `-disable`, and the `dirty-bitmaps` that `query-block` and
//! `query-named-block-nodes` show. Every refusal is a GenericError in
//! QEMU's words.

use block::bitmap::{self, BitmapInfo};
use block::{Holder, NodeRef};
use serde_json::{json, Value};

use super::Monitor;
use crate::qmp::expects;
use crate::qmp::{Args, QmpError};

/// QEMU's `BlockDirtyInfo` list; `None` (the field left out) for a node
/// without bitmaps, as QEMU does.
pub(super) fn dirty_bitmaps_json(bitmaps: &[BitmapInfo]) -> Option<Value> {
    if bitmaps.is_empty() {
        return None;
    }
    Some(Value::Array(
        bitmaps
            .iter()
            .map(|b| {
                let mut v = json!({
                    "count": b.count,
                    "granularity": b.granularity,
                    "recording": b.recording,
                    "busy": b.busy,
                    "persistent": b.persistent,
                });
                if let Some(name) = &b.name {
                    v["name"] = json!(name);
                }
                v
            })
            .collect(),
    ))
}

fn error(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// `block-dirty-bitmap-add`: `node`, `name`, `granularity`, `persistent`,
/// `disabled`.
pub(super) fn add(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let node = args.str("node")?;
    let name = args.str("name")?;
    let granularity = match args.opt_value("granularity")? {
        None => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(g) if g <= u64::from(u32::MAX) => Some(g),
            _ => return Err(expects("granularity", "uint32_t")),
        },
        // QEMU words a non-number this way too.
        Some(_) => return Err(expects("granularity", "uint64")),
    };
    let persistent = args.opt_bool("persistent")?.unwrap_or(false);
    let disabled = args.opt_bool("disabled")?.unwrap_or(false);
    args.finish()?;
    // QEMU's order: the name, then the node, then the rest.
    if name.is_empty() {
        return Err(error(bitmap::BitmapError::EmptyName));
    }
    let node = m
        .graph
        .get(&node, Holder::Monitor)
        .map_err(super::block::error)?;
    bitmap::add_to_node(&node, &name, granularity, persistent, disabled).map_err(error)?;
    Ok(json!({}))
}

/// The node and bitmap name of `-remove`, `-clear`, `-enable`, `-disable`,
/// with QEMU's errors for a missing node.
fn lookup(m: &Monitor, mut args: Args) -> Result<(NodeRef, String), QmpError> {
    let node = args.str("node")?;
    let name = args.str("name")?;
    args.finish()?;
    let node = m
        .graph
        .get(&node, Holder::Monitor)
        .map_err(|_| QmpError::generic(format!("Node '{node}' not found")))?;
    Ok((node, name))
}

/// `block-dirty-bitmap-remove`.
pub(super) fn remove(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    let (node, name) = lookup(m, args)?;
    node.bitmaps().remove(&name).map_err(error)?;
    Ok(json!({}))
}

/// `block-dirty-bitmap-clear`.
pub(super) fn clear(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    let (node, name) = lookup(m, args)?;
    node.bitmaps().clear(&name).map_err(error)?;
    Ok(json!({}))
}

/// `block-dirty-bitmap-enable` (`enabled`) or `-disable`.
pub(super) fn set_enabled(m: &Monitor, args: Args, enabled: bool) -> Result<Value, QmpError> {
    let (node, name) = lookup(m, args)?;
    node.bitmaps().set_enabled(&name, enabled).map_err(error)?;
    Ok(json!({}))
}
