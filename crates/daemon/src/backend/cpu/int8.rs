//! `cpu_scoring = "exact-int8"`: the top-k of the f32 scan, found by reading
//! the table's int8 copy (`model::int8`, a quarter of the bytes) instead of
//! the f32 rows.
//!
//! The scan gives each row an approximate score ŷ and a radius r with
//! ŷ − r ≤ ŝ ≤ ŷ + r, ŝ being the score the f32 scan computes (the bound is
//! proved in `model::int8`). Per query it keeps the k best lower bounds seen
//! (their k-th is the bar) and every eligible row whose upper bound reaches
//! the bar when it is read. At the end the bar L is the k-th best lower bound
//! over the whole table; the rows whose upper bound is below L are dropped
//! and the rest are re-scored with the f32 kernel's own arithmetic
//! ([`fused::rescore`]), their top-k taken as the f32 scan takes it.
//!
//! Why that is the f32 answer: k eligible rows have ŝ ≥ lower bound ≥ L, so
//! the k-th best f32 score is ≥ L, and every row of the f32 top-k has
//! ŷ + r ≥ ŝ ≥ L ≥ the bar at the time it was read (bars only rise, and a
//! thread's bar is at most the global L): it was kept and it survives the
//! final cut. The top-k of a set holding the whole f32 top-k, scored with
//! the same bits, ordered by (score desc, id asc) with unique ids, is the
//! f32 top-k. Ties with the k-th are kept because every test is ≥.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;

use rayon::prelude::*;

use super::fused::{self, Isa};
use crate::backend::topk::TopK;
use crate::backend::Scored;
use crate::model::attributes::{Attributes, RowFilter};
use crate::model::int8::{Int8Query, Int8Table, BLOCK, ETA, MAX_DIM, MAX_PRODUCT};
use crate::model::ItemTable;

/// Fewer rows than this per thread and the split costs more than it saves.
const MIN_ROWS_PER_THREAD: usize = 16_384;

/// Queries a block pass holds in registers.
const CHUNK: usize = 8;

/// The integer dot-product kernel of the int8 scan. Its sums are exact
/// integers whatever the kernel, so the choice changes speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AVX-512 VNNI: one `vpdpbusd` per 4 dims × 16 rows × query.
    Vnni512,
    /// AVX2: `vpmaddubsw` on |c| and sign-moved p, then `vpmaddwd`, per
    /// 4 dims × 8 rows × query.
    Avx2,
    /// Plain Rust.
    Portable,
}

impl Int8Kernel {
    /// The fastest this CPU runs.
    pub fn detect() -> Int8Kernel {
        Int8Kernel::available()[0]
    }

    /// Every kernel this CPU runs, fastest first.
    pub fn available() -> Vec<Int8Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Int8Kernel::Vnni512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Int8Kernel::Avx2);
            }
        }
        v.push(Int8Kernel::Portable);
        v
    }
}

/// A batch's answer and how many rows were re-scored in f32 for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Answer {
    pub lists: Vec<Vec<Scored>>,
    /// Rows re-scored, summed over the queries.
    pub rescored: usize,
    /// The batch ran the f32 scan instead (a query too large for the bound,
    /// or d past 65,536).
    pub fell_back: bool,
}

/// The f32 scan's answer ([`fused::score_topk`]), through the int8 copy. A
/// CPU with neither AVX-512 VNNI nor AVX2 runs the f32 scan itself: the
/// portable int8 kernel is correct but slower than it.
pub fn score_topk_int8(
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
) -> Vec<Vec<Scored>> {
    score_topk_int8_filtered(items, qs, specs, &[])
}

/// [`score_topk_int8`] with per-query filters, as
/// [`fused::score_topk_filtered`]: the answer is that scan's.
pub fn score_topk_int8_filtered(
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
    filters: &[Option<&RowFilter>],
) -> Vec<Vec<Scored>> {
    let kernel = Int8Kernel::detect();
    if kernel == Int8Kernel::Portable {
        return fused::score_topk_filtered(items, qs, specs, filters);
    }
    let threads = rayon::current_num_threads().min(items.rows().div_ceil(MIN_ROWS_PER_THREAD));
    score_topk_int8_with_filters(Isa::detect(), kernel, threads, items, qs, specs, filters).lists
}

