//! Error checks: an HTTP answer or a socket answer is an error of a given
//! type whose message contains given fragments.
//!
//! Over HTTP an error is exactly `{"error": {"type", "message"}}` with a JSON
//! content type; over the socket it is `{"id", "ok": false, "error": {"type",
//! "message"}}` and no `result`. Types and messages are never empty.

use serde_json::{json, Value};

use super::http::Answer;

/// Checks an HTTP error answer: exact status, exactly
/// `{"error": {"type", "message"}}` with the expected type, a JSON content
/// type, and a message containing every needle. Returns the message.
pub fn check_http_error(
    ctx: &str,
    a: &Answer,
    status: u16,
    kind: &str,
    needles: &[&str],
) -> Result<String, String> {
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
    Ok(m.to_string())
}

/// [`check_http_error`], failing the test; returns the message.
pub fn assert_http_error(
    ctx: &str,
    a: &Answer,
    status: u16,
    kind: &str,
    needles: &[&str],
) -> String {
    check_http_error(ctx, a, status, kind, needles).unwrap_or_else(|e| panic!("{e}"))
}

/// Checks a socket error answer: an `id` among `ids` (any id when empty),
/// `ok` false, no `result`, a type among `kinds` (any when empty) and a
/// message containing every needle. Returns the message.
pub fn check_socket_error(
    v: &Value,
    ids: &[u64],
    kinds: &[&str],
    needles: &[&str],
) -> Result<String, String> {
    let id = v["id"].as_u64().ok_or_else(|| format!("no id in {v}"))?;
    if !ids.is_empty() && !ids.contains(&id) {
        return Err(format!("id {id}, expected one of {ids:?}: {v}"));
    }
    if v["ok"] != json!(false) {
        return Err(format!("expected ok=false, got {v}"));
    }
    if v.get("result").is_some() {
        return Err(format!("an error with a result: {v}"));
    }
    let kind = v["error"]["type"]
        .as_str()
        .ok_or_else(|| format!("no error.type in {v}"))?;
    let message = v["error"]["message"]
        .as_str()
        .ok_or_else(|| format!("no error.message in {v}"))?;
    if kind.is_empty() || message.is_empty() {
        return Err(format!("empty error type or message: {v}"));
    }
    if !kinds.is_empty() && !kinds.contains(&kind) {
        return Err(format!(
            "error type {kind:?}, expected one of {kinds:?}: {v}"
        ));
    }
    for needle in needles {
        if !message.contains(needle) {
            return Err(format!("message {message:?} should mention {needle:?}"));
        }
    }
    Ok(message.to_string())
}

/// A socket error answer with exactly `id` and a type among `kinds` (any
/// when empty), failing the test; returns the message.
pub fn assert_socket_error(v: &Value, id: u64, kinds: &[&str], ctx: &str) -> String {
    check_socket_error(v, &[id], kinds, &[]).unwrap_or_else(|e| panic!("{ctx}: {e}"))
}

/// Collects the failures of a table of cases, so one run reports them all.
#[derive(Default)]
pub struct Fails(pub Vec<String>);

impl Fails {
    pub fn check(&mut self, r: Result<String, String>) {
        if let Err(e) = r {
            self.0.push(e);
        }
    }

    pub fn push(&mut self, e: String) {
        self.0.push(e);
    }

    pub fn http_error(&mut self, ctx: &str, a: &Answer, status: u16, kind: &str, needles: &[&str]) {
        self.check(check_http_error(ctx, a, status, kind, needles));
    }

    pub fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} case(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}
