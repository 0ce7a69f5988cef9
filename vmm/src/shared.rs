//! What the vCPU threads, the run state and the VM's handle share: why
//! the VM ended, whether it is ending, where vCPUs park while it is
//! paused, and the signal that kicks a vCPU out of `KVM_RUN`. Below
//! `vm.rs` and `runstate.rs`, so both import it and neither the other.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, Once, OnceLock};
use std::time::Duration;

use base::sync::{self, lock};

use crate::error::{Error, Result};
use crate::qmp::EventSink;
use vmm_sys_util::eventfd::EventFd;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the exit port (0xf4).
    Status(u8),
    /// The guest reset the machine.
    Reset,
    /// The guest powered the machine off.
    PowerOff,
    /// The VM was killed through its handle.
    Killed,
    /// A QMP client asked the VM to end (`quit`).
    Quit,
    /// The VMM got SIGTERM, SIGINT or SIGHUP: it ends as asked, with 0.
    Signalled,
    /// The VM failed: a KVM internal error, a triple fault, a failed vCPU.
    Failed(String),
}

impl VmExit {
    /// The SHUTDOWN event's data for this exit: whether the guest asked,
    /// and QEMU's name for the cause.
    fn shutdown_event(&self) -> serde_json::Value {
        let (guest, reason) = match self {
            VmExit::Status(_) | VmExit::PowerOff => (true, "guest-shutdown"),
            VmExit::Reset => (true, "guest-reset"),
            VmExit::Killed | VmExit::Signalled => (false, "host-signal"),
            VmExit::Quit => (false, "host-qmp-quit"),
            VmExit::Failed(_) => (false, "host-error"),
        };
        serde_json::json!({"guest": guest, "reason": reason})
    }

    /// The exit status the `vmm` binary ends with.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::Status(v) => i32::from(*v),
            VmExit::Reset | VmExit::PowerOff | VmExit::Quit | VmExit::Signalled => 0,
            VmExit::Killed => 137,
            VmExit::Failed(_) => 125,
        }
    }
}

/// State the vCPU threads and the handle share.
pub(crate) struct Shared {
    exit: Mutex<Option<VmExit>>,
    ended: Condvar,
    /// Set once the VM is ending; vCPUs check it between runs.
    pub stopping: AtomicBool,
    /// Where vCPUs wait while the VM is paused.
    pub parking: Parking,
    /// QMP's event sink, once a QMP server runs: told when the VM ends.
    pub events: OnceLock<EventSink>,
    /// Made readable when the VM ends, so that a thread that also waits
    /// for other descriptors (the main thread's signalfd) wakes at once.
    ended_fd: EventFd,
}

impl Shared {
    /// A VM that runs and has not ended.
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            exit: Mutex::new(None),
            ended: Condvar::new(),
            stopping: AtomicBool::new(false),
            parking: Parking::default(),
            events: OnceLock::new(),
            ended_fd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// A descriptor that polls readable once the VM has ended.
    pub fn ended_fd(&self) -> RawFd {
        self.ended_fd.as_raw_fd()
    }

    /// Records why the VM ended; the first reason wins.
    pub fn finish(&self, exit: VmExit) {
        let mut slot = lock(&self.exit);
        if slot.is_none() {
            if let Some(events) = self.events.get() {
                events.emit("SHUTDOWN", Some(exit.shutdown_event()));
            }
            *slot = Some(exit);
        }
        self.stopping.store(true, Ordering::Release);
        self.ended.notify_all();
        // Only fails when the counter would overflow, which a readable
        // eventfd that nobody reads never reaches: it stays readable.
        let _ = self.ended_fd.write(1);
    }

    /// Why the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        lock(&self.exit).clone()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        let slot = lock(&self.exit);
        let (slot, _) = sync::wait_timeout_while(&self.ended, slot, timeout, |s| s.is_none());
        slot.clone()
    }

    /// Waits for the VM to end.
    pub fn wait(&self) -> VmExit {
        let slot = lock(&self.exit);
        sync::wait_while(&self.ended, slot, |s| s.is_none())
            .clone()
            .expect("wait_while returns once an exit is recorded")
    }
}

/// Where the vCPUs wait while the VM is paused.
#[derive(Default)]
pub(crate) struct Parking {
    /// Set while vCPUs must not enter KVM_RUN; read before every run.
    pub(crate) requested: AtomicBool,
    /// How many vCPUs wait here.
    pub(crate) parked: Mutex<u32>,
    /// Signalled when `parked` or `requested` changes.
    pub(crate) changed: Condvar,
}

impl Parking {
    /// Called by a vCPU before each KVM_RUN: waits while the VM is paused
    /// (or until it ends).
    pub fn wait_while_paused(&self, stopping: &AtomicBool) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut parked = lock(&self.parked);
        *parked += 1;
        self.changed.notify_all();
        while self.requested.load(Ordering::Acquire) && !stopping.load(Ordering::Acquire) {
            parked = sync::wait(&self.changed, parked);
        }
        *parked -= 1;
        self.changed.notify_all();
    }

    /// Wakes every parked vCPU (the VM resumes or ends).
    pub fn release(&self) {
        let _parked = lock(&self.parked);
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Wakes parked vCPUs so they see the VM is ending.
    pub fn wake_all(&self) {
        let _parked = lock(&self.parked);
        self.changed.notify_all();
    }
}

pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the do-nothing handler whose only effect is to interrupt `KVM_RUN`.
pub(crate) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    static mut RESULT: i32 = 0;
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    ONCE.call_once(|| {
        let rc = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_or_else(|e| e.errno(), |_| 0);
        // SAFETY: written once inside call_once, read only after it.
        unsafe { RESULT = rc };
    });
    // SAFETY: call_once has completed, so no thread writes RESULT any more.
    match unsafe { RESULT } {
        0 => Ok(()),
        errno => Err(Error::Thread {
            name: "vcpu".into(),
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    /// The main thread sleeps in poll(2) on this descriptor and its
    /// signalfd: the VM's end must wake it, not a timeout.
    #[test]
    fn the_ended_fd_polls_readable_once_the_vm_ends_and_stays_so() {
        let shared = Shared::new().unwrap();
        assert!(!readable(shared.ended_fd()));
        shared.finish(VmExit::Status(0));
        assert!(readable(shared.ended_fd()));
        shared.finish(VmExit::Killed);
        assert!(readable(shared.ended_fd()));
        assert_eq!(shared.exit(), Some(VmExit::Status(0)));
    }
}
