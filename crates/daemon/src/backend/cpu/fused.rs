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

    /// The kernel a batch of `b` queries runs: the smallest batches one
    /// dot product per (row, query), then tiles of four rows whose dot
    /// products are summed together, then the register-blocked kernel the
    /// FMA units bound. Chosen by measurement: `cargo bench --bench forward
    /// -- --crossover` times the three at every batch size up to 16
    /// (benches/RESULTS.md, "The scan's kernel by batch size").
    pub fn kernel(self, b: usize) -> Kernel {
        // (largest batch of Dots, largest of FourRows): four rows pay once
        // a row meets several queries, until the blocked kernel's panels
        // are full enough; the portable build's four-row tiles are slower
        // than its dot products.
        let (dots, four_rows) = match self {
            Isa::Avx512 => (1, 8),
            Isa::Avx2Fma => (1, 4),
            Isa::Portable => (6, 6),
        };
        if b <= dots {
            Kernel::Dots
        } else if b <= four_rows {
            Kernel::FourRows
        } else {
            Kernel::Blocked
        }
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
    let kernel = isa.kernel(specs.len());
    score_topk_with_kernel(isa, kernel, threads, items, qs, specs, filters)
}

/// The scan's kernels (see [`Isa::kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Each row read once and dotted with every query: a vector of partial
    /// sums, then a horizontal sum, per (row, query).
    Dots,
    /// The same dot products, four rows × W/4 queries at a time, their
    /// horizontal sums done together (the same bits as `Dots`); `Dots`
    /// where `d` is not a multiple of the vector width.
    FourRows,
    /// Register tiles of rows × panels of packed queries.
    Blocked,
}

