//! Every command in every status a job can be held in, against QEMU's
//! verb table and QEMU's extra checks.

use super::*;
use JobStatus::*;

/// The statuses a command can find a job in. `waiting` and `aborting` only
/// exist inside one locked operation, and no job kind here reaches `ready`
/// or `standby`; `null` jobs are gone (see `unknown_ids_are_not_found`).
const HELD: [JobStatus; 5] = [Created, Running, Paused, Pending, Concluded];

/// A job `j` held in `status` (paused by the user if `user_paused`),
/// driven by the returned control.
fn job_in(h: &Harness, status: JobStatus, user_paused: bool) -> Control {
    let (driver, control) = remote(MIB);
    let options = JobOptions {
        auto_finalize: status != Pending,
        auto_dismiss: status != Concluded,
        speed: 0,
    };
    h.create("j", driver, options);
    if status != Created {
        h.jobs.start("j").unwrap();
        h.wait("j", Running);
    }
    match status {
        Paused => {
            h.jobs.pause("j").unwrap();
            control.send(Order::Progress(1));
            h.wait("j", Paused);
        }
        Pending | Concluded => {
            control.send(Order::Done);
            h.wait("j", status);
        }
        _ => {}
    }
    if user_paused && status != Paused {
        h.jobs.pause("j").unwrap();
    }
    control
}

fn apply(jobs: &JobManager, verb: JobVerb) -> Result<(), JobError> {
    match verb {
        JobVerb::Cancel => jobs.cancel("j"),
        JobVerb::Pause => jobs.pause("j"),
        JobVerb::Resume => jobs.resume("j"),
        JobVerb::SetSpeed => jobs.set_speed("j", 1),
        JobVerb::Complete => jobs.complete("j"),
        JobVerb::Finalize => jobs.finalize("j"),
        JobVerb::Dismiss => jobs.dismiss("j"),
        JobVerb::Change => jobs.change("j"),
    }
}

/// Checks one command on a job in `status`.
fn check(status: JobStatus, user_paused: bool, verb: JobVerb) {
    let h = Harness::new();
    let control = job_in(&h, status, user_paused);
    let user_paused = user_paused || status == Paused;
    let accepted = accepts(status, verb);
    let result = apply(&h.jobs, verb);
    let case = format!("{verb} in {status}, user-paused {user_paused}: {result:?}");
    match (&result, verb) {
        // QEMU checks this before the verb table.
        (Err(JobError::NotPaused { id }), JobVerb::Resume) => {
            assert!(!user_paused && id == "j", "{case}")
        }
        (
            Err(
                err @ JobError::VerbRefused {
                    id,
                    status: s,
                    verb: v,
                },
            ),
            _,
        ) => {
            assert!(
                !accepted && id == "j" && *s == status && *v == verb,
                "{case}"
            );
            assert_eq!(
                err.to_string(),
                format!("Job 'j' in state '{status}' cannot accept command verb '{verb}'")
            );
        }
        (Err(JobError::AlreadyPaused { .. }), JobVerb::Pause) => {
            assert!(accepted && user_paused, "{case}")
        }
        (Err(JobError::CannotComplete { .. }), JobVerb::Complete)
        | (Err(JobError::ChangeUnsupported { .. }), JobVerb::Change) => {
            assert!(accepted, "{case}")
        }
        (Ok(()), _) => {
            assert!(accepted, "{case}");
            assert!(verb != JobVerb::Resume || user_paused, "{case}");
            assert!(verb != JobVerb::Pause || !user_paused, "{case}");
        }
        _ => panic!("unexpected: {case}"),
    }
    if result.is_ok() {
        check_effect(&h, status, verb);
    }
    drop(control);
}

/// What an accepted command did.
fn check_effect(h: &Harness, status: JobStatus, verb: JobVerb) {
    match verb {
        JobVerb::Cancel => {
            // A running job is inside a step until its driver returns; the
            // dropped control makes it return.
            if status != Running {
                h.wait("j", Null);
            }
            let lines = h.lines();
            if status == Running {
                return;
            }
            assert!(
                lines.iter().any(|l| l.contains(r#""aborting""#)),
                "{lines:?}"
            );
        }
        JobVerb::Pause => assert!(h.jobs.info("j").unwrap().paused),
        JobVerb::Resume if status != Created => {
            h.wait("j", Running);
            assert!(!h.jobs.info("j").unwrap().paused);
        }
        JobVerb::SetSpeed => assert_eq!(h.jobs.info("j").unwrap().speed, 1),
        JobVerb::Finalize => assert!(h.jobs.query().is_empty(), "auto-dismissed"),
        JobVerb::Dismiss => assert!(h.jobs.query().is_empty()),
        _ => {}
    }
}

#[test]
fn every_verb_in_every_held_status() {
    for status in HELD {
        for verb in JobVerb::ALL {
            check(status, false, verb);
            // The user's pause only changes what pause and resume say,
            // and only where a pause can be set.
            if matches!(status, Created | Running) {
                check(status, true, verb);
            }
        }
    }
}

#[test]
fn unknown_ids_are_not_found() {
    let jobs = JobManager::new();
    let results = [
        jobs.start("nope"),
        jobs.pause("nope"),
        jobs.resume("nope"),
        jobs.cancel("nope"),
        jobs.set_speed("nope", 1),
        jobs.complete("nope"),
        jobs.finalize("nope"),
        jobs.dismiss("nope"),
        jobs.change("nope"),
        jobs.drained_begin("nope"),
        jobs.drained_end("nope"),
        jobs.info("nope").map(drop),
        jobs.wait_for("nope", Running, Duration::ZERO),
    ];
    for result in results {
        let err = result.unwrap_err();
        assert!(matches!(&err, JobError::NotFound { id } if id == "nope"));
        assert_eq!(err.to_string(), "Job 'nope' not found");
        assert_eq!(err.id(), "nope");
    }
    // Waiting for a gone job to be gone succeeds.
    jobs.wait_for("nope", Null, Duration::ZERO).unwrap();
}

/// A job cancelled before it started reports no outcome, and is dismissed
/// even without auto-dismiss (QEMU's `job_conclude` for unstarted jobs).
#[test]
fn cancel_before_start() {
    let h = Harness::new();
    let (driver, control) = remote(MIB);
    h.create("j", driver, kept());
    h.jobs.cancel("j").unwrap();
    let statuses: Vec<_> = h
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            JobEvent::StatusChange { status, .. } => status.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(statuses, ["created", "aborting", "concluded", "null"]);
    assert_eq!(*control.calls.lock().unwrap(), ["abort", "clean"]);
    assert!(h.jobs.query().is_empty());
}

#[test]
fn start_only_once() {
    let h = Harness::new();
    let (driver, _control) = remote(MIB);
    h.create("j", driver, JobOptions::default());
    h.jobs.start("j").unwrap();
    let err = h.jobs.start("j").unwrap_err();
    assert_eq!(err.to_string(), "Job 'j' has already been started");
}
