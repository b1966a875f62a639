//! `cpu_scoring = "exact-int8"` through the real daemon: a copy of the demo
//! model that scans the int8 table answers every user exactly as the demo
//! model does, ids and scores, at k = 10 and k = 1,000, before and after item
//! upserts and deletes move the table.

use serde_json::{json, Value};

use crate::common::*;

fn items(body: &Value) -> Value {
    body["items"].clone()
}

#[tokio::test]
async fn exact_int8_answers_exactly_what_the_f32_scan_answers() {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    derived_model(root.path(), "demo-int8", "demo", |t| {
        format!("cpu_scoring = \"exact-int8\"\n{t}")
    });
    let d = Daemon::start_with(root.path(), &["--device", "cpu"]);
    let c = Daemon::client();
    let users: Vec<u64> = (0..300).collect();
    let histories: Vec<(u64, Vec<u64>)> = users
        .iter()
        .map(|&u| (u, spread_history(u, 1 + u % 20)))
        .collect();
    seed_histories(&c, &d, &histories).await;
    let compare = |phase: &'static str| {
        let (c, d, users) = (&c, &d, &users);
        async move {
            for k in [10, 1000] {
                // One call at a time: both models score in batches of one.
                let want = recommend_each(c, d, "demo", users, k).await;
                let got = recommend_each(c, d, "demo-int8", users, k).await;
                for (u, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(items(w).as_array().unwrap().len(), k, "{phase}: {w}");
                    assert_eq!(items(g), items(w), "{phase}, k {k}, user {u}");
                }
            }
        }
    };
    let log = d.log();
    assert_eq!(
        log.matches("cpu_scoring = exact-int8").count(),
        1,
        "one model scans the int8 copy: {log}"
    );
    compare("as loaded").await;
    // Move items: the top answers of user 0 pushed far down, new items, a
    // deletion; both models share the table and see the same rows.
    let top = ids(&recommend_each(&c, &d, "demo", &[0], 50).await[0]);
    for (i, id) in top.iter().enumerate() {
        let embedding: Vec<f64> = (0..64).map(|j| ((i * 7 + j) % 13) as f64 * -0.1).collect();
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/items/{id}")),
            json!({ "embedding": embedding }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    for id in 900_000..900_020u64 {
        let embedding: Vec<f64> = (0..64)
            .map(|j| ((id as usize + j) % 5) as f64 * 0.3)
            .collect();
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/items/{id}")),
            json!({ "embedding": embedding }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let (s, body) = post(&c, &d.url("/v1/items/900003"), json!({ "deleted": true })).await;
    assert_eq!(s, 200, "{body}");
    compare("after item updates").await;
}
