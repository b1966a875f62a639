//! The fused CPU scan: scores the item table against a batch of queries and
//! keeps each query's top-k in the same pass, testing every score against its
//! query's bar while it is still in a register, so neither the B×N score
//! matrix nor a per-block score buffer exists. Queries are packed once per
//! batch; threads split the table's rows and their top-ks merge at the end.
//! The instruction set (AVX-512, AVX2+FMA, portable) is picked at run time.

use std::ops::Range;

use rayon::prelude::*;

use crate::backend::topk::TopK;
use crate::backend::Scored;
use crate::model::attributes::{Attributes, RowFilter};
use crate::model::ItemTable;

/// Batches up to this size score row by row (one row read, dotted with every
/// query): table bandwidth bounds them. Larger ones run the register-blocked
/// kernel, which the FMA units bound.
const ROW_DOT_MAX: usize = 8;

/// Rows per cache block of the blocked kernel: 480 × 64 f32 is 120 KiB, in
/// L2 while every query panel passes over it. A multiple of each kernel's
/// tile height (24, 12, 8, 6, 4), so only a thread's last block has a
/// ragged tail.
const BLOCK_ROWS: usize = 480;

/// Fewer rows than this per thread and the split costs more than it saves.
const MIN_ROWS_PER_THREAD: usize = 8192;

/// The instruction set a scan runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

impl Isa {
    /// The widest this CPU runs.
    pub fn detect() -> Isa {
        Isa::available()[0]
    }

    /// Every instruction set this CPU runs, widest first.
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2Fma);
            }
        }
        v.push(Isa::Portable);
        v
    }

    /// Queries per panel of the blocked kernel: two vectors, or one when
    /// the batch fits in one (then taller tiles keep the FMAs busy).
    fn panel(self, b: usize) -> usize {
        let w = match self {
            Isa::Avx512 => 16,
            Isa::Avx2Fma | Isa::Portable => 8,
        };
        if b <= w {
            w
        } else {
            2 * w
        }
    }
}

/// Scores every live row against each query and keeps each query's top-k
/// (higher score first, ties to the smaller id). `qs` is [B, d] row-major;
/// `specs` gives each query's k and sorted excluded rows.
pub fn score_topk(items: &ItemTable, qs: &[f32], specs: &[(usize, &[u32])]) -> Vec<Vec<Scored>> {
    score_topk_filtered(items, qs, specs, &[])
}

/// [`score_topk`] where query `q` keeps only the rows `filters[q]` allows
/// (`filters` empty, or `None` for a query: every row). A row the filter
/// refuses never enters that query's list; the test runs only for rows
/// whose score clears the query's bar.
pub fn score_topk_filtered(
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
    filters: &[Option<&RowFilter>],
) -> Vec<Vec<Scored>> {
    let threads = rayon::current_num_threads().min(items.rows().div_ceil(MIN_ROWS_PER_THREAD));
    score_topk_with_filters(Isa::detect(), threads, items, qs, specs, filters)
}

/// [`score_topk`] with a chosen instruction set and number of row ranges.
pub fn score_topk_with(
    isa: Isa,
    threads: usize,
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
) -> Vec<Vec<Scored>> {
    score_topk_with_filters(isa, threads, items, qs, specs, &[])
}

/// [`score_topk_filtered`] with a chosen instruction set and number of row
/// ranges.
pub fn score_topk_with_filters(
    isa: Isa,
    threads: usize,
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
    filters: &[Option<&RowFilter>],
) -> Vec<Vec<Scored>> {
    let (d, b, n) = (items.dim(), specs.len(), items.rows());
    assert_eq!(qs.len(), b * d, "one query row per spec: this is a bug");
    if b == 0 {
        return Vec::new();
    }
    let blocked = b > ROW_DOT_MAX;
    let nr = isa.panel(b);
    let job = Job {
        emb: items.embeddings(),
        ids: items.ids(),
        live: items.live_mask(),
        attributes: items.attributes(),
        filters,
        d,
        qs,
        specs,
        packed: if blocked {
            pack(qs, b, d, nr)
        } else {
            Vec::new()
        },
        padded: if blocked { b.div_ceil(nr) * nr } else { b },
        nr,
    };
    // Whole blocks per thread, so tiles never straddle two threads.
    let per = n.div_ceil(BLOCK_ROWS).div_ceil(threads.max(1)) * BLOCK_ROWS;
    let ranges: Vec<Range<usize>> = (0..n.div_ceil(per.max(1)))
        .map(|t| t * per..((t + 1) * per).min(n))
        .collect();
    let parts: Vec<Vec<TopK>> = ranges
        .into_par_iter()
        .map(|rows| {
            let mut scan = Scan::new(&job);
            job.run(isa, &mut scan, rows);
            scan.heaps
        })
        .collect();
    let mut parts = parts.into_iter();
    let mut heaps = parts
        .next()
        .unwrap_or_else(|| specs.iter().map(|(k, _)| TopK::new(*k)).collect());
    for part in parts {
        heaps.iter_mut().zip(part).for_each(|(a, b)| a.merge(b));
    }
    heaps.into_iter().map(TopK::into_sorted).collect()
}

