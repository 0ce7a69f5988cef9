//! What a VM is made of: the one structure the CLI and the library API fill in.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use base::cpus::CpuList;

use crate::disk::DiskConfig;
use crate::migration::MigrationUri;

/// Where a VM built to receive a migration gets its state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Wait for `migrate-incoming` over QMP (`--incoming defer`).
    Defer,
    /// Listen at a socket, or restore a state file, at start.
    Uri(MigrationUri),
}

impl FromStr for Incoming {
    type Err = crate::migration::uri::UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "defer" => Ok(Incoming::Defer),
            uri => uri.parse().map(Incoming::Uri),
        }
    }
}

/// The command line a guest gets when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// An ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    pub kernel: PathBuf,
    /// An initial ramdisk, passed to the kernel as is.
    pub initrd: Option<PathBuf>,
    /// The kernel command line as the user wrote it; the VMM appends its own
    /// parameters (host workarounds, devices) before any `--`.
    pub cmdline: String,
    /// Guest RAM.
    pub memory: MemorySize,
    /// Number of vCPUs.
    pub cpus: u32,
    /// virtio-blk disks, in the order the guest sees them.
    pub disks: Vec<DiskConfig>,
    /// Serve QMP on this Unix socket.
    pub qmp: Option<PathBuf>,
    /// Which seccomp filters the VM's threads run under.
    pub seccomp: crate::seccomp::SeccompMode,
    /// Build the VM to receive a migration (or restore a state file)
    /// instead of booting `kernel`.
    pub incoming: Option<Incoming>,
    /// Give the guest an in-kernel i8254 PIT (QEMU microvm's `pit=on`).
    /// Off by default: Linux and our test guest keep time with the TSC,
    /// kvmclock and the LAPIC timer, and tearing KVM's PIT down costs
    /// about 14 ms at every exit on our hosts.
    pub pit: bool,
    /// Where vCPU threads run (`--vcpu-affinity`); none: where the
    /// scheduler puts them.
    pub vcpu_affinity: Vec<VcpuAffinity>,
}

impl VmConfig {
    /// A config with the defaults the `vmm` binary uses: 128 MiB, 1 vCPU,
    /// a serial console.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory: MemorySize::mib(128),
            cpus: 1,
            disks: Vec::new(),
            qmp: None,
            seccomp: Default::default(),
            incoming: None,
            pit: false,
            vcpu_affinity: Vec::new(),
        }
    }

    /// The host CPUs vCPU `id`'s thread is kept on: its own
    /// `--vcpu-affinity N=LIST`, else the one for every vCPU, else none.
    pub fn vcpu_cpus(&self, id: u32) -> Option<&CpuList> {
        let own = self.vcpu_affinity.iter().find(|a| a.vcpu == Some(id));
        own.or_else(|| self.vcpu_affinity.iter().find(|a| a.vcpu.is_none()))
            .map(|a| &a.cpus)
    }

    /// Each `--vcpu-affinity` names a vCPU this VM has, once, and CPUs
    /// the VMM may run on.
    pub fn check_vcpu_affinity(&self) -> Result<(), crate::Error> {
        for (i, a) in self.vcpu_affinity.iter().enumerate() {
            let who = match a.vcpu {
                Some(id) => format!("vCPU {id}"),
                None => "every vCPU".to_string(),
            };
            if self.vcpu_affinity[..i].iter().any(|b| b.vcpu == a.vcpu) {
                return Err(crate::Error::RepeatedAffinity(who));
            }
            if let Some(id) = a.vcpu.filter(|&id| id >= self.cpus) {
                return Err(crate::Error::AffinityVcpu {
                    vcpu: id,
                    cpus: self.cpus,
                });
            }
            a.cpus
                .check_allowed()
                .map_err(|source| crate::Error::Affinity {
                    what: format!("--vcpu-affinity for {who}:"),
                    source,
                })?;
        }
        Ok(())
    }
}

/// One `--vcpu-affinity [N=]LIST`: vCPU `N`'s thread, or every vCPU's
/// without an own entry, runs only on the host CPUs in LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuAffinity {
    /// The vCPU; none: every vCPU without an entry of its own.
    pub vcpu: Option<u32>,
    /// The host CPUs, as taskset writes them (`0-3,6`).
    pub cpus: CpuList,
}

impl FromStr for VcpuAffinity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (vcpu, list) = match s.split_once('=') {
            Some((n, list)) => match n.parse::<u32>() {
                Ok(id) if n.bytes().all(|b| b.is_ascii_digit()) => (Some(id), list),
                _ => return Err(format!("'{n}' is not a vCPU number (write N=LIST or LIST)")),
            },
            None => (None, s),
        };
        let cpus = CpuList::parse(list, ',').map_err(|e| e.to_string())?;
        Ok(VcpuAffinity { vcpu, cpus })
    }
}

/// A memory size in bytes, written like `64M`, `1G`, `512K` or `1073741824B`.
/// A bare number means MiB, as QEMU's `-m` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(pub u64);

