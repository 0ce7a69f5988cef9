//! Event sequences and query replies recorded from qemu-storage-daemon
//! 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1) running blockdev-backup
//! sync=full from a 64 MiB file node to another, timestamps left out. The
//! fake job copies the same 64 MiB in 1 MiB steps, so the numbers match.
//!
//! Each sequence starts `created, running, paused, running`: QEMU starts
//! the job inside a drained section, which `start_like_qemu` reproduces.

use super::*;

const LEN: u64 = 64 * MIB;

fn status(s: &str) -> String {
    format!(r#"{{"event": "JOB_STATUS_CHANGE", "data": {{"status": "{s}", "id": "j0"}}}}"#)
}

/// `created, running, paused, running`: create and start in a drain.
fn started() -> Vec<String> {
    ["created", "running", "paused", "running"]
        .into_iter()
        .map(status)
        .collect()
}

fn lines(rest: &[&str]) -> Vec<String> {
    let mut all = started();
    all.extend(rest.iter().map(|l| l.to_string()));
    all
}

const WAITING: &str =
    r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "j0"}}"#;
const PENDING: &str =
    r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "j0"}}"#;
const ABORTING: &str =
    r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "j0"}}"#;
const CONCLUDED: &str =
    r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "j0"}}"#;
const NULL: &str = r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "j0"}}"#;
const PAUSED: &str = r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "paused", "id": "j0"}}"#;
const RUNNING: &str =
    r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j0"}}"#;
const BLOCK_JOB_PENDING: &str =
    r#"{"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "j0"}}"#;
const COMPLETED: &str = r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}}"#;
const CANCELLED_AT_1M: &str = r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "j0", "len": 67108864, "offset": 1048576, "speed": 1, "type": "backup"}}"#;

fn options(auto_finalize: bool, auto_dismiss: bool, speed: i64) -> JobOptions {
    JobOptions {
        auto_finalize,
        auto_dismiss,
        speed,
    }
}

#[test]
fn auto_finalize_auto_dismiss() {
    let h = Harness::new();
    let copier = Copier::new(LEN, MIB);
    let calls = Arc::clone(&copier.calls);
    h.create("j0", copier, options(true, true, 0));
    h.start_like_qemu("j0");
    h.wait("j0", JobStatus::Null);
    assert_eq!(
        h.lines(),
        lines(&[WAITING, PENDING, COMPLETED, CONCLUDED, NULL])
    );
    assert_eq!(h.query_jobs(), r#"{"return": []}"#);
    assert_eq!(*calls.lock().unwrap(), ["commit", "clean"]);
}

#[test]
fn auto_finalize_manual_dismiss() {
    let h = Harness::new();
    h.create("j0", Copier::new(LEN, MIB), options(true, false, 0));
    h.start_like_qemu("j0");
    h.wait("j0", JobStatus::Concluded);
    assert_eq!(
        h.query_jobs(),
        r#"{"return": [{"current-progress": 67108864, "status": "concluded", "total-progress": 67108864, "type": "backup", "id": "j0"}]}"#
    );
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": true, "io-status": "ok", "device": "j0", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 67108864, "status": "concluded", "paused": false, "speed": 0, "ready": false, "type": "backup"}]}"#
    );
    h.jobs.dismiss("j0").unwrap();
    assert_eq!(h.query_jobs(), r#"{"return": []}"#);
    assert_eq!(
        h.lines(),
        lines(&[WAITING, PENDING, COMPLETED, CONCLUDED, NULL])
    );
}

#[test]
fn manual_finalize_auto_dismiss() {
    let h = Harness::new();
    let copier = Copier::new(LEN, MIB);
    let calls = Arc::clone(&copier.calls);
    h.create("j0", copier, options(false, true, 0));
    h.start_like_qemu("j0");
    h.wait("j0", JobStatus::Pending);
    assert_eq!(
        h.query_jobs(),
        r#"{"return": [{"current-progress": 67108864, "status": "pending", "total-progress": 67108864, "type": "backup", "id": "j0"}]}"#
    );
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": false, "io-status": "ok", "device": "j0", "auto-dismiss": true, "busy": false, "len": 67108864, "offset": 67108864, "status": "pending", "paused": false, "speed": 0, "ready": false, "type": "backup"}]}"#
    );
    assert!(calls.lock().unwrap().is_empty(), "nothing before finalize");
    h.jobs.finalize("j0").unwrap();
    // Finalize is synchronous, as in QEMU: all events are out on return.
    assert_eq!(
        h.lines(),
        lines(&[
            WAITING,
            PENDING,
            BLOCK_JOB_PENDING,
            COMPLETED,
            CONCLUDED,
            NULL
        ])
    );
    assert_eq!(h.query_jobs(), r#"{"return": []}"#);
    assert_eq!(*calls.lock().unwrap(), ["commit", "clean"]);
}

#[test]
fn manual_finalize_manual_dismiss() {
    let h = Harness::new();
    h.create("j0", Copier::new(LEN, MIB), options(false, false, 0));
    h.start_like_qemu("j0");
    h.wait("j0", JobStatus::Pending);
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": false, "io-status": "ok", "device": "j0", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 67108864, "status": "pending", "paused": false, "speed": 0, "ready": false, "type": "backup"}]}"#
    );
    h.jobs.finalize("j0").unwrap();
    assert_eq!(
        h.query_jobs(),
        r#"{"return": [{"current-progress": 67108864, "status": "concluded", "total-progress": 67108864, "type": "backup", "id": "j0"}]}"#
    );
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": false, "io-status": "ok", "device": "j0", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 67108864, "status": "concluded", "paused": false, "speed": 0, "ready": false, "type": "backup"}]}"#
    );
    h.jobs.dismiss("j0").unwrap();
    assert_eq!(h.query_jobs(), r#"{"return": []}"#);
    assert_eq!(
        h.lines(),
        lines(&[
            WAITING,
            PENDING,
            BLOCK_JOB_PENDING,
            COMPLETED,
            CONCLUDED,
            NULL
        ])
    );
}

