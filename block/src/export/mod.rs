//! Block exports: a node served to clients outside the VMM (NBD, in
//! `nbd/`), and the registry of exports by id.
//!
//! ```text
//!  Exports ── registry: id -> Export ── ExportAccess (how its I/O is done)
//!     │                                   └─ NodeRef (Holder::Export)
//!     └─ NbdServer: listener thread, one thread per client; a client's
//!                   engine comes from ExportAccess::open_io
//! ```
//!
//! An export holds a reference to its node (shown as `block export 'ID'`
//! among the node's holders) and gets its I/O only through
//! [`ExportAccess`]: the server never asks how. Today that takes the
//! node's in-use lease, for read-only exports too (the lease is
//! exclusive), so exporting a node a running guest's dataplane holds is
//! refused naming the dataplane.
//!
//! Dirty bitmaps an export offers (`qemu:dirty-bitmap:NAME`) are claimed
//! when it is added ([`BitmapSpec`], QEMU's lookups and checks) and stay
//! busy until the export is dropped, after its last client.

pub mod nbd;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base::sync::lock;

use crate::bitmap::{BitmapError, Bitmaps, Claim};
use crate::driver::Allocation;
use crate::error::BlockError;
use crate::graph::{Access, Holder, NodeRef};
use crate::io::AsyncIo;

pub use nbd::{NbdAddr, NbdServer};

