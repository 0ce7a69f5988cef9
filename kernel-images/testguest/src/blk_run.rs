//! `blk=` / `blk.bench=`: probes the virtio-mmio devices named on the
//! command line, initialises the block devices (vda, vdb, ... in token
//! order, counting block devices only) and runs the workloads and
//! benchmarks, printing one line per result. Returns true if anything
//! FAILED.

use crate::blk::{Blk, DEVICE_ID_BLOCK};
use crate::blk_work::{self, Env, Out};
use crate::cmdline::{BlkOptions, MAX_DEVICES};
use crate::serial::{put, put_bytes, put_dec};
use crate::text::Text;
use crate::virtio::{self, Mmio, F_EVENT_IDX, F_INDIRECT_DESC};
use crate::{bench, mem, pvh, tsc, user};
use core::fmt::Write;

/// Scratch buffer for the workloads (and the benchmark's buffers).
const SCRATCH: u64 = 4 << 20;

fn put_hex(v: u64) {
    let mut t = Text::<16>::new();
    let _ = write!(t, "{:x}", v);
    put_bytes(t.as_bytes());
}

pub fn run(opts: &BlkOptions, info: Option<&pvh::StartInfo>) -> bool {
    let mut failed = false;
    let (hz, source) = tsc::calibrate();
    put("testguest: blk tsc_hz=");
    put_dec(hz);
    put(" source=");
    put(source);
    put("\n");

    let end = info.and_then(|i| i.ram_region_containing(mem::kernel_end())).map(|r| r.1);
    let Some(end) = end else {
        put("testguest: blk: FAILED no RAM above the image in the PVH memory map\n");
        return true;
    };
    mem::init(mem::kernel_end(), end);
    let top = info.map_or(0, |i| i.top_of_memory());

    // Probe. Slots are block devices in order (vda = index 0).
    const NONE: Option<Blk> = None;
    let mut devs: [Option<Blk>; MAX_DEVICES] = [NONE; MAX_DEVICES];
    let mut nblk = 0usize;
    let masked = if opts.event_idx { 0 } else { F_EVENT_IDX } | if opts.indirect { 0 } else { F_INDIRECT_DESC };
    for d in opts.devices.iter().flatten() {
        let m = Mmio(d.base);
        if d.size < 0x100 || m.read(virtio::REG_MAGIC) != virtio::MAGIC {
            put("testguest: warning: no virtio-mmio device at 0x");
            put_hex(d.base);
            put("\n");
            continue;
        }
        if m.read(virtio::REG_DEVICE_ID) != DEVICE_ID_BLOCK {
            continue; // not a block device (0: an empty slot)
        }
        let name = [b'v', b'd', b'a' + nblk as u8];
        let idx = nblk;
        nblk += 1;
        put("testguest: blk ");
        put_bytes(&name);
        put(": ");
        let version = m.read(virtio::REG_VERSION);
        if version != 2 {
            put("FAILED virtio-mmio version ");
            put_dec(version as u64);
            put(if version == 1 { " (legacy; QEMU needs -global virtio-mmio.force-legacy=false)\n" } else { "\n" });
            failed = true;
            continue;
        }
        let mut blk = Blk::new(name, d.base, masked, opts.timeout_s * 1000);
        blk.notify_always = opts.notify_always;
        blk.irq = opts.irq;
        match blk.init() {
            Ok(()) => {
                put("capacity=");
                put_dec(blk.capacity);
                put(" blk_size=");
                put_dec(blk.blk_size as u64);
                put(" seg_max=");
                put_dec(blk.seg_max as u64);
                put(" queues=");
                put_dec(blk.num_queues as u64);
                put(" features=0x");
                put_hex(blk.features);
                put(" ro=");
                put_dec(blk.ro() as u64);
                put(" queue_size=");
                put_dec(blk.q(0).size as u64);
                put(" offered=0x");
                put_hex(blk.offered);
                put("\n");
                devs[idx] = Some(blk);
            }
            Err(e) => {
                put("FAILED ");
                put(e);
                put("\n");
                failed = true;
            }
        }
    }

    let mut kernel_mode = opts.kernel_mode;
    if !kernel_mode {
        if let Err(f) = user::call(&mut || {}) {
            let mut t = Text::<200>::new();
            let _ = write!(t, "testguest: warning: user mode does not work ({}); running the workloads in kernel mode\n", f);
            put_bytes(t.as_bytes());
            kernel_mode = true;
        }
    }

    let Some(scratch) = mem::alloc(SCRATCH, 4096) else {
        put("testguest: blk: FAILED out of memory for buffers\n");
        return true;
    };
    let env = Env {
        opts,
        seed: opts.seed.unwrap_or_else(tsc::now),
        scratch,
        scratch_len: SCRATCH,
        top_of_memory: top,
    };

    for job in opts.jobs.iter().flatten() {
        if job.what == crate::cmdline::Work::Durable {
            failed |= durable(&mut devs, job.dev, nblk, kernel_mode, &env);
            continue;
        }
        let mut out = Out::new();
        let result = run_on(&mut devs, job.dev, nblk, kernel_mode, &mut |dev| {
            blk_work::run(job.what, dev, &env, &mut out)
        });
        put_bytes(out.as_bytes());
        let bad = report(job.what.name(), job.dev, result);
        if bad {
            recover(&mut devs, job.dev);
        }
        failed |= bad;
    }
    for job in opts.benches.iter().flatten() {
        let result = run_on(&mut devs, job.dev, nblk, kernel_mode, &mut |dev| {
            bench::run(job.what, dev, &env, !kernel_mode)
        });
        let mut name = Text::<32>::new();
        let _ = write!(name, "bench {}", job.what.name());
        let bad = report(name.as_str(), job.dev, result);
        if bad {
            recover(&mut devs, job.dev);
        }
        failed |= bad;
    }
    failed
}

