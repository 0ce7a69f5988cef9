//! The runtime's own behaviour: the speed limit, pause, drains, shutdown,
//! and what happens to a driver's callbacks.

use std::thread::sleep;

use super::*;
use JobStatus::*;

const KIB: u64 = 1 << 10;

fn slow(speed: i64) -> JobOptions {
    JobOptions {
        speed,
        ..JobOptions::default()
    }
}

#[test]
fn speed_limit_bounds_the_average_rate() {
    const SPEED: u64 = MIB;
    const CHUNK: u64 = 64 * KIB;
    const TOTAL: u64 = 512 * KIB;
    let h = Harness::new();
    h.create("j", Copier::new(TOTAL, CHUNK), slow(SPEED as i64));
    let start = Instant::now();
    h.jobs.start("j").unwrap();
    // At no time may the job be more than one step ahead of the limit.
    let within_limit = |done: u64, elapsed: Duration| {
        done as f64 <= SPEED as f64 * elapsed.as_secs_f64() + CHUNK as f64
    };
    while let Ok(info) = h.jobs.info("j") {
        let elapsed = start.elapsed();
        assert!(
            within_limit(info.current_progress, elapsed),
            "{} bytes after {elapsed:?}",
            info.current_progress
        );
        if info.current_progress == TOTAL {
            break;
        }
        sleep(Duration::from_millis(10));
    }
    h.wait("j", Null);
    let elapsed = start.elapsed();
    assert!(within_limit(TOTAL, elapsed), "{elapsed:?}");
    // Not a timing test, only a sign the limit did not stall the job.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[test]
fn set_speed_wakes_a_sleeping_job() {
    let h = Harness::new();
    h.create("j", Copier::new(64 * MIB, MIB), slow(1));
    h.jobs.start("j").unwrap();
    h.wait_info("j", |info| info.current_progress == MIB);
    let asked = Instant::now();
    h.jobs.set_speed("j", 0).unwrap();
    h.wait("j", Null);
    // Without the wake-up the job would sleep on for up to 10 s.
    assert!(asked.elapsed() < Duration::from_secs(5));
}

#[test]
fn setting_the_same_speed_again_keeps_the_limit() {
    const SPEED: u64 = 256 * KIB;
    const CHUNK: u64 = 64 * KIB;
    let h = Harness::new();
    h.create("j", Copier::new(64 * MIB, CHUNK), slow(SPEED as i64));
    let start = Instant::now();
    h.jobs.start("j").unwrap();
    // A careless client repeating the speed it already set.
    while start.elapsed() < Duration::from_millis(500) {
        h.jobs.set_speed("j", SPEED as i64).unwrap();
        sleep(Duration::from_millis(1));
    }
    let done = h.jobs.info("j").unwrap().current_progress;
    let allowed = SPEED as f64 * start.elapsed().as_secs_f64() + CHUNK as f64;
    assert!(
        done as f64 <= allowed,
        "{done} bytes in {:?}",
        start.elapsed()
    );
}

#[test]
fn pause_holds_progress_still() {
    let h = Harness::new();
    h.create("j", Copier::new(64 * MIB, 64 * KIB), slow(MIB as i64));
    h.jobs.start("j").unwrap();
    h.wait_info("j", |info| info.current_progress >= 128 * KIB);
    h.jobs.pause("j").unwrap();
    h.wait("j", Paused);
    let before = h.jobs.info("j").unwrap();
    sleep(Duration::from_millis(200));
    let after = h.jobs.info("j").unwrap();
    assert_eq!(after.current_progress, before.current_progress);
    assert_eq!(after.status, Paused);
    assert!(after.paused && !after.busy);
    h.jobs.resume("j").unwrap();
    h.wait_info("j", |info| info.current_progress > before.current_progress);
}

#[test]
fn a_job_paused_before_start_parks_at_once() {
    let h = Harness::new();
    let (driver, control) = remote(MIB);
    h.create("j", driver, JobOptions::default());
    h.jobs.pause("j").unwrap();
    h.jobs.start("j").unwrap();
    h.wait("j", Paused);
    h.jobs.resume("j").unwrap();
    h.wait("j", Running);
    control.send(Order::Done);
    h.wait("j", Null);
    let statuses: Vec<_> = h.lines().iter().take(4).cloned().collect();
    for (line, status) in statuses
        .iter()
        .zip(["created", "running", "paused", "running"])
    {
        assert!(line.contains(&format!(r#""status": "{status}""#)), "{line}");
    }
}

#[test]
fn resume_does_not_end_a_drain() {
    let h = Harness::new();
    let (driver, control) = remote(MIB);
    h.create("j", driver, JobOptions::default());
    h.jobs.start("j").unwrap();
    h.jobs.drained_begin("j").unwrap();
    h.jobs.pause("j").unwrap();
    control.send(Order::Progress(1));
    h.wait("j", Paused);
    h.jobs.resume("j").unwrap();
    sleep(Duration::from_millis(50));
    let info = h.jobs.info("j").unwrap();
    assert_eq!(info.status, Paused);
    assert!(info.paused);
    h.jobs.drained_end("j").unwrap();
    h.wait("j", Running);
    let err = h.jobs.drained_end("j").unwrap_err();
    assert_eq!(err.to_string(), "Job 'j' is not drained");
}

#[test]
fn a_job_let_go_reads_running_as_soon_as_the_command_returns() {
    // A client's query right after blockdev-backup (a drained start) or
    // job-resume must see `running`, as QEMU's do, however late the job's
    // thread gets to run. Repeated: a late thread is a matter of chance.
    for n in 0..100 {
        let h = Harness::new();
        let (drained, _control) = remote(MIB);
        h.create("d", drained, JobOptions::default());
        h.start_like_qemu("d");
        assert_eq!(h.jobs.info("d").unwrap().status, Running, "run {n}");
        let (paused, _control) = remote(MIB);
        h.create("p", paused, JobOptions::default());
        h.jobs.pause("p").unwrap();
        h.jobs.start("p").unwrap();
        h.wait("p", Paused);
        h.jobs.resume("p").unwrap();
        assert_eq!(h.jobs.info("p").unwrap().status, Running, "run {n}");
        h.jobs.cancel("d").unwrap();
        h.jobs.cancel("p").unwrap();
    }
}

#[test]
fn total_may_change_while_running() {
    let h = Harness::new();
    let (driver, control) = remote(MIB);
    h.create("j", driver, JobOptions::default());
    assert_eq!(h.jobs.info("j").unwrap().total_progress, MIB);
    h.jobs.start("j").unwrap();
    control.total.store(2 * MIB, Ordering::SeqCst);
    control.send(Order::Progress(10));
    let info = h.wait_info("j", |info| info.current_progress == 10);
    assert_eq!(info.total_progress, 2 * MIB);
}

#[test]
fn a_failed_step_concludes_with_its_error() {
    let h = Harness::new();
    let (driver, control) = remote(MIB);
    h.create("j", driver, kept());
    h.jobs.start("j").unwrap();
    control.send(Order::Progress(512));
    control.send(Order::Fail(JobFailure::new("Target is full")));
    h.wait("j", Concluded);
    let info = h.jobs.info("j").unwrap();
    assert_eq!(info.error.as_deref(), Some("Target is full"));
    assert_eq!(info.current_progress, 512);
    assert_eq!(*control.calls.lock().unwrap(), ["abort", "clean"]);
    let events = h.events.lock().unwrap().clone();
    assert!(
        !events.iter().any(|e| matches!(e, JobEvent::IoError { .. })),
        "not an I/O error: {events:?}"
    );
    assert!(events.contains(&JobEvent::Completed {
        job_type: "backup",
        id: "j".into(),
        len: MIB,
        offset: 512,
        speed: 0,
        error: Some("Target is full".into()),
    }));
}

#[test]
fn a_panicking_driver_fails_its_job() {
    let h = Harness::new();
    let (driver, control) = remote(MIB);
    h.create("j", driver, kept());
    h.jobs.start("j").unwrap();
    control.send(Order::Panic);
    h.wait("j", Concluded);
    let info = h.jobs.info("j").unwrap();
    assert_eq!(info.error.as_deref(), Some("The backup job 'j' panicked"));
    assert_eq!(*control.calls.lock().unwrap(), ["abort", "clean"]);
}

/// A panic on the job's thread outside the driver's step (here, asking
/// for the total) fails the job too, through the thread helper, instead
/// of leaving it `running` with no thread.
#[test]
fn a_panic_outside_a_step_fails_the_job() {
    let h = Harness::new();
    let (driver, control) = remote(MIB);
    h.create("j", driver, kept());
    h.jobs.start("j").unwrap();
    control.send(Order::PanicAfterStep);
    h.wait("j", Concluded);
    let info = h.jobs.info("j").unwrap();
    assert_eq!(info.error.as_deref(), Some("The backup job 'j' panicked"));
    assert_eq!(*control.calls.lock().unwrap(), ["abort", "clean"]);
}

#[test]
fn waiting_times_out_naming_the_status() {
    let h = Harness::new();
    let (driver, _control) = remote(MIB);
    h.create("j", driver, JobOptions::default());
    h.jobs.start("j").unwrap();
    h.wait("j", Running);
    let err = h
        .jobs
        .wait_for("j", Pending, Duration::from_millis(50))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Job 'j' did not reach state 'pending' within 50ms; it is in state 'running'"
    );
}

#[test]
fn dismiss_removes_a_job_from_query() {
    let h = Harness::new();
    h.create("j", Copier::new(MIB, 64 * KIB), kept());
    h.jobs.start("j").unwrap();
    h.wait("j", Concluded);
    assert_eq!(h.jobs.query().len(), 1);
    h.jobs.dismiss("j").unwrap();
    assert!(h.jobs.query().is_empty());
    assert!(matches!(h.jobs.info("j"), Err(JobError::NotFound { .. })));
    // The id is free again.
    h.create("j", Copier::new(MIB, 64 * KIB), JobOptions::default());
}

#[test]
fn query_lists_newest_first() {
    let h = Harness::new();
    for id in ["a", "b", "c"] {
        h.create(id, Copier::new(MIB, MIB), JobOptions::default());
    }
    let ids: Vec<_> = h.jobs.query().into_iter().map(|info| info.id).collect();
    assert_eq!(ids, ["c", "b", "a"]);
}

#[test]
fn cancel_all_and_wait_ends_every_job() {
    let h = Harness::new();
    let manual = |finalize, dismiss| JobOptions {
        auto_finalize: finalize,
        auto_dismiss: dismiss,
        speed: 0,
    };
    let copier = || Copier::new(64 * MIB, MIB);
    h.create("created", copier(), JobOptions::default());
    h.create("running", copier(), slow(1));
    h.create("paused", copier(), slow(1));
    h.create("drained", copier(), JobOptions::default());
    h.create("pending", copier(), manual(false, true));
    h.create("concluded", copier(), manual(true, false));
    h.jobs.drained_begin("drained").unwrap();
    for id in ["running", "paused", "drained", "pending", "concluded"] {
        h.jobs.start(id).unwrap();
    }
    h.jobs.pause("paused").unwrap();
    for (id, status) in [
        ("running", Running),
        ("paused", Paused),
        ("drained", Paused),
        ("pending", Pending),
        ("concluded", Concluded),
    ] {
        h.wait(id, status);
    }
    h.jobs.cancel_all_and_wait();
    assert!(h.jobs.query().is_empty());
    let events = h.events.lock().unwrap().clone();
    for id in [
        "created",
        "running",
        "paused",
        "drained",
        "pending",
        "concluded",
    ] {
        let last = events
            .iter()
            .rev()
            .find_map(|e| match e {
                JobEvent::StatusChange { id: i, status } if i == id => Some(*status),
                _ => None,
            })
            .unwrap();
        assert_eq!(last, Null, "{id}");
    }
    let cancelled: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Cancelled { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    // Created and concluded jobs have no outcome to report.
    assert_eq!(cancelled.len(), 4, "{cancelled:?}");
}

#[test]
fn the_manager_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<JobManager>();
}

#[test]
fn io_failures_carry_strerror_text() {
    let eio = io::Error::from_raw_os_error(libc::EIO);
    let failure = JobFailure::io(IoOperation::Write, &eio);
    assert_eq!(failure.message(), "Input/output error");
    assert_eq!(failure.operation(), Some(IoOperation::Write));
    assert_eq!(failure.to_string(), "Input/output error");
    let other = io::Error::other("short read");
    assert_eq!(
        JobFailure::io(IoOperation::Read, &other).message(),
        "short read"
    );
}

/// A job with nothing to copy whose `clean` blocks until the test lets
/// it go, as a backup's does while it drains its I/O.
struct SlowClean {
    entered: Sender<()>,
    release: Receiver<()>,
}

impl JobDriver for SlowClean {
    fn job_type(&self) -> &'static str {
        "backup"
    }
    fn total(&self) -> u64 {
        0
    }
    fn step(&mut self) -> Result<Step, JobFailure> {
        Ok(Step::Done)
    }
    fn clean(&mut self) {
        self.entered.send(()).unwrap();
        let _ = self.release.recv();
    }
}

#[test]
fn queries_do_not_wait_for_a_draining_finalize() {
    for auto_finalize in [true, false] {
        let h = Arc::new(Harness::new());
        let (entered_tx, entered) = channel();
        let (release, release_rx) = channel();
        let driver = SlowClean {
            entered: entered_tx,
            release: release_rx,
        };
        let options = JobOptions {
            auto_finalize,
            ..JobOptions::default()
        };
        h.create("j", driver, options);
        h.jobs.start("j").unwrap();
        // Without auto-finalize a client's job-finalize runs the clean up.
        let finalizer = (!auto_finalize).then(|| {
            h.wait("j", Pending);
            let h = Arc::clone(&h);
            std::thread::spawn(move || h.jobs.finalize("j"))
        });
        entered.recv_timeout(PATIENCE).unwrap();

        // Queries answer at once while the clean up waits.
        let (answers, answered) = channel();
        let querier = {
            let h = Arc::clone(&h);
            std::thread::spawn(move || {
                let all = h.jobs.query();
                let one = h.jobs.info("j");
                answers.send((all, one)).unwrap();
            })
        };
        let (all, one) = answered
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_else(|_| {
                panic!("query-jobs waited for the clean up (auto_finalize={auto_finalize})")
            });
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].status, Pending, "{all:?}");
        assert_eq!(one.unwrap().status, Pending);
        querier.join().unwrap();

        // A command waits for the finalize, as QEMU runs one after another.
        let (done, cancelled) = channel();
        let canceller = {
            let h = Arc::clone(&h);
            std::thread::spawn(move || done.send(h.jobs.cancel("j")).unwrap())
        };
        assert!(cancelled.recv_timeout(Duration::from_millis(200)).is_err());
        release.send(()).unwrap();
        let after = cancelled.recv_timeout(PATIENCE).unwrap();
        assert!(matches!(after, Err(JobError::NotFound { .. })), "{after:?}");
        canceller.join().unwrap();
        if let Some(finalizer) = finalizer {
            finalizer.join().unwrap().unwrap();
        }
        h.wait("j", Null);
        let completed = h
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, JobEvent::Completed { error: None, .. }))
            .count();
        assert_eq!(completed, 1);
    }
}
