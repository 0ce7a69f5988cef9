use std::sync::Arc;

use super::*;

const K64: u64 = 64 << 10;

fn extents(b: &DirtyBitmap) -> Vec<(u64, u64)> {
    b.extents().collect()
}

#[test]
fn marks_round_out_to_whole_granules() {
    let mut b = DirtyBitmap::new(1 << 20, K64).unwrap();
    assert!(b.is_clean());
    // One byte dirties its whole granule.
    b.mark(K64 + 5, 1);
    assert_eq!(extents(&b), [(K64, K64)]);
    assert_eq!(b.count(), K64);
    // A range across a boundary dirties both granules.
    b.mark(4 * K64 - 1, 2);
    assert_eq!(extents(&b), [(K64, K64), (3 * K64, 2 * K64)]);
    assert_eq!(b.count(), 3 * K64);
    // Marking again changes nothing; empty ranges and ranges past the
    // end are ignored.
    b.mark(K64, K64);
    b.mark(0, 0);
    b.mark(1 << 20, 4096);
    b.mark(u64::MAX - 1, 10);
    assert_eq!(b.count(), 3 * K64);
    assert!(b.is_dirty(K64) && b.is_dirty(2 * K64 - 1) && !b.is_dirty(2 * K64));
    assert!(!b.is_dirty(1 << 20));
}

#[test]
fn the_last_partial_granule_ends_at_the_node_end() {
    // 100 KiB at 64 KiB: two granules, the second partial.
    let size = 100 << 10;
    let mut b = DirtyBitmap::new(size, K64).unwrap();
    b.mark(size - 1, 100);
    assert_eq!(extents(&b), [(K64, size - K64)]);
    // QEMU counts a partial granule whole.
    assert_eq!(b.count(), K64);
    // Clearing up to the end clears the partial granule.
    b.unmark(K64, size - K64);
    assert!(b.is_clean());
    b.fill();
    assert_eq!(extents(&b), [(0, size)]);
    assert_eq!(b.count(), 2 * K64);
}

#[test]
fn unmark_clears_only_whole_granules() {
    let mut b = DirtyBitmap::new(1 << 20, K64).unwrap();
    b.fill();
    // Half a granule on each side stays dirty.
    b.unmark(K64 / 2, 2 * K64);
    assert_eq!(extents(&b), [(0, K64), (2 * K64, (1 << 20) - 2 * K64)]);
    b.unmark(0, 1 << 20);
    assert!(b.is_clean());
}

#[test]
fn iteration_crosses_words_and_merges_runs() {
    // 512-byte granules over 1 MiB: 2048 bits, 32 words.
    let mut b = DirtyBitmap::new(1 << 20, 512).unwrap();
    b.mark(63 * 512, 3 * 512); // bits 63..66: across a word boundary
    b.mark(128 * 512, 64 * 512); // exactly word 2
    b.mark(2047 * 512, 512); // the last bit
    assert_eq!(
        extents(&b),
        [
            (63 * 512, 3 * 512),
            (128 * 512, 64 * 512),
            (2047 * 512, 512)
        ]
    );
    assert_eq!(b.count(), (3 + 64 + 1) * 512);
    let from: Vec<_> = b.extents_from(130 * 512).collect();
    assert_eq!(from, [(130 * 512, 62 * 512), (2047 * 512, 512)]);
    b.fill();
    assert_eq!(extents(&b), [(0, 1 << 20)]);
    b.clear();
    assert_eq!(extents(&b), []);
}

#[test]
fn granularity_rules_and_defaults_are_qemus() {
    for bad in [0, 256, 511, 3000, 1 << 32, (1 << 20) + 512] {
        assert_eq!(
            DirtyBitmap::new(1 << 20, bad).unwrap_err(),
            BitmapError::Granularity,
            "{bad}"
        );
    }
    for good in [512, 4096, K64, 1 << 31] {
        assert_eq!(DirtyBitmap::new(1 << 20, good).unwrap().granularity(), good);
    }
    // A 2 GiB granule covers a small node whole.
    let mut huge = DirtyBitmap::new(1 << 20, 1 << 31).unwrap();
    huge.mark(0, 1);
    assert_eq!(huge.count(), 1 << 31);
    assert_eq!(extents(&huge), [(0, 1 << 20)]);
    // As qemu-storage-daemon picks them: raw, file, null-co 64 KiB;
    // qcow2 its cluster size held to 4 KiB..64 KiB.
    assert_eq!(default_granularity(None), K64);
    assert_eq!(default_granularity(Some(512)), 4096);
    assert_eq!(default_granularity(Some(16384)), 16384);
    assert_eq!(default_granularity(Some(2 << 20)), K64);
}

