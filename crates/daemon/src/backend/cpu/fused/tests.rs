use super::*;
use crate::model::attributes::{Attributes, RowFilter};
use crate::model::demo::Rng;

/// The reference: every live, non-excluded row scored in f64, fully sorted
/// by (score desc, id asc), cut at k.
fn reference(items: &ItemTable, q: &[f32], exclude: &[u32], k: usize) -> Vec<(u64, f64)> {
    let mut all: Vec<(u64, f64)> = (0..items.rows() as u32)
        .filter(|&r| items.is_live(r) && exclude.binary_search(&r).is_err())
        .map(|r| {
            let s = q
                .iter()
                .zip(items.embedding(r))
                .fold(0.0f64, |acc, (&a, &b)| acc + a as f64 * b as f64);
            (items.id(r), s)
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// A table with shuffled ids (ties are not already in id order), every
/// seventh row a copy of row 0, every fifth row deleted; the int8 scan's
/// tests use it too.
pub(in crate::backend::cpu) fn table(
    rng: &mut Rng,
    n: usize,
    d: usize,
    value: impl Fn(&mut Rng) -> f32,
) -> ItemTable {
    let mut ids: Vec<u64> = (0..n as u64).map(|i| 10 + 3 * i).collect();
    for i in (1..n).rev() {
        ids.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut emb: Vec<f32> = (0..n * d).map(|_| value(rng)).collect();
    for r in (0..n).step_by(7).skip(1) {
        let (a, b) = emb.split_at_mut(r * d);
        b[..d].copy_from_slice(&a[..d]);
    }
    let mut items = ItemTable::new(d, ids.clone(), emb).unwrap();
    for r in (0..n).step_by(5) {
        items.delete(ids[r], 2);
    }
    items
}

fn excludes(rng: &mut Rng, b: usize, n: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|_| (0..n as u32).filter(|_| rng.below(4) == 0).collect())
        .collect()
}

/// Integer-valued tables and queries keep every score exact in f32 (sums of
/// small integers, never -0), so the answer must equal the reference bit for
/// bit: ids, order and scores, with ties everywhere (zero queries tie every
/// row; duplicated rows; coarse values). Every ISA this CPU has, both
/// kernels at every batch size (dot products row by row, alone or in tiles
/// of four rows, and blocked with padded panels), one to three row ranges,
/// k from 1 to past N, N not a multiple of the block.
#[test]
fn exact_on_integer_tables_with_ties_exclusions_and_deleted_rows() {
    let mut rng = Rng::new(11);
    for isa in Isa::available() {
        for (n, d) in [(1, 4), (37, 8), (1300, 19), (2 * BLOCK_ROWS + 5, 64)] {
            let items = table(&mut rng, n, d, |r| 1.0 + r.below(3) as f32);
            for b in [1, 3, 8, 9, 40] {
                let queries: Vec<Vec<f32>> = (0..b)
                    .map(|i| match i % 4 {
                        0 => vec![0.0; d],
                        1 => (0..d).map(|_| rng.below(3) as f32 - 1.0).collect(),
                        2 => (0..d).map(|_| rng.below(2) as f32).collect(),
                        _ => (0..d).map(|_| rng.below(9) as f32 - 4.0).collect(),
                    })
                    .collect();
                let qs: Vec<f32> = queries.iter().flatten().copied().collect();
                for k in [1, 3, 10, 100, 1000, n + 5] {
                    let ex = excludes(&mut rng, b, n);
                    let specs: Vec<(usize, &[u32])> =
                        ex.iter().map(|e| (k, e.as_slice())).collect();
                    for (threads, kernel) in [1, 3].into_iter().flat_map(|t| {
                        [Kernel::Dots, Kernel::FourRows, Kernel::Blocked].map(|k| (t, k))
                    }) {
                        let got =
                            score_topk_with_kernel(isa, kernel, threads, &items, &qs, &specs, &[]);
                        for (qi, q) in queries.iter().enumerate() {
                            let want: Vec<Scored> = reference(&items, q, &ex[qi], k)
                                .into_iter()
                                .map(|(id, s)| Scored {
                                    id,
                                    score: s as f32,
                                })
                                .collect();
                            assert_eq!(
                                got[qi], want,
                                "{isa:?} {kernel:?}, n {n}, d {d}, b {b}, k {k}, {threads} ranges, query {qi}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A table's attribute `a`, drawn so that `a == 0` keeps about `keep` of
/// the rows.
pub(in crate::backend::cpu) fn with_attribute(items: &mut ItemTable, rng: &mut Rng, keep: f64) {
    let n = items.rows();
    let a: Vec<i64> = (0..n)
        .map(|_| {
            if rng.uniform() < keep {
                0
            } else {
                1 + rng.below(5) as i64
            }
        })
        .collect();
    let b: Vec<i64> = (0..n).map(|r| (r % 3) as i64).collect();
    items
        .set_attributes(Attributes::new(vec![("a".into(), a), ("b".into(), b)]).unwrap())
        .unwrap();
}

/// Filters inside the scan: a row a query's filter refuses never enters
/// its list, and the list is the reference's over the rows that pass (ids,
/// order and scores bit for bit on integer tables), for filters keeping
/// about 50%, 5%, 0.5% and none of the rows, two clauses, queries of one
/// batch with different filters and none, every ISA, both kernels.
#[test]
fn filtered_lists_are_the_reference_over_the_passing_rows() {
    use rankd_client::types::{Filter, FilterValues};
    let mut rng = Rng::new(17);
    for isa in Isa::available() {
        for keep in [0.5, 0.05, 0.005, 0.0] {
            let (n, d) = (3 * BLOCK_ROWS + 11, 16);
            let mut items = table(&mut rng, n, d, |r| 1.0 + r.below(3) as f32);
            with_attribute(&mut items, &mut rng, keep);
            let filters: Vec<Option<RowFilter>> = [
                Some([("a".to_string(), FilterValues::One(0))].into()),
                None,
                Some(
                    [
                        ("a".to_string(), FilterValues::Any(vec![0, 2])),
                        ("b".to_string(), FilterValues::Any(vec![1, 2])),
                    ]
                    .into(),
                ),
            ]
            .into_iter()
            .map(|f: Option<Filter>| {
                f.map(|f| RowFilter::resolve(&f, items.attributes(), "c").unwrap())
            })
            .collect();
            for b in [3, 12] {
                let queries: Vec<Vec<f32>> = (0..b)
                    .map(|_| (0..d).map(|_| rng.below(9) as f32 - 4.0).collect())
                    .collect();
                let qs: Vec<f32> = queries.iter().flatten().copied().collect();
                let fs: Vec<Option<&RowFilter>> = (0..b).map(|q| filters[q % 3].as_ref()).collect();
                for k in [1, 10, 100] {
                    let ex = excludes(&mut rng, b, n);
                    let specs: Vec<(usize, &[u32])> =
                        ex.iter().map(|e| (k, e.as_slice())).collect();
                    let got = score_topk_with_filters(isa, 2, &items, &qs, &specs, &fs);
                    for (qi, q) in queries.iter().enumerate() {
                        // Refused rows are as good as excluded.
                        let mut refused: Vec<u32> = (0..n as u32)
                            .filter(|&r| {
                                ex[qi].binary_search(&r).is_ok()
                                    || fs[qi]
                                        .is_some_and(|f| !f.allows(items.attributes(), r as usize))
                            })
                            .collect();
                        refused.sort_unstable();
                        let want: Vec<Scored> = reference(&items, q, &refused, k)
                            .into_iter()
                            .map(|(id, s)| Scored {
                                id,
                                score: s as f32,
                            })
                            .collect();
                        assert_eq!(
                            got[qi], want,
                            "{isa:?}, keep {keep}, b {b}, k {k}, query {qi}"
                        );
                    }
                }
            }
        }
    }
}

/// Random real-valued tables against the f64 reference within a stated
/// tolerance: f32 sums of d products in a different order differ from f64
/// by at most about d·ε·Σ|aᵢbᵢ|, here well under 1e-4. Each returned item
/// must be live and not excluded, its score within tolerance of its own f64
/// score, and the list's scores within tolerance of the reference's at
/// every rank (ids may swap only between near-equal scores).
#[test]
fn matches_an_f64_scan_on_random_tables() {
    let mut rng = Rng::new(5);
    for isa in Isa::available() {
        for (n, d, b) in [
            (3001, 64, 1),
            (2000, 32, 8),
            (2 * BLOCK_ROWS + 77, 64, 33),
            (999, 24, 70),
        ] {
            let items = table(&mut rng, n, d, |r| r.uniform() as f32 - 0.5);
            let qs: Vec<f32> = (0..b * d).map(|_| rng.uniform() as f32 - 0.5).collect();
            let ex = excludes(&mut rng, b, n);
            for k in [1, 10, 250, 1000] {
                let specs: Vec<(usize, &[u32])> = ex.iter().map(|e| (k, e.as_slice())).collect();
                let got = score_topk_with(isa, 2, &items, &qs, &specs);
                for qi in 0..b {
                    let q = &qs[qi * d..(qi + 1) * d];
                    let want = reference(&items, q, &ex[qi], k);
                    let tag = format!("{isa:?}, n {n}, d {d}, b {b}, k {k}, query {qi}");
                    assert_eq!(got[qi].len(), want.len(), "{tag}");
                    for (g, w) in got[qi].iter().zip(&want) {
                        let row = items.row_of(g.id).unwrap();
                        assert!(
                            items.is_live(row) && ex[qi].binary_search(&row).is_err(),
                            "{tag}"
                        );
                        let own = q
                            .iter()
                            .zip(items.embedding(row))
                            .fold(0.0f64, |acc, (&a, &b)| acc + a as f64 * b as f64);
                        assert!((g.score as f64 - own).abs() < 1e-4, "{tag}: {g:?} vs {own}");
                        assert!((g.score as f64 - w.1).abs() < 1e-4, "{tag}: {g:?} vs {w:?}");
                    }
                    assert!(
                        got[qi].windows(2).all(|p| p[0].score > p[1].score
                            || (p[0].score == p[1].score && p[0].id < p[1].id)),
                        "{tag}: not in rankd's order"
                    );
                }
            }
        }
    }
}

/// k = 0 and an empty batch answer nothing, without scanning into a heap.
#[test]
fn empty_asks_give_empty_answers() {
    let mut rng = Rng::new(2);
    let items = table(&mut rng, 100, 8, |r| r.uniform() as f32);
    assert!(score_topk(&items, &[], &[]).is_empty());
    let qs = vec![0.5f32; 8 * 10];
    let specs: Vec<(usize, &[u32])> = (0..10).map(|i| (i % 2, &[][..])).collect();
    let got = score_topk(&items, &qs, &specs);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.len(), i % 2);
    }
}
