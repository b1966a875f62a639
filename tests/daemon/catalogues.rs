//! Named catalogues end to end: two item tables of one dimension side by
//! side, writes that name their catalogue over HTTP and the socket and reach
//! it alone, `GET /v1/catalogues`, the history window read against each
//! model's own catalogue, and state written by the release before named
//! catalogues restoring.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::frame::{connect, read_frame, request_frame, send};
use crate::common::*;

fn embedding(v: &Value) -> Vec<f64> {
    v["embedding"]
        .as_array()
        .unwrap_or_else(|| panic!("no embedding in {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// With two catalogues of one dimension, a write names its catalogue and
/// reaches it alone: the embedding, a new id and a delete all stay in the
/// catalogue written. (Before named catalogues, writing item 7 wrote it
/// into every table of the dimension.)
#[tokio::test]
async fn writes_reach_the_named_catalogue_alone() {
    let repo = two_catalogue_repo();
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();

    let list = get_json(&c, &d.url("/v1/catalogues")).await;
    let cats = list["catalogues"].as_array().unwrap();
    let names: Vec<&str> = cats.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["creators", "videos"], "{list}");
    for (cat, model) in cats.iter().zip(["creators@1", "videos@1"]) {
        assert_eq!(cat["dim"], 64, "{cat}");
        assert_eq!(cat["models"], json!([model]), "{cat}");
        assert_eq!(cat["attributes"], json!([]), "{cat}");
        assert!(cat["live_rows"].as_u64().unwrap() > 100, "{cat}");
        assert_eq!(cat["live_rows"], cat["rows"], "{cat}");
    }
    let before = get_json(&c, &d.url("/v1/catalogues/creators/items/7")).await;

    let (s, w) = post(
        &c,
        &d.url("/v1/catalogues/videos/items/7"),
        json!({"embedding": vec![0.5; 64]}),
    )
    .await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(w["catalogue"], "videos", "{w}");
    assert_eq!(w["applied"], true, "{w}");
    let videos7 = get_json(&c, &d.url("/v1/catalogues/videos/items/7")).await;
    assert_eq!(embedding(&videos7), vec![0.5; 64], "{videos7}");
    assert_eq!(videos7["version"], w["version"], "{videos7}");
    let creators7 = get_json(&c, &d.url("/v1/catalogues/creators/items/7")).await;
    assert_eq!(
        creators7, before,
        "the other catalogue's item 7 is untouched"
    );

    // A new id grows the catalogue written, and only that one serves it.
    let (s, w) = post(
        &c,
        &d.url("/v1/catalogues/videos/items/990001"),
        json!({"embedding": vec![0.25; 64], "version": 4}),
    )
    .await;
    assert_eq!((s, w["version"].clone()), (200, json!(4)), "{w}");
    let (s, _) = post(
        &c,
        &d.url("/v1/models/videos/score"),
        json!({"user_id": 1, "items": [990001]}),
    )
    .await;
    assert_eq!(s, 200);
    let a = post_json(
        &c,
        &d.url("/v1/models/creators/score"),
        &json!({"user_id": 1, "items": [990001]}),
    )
    .await;
    assert_http_error(
        "catalogues",
        &a,
        422,
        "invalid",
        &["unknown item id 990001"],
    );
    let a = request(
        &c,
        reqwest::Method::GET,
        &d.url("/v1/catalogues/creators/items/990001"),
        None,
    )
    .await;
    assert_http_error(
        "catalogues",
        &a,
        404,
        "not_found",
        &["990001", "'creators'"],
    );
    let list = get_json(&c, &d.url("/v1/catalogues")).await;
    let rows = |i: usize| list["catalogues"][i]["live_rows"].as_u64().unwrap();
    assert_eq!(rows(1), rows(0) + 1, "{list}");

    // A delete in one leaves the other's row live.
    let (s, w) = post(
        &c,
        &d.url("/v1/catalogues/creators/items/7"),
        json!({"deleted": true}),
    )
    .await;
    assert_eq!(s, 200, "{w}");
    let creators7 = get_json(&c, &d.url("/v1/catalogues/creators/items/7")).await;
    assert_eq!(creators7["deleted"], true, "{creators7}");
    let videos7 = get_json(&c, &d.url("/v1/catalogues/videos/items/7")).await;
    assert_eq!(videos7["deleted"], false, "{videos7}");

    // A write that names no catalogue, or an unknown one, or the wrong
    // dimension, is refused, naming what is loaded or expected.
    let a = post_json(
        &c,
        &d.url("/v1/items/7"),
        &json!({"embedding": vec![1.0; 64]}),
    )
    .await;
    assert_http_error(
        "catalogues",
        &a,
        422,
        "invalid",
        &["2 catalogues are loaded (creators, videos)"],
    );
    let a = post_json(
        &c,
        &d.url("/v1/catalogues/music/items/7"),
        &json!({"embedding": vec![1.0; 64]}),
    )
    .await;
    assert_http_error(
        "catalogues",
        &a,
        404,
        "not_found",
        &["unknown catalogue 'music'", "creators, videos"],
    );
    let a = post_json(
        &c,
        &d.url("/v1/catalogues/videos/items/7"),
        &json!({"embedding": [1.0, 2.0, 3.0]}),
    )
    .await;
    assert_http_error(
        "catalogues",
        &a,
        422,
        "invalid",
        &["must have 64 values", "'videos'", "got 3"],
    );
    let a = request(
        &c,
        reqwest::Method::GET,
        &d.url("/v1/catalogues/videos/items/x"),
        None,
    )
    .await;
    assert_http_error("catalogues", &a, 422, "invalid", &["item_id"]);
}

/// The socket's item ops name their catalogue too (`upsert_item`,
/// `get_item`), `catalogues` lists them, and a request field the daemon
/// does not know is refused, naming it, instead of ignored.
#[tokio::test]
async fn socket_item_ops_name_their_catalogue_and_unknown_fields_are_refused() {
    let repo = two_catalogue_repo();
    let d = Daemon::start_with(repo.path(), &[]);
    let mut s = connect(&d.uds).await;
    let mut ask = async |v: Value| -> Value {
        send(&mut s, &request_frame(&v), "request").await;
        read_frame(&mut s, &v.to_string()).await
    };
    let r = ask(json!({"id": 1, "op": "upsert_item", "catalogue": "creators", "item_id": 12, "embedding": vec![2.0; 64]})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["catalogue"], "creators", "{r}");
    let r = ask(json!({"id": 2, "op": "get_item", "catalogue": "creators", "item_id": 12})).await;
    assert_eq!(embedding(&r["result"]), vec![2.0; 64], "{r}");
    let r = ask(json!({"id": 3, "op": "get_item", "catalogue": "videos", "item_id": 12})).await;
    assert_ne!(embedding(&r["result"]), vec![2.0; 64], "{r}");
    let r = ask(json!({"id": 4, "op": "catalogues"})).await;
    assert_eq!(
        r["result"]["catalogues"].as_array().unwrap().len(),
        2,
        "{r}"
    );
    let r =
        ask(json!({"id": 5, "op": "upsert_item", "item_id": 12, "embedding": vec![2.0; 64]})).await;
    assert_socket_error(&r, 5, &["invalid"], "unnamed write");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(creators, videos)"),
        "{r}"
    );
    let r = ask(json!({"id": 6, "op": "get_item", "item_id": 12})).await;
    let m = assert_socket_error(&r, 6, &["invalid"], "get_item without catalogue");
    assert!(m.contains("`catalogue` is required"), "{m}");
    let r = ask(json!({"id": 7, "op": "recommend", "model": "videos", "user_id": 1, "k": 3, "colour": "red"})).await;
    let m = assert_socket_error(&r, 7, &["invalid"], "unknown field");
    assert!(m.contains("unknown field `colour`"), "{m}");
    // A field another op takes is refused too, not ignored.
    let r = ask(json!({"id": 9, "op": "score", "model": "videos", "user_id": 1, "items": [1], "filter": {"a": 1}})).await;
    let m = assert_socket_error(&r, 9, &["invalid"], "filter on score");
    assert!(m.contains("op score does not take `filter`"), "{m}");
    let r = ask(json!({"id": 10, "op": "upsert_user", "user_id": 1, "catalogue": "videos"})).await;
    let m = assert_socket_error(&r, 10, &["invalid"], "catalogue on upsert_user");
    assert!(m.contains("does not take `catalogue`"), "{m}");
    // The connection goes on serving after the refusals.
    let r = ask(json!({"id": 8, "op": "recommend", "model": "videos", "user_id": 1, "k": 3})).await;
    assert_eq!(r["ok"], true, "{r}");
}

/// A history is one list of item ids; a model reads the newest
/// `history_len` of them and skips the ids its catalogue lacks (the window
/// is counted before the skip, docs/models.md).
#[tokio::test]
async fn the_history_window_is_counted_before_ids_of_other_catalogues_are_skipped() {
    let repo = two_catalogue_repo();
    // `videos` reads the newest 2 items.
    let toml = repo.path().join("videos/1/model.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, text.replace("history_len = 50", "history_len = 2")).unwrap();
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();
    // Two items only `creators` holds.
    for id in [880001u64, 880002] {
        let (s, w) = post(
            &c,
            &d.url(&format!("/v1/catalogues/creators/items/{id}")),
            json!({"embedding": vec![0.1; 64]}),
        )
        .await;
        assert_eq!(s, 200, "{w}");
    }
    let histories = [
        (1u64, vec![3u64, 40, 880001, 880002]),
        (2, vec![880001, 880002]),
        (3, vec![3, 40]),
    ];
    for (user, h) in &histories {
        let (s, w) = post(
            &c,
            &d.url(&format!("/v1/users/{user}")),
            json!({"history": h}),
        )
        .await;
        assert_eq!(s, 200, "{w}");
    }
    let mut answers = Vec::new();
    for (user, _) in &histories {
        let (s, r) = post(
            &c,
            &d.url("/v1/models/videos/recommend"),
            json!({"user_id": user, "k": 20, "exclude": [3, 40]}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        answers.push(r["items"].clone());
    }
    assert_eq!(
        answers[0], answers[1],
        "the window [880001, 880002] holds no item of `videos`: user 1 reads what user 2 reads"
    );
    assert_ne!(
        answers[0], answers[2],
        "had the window been counted after the skip, user 1 would read [3, 40] as user 3 does"
    );
}

/// A snapshot and write-ahead log written by rankd 0.1 (items without a
/// catalogue) restore into the demo catalogue; the state is then written
/// in today's format and restores again.
#[tokio::test]
async fn state_written_before_named_catalogues_restores() {
    let state = tempfile::tempdir().unwrap();
    let fixture = repo_root().join("tests/fixtures/state-0.1");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), state.path().join(f.file_name())).unwrap();
    }
    let dir = state.path().to_str().unwrap().to_string();
    let args = ["--snapshot-dir", &dir, "--snapshot-interval-ms", "600000"];
    let c = client();
    let check = async |d: &Daemon, when: &str| {
        let item =
            async |id: u64| get_json(&c, &d.url(&format!("/v1/catalogues/demo/items/{id}"))).await;
        let i5 = item(5).await;
        assert_eq!(
            (embedding(&i5), &i5["version"]),
            (vec![0.5; 64], &json!(1)),
            "{when}: {i5}"
        );
        let new = item(900001).await;
        assert_eq!(
            (embedding(&new), &new["version"]),
            (vec![0.25; 64], &json!(3)),
            "{when}: {new}"
        );
        let i7 = item(7).await;
        assert_eq!(i7["deleted"], true, "{when}: {i7}");
        // Written after the snapshot: from the log.
        let i11 = item(11).await;
        assert_eq!(
            (embedding(&i11), &i11["version"]),
            (vec![-1.0; 64], &json!(5)),
            "{when}: {i11}"
        );
        let u42 = get_json(&c, &d.url("/v1/users/42")).await;
        assert_eq!(u42["history"], json!([1, 2, 3]), "{when}: {u42}");
        assert_eq!(
            u42["features"].as_array().map(Vec::len),
            Some(16),
            "{when}: {u42}"
        );
        let u43 = get_json(&c, &d.url("/v1/users/43")).await;
        assert_eq!(u43["history"], json!([900001, 11]), "{when}: {u43}");
    };
    let mut first = Daemon::start_with(&demo_models(), &args);
    check(&first, "from the 0.1 files").await;
    assert!(
        first.signal_and_wait("TERM", Duration::from_secs(20)),
        "{}",
        first.log()
    );
    let second = Daemon::start_with(&demo_models(), &args);
    check(&second, "from today's snapshot").await;
}

/// The demo table's ids in file order, and each row's attributes in the
/// filter tests: `in_stock` = row % 2, `category` = row % 20.
fn attribute_rows() -> (Vec<u64>, std::collections::HashMap<u64, (i64, i64)>) {
    let table = rankd::internals::ItemTable::load(
        &demo_models().join("catalogues/demo/items.safetensors"),
        64,
    )
    .unwrap();
    let ids = table.ids().to_vec();
    let by_id = ids
        .iter()
        .enumerate()
        .map(|(r, &id)| (id, ((r % 2) as i64, (r % 20) as i64)))
        .collect();
    (ids, by_id)
}

/// Filtered recommends over HTTP, the socket and bulk: only items whose
/// attributes hold every clause come back, the list is the unfiltered
/// ranking's passing items in order (the filter runs inside the scan, not
/// after a cut), fewer than `k` when fewer pass; attribute writes move an
/// item in and out of a filter and survive a restart; cold-start answers
/// honour the filter; unknown attributes are refused naming what exists.
#[tokio::test]
async fn filtered_recommends_return_only_passing_items_in_ranking_order() {
    let repo = two_catalogue_repo();
    let (item_ids, attrs) = attribute_rows();
    let rows = item_ids.len();
    write_attributes(
        &repo.path().join("catalogues/videos/attributes.safetensors"),
        &[
            ("in_stock", (0..rows).map(|r| (r % 2) as i64).collect()),
            ("category", (0..rows).map(|r| (r % 20) as i64).collect()),
        ],
    );
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = ["--snapshot-dir", &dir, "--snapshot-interval-ms", "600000"];
    let mut d = Daemon::start_with(repo.path(), &args);
    let c = client();
    let list = get_json(&c, &d.url("/v1/catalogues")).await;
    assert_eq!(
        list["catalogues"][1]["attributes"],
        json!(["category", "in_stock"]),
        "{list}"
    );
    assert_eq!(list["catalogues"][0]["attributes"], json!([]), "{list}");

    let user = 7u64;
    let history: Vec<u64> = item_ids[..8].to_vec();
    let (s, w) = post(
        &c,
        &d.url(&format!("/v1/users/{user}")),
        json!({"history": history}),
    )
    .await;
    assert_eq!(s, 200, "{w}");
    let recommend = async |body: Value| {
        let (s, r) = post(&c, &d.url("/v1/models/videos/recommend"), body).await;
        assert_eq!(s, 200, "{r}");
        r
    };
    let filter = json!({"in_stock": 1, "category": [3, 7]});
    let passes = |id: &u64| {
        let (stock, cat) = attrs[id];
        stock == 1 && (cat == 3 || cat == 7)
    };
    let filtered = recommend(json!({"user_id": user, "k": 50, "filter": filter})).await;
    let got = ids(&filtered);
    assert_eq!(got.len(), 50, "{filtered}");
    assert!(got.iter().all(passes), "{filtered}");
    let all = recommend(json!({"user_id": user, "k": 1000})).await;
    let want: Vec<&Value> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| passes(&i["id"].as_u64().unwrap()))
        .take(50)
        .collect();
    assert_eq!(want.len(), 50, "the top 1000 hold 50 passing items");
    assert_eq!(
        filtered["items"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        want,
        "the filtered list is the ranking's passing items, scores included"
    );
    let none = recommend(json!({"user_id": user, "k": 10, "filter": {"category": 999}})).await;
    assert_eq!(none["items"], json!([]), "{none}");

    // The socket and bulk take the same filter and give the same list.
    let mut s = connect(&d.uds).await;
    let v = json!({"id": 1, "op": "recommend", "model": "videos", "user_id": user, "k": 50, "filter": filter});
    send(&mut s, &request_frame(&v), "socket recommend").await;
    let r = read_frame(&mut s, "socket recommend").await;
    assert_eq!(ids(&r["result"]), got, "{r}");
    let line = json!({"user_id": user, "k": 50, "filter": filter}).to_string();
    let r = c
        .post(d.url("/v1/models/videos/bulk"))
        .body(format!("{line}\n"))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(ids(&first), got, "{text}");

    // An attribute write moves an item into a filter; attributes alone
    // keep the embedding.
    let top = ids(&all)[0];
    let before = get_json(&c, &d.url(&format!("/v1/catalogues/videos/items/{top}"))).await;
    let (s, w) = post(
        &c,
        &d.url(&format!("/v1/catalogues/videos/items/{top}")),
        json!({"attributes": {"category": 999}}),
    )
    .await;
    assert_eq!((s, &w["applied"]), (200, &json!(true)), "{w}");
    let after = get_json(&c, &d.url(&format!("/v1/catalogues/videos/items/{top}"))).await;
    assert_eq!(after["embedding"], before["embedding"]);
    assert_eq!(after["attributes"]["category"], 999, "{after}");
    assert_eq!(
        after["attributes"]["in_stock"], before["attributes"]["in_stock"],
        "{after}"
    );
    let only = recommend(json!({"user_id": user, "k": 10, "filter": {"category": 999}})).await;
    assert_eq!(ids(&only), [top], "{only}");

    // A user rankd knows nothing about gets the popular items, filtered.
    let cold = recommend(json!({"user_id": 424242, "k": 20, "filter": {"in_stock": 0}})).await;
    assert_eq!(cold["cold_start"], true, "{cold}");
    let cold_ids = ids(&cold);
    assert_eq!(cold_ids.len(), 20, "{cold}");
    assert!(cold_ids.iter().all(|id| attrs[id].0 == 0), "{cold}");

    // Unknown attributes and empty lists are refused, naming what exists.
    let a = post_json(
        &c,
        &d.url("/v1/models/videos/recommend"),
        &json!({"user_id": user, "filter": {"colour": 1}}),
    )
    .await;
    assert_http_error(
        "filter",
        &a,
        422,
        "invalid",
        &["unknown attribute 'colour'", "category, in_stock"],
    );
    let a = post_json(
        &c,
        &d.url("/v1/models/videos/recommend"),
        &json!({"user_id": user, "filter": {"category": []}}),
    )
    .await;
    assert_http_error(
        "filter",
        &a,
        422,
        "invalid",
        &["filter.category", "at least one value"],
    );
    let a = post_json(
        &c,
        &d.url("/v1/models/creators/recommend"),
        &json!({"user_id": user, "filter": {"category": 1}}),
    )
    .await;
    assert_http_error(
        "filter",
        &a,
        422,
        "invalid",
        &["catalogue 'creators' has: none"],
    );
    let a = post_json(
        &c,
        &d.url(&format!("/v1/catalogues/videos/items/{top}")),
        &json!({"attributes": {"colour": 1}}),
    )
    .await;
    assert_http_error(
        "attribute write",
        &a,
        422,
        "invalid",
        &["unknown attribute 'colour'"],
    );

    // Written attributes survive a restart (snapshot).
    assert!(
        d.signal_and_wait("TERM", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    let d = Daemon::start_with(repo.path(), &args);
    let again = get_json(&c, &d.url(&format!("/v1/catalogues/videos/items/{top}"))).await;
    assert_eq!(again["attributes"]["category"], 999, "{again}");
    let (s, only) = post(
        &c,
        &d.url("/v1/models/videos/recommend"),
        json!({"user_id": user, "k": 10, "filter": {"category": 999}}),
    )
    .await;
    assert_eq!((s, ids(&only)), (200, vec![top]), "{only}");
}

/// An unknown filter attribute is refused at admission, before a request
/// can be shed: a recommend that would miss its deadline in the queue still
/// gets the 422 naming the attribute, not a 504.
#[tokio::test]
async fn an_unknown_filter_attribute_is_refused_before_queueing() {
    // `slow`: batches wait 300 ms for company, far past a 1 ms deadline.
    let repo = slow_repo(300_000, 1024);
    let d = Daemon::start_with(repo.path(), &[]);
    let c = client();
    let a = post_json(
        &c,
        &d.url("/v1/models/slow/recommend"),
        &json!({"user_id": 1, "k": 5, "timeout_ms": 1, "filter": {"colour": 1}}),
    )
    .await;
    assert_http_error(
        "unknown attribute",
        &a,
        422,
        "invalid",
        &["unknown attribute 'colour'", "has: none"],
    );
    let a = post_json(
        &c,
        &d.url("/v1/models/slow/recommend"),
        &json!({"user_id": 1, "k": 5, "timeout_ms": 1}),
    )
    .await;
    assert_eq!(
        a.status, 504,
        "without a filter the same request misses its deadline: {}",
        a.text
    );
}
