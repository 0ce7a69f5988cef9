#!/usr/bin/env python3
"""What KVM's set-up ioctls cost on this host, in two orders.

Creates a VM --runs times and times each ioctl of a VMM's start-up:
guest RAM (KVM_SET_USER_MEMORY_REGION, --memory MiB), the TSS address
plus the in-kernel irqchip (KVM_SET_TSS_ADDR, KVM_CREATE_IRQCHIP), one
vCPU, one irqfd and one ioeventfd. Once with guest RAM registered before
the irqchip (our vmm's order), once after it (our vmm's order until
2026-12-01, and most VMMs'). Prints the median and max of each, in ms.

Then what closing such a VM costs when it lived --life ms (our test
guest's exit comes about 8 ms after start): set up in our order and
closed, against the same with a one-page read-only memory slot added and
deleted right after the set-up, as our vmm does (`vmm/src/grace_period.rs`),
which ends the grace period the set-up left pending.

    python3 bench/kvm_order.py [--runs 12] [--memory 64] [--life 8]

Python 3 standard library only (ctypes for mmap and ioctl); needs
/dev/kvm.
"""

import argparse
import ctypes
import os
import statistics
import struct
import time

# _IO/_IOW numbers from linux/kvm.h (x86_64).
KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_CREATE_IRQCHIP = 0xAE60
KVM_IRQFD = 0x4020AE76
KVM_IOEVENTFD = 0x4040AE79

PROT_RW = 0x3
MAP_PRIVATE_ANON_NORESERVE = 0x02 | 0x20 | 0x4000

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.eventfd.argtypes = [ctypes.c_uint, ctypes.c_int]


def ioctl(fd, req, arg):
    r = libc.ioctl(fd, req, arg)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"ioctl {req:#x}: {os.strerror(e)}")
    return r


def do_step(vm, step, ram, mem_bytes, fds):
    """One set-up step on `vm`; eventfds and vCPU fds go to `fds`."""
    if step == "memory":
        region = struct.pack("IIQQQ", 0, 0, 0, mem_bytes, ram)  # slot, flags, gpa, size, hva
        ioctl(vm, KVM_SET_USER_MEMORY_REGION, ctypes.create_string_buffer(region))
    elif step == "irqchip":
        ioctl(vm, KVM_SET_TSS_ADDR, ctypes.c_void_p(0xFFFBD000))
        ioctl(vm, KVM_CREATE_IRQCHIP, None)
    elif step == "vcpu":
        fds.append(ioctl(vm, KVM_CREATE_VCPU, ctypes.c_void_p(0)))
    elif step == "irqfd":
        efd = libc.eventfd(0, 0)
        fds.append(efd)
        ioctl(vm, KVM_IRQFD, ctypes.create_string_buffer(struct.pack("IIII16x", efd, 5, 0, 0)))
    elif step == "ioeventfd":
        efd = libc.eventfd(0, 0)
        fds.append(efd)
        # datamatch, addr, len, fd, flags: an MMIO notify register.
        ioev = struct.pack("QQIiI36x", 0, 0xD0000050, 4, efd, 0)
        ioctl(vm, KVM_IOEVENTFD, ctypes.create_string_buffer(ioev))


def one_vm(kvm, order, mem_bytes, times):
    vm = ioctl(kvm, KVM_CREATE_VM, None)
    ram = libc.mmap(None, mem_bytes, PROT_RW, MAP_PRIVATE_ANON_NORESERVE, -1, 0)
    fds = [vm]
    try:
        for step in order:
            t = time.perf_counter()
            do_step(vm, step, ram, mem_bytes, fds)
            times[step].append((time.perf_counter() - t) * 1e3)
    finally:
        for fd in reversed(fds):
            os.close(fd)
        libc.munmap(ram, mem_bytes)


KVM_MEM_READONLY = 2


def close_cost(kvm, mem_bytes, life_ms, end_grace_period):
    """(ms the set-up took, including the slot update; ms the close took)."""
    vm = ioctl(kvm, KVM_CREATE_VM, None)
    ram = libc.mmap(None, mem_bytes, PROT_RW, MAP_PRIVATE_ANON_NORESERVE, -1, 0)
    fds = [vm]
    started = time.perf_counter()
    try:
        for step in ["memory", "irqchip", "vcpu", "irqfd", "ioeventfd"]:
            do_step(vm, step, ram, mem_bytes, fds)
        if end_grace_period:
            # Slot 1, the first page of RAM read-only at 8 GiB; then deleted.
            alias = struct.pack("IIQQQ", 1, KVM_MEM_READONLY, 8 << 30, 4096, ram)
            ioctl(vm, KVM_SET_USER_MEMORY_REGION, ctypes.create_string_buffer(alias))
            gone = struct.pack("IIQQQ", 1, KVM_MEM_READONLY, 8 << 30, 0, ram)
            ioctl(vm, KVM_SET_USER_MEMORY_REGION, ctypes.create_string_buffer(gone))
        set_up = (time.perf_counter() - started) * 1e3
        time.sleep(max(0.0, life_ms / 1e3 - (time.perf_counter() - started)))
    finally:
        t = time.perf_counter()
        for fd in reversed(fds):
            os.close(fd)
        closed = (time.perf_counter() - t) * 1e3
        libc.munmap(ram, mem_bytes)
    return set_up, closed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--memory", type=int, default=64, help="guest RAM in MiB (default 64)")
    ap.add_argument("--life", type=float, default=8.0, help="ms from VM creation to its close (default 8)")
    args = ap.parse_args()
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    orders = {
        "guest RAM first": ["memory", "irqchip", "vcpu", "irqfd", "ioeventfd"],
        "irqchip first": ["irqchip", "memory", "vcpu", "irqfd", "ioeventfd"],
    }
    results = {name: {s: [] for s in steps} for name, steps in orders.items()}
    for _ in range(args.runs):  # the two orders alternate
        for name, steps in orders.items():
            one_vm(kvm, steps, args.memory << 20, results[name])
    print(f"KVM set-up ioctls, ms: median (max) of {args.runs} VMs, {args.memory} MiB of guest RAM")
    for name, times in results.items():
        cells = "  ".join(f"{s} {statistics.median(v):.2f} ({max(v):.2f})" for s, v in times.items())
        print(f"{name:16} {cells}")

    closes = {False: [], True: []}
    for _ in range(args.runs):
        for end in (False, True):
            closes[end].append(close_cost(kvm, args.memory << 20, args.life, end))
    print(f"\nClosing a VM set up in our order, {args.life:g} ms after creating it, ms: median (max) of {args.runs}")
    for end, label in ((False, "as set up"), (True, "slot update")):
        setup = [x[0] for x in closes[end]]
        close = [x[1] for x in closes[end]]
        print(f"{label:16} set-up {statistics.median(setup):.2f} ({max(setup):.2f})  "
              f"close {statistics.median(close):.2f} ({max(close):.2f})  "
              f"creation to closed {statistics.median(max(args.life, a) + b for a, b in closes[end]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
