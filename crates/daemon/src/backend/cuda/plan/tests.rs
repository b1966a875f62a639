use super::*;
use crate::backend::topk::TopK;
use crate::model::demo::Rng;

const H100: DeviceLimits = DeviceLimits {
    sms: 132,
    smem_optin: 227 * 1024,
    smem_per_sm: 228 * 1024,
};
/// Shared memory and the 2-blocks-per-SM launch bound, as the driver would
/// answer for the fused kernel.
fn resident(limits: DeviceLimits) -> impl Fn(usize) -> usize {
    move |smem| (limits.smem_per_sm / (smem + 1024)).clamp(1, 2)
}

const A100: DeviceLimits = DeviceLimits {
    sms: 108,
    smem_optin: 163 * 1024,
    smem_per_sm: 164 * 1024,
};

#[test]
fn order_keys_follow_total_cmp_and_invert() {
    let mut rng = Rng::new(11);
    let mut v: Vec<f32> = (0..2000)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .filter(|f| !f.is_nan())
        .collect();
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        -1e-40,
    ]);
    for w in v.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert_eq!(
            order_key(a).cmp(&order_key(b)),
            a.total_cmp(&b),
            "{a} vs {b}"
        );
        assert_eq!(key_score(order_key(a)).to_bits(), a.to_bits());
    }
    // Real scores never map to the kernels' "empty slot" key.
    assert!(order_key(f32::NEG_INFINITY) > i32::MIN);
}

fn check_invariants(p: &TopkPlan, n: usize, nq: usize, k: usize, limits: DeviceLimits) {
    assert!(p.group >= 1 && p.group <= MAX_GROUP, "{p:?}");
    assert!(
        p.group * p.groups >= nq && p.group * (p.groups - 1) < nq,
        "{p:?}"
    );
    assert!(
        p.kps >= k && p.kps.is_power_of_two() && p.kps >= 2 * TILE,
        "{p:?}"
    );
    assert_eq!(p.chunk_rows % TILE, 0);
    assert!(p.chunks * p.chunk_rows >= n, "{p:?}");
    assert!(n == 0 || (p.chunks - 1) * p.chunk_rows < n, "{p:?}");
    assert!(p.chunks <= 65_535);
    assert!(p.partial_smem <= limits.smem_optin, "{p:?}");
    assert!(p.merge_kps >= k && p.merge_kps >= 2 * THREADS && p.merge_smem <= limits.smem_optin);
}

