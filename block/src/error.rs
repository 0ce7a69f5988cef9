//! The block layer's errors. Each names the node or holder the user knows,
//! and the texts follow QEMU's where QEMU has one, so its users recognise
//! them.

use crate::file::DiskError;
use crate::io::IoError;

/// What went wrong in the block graph.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// No node has this name.
    #[error("Cannot find device='{name}' nor node-name='{name}'")]
    NotFound { name: String },
    /// A node-name that breaks QEMU's rules for names.
    #[error(
        "Invalid node-name: '{name}' (start with a letter; then letters, digits, '-', '.', '_')"
    )]
    InvalidName { name: String },
    /// A node-name longer than QEMU allows.
    #[error("Node name too long: '{name}' has {} characters, at most 31 are allowed", name.len())]
    NameTooLong { name: String },
    /// `blockdev-add` without a name for the node it adds.
    #[error("'node-name' must be specified for the root node")]
    RootUnnamed,
    /// The name is taken by another node.
    #[error("Duplicate nodes with node-name='{name}'")]
    Duplicate { name: String },
    /// Someone else holds the node's in-use lease.
    #[error("Node '{node}' is busy: block device is in use by {holder}")]
    Busy { node: String, holder: String },
    /// `blockdev-del` on a node others still reference.
    #[error("Node '{node}' is in use by {}", holders.join(", "))]
    InUse { node: String, holders: Vec<String> },
    /// `blockdev-del` on a node the user did not add by name.
    #[error("Node '{node}' is not owned by the monitor")]
    NotOwned { node: String },
    /// Another node of this graph has the image open, writing it or (for a
    /// write) at all. QEMU's words for the lock, and the node in the way.
    #[error(
        "Failed to get {}\"write\" lock: image '{path}' is already open in node '{node}'{}",
        if *.shared { "shared " } else { "" },
        held_by(.holders)
    )]
    ImageInUse {
        path: String,
        node: String,
        holders: Vec<String>,
        /// The refused lock is the shared one: we would read, it writes.
        shared: bool,
    },
    /// A chain of nodes deeper than the graph allows.
    #[error("Node '{node}' would be {depth} nodes deep; at most {max} nodes may be stacked", max = crate::graph::MAX_DEPTH)]
    TooDeep { node: String, depth: usize },
    /// An image records a backing file but not its format, which is never
    /// guessed (a guest could write any header into a raw disk).
    #[error("Node '{node}': image '{image}' records backing file '{backing}' but not its format, which is never probed; record it with 'qemu-img rebase -u -b {backing} -F raw|qcow2 {image}'")]
    NoBackingFormat {
        node: String,
        image: String,
        backing: String,
    },
    /// An image records a backing format we have no driver for.
    #[error("Node '{node}': image '{image}' records backing format '{format}'; only raw and qcow2 backing files are supported")]
    BackingFormat {
        node: String,
        image: String,
        format: String,
    },
    /// The backing file an image records cannot be found.
    #[error("Node '{node}': cannot open backing file '{path}': {source}")]
    BackingMissing {
        node: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The backing chain comes back to a file already in it.
    #[error("Node '{node}': image '{image}' has backing file '{path}', which is already in this backing chain (a loop)")]
    BackingLoop {
        node: String,
        image: String,
        path: String,
    },
    /// The backing chain is longer than the graph stacks.
    #[error("Node '{node}': its backing chain has more than {max} images; at most {max} nodes may be stacked", max = crate::graph::MAX_DEPTH)]
    BackingTooDeep { node: String },
    /// `blockdev-snapshot` with an overlay that is the node it would cover.
    #[error("Making '{overlay}' a backing child of itself would create a cycle")]
    OverlayCycle { overlay: String },
    /// The overlay is attached elsewhere (QEMU's words, then who).
    #[error("The overlay is already in use{}", held_by(.holders))]
    OverlayInUse {
        overlay: String,
        holders: Vec<String>,
    },
    /// The overlay's format has no backing files.
    #[error("The overlay does not support backing images")]
    OverlayNoBacking { overlay: String },
    /// The overlay was added with a backing node.
    #[error("The overlay already has a backing image")]
    OverlayHasBacking { overlay: String },
    /// The guest would see another size (devices cannot change theirs).
    #[error(
        "The overlay '{overlay}' is {size} bytes, but node '{node}' it would cover is {node_size}"
    )]
    OverlaySize {
        overlay: String,
        size: u64,
        node: String,
        node_size: u64,
    },
    /// The node to snapshot is another node's child (QEMU's words).
    #[error("Node '{node}' is busy: node is used as {child} of '{parent}'")]
    ChildOfParent {
        node: String,
        parent: String,
        child: String,
    },
    /// `snapshot=on`: the throwaway overlay could not be made.
    #[error("Node '{node}': cannot create the temporary overlay '{path}': {reason}")]
    TempOverlay {
        node: String,
        path: String,
        reason: String,
    },
    /// A node's options are wrong.
    #[error("Node '{node}': {reason}")]
    Options { node: String, reason: String },
    /// The node's file could not be opened (the error names the file).
    #[error("{source}")]
    Open {
        node: String,
        #[source]
        source: DiskError,
    },
    /// A qcow2 image could not be opened.
    #[error("Node '{node}': {source}")]
    Qcow2 {
        node: String,
        #[source]
        source: crate::driver::qcow2::Qcow2Error,
    },
    /// The graph's images are inactive: the other side of a migration
    /// owns them until they are activated again.
    #[error("Node '{node}' is inactive: its image is handed over to the other side of a migration until the images are activated again")]
    Inactive { node: String },
    /// Images cannot be inactivated while someone does I/O on a node.
    #[error("Cannot inactivate the images: node '{node}' is in use by {holder}")]
    ActiveLease { node: String, holder: String },
    /// Block migration refused a chunk, a size or a read.
    #[error(transparent)]
    Migration(#[from] crate::migration::MigrationError),
    /// An I/O engine could not be set up for the node.
    #[error("Node '{node}': {source}")]
    Io {
        node: String,
        #[source]
        source: IoError,
    },
}

impl BlockError {
    /// The same error about a backing chain, told of `node`, the chain's
    /// top, rather than of the (unnamed) node deep in it that found it.
    pub(crate) fn of_chain(self, node: &str) -> Self {
        let node = node.to_string();
        match self {
            BlockError::NoBackingFormat { image, backing, .. } => BlockError::NoBackingFormat {
                node,
                image,
                backing,
            },
            BlockError::BackingFormat { image, format, .. } => BlockError::BackingFormat {
                node,
                image,
                format,
            },
            BlockError::BackingMissing { path, source, .. } => {
                BlockError::BackingMissing { node, path, source }
            }
            BlockError::BackingLoop { image, path, .. } => {
                BlockError::BackingLoop { node, image, path }
            }
            BlockError::BackingTooDeep { .. } => BlockError::BackingTooDeep { node },
            other => other,
        }
    }
}

fn held_by(holders: &[String]) -> String {
    if holders.is_empty() {
        String::new()
    } else {
        format!(", held by {}", holders.join(", "))
    }
}
