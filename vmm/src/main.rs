//! The `vmm` binary: parse the command line, boot the VM, end with the
//! guest's status.

use std::process::ExitCode;

use vmm::cli::{self, Parsed};
use vmm::{Console, VmExit};

/// Start-up failed: bad input, no KVM, a kernel that does not load.
const EXIT_START_FAILED: u8 = 1;
/// The command line did not parse.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let config = match cli::parse(std::env::args_os()) {
        Parsed::Run(config) => config,
        Parsed::Info(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Parsed::Usage(msg) => {
            eprintln!("vmm: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let vm = match vmm::start(&config, Console::Stdio) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    if let Err(e) = vm.confine_main_thread() {
        eprintln!("vmm: {e}");
        return ExitCode::from(EXIT_START_FAILED);
    }
    let exit = vm.wait();
    if let VmExit::Failed(why) = &exit {
        eprintln!("vmm: the VM failed: {why}");
    }
    ExitCode::from(exit.code() as u8)
}
