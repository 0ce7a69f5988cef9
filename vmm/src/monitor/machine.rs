//! Commands about the machine as a whole: version, run state, quit.

use serde_json::{json, Value};

use super::Monitor;
use crate::qmp::{Args, QmpError};
use crate::runstate::ContError;

/// `query-version`: our own version, in QEMU's shape.
pub(super) fn query_version(args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, micro) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    Ok(json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("vmm {version}"),
    }))
}

/// `query-status`.
pub(super) fn query_status(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let running = m.run.is_running();
    Ok(json!({
        "running": running,
        "status": if running { "running" } else { "paused" },
    }))
}

/// `stop`: vCPUs parked, dataplanes drained, their leases released.
pub(super) fn stop(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    match m.run.pause() {
        Ok(true) => m.events.emit("STOP", None),
        Ok(false) => {}
        Err(e) => return Err(QmpError::generic(e.to_string())),
    }
    Ok(json!({}))
}

/// `cont`: the dataplanes take their leases back; refused, with the VM
/// left paused, while someone else holds one.
pub(super) fn cont(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    match m.run.resume() {
        Ok(true) => m.events.emit("RESUME", None),
        Ok(false) => {}
        Err(ContError::Device(e)) => return Err(QmpError::generic(e.reason)),
        Err(e) => return Err(QmpError::generic(e.to_string())),
    }
    Ok(json!({}))
}

/// `quit`: the VM ends once the reply is sent.
pub(super) fn quit(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    (m.quit)();
    Ok(json!({}))
}
