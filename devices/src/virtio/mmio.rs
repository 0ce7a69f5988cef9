//! The virtio-mmio transport, version 2 registers (virtio 1.2, 4.2.2).
//!
//! The guest sets the device up through these registers; on DRIVER_OK the
//! transport validates the queues and activates the device. Anything the
//! driver gets wrong (bad queue size or ring address, features it was not
//! offered) ends in a refused FEATURES_OK or in DEVICE_NEEDS_RESET, never
//! in a panic.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Activation, ActiveQueue, Interrupt, VirtioDevice, F_VERSION_1};
use crate::bus::{BusDevice, GuestRequest};

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

/// A virtio device on the MMIO transport.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Per queue: the driver wrote a size the queue refused.
    bad_size: Vec<bool>,
    notifiers: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// Puts `device` on the transport, interrupting through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
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
            bad_size: vec![false; queues.len()],
            queues,
            notifiers,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The eventfd of each queue, for the VMM to register as ioeventfds on
    /// the notify register with the queue index as datamatch.
    pub fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    /// Stops the device as a reset would: its worker drains and ends.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        self.device.name()
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
                let sel = self.queue_sel as usize;
                if let Some(q) = self.selected_queue() {
                    // An invalid size is remembered and refused at DRIVER_OK.
                    let ok = u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok());
                    self.bad_size[sel] = !ok;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                self.set_addr(|q, v| q.set_desc_table_address(Some(v), None), value)
            }
            reg::QUEUE_DESC_HIGH => {
                self.set_addr(|q, v| q.set_desc_table_address(None, Some(v)), value)
            }
            reg::QUEUE_DRIVER_LOW => {
                self.set_addr(|q, v| q.set_avail_ring_address(Some(v), None), value)
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.set_addr(|q, v| q.set_avail_ring_address(None, Some(v)), value)
            }
            reg::QUEUE_DEVICE_LOW => {
                self.set_addr(|q, v| q.set_used_ring_address(Some(v), None), value)
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.set_addr(|q, v| q.set_used_ring_address(None, Some(v)), value)
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

    fn set_addr(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        if let Some(q) = self.selected_queue() {
            set(q, value);
        }
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
            if self.bad_size[index] || !q.is_valid(&self.mem) {
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
        self.bad_size.fill(false);
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
