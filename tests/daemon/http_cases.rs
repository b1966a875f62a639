//! Hostile HTTP requests as one table: each row is a request (method, path,
//! body) and the error it must get (status, `error.type`, fragments the
//! message must contain). One loop runs every row against one daemon; the
//! reference recommendation is checked after each section, and at the end
//! the rejected user upserts have left no state behind.

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::*;
use crate::http_bad_input::{Probe, PROBE_USER, RANKER_RECOMMEND, RANKER_SCORE, RECOMMEND, SCORE};

/// A request body: bytes sent as they are, or none at all (no
/// Content-Length, nothing sent).
#[derive(Clone)]
pub enum Body {
    None,
    Bytes(Vec<u8>),
}

pub const NO_BODY: Body = Body::None;

impl From<&str> for Body {
    fn from(s: &str) -> Self {
        Body::Bytes(s.as_bytes().to_vec())
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Body::Bytes(s.into_bytes())
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Body::Bytes(b)
    }
}

impl From<Value> for Body {
    fn from(v: Value) -> Self {
        Body::Bytes(v.to_string().into_bytes())
    }
}

/// One hostile request and the error it must get.
#[derive(Clone)]
pub struct Case {
    pub section: String,
    pub method: Method,
    pub path: String,
    pub body: Body,
    pub status: u16,
    pub kind: &'static str,
    pub needles: Vec<String>,
    /// For a 405: a method the Allow header must list.
    pub allow: Option<&'static str>,
}

impl Case {
    pub fn new(
        section: impl Into<String>,
        method: Method,
        path: impl Into<String>,
        body: impl Into<Body>,
        status: u16,
        kind: &'static str,
        needles: &[String],
    ) -> Self {
        Self {
            section: section.into(),
            method,
            path: path.into(),
            body: body.into(),
            status,
            kind,
            needles: needles.to_vec(),
            allow: None,
        }
    }

    pub fn ctx(&self) -> String {
        let path: String = self.path.chars().take(80).collect();
        let body = match &self.body {
            Body::None => "(no body)".to_string(),
            Body::Bytes(b) => format!("{:?}", String::from_utf8_lossy(b))
                .chars()
                .take(120)
                .collect(),
        };
        format!("{}: {} {path} {body}", self.section, self.method)
    }
}

/// `rows! { "section"; METHOD path, body => status "type" [needles]; ... }`
macro_rules! rows {
    ($section:expr; $($method:ident $path:expr, $body:expr => $status:literal $kind:literal [$($needle:expr),* $(,)?];)*) => {
        vec![$(Case::new($section, Method::$method, $path, $body, $status, $kind, &[$($needle.to_string()),*])),*]
    };
}

/// Sends every case and checks its answer, collecting the failures; returns
/// the answers in the order of `cases`.
pub async fn run(
    c: &reqwest::Client,
    d: &Daemon,
    cases: &[Case],
    fails: &mut Fails,
) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(cases.len());
    for case in cases {
        let body = match &case.body {
            Body::None => None,
            Body::Bytes(b) => Some(b.clone()),
        };
        let a = request(c, case.method.clone(), &d.url(&case.path), body).await;
        let ctx = case.ctx();
        let needles: Vec<&str> = case.needles.iter().map(String::as_str).collect();
        fails.http_error(&ctx, &a, case.status, case.kind, &needles);
        if let Some(allowed) = case.allow {
            match a.header(reqwest::header::ALLOW) {
                None => fails.push(format!("{ctx}: {} without an Allow header", a.status)),
                Some(allow) if !allow.contains(allowed) => {
                    fails.push(format!("{ctx}: Allow {allow:?} should list {allowed}"))
                }
                Some(_) => {}
            }
        }
        answers.push(a);
    }
    answers
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

