"""Shared by the benchmarks in bench/: paths, errors, the checks and
builds they need (/dev/kvm, the vmm, the test guest, QEMU 7.2 installed
beside qemu-utils), a VM process whose serial lines are read as they
arrive, a QMP client, logging and a description of the machine. Python 3
standard library only.
"""

import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# .cargo/config.toml names the target, so cargo builds into target/<triple>/.
VMM = REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "vmm"
KERNEL = REPO / "kernel-images" / "out" / "testguest"

QEMU_CACHE = Path("/var/cache/vmm-bench/qemu")
QEMU_ROOT = QEMU_CACHE / "root"
QEMU_BIN = QEMU_ROOT / "usr" / "bin" / "qemu-system-x86_64"
SEABIOS_DIR = QEMU_ROOT / "usr" / "share" / "seabios"
QEMU_PACKAGES = ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"]

# A VM must finish (or reach the line waited for) within this, unless told otherwise.
RUN_TIMEOUT_S = 30.0


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


# ---------------------------------------------------------------- QMP


class Qmp:
    """A minimal QMP client over a Unix socket. `run`, the VM process
    serving it (if given), says in the error whether it is still alive."""

    def __init__(self, path, run=None, timeout_s=20):
        deadline = time.monotonic() + timeout_s
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError as e:
                self.sock.close()
                if time.monotonic() > deadline:
                    why = f"cannot connect to QMP at {path} within {timeout_s} s ({e.strerror}"
                    if run is None:
                        raise BenchError(why + ")")
                    alive = "running" if run.proc.poll() is None else f"exited {run.proc.returncode}"
                    raise BenchError(run.describe(f"{why}; the process is {alive})"))
                time.sleep(0.01)
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                raise BenchError(f"QMP {name}: {msg['error']['desc']}")
            return msg["return"]

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------- report


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


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


def run_main(main, script):
    """Runs a bench script's main(): a BenchError is one line on stderr and exit 1."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
