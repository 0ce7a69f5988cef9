//! The virtio-blk request path allocates nothing once warm: a burst of
//! reads and writes, served on this thread, is counted by a global
//! allocator that tallies the allocations this thread makes while asked.

use base::alloc_count::{allocations, Counting};
use devices::fuzzing::Bursts;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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
fn a_warm_burst_allocates_nothing_while_dirty_pages_are_logged() {
    const N: u16 = 64;
    let mut bursts = Bursts::new(false);
    bursts.dirty().start();
    assert_eq!(bursts.burst(N), (N, N));
    let mut pages = 0;
    bursts.dirty().harvest(|_| pages += 1);
    assert!(pages > 0, "a burst of reads marks the pages it wrote");
    let (served, count) = allocations(|| bursts.burst(N));
    assert_eq!((served, count), ((N, N), 0));
    bursts.finish();
}

#[test]
fn the_counter_sees_allocations() {
    let (v, count) = allocations(|| vec![1u8; 100]);
    assert_eq!((v.len(), count), (100, 1));
}
