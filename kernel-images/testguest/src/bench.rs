//! `blk.bench=<spec>`: a polling benchmark, run in ring 3 (user.rs) so
//! that on PVM hosts it costs no exits besides the notifies the device
//! asks for. Keeps `blk.qd` requests in flight on each of `blk.queues`
//! queues, reaps completions by polling the used rings (interrupts
//! suppressed), resubmits at once and notifies only when the device asks
//! (VIRTQ_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX), or after every
//! request with `blk.notify=always` (`blk.irq=on` lets the device
//! interrupt, see virtio.rs). Runs for
//! `blk.seconds` (default 3) or `blk.ops` operations, timed with the TSC.

use core::fmt::Write;

use crate::blk::*;
use crate::blk_work::{fill_pattern, rng, Env, Msg, Outcome};
use crate::cmdline::Bench;
use crate::tsc;

macro_rules! fail {
    ($($a:tt)*) => {{
        let mut m = Msg::new();
        let _ = write!(m, $($a)*);
        return Err(m);
    }};
}

/// `num / den` with `decimals` decimals.
fn fixed(m: &mut Msg, num: u128, den: u128, decimals: u32) {
    let den = den.max(1);
    let scale = 10u128.pow(decimals);
    let v = (num * scale + den / 2) / den;
    let _ = write!(m, "{}", v / scale);
    if decimals > 0 {
        let _ = write!(m, ".{:0width$}", v % scale, width = decimals as usize);
    }
}