#[test]
fn merge_ors_bitmaps_of_any_granularity() {
    let mut a = DirtyBitmap::new(1 << 20, K64).unwrap();
    let mut b = DirtyBitmap::new(1 << 20, K64).unwrap();
    a.mark(0, 1);
    b.mark(3 * K64, 1);
    a.merge(&b).unwrap();
    assert_eq!(extents(&a), [(0, K64), (3 * K64, K64)]);
    assert_eq!(a.count(), 2 * K64);
    // A finer bitmap's bits round out to the coarser granules.
    let mut fine = DirtyBitmap::new(1 << 20, 512).unwrap();
    fine.mark(5 * K64 + 512, 512);
    a.merge(&fine).unwrap();
    assert_eq!(extents(&a), [(0, K64), (3 * K64, K64), (5 * K64, K64)]);
    let other = DirtyBitmap::new(2 << 20, K64).unwrap();
    assert!(matches!(
        a.merge(&other),
        Err(BitmapError::SizeMismatch(..))
    ));
}

#[test]
fn named_bitmaps_follow_qemus_rules() {
    let bitmaps = Bitmaps::new();
    assert!(!bitmaps.is_recording());
    assert_eq!(
        bitmaps.add("", 1 << 20, K64, false, false),
        Err(BitmapError::EmptyName)
    );
    let long = "x".repeat(MAX_NAME + 1);
    assert_eq!(
        bitmaps.add(&long, 1 << 20, K64, false, false),
        Err(BitmapError::NameTooLong(long.clone()))
    );
    bitmaps
        .add(&long[..MAX_NAME], 1 << 20, K64, false, false)
        .unwrap();
    bitmaps.add("b0", 1 << 20, K64, false, false).unwrap();
    assert_eq!(
        bitmaps.add("b0", 1 << 20, 4096, false, false),
        Err(BitmapError::Exists("b0".into()))
    );
    assert_eq!(
        bitmaps.add("g", 1 << 20, 3000, false, false),
        Err(BitmapError::Granularity)
    );
    bitmaps.add("off", 1 << 20, 4096, false, true).unwrap();
    assert!(bitmaps.is_recording());
    // Newest first, as QEMU lists them.
    let names: Vec<_> = bitmaps
        .info()
        .into_iter()
        .map(|i| i.name.unwrap())
        .collect();
    assert_eq!(names, ["off", "b0", &long[..MAX_NAME]]);

    bitmaps.mark(0, 1);
    let count = |name: &str| {
        bitmaps
            .info()
            .into_iter()
            .find(|i| i.name.as_deref() == Some(name))
            .unwrap()
            .count
    };
    assert_eq!(count("b0"), K64);
    assert_eq!(count("off"), 0, "a disabled bitmap records nothing");
    bitmaps.set_enabled("off", true).unwrap();
    bitmaps.mark(4096, 1);
    assert_eq!(count("off"), 4096);
    bitmaps.clear("b0").unwrap();
    assert_eq!(count("b0"), 0);
    for missing in [
        bitmaps.clear("nope"),
        bitmaps.remove("nope"),
        bitmaps.set_enabled("nope", true),
    ] {
        assert_eq!(missing, Err(BitmapError::NotFound("nope".into())));
    }
    bitmaps.remove(&long[..MAX_NAME]).unwrap();
    bitmaps.remove("b0").unwrap();
    bitmaps.set_enabled("off", false).unwrap();
    assert!(!bitmaps.is_recording(), "no bitmap records");
    bitmaps.remove("off").unwrap();
    assert!(bitmaps.info().is_empty());
}

/// A registry with bitmap `b` dirty at granule 1, frozen in `mode`, then
/// written at granule 5 (into the successor).
fn freeze_b(mode: BitmapSyncMode) -> (Arc<Bitmaps>, Frozen) {
    let bitmaps = Arc::new(Bitmaps::new());
    bitmaps.add("b", 1 << 20, K64, false, false).unwrap();
    bitmaps.mark(K64, 1);
    let frozen = bitmaps.freeze("b", mode).unwrap();
    bitmaps.mark(5 * K64, 1);
    (bitmaps, frozen)
}

fn now(bitmaps: &Bitmaps) -> Vec<(u64, u64)> {
    bitmaps.snapshot("b").unwrap().extents().collect()
}

