//! The graphs PyTorch exported (tests/fixtures/onnx, made by
//! scripts/fixtures/onnx.py) answer as PyTorch does, on every engine,
//! whole batch and each user alone, before and after an item write.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::Scored;
use crate::backend::{Backend, ModelDesc, ModelId, TableId};
use crate::model::kind::onnx::EngineKind;
use crate::model::ModelSpec;

/// The one model each test loads, and its table.
const MODEL: ModelId = ModelId::new(0);
const TABLE: TableId = TableId::new(0);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/onnx")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn table() -> ItemTable {
    crate::exec::load::load_table(&fixtures().join("catalogues/shop/items.safetensors"), 8).unwrap()
}

/// The fixture model `name` on `engine`, loaded into a CPU backend as
/// model 0.
fn load(name: &str, engine: EngineKind) -> (CpuBackend, ModelSpec) {
    let dir = fixtures().join(name).join("1");
    let mut text = std::fs::read_to_string(dir.join("model.toml")).unwrap();
    if engine == EngineKind::Onnxruntime {
        let lib = onnxruntime_lib();
        crate::model::kind::onnx::configure(crate::model::kind::onnx::Settings {
            onnxruntime_lib: Some(lib),
            ..Default::default()
        });
        text.push_str("engine = \"onnxruntime\"\n");
    }
    let spec = ModelSpec::parse(&text).unwrap();
    let weights = spec
        .kind
        .load_weights(&spec, &dir.join(spec.kind.weights_file(&spec)))
        .unwrap();
    let desc = ModelDesc {
        kind: spec.kind,
        dim: spec.dim,
        user_feature_dim: spec.user_feature_dim,
        bounds: Default::default(),
        cpu_scoring: spec.cpu_scoring,
    };
    let mut cpu = CpuBackend::new();
    cpu.load(MODEL, desc, TABLE, &weights).unwrap();
    (cpu, spec)
}

/// ONNX Runtime's library: scripts/test.sh installs the pinned wheel into
/// the tool cache and exports its path.
pub(crate) fn onnxruntime_lib() -> PathBuf {
    let lib = std::env::var_os("RANKD_ONNXRUNTIME_LIB").map(PathBuf::from);
    match lib {
        Some(lib) if lib.is_file() => lib,
        _ => panic!(
            "ONNX Runtime's library is not installed at RANKD_ONNXRUNTIME_LIB={lib:?} (scripts/test.sh installs it; or point it at onnxruntime/capi/libonnxruntime.so.<version> of `pip install onnxruntime`)"
        ),
    }
}

fn floats(v: &Value) -> Option<Vec<f32>> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap() as f32).collect())
}

fn ints(v: &Value) -> Option<Vec<i64>> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_i64().unwrap()).collect())
}

fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= 1e-5 * want.abs().max(1.0)
}

/// One user's inputs, as the executor would hand them over.
struct User {
    history: Vec<u32>,
    features: Option<Vec<f32>>,
    sparse: Option<Vec<i64>>,
    context: Option<Vec<f32>>,
    candidates: Vec<u32>,
}

fn users(e: &Value, items: &ItemTable, l: usize) -> Vec<User> {
    e["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let history: Vec<u64> = u["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let window = &history[history.len().saturating_sub(l)..];
            User {
                history: window.iter().map(|&id| items.row_of(id).unwrap()).collect(),
                features: floats(&u["features"]),
                sparse: ints(&u["sparse"]),
                context: floats(&u["context"]),
                candidates: u["dcn"]["candidates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| items.row_of(x.as_u64().unwrap()).unwrap())
                    .collect(),
            }
        })
        .collect()
}

/// A tower's recommend (k = 10) or its score of every row in `all`.
fn tower_query<'a>(u: &'a User, spec: &ModelSpec, all: &'a [u32], topk: bool) -> Query<'a> {
    Query {
        history: &u.history,
        features: u
            .features
            .as_deref()
            .filter(|f| f.len() == spec.user_feature_dim),
        sparse: None,
        context: u.context.as_deref().filter(|_| spec.context_dim > 0),
        task: if topk {
            Task::TopK {
                k: 10,
                exclude: &[],
                filter: None,
            }
        } else {
            Task::Score { rows: all }
        },
    }
}

/// A ranker's score of the user's candidates.
fn ranker_query(u: &User) -> Query<'_> {
    Query {
        history: &u.history,
        features: None,
        sparse: u.sparse.as_deref(),
        context: u.context.as_deref(),
        task: Task::Score {
            rows: &u.candidates,
        },
    }
}

