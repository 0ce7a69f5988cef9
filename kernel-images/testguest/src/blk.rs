//! A polling virtio-blk driver over virtio-mmio (version 2).
//!
//! `Blk::init` runs the whole initialisation (reset, ACKNOWLEDGE, DRIVER,
//! features, FEATURES_OK, queues, DRIVER_OK) and can run again after a
//! reset (DEVICE_NEEDS_RESET). Requests go through `Vq::submit`/`kick`
//! and completions are reaped by polling the used ring; every wait has a
//! TSC deadline and reads the status register now and then to notice
//! DEVICE_NEEDS_RESET. Like virtio.rs, all of it runs in ring 0 or ring 3.

use crate::tsc;
use crate::virtio::*;

pub const DEVICE_ID_BLOCK: u32 = 2;

// Block feature bits.
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// What the driver accepts if offered.
pub const WANTED: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | F_SIZE_MAX
    | F_SEG_MAX
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_MQ
    | F_DISCARD
    | F_WRITE_ZEROES;

// Request types and status values.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Queues set up per device, at most.
pub const MAX_QUEUES: usize = 8;
/// Queue size used, at most (the device's QueueNumMax may be lower).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Largest data buffer a request carries (split further by size_max).
pub const MAX_REQUEST: u32 = 128 * 1024;

/// How long the device's status register may go unread while waiting.
const STATUS_CHECK_MS: u64 = 10;

/// Why a wait ended without a completion.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    Timeout,
    NeedsReset,
    /// Not enough free descriptors (a driver bug: callers reap first).
    Full,
}

impl Stall {
    pub fn name(self) -> &'static str {
        match self {
            Stall::Timeout => "timeout",
            Stall::NeedsReset => "device needs reset (DEVICE_NEEDS_RESET)",
            Stall::Full => "no free descriptors",
        }
    }
}

pub struct Blk {
    pub name: [u8; 3],
    pub mmio: Mmio,
    pub offered: u64,
    pub features: u64,
    pub capacity: u64,
    pub blk_size: u32,
    pub seg_max: u32,
    pub size_max: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
    pub qs: [Option<Vq>; MAX_QUEUES],
    pub nq: usize,
    /// Features the command line disables (blk.event_idx=0, blk.indirect=0).
    pub masked: u64,
    /// Ring memory, allocated on the first init and reused after a reset.
    ring_mem: u64,
    ring_mem_size: u64,
    /// Timeout for one wait, in ms.
    pub timeout_ms: u64,
    /// `blk.notify=always`, `blk.irq=on` (see virtio.rs), for every queue.
    pub notify_always: bool,
    pub irq: bool,
}

impl Blk {
    pub fn new(name: [u8; 3], base: u64, masked: u64, timeout_ms: u64) -> Blk {
        const NONE: Option<Vq> = None;
        Blk {
            name,
            mmio: Mmio(base),
            offered: 0,
            features: 0,
            capacity: 0,
            blk_size: 512,
            seg_max: 0,
            size_max: 0,
            num_queues: 1,
            max_discard_sectors: 0,
            max_discard_seg: 0,
            discard_sector_alignment: 0,
            max_write_zeroes_sectors: 0,
            max_write_zeroes_seg: 0,
            write_zeroes_may_unmap: false,
            qs: [NONE; MAX_QUEUES],
            nq: 0,
            masked,
            ring_mem: 0,
            ring_mem_size: 0,
            timeout_ms,
            notify_always: false,
            irq: false,
        }
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    pub fn ro(&self) -> bool {
        self.has(F_RO)
    }

    pub fn status(&self) -> u32 {
        self.mmio.read(REG_STATUS)
    }

    pub fn q(&mut self, i: usize) -> &mut Vq {
        self.qs[i].as_mut().expect("queue not set up")
    }

    /// Writes 0 to the status register and waits (bounded) until it reads 0.
    pub fn reset(&mut self) -> Result<(), &'static str> {
        self.mmio.write(REG_STATUS, 0);
        let deadline = tsc::deadline_ms(1000);
        while self.status() != 0 {
            if tsc::now() > deadline {
                return Err("status did not read 0 within 1 s of a reset");
            }
        }
        for q in self.qs.iter_mut() {
            *q = None;
        }
        self.nq = 0;
        Ok(())
    }

