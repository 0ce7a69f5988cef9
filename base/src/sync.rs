//! Locking a `Mutex` and waiting on a `Condvar` with poisoning ignored.
//!
//! A mutex is poisoned when a thread panics while holding it. We take the
//! data anyway, everywhere: every critical section in this workspace leaves
//! its data consistent at each step (a push, a retain, an assignment, a
//! state transition), and a panic in one worker thread, which
//! [`crate::spawn`] already catches and reports, must not take the rest of
//! the VMM down with it the next time another thread takes the same lock.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, WaitTimeoutResult};
use std::time::Duration;

/// Locks `m`, taking the data even if a holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`Condvar::wait`], taking the data even if a holder panicked.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// [`Condvar::wait_while`], taking the data even if a holder panicked.
pub fn wait_while<'a, T, F>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    condition: F,
) -> MutexGuard<'a, T>
where
    F: FnMut(&mut T) -> bool,
{
    cv.wait_while(guard, condition)
        .unwrap_or_else(PoisonError::into_inner)
}

/// [`Condvar::wait_timeout`], taking the data even if a holder panicked.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
}

/// [`Condvar::wait_timeout_while`], taking the data even if a holder
/// panicked.
pub fn wait_timeout_while<'a, T, F>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
    condition: F,
) -> (MutexGuard<'a, T>, WaitTimeoutResult)
where
    F: FnMut(&mut T) -> bool,
{
    cv.wait_timeout_while(guard, timeout, condition)
        .unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poisoned() -> Arc<Mutex<u32>> {
        let m = Arc::new(Mutex::new(7));
        let m2 = Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        m
    }

    #[test]
    fn lock_takes_a_poisoned_mutex() {
        let m = poisoned();
        assert_eq!(*lock(&m), 7);
    }

    #[test]
    fn waits_take_a_poisoned_mutex() {
        let m = poisoned();
        let cv = Condvar::new();
        let (g, timed_out) = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
        assert!(timed_out.timed_out());
        let (g, _) = wait_timeout_while(&cv, g, Duration::from_millis(1), |v| *v != 7);
        let g = wait_while(&cv, g, |v| *v != 7);
        assert_eq!(*g, 7);
    }
}
