use super::*;
use crate::model::demo::Rng;

use crate::backend::cpu::fused::tests::table;

/// Row norms from 1e-3 to 1e3 (and a zero row), values of mixed signs.
fn spread(rng: &mut Rng, n: usize, d: usize) -> ItemTable {
    let mut items = table(rng, n, d, |r| r.normal() as f32);
    let emb: Vec<f32> = (0..n)
        .flat_map(|row| {
            let scale = if row % 11 == 3 {
                0.0
            } else {
                10f32.powf(rng.uniform() as f32 * 6.0 - 3.0)
            };
            items
                .embedding(row as u32)
                .iter()
                .map(|&x| x * scale)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut fresh = ItemTable::new(d, items.ids().to_vec(), emb).unwrap();
    for r in 0..n as u32 {
        if !items.is_live(r) {
            fresh.delete(items.id(r), 2);
        }
    }
    items = fresh;
    items
}

fn excludes(rng: &mut Rng, b: usize, n: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|_| (0..n as u32).filter(|_| rng.below(4) == 0).collect())
        .collect()
}

fn queries(rng: &mut Rng, b: usize, d: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|i| {
            let v: Vec<f32> = match i % 5 {
                0 if i > 0 => vec![0.0; d],
                1 => (0..d).map(|_| rng.below(3) as f32 - 1.0).collect(),
                2 => (0..d).map(|_| (rng.normal() * 100.0) as f32).collect(),
                _ => (0..d).map(|_| rng.normal() as f32).collect(),
            };
            v
        })
        .collect()
}

