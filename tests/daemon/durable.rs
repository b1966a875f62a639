//! Nothing lost, no one holds it: the draining shutdown on both transports,
//! the write-ahead log across SIGKILL (with a torn last record), and the
//! `--max-users` ceiling.

use std::path::Path;
use std::time::{Duration, Instant};

use rankd_client::types::*;
use rankd_client::{Client, UdsClient};
use serde_json::{json, Value};

use crate::common::*;

fn snapshots(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
                .count()
        })
        .unwrap_or(0)
}

fn wal_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("wal-"))
        .collect();
    v.sort();
    v
}

async fn history_of(c: &reqwest::Client, d: &Daemon, user: u64) -> Value {
    let (s, body) = get(c, &d.url(&format!("/v1/users/{user}"))).await;
    assert_eq!(s, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["history"].clone()
}

/// SIGTERM with requests in flight on HTTP and the socket: every one is
/// answered, rankd exits 0, the socket file is gone, and the final snapshot
/// holds the last writes (checked with the log removed).
#[tokio::test(flavor = "multi_thread")]
async fn drain_answers_in_flight_requests_on_both_transports() {
    let repo = slow_repo(300_000, 1024);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = ["--snapshot-dir", &dir, "--snapshot-interval-ms", "600000"];
    let mut d = Daemon::start_with(repo.path(), &args);
    let c = Daemon::client();
    let (s, _) = post(&c, &d.url("/v1/users/41"), json!({ "history": [3, 4, 5] })).await;
    assert_eq!(s, 200);
    let uds = UdsClient::connect(&d.uds).await.unwrap();
    let mut http_calls = Vec::new();
    let mut uds_calls = Vec::new();
    for i in 0..50u64 {
        let (c, url) = (c.clone(), d.url("/v1/models/slow/recommend"));
        http_calls.push(tokio::spawn(async move {
            post(
                &c,
                &url,
                json!({ "user_id": i, "k": 5, "timeout_ms": 5000 }),
            )
            .await
        }));
        let uds = uds.clone();
        uds_calls.push(tokio::spawn(async move {
            uds.recommend(
                "slow",
                RecommendRequest {
                    user_id: i,
                    k: 5,
                    exclude: vec![],
                    timeout_ms: Some(5000),
                    version: None,
                    priority: None,
                    filter: None,
                    context: None,
                },
            )
            .await
        }));
    }
    // The requests wait 300 ms for company in the queue: stop meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.signal("TERM");
    for call in http_calls {
        let (s, body) = call.await.unwrap();
        assert_eq!(s, 200, "an HTTP request in flight was not answered: {body}");
    }
    for call in uds_calls {
        let r = call.await.unwrap();
        assert!(
            r.is_ok(),
            "a socket request in flight was not answered: {r:?}"
        );
    }
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", d.log());
    assert!(!d.uds.exists(), "socket file left behind");
    assert_eq!(snapshots(state.path()), 1, "no final snapshot");
    // Without the log, the snapshot alone brings the write back.
    for p in wal_segments(state.path()) {
        std::fs::remove_file(p).unwrap();
    }
    let again = Daemon::start_with(repo.path(), &args);
    assert_eq!(history_of(&c, &again, 41).await, json!([3, 4, 5]));
}

/// During `--shutdown-delay-ms` rankd still answers, `/readyz` says 503
/// draining; a second signal exits at once with a non-zero status.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_drains_during_the_delay_and_a_second_signal_exits_at_once() {
    let mut d = Daemon::start_with(&demo_models(), &["--shutdown-delay-ms", "20000"]);
    let c = Daemon::client();
    let (s, _) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 200);
    d.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(s, 503, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["reason"], "draining", "{r}");
    // Still serving meanwhile.
    let (s, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({ "user_id": 1 }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(d.is_running());
    let sent = Instant::now();
    d.signal("TERM");
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(3)));
    let status = status.expect("a second signal did not stop rankd");
    assert!(!status.success(), "{status:?}");
    assert!(sent.elapsed() < Duration::from_secs(3));
}

async fn write_users(
    c: &reqwest::Client,
    d: &Daemon,
    uds: &UdsClient,
    users: std::ops::Range<u64>,
) {
    for u in users {
        let history = Some(spread_history(u, 3));
        if u % 2 == 0 {
            let (s, body) = post(
                c,
                &d.url(&format!("/v1/users/{u}")),
                json!({ "history": history }),
            )
            .await;
            assert_eq!(s, 200, "{body}");
        } else {
            let r = uds
                .upsert_user(
                    u,
                    UserRequest {
                        history,
                        features: None,
                        sparse: None,
                    },
                )
                .await;
            assert!(r.is_ok(), "{r:?}");
        }
    }
}

