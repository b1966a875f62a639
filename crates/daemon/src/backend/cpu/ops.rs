//! The CPU backend's operations on row-major f32 buffers, from which a
//! kind's forward pass is written: a linear layer as one GEMM over every row
//! of the batch (weights `[out, in]` as PyTorch stores them), layer norm in
//! two passes, ReLU, residual adds, and multi-head attention over windows
//! of `L` positions, causal or for the last position alone. No tensor
//! library sits between them: each buffer is allocated once per batch and
//! each operation makes one pass over it.

use gemm::Parallelism;
use rayon::prelude::*;

/// Runs `body(args)` (an `#[inline(always)]` function) compiled for AVX2
/// where the CPU has it, so its loops are vectorised 8 wide, else for the
/// baseline.
macro_rules! simd {
    ($body:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if avx2() {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { wide(|| $body($($arg),*)) };
            }
        }
        $body($($arg),*)
    }};
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2"))
}

/// A linear layer: `weight` `[out, in]`, `bias` `[out]`.
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub out: usize,
    pub input: usize,
}

impl Linear {
    pub fn new(weight: &[f32], bias: &[f32], out: usize, input: usize) -> Self {
        assert_eq!((weight.len(), bias.len()), (out * input, out));
        Self {
            weight: weight.to_vec(),
            bias: bias.to_vec(),
            out,
            input,
        }
    }

