//! The registry of jobs and the commands a user (QMP) or the VM sends
//! them. Each command checks QEMU's verb table and QEMU's extra checks, in
//! QEMU's order, so it fails with the message QEMU would give.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base::sync::lock;

use super::runner::{Job, JobState, Registry};
use super::state::accepts;
use super::{EventSink, JobDriver, JobError, JobInfo, JobOptions, JobStatus, JobVerb};

/// All jobs of a VM; shared through an `Arc`.
#[derive(Default)]
pub struct JobManager {
    jobs: Arc<Registry>,
}

impl JobManager {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a job in status `created`; [`start`](Self::start) runs it.
    ///
    /// The id must be a QEMU id (a letter, then letters, digits, '-', '.',
    /// '_') that no live job has. If this fails, `driver` is dropped
    /// without any of its callbacks. A negative speed is refused after the
    /// job was created, as QEMU does: the client sees `created` then
    /// `null`.
    pub fn create(
        &self,
        id: &str,
        driver: Box<dyn JobDriver>,
        options: JobOptions,
        events: EventSink,
    ) -> Result<(), JobError> {
        if !crate::name::wellformed(id) {
            return Err(JobError::InvalidId { id: id.to_owned() });
        }
        let job = {
            let mut jobs = lock(&self.jobs);
            if jobs.iter().any(|job| job.id == id) {
                return Err(JobError::DuplicateId { id: id.to_owned() });
            }
            let job = Arc::new(Job::new(
                id,
                driver,
                options.auto_finalize,
                options.auto_dismiss,
                options.speed.max(0).unsigned_abs(),
                events,
                Arc::downgrade(&self.jobs),
            ));
            // Taking the new job's lock under the registry's breaks the
            // usual order harmlessly: no one else can reach this job yet.
            job.transition(&mut job.state(), JobStatus::Created);
            jobs.push(Arc::clone(&job));
            job
        };
        if options.speed < 0 {
            job.dismiss(&mut job.state());
            return Err(JobError::NegativeSpeed {
                id: id.to_owned(),
                speed: options.speed,
            });
        }
        Ok(())
    }

    /// Starts a created job's work on its own thread, `job-<id>`.
    ///
    /// Separate from [`create`](Self::create) so that several jobs can be
    /// set up (and drained, or paused) before any of them runs.
    ///
    /// Started inside a drained section, it returns once the job has
    /// reached its first pause point, as QEMU's drained start does (the
    /// job's thread goes there before anything else).
    pub fn start(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        let drained = self.with_job(id, |job, st| {
            if st.started || st.status != JobStatus::Created {
                return Err(JobError::AlreadyStarted { id: id.to_owned() });
            }
            job.start(st)?;
            Ok(st.drains > 0)
        })?;
        if drained {
            let wait = Duration::from_secs(10);
            job.wait_for(JobStatus::Paused, Some(wait))
                .map_err(|now| JobError::Timeout {
                    id: id.to_owned(),
                    wanted: JobStatus::Paused,
                    status: now,
                    waited: wait,
                })?;
        }
        Ok(())
    }

