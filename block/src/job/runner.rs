//! One job: its state, the thread that does its work, and the way it ends
//! (QEMU's `job_completed`, `job_finalize_single`, `job_conclude`).
//!
//! Locks, always taken in this order: a job's `state`, then its `driver`
//! or the registry. The work thread holds only `driver` while it steps,
//! and finalizing holds only `driver` while the driver commits or aborts
//! and cleans up (which may drain I/O): queries never wait for a job's
//! I/O. Commands wait for a finalize in progress, as QEMU runs them one
//! after the other.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use base::sync::{self, lock};
use base::ThreadKind;
use std::time::{Duration, Instant};

use super::rate::RateLimit;
use super::state::can_transition;
use super::{
    EventSink, JobDriver, JobError, JobEvent, JobFailure, JobInfo, JobStatus, JobStatus::*, Step,
};

/// The jobs that have not reached `null`, oldest first.
pub(super) type Registry = Mutex<Vec<Arc<Job>>>;

/// How long a waiting job serves hosted work before it looks at its state
/// again.
const SERVE_SLICE: Duration = Duration::from_millis(20);

/// The error QEMU keeps for a cancelled job: strerror(ECANCELED).
const CANCELLED_ERROR: &str = "Operation canceled";

/// One job.
pub(super) struct Job {
    pub(super) id: String,
    job_type: &'static str,
    state: Mutex<JobState>,
    /// Signalled on every change of `state` a waiter may care about.
    changed: Condvar,
    driver: Mutex<Box<dyn JobDriver>>,
    events: EventSink,
    registry: Weak<Registry>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the runtime knows about a job; guarded by `Job::state`.
pub(super) struct JobState {
    pub(super) status: JobStatus,
    auto_finalize: bool,
    auto_dismiss: bool,
    pub(super) speed: u64,
    pub(super) rate: RateLimit,
    pub(super) user_paused: bool,
    /// Drains in progress (QEMU's `job_pause`, not the user's).
    pub(super) drains: u32,
    /// Cancel was asked for; the job ends as soon as it can.
    pub(super) cancelled: bool,
    pub(super) started: bool,
    /// The work thread has left its loop (QEMU's `deferred_to_main_loop`):
    /// what remains is done by whoever holds the lock.
    work_ended: bool,
    busy: bool,
    /// A finalize has begun and its driver part (commit or abort, clean)
    /// runs without the state lock; commands wait until it is done.
    finalizing: bool,
    /// Held at a pause point: the status to go back to when let go.
    parked: Option<JobStatus>,
    current: u64,
    total: u64,
    error: Option<String>,
    /// Number of status changes so far.
    transitions: u64,
    /// For each status, the value of `transitions` when it was last
    /// entered, so a waiter does not miss a status the job passed through.
    entered: [u64; JobStatus::ALL.len()],
}

impl JobState {
    /// Whether the job should stop at its next pause point.
    fn should_pause(&self) -> bool {
        self.user_paused || self.drains > 0
    }
}

impl Job {
    /// A job in status `undefined`; the caller moves it to `created`.
    pub(super) fn new(
        id: &str,
        driver: Box<dyn JobDriver>,
        auto_finalize: bool,
        auto_dismiss: bool,
        speed: u64,
        events: EventSink,
        registry: Weak<Registry>,
    ) -> Self {
        let state = JobState {
            status: Undefined,
            auto_finalize,
            auto_dismiss,
            speed,
            rate: RateLimit::new(Instant::now()),
            user_paused: false,
            drains: 0,
            cancelled: false,
            started: false,
            work_ended: false,
            busy: false,
            finalizing: false,
            parked: None,
            current: 0,
            total: driver.total(),
            error: None,
            transitions: 0,
            entered: [0; JobStatus::ALL.len()],
        };
        Self {
            id: id.to_owned(),
            job_type: driver.job_type(),
            state: Mutex::new(state),
            changed: Condvar::new(),
            driver: Mutex::new(driver),
            events,
            registry,
            thread: Mutex::new(None),
        }
    }

    /// Locks the job's state, for a query: it may be in the middle of a
    /// finalize.
    pub(super) fn state(&self) -> MutexGuard<'_, JobState> {
        lock(&self.state)
    }

