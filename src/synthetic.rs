//! Deterministic pseudo-random inputs for tests, benches and the CLI's `bench` (never all zeros).

use crate::dtype::{Logit, TokenId};

/// A small, fast, seedable generator (SplitMix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed; equal seeds give equal streams.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// `n` logits uniform in `[-scale, scale)`, rounded to `L`.
pub fn logits<L: Logit>(seed: u64, n: usize, scale: f32) -> Vec<L> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| L::from_f32(((rng.unit() * 2.0 - 1.0) as f32) * scale)).collect()
}

/// `n` ids uniform in `[0, vocab)`, `vocab` clamped to `1..=MAX_VOCAB`.
pub fn ids<I: TokenId>(seed: u64, n: usize, vocab: usize) -> Vec<I> {
    let mut rng = Rng::new(seed ^ 0xA5A5_A5A5);
    let v = vocab.clamp(1, crate::MAX_VOCAB) as u64;
    (0..n).map(|_| I::from_index(rng.below(v) as u32)).collect()
}