/// Writes acknowledged over HTTP and the socket survive SIGKILL with no
/// snapshot since; a torn last record is skipped with a log line and
/// nothing before it is lost.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_sigkill_and_a_torn_record_is_skipped() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = ["--snapshot-dir", &dir, "--snapshot-interval-ms", "600000"];
    let c = Daemon::client();
    let mut first = Daemon::start_with(&demo_models(), &args);
    let uds = UdsClient::connect(&first.uds).await.unwrap();
    write_users(&c, &first, &uds, 0..200).await;
    let (s, deleted) = post(&c, &first.url("/v1/items/77"), json!({ "deleted": true })).await;
    assert_eq!(s, 200, "{deleted}");
    assert!(tokio::task::block_in_place(
        || first.signal_and_wait("KILL", Duration::from_secs(5))
    ));
    assert_eq!(snapshots(state.path()), 0, "a snapshot was written");
    drop(first);

    let mut second = Daemon::start_with(&demo_models(), &args);
    for u in 0..200 {
        assert_eq!(
            history_of(&c, &second, u).await,
            json!(spread_history(u, 3)),
            "user {u}"
        );
    }
    // The delete was replayed: the next one is a version further on.
    let (s, again) = post(&c, &second.url("/v1/items/77"), json!({ "deleted": true })).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(
        again["version"].as_u64().unwrap(),
        deleted["version"].as_u64().unwrap() + 1,
        "{deleted} then {again}"
    );
    let uds = UdsClient::connect(&second.uds).await.unwrap();
    write_users(&c, &second, &uds, 1000..1010).await;
    assert!(tokio::task::block_in_place(
        || second.signal_and_wait("KILL", Duration::from_secs(5))
    ));
    drop(second);

    // Cut the newest segment's last record in the middle.
    let last = wal_segments(state.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    assert!(len > 10, "the last segment is empty");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let third = Daemon::start_with(&demo_models(), &args);
    assert!(
        third.log().contains("torn write-ahead log record"),
        "{}",
        third.log()
    );
    for u in (0..200).chain(1000..1009) {
        assert_eq!(
            history_of(&c, &third, u).await,
            json!(spread_history(u, 3)),
            "user {u}"
        );
    }
    assert_eq!(
        history_of(&c, &third, 1009).await,
        json!([]),
        "the torn record was applied"
    );
}

/// `--max-users 1000`: after 5,000 users, the 1,000 most recently updated
/// are held, the rest counted as evicted, and the bytes gauge fits them.
#[tokio::test(flavor = "multi_thread")]
async fn max_users_evicts_the_least_recently_updated() {
    let d = Daemon::start_with(&demo_models(), &["--max-users", "1000"]);
    let c = Daemon::client();
    let uds = UdsClient::connect(&d.uds).await.unwrap();
    for chunk in (0..5000u64).collect::<Vec<_>>().chunks(100) {
        let calls = chunk.iter().map(|&u| {
            uds.upsert_user(
                u,
                UserRequest {
                    history: Some(spread_history(u, 4)),
                    features: None,
                    sparse: None,
                },
            )
        });
        for r in futures::future::join_all(calls).await {
            assert!(r.is_ok(), "{r:?}");
        }
    }
    let m = metrics(&c, &d).await;
    assert_eq!(sample(&m, "rankd_users"), Some(1000.0), "{m}");
    assert_eq!(sample(&m, "rankd_users_evicted_total"), Some(4000.0), "{m}");
    let bytes = sample(&m, "rankd_users_bytes").unwrap();
    assert!(
        (1000.0 * 32.0..=1000.0 * 4096.0).contains(&bytes),
        "{bytes}"
    );
    for u in [4000, 4500, 4999] {
        assert_eq!(
            history_of(&c, &d, u).await,
            json!(spread_history(u, 4)),
            "user {u}"
        );
    }
    for u in [0, 2000, 3999] {
        assert_eq!(history_of(&c, &d, u).await, json!([]), "user {u} was kept");
    }
}

/// An idle daemon keeps its write-ahead log at a segment or two: the
/// captures that find nothing new remove the empty segments they rotated
/// past, and a write after the idle spell still survives SIGKILL.
#[tokio::test]
async fn an_idle_daemon_does_not_pile_up_log_segments() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = ["--snapshot-dir", &dir, "--snapshot-interval-ms", "20"];
    let mut d = Daemon::start_with(&demo_models(), &args);
    let c = Daemon::client();
    let (s, _) = post(&c, &d.url("/v1/users/5"), json!({ "history": [3, 4] })).await;
    assert_eq!(s, 200);
    // About 50 intervals with nothing to write.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let segments = wal_segments(state.path());
    assert!(
        segments.len() <= 3,
        "{} segments: {segments:?}",
        segments.len()
    );
    let (s, _) = post(&c, &d.url("/v1/users/5"), json!({ "history": [3, 4, 6] })).await;
    assert_eq!(s, 200);
    assert!(d.signal_and_wait("KILL", Duration::from_secs(5)));
    let d = Daemon::start_with(&demo_models(), &args);
    assert_eq!(history_of(&c, &d, 5).await, json!([3, 4, 6]));
}
