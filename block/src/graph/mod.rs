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

mod activation;
mod files;
mod holder;
mod host;
mod lease;
mod node;
mod snapshot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use base::sync::lock;

pub use holder::Holder;
pub use host::{Access, BeforeWrite, Host, Hosted, HostedRead, Replies};
pub use lease::Lease;
pub(crate) use node::next_id;
pub use node::{Node, NodeRef};
pub use snapshot::Appended;

pub use crate::driver::FileOptions;
use crate::driver::{self, Child, Driver, ImageDetails, Qcow2};
pub use crate::driver::{FormatSpecific, Qcow2Specific};
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
    /// Held while deciding or releasing a lease, and while the images
    /// are inactivated or activated.
    leases: Mutex<()>,
    /// Whether the images are active: locked, and leases may be taken.
    /// Changed only under `leases`.
    active: AtomicBool,
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
    /// The qcow2 format over a `file` child, with a backing chain.
    Qcow2 {
        file: ChildOptions,
        backing: BackingOptions,
    },
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

/// Where a qcow2 node's backing node comes from (QMP's `backing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingOptions {
    /// The backing file and format the image records (`backing` absent);
    /// opened read-only with the overlay's file options.
    FromImage,
    /// No backing node (`backing: null`): unallocated clusters read zeros
    /// until one is attached (`blockdev-snapshot`).
    None,
    /// This node (read only through the overlay), or a new one opened
    /// read-only.
    Child(ChildOptions),
}

/// The format of a disk image; never probed, always named by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// The guest sees the file byte for byte.
    #[default]
    Raw,
    /// qcow2, its backing chain taken from the image.
    Qcow2,
}

impl ImageFormat {
    /// QEMU's driver name.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(format!("'{s}' is not one of raw, qcow2")),
        }
    }
}

