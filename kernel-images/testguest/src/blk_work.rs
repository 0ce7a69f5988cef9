//! The block workloads (`blk=`): verify, random, discard, writezeroes,
//! readonly, checksum, malformed, getid, and the rounds of `durable`
//! (blk_run.rs prints a line after each). Each returns the text after
//! `testguest: blk <name> <dev>: ` (ok/skipped line) or the reason for
//! FAILED; `malformed` also writes one line per case into `out`. They run
//! in ring 3 by default (blk.rs, virtio.rs and this file use no
//! privileged instruction), so they cannot print themselves.

use core::fmt::Write;

use crate::blk::*;
use crate::cmdline::BlkOptions;
use crate::text::Text;
use crate::tsc;
use crate::virtio::{Buf, DESC_NEXT, DESC_WRITE};

pub type Msg = Text<200>;
/// Lines a workload adds before its result line (malformed's cases).
pub type Out = Text<2048>;

macro_rules! msg {
    ($($a:tt)*) => {{
        let mut m = Msg::new();
        let _ = write!(m, $($a)*);
        m
    }};
}
macro_rules! fail {
    ($($a:tt)*) => { return Err(msg!($($a)*)) };
}

/// What the workloads share.
pub struct Env<'a> {
    pub opts: &'a BlkOptions,
    pub seed: u64,
    /// A scratch buffer of `scratch_len` bytes (page aligned).
    pub scratch: u64,
    pub scratch_len: u64,
    /// End of the highest memory map entry: `malformed` points a buffer
    /// beyond it.
    pub top_of_memory: u64,
}

pub type Outcome = Result<Msg, Msg>;

const SECTOR: u64 = 512;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

// Seeds are salted per workload, so one workload's data never passes
// another's check.
const SALT_VERIFY: u64 = 0x7665_7269_6679_0001;
const SALT_RANDOM: u64 = 0x7261_6e64_6f6d_0002;
const SALT_ZERO: u64 = 0x7a65_726f_0000_0003;
const SALT_DURABLE: u64 = 0x6475_7261_626c_0004;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64-bit word `w` (0..64) of sector `sector` of pattern `seed`:
/// every word depends on the seed, the sector and its position, and is
/// never 0 (so zeroed ranges can be told apart).
#[inline(always)]
fn pattern_key(seed: u64, sector: u64) -> u64 {
    splitmix(seed ^ sector.wrapping_mul(0xd1b5_4a32_d192_ed03))
}

pub fn fill_pattern(buf: u64, first_sector: u64, sectors: u64, seed: u64) {
    let p = buf as *mut u64;
    for s in 0..sectors {
        let k = pattern_key(seed, first_sector + s);
        for w in 0..64u64 {
            // SAFETY: callers pass buffers of `sectors` * 512 bytes.
            unsafe { p.add((s * 64 + w) as usize).write_volatile((k ^ w.wrapping_mul(GOLDEN)) | 1) };
        }
    }
}

/// Compares; on a mismatch returns (byte offset in buf, read, expected).
pub fn check_pattern(buf: u64, first_sector: u64, sectors: u64, seed: u64) -> Result<(), (u64, u64, u64)> {
    let p = buf as *const u64;
    for s in 0..sectors {
        let k = pattern_key(seed, first_sector + s);
        for w in 0..64u64 {
            let want = (k ^ w.wrapping_mul(GOLDEN)) | 1;
            // SAFETY: as fill_pattern.
            let got = unsafe { p.add((s * 64 + w) as usize).read_volatile() };
            if got != want {
                return Err(((s * 64 + w) * 8, got, want));
            }
        }
    }
    Ok(())
}

/// Offset of the first non-zero word in `[buf, buf + len)`.
fn find_nonzero(buf: u64, len: u64) -> Option<u64> {
    let p = buf as *const u64;
    (0..len / 8).find(|&i| unsafe { p.add(i as usize).read_volatile() } != 0).map(|i| i * 8)
}

fn poison(buf: u64, len: u64) {
    // SAFETY: the caller's buffer.
    unsafe { core::ptr::write_bytes(buf as *mut u8, 0xa5, len as usize) }
}

