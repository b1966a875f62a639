//! The per-user query cache through the daemon: a daemon that keeps users'
//! query vectors must answer exactly what one without the cache answers,
//! through repeated asks, clicks, writes to items a history reads, new
//! items, and a new version, while its metrics show the tower skipped for
//! the users whose state did not change; and it stays within its memory
//! bound.

use std::path::Path;

use serde_json::{json, Value};

use crate::common::parity::{close, floats};
use crate::common::*;

const ADMIN: &str = "admin-token-query-cache";

/// A daemon with the query cache (`bytes`, or the default) and one
/// without, on the same repository.
fn pair(root: &Path, bytes: Option<&str>, extra: &[&str]) -> (Daemon, Daemon) {
    let mut cached: Vec<&str> = extra.to_vec();
    if let Some(b) = bytes {
        cached.extend(["--query-cache-bytes", b]);
    }
    let mut plain: Vec<&str> = extra.to_vec();
    plain.extend(["--query-cache-bytes", "0"]);
    (
        Daemon::start_with(root, &cached),
        Daemon::start_with(root, &plain),
    )
}

fn counter(m: &str, name: &str, model: &str) -> f64 {
    sample(m, &format!("{name}{{model=\"{model}\"}}")).unwrap_or(0.0)
}

/// (hits, misses) of `model` so far.
async fn hits_misses(c: &reqwest::Client, d: &Daemon, model: &str) -> (f64, f64) {
    let m = metrics(c, d).await;
    (
        counter(&m, "rankd_query_cache_hits_total", model),
        counter(&m, "rankd_query_cache_misses_total", model),
    )
}

/// Both daemons get the same write.
async fn write_both(c: &reqwest::Client, ds: [&Daemon; 2], path: &str, body: Value) {
    for d in ds {
        let (s, b) = post(c, &d.url(path), body.clone()).await;
        assert_eq!(s, 200, "{path}: {b}");
    }
}

/// Each user's recommend and score answers from `d`.
async fn answers(
    c: &reqwest::Client,
    d: &Daemon,
    model: &str,
    users: &[u64],
    candidates: &[u64],
) -> Vec<(Value, Value)> {
    let mut out = Vec::new();
    for &u in users {
        let (s, rec) = post(
            c,
            &d.url(&format!("/v1/models/{model}/recommend")),
            json!({"user_id": u, "k": 10}),
        )
        .await;
        assert_eq!(s, 200, "recommend for {u}: {rec}");
        let (s, score) = post(
            c,
            &d.url(&format!("/v1/models/{model}/score")),
            json!({"user_id": u, "items": candidates}),
        )
        .await;
        assert_eq!(s, 200, "score for {u}: {score}");
        out.push((rec, score));
    }
    out
}

