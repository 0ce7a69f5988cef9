//! Live migration to another `vmm` process, and snapshot/restore through
//! a state file: the same stream either way.
//!
//! ```text
//! source (migration thread)                 destination (--incoming)
//!  header, Config ──────────────────────────► shape checked
//!                 ◄────────────────────────── Ready | Error(text)
//!  RAM pass 1 (all non-zero pages) ─────────►
//!  RAM pass n (pages dirtied since) ────────►   ... until what is left
//!  stop: vCPUs parked, devices drained          fits the downtime limit
//!  last dirty pages, Devices, Machine, Vcpu* ─►
//!  images inactive (shared storage), End ───► images active, devices
//!                 ◄────────────────────────── resume, Done | Error(text)
//!  completed: postmigrate                      running
//! ```
//!
//! - `format.rs`: the frames; `shape.rs`: the Config frame.
//! - `cpu.rs`, `machine.rs`: KVM's vCPU and VM-wide state.
//! - `ram.rs`: dirty pages, RAM frames, a state file's RAM image.
//! - `outgoing.rs`: the source's thread; `incoming.rs`: the destination.
//! - `control.rs`: status, parameters, capabilities and events for QMP.

mod control;
mod cpu;
pub mod format;
pub(crate) mod fuzz;
mod incoming;
#[doc(hidden)]
pub mod inspect;
mod machine;
mod outgoing;
mod ram;
mod shape;
mod transport;
pub mod uri;

use std::sync::{Arc, Mutex, OnceLock};

use base::state::StateError;
use block::Graph;
use devices::dirty::DirtyPages;
use devices::legacy::Serial;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

pub use control::{Capabilities, Controller, Parameters, Status, MAX_DOWNTIME_MS};
pub(crate) use incoming::restore_file;
pub use incoming::{listen, StateFile};
pub use ram::ram_end;
pub use uri::MigrationUri;

use crate::runstate::RunState;
use crate::shared::Shared;
use format::FormatError;
use shape::{DiskShape, Shape};

/// Why a migration (or a restore) failed: one sentence, the cause first.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A KVM call failed.
    #[error("cannot {what}: {reason}")]
    Kvm { what: &'static str, reason: String },
    /// The two VMs do not match (or the host cannot run the source's).
    #[error("the destination does not match the source: {0}")]
    Config(String),
    /// The stream itself is bad.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// A frame's contents are bad.
    #[error("{0}")]
    State(#[from] StateError),
    /// Sending or receiving failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// The other side said why it gave up.
    #[error("the destination failed: {0}")]
    Peer(String),
    /// Guest memory could not be read, written or mapped.
    #[error("{0}")]
    Guest(String),
    /// A device or disk could not be saved, restored or handed over.
    #[error("{0}")]
    Device(String),
    /// `migrate_cancel`.
    #[error("the migration was cancelled")]
    Cancelled,
}

impl MigrationError {
    pub(crate) fn kvm(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Kvm {
            what,
            reason: e.to_string(),
        }
    }

    pub(crate) fn send(source: std::io::Error) -> Self {
        Self::Io {
            what: "cannot send the migration stream",
            source,
        }
    }

    pub(crate) fn receive(source: std::io::Error) -> Self {
        Self::Io {
            what: "cannot receive the migration stream",
            source,
        }
    }
}

/// One disk as migration sees it.
pub(crate) struct MigrationDisk {
    pub id: String,
    pub read_only: bool,
    pub node: Arc<devices::virtio::block::NodeSlot>,
}

/// What migration needs of a VM: KVM, guest RAM, the vCPUs, the devices
/// (through the run state), the disks.
pub(crate) struct Machine {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    /// Locked by a vCPU thread around each `KVM_RUN`; free while it is parked.
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub run: Arc<RunState>,
    pub shared: Arc<Shared>,
    pub serial: Arc<Mutex<Serial>>,
    pub graph: Arc<Graph>,
    pub disks: Vec<MigrationDisk>,
    /// Pages our own threads wrote (KVM's log does not see them).
    pub dirty: Arc<DirtyPages>,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Whether the VM has an in-kernel PIT (`--pit on`).
    pub pit: bool,
    /// The MSRs a vCPU can save, probed once.
    pub msrs: OnceLock<Vec<u32>>,
}

impl Machine {
    /// The VM's shape for a stream's Config frame.
    fn shape(&self, copied: impl Fn(&MigrationDisk) -> bool) -> Shape {
        Shape {
            memory: self.memory,
            cpus: self.vcpus.len() as u32,
            disks: self
                .disks
                .iter()
                .map(|d| DiskShape {
                    id: d.id.clone(),
                    size: d.node.with(|n| n.driver().size()),
                    read_only: d.read_only,
                    copied: copied(d),
                })
                .collect(),
            ram_offset: None,
        }
    }
}
