//! The one seeded generator of the tests: the daemon's own (splitmix64),
//! with the draws the tests need on top, so every generated history, feature
//! vector, mutated body and garbage byte reproduces.

pub struct Rng(rankd::internals::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(rankd::internals::Rng::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    /// A uniform index into something of length `n`.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.index(from.len())]
    }

    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// `len` ids drawn from the demo catalogue (1..=100,000), repeats allowed.
    pub fn history(&mut self, len: usize) -> Vec<u64> {
        (0..len).map(|_| 1 + self.below(100_000)).collect()
    }

    /// A user feature vector of the demo models: 16 values in [-1, 1), each
    /// exactly representable in f32.
    pub fn features(&mut self) -> Vec<f64> {
        (0..16)
            .map(|_| (self.uniform() * 2.0 - 1.0) as f32 as f64)
            .collect()
    }
}
