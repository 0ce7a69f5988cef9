//! Attaching virtio-blk disks to a VM: each gets a virtio-mmio slot in the
//! MMIO gap, an interrupt line through an irqfd, an ioeventfd per queue on
//! its notify register (so a queue notify never leaves KVM), and a
//! `virtio_mmio.device=` entry on the kernel command line.

use std::sync::{Arc, Mutex};

use block::{FileOptions, Graph};
use devices::dirty::DirtyPages;
use devices::virtio::block::{
    device_holder, Block, BlockConfig, BlockStats, NodeSlot, ThrottleControl,
};
use devices::virtio::mmio::{MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
use devices::virtio::Interrupt;
use devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::disk::DiskConfig;
use crate::error::{Error, Result};
use crate::memory::{VIRTIO_FIRST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE};
use crate::x86::mptable::IOAPIC_PINS;

/// As many disks as there are IOAPIC pins above the first virtio line.
pub const MAX_DISKS: usize = (IOAPIC_PINS as u32 - VIRTIO_FIRST_IRQ) as usize;

/// A disk whose nodes are open, waiting for a VM.
pub struct OpenDisk {
    config: BlockConfig,
    node: Arc<NodeSlot>,
    throttle: Arc<ThrottleControl>,
    stats: Arc<BlockStats>,
}

/// One disk's run-time controls, for the monitor's commands.
pub struct DiskControls {
    /// The device id.
    pub id: String,
    /// The node the device serves (an external snapshot moves it).
    pub node: Arc<NodeSlot>,
    /// The I/O limits, for `block_set_io_throttle` and `query-block`.
    pub throttle: Arc<ThrottleControl>,
    /// The I/O accounting, for `query-blockstats` and
    /// `block-latency-histogram-set`.
    pub stats: Arc<BlockStats>,
}

/// Every disk's controls, by device id.
#[derive(Clone, Default)]
pub struct Disks(Arc<[DiskControls]>);

impl Disks {
    /// The controls of the disk whose device is `id`.
    pub fn get(&self, id: &str) -> Option<&DiskControls> {
        self.0.iter().find(|d| d.id == id)
    }

    /// Every disk's controls.
    pub fn iter(&self) -> impl Iterator<Item = &DiskControls> {
        self.0.iter()
    }
}

/// The controls of `disks`, before they are attached.
pub fn controls(disks: &[OpenDisk]) -> Disks {
    Disks(
        disks
            .iter()
            .map(|d| DiskControls {
                id: d.config.id.clone(),
                node: d.node.clone(),
                throttle: d.throttle.clone(),
                stats: d.stats.clone(),
            })
            .collect(),
    )
}

/// The name a disk goes by: its `id=`, or `vda`, `vdb`... by position.
fn disk_name(index: usize, disk: &DiskConfig) -> String {
    disk.id.clone().unwrap_or_else(|| {
        let letter = (b'a' + (index % 26) as u8) as char;
        format!("vd{letter}")
    })
}

/// Opens every disk as a `file` node under a `raw` node in `graph` (named
/// by `node-name=`, else the device's name); the first that fails is the
/// error.
pub fn open_disks(graph: &Graph, disks: &[DiskConfig]) -> Result<Vec<OpenDisk>> {
    if disks.len() > MAX_DISKS {
        return Err(Error::TooManyDisks {
            count: disks.len(),
            max: MAX_DISKS,
        });
    }
    let mut open = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let id = disk_name(i, d);
        if open.iter().any(|o: &OpenDisk| o.config.id == id) {
            return Err(Error::DuplicateDisk(id));
        }
        let node_name = d.node_name.clone().unwrap_or_else(|| id.clone());
        let disk_err = |source| Error::Disk {
            id: id.clone(),
            source,
        };
        let file = FileOptions {
            filename: d.path.clone(),
            direct: d.direct,
            locking: d.locking,
            aio: d.aio,
        };
        if d.snapshot {
            graph.add_snapshot_image(&node_name, file, d.format, &std::env::temp_dir())
        } else {
            graph.add_image(&node_name, d.read_only, file, d.format)
        }
        .map_err(disk_err)?;
        let node = graph
            .get(&node_name, device_holder(&id))
            .map_err(disk_err)?;
        if let Some(cpus) = &d.dataplane_cpus {
            cpus.check_allowed().map_err(|source| Error::Affinity {
                what: format!("disk '{id}' dataplane-cpus:"),
                source,
            })?;
        }
        let throttle = Arc::new(ThrottleControl::new(d.throttle));
        let node = Arc::new(NodeSlot::new(&id, node));
        open.push(OpenDisk {
            throttle,
            stats: Arc::new(BlockStats::new(d.timed_stats)),
            config: BlockConfig {
                id,
                read_only: d.read_only,
                queues: d.queues,
                queue_size: d.queue_size,
                serial: d.serial.clone().unwrap_or_default(),
                poll: d.poll,
                submit_batch: d.submit_batch,
                live_jobs: d.live_jobs,
                dataplane_cpus: d.dataplane_cpus.clone(),
            },
            node,
        });
    }
    Ok(open)
}

