//! Commands about the machine as a whole: version, run state, quit.

use serde_json::{json, Value};

use super::Monitor;
use crate::qmp::{version_triple, Args, QmpError};
use crate::runstate::{ContError, Phase};

/// `query-version`: our own version, in QEMU's shape.
pub(super) fn query_version(args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(version_info(env!("CARGO_PKG_VERSION")))
}

/// QEMU's `VersionInfo` for a build whose Cargo version is `version`.
fn version_info(version: &str) -> Value {
    let (major, minor, micro) = version_triple(version);
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("vmm {version}"),
    })
}

/// `query-status`.
pub(super) fn query_status(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let running = m.run.is_running();
    let status = match m.run.phase() {
        Phase::InMigrate => "inmigrate",
        Phase::PostMigrate => "postmigrate",
        Phase::Normal if running => "running",
        Phase::Normal => "paused",
    };
    Ok(json!({"running": running, "status": status}))
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
    match m.run.phase() {
        Phase::InMigrate => {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ))
        }
        Phase::PostMigrate => {
            // The destination may run on these images: take them back
            // only if nobody holds them (QEMU re-activates the same way).
            m.graph
                .activate_images()
                .map_err(|e| QmpError::generic(e.to_string()))?;
            m.run.set_phase(Phase::Normal);
        }
        Phase::Normal => {}
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::Session;

    /// The greeting and `query-version` read the version one way, a
    /// pre-release included.
    #[test]
    fn greeting_and_query_version_agree() {
        for version in [env!("CARGO_PKG_VERSION"), "0.1.0-rc1", "1.2.3-rc1", "4.5"] {
            let greeting: Value = serde_json::from_slice(&Session::greeting_for(version)).unwrap();
            assert_eq!(
                greeting["QMP"]["version"],
                version_info(version),
                "{version}"
            );
        }
        assert_eq!(
            version_info("1.2.3-rc1")["qemu"],
            json!({"major": 1, "minor": 2, "micro": 3})
        );
    }
}
