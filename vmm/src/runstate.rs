//! Pausing and resuming a running VM, as QMP's `stop` and `cont` do.
//!
//! ```text
//! pause:  vCPUs asked to park ── kicked out of KVM_RUN until all wait
//!         ── each device pauses (virtio-blk: drain, release the lease)
//! resume: each device resumes (virtio-blk: take the lease back, or fail
//!         naming the holder: then the devices resumed so far pause again
//!         and the VM stays paused) ── vCPUs unparked
//! ```

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base::state::{StateReader, StateWriter};
use base::sync::{self, lock};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::ResumeError;

use crate::shared::{kick_signal, Shared};

/// How long the vCPUs get to leave KVM_RUN when asked to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `stop` failed.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The VM has ended.
    #[error("the VM is not running: it has ended")]
    Ended,
    /// A vCPU did not leave the guest in time.
    #[error("the vCPUs did not stop within {0:?}")]
    Timeout(Duration),
}

/// Why `cont` failed.
#[derive(Debug, thiserror::Error)]
pub enum ContError {
    /// The VM has ended.
    #[error("the VM is not running: it has ended")]
    Ended,
    /// A device could not take back what it needs; the VM stays paused.
    #[error(transparent)]
    Device(#[from] ResumeError),
}

/// Where the VM stands with respect to migration, beyond running or paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Neither waiting for nor done with a migration.
    Normal,
    /// Built to receive a migration (`--incoming`): it must not run until
    /// the whole state has come.
    InMigrate,
    /// Migrated away: stopped, its images handed to the destination.
    PostMigrate,
}

/// The threads and devices of a running VM, and whether it runs.
pub struct RunState {
    shared: Arc<Shared>,
    vcpus: Mutex<Vec<JoinHandle<()>>>,
    /// vCPU threads that had not ended when `shutdown` gave up on them:
    /// guest memory must stay mapped while any of them may still run.
    stragglers: Mutex<Vec<JoinHandle<()>>>,
    /// How long `shutdown` waits for the vCPU threads to end.
    stop_timeout: Duration,
    transports: Mutex<Vec<Arc<Mutex<MmioTransport>>>>,
    /// Held by `pause` and `resume` for their whole work (draining
    /// included); true while the guest runs.
    running: Mutex<bool>,
    /// A copy of `running` for readers who must never wait for a drain.
    running_now: AtomicBool,
    phase: Mutex<Phase>,
}

impl RunState {
    pub(crate) fn new(shared: Arc<Shared>, transports: Vec<Arc<Mutex<MmioTransport>>>) -> Self {
        Self {
            shared,
            vcpus: Mutex::new(Vec::new()),
            stragglers: Mutex::new(Vec::new()),
            stop_timeout: Duration::from_secs(10),
            transports: Mutex::new(transports),
            running: Mutex::new(true),
            running_now: AtomicBool::new(true),
            phase: Mutex::new(Phase::Normal),
        }
    }

    /// A VM that waits for an incoming migration: paused from the start
    /// (its vCPUs park before their first `KVM_RUN`), its devices not
    /// started.
    pub(crate) fn incoming(
        shared: Arc<Shared>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
    ) -> Self {
        shared.parking.requested.store(true, Ordering::Release);
        let run = Self::new(shared, transports);
        *lock(&run.running) = false;
        run.running_now.store(false, Ordering::Release);
        *lock(&run.phase) = Phase::InMigrate;
        run
    }

    /// Where the VM stands with respect to migration.
    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// Moves to `phase`.
    pub(crate) fn set_phase(&self, phase: Phase) {
        *lock(&self.phase) = phase;
    }

    /// Every paused device lets go of what it kept (a disk's lease while
    /// it hosted jobs), so the images can be handed to another process.
    pub(crate) fn release_devices(&self) -> Result<(), ResumeError> {
        for t in lock(&self.transports).iter() {
            lock(t).release()?;
        }
        Ok(())
    }

