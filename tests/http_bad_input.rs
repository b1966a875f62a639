//! Hostile input against the real daemon over real HTTP (and raw TCP).
//!
//! The contract: every error is `{"error": {"type", "message"}}` with
//! 400 malformed JSON or an empty body, 404 unknown model or route,
//! 422 well-formed JSON with wrong types or values, 413 an oversized body,
//! 429 + Retry-After a full queue, 504 a passed deadline, 503 not ready;
//! messages name the limit and the value received; and the daemon keeps
//! answering correctly afterwards.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RECOMMEND: &str = "/v1/models/demo/recommend";
const SCORE: &str = "/v1/models/demo/score";
const RANKER_SCORE: &str = "/v1/models/demo-ranker/score";
const RANKER_RECOMMEND: &str = "/v1/models/demo-ranker/recommend";
/// The default `max_body_bytes`.
const BODY_LIMIT: usize = 1 << 20;
/// The user whose answers are the reference; no test changes its state.
const PROBE_USER: u64 = 42;

/// One HTTP answer: status, headers and the body as text.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

async fn send(c: &reqwest::Client, method: reqwest::Method, url: &str, body: Vec<u8>) -> Answer {
    let r = c
        .request(method.clone(), url)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: no answer: {e:?}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    Answer {
        status,
        headers,
        text,
    }
}

async fn post_raw(c: &reqwest::Client, url: &str, body: impl Into<Vec<u8>>) -> Answer {
    send(c, reqwest::Method::POST, url, body.into()).await
}

/// Checks an error answer: exact status, exactly `{"error": {"type", "message"}}`
/// with the expected type, a JSON content type, and a message containing
/// every needle.
fn check_error(
    ctx: &str,
    a: &Answer,
    status: u16,
    kind: &str,
    needles: &[&str],
) -> Result<(), String> {
    if a.status != status {
        return Err(format!(
            "{ctx}: expected status {status}, got {} with body {}",
            a.status, a.text
        ));
    }
    let v: Value = serde_json::from_str(&a.text)
        .map_err(|e| format!("{ctx}: error body is not JSON ({e}): {:?}", a.text))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{ctx}: error body is not an object: {v}"))?;
    if obj.len() != 1 {
        return Err(format!("{ctx}: only `error` expected at the top: {v}"));
    }
    let err = obj
        .get("error")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("{ctx}: no `error` object: {v}"))?;
    let t = err
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{ctx}: no string `error.type`: {v}"))?;
    let m = err
        .get("message")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{ctx}: no string `error.message`: {v}"))?;
    if t.is_empty() || m.trim().is_empty() {
        return Err(format!("{ctx}: empty error.type or error.message: {v}"));
    }
    if t != kind {
        return Err(format!("{ctx}: error.type {t:?}, expected {kind:?}: {v}"));
    }
    for needle in needles {
        if !m.contains(needle) {
            return Err(format!("{ctx}: message {m:?} should mention {needle:?}"));
        }
    }
    let ct = a
        .headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(format!("{ctx}: error content-type {ct:?}"));
    }
    Ok(())
}

fn assert_error(ctx: &str, a: &Answer, status: u16, kind: &str, needles: &[&str]) {
    if let Err(e) = check_error(ctx, a, status, kind, needles) {
        panic!("{e}");
    }
}

/// Collects the failures of a table of cases, so one run reports them all.
#[derive(Default)]
struct Fails(Vec<String>);

