//! Which host files the graph has open, so that two `file` nodes on one
//! image cannot both write it.
//!
//! The lease guards a node; a second node on the same host file (another
//! path, a link) would be a second door to the same bytes. So a `file`
//! node claims its image when it opens, and an open that would let two
//! nodes write one image, or one write while another reads, is refused,
//! naming the node that has the file open. Read-only nodes share. The
//! rule is the one the image locks (`crate::lock`) apply between
//! processes, and it holds with `locking=off` too.

use std::sync::{Arc, Mutex};

use base::sync::lock;

use super::node::next_id;
use super::GraphShared;
use crate::error::BlockError;
use crate::file::FileId;

/// One claimed image.
struct Entry {
    token: u64,
    id: FileId,
    node: String,
    writes: bool,
}

/// The images a graph's `file` nodes have open.
#[derive(Default)]
pub(crate) struct OpenFiles(Mutex<Vec<Entry>>);

/// A node's claim on its image; dropping it (with the node, after its
/// driver closed the file) lets the image be opened again.
pub(crate) struct FileClaim {
    graph: Arc<GraphShared>,
    token: u64,
}

impl FileClaim {
    /// Its node stopped writing: others may read the image now.
    pub(crate) fn demote(&self) {
        for e in lock(&self.graph.files.0).iter_mut() {
            if e.token == self.token {
                e.writes = false;
            }
        }
    }
}

impl Drop for FileClaim {
    fn drop(&mut self) {
        lock(&self.graph.files.0).retain(|e| e.token != self.token);
    }
}

/// Who would be in the way of `node` opening image `id`: the node that
/// has it open and whether the lock refused is the shared one.
fn conflict(entries: &[Entry], id: FileId, writes: bool) -> Option<(String, bool)> {
    entries
        .iter()
        .find(|e| e.id == id && (writes || e.writes))
        .map(|e| (e.node.clone(), !writes))
}

impl super::Graph {
    /// The node that has the host file at `path` open, whatever path or
    /// link it was opened by; `None` if none has (or `path` names nothing).
    pub fn node_with_file(&self, path: &std::path::Path) -> Option<String> {
        let id = FileId::of_path(path).ok()?;
        lock(&self.shared.files.0)
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.node.clone())
    }
}

impl GraphShared {
    /// Fails if opening image `id` at `path` (writing or not) conflicts
    /// with a node that has it open.
    pub(crate) fn check_file(
        self: &Arc<Self>,
        path: &str,
        id: FileId,
        writes: bool,
    ) -> Result<(), BlockError> {
        let found = conflict(&lock(&self.files.0), id, writes);
        match found {
            Some((other, shared)) => Err(self.in_use_error(path, other, shared)),
            None => Ok(()),
        }
    }

    /// Claims image `id` for `node`, or fails as [`Self::check_file`].
    pub(crate) fn claim_file(
        self: &Arc<Self>,
        node: &str,
        path: &str,
        id: FileId,
        writes: bool,
    ) -> Result<FileClaim, BlockError> {
        let mut entries = lock(&self.files.0);
        if let Some((other, shared)) = conflict(&entries, id, writes) {
            drop(entries);
            return Err(self.in_use_error(path, other, shared));
        }
        let token = next_id();
        entries.push(Entry {
            token,
            id,
            node: node.to_string(),
            writes,
        });
        Ok(FileClaim {
            graph: self.clone(),
            token,
        })
    }

    fn in_use_error(self: &Arc<Self>, path: &str, other: String, shared: bool) -> BlockError {
        let holders = self
            .upgrade(&other)
            .map(|n| n.holders().iter().map(|h| h.to_string()).collect())
            .unwrap_or_default();
        BlockError::ImageInUse {
            path: path.to_string(),
            node: other,
            holders,
            shared,
        }
    }
}