/// The cached daemon's answers are the plain daemon's: the same ids in the
/// same order, scores to float noise (a tower run in another batch).
fn assert_same(cached: &[(Value, Value)], plain: &[(Value, Value)], users: &[u64], when: &str) {
    for ((u, (rc, sc)), (rp, sp)) in users.iter().zip(cached).zip(plain) {
        assert_eq!(ids(rc), ids(rp), "{when}: user {u}: {rc} vs {rp}");
        let pairs = floats(&json!(rc["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["score"].clone())
            .collect::<Vec<_>>()))
        .into_iter()
        .zip(floats(&json!(rp["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["score"].clone())
            .collect::<Vec<_>>())))
        .chain(floats(&sc["scores"]).into_iter().zip(floats(&sp["scores"])));
        for (a, b) in pairs {
            assert!(close(a, b), "{when}: user {u}: score {a} vs {b}");
        }
    }
}

#[tokio::test]
async fn a_cached_two_tower_answers_as_an_uncached_one_through_clicks_writes_and_versions() {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    let admin = root.path().join("admin.tokens");
    std::fs::write(&admin, format!("{ADMIN}\n")).unwrap();
    let (cached, plain) = pair(
        root.path(),
        None,
        &["--admin-token-file", admin.to_str().unwrap()],
    );
    let c = Daemon::client();
    let users: Vec<u64> = (1..=12).collect();
    for d in [&cached, &plain] {
        seed_histories(
            &c,
            d,
            &users
                .iter()
                .map(|&u| (u, spread_history(u, 20)))
                .collect::<Vec<_>>(),
        )
        .await;
    }
    let candidates = [11u64, 222, 3333, 44444];
    let n = users.len() as f64;

    // The first asks run the tower; the same asks again do not.
    let first = answers(&c, &cached, "demo", &users, &candidates).await;
    assert_same(
        &first,
        &answers(&c, &plain, "demo", &users, &candidates).await,
        &users,
        "first asks",
    );
    assert_eq!(hits_misses(&c, &cached, "demo").await, (n, n));
    let again = answers(&c, &cached, "demo", &users, &candidates).await;
    assert_same(&again, &first, &users, "asked again");
    assert_eq!(hits_misses(&c, &cached, "demo").await, (3.0 * n, n));
    // The plain daemon keeps nothing.
    assert_eq!(hits_misses(&c, &plain, "demo").await, (0.0, 0.0));
    let m = metrics(&c, &cached).await;
    let bytes = sample(&m, "rankd_query_cache_bytes").unwrap();
    assert!(bytes >= n * 64.0 * 4.0, "{bytes} bytes for {n} users");

    // A click of user 3; a new embedding for an item in user 5's history;
    // a new item that is in no history.
    let mut h3 = spread_history(3, 20);
    h3.push(77_777);
    write_both(&c, [&cached, &plain], "/v1/users/3", json!({"history": h3})).await;
    let in_h5 = spread_history(5, 20)[19];
    write_both(
        &c,
        [&cached, &plain],
        &format!("/v1/items/{in_h5}"),
        json!({"embedding": vec![3.0f32; 64]}),
    )
    .await;
    write_both(
        &c,
        [&cached, &plain],
        "/v1/items/500001",
        json!({"embedding": vec![0.5f32; 64]}),
    )
    .await;
    let after = answers(&c, &cached, "demo", &users, &candidates).await;
    assert_same(
        &after,
        &answers(&c, &plain, "demo", &users, &candidates).await,
        &users,
        "after a click and item writes",
    );
    // The writes changed what users 3 and 5 get: a kept vector would have
    // answered as before.
    for u in [3usize, 5] {
        assert_ne!(
            first[u - 1].1["scores"],
            after[u - 1].1["scores"],
            "user {u}'s scores did not change"
        );
    }
    // User 3 and the users whose history holds the rewritten item ran the
    // tower again (their recommend; their score then hit); everyone else
    // hit twice.
    let changed = users
        .iter()
        .filter(|&&u| u == 3 || spread_history(u, 20).contains(&in_h5))
        .count() as f64;
    assert_eq!(
        hits_misses(&c, &cached, "demo").await,
        (3.0 * n + 2.0 * n - changed, n + changed)
    );

    // A new version: its first asks run its own tower.
    derived_version(root.path(), "demo", 2, "demo", |t| t);
    let (s, body) = c
        .post(cached.url("/v1/admin/models/demo/load"))
        .bearer_auth(ADMIN)
        .json(&json!({"version": 2}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(s, 200, "{:?}", body.text().await);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let info = get_json(&c, &cached.url("/v1/models/demo")).await;
        if info["traffic"] == json!({"2": 100}) {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "version 2 never took the traffic: {info}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (hits, misses) = hits_misses(&c, &cached, "demo").await;
    let v2 = answers(&c, &cached, "demo", &users, &candidates).await;
    assert!(v2.iter().all(|(r, _)| r["version"] == 2), "{:?}", v2[0].0);
    assert_same(&v2, &after, &users, "version 2 (the same weights)");
    assert_eq!(
        hits_misses(&c, &cached, "demo").await,
        (hits + n, misses + n)
    );
}

#[tokio::test]
async fn the_cache_stays_within_its_bytes_and_still_answers_right() {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    // Room for two users' vectors (64 floats and the bookkeeping).
    let (cached, plain) = pair(root.path(), Some("1000"), &[]);
    let c = Daemon::client();
    let users: Vec<u64> = (1..=10).collect();
    for d in [&cached, &plain] {
        seed_histories(
            &c,
            d,
            &users
                .iter()
                .map(|&u| (u, spread_history(u, 10)))
                .collect::<Vec<_>>(),
        )
        .await;
    }
    for round in 0..2 {
        let got = answers(&c, &cached, "demo", &users, &[5, 6]).await;
        let want = answers(&c, &plain, "demo", &users, &[5, 6]).await;
        assert_same(&got, &want, &users, &format!("round {round}"));
        let m = metrics(&c, &cached).await;
        let bytes = sample(&m, "rankd_query_cache_bytes").unwrap();
        assert!(bytes > 0.0 && bytes <= 1000.0, "{bytes} bytes");
    }
    // Ten users cycling through room for two: each recommend misses (its
    // vector was evicted by the users after it), each score right after it
    // hits.
    assert_eq!(hits_misses(&c, &cached, "demo").await, (20.0, 20.0));
}

#[tokio::test]
async fn a_cached_sasrec_answers_as_an_uncached_one_after_clicks_and_item_writes() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("sasrec/1");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = repo_root().join("tests/fixtures/sasrec/sasrec");
    std::fs::copy(fixture.join("model.pth"), dir.join("model.pth")).unwrap();
    std::fs::write(
        dir.join("model.toml"),
        "kind = \"sasrec\"\ndim = 16\nhistory_len = 8\nblocks = 2\nheads = 2\nweights = \"model.pth\"\nitems = \"item_emb\"\n",
    )
    .unwrap();
    let (cached, plain) = pair(root.path(), None, &[]);
    let c = Daemon::client();
    let users: Vec<u64> = (1..=6).collect();
    let histories: Vec<(u64, Vec<u64>)> = users
        .iter()
        .map(|&u| (u, (0..u + 3).map(|i| 1 + (u * 7 + i * 3) % 40).collect()))
        .collect();
    for d in [&cached, &plain] {
        seed_histories(&c, d, &histories).await;
    }
    let candidates = [1u64, 2, 3, 40];
    let n = users.len() as f64;
    let first = answers(&c, &cached, "sasrec", &users, &candidates).await;
    assert_same(
        &first,
        &answers(&c, &plain, "sasrec", &users, &candidates).await,
        &users,
        "first asks",
    );
    assert_same(
        &answers(&c, &cached, "sasrec", &users, &candidates).await,
        &first,
        &users,
        "asked again",
    );
    assert_eq!(hits_misses(&c, &cached, "sasrec").await, (3.0 * n, n));
    // The newest item of user 2's history gets a new embedding: it enters
    // the sequence, so user 2's query changes.
    let newest = histories[1].1.last().copied().unwrap();
    write_both(
        &c,
        [&cached, &plain],
        &format!("/v1/items/{newest}"),
        json!({"embedding": vec![0.7f32; 16]}),
    )
    .await;
    let after = answers(&c, &cached, "sasrec", &users, &candidates).await;
    assert_same(
        &after,
        &answers(&c, &plain, "sasrec", &users, &candidates).await,
        &users,
        "after an item write",
    );
    assert_ne!(first[1].1["scores"], after[1].1["scores"]);
}
