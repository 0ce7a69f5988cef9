//! Block jobs over QMP: `blockdev-backup`, the `job-*` verbs,
//! `block-job-set-speed`, the queries, and the events jobs send.

use block::bitmap::BitmapSyncMode;
use block::job::backup::{self, Backup, SyncMode};
use block::job::{JobError, JobEvent, JobInfo, JobManager, JobOptions};
use block::{BlockError, Holder};
use serde_json::{json, Value};

use super::block::error as block_error;
use super::Monitor;
use crate::qmp::{Args, EventSink, QmpError};

/// Turns a job's events into QMP events, in QEMU's shapes.
pub(super) fn event_sink(events: EventSink) -> block::job::EventSink {
    std::sync::Arc::new(move |event| {
        let (name, data) = match event {
            JobEvent::StatusChange { id, status } => (
                "JOB_STATUS_CHANGE",
                json!({"id": id, "status": status.as_str()}),
            ),
            JobEvent::Pending { job_type, id } => {
                ("BLOCK_JOB_PENDING", json!({"type": job_type, "id": id}))
            }
            JobEvent::IoError { id, operation } => (
                "BLOCK_JOB_ERROR",
                json!({"device": id, "operation": operation.as_str(), "action": "report"}),
            ),
            JobEvent::Completed {
                job_type,
                id,
                len,
                offset,
                speed,
                error,
            } => {
                let mut data = json!({
                    "type": job_type, "device": id, "len": len, "offset": offset, "speed": speed,
                });
                if let Some(error) = error {
                    data["error"] = json!(error);
                }
                ("BLOCK_JOB_COMPLETED", data)
            }
            JobEvent::Cancelled {
                job_type,
                id,
                len,
                offset,
                speed,
            } => (
                "BLOCK_JOB_CANCELLED",
                json!({"type": job_type, "device": id, "len": len, "offset": offset, "speed": speed}),
            ),
        };
        events.emit(name, Some(data));
    })
}

/// `job-*` commands report every refusal as GenericError, as QEMU does.
fn job_error(e: JobError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// `block-job-*` commands report an unknown job as DeviceNotActive.
fn block_job_error(e: JobError) -> QmpError {
    match e {
        JobError::NotFound { id } => {
            QmpError::device_not_active(format!("Block job '{id}' not found"))
        }
        other => job_error(other),
    }
}

/// `blockdev-backup`: `sync=full`, `incremental` or `bitmap` (with
/// `bitmap`, `bitmap-mode`); the job takes both nodes' leases at once, or
/// is refused naming who holds one.
pub(super) fn blockdev_backup(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let device = args.str("device")?;
    let target = args.str("target")?;
    let sync = args.str("sync")?;
    let job_id = args.opt_str("job-id")?;
    let speed = args.opt_i64("speed")?.unwrap_or(0);
    let auto_finalize = args.opt_bool("auto-finalize")?.unwrap_or(true);
    let auto_dismiss = args.opt_bool("auto-dismiss")?.unwrap_or(true);
    let bitmap = args.opt_str("bitmap")?;
    let bitmap_mode = match args.opt_str("bitmap-mode")? {
        Some(value) => Some(value.parse::<BitmapSyncMode>().map_err(|_| {
            QmpError::generic(format!(
                "Parameter 'bitmap-mode' does not accept value '{value}'"
            ))
        })?),
        None => None,
    };
    for policy in ["on-source-error", "on-target-error"] {
        if let Some(value) = args.opt_str(policy)? {
            if value != "report" {
                return Err(QmpError::generic(format!(
                    "Parameter '{policy}' does not accept value '{value}': backup jobs only report errors"
                )));
            }
        }
    }
    if args.opt_bool("compress")? == Some(true) {
        return Err(QmpError::generic(
            "Parameter 'compress' does not accept value 'true': raw targets cannot be compressed",
        ));
    }
    args.finish()?;
    match sync.as_str() {
        "full" | "incremental" | "bitmap" | "none" => {}
        "top" => {
            return Err(QmpError::generic(format!(
                "Sync mode '{sync}' is not supported: backup jobs copy everything (sync=full), a dirty bitmap's extents (sync=incremental, sync=bitmap) or what a running guest is about to overwrite (sync=none)"
            )))
        }
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'sync' does not accept value '{other}'"
            )))
        }
    }
    let Some(node) = m.graph.nodes().into_iter().find(|n| n.name == device) else {
        return Err(block_error(BlockError::NotFound { name: device }));
    };
    // As QEMU: without a job-id, the job is named after the guest device
    // the node is attached to; a node without one has no default.
    let job_id = job_id.unwrap_or_else(|| {
        node.references
            .iter()
            .find_map(|h| match h {
                Holder::Device { id, .. } => Some(id.clone()),
                _ => None,
            })
            .unwrap_or_default()
    });
    if m.jobs.info(&job_id).is_ok() {
        return Err(job_error(JobError::DuplicateId { id: job_id }));
    }
    let holder = Holder::Job { id: job_id.clone() };
    let source = m.graph.get(&device, holder.clone()).map_err(block_error)?;
    let target = m.graph.get(&target, holder).map_err(block_error)?;
    let (mode, bitmap) = if sync == "none" {
        if bitmap.is_some() || bitmap_mode.is_some() {
            return Err(QmpError::generic(
                "Bitmaps cannot be used with sync mode 'none'",
            ));
        }
        (SyncMode::None, None)
    } else {
        backup::check_sync(&sync, bitmap.as_deref(), bitmap_mode, &source)
            .map_err(|e| QmpError::generic(e.to_string()))?
    };
    // Through the source's holder where it hosts jobs (a running guest's
    // disk with live-jobs=on); else with both nodes to itself.
    let backup = Backup::live(&job_id, &source, &target, mode, bitmap)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let options = JobOptions {
        auto_finalize,
        auto_dismiss,
        speed,
    };
    m.jobs
        .create(&job_id, Box::new(backup), options, m.job_events.clone())
        .map_err(job_error)?;
    // QEMU starts a job inside a drained section, so its clients see
    // created, running, paused, running; ours see the same.
    m.jobs.drained_begin(&job_id).map_err(job_error)?;
    let started = m.jobs.start(&job_id).map_err(job_error);
    m.jobs.drained_end(&job_id).map_err(job_error)?;
    started?;
    Ok(json!({}))
}

