//! The source side: a thread that sends the VM while it runs, pass after
//! pass, then stops it and sends the rest. Whatever fails (the destination,
//! the connection, a cancel), the source is left as it was: running if it
//! ran, its images active, its disks' leases back with their holders.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base::state::StateWriter;
use base::sync::lock;

use block::migration::BlockMigration;

use super::control::{Controller, Parameters, Status};
use super::cpu::{saveable_msrs, VcpuState};
use super::format::{self, Kind, Reply};
use super::machine::MachineState;
use super::ram::{self, PageSet, Sent, PAGE};
use super::transport::Conn;
use super::{Machine, MigrationError, MigrationUri};
use crate::runstate::Phase;

/// How long a send or a reply may block before the destination counts as gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to load the last state and start.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks what can be checked at once, then starts the migration thread.
pub(super) fn start(ctl: &Arc<Controller>, uri: MigrationUri) -> Result<(), String> {
    let m = &ctl.machine;
    if m.shared.exit().is_some() {
        return Err("The VM has ended".into());
    }
    match m.run.phase() {
        Phase::InMigrate => {
            return Err("Guest is waiting for an incoming migration".into());
        }
        Phase::PostMigrate => {
            return Err(
                "The VM was migrated already and its images are inactive; 'cont' takes them back"
                    .into(),
            );
        }
        Phase::Normal => {}
    }
    // A state file is created by truncating whatever is at its path: never
    // one of this VM's own images (a careless `file:` path to the disk).
    if let MigrationUri::File(path) = &uri {
        if let Some(node) = m.graph.node_with_file(path) {
            return Err(format!(
                "'{}' is an image this VM has open (node '{node}'): a state file there would overwrite it",
                path.display()
            ));
        }
    }
    // A job on a disk would have to hand the disk over at switchover,
    // which it cannot: refuse now rather than stop the guest for nothing.
    for d in &m.disks {
        let info = d.node.with(|n| m.graph.info(n));
        let job = info.hosted.first().cloned().or(info
            .lease
            .filter(|h| !matches!(h, block::Holder::Dataplane { .. })));
        if let Some(job) = job {
            return Err(format!(
                "Node '{}' of device '{}' is in use by {job}: finish or cancel it before migrating",
                info.name, d.id
            ));
        }
    }
    let (params, caps) = ctl.begin()?;
    // Block migration contends for each disk's lease like any job: a
    // holder that refuses (a running guest's dataplane with
    // live-jobs=off) refuses it here, before anything starts.
    let disks = if caps.block {
        let wanted: Vec<(String, String)> = m
            .disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| (d.id.clone(), d.node.with(|n| n.name().to_string())))
            .collect();
        Some(
            BlockMigration::start(&m.graph, &wanted, block::Holder::Migration)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    ctl.set_status(Status::Setup);
    let thread_ctl = ctl.clone();
    let spawned = base::spawn(
        base::ThreadKind::Migration,
        "migration".to_string(),
        move || run(&thread_ctl, &uri, params, disks),
        {
            let ctl = ctl.clone();
            move || ctl.fail("the migration thread panicked".into())
        },
    );
    match spawned {
        Ok(thread) => {
            ctl.set_thread(thread);
            Ok(())
        }
        Err(e) => {
            ctl.fail(format!("cannot start the migration thread: {e}"));
            Err(format!("cannot start the migration thread: {e}"))
        }
    }
}

fn run(
    ctl: &Arc<Controller>,
    uri: &MigrationUri,
    params: Parameters,
    disks: Option<BlockMigration>,
) {
    match migrate(ctl, uri, params, disks) {
        Ok(()) => ctl.set_status(Status::Completed),
        Err(_) if ctl.cancelled() => ctl.set_status(Status::Cancelled),
        Err(e) => {
            log::warn!("migration to {uri} failed: {e}");
            ctl.fail(e.to_string());
        }
    }
}

/// Where the stream goes.
enum Sink {
    Stream {
        out: BufWriter<Conn>,
        back: Conn,
    },
    File {
        file: BufWriter<File>,
        /// Where guest RAM's image starts.
        ram_offset: u64,
    },
}

impl Sink {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stream { out, .. } => out,
            Sink::File { file, .. } => file,
        }
    }

    fn reply(&mut self, timeout: Duration) -> Result<(), MigrationError> {
        let Sink::Stream { out, back } = self else {
            return Ok(());
        };
        out.flush().map_err(MigrationError::send)?;
        back.set_timeouts(timeout)
            .map_err(MigrationError::receive)?;
        match format::read_reply(back) {
            Ok(Reply::Error(text)) => Err(MigrationError::Peer(text)),
            Ok(_) => Ok(()),
            Err(format::FormatError::Truncated) => Err(MigrationError::Peer(
                "it closed the connection without saying why".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }
}

/// Keeps the stream to `max_bandwidth` and stops at a cancel.
struct Pacer<'a> {
    ctl: &'a Controller,
    bandwidth: u64,
    started: Instant,
    bytes: u64,
}

impl Pacer<'_> {
    fn account(&mut self, bytes: u64) -> Result<(), MigrationError> {
        self.bytes += bytes;
        loop {
            if self.ctl.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let due = Duration::from_secs_f64(self.bytes as f64 / self.bandwidth.max(1) as f64);
            let elapsed = self.started.elapsed();
            if due <= elapsed {
                return Ok(());
            }
            std::thread::sleep((due - elapsed).min(Duration::from_millis(50)));
        }
    }
}