/// The scores [`score_topk_with`] gives `rows` for query `q` (d values) in a
/// batch of `batch` queries on `isa`, computed with the same operations in
/// the same order as the kernel that batch runs (row by row: lanes, a
/// horizontal sum, a tail; blocked: one FMA chain per lane), so the bits
/// agree. Appended to `out`.
pub fn rescore(
    isa: Isa,
    batch: usize,
    items: &ItemTable,
    q: &[f32],
    rows: &[u32],
    out: &mut Vec<f32>,
) {
    let (emb, d) = (items.embeddings(), items.dim());
    assert!(q.len() == d && rows.iter().all(|&r| (r as usize) < items.rows()));
    let row_dot = batch <= ROW_DOT_MAX;
    out.reserve(rows.len());
    match isa {
        // SAFETY: `available` lists an ISA only when the CPU has it; the rows
        // were checked to lie inside the table and q holds d values.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rescore_avx512(row_dot, emb, d, q, rows, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::rescore_avx2(row_dot, emb, d, q, rows, out) },
        // SAFETY: as above; portable code needs no CPU feature.
        _ => unsafe { rescore_rows::<Portable>(row_dot, emb, d, q, rows, out) },
    }
}

/// See [`rescore`]: `dot` for the row-by-row kernel, else the chain the
/// blocked kernel's lanes and ragged tail both compute.
#[inline(always)]
unsafe fn rescore_rows<S: Simd>(
    row_dot: bool,
    emb: &[f32],
    d: usize,
    q: &[f32],
    rows: &[u32],
    out: &mut Vec<f32>,
) {
    for &r in rows {
        // SAFETY: the caller checked r < rows and emb holds rows·d values.
        unsafe {
            let e = emb.as_ptr().add(r as usize * d);
            let s = if row_dot {
                dot::<S>(e, q.as_ptr(), d)
            } else {
                let mut s = 0f32;
                for t in 0..d {
                    s = S::fma1(*e.add(t), *q.as_ptr().add(t), s);
                }
                s
            };
            out.push(s);
        }
    }
}

/// Panels of `nr` queries, each [d][nr] (query j of panel p, element t at
/// p·d·nr + t·nr + j), zero past the last query.
fn pack(qs: &[f32], b: usize, d: usize, nr: usize) -> Vec<f32> {
    let panels = b.div_ceil(nr);
    let mut out = vec![0f32; panels * d * nr];
    for q in 0..b {
        let (p, j) = (q / nr, q % nr);
        for t in 0..d {
            out[p * d * nr + t * nr + j] = qs[q * d + t];
        }
    }
    out
}

/// One batch's inputs, shared by every thread.
struct Job<'a> {
    emb: &'a [f32],
    ids: &'a [u64],
    live: &'a [bool],
    attributes: &'a Attributes,
    /// Per query, the rows it may return (empty: all).
    filters: &'a [Option<&'a RowFilter>],
    d: usize,
    qs: &'a [f32],
    specs: &'a [(usize, &'a [u32])],
    /// The queries packed for the blocked kernel; empty for row-by-row.
    packed: Vec<f32>,
    /// Queries rounded up to whole panels.
    padded: usize,
    /// Queries per panel.
    nr: usize,
}

