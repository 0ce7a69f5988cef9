#!/usr/bin/env python3
"""virtio-blk benchmark: our vmm against QEMU microvm and the host's fio, in one run.

The test guest (kernel-images/out/testguest) drives the disk from guest
user mode with `blk.bench=...` (on PVM hosts guest user mode runs
natively, and with notifications and interrupts suppressed no exit sits
in the measured loop). Prints three tables (see bench/README.md):

1. Dataplane figures: 4k random read and write at QD 1, 32 and 128,
   128k sequential read and write at QD 32; IOPS, MB/s, mean latency,
   ours against QEMU 7.2 microvm (iothread polling, aio=io_uring,
   cache=none) and against fio on the host (io_uring, O_DIRECT) on the
   same image file.
2. The guest's usual path: the same guest notifying on every request
   (`blk.notify=always`), then also asking for an interrupt on every
   completion (`blk.irq=on`); on PVM hosts this measures exit costs.
3. Evidence, per request: guest notifies, wake-ups, CPU and run-queue
   wait of the dataplane thread (QEMU: its iothread) from /proc, and the
   system calls of the dataplane and vCPU threads from separate,
   shorter runs under `strace -c` (which slows them: its IOPS are shown).

    python3 bench/blk.py [--seconds N] [--size SIZE] [--image FILE] [--fio-runs N]
                         [--quick] [--json FILE] [--wait-load LOAD]

Python 3 standard library only; needs /dev/kvm, QEMU (installed like
bench/startup.py does), fio (apt-get install -y fio if missing) and,
for the system-call counts, strace.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (KERNEL, QEMU_BIN, REPO, SEABIOS_DIR, VMM, BenchError, Run, check_kvm,
                    ensure_kernel, ensure_qemu, ensure_vmm, log, machine, now_ns, run_main)

MEMORY_MIB = 128
CPUS = 1
POLL_US = 1000
QEMU_POLL_MAX_NS = 1000000
DEFAULT_SIZE = "256M"
EVIDENCE_SECONDS = 2

TESTGUEST_DIR = REPO / "kernel-images" / "testguest"

# spec: (fio --rw, fio --bs, bytes, label)
SPECS = {
    "randread4k": ("randread", "4k", 4096, "4k rand read"),
    "randwrite4k": ("randwrite", "4k", 4096, "4k rand write"),
    "seqread128k": ("read", "128k", 131072, "128k seq read"),
    "seqwrite128k": ("write", "128k", 131072, "128k seq write"),
}

# (spec, qd per queue, queues)
TABLE1 = [("randread4k", 1, 1), ("randread4k", 32, 1), ("randread4k", 128, 1),
          ("randwrite4k", 1, 1), ("randwrite4k", 32, 1), ("randwrite4k", 128, 1),
          ("seqread128k", 32, 1), ("seqwrite128k", 32, 1),
          ("randread4k", 128, 2), ("randread4k", 128, 4)]
TABLE1_QUICK = [("randread4k", 1, 1), ("randread4k", 32, 1), ("seqwrite128k", 32, 1)]

# Table 2 guest modes: (key, guest command-line tokens, label)
MODES = [("notify", "blk.notify=always", "notify=always"),
         ("notify+irq", "blk.notify=always blk.irq=on", "notify=always irq=on")]
TABLE2 = [("randread4k", 1), ("randread4k", 32)]
TABLE2_QUICK = [("randread4k", 1)]

# Table 3 rows: (table, spec, qd, queues, table 2 mode or None, extra VMMs run for this row).
# Every row of tables 1 and 2, each with its strace runs.
EXTRA_VMMS = {"seqread128k": ("qemu-nothp",)}


def evidence_rows(t1_rows, t2_rows):
    rows = [(1, spec, qd, queues, None, EXTRA_VMMS.get(spec, ())) for spec, qd, queues in t1_rows]
    rows += [(2, spec, qd, 1, key, ()) for spec, qd in t2_rows for key, _, _ in MODES]
    return rows


VMM_LABEL = {"ours": "ours", "qemu": "QEMU", "qemu-nothp": "QEMU, THP off", "host": "host fio"}

BENCH_RE = re.compile(rb"testguest: blk bench (\S+) vda: (.*)")
# The threads that matter, by VMM: role -> comm (QEMU runs with -name ...,debug-threads=on).
# --placement irq: (the CPU for each VMM's dataplane, the CPU for its vCPU);
# None: both left to the scheduler.
PLACEMENT = None

THREADS = {
    "ours": {"dataplane": "blk-vda", "vcpu": "vcpu0"},
    "qemu": {"dataplane": "IO io0", "vcpu": "CPU 0/KVM", "main": None},  # None: the main thread (tid == pid)
}


# ---------------------------------------------------------------- setup


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMG]?)", s.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 256M, 1G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def apt_install(package):
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if not shutil.which("apt-get"):
        return False
    log(f"'{package}' is missing: {' '.join(cmd)}")
    if subprocess.run(cmd, capture_output=True, env=env).returncode == 0:
        return True
    subprocess.run(["apt-get", "update"], capture_output=True, env=env)
    return subprocess.run(cmd, capture_output=True, env=env).returncode == 0


def ensure_fio():
    if not shutil.which("fio") and not apt_install("fio"):
        raise BenchError("fio is missing and 'apt-get install -y fio' failed: install fio (the host ceiling)")
    r = subprocess.run(["fio", "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"'fio --version' failed: {r.stderr.strip()}")
    return r.stdout.strip()


def ensure_strace():
    if shutil.which("strace") or apt_install("strace"):
        return True
    log("strace is missing and could not be installed: no system-call counts in table 3")
    return False


def ensure_testguest():
    """Rebuilds the test guest when its sources are newer than the binary."""
    ensure_kernel()
    sources = [p for p in TESTGUEST_DIR.rglob("*") if p.is_file() and "target" not in p.parts]
    newest = max((p.stat().st_mtime for p in sources), default=0)
    if newest > KERNEL.stat().st_mtime:
        log("the test guest's sources are newer than kernel-images/out/testguest: rebuilding it")
        r = subprocess.run(["bash", str(TESTGUEST_DIR / "build.sh"), str(KERNEL)], cwd=REPO)
        if r.returncode != 0:
            raise BenchError("'bash kernel-images/testguest/build.sh kernel-images/out/testguest' failed (see above)")
    if b" notify=" not in KERNEL.read_bytes():
        raise BenchError(f"{KERNEL.relative_to(REPO)} lacks blk.notify= (an older test guest): rebuild it with "
                         "'bash kernel-images/testguest/build.sh kernel-images/out/testguest'")


def mount_of(path):
    """(mount point, fs type, source) of the file system holding path."""
    path = os.path.realpath(path)
    best = ("/", "?", "?")
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, src)
    return best


def ensure_image(path, size):
    """A preallocated image full of random data (not sparse), reused if it is one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mnt, fstype, src = mount_of(path.parent)
    if fstype in ("tmpfs", "ramfs", "devtmpfs"):
        raise BenchError(f"{path} is on {fstype}: put the image on a disk file system (--image)")
    try:
        st = path.stat()
        if st.st_size == size and st.st_blocks * 512 >= size:
            return {"path": str(path), "bytes": size, "fs": fstype, "mount": mnt, "device": src, "created": False}
    except FileNotFoundError:
        pass
    log(f"writing {size >> 20} MiB of random data to {path} ({fstype} on {src})")
    tmp = path.with_suffix(".tmp")
    chunk = 1 << 20
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    st = path.stat()
    if st.st_blocks * 512 < size:
        raise BenchError(f"{path} is sparse after writing it ({st.st_blocks * 512} of {size} bytes allocated)")
    return {"path": str(path), "bytes": size, "fs": fstype, "mount": mnt, "device": src, "created": True}


