//! Copy-before-write for a job hosted by its source's lease holder: the
//! holder asks before each write it is about to submit, and a write to a
//! range the job has not yet read holds until the job has the old data in
//! hand.
//!
//! The source is cut into granules, each in one of three states: not read
//! yet, read (its old data is in a job buffer on its way to the target),
//! written. The rule that keeps the copy exactly the source as it was when
//! the hook went in: a write to a granule is held until the granule has
//! been read, and of the reads of a granule only the first to complete is
//! kept. A read completes before any held write to its granule goes (the
//! holder submits a held write only when its ticket is released, which
//! happens once a read completed), so the first completed read holds old
//! data; a read still in flight when a write goes may see new data, and
//! is dropped because it is not the first.

use std::sync::{Arc, Mutex};

use base::sync::lock;
use vmm_sys_util::eventfd::EventFd;

use crate::graph::{BeforeWrite, Host};

/// Bytes per granule: QEMU's default backup cluster size.
pub const GRANULE: u64 = 64 << 10;

const NOT_READ: u8 = 0;
const READ: u8 = 1;
const WRITTEN: u8 = 2;

struct State {
    granules: Vec<u8>,
    /// Held writes: ticket and the granules it waits for.
    tickets: Vec<(u64, Vec<u64>)>,
    /// Granules held writes wait for that no read has been started for.
    wanted: Vec<u64>,
}

/// The job's side of copy-before-write.
pub struct Cbw {
    state: Arc<Mutex<State>>,
    host: Arc<Host>,
    hook: u64,
    /// The source's size.
    len: u64,
    /// Signalled when a held write wants granules read.
    wake: Arc<EventFd>,
    granule: u64,
}

struct Hook {
    state: Arc<Mutex<State>>,
    host: Arc<Host>,
    wake: Arc<EventFd>,
    granule: u64,
    len: u64,
}

impl BeforeWrite for Hook {
    fn before_write(&self, offset: u64, len: u64) -> Option<u64> {
        if len == 0 || offset >= self.len {
            return None;
        }
        let end = offset.saturating_add(len).min(self.len);
        let (first, last) = (offset / self.granule, (end - 1) / self.granule);
        let mut s = lock(&self.state);
        let missing: Vec<u64> = (first..=last)
            .filter(|&g| s.granules[g as usize] == NOT_READ)
            .collect();
        if missing.is_empty() {
            return None;
        }
        let ticket = self.host.ticket();
        s.wanted.extend(missing.iter().copied());
        s.tickets.push((ticket, missing));
        drop(s);
        let _ = self.wake.write(1);
        Some(ticket)
    }
}

impl Cbw {
    /// Hooks into `host`'s writes to a node of `len` bytes, in granules of
    /// `granule` bytes (a multiple of [`GRANULE`]); only granules `needed`
    /// says are part of the copy hold writes (a bitmap's extents).
    pub fn start(
        host: Arc<Host>,
        len: u64,
        granule: u64,
        needed: impl Fn(u64) -> bool,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let granules = (0..len.div_ceil(granule))
            .map(|g| if needed(g) { NOT_READ } else { WRITTEN })
            .collect();
        let state = Arc::new(Mutex::new(State {
            granules,
            tickets: Vec::new(),
            wanted: Vec::new(),
        }));
        let hook = host.hook(Arc::new(Hook {
            state: state.clone(),
            host: host.clone(),
            wake: wake.clone(),
            granule,
            len,
        }));
        Ok(Self {
            state,
            host,
            hook,
            len,
            wake,
            granule,
        })
    }

    /// The source's size.
    pub fn source_size(&self) -> u64 {
        self.len
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The eventfd a held write signals.
    pub fn wake(&self) -> &EventFd {
        &self.wake
    }

    /// The next granule a held write waits for, to be read first.
    pub fn next_wanted(&self) -> Option<u64> {
        let mut s = lock(&self.state);
        while let Some(g) = s.wanted.pop() {
            if s.granules[g as usize] == NOT_READ {
                return Some(g);
            }
        }
        None
    }

    /// Puts back a granule that could not be read yet (no free buffer).
    pub fn want_again(&self, g: u64) {
        lock(&self.state).wanted.push(g);
    }

    /// Whether granule `g` still has to be read.
    pub fn unread(&self, g: u64) -> bool {
        lock(&self.state).granules[g as usize] == NOT_READ
    }

    /// A read of granule `g` completed: true if it is the first (its data
    /// is the old data, to be written); the held writes whose granules are
    /// now all read go.
    pub fn claim(&self, g: u64) -> bool {
        let mut s = lock(&self.state);
        if s.granules[g as usize] != NOT_READ {
            return false;
        }
        s.granules[g as usize] = READ;
        let State {
            granules, tickets, ..
        } = &mut *s;
        tickets.retain(|(ticket, wait)| {
            let done = wait.iter().all(|&g| granules[g as usize] != NOT_READ);
            if done {
                self.host.release(*ticket);
            }
            !done
        });
        true
    }

    /// Asks for granule `g` to be copied (a read of the target needs it).
    pub fn want(&self, g: u64) {
        let mut s = lock(&self.state);
        if s.granules[g as usize] == NOT_READ {
            s.wanted.push(g);
        }
    }

    /// Granule `g`'s copy is on the target.
    pub fn written(&self, g: u64) {
        lock(&self.state).granules[g as usize] = WRITTEN;
    }

    /// Whether every granule of `first..=last` is on the target.
    pub fn all_written(&self, first: u64, last: u64) -> bool {
        let s = lock(&self.state);
        (first..=last).all(|g| s.granules[g as usize] == WRITTEN)
    }

    /// Unhooks, and lets every held write go: the job ends.
    pub fn finish(&self) {
        self.host.unhook(self.hook);
        let mut s = lock(&self.state);
        for (ticket, _) in s.tickets.drain(..) {
            self.host.release(ticket);
        }
        s.wanted.clear();
    }
}

impl Drop for Cbw {
    fn drop(&mut self) {
        self.finish();
    }
}
