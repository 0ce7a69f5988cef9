//! Building a VM from a [`VmConfig`] and the handle that runs, watches and
//! stops it.
//!
//! ```text
//! start(config) ── check user input (kernel, initrd, memory, cmdline)
//!               ── open /dev/kvm, create the VM, irqchip, PIT
//!               ── guest memory, kernel + boot tables, devices
//!               ── vCPUs, one thread each ──► VmHandle
//! VmHandle::wait() ◄── the first vCPU to end the VM records why (VmExit);
//!                      the others are kicked out of KVM_RUN and joined
//! ```

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use base::sync::lock;
use block::job::JobManager;
use block::Graph;
use devices::legacy::{self, ExitPort, Serial, I8042};
use devices::Bus;
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, cmdline, InitrdImage, KernelImage};
use crate::config::{Incoming, VmConfig};
use crate::console::{Console, SerialLog};
use crate::error::{kvm, Error, Result};
use crate::migration::{self, Controller, Machine, MigrationDisk, MigrationUri, StateFile};
use crate::monitor::Monitor;
use crate::qmp::{EventSink, QmpServer, QmpThread};
use crate::runstate::{ContError, PauseError, RunState};
pub use crate::shared::VmExit;
use crate::shared::{install_kick_handler, Shared};
use crate::vcpu::Vcpu;
use crate::x86::{cpuid, mptable, regs};
use crate::{host, memory, virtio};

/// KVM's TSS needs three pages below 4 GiB outside guest RAM.
const TSS_ADDR: usize = 0xfffb_d000;

/// Why waiting for a serial line failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The VM's console is not captured (see [`Console::Log`]).
    #[error("the VM's serial output is not captured")]
    NotCaptured,
    /// The line did not appear in time.
    #[error("no serial line containing '{needle}' within {timeout:?}; last output:\n{tail}")]
    Timeout {
        needle: String,
        timeout: Duration,
        tail: String,
    },
    /// The VM ended before the line appeared.
    #[error(
        "the VM ended ({exit:?}) before a serial line containing '{needle}'; last output:\n{tail}"
    )]
    Ended {
        needle: String,
        exit: VmExit,
        tail: String,
    },
}

/// A running VM.
pub struct VmHandle {
    shared: Arc<Shared>,
    /// vCPU threads and devices; paused, resumed and stopped through it.
    run: Arc<RunState>,
    graph: Arc<Graph>,
    jobs: Arc<JobManager>,
    console: Option<SerialLog>,
    input: Option<JoinHandle<()>>,
    /// The QMP server.
    qmp: Option<QmpThread>,
    /// The filters the VM's threads run under.
    sandbox: Arc<base::Sandbox>,
    // KVM keeps using these until every vCPU has left KVM_RUN: dropped
    // only once every vCPU thread has ended, else leaked (see Drop).
    vm: Option<Arc<VmFd>>,
    memory: Option<GuestMemoryMmap>,
}

