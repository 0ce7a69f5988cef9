//! xorshift64 (Marsaglia's 13/7/17), for tests that want the same
//! "random" choices on every run, so a failure replays.

/// A xorshift64 generator; its state must not start at zero.
pub struct XorShift64(pub u64);

impl XorShift64 {
    /// The next number of the sequence.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `n` bytes, one number each.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_marsaglias_and_stays_in_range() {
        // xorshift64 13/7/17 from 1: its first values.
        let mut r = XorShift64(1);
        assert_eq!(r.next(), 1_082_269_761);
        assert_eq!(r.next(), 1_152_992_998_833_853_505);
        let mut r = XorShift64(42);
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0);
        assert_eq!(XorShift64(5).bytes(3).len(), 3);
    }
}
