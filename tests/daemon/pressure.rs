//! Under pressure, end to end: streaming bulk scoring over HTTP and the
//! socket, popularity-backed cold-start and degraded answers, and the bulk
//! class beside interactive traffic.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::frame::{connect, read_frame_within, request_frame, send};
use crate::common::*;

/// Users 1..=n with 20-item histories.
async fn with_histories(c: &reqwest::Client, d: &Daemon, n: u64) -> Vec<(u64, Vec<u64>)> {
    let users: Vec<(u64, Vec<u64>)> = (1..=n).map(|u| (u, spread_history(u, 20))).collect();
    seed_histories(c, d, &users).await;
    users
}

fn parse_ndjson(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

#[tokio::test]
async fn bulk_over_http_answers_every_line_in_order_with_an_error_for_each_bad_line() {
    let d = Daemon::start();
    let c = Daemon::client();
    let users = with_histories(&c, &d, 40).await;
    let reference = recommend_each(
        &c,
        &d,
        "demo",
        &users.iter().map(|u| u.0).collect::<Vec<_>>(),
        7,
    )
    .await;
    let mut body = String::new();
    for (u, _) in &users {
        body.push_str(&format!("{{\"user_id\": {u}, \"k\": 7}}\n"));
    }
    // Bad lines, each answered alone: not JSON, an unknown field, k = 0,
    // both items and k; a blank line is skipped but counted.
    body.push_str("not json\n{\"user_id\": 1, \"kk\": 3}\n\n{\"user_id\": 1, \"k\": 0}\n");
    body.push_str("{\"user_id\": 1, \"k\": 2, \"items\": [1]}\n");
    body.push_str("{\"user_id\": 2, \"k\": 3, \"exclude\": [");
    let excluded = ids(&reference[1])[0];
    body.push_str(&format!("{excluded}]}}"));
    let r = c
        .post(d.url("/v1/models/demo/bulk"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let lines = parse_ndjson(&r.text().await.unwrap());
    assert_eq!(lines.len(), 40 + 5, "{lines:?}");
    for (i, (u, _)) in users.iter().enumerate() {
        let l = &lines[i];
        assert_eq!(l["line"], json!(i + 1), "{l}");
        assert_eq!(l["user_id"], json!(u), "{l}");
        assert_eq!(
            ids(l),
            ids(&reference[i]),
            "user {u}: bulk and interactive differ"
        );
    }
    let errors: Vec<(u64, &str)> = lines[40..44]
        .iter()
        .map(|l| {
            (
                l["line"].as_u64().unwrap(),
                l["error"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            (41, "invalid"),
            (42, "invalid"),
            (44, "invalid"),
            (45, "invalid")
        ]
    );
    assert!(lines[41]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("kk"));
    assert!(lines[42]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("k must be >= 1"));
    let last = &lines[44];
    assert_eq!(last["line"], json!(46), "{last}");
    assert!(
        !ids(last).contains(&excluded),
        "exclude is honoured: {last}"
    );
    assert_eq!(ids(last).len(), 3);
    // Each line ran as a bulk request.
    let m = metrics(&c, &d).await;
    let bulk = sample(
        &m,
        "rankd_requests_total{model=\"demo\",priority=\"bulk\",route=\"recommend\",status=\"200\",version=\"1\"}",
    );
    assert_eq!(bulk, Some(41.0), "{m}");
    // An unknown model is refused before anything streams.
    let r = c
        .post(d.url("/v1/models/nope/bulk"))
        .body("{\"user_id\": 1}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn a_bulk_line_longer_than_max_body_bytes_is_an_error_for_that_line_only() {
    let d = Daemon::start_with(&demo_models(), &["--max-body-bytes", "4096"]);
    let c = Daemon::client();
    with_histories(&c, &d, 2).await;
    let long = format!(
        "{{\"user_id\": 1, \"exclude\": [{}1]}}",
        "123456, ".repeat(1000)
    );
    // The whole body is far over max_body_bytes; only the long line is.
    let mut body = String::new();
    for _ in 0..200 {
        body.push_str("{\"user_id\": 2, \"k\": 1}\n");
    }
    body.push_str(&long);
    body.push('\n');
    body.push_str("{\"user_id\": 1, \"k\": 1}\n");
    assert!(body.len() > 4096 * 2);
    let r = c
        .post(d.url("/v1/models/demo/bulk"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let lines = parse_ndjson(&r.text().await.unwrap());
    assert_eq!(lines.len(), 202);
    assert_eq!(lines[200]["error"]["type"], "invalid", "{}", lines[200]);
    let msg = lines[200]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("4096") && msg.contains(&long.len().to_string()),
        "{msg}"
    );
    assert_eq!(lines[201]["line"], json!(202));
    assert_eq!(ids(&lines[201]).len(), 1);
}

/// Writes `body` to a raw HTTP/1.1 chunked POST on `addr` from a thread and
/// returns the stream (for reading) and a counter of bytes written so far.
fn chunked_post(
    addr: &str,
    path: &str,
    lines: impl Iterator<Item = String> + Send + 'static,
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
            if chunk.len() >= 16 * 1024 {
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

#[tokio::test]
async fn a_slow_bulk_reader_slows_the_reading_of_its_input() {
    let d = Daemon::start();
    let c = Daemon::client();
    with_histories(&c, &d, 50).await;
    // 10,000 short lines whose answers (200 items, some 7 kB a line) come to
    // 70 MB: far more than the socket buffers between daemon and client.
    let n = 10_000u64;
    let lines = (0..n).map(|i| format!("{{\"user_id\": {}, \"k\": 200}}\n", 1 + i % 50));
    let (stream, _written, writer) = chunked_post(&d.addr(), "/v1/models/demo/bulk", lines);
    let served = "rankd_requests_total{model=\"demo\",priority=\"bulk\",route=\"recommend\",status=\"200\",version=\"1\"}";
    // Nobody reads the answers: the daemon stops serving lines once the
    // buffers between it and the client are full.
    let mut last = -1.0;
    let give_up = Instant::now() + Duration::from_secs(60);
    let stalled_at = loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = sample(&metrics(&c, &d).await, served).unwrap_or(0.0);
        if now == last && now > 0.0 {
            break now;
        }
        assert!(Instant::now() < give_up, "lines kept being served: {now}");
        last = now;
    };
    assert!(
        stalled_at < n as f64 / 2.0,
        "{stalled_at} of {n} lines served while no answer was read"
    );
    // Reading the answers lets the rest through, every line in order.
    let reader = std::thread::spawn(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut r = std::io::BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut l = String::new();
            std::io::BufRead::read_line(&mut r, &mut l).unwrap();
            if l == "\r\n" {
                break;
            }
            head.push_str(&l);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut expected = 1u64;
        let mut pending = Vec::new();
        loop {
            let mut size = String::new();
            std::io::BufRead::read_line(&mut r, &mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut data = vec![0; size + 2];
            r.read_exact(&mut data).unwrap();
            if size == 0 {
                break;
            }
            pending.extend_from_slice(&data[..size]);
            while let Some(at) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                assert_eq!(v["line"], json!(expected), "{v}");
                assert_eq!(v["items"].as_array().map(Vec::len), Some(200), "{v}");
                expected += 1;
            }
        }
        expected - 1
    });
    let answered = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    writer.join().unwrap();
    assert_eq!(answered, n);
}

#[tokio::test]
async fn bulk_over_the_socket_streams_one_frame_per_entry_then_done() {
    let d = Daemon::start();
    let c = Daemon::client();
    let users = with_histories(&c, &d, 5).await;
    let reference = recommend_each(
        &c,
        &d,
        "demo",
        &users.iter().map(|u| u.0).collect::<Vec<_>>(),
        4,
    )
    .await;
    let mut s = connect(&d.uds).await;
    let mut requests: Vec<Value> = users
        .iter()
        .map(|(u, _)| json!({"user_id": u, "k": 4}))
        .collect();
    requests.push(json!({"user_id": 1, "bogus": true}));
    requests.push(json!({"user_id": 3, "items": [5, 6, 7]}));
    send(
        &mut s,
        &request_frame(&json!({"id": 77, "op": "bulk", "model": "demo", "requests": requests})),
        "bulk",
    )
    .await;
    let mut frames = Vec::new();
    loop {
        let f = read_frame_within(&mut s, Duration::from_secs(10), "bulk frames").await;
        let done = f.get("line").is_none();
        frames.push(f);
        if done {
            break;
        }
    }
    assert_eq!(frames.len(), 8, "{frames:?}");
    for (i, f) in frames[..5].iter().enumerate() {
        assert_eq!(f["id"], json!(77), "{f}");
        assert_eq!(f["line"], json!(i + 1), "{f}");
        assert_eq!(f["ok"], json!(true), "{f}");
        assert_eq!(ids(&f["result"]), ids(&reference[i]), "{f}");
    }
    assert_eq!(frames[5]["ok"], json!(false), "{}", frames[5]);
    assert_eq!(frames[5]["error"]["type"], "invalid");
    assert!(frames[5]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bogus"));
    // The two-tower demo scores candidates too.
    assert_eq!(frames[6]["line"], json!(7));
    assert_eq!(
        frames[6]["result"]["scores"].as_array().map(Vec::len),
        Some(3),
        "{}",
        frames[6]
    );
    assert_eq!(
        frames[7],
        json!({"id": 77, "ok": true, "result": {"done": 7}})
    );
}

/// The ids a cold-start or degraded answer lists.
fn popular_items(body: &Value) -> Vec<u64> {
    ids(body)
}

#[tokio::test]
async fn cold_start_answers_follow_popularity_and_respect_exclude() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = [
        "--snapshot-dir",
        dir.as_str(),
        "--snapshot-interval-ms",
        "100",
    ];
    let mut d = Daemon::start_with(&demo_models(), &args);
    let c = Daemon::client();
    // Items 500 (6 users), 400 (4), 300 (2) enter histories over the API.
    for (item, users) in [(500u64, 6u64), (400, 4), (300, 2)] {
        for u in 0..users {
            let user = item * 100 + u;
            let (s, b) = post(
                &c,
                &d.url(&format!("/v1/users/{user}")),
                json!({"history": [item]}),
            )
            .await;
            assert_eq!(s, 200, "{b}");
        }
    }
    // The list is rebuilt off the request path within moments.
    let deadline = Instant::now() + Duration::from_secs(5);
    let answer = loop {
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/recommend"),
            json!({"user_id": 1_000_000, "k": 3}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        if popular_items(&body) == vec![500, 400, 300] {
            break body;
        }
        assert!(Instant::now() < deadline, "popularity not followed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answer["cold_start"], json!(true));
    assert_eq!(answer["degraded"], json!(false));
    let scores: Vec<f64> = answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["score"].as_f64().unwrap())
        .collect();
    assert!(scores[0] > scores[1] && scores[1] > scores[2], "{answer}");
    // exclude is honoured; the catalogue fills in after the popular items.
    let (_, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": 1_000_001, "k": 5, "exclude": [500]}),
    )
    .await;
    let got = popular_items(&body);
    assert_eq!(&got[..2], &[400, 300], "{body}");
    assert_eq!(got.len(), 5);
    assert!(!got.contains(&500));
    let m = metrics(&c, &d).await;
    assert!(
        sample(&m, "rankd_cold_start_total{model=\"demo\"}").unwrap() >= 2.0,
        "{m}"
    );
    // A user with a history is answered by the model, not the list.
    let (_, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": 50_000, "k": 3}),
    )
    .await;
    assert_eq!(body["cold_start"], json!(false), "{body}");
    assert!(
        !ids(&body).contains(&500),
        "the user's history is excluded: {body}"
    );
    // Popularity survives a restart.
    assert!(
        d.signal_and_wait("TERM", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    let d = Daemon::start_with(&demo_models(), &args);
    let (_, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": 1_000_002, "k": 3}),
    )
    .await;
    assert_eq!(
        popular_items(&body),
        vec![500, 400, 300],
        "after a restart: {body}"
    );
}

#[tokio::test]
async fn a_full_queue_degrades_to_popular_items_without_the_users_history() {
    // `slow` waits 400 ms for company and holds one request.
    let root = slow_repo(400_000, 1);
    let d = Daemon::start_with(root.path(), &["--degrade", "popular"]);
    let c = Daemon::client();
    for u in 0..5u64 {
        post(
            &c,
            &d.url(&format!("/v1/users/{}", 900 + u)),
            json!({"history": [700, 800]}),
        )
        .await;
    }
    post(&c, &d.url("/v1/users/42"), json!({"history": [800]})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = d.url("/v1/models/slow/recommend");
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, json!({"user_id": 900, "k": 3})).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let (s, body) = post(&c, &url, json!({"user_id": 42, "k": 3, "exclude": [700]})).await;
    assert_eq!(s, 200, "{body}");
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "a degraded answer is prompt"
    );
    assert_eq!(body["degraded"], json!(true), "{body}");
    let got = ids(&body);
    assert_eq!(got.len(), 3);
    assert!(
        !got.contains(&700) && !got.contains(&800),
        "exclude and history left out: {body}"
    );
    // The request that held the queue is served by the model.
    let (s, first_body) = first.await.unwrap();
    assert_eq!(s, 200, "{first_body}");
    assert_eq!(first_body["degraded"], json!(false));
    let m = metrics(&c, &d).await;
    assert_eq!(
        sample(
            &m,
            "rankd_degraded_total{model=\"slow\",reason=\"queue_full\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // Without --degrade the same is a 429 with Retry-After.
    let d2 = Daemon::start_with(root.path(), &[]);
    for u in [900u64, 42] {
        post(
            &c,
            &d2.url(&format!("/v1/users/{u}")),
            json!({"history": [700]}),
        )
        .await;
    }
    let url = d2.url("/v1/models/slow/recommend");
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, json!({"user_id": 900})).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = post_json(&c, &url, &json!({"user_id": 42})).await;
    assert_eq!(a.status, 429);
    assert!(a.header(reqwest::header::RETRY_AFTER).is_some());
    first.await.unwrap();
}

#[tokio::test]
async fn bulk_and_interactive_requests_have_separate_queues_and_labels() {
    // One slot for interactive requests: a bulk request still gets in.
    let root = slow_repo(300_000, 1);
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    for u in [1u64, 2, 3] {
        post(
            &c,
            &d.url(&format!("/v1/users/{u}")),
            json!({"history": [10, 20]}),
        )
        .await;
    }
    let url = d.url("/v1/models/slow/recommend");
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, json!({"user_id": 1})).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = post_json(&c, &url, &json!({"user_id": 2})).await;
    assert_eq!(a.status, 429, "the interactive queue is full");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_queue_size is 1"));
    let (s, body) = post(&c, &url, json!({"user_id": 3, "priority": "bulk"})).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(&c, &url, json!({"user_id": 3, "priority": "urgent"})).await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(first.await.unwrap().0, 200);
    let m = metrics(&c, &d).await;
    for series in [
        "rankd_requests_total{model=\"slow\",priority=\"bulk\",route=\"recommend\",status=\"200\",version=\"1\"}",
        "rankd_requests_total{model=\"slow\",priority=\"interactive\",route=\"recommend\",status=\"429\",version=\"\"}",
        "rankd_queue_duration_seconds_count{model=\"slow\",priority=\"bulk\"}",
    ] {
        assert_eq!(sample(&m, series), Some(1.0), "{series} in\n{m}");
    }
}