/// Each route gets bodies whose keys are valid for it, so the only fault is
/// the syntax.
pub fn malformed_json() -> Vec<Case> {
    // `F` is a field with value `V`, `A` an array of ids, `W` a complete set
    // of valid members.
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
    let mut cases = Vec::new();
    for (route, f, v, arr, w) in routes {
        let t = |s: &str| -> Vec<u8> {
            s.replace("F", f)
                .replace("V", v)
                .replace("A", arr)
                .replace("W", w)
                .into_bytes()
        };
        let bodies: Vec<(&str, Vec<u8>)> = vec![
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
            ("lone close", b"}".to_vec()),
        ];
        for (name, body) in bodies {
            cases.push(Case::new(
                format!("malformed JSON, {name}"),
                Method::POST,
                route,
                body,
                400,
                "malformed",
                &[],
            ));
        }
    }
    cases
}

/// A body that is not JSON is malformed (400) even when the part before the
/// syntax error already holds a wrong value: the value errors of a body that
/// cannot be parsed are beside the point.
pub fn syntax_before_values() -> Vec<Case> {
    rows! { "syntax errors win over value errors";
        POST RECOMMEND, r#"{"user_id": "x"} garbage"# => 400 "malformed" [];
        POST RECOMMEND, r#"{"user_id": -1"# => 400 "malformed" [];
        POST RECOMMEND, r#"{"bogus": 1,}"# => 400 "malformed" [];
        POST RECOMMEND, r#"{"user_id": 1, "k": 0"# => 400 "malformed" [];
        POST RECOMMEND, r#"[1, 10"# => 400 "malformed" [];
        POST SCORE, r#"{"user_id": 1, "exclude": [1, 2"# => 400 "malformed" [];
        POST SCORE, r#"{"user_id": 1, "items": ["a", 2"# => 400 "malformed" [];
        POST "/v1/users/7", r#"{"user_id": 7"# => 400 "malformed" [];
        POST "/v1/users/7", r#"{"history": "x"} }"# => 400 "malformed" [];
    }
}

/// Empty and blank bodies say so; no body at all is malformed too.
pub fn empty_bodies() -> Vec<Case> {
    let mut cases = Vec::new();
    for route in [RECOMMEND, SCORE, RANKER_SCORE, "/v1/users/7"] {
        cases.extend(rows! { "empty bodies";
            POST route, "" => 400 "malformed" ["empty"];
            POST route, "   " => 400 "malformed" ["empty"];
            POST route, "\r\n\r\n\t" => 400 "malformed" ["empty"];
            POST route, NO_BODY => 400 "malformed" [];
        });
    }
    cases
}

// ---------------------------------------------------------------------------
// 422: valid JSON, wrong types or values
// ---------------------------------------------------------------------------

