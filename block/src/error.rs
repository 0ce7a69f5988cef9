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
    /// An I/O engine could not be set up for the node.
    #[error("Node '{node}': {source}")]
    Io {
        node: String,
        #[source]
        source: IoError,
    },
}

fn held_by(holders: &[String]) -> String {
    if holders.is_empty() {
        String::new()
    } else {
        format!(", held by {}", holders.join(", "))
    }
}