/// Switches dirty logging off however the migration ends.
struct Logging<'a>(&'a Machine);

impl Drop for Logging<'_> {
    fn drop(&mut self) {
        self.0.dirty.stop();
        if let Err(e) = ram::set_dirty_logging(&self.0.vm, &self.0.mem, false) {
            log::warn!("{e}");
        }
    }
}

fn migrate(
    ctl: &Arc<Controller>,
    uri: &MigrationUri,
    params: Parameters,
    mut disks: Option<BlockMigration>,
) -> Result<(), MigrationError> {
    let m = &*ctl.machine;
    let started = Instant::now();
    let copied: Vec<String> = disks
        .as_ref()
        .map(|b| b.disks().into_iter().map(|(id, _)| id).collect())
        .unwrap_or_default();
    let mut shape = m.shape(|d| copied.contains(&d.id));
    if disks.is_some() && matches!(uri, MigrationUri::File(_)) {
        return Err(MigrationError::Config(
            "block migration needs a destination VM; a state file keeps no disks".into(),
        ));
    }
    let mut sink = match uri {
        MigrationUri::File(path) => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|source| MigrationError::Io {
                    what: "cannot create the state file",
                    source,
                })?;
            Sink::File {
                file: BufWriter::new(file),
                ram_offset: 0,
            }
        }
        _ => {
            let conn = Conn::connect(uri)?;
            conn.set_timeouts(PEER_TIMEOUT)
                .map_err(MigrationError::send)?;
            ctl.set_socket(conn.dup_fd().map_err(MigrationError::send)?);
            let back = conn.try_clone().map_err(MigrationError::send)?;
            Sink::Stream {
                out: BufWriter::with_capacity(1 << 20, conn),
                back,
            }
        }
    };
    // The Config frame; a state file's RAM image follows it, page aligned.
    let mut w = StateWriter::new();
    shape.encode(&mut w);
    if let Sink::File { ram_offset, .. } = &mut sink {
        let end = format::HEADER_LEN + format::FRAME_OVERHEAD + w.as_slice().len() as u64;
        *ram_offset = end.div_ceil(PAGE) * PAGE;
        shape.ram_offset = Some(*ram_offset);
        w = StateWriter::new();
        shape.encode(&mut w);
    }
    format::write_header(sink.writer()).map_err(MigrationError::send)?;
    format::write_frame(sink.writer(), Kind::Config, &[w.as_slice()])
        .map_err(MigrationError::send)?;
    let image = match &mut sink {
        Sink::File { file, ram_offset } => {
            file.flush().map_err(MigrationError::send)?;
            let f = file.get_ref();
            // Pages never written are holes: zeros, as a fresh guest's.
            f.set_len(*ram_offset + m.memory)
                .map_err(MigrationError::send)?;
            Some((f.try_clone().map_err(MigrationError::send)?, *ram_offset))
        }
        Sink::Stream { .. } => None,
    };
    sink.reply(PEER_TIMEOUT)?;
    ctl.update(|f| {
        f.setup_ms = started.elapsed().as_millis() as u64;
        f.ram_total = m.memory;
        if let Some(b) = &disks {
            f.disk_total = b.total();
            f.disk_remaining = b.remaining();
        }
    });
    ctl.set_status(Status::Active);

    ram::set_dirty_logging(&m.vm, &m.mem, true)?;
    m.dirty.start();
    let _logging = Logging(m);
    let mut pacer = Pacer {
        ctl,
        bandwidth: params.max_bandwidth,
        started: Instant::now(),
        bytes: 0,
    };
    let mut buf = Vec::new();
    let mut set = PageSet::all(&m.mem);
    let mut pass = 1u64;
    ctl.pass(pass);
    loop {
        let t = Instant::now();
        let sent = send(&mut sink, &image, m, &set, pass == 1, &mut buf, &mut pacer)?;
        record(ctl, &sent);
        let ram_ms = t.elapsed().as_secs_f64() * 1000.0;
        // The disks: the bulk pass first, then what the guest dirtied,
        // as much as was left when this pass began.
        let t = Instant::now();
        let disk_bytes = match disks.as_mut() {
            Some(b) => {
                let budget = b.remaining();
                send_disks(ctl, &mut sink, b, budget, &mut buf, &mut pacer)?
            }
            None => 0,
        };
        let disk_ms = t.elapsed().as_secs_f64() * 1000.0;
        set.clear();
        ram::sync_dirty(&m.vm, &m.mem, &m.dirty, &mut set)?;
        pass += 1;
        ctl.pass(pass);
        let disk_left = disks.as_ref().map_or(0, |b| b.remaining());
        // What is left would take as long per page (zero or not: a zero
        // page costs a look, not a send) and per disk byte as this pass
        // took, pacing included.
        let pages = sent.normal + sent.zero;
        let ram_expected = match pages {
            0 => set.len() as f64 * PAGE as f64 / (params.max_bandwidth as f64 / 1000.0),
            _ => set.len() as f64 * ram_ms / pages as f64,
        };
        let disk_expected = match disk_bytes {
            0 => disk_left as f64 / (params.max_bandwidth as f64 / 1000.0),
            _ => disk_left as f64 * disk_ms / disk_bytes as f64,
        };
        let expected = (ram_expected + disk_expected) as u64;
        let wire_ms = (ram_ms + disk_ms).max(0.001);
        ctl.update(|f| {
            f.ram_remaining = set.len() * PAGE;
            f.expected_downtime_ms = expected;
            f.mbps = (sent.bytes + disk_bytes) as f64 / wire_ms * 1000.0 * 8.0 / 1e6;
        });
        if expected <= params.downtime_limit || !m.run.is_running() {
            break;
        }
        if ctl.cancelled() {
            return Err(MigrationError::Cancelled);
        }
    }

    // Switchover: from here the guest is stopped until the destination runs it.
    let stopped_at = Instant::now();
    let paused = m
        .run
        .pause()
        .map_err(|e| MigrationError::Device(format!("cannot stop the VM: {e}")))?;
    let result = finish(
        ctl, m, &mut sink, &image, &mut set, &mut disks, &mut buf, &mut pacer, pass,
    );
    match result {
        Ok(()) => {
            ctl.update(|f| {
                f.downtime_ms = Some(stopped_at.elapsed().as_millis() as u64);
                f.ram_remaining = 0;
            });
            m.run.set_phase(Phase::PostMigrate);
            if paused {
                if let Some(events) = m.shared.events.get() {
                    events.emit("STOP", None);
                }
            }
            Ok(())
        }
        Err(e) => {
            // Give the source back what it had: its images, then its run.
            if !m.graph.is_active() {
                if let Err(err) = m.graph.activate_images() {
                    log::error!("after a failed migration, cannot take the images back: {err}");
                    return Err(MigrationError::Device(format!(
                        "{e}; and the images cannot be taken back ({err}), so the VM stays stopped"
                    )));
                }
            }
            if paused {
                if let Err(err) = m.run.resume() {
                    log::error!("after a failed migration, cannot resume the VM: {err}");
                }
            }
            Err(e)
        }
    }
}

