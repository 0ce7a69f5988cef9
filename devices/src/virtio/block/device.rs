//! The virtio-blk device: what it offers the driver (features, config
//! space), and starting and stopping its dataplane.
//!
//! The device holds a reference to its block node for as long as it
//! exists, and the node's in-use lease while the VM runs: from VM start
//! (before the guest can probe the disk) until a pause, and again from
//! resume. All its I/O goes through an engine the lease opened.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use block::graph::Host;
use block::{Holder, Lease, NodeRef};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryMmap;

use super::dataplane::{Dataplane, StopSignal, Stopped, DRAIN_DEADLINE};
use super::hosting::{serve_paused, Hosting};
use super::request::{DiskLimits, ID_BYTES, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
use super::slot::NodeSlot;
use super::stats::BlockStats;
use super::throttle::ThrottleControl;
use crate::dirty::DirtyPages;
use crate::virtio::{
    ActivateError, Activation, ActiveQueue, Interrupt, QueuePosition, ResumeError, SaveError,
    VirtioDevice, F_VERSION_1,
};
use base::state::{StateError, StateReader, StateWriter};
use block::throttle::Limits;

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Largest queue size we offer.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest number of queues we offer.
pub const MAX_QUEUES: u16 = 16;
/// The largest logical block size we pass on to the guest (Linux takes
/// blk_size as its logical block size and accepts up to a page).
const MAX_BLOCK_SIZE: u32 = 4096;
const CONFIG_LEN: usize = 60;

/// The default `submit_batch`. One `io_uring_enter` for a whole round of
/// requests lets the host's block layer plug them all and start the disk
/// only once the last is prepared, so the first waits for all the others;
/// at queue depth 32 on our machines, 4 a call gave 20-32% more random
/// 4 KiB IOPS than one call (`bench/blk.py`, table 6).
pub const DEFAULT_SUBMIT_BATCH: usize = 4;

/// How the user configured a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The device's name (`id=`), e.g. `vda`.
    pub id: String,
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Number of virtqueues.
    pub queues: u16,
    /// Size of each virtqueue.
    pub queue_size: u16,
    /// Serial number returned by GET_ID (at most 20 bytes).
    pub serial: String,
    /// After work, keep polling the avail ring this long before sleeping.
    pub poll: Duration,
    /// Hand requests to the kernel every this many as they are taken, or
    /// more once the disk has many in flight (see [`DEFAULT_SUBMIT_BATCH`]);
    /// zero: all of a round's in one call.
    pub submit_batch: usize,
    /// Host block jobs on the node while the guest runs (`live-jobs=on`):
    /// their reads go through the dataplane, their hooks see its writes.
    pub live_jobs: bool,
    /// The host CPUs the dataplane thread runs on (`dataplane-cpus=`);
    /// none: where the scheduler puts it.
    pub dataplane_cpus: Option<base::cpus::CpuList>,
}

struct Worker {
    stop: Arc<StopSignal>,
    thread: JoinHandle<Stopped>,
}

/// The loop serving hosted jobs while the VM is paused; true from its
/// thread if it drained.
struct PausedHost {
    stop: Arc<StopSignal>,
    thread: JoinHandle<bool>,
}

/// What an activated device needs to start its dataplane again.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    acked_features: u64,
    dirty: Arc<DirtyPages>,
    /// The queues, while no dataplane runs (paused).
    parked: Option<Vec<ActiveQueue>>,
}

impl Active {
    /// What the device keeps of `activation` while active (nothing
    /// parked yet), and the queues.
    fn split(activation: Activation) -> (Self, Vec<ActiveQueue>) {
        let active = Self {
            mem: activation.mem,
            interrupt: activation.interrupt,
            acked_features: activation.acked_features,
            dirty: activation.dirty,
            parked: None,
        };
        (active, activation.queues)
    }
}

