//! Under pressure, end to end: streaming bulk scoring over HTTP and the
//! socket, popularity-backed cold-start and degraded answers, and the bulk
//! class beside interactive traffic.

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
        let mut answered = 0u64;
        let status = read_ndjson_response(stream, |v| {
            answered += 1;
            assert_eq!(v["line"], json!(answered), "{v}");
            assert_eq!(v["items"].as_array().map(Vec::len), Some(200), "{v}");
            true
        });
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        answered
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
        if ids(&body) == vec![500, 400, 300] {
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
    let got = ids(&body);
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
    assert_eq!(ids(&body), vec![500, 400, 300], "after a restart: {body}");
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

/// Scores `n` candidates for user 1 on `heavy` with `timeout_ms`.
async fn heavy_score(
    c: &reqwest::Client,
    d: &Daemon,
    n: u64,
    timeout_ms: u64,
) -> (u16, Value, Duration) {
    let t = Instant::now();
    let items: Vec<u64> = (1..=n).collect();
    let (s, body) = post(
        c,
        &d.url("/v1/models/heavy/score"),
        json!({"user_id": 1, "items": items, "timeout_ms": timeout_ms}),
    )
    .await;
    (s, body, t.elapsed())
}

/// How long a batch of 1,000 candidates runs on `heavy` here: the fastest
/// of three (which also gives the daemon its estimate for that size).
async fn heavy_batch_time(c: &reqwest::Client, d: &Daemon) -> Duration {
    post(c, &d.url("/v1/users/1"), json!({"history": [3, 4, 5]})).await;
    let mut fastest = Duration::MAX;
    for _ in 0..3 {
        let (s, body, took) = heavy_score(c, d, 1000, 60_000).await;
        assert_eq!(s, 200, "{body}");
        fastest = fastest.min(took);
    }
    assert!(
        fastest >= Duration::from_millis(200),
        "a batch of the heavy model takes {fastest:?}: too fast to stand for a slow model"
    );
    fastest
}

/// The sum of a metric's samples whose series starts with `prefix`.
fn sum_of(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_deadline_that_expires_during_a_running_batch_is_answered_at_the_deadline() {
    let _alone = alone();
    let root = heavy_ranker_repo(4096);
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let batch = heavy_batch_time(&c, &d).await;
    let long = {
        let (c, url) = (c.clone(), d.url("/v1/models/heavy/score"));
        let items: Vec<u64> = (1..=1000).collect();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = post(&c, &url, json!({"user_id": 1, "items": items})).await;
            (r, t.elapsed())
        })
    };
    // The long batch is running; a small request queued behind it has
    // 80 ms in all.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (s, body, took) = heavy_score(&c, &d, 5, 80).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["type"], "deadline_exceeded", "{body}");
    assert!(
        took >= Duration::from_millis(75) && took < Duration::from_millis(150),
        "answered after {took:?}, not at its 80 ms deadline (a batch takes {batch:?})"
    );
    assert!(!long.is_finished(), "the long batch was still running");
    let ((s, body), long_took) = long.await.unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(
        long_took > took + Duration::from_millis(100),
        "{long_took:?}"
    );
}