    /// `x` `[rows, in]` → `[rows, out]`: x·Wᵀ + b.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.input;
        let mut y = Vec::with_capacity(rows * self.out);
        for _ in 0..rows {
            y.extend_from_slice(&self.bias);
        }
        self.accumulate(x, &mut y);
        y
    }

    /// `y += x·Wᵀ` (`y` `[rows, out]` holds what the product is added to:
    /// a bias, a residual).
    pub fn accumulate(&self, x: &[f32], y: &mut [f32]) {
        let rows = x.len() / self.input;
        // The product below reads and writes through raw pointers: these
        // bounds are its safety.
        assert_eq!(x.len(), rows * self.input);
        assert_eq!(y.len(), rows * self.out);
        if rows == 0 {
            return;
        }
        let threads = rayon::current_num_threads();
        // Below a few hundred rows the split costs more than it gains.
        let parallelism = if threads > 1 && rows * self.out * self.input >= 1 << 20 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: the pointers and strides describe `x` [rows, in] row-major,
        // Wᵀ [in, out] read from `weight` [out, in] row-major, and `y`
        // [rows, out] row-major, all in bounds (checked above); `y` does not
        // alias the inputs (it is a `&mut`).
        unsafe {
            gemm::gemm(
                rows,
                self.out,
                self.input,
                y.as_mut_ptr(),
                1,
                self.out as isize,
                true,
                x.as_ptr(),
                1,
                self.input as isize,
                self.weight.as_ptr(),
                self.input as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// Layer norm of each `d`-wide row, in place, in two passes (the mean, then
/// the variance of the centred values) as PyTorch computes it: one pass of
/// E[x²] − mean² loses the variance of rows with a large mean.
pub fn layer_norm(x: &mut [f32], d: usize, weight: &[f32], bias: &[f32], eps: f32) {
    simd!(layer_norm_body(x, d, weight, bias, eps))
}

#[inline(always)]
fn layer_norm_body(x: &mut [f32], d: usize, weight: &[f32], bias: &[f32], eps: f32) {
    let mut centred = vec![0f32; d];
    for row in x.chunks_exact_mut(d) {
        let mean = sum(row) / d as f32;
        centred
            .iter_mut()
            .zip(row.iter())
            .for_each(|(c, v)| *c = v - mean);
        let var = dot(&centred, &centred) / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((v, c), w), b) in row.iter_mut().zip(&centred).zip(weight).zip(bias) {
            *v = c * inv * w + b;
        }
    }
}

/// As [`layer_norm`], into a new buffer.
pub fn layer_normed(x: &[f32], d: usize, weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let mut y = x.to_vec();
    layer_norm(&mut y, d, weight, bias, eps);
    y
}

pub fn relu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// `y += x`.
pub fn add(y: &mut [f32], x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// `y[row] += b` for every `b.len()`-wide row of `y`.
pub fn add_rows(y: &mut [f32], b: &[f32]) {
    simd!(add_rows_body(y, b))
}

#[inline(always)]
fn add_rows_body(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
}

/// Softmax of `row` in place, with an exponential the compiler vectorises.
#[inline(always)]
fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    let inv = 1.0 / sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// eˣ for x ≤ 0 (as softmax computes it), within 2 ulp of `f32::exp`:
/// x = n·ln 2 + r with |r| ≤ ln 2 / 2, eʳ by its degree-6 polynomial
/// (Cephes' coefficients), 2ⁿ written into the exponent bits. No branch and
/// no call, so a loop of it is vectorised.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Not `max`: a NaN logit stays NaN, as it does in PyTorch.
    let x = if x < -87.0 { -87.0 } else { x };
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A sum in 16 independent lanes (see [`dot`]).
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The last of every `len` rows of `x` (`d` wide): `[B·len, d]` → `[B, d]`.
pub fn last_rows(x: &[f32], len: usize, d: usize) -> Vec<f32> {
    x.chunks_exact(len * d)
        .flat_map(|w| &w[(len - 1) * d..])
        .copied()
        .collect()
}

/// Which positions of the window a query row attends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attend {
    /// A query per position; position t attends to positions 0..=t.
    Causal,
    /// One query per window, at its last position, attending to all of it.
    Last,
}

/// `dst` `[m, n]` (row stride `dst_rs`) = `lhs` `[m, k]` × `rhs` `[k, n]`,
/// each operand given by its pointer and its row and column strides, on the
/// calling thread.
///
/// # Safety
/// Every strided element of the three operands must lie inside the
/// allocation its pointer points into, and `dst` must not overlap the
/// inputs.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    scale: f32,
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Scaled dot-product attention of `heads` heads, `d / heads` wide, per
/// window of `len` positions: `q` `[B·len, d]` (`Causal`) or `[B, d]`
/// (`Last`), `kv` `[B·len, 2d]` (keys, then values, per row). Returns the
/// heads' outputs concatenated, shaped as `q`. Per window and head, the
/// logits and the weighted values are two small matrix products; the
/// windows are spread over the cores.
pub fn attention(
    q: &[f32],
    kv: &[f32],
    len: usize,
    d: usize,
    heads: usize,
    attend: Attend,
) -> Vec<f32> {
    let q_rows = match attend {
        Attend::Causal => len,
        Attend::Last => 1,
    };
    assert_eq!(
        q.len() / (q_rows * d),
        kv.len() / (len * 2 * d),
        "one key window per query window"
    );
    let mut out = vec![0f32; q.len()];
    let window = |(w, (out, q)): (usize, (&mut [f32], &[f32]))| {
        let kv = &kv[w * len * 2 * d..(w + 1) * len * 2 * d];
        simd!(attention_window(q, kv, out, len, d, heads, attend))
    };
    let n = q_rows * d;
    if rayon::current_num_threads() > 1 && q.len() / d >= 64 {
        out.par_chunks_exact_mut(n)
            .zip(q.par_chunks_exact(n))
            .enumerate()
            .for_each(window);
    } else {
        out.chunks_exact_mut(n)
            .zip(q.chunks_exact(n))
            .enumerate()
            .for_each(window);
    }
    out
}

/// One window of [`attention`]: `q` and `out` its query rows, `kv` its
/// `len` key and value rows.
#[inline(always)]
fn attention_window(
    q: &[f32],
    kv: &[f32],
    out: &mut [f32],
    len: usize,
    d: usize,
    heads: usize,
    attend: Attend,
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let q_rows = q.len() / d;
    let mut p = vec![0f32; q_rows * len];
    for h in 0..heads {
        // SAFETY: Q_h is `q_rows` rows of `dh` at column h·dh of the
        // window's `q` (row stride d); K_hᵀ and V_h are `len` rows of
        // `dh` at columns h·dh and d + h·dh of its `kv` (row stride 2d);
        // P is `p`, `[q_rows, len]`; the output is `dh` columns at h·dh
        // of the window's `out` (row stride d). All lie inside their
        // slices; `p` is this call's own and `out` is not an input.
        unsafe {
            product(
                (q_rows, len, dh),
                p.as_mut_ptr(),
                len,
                (q.as_ptr().add(h * dh), d, 1),
                (kv.as_ptr().add(h * dh), 1, 2 * d),
                scale,
            );
        }
        for (r, row) in p.chunks_exact_mut(len).enumerate() {
            // The keys position r (or the last position) sees.
            let seen = match attend {
                Attend::Causal => r + 1,
                Attend::Last => len,
            };
            let (row, masked) = row.split_at_mut(seen);
            masked.fill(0.0);
            softmax(row);
        }
        // SAFETY: as above.
        unsafe {
            product(
                (q_rows, dh, len),
                out.as_mut_ptr().add(h * dh),
                d,
                (p.as_ptr(), len, 1),
                (kv.as_ptr().add(d + h * dh), 2 * d, 1),
                1.0,
            );
        }
    }
}

/// Attention of one query per window, at its last position, over the
/// window's `len` rows of `x` `[B·len, d]` *before* their key and value
/// projections (`kv`: `[2d, d]` weights, keys then values, and their bias):
/// for head h, q·(W_k x_j + b_k) = (W_kᵀ q)·x_j + q·b_k, whose last term is the
/// same for every j and leaves the softmax unchanged, and Σ_j p_j (W_v x_j + b_v)
/// = W_v (Σ_j p_j x_j) + b_v as the weights sum to 1. So the keys and values of
/// the window are never computed: about L times less work than projecting
/// them. `q` `[B, d]` is the projected queries; returns `[B, d]`.
pub fn attention_last(
    q: &[f32],
    x: &[f32],
    kv: &Linear,
    len: usize,
    d: usize,
    heads: usize,
) -> Vec<f32> {
    let windows = q.len() / d;
    assert_eq!(x.len(), windows * len * d, "one window of x per query");
    let mut out = vec![0f32; q.len()];
    let window = |(w, (out, q)): (usize, (&mut [f32], &[f32]))| {
        let x = &x[w * len * d..(w + 1) * len * d];
        simd!(attention_last_window(q, x, kv, out, len, d, heads))
    };
    if rayon::current_num_threads() > 1 && windows >= 64 {
        out.par_chunks_exact_mut(d)
            .zip(q.par_chunks_exact(d))
            .enumerate()
            .for_each(window);
    } else {
        out.chunks_exact_mut(d)
            .zip(q.chunks_exact(d))
            .enumerate()
            .for_each(window);
    }
    out
}

/// One window of [`attention_last`]: `q` and `out` its query row, `x` its
/// `len` rows before the projections.
#[inline(always)]
fn attention_last_window(
    q: &[f32],
    x: &[f32],
    kv: &Linear,
    out: &mut [f32],
    len: usize,
    d: usize,
    heads: usize,
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let (wk, wv) = kv.weight.split_at(d * d);
    let (mut qk, mut p, mut z) = (vec![0f32; d], vec![0f32; len], vec![0f32; d]);
    for h in 0..heads {
        // qk = W_k,hᵀ q_h: the head's rows of W_k, weighted by q_h.
        qk.fill(0.0);
        for (c, &qc) in q[h * dh..(h + 1) * dh].iter().enumerate() {
            let row = &wk[(h * dh + c) * d..(h * dh + c + 1) * d];
            qk.iter_mut().zip(row).for_each(|(a, &r)| *a += qc * r);
        }
        for (pj, xj) in p.iter_mut().zip(x.chunks_exact(d)) {
            *pj = dot(&qk, xj) * scale;
        }
        softmax(&mut p);
        // z = Σ_j p_j x_j, then the head's output W_v,h z + b_v,h.
        z.fill(0.0);
        for (&pj, xj) in p.iter().zip(x.chunks_exact(d)) {
            z.iter_mut().zip(xj).for_each(|(a, &v)| *a += pj * v);
        }
        for (c, o) in out[h * dh..(h + 1) * dh].iter_mut().enumerate() {
            let row = &wv[(h * dh + c) * d..(h * dh + c + 1) * d];
            *o = dot(row, &z) + kv.bias[d + h * dh + c];
        }
    }
}

/// A dot product in 16 independent lanes, which the compiler keeps in
/// vector registers (a plain `sum()` is one serial chain of adds).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_is_x_times_w_transposed_plus_b() {
        // W [3, 2], x [2, 2].
        let l = Linear::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[0.5, -0.5, 1.0], 3, 2);
        let y = l.forward(&[1.0, 0.0, 2.0, 1.0]);
        assert_eq!(y, vec![1.5, 2.5, 6.0, 4.5, 9.5, 17.0]);
    }

    #[test]
    fn a_large_linear_matches_the_plain_sum() {
        let (rows, input, out) = (300, 64, 96);
        let x: Vec<f32> = (0..rows * input)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w: Vec<f32> = (0..out * input)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) / 44.0)
            .collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 / 10.0).collect();
        let y = Linear::new(&w, &b, out, input).forward(&x);
        for r in 0..rows {
            for o in 0..out {
                let want: f64 = b[o] as f64
                    + (0..input)
                        .map(|i| x[r * input + i] as f64 * w[o * input + i] as f64)
                        .sum::<f64>();
                assert!((y[r * out + o] as f64 - want).abs() < 1e-4, "{r},{o}");
            }
        }
    }

    #[test]
    fn layer_norm_centres_and_scales_each_row() {
        let mut x = vec![1.0, 2.0, 3.0, 10.0, 10.0, 10.0];
        layer_norm(&mut x, 3, &[1.0, 2.0, 1.0], &[0.0, 0.0, 1.0], 1e-8);
        let s = (2.0f32 / 3.0).sqrt();
        let want = [-1.0 / s, 0.0, 1.0 / s + 1.0, 0.0, 0.0, 1.0];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{x:?}");
        }
    }

    /// Attention written out for one window and head.
    fn naive(
        q: &[f32],
        kv: &[f32],
        len: usize,
        d: usize,
        heads: usize,
        t_of: impl Fn(usize) -> usize,
        rows: usize,
    ) -> Vec<f32> {
        let dh = d / heads;
        let mut out = vec![0f32; rows * d];
        for r in 0..rows {
            let t = t_of(r);
            for h in 0..heads {
                let logits: Vec<f64> = (0..=t)
                    .map(|s| {
                        (0..dh)
                            .map(|i| {
                                q[r * d + h * dh + i] as f64 * kv[s * 2 * d + h * dh + i] as f64
                            })
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..dh {
                    out[r * d + h * dh + i] = (0..=t)
                        .map(|s| e[s] / z * kv[s * 2 * d + d + h * dh + i] as f64)
                        .sum::<f64>() as f32;
                }
            }
            let _ = len;
        }
        out
    }

    #[test]
    fn causal_and_last_position_attention_match_the_written_out_sums() {
        let (len, d, heads) = (5, 4, 2);
        let q: Vec<f32> = (0..len * d)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let kv: Vec<f32> = (0..len * 2 * d)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let causal = attention(&q, &kv, len, d, heads, Attend::Causal);
        let want = naive(&q, &kv, len, d, heads, |r| r, len);
        for (a, b) in causal.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{causal:?} vs {want:?}");
        }
        let last_q = &q[(len - 1) * d..];
        let last = attention(last_q, &kv, len, d, heads, Attend::Last);
        for (a, b) in last.iter().zip(&want[(len - 1) * d..]) {
            assert!((a - b).abs() < 1e-5, "{last:?}");
        }
    }

    #[test]
    fn last_position_attention_before_the_projections_equals_it_after() {
        let (len, d, heads, windows) = (6, 8, 2, 3);
        let x: Vec<f32> = (0..windows * len * d)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 9.0)
            .collect();
        let w: Vec<f32> = (0..2 * d * d)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) / 12.0)
            .collect();
        let b: Vec<f32> = (0..2 * d)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) / 5.0)
            .collect();
        let kv = Linear::new(&w, &b, 2 * d, d);
        let q: Vec<f32> = (0..windows * d)
            .map(|i| ((i * 11 % 13) as f32 - 6.0) / 7.0)
            .collect();
        // Project every key and value, then attend from the last position.
        let projected = kv.forward(&x);
        let want = attention(&q, &projected, len, d, heads, Attend::Last);
        let got = attention_last(&q, &x, &kv, len, d, heads);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn the_polynomial_exp_is_within_two_ulp() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            let tol = 2.5 * f32::EPSILON * want.max(f32::MIN_POSITIVE);
            if x >= -87.0 {
                assert!((got - want).abs() <= tol, "exp({x}) = {got}, want {want}");
            } else {
                assert!(got < 2e-38, "exp({x}) = {got}");
            }
            x += 0.000_97;
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn the_lane_split_dot_is_the_dot() {
        for n in [0, 1, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 / 11.0).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-3, "{n}");
        }
    }
}