def wait_for_load(limit, max_wait_s=900, step_s=30):
    start = time.monotonic()
    while True:
        load1 = os.getloadavg()[0]
        if load1 < limit:
            return load1
        if time.monotonic() - start >= max_wait_s:
            log(f"1-minute load average still {load1:.2f} after {max_wait_s // 60} minutes: measuring anyway")
            return load1
        log(f"1-minute load average {load1:.2f} >= {limit}: waiting {step_s} s")
        time.sleep(step_s)


# ---------------------------------------------------------------- commands


def row_key(row):
    """'spec:qd' or 'spec:qd:queues' of a (spec, qd, queues) row."""
    spec, qd, queues = row
    return f"{spec}:{qd}" + (f":{queues}" if queues > 1 else "")


def parse_rows(text):
    """--rows: a set of row keys, each one of table 1's."""
    keys = {k.strip() for k in text.split(",") if k.strip()}
    known = {row_key(r) for r in TABLE1}
    unknown = sorted(keys - known)
    if not keys or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown rows {', '.join(unknown) or '(none given)'}; known: {', '.join(sorted(known))}")
    return keys


def guest_cmdline(spec, qd, seconds, extra="", queues=1):
    q = f" blk.queues={queues}" if queues > 1 else ""
    return f"blk.bench={spec} blk.qd={qd}{q} blk.seconds={seconds} exit=0 {extra}".strip()


def image_format(image):
    """qcow2 for a `.qcow2` file, raw otherwise (neither VMM probes)."""
    return "qcow2" if str(image).endswith(".qcow2") else "raw"


def ours_cmd(cmdline, image, queues=1, stats=True, submit_batch=None):
    """Our vmm with its defaults (`submit_batch` None: the default, 4),
    its threads placed by its own options under --placement."""
    q = f",queues={queues}" if queues > 1 else ""
    f = ",format=qcow2" if image_format(image) == "qcow2" else ""
    a = "" if stats else ",stats=off"
    b = "" if submit_batch is None else f",submit-batch={submit_batch}"
    p, pin = "", []
    if PLACEMENT is not None:
        p = f",dataplane-cpus={PLACEMENT[0]}"
        pin = ["--vcpu-affinity", str(PLACEMENT[1])]
    return [str(VMM), "--kernel", str(KERNEL), "--memory", f"{MEMORY_MIB}M", "--cpus", str(CPUS), *pin,
            "--disk", f"path={image},direct=on,poll={POLL_US}{q}{f}{a}{b}{p}", "--cmdline", cmdline]


def qemu_cmd(cmdline, image, boot=None, queues=1):
    """QEMU microvm with the test guest, or with `boot` = (kernel, initrd, memory MiB) for Linux."""
    kernel, initrd, memory = boot or (KERNEL, None, MEMORY_MIB)
    machine = "microvm,acpi=off" + (",auto-kernel-cmdline=off" if boot else "")
    return [
        str(QEMU_BIN), "-name", "blk-bench,debug-threads=on", "-L", str(SEABIOS_DIR),
        "-M", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", str(memory), "-smp", str(CPUS),
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-global", "virtio-mmio.force-legacy=false",
        "-object", f"iothread,id=io0,poll-max-ns={QEMU_POLL_MAX_NS}",
        "-drive", f"file={image},format={image_format(image)},if=none,id=d0,cache=none,aio=io_uring",
        "-device", "virtio-blk-device,drive=d0,iothread=io0" + (f",num-queues={queues}" if queues > 1 else ""),
        "-kernel", str(kernel), *(["-initrd", str(initrd)] if initrd else []), "-append", cmdline,
    ]


# Runs argv[1:] with transparent huge pages disabled for it (prctl
# PR_SET_THP_DISABLE, inherited across exec; the pid stays the same).
NO_THP = ("import ctypes, os, sys\n"
          "if ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) != 0:\n"
          "    sys.exit('prctl(PR_SET_THP_DISABLE) failed')\n"
          "os.execv(sys.argv[1], sys.argv[1:])\n")


def vmm_cmd(vmm, cmdline, image, queues=1):
    if vmm == "ours":
        return ours_cmd(cmdline, image, queues)
    if vmm == "ours-nostats":
        return ours_cmd(cmdline, image, queues, stats=False)
    if vmm == "ours-onecall":
        return ours_cmd(cmdline, image, queues, submit_batch=0)
    if vmm == "qemu":
        return qemu_cmd(cmdline, image, queues=queues)
    if vmm == "qemu-nothp":
        return [sys.executable, "-c", NO_THP, *qemu_cmd(cmdline, image, queues=queues)]
    raise ValueError(vmm)


def fio_cmd(spec, qd, seconds, image, queues=1):
    """The host's own fio; one job per guest queue, each with the guest's per-queue depth."""
    rw, bs, _, _ = SPECS[spec]
    return ["fio", "--name=blk", "--ioengine=io_uring", "--direct=1", f"--iodepth={qd}", f"--rw={rw}",
            f"--bs={bs}", f"--filename={image}", "--time_based", f"--runtime={seconds}",
            f"--numjobs={queues}", "--group_reporting", "--output-format=json"]


# ---------------------------------------------------------------- /proc


def disk_irqs(image):
    """{irq number: name} for the interrupts of the disk holding `image`,
    found through /sys/dev/block and matched by device name in
    /proc/interrupts; empty where that does not work (a device mapper, an NFS file)."""
    st = os.stat(image)
    try:
        dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    except OSError:
        return {}
    disk = dev if (dev / "device").exists() else dev.parent  # a partition's parent is its disk
    try:
        name = (disk / "device").resolve().name  # virtio1, nvme0, ...
    except OSError:
        return {}
    out = {}
    with open("/proc/interrupts") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0].rstrip(":").isdigit() and any(name + "-" in x or x == name for x in fields):
                out[int(fields[0].rstrip(":"))] = fields[-1]
    return out