    /// Pauses the job at its next pause point (between steps). Allowed in
    /// `created`, `running`, `paused`, `ready`, `standby`.
    pub fn pause(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            verb(job, st, JobVerb::Pause)?;
            if st.user_paused {
                return Err(JobError::AlreadyPaused { id: id.to_owned() });
            }
            st.user_paused = true;
            job.notify();
            Ok(())
        })
    }

    /// Resumes a job the user paused. Allowed in `created`, `running`,
    /// `paused`, `ready`, `standby`.
    pub fn resume(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            // QEMU checks this before the verb table.
            if !st.user_paused {
                return Err(JobError::NotPaused { id: id.to_owned() });
            }
            verb(job, st, JobVerb::Resume)?;
            st.user_paused = false;
            job.unpark(st);
            job.notify();
            Ok(())
        })
    }

    /// Cancels the job: it aborts (at its next pause point if it is
    /// working) and concludes. Allowed in every status from `created` to
    /// `pending`.
    pub fn cancel(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            verb(job, st, JobVerb::Cancel)?;
            job.cancel(st);
            Ok(())
        })
    }

    /// Sets the speed limit in bytes per second, 0 for none; a sleeping
    /// job re-plans at once. Allowed in `created`, `running`, `paused`,
    /// `ready`, `standby`.
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            verb(job, st, JobVerb::SetSpeed)?;
            if speed < 0 {
                return Err(JobError::NegativeSpeed {
                    id: id.to_owned(),
                    speed,
                });
            }
            let speed = speed.unsigned_abs();
            // A new speed counts from now; the same speed again changes
            // nothing, or a client repeating it would lift the limit.
            if st.speed != speed {
                st.speed = speed;
                st.rate.restart(Instant::now());
                job.notify();
            }
            Ok(())
        })
    }

    /// Asks a `ready` job to complete. Allowed in `ready` and `standby`,
    /// which no job of this runtime reaches yet (it has no job kind with a
    /// completion phase), so it is always refused.
    pub fn complete(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            verb(job, st, JobVerb::Complete)?;
            Err(JobError::CannotComplete { id: id.to_owned() })
        })
    }

    /// Finalizes a `pending` job (one created without auto-finalize): it
    /// commits, cleans up and concludes before this returns.
    pub fn finalize(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            verb(job, st, JobVerb::Finalize)?;
            job.finalize(st);
            Ok(())
        })
    }

    /// Removes a `concluded` job (one created without auto-dismiss).
    pub fn dismiss(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            verb(job, st, JobVerb::Dismiss)?;
            job.dismiss(st);
            Ok(())
        })
    }

    /// `block-job-change`: no job kind here has options to change, so once
    /// the verb table allows it, it is refused as QEMU refuses it for a
    /// backup job.
    pub fn change(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            verb(job, st, JobVerb::Change)?;
            Err(JobError::ChangeUnsupported { id: id.to_owned() })
        })
    }

    /// Holds the job at its next pause point while something needs it
    /// quiet (e.g. a node it uses is drained). Counted, and apart from the
    /// user's pause: `resume` does not end it. Not subject to the verb
    /// table.
    pub fn drained_begin(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            st.drains += 1;
            job.notify();
            Ok(())
        })
    }

    /// Ends one [`drained_begin`](Self::drained_begin).
    pub fn drained_end(&self, id: &str) -> Result<(), JobError> {
        self.with_job(id, |job, st| {
            if st.drains == 0 {
                return Err(JobError::NotDrained { id: id.to_owned() });
            }
            st.drains -= 1;
            job.unpark(st);
            job.notify();
            Ok(())
        })
    }

    /// Every live job, newest first (QEMU's order).
    pub fn query(&self) -> Vec<JobInfo> {
        let jobs = lock(&self.jobs).clone();
        jobs.iter()
            .rev()
            .map(|job| job.info(&job.state()))
            .filter(|info| info.status != JobStatus::Null)
            .collect()
    }

    /// One job; as [`query`](Self::query), it does not wait for a
    /// finalize in progress.
    pub fn info(&self, id: &str) -> Result<JobInfo, JobError> {
        let job = self.find(id)?;
        let info = job.info(&job.state());
        if info.status == JobStatus::Null {
            return Err(JobError::NotFound { id: id.to_owned() });
        }
        Ok(info)
    }

    /// Waits until the job is in `status`, or has passed through it since
    /// the call. A job that is gone counts as `null`. A status it left
    /// before the call is missed: wait for one it stays in (paused,
    /// pending, concluded, null) or cannot have reached yet.
    pub fn wait_for(&self, id: &str, status: JobStatus, timeout: Duration) -> Result<(), JobError> {
        let job = match self.find(id) {
            Ok(job) => job,
            Err(_) if status == JobStatus::Null => return Ok(()),
            Err(err) => return Err(err),
        };
        job.wait_for(status, Some(timeout))
            .map_err(|now| JobError::Timeout {
                id: id.to_owned(),
                wanted: status,
                status: now,
                waited: timeout,
            })
    }

    /// Cancels every job and waits until all are gone and their threads
    /// have ended, for VM shutdown (QEMU's `job_cancel_sync_all`). Ignores
    /// the verb table: pending jobs abort, concluded ones are dismissed.
    /// A job in the middle of a step ends after that step.
    pub fn cancel_all_and_wait(&self) {
        // As QEMU, go round until no job is left: a job without
        // auto-dismiss concludes when cancelled and is dismissed on the
        // next round, and a job may be created meanwhile.
        loop {
            let jobs = lock(&self.jobs).clone();
            if jobs.is_empty() {
                return;
            }
            for job in jobs {
                {
                    let mut st = job.state_settled();
                    if st.status != JobStatus::Null {
                        job.cancel(&mut st);
                    }
                    drop(job.settle(st));
                }
                job.wait_finished();
                if let Some(thread) = job.take_thread() {
                    // A driver's panic was already turned into a failed
                    // job; the thread has nothing more to report.
                    let _ = thread.join();
                }
            }
        }
    }

    /// The live job with this id.
    fn find(&self, id: &str) -> Result<Arc<Job>, JobError> {
        lock(&self.jobs)
            .iter()
            .find(|job| job.id == id)
            .cloned()
            .ok_or_else(|| JobError::NotFound { id: id.to_owned() })
    }

    /// Runs command `f` on the job with this id, its state locked once
    /// no finalize is in progress; a finalize `f` begins ends before this
    /// returns.
    fn with_job<T>(
        &self,
        id: &str,
        f: impl FnOnce(&Arc<Job>, &mut JobState) -> Result<T, JobError>,
    ) -> Result<T, JobError> {
        let job = self.find(id)?;
        let mut st = job.state_settled();
        // It may have reached `null` since it was found.
        if st.status == JobStatus::Null {
            return Err(JobError::NotFound { id: id.to_owned() });
        }
        let result = f(&job, &mut st);
        drop(job.settle(st));
        result
    }
}

/// Refuses `verb` if QEMU's verb table does in the job's status.
fn verb(job: &Job, st: &JobState, verb: JobVerb) -> Result<(), JobError> {
    if accepts(st.status, verb) {
        Ok(())
    } else {
        Err(JobError::VerbRefused {
            id: job.id.clone(),
            status: st.status,
            verb,
        })
    }
}
