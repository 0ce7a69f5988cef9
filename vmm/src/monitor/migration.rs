//! Migration commands in QEMU's names and shapes: `migrate`,
//! `migrate-incoming`, `query-migrate`, `migrate_cancel`, and the
//! parameters and capabilities.

use serde_json::{json, Value};

use super::Monitor;
use crate::migration::{Capabilities, Controller, MigrationUri, Parameters};
use crate::qmp::{Args, QmpError};
use crate::runstate::Phase;

fn controller(m: &Monitor) -> &std::sync::Arc<Controller> {
    m.migration
        .as_ref()
        .expect("the VM's monitor always has a migration controller")
}

fn uri(args: &mut Args) -> Result<MigrationUri, QmpError> {
    args.str("uri")?
        .parse()
        .map_err(|e: crate::migration::uri::UriError| QmpError::generic(e.to_string()))
}

/// `migrate`: starts sending the VM to `uri`; the work goes on on the
/// migration thread, `query-migrate` and the events follow it.
pub(super) fn migrate(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let uri = uri(&mut args)?;
    // QEMU's old per-command switches: `detach` is ignored there too.
    let _ = args.opt_bool("detach")?;
    if args.opt_bool("blk")? == Some(true) || args.opt_bool("inc")? == Some(true) {
        return Err(QmpError::generic(
            "use the 'block' capability (migrate-set-capabilities) instead of 'blk'/'inc'",
        ));
    }
    if args.opt_bool("resume")? == Some(true) {
        return Err(QmpError::generic(
            "postcopy recovery ('resume') is not supported",
        ));
    }
    args.finish()?;
    controller(m).start(uri).map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// `migrate-incoming`: after `--incoming defer`, starts listening.
pub(super) fn migrate_incoming(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let uri = uri(&mut args)?;
    args.finish()?;
    let ctl = controller(m);
    if m.run.phase() != Phase::InMigrate {
        return Err(QmpError::generic(
            "'-incoming' was not specified on the command line",
        ));
    }
    if ctl.status() != crate::migration::Status::None {
        return Err(QmpError::generic(
            "The incoming migration has already been started",
        ));
    }
    if matches!(uri, MigrationUri::File(_)) {
        return Err(QmpError::generic(
            "a state file is restored with --incoming file:PATH on the command line",
        ));
    }
    crate::migration::listen(ctl, &uri).map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({}))
}

/// `query-migrate`.
pub(super) fn query_migrate(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(controller(m).query())
}

/// `migrate_cancel`: the source goes on as before; nothing to do when no
/// migration runs.
pub(super) fn migrate_cancel(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    controller(m).cancel();
    Ok(json!({}))
}

/// `migrate-set-parameters`: `downtime-limit` (ms) and `max-bandwidth`
/// (bytes per second).
pub(super) fn migrate_set_parameters(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let ctl = controller(m);
    let mut params: Parameters = ctl.parameters();
    if let Some(limit) = args.opt_i64("downtime-limit")? {
        let max = crate::migration::MAX_DOWNTIME_MS;
        params.downtime_limit =
            u64::try_from(limit)
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| {
                    QmpError::generic(format!(
                    "Parameter 'downtime_limit' expects an integer in the range of 0 to {} seconds",
                    max / 1000
                ))
                })?;
    }
    if let Some(bw) = args.opt_i64("max-bandwidth")? {
        params.max_bandwidth = u64::try_from(bw).ok().filter(|&b| b > 0).ok_or_else(|| {
            QmpError::generic(
                "Parameter 'max_bandwidth' expects a positive number of bytes per second",
            )
        })?;
    }
    args.finish()?;
    ctl.set_parameters(params);
    Ok(json!({}))
}

/// `query-migrate-parameters`.
pub(super) fn query_migrate_parameters(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let p = controller(m).parameters();
    Ok(json!({"downtime-limit": p.downtime_limit, "max-bandwidth": p.max_bandwidth}))
}

/// `migrate-set-capabilities`: `events` and `block`; refused while a
/// migration runs.
pub(super) fn migrate_set_capabilities(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let ctl = controller(m);
    let mut caps: Capabilities = ctl.capabilities();
    for mut entry in args.args_list("capabilities")? {
        let name = entry.str("capability")?;
        let state = entry.bool("state")?;
        entry.finish()?;
        match name.as_str() {
            "events" => caps.events = state,
            "block" => caps.block = state,
            _ if !state => {}
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter 'capability' does not accept value '{other}'"
                )))
            }
        }
    }
    args.finish()?;
    ctl.set_capabilities(caps).map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// `query-migrate-capabilities`.
pub(super) fn query_migrate_capabilities(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let c = controller(m).capabilities();
    Ok(json!([
        {"capability": "events", "state": c.events},
        {"capability": "block", "state": c.block},
    ]))
}
