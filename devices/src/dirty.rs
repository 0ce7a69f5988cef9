//! Guest pages written by device threads, for migration's RAM passes.
//!
//! KVM's dirty log sees only what vCPUs write. A dataplane fills guest
//! buffers from the kernel (io_uring, preadv) and writes used rings and
//! status bytes itself, all invisible to that log, so it marks those
//! pages here, after the data landed, and the VMM harvests them with
//! KVM's log before each pass. While no migration runs, marking costs one
//! relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bits in one bitmap word.
const BITS: u64 = 64;
/// log2 of the page size the bitmap tracks (4 KiB).
pub const PAGE_SHIFT: u32 = 12;

/// A bitmap of 4 KiB guest pages written by device threads while logging.
#[derive(Debug)]
pub struct DirtyPages {
    logging: AtomicBool,
    /// Pages tracked: those below the end given at creation.
    pages: u64,
    words: Box<[AtomicU64]>,
}

impl DirtyPages {
    /// A bitmap covering guest physical addresses 0..`guest_phys_end`, not logging.
    pub fn new(guest_phys_end: u64) -> Self {
        let pages = guest_phys_end.div_ceil(1 << PAGE_SHIFT);
        let words = (0..pages.div_ceil(BITS))
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            logging: AtomicBool::new(false),
            pages,
            words,
        }
    }

    /// Clears the bitmap and starts recording marks.
    pub fn start(&self) {
        for word in self.words.iter() {
            word.store(0, Ordering::Relaxed);
        }
        self.logging.store(true, Ordering::SeqCst);
    }

    /// Stops recording; marks from now on are ignored.
    pub fn stop(&self) {
        self.logging.store(false, Ordering::SeqCst);
    }

    /// Whether marks are recorded now.
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Relaxed)
    }

    /// Records that `len` bytes from guest address `gpa` were written
    /// (call after the write landed); parts beyond the bitmap are ignored.
    pub fn mark(&self, gpa: u64, len: u64) {
        if !self.is_logging() || len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        let last = (gpa.saturating_add(len - 1) >> PAGE_SHIFT).min(self.pages.saturating_sub(1));
        if first >= self.pages {
            return;
        }
        let mut page = first;
        while page <= last {
            let word = page / BITS;
            let bit = page % BITS;
            // Bits `bit..` of this word, up to `last` if it ends here.
            let top = if last / BITS == word {
                last % BITS
            } else {
                BITS - 1
            };
            let span = top - bit + 1;
            let mask = if span == BITS {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            // Release: whoever harvests the bit sees the data written before.
            self.words[word as usize].fetch_or(mask, Ordering::Release);
            page = (word + 1) * BITS;
        }
    }

    /// Takes and clears the marked pages, calling `f` with each page index
    /// (guest physical address >> 12).
    pub fn harvest(&self, mut f: impl FnMut(u64)) {
        for (i, word) in self.words.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::Acquire);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                f(i as u64 * BITS + bit);
                bits &= bits - 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn harvested(d: &DirtyPages) -> Vec<u64> {
        let mut pages = Vec::new();
        d.harvest(|p| pages.push(p));
        pages
    }

    #[test]
    fn marks_cover_every_page_a_range_touches_and_harvest_clears_them() {
        let d = DirtyPages::new(1 << 30);
        d.start();
        d.mark(0xfff, 2); // straddles pages 0 and 1
        d.mark(0x40_0000, 1);
        d.mark(63 << 12, 4097); // pages 63 and 64: across a word boundary
        d.mark(100 << 12, 200 << 12); // pages 100..=299, several whole words
        d.mark(5 << 12, 0);
        let mut want: Vec<u64> = vec![0, 1, 63, 64, 0x400];
        want.extend(100..300);
        want.sort_unstable();
        assert_eq!(harvested(&d), want);
        assert!(harvested(&d).is_empty(), "harvest clears");
        d.mark(7 << 12, 1);
        assert_eq!(harvested(&d), vec![7]);
    }

    #[test]
    fn nothing_is_recorded_unless_logging_and_start_clears() {
        let d = DirtyPages::new(1 << 20);
        assert!(!d.is_logging());
        d.mark(0, 4096);
        d.start();
        assert!(harvested(&d).is_empty());
        d.mark(0x2000, 1);
        d.stop();
        assert!(!d.is_logging());
        d.mark(0x3000, 1);
        assert_eq!(harvested(&d), vec![2], "marks after stop are ignored");
        d.start();
        d.mark(0x5000, 1);
        d.start();
        assert!(harvested(&d).is_empty(), "start clears earlier marks");
    }

    #[test]
    fn ranges_beyond_the_end_are_cut_or_ignored() {
        let d = DirtyPages::new(10 << 12);
        d.start();
        d.mark(9 << 12, 5 << 12);
        d.mark(10 << 12, 1);
        d.mark(u64::MAX - 10, 100);
        d.mark(u64::MAX, u64::MAX);
        assert_eq!(harvested(&d), vec![9]);
        let empty = DirtyPages::new(0);
        empty.start();
        empty.mark(0, 4096);
        assert!(harvested(&empty).is_empty());
    }
}
