//! Graphs exported by PyTorch (`torch.onnx.export`, both exporters;
//! tests/fixtures/onnx/, made by scripts/fixtures/onnx.py) dropped into
//! version folders with their model.toml: the daemon answers what PyTorch
//! answers, over HTTP and the socket, on tract and on ONNX Runtime, and sees
//! item writes; a graph it cannot bind, cannot read or cannot run fails its
//! version alone, naming why.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::common::frame::{connect, read_frame, request_frame, send};
use crate::common::parity::{close, floats};
use crate::common::*;

pub(crate) fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/onnx")
}

pub(crate) fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The fixture repository, and with `onnxruntime` a copy of each model
/// named `<model>-ort` that runs on ONNX Runtime.
fn repo(onnxruntime: bool) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    copy_dir(&fixtures(), root.path());
    std::fs::remove_file(root.path().join("expected.json")).unwrap();
    if onnxruntime {
        for model in MODELS {
            let to = root.path().join(format!("{model}-ort"));
            copy_dir(&root.path().join(model), &to);
            let toml = to.join("1/model.toml");
            let text = std::fs::read_to_string(&toml).unwrap();
            std::fs::write(&toml, format!("{text}engine = \"onnxruntime\"\n")).unwrap();
        }
    }
    root
}

const MODELS: [&str; 6] = [
    "tower-dynamo",
    "tower-legacy",
    "sasrec-dynamo",
    "sasrec-legacy",
    "dcn-dynamo",
    "dcn-legacy",
];

/// The fixture key of `model`'s answers (`tower`, `sasrec`, `dcn`).
fn key(model: &str) -> &str {
    model.split('-').next().unwrap()
}

#[cfg(feature = "onnxruntime")]
fn onnxruntime_lib() -> String {
    let lib = std::env::var("RANKD_ONNXRUNTIME_LIB").unwrap_or_default();
    assert!(
        Path::new(&lib).is_file(),
        "ONNX Runtime's library is not installed at RANKD_ONNXRUNTIME_LIB={lib:?} (scripts/test.sh installs it)"
    );
    lib
}

fn ids_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// A daemon on `root`, given ONNX Runtime's library in a rankd built with
/// it.
fn start_with_engines(root: &Path) -> Daemon {
    #[cfg(feature = "onnxruntime")]
    let lib = onnxruntime_lib();
    #[cfg(feature = "onnxruntime")]
    let flags = ["--onnxruntime-lib", lib.as_str()];
    #[cfg(not(feature = "onnxruntime"))]
    let flags: [&str; 0] = [];
    Daemon::start_with(root, &flags)
}

/// Seeds every fixture user: history, dense features, categorical features.
async fn seed(c: &reqwest::Client, d: &Daemon, e: &Value) {
    for u in e["users"].as_array().unwrap() {
        let mut body = json!({"history": u["history"]});
        if !u["features"].is_null() {
            body["features"] = u["features"].clone();
        }
        if !u["sparse"].is_null() {
            body["sparse"] = u["sparse"].clone();
        }
        let (s, answer) = post(c, &d.url(&format!("/v1/users/{}", u["user"])), body).await;
        assert_eq!(s, 200, "{answer}");
    }
}

/// PyTorch's top k over `scores` (id → score), the history excluded, ties
/// to the smaller id.
fn pytorch_top(scores: &Value, history: &[u64], k: usize) -> Vec<(u64, f64)> {
    let mut all: Vec<(u64, f64)> = scores
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, s)| (id.parse().unwrap(), s.as_f64().unwrap()))
        .filter(|(id, _)| !history.contains(id))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// Top-k ids and scores equal PyTorch's, but for neighbours whose scores
/// are within 1e-6 (their order is a rounding apart).
fn assert_top(answer: &Value, want: &[(u64, f64)], what: &str) {
    let items = answer["items"].as_array().unwrap();
    assert_eq!(items.len(), want.len(), "{what}: {answer}");
    for (i, (got, &(w, ws))) in items.iter().zip(want).enumerate() {
        let (g, gs) = (got["id"].as_u64().unwrap(), got["score"].as_f64().unwrap());
        assert!(
            close(gs, ws),
            "{what}: position {i}: score {gs}, PyTorch {ws}"
        );
        if g != w {
            let swapped = want
                .iter()
                .any(|&(id, s)| id == g && (s - ws).abs() <= 1e-6);
            assert!(
                swapped,
                "{what}: position {i}: rankd {g}, PyTorch {w}; {answer}"
            );
        }
    }
}