#[test]
fn plans_fit_the_device_for_every_size_the_service_uses() {
    for limits in [H100, A100] {
        for n in [0, 1, 63, 1000, 100_000, 10_000_000, 50_000_000] {
            for nq in [1, 8, 32, 33, 64] {
                for k in [1, 10, 100, 1000] {
                    for (ld, es, tc) in [
                        (64, 4, false),
                        (128, 2, false),
                        (128, 2, true),
                        (128, 4, false),
                        (256, 2, false),
                        (256, 2, true),
                        (1024, 4, false),
                    ] {
                        let p = plan_topk(n, ld, es, nq, k, limits, &resident(limits), tc).unwrap();
                        check_invariants(&p, n, nq, k, limits);
                        assert_eq!(
                            p.partial_smem,
                            partial_smem_bytes(p.group, ld, es, p.kps, tc)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn small_k_scores_a_whole_batch_in_one_pass_over_the_table() {
    for tc in [false, true] {
        let p = plan_topk(10_000_000, 128, 2, 32, 100, H100, &resident(H100), tc).unwrap();
        assert_eq!((p.group, p.groups), (32, 1), "{p:?}");
        // Two blocks fit an SM, and every SM gets work.
        assert!(p.partial_smem * 2 <= H100.smem_per_sm, "{p:?}");
        assert!(p.chunks >= H100.sms, "{p:?}");
    }
    // The tensor-core kernel keeps fragments for whole tiles of 8 queries.
    assert_eq!(
        partial_smem_bytes(5, 128, 2, 128, true),
        partial_smem_bytes(5, 128, 2, 128, false) + 3 * 128 * 4
    );
    // 33 queries split evenly.
    let p = plan_topk(10_000_000, 128, 2, 33, 10, H100, &resident(H100), false).unwrap();
    assert_eq!((p.group, p.groups), (17, 2));
}

#[test]
fn tiny_tables_use_one_chunk_and_oversized_requests_are_refused() {
    let p = plan_topk(1000, 64, 4, 4, 10, H100, &resident(H100), false).unwrap();
    assert_eq!(p.chunks, 1);
    let err = plan_topk(1000, 64, 4, 1, MAX_K + 1, H100, &resident(H100), false).unwrap_err();
    assert_eq!(err, PlanError::KTooLarge { k: MAX_K + 1 });
    assert_eq!(err.to_string(), "k must be <= 4096 on the GPU, got 4097");
}

#[test]
fn packing_matches_the_batch() {
    let hist = [3u32, 1, 4];
    let feats = [0.5f32, -1.0];
    let excl = [9u32, 2];
    let cand = [5u32, 6, 7];
    // Attributes "a" (index 0) and "b" (index 1); the filter lists b's
    // values unsorted and repeated, a's as one value.
    let attrs = crate::model::attributes::Attributes::new(vec![
        ("b".into(), vec![0; 10]),
        ("a".into(), vec![0; 10]),
    ])
    .unwrap();
    let filter: rankd_client::types::Filter = [
        (
            "b".to_string(),
            rankd_client::types::FilterValues::Any(vec![7, 3, 7]),
        ),
        ("a".to_string(), rankd_client::types::FilterValues::One(-1)),
    ]
    .into_iter()
    .collect();
    let rf = crate::model::attributes::RowFilter::resolve(&filter, &attrs, "c").unwrap();
    let queries = vec![
        Query {
            history: &hist,
            features: Some(&feats),
            sparse: None,
            context: None,
            task: Task::TopK {
                k: 5,
                exclude: &excl,
                filter: None,
            },
        },
        Query {
            history: &[],
            features: None,
            sparse: None,
            context: None,
            task: Task::Score { rows: &cand },
        },
        Query {
            history: &hist[..1],
            features: None,
            sparse: None,
            context: None,
            task: Task::TopK {
                k: 0,
                exclude: &[],
                filter: Some(&rf),
            },
        },
    ];
    let u = pack_users(&queries, 2);
    assert_eq!(u.hist_off, vec![0, 3, 3, 4]);
    assert_eq!(u.hist_rows, vec![3, 1, 4, 3]);
    assert_eq!(u.feats, vec![0.5, -1.0, 0.0, 0.0, 0.0, 0.0]);
    let t = pack_topk(&queries);
    assert_eq!(t.qsel, vec![0, 2]);
    assert_eq!(t.ks, vec![5, 0]);
    assert_eq!(t.excl_off, vec![0, 2, 2]);
    assert_eq!(
        t.excl_rows,
        vec![2, 9],
        "exclusions are sorted for the binary search"
    );
    assert_eq!(t.kmax, 5);
    assert_eq!(
        t.filt_off,
        vec![0, 0, 2],
        "the second top-k has two clauses"
    );
    assert_eq!(
        t.clauses,
        vec![0, 0, 1, 1, 1, 3],
        "(attribute, first, end) per clause"
    );
    assert_eq!(
        t.filt_vals,
        vec![-1, 3, 7],
        "each clause's values sorted, once"
    );
    let p = pack_pairs(&queries);
    assert_eq!(p.pair_q, vec![1, 1, 1]);
    assert_eq!(p.pair_row, vec![5, 6, 7]);
    assert!(check_rows(&queries, 10, 2, 2).is_ok());
    let err = check_rows(&queries, 10, 1, 2).unwrap_err().to_string();
    assert!(
        err.contains("names attribute 1, the device table has 1"),
        "{err}"
    );
    let err = check_rows(&queries, 8, 2, 2).unwrap_err().to_string();
    assert!(
        err.contains("row 9 is outside the item table of 8 rows"),
        "{err}"
    );
    let err = check_rows(&queries, 10, 2, 3).unwrap_err().to_string();
    assert!(
        err.contains("user features have 2 values, the model takes 3"),
        "{err}"
    );

    let ids: Vec<u64> = (100..110).collect();
    let keys = vec![order_key(2.0), order_key(1.0), 0, 0, 0, 0, 0, 0, 0, 0];
    let rows = vec![4, 7, NONE_ROW, 0, 0, 0, 0, 0, 0, 0];
    let lists = decode_topk(&keys, &rows, &t.ks, t.kmax, &ids);
    assert_eq!(
        lists,
        vec![
            vec![
                Scored {
                    id: 104,
                    score: 2.0
                },
                Scored {
                    id: 107,
                    score: 1.0
                }
            ],
            vec![]
        ]
    );
    let out = assemble(&queries, lists, &[0.1, 0.2, 0.3]);
    assert_eq!(out[1], Output::Scores(vec![0.1, 0.2, 0.3]));
    assert!(matches!(&out[2], Output::TopK(v) if v.is_empty()));
}

/// The two kernels' data flow replayed on the host with the CPU's TopK: per
/// chunk of the plan a top-k laid out as [nq][chunks][kmax] (with empty
/// slots), then the merge over each query's first k of every chunk. Equal to
/// a single pass over the table, ties and exclusions included.
#[test]
fn chunked_candidates_merge_to_the_single_pass_result() {
    let mut rng = Rng::new(5);
    let n = 20_000;
    let ids: Vec<u64> = (0..n as u64).map(|i| (i * 7919) % 100_003).collect();
    // Coarse scores: many ties, decided by id.
    let scores: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..n).map(|_| rng.below(40) as f32 * 0.25).collect())
        .collect();
    let live: Vec<bool> = (0..n).map(|_| rng.below(10) != 0).collect();
    let excl: Vec<u32> = (0..n as u32).filter(|r| r % 97 == 0).collect();
    let ks = [7u32, 300, 1];
    let kmax = 300;
    let plan = plan_topk(
        n,
        64,
        4,
        3,
        kmax,
        DeviceLimits { sms: 8, ..H100 },
        &|_| 2,
        false,
    )
    .unwrap();
    assert!(plan.chunks > 1, "{plan:?}");
    let eligible = |r: usize| live[r] && excl.binary_search(&(r as u32)).is_err();
    let row_of: std::collections::HashMap<u64, u32> = ids
        .iter()
        .enumerate()
        .map(|(r, &id)| (id, r as u32))
        .collect();
    let mut keys = vec![i32::MIN; plan.partial_len()];
    let mut rows = vec![NONE_ROW; plan.partial_len()];
    for q in 0..3 {
        for c in 0..plan.chunks {
            let mut t = TopK::new(ks[q] as usize);
            let end = ((c + 1) * plan.chunk_rows).min(n);
            for r in (c * plan.chunk_rows..end).filter(|&r| eligible(r)) {
                t.offer(Scored {
                    id: ids[r],
                    score: scores[q][r],
                });
            }
            for (i, s) in t.into_sorted().into_iter().enumerate() {
                let o = (q * plan.chunks + c) * kmax + i;
                keys[o] = order_key(s.score);
                rows[o] = row_of[&s.id];
            }
        }
    }
    let mut merged_keys = vec![0; 3 * kmax];
    let mut merged_rows = vec![NONE_ROW; 3 * kmax];
    for q in 0..3 {
        let mut t = TopK::new(ks[q] as usize);
        for c in 0..plan.chunks {
            for i in 0..ks[q] as usize {
                let o = (q * plan.chunks + c) * kmax + i;
                if rows[o] != NONE_ROW {
                    t.offer(Scored {
                        id: ids[rows[o] as usize],
                        score: key_score(keys[o]),
                    });
                }
            }
        }
        for (i, s) in t.into_sorted().into_iter().enumerate() {
            merged_keys[q * kmax + i] = order_key(s.score);
            merged_rows[q * kmax + i] = row_of[&s.id];
        }
    }
    let got = decode_topk(&merged_keys, &merged_rows, &ks, kmax, &ids);
    for q in 0..3 {
        let mut t = TopK::new(ks[q] as usize);
        for r in (0..n).filter(|&r| eligible(r)) {
            t.offer(Scored {
                id: ids[r],
                score: scores[q][r],
            });
        }
        assert_eq!(got[q].len(), ks[q] as usize);
        assert_eq!(got[q], t.into_sorted(), "query {q}");
    }
}

#[test]
fn batches_round_up_to_power_of_two_buckets_and_warm_up_covers_them_all() {
    assert_eq!(
        (0..=9).map(bucket).collect::<Vec<_>>(),
        [1, 1, 2, 4, 4, 8, 8, 8, 8, 16]
    );
    assert_eq!(warm_sizes(64), [1, 2, 4, 8, 16, 32, 64]);
    assert_eq!(warm_sizes(48), [1, 2, 4, 8, 16, 32, 48]);
    assert_eq!(warm_sizes(1), [1]);
    for max in 1..=300 {
        let warmed: std::collections::BTreeSet<usize> =
            warm_sizes(max).into_iter().map(bucket).collect();
        let needed: std::collections::BTreeSet<usize> = (1..=max).map(bucket).collect();
        assert_eq!(warmed, needed, "max_batch {max}");
    }
}

/// A batch at every limit of its model.toml fits the buffers reserved at
/// load, so serving it allocates nothing. Two-tower batches hold up to
/// `max_batch` requests; ranker batches up to `max_batch` candidate rows, or
/// one request of up to `max_items`.
#[test]
fn the_largest_allowed_batch_fits_the_buffers_reserved_at_load() {
    use crate::backend::{BatchBounds, ModelDesc};
    use crate::model::kind::{RANKER, TWO_TOWER};
    use crate::model::ModelKind;
    // The sizes the CUDA backend reserves at load: the kind's own.
    let batch_sizes = |desc: &ModelDesc, width: usize| {
        let kind = desc.kind.device().expect("a CUDA kind");
        kind.batch_sizes(desc, width)
    };
    let (d, fd, width) = (64, 16, 256);
    let history: Vec<u32> = (0..50).collect();
    let feats = vec![0.5f32; fd];
    for (max_batch, max_items) in [(48, 300), (256, 100)] {
        let bounds = BatchBounds {
            max_batch,
            history_len: 50,
            history_max: 200,
            max_k: 1000,
            max_items,
            max_exclude: 700,
        };
        let exclude: Vec<u32> = (0..(bounds.max_exclude + bounds.history_max) as u32).collect();
        let cands: Vec<u32> = (0..max_items as u32).collect();
        let desc = |kind| ModelDesc {
            kind,
            dim: d,
            user_feature_dim: fd,
            bounds,
            cpu_scoring: Default::default(),
        };
        let query = |task| Query {
            history: &history,
            features: Some(&feats),
            sparse: None,
            context: None,
            task,
        };
        let recommend = Task::TopK {
            k: bounds.max_k,
            exclude: &exclude,
            filter: None,
        };
        let score = |n: usize| Task::Score { rows: &cands[..n] };
        let legal: Vec<(ModelKind, Vec<Query<'_>>)> = vec![
            (TWO_TOWER, vec![query(recommend.clone()); max_batch]),
            (TWO_TOWER, vec![query(score(max_items)); max_batch]),
            (RANKER, vec![query(score(1)); max_batch]),
            (RANKER, vec![query(score(max_items))]),
            (RANKER, vec![query(score(max_items.min(max_batch) / 4)); 4]),
        ];
        for (kind, queries) in &legal {
            let z = batch_sizes(&desc(*kind), width);
            let u = pack_users(queries, fd);
            let t = pack_topk(queries);
            let p = pack_pairs(queries);
            let case = format!("{kind:?}, {} queries, bounds {bounds:?}", queries.len());
            assert!(u.hist_off.len() <= z.queries + 1, "{case}");
            assert!(u.hist_rows.len() <= z.hist_rows, "{case}");
            assert!(u.feats.len() <= z.feats, "{case}");
            assert!(t.qsel.len() <= z.queries && t.excl_off.len() <= z.queries + 1);
            assert!(t.excl_rows.len() <= z.excl_rows, "{case}");
            assert!(t.qsel.len() * t.kmax <= z.topk_out, "{case}");
            assert!(p.pair_q.len() <= z.pairs, "{case}");
            let tower_rows = if *kind == TWO_TOWER {
                assert!(bucket(queries.len()) * (d + fd) <= z.xu, "{case}");
                bucket(queries.len())
            } else {
                let rows = bucket(p.pair_q.len());
                assert!(rows * (3 * d + fd) <= z.rank_x, "{case}");
                rows
            };
            assert!(tower_rows * width <= z.act, "{case}");
        }
        // A ranker reserves for its largest batch of pairs, not for
        // max_batch requests of max_items each.
        let r = batch_sizes(&desc(RANKER), width);
        assert_eq!(r.pairs, max_batch.max(max_items));
        assert_eq!(r.topk_out, 0);
        // Every size, pinned: what each kind reserves at load.
        let b = max_batch;
        let common = BatchSizes {
            queries: b,
            hist_rows: b * 50,
            feats: b * fd,
            xu: bucket(b) * (d + fd),
            act: 0,
            excl_rows: b * (700 + 200),
            pairs: 0,
            rank_x: 0,
            topk_out: 0,
            seq: 0,
            seq_rows: 0,
        };
        let tt = BatchSizes {
            act: bucket(b) * width,
            pairs: b * max_items,
            topk_out: b * 1000,
            ..common
        };
        assert_eq!(batch_sizes(&desc(TWO_TOWER), width), tt);
        let pairs = b.max(max_items);
        let rk = BatchSizes {
            act: bucket(pairs) * width,
            pairs,
            rank_x: bucket(pairs) * (3 * d + fd),
            ..common
        };
        assert_eq!(r, rk);
        // A sasrec model: its window buffers (B·L positions of 2d), no
        // tower activations.
        let sq = BatchSizes {
            pairs: b * max_items,
            topk_out: b * 1000,
            seq: b * 50 * 2 * d,
            seq_rows: b * 50,
            ..common
        };
        assert_eq!(batch_sizes(&desc(crate::model::kind::SASREC), 0), sq);
    }
}

/// The serving path packs every batch into the same host buffers: what a
/// larger earlier batch left there must not show in a later one.
#[test]
fn packing_into_reused_buffers_equals_packing_afresh() {
    let hist: Vec<u32> = (0..40).collect();
    let feats = [0.25f32; 4];
    let unsorted = [30u32, 2, 17];
    let big: Vec<Query<'_>> = (0..20)
        .map(|i| Query {
            history: &hist[..i],
            features: Some(&feats),
            sparse: None,
            context: None,
            task: if i % 2 == 0 {
                Task::TopK {
                    k: 100 + i,
                    exclude: &hist[..i],
                    filter: None,
                }
            } else {
                Task::Score { rows: &hist[..i] }
            },
        })
        .collect();
    let small = vec![
        Query {
            history: &hist[..2],
            features: None,
            sparse: None,
            context: None,
            task: Task::TopK {
                k: 3,
                exclude: &unsorted,
                filter: None,
            },
        },
        Query {
            history: &[],
            features: None,
            sparse: None,
            context: None,
            task: Task::Score { rows: &hist[5..7] },
        },
    ];
    let (mut u, mut t, mut p) = (
        PackedUsers::default(),
        PackedTopk::default(),
        PackedPairs::default(),
    );
    for batch in [&big, &small, &big, &small] {
        pack_users_into(&mut u, batch, 4);
        pack_topk_into(&mut t, batch);
        pack_pairs_into(&mut p, batch);
        assert_eq!(u, pack_users(batch, 4));
        assert_eq!(t, pack_topk(batch));
        assert_eq!(p, pack_pairs(batch));
    }
    assert_eq!(t.excl_rows, [2, 17, 30]);
    assert_eq!(t.kmax, 3);
}
