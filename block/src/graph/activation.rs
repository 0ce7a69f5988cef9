//! Image activation: QEMU's inactivate/activate around a migration on
//! shared storage.
//!
//! ```text
//!  source   active ── inactivate_images ──► inactive   (no locks, no leases)
//!  dest     opened inactive ───────────────► activate_images ──► active
//! ```
//!
//! While inactive, every `file` node holds no image lock and every format
//! has written back what it cached and writes nothing, so the other
//! process may take the image; no lease can be taken, so nothing does
//! I/O. Activation locks the images again (or fails, naming the lock
//! that is in the way, leaving everything inactive) and has formats read
//! their metadata again. Nodes opened while the graph is inactive open
//! that way: a destination calls [`Graph::inactivate_images`] on its
//! empty graph, then adds its disks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use base::sync::lock;

use super::{Graph, Node};
use crate::error::BlockError;

impl Graph {
    /// Whether the images are active (locked; leases may be taken).
    pub fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Lets go of every image for another process: formats write back
    /// what they cached, `file` nodes drop all their image locks, and
    /// leases are refused until [`Graph::activate_images`]. Refused,
    /// changing nothing, while anyone holds a node's lease. Nodes opened
    /// afterwards open inactive (without locks).
    pub fn inactivate_images(&self) -> Result<(), BlockError> {
        let _decide = lock(&self.shared.leases);
        if !self.is_active() {
            return Ok(());
        }
        let mut nodes = self.live_nodes();
        // Top down: a lease covers the nodes below, so the node the
        // holder took is named; and a format writes its tables back
        // through its file before that file lets go.
        nodes.sort_by_key(|n| std::cmp::Reverse(n.depth()));
        for n in &nodes {
            if let Some(holder) = n.lease_holder() {
                return Err(BlockError::ActiveLease {
                    node: n.name().to_string(),
                    holder: holder.to_string(),
                });
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            if let Err(e) = n.driver().inactivate(n.name()) {
                reactivate(&nodes[..i]);
                return Err(e);
            }
        }
        self.shared.active.store(false, Ordering::Release);
        Ok(())
    }

    /// Takes every image back: `file` nodes lock their images as they
    /// opened them (read-only or not, with their `locking`), formats read
    /// their metadata again; then leases work again. Fails naming the
    /// image and the lock in the way (the other process still has it),
    /// leaving every image inactive.
    pub fn activate_images(&self) -> Result<(), BlockError> {
        let _decide = lock(&self.shared.leases);
        if self.is_active() {
            return Ok(());
        }
        let mut nodes = self.live_nodes();
        // Bottom up: the file is locked before its format reads it.
        nodes.sort_by_key(|n| n.depth());
        for (i, n) in nodes.iter().enumerate() {
            if let Err(e) = n.driver().activate(n.name(), n.read_only()) {
                let done = &nodes[..i];
                for d in done.iter().rev() {
                    if let Err(e) = d.driver().inactivate(d.name()) {
                        log::warn!("node '{}': cannot inactivate it again: {e}", d.name());
                    }
                }
                return Err(e);
            }
        }
        self.shared.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Every open node. Upgraded outside the registry's lock: an `Arc`
    /// whose other owners let go meanwhile would close its node, which
    /// takes that lock.
    fn live_nodes(&self) -> Vec<Arc<Node>> {
        let weak: Vec<Weak<Node>> = lock(&self.shared.nodes).values().cloned().collect();
        weak.iter().filter_map(Weak::upgrade).collect()
    }
}

/// Undoes a half-done inactivation (nodes given top down).
fn reactivate(done: &[Arc<Node>]) {
    for n in done.iter().rev() {
        if let Err(e) = n.driver().activate(n.name(), n.read_only()) {
            log::warn!("node '{}': cannot activate it again: {e}", n.name());
        }
    }
}
