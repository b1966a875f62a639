//! Hostile clients on the Unix socket, against the real daemon.
//!
//! The contract: a frame is a 4-byte big-endian length N and N bytes of
//! MessagePack; a declared length over `--max-frame-bytes` (default 1 MiB)
//! gets an error frame (id 0) and closes that connection alone; a frame that
//! decodes badly gets an error answer with its id (where one is readable) and
//! the connection stays usable; a client that stops reading is disconnected
//! after `--uds-write-timeout-ms`. Throughout, other connections keep getting
//! correct answers quickly and the daemon keeps running.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankd_client::types::{RecommendRequest, RecommendResponse, UserRequest};
use rankd_client::{Client, UdsClient};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::frame::*;
use crate::common::*;

/// The default `--max-frame-bytes`.
const FRAME_LIMIT: usize = 1 << 20;
/// The user whose answers are the reference; no test changes its state.
const PROBE_USER: u64 = 42;
const PROBE_K: usize = 10;

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

fn recommend_payload(id: u64, user_id: u64, k: usize) -> Vec<u8> {
    msgpack(&json!({
        "id": id,
        "op": "recommend",
        "model": "demo",
        "user_id": user_id,
        "k": k,
        "timeout_ms": 30000,
    }))
}

/// A recommend of the largest answer (k = 1000, about 20 KB), with the
/// daemon's default deadline, as a hostile client would send it.
fn big_recommend_payload(id: u64, user_id: u64) -> Vec<u8> {
    msgpack(&json!({
        "id": id,
        "op": "recommend",
        "model": "demo",
        "user_id": user_id,
        "k": 1000,
    }))
}

/// A request value as MessagePack: `mp!({"id": 1, "op": "health"})`.
macro_rules! mp {
    ($($t:tt)+) => {
        msgpack(&json!($($t)+))
    };
}

/// `socket_rows! { "name": payload => [ids the error may carry] types; ... }`
macro_rules! socket_rows {
    ($($name:literal: $payload:expr => [$($id:expr),*] $kinds:expr;)*) => {
        vec![$(($name, $payload, &[$($id),*][..], $kinds)),*]
    };
}

// ---------------------------------------------------------------------------
// Reference answers and the good client
// ---------------------------------------------------------------------------

/// Same ranking: same length and model, scores equal within float noise, and
/// ids equal except where two neighbouring scores tie within that noise.
fn same_ranking(got: &RecommendResponse, want: &RecommendResponse) -> Result<(), String> {
    if got.model != want.model || got.version != want.version {
        return Err(format!(
            "model {}@{} vs {}@{}",
            got.model, got.version, want.model, want.version
        ));
    }
    if got.items.len() != want.items.len() {
        return Err(format!("{} items vs {}", got.items.len(), want.items.len()));
    }
    for (i, (g, w)) in got.items.iter().zip(&want.items).enumerate() {
        let tol = 1e-3 * w.score.abs().max(1.0);
        if (g.score - w.score).abs() > tol {
            return Err(format!("item {i}: score {} vs {}", g.score, w.score));
        }
        if g.id != w.id {
            let tied = want
                .items
                .iter()
                .any(|o| o.id == g.id && (o.score - w.score).abs() <= tol);
            if !tied {
                return Err(format!("item {i}: id {} vs {}", g.id, w.id));
            }
        }
    }
    Ok(())
}

/// A socket answer's `result` as a recommend response, compared to `want`.
fn assert_recommend_answer(v: &Value, id: u64, want: &RecommendResponse, ctx: &str) {
    assert_eq!(v["id"], json!(id), "{ctx}: wrong id in {v}");
    assert_eq!(v["ok"], json!(true), "{ctx}: expected ok=true, got {v}");
    assert!(
        v.get("error").is_none(),
        "{ctx}: ok answer with an error: {v}"
    );
    let got: RecommendResponse = serde_json::from_value(v["result"].clone())
        .unwrap_or_else(|e| panic!("{ctx}: result is not a recommend answer ({e}): {v}"));
    if let Err(diff) = same_ranking(&got, want) {
        panic!("{ctx}: wrong recommendation ({diff}): got {got:?}, want {want:?}");
    }
}

fn probe_request(user_id: u64, k: usize) -> RecommendRequest {
    RecommendRequest {
        user_id,
        k,
        exclude: vec![],
        timeout_ms: Some(10_000),
        version: None,
        priority: None,
        filter: None,
        context: None,
    }
}

