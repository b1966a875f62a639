//! Hostile input against the real daemon over real HTTP (and raw TCP): the
//! requests that need their own choreography. The request/answer pairs are
//! the table in `http_cases`.
//!
//! The contract: every error is `{"error": {"type", "message"}}` with
//! 400 malformed JSON or an empty body, 404 unknown model or route,
//! 422 well-formed JSON with wrong types or values, 413 an oversized body,
//! 429 + Retry-After a full queue, 504 a passed deadline, 503 not ready;
//! messages name the limit and the value received; and the daemon keeps
//! answering correctly afterwards.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::http_cases;

pub const RECOMMEND: &str = "/v1/models/demo/recommend";
pub const SCORE: &str = "/v1/models/demo/score";
pub const RANKER_SCORE: &str = "/v1/models/demo-ranker/score";
pub const RANKER_RECOMMEND: &str = "/v1/models/demo-ranker/recommend";
/// The default `max_body_bytes`.
const BODY_LIMIT: usize = 1 << 20;
/// The user whose answers are the reference; no test changes its state.
pub const PROBE_USER: u64 = 42;

/// Checks a successful recommend answer: 200, `k` distinct catalogue items,
/// finite scores sorted descending.
pub fn assert_recommend_ok(ctx: &str, a: &Answer, model: &str, k: usize) -> Vec<(u64, f32)> {
    assert_eq!(a.status, 200, "{ctx}: {}", a.text);
    let v: Value = serde_json::from_str(&a.text).unwrap();
    assert_eq!(v["model"], model, "{ctx}: {v}");
    let items: Vec<(u64, f32)> = v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{ctx}: no items: {v}"))
        .iter()
        .map(|i| {
            (
                i["id"].as_u64().unwrap(),
                i["score"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(items.len(), k, "{ctx}: item count");
    let mut ids: Vec<u64> = items.iter().map(|i| i.0).collect();
    assert!(
        ids.iter().all(|id| (1..=100_000).contains(id)),
        "{ctx}: id outside the catalogue: {ids:?}"
    );
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), k, "{ctx}: duplicate ids");
    assert!(
        items.iter().all(|i| i.1.is_finite()),
        "{ctx}: non-finite score"
    );
    assert!(
        items.windows(2).all(|w| w[0].1 >= w[1].1),
        "{ctx}: scores not sorted descending: {items:?}"
    );
    items
}

/// The reference recommendation, taken before any hostile request.
pub struct Probe {
    pub items: Vec<(u64, f32)>,
}

impl Probe {
    pub async fn take(d: &Daemon, c: &reqwest::Client) -> Self {
        // A user with history and features, so the scores mean something.
        let features: Vec<f32> = (0..16).map(|i| ((i as f32) * 0.7).sin()).collect();
        let a = post_raw(
            c,
            &d.url(&format!("/v1/users/{PROBE_USER}")),
            json!({"history": [11, 222, 3333, 44444], "features": features}).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "probe user upsert: {}", a.text);
        let a = post_raw(
            c,
            &d.url(RECOMMEND),
            json!({"user_id": PROBE_USER, "k": 10}).to_string(),
        )
        .await;
        let items = assert_recommend_ok("reference recommend", &a, "demo", 10);
        assert!(
            items[0].1 > items[9].1,
            "the reference scores are all equal: {items:?}"
        );
        Probe { items }
    }

    /// The daemon still answers a valid recommend, and the same as before;
    /// scoring the same items agrees with the recommend scores.
    pub async fn check(&self, d: &mut Daemon, c: &reqwest::Client, after: &str) {
        assert!(d.is_running(), "daemon exited after {after}\n{}", d.log());
        let a = post_raw(
            c,
            &d.url(RECOMMEND),
            json!({"user_id": PROBE_USER, "k": 10}).to_string(),
        )
        .await;
        let items = assert_recommend_ok(&format!("recommend after {after}"), &a, "demo", 10);
        let ids: Vec<u64> = items.iter().map(|i| i.0).collect();
        let want: Vec<u64> = self.items.iter().map(|i| i.0).collect();
        assert_eq!(ids, want, "recommend changed after {after}");
        for (got, want) in items.iter().zip(&self.items) {
            assert!(
                (got.1 - want.1).abs() <= 1e-4 * want.1.abs().max(1.0),
                "score of {} changed after {after}: {} vs {}",
                got.0,
                got.1,
                want.1
            );
        }
        let a = post_raw(
            c,
            &d.url(SCORE),
            json!({"user_id": PROBE_USER, "items": ids}).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "score after {after}: {}", a.text);
        let v: Value = serde_json::from_str(&a.text).unwrap();
        let scores: Vec<f64> = v["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        assert_eq!(scores.len(), 10, "score after {after}: {v}");
        for (s, (id, r)) in scores.iter().zip(&self.items) {
            assert!(
                (*s as f32 - r).abs() <= 1e-3 * r.abs().max(1.0),
                "score of item {id} after {after}: score says {s}, recommend said {r}"
            );
        }
    }
}

fn repeat_ids(n: usize) -> String {
    (1..=n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

fn zeros(n: usize) -> Vec<f32> {
    vec![0.0; n]
}

// ---------------------------------------------------------------------------
// 400 / 422: deep nesting
// ---------------------------------------------------------------------------

/// Deep nesting must neither crash the daemon nor be mistaken for a valid
/// body.
#[tokio::test]
async fn deeply_nested_json_is_refused_without_a_crash() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let a = post_raw(&c, &d.url(RECOMMEND), deep).await;
    assert_http_error("100000-deep array", &a, 422, "invalid", &[]);
    let deep = format!(
        "{{\"user_id\": 1, \"exclude\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let a = post_raw(&c, &d.url(RECOMMEND), deep).await;
    assert_http_error("100000-deep exclude", &a, 422, "invalid", &[]);
    let unbalanced = "[".repeat(200_000);
    let a = post_raw(&c, &d.url(RECOMMEND), unbalanced).await;
    assert!(
        a.status == 400 || a.status == 422,
        "unbalanced 200000-deep array: {} {}",
        a.status,
        a.text
    );
    assert_http_error(
        "unbalanced 200000-deep array",
        &a,
        a.status,
        if a.status == 400 {
            "malformed"
        } else {
            "invalid"
        },
        &[],
    );
    probe.check(&mut d, &c, "deeply nested JSON").await;
    assert!(d.is_running());
}

// ---------------------------------------------------------------------------
// 422 and 200 at the limits
// ---------------------------------------------------------------------------

/// After the out-of-range and over-limit requests of the table, the values
/// at the limits and the extremes that are valid are served.
#[tokio::test]
async fn values_at_the_limits_are_served() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    let refused: Vec<http_cases::Case> = [
        http_cases::numbers_out_of_range(),
        http_cases::limits(),
        http_cases::recommend_on_a_ranker(),
    ]
    .concat();
    http_cases::run(&c, &d, &refused, &mut fails).await;
    probe
        .check(&mut d, &c, "negative, huge and over-limit values")
        .await;

    // The extremes that are valid are served: user_id 0 and u64::MAX (users
    // without state), timeout_ms at its limit.
    for body in [
        json!({"user_id": 0u64, "k": 5}),
        json!({"user_id": u64::MAX, "k": 5}),
        json!({"user_id": u64::MAX, "k": 5, "timeout_ms": 60_000}),
    ] {
        let a = post_json(&c, &d.url(RECOMMEND), &body).await;
        assert_recommend_ok(&format!("recommend {body}"), &a, "demo", 5);
    }
    let a = post_json(
        &c,
        &d.url(SCORE),
        &json!({"user_id": u64::MAX, "items": [1, 100_000]}),
    )
    .await;
    assert_eq!(a.status, 200, "score for user u64::MAX: {}", a.text);
    probe.check(&mut d, &c, "extreme valid values").await;

    // The limits themselves are accepted.
    let a = post_raw(&c, &d.url(RECOMMEND), r#"{"user_id": 1, "k": 1000}"#).await;
    assert_recommend_ok("k = 1000", &a, "demo", 1000);
    let a = post_raw(&c, &d.url(RECOMMEND), r#"{"user_id": 1, "k": 1}"#).await;
    assert_recommend_ok("k = 1", &a, "demo", 1);
    let body = format!(
        "{{\"user_id\": {PROBE_USER}, \"k\": 10, \"exclude\": [{}]}}",
        repeat_ids(10_000)
    );
    let a = post_raw(&c, &d.url(RECOMMEND), body).await;
    let items = assert_recommend_ok("10000 excluded ids", &a, "demo", 10);
    assert!(
        items.iter().all(|i| i.0 > 10_000),
        "an excluded id came back: {items:?}"
    );
    for route in [SCORE, RANKER_SCORE] {
        let body = format!("{{\"user_id\": 1, \"items\": [{}]}}", repeat_ids(1000));
        let a = post_raw(&c, &d.url(route), body).await;
        assert_eq!(a.status, 200, "1000 items on {route}: {}", a.text);
        assert_eq!(
            a.json()["scores"].as_array().unwrap().len(),
            1000,
            "{route}"
        );
    }

    // Excluding the top three (and ids outside the catalogue) shifts the list.
    let top3: Vec<u64> = probe.items.iter().take(3).map(|i| i.0).collect();
    let body = json!({
        "user_id": PROBE_USER,
        "k": 7,
        "exclude": [top3[0], top3[1], top3[2], 0u64, 100_001u64, u64::MAX],
    });
    let a = post_json(&c, &d.url(RECOMMEND), &body).await;
    let items = assert_recommend_ok("exclude the top 3", &a, "demo", 7);
    let ids: Vec<u64> = items.iter().map(|i| i.0).collect();
    let want: Vec<u64> = probe.items[3..].iter().map(|i| i.0).collect();
    assert_eq!(ids, want, "exclude the top 3");

    // The ranker, refused a recommend, still scores.
    let a = post_raw(
        &c,
        &d.url(RANKER_SCORE),
        r#"{"user_id": 1, "items": [1, 2, 3]}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["model"], "demo-ranker");
    assert_eq!(v["scores"].as_array().unwrap().len(), 3);
    probe.check(&mut d, &c, "requests at the limits").await;
    assert!(d.is_running());
    fails.finish();
}

/// Bad and good requests in the same batches: only the bad ones fail, and
/// the good ones get exactly the reference answers.
#[tokio::test]
async fn unknown_items_do_not_spoil_a_batch() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    http_cases::run(&c, &d, &http_cases::unknown_items(), &mut fails).await;
    probe.check(&mut d, &c, "unknown items").await;

    let reference_ids: Vec<u64> = probe.items.iter().map(|i| i.0).collect();
    let jobs: Vec<usize> = (0..96).collect();
    let results: Vec<(usize, Answer)> = futures::stream::iter(jobs)
        .map(|i| {
            let c = c.clone();
            let d_url = d.http.clone();
            let reference_ids = reference_ids.clone();
            async move {
                let (route, body) = match i % 4 {
                    0 => (RECOMMEND, json!({"user_id": PROBE_USER, "k": 10})),
                    1 => (
                        SCORE,
                        json!({"user_id": PROBE_USER, "items": [1, 100_001 + i as u64]}),
                    ),
                    2 => (
                        SCORE,
                        json!({"user_id": PROBE_USER, "items": reference_ids}),
                    ),
                    _ => (RECOMMEND, json!({"user_id": PROBE_USER, "k": 0})),
                };
                (i, post_json(&c, &format!("{d_url}{route}"), &body).await)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (i, a) in &results {
        match i % 4 {
            0 => {
                let items = assert_recommend_ok(&format!("batched recommend {i}"), a, "demo", 10);
                let ids: Vec<u64> = items.iter().map(|x| x.0).collect();
                assert_eq!(ids, reference_ids, "batched recommend {i}");
            }
            1 => {
                assert_http_error(
                    &format!("batched unknown item {i}"),
                    a,
                    422,
                    "invalid",
                    &["unknown item", &(100_001 + *i as u64).to_string()],
                );
            }
            2 => {
                assert_eq!(a.status, 200, "batched score {i}: {}", a.text);
                let v = a.json();
                let scores = v["scores"].as_array().unwrap();
                assert_eq!(scores.len(), 10);
                for (s, (_, r)) in scores.iter().zip(&probe.items) {
                    let s = s.as_f64().unwrap() as f32;
                    assert!((s - r).abs() <= 1e-3 * r.abs().max(1.0), "{s} vs {r}");
                }
            }
            _ => {
                assert_http_error(&format!("batched k=0 {i}"), a, 422, "invalid", &["got 0"]);
            }
        }
    }
    probe.check(&mut d, &c, "mixed batches").await;
    assert!(d.is_running());
    fails.finish();
}

// ---------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------

/// A user with state, refused every bad upsert of the table: nothing of them
/// is applied. Beyond f32, the message names the value that was sent; at the
/// edges of f32 and of `--history-max`, upserts are served.
#[tokio::test]
async fn rejected_user_upserts_change_nothing() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    let base = d.http.clone();
    let user = move |id: &str| format!("{base}/v1/users/{id}");

    // A known starting state for user 7.
    let a = post_raw(&c, &user("7"), r#"{"history": [1, 2, 3]}"#).await;
    assert_eq!(a.status, 200, "{}", a.text);
    http_cases::run(&c, &d, &http_cases::bad_user_upserts(), &mut fails).await;

    // Beyond f32: rejected, and the message names the index and the value
    // that was sent (in any spelling), not the infinity it overflowed to.
    let mut f_big = zeros(16).into_iter().map(|x| json!(x)).collect::<Vec<_>>();
    f_big[3] = json!(1e39);
    let mut f_neg = zeros(16).into_iter().map(|x| json!(x)).collect::<Vec<_>>();
    f_neg[15] = json!(-1e39);
    let mut f_huge = zeros(16).into_iter().map(|x| json!(x)).collect::<Vec<_>>();
    f_huge[0] = json!(1e300);
    let spellings = |exp: usize| {
        vec![
            format!("1e{exp}"),
            format!("1e+{exp}"),
            format!("1E{exp}"),
            format!("1{}", "0".repeat(exp)),
        ]
    };
    for (features, index, exp) in [(&f_big, 3, 39), (&f_neg, 15, 39), (&f_huge, 0, 300)] {
        let body = json!({ "features": features }).to_string();
        let a = post_raw(&c, &user("7"), body.clone()).await;
        let ctx = format!("POST /v1/users/7 {body}");
        let field = format!("features[{index}]");
        match check_http_error(&ctx, &a, 422, "invalid", &[&field]) {
            Err(e) => fails.push(e),
            Ok(m) => {
                if !spellings(exp).iter().any(|sp| m.contains(sp.as_str())) {
                    fails.push(format!(
                        "{ctx}: message {m:?} should name the value sent (1e{exp})"
                    ));
                }
            }
        }
    }

    // Nothing of the rejected updates was applied.
    let a = post_raw(&c, &user("7"), "{}").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["user_id"], 7);
    assert_eq!(
        v["history"],
        json!([1, 2, 3]),
        "a rejected update leaked: {v}"
    );
    assert_eq!(v["features"], Value::Null, "a rejected update leaked: {v}");
    http_cases::run(&c, &d, &http_cases::bad_user_paths(), &mut fails).await;
    probe.check(&mut d, &c, "bad user upserts").await;

    // Values at the edge of f32 are accepted. A history up to --history-max
    // (1,000) is stored whole; a longer one is refused naming the limit and
    // changes nothing.
    let mut f_max = zeros(16);
    f_max[0] = f32::MAX;
    f_max[1] = f32::MIN;
    f_max[2] = 1e-45;
    let a = post_json(&c, &user("8"), &json!({"features": f_max})).await;
    assert_eq!(a.status, 200, "f32 extremes: {}", a.text);
    let full: Vec<u64> = (1..=1000).collect();
    let a = post_json(&c, &user("8"), &json!({"history": full})).await;
    assert_eq!(a.status, 200, "1000-item history: {}", a.text);
    assert_eq!(a.json()["history"], json!(full));
    let long_history: Vec<u64> = (1..=100_000).collect();
    let a = post_json(&c, &user("8"), &json!({"history": long_history})).await;
    assert_http_error(
        "100000-item history",
        &a,
        422,
        "invalid",
        &["history must have <= 1000", "got 100000"],
    );
    let v = get_json(&c, &user("8")).await;
    assert_eq!(v["history"], json!(full), "a refused history leaked");
    // A user with extreme features still gets a well-formed answer.
    let a = post_raw(&c, &d.url(RECOMMEND), r#"{"user_id": 8, "k": 10}"#).await;
    assert_eq!(a.status, 200, "recommend for user 8: {}", a.text);
    probe.check(&mut d, &c, "user upserts at the edges").await;
    assert!(d.is_running());
    fails.finish();
}

// ---------------------------------------------------------------------------
// 413: bodies over the limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;

    // 10 MB of otherwise valid JSON, with a Content-Length.
    let ten_mb = {
        let mut s = String::from("{\"user_id\": 1, \"exclude\": [1");
        while s.len() < 10 * 1024 * 1024 - 2 {
            s.push_str(",1");
        }
        s.push_str("]}");
        s
    };
    let n = ten_mb.len().to_string();
    // Sent over a raw connection that reads while it writes (as curl does):
    // the daemon answers once it has read past the limit, then reads and
    // drops the rest (bounded) before closing; a client that writes
    // everything before reading is in `edges`.
    let addr = d.addr();
    for route in [RECOMMEND, SCORE, RANKER_SCORE, "/v1/users/7"] {
        let a = raw_post(&addr, route, ten_mb.as_bytes()).await;
        assert_http_error(
            &format!("10 MB to {route}"),
            &a,
            413,
            "too_large",
            &["1048576", &n],
        );
    }
    // 10 MB of garbage, chunked (no Content-Length), over a raw connection.
    let mut chunked =
        b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..160 {
        chunked.extend_from_slice(b"10000\r\n");
        chunked.extend(std::iter::repeat_n(b'x', 0x10000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = raw_exchange(&addr, &chunked, Duration::from_secs(10)).await;
    let a = raw_answer(&resp);
    assert_http_error("chunked 10 MB", &a, 413, "too_large", &["1048576"]);
    probe.check(&mut d, &c, "10 MB bodies").await;

    // The boundary: exactly the limit is read, one byte more is refused.
    let valid = format!("{{\"user_id\": {PROBE_USER}, \"k\": 10}}");
    let at_limit = format!("{valid}{}", " ".repeat(BODY_LIMIT - valid.len()));
    assert_eq!(at_limit.len(), BODY_LIMIT);
    let a = post_raw(&c, &d.url(RECOMMEND), at_limit.clone()).await;
    assert_recommend_ok("body of exactly 1 MiB", &a, "demo", 10);
    let over = format!("{at_limit} ");
    let a = raw_post(&addr, RECOMMEND, over.as_bytes()).await;
    assert_http_error(
        "body of 1 MiB + 1",
        &a,
        413,
        "too_large",
        &["1048576", "1048577"],
    );
    probe.check(&mut d, &c, "bodies at the limit").await;
    assert!(d.is_running());
}

// ---------------------------------------------------------------------------
// 429 / 504 / 503 on derived models
// ---------------------------------------------------------------------------

#[tokio::test]
async fn full_queue_is_429_and_passed_deadline_is_504() {
    // Requests wait a full second in the queue, which holds one.
    let root = slow_repo(1_000_000, 1);
    let mut d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let slow = d.url("/v1/models/slow/recommend");
    let info = d.url("/v1/models/slow");
    let depth = |c: reqwest::Client, info: String| async move {
        let (s, body) = get(&c, &info).await;
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["queue_depth"].as_u64().unwrap()
    };
    let wait_depth = |want: u64| {
        let c = c.clone();
        let info = info.clone();
        async move {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let got = depth(c.clone(), info.clone()).await;
                if got == want {
                    return;
                }
                assert!(
                    std::time::Instant::now() < until,
                    "queue_depth of slow stayed {got}, waiting for {want}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // The request waits a second in the queue: past a 50 ms deadline.
    let started = std::time::Instant::now();
    let a = post_raw(&c, &slow, r#"{"user_id": 1, "k": 5, "timeout_ms": 50}"#).await;
    assert_http_error(
        "deadline of 50 ms",
        &a,
        504,
        "deadline_exceeded",
        &["timeout_ms = 50"],
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the 504 came after {:?}, not at the deadline",
        started.elapsed()
    );
    // The expired request leaves the queue when its batch comes up.
    wait_depth(0).await;

    // One request fills the queue; the next is turned away with Retry-After.
    let first = {
        let c = c.clone();
        let slow = slow.clone();
        tokio::spawn(async move {
            post_raw(&c, &slow, r#"{"user_id": 1, "k": 5, "timeout_ms": 5000}"#).await
        })
    };
    wait_depth(1).await;
    let a = post_raw(&c, &slow, r#"{"user_id": 2, "k": 5, "timeout_ms": 5000}"#).await;
    assert_http_error(
        "second request on a full queue",
        &a,
        429,
        "overloaded",
        &["max_queue_size is 1", "1 requests waiting"],
    );
    let retry = a
        .headers
        .get(reqwest::header::RETRY_AFTER)
        .expect("429 carries Retry-After")
        .to_str()
        .unwrap();
    let secs: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {retry:?} is not delay-seconds"));
    assert!(secs >= 1, "Retry-After {secs}");
    let first = first.await.unwrap();
    assert_recommend_ok("the queued request", &first, "slow", 5);
    // The queue drained: the slow model answers again, as does demo.
    let a = post_raw(&c, &slow, r#"{"user_id": 3, "k": 5, "timeout_ms": 5000}"#).await;
    assert_recommend_ok("after the 429", &a, "slow", 5);
    probe.check(&mut d, &c, "429 and 504").await;
    assert!(d.is_running());
}

#[tokio::test]
async fn failed_model_is_503() {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    derived_model(root.path(), "broken", "demo", |t| {
        let mut out = String::new();
        for line in t.lines() {
            if line.starts_with("weights =") {
                out.push_str("weights = \"/nonexistent/rankd/weights.safetensors\"\n");
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    });
    let mut d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;

    let a = post_raw(
        &c,
        &d.url("/v1/models/broken/recommend"),
        r#"{"user_id": 1, "k": 5}"#,
    )
    .await;
    assert_http_error(
        "recommend on a failed model",
        &a,
        503,
        "not_ready",
        &["broken"],
    );
    let a = post_raw(
        &c,
        &d.url("/v1/models/broken/score"),
        r#"{"user_id": 1, "items": [1]}"#,
    )
    .await;
    assert_http_error("score on a failed model", &a, 503, "not_ready", &["broken"]);
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false, "{v}");
    assert_eq!(v["models"]["broken"], "failed", "{v}");
    // Input errors are still reported as such on the healthy model.
    let a = post_raw(&c, &d.url(RECOMMEND), r#"{"user_id": 1, "k": 0}"#).await;
    assert_http_error(
        "k = 0 beside a failed model",
        &a,
        422,
        "invalid",
        &["got 0"],
    );
    probe.check(&mut d, &c, "a failed model").await;
    assert!(d.is_running());
}

// ---------------------------------------------------------------------------
// Fuzz: mutated bodies
// ---------------------------------------------------------------------------

const INTERESTING: &[&[u8]] = &[
    b"-1",
    b"0",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e30",
    b"1e400",
    b"-0",
    b"0.5",
    b"null",
    b"true",
    b"\"\"",
    b"[]",
    b"{}",
    b"\"\\u0000\"",
    b"\xff",
    b"\\",
    b"\"",
    b",",
    b":",
    b"[",
    b"}",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.index(3) {
        if b.is_empty() {
            b.push(b'{');
        }
        let at = rng.index(b.len());
        match rng.index(6) {
            0 => b[at] = rng.byte(),
            1 => {
                b.remove(at);
            }
            2 => b.insert(at, rng.byte()),
            3 => {
                let token = INTERESTING[rng.index(INTERESTING.len())];
                b.splice(at..at, token.iter().copied());
            }
            4 => b.truncate(at),
            _ => {
                // Replace a number-ish run with an interesting token.
                let end = (at + 1 + rng.index(4)).min(b.len());
                let token = INTERESTING[rng.index(INTERESTING.len())];
                b.splice(at..end, token.iter().copied());
            }
        }
    }
    b
}

#[tokio::test]
async fn mutated_bodies_get_a_valid_answer() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;

    let seeds: [(&str, &str); 4] = [
        (
            RECOMMEND,
            r#"{"user_id": 42, "k": 10, "exclude": [1, 2, 3]}"#,
        ),
        (SCORE, r#"{"user_id": 42, "items": [1, 2, 3]}"#),
        (RANKER_SCORE, r#"{"user_id": 42, "items": [7, 8]}"#),
        (
            "/v1/users/9",
            r#"{"history": [1, 2], "features": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]}"#,
        ),
    ];
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    let mut cases = Vec::new();
    for i in 0..1200 {
        let (route, seed) = seeds[i % seeds.len()];
        cases.push((route, mutate(&mut rng, seed.as_bytes())));
    }
    let base = d.http.clone();
    let answers: Vec<(&str, Vec<u8>, Answer)> = futures::stream::iter(cases)
        .map(|(route, body)| {
            let c = c.clone();
            let url = format!("{base}{route}");
            async move {
                let a = post_raw(&c, &url, body.clone()).await;
                (route, body, a)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut counts = std::collections::BTreeMap::new();
    for (route, body, a) in &answers {
        *counts.entry(a.status).or_insert(0) += 1;
        let ctx = format!("POST {route} {:?}", String::from_utf8_lossy(body));
        match a.status {
            200 => {
                let v: Value = serde_json::from_str(&a.text)
                    .unwrap_or_else(|e| panic!("{ctx}: 200 with a non-JSON body ({e})"));
                if *route == RECOMMEND {
                    let n = v["items"].as_array().map_or(0, Vec::len);
                    assert!((1..=1000).contains(&n), "{ctx}: {v}");
                    assert_recommend_ok(&ctx, a, "demo", n);
                } else if route.starts_with("/v1/users/") {
                    assert_eq!(v["user_id"], 9, "{ctx}: {v}");
                } else {
                    let scores = v["scores"]
                        .as_array()
                        .unwrap_or_else(|| panic!("{ctx}: {v}"));
                    assert!(!scores.is_empty(), "{ctx}: {v}");
                    assert!(
                        scores
                            .iter()
                            .all(|s| s.as_f64().is_some_and(f64::is_finite)),
                        "{ctx}: {v}"
                    );
                }
            }
            400 => {
                assert_http_error(&ctx, a, 400, "malformed", &[]);
            }
            422 => {
                assert_http_error(&ctx, a, 422, "invalid", &[]);
            }
            other => panic!("{ctx}: unexpected status {other}: {}", a.text),
        }
    }
    // The mutations reach past the parser, not just into it.
    assert!(counts.get(&400).copied().unwrap_or(0) > 50, "{counts:?}");
    assert!(counts.get(&422).copied().unwrap_or(0) > 50, "{counts:?}");
    probe.check(&mut d, &c, "1200 mutated bodies").await;
    assert!(d.is_running());
}

// ---------------------------------------------------------------------------
// Raw TCP: not even HTTP
// ---------------------------------------------------------------------------

#[tokio::test]
async fn raw_tcp_garbage_does_not_hurt_the_daemon() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let addr = d.addr();
    let wait = Duration::from_secs(10);

    // Not HTTP: either a 400 or a closed connection, never a hang or a 2xx.
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("text", b"hello there, this is not HTTP\r\n\r\n".to_vec()),
        ("binary", (0..=255u8).cycle().take(4096).collect()),
        ("NULs", vec![0u8; 1024]),
        ("TLS hello", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]),
        ("bad request line", b"GET\r\n\r\n".to_vec()),
        ("bad version", b"GET /healthz HTTP/9.9\r\n\r\n".to_vec()),
        ("empty lines, then garbage", b"\r\n\n\r\n{not a request line}\r\n\r\n".to_vec()),
        ("header without colon", b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n".to_vec()),
        (
            "bad content-length",
            b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}"
                .to_vec(),
        ),
        (
            "negative content-length",
            b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}"
                .to_vec(),
        ),
        (
            "bad chunk size",
            b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        ),
    ];
    for (name, bytes) in &garbage {
        let (resp, closed) = raw_exchange_closed(&addr, bytes, wait).await;
        assert!(
            closed,
            "{name}: the connection was still open after {wait:?}: {:?}",
            String::from_utf8_lossy(&resp)
        );
        match status_of(&resp) {
            None => assert!(
                resp.is_empty(),
                "{name}: answered with something that is not HTTP: {:?}",
                String::from_utf8_lossy(&resp)
            ),
            Some(s) => assert!(
                (400..500).contains(&s),
                "{name}: expected a 4xx, got {:?}",
                String::from_utf8_lossy(&resp)
            ),
        }
        assert!(d.is_running(), "daemon exited after {name}\n{}", d.log());
    }
    probe.check(&mut d, &c, "raw garbage").await;

    // A request with a 100 KB header: served or refused with 431, never fatal.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let resp = raw_exchange(&addr, big.as_bytes(), wait).await;
    let s = status_of(&resp);
    assert!(
        matches!(s, Some(200) | Some(431)),
        "100 KB header: {:?}",
        String::from_utf8_lossy(&resp[..resp.len().min(300)])
    );
    // 1 MB of headers: refused (431) or cut off, never served and never fatal.
    let mut huge = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..1024 {
        huge.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(1000)));
    }
    huge.push_str("Connection: close\r\n\r\n");
    let resp = raw_exchange(&addr, huge.as_bytes(), wait).await;
    let s = status_of(&resp);
    assert!(
        s.is_none() || s == Some(431) || s == Some(400),
        "1 MB of headers: {:?}",
        String::from_utf8_lossy(&resp[..resp.len().min(300)])
    );
    // A 100 KB request target.
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "u".repeat(100 * 1024)
    );
    let resp = raw_exchange(&addr, long_uri.as_bytes(), wait).await;
    let s = status_of(&resp);
    assert!(
        s.is_none() || matches!(s, Some(404) | Some(414) | Some(431) | Some(400)),
        "100 KB URI: {:?}",
        String::from_utf8_lossy(&resp[..resp.len().min(300)])
    );
    probe.check(&mut d, &c, "oversized headers").await;

    // A declared 10 MB body is refused once the limit is passed, without
    // waiting for the rest: 2 MiB are sent, then the client stalls.
    let started = std::time::Instant::now();
    let mut req =
        b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n"
            .to_vec();
    req.extend(std::iter::repeat_n(b' ', 2 << 20));
    let resp = raw_exchange(&addr, &req, wait).await;
    let a = raw_answer(&resp);
    assert_http_error(
        "declared 10 MB, 2 MiB sent",
        &a,
        413,
        "too_large",
        &["1048576", "10485760"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 413 waited for the rest of the body"
    );
    // A Content-Length shorter than the body: the prefix is malformed JSON (400,
    // in rankd's error shape), the rest is not a request.
    let resp = raw_exchange(
        &addr,
        b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{\"user_id\": 1}",
        wait,
    )
    .await;
    assert_eq!(
        status_of(&resp),
        Some(400),
        "short Content-Length: {:?}",
        String::from_utf8_lossy(&resp)
    );
    assert!(
        body_of(&resp).contains("\"malformed\""),
        "short Content-Length: {:?}",
        String::from_utf8_lossy(&resp)
    );
    // Pipelined: a valid request, then garbage on the same connection. The
    // first is answered in full.
    let valid = format!("{{\"user_id\": {PROBE_USER}, \"k\": 3}}");
    let mut pipelined = format!(
        "POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{valid}",
        valid.len()
    )
    .into_bytes();
    pipelined.extend_from_slice(b"\x00\x01\x02 not http at all\r\n\r\n");
    let resp = raw_exchange(&addr, &pipelined, wait).await;
    assert_eq!(
        status_of(&resp),
        Some(200),
        "pipelined valid request: {:?}",
        String::from_utf8_lossy(&resp)
    );
    let text = String::from_utf8_lossy(&resp);
    assert!(text.contains("\"items\""), "{text}");
    probe.check(&mut d, &c, "lying framing").await;

    // Connections that stop half-way must not block anyone else.
    let mut stalled = Vec::new();
    for i in 0..64 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let partial: &[u8] = match i % 3 {
            0 => b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"us",
            1 => b"GET /healthz HTTP/1.1\r\nHo",
            _ => b"PO",
        };
        s.write_all(partial).await.unwrap();
        stalled.push(s);
    }
    let a = tokio::time::timeout(
        Duration::from_secs(10),
        post_raw(
            &c,
            &d.url(RECOMMEND),
            json!({"user_id": PROBE_USER, "k": 10}).to_string(),
        ),
    )
    .await
    .expect("a valid request is answered while 64 connections stall");
    assert_recommend_ok("recommend beside stalled connections", &a, "demo", 10);
    drop(stalled);
    // Connections that open and close at once.
    for _ in 0..200 {
        drop(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    probe
        .check(&mut d, &c, "stalled and dropped connections")
        .await;
    assert!(d.is_running(), "{}", d.log());
}
