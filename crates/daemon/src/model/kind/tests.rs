use super::*;
use crate::model::query::Task;

/// A model.toml of `kind` with the batch and candidate limits given.
fn spec(kind: &str, max_batch_size: usize, max_items: usize) -> ModelSpec {
    ModelSpec::parse(&format!(
        "kind = \"{kind}\"\ndim = 4\nhistory_len = 5\nitems = \"i.safetensors\"\n\
         [batching]\nmax_batch_size = {max_batch_size}\n[limits]\nmax_items = {max_items}\n"
    ))
    .unwrap()
}

fn tt_spec() -> ModelSpec {
    spec("two_tower", 64, 1000)
}

fn rk_spec() -> ModelSpec {
    spec("ranker", 64, 1000)
}

fn recommend() -> Op {
    Op::Recommend {
        user_id: 1,
        k: 5,
        exclude: vec![7, 8],
        filter: None,
        online: true,
        context: None,
    }
}

fn score(n: u64) -> Op {
    Op::Score {
        user_id: 1,
        items: (0..n).collect(),
        context: None,
    }
}

#[test]
fn kinds_parse_from_their_names_and_print_them() {
    for (name, kind) in [("two_tower", TWO_TOWER), ("ranker", RANKER)] {
        let parsed = ModelKind::parse(name).unwrap();
        assert_eq!(parsed, kind);
        assert_eq!(parsed.as_str(), name);
        assert_eq!(format!("{parsed} {parsed:?}"), format!("{name} {name}"));
    }
    assert_ne!(TWO_TOWER, RANKER);
    let names: Vec<&str> = ModelKind::all().iter().map(|k| k.as_str()).collect();
    assert_eq!(names, ["two_tower", "ranker", "sasrec", "onnx"]);
}

#[test]
fn an_unknown_kind_names_the_allowed_ones() {
    let err = ModelKind::parse("three_tower").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown model kind `three_tower`, expected one of: two_tower, ranker, sasrec, onnx"
    );
    #[derive(Debug, serde::Deserialize)]
    struct Spec {
        #[allow(dead_code)]
        kind: ModelKind,
    }
    let err = toml::from_str::<Spec>("kind = \"TwoTower\"\n").unwrap_err();
    assert!(
        err.to_string().contains("unknown model kind `TwoTower`"),
        "{err}"
    );
    let spec: Spec = toml::from_str("kind = \"ranker\"\n").unwrap();
    assert_eq!(spec.kind, RANKER);
}

#[test]
fn kinds_serialize_as_their_names() {
    #[derive(serde::Serialize)]
    struct Spec {
        kind: ModelKind,
    }
    let text = toml::to_string(&Spec { kind: TWO_TOWER }).unwrap();
    assert_eq!(text.trim(), "kind = \"two_tower\"");
}

#[test]
fn a_ranker_refuses_recommend_with_the_routes_message() {
    assert_eq!(
        TWO_TOWER.accepts(&tt_spec(), "demo", OpKind::Recommend),
        Ok(())
    );
    assert_eq!(TWO_TOWER.accepts(&tt_spec(), "demo", OpKind::Score), Ok(()));
    assert_eq!(
        RANKER.accepts(&rk_spec(), "demo-ranker", OpKind::Score),
        Ok(())
    );
    assert_eq!(
        RANKER.accepts(&rk_spec(), "demo-ranker", OpKind::Recommend),
        Err(
            "model demo-ranker is a ranker: recommend needs a retrieval model, two_tower, sasrec or an onnx tower (use score)"
                .to_string()
        )
    );
    assert_eq!(recommend().kind(), OpKind::Recommend);
    assert_eq!(score(3).kind(), OpKind::Score);
}

#[test]
fn rows_per_request_count_towers_run() {
    assert_eq!(TWO_TOWER.rows(&tt_spec(), &recommend()), 1);
    assert_eq!(TWO_TOWER.rows(&tt_spec(), &score(40)), 1);
    assert_eq!(RANKER.rows(&rk_spec(), &score(1)), 1);
    assert_eq!(RANKER.rows(&rk_spec(), &score(40)), 40);
}

#[test]
fn tower_dims_follow_the_inputs_each_kind_builds() {
    // d = 64, 16 dense features.
    assert_eq!(TWO_TOWER.tower_dims(64, 16), (80, 64));
    assert_eq!(RANKER.tower_dims(64, 16), (208, 1));
    assert_eq!(TWO_TOWER.tower_dims(8, 0), (8, 8));
    assert_eq!(RANKER.tower_dims(8, 0), (24, 1));
}

#[test]
fn warm_up_covers_the_largest_batch_in_rows() {
    assert_eq!(tt_spec().max_batch_rows(), 64);
    assert_eq!(rk_spec().max_batch_rows(), 1000);
    assert_eq!(spec("ranker", 256, 100).max_batch_rows(), 256);
    assert!(rk_spec().ranks() && !tt_spec().ranks());
}

#[test]
fn warm_batches_are_laid_out_as_each_kinds_requests() {
    let rows = vec![0u32; 16];
    let tt = TWO_TOWER.warm_batch(&tt_spec(), 16, &rows);
    assert_eq!(tt.len(), 16);
    for q in &tt {
        assert_eq!(q.history, [0]);
        assert!(q.features.is_none());
        assert!(matches!(
            q.task,
            Task::TopK {
                k: 10,
                exclude: [],
                filter: None
            }
        ));
    }
    let rk = RANKER.warm_batch(&rk_spec(), 16, &rows);
    assert_eq!(rk.len(), 1);
    assert_eq!(rk[0].history, [0]);
    assert!(matches!(rk[0].task, Task::Score { rows } if rows.len() == 16));
    assert!(
        matches!(RANKER.warm_batch(&rk_spec(), 4, &rows)[0].task, Task::Score { rows } if rows.len() == 4)
    );
    // An empty table: no history, no candidates, the same number of queries.
    let tt = TWO_TOWER.warm_batch(&tt_spec(), 8, &[]);
    assert_eq!(tt.len(), 8);
    assert!(tt.iter().all(|q| q.history.is_empty()));
    let rk = RANKER.warm_batch(&rk_spec(), 8, &[]);
    assert!(rk[0].history.is_empty());
    assert!(matches!(rk[0].task, Task::Score { rows: [] }));
}

/// The backends find a kind's forward passes through the kind: every kind
/// has one on the CPU, and the device runs every kind but onnx (whose
/// models are served from the CPU on a GPU host).
#[test]
fn each_kind_names_its_forward_passes() {
    for kind in ModelKind::all() {
        let _build: crate::backend::cpu::CpuBuild = kind.cpu();
    }
    #[cfg(feature = "cuda")]
    {
        let on_device: Vec<&str> = ModelKind::all()
            .iter()
            .filter(|k| k.device().is_some())
            .map(|k| k.as_str())
            .collect();
        assert_eq!(on_device, ["two_tower", "ranker", "sasrec"]);
    }
}