impl VmHandle {
    /// How the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        self.shared.exit()
    }

    /// Pauses the guest as QMP's `stop` does; false if it was paused already.
    pub fn pause(&self) -> std::result::Result<bool, PauseError> {
        self.run.pause()
    }

    /// Resumes the guest as QMP's `cont` does; false if it was running.
    pub fn resume(&self) -> std::result::Result<bool, ContError> {
        self.run.resume()
    }

    /// Whether the guest runs (not paused).
    pub fn is_running(&self) -> bool {
        self.run.is_running()
    }

    /// The VM's block graph.
    pub fn graph(&self) -> &Arc<Graph> {
        &self.graph
    }

    /// Asks the VM to end; `wait` then returns [`VmExit::Killed`] unless it
    /// had already ended for another reason.
    pub fn kill(&self) {
        self.shared.finish(VmExit::Killed);
    }

    /// Ends the VM because the process was asked to end (SIGTERM, SIGINT,
    /// SIGHUP): `wait` then returns [`VmExit::Signalled`] unless it had
    /// already ended for another reason.
    pub fn end_on_signal(&self) {
        self.shared.finish(VmExit::Signalled);
    }

    /// A descriptor that polls readable once the VM has ended: for a
    /// caller that waits for it together with other descriptors. Valid as
    /// long as the handle.
    pub fn ended_fd(&self) -> std::os::fd::RawFd {
        self.shared.ended_fd()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.shared.wait_timeout(timeout)
    }

    /// Installs the main thread's seccomp filter on the calling thread,
    /// which from then on may only wait for the VM, stop it and exit: for
    /// the thread that started the VM, once it has nothing else to set up.
    pub fn confine_main_thread(&self) -> Result<()> {
        self.sandbox
            .confine_current(base::ThreadKind::Main, "main")
            .map_err(|e| Error::Seccomp(base::thread::ThreadError::from(e).into()))
    }

    /// Waits for the VM to end, stops every thread, and says how it ended.
    pub fn wait(mut self) -> VmExit {
        let exit = self.shared.wait();
        self.stop_threads();
        exit
    }

    /// The captured serial output, if the console is a [`Console::Log`].
    pub fn serial(&self) -> Option<&SerialLog> {
        self.console.as_ref()
    }

    /// Waits up to `timeout` for a serial line containing `needle`; fails
    /// early if the VM ends first.
    pub fn wait_for_line(
        &self,
        needle: &str,
        timeout: Duration,
    ) -> std::result::Result<String, WaitError> {
        let log = self.console.as_ref().ok_or(WaitError::NotCaptured)?;
        if let Some(line) = log.wait_for_line_until(needle, timeout, || self.exit().is_some()) {
            return Ok(line);
        }
        let tail = tail(&log.text(), 20);
        // The VM may have printed the line just before it ended.
        if let Some(line) = log.find_line(needle) {
            return Ok(line);
        }
        Err(match self.exit() {
            Some(exit) => WaitError::Ended {
                needle: needle.into(),
                exit,
                tail,
            },
            None => WaitError::Timeout {
                needle: needle.into(),
                timeout,
                tail,
            },
        })
    }

    /// Stops every thread: vCPUs, serial input, dataplanes, jobs, and last
    /// the QMP server, which gives its clients a moment to read the events.
    fn stop_threads(&mut self) {
        self.run.shutdown();
        // Jobs end as in QEMU: cancelled, sending their events first.
        self.jobs.cancel_all_and_wait();
        if let Some(t) = self.input.take() {
            let _ = t.join();
        }
        if let Some(thread) = self.qmp.take() {
            if let Err(e) = thread.stop_and_join() {
                log::error!("{e}");
            }
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.run.has_threads() {
            self.shared.finish(VmExit::Killed);
            self.stop_threads();
        }
        if !self.run.vcpus_ended() {
            // A vCPU thread that would not stop may be inside KVM_RUN, with
            // KVM's memory slots pointing at guest RAM: unmapping it (or
            // closing the VM) under that thread would hand the guest
            // whatever the host maps there next. Leaked instead: the
            // mapping lives until the process ends.
            log::error!("guest memory is left mapped: a vCPU thread is still running");
            std::mem::forget(self.memory.take());
            std::mem::forget(self.vm.take());
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::KvmMissing,
        libc::EACCES | libc::EPERM => Error::KvmDenied(e),
        _ => Error::KvmOpen(e),
    })
}

