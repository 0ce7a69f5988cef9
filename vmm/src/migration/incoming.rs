//! The destination side: a VM built like the source's but not started,
//! whose vCPUs wait parked while a stream (or a state file) fills in its
//! RAM, devices and vCPUs; only a complete, valid state starts it.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use base::state::StateReader;
use base::sync::lock;
use block::migration::{BlockSink, Chunk};
use vm_memory::GuestMemoryMmap;

use super::control::{Controller, Status};
use super::cpu::VcpuState;
use super::format::{self, Kind, Reply};
use super::machine::MachineState;
use super::ram;
use super::shape::Shape;
use super::transport::{Conn, Listener};
use super::{Machine, MigrationError, MigrationUri};
use crate::runstate::Phase;
use crate::shared::VmExit;

/// How long the source may stay silent mid-stream.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Takes a stream's frames after `Config` and applies them, in order.
struct Loader<'a> {
    m: &'a Machine,
    vcpus: Vec<bool>,
    devices: bool,
    machine: bool,
    /// RAM frames are refused in a state file (its RAM is the image).
    ram_frames: bool,
    /// Where block migration's disk chunks go, when the source copies disks.
    disks: Option<BlockSink>,
}

impl<'a> Loader<'a> {
    fn new(m: &'a Machine, ram_frames: bool) -> Self {
        Self {
            m,
            vcpus: vec![false; m.vcpus.len()],
            devices: false,
            machine: false,
            ram_frames,
            disks: None,
        }
    }

    /// The source copies the disks its Config frame marks: this VM's
    /// images are its own (not the source's), so they are taken now and
    /// written as the chunks come.
    fn expect_disks(&mut self, shape: &Shape) -> Result<(), MigrationError> {
        let copied: Vec<(String, String, u64)> = shape
            .disks
            .iter()
            .zip(&self.m.disks)
            .filter(|(theirs, _)| theirs.copied)
            .map(|(theirs, ours)| {
                (
                    ours.id.clone(),
                    ours.node.with(|n| n.name().to_string()),
                    theirs.size,
                )
            })
            .collect();
        if copied.is_empty() {
            return Ok(());
        }
        self.m
            .graph
            .activate_images()
            .map_err(|e| MigrationError::Device(e.to_string()))?;
        let sink = BlockSink::open(&self.m.graph, &copied, block::Holder::Migration)
            .map_err(|e| MigrationError::Device(e.to_string()))?;
        self.disks = Some(sink);
        Ok(())
    }

    /// Reads and applies frames from `r` up to and including `End`.
    fn load(&mut self, r: &mut impl Read) -> Result<(), MigrationError> {
        let mut payload = Vec::new();
        loop {
            let kind = format::read_frame(r, &mut payload)?;
            if self.frame(kind, &payload)? {
                return Ok(());
            }
        }
    }

