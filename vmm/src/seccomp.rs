//! The seccomp filter of each kind of VMM thread, and `--seccomp`.
//!
//! [`base`] installs a filter on each thread before it runs its own code;
//! which calls each kind may make is decided here. The lists come from
//! tracing the VMM (`strace -f -Y`, one line per call with the thread's
//! name) while the test guest and a Linux guest did I/O and a QMP client
//! ran stop/cont, blockdev-add/-del, blockdev-backup with job-pause,
//! -resume, -dismiss and set-speed, the query commands, a bad command and
//! quit; plus what error paths need that a good run does not show (a
//! panic's log line, a thread's exit, the sync I/O engine, a host block
//! device's size).
//!
//! Every kind gets [`RUNTIME`]: memory, locks, time, signals, logging and
//! thread exit, what the Rust runtime and glibc may do anywhere. The
//! spawner thread (see [`base::thread`]) gets the union of all kinds plus
//! what a new thread does before it has installed its own filter.
//!
//! io_uring operations are not system calls: a ring's reads and writes
//! never pass a filter, only io_uring_setup, _register and _enter do.
//! Firecracker-style restriction of the ring's opcodes is done in the
//! engine (`block/src/io/uring.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use base::{Sandbox, ThreadKind};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
// What a migration reads and writes of KVM's state (linux/kvm.h).
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_io_nr!(KVM_SET_TSC_KHZ, KVMIO, 0xa2);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);

/// What `--seccomp` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// A call outside a thread's list ends the VMM with one line naming
    /// the thread and the call.
    #[default]
    On,
    /// A call outside the list is allowed and logged by the kernel (audit
    /// log, `dmesg`): for finding what a list lacks.
    Log,
    /// No filters.
    Off,
}

/// Why the filters could not be built or set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompSetupError {
    /// seccompiler refused a list (a bug in this file).
    #[error("cannot build the seccomp filter of the {kind:?} threads: {source}")]
    Build {
        /// Whose filter.
        kind: ThreadKind,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// The spawner thread or the trap handler could not be set up.
    #[error("cannot set up seccomp: {0}")]
    Sandbox(#[from] base::thread::ThreadError),
}

/// The sandbox a VM's threads run in under `mode`.
pub fn sandbox(mode: SeccompMode) -> Result<Arc<Sandbox>, SeccompSetupError> {
    let mismatch = match mode {
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(Sandbox::unconfined()),
    };
    let filters = ThreadKind::ALL
        .iter()
        .map(|&kind| Ok((kind, program(kind, mismatch.clone())?)))
        .collect::<Result<Vec<_>, SeccompSetupError>>()?;
    Ok(Sandbox::new(filters)?)
}

/// `kind`'s filter: its list allowed, anything else answered by `mismatch`.
pub fn program(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompSetupError> {
    let build = |source| SeccompSetupError::Build { kind, source };
    let filter = SeccompFilter::new(
        rules(kind)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    let program: BpfProgram = filter.try_into().map_err(build)?;
    if calls(kind).contains(&libc::SYS_openat) {
        return Ok(program);
    }
    Ok([refuse_glibc_probes(), program].concat())
}

/// What glibc opens by itself, read-only and close-on-exec, from whatever
/// thread happens to need it first: `/proc/sys/vm/overcommit_memory` the
/// first time any thread's malloc arena gives memory back (`free` ->
/// `heap_trim` -> `shrink_heap`), `/sys/devices/system/cpu/online` when
/// it sizes its arenas. Neither is ours to avoid and both have a fallback
/// when the open fails, so for the kinds that may not open files such an
/// open fails with `EACCES` instead of ending the VMM (it did: a backup's
/// thread freeing its buffers was killed at random). Any other open still
/// meets the kind's filter. Put in front of the compiled filter; it can
/// only refuse, never allow.
fn refuse_glibc_probes() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    // Offsets in struct seccomp_data: nr, arch, then ip and args[6].
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG2_LOW: u32 = 16 + 2 * 8;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    // Each test that fails jumps past the rest, to the compiled filter.
    vec![
        insn(LD_ABS, 0, 0, ARCH),
        insn(JEQ, 0, 5, AUDIT_ARCH_X86_64),
        insn(LD_ABS, 0, 0, NR),
        insn(JEQ, 0, 3, libc::SYS_openat as u32),
        insn(LD_ABS, 0, 0, ARG2_LOW),
        insn(JEQ, 0, 1, (libc::O_RDONLY | libc::O_CLOEXEC) as u32),
        insn(
            RET,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | (libc::EACCES as u32 & libc::SECCOMP_RET_DATA),
        ),
    ]
}

/// The number of system calls `kind` may make (for the README and tests).
pub fn list_len(kind: ThreadKind) -> usize {
    calls(kind).len()
}

/// What every thread may do: allocate and free memory, lock, sleep, read
/// the clock, handle and block signals (the vCPU kick), log to stderr,
/// close what it drops, end itself or the process.
const RUNTIME: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_write,
    libc::SYS_close,
    // std checks in debug builds that a descriptor it closes is open.
    libc::SYS_fcntl,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Opening an I/O engine (a ring and its eventfd), which the vCPU (a
/// driver activating a disk) and QMP (`cont`, `blockdev-backup`) do for
/// the threads they start.
const OPEN_ENGINE: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_eventfd2,
];

/// Waiting for a descriptor (an eventfd, the signalfd, stdin) and
/// reading it.
const POLL_READ: &[i64] = &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll];

/// Sleeping in an epoll set.
const EPOLL: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
];