#[test]
fn a_frozen_bitmap_is_busy_and_new_writes_go_to_its_successor() {
    let (bitmaps, frozen) = freeze_b(BitmapSyncMode::OnSuccess);
    assert_eq!(extents(frozen.bitmap()), [(K64, K64)]);
    assert_eq!(now(&bitmaps), [(K64, K64)], "the bitmap itself is frozen");
    let busy = Err(BitmapError::Busy("b".into()));
    assert_eq!(bitmaps.remove("b"), busy);
    assert_eq!(bitmaps.clear("b"), busy);
    assert_eq!(bitmaps.set_enabled("b", false), busy);
    assert!(matches!(
        bitmaps.freeze("b", BitmapSyncMode::Never),
        Err(BitmapError::Busy(_))
    ));
    let info = bitmaps.info();
    assert_eq!(
        info,
        [
            BitmapInfo {
                name: None,
                count: K64,
                granularity: K64,
                recording: true,
                busy: false,
                persistent: false
            },
            BitmapInfo {
                name: Some("b".into()),
                count: K64,
                granularity: K64,
                recording: true,
                busy: true,
                persistent: false
            },
        ]
    );
    frozen.finish(true, None);
    assert_eq!(bitmaps.info().len(), 1);
    bitmaps.clear("b").unwrap();
}

#[test]
fn on_success_keeps_only_new_writes_after_success_and_everything_after_failure() {
    let (bitmaps, frozen) = freeze_b(BitmapSyncMode::OnSuccess);
    frozen.finish(true, None);
    assert_eq!(now(&bitmaps), [(5 * K64, K64)]);

    let (bitmaps, frozen) = freeze_b(BitmapSyncMode::OnSuccess);
    let mut not_copied = frozen.bitmap().clone();
    not_copied.clear();
    // Whatever the job says it copied, a failure keeps every bit.
    frozen.finish(false, Some(&not_copied));
    assert_eq!(now(&bitmaps), [(K64, K64), (5 * K64, K64)]);
}

#[test]
fn never_keeps_every_bit_either_way() {
    for succeeded in [true, false] {
        let (bitmaps, frozen) = freeze_b(BitmapSyncMode::Never);
        frozen.finish(succeeded, None);
        assert_eq!(now(&bitmaps), [(K64, K64), (5 * K64, K64)], "{succeeded}");
    }
}

#[test]
fn always_clears_what_was_copied_even_after_a_failure() {
    let (bitmaps, frozen) = freeze_b(BitmapSyncMode::Always);
    frozen.finish(true, None);
    assert_eq!(now(&bitmaps), [(5 * K64, K64)]);

    // Failed having copied granule 1 but not granule 3 (a full backup's
    // list, say): granule 3 and the new write stay dirty.
    let (bitmaps, frozen) = freeze_b(BitmapSyncMode::Always);
    let mut not_copied = DirtyBitmap::new(1 << 20, K64).unwrap();
    not_copied.mark(3 * K64, 1);
    frozen.finish(false, Some(&not_copied));
    assert_eq!(now(&bitmaps), [(3 * K64, K64), (5 * K64, K64)]);

    // Failed without saying what it copied: nothing is lost.
    let (bitmaps, frozen) = freeze_b(BitmapSyncMode::Always);
    frozen.finish(false, None);
    assert_eq!(now(&bitmaps), [(K64, K64), (5 * K64, K64)]);
}

#[test]
fn a_dropped_freeze_counts_as_a_failure_and_loses_nothing() {
    let (bitmaps, frozen) = freeze_b(BitmapSyncMode::OnSuccess);
    drop(frozen);
    assert_eq!(now(&bitmaps), [(K64, K64), (5 * K64, K64)]);
    bitmaps.remove("b").unwrap();
}

#[test]
fn a_disabled_bitmap_frozen_records_nothing_meanwhile() {
    let bitmaps = Arc::new(Bitmaps::new());
    bitmaps.add("b", 1 << 20, K64, false, true).unwrap();
    let frozen = bitmaps.freeze("b", BitmapSyncMode::OnSuccess).unwrap();
    assert!(!bitmaps.is_recording());
    bitmaps.mark(0, 1);
    frozen.finish(true, None);
    assert_eq!(now(&bitmaps), []);
}