#[cfg(feature = "onnxruntime")]
const ENGINES: &[EngineKind] = &[EngineKind::Tract, EngineKind::Onnxruntime];
#[cfg(not(feature = "onnxruntime"))]
const ENGINES: &[EngineKind] = &[EngineKind::Tract];

/// Each tower fixture's scores of every item and its top 10, for all users
/// in one batch and each alone, equal PyTorch's; then again after an item
/// write, which changes the answers of users whose window holds the item.
#[test]
fn exported_towers_answer_as_pytorch() {
    let e = expected();
    let mut items = table();
    let all: Vec<u32> = (0..items.rows() as u32).collect();
    let mut ran = 0;
    for &engine in ENGINES {
        for (model, key) in [
            ("tower-dynamo", "tower"),
            ("tower-legacy", "tower"),
            ("sasrec-dynamo", "sasrec"),
            ("sasrec-legacy", "sasrec"),
        ] {
            let (mut cpu, spec) = load(model, engine);
            ran += 1;
            for round in ["before", "after"] {
                let answers = if round == "before" {
                    e["users"].as_array().unwrap().clone()
                } else {
                    let w = &e["write"];
                    items.upsert(
                        w["item"].as_u64().unwrap(),
                        &floats(&w["embedding"]).unwrap(),
                        1,
                    );
                    w["users"].as_array().unwrap().clone()
                };
                let us = users(&e, &items, spec.history_len);
                let query = |u, topk| tower_query(u, &spec, &all, topk);
                let batch: Vec<Query<'_>> = us
                    .iter()
                    .flat_map(|u| [query(u, true), query(u, false)])
                    .collect();
                let whole = cpu.run(MODEL, &items, &batch).unwrap();
                for (i, (u, a)) in us.iter().zip(&answers).enumerate() {
                    let alone = cpu
                        .run(MODEL, &items, &[query(u, true), query(u, false)])
                        .unwrap();
                    let want = &a[key];
                    for out in [&whole[2 * i..2 * i + 2], &alone[..]] {
                        let (Output::TopK(top), Output::Scores(scores)) = (&out[0], &out[1]) else {
                            panic!("{out:?}");
                        };
                        for (r, s) in scores.iter().enumerate() {
                            let id = items.id(r as u32).to_string();
                            let w = want["scores"][&id].as_f64().unwrap() as f32;
                            assert!(
                                close(*s, w),
                                "{model} {engine:?} {round} user {} item {id}: {s} against PyTorch's {w}",
                                a["user"]
                            );
                        }
                        let ids: Vec<u64> = top.iter().map(|s: &Scored| s.id).collect();
                        let want_top: Vec<u64> = want["top"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_u64().unwrap())
                            .collect();
                        assert_eq!(
                            ids, want_top,
                            "{model} {engine:?} {round} user {}",
                            a["user"]
                        );
                    }
                }
            }
            items = table();
        }
    }
    assert_eq!(ran, 4 * ENGINES.len(), "four towers on each engine");
}

/// The DCN-v2 fixtures' probabilities of each user's candidates equal
/// PyTorch's, with categorical user features, candidate attributes and
/// context (tests/daemon/onnx.rs checks them after an item write).
#[test]
fn exported_rankers_answer_as_pytorch() {
    let e = expected();
    let mut ran = 0;
    for &engine in ENGINES {
        for model in ["dcn-dynamo", "dcn-legacy"] {
            let (mut cpu, spec) = load(model, engine);
            ran += 1;
            let items = table();
            let us = users(&e, &items, spec.history_len);
            let query = ranker_query;
            let batch: Vec<Query<'_>> = us.iter().map(query).collect();
            let whole = cpu.run(MODEL, &items, &batch).unwrap();
            for (i, (u, a)) in us.iter().zip(e["users"].as_array().unwrap()).enumerate() {
                let want = floats(&a["dcn"]["probabilities"]).unwrap();
                let alone = cpu.run(MODEL, &items, &[query(u)]).unwrap();
                for out in [&whole[i], &alone[0]] {
                    let Output::Scores(got) = out else {
                        panic!("{out:?}")
                    };
                    assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            close(*g, *w),
                            "{model} {engine:?} user {}: {got:?} against {want:?}",
                            a["user"]
                        );
                    }
                }
            }
        }
    }
    assert_eq!(ran, 2 * ENGINES.len(), "two rankers on each engine");
}
