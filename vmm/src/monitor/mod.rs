//! The VMM's QMP commands: what each command does to the VM, its block
//! graph and its jobs. The protocol itself is in `qmp/`.
//!
//! - `machine.rs`: version, run state (`stop`, `cont`), `quit`.
//! - `bitmap.rs`: dirty bitmaps (`block-dirty-bitmap-*`).
//! - `block.rs`: nodes (`blockdev-add`, `blockdev-del`, the queries).
//! - `jobs.rs`: `blockdev-backup`, the `job-*` verbs, the job queries.
//! - `stats.rs`: `query-blockstats`, `block-latency-histogram-set`.
//! - `snapshot.rs`: external snapshots (`blockdev-snapshot`,
//!   `blockdev-snapshot-sync`).
//! - `export.rs`: the NBD server and block exports.
//! - `migration.rs`: `migrate` and its companions.

mod bitmap;
mod block;
mod export;
mod jobs;
mod machine;
mod migration;
mod snapshot;
mod stats;
mod throttle;

use std::sync::Arc;

use ::block::job::JobManager;
use ::block::Graph;
use serde_json::{Map, Value};

use crate::qmp::{Args, Commands, EventSink, QmpError};
use crate::runstate::RunState;
use crate::virtio::{DiskControls, Disks};

/// Every command we implement, as `query-commands` lists them.
const COMMANDS: &[&str] = &[
    "query-version",
    "query-status",
    "stop",
    "cont",
    "quit",
    "query-block",
    "query-named-block-nodes",
    "blockdev-add",
    "blockdev-del",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "blockdev-backup",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "query-jobs",
    "query-block-jobs",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-finalize",
    "job-dismiss",
    "block-job-set-speed",
    "block_set_io_throttle",
    "query-blockstats",
    "block-latency-histogram-set",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "migrate",
    "migrate-incoming",
    "query-migrate",
    "migrate_cancel",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
];

/// The VM as QMP commands see it.
pub struct Monitor {
    run: Arc<RunState>,
    graph: Arc<Graph>,
    jobs: Arc<JobManager>,
    /// Each disk's I/O limits and accounting.
    disks: Disks,
    events: EventSink,
    /// The same sink, for jobs' events.
    job_events: ::block::job::EventSink,
    /// Ends the VM (`quit`).
    quit: Box<dyn Fn() + Send + Sync>,
    /// Block exports and the NBD server (stopped when the monitor goes).
    exports: ::block::export::Exports,
    /// The VM's migration (absent where commands run without a VM).
    migration: Option<Arc<crate::migration::Controller>>,
}

impl Monitor {
    /// Commands acting on `run`, `graph`, `jobs` and the `disks`' limits and
    /// accounting, emitting through `events`; `quit` ends the VM.
    pub fn new(
        run: Arc<RunState>,
        graph: Arc<Graph>,
        jobs: Arc<JobManager>,
        disks: Disks,
        events: EventSink,
        quit: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            run,
            graph,
            jobs,
            disks,
            job_events: jobs::event_sink(events.clone()),
            exports: export::exports(events.clone()),
            events,
            quit,
            migration: None,
        }
    }

    /// Gives the migration commands their controller.
    pub(crate) fn with_migration(mut self, ctl: Arc<crate::migration::Controller>) -> Self {
        self.migration = Some(ctl);
        self
    }
}

impl Monitor {
    /// The controls of the disk whose device is `id`, or QEMU's
    /// `DeviceNotFound`.
    fn disk(&self, id: &str) -> Result<&DiskControls, QmpError> {
        self.disks
            .get(id)
            .ok_or_else(|| QmpError::device_not_found(format!("Device '{id}' not found")))
    }
}

impl Commands for Monitor {
    fn names(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    /// `stop` and `cont` wait for vCPUs and dataplanes (and for each other,
    /// through the run state's lock), `blockdev-add` for the file system's
    /// open, `blockdev-backup` for the job's drained start, `job-cancel`
    /// and `job-finalize` for a job's I/O to drain, the snapshots for
    /// the overlay's creation and open and the old top's flush.
    fn may_wait(&self, name: &str) -> bool {
        matches!(
            name,
            "stop"
                | "cont"
                | "blockdev-add"
                | "blockdev-snapshot"
                | "blockdev-snapshot-sync"
                | "blockdev-backup"
                | "job-cancel"
                | "job-finalize"
        )
    }

    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        let args = Args::new(args);
        match name {
            "query-version" => machine::query_version(args),
            "query-status" => machine::query_status(self, args),
            "stop" => machine::stop(self, args),
            "cont" => machine::cont(self, args),
            "quit" => machine::quit(self, args),
            "query-block" => block::query_block(self, args),
            "query-named-block-nodes" => block::query_named_block_nodes(self, args),
            "blockdev-add" => block::blockdev_add(self, args),
            "blockdev-del" => block::blockdev_del(self, args),
            "blockdev-snapshot" => snapshot::blockdev_snapshot(self, args),
            "blockdev-snapshot-sync" => snapshot::blockdev_snapshot_sync(self, args),
            "blockdev-backup" => jobs::blockdev_backup(self, args),
            "block-dirty-bitmap-add" => bitmap::add(self, args),
            "block-dirty-bitmap-remove" => bitmap::remove(self, args),
            "block-dirty-bitmap-clear" => bitmap::clear(self, args),
            "block-dirty-bitmap-enable" => bitmap::set_enabled(self, args, true),
            "block-dirty-bitmap-disable" => bitmap::set_enabled(self, args, false),
            "query-jobs" => jobs::query_jobs(self, args),
            "query-block-jobs" => jobs::query_block_jobs(self, args),
            "job-pause" | "job-resume" | "job-cancel" | "job-finalize" | "job-dismiss" => {
                jobs::job_verb(self, name, args)
            }
            "block-job-set-speed" => jobs::block_job_set_speed(self, args),
            "block_set_io_throttle" => throttle::block_set_io_throttle(self, args),
            "query-blockstats" => stats::query_blockstats(self, args),
            "block-latency-histogram-set" => stats::block_latency_histogram_set(self, args),
            "nbd-server-start" => export::nbd_server_start(self, args),
            "nbd-server-stop" => export::nbd_server_stop(self, args),
            "nbd-server-add" => export::nbd_server_add(self, args),
            "block-export-add" => export::block_export_add(self, args),
            "block-export-del" => export::block_export_del(self, args),
            "query-block-exports" => export::query_block_exports(self, args),
            _ if name.contains("migrate") && self.migration.is_none() => Err(QmpError::generic(
                "migration needs a VM: these commands run without one",
            )),
            "migrate" => migration::migrate(self, args),
            "migrate-incoming" => migration::migrate_incoming(self, args),
            "query-migrate" => migration::query_migrate(self, args),
            "migrate_cancel" => migration::migrate_cancel(self, args),
            "migrate-set-parameters" => migration::migrate_set_parameters(self, args),
            "query-migrate-parameters" => migration::query_migrate_parameters(self, args),
            "migrate-set-capabilities" => migration::migrate_set_capabilities(self, args),
            "query-migrate-capabilities" => migration::query_migrate_capabilities(self, args),
            other => Err(QmpError::command_not_found(format!(
                "The command {other} has not been found"
            ))),
        }
    }
}