/// [`score_topk_int8`] with the f32 instruction set whose answer it gives,
/// the int8 kernel and the number of row ranges chosen.
pub fn score_topk_int8_with(
    isa: Isa,
    kernel: Int8Kernel,
    threads: usize,
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
) -> Int8Answer {
    score_topk_int8_with_filters(isa, kernel, threads, items, qs, specs, &[])
}

/// [`score_topk_int8_with`] with per-query filters.
pub fn score_topk_int8_with_filters(
    isa: Isa,
    kernel: Int8Kernel,
    threads: usize,
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
    filters: &[Option<&RowFilter>],
) -> Int8Answer {
    let (d, b, n) = (items.dim(), specs.len(), items.rows());
    assert_eq!(qs.len(), b * d, "one query row per spec: this is a bug");
    if b == 0 {
        return Int8Answer {
            lists: Vec::new(),
            rescored: 0,
            fell_back: false,
        };
    }
    let table = items.int8();
    assert_eq!(
        table.rows(),
        n,
        "the int8 copy follows the table: this is a bug"
    );
    let queries: Vec<Int8Query> = qs.chunks_exact(d).map(Int8Query::new).collect();
    let max_norm = f64::from(table.max_norm());
    // NaN fails the test too.
    let bounded = queries
        .iter()
        .all(|q| f64::from(q.qn) * max_norm < MAX_PRODUCT);
    if d > MAX_DIM || !bounded {
        return Int8Answer {
            lists: fused::score_topk_with_filters(isa, threads, items, qs, specs, filters),
            rescored: 0,
            fell_back: true,
        };
    }
    let job = Job::new(table, items, &queries, specs, filters);
    let blocks = n.div_ceil(BLOCK);
    let per = blocks.div_ceil(threads.max(1)).max(1);
    let ranges: Vec<Range<usize>> = (0..blocks.div_ceil(per))
        .map(|t| t * per..((t + 1) * per).min(blocks))
        .collect();
    let parts: Vec<Part> = ranges
        .into_par_iter()
        .map(|blocks| {
            let mut part = Part::new(specs);
            job.run(kernel, &mut part, blocks);
            part
        })
        .collect();
    let mut rescored = 0;
    let mut rows = Vec::new();
    let mut scores = Vec::new();
    let lists = (0..b)
        .map(|q| {
            let k = specs[q].0;
            let mut lbs = Bar::new(k);
            for part in &parts {
                part.bars[q].heap.iter().for_each(|l| lbs.offer(l.0 .0));
            }
            let cut = lbs.bar();
            rows.clear();
            for part in &parts {
                rows.extend(part.cands[q].iter().filter(|c| c.1 >= cut).map(|c| c.0));
            }
            rescored += rows.len();
            scores.clear();
            fused::rescore(isa, b, items, &qs[q * d..(q + 1) * d], &rows, &mut scores);
            let mut top = TopK::new(k);
            for (&r, &s) in rows.iter().zip(&scores) {
                top.offer(Scored {
                    id: items.id(r),
                    score: s,
                });
            }
            top.into_sorted()
        })
        .collect();
    Int8Answer {
        lists,
        rescored,
        fell_back: false,
    }
}

/// An f32 ordered by `total_cmp` (the bounds are finite: see the guard).
#[derive(Clone, Copy, PartialEq)]
struct Ord32(f32);

impl Eq for Ord32 {}
impl PartialOrd for Ord32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ord32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The k best lower bounds seen; their k-th is the bar.
struct Bar {
    k: usize,
    heap: BinaryHeap<Reverse<Ord32>>,
}

impl Bar {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(4096) + 1),
        }
    }

    /// −∞ until k bounds are in; NaN (nothing reaches it) for k = 0.
    fn bar(&self) -> f32 {
        if self.k == 0 {
            f32::NAN
        } else if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |m| m.0 .0)
        }
    }

    fn offer(&mut self, lb: f32) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Reverse(Ord32(lb)));
        } else if let Some(mut min) = self.heap.peek_mut() {
            if lb > min.0 .0 {
                *min = Reverse(Ord32(lb));
            }
        }
    }
}

/// One thread's bars and kept rows.
struct Part {
    bars: Vec<Bar>,
    /// Each query's bar, beside the heap for the kernels.
    bar: Vec<f32>,
    /// Each query's kept rows with their upper bounds.
    cands: Vec<Vec<(u32, f32)>>,
}