fn stall(what: &str, s: Stall) -> Msg {
    msg!("{}: {}", what, s.name())
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        T_IN => "read",
        T_OUT => "write",
        T_FLUSH => "flush",
        T_GET_ID => "get-id",
        T_DISCARD => "discard",
        T_WRITE_ZEROES => "write-zeroes",
        _ => "request",
    }
}

/// Reads or writes `[first_sector * 512, + bytes)` from/to `buf` on queue
/// 0 with up to 8 requests of max_request() in flight.
fn bulk(dev: &mut Blk, kind: u32, first_sector: u64, buf: u64, bytes: u64) -> Result<(), Msg> {
    let req = dev.max_request() as u64;
    let depth = 8.min(dev.q(0).max_inflight(1) as usize).max(1) as u16;
    let mut off = 0u64;
    loop {
        while off < bytes && dev.q(0).inflight < depth {
            let len = req.min(bytes - off);
            match dev.submit_rw(0, kind, first_sector + off / SECTOR, buf + off, len as u32, off) {
                Some(_) => off += len,
                None => break,
            }
        }
        dev.q(0).kick();
        if dev.q(0).inflight == 0 {
            if off < bytes {
                fail!("a {}-byte request does not fit in the queue", req.min(bytes - off));
            }
            return Ok(());
        }
        let d = dev.wait(0).map_err(|s| stall(kind_name(kind), s))?;
        if d.status != S_OK {
            fail!(
                "{} at byte {} completed with status {}",
                kind_name(kind),
                first_sector * SECTOR + d.tag,
                d.status
            );
        }
    }
}

fn flush(dev: &mut Blk) -> Result<(), Msg> {
    if !dev.has(F_FLUSH) {
        return Ok(());
    }
    let d = dev.sync(0, T_FLUSH, 0, &[]).map_err(|s| stall("flush", s))?;
    if d.status != S_OK {
        fail!("flush completed with status {}", d.status);
    }
    Ok(())
}

/// Bytes the workloads use: blk.bytes if given (capped at the disk),
/// rounded down to `unit`.
fn area(dev: &Blk, env: &Env, unit: u64) -> u64 {
    let disk = dev.capacity * SECTOR;
    let b = env.opts.bytes.map_or(disk, |b| b.min(disk));
    b / unit * unit
}

pub fn run(w: crate::cmdline::Work, dev: &mut Blk, env: &Env, out: &mut Out) -> Outcome {
    use crate::cmdline::Work::*;
    let t0 = tsc::now();
    let r = match w {
        Verify => verify(dev, env),
        Random => random(dev, env),
        Discard => zeroing(dev, env, T_DISCARD),
        WriteZeroes => zeroing(dev, env, T_WRITE_ZEROES),
        ReadOnly => readonly(dev, env),
        Checksum => checksum(dev, env),
        Malformed => malformed(dev, env, out),
        GetId => return getid(dev, env),
        // Round by round from blk_run.rs, which prints between rounds.
        Durable => fail!("durable runs round by round"),
    };
    // "ok" lines end with the workload's time.
    r.map(|mut m| {
        if m.as_bytes().starts_with(b"ok") {
            let ms = tsc::now().wrapping_sub(t0) / (tsc::hz() / 1000).max(1);
            let _ = write!(m, " ms={}", ms);
        }
        m
    })
}

fn verify(dev: &mut Blk, env: &Env) -> Outcome {
    if dev.ro() {
        fail!("the device is read-only (VIRTIO_BLK_F_RO)");
    }
    let bytes = area(dev, env, dev.blk_size as u64);
    if bytes == 0 {
        fail!("nothing to verify (capacity {} sectors)", dev.capacity);
    }
    let chunk = env.scratch_len / dev.blk_size as u64 * dev.blk_size as u64;
    let seed = env.seed ^ SALT_VERIFY;
    let mut off = 0;
    while off < bytes {
        let len = chunk.min(bytes - off);
        fill_pattern(env.scratch, off / SECTOR, len / SECTOR, seed);
        bulk(dev, T_OUT, off / SECTOR, env.scratch, len)?;
        off += len;
    }
    flush(dev)?;
    off = 0;
    while off < bytes {
        let len = chunk.min(bytes - off);
        poison(env.scratch, len);
        bulk(dev, T_IN, off / SECTOR, env.scratch, len)?;
        if let Err((at, got, want)) = check_pattern(env.scratch, off / SECTOR, len / SECTOR, seed) {
            fail!(
                "mismatch at byte {} (sector {}): read {:#018x}, expected {:#018x}",
                off + at,
                (off + at) / SECTOR,
                got,
                want
            );
        }
        off += len;
    }
    Ok(msg!("ok bytes={} seed={:#x}", bytes, env.seed))
}

