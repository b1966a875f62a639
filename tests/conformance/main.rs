//! The conformance suite of rankd's backends: every kind (`two_tower`,
//! `ranker`, `sasrec` in each block arrangement) served by the real `rankd`
//! from the PyTorch-made fixtures (tests/fixtures/towers/, the sasrec
//! `.pth` checkpoints), and every answer compared with an f64 reference
//! computed from the fixture tensors read with the `safetensors` crate
//! (reference.rs), not with rankd's loaders:
//!
//! - batches of 1, 2, 3, 4 and the model's `max_batch_size` rows (every
//!   batch size a device warms, and one between them; each shown to
//!   run as one batch by `rankd_batch_size`), the bulk route and the socket;
//! - users with empty, short (1–2 items) and full histories (the window
//!   cuts), with and without dense features;
//! - an item deleted and an item rewritten in the serving version's
//!   catalogue, and version 2 unloaded and loaded again through the admin
//!   API, with version 1 (its own catalogue, untouched) serving meanwhile;
//! - `recommend` (top-k ids, ties within 1e-6 in either order; scores
//!   within 1e-5 relative past magnitude 1) and `score` with explicit items.
//!
//! The reference itself is held to PyTorch: it must reproduce the outputs
//! the fixtures' expected.json files record.
//!
//! By default the daemon runs with `--device cpu`. With `RANKD_EXPECT_GPU=1`
//! it runs with `--device cuda:0`, and the suite fails, not skips, unless
//! `/readyz` reports `cuda:0`; a model whose kind has no forward pass on the
//! device is served from the CPU and says so (printed). `RANKD_BIN` names
//! the daemon (default: the one cargo built) and `RANKD_REPO` the checkout
//! holding the fixtures (default: this crate's folder), so the built test
//! binary runs on a host without cargo (benches/gpu/check.sh).

#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;
mod reference;
mod suite;

use std::path::PathBuf;

use serde_json::Value;

use common::parity::{close, floats};
use reference::{Arrangement, Catalogue, Mlp, Net, Reference, Sasrec, User};
use suite::{most_frequent, repo, toml_value, Setup};

/// Every model's batching: a batch closes at 8 rows, or once its oldest
/// request has waited 50 ms, so requests sent together run together.
const BATCHING: &str = "[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 50000\n";
const MAX_BATCH: usize = 8;

fn towers() -> PathBuf {
    repo().join("tests/fixtures/towers")
}

fn sasrec_dir(block: &str) -> PathBuf {
    repo().join("tests/fixtures/sasrec").join(block)
}

fn json_file(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn id_list(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The two-tower fixture's model and catalogue, and its users (ids from 1).
fn tower_reference(ranker: bool) -> (Reference, Vec<(u64, User)>) {
    let dir = towers().join("two_tower/1");
    let toml = dir.join("model.toml");
    let weights = if ranker {
        towers().join("ranker/1/weights.safetensors")
    } else {
        dir.join("weights.safetensors")
    };
    let mlp = Mlp::read(&weights);
    let reference = Reference {
        net: if ranker {
            Net::Ranker(mlp)
        } else {
            Net::TwoTower(mlp)
        },
        items: Catalogue::read(&dir.join("items.safetensors")),
        history_len: toml_value(&toml, "history_len").parse().unwrap(),
        feature_dim: toml_value(&toml, "user_feature_dim").parse().unwrap(),
    };
    let exp = json_file(towers().join("expected.json"));
    let users = exp["users"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(u, v)| {
            (
                u as u64 + 1,
                User {
                    history: id_list(&v["history"]),
                    features: floats(&v["features"]),
                },
            )
        })
        .collect();
    (reference, users)
}

/// Users beside the fixture's: one with nothing stored, one whose short
/// history is the deleted and the rewritten item, and one whose history
/// runs past the window with both inside it.
fn extra_users(r: &Reference, users: &mut Vec<(u64, User)>, delete: u64, write: u64) {
    let next = users.iter().map(|(u, _)| *u).max().unwrap() + 1;
    let others: Vec<u64> = r
        .items
        .live_ids()
        .into_iter()
        .filter(|id| *id != delete && *id != write)
        .collect();
    let mut full: Vec<u64> = others.iter().rev().take(r.history_len).copied().collect();
    let at = full.len() - 3;
    full.insert(at, delete);
    full.push(write);
    assert!(full.len() > r.history_len);
    users.push((next, User::default()));
    users.push((
        next + 1,
        User {
            history: vec![delete, write],
            features: vec![],
        },
    ));
    users.push((
        next + 2,
        User {
            history: full,
            features: users[0].1.features.clone(),
        },
    ));
}

/// A rewritten embedding of `dim` f32 values, drawn from a fixed seed.
fn new_embedding(dim: usize) -> Vec<f64> {
    let mut rng = common::Rng::new(0x0063_6f6e_666f_726d);
    (0..dim)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * 0.6) as f32 as f64)
        .collect()
}

