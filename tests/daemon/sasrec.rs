//! A SASRec checkpoint saved by the reference PyTorch implementation
//! (tests/fixtures/sasrec/, made by scripts/fixtures/sasrec.py), dropped into
//! a version folder as it is, `.pth` and all, with a short model.toml: the
//! daemon must answer what PyTorch answers, over HTTP and the socket, after
//! an item write, and after a click arrives over Kafka.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::common::frame::{connect, read_frame, request_frame, send};
use crate::common::parity::{close, floats};
use crate::common::*;

fn fixture(block: &str) -> PathBuf {
    repo_root().join("tests/fixtures/sasrec").join(block)
}

fn expected(block: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(block).join("expected.json")).unwrap())
        .unwrap()
}

/// A repository with model `sasrec` serving the fixture of `block`.
fn repo(block: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("sasrec/1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture(block).join("model.pth"), dir.join("model.pth")).unwrap();
    let block_line = if block == "sasrec" {
        String::new()
    } else {
        format!("block = \"{block}\"\n")
    };
    std::fs::write(
        dir.join("model.toml"),
        format!(
            "kind = \"sasrec\"\ndim = 16\nhistory_len = 8\nblocks = 2\nheads = 2\nweights = \"model.pth\"\nitems = \"item_emb\"\n{block_line}"
        ),
    )
    .unwrap();
    root
}

fn assert_scores(got: &Value, want: &[f64], what: &str) {
    let got = floats(got);
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            close(*g, *w),
            "{what}: item {}: rankd {g}, PyTorch {w}",
            i + 1
        );
    }
}

/// PyTorch's top k (item ids 1..N by its scores, the history excluded,
/// ties to the smaller id).
fn pytorch_top(scores: &[f64], history: &[u64], k: usize) -> Vec<(u64, f64)> {
    let mut all: Vec<(u64, f64)> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| (i as u64 + 1, s))
        .filter(|(id, _)| !history.contains(id))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// Top-k ids equal PyTorch's, but for neighbours whose scores are within