pub fn wrong_types() -> Vec<Case> {
    rows! { "wrong types";
        // The body is not an object.
        POST RECOMMEND, "[]" => 422 "invalid" [];
        POST RECOMMEND, "[1, 10]" => 422 "invalid" [];
        POST RECOMMEND, "[1, 10, [], null]" => 422 "invalid" [];
        POST RECOMMEND, "\"user_id\"" => 422 "invalid" ["invalid type", "user_id"];
        POST RECOMMEND, "42" => 422 "invalid" ["invalid type", "42"];
        POST RECOMMEND, "null" => 422 "invalid" ["invalid type", "null"];
        POST RECOMMEND, "true" => 422 "invalid" ["invalid type"];
        POST SCORE, "[]" => 422 "invalid" [];
        POST SCORE, "[1, [1, 2]]" => 422 "invalid" [];
        POST "/v1/users/7", "[]" => 422 "invalid" [];
        POST "/v1/users/7", "[[1], null]" => 422 "invalid" [];
        POST "/v1/users/7", "\"history\"" => 422 "invalid" ["invalid type"];
        // Missing required fields.
        POST RECOMMEND, "{}" => 422 "invalid" ["missing field", "user_id"];
        POST RECOMMEND, r#"{"k": 10}"# => 422 "invalid" ["missing field", "user_id"];
        POST SCORE, r#"{"user_id": 1}"# => 422 "invalid" ["missing field", "items"];
        POST SCORE, r#"{"items": [1]}"# => 422 "invalid" ["missing field", "user_id"];
        // Unknown fields.
        POST RECOMMEND, r#"{"user_id": 1, "kk": 10}"# => 422 "invalid" ["unknown field", "kk"];
        POST RECOMMEND, r#"{"user_id": 1, "K": 10}"# => 422 "invalid" ["unknown field", "K"];
        POST RECOMMEND, r#"{"user_id": 1, "items": [1]}"# => 422 "invalid" ["unknown field", "items"];
        POST SCORE, r#"{"user_id": 1, "items": [1], "k": 3}"# => 422 "invalid" ["unknown field", "k"];
        POST "/v1/users/7", r#"{"histroy": [1]}"# => 422 "invalid" ["unknown field", "histroy"];
        POST "/v1/users/7", r#"{"user_id": 7}"# => 422 "invalid" ["unknown field", "user_id"];
        // Duplicate fields.
        POST RECOMMEND, r#"{"user_id": 1, "user_id": 2}"# => 422 "invalid" ["duplicate field", "user_id"];
        // user_id of the wrong type.
        POST RECOMMEND, r#"{"user_id": "42"}"# => 422 "invalid" ["invalid type", "42"];
        POST RECOMMEND, r#"{"user_id": "abc"}"# => 422 "invalid" ["invalid type", "abc"];
        POST RECOMMEND, r#"{"user_id": null}"# => 422 "invalid" ["invalid type", "null"];
        POST RECOMMEND, r#"{"user_id": true}"# => 422 "invalid" ["invalid type", "true"];
        POST RECOMMEND, r#"{"user_id": [42]}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": {"id": 42}}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 42.5}"# => 422 "invalid" ["invalid type", "42.5"];
        POST SCORE, r#"{"user_id": "1", "items": [1]}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": false, "items": [1]}"# => 422 "invalid" ["invalid type"];
        // k of the wrong type.
        POST RECOMMEND, r#"{"user_id": 1, "k": "10"}"# => 422 "invalid" ["invalid type", "10"];
        POST RECOMMEND, r#"{"user_id": 1, "k": null}"# => 422 "invalid" ["invalid type", "null"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 2.5}"# => 422 "invalid" ["invalid type", "2.5"];
        POST RECOMMEND, r#"{"user_id": 1, "k": [10]}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "k": false}"# => 422 "invalid" ["invalid type"];
        // exclude of the wrong type.
        POST RECOMMEND, r#"{"user_id": 1, "exclude": 5}"# => 422 "invalid" ["invalid type", "5"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": "1,2"}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": null}"# => 422 "invalid" ["invalid type", "null"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": {"1": true}}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": ["1"]}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": [1.5]}"# => 422 "invalid" ["invalid type", "1.5"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": [[1]]}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": [1, null]}"# => 422 "invalid" ["invalid type"];
        // timeout_ms of the wrong type.
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": "100"}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": 1.5}"# => 422 "invalid" ["invalid type", "1.5"];
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": [100]}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": 1, "items": [1], "timeout_ms": true}"# => 422 "invalid" ["invalid type"];
        // items of the wrong type.
        POST SCORE, r#"{"user_id": 1, "items": 1}"# => 422 "invalid" ["invalid type", "1"];
        POST SCORE, r#"{"user_id": 1, "items": null}"# => 422 "invalid" ["invalid type", "null"];
        POST SCORE, r#"{"user_id": 1, "items": "1"}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": 1, "items": ["1"]}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": 1, "items": [1.0]}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": 1, "items": [{"id": 1}]}"# => 422 "invalid" ["invalid type"];
        POST RANKER_SCORE, r#"{"user_id": 1, "items": [true]}"# => 422 "invalid" ["invalid type"];
        // history and features of the wrong type.
        POST "/v1/users/7", r#"{"history": 1}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"history": "1,2"}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"history": [1, "2"]}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"history": [1.5]}"# => 422 "invalid" ["invalid type", "1.5"];
        POST "/v1/users/7", r#"{"history": {"a": 1}}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"features": 0.5}"# => 422 "invalid" ["invalid type", "0.5"];
        POST "/v1/users/7", r#"{"features": "0.5"}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"features": ["0.5"]}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"features": [null]}"# => 422 "invalid" ["invalid type", "null"];
        POST "/v1/users/7", r#"{"features": [true]}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"features": [[0.5]]}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"features": {"0": 0.5}}"# => 422 "invalid" ["invalid type"];
    }
}