    /// Appends every device's state to `w`; the VM must be paused.
    pub(crate) fn save_devices(&self, w: &mut StateWriter) -> Result<(), String> {
        let transports = lock(&self.transports);
        w.u32(transports.len() as u32);
        for t in transports.iter() {
            lock(t).save(w).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Restores every device from what [`save_devices`](Self::save_devices)
    /// wrote; the devices stay paused until [`resume`](Self::resume).
    pub(crate) fn restore_devices(&self, r: &mut StateReader) -> Result<(), String> {
        let transports = lock(&self.transports);
        let count = r.u32("device count").map_err(|e| e.to_string())? as usize;
        if count != transports.len() {
            return Err(format!(
                "the source has {count} virtio devices, this VM {}",
                transports.len()
            ));
        }
        for t in transports.iter() {
            lock(t).restore(r).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub(crate) fn add_vcpu(&self, thread: JoinHandle<()>) {
        lock(&self.vcpus).push(thread);
    }

    /// Whether the guest is running (not paused by `stop`).
    pub fn is_running(&self) -> bool {
        // Not `running`'s lock: `stop` holds it while dataplanes drain.
        self.running_now.load(Ordering::Acquire)
    }

    /// Pauses the VM; false if it was already paused.
    pub fn pause(&self) -> Result<bool, PauseError> {
        let mut running = lock(&self.running);
        if !*running {
            return Ok(false);
        }
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(PauseError::Ended);
        }
        let parking = &self.shared.parking;
        parking.requested.store(true, Ordering::Release);
        let vcpus = lock(&self.vcpus);
        let deadline = Instant::now() + PARK_TIMEOUT;
        loop {
            let alive = vcpus.iter().filter(|t| !t.is_finished()).count() as u32;
            if *lock(&parking.parked) >= alive || self.shared.stopping.load(Ordering::Acquire) {
                break;
            }
            if Instant::now() > deadline {
                parking.release();
                return Err(PauseError::Timeout(PARK_TIMEOUT));
            }
            // A kick that lands just before KVM_RUN is lost: kick until parked.
            for t in vcpus.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the handle is in `vcpus`, which this lock keeps
                // unjoined, so its pthread_t is valid; the handler does nothing.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            let parked = lock(&parking.parked);
            let _ = sync::wait_timeout(&parking.changed, parked, Duration::from_millis(1));
        }
        drop(vcpus);
        for t in lock(&self.transports).iter() {
            lock(t).pause();
        }
        *running = false;
        self.running_now.store(false, Ordering::Release);
        Ok(true)
    }

    /// Resumes the VM; false if it was already running. If a device cannot
    /// resume, the VM stays paused and the error names who is in the way.
    pub fn resume(&self) -> Result<bool, ContError> {
        let mut running = lock(&self.running);
        if *running {
            return Ok(false);
        }
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(ContError::Ended);
        }
        let transports = lock(&self.transports);
        for (i, t) in transports.iter().enumerate() {
            if let Err(e) = lock(t).resume() {
                for done in &transports[..i] {
                    lock(done).pause();
                }
                return Err(e.into());
            }
        }
        drop(transports);
        self.shared.parking.release();
        *running = true;
        self.running_now.store(true, Ordering::Release);
        Ok(true)
    }

    /// Takes every device's busy state at VM start, before any vCPU runs.
    pub(crate) fn start_devices(&self) -> Result<(), ResumeError> {
        for t in lock(&self.transports).iter() {
            lock(t).resume()?;
        }
        Ok(())
    }

    /// Stops every thread: vCPUs leave KVM_RUN and end, then the devices
    /// drain and stop. Called once the VM has ended.
    pub(crate) fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.parking.wake_all();
        let mut vcpus = lock(&self.vcpus);
        let deadline = Instant::now() + self.stop_timeout;
        // A kick that lands just before a vCPU enters KVM_RUN is lost, so
        // kick again until the thread is gone.
        while vcpus.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            for t in vcpus.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread has not been joined, so its pthread_t
                // is valid; the signal's handler does nothing.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in vcpus.drain(..) {
            if !t.is_finished() {
                log::error!(
                    "vCPU thread '{}' did not stop within {:?}: guest memory stays mapped until the VMM ends",
                    t.thread().name().unwrap_or("vcpu"),
                    self.stop_timeout
                );
                lock(&self.stragglers).push(t);
            } else if t.join().is_err() {
                log::error!("a vCPU thread panicked while stopping");
            }
        }
        drop(vcpus);
        // No vCPU runs now: stop the dataplanes, letting requests in flight finish.
        for t in lock(&self.transports).drain(..) {
            lock(&t).shutdown();
        }
    }

