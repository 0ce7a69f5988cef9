//! Block jobs: QEMU's job state machine, and a runtime that drives the work
//! of any job kind (backup, ...) through it, each job on its own thread.
//!
//! ```text
//!  created ──cancel─────────────────────────┐
//!     │ start                               │
//!     ▼       pause, drain                  ▼
//!  running ◄───────────────► paused      aborting ◄── cancel, or a failed step
//!     │ work done   resume, undrain         │         (from running or paused)
//!     ▼                                     │
//!  waiting ──► pending ──cancel, via aborting┤
//!                 │ finalize (or auto)      │
//!                 ▼                         │
//!             concluded ◄───────────────────┘
//!                 │ dismiss (or auto)
//!                 ▼
//!               null
//! ```
//!
//! The runtime owns the statuses; a [`JobDriver`] only does the work, one
//! bounded [`step`](JobDriver::step) at a time. Between steps the runtime
//! honours pause, cancel and the speed limit. Everything a QMP client
//! sees (status changes, `BLOCK_JOB_*` events, `query-jobs`) is reported
//! as typed values; turning them into JSON is the QMP layer's business.

pub mod backup;
pub mod cbw;
mod error;
mod manager;
mod rate;
mod runner;
pub mod state;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::time::Duration;

pub use error::JobError;
pub use manager::JobManager;
pub use state::{accepts, can_transition, JobStatus, JobVerb};

/// What one kind of job does; the runtime drives it through QEMU's states.
pub trait JobDriver: Send + 'static {
    /// QEMU's job type name, e.g. `"backup"`.
    fn job_type(&self) -> &'static str;

    /// Total work in bytes (the progress total); may change while running.
    fn total(&self) -> u64;

    /// Does one bounded piece of work (e.g. copies one chunk).
    ///
    /// Returns the bytes done, or [`Step::Done`] when nothing is left. The
    /// runtime pauses, cancels and rate-limits only between steps, so a
    /// step should take well under a second.
    fn step(&mut self) -> Result<Step, JobFailure>;

    /// Whether the job has work others must not wait for (see
    /// [`JobDriver::serve`]); asked once, as the job starts.
    fn serves(&self) -> bool {
        false
    }

    /// While the job waits (paused, or held back by its speed limit),
    /// serves for about `wait` what others must not wait for: a hosted
    /// job's copy-before-write and the reads it hosts. False if the job
    /// has nothing of the kind (the runtime then just sleeps).
    fn serve(&mut self, wait: Duration) -> bool {
        let _ = wait;
        false
    }

    /// Called once when the job finalizes successfully.
    fn commit(&mut self) {}

    /// Called once when the job failed or was cancelled.
    fn abort(&mut self) {}

    /// Called once at the end either way, after `commit` or `abort` and
    /// before the job concludes (release leases etc.).
    fn clean(&mut self) {}
}

/// What one step of a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// This many bytes of work were done; there is more.
    Progress(u64),
    /// The work is finished.
    Done,
}

/// The kind of I/O that failed, as `BLOCK_JOB_ERROR` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

impl IoOperation {
    /// QEMU's name, `"read"` or `"write"`.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// Why a job's step failed.
///
/// The message is what `query-jobs` and `BLOCK_JOB_COMPLETED` show as the
/// job's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobFailure {
    message: String,
    operation: Option<IoOperation>,
}

impl JobFailure {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            operation: None,
        }
    }

    /// An I/O error; also reported as a `BLOCK_JOB_ERROR` event.
    pub fn io(operation: IoOperation, err: &io::Error) -> Self {
        let text = err.to_string();
        let message = match err.raw_os_error() {
            // io::Error appends " (os error N)" to strerror's text; QEMU
            // reports strerror's text alone ("Input/output error").
            Some(code) => text
                .strip_suffix(&format!(" (os error {code})"))
                .unwrap_or(&text)
                .to_owned(),
            None => text,
        };
        Self {
            message,
            operation: Some(operation),
        }
    }

    /// The error text shown to the user.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The I/O that failed, if it was I/O.
    pub fn operation(&self) -> Option<IoOperation> {
        self.operation
    }
}

/// Something a QMP client is told about a job, in QEMU's event shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE`: sent on every change of status.
    StatusChange {
        /// The job's id.
        id: String,
        /// Its new status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_PENDING`: the job waits for `finalize` (only sent when
    /// auto-finalize is off, as QEMU does).
    Pending {
        /// QEMU's job type name.
        job_type: &'static str,
        /// The job's id.
        id: String,
    },
    /// `BLOCK_JOB_ERROR` with action `report`: a step's I/O failed and the
    /// job will abort.
    IoError {
        /// The job's id (QEMU's `device`).
        id: String,
        /// The I/O that failed.
        operation: IoOperation,
    },
    /// `BLOCK_JOB_COMPLETED`: the job finished, successfully or not; sent
    /// before its status changes to `concluded`.
    Completed {
        /// QEMU's job type name.
        job_type: &'static str,
        /// The job's id (QEMU's `device`).
        id: String,
        /// Progress total.
        len: u64,
        /// Progress done.
        offset: u64,
        /// Speed limit in bytes per second, 0 for none.
        speed: u64,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`: the job was cancelled; sent before its status
    /// changes to `concluded`.
    Cancelled {
        /// QEMU's job type name.
        job_type: &'static str,
        /// The job's id (QEMU's `device`).
        id: String,
        /// Progress total.
        len: u64,
        /// Progress done.
        offset: u64,
        /// Speed limit in bytes per second, 0 for none.
        speed: u64,
    },
}

/// Receives a job's events, in the order they happen.
///
/// It is called with the job's lock held, so that events reach the client
/// in the order of the changes they report: it must not call back into
/// the [`JobManager`]; queue the event and return.
pub type EventSink = Arc<dyn Fn(JobEvent) + Send + Sync>;

/// How a job behaves, as given when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOptions {
    /// Finalize as soon as the work is done; otherwise stop in `pending`
    /// until `finalize`.
    pub auto_finalize: bool,
    /// Disappear once concluded; otherwise stay `concluded` (and
    /// queryable) until `dismiss`.
    pub auto_dismiss: bool,
    /// Speed limit in bytes per second, 0 for none. Signed because QMP
    /// passes a signed integer and QEMU refuses a negative one with its own
    /// message.
    pub speed: i64,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
        }
    }
}

/// A job as `query-jobs` and `query-block-jobs` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// QEMU's job type name.
    pub job_type: &'static str,
    /// Its status.
    pub status: JobStatus,
    /// Progress done, in bytes (`current-progress`, `offset`).
    pub current_progress: u64,
    /// Progress total, in bytes (`total-progress`, `len`).
    pub total_progress: u64,
    /// Speed limit in bytes per second, 0 for none.
    pub speed: u64,
    /// Asked to pause, by the user or a drain, or not started yet.
    pub paused: bool,
    /// In the middle of a step.
    pub busy: bool,
    /// Finalizes by itself.
    pub auto_finalize: bool,
    /// Dismisses itself.
    pub auto_dismiss: bool,
    /// Why it failed or `"Operation canceled"`, once it is aborting.
    pub error: Option<String>,
}