/// The kernel parameters that announce `count` virtio-mmio devices to Linux.
pub fn cmdline_params(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                MMIO_LEN >> 10,
                VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_STRIDE,
                VIRTIO_FIRST_IRQ + i as u32
            )
        })
        .collect()
}

/// A queue's notify eventfd, to be registered with KVM as an ioeventfd.
pub struct QueueNotifier {
    device: String,
    queue: u32,
    addr: u64,
    fd: EventFd,
}

/// Registers each queue's notification as an ioeventfd, so that a notify
/// no longer leaves KVM. Where that fails, the transport's notify register
/// still signals the same eventfd, on an MMIO exit.
pub fn register_notifiers(vm: &VmFd, notifiers: Vec<QueueNotifier>) {
    for n in notifiers {
        if let Err(e) = vm.register_ioevent(&n.fd, &IoEventAddress::Mmio(n.addr), n.queue) {
            log::warn!(
                "{}: queue {}'s notification stays an MMIO exit: cannot register it with KVM: {e}",
                n.device,
                n.queue
            );
        }
    }
}

/// The disks' transports on the MMIO bus.
pub type Transports = Vec<Arc<Mutex<MmioTransport>>>;

/// Puts each disk on the MMIO bus and wires its interrupt; the disks
/// record the guest pages they write in `dirty`. Returns the transports
/// and their queues' notifiers for [`register_notifiers`].
pub fn attach_disks(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut Bus,
    disks: Vec<OpenDisk>,
    dirty: &Arc<DirtyPages>,
) -> Result<(Transports, Vec<QueueNotifier>)> {
    let mut transports = Vec::with_capacity(disks.len());
    let mut notifiers = Vec::new();
    for (i, disk) in disks.into_iter().enumerate() {
        let name = disk.config.id.clone();
        let fail = |reason: String| Error::Device {
            name: name.clone(),
            reason,
        };
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_STRIDE;
        let irq_line = VIRTIO_FIRST_IRQ + i as u32;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| fail(e.to_string()))?;
        vm.register_irqfd(&irq, irq_line)
            .map_err(|e| fail(format!("cannot register its interrupt: {e}")))?;
        let device = Block::with_slot(disk.config, disk.node, disk.throttle).with_stats(disk.stats);
        let transport = MmioTransport::new(
            Box::new(device),
            mem.clone(),
            Arc::new(Interrupt::new(irq)),
            dirty.clone(),
        )
        .map_err(|e| fail(e.to_string()))?;
        for (q, fd) in transport.notifiers().iter().enumerate() {
            notifiers.push(QueueNotifier {
                device: name.clone(),
                queue: q as u32,
                addr: base + NOTIFY_OFFSET,
                fd: fd
                    .try_clone()
                    .map_err(|e| fail(format!("cannot pass queue {q}'s notification: {e}")))?,
            });
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(&name, base, MMIO_LEN, transport.clone())
            .map_err(|e| fail(e.to_string()))?;
        transports.push(transport);
    }
    Ok((transports, notifiers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_announced_in_order_with_their_lines() {
        assert_eq!(
            cmdline_params(2),
            vec![
                "virtio_mmio.device=4K@0xd0000000:5".to_string(),
                "virtio_mmio.device=4K@0xd0001000:6".to_string()
            ]
        );
    }

    #[test]
    fn disks_are_named_by_position_unless_given_an_id() {
        let d: DiskConfig = "path=x".parse().unwrap();
        assert_eq!(disk_name(0, &d), "vda");
        assert_eq!(disk_name(2, &d), "vdc");
        let named: DiskConfig = "path=x,id=root".parse().unwrap();
        assert_eq!(disk_name(0, &named), "root");
    }

    #[test]
    fn duplicate_names_and_missing_files_are_refused() {
        let path = std::env::temp_dir().join(format!("vmm-virtio-dup-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(4096).unwrap();
        let a: DiskConfig = format!("path={},id=same", path.display()).parse().unwrap();
        let result = open_disks(&Graph::new(), &[a.clone(), a]);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(result, Err(Error::DuplicateDisk(id)) if id == "same"));
        let missing: DiskConfig = "path=/nonexistent.img".parse().unwrap();
        let err = open_disks(&Graph::new(), &[missing]).err().unwrap();
        assert_eq!(
            err.to_string(),
            "disk 'vda': cannot open disk '/nonexistent.img': No such file or directory (os error 2)"
        );
    }
}
