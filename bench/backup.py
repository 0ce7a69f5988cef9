#!/usr/bin/env python3
"""Backup benchmark: a full copy of one raw image three ways, in one run.

1. ours: `blockdev-backup sync=full` in our vmm (release build; the test
   guest idles, the source is not attached to a device, so no `stop`),
   between two `file` nodes added over QMP.
2. `qemu-img convert -f raw -O raw` on the same two files.
3. qemu-storage-daemon: the same blockdev-backup between the same nodes.

Every copy is done --runs times (default 3), the three ways rotating, with
the page cache dropped before each, and the target checked against the
source after each. Prints the median MB/s (10^6 bytes/s) with min and max,
and the ratios ours/qemu-img and ours/qsd. See bench/README.md.

    python3 bench/backup.py [--size 1G] [--runs 3] [--only ours,qemu-img,qsd]
                            [--image FILE] [--json FILE] [--wait-load LOAD]

Python 3 standard library only; needs /dev/kvm (for ours), qemu-img and
qemu-storage-daemon (Debian qemu-utils: apt-get install -y qemu-utils if
missing), and root to drop the page cache.
"""

import argparse
import datetime
import hashlib
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blk import apt_install, ensure_image, parse_size, wait_for_load
from common import (KERNEL, REPO, VMM, BenchError, check_kvm, ensure_kernel, ensure_vmm, log,
                    machine, now_ns, run_main)

DEFAULT_SIZE = "1G"
WAYS = ("ours", "qemu-img", "qsd")
LABEL = {"ours": "ours (blockdev-backup)", "qemu-img": "qemu-img convert",
         "qsd": "qemu-storage-daemon (blockdev-backup)"}
# A copy that takes longer than this has failed (1 GiB at 10 MB/s).
COPY_TIMEOUT_S = 120.0
QSD = "qemu-storage-daemon"
QEMU_IMG = "qemu-img"
# Both files in every way: O_DIRECT (QEMU's cache=none), so the copy
# measures the disk and the copier, not the page cache.
FILE_OPTS = {"cache": {"direct": True}}
# qsd's file driver can use io_uring as ours always does; the same engine
# for both backups.
QSD_FILE_OPTS = {"aio": "io_uring"}
QEMU_IMG_ARGS = ["-t", "none", "-T", "none", "-n", "--target-is-zero", "-S", "0"]


# ---------------------------------------------------------------- QMP


