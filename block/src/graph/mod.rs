//! The block graph: named nodes, counted references, and in-use leases.
//!
//! ```text
//!  monitor name ─┐   virtio-blk 'vda' ─┐   block job ─┐
//!                ▼                      ▼              ▼
//!              [raw 'drive0'] ◄── lease: one holder at a time
//!                │ child 'file' (a reference)
//!                ▼
//!              [file '#block001'] ── the host file
//! ```
//!
//! Lifetime and busy state are separate: references keep a node open,
//! the lease says who may do I/O on it. Releasing a lease never closes a
//! node, and a lease holder always holds a reference.

mod files;
mod holder;
mod lease;
mod node;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use base::sync::lock;

pub use holder::Holder;
pub use lease::Lease;
pub use node::{Node, NodeRef};

pub use crate::driver::FileOptions;
use crate::driver::{self, Driver};
use crate::error::BlockError;
use crate::file::FileId;
use files::OpenFiles;

/// The most nodes one chain may stack (a `raw` over a `raw` over ... over a
/// `file`), as crosvm's `MAX_NESTING_DEPTH`: sizes, names and closing walk
/// the chain recursively, so a user must not be able to make it endless.
pub const MAX_DEPTH: usize = 16;

/// State every node of a graph shares.
pub(crate) struct GraphShared {
    /// Every open node by name; weak, so the registry keeps nothing alive.
    nodes: Mutex<BTreeMap<String, Weak<Node>>>,
    /// Held while deciding or releasing a lease.
    leases: Mutex<()>,
    /// Counter for the names of nodes the user did not name.
    auto_names: AtomicU64,
    /// The host files `file` nodes have open.
    files: OpenFiles,
}

impl GraphShared {
    /// The live node called `name`. The registry's lock is released before
    /// the caller can drop the `Arc`: dropping the last one closes the
    /// node, and closing takes that lock.
    fn upgrade(&self, name: &str) -> Option<Arc<Node>> {
        let weak = lock(&self.nodes).get(name).cloned();
        weak.and_then(|w| w.upgrade())
    }

    /// Whether a live node has `name`; upgrades nothing, so it drops
    /// nothing under the registry's lock.
    fn taken(nodes: &BTreeMap<String, Weak<Node>>, name: &str) -> bool {
        nodes.get(name).is_some_and(|w| w.strong_count() > 0)
    }
}

/// How to open one node (what `blockdev-add` or `--disk` asks for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOptions {
    /// Its name; generated (`#blockNNN`) for a child the user did not name.
    pub node_name: Option<String>,
    /// Refuse writes.
    pub read_only: bool,
    /// The driver and its options.
    pub driver: DriverOptions,
}

/// The drivers and their options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverOptions {
    /// A host file.
    File(FileOptions),
    /// The raw format over a `file` child.
    Raw { file: ChildOptions },
    /// Reads zeros, drops writes; `size` bytes.
    Null { size: u64 },
}

/// A child edge: an existing node by name, or a new node defined inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildOptions {
    /// An existing node.
    Node(String),
    /// A node to create as the child.
    Inline(Box<NodeOptions>),
}

/// What `query-named-block-nodes` shows of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node-name.
    pub name: String,
    /// `file`, `raw` or `null-co`.
    pub driver: &'static str,
    /// The host file (or `null-co://`) at the bottom of the node.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Child role and child node-name.
    pub children: Vec<(&'static str, String)>,
    /// Who holds references.
    pub references: Vec<Holder>,
    /// Who holds the lease.
    pub lease: Option<Holder>,
}

