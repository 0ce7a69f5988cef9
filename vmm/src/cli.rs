//! The `vmm` command line. It only builds a [`VmConfig`]; building the VM is
//! the library's job.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{Incoming, MemorySize, VcpuAffinity, VmConfig, DEFAULT_CMDLINE};
use crate::disk::DiskConfig;
use crate::seccomp::SeccompMode;

/// Boot a Linux kernel or a PVH guest on KVM.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Cli {
    /// Guest kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    /// Not needed with --incoming.
    #[arg(long, value_name = "PATH", required_unless_present = "incoming")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; arguments after `--` go to the guest's init.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest RAM, e.g. 64M or 1G (a bare number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    pub memory: MemorySize,
    /// Number of vCPUs.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub cpus: u32,
    /// A virtio-blk disk: path=FILE[,format=raw|qcow2][,snapshot=on][,id=ID][,node-name=NAME][,readonly=on][,direct=on][,locking=auto|on|off][,aio=auto|io_uring|sync][,queues=N][,queue-size=N][,serial=STR][,poll=USECS][,submit-batch=N][,dataplane-cpus=LIST][,stats=on|off][,live-jobs=on|off][,throttling.LIMIT=N]...
    #[arg(long = "disk", value_name = "OPTIONS")]
    pub disks: Vec<DiskConfig>,
    /// Serve QMP (QEMU's machine protocol) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,
    /// Seccomp filters on every thread: `on` ends the VMM on a system call
    /// outside a thread's list, `log` only logs it, `off` has none.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,
    /// Receive a migration instead of booting: unix:PATH or tcp:HOST:PORT
    /// (listen there), file:PATH (restore a state file), or defer (wait
    /// for QMP's migrate-incoming).
    #[arg(long, value_name = "URI")]
    pub incoming: Option<Incoming>,
    /// An in-kernel i8254 PIT for the guest: on or off (QEMU microvm's
    /// pit=). Linux and the test guest need none.
    #[arg(long, value_name = "on|off", default_value = "off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub pit: bool,
    /// Keep vCPU threads on these host CPUs: N=LIST for vCPU N, a bare
    /// LIST (taskset's form, e.g. 0-3,6) for every vCPU without its own.
    /// Repeatable. Unpinned by default.
    #[arg(long = "vcpu-affinity", value_name = "[N=]LIST")]
    pub vcpu_affinity: Vec<VcpuAffinity>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}' is not on or off")),
    }
}

impl From<Cli> for VmConfig {
    fn from(cli: Cli) -> Self {
        VmConfig {
            kernel: cli.kernel.unwrap_or_default(),
            initrd: cli.initrd,
            cmdline: cli.cmdline,
            memory: cli.memory,
            cpus: cli.cpus,
            disks: cli.disks,
            qmp: cli.qmp,
            seccomp: cli.seccomp,
            incoming: cli.incoming,
            pit: cli.pit,
            vcpu_affinity: cli.vcpu_affinity,
        }
    }
}

/// What parsing the command line came to.
#[derive(Debug)]
pub enum Parsed {
    /// Boot this VM.
    Run(Box<VmConfig>),
    /// Print this (help or version) and exit 0.
    Info(String),
    /// Print this one-line error and exit 2.
    Usage(String),
}

/// Parses `args` (including the program name) into a config, or a one-line
/// message: a user who typed one wrong flag gets one line telling them which.
pub fn parse<I, T>(args: I) -> Parsed
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    match Cli::try_parse_from(args) {
        Ok(cli) => Parsed::Run(Box::new(cli.into())),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            Parsed::Info(e.to_string())
        }
        Err(e) => {
            // clap explains over several lines, then shows usage: keep the
            // explanation, on one line.
            let text = e.to_string();
            let words: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let line = words.join(" ");
            Parsed::Usage(line.trim_start_matches("error: ").to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(args: &[&str]) -> String {
        match parse(std::iter::once("vmm").chain(args.iter().copied())) {
            Parsed::Usage(msg) => msg,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn flags_become_a_config() {
        let Parsed::Run(cfg) = parse([
            "vmm",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--cmdline",
            "console=ttyS0 -- exit 3",
            "--memory",
            "64M",
            "--cpus",
            "2",
        ]) else {
            panic!("parse failed")
        };
        assert_eq!(cfg.kernel, PathBuf::from("k"));
        assert_eq!(cfg.initrd, Some(PathBuf::from("i")));
        assert_eq!(cfg.cmdline, "console=ttyS0 -- exit 3");
        assert_eq!(cfg.memory, MemorySize::mib(64));
        assert_eq!(cfg.cpus, 2);
    }

    #[test]
    fn defaults_boot_a_serial_console_with_128m_and_one_cpu() {
        let Parsed::Run(cfg) = parse(["vmm", "--kernel", "k"]) else {
            panic!("parse failed")
        };
        assert_eq!(*cfg, VmConfig::new("k"));
    }

    #[test]
    fn the_pit_is_off_unless_asked_for_and_incoming_needs_no_kernel() {
        let pit = |args: &[&str]| match parse(["vmm", "--kernel", "k"].iter().chain(args)) {
            Parsed::Run(cfg) => cfg.pit,
            other => panic!("parse failed: {other:?}"),
        };
        assert!(!pit(&[]));
        assert!(pit(&["--pit", "on"]));
        assert!(!pit(&["--pit=off"]));
        assert!(usage(&["--kernel", "k", "--pit", "yes"]).contains("'yes' is not on or off"));
        let Parsed::Run(cfg) = parse(["vmm", "--incoming", "unix:/tmp/m.sock"]) else {
            panic!("--incoming without --kernel did not parse")
        };
        assert!(matches!(
            cfg.incoming,
            Some(crate::config::Incoming::Uri(_))
        ));
        assert!(usage(&[]).contains("--kernel"), "{}", usage(&[]));
        assert!(usage(&["--incoming", "exec:cat"]).contains("unknown migration protocol"));
    }

    #[test]
    fn seccomp_is_on_unless_the_flag_says_log_or_off() {
        let mode = |args: &[&str]| match parse(["vmm", "--kernel", "k"].iter().chain(args)) {
            Parsed::Run(cfg) => cfg.seccomp,
            other => panic!("parse failed: {other:?}"),
        };
        assert_eq!(mode(&[]), SeccompMode::On);
        assert_eq!(mode(&["--seccomp=on"]), SeccompMode::On);
        assert_eq!(mode(&["--seccomp=log"]), SeccompMode::Log);
        assert_eq!(mode(&["--seccomp", "off"]), SeccompMode::Off);
        assert!(usage(&["--kernel", "k", "--seccomp=yes"]).contains("--seccomp"));
    }

    #[test]
    fn bad_flags_give_one_line_naming_the_problem() {
        assert!(usage(&[]).contains("--kernel"));
        assert!(usage(&["--kernel", "k", "--memory", "lots"]).contains("'lots'"));
        assert!(usage(&["--kernel", "k", "--cpus", "-1"]).contains("--cpus"));
        assert!(usage(&["--kernel", "k", "--bogus"]).contains("--bogus"));
        for msg in [usage(&[]), usage(&["--kernel", "k", "--memory", "x"])] {
            assert!(!msg.contains('\n'), "{msg}");
            assert!(!msg.starts_with("error:"), "{msg}");
        }
    }

    #[test]
    fn help_is_information_not_an_error() {
        assert!(matches!(parse(["vmm", "--help"]), Parsed::Info(h) if h.contains("--kernel")));
    }
}
