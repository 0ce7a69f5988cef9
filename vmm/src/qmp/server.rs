//! The QMP socket: a Unix socket served by one thread, `qmp`, for up to
//! [`MAX_CLIENTS`] clients at once. Sockets are non-blocking and one epoll
//! watches the listener, every client and an eventfd that other threads
//! use to hand over events and replies or ask the server to stop.
//!
//! Most commands run on this thread. After each one its reply is written
//! at once (as much as the socket takes), so a command like `quit` has its
//! answer on the wire before the VMM starts tearing things down. A command
//! that may wait ([`Commands::may_wait`]) runs on a thread of its own
//! (`qmp-cmd`); its client's further input waits until its reply is back,
//! so every client gets its replies in order, while the others go on.
//!
//! A client is dropped, without disturbing the others, when its socket
//! fails, when it lets more than [`MAX_OUTPUT`] bytes pile up unread, or
//! when it has not negotiated capabilities within [`NEGOTIATION_TIMEOUT`].
//! A client that finds [`MAX_CLIENTS`] connected takes the place of the
//! oldest one still negotiating; only if every one has negotiated is it
//! closed at once. So silent connections cannot lock the operator out.
//!
//! ```no_run
//! # use vmm::qmp::{Commands, QmpError, QmpServer};
//! # use serde_json::{json, Map, Value};
//! struct Vmm;
//! impl Commands for Vmm {
//!     fn names(&self) -> Vec<&'static str> {
//!         vec!["stop"]
//!     }
//!     fn execute(&self, _: &str, _: Map<String, Value>) -> Result<Value, QmpError> {
//!         Ok(json!({}))
//!     }
//! }
//! let server = QmpServer::bind("/run/vmm/qmp.sock", Vmm).unwrap();
//! let events = server.events();
//! let thread = server.spawn().unwrap();
//! events.emit("STOP", None);
//! // ... the VM ends:
//! events.emit("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
//! thread.stop_and_join().unwrap();
//! ```

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base::sync::lock;
use serde_json::Value;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::client::{Client, Gone};
use super::error::QmpError;
use super::event::Event;
use super::protocol::{Next, Request};
use super::Commands;

/// Most bytes of replies and events a client may leave unread before it
/// is dropped (and most bytes of events waiting for the server thread).
pub const MAX_OUTPUT: usize = 16 << 20;

/// Most clients connected at once. QMP clients are a handful of tools, so
/// this only stops a runaway one from using up the VMM's file descriptors.
/// One more evicts the oldest client still negotiating, or is closed at
/// once if every client has negotiated.
pub const MAX_CLIENTS: usize = 64;

/// How long a client may take to send `qmp_capabilities` before it is
/// closed (QEMU has no limit; an idle connection here costs a slot).
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long stopping waits for clients to take their last messages.
const FLUSH_DEADLINE: Duration = Duration::from_millis(500);

/// Most bytes read from one client before the others get their turn.
const READ_CHUNK: usize = 64 * 1024;

const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const FIRST_CLIENT: u64 = 2;