async fn good_client(path: &Path) -> UdsClient {
    tokio::time::timeout(IO_WAIT, UdsClient::connect(path))
        .await
        .expect("the good client's connect timed out")
        .expect("the good client cannot connect")
}

async fn good_recommend(c: &UdsClient, user_id: u64, k: usize) -> RecommendResponse {
    tokio::time::timeout(IO_WAIT, c.recommend("demo", probe_request(user_id, k)))
        .await
        .unwrap_or_else(|_| panic!("good client: recommend(user {user_id}, k {k}) timed out"))
        .unwrap_or_else(|e| panic!("good client: recommend(user {user_id}, k {k}) failed: {e}"))
}

/// Gives `user_id` a history (and features unless `small`: a request that
/// fits in 64 bytes), so its scores mean something.
async fn upsert_user(c: &UdsClient, user_id: u64, small: bool) {
    let history: Vec<u64> = (0..4).map(|i| 11 + user_id * 7 + i * 1111).collect();
    let features: Vec<f64> = (0..16)
        .map(|i| ((i as f32) * 0.7 + user_id as f32).sin() as f64)
        .collect();
    let req = UserRequest {
        history: Some(history),
        features: (!small).then_some(features),
        sparse: None,
    };
    tokio::time::timeout(IO_WAIT, c.upsert_user(user_id, req))
        .await
        .unwrap_or_else(|_| panic!("upsert of user {user_id} timed out"))
        .unwrap_or_else(|e| panic!("upsert of user {user_id} failed: {e}"));
}

/// The reference answer, taken before any attack.
async fn reference(path: &Path) -> RecommendResponse {
    reference_with(path, false).await
}

/// `small`: the probe user's upsert fits a 64-byte frame limit.
async fn reference_with(path: &Path, small: bool) -> RecommendResponse {
    let c = good_client(path).await;
    upsert_user(&c, PROBE_USER, small).await;
    let r = good_recommend(&c, PROBE_USER, PROBE_K).await;
    assert_eq!(r.model, "demo");
    assert_eq!(r.items.len(), PROBE_K, "reference answer: {r:?}");
    assert!(
        r.items[0].score > r.items[PROBE_K - 1].score,
        "the reference scores are all equal: {r:?}"
    );
    r
}

/// After an attack: the daemon still runs and a new connection gets the
/// reference answer.
async fn assert_healthy(daemon: &mut Daemon, want: &RecommendResponse, ctx: &str) {
    assert!(
        daemon.is_running(),
        "{ctx}: the daemon exited\n{}",
        daemon.log()
    );
    let c = good_client(&daemon.uds).await;
    let got = good_recommend(&c, PROBE_USER, PROBE_K).await;
    if let Err(diff) = same_ranking(&got, want) {
        panic!("{ctx}: wrong recommendation after the attack ({diff}): {got:?} vs {want:?}");
    }
    assert!(
        daemon.is_running(),
        "{ctx}: the daemon exited\n{}",
        daemon.log()
    );
}

#[derive(Debug, Default)]
struct WatchReport {
    calls: usize,
    max_latency: Duration,
    failures: Vec<String>,
}

/// A good client on its own connection, asking for the reference answer in a
/// loop while an attack runs.
struct Watch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WatchReport>,
}