/// xorshift64*
pub struct Rng(u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next() >> 32) * n) >> 32
    }
}

pub fn rng(seed: u64) -> Rng {
    Rng(splitmix(seed) | 1)
}

const BLOCK: u64 = 4096;

fn random(dev: &mut Blk, env: &Env) -> Outcome {
    if dev.ro() {
        fail!("the device is read-only (VIRTIO_BLK_F_RO)");
    }
    let queues = env.opts.queues as usize;
    if queues > dev.nq {
        fail!("blk.queues={} but the device has {} queue(s)", queues, dev.nq);
    }
    let blocks = area(dev, env, BLOCK) / BLOCK;
    let per_q_max = dev.q(0).max_inflight(1) as u64;
    // Keep at most half the blocks busy, so a free block is easy to find.
    let qd = (env.opts.qd as u64).min(per_q_max).min(blocks / 2 / queues as u64);
    if qd == 0 {
        fail!("the disk is too small ({} blocks of 4 KiB)", blocks);
    }
    let slots = queues as u64 * qd;
    if slots * BLOCK > env.scratch_len {
        fail!("not enough scratch memory for {} requests", slots);
    }
    let ops = env.opts.ops.unwrap_or(1000);
    let mark = crate::mem::mark();
    let r = (|| {
        // Per block: the version last written (0: not written by us; its
        // contents are unknown) and a busy flag (a request in flight).
        let versions = crate::mem::alloc(blocks * 4, 8).ok_or_else(|| msg!("out of memory"))? as *mut u32;
        let busy = crate::mem::alloc(blocks, 8).ok_or_else(|| msg!("out of memory"))? as *mut u8;
        // Per slot: block, version being written (0 for a read).
        let slot_block = crate::mem::alloc(slots * 8, 8).ok_or_else(|| msg!("out of memory"))? as *mut u64;
        let slot_ver = crate::mem::alloc(slots * 4, 8).ok_or_else(|| msg!("out of memory"))? as *mut u32;
        let free = crate::mem::alloc(slots * 4, 8).ok_or_else(|| msg!("out of memory"))? as *mut u32;
        crate::mem::zero(versions as u64, blocks * 4);
        crate::mem::zero(busy as u64, blocks);
        // SAFETY (all raw accesses below): indices are bounded by blocks
        // and slots, the sizes allocated above.
        let mut nfree = [0u64; crate::blk::MAX_QUEUES];
        for q in 0..queues {
            for s in 0..qd {
                unsafe { *free.add((q as u64 * qd + s) as usize) = (q as u64 * qd + s) as u32 };
            }
            nfree[q] = qd;
        }
        let mut rng = rng(env.seed ^ SALT_RANDOM);
        let (mut submitted, mut completed) = (0u64, 0u64);
        let (mut reads, mut writes, mut verified) = (0u64, 0u64, 0u64);
        while completed < ops {
            for q in 0..queues {
                while nfree[q] > 0 && submitted < ops {
                    let mut b = rng.below(blocks);
                    let mut tries = 0;
                    while unsafe { *busy.add(b as usize) } != 0 && tries < 64 {
                        b = rng.below(blocks);
                        tries += 1;
                    }
                    if unsafe { *busy.add(b as usize) } != 0 {
                        break;
                    }
                    nfree[q] -= 1;
                    let slot = unsafe { *free.add((q as u64 * qd + nfree[q]) as usize) } as u64;
                    let buf = env.scratch + slot * BLOCK;
                    let write = rng.next() & 1 != 0;
                    let ver = if write {
                        let v = unsafe { *versions.add(b as usize) }.wrapping_add(1).max(1);
                        fill_pattern(buf, b * 8, 8, env.seed ^ SALT_RANDOM ^ (v as u64).wrapping_mul(GOLDEN));
                        v
                    } else {
                        poison(buf, BLOCK);
                        0
                    };
                    unsafe {
                        *slot_block.add(slot as usize) = b;
                        *slot_ver.add(slot as usize) = ver;
                        *busy.add(b as usize) = 1;
                    }
                    let kind = if write { T_OUT } else { T_IN };
                    if dev.submit_rw(q, kind, b * 8, buf, BLOCK as u32, slot).is_none() {
                        fail!("no free descriptors with {} requests in flight", dev.q(q).inflight);
                    }
                    submitted += 1;
                }
                dev.q(q).kick();
            }
            let (q, d) = dev.wait_in(0, queues).map_err(|s| stall("random", s))?;
            let slot = d.tag;
            let b = unsafe { *slot_block.add(slot as usize) };
            let ver = unsafe { *slot_ver.add(slot as usize) };
            let kind = if ver != 0 { "write" } else { "read" };
            if d.status != S_OK {
                fail!("{} of block {} (sector {}) completed with status {}", kind, b, b * 8, d.status);
            }
            if ver != 0 {
                unsafe { *versions.add(b as usize) = ver };
                writes += 1;
            } else {
                reads += 1;
                let v = unsafe { *versions.add(b as usize) };
                if v != 0 {
                    let buf = env.scratch + slot * BLOCK;
                    if let Err((at, got, want)) =
                        check_pattern(buf, b * 8, 8, env.seed ^ SALT_RANDOM ^ (v as u64).wrapping_mul(GOLDEN))
                    {
                        fail!(
                            "read of block {} (byte {}) returned {:#018x}, expected {:#018x} (version {})",
                            b,
                            b * BLOCK + at,
                            got,
                            want,
                            v
                        );
                    }
                    verified += 1;
                }
            }
            unsafe {
                *busy.add(b as usize) = 0;
                *free.add((q as u64 * qd + nfree[q]) as usize) = slot as u32;
            }
            nfree[q] += 1;
            completed += 1;
        }
        Ok(msg!(
            "ok ops={} qd={} queues={} reads={} writes={} verified={} notifies={}",
            completed,
            qd,
            queues,
            reads,
            writes,
            verified,
            dev.notifies()
        ))
    })();
    crate::mem::release(mark);
    r
}