    /// Locks the job's state once no finalize is in progress, for a
    /// command that may change it. Whoever finalizes through the guard
    /// must end with [`settle`](Self::settle).
    pub(super) fn state_settled(&self) -> MutexGuard<'_, JobState> {
        let mut st = self.state();
        while st.finalizing {
            st = self.wait(st, None);
        }
        st
    }

    /// Wakes the work thread and waiters after a change to the state.
    pub(super) fn notify(&self) {
        self.changed.notify_all();
    }

    /// Moves to status `to`, telling the client if it is a change.
    pub(super) fn transition(&self, st: &mut JobState, to: JobStatus) {
        debug_assert!(
            can_transition(st.status, to),
            "job '{}': {} -> {} is not a transition QEMU allows",
            self.id,
            st.status,
            to
        );
        if st.status != to {
            st.status = to;
            st.transitions += 1;
            st.entered[to.index()] = st.transitions;
            (self.events)(JobEvent::StatusChange {
                id: self.id.clone(),
                status: to,
            });
        }
        self.notify();
    }

    /// What `query-jobs` and `query-block-jobs` show.
    pub(super) fn info(&self, st: &JobState) -> JobInfo {
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: st.status,
            current_progress: st.current,
            total_progress: st.total,
            speed: st.speed,
            // As QEMU's pause count: a job that has not started counts as
            // paused too.
            paused: !st.started || st.should_pause(),
            busy: st.busy,
            auto_finalize: st.auto_finalize,
            auto_dismiss: st.auto_dismiss,
            error: st.error.clone(),
        }
    }

    /// Starts the work thread and moves to `running`; if no thread can be
    /// started, the job goes straight to `null`.
    pub(super) fn start(self: &Arc<Self>, st: &mut JobState) -> Result<(), JobError> {
        let job = Arc::clone(self);
        // The thread's first act is to take the state lock, which the
        // caller holds: it sees `running` and the options set so far.
        let failed = Arc::clone(self);
        let spawned = base::spawn(
            ThreadKind::Job,
            format!("job-{}", self.id),
            move || job.run(),
            move || failed.fail_on_panic(),
        );
        match spawned {
            Ok(handle) => {
                *lock(&self.thread) = Some(handle);
                st.started = true;
                st.rate.restart(Instant::now());
                self.transition(st, Running);
                Ok(())
            }
            Err(source) => {
                self.dismiss(st);
                Err(JobError::Spawn {
                    id: self.id.clone(),
                    source,
                })
            }
        }
    }

    /// The work thread: steps the driver until it is done, fails or is
    /// cancelled, honouring pause and the speed limit between steps.
    fn run(self: Arc<Self>) {
        let serves = lock(&self.driver).serves();
        let mut st = self.state();
        let failure = loop {
            st = self.pause_point(st, serves);
            if st.cancelled {
                break None;
            }
            let speed = st.speed;
            if let Some(wait) = st.rate.delay(speed, Instant::now()) {
                // Pause, cancel and set-speed notify, so the sleep ends at
                // once for them.
                st = self.serve_or_wait(st, Some(wait), serves);
                continue;
            }
            st.busy = true;
            drop(st);
            let (result, total) = self.step();
            st = self.state();
            st.busy = false;
            st.total = total;
            match result {
                Ok(Step::Progress(bytes)) => {
                    st.current = st.current.saturating_add(bytes);
                    st.rate.account(bytes);
                }
                Ok(Step::Done) => break None,
                Err(failure) => break Some(failure),
            }
        };
        self.completed(&mut st, failure);
        drop(self.settle(st));
    }

    /// The work thread panicked outside a step (whose panics [`step`]
    /// already turns into a failure): the job fails rather than stay
    /// running with nobody to step it.
    ///
    /// [`step`]: Self::step
    fn fail_on_panic(&self) {
        let mut st = self.state();
        st.busy = false;
        if !st.work_ended {
            let failure =
                JobFailure::new(format!("The {} job '{}' panicked", self.job_type, self.id));
            self.completed(&mut st, Some(failure));
        }
        drop(self.settle(st));
    }

    /// Runs one step of the driver; returns its result and the new total.
    fn step(&self) -> (Result<Step, JobFailure>, u64) {
        let mut driver = lock(&self.driver);
        // A panicking driver fails its job instead of leaving it running
        // for ever with nobody to step it.
        let result = panic::catch_unwind(AssertUnwindSafe(|| driver.step())).unwrap_or_else(|_| {
            Err(JobFailure::new(format!(
                "The {} job '{}' panicked",
                self.job_type, self.id
            )))
        });
        (result, driver.total())
    }

    /// Holds the job in `paused` while it should pause and is not
    /// cancelled (QEMU's `job_pause_point`).
    fn pause_point<'a>(
        &'a self,
        mut st: MutexGuard<'a, JobState>,
        serves: bool,
    ) -> MutexGuard<'a, JobState> {
        if !st.should_pause() || st.cancelled {
            return st;
        }
        let resume_to = st.status;
        let parked = if resume_to == Ready { Standby } else { Paused };
        st.parked = Some(resume_to);
        self.transition(&mut st, parked);
        while st.parked.is_some() && st.should_pause() && !st.cancelled {
            st = self.serve_or_wait(st, None, serves);
        }
        self.unpark(&mut st);
        st
    }

    /// Moves a job held at its pause point back to the status it left, once
    /// nothing holds it there. Done by the command that lets it go (resume,
    /// drained end) as well as by the job's thread, so that a query right
    /// after the command sees it running, as QEMU's clients do, however
    /// late the thread gets to run.
    pub(super) fn unpark(&self, st: &mut JobState) {
        if st.should_pause() && !st.cancelled {
            return;
        }
        if let Some(to) = st.parked.take() {
            self.transition(st, to);
            // Time spent paused is not credit for a burst afterwards.
            st.rate.restart(Instant::now());
        }
    }

    /// Waits as [`Job::wait`] does, but a driver with work others must not
    /// wait for (a hosted job's copy-before-write) does it meanwhile, in
    /// slices short enough that a command is seen soon.
    /// A driver that does not serve waits on the state's condvar as ever,
    /// without letting go of the lock between its caller's check and the
    /// wait (a command's notification could be lost there); one that
    /// serves never sleeps on the condvar, and its caller checks again.
    fn serve_or_wait<'a>(
        &'a self,
        st: MutexGuard<'a, JobState>,
        timeout: Option<Duration>,
        serves: bool,
    ) -> MutexGuard<'a, JobState> {
        if !serves {
            return self.wait(st, timeout);
        }
        let slice = timeout.map_or(SERVE_SLICE, |t| t.min(SERVE_SLICE));
        drop(st);
        if !lock(&self.driver).serve(slice) {
            std::thread::sleep(slice);
        }
        self.state()
    }

    /// Waits for a notification, or at most `timeout`.
    fn wait<'a>(
        &'a self,
        st: MutexGuard<'a, JobState>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, JobState> {
        match timeout {
            Some(timeout) => sync::wait_timeout(&self.changed, st, timeout).0,
            None => sync::wait(&self.changed, st),
        }
    }

    /// Waits until the job is in `status` or has passed through it since
    /// the call; on timeout returns the status it is in.
    pub(super) fn wait_for(
        &self,
        status: JobStatus,
        timeout: Option<Duration>,
    ) -> Result<(), JobStatus> {
        let since = self.state().transitions;
        self.wait_until(timeout, |st| {
            st.status == status || st.entered[status.index()] > since
        })
    }

    /// Waits until the job has run its course after a cancel: `concluded`
    /// (where a job without auto-dismiss stays) or `null`.
    pub(super) fn wait_finished(&self) {
        // Without a timeout the wait only ends when the condition holds.
        let _ = self.wait_until(None, |st| matches!(st.status, Concluded | Null));
    }

    /// Waits until `done` holds for the state; on timeout returns the
    /// status the job is in.
    fn wait_until(
        &self,
        timeout: Option<Duration>,
        done: impl Fn(&JobState) -> bool,
    ) -> Result<(), JobStatus> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.state();
        while !done(&st) {
            let left = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(st.status),
                },
                None => None,
            };
            st = self.wait(st, left);
        }
        Ok(())
    }

    /// Takes the work thread's handle, to join it.
    pub(super) fn take_thread(&self) -> Option<JoinHandle<()>> {
        lock(&self.thread).take()
    }

    /// The work is over, done or not (QEMU's `job_completed`): abort, or
    /// move on to `pending` and finalize unless the user wants to.
    fn completed(&self, st: &mut JobState, failure: Option<JobFailure>) {
        st.work_ended = true;
        if let Some(failure) = failure {
            if let Some(operation) = failure.operation() {
                (self.events)(JobEvent::IoError {
                    id: self.id.clone(),
                    operation,
                });
            }
            st.error = Some(failure.message().to_owned());
        }
        self.update_result(st);
        if st.error.is_some() {
            self.finalize(st);
            return;
        }
        // A job alone in its transaction has no one to wait for.
        self.transition(st, Waiting);
        self.transition(st, Pending);
        if st.auto_finalize {
            self.finalize(st);
        } else {
            (self.events)(JobEvent::Pending {
                job_type: self.job_type,
                id: self.id.clone(),
            });
        }
    }

    /// A cancelled job without an error gets QEMU's cancel error; a job
    /// with an error moves to `aborting` (QEMU's `job_update_rc`).
    fn update_result(&self, st: &mut JobState) {
        if st.error.is_none() && st.cancelled {
            st.error = Some(CANCELLED_ERROR.to_owned());
        }
        if st.error.is_some() {
            self.transition(st, Aborting);
        }
    }

    /// Begins to commit or abort (QEMU's `job_finalize_single`): the
    /// driver's part and the rest follow in [`settle`](Self::settle),
    /// which the caller runs before it lets go of the state.
    pub(super) fn finalize(&self, st: &mut JobState) {
        self.update_result(st);
        st.finalizing = true;
    }

    /// Ends a finalize begun under `st`, if one was: the driver commits or
    /// aborts and cleans up with the state unlocked, so queries go on
    /// while a drain waits for I/O; then the outcome is reported and the
    /// job concludes. Returns the state locked again.
    pub(super) fn settle<'a>(&'a self, st: MutexGuard<'a, JobState>) -> MutexGuard<'a, JobState> {
        if !st.finalizing {
            return st;
        }
        let failed = st.error.is_some();
        drop(st);
        {
            let mut driver = lock(&self.driver);
            if failed {
                driver.abort();
            } else {
                driver.commit();
            }
            driver.clean();
        }
        let mut st = self.state();
        st.finalizing = false;
        // A job that never started did nothing to report.
        if st.started {
            let (job_type, id) = (self.job_type, self.id.clone());
            let (len, offset, speed) = (st.total, st.current, st.speed);
            (self.events)(if st.cancelled {
                JobEvent::Cancelled {
                    job_type,
                    id,
                    len,
                    offset,
                    speed,
                }
            } else {
                JobEvent::Completed {
                    job_type,
                    id,
                    len,
                    offset,
                    speed,
                    error: st.error.clone(),
                }
            });
        }
        self.transition(&mut st, Concluded);
        if st.auto_dismiss || !st.started {
            self.dismiss(&mut st);
        }
        st
    }

    /// Removes the job from the registry and moves it to `null`.
    pub(super) fn dismiss(&self, st: &mut JobState) {
        if let Some(registry) = self.registry.upgrade() {
            lock(&registry).retain(|job| !std::ptr::eq(Arc::as_ptr(job), self));
        }
        st.busy = false;
        self.transition(st, Null);
    }

    /// Cancels the job without asking the verb table (QEMU's
    /// `job_cancel_locked`, always forced): a concluded job is dismissed,
    /// one that has not started or has done its work ends now, a running
    /// one ends at its next pause point.
    pub(super) fn cancel(&self, st: &mut JobState) {
        if st.status == Concluded {
            self.dismiss(st);
            return;
        }
        st.cancelled = true;
        st.user_paused = false;
        if !st.started {
            self.completed(st, None);
        } else if st.work_ended {
            self.finalize(st);
        } else {
            self.notify();
        }
    }
}
