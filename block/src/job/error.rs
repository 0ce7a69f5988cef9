//! Why a job command was refused.
//!
//! Where QEMU has a message for the same refusal, the text is QEMU's, word
//! for word, so QMP clients written against QEMU see what they expect;
//! every variant still carries the job's id for the caller.

use std::io;
use std::time::Duration;

use super::{JobStatus, JobVerb};

/// A refused or failed job command.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No job has this id. (QEMU's `job-*` commands say "Job not found",
    /// its `block-job-*` commands "Block job 'ID' not found".)
    #[error("Job '{id}' not found")]
    NotFound { id: String },
    /// The id does not start with a letter, or has characters other than
    /// letters, digits, '-', '.' and '_'.
    #[error("Invalid job ID '{id}'")]
    InvalidId { id: String },
    /// Another job already has this id.
    #[error("Job ID '{id}' already in use")]
    DuplicateId { id: String },
    /// QEMU's verb table refuses this command in the job's status.
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    VerbRefused {
        id: String,
        status: JobStatus,
        verb: JobVerb,
    },
    /// The user paused the job already.
    #[error("Job is already paused")]
    AlreadyPaused { id: String },
    /// The user did not pause the job.
    #[error("Can't resume a job that was not paused")]
    NotPaused { id: String },
    /// A speed limit below zero.
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed { id: String, speed: i64 },
    /// The job has no completion phase, or is being cancelled.
    #[error("The active block job '{id}' cannot be completed")]
    CannotComplete { id: String },
    /// The job has no options that can be changed while it runs.
    #[error("Job type does not support change")]
    ChangeUnsupported { id: String },
    /// `start` was called twice.
    #[error("Job '{id}' has already been started")]
    AlreadyStarted { id: String },
    /// `drained_end` without a matching `drained_begin`.
    #[error("Job '{id}' is not drained")]
    NotDrained { id: String },
    /// The job's thread could not be started; the job is gone.
    #[error("Cannot start the thread of job '{id}': {source}")]
    Spawn {
        id: String,
        #[source]
        source: io::Error,
    },
    /// A wait for a status ran out of time.
    #[error(
        "Job '{id}' did not reach state '{wanted}' within {waited:?}; it is in state '{status}'"
    )]
    Timeout {
        id: String,
        wanted: JobStatus,
        status: JobStatus,
        waited: Duration,
    },
}

impl JobError {
    /// The id of the job the command was about.
    pub fn id(&self) -> &str {
        match self {
            JobError::NotFound { id }
            | JobError::InvalidId { id }
            | JobError::DuplicateId { id }
            | JobError::VerbRefused { id, .. }
            | JobError::AlreadyPaused { id }
            | JobError::NotPaused { id }
            | JobError::NegativeSpeed { id, .. }
            | JobError::CannotComplete { id }
            | JobError::ChangeUnsupported { id }
            | JobError::AlreadyStarted { id }
            | JobError::NotDrained { id }
            | JobError::Spawn { id, .. }
            | JobError::Timeout { id, .. } => id,
        }
    }
}