impl Part {
    fn new(specs: &[(usize, &[u32])]) -> Self {
        let bars: Vec<Bar> = specs.iter().map(|s| Bar::new(s.0)).collect();
        Self {
            bar: bars.iter().map(Bar::bar).collect(),
            bars,
            cands: vec![Vec::new(); specs.len()],
        }
    }
}

/// One batch's inputs, shared by every thread.
struct Job<'a> {
    table: &'a Int8Table,
    live: &'a [bool],
    specs: &'a [(usize, &'a [u32])],
    attributes: &'a Attributes,
    /// Per query, the rows it may return (empty: all).
    filters: &'a [Option<&'a RowFilter>],
    rows: usize,
    groups: usize,
    /// Each query's packed codes, [b][groups].
    words: Vec<i32>,
    /// Per query: t, qn, dq and 128·Σp.
    t: Vec<f32>,
    qn: Vec<f32>,
    dq: Vec<f32>,
    offset: Vec<i32>,
}

impl<'a> Job<'a> {
    fn new(
        table: &'a Int8Table,
        items: &'a ItemTable,
        queries: &[Int8Query],
        specs: &'a [(usize, &'a [u32])],
        filters: &'a [Option<&'a RowFilter>],
    ) -> Self {
        Self {
            table,
            live: items.live_mask(),
            specs,
            attributes: items.attributes(),
            filters,
            rows: items.rows(),
            groups: table.groups(),
            words: queries
                .iter()
                .flat_map(|q| q.words.iter().copied())
                .collect(),
            t: queries.iter().map(|q| q.scale).collect(),
            qn: queries.iter().map(|q| q.qn).collect(),
            dq: queries.iter().map(|q| q.dq).collect(),
            offset: queries.iter().map(|q| q.offset).collect(),
        }
    }

    fn run(&self, kernel: Int8Kernel, part: &mut Part, blocks: Range<usize>) {
        let t = self.table;
        assert!(
            blocks.end * BLOCK <= t.scale().len()
                && t.data().len() >= blocks.end * self.groups * BLOCK * 4
                && t.p_coef().len() == t.scale().len()
                && t.q_coef().len() == t.scale().len()
                && self.live.len() == self.rows
                && self.words.len() == self.specs.len() * self.groups
        );
        match kernel {
            // SAFETY: `available` lists VNNI only when the CPU has it; the
            // kernel reads inside the slices checked above.
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Vnni512 => unsafe { x86::scan_vnni(self, part, blocks) },
            // SAFETY: as above, for AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => unsafe { x86::scan_avx2(self, part, blocks) },
            _ => scan_portable(self, part, blocks),
        }
    }

    /// A row whose upper bound reached its query's bar: kept unless deleted,
    /// excluded or refused by the query's filter, and its lower bound
    /// offered to the bar.
    #[inline(never)]
    fn hit(&self, part: &mut Part, q: usize, row: usize, y: f32, r: f32) {
        let ub = y + r;
        // The bar may have risen since the mask was taken.
        if ub
            .partial_cmp(&part.bar[q])
            .is_none_or(std::cmp::Ordering::is_lt)
            || !self.live[row]
            || self.specs[q].1.binary_search(&(row as u32)).is_ok()
            || self
                .filters
                .get(q)
                .is_some_and(|f| f.is_some_and(|f| !f.allows(self.attributes, row)))
        {
            return;
        }
        part.cands[q].push((row as u32, ub));
        part.bars[q].offer(y - r);
        part.bar[q] = part.bars[q].bar();
    }
}

