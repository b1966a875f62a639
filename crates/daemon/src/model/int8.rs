//! The int8 copy of an item table that `cpu_scoring = "exact-int8"` scans,
//! and the error bound that makes its answer exact.
//!
//! Each row e (f32, d values) is kept as c = round(e / s), clamped to
//! [-127, 127], with s = max|eᵢ| / 127, and each query q as p = round(q / t)
//! with t = max|qᵢ| / 127. The scan computes the integer a = p·c exactly
//! (i32) and the approximate score ŷ = fl(f32(a) · fl(s · t)).
//!
//! **The bound.** Let x = q·e (the real dot product of the stored f32
//! values), ŝ the score the f32 kernel computes for it, δq = q − t·p and
//! δe = e − s·c (exact residuals, computed in f64 here). Then
//!
//! x = t·s·a + s·(δq·c) + q·δe, so |x − t·s·a| ≤ R = ‖δq‖·A + ‖q‖·B
//!
//! with A = ‖s·c‖ and B = ‖δe‖ (Cauchy–Schwarz on both terms). With
//! u = 2⁻²⁴ and γₙ = n·u / (1 − n·u):
//!
//! - the f32 kernel sums d products in some order (lanes, then a horizontal
//!   sum, then a tail; or one FMA chain; or, portable, a rounded product and
//!   a rounded sum per step), and every product passes through at most d + 2
//!   roundings on its way to the result (⌊d/W⌋ + log₂W + d mod W + 1 ≤ d + 2
//!   for W = 8 or 16 lanes once d ≥ W; below W the lanes hold exact zeros), so
//!   |ŝ − x| ≤ γ_{d+2}·Σ|qᵢeᵢ| ≤ γ_{d+2}·‖q‖·N with N = ‖e‖ (Higham's bound
//!   for any summation tree);
//! - ŷ is at most three roundings from t·s·a (f32(a), s·t, the product;
//!   f32(a) is exact while |a| < 2²⁴): |ŷ − t·s·a| ≤ 3.01·u·(‖q‖·N + R);
//! - the scan then forms ub = fl(ŷ + r) and lb = fl(ŷ − r), one rounding
//!   each, at most u·(|ŷ| + r).
//!
//! So with r ≥ (1 + 2⁻⁸)·R + (γ_{d+2} + 8u)·‖q‖·N + η, lb ≤ ŝ ≤ ub holds
//! for the computed ub and lb: the factor 1 + 2⁻⁸ and the 8u absorb the
//! last terms (together under 6u of ‖q‖·N + R, once r's own rounding is
//! moved to the right-hand side), and η = 2⁻¹⁰⁰ absorbs
//! any underflow (each rounding in the subnormal range errs by at most 2⁻¹⁵⁰
//! absolutely, a few thousand of them by far less than η for any table rankd
//! holds). Here γ_{d+2} + 8u ≤ 2·(d + 12)·u = `rel` while d·u ≤ ¼.
//!
//! Per row the table keeps `p_coef` ≥ (1 + 2⁻⁸)·B + rel·N and `q_coef` ≥
//! (1 + 2⁻⁸)·A, and per query the scan keeps `qn` ≥ ‖q‖ and `dq` ≥ ‖δq‖, so
//! r = qn·p_coef + dq·q_coef + η. Each is computed in f64 (relative error a
//! few d·2⁻⁵³), inflated by 2⁻¹⁶ and rounded up to f32; that inflation also
//! covers the f32 roundings of r itself (at most four: the r computed is
//! ≥ r·(1 − 4.1u)).
//!
//! Overflow: the scan refuses a batch (and runs the f32 kernel instead)
//! unless every qn · `max_norm` < 2¹⁰⁰ and d ≤ 65,536, so nothing above
//! overflows and the i32 sums Σ (cᵢ + 128)·pᵢ ≤ 65,536 · 255 · 127 fit.
//!
//! Layout: rows in blocks of 16; a block holds ⌈d/4⌉ groups of 64 bytes,
//! group g holding dims 4g..4g+4 of each of its 16 rows (row-major within
//! the group), as cᵢ + 128 (u8), zero-padded dims as 128 (c = 0). One
//! 64-byte load then feeds a `vpdpbusd` per query that adds 4 products into
//! each of 16 rows' lanes: no horizontal sums. The rows past the last, up to
//! the block, are zeros with scale 0.

use std::fmt;

/// Rows per block of the layout.
pub const BLOCK: usize = 16;

/// The absolute slack η in every radius.
pub const ETA: f32 = 7.888_609e-31; // 2^-100

/// Largest ‖q‖ · max‖e‖ a scan accepts (2^100).
pub const MAX_PRODUCT: f64 = 1.267_650_600_228_229_4e30;

/// Largest d the i32 sums allow.
pub const MAX_DIM: usize = 65_536;

#[derive(Clone)]
pub struct Int8Table {
    dim: usize,
    /// ⌈d/4⌉.
    groups: usize,
    rows: usize,
    /// Blocks of [groups][16 rows][4] bytes, cᵢ + 128.
    data: Vec<u8>,
    /// s per row (0 past the last row).
    scale: Vec<f32>,
    /// Coefficient of qn in the radius, per row.
    p_coef: Vec<f32>,
    /// Coefficient of dq in the radius, per row.
    q_coef: Vec<f32>,
    /// An upper bound of every row's ‖e‖ (it never shrinks).
    max_norm: f32,
}