/// blockdev-backup speed=1: the first 1 MiB goes at once, the next would
/// take a million seconds.
fn start_slow(h: &Harness, auto_dismiss: bool) -> Calls {
    let copier = Copier::new(LEN, MIB);
    let calls = Arc::clone(&copier.calls);
    h.create("j0", copier, options(true, auto_dismiss, 1));
    h.start_like_qemu("j0");
    h.wait_info("j0", |info| info.current_progress == MIB);
    calls
}

#[test]
fn cancel_while_running() {
    let h = Harness::new();
    let calls = start_slow(&h, true);
    assert_eq!(
        h.query_jobs(),
        r#"{"return": [{"current-progress": 1048576, "status": "running", "total-progress": 67108864, "type": "backup", "id": "j0"}]}"#
    );
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": true, "io-status": "ok", "device": "j0", "auto-dismiss": true, "busy": false, "len": 67108864, "offset": 1048576, "status": "running", "paused": false, "speed": 1, "ready": false, "type": "backup"}]}"#
    );
    h.jobs.cancel("j0").unwrap();
    h.wait("j0", JobStatus::Null);
    assert_eq!(
        h.lines(),
        lines(&[ABORTING, CANCELLED_AT_1M, CONCLUDED, NULL])
    );
    assert_eq!(*calls.lock().unwrap(), ["abort", "clean"]);
}

#[test]
fn cancel_while_running_manual_dismiss() {
    let h = Harness::new();
    start_slow(&h, false);
    h.jobs.cancel("j0").unwrap();
    h.wait("j0", JobStatus::Concluded);
    assert_eq!(
        h.query_jobs(),
        r#"{"return": [{"current-progress": 1048576, "status": "concluded", "total-progress": 67108864, "type": "backup", "id": "j0", "error": "Operation canceled"}]}"#
    );
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": true, "io-status": "ok", "device": "j0", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 1048576, "status": "concluded", "paused": false, "speed": 1, "ready": false, "type": "backup", "error": "Operation canceled"}]}"#
    );
    h.jobs.dismiss("j0").unwrap();
    assert_eq!(
        h.lines(),
        lines(&[ABORTING, CANCELLED_AT_1M, CONCLUDED, NULL])
    );
}

