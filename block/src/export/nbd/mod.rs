//! The NBD server: a listening socket on a thread of its own, one thread
//! per client, QEMU's `nbd-server-start` addresses.
//!
//! - `proto.rs`: the protocol's numbers and byte layouts, the errno map.
//! - `socket.rs`: a connected socket with the calls our seccomp list has.
//! - `handshake.rs`: fixed newstyle negotiation up to an export.
//! - `transmission.rs`: requests checked in one place, served on the
//!   client's own engine, replied to as they complete.
//!
//! Each thread is an NBD-kind thread (its own seccomp list), never the
//! QMP thread: a client that stalls or sends garbage holds up only its
//! own thread, which a handshake deadline, a hard delete or the server's
//! stop ends.

pub mod handshake;
pub mod proto;
pub mod socket;
pub mod transmission;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use base::ThreadKind;
use vmm_sys_util::eventfd::EventFd;

use super::{Export, ExportError, Registry};
use handshake::Lookup;
use socket::{poll, Socket, Timed};

/// Clients at once when `max-connections` is 0 (QEMU: no limit).
pub const MAX_CLIENTS: usize = 256;
/// How long a client may take over its handshake (QEMU's default
/// `handshake-max-seconds`).
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Where the server listens: QEMU's legacy `SocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// `{"type": "unix", "data": {"path": ...}}`.
    Unix(PathBuf),
    /// `{"type": "inet", "data": {"host": ..., "port": ...}}`.
    Inet { host: String, port: String },
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Unix(p) => write!(f, "{}", p.display()),
            NbdAddr::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A running server.
pub struct NbdServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    unix: Option<PathBuf>,
}

/// The registry as one connection's handshake sees it.
struct Conn<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Lookup for Conn<'_> {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.registry.find(name)
    }

    fn list(&self) -> Vec<(String, Option<String>)> {
        self.registry.list()
    }

    fn attach(&self, name: &str) -> Option<Arc<Export>> {
        self.registry.attach(self.id, name)
    }
}

fn bind(addr: &NbdAddr) -> Result<OwnedFd, ExportError> {
    let bind_err = |source| ExportError::Bind {
        addr: addr.to_string(),
        source,
    };
    match addr {
        NbdAddr::Unix(path) => {
            // A stale socket file from an earlier run is replaced, as
            // QEMU does; unlike QEMU, not one something listens on (our
            // own QMP socket, another server): that is refused. Anything
            // else at the path makes the bind below fail.
            if let Err(e @ base::socket::StaleError::InUse) = base::socket::remove_stale(path) {
                return Err(bind_err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    e.to_string(),
                )));
            }
            Ok(base::socket::listen_unix(path).map_err(bind_err)?.into())
        }
        NbdAddr::Inet { host, port } => {
            let address = |reason: &str| ExportError::Address {
                host: host.clone(),
                port: port.clone(),
                reason: reason.into(),
            };
            let port: u16 = port
                .parse()
                .map_err(|_| address("the port is not a number from 0 to 65535"))?;
            // Names would need a resolver on the QMP thread; addresses do not.
            let ip: IpAddr = match host.as_str() {
                "" | "0.0.0.0" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
                h => h
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| address("the host is not an IP address or 'localhost'"))?,
            };
            Ok(TcpListener::bind(SocketAddr::new(ip, port))
                .map_err(bind_err)?
                .into())
        }
    }
}

impl NbdServer {
    /// Binds `addr` and starts the listener thread.
    pub(crate) fn start(
        addr: NbdAddr,
        max_connections: u32,
        registry: Arc<Registry>,
    ) -> Result<Self, ExportError> {
        let listener = bind(&addr)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ExportError::Thread)?;
        let wake = stop.try_clone().map_err(ExportError::Thread)?;
        let limit = match max_connections {
            0 => MAX_CLIENTS,
            n => (n as usize).min(MAX_CLIENTS),
        };
        let thread = base::spawn(
            ThreadKind::Nbd,
            "nbd-server".into(),
            move || listen(listener, wake, limit, registry),
            || (),
        )
        .map_err(ExportError::Thread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
            unix: match addr {
                NbdAddr::Unix(p) => Some(p),
                NbdAddr::Inet { .. } => None,
            },
        })
    }

    /// Stops listening (clients are the registry's to end).
    pub(crate) fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(path) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The listener thread: accepts until told to stop; each client gets a
/// thread of its own.
fn listen(listener: OwnedFd, stop: EventFd, limit: usize, registry: Arc<Registry>) {
    loop {
        let ready = match poll(
            &[
                (stop.as_raw_fd(), libc::POLLIN),
                (listener.as_raw_fd(), libc::POLLIN),
            ],
            None,
        ) {
            Ok(r) => r,
            Err(e) => {
                log::error!("NBD server: {e}");
                return;
            }
        };
        if ready[0] != 0 {
            return;
        }
        if ready[1] == 0 {
            continue;
        }
        // SAFETY: accept4 on our listening socket; no address wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            // A client that went before we took it, or out of descriptors:
            // the next one may fare better.
            log::debug!("NBD server: accept: {}", std::io::Error::last_os_error());
            continue;
        }
        // SAFETY: accept4 returned a new descriptor we now own.
        let socket = Arc::new(Socket::new(unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }));
        if registry.connections() >= limit {
            log::debug!("NBD server: {limit} clients connected; refusing another");
            continue;
        }
        socket.no_delay();
        let id = registry.connect(socket.clone());
        let reg = registry.clone();
        let started = base::spawn(
            ThreadKind::Nbd,
            "nbd-client".into(),
            move || client(reg, id, socket),
            || (),
        );
        if let Err(e) = started {
            log::warn!("NBD server: cannot start a client thread: {e}");
            registry.disconnect(id);
        }
    }
}

/// One client's thread: handshake, then transmission.
fn client(registry: Arc<Registry>, id: u64, socket: Arc<Socket>) {
    let conn = Conn {
        registry: &registry,
        id,
    };
    let negotiated = handshake::negotiate(&mut Timed::new(&socket, HANDSHAKE_LIMIT), &conn);
    match negotiated {
        Ok(n) => {
            transmission::serve(&socket, &n);
            drop(n);
        }
        Err(e) => log::debug!("NBD client: {e}"),
    }
    socket.shutdown();
    registry.disconnect(id);
}