/// discard / writezeroes: pattern over a range, zero sub-ranges, read
/// back: sub-ranges zero, the rest intact.
fn zeroing(dev: &mut Blk, env: &Env, kind: u32) -> Outcome {
    let (feature, max_sectors, align) = if kind == T_DISCARD {
        (F_DISCARD, dev.max_discard_sectors, dev.discard_sector_alignment)
    } else {
        (F_WRITE_ZEROES, dev.max_write_zeroes_sectors, 0)
    };
    if !dev.has(feature) {
        return Ok(msg!("skipped (feature not offered)"));
    }
    if dev.ro() {
        fail!("the device is read-only (VIRTIO_BLK_F_RO)");
    }
    // Unit: 32 KiB, or the discard alignment / block size if larger.
    let bs_sectors = dev.blk_size as u64 / SECTOR;
    let mut unit = 64u64.max(align as u64).max(bs_sectors);
    unit = unit.div_ceil(bs_sectors) * bs_sectors;
    // discard: [unit, 3 unit) of 4 units; writezeroes: [unit, 2 unit)
    // without UNMAP and [3 unit, 4 unit) with UNMAP, of 5 units.
    let ranges: &[(u64, u64, u32)] = if kind == T_DISCARD {
        &[(1, 2, 0)]
    } else {
        &[(1, 1, 0), (3, 1, 1)]
    };
    let units = if kind == T_DISCARD { 4 } else { 5 };
    let sectors = units * unit;
    if sectors > dev.capacity {
        return Ok(msg!("skipped (the disk is smaller than {} sectors)", sectors));
    }
    if sectors * SECTOR + 4096 > env.scratch_len {
        fail!("not enough scratch memory for {} sectors", sectors);
    }
    let seed = env.seed ^ SALT_ZERO ^ kind as u64;
    let buf = env.scratch;
    let seg = env.scratch + sectors * SECTOR;
    fill_pattern(buf, 0, sectors, seed);
    bulk(dev, T_OUT, 0, buf, sectors * SECTOR)?;
    for &(start, len, flags) in ranges {
        let (mut s, end) = (start * unit, (start + len) * unit);
        while s < end {
            let n = if max_sectors != 0 { (end - s).min(max_sectors as u64) } else { end - s };
            // struct virtio_blk_discard_write_zeroes
            unsafe {
                core::ptr::write_volatile(seg as *mut u64, s);
                core::ptr::write_volatile((seg + 8) as *mut u32, n as u32);
                core::ptr::write_volatile((seg + 12) as *mut u32, flags);
            }
            let d = dev
                .sync(0, kind, 0, &[Buf { addr: seg, len: 16, write: false }])
                .map_err(|e| stall(kind_name(kind), e))?;
            if d.status != S_OK {
                fail!(
                    "{} of sectors {}..{}{} completed with status {}",
                    kind_name(kind),
                    s,
                    s + n,
                    if flags != 0 { " (UNMAP)" } else { "" },
                    d.status
                );
            }
            s += n;
        }
    }
    flush(dev)?;
    poison(buf, sectors * SECTOR);
    bulk(dev, T_IN, 0, buf, sectors * SECTOR)?;
    for u in 0..units {
        let zeroed = ranges.iter().find(|r| u >= r.0 && u < r.0 + r.1);
        let ubuf = buf + u * unit * SECTOR;
        match zeroed {
            Some(&(_, _, flags)) => {
                if let Some(at) = find_nonzero(ubuf, unit * SECTOR) {
                    let byte = u * unit * SECTOR + at;
                    let stale = check_pattern(ubuf + at / SECTOR * SECTOR, byte / SECTOR, 1, seed).is_ok();
                    fail!(
                        "{}{} range reads back non-zero at byte {} (sector {}){}",
                        kind_name(kind),
                        if flags != 0 { " (UNMAP)" } else { "" },
                        byte,
                        byte / SECTOR,
                        if stale { ": the old data is still there (did the device ignore it?)" } else { "" }
                    );
                }
            }
            None => {
                if let Err((at, got, want)) = check_pattern(ubuf, u * unit, unit, seed) {
                    let byte = u * unit * SECTOR + at;
                    fail!(
                        "data outside the {} range changed at byte {} (sector {}): read {:#018x}, expected {:#018x}",
                        kind_name(kind),
                        byte,
                        byte / SECTOR,
                        got,
                        want
                    );
                }
            }
        }
    }
    if kind == T_DISCARD {
        Ok(msg!("ok sectors={}+{}", unit, 2 * unit))
    } else {
        Ok(msg!("ok sectors={}+{} unmap_sectors={}+{}", unit, unit, 3 * unit, unit))
    }
}