#[test]
fn pause_resume_then_unlimited() {
    let h = Harness::new();
    start_slow(&h, true);
    h.jobs.pause("j0").unwrap();
    h.wait("j0", JobStatus::Paused);
    assert_eq!(
        h.query_jobs(),
        r#"{"return": [{"current-progress": 1048576, "status": "paused", "total-progress": 67108864, "type": "backup", "id": "j0"}]}"#
    );
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": true, "io-status": "ok", "device": "j0", "auto-dismiss": true, "busy": false, "len": 67108864, "offset": 1048576, "status": "paused", "paused": true, "speed": 1, "ready": false, "type": "backup"}]}"#
    );
    let err = h.jobs.pause("j0").unwrap_err();
    assert_eq!(err.to_string(), "Job is already paused");
    h.jobs.resume("j0").unwrap();
    let err = h.jobs.resume("j0").unwrap_err();
    assert_eq!(err.to_string(), "Can't resume a job that was not paused");
    let err = h.jobs.set_speed("j0", -1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Parameter 'speed' expects a non-negative value"
    );
    h.jobs.set_speed("j0", 0).unwrap();
    h.wait("j0", JobStatus::Null);
    assert_eq!(
        h.lines(),
        lines(&[PAUSED, RUNNING, WAITING, PENDING, COMPLETED, CONCLUDED, NULL])
    );
}

#[test]
fn cancel_while_paused() {
    let h = Harness::new();
    start_slow(&h, true);
    h.jobs.pause("j0").unwrap();
    h.wait("j0", JobStatus::Paused);
    h.jobs.cancel("j0").unwrap();
    h.wait("j0", JobStatus::Null);
    // The job leaves its pause point (running) before it aborts.
    assert_eq!(
        h.lines(),
        lines(&[PAUSED, RUNNING, ABORTING, CANCELLED_AT_1M, CONCLUDED, NULL])
    );
}

#[test]
fn cancel_while_pending() {
    let h = Harness::new();
    let copier = Copier::new(LEN, MIB);
    let calls = Arc::clone(&copier.calls);
    h.create("j0", copier, options(false, true, 0));
    h.start_like_qemu("j0");
    h.wait("j0", JobStatus::Pending);
    for (result, text) in [
        (
            h.jobs.pause("j0"),
            "Job 'j0' in state 'pending' cannot accept command verb 'pause'",
        ),
        (
            h.jobs.set_speed("j0", 5),
            "Job 'j0' in state 'pending' cannot accept command verb 'set-speed'",
        ),
        (
            h.jobs.dismiss("j0"),
            "Job 'j0' in state 'pending' cannot accept command verb 'dismiss'",
        ),
    ] {
        assert_eq!(result.unwrap_err().to_string(), text);
    }
    h.jobs.cancel("j0").unwrap();
    let cancelled = r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "j0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}}"#;
    assert_eq!(
        h.lines(),
        lines(&[
            WAITING,
            PENDING,
            BLOCK_JOB_PENDING,
            ABORTING,
            cancelled,
            CONCLUDED,
            NULL
        ])
    );
    assert_eq!(*calls.lock().unwrap(), ["abort", "clean"]);
}

/// blockdev-backup from a qcow2 node over blkdebug injecting EIO on
/// read_aio: the read after 60 MiB fails.
#[test]
fn failing_read_manual_dismiss() {
    let h = Harness::new();
    let copier = Copier::new(LEN, MIB).failing_at(60 * MIB);
    let calls = Arc::clone(&copier.calls);
    h.create("j1", copier, options(true, false, 0));
    h.start_like_qemu("j1");
    h.wait("j1", JobStatus::Concluded);
    assert_eq!(
        h.query_jobs(),
        r#"{"return": [{"current-progress": 62914560, "status": "concluded", "total-progress": 67108864, "type": "backup", "id": "j1", "error": "Input/output error"}]}"#
    );
    assert_eq!(
        h.query_block_jobs(),
        r#"{"return": [{"auto-finalize": true, "io-status": "ok", "device": "j1", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 62914560, "status": "concluded", "paused": false, "speed": 0, "ready": false, "type": "backup", "error": "Input/output error"}]}"#
    );
    h.jobs.dismiss("j1").unwrap();
    assert_eq!(h.lines(), failed_sequence("j1"));
    assert_eq!(*calls.lock().unwrap(), ["abort", "clean"]);
}

