//! Kafka ingestion against a real broker (tansu): freshness, item upserts and
//! deletes, malformed messages, SIGKILL and restart, broker outages.
#![cfg(feature = "kafka")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::kafka::{consume_all, wait_applied, Broker};
use crate::common::*;

const EVENTS: &str = "rankd.events";
const ITEMS: &str = "rankd.items";
const USERS: &str = "rankd.users";
const DEAD: &str = "rankd.dead";

fn broker_with_topics() -> Broker {
    let b = Broker::start();
    b.create_topics(&[EVENTS, ITEMS, USERS, DEAD], 3);
    b
}

fn rankd_on(broker: &Broker, state: &std::path::Path) -> Daemon {
    rankd_serving(broker, state, &demo_models())
}

fn rankd_serving(broker: &Broker, state: &std::path::Path, models: &std::path::Path) -> Daemon {
    let bootstrap = broker.bootstrap();
    let state = state.to_str().unwrap().to_string();
    Daemon::start_with(
        models,
        &[
            "--kafka-brokers",
            &bootstrap,
            "--kafka-dead-letter-topic",
            DEAD,
            "--snapshot-dir",
            &state,
            "--snapshot-interval-ms",
            "100",
            // Histories are cut to the newest HISTORY_MAX, so the restart
            // test also checks that the cut survives snapshots.
            "--history-max",
            &HISTORY_MAX.to_string(),
        ],
    )
}

const HISTORY_MAX: usize = 50;

