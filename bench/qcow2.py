#!/usr/bin/env python3
"""qcow2 benchmark: our qcow2 driver against our raw path and QEMU's qcow2, in one run.

The same exit-free test-guest benchmark as bench/blk.py (guest user mode,
notifications and interrupts suppressed, 1 vCPU), on three kinds of disk
made from one raw image of random data on the same file system:

- raw: the raw image itself (ours only: the reference for our qcow2);
- qcow2, allocated: `qemu-img convert -O qcow2` of it, every cluster
  allocated (64 KiB clusters);
- qcow2 overlay, first writes: a fresh empty overlay over the raw image
  (`qemu-img create -b RAW -F raw`) for every run, so writes allocate
  clusters and copy the rest of each cluster up from the base, and reads
  fall through to it.

Ours: `--disk path=IMG,direct=on,poll=1000,format=qcow2`; QEMU 7.2 microvm:
`-drive file=IMG,format=qcow2,cache=none,aio=io_uring` on an iothread with
polling, the same image. Each row: median of --reps alternating
repetitions, min-max shown.

    python3 bench/qcow2.py [--reps N] [--seconds N] [--size SIZE] [--json FILE]
"""

import argparse
import datetime
import json
import os
import subprocess
import time

import blk
from common import REPO, BenchError, check_kvm, ensure_qemu, ensure_vmm, log, machine, run_main

# (spec, qd)
ROWS = [("randread4k", 1), ("randread4k", 32), ("randwrite4k", 1), ("randwrite4k", 32),
        ("seqread128k", 32), ("seqwrite128k", 32)]
CLUSTER = 65536


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"qemu-img {' '.join(args)} failed: {r.stderr.strip()}")


def fresh_overlay(base, path):
    if path.exists():
        path.unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", "-b", str(base), "-F", "raw",
             str(path))
    return path


def median_run(xs):
    ranked = sorted(xs, key=lambda x: x["iops"])
    m = dict(ranked[(len(ranked) - 1) // 2])
    m["runs_iops"] = [round(x["iops"]) for x in xs]
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=2, help="seconds per point (default 2)")
    ap.add_argument("--size", type=blk.parse_size, default=blk.parse_size("256M"), help="image size (default 256M)")
    ap.add_argument("--reps", type=int, default=3, metavar="N", help="alternating repetitions per row (default 3)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    args = ap.parse_args()
    if args.reps < 1 or not 1 <= args.seconds <= 3600:
        ap.error("--reps must be at least 1 and --seconds 1..3600")

    check_kvm()
    blk.ensure_testguest()
    ensure_vmm()
    qemu_version = ensure_qemu()
    bench_dir = REPO / "target" / "bench"
    raw = bench_dir / f"blk-{args.size >> 20}M.img"
    img = blk.ensure_image(raw, args.size)
    allocated = bench_dir / f"qcow2-{args.size >> 20}M.qcow2"
    if not allocated.exists() or allocated.stat().st_mtime < raw.stat().st_mtime:
        log(f"converting {raw.name} to {allocated.name} (every cluster allocated)")
        tmp = allocated.with_suffix(".tmp.qcow2")
        qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}",
                 "-S", "0", str(raw), str(tmp))
        tmp.rename(allocated)
    overlay = bench_dir / "qcow2-overlay.qcow2"

    load_before = os.getloadavg()
    started = time.monotonic()
    wall = datetime.datetime.now().astimezone()
    for who in ("ours", "qemu"):
        blk.run_guest(who, "randread4k", 32, 1, allocated, sample=False)

    # (key, vmm, image or None for a fresh overlay per run)
    configs = [("raw", "ours", raw), ("q_ours", "ours", allocated), ("q_qemu", "qemu", allocated),
               ("o_ours", "ours", None), ("o_qemu", "qemu", None)]
    rows = []
    for i, (spec, qd) in enumerate(ROWS):
        runs = {k: [] for k, _, _ in configs}
        for rep in range(args.reps):
            k = (i + rep) % len(configs)
            for key, who, image in configs[k:] + configs[:k]:
                target = image or fresh_overlay(raw, overlay)
                runs[key].append(blk.run_guest(who, spec, qd, args.seconds, target))
        row = {"spec": spec, "qd": qd, **{k: median_run(v) for k, v in runs.items()}}
        log(f"  {blk.row_label(spec, qd)}: " + ", ".join(f"{k} {row[k]['iops']:.0f}" for k, _, _ in configs))
        rows.append(row)
    if overlay.exists():
        overlay.unlink()

    mc = machine()
    print(f"qcow2 benchmark, {wall.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: nproc={mc['nproc']}, "
          f"kernel {mc['kernel']}, {'PVM' if mc['kvm_pvm'] else 'not PVM'}; load before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.monotonic() - started:.0f} s")
    print(f"images on {img['fs']} ({img['device']}): raw {args.size >> 20} MiB random data; qcow2 {CLUSTER >> 10} KiB "
          f"clusters; QEMU {qemu_version.split('(')[0].strip()}; test guest, 1 vCPU, {args.seconds} s per point, "
          f"IOPS medians of {args.reps} alternating repetitions (min-max); cpu µs: the dataplane thread's "
          "(QEMU: its iothread's) CPU time per request")
    head = (f"{'':20} | {'ours raw':^26} | {'ours qcow2 allocated':^26} | {'QEMU qcow2 allocated':^26} | "
            f"{'q/raw':>5} {'q/QEMU':>6} | {'ours overlay 1st wr':^26} | {'QEMU overlay 1st wr':^26} | {'o/QEMU':>6}")
    print(head)
    print("-" * len(head))

    def cell(x):
        return f"{blk.num(x['iops'], 8)} {blk.spread(x):>11} {blk.num(blk.cpu_us_per_req(x), 5, 1)}"

    for r in rows:
        print(f"{blk.row_label(r['spec'], r['qd']):20} | {cell(r['raw'])} | {cell(r['q_ours'])} | {cell(r['q_qemu'])} | "
              f"{blk.ratio(r['q_ours']['iops'], r['raw']['iops']):>5} {blk.ratio(r['q_ours']['iops'], r['q_qemu']['iops']):>6} | "
              f"{cell(r['o_ours'])} | {cell(r['o_qemu'])} | {blk.ratio(r['o_ours']['iops'], r['o_qemu']['iops']):>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"time": wall.isoformat(timespec="seconds"), "machine": mc, "rows": rows}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    run_main(main, "bench/qcow2.py")
