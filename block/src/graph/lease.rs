//! The in-use lease: at most one holder at a time may do I/O on a node.
//!
//! A lease covers the node and everything below it, so nobody can write to
//! a `file` node while someone else uses the `raw` node above it. Every
//! lease is decided under one graph-wide lock, so two takers cannot both
//! win, and a refusal names the holder at once: nothing waits.

use std::sync::Arc;

use base::sync::lock;

use super::node::{next_id, Node, NodeRef};
use super::Holder;
use crate::error::BlockError;
use crate::io::AsyncIo;

/// A held lease. Dropping it releases the lease; the node lives on as long
/// as other references do.
pub struct Lease {
    /// The lease holder's own reference, so the node cannot vanish under it.
    node: NodeRef,
    covered: Vec<Arc<Node>>,
    holder: Holder,
    id: u64,
}

impl NodeRef {
    /// Takes this node's lease (and its children's) for `holder`, or says
    /// who has it.
    pub fn take_lease(&self, holder: Holder) -> Result<Lease, BlockError> {
        let graph = self.node.graph.clone();
        let _decide = lock(&graph.leases);
        if !graph.active.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BlockError::Inactive {
                node: self.name().to_string(),
            });
        }
        let covered = self.node.lease_cover();
        for n in &covered {
            if let Some((_, h)) = lock(&n.lease).as_ref() {
                return Err(BlockError::Busy {
                    node: n.name().to_string(),
                    holder: h.to_string(),
                });
            }
        }
        let id = next_id();
        for n in &covered {
            *lock(&n.lease) = Some((id, holder.clone()));
        }
        Ok(Lease {
            node: self.clone_for(holder.clone()),
            covered,
            holder,
            id,
        })
    }
}

impl Node {
    /// What a lease on this node covers: the node and everything below,
    /// except a backing node whose lease holder hosts (fleecing's overlay
    /// over a running guest's disk): the overlay only reads its backing,
    /// and whoever uses the overlay reads that through the holder.
    fn lease_cover(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut out: Vec<Arc<Node>> = vec![self.clone()];
        let mut i = 0;
        while i < out.len() {
            let children: Vec<Arc<Node>> = out[i]
                .driver()
                .children()
                .into_iter()
                .filter(|(role, c)| *role != "backing" || lock(&c.node.host).is_none())
                .map(|(_, c)| c.node.clone())
                .collect();
            for c in children {
                if !out.iter().any(|n| Arc::ptr_eq(n, &c)) {
                    out.push(c);
                }
            }
            i += 1;
        }
        out
    }
}

impl Lease {
    /// The leased node.
    pub fn node(&self) -> &NodeRef {
        &self.node
    }

    /// Who holds it.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// An I/O engine on the node with room for `depth` operations in
    /// flight. Only a lease holder gets one: busy state guards I/O.
    pub fn open_io(&self, depth: u32) -> Result<Box<dyn AsyncIo>, BlockError> {
        let name = self.node.name();
        let notifier = crate::io::new_notifier("engine").map_err(|source| BlockError::Io {
            node: name.into(),
            source,
        })?;
        self.node.driver().open_io(name, depth, &notifier)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _decide = lock(&self.node.graph.leases);
        // Hosting ends with the lease: nobody new gets in, and reads left
        // waiting fail rather than wait for ever.
        if let Some(host) = lock(&self.node.node.host).take() {
            host.close();
        }
        for n in &self.covered {
            let mut slot = lock(&n.lease);
            if slot.as_ref().is_some_and(|(id, _)| *id == self.id) {
                *slot = None;
            }
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({} by {})", self.node.name(), self.holder)
    }
}
