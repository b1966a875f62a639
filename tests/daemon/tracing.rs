//! OpenTelemetry export against a receiver standing in for a collector: a
//! request's span (joined to the caller's trace by `traceparent`) with its
//! queue and batch children, on HTTP and the socket, in protobuf and JSON,
//! flushed at exit; and the span of an applied update batch.
#![cfg(feature = "otlp")]

use std::time::Duration;

use serde_json::json;

use crate::common::frame::{connect, read_frame, request_frame, send};
use crate::common::otlp::{Receiver, Span};
use crate::common::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(20);

/// The request's `queue` and `batch` children.
fn children<'a>(spans: &'a [Span], parent: &Span) -> Option<(&'a Span, &'a Span)> {
    let child = |name: &str| {
        spans.iter().find(|s| {
            s.name == name && s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id
        })
    };
    Some((child("queue")?, child("batch")?))
}

fn check_batch(batch: &Span, queue: &Span, request: &Span) {
    assert_eq!(batch.attr("device"), Some("cpu"), "{batch:?}");
    for key in ["batch.id", "batch.size", "batch.rows"] {
        let n: u64 = batch
            .attr(key)
            .unwrap_or_else(|| panic!("{key} on {batch:?}"))
            .parse()
            .unwrap();
        assert!(n >= 1, "{key} = {n}");
    }
    let exec: f64 = batch
        .attr("batch.execution_seconds")
        .unwrap()
        .parse()
        .unwrap();
    assert!(exec > 0.0 && exec < 5.0, "execution {exec} s");
    assert_eq!(queue.attr("class"), Some("interactive"));
    // The children lie inside the request (1 ms of slack for the clocks).
    let slack = 1_000_000;
    assert!(
        queue.start_ns + slack >= request.start_ns,
        "{queue:?} {request:?}"
    );
    assert!(
        queue.end_ns <= batch.start_ns + slack,
        "{queue:?} {batch:?}"
    );
    assert!(
        batch.end_ns <= request.end_ns + slack,
        "{batch:?} {request:?}"
    );
    assert!(batch.end_ns >= batch.start_ns);
}