/// A block graph.
pub struct Graph {
    shared: Arc<GraphShared>,
    /// The user's name-references: one per node the user added by name.
    named: Mutex<BTreeMap<String, NodeRef>>,
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

/// QEMU's rule: a letter, then letters, digits, '-', '.', '_'; at most 31.
fn check_name(name: &str) -> Result<(), BlockError> {
    if !crate::name::wellformed(name) {
        return Err(BlockError::InvalidName { name: name.into() });
    }
    if name.len() > crate::name::MAX_NODE_NAME {
        return Err(BlockError::NameTooLong { name: name.into() });
    }
    Ok(())
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(GraphShared {
                nodes: Mutex::new(BTreeMap::new()),
                leases: Mutex::new(()),
                auto_names: AtomicU64::new(1),
                files: OpenFiles::default(),
            }),
            named: Mutex::new(BTreeMap::new()),
        }
    }

    /// Opens a node tree as `blockdev-add` does: the top node must be
    /// named, and the user's name holds it.
    pub fn add(&self, options: NodeOptions) -> Result<(), BlockError> {
        let Some(name) = options.node_name.clone() else {
            return Err(BlockError::RootUnnamed);
        };
        check_name(&name)?;
        // Refuse an endless inline nesting before opening any of it.
        let mut depth = 1;
        let mut inner = &options;
        while let DriverOptions::Raw {
            file: ChildOptions::Inline(child),
        } = &inner.driver
        {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(BlockError::TooDeep { node: name, depth });
            }
            inner = child;
        }
        let node = self.open(options, Holder::Monitor)?;
        lock(&self.named).insert(name, node);
        Ok(())
    }

    /// Opens a disk as `--disk` does: a `file` node for the host file and a
    /// `raw` node named `name` above it.
    pub fn add_disk(
        &self,
        name: &str,
        read_only: bool,
        file: FileOptions,
    ) -> Result<(), BlockError> {
        self.add(NodeOptions {
            node_name: Some(name.to_string()),
            read_only,
            driver: DriverOptions::Raw {
                file: ChildOptions::Inline(Box::new(NodeOptions {
                    node_name: None,
                    read_only,
                    driver: DriverOptions::File(file),
                })),
            },
        })
    }

    /// A reference to the node called `name`, for `holder`.
    pub fn get(&self, name: &str, holder: Holder) -> Result<NodeRef, BlockError> {
        match self.shared.upgrade(name) {
            Some(node) => Ok(NodeRef::first(&node, holder)),
            None => Err(BlockError::NotFound { name: name.into() }),
        }
    }

    /// `blockdev-del`: drops the user's name-reference, which closes the
    /// node; refused while anyone else holds it, naming them.
    pub fn remove(&self, name: &str) -> Result<(), BlockError> {
        let mut named = lock(&self.named);
        let Some(node) = named.get(name) else {
            let live = GraphShared::taken(&lock(&self.shared.nodes), name);
            return Err(if live {
                BlockError::NotOwned { node: name.into() }
            } else {
                BlockError::NotFound { name: name.into() }
            });
        };
        let others: Vec<String> = node
            .holders()
            .into_iter()
            .filter(|h| *h != Holder::Monitor)
            .map(|h| h.to_string())
            .collect();
        if !others.is_empty() {
            return Err(BlockError::InUse {
                node: name.into(),
                holders: others,
            });
        }
        named.remove(name);
        Ok(())
    }

    /// Every open node, by name.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        // Upgrade outside the registry's lock: an `Arc` whose other owners
        // let go meanwhile would close its node, which takes that lock.
        let weak: Vec<Weak<Node>> = lock(&self.shared.nodes).values().cloned().collect();
        let nodes: Vec<Arc<Node>> = weak.iter().filter_map(Weak::upgrade).collect();
        nodes.iter().map(info).collect()
    }

    /// What `query-named-block-nodes` shows of one node.
    pub fn info(&self, node: &NodeRef) -> NodeInfo {
        info(&node.node)
    }

    fn auto_name(&self) -> String {
        format!(
            "#block{:03}",
            self.shared.auto_names.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Opens `options` (children first) and registers it; the one
    /// reference returned belongs to `holder`.
    fn open(&self, options: NodeOptions, holder: Holder) -> Result<NodeRef, BlockError> {
        let name = match options.node_name {
            Some(name) => {
                check_name(&name)?;
                name
            }
            None => self.auto_name(),
        };
        // Fail before opening anything if the name is taken.
        if GraphShared::taken(&lock(&self.shared.nodes), &name) {
            return Err(BlockError::Duplicate { name });
        }
        let read_only = options.read_only;
        let mut claim = None;
        let driver: Box<dyn Driver<NodeRef>> = match options.driver {
            DriverOptions::File(options) => {
                let path = options.filename.display().to_string();
                // Name the node in the way before the image locks would
                // blame "another process" for our own open.
                if let Ok(id) = FileId::of_path(&options.filename) {
                    self.shared.check_file(&path, id, !read_only)?;
                }
                let file = driver::File::open(&name, &options, read_only)?;
                // The file opened is the one that counts (the path may have
                // changed since): claim it, or give it back.
                claim = Some(
                    self.shared
                        .claim_file(&name, &path, file.id(), !read_only)?,
                );
                Box::new(file)
            }
            DriverOptions::Null { size } => Box::new(driver::Null::new(&name, size)?),
            DriverOptions::Raw { file } => {
                let parent = Holder::Parent {
                    node: name.clone(),
                    child: "file",
                };
                let child = match file {
                    ChildOptions::Node(child) => self.get(&child, parent)?,
                    ChildOptions::Inline(mut child) => {
                        // An inline child opens the way its parent does.
                        child.read_only |= read_only;
                        self.open(*child, parent)?
                    }
                };
                if child.read_only() && !read_only {
                    return Err(BlockError::Options {
                        node: name,
                        reason: format!(
                            "its 'file' child '{}' is read-only; add this node with read-only=true",
                            child.name()
                        ),
                    });
                }
                let size = child.driver().size();
                if size % 512 != 0 {
                    return Err(BlockError::Open {
                        node: name,
                        source: crate::file::DiskError::PartialSector {
                            path: child.driver().filename().into(),
                            size,
                        },
                    });
                }
                Box::new(driver::Raw::new(child))
            }
        };
        let depth = 1 + driver
            .children()
            .iter()
            .map(|(_, c)| c.depth())
            .max()
            .unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(BlockError::TooDeep { node: name, depth });
        }
        let node = Node::new(
            name.clone(),
            read_only,
            driver,
            claim,
            depth,
            self.shared.clone(),
        );
        let mut nodes = lock(&self.shared.nodes);
        if GraphShared::taken(&nodes, &name) {
            drop(nodes);
            return Err(BlockError::Duplicate { name });
        }
        nodes.insert(name, Arc::downgrade(&node));
        drop(nodes);
        Ok(NodeRef::first(&node, holder))
    }
}

fn info(node: &Arc<Node>) -> NodeInfo {
    let driver = node.driver();
    NodeInfo {
        name: node.name().to_string(),
        driver: driver.name(),
        filename: driver.filename(),
        size: driver.size(),
        read_only: node.read_only(),
        children: driver
            .children()
            .into_iter()
            .map(|(role, c)| (role, c.name().to_string()))
            .collect(),
        references: node.holders(),
        lease: node.lease_holder(),
    }
}

#[cfg(test)]
mod tests;