/// What QEMU's `ImageInfo` shows of a node: its image and, down the
/// backing chain, each backing image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The host file.
    pub filename: String,
    /// The driver's name.
    pub format: &'static str,
    /// Size in bytes as the guest sees it.
    pub virtual_size: u64,
    /// Cluster size, recorded backing file, format-specific data.
    pub details: Option<ImageDetails>,
    /// The recorded backing file name resolved as it was opened.
    pub full_backing_filename: Option<String>,
    /// The backing node's image.
    pub backing: Option<Box<ImageInfo>>,
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
    /// The backing node's file: the recorded name resolved, else the
    /// attached backing node's filename (QEMU's `backing_file`).
    pub backing_file: Option<String>,
    /// How many backing images are below this node.
    pub backing_file_depth: usize,
    /// Its image and its backing chain's.
    pub image: ImageInfo,
    /// Who holds references.
    pub references: Vec<Holder>,
    /// Who holds the lease.
    pub lease: Option<Holder>,
    /// Whom the lease holder hosts (QMP's `hosted`).
    pub hosted: Vec<Holder>,
    /// Its dirty bitmaps, newest first.
    pub bitmaps: Vec<crate::bitmap::BitmapInfo>,
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
                active: AtomicBool::new(true),
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
        let depth = inline_depth(&options);
        if depth > MAX_DEPTH {
            return Err(BlockError::TooDeep { node: name, depth });
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
        self.add_image(name, read_only, file, ImageFormat::Raw)
    }

    /// Opens a disk image of `format` as `--disk` does: a `file` node for
    /// the host file and a format node named `name` above it (a qcow2
    /// node over the backing chain its image records).
    pub fn add_image(
        &self,
        name: &str,
        read_only: bool,
        file: FileOptions,
        format: ImageFormat,
    ) -> Result<(), BlockError> {
        self.add(image_options(
            Some(name.to_string()),
            read_only,
            file,
            format,
        ))
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
        self.nodes_flat(false)
    }

    /// Every open node, by name; `flat` leaves out their backing images
    /// (and counts no backing depth), as QEMU's `flat` does.
    pub fn nodes_flat(&self, flat: bool) -> Vec<NodeInfo> {
        // Upgrade outside the registry's lock: an `Arc` whose other owners
        // let go meanwhile would close its node, which takes that lock.
        let weak: Vec<Weak<Node>> = lock(&self.shared.nodes).values().cloned().collect();
        let nodes: Vec<Arc<Node>> = weak.iter().filter_map(Weak::upgrade).collect();
        nodes.iter().map(|n| info_of(n, flat)).collect()
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
        self.open_in(options, holder, &mut Vec::new())
    }

    /// Opens `options` as [`Self::open`] does; `chain` holds the host
    /// files of the images above it in the backing chain being opened, so
    /// that a chain coming back to one of them is caught.
    fn open_in(
        &self,
        options: NodeOptions,
        holder: Holder,
        chain: &mut Vec<FileId>,
    ) -> Result<NodeRef, BlockError> {
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
        let opened_active = self.is_active();
        let mut claim = None;
        let driver: Box<dyn Driver<NodeRef>> = match options.driver {
            DriverOptions::File(options) => {
                let path = options.filename.display().to_string();
                // Name the node in the way before the image locks would
                // blame "another process" for our own open.
                if let Ok(id) = FileId::of_path(&options.filename) {
                    self.shared.check_file(&path, id, !read_only)?;
                }
                // Inactive images (a migration destination) open without
                // locks: the source still writes them.
                let file = if opened_active {
                    driver::File::open(&name, &options, read_only)?
                } else {
                    driver::File::open_unlocked(&name, &options, read_only)?
                };
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
                let child = self.file_child(&name, file, read_only)?;
                // The guest sees the file byte for byte: whole sectors only
                // (a qcow2 image file under a qcow2 node may be any size).
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
            DriverOptions::Qcow2 { file, backing } => {
                let file = self.file_child(&name, file, read_only)?;
                let parent = Holder::Parent {
                    node: name.clone(),
                    child: "backing",
                };
                let backing = match backing {
                    BackingOptions::None => None,
                    // A writable node may be one (fleecing's overlay over
                    // the guest's disk, as QEMU allows): qcow2 only reads
                    // its backing node.
                    BackingOptions::Child(ChildOptions::Node(child)) => {
                        Some(self.get(&child, parent)?)
                    }
                    BackingOptions::Child(ChildOptions::Inline(mut child)) => {
                        child.read_only = true;
                        Some(self.open_in(*child, parent, chain)?)
                    }
                    BackingOptions::FromImage => {
                        match self.backing_options(&name, &file, chain)? {
                            Some(child) => Some(
                                self.open_in(child, parent, chain)
                                    .map_err(|e| e.of_chain(&name))?,
                            ),
                            None => None,
                        }
                    }
                };
                Box::new(Qcow2::open(&name, file, backing, read_only)?)
            }
        };
        // Held until the node is registered, so that an activation or
        // inactivation running meanwhile either sees it or is seen here.
        let _decide = lock(&self.shared.leases);
        if !self.is_active() {
            // A format opened while inactive must not write its image
            // (nor trim it on close) before activation reads it again;
            // a file opened with locks lets go of them.
            driver.inactivate(&name)?;
        } else if !opened_active {
            // Activated while it opened: take it as the others were.
            driver.activate(&name, read_only)?;
        }
        self.register(name, read_only, driver, claim, holder)
    }

    /// Makes an open driver a node called `name` and registers it; the
    /// one reference returned belongs to `holder`.
    fn register(
        &self,
        name: String,
        read_only: bool,
        driver: Box<dyn Driver<NodeRef>>,
        claim: Option<files::FileClaim>,
        holder: Holder,
    ) -> Result<NodeRef, BlockError> {
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

impl Graph {
    /// A format node's `file` child: an existing node or an inline one,
    /// which opens the way its parent does.
    fn file_child(
        &self,
        name: &str,
        file: ChildOptions,
        read_only: bool,
    ) -> Result<NodeRef, BlockError> {
        let parent = Holder::Parent {
            node: name.to_string(),
            child: "file",
        };
        let child = match file {
            ChildOptions::Node(child) => self.get(&child, parent)?,
            ChildOptions::Inline(mut child) => {
                child.read_only |= read_only;
                self.open(*child, parent)?
            }
        };
        if child.read_only() && !read_only {
            return Err(BlockError::Options {
                node: name.to_string(),
                reason: format!(
                    "its 'file' child '{}' is read-only; add this node with read-only=true",
                    child.name()
                ),
            });
        }
        Ok(child)
    }

    /// How to open the backing file the qcow2 image on `file` records:
    /// its path resolved against the image's folder, its recorded format
    /// (never probed), read-only, with the image's own file options.
    /// `None` if it records none.
    fn backing_options(
        &self,
        name: &str,
        file: &NodeRef,
        chain: &mut Vec<FileId>,
    ) -> Result<Option<NodeOptions>, BlockError> {
        let Some((recorded, format)) = Qcow2::header_backing(name, file)? else {
            return Ok(None);
        };
        let image = file.driver().filename();
        let Some(format) = format else {
            return Err(BlockError::NoBackingFormat {
                node: name.into(),
                image,
                backing: recorded,
            });
        };
        let format: ImageFormat = format.parse().map_err(|_| BlockError::BackingFormat {
            node: name.into(),
            image: image.clone(),
            format,
        })?;
        let path = resolve_backing(&image, &recorded);
        let id = FileId::of_path(&path).map_err(|source| BlockError::BackingMissing {
            node: name.into(),
            path: path.display().to_string(),
            source,
        })?;
        if let Some(own) = file.driver().disk_file().map(|d| d.id()) {
            if !chain.contains(&own) {
                chain.push(own);
            }
        }
        if chain.contains(&id) {
            return Err(BlockError::BackingLoop {
                node: name.into(),
                image,
                path: path.display().to_string(),
            });
        }
        // Each image is at least one node: a longer chain cannot fit.
        if chain.len() >= MAX_DEPTH {
            return Err(BlockError::BackingTooDeep { node: name.into() });
        }
        chain.push(id);
        let options = match file.driver().file_options() {
            Some(own) => FileOptions {
                filename: path,
                ..own
            },
            None => FileOptions::new(path),
        };
        Ok(Some(image_options(None, true, options, format)))
    }
}

/// A backing file name as recorded, resolved as QEMU does: an absolute
/// path as it is, a relative one against the folder of the image that
/// records it.
pub fn resolve_backing(image: &str, recorded: &str) -> PathBuf {
    let recorded = Path::new(recorded);
    if recorded.is_absolute() {
        return recorded.to_path_buf();
    }
    match Path::new(image).parent() {
        Some(folder) => folder.join(recorded),
        None => recorded.to_path_buf(),
    }
}

/// A format node of `format` over an inline `file` node for `file`.
fn image_options(
    node_name: Option<String>,
    read_only: bool,
    file: FileOptions,
    format: ImageFormat,
) -> NodeOptions {
    let file = ChildOptions::Inline(Box::new(NodeOptions {
        node_name: None,
        read_only,
        driver: DriverOptions::File(file),
    }));
    NodeOptions {
        node_name,
        read_only,
        driver: match format {
            ImageFormat::Raw => DriverOptions::Raw { file },
            ImageFormat::Qcow2 => DriverOptions::Qcow2 {
                file,
                backing: BackingOptions::FromImage,
            },
        },
    }
}

/// How many nodes `options` stacks inline, itself included.
fn inline_depth(options: &NodeOptions) -> usize {
    let child = |c: &ChildOptions| match c {
        ChildOptions::Inline(o) => inline_depth(o),
        ChildOptions::Node(_) => 0,
    };
    1 + match &options.driver {
        DriverOptions::File(_) | DriverOptions::Null { .. } => 0,
        DriverOptions::Raw { file } => child(file),
        DriverOptions::Qcow2 { file, backing } => {
            let backing = match backing {
                BackingOptions::Child(c) => child(c),
                BackingOptions::FromImage | BackingOptions::None => 0,
            };
            child(file).max(backing)
        }
    }
}

/// The image of `node` and, unless `flat`, those of its backing chain.
fn image_info(node: &Node, flat: bool) -> ImageInfo {
    let driver = node.driver();
    let details = driver.image_details();
    let full_backing_filename = details
        .as_ref()
        .and_then(|d| d.backing_filename.as_deref())
        .map(|b| resolve_backing(&driver.filename(), b).display().to_string());
    ImageInfo {
        filename: driver.filename(),
        format: driver.name(),
        virtual_size: driver.size(),
        details,
        full_backing_filename,
        backing: match driver.backing() {
            Some(b) if !flat => Some(Box::new(image_info(b.node(), false))),
            _ => None,
        },
    }
}

fn info(node: &Arc<Node>) -> NodeInfo {
    info_of(node, false)
}

fn info_of(node: &Node, flat: bool) -> NodeInfo {
    let driver = node.driver();
    let image = image_info(node, flat);
    let backing_file = driver.backing().map(|b| {
        image
            .full_backing_filename
            .clone()
            .unwrap_or_else(|| b.driver().filename())
    });
    let mut backing_file_depth = 0;
    let mut below = driver.backing().filter(|_| !flat);
    while let Some(b) = below {
        backing_file_depth += 1;
        below = b.driver().backing();
    }
    NodeInfo {
        backing_file,
        backing_file_depth,
        image,
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
        hosted: node.hosted(),
        bitmaps: node.bitmaps().info(),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod backing_tests;

#[cfg(test)]
mod activation_tests;
