//! The virtio-mmio transport, version 2 registers (virtio 1.2, 4.2.2).
//!
//! The guest sets the device up through these registers; on DRIVER_OK the
//! transport validates the queues and activates the device. Anything the
//! driver gets wrong (bad queue size or ring address, features it was not
//! offered) ends in a refused FEATURES_OK or in DEVICE_NEEDS_RESET, never
//! in a panic.

use std::sync::Arc;

use base::state::{StateError, StateReader, StateWriter};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    status, Activation, ActiveQueue, Interrupt, QueuePosition, ResumeError, SaveError,
    VirtioDevice, F_VERSION_1,
};
use crate::bus::{BusDevice, GuestRequest};
use crate::dirty::DirtyPages;

/// The version of the transport's saved state layout.
const STATE_VERSION: u8 = 1;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// "VMM\0": our vendor ID.
const VENDOR_ID: u32 = 0x004d_4d56;
/// Bytes of register space each device occupies.
pub const MMIO_LEN: u64 = 0x1000;
/// Where the queue notify register sits (for ioeventfds).
pub const NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = super::NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
    pub const SHM_LEN_LOW: u64 = 0xb0;
    pub const SHM_LEN_HIGH: u64 = 0xb4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

/// Errors setting up a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd for queue notifications could not be created.
    #[error("cannot create a notification eventfd for virtio device '{device}': {source}")]
    EventFd {
        device: String,
        #[source]
        source: std::io::Error,
    },
}

const BAD_SIZE: u8 = 1;
const BAD_DESC: u8 = 2;
const BAD_AVAIL: u8 = 4;
const BAD_USED: u8 = 8;

/// The three rings of a split virtqueue.
#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

/// A virtio device on the MMIO transport.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Per queue: which of its settings the driver got wrong (`BAD_*`).
    bad: Vec<u8>,
    notifiers: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    /// Handed to the device at activation, for the pages it writes.
    dirty: Arc<DirtyPages>,
}

/// A transport's state as read back, checked, before any of it is applied.
struct Saved {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    interrupt_status: u32,
    broken: bool,
    queues: Vec<Queue>,
    bad: Vec<u8>,
    /// For a device that was active: its ready queues (index, queue), at
    /// their saved positions.
    parked: Option<Vec<(u16, Queue)>>,
}