fn check(
    isa: Isa,
    kernel: Int8Kernel,
    threads: usize,
    items: &ItemTable,
    qs: &[f32],
    specs: &[(usize, &[u32])],
    tag: &str,
) -> usize {
    let want = fused::score_topk_with(isa, threads, items, qs, specs);
    // The f32 answer does not depend on how the rows are split.
    assert_eq!(
        fused::score_topk_with(isa, 1, items, qs, specs),
        want,
        "{tag}"
    );
    let got = score_topk_int8_with(isa, kernel, threads, items, qs, specs);
    assert!(!got.fell_back, "{tag}");
    for (q, (g, w)) in got.lists.iter().zip(&want).enumerate() {
        // Scores compared as bits: equal f32 values are not enough.
        let bits = |l: &[Scored]| {
            l.iter()
                .map(|s| (s.id, s.score.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(g), bits(w), "{tag}, query {q}");
    }
    got.rescored
}

/// The two modes on thousands of random queries: identical ids and
/// bit-identical scores, for every f32 instruction set (whose bits the int8
/// mode must reproduce) and every int8 kernel this CPU has, every f32
/// kernel (by batch size, `Isa::kernel`), k from 1 to past N, N not a
/// multiple of 16, one and three row ranges, deleted rows, exclusions,
/// duplicated rows, zero queries, and row norms from 0 and 1e-3 to 1e3.
#[test]
fn exact_int8_gives_the_f32_answer_bit_for_bit() {
    let mut rng = Rng::new(21);
    let mut asked = 0;
    for isa in Isa::available() {
        for kernel in Int8Kernel::available() {
            for (n, d) in [(1, 4), (37, 8), (1000, 19), (4099, 64)] {
                let items = spread(&mut rng, n, d);
                for b in [1, 3, 8, 9, 20] {
                    for k in [0, 1, 3, 10, 100, 1000, n + 5] {
                        let qs = queries(&mut rng, b, d);
                        let ex = excludes(&mut rng, b, n);
                        let specs: Vec<(usize, &[u32])> =
                            ex.iter().map(|e| (k, e.as_slice())).collect();
                        for threads in [1, 3] {
                            let tag = format!(
                                "{isa:?}/{kernel:?}, n {n}, d {d}, b {b}, k {k}, {threads} ranges"
                            );
                            check(isa, kernel, threads, &items, &qs, &specs, &tag);
                            asked += b;
                        }
                    }
                }
            }
        }
    }
    assert!(asked >= 2000, "{asked} queries");
}

/// With filters, the int8 scan still gives the f32 scan's answer bit for
/// bit: filters keeping about 50%, 5% and 0.5% of the rows, queries of one
/// batch with and without one.
#[test]
fn filtered_int8_lists_are_the_filtered_f32_lists() {
    use crate::backend::cpu::fused::tests::with_attribute;
    use crate::model::attributes::RowFilter;
    use rankd_client::types::{Filter, FilterValues};
    let mut rng = Rng::new(23);
    for isa in Isa::available() {
        for kernel in Int8Kernel::available() {
            for keep in [0.5, 0.05, 0.005] {
                let (n, d) = (4099, 32);
                let mut items = spread(&mut rng, n, d);
                with_attribute(&mut items, &mut rng, keep);
                let f: Filter = [("a".to_string(), FilterValues::One(0))].into();
                let rf = RowFilter::resolve(&f, items.attributes(), "c").unwrap();
                for b in [1, 9] {
                    let qs = queries(&mut rng, b, d);
                    let ex = excludes(&mut rng, b, n);
                    let fs: Vec<Option<&RowFilter>> =
                        (0..b).map(|q| (q % 4 != 1).then_some(&rf)).collect();
                    for k in [1, 10, 100] {
                        let specs: Vec<(usize, &[u32])> =
                            ex.iter().map(|e| (k, e.as_slice())).collect();
                        let want = fused::score_topk_with_filters(isa, 2, &items, &qs, &specs, &fs);
                        let got =
                            score_topk_int8_with_filters(isa, kernel, 2, &items, &qs, &specs, &fs);
                        assert!(!got.fell_back);
                        let bits = |l: &[Scored]| {
                            l.iter()
                                .map(|s| (s.id, s.score.to_bits()))
                                .collect::<Vec<_>>()
                        };
                        for (q, (g, w)) in got.lists.iter().zip(&want).enumerate() {
                            assert_eq!(
                                bits(g),
                                bits(w),
                                "{isa:?}/{kernel:?} keep {keep} b {b} k {k} q {q}"
                            );
                            if fs[q].is_some() {
                                assert!(g.iter().all(|s| rf.allows(
                                    items.attributes(),
                                    items.row_of(s.id).unwrap() as usize
                                )));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Coarse integer tables, where most scores tie: the ties with the k-th are
/// kept and broken by id as the f32 scan breaks them.
#[test]
fn exact_int8_keeps_every_tie() {
    let mut rng = Rng::new(8);
    for isa in Isa::available() {
        for kernel in Int8Kernel::available() {
            for (n, d) in [(500, 8), (2 * 480 + 5, 64)] {
                let items = table(&mut rng, n, d, |r| 1.0 + r.below(3) as f32);
                for b in [1, 5, 12] {
                    let qs: Vec<f32> = (0..b * d).map(|_| rng.below(3) as f32 - 1.0).collect();
                    for k in [1, 7, 50, 400] {
                        let ex = excludes(&mut rng, b, n);
                        let specs: Vec<(usize, &[u32])> =
                            ex.iter().map(|e| (k, e.as_slice())).collect();
                        let tag = format!("{isa:?}/{kernel:?}, n {n}, d {d}, b {b}, k {k}");
                        check(isa, kernel, 2, &items, &qs, &specs, &tag);
                    }
                }
            }
        }
    }
}

/// The int8 copy follows every write of the f32 rows (upserts in place and
/// appended, restores, deletes): answers stay equal, and the copy equals one
/// made afresh from the rows.
#[test]
fn the_int8_copy_follows_item_updates() {
    let mut rng = Rng::new(4);
    let (n, d) = (3000, 32);
    let mut items = spread(&mut rng, n, d);
    let qs = queries(&mut rng, 4, d);
    let specs: Vec<(usize, &[u32])> = (0..4).map(|_| (20, &[][..])).collect();
    let isa = Isa::detect();
    let kernel = Int8Kernel::detect();
    check(isa, kernel, 2, &items, &qs, &specs, "before");
    // Move the rows that answer query 0 far down, push others up, add new
    // rows past the last block edge, restore one, delete the new best.
    let top: Vec<u64> = fused::score_topk(&items, &qs[..d], &specs[..1])[0]
        .iter()
        .map(|s| s.id)
        .collect();
    for (i, &id) in top.iter().enumerate() {
        let e: Vec<f32> = qs[..d].iter().map(|&x| -x * (i as f32 + 1.0)).collect();
        items.upsert(id, &e, 10);
    }
    for i in 0..21u64 {
        let e: Vec<f32> = qs[..d].iter().map(|&x| x * (1.0 + i as f32)).collect();
        items.upsert(1_000_000 + i, &e, 10);
    }
    let row = rng.below(n as u64) as u32;
    let restored: Vec<f32> = (0..d).map(|_| rng.normal() as f32 * 50.0).collect();
    items.restore(items.id(row), &restored, 11, true);
    items.delete(1_000_020, 12);
    check(isa, kernel, 2, &items, &qs, &specs, "after");
    let fresh = Int8Table::new(d, items.embeddings());
    let copy = items.int8();
    assert_eq!(copy.rows(), fresh.rows());
    assert_eq!(copy.data(), fresh.data());
    assert_eq!(copy.scale(), fresh.scale());
    assert_eq!(copy.p_coef(), fresh.p_coef());
    assert_eq!(copy.q_coef(), fresh.q_coef());
}

/// The bound itself: for every row, ŷ − r ≤ ŝ ≤ ŷ + r with ŝ the f32
/// kernel's score, on rows and queries of very different norms.
#[test]
fn every_f32_score_lies_within_its_bound() {
    let mut rng = Rng::new(9);
    for (n, d) in [(800, 5), (800, 64), (300, 300)] {
        let items = spread(&mut rng, n, d);
        let t = items.int8();
        let rows: Vec<u32> = (0..n as u32).collect();
        let qs = queries(&mut rng, 10, d);
        for isa in Isa::available() {
            for (qi, q) in qs.chunks_exact(d).enumerate() {
                let iq = Int8Query::new(q);
                for batch in [1, 9] {
                    let mut exact = Vec::new();
                    fused::rescore(isa, batch, &items, q, &rows, &mut exact);
                    for (r, &s) in exact.iter().enumerate() {
                        let base = (r / BLOCK) * t.groups() * BLOCK * 4 + (r % BLOCK) * 4;
                        let mut a = 0i32;
                        for (g, w) in iq.words.iter().enumerate() {
                            for (i, &p) in w.to_le_bytes().iter().enumerate() {
                                let c = t.data()[base + g * BLOCK * 4 + i] as i32 - 128;
                                a += c * (p as i8 as i32);
                            }
                        }
                        let y = a as f32 * (t.scale()[r] * iq.scale);
                        let rad = iq.qn * t.p_coef()[r] + (iq.dq * t.q_coef()[r] + ETA);
                        assert!(
                            y - rad <= s && s <= y + rad,
                            "{isa:?}, n {n}, d {d}, query {qi}, row {r}: {s} vs {y} ± {rad}"
                        );
                    }
                }
            }
        }
    }
}

/// On a table like the demo's (random rows of similar norms, no copies:
/// every copy of a top row ties with it and is re-scored) few rows past k
/// reach the re-score.
#[test]
fn few_rows_are_rescored() {
    let mut rng = Rng::new(6);
    let (n, d) = (20_000, 64);
    let emb: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let items = ItemTable::new(d, (0..n as u64).collect(), emb).unwrap();
    let qs: Vec<f32> = (0..8 * d).map(|_| rng.normal() as f32).collect();
    let specs: Vec<(usize, &[u32])> = (0..8).map(|_| (10, &[][..])).collect();
    let rescored = check(
        Isa::detect(),
        Int8Kernel::detect(),
        2,
        &items,
        &qs,
        &specs,
        "demo-like",
    );
    assert!(
        rescored / 8 < 100,
        "{} rows re-scored per query",
        rescored / 8
    );
}

/// A query too large for the bound's overflow guard runs the f32 scan.
#[test]
fn huge_queries_fall_back_to_the_f32_scan() {
    let mut rng = Rng::new(1);
    let items = table(&mut rng, 100, 8, |r| r.normal() as f32 * 1e10);
    let qs = vec![1e25f32; 8];
    let specs: Vec<(usize, &[u32])> = vec![(5, &[][..])];
    let got = score_topk_int8_with(Isa::detect(), Int8Kernel::detect(), 1, &items, &qs, &specs);
    assert!(got.fell_back);
    assert_eq!(got.lists, fused::score_topk(&items, &qs, &specs));
    assert!(score_topk_int8(&items, &[], &[]).is_empty());
}

/// A long d with rows and queries along one direction, so the integer sum
/// passes 2²⁴ and f32(a) rounds; d not a multiple of 4 or of any lane count.
#[test]
fn long_rows_whose_integer_sums_pass_two_to_the_24() {
    let mut rng = Rng::new(13);
    let (n, d) = (300, 1101);
    let mut items = table(&mut rng, n, d, |r| r.normal() as f32);
    for r in (0..n).step_by(3) {
        let id = items.id(r as u32);
        let scale = 1.0 + (r % 7) as f32 * 1e-3;
        items.upsert(id, &vec![scale; d], 3);
    }
    let mut qs: Vec<f32> = vec![1.0; d];
    qs.extend(vec![-0.5f32; d]);
    qs.extend((0..d).map(|_| rng.normal() as f32));
    let specs: Vec<(usize, &[u32])> = vec![(5, &[][..]), (40, &[][..]), (7, &[][..])];
    for isa in Isa::available() {
        for kernel in Int8Kernel::available() {
            for b in [1, 3] {
                let tag = format!("{isa:?}/{kernel:?}, b {b}");
                check(isa, kernel, 2, &items, &qs[..b * d], &specs[..b], &tag);
            }
            // Nine copies of the queries: the blocked kernel's arithmetic.
            let qs9: Vec<f32> = qs.iter().copied().cycle().take(9 * d).collect();
            let specs9: Vec<(usize, &[u32])> = (0..9).map(|i| specs[i % 3]).collect();
            check(
                isa,
                kernel,
                2,
                &items,
                &qs9,
                &specs9,
                &format!("{isa:?}/{kernel:?}, b 9"),
            );
        }
    }
}
