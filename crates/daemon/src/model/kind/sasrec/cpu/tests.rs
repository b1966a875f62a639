//! Parity with PyTorch: the checkpoints under tests/fixtures/sasrec/ were
//! saved by the reference implementation's model code
//! (scripts/fixtures/sasrec.py), with its query vectors and `predict`
//! logits beside them. Here rankd reads the `.pth` itself and must give the
//! same numbers, in every block arrangement, before and after an item write.

use std::path::PathBuf;

use serde_json::Value;

use super::*;
use crate::backend::{BatchBounds, Output, Task};
use crate::model::kind::SASREC;
use crate::model::{CpuScoring, ModelSpec};

fn fixture(block: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sasrec")
        .join(block)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// Each value within 1e-5 of PyTorch's, relative to it past magnitude 1.
fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{what}[{i}]: rankd {g}, PyTorch {w}"
        );
    }
}

struct Loaded {
    net: Sasrec,
    items: ItemTable,
    expected: Value,
}

fn load(block: &str) -> Loaded {
    let dir = fixture(block);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let spec = ModelSpec::parse(&format!(
        "kind = \"sasrec\"\ndim = {}\nhistory_len = {}\nblocks = {}\nheads = {}\nblock = \"{block}\"\nweights = \"model.pth\"\nitems = \"item_emb\"\n",
        expected["dim"], expected["history_len"], expected["blocks"], expected["heads"],
    ))
    .unwrap();
    let weights = SASREC.load_weights(&spec, &dir.join("model.pth")).unwrap();
    let items = SASREC.embedded_items(&spec, &weights).unwrap().unwrap();
    assert_eq!(items.rows() as u64, expected["items"].as_u64().unwrap());
    let desc = ModelDesc {
        kind: SASREC,
        dim: spec.dim,
        user_feature_dim: 0,
        bounds: BatchBounds::default(),
        cpu_scoring: CpuScoring::F32,
    };
    let net = Sasrec::new(desc, weights.get::<SasrecWeights>().unwrap());
    Loaded {
        net,
        items,
        expected,
    }
}

/// The rows of a user's history, as the executor hands them over (the
/// window is cut by the network itself here).
fn rows(items: &ItemTable, user: &Value) -> Vec<u32> {
    user["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| items.row_of(id.as_u64().unwrap()).unwrap())
        .collect()
}

fn check(
    l: &Loaded,
    queries_key: &str,
    scores_key: &str,
    users: &[Value],
    block: &str,
    when: &str,
) {
    let histories: Vec<Vec<u32>> = l.expected["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| rows(&l.items, u))
        .collect();
    let all: Vec<u32> = (0..l.items.rows() as u32).collect();
    let queries: Vec<Query<'_>> = histories
        .iter()
        .map(|h| Query {
            history: h,
            features: None,
            sparse: None,
            context: None,
            task: Task::Score { rows: &all },
        })
        .collect();
    // The whole batch at once, and each user alone: the answer of a row
    // must not depend on its batch.
    let batch = l.net.queries(&l.items, &queries).unwrap();
    let outputs = l.net.run(&l.items, &queries).unwrap();
    let d = l.net.d;
    for (u, user) in users.iter().enumerate() {
        let want_q = floats(&user[queries_key]);
        assert_close(
            &batch[u * d..(u + 1) * d],
            &want_q,
            &format!("{block} {when} query of user {u}"),
        );
        let alone = l.net.queries(&l.items, &queries[u..u + 1]).unwrap();
        assert_close(
            &alone,
            &want_q,
            &format!("{block} {when} query of user {u} alone"),
        );
        let Output::Scores(scores) = &outputs[u] else {
            panic!("score task answered with {:?}", outputs[u]);
        };
        assert_close(
            scores,
            &floats(&user[scores_key]),
            &format!("{block} {when} scores of user {u}"),
        );
    }
}

#[test]
fn every_block_arrangement_matches_pytorch_before_and_after_an_item_write() {
    for block in ["sasrec", "pre_ln", "post_ln"] {
        let mut l = load(block);
        let users = l.expected["users"].as_array().unwrap().clone();
        check(&l, "query", "scores", &users, block, "before the write");

        // The write, as the executor applies it: the row changes for the
        // sequence input and for scoring alike.
        let write = l.expected["write"].clone();
        let id = write["item"].as_u64().unwrap();
        let embedding: Vec<f32> = floats(&write["embedding"])
            .iter()
            .map(|&x| x as f32)
            .collect();
        l.items.upsert(id, &embedding, 1);
        let after: Vec<Value> = users
            .iter()
            .zip(write["queries"].as_array().unwrap())
            .zip(write["scores"].as_array().unwrap())
            .map(|((u, q), s)| {
                let mut u = u.clone();
                u["query_after"] = q.clone();
                u["scores_after"] = s.clone();
                u
            })
            .collect();
        check(
            &l,
            "query_after",
            "scores_after",
            &after,
            block,
            "after the write",
        );
    }
}

#[test]
fn the_window_is_the_last_history_len_items() {
    let l = load("sasrec");
    let len = l.net.len;
    let long: Vec<u32> = (0..(len as u32 + 5)).collect();
    let q = |h: &[u32]| {
        l.net
            .queries(
                &l.items,
                &[Query {
                    history: h,
                    features: None,
                    sparse: None,
                    context: None,
                    task: Task::TopK {
                        k: 1,
                        exclude: &[],
                        filter: None,
                    },
                }],
            )
            .unwrap()
    };
    assert_eq!(q(&long), q(&long[5..]));
    assert_ne!(q(&long), q(&long[4..long.len() - 1]));
}