#[tokio::test]
async fn a_request_that_cannot_finish_in_time_is_not_executed() {
    let _alone = alone();
    let root = heavy_ranker_repo(4096);
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let batch = heavy_batch_time(&c, &d).await;
    let m = metrics(&c, &d).await;
    let batches = "rankd_batch_execution_seconds_count{model=\"heavy\"";
    let ran_before = sum_of(&m, batches);
    // A third of a batch's time is not enough for a batch of that size: it
    // is refused at once, not run and not answered late.
    let budget = (batch.as_millis() as u64 / 3).max(1);
    let (s, body, took) = heavy_score(&c, &d, 1000, budget).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["type"], "deadline_exceeded", "{body}");
    assert!(
        took < Duration::from_millis(budget),
        "refused after {took:?}, with {budget} ms to spare and batches of {batch:?}"
    );
    let m = metrics(&c, &d).await;
    assert_eq!(
        sample(
            &m,
            "rankd_requests_dropped_total{model=\"heavy\",priority=\"interactive\",reason=\"predicted\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sum_of(&m, batches), ran_before, "no batch ran for it");
    // Three times a batch's time is enough: served.
    let (s, body, _) = heavy_score(&c, &d, 1000, 3 * batch.as_millis() as u64).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test]
async fn a_bulk_call_whose_client_goes_away_stops_and_the_daemon_serves_on() {
    let d = Daemon::start();
    let c = Daemon::client();
    with_histories(&c, &d, 20).await;
    // A body without end, read a few answers in, then the connection cut.
    let lines = (0u64..).map(|i| format!("{{\"user_id\": {}, \"k\": 5}}\n", 1 + i % 20));
    let (stream, _, writer) = chunked_post(&d.addr(), "/v1/models/demo/bulk", lines);
    let cut = stream.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = 0;
        let status = read_ndjson_response(stream, |v| {
            seen += 1;
            assert_eq!(v["line"], json!(seen), "{v}");
            seen < 500
        });
        (status, seen)
    });
    let (status, seen) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(seen, 500);
    cut.shutdown(std::net::Shutdown::Both).unwrap();
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    // The daemon stops serving the call's lines and keeps serving others.
    let served = "rankd_requests_total{model=\"demo\",priority=\"bulk\",route=\"recommend\",status=\"200\",version=\"1\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = sample(&metrics(&c, &d).await, served).unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sample(&metrics(&c, &d).await, served).unwrap();
        if now == last {
            break;
        }
        assert!(Instant::now() < deadline, "bulk lines still served: {now}");
        last = now;
    }
    let (s, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": 3, "k": 5}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let m = metrics(&c, &d).await;
    assert_eq!(
        sample(&m, "rankd_queue_depth{model=\"demo\",priority=\"bulk\"}"),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_bulk_call_still_running_at_the_end_of_the_grace_period_ends_with_an_error_line() {
    let mut d = Daemon::start_with(&demo_models(), &["--grace-ms", "1500"]);
    let c = Daemon::client();
    with_histories(&c, &d, 20).await;
    let lines = (0u64..).map(|i| format!("{{\"user_id\": {}, \"k\": 5}}\n", 1 + i % 20));
    let (stream, _, writer) = chunked_post(&d.addr(), "/v1/models/demo/bulk", lines);
    let reader = std::thread::spawn(move || {
        let (mut seen, mut last) = (0u64, Value::Null);
        let status = read_ndjson_response(stream, |v| {
            if v.get("line").is_some() {
                seen += 1;
                assert_eq!(v["line"], json!(seen), "{v}");
            }
            last = v;
            true
        });
        (status, seen, last)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    d.signal("TERM");
    let exit = d.wait_exit(Duration::from_secs(10));
    let took = t.elapsed();
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}\n{}", d.log());
    assert!(took < Duration::from_millis(3000), "exit after {took:?}");
    let (status, seen, last) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(seen > 0, "lines were answered before the cut");
    assert!(
        last.get("line").is_none(),
        "the last line is the cut: {last}"
    );
    assert_eq!(last["error"]["type"], "not_ready", "{last}");
    let msg = last["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("grace") && msg.contains(&format!("after {seen} lines")),
        "{msg}"
    );
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
}

#[tokio::test]
async fn a_bulk_call_longer_than_the_header_and_idle_timeouts_runs_to_its_end() {
    let d = Daemon::start_with(
        &demo_models(),
        &["--header-timeout-ms", "300", "--idle-timeout-ms", "300"],
    );
    let c = Daemon::client();
    with_histories(&c, &d, 5).await;
    // Forty lines over two seconds: the body keeps arriving, and answers
    // keep leaving, long after the head was read.
    let lines = (0u64..40).map(|i| {
        std::thread::sleep(Duration::from_millis(50));
        format!("{{\"user_id\": {}, \"k\": 3}}\n", 1 + i % 5)
    });
    let (stream, _, writer) = chunked_post_every(&d.addr(), "/v1/models/demo/bulk", lines, 1);
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let status = read_ndjson_response(stream, |v| {
            got.push(v);
            true
        });
        (status, got)
    });
    let (status, got) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    writer.join().unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(got.len(), 40, "{:?}", got.last());
    assert!(got.iter().all(|v| ids(v).len() == 3), "{:?}", got.last());
}

#[tokio::test]
async fn a_request_that_the_queue_ahead_keeps_past_its_deadline_is_refused_at_once() {
    let _alone = alone();
    let root = heavy_ranker_repo(4096);
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let batch = heavy_batch_time(&c, &d).await;
    let long = |n: usize| {
        (0..n)
            .map(|_| {
                let (c, url) = (c.clone(), d.url("/v1/models/heavy/score"));
                let items: Vec<u64> = (1..=1000).collect();
                let body = json!({"user_id": 1, "items": items, "timeout_ms": 60_000});
                tokio::spawn(async move { post(&c, &url, body).await })
            })
            .collect::<Vec<_>>()
    };
    // Backlogs, so that the daemon learns how fast its queue drains.
    for _ in 0..2 {
        for t in long(4) {
            assert_eq!(t.await.unwrap().0, 200);
        }
    }
    // One long request runs and two wait: a request with 150 ms to spare
    // cannot be answered in time and hears so at once.
    let waiting = long(3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, body, took) = heavy_score(&c, &d, 5, 150).await;
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["type"], "deadline_exceeded", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("2 requests wait ahead"), "{msg}");
    assert!(
        took < Duration::from_millis(50),
        "refused after {took:?}, with batches of {batch:?}"
    );
    for t in waiting {
        assert_eq!(t.await.unwrap().0, 200);
    }
    // With nothing ahead, the same request is served.
    let (s, body, _) = heavy_score(&c, &d, 5, 150).await;
    assert_eq!(s, 200, "{body}");
    let m = metrics(&c, &d).await;
    assert_eq!(
        sample(
            &m,
            "rankd_requests_dropped_total{model=\"heavy\",priority=\"interactive\",reason=\"predicted\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn an_unreadable_popularity_file_is_logged_not_fatal() {
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("popularity.json"), b"{ not json").unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let d = Daemon::start_with(&demo_models(), &["--snapshot-dir", dir.as_str()]);
    let c = Daemon::client();
    let (s, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": 77, "k": 3}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["cold_start"], json!(true), "{body}");
    assert!(
        d.log().contains("popularity counts not restored"),
        "{}",
        d.log()
    );
}

/// Closed-loop scores of 5 candidates on `heavy` from `callers` callers
/// for `for_`: (answers, 504s).
async fn closed_loop(c: &reqwest::Client, d: &Daemon, callers: u64, for_: Duration) -> (u64, u64) {
    let until = Instant::now() + for_;
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let (c, url) = (c.clone(), d.url("/v1/models/heavy/score"));
            tokio::spawn(async move {
                let (mut answered, mut refused) = (0u64, 0u64);
                while Instant::now() < until {
                    let items: Vec<u64> = (1..=5).map(|j| 1 + (i * 5 + j) % 4000).collect();
                    let (s, body) = post(&c, &url, json!({"user_id": 1, "items": items})).await;
                    match s {
                        200 => answered += 1,
                        504 => refused += 1,
                        _ => panic!("{s}: {body}"),
                    }
                }
                (answered, refused)
            })
        })
        .collect();
    let mut total = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        total = (total.0 + a, total.1 + r);
    }
    total
}

