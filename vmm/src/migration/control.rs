//! A VM's migration as QMP sees it: the status and figures
//! `query-migrate` reports, the parameters and capabilities, the events,
//! and starting and cancelling the source's thread.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use base::sync::lock;
use serde_json::{json, Value};

use super::{Machine, MigrationUri};
use crate::qmp::EventSink;

/// QEMU's default `downtime-limit`, in milliseconds.
const DEFAULT_DOWNTIME_MS: u64 = 300;
/// QEMU's default `max-bandwidth`, in bytes per second.
const DEFAULT_BANDWIDTH: u64 = 128 << 20;
/// QEMU's largest `downtime-limit` (2000 seconds).
pub const MAX_DOWNTIME_MS: u64 = 2_000_000;

/// `migrate-set-parameters`' values we take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// How long the guest may stay stopped at switchover, in ms.
    pub downtime_limit: u64,
    /// Bytes per second the stream may use.
    pub max_bandwidth: u64,
}

impl Default for Parameters {
    fn default() -> Self {
        Self {
            downtime_limit: DEFAULT_DOWNTIME_MS,
            max_bandwidth: DEFAULT_BANDWIDTH,
        }
    }
}

/// `migrate-set-capabilities`' switches we have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Send `MIGRATION` and `MIGRATION_PASS` events.
    pub events: bool,
    /// Copy the disks' contents in the stream (block migration).
    pub block: bool,
}

/// QEMU's `MigrationStatus` values we go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    None,
    Setup,
    Active,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

impl Status {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    /// Whether a migration is under way.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Setup | Status::Active | Status::Cancelling)
    }
}

/// The figures `query-migrate` reports.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub ram_total: u64,
    pub ram_transferred: u64,
    pub ram_remaining: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub dirty_sync_count: u64,
    pub disk_total: u64,
    pub disk_transferred: u64,
    pub disk_remaining: u64,
    pub setup_ms: u64,
    pub total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: u64,
    pub mbps: f64,
}

struct Inner {
    status: Status,
    figures: Figures,
    error: Option<String>,
    started: Option<Instant>,
    params: Parameters,
    caps: Capabilities,
    /// Whether this migration copies disks (fixed at its start).
    block: bool,
    thread: Option<JoinHandle<()>>,
    /// A duplicate of the stream's socket, shut down by a cancel so that
    /// a blocked send or receive returns at once.
    socket: Option<OwnedFd>,
}

/// One VM's migration state, shared by the monitor and the migration thread.
pub struct Controller {
    pub(crate) machine: Arc<Machine>,
    events: EventSink,
    inner: Mutex<Inner>,
    cancel: AtomicBool,
}

impl Controller {
    pub(crate) fn new(machine: Arc<Machine>, events: EventSink) -> Self {
        Self {
            machine,
            events,
            inner: Mutex::new(Inner {
                status: Status::None,
                figures: Figures::default(),
                error: None,
                started: None,
                params: Parameters::default(),
                caps: Capabilities::default(),
                block: false,
                thread: None,
                socket: None,
            }),
            cancel: AtomicBool::new(false),
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        lock(&self.inner).status
    }

    /// The parameters in force.
    pub fn parameters(&self) -> Parameters {
        lock(&self.inner).params
    }

    /// The capabilities in force.
    pub fn capabilities(&self) -> Capabilities {
        lock(&self.inner).caps
    }

    /// Changes parameters; `f` edits a copy that replaces them if it succeeds.
    pub fn set_parameters(&self, params: Parameters) {
        lock(&self.inner).params = params;
    }

    /// Changes capabilities; refused while a migration runs.
    pub fn set_capabilities(&self, caps: Capabilities) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        if inner.status.is_active() {
            return Err("There's a migration process in progress".into());
        }
        inner.caps = caps;
        Ok(())
    }

    /// Moves to `status`, with a `MIGRATION` event when events are on.
    pub(crate) fn set_status(&self, status: Status) {
        let events = {
            let mut inner = lock(&self.inner);
            if inner.status == status {
                return;
            }
            inner.status = status;
            if status == Status::Setup {
                inner.started = Some(Instant::now());
                inner.figures = Figures::default();
                inner.error = None;
            }
            if matches!(
                status,
                Status::Completed | Status::Failed | Status::Cancelled
            ) {
                let total = inner.started.map(|t| t.elapsed().as_millis() as u64);
                inner.figures.total_ms = total;
                inner.socket = None;
            }
            inner.caps.events
        };
        if events {
            self.events
                .emit("MIGRATION", Some(json!({"status": status.name()})));
        }
    }

    /// Ends in `failed`, saying why.
    pub(crate) fn fail(&self, error: String) {
        lock(&self.inner).error = Some(error);
        self.set_status(Status::Failed);
    }

