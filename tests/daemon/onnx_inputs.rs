//! The inputs beyond history and dense features, end to end on the PyTorch
//! fixture repository (tests/fixtures/onnx/): users' categorical features
//! (`sparse`) written over HTTP, the socket and Kafka, shown, checked
//! against the loaded models' `user_sparse_dim` and kept across restarts
//! (snapshot and write-ahead log); and a request's `context` on recommend,
//! score, bulk lines and pipelines, checked against the serving version's
//! `context_dim`. Accepted inputs give PyTorch's answers (expected.json).

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::frame::{connect, frame, read_frame, read_frames, request_frame, send};
use crate::common::parity::{close, floats};
use crate::common::*;
use crate::onnx::{copy_dir, expected, fixtures};

/// dcn-legacy: a ranker reading 3 categorical user features and 2 floats
/// of context; tower-legacy: a tower reading 3 dense features and the same
/// context; sasrec-legacy: a tower that reads no context.
const DCN: &str = "dcn-legacy";
const TOWER: &str = "tower-legacy";
const SASREC: &str = "sasrec-legacy";

/// The fixture catalogue and the three models, with `feed`: a pipeline
/// retrieving 20 candidates with the tower and ranking them with dcn; and
/// `feed-seq`: the same with the sasrec tower, which reads no context.
fn repo() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for dir in ["catalogues", DCN, TOWER, SASREC] {
        copy_dir(&fixtures().join(dir), &root.path().join(dir));
    }
    let feed = root.path().join("feed/1");
    std::fs::create_dir_all(&feed).unwrap();
    std::fs::write(
        feed.join("model.toml"),
        format!("kind = \"pipeline\"\nretrieve = \"{TOWER}\"\ncandidates = 20\nrank = \"{DCN}\"\n"),
    )
    .unwrap();
    let feed = root.path().join("feed-seq/1");
    std::fs::create_dir_all(&feed).unwrap();
    std::fs::write(
        feed.join("model.toml"),
        format!(
            "kind = \"pipeline\"\nretrieve = \"{SASREC}\"\ncandidates = 20\nrank = \"{DCN}\"\n"
        ),
    )
    .unwrap();
    root
}

/// Fixture user `n` (1-based).
fn user(e: &Value, n: u64) -> &Value {
    let u = &e["users"][(n - 1) as usize];
    assert_eq!(u["user"], n, "fixture users are 1..8 in order");
    u
}

/// Writes fixture user `u`'s history, dense and categorical features over
/// HTTP.
async fn seed_user(c: &reqwest::Client, d: &Daemon, u: &Value) {
    let mut body = json!({"history": u["history"]});
    for key in ["features", "sparse"] {
        if !u[key].is_null() {
            body[key] = u[key].clone();
        }
    }
    let (s, answer) = post(c, &d.url(&format!("/v1/users/{}", u["user"])), body).await;
    assert_eq!(s, 200, "{answer}");
}

async fn user_state(c: &reqwest::Client, d: &Daemon, id: u64) -> Value {
    get_json(c, &d.url(&format!("/v1/users/{id}"))).await
}

/// A user's `sparse` as GET shows it: `None` when absent or null.
fn sparse_of(user: &Value) -> Option<Vec<i64>> {
    user.get("sparse").filter(|s| !s.is_null()).map(|s| {
        s.as_array()
            .unwrap_or_else(|| panic!("sparse is not a list: {user}"))
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    })
}

fn assert_close_all(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} against {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(close(*g, *w), "{what}: rankd {got:?}, PyTorch {want:?}");
    }
}