/// The request body of user `u` to `model`, with the request's context when
/// the model reads one and the fixture gives it.
fn body(model: &str, u: &Value, mut body: Value) -> Value {
    if key(model) != "sasrec" && !u["context"].is_null() {
        body["context"] = u["context"].clone();
    }
    body
}

/// Every tower model's scores of every item and its top 10, and every
/// ranker's probabilities, for every user, equal PyTorch's (1e-5); then an
/// item write moves the answers to PyTorch's for the written table.
async fn check_models(c: &reqwest::Client, d: &Daemon, e: &Value, models: &[String], round: &str) {
    let all: Vec<u64> = (0..e["items"].as_u64().unwrap())
        .map(|i| 1000 + 3 * i)
        .collect();
    let answers = if round == "before" {
        &e["users"]
    } else {
        &e["write"]["users"]
    };
    for model in models {
        let k = key(model);
        for (u, want) in e["users"]
            .as_array()
            .unwrap()
            .iter()
            .zip(answers.as_array().unwrap())
        {
            let user = u["user"].as_u64().unwrap();
            let what = format!("{model} {round}, user {user}");
            let want = &want[k];
            if k == "dcn" {
                let candidates = want["candidates"].clone();
                let (s, answer) = post(
                    c,
                    &d.url(&format!("/v1/models/{model}/score")),
                    body(model, u, json!({"user_id": user, "items": candidates})),
                )
                .await;
                assert_eq!(s, 200, "{what}: {answer}");
                let got = floats(&answer["scores"]);
                let pytorch = floats(&want["probabilities"]);
                assert_eq!(got.len(), pytorch.len(), "{what}");
                for (g, w) in got.iter().zip(&pytorch) {
                    assert!(close(*g, *w), "{what}: {got:?}, PyTorch {pytorch:?}");
                }
                continue;
            }
            let (s, answer) = post(
                c,
                &d.url(&format!("/v1/models/{model}/score")),
                body(model, u, json!({"user_id": user, "items": all})),
            )
            .await;
            assert_eq!(s, 200, "{what}: {answer}");
            for (id, got) in all.iter().zip(floats(&answer["scores"])) {
                let w = want["scores"][id.to_string()].as_f64().unwrap();
                assert!(close(got, w), "{what}: item {id}: rankd {got}, PyTorch {w}");
            }
            let (s, answer) = post(
                c,
                &d.url(&format!("/v1/models/{model}/recommend")),
                body(model, u, json!({"user_id": user, "k": 10})),
            )
            .await;
            assert_eq!(s, 200, "{what}: {answer}");
            assert_eq!(answer["cold_start"], false, "{what}: {answer}");
            let history = ids_of(&u["history"]);
            assert_top(&answer, &pytorch_top(&want["scores"], &history, 10), &what);
        }
    }
}