fn readonly(dev: &mut Blk, env: &Env) -> Outcome {
    if !dev.ro() {
        fail!("the device does not offer VIRTIO_BLK_F_RO");
    }
    let len = dev.blk_size;
    let buf = [Buf { addr: env.scratch, len, write: true }];
    let d = dev.sync(0, T_IN, 0, &buf).map_err(|s| stall("read", s))?;
    if d.status != S_OK {
        fail!("read of sector 0 completed with status {}", d.status);
    }
    // Write back what was read: harmless even if the device took it.
    let buf = [Buf { addr: env.scratch, len, write: false }];
    let d = dev.sync(0, T_OUT, 0, &buf).map_err(|s| stall("write", s))?;
    if d.status != S_IOERR {
        fail!("write to sector 0 completed with status {} (expected 1, IOERR)", d.status);
    }
    Ok(msg!("ok write_status={}", d.status))
}

fn checksum(dev: &mut Blk, env: &Env) -> Outcome {
    let bytes = dev.capacity * SECTOR;
    let chunk = env.scratch_len / 4096 * 4096;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut off = 0;
    while off < bytes {
        let len = chunk.min(bytes - off);
        bulk(dev, T_IN, off / SECTOR, env.scratch, len)?;
        // SAFETY: the scratch buffer, just filled.
        let data = unsafe { core::slice::from_raw_parts(env.scratch as *const u8, len as usize) };
        for &b in data {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        off += len;
    }
    Ok(msg!("fnv1a64={:016x} bytes={}", h, bytes))
}

fn getid(dev: &mut Blk, env: &Env) -> Outcome {
    const ID_BYTES: usize = 20;
    crate::mem::zero(env.scratch, ID_BYTES as u64);
    let d = dev
        .sync(0, T_GET_ID, 0, &[Buf { addr: env.scratch, len: ID_BYTES as u32, write: true }])
        .map_err(|s| stall("get-id", s))?;
    if d.status != S_OK {
        fail!("GET_ID completed with status {}", d.status);
    }
    // SAFETY: the scratch buffer.
    let id = unsafe { core::slice::from_raw_parts(env.scratch as *const u8, ID_BYTES) };
    let len = id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
    let mut m = msg!("id=");
    for &b in &id[..len] {
        if (0x21..0x7f).contains(&b) && b != b'\\' {
            m.push_bytes(&[b]);
        } else {
            let _ = write!(m, "\\x{:02x}", b);
        }
    }
    Ok(m)
}

// ---- durable

/// Sectors one `durable` round writes: 24 KiB, part of a 64 KiB qcow2
/// cluster (so an overlay copies the rest up from its backing file) and
/// several whole 512-byte ones.
pub const DURABLE_SECTORS: u64 = 48;

/// The order of `durable`'s rounds: round `r` writes chunk
/// `(start + r * stride) % chunks`, every chunk once, scattered over the
/// area (a stride coprime with the count) and starting where the seed
/// says, so a second run on the same image allocates elsewhere first.
pub struct DurablePlan {
    pub chunks: u64,
    start: u64,
    stride: u64,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

pub fn durable_plan(dev: &Blk, env: &Env) -> Result<DurablePlan, Msg> {
    if dev.ro() {
        fail!("the device is read-only (VIRTIO_BLK_F_RO)");
    }
    if !dev.has(F_FLUSH) {
        fail!("the device does not offer FLUSH, so nothing can be reported durable");
    }
    let chunks = area(dev, env, DURABLE_SECTORS * SECTOR) / (DURABLE_SECTORS * SECTOR);
    if chunks == 0 {
        fail!("the area holds no {}-byte chunk", DURABLE_SECTORS * SECTOR);
    }
    let mut stride = (chunks * 5 / 8) | 1;
    while gcd(stride, chunks) != 1 {
        stride += 2;
    }
    Ok(DurablePlan { chunks, start: splitmix(env.seed) % chunks, stride: stride % chunks })
}

/// Round `r`: writes its chunk with the pattern, then FLUSH; returns the
/// chunk's first sector. Only once this returns may the round be called
/// durable.
pub fn durable_round(dev: &mut Blk, env: &Env, plan: &DurablePlan, r: u64) -> Result<u64, Msg> {
    let chunk = (plan.start + (r % plan.chunks) * plan.stride) % plan.chunks;
    let first = chunk * DURABLE_SECTORS;
    fill_pattern(env.scratch, first, DURABLE_SECTORS, env.seed ^ SALT_DURABLE);
    bulk(dev, T_OUT, first, env.scratch, DURABLE_SECTORS * SECTOR)?;
    flush(dev)?;
    Ok(first)
}

/// After the last round: every chunk written reads back with its pattern.
pub fn durable_check(dev: &mut Blk, env: &Env, plan: &DurablePlan, rounds: u64) -> Outcome {
    let len = DURABLE_SECTORS * SECTOR;
    for r in 0..rounds {
        let chunk = (plan.start + (r % plan.chunks) * plan.stride) % plan.chunks;
        let first = chunk * DURABLE_SECTORS;
        poison(env.scratch, len);
        bulk(dev, T_IN, first, env.scratch, len)?;
        if let Err((at, got, want)) = check_pattern(env.scratch, first, DURABLE_SECTORS, env.seed ^ SALT_DURABLE) {
            fail!(
                "round {} mismatch at byte {} (sector {}): read {:#018x}, expected {:#018x}",
                r,
                first * SECTOR + at,
                first + at / SECTOR,
                got,
                want
            );
        }
    }
    Ok(msg!("ok rounds={} bytes={} seed={:#x}", rounds, rounds * len, env.seed))
}

// ---- malformed

#[derive(Clone, Copy, PartialEq)]
enum Case {
    OutsideRam,
    Loop,
    TooLong,
    NextOutOfRange,
    HeaderWritable,
    PastEnd,
    UnknownType,
    NoStatus,
    StatusReadOnly,
    WriteNothingWritable,
    MergedDataStatus,
    SplitHeader,
}

const CASES: [(Case, &str); 12] = [
    (Case::OutsideRam, "buffer-outside-ram"),
    (Case::Loop, "descriptor-loop"),
    (Case::TooLong, "chain-longer-than-queue"),
    (Case::NextOutOfRange, "next-out-of-range"),
    (Case::HeaderWritable, "header-device-writable"),
    (Case::PastEnd, "read-past-end"),
    (Case::UnknownType, "unknown-type"),
    (Case::NoStatus, "no-status"),
    (Case::StatusReadOnly, "status-not-writable"),
    (Case::WriteNothingWritable, "write-nothing-writable"),
    (Case::MergedDataStatus, "data-and-status-in-one-descriptor"),
    (Case::SplitHeader, "header-in-two-descriptors"),
];

/// What the device must do with a case.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// Answer with an error status, or go to DEVICE_NEEDS_RESET.
    Error,
    /// Go to DEVICE_NEEDS_RESET: there is nowhere to put a status.
    Reset,
    /// Serve it (virtio 1.x lets a driver frame a request any way).
    Served,
}

fn expect(case: Case) -> Expect {
    match case {
        Case::NoStatus | Case::StatusReadOnly | Case::WriteNothingWritable => Expect::Reset,
        Case::MergedDataStatus | Case::SplitHeader => Expect::Served,
        _ => Expect::Error,
    }
}

fn malformed(dev: &mut Blk, env: &Env, out: &mut Out) -> Outcome {
    let name = dev.name;
    let name = core::str::from_utf8(&name).unwrap_or("vd?");
    let outside = (env.top_of_memory.max(1 << 32) + (1 << 30) - 1) / (1 << 30) * (1 << 30) + (1 << 30);
    let saved_timeout = dev.timeout_ms;
    // The device either answers at once or never: don't wait long.
    dev.timeout_ms = saved_timeout.min(2000);
    let mut bad: Option<Msg> = None;
    let mut resets = 0;
    for (case, cname) in CASES {
        let size = dev.q(0).size;
        let bs = dev.blk_size;
        let q = dev.q(0);
        if !q.raw_begin() {
            bad = Some(msg!("{}: the queue is not idle", cname));
            break;
        }
        let hdr = q.meta(0);
        let status = hdr + 16;
        let data = env.scratch;
        let (kind, sector) = match case {
            Case::PastEnd => (T_IN, dev.capacity),
            Case::UnknownType => (0xff, 0),
            Case::WriteNothingWritable => (T_OUT, 0),
            _ => (T_IN, 0),
        };
        // Where the status byte is, and the used length a served request has.
        let mut status_at = status;
        let served_len = bs + 1;
        let q = dev.q(0);
        match case {
            Case::OutsideRam => {
                // Two pages: a device model that bounces one page of
                // non-RAM (QEMU) cannot take it silently.
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                q.raw_desc(1, outside, 8192, DESC_NEXT | DESC_WRITE, 2);
                q.raw_desc(2, status, 1, DESC_WRITE, 0);
            }
            Case::Loop => {
                // header -> data -> data -> the first data again.
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                q.raw_desc(1, data, 512, DESC_NEXT | DESC_WRITE, 2);
                q.raw_desc(2, data + 512, 512, DESC_NEXT | DESC_WRITE, 1);
            }
            Case::TooLong => {
                // 0 -> 1 -> ... -> size-1 -> 1 -> ...: every descriptor of
                // the table and on, more than `size` in one chain (all
                // device-writable after the header, so only the length is
                // wrong).
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                for i in 1..size {
                    let next = if i + 1 == size { 1 } else { i + 1 };
                    q.raw_desc(i, data + 512 * i as u64, 512, DESC_NEXT | DESC_WRITE, next);
                }
            }
            Case::NextOutOfRange => {
                q.raw_desc(0, hdr, 16, DESC_NEXT, size);
            }
            Case::HeaderWritable => {
                q.raw_desc(0, hdr, 16, DESC_NEXT | DESC_WRITE, 1);
                q.raw_desc(1, data, 512, DESC_NEXT | DESC_WRITE, 2);
                q.raw_desc(2, status, 1, DESC_WRITE, 0);
            }
            Case::PastEnd => {
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                q.raw_desc(1, data, bs, DESC_NEXT | DESC_WRITE, 2);
                q.raw_desc(2, status, 1, DESC_WRITE, 0);
            }
            Case::UnknownType => {
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                q.raw_desc(1, status, 1, DESC_WRITE, 0);
            }
            Case::NoStatus => {
                q.raw_desc(0, hdr, 16, 0, 0);
            }
            Case::StatusReadOnly => {
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                q.raw_desc(1, data, bs, DESC_NEXT | DESC_WRITE, 2);
                q.raw_desc(2, status, 1, 0, 0);
            }
            Case::WriteNothingWritable => {
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                q.raw_desc(1, data, bs, DESC_NEXT, 2);
                q.raw_desc(2, status, 1, 0, 0);
            }
            Case::MergedDataStatus => {
                q.raw_desc(0, hdr, 16, DESC_NEXT, 1);
                q.raw_desc(1, data, bs + 1, DESC_WRITE, 0);
                status_at = data + bs as u64;
            }
            Case::SplitHeader => {
                q.raw_desc(0, hdr, 7, DESC_NEXT, 1);
                q.raw_desc(1, hdr + 7, 9, DESC_NEXT, 2);
                q.raw_desc(2, data, bs, DESC_NEXT | DESC_WRITE, 3);
                q.raw_desc(3, status, 1, DESC_WRITE, 0);
            }
        }
        q.raw_publish(0, kind, sector);
        // A status the device never writes reads as this; a stale OK
        // would hide a request the device did not serve.
        // SAFETY: our metadata area or our scratch buffer.
        unsafe { core::ptr::write_volatile(status_at as *mut u8, 0xff) };
        q.kick();
        let r = dev.wait(0);
        let _ = write!(out, "testguest: blk malformed {}: {}: ", name, cname);
        let mut reinit = false;
        match r {
            Ok(d) => {
                // SAFETY: as above.
                let st = unsafe { core::ptr::read_volatile(status_at as *const u8) };
                let _ = writeln!(out, "status={} len={}", st, d.len);
                let good = match (expect(case), case) {
                    (Expect::Reset, _) => false,
                    (Expect::Served, _) => st == S_OK && d.len == served_len,
                    (_, Case::UnknownType) => st == S_UNSUPP,
                    _ => st == S_IOERR || st == S_UNSUPP,
                };
                if !good && bad.is_none() {
                    bad = Some(msg!("{}: status {} len {}", cname, st, d.len));
                }
                dev.q(0).raw_end();
            }
            Err(Stall::NeedsReset) => {
                let _ = writeln!(out, "needs_reset");
                if expect(case) == Expect::Served && bad.is_none() {
                    bad = Some(msg!("{}: needs_reset for a request virtio 1.x allows", cname));
                }
                reinit = true;
            }
            Err(s) => {
                let _ = writeln!(out, "{}", s.name());
                if bad.is_none() {
                    bad = Some(msg!("{}: {}", cname, s.name()));
                }
                reinit = true;
            }
        }
        if reinit {
            resets += 1;
            if let Err(e) = dev.init() {
                dev.timeout_ms = saved_timeout;
                fail!("{}: re-initialisation after a reset failed: {}", cname, e);
            }
        }
        // A good read must still work.
        poison(data, 4096);
        let good = dev.sync(0, T_IN, 0, &[Buf { addr: data, len: 4096, write: true }]);
        match good {
            Ok(d) if d.status == S_OK => {}
            Ok(d) => {
                dev.timeout_ms = saved_timeout;
                fail!("{}: the read after it completed with status {}", cname, d.status);
            }
            Err(s) => {
                dev.timeout_ms = saved_timeout;
                fail!("{}: the read after it: {}", cname, s.name());
            }
        }
    }
    dev.timeout_ms = saved_timeout;
    match bad {
        Some(b) => Err(b),
        None => Ok(msg!("ok resets={}", resets)),
    }
}
