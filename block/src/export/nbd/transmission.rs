//! The transmission phase: requests read off the socket, checked by one
//! function, served on the client's own engine (io_uring: in parallel, in
//! any order), replies written as they complete.
//!
//! Per client at most [`MAX_IN_FLIGHT`] requests and [`MAX_BYTES`] of
//! buffers are in flight; past either, the socket is not read until
//! completions make room. Whatever happens (a client gone mid-request,
//! a DISC, a hard `block-export-del`), every operation in flight
//! completes before its buffer is freed.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handshake::{Context, Negotiated};
use super::proto::*;
use super::socket::{poll, Socket};
use crate::bitmap::Bitmaps;
use crate::export::Export;
use crate::io::{AsyncIo, Completion};

/// Requests one client may have in flight.
pub const MAX_IN_FLIGHT: usize = 16;
/// Bytes of request buffers one client may have in flight.
pub const MAX_BYTES: u64 = 64 << 20;
/// Extents in one block status reply.
pub const MAX_EXTENTS: usize = 1024;
/// How long in-flight operations may take to complete once the client is
/// gone before they, their buffers and the export are leaked for good.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// A refused request: the wire's error and why, for structured replies.
pub(crate) type Refusal = (u32, &'static str);

/// Checks a request against the export and what was negotiated; every
/// request passes here before anything is read or done for it.
pub(crate) fn validate(
    req: &Request,
    export: &Export,
    structured: bool,
    contexts: usize,
) -> Result<(), Refusal> {
    let allowed = match req.kind {
        CMD_READ | CMD_FLUSH | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err((EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "unsupported flags for this command"));
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > MAX_REQUEST {
        return Err((EINVAL, "request length exceeds the maximum of 32 MiB"));
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !export.writable {
        return Err((EPERM, "export is read-only"));
    }
    if req.kind == CMD_BLOCK_STATUS {
        if !structured || contexts == 0 {
            return Err((EINVAL, "no metadata context was negotiated"));
        }
        if req.len == 0 {
            return Err((EINVAL, "block status of zero bytes"));
        }
    }
    if matches!(req.kind, CMD_FLUSH | CMD_DISC) {
        return Ok(());
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= export.size);
    if !in_range {
        return Err(if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            (ENOSPC, "request past the end of the export")
        } else {
            (EINVAL, "request past the end of the export")
        });
    }
    let min = u64::from(export.min_block);
    let aligned = req.offset.is_multiple_of(min) && u64::from(req.len).is_multiple_of(min);
    if writes && !aligned {
        return Err((EINVAL, "request not aligned to the minimum block size"));
    }
    Ok(())
}

/// One request in flight. Boxed, so its iovec and buffer stay put.
struct Op {
    cookie: u64,
    kind: u16,
    fua: bool,
    /// Where the engine's I/O starts (a read is widened to the alignment).
    io_offset: u64,
    /// Bytes transferred so far; a short transfer goes on from here.
    done: u64,
    /// Bytes of the client's read that start `skip` into `buf`.
    skip: usize,
    send: usize,
    /// The reply's offset (the client's).
    offset: u64,
    buf: Vec<u8>,
    iov: libc::iovec,
    /// The FUA flush after a write is under way.
    flushing: bool,
}

impl Op {
    /// Whether it changes the node (and so its dirty bitmaps).
    fn changes(&self) -> bool {
        matches!(self.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
    }

    /// The bytes it covers from `io_offset`.
    fn range(&self) -> u64 {
        match self.kind {
            CMD_READ | CMD_WRITE => self.buf.len() as u64,
            _ => self.send as u64,
        }
    }
}

// SAFETY: the iovec points into `buf`, which moves with the `Op`.
unsafe impl Send for Op {}

struct Client<'a> {
    socket: &'a Socket,
    export: &'a Export,
    structured: bool,
    contexts: Vec<(u32, Context)>,
    engine: Box<dyn AsyncIo>,
    /// The node's dirty bitmaps, marked as writes land.
    bitmaps: Arc<Bitmaps>,
    slots: Vec<Option<Box<Op>>>,
    bytes: u64,
    /// Replies can no longer be sent.
    dead: bool,
}

/// Serves `n` on `socket` until the client leaves, sends DISC, breaks
/// the framing or the socket is shut down.
pub(crate) fn serve(socket: &Socket, n: &Negotiated) {
    let engine = match n.export.access.open_io(2 * MAX_IN_FLIGHT as u32) {
        Ok(engine) => engine,
        Err(e) => {
            log::warn!("NBD export '{}': {e}", n.export.id);
            return;
        }
    };
    let mut client = Client {
        socket,
        export: &n.export,
        structured: n.structured,
        contexts: n.contexts.clone(),
        engine,
        bitmaps: n.export.access.node().bitmaps().clone(),
        slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
        bytes: 0,
        dead: false,
    };
    if let Err(e) = client.run() {
        log::debug!("NBD client of export '{}': {e}", n.export.id);
    }
    client.drain();
}

impl Client<'_> {
    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    fn run(&mut self) -> io::Result<()> {
        loop {
            self.reap()?;
            let room = self.in_flight() < MAX_IN_FLIGHT && self.bytes < MAX_BYTES;
            let notifier = self.engine.notifier().as_raw_fd_for_poll();
            let mut fds = vec![(notifier, libc::POLLIN)];
            if room {
                fds.push((self.socket.fd(), libc::POLLIN));
            }
            let ready = poll(&fds, None)?;
            if ready[0] != 0 {
                let _ = self.engine.notifier().read();
            }
            if room && ready[1] != 0 {
                let mut header = [0u8; REQUEST_LEN];
                if let Err(e) = read_exact(self.socket, &mut header) {
                    return match e.kind() {
                        io::ErrorKind::UnexpectedEof => Ok(()),
                        _ => Err(e),
                    };
                }
                let Some(req) = Request::parse(&header) else {
                    return Err(io::Error::other("bad request magic; closing"));
                };
                if req.kind == CMD_DISC {
                    return Ok(());
                }
                self.request(req)?;
            }
        }
    }

    /// Handles one request whose header was read.
    fn request(&mut self, req: Request) -> io::Result<()> {
        if let Err((errno, why)) = validate(&req, self.export, self.structured, self.contexts.len())
        {
            if req.kind == CMD_WRITE {
                discard(self.socket, u64::from(req.len))?;
            }
            return self.reply_error(req.cookie, errno, why);
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = u64::from(req.len);
        match req.kind {
            CMD_READ if len == 0 => self.reply_read(req.cookie, req.offset, &[]),
            CMD_READ => {
                let min = u64::from(self.export.min_block);
                let start = req.offset - req.offset % min;
                let end = (req.offset + len)
                    .div_ceil(min)
                    .saturating_mul(min)
                    .min(self.export.size);
                self.make_room(end - start)?;
                let op = Op {
                    cookie: req.cookie,
                    kind: CMD_READ,
                    fua: false,
                    io_offset: start,
                    done: 0,
                    skip: (req.offset - start) as usize,
                    send: len as usize,
                    offset: req.offset,
                    buf: vec![0u8; (end - start) as usize],
                    iov: empty_iov(),
                    flushing: false,
                };
                self.start(op)
            }
            CMD_WRITE => {
                self.make_room(len)?;
                let mut buf = vec![0u8; len as usize];
                read_exact(self.socket, &mut buf)?;
                if len == 0 {
                    return self.reply_ok(req.cookie);
                }
                let op = Op {
                    cookie: req.cookie,
                    kind: CMD_WRITE,
                    fua,
                    io_offset: req.offset,
                    done: 0,
                    skip: 0,
                    send: 0,
                    offset: req.offset,
                    buf,
                    iov: empty_iov(),
                    flushing: false,
                };
                self.start(op)
            }
            CMD_FLUSH => self.start(self.plain(req, CMD_FLUSH, false)),
            CMD_TRIM | CMD_WRITE_ZEROES if len == 0 => self.reply_ok(req.cookie),
            CMD_TRIM => self.start(self.plain(req, CMD_TRIM, fua)),
            CMD_WRITE_ZEROES => {
                if req.flags & CMD_FLAG_FAST_ZERO != 0 && !self.cheap_zero(req.offset, len) {
                    return self.reply_error(req.cookie, ENOTSUP, "zeroing this range is not fast");
                }
                let kind = if req.flags & CMD_FLAG_NO_HOLE != 0 {
                    CMD_WRITE_ZEROES
                } else {
                    // Zeros that may be a hole: the cheaper deallocation.
                    CMD_TRIM
                };
                self.start(self.plain(req, kind, fua))
            }
            CMD_BLOCK_STATUS => self.block_status(req),
            _ => unreachable!("validate refuses other commands"),
        }
    }

    /// Zeroing is a metadata change (fallocate, or whole qcow2 clusters
    /// turned to zero clusters), never a write of zeros.
    fn cheap_zero(&self, offset: u64, len: u64) -> bool {
        match self.export.cluster_size {
            Some(c) => {
                offset.is_multiple_of(c)
                    && (len.is_multiple_of(c) || offset + len == self.export.size)
            }
            None => true,
        }
    }

    fn plain(&self, req: Request, kind: u16, fua: bool) -> Op {
        Op {
            cookie: req.cookie,
            kind,
            fua,
            io_offset: req.offset,
            done: 0,
            skip: 0,
            // The range's length, for TRIM and WRITE_ZEROES.
            send: req.len as usize,
            offset: req.offset,
            buf: Vec::new(),
            iov: empty_iov(),
            flushing: false,
        }
    }

    /// Waits for completions until `len` more bytes fit the budget.
    fn make_room(&mut self, len: u64) -> io::Result<()> {
        while self.bytes + len > MAX_BYTES && self.in_flight() > 0 {
            let _ = self.engine.submit_and_wait(1, Duration::from_millis(100));
            self.reap()?;
        }
        Ok(())
    }

    /// Puts `op` in a free slot and submits its I/O.
    fn start(&mut self, op: Op) -> io::Result<()> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.is_none())
            .expect("the loop reads a request only with a slot free");
        self.bytes += op.buf.len() as u64;
        self.slots[slot] = Some(Box::new(op));
        self.submit(slot)
    }

    /// Submits (or resubmits) slot `i`'s next operation.
    fn submit(&mut self, i: usize) -> io::Result<()> {
        let op = self.slots[i].as_mut().expect("a live slot");
        let ud = i as u64;
        let result = if op.flushing || op.kind == CMD_FLUSH {
            self.engine.flush(ud)
        } else {
            match op.kind {
                CMD_READ | CMD_WRITE => {
                    let done = op.done as usize;
                    op.iov = libc::iovec {
                        // SAFETY: `done` is below the buffer's length (a
                        // transfer resubmits only while bytes remain).
                        iov_base: unsafe { op.buf.as_mut_ptr().add(done) }.cast(),
                        iov_len: op.buf.len() - done,
                    };
                    let at = op.io_offset + op.done;
                    let iov = std::slice::from_ref(&op.iov);
                    // SAFETY: the buffer and the iovec live in the boxed
                    // `Op`, which stays in its slot until this operation's
                    // completion is drained (`drain` waits for every one).
                    unsafe {
                        if op.kind == CMD_READ {
                            self.engine.read_vectored(at, iov, ud)
                        } else {
                            self.engine.write_vectored(at, iov, ud)
                        }
                    }
                }
                CMD_TRIM => self.engine.punch_hole(op.io_offset, u64_len(op), ud),
                CMD_WRITE_ZEROES => self.engine.write_zeroes(op.io_offset, u64_len(op), ud),
                _ => unreachable!("only I/O commands take a slot"),
            }
        };
        let result = result.and_then(|()| self.engine.submit());
        if let Err(e) = result {
            log::warn!("NBD export '{}': {e}", self.export.id);
            let op = self.free(i);
            self.reply_error(op.cookie, EIO, "the I/O could not be submitted")?;
        }
        Ok(())
    }

    fn free(&mut self, i: usize) -> Box<Op> {
        let op = self.slots[i].take().expect("a live slot");
        self.bytes -= op.buf.len() as u64;
        op
    }

    /// Handles every completion that is ready.
    fn reap(&mut self) -> io::Result<()> {
        while let Some(c) = self.engine.next_completion() {
            self.complete(c)?;
        }
        Ok(())
    }

    fn complete(&mut self, c: Completion) -> io::Result<()> {
        let i = c.user_data as usize;
        let Some(op) = self.slots.get(i).and_then(|s| s.as_ref()) else {
            return Ok(());
        };
        // The node's bitmaps learn of a change once all of it has landed,
        // or it failed (having perhaps changed part of its range); a short
        // write goes on first.
        let short =
            op.kind == CMD_WRITE && c.result > 0 && op.done + (c.result as u64) < op.range();
        if op.changes() && !op.flushing && !short {
            self.bitmaps.mark(op.io_offset, op.range());
        }
        if c.result < 0 {
            let op = self.free(i);
            let message = io::Error::from_raw_os_error(-c.result).to_string();
            return self.reply_error_owned(op.cookie, wire_errno(-c.result), &message);
        }
        let op = self.slots[i].as_mut().expect("checked above");
        if matches!(op.kind, CMD_READ | CMD_WRITE) && !op.flushing {
            if c.result == 0 && !op.buf.is_empty() {
                let op = self.free(i);
                return self.reply_error(op.cookie, EIO, "the I/O ended early");
            }
            op.done += c.result as u64;
            if op.done < op.buf.len() as u64 {
                return self.submit(i);
            }
        }
        if op.fua && !op.flushing && op.kind != CMD_READ {
            op.flushing = true;
            return self.submit(i);
        }
        let op = self.free(i);
        if op.kind == CMD_READ {
            self.reply_read(op.cookie, op.offset, &op.buf[op.skip..op.skip + op.send])
        } else {
            self.reply_ok(op.cookie)
        }
    }

    /// Block status of every selected context, one chunk each.
    fn block_status(&mut self, req: Request) -> io::Result<()> {
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut chunks = Vec::new();
        for (id, context) in self.contexts.clone() {
            match self.extents(&context, req.offset, u64::from(req.len), one) {
                Ok(extents) => chunks.push((id, extents)),
                Err(e) => {
                    let message = e.to_string();
                    let errno = wire_errno(e.raw_os_error().unwrap_or(libc::EIO));
                    return self.reply_error_owned(req.cookie, errno, &message);
                }
            }
        }
        let last = chunks.len() - 1;
        for (n, (id, extents)) in chunks.into_iter().enumerate() {
            let flags = if n == last { REPLY_FLAG_DONE } else { 0 };
            let len = 4 + 8 * extents.len() as u32;
            let mut out = chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, req.cookie, len).to_vec();
            out.extend_from_slice(&id.to_be_bytes());
            for (length, state) in extents {
                out.extend_from_slice(&length.to_be_bytes());
                out.extend_from_slice(&state.to_be_bytes());
            }
            self.send(&out, false)?;
        }
        Ok(())
    }

    /// Extents from `offset` for up to `len` bytes, alike ones merged.
    fn extents(
        &self,
        context: &Context,
        offset: u64,
        len: u64,
        one: bool,
    ) -> io::Result<Vec<(u32, u32)>> {
        let end = offset + len;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        while at < end {
            let (state, n) = match context {
                Context::Allocation => {
                    let (a, n) = self.export.access.block_status(at, end - at)?;
                    let state =
                        if a.hole { STATE_HOLE } else { 0 } | if a.zero { STATE_ZERO } else { 0 };
                    (state, n)
                }
                Context::Bitmap(b) => {
                    let (dirty, n) = self.export.bitmaps[*b].extent(at, end - at);
                    (if dirty { STATE_DIRTY } else { 0 }, n)
                }
            };
            let n = n.clamp(1, end - at);
            match out.last_mut() {
                Some((l, s)) if *s == state && u64::from(*l) + n <= u64::from(u32::MAX) => {
                    *l += n as u32;
                }
                _ => {
                    if one && !out.is_empty() || out.len() == MAX_EXTENTS {
                        break;
                    }
                    out.push((n as u32, state));
                }
            }
            at += n;
        }
        Ok(out)
    }

    fn send(&mut self, bytes: &[u8], more: bool) -> io::Result<()> {
        if self.dead {
            return Ok(());
        }
        let sent = self.socket.send_all(bytes, more);
        if sent.is_err() {
            self.dead = true;
        }
        sent
    }

    fn reply_ok(&mut self, cookie: u64) -> io::Result<()> {
        self.send(&simple_reply(0, cookie), false)
    }

    fn reply_read(&mut self, cookie: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        if !self.structured {
            self.send(&simple_reply(0, cookie), !data.is_empty())?;
            return self.send(data, false);
        }
        if data.is_empty() {
            return self.send(
                &chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0),
                false,
            );
        }
        let mut head = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + data.len() as u32,
        )
        .to_vec();
        head.extend_from_slice(&offset.to_be_bytes());
        self.send(&head, true)?;
        self.send(data, false)
    }

    fn reply_error(&mut self, cookie: u64, errno: u32, why: &'static str) -> io::Result<()> {
        self.reply_error_owned(cookie, errno, why)
    }

    fn reply_error_owned(&mut self, cookie: u64, errno: u32, why: &str) -> io::Result<()> {
        if self.structured {
            let chunk = error_chunk(cookie, errno, why);
            self.send(&chunk, false)
        } else {
            self.send(&simple_reply(errno, cookie), false)
        }
    }

    /// Waits for every operation in flight (replying where the client is
    /// still there); if they do not complete in time, leaks them with
    /// the engine, so nothing late lands in freed memory.
    fn drain(mut self) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.in_flight() > 0 {
            if Instant::now() > deadline {
                log::error!(
                    "NBD export '{}': I/O did not complete in {} s; leaking its buffers",
                    self.export.id,
                    DRAIN_LIMIT.as_secs()
                );
                std::mem::forget(self.engine);
                std::mem::forget(self.slots);
                return;
            }
            let _ = self.engine.submit_and_wait(1, Duration::from_millis(100));
            while let Some(c) = self.engine.next_completion() {
                if self.complete(c).is_err() {
                    self.dead = true;
                }
            }
        }
    }
}

fn u64_len(op: &Op) -> u64 {
    op.send as u64
}

fn empty_iov() -> libc::iovec {
    libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }
}

/// Reads exactly `buf.len()` bytes; an end of stream is `UnexpectedEof`.
fn read_exact(socket: &Socket, buf: &mut [u8]) -> io::Result<()> {
    struct R<'a>(&'a Socket);
    impl Read for R<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
    }
    R(socket).read_exact(buf)
}

/// Reads and drops `len` bytes (a refused write's payload).
fn discard(socket: &Socket, mut len: u64) -> io::Result<()> {
    let mut sink = vec![0u8; 64 << 10];
    while len > 0 {
        let n = (sink.len() as u64).min(len) as usize;
        read_exact(socket, &mut sink[..n])?;
        len -= n as u64;
    }
    Ok(())
}

trait PollFd {
    fn as_raw_fd_for_poll(&self) -> i32;
}

impl PollFd for vmm_sys_util::eventfd::EventFd {
    fn as_raw_fd_for_poll(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}