impl Job<'_> {
    fn run(&self, isa: Isa, scan: &mut Scan, rows: Range<usize>) {
        assert!(rows.end <= self.ids.len() && self.emb.len() == self.ids.len() * self.d);
        match isa {
            // SAFETY: `available` lists an ISA only when the CPU has it; the
            // kernels read inside the slices checked above and in `pack`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::scan_avx512(self, scan, rows) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { x86::scan_avx2(self, scan, rows) },
            // SAFETY: as above; portable code needs no CPU feature.
            _ => unsafe { scan_rows::<Portable, 4, 8>(self, scan, rows) },
        }
    }
}

/// One thread's top-ks and each query's bar, kept beside the heap so the
/// kernel compares against plain arrays.
struct Scan<'a> {
    job: &'a Job<'a>,
    heaps: Vec<TopK>,
    /// Each query's bar score; NaN (nothing clears it) for k = 0 and for the
    /// padding past the last query.
    bar: Vec<f32>,
    /// Each query's bar id: equal scores clear the bar with an id at most this.
    bar_id: Vec<u64>,
}

impl<'a> Scan<'a> {
    fn new(job: &'a Job<'a>) -> Self {
        let mut bar = vec![f32::NAN; job.padded];
        let mut bar_id = vec![0; job.padded];
        let heaps = job
            .specs
            .iter()
            .map(|(k, _)| TopK::new(*k))
            .collect::<Vec<_>>();
        for (q, h) in heaps.iter().enumerate() {
            if job.specs[q].0 > 0 {
                (bar[q], bar_id[q]) = h.bar();
            }
        }
        Self {
            job,
            heaps,
            bar,
            bar_id,
        }
    }

    /// A tie clears the bar only with a small enough id, so a run of equal
    /// scores (a zero query) never reaches the heap.
    #[inline(always)]
    fn clears(&self, q: usize, row: usize, s: f32) -> bool {
        let t = self.bar[q];
        s > t || (s == t && self.job.ids[row] <= self.bar_id[q])
    }

    /// A score that cleared the bar: offered unless the row is deleted,
    /// excluded for this query or refused by its filter.
    #[inline(never)]
    fn enter(&mut self, q: usize, row: usize, s: f32) {
        let job = self.job;
        if !job.live[row] || job.specs[q].1.binary_search(&(row as u32)).is_ok() {
            return;
        }
        if let Some(Some(f)) = job.filters.get(q) {
            if !f.allows(job.attributes, row) {
                return;
            }
        }
        let heap = &mut self.heaps[q];
        heap.offer(Scored {
            id: job.ids[row],
            score: s,
        });
        (self.bar[q], self.bar_id[q]) = heap.bar();
    }
}

/// The vector operations the kernels are written in, `W` f32 lanes wide.
/// Every method is inlined into a function compiled for its instruction set.
trait Simd {
    const W: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// a·b + c, lane-wise (fused where the ISA has it).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The same operation on one lane, so a row scored outside a vector
    /// gets the bits a lane would.
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32;
    unsafe fn hsum(v: Self::V) -> f32;
    /// Bit l set where a[l] >= b[l].
    unsafe fn ge(a: Self::V, b: Self::V) -> u32;
    /// Bit l set where a[l] > b[l].
    unsafe fn gt(a: Self::V, b: Self::V) -> u32;
    /// Bit l set where id <= bar[l].
    unsafe fn id_le(id: u64, bar: *const u64) -> u32;
}

/// Scans `rows` of the table: row by row for small batches, else the blocked
/// kernel with `MR`-row tiles of two-vector panels, or `MR1`-row tiles when
/// one vector holds the batch.
#[inline(always)]
unsafe fn scan_rows<S: Simd, const MR: usize, const MR1: usize>(
    job: &Job,
    scan: &mut Scan,
    rows: Range<usize>,
) {
    // SAFETY (for the kernels below): rows < ids.len() and emb holds
    // ids.len()·d values (checked in `Job::run`); qs holds specs.len()·d and
    // packed padded·d; bar and bar_id hold padded entries.
    unsafe {
        if job.packed.is_empty() {
            row_by_row::<S>(job, scan, rows)
        } else if job.nr == S::W {
            blocked::<S, MR1, 1>(job, scan, rows)
        } else {
            blocked::<S, MR, 2>(job, scan, rows)
        }
    }
}

#[inline(always)]
unsafe fn dot<S: Simd>(a: *const f32, b: *const f32, d: usize) -> f32 {
    unsafe {
        let mut acc = S::zero();
        let mut i = 0;
        while i + S::W <= d {
            acc = S::fma(S::load(a.add(i)), S::load(b.add(i)), acc);
            i += S::W;
        }
        let mut s = S::hsum(acc);
        while i < d {
            s = S::fma1(*a.add(i), *b.add(i), s);
            i += 1;
        }
        s
    }
}

