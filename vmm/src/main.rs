//! The `vmm` binary: parse the command line, boot the VM, end with the
//! guest's status.

use std::process::ExitCode;
use std::time::Duration;

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
    // Before any thread starts, so that every thread inherits the mask
    // and the signals reach only the signalfd.
    let signals = match EndSignals::new() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("vmm: cannot watch for SIGTERM, SIGINT and SIGHUP: {e}");
            return ExitCode::from(EXIT_START_FAILED);
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
    // The main loop: the VM ends by itself, or a signal ends it as QEMU
    // does (SHUTDOWN with reason host-signal, then the normal stop). The
    // VM's end wakes the poll through its eventfd, so the process ends as
    // soon as the guest asks; the timeout is only a backstop.
    while vm.wait_timeout(Duration::ZERO).is_none() {
        match signals.wait(vm.ended_fd(), Duration::from_secs(1)) {
            Ok(Some(signo)) => {
                log::info!("signal {signo} received: ending the VM");
                vm.end_on_signal();
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("vmm: cannot read the signalfd: {e}");
                vm.end_on_signal();
            }
        }
    }
    let exit = vm.wait();
    if let VmExit::Failed(why) = &exit {
        eprintln!("vmm: the VM failed: {why}");
    }
    ExitCode::from(exit.code() as u8)
}

/// SIGTERM, SIGINT and SIGHUP, blocked and read from a signalfd instead of
/// handled: the main loop does the work, nothing runs in a handler.
struct EndSignals {
    fd: std::os::fd::OwnedFd,
}

impl EndSignals {
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: sigset_t is plain data that sigemptyset initialises.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t for these calls, which only
        // write to it and to this thread's mask.
        unsafe {
            libc::sigemptyset(&mut set);
            for signo in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, signo);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        Ok(Self {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The next signal received within `timeout`, if any; returns early,
    /// with none, when `also` (a descriptor the caller keeps open) polls
    /// readable.
    fn wait(&self, also: std::os::fd::RawFd, timeout: Duration) -> std::io::Result<Option<u32>> {
        use std::os::fd::AsRawFd;
        let mut pfds = [self.fd.as_raw_fd(), also].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: two valid pollfds, for the duration of the call.
        let ready = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if pfds[0].revents & libc::POLLIN == 0 {
            return Ok(None);
        }
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is writable memory of `size` bytes.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n == size as isize {
            Ok(Some(info.ssi_signo))
        } else {
            Ok(None)
        }
    }
}