/// dcn's probabilities of fixture user `u`'s candidates over HTTP, with the
/// fixture's context, equal PyTorch's.
async fn assert_dcn_answers(c: &reqwest::Client, d: &Daemon, u: &Value, want: &Value, what: &str) {
    let mut body = json!({"user_id": u["user"], "items": want["candidates"]});
    if !u["context"].is_null() {
        body["context"] = u["context"].clone();
    }
    let (s, answer) = post(c, &d.url(&format!("/v1/models/{DCN}/score")), body).await;
    assert_eq!(s, 200, "{what}: {answer}");
    assert_close_all(
        &floats(&answer["scores"]),
        &floats(&want["probabilities"]),
        what,
    );
}

/// Categorical features written over HTTP and the socket are stored, shown
/// by GET and read by the model (PyTorch's probabilities); a length no
/// loaded model reads is refused naming both lengths, with nothing of the
/// write stored; an op that does not take `sparse` refuses it.
#[tokio::test]
async fn sparse_features_are_written_shown_checked_and_read() {
    let e = expected();
    let repo = repo();
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();

    // Over HTTP: the answer and GET show them; a user without any has none.
    let u1 = user(&e, 1);
    let (s, answer) = post(
        &c,
        &d.url("/v1/users/1"),
        json!({"history": u1["history"], "features": u1["features"], "sparse": u1["sparse"]}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["sparse"], u1["sparse"], "{answer}");
    let shown = user_state(&c, &d, 1).await;
    assert_eq!(shown["sparse"], u1["sparse"], "{shown}");
    assert_close_all(
        &floats(&shown["features"]),
        &floats(&u1["features"]),
        "features beside sparse",
    );
    let (s, answer) = post(&c, &d.url("/v1/users/40"), json!({"history": [1003]})).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(sparse_of(&user_state(&c, &d, 40).await), None);

    // Over the socket.
    let u4 = user(&e, 4);
    let mut sock = connect(&d.uds).await;
    let req = json!({"id": 1, "op": "upsert_user", "user_id": 4, "history": u4["history"],
                     "features": u4["features"], "sparse": u4["sparse"]});
    send(&mut sock, &request_frame(&req), "socket upsert").await;
    let f = read_frame(&mut sock, "socket upsert").await;
    assert_eq!(f["ok"], true, "{f}");
    assert_eq!(f["result"]["sparse"], u4["sparse"], "{f}");
    assert_eq!(user_state(&c, &d, 4).await["sparse"], u4["sparse"]);

    // The model reads them: PyTorch's probabilities.
    for n in [1, 4] {
        let u = user(&e, n);
        assert_dcn_answers(&c, &d, u, &u["dcn"], &format!("user {n}")).await;
    }

    // A wrong length: refused naming both, and nothing of the write stored.
    for (sparse, got) in [(json!([1, 2]), "got 2"), (json!([1, 2, 3, 4]), "got 4")] {
        let a = post_json(
            &c,
            &d.url("/v1/users/1"),
            &json!({"history": [1003], "sparse": sparse}),
        )
        .await;
        assert_http_error(
            "sparse of a wrong length",
            &a,
            422,
            "invalid",
            &["sparse must have 3 values (user_sparse_dim)", got],
        );
    }
    let req = json!({"id": 2, "op": "upsert_user", "user_id": 4, "history": [1003], "sparse": [5]});
    send(&mut sock, &request_frame(&req), "socket upsert").await;
    let f = read_frame(&mut sock, "socket upsert").await;
    let m = assert_socket_error(&f, 2, &["invalid"], "socket sparse of a wrong length");
    assert!(
        m.contains("sparse must have 3 values (user_sparse_dim), got 1"),
        "{m}"
    );
    let (s1, s4) = (user_state(&c, &d, 1).await, user_state(&c, &d, 4).await);
    assert_eq!(
        (&s1["history"], &s1["sparse"]),
        (&u1["history"], &u1["sparse"]),
        "{s1}"
    );
    assert_eq!(
        (&s4["history"], &s4["sparse"]),
        (&u4["history"], &u4["sparse"]),
        "{s4}"
    );
    // Not integers: refused as the body's types are.
    let a = post_json(&c, &d.url("/v1/users/1"), &json!({"sparse": [1.5, 2, 3]})).await;
    assert_eq!(a.status, 422, "{}", a.text);

    // An op that does not take `sparse` says so.
    let req =
        json!({"id": 3, "op": "recommend", "model": TOWER, "user_id": 1, "sparse": [1, 2, 3]});
    send(&mut sock, &request_frame(&req), "socket recommend").await;
    let f = read_frame(&mut sock, "socket recommend").await;
    let m = assert_socket_error(&f, 3, &["invalid"], "recommend with sparse");
    assert!(m.contains("op recommend does not take `sparse`"), "{m}");
}

/// With no loaded model reading categorical features, any are refused
/// saying so.
#[tokio::test]
async fn sparse_features_are_refused_where_no_model_reads_them() {
    let root = tempfile::tempdir().unwrap();
    for dir in ["catalogues", TOWER, SASREC] {
        copy_dir(&fixtures().join(dir), &root.path().join(dir));
    }
    let d = Daemon::start_with(root.path(), &[]);
    let c = client();
    let a = post_json(&c, &d.url("/v1/users/1"), &json!({"sparse": [1, 2, 3]})).await;
    assert_http_error(
        "sparse with no model reading it",
        &a,
        422,
        "invalid",
        &["no loaded model reads sparse features (user_sparse_dim = 0), got 3 values"],
    );
    assert_eq!(sparse_of(&user_state(&c, &d, 1).await), None);
}

/// Categorical features come back after a clean stop from the snapshot
/// alone (the log removed), and after SIGKILL from the write-ahead log (no
/// snapshot since); the model reads them as before.
#[tokio::test(flavor = "multi_thread")]
async fn sparse_features_survive_restarts() {
    let e = expected();
    let repo = repo();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = ["--snapshot-dir", &dir, "--snapshot-interval-ms", "600000"];
    let c = client();

    let mut first = Daemon::start_with(repo.path(), &args);
    for n in [1, 2] {
        seed_user(&c, &first, user(&e, n)).await;
    }
    first.signal("TERM");
    let status = tokio::task::block_in_place(|| first.wait_exit(Duration::from_secs(20)));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", first.log());
    drop(first);
    for entry in std::fs::read_dir(state.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("wal-")
        {
            std::fs::remove_file(path).unwrap();
        }
    }

    let mut second = Daemon::start_with(repo.path(), &args);
    for n in [1, 2] {
        let u = user(&e, n);
        let shown = user_state(&c, &second, n).await;
        assert_eq!(shown["sparse"], u["sparse"], "from the snapshot: {shown}");
        assert_dcn_answers(
            &c,
            &second,
            u,
            &u["dcn"],
            &format!("user {n} after the snapshot"),
        )
        .await;
    }
    // Written after the last snapshot, one over each transport, then killed.
    seed_user(&c, &second, user(&e, 4)).await;
    let u5 = user(&e, 5);
    let mut sock = connect(&second.uds).await;
    let req = json!({"id": 1, "op": "upsert_user", "user_id": 5, "history": u5["history"],
                     "features": u5["features"], "sparse": u5["sparse"]});
    send(&mut sock, &request_frame(&req), "socket upsert").await;
    let f = read_frame(&mut sock, "socket upsert").await;
    assert_eq!(f["ok"], true, "{f}");
    // A new value for a user the snapshot holds.
    let (s, answer) = post(
        &c,
        &second.url("/v1/users/1"),
        json!({"sparse": [4, 6, 10]}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    assert!(tokio::task::block_in_place(
        || second.signal_and_wait("KILL", Duration::from_secs(5))
    ));
    drop(second);

    let third = Daemon::start_with(repo.path(), &args);
    for n in [2, 4, 5] {
        let u = user(&e, n);
        let shown = user_state(&c, &third, n).await;
        assert_eq!(shown["sparse"], u["sparse"], "user {n}: {shown}");
        assert_eq!(shown["history"], u["history"], "user {n}: {shown}");
        assert_dcn_answers(&c, &third, u, &u["dcn"], &format!("user {n} after SIGKILL")).await;
    }
    assert_eq!(
        sparse_of(&user_state(&c, &third, 1).await),
        Some(vec![4, 6, 10]),
        "the logged write wins over the snapshot's value"
    );
}

/// The score of `model` for `user` over all 64 items, with `context`.
async fn scores(
    c: &reqwest::Client,
    d: &Daemon,
    model: &str,
    user: u64,
    context: Option<&Value>,
) -> Vec<f64> {
    let all: Vec<u64> = (0..64).map(|i| 1000 + 3 * i).collect();
    let mut body = json!({"user_id": user, "items": all});
    if let Some(ctx) = context {
        body["context"] = ctx.clone();
    }
    let (s, answer) = post(c, &d.url(&format!("/v1/models/{model}/score")), body).await;
    assert_eq!(s, 200, "{model} user {user}: {answer}");
    floats(&answer["scores"])
}

fn tower_scores(u: &Value) -> Vec<f64> {
    (0..64)
        .map(|i| {
            u["tower"]["scores"][(1000 + 3 * i).to_string()]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Each item of a recommend answer is scored as PyTorch scores it, best
/// first, never a history item.
fn assert_recommended(answer: &Value, u: &Value, what: &str) {
    let items = answer["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {answer}"));
    assert_eq!(items.len(), 10, "{what}: {answer}");
    let history = u["history"].as_array().unwrap();
    let mut last = f64::INFINITY;
    for it in items {
        let (id, score) = (&it["id"], it["score"].as_f64().unwrap());
        assert!(!history.contains(id), "{what}: history item {id}: {answer}");
        let want = u["tower"]["scores"][id.to_string()].as_f64().unwrap();
        assert!(
            close(score, want),
            "{what}: item {id}: rankd {score}, PyTorch {want}"
        );
        assert!(score <= last + 1e-6, "{what}: not best first: {answer}");
        last = score;
    }
}

/// A context of `context_dim` values is read on recommend, score and bulk
/// lines, over HTTP and the socket (PyTorch's answers; not those of no
/// context); a wrong length, a context for a model that reads none and a
/// value that is not a finite 32-bit float are refused with the message.
#[tokio::test]
async fn context_is_checked_and_read_on_every_route() {
    let e = expected();
    let repo = repo();
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();
    for n in 1..=8 {
        seed_user(&c, &d, user(&e, n)).await;
    }
    let with_context: Vec<&Value> = e["users"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| !u["context"].is_null())
        .collect();
    assert!(with_context.len() >= 4, "the fixture gives contexts");

    // HTTP: score and recommend read it.
    for u in &with_context {
        let n = u["user"].as_u64().unwrap();
        let got = scores(&c, &d, TOWER, n, Some(&u["context"])).await;
        assert_close_all(&got, &tower_scores(u), &format!("{TOWER} score, user {n}"));
        let (s, answer) = post(
            &c,
            &d.url(&format!("/v1/models/{TOWER}/recommend")),
            json!({"user_id": n, "k": 10, "context": u["context"]}),
        )
        .await;
        assert_eq!(s, 200, "{answer}");
        assert_recommended(&answer, u, &format!("{TOWER} recommend, user {n}"));
        assert_dcn_answers(&c, &d, u, &u["dcn"], &format!("{DCN} score, user {n}")).await;
    }
    // It is not ignored: no context (zeros) answers otherwise.
    let u2 = user(&e, 2);
    let zeros = scores(&c, &d, TOWER, 2, None).await;
    let given = scores(&c, &d, TOWER, 2, Some(&u2["context"])).await;
    assert!(
        zeros.iter().zip(&given).any(|(a, b)| (a - b).abs() > 1e-3),
        "the context changed nothing: {zeros:?}"
    );

    // The socket: recommend and score.
    let mut sock = connect(&d.uds).await;
    let u = with_context[0];
    let n = u["user"].as_u64().unwrap();
    let req = json!({"id": 1, "op": "recommend", "model": TOWER, "user_id": n, "k": 10,
                     "context": u["context"]});
    send(&mut sock, &request_frame(&req), "socket recommend").await;
    let f = read_frame(&mut sock, "socket recommend").await;
    assert_eq!(f["ok"], true, "{f}");
    assert_recommended(&f["result"], u, "socket recommend");
    let req = json!({"id": 2, "op": "score", "model": DCN, "user_id": n,
                     "items": u["dcn"]["candidates"], "context": u["context"]});
    send(&mut sock, &request_frame(&req), "socket score").await;
    let f = read_frame(&mut sock, "socket score").await;
    assert_eq!(f["ok"], true, "{f}");
    assert_close_all(
        &floats(&f["result"]["scores"]),
        &floats(&u["dcn"]["probabilities"]),
        "socket score",
    );

    // Refusals over HTTP, each naming what it got.
    let mut fails = Fails::default();
    let cases = [
        (
            TOWER,
            "recommend",
            json!({"user_id": n, "context": [1.0, 2.0, 3.0]}),
            "context must have 2 values (context_dim), got 3",
        ),
        (
            DCN,
            "score",
            json!({"user_id": n, "items": [1000], "context": [1.0]}),
            "context must have 2 values (context_dim), got 1",
        ),
        (
            TOWER,
            "score",
            json!({"user_id": n, "items": [1000], "context": []}),
            "context must have 2 values (context_dim), got 0",
        ),
        (
            SASREC,
            "recommend",
            json!({"user_id": n, "context": [0.5, 0.5]}),
            "model sasrec-legacy reads no context (context_dim = 0), got 2 values",
        ),
        (
            SASREC,
            "score",
            json!({"user_id": n, "items": [1000], "context": [0.5, 0.5, 0.5]}),
            "model sasrec-legacy reads no context (context_dim = 0), got 3 values",
        ),
        (
            DCN,
            "score",
            json!({"user_id": n, "items": [1000], "context": [0.5, 1e39]}),
            "context[1] must be a finite 32-bit float",
        ),
        (
            "feed",
            "recommend",
            json!({"user_id": n, "context": [1.0, 2.0, 3.0]}),
            "context must have 2 values (context_dim), got 3",
        ),
    ];
    for (model, route, body, message) in &cases {
        let a = post_json(&c, &d.url(&format!("/v1/models/{model}/{route}")), body).await;
        fails.http_error(
            &format!("{model} {route} {body}"),
            &a,
            422,
            "invalid",
            &[*message],
        );
    }
    // The same over the socket, and NaN (which MessagePack can carry).
    for (i, (model, route, body, message)) in cases.iter().enumerate() {
        let mut req = body.clone();
        req["id"] = json!(10 + i);
        req["op"] = json!(route);
        req["model"] = json!(model);
        send(&mut sock, &request_frame(&req), "socket refusal").await;
        let f = read_frame(&mut sock, "socket refusal").await;
        fails.check(check_socket_error(
            &f,
            &[10 + i as u64],
            &["invalid"],
            &[*message],
        ));
    }
    let nan = rankd_client::wire::WireRequest {
        id: 30,
        op: "score".into(),
        model: Some(DCN.into()),
        user_id: Some(n),
        items: Some(vec![1000]),
        context: Some(vec![f64::NAN, 0.0]),
        ..Default::default()
    };
    send(
        &mut sock,
        &frame(&rmp_serde::to_vec_named(&nan).unwrap()),
        "socket NaN",
    )
    .await;
    let f = read_frame(&mut sock, "socket NaN").await;
    fails.check(check_socket_error(
        &f,
        &[30],
        &["invalid"],
        &["context[0] must be a finite 32-bit float"],
    ));
    // `upsert_user` takes no context.
    let req = json!({"id": 31, "op": "upsert_user", "user_id": 1, "context": [1.0, 2.0]});
    send(&mut sock, &request_frame(&req), "socket upsert").await;
    let f = read_frame(&mut sock, "socket upsert").await;
    fails.check(check_socket_error(
        &f,
        &[31],
        &["invalid"],
        &["op upsert_user does not take `context`"],
    ));
    fails.finish();

    // Bulk over HTTP: each line's context is its own, a bad one is an
    // error for that line alone.
    let good = with_context[1];
    let g = good["user"].as_u64().unwrap();
    let lines = [
        json!({"user_id": g, "items": good["dcn"]["candidates"], "context": good["context"]}),
        json!({"user_id": g, "items": good["dcn"]["candidates"], "context": [1.0, 2.0, 3.0]}),
        json!({"user_id": g, "items": [1000], "context": [1.0, 1e39]}),
        json!({"user_id": g, "k": 3, "context": good["context"]}),
    ];
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let text = c
        .post(d.url(&format!("/v1/models/{DCN}/bulk")))
        .body(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let results: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 4, "{text}");
    assert_close_all(
        &floats(&results[0]["scores"]),
        &floats(&good["dcn"]["probabilities"]),
        "bulk line 1",
    );
    let message = |r: &Value| {
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        message(&results[1]).contains("context must have 2 values (context_dim), got 3"),
        "{text}"
    );
    assert!(
        message(&results[2]).contains("context[1] must be a finite 32-bit float"),
        "{text}"
    );
    assert_eq!(results[1]["error"]["type"], "invalid", "{text}");
    // A recommend line on a ranker is refused as the ranker refuses it; the
    // context is not what fails it.
    assert!(!message(&results[3]).contains("context"), "{text}");

    let text = c
        .post(d.url(&format!("/v1/models/{TOWER}/bulk")))
        .body(format!(
            "{}\n{}\n",
            json!({"user_id": g, "k": 10, "context": good["context"]}),
            json!({"user_id": g, "k": 10, "context": [1.0]}),
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let results: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 2, "{text}");
    assert_recommended(&results[0], good, "bulk recommend line");
    assert!(
        message(&results[1]).contains("context must have 2 values (context_dim), got 1"),
        "{text}"
    );

    // Bulk over the socket.
    let req = json!({"id": 40, "op": "bulk", "model": DCN, "requests": [
        {"user_id": g, "items": good["dcn"]["candidates"], "context": good["context"]},
        {"user_id": g, "items": [1000], "context": [0.0]},
    ]});
    send(&mut sock, &request_frame(&req), "socket bulk").await;
    let frames = read_frames(&mut sock, 3, "socket bulk").await;
    let line = |n: u64| {
        frames
            .iter()
            .find(|f| f["line"] == n)
            .unwrap_or_else(|| panic!("no line {n}: {frames:?}"))
    };
    assert_close_all(
        &floats(&line(1)["result"]["scores"]),
        &floats(&good["dcn"]["probabilities"]),
        "socket bulk line 1",
    );
    let m = line(2)["error"]["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("context must have 2 values (context_dim), got 1"),
        "{frames:?}"
    );
    let done = frames.iter().find(|f| f.get("line").is_none()).unwrap();
    assert_eq!(done["result"]["done"], 2, "{done}");
}

/// What a pipeline retrieving 20 candidates with `retrieve` (given the
/// context when `retrieve_reads_context`) and ranking them with dcn (given
/// the context) answers for user `n` at k = 5, computed by hand from the two
/// models' own answers.
async fn pipeline_by_hand(
    c: &reqwest::Client,
    d: &Daemon,
    retrieve: &str,
    retrieve_reads_context: bool,
    n: u64,
    context: &Value,
) -> Vec<(u64, f64)> {
    let mut body = json!({"user_id": n, "k": 20});
    if retrieve_reads_context {
        body["context"] = context.clone();
    }
    let (s, retrieved) = post(c, &d.url(&format!("/v1/models/{retrieve}/recommend")), body).await;
    assert_eq!(s, 200, "{retrieved}");
    let candidates: Vec<u64> = retrieved["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect();
    let (s, ranked) = post(
        c,
        &d.url(&format!("/v1/models/{DCN}/score")),
        json!({"user_id": n, "items": candidates, "context": context}),
    )
    .await;
    assert_eq!(s, 200, "{ranked}");
    let mut want: Vec<(u64, f64)> = candidates
        .iter()
        .copied()
        .zip(floats(&ranked["scores"]))
        .collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    want.truncate(5);
    want
}

/// A pipeline hands the request's context to both stages: its answer is
/// the tower's candidates for that context ranked by dcn with it.
#[tokio::test]
async fn a_pipeline_reads_the_context_in_both_stages() {
    let e = expected();
    let repo = repo();
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();
    for n in 1..=8 {
        seed_user(&c, &d, user(&e, n)).await;
    }
    let mut checked = 0;
    for u in e["users"].as_array().unwrap() {
        if u["context"].is_null() || u["history"].as_array().unwrap().is_empty() {
            continue;
        }
        let n = u["user"].as_u64().unwrap();
        let context = &u["context"];
        let want = pipeline_by_hand(&c, &d, TOWER, true, n, context).await;
        let (s, answer) = post(
            &c,
            &d.url("/v1/models/feed/recommend"),
            json!({"user_id": n, "k": 5, "context": context}),
        )
        .await;
        assert_eq!(s, 200, "{answer}");
        assert_eq!(answer["degraded"], false, "{answer}");
        let got: Vec<(u64, f64)> = answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["id"].as_u64().unwrap(), i["score"].as_f64().unwrap()))
            .collect();
        assert_eq!(got.len(), 5, "{answer}");
        for ((gi, gs), (wi, ws)) in got.iter().zip(&want) {
            assert_eq!(gi, wi, "user {n}: {answer} against {want:?}");
            assert!(close(*gs, *ws), "user {n}: {answer} against {want:?}");
        }
        // Without it, the ranker reads zeros: other probabilities.
        let (s, plain) = post(
            &c,
            &d.url("/v1/models/feed/recommend"),
            json!({"user_id": n, "k": 5}),
        )
        .await;
        assert_eq!(s, 200, "{plain}");
        assert_ne!(plain["items"], answer["items"], "user {n}");
        checked += 1;
    }
    assert!(checked >= 3, "{checked} users checked");
}

/// A pipeline whose retrieval stage reads no context hands the context to
/// the ranker alone: the sasrec tower's candidates, ranked by dcn with the
/// request's context.
#[tokio::test]
async fn a_pipeline_hands_the_context_to_the_stage_that_reads_it() {
    let e = expected();
    let repo = repo();
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();
    for n in 1..=8 {
        seed_user(&c, &d, user(&e, n)).await;
    }
    let mut checked = 0;
    for u in e["users"].as_array().unwrap() {
        if u["context"].is_null() || u["history"].as_array().unwrap().is_empty() {
            continue;
        }
        let n = u["user"].as_u64().unwrap();
        let context = &u["context"];
        let want = pipeline_by_hand(&c, &d, SASREC, false, n, context).await;
        let (s, answer) = post(
            &c,
            &d.url("/v1/models/feed-seq/recommend"),
            json!({"user_id": n, "k": 5, "context": context}),
        )
        .await;
        assert_eq!(s, 200, "{answer}");
        assert_eq!(answer["degraded"], false, "{answer}");
        let got: Vec<u64> = answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect();
        let want_ids: Vec<u64> = want.iter().map(|w| w.0).collect();
        assert_eq!(got, want_ids, "user {n}: {answer}");
        checked += 1;
    }
    assert!(checked >= 3, "{checked} users checked");
    // A context of the wrong length is refused by the stage that reads it.
    let (s, answer) = post(
        &c,
        &d.url("/v1/models/feed-seq/recommend"),
        json!({"user_id": 4, "k": 5, "context": [1.0, 2.0, 3.0]}),
    )
    .await;
    assert_eq!(s, 422, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("context must have 2 values (context_dim), got 3"),
        "{answer}"
    );
}

#[cfg(feature = "kafka")]
mod kafka {

    use super::*;
    use crate::common::kafka::{consume_all, wait_applied, Broker};

    const USERS: &str = "rankd.users";
    const DEAD: &str = "rankd.dead";

    /// A users-topic message carrying `sparse` (alone, or beside
    /// `features`) sets the user's categorical features, which the model
    /// then reads; one of a length no loaded model reads is dead-lettered
    /// as `wrong_length` and changes nothing.
    #[tokio::test]
    async fn a_users_message_with_sparse_is_applied_and_a_wrong_one_dead_lettered() {
        let e = expected();
        let repo = repo();
        let broker = Broker::start();
        broker.create_topics(&["rankd.events", "rankd.items", USERS, DEAD], 1);
        let state = tempfile::tempdir().unwrap();
        let bootstrap = broker.bootstrap();
        let d = Daemon::start_with(
            repo.path(),
            &[
                "--kafka-brokers",
                &bootstrap,
                "--kafka-dead-letter-topic",
                DEAD,
                "--snapshot-dir",
                state.path().to_str().unwrap(),
            ],
        );
        let c = client();
        let (u4, u5) = (user(&e, 4), user(&e, 5));
        // Histories over HTTP; features over Kafka.
        for u in [u4, u5] {
            let (s, a) = post(
                &c,
                &d.url(&format!("/v1/users/{}", u["user"])),
                json!({"history": u["history"]}),
            )
            .await;
            assert_eq!(s, 200, "{a}");
        }
        let producer = broker.producer();
        producer.send(
            USERS,
            "4",
            &json!({"user_id": 4, "sparse": u4["sparse"], "version": 1}).to_string(),
        );
        producer.send(
            USERS,
            "5",
            &json!({"user_id": 5, "features": u5["features"], "sparse": u5["sparse"], "version": 1})
                .to_string(),
        );
        producer.send(
            USERS,
            "6",
            &json!({"user_id": 6, "sparse": [1, 2], "version": 1}).to_string(),
        );
        producer.flush();
        wait_applied(&c, &d, USERS, 3, Duration::from_secs(20)).await;

        let s4 = user_state(&c, &d, 4).await;
        assert_eq!(s4["sparse"], u4["sparse"], "{s4}");
        assert!(s4["features"].is_null(), "{s4}");
        let s5 = user_state(&c, &d, 5).await;
        assert_eq!(s5["sparse"], u5["sparse"], "{s5}");
        assert_close_all(
            &floats(&s5["features"]),
            &floats(&u5["features"]),
            "features beside sparse over Kafka",
        );
        assert_eq!(sparse_of(&user_state(&c, &d, 6).await), None);
        for u in [u4, u5] {
            let n = u["user"].as_u64().unwrap();
            assert_dcn_answers(&c, &d, u, &u["dcn"], &format!("user {n} over Kafka")).await;
        }
        let dead = consume_all(&broker, DEAD, 1, Duration::from_secs(15));
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].0, "wrong_length", "{dead:?}");
        assert!(dead[0].1.contains("\"user_id\":6"), "{dead:?}");
        let m = metrics(&c, &d).await;
        assert_eq!(
            sample(&m, "rankd_ingest_rejected_total{reason=\"wrong_length\"}"),
            Some(1.0),
            "{m}"
        );
    }
}