impl MmioTransport {
    /// Puts `device` on the transport, interrupting through `interrupt`;
    /// the device records the guest pages it writes in `dirty`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        dirty: Arc<DirtyPages>,
    ) -> Result<Self, MmioError> {
        let sizes = device.queue_max_sizes();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut notifiers = Vec::with_capacity(sizes.len());
        for max in sizes {
            // A max size the queue type refuses is a bug in the device, so
            // fall back to the largest valid split-ring size.
            queues.push(Queue::new(max).unwrap_or_else(|_| Queue::new(256).expect("256 is valid")));
            notifiers.push(EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                MmioError::EventFd {
                    device: device.name().to_string(),
                    source,
                }
            })?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            bad: vec![0; queues.len()],
            queues,
            notifiers,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            dirty,
        })
    }

    /// The eventfd of each queue, for the VMM to register as ioeventfds on
    /// the notify register with the queue index as datamatch.
    pub fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    /// Stops the device as a reset would, for the VMM's end: its worker
    /// drains and ends, and nothing new starts.
    pub fn shutdown(&mut self) {
        if self.active {
            self.device.shutdown();
            self.active = false;
        }
        self.reset();
    }

    /// The VM pauses: the device finishes its requests in flight and
    /// releases what it holds.
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// The paused VM hands its images over: the device lets go of what
    /// `pause` kept, or says who still needs it.
    pub fn release(&mut self) -> Result<(), ResumeError> {
        self.device.release()
    }

    /// The VM resumes: the device takes back what it released, or says why
    /// it cannot.
    pub fn resume(&mut self) -> Result<(), ResumeError> {
        self.device.resume()
    }

    /// Writes the transport's registers, the interrupt's state and, for an
    /// active device, where its parked queues stand and the device's own
    /// state. Only a paused (or never activated) device can be saved.
    pub fn save(&self, w: &mut StateWriter) -> Result<(), SaveError> {
        let positions = if self.active {
            Some(self.device.parked_queues()?)
        } else {
            None
        };
        let mut device_state = StateWriter::new();
        self.device.save_state(&mut device_state)?;
        w.u8(STATE_VERSION)
            .u32(self.device.device_type())
            .str(self.device.name())
            .u32(self.status)
            .u32(self.device_features_sel)
            .u32(self.driver_features_sel)
            .u64(self.acked_features)
            .u32(self.queue_sel)
            .u32(self.config_generation)
            .u32(self.interrupt.status())
            .bool(self.interrupt.is_broken());
        w.u16(self.queues.len() as u16);
        for (q, bad) in self.queues.iter().zip(&self.bad) {
            w.u16(q.size())
                .bool(q.ready())
                .u64(q.desc_table())
                .u64(q.avail_ring())
                .u64(q.used_ring())
                .u8(*bad);
        }
        w.bool(positions.is_some());
        if let Some(positions) = positions {
            w.u16(positions.len() as u16);
            for p in positions {
                w.u16(p.index)
                    .u16(p.next_avail)
                    .u16(p.next_used)
                    .bool(p.event_idx);
            }
        }
        w.bytes(device_state.as_slice());
        Ok(())
    }

    /// Takes the state [`save`](Self::save) wrote, on a transport created
    /// for the same device and never activated. A device that was active
    /// is activated paused, its queues parked at their saved positions: the
    /// next [`resume`](Self::resume) starts serving them. Anything out of
    /// range is refused naming the device; on error nothing changed.
    pub fn restore(&mut self, r: &mut StateReader) -> Result<(), StateError> {
        let name = self.device.name().to_string();
        if self.active || self.status != 0 {
            return Err(StateError::invalid(
                "virtio-mmio state",
                format!("device '{name}' was set up already; state goes into a new one"),
            ));
        }
        let saved = self.read_saved(r, &name)?;
        let device_state = r.bytes("virtio device state")?;
        let mut dr = StateReader::new(device_state);
        self.device.restore_state(&mut dr)?;
        dr.finish("virtio device state")?;
        let was_active = saved.parked.is_some();
        if let Some(queues) = saved.parked {
            let mut active = Vec::with_capacity(queues.len());
            for (index, queue) in queues {
                let notify = self.notifiers[usize::from(index)]
                    .try_clone()
                    .map_err(|e| {
                        StateError::invalid(
                            "virtio queue",
                            format!("device '{name}': cannot pass queue {index}'s eventfd: {e}"),
                        )
                    })?;
                active.push(ActiveQueue {
                    index,
                    queue,
                    notify,
                });
            }
            let activation = Activation {
                mem: self.mem.clone(),
                queues: active,
                interrupt: self.interrupt.clone(),
                acked_features: saved.acked_features,
                dirty: self.dirty.clone(),
            };
            self.device
                .activate_paused(activation)
                .map_err(|e| StateError::invalid("virtio device", e.to_string()))?;
        }
        self.active = was_active;
        self.status = saved.status;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.acked_features = saved.acked_features;
        self.queue_sel = saved.queue_sel;
        self.config_generation = saved.config_generation;
        self.queues = saved.queues;
        self.bad = saved.bad;
        self.interrupt
            .set_state(saved.interrupt_status, saved.broken);
        Ok(())
    }

    /// Reads and checks the transport's part of a saved state.
    fn read_saved(&self, r: &mut StateReader, name: &str) -> Result<Saved, StateError> {
        let invalid = |what: &'static str, reason: String| {
            StateError::invalid(what, format!("device '{name}': {reason}"))
        };
        let version = r.u8("virtio-mmio state version")?;
        if version != STATE_VERSION {
            return Err(invalid(
                "virtio-mmio state version",
                format!("version {version} is not {STATE_VERSION}"),
            ));
        }
        let device_type = r.u32("virtio device type")?;
        if device_type != self.device.device_type() {
            return Err(invalid(
                "virtio device type",
                format!(
                    "saved as device type {device_type}, this is device type {}",
                    self.device.device_type()
                ),
            ));
        }
        let saved_name = r.str("virtio device name")?;
        if saved_name != name {
            return Err(invalid(
                "virtio device name",
                format!("the state was saved for device '{saved_name}'"),
            ));
        }
        let status = r.u32("virtio status")?;
        let device_features_sel = r.u32("virtio device features select")?;
        let driver_features_sel = r.u32("virtio driver features select")?;
        let acked_features = r.u64("virtio acked features")?;
        let queue_sel = r.u32("virtio queue select")?;
        let config_generation = r.u32("virtio config generation")?;
        let interrupt_status = r.u32("virtio interrupt status")?;
        let broken = r.bool("virtio device broken")?;
        let offered = self.device.features();
        if status & status::FEATURES_OK != 0 && acked_features & !offered != 0 {
            return Err(invalid(
                "virtio acked features",
                format!(
                    "the driver accepted features {acked_features:#x}; this device offers {offered:#x}"
                ),
            ));
        }
        if interrupt_status & !(super::INT_USED_RING | super::INT_CONFIG) != 0 {
            return Err(invalid(
                "virtio interrupt status",
                format!("{interrupt_status:#x} has unknown bits"),
            ));
        }
        let count = r.u16("virtio queue count")?;
        if usize::from(count) != self.queues.len() {
            return Err(invalid(
                "virtio queue count",
                format!(
                    "saved with {count} queues, this device has {}",
                    self.queues.len()
                ),
            ));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut bad = Vec::with_capacity(self.queues.len());
        for (index, fresh) in self.queues.iter().enumerate() {
            let size = r.u16("virtio queue size")?;
            let ready = r.bool("virtio queue ready")?;
            let desc = r.u64("virtio descriptor table address")?;
            let avail = r.u64("virtio avail ring address")?;
            let used = r.u64("virtio used ring address")?;
            let flags = r.u8("virtio queue errors")?;
            // The registers hold only what their setters accepted, so the
            // same setters check them.
            let mut q = Queue::new(fresh.max_size())
                .map_err(|e| invalid("virtio queue", format!("queue {index}: {e:?}")))?;
            let refused = |what: &str| {
                invalid(
                    "virtio queue",
                    format!("queue {index}: {what} is out of range"),
                )
            };
            q.try_set_size(size)
                .map_err(|_| refused(&format!("size {size}")))?;
            q.try_set_desc_table_address(vm_memory::GuestAddress(desc))
                .map_err(|_| refused(&format!("descriptor table address {desc:#x}")))?;
            q.try_set_avail_ring_address(vm_memory::GuestAddress(avail))
                .map_err(|_| refused(&format!("avail ring address {avail:#x}")))?;
            q.try_set_used_ring_address(vm_memory::GuestAddress(used))
                .map_err(|_| refused(&format!("used ring address {used:#x}")))?;
            q.set_ready(ready);
            if flags & !(BAD_SIZE | BAD_DESC | BAD_AVAIL | BAD_USED) != 0 {
                return Err(refused(&format!("error flags {flags:#x}")));
            }
            queues.push(q);
            bad.push(flags);
        }
        let parked = if r.bool("virtio device active")? {
            if status & (status::DRIVER_OK | status::FEATURES_OK)
                != status::DRIVER_OK | status::FEATURES_OK
            {
                return Err(invalid(
                    "virtio status",
                    format!("active, but status {status:#x} lacks DRIVER_OK or FEATURES_OK"),
                ));
            }
            let event_idx =
                acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
            let n = r.u16("virtio parked queue count")?;
            let ready: Vec<usize> = (0..queues.len()).filter(|&i| queues[i].ready()).collect();
            if usize::from(n) != ready.len() {
                return Err(invalid(
                    "virtio parked queues",
                    format!("{n} parked queues, but {} are ready", ready.len()),
                ));
            }
            let mut parked = Vec::with_capacity(ready.len());
            for &index in &ready {
                let p = QueuePosition {
                    index: r.u16("virtio queue index")?,
                    next_avail: r.u16("virtio queue next avail")?,
                    next_used: r.u16("virtio queue next used")?,
                    event_idx: r.bool("virtio queue event idx")?,
                };
                let wrong = |what: String| {
                    invalid("virtio parked queues", format!("queue {index}: {what}"))
                };
                if usize::from(p.index) != index {
                    return Err(wrong(format!("saved as queue {}", p.index)));
                }
                if bad[index] != 0 || !queues[index].is_valid(&self.mem) {
                    return Err(wrong(
                        "its size or a ring address is bad or outside guest memory".into(),
                    ));
                }
                if p.event_idx != event_idx {
                    return Err(wrong(format!(
                        "EVENT_IDX {} while the acked features say {event_idx}",
                        p.event_idx
                    )));
                }
                // A used index more than a queue ahead of the avail one
                // is one no driver produced.
                let size = queues[index].size();
                if p.next_avail.wrapping_sub(p.next_used) > size {
                    return Err(wrong(format!(
                        "next avail {} is more than {size} ahead of next used {}",
                        p.next_avail, p.next_used
                    )));
                }
                let mut q =
                    Queue::try_from(queues[index].state()).map_err(|e| wrong(format!("{e:?}")))?;
                q.set_next_avail(p.next_avail);
                q.set_next_used(p.next_used);
                q.set_event_idx(p.event_idx);
                parked.push((p.index, q));
            }
            Some(parked)
        } else {
            None
        };
        Ok(Saved {
            status,
            device_features_sel,
            driver_features_sel,
            acked_features,
            queue_sel,
            config_generation,
            interrupt_status,
            broken,
            queues,
            bad,
            parked,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue setup is frozen once the driver says it is ready.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS if self.interrupt.is_broken() => self.status | status::DEVICE_NEEDS_RESET,
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones says so.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!(
                    "{}: read of unknown register {offset:#x}",
                    self.device.name()
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let setting_up_features =
            self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if setting_up_features => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                1 => {
                    self.acked_features =
                        (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // An invalid size is remembered and refused at DRIVER_OK.
                    let ok = u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok());
                    self.mark(BAD_SIZE, !ok);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => self.set_addr(Ring::Desc, offset, value),
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                self.set_addr(Ring::Avail, offset, value)
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                self.set_addr(Ring::Used, offset, value)
            }
            reg::QUEUE_NOTIFY => {
                // Normally an ioeventfd catches this in KVM; this path is for
                // a VMM that could not register one.
                if let Some(fd) = self.notifiers.get(value as usize) {
                    let _ = fd.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => log::debug!(
                "{}: ignored write of {value:#x} to register {offset:#x} (status {:#x})",
                self.device.name(),
                self.status
            ),
        }
    }

    fn mark(&mut self, what: u8, bad: bool) {
        if let Some(flags) = self.bad.get_mut(self.queue_sel as usize) {
            if bad {
                *flags |= what;
            } else {
                *flags &= !what;
            }
        }
    }

    /// Sets half of a ring address; a misaligned one is remembered and
    /// refused at DRIVER_OK.
    fn set_addr(&mut self, ring: Ring, offset: u64, value: u32) {
        let high = offset % 8 == 4;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let old = match ring {
            Ring::Desc => q.desc_table(),
            Ring::Avail => q.avail_ring(),
            Ring::Used => q.used_ring(),
        };
        let new = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        let addr = vm_memory::GuestAddress(new);
        let (ok, flag) = match ring {
            Ring::Desc => (q.try_set_desc_table_address(addr).is_ok(), BAD_DESC),
            Ring::Avail => (q.try_set_avail_ring_address(addr).is_ok(), BAD_AVAIL),
            Ring::Used => (q.try_set_used_ring_address(addr).is_ok(), BAD_USED),
        };
        self.mark(flag, !ok);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, never taken away, short of a reset.
        if value & self.status != self.status {
            log::debug!(
                "{}: driver cleared status bits {:#x} -> {value:#x}",
                self.device.name(),
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.acked_features & !offered != 0 || self.acked_features & F_VERSION_1 == 0 {
                // Leaving FEATURES_OK clear tells the driver we refuse.
                log::debug!(
                    "{}: refusing features {:#x} (offered {offered:#x})",
                    self.device.name(),
                    self.acked_features
                );
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let name = self.device.name().to_string();
        let mut active = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if self.bad[index] != 0 || !q.is_valid(&self.mem) {
                log::debug!("{name}: queue {index} has a bad size or ring address");
                self.needs_reset();
                return;
            }
            let notify = match self.notifiers[index].try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    log::error!("{name}: cannot pass queue {index}'s eventfd: {e}");
                    self.needs_reset();
                    return;
                }
            };
            // The device gets its own copy; the registers keep theirs.
            let Ok(mut queue) = Queue::try_from(q.state()) else {
                self.needs_reset();
                return;
            };
            queue.set_event_idx(
                self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                    != 0,
            );
            active.push(ActiveQueue {
                index: index as u16,
                queue,
                notify,
            });
        }
        if active.is_empty() {
            log::debug!("{name}: DRIVER_OK without a ready queue");
            self.needs_reset();
            return;
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues: active,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
            dirty: self.dirty.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::error!("{e}");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.fail();
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.bad.fill(0);
        for fd in &self.notifiers {
            // Drop notifications that arrived for the old queues.
            let _ = fd.read();
        }
        self.interrupt.reset();
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "{}: {}-byte read at {offset:#x} refused",
                self.device.name(),
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = self.read_reg(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return None;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(bytes))
            }
            _ => log::debug!(
                "{}: {}-byte write at {offset:#x} refused",
                self.device.name(),
                data.len()
            ),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Record {
        activated: Vec<Vec<u16>>,
        resets: usize,
    }

    struct Fake(Arc<Mutex<Record>>);

    impl VirtioDevice for Fake {
        fn name(&self) -> &str {
            "fake0"
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), super::super::ActivateError> {
            let sizes = a.queues.iter().map(|q| q.queue.size()).collect();
            self.0.lock().unwrap().activated.push(sizes);
            Ok(())
        }
        fn reset(&mut self) -> Option<Vec<ActiveQueue>> {
            self.0.lock().unwrap().resets += 1;
            None
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Record>>) {
        let record = Arc::new(Mutex::new(Record::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(Fake(record.clone())),
            mem,
            Arc::new(Interrupt::new(irq)),
            Arc::new(DirtyPages::new(1 << 20)),
        )
        .unwrap();
        (t, record)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Negotiates `features`; the status register after FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        r(t, reg::STATUS)
    }

    /// Sets up queue 0 with `size` entries at the given ring addresses.
    fn set_up_queue(t: &mut MmioTransport, size: u32, rings: [u64; 3]) {
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, rings[0] as u32);
        w(t, reg::QUEUE_DRIVER_LOW, rings[1] as u32);
        w(t, reg::QUEUE_DEVICE_LOW, rings[2] as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    /// Negotiates `features` and sets up queue 0 with `size` at valid rings.
    fn set_up(t: &mut MmioTransport, features: u64, size: u32) -> u32 {
        let accepted = negotiate(t, features);
        set_up_queue(t, size, [0x1000, 0x2000, 0x3000]);
        accepted
    }

    const DRIVER_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers_read_as_virtio_mmio_version_2() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, reg::DEVICE_FEATURES),
            1,
            "VERSION_1 in the high word"
        );
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        w(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        let (mut t, _) = transport();
        assert_eq!(
            set_up(&mut t, F_VERSION_1 | 1 << 5, 16) & status::FEATURES_OK,
            0
        );
        w(&mut t, reg::STATUS, 0);
        assert_eq!(set_up(&mut t, 1, 16) & status::FEATURES_OK, 0);
        w(&mut t, reg::STATUS, 0);
        assert_ne!(set_up(&mut t, F_VERSION_1 | 1, 16) & status::FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_activates_the_ready_queues_and_reset_stops_the_device() {
        let (mut t, record) = transport();
        set_up(&mut t, F_VERSION_1, 8);
        w(&mut t, reg::STATUS, DRIVER_OK);
        assert_eq!(r(&mut t, reg::STATUS), DRIVER_OK);
        assert_eq!(record.lock().unwrap().activated, vec![vec![8]]);
        // Queue setup is frozen while the device runs.
        w(&mut t, reg::QUEUE_NUM, 4);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn bad_queue_sizes_or_rings_put_the_device_in_needs_reset() {
        for (size, desc) in [
            (3u32, 0x1000u32),
            (16, 0x1001),
            (16, 0xfff_f000),
            (70000, 0x1000),
        ] {
            let (mut t, record) = transport();
            set_up(&mut t, F_VERSION_1, size);
            w(&mut t, reg::QUEUE_DESC_LOW, desc);
            w(&mut t, reg::STATUS, DRIVER_OK);
            assert_ne!(
                r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
                0,
                "size {size} desc {desc:#x}"
            );
            assert!(record.lock().unwrap().activated.is_empty());
            assert_ne!(
                r(&mut t, reg::INTERRUPT_STATUS) & super::super::INT_CONFIG,
                0
            );
            // A reset clears the error state.
            w(&mut t, reg::STATUS, 0);
            assert_eq!(r(&mut t, reg::STATUS), 0);
        }
    }

    #[test]
    fn odd_widths_and_clearing_status_bits_are_ignored() {
        let (mut t, record) = transport();
        let mut byte = [0xffu8];
        t.read(reg::MAGIC, &mut byte);
        assert_eq!(byte, [0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        set_up(&mut t, F_VERSION_1, 8);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            r(&mut t, reg::STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        assert!(record.lock().unwrap().activated.is_empty());
        let mut cfg = [0u8; 2];
        t.read(0x104, &mut cfg);
        assert_eq!(cfg, [4, 4], "config space reads go to the device");
    }

    #[test]
    fn registers_of_a_device_never_activated_survive_save_and_restore() {
        let (mut t, _) = transport();
        // Mid-setup: features accepted, queue 0 half set up, a bad size on queue 1.
        set_up(&mut t, F_VERSION_1 | 1, 8);
        w(&mut t, reg::QUEUE_SEL, 1);
        w(&mut t, reg::QUEUE_NUM, 5);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        t.interrupt.raise(super::super::INT_CONFIG);
        let mut saved = StateWriter::new();
        t.save(&mut saved).unwrap();
        let saved = saved.into_vec();

        let (mut u, record) = transport();
        let mut reader = StateReader::new(&saved);
        u.restore(&mut reader).unwrap();
        reader.finish("virtio-mmio").unwrap();
        for offset in [
            reg::STATUS,
            reg::DEVICE_FEATURES,
            reg::QUEUE_SEL,
            reg::INTERRUPT_STATUS,
            reg::CONFIG_GENERATION,
        ] {
            assert_eq!(r(&mut u, offset), r(&mut t, offset), "register {offset:#x}");
        }
        assert_eq!(u.acked_features, F_VERSION_1 | 1);
        assert_eq!(u.bad, vec![0, BAD_SIZE]);
        assert_eq!(u.queues[0].size(), 8);
        assert!(u.queues[0].ready() && u.queues[1].ready());
        // The driver finishes setup on the destination: queue 1 still refused.
        w(&mut u, reg::STATUS, DRIVER_OK);
        assert!(record.lock().unwrap().activated.is_empty());
        assert_ne!(r(&mut u, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn an_active_device_that_cannot_save_its_queues_is_named_in_the_error() {
        let (mut t, _) = transport();
        set_up(&mut t, F_VERSION_1, 8);
        w(&mut t, reg::STATUS, DRIVER_OK);
        t.pause();
        let err = t.save(&mut StateWriter::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot save virtio device 'fake0': it cannot save its state while active"
        );
    }

    /// Save and restore with a real virtio-blk device over a graph node.
    mod blk {
        use super::*;
        use crate::virtio::block::{device_holder, Block, BlockConfig};
        use crate::virtio::SaveError;
        use block::{FileOptions, Graph, Holder};
        use std::time::{Duration, Instant};
        use virtio_bindings::virtio_ring::{
            VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
        };
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::Bytes;

        const MEM: u64 = 4 << 20;
        const HDRS: u64 = 0x10_0000;
        const BUFS: u64 = 0x20_0000;
        const STATUS: u64 = 0x30_0000;
        /// Requests the test sends in all (one 4 KiB read of block k each).
        const REQUESTS: u16 = 40;

        /// A disk file of `blocks` 4 KiB blocks, block k filled with k.
        fn disk_file(name: &str, blocks: u64) -> std::path::PathBuf {
            let path =
                std::env::temp_dir().join(format!("devices-mmio-{}-{name}", std::process::id()));
            let data: Vec<u8> = (0..blocks * 4096).map(|i| (i / 4096) as u8).collect();
            std::fs::write(&path, data).unwrap();
            path
        }

        /// A graph with `path` as node "drive0".
        fn drive0(path: &std::path::Path) -> Graph {
            let graph = Graph::new();
            graph
                .add_disk("drive0", false, FileOptions::new(path.to_path_buf()))
                .unwrap();
            graph
        }

        fn config() -> BlockConfig {
            BlockConfig {
                id: "vdt".into(),
                read_only: false,
                queues: 1,
                queue_size: 256,
                serial: "S".into(),
                poll: Duration::ZERO,
                submit_batch: crate::virtio::block::device::DEFAULT_SUBMIT_BATCH,
                live_jobs: false,
                dataplane_cpus: None,
            }
        }

        fn transport(
            graph: &Graph,
            mem: &GuestMemoryMmap,
            dirty: &Arc<DirtyPages>,
        ) -> MmioTransport {
            let node = graph.get("drive0", device_holder("vdt")).unwrap();
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            MmioTransport::new(
                Box::new(Block::new(config(), node)),
                mem.clone(),
                Arc::new(Interrupt::new(irq)),
                dirty.clone(),
            )
            .unwrap()
        }

        /// Publishes reads k in `range` (header, 4 KiB buffer, status),
        /// descriptors 3k..3k+3.
        fn publish(
            mem: &GuestMemoryMmap,
            mock: &MockSplitQueue<GuestMemoryMmap>,
            range: std::ops::Range<u16>,
        ) {
            let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
            for k in range {
                let mut header = [0u8; 16];
                header[8..16].copy_from_slice(&(u64::from(k) * 8).to_le_bytes());
                let hdr = HDRS + u64::from(k) * 16;
                mem.write_slice(&header, GuestAddress(hdr)).unwrap();
                mem.write_obj(0xffu8, GuestAddress(STATUS + u64::from(k)))
                    .unwrap();
                let d = 3 * k;
                let descs = [
                    SplitDescriptor::new(hdr, 16, next, d + 1),
                    SplitDescriptor::new(BUFS + u64::from(k) * 4096, 4096, next | write, d + 2),
                    SplitDescriptor::new(STATUS + u64::from(k), 1, write, 0),
                ]
                .map(RawDescriptor::from);
                mock.add_desc_chains(&descs, d).unwrap();
            }
        }

        fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
            mem.read_obj(GuestAddress(mock.used_addr().0 + 2)).unwrap()
        }

        /// Waits until the used index reaches `n`, without notifying.
        fn wait_used(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while used_idx(mem, mock) != n {
                assert!(
                    Instant::now() < deadline,
                    "used index {} never reached {n}",
                    used_idx(mem, mock)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// Every read up to `n` completed with its block's data.
        fn check_served(mem: &GuestMemoryMmap, n: u16) {
            for k in 0..n {
                let status: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(k))).unwrap();
                assert_eq!(status, 0, "request {k}");
                let mut buf = [0u8; 4096];
                mem.read_slice(&mut buf, GuestAddress(BUFS + u64::from(k) * 4096))
                    .unwrap();
                assert!(
                    buf.iter().all(|&b| b == k as u8),
                    "request {k} read block {k}"
                );
            }
        }

        /// Sets the device up as a driver does, queue 0 at `mock`'s rings.
        fn drive(t: &mut MmioTransport, mock: &MockSplitQueue<GuestMemoryMmap>) {
            negotiate(t, F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX);
            let rings = [mock.desc_table_addr(), mock.avail_addr(), mock.used_addr()];
            set_up_queue(t, 256, rings.map(|a| a.0));
            w(t, reg::STATUS, DRIVER_OK);
            assert_eq!(r(t, reg::STATUS), DRIVER_OK);
        }

        fn save(t: &MmioTransport) -> Vec<u8> {
            let mut w = StateWriter::new();
            t.save(&mut w).unwrap();
            w.into_vec()
        }

        fn restore(t: &mut MmioTransport, state: &[u8]) -> Result<(), StateError> {
            let mut r = StateReader::new(state);
            t.restore(&mut r)?;
            r.finish("virtio-mmio")
        }

        /// Offset of queue 0's size in a saved state of device "vdt".
        const QUEUE0: usize = 1 + 4 + (4 + 3) + 4 * 3 + 8 + 4 * 3 + 1 + 2;

        #[test]
        fn a_paused_device_moves_to_a_new_transport_and_serves_on_from_where_it_was() {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
            let mock = MockSplitQueue::new(&mem, 256);
            let path = disk_file("move", 256);
            let graph = drive0(&path);
            let job = graph
                .get("drive0", Holder::Job { id: "job0".into() })
                .unwrap();
            let dirty = Arc::new(DirtyPages::new(MEM));

            let mut t = transport(&graph, &mem, &dirty);
            t.resume().unwrap();
            drive(&mut t, &mock);
            publish(&mem, &mock, 0..8);
            t.notifiers()[0].write(1).unwrap();
            wait_used(&mem, &mock, 8);
            assert_eq!(
                t.save(&mut StateWriter::new()).unwrap_err(),
                SaveError::Running {
                    device: "vdt".into()
                }
            );

            // Pause and save; the source resumes (a failed migration) and
            // serves what was published while it was paused, unnotified.
            t.pause();
            publish(&mem, &mock, 8..16);
            let first = save(&t);
            t.resume().unwrap();
            wait_used(&mem, &mock, 16);

            t.pause();
            publish(&mem, &mock, 16..24);
            let state = save(&t);
            assert_ne!(first, state, "the queue moved on");
            drop(t);

            // The destination: a new device on the same node, memory as moved.
            let mut t = transport(&graph, &mem, &dirty);
            restore(&mut t, &state).unwrap();
            assert_eq!(save(&t), state, "restore then save gives the same state");
            assert_eq!(graph.info(&job).lease, None, "no lease before resume");
            assert_eq!(used_idx(&mem, &mock), 16, "nothing served before resume");
            assert_eq!(r(&mut t, reg::STATUS), DRIVER_OK);
            dirty.start();
            t.resume().unwrap();
            // Published before the save, never seen: served without a notify.
            wait_used(&mem, &mock, 24);
            publish(&mem, &mock, 24..REQUESTS);
            t.notifiers()[0].write(1).unwrap();
            wait_used(&mem, &mock, REQUESTS);
            check_served(&mem, REQUESTS);
            assert_eq!(
                graph.info(&job).lease,
                Some(crate::virtio::block::dataplane_holder("vdt"))
            );

            // Every page the dataplane wrote is marked; pages it only read are not.
            let mut pages = Vec::new();
            dirty.harvest(|p| pages.push(p));
            for k in 16..REQUESTS {
                let page = (BUFS >> 12) + u64::from(k);
                assert!(
                    pages.contains(&page),
                    "buffer of request {k} (page {page:#x})"
                );
            }
            assert!(pages.contains(&(STATUS >> 12)), "status bytes");
            let used = mock.used_addr().0;
            assert!(pages.contains(&(used >> 12)), "used ring");
            assert!(
                pages.contains(&((used + 6 + 8 * 256 - 1) >> 12)),
                "avail event"
            );
            assert!(!pages.contains(&(HDRS >> 12)), "headers are only read");
            assert!(
                !pages.contains(&((BUFS >> 12) + 15)),
                "served before logging"
            );
            t.shutdown();
            std::fs::remove_file(path).unwrap();
        }

        #[test]
        fn truncated_corrupt_or_mismatched_state_is_refused_naming_the_device() {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
            let mock = MockSplitQueue::new(&mem, 256);
            let path = disk_file("corrupt", 256);
            let graph = drive0(&path);
            let dirty = Arc::new(DirtyPages::new(MEM));
            let mut t = transport(&graph, &mem, &dirty);
            t.resume().unwrap();
            drive(&mut t, &mock);
            t.pause();
            let state = save(&t);
            drop(t);

            let mut t = transport(&graph, &mem, &dirty);
            for cut in 0..state.len() {
                assert!(
                    restore(&mut t, &state[..cut]).is_err(),
                    "prefix of {cut} bytes"
                );
            }
            let corrupt = |at: usize, bytes: &[u8]| {
                let mut s = state.clone();
                s[at..at + bytes.len()].copy_from_slice(bytes);
                s
            };
            let cases = [
                (
                    corrupt(QUEUE0, &100u16.to_le_bytes()),
                    "queue 0: size 100 is out of range",
                ),
                (
                    corrupt(QUEUE0, &512u16.to_le_bytes()),
                    "queue 0: size 512 is out of range",
                ),
                (
                    corrupt(QUEUE0 + 3, &(MEM + 0x1000).to_le_bytes()),
                    "queue 0: its size or a ring address is bad or outside guest memory",
                ),
                (
                    corrupt(QUEUE0 + 3, &0x1001u64.to_le_bytes()),
                    "queue 0: descriptor table address 0x1001 is out of range",
                ),
                (
                    corrupt(QUEUE0 - 2, &2u16.to_le_bytes()),
                    "saved with 2 queues, this device has 1",
                ),
                (corrupt(0, &[9]), "version 9 is not 1"),
                (corrupt(QUEUE0 + 2, &[2]), "is not 0 or 1"),
            ];
            for (bad, want) in &cases {
                let err = match restore(&mut t, bad) {
                    Ok(()) => panic!("taken, where it should fail with: {want}"),
                    Err(e) => e.to_string(),
                };
                assert!(err.contains(want), "{err}");
                assert!(err.contains("'vdt'") || want.contains("0 or 1"), "{err}");
            }
            // Nothing was changed by all that: the whole state still goes in.
            restore(&mut t, &state).unwrap();
            assert!(
                restore(&mut t, &state).is_err(),
                "a transport takes state once"
            );
            t.shutdown();
            drop(t);

            // A disk of another size is refused, naming both sizes.
            let other = disk_file("corrupt-big", 512);
            let graph = drive0(&other);
            let mut t = transport(&graph, &mem, &dirty);
            let err = restore(&mut t, &state).unwrap_err();
            assert_eq!(
                err.to_string(),
                "the saved state is invalid: virtio-blk capacity: \
                 disk 'vdt' had 2048 sectors when saved, here it has 4096 sectors"
            );
            assert_eq!(r(&mut t, reg::STATUS), 0, "nothing taken");
            std::fs::remove_file(path).unwrap();
            std::fs::remove_file(other).unwrap();
        }
    }
}
