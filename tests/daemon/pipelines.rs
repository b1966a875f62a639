//! Pipelines end to end: retrieval → ranking in one call over HTTP, the
//! socket and bulk, the same answer a client gluing the two calls gets, the
//! refusals, a ranking stage that cannot finish in time, and a pipeline
//! whose stages read different catalogues.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::frame::{connect, read_frame, request_frame, send};
use crate::common::*;

fn pipeline(root: &std::path::Path, name: &str, body: &str) {
    let dir = root.join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model.toml"),
        format!("kind = \"pipeline\"\n{body}"),
    )
    .unwrap();
}

/// What a client would do by hand: the retrieval model's top `candidates`,
/// scored by the ranker, best first (ties by id), cut at `k`.
async fn by_hand(
    c: &reqwest::Client,
    d: &Daemon,
    user: u64,
    candidates: usize,
    k: usize,
) -> Vec<(u64, f64, f64)> {
    let (s, r) = post(
        c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": user, "k": candidates}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let retrieved: Vec<(u64, f64)> = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_u64().unwrap(), i["score"].as_f64().unwrap()))
        .collect();
    let (s, scored) = post(
        c,
        &d.url("/v1/models/demo-ranker/score"),
        json!({"user_id": user, "items": retrieved.iter().map(|r| r.0).collect::<Vec<_>>()}),
    )
    .await;
    assert_eq!(s, 200, "{scored}");
    let mut all: Vec<(u64, f64, f64)> = retrieved
        .iter()
        .zip(scored["scores"].as_array().unwrap())
        .map(|(&(id, rs), s)| (id, s.as_f64().unwrap(), rs))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn triples(v: &Value) -> Vec<(u64, f64, f64)> {
    v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {v}"))
        .iter()
        .map(|i| {
            (
                i["id"].as_u64().unwrap(),
                i["score"].as_f64().unwrap(),
                i["retrieval_score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A pipeline's recommend equals the two calls a client would make, over
/// HTTP, the socket and bulk, with both stages' versions; `k` over
/// `candidates`, `version` and `score` are refused.
#[tokio::test]
async fn a_pipeline_answers_what_retrieval_then_ranking_by_hand_gives() {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    derived_model(root.path(), "demo-ranker", "demo-ranker", |t| t);
    pipeline(
        root.path(),
        "feed",
        "retrieve = \"demo\"\ncandidates = 50\nrank = \"demo-ranker\"\n",
    );
    let d = Daemon::start_with(root.path(), &[]);
    let c = client();
    let user = 5u64;
    let (s, w) = post(
        &c,
        &d.url(&format!("/v1/users/{user}")),
        json!({"history": spread_history(user, 20)}),
    )
    .await;
    assert_eq!(s, 200, "{w}");

    let (s, r) = post(
        &c,
        &d.url("/v1/models/feed/recommend"),
        json!({"user_id": user, "k": 10}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["model"], "feed", "{r}");
    assert_eq!(r["versions"], json!({"retrieve": 1, "rank": 1}), "{r}");
    assert_eq!(
        (r["degraded"].clone(), r["cold_start"].clone()),
        (json!(false), json!(false)),
        "{r}"
    );
    let want = by_hand(&c, &d, user, 50, 10).await;
    assert_eq!(
        triples(&r),
        want,
        "the pipeline and the two calls by hand differ"
    );
    // The ranker reorders: the answer is not the retrieval order.
    let retrieval_order: Vec<u64> = {
        let mut v = triples(&r);
        v.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        v.iter().map(|t| t.0).collect()
    };
    assert_ne!(ids(&r), retrieval_order, "{r}");

    let mut sock = connect(&d.uds).await;
    let v = json!({"id": 1, "op": "recommend", "model": "feed", "user_id": user, "k": 10});
    send(&mut sock, &request_frame(&v), "socket").await;
    let f = read_frame(&mut sock, "socket").await;
    assert_eq!(f["ok"], true, "{f}");
    assert_eq!(ids(&f["result"]), ids(&r), "{f}");
    assert_eq!(f["result"]["versions"], r["versions"], "{f}");

    let body = format!("{}\n", json!({"user_id": user, "k": 10}));
    let text = c
        .post(d.url("/v1/models/feed/bulk"))
        .body(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(ids(&line), ids(&r), "{text}");
    assert_eq!(line["versions"], r["versions"], "{text}");

    let a = post_json(
        &c,
        &d.url("/v1/models/feed/recommend"),
        &json!({"user_id": user, "k": 51}),
    )
    .await;
    assert_http_error(
        "k over candidates",
        &a,
        422,
        "invalid",
        &["k must be <= 50", "got 51"],
    );
    let a = post_json(
        &c,
        &d.url("/v1/models/feed/recommend"),
        &json!({"user_id": user, "version": 1}),
    )
    .await;
    assert_http_error("version", &a, 422, "invalid", &["traffic split"]);
    let a = post_json(
        &c,
        &d.url("/v1/models/feed/score"),
        &json!({"user_id": user, "items": [1]}),
    )
    .await;
    assert_http_error("score", &a, 422, "invalid", &["pipeline", "recommend only"]);

    let info = get_json(&c, &d.url("/v1/models/feed")).await;
    assert_eq!(
        (&info["kind"], &info["state"], &info["version"]),
        (&json!("pipeline"), &json!("ready"), &json!(1)),
        "{info}"
    );
    assert_eq!(
        info["pipeline"],
        json!({"retrieve": "demo", "candidates": 50, "rank": "demo-ranker"}),
        "{info}"
    );
    assert_eq!(info["limits"]["max_k"], 50, "{info}");
    let all = get_json(&c, &d.url("/v1/models")).await;
    let names: Vec<&str> = all["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo", "demo-ranker", "feed"], "{all}");

    let m = metrics(&c, &d).await;
    for stage in ["retrieve", "rank"] {
        let series =
            format!("rankd_pipeline_stage_seconds_count{{pipeline=\"feed\",stage=\"{stage}\"}}");
        assert!(sample(&m, &series).unwrap_or(0.0) >= 3.0, "{series}\n{m}");
    }
}

/// A ranking stage that cannot finish within `timeout_ms` leaves the
/// retrieval order, flagged `degraded` with `degraded_reason: rank_stage`,
/// answered within the deadline and counted.
#[tokio::test]
async fn a_ranking_stage_out_of_time_answers_in_retrieval_order() {
    // It bounds a latency: no other test's daemon competes for the CPU.
    let _alone = alone();
    // `heavy`: a ranker of three 4,096-wide layers over 1,000 candidates
    // (tens of GFLOP a batch).
    let root = heavy_ranker_repo(4096);
    derived_model(root.path(), "demo", "demo", |t| t);
    pipeline(
        root.path(),
        "slow-feed",
        "retrieve = \"demo\"\ncandidates = 1000\nrank = \"heavy\"\n",
    );
    let d = Daemon::start_with(root.path(), &[]);
    let c = client();
    let user = 9u64;
    let (s, w) = post(
        &c,
        &d.url(&format!("/v1/users/{user}")),
        json!({"history": spread_history(user, 20)}),
    )
    .await;
    assert_eq!(s, 200, "{w}");
    // How long the ranker takes here, to pick a deadline it cannot meet.
    let (s, r) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": user, "k": 1000}),
    )
    .await;
    assert_eq!(s, 200);
    let candidates: Vec<u64> = ids(&r);
    let t = Instant::now();
    let (s, _) = post(
        &c,
        &d.url("/v1/models/heavy/score"),
        json!({"user_id": user, "items": candidates, "timeout_ms": 60000}),
    )
    .await;
    assert_eq!(s, 200);
    let rank_time = t.elapsed();
    let timeout = Duration::from_millis(40);
    assert!(
        rank_time > 3 * timeout,
        "the ranker takes {rank_time:?}: too fast to miss {timeout:?}"
    );

    let t = Instant::now();
    let (s, r) = post(
        &c,
        &d.url("/v1/models/slow-feed/recommend"),
        json!({"user_id": user, "k": 10, "timeout_ms": timeout.as_millis() as u64}),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["degraded"], true, "{r}");
    assert_eq!(r["degraded_reason"], "rank_stage", "{r}");
    assert_eq!(r["versions"], json!({"retrieve": 1}), "{r}");
    assert_eq!(ids(&r), candidates[..10].to_vec(), "retrieval order");
    for i in r["items"].as_array().unwrap() {
        assert_eq!(i["score"], i["retrieval_score"], "{i}");
    }
    assert!(
        took < timeout + Duration::from_millis(250),
        "answered after {took:?}"
    );
    let m = metrics(&c, &d).await;
    assert_eq!(
        sample(
            &m,
            "rankd_degraded_total{model=\"slow-feed\",reason=\"rank_stage\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// A pipeline whose stages read different catalogues, or that names a
/// model the repository lacks, does not serve: its recommend is 503 naming
/// why, and the models serve on.
#[tokio::test]
async fn a_pipeline_over_two_catalogues_is_refused() {
    let repo = two_catalogue_repo();
    derived_model(repo.path(), "ranker", "demo-ranker", |t| {
        let items = t
            .lines()
            .find(|l| l.starts_with("items = "))
            .unwrap()
            .to_string();
        t.replace(&items, "catalogue = \"creators\"")
    });
    pipeline(
        repo.path(),
        "mixed",
        "retrieve = \"videos\"\nrank = \"ranker\"\n",
    );
    pipeline(
        repo.path(),
        "orphan",
        "retrieve = \"videos\"\nrank = \"nope\"\n",
    );
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();
    let a = post_json(
        &c,
        &d.url("/v1/models/mixed/recommend"),
        &json!({"user_id": 1}),
    )
    .await;
    assert_http_error(
        "mixed",
        &a,
        503,
        "not_ready",
        &["different catalogues", "videos", "creators"],
    );
    let a = post_json(
        &c,
        &d.url("/v1/models/orphan/recommend"),
        &json!({"user_id": 1}),
    )
    .await;
    assert_http_error(
        "orphan",
        &a,
        503,
        "not_ready",
        &["'nope' is not in the repository"],
    );
    let (s, _) = post(
        &c,
        &d.url("/v1/models/videos/recommend"),
        json!({"user_id": 1}),
    )
    .await;
    assert_eq!(s, 200);
}

/// The version folder `version` of pipeline `name`, holding `text`.
fn pipeline_version(root: &std::path::Path, name: &str, version: u64, text: &str) {
    let dir = root.join(name).join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.toml"), text).unwrap();
}

/// `/v1/models/{name}` once `done` holds for it (status, body), or a panic
/// with the last answer after ten seconds of repository polls.
async fn model_info_when(
    c: &reqwest::Client,
    d: &Daemon,
    name: &str,
    done: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, body) = get(c, &d.url(&format!("/v1/models/{name}"))).await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if done(s, &v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "'{name}' never reached the expected state: {s} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pipelines are read again on every repository poll: a new version takes
/// over (its `candidates` bound the next request), a version that cannot be
/// read leaves the one serving in place, and a pipeline folder added or
/// removed appears or vanishes, with no restart.
#[tokio::test]
async fn pipelines_are_hot_reloaded_from_the_repository() {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    derived_model(root.path(), "demo-ranker", "demo-ranker", |t| t);
    let stages = "kind = \"pipeline\"\nretrieve = \"demo\"\nrank = \"demo-ranker\"\n";
    pipeline_version(
        root.path(),
        "feed",
        1,
        &format!("{stages}candidates = 50\n"),
    );
    let d = Daemon::start_with(root.path(), &["--repository-poll-ms", "100"]);
    let c = client();
    let user = 7u64;
    let (s, w) = post(
        &c,
        &d.url(&format!("/v1/users/{user}")),
        json!({"history": spread_history(user, 20)}),
    )
    .await;
    assert_eq!(s, 200, "{w}");
    let url = d.url("/v1/models/feed/recommend");
    let recommend = |k: usize| {
        let (c, url) = (c.clone(), url.clone());
        async move { post_json(&c, &url, &json!({"user_id": user, "k": k})).await }
    };
    let a = recommend(30).await;
    assert_eq!(a.status, 200, "{}", a.text);

    // Version 2 takes 20 candidates: k = 30 is now over them.
    pipeline_version(
        root.path(),
        "feed",
        2,
        &format!("{stages}candidates = 20\n"),
    );
    let info = model_info_when(&c, &d, "feed", |s, v| s == 200 && v["version"] == 2).await;
    assert_eq!(info["pipeline"]["candidates"], 20, "{info}");
    assert_eq!(info["state"], "ready", "{info}");
    let a = recommend(30).await;
    assert_http_error(
        "k over version 2's candidates",
        &a,
        422,
        "invalid",
        &["k must be <= 20", "got 30"],
    );
    let (s, r) = post(
        &c,
        &d.url("/v1/models/feed/recommend"),
        json!({"user_id": user, "k": 10}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(triples(&r), by_hand(&c, &d, user, 20, 10).await, "{r}");

    // Version 3 cannot be read: version 2 serves on, through many polls.
    pipeline_version(
        root.path(),
        "feed",
        3,
        "kind = \"pipeline\"\nretrieve = \"demo\"\nrank = \"demo-ranker\"\ncandidates = 0\n",
    );
    // A new folder written after version 3 shows that polls have run since.
    pipeline_version(
        root.path(),
        "feed-b",
        1,
        &format!("{stages}candidates = 40\n"),
    );
    model_info_when(&c, &d, "feed-b", |s, v| s == 200 && v["state"] == "ready").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = get_json(&c, &d.url("/v1/models/feed")).await;
    assert_eq!(
        (&info["version"], &info["state"]),
        (&json!(2), &json!("ready")),
        "{info}"
    );
    let a = recommend(10).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (s, r) = post(
        &c,
        &d.url("/v1/models/feed-b/recommend"),
        json!({"user_id": user, "k": 10}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(triples(&r), by_hand(&c, &d, user, 40, 10).await, "{r}");

    // The folder removed: the pipeline is gone, the other serves on.
    std::fs::remove_dir_all(root.path().join("feed-b")).unwrap();
    model_info_when(&c, &d, "feed-b", |s, _| s == 404).await;
    let a = recommend(10).await;
    assert_eq!(a.status, 200, "{}", a.text);
}