/// A virtio-blk device over a block node.
pub struct Block {
    config: BlockConfig,
    /// The node it serves; an external snapshot may move it while paused.
    node: Arc<NodeSlot>,
    /// Its I/O limits, which its dataplane applies.
    throttle: Arc<ThrottleControl>,
    /// Its I/O accounting, which its dataplanes write.
    stats: Arc<BlockStats>,
    lease: Option<Lease>,
    config_space: [u8; CONFIG_LEN],
    features: u64,
    active: Option<Active>,
    worker: Option<Worker>,
    /// What the dataplane offers hosted jobs, while it holds the lease.
    host: Option<Arc<Host>>,
    /// Serving hosted jobs while paused (the lease is kept meanwhile).
    paused_host: Option<PausedHost>,
    /// What the last dataplane handed over for that: its hosted reads in
    /// flight and their engine. Taken by `pause`; dropped by anything
    /// else that stopped the dataplane (a reset, the device's end).
    handover: Option<(Hosting, Box<dyn block::AsyncIo>)>,
    /// A dataplane gave up waiting for its I/O: the lease is kept for good
    /// and the device never serves again.
    stuck: bool,
}

/// The lease holder name of a virtio-blk device's dataplane.
pub fn dataplane_holder(id: &str) -> Holder {
    Holder::Dataplane {
        kind: "virtio-blk",
        id: id.to_string(),
    }
}

/// The reference holder name of a virtio-blk device.
pub fn device_holder(id: &str) -> Holder {
    Holder::Device {
        kind: "virtio-blk",
        id: id.to_string(),
    }
}

impl Block {
    /// A device serving `node` as `config` says; a read-only node makes a
    /// read-only device.
    pub fn new(config: BlockConfig, node: NodeRef) -> Self {
        Self::with_throttle(
            config,
            node,
            Arc::new(ThrottleControl::new(Limits::default())),
        )
    }

    /// A device as [`Block::new`] makes, its I/O limited by `throttle`.
    pub fn with_throttle(
        config: BlockConfig,
        node: NodeRef,
        throttle: Arc<ThrottleControl>,
    ) -> Self {
        let slot = Arc::new(NodeSlot::new(&config.id, node));
        Self::with_slot(config, slot, throttle)
    }

    /// A device as [`Block::with_throttle`] makes, serving whatever node
    /// `slot` holds (which the monitor may change while it is paused).
    pub fn with_slot(
        mut config: BlockConfig,
        slot: Arc<NodeSlot>,
        throttle: Arc<ThrottleControl>,
    ) -> Self {
        let (read_only, alignment, size) = slot.with(|node| {
            (
                node.read_only(),
                node.driver().io_alignment(),
                node.driver().size(),
            )
        });
        config.read_only |= read_only;
        let mut features = F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ;
        if config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        // The guest sees the host's logical block size where the host
        // needs aligned I/O (O_DIRECT on a 4K-sector disk), so that the
        // requests it sends are ones the host accepts; else 512, like a
        // disk it can boot from with any file system.
        let blk_size = alignment.clamp(512, MAX_BLOCK_SIZE);
        let config_space = config_space(&config, size, blk_size);
        Self {
            config,
            node: slot,
            throttle,
            stats: Arc::new(BlockStats::new(true)),
            lease: None,
            config_space,
            features,
            active: None,
            worker: None,
            host: None,
            paused_host: None,
            handover: None,
            stuck: false,
        }
    }

