//! Who holds a node: the name that shows in errors and in
//! `query-named-block-nodes`.

use std::fmt;

/// A holder of a reference to a node, or of its in-use lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The user, through the node-name given at `blockdev-add` or `--disk`.
    Monitor,
    /// A parent node, through one of its child edges.
    Parent { node: String, child: &'static str },
    /// A guest device the node is attached to.
    Device { kind: &'static str, id: String },
    /// A device's dataplane, while it serves the guest.
    Dataplane { kind: &'static str, id: String },
    /// A block job.
    Job { id: String },
    /// A block export (NBD), by its id.
    Export { id: String },
    /// Block migration, copying a disk to (or receiving it from) another
    /// process.
    Migration,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Monitor => write!(f, "the monitor"),
            Holder::Parent { node, child } => write!(f, "node '{node}' (as its '{child}' child)"),
            Holder::Device { kind, id } => write!(f, "{kind} device '{id}'"),
            Holder::Dataplane { kind, id } => write!(f, "{kind} dataplane of device '{id}'"),
            Holder::Job { id } => write!(f, "block job '{id}'"),
            Holder::Export { id } => write!(f, "block export '{id}'"),
            Holder::Migration => write!(f, "block migration"),
        }
    }
}
