#!/usr/bin/env python3
"""NBD export read throughput: `nbdcopy` of one raw image's export to
`null:` from our vmm and from qemu-storage-daemon, in one run.

Both export the same file read-only (a `raw` node over a `file` node, page
cache), on a Unix socket; ours from a release vmm whose test guest idles
(the exported node is an extra `blockdev-add` node no dataplane holds).
Each copy runs --runs times (default 3), with 1 connection and with 4
(multi-conn: both servers advertise it on read-only exports), the servers
rotating. Prints the median MB/s (10^6 bytes/s) with min and max, and the
ratio ours/qsd. See bench/README.md.

    python3 bench/nbd.py [--size 256M] [--runs 3]

Python 3 standard library only; needs /dev/kvm, nbdcopy (libnbd-bin) and
qemu-storage-daemon (qemu-utils).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def size_arg(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def wait_for(path, what, timeout=30):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            sys.exit(f"nbd bench: {what} did not create {path}")
        time.sleep(0.05)


class Qmp:
    def __init__(self, path):
        wait_for(path, "the QMP server")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                sys.exit(f"nbd bench: {name}: {reply['error']['desc']}")
            return reply["return"]


def copy_mbs(uri, connections, size):
    start = time.monotonic()
    subprocess.run(["nbdcopy", f"--connections={connections}", uri, "null:"], check=True)
    return size / (time.monotonic() - start) / 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=size_arg, default=256 << 20)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "vmm"], cwd=ROOT, check=True)
    subprocess.run(["bash", "kernel-images/build.sh"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    tmp = tempfile.mkdtemp(prefix="nbd-bench-")
    image = os.path.join(tmp, "disk.raw")
    with open(image, "wb") as f:
        for _ in range(a.size >> 20):
            f.write(os.urandom(1 << 20))
    vda = os.path.join(tmp, "vda.img")
    open(vda, "wb").truncate(1 << 20)
    qmp_path = os.path.join(tmp, "vmm.qmp")
    ours_sock = os.path.join(tmp, "ours.nbd")
    qsd_sock = os.path.join(tmp, "qsd.nbd")
    vmm = subprocess.Popen(
        [os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/vmm"), "--kernel",
         os.path.join(ROOT, "kernel-images/out/testguest"), "--memory", "64M",
         "--disk", f"path={vda}", "--qmp", qmp_path, "--cmdline", "idle"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    qsd = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={image},read-only=on",
         "--blockdev", "driver=raw,node-name=disk,file=f0,read-only=on",
         "--nbd-server", f"addr.type=unix,addr.path={qsd_sock}",
         "--export", "type=nbd,id=e0,node-name=disk,name=disk"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        q = Qmp(qmp_path)
        q.cmd("blockdev-add", driver="raw", **{"node-name": "disk", "read-only": True},
              file={"driver": "file", "filename": image, "read-only": True})
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": ours_sock}})
        q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk"})
        wait_for(qsd_sock, "qemu-storage-daemon")
        uris = {"ours": f"nbd+unix:///disk?socket={ours_sock}",
                "qsd": f"nbd+unix:///disk?socket={qsd_sock}"}
        # Warm both (and the page cache) once.
        for uri in uris.values():
            copy_mbs(uri, 1, a.size)
        results = {}
        for _ in range(a.runs):
            for conns in (1, 4):
                for who, uri in uris.items():
                    results.setdefault((who, conns), []).append(copy_mbs(uri, conns, a.size))
        print(f"nbdcopy of a {a.size >> 20} MiB raw export to null:, MB/s, "
              f"median of {a.runs} (min-max)")
        print(f"{'connections':<12} {'ours':>24} {'qemu-storage-daemon':>24} {'ours/qsd':>9}")
        for conns in (1, 4):
            row = []
            for who in ("ours", "qsd"):
                r = results[(who, conns)]
                row.append((statistics.median(r), min(r), max(r)))
            cell = lambda m: f"{m[0]:.0f} ({m[1]:.0f}-{m[2]:.0f})"
            print(f"{conns:<12} {cell(row[0]):>24} {cell(row[1]):>24} {row[0][0] / row[1][0]:>9.2f}")
        q.cmd("quit")
    finally:
        for proc in (vmm, qsd):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