/// A failed job does not stop in pending even without auto-finalize.
#[test]
fn failing_read_manual_finalize() {
    let h = Harness::new();
    h.create(
        "j2",
        Copier::new(LEN, MIB).failing_at(60 * MIB),
        options(false, true, 0),
    );
    h.start_like_qemu("j2");
    h.wait("j2", JobStatus::Null);
    assert_eq!(h.lines(), failed_sequence("j2"));
}

fn failed_sequence(id: &str) -> Vec<String> {
    [
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "ID"}}"#,
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "ID"}}"#,
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "paused", "id": "ID"}}"#,
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "ID"}}"#,
        r#"{"event": "BLOCK_JOB_ERROR", "data": {"device": "ID", "operation": "read", "action": "report"}}"#,
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "ID"}}"#,
        r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "ID", "len": 67108864, "offset": 62914560, "speed": 0, "type": "backup", "error": "Input/output error"}}"#,
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "ID"}}"#,
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "ID"}}"#,
    ]
    .iter()
    .map(|line| line.replace("ID", id))
    .collect()
}

/// blockdev-backup speed=-1: QEMU creates the job, then refuses the speed
/// and drops it.
#[test]
fn negative_speed_at_creation() {
    let h = Harness::new();
    let err = h
        .jobs
        .create(
            "j9",
            Box::new(Copier::new(LEN, MIB)),
            options(true, true, -1),
            h.sink(),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(
        h.lines(),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j9"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "j9"}}"#,
        ]
    );
    assert!(h.jobs.query().is_empty());
}

#[test]
fn refusals_read_as_qemus() {
    let h = Harness::new();
    h.create("j0", Copier::new(LEN, MIB), options(true, false, 1));
    h.start_like_qemu("j0");
    h.wait_info("j0", |info| info.current_progress == MIB);
    let err = h
        .jobs
        .create(
            "j0",
            Box::new(Copier::new(LEN, MIB)),
            JobOptions::default(),
            h.sink(),
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "Job ID 'j0' already in use");
    let err = h
        .jobs
        .create(
            "1bad",
            Box::new(Copier::new(LEN, MIB)),
            JobOptions::default(),
            h.sink(),
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "Invalid job ID '1bad'");
    for (result, text) in [
        (
            h.jobs.finalize("j0"),
            "Job 'j0' in state 'running' cannot accept command verb 'finalize'",
        ),
        (
            h.jobs.dismiss("j0"),
            "Job 'j0' in state 'running' cannot accept command verb 'dismiss'",
        ),
        (
            h.jobs.complete("j0"),
            "Job 'j0' in state 'running' cannot accept command verb 'complete'",
        ),
        (
            h.jobs.resume("j0"),
            "Can't resume a job that was not paused",
        ),
        (h.jobs.change("j0"), "Job type does not support change"),
    ] {
        assert_eq!(result.unwrap_err().to_string(), text);
    }
    h.jobs.cancel("j0").unwrap();
    h.wait("j0", JobStatus::Concluded);
    for (result, text) in [
        (
            h.jobs.cancel("j0"),
            "Job 'j0' in state 'concluded' cannot accept command verb 'cancel'",
        ),
        (
            h.jobs.pause("j0"),
            "Job 'j0' in state 'concluded' cannot accept command verb 'pause'",
        ),
        (
            h.jobs.resume("j0"),
            "Can't resume a job that was not paused",
        ),
        (
            h.jobs.finalize("j0"),
            "Job 'j0' in state 'concluded' cannot accept command verb 'finalize'",
        ),
        (
            h.jobs.set_speed("j0", 3),
            "Job 'j0' in state 'concluded' cannot accept command verb 'set-speed'",
        ),
    ] {
        assert_eq!(result.unwrap_err().to_string(), text);
    }
    h.jobs.dismiss("j0").unwrap();
    let err = h.jobs.dismiss("j0").unwrap_err();
    assert!(matches!(&err, JobError::NotFound { id } if id == "j0"));
    assert_eq!(err.to_string(), "Job 'j0' not found");
}