pub fn numbers_out_of_range() -> Vec<Case> {
    // A 400-digit integer: well-formed JSON, far beyond u64.
    let long = format!("{{\"user_id\": 1{}}}", "0".repeat(400));
    rows! { "negative and huge numbers";
        // user_id
        POST RECOMMEND, r#"{"user_id": -1}"# => 422 "invalid" ["-1"];
        POST RECOMMEND, r#"{"user_id": -9223372036854775808}"# => 422 "invalid" ["-9223372036854775808"];
        POST RECOMMEND, r#"{"user_id": 18446744073709551616}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 99999999999999999999999999}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1e30}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1e3}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1.0}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": -1.5e300}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": -7, "items": [1]}"# => 422 "invalid" ["-7"];
        POST SCORE, r#"{"user_id": 18446744073709551616, "items": [1]}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, long => 422 "invalid" [];
        // k
        POST RECOMMEND, r#"{"user_id": 1, "k": -1}"# => 422 "invalid" ["-1"];
        POST RECOMMEND, r#"{"user_id": 1, "k": -1000}"# => 422 "invalid" ["-1000"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 18446744073709551616}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 1e30}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 10.0}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 18446744073709551615}"# => 422 "invalid" ["1000", "18446744073709551615"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 9223372036854775808}"# => 422 "invalid" ["1000", "9223372036854775808"];
        // exclude / items / history ids
        POST RECOMMEND, r#"{"user_id": 1, "exclude": [-1]}"# => 422 "invalid" ["-1"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": [18446744073709551616]}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "exclude": [1e30]}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": 1, "items": [-1]}"# => 422 "invalid" ["-1"];
        POST SCORE, r#"{"user_id": 1, "items": [1, -100000]}"# => 422 "invalid" ["-100000"];
        POST SCORE, r#"{"user_id": 1, "items": [18446744073709551616]}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": 1, "items": [1e30]}"# => 422 "invalid" ["invalid type"];
        POST RANKER_SCORE, r#"{"user_id": 1, "items": [-5]}"# => 422 "invalid" ["-5"];
        POST "/v1/users/7", r#"{"history": [-1]}"# => 422 "invalid" ["-1"];
        POST "/v1/users/7", r#"{"history": [18446744073709551616]}"# => 422 "invalid" ["invalid type"];
        POST "/v1/users/7", r#"{"history": [1e30]}"# => 422 "invalid" ["invalid type"];
        // timeout_ms
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": -1}"# => 422 "invalid" ["-1"];
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": 1e30}"# => 422 "invalid" ["invalid type"];
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": 18446744073709551615}"# => 422 "invalid" ["60000", "18446744073709551615"];
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": 18446744073709551616}"# => 422 "invalid" ["invalid type"];
        POST SCORE, r#"{"user_id": 1, "items": [1], "timeout_ms": -5}"# => 422 "invalid" ["-5"];
        // Valid JSON numbers too large for any float: still well-formed JSON
        // (RFC 8259 puts no limit on a number), so a value error, not a
        // syntax error.
        POST RECOMMEND, r#"{"user_id": 1e400}"# => 422 "invalid" [];
        POST RECOMMEND, r#"{"user_id": 1, "k": 1e400}"# => 422 "invalid" [];
        POST SCORE, r#"{"user_id": 1, "items": [-1e400]}"# => 422 "invalid" [];
    }
}