    /// Full initialisation; the device must be version 2 with DeviceID 2.
    pub fn init(&mut self) -> Result<(), &'static str> {
        let m = self.mmio;
        self.reset()?;
        m.write(REG_STATUS, S_ACKNOWLEDGE);
        m.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        m.write(REG_DEVICE_FEATURES_SEL, 0);
        let lo = m.read(REG_DEVICE_FEATURES) as u64;
        m.write(REG_DEVICE_FEATURES_SEL, 1);
        let hi = m.read(REG_DEVICE_FEATURES) as u64;
        self.offered = hi << 32 | lo;
        if self.offered & F_VERSION_1 == 0 {
            m.write(REG_STATUS, S_FAILED);
            return Err("the device does not offer VIRTIO_F_VERSION_1");
        }
        self.features = self.offered & WANTED & !self.masked;
        m.write(REG_DRIVER_FEATURES_SEL, 0);
        m.write(REG_DRIVER_FEATURES, self.features as u32);
        m.write(REG_DRIVER_FEATURES_SEL, 1);
        m.write(REG_DRIVER_FEATURES, (self.features >> 32) as u32);
        m.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            m.write(REG_STATUS, S_FAILED);
            return Err("FEATURES_OK did not stick");
        }
        self.read_config()?;

        let want_q = (self.num_queues as usize).clamp(1, MAX_QUEUES);
        // One queue size for all queues: the smallest power of two that
        // every queue allows, capped.
        let mut size = MAX_QUEUE_SIZE;
        for i in 0..want_q {
            m.write(REG_QUEUE_SEL, i as u32);
            if m.read(REG_QUEUE_READY) != 0 {
                m.write(REG_STATUS, S_FAILED);
                return Err("QueueReady is set before the queue was set up");
            }
            let max = m.read(REG_QUEUE_NUM_MAX);
            if max == 0 {
                m.write(REG_STATUS, S_FAILED);
                return Err("QueueNumMax is 0");
            }
            let mut s = 1u16;
            while (s as u32) * 2 <= max && s * 2 <= MAX_QUEUE_SIZE {
                s *= 2;
            }
            size = size.min(s);
        }
        let per_q = Vq::mem_size(size);
        let total = per_q * want_q as u64;
        if self.ring_mem == 0 || self.ring_mem_size < total {
            self.ring_mem = crate::mem::alloc(total, 4096).ok_or("out of memory for the virtqueues")?;
            self.ring_mem_size = total;
        }
        let event_idx = self.has(F_EVENT_IDX);
        let indirect = self.has(F_INDIRECT_DESC);
        for i in 0..want_q {
            let mut q = Vq::new(i as u16, size, self.ring_mem + per_q * i as u64, event_idx, indirect, m);
            q.notify_always = self.notify_always;
            q.set_interrupts(self.irq);
            m.write(REG_QUEUE_SEL, i as u32);
            m.write(REG_QUEUE_NUM, size as u32);
            let w64 = |lo_reg: u64, hi_reg: u64, a: u64| {
                m.write(lo_reg, a as u32);
                m.write(hi_reg, (a >> 32) as u32);
            };
            w64(REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, q.desc_addr());
            w64(REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, q.avail_addr());
            w64(REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, q.used_addr());
            m.write(REG_QUEUE_READY, 1);
            self.qs[i] = Some(q);
        }
        self.nq = want_q;
        m.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let st = self.status();
        if st & S_NEEDS_RESET != 0 {
            return Err("the device set DEVICE_NEEDS_RESET during initialisation");
        }
        if st & S_DRIVER_OK == 0 {
            return Err("DRIVER_OK did not stick");
        }
        Ok(())
    }

    fn read_config(&mut self) -> Result<(), &'static str> {
        let m = self.mmio;
        let c = |off: u64| m.read(REG_CONFIG + off);
        for _ in 0..100 {
            let gen = m.read(REG_CONFIG_GENERATION);
            self.capacity = (c(4) as u64) << 32 | c(0) as u64;
            self.size_max = if self.has(F_SIZE_MAX) { c(8) } else { 0 };
            self.seg_max = if self.has(F_SEG_MAX) { c(12) } else { 0 };
            self.blk_size = if self.has(F_BLK_SIZE) { c(20) } else { 512 };
            self.num_queues = if self.has(F_MQ) { (c(32) >> 16) as u16 } else { 1 };
            if self.has(F_DISCARD) {
                self.max_discard_sectors = c(36);
                self.max_discard_seg = c(40);
                self.discard_sector_alignment = c(44);
            }
            if self.has(F_WRITE_ZEROES) {
                self.max_write_zeroes_sectors = c(48);
                self.max_write_zeroes_seg = c(52);
                self.write_zeroes_may_unmap = m.read8(REG_CONFIG + 56) != 0;
            }
            if m.read(REG_CONFIG_GENERATION) == gen {
                if self.blk_size < 512 || !self.blk_size.is_power_of_two() {
                    self.blk_size = 512;
                }
                return Ok(());
            }
        }
        Err("the config generation kept changing")
    }

    /// Largest data transfer of one request, a multiple of blk_size.
    pub fn max_request(&self) -> u32 {
        let seg = if self.size_max >= 4096 { self.size_max & !4095 } else { MAX_REQUEST };
        let segs = if self.seg_max != 0 { self.seg_max.min((IND_MAX - 2) as u32) } else { (IND_MAX - 2) as u32 };
        let r = (seg as u64 * segs as u64).min(MAX_REQUEST as u64) as u32;
        (r / self.blk_size).max(1) * self.blk_size
    }

    /// Splits `[addr, addr + len)` into buffers no longer than size_max.
    /// Returns how many of `out` it filled; None if they are too few.
    pub fn split(&self, addr: u64, len: u32, write: bool, out: &mut [Buf]) -> Option<usize> {
        let seg = if self.size_max >= 512 { self.size_max } else { u32::MAX };
        let mut n = 0;
        let mut off = 0u32;
        while off < len {
            let l = (len - off).min(seg);
            *out.get_mut(n)? = Buf { addr: addr + off as u64, len: l, write };
            n += 1;
            off += l;
        }
        Some(n)
    }

    /// Submits a read or write of `len` bytes at `sector` on queue `qi`;
    /// None if the queue lacks descriptors (or `len` needs more buffers
    /// than a request takes: see max_request).
    pub fn submit_rw(&mut self, qi: usize, kind: u32, sector: u64, addr: u64, len: u32, tag: u64) -> Option<u16> {
        let mut bufs = [Buf { addr: 0, len: 0, write: false }; (IND_MAX - 2) as usize];
        let n = self.split(addr, len, kind == T_IN || kind == T_GET_ID, &mut bufs)?;
        self.q(qi).submit(kind, sector, &bufs[..n], tag)
    }

    /// Waits for the next completion on queue `qi`.
    pub fn wait(&mut self, qi: usize) -> Result<Done, Stall> {
        self.wait_in(qi, qi + 1).map(|(_, d)| d)
    }

    /// Waits for the next completion on any of the queues `first..end`.
    pub fn wait_in(&mut self, first: usize, end: usize) -> Result<(usize, Done), Stall> {
        let timeout = tsc::ticks_us(self.timeout_ms * 1000);
        let check = tsc::ticks_us(STATUS_CHECK_MS * 1000);
        let start = tsc::now();
        let mut next_check = start.wrapping_add(check);
        loop {
            for qi in first..end {
                if let Some(d) = self.q(qi).poll() {
                    return Ok((qi, d));
                }
            }
            let now = tsc::now();
            if now.wrapping_sub(start) > timeout {
                return Err(if self.status() & S_NEEDS_RESET != 0 { Stall::NeedsReset } else { Stall::Timeout });
            }
            if now.wrapping_sub(next_check) < u64::MAX / 2 {
                if self.status() & S_NEEDS_RESET != 0 {
                    return Err(Stall::NeedsReset);
                }
                next_check = now.wrapping_add(check);
            }
        }
    }

    /// One request, synchronously: submit, kick, wait. Returns the status.
    pub fn sync(&mut self, qi: usize, kind: u32, sector: u64, bufs: &[Buf]) -> Result<Done, Stall> {
        if self.q(qi).submit(kind, sector, bufs, 0).is_none() {
            return Err(Stall::Full);
        }
        self.q(qi).kick();
        self.wait(qi)
    }

    /// Total notifies on all queues.
    pub fn notifies(&self) -> u64 {
        self.qs.iter().flatten().map(|q| q.notifies).sum()
    }
}