    /// A pass over RAM begins: `MIGRATION_PASS` when events are on.
    pub(crate) fn pass(&self, pass: u64) {
        let events = {
            let mut inner = lock(&self.inner);
            inner.figures.dirty_sync_count = pass;
            inner.caps.events
        };
        if events {
            self.events
                .emit("MIGRATION_PASS", Some(json!({"pass": pass})));
        }
    }

    /// Updates the figures.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Figures)) {
        f(&mut lock(&self.inner).figures)
    }

    /// Whether a cancel was asked for.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Keeps a duplicate of the stream's socket for a cancel to shut down.
    pub(crate) fn set_socket(&self, fd: OwnedFd) {
        let mut inner = lock(&self.inner);
        if self.cancel.load(Ordering::Acquire) {
            // SAFETY: shutdown(2) on a descriptor we own; no memory involved.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        inner.socket = Some(fd);
    }

    /// Claims the controller for a new outgoing migration, or says why not.
    pub(crate) fn begin(&self) -> Result<(Parameters, Capabilities), String> {
        let mut inner = lock(&self.inner);
        if inner.status.is_active() {
            return Err("There's a migration process in progress".into());
        }
        if let Some(t) = inner.thread.take() {
            let _ = t.join();
        }
        self.cancel.store(false, Ordering::Release);
        inner.block = inner.caps.block;
        Ok((inner.params, inner.caps))
    }

    /// Records the migration thread, to be joined by the next migration.
    pub(crate) fn set_thread(&self, thread: JoinHandle<()>) {
        lock(&self.inner).thread = Some(thread);
    }

    /// `migrate_cancel`: the thread stops at its next step and leaves the
    /// source as it was. Nothing to do when no migration runs.
    pub fn cancel(&self) {
        let mut inner = lock(&self.inner);
        if !inner.status.is_active() {
            return;
        }
        self.cancel.store(true, Ordering::Release);
        if let Some(fd) = &inner.socket {
            // SAFETY: shutdown(2) on a descriptor we own; no memory involved.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let events = inner.caps.events;
        if inner.status != Status::Cancelling {
            inner.status = Status::Cancelling;
            drop(inner);
            if events {
                self.events
                    .emit("MIGRATION", Some(json!({"status": "cancelling"})));
            }
        }
    }

    /// `query-migrate`'s answer, in QEMU's `MigrationInfo` shape.
    pub fn query(&self) -> Value {
        let inner = lock(&self.inner);
        let f = &inner.figures;
        if inner.status == Status::None {
            return json!({});
        }
        let mut info = json!({"status": inner.status.name()});
        let obj = info.as_object_mut().expect("an object");
        if inner.status != Status::Setup {
            obj.insert(
                "ram".into(),
                json!({
                    "transferred": f.ram_transferred,
                    "remaining": f.ram_remaining,
                    "total": f.ram_total,
                    "duplicate": f.duplicate,
                    "normal": f.normal,
                    "normal-bytes": f.normal * 4096,
                    "dirty-sync-count": f.dirty_sync_count,
                    "mbps": f.mbps,
                    "skipped": 0,
                }),
            );
            if inner.block {
                obj.insert(
                    "disk".into(),
                    json!({
                        "transferred": f.disk_transferred,
                        "remaining": f.disk_remaining,
                        "total": f.disk_total,
                    }),
                );
            }
        }
        obj.insert("setup-time".into(), json!(f.setup_ms));
        let total = f
            .total_ms
            .unwrap_or_else(|| inner.started.map_or(0, |t| t.elapsed().as_millis() as u64));
        obj.insert("total-time".into(), json!(total));
        if let Some(d) = f.downtime_ms {
            obj.insert("downtime".into(), json!(d));
        }
        if inner.status == Status::Active {
            obj.insert("expected-downtime".into(), json!(f.expected_downtime_ms));
        }
        if let Some(e) = &inner.error {
            obj.insert("error-desc".into(), json!(e));
        }
        info
    }

    /// Starts an outgoing migration to `uri` on its own thread; errors that
    /// can be known at once (a disk's lease held by a refusing holder with
    /// `block`, a migration already running) come back here.
    pub fn start(self: &Arc<Self>, uri: MigrationUri) -> Result<(), String> {
        super::outgoing::start(self, uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_have_qemus_names() {
        let all = [
            (Status::None, "none"),
            (Status::Setup, "setup"),
            (Status::Active, "active"),
            (Status::Cancelling, "cancelling"),
            (Status::Cancelled, "cancelled"),
            (Status::Completed, "completed"),
            (Status::Failed, "failed"),
        ];
        for (s, name) in all {
            assert_eq!(s.name(), name);
            assert_eq!(
                s.is_active(),
                matches!(s, Status::Setup | Status::Active | Status::Cancelling)
            );
        }
    }
}