/// Each row read once and dotted with every query: the memory-bound case.
#[inline(always)]
unsafe fn row_by_row<S: Simd>(job: &Job, scan: &mut Scan, rows: Range<usize>) {
    let (d, b) = (job.d, job.specs.len());
    let (emb, qs) = (job.emb.as_ptr(), job.qs.as_ptr());
    for row in rows {
        for q in 0..b {
            // SAFETY: see `scan_rows`.
            let s = unsafe { dot::<S>(emb.add(row * d), qs.add(q * d), d) };
            if scan.clears(q, row, s) {
                scan.enter(q, row, s);
            }
        }
    }
}

/// Tiles of MR rows × one panel of H·W queries held in H·MR accumulators:
/// per element of d, MR broadcasts of the rows and H loads of the panel
/// feed H·MR FMAs. Each finished score is tested against its query's bar in
/// the register it was computed in.
#[inline(always)]
unsafe fn blocked<S: Simd, const MR: usize, const H: usize>(
    job: &Job,
    scan: &mut Scan,
    rows: Range<usize>,
) {
    let (d, b, nr) = (job.d, job.specs.len(), H * S::W);
    let panels = job.padded / nr;
    let emb = job.emb.as_ptr();
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + BLOCK_ROWS).min(rows.end);
        for p in 0..panels {
            // SAFETY: see `scan_rows`; every offset below stays inside the
            // block's rows, panel p, and the padded bar arrays.
            unsafe {
                let qp = job.packed.as_ptr().add(p * d * nr);
                let mut bars: [S::V; H] =
                    std::array::from_fn(|h| S::load(scan.bar.as_ptr().add(p * nr + h * S::W)));
                let mut r0 = start;
                while r0 + MR <= end {
                    let mut acc = [[S::zero(); H]; MR];
                    let e = emb.add(r0 * d);
                    for t in 0..d {
                        let qv: [S::V; H] =
                            std::array::from_fn(|h| S::load(qp.add(t * nr + h * S::W)));
                        for r in 0..MR {
                            let x = S::splat(*e.add(r * d + t));
                            for h in 0..H {
                                acc[r][h] = S::fma(x, qv[h], acc[r][h]);
                            }
                        }
                    }
                    for r in 0..MR {
                        for h in 0..H {
                            let reach = S::ge(acc[r][h], bars[h]);
                            if reach == 0 {
                                continue;
                            }
                            let q0 = p * nr + h * S::W;
                            let row = r0 + r;
                            let mut hits = S::gt(acc[r][h], bars[h]);
                            let ties = reach & !hits;
                            if ties != 0 {
                                hits |= ties & S::id_le(job.ids[row], scan.bar_id.as_ptr().add(q0));
                            }
                            if hits == 0 {
                                continue;
                            }
                            let mut lanes = [0f32; 16];
                            S::store(lanes.as_mut_ptr(), acc[r][h]);
                            while hits != 0 {
                                let l = hits.trailing_zeros() as usize;
                                hits &= hits - 1;
                                // The bar may have risen since the mask.
                                if scan.clears(q0 + l, row, lanes[l]) {
                                    scan.enter(q0 + l, row, lanes[l]);
                                }
                            }
                            bars[h] = S::load(scan.bar.as_ptr().add(q0));
                        }
                    }
                    r0 += MR;
                }
                // The ragged tail, in the lanes' own order of operations.
                for row in r0..end {
                    for q in p * nr..((p + 1) * nr).min(b) {
                        let (e, qv) = (emb.add(row * d), job.qs.as_ptr().add(q * d));
                        let mut s = 0f32;
                        for t in 0..d {
                            s = S::fma1(*e.add(t), *qv.add(t), s);
                        }
                        if scan.clears(q, row, s) {
                            scan.enter(q, row, s);
                        }
                    }
                }
            }
        }
        start = end;
    }
}

/// Plain Rust, eight lanes: any CPU.
struct Portable;