def irq_placement(image):
    """(dataplane CPU, vCPU CPU) for --placement irq: the dataplane on the
    one CPU that takes the completion interrupts of `image`'s disk, the
    vCPU on another. Raises BenchError where no single CPU takes them."""
    irqs = {n: name for n, name in disk_irqs(image).items() if not name.endswith("-config")}
    cpus = set()
    for n in irqs:
        try:
            cpus.add(Path(f"/proc/irq/{n}/effective_affinity_list").read_text().strip())
        except OSError as e:
            raise BenchError(f"cannot read where interrupt {n} ({irqs[n]}) goes: {e}")
    if len(cpus) != 1 or not next(iter(cpus)).isdigit():
        raise BenchError(f"--placement irq needs the disk's interrupts on one CPU; {image}'s disk has "
                         f"{', '.join(f'{n} ({name})' for n, name in irqs.items()) or 'none found'} "
                         f"on {', '.join(sorted(cpus)) or 'no CPU'}")
    irq_cpu = int(next(iter(cpus)))
    others = sorted(c for c in os.sched_getaffinity(0) if c != irq_cpu)
    if not others:
        raise BenchError(f"--placement irq needs a second CPU beside CPU {irq_cpu}")
    return irq_cpu, others[0], irqs


def place_qemu(tids):
    """--placement for QEMU, which has no affinity option: its iothread and
    vCPU thread moved with taskset as soon as the guest's disk is up."""
    if PLACEMENT is None:
        return
    for role, cpu in (("dataplane", PLACEMENT[0]), ("vcpu", PLACEMENT[1])):
        if role not in tids:
            raise BenchError(f"QEMU's {role} thread was not found, so it cannot be placed")
        subprocess.run(["taskset", "-pc", str(cpu), str(tids[role])], capture_output=True, check=True)