impl Watch {
    async fn start(path: &Path, want: RecommendResponse) -> Self {
        let client = good_client(path).await;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut report = WatchReport::default();
            // Bounded: at 10 ms per round, 20 minutes at most.
            for _ in 0..120_000 {
                if flag.load(Ordering::SeqCst) && report.calls > 0 {
                    break;
                }
                let started = Instant::now();
                let answer = tokio::time::timeout(
                    IO_WAIT,
                    client.recommend("demo", probe_request(PROBE_USER, PROBE_K)),
                )
                .await;
                let took = started.elapsed();
                report.calls += 1;
                report.max_latency = report.max_latency.max(took);
                match answer {
                    Err(_) => report
                        .failures
                        .push(format!("call {}: no answer in {IO_WAIT:?}", report.calls)),
                    Ok(Err(e)) => report
                        .failures
                        .push(format!("call {}: error {e}", report.calls)),
                    Ok(Ok(got)) => {
                        if let Err(diff) = same_ranking(&got, &want) {
                            report
                                .failures
                                .push(format!("call {}: wrong answer: {diff}", report.calls));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            report
        });
        Self { stop, task }
    }

    /// Stops the loop and checks every answer came right and under `max_latency`.
    async fn finish(self, max_latency: Duration, ctx: &str) -> WatchReport {
        self.stop.store(true, Ordering::SeqCst);
        let report = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap_or_else(|_| panic!("{ctx}: the good client's loop did not stop"))
            .expect("the good client's loop panicked");
        assert!(report.calls > 0, "{ctx}: the good client made no call");
        assert!(
            report.failures.is_empty(),
            "{ctx}: the good client failed during the attack: {:?}",
            report.failures
        );
        assert!(
            report.max_latency < max_latency,
            "{ctx}: the good client waited {:?} (over {max_latency:?}) during the attack \
             ({} calls)",
            report.max_latency,
            report.calls
        );
        report
    }
}

// ---------------------------------------------------------------------------
// 1. Garbage bytes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_bytes_get_an_error_frame_then_eof() {
    let _alone = alone();
    let mut daemon = Daemon::start();
    let path = daemon.uds.clone();
    let want = reference(&path).await;
    let watch = Watch::start(&path, want.clone()).await;

    let mut random = Rng::new(0x9E37_79B9_7F4A_7C15).bytes(4096);
    // Random bytes whose first four, read as a length, are over the limit
    // (a small random length would make them a frame still to be completed).
    random[0] |= 0x80;
    let http = b"GET / HTTP/1.1\r\nHost: rankd\r\n\r\n".to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an HTTP request line", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("an HTTP request with a header", http),
        ("4 KiB of random bytes", random),
        (
            "a TLS ClientHello start",
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00],
        ),
    ];
    for (name, bytes) in cases {
        let ctx = format!("garbage: {name}");
        let mut s = connect(&path).await;
        send(&mut s, &bytes, &ctx).await;
        // Our side stays open: the daemon must close on its own.
        let closed = expect_closed(&mut s, Duration::from_secs(5), &ctx).await;
        assert_eq!(
            closed.frames.len(),
            1,
            "{ctx}: expected exactly one error frame before the close, got {:?} ({})",
            closed.frames,
            closed.how
        );
        assert_eq!(closed.partial, 0, "{ctx}: a cut answer frame");
        assert_socket_error(&closed.frames[0], 0, &[], &ctx);
        // A good client on a new connection, between attacks.
        assert_healthy(&mut daemon, &want, &ctx).await;
    }

    watch.finish(Duration::from_secs(1), "garbage").await;
    assert_healthy(&mut daemon, &want, "after the garbage").await;
}

// ---------------------------------------------------------------------------
// 2. A 4 GB length prefix
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_length_prefix_gets_an_error_naming_the_limit_then_close() {
    let _alone = alone();
    let mut daemon = Daemon::start();
    let path = daemon.uds.clone();
    let want = reference(&path).await;
    let watch = Watch::start(&path, want.clone()).await;

    let mut with_body = 0xFFFF_FFFFu32.to_be_bytes().to_vec();
    with_body.extend(Rng::new(7).bytes(64 * 1024));
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        (
            "0xFFFFFFFF alone",
            0xFFFF_FFFFu32.to_be_bytes().to_vec(),
            0xFFFF_FFFF,
        ),
        ("0xFFFFFFFF and 64 KiB of body", with_body, 0xFFFF_FFFF),
        (
            "the limit + 1",
            ((FRAME_LIMIT + 1) as u32).to_be_bytes().to_vec(),
            FRAME_LIMIT as u64 + 1,
        ),
        (
            "0x80000000",
            0x8000_0000u32.to_be_bytes().to_vec(),
            0x8000_0000,
        ),
    ];
    for (name, bytes, declared) in cases {
        let ctx = format!("length prefix: {name}");
        let mut s = connect(&path).await;
        let started = Instant::now();
        send(&mut s, &bytes, &ctx).await;
        let closed = expect_closed(&mut s, Duration::from_secs(5), &ctx).await;
        assert_eq!(
            closed.frames.len(),
            1,
            "{ctx}: expected exactly one error frame before the close, got {:?} ({})",
            closed.frames,
            closed.how
        );
        assert_eq!(closed.partial, 0, "{ctx}: a cut answer frame");
        let message = assert_socket_error(&closed.frames[0], 0, &["too_large"], &ctx);
        assert!(
            message.contains(&declared.to_string()),
            "{ctx}: the message does not name the declared length {declared}: {message:?}"
        );
        assert!(
            message.contains(&FRAME_LIMIT.to_string()),
            "{ctx}: the message does not name the limit {FRAME_LIMIT}: {message:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{ctx}: the close took {:?}",
            started.elapsed()
        );
        assert_healthy(&mut daemon, &want, &ctx).await;
    }

    watch
        .finish(Duration::from_secs(1), "huge length prefix")
        .await;
    assert_healthy(&mut daemon, &want, "after the huge length prefixes").await;
}