/// `durable`: rounds of write + FLUSH, each in its own ring-3 call so
/// that ring 0 can print `testguest: blk durable vdX: flushed round=<r>
/// sectors=<first>+<count>` as soon as its FLUSH has completed (a host
/// killing the VMM after that line may expect those sectors on disk);
/// `blk.ops` rounds (default: until every chunk of the area is written),
/// then all are read back. Returns true if it failed.
fn durable(devs: &mut [Option<Blk>], dev: u8, nblk: usize, kernel_mode: bool, env: &Env) -> bool {
    let t0 = tsc::now();
    let mut plan = None;
    let result = run_on(devs, dev, nblk, kernel_mode, &mut |d| {
        blk_work::durable_plan(d, env).map(|p| {
            plan = Some(p);
            blk_work::Msg::new()
        })
    });
    let Some(plan) = plan else {
        return fail_and_recover(devs, "durable", dev, result);
    };
    let rounds = env.opts.ops.map_or(plan.chunks, |n| n.min(plan.chunks));
    for r in 0..rounds {
        let mut first = 0;
        let result = run_on(devs, dev, nblk, kernel_mode, &mut |d| {
            blk_work::durable_round(d, env, &plan, r).map(|f| {
                first = f;
                blk_work::Msg::new()
            })
        });
        if result.is_err() {
            return fail_and_recover(devs, "durable", dev, result);
        }
        let mut line = Text::<96>::new();
        let _ = write!(
            line,
            "testguest: blk durable {}: flushed round={} sectors={}+{}\n",
            core::str::from_utf8(&[b'v', b'd', b'a' + dev]).unwrap_or("?"),
            r,
            first,
            blk_work::DURABLE_SECTORS
        );
        put_bytes(line.as_bytes());
    }
    let result = run_on(devs, dev, nblk, kernel_mode, &mut |d| {
        blk_work::durable_check(d, env, &plan, rounds).map(|mut m| {
            let ms = tsc::now().wrapping_sub(t0) / (tsc::hz() / 1000).max(1);
            let _ = write!(m, " ms={}", ms);
            m
        })
    });
    fail_and_recover(devs, "durable", dev, result)
}

/// Reports `result`; after a failure, recovers the device. Returns true
/// if it failed.
fn fail_and_recover(devs: &mut [Option<Blk>], name: &str, dev: u8, result: blk_work::Outcome) -> bool {
    let bad = report(name, dev, result);
    if bad {
        recover(devs, dev);
    }
    bad
}

/// After a failed workload: if the device needs a reset or still holds
/// requests, reset and re-initialise it so the next workload starts clean
/// (a line says so); if that fails, the device is dropped.
fn recover(devs: &mut [Option<Blk>], i: u8) {
    let Some(dev) = devs[i as usize].as_mut() else {
        return;
    };
    let needs_reset = dev.status() & virtio::S_NEEDS_RESET != 0;
    let busy = dev.qs.iter().flatten().any(|q| q.inflight != 0);
    if !needs_reset && !busy {
        return;
    }
    put("testguest: blk ");
    put_bytes(&dev.name);
    put(if needs_reset { ": device needs reset" } else { ": requests still in flight" });
    match dev.init() {
        Ok(()) => put(", re-initialised\n"),
        Err(e) => {
            put(", re-initialisation FAILED: ");
            put(e);
            put("\n");
            devs[i as usize] = None;
        }
    }
}

/// Runs `f` on device `dev` in ring 3 (or ring 0 with blk.mode=kernel).
fn run_on(
    devs: &mut [Option<Blk>],
    dev: u8,
    nblk: usize,
    kernel_mode: bool,
    f: &mut dyn FnMut(&mut Blk) -> blk_work::Outcome,
) -> blk_work::Outcome {
    let Some(dev) = devs[dev as usize].as_mut() else {
        return Err(missing(dev as usize, nblk));
    };
    let mut r = None;
    let mut call = || r = Some(f(dev));
    let fault = if kernel_mode {
        call();
        Ok(())
    } else {
        user::call(&mut call)
    };
    match (fault, r) {
        (Ok(()), Some(r)) => r,
        (Err(e), _) => {
            let mut m = blk_work::Msg::new();
            let _ = write!(m, "{}", e);
            Err(m)
        }
        (Ok(()), None) => unreachable!(),
    }
}

/// Prints `testguest: blk <name> <dev>: <ok text>` or `... FAILED <why>`;
/// returns true if it failed.
fn report(name: &str, dev: u8, result: blk_work::Outcome) -> bool {
    put("testguest: blk ");
    put(name);
    put(" ");
    put_bytes(&[b'v', b'd', b'a' + dev]);
    put(": ");
    let failed = result.is_err();
    match result {
        Ok(m) => put_bytes(m.as_bytes()),
        Err(m) => {
            put("FAILED ");
            put_bytes(m.as_bytes());
        }
    }
    put("\n");
    failed
}

fn missing(dev: usize, nblk: usize) -> blk_work::Msg {
    let mut m = blk_work::Msg::new();
    if dev < nblk {
        let _ = write!(m, "the device did not initialise");
    } else {
        let _ = write!(m, "no such device ({} virtio-blk device(s) found)", nblk);
    }
    m
}
