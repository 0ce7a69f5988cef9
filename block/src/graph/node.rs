//! A node and the counted, named references to it.
//!
//! The `Arc` does the counting: a node is closed (its driver dropped, its
//! file closed, its children released) exactly when the last [`NodeRef`]
//! goes. Each `NodeRef` also records who holds it, so the graph can say who
//! keeps a node alive.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base::sync::lock;

use super::files::FileClaim;
use super::{GraphShared, Holder};
use crate::bitmap::Bitmaps;
use crate::driver::{Child, Driver};

/// Ids for references and leases, so each can remove exactly itself.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// One layer of a disk.
pub struct Node {
    name: String,
    /// Set for good when an overlay above takes over its writes.
    read_only: AtomicBool,
    driver: Box<dyn Driver<NodeRef>>,
    /// A `file` node's claim on its image; declared after the driver so
    /// it is let go only once the driver has closed the file.
    _claim: Option<FileClaim>,
    depth: usize,
    refs: Mutex<Vec<(u64, Holder)>>,
    pub(crate) lease: Mutex<Option<(u64, Holder)>>,
    /// What the lease holder offers its guests, while it hosts.
    pub(crate) host: Mutex<Option<Arc<super::Host>>>,
    pub(crate) graph: Arc<GraphShared>,
    /// Its named dirty bitmaps.
    bitmaps: Arc<Bitmaps>,
}

impl Node {
    pub(crate) fn new(
        name: String,
        read_only: bool,
        driver: Box<dyn Driver<NodeRef>>,
        claim: Option<FileClaim>,
        depth: usize,
        graph: Arc<GraphShared>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            read_only: AtomicBool::new(read_only),
            driver,
            _claim: claim,
            depth,
            refs: Mutex::new(Vec::new()),
            lease: Mutex::new(None),
            host: Mutex::new(None),
            graph,
            bitmaps: Arc::default(),
        })
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Stops writing, for good: it becomes read-only, its image's claim in
    /// the graph and its write lock other processes see are given up, so
    /// that the overlay above may be the image's one writer. The caller
    /// holds the lease on it, so nothing writes meanwhile.
    pub(crate) fn give_up_write(&self) -> Result<(), crate::BlockError> {
        if self.read_only() {
            return Ok(());
        }
        // The driver first: a format flushes what it cached to write.
        self.driver.give_up_write(&self.name)?;
        self.read_only.store(true, Ordering::Release);
        if let Some(claim) = &self._claim {
            claim.demote();
        }
        Ok(())
    }

    /// How many nodes its chain stacks, itself and the bottom included.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The driver serving this layer.
    pub fn driver(&self) -> &dyn Driver<NodeRef> {
        self.driver.as_ref()
    }

    /// Its named dirty bitmaps, which every writer of the node marks.
    pub fn bitmaps(&self) -> &Arc<Bitmaps> {
        &self.bitmaps
    }

    /// Who holds references to it, in the order they took them.
    pub fn holders(&self) -> Vec<Holder> {
        lock(&self.refs).iter().map(|(_, h)| h.clone()).collect()
    }

    /// Who the lease holder hosts (empty unless it hosts).
    pub fn hosted(&self) -> Vec<Holder> {
        lock(&self.host)
            .as_ref()
            .map(|h| h.guests())
            .unwrap_or_default()
    }

    /// Who holds its in-use lease, if anyone.
    pub fn lease_holder(&self) -> Option<Holder> {
        lock(&self.lease).as_ref().map(|(_, h)| h.clone())
    }

    /// This node and every node below it, each once.
    pub(crate) fn subtree(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut out: Vec<Arc<Node>> = vec![self.clone()];
        let mut i = 0;
        while i < out.len() {
            let children: Vec<Arc<Node>> = out[i]
                .driver
                .children()
                .into_iter()
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

    fn add_ref(self: &Arc<Self>, holder: Holder) -> NodeRef {
        let id = next_id();
        lock(&self.refs).push((id, holder));
        NodeRef {
            node: self.clone(),
            id,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        log::debug!("closing block node '{}'", self.name);
        let mut nodes = lock(&self.graph.nodes);
        // A new node may already have taken the name; only a dead entry is
        // ours. Counting, not upgrading: an upgraded `Arc` dropped here
        // could close that other node under this very lock.
        if nodes.get(&self.name).is_some_and(|w| w.strong_count() == 0) {
            nodes.remove(&self.name);
        }
    }
}

/// A counted reference to a node, naming its holder.
pub struct NodeRef {
    pub(crate) node: Arc<Node>,
    id: u64,
}

impl NodeRef {
    /// The first reference to a new node.
    pub(crate) fn first(node: &Arc<Node>, holder: Holder) -> Self {
        node.add_ref(holder)
    }

    /// Another reference to the same node, for `holder`.
    pub fn clone_for(&self, holder: Holder) -> NodeRef {
        self.node.add_ref(holder)
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Whether two references point at the same node.
    pub fn same_node(&self, other: &NodeRef) -> bool {
        Arc::ptr_eq(&self.node, &other.node)
    }
}

impl Child for NodeRef {
    fn name(&self) -> &str {
        self.node.name()
    }

    fn driver(&self) -> &dyn Driver<NodeRef> {
        self.node.driver()
    }
}

impl std::ops::Deref for NodeRef {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Drop for NodeRef {
    fn drop(&mut self) {
        lock(&self.node.refs).retain(|(id, _)| *id != self.id);
    }
}

impl std::fmt::Debug for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeRef({})", self.node.name)
    }
}