/// The stopped part: the last pages, the device and vCPU state, the
/// images handed over, the destination's word that it runs.
#[allow(clippy::too_many_arguments)]
fn finish(
    ctl: &Controller,
    m: &Machine,
    sink: &mut Sink,
    image: &Option<(File, u64)>,
    set: &mut PageSet,
    disks: &mut Option<BlockMigration>,
    buf: &mut Vec<u8>,
    pacer: &mut Pacer,
    pass: u64,
) -> Result<(), MigrationError> {
    // `set` holds what the last pass left (dirtied while it ran); add what
    // changed since, up to the stop (devices drained: their writes are in).
    ram::sync_dirty(&m.vm, &m.mem, &m.dirty, set)?;
    // Downtime is not paced: the guest waits for every byte.
    pacer.bandwidth = u64::MAX;
    let sent = send(sink, image, m, set, false, buf, pacer)?;
    record(ctl, &sent);
    if let Some(b) = disks.as_mut() {
        // Nothing dirties the disks now: send all that is left.
        send_disks(ctl, sink, b, u64::MAX, buf, pacer)?;
    }
    // Its leases (or hosted handles) go before the images are handed over.
    *disks = None;
    if let Sink::File { file, ram_offset } = sink {
        // The state frames follow the RAM image.
        file.seek(SeekFrom::Start(*ram_offset + m.memory))
            .map_err(MigrationError::send)?;
    }
    let w = sink.writer();
    format::write_frame(w, Kind::Pass, &[&(pass as u32).to_le_bytes()])
        .map_err(MigrationError::send)?;

    let mut state = StateWriter::new();
    lock(&m.serial).save(&mut state);
    m.run
        .save_devices(&mut state)
        .map_err(MigrationError::Device)?;
    format::write_frame(w, Kind::Devices, &[state.as_slice()]).map_err(MigrationError::send)?;
    let mut state = StateWriter::new();
    MachineState::save(&m.vm, m.pit)?.encode(&mut state);
    format::write_frame(w, Kind::Machine, &[state.as_slice()]).map_err(MigrationError::send)?;
    for (i, vcpu) in m.vcpus.iter().enumerate() {
        let fd = lock(vcpu);
        let msrs = match m.msrs.get() {
            Some(list) => list,
            None => {
                let list = saveable_msrs(&m.kvm, &fd)?;
                m.msrs.get_or_init(|| list)
            }
        };
        let mut state = StateWriter::new();
        state.u32(i as u32);
        VcpuState::save(&fd, msrs)?.encode(&mut state);
        format::write_frame(w, Kind::Vcpu, &[state.as_slice()]).map_err(MigrationError::send)?;
    }
    // The destination may take the images' locks once we have let go:
    // first the devices let go of what they kept while paused.
    m.run
        .release_devices()
        .map_err(|e| MigrationError::Device(e.reason))?;
    m.graph
        .inactivate_images()
        .map_err(|e| MigrationError::Device(e.to_string()))?;
    format::write_frame(w, Kind::End, &[]).map_err(MigrationError::send)?;
    w.flush().map_err(MigrationError::send)?;
    if let Sink::File { file, .. } = sink {
        file.get_ref().sync_all().map_err(MigrationError::send)?;
    }
    sink.reply(DONE_TIMEOUT)
}

