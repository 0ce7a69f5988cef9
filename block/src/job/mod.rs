//! Block jobs: QEMU's job state machine.

pub mod state;

pub use state::{accepts, can_transition, JobStatus, JobVerb};