// ---------------------------------------------------------------------------
// 3. A frame cut in half, then EOF
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frame_cut_in_half_then_eof_ends_only_that_connection() {
    let _alone = alone();
    let mut daemon = Daemon::start();
    let path = daemon.uds.clone();
    let want = reference(&path).await;
    let watch = Watch::start(&path, want.clone()).await;

    let whole = frame(&recommend_payload(77, PROBE_USER, PROBE_K));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("half a header", whole[..2].to_vec()),
        ("a header alone", whole[..4].to_vec()),
        ("half a frame", whole[..whole.len() / 2].to_vec()),
        ("all but the last byte", whole[..whole.len() - 1].to_vec()),
        ("a header for 1000 bytes and 10 of them", {
            let mut b = 1000u32.to_be_bytes().to_vec();
            b.extend_from_slice(&[0x80; 10]);
            b
        }),
    ];
    for (name, bytes) in cases {
        let ctx = format!("cut frame: {name}");
        let mut s = connect(&path).await;
        send(&mut s, &bytes, &ctx).await;
        s.shutdown()
            .await
            .unwrap_or_else(|e| panic!("{ctx}: shutdown: {e}"));
        let closed = expect_closed(&mut s, Duration::from_secs(5), &ctx).await;
        // An error frame is allowed here, a successful answer is not.
        for f in &closed.frames {
            assert_socket_error(f, 0, &[], &ctx);
        }
        assert_eq!(closed.partial, 0, "{ctx}: a cut answer frame");
        assert_healthy(&mut daemon, &want, &ctx).await;
    }

    // A whole request, then half of the next, then EOF: the whole one is
    // still answered before the daemon closes.
    let ctx = "a whole frame, half of the next, then EOF";
    let mut s = connect(&path).await;
    let mut bytes = whole.clone();
    bytes.extend_from_slice(&whole[..whole.len() / 2]);
    send(&mut s, &bytes, ctx).await;
    s.shutdown().await.unwrap();
    let closed = expect_closed(&mut s, Duration::from_secs(5), ctx).await;
    let answer = closed
        .frames
        .iter()
        .find(|f| f["id"] == json!(77))
        .unwrap_or_else(|| {
            panic!(
                "{ctx}: the whole request was not answered; got {:?} ({})",
                closed.frames, closed.how
            )
        });
    assert_recommend_answer(answer, 77, &want, ctx);
    for f in closed.frames.iter().filter(|f| f["id"] != json!(77)) {
        assert_socket_error(f, 0, &[], ctx);
    }
    assert_healthy(&mut daemon, &want, ctx).await;

    // Many connections dropped mid-frame at once.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let path = path.clone();
        let whole = whole.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = connect(&path).await;
            let cut = 1 + i % (whole.len() - 1);
            send(&mut s, &whole[..cut], "burst of cut frames").await;
            drop(s);
        }));
    }
    for t in tasks {
        tokio::time::timeout(IO_WAIT, t)
            .await
            .expect("a cut-frame task hung")
            .expect("a cut-frame task panicked");
    }

    watch.finish(Duration::from_secs(1), "cut frames").await;
    assert_healthy(&mut daemon, &want, "after the cut frames").await;
}