#[test]
fn a_claimed_bitmap_is_busy_until_the_claim_goes() {
    let bitmaps = Arc::new(Bitmaps::new());
    bitmaps.add("b", 1 << 20, K64, false, false).unwrap();
    let claim = bitmaps.claim("b").unwrap();
    assert_eq!(bitmaps.remove("b"), Err(BitmapError::Busy("b".into())));
    bitmaps.mark(0, 1);
    assert_eq!(claim.snapshot().count(), K64);
    drop(claim);
    bitmaps.remove("b").unwrap();
}

/// Every run `extent` reports from 0 in steps, as NBD walks a range.
fn runs(b: &DirtyBitmap, from: u64, to: u64) -> Vec<(bool, u64)> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let (dirty, n) = b.extent(at, to - at);
        assert!(n >= 1 && n <= to - at, "extent({at}, {}) = {n}", to - at);
        out.push((dirty, n));
        at += n;
    }
    out
}

#[test]
fn extent_runs_match_the_dirty_extents_and_stop_at_the_range() {
    // 10 granules and a half: the last granule is partial.
    let size = 10 * K64 + 512;
    let mut b = DirtyBitmap::new(size, K64).unwrap();
    assert_eq!(runs(&b, 0, size), [(false, size)]);
    b.mark(K64 + 1, 1);
    b.mark(3 * K64, 2 * K64);
    b.mark(10 * K64, 1);
    assert_eq!(
        runs(&b, 0, size),
        [
            (false, K64),
            (true, K64),
            (false, K64),
            (true, 2 * K64),
            (false, 5 * K64),
            (true, 512),
        ]
    );
    // From the middle of a granule, and cut by the range's end.
    assert_eq!(
        runs(&b, K64 + 100, 3 * K64 + 7),
        [(true, K64 - 100), (false, K64), (true, 7)]
    );
    // Past the bitmap's end (a bitmap of a smaller node) all is clean.
    assert_eq!(b.extent(size, 4096), (false, 4096));
    let small = DirtyBitmap::new(K64, K64).unwrap();
    assert_eq!(runs(&small, 0, 4 * K64), [(false, 4 * K64)]);
    // Exactly what `extents` says, merged.
    let dirty: Vec<(u64, u64)> = {
        let mut at = 0;
        runs(&b, 0, size)
            .into_iter()
            .filter_map(|(d, n)| {
                at += n;
                d.then_some((at - n, n))
            })
            .collect()
    };
    assert_eq!(dirty, extents(&b));
}

#[test]
fn a_claim_reads_the_live_bitmap() {
    let bitmaps = Arc::new(Bitmaps::new());
    bitmaps.add("b", 1 << 20, K64, false, false).unwrap();
    let claim = bitmaps.claim("b").unwrap();
    assert_eq!(claim.extent(0, 1 << 20), (false, 1 << 20));
    bitmaps.mark(2 * K64, 1);
    assert_eq!(claim.extent(0, 1 << 20), (false, 2 * K64));
    assert_eq!(claim.extent(2 * K64, 1 << 20), (true, K64));
}

#[test]
fn internal_bitmaps_record_unlisted_and_are_taken_range_by_range() {
    let bitmaps = Bitmaps::new();
    assert!(!bitmaps.is_recording());
    let id = bitmaps.add_internal(1 << 20, K64).unwrap();
    assert!(bitmaps.is_recording(), "writers must mark it");
    assert!(bitmaps.info().is_empty(), "the user never sees it");
    bitmaps.mark(0, 1);
    bitmaps.mark(5 * K64, 3 * K64);
    assert_eq!(bitmaps.internal_count(id), 4 * K64);
    // From a cursor past the first extent; at most two granules at once.
    assert_eq!(
        bitmaps.take_internal(id, K64, 2 * K64),
        Some((5 * K64, 2 * K64))
    );
    assert_eq!(
        bitmaps.take_internal(id, 7 * K64, 2 * K64),
        Some((7 * K64, K64))
    );
    // Past the last one, it starts over from the front.
    assert_eq!(bitmaps.take_internal(id, 9 * K64, 2 * K64), Some((0, K64)));
    assert_eq!(bitmaps.take_internal(id, 0, 2 * K64), None);
    bitmaps.mark_internal(id, 3 * K64, 1);
    bitmaps.clear_internal(id, 0, 2 * K64);
    assert_eq!(
        bitmaps.internal_count(id),
        K64,
        "clearing elsewhere keeps it"
    );
    bitmaps.remove_internal(id);
    assert!(!bitmaps.is_recording());
    assert_eq!(bitmaps.internal_count(id), 0);
}
