//! virtio-mmio (version 2 registers, virtio 1.x) and split virtqueues,
//! driven by polling.
//!
//! Everything here is plain memory access plus MMIO register reads and
//! writes, so it runs unchanged in ring 0 and ring 3 (user.rs). On PVM
//! hosts each MMIO access is an exit (8-9 µs from ring 0, ~60 µs from
//! ring 3): the hot paths touch only the rings, and notify only when the
//! device asks (VIRTQ_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX).
//! Interrupts are suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT, or a used_event
//! kept half the index space ahead). `blk.notify=always` and `blk.irq=on`
//! turn both on, to measure what they cost the device (the driver still
//! polls, and never takes the interrupts).

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

pub const MAGIC: u32 = 0x7472_6976; // "virt"

// Register offsets.
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

// Device status bits.
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
pub const S_FAILED: u32 = 0x80;

// Transport feature bits.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

// Descriptor flags.
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;

const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// The register window of one virtio-mmio device.
#[derive(Clone, Copy)]
pub struct Mmio(pub u64);

impl Mmio {
    #[inline(always)]
    pub fn read(self, off: u64) -> u32 {
        // SAFETY: identity-mapped device registers named on the command line.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }
    #[inline(always)]
    pub fn write(self, off: u64, v: u32) {
        // SAFETY: as read.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }
    pub fn read8(self, off: u64) -> u8 {
        // SAFETY: as read.
        unsafe { read_volatile((self.0 + off) as *const u8) }
    }
}

/// A full memory barrier without SSE2's mfence (a locked no-op on the
/// stack); orders the avail index store before the notify-suppression
/// loads.
#[inline(always)]
pub fn full_fence() {
    // SAFETY: a locked OR of 0 into the top of the stack changes nothing.
    unsafe { asm!("lock or qword ptr [rsp], 0", options(preserves_flags)) }
}

#[inline(always)]
fn compiler_fence() {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

/// Descriptors per indirect table: header, up to IND_MAX - 2 data
/// segments, status.
pub const IND_MAX: u16 = 16;
const IND_STRIDE: u64 = IND_MAX as u64 * 16;
/// Per-head metadata: request header (16 bytes), status byte at 16, a
/// 16-byte scratch area at 32 (discard segment), tag at 56.
pub const META_STRIDE: u64 = 64;

/// One completed request.
#[derive(Clone, Copy)]
pub struct Done {
    #[allow(dead_code)]
    pub head: u16,
    pub len: u32,
    pub status: u8,
    pub tag: u64,
}

/// A data buffer of a request.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// Written by the device.
    pub write: bool,
}

/// A split virtqueue in guest memory that the driver owns.
pub struct Vq {
    pub index: u16,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    meta: u64,
    ind: u64,
    free_head: u16,
    pub num_free: u16,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    pub event_idx: bool,
    pub indirect: bool,
    notify: Mmio,
    /// Notify register writes so far.
    pub notifies: u64,
    /// Requests made available and not yet used.
    pub inflight: u16,
    /// Raw mode (malformed requests): descriptors are not freed by chain.
    raw: bool,
    /// `blk.notify=always`: `kick` notifies whenever it publishes requests.
    pub notify_always: bool,
    /// `blk.irq=on`: let the device interrupt on every completion.
    pub irq: bool,
}

impl Vq {
    /// Bytes of guest memory a queue of `size` needs (page-aligned parts).
    pub fn mem_size(size: u16) -> u64 {
        let s = size as u64;
        let page = |n: u64| (n + 4095) & !4095;
        page(16 * s) + page(6 + 2 * s) + page(6 + 8 * s) + page(META_STRIDE * s) + page(IND_STRIDE * s)
    }

    /// Lays out a queue in `[mem, mem + mem_size(size))` (zeroed here).
    pub fn new(index: u16, size: u16, mem: u64, event_idx: bool, indirect: bool, mmio: Mmio) -> Vq {
        let s = size as u64;
        let page = |n: u64| (n + 4095) & !4095;
        crate::mem::zero(mem, Self::mem_size(size));
        let desc = mem;
        let avail = desc + page(16 * s);
        let used = avail + page(6 + 2 * s);
        let meta = used + page(6 + 8 * s);
        let ind = meta + page(META_STRIDE * s);
        let mut q = Vq {
            index,
            size,
            desc,
            avail,
            used,
            meta,
            ind,
            free_head: 0,
            num_free: 0,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx,
            indirect,
            notify: mmio,
            notifies: 0,
            inflight: 0,
            raw: false,
            notify_always: false,
            irq: false,
        };
        q.rebuild_free();
        q.set_interrupts(false);
        q
    }

    /// Asks the device for an interrupt on every completion (`on`) or for
    /// none. The driver polls either way and never takes them.
    pub fn set_interrupts(&mut self, on: bool) {
        self.irq = on;
        if self.event_idx {
            self.set_used_event();
        } else {
            let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
            // SAFETY: our ring.
            unsafe { write_volatile(self.avail as *mut u16, flags) };
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.desc
    }
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// Chains all descriptors into the free list (the queue must be idle).
    pub fn rebuild_free(&mut self) {
        for i in 0..self.size {
            self.set_desc(i, 0, 0, 0, i.wrapping_add(1));
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.raw = false;
    }

    #[inline(always)]
    fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * i as u64;
        write_desc(d, addr, len, flags, next);
    }

    #[inline(always)]
    fn desc_next(&self, i: u16) -> (u16, u16) {
        let d = self.desc + 16 * i as u64;
        // SAFETY: our descriptor table.
        unsafe { (read_volatile((d + 12) as *const u16), read_volatile((d + 14) as *const u16)) }
    }

    /// Metadata address of request `head`: header at +0, status at +16,
    /// scratch at +32..+56, tag at +56.
    #[inline(always)]
    pub fn meta(&self, head: u16) -> u64 {
        self.meta + META_STRIDE * head as u64
    }

    /// Descriptors one request with `nbufs` data buffers takes.
    pub fn descs_needed(&self, nbufs: usize) -> u16 {
        if self.indirect {
            1
        } else {
            nbufs as u16 + 2
        }
    }

    /// Requests of `nbufs` buffers that fit in the queue at once.
    pub fn max_inflight(&self, nbufs: usize) -> u16 {
        self.size / self.descs_needed(nbufs)
    }

    /// Builds a request (header, `bufs`, status) and puts it in the avail
    /// ring; visible to the device after `kick`. None if descriptors are
    /// short (reap completions first) or there are too many buffers.
    pub fn submit(&mut self, kind: u32, sector: u64, bufs: &[Buf], tag: u64) -> Option<u16> {
        if bufs.len() > (IND_MAX - 2) as usize || self.raw {
            return None;
        }
        let need = self.descs_needed(bufs.len());
        if self.num_free < need {
            return None;
        }
        let head = self.free_head;
        let m = self.meta(head);
        // SAFETY: our metadata area.
        unsafe {
            write_volatile(m as *mut u32, kind);
            write_volatile((m + 4) as *mut u32, 0);
            write_volatile((m + 8) as *mut u64, sector);
            write_volatile((m + 16) as *mut u8, 0xff); // "not written"
            write_volatile((m + 56) as *mut u64, tag);
        }
        let n = bufs.len() as u16 + 2;
        if self.indirect {
            let (_, next) = self.desc_next(head);
            self.free_head = next;
            self.num_free -= 1;
            let t = self.ind + IND_STRIDE * head as u64;
            write_desc(t, m, 16, DESC_NEXT, 1);
            for (i, b) in bufs.iter().enumerate() {
                let i = i as u16 + 1;
                let flags = DESC_NEXT | if b.write { DESC_WRITE } else { 0 };
                write_desc(t + 16 * i as u64, b.addr, b.len, flags, i + 1);
            }
            write_desc(t + 16 * (n as u64 - 1), m + 16, 1, DESC_WRITE, 0);
            self.set_desc(head, t, 16 * n as u32, DESC_INDIRECT, 0);
        } else {
            // Walk the free list, filling as we go.
            let mut i = head;
            for k in 0..n {
                let (_, next) = self.desc_next(i);
                let last = k == n - 1;
                let (addr, len, mut flags) = if k == 0 {
                    (m, 16, 0)
                } else if last {
                    (m + 16, 1, DESC_WRITE)
                } else {
                    let b = bufs[k as usize - 1];
                    (b.addr, b.len, if b.write { DESC_WRITE } else { 0 })
                };
                if !last {
                    flags |= DESC_NEXT;
                }
                self.set_desc(i, addr, len, flags, next);
                if last {
                    self.free_head = next;
                } else {
                    i = next;
                }
            }
            self.num_free -= n;
        }
        self.publish(head);
        Some(head)
    }

    /// Puts `head` in the avail ring (index published by `kick`).
    fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        // SAFETY: our ring.
        unsafe { write_volatile((self.avail + 4 + 2 * slot as u64) as *mut u16, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.inflight += 1;
    }

    /// Publishes the avail index and notifies the device if it asks for
    /// it (or always, with `notify_always`). Returns true if it notified.
    pub fn kick(&mut self) -> bool {
        let new = self.avail_idx;
        let old = self.kicked_idx;
        if new == old {
            return false;
        }
        compiler_fence();
        // SAFETY: our ring.
        unsafe { write_volatile((self.avail + 2) as *mut u16, new) };
        full_fence();
        self.kicked_idx = new;
        let need = if self.event_idx {
            // avail_event follows the used ring entries.
            let ev = unsafe { read_volatile((self.used + 4 + 8 * self.size as u64) as *const u16) };
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags = unsafe { read_volatile(self.used as *const u16) };
            flags & USED_F_NO_NOTIFY == 0
        };
        if need || self.notify_always {
            self.notify_now();
        }
        need || self.notify_always
    }

    /// Writes the queue index to QueueNotify.
    pub fn notify_now(&mut self) {
        self.notifies += 1;
        self.notify.write(REG_QUEUE_NOTIFY, self.index as u32);
    }

    fn set_used_event(&mut self) {
        // Without interrupts: half the index space ahead, so the device
        // never crosses it before the next update and never interrupts.
        // With them: the next used entry (as Linux's virtqueue_enable_cb).
        let ev = if self.irq { self.last_used } else { self.last_used.wrapping_add(0x8000) };
        // SAFETY: used_event follows the avail ring entries.
        unsafe { write_volatile((self.avail + 4 + 2 * self.size as u64) as *mut u16, ev) };
    }

    /// True if the device has used a request we have not reaped.
    #[inline(always)]
    pub fn has_used(&self) -> bool {
        // SAFETY: our ring.
        unsafe { read_volatile((self.used + 2) as *const u16) != self.last_used }
    }

    /// Reaps one used request, if any.
    pub fn poll(&mut self) -> Option<Done> {
        if !self.has_used() {
            return None;
        }
        compiler_fence();
        let slot = self.last_used % self.size;
        let e = self.used + 4 + 8 * slot as u64;
        // SAFETY: our ring.
        let (id, len) = unsafe { (read_volatile(e as *const u32), read_volatile((e + 4) as *const u32)) };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            self.set_used_event();
        }
        self.inflight = self.inflight.saturating_sub(1);
        let head = (id % self.size as u32) as u16;
        let m = self.meta(head);
        // SAFETY: our metadata area.
        let (status, tag) = unsafe { (read_volatile((m + 16) as *const u8), read_volatile((m + 56) as *const u64)) };
        if !self.raw {
            self.free_chain(head);
        }
        Some(Done { head, len, status, tag })
    }

    fn free_chain(&mut self, head: u16) {
        let mut i = head;
        let mut n = 1;
        loop {
            let (flags, next) = self.desc_next(i);
            if flags & DESC_NEXT == 0 || n >= self.size {
                break;
            }
            i = next % self.size;
            n += 1;
        }
        // Link the chain's tail to the free list.
        let d = self.desc + 16 * i as u64;
        // SAFETY: our descriptor table.
        unsafe {
            write_volatile((d + 12) as *mut u16, 0);
            write_volatile((d + 14) as *mut u16, self.free_head);
        }
        self.free_head = head;
        self.num_free += n;
    }

    // ---- Raw descriptors, for deliberately malformed requests. The queue
    // must be idle; `raw_end` rebuilds the free list once the device has
    // answered (or after a reset).

    pub fn raw_begin(&mut self) -> bool {
        if self.inflight != 0 {
            return false;
        }
        self.raw = true;
        self.num_free = 0;
        true
    }

    pub fn raw_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.set_desc(i, addr, len, flags, next);
    }

    pub fn raw_publish(&mut self, head: u16, kind: u32, sector: u64) {
        let m = self.meta(head);
        // SAFETY: our metadata area.
        unsafe {
            write_volatile(m as *mut u32, kind);
            write_volatile((m + 4) as *mut u32, 0);
            write_volatile((m + 8) as *mut u64, sector);
            write_volatile((m + 16) as *mut u8, 0xff);
            write_volatile((m + 56) as *mut u64, 0);
        }
        self.publish(head);
    }

    pub fn raw_end(&mut self) {
        self.rebuild_free();
    }
}

#[inline(always)]
fn write_desc(d: u64, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: callers pass descriptors in memory we own.
    unsafe {
        write_volatile(d as *mut u64, addr);
        write_volatile((d + 8) as *mut u32, len);
        write_volatile((d + 12) as *mut u16, flags);
        write_volatile((d + 14) as *mut u16, next);
    }
}
