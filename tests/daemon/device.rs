//! Device selection and CPU fallback through the real daemon, on a host
//! without a GPU: `auto` falls back to the CPU and says why; the fault-
//! injecting device fails every third batch and every request still gets the
//! right answer exactly once.

use serde_json::{json, Value};

use crate::common::*;

/// `RANKD_EXPECT_GPU=1` says the host has a GPU rankd must open (set it
/// when running the suite on a GPU machine): then `auto` must pick it, and
/// this test fails rather than pass on the CPU.
fn expect_gpu() -> bool {
    std::env::var("RANKD_EXPECT_GPU").is_ok_and(|v| v == "1")
}

#[tokio::test]
async fn auto_picks_the_gpu_where_one_is_expected_and_else_serves_on_the_cpu_saying_why() {
    let d = Daemon::start_with(&demo_models(), &["--device", "auto"]);
    let c = Daemon::client();
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    if expect_gpu() {
        assert_eq!(
            r["device"],
            "cuda:0",
            "RANKD_EXPECT_GPU=1: {body}\n{}",
            d.log()
        );
        assert!(r["device_reason"].is_null(), "{body}");
        return;
    }
    assert_eq!(r["device"], "cpu");
    let reason = r["device_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cuda:0 not used"), "{body}");
    let (_, body) = get(&c, &d.url("/v1/models/demo")).await;
    assert!(body.contains("cuda:0 not used"), "{body}");
    assert!(d.log().contains("serving on the CPU"), "{}", d.log());
}

#[test]
fn an_unknown_device_is_refused_at_start() {
    let models = demo_models();
    let out = serve_output(&[
        "--http",
        "127.0.0.1:0",
        "--uds",
        "",
        "--snapshot-dir",
        "",
        "--device",
        "tpu:0",
        "--models",
        models.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown device 'tpu:0'"), "{err}");
}

#[tokio::test]
async fn failed_batches_are_re_executed_and_no_request_is_lost() {
    let reference = Daemon::start_with(&demo_models(), &["--device", "cpu"]);
    let d = Daemon::start_with(&demo_models(), &["--device", "faulty-cpu:3"]);
    let c = Daemon::client();
    let users: Vec<u64> = (0..240).collect();
    let histories: Vec<(u64, Vec<u64>)> =
        users.iter().map(|&u| (u, spread_history(u, 4))).collect();
    seed_histories(&c, &reference, &histories).await;
    seed_histories(&c, &d, &histories).await;
    let expected = recommend_each(&c, &reference, "demo", &users, 10).await;
    // Concurrent waves, so batches of several requests fail and are re-run.
    for wave in users.chunks(60) {
        let answers = futures::future::join_all(wave.iter().map(|&u| {
            let (c, url) = (c.clone(), d.url("/v1/models/demo/recommend"));
            async move { post(&c, &url, json!({"user_id": u, "k": 10})).await }
        }))
        .await;
        for (&u, (s, body)) in wave.iter().zip(answers) {
            assert_eq!(s, 200, "user {u}: {body}");
            assert_eq!(ids(&body), ids(&expected[u as usize]), "user {u}");
        }
    }
    let text = metrics(&c, &d).await;
    let fallbacks = sample(&text, "rankd_fallback_total{reason=\"launch\"}").unwrap_or(0.0);
    assert!(fallbacks >= 1.0, "{text}");
    let served = sample(
        &text,
        "rankd_requests_total{model=\"demo\",priority=\"interactive\",route=\"recommend\",status=\"200\",version=\"1\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(
        served as usize,
        users.len(),
        "every request answered exactly once"
    );
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 200, "an unhealthy device leaves rankd ready: {body}");
    assert!(d.log().contains("serving from the CPU copy"), "{}", d.log());
}