/// Why an export command was refused; texts are QEMU's.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// `nbd-server-start` twice.
    #[error("NBD server already running")]
    ServerRunning,
    /// An NBD command without a server.
    #[error("NBD server not running")]
    ServerNotRunning,
    /// The listening socket could not be set up.
    #[error("Failed to bind socket to {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The host of an inet address is not one we can bind.
    #[error("address resolution failed for {host}:{port}: {reason}")]
    Address {
        host: String,
        port: String,
        reason: String,
    },
    /// A thread could not be started.
    #[error("cannot start the NBD server thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The id is taken.
    #[error("Block export id '{id}' is already in use")]
    DuplicateId { id: String },
    /// The NBD name is taken.
    #[error("NBD server already has export named '{name}'")]
    DuplicateName { name: String },
    /// A name or description longer than the protocol's strings.
    #[error("export {what} '{value}' too long")]
    TooLong { what: &'static str, value: String },
    /// No export has this id.
    #[error("Export '{id}' is not found")]
    NotFound { id: String },
    /// `block-export-del` with `mode: safe` while clients are connected.
    #[error("export '{id}' still in use")]
    InUse { id: String },
    /// `block-export-del` of an export already going.
    #[error("export '{id}' is already shutting down")]
    ShuttingDown { id: String },
    /// A writable export of a read-only node.
    #[error("Cannot export read-only node as writable")]
    ReadOnlyNode { node: String },
    /// No bitmap of this name on the node or down its backing chain.
    #[error("Bitmap '{name}' is not found")]
    BitmapNotFound { name: String },
    /// A read-only export of a bitmap that a writable node still records
    /// into: clients would see it change under them.
    #[error("Enabled bitmap '{name}' incompatible with readonly export")]
    EnabledBitmap { name: String },
    /// `{"node": ..., "name": ...}` naming a node that does not exist.
    #[error("Node '{node}' not found")]
    BitmapNode { node: String },
    /// The bitmap is missing on the named node, or busy.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// The node could not be used.
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// A dirty bitmap an export offers as the `qemu:dirty-bitmap:NAME`
/// metadata context. The dirty bitmaps' module provides them; an export
/// only reads extents.
pub trait ExportBitmap: Send + Sync {
    /// The bitmap's name, as the context names it.
    fn name(&self) -> &str;
    /// Whether the byte at `offset` is dirty, and how many bytes from
    /// there (at least 1, at most `len`) are alike.
    fn extent(&self, offset: u64, len: u64) -> (bool, u64);
}

impl ExportBitmap for Claim {
    fn name(&self) -> &str {
        Claim::name(self)
    }

    fn extent(&self, offset: u64, len: u64) -> (bool, u64) {
        Claim::extent(self, offset, len)
    }
}

/// A bitmap `block-export-add` names (QAPI's `BlockDirtyBitmapOrStr`).
pub enum BitmapSpec {
    /// A name: the exported node's bitmap, or the first found down its
    /// backing chain.
    Local(String),
    /// Bitmap `name` of node `node`, whose bitmaps the caller looked up
    /// (`None`: no such node).
    External {
        node: String,
        name: String,
        bitmaps: Option<Arc<Bitmaps>>,
    },
}

/// Finds each bitmap `specs` names for an export of `node`, checked in
/// QEMU's order (found, not enabled on a writable node when the export is
/// read-only, not busy), then claims them all: busy while the export
/// lives. A name given twice is offered twice, as QEMU does.
fn claim_bitmaps(
    specs: &[BitmapSpec],
    node: &NodeRef,
    writable: bool,
) -> Result<Vec<Arc<dyn ExportBitmap>>, ExportError> {
    let mut found: Vec<(Arc<Bitmaps>, &str)> = Vec::new();
    for spec in specs {
        let (bitmaps, name) = match spec {
            BitmapSpec::Local(name) => {
                let mut at = Some(node);
                let holder = loop {
                    match at {
                        Some(n) if n.bitmaps().contains(name) => break n,
                        Some(n) => at = n.driver().backing(),
                        None => return Err(ExportError::BitmapNotFound { name: name.clone() }),
                    }
                };
                let enabled = holder
                    .bitmaps()
                    .info()
                    .iter()
                    .any(|b| b.name.as_deref() == Some(name.as_str()) && b.recording);
                if !writable && !holder.read_only() && enabled {
                    return Err(ExportError::EnabledBitmap { name: name.clone() });
                }
                (holder.bitmaps().clone(), name.as_str())
            }
            BitmapSpec::External {
                node,
                name,
                bitmaps,
            } => {
                let bitmaps = bitmaps
                    .clone()
                    .ok_or_else(|| ExportError::BitmapNode { node: node.clone() })?;
                if !bitmaps.contains(name) {
                    return Err(BitmapError::NotFound(name.clone()).into());
                }
                (bitmaps, name.as_str())
            }
        };
        bitmaps.check_usable(name)?;
        found.push((bitmaps, name));
    }
    let mut claimed: Vec<Arc<dyn ExportBitmap>> = Vec::new();
    for (bitmaps, name) in found {
        claimed.push(Arc::new(bitmaps.claim(name)?));
    }
    Ok(claimed)
}

/// How an export reaches its node's data. The one place that decides
/// how an export gets I/O on a node.
pub struct ExportAccess {
    access: Access,
}

impl ExportAccess {
    /// Access to `node` for the export `holder`: the node's lease (our
    /// lease is exclusive, so a read-only export takes it too when it is
    /// free); for a read-only export of a node whose lease holder hosts
    /// (a fleecing backup's overlay, a live-jobs disk), reads through that
    /// holder. Refused with the holder's name otherwise.
    pub fn open(node: &NodeRef, holder: Holder, writable: bool) -> Result<Self, ExportError> {
        if writable && node.read_only() {
            return Err(ExportError::ReadOnlyNode {
                node: node.name().to_string(),
            });
        }
        let access = node.take_access(holder, !writable)?;
        Ok(Self { access })
    }

    /// The node.
    pub fn node(&self) -> &NodeRef {
        self.access.node()
    }

    /// An I/O engine for one client, with room for `depth` operations.
    pub fn open_io(&self, depth: u32) -> Result<Box<dyn AsyncIo>, BlockError> {
        self.access.open_io(depth)
    }

    /// The allocation status of the first run of bytes from `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> std::io::Result<(Allocation, u64)> {
        self.node().driver().block_status(offset, len)
    }
}

/// What `block-export-add` asks for.
pub struct ExportOptions {
    /// The export's id (`id`).
    pub id: String,
    /// The NBD name clients ask for (`name`, default the node-name).
    pub name: String,
    /// Free text shown to clients (`description`).
    pub description: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: Vec<BitmapSpec>,
}

/// One export.
pub struct Export {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) writable: bool,
    pub(crate) node_name: String,
    pub(crate) size: u64,
    /// The smallest unit of I/O (the node's alignment, at least 512).
    pub(crate) min_block: u32,
    /// qcow2's cluster size: zeroing whole clusters is cheap there.
    pub(crate) cluster_size: Option<u64>,
    pub(crate) bitmaps: Vec<Arc<dyn ExportBitmap>>,
    pub(crate) access: ExportAccess,
    shutting_down: AtomicBool,
}

impl Export {
    /// The export's id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// What `query-block-exports` shows of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub id: String,
    pub node_name: String,
    pub shutting_down: bool,
}

/// How `block-export-del` treats connected clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelMode {
    /// Refuse while any client is connected.
    Safe,
    /// Disconnect them.
    Hard,
}