/// On tract and, in a rankd built with it, on ONNX Runtime.
#[tokio::test]
async fn exported_graphs_answer_as_pytorch_on_each_engine() {
    let e = expected();
    let onnxruntime = cfg!(feature = "onnxruntime");
    let root = repo(onnxruntime);
    let d = start_with_engines(root.path());
    let c = Daemon::client();
    let mut models: Vec<String> = MODELS.iter().map(|m| m.to_string()).collect();
    if onnxruntime {
        models.extend(MODELS.iter().map(|m| format!("{m}-ort")));
    }
    for model in &models {
        let info = get_json(&c, &d.url(&format!("/v1/models/{model}"))).await;
        assert_eq!(info["state"], "ready", "{info}");
        assert_eq!(info["kind"], "onnx", "{info}");
        let engine = if model.ends_with("-ort") {
            "onnxruntime (CPUExecutionProvider)"
        } else {
            "tract"
        };
        assert_eq!(info["engine"], engine, "{info}");
    }
    seed(&c, &d, &e).await;
    check_models(&c, &d, &e, &models, "before").await;

    // The socket gives the same answers (a tower's recommend, a ranker's
    // score, with context).
    let u = &e["users"][3];
    let user = u["user"].as_u64().unwrap();
    let mut sock = connect(&d.uds).await;
    let towers = if onnxruntime {
        vec!["tower-legacy", "tower-dynamo-ort"]
    } else {
        vec!["tower-legacy", "tower-dynamo"]
    };
    for (id, model) in towers.iter().enumerate() {
        let req = json!({"id": id, "op": "recommend", "model": model, "user_id": user, "k": 5, "context": u["context"]});
        send(&mut sock, &request_frame(&req), "recommend").await;
        let answer = read_frame(&mut sock, "recommend").await;
        assert_eq!(answer["ok"], true, "{answer}");
        assert_top(
            &answer["result"],
            &pytorch_top(&u["tower"]["scores"], &ids_of(&u["history"]), 5),
            &format!("{model} over the socket"),
        );
    }
    let ranker = if onnxruntime {
        "dcn-legacy-ort"
    } else {
        "dcn-legacy"
    };
    let req = json!({"id": 9, "op": "score", "model": ranker, "user_id": user,
        "items": u["dcn"]["candidates"], "context": u["context"]});
    send(&mut sock, &request_frame(&req), "score").await;
    let answer = read_frame(&mut sock, "score").await;
    assert_eq!(answer["ok"], true, "{answer}");
    for (g, w) in floats(&answer["result"]["scores"])
        .iter()
        .zip(floats(&u["dcn"]["probabilities"]))
    {
        assert!(close(*g, w), "dcn over the socket: {answer}");
    }

    // An item write reaches the graphs that read history_embeddings (and
    // the rankers' candidate_embeddings).
    let w = &e["write"];
    let (s, answer) = post(
        &c,
        &d.url(&format!("/v1/catalogues/shop/items/{}", w["item"])),
        json!({"embedding": w["embedding"]}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    check_models(&c, &d, &e, &models, "after").await;
}

/// Without ONNX Runtime's library the models that ask for it fail to load,
/// saying how to get it, and every other model serves.
#[cfg(feature = "onnxruntime")]
#[tokio::test]
async fn without_the_library_onnxruntime_models_fail_and_the_others_serve() {
    let root = repo(true);
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let info = get_json(&c, &d.url("/v1/models/tower-legacy-ort")).await;
    assert_eq!(info["state"], "failed", "{info}");
    let error = info["error"].as_str().unwrap();
    for needle in [
        "--onnxruntime-lib",
        "pip install onnxruntime",
        "onnxruntime/capi/libonnxruntime.so",
    ] {
        assert!(error.contains(needle), "{needle} in {error}");
    }
    let (s, answer) = post(
        &c,
        &d.url("/v1/models/tower-legacy/recommend"),
        json!({"user_id": 1, "k": 3}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["items"].as_array().unwrap().len(), 3, "{answer}");
}

/// A graph rankd cannot read, bind or run fails its own version, naming the
/// file and why; the daemon serves the rest.
#[tokio::test]
async fn a_graph_that_cannot_be_served_fails_its_version_alone() {
    let root = repo(false);
    let bad = repo_root().join("tests/fixtures/onnx-bad");
    let tower_toml =
        std::fs::read_to_string(root.path().join("tower-legacy/1/model.toml")).unwrap();
    let add = |name: &str, graph: Option<&Path>, bytes: Option<&[u8]>, toml: &str| {
        let dir = root.path().join(name).join("1");
        std::fs::create_dir_all(&dir).unwrap();
        match (graph, bytes) {
            (Some(g), _) => {
                std::fs::copy(g, dir.join("model.onnx")).unwrap();
            }
            (None, Some(b)) => std::fs::write(dir.join("model.onnx"), b).unwrap(),
            (None, None) => {}
        }
        std::fs::write(dir.join("model.toml"), toml).unwrap();
    };
    let plain = "kind = \"onnx\"\nrole = \"tower\"\ngraph = \"model.onnx\"\ndim = 8\nhistory_len = 6\ncatalogue = \"shop\"\ncold_start = \"model\"\n";
    let graph = std::fs::read(fixtures().join("tower-legacy/1/model.onnx")).unwrap();
    add(
        "truncated",
        None,
        Some(&graph[..graph.len() / 2]),
        &tower_toml,
    );
    add(
        "not-onnx",
        None,
        Some(b"PK\x03\x04 this is a zip, not a graph"),
        &tower_toml,
    );
    add("missing", None, None, &tower_toml);
    for case in [
        "unknown-input",
        "wrong-dtype",
        "wrong-width",
        "wrong-output",
    ] {
        let toml = if case == "wrong-width" {
            plain.replace("dim = 8\n", "dim = 8\nuser_feature_dim = 3\n")
        } else {
            plain.to_string()
        };
        add(case, Some(&bad.join(format!("{case}.onnx"))), None, &toml);
    }
    add("right", Some(&bad.join("right.onnx")), None, plain);
    // A ranker's graph served as a tower reads candidates a tower has not.
    let dcn_as_tower = std::fs::read_to_string(root.path().join("dcn-legacy/1/model.toml"))
        .unwrap()
        .replace("role = \"ranker\"", "role = \"tower\"")
        .replace("output = \"logit\"\n", "");
    add(
        "dcn-as-tower",
        Some(&fixtures().join("dcn-legacy/1/model.onnx")),
        None,
        &dcn_as_tower,
    );
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let cases = [
        ("truncated", vec!["truncated/1/model.onnx", "not an ONNX model"]),
        ("not-onnx", vec!["not-onnx/1/model.onnx", "not an ONNX model"]),
        ("missing", vec!["missing/1/model.onnx"]),
        (
            "unknown-input",
            vec!["input `user_age` (f32 [batch, 1]) is not one rankd can feed", "history_embeddings"],
        ),
        (
            "wrong-dtype",
            vec!["input `history_mask` is i64 [batch, 6]; rankd feeds `history_mask` as f32 [B, 6] (history_len = 6)"],
        ),
        (
            "wrong-width",
            vec!["input `user_features` is f32 [batch, 5]; rankd feeds `user_features` as f32 [B, 3] (user_feature_dim = 3)"],
        ),
        (
            "wrong-output",
            vec!["the first output has shape [", ", 4]", "expected [", ", 8] (the query vectors, dim = 8)"],
        ),
        ("dcn-as-tower", vec!["input `candidate_embeddings`", "a tower has no candidates"]),
    ];
    for (model, needles) in cases {
        let info = get_json(&c, &d.url(&format!("/v1/models/{model}"))).await;
        assert_eq!(info["state"], "failed", "{model}: {info}");
        let error = info["error"].as_str().unwrap_or_default();
        for needle in needles {
            assert!(error.contains(needle), "{model}: `{needle}` in {error}");
        }
    }
    for model in ["right", "tower-legacy", "sasrec-dynamo", "dcn-legacy"] {
        let info = get_json(&c, &d.url(&format!("/v1/models/{model}"))).await;
        assert_eq!(info["state"], "ready", "{model}: {info}");
    }
    let (s, answer) = post(
        &c,
        &d.url("/v1/models/right/recommend"),
        json!({"user_id": 5, "k": 4}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");

    // Over --max-model-bytes: the graphs above it fail, naming the limit
    // and the size; those below it serve.
    let small = std::fs::metadata(fixtures().join("tower-legacy/1/model.onnx"))
        .unwrap()
        .len();
    let limit = (small + 100).to_string();
    let d = Daemon::start_with(root.path(), &["--max-model-bytes", &limit]);
    let info = get_json(&c, &d.url("/v1/models/sasrec-legacy")).await;
    assert_eq!(info["state"], "failed", "{info}");
    let error = info["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("over --max-model-bytes ({limit})")) && error.contains("weigh 59"),
        "{error}"
    );
    // tower-dynamo's graph is small, its external data is not.
    let info = get_json(&c, &d.url("/v1/models/tower-dynamo")).await;
    assert_eq!(info["state"], "failed", "{info}");
    let info = get_json(&c, &d.url("/v1/models/tower-legacy")).await;
    assert_eq!(info["state"], "ready", "{info}");
}

/// A rankd built without ONNX Runtime says so for a model that asks for
/// it, and serves the others.
#[cfg(not(feature = "onnxruntime"))]
#[tokio::test]
async fn a_rankd_without_onnxruntime_says_so_for_the_models_that_ask_for_it() {
    let root = repo(true);
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let info = get_json(&c, &d.url("/v1/models/tower-legacy-ort")).await;
    assert_eq!(info["state"], "failed", "{info}");
    let error = info["error"].as_str().unwrap();
    assert!(
        error.contains("built without the `onnxruntime` feature"),
        "{error}"
    );
    let info = get_json(&c, &d.url("/v1/models/tower-legacy")).await;
    assert_eq!(info["state"], "ready", "{info}");
}

/// The inputs the PyTorch fixtures do not read, through graphs whose
/// answers are plain arithmetic on what rankd feeds: `history_length` (a
/// tower whose query is the window's length in every component) and
/// `history_ids` with `candidate_ids` (a ranker scoring candidate id + 1000
/// × the sum of the window's ids), on each engine; and the cold start of a
/// graph that reads context.
#[tokio::test]
async fn ids_lengths_and_context_reach_the_graph_as_rankd_feeds_them() {
    let e = expected();
    let root = repo(false);
    let bad = repo_root().join("tests/fixtures/onnx-bad");
    let engines: &[&str] = if cfg!(feature = "onnxruntime") {
        &["tract", "onnxruntime"]
    } else {
        &["tract"]
    };
    let common =
        "dim = 8\nhistory_len = 6\ncatalogue = \"shop\"\ngraph = \"model.onnx\"\nkind = \"onnx\"\n";
    for engine in engines {
        for (name, toml) in [
            ("length-tower", "role = \"tower\"\ncold_start = \"model\"\n"),
            (
                "ids-ranker",
                "role = \"ranker\"\noutput = \"probability\"\n",
            ),
        ] {
            let dir = root.path().join(format!("{name}-{engine}/1"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(bad.join(format!("{name}.onnx")), dir.join("model.onnx")).unwrap();
            std::fs::write(
                dir.join("model.toml"),
                format!("{common}{toml}engine = \"{engine}\"\n"),
            )
            .unwrap();
        }
    }
    // The fixture tower as it would be left by default: the popular items
    // for a user rankd knows nothing about.
    let popular = root.path().join("tower-popular/1");
    copy_dir(&root.path().join("tower-legacy/1"), &popular);
    let text = std::fs::read_to_string(popular.join("model.toml")).unwrap();
    std::fs::write(
        popular.join("model.toml"),
        text.replace("cold_start = \"model\"\n", ""),
    )
    .unwrap();
    let d = start_with_engines(root.path());
    let c = Daemon::client();
    seed(&c, &d, &e).await;
    let all: Vec<u64> = (0..64).map(|i| 1000 + 3 * i).collect();
    for engine in engines {
        // Users 2 and 4 have 1 and 6 items in their windows: 6× the scores.
        let tower = format!("length-tower-{engine}");
        let mut scores = Vec::new();
        for user in [2, 4] {
            let (s, answer) = post(
                &c,
                &d.url(&format!("/v1/models/{tower}/score")),
                json!({"user_id": user, "items": all}),
            )
            .await;
            assert_eq!(s, 200, "{answer}");
            scores.push(floats(&answer["scores"]));
        }
        assert!(scores[0].iter().any(|s| s.abs() > 1e-3), "{:?}", scores[0]);
        for (one, six) in scores[0].iter().zip(&scores[1]) {
            assert!(close(*six, 6.0 * one), "{tower}: {six} against 6 × {one}");
        }
        // Every user: candidate id + 1000 × the sum of its last 6 items.
        let ranker = format!("ids-ranker-{engine}");
        for u in e["users"].as_array().unwrap() {
            let history = ids_of(&u["history"]);
            let window: u64 = history[history.len().saturating_sub(6)..].iter().sum();
            let candidates = ids_of(&u["dcn"]["candidates"]);
            let (s, answer) = post(
                &c,
                &d.url(&format!("/v1/models/{ranker}/score")),
                json!({"user_id": u["user"], "items": candidates}),
            )
            .await;
            assert_eq!(s, 200, "{answer}");
            let want: Vec<f64> = candidates
                .iter()
                .map(|&c| (c + 1000 * window) as f64)
                .collect();
            assert_eq!(
                floats(&answer["scores"]),
                want,
                "{ranker}, user {}",
                u["user"]
            );
        }
    }
    // A user rankd knows nothing about is a cold start, unless the request
    // brings a context the model reads.
    let url = d.url("/v1/models/tower-popular/recommend");
    let (s, answer) = post(&c, &url, json!({"user_id": 999, "k": 3})).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["cold_start"], true, "{answer}");
    let (s, answer) = post(
        &c,
        &url,
        json!({"user_id": 999, "k": 3, "context": [0.5, -1.0]}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["cold_start"], false, "{answer}");
}