// ---------------------------------------------------------------------------
// 4. Valid frames, wrong contents
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_types_get_an_error_with_their_id_and_the_connection_stays_usable() {
    let _alone = alone();
    let mut daemon = Daemon::start();
    let path = daemon.uds.clone();
    let want = reference(&path).await;
    let watch = Watch::start(&path, want.clone()).await;

    const BAD: &[&str] = &["invalid", "malformed"];
    // (name, payload, ids the error may carry, accepted error types). A
    // MessagePack array is not a request map: its first element is not an
    // `id` field, so an answer with id 0 or with that first element is fine,
    // as long as it is an error.
    type Case<'a> = (&'a str, Vec<u8>, &'a [u64], &'a [&'a str]);
    let cases: Vec<Case> = socket_rows! {
        "user_id as a string": mp!({"id": 101, "op": "recommend", "model": "demo", "user_id": "42", "k": 5}) => [101] BAD;
        "k = -1": mp!({"id": 102, "op": "recommend", "model": "demo", "user_id": 42, "k": -1}) => [102] BAD;
        "k = 2.5": mp!({"id": 103, "op": "recommend", "model": "demo", "user_id": 42, "k": 2.5}) => [103] BAD;
        "k = 0": mp!({"id": 104, "op": "recommend", "model": "demo", "user_id": 42, "k": 0}) => [104] &["invalid"];
        "k over max_k": mp!({"id": 105, "op": "recommend", "model": "demo", "user_id": 42, "k": 1_000_000}) => [105] &["invalid"];
        "items as a map": mp!({"id": 106, "op": "score", "model": "demo", "user_id": 42, "items": {"1": 2}}) => [106] BAD;
        "exclude as a string": mp!({"id": 107, "op": "recommend", "model": "demo", "user_id": 42, "exclude": "1,2"}) => [107] BAD;
        "negative user_id": mp!({"id": 108, "op": "recommend", "model": "demo", "user_id": -42}) => [108] BAD;
        "features as strings": mp!({"id": 109, "op": "upsert_user", "user_id": 990_001, "features": ["a", "b"]}) => [109] BAD;
        "an unknown op": mp!({"id": 110, "op": "explode", "model": "demo"}) => [110] &["invalid"];
        "op as a number": mp!({"id": 111, "op": 3, "model": "demo"}) => [111] BAD;
        "no op": mp!({"id": 112, "model": "demo"}) => [112] BAD;
        "recommend without model": mp!({"id": 113, "op": "recommend", "user_id": 42}) => [113] &["invalid"];
        "recommend without user_id": mp!({"id": 114, "op": "recommend", "model": "demo"}) => [114] &["invalid"];
        "score without items": mp!({"id": 115, "op": "score", "model": "demo", "user_id": 42}) => [115] &["invalid"];
        "model as a map": mp!({"id": 116, "op": "recommend", "model": {"name": "demo"}, "user_id": 42}) => [116] BAD;
        "id as a string": mp!({"id": "117", "op": "health"}) => [0] BAD;
        "negative id": mp!({"id": -1, "op": "health"}) => [0] BAD;
        "no id": mp!({"op": "health"}) => [0] BAD;
        "an empty map": mp!({}) => [0] BAD;
        "an integer": rmp_serde::to_vec(&5u64).unwrap() => [0] BAD;
        "a string": rmp_serde::to_vec("recommend").unwrap() => [0] BAD;
        "nil": vec![0xc0] => [0] BAD;
        "an array of numbers": mp!([1, 2, 3]) => [0, 1] BAD;
        "an array shaped like a request": mp!([118, "recommend", "demo", 42, 5]) => [0, 118] BAD;
        "an array [id, \"health\"]": mp!([119, "health"]) => [0, 119] BAD;
        "the reserved marker 0xc1": vec![0xc1, 0xc1, 0xc1] => [0] &["malformed"];
        "a map promising 3 entries holding 1": vec![0x83, 0xa2, b'i', b'd', 0x05] => [0] BAD;
        "an empty payload": vec![] => [0] &["malformed"];
        "a lone string": mp!("recommend") => [0] &["invalid"];
    };
    assert_eq!(cases.len(), 30, "a row of the table went missing");

    // One connection for everything: each bad frame, then a good request.
    let mut s = connect(&path).await;
    let mut good_id = 1_000u64;
    let mut failures = Vec::new();
    for (name, payload, ids, kinds) in &cases {
        let ctx = format!("wrong types: {name}");
        good_id += 1;
        let mut bytes = frame(payload);
        bytes.extend(frame(&recommend_payload(good_id, PROBE_USER, PROBE_K)));
        send(&mut s, &bytes, &ctx).await;
        let answers = read_frames(&mut s, 2, &ctx).await;
        let good = by_id(&answers, good_id, &ctx);
        assert_recommend_answer(good, good_id, &want, &format!("{ctx}, then a good request"));
        let bad = answers
            .iter()
            .find(|v| v["id"] != json!(good_id))
            .expect("two answers");
        // Collected, so one run reports every case the daemon gets wrong.
        if let Err(e) = check_socket_error(bad, ids, kinds, &[]) {
            failures.push(format!("{ctx}: {e}"));
        }
    }

    // The same, pipelined in one write: every bad frame and good requests
    // in between; answers in any order.
    let ctx = "wrong types, pipelined";
    let mut bytes = Vec::new();
    let mut good_ids = Vec::new();
    for (_, payload, _, _) in &cases {
        bytes.extend(frame(payload));
        good_id += 1;
        good_ids.push(good_id);
        bytes.extend(frame(&recommend_payload(good_id, PROBE_USER, PROBE_K)));
    }
    send(&mut s, &bytes, ctx).await;
    let answers = read_frames(&mut s, cases.len() * 2, ctx).await;
    for id in &good_ids {
        assert_recommend_answer(by_id(&answers, *id, ctx), *id, &want, ctx);
    }
    for (name, _, ids, kinds) in &cases {
        if let [id] = ids {
            if *id != 0 {
                let v = by_id(&answers, *id, ctx);
                if let Err(e) = check_socket_error(v, ids, kinds, &[]) {
                    failures.push(format!("{ctx}: {name}: {e}"));
                }
            }
        }
    }
    // Every other answer is an error.
    let bad_answers: Vec<&Value> = answers
        .iter()
        .filter(|v| !good_ids.iter().any(|id| v["id"] == json!(id)))
        .collect();
    assert_eq!(bad_answers.len(), cases.len(), "{ctx}: {answers:?}");
    for v in bad_answers {
        if let Err(e) = check_socket_error(v, &[], BAD, &[]) {
            failures.push(format!("{ctx}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "bad requests answered wrongly:\n{}",
        failures.join("\n")
    );

    watch.finish(Duration::from_secs(1), "wrong types").await;
    assert_healthy(&mut daemon, &want, "after the wrong types").await;
}

// ---------------------------------------------------------------------------
// 5. A client that never reads
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_reads_is_disconnected_and_others_stay_fast() {
    let _alone = alone();
    // A small in-flight bound, so that what the good client measures is the
    // effect of the stall, not the compute load of the answers admitted: on a
    // 2-core machine 256 pipelined k = 1000 recommends (the default bound)
    // take over a second even for a client that reads them all.
    let mut daemon = Daemon::start_with(
        &demo_models(),
        &["--uds-write-timeout-ms", "300", "--uds-max-inflight", "16"],
    );
    let path = daemon.uds.clone();
    let want = reference(&path).await;
    let watch = Watch::start(&path, want.clone()).await;

    // Big answers (k = 1000, about 20 KB each), never read.
    let mut chunk = Vec::new();
    for i in 0..200u64 {
        chunk.extend(frame(&big_recommend_payload(i + 1, i % 50 + 1)));
    }
    let mut s = connect(&path).await;
    let started = Instant::now();
    let give_up = Duration::from_secs(15);
    let mut sent_chunks = 0usize;
    let write_error = loop {
        let left = give_up.saturating_sub(started.elapsed());
        assert!(
            !left.is_zero(),
            "the daemon kept a client that never reads for {give_up:?} \
             ({sent_chunks} x 200 requests written)"
        );
        match tokio::time::timeout(left, s.write_all(&chunk)).await {
            Err(_) => panic!(
                "writes to a client that never reads stalled for {give_up:?} without \
                 the daemon closing it ({sent_chunks} x 200 requests written)"
            ),
            Ok(Ok(())) => sent_chunks += 1,
            Ok(Err(e)) => break e,
        }
        assert!(
            sent_chunks < 100_000,
            "100000 chunks written and never disconnected"
        );
    };
    let disconnected_after = started.elapsed();
    assert!(
        disconnected_after < Duration::from_secs(5),
        "the non-reading client was disconnected only after {disconnected_after:?} \
         (write timeout 300 ms)"
    );
    // Reading now drains what was in flight, then the end.
    let closed = expect_closed(&mut s, Duration::from_secs(10), "never-reading client").await;
    for f in &closed.frames {
        assert!(
            f["id"].as_u64().is_some_and(|id| (1..=200).contains(&id)),
            "never-reading client: an answer with a foreign id: {}",
            f["id"]
        );
    }
    let report = watch
        .finish(Duration::from_secs(1), "client that never reads")
        .await;
    eprintln!(
        "never-reading client: writes failed after {disconnected_after:?} ({write_error}); \
         {sent_chunks} x 200 requests written; {} answers then {} ({} partial bytes); \
         good client: {} calls, max latency {:?}",
        closed.frames.len(),
        closed.how,
        closed.partial,
        report.calls,
        report.max_latency
    );

    // Again, with several non-readers at once, and a good client checked
    // throughout.
    let watch = Watch::start(&path, want.clone()).await;
    let mut tasks = Vec::new();
    for n in 0..4 {
        let path = path.clone();
        let chunk = chunk.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = connect(&path).await;
            let started = Instant::now();
            for _ in 0..100_000 {
                let left = Duration::from_secs(15).saturating_sub(started.elapsed());
                match tokio::time::timeout(left, s.write_all(&chunk)).await {
                    Err(_) => panic!("non-reader {n}: never disconnected within 15 s"),
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return started.elapsed(),
                }
            }
            panic!("non-reader {n}: 100000 chunks written, never disconnected");
        }));
    }
    for t in tasks {
        let took = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a non-reader task hung")
            .expect("a non-reader task panicked");
        assert!(
            took < Duration::from_secs(5),
            "a non-reader was disconnected only after {took:?}"
        );
    }
    watch
        .finish(Duration::from_secs(1), "four clients that never read")
        .await;
    assert_healthy(&mut daemon, &want, "after the non-reading clients").await;
}

// ---------------------------------------------------------------------------
// 6. Many connections at once
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_connections_pipelining_at_once_are_all_answered() {
    let _alone = alone();
    let mut daemon = Daemon::start();
    let path = daemon.uds.clone();
    let want = reference(&path).await;

    const CONNS: u64 = 50;
    const PER_CONN: u64 = 10;
    const USERS: [u64; 5] = [501, 502, 503, 504, 505];
    // The answers to expect, from one connection, one call at a time.
    let c = good_client(&path).await;
    let mut refs = std::collections::HashMap::new();
    for user in USERS {
        upsert_user(&c, user, false).await;
    }
    for user in USERS {
        for k in 5..5 + PER_CONN as usize {
            refs.insert((user, k), good_recommend(&c, user, k).await);
        }
    }
    let refs = Arc::new(refs);

    let watch = Watch::start(&path, want.clone()).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(CONNS as usize));
    let mut tasks = Vec::new();
    for conn in 0..CONNS {
        let (path, refs, barrier) = (path.clone(), refs.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = connect(&path).await;
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for j in 0..PER_CONN {
                // Ids repeat across connections: each connection has its own.
                let id = j + 1;
                let user = USERS[((conn + j) % 5) as usize];
                let k = 5 + j as usize;
                bytes.extend(frame(&recommend_payload(id, user, k)));
                expected.push((id, user, k));
            }
            // One health call in the middle of the pipeline.
            bytes.extend(frame(&msgpack(&json!({"id": 999, "op": "health"}))));
            barrier.wait().await;
            let ctx = format!("connection {conn}");
            send(&mut s, &bytes, &ctx).await;
            let answers = read_frames(&mut s, PER_CONN as usize + 1, &ctx).await;
            for (id, user, k) in expected {
                assert_recommend_answer(
                    by_id(&answers, id, &ctx),
                    id,
                    &refs[&(user, k)],
                    &format!("{ctx}, user {user}, k {k}"),
                );
            }
            let health = by_id(&answers, 999, &ctx);
            assert_eq!(health["ok"], json!(true), "{ctx}: {health}");
            assert_eq!(health["result"]["ready"], json!(true), "{ctx}: {health}");
            // The connection is still usable for a second round.
            send(
                &mut s,
                &frame(&recommend_payload(500, PROBE_USER, PROBE_K)),
                &ctx,
            )
            .await;
            read_frame(&mut s, &ctx).await
        }));
    }
    for (conn, t) in tasks.into_iter().enumerate() {
        let last = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap_or_else(|_| panic!("connection {conn} hung"))
            .unwrap_or_else(|e| panic!("connection {conn} failed: {e}"));
        assert_recommend_answer(
            &last,
            500,
            &want,
            &format!("connection {conn}, second round"),
        );
    }
    watch
        .finish(Duration::from_secs(2), "fifty connections")
        .await;
    assert_healthy(&mut daemon, &want, "after fifty connections").await;
}