fn tower_setup(ranker: bool) -> Setup {
    let (reference, mut users) = tower_reference(ranker);
    let windows: Vec<Vec<u64>> = users
        .iter()
        .map(|(_, u)| u.history[u.history.len().saturating_sub(reference.history_len)..].to_vec())
        .collect();
    let write = most_frequent(windows.iter().map(Vec::as_slice), &[]);
    // The item deleted: the one most often in the answers.
    let lists: Vec<Vec<u64>> = if ranker {
        let exp = json_file(towers().join("expected.json"));
        exp["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| id_list(&u["candidates"]))
            .collect()
    } else {
        users
            .iter()
            .map(|(_, u)| {
                reference
                    .ranking(u, &[])
                    .iter()
                    .take(10)
                    .map(|x| x.0)
                    .collect()
            })
            .collect()
    };
    let delete = most_frequent(lists.iter().map(Vec::as_slice), &[write]);
    extra_users(&reference, &mut users, delete, write);
    let dir = towers().join("two_tower/1");
    let (name, weights) = if ranker {
        ("ranker", towers().join("ranker/1/weights.safetensors"))
    } else {
        ("two_tower", dir.join("weights.safetensors"))
    };
    let toml = format!(
        "kind = \"{name}\"\ndim = {}\nuser_feature_dim = {}\nhistory_len = {}\n\
         items = \"items.safetensors\"\nweights = \"weights.safetensors\"\n{}\n{BATCHING}{}",
        reference.items.dim(),
        reference.feature_dim,
        reference.history_len,
        if ranker { "" } else { "cold_start = \"model\"" },
        if ranker {
            format!("[limits]\nmax_items = {MAX_BATCH}\n")
        } else {
            String::new()
        },
    );
    Setup {
        name: name.into(),
        toml,
        files: vec![
            (dir.join("items.safetensors"), "items.safetensors".into()),
            (weights, "weights.safetensors".into()),
        ],
        write: (write, new_embedding(reference.items.dim())),
        reference,
        users,
        delete,
        max_batch: MAX_BATCH,
    }
}

/// A sasrec fixture's model (from the safetensors copy of its checkpoint)
/// and the expected.json PyTorch wrote.
fn sasrec_reference(block: &str) -> (Reference, Value) {
    let exp = json_file(sasrec_dir(block).join("expected.json"));
    let (model, items) = Sasrec::read(
        &sasrec_dir(block).join("model.safetensors"),
        exp["blocks"].as_u64().unwrap() as usize,
        exp["heads"].as_u64().unwrap() as usize,
        Arrangement::of(block),
    );
    let history_len = exp["history_len"].as_u64().unwrap() as usize;
    assert_eq!(model.window(), history_len, "pos_emb rows");
    let reference = Reference {
        net: Net::Sasrec(model),
        items,
        history_len,
        feature_dim: 0,
    };
    (reference, exp)
}

fn sasrec_setup(block: &str) -> Setup {
    let (reference, exp) = sasrec_reference(block);
    let mut users: Vec<(u64, User)> = exp["users"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(u, v)| {
            (
                u as u64 + 1,
                User {
                    history: id_list(&v["history"]),
                    features: vec![],
                },
            )
        })
        .collect();
    // The rewrite PyTorch made; the item deleted is the one most often in
    // the answers.
    let write = exp["write"]["item"].as_u64().unwrap();
    let embedding = floats(&exp["write"]["embedding"]);
    let lists: Vec<Vec<u64>> = users
        .iter()
        .map(|(_, u)| {
            reference
                .ranking(u, &[])
                .iter()
                .take(10)
                .map(|x| x.0)
                .collect()
        })
        .collect();
    let delete = most_frequent(lists.iter().map(Vec::as_slice), &[write]);
    extra_users(&reference, &mut users, delete, write);
    let toml = format!(
        "kind = \"sasrec\"\ndim = {}\nhistory_len = {}\nblocks = {}\nheads = {}\nblock = \"{block}\"\n\
         weights = \"model.pth\"\nitems = \"item_emb\"\ncold_start = \"model\"\n{BATCHING}",
        exp["dim"], exp["history_len"], exp["blocks"], exp["heads"],
    );
    Setup {
        name: format!("sasrec-{block}"),
        toml,
        // The daemon reads the checkpoint PyTorch saved, as users drop it in.
        files: vec![(sasrec_dir(block).join("model.pth"), "model.pth".into())],
        write: (write, embedding),
        reference,
        users,
        delete,
        max_batch: MAX_BATCH,
    }
}

#[tokio::test]
async fn two_tower_conforms() {
    suite::run(tower_setup(false)).await;
}

#[tokio::test]
async fn ranker_conforms() {
    suite::run(tower_setup(true)).await;
}

#[tokio::test]
async fn sasrec_block_sasrec_conforms() {
    suite::run(sasrec_setup("sasrec")).await;
}

#[tokio::test]
async fn sasrec_block_pre_ln_conforms() {
    suite::run(sasrec_setup("pre_ln")).await;
}

#[tokio::test]
async fn sasrec_block_post_ln_conforms() {
    suite::run(sasrec_setup("post_ln")).await;
}

/// The reference itself gives PyTorch's outputs for the fixtures' users:
/// two-tower scores of every item and ranker probabilities, and for each
/// sasrec arrangement the query vectors and scores before and after PyTorch
/// rewrote one item.
#[test]
fn the_reference_reproduces_pytorchs_outputs() {
    let exp = json_file(towers().join("expected.json"));
    let (tt, users) = tower_reference(false);
    let (rk, _) = tower_reference(true);
    for ((u, user), want) in users.iter().zip(exp["users"].as_array().unwrap()) {
        let scores = want["scores"].as_object().unwrap();
        let items: Vec<u64> = scores.keys().map(|k| k.parse().unwrap()).collect();
        let wanted: Vec<f64> = scores.values().map(|v| v.as_f64().unwrap()).collect();
        for ((id, g), w) in items.iter().zip(tt.scores(user, &items)).zip(wanted) {
            assert!(
                close(g, w),
                "two_tower, user {u}, item {id}: reference {g}, PyTorch {w}"
            );
        }
        let candidates = id_list(&want["candidates"]);
        let got = rk.scores(user, &candidates);
        for ((id, g), w) in candidates
            .iter()
            .zip(got)
            .zip(floats(&want["probabilities"]))
        {
            assert!(
                close(g, w),
                "ranker, user {u}, item {id}: reference {g}, PyTorch {w}"
            );
        }
    }
    for block in ["sasrec", "pre_ln", "post_ln"] {
        let (mut r, exp) = sasrec_reference(block);
        let n = exp["items"].as_u64().unwrap();
        let all: Vec<u64> = (1..=n).collect();
        let users: Vec<User> = exp["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| User {
                history: id_list(&v["history"]),
                features: vec![],
            })
            .collect();
        let compare = |r: &Reference, queries: Vec<Vec<f64>>, scores: Vec<Vec<f64>>, when: &str| {
            for (u, user) in users.iter().enumerate() {
                for (j, (g, w)) in r.query(user).iter().zip(&queries[u]).enumerate() {
                    assert!(
                        close(*g, *w),
                        "{block} {when}, user {u}, query[{j}]: reference {g}, PyTorch {w}"
                    );
                }
                for (id, (g, w)) in all.iter().zip(r.scores(user, &all).iter().zip(&scores[u])) {
                    assert!(
                        close(*g, *w),
                        "{block} {when}, user {u}, item {id}: reference {g}, PyTorch {w}"
                    );
                }
            }
        };
        let per_user = |key: &str| -> Vec<Vec<f64>> {
            exp["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| floats(&v[key]))
                .collect()
        };
        let listed =
            |v: &Value| -> Vec<Vec<f64>> { v.as_array().unwrap().iter().map(floats).collect() };
        compare(&r, per_user("query"), per_user("scores"), "as saved");
        let write = &exp["write"];
        r.items.write(
            write["item"].as_u64().unwrap(),
            &floats(&write["embedding"]),
        );
        compare(
            &r,
            listed(&write["queries"]),
            listed(&write["scores"]),
            "after the write",
        );
    }
}
