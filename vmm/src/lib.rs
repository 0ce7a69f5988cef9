//! vmm: a minimal KVM virtual machine monitor.
//!
//! The library builds and runs VMs; the `vmm` binary is a thin command line
//! over it. Tests start guests with [`start`], watch their serial output
//! with [`VmHandle::wait_for_line`] and read how they ended with
//! [`VmHandle::wait`]:
//!
//! ```no_run
//! use std::time::Duration;
//! use vmm::{Console, SerialLog, VmConfig, VmExit};
//!
//! let mut config = VmConfig::new("kernel-images/out/testguest");
//! config.cmdline = "exit=3".into();
//! let vm = vmm::start(&config, Console::Log(SerialLog::new())).unwrap();
//! vm.wait_for_line("testguest: start", Duration::from_secs(30)).unwrap();
//! assert_eq!(vm.wait(), VmExit::Status(3));
//! ```

pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod disk;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
mod grace_period;
pub mod host;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod qmp;
pub mod runstate;
pub mod seccomp;
mod shared;
mod vcpu;
pub mod virtio;
pub mod vm;
pub mod x86;

pub use config::{MemorySize, VcpuAffinity, VmConfig};
pub use console::{Console, SerialLog};
pub use disk::DiskConfig;
pub use error::{Error, Result};
pub use vm::{start, VmExit, VmHandle, WaitError};