/// Passes this process's stdin to the guest's serial port until the VM ends.
fn spawn_stdin(serial: Arc<Mutex<Serial>>, shared: Arc<Shared>) -> Result<JoinHandle<()>> {
    let name = "serial-input".to_string();
    base::spawn(
        base::ThreadKind::SerialInput,
        name.clone(),
        move || {
            let stdin = io::stdin();
            let mut buf = [0u8; 64];
            while !shared.stopping.load(Ordering::Acquire) {
                let mut pfd = libc::pollfd {
                    fd: stdin.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the duration of the call.
                let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
                if ready <= 0 {
                    continue;
                }
                let n = match stdin.lock().read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() && !shared.stopping.load(Ordering::Acquire) {
                    let mut uart = lock(&serial);
                    let room = uart.input_room().min(pending.len());
                    if room > 0 {
                        if uart.enqueue_input(&pending[..room]).is_err() {
                            return;
                        }
                        pending = &pending[room..];
                    } else {
                        drop(uart);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        },
        || (),
    )
    .map_err(|source| Error::Thread { name, source })
}

/// Builds the VM described by `config` and starts its vCPUs; with
/// `config.incoming`, builds it around an incoming migration's state
/// instead of a kernel (see [`crate::migration`]).
pub fn start(config: &VmConfig, console: Console) -> Result<VmHandle> {
    // User input first, so a typo is reported before anything touches KVM.
    let mem_size = config.memory.bytes();
    memory::validate_size(mem_size, host::total_memory())?;
    if config.cpus == 0 {
        return Err(Error::CpuCount {
            cpus: 0,
            max: mptable::MAX_CPUS,
        });
    }
    config.check_vcpu_affinity()?;
    let incoming = config.incoming.as_ref();
    let state_file = match incoming {
        Some(Incoming::Uri(MigrationUri::File(path))) => {
            Some(StateFile::open(path, mem_size, config.cpus)?)
        }
        _ => None,
    };
    let mut boot_images = match incoming {
        None => {
            let kernel = KernelImage::open(&config.kernel)?;
            let initrd = config
                .initrd
                .as_deref()
                .map(InitrdImage::open)
                .transpose()?;
            Some((kernel, initrd))
        }
        Some(_) => None,
    };
    let kvm_fd = open_kvm()?;
    let max_cpus = u32::try_from(kvm_fd.get_max_vcpus())
        .unwrap_or(u32::MAX)
        .min(mptable::MAX_CPUS);
    if config.cpus > max_cpus {
        return Err(Error::CpuCount {
            cpus: config.cpus,
            max: max_cpus,
        });
    }
    let vm = Arc::new(kvm_fd.create_vm().map_err(kvm("create a VM"))?);
    let mem = match &state_file {
        Some(state) => state.map_memory()?,
        None => memory::create_guest_memory(mem_size)?,
    };
    // Guest RAM is registered before anything else is added to the VM: on
    // our PVM hosts a memory slot added after the in-kernel irqchip waits
    // 6-8 ms in the kernel (SRCU), one added first 0.03-0.10 ms, and the
    // irqchip, vCPU, irqfd and ioeventfd that follow it stay as fast
    // (`python3 bench/kvm_order.py`).
    memory::register_slots(&vm, &mem, 0).map_err(kvm("map guest memory"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm("create the interrupt controllers"))?;
    // A PIT only when asked for: creating one waits for KVM to start its
    // kernel thread, and tearing it down costs ~14 ms at every exit here.
    if config.pit {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm("create the PIT"))?;
    }

    let sandbox = crate::seccomp::sandbox(config.seccomp)?;
    // Every thread started from here on (and the threads those start) runs
    // under its kind's filter.
    let _sandboxed = sandbox.enter();
    let graph = Arc::new(Graph::new());
    if incoming.is_some() {
        // The source may still hold the images: they are taken (locked)
        // only once its whole state has come.
        graph
            .inactivate_images()
            .map_err(|e| Error::Migration(migration::MigrationError::Device(e.to_string())))?;
    }
    let disks = virtio::open_disks(&graph, &config.disks)?;
    let pvm = host::is_pvm();
    let mut extra: Vec<String> = virtio::cmdline_params(disks.len());
    if pvm {
        extra.extend(cpuid::PVM_KERNEL_PARAMS.iter().map(|p| p.to_string()));
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let cmdline = cmdline::compose(&config.cmdline, &extra)?;

    let entry = match boot_images.as_mut() {
        Some((kernel, initrd)) => Some(boot::load(
            &mem,
            kernel,
            initrd.as_mut(),
            &cmdline,
            mem_size,
            config.cpus,
        )?),
        None => None,
    };

    let shared = Arc::new(Shared::new().map_err(|e| Error::Device {
        name: "end-of-VM eventfd".into(),
        reason: e.to_string(),
    })?);
    let device_err = |name: &str| {
        let name = name.to_string();
        move |e: &dyn std::fmt::Display| Error::Device {
            name: name.clone(),
            reason: e.to_string(),
        }
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| device_err("serial")(&e))?;
    vm.register_irqfd(&serial_irq, legacy::COM1_IRQ)
        .map_err(|e| device_err("serial")(&e))?;
    let wants_stdin = matches!(console, Console::Stdio);
    let (writer, log): (Box<dyn Write + Send>, Option<SerialLog>) = match console {
        Console::Stdio => (Box::new(io::stdout()), None),
        Console::Log(log) => (Box::new(log.clone()), Some(log)),
        Console::Writer(w) => (w, None),
    };
    let serial = Arc::new(Mutex::new(
        Serial::new(&serial_irq, writer).map_err(|e| device_err("serial")(&e))?,
    ));
    let mut pio = Bus::new();
    pio.insert(
        "serial",
        legacy::COM1_BASE,
        legacy::COM1_LEN,
        serial.clone(),
    )
    .and_then(|_| {
        pio.insert(
            "exit-port",
            legacy::EXIT_PORT,
            legacy::EXIT_PORT_LEN,
            Arc::new(Mutex::new(ExitPort)),
        )
    })
    .and_then(|_| {
        pio.insert(
            "i8042",
            legacy::I8042_BASE,
            legacy::I8042_LEN,
            Arc::new(Mutex::new(I8042)),
        )
    })
    .map_err(|e| device_err("legacy")(&e))?;
    let mut mmio = Bus::new();
    let disk_controls = virtio::controls(&disks);
    // Pages the devices' threads write, which KVM's dirty log misses.
    let dirty = Arc::new(devices::dirty::DirtyPages::new(migration::ram_end(&mem)));
    let (transports, notifiers) = virtio::attach_disks(&vm, &mem, &mut mmio, disks, &dirty)?;
    virtio::register_notifiers(&vm, notifiers);
    let run = match incoming {
        // Nothing runs and no device starts before the state has come.
        Some(_) => Arc::new(RunState::incoming(shared.clone(), transports)),
        None => {
            let run = Arc::new(RunState::new(shared.clone(), transports));
            // Devices take their nodes' leases now, before the guest can probe them.
            run.start_devices().map_err(|e| Error::Device {
                name: e.device.clone(),
                reason: e.reason,
            })?;
            run
        }
    };
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

    let supported = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("report supported CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm("create a vCPU"))?;
        let entries = cpuid::for_vcpu(supported.as_slice(), id, config.cpus, pvm);
        let table = CpuId::from_entries(&entries).map_err(|_| Error::Kvm {
            what: "take the CPUID table",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&table).map_err(kvm("set CPUID"))?;
        regs::setup_lapic(&fd)?;
        if let (0, Some(entry)) = (id, entry) {
            regs::setup_boot_vcpu(&fd, entry)?;
        }
        vcpus.push(Vcpu {
            id,
            fd: Arc::new(Mutex::new(fd)),
            pio: pio.clone(),
            mmio: mmio.clone(),
            shared: shared.clone(),
            trace_start: id == 0 && std::env::var_os("VMM_TRACE_STARTUP").is_some(),
        });
    }

    install_kick_handler()?;
    let jobs = Arc::new(JobManager::new());
    let machine = Arc::new(Machine {
        kvm: kvm_fd,
        vm: vm.clone(),
        mem: mem.clone(),
        vcpus: vcpus.iter().map(|v| v.fd.clone()).collect(),
        run: run.clone(),
        shared: shared.clone(),
        serial: serial.clone(),
        graph: graph.clone(),
        disks: disk_controls
            .iter()
            .zip(&config.disks)
            .map(|(d, c)| MigrationDisk {
                id: d.id.clone(),
                read_only: c.read_only,
                node: d.node.clone(),
            })
            .collect(),
        dirty,
        memory: mem_size,
        pit: config.pit,
        msrs: OnceLock::new(),
    });
    let mut migration = None;
    let qmp = match &config.qmp {
        Some(path) => {
            let quit = shared.clone();
            let server = QmpServer::bind_with(path, |events| {
                let ctl = Arc::new(Controller::new(machine.clone(), events.clone()));
                migration = Some(ctl.clone());
                Monitor::new(
                    run.clone(),
                    graph.clone(),
                    jobs.clone(),
                    disk_controls.clone(),
                    events,
                    Box::new(move || quit.finish(VmExit::Quit)),
                )
                .with_migration(ctl)
            })
            .map_err(Error::Qmp)?;
            let _ = shared.events.set(server.events());
            Some(server.spawn().map_err(Error::Qmp)?)
        }
        None => None,
    };
    let migration = migration
        .unwrap_or_else(|| Arc::new(Controller::new(machine.clone(), EventSink::discarding())));
    if let Some(state) = &state_file {
        // Before any vCPU thread exists: the guest starts from the file's
        // state or not at all.
        migration::restore_file(state, &machine)?;
    }
    let mut handle = VmHandle {
        shared: shared.clone(),
        run: run.clone(),
        graph,
        jobs,
        console: log,
        input: None,
        qmp,
        sandbox,
        vm: Some(vm),
        memory: Some(mem),
    };
    for vcpu in vcpus {
        let name = format!("vcpu{}", vcpu.id);
        let shared = shared.clone();
        let id = vcpu.id;
        let thread = base::spawn_on(
            base::ThreadKind::Vcpu,
            name.clone(),
            config.vcpu_cpus(id).cloned(),
            move || vcpu.run(),
            move || shared.finish(VmExit::Failed(format!("vCPU {id}: its thread panicked"))),
        )
        .map_err(|source| Error::Thread { name, source })?;
        run.add_vcpu(thread);
    }
    if let Some(Incoming::Uri(uri)) = incoming {
        if state_file.is_none() {
            migration::listen(&migration, uri)?;
        }
    }
    if wants_stdin {
        handle.input = Some(spawn_stdin(serial, shared)?);
    }
    if let Some(mem) = &handle.memory {
        memory::advise_huge_pages(mem);
        // A restored guest's RAM maps its state file, read as touched:
        // folding would read it all.
        if state_file.is_none() {
            memory::collapse_huge_pages(mem);
        }
        if let Some(vm) = &handle.vm {
            // Last: the queues' ioeventfds, registered above, start the
            // grace period this ends.
            crate::grace_period::end_pending(vm, mem);
        }
    }
    Ok(handle)
}