fn scan_portable(job: &Job, part: &mut Part, blocks: Range<usize>) {
    let (t, g) = (job.table, job.groups);
    let (data, scale, pc, qc) = (t.data(), t.scale(), t.p_coef(), t.q_coef());
    for blk in blocks {
        let base = blk * BLOCK;
        let rows = (job.rows - base).min(BLOCK);
        let block = &data[blk * g * BLOCK * 4..(blk + 1) * g * BLOCK * 4];
        for q in 0..job.specs.len() {
            let words = &job.words[q * g..(q + 1) * g];
            for l in 0..rows {
                let mut a = 0i32;
                for (gi, w) in words.iter().enumerate() {
                    let p = w.to_le_bytes();
                    let c = &block[gi * BLOCK * 4 + l * 4..gi * BLOCK * 4 + l * 4 + 4];
                    for i in 0..4 {
                        a += (c[i] as i32 - 128) * (p[i] as i8 as i32);
                    }
                }
                let row = base + l;
                let y = a as f32 * (scale[row] * job.t[q]);
                let r = job.qn[q] * pc[row] + (job.dq[q] * qc[row] + ETA);
                if y + r >= part.bar[q] {
                    job.hit(part, q, row, y, r);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Job, Part, BLOCK, CHUNK, ETA};

    /// Blocks of 16 rows, queries in chunks of up to 8 held in zmm
    /// accumulators while the block's groups stream past.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn scan_vnni(job: &Job, part: &mut Part, blocks: Range<usize>) {
        let b = job.specs.len();
        for blk in blocks {
            let mut q0 = 0;
            while q0 < b {
                let j = (b - q0).min(CHUNK);
                // SAFETY: forwarded from the caller (`Job::run` checked the
                // slices for these blocks); q0 + j <= b.
                unsafe {
                    match j {
                        1 => block::<1>(job, part, blk, q0),
                        2 => block::<2>(job, part, blk, q0),
                        3 => block::<3>(job, part, blk, q0),
                        4 => block::<4>(job, part, blk, q0),
                        5 => block::<5>(job, part, blk, q0),
                        6 => block::<6>(job, part, blk, q0),
                        7 => block::<7>(job, part, blk, q0),
                        _ => block::<8>(job, part, blk, q0),
                    }
                }
                q0 += j;
            }
        }
    }

    /// Blocks of 16 rows as two halves of 8, queries in chunks of up to 4
    /// (8 ymm accumulators).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scan_avx2(job: &Job, part: &mut Part, blocks: Range<usize>) {
        let b = job.specs.len();
        for blk in blocks {
            let mut q0 = 0;
            while q0 < b {
                let j = (b - q0).min(4);
                // SAFETY: as in `scan_vnni`.
                unsafe {
                    match j {
                        1 => block_avx2::<1>(job, part, blk, q0),
                        2 => block_avx2::<2>(job, part, blk, q0),
                        3 => block_avx2::<3>(job, part, blk, q0),
                        _ => block_avx2::<4>(job, part, blk, q0),
                    }
                }
                q0 += j;
            }
        }
    }

    /// Σ cᵢ·pᵢ without the u8 offset: c = u ^ 0x80 as i8, then
    /// |c| (u8) × p·sign(c) (i8) in pairs: at most 2·127·127 < 2¹⁵, so
    /// `vpmaddubsw` never saturates; `vpmaddwd` by ones sums the pairs.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2<const J: usize>(job: &Job, part: &mut Part, blk: usize, q0: usize) {
        let (t, g) = (job.table, job.groups);
        let base = blk * BLOCK;
        let valid: u32 = if base + BLOCK <= job.rows {
            0xffff
        } else {
            (1u32 << (job.rows - base)) - 1
        };
        // SAFETY: as in `block`.
        unsafe {
            let data = t.data().as_ptr().add(blk * g * BLOCK * 4);
            let words = job.words.as_ptr().add(q0 * g);
            let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
            let mut acc = [[_mm256_setzero_si256(); 2]; J];
            for gi in 0..g {
                for h in 0..2 {
                    let c = _mm256_xor_si256(
                        _mm256_loadu_si256(data.add(gi * BLOCK * 4 + h * 32).cast()),
                        flip,
                    );
                    let mag = _mm256_abs_epi8(c);
                    for (jj, a) in acc.iter_mut().enumerate() {
                        let p = _mm256_set1_epi32(*words.add(jj * g + gi));
                        let pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(p, c));
                        a[h] = _mm256_add_epi32(a[h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            let eta = _mm256_set1_ps(ETA);
            for h in 0..2 {
                let row0 = base + h * 8;
                let sc = _mm256_loadu_ps(t.scale().as_ptr().add(row0));
                let pc = _mm256_loadu_ps(t.p_coef().as_ptr().add(row0));
                let qc = _mm256_loadu_ps(t.q_coef().as_ptr().add(row0));
                for (jj, a) in acc.iter().enumerate() {
                    let q = q0 + jj;
                    let y = _mm256_mul_ps(
                        _mm256_cvtepi32_ps(a[h]),
                        _mm256_mul_ps(sc, _mm256_set1_ps(job.t[q])),
                    );
                    let r = _mm256_fmadd_ps(
                        _mm256_set1_ps(job.qn[q]),
                        pc,
                        _mm256_fmadd_ps(_mm256_set1_ps(job.dq[q]), qc, eta),
                    );
                    let ub = _mm256_add_ps(y, r);
                    let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(ub, _mm256_set1_ps(part.bar[q]));
                    let mut hits = _mm256_movemask_ps(ge) as u32 & (valid >> (h * 8)) & 0xff;
                    if hits == 0 {
                        continue;
                    }
                    let (mut ys, mut rs) = ([0f32; 8], [0f32; 8]);
                    _mm256_storeu_ps(ys.as_mut_ptr(), y);
                    _mm256_storeu_ps(rs.as_mut_ptr(), r);
                    while hits != 0 {
                        let l = hits.trailing_zeros() as usize;
                        hits &= hits - 1;
                        job.hit(part, q, row0 + l, ys[l], rs[l]);
                    }
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block<const J: usize>(job: &Job, part: &mut Part, blk: usize, q0: usize) {
        let (t, g) = (job.table, job.groups);
        let base = blk * BLOCK;
        let valid: u16 = if base + BLOCK <= job.rows {
            u16::MAX
        } else {
            (1u16 << (job.rows - base)) - 1
        };
        // SAFETY: the block lies inside data, scale, p_coef and q_coef, and
        // queries q0..q0 + J inside words and the per-query arrays (checked
        // in `Job::run` and by the caller).
        unsafe {
            let data = t.data().as_ptr().add(blk * g * BLOCK * 4);
            let words = job.words.as_ptr().add(q0 * g);
            // Even and odd groups in separate accumulators: two chains of
            // `vpdpbusd` per query, so a small batch is not latency-bound.
            let mut acc = [_mm512_setzero_si512(); J];
            let mut odd = [_mm512_setzero_si512(); J];
            let mut gi = 0;
            while gi + 2 <= g {
                let v = _mm512_loadu_si512(data.add(gi * BLOCK * 4).cast());
                let v1 = _mm512_loadu_si512(data.add((gi + 1) * BLOCK * 4).cast());
                for jj in 0..J {
                    let w = words.add(jj * g + gi);
                    acc[jj] = _mm512_dpbusd_epi32(acc[jj], v, _mm512_set1_epi32(*w));
                    odd[jj] = _mm512_dpbusd_epi32(odd[jj], v1, _mm512_set1_epi32(*w.add(1)));
                }
                gi += 2;
            }
            if gi < g {
                let v = _mm512_loadu_si512(data.add(gi * BLOCK * 4).cast());
                for (jj, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_epi32(*words.add(jj * g + gi));
                    *a = _mm512_dpbusd_epi32(*a, v, w);
                }
            }
            for (a, o) in acc.iter_mut().zip(odd) {
                *a = _mm512_add_epi32(*a, o);
            }
            let sc = _mm512_loadu_ps(t.scale().as_ptr().add(base));
            let pc = _mm512_loadu_ps(t.p_coef().as_ptr().add(base));
            let qc = _mm512_loadu_ps(t.q_coef().as_ptr().add(base));
            let eta = _mm512_set1_ps(ETA);
            for (jj, a) in acc.iter().enumerate() {
                let q = q0 + jj;
                let a = _mm512_sub_epi32(*a, _mm512_set1_epi32(job.offset[q]));
                let y = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(a),
                    _mm512_mul_ps(sc, _mm512_set1_ps(job.t[q])),
                );
                let r = _mm512_fmadd_ps(
                    _mm512_set1_ps(job.qn[q]),
                    pc,
                    _mm512_fmadd_ps(_mm512_set1_ps(job.dq[q]), qc, eta),
                );
                let ub = _mm512_add_ps(y, r);
                let mut hits =
                    _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(valid, ub, _mm512_set1_ps(part.bar[q]));
                if hits == 0 {
                    continue;
                }
                let (mut ys, mut rs) = ([0f32; 16], [0f32; 16]);
                _mm512_storeu_ps(ys.as_mut_ptr(), y);
                _mm512_storeu_ps(rs.as_mut_ptr(), r);
                while hits != 0 {
                    let l = hits.trailing_zeros() as usize;
                    hits &= hits - 1;
                    job.hit(part, q, base + l, ys[l], rs[l]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
