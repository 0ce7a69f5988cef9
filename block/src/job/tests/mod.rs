//! Tests of the job runtime, with fake drivers and no disks.
//!
//! `sequences` replays what a real qemu-storage-daemon printed; `verbs`
//! tries every command in every status a job can be held in; `runtime`
//! covers the speed limit, pause, shutdown and the driver's callbacks.

mod runtime;
mod sequences;
mod verbs;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

const MIB: u64 = 1 << 20;

/// Long enough for any wait in these tests on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// Default options, but the job stays once concluded (no auto-dismiss).
fn kept() -> JobOptions {
    JobOptions {
        auto_dismiss: false,
        ..JobOptions::default()
    }
}

/// The driver callbacks a fake driver saw, in order.
type Calls = Arc<Mutex<Vec<&'static str>>>;

/// A backup-like job: `total` bytes in `chunk`-sized steps, failing with a
/// read error once `fail_at` bytes are done, if set.
struct Copier {
    total: u64,
    chunk: u64,
    done: u64,
    fail_at: Option<u64>,
    calls: Calls,
}

impl Copier {
    fn new(total: u64, chunk: u64) -> Self {
        Self {
            total,
            chunk,
            done: 0,
            fail_at: None,
            calls: Calls::default(),
        }
    }

    fn failing_at(mut self, at: u64) -> Self {
        self.fail_at = Some(at);
        self
    }
}

impl JobDriver for Copier {
    fn job_type(&self) -> &'static str {
        "backup"
    }
    fn total(&self) -> u64 {
        self.total
    }
    fn step(&mut self) -> Result<Step, JobFailure> {
        if Some(self.done) == self.fail_at {
            let eio = io::Error::from_raw_os_error(libc::EIO);
            return Err(JobFailure::io(IoOperation::Read, &eio));
        }
        if self.done >= self.total {
            return Ok(Step::Done);
        }
        let bytes = self.chunk.min(self.total - self.done);
        self.done += bytes;
        Ok(Step::Progress(bytes))
    }
    fn commit(&mut self) {
        self.calls.lock().unwrap().push("commit");
    }
    fn abort(&mut self) {
        self.calls.lock().unwrap().push("abort");
    }
    fn clean(&mut self) {
        self.calls.lock().unwrap().push("clean");
    }
}

/// What a [`Remote`] job's next step returns.
enum Order {
    Progress(u64),
    Done,
    Fail(JobFailure),
    Panic,
    /// The step succeeds, and the job's thread panics outside the step,
    /// when it next asks for the total.
    PanicAfterStep,
}

/// A job whose every step waits for the test's order, so a test can hold
/// it in a status. With the sender gone, steps finish the job.
struct Remote {
    orders: Receiver<Order>,
    total: Arc<AtomicU64>,
    calls: Calls,
    panic_in_total: std::sync::atomic::AtomicBool,
}

impl JobDriver for Remote {
    fn job_type(&self) -> &'static str {
        "backup"
    }
    fn total(&self) -> u64 {
        if self.panic_in_total.swap(false, Ordering::SeqCst) {
            panic!("the test asked this driver to panic outside a step");
        }
        self.total.load(Ordering::SeqCst)
    }
    fn step(&mut self) -> Result<Step, JobFailure> {
        match self.orders.recv() {
            Ok(Order::PanicAfterStep) => {
                self.panic_in_total.store(true, Ordering::SeqCst);
                Ok(Step::Progress(512))
            }
            Ok(Order::Progress(bytes)) => Ok(Step::Progress(bytes)),
            Ok(Order::Done) | Err(_) => Ok(Step::Done),
            Ok(Order::Fail(failure)) => Err(failure),
            Ok(Order::Panic) => panic!("the test asked this driver to panic"),
        }
    }
    fn commit(&mut self) {
        self.calls.lock().unwrap().push("commit");
    }
    fn abort(&mut self) {
        self.calls.lock().unwrap().push("abort");
    }
    fn clean(&mut self) {
        self.calls.lock().unwrap().push("clean");
    }
}

/// The test's end of a [`Remote`] job.
struct Control {
    orders: Sender<Order>,
    total: Arc<AtomicU64>,
    calls: Calls,
}

fn remote(total: u64) -> (Remote, Control) {
    let (orders, rx) = channel();
    let total = Arc::new(AtomicU64::new(total));
    let calls = Calls::default();
    let driver = Remote {
        orders: rx,
        total: Arc::clone(&total),
        calls: Arc::clone(&calls),
        panic_in_total: Default::default(),
    };
    (
        driver,
        Control {
            orders,
            total,
            calls,
        },
    )
}

impl Control {
    fn send(&self, order: Order) {
        self.orders.send(order).unwrap();
    }
}

/// A manager whose jobs all report to one event list.
struct Harness {
    jobs: JobManager,
    events: Arc<Mutex<Vec<JobEvent>>>,
}