class Qmp:
    """A QMP connection: commands, and the events that arrive meanwhile."""

    def __init__(self, path, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError as e:
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise BenchError(f"cannot connect to QMP at {path}: {e}")
                time.sleep(0.02)
        self.buf = b""
        self.events = []
        greeting = self._read(timeout_s)
        if "QMP" not in greeting:
            raise BenchError(f"not a QMP greeting from {path}: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise BenchError(f"no QMP message within {timeout_s:.0f} s")
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("the QMP server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, command, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def reply(self, timeout_s=30.0):
        while True:
            msg = self._read(timeout_s)
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def cmd(self, command, **args):
        self.send(command, **args)
        r = self.reply()
        if "error" in r:
            raise BenchError(f"QMP {command} {args} failed: {r['error']['class']}: {r['error']['desc']}")
        return r["return"]

    def wait_event(self, name, timeout_s):
        """The first event called `name` (earlier ones stay in self.events)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no {name} event within {timeout_s:.0f} s; events: {self.events}")
            msg = self._read(left)
            if "event" not in msg:
                raise BenchError(f"unexpected QMP reply {msg}")
            self.events.append(msg)

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------- setup


def ensure_qemu_utils():
    for tool in (QEMU_IMG, QSD):
        if not shutil.which(tool) and not apt_install("qemu-utils"):
            raise BenchError(f"{tool} is missing and 'apt-get install -y qemu-utils' failed")
    r = subprocess.run([QSD, "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"'{QSD} --version' failed: {r.stderr.strip()}")
    return r.stdout.splitlines()[0].strip()


def check_root():
    if os.geteuid() != 0:
        raise BenchError("run as root: each copy starts with the page cache dropped (/proc/sys/vm/drop_caches)")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fresh_target(path, size):
    """The target for one copy: a new file, preallocated (posix_fallocate) to
    `size`, so no copy allocates blocks while it runs or finds data left over."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- the copies


def file_node(name, path, extra=None):
    return {"driver": "file", "node-name": name, "filename": str(path), **FILE_OPTS, **(extra or {})}


def backup_over_qmp(qmp, source, target, size, extra=None):
    """Adds the two nodes, drops the page cache, and times blockdev-backup
    from the command to BLOCK_JOB_COMPLETED; seconds."""
    qmp.cmd("blockdev-add", **file_node("src", source, extra))
    qmp.cmd("blockdev-add", **file_node("dst", target, extra))
    drop_caches()
    t0 = now_ns()
    qmp.send("blockdev-backup", **{"job-id": "bench", "device": "src", "target": "dst", "sync": "full"})
    r = qmp.reply()
    if "error" in r:
        raise BenchError(f"blockdev-backup failed: {r['error']['class']}: {r['error']['desc']}")
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", COPY_TIMEOUT_S)
    t1 = now_ns()
    data = done.get("data", {})
    if "error" in data or data.get("offset") != size:
        raise BenchError(f"the backup job did not complete cleanly: {done}")
    # The job dismisses itself (auto-dismiss); then the nodes can go.
    deadline = time.monotonic() + 10
    while qmp.cmd("query-jobs") and time.monotonic() < deadline:
        time.sleep(0.01)
    qmp.cmd("blockdev-del", **{"node-name": "dst"})
    qmp.cmd("blockdev-del", **{"node-name": "src"})
    return (t1 - t0) / 1e9


class Server:
    """A QMP server process (our vmm or qsd) with its socket; ended by quit or kill."""

    def __init__(self, cmd, sock):
        self.sock = sock
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.err)
        try:
            self.qmp = Qmp(sock)
        except BenchError as e:
            raise BenchError(f"{e}\n{self.stderr()}") from None

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace").strip()

    def end(self):
        try:
            self.qmp.send("quit")
            self.qmp.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass


def ours_cmd(sock):
    return [str(VMM), "--kernel", str(KERNEL), "--cmdline", "idle", "--qmp", str(sock)]


def qsd_cmd(sock):
    return [QSD, "--chardev", f"socket,path={sock},server=on,wait=off,id=mon", "--monitor", "chardev=mon"]


def copy_ours(source, target, size, workdir):
    sock = workdir / "ours.qmp"
    server = Server(ours_cmd(sock), sock)
    try:
        return backup_over_qmp(server.qmp, source, target, size)
    except BenchError as e:
        raise BenchError(f"ours: {e}\n{server.stderr()}") from None
    finally:
        server.end()


def copy_qsd(source, target, size, workdir):
    sock = workdir / "qsd.qmp"
    server = Server(qsd_cmd(sock), sock)
    try:
        return backup_over_qmp(server.qmp, source, target, size, QSD_FILE_OPTS)
    except BenchError as e:
        raise BenchError(f"qsd: {e}\n{server.stderr()}") from None
    finally:
        server.end()


def qemu_img_cmd(source, target):
    return [QEMU_IMG, "convert", "-f", "raw", "-O", "raw", *QEMU_IMG_ARGS, str(source), str(target)]


def copy_qemu_img(source, target, size, workdir):
    drop_caches()
    t0 = now_ns()
    r = subprocess.run(qemu_img_cmd(source, target), capture_output=True, text=True, timeout=COPY_TIMEOUT_S)
    t1 = now_ns()
    if r.returncode != 0:
        raise BenchError(f"qemu-img convert failed: {r.stderr.strip()}")
    return (t1 - t0) / 1e9


COPY = {"ours": copy_ours, "qemu-img": copy_qemu_img, "qsd": copy_qsd}


def ours_has_backup(workdir):
    sock = workdir / "probe.qmp"
    server = Server(ours_cmd(sock), sock)
    try:
        return any(c["name"] == "blockdev-backup" for c in server.qmp.cmd("query-commands"))
    finally:
        server.end()


# ---------------------------------------------------------------- report


def summary(seconds, size):
    rates = [size / s / 1e6 for s in seconds]
    return {"runs_s": [round(s, 3) for s in seconds], "mb_s": [round(r, 1) for r in rates],
            "median_mb_s": statistics.median(rates), "min_mb_s": min(rates), "max_mb_s": max(rates),
            "median_s": statistics.median(seconds)}


def table(results, ways):
    lines = [f"{'':40} {'runs':>4} {'median MB/s':>12} {'min':>8} {'max':>8} {'median s':>9}"]
    for w in ways:
        r = results[w]
        lines.append(f"{LABEL[w]:40} {len(r['runs_s']):>4} {r['median_mb_s']:>12.1f} {r['min_mb_s']:>8.1f} "
                     f"{r['max_mb_s']:>8.1f} {r['median_s']:>9.3f}")
    if "ours" in results:
        for other in ("qemu-img", "qsd"):
            if other in results:
                lines.append(f"ours/{other} (median MB/s): "
                             f"{results['ours']['median_mb_s'] / results[other]['median_mb_s']:.2f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size(DEFAULT_SIZE),
                    help=f"source image size (default {DEFAULT_SIZE})")
    ap.add_argument("--runs", type=int, default=3, help="copies per way (default 3)")
    ap.add_argument("--only", default=",".join(WAYS),
                    help=f"which ways, comma-separated (default {','.join(WAYS)})")
    ap.add_argument("--image", type=Path, default=None,
                    help="source image (default target/bench/backup-<size>.img; created preallocated "
                         "with random data); the target is written beside it")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    ap.add_argument("--wait-load", type=float, metavar="LOAD", default=None,
                    help="first wait (30 s steps, at most 15 min) until the 1-minute load average is below LOAD")
    args = ap.parse_args()
    ways = [w.strip() for w in args.only.split(",") if w.strip()]
    if not ways or any(w not in WAYS for w in ways):
        ap.error(f"--only takes some of {', '.join(WAYS)}")
    if not 1 <= args.runs <= 100:
        ap.error("--runs must be 1..100")
    if args.size < 1 << 20 or args.size % 4096:
        ap.error("--size must be at least 1M and a multiple of 4K")
    source = args.image or REPO / "target" / "bench" / f"backup-{args.size >> 20}M.img"
    target = source.with_name(source.stem + "-target.img")

    check_root()
    qsd_version = ensure_qemu_utils()
    workdir = Path(tempfile.mkdtemp(prefix="vmm-bench-backup-"))
    try:
        if "ours" in ways:
            check_kvm()
            ensure_kernel()
            ensure_vmm()
            if not ours_has_backup(workdir):
                raise BenchError("our vmm has no blockdev-backup command (block jobs are not in this build); "
                                 "measure the others with --only qemu-img,qsd")
        img = ensure_image(source, args.size)
        log(f"source digest (sha1 of {args.size >> 20} MiB)")
        want = digest(source)
        if args.wait_load is not None:
            wait_for_load(args.wait_load)
        load_before = os.getloadavg()
        started = time.monotonic()
        wall = datetime.datetime.now().astimezone()

        seconds = {w: [] for w in ways}
        for i in range(args.runs):
            order = ways[i % len(ways):] + ways[:i % len(ways)]  # rotate, so no way always goes first
            for w in order:
                fresh_target(target, args.size)
                s = COPY[w](source, target, args.size, workdir)
                got = digest(target)
                if got != want:
                    raise BenchError(f"{w}: run {i + 1}: the target differs from the source "
                                     f"(sha1 {got}, source {want})")
                seconds[w].append(s)
                log(f"run {i + 1} {w}: {s:.3f} s, {args.size / s / 1e6:.1f} MB/s, target verified")
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        target.unlink()
    except FileNotFoundError:
        pass

    results = {w: summary(seconds[w], args.size) for w in ways}
    mc = machine()
    duration = time.monotonic() - started
    print(f"backup benchmark, {wall.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
          f"machine: nproc={mc['nproc']}, kernel {mc['kernel']}, "
          f"{'PVM (kvm_pvm loaded, not hardware KVM)' if mc['kvm_pvm'] else 'kvm_pvm not loaded'}"
          f"{', ' + mc['cpu'] if mc['cpu'] else ''}")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.2f}' for x in load_after)}; {duration:.0f} s")
    print(f"source: {img['path']}, {img['bytes'] >> 20} MiB preallocated random data, {img['fs']} on "
          f"{img['device']}; target: {target.name} beside it, posix_fallocate'd to the same size afresh "
          f"before every copy; page cache dropped before every copy; target checked (sha1) after every copy")
    print(f"all: O_DIRECT on both files; ours and qsd: blockdev-add file nodes cache.direct=true "
          f"(qsd also aio=io_uring), blockdev-backup sync=full, timed from the command to BLOCK_JOB_COMPLETED; "
          f"qemu-img: {' '.join(qemu_img_cmd('SRC', 'DST'))}, timed from spawn to exit; {qsd_version}")
    print()
    print(table(results, ways))
    if args.json:
        res = {"time": wall.isoformat(timespec="seconds"), "machine": mc, "load_before": load_before,
               "load_after": load_after, "image": img, "runs": args.runs, "qsd_version": qsd_version,
               "qemu_img_cmd": qemu_img_cmd("SRC", "DST"), "ours_cmd": ours_cmd("SOCK"),
               "qsd_cmd": qsd_cmd("SOCK"), "results": results, "duration_s": round(duration, 1)}
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    run_main(main, "bench/backup.py")