/// 1e-6 (their order is a rounding apart).
fn assert_top(answer: &Value, want: &[(u64, f64)], what: &str) {
    let got = ids(answer);
    assert_eq!(got.len(), want.len(), "{what}: {answer}");
    for (i, (&g, &(w, ws))) in got.iter().zip(want).enumerate() {
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

fn history(user: &Value) -> Vec<u64> {
    user["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

async fn score_all(c: &reqwest::Client, d: &Daemon, user: u64, n: u64) -> Value {
    let (s, body) = post(
        c,
        &d.url("/v1/models/sasrec/score"),
        json!({"user_id": user, "items": (1..=n).collect::<Vec<u64>>()}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    body
}

#[tokio::test]
async fn a_reference_checkpoint_answers_as_pytorch_does_over_http_and_the_socket() {
    for block in ["sasrec", "pre_ln", "post_ln"] {
        let exp = expected(block);
        let root = repo(block);
        let d = Daemon::start_with(root.path(), &[]);
        let c = Daemon::client();
        let n = exp["items"].as_u64().unwrap();
        let model = get_json(&c, &d.url("/v1/models/sasrec")).await;
        assert_eq!(model["kind"], "sasrec", "{model}");
        assert_eq!(model["items"], n, "{model}");
        let users: Vec<Value> = exp["users"].as_array().unwrap().clone();
        let histories: Vec<(u64, Vec<u64>)> = users
            .iter()
            .enumerate()
            .map(|(u, v)| (u as u64 + 1, history(v)))
            .collect();
        seed_histories(&c, &d, &histories).await;
        for (u, user) in users.iter().enumerate() {
            let id = u as u64 + 1;
            let what = format!("{block}, user {id}");
            let body = score_all(&c, &d, id, n).await;
            assert_scores(&body["scores"], &floats(&user["scores"]), &what);
            let (s, body) = post(
                &c,
                &d.url("/v1/models/sasrec/recommend"),
                json!({"user_id": id, "k": 10}),
            )
            .await;
            assert_eq!(s, 200, "{body}");
            if history(user).is_empty() {
                // Scored above by the model over an all-padding window; a
                // recommend gets the cold-start answer.
                assert_eq!(body["cold_start"], true, "{body}");
                continue;
            }
            assert_eq!(body["cold_start"], false, "{body}");
            assert_top(
                &body,
                &pytorch_top(&floats(&user["scores"]), &history(user), 10),
                &what,
            );
        }

        // The socket gives the same answers.
        let mut sock = connect(&d.uds).await;
        let user = &users[6];
        send(
            &mut sock,
            &request_frame(
                &json!({"id": 1, "op": "recommend", "model": "sasrec", "user_id": 7, "k": 5}),
            ),
            "recommend",
        )
        .await;
        let answer = read_frame(&mut sock, "recommend").await;
        assert_eq!(answer["ok"], true, "{answer}");
        assert_top(
            &answer["result"],
            &pytorch_top(&floats(&user["scores"]), &history(user), 5),
            &format!("{block}, socket"),
        );
        send(
            &mut sock,
            &request_frame(&json!({"id": 2, "op": "score", "model": "sasrec", "user_id": 7, "items": [3, 1, 2]})),
            "score",
        )
        .await;
        let answer = read_frame(&mut sock, "score").await;
        let all = floats(&user["scores"]);
        assert_scores(
            &answer["result"]["scores"],
            &[all[2], all[0], all[1]],
            &format!("{block}, socket score"),
        );

        // An item write changes the item both as a sequence input and as a
        // candidate: PyTorch's answers after the same write.
        let write = &exp["write"];
        let item = write["item"].as_u64().unwrap();
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/items/{item}")),
            json!({"embedding": write["embedding"]}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        for (u, want) in write["scores"].as_array().unwrap().iter().enumerate() {
            let body = score_all(&c, &d, u as u64 + 1, n).await;
            assert_scores(
                &body["scores"],
                &floats(want),
                &format!("{block}, user {} after the write", u + 1),
            );
        }
    }
}

/// A user rankd knows nothing of gets the cold-start answer; the model says
/// where it runs; and stored histories keep the whole window of the version
/// even when `--history-max` is smaller.
#[tokio::test]
async fn a_user_with_no_history_gets_the_cold_start_answer_and_the_model_says_where_it_runs() {
    let root = repo("sasrec");
    let d = Daemon::start_with(root.path(), &["--history-max", "3"]);
    let c = Daemon::client();
    let (s, body) = post(
        &c,
        &d.url("/v1/models/sasrec/recommend"),
        json!({"user_id": 99, "k": 4}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["cold_start"], true, "{body}");
    let model = get_json(&c, &d.url("/v1/models/sasrec")).await;
    assert_eq!(model["device"], "cpu", "{model}");
    assert_eq!(model["history_len"], 8, "{model}");
    // --history-max 3 is below the window of 8: the version's window wins,
    // so a user's last 8 items are all kept and read.
    let exp = expected("sasrec");
    let user = exp["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| history(u).len() == 8)
        .unwrap();
    seed_histories(&c, &d, &[(5, history(user))]).await;
    let stored = get_json(&c, &d.url("/v1/users/5")).await;
    assert_eq!(stored["history"].as_array().unwrap().len(), 8, "{stored}");
    let body = score_all(&c, &d, 5, 40).await;
    assert_scores(
        &body["scores"],
        &floats(&user["scores"]),
        "window of 8 under --history-max 3",
    );
}

/// On a device without a sasrec forward pass (the fault-injecting stand-in
/// for a GPU, as the CUDA backend today), the sasrec model is served from
/// the CPU and says so, with PyTorch's answers, while the device stays
/// healthy and serves the other models.
#[tokio::test]
async fn a_device_without_a_sasrec_forward_serves_it_from_the_cpu_and_stays_in_service() {
    let root = repo("sasrec");
    let towers = repo_root().join("tests/fixtures/towers");
    for model in ["two_tower", "ranker"] {
        let to = root.path().join(model).join("1");
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(towers.join(model).join("1")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    // The ranker reads the two-tower model's table.
    let d = Daemon::start_with(root.path(), &["--device", "faulty-cpu:1000000"]);
    let c = Daemon::client();
    let sasrec = get_json(&c, &d.url("/v1/models/sasrec")).await;
    assert_eq!(sasrec["device"], "cpu", "{sasrec}");
    let why = sasrec["device_reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("faulty-cpu has no forward pass for sasrec models"),
        "{sasrec}"
    );
    let tower = get_json(&c, &d.url("/v1/models/two_tower")).await;
    assert_eq!(tower["device"], "faulty-cpu", "{tower}");
    assert!(tower["device_reason"].is_null(), "{tower}");
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["device"], "faulty-cpu", "{body}");
    assert!(
        d.log().contains("serving this model from the CPU"),
        "{}",
        d.log()
    );

    let exp = expected("sasrec");
    let user = &exp["users"][5];
    seed_histories(&c, &d, &[(3, history(user))]).await;
    let body = score_all(&c, &d, 3, 40).await;
    assert_scores(
        &body["scores"],
        &floats(&user["scores"]),
        "sasrec on the CPU beside a device",
    );
    let (s, body) = post(
        &c,
        &d.url("/v1/models/two_tower/recommend"),
        json!({"user_id": 3, "k": 5}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (_, body) = get(&c, &d.url("/readyz")).await;
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert!(
        ready["device_reason"].is_null(),
        "the device stays healthy: {body}"
    );
}

/// Writes the fixture's item embeddings (rows 1..N of `item_emb.weight`) as
/// an item table file with ids 1..N.
fn write_item_table(pth: &std::path::Path, to: &std::path::Path) {
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        candle_core::pickle::read_all(pth)
            .unwrap()
            .into_iter()
            .collect();
    let emb = &tensors["item_emb.weight"];
    let (rows, d) = emb.dims2().unwrap();
    let n = rows - 1;
    let values: Vec<f32> = emb
        .narrow(0, 1, n)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ids: Vec<u64> = (1..=n as u64).collect();
    crate::common::write_item_table(to, &ids, d, &values);
}

/// `cpu_scoring = "exact-int8"` and an item table file in place of
/// `items = "item_emb"` give PyTorch's answers too: the int8 scan the same
/// lists as the f32 one, the file the same scores as the embedded table.
#[tokio::test]
async fn exact_int8_and_an_item_table_file_answer_as_the_embedded_f32_model() {
    let root = repo("sasrec");
    let base = root.path().join("sasrec/1");
    let toml = std::fs::read_to_string(base.join("model.toml")).unwrap();
    let int8 = root.path().join("sasrec-int8/1");
    std::fs::create_dir_all(&int8).unwrap();
    std::fs::copy(base.join("model.pth"), int8.join("model.pth")).unwrap();
    std::fs::write(
        int8.join("model.toml"),
        format!("cpu_scoring = \"exact-int8\"\n{toml}"),
    )
    .unwrap();
    let file = root.path().join("sasrec-file/1");
    std::fs::create_dir_all(&file).unwrap();
    std::fs::copy(base.join("model.pth"), file.join("model.pth")).unwrap();
    write_item_table(&base.join("model.pth"), &file.join("items.safetensors"));
    std::fs::write(
        file.join("model.toml"),
        toml.replace("items = \"item_emb\"", "items = \"items.safetensors\""),
    )
    .unwrap();
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    assert_eq!(
        d.log().matches("cpu_scoring = exact-int8").count(),
        1,
        "one model scans the int8 copy: {}",
        d.log()
    );
    let exp = expected("sasrec");
    for (u, user) in exp["users"].as_array().unwrap().iter().enumerate() {
        let history = history(user);
        if history.is_empty() {
            continue;
        }
        let id = u as u64 + 1;
        seed_histories(&c, &d, &[(id, history.clone())]).await;
        let want = floats(&user["scores"]);
        let mut lists = Vec::new();
        for model in ["sasrec", "sasrec-int8", "sasrec-file"] {
            let (s, body) = post(
                &c,
                &d.url(&format!("/v1/models/{model}/score")),
                json!({"user_id": id, "items": (1..=40).collect::<Vec<u64>>()}),
            )
            .await;
            assert_eq!(s, 200, "{body}");
            assert_scores(&body["scores"], &want, &format!("{model}, user {id}"));
            let (s, body) = post(
                &c,
                &d.url(&format!("/v1/models/{model}/recommend")),
                json!({"user_id": id, "k": 10}),
            )
            .await;
            assert_eq!(s, 200, "{body}");
            assert_top(
                &body,
                &pytorch_top(&want, &history, 10),
                &format!("{model}, user {id}"),
            );
            lists.push(body["items"].clone());
        }
        assert_eq!(
            lists[1], lists[0],
            "exact-int8 answers the f32 scan's list, user {id}"
        );
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::common::kafka::Broker;

    /// The last click of a user, arriving over Kafka, enters the attention:
    /// the next answer is PyTorch's for the history that ends with it.
    #[tokio::test]
    async fn a_click_over_kafka_changes_the_next_answer_to_pytorchs() {
        let broker = Broker::start();
        broker.create_topics(&["rankd.events"], 1);
        let root = repo("sasrec");
        let d = Daemon::start_with(root.path(), &["--kafka-brokers", &broker.bootstrap()]);
        let c = Daemon::client();
        let exp = expected("sasrec");
        let user = exp["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| history(u).len() >= 4)
            .unwrap();
        let full = history(user);
        let (before, click) = full.split_at(full.len() - 1);
        seed_histories(&c, &d, &[(42, before.to_vec())]).await;
        let want = floats(&user["scores"]);
        let first = score_all(&c, &d, 42, 40).await;
        let far = floats(&first["scores"])
            .iter()
            .zip(&want)
            .any(|(g, w)| (g - w).abs() > 1e-3);
        assert!(
            far,
            "the answer before the click differs from the one after it"
        );
        let producer = broker.producer();
        producer.send(
            "rankd.events",
            "42",
            &json!({"user_id": 42, "item_id": click[0], "type": "click", "ts_ms": 1764000000000u64}).to_string(),
        );
        producer.flush();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let body = score_all(&c, &d, 42, 40).await;
            let got = floats(&body["scores"]);
            if got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| close(*g, *w)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the click never reached the answer: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (s, body) = post(
            &c,
            &d.url("/v1/models/sasrec/recommend"),
            json!({"user_id": 42, "k": 10}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_top(&body, &pytorch_top(&want, &full, 10), "after the click");
    }
}