fn job_json(j: &JobInfo) -> Value {
    let mut v = json!({
        "id": j.id,
        "type": j.job_type,
        "status": j.status.as_str(),
        "current-progress": j.current_progress,
        "total-progress": j.total_progress,
    });
    if let Some(e) = &j.error {
        v["error"] = json!(e);
    }
    v
}

fn block_job_json(j: &JobInfo) -> Value {
    let mut v = json!({
        "type": j.job_type,
        "device": j.id,
        "len": j.total_progress,
        "offset": j.current_progress,
        "busy": j.busy,
        "paused": j.paused,
        "speed": j.speed,
        "io-status": "ok",
        "ready": false,
        "status": j.status.as_str(),
        "auto-finalize": j.auto_finalize,
        "auto-dismiss": j.auto_dismiss,
    });
    if let Some(e) = &j.error {
        v["error"] = json!(e);
    }
    v
}

/// `query-jobs`.
pub(super) fn query_jobs(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(m.jobs.query().iter().map(job_json).collect()))
}

/// `query-block-jobs`.
pub(super) fn query_block_jobs(m: &Monitor, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(
        m.jobs.query().iter().map(block_job_json).collect(),
    ))
}

/// `job-pause`, `job-resume`, `job-cancel`, `job-finalize`, `job-dismiss`.
pub(super) fn job_verb(m: &Monitor, verb: &str, mut args: Args) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    args.finish()?;
    let jobs: &JobManager = &m.jobs;
    match verb {
        "job-pause" => jobs.pause(&id),
        "job-resume" => jobs.resume(&id),
        "job-cancel" => jobs.cancel(&id),
        "job-finalize" => jobs.finalize(&id),
        _ => jobs.dismiss(&id),
    }
    .map_err(job_error)?;
    Ok(json!({}))
}

/// `block-job-set-speed`.
pub(super) fn block_job_set_speed(m: &Monitor, mut args: Args) -> Result<Value, QmpError> {
    let id = args.str("device")?;
    let speed = args.i64("speed")?;
    args.finish()?;
    m.jobs.set_speed(&id, speed).map_err(block_job_error)?;
    Ok(json!({}))
}
