//! Starting a worker thread: a name, its kind's seccomp filter, a caught
//! panic.
//!
//! Filters stack: a thread inherits its parent's filter and can only add
//! to it, so a data-plane thread started from a vCPU thread could only
//! make calls both filters allow. To keep each kind's list its own, a
//! [`Sandbox`] with filters starts every thread from one *spawner* thread
//! whose filter allows what all kinds together need, and each new thread
//! narrows that to its kind's filter first thing.
//!
//! Which sandbox a spawn uses is inherited the same way: a thread started
//! here runs inside its parent's sandbox, and the thread that builds a VM
//! enters one with [`Sandbox::enter`]. Code that never entered one (unit
//! tests) starts plain threads, still named and panic-caught.

use std::any::Any;
use std::cell::RefCell;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::{Builder, JoinHandle};

use crate::cpus::CpuList;
use crate::seccomp::{self, BpfProgram, SeccompError};

/// What a thread does; each kind has its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The thread that built the VM, once start-up is done: it waits for
    /// the end and tears down.
    Main,
    /// Runs `KVM_RUN` for one vCPU.
    Vcpu,
    /// A virtio device's data plane (io_uring, irqfd, ioeventfd).
    Dataplane,
    /// A block job's work thread.
    Job,
    /// The QMP server.
    Qmp,
    /// Passes stdin to the guest's serial port.
    SerialInput,
    /// Starts every other thread of a sandbox (see the module doc).
    Spawner,
    /// The NBD server: its listener and one thread per client.
    Nbd,
    /// A migration's sending or receiving thread.
    Migration,
}

impl ThreadKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Dataplane,
        ThreadKind::Job,
        ThreadKind::Qmp,
        ThreadKind::SerialInput,
        ThreadKind::Spawner,
        ThreadKind::Nbd,
        ThreadKind::Migration,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a sandbox or a thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    /// No thread could be created.
    #[error("cannot start thread '{name}': {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The spawner's filter or the trap handler could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A sandbox with filters needs one for its spawner.
    #[error("a sandbox with seccomp filters needs one for its spawner thread")]
    NoSpawnerFilter,
}

