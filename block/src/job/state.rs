//! QEMU's job state machine: the statuses a job goes through, the commands
//! (verbs) a user may send it, and which of each is allowed when. The
//! tables are QEMU 10's (`job.c`), so a QMP client sees the same refusals.

use std::fmt;

/// A job's status, as QEMU's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Not yet set up; only ever the state before `Created`.
    Undefined,
    /// Set up but not started.
    Created,
    /// Doing its work.
    Running,
    /// Held at a pause point (by the user or by a drain).
    Paused,
    /// A job with a completion phase is ready to be completed.
    Ready,
    /// A ready job held at a pause point.
    Standby,
    /// Work done; waiting for the other jobs of its transaction.
    Waiting,
    /// Work done; waiting to be finalized.
    Pending,
    /// Failed or cancelled; undoing its effects.
    Aborting,
    /// Finished; its result can be queried until it is dismissed.
    Concluded,
    /// Gone.
    Null,
}

use JobStatus::*;

impl JobStatus {
    /// Every status, in QEMU's order.
    pub const ALL: [JobStatus; 11] = [
        Undefined, Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded,
        Null,
    ];

    /// QEMU's name, e.g. `"running"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Undefined => "undefined",
            Created => "created",
            Running => "running",
            Paused => "paused",
            Ready => "ready",
            Standby => "standby",
            Waiting => "waiting",
            Pending => "pending",
            Aborting => "aborting",
            Concluded => "concluded",
            Null => "null",
        }
    }

    /// Position in [`JobStatus::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The statuses a job may move to from this one.
    fn successors(self) -> &'static [JobStatus] {
        match self {
            Undefined => &[Created],
            Created => &[Running, Aborting, Null],
            Running => &[Paused, Ready, Waiting, Aborting],
            Paused => &[Running],
            Ready => &[Standby, Waiting, Aborting],
            Standby => &[Ready],
            Waiting => &[Pending, Aborting],
            Pending => &[Aborting, Concluded],
            // Aborting may be entered again: a failure found while
            // finalizing an already aborting job changes nothing.
            Aborting => &[Aborting, Concluded],
            Concluded => &[Null],
            Null => &[],
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command a user may send a job, as QEMU's `JobVerb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
    /// `block-job-change`.
    Change,
}

impl JobVerb {
    /// Every verb, in QEMU's order.
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Finalize,
        JobVerb::Dismiss,
        JobVerb::Change,
    ];

    /// QEMU's name, e.g. `"set-speed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }

    /// The statuses in which a job accepts this verb.
    fn accepted_in(self) -> &'static [JobStatus] {
        match self {
            JobVerb::Cancel => &[Created, Running, Paused, Ready, Standby, Waiting, Pending],
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                &[Created, Running, Paused, Ready, Standby]
            }
            JobVerb::Complete => &[Ready, Standby],
            JobVerb::Finalize => &[Pending],
            JobVerb::Dismiss => &[Concluded],
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a job in status `from` may move to status `to`.
pub fn can_transition(from: JobStatus, to: JobStatus) -> bool {
    from.successors().contains(&to)
}

/// Whether a job in `status` accepts `verb`.
pub fn accepts(status: JobStatus, verb: JobVerb) -> bool {
    verb.accepted_in().contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 10's `JobSTT` (job.c), one row per source status, one column
    /// per target status, both in the order U C R P Y S W D X E N.
    const QEMU_TRANSITIONS: [&str; 11] = [
        "01000000000", // U
        "00100000101", // C
        "00011010100", // R
        "00100000000", // P
        "00000110100", // Y
        "00001000000", // S
        "00000001100", // W
        "00000000110", // D
        "00000000110", // X
        "00000000001", // E
        "00000000000", // N
    ];

    /// QEMU 10's `JobVerbTable` (job.c), one row per verb in the order of
    /// `JobVerb::ALL`, one column per status in the order U C R P Y S W D X E N.
    const QEMU_VERBS: [(&str, &str); 8] = [
        ("cancel", "01111111000"),
        ("pause", "01111100000"),
        ("resume", "01111100000"),
        ("set-speed", "01111100000"),
        ("complete", "00001100000"),
        ("finalize", "00000001000"),
        ("dismiss", "00000000010"),
        ("change", "01111100000"),
    ];

    fn cell(row: &str, column: usize) -> bool {
        row.as_bytes()[column] == b'1'
    }

    #[test]
    fn every_transition_matches_qemu() {
        for (from, row) in JobStatus::ALL.iter().zip(QEMU_TRANSITIONS) {
            for (column, to) in JobStatus::ALL.iter().enumerate() {
                assert_eq!(
                    can_transition(*from, *to),
                    cell(row, column),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn every_verb_matches_qemu() {
        for (verb, (name, row)) in JobVerb::ALL.iter().zip(QEMU_VERBS) {
            assert_eq!(verb.as_str(), name);
            for (column, status) in JobStatus::ALL.iter().enumerate() {
                assert_eq!(
                    accepts(*status, *verb),
                    cell(row, column),
                    "{verb} in {status}"
                );
            }
        }
    }

    #[test]
    fn names_are_qemus() {
        let names: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null"
            ]
        );
        for (i, status) in JobStatus::ALL.iter().enumerate() {
            assert_eq!(status.index(), i);
        }
        assert_eq!(JobVerb::SetSpeed.to_string(), "set-speed");
    }
}
