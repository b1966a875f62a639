//! The Unix-socket transport end to end: framing, pipelining, equality with
//! HTTP answers, socket file lifecycle.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rankd_client::types::*;
use rankd_client::{Client, HttpClient, UdsClient};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::frame::{connect, read_frame, read_frame_within, request_frame, send};
use crate::common::*;

#[tokio::test]
async fn single_calls_of_every_op() {
    let d = Daemon::start();
    let mut s = connect(&d.uds).await;
    // (request, check of its answer), one call at a time.
    type Check = fn(&Value);
    let calls: [(Value, Check); 8] = [
        (json!({"id": 1, "op": "health"}), |r| {
            assert_eq!(r["result"]["ready"], true, "{r}")
        }),
        (
            json!({"id": 2, "op": "upsert_user", "user_id": 9, "history": [1, 2, 3]}),
            |r| assert_eq!(r["result"]["history"], json!([1, 2, 3]), "{r}"),
        ),
        (
            json!({"id": 3, "op": "recommend", "model": "demo", "user_id": 9, "k": 3}),
            |r| {
                assert_eq!(r["ok"], true, "{r}");
                assert_eq!(r["result"]["model"], "demo", "{r}");
                assert_eq!(r["result"]["items"].as_array().unwrap().len(), 3, "{r}");
            },
        ),
        (
            json!({"id": 4, "op": "score", "model": "demo-ranker", "user_id": 9, "items": [4, 5]}),
            |r| assert_eq!(r["result"]["scores"].as_array().unwrap().len(), 2, "{r}"),
        ),
        (json!({"id": 5, "op": "models"}), |r| {
            assert_eq!(r["result"]["models"].as_array().unwrap().len(), 2, "{r}")
        }),
        (json!({"id": 6, "op": "models", "model": "demo"}), |r| {
            assert_eq!(r["result"]["kind"], "two_tower", "{r}")
        }),
        (
            json!({"id": 7, "op": "recommend", "model": "nope", "user_id": 9}),
            |r| {
                check_socket_error(r, &[7], &["not_found"], &[]).unwrap_or_else(|e| panic!("{e}"));
            },
        ),
        (
            json!({"id": 8, "op": "recommend", "model": "demo", "user_id": 9, "k": 0}),
            |r| {
                check_socket_error(r, &[8], &["invalid"], &["got 0"])
                    .unwrap_or_else(|e| panic!("{e}"));
            },
        ),
    ];
    for (req, check) in &calls {
        let ctx = format!("{req}");
        send(&mut s, &request_frame(req), &ctx).await;
        let r = read_frame(&mut s, &ctx).await;
        assert_eq!(r["id"], req["id"], "{r}");
        check(&r);
    }
}

#[tokio::test]
async fn a_thousand_pipelined_calls_come_back_by_id() {
    let d = Daemon::start();
    let mut s = connect(&d.uds).await;
    let mut wire = Vec::new();
    let mut sent = HashMap::new();
    for id in 1..=1000u64 {
        // Slow recommends interleaved with instant health checks: the health
        // answers overtake the recommends queued before them.
        let req = if id % 2 == 1 {
            json!({"id": id, "op": "recommend", "model": "demo", "user_id": id, "k": 50})
        } else {
            json!({"id": id, "op": "health"})
        };
        wire.extend(request_frame(&req));
        sent.insert(id, req);
    }
    let (mut rd, mut wr) = s.split();
    let writer = async {
        wr.write_all(&wire).await.unwrap();
    };
    let reader = async {
        let mut order = Vec::new();
        for i in 0..1000 {
            let ctx = format!("pipelined answer {}", i + 1);
            order.push(read_frame_within(&mut rd, Duration::from_secs(20), &ctx).await);
        }
        order
    };
    let ((), answers) = tokio::join!(writer, reader);
    let mut seen = std::collections::HashSet::new();
    for a in &answers {
        let id = a["id"].as_u64().unwrap();
        assert!(seen.insert(id), "id {id} answered twice");
        assert_eq!(a["ok"], true, "{a}");
        match sent[&id]["op"].as_str().unwrap() {
            "recommend" => assert_eq!(a["result"]["items"].as_array().unwrap().len(), 50),
            _ => assert_eq!(a["result"]["ready"], true),
        }
    }
    assert_eq!(seen.len(), 1000);
    let ids: Vec<u64> = answers.iter().map(|a| a["id"].as_u64().unwrap()).collect();
    assert!(
        ids.windows(2).any(|w| w[0] > w[1]),
        "answers came back strictly in order"
    );
}