impl Harness {
    fn new() -> Self {
        Self {
            jobs: JobManager::new(),
            events: Arc::default(),
        }
    }

    fn sink(&self) -> EventSink {
        let events = Arc::clone(&self.events);
        Arc::new(move |event| events.lock().unwrap().push(event))
    }

    fn create(&self, id: &str, driver: impl JobDriver, options: JobOptions) {
        self.jobs
            .create(id, Box::new(driver), options, self.sink())
            .unwrap();
    }

    /// Starts a job the way blockdev-backup does in QEMU: inside a drained
    /// section, which parks the job at its first pause point (`paused`)
    /// until the section ends (`running`). The recorded sequences have
    /// this pair, so the tests make it too.
    fn start_like_qemu(&self, id: &str) {
        self.jobs.drained_begin(id).unwrap();
        self.jobs.start(id).unwrap();
        self.wait(id, JobStatus::Paused);
        self.jobs.drained_end(id).unwrap();
    }

    fn wait(&self, id: &str, status: JobStatus) {
        self.jobs.wait_for(id, status, PATIENCE).unwrap();
    }

    /// Waits until `cond` holds for the job's info.
    fn wait_info(&self, id: &str, cond: impl Fn(&JobInfo) -> bool) -> JobInfo {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let info = self.jobs.info(id).unwrap();
            if cond(&info) {
                return info;
            }
            assert!(Instant::now() < deadline, "gave up waiting: {info:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The events so far, as the JSON lines QEMU prints (key order too).
    fn lines(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(qmp_event).collect()
    }

    /// `query-jobs`'s reply, as QEMU prints it.
    fn query_jobs(&self) -> String {
        let jobs: Vec<_> = self.jobs.query().iter().map(query_jobs_entry).collect();
        format!(r#"{{"return": [{}]}}"#, jobs.join(", "))
    }

    /// `query-block-jobs`'s reply, as QEMU prints it.
    fn query_block_jobs(&self) -> String {
        let jobs: Vec<_> = self
            .jobs
            .query()
            .iter()
            .map(query_block_jobs_entry)
            .collect();
        format!(r#"{{"return": [{}]}}"#, jobs.join(", "))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.jobs.cancel_all_and_wait();
    }
}

fn error_field(error: &Option<String>) -> String {
    error
        .as_ref()
        .map(|e| format!(r#", "error": "{e}""#))
        .unwrap_or_default()
}

/// One event as the JSON line qemu-storage-daemon printed, timestamp left
/// out. A test-only stand-in for the QMP layer's serialization.
fn qmp_event(event: &JobEvent) -> String {
    match event {
        JobEvent::StatusChange { id, status } => format!(
            r#"{{"event": "JOB_STATUS_CHANGE", "data": {{"status": "{status}", "id": "{id}"}}}}"#
        ),
        JobEvent::Pending { job_type, id } => format!(
            r#"{{"event": "BLOCK_JOB_PENDING", "data": {{"type": "{job_type}", "id": "{id}"}}}}"#
        ),
        JobEvent::IoError { id, operation } => format!(
            r#"{{"event": "BLOCK_JOB_ERROR", "data": {{"device": "{id}", "operation": "{}", "action": "report"}}}}"#,
            operation.as_str()
        ),
        JobEvent::Completed {
            job_type,
            id,
            len,
            offset,
            speed,
            error,
        } => format!(
            r#"{{"event": "BLOCK_JOB_COMPLETED", "data": {{"device": "{id}", "len": {len}, "offset": {offset}, "speed": {speed}, "type": "{job_type}"{}}}}}"#,
            error_field(error)
        ),
        JobEvent::Cancelled {
            job_type,
            id,
            len,
            offset,
            speed,
        } => format!(
            r#"{{"event": "BLOCK_JOB_CANCELLED", "data": {{"device": "{id}", "len": {len}, "offset": {offset}, "speed": {speed}, "type": "{job_type}"}}}}"#
        ),
    }
}

fn query_jobs_entry(job: &JobInfo) -> String {
    format!(
        r#"{{"current-progress": {}, "status": "{}", "total-progress": {}, "type": "{}", "id": "{}"{}}}"#,
        job.current_progress,
        job.status,
        job.total_progress,
        job.job_type,
        job.id,
        error_field(&job.error)
    )
}

fn query_block_jobs_entry(job: &JobInfo) -> String {
    let ready = matches!(job.status, JobStatus::Ready | JobStatus::Standby);
    format!(
        r#"{{"auto-finalize": {}, "io-status": "ok", "device": "{}", "auto-dismiss": {}, "busy": {}, "len": {}, "offset": {}, "status": "{}", "paused": {}, "speed": {}, "ready": {ready}, "type": "{}"{}}}"#,
        job.auto_finalize,
        job.id,
        job.auto_dismiss,
        job.busy,
        job.total_progress,
        job.current_progress,
        job.status,
        job.paused,
        job.speed,
        job.job_type,
        error_field(&job.error)
    )
}
