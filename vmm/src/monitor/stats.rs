//! `query-blockstats` and `block-latency-histogram-set`, with QEMU's
//! arguments, fields and nesting: a device's entry carries its counters
//! and, under `parent`, its top node's `file` child; with `query-nodes`
//! every node gets an entry, whose counters are zero as in QEMU (only
//! devices account I/O) but for `wr_highest_offset`.

use std::sync::Arc;

use devices::virtio::block::stats::{BlockStats, Histogram, Histograms, Kind};
use serde_json::{json, Map, Value};

use super::Monitor;
use crate::qmp::{invalid_type, Args, QmpError};
use crate::virtio::DiskControls;

/// QEMU's `BlockDeviceStats` for `stats`, or a node's (all zero but
/// `wr_highest_offset`) when `stats` is `None`.
fn device_stats(stats: Option<&BlockStats>, wr_highest_offset: u64) -> Value {
    let mut out = Map::new();
    let blk = stats.is_some();
    for (prefix, kind) in [
        ("rd", Kind::Read),
        ("wr", Kind::Write),
        ("flush", Kind::Flush),
        ("unmap", Kind::Unmap),
    ] {
        let k = stats.map(|s| s.kind(kind)).unwrap_or_default();
        out.insert(format!("{prefix}_operations"), json!(k.operations));
        if kind != Kind::Flush {
            out.insert(format!("{prefix}_bytes"), json!(k.bytes));
            // Requests are never merged here.
            out.insert(format!("{prefix}_merged"), json!(0));
        }
        out.insert(format!("{prefix}_total_time_ns"), json!(k.total_time_ns));
        out.insert(format!("failed_{prefix}_operations"), json!(k.failed));
        out.insert(format!("invalid_{prefix}_operations"), json!(k.invalid));
    }
    // The device has no zone append: QEMU's fields, always zero.
    for field in [
        "zone_append_operations",
        "zone_append_bytes",
        "zone_append_merged",
        "zone_append_total_time_ns",
        "failed_zone_append_operations",
        "invalid_zone_append_operations",
    ] {
        out.insert(field.into(), json!(0));
    }
    out.insert("wr_highest_offset".into(), json!(wr_highest_offset));
    out.insert("account_invalid".into(), json!(blk));
    out.insert("account_failed".into(), json!(blk));
    out.insert("timed_stats".into(), json!([]));
    if let Some(s) = stats {
        if let Some(idle) = s.idle_time_ns() {
            out.insert("idle_time_ns".into(), json!(idle));
        }
        let h = s.histograms();
        for (field, h) in [
            ("rd_latency_histogram", &h.read),
            ("wr_latency_histogram", &h.write),
            ("flush_latency_histogram", &h.flush),
        ] {
            if let Some(h) = h {
                let (boundaries, bins) = h.read();
                out.insert(
                    field.into(),
                    json!({"boundaries": boundaries, "bins": bins}),
                );
            }
        }
    }
    Value::Object(out)
}

/// The children of each node, and what each device has written, by node.
struct Nodes {
    children: Vec<(String, Vec<(&'static str, String)>)>,
}

impl Nodes {
    fn new(m: &Monitor) -> Self {
        Self {
            children: m
                .graph
                .nodes()
                .into_iter()
                .map(|n| (n.name, n.children))
                .collect(),
        }
    }

    fn children(&self, node: &str) -> &[(&'static str, String)] {
        self.children
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, c)| c.as_slice())
            .unwrap_or(&[])
    }

    /// Whether `below` is `top` or under it.
    fn reaches(&self, top: &str, below: &str, depth: usize) -> bool {
        top == below
            || (depth < 16
                && self
                    .children(top)
                    .iter()
                    .any(|(_, c)| self.reaches(c, below, depth + 1)))
    }

    /// The highest offset written through `node`: `raw` and `file` keep
    /// offsets as they are, so a device's writes land at the same offsets
    /// on every node under it.
    fn wr_highest_offset(&self, m: &Monitor, node: &str) -> u64 {
        m.disks
            .iter()
            .filter(|d| self.reaches(&d.node.name(), node, 0))
            .map(|d| d.stats.wr_highest_offset())
            .max()
            .unwrap_or(0)
    }

    /// A node's entry, with its `file` child under `parent` and its
    /// `backing` child under `backing`.
    fn entry(&self, m: &Monitor, node: &str, depth: usize) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("node-name".into(), json!(node));
        out.insert(
            "stats".into(),
            device_stats(None, self.wr_highest_offset(m, node)),
        );
        if depth < 16 {
            for (role, child) in self.children(node) {
                let key = match *role {
                    "file" => "parent",
                    "backing" => "backing",
                    _ => continue,
                };
                out.insert(key.into(), Value::Object(self.entry(m, child, depth + 1)));
            }
        }
        out
    }
}