/// Waits until every partition's committed offset has caught up with its
/// applied offset (commits happen once a second, after apply).
async fn wait_committed(c: &reqwest::Client, d: &Daemon, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let r = get_json(c, &d.url("/v1/ingest")).await;
        let parts = r["partitions"].as_array().unwrap();
        let behind: Vec<&Value> = parts
            .iter()
            .filter(|p| {
                p["applied_offset"].as_i64() > Some(0)
                    && p["committed_offset"] != p["applied_offset"]
            })
            .collect();
        if !parts.is_empty() && behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "commits did not catch up with applied offsets: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_connected(c: &reqwest::Client, d: &Daemon, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, body) = get(c, &d.url("/readyz")).await;
        let r: Value = serde_json::from_str(&body).unwrap();
        let state = if want { "connected" } else { "disconnected" };
        if r["kafka"] == state {
            assert_eq!(s, 200, "rankd stays ready whatever the broker does: {body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "kafka never became {state}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn history(c: &reqwest::Client, d: &Daemon, user: u64) -> Vec<u64> {
    let v = get_json(c, &d.url(&format!("/v1/users/{user}"))).await;
    v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn event(user: u64, item: u64) -> String {
    json!({"user_id": user, "item_id": item, "type": "click", "ts_ms": 1764000000000u64})
        .to_string()
}

#[tokio::test]
async fn five_clicks_reshape_the_next_answer_within_200ms() {
    // A latency bound: no other test's daemon beside this one.
    let _alone = alone();
    let broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let d = rankd_on(&broker, state.path());
    let c = Daemon::client();
    wait_connected(&c, &d, true).await;
    let clusters = demo_clusters();
    let groups = demo_cluster_members();
    let producer = broker.producer();
    for (round, cluster) in [3u32, 17, 41].into_iter().enumerate() {
        let user = 700_000 + round as u64;
        let items: Vec<u64> = groups[&cluster]
            .iter()
            .step_by(97)
            .take(5)
            .copied()
            .collect();
        let started = Instant::now();
        for &i in &items {
            producer.send(EVENTS, &user.to_string(), &event(user, i));
        }
        producer.flush();
        // The window starts at the broker's acknowledgement: what the broker
        // takes to acknowledge a produce is not rankd's to control (it is
        // reported beside the result).
        let acked = Instant::now();
        let flushed = acked - started;
        loop {
            let (s, body) = post(
                &c,
                &d.url("/v1/models/demo/recommend"),
                json!({"user_id": user, "k": 10}),
            )
            .await;
            assert_eq!(s, 200, "{body}");
            let top: Vec<u64> = body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_u64().unwrap())
                .collect();
            let same = top.iter().filter(|id| clusters[id] == cluster).count();
            if same >= 8 {
                assert!(
                    top.iter().all(|id| !items.contains(id)),
                    "clicked items are excluded"
                );
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_millis(200),
                "cluster {cluster}: {:?} after the broker acknowledged (produce took {flushed:?}) only {same} of 10 in the cluster",
                acked.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eprintln!(
            "cluster {cluster}: reshaped {:?} after the acknowledgement ({:?} after the first produce)",
            acked.elapsed(),
            started.elapsed()
        );
    }
    let metrics = metrics(&c, &d).await;
    assert!(
        metrics.contains("rankd_ingest_updates_applied_total{topic=\"rankd.events\"} 15"),
        "{metrics}"
    );
    // Both stages saw every message; rankd's own share (fetch to visible)
    // is far below the broker's acknowledgement time.
    for stage in ["end_to_end", "rankd"] {
        assert_eq!(
            sample(
                &metrics,
                &format!("rankd_ingest_freshness_seconds_count{{stage=\"{stage}\"}}")
            ),
            Some(15.0),
            "{metrics}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            "rankd_ingest_freshness_seconds_bucket{stage=\"rankd\",le=\"0.1\"}"
        ),
        Some(15.0),
        "every update visible within 100 ms of its fetch: {metrics}"
    );
}

#[tokio::test]
async fn item_upserts_appear_where_their_embedding_puts_them_and_deletes_remove_them() {
    let broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let d = rankd_on(&broker, state.path());
    let c = Daemon::client();
    wait_connected(&c, &d, true).await;
    let groups = demo_cluster_members();
    let table = rankd::internals::ItemTable::load(
        &demo_models().join("catalogues/demo/items.safetensors"),
        64,
    )
    .unwrap();
    // A new item pointing where cluster 5's items point, but longer: it must
    // rank first for a cluster-5 user.
    let members = &groups[&5];
    let mut centre = vec![0f64; 64];
    for &id in members {
        for (c, e) in centre
            .iter_mut()
            .zip(table.embedding(table.row_of(id).unwrap()))
        {
            *c += *e as f64 / members.len() as f64;
        }
    }
    let new_item = 500_001u64;
    let embedding: Vec<f64> = centre.iter().map(|x| x * 3.0).collect();
    let user = 42_424u64;
    let (s, _) = post(
        &c,
        &d.url(&format!("/v1/users/{user}")),
        json!({"history": members[..5]}),
    )
    .await;
    assert_eq!(s, 200);
    let producer = broker.producer();
    producer.send(
        ITEMS,
        &new_item.to_string(),
        &json!({"item_id": new_item, "embedding": embedding, "version": 1}).to_string(),
    );
    producer.flush();
    wait_applied(&c, &d, ITEMS, 1, Duration::from_secs(10)).await;
    let top = |body: &Value| -> Vec<u64> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect()
    };
    let (_, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": user, "k": 5}),
    )
    .await;
    assert_eq!(top(&body)[0], new_item, "{body}");
    let (_, m) = get(&c, &d.url("/v1/models/demo")).await;
    assert!(m.contains("\"items\":100001"), "{m}");
    // The ranker sees the same catalogue.
    let (s, body) = post(
        &c,
        &d.url("/v1/models/demo-ranker/score"),
        json!({"user_id": user, "items": [new_item]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body["scores"][0].as_f64().unwrap() > 0.9, "{body}");

    producer.send(
        ITEMS,
        &new_item.to_string(),
        &json!({"item_id": new_item, "deleted": true, "version": 2}).to_string(),
    );
    // A replay of the old upsert must not resurrect it.
    producer.send(
        ITEMS,
        &new_item.to_string(),
        &json!({"item_id": new_item, "embedding": embedding, "version": 1}).to_string(),
    );
    producer.flush();
    wait_applied(&c, &d, ITEMS, 3, Duration::from_secs(10)).await;
    let (_, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": user, "k": 50}),
    )
    .await;
    assert!(!top(&body).contains(&new_item), "{body}");
    let metrics = metrics(&c, &d).await;
    assert!(metrics.contains("rankd_ingest_stale_total 1"), "{metrics}");
}

/// With two catalogues, an item message reaches the catalogue it names
/// alone; one that names none, or an unknown one, is dead-lettered with
/// its reason and changes nothing.
#[tokio::test]
async fn item_messages_reach_the_catalogue_they_name() {
    let broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let repo = two_catalogue_repo();
    // `videos` has attributes (every item: category 2, in_stock 1).
    let rows = rankd::internals::ItemTable::load(
        &repo.path().join("catalogues/videos/items.safetensors"),
        64,
    )
    .unwrap()
    .rows();
    write_attributes(
        &repo.path().join("catalogues/videos/attributes.safetensors"),
        &[("category", vec![2; rows]), ("in_stock", vec![1; rows])],
    );
    let d = rankd_serving(&broker, state.path(), repo.path());
    let c = Daemon::client();
    wait_connected(&c, &d, true).await;
    let item = async |catalogue: &str, id: u64| {
        get_json(
            &c,
            &d.url(&format!("/v1/catalogues/{catalogue}/items/{id}")),
        )
        .await
    };
    let before = (item("creators", 7).await, item("videos", 8).await);
    let producer = broker.producer();
    for (key, msg) in [
        (
            "7",
            json!({"catalogue": "videos", "item_id": 7, "embedding": vec![0.5; 64], "version": 1, "attributes": {"in_stock": 0}}),
        ),
        (
            "7",
            json!({"catalogue": "creators", "item_id": 7, "deleted": true, "version": 1}),
        ),
        (
            "8",
            json!({"item_id": 8, "embedding": vec![0.5; 64], "version": 1}),
        ),
        (
            "8",
            json!({"catalogue": "music", "item_id": 8, "deleted": true, "version": 1}),
        ),
        (
            "9",
            json!({"catalogue": "creators", "item_id": 9, "embedding": vec![0.5; 64], "version": 1, "attributes": {"in_stock": 1}}),
        ),
    ] {
        producer.send(ITEMS, key, &msg.to_string());
    }
    producer.flush();
    wait_applied(&c, &d, ITEMS, 5, Duration::from_secs(10)).await;
    let videos7 = item("videos", 7).await;
    assert_eq!(videos7["embedding"], json!(vec![0.5; 64]), "{videos7}");
    assert_eq!(
        videos7["attributes"],
        json!({"category": 2, "in_stock": 0}),
        "the message's attribute is set, the others kept: {videos7}"
    );
    assert_eq!(videos7["deleted"], false, "{videos7}");
    let creators7 = item("creators", 7).await;
    assert_eq!(creators7["deleted"], true, "{creators7}");
    assert_eq!(creators7["embedding"], before.0["embedding"], "{creators7}");
    assert_eq!(item("videos", 8).await, before.1);
    assert_eq!(
        item("creators", 9).await["version"],
        0,
        "a message with an unknown attribute changes nothing"
    );
    let dead = consume_all(&broker, DEAD, 3, Duration::from_secs(15));
    let mut reasons: Vec<&str> = dead.iter().map(|(r, _)| r.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            "catalogue_required",
            "unknown_attribute",
            "unknown_catalogue"
        ],
        "{dead:?}"
    );
}

#[tokio::test]
async fn malformed_messages_are_counted_dead_lettered_and_skipped() {
    let broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let d = rankd_on(&broker, state.path());
    let c = Daemon::client();
    wait_connected(&c, &d, true).await;
    let producer = broker.producer();
    let bad: Vec<(&str, String, &str)> = vec![
        (EVENTS, "{not json".into(), "bad_json"),
        (
            EVENTS,
            json!({"user_id": "x", "item_id": 1, "type": "click"}).to_string(),
            "wrong_type",
        ),
        (
            ITEMS,
            json!({"item_id": 9, "embedding": [1.0, 2.0], "version": 3}).to_string(),
            "wrong_length",
        ),
        (
            ITEMS,
            format!(
                "{{\"item_id\": 9, \"embedding\": [{}], \"version\": 3}}",
                vec!["1e39"; 64].join(",")
            ),
            "non_finite",
        ),
        (
            ITEMS,
            "{\"item_id\": 9, \"embedding\": [NaN], \"version\": 3}".into(),
            "bad_json",
        ),
        (
            USERS,
            json!({"user_id": 1, "features": [1.0], "version": 1}).to_string(),
            "wrong_length",
        ),
        (
            USERS,
            json!({"user_id": 1, "features": "abc", "version": 1}).to_string(),
            "wrong_type",
        ),
    ];
    let mut expected: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut rng = Rng::new(11);
    let mut sent_events = 0;
    for round in 0..10 {
        for u in 0..20u64 {
            let user = 10_000 + u;
            let item = 1 + rng.below(100_000);
            producer.send(EVENTS, &user.to_string(), &event(user, item));
            expected.entry(user).or_default().push(item);
            sent_events += 1;
        }
        // An event type rankd does not count: valid, ignored.
        producer.send(
            EVENTS,
            "1",
            &json!({"user_id": 1, "item_id": 5, "type": "impression"}).to_string(),
        );
        sent_events += 1;
        let (topic, payload, _) = &bad[round % bad.len()];
        producer.send(topic, "k", payload);
        if *topic == EVENTS {
            sent_events += 1;
        }
    }
    let features: Vec<f32> = (0..16).map(|i| i as f32).collect();
    producer.send(
        USERS,
        "10000",
        &json!({"user_id": 10_000, "features": features, "version": 1}).to_string(),
    );
    producer.flush();
    wait_applied(&c, &d, EVENTS, sent_events, Duration::from_secs(15)).await;
    wait_applied(&c, &d, USERS, 3, Duration::from_secs(15)).await;
    wait_committed(&c, &d, Duration::from_secs(5)).await;
    for (user, items) in &expected {
        assert_eq!(&history(&c, &d, *user).await, items, "user {user}");
    }
    let u = get_json(&c, &d.url("/v1/users/10000")).await;
    assert_eq!(u["features"].as_array().unwrap().len(), 16);
    let metrics = metrics(&c, &d).await;
    let count = |reason: &str| -> u64 {
        sample(
            &metrics,
            &format!("rankd_ingest_rejected_total{{reason=\"{reason}\"}}"),
        )
        .map_or(0, |v| v as u64)
    };
    let mut want: HashMap<&str, u64> = HashMap::new();
    for round in 0..10 {
        *want.entry(bad[round % bad.len()].2).or_default() += 1;
    }
    for (reason, n) in &want {
        assert_eq!(count(reason), *n, "reason {reason}\n{metrics}");
    }
    assert!(
        metrics.contains("rankd_ingest_ignored_total{reason=\"event_type\"} 10"),
        "{metrics}"
    );
    // Every invalid message reached the dead-letter topic, with its reason.
    let dead = consume_all(&broker, DEAD, 10, Duration::from_secs(15));
    assert_eq!(dead.len(), 10, "{dead:?}");
    assert!(
        dead.iter()
            .all(|(reason, _)| want.contains_key(reason.as_str())),
        "{dead:?}"
    );
    assert!(
        d.log().contains("skipping an invalid update message"),
        "{}",
        d.log()
    );
}

#[tokio::test]
async fn sigkill_and_restart_neither_lose_nor_double_apply() {
    let broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let c = Daemon::client();
    let producer = broker.producer();
    let mut rng = Rng::new(77);
    let mut expected: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut send = |n: usize, expected: &mut HashMap<u64, Vec<u64>>| {
        for _ in 0..n {
            let user = 20_000 + rng.below(60);
            let item = 1 + rng.below(100_000);
            producer.send(EVENTS, &user.to_string(), &event(user, item));
            expected.entry(user).or_default().push(item);
        }
        producer.flush();
    };
    let mut first = rankd_on(&broker, state.path());
    wait_connected(&c, &first, true).await;
    send(1500, &mut expected);
    // Let it apply part of the stream and snapshot at least once, then kill it
    // while more arrives.
    wait_applied(&c, &first, EVENTS, 500, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    send(500, &mut expected);
    assert!(
        first.signal_and_wait("KILL", Duration::from_secs(2)),
        "rankd did not die on SIGKILL"
    );
    let snapshots = std::fs::read_dir(state.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("snapshot-")
        })
        .count();
    assert!(snapshots > 0, "no snapshot was written before the kill");
    send(1000, &mut expected);
    let second = rankd_on(&broker, state.path());
    assert!(
        second.log().contains("loading the feature-state snapshot"),
        "{}",
        second.log()
    );
    wait_applied(&c, &second, EVENTS, 3000, Duration::from_secs(30)).await;
    for (user, items) in &expected {
        let want: Vec<u64> = items[items.len().saturating_sub(HISTORY_MAX)..].to_vec();
        assert_eq!(history(&c, &second, *user).await, want, "user {user}");
    }
    drop(first);
}

#[tokio::test]
async fn a_broker_outage_keeps_rankd_serving_and_it_catches_up() {
    let mut broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let d = rankd_on(&broker, state.path());
    let c = Daemon::client();
    wait_connected(&c, &d, true).await;
    let user = 31_337u64;
    {
        let p = broker.producer();
        p.send(EVENTS, &user.to_string(), &event(user, 11));
        p.flush();
    }
    wait_applied(&c, &d, EVENTS, 1, Duration::from_secs(10)).await;
    broker.stop();
    wait_connected(&c, &d, false).await;
    for _ in 0..20 {
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/recommend"),
            json!({"user_id": user, "k": 5}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let metrics = metrics(&c, &d).await;
    assert!(metrics.contains("rankd_kafka_connected 0"), "{metrics}");
    broker.restart();
    wait_connected(&c, &d, true).await;
    {
        let p = broker.producer();
        for item in [12, 13, 14] {
            p.send(EVENTS, &user.to_string(), &event(user, item));
        }
        p.flush();
    }
    wait_applied(&c, &d, EVENTS, 4, Duration::from_secs(30)).await;
    assert_eq!(history(&c, &d, user).await, vec![11, 12, 13, 14]);
}

/// The loop the anchors leave open: rankd serves a list, the click on it
/// arrives on the events topic, and rankd credits the version that served it.
#[tokio::test]
async fn clicks_on_the_events_topic_are_hits_for_the_version_that_served_the_list() {
    let broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let d = rankd_on(&broker, state.path());
    let c = Daemon::client();
    let mut lists = Vec::new();
    for user in 0..60u64 {
        // Users with a history: the model serves them (a cold-start list
        // is not the version's and earns it no impression).
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/users/{}", 5_000 + user)),
            json!({"history": spread_history(5_000 + user, 5)}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/recommend"),
            json!({"user_id": 5_000 + user, "k": 8}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let items: Vec<u64> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect();
        lists.push((5_000 + user, items));
    }
    // A third of the users click their list's fifth item; a third click an
    // item that was not in their list; the rest do nothing.
    let producer = broker.producer();
    let mut sent = 0i64;
    let mut hits = 0u64;
    for (n, (user, items)) in lists.iter().enumerate() {
        let item = match n % 3 {
            0 => {
                hits += 1;
                items[4]
            }
            1 => (1..).find(|i| !items.contains(i)).unwrap(),
            _ => continue,
        };
        producer.send(EVENTS, &user.to_string(), &event(*user, item));
        sent += 1;
    }
    producer.flush();
    wait_applied(&c, &d, EVENTS, sent, Duration::from_secs(30)).await;
    let info = get_json(&c, &d.url("/v1/models/demo")).await;
    let online = &info["versions"][0]["online"];
    assert_eq!(info["versions"][0]["version"], 1, "{info}");
    assert_eq!(online["impressions"], 60, "{info}");
    assert_eq!(online["hits"], hits, "{info}");
    let metrics = get(&c, &d.url("/metrics")).await.1;
    let rank5 =
        format!("rankd_online_hit_rank_bucket{{model=\"demo\",version=\"1\",le=\"5\"}} {hits}");
    assert!(metrics.contains(&rank5), "every hit at rank 5: {metrics}");
}

#[tokio::test]
async fn popularity_follows_the_clicks_on_the_events_topic_and_survives_a_restart() {
    let broker = broker_with_topics();
    let state = tempfile::tempdir().unwrap();
    let mut d = rankd_on(&broker, state.path());
    let c = Daemon::client();
    // Clicks: item 777 by 9 users, 555 by 6, 333 by 3.
    let producer = broker.producer();
    let mut sent = 0i64;
    for (item, clicks) in [(777u64, 9u64), (555, 6), (333, 3)] {
        for u in 0..clicks {
            let user = 40_000 + item * 10 + u;
            producer.send(EVENTS, &user.to_string(), &event(user, item));
            sent += 1;
        }
    }
    producer.flush();
    wait_applied(&c, &d, EVENTS, sent, Duration::from_secs(30)).await;
    // A new user's answer follows them within moments (the list is rebuilt
    // off the request path).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/recommend"),
            json!({"user_id": 1_234_567, "k": 3}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        if ids(&body) == vec![777, 555, 333] {
            assert_eq!(body["cold_start"], json!(true), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "popularity not followed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        d.signal_and_wait("TERM", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    let d = rankd_on(&broker, state.path());
    let (_, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": 1_234_568, "k": 3, "exclude": [555]}),
    )
    .await;
    assert_eq!(ids(&body)[..2], [777, 333], "after a restart: {body}");
}
