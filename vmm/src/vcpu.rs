//! One vCPU thread: `KVM_RUN` in a loop, port I/O and MMIO exits routed to
//! the buses, and every way a vCPU can end turned into a [`VmExit`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use base::sync::lock;

use devices::{Bus, GuestRequest};
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::shared::{Shared, VmExit};

/// Flag in the emulation-failure exit data: instruction bytes follow.
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// A vCPU and what its exits reach.
pub(crate) struct Vcpu {
    pub id: u32,
    /// Held around each `KVM_RUN`; while the vCPU is parked a migration
    /// takes it to read or write the vCPU's state.
    pub fd: Arc<Mutex<VcpuFd>>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub shared: Arc<Shared>,
    /// Print when the first `KVM_RUN` starts (for the start-up benchmark).
    pub trace_start: bool,
}

impl Vcpu {
    /// Runs the guest until the VM ends or is told to stop.
    pub fn run(mut self) {
        if self.trace_start {
            trace_first_run(self.id);
        }
        while !self.shared.stopping.load(Ordering::Acquire) {
            self.shared.parking.wait_while_paused(&self.shared.stopping);
            if self.shared.stopping.load(Ordering::Acquire) {
                return;
            }
            if let Some(exit) = self.step() {
                self.shared.finish(exit);
                return;
            }
        }
    }

    /// One `KVM_RUN`; `Some` when the VM must end.
    fn step(&mut self) -> Option<VmExit> {
        let id = self.id;
        let shared_fd = self.fd.clone();
        let mut fd = lock(&shared_fd);
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    // Nothing there: an open ISA bus reads as all ones.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => match self.pio.write(u64::from(port), data) {
                Some(Some(req)) => Some(request_exit(req)),
                Some(None) => None,
                None => {
                    log::trace!("vcpu{id}: write to unclaimed port {port:#x}");
                    None
                }
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => match self.mmio.write(addr, data) {
                Some(Some(req)) => Some(request_exit(req)),
                _ => None,
            },
            // With the in-kernel irqchip, HLT stays in KVM; an exit here is spurious.
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmExit::Failed(format!("vCPU {id}: the guest reported a crash")),
                other => VmExit::Failed(format!("vCPU {id}: unexpected system event {other}")),
            }),
            Ok(VcpuExit::Shutdown) => Some(VmExit::Failed(format!(
                "vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN) at RIP {}",
                rip(&fd)
            ))),
            Ok(VcpuExit::InternalError) => Some(VmExit::Failed(internal_error(id, &mut fd))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Failed(format!(
                "vCPU {id}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
            ))),
            Ok(other) => Some(VmExit::Failed(format!("vCPU {id}: unexpected KVM exit {other:?}"))),
            // A kick from the VM's teardown, or a signal for this process.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Failed(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    }
}

fn rip(fd: &VcpuFd) -> String {
    fd.get_regs()
        .map_or_else(|_| "unknown".into(), |r| format!("{:#x}", r.rip))
}

/// One line naming the cause of a `KVM_EXIT_INTERNAL_ERROR`; for an
/// emulation failure, the guest RIP and the instruction bytes.
fn internal_error(id: u32, fd: &mut VcpuFd) -> String {
    let rip = rip(fd);
    // SAFETY: KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which the
    // kernel fills the `internal` member of the exit union.
    let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return format!(
            "vCPU {id}: KVM internal error (suberror {}) at RIP {rip}",
            internal.suberror
        );
    }
    // Emulation failure data: flags, then an instruction length byte
    // and up to 15 instruction bytes.
    let mut insn = String::new();
    if internal.ndata >= 3 && internal.data[0] & EMULATION_FLAG_INSTRUCTION_BYTES != 0 {
        let bytes: Vec<u8> = internal.data[1..3]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        let len = usize::from(bytes[0]).min(15);
        let hex: Vec<String> = bytes[1..=len].iter().map(|b| format!("{b:02x}")).collect();
        insn = format!(", instruction bytes {}", hex.join(" "));
    }
    format!(
        "vCPU {id}: KVM could not emulate an instruction (emulation failure) at RIP {rip}{insn}"
    )
}

fn request_exit(req: GuestRequest) -> VmExit {
    match req {
        GuestRequest::Exit(status) => VmExit::Status(status),
        GuestRequest::Reset => VmExit::Reset,
        GuestRequest::PowerOff => VmExit::PowerOff,
    }
}

/// Prints the monotonic time and the process's CPU time at the first
/// `KVM_RUN`, so a benchmark can measure start-up from outside.
fn trace_first_run(id: u32) {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes only into the timespec we own.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    eprintln!(
        "vmm: vcpu{id} first KVM_RUN: monotonic_ns={} process_cpu_ns={}",
        now(libc::CLOCK_MONOTONIC),
        now(libc::CLOCK_PROCESS_CPUTIME_ID)
    );
}
