#!/usr/bin/env python3
"""Migration and snapshot/restore benchmark: our vmm against QEMU microvm, in one run.

Measures, with the test guest (kernel-images/out/testguest), 1 vCPU:

1. Live migration over a Unix socket with shared storage (both
   processes open the same raw disk), 128 MiB and 1 GiB of RAM, the guest
   idle and while writing (blk=random): total time, downtime, bytes sent,
   passes (dirty-sync-count), from query-migrate on the source; ours and
   QEMU 7.2 microvm, the same max-bandwidth and downtime-limit for both.
   Median and min-max of --runs.
2. Restore: a snapshot (migrate to file:) of the guest in the middle of
   its blk=durable workload, restored with --incoming file:; process start
   to the guest's first serial line after the restore and to process exit,
   next to a cold boot of the same guest. Median of --restore-runs.
3. A fleet: the same snapshot restored as --fleet processes at once, each
   with --disk path=base.img,snapshot=on: all finish ok, the base image is
   unchanged (SHA-256), time to running and memory (Rss, Pss,
   Shared_Clean from /proc/PID/smaps_rollup) per guest.

Prints the tables (see bench/README.md). Python 3 standard library only.

    python3 bench/migration.py [--runs 3] [--restore-runs 10] [--fleet 20] [--json FILE]
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from startup import TRACE_RE
from common import (KERNEL, QEMU_BIN, REPO, SEABIOS_DIR, VMM, BenchError, Qmp, Run, check_kvm,
                    ensure_kernel, ensure_qemu, ensure_vmm, log, machine, ms, now_ns, run_main)

CPUS = 1
DISK_MIB = 64
# Both VMMs get these: QEMU 7.2's default downtime-limit, and a bandwidth
# far above what one core copies, so neither is throttled (QEMU's default,
# 128 MiB/s, let a busy guest finish before the migration converged).
DOWNTIME_LIMIT_MS = 300
MAX_BANDWIDTH = 8 << 30
# blk=random operations for "writing": long enough that the workload is
# still running when the migration completes (the script checks that the
# result line comes from the destination).
WRITE_OPS = 300_000
# blk.seconds of the dma guest: likewise.
DMA_SECONDS = 4
# The snapshot's workload: durable rounds print one line each (every ~ms),
# so the first line after a restore shows the workload running again.
RESTORE_MEMORY_MIB = 128
DURABLE_BYTES = 6 << 20  # 256 rounds of 24 KiB, ~3 ms each here
MIGRATE_TIMEOUT_S = 120.0
# Our vmm then prints when vCPU 0 first enters KVM_RUN (see startup.py).
TRACE_ENV = {**os.environ, "VMM_TRACE_STARTUP": "1"}


def wait_path(path, run, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if run.proc.poll() is not None:
            run.wait_exit()
            raise BenchError(run.describe(f"ended before creating {path}"))
        if time.monotonic() > deadline:
            raise BenchError(run.describe(f"no {path} after {timeout_s} s"))
        time.sleep(0.005)


def migrate(qmp, uri, src, timeout_s=MIGRATE_TIMEOUT_S):
    """Starts a migration and polls query-migrate until it ends; its last answer."""
    qmp.cmd("migrate", uri=uri)
    deadline = time.monotonic() + timeout_s
    while True:
        info = qmp.cmd("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise BenchError(src.describe(f"migration {status}: {info.get('error-desc', '')}"))
        if time.monotonic() > deadline:
            raise BenchError(src.describe(f"migration not done after {timeout_s:.0f} s: {info}"))
        time.sleep(0.01)


# ---------------------------------------------------------------- commands


def vmm_cmd(cmdline, memory_mib, disk, qmp=None):
    cmd = [str(VMM), "--kernel", str(KERNEL), "--cmdline", cmdline, "--cpus", str(CPUS),
           "--memory", f"{memory_mib}M", "--disk", f"path={disk}"]
    return cmd + (["--qmp", str(qmp)] if qmp else [])


def vmm_incoming(uri, memory_mib, disk):
    return [str(VMM), "--incoming", uri, "--cpus", str(CPUS), "--memory", f"{memory_mib}M",
            "--disk", disk]


def qemu_cmd(cmdline, memory_mib, disk, qmp, incoming=None):
    return [
        str(QEMU_BIN), "-L", str(SEABIOS_DIR),
        "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", str(memory_mib), "-smp", str(CPUS),
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-global", "virtio-mmio.force-legacy=false",
        "-drive", f"id=d0,file={disk},format=raw,if=none",
        "-device", "virtio-blk-device,drive=d0",
        "-kernel", str(KERNEL), "-append", cmdline,
        "-qmp", f"unix:{qmp},server=on,wait=off",
        *(["-incoming", incoming] if incoming else []),
    ]


def random_disk(work):
    path = work / "random.img"
    if not path.exists():
        with open(path, "wb") as f:
            for _ in range(DISK_MIB):
                f.write(os.urandom(1 << 20))
    return path


def make_disk(path, mib=DISK_MIB):
    with open(path, "wb") as f:
        f.truncate(mib << 20)


# ---------------------------------------------------------------- 1. migration


# The guest's workload while it migrates: its command line, the line
# that shows it started, the result line the destination must print.
WORKLOADS = {
    "idle": ("idle", b"testguest: idle", None, "random"),
    # 4 KiB random reads and writes, each read checked against what was
    # written, from RAM that moved: dirties little RAM (buffers, tables).
    "writing": ("blk=random blk.ops={ops} blk.qd=8 blk.timeout=600", b"testguest: blk vda:",
                b"blk random vda: ok", "random"),
    # Sequential 128 KiB reads, 128 in flight: the device (not the vCPU)
    # writes 16 MiB of guest buffers over and over, which KVM's dirty log
    # does not see; the VMM must track them itself.
    "dma": ("blk.bench=seqread128k blk.qd=128 blk.seconds={seconds} blk.timeout=600",
            b"testguest: blk vda:", b"blk bench seqread128k vda: qd=", "random"),
    # The same from a disk of zeros: the pages the device dirties are zero.
    "dma-zero": ("blk.bench=seqread128k blk.qd=128 blk.seconds={seconds} blk.timeout=600",
                 b"testguest: blk vda:", b"blk bench seqread128k vda: qd=", "zero"),
}


def migrate_once(who, memory_mib, workload, work, ops, seconds):
    """One migration; the figures from the source's last query-migrate."""
    template, started_line, result_line, contents = WORKLOADS[workload]
    disk = work / "mig.img"
    # Random contents, so what the dma guest reads into its RAM is not
    # zero pages (which both VMMs send as a marker only); dma-zero wants those.
    if contents == "zero":
        make_disk(disk)
    else:
        shutil.copyfile(random_disk(work), disk)
    qsock, msock = work / "src.qmp", work / "mig.sock"
    for p in (qsock, msock):
        if p.exists():
            p.unlink()
    cmdline = template.format(ops=ops, seconds=seconds)
    if who == "ours":
        src = Run(vmm_cmd(cmdline, memory_mib, disk, qsock))
        dst_cmd = vmm_incoming(f"unix:{msock}", memory_mib, f"path={disk}")
        want_status = 0
    else:
        src = Run(qemu_cmd(cmdline, memory_mib, disk, qsock))
        dst_cmd = qemu_cmd(cmdline, memory_mib, disk, work / "dst.qmp", incoming=f"unix:{msock}")
        want_status = 1  # isa-debug-exit: (0 << 1) | 1
    dst = None
    try:
        # Idle: the guest has printed its last line. Writing: the device
        # line comes just before the workload starts.
        src.wait_line(started_line)
        dst = Run(dst_cmd)
        wait_path(msock, dst)
        qmp = Qmp(qsock, src)
        qmp.cmd("migrate-set-parameters", **{"downtime-limit": DOWNTIME_LIMIT_MS,
                                              "max-bandwidth": MAX_BANDWIDTH})
        info = migrate(qmp, f"unix:{msock}", src)
        qmp.close()
        if result_line:
            _, status = dst.wait_exit(timeout_s=120)
            if any(result_line in l for _, l in src.lines):
                raise BenchError(src.describe(
                    "the workload finished on the source before the migration completed: raise --ops/--seconds"))
            if status != want_status or not any(result_line in l for _, l in dst.lines):
                raise BenchError(dst.describe(f"destination: exit status {status} (expected {want_status}) "
                                              f"or no {result_line.decode()!r} line"))
        elif dst.proc.poll() is not None:
            dst.wait_exit()
            raise BenchError(dst.describe("the destination ended after an idle migration"))
    finally:
        src.kill()
        if dst:
            dst.kill()
    ram = info.get("ram", {})
    return {"total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"), "transferred": ram.get("transferred"),
            "passes": ram.get("dirty-sync-count"), "normal": ram.get("normal"),
            "duplicate": ram.get("duplicate")}