/// [`score_topk_with_filters`] with a chosen kernel, whatever the batch size
/// (the benchmark behind [`Isa::kernel`] times each). The scores' last bits
/// differ between `Blocked` and the other two, so [`rescore`] matches the
/// kernel the batch size picks.
pub fn score_topk_with_kernel(
    isa: Isa,
    kernel: Kernel,
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
    let blocked = kernel == Kernel::Blocked;
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
        four_rows: kernel == Kernel::FourRows,
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
    let row_dot = isa.kernel(batch) != Kernel::Blocked;
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
    /// The queries packed for the blocked kernel; empty for the others.
    packed: Vec<f32>,
    /// Whether row-by-row batches run in tiles of four rows.
    four_rows: bool,
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
            _ => unsafe { scan_rows::<Portable, 4, 8, 2>(self, scan, rows) },
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
    /// The sums of W vectors at once: for r < 4 and j < W/4, lane 4·j + r
    /// holds `hsum(v[r·W/4 + j])`, with hsum's own additions in hsum's own
    /// order, so each lane has the bits `hsum` gives. `v` points at W
    /// vectors.
    unsafe fn hsums(v: *const Self::V) -> Self::V;
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
unsafe fn scan_rows<S: Simd, const MR: usize, const MR1: usize, const PER: usize>(
    job: &Job,
    scan: &mut Scan,
    rows: Range<usize>,
) {
    // SAFETY (for the kernels below): rows < ids.len() and emb holds
    // ids.len()·d values (checked in `Job::run`); qs holds specs.len()·d and
    // packed padded·d; bar and bar_id hold padded entries.
    unsafe {
        if job.packed.is_empty() && job.four_rows && job.d.is_multiple_of(S::W) {
            four_rows::<S, PER>(job, scan, rows)
        } else if job.packed.is_empty() {
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

/// Row by row in tiles of four rows × W/4 queries: the W dot products of a
/// tile accumulate lane-wise as `dot`'s do and are summed together
/// (`Simd::hsums`), so a score costs about one vector addition instead of a
/// horizontal sum, keeps `dot`'s bits, and the tile's W scores meet their
/// bars in one comparison. For batches the blocked kernel's panels would
/// leave mostly empty; `d` a multiple of W.
#[inline(always)]
unsafe fn four_rows<S: Simd, const PER: usize>(job: &Job, scan: &mut Scan, rows: Range<usize>) {
    let (d, b, w) = (job.d, job.specs.len(), S::W);
    debug_assert_eq!(4 * PER, w);
    let groups = b.div_ceil(PER);
    let emb = job.emb.as_ptr();
    // The last group's missing queries read zeros.
    let zeros = vec![0f32; d];
    let query = |i: usize| {
        if i < b {
            // SAFETY: qs holds b·d values.
            unsafe { job.qs.as_ptr().add(i * d) }
        } else {
            zeros.as_ptr()
        }
    };
    // Each group's bars as its tile lays them out: lane 4·j + r holds query
    // j's bar (NaN past the last query: nothing clears it).
    let lay = |scan: &Scan, g: usize| -> [f32; 16] {
        let mut l = [f32::NAN; 16];
        for j in 0..PER {
            if g * PER + j < b {
                l[4 * j..4 * j + 4].fill(scan.bar[g * PER + j]);
            }
        }
        l
    };
    let mut bars: Vec<[f32; 16]> = (0..groups).map(|g| lay(scan, g)).collect();
    let mut row = rows.start;
    while row + 4 <= rows.end {
        for g in 0..groups {
            let q: [*const f32; PER] = std::array::from_fn(|j| query(g * PER + j));
            // SAFETY: see `scan_rows`; rows row..row + 4 are in the table,
            // every query pointer holds d values.
            unsafe {
                let e = emb.add(row * d);
                let mut acc = [[S::zero(); PER]; 4];
                let mut t = 0;
                while t < d {
                    let qv: [S::V; PER] = std::array::from_fn(|j| S::load(q[j].add(t)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = S::load(e.add(r * d + t));
                        for j in 0..PER {
                            acc[j] = S::fma(x, qv[j], acc[j]);
                        }
                    }
                    t += w;
                }
                let flat: [S::V; 16] = std::array::from_fn(|i| {
                    if i < 4 * PER {
                        acc[i / PER][i % PER]
                    } else {
                        S::zero()
                    }
                });
                let sums = S::hsums(flat.as_ptr());
                let mut hits = S::ge(sums, S::load(bars[g].as_ptr()));
                if hits == 0 {
                    continue;
                }
                let mut lanes = [0f32; 16];
                S::store(lanes.as_mut_ptr(), sums);
                while hits != 0 {
                    let l = hits.trailing_zeros() as usize;
                    hits &= hits - 1;
                    let (qi, r) = (g * PER + l / 4, l % 4);
                    // The bar may have risen since the mask.
                    if scan.clears(qi, row + r, lanes[l]) {
                        scan.enter(qi, row + r, lanes[l]);
                    }
                }
                bars[g] = lay(scan, g);
            }
        }
        row += 4;
    }
    // SAFETY: see `scan_rows`.
    unsafe { row_by_row::<S>(job, scan, row..rows.end) }
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
    unsafe fn hsums(v: *const Self::V) -> Self::V {
        // SAFETY: the caller passes 8 vectors.
        std::array::from_fn(|l| unsafe { Self::hsum(*v.add((l % 4) * 2 + l / 4)) })
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
        unsafe { scan_rows::<Avx512, 12, 24, 4>(job, scan, rows) }
    }

    /// 6-row tiles: 12 accumulators, two panel vectors and a broadcast in
    /// the 16 ymm registers (12 rows × one vector for batches up to 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scan_avx2(job: &Job, scan: &mut Scan, rows: Range<usize>) {
        // SAFETY: forwarded from the caller.
        unsafe { scan_rows::<Avx2Fma, 6, 12, 2>(job, scan, rows) }
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
        /// The halves added, then Avx2Fma's order on the 8 sums:
        /// ((p0 + p2) + (p1 + p3)) with p_i = (a_i + a_{i+8}) + (a_{i+4} +
        /// a_{i+12}).
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            unsafe {
                let h = _mm256_add_ps(
                    _mm512_castps512_ps256(v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                );
                let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }
        }
        /// Each step adds the halves `hsum` adds, for all 16 vectors at
        /// once: 256-bit halves (16 vectors to 8), 128-bit quarters (to 4),
        /// then pairs and neighbours within each quarter.
        #[inline(always)]
        unsafe fn hsums(v: *const __m512) -> __m512 {
            unsafe {
                let v = |i: usize| *v.add(i);
                // u[m]: lanes 0..8 are v[2m]'s a_i + a_{i+8}, 8..16 v[2m+1]'s.
                let u: [__m512; 8] = std::array::from_fn(|m| {
                    let (a, b) = (v(2 * m), v(2 * m + 1));
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                        _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
                    )
                });
                // w[p]: quarter c holds v[4p + c]'s four sums p_i + p_{i+4}.
                let w: [__m512; 4] = std::array::from_fn(|p| {
                    let (a, b) = (u[2 * p], u[2 * p + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                        _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
                    )
                });
                // z[s]: quarter c holds (q0 + q2, q1 + q3) of v[8s + c], then
                // of v[8s + 4 + c].
                let z: [__m512; 2] = std::array::from_fn(|s| {
                    let (a, b) = (w[2 * s], w[2 * s + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                        _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
                    )
                });
                // Quarter c: the sums of v[c], v[4 + c], v[8 + c], v[12 + c].
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0b10_00_10_00>(z[0], z[1]),
                    _mm512_shuffle_ps::<0b11_01_11_01>(z[0], z[1]),
                )
            }
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
        /// `hsum`'s three steps for 8 vectors at once: 128-bit halves (8
        /// vectors to 4), then pairs and neighbours within each half.
        #[inline(always)]
        unsafe fn hsums(v: *const __m256) -> __m256 {
            unsafe {
                let v = |i: usize| *v.add(i);
                // u[m]: half 0 is v[2m]'s a_i + a_{i+4}, half 1 v[2m+1]'s.
                let u: [__m256; 4] = std::array::from_fn(|m| {
                    let (a, b) = (v(2 * m), v(2 * m + 1));
                    _mm256_add_ps(
                        _mm256_permute2f128_ps::<0x20>(a, b),
                        _mm256_permute2f128_ps::<0x31>(a, b),
                    )
                });
                // z[s]: half h holds (p0 + p2, p1 + p3) of v[4s + h], then of
                // v[4s + 2 + h].
                let z: [__m256; 2] = std::array::from_fn(|s| {
                    let (a, b) = (u[2 * s], u[2 * s + 1]);
                    _mm256_add_ps(
                        _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
                        _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
                    )
                });
                // Half h: the sums of v[h], v[2 + h], v[4 + h], v[6 + h].
                _mm256_add_ps(
                    _mm256_shuffle_ps::<0b10_00_10_00>(z[0], z[1]),
                    _mm256_shuffle_ps::<0b11_01_11_01>(z[0], z[1]),
                )
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