/// `query-blockstats`: one entry per device, or per node with `query-nodes`.
pub(super) fn query_blockstats(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let query_nodes = args.opt_bool("query-nodes")?.unwrap_or(false);
    args.finish()?;
    let nodes = Nodes::new(m);
    if query_nodes {
        let mut names: Vec<&String> = nodes.children.iter().map(|(n, _)| n).collect();
        names.sort();
        return Ok(Value::Array(
            names
                .into_iter()
                .map(|n| Value::Object(nodes.entry(m, n, 0)))
                .collect(),
        ));
    }
    let mut devices: Vec<&DiskControls> = m.disks.iter().collect();
    devices.sort_by_key(|d| &d.id);
    Ok(Value::Array(
        devices
            .into_iter()
            .map(|d| {
                let mut entry = nodes.entry(m, &d.node.name(), 0);
                entry.insert("device".into(), json!(d.id));
                entry.insert("qdev".into(), json!(d.id));
                entry.insert(
                    "stats".into(),
                    device_stats(Some(&d.stats), d.stats.wr_highest_offset()),
                );
                Value::Object(entry)
            })
            .collect(),
    ))
}

/// A boundaries argument: a list of unsigned integers.
fn boundaries(args: &mut Args, name: &str) -> Result<Option<Vec<u64>>, QmpError> {
    let Some(list) = args.opt_array(name)? else {
        return Ok(None);
    };
    list.iter()
        .map(|v| v.as_u64().ok_or_else(|| invalid_type(name, "uint64")))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// `block-latency-histogram-set`: with only `id`, removes the device's
/// histograms; `boundaries` replaces all three, `boundaries-read`,
/// `-write` and `-flush` the one each names (over `boundaries`). Every
/// histogram set starts empty.
pub(super) fn block_latency_histogram_set(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    let all = boundaries(&mut args, "boundaries")?;
    let read = boundaries(&mut args, "boundaries-read")?;
    let write = boundaries(&mut args, "boundaries-write")?;
    let flush = boundaries(&mut args, "boundaries-flush")?;
    args.finish()?;
    let stats = &m.disk(&id)?.stats;
    let nothing = all.is_none() && read.is_none() && write.is_none() && flush.is_none();
    let mut h = if nothing || all.is_some() {
        Histograms::default()
    } else {
        stats.histograms()
    };
    for (what, specific, slot) in [
        ("read", read, &mut h.read),
        ("write", write, &mut h.write),
        ("flush", flush, &mut h.flush),
    ] {
        if let Some(b) = specific.or_else(|| all.clone()) {
            let new = Histogram::new(b).ok_or_else(|| {
                QmpError::generic(format!("Device '{id}' set {what} boundaries fail"))
            })?;
            *slot = Some(Arc::new(new));
        }
    }
    stats.set_histograms(h);
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_node_stats_have_qemus_fields() {
        let s = BlockStats::new(true);
        let dev = device_stats(Some(&s), 0);
        let node = device_stats(None, 4096);
        // qemu-storage-daemon 10.0's BlockDeviceStats for a node: 32 keys.
        assert_eq!(node.as_object().unwrap().len(), 32);
        assert_eq!(node["wr_highest_offset"], json!(4096));
        assert_eq!(node["account_failed"], json!(false));
        assert_eq!(dev["account_invalid"], json!(true));
        assert!(dev.get("flush_bytes").is_none());
        assert!(dev.get("idle_time_ns").is_none());
        s.set_histograms(Histograms {
            flush: Histogram::new(vec![10]).map(Arc::new),
            ..Default::default()
        });
        let dev = device_stats(Some(&s), 0);
        assert_eq!(
            dev["flush_latency_histogram"],
            json!({"boundaries": [10], "bins": [0, 0]})
        );
    }
}