/// Why the QMP server could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    /// Something other than a socket is at the path; it is left alone.
    #[error("cannot create QMP socket '{0}': the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// A server is listening on the socket at the path.
    #[error("cannot create QMP socket '{0}': another server is listening on it")]
    InUse(PathBuf),
    /// The path could not be examined.
    #[error("cannot create QMP socket '{path}': {source}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A socket left behind by a server that is gone could not be removed.
    #[error("cannot remove stale QMP socket '{path}': {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Binding or listening failed.
    #[error("cannot listen on QMP socket '{path}': {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An epoll or eventfd call failed.
    #[error("QMP server cannot {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The `qmp` thread could not be started.
    #[error("cannot start the QMP thread: {0}")]
    Spawn(#[source] io::Error),
    /// The `qmp` thread panicked (a command, most likely).
    #[error("the QMP thread panicked")]
    Panicked,
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> QmpServerError {
    move |source| QmpServerError::Sys { what, source }
}

/// What the server thread shares with event emitters, stoppers and the
/// threads running commands that wait.
struct Shared {
    events: Mutex<PendingEvents>,
    /// Replies of commands run off the QMP thread, with their client's token.
    replies: Mutex<Vec<(u64, Vec<u8>)>>,
    stop: AtomicBool,
    /// The server thread has finished: events go nowhere now.
    closed: AtomicBool,
    wake: EventFd,
}

/// Encoded events the server thread has not picked up yet.
#[derive(Default)]
struct PendingEvents {
    queue: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Events were dropped since the queue was last emptied (logged once,
    /// not once per event).
    overflowed: bool,
}

impl Shared {
    fn wake(&self) {
        // Only fails if the counter would overflow, and then it is
        // readable anyway, which is all the server needs.
        let _ = self.wake.write(1);
    }

    fn take_events(&self) -> VecDeque<Vec<u8>> {
        // A thread that panicked while queueing left a valid queue behind.
        let mut pending = lock(&self.events);
        pending.bytes = 0;
        pending.overflowed = false;
        std::mem::take(&mut pending.queue)
    }
}

/// Sends events to QMP clients, from any thread.
#[derive(Clone)]
pub struct EventSink {
    shared: Arc<Shared>,
}

impl EventSink {
    /// A sink whose events go nowhere, for running commands without a
    /// server (the fuzz targets).
    pub(crate) fn discarding() -> Self {
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd for a discarding sink");
        Self {
            shared: Arc::new(Shared {
                events: Mutex::new(PendingEvents::default()),
                replies: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
                closed: AtomicBool::new(true),
                wake,
            }),
        }
    }

    /// Stamps `event` with the time now and queues it for every client
    /// that has negotiated capabilities when the server thread picks it
    /// up (at once unless a command is running). Events are dropped once
    /// the server has stopped, or if [`MAX_OUTPUT`] bytes of them wait.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        if self.shared.closed.load(Ordering::Acquire) {
            return;
        }
        let message = Event::new(event, data).encode();
        {
            let mut pending = lock(&self.shared.events);
            if pending.bytes + message.len() > MAX_OUTPUT {
                if !pending.overflowed {
                    pending.overflowed = true;
                    log::warn!("QMP events dropped from {event} on: too many waiting");
                }
                return;
            }
            pending.bytes += message.len();
            pending.queue.push_back(message);
        }
        self.shared.wake();
    }
}

/// Asks the QMP server to stop, from any thread (a `quit` command too).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    /// Stops the server: it sends what it owes (events emitted before this
    /// call included) for a short while, closes every client and removes
    /// its socket file. Commands not yet started are not run.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
    }
}

/// The socket file, removed when the server goes, but only if it is still
/// ours (not replaced by someone else since).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// A QMP server bound to its socket, not yet serving.
pub struct QmpServer {
    commands: Arc<dyn Commands>,
    shared: Arc<Shared>,
    epoll: Epoll,
    clients: HashMap<u64, Client>,
    /// Client tokens are never reused, so an epoll event still pending for
    /// a dropped client cannot reach a new one.
    next_token: u64,
    buf: Vec<u8>,
    max_output: usize,
    negotiation_timeout: Duration,
    // Dropped in this order: the listener closes before its file goes.
    listener: UnixListener,
    socket: SocketFile,
}

impl QmpServer {
    /// Listens on `path`, replacing a stale socket there (one nobody
    /// listens on); any other file at `path` is an error and left alone.
    pub fn bind(
        path: impl AsRef<Path>,
        commands: impl Commands + 'static,
    ) -> Result<Self, QmpServerError> {
        Self::bind_with(path, |_| commands)
    }