/// Doing I/O on an engine: the ring, or the sync engine's calls where
/// io_uring is refused; with [`POLL_READ`] and [`EPOLL`] to wait for it.
const DO_IO: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// The calls of `kind` beyond [`RUNTIME`] (ioctl and tgkill are narrowed
/// in [`rules`]).
fn extra(kind: ThreadKind) -> Vec<i64> {
    use ThreadKind::*;
    match kind {
        // Waits for the end or a signal (its signalfd), kicks and joins
        // the others, unmaps and closes; closing a qcow2 node writes its
        // tables back and syncs them...
        Main => [
            &[
                libc::SYS_tgkill,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_fdatasync,
                // ...and trims what it grew ahead of allocation.
                libc::SYS_ftruncate,
            ][..],
            POLL_READ,
        ]
        .concat(),
        // KVM_RUN; eventfd reads and writes for the devices' registers;
        // activating a disk opens its engine, a reset stops the thread.
        Vcpu => [
            &[libc::SYS_ioctl, libc::SYS_tgkill, libc::SYS_read][..],
            OPEN_ENGINE,
        ]
        .concat(),
        // Reads notify eventfds, writes irqfds, sleeps in epoll; makes the
        // throttle gate's timerfd and waker when it starts.
        Dataplane => [
            DO_IO,
            POLL_READ,
            EPOLL,
            &[
                libc::SYS_timerfd_create,
                libc::SYS_timerfd_settime,
                libc::SYS_eventfd2,
            ][..],
        ]
        .concat(),
        // Its engines' I/O; events reach QMP through an eventfd write.
        Job => [DO_IO, POLL_READ, EPOLL].concat(),
        Qmp => [
            &[
                libc::SYS_accept4,
                libc::SYS_read,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_writev,
                libc::SYS_shutdown,
                libc::SYS_unlink,
                // blockdev-add: open a file and learn its size and kind.
                libc::SYS_openat,
                libc::SYS_statx,
                libc::SYS_newfstatat,
                libc::SYS_fstat,
                libc::SYS_lseek,
                // blockdev-add of a qcow2 image: its header and metadata;
                // blockdev-snapshot-sync: writing a new overlay (and
                // syncing it), the old top's absolute path (realpath), a
                // format node writing back what it cached.
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_ftruncate,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_readlink,
                libc::SYS_readlinkat,
                libc::SYS_getcwd,
                // FIONBIO on clients; a block device's size.
                libc::SYS_ioctl,
                // stop: kick the vCPUs out of KVM_RUN.
                libc::SYS_tgkill,
                // nbd-server-start and migrate-incoming: the listening
                // socket (SO_REUSEADDR for TCP); a unix socket is bound
                // under a temporary name, linked to its own and that
                // name unlinked (base::socket), its name removed with
                // unlink at the end.
                libc::SYS_socket,
                libc::SYS_bind,
                libc::SYS_linkat,
                libc::SYS_listen,
                libc::SYS_setsockopt,
            ][..],
            EPOLL,
            OPEN_ENGINE,
        ]
        .concat(),
        SerialInput => POLL_READ.to_vec(),
        // The NBD listener accepts and waits on its stop eventfd; a client
        // thread reads requests, writes replies (TCP_NODELAY on its
        // socket), opens its export's engine and does its I/O, and asks
        // the file system for holes (lseek) for block status.
        Nbd => [
            &[
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_writev,
                libc::SYS_shutdown,
                libc::SYS_setsockopt,
                libc::SYS_lseek,
            ][..],
            POLL_READ,
            DO_IO,
            OPEN_ENGINE,
        ]
        .concat(),
        // What QMP's `stop`/`cont` do (the migration pauses and resumes the
        // VM, takes and hands over the images), plus the stream: connect
        // or accept, send and receive with timeouts, write and sync a state
        // file; and KVM's state and dirty log, through ioctls on the VM
        // and vCPU descriptors (see `ioctls`).
        Migration => [
            extra(Qmp),
            vec![
                libc::SYS_connect,
                libc::SYS_getsockopt,
                libc::SYS_getsockname,
                libc::SYS_getpeername,
                libc::SYS_write,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_fallocate,
            ],
            POLL_READ.to_vec(),
            // Block migration's reads and writes through its own engines.
            DO_IO.to_vec(),
        ]
        .concat(),
        // Every other kind's calls, and what a new thread does before its
        // own filter is in: name itself, set up its stack guard, its
        // signal stack, robust futex list and rseq area, then install.
        Spawner => {
            let mut all: Vec<i64> = ThreadKind::ALL
                .iter()
                .filter(|&&k| k != Spawner)
                .flat_map(|&k| extra(k))
                .collect();
            all.extend([
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_prctl,
                libc::SYS_seccomp,
                libc::SYS_sched_getaffinity,
                // A thread kept on the CPUs the operator named pins itself
                // before its own filter goes in.
                libc::SYS_sched_setaffinity,
            ]);
            all
        }
    }
}

