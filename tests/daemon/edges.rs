//! Bad input at the edges, against the real daemon: slow request heads,
//! half-sent socket frames and idle connections are closed on time while
//! other clients keep being answered; the connection cap refuses the extra
//! with its documented answer and leaves the served alone; a client that
//! writes its whole oversized body before reading still reads the 413.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::frame::*;
use crate::common::*;

const HEADER_MS: u64 = 300;
const IDLE_MS: u64 = 1500;
/// How late a close may come on a shared, busy test machine.
const SLACK: Duration = Duration::from_millis(1200);
/// How early (a timer never fires early; this is clock granularity).
const EARLY: Duration = Duration::from_millis(50);

fn timeouts() -> [String; 4] {
    [
        "--header-timeout-ms".into(),
        HEADER_MS.to_string(),
        "--idle-timeout-ms".into(),
        IDLE_MS.to_string(),
    ]
}

/// Waits up to `within` for the peer to close (EOF or reset); how long after
/// `since` it did, or `None` if it stayed open.
async fn closed_after(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    since: Instant,
    within: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    r.ok().map(|_| since.elapsed())
}

fn assert_closed_in(what: &str, after: Option<Duration>, from: Duration, to: Duration) {
    let after = after.unwrap_or_else(|| panic!("{what}: still open after {to:?}"));
    assert!(
        after + EARLY >= from && after <= to,
        "{what}: closed after {after:?}, expected within {from:?}..{to:?}"
    );
}