/// An idle gap after a backlog is not service time. Load, then a slow
/// batch with requests queued behind it that expire without running (so
/// the executor last saw a backlog), then a pause, then the same load
/// again: no request of the second load is refused as unable to meet its
/// deadline. Counted as service time, the pause would make a queue of a
/// few requests look seconds long.
#[tokio::test]
async fn a_pause_after_a_backlog_does_not_make_the_daemon_shed_the_next_load() {
    let _alone = alone();
    let root = heavy_ranker_repo(4096);
    let d = Daemon::start_with(root.path(), &[]);
    let c = Daemon::client();
    let batch = heavy_batch_time(&c, &d).await;
    let dropped = "rankd_requests_dropped_total{model=\"heavy\",priority=\"interactive\",reason=\"predicted\"}";
    // Load with a queue, so the daemon measures how fast it drains one
    // (over two rate windows: the first may still carry the estimate made
    // on the 1,000-candidate batches above).
    let (answered, _) = closed_loop(&c, &d, 16, Duration::from_millis(2500)).await;
    assert!(answered > 100, "{answered} answers");
    // A quiet second, so that the rates are published as the next batch
    // ends and the pause below is alone in the following window.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // One slow batch; while it runs, requests queue behind it whose
    // deadline passes before it ends.
    let slow = {
        let (c, url) = (c.clone(), d.url("/v1/models/heavy/score"));
        let items: Vec<u64> = (1..=1000).collect();
        tokio::spawn(async move { post(&c, &url, json!({"user_id": 1, "items": items})).await })
    };
    tokio::time::sleep(batch / 4).await;
    let budget = (batch.as_millis() as u64 / 4).max(1);
    let expiring: Vec<_> = (0..4)
        .map(|_| {
            let (c, url) = (c.clone(), d.url("/v1/models/heavy/score"));
            tokio::spawn(async move {
                post(
                    &c,
                    &url,
                    json!({"user_id": 1, "items": [1, 2], "timeout_ms": budget}),
                )
                .await
            })
        })
        .collect();
    let (s, body) = slow.await.unwrap();
    assert_eq!(s, 200, "{body}");
    for t in expiring {
        let (s, body) = t.await.unwrap();
        assert_eq!(s, 504, "{body}");
    }
    let before = sample(&metrics(&c, &d).await, dropped).unwrap_or(0.0);
    // The pause, then the same load again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (answered, refused) = closed_loop(&c, &d, 16, Duration::from_secs(2)).await;
    let after = sample(&metrics(&c, &d).await, dropped).unwrap_or(0.0);
    assert!(answered > 100, "{answered} answers");
    assert_eq!(
        (refused, after - before),
        (0, 0.0),
        "load after a pause was refused ({answered} answered)"
    );
}
