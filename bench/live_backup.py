#!/usr/bin/env python3
"""Live backup benchmark: what a backup of a running guest's disk costs the guest, ours against QEMU.

The exit-free test-guest write benchmark of bench/blk.py (4k random
writes, guest user mode, 1 vCPU) on the same raw image, in three runs per
VMM and repetition:

- alone: no backup;
- full: as soon as the benchmark starts, `blockdev-backup sync=full` of
  the disk to a raw target, rate-limited (`speed`) so that it runs for
  the whole benchmark: the guest's writes meet copy-before-write all the
  time;
- none: `blockdev-backup sync=none` (copy-before-write only, QEMU's
  fleecing mode) for the whole benchmark.

Ours: `--disk path=IMG,direct=on,poll=1000,live-jobs=on`; QEMU 7.2
microvm: the disk on an iothread with polling, `cache=none,aio=io_uring`
(backups run there; the fleecing export that crashes QEMU 7.2 with an
iothread is not part of this). Guest IOPS, medians of --reps alternating
repetitions with min-max.

    python3 bench/live_backup.py [--reps N] [--seconds N] [--size SIZE] [--qd N]
"""

import argparse
import datetime
import os
import time

import blk
from common import (REPO, BenchError, Qmp, Run, check_kvm, ensure_qemu, ensure_vmm, log, machine,
                    run_main)

MODES = ["alone", "full", "none"]


def run(who, mode, image, target, qd, seconds, size):
    sock = REPO / "target" / "bench" / f"live-{os.getpid()}.qmp"
    if sock.exists():
        sock.unlink()
    cmdline = blk.guest_cmdline("randwrite4k", qd, seconds)
    if who == "ours":
        cmd = blk.ours_cmd(cmdline, image)
        cmd[cmd.index("--disk") + 1] += ",live-jobs=on"
        cmd += ["--qmp", str(sock)]
    else:
        cmd = blk.qemu_cmd(cmdline, image) + ["-qmp", f"unix:{sock},server=on,wait=off"]
    with open(target, "wb") as f:
        f.truncate(size)
    r = Run(cmd)
    try:
        r.wait_line(b"testguest: blk vda:", 60)
        if mode != "alone":
            qmp = Qmp(sock)
            if who == "ours":
                qmp.cmd("blockdev-add", driver="file", **{"node-name": "tgt"}, filename=str(target))
                device = "vda"
            else:
                qmp.cmd("blockdev-add", driver="raw", **{"node-name": "tgt"},
                        file={"driver": "file", "filename": str(target)})
                device = "d0"
            # Spread the copy over the whole benchmark.
            speed = max(1 << 20, size // max(1, seconds))
            qmp.cmd("blockdev-backup", **{"job-id": "bk"}, device=device, target="tgt", sync=mode,
                    speed=speed)
        r.wait_line(b"testguest: blk bench", seconds + 60)
        _, status = r.wait_exit(60)
    finally:
        r.kill()
        if sock.exists():
            sock.unlink()
    want = 0 if who == "ours" else 1
    found = [blk.BENCH_RE.match(l) for _, l in r.lines]
    found = [m for m in found if m]
    if status != want or not found:
        raise BenchError(r.describe(f"{who} {mode}: exit status {status} or no bench line"))
    figures = blk.parse_bench((found[-1].group(1), found[-1].group(2)))
    if figures is None:
        raise BenchError(r.describe(f"{who} {mode}: the benchmark FAILED"))
    return float(figures["iops"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=4, help="seconds per run (default 4)")
    ap.add_argument("--size", type=blk.parse_size, default=blk.parse_size("256M"), help="image size (default 256M)")
    ap.add_argument("--reps", type=int, default=3, metavar="N", help="alternating repetitions (default 3)")
    ap.add_argument("--qd", type=int, default=32, help="guest queue depth (default 32)")
    args = ap.parse_args()
    check_kvm()
    blk.ensure_testguest()
    ensure_vmm()
    qemu_version = ensure_qemu()
    bench_dir = REPO / "target" / "bench"
    image = bench_dir / f"blk-{args.size >> 20}M.img"
    img = blk.ensure_image(image, args.size)
    target = bench_dir / "live-backup-target.img"
    started = time.monotonic()
    wall = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    runs = {(w, m): [] for w in ("ours", "qemu") for m in MODES}
    for rep in range(args.reps):
        order = [(w, m) for m in MODES for w in ("ours", "qemu")]
        k = rep % len(order)
        for who, mode in order[k:] + order[:k]:
            iops = run(who, mode, image, target, args.qd, args.seconds, args.size)
            runs[(who, mode)].append(iops)
            log(f"  rep {rep}: {who} {mode}: {iops:.0f} IOPS")
    if target.exists():
        target.unlink()

    def med(xs):
        return sorted(xs)[(len(xs) - 1) // 2]

    mc = machine()
    print(f"live backup benchmark, {wall.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: nproc={mc['nproc']}, "
          f"kernel {mc['kernel']}, {'PVM' if mc['kvm_pvm'] else 'not PVM'}; load before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}; {time.monotonic() - started:.0f} s")
    print(f"guest: test guest, 4k random writes QD{args.qd}, {args.seconds} s per run; disk {args.size >> 20} MiB raw "
          f"on {img['fs']}; backup to a raw file on the same file system at {args.size // args.seconds >> 20} MiB/s; "
          f"QEMU {qemu_version.split('(')[0].strip()}; guest IOPS, median of {args.reps} (min-max)")
    print(f"{'':14} | {'ours':^24} | {'QEMU':^24} | {'ours/QEMU':>9} | {'ours vs alone':>13} | {'QEMU vs alone':>13}")
    for m in MODES:
        o, q = runs[("ours", m)], runs[("qemu", m)]
        cell = lambda xs: f"{med(xs):>9,.0f} {min(xs):>7,.0f}-{max(xs):<7,.0f}"
        print(f"{'backup ' + m if m != 'alone' else 'no backup':14} | {cell(o)} | {cell(q)} | "
              f"{med(o) / med(q):>9.2f} | {med(o) / med(runs[('ours', 'alone')]):>13.2f} | "
              f"{med(q) / med(runs[('qemu', 'alone')]):>13.2f}")
    return 0


if __name__ == "__main__":
    run_main(main, "bench/live_backup.py")
