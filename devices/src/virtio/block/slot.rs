//! Which node a virtio-blk device serves. An external snapshot moves a
//! device from its node to a new overlay above it; the monitor does that
//! through this slot, which the device and the monitor's per-disk registry
//! share, so both always name the same node.
//!
//! The slot only says which node is current: the device reads it when it
//! takes its lease (at start and at every resume), so a move made while no
//! dataplane runs takes effect at the next `cont`. Whoever moves it must
//! hold the lease on the node it moves away from, which keeps the
//! dataplane from starting on it meanwhile.

use std::sync::Mutex;

use base::sync::lock;
use block::NodeRef;

use super::device::device_holder;

/// The node a device serves, shared by the device and the monitor.
pub struct NodeSlot {
    /// The device's id, for the reference's holder name.
    id: String,
    node: Mutex<NodeRef>,
}

impl NodeSlot {
    /// The slot of device `id`, serving `node` (a reference the device
    /// holds).
    pub fn new(id: &str, node: NodeRef) -> Self {
        Self {
            id: id.to_string(),
            node: Mutex::new(node),
        }
    }

    /// The current node's name.
    pub fn name(&self) -> String {
        lock(&self.node).name().to_string()
    }

    /// Calls `f` with the current node.
    pub fn with<T>(&self, f: impl FnOnce(&NodeRef) -> T) -> T {
        f(&lock(&self.node))
    }

    /// Moves the device to `node`, taking a reference in the device's
    /// name and dropping the one it held on its old node.
    pub fn replace(&self, node: &NodeRef) {
        let new = node.clone_for(device_holder(&self.id));
        let old = std::mem::replace(&mut *lock(&self.node), new);
        // Dropped outside the lock: the last reference closes the node.
        drop(old);
    }
}