// ---------------------------------------------------------------------------
// 7. At the frame limit and one byte over
// ---------------------------------------------------------------------------

/// A `health` request padded (through the `model` field, which health
/// ignores) to exactly `size` bytes of MessagePack.
/// A valid request of exactly `size` bytes: an `upsert_user` whose history
/// (item 1, repeated) pads it; every field is one the op takes.
fn upsert_of_size(id: u64, size: usize) -> Vec<u8> {
    for pad in 0..size {
        let p =
            msgpack(&json!({"id": id, "op": "upsert_user", "user_id": 1, "history": vec![1; pad]}));
        if p.len() == size {
            return p;
        }
        assert!(
            p.len() < size,
            "cannot pad an upsert_user request to {size} bytes"
        );
    }
    unreachable!()
}

/// An unknown op padded to exactly `size` bytes.
fn bad_op_of_size(id: u64, size: usize) -> Vec<u8> {
    for pad in 1..size {
        let p = msgpack(&json!({"id": id, "op": "z".repeat(pad)}));
        if p.len() == size {
            return p;
        }
    }
    panic!("cannot pad an unknown op to {size} bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_at_the_limit_are_served_and_one_byte_over_closes() {
    let _alone = alone();
    const LIMIT: usize = 64;
    let mut daemon = Daemon::start_with(&demo_models(), &["--max-frame-bytes", "64"]);
    let path = daemon.uds.clone();
    let want = reference_with(&path, true).await;
    let watch = Watch::start(&path, want.clone()).await;

    let mut s = connect(&path).await;

    // Exactly at the limit, valid: served.
    let ctx = "a valid 64-byte upsert_user request";
    let p = upsert_of_size(1, LIMIT);
    assert_eq!(p.len(), LIMIT);
    send(&mut s, &frame(&p), ctx).await;
    let v = read_frame(&mut s, ctx).await;
    assert_eq!(v["id"], json!(1), "{ctx}: {v}");
    assert_eq!(v["ok"], json!(true), "{ctx}: {v}");
    assert_eq!(v["result"]["user_id"], json!(1), "{ctx}: {v}");

    // Exactly at the limit, not MessagePack: a per-request error, still open.
    let ctx = "64 bytes of garbage";
    send(&mut s, &frame(&[0xc1; LIMIT]), ctx).await;
    let v = read_frame(&mut s, ctx).await;
    assert_socket_error(&v, 0, &["invalid", "malformed"], ctx);

    // Exactly at the limit, an unknown op: an error with its id.
    let ctx = "a 64-byte unknown op";
    let p = bad_op_of_size(3, LIMIT);
    assert_eq!(p.len(), LIMIT);
    send(&mut s, &frame(&p), ctx).await;
    let v = read_frame(&mut s, ctx).await;
    assert_socket_error(&v, 3, &["invalid"], ctx);

    // One below, and an empty frame.
    let ctx = "a valid 63-byte upsert_user request";
    send(&mut s, &frame(&upsert_of_size(4, LIMIT - 1)), ctx).await;
    let v = read_frame(&mut s, ctx).await;
    assert_eq!(v["id"], json!(4), "{ctx}: {v}");
    assert_eq!(v["ok"], json!(true), "{ctx}: {v}");
    let ctx = "an empty frame";
    send(&mut s, &frame(&[]), ctx).await;
    let v = read_frame(&mut s, ctx).await;
    assert_socket_error(&v, 0, &["invalid", "malformed"], ctx);

    // A real recommend (well under 64 bytes) on the same connection.
    let ctx = "a recommend after the frames at the limit";
    let p = msgpack(
        &json!({"id": 5, "op": "recommend", "model": "demo", "user_id": PROBE_USER, "k": PROBE_K}),
    );
    assert!(p.len() <= LIMIT);
    send(&mut s, &frame(&p), ctx).await;
    let v = read_frame(&mut s, ctx).await;
    assert_recommend_answer(&v, 5, &want, ctx);

    // One byte over, on the same connection: error frame, then closed.
    let ctx = "a 65-byte frame";
    let p = upsert_of_size(6, LIMIT + 1);
    assert_eq!(p.len(), LIMIT + 1);
    send(&mut s, &frame(&p), ctx).await;
    let closed = expect_closed(&mut s, Duration::from_secs(5), ctx).await;
    assert_eq!(
        closed.frames.len(),
        1,
        "{ctx}: expected one error frame then the close, got {:?} ({})",
        closed.frames,
        closed.how
    );
    assert_eq!(closed.partial, 0, "{ctx}: a cut answer frame");
    let message = assert_socket_error(&closed.frames[0], 0, &["too_large"], ctx);
    assert!(
        message.contains("65") && message.contains("64"),
        "{ctx}: the message names neither the length 65 nor the limit 64: {message:?}"
    );
    assert_healthy(&mut daemon, &want, ctx).await;

    // One byte over, header only, on a fresh connection.
    let ctx = "a header declaring 65 bytes";
    let mut s = connect(&path).await;
    send(&mut s, &65u32.to_be_bytes(), ctx).await;
    let closed = expect_closed(&mut s, Duration::from_secs(5), ctx).await;
    assert_eq!(closed.frames.len(), 1, "{ctx}: {:?}", closed.frames);
    let message = assert_socket_error(&closed.frames[0], 0, &["too_large"], ctx);
    assert!(
        message.contains("65") && message.contains("64"),
        "{ctx}: {message:?}"
    );

    // The good client's own requests are under the limit and kept working.
    watch.finish(Duration::from_secs(1), "frame limit").await;
    assert_healthy(&mut daemon, &want, "after the frame-limit checks").await;
}
