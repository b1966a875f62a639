//! Talking to the daemon over HTTP: a client, JSON and raw-body requests,
//! raw TCP for what no HTTP client sends, /metrics and user seeding.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::daemon::Daemon;

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

impl Daemon {
    pub fn client() -> reqwest::Client {
        client()
    }
}

/// POSTs JSON and returns (status, body as JSON or Null).
pub async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

pub async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// GETs `url`, which must answer 200 with JSON.
pub async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    let (s, body) = get(c, url).await;
    assert_eq!(s, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body}"))
}

/// One HTTP answer: status, headers and the body as text.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    pub fn header(&self, name: reqwest::header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    async fn of(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        Answer {
            status,
            headers,
            text,
        }
    }
}

/// Sends `body` as is (`None`: no body at all, not even a Content-Length).
pub async fn request(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Vec<u8>>,
) -> Answer {
    let mut req = c.request(method.clone(), url);
    if let Some(body) = body {
        req = req.body(body);
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: no answer: {e:?}"));
    Answer::of(r).await
}

pub async fn post_raw(c: &reqwest::Client, url: &str, body: impl Into<Vec<u8>>) -> Answer {
    request(c, reqwest::Method::POST, url, Some(body.into())).await
}

pub async fn post_json(c: &reqwest::Client, url: &str, body: &Value) -> Answer {
    post_raw(c, url, body.to_string()).await
}

// ---------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------

pub async fn metrics(c: &reqwest::Client, d: &Daemon) -> String {
    let (s, text) = get(c, &d.url("/metrics")).await;
    assert_eq!(s, 200, "/metrics: {text}");
    text
}

/// The value of the sample `series` (name and labels exactly as exposed,
/// e.g. `rankd_user_updates_total{source="api"}`), if exposed.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let v = l.strip_prefix(series)?.strip_prefix(' ')?;
        Some(
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{series}: {v:?} is not a number ({e})")),
        )
    })
}

// ---------------------------------------------------------------------------
// Users and answers
// ---------------------------------------------------------------------------

/// A spread of `len` distinct-looking catalogue ids for `user`.
pub fn spread_history(user: u64, len: u64) -> Vec<u64> {
    (0..len)
        .map(|i| 1 + (user * 7919 + i * 104_729) % 100_000)
        .collect()
}

/// Upserts each user's history on `d` (every upsert must succeed).
pub async fn seed_histories(c: &reqwest::Client, d: &Daemon, users: &[(u64, Vec<u64>)]) {
    for (u, history) in users {
        let (s, body) = post(
            c,
            &d.url(&format!("/v1/users/{u}")),
            json!({ "history": history }),
        )
        .await;
        assert_eq!(s, 200, "upsert of user {u}: {body}");
    }
}

/// Recommends `k` items from `model` for each user, one call at a time
/// (every call must succeed): the reference answers.
pub async fn recommend_each(
    c: &reqwest::Client,
    d: &Daemon,
    model: &str,
    users: &[u64],
    k: usize,
) -> Vec<Value> {
    let mut out = Vec::with_capacity(users.len());
    for &u in users {
        let (s, body) = post(
            c,
            &d.url(&format!("/v1/models/{model}/recommend")),
            json!({ "user_id": u, "k": k }),
        )
        .await;
        assert_eq!(s, 200, "recommend for user {u}: {body}");
        out.push(body);
    }
    out
}

/// The item ids of a recommend answer, in order.
pub fn ids(v: &Value) -> Vec<u64> {
    v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {v}"))
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// Raw TCP: what no HTTP client sends
// ---------------------------------------------------------------------------

/// Connects, writes `bytes` (a write error, such as a reset after the server
/// gave up, is not a failure) while reading until the server closes or
/// `wait` passes. Returns what was read and whether the server closed.
pub async fn raw_exchange_closed(addr: &str, bytes: &[u8], wait: Duration) -> (Vec<u8>, bool) {
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

pub async fn raw_exchange(addr: &str, bytes: &[u8], wait: Duration) -> Vec<u8> {
    raw_exchange_closed(addr, bytes, wait).await.0
}

/// POSTs `body` with a Content-Length over a raw connection.
pub async fn raw_post(addr: &str, path: &str, body: &[u8]) -> Answer {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let resp = raw_exchange(addr, &req, Duration::from_secs(10)).await;
    raw_answer(&resp)
}

/// A raw HTTP/1.1 answer as an [`Answer`].
pub fn raw_answer(resp: &[u8]) -> Answer {
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

/// The status of a raw HTTP/1.x answer; `None` if it is not one.
pub fn status_of(resp: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(resp);
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

pub fn body_of(resp: &[u8]) -> String {
    let text = String::from_utf8_lossy(resp);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// A raw HTTP/1.1 chunked POST on `addr` of `lines`, written from a
/// thread; returns the stream (for reading), a counter of bytes written so
/// far and the thread.
pub fn chunked_post(
    addr: &str,
    path: &str,
    lines: impl Iterator<Item = String> + Send + 'static,
) -> (
    std::net::TcpStream,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::thread::JoinHandle<()>,
) {
    chunked_post_every(addr, path, lines, 16 * 1024)
}

/// As [`chunked_post`], writing a chunk once `flush_at` bytes are held.
pub fn chunked_post_every(
    addr: &str,
    path: &str,
    lines: impl Iterator<Item = String> + Send + 'static,
    flush_at: usize,
) -> (
    std::net::TcpStream,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::thread::JoinHandle<()>,
) {
    let stream = std::net::TcpStream::connect(addr).unwrap();
    let mut w = stream.try_clone().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-ndjson\r\n\r\n"
    );
    let t = std::thread::spawn(move || {
        w.write_all(head.as_bytes()).unwrap();
        let mut chunk = String::new();
        for l in lines {
            chunk.push_str(&l);
            if chunk.len() >= flush_at {
                if w.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
                    .is_err()
                {
                    return;
                }
                counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            let _ = w.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
        let _ = w.write_all(b"0\r\n\r\n");
    });
    (stream, written, t)
}

/// Reads a chunked HTTP/1.1 response's NDJSON lines from `stream`, giving
/// each to `each` until it returns false or the response ends; returns the
/// status line.
pub fn read_ndjson_response(
    stream: std::net::TcpStream,
    mut each: impl FnMut(Value) -> bool,
) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut r = std::io::BufReader::new(stream);
    let mut status = String::new();
    std::io::BufRead::read_line(&mut r, &mut status).unwrap();
    loop {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut r, &mut l).unwrap();
        if l == "\r\n" || l.is_empty() {
            break;
        }
    }
    let mut pending = Vec::new();
    loop {
        let mut size = String::new();
        if std::io::BufRead::read_line(&mut r, &mut size).unwrap_or(0) == 0 {
            return status;
        }
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return status;
        };
        let mut data = vec![0; size + 2];
        if r.read_exact(&mut data).is_err() || size == 0 {
            return status;
        }
        pending.extend_from_slice(&data[..size]);
        while let Some(at) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=at).collect();
            if !each(serde_json::from_slice(&line).unwrap()) {
                return status;
            }
        }
    }
}