pub fn run(spec: Bench, dev: &mut Blk, env: &Env, user_mode: bool) -> Outcome {
    let (bs, write, seq) = match spec {
        Bench::RandRead4k => (4096u64, false, false),
        Bench::RandWrite4k => (4096, true, false),
        Bench::SeqRead128k => (128 * 1024, false, true),
        Bench::SeqWrite128k => (128 * 1024, true, true),
    };
    if write && dev.ro() {
        fail!("the device is read-only (VIRTIO_BLK_F_RO)");
    }
    if (dev.max_request() as u64) < bs {
        fail!("requests of {} bytes exceed the device's limits (max {})", bs, dev.max_request());
    }
    let queues = env.opts.queues as usize;
    if queues > dev.nq {
        fail!("blk.queues={} but the device has {} queue(s)", queues, dev.nq);
    }
    let disk = dev.capacity * 512;
    let area = env.opts.bytes.map_or(disk, |b| b.min(disk));
    let blocks = area / bs;
    if blocks == 0 {
        fail!("the disk is smaller than one {}-byte block", bs);
    }
    let nbufs = if dev.size_max >= 512 { (bs as usize).div_ceil(dev.size_max as usize) } else { 1 };
    let qd = (env.opts.qd as u64).min(dev.q(0).max_inflight(nbufs) as u64).max(1);
    let slots = qd * queues as u64;
    let mark = crate::mem::mark();
    let r = (|| {
        let bufs = if slots * bs <= env.scratch_len {
            env.scratch
        } else {
            match crate::mem::alloc(slots * bs, 4096) {
                Some(a) => a,
                None => fail!("out of memory for {} buffers of {} bytes", slots, bs),
            }
        };
        let t_submit = match crate::mem::alloc(slots * 8, 8) {
            Some(a) => a as *mut u64,
            None => fail!("out of memory"),
        };
        if write {
            fill_pattern(bufs, 0, slots * bs / 512, env.seed);
        }
        let kind = if write { T_OUT } else { T_IN };
        let mut rng = rng(env.seed ^ 0x6265_6e63_6800);
        let mut next_seq = 0u64;
        let mut offset = || {
            if seq {
                let b = next_seq;
                next_seq = (next_seq + 1) % blocks;
                b
            } else {
                rng.below(blocks)
            }
        };
        // blk.notify=always: a notify per request, as a driver that
        // ignores the device's suppression and kicks each one.
        let per_request_kick = dev.notify_always;
        let hz = tsc::hz();
        let limit_ops = env.opts.ops;
        let start = tsc::now();
        let end = start.wrapping_add(hz * env.opts.seconds);
        let notifies0 = dev.notifies();
        let (mut submitted, mut completed, mut lat_sum) = (0u64, 0u64, 0u128);
        let mut stopping = false;
        let mut last = start;
        // Prime every queue.
        for q in 0..queues {
            for s in 0..qd {
                if limit_ops.is_some_and(|n| submitted >= n) {
                    break;
                }
                let slot = q as u64 * qd + s;
                let t = tsc::now();
                // SAFETY: slot < slots.
                unsafe { *t_submit.add(slot as usize) = t };
                if dev.submit_rw(q, kind, offset() * bs / 512, bufs + slot * bs, bs as u32, slot).is_none() {
                    fail!("no free descriptors");
                }
                submitted += 1;
                if per_request_kick {
                    dev.q(q).kick();
                }
            }
            dev.q(q).kick();
        }
        let stall_ticks = tsc::ticks_us(dev.timeout_ms * 1000);
        let mut status_checked = start;
        while completed < submitted {
            let mut progress = false;
            for q in 0..queues {
                let mut resubmitted = false;
                while let Some(d) = dev.q(q).poll() {
                    let now = tsc::now();
                    let slot = d.tag;
                    if d.status != S_OK {
                        fail!("request completed with status {}", d.status);
                    }
                    // SAFETY: slot < slots (our tags).
                    lat_sum += now.wrapping_sub(unsafe { *t_submit.add(slot as usize) }) as u128;
                    completed += 1;
                    last = now;
                    progress = true;
                    if !stopping {
                        stopping = limit_ops.map_or(now >= end, |n| submitted >= n);
                    }
                    if !stopping {
                        unsafe { *t_submit.add(slot as usize) = now };
                        if dev.submit_rw(q, kind, offset() * bs / 512, bufs + slot * bs, bs as u32, slot).is_none() {
                            fail!("no free descriptors");
                        }
                        submitted += 1;
                        resubmitted = true;
                        if per_request_kick {
                            dev.q(q).kick();
                        }
                    }
                }
                if resubmitted {
                    dev.q(q).kick();
                }
            }
            if !progress {
                let now = tsc::now();
                let idle = now.wrapping_sub(last);
                // Rarely (each read is an exit): DEVICE_NEEDS_RESET?
                if idle > stall_ticks / 100 && now.wrapping_sub(status_checked) > stall_ticks / 100 {
                    status_checked = now;
                    if dev.status() & crate::virtio::S_NEEDS_RESET != 0 {
                        fail!("{}", Stall::NeedsReset.name());
                    }
                }
                if idle > stall_ticks {
                    fail!("timeout: no completion for {} ms ({} of {} done)", dev.timeout_ms, completed, submitted);
                }
            }
        }
        let ticks = last.wrapping_sub(start).max(1) as u128;
        let hz = hz as u128;
        let notifies = dev.notifies() - notifies0;
        let mut m = Msg::new();
        let _ = write!(m, "qd={} ops={} seconds=", qd, completed);
        fixed(&mut m, ticks, hz, 3);
        let _ = write!(m, " iops=");
        fixed(&mut m, completed as u128 * hz, ticks, 0);
        let _ = write!(m, " mbps=");
        fixed(&mut m, completed as u128 * bs as u128 * hz, ticks * 1_000_000, 1);
        let _ = write!(m, " lat_us=");
        fixed(&mut m, lat_sum * 1_000_000, completed.max(1) as u128 * hz, 1);
        let _ = write!(
            m,
            " notifies={} tsc_hz={} queues={} bs={} mode={} notify={} irq={}",
            notifies,
            hz,
            queues,
            bs,
            if user_mode { "user" } else { "kernel" },
            if dev.notify_always { "always" } else { "auto" },
            if dev.irq { "on" } else { "off" }
        );
        Ok(m)
    })();
    crate::mem::release(mark);
    r
}