    /// Applies one frame; true at `End`, once everything has come.
    fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<bool, MigrationError> {
        let invalid = |what: &'static str, reason: &str| {
            MigrationError::State(base::state::StateError::invalid(what, reason))
        };
        match kind {
            Kind::Config => return Err(invalid("Config frame", "it came twice")),
            Kind::Ram if self.ram_frames => {
                ram::receive_pages(&self.m.mem, payload)?;
            }
            Kind::Ram => return Err(invalid("Ram frame", "a state file keeps RAM in its image")),
            Kind::Disk => {
                let Some(sink) = self.disks.as_mut() else {
                    return Err(invalid(
                        "Disk frame",
                        "this stream copies no disk (block migration was not announced)",
                    ));
                };
                let mut r = StateReader::new(payload);
                let chunk = Chunk {
                    disk: r.u32("disk chunk's disk")? as usize,
                    offset: r.u64("disk chunk's offset")?,
                    len: r.u32("disk chunk's length")?,
                    zero: r.bool("disk chunk's zero flag")?,
                };
                let data = if chunk.zero {
                    &[][..]
                } else {
                    r.raw("disk chunk's data", chunk.len as usize)?
                };
                r.finish("a disk chunk")?;
                sink.write(&chunk, data)
                    .map_err(|e| MigrationError::Device(e.to_string()))?;
            }
            Kind::Pass => {}
            Kind::Devices => {
                if self.devices {
                    return Err(invalid("Devices frame", "it came twice"));
                }
                let mut r = StateReader::new(payload);
                lock(&self.m.serial).restore(&mut r)?;
                self.m
                    .run
                    .restore_devices(&mut r)
                    .map_err(MigrationError::Device)?;
                r.finish("the devices' state")?;
                self.devices = true;
            }
            Kind::Machine => {
                if self.machine {
                    return Err(invalid("Machine frame", "it came twice"));
                }
                let mut r = StateReader::new(payload);
                let state = MachineState::decode(&mut r)?;
                r.finish("the machine state")?;
                state.restore(&self.m.vm, self.m.pit)?;
                self.machine = true;
            }
            Kind::Vcpu => {
                let mut r = StateReader::new(payload);
                let index = r.u32("vCPU index")? as usize;
                let state = VcpuState::decode(&mut r)?;
                r.finish("a vCPU's state")?;
                match self.vcpus.get_mut(index) {
                    None => return Err(invalid("vCPU index", "there is no such vCPU here")),
                    Some(true) => return Err(invalid("Vcpu frame", "a vCPU came twice")),
                    Some(done) => *done = true,
                }
                state.restore(&lock(&self.m.vcpus[index]))?;
            }
            Kind::End => {
                let missing = if !self.devices {
                    Some("the devices' state")
                } else if !self.machine {
                    Some("the machine state")
                } else if self.vcpus.iter().any(|d| !d) {
                    Some("a vCPU's state")
                } else {
                    None
                };
                if let Some(what) = missing {
                    return Err(invalid("End frame", &format!("{what} never came")));
                }
                if let Some(sink) = self.disks.take() {
                    sink.finish()
                        .map_err(|e| MigrationError::Device(e.to_string()))?;
                }
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Reads a stream's header and Config frame and checks it against `here`.
pub(super) fn read_config(r: &mut impl Read, here: &Shape) -> Result<Shape, MigrationError> {
    format::read_header(r)?;
    let mut payload = Vec::new();
    let kind = format::read_frame(r, &mut payload)?;
    if kind != Kind::Config {
        return Err(MigrationError::State(base::state::StateError::invalid(
            "first frame",
            format!("a {kind:?} frame where the Config frame belongs"),
        )));
    }
    let mut sr = StateReader::new(&payload);
    let shape = Shape::decode(&mut sr)?;
    sr.finish("the Config frame")?;
    shape.check(here).map_err(MigrationError::Config)?;
    Ok(shape)
}

/// A state file opened for `--incoming file:PATH`: its shape is checked
/// and its RAM image mapped before the VM is built around that memory.
pub struct StateFile {
    file: Arc<File>,
    shape: Shape,
}

impl StateFile {
    /// Opens `path` and checks its shape against a VM of `memory` bytes and
    /// `cpus` vCPUs (the disks are checked once they are open).
    pub fn open(path: &std::path::Path, memory: u64, cpus: u32) -> Result<Self, MigrationError> {
        let file = File::open(path).map_err(|source| MigrationError::Io {
            what: "cannot open the state file",
            source,
        })?;
        let mut r = BufReader::new(&file);
        format::read_header(&mut r)?;
        let mut payload = Vec::new();
        if format::read_frame(&mut r, &mut payload)? != Kind::Config {
            return Err(
                base::state::StateError::invalid("first frame", "not a Config frame").into(),
            );
        }
        let mut sr = StateReader::new(&payload);
        let shape = Shape::decode(&mut sr)?;
        sr.finish("the Config frame")?;
        if shape.ram_offset.is_none() {
            return Err(base::state::StateError::invalid(
                "Config frame",
                "this is a migration stream saved to a file, not a state file",
            )
            .into());
        }
        let here = Shape {
            memory,
            cpus,
            disks: shape.disks.clone(),
            ram_offset: None,
        };
        shape.check(&here).map_err(MigrationError::Config)?;
        let len = file.metadata().map_err(MigrationError::receive)?.len();
        let ram_end = shape.ram_offset.unwrap_or(0) + shape.memory;
        if len < ram_end + format::FRAME_OVERHEAD {
            return Err(MigrationError::Format(format::FormatError::Truncated));
        }
        Ok(Self {
            file: Arc::new(file),
            shape,
        })
    }

    /// Guest RAM mapped from the file (copy-on-write).
    pub fn map_memory(&self) -> Result<GuestMemoryMmap, MigrationError> {
        let ranges = crate::memory::ram_ranges(self.shape.memory);
        ram::map_image(&self.file, self.shape.ram_offset.unwrap_or(0), &ranges)
    }
}

/// Restores the rest of a state file into a VM built around its memory,
/// before any vCPU runs; then takes the images and starts the devices.
pub(crate) fn restore_file(state: &StateFile, m: &Machine) -> Result<(), MigrationError> {
    let here = m.shape(|_| false);
    let mut theirs = state.shape.clone();
    theirs.ram_offset = None;
    theirs.check(&here).map_err(MigrationError::Config)?;
    let mut file: &File = &state.file;
    file.seek(SeekFrom::Start(
        state.shape.ram_offset.unwrap_or(0) + state.shape.memory,
    ))
    .map_err(MigrationError::receive)?;
    let mut r = BufReader::new(file);
    let mut loader = Loader::new(m, false);
    loader.load(&mut r)?;
    start_guest(m)
}

/// Takes the images (the source has let go of them), then starts the
/// devices and the vCPUs.
fn start_guest(m: &Machine) -> Result<(), MigrationError> {
    if !m.graph.is_active() {
        m.graph
            .activate_images()
            .map_err(|e| MigrationError::Device(e.to_string()))?;
    }
    m.run.set_phase(Phase::Normal);
    m.run
        .resume()
        .map_err(|e| MigrationError::Device(format!("cannot start the VM: {e}")))?;
    Ok(())
}

/// Waits for a stream (`--incoming unix:|tcp:`, or `migrate-incoming`
/// after `--incoming defer`): listens at `uri` now, so that a bad address
/// is an error at once, and serves one source on a thread; the VM ends
/// with an error if the migration fails.
pub fn listen(ctl: &Arc<Controller>, uri: &MigrationUri) -> Result<(), MigrationError> {
    {
        if matches!(uri, MigrationUri::File(_)) {
            return Err(MigrationError::Config(
                "a state file is restored with --incoming file:PATH at start".into(),
            ));
        }
        let listener = Listener::bind(uri)?;
        ctl.set_status(Status::Setup);
        let thread_ctl = ctl.clone();
        let on_panic = ctl.clone();
        let thread = base::spawn(
            base::ThreadKind::Migration,
            "migration-in".to_string(),
            move || serve(&thread_ctl, listener),
            move || {
                on_panic.fail("the incoming migration thread panicked".into());
                on_panic.machine.shared.finish(VmExit::Failed(
                    "the incoming migration thread panicked".into(),
                ));
            },
        )
        .map_err(|e| {
            MigrationError::Device(format!("cannot start the incoming migration thread: {e}"))
        })?;
        ctl.set_thread(thread);
        Ok(())
    }
}

/// Waits for the source, takes its stream, and runs the guest, or ends
/// the VM with one line saying why not.
fn serve(ctl: &Controller, listener: Listener) {
    let m = &*ctl.machine;
    let (conn, first) = loop {
        let accepted = accept(m, &listener).map(|conn| {
            let mut conn = conn?;
            Ok((first_byte(&mut conn)?, conn))
        });
        match accepted {
            Some(Ok((Some(first), conn))) => break (conn, first),
            // Closed before saying anything: a probe (a second destination
            // checking that nobody listens here, a port scan), not a source.
            Some(Ok((None, _))) => log::info!("a connection closed before any stream came"),
            Some(Err(e)) => {
                let e = MigrationError::receive(e);
                ctl.fail(e.to_string());
                m.shared
                    .finish(VmExit::Failed(format!("incoming migration failed: {e}")));
                return;
            }
            None => return,
        }
    };
    drop(listener);
    ctl.set_status(Status::Active);
    let mut back = conn.try_clone().ok();
    match receive(m, conn, first) {
        Ok(()) => {
            if let Some(back) = back.as_mut() {
                // The source may have gone meanwhile; the guest runs here anyway.
                let _ = format::write_reply(back, &Reply::Done);
            }
            ctl.set_status(Status::Completed);
            if let Some(events) = m.shared.events.get() {
                events.emit("RESUME", None);
            }
        }
        Err(e) => {
            if let Some(back) = back.as_mut() {
                let _ = format::write_reply(back, &Reply::Error(e.to_string()));
            }
            ctl.fail(e.to_string());
            m.shared
                .finish(VmExit::Failed(format!("incoming migration failed: {e}")));
        }
    }
}

/// Accepts one connection, giving up when the VM ends meanwhile (`None`).
fn accept(m: &Machine, listener: &Listener) -> Option<std::io::Result<Conn>> {
    let fd = match listener {
        Listener::Unix(l, _) => l.as_raw_fd(),
        Listener::Tcp(l) => l.as_raw_fd(),
    };
    loop {
        if m.shared.exit().is_some() {
            return None;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready > 0 {
            return Some(listener.accept());
        }
    }
}

/// The stream's first byte, waiting for it up to [`SOURCE_TIMEOUT`];
/// `None` if the peer closed the connection first.
fn first_byte(conn: &mut Conn) -> std::io::Result<Option<u8>> {
    conn.set_timeouts(SOURCE_TIMEOUT)?;
    let mut byte = [0u8];
    loop {
        match conn.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(byte[0])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn receive(m: &Machine, conn: Conn, first: u8) -> Result<(), MigrationError> {
    conn.set_timeouts(SOURCE_TIMEOUT)
        .map_err(MigrationError::receive)?;
    let mut back = conn.try_clone().map_err(MigrationError::receive)?;
    let mut r = BufReader::with_capacity(1 << 20, std::io::Cursor::new([first]).chain(conn));
    let here = m.shape(|_| false);
    let mut loader = Loader::new(m, true);
    let ready = read_config(&mut r, &here).and_then(|shape| loader.expect_disks(&shape));
    if let Err(e) = ready {
        let _ = format::write_reply(&mut back, &Reply::Error(e.to_string()));
        return Err(e);
    }
    format::write_reply(&mut back, &Reply::Ready).map_err(MigrationError::receive)?;
    loader.load(&mut r)?;
    start_guest(m)
}