    /// As [`QmpServer::bind`], for commands that emit events themselves:
    /// `make` gets the server's event sink and builds them.
    pub fn bind_with<C: Commands + 'static>(
        path: impl AsRef<Path>,
        make: impl FnOnce(EventSink) -> C,
    ) -> Result<Self, QmpServerError> {
        let path = path.as_ref().to_path_buf();
        remove_stale(&path)?;
        let bind_err = |source| QmpServerError::Bind {
            path: path.clone(),
            source,
        };
        let listener = base::socket::listen_unix(&path).map_err(bind_err)?;
        let meta = fs::symlink_metadata(&path).map_err(bind_err)?;
        // From here on, dropping `socket` removes the file again.
        let socket = SocketFile {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
        };
        listener
            .set_nonblocking(true)
            .map_err(sys("make the listener non-blocking"))?;
        let shared = Arc::new(Shared {
            events: Mutex::default(),
            replies: Mutex::default(),
            stop: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(sys("create an eventfd"))?,
        });
        let epoll = Epoll::new().map_err(sys("create an epoll"))?;
        let watch = |fd, token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        watch(listener.as_raw_fd(), LISTENER).map_err(sys("watch the listener"))?;
        watch(shared.wake.as_raw_fd(), WAKE).map_err(sys("watch the eventfd"))?;
        let commands = make(EventSink {
            shared: shared.clone(),
        });
        Ok(Self {
            commands: Arc::new(commands),
            shared,
            epoll,
            clients: HashMap::new(),
            next_token: FIRST_CLIENT,
            buf: vec![0; READ_CHUNK],
            max_output: MAX_OUTPUT,
            negotiation_timeout: NEGOTIATION_TIMEOUT,
            listener,
            socket,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.socket.path
    }

    /// A sink for events, usable from any thread, before or after spawn.
    pub fn events(&self) -> EventSink {
        EventSink {
            shared: self.shared.clone(),
        }
    }

    /// A handle that stops the server, for whoever decides the VM ends.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves clients on a new thread named `qmp`.
    pub fn spawn(self) -> Result<QmpThread, QmpServerError> {
        let shutdown = self.shutdown_handle();
        let thread = base::spawn(
            base::ThreadKind::Qmp,
            "qmp".into(),
            move || self.run(),
            || Err(QmpServerError::Panicked),
        )
        .map_err(QmpServerError::Spawn)?;
        Ok(QmpThread { thread, shutdown })
    }

    /// Serves clients on this thread until stopped through a
    /// [`ShutdownHandle`]; the socket file is removed when it returns.
    pub fn run(mut self) -> Result<(), QmpServerError> {
        self.serve()
    }

    fn serve(&mut self) -> Result<(), QmpServerError> {
        let mut ready = vec![EpollEvent::default(); 32];
        while !self.stopping() {
            let n = match self.epoll.wait(self.next_expiry_ms(), &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(sys("wait in epoll")(e)),
            };
            for event in &ready[..n] {
                match event.data() {
                    LISTENER => self.accept(),
                    WAKE => {
                        // Resets the counter; the queue says what to do.
                        let _ = self.shared.wake.read();
                        // Events first: a command's events (STOP) go out
                        // before its reply, as QEMU sends them.
                        self.deliver_events();
                        self.deliver_replies();
                    }
                    token => self.client_ready(token, event.event_set()),
                }
            }
            self.expire_negotiating();
        }
        self.finish();
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of file descriptors, typically: the connection
                    // waits in the backlog and epoll reports it again.
                    log::warn!("QMP: cannot accept a client: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                let negotiating = self
                    .clients
                    .iter()
                    .filter(|(_, c)| !c.session.accepts_events())
                    .min_by_key(|(_, c)| c.connected)
                    .map(|(token, _)| *token);
                // Debug only: whoever keeps connecting must not flood the log.
                match negotiating {
                    Some(oldest) => {
                        log::debug!("QMP client {oldest} dropped: {MAX_CLIENTS} clients connected and it never negotiated");
                        self.drop_client(oldest);
                    }
                    None => {
                        log::debug!(
                            "QMP: {MAX_CLIENTS} clients already connected, one more refused"
                        );
                        continue;
                    }
                }
            }
            if let Err(e) = self.add_client(stream) {
                log::debug!("QMP: cannot set up a new client: {e}");
            }
        }
    }

    fn add_client(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let token = self.next_token;
        self.next_token += 1;
        let mut client = Client::new(stream, self.max_output);
        if let Err(Gone::Io(e)) = client.flush() {
            return Err(e);
        }
        client.interest = client.wanted();
        self.epoll.ctl(
            ControlOperation::Add,
            client.stream.as_raw_fd(),
            EpollEvent::new(client.interest, token),
        )?;
        self.clients.insert(token, client);
        Ok(())
    }

    /// Milliseconds until the next client still negotiating runs out of
    /// time (for epoll's wait), or -1 if none is.
    fn next_expiry_ms(&self) -> i32 {
        let now = Instant::now();
        self.clients
            .values()
            .filter(|c| !c.session.accepts_events())
            .map(|c| (c.connected + self.negotiation_timeout).saturating_duration_since(now))
            .min()
            .map_or(-1, |left| {
                // Rounded up, so the wake-up is never a moment too early.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            })
    }

    /// Closes clients that have not negotiated within the time limit.
    fn expire_negotiating(&mut self) {
        let limit = self.negotiation_timeout;
        let expired: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| !c.session.accepts_events() && c.connected.elapsed() >= limit)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            log::debug!("QMP client {token} dropped: no capabilities negotiation within {limit:?}");
            self.drop_client(token);
        }
    }

    fn client_ready(&mut self, token: u64, events: EventSet) {
        if self.clients.get(&token).is_some_and(|c| c.busy)
            && events.intersects(EventSet::HANG_UP | EventSet::ERROR)
        {
            // Gone while its command runs elsewhere: nobody will read the
            // reply, and epoll would report the hang-up again and again.
            log::debug!("QMP client {token} left while its command runs");
            self.drop_client(token);
            return;
        }
        // An error or hang-up shows up as a failed or empty read, or a
        // failed write, below.
        let readable = events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
        let result = if readable {
            self.read_client(token)
        } else {
            Ok(())
        };
        // On a hang-up too: the write fails then, and the client goes,
        // instead of epoll reporting the hang-up again and again.
        let writable = events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR);
        let result = result.and_then(|()| match self.clients.get_mut(&token) {
            Some(client) if writable => client.flush(),
            _ => Ok(()),
        });
        self.settle(token, result);
    }

    /// Reads one chunk from a client and runs the commands it completes.
    fn read_client(&mut self, token: u64) -> Result<(), Gone> {
        let Some(client) = self.clients.get_mut(&token) else {
            return Ok(());
        };
        if client.read_closed || client.busy {
            return Ok(());
        }
        let n = match client.read(&mut self.buf)? {
            None => return Ok(()),
            Some(0) => {
                if client.session.is_mid_value() {
                    log::debug!("QMP client {token} left in the middle of a request");
                }
                client.read_closed = true;
                return Ok(());
            }
            Some(n) => n,
        };
        client.session.push_input(&self.buf[..n]);
        self.run_input(token)
    }

    /// Runs the commands a client's input holds, writing each reply
    /// before the next command runs, until one goes to a thread of its own.
    fn run_input(&mut self, token: u64) -> Result<(), Gone> {
        let Some(client) = self.clients.get_mut(&token) else {
            return Ok(());
        };
        // Once stopping, commands not yet started are left alone.
        while !client.busy && !self.shared.stop.load(Ordering::Acquire) {
            let reply = match client.session.next(self.commands.as_ref()) {
                None => break,
                Some(Next::Reply(reply)) => reply,
                Some(Next::Run(request)) if self.commands.may_wait(&request.name) => {
                    match spawn_command(token, request, &self.commands, &self.shared) {
                        Ok(()) => {
                            client.busy = true;
                            break;
                        }
                        Err(reply) => reply,
                    }
                }
                Some(Next::Run(request)) => request.run(self.commands.as_ref()),
            };
            client.queue(&reply)?;
            client.flush()?;
        }
        Ok(())
    }

    /// Hands the replies of commands that ran elsewhere to their clients,
    /// and runs what those clients sent meanwhile.
    fn deliver_replies(&mut self) {
        let replies = std::mem::take(&mut *lock(&self.shared.replies));
        for (token, reply) in replies {
            let Some(client) = self.clients.get_mut(&token) else {
                continue;
            };
            client.busy = false;
            let result = client
                .queue(&reply)
                .and_then(|()| client.flush())
                .and_then(|()| self.run_input(token));
            self.settle(token, result);
        }
    }

    /// Drops a client that failed or is done; otherwise makes epoll watch
    /// for what it needs now.
    fn settle(&mut self, token: u64, result: Result<(), Gone>) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let gone = match result {
            Err(Gone::TooSlow) => {
                log::debug!(
                    "QMP client {token} dropped: more than {} bytes unread",
                    self.max_output
                );
                true
            }
            Err(Gone::Io(e)) => {
                log::debug!("QMP client {token} dropped: {e}");
                true
            }
            Ok(()) => client.is_done(),
        };
        if !gone {
            let wanted = client.wanted();
            if wanted == client.interest {
                return;
            }
            let changed = self.epoll.ctl(
                ControlOperation::Modify,
                client.stream.as_raw_fd(),
                EpollEvent::new(wanted, token),
            );
            match changed {
                Ok(()) => {
                    client.interest = wanted;
                    return;
                }
                Err(e) => log::warn!("QMP client {token} dropped: epoll: {e}"),
            }
        }
        self.drop_client(token);
    }

    fn drop_client(&mut self, token: u64) {
        if let Some(client) = self.clients.remove(&token) {
            // Closing the socket takes it out of epoll too; this is only to
            // be explicit, so a failure does not matter.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                client.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Hands queued events to every client that negotiated.
    fn deliver_events(&mut self) {
        let events = self.shared.take_events();
        if events.is_empty() {
            return;
        }
        let tokens: Vec<u64> = self.clients.keys().copied().collect();
        for token in tokens {
            let client = self.clients.get_mut(&token).expect("listed above");
            if !client.session.accepts_events() {
                continue;
            }
            // Written one by one, so the bound counts only what the
            // socket would not take.
            let result = events.iter().try_for_each(|e| {
                client.queue(e)?;
                client.flush()
            });
            self.settle(token, result);
        }
    }

    /// The end: picks up the last events, gives clients a short while to
    /// take what they are owed, then closes them all.
    fn finish(&mut self) {
        for fd in [self.listener.as_raw_fd(), self.shared.wake.as_raw_fd()] {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.deliver_events();
        let tokens: Vec<u64> = self.clients.keys().copied().collect();
        for token in tokens {
            let client = self.clients.get_mut(&token).expect("listed above");
            // No more input is read: only output is waited for now.
            client.read_closed = true;
            self.settle(token, Ok(()));
        }
        let deadline = Instant::now() + FLUSH_DEADLINE;
        let mut ready = vec![EpollEvent::default(); 32];
        while !self.clients.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            let n = match self.epoll.wait(ms, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            for event in &ready[..n] {
                let token = event.data();
                let result = match self.clients.get_mut(&token) {
                    Some(client) => client.flush(),
                    None => continue,
                };
                self.settle(token, result);
            }
        }
        if !self.clients.is_empty() {
            log::debug!(
                "QMP: {} clients closed with output unread",
                self.clients.len()
            );
        }
        self.clients.clear();
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        // However the server ends (a panicking command included), events
        // stop piling up for it.
        self.shared.closed.store(true, Ordering::Release);
    }
}

/// Queues the reply to `request` for client `token` and wakes the server,
/// unless it has stopped.
fn post_reply(shared: &Shared, token: u64, request: &Request, result: Result<Value, QmpError>) {
    if shared.closed.load(Ordering::Acquire) {
        return;
    }
    let reply = request.reply(result);
    lock(&shared.replies).push((token, reply));
    shared.wake();
}

/// Runs `request` on a new thread, `qmp-cmd`, whose reply goes to client
/// `token` through the server's wake-up; if no thread starts, the reply
/// saying so.
fn spawn_command(
    token: u64,
    request: Request,
    commands: &Arc<dyn Commands>,
    shared: &Arc<Shared>,
) -> Result<(), Vec<u8>> {
    let (commands, shared) = (commands.clone(), shared.clone());
    let request = Arc::new(request);
    let (failed_request, failed_shared) = (request.clone(), shared.clone());
    let refused_request = request.clone();
    // The QMP thread's filter: these are the commands it ran itself
    // before they moved off it.
    let spawned = base::spawn(
        base::ThreadKind::Qmp,
        "qmp-cmd".into(),
        move || {
            let result = commands.execute(&request.name, request.args.clone());
            post_reply(&shared, token, &request, result);
        },
        move || {
            let result = Err(QmpError::generic(format!(
                "The command {} failed: its thread panicked",
                failed_request.name
            )));
            post_reply(&failed_shared, token, &failed_request, result);
        },
    );
    spawned.map(drop).map_err(|e| {
        log::warn!("QMP: cannot start a thread for a command: {e}");
        // Only built on this rare path, not for every command.
        refused_request.reply(Err(QmpError::generic(format!(
            "The command {} cannot run: no thread could be started for it",
            refused_request.name
        ))))
    })
}

/// Removes a socket at `path` that nobody listens on any more.
fn remove_stale(path: &Path) -> Result<(), QmpServerError> {
    use base::socket::StaleError;
    base::socket::remove_stale(path).map_err(|e| match e {
        StaleError::NotASocket => QmpServerError::NotASocket(path.to_path_buf()),
        StaleError::InUse => QmpServerError::InUse(path.to_path_buf()),
        StaleError::Probe(source) => QmpServerError::Probe {
            path: path.to_path_buf(),
            source,
        },
        StaleError::Remove(source) => QmpServerError::RemoveStale {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// The running `qmp` thread.
pub struct QmpThread {
    thread: JoinHandle<Result<(), QmpServerError>>,
    shutdown: ShutdownHandle,
}

impl QmpThread {
    /// A handle that stops the server without waiting for it.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Stops the server (see [`ShutdownHandle::stop`]) and waits for the
    /// thread to end: about [`FLUSH_DEADLINE`] at most, unless a command
    /// is still running.
    pub fn stop_and_join(self) -> Result<(), QmpServerError> {
        self.shutdown.stop();
        self.thread.join().map_err(|_| QmpServerError::Panicked)?
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::Shutdown;
    use std::sync::OnceLock;

    use serde_json::{json, Map};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::qmp::QmpError;

    /// `echo` returns its arguments; `quit` stops the server, as the VMM's
    /// would end the VM; `wait` (one that may wait) returns once the gate
    /// opens.
    #[derive(Default)]
    struct Fake {
        quit: Arc<OnceLock<ShutdownHandle>>,
        gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Commands for Fake {
        fn names(&self) -> Vec<&'static str> {
            vec!["echo", "quit", "wait"]
        }

        fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
            if name == "quit" {
                self.quit.get().expect("handle set").stop();
            }
            if name == "wait" {
                let (open, changed) = &*self.gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = changed.wait(open).unwrap();
                }
            }
            Ok(Value::Object(args))
        }

        fn may_wait(&self, name: &str) -> bool {
            name == "wait"
        }
    }

    fn temp_dir() -> TempDir {
        TempDir::new_with_prefix(std::env::temp_dir().join("vmm-qmp-")).unwrap()
    }

    struct TestClient {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl TestClient {
        /// Connects and checks the greeting.
        fn connect(path: &Path) -> Self {
            let mut c = Self::connect_quietly(path);
            assert!(c.recv().get("QMP").is_some());
            c
        }

        fn connect_quietly(path: &Path) -> Self {
            let stream = UnixStream::connect(path).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Self {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            }
        }

        fn send(&mut self, text: &str) {
            self.writer.write_all(text.as_bytes()).unwrap();
        }

        fn recv(&mut self) -> Value {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            assert!(line.ends_with("\r\n"), "{line:?}");
            serde_json::from_str(&line).unwrap()
        }

        fn cmd(&mut self, text: &str) -> Value {
            self.send(text);
            self.recv()
        }

        fn negotiate(&mut self) {
            let reply = self.cmd(r#"{"execute": "qmp_capabilities"}"#);
            assert_eq!(reply, json!({"return": {}}));
        }

        fn assert_eof(&mut self) {
            let mut rest = Vec::new();
            self.reader.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        }
    }

    fn echo(id: u64) -> String {
        json!({"execute": "echo", "arguments": {"n": id}, "id": id}).to_string()
    }

    fn echoed(id: u64) -> Value {
        json!({"return": {"n": id}, "id": id})
    }

    /// A server on a socket in a new directory, and that directory.
    fn start() -> (QmpThread, EventSink, PathBuf, TempDir) {
        let dir = temp_dir();
        let path = dir.as_path().join("qmp.sock");
        let fake = Fake::default();
        let quit = fake.quit.clone();
        let server = QmpServer::bind(&path, fake).unwrap();
        let _ = quit.set(server.shutdown_handle());
        let events = server.events();
        (server.spawn().unwrap(), events, path, dir)
    }

    #[test]
    fn serves_two_clients_at_once() {
        let (thread, _, path, _dir) = start();
        let mut a = TestClient::connect(&path);
        let mut b = TestClient::connect(&path);
        a.negotiate();
        let expecting = "Expecting capabilities negotiation with 'qmp_capabilities'";
        assert_eq!(b.cmd(&echo(1))["error"]["desc"], expecting);
        b.negotiate();
        for i in 0..10 {
            assert_eq!(a.cmd(&echo(i)), echoed(i));
            assert_eq!(b.cmd(&echo(100 + i)), echoed(100 + i));
        }
        // Both send before either reads.
        a.send(&echo(1));
        b.send(&format!("{}{}", echo(2), echo(3)));
        assert_eq!(b.recv(), echoed(2));
        assert_eq!(a.recv(), echoed(1));
        assert_eq!(b.recv(), echoed(3));
        thread.stop_and_join().unwrap();
        a.assert_eof();
        b.assert_eof();
        assert!(!path.exists());
    }

    #[test]
    fn a_client_leaving_mid_command_disturbs_no_one() {
        let (thread, _, path, _dir) = start();
        let mut steady = TestClient::connect(&path);
        steady.negotiate();

        let mut leaver = TestClient::connect(&path);
        leaver.negotiate();
        leaver.send(r#"{"execute": "echo", "argu"#);
        drop(leaver);
        assert_eq!(steady.cmd(&echo(1)), echoed(1));

        // Half a command, then it shuts its side and waits: it gets nothing
        // more and the server closes it.
        let mut half = TestClient::connect(&path);
        half.send(r#"{"execute": "qmp_capabilities""#);
        half.writer.shutdown(Shutdown::Write).unwrap();
        half.assert_eof();

        // A client that never reads its greeting and goes away.
        drop(TestClient::connect_quietly(&path));

        for i in 2..5 {
            assert_eq!(steady.cmd(&echo(i)), echoed(i));
        }
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn a_command_then_shutdown_still_gets_its_reply() {
        let (thread, _, path, _dir) = start();
        let mut c = TestClient::connect(&path);
        c.send(&format!(r#"{{"execute": "qmp_capabilities"}}{}"#, echo(7)));
        c.writer.shutdown(Shutdown::Write).unwrap();
        assert_eq!(c.recv(), json!({"return": {}}));
        assert_eq!(c.recv(), echoed(7));
        c.assert_eof();
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn events_from_another_thread_reach_negotiated_clients() {
        let (thread, events, path, _dir) = start();
        let mut listening = TestClient::connect(&path);
        listening.negotiate();
        let mut negotiating = TestClient::connect(&path);

        let emitter = events.clone();
        std::thread::spawn(move || {
            emitter.emit(
                "JOB_STATUS_CHANGE",
                Some(json!({"id": "job0", "status": "running"})),
            );
            emitter.emit("STOP", None);
        })
        .join()
        .unwrap();

        let e = listening.recv();
        assert_eq!(e["event"], "JOB_STATUS_CHANGE");
        assert_eq!(e["data"], json!({"id": "job0", "status": "running"}));
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        let e = listening.recv();
        assert_eq!(e["event"], "STOP");
        assert!(e.get("data").is_none());

        // The client still negotiating saw nothing: its next message is
        // the reply to its next command.
        negotiating.negotiate();
        assert_eq!(negotiating.cmd(&echo(1)), echoed(1));
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn stopping_flushes_the_last_event_and_removes_the_socket() {
        let (thread, events, path, _dir) = start();
        let mut c = TestClient::connect(&path);
        c.negotiate();
        events.emit("SHUTDOWN", Some(json!({"guest": true})));
        thread.stop_and_join().unwrap();
        let e = c.recv();
        assert_eq!(e["event"], "SHUTDOWN");
        assert_eq!(e["data"], json!({"guest": true}));
        c.assert_eof();
        assert!(!path.exists());
        // Emitting after the end is harmless.
        events.emit("STOP", None);
    }

    #[test]
    fn quit_is_answered_and_what_follows_is_not_run() {
        let (thread, _, path, _dir) = start();
        let mut c = TestClient::connect(&path);
        c.negotiate();
        c.send(&format!(r#"{{"execute": "quit", "id": 1}}{}"#, echo(2)));
        assert_eq!(c.recv(), json!({"return": {}, "id": 1}));
        c.assert_eof();
        thread.stop_and_join().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_slow_reader_is_dropped() {
        let dir = temp_dir();
        let path = dir.as_path().join("qmp.sock");
        let mut server = QmpServer::bind(&path, Fake::default()).unwrap();
        server.max_output = 64 * 1024;
        let events = server.events();
        let thread = server.spawn().unwrap();
        let mut slow = TestClient::connect(&path);
        slow.negotiate();
        let mut reader = TestClient::connect(&path);
        reader.negotiate();

        // Far more than the socket buffers and the bound together.
        let data = json!({"pad": "x".repeat(8 * 1024)});
        let (rounds, batch) = (100, 4);
        for _ in 0..rounds {
            for _ in 0..batch {
                events.emit("BIG", Some(data.clone()));
            }
            for _ in 0..batch {
                assert_eq!(reader.recv()["event"], "BIG");
            }
        }
        // The slow one got what its socket held, then was closed.
        let mut got = String::new();
        slow.reader.read_to_string(&mut got).unwrap();
        let seen = got.matches("\"BIG\"").count();
        assert!(seen < rounds * batch, "{seen}");
        assert_eq!(reader.cmd(&echo(1)), echoed(1));
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn silent_clients_cannot_lock_out_a_new_one() {
        let (thread, _, path, _dir) = start();
        // They never read their greeting nor send anything.
        let silent: Vec<TestClient> = (0..100)
            .map(|_| TestClient::connect_quietly(&path))
            .collect();
        let started = Instant::now();
        let mut c = TestClient::connect(&path);
        c.negotiate();
        assert_eq!(c.cmd(&echo(1)), echoed(1));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "took {took:?}");
        drop(silent);
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn negotiated_clients_are_never_evicted() {
        let (thread, _, path, _dir) = start();
        let mut clients: Vec<TestClient> = (0..MAX_CLIENTS)
            .map(|_| {
                let mut c = TestClient::connect(&path);
                c.negotiate();
                c
            })
            .collect();
        let mut extra = TestClient::connect_quietly(&path);
        extra.assert_eof();
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.cmd(&echo(i as u64)), echoed(i as u64));
        }
        drop(clients);
        // Room again once they are gone (the server notices in its own time).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = TestClient::connect_quietly(&path);
            let mut line = String::new();
            c.reader.read_line(&mut line).unwrap();
            if !line.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn a_client_that_does_not_negotiate_in_time_is_closed() {
        let dir = temp_dir();
        let path = dir.as_path().join("qmp.sock");
        let mut server = QmpServer::bind(&path, Fake::default()).unwrap();
        server.negotiation_timeout = Duration::from_millis(300);
        let thread = server.spawn().unwrap();
        let mut negotiated = TestClient::connect(&path);
        negotiated.negotiate();
        let started = Instant::now();
        let mut silent = TestClient::connect(&path);
        silent.assert_eof();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "closed after {took:?}");
        assert!(took < Duration::from_secs(5), "closed after {took:?}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(negotiated.cmd(&echo(1)), echoed(1));
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn a_waiting_command_stalls_neither_other_clients_nor_events() {
        let dir = temp_dir();
        let path = dir.as_path().join("qmp.sock");
        let fake = Fake::default();
        let gate = fake.gate.clone();
        let server = QmpServer::bind(&path, fake).unwrap();
        let events = server.events();
        let thread = server.spawn().unwrap();
        let mut waiter = TestClient::connect(&path);
        waiter.negotiate();
        let mut other = TestClient::connect(&path);
        other.negotiate();

        // A wait, then an echo on the same connection: the echo waits too.
        waiter.send(&format!(r#"{{"execute": "wait", "id": "w"}}{}"#, echo(2)));
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        for i in 10..20 {
            assert_eq!(other.cmd(&echo(i)), echoed(i));
        }
        events.emit("STOP", None);
        assert_eq!(other.recv()["event"], "STOP");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The waiter got the event, and no reply yet.
        assert_eq!(waiter.recv()["event"], "STOP");

        let (open, changed) = &*gate;
        *open.lock().unwrap() = true;
        changed.notify_all();
        assert_eq!(waiter.recv(), json!({"return": {}, "id": "w"}));
        assert_eq!(waiter.recv(), echoed(2));
        thread.stop_and_join().unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = temp_dir();
        let path = dir.as_path().join("qmp.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let thread = QmpServer::bind(&path, Fake::default())
            .unwrap()
            .spawn()
            .unwrap();
        let mut c = TestClient::connect(&path);
        c.negotiate();
        thread.stop_and_join().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_live_socket_is_left_to_its_server() {
        let dir = temp_dir();
        let path = dir.as_path().join("qmp.sock");
        let _live = UnixListener::bind(&path).unwrap();
        let err = QmpServer::bind(&path, Fake::default()).err().unwrap();
        assert!(matches!(err, QmpServerError::InUse(_)), "{err}");
        assert!(path.exists());
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_refused() {
        let dir = temp_dir();
        let file = dir.as_path().join("notes.txt");
        fs::write(&file, "keep me").unwrap();
        let err = QmpServer::bind(&file, Fake::default()).err().unwrap();
        assert!(matches!(err, QmpServerError::NotASocket(_)), "{err}");
        assert!(err.to_string().contains("notes.txt"));
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");

        let err = QmpServer::bind(dir.as_path(), Fake::default())
            .err()
            .unwrap();
        assert!(matches!(err, QmpServerError::NotASocket(_)), "{err}");

        let missing = dir.as_path().join("no/such/dir/qmp.sock");
        let err = QmpServer::bind(&missing, Fake::default()).err().unwrap();
        assert!(matches!(err, QmpServerError::Bind { .. }), "{err}");
    }

    #[test]
    fn a_server_never_run_removes_its_socket() {
        let dir = temp_dir();
        let path = dir.as_path().join("qmp.sock");
        let server = QmpServer::bind(&path, Fake::default()).unwrap();
        assert_eq!(server.path(), path);
        assert!(path.exists());
        drop(server);
        assert!(!path.exists());
    }
}