# ---------------------------------------------------------------- 2. restore


def take_snapshot(work):
    """Boots the durable workload, stops it after its first round, writes
    the state file; returns (state file, base image as it was then)."""
    base = work / "base.img"
    make_disk(base)
    state, qsock = work / "guest.state", work / "snap.qmp"
    for p in (state, qsock):
        if p.exists():
            p.unlink()
    src = Run(vmm_cmd(f"blk=durable blk.bytes={DURABLE_BYTES}", RESTORE_MEMORY_MIB, base, qsock))
    try:
        src.wait_line(b"durable vda: flushed round=")
        qmp = Qmp(qsock, src)
        qmp.cmd("stop")
        migrate(qmp, f"file:{state}", src)
        qmp.close()
        rounds = sum(1 for _, l in src.lines if b"flushed round=" in l)
    finally:
        src.kill()
    if any(b"durable vda: ok" in l for _, l in src.lines):
        raise BenchError(src.describe("the workload finished before the snapshot: raise DURABLE_BYTES"))
    return state, base, rounds


def restore_once(state, disk):
    """(first serial line, first whole round line, exit) after process start, ns.

    The snapshot may catch the guest in the middle of printing a line (one
    port write per byte): the first line is then that line's rest."""
    run = Run(vmm_incoming(f"file:{state}", RESTORE_MEMORY_MIB, f"path={disk}"), env=TRACE_ENV)
    try:
        t_round = run.wait_line(b"testguest: blk durable vda: flushed round=")
        t_exit, status = run.wait_exit()
    finally:
        run.kill()
    t_first, first = run.lines[0]
    if b"flushed round=" not in first and (first.startswith(b"testguest:") or b"+48" not in first):
        raise BenchError(run.describe(f"the first line after the restore is {first!r}, not (part of) a round line"))
    if status != 0 or not any(b"durable vda: ok" in l for _, l in run.lines):
        raise BenchError(run.describe(f"restored guest: exit status {status} or no 'durable vda: ok'"))
    return t_first - run.t0, t_round - run.t0, t_exit - run.t0, *kvm_run(run)