impl From<ThreadError> for io::Error {
    fn from(e: ThreadError) -> Self {
        match e {
            ThreadError::Spawn { source, .. } => source,
            other => io::Error::other(other.to_string()),
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The filters a VM's threads run under, chosen by whoever builds it, and
/// the spawner thread that starts them.
pub struct Sandbox {
    filters: [Option<BpfProgram>; ThreadKind::ALL.len()],
    /// Jobs for the spawner; `None` when there are no filters.
    spawner: Option<Mutex<Sender<Job>>>,
}

thread_local! {
    /// The sandbox threads started from this thread run in.
    static CURRENT: RefCell<Option<Arc<Sandbox>>> = const { RefCell::new(None) };
}

impl Sandbox {
    /// A sandbox with no filters: threads are only named and panic-caught.
    pub fn unconfined() -> Arc<Self> {
        Arc::new(Self {
            filters: Default::default(),
            spawner: None,
        })
    }

    /// A sandbox whose threads of each kind get `filters`' program for it.
    /// Every kind must have one, the spawner's allowing what every other
    /// kind needs plus prctl(2) and seccomp(2). Installs the `SIGSYS`
    /// reporter and starts the spawner thread under its filter.
    pub fn new(filters: Vec<(ThreadKind, BpfProgram)>) -> Result<Arc<Self>, ThreadError> {
        let mut table: [Option<BpfProgram>; ThreadKind::ALL.len()] = Default::default();
        for (kind, program) in filters {
            table[kind.index()] = Some(program);
        }
        let spawner_filter = table[ThreadKind::Spawner.index()]
            .clone()
            .ok_or(ThreadError::NoSpawnerFilter)?;
        seccomp::report_trapped_calls()?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::sync_channel(1);
        let name = "spawner".to_string();
        Builder::new()
            .name(name.clone())
            .spawn(move || {
                let installed = seccomp::install("spawner", &spawner_filter);
                let ok = installed.is_ok();
                let _ = ready.send(installed);
                if ok {
                    // Ends when the sandbox and every thread in it are gone.
                    for job in queue {
                        job();
                    }
                }
            })
            .map_err(|source| ThreadError::Spawn { name, source })?;
        started
            .recv()
            .map_err(|_| SeccompError::Handler(io::Error::other("the spawner thread died")))??;
        Ok(Arc::new(Self {
            filters: table,
            spawner: Some(Mutex::new(jobs)),
        }))
    }

    /// Makes this the sandbox that threads started from the calling thread
    /// run in, until the guard drops.
    pub fn enter(self: &Arc<Self>) -> Entered {
        let previous = CURRENT.with(|c| c.replace(Some(self.clone())));
        Entered { previous }
    }

    /// The filter threads of `kind` get, if any.
    pub fn filter(&self, kind: ThreadKind) -> Option<&BpfProgram> {
        self.filters[kind.index()].as_ref()
    }

    /// Installs `kind`'s filter, if any, on the calling thread: for a
    /// thread not started here, such as the main thread once start-up is
    /// done.
    pub fn confine_current(&self, kind: ThreadKind, name: &str) -> Result<(), SeccompError> {
        match self.filter(kind) {
            Some(filter) => seccomp::install(name, filter),
            None => Ok(()),
        }
    }

    /// Starts `main` as a thread named `name` on the spawner (or here,
    /// without one).
    fn start<T: Send + 'static>(
        &self,
        name: String,
        main: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<JoinHandle<T>> {
        let Some(spawner) = &self.spawner else {
            return Builder::new().name(name).spawn(main);
        };
        let (reply, handle) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = reply.send(Builder::new().name(name).spawn(main));
        });
        let sent = crate::sync::lock(spawner).send(job);
        sent.map_err(|_| io::Error::other("the spawner thread has ended"))?;
        handle
            .recv()
            .map_err(|_| io::Error::other("the spawner thread has ended"))?
    }
}

/// Restores the sandbox that was current before [`Sandbox::enter`].
pub struct Entered {
    previous: Option<Arc<Sandbox>>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// Starts `body` on a thread named `name` of kind `kind`, in the calling
/// thread's sandbox: the thread installs its kind's filter before it runs
/// `body`. If `body` panics, or the filter cannot be installed, one error
/// line names the thread and says why, and the thread returns what
/// `on_failure` makes of it instead (what its joiner expects, after the
/// caller's clean-up: a device marked as needing reset, a job failed).
pub fn spawn<T, B, F>(
    kind: ThreadKind,
    name: String,
    body: B,
    on_failure: F,
) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    B: FnOnce() -> T + Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_on(kind, name, None, body, on_failure)
}

/// [`spawn`], with the thread kept on `cpus` when given. A thread that
/// cannot be pinned (a CPU went offline since the list was checked) logs
/// why and runs where the scheduler puts it: a disk or vCPU that runs
/// slower beats one that does not run.
pub fn spawn_on<T, B, F>(
    kind: ThreadKind,
    name: String,
    cpus: Option<CpuList>,
    body: B,
    on_failure: F,
) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    B: FnOnce() -> T + Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    install_panic_hook();
    let sandbox = CURRENT
        .with(|c| c.borrow().clone())
        .unwrap_or_else(Sandbox::unconfined);
    let thread_name = name.clone();
    let inside = sandbox.clone();
    sandbox.start(name, move || {
        seccomp::set_report_name(&thread_name);
        if let Some(cpus) = cpus {
            if let Err(e) = cpus.pin_current_thread() {
                log::warn!(
                    "thread '{thread_name}' runs unpinned: cannot keep it on CPUs {cpus}: {e}"
                );
            }
        }
        if let Some(filter) = inside.filter(kind) {
            if let Err(e) = seccomp::install(&thread_name, filter) {
                log::error!("thread '{thread_name}' did not start: {e}");
                return on_failure();
            }
        }
        CURRENT.with(|c| *c.borrow_mut() = Some(inside));
        CAUGHT.with(|c| c.set(true));
        let result = panic::catch_unwind(AssertUnwindSafe(body));
        // The sandbox may own the spawner; let it go with the thread, not
        // with the thread-local's destructor after the body's values.
        CURRENT.with(|c| c.borrow_mut().take());
        match result {
            Ok(value) => value,
            Err(payload) => {
                let place = PANIC_PLACE
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_default();
                log::error!(
                    "thread '{thread_name}' panicked{place}: {}",
                    panic_message(&*payload)
                );
                on_failure()
            }
        }
    })
}