impl MemorySize {
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b if b % (1 << 30) == 0 => write!(f, "{}G", b >> 30),
            b if b % (1 << 20) == 0 => write!(f, "{}M", b >> 20),
            b if b % (1 << 10) == 0 => write!(f, "{}K", b >> 10),
            b => write!(f, "{b}B"),
        }
    }
}

/// Why a memory size did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional K, M, G or T suffix.
    #[error(
        "'{0}' is not a size: write a number with an optional K, M, G or T suffix, like 64M or 1G"
    )]
    Syntax(String),
    /// The number overflows 64 bits once scaled.
    #[error("'{0}' is too large")]
    Overflow(String),
}

impl FromStr for MemorySize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, SizeError> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(digits);
        let num: u64 = num.parse().map_err(|_| SizeError::Syntax(s.to_string()))?;
        let shift = match suffix.to_ascii_uppercase().as_str() {
            "" | "M" | "MB" | "MIB" => 20,
            "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(SizeError::Syntax(s.to_string())),
        };
        num.checked_mul(1u64 << shift)
            .map(MemorySize)
            .ok_or_else(|| SizeError::Overflow(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affinity(args: &[&str], cpus: u32) -> VmConfig {
        let mut config = VmConfig::new("k");
        config.cpus = cpus;
        config.vcpu_affinity = args.iter().map(|a| a.parse().unwrap()).collect();
        config
    }

    #[test]
    fn a_vcpus_own_affinity_wins_over_the_one_for_all() {
        let c = affinity(&["1=0", "0-1"], 3);
        let cpus = |id| c.vcpu_cpus(id).map(|l| l.to_string());
        assert_eq!(cpus(0).as_deref(), Some("0-1"));
        assert_eq!(cpus(1).as_deref(), Some("0"));
        assert_eq!(cpus(2).as_deref(), Some("0-1"));
        let only_one = affinity(&["2=0"], 3);
        assert_eq!(only_one.vcpu_cpus(0), None);
        assert!(only_one.vcpu_cpus(2).is_some());
        assert_eq!(VmConfig::new("k").vcpu_cpus(0), None);
    }

    #[test]
    fn bad_vcpu_affinities_are_refused_with_the_reason() {
        let parse = |s: &str| s.parse::<VcpuAffinity>().unwrap_err();
        assert_eq!(
            parse("x=0"),
            "'x' is not a vCPU number (write N=LIST or LIST)"
        );
        assert_eq!(
            parse("-1=0"),
            "'-1' is not a vCPU number (write N=LIST or LIST)"
        );
        assert_eq!(
            parse("0="),
            "a CPU list names at least one CPU (e.g. 0-3,6)"
        );
        assert_eq!(parse("0=2-1"), "the range '2-1' ends before it starts");
        let check = |args: &[&str], cpus| affinity(args, cpus).check_vcpu_affinity();
        let allowed = CpuList::allowed().unwrap().to_string();
        check(&[&allowed, &format!("0={allowed}")], 1).unwrap();
        assert_eq!(
            check(&["1=0", "1=0"], 2).unwrap_err().to_string(),
            "--vcpu-affinity is given twice for vCPU 1"
        );
        assert_eq!(
            check(&["0", "0"], 2).unwrap_err().to_string(),
            "--vcpu-affinity is given twice for every vCPU"
        );
        assert_eq!(
            check(&["2=0"], 2).unwrap_err().to_string(),
            "--vcpu-affinity names vCPU 2, but the VM has 2 (numbered from 0)"
        );
        if !CpuList::allowed().unwrap().contains(1023) {
            let msg = check(&["1023"], 1).unwrap_err().to_string();
            assert!(
                msg.starts_with(
                    "--vcpu-affinity for every vCPU: CPU 1023 is not one this process may run on"
                ),
                "{msg}"
            );
        }
    }

    #[test]
    fn sizes_parse_with_suffixes_and_bare_numbers_are_mib() {
        assert_eq!("64M".parse(), Ok(MemorySize::mib(64)));
        assert_eq!("1G".parse(), Ok(MemorySize::mib(1024)));
        assert_eq!("1g".parse(), Ok(MemorySize::mib(1024)));
        assert_eq!("512K".parse(), Ok(MemorySize(512 << 10)));
        assert_eq!("128".parse(), Ok(MemorySize::mib(128)));
        assert_eq!("4096B".parse(), Ok(MemorySize(4096)));
        assert_eq!("2GiB".parse(), Ok(MemorySize(2 << 30)));
    }

    #[test]
    fn malformed_sizes_are_refused_with_the_input_named() {
        for bad in ["", "M", "-1M", "1.5G", "12Q", "0x10M", "1 G G"] {
            let err = bad.parse::<MemorySize>().unwrap_err();
            assert!(err.to_string().contains(&format!("'{bad}'")), "{err}");
        }
        assert!(matches!(
            "99999999999T".parse::<MemorySize>(),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_display_in_their_largest_whole_unit() {
        assert_eq!(MemorySize::mib(2048).to_string(), "2G");
        assert_eq!(MemorySize::mib(96).to_string(), "96M");
        assert_eq!(MemorySize(3 << 10).to_string(), "3K");
        assert_eq!(MemorySize(5).to_string(), "5B");
    }
}
