#!/usr/bin/env python3
"""Start-up benchmark: our vmm against QEMU microvm, in one run.

Measures, with the test guest (kernel-images/out/testguest):

1. VMM start-up: process start to vCPU 0's first KVM_RUN, wall and CPU
   time (our vmm's VMM_TRACE_STARTUP=1 line), median and min of --runs.
2. VMM memory: RSS of the VMM process while the guest idles, minus the
   RSS of the guest-memory mapping; ours and QEMU microvm.
3. Test guest boot: process start to the first serial line and to process
   exit, median of --boot-runs; ours and QEMU microvm.

Prints one table (see bench/README.md). Python 3 standard library only.

    python3 bench/startup.py [--runs N] [--boot-runs N] [--json FILE]

QEMU 7.2 (Debian qemu-system-x86) is installed beside qemu-utils into
/var/cache/vmm-bench/qemu if missing: apt-get download + dpkg -x, plus
apt-get install of the shared libraries it lacks.
"""

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VMM = REPO / "target" / "release" / "vmm"
KERNEL = REPO / "kernel-images" / "out" / "testguest"

QEMU_CACHE = Path("/var/cache/vmm-bench/qemu")
QEMU_ROOT = QEMU_CACHE / "root"
QEMU_BIN = QEMU_ROOT / "usr" / "bin" / "qemu-system-x86_64"
SEABIOS_DIR = QEMU_ROOT / "usr" / "share" / "seabios"
QEMU_PACKAGES = ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"]

# Boot and start-up runs: same guest size for both VMMs.
BOOT_MEMORY_MIB = 64
MEMORY_TEST_MIB = 128
CPUS = 1

# Each VM must finish (or reach its idle line) within this.
RUN_TIMEOUT_S = 30.0

TRACE_RE = re.compile(
    rb"vmm: vcpu0 first KVM_RUN: monotonic_ns=(\d+) process_cpu_ns=(\d+)"
)

QUOTED = (
    "quoted, not measured here (issue figures, other machine, same kernel): "
    "VMM memory Firecracker 4.2 MiB, Cloud Hypervisor 6.7 MiB, "
    "QEMU microvm 76.5 MiB; Firecracker publishes at most 8 CPU ms to start"
)


class BenchError(Exception):
    """Something the benchmark needs is missing or failed: one message."""


def now_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def ms(ns):
    return ns / 1e6


# ---------------------------------------------------------------- setup


def check_kvm():
    if not os.path.exists("/dev/kvm"):
        raise BenchError("/dev/kvm does not exist: this host has no KVM, nothing can be measured")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        raise BenchError(f"cannot open /dev/kvm: {e.strerror} (run as root or join the 'kvm' group)")


def ensure_vmm():
    # Always build: cargo is a no-op when nothing changed, and a stale
    # binary would measure old code.
    if not shutil.which("cargo"):
        if VMM.exists():
            log(f"no cargo: measuring {VMM.relative_to(REPO)} as it is")
            return
        raise BenchError(f"{VMM} is missing and there is no cargo to build it: run 'cargo build --release -p vmm'")
    r = subprocess.run(["cargo", "build", "--release", "-p", "vmm"], cwd=REPO)
    if r.returncode != 0 or not VMM.exists():
        raise BenchError("'cargo build --release -p vmm' failed (see above)")


def ensure_kernel():
    if not KERNEL.exists():
        raise BenchError(
            f"the test guest {KERNEL.relative_to(REPO)} is missing: build it with "
            f"'bash kernel-images/testguest/build.sh kernel-images/out/testguest'"
        )


def missing_libs():
    r = subprocess.run(["ldd", str(QEMU_BIN)], capture_output=True, text=True)
    return sorted({line.split()[0] for line in r.stdout.splitlines() if "not found" in line})