#[tokio::test]
async fn an_http_request_span_joins_the_callers_trace_with_its_queue_and_batch_spans() {
    let rx = Receiver::start().await;
    let d = Daemon::start_with(&demo_models(), &["--otlp-endpoint", &rx.url]);
    let c = Daemon::client();
    let (s, body) = post(
        &c,
        &d.url("/v1/users/42"),
        json!({"history": spread_history(42, 20)}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let resp = c
        .post(d.url("/v1/models/demo/recommend"))
        .header("traceparent", format!("00-{TRACE}-{CALLER}-01"))
        .json(&json!({"user_id": 42, "k": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (s, _) = post(
        &c,
        &d.url("/v1/models/nope/recommend"),
        json!({"user_id": 42}),
    )
    .await;
    assert_eq!(s, 404);

    let request = rx
        .wait_for(WAIT, |spans| {
            spans
                .iter()
                .find(|s| s.trace_id == TRACE && s.name == "POST /v1/models/{model}/recommend")
                .cloned()
        })
        .await;
    assert_eq!(
        request.parent_span_id, CALLER,
        "a child of the caller's span"
    );
    assert_eq!(request.attr("route"), Some("/v1/models/{model}/recommend"));
    assert_eq!(request.attr("model"), Some("demo"));
    assert_eq!(request.attr("version"), Some("1"));
    assert_eq!(request.attr("status"), Some("200"));
    let (queue, batch) = rx
        .wait_for(WAIT, |spans| {
            children(spans, &request).map(|(q, b)| (q.clone(), b.clone()))
        })
        .await;
    check_batch(&batch, &queue, &request);

    // Without a traceparent a request starts its own trace; an error
    // answer carries its status and type.
    let missing = rx
        .wait_for(WAIT, |spans| {
            spans
                .iter()
                .find(|s| s.attr("model") == Some("nope"))
                .cloned()
        })
        .await;
    assert_eq!(missing.parent_span_id, "", "a root span");
    assert_ne!(missing.trace_id, TRACE);
    assert_eq!(missing.attr("status"), Some("404"));
    assert_eq!(missing.attr("error.type"), Some("not_found"));
    // The user write is a request too, with no batch.
    let write = rx
        .wait_for(WAIT, |spans| {
            spans
                .iter()
                .find(|s| s.name == "POST /v1/users/{user_id}")
                .cloned()
        })
        .await;
    assert_eq!(write.attr("status"), Some("200"));
    assert!(
        rx.paths().iter().all(|p| p == "/v1/traces"),
        "{:?}",
        rx.paths()
    );
    assert!(
        rx.content_types()
            .iter()
            .all(|t| t == "application/x-protobuf"),
        "{:?}",
        rx.content_types()
    );
}

#[tokio::test]
async fn socket_request_spans_go_out_as_json_and_are_flushed_at_exit() {
    let rx = Receiver::start().await;
    let mut d = Daemon::start_with(
        &demo_models(),
        &[
            "--otlp-endpoint",
            &format!("{}/v1/traces", rx.url),
            "--otlp-protocol",
            "http/json",
        ],
    );
    let mut s = connect(&d.uds).await;
    send(
        &mut s,
        &request_frame(&json!({"id": 1, "op": "upsert_user", "user_id": 7, "history": [3, 4, 5]})),
        "upsert",
    )
    .await;
    assert_eq!(read_frame(&mut s, "upsert").await["ok"], true);
    send(
        &mut s,
        &request_frame(&json!({"id": 2, "op": "recommend", "model": "demo", "user_id": 7, "k": 3})),
        "recommend",
    )
    .await;
    let answer = read_frame(&mut s, "recommend").await;
    assert_eq!(answer["ok"], true, "{answer}");
    drop(s);
    // Well inside the exporter's 5 s schedule: only the flush at exit can
    // have sent them.
    assert!(
        d.signal_and_wait("TERM", Duration::from_secs(10)),
        "rankd stopped on SIGTERM"
    );
    let spans = rx.spans();
    let request = spans
        .iter()
        .find(|s| s.name == "recommend")
        .unwrap_or_else(|| panic!("no recommend span in {spans:#?}; log: {}", d.log()));
    assert_eq!(request.parent_span_id, "");
    assert_eq!(request.attr("route"), Some("recommend"));
    assert_eq!(request.attr("model"), Some("demo"));
    assert_eq!(request.attr("version"), Some("1"));
    assert_eq!(request.attr("status"), Some("200"));
    let (queue, batch) = children(&spans, request).expect("queue and batch spans");
    check_batch(batch, queue, request);
    assert!(
        rx.content_types()
            .iter()
            .all(|t| t.starts_with("application/json")),
        "{:?}",
        rx.content_types()
    );
}

#[test]
fn an_endpoint_that_is_not_plain_http_is_refused_at_start() {
    let out = serve_output(&["--otlp-endpoint", "https://collector:4318"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("otlp_endpoint must be an http:// URL")
            && err.contains("https://collector:4318"),
        "{err}"
    );
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn an_applied_update_batch_has_its_span() {
    use crate::common::kafka::Broker;

    let broker = Broker::start();
    broker.create_topics(&["rankd.events", "rankd.items", "rankd.users"], 1);
    let rx = Receiver::start().await;
    let d = Daemon::start_with(
        &demo_models(),
        &[
            "--kafka-brokers",
            &broker.bootstrap(),
            "--otlp-endpoint",
            &rx.url,
        ],
    );
    let p = broker.producer();
    for item in 1..=5u64 {
        p.send(
            "rankd.events",
            "9",
            &json!({"user_id": 9, "item_id": item, "type": "click"}).to_string(),
        );
    }
    p.flush();
    let applied = rx
        .wait_for(Duration::from_secs(60), |spans| {
            let events: u64 = spans
                .iter()
                .filter(|s| s.name == "apply updates")
                .map(|s| s.attr("events").unwrap_or("0").parse::<u64>().unwrap())
                .sum();
            (events >= 5).then(|| {
                spans
                    .iter()
                    .filter(|s| s.name == "apply updates")
                    .cloned()
                    .collect::<Vec<_>>()
            })
        })
        .await;
    for s in &applied {
        let messages: u64 = s.attr("messages").unwrap().parse().unwrap();
        assert!(messages >= 1, "{s:?}");
        assert_eq!(s.attr("users"), Some("0"), "{s:?}");
        assert_eq!(s.attr("items"), Some("0"), "{s:?}");
        assert!(s.end_ns >= s.start_ns);
    }
    drop(d);
}