/// Over a limit: the message names the limit and the value received.
pub fn limits() -> Vec<Case> {
    let exclude = |n| format!("{{\"user_id\": 1, \"exclude\": [{}]}}", repeat_ids(n));
    let items = |n| format!("{{\"user_id\": 1, \"items\": [{}]}}", repeat_ids(n));
    rows! { "limits";
        POST RECOMMEND, r#"{"user_id": 1, "k": 0}"# => 422 "invalid" ["k must be >= 1", "got 0"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 5000}"# => 422 "invalid" ["k must be <= 1000, got 5000"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 1001}"# => 422 "invalid" ["k must be <= 1000, got 1001"];
        POST RECOMMEND, r#"{"user_id": 1, "k": 100000}"# => 422 "invalid" ["k must be <= 1000, got 100000"];
        POST RECOMMEND, exclude(10_001) => 422 "invalid" ["10000", "10001"];
        POST RECOMMEND, exclude(50_000) => 422 "invalid" ["10000", "50000"];
        POST SCORE, items(1001) => 422 "invalid" ["1000", "1001"];
        POST SCORE, items(100_000) => 422 "invalid" ["1000", "100000"];
        POST RANKER_SCORE, items(1001) => 422 "invalid" ["1000", "1001"];
        POST RANKER_SCORE, items(100_000) => 422 "invalid" ["1000", "100000"];
        POST SCORE, r#"{"user_id": 1, "items": []}"# => 422 "invalid" ["items", "empty"];
        POST RANKER_SCORE, r#"{"user_id": 1, "items": []}"# => 422 "invalid" ["items", "empty"];
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": 0}"# => 422 "invalid" ["timeout_ms", "got 0"];
        POST RECOMMEND, r#"{"user_id": 1, "timeout_ms": 60001}"# => 422 "invalid" ["60000", "60001"];
        POST SCORE, r#"{"user_id": 1, "items": [1], "timeout_ms": 3600000}"# => 422 "invalid" ["60000", "3600000"];
    }
}

/// Ids outside the catalogue, named in the message.
pub fn unknown_items() -> Vec<Case> {
    let mut cases = Vec::new();
    for route in [SCORE, RANKER_SCORE] {
        let body = |items: Value| json!({"user_id": PROBE_USER, "items": items});
        cases.extend(rows! { "unknown items";
            POST route, body(json!([0])) => 422 "invalid" ["unknown item", "0"];
            POST route, body(json!([100_001])) => 422 "invalid" ["unknown item", "100001"];
            POST route, body(json!([u64::MAX])) => 422 "invalid" ["unknown item", "18446744073709551615"];
            POST route, body(json!([1, 2, 3, 100_001, 4])) => 422 "invalid" ["unknown item", "100001"];
            POST route, body(json!([5, 5, 999_999_999])) => 422 "invalid" ["unknown item", "999999999"];
        });
    }
    cases
}

pub fn recommend_on_a_ranker() -> Vec<Case> {
    rows! { "recommend on the ranker";
        POST RANKER_RECOMMEND, json!({"user_id": 1}) => 422 "invalid" ["demo-ranker", "ranker", "score"];
        POST RANKER_RECOMMEND, json!({"user_id": 1, "k": 10}) => 422 "invalid" ["demo-ranker", "ranker", "score"];
        POST RANKER_RECOMMEND, json!({"user_id": 1, "k": 1000, "exclude": [1, 2]}) => 422 "invalid" ["demo-ranker", "ranker", "score"];
    }
}

// ---------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------

/// Upserts of user 7 with one bad part: refused whole.
pub fn bad_user_upserts() -> Vec<Case> {
    let features = |n| json!({ "features": zeros(n) });
    rows! { "bad user upserts";
        POST "/v1/users/7", json!({"history": [100_001]}) => 422 "invalid" ["unknown item", "100001"];
        POST "/v1/users/7", json!({"history": [0]}) => 422 "invalid" ["unknown item", "0"];
        POST "/v1/users/7", json!({"history": [4, 5, u64::MAX]}) => 422 "invalid" ["unknown item", "18446744073709551615"];
        POST "/v1/users/7", features(15) => 422 "invalid" ["16", "got 15"];
        POST "/v1/users/7", features(17) => 422 "invalid" ["16", "got 17"];
        POST "/v1/users/7", features(0) => 422 "invalid" ["16", "got 0"];
        POST "/v1/users/7", features(10_000) => 422 "invalid" ["16", "got 10000"];
        // A valid history with bad features, and the other way round.
        POST "/v1/users/7", json!({"history": [4, 5], "features": zeros(3)}) => 422 "invalid" ["16", "got 3"];
        POST "/v1/users/7", json!({"history": [4, 100_001], "features": zeros(16)}) => 422 "invalid" ["unknown item", "100001"];
    }
}

