//! The two-tower and ranker kinds against PyTorch: the repository under
//! tests/fixtures/towers/ was written by examples/export_pytorch.py's own
//! model and exporter (scripts/fixtures/towers.py), with PyTorch's scores
//! beside it. Both towers have a square hidden layer, so a weight layout bug
//! shared by a writer and a reader of rankd's own cannot hide here.

use serde_json::{json, Value};

use crate::common::parity::{close, floats};
use crate::common::*;

fn ids_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn two_tower_and_ranker_answer_as_pytorch_does() {
    let root = repo_root().join("tests/fixtures/towers");
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("expected.json")).unwrap())
            .unwrap();
    let d = Daemon::start_with(&root, &["--repository-poll-ms", "0"]);
    let c = Daemon::client();
    for (u, user) in exp["users"].as_array().unwrap().iter().enumerate() {
        let id = 100 + u as u64;
        let history = ids_of(&user["history"]);
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/users/{id}")),
            json!({"history": history, "features": user["features"]}),
        )
        .await;
        assert_eq!(s, 200, "{body}");

        // Every item's two-tower score, in one score call.
        let scores = user["scores"].as_object().unwrap();
        let items: Vec<u64> = scores.keys().map(|k| k.parse().unwrap()).collect();
        let want: Vec<f64> = scores.values().map(|v| v.as_f64().unwrap()).collect();
        let (s, body) = post(
            &c,
            &d.url("/v1/models/two_tower/score"),
            json!({"user_id": id, "items": items}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let got = floats(&body["scores"]);
        assert_eq!(got.len(), want.len(), "{body}");
        for ((item, g), w) in items.iter().zip(got).zip(&want) {
            assert!(
                close(g, *w),
                "user {u}, item {item}: rankd {g}, PyTorch {w}"
            );
        }

        // The top 10 without the stored history, ties to the smaller id.
        let mut top: Vec<(u64, f64)> = items
            .iter()
            .copied()
            .zip(want.iter().copied())
            .filter(|(i, _)| !history.contains(i))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let (s, body) = post(
            &c,
            &d.url("/v1/models/two_tower/recommend"),
            json!({"user_id": id, "k": 10}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        if history.is_empty() {
            // No history, but features: the model answers (not cold start).
            assert_eq!(body["cold_start"], false, "{body}");
        }
        assert_eq!(ids(&body).len(), 10, "{body}");
        for (i, (g, &(w, ws))) in ids(&body).iter().zip(&top[..10]).enumerate() {
            let swapped = top
                .iter()
                .any(|&(id, s)| id == *g && (s - ws).abs() <= 1e-6);
            assert!(
                *g == w || swapped,
                "user {u}, rank {i}: rankd {g}, PyTorch {w}: {body}"
            );
        }

        // The ranker's probabilities of the candidates, in request order.
        let (s, body) = post(
            &c,
            &d.url("/v1/models/ranker/score"),
            json!({"user_id": id, "items": user["candidates"]}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let (got, want) = (floats(&body["scores"]), floats(&user["probabilities"]));
        assert_eq!(got.len(), want.len(), "{body}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                close(*g, w),
                "user {u}, candidate {i}: rankd {g}, PyTorch {w}"
            );
        }
    }
}
