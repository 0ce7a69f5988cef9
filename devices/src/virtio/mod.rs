//! Virtio devices and their MMIO transport.
//!
//! ```text
//!  guest MMIO ──► MmioTransport (registers, feature and queue setup, status)
//!                     │ DRIVER_OK: activate(queues, notify eventfds, interrupt)
//!                     ▼
//!                 VirtioDevice (e.g. virtio-blk) ── hands queues to its worker
//!                     ▲ reset(): worker drains, returns the queues
//! ```
//!
//! The transport knows nothing of what a device does; a device knows
//! nothing of registers.

pub mod block;
pub mod mmio;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use base::state::{StateError, StateReader, StateWriter};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::dirty::DirtyPages;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// `VIRTIO_F_VERSION_1`: every device we offer is a virtio 1.x device.
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt causes in the transport's InterruptStatus register.
pub const INT_USED_RING: u32 = 1;
/// The configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// How a device raises its interrupt: a cause bit the guest reads back and
/// an eventfd registered as an irqfd.
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
    /// The device's worker hit an error only a reset clears.
    broken: AtomicBool,
}

impl Interrupt {
    /// An interrupt that signals `irq`.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
            broken: AtomicBool::new(false),
        }
    }

    /// Puts the device in its error state (DEVICE_NEEDS_RESET) and tells
    /// the driver through a configuration interrupt.
    pub fn fail(&self) {
        self.broken.store(true, Ordering::Release);
        self.raise(INT_CONFIG);
    }

    /// Whether the device is in its error state.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Sets `cause` and raises the interrupt line.
    pub fn raise(&self, cause: u32) {
        self.status.fetch_or(cause, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            log::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// The causes not yet acknowledged.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears acknowledged causes.
    pub fn ack(&self, causes: u32) {
        self.status.fetch_and(!causes, Ordering::AcqRel);
    }

    /// The error state, as [`is_broken`](Self::is_broken) and
    /// [`status`](Self::status) read it, taken from saved state without
    /// raising anything (the interrupt controller's state carries a pending
    /// interrupt).
    pub(crate) fn set_state(&self, status: u32, broken: bool) {
        self.status.store(status, Ordering::Release);
        self.broken.store(broken, Ordering::Release);
    }

    /// Back to the state after power-on: no causes, not broken.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.broken.store(false, Ordering::Release);
    }
}

/// A queue the driver enabled, with its index and notification eventfd.
pub struct ActiveQueue {
    /// The queue's index on the device.
    pub index: u16,
    /// The queue, validated against guest memory.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notify: EventFd,
}

/// Everything a device needs to start serving its queues.
pub struct Activation {
    /// Guest memory, for reading requests and writing results.
    pub mem: GuestMemoryMmap,
    /// The queues the driver enabled.
    pub queues: Vec<ActiveQueue>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Where the device records the guest pages it writes while migration
    /// tracks them.
    pub dirty: Arc<DirtyPages>,
}

/// Where a parked queue stands: what a paused device's state adds to the
/// transport's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePosition {
    /// The queue's index on the device.
    pub index: u16,
    /// The next avail ring entry the device will take.
    pub next_avail: u16,
    /// The next used ring entry the device will fill.
    pub next_used: u16,
    /// Whether VIRTIO_F_EVENT_IDX is in use on it.
    pub event_idx: bool,
}

/// Why a device's state could not be saved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaveError {
    /// Its dataplane runs: only a paused device has a state to save.
    #[error("cannot save virtio device '{device}' while it runs: the VM must be paused first")]
    Running { device: String },
    /// Its dataplane never drained: I/O may still land.
    #[error(
        "cannot save virtio device '{device}': it is stuck (its dataplane never drained its I/O)"
    )]
    Stuck { device: String },
    /// A dataplane that failed took the queues with it.
    #[error(
        "cannot save virtio device '{device}': its queues were lost when its dataplane failed"
    )]
    QueuesLost { device: String },
    /// The device has no way to save an active state.
    #[error("cannot save virtio device '{device}': it cannot save its state while active")]
    Unsupported { device: String },
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
#[error("cannot activate virtio device '{device}': {reason}")]
pub struct ActivateError {
    /// The device's name as the user gave it.
    pub device: String,
    /// What went wrong.
    pub reason: String,
}

/// Why a paused device could not serve again.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ResumeError {
    /// The device's name as the user gave it.
    pub device: String,
    /// What is in the way, naming it (e.g. the holder of a node's lease).
    pub reason: String,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The device's name, as the user gave it (used in errors and thread names).
    fn name(&self) -> &str;
    /// The virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features the device offers.
    fn features(&self) -> u64;
    /// Reads the device's configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device's configuration space (most fields are read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving: waits for requests in flight, ends the worker, and
    /// gives the queues back (None if the device was not active).
    fn reset(&mut self) -> Option<Vec<ActiveQueue>>;
    /// The VMM is ending: stop as a reset does, but start nothing (the
    /// thread that ends the VMM may be confined to a short list of system
    /// calls).
    fn shutdown(&mut self) {
        let _ = self.reset();
    }
    /// The VM is pausing (no vCPU runs): finish requests in flight and let
    /// go of anything others may want meanwhile. The queues stay as they are.
    fn pause(&mut self) {}
    /// The VM is about to run again: take back what `pause` let go and
    /// serve the queues again, or say who is in the way.
    fn resume(&mut self) -> Result<(), ResumeError> {
        Ok(())
    }
    /// The paused VM's images go to another process (a migration's
    /// switchover): let go of everything `pause` may have kept (a disk's
    /// lease, kept while it serves hosted jobs), or say who still needs
    /// it. `resume` takes it back.
    fn release(&mut self) -> Result<(), ResumeError> {
        Ok(())
    }
    /// Where each parked queue of a paused active device stands, for
    /// saving it; the error says why it cannot be saved now.
    fn parked_queues(&self) -> Result<Vec<QueuePosition>, SaveError> {
        Err(SaveError::Unsupported {
            device: self.name().to_string(),
        })
    }
    /// Writes the device's own state (beyond the transport's); called on a
    /// paused or never activated device.
    fn save_state(&self, _w: &mut StateWriter) -> Result<(), SaveError> {
        Ok(())
    }
    /// Reads what [`save_state`](Self::save_state) wrote, refusing state
    /// this device cannot take (a disk of another size, say), naming it.
    fn restore_state(&mut self, _r: &mut StateReader) -> Result<(), StateError> {
        Ok(())
    }
    /// Activates the device as a paused one with its queues parked: no
    /// thread runs and nothing is taken until [`resume`](Self::resume).
    fn activate_paused(&mut self, _activation: Activation) -> Result<(), ActivateError> {
        Err(ActivateError {
            device: self.name().to_string(),
            reason: "it cannot be restored active".into(),
        })
    }
}