/// Every call `kind` may make, sorted, each once.
fn calls(kind: ThreadKind) -> Vec<i64> {
    let mut all = [RUNTIME.to_vec(), extra(kind)].concat();
    all.sort_unstable();
    all.dedup();
    all
}

/// The ioctls `kind` may make, by request number.
fn ioctls(kind: ThreadKind) -> Vec<u64> {
    use ThreadKind::*;
    let blk_get_size64 = 0x8008_1272; // _IOR(0x12, 114, size_t)
    match kind {
        // KVM_RUN; the registers for a failure's message.
        Vcpu => vec![KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()],
        Qmp => vec![libc::FIONBIO, blk_get_size64],
        // Qmp's, and KVM's state and dirty log on the VM and vCPU fds.
        Migration => [
            ioctls(Qmp),
            vec![
                KVM_GET_MSR_INDEX_LIST(),
                KVM_GET_DIRTY_LOG(),
                KVM_SET_USER_MEMORY_REGION(),
                KVM_GET_IRQCHIP(),
                KVM_SET_IRQCHIP(),
                KVM_GET_CLOCK(),
                KVM_SET_CLOCK(),
                KVM_GET_REGS(),
                KVM_SET_REGS(),
                KVM_GET_SREGS(),
                KVM_SET_SREGS(),
                KVM_GET_MSRS(),
                KVM_SET_MSRS(),
                KVM_GET_LAPIC(),
                KVM_SET_LAPIC(),
                KVM_GET_CPUID2(),
                KVM_SET_CPUID2(),
                KVM_GET_MP_STATE(),
                KVM_SET_MP_STATE(),
                KVM_GET_PIT2(),
                KVM_SET_PIT2(),
                KVM_GET_VCPU_EVENTS(),
                KVM_SET_VCPU_EVENTS(),
                KVM_GET_DEBUGREGS(),
                KVM_SET_DEBUGREGS(),
                KVM_GET_TSC_KHZ(),
                KVM_SET_TSC_KHZ(),
                KVM_GET_XSAVE(),
                KVM_SET_XSAVE(),
                KVM_GET_XCRS(),
                KVM_SET_XCRS(),
            ],
        ]
        .concat(),
        Spawner => [ioctls(Vcpu), ioctls(Migration)].concat(),
        _ => Vec::new(),
    }
}

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompSetupError> {
    let build = |source| SeccompSetupError::Build { kind, source };
    let arg_is = |arg: u8, len: SeccompCmpArgLen, value: u64| {
        SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(build)
    };
    let mut rules = BTreeMap::new();
    for call in calls(kind) {
        let narrowed = match call {
            libc::SYS_ioctl => ioctls(kind)
                .into_iter()
                .map(|request| arg_is(1, SeccompCmpArgLen::Dword, request))
                .collect::<Result<Vec<_>, _>>()?,
            // Signals to our own threads only.
            libc::SYS_tgkill => vec![arg_is(
                0,
                SeccompCmpArgLen::Dword,
                u64::from(std::process::id()),
            )?],
            _ => Vec::new(),
        };
        rules.insert(call, narrowed);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_and_the_spawner_allows_what_every_kind_does() {
        for kind in ThreadKind::ALL {
            program(kind, SeccompAction::Trap).unwrap();
            let spawner = calls(ThreadKind::Spawner);
            for call in calls(kind) {
                assert!(spawner.contains(&call), "{kind:?}: {call}");
            }
            let spawner_ioctls = ioctls(ThreadKind::Spawner);
            for request in ioctls(kind) {
                assert!(spawner_ioctls.contains(&request), "{kind:?}: {request:#x}");
            }
        }
    }

    #[test]
    fn only_vcpu_threads_may_run_a_vcpu_and_only_io_threads_enter_a_ring() {
        for kind in ThreadKind::ALL {
            let vcpu_like = matches!(kind, ThreadKind::Vcpu | ThreadKind::Spawner);
            assert_eq!(ioctls(kind).contains(&KVM_RUN()), vcpu_like, "{kind:?}");
            // Block migration reads and writes disks through engines too.
            let io = matches!(
                kind,
                ThreadKind::Dataplane
                    | ThreadKind::Job
                    | ThreadKind::Spawner
                    | ThreadKind::Nbd
                    | ThreadKind::Migration
            );
            assert_eq!(
                calls(kind).contains(&libc::SYS_io_uring_enter),
                io,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_kernel_accepts_every_filter() {
        for kind in ThreadKind::ALL {
            // Log, not trap: nothing this thread does may end the tests.
            let program = program(kind, SeccompAction::Log).unwrap();
            std::thread::spawn(move || base::seccomp::install("probe", &program))
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        }
    }

    /// glibc's own opens (malloc's `/proc/sys/vm/overcommit_memory` probe)
    /// fail with EACCES on threads that may not open files, rather than
    /// meeting the filter's mismatch action (with `on`, the end of the
    /// VMM); any other open still meets it, and QMP threads still open.
    #[test]
    fn glibcs_read_only_probes_are_refused_not_trapped() {
        fn open(path: &std::ffi::CStr, flags: i32) -> Result<(), i32> {
            // SAFETY: a valid NUL-terminated path; the descriptor, if any,
            // is closed at once.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), flags) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
            }
            // SAFETY: fd was just opened here.
            unsafe { libc::close(fd) };
            Ok(())
        }
        let probe = c"/proc/sys/vm/overcommit_memory";
        for kind in ThreadKind::ALL {
            // A mismatch answered with EPERM tells the two refusals apart
            // without ending the test process.
            let program = program(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
            let (glibc, other) = std::thread::spawn(move || {
                base::seccomp::install("probe", &program).unwrap();
                (
                    open(probe, libc::O_RDONLY | libc::O_CLOEXEC),
                    open(probe, libc::O_RDONLY),
                )
            })
            .join()
            .unwrap();
            // The kinds that open files themselves.
            if matches!(
                kind,
                ThreadKind::Qmp | ThreadKind::Migration | ThreadKind::Spawner
            ) {
                assert_eq!((glibc, other), (Ok(()), Ok(())), "{kind:?}");
            } else {
                assert_eq!(glibc, Err(libc::EACCES), "{kind:?}");
                assert_eq!(other, Err(libc::EPERM), "{kind:?}");
            }
        }
    }

    #[test]
    fn the_kvm_ioctl_numbers_are_linuxs() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC(), 0x8400_ae8e);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_GET_PIT2(), 0x8070_ae9f);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(KVM_GET_TSC_KHZ(), 0xaea3);
    }
}