def find_threads(pid, vmm):
    """role -> tid for THREADS[vmm]; waits a little for them to appear."""
    want = THREADS[vmm]
    deadline = time.monotonic() + 2
    while True:
        found = {}
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n")
                except OSError:
                    continue
                for role, name in want.items():
                    if (name is None and int(tid) == pid) or comm == name:
                        found[role] = int(tid)
        except OSError:
            pass
        if len(found) == len(want) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def thread_sample(pid, tid):
    """Counters of one thread: context switches, CPU (user, system), run-queue wait."""
    base = f"/proc/{pid}/task/{tid}"
    try:
        status = Path(f"{base}/status").read_text()
        stat = Path(f"{base}/stat").read_text()
        sched = Path(f"{base}/schedstat").read_text().split()
        io = dict(l.split(": ") for l in Path(f"{base}/io").read_text().splitlines())
    except OSError:
        return None
    vol = int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status).group(1))
    invol = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status).group(1))
    fields = stat[stat.rindex(")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"voluntary_cs": vol, "involuntary_cs": invol,
            "utime_s": int(fields[11]) / tick, "stime_s": int(fields[12]) / tick,
            "oncpu_s": int(sched[0]) / 1e9, "runq_wait_s": int(sched[1]) / 1e9,
            # read(2)/write(2)-family calls, counted by the kernel (no tracing).
            "syscr": int(io["syscr"]), "syscw": int(io["syscw"])}


def process_cpu(pid):
    """On-CPU seconds of all threads of pid (schedstat), and their run-queue wait."""
    oncpu = wait = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for tid in tids:
        try:
            sched = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:
            continue
        oncpu += int(sched[0]) / 1e9
        wait += int(sched[1]) / 1e9
    return oncpu, wait


def anon_huge_mib(pid):
    """AnonHugePages of pid (transparent huge pages: for a VMM, mostly guest RAM)."""
    try:
        m = re.search(r"AnonHugePages:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def proc_ticks():
    """pid -> (comm, utime + stime ticks) of every process (threads summed by the kernel)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        comm = st[st.index("(") + 1:st.rindex(")")]
        f = st[st.rindex(")") + 2:].split()
        out[int(d)] = (comm, int(f[11]) + int(f[12]))
    return out


def others(before, after, exclude, seconds):
    """CPUs used by processes not in exclude between two proc_ticks(), and the top three."""
    tick = os.sysconf("SC_CLK_TCK")
    used = []
    for pid, (comm, t1) in after.items():
        if pid in exclude:
            continue
        t0 = before.get(pid, (comm, 0))[1] if pid in before else 0
        if t1 - t0 > 0:
            used.append((comm, (t1 - t0) / tick / seconds))
    used.sort(key=lambda x: -x[1])
    return sum(c for _, c in used), [(c, round(x, 2)) for c, x in used[:3]]


def cpu_ticks():
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (ticks, all CPUs)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def cpu_split(a, b):
    """CPUs busy between two cpu_ticks(): in tasks (user, nice, system), in interrupts (irq,
    softirq), and stolen by the hypervisor this machine runs on (steal)."""
    d = [y - x for x, y in zip(a, b)]
    n = os.cpu_count() / max(1, sum(d))
    return {"tasks": (d[0] + d[1] + d[2]) * n, "irq": (d[5] + d[6]) * n, "steal": d[7] * n}


# ---------------------------------------------------------------- running


def parse_bench(line):
    spec, rest = line
    if rest.startswith(b"FAILED"):
        return None
    kv = dict(tok.split(b"=", 1) for tok in rest.split() if b"=" in tok)
    return {k.decode(): v.decode() for k, v in kv.items()}


def run_guest(vmm, spec, qd, seconds, image, extra="", sample=True, strace=False, queues=1):
    """One VM running one benchmark. Returns the guest's figures, plus
    per-thread /proc deltas over a window inside the benchmark (sample)
    or the strace -c summaries of the interesting threads (strace)."""
    cmdline = guest_cmdline(spec, qd, seconds, extra, queues)
    cmd = vmm_cmd(vmm, cmdline, image, queues)
    timeout = seconds + 30
    run = Run(cmd)
    tracers = {}
    res = {"vmm": vmm, "spec": spec, "qd": qd, "queues": queues, "extra": extra}
    try:
        t_dev = run.wait_line(b"testguest: blk vda:", timeout)
        dev = next(l for _, l in run.lines if l.startswith(b"testguest: blk vda:"))
        if b"FAILED" in dev:
            raise BenchError(run.describe("the guest could not set up the disk"))
        pid = run.proc.pid
        tids = find_threads(pid, "ours" if vmm.startswith("ours") else "qemu")
        if vmm.startswith("qemu"):
            place_qemu(tids)
        if strace:
            for role, tid in tids.items():
                out = Path(f"/tmp/blk-bench-strace-{os.getpid()}-{role}.txt")
                p = subprocess.Popen(["strace", "-c", "-q", "-o", str(out), "-p", str(tid)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
                tracers[role] = (p, out)
        elif sample:
            # A window inside the benchmark: skip its first 0.25 s, end 0.25 s early.
            window = max(0.3, seconds - 0.5)
            t0 = t_dev + int(0.25e9)
            time.sleep(max(0.0, (t0 - now_ns()) / 1e9))
            a = {r: thread_sample(pid, t) for r, t in tids.items()}
            oa = proc_ticks()
            ca, pa, ta = cpu_ticks(), process_cpu(pid), now_ns()
            time.sleep(window)
            b = {r: thread_sample(pid, t) for r, t in tids.items()}
            cb, pb, tb = cpu_ticks(), process_cpu(pid), now_ns()
            ob = proc_ticks()
            dt = (tb - ta) / 1e9
            res["window_s"] = dt
            res["threads"] = {r: {k: b[r][k] - a[r][k] for k in a[r]} for r in a if a[r] and b.get(r)}
            # CPUs over the window: the whole machine (tasks, interrupts, steal), this VMM's
            # threads, and the other tasks (processes, short-lived ones too, and kernel threads).
            split = cpu_split(ca, cb)
            res["machine_cpus"], res["irq_cpus"], res["steal_cpus"] = split["tasks"], split["irq"], split["steal"]
            res["vmm_cpus"] = (pb[0] - pa[0]) / dt
            res["vmm_runq_cpus"] = (pb[1] - pa[1]) / dt
            # Tick-based like /proc/stat, so the two subtract: the VMM's user + system ticks.
            vmm_ticks = (ob.get(pid, ("", 0))[1] - oa.get(pid, ("", 0))[1]) / os.sysconf("SC_CLK_TCK") / dt
            res["other_cpus"] = max(0.0, split["tasks"] - vmm_ticks)
            _, res["other_top"] = others(oa, ob, {pid, os.getpid()}, dt)
            res["thp_mib"] = anon_huge_mib(pid)
        _, status = run.wait_exit(timeout)
    finally:
        run.kill()
        for role, (p, out) in tracers.items():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
                p.wait()
    want = 0 if vmm.startswith("ours") else 1  # QEMU's isa-debug-exit: (0 << 1) | 1
    found = [BENCH_RE.match(l) for _, l in run.lines]
    found = [m for m in found if m]
    if status != want or not found:
        raise BenchError(run.describe(f"exit status {status} (expected {want}) or no bench line"))
    figures = parse_bench((found[-1].group(1), found[-1].group(2)))
    if figures is None:
        raise BenchError(run.describe("the benchmark FAILED"))
    res.update({k: float(figures[k]) for k in ("iops", "mbps", "lat_us", "seconds")})
    res.update({k: int(figures[k]) for k in ("ops", "notifies", "qd")})
    res["notify"], res["irq"] = figures.get("notify", "auto"), figures.get("irq", "off")
    if strace:
        res["strace"] = {}
        for role, (p, out) in tracers.items():
            try:
                res["strace"][role] = parse_strace(out.read_text())
                out.unlink()
            except OSError:
                err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
                log(f"strace of {vmm}'s {role} thread gave no summary {err}")
    return res


def parse_strace(text):
    """syscall -> calls, from a strace -c summary."""
    calls = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5 or not re.fullmatch(r"[\d.]+", f[0]) or f[-1] == "total":
            continue
        calls[f[-1]] = int(f[3])
    return calls


def fio_result(text, spec):
    """IOPS, MB/s, mean latency and I/O count from fio's JSON output, wherever it starts in `text`."""
    j = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]["jobs"][0]
    d = j["write" if "write" in SPECS[spec][0] else "read"]
    return j, {"iops": d["iops"], "mbps": d["bw_bytes"] / 1e6, "lat_us": d["lat_ns"]["mean"] / 1e3,
               "ops": d["total_ios"]}


def run_fio(spec, qd, seconds, image, queues=1):
    oa, ca, ta = proc_ticks(), cpu_ticks(), now_ns()
    p = subprocess.Popen(fio_cmd(spec, qd, seconds, image, queues), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise BenchError(f"fio did not end within {seconds + 60} s")
    ob, cb, dt = proc_ticks(), cpu_ticks(), (now_ns() - ta) / 1e9
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    if r.returncode != 0:
        raise BenchError(f"fio failed ({' '.join(fio_cmd(spec, qd, seconds, image))}):\n{r.stderr.strip()}")
    j, fig = fio_result(r.stdout, spec)
    # Over fio's whole run (start-up included): busy CPUs, fio's own (usr_cpu + sys_cpu, %), the rest.
    split = cpu_split(ca, cb)
    fio_cpus = (j.get("usr_cpu", 0) + j.get("sys_cpu", 0)) / 100
    _, top = others(oa, ob, {p.pid, os.getpid()}, dt)
    return {"vmm": "host", "spec": spec, "qd": qd, **fig, "machine_cpus": split["tasks"],
            "irq_cpus": split["irq"], "steal_cpus": split["steal"], "fio_cpus": fio_cpus,
            "other_cpus": max(0.0, split["tasks"] - fio_cpus), "other_top": top}


# ---------------------------------------------------------------- fio in a Linux guest (hardware KVM)

LINUX = REPO / "kernel-images" / "out" / "vmlinux"
INITRD = REPO / "kernel-images" / "out" / "initramfs.cpio.gz"
LINUX_MEMORY_MIB = 512
# With auto-kernel-cmdline=off QEMU microvm does not append this itself (it
# would put it after `--`, where the kernel no longer reads parameters).
QEMU_FIRST_VIRTIO_MMIO = "virtio_mmio.device=512@0xfeb00e00:12"


def linux_fio_cmd(vmm, spec, qd, seconds, image):
    rw, bs, _, _ = SPECS[spec]
    fio = (f"fio --name=blk --ioengine=io_uring --direct=1 --iodepth={qd} --rw={rw} --bs={bs} "
           f"--filename=/dev/vda --time_based --runtime={seconds} --output-format=json")
    kernel_params = "console=ttyS0 reboot=k panic=1 loglevel=1"
    if vmm == "ours":
        return [str(VMM), "--kernel", str(LINUX), "--initrd", str(INITRD), "--memory", f"{LINUX_MEMORY_MIB}M",
                "--cpus", str(CPUS), "--disk", f"path={image},direct=on,poll={POLL_US}",
                "--cmdline", f"{kernel_params} -- {fio}"]
    return qemu_cmd(f"{kernel_params} {QEMU_FIRST_VIRTIO_MMIO} -- {fio}", image,
                    boot=(LINUX, INITRD, LINUX_MEMORY_MIB))


def run_linux_fio(vmm, spec, qd, seconds, image):
    """fio inside a Linux guest (the initramfs runs what follows `--`); needs guest user space."""
    argv = linux_fio_cmd(vmm, spec, qd, seconds, image)
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=seconds + 180)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{vmm}: the Linux guest running fio did not end within {seconds + 180} s")
    out = r.stdout
    ready = out.find("vmm-initramfs: ready")
    # The initramfs reports fio's status through the exit port: ours exits with it, QEMU with (v << 1) | 1.
    ok = r.returncode == (0 if vmm == "ours" else 1)
    if ready < 0 or not ok:
        raise BenchError(f"{vmm}: fio in the Linux guest failed (exit {r.returncode}); last output:\n"
                         + "\n".join(out.splitlines()[-15:]))
    _, fig = fio_result(out[ready:], spec)
    return {"vmm": vmm, "spec": spec, "qd": qd, **fig}


def table4(rows):
    head = f"{'':20}|{'ours':^27}|{'QEMU':^27}| ours/"
    sub = f"{'':20}|{'IOPS':>10}{'MB/s':>8}{'lat µs':>9} |{'IOPS':>10}{'MB/s':>8}{'lat µs':>9} |  QEMU"
    lines = [head, sub, "-" * len(sub)]
    for r in rows:
        cells = "".join(f"|{num(r[w]['iops'], 10)}{num(r[w]['mbps'], 8, 1)}{num(r[w]['lat_us'], 9, 1)} "
                        for w in ("ours", "qemu"))
        lines.append(f"{row_label(r['spec'], r['qd']):20}{cells}|{ratio(r['ours']['iops'], r['qemu']['iops']):>6}")
    return "\n".join(lines)


# ---------------------------------------------------------------- report


def num(v, width, prec=0):
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:{width},.{prec}f}" if prec == 0 else f"{v:{width}.{prec}f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def per_req(v, iops, window):
    return v / (iops * window) if iops and window else None


def row_label(spec, qd, queues=1):
    return f"{SPECS[spec][3]} QD{qd}" + (f" x{queues}q" if queues > 1 else "")


OTHER_WARN = 0.3


def disturbed(points):
    """Lines naming the points during which something else used more than OTHER_WARN CPUs."""
    out = []
    for label, who, x in points:
        o, st = x.get("other_cpus") or 0, x.get("steal_cpus") or 0
        if o > OTHER_WARN or st > OTHER_WARN:
            top = ", ".join(f"{c} {v:.2f}" for c, v in x.get("other_top", []) if v >= 0.05)
            out.append(f"  {label}, {VMM_LABEL[who]}: other tasks {o:.2f} CPUs"
                       f"{f' (long-lived: {top})' if top else ''}, stolen {st:.2f} CPUs")
    return out


def cpu_us_per_req(x):
    """The dataplane thread's (QEMU: its iothread's) CPU µs per request over the sample window."""
    dp = (x.get("threads") or {}).get("dataplane")
    return per_req(dp["oncpu_s"] * 1e6, x.get("iops"), x.get("window_s")) if dp else None


def spread(x):
    runs = x.get("runs_iops") or []
    return f"{min(runs):,.0f}-{max(runs):,.0f}" if len(runs) > 1 else "-"


def table1(rows):
    head = (f"{'':24} | {'ours':^40} | {'QEMU':^40} | {'host fio':^26} | {'ours/':>5} {'ours/':>5}\n"
            f"{'':24} | {'IOPS':>9} {'min-max':>15} {'lat µs':>7} {'cpu µs':>6} | {'IOPS':>9} {'min-max':>15} "
            f"{'lat µs':>7} {'cpu µs':>6} | {'IOPS':>9} {'min-max':>15} | {'QEMU':>5} {'host':>5}")
    out = [head, "-" * len(head.splitlines()[1])]
    points = []
    for r in rows:
        q = r.get("queues", 1)
        label = row_label(r["spec"], r["qd"], q)
        cells = []
        for k in ("ours", "qemu"):
            x = r[k]
            cells.append(f"{num(x['iops'], 9)} {spread(x):>15} {num(x['lat_us'], 7, 1)} {num(cpu_us_per_req(x), 6, 1)}")
            points.append((label, k, x))
        h = r["host"]
        cells.append(f"{num(h['iops'], 9)} {spread(h):>15}")
        points.append((label, "host", h))
        out.append(f"{label:24} | {' | '.join(cells)} | "
                   f"{ratio(r['ours']['iops'], r['qemu']['iops']):>5} {ratio(r['ours']['iops'], r['host']['iops']):>5}")
    warn = disturbed(points)
    if warn:
        out.append(f"Disturbed points: other tasks (processes, kernel threads) busy on more than {OTHER_WARN} CPUs, "
                   "or as much stolen by the hypervisor under this machine:")
        out.extend(warn)
    return "\n".join(out)


def table_ab(rows, variant, on, off):
    """Tables 5 and 6: our default (`on`) and `variant` (`off`), the ratio off/on."""
    head = (f"{'':24} | {on:^33} | {off:^33} | {'off/':>5}\n"
            f"{'':24} | {'IOPS':>9} {'min-max':>15} {'cpu µs':>6} | {'IOPS':>9} {'min-max':>15} {'cpu µs':>6} | {'on':>5}")
    out = [head, "-" * len(head.splitlines()[1])]
    for r in rows:
        label = row_label(r["spec"], r["qd"], r.get("queues", 1))
        cells = [f"{num(r[k]['iops'], 9)} {spread(r[k]):>15} {num(cpu_us_per_req(r[k]), 6, 1)}"
                 for k in ("ours", variant)]
        out.append(f"{label:24} | {' | '.join(cells)} | {ratio(r[variant]['iops'], r['ours']['iops']):>5}")
    return "\n".join(out)


def median_runs(runs):
    """{who: its median run (the lower middle one for an even count), with every run's IOPS}."""
    out = {}
    for who, xs in runs.items():
        ranked = sorted(xs, key=lambda x: x["iops"])
        out[who] = dict(ranked[(len(ranked) - 1) // 2])
        out[who]["runs_iops"] = [round(x["iops"]) for x in xs]
    return out


def ours_against(t1_rows, variant, table, on, off, image, seconds, reps):
    """Our default against `variant` on every table 1 row, alternating; the median run of each."""
    log(f"table {table}: {len(t1_rows)} rows x ({on}, {off}) x {reps} repetitions, {seconds} s each")
    out = []
    for i, (spec, qd, queues) in enumerate(t1_rows):
        row = {"spec": spec, "qd": qd, "queues": queues}
        runs = {"ours": [], variant: []}
        for rep in range(reps):
            order = ["ours", variant] if (i + rep) % 2 == 0 else [variant, "ours"]
            for who in order:
                runs[who].append(run_guest(who, spec, qd, seconds, image, queues=queues))
        row.update(median_runs(runs))
        log(f"  {row_label(spec, qd, queues)}: {on} {row['ours']['iops']:.0f}, {off} {row[variant]['iops']:.0f} IOPS")
        out.append(row)
    return out


def table2(rows, t1):
    head = (f"{'':19} {'guest':20} | {'ours':^33} | {'QEMU':^33} | {'ours/':>5} | {'table 1 IOPS':^17}\n"
            f"{'':19} {'':20} | {'IOPS':>9} {'lat µs':>9} {'ntf/req':>8} {'oth':>4} | {'IOPS':>9} {'lat µs':>9} "
            f"{'ntf/req':>8} {'oth':>4} | {'QEMU':>5} | {'ours':>8} {'QEMU':>8}")
    out = [head, "-" * len(head.splitlines()[1])]
    points = []
    for r in rows:
        base = next((x for x in t1 if x["spec"] == r["spec"] and x["qd"] == r["qd"]), None)
        cells = []
        for k in ("ours", "qemu"):
            x = r[k]
            cells.append(f"{num(x['iops'], 9)} {num(x['lat_us'], 9, 1)} {num(x['notifies'] / max(1, x['ops']), 8, 3)} "
                         f"{num(x.get('other_cpus'), 4, 1)}")
            points.append((f"{row_label(r['spec'], r['qd'])} {r['mode_label']}", k, x))
        b = (f"{num(base['ours']['iops'], 8)} {num(base['qemu']['iops'], 8)}" if base else f"{'-':>8} {'-':>8}")
        out.append(f"{row_label(r['spec'], r['qd']):19} {r['mode_label']:20} | {' | '.join(cells)} | "
                   f"{ratio(r['ours']['iops'], r['qemu']['iops']):>5} | {b}")
    warn = disturbed(points)
    if warn:
        out.append("Disturbed points (as in table 1):")
        out.extend(warn)
    return "\n".join(out)


def table3(evidence):
    """Per request: /proc figures from the table runs, system calls from the strace runs."""
    h1 = (f"{'':28} {'':13} | {'from the table runs (/proc), per request':^91} | "
          f"{'separate runs under strace -c, per request':^62}")
    h2 = (f"{'row':28} {'VMM':13} | {'IOPS':>7} {'ntf':>6} {'wake':>6} {'cpu µs':>7} {'sys µs':>7} "
          f"{'runq µs':>7} {'vcpu rq':>7} {'rd':>6} {'wr':>5} {'CPUs':>4} {'irq':>4} {'stl':>4} {'oth':>4} {'THP':>4} | "
          f"{'IOPS':>7} {'sysc':>6} "
          f"{'uring':>6} {'read':>6} {'poll':>6} {'write':>6} {'other':>6} {'vcpu':>6} {'main':>6}")
    out = [h1, h2, "-" * len(h2)]
    for e in evidence:
        for vmm in e["vmms"]:
            x = e[vmm]
            s = x.get("sample") or {}
            th = s.get("threads", {})
            dp, vc = th.get("dataplane"), th.get("vcpu")
            w, iops = s.get("window_s"), s.get("iops")

            def pr(key, scale=1.0, thread=dp):
                return per_req(thread[key] * scale, iops, w) if thread else None
            cells = [num(iops, 7), num(s["notifies"] / max(1, s["ops"]) if s else None, 6, 3),
                     num(pr("voluntary_cs"), 6, 3), num(pr("oncpu_s", 1e6), 7, 1), num(pr("stime_s", 1e6), 7, 1),
                     num(pr("runq_wait_s", 1e6), 7, 1), num(pr("runq_wait_s", 1e6, vc), 7, 1),
                     num(pr("syscr"), 6, 1), num(pr("syscw"), 5, 2),
                     num(s.get("machine_cpus"), 4, 2), num(s.get("irq_cpus"), 4, 2), num(s.get("steal_cpus"), 4, 2),
                     num(s.get("other_cpus"), 4, 2), num(s.get("thp_mib"), 4)]
            st = x.get("strace")
            if st and st.get("strace"):
                ops = max(1, st["ops"])
                d = st["strace"].get("dataplane", {})
                uring, rd, wr = d.get("io_uring_enter", 0), d.get("read", 0), d.get("write", 0)
                pl = sum(d.get(k, 0) for k in ("epoll_wait", "epoll_pwait", "ppoll", "poll"))
                tot = sum(d.values())
                vcpu = sum(st["strace"].get("vcpu", {}).values())
                main = sum(st["strace"]["main"].values()) if "main" in st["strace"] else None
                scells = [num(st["iops"], 7), num(tot / ops, 6, 3), num(uring / ops, 6, 3), num(rd / ops, 6, 3),
                          num(pl / ops, 6, 3), num(wr / ops, 6, 3), num((tot - uring - rd - pl - wr) / ops, 6, 3),
                          num(vcpu / ops, 6, 3), num(main / ops if main is not None else None, 6, 3)]
            else:
                scells = [f"{'-':>7}"] + [f"{'-':>6}"] * 8
            out.append(f"{e['label']:28} {VMM_LABEL[vmm]:13} | {' '.join(cells)} | {' '.join(scells)}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=None, help="seconds per point (default 3; 1 with --quick)")
    ap.add_argument("--size", type=parse_size, default=parse_size(DEFAULT_SIZE),
                    help=f"image size (default {DEFAULT_SIZE})")
    ap.add_argument("--image", type=Path, default=None,
                    help="image file (default target/bench/blk-<size>.img; created preallocated with random data)")
    ap.add_argument("--quick", action="store_true", help="a subset of the rows, for a smoke run")
    ap.add_argument("--fio-runs", type=int, default=None, metavar="N",
                    help="host fio runs per point, the best one counts (default 2; 1 with --quick)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    ap.add_argument("--reps", type=int, default=1, metavar="N",
                    help="tables 1, 2, 5 and 6: N alternating repetitions of every row; the median run counts")
    ap.add_argument("--no-accounting", action="store_true",
                    help="leave out table 5 (our I/O accounting on and off)")
    ap.add_argument("--rows", type=parse_rows, default=None, metavar="SPEC:QD[:QUEUES],...",
                    help="only these rows of tables 1 and 2 (e.g. seqread128k:32,randread4k:128:2)")
    ap.add_argument("--no-batching", action="store_true",
                    help="leave out table 6 (submit-batch=4, the default, against 0)")
    ap.add_argument("--placement", choices=("none", "irq"), default="none",
                    help="irq: each VMM's dataplane (QEMU: its iothread) on the CPU that takes the disk's "
                         "interrupts and its vCPU on another (ours: --vcpu-affinity and dataplane-cpus=; "
                         "QEMU: taskset); none (default): the scheduler places them. Host fio is never pinned")
    ap.add_argument("--wait-load", type=float, metavar="LOAD", default=None,
                    help="first wait (30 s steps, at most 15 min) until the 1-minute load average is below LOAD")
    args = ap.parse_args()
    seconds = args.seconds if args.seconds is not None else (1 if args.quick else 3)
    if args.fio_runs is None:
        args.fio_runs = 1 if args.quick else 2
    if args.fio_runs < 1:
        ap.error("--fio-runs must be at least 1")
    if not 1 <= seconds <= 3600:
        ap.error("--seconds must be 1..3600")
    if args.size < 1 << 20 or args.size % 4096:
        ap.error("--size must be at least 1M and a multiple of 4K")
    image = args.image or REPO / "target" / "bench" / f"blk-{args.size >> 20}M.img"

    check_kvm()
    ensure_testguest()
    ensure_vmm()
    qemu_version = ensure_qemu()
    fio_version = ensure_fio()
    have_strace = ensure_strace()
    img = ensure_image(image, args.size)
    global PLACEMENT
    if args.placement == "irq":
        dataplane_cpu, vcpu_cpu, irqs = irq_placement(image)
        PLACEMENT = (dataplane_cpu, vcpu_cpu)
        log(f"placement: dataplanes on CPU {dataplane_cpu} (the disk's interrupts: "
            f"{', '.join(f'{n} ({name})' for n, name in irqs.items())}), vCPUs on CPU {vcpu_cpu}")
    if args.wait_load is not None:
        wait_for_load(args.wait_load)
    load_before = os.getloadavg()
    started = time.monotonic()
    wall = datetime.datetime.now().astimezone()

    t1_rows = TABLE1_QUICK if args.quick else TABLE1
    t2_rows = TABLE2_QUICK if args.quick else TABLE2
    if args.rows:
        t1_rows = [r for r in TABLE1 if row_key(r) in args.rows]
        t2_rows = [r for r in TABLE2 if row_key((*r, 1)) in args.rows]
    ev_rows = evidence_rows(t1_rows, t2_rows)
    modes = dict((k, (tok, label)) for k, tok, label in MODES)

    # Warm-up (page cache of the binaries, the image's extents): one short unmeasured run each.
    for vmm in ("ours", "qemu"):
        run_guest(vmm, "randread4k", 32, 1, image, sample=False)

    log(f"table 1: {len(t1_rows)} rows x (ours, QEMU, host fio) x {args.reps} repetitions, {seconds} s each")
    t1 = []
    for i, (spec, qd, queues) in enumerate(t1_rows):
        row = {"spec": spec, "qd": qd, "queues": queues}
        runs = {"ours": [], "qemu": [], "host": []}
        for rep in range(args.reps):
            order = ["ours", "qemu", "host"]
            k = (i + rep) % 3
            order = order[k:] + order[:k]  # rotate, so no VMM always runs first
            for who in order:
                if who == "host":
                    # The ceiling: the best of --fio-runs runs (a fio that sleeps in io_uring_enter
                    # is the most exposed to CPU stolen by the hypervisor under this machine).
                    fio = [run_fio(spec, qd, seconds, image, queues) for _ in range(args.fio_runs)]
                    runs["host"].append(max(fio, key=lambda x: x["iops"]))
                else:
                    runs[who].append(run_guest(who, spec, qd, seconds, image, queues=queues))
        row.update(median_runs(runs))
        log(f"  {row_label(spec, qd, queues)}: ours {row['ours']['iops']:.0f}, QEMU {row['qemu']['iops']:.0f}, "
            f"host {row['host']['iops']:.0f} IOPS (medians of {args.reps})")
        t1.append(row)

    t2 = []
    log(f"table 2: {len(t2_rows)} rows x {len(MODES)} guest modes x (ours, QEMU) x {args.reps} repetitions, "
        f"{seconds} s each")
    for spec, qd in t2_rows:
        for key, tok, label in MODES:
            row = {"spec": spec, "qd": qd, "mode": key, "mode_label": label, "guest_tokens": tok}
            runs = {"ours": [], "qemu": []}
            for rep in range(args.reps):
                for who in ("ours", "qemu") if (len(t2) + rep) % 2 == 0 else ("qemu", "ours"):
                    runs[who].append(run_guest(who, spec, qd, seconds, image, extra=tok))
            row.update(median_runs(runs))
            log(f"  {row_label(spec, qd)} {label}: ours {row['ours']['iops']:.0f}, QEMU {row['qemu']['iops']:.0f} IOPS"
                f" (medians of {args.reps})")
            t2.append(row)

    evidence = []
    log(f"table 3: {len(ev_rows)} rows; strace -c runs of {EVIDENCE_SECONDS} s")
    for table, spec, qd, queues, mode, extra_vmms in ev_rows:
        src = (next((r for r in t1 if (r["spec"], r["qd"], r["queues"]) == (spec, qd, queues)), None)
               if table == 1 else
               next((r for r in t2 if r["spec"] == spec and r["qd"] == qd and r["mode"] == mode), None))
        label = f"T{table} {spec} QD{qd}" + (f"x{queues}q" if queues > 1 else "") + (f" {mode}" if mode else "")
        e = {"table": table, "spec": spec, "qd": qd, "queues": queues, "mode": mode, "label": label,
             "vmms": ["ours", "qemu", *extra_vmms]}
        tokens = modes[mode][0] if mode else ""
        for vmm in e["vmms"]:
            sample = src.get(vmm) if src else None
            if sample is None:
                sample = run_guest(vmm, spec, qd, seconds, image, extra=tokens, queues=queues)
            e[vmm] = {"sample": sample}
            if have_strace and vmm in ("ours", "qemu"):
                e[vmm]["strace"] = run_guest(vmm, spec, qd, EVIDENCE_SECONDS, image, extra=tokens,
                                             sample=False, strace=True, queues=queues)
        evidence.append(e)

    # Table 5: what our I/O accounting costs: the table 1 rows with `stats=off` (counters
    # only, no clock reads) against the default, alternating.
    t5 = [] if args.no_accounting else ours_against(t1_rows, "ours-nostats", "5", "stats=on", "stats=off",
                                                    image, seconds, args.reps)
    # Table 6: what handing requests to the kernel 4 at a time gives: the table 1 rows with
    # `submit-batch=0` (all a round took, in one io_uring_enter) against the default.
    t6 = [] if args.no_batching else ours_against(t1_rows, "ours-onecall", "6", "submit-batch=4",
                                                  "submit-batch=0", image, seconds, args.reps)

    # Table 4: the same rows with fio inside a Linux guest, where guest user space can run.
    pvm = Path("/sys/module/kvm_pvm").exists()
    t4 = []
    if not pvm:
        log(f"table 4: {len(t1_rows)} rows x (ours, QEMU) with fio in a Linux guest, {seconds} s each")
        for spec, qd, queues in t1_rows:
            if queues > 1:
                continue  # the Linux guest's fio here drives one queue
            row = {"spec": spec, "qd": qd}
            for who in ("ours", "qemu") if len(t4) % 2 == 0 else ("qemu", "ours"):
                row[who] = run_linux_fio(who, spec, qd, seconds, image)
            log(f"  {row_label(spec, qd)}: ours {row['ours']['iops']:.0f}, QEMU {row['qemu']['iops']:.0f} IOPS")
            t4.append(row)

    load_after = os.getloadavg()
    mc = machine()
    res = {
        "time": wall.isoformat(timespec="seconds"),
        "machine": mc,
        "load_before": load_before, "load_after": load_after,
        "qemu_version": qemu_version, "fio_version": fio_version,
        "image": img, "seconds": seconds, "quick": args.quick, "fio_runs": args.fio_runs,
        "placement": None if PLACEMENT is None else {"dataplane_cpu": PLACEMENT[0], "vcpu_cpu": PLACEMENT[1]},
        "guest": {"kernel": str(KERNEL), "cpus": CPUS, "memory_mib": MEMORY_MIB},
        "ours_cmd": " ".join(ours_cmd(guest_cmdline("SPEC", "QD", seconds), image)),
        "qemu_cmd": " ".join(qemu_cmd(guest_cmdline("SPEC", "QD", seconds), image)),
        "fio_cmd": " ".join(fio_cmd("randread4k", "QD", seconds, image)),
        "table1": t1, "table2": t2, "table3": evidence, "table4": t4, "table5": t5, "table6": t6,
        "duration_s": round(time.monotonic() - started, 1),
    }

    print(f"virtio-blk benchmark, {wall.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
          f"machine: nproc={mc['nproc']}, kernel {mc['kernel']}, "
          f"{'PVM (kvm_pvm loaded, not hardware KVM)' if mc['kvm_pvm'] else 'kvm_pvm not loaded'}"
          f"{', ' + mc['cpu'] if mc['cpu'] else ''}")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.2f}' for x in load_after)}; {res['duration_s']:.0f} s")
    print(f"image: {img['path']}, {img['bytes'] >> 20} MiB preallocated random data, {img['fs']} on {img['device']}; "
          f"guest: test guest, {CPUS} vCPU, {MEMORY_MIB} MiB, benchmark in guest user mode; {seconds} s per point")
    print(f"ours: vmm --disk path=IMG,direct=on,poll={POLL_US} (submit-batch=4, the default, growing to an eighth of what the host has in flight); QEMU: {qemu_version.split('(')[0].strip()} microvm, "
          f"iothread poll-max-ns={QEMU_POLL_MAX_NS}, cache=none, aio=io_uring; host: {fio_version} io_uring direct=1, "
          f"best of {args.fio_runs} run{'s' if args.fio_runs > 1 else ''}")
    if PLACEMENT is None:
        print("placement: none (the scheduler places every thread)")
    else:
        print(f"placement: each VMM's dataplane (QEMU: its iothread) on CPU {PLACEMENT[0]}, which takes the disk's "
              f"interrupts, its vCPU on CPU {PLACEMENT[1]} (ours: dataplane-cpus= and --vcpu-affinity; QEMU: taskset "
              f"once the guest's disk is up); host fio unpinned")
    print()
    print(f"Table 1: dataplane (guest notifies only when the device asks, interrupts suppressed); "
          f"IOPS: median of {args.reps} alternating repetitions, min-max over them; cpu µs: CPU time of the "
          f"dataplane thread (QEMU: its iothread) per request, median run; QD is per queue")
    print(table1(t1))
    print()
    print(f"Table 2: the guest's usual path (same VMM settings; the guest still polls and never takes the interrupts); "
          f"IOPS: median of {args.reps} alternating repetitions")
    print(table2(t2, t1))
    print()
    print("Table 3: what bounds the rows, per request. ntf: guest notifies (each an exit). From the table 1/2 runs, "
          "over a window inside the benchmark (/proc/<pid>/task/<tid>): wake: voluntary context switches of the "
          "dataplane thread (QEMU: its iothread); cpu, sys: its CPU time (schedstat) and the system part of it (stat); "
          "runq: its run-queue wait; vcpu rq: the vCPU thread's run-queue wait; rd, wr: its read(2) and write(2) calls "
          "(/proc/.../io syscr, syscw; no tracing); CPUs: CPUs busy in tasks on the whole "
          "machine, irq: in interrupts, stl: stolen by the hypervisor under this machine (/proc/stat), oth: CPUs "
          "busy in tasks other than the VMM's threads; THP: MiB of the VMM's memory in transparent huge pages. From "
          f"separate {EVIDENCE_SECONDS} s runs under strace -c (which slows them, ours more: it stops the thread at "
          "every system call): system calls of the dataplane thread (all; io_uring_enter; read; epoll_wait/ppoll; "
          "write; other), of the vCPU thread and of QEMU's main thread.")
    print(table3(evidence))
    print()
    if pvm:
        print("Table 4: fio inside a Linux guest: skipped, needs hardware KVM (on PVM hosts guest user space "
              "cannot make system calls, so fio cannot run in the guest)")
    else:
        print(f"Table 4: fio inside a Linux guest (vmlinux + initramfs, {LINUX_MEMORY_MIB} MiB, {CPUS} vCPU; "
              "fio io_uring direct=1 on /dev/vda; same VMM settings)")
        print(table4(t4))
    if t5:
        print()
        print(f"Table 5: our I/O accounting on and off (ours only, table 1's rows and settings): stats=on (the "
              f"default) times every request for query-blockstats' *_total_time_ns and the latency histograms; "
              f"stats=off keeps the counts and skips the clock. IOPS: median of {args.reps} alternating "
              f"repetitions, min-max; cpu µs: the dataplane thread's CPU time per request, median run")
        print(table_ab(t5, "ours-nostats", "stats=on (timed)", "stats=off (counts only)"))
    if t6:
        print()
        print(f"Table 6: handing requests to the kernel in fours (ours only, table 1's rows and settings): "
              f"submit-batch=4 (the default) calls io_uring_enter every 4 requests the dataplane takes (every "
              f"eighth of those already at the host once that is more), so the "
              f"host's disk starts on them while it takes the rest; submit-batch=0 calls it once for all a round "
              f"took (the block layer then plugs them all). IOPS: median of {args.reps} alternating repetitions, "
              f"min-max; cpu µs: the dataplane thread's CPU time per request, median run")
        print(table_ab(t6, "ours-onecall", "submit-batch=4", "submit-batch=0"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    run_main(main, "bench/blk.py")