/// Called with an export's id once it is gone (QEMU's
/// `BLOCK_EXPORT_DELETED`): its clients have left and its node is let go.
pub type DeletedHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The exports and their connections, shared with the server's threads.
pub(crate) struct Registry {
    state: Mutex<State>,
    on_deleted: DeletedHook,
}

#[derive(Default)]
struct State {
    exports: BTreeMap<String, Arc<Export>>,
    /// Every connected client, by connection id: its socket (to shut it
    /// down) and the export it is attached to, once it chose one.
    conns: BTreeMap<u64, (Arc<nbd::socket::Socket>, Option<String>)>,
    next_conn: u64,
}

impl Registry {
    pub(crate) fn new(on_deleted: DeletedHook) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            on_deleted,
        })
    }

    /// The export named `name` that new clients may use.
    pub(crate) fn find(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.state)
            .exports
            .values()
            .find(|e| e.name == name && !e.shutting_down.load(Ordering::Acquire))
            .cloned()
    }

    /// The names and descriptions of exports clients may use.
    pub(crate) fn list(&self) -> Vec<(String, Option<String>)> {
        lock(&self.state)
            .exports
            .values()
            .filter(|e| !e.shutting_down.load(Ordering::Acquire))
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }

    /// Attaches connection `conn` to the export named `name`, if it is
    /// still there: from now on deleting it safely is refused.
    pub(crate) fn attach(&self, conn: u64, name: &str) -> Option<Arc<Export>> {
        let mut state = lock(&self.state);
        let export = state
            .exports
            .values()
            .find(|e| e.name == name && !e.shutting_down.load(Ordering::Acquire))
            .cloned()?;
        let entry = state.conns.get_mut(&conn)?;
        entry.1 = Some(export.id.clone());
        Some(export)
    }

    /// A new connection's id.
    pub(crate) fn connect(&self, socket: Arc<nbd::socket::Socket>) -> u64 {
        let mut state = lock(&self.state);
        state.next_conn += 1;
        let id = state.next_conn;
        state.conns.insert(id, (socket, None));
        id
    }

    /// How many connections are open.
    pub(crate) fn connections(&self) -> usize {
        lock(&self.state).conns.len()
    }

    /// Connection `conn` has ended (the caller has dropped its export):
    /// an export shutting down goes with its last client.
    pub(crate) fn disconnect(&self, conn: u64) {
        let gone = {
            let mut state = lock(&self.state);
            let export = state.conns.remove(&conn).and_then(|(_, e)| e);
            export.and_then(|id| Self::reap(&mut state, &id))
        };
        self.deleted(gone);
    }

    /// Removes export `id` if it is shutting down and has no clients.
    fn reap(state: &mut State, id: &str) -> Option<Arc<Export>> {
        let going = state
            .exports
            .get(id)
            .is_some_and(|e| e.shutting_down.load(Ordering::Acquire));
        let attached = state.conns.values().any(|(_, e)| e.as_deref() == Some(id));
        if going && !attached {
            state.exports.remove(id)
        } else {
            None
        }
    }

    /// Drops a removed export (releasing its node) and says so.
    fn deleted(&self, export: Option<Arc<Export>>) {
        if let Some(export) = export {
            let id = export.id.clone();
            drop(export);
            (self.on_deleted)(&id);
        }
    }

    fn add(&self, export: Export) -> Result<(), ExportError> {
        let mut state = lock(&self.state);
        if state.exports.contains_key(&export.id) {
            return Err(ExportError::DuplicateId { id: export.id });
        }
        if state.exports.values().any(|e| e.name == export.name) {
            return Err(ExportError::DuplicateName { name: export.name });
        }
        state.exports.insert(export.id.clone(), Arc::new(export));
        Ok(())
    }

    fn del(&self, id: &str, mode: DelMode) -> Result<(), ExportError> {
        let gone = {
            let mut state = lock(&self.state);
            let Some(export) = state.exports.get(id) else {
                return Err(ExportError::NotFound { id: id.into() });
            };
            if export.shutting_down.load(Ordering::Acquire) {
                return Err(ExportError::ShuttingDown { id: id.into() });
            }
            let clients: Vec<&Arc<nbd::socket::Socket>> = state
                .conns
                .values()
                .filter(|(_, e)| e.as_deref() == Some(id))
                .map(|(s, _)| s)
                .collect();
            if mode == DelMode::Safe && !clients.is_empty() {
                return Err(ExportError::InUse { id: id.into() });
            }
            for socket in clients {
                socket.shutdown();
            }
            export.shutting_down.store(true, Ordering::Release);
            Self::reap(&mut state, id)
        };
        self.deleted(gone);
        Ok(())
    }

    /// Ends every connection and deletes every export (`nbd-server-stop`).
    fn close_all(&self) {
        let gone: Vec<Arc<Export>> = {
            let mut state = lock(&self.state);
            for (socket, _) in state.conns.values() {
                socket.shutdown();
            }
            for export in state.exports.values() {
                export.shutting_down.store(true, Ordering::Release);
            }
            let ids: Vec<String> = state.exports.keys().cloned().collect();
            ids.iter()
                .filter_map(|id| Self::reap(&mut state, id))
                .collect()
        };
        for export in gone {
            self.deleted(Some(export));
        }
    }

    fn infos(&self) -> Vec<ExportInfo> {
        lock(&self.state)
            .exports
            .values()
            .map(|e| ExportInfo {
                id: e.id.clone(),
                node_name: e.node_name.clone(),
                shutting_down: e.shutting_down.load(Ordering::Acquire),
            })
            .collect()
    }
}