impl Simd for Portable {
    const W: usize = 8;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: the caller passes 8 readable values.
        unsafe { p.cast::<[f32; 8]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        // SAFETY: the caller passes room for 8 values.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l] + c[l])
    }
    #[inline(always)]
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn hsum(v: Self::V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn ge(a: Self::V, b: Self::V) -> u32 {
        (0..8).fold(0, |m, l| m | (((a[l] >= b[l]) as u32) << l))
    }
    #[inline(always)]
    unsafe fn gt(a: Self::V, b: Self::V) -> u32 {
        (0..8).fold(0, |m, l| m | (((a[l] > b[l]) as u32) << l))
    }
    #[inline(always)]
    unsafe fn id_le(id: u64, bar: *const u64) -> u32 {
        // SAFETY: the caller passes 8 readable ids.
        let bar = unsafe { bar.cast::<[u64; 8]>().read_unaligned() };
        (0..8).fold(0, |m, l| m | (((id <= bar[l]) as u32) << l))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{rescore_rows, scan_rows, Job, Scan, Simd};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rescore_avx512(
        row_dot: bool,
        emb: &[f32],
        d: usize,
        q: &[f32],
        rows: &[u32],
        out: &mut Vec<f32>,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { rescore_rows::<Avx512>(row_dot, emb, d, q, rows, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rescore_avx2(
        row_dot: bool,
        emb: &[f32],
        d: usize,
        q: &[f32],
        rows: &[u32],
        out: &mut Vec<f32>,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { rescore_rows::<Avx2Fma>(row_dot, emb, d, q, rows, out) }
    }

    /// 12-row tiles: 24 accumulators, two panel vectors and a broadcast in
    /// the 32 zmm registers (24 rows × one vector for batches up to 16).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scan_avx512(job: &Job, scan: &mut Scan, rows: Range<usize>) {
        // SAFETY: forwarded from the caller.
        unsafe { scan_rows::<Avx512, 12, 24>(job, scan, rows) }
    }

    /// 6-row tiles: 12 accumulators, two panel vectors and a broadcast in
    /// the 16 ymm registers (12 rows × one vector for batches up to 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scan_avx2(job: &Job, scan: &mut Scan, rows: Range<usize>) {
        // SAFETY: forwarded from the caller.
        unsafe { scan_rows::<Avx2Fma, 6, 12>(job, scan, rows) }
    }

    struct Avx512;

    // SAFETY (every method): called only from `scan_avx512`, compiled with
    // AVX-512F and entered only when the CPU has it; pointers come from the
    // kernels with W readable (or writable) values.
    impl Simd for Avx512 {
        const W: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        unsafe fn ge(a: __m512, b: __m512) -> u32 {
            unsafe { _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, b) as u32 }
        }
        #[inline(always)]
        unsafe fn gt(a: __m512, b: __m512) -> u32 {
            unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b) as u32 }
        }
        #[inline(always)]
        unsafe fn id_le(id: u64, bar: *const u64) -> u32 {
            unsafe {
                let id = _mm512_set1_epi64(id as i64);
                let lo = _mm512_cmple_epu64_mask(id, _mm512_loadu_epi64(bar.cast()));
                let hi = _mm512_cmple_epu64_mask(id, _mm512_loadu_epi64(bar.add(8).cast()));
                lo as u32 | (hi as u32) << 8
            }
        }
    }

    struct Avx2Fma;

    // SAFETY (every method): called only from `scan_avx2`, compiled with
    // AVX2 and FMA and entered only when the CPU has both; pointers as above.
    impl Simd for Avx2Fma {
        const W: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn ge(a: __m256, b: __m256) -> u32 {
            unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(a, b)) as u32 }
        }
        #[inline(always)]
        unsafe fn gt(a: __m256, b: __m256) -> u32 {
            unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b)) as u32 }
        }
        #[inline(always)]
        unsafe fn id_le(id: u64, bar: *const u64) -> u32 {
            // Unsigned order through the signed compare: flip the top bits.
            unsafe {
                let flip = _mm256_set1_epi64x(i64::MIN);
                let id = _mm256_xor_si256(_mm256_set1_epi64x(id as i64), flip);
                let lo = _mm256_xor_si256(_mm256_loadu_si256(bar.cast()), flip);
                let hi = _mm256_xor_si256(_mm256_loadu_si256(bar.add(4).cast()), flip);
                let lo = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(id, lo)));
                let hi = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(id, hi)));
                !(lo as u32 | (hi as u32) << 4) & 0xff
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