#[tokio::test]
async fn socket_answers_equal_http_answers() {
    let d = Daemon::start();
    let uds = UdsClient::connect(&d.uds).await.unwrap();
    let http = HttpClient::new(&d.http);
    for user in 0..20u64 {
        uds.upsert_user(
            user,
            UserRequest {
                history: Some(spread_history(user, 5)),
                features: None,
                sparse: None,
            },
        )
        .await
        .unwrap();
        let req = RecommendRequest {
            user_id: user,
            k: 15,
            exclude: vec![1, 2],
            timeout_ms: None,
            version: None,
            priority: None,
            filter: None,
            context: None,
        };
        let a = uds.recommend("demo", req.clone()).await.unwrap();
        let b = http.recommend("demo", req).await.unwrap();
        assert_eq!(a, b, "user {user}");
        let req = ScoreRequest {
            user_id: user,
            items: vec![10, 20, 30, 40],
            timeout_ms: None,
            version: None,
            priority: None,
            context: None,
        };
        let a = uds.score("demo-ranker", req.clone()).await.unwrap();
        let b = http.score("demo-ranker", req).await.unwrap();
        assert_eq!(a, b, "user {user}");
    }
    let too_many = RecommendRequest {
        user_id: 1,
        k: 5000,
        exclude: vec![],
        timeout_ms: None,
        version: None,
        priority: None,
        filter: None,
        context: None,
    };
    let e1 = uds.recommend("demo", too_many.clone()).await.unwrap_err();
    let e2 = http.recommend("demo", too_many).await.unwrap_err();
    assert_eq!(e1, e2);
    assert_eq!(e1.kind(), "invalid");
}

#[tokio::test]
async fn many_connections_and_one_shared_pipelined_client() {
    let d = Daemon::start();
    let shared = UdsClient::connect(&d.uds).await.unwrap();
    let mut tasks = Vec::new();
    for c in 0..24u64 {
        let path = d.uds.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let own = UdsClient::connect(&path).await.unwrap();
            for i in 0..20u64 {
                let user = c * 100 + i;
                let client = if i % 2 == 0 { &own } else { &shared };
                let r = client
                    .recommend(
                        "demo",
                        RecommendRequest {
                            user_id: user,
                            k: 7,
                            exclude: vec![],
                            timeout_ms: None,
                            version: None,
                            priority: None,
                            filter: None,
                            context: None,
                        },
                    )
                    .await
                    .unwrap();
                assert_eq!(r.items.len(), 7);
                assert!(r.items.windows(2).all(|w| w[0].score >= w[1].score));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn socket_file_mode_stale_replacement_live_refusal_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rankd.sock");
    // A stale socket file: bound by a listener that is gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let path_str = path.to_str().unwrap().to_string();
    let mut d = Daemon::start_with(&demo_models(), &["--uds", &path_str]);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    assert!(d.log().contains("stale"), "{}", d.log());
    // A second daemon must not take the live socket.
    let models = demo_models();
    let out = serve_output(&[
        "--http",
        "127.0.0.1:0",
        "--models",
        models.to_str().unwrap(),
        "--uds",
        &path_str,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(d.is_running());
    // Clean shutdown removes the file.
    assert!(
        d.signal_and_wait("TERM", Duration::from_secs(5)),
        "rankd did not stop on SIGTERM"
    );
    assert!(!path.exists(), "socket file left behind");
}