def kvm_run(run):
    """(wall ns from process start, process CPU ns) to vCPU 0's first KVM_RUN."""
    m = TRACE_RE.search(run.stderr)
    if not m:
        raise BenchError(run.describe("no 'vmm: vcpu0 first KVM_RUN' line on stderr with VMM_TRACE_STARTUP=1"))
    return int(m.group(1)) - run.t0, int(m.group(2))


def boot_once(disk):
    run = Run(vmm_cmd(f"blk=durable blk.bytes={DURABLE_BYTES}", RESTORE_MEMORY_MIB, disk), env=TRACE_ENV)
    try:
        t_first = run.wait_line(b"testguest: start")
        t_round = run.wait_line(b"durable vda: flushed round=")
        t_exit, status = run.wait_exit()
    finally:
        run.kill()
    if status != 0 or not any(b"durable vda: ok" in l for _, l in run.lines):
        raise BenchError(run.describe(f"cold boot: exit status {status} or no 'durable vda: ok'"))
    return t_first - run.t0, t_round - run.t0, t_exit - run.t0, *kvm_run(run)


# ---------------------------------------------------------------- 3. fleet


def smaps_rollup(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        return None
    return out


def smaps_mapping(pid, path_suffix):
    """Summed fields of the mappings in /proc/PID/smaps whose path ends with path_suffix (bytes)."""
    out, inside = {}, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if parts and "-" in parts[0] and len(parts[0]) > 8 and not parts[0].endswith(":"):
                    inside = len(parts) >= 6 and parts[-1].endswith(path_suffix)
                elif inside and len(parts) == 3 and parts[2] == "kB":
                    key = parts[0].rstrip(":")
                    out[key] = out.get(key, 0) + int(parts[1]) * 1024
    except OSError:
        return None
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fleet(state, base, n, work):
    before = sha256(base)
    env = {**os.environ, "TMPDIR": str(work)}  # the snapshot=on overlays
    cmd = vmm_incoming(f"file:{state}", RESTORE_MEMORY_MIB, f"path={base},snapshot=on")
    t_start = now_ns()
    runs = [Run(cmd, env=env) for _ in range(n)]
    peak = [None] * n  # smaps_rollup sample with the largest Rss while running
    first = [None] * n
    done = [None] * n
    deadline = now_ns() + int(120e9)
    try:
        while not all(d is not None for d in done):
            if now_ns() > deadline:
                raise BenchError("the fleet did not finish within 120 s")
            for i, r in enumerate(runs):
                if done[i] is not None:
                    continue
                r._pump(now_ns())
                if first[i] is None and r.lines:
                    first[i] = r.lines[0][0] - r.t0
                if first[i] is not None and r.proc.poll() is None:
                    s = smaps_rollup(r.proc.pid)
                    g = smaps_mapping(r.proc.pid, state.name)
                    if s and g is not None and (peak[i] is None or s.get("Rss", 0) > peak[i][0].get("Rss", 0)):
                        peak[i] = (s, g)
                if not r._fds:
                    _, status = r.wait_exit()
                    done[i] = (now_ns() - r.t0, status)
            time.sleep(0.02)
    finally:
        for r in runs:
            r.kill()
    t_all = now_ns() - t_start
    after = sha256(base)
    rows = []
    for i, r in enumerate(runs):
        ok = done[i][1] == 0 and any(b"durable vda: ok" in l for _, l in r.lines)
        if not ok:
            raise BenchError(r.describe(f"fleet guest {i}: exit status {done[i][1]} or no 'durable vda: ok'"))
        p, g = peak[i] or ({}, {})
        # Shared: mapped by other processes too (page cache: the binary,
        # the libraries, the state file; tmpfs pages count as dirty).
        # Anonymous: the process's own, here the pages the guest wrote
        # (copied on write from the state file) and the VMM's heap.
        shared = lambda d: (d.get("Shared_Clean", 0) + d.get("Shared_Dirty", 0)) if d else None
        rows.append({"first_ms": ms(first[i]), "exit_ms": ms(done[i][0]), "rss": p.get("Rss"),
                     "pss": p.get("Pss"), "shared": shared(p), "anon": p.get("Anonymous"),
                     "guest_rss": g.get("Rss"), "guest_pss": g.get("Pss"), "guest_shared": shared(g),
                     "guest_anon": g.get("Anonymous")})
    if before != after:
        raise BenchError(f"the base image changed: sha256 {before} before, {after} after")
    return {"guests": rows, "all_ms": ms(t_all), "base_sha256": before, "base_unchanged": True}


# ---------------------------------------------------------------- report


def stat(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def cell(s, scale=1.0, fmt="{:.1f}"):
    if not s:
        return "-"
    return (f"{fmt.format(s['median'] * scale)} ({fmt.format(s['min'] * scale)}-"
            f"{fmt.format(s['max'] * scale)})")


def migration_table(res):
    rows = [("case", "VMM", "total ms", "downtime ms", "MiB sent", "passes")]
    for key, r in res.items():
        for who in ("ours", "qemu"):
            f = r[who]
            rows.append((key, who, cell(f["total_ms"]), cell(f["downtime_ms"]),
                         cell(f["transferred"], 1 / 2**20), cell(f["passes"], fmt="{:.0f}")))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip())
        if j == 0:
            out.append("  ".join("-" * x for x in w))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="migrations per case and VMM (default 3)")
    ap.add_argument("--restore-runs", type=int, default=10, help="restores and cold boots (default 10)")
    ap.add_argument("--fleet", type=int, default=20, help="restored processes at once (default 20)")
    ap.add_argument("--ops", type=int, default=WRITE_OPS,
                    help=f"blk.ops of the writing guest (default {WRITE_OPS})")
    ap.add_argument("--seconds", type=int, default=DMA_SECONDS,
                    help=f"blk.seconds of the dma guest (default {DMA_SECONDS})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"migration workloads, comma-separated (default {','.join(WORKLOADS)})")
    ap.add_argument("--only", choices=["migration", "restore", "fleet"], action="append",
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args()
    if min(args.runs, args.restore_runs, args.fleet) < 1:
        ap.error("--runs, --restore-runs and --fleet must be at least 1")
    parts = set(args.only or ["migration", "restore", "fleet"])
    args.workloads = args.workloads.split(",")
    if not set(args.workloads) <= set(WORKLOADS):
        ap.error(f"--workloads: known ones are {', '.join(WORKLOADS)}")

    check_kvm()
    ensure_kernel()
    ensure_vmm()
    qemu_version = ensure_qemu() if "migration" in parts else None
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="vmm-bench-mig-", dir=shm if shm.is_dir() else None))
    started = time.monotonic()
    res = {"machine": machine(), "qemu_version": qemu_version, "work_dir": str(work),
           "load_before": os.getloadavg()}
    try:
        if "migration" in parts:
            mig = {}
            for memory_mib, size in ((128, "128M"), (1024, "1G")):
                for workload in args.workloads:
                    key = f"{size} {workload}"
                    samples = {"ours": [], "qemu": []}
                    log(f"migration {key}: {args.runs} runs each, alternating")
                    for _ in range(args.runs):
                        for who in ("ours", "qemu"):
                            samples[who].append(
                                migrate_once(who, memory_mib, workload, work, args.ops, args.seconds))
                    mig[key] = {who: {k: stat([s[k] for s in ss]) for k in ss[0]}
                                for who, ss in samples.items()}
            res["migration"] = mig
        if parts & {"restore", "fleet"}:
            log("snapshot: durable workload stopped after its first round, migrate to file:")
            state, base, rounds = take_snapshot(work)
            res["snapshot"] = {"state_bytes": state.stat().st_size, "rounds_before": rounds,
                               "rounds_total": DURABLE_BYTES // (24 << 10)}
        if "restore" in parts:
            log(f"restore and cold boot: {args.restore_runs} runs each, alternating")
            rest, boot = [], []
            copy, fresh = work / "restore.img", work / "boot.img"
            for _ in range(args.restore_runs):
                shutil.copyfile(base, copy)
                rest.append(restore_once(state, copy))
                make_disk(fresh)
                boot.append(boot_once(fresh))
            col = lambda rows, i: stat([ms(r[i]) for r in rows])
            res["restore"] = {
                "runs": args.restore_runs,
                "restore_kvm_run_ms": col(rest, 3), "restore_kvm_run_cpu_ms": col(rest, 4),
                "restore_first_line_ms": col(rest, 0), "restore_first_round_ms": col(rest, 1),
                "restore_exit_ms": col(rest, 2),
                "boot_kvm_run_ms": col(boot, 3), "boot_kvm_run_cpu_ms": col(boot, 4),
                "boot_first_line_ms": col(boot, 0), "boot_first_round_ms": col(boot, 1),
                "boot_exit_ms": col(boot, 2),
            }
        if "fleet" in parts:
            log(f"fleet: {args.fleet} restores at once with snapshot=on")
            res["fleet"] = fleet(state, base, args.fleet, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    res["duration_s"] = round(time.monotonic() - started, 1)
    print_report(res, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


def print_report(res, args):
    mc = res["machine"]
    print(f"machine: nproc={mc['nproc']}, kernel {mc['kernel']}, "
          f"kvm_pvm {'loaded (PVM, not hardware KVM)' if mc['kvm_pvm'] else 'not loaded'}"
          f"{', ' + mc['cpu'] if mc['cpu'] else ''}; load average before "
          f"{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}")
    print(f"guest: {KERNEL.relative_to(REPO)}, {CPUS} vCPU; disks raw {DISK_MIB} MiB in {Path(res['work_dir']).parent}")
    if "migration" in res:
        print()
        print(f"1. Live migration over a Unix socket, shared storage; median (min-max) of {args.runs}; "
              f"max-bandwidth {MAX_BANDWIDTH >> 20} MiB/s and downtime-limit {DOWNTIME_LIMIT_MS} ms for both; "
              f"workloads: {'; '.join(k + ' = ' + WORKLOADS[k][0].format(ops=args.ops, seconds=args.seconds) + ', disk ' + WORKLOADS[k][3] for k in args.workloads)}")
        print(f"   QEMU: {res['qemu_version']}, microvm")
        print(migration_table(res["migration"]))
    if "snapshot" in res:
        s = res["snapshot"]
        print()
        print(f"snapshot: blk=durable blk.bytes={DURABLE_BYTES >> 20}M ({s['rounds_total']} rounds), "
              f"stopped after round line {s['rounds_before']}, {RESTORE_MEMORY_MIB} MiB, state file "
              f"{s['state_bytes'] / 2**20:.1f} MiB")
    if "restore" in res:
        r = res["restore"]
        print()
        print(f"2. Restore (--incoming file:) vs cold boot, ms from process start; median (min-max) of {r['runs']}")
        rows = [("restore: vCPU 0's first KVM_RUN, wall", r["restore_kvm_run_ms"]),
                ("restore: vCPU 0's first KVM_RUN, process CPU", r["restore_kvm_run_cpu_ms"]),
                ("restore: first serial line after restore", r["restore_first_line_ms"]),
                ("restore: first whole durable round line after restore", r["restore_first_round_ms"]),
                ("restore: process exit (rest of the workload)", r["restore_exit_ms"]),
                ("cold boot: vCPU 0's first KVM_RUN, wall", r["boot_kvm_run_ms"]),
                ("cold boot: vCPU 0's first KVM_RUN, process CPU", r["boot_kvm_run_cpu_ms"]),
                ("cold boot: first line ('testguest: start')", r["boot_first_line_ms"]),
                ("cold boot: first durable round line", r["boot_first_round_ms"]),
                ("cold boot: process exit (whole workload)", r["boot_exit_ms"])]
        w = max(len(a) for a, _ in rows)
        for a, s in rows:
            print(f"{a:{w}}  {cell(s, fmt='{:.2f}')}")
    if "fleet" in res:
        f = res["fleet"]
        g = f["guests"]
        print()
        print(f"3. Fleet: {len(g)} restores of one snapshot at once, --disk path=base.img,snapshot=on; "
              f"all exited 0 with 'durable vda: ok'; base sha256 unchanged ({f['base_sha256'][:16]}...); "
              f"all done in {f['all_ms']:.0f} ms")
        print("   running/exit: ms from the guest's own process start to its first serial line / its exit")
        print("   memory, MiB: the sample with the largest Rss while the guest ran; whole process "
              "(smaps_rollup), and the guest RAM mapping (the state file, MAP_PRIVATE) alone")
        hdr = ("guest", "running ms", "exit ms", "Rss", "Pss", "Shared", "Anonymous",
               "RAM Rss", "RAM Pss", "RAM Shared", "RAM Anon")
        keys = ("rss", "pss", "shared", "anon", "guest_rss", "guest_pss", "guest_shared", "guest_anon")
        print("  ".join(f"{h:>10}" for h in hdr))
        mib = lambda b: f"{b / 2**20:.2f}" if b is not None else "-"
        for i, row in enumerate(g):
            print("  ".join(f"{c:>10}" for c in (
                str(i), f"{row['first_ms']:.1f}", f"{row['exit_ms']:.0f}", *(mib(row[k]) for k in keys))))
        med = lambda k: statistics.median([r[k] for r in g if r[k] is not None] or [0])
        print("  ".join(f"{c:>10}" for c in (
            "median", f"{med('first_ms'):.1f}", f"{med('exit_ms'):.0f}", *(mib(med(k)) for k in keys))))
    print(f"\n(the run took {res['duration_s']} s)")


if __name__ == "__main__":
    run_main(main, "bench/migration.py")