    /// Accounts its I/O into `stats` (shared with the monitor).
    pub fn with_stats(mut self, stats: Arc<BlockStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Takes the node's lease for the dataplane, unless already held;
    /// with `live-jobs=on`, offers hosting on it.
    fn take_lease(&mut self) -> Result<&Lease, block::BlockError> {
        if self.lease.is_none() {
            let holder = dataplane_holder(&self.config.id);
            let lease = self.node.with(|node| node.take_lease(holder))?;
            self.host = None;
            if self.config.live_jobs {
                let host = lease
                    .offer_hosting()
                    .map_err(|e| block::BlockError::Options {
                        node: lease.node().name().to_string(),
                        reason: format!("cannot offer hosting: {e}"),
                    })?;
                self.host = Some(host);
            }
            self.lease = Some(lease);
        }
        Ok(self.lease.as_ref().expect("just taken"))
    }

    /// Lets go of what a stopped dataplane handed over for the paused
    /// loop, once its hosted reads are done (they write into jobs'
    /// buffers): used where no paused loop follows.
    fn drop_handover(&mut self) {
        if let Some((mut hosting, engine)) = self.handover.take() {
            if !super::hosting::drain(&mut hosting, engine, DRAIN_DEADLINE) {
                self.stuck = true;
                if let Some(lease) = self.lease.take() {
                    std::mem::forget(lease);
                }
            }
        }
    }

    /// Stops the loop serving hosted jobs while paused, if it runs.
    fn stop_paused_host(&mut self) {
        let Some(paused) = self.paused_host.take() else {
            return;
        };
        let _ = paused.stop.request();
        match paused.thread.join() {
            Ok(true) => {}
            _ => {
                // Hosted reads may still land in a job's buffers and the
                // lease must stay: as after a dataplane drain that failed.
                self.stuck = true;
                if let Some(lease) = self.lease.take() {
                    std::mem::forget(lease);
                }
            }
        }
    }

    /// After a drained stop with `live-jobs=on`: keeps the lease and serves
    /// hosted jobs on `engine` while the VM is paused, so that jobs go on,
    /// jobs started meanwhile are hosted too, and `cont` finds the lease
    /// its own.
    fn serve_paused(&mut self, hosting: Hosting, engine: Box<dyn block::AsyncIo>) {
        let stop = match StopSignal::new() {
            Ok(s) => Arc::new(s),
            Err(e) => {
                log::error!(
                    "{}: cannot serve hosted jobs while paused: {e}",
                    self.config.id
                );
                return;
            }
        };
        let stop_for_thread = stop.clone();
        let spawned = base::spawn_on(
            base::ThreadKind::Dataplane,
            format!("blk-{}-p", self.config.id),
            self.config.dataplane_cpus.clone(),
            move || serve_paused(hosting, engine, stop_for_thread, DRAIN_DEADLINE),
            || false,
        );
        match spawned {
            Ok(thread) => self.paused_host = Some(PausedHost { stop, thread }),
            Err(e) => log::error!(
                "{}: cannot serve hosted jobs while paused: {e}",
                self.config.id
            ),
        }
    }

    /// Why activating this device failed, naming it.
    fn activate_error(&self, reason: String) -> ActivateError {
        ActivateError {
            device: self.config.id.clone(),
            reason,
        }
    }

    /// Starts a dataplane thread over `queues`.
    fn spawn(&mut self, queues: Vec<ActiveQueue>) -> Result<(), String> {
        // The dataplane takes hosted jobs over from the loop that served
        // them while the disk was paused or reset.
        self.stop_paused_host();
        if self.stuck {
            return Err(
                "its earlier I/O never completed; it stays unusable until the VMM ends".into(),
            );
        }
        let active = self.active.as_ref().ok_or("it is not active")?;
        let activation = Activation {
            mem: active.mem.clone(),
            queues,
            interrupt: active.interrupt.clone(),
            acked_features: active.acked_features,
            dirty: active.dirty.clone(),
        };
        let mut id = [0u8; ID_BYTES as usize];
        let serial = self.config.serial.as_bytes();
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial[..n]);
        let limits = DiskLimits {
            capacity: self.node.with(|node| node.driver().size()) / SECTOR_SIZE,
            read_only: self.config.read_only,
            max_segments: seg_max(self.config.queue_size),
            discard: activation.acked_features & (1 << VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: activation.acked_features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        };
        // One submission per descriptor is the most a full set of queues
        // can have in flight at once.
        use virtio_queue::QueueT;
        let entries: u32 = activation
            .queues
            .iter()
            .map(|q| u32::from(q.queue.size()))
            .sum();
        let (engine, bitmaps) = self
            .take_lease()
            .and_then(|lease| {
                let engine = lease.open_io(entries.clamp(1, 4096))?;
                Ok((engine, lease.node().bitmaps().clone()))
            })
            .map_err(|e| e.to_string())?;
        let stop = Arc::new(StopSignal::new().map_err(|e| e.to_string())?);
        let stop_for_thread = stop.clone();
        let name = self.config.id.clone();
        let poll = self.config.poll;
        let submit_batch = self.config.submit_batch;
        let throttle = self.throttle.clone();
        let stats = self.stats.clone();
        // A panic loses the queues with the thread, and the I/O it had in
        // flight may still land: the device needs a reset and keeps its
        // lease, as after a drain that did not end.
        let interrupt = activation.interrupt.clone();
        let host = self.host.clone();
        let thread = base::spawn_on(
            base::ThreadKind::Dataplane,
            format!("blk-{}", self.config.id),
            self.config.dataplane_cpus.clone(),
            move || {
                let dataplane =
                    Dataplane::new(name, activation, engine, limits, id, poll, stop_for_thread)
                        .with_throttle(throttle)
                        .with_submit_batch(submit_batch)
                        .with_stats(stats)
                        .with_bitmaps(bitmaps);
                match host {
                    Some(host) => dataplane.with_host(host),
                    None => dataplane,
                }
                .run()
            },
            move || {
                interrupt.fail();
                Stopped {
                    queues: Vec::new(),
                    drained: false,
                    hosting: None,
                }
            },
        )
        .map_err(|e| format!("cannot start its dataplane thread: {e}"))?;
        self.worker = Some(Worker { stop, thread });
        Ok(())
    }

    /// Stops the dataplane, letting requests in flight finish; the queues.
    fn stop_worker(&mut self) -> Option<Vec<ActiveQueue>> {
        let worker = self.worker.take()?;
        if let Err(e) = worker.stop.request() {
            log::error!("{}: cannot stop the dataplane: {e}", self.config.id);
        }
        match worker.thread.join() {
            Ok(Stopped {
                queues,
                drained: true,
                hosting,
            }) => {
                self.handover = hosting;
                Some(queues)
            }
            Ok(Stopped {
                queues,
                drained: false,
                ..
            }) => {
                // Operations may still land on the disk: no one else may
                // take the node while they can, so the lease is never
                // released (the dataplane leaked its engine and guest
                // memory for the same reason). The node stays busy under
                // this device's name until the VMM ends.
                self.stuck = true;
                if let Some(lease) = self.lease.take() {
                    log::error!(
                        "{}: keeping the lease on node '{}' for good: I/O may still be in flight",
                        self.config.id,
                        lease.node().name()
                    );
                    std::mem::forget(lease);
                }
                Some(queues)
            }
            Err(_) => {
                log::error!("{}: the dataplane thread panicked", self.config.id);
                None
            }
        }
    }
}

/// Most data buffers one request may have (`seg_max`), advertised in the
/// config space and enforced on requests: a chain as long as the queue,
/// less its header and status descriptors.
fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size.saturating_sub(2).max(1))
}