    /// Whether any vCPU thread is still to be stopped.
    pub(crate) fn has_threads(&self) -> bool {
        !lock(&self.vcpus).is_empty()
    }

    /// Whether every vCPU thread has ended, so that nothing can enter
    /// KVM_RUN again and guest memory may be unmapped. False while one
    /// that `shutdown` gave up on still runs (it may be inside KVM_RUN,
    /// with KVM's memory slots pointing at guest memory).
    pub(crate) fn vcpus_ended(&self) -> bool {
        lock(&self.vcpus).iter().all(|t| t.is_finished())
            && lock(&self.stragglers).iter().all(|t| t.is_finished())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::Parking;

    /// A "vCPU" stuck where no kick reaches it keeps guest memory mapped
    /// until its thread really ends.
    #[test]
    fn a_vcpu_that_does_not_stop_keeps_guest_memory_mapped() {
        // Shutdown kicks the threads with the vCPU kick signal.
        crate::shared::install_kick_handler().unwrap();
        let mut run = RunState::new(Arc::new(Shared::new().expect("an eventfd")), Vec::new());
        run.stop_timeout = Duration::from_millis(50);
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        run.add_vcpu(std::thread::spawn(move || {
            let _ = stuck.recv();
        }));
        run.add_vcpu(std::thread::spawn(|| {}));
        assert!(!run.vcpus_ended());
        run.shutdown();
        assert!(!run.has_threads(), "nothing left to stop");
        assert!(!run.vcpus_ended(), "one vCPU still runs");
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !run.vcpus_ended() {
            assert!(Instant::now() < deadline, "the thread did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Two "vCPUs" count their runs; while paused the counts stand still.
    #[test]
    fn parked_threads_stop_running_until_released_or_the_vm_ends() {
        let parking = Arc::new(Parking::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let runs: Arc<[std::sync::atomic::AtomicU64; 2]> = Arc::default();
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (parking, stopping, runs) = (parking.clone(), stopping.clone(), runs.clone());
                std::thread::spawn(move || {
                    while !stopping.load(Ordering::Acquire) {
                        parking.wait_while_paused(&stopping);
                        runs[i].fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
            })
            .collect();
        let count = || runs.iter().map(|r| r.load(Ordering::Relaxed)).sum::<u64>();
        parking.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(10);
        while *lock(&parking.parked) < 2 {
            assert!(Instant::now() < deadline, "the threads did not park");
            std::thread::sleep(Duration::from_millis(1));
        }
        let parked_at = count();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(count(), parked_at, "a parked thread ran");
        parking.release();
        while count() < parked_at + 10 {
            assert!(Instant::now() < deadline, "the threads did not resume");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Paused again, the VM ends: parked threads leave.
        parking.requested.store(true, Ordering::Release);
        while *lock(&parking.parked) < 2 {
            assert!(Instant::now() < deadline, "the threads did not park again");
            std::thread::sleep(Duration::from_millis(1));
        }
        stopping.store(true, Ordering::Release);
        parking.wake_all();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock(&parking.parked), 0);
    }
}