thread_local! {
    /// Where this thread's last panic happened, as " at FILE:LINE:COL".
    static PANIC_PLACE: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether this thread runs under [`spawn`]'s catch, which logs panics.
    static CAUGHT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keeps the default hook's "thread panicked" message off stderr for
/// threads started by [`spawn`], which log the panic themselves once with
/// the place recorded here; every other thread's panics go to the hook
/// that was there before.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAUGHT.with(|c| c.get()) {
                let place = info
                    .location()
                    .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                PANIC_PLACE.with(|p| *p.borrow_mut() = Some(place));
            } else {
                previous(info);
            }
        }));
    });
}

/// A panic's message, when it has one.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{SeccompAction, SeccompFilter, SeccompRule, TargetArch};
    use std::collections::BTreeMap;

    /// Allows everything but the listed calls, which `action` answers.
    fn all_but(calls: &[i64], action: SeccompAction) -> BpfProgram {
        let rules: BTreeMap<i64, Vec<SeccompRule>> = calls.iter().map(|&c| (c, vec![])).collect();
        SeccompFilter::new(rules, SeccompAction::Allow, action, TargetArch::x86_64)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// A filter that only refuses getpgid(2), which nothing here calls
    /// (seccompiler refuses a filter whose two actions are the same).
    fn nearly_all() -> BpfProgram {
        all_but(
            &[libc::SYS_getpgid],
            SeccompAction::Errno(libc::EPERM as u32),
        )
    }

    fn seccomp_mode() -> String {
        std::fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
            .unwrap()
    }

    fn getppid_errno() -> Option<i32> {
        // SAFETY: getppid has no arguments and cannot fail but for seccomp.
        let rc = unsafe { libc::syscall(libc::SYS_getppid) };
        (rc < 0).then(|| io::Error::last_os_error().raw_os_error().unwrap())
    }

    #[test]
    fn a_panic_is_caught_and_the_thread_returns_what_on_failure_makes() {
        let t = spawn(
            ThreadKind::Job,
            "panicky".into(),
            || -> u32 { panic!("on purpose") },
            || 7,
        )
        .unwrap();
        assert_eq!(t.thread().name(), Some("panicky"));
        assert_eq!(t.join().unwrap(), 7);
        let t = spawn(ThreadKind::Job, "calm".into(), || 3u32, || 7).unwrap();
        assert_eq!(t.join().unwrap(), 3);
    }

    /// The CPUs a thread spawned on `cpus` finds it may run on.
    fn allowed_inside(cpus: &str) -> Result<CpuList, String> {
        let cpus = CpuList::parse(cpus, ',').unwrap();
        spawn_on(
            ThreadKind::Dataplane,
            "pinned".into(),
            Some(cpus),
            || CpuList::allowed().map_err(|e| e.to_string()),
            || Err("failed".into()),
        )
        .unwrap()
        .join()
        .unwrap()
    }

    #[test]
    fn a_thread_spawned_on_cpus_runs_only_there() {
        let last = CpuList::allowed()
            .unwrap()
            .iter()
            .last()
            .unwrap()
            .to_string();
        assert_eq!(
            allowed_inside(&last),
            Ok(CpuList::parse(&last, ',').unwrap())
        );
    }

    #[test]
    fn a_thread_that_cannot_be_pinned_still_runs_where_it_may() {
        let allowed = CpuList::allowed().unwrap();
        if allowed.contains(1023) {
            return; // The test needs a CPU this process may not use.
        }
        assert_eq!(allowed_inside("1023"), Ok(allowed));
    }

    #[test]
    fn outside_a_sandbox_threads_run_unfiltered() {
        let t = spawn(ThreadKind::Vcpu, "plain".into(), seccomp_mode, String::new).unwrap();
        assert_eq!(t.join().unwrap(), "0");
    }

    /// Each thread gets its own kind's filter, even when started from a
    /// thread of another kind whose filter forbids what it may do.
    #[test]
    fn each_kind_gets_its_own_filter_whoever_starts_it() {
        let eperm = SeccompAction::Errno(libc::EPERM as u32);
        let sandbox = Sandbox::new(vec![
            (
                ThreadKind::Spawner,
                all_but(&[libc::SYS_getpgid], eperm.clone()),
            ),
            (
                ThreadKind::Vcpu,
                all_but(&[libc::SYS_getppid, libc::SYS_getpgid], eperm.clone()),
            ),
            (ThreadKind::Job, all_but(&[libc::SYS_getpgid], eperm)),
        ])
        .unwrap();
        let _in = sandbox.enter();
        let vcpu = spawn(
            ThreadKind::Vcpu,
            "strict".into(),
            || {
                let job = spawn(
                    ThreadKind::Job,
                    "lenient".into(),
                    || (seccomp_mode(), getppid_errno()),
                    || (String::new(), None),
                )
                .unwrap();
                (seccomp_mode(), getppid_errno(), job.join().unwrap())
            },
            || (String::new(), None, (String::new(), None)),
        )
        .unwrap();
        let (mode, vcpu_getppid, (job_mode, job_getppid)) = vcpu.join().unwrap();
        assert_eq!(mode, "2");
        assert_eq!(
            vcpu_getppid,
            Some(libc::EPERM),
            "the vCPU filter was not installed"
        );
        assert_eq!(job_mode, "2");
        assert_eq!(
            job_getppid, None,
            "the job inherited the vCPU thread's filter"
        );
        // A kind with no filter of its own still has the spawner's.
        let plain = spawn(ThreadKind::Qmp, "other".into(), seccomp_mode, String::new).unwrap();
        assert_eq!(plain.join().unwrap(), "2");
    }

    #[test]
    fn a_sandbox_needs_a_spawner_filter() {
        let only_vcpu = vec![(ThreadKind::Vcpu, nearly_all())];
        assert!(matches!(
            Sandbox::new(only_vcpu),
            Err(ThreadError::NoSpawnerFilter)
        ));
    }

    const TRAP_CHILD: &str = "BASE_TEST_TRAP_CHILD";

    /// Run in a child process by the test below: a trapped call ends it.
    #[test]
    fn trap_child() {
        if std::env::var_os(TRAP_CHILD).is_none() {
            return;
        }
        let sandbox = Sandbox::new(vec![
            (ThreadKind::Spawner, nearly_all()),
            (
                ThreadKind::Dataplane,
                all_but(&[libc::SYS_getppid], SeccompAction::Trap),
            ),
        ])
        .unwrap();
        let _in = sandbox.enter();
        let t = spawn(
            ThreadKind::Dataplane,
            "blk-trapped".into(),
            getppid_errno,
            || None,
        )
        .unwrap();
        let _ = t.join();
        unreachable!("the trapped call did not end the process");
    }

    #[test]
    fn a_trapped_call_ends_the_process_with_one_line_naming_thread_and_call() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "thread::tests::trap_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(TRAP_CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(seccomp::TRAPPED_EXIT),
            "stderr: {stderr}"
        );
        let expected = format!(
            "vmm: thread 'blk-trapped' made system call getppid ({}), which its seccomp filter does not allow",
            libc::SYS_getppid
        );
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.contains("seccomp"))
                .collect::<Vec<_>>(),
            vec![expected.as_str()]
        );
    }
}