def run_checked(cmd, what, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise BenchError(f"{what} failed ({' '.join(cmd)}):\n{(r.stderr or r.stdout).strip()}")
    return r


def installed(package):
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return r.returncode == 0 and "install ok installed" in r.stdout


def ensure_qemu():
    """QEMU 7.2 from Debian packages in a private folder; returns its version line."""
    if not QEMU_BIN.exists():
        for tool in ("apt-get", "dpkg", "dpkg-deb"):
            if not shutil.which(tool):
                raise BenchError(f"QEMU is not installed in {QEMU_ROOT} and '{tool}' is missing to install it")
        log(f"installing QEMU into {QEMU_ROOT} (apt-get download {' '.join(QEMU_PACKAGES)}; dpkg -x)")
        QEMU_CACHE.mkdir(parents=True, exist_ok=True)
        for old in QEMU_CACHE.glob("*.deb"):
            old.unlink()
        r = subprocess.run(["apt-get", "download", *QEMU_PACKAGES], cwd=QEMU_CACHE,
                           capture_output=True, text=True)
        if r.returncode != 0:
            log("apt-get download failed; running apt-get update and trying again")
            run_checked(["apt-get", "update"], "apt-get update")
            run_checked(["apt-get", "download", *QEMU_PACKAGES], "apt-get download", cwd=QEMU_CACHE)
        debs = sorted(QEMU_CACHE.glob("*.deb"))
        if len(debs) != len(QEMU_PACKAGES):
            raise BenchError(f"apt-get download gave {len(debs)} packages in {QEMU_CACHE}, expected {len(QEMU_PACKAGES)}")
        tmp = QEMU_CACHE / "root.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for deb in debs:
            run_checked(["dpkg", "-x", str(deb), str(tmp)], f"dpkg -x {deb.name}")
        shutil.rmtree(QEMU_ROOT, ignore_errors=True)
        tmp.rename(QEMU_ROOT)
        if not QEMU_BIN.exists():
            raise BenchError(f"the QEMU packages did not contain {QEMU_BIN.relative_to(QEMU_ROOT)}")
    libs = missing_libs()
    if libs:
        # The libraries qemu-system-x86 depends on, by package name (its
        # Depends field), that are not installed yet.
        deb = next(QEMU_CACHE.glob("qemu-system-x86_*.deb"), None)
        wanted = []
        if deb:
            depends = run_checked(["dpkg-deb", "-f", str(deb), "Depends"], "dpkg-deb -f").stdout
            for alt in depends.split(","):
                name = alt.split("|")[0].split("(")[0].strip().split(":")[0]
                if name.startswith("lib") and not installed(name):
                    wanted.append(name)
        if not wanted:
            raise BenchError(f"{QEMU_BIN} lacks shared libraries {', '.join(libs)} and the package's "
                             "dependencies name none that is missing; install them by hand")
        log(f"QEMU lacks {', '.join(libs)}: apt-get install -y {' '.join(wanted)}")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *wanted]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode != 0:
            run_checked(["apt-get", "update"], "apt-get update")
            run_checked(cmd, "apt-get install", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        libs = missing_libs()
        if libs:
            raise BenchError(f"{QEMU_BIN} still lacks shared libraries after apt-get install: {', '.join(libs)}")
    r = run_checked([str(QEMU_BIN), "--version"], "qemu-system-x86_64 --version")
    return r.stdout.splitlines()[0].strip()


# ---------------------------------------------------------------- commands


def vmm_cmd(cmdline, memory_mib, cpus=CPUS):
    return [str(VMM), "--kernel", str(KERNEL), "--cmdline", cmdline,
            "--cpus", str(cpus), "--memory", f"{memory_mib}M"]


def qemu_cmd(cmdline, memory_mib, cpus=CPUS):
    return [
        str(QEMU_BIN), "-L", str(SEABIOS_DIR),
        "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", str(memory_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(KERNEL), "-append", cmdline,
    ]


# ---------------------------------------------------------------- running


class Run:
    """One VM process whose serial output (stdout) is read line by line,
    each line timestamped (CLOCK_MONOTONIC ns) as it arrives."""

    def __init__(self, cmd, env=None):
        self.cmd = cmd
        self.lines = []  # (monotonic_ns, bytes)
        self.stderr = b""
        self._buf = b""
        self.t0 = now_ns()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        # fd -> "out" (serial) or "err"; removed at EOF.
        self._fds = {self.proc.stdout.fileno(): "out", self.proc.stderr.fileno(): "err"}

    def _pump(self, deadline_ns):
        """Reads what is available (waiting until the deadline); False at EOF on both pipes."""
        if not self._fds:
            return False
        timeout = max(0.0, (deadline_ns - now_ns()) / 1e9)
        ready, _, _ = select.select(list(self._fds), [], [], timeout)
        for fd in ready:
            data = os.read(fd, 65536)
            t = now_ns()
            kind = self._fds[fd]
            if not data:
                del self._fds[fd]
                if kind == "out" and self._buf:
                    self.lines.append((t, self._buf))
                    self._buf = b""
                continue
            if kind == "err":
                self.stderr += data
                continue
            self._buf += data
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                self.lines.append((t, line))
        return True

    def wait_line(self, needle, timeout_s=RUN_TIMEOUT_S):
        """Time (ns) at which the first line containing needle arrived."""
        deadline = now_ns() + int(timeout_s * 1e9)
        while True:
            for t, line in self.lines:
                if needle in line:
                    return t
            if now_ns() >= deadline or not self._pump(deadline):
                raise BenchError(self.describe(f"no serial line containing {needle.decode()!r}"))

    def wait_exit(self, timeout_s=RUN_TIMEOUT_S):
        """Reads to EOF and reaps the process; returns (exit time ns, status)."""
        deadline = now_ns() + int(timeout_s * 1e9)
        while self._pump(deadline):
            if now_ns() >= deadline:
                self.kill()
                raise BenchError(self.describe(f"still running after {timeout_s:.0f} s"))
        try:
            status = self.proc.wait(timeout=max(0.0, (deadline - now_ns()) / 1e9))
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(self.describe(f"still running after {timeout_s:.0f} s"))
        return now_ns(), status

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()

    def describe(self, what):
        out = b"\n".join(line for _, line in self.lines[-10:]).decode(errors="replace")
        err = self.stderr.decode(errors="replace").strip()
        return (f"{what}: {' '.join(self.cmd)}\n--- serial output (last lines):\n{out}"
                f"\n--- stderr:\n{err}")


def boot_once(cmd, want_status):
    run = Run(cmd)
    t_first = run.wait_line(b"testguest: start")
    t_exit, status = run.wait_exit()
    run.kill()
    if status != want_status:
        raise BenchError(run.describe(f"exit status {status}, expected {want_status}"))
    if not any(b"testguest: exit=0" == line for _, line in run.lines):
        raise BenchError(run.describe("no 'testguest: exit=0' line"))
    return t_first - run.t0, t_exit - run.t0


def startup_once():
    env = {**os.environ, "VMM_TRACE_STARTUP": "1"}
    run = Run(vmm_cmd("exit=0", BOOT_MEMORY_MIB), env=env)
    _, status = run.wait_exit()
    run.kill()
    m = TRACE_RE.search(run.stderr)
    if status != 0:
        raise BenchError(run.describe(f"exit status {status}, expected 0"))
    if not m:
        raise BenchError(run.describe("no 'vmm: vcpu0 first KVM_RUN' line on stderr with VMM_TRACE_STARTUP=1 "
                                      "(is target/release/vmm older than that feature? rebuild it)"))
    return int(m.group(1)) - run.t0, int(m.group(2))


def smaps_rss(pid, guest_bytes):
    """(total RSS, guest-memory mapping RSS) in bytes, from /proc/PID/smaps."""
    total = 0
    candidates = []  # (rss, header) of anonymous mappings of exactly guest_bytes
    header, size, rss = None, 0, 0

    def finish():
        nonlocal total
        if header is None:
            return
        total += rss
        fields = header.split()
        anonymous = len(fields) < 6 or fields[5].startswith("[anon")
        if anonymous and size == guest_bytes:
            candidates.append((rss, header))

    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                finish()
                header, size, rss = line.strip(), 0, 0
            elif line.startswith("Size:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
        finish()
    if len(candidates) != 1:
        raise BenchError(f"expected one anonymous {guest_bytes >> 20} MiB mapping (the guest memory) "
                         f"in /proc/{pid}/smaps, found {len(candidates)}: {candidates}")
    return total, candidates[0][0]


def memory_once(cmd):
    run = Run(cmd)
    try:
        run.wait_line(b"testguest: idle")
        if run.proc.poll() is not None:
            raise BenchError(run.describe("the VMM ended while its guest idles"))
        total, guest = smaps_rss(run.proc.pid, MEMORY_TEST_MIB << 20)
    finally:
        run.kill()
    return {"total_rss_bytes": total, "guest_rss_bytes": guest, "vmm_bytes": total - guest}


# ---------------------------------------------------------------- report


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def summary(samples_ns):
    return {"median_ms": ms(statistics.median(samples_ns)), "min_ms": ms(min(samples_ns)),
            "samples_ms": [round(ms(s), 3) for s in samples_ns]}


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu,
            "kvm_pvm": os.path.exists("/sys/module/kvm_pvm")}


def fmt_ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(res):
    s, m, b = res["startup"], res["memory"], res["boot"]
    rows = [
        (f"VMM start-up to first KVM_RUN, wall, median ({s['runs']} runs)", s["wall"]["median_ms"], None, "ms"),
        ("VMM start-up to first KVM_RUN, wall, min", s["wall"]["min_ms"], None, "ms"),
        ("VMM start-up to first KVM_RUN, CPU, median", s["cpu"]["median_ms"], None, "ms"),
        ("VMM start-up to first KVM_RUN, CPU, min", s["cpu"]["min_ms"], None, "ms"),
        (f"VMM memory (RSS minus {MEMORY_TEST_MIB} MiB guest RAM), guest idle",
         m["ours"]["vmm_mib"], m["qemu"]["vmm_mib"], "MiB"),
        ("  total RSS", m["ours"]["total_rss_mib"], m["qemu"]["total_rss_mib"], "MiB"),
        ("  guest RAM mapping RSS", m["ours"]["guest_rss_mib"], m["qemu"]["guest_rss_mib"], "MiB"),
        (f"Boot: process start to 'testguest: start', median ({b['runs']} runs)",
         b["ours"]["first_line"]["median_ms"], b["qemu"]["first_line"]["median_ms"], "ms"),
        ("Boot: process start to process exit, median",
         b["ours"]["exit"]["median_ms"], b["qemu"]["exit"]["median_ms"], "ms"),
    ]
    w = max(len(r[0]) for r in rows)
    out = [f"{'':{w}}  {'ours':>9}  {'QEMU':>9}  {'ours/QEMU':>9}",
           f"{'-' * w}  {'-' * 9}  {'-' * 9}  {'-' * 9}"]
    for name, ours, qemu, unit in rows:
        q = f"{qemu:9.2f}" if qemu is not None else f"{'-':>9}"
        out.append(f"{name:{w}}  {ours:9.2f}  {q}  {fmt_ratio(ours, qemu) if qemu is not None else '-':>9}  {unit}")
    mc = res["machine"]
    out.append("")
    out.append(f"machine: nproc={mc['nproc']}, kernel {mc['kernel']}, "
               f"kvm_pvm {'loaded (PVM, not hardware KVM)' if mc['kvm_pvm'] else 'not loaded'}"
               f"{', ' + mc['cpu'] if mc['cpu'] else ''}")
    out.append(f"guest: {KERNEL.relative_to(REPO)}, {CPUS} vCPU, {BOOT_MEMORY_MIB} MiB "
               f"(memory test: {MEMORY_TEST_MIB} MiB, 'idle'); QEMU: {res['qemu_version']}, microvm")
    out.append(QUOTED)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="VMM start-up runs (default 20)")
    ap.add_argument("--boot-runs", type=int, default=10, help="boot runs per VMM (default 10)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args()
    if args.runs < 1 or args.boot_runs < 1:
        ap.error("--runs and --boot-runs must be at least 1")

    check_kvm()
    ensure_kernel()
    ensure_vmm()
    qemu_version = ensure_qemu()
    started = time.monotonic()

    # Warm-up (page cache, dynamic linker): one unmeasured run of each.
    boot_once(vmm_cmd("exit=0", BOOT_MEMORY_MIB), 0)
    boot_once(qemu_cmd("exit=0", BOOT_MEMORY_MIB), 1)

    log(f"VMM start-up: {args.runs} runs")
    wall, cpu = [], []
    for _ in range(args.runs):
        w, c = startup_once()
        wall.append(w)
        cpu.append(c)

    log("VMM memory: ours and QEMU, guest idle")
    mem = {}
    for name, cmd in (("ours", vmm_cmd("idle", MEMORY_TEST_MIB)), ("qemu", qemu_cmd("idle", MEMORY_TEST_MIB))):
        r = memory_once(cmd)
        mem[name] = {**r, "vmm_mib": r["vmm_bytes"] / 2**20, "total_rss_mib": r["total_rss_bytes"] / 2**20,
                     "guest_rss_mib": r["guest_rss_bytes"] / 2**20}

    log(f"test guest boot: {args.boot_runs} runs each, alternating")
    boots = {"ours": ([], []), "qemu": ([], [])}
    for _ in range(args.boot_runs):
        for name, cmd, status in (("ours", vmm_cmd("exit=0", BOOT_MEMORY_MIB), 0),
                                  ("qemu", qemu_cmd("exit=0", BOOT_MEMORY_MIB), 1)):
            first, end = boot_once(cmd, status)
            boots[name][0].append(first)
            boots[name][1].append(end)

    res = {
        "machine": machine(),
        "qemu_version": qemu_version,
        "guest": {"kernel": str(KERNEL), "cpus": CPUS, "boot_memory_mib": BOOT_MEMORY_MIB,
                  "memory_test_mib": MEMORY_TEST_MIB},
        "startup": {"runs": args.runs, "wall": summary(wall), "cpu": summary(cpu)},
        "memory": mem,
        "boot": {"runs": args.boot_runs,
                 **{n: {"first_line": summary(f), "exit": summary(e)} for n, (f, e) in boots.items()}},
        "quoted_not_measured": {"firecracker_vmm_mib": 4.2, "cloud_hypervisor_vmm_mib": 6.7,
                                "qemu_microvm_vmm_mib": 76.5, "firecracker_startup_cpu_ms_max": 8},
        "duration_s": round(time.monotonic() - started, 1),
    }
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench/startup.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
