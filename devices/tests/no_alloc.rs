//! The virtio-blk request path allocates nothing once warm: a burst of
//! reads and writes, served on this thread, is counted by a global
//! allocator that tallies the allocations this thread makes while asked.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use devices::fuzzing::Bursts;

struct Counting;

thread_local! {
    /// Whether this thread's allocations are being counted, and how many.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the thread's locals may be gone while it exits.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counting touches only const-initialized thread locals, which allocate
// nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations (and reallocations) this thread makes in `f`.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNT.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    let out = f();
    COUNTING.with(|on| on.set(false));
    (out, COUNT.with(Cell::get))
}

/// Serves a burst of `N` reads and writes to warm up, then two more that
/// must allocate nothing.
fn warm_bursts_allocate_nothing(timed: bool) {
    const N: u16 = 64;
    let mut bursts = Bursts::new(timed);
    // The first burst sizes the dataplane's reusable storage.
    assert_eq!(bursts.burst(N), (N, N));
    let (served, count) = allocations(|| bursts.burst(N));
    assert_eq!(served, (N, N), "every request served with OK");
    assert_eq!(count, 0, "allocations during a warm burst of {N} requests");
    // And it stays so.
    let (served, count) = allocations(|| bursts.burst(N));
    assert_eq!((served, count), ((N, N), 0));
    bursts.finish();
}

#[test]
fn a_warm_burst_of_reads_and_writes_allocates_nothing() {
    warm_bursts_allocate_nothing(false);
}

#[test]
fn a_warm_burst_allocates_nothing_with_requests_timed_too() {
    warm_bursts_allocate_nothing(true);
}

#[test]
fn the_counter_sees_allocations() {
    let (v, count) = allocations(|| vec![1u8; 100]);
    assert_eq!((v.len(), count), (100, 1));
}
