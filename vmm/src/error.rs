//! The VMM's errors. Each reads as one sentence and names what the user gave.

use std::io;
use std::path::PathBuf;

/// Everything that can stop a VM from being built or started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An incoming migration or a state file could not be taken.
    #[error("incoming migration failed: {0}")]
    Migration(#[from] crate::migration::MigrationError),
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or run on a host with virtualization)")]
    KvmMissing,
    /// `/dev/kvm` exists but may not be opened by this user.
    #[error("/dev/kvm may not be opened by this user: {0} (add the user to the 'kvm' group or run as root)")]
    KvmDenied(#[source] kvm_ioctls::Error),
    /// Any other failure opening `/dev/kvm`.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed while building the VM.
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The memory size is below what a guest can use.
    #[error("guest memory of {size} bytes is too small: at least {min} MiB is needed")]
    MemoryTooSmall { size: u64, min: u64 },
    /// The memory size is above what this host has.
    #[error("guest memory of {size_mib} MiB is more than this host's {host_mib} MiB")]
    MemoryTooLarge { size_mib: u64, host_mib: u64 },
    /// The memory size is not a whole number of pages.
    #[error("guest memory of {0} bytes is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    /// The guest memory could not be mapped.
    #[error("cannot allocate {size_mib} MiB of guest memory: {reason}")]
    MemoryAlloc { size_mib: u64, reason: String },
    /// The vCPU count is zero or beyond what KVM and the MP table allow.
    #[error("--cpus {cpus} is out of range: this host allows 1 to {max}")]
    CpuCount { cpus: u32, max: u32 },
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel '{path}': {source}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel file is neither an ELF nor a bzImage.
    #[error("'{0}' is not a kernel: it is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    /// The kernel was recognised but could not be loaded.
    #[error("cannot load kernel '{path}': {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    /// The initrd file could not be opened or read.
    #[error("cannot read initrd '{path}': {source}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The initrd does not fit in guest memory above the kernel.
    #[error("initrd '{path}' ({size_mib} MiB) does not fit in guest memory: {room_mib} MiB are free above the kernel; give the guest more --memory")]
    InitrdTooLarge {
        path: PathBuf,
        size_mib: u64,
        room_mib: u64,
    },
    /// The kernel command line is too long or malformed.
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write the {what} into guest memory: {reason}")]
    GuestWrite { what: &'static str, reason: String },
    /// A disk could not be opened.
    #[error("disk '{id}': {source}")]
    Disk {
        id: String,
        #[source]
        source: block::BlockError,
    },
    /// More disks than interrupt lines.
    #[error("{count} disks are more than the {max} this VM can give interrupt lines to")]
    TooManyDisks { count: usize, max: usize },
    /// `--vcpu-affinity` or a disk's `dataplane-cpus=` names CPUs the
    /// VMM may not use.
    #[error("{what} {source}")]
    Affinity {
        /// Whose list, e.g. "disk 'vda' dataplane-cpus:".
        what: String,
        #[source]
        source: base::cpus::CpuListError,
    },
    /// `--vcpu-affinity` given twice for one vCPU, or twice without one.
    #[error("--vcpu-affinity is given twice for {0}")]
    RepeatedAffinity(String),
    /// `--vcpu-affinity N=...` for a vCPU the VM does not have.
    #[error("--vcpu-affinity names vCPU {vcpu}, but the VM has {cpus} (numbered from 0)")]
    AffinityVcpu { vcpu: u32, cpus: u32 },
    /// Two disks with the same id.
    #[error("two disks are named '{0}': give each a different id=")]
    DuplicateDisk(String),
    /// The QMP socket could not be served.
    #[error(transparent)]
    Qmp(crate::qmp::QmpServerError),
    /// A device could not be set up.
    #[error("cannot set up device '{name}': {reason}")]
    Device { name: String, reason: String },
    /// The seccomp filters could not be set up, or installed on the main
    /// thread.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompSetupError),
    /// A thread could not be started.
    #[error("cannot start thread '{name}': {source}")]
    Thread {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Maps a failed KVM ioctl to an error that says what we asked of KVM.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}
