#!/usr/bin/env python3
"""Where the threads run: each VMM's dataplane thread (QEMU: its iothread)
pinned to one CPU and its other threads to another, against leaving them
to the scheduler, on table 1 rows of bench/blk.py.

On a host whose disk takes its completion interrupts on one CPU, which
CPU the dataplane shares with them decides some rows more than anything
in the VMM does: the kernel finishes a request on the CPU that submitted
it, and on a 2-CPU host the dataplane and the spinning vCPU take one each.
This prints, per row and per VMM, the IOPS with the dataplane on each CPU
and unpinned (medians of N alternating runs, min-max), and the CPUs that
took the disk's interrupts during the run.

    python3 bench/placement.py [--rows SPEC:QD,...] [--reps N] [--seconds N]

Needs what bench/blk.py needs (QEMU, the test guest, the image) and
`taskset` (util-linux).
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blk  # noqa: E402
from common import Run, check_kvm, ensure_qemu, ensure_vmm, log  # noqa: E402

DEFAULT_ROWS = "randread4k:1,randwrite4k:1,randwrite4k:32,randread4k:128,randwrite4k:128"


def irq_counts(irqs):
    """{irq: [count per CPU]} now."""
    out = {}
    with open("/proc/interrupts") as f:
        ncpu = len(f.readline().split())
        for line in f:
            fields = line.split()
            if fields and fields[0].rstrip(":").isdigit() and int(fields[0].rstrip(":")) in irqs:
                out[int(fields[0].rstrip(":"))] = [int(x) for x in fields[1:1 + ncpu]]
    return out


def one_run(vmm, spec, qd, seconds, image, dataplane_cpu, irqs):
    """IOPS of one run, with the dataplane pinned to `dataplane_cpu` and the
    other threads to the other CPU (None: unpinned); plus interrupts per CPU."""
    run = Run(blk.vmm_cmd(vmm, blk.guest_cmdline(spec, qd, seconds), image))
    try:
        run.wait_line(b"testguest: blk vda:", seconds + 30)
        tids = blk.find_threads(run.proc.pid, vmm)
        if dataplane_cpu is not None:
            if "dataplane" not in tids:
                raise blk.BenchError(run.describe(f"{vmm}'s dataplane thread was not found"))
            for role, tid in tids.items():
                cpu = dataplane_cpu if role == "dataplane" else 1 - dataplane_cpu
                subprocess.run(["taskset", "-pc", str(cpu), str(tid)], capture_output=True, check=True)
        before = irq_counts(irqs)
        _, status = run.wait_exit(seconds + 30)
        after = irq_counts(irqs)
    finally:
        run.kill()
    found = [m for m in (blk.BENCH_RE.match(line) for _, line in run.lines) if m]
    figures = blk.parse_bench((found[-1].group(1), found[-1].group(2))) if found else None
    if figures is None:
        raise blk.BenchError(run.describe(f"no bench line (exit status {status})"))
    per_cpu = [sum(after[i][c] - before[i][c] for i in after) for c in range(len(next(iter(after.values()), [])))]
    return float(figures["iops"]), per_cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, metavar="SPEC:QD,...",
                    help=f"rows to run (default {DEFAULT_ROWS})")
    ap.add_argument("--reps", type=int, default=3, metavar="N", help="alternating runs per arrangement (default 3)")
    ap.add_argument("--seconds", type=int, default=2, help="seconds per run (default 2)")
    ap.add_argument("--image", type=Path, default=blk.REPO / "target" / "bench" / "blk-256M.img")
    args = ap.parse_args()
    if args.reps < 1 or args.seconds < 1:
        ap.error("--reps and --seconds must be at least 1")
    rows = []
    for item in args.rows.split(","):
        spec, _, qd = item.partition(":")
        if spec not in {r[0] for r in blk.TABLE1} or not qd.isdigit():
            ap.error(f"unknown row {item!r}: give SPEC:QD with SPEC one of table 1's")
        rows.append((spec, int(qd)))
    if os.cpu_count() != 2:
        log(f"this host has {os.cpu_count()} CPUs; the arrangements use CPUs 0 and 1 only")

    check_kvm()
    blk.ensure_testguest()
    ensure_vmm()
    ensure_qemu()
    blk.ensure_image(args.image, 256 << 20)
    irqs = blk.disk_irqs(args.image)
    log(f"the disk's interrupts: {', '.join(f'{n} ({name})' for n, name in irqs.items()) or 'not found'}")

    arrangements = [("unpinned", None), ("dataplane on CPU 0", 0), ("dataplane on CPU 1", 1)]
    print(f"{'row':<20} {'VMM':<5} " + " ".join(f"{a:>27}" for a, _ in arrangements))
    for spec, qd in rows:
        irq_total = [0, 0]
        for vmm in ("ours", "qemu"):
            iops = {a: [] for a, _ in arrangements}
            for rep in range(args.reps):
                order = arrangements if rep % 2 == 0 else arrangements[::-1]
                for name, cpu in order:
                    value, per_cpu = one_run(vmm, spec, qd, args.seconds, args.image, cpu, irqs)
                    iops[name].append(value)
                    for c, n in enumerate(per_cpu[:2]):
                        irq_total[c] += n
            cells = []
            for name, _ in arrangements:
                xs = iops[name]
                cells.append(f"{statistics.median(xs):>9,.0f} {min(xs):>8,.0f}-{max(xs):<8,.0f}")
            label = f"{blk.row_label(spec, qd)}"
            print(f"{label:<20} {vmm:<5} " + " ".join(f"{c:>27}" for c in cells), flush=True)
        if sum(irq_total):
            log(f"  {blk.row_label(spec, qd)}: the disk's interrupts on CPU 0 and 1 over all its runs: {irq_total}")


if __name__ == "__main__":
    try:
        main()
    except blk.BenchError as e:
        sys.exit(f"placement: {e}")