/// Sends one pass's pages: frames on a stream, the RAM image in a file.
fn send(
    sink: &mut Sink,
    image: &Option<(File, u64)>,
    m: &Machine,
    set: &PageSet,
    first: bool,
    buf: &mut Vec<u8>,
    pacer: &mut Pacer,
) -> Result<Sent, MigrationError> {
    match image {
        Some((file, base)) => {
            ram::write_image(file, *base, &m.mem, set, first, buf, |b| pacer.account(b))
        }
        None => ram::send_pages(sink.writer(), &m.mem, set, first, buf, |b| pacer.account(b)),
    }
}

/// Sends disk chunks until `budget` bytes went or nothing is left; the
/// bytes sent.
fn send_disks(
    ctl: &Controller,
    sink: &mut Sink,
    b: &mut BlockMigration,
    budget: u64,
    buf: &mut Vec<u8>,
    pacer: &mut Pacer,
) -> Result<u64, MigrationError> {
    let mut sent = 0u64;
    while sent < budget {
        let Some(chunk) = b
            .next_chunk(buf)
            .map_err(|e| MigrationError::Device(e.to_string()))?
        else {
            break;
        };
        let mut head = [0u8; 17];
        head[..4].copy_from_slice(&(chunk.disk as u32).to_le_bytes());
        head[4..12].copy_from_slice(&chunk.offset.to_le_bytes());
        head[12..16].copy_from_slice(&chunk.len.to_le_bytes());
        head[16] = u8::from(chunk.zero);
        let data: &[u8] = if chunk.zero {
            &[]
        } else {
            &buf[..chunk.len as usize]
        };
        format::write_frame(sink.writer(), Kind::Disk, &[&head, data])
            .map_err(MigrationError::send)?;
        let bytes = format::FRAME_OVERHEAD + head.len() as u64 + data.len() as u64;
        sent += u64::from(chunk.len);
        ctl.update(|f| {
            f.disk_transferred = b.transferred();
            f.disk_remaining = b.remaining();
        });
        pacer.account(bytes)?;
    }
    Ok(sent)
}

fn record(ctl: &Controller, sent: &Sent) {
    ctl.update(|f| {
        f.ram_transferred += sent.bytes;
        f.normal += sent.normal;
        f.duplicate += sent.zero;
    });
}
