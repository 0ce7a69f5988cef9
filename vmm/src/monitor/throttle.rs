//! `block_set_io_throttle` and the limits `query-block` shows, with QEMU's
//! arguments, fields and messages.

use block::throttle::{Limit, Limits, LimitsError};
use serde_json::{json, Map, Value};

use super::Monitor;
use crate::qmp::{Args, QmpError};

/// The six base limits: QEMU's argument names, all required.
const BASE: [&str; 6] = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"];

fn limit_mut<'a>(limits: &'a mut Limits, base: &str) -> &'a mut Limit {
    match base {
        "bps" => &mut limits.bps_total,
        "bps_rd" => &mut limits.bps_read,
        "bps_wr" => &mut limits.bps_write,
        "iops" => &mut limits.iops_total,
        "iops_rd" => &mut limits.iops_read,
        _ => &mut limits.iops_write,
    }
}

fn limit(limits: &Limits, base: &str) -> Limit {
    let mut copy = *limits;
    *limit_mut(&mut copy, base)
}

/// A QMP `int` as a limit: QEMU stores it unsigned, so a negative value is
/// out of its range.
fn value(n: i64) -> Result<u64, QmpError> {
    u64::try_from(n).map_err(|_| QmpError::generic(LimitsError::TooLarge.to_string()))
}

/// Reads QEMU's `BlockIOThrottle` arguments (less `device`/`id`).
fn limits(args: &mut Args) -> Result<Limits, QmpError> {
    let mut limits = Limits::default();
    for base in BASE {
        limit_mut(&mut limits, base).avg = value(args.i64(base)?)?;
    }
    for base in BASE {
        if let Some(max) = args.opt_i64(&format!("{base}_max"))? {
            limit_mut(&mut limits, base).max = value(max)?;
        }
        if let Some(length) = args.opt_i64(&format!("{base}_max_length"))? {
            limit_mut(&mut limits, base).max_length = value(length)?;
        }
    }
    if let Some(size) = args.opt_i64("iops_size")? {
        limits.iops_size = value(size)?;
    }
    Ok(limits)
}

/// `block_set_io_throttle`: sets a disk's limits; all six base limits 0
/// turns throttling off. Requests already waiting go by the new limits.
pub(super) fn block_set_io_throttle(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let device = args.opt_str("device")?;
    let id = args.opt_str("id")?;
    let new = limits(&mut args)?;
    if let Some(group) = args.opt_str("group")? {
        return Err(QmpError::generic(format!(
            "Parameter 'group' does not accept value '{group}': throttle groups are not supported; each disk has its own limits"
        )));
    }
    args.finish()?;
    let disk = match (device, id) {
        (Some(device), None) => m.disk(&device)?,
        (None, Some(id)) => m
            .disks
            .get(&id)
            .ok_or_else(|| QmpError::generic(format!("Device '{id}' not found")))?,
        _ => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    };
    disk.throttle
        .set(new)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({}))
}

/// The throttling fields of `query-block`'s `inserted` for `limits`: the six
/// base limits always, the bursts, `iops_size` and `group` while any limit
/// is set, as QEMU shows them.
pub(super) fn fields(device: &str, limits: &Limits) -> Map<String, Value> {
    let mut out = Map::new();
    for base in BASE {
        out.insert(base.into(), json!(limit(limits, base).avg));
    }
    if limits.enabled() {
        for base in BASE {
            let l = limit(limits, base);
            out.insert(format!("{base}_max"), json!(l.max));
            out.insert(format!("{base}_max_length"), json!(l.max_length));
        }
        out.insert("iops_size".into(), json!(limits.iops_size));
        out.insert("group".into(), json!(device));
    }
    out
}

/// `fields` of the disk `device`, or QEMU's zeros for a node with no device.
pub(super) fn device_fields(m: &Monitor, device: Option<&str>) -> Map<String, Value> {
    match device.and_then(|d| m.disks.get(d)) {
        Some(disk) => fields(&disk.id, &disk.throttle.limits()),
        None => fields("", &Limits::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Limits, QmpError> {
        let Value::Object(map) = v else { panic!() };
        let mut args = Args::new(map);
        let limits = limits(&mut args)?;
        args.finish()?;
        Ok(limits)
    }

    #[test]
    fn the_six_base_limits_are_required_and_bursts_are_optional() {
        let err = parse(json!({"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 500, "iops_rd": 0}))
            .unwrap_err();
        assert_eq!(err.desc, "Parameter 'iops_wr' is missing");
        let l = parse(
            json!({"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 500, "iops_rd": 0, "iops_wr": 0,
            "iops_max": 1000, "iops_max_length": 5, "iops_size": 4096}),
        )
        .unwrap();
        assert_eq!(
            (
                l.iops_total.avg,
                l.iops_total.max,
                l.iops_total.max_length,
                l.iops_size
            ),
            (500, 1000, 5, 4096)
        );
        let err = parse(
            json!({"bps": -1, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}),
        )
        .unwrap_err();
        assert_eq!(
            err.desc,
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        let err = parse(
            json!({"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0, "iops_min": 3}),
        )
        .unwrap_err();
        assert!(err.desc.contains("iops_min"), "{}", err.desc);
    }

    #[test]
    fn query_fields_are_qemus() {
        let off = fields("vda", &Limits::default());
        assert_eq!(
            Value::Object(off),
            json!({"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0})
        );
        let mut on = Limits::default();
        on.iops_total.avg = 500;
        let on = fields("vda", &on);
        assert_eq!(on["iops"], json!(500));
        assert_eq!(on["iops_max"], json!(0));
        assert_eq!(on["iops_max_length"], json!(1));
        assert_eq!(on["group"], json!("vda"));
        assert_eq!(on.len(), 6 + 12 + 2);
    }
}