/// The VMM's exports and its NBD server.
pub struct Exports {
    registry: Arc<Registry>,
    server: Mutex<Option<NbdServer>>,
}

impl Exports {
    /// No exports and no server; `on_deleted` hears of each export gone.
    pub fn new(on_deleted: DeletedHook) -> Self {
        Self {
            registry: Registry::new(on_deleted),
            server: Mutex::new(None),
        }
    }

    /// `nbd-server-start`: listens on `addr` on a thread of its own,
    /// with at most `max_connections` clients at once (0: no limit but
    /// the server's own, [`nbd::MAX_CLIENTS`]).
    pub fn start_nbd(&self, addr: NbdAddr, max_connections: u32) -> Result<(), ExportError> {
        let mut server = lock(&self.server);
        if server.is_some() {
            return Err(ExportError::ServerRunning);
        }
        *server = Some(NbdServer::start(
            addr,
            max_connections,
            self.registry.clone(),
        )?);
        Ok(())
    }

    /// `nbd-server-stop`: stops listening, disconnects every client and
    /// deletes every export.
    pub fn stop_nbd(&self) -> Result<(), ExportError> {
        let server = lock(&self.server)
            .take()
            .ok_or(ExportError::ServerNotRunning)?;
        server.stop();
        self.registry.close_all();
        Ok(())
    }

    /// `block-export-add` of `node` (a reference the export keeps).
    pub fn add(&self, options: ExportOptions, node: &NodeRef) -> Result<(), ExportError> {
        if lock(&self.server).is_none() {
            return Err(ExportError::ServerNotRunning);
        }
        if options.name.len() > nbd::proto::MAX_STRING {
            return Err(ExportError::TooLong {
                what: "name",
                value: options.name,
            });
        }
        if let Some(d) = options
            .description
            .as_ref()
            .filter(|d| d.len() > nbd::proto::MAX_STRING)
        {
            return Err(ExportError::TooLong {
                what: "description",
                value: d.clone(),
            });
        }
        {
            let state = lock(&self.registry.state);
            if state.exports.contains_key(&options.id) {
                return Err(ExportError::DuplicateId { id: options.id });
            }
            if state.exports.values().any(|e| e.name == options.name) {
                return Err(ExportError::DuplicateName { name: options.name });
            }
        }
        let holder = Holder::Export {
            id: options.id.clone(),
        };
        let access = ExportAccess::open(node, holder, options.writable)?;
        let bitmaps = claim_bitmaps(&options.bitmaps, node, options.writable)?;
        let driver = node.driver();
        let export = Export {
            node_name: node.name().to_string(),
            size: driver.size(),
            min_block: driver.io_alignment().max(512),
            cluster_size: driver
                .image_details()
                .filter(|_| driver.name() == "qcow2")
                .map(|d| d.cluster_size),
            id: options.id,
            name: options.name,
            description: options.description,
            writable: options.writable,
            bitmaps,
            access,
            shutting_down: AtomicBool::new(false),
        };
        self.registry.add(export)
    }

    /// `block-export-del`.
    pub fn del(&self, id: &str, mode: DelMode) -> Result<(), ExportError> {
        self.registry.del(id, mode)
    }

    /// `query-block-exports`.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.registry.infos()
    }

    /// How many clients are connected, for tests.
    pub fn connections(&self) -> usize {
        self.registry.connections()
    }
}

impl Drop for Exports {
    fn drop(&mut self) {
        if let Some(server) = lock(&self.server).take() {
            server.stop();
            self.registry.close_all();
        }
    }
}

#[cfg(test)]
mod tests;