/// Reads one HTTP answer with a Content-Length from a kept-alive connection.
async fn read_answer(s: &mut TcpStream, ctx: &str) -> (u16, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or_else(|| panic!("{ctx}: no content-length in {head:?}"));
            if got.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&got[end + 4..end + 4 + len]).to_string();
                return (status_of(&got).unwrap_or(0), body);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{ctx}: no whole answer within 10 s: {got:?}"))
            .unwrap_or_else(|e| panic!("{ctx}: reading the answer failed: {e}"));
        assert!(
            n > 0,
            "{ctx}: closed mid-answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// Normal requests on fresh connections, one after another until `until`:
/// every one answered 200, none slower than `max`. Returns how many.
async fn keep_asking(d: &Daemon, until: Instant, max: Duration) -> usize {
    let c = Daemon::client();
    let url = d.url("/v1/models/demo/recommend");
    let mut n = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let a = post_json(&c, &url, &json!({ "user_id": 42, "k": 10 })).await;
        assert_eq!(
            a.status, 200,
            "a normal request beside slow clients: {}",
            a.text
        );
        assert!(
            started.elapsed() < max,
            "a normal request took {:?} beside slow clients",
            started.elapsed()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_heads_and_idle_http_connections_are_closed_on_time() {
    // Close times and latencies are measured: no other test's daemon beside.
    let _alone = alone();
    let args = timeouts();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&demo_models(), &args);
    let addr = d.addr();
    let header = Duration::from_millis(HEADER_MS);
    let idle = Duration::from_millis(IDLE_MS);
    const N: usize = 20;

    let mut checks = tokio::task::JoinSet::new();
    // Half a request head, then nothing.
    for i in 0..N {
        let addr = addr.clone();
        checks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let since = Instant::now();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            let after = closed_after(&mut s, since, header + SLACK).await;
            assert_closed_in(&format!("half a head #{i}"), after, header, header + SLACK);
        });
    }
    // A head dribbled a byte every 50 ms: bytes keep arriving, the head
    // never ends, the header timeout still holds.
    for i in 0..4 {
        let addr = addr.clone();
        checks.spawn(async move {
            let s = TcpStream::connect(&addr).await.unwrap();
            let since = Instant::now();
            let (mut rd, mut wr) = s.into_split();
            let dribble = tokio::spawn(async move {
                for b in
                    b"GET /healthz HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                {
                    if wr.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            let after = closed_after(&mut rd, since, header + SLACK).await;
            dribble.abort();
            assert_closed_in(
                &format!("dribbled head #{i}"),
                after,
                header,
                header + SLACK,
            );
        });
    }
    // Nothing sent at all: the first head has the header timeout too.
    for i in 0..4 {
        let addr = addr.clone();
        checks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let since = Instant::now();
            let after = closed_after(&mut s, since, header + SLACK).await;
            assert_closed_in(&format!("silent #{i}"), after, header, header + SLACK);
        });
    }
    // Kept alive after an answer, then idle: closed after the idle timeout,
    // not the header timeout.
    for i in 0..N {
        let addr = addr.clone();
        checks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(HEALTH).await.unwrap();
            let (status, _) = read_answer(&mut s, "keep-alive request").await;
            assert_eq!(status, 200);
            let since = Instant::now();
            let after = closed_after(&mut s, since, idle + SLACK).await;
            assert_closed_in(&format!("idle keep-alive #{i}"), after, idle, idle + SLACK);
        });
    }
    // A second request's head on a kept-alive connection: the header
    // timeout from its first byte (the idle deadline would be much later).
    for i in 0..4 {
        let addr = addr.clone();
        checks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(HEALTH).await.unwrap();
            assert_eq!(read_answer(&mut s, "first request").await.0, 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.write_all(HEALTH).await.unwrap();
            assert_eq!(read_answer(&mut s, "second request").await.0, 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let since = Instant::now();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
            let after = closed_after(&mut s, since, idle).await;
            assert_closed_in(
                &format!("half a third head #{i}"),
                after,
                header,
                idle - Duration::from_millis(100),
            );
        });
    }
    // A connection in use is never idle: one request every 200 ms for
    // longer than the idle timeout, all answered on the same connection.
    {
        let addr = addr.clone();
        checks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            for _ in 0..12 {
                s.write_all(HEALTH).await.unwrap();
                assert_eq!(read_answer(&mut s, "a busy connection").await.0, 200);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let asked = keep_asking(
        &d,
        Instant::now() + idle + Duration::from_millis(500),
        Duration::from_secs(1),
    )
    .await;
    assert!(asked >= 3, "only {asked} normal requests");
    while let Some(r) = checks.join_next().await {
        r.unwrap();
    }
    let text = metrics(&Daemon::client(), &d).await;
    let header_closed = sample(
        &text,
        "rankd_connections_timed_out_total{reason=\"header_timeout\",transport=\"http\"}",
    );
    let idle_closed = sample(
        &text,
        "rankd_connections_timed_out_total{reason=\"idle_timeout\",transport=\"http\"}",
    );
    assert_eq!(header_closed, Some((N + 8 + 4) as f64), "{text}");
    assert!(idle_closed.unwrap_or(0.0) >= N as f64, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn half_frames_and_idle_socket_connections_are_closed_on_time() {
    // Close times and latencies are measured: no other test's daemon beside.
    let _alone = alone();
    let args = timeouts();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&demo_models(), &args);
    let header = Duration::from_millis(HEADER_MS);
    let idle = Duration::from_millis(IDLE_MS);
    const N: usize = 20;
    let health = request_frame(&json!({ "id": 1, "op": "health" }));

    let mut checks = tokio::task::JoinSet::new();
    // Half a frame: the length and part of the payload, then nothing.
    for i in 0..N {
        let path = d.uds.clone();
        let health = health.clone();
        checks.spawn(async move {
            let mut s = connect(&path).await;
            let since = Instant::now();
            send(&mut s, &health[..health.len() - 3], "half a frame").await;
            let after = closed_after(&mut s, since, header + SLACK).await;
            assert_closed_in(&format!("half a frame #{i}"), after, header, header + SLACK);
        });
    }
    // Two bytes of a length header.
    for i in 0..4 {
        let path = d.uds.clone();
        checks.spawn(async move {
            let mut s = connect(&path).await;
            let since = Instant::now();
            send(&mut s, &[0, 0], "half a length").await;
            let after = closed_after(&mut s, since, header + SLACK).await;
            assert_closed_in(
                &format!("half a length #{i}"),
                after,
                header,
                header + SLACK,
            );
        });
    }
    // Answered, then idle; or never a byte: the idle timeout.
    for i in 0..N {
        let path = d.uds.clone();
        let health = health.clone();
        checks.spawn(async move {
            let mut s = connect(&path).await;
            if i % 2 == 0 {
                send(&mut s, &health, "a health request").await;
                let v = read_frame(&mut s, "a health answer").await;
                assert_eq!(v["ok"], json!(true), "{v}");
            }
            let since = Instant::now();
            let after = closed_after(&mut s, since, idle + SLACK).await;
            assert_closed_in(&format!("idle socket #{i}"), after, idle, idle + SLACK);
        });
    }
    // A frame whose first half came after an answer: the header timeout
    // from that first byte.
    for i in 0..4 {
        let path = d.uds.clone();
        let health = health.clone();
        checks.spawn(async move {
            let mut s = connect(&path).await;
            send(&mut s, &health, "a health request").await;
            read_frame(&mut s, "a health answer").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let since = Instant::now();
            send(&mut s, &health[..6], "half a second frame").await;
            let after = closed_after(&mut s, since, idle).await;
            assert_closed_in(
                &format!("half a second frame #{i}"),
                after,
                header,
                idle - Duration::from_millis(100),
            );
        });
    }
    // Meanwhile a socket client asking every 50 ms is answered every time,
    // on one connection, for longer than the idle timeout.
    let mut good = connect(&d.uds).await;
    let until = Instant::now() + idle + Duration::from_millis(500);
    let mut asked = 0u64;
    while Instant::now() < until {
        asked += 1;
        let started = Instant::now();
        let req = request_frame(&json!({
            "id": asked, "op": "recommend", "model": "demo", "user_id": 42, "k": 10,
        }));
        send(&mut good, &req, "a normal socket request").await;
        let v = read_frame(&mut good, "a normal socket answer").await;
        assert_eq!(v["id"], json!(asked), "{v}");
        assert_eq!(v["ok"], json!(true), "{v}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a socket request took {:?} beside slow clients",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(asked >= 3, "only {asked} normal socket requests");
    while let Some(r) = checks.join_next().await {
        r.unwrap();
    }
    let text = metrics(&Daemon::client(), &d).await;
    assert_eq!(
        sample(
            &text,
            "rankd_connections_timed_out_total{reason=\"header_timeout\",transport=\"uds\"}"
        ),
        Some((N + 8) as f64),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "rankd_connections_timed_out_total{reason=\"idle_timeout\",transport=\"uds\"}"
        ),
        Some(N as f64),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_refuses_the_extra_and_keeps_the_served() {
    let d = Daemon::start_with(&demo_models(), &["--max-connections", "8"]);
    let addr = d.addr();
    // Eight HTTP connections, kept alive.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(HEALTH).await.unwrap();
        assert_eq!(read_answer(&mut s, "a held connection").await.0, 200);
        held.push(s);
    }
    // The ninth: 503 overloaded, Connection: close, then closed.
    let (resp, closed) = raw_exchange_closed(&addr, HEALTH, Duration::from_secs(5)).await;
    assert!(closed, "the refused connection stayed open");
    let a = raw_answer(&resp);
    assert_http_error(
        "the ninth connection",
        &a,
        503,
        "overloaded",
        &["connection limit 8 reached"],
    );
    assert_eq!(a.header(reqwest::header::CONNECTION), Some("close"));
    // The held ones are unaffected, and one of them reads the metrics.
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(HEALTH).await.unwrap();
        assert_eq!(read_answer(s, &format!("held #{i} after")).await.0, 200);
    }
    held[0]
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, text) = read_answer(&mut held[0], "metrics").await;
    assert_eq!(
        sample(&text, "rankd_connections_refused_total{transport=\"http\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "rankd_connections{transport=\"http\"}"),
        Some(8.0),
        "{text}"
    );
    // One leaves: its place is given to the next.
    drop(held.pop());
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = raw_exchange(
            &addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        match status_of(&resp) {
            Some(200) => break,
            Some(503) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!(
                "after one left: {other:?} {:?}",
                String::from_utf8_lossy(&resp)
            ),
        }
    }

    // The socket: eight held, the ninth gets an overloaded frame (id 0) and
    // is closed; the held ones keep being answered.
    let health = request_frame(&json!({ "id": 5, "op": "health" }));
    let mut socks = Vec::new();
    for _ in 0..8 {
        let mut s = connect(&d.uds).await;
        send(&mut s, &health, "a held socket").await;
        assert_eq!(read_frame(&mut s, "a held socket").await["ok"], json!(true));
        socks.push(s);
    }
    let mut ninth = connect(&d.uds).await;
    let v = read_frame(&mut ninth, "the ninth socket connection").await;
    assert_socket_error(&v, 0, &["overloaded"], "the ninth socket connection");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("connection limit 8 reached"), "{v}");
    let closed = closed_after(&mut ninth, Instant::now(), Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "the refused socket connection stayed open"
    );
    for s in &mut socks {
        send(s, &health, "a held socket after").await;
        assert_eq!(
            read_frame(s, "a held socket after").await["ok"],
            json!(true)
        );
    }
    let text = metrics(&Daemon::client(), &d).await;
    assert_eq!(
        sample(&text, "rankd_connections_refused_total{transport=\"uds\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "rankd_connections{transport=\"uds\"}"),
        Some(8.0),
        "{text}"
    );
}

/// A 10 MB body with a Content-Length, written whole before the answer is
/// read, by a blocking client (as Python's urllib does).
fn write_all_then_read(addr: &str, path: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_writes_the_whole_body_first_reads_the_413() {
    let d = Daemon::start();
    let addr = d.addr();
    let mut body = String::from("{\"user_id\": 1, \"exclude\": [1");
    while body.len() < 10 * 1024 * 1024 - 2 {
        body.push_str(",1");
    }
    body.push_str("]}");
    let n = body.len().to_string();
    for route in ["/v1/models/demo/recommend", "/v1/users/7"] {
        let (addr, route, body) = (addr.clone(), route.to_string(), body.clone());
        let resp = tokio::task::spawn_blocking(move || {
            write_all_then_read(&addr, &route, body.as_bytes())
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("writing 10 MB, then reading: {e}"));
        let a = raw_answer(&resp);
        assert_http_error(
            "10 MB written whole before reading",
            &a,
            413,
            "too_large",
            &["1048576", &n],
        );
        assert_eq!(a.header(reqwest::header::CONNECTION), Some("close"));
    }

    // The discarding is bounded: a client that never stops writing is cut
    // off (16 MiB or 2 s, whichever first), and still got its 413 first.
    let addr2 = addr.clone();
    let (written, took, answer) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr2).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
        )
        .unwrap();
        let started = Instant::now();
        let chunk = vec![b' '; 64 << 10];
        let mut written = 0usize;
        while started.elapsed() < Duration::from_secs(20) {
            match s.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        let took = started.elapsed();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        (written, took, answer)
    })
    .await
    .unwrap();
    assert!(
        took < Duration::from_secs(6),
        "an endless body was read for {took:?} ({written} bytes)"
    );
    assert!(
        written <= 48 << 20,
        "{written} bytes of an endless body were taken"
    );
    // The answer may be lost to the reset that ends the endless writer;
    // when it arrived, it is the 413.
    if !answer.is_empty() {
        assert_eq!(
            status_of(&answer),
            Some(413),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }

    // The daemon serves on.
    let a = post_json(
        &Daemon::client(),
        &d.url("/v1/models/demo/recommend"),
        &json!({ "user_id": 42, "k": 5 }),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let _: Value = a.json();
}
