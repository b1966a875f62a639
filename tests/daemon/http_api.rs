//! The HTTP API end to end: the real daemon, the demo models, a real client.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::reference::Reference;
use crate::common::*;

#[tokio::test]
async fn models_health_and_readiness() {
    let d = Daemon::start();
    let c = Daemon::client();
    let (s, body) = get(&c, &d.url("/healthz")).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["device"], "cpu");
    let (s, body) = get(&c, &d.url("/v1/models")).await;
    assert_eq!(s, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    let list = models["models"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let (s, body) = get(&c, &d.url("/v1/models/demo")).await;
    assert_eq!(s, 200);
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["kind"], "two_tower");
    assert_eq!(m["version"], 1);
    assert_eq!(m["state"], "ready");
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["dim"], 64);
    assert_eq!(m["user_feature_dim"], 16);
    assert_eq!(m["history_len"], 50);
    assert_eq!(m["items"], 100_000);
    assert_eq!(m["batching"]["max_batch_size"], 64);
    assert_eq!(m["batching"]["max_queue_delay_us"], 500);
    let (_, body) = get(&c, &d.url("/v1/models/demo-ranker")).await;
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["kind"], "ranker");
}

#[tokio::test]
async fn a_cluster_history_brings_back_that_cluster() {
    let d = Daemon::start();
    let c = Daemon::client();
    let clusters = demo_clusters();
    let by_cluster: HashMap<u32, Vec<u64>> = demo_cluster_members();
    let mut rng = Rng::new(99);
    for cluster in [0u32, 7, 13, 21, 34, 49] {
        let pool = &by_cluster[&cluster];
        let history: Vec<u64> = (0..5)
            .map(|_| pool[rng.below(pool.len() as u64) as usize])
            .collect();
        let user = 5000 + cluster as u64;
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/users/{user}")),
            json!({ "history": history }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/recommend"),
            json!({ "user_id": user, "k": 10 }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let got = ids(&body);
        assert_eq!(got.len(), 10);
        let same = got.iter().filter(|id| clusters[id] == cluster).count();
        assert!(
            same >= 8,
            "cluster {cluster}: only {same} of 10 from the cluster: {got:?}"
        );
        assert!(
            got.iter().all(|id| !history.contains(id)),
            "history items must be excluded"
        );
        // The ranker agrees: in-cluster candidates score above others.
        let other = by_cluster[&((cluster + 1) % 50)][0];
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo-ranker/score"),
            json!({ "user_id": user, "items": [got[0], other] }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let scores = body["scores"].as_array().unwrap();
        assert!(
            scores[0].as_f64().unwrap() > 0.5 && scores[1].as_f64().unwrap() < 0.5,
            "{body}"
        );
    }
}

#[tokio::test]
async fn answers_match_an_independent_reference() {
    let d = Daemon::start();
    let c = Daemon::client();
    let reference = Reference::load();
    let mut rng = Rng::new(2026);
    for user in 0..6u64 {
        let len = 1 + rng.below(60) as usize;
        let history = rng.history(len);
        let features = rng.features();
        let exclude = rng.history(3);
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/users/{user}")),
            json!({ "history": history, "features": features }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        // Only the newest 50 feed the model, but every stored item is excluded.
        let expected = reference.recommend(&history, &features, 20, &exclude);
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/recommend"),
            json!({ "user_id": user, "k": 20, "exclude": exclude }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), 20);
        for (got, (id, score)) in items.iter().zip(&expected) {
            let gs = got["score"].as_f64().unwrap();
            assert!(
                (gs - score).abs() <= 1e-4 * score.abs().max(1.0),
                "user {user}: {got} vs ({id}, {score})"
            );
        }
        // Ids agree except where two reference scores are within float noise.
        for (i, (got, (id, score))) in items.iter().zip(&expected).enumerate() {
            if got["id"].as_u64().unwrap() != *id {
                let neighbour_close = expected.iter().any(|(other, s)| {
                    other == &got["id"].as_u64().unwrap() && (s - score).abs() < 1e-5
                });
                assert!(
                    neighbour_close,
                    "user {user}, rank {i}: got {got}, expected ({id}, {score})"
                );
            }
        }
        let candidates: Vec<u64> = rng.history(7);
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo-ranker/score"),
            json!({ "user_id": user, "items": candidates }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        for (got, &cand) in body["scores"].as_array().unwrap().iter().zip(&candidates) {
            let want = reference.rank(&history, &features, cand);
            assert!(
                (got.as_f64().unwrap() - want).abs() < 1e-5,
                "ranker {cand}: {got} vs {want}"
            );
        }
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/score"),
            json!({ "user_id": user, "items": candidates }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let q = reference.query(&history, &features);
        for (got, &cand) in body["scores"].as_array().unwrap().iter().zip(&candidates) {
            let want = reference.dot(&q, cand);
            assert!(
                (got.as_f64().unwrap() - want).abs() < 1e-4,
                "dot {cand}: {got} vs {want}"
            );
        }
    }
    // A user never seen: a cold start, answered from the popular items (the
    // histories written above count), less `exclude`.
    let first = reference.items.id(0);
    let (s, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({ "user_id": 987654321, "k": 5, "exclude": [first] }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["cold_start"], json!(true), "{body}");
    assert_eq!(body["degraded"], json!(false), "{body}");
    let got = ids(&body);
    assert_eq!(got.len(), 5, "{body}");
    assert!(!got.contains(&first), "{body}");
}

#[tokio::test]
async fn batched_answers_equal_one_at_a_time() {
    let d = Daemon::start();
    let c = Daemon::client();
    let mut rng = Rng::new(5);
    let users: Vec<u64> = (100..164).collect();
    let histories: Vec<(u64, Vec<u64>)> = users.iter().map(|&u| (u, rng.history(10))).collect();
    seed_histories(&c, &d, &histories).await;
    let sequential = recommend_each(&c, &d, "demo", &users, 10).await;
    let metrics_before = metrics(&c, &d).await;
    let concurrent = futures::future::join_all(users.iter().map(|&u| {
        let c = c.clone();
        let url = d.url("/v1/models/demo/recommend");
        async move { post(&c, &url, json!({ "user_id": u, "k": 10 })).await }
    }))
    .await;
    for ((s, body), seq) in concurrent.iter().zip(&sequential) {
        assert_eq!(*s, 200);
        assert_eq!(ids(body), ids(seq));
        for (a, b) in body["items"]
            .as_array()
            .unwrap()
            .iter()
            .zip(seq["items"].as_array().unwrap())
        {
            assert!((a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs() < 1e-5);
        }
    }
    // The concurrent burst really was batched: fewer batches than requests.
    let batches =
        |text: &str| sample(text, "rankd_batch_requests_count{model=\"demo\"}").unwrap_or(0.0);
    let metrics_after = metrics(&c, &d).await;
    let burst_batches = batches(&metrics_after) - batches(&metrics_before);
    assert!(
        burst_batches < users.len() as f64,
        "{burst_batches} batches for {} requests",
        users.len()
    );
}

#[tokio::test]
async fn user_updates_replace_only_the_given_parts() {
    let d = Daemon::start();
    let c = Daemon::client();
    let url = d.url("/v1/users/77");
    let (s, body) = post(&c, &url, json!({ "history": [1, 2, 3] })).await;
    assert_eq!((s, body["history"].clone()), (200, json!([1, 2, 3])));
    let features: Vec<f32> = (0..16).map(|i| i as f32 / 10.0).collect();
    let (s, body) = post(&c, &url, json!({ "features": features })).await;
    assert_eq!(s, 200);
    assert_eq!(body["history"], json!([1, 2, 3]));
    assert_eq!(body["features"].as_array().unwrap().len(), 16);
    let (s, body) = post(&c, &url, json!({ "history": [] })).await;
    assert_eq!(s, 200);
    assert_eq!(body["history"], json!([]));
    assert_eq!(body["features"].as_array().unwrap().len(), 16);
    let a = post_json(&c, &url, &json!({ "history": [5, 100001] })).await;
    assert_http_error("an unknown history item", &a, 422, "invalid", &["100001"]);
    let a = post_json(&c, &url, &json!({ "features": [1.0, 2.0] })).await;
    assert_http_error("2 features of 16", &a, 422, "invalid", &["16", "2"]);
    // Neither refusal changed the user.
    let v = get_json(&c, &url).await;
    assert_eq!(v["history"], json!([]), "{v}");
    assert_eq!(v["features"].as_array().unwrap().len(), 16, "{v}");
}

#[tokio::test]
async fn a_passed_deadline_is_504_and_a_full_queue_is_429() {
    // A batch waits 300 ms for company unless it fills: a lone request sits in
    // the queue, long enough for a short deadline to pass and for the queue
    // (one slot) to be full.
    let dir = slow_repo(300_000, 1);
    let d = Daemon::start_with(dir.path(), &[]);
    let c = Daemon::client();
    let url = d.url("/v1/models/slow/recommend");
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            post_json(&c, &url, &json!({ "user_id": 1, "timeout_ms": 50 })).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let a = post_json(&c, &url, &json!({ "user_id": 2 })).await;
    assert_http_error(
        "a second request on a full queue",
        &a,
        429,
        "overloaded",
        &["max_queue_size is 1"],
    );
    assert_eq!(a.header(reqwest::header::RETRY_AFTER), Some("1"));
    let a = first.await.unwrap();
    assert_http_error("a 50 ms deadline", &a, 504, "deadline_exceeded", &["50"]);
    // Once the queue drains, requests are admitted again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (s, body) = post(&c, &url, json!({ "user_id": 3, "k": 3 })).await;
    assert_eq!(s, 200, "{body}");
    // A caller that hangs up before its deadline: the request is dropped
    // unanswered when its batch comes up, counted as cancelled.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let gone = impatient
        .post(&url)
        .json(&json!({ "user_id": 4, "timeout_ms": 10000 }))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up first");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let metrics = metrics(&c, &d).await;
    for needle in [
        "rankd_requests_dropped_total{model=\"slow\",priority=\"interactive\",reason=\"deadline\"} 1",
        "rankd_requests_dropped_total{model=\"slow\",priority=\"interactive\",reason=\"cancelled\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_broken_model_does_not_take_the_others_down() {
    let dir = tempfile::tempdir().unwrap();
    derived_model(dir.path(), "good", "demo", |t| t);
    // Ranker weights under a two_tower spec: the first layer's input width is wrong.
    derived_model(dir.path(), "bad", "demo", |t| {
        t.replace(
            "demo/1/weights.safetensors",
            "demo-ranker/1/weights.safetensors",
        )
    });
    std::fs::create_dir_all(dir.path().join("typo/1")).unwrap();
    std::fs::write(
        dir.path().join("typo/1/model.toml"),
        "kind = \"three_tower\"\n",
    )
    .unwrap();
    let d = Daemon::start_with(dir.path(), &[]);
    let c = Daemon::client();
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("bad") && body.contains("failed"), "{body}");
    let (_, body) = get(&c, &d.url("/v1/models/bad")).await;
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["state"], "failed");
    let err = m["error"].as_str().unwrap();
    assert!(
        err.contains("weights.safetensors")
            && err.contains("tower.0.weight")
            && err.contains("[out, 80]")
            && err.contains("[32, 208]"),
        "{err}"
    );
    let (_, body) = get(&c, &d.url("/v1/models/typo")).await;
    assert!(
        body.contains("three_tower") && body.contains("failed"),
        "{body}"
    );
    let a = post_json(
        &c,
        &d.url("/v1/models/bad/recommend"),
        &json!({ "user_id": 1 }),
    )
    .await;
    assert_http_error("recommend on a failed model", &a, 503, "not_ready", &[]);
    let (s, body) = post(
        &c,
        &d.url("/v1/models/good/recommend"),
        json!({ "user_id": 1, "k": 4 }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(ids(&body).len(), 4);
}

#[tokio::test]
async fn metrics_cover_requests_batches_queues_and_models() {
    let d = Daemon::start();
    let c = Daemon::client();
    let (s, _) = post(&c, &d.url("/v1/users/1"), json!({ "history": [3, 4] })).await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({ "user_id": 1 }),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({ "user_id": 1, "k": 0 }),
    )
    .await;
    assert_eq!(s, 422);
    let (s, _) = post(&c, &d.url("/v1/users/7"), json!({ "history": [1, 2] })).await;
    assert_eq!(s, 200);
    for _ in 0..2 {
        let (s, _) = get(&c, &d.url("/v1/users/7")).await;
        assert_eq!(s, 200);
    }
    // Refused before the service sees them: still counted, under the route
    // they were meant for (unknown routes and models under empty labels).
    let url = d.url("/v1/models/demo/recommend");
    let r = c.post(&url).body("{\"user_id\": ").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Refused on its Content-Length alone (the body is never read as a
    // body: what follows is drained and dropped), over a raw socket.
    let head = format!(
        "POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        2 << 20
    );
    let answer = raw_exchange(&d.addr(), head.as_bytes(), Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let r = c
        .post(&url)
        .body("{\"user_id\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let r = c
        .post(d.url("/v1/models/nope/recommend"))
        .body("[")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = c.get(d.url("/v1/users/abc")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    assert_eq!(get(&c, &d.url("/nope")).await.0, 404);
    let r = c.delete(d.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let text = metrics(&c, &d).await;
    for needle in [
        "rankd_requests_total{model=\"demo\",priority=\"\",route=\"recommend\",status=\"400\",version=\"\"} 1",
        "rankd_requests_total{model=\"demo\",priority=\"\",route=\"recommend\",status=\"413\",version=\"\"} 1",
        "rankd_requests_total{model=\"demo\",priority=\"interactive\",route=\"recommend\",status=\"422\",version=\"\"} 1",
        "rankd_requests_total{model=\"demo\",priority=\"\",route=\"recommend\",status=\"422\",version=\"\"} 1",
        "rankd_requests_total{model=\"\",priority=\"\",route=\"recommend\",status=\"400\",version=\"\"} 1",
        "rankd_requests_total{model=\"\",priority=\"\",route=\"get_user\",status=\"422\",version=\"\"} 1",
        "rankd_requests_total{model=\"\",priority=\"\",route=\"unmatched\",status=\"404\",version=\"\"} 1",
        "rankd_requests_total{model=\"\",priority=\"\",route=\"unmatched\",status=\"405\",version=\"\"} 1",
        "rankd_requests_total{model=\"\",priority=\"\",route=\"upsert_user\",status=\"200\",version=\"\"} 2",
        "rankd_requests_total{model=\"\",priority=\"\",route=\"get_user\",status=\"200\",version=\"\"} 2",
        "rankd_requests_total{model=\"demo\",priority=\"interactive\",route=\"recommend\",status=\"200\",version=\"1\"} 1",
        "rankd_request_duration_seconds_bucket{model=\"demo\",priority=\"interactive\",route=\"recommend\"",
        "rankd_queue_duration_seconds_count{model=\"demo\",priority=\"interactive\"} 1",
        "rankd_batch_execution_seconds_count{device=\"cpu\",model=\"demo\",version=\"1\"} 1",
        "rankd_batch_size_bucket{model=\"demo\"",
        "rankd_queue_depth{model=\"demo\",priority=\"interactive\"} 0",
        "rankd_model_state{model=\"demo\",state=\"ready\",version=\"1\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[test]
fn demo_files_are_reproducible_and_generated_on_first_start() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["demo/1", "demo-ranker/1"] {
        std::fs::create_dir_all(dir.path().join(f)).unwrap();
        std::fs::copy(
            demo_models().join(f).join("model.toml"),
            dir.path().join(f).join("model.toml"),
        )
        .unwrap();
    }
    let d = Daemon::start_with(dir.path(), &[]);
    assert!(
        d.log().contains("generated the demo model files"),
        "{}",
        d.log()
    );
    for f in rankd::internals::demo_files() {
        let a = std::fs::read(demo_models().join(&f)).unwrap();
        let b = std::fs::read(dir.path().join(&f)).unwrap();
        assert!(a == b, "{} differs between two generations", f.display());
    }
}

#[test]
fn cli_documents_flags_and_reads_the_environment() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rankd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--models",
        "--http",
        "--config",
        "RANKD_MODELS",
        "RANKD_HTTP",
        "RANKD_CONFIG",
    ] {
        assert!(
            help.contains(flag),
            "{flag} missing from serve --help:\n{help}"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rankd"))
        .arg("serve")
        .env("RANKD_MODELS", "/nonexistent/models")
        .env("RANKD_HTTP", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/models"), "{err}");
}

/// A user's stored history may be longer than `history_len` (up to
/// `--history-max`): the tower pools the newest `history_len` ids, recommend
/// excludes every stored id, and a longer history is refused naming the limit.
#[tokio::test]
async fn histories_beyond_history_len_are_kept_and_all_excluded() {
    let d = Daemon::start_with(&demo_models(), &["--history-max", "120"]);
    let c = Daemon::client();
    let rec = d.url("/v1/models/demo/recommend");
    let (s, top) = post(&c, &rec, json!({ "user_id": 1, "k": 100 })).await;
    assert_eq!(s, 200);
    let seen = ids(&top);
    assert_eq!(seen.len(), 100);
    let (s, body) = post(&c, &d.url("/v1/users/2"), json!({ "history": seen })).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["history"].as_array().unwrap().len(), 100);
    let (_, stored) = get(&c, &d.url("/v1/users/2")).await;
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["history"], json!(seen));

    // None of the 100 comes back, though they are the best items for a
    // history-less user and only the newest 50 shape user 2's query.
    let (s, got) = post(&c, &rec, json!({ "user_id": 2, "k": 200 })).await;
    assert_eq!(s, 200);
    let got = ids(&got);
    assert_eq!(got.len(), 200);
    assert!(got.iter().all(|id| !seen.contains(id)), "{got:?}");

    // Pooling uses the newest history_len (50): user 3 with only those 50
    // gets the same scores.
    let (s, _) = post(&c, &d.url("/v1/users/3"), json!({ "history": seen[50..] })).await;
    assert_eq!(s, 200);
    let probe: Vec<u64> = got[..20].to_vec();
    let score = d.url("/v1/models/demo/score");
    let (_, a) = post(&c, &score, json!({ "user_id": 2, "items": probe })).await;
    let (_, b) = post(&c, &score, json!({ "user_id": 3, "items": probe })).await;
    assert_eq!(a["scores"], b["scores"]);

    let long: Vec<u64> = (1..=121).collect();
    let (s, body) = post(&c, &d.url("/v1/users/4"), json!({ "history": long })).await;
    assert_eq!(s, 422);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("history must have <= 120 item ids") && msg.contains("got 121"),
        "{msg}"
    );
}

/// A clean stop writes a last snapshot: user state set over HTTP survives a
/// restart even when no periodic snapshot ran in between.
#[tokio::test]
async fn a_clean_stop_snapshots_and_a_restart_restores() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = [
        "--snapshot-dir",
        dir.as_str(),
        "--snapshot-interval-ms",
        "600000",
    ];
    let c = Daemon::client();
    let mut first = Daemon::start_with(&demo_models(), &args);
    let features: Vec<f64> = (0..16).map(|i| i as f64 * 0.25).collect();
    let body = json!({ "history": [5, 6, 7], "features": features });
    let (s, _) = post(&c, &first.url("/v1/users/77"), body).await;
    assert_eq!(s, 200);
    let before = post(
        &c,
        &first.url("/v1/models/demo/recommend"),
        json!({ "user_id": 77 }),
    )
    .await;
    assert_eq!(
        std::fs::read_dir(state.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("snapshot-"))
            .count(),
        0,
        "no periodic snapshot yet"
    );
    assert!(
        first.signal_and_wait("TERM", Duration::from_secs(5)),
        "rankd did not stop on SIGTERM"
    );
    let second = Daemon::start_with(&demo_models(), &args);
    let (_, stored) = get(&c, &second.url("/v1/users/77")).await;
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["history"], json!([5, 6, 7]));
    assert_eq!(stored["features"], json!(features));
    let after = post(
        &c,
        &second.url("/v1/models/demo/recommend"),
        json!({ "user_id": 77 }),
    )
    .await;
    assert_eq!(before, after);
}

/// Reading a user is not an update: `GET /v1/users/{id}` leaves
/// `rankd_user_updates_total{source="api"}` where it was, while each accepted
/// `POST /v1/users/{id}` counts exactly one (and a refused one none).
#[tokio::test]
async fn reading_a_user_is_not_counted_as_an_update() {
    const UPDATES: &str = "rankd_user_updates_total{source=\"api\"}";
    let d = Daemon::start();
    let c = Daemon::client();
    let updates = |text: &str| sample(text, UPDATES).unwrap_or(0.0);
    let before = updates(&metrics(&c, &d).await);

    let (s, body) = post(&c, &d.url("/v1/users/77"), json!({ "history": [1, 2, 3] })).await;
    assert_eq!(s, 200, "{body}");
    let text = metrics(&c, &d).await;
    assert_eq!(
        sample(&text, UPDATES),
        Some(before + 1.0),
        "one accepted upsert, one update:\n{text}"
    );

    // Reads of a known user and of users never seen.
    for user in [77u64, 77, 78, 12_345, 77] {
        let v = get_json(&c, &d.url(&format!("/v1/users/{user}"))).await;
        assert_eq!(v["user_id"], user, "{v}");
        let want = if user == 77 {
            json!([1, 2, 3])
        } else {
            json!([])
        };
        assert_eq!(v["history"], want, "user {user}: {v}");
    }
    let text = metrics(&c, &d).await;
    assert_eq!(
        sample(
            &text,
            "rankd_requests_total{model=\"\",priority=\"\",route=\"get_user\",status=\"200\",version=\"\"}"
        ),
        Some(5.0),
        "the five reads were served:\n{text}"
    );
    assert_eq!(
        sample(&text, UPDATES),
        Some(before + 1.0),
        "five GETs of users were counted as user updates:\n{text}"
    );

    // A refused upsert counts nothing; the next accepted one counts one.
    let a = post_json(&c, &d.url("/v1/users/77"), &json!({ "history": [100_001] })).await;
    assert_http_error("an unknown history item", &a, 422, "invalid", &["100001"]);
    let (s, body) = post(&c, &d.url("/v1/users/77"), json!({ "history": [4] })).await;
    assert_eq!(s, 200, "{body}");
    let text = metrics(&c, &d).await;
    assert_eq!(
        sample(&text, UPDATES),
        Some(before + 2.0),
        "two accepted upserts, two updates:\n{text}"
    );
}