/// Bad user ids in the path.
pub fn bad_user_paths() -> Vec<Case> {
    let body = r#"{"history": [1]}"#;
    let long = format!("/v1/users/{}", "9".repeat(5000));
    rows! { "bad user ids";
        POST "/v1/users/abc", body => 422 "invalid" ["user_id", "abc"];
        POST "/v1/users/-1", body => 422 "invalid" ["user_id", "-1"];
        POST "/v1/users/18446744073709551616", body => 422 "invalid" ["user_id", "18446744073709551616"];
        POST "/v1/users/1.5", body => 422 "invalid" ["user_id", "1.5"];
        POST "/v1/users/1e3", body => 422 "invalid" ["user_id", "1e3"];
        POST "/v1/users/0x10", body => 422 "invalid" ["user_id", "0x10"];
        POST "/v1/users/%20", body => 422 "invalid" ["user_id", "user_id"];
        POST "/v1/users/%00", body => 422 "invalid" ["user_id", "user_id"];
        POST "/v1/users/7abc", body => 422 "invalid" ["user_id", "7abc"];
        POST "/v1/users/%E2%98%83", body => 422 "invalid" ["user_id", "\u{2603}"];
        // Percent-encoding that is not UTF-8: rankd's error shape, not the
        // framework's plain-text one.
        POST "/v1/users/%FF", body => 422 "invalid" ["user_id", "user_id"];
        POST long, "{}" => 422 "invalid" ["user_id"];
        POST "/v1/users/", "{}" => 404 "not_found" [];
    }
}

// ---------------------------------------------------------------------------
// 404 / 405: routes, methods and models
// ---------------------------------------------------------------------------

pub fn unknown_routes() -> Vec<Case> {
    let valid = json!({"user_id": 1, "k": 10}).to_string();
    let long = format!("/{}", "a".repeat(10_000));
    rows! { "unknown routes";
        GET "/", valid.clone() => 404 "not_found" [];
        GET "/v2/models", valid.clone() => 404 "not_found" [];
        GET "/v1", valid.clone() => 404 "not_found" [];
        GET "/v1/model", valid.clone() => 404 "not_found" [];
        POST "/v1/models/demo/recommend/extra", valid.clone() => 404 "not_found" [];
        POST "/v1/models/demo/recommendations", valid.clone() => 404 "not_found" [];
        POST "/v1/models/demo/Recommend", valid.clone() => 404 "not_found" [];
        POST "/v1/users/7/history", valid.clone() => 404 "not_found" [];
        GET "/healthz/extra", valid.clone() => 404 "not_found" [];
        GET "/metrics.json", valid.clone() => 404 "not_found" [];
        GET "/../../etc/passwd", valid.clone() => 404 "not_found" [];
        GET "/v1/models/demo/%2F", valid.clone() => 404 "not_found" [];
        DELETE "/nope", valid.clone() => 404 "not_found" [];
        GET long, "" => 404 "not_found" [];
    }
}

/// A known route with the wrong method: 405 naming both, and an Allow header
/// listing the right one.
pub fn wrong_methods() -> Vec<Case> {
    let valid = json!({"user_id": 1, "k": 10}).to_string();
    [
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
    ]
    .into_iter()
    .map(|(method, path, allowed)| {
        let needles = [method.as_str().to_string(), path.to_string()];
        let mut case = Case::new(
            "wrong methods",
            method,
            path,
            valid.clone(),
            405,
            "method_not_allowed",
            &needles,
        );
        case.allow = Some(allowed);
        case
    })
    .collect()
}

