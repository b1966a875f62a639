//! The one seeded generator of the tests (splitmix64), so every generated
//! history, feature vector, mutated body and garbage byte reproduces.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
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