impl fmt::Debug for Int8Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Int8Table")
            .field("dim", &self.dim)
            .field("rows", &self.rows)
            .field("max_norm", &self.max_norm)
            .finish_non_exhaustive()
    }
}

/// Rounds a non-negative f64 up to an f32 after inflating it by 2⁻¹⁶.
fn up(x: f64) -> f32 {
    let x = x * (1.0 + 1.0 / 65536.0);
    let f = x as f32;
    if (f as f64) < x {
        f.next_up()
    } else {
        f
    }
}

/// 2·(d + 12)·u: covers γ_{d+2} + 8u (see the module comment).
fn rel(d: usize) -> f64 {
    2.0 * (d as f64 + 12.0) * f64::from(f32::EPSILON) / 2.0
}

/// Quantizes `v` to [-127, 127] with scale max|vᵢ| / 127, writing each code
/// through `put`; returns (scale, ‖s·c‖, ‖v − s·c‖, ‖v‖) with the norms in
/// f64.
fn quantize(v: &[f32], mut put: impl FnMut(usize, i8)) -> (f32, f64, f64, f64) {
    let m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let s = m / 127.0;
    let (mut a2, mut b2, mut n2) = (0f64, 0f64, 0f64);
    for (i, &x) in v.iter().enumerate() {
        let c = if s > 0.0 {
            (x / s).round().clamp(-127.0, 127.0) as i8
        } else {
            0
        };
        put(i, c);
        let sc = f64::from(s) * f64::from(c);
        let r = f64::from(x) - sc;
        a2 += sc * sc;
        b2 += r * r;
        n2 += f64::from(x) * f64::from(x);
    }
    (s, a2.sqrt(), b2.sqrt(), n2.sqrt())
}

impl Int8Table {
    /// The int8 copy of `embeddings` ([rows, dim] row-major).
    pub fn new(dim: usize, embeddings: &[f32]) -> Self {
        let rows = embeddings.len().checked_div(dim).unwrap_or(0);
        let mut t = Self {
            dim,
            groups: dim.div_ceil(4),
            rows: 0,
            data: Vec::new(),
            scale: Vec::new(),
            p_coef: Vec::new(),
            q_coef: Vec::new(),
            max_norm: 0.0,
        };
        t.reserve(rows);
        for r in 0..rows {
            t.set_row(r, &embeddings[r * dim..(r + 1) * dim]);
        }
        t
    }

    fn reserve(&mut self, rows: usize) {
        let blocks = rows.div_ceil(BLOCK);
        if blocks * BLOCK > self.scale.len() {
            self.data.resize(blocks * self.groups * BLOCK * 4, 128);
            self.scale.resize(blocks * BLOCK, 0.0);
            self.p_coef.resize(blocks * BLOCK, 0.0);
            self.q_coef.resize(blocks * BLOCK, 0.0);
        }
    }

    /// Writes (or appends, when `row` is the row count) one row.
    pub fn set_row(&mut self, row: usize, e: &[f32]) {
        assert!(
            row <= self.rows && e.len() == self.dim,
            "rows are written in place or appended: this is a bug"
        );
        if row == self.rows {
            self.rows += 1;
            self.reserve(self.rows);
        }
        let (groups, d) = (self.groups, self.dim);
        let base = (row / BLOCK) * groups * BLOCK * 4 + (row % BLOCK) * 4;
        let data = &mut self.data;
        let (s, a, b, n) = quantize(e, |i, c| {
            data[base + (i / 4) * BLOCK * 4 + i % 4] = (c as i16 + 128) as u8;
        });
        let margin = 1.0 + 1.0 / 256.0;
        self.scale[row] = s;
        self.p_coef[row] = up(margin * b + rel(d) * n);
        self.q_coef[row] = up(margin * a);
        self.max_norm = self.max_norm.max(up(n));
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// 4-dim groups per row.
    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    pub fn p_coef(&self) -> &[f32] {
        &self.p_coef
    }

    pub fn q_coef(&self) -> &[f32] {
        &self.q_coef
    }

    pub fn max_norm(&self) -> f32 {
        self.max_norm
    }

    /// Bytes the scan reads per pass.
    pub fn bytes(&self) -> usize {
        self.data.len() + 3 * 4 * self.scale.len()
    }
}

/// One query as the int8 scan needs it.
#[derive(Debug, Clone)]
pub struct Int8Query {
    /// p, 4 codes per group packed little-endian into an i32 (zero-padded).
    pub words: Vec<i32>,
    /// t.
    pub scale: f32,
    /// ≥ ‖q‖.
    pub qn: f32,
    /// ≥ ‖q − t·p‖.
    pub dq: f32,
    /// 128 · Σ pᵢ: what the u8 offset adds to each row's sum.
    pub offset: i32,
}

impl Int8Query {
    pub fn new(q: &[f32]) -> Self {
        let groups = q.len().div_ceil(4);
        let mut bytes = vec![0i8; groups * 4];
        let (t, _, dq, qn) = quantize(q, |i, c| bytes[i] = c);
        let words = bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]))
            .collect();
        let offset = 128 * bytes.iter().map(|&b| b as i32).sum::<i32>();
        Self {
            words,
            scale: t,
            qn: up(qn),
            dq: up(dq),
            offset,
        }
    }
}