pub fn unknown_models() -> Vec<Case> {
    let valid = json!({"user_id": 1, "k": 10}).to_string();
    let score = r#"{"user_id": 1, "items": [1]}"#;
    let mut cases = Vec::new();
    for name in [
        "nope",
        "DEMO",
        "demo%20",
        "demo-ranker2",
        "%2e%2e%2f%2e%2e%2fetc",
        "demo%00",
        "%E2%98%83",
        "demo;drop",
    ] {
        let path = |suffix: &str| format!("/v1/models/{name}{suffix}");
        cases.extend(rows! { "unknown models";
            POST path("/recommend"), valid.clone() => 404 "not_found" ["not found", "demo"];
            POST path("/score"), score => 404 "not_found" ["not found", "demo"];
            GET path(""), "" => 404 "not_found" ["not found", "demo"];
        });
    }
    let long_name = format!("/v1/models/{}/recommend", "m".repeat(10_000));
    cases.extend(rows! { "unknown models";
        POST long_name, valid.clone() => 404 "not_found" ["not found"];
        POST "/v1/models/nope/recommend", valid.clone() => 404 "not_found" ["nope", "demo-ranker"];
    });
    cases
}

/// Every section, in the order the table test runs them.
pub fn table() -> Vec<(&'static str, Vec<Case>)> {
    vec![
        ("malformed JSON", malformed_json()),
        ("syntax errors before value errors", syntax_before_values()),
        ("empty bodies", empty_bodies()),
        ("wrong types", wrong_types()),
        ("negative and huge numbers", numbers_out_of_range()),
        ("over-limit requests", limits()),
        ("unknown items", unknown_items()),
        ("recommend on the ranker", recommend_on_a_ranker()),
        ("bad user upserts", bad_user_upserts()),
        ("bad user ids", bad_user_paths()),
        ("unknown routes", unknown_routes()),
        ("wrong methods", wrong_methods()),
        ("unknown models", unknown_models()),
    ]
}

#[tokio::test]
async fn every_hostile_request_gets_its_documented_error() {
    let mut d = Daemon::start();
    let c = Daemon::client();
    let probe = Probe::take(&d, &c).await;
    let mut fails = Fails::default();
    let table = table();
    // Every row of every section is there (a section that lost its rows
    // would pass).
    let sizes: Vec<(&str, usize)> = table.iter().map(|(s, rows)| (*s, rows.len())).collect();
    assert_eq!(
        sizes,
        [
            ("malformed JSON", 4 * 29),
            ("syntax errors before value errors", 9),
            ("empty bodies", 4 * 4),
            ("wrong types", 68),
            ("negative and huge numbers", 37),
            ("over-limit requests", 15),
            ("unknown items", 2 * 5),
            ("recommend on the ranker", 3),
            ("bad user upserts", 9),
            ("bad user ids", 13),
            ("unknown routes", 14),
            ("wrong methods", 11),
            ("unknown models", 8 * 3 + 2),
        ]
    );
    for (section, cases) in &table {
        run(&c, &d, cases, &mut fails).await;
        probe.check(&mut d, &c, section).await;
    }

    // Every upsert above was refused: user 7 never came into being with any
    // state.
    let a = post_raw(&c, &d.url("/v1/users/7"), "{}").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    if v["history"] != json!([]) || v["features"] != Value::Null {
        fails.push(format!(
            "a rejected upsert of user 7 left state behind: {v}"
        ));
    }

    // The read-only routes still answer, and the refusals were counted.
    let v = get_json(&c, &d.url("/v1/models")).await;
    assert_eq!(v["models"].as_array().unwrap().len(), 2, "{v}");
    let (s, _) = get(&c, &d.url("/healthz")).await;
    assert_eq!(s, 200);
    let (s, _) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 200);
    let text = metrics(&c, &d).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("rankd_requests_total") && l.contains("\"404\"")),
        "the unknown-model requests are counted: {text}"
    );
    assert!(d.is_running());
    fails.finish();
}