impl Fails {
    fn error(&mut self, ctx: &str, a: &Answer, status: u16, kind: &str, needles: &[&str]) {
        if let Err(e) = check_error(ctx, a, status, kind, needles) {
            self.0.push(e);
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} case(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// Checks a successful recommend answer: 200, `k` distinct catalogue items,
/// finite scores sorted descending.
fn assert_recommend_ok(ctx: &str, a: &Answer, model: &str, k: usize) -> Vec<(u64, f32)> {
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
struct Probe {
    items: Vec<(u64, f32)>,
}

impl Probe {
    async fn take(d: &Daemon, c: &reqwest::Client) -> Self {
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
    async fn check(&self, d: &mut Daemon, c: &reqwest::Client, after: &str) {
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
// 400: malformed JSON and empty bodies
// ---------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_is_400() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();

    // Each route gets bodies whose keys are valid for it, so the only fault
    // is the syntax: `F` is a field with value `V`, `A` an array of ids.
    // `W` is a complete set of valid members.
    let routes = [
        (RECOMMEND, "user_id", "1", "exclude", r#""user_id": 1"#),
        (
            SCORE,
            "user_id",
            "1",
            "items",
            r#""user_id": 1, "items": [1]"#,
        ),
        (
            RANKER_SCORE,
            "user_id",
            "1",
            "items",
            r#""user_id": 1, "items": [1]"#,
        ),
        (
            "/v1/users/7",
            "history",
            "[1]",
            "history",
            r#""history": [1]"#,
        ),
    ];
    for (route, f, v, arr, w) in routes {
        let t = |s: &str| -> Vec<u8> {
            s.replace("F", f)
                .replace("V", v)
                .replace("A", arr)
                .replace("W", w)
                .into_bytes()
        };
        let mut bodies: Vec<(&str, Vec<u8>)> = vec![
            ("truncated object", t(r#"{"F": V"#)),
            ("truncated key", t(r#"{"F"#)),
            ("truncated array", t(r#"{"A": [1, 2"#)),
            ("open brace only", t("{")),
            ("trailing garbage", t(r#"{W} garbage"#)),
            ("two objects", t(r#"{W}{W}"#)),
            ("trailing comma", t(r#"{W,}"#)),
            ("array trailing comma", t(r#"{"A": [1, 2,]}"#)),
            ("single quotes", t("{'F': V}")),
            ("unquoted key", t("{F: V}")),
            ("missing colon", t(r#"{"F" V}"#)),
            ("missing comma", t(r#"{"A": [1 2]}"#)),
            ("not JSON at all", b"hello, rankd".to_vec()),
            ("form encoding", b"user_id=1&k=10".to_vec()),
            ("xml", b"<recommend user_id=\"1\"/>".to_vec()),
            ("NaN literal", t(r#"{"A": [NaN]}"#)),
            ("Infinity literal", t(r#"{"A": [1, Infinity]}"#)),
            ("leading zero", t(r#"{"A": [01]}"#)),
            ("hex number", t(r#"{"A": [0x10]}"#)),
            ("bare minus", t(r#"{"A": [-]}"#)),
            ("comment", t(r#"{W /* hi */}"#)),
            (
                "byte order mark",
                [b"\xef\xbb\xbf".to_vec(), t(r#"{W}"#)].concat(),
            ),
            ("unterminated string", t(r#"{"F"#)),
            ("bad escape", t(r#"{"F\q": V}"#)),
            (
                "binary bytes",
                vec![0x00, 0xff, 0xfe, 0x01, 0x80, 0x7f, 0x1b, 0x9c],
            ),
            ("NUL inside", [t(r#"{W"#), b"\x00}".to_vec()].concat()),
            (
                "invalid UTF-8 in a key",
                [b"{\"\xff\xfe\": 1, ".to_vec(), t(r#"W}"#)].concat(),
            ),
            (
                "msgpack",
                vec![0x81, 0xa7, b'u', b's', b'e', b'r', b'_', b'i', b'd', 0x01],
            ),
        ];
        bodies.push(("lone close", b"}".to_vec()));
        for (name, body) in &bodies {
            let a = post_raw(&c, &d.url(route), body.clone()).await;
            fails.error(
                &format!("POST {route} {name}: {:?}", String::from_utf8_lossy(body)),
                &a,
                400,
                "malformed",
                &[],
            );
        }
    }
    probe.check(&mut d, &c, "malformed JSON").await;

    // Deep nesting must neither crash the daemon nor be mistaken for a valid body.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let a = post_raw(&c, &d.url(RECOMMEND), deep).await;
    assert_error("100000-deep array", &a, 422, "invalid", &[]);
    let deep = format!(
        "{{\"user_id\": 1, \"exclude\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let a = post_raw(&c, &d.url(RECOMMEND), deep).await;
    assert_error("100000-deep exclude", &a, 422, "invalid", &[]);
    let unbalanced = "[".repeat(200_000);
    let a = post_raw(&c, &d.url(RECOMMEND), unbalanced).await;
    assert!(
        a.status == 400 || a.status == 422,
        "unbalanced 200000-deep array: {} {}",
        a.status,
        a.text
    );
    assert_error(
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
    fails.finish();
}

/// A body that is not JSON is malformed (400) even when the part before the
/// syntax error already holds a wrong value: the value errors of a body that
/// cannot be parsed are beside the point.
#[tokio::test]
async fn syntax_errors_win_over_value_errors() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    let cases: Vec<(&str, &str)> = vec![
        (RECOMMEND, r#"{"user_id": "x"} garbage"#),
        (RECOMMEND, r#"{"user_id": -1"#),
        (RECOMMEND, r#"{"bogus": 1,}"#),
        (RECOMMEND, r#"{"user_id": 1, "k": 0"#),
        (RECOMMEND, r#"[1, 10"#),
        (SCORE, r#"{"user_id": 1, "exclude": [1, 2"#),
        (SCORE, r#"{"user_id": 1, "items": ["a", 2"#),
        ("/v1/users/7", r#"{"user_id": 7"#),
        ("/v1/users/7", r#"{"history": "x"} }"#),
    ];
    for (route, body) in &cases {
        let a = post_raw(&c, &d.url(route), *body).await;
        fails.error(&format!("POST {route} {body}"), &a, 400, "malformed", &[]);
    }
    probe
        .check(&mut d, &c, "broken bodies with bad values")
        .await;
    assert!(d.is_running());
    fails.finish();
}

#[tokio::test]
async fn empty_bodies_are_400() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    for route in [RECOMMEND, SCORE, RANKER_SCORE, "/v1/users/7"] {
        for (name, body) in [("empty", ""), ("spaces", "   "), ("newlines", "\r\n\r\n\t")] {
            let a = post_raw(&c, &d.url(route), body).await;
            fails.error(
                &format!("POST {route} {name} body"),
                &a,
                400,
                "malformed",
                &["empty"],
            );
        }
        // No body at all (no Content-Length, nothing sent).
        let r = c.post(d.url(route)).send().await.unwrap();
        let a = Answer {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await.unwrap(),
        };
        fails.error(
            &format!("POST {route} without body"),
            &a,
            400,
            "malformed",
            &[],
        );
    }
    probe.check(&mut d, &c, "empty bodies").await;
    assert!(d.is_running());
    fails.finish();
}

// ---------------------------------------------------------------------------
// 422: valid JSON, wrong types or values
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrong_types_are_422() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();

    // (route, body, needles in the message)
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        // The body is not an object.
        (RECOMMEND, "[]", vec![]),
        (RECOMMEND, "[1, 10]", vec![]),
        (RECOMMEND, "[1, 10, [], null]", vec![]),
        (RECOMMEND, "\"user_id\"", vec!["invalid type", "user_id"]),
        (RECOMMEND, "42", vec!["invalid type", "42"]),
        (RECOMMEND, "null", vec!["invalid type", "null"]),
        (RECOMMEND, "true", vec!["invalid type"]),
        (SCORE, "[]", vec![]),
        (SCORE, "[1, [1, 2]]", vec![]),
        ("/v1/users/7", "[]", vec![]),
        ("/v1/users/7", "[[1], null]", vec![]),
        ("/v1/users/7", "\"history\"", vec!["invalid type"]),
        // Missing required fields.
        (RECOMMEND, "{}", vec!["missing field", "user_id"]),
        (RECOMMEND, r#"{"k": 10}"#, vec!["missing field", "user_id"]),
        (SCORE, r#"{"user_id": 1}"#, vec!["missing field", "items"]),
        (SCORE, r#"{"items": [1]}"#, vec!["missing field", "user_id"]),
        // Unknown fields.
        (
            RECOMMEND,
            r#"{"user_id": 1, "kk": 10}"#,
            vec!["unknown field", "kk"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "K": 10}"#,
            vec!["unknown field", "K"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "items": [1]}"#,
            vec!["unknown field", "items"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [1], "k": 3}"#,
            vec!["unknown field", "k"],
        ),
        (
            "/v1/users/7",
            r#"{"histroy": [1]}"#,
            vec!["unknown field", "histroy"],
        ),
        (
            "/v1/users/7",
            r#"{"user_id": 7}"#,
            vec!["unknown field", "user_id"],
        ),
        // Duplicate fields.
        (
            RECOMMEND,
            r#"{"user_id": 1, "user_id": 2}"#,
            vec!["duplicate field", "user_id"],
        ),
        // user_id of the wrong type.
        (
            RECOMMEND,
            r#"{"user_id": "42"}"#,
            vec!["invalid type", "42"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": "abc"}"#,
            vec!["invalid type", "abc"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": null}"#,
            vec!["invalid type", "null"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": true}"#,
            vec!["invalid type", "true"],
        ),
        (RECOMMEND, r#"{"user_id": [42]}"#, vec!["invalid type"]),
        (
            RECOMMEND,
            r#"{"user_id": {"id": 42}}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 42.5}"#,
            vec!["invalid type", "42.5"],
        ),
        (
            SCORE,
            r#"{"user_id": "1", "items": [1]}"#,
            vec!["invalid type"],
        ),
        (
            SCORE,
            r#"{"user_id": false, "items": [1]}"#,
            vec!["invalid type"],
        ),
        // k of the wrong type.
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": "10"}"#,
            vec!["invalid type", "10"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": null}"#,
            vec!["invalid type", "null"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 2.5}"#,
            vec!["invalid type", "2.5"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": [10]}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": false}"#,
            vec!["invalid type"],
        ),
        // exclude of the wrong type.
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": 5}"#,
            vec!["invalid type", "5"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": "1,2"}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": null}"#,
            vec!["invalid type", "null"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": {"1": true}}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": ["1"]}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": [1.5]}"#,
            vec!["invalid type", "1.5"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": [[1]]}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": [1, null]}"#,
            vec!["invalid type"],
        ),
        // timeout_ms of the wrong type.
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": "100"}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": 1.5}"#,
            vec!["invalid type", "1.5"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": [100]}"#,
            vec!["invalid type"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [1], "timeout_ms": true}"#,
            vec!["invalid type"],
        ),
        // items of the wrong type.
        (
            SCORE,
            r#"{"user_id": 1, "items": 1}"#,
            vec!["invalid type", "1"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": null}"#,
            vec!["invalid type", "null"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": "1"}"#,
            vec!["invalid type"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": ["1"]}"#,
            vec!["invalid type"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [1.0]}"#,
            vec!["invalid type"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [{"id": 1}]}"#,
            vec!["invalid type"],
        ),
        (
            RANKER_SCORE,
            r#"{"user_id": 1, "items": [true]}"#,
            vec!["invalid type"],
        ),
        // history and features of the wrong type.
        ("/v1/users/7", r#"{"history": 1}"#, vec!["invalid type"]),
        ("/v1/users/7", r#"{"history": "1,2"}"#, vec!["invalid type"]),
        (
            "/v1/users/7",
            r#"{"history": [1, "2"]}"#,
            vec!["invalid type"],
        ),
        (
            "/v1/users/7",
            r#"{"history": [1.5]}"#,
            vec!["invalid type", "1.5"],
        ),
        (
            "/v1/users/7",
            r#"{"history": {"a": 1}}"#,
            vec!["invalid type"],
        ),
        (
            "/v1/users/7",
            r#"{"features": 0.5}"#,
            vec!["invalid type", "0.5"],
        ),
        (
            "/v1/users/7",
            r#"{"features": "0.5"}"#,
            vec!["invalid type"],
        ),
        (
            "/v1/users/7",
            r#"{"features": ["0.5"]}"#,
            vec!["invalid type"],
        ),
        (
            "/v1/users/7",
            r#"{"features": [null]}"#,
            vec!["invalid type", "null"],
        ),
        (
            "/v1/users/7",
            r#"{"features": [true]}"#,
            vec!["invalid type"],
        ),
        (
            "/v1/users/7",
            r#"{"features": [[0.5]]}"#,
            vec!["invalid type"],
        ),
        (
            "/v1/users/7",
            r#"{"features": {"0": 0.5}}"#,
            vec!["invalid type"],
        ),
    ];
    for (route, body, needles) in &cases {
        let a = post_raw(&c, &d.url(route), *body).await;
        fails.error(&format!("POST {route} {body}"), &a, 422, "invalid", needles);
    }
    // The user rejected above never came into being with any state.
    let a = post_raw(&c, &d.url("/v1/users/7"), "{}").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v: Value = serde_json::from_str(&a.text).unwrap();
    if v["history"] != json!([]) || v["features"] != Value::Null {
        fails.0.push(format!(
            "a rejected upsert of user 7 left state behind: {v}"
        ));
    }
    fails.finish();
    probe.check(&mut d, &c, "wrong types").await;
    assert!(d.is_running());
}

#[tokio::test]
async fn negative_and_huge_numbers_are_422() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();

    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        // user_id
        (RECOMMEND, r#"{"user_id": -1}"#, vec!["-1"]),
        (
            RECOMMEND,
            r#"{"user_id": -9223372036854775808}"#,
            vec!["-9223372036854775808"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 18446744073709551616}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 99999999999999999999999999}"#,
            vec!["invalid type"],
        ),
        (RECOMMEND, r#"{"user_id": 1e30}"#, vec!["invalid type"]),
        (RECOMMEND, r#"{"user_id": 1e3}"#, vec!["invalid type"]),
        (RECOMMEND, r#"{"user_id": 1.0}"#, vec!["invalid type"]),
        (RECOMMEND, r#"{"user_id": -1.5e300}"#, vec!["invalid type"]),
        (SCORE, r#"{"user_id": -7, "items": [1]}"#, vec!["-7"]),
        (
            SCORE,
            r#"{"user_id": 18446744073709551616, "items": [1]}"#,
            vec!["invalid type"],
        ),
        // k
        (RECOMMEND, r#"{"user_id": 1, "k": -1}"#, vec!["-1"]),
        (RECOMMEND, r#"{"user_id": 1, "k": -1000}"#, vec!["-1000"]),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 18446744073709551616}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 1e30}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 10.0}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 18446744073709551615}"#,
            vec!["1000", "18446744073709551615"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 9223372036854775808}"#,
            vec!["1000", "9223372036854775808"],
        ),
        // exclude / items / history ids
        (RECOMMEND, r#"{"user_id": 1, "exclude": [-1]}"#, vec!["-1"]),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": [18446744073709551616]}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "exclude": [1e30]}"#,
            vec!["invalid type"],
        ),
        (SCORE, r#"{"user_id": 1, "items": [-1]}"#, vec!["-1"]),
        (
            SCORE,
            r#"{"user_id": 1, "items": [1, -100000]}"#,
            vec!["-100000"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [18446744073709551616]}"#,
            vec!["invalid type"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [1e30]}"#,
            vec!["invalid type"],
        ),
        (RANKER_SCORE, r#"{"user_id": 1, "items": [-5]}"#, vec!["-5"]),
        ("/v1/users/7", r#"{"history": [-1]}"#, vec!["-1"]),
        (
            "/v1/users/7",
            r#"{"history": [18446744073709551616]}"#,
            vec!["invalid type"],
        ),
        (
            "/v1/users/7",
            r#"{"history": [1e30]}"#,
            vec!["invalid type"],
        ),
        // timeout_ms
        (RECOMMEND, r#"{"user_id": 1, "timeout_ms": -1}"#, vec!["-1"]),
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": 1e30}"#,
            vec!["invalid type"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": 18446744073709551615}"#,
            vec!["60000", "18446744073709551615"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": 18446744073709551616}"#,
            vec!["invalid type"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [1], "timeout_ms": -5}"#,
            vec!["-5"],
        ),
        // Valid JSON numbers too large for any float: still well-formed JSON
        // (RFC 8259 puts no limit on a number), so a value error, not a syntax error.
        (RECOMMEND, r#"{"user_id": 1e400}"#, vec![]),
        (RECOMMEND, r#"{"user_id": 1, "k": 1e400}"#, vec![]),
        (SCORE, r#"{"user_id": 1, "items": [-1e400]}"#, vec![]),
    ];
    for (route, body, needles) in &cases {
        let a = post_raw(&c, &d.url(route), *body).await;
        fails.error(&format!("POST {route} {body}"), &a, 422, "invalid", needles);
    }
    // A 400-digit integer: well-formed JSON, far beyond u64.
    let long = format!("{{\"user_id\": 1{}}}", "0".repeat(400));
    let a = post_raw(&c, &d.url(RECOMMEND), long).await;
    fails.error("user_id with 401 digits", &a, 422, "invalid", &[]);
    probe.check(&mut d, &c, "negative and huge numbers").await;

    // The extremes that are valid are served: user_id 0 and u64::MAX (users
    // without state), timeout_ms at its limit.
    for body in [
        json!({"user_id": 0u64, "k": 5}),
        json!({"user_id": u64::MAX, "k": 5}),
        json!({"user_id": u64::MAX, "k": 5, "timeout_ms": 60_000}),
    ] {
        let a = post_raw(&c, &d.url(RECOMMEND), body.to_string()).await;
        assert_recommend_ok(&format!("recommend {body}"), &a, "demo", 5);
    }
    let a = post_raw(
        &c,
        &d.url(SCORE),
        json!({"user_id": u64::MAX, "items": [1, 100_000]}).to_string(),
    )
    .await;
    assert_eq!(a.status, 200, "score for user u64::MAX: {}", a.text);
    probe.check(&mut d, &c, "extreme valid values").await;
    assert!(d.is_running());
    fails.finish();
}

// ---------------------------------------------------------------------------
// 422: limits, with the limit and the value in the message
// ---------------------------------------------------------------------------

#[tokio::test]
async fn limits_name_the_limit_and_the_value() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();

    let exclude_10001 = format!("{{\"user_id\": 1, \"exclude\": [{}]}}", repeat_ids(10_001));
    let exclude_50000 = format!("{{\"user_id\": 1, \"exclude\": [{}]}}", repeat_ids(50_000));
    let items_1001 = format!("{{\"user_id\": 1, \"items\": [{}]}}", repeat_ids(1001));
    let items_100000 = format!("{{\"user_id\": 1, \"items\": [{}]}}", repeat_ids(100_000));
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 0}"#.into(),
            vec!["k must be >= 1", "got 0"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 5000}"#.into(),
            vec!["k must be <= 1000, got 5000"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 1001}"#.into(),
            vec!["k must be <= 1000, got 1001"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "k": 100000}"#.into(),
            vec!["k must be <= 1000, got 100000"],
        ),
        (RECOMMEND, exclude_10001, vec!["10000", "10001"]),
        (RECOMMEND, exclude_50000, vec!["10000", "50000"]),
        (SCORE, items_1001.clone(), vec!["1000", "1001"]),
        (SCORE, items_100000.clone(), vec!["1000", "100000"]),
        (RANKER_SCORE, items_1001, vec!["1000", "1001"]),
        (RANKER_SCORE, items_100000, vec!["1000", "100000"]),
        (
            SCORE,
            r#"{"user_id": 1, "items": []}"#.into(),
            vec!["items", "empty"],
        ),
        (
            RANKER_SCORE,
            r#"{"user_id": 1, "items": []}"#.into(),
            vec!["items", "empty"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": 0}"#.into(),
            vec!["timeout_ms", "got 0"],
        ),
        (
            RECOMMEND,
            r#"{"user_id": 1, "timeout_ms": 60001}"#.into(),
            vec!["60000", "60001"],
        ),
        (
            SCORE,
            r#"{"user_id": 1, "items": [1], "timeout_ms": 3600000}"#.into(),
            vec!["60000", "3600000"],
        ),
    ];
    for (route, body, needles) in &cases {
        let a = post_raw(&c, &d.url(route), body.clone()).await;
        let shown: String = body.chars().take(80).collect();
        fails.error(
            &format!("POST {route} {shown}"),
            &a,
            422,
            "invalid",
            needles,
        );
    }
    probe.check(&mut d, &c, "over-limit requests").await;

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
        let v: Value = serde_json::from_str(&a.text).unwrap();
        assert_eq!(v["scores"].as_array().unwrap().len(), 1000, "{route}");
    }

    // Excluding the top three (and ids outside the catalogue) shifts the list.
    let top3: Vec<u64> = probe.items.iter().take(3).map(|i| i.0).collect();
    let body = json!({
        "user_id": PROBE_USER,
        "k": 7,
        "exclude": [top3[0], top3[1], top3[2], 0u64, 100_001u64, u64::MAX],
    });
    let a = post_raw(&c, &d.url(RECOMMEND), body.to_string()).await;
    let items = assert_recommend_ok("exclude the top 3", &a, "demo", 7);
    let ids: Vec<u64> = items.iter().map(|i| i.0).collect();
    let want: Vec<u64> = probe.items[3..].iter().map(|i| i.0).collect();
    assert_eq!(ids, want, "exclude the top 3");
    probe.check(&mut d, &c, "requests at the limits").await;
    assert!(d.is_running());
    fails.finish();
}

#[tokio::test]
async fn unknown_items_are_422_and_do_not_spoil_a_batch() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();

    for route in [SCORE, RANKER_SCORE] {
        for (items, bad) in [
            (json!([0]), "0"),
            (json!([100_001]), "100001"),
            (json!([u64::MAX]), "18446744073709551615"),
            (json!([1, 2, 3, 100_001, 4]), "100001"),
            (json!([5, 5, 999_999_999]), "999999999"),
        ] {
            let body = json!({"user_id": PROBE_USER, "items": items});
            let a = post_raw(&c, &d.url(route), body.to_string()).await;
            fails.error(
                &format!("POST {route} {body}"),
                &a,
                422,
                "invalid",
                &["unknown item", bad],
            );
        }
    }
    probe.check(&mut d, &c, "unknown items").await;

    // Bad and good requests in the same batches: only the bad ones fail,
    // and the good ones get exactly the reference answers.
    let reference_ids: Vec<u64> = probe.items.iter().map(|i| i.0).collect();
    let jobs: Vec<usize> = (0..96).collect();
    let results: Vec<(usize, Answer)> = futures::stream::iter(jobs)
        .map(|i| {
            let c = c.clone();
            let d_url = d.http.clone();
            let reference_ids = reference_ids.clone();
            async move {
                let (route, body) = match i % 4 {
                    0 => (
                        RECOMMEND,
                        json!({"user_id": PROBE_USER, "k": 10}).to_string(),
                    ),
                    1 => (
                        SCORE,
                        json!({"user_id": PROBE_USER, "items": [1, 100_001 + i as u64]})
                            .to_string(),
                    ),
                    2 => (
                        SCORE,
                        json!({"user_id": PROBE_USER, "items": reference_ids}).to_string(),
                    ),
                    _ => (
                        RECOMMEND,
                        json!({"user_id": PROBE_USER, "k": 0}).to_string(),
                    ),
                };
                (i, post_raw(&c, &format!("{d_url}{route}"), body).await)
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
            1 => assert_error(
                &format!("batched unknown item {i}"),
                a,
                422,
                "invalid",
                &["unknown item", &(100_001 + *i as u64).to_string()],
            ),
            2 => {
                assert_eq!(a.status, 200, "batched score {i}: {}", a.text);
                let v: Value = serde_json::from_str(&a.text).unwrap();
                let scores = v["scores"].as_array().unwrap();
                assert_eq!(scores.len(), 10);
                for (s, (_, r)) in scores.iter().zip(&probe.items) {
                    let s = s.as_f64().unwrap() as f32;
                    assert!((s - r).abs() <= 1e-3 * r.abs().max(1.0), "{s} vs {r}");
                }
            }
            _ => assert_error(&format!("batched k=0 {i}"), a, 422, "invalid", &["got 0"]),
        }
    }
    probe.check(&mut d, &c, "mixed batches").await;
    assert!(d.is_running());
    fails.finish();
}

#[tokio::test]
async fn recommend_on_the_ranker_is_422() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    for body in [
        json!({"user_id": 1}),
        json!({"user_id": 1, "k": 10}),
        json!({"user_id": 1, "k": 1000, "exclude": [1, 2]}),
    ] {
        let a = post_raw(&c, &d.url(RANKER_RECOMMEND), body.to_string()).await;
        assert_error(
            &format!("POST {RANKER_RECOMMEND} {body}"),
            &a,
            422,
            "invalid",
            &["demo-ranker", "ranker", "score"],
        );
    }
    // The ranker still scores.
    let a = post_raw(
        &c,
        &d.url(RANKER_SCORE),
        r#"{"user_id": 1, "items": [1, 2, 3]}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v: Value = serde_json::from_str(&a.text).unwrap();
    assert_eq!(v["model"], "demo-ranker");
    assert_eq!(v["scores"].as_array().unwrap().len(), 3);
    probe.check(&mut d, &c, "recommend on the ranker").await;
    assert!(d.is_running());
}

// ---------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_user_upserts_are_rejected_whole() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    let base = d.http.clone();
    let user = move |id: &str| format!("{base}/v1/users/{id}");

    // A known starting state for user 7.
    let a = post_raw(&c, &user("7"), r#"{"history": [1, 2, 3]}"#).await;
    assert_eq!(a.status, 200, "{}", a.text);

    let mut f_big = zeros(16).into_iter().map(|x| json!(x)).collect::<Vec<_>>();
    f_big[3] = json!(1e39);
    let mut f_neg = zeros(16).into_iter().map(|x| json!(x)).collect::<Vec<_>>();
    f_neg[15] = json!(-1e39);
    let mut f_huge = zeros(16).into_iter().map(|x| json!(x)).collect::<Vec<_>>();
    f_huge[0] = json!(1e300);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            json!({"history": [100_001]}).to_string(),
            vec!["unknown item", "100001"],
        ),
        (
            json!({"history": [0]}).to_string(),
            vec!["unknown item", "0"],
        ),
        (
            json!({"history": [4, 5, u64::MAX]}).to_string(),
            vec!["unknown item", "18446744073709551615"],
        ),
        (
            json!({"features": zeros(15)}).to_string(),
            vec!["16", "got 15"],
        ),
        (
            json!({"features": zeros(17)}).to_string(),
            vec!["16", "got 17"],
        ),
        (
            json!({"features": zeros(0)}).to_string(),
            vec!["16", "got 0"],
        ),
        (
            json!({"features": zeros(10_000)}).to_string(),
            vec!["16", "got 10000"],
        ),
        // A valid history with bad features: nothing of it may be applied.
        (
            json!({"history": [4, 5], "features": zeros(3)}).to_string(),
            vec!["16", "got 3"],
        ),
        (
            json!({"history": [4, 100_001], "features": zeros(16)}).to_string(),
            vec!["unknown item", "100001"],
        ),
    ];
    for (body, needles) in &cases {
        let a = post_raw(&c, &user("7"), body.clone()).await;
        let shown: String = body.chars().take(120).collect();
        fails.error(
            &format!("POST /v1/users/7 {shown}"),
            &a,
            422,
            "invalid",
            needles,
        );
    }
    // Beyond f32: rejected, and the message names the index and the value
    // that was sent (in any spelling), not the infinity it overflowed to.
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
        if let Err(e) = check_error(&ctx, &a, 422, "invalid", &[&field]) {
            fails.0.push(e);
            continue;
        }
        let m = serde_json::from_str::<Value>(&a.text).unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        if !spellings(exp).iter().any(|sp| m.contains(sp.as_str())) {
            fails.0.push(format!(
                "{ctx}: message {m:?} should name the value sent (1e{exp})"
            ));
        }
    }

    // Nothing of the rejected updates was applied.
    let a = post_raw(&c, &user("7"), "{}").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v: Value = serde_json::from_str(&a.text).unwrap();
    assert_eq!(v["user_id"], 7);
    assert_eq!(
        v["history"],
        json!([1, 2, 3]),
        "a rejected update leaked: {v}"
    );
    assert_eq!(v["features"], Value::Null, "a rejected update leaked: {v}");

    // Bad user ids in the path.
    for (raw, needle) in [
        ("abc", "abc"),
        ("-1", "-1"),
        ("18446744073709551616", "18446744073709551616"),
        ("1.5", "1.5"),
        ("1e3", "1e3"),
        ("0x10", "0x10"),
        ("%20", "user_id"),
        ("%00", "user_id"),
        ("7abc", "7abc"),
        ("%E2%98%83", "\u{2603}"),
        // Percent-encoding that is not UTF-8: rankd's error shape, not the
        // framework's plain-text one.
        ("%FF", "user_id"),
    ] {
        let a = post_raw(&c, &user(raw), r#"{"history": [1]}"#).await;
        fails.error(
            &format!("POST /v1/users/{raw}"),
            &a,
            422,
            "invalid",
            &["user_id", needle],
        );
    }
    let long = "9".repeat(5000);
    let a = post_raw(&c, &user(&long), "{}").await;
    assert_error("5000-digit user id", &a, 422, "invalid", &["user_id"]);
    let a = post_raw(&c, &d.url("/v1/users/"), "{}").await;
    assert_error("POST /v1/users/", &a, 404, "not_found", &[]);
    probe.check(&mut d, &c, "bad user upserts").await;

    // Values at the edge of f32 are accepted. A history up to --history-max
    // (1,000) is stored whole; a longer one is refused naming the limit and
    // changes nothing.
    let mut f_max = zeros(16);
    f_max[0] = f32::MAX;
    f_max[1] = f32::MIN;
    f_max[2] = 1e-45;
    let a = post_raw(&c, &user("8"), json!({"features": f_max}).to_string()).await;
    assert_eq!(a.status, 200, "f32 extremes: {}", a.text);
    let full: Vec<u64> = (1..=1000).collect();
    let a = post_raw(&c, &user("8"), json!({"history": full}).to_string()).await;
    assert_eq!(a.status, 200, "1000-item history: {}", a.text);
    let v: Value = serde_json::from_str(&a.text).unwrap();
    assert_eq!(v["history"], json!(full));
    let long_history: Vec<u64> = (1..=100_000).collect();
    let a = post_raw(&c, &user("8"), json!({"history": long_history}).to_string()).await;
    assert_error(
        "100000-item history",
        &a,
        422,
        "invalid",
        &["history must have <= 1000", "got 100000"],
    );
    let a = send(&c, reqwest::Method::GET, &user("8"), Vec::new()).await;
    let v: Value = serde_json::from_str(&a.text).unwrap();
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
    // the daemon answers once it has read past the limit and then closes,
    // so a client that only reads after writing everything may see a reset.
    let addr = addr_of(&d);
    for route in [RECOMMEND, SCORE, RANKER_SCORE, "/v1/users/7"] {
        let a = raw_post(&addr, route, ten_mb.as_bytes()).await;
        assert_error(
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
    assert_error("chunked 10 MB", &a, 413, "too_large", &["1048576"]);
    probe.check(&mut d, &c, "10 MB bodies").await;

    // The boundary: exactly the limit is read, one byte more is refused.
    let valid = format!("{{\"user_id\": {PROBE_USER}, \"k\": 10}}");
    let at_limit = format!("{valid}{}", " ".repeat(BODY_LIMIT - valid.len()));
    assert_eq!(at_limit.len(), BODY_LIMIT);
    let a = post_raw(&c, &d.url(RECOMMEND), at_limit.clone()).await;
    assert_recommend_ok("body of exactly 1 MiB", &a, "demo", 10);
    let over = format!("{at_limit} ");
    let a = raw_post(&addr, RECOMMEND, over.as_bytes()).await;
    assert_error(
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
// 404 / 405: routes, methods and models
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_methods_and_models() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    use reqwest::Method;

    let valid = json!({"user_id": 1, "k": 10}).to_string();
    for (method, path) in [
        (Method::GET, "/"),
        (Method::GET, "/v2/models"),
        (Method::GET, "/v1"),
        (Method::GET, "/v1/model"),
        (Method::POST, "/v1/models/demo/recommend/extra"),
        (Method::POST, "/v1/models/demo/recommendations"),
        (Method::POST, "/v1/models/demo/Recommend"),
        (Method::POST, "/v1/users/7/history"),
        (Method::GET, "/healthz/extra"),
        (Method::GET, "/metrics.json"),
        (Method::GET, "/../../etc/passwd"),
        (Method::GET, "/v1/models/demo/%2F"),
        (Method::DELETE, "/nope"),
    ] {
        let a = send(&c, method.clone(), &d.url(path), valid.clone().into_bytes()).await;
        fails.error(&format!("{method} {path}"), &a, 404, "not_found", &[]);
    }
    let long = format!("/{}", "a".repeat(10_000));
    let a = send(&c, Method::GET, &d.url(&long), vec![]).await;
    fails.error("10 KB path", &a, 404, "not_found", &[]);

    for (method, path, allowed) in [
        (Method::GET, RECOMMEND, "POST"),
        (Method::PUT, RECOMMEND, "POST"),
        (Method::DELETE, SCORE, "POST"),
        (Method::PATCH, "/v1/users/7", "POST"),
        (Method::DELETE, "/v1/users/7", "POST"),
        (Method::GET, "/v1/items/7", "POST"),
        (Method::POST, "/v1/models", "GET"),
        (Method::DELETE, "/v1/models/demo", "GET"),
        (Method::POST, "/healthz", "GET"),
        (Method::PUT, "/readyz", "GET"),
        (Method::POST, "/metrics", "GET"),
    ] {
        let a = send(&c, method.clone(), &d.url(path), valid.clone().into_bytes()).await;
        fails.error(
            &format!("{method} {path}"),
            &a,
            405,
            "method_not_allowed",
            &[method.as_str(), path],
        );
        let allow = a
            .headers
            .get(reqwest::header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{method} {path}: 405 without an Allow header"));
        assert!(
            allow.contains(allowed),
            "{method} {path}: Allow {allow:?} should list {allowed}"
        );
    }
    probe.check(&mut d, &c, "unknown routes and methods").await;

    let weird_names = [
        "nope",
        "DEMO",
        "demo%20",
        "demo-ranker2",
        "%2e%2e%2f%2e%2e%2fetc",
        "demo%00",
        "%E2%98%83",
        "demo;drop",
    ];
    for name in weird_names {
        for (method, suffix, body) in [
            (Method::POST, "/recommend", valid.clone()),
            (
                Method::POST,
                "/score",
                r#"{"user_id": 1, "items": [1]}"#.to_string(),
            ),
            (Method::GET, "", String::new()),
        ] {
            let path = format!("/v1/models/{name}{suffix}");
            let a = send(&c, method.clone(), &d.url(&path), body.into_bytes()).await;
            fails.error(
                &format!("{method} {path}"),
                &a,
                404,
                "not_found",
                &["not found", "demo"],
            );
        }
    }
    let long_name = "m".repeat(10_000);
    let a = post_raw(
        &c,
        &d.url(&format!("/v1/models/{long_name}/recommend")),
        valid.clone(),
    )
    .await;
    fails.error("10 KB model name", &a, 404, "not_found", &["not found"]);
    let a = post_raw(&c, &d.url("/v1/models/nope/recommend"), valid.clone()).await;
    fails.error(
        "unknown model",
        &a,
        404,
        "not_found",
        &["nope", "demo-ranker"],
    );
    probe.check(&mut d, &c, "unknown models").await;

    // The read-only routes still answer.
    let (s, body) = get(&c, &d.url("/v1/models")).await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["models"].as_array().unwrap().len(), 2, "{v}");
    let (s, _) = get(&c, &d.url("/healthz")).await;
    assert_eq!(s, 200);
    let (s, _) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 200);
    let (s, metrics) = get(&c, &d.url("/metrics")).await;
    assert_eq!(s, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rankd_requests_total") && l.contains("\"404\"")),
        "the unknown-model requests are counted: {metrics}"
    );
    assert!(d.is_running());
    fails.finish();
}

// ---------------------------------------------------------------------------
// 429 / 504 / 503 on derived models
// ---------------------------------------------------------------------------

/// A repository with `demo` and a copy of it whose queue holds one request
/// and waits `delay_us` for company.
fn slow_repo(delay_us: u64, queue: usize) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    derived_model(root.path(), "slow", "demo", move |t| {
        t.replace(
            "max_queue_delay_us = 500",
            &format!("max_queue_delay_us = {delay_us}"),
        )
        .replace(
            "max_queue_size = 1024",
            &format!("max_queue_size = {queue}"),
        )
    });
    root
}

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
    assert_error(
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
    assert_error(
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
    assert_error(
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
    assert_error("score on a failed model", &a, 503, "not_ready", &["broken"]);
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false, "{v}");
    assert_eq!(v["models"]["broken"], "failed", "{v}");
    // Input errors are still reported as such on the healthy model.
    let a = post_raw(&c, &d.url(RECOMMEND), r#"{"user_id": 1, "k": 0}"#).await;
    assert_error(
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

/// xorshift64*: a small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

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
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            b.push(b'{');
        }
        let at = rng.below(b.len());
        match rng.below(6) {
            0 => b[at] = rng.next() as u8,
            1 => {
                b.remove(at);
            }
            2 => b.insert(at, rng.next() as u8),
            3 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                b.splice(at..at, token.iter().copied());
            }
            4 => b.truncate(at),
            _ => {
                // Replace a number-ish run with an interesting token.
                let end = (at + 1 + rng.below(4)).min(b.len());
                let token = INTERESTING[rng.below(INTERESTING.len())];
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
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
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
            400 => assert_error(&ctx, a, 400, "malformed", &[]),
            422 => assert_error(&ctx, a, 422, "invalid", &[]),
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

fn addr_of(d: &Daemon) -> String {
    d.http.trim_start_matches("http://").to_string()
}

/// Connects, writes `bytes` (a write error, such as a reset after the server
/// gave up, is not a failure) while reading until the server closes or
/// `wait` passes. Returns what was read and whether the server closed.
async fn raw_exchange_closed(addr: &str, bytes: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Read while writing, so an early answer is not lost to a reset.
    let bytes = bytes.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let mut out = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 8192];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    writer.abort();
    (out, closed)
}

async fn raw_exchange(addr: &str, bytes: &[u8], wait: Duration) -> Vec<u8> {
    raw_exchange_closed(addr, bytes, wait).await.0
}

/// POSTs `body` with a Content-Length over a raw connection.
async fn raw_post(addr: &str, path: &str, body: &[u8]) -> Answer {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let resp = raw_exchange(addr, &req, Duration::from_secs(10)).await;
    raw_answer(&resp)
}

/// A raw HTTP/1.1 answer as an [`Answer`] (headers: Content-Type and Retry-After).
fn raw_answer(resp: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut headers = reqwest::header::HeaderMap::new();
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                reqwest::header::HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    let chunked = headers
        .get(reqwest::header::TRANSFER_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let body = if chunked {
        // Good enough for the short answers here: drop the size lines.
        let mut out = String::new();
        let mut lines = body.split("\r\n");
        while let Some(size) = lines.next() {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(lines.next().unwrap_or(""));
        }
        out
    } else {
        body.to_string()
    };
    Answer {
        status: status_of(resp).unwrap_or(0),
        headers,
        text: body,
    }
}

fn status_of(resp: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(resp);
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

fn body_of(resp: &[u8]) -> String {
    let text = String::from_utf8_lossy(resp);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn raw_tcp_garbage_does_not_hurt_the_daemon() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let addr = addr_of(&d);
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
    assert_error(
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