/// The virtio_blk_config structure (virtio 1.2, 5.2.4), little endian.
fn config_space(config: &BlockConfig, size: u64, blk_size: u32) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &(size / SECTOR_SIZE).to_le_bytes()); // capacity
    put(12, &seg_max(config.queue_size).to_le_bytes()); // seg_max
    put(20, &blk_size.to_le_bytes()); // blk_size
    put(34, &config.queues.to_le_bytes()); // num_queues
    put(36, &(u32::MAX / 512).to_le_bytes()); // max_discard_sectors
    put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
    put(44, &(blk_size / 512).to_le_bytes()); // discard_sector_alignment
    put(48, &(u32::MAX / 512).to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn name(&self) -> &str {
        &self.config.id
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; usize::from(self.config.queues)]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = start
                .checked_add(i)
                .and_then(|at| self.config_space.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Writeback toggling is not offered; everything is read-only.
        log::debug!(
            "{}: ignored {}-byte config write at {offset:#x}",
            self.config.id,
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(self.activate_error("it is already active".into()));
        }
        let (active, queues) = Active::split(activation);
        self.active = Some(active);
        self.spawn(queues).map_err(|reason| {
            self.active = None;
            self.activate_error(reason)
        })
    }

    fn shutdown(&mut self) {
        // Not `reset`: nothing new may start here (the main thread's
        // seccomp filter, at the VMM's end, allows no new eventfd).
        self.stop_worker();
        self.stop_paused_host();
        self.drop_handover();
        self.active = None;
    }

    fn reset(&mut self) -> Option<Vec<ActiveQueue>> {
        let queues = self.stop_worker();
        // The driver resets the disk (a guest reboot, say); hosted jobs go
        // on, served as while paused, until it activates the disk again.
        if let Some((hosting, engine)) = self.handover.take() {
            self.serve_paused(hosting, engine);
        }
        let active = self.active.take()?;
        queues.or(active.parked)
    }

    fn pause(&mut self) {
        if let Some(queues) = self.stop_worker() {
            if let Some(active) = self.active.as_mut() {
                active.parked = Some(queues);
            }
        }
        if let Some((hosting, engine)) = self.handover.take() {
            self.serve_paused(hosting, engine);
        }
        // Every request has completed: nothing of ours touches the node
        // now, unless hosted jobs go on through it while the VM is paused.
        if self.paused_host.is_none() {
            self.lease = None;
        }
    }

    fn parked_queues(&self) -> Result<Vec<QueuePosition>, SaveError> {
        let device = self.config.id.clone();
        if self.stuck {
            return Err(SaveError::Stuck { device });
        }
        if self.worker.is_some() {
            return Err(SaveError::Running { device });
        }
        let Some(active) = &self.active else {
            return Ok(Vec::new());
        };
        use virtio_queue::QueueT;
        let parked = active
            .parked
            .as_ref()
            .ok_or(SaveError::QueuesLost { device })?;
        Ok(parked
            .iter()
            .map(|q| QueuePosition {
                index: q.index,
                next_avail: q.queue.next_avail(),
                next_used: q.queue.next_used(),
                event_idx: q.queue.event_idx_enabled(),
            })
            .collect())
    }

    fn save_state(&self, w: &mut StateWriter) -> Result<(), SaveError> {
        // What the guest's driver was set up for; a destination whose disk
        // differs refuses it in `restore_state`.
        let capacity = self.node.with(|node| node.driver().size()) / SECTOR_SIZE;
        w.u64(capacity)
            .u16(self.config.queues)
            .u16(self.config.queue_size)
            .bool(self.config.read_only)
            .u64(self.active.as_ref().map_or(0, |a| a.acked_features));
        Ok(())
    }

    fn restore_state(&mut self, r: &mut StateReader) -> Result<(), StateError> {
        let capacity = r.u64("virtio-blk capacity")?;
        let queues = r.u16("virtio-blk queue count")?;
        let queue_size = r.u16("virtio-blk queue size")?;
        let read_only = r.bool("virtio-blk read-only flag")?;
        let acked = r.u64("virtio-blk acked features")?;
        let id = &self.config.id;
        let here = self.node.with(|node| node.driver().size()) / SECTOR_SIZE;
        let differs = |what: &'static str, saved: String, here: String| {
            StateError::invalid(
                what,
                format!("disk '{id}' had {saved} when saved, here it has {here}"),
            )
        };
        if capacity != here {
            return Err(differs(
                "virtio-blk capacity",
                format!("{capacity} sectors"),
                format!("{here} sectors"),
            ));
        }
        if queues != self.config.queues {
            return Err(differs(
                "virtio-blk queue count",
                format!("{queues} queues"),
                format!("{}", self.config.queues),
            ));
        }
        if queue_size != self.config.queue_size {
            return Err(differs(
                "virtio-blk queue size",
                format!("queue size {queue_size}"),
                format!("{}", self.config.queue_size),
            ));
        }
        if read_only != self.config.read_only {
            let ro = |ro: bool| if ro { "read-only" } else { "read-write" };
            return Err(StateError::invalid(
                "virtio-blk read-only flag",
                format!(
                    "disk '{id}' was {} when saved, here it is {}",
                    ro(read_only),
                    ro(self.config.read_only)
                ),
            ));
        }
        if acked & !self.features != 0 {
            return Err(StateError::invalid(
                "virtio-blk acked features",
                format!(
                    "disk '{id}': its driver uses features {:#x} this device does not offer",
                    acked & !self.features
                ),
            ));
        }
        Ok(())
    }

    fn activate_paused(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() || self.worker.is_some() {
            return Err(self.activate_error("it is already active".into()));
        }
        let (mut active, queues) = Active::split(activation);
        active.parked = Some(queues);
        self.active = Some(active);
        Ok(())
    }

    fn release(&mut self) -> Result<(), ResumeError> {
        if self.worker.is_some() {
            return Err(ResumeError {
                device: self.config.id.clone(),
                reason: format!("virtio-blk device '{}' is not paused", self.config.id),
            });
        }
        if self.stuck {
            return Err(ResumeError {
                device: self.config.id.clone(),
                reason: format!(
                    "virtio-blk device '{}' keeps its node for good: its earlier I/O never completed",
                    self.config.id
                ),
            });
        }
        if let Some(guests) = self.host.as_ref().map(|h| h.guests()) {
            if let Some(guest) = guests.first() {
                return Err(ResumeError {
                    device: self.config.id.clone(),
                    reason: format!(
                        "virtio-blk device '{}' still hosts {guest} on its node",
                        self.config.id
                    ),
                });
            }
        }
        // Nobody is hosted: the loop that served hosted jobs while paused
        // has nothing left to do, and the lease can go.
        self.stop_paused_host();
        self.host = None;
        self.lease = None;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), ResumeError> {
        if self.stuck {
            // The VM runs on; this disk stays in DEVICE_NEEDS_RESET.
            if let Some(active) = &self.active {
                active.interrupt.fail();
            }
            return Ok(());
        }
        // The dataplane takes the hosted jobs over again.
        self.stop_paused_host();
        let device = self.config.id.clone();
        self.take_lease().map_err(|e| ResumeError {
            device,
            reason: e.to_string(),
        })?;
        let parked = self.active.as_mut().and_then(|a| a.parked.take());
        if let Some(queues) = parked {
            if let Err(reason) = self.spawn(queues) {
                // The queues are gone with the failed start; only a reset
                // brings the device back, as for any dataplane failure.
                log::error!("{}: cannot resume: {reason}", self.config.id);
                if let Some(active) = &self.active {
                    active.interrupt.fail();
                }
            }
        }
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::Interrupt;
    use block::{FileOptions, Graph};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    const REQUESTS: u16 = 64;
    const HDRS: u64 = 0x10_0000;
    const BUFS: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    /// A 1 MiB disk of 0x5a bytes as a graph node, and the device's reference.
    fn disk(name: &str) -> (std::path::PathBuf, Graph, NodeRef) {
        let path = std::env::temp_dir().join(format!("devices-blk-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
        let graph = Graph::new();
        graph
            .add_disk("drive0", false, FileOptions::new(path.clone()))
            .unwrap();
        let node = graph.get("drive0", device_holder("vdt")).unwrap();
        (path, graph, node)
    }

    fn config(poll_us: u64) -> BlockConfig {
        BlockConfig {
            id: "vdt".into(),
            read_only: false,
            queues: 1,
            queue_size: 256,
            serial: "S".into(),
            poll: Duration::from_micros(poll_us),
            submit_batch: DEFAULT_SUBMIT_BATCH,
            live_jobs: false,
            dataplane_cpus: None,
        }
    }

    /// Puts `REQUESTS` 4 KiB reads on a fresh queue; the queue and the
    /// address of its used ring.
    fn queued_reads(mem: &GuestMemoryMmap) -> (virtio_queue::Queue, GuestAddress) {
        let mock = MockSplitQueue::new(mem, 256);
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let mut descs = Vec::new();
        for k in 0..REQUESTS {
            let mut header = [0u8; 16];
            header[8..16].copy_from_slice(&(u64::from(k) * 8).to_le_bytes());
            mem.write_slice(&header, GuestAddress(HDRS + u64::from(k) * 16))
                .unwrap();
            let d = 3 * k;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                HDRS + u64::from(k) * 16,
                16,
                next,
                d + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                BUFS + u64::from(k) * 4096,
                4096,
                next | write,
                d + 2,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                STATUS + u64::from(k),
                1,
                write,
                0,
            )));
        }
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut queue: virtio_queue::Queue = mock.create_queue().unwrap();
        queue.set_event_idx(false);
        (queue, mock.used_addr())
    }

    fn used_idx(mem: &GuestMemoryMmap, used: GuestAddress) -> u16 {
        mem.read_obj(GuestAddress(used.0 + 2)).unwrap()
    }

    /// Queues `REQUESTS` 4 KiB reads, starts the device, notifies, and
    /// resets it at once; returns (requests taken, requests completed).
    fn reset_with_reads_in_flight(poll_us: u64) -> (u16, u16) {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (queue, used) = queued_reads(&mem);

        let (path, _graph, node) = disk(&format!("reset-{poll_us}"));
        let mut device = Block::new(config(poll_us), node);
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let notifier = notify.try_clone().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        device
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![ActiveQueue {
                    index: 0,
                    queue,
                    notify,
                }],
                interrupt: Arc::new(Interrupt::new(irq)),
                acked_features: F_VERSION_1,
                dirty: Arc::new(crate::dirty::DirtyPages::new(0)),
            })
            .unwrap();
        notifier.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(1));
        let mut queues = device.reset().expect("the device was active");
        std::fs::remove_file(path).unwrap();

        let taken = queues[0].queue.next_avail();
        let used_idx = used_idx(&mem, used);
        // Every completed request carries its status and its data.
        for k in 0..used_idx {
            let status: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(k))).unwrap();
            assert_eq!(status, 0, "request {k}");
            let first: u8 = mem
                .read_obj(GuestAddress(BUFS + u64::from(k) * 4096))
                .unwrap();
            assert_eq!(first, 0x5a, "request {k} read the disk");
        }
        assert!(queues.pop().is_some());
        (taken, used_idx)
    }

    #[test]
    fn hosted_jobs_are_served_across_a_reset_and_the_next_activation() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (path, graph, node) = disk("hosted-reset");
        let mut cfg = config(0);
        cfg.live_jobs = true;
        let mut device = Block::new(cfg, node);
        let activate = |device: &mut Block| {
            let (queue, _) = queued_reads(&mem);
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            device
                .activate(Activation {
                    mem: mem.clone(),
                    queues: vec![ActiveQueue {
                        index: 0,
                        queue,
                        notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    }],
                    interrupt: Arc::new(Interrupt::new(irq)),
                    acked_features: F_VERSION_1,
                    dirty: Arc::new(crate::dirty::DirtyPages::new(0)),
                })
                .unwrap();
        };
        activate(&mut device);
        let job = graph
            .get("drive0", Holder::Job { id: "job0".into() })
            .unwrap();
        let access = job
            .take_access(Holder::Job { id: "job0".into() }, true)
            .unwrap();
        let mut io = access.open_io(4).unwrap();
        let read = |io: &mut Box<dyn block::AsyncIo>, tag: u64| {
            let mut buf = vec![0u8; 4096];
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the buffer outlives the wait below.
            unsafe { io.read_vectored(0, &iov, tag).unwrap() };
            io.submit().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(c) = io.next_completion() {
                    assert_eq!(c.result, 4096);
                    assert!(buf.iter().all(|&b| b == 0x5a));
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "hosted read {tag} was never served"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        read(&mut io, 1);
        // The driver resets the disk: the hosted job is still served.
        let _ = device.reset();
        read(&mut io, 2);
        // And by the dataplane again once the driver activates it.
        activate(&mut device);
        read(&mut io, 3);
        drop(io);
        drop(access);
        drop(device);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_reset_with_reads_in_flight_completes_every_request_it_took() {
        for poll in [0, 500] {
            let (taken, used) = reset_with_reads_in_flight(poll);
            assert!(
                taken > 0,
                "the dataplane took nothing within 1 ms (poll {poll})"
            );
            assert_eq!(
                taken, used,
                "requests taken but not completed at reset (poll {poll})"
            );
        }
    }

    #[test]
    fn pause_drains_and_releases_the_lease_and_resume_takes_it_back() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (queue, used) = queued_reads(&mem);
        let (path, graph, node) = disk("pause");
        let job_ref = graph
            .get("drive0", Holder::Job { id: "job0".into() })
            .unwrap();
        let mut device = Block::new(config(0), node);
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let notifier = notify.try_clone().unwrap();
        device.resume().unwrap();
        assert_eq!(
            graph.info(&job_ref).lease,
            Some(dataplane_holder("vdt")),
            "the lease is taken before the driver activates the device"
        );
        device
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![ActiveQueue {
                    index: 0,
                    queue,
                    notify,
                }],
                interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
                acked_features: F_VERSION_1,
                dirty: Arc::new(crate::dirty::DirtyPages::new(0)),
            })
            .unwrap();
        notifier.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(1));
        device.pause();
        std::fs::remove_file(path).unwrap();
        let done = used_idx(&mem, used);
        assert_eq!(graph.info(&job_ref).lease, None, "released on pause");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(used_idx(&mem, used), done, "no I/O while paused");

        let job_lease = job_ref
            .take_lease(Holder::Job { id: "job0".into() })
            .unwrap();
        let err = device.resume().unwrap_err();
        assert_eq!(
            err.to_string(),
            "Node 'drive0' is busy: block device is in use by block job 'job0'"
        );
        drop(job_lease);
        device.resume().unwrap();
        // The parked queue is served again: every request completes.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while used_idx(&mem, used) < REQUESTS {
            assert!(
                std::time::Instant::now() < deadline,
                "requests not served after resume"
            );
            notifier.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(graph.info(&job_ref).lease, Some(dataplane_holder("vdt")));
        assert!(device.reset().is_some());
    }

    #[test]
    fn config_space_reports_capacity_queues_and_limits() {
        let (path, _graph, node) = disk("config");
        let mut cfg = config(0);
        cfg.queues = 4;
        let device = Block::new(cfg, node);
        std::fs::remove_file(path).unwrap();
        let mut capacity = [0u8; 8];
        device.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2048);
        let mut queues = [0u8; 2];
        device.read_config(34, &mut queues);
        assert_eq!(u16::from_le_bytes(queues), 4);
        let mut past_end = [0xffu8; 8];
        device.read_config(56, &mut past_end);
        assert_eq!(
            past_end,
            [1, 0, 0, 0, 0, 0, 0, 0],
            "write_zeroes_may_unmap, then zeros past the end"
        );
        device.read_config(u64::MAX, &mut past_end);
        assert_eq!(past_end, [0; 8]);
        assert_eq!(device.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut blk_size = [0u8; 4];
        device.read_config(20, &mut blk_size);
        assert_eq!(u32::from_le_bytes(blk_size), 512);
    }

    #[test]
    fn seg_max_leaves_room_for_header_and_status() {
        assert_eq!(seg_max(256), 254);
        assert_eq!(seg_max(2), 1, "at least one data buffer");
        let mut cfg = config(0);
        cfg.queue_size = 16;
        let c = config_space(&cfg, 1 << 20, 512);
        assert_eq!(c[12..16], 14u32.to_le_bytes(), "seg_max");
    }

    #[test]
    fn a_host_block_size_of_4096_is_the_guests_block_size() {
        let c = config_space(&config(0), 1 << 20, 4096);
        assert_eq!(c[20..24], 4096u32.to_le_bytes(), "blk_size");
        assert_eq!(c[44..48], 8u32.to_le_bytes(), "discard_sector_alignment");
    }

    /// A loop device with 4096-byte sectors over a temporary file, as
    /// `losetup` makes it; None where that is not allowed (not root, no
    /// loop module).
    /// Whether this process runs as root (from /proc, no system call wrapper).
    fn runs_as_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
    }

    fn loop_4k(file: &std::path::Path) -> Option<String> {
        let out = std::process::Command::new("losetup")
            .args(["--sector-size", "4096", "-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    #[test]
    fn direct_on_a_4k_sector_disk_advertises_4096_byte_blocks() {
        let file = std::env::temp_dir().join(format!("devices-blk-{}-4k", std::process::id()));
        std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        let can_loop = std::path::Path::new("/dev/loop-control").exists() && runs_as_root();
        let Some(dev) = loop_4k(&file) else {
            std::fs::remove_file(&file).unwrap();
            // Where loop devices can be made, failing to make one is a failure.
            assert!(
                !can_loop,
                "losetup --sector-size 4096 failed as root with /dev/loop-control"
            );
            eprintln!("skipped: losetup cannot make a 4K-sector loop device here (needs root and the loop driver; tests/tests/virtio_blk.rs reports it as ignored)");
            return;
        };
        let block_size = |direct: bool| {
            let graph = Graph::new();
            graph
                .add_disk(
                    "drive0",
                    false,
                    FileOptions {
                        direct,
                        ..FileOptions::new(dev.clone().into())
                    },
                )
                .unwrap();
            let node = graph.get("drive0", device_holder("vdt")).unwrap();
            let device = Block::new(config(0), node);
            let mut blk_size = [0u8; 4];
            device.read_config(20, &mut blk_size);
            u32::from_le_bytes(blk_size)
        };
        let (direct, buffered) = (block_size(true), block_size(false));
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(direct, 4096, "direct=on on {dev}");
        assert_eq!(buffered, 512, "the page cache takes any 512-byte I/O");
    }
}
