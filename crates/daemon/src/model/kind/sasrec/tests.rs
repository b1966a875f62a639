use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::kind::TWO_TOWER;

const SPEC: &str = "kind = \"sasrec\"\ndim = 16\nhistory_len = 8\nblocks = 2\nheads = 2\nweights = \"model.pth\"\nitems = \"item_emb\"\n";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sasrec/sasrec/model.pth")
}

fn spec(extra: &str) -> Result<ModelSpec, String> {
    ModelSpec::parse(&format!("{SPEC}{extra}"))
}

#[test]
fn its_keys_are_read_checked_and_defaulted() {
    let s = spec("").unwrap();
    assert_eq!(s.kind, SASREC);
    let o = options(&s);
    assert_eq!((o.blocks, o.heads, o.block), (2, 2, Block::Sasrec));
    assert_eq!(o.layer_norm_eps, 1e-8);
    let s = spec("block = \"post_ln\"\nlayer_norm_eps = 1e-5\n").unwrap();
    assert_eq!(options(&s).block, Block::PostLn);
    assert_eq!(options(&s).layer_norm_eps, 1e-5);

    let refusals = [
        ("blokcs = 2\n", "unknown field `blokcs` at line 8, column 1"),
        ("heads = 3\n", "duplicate key"),
        ("block = \"prenorm\"\n", "prenorm"),
        (
            "layer_norm_eps = -1.0\n",
            "layer_norm_eps must be a positive number, got -1",
        ),
        (
            "user_feature_dim = 4\n",
            "user_feature_dim must be 0, got 4",
        ),
    ];
    for (extra, needle) in refusals {
        let e = spec(extra).unwrap_err();
        assert!(e.contains(needle), "{extra:?}: {e}");
    }
    let e = ModelSpec::parse(&SPEC.replace("heads = 2", "heads = 3")).unwrap_err();
    assert!(e.contains("heads must divide dim (16), got 3"), "{e}");
    let e = ModelSpec::parse(&SPEC.replace("blocks = 2\n", "")).unwrap_err();
    assert!(e.contains("missing field `blocks`"), "{e}");
    // A kind's keys are its own: another kind refuses them.
    let e = ModelSpec::parse(
        "kind = \"two_tower\"\ndim = 4\nhistory_len = 5\nitems = \"i.safetensors\"\nblocks = 2\n",
    )
    .unwrap_err();
    assert!(
        e.contains("unknown field `blocks` at line 5, column 1"),
        "{e}"
    );
    assert_eq!(
        ModelSpec::parse(
            "kind = \"two_tower\"\ndim = 4\nhistory_len = 5\nitems = \"i.safetensors\"\n"
        )
        .unwrap()
        .kind,
        TWO_TOWER
    );
}

/// The fixture checkpoint's tensors, to be altered and saved as safetensors.
fn tensors() -> HashMap<String, Tensor> {
    candle_core::pickle::read_all(fixture())
        .unwrap()
        .into_iter()
        .collect()
}

fn save(dir: &Path, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

fn load(path: &Path) -> Result<SasrecWeights, ModelError> {
    let s = spec("").unwrap();
    SasrecWeights::load(path, 16, 8, options(&s), true)
}

#[test]
fn a_safetensors_file_with_the_same_names_loads_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let pth = load(&fixture()).unwrap();
    let st = load(&save(dir.path(), &tensors())).unwrap();
    assert_eq!(pth.pos_emb, st.pos_emb);
    assert_eq!(pth.padding, st.padding);
    assert_eq!(pth.blocks[1].in_proj_weight, st.blocks[1].in_proj_weight);
    assert_eq!(pth.blocks[0].conv2_weight, st.blocks[0].conv2_weight);
    assert_eq!(pth.last_norm.bias, st.last_norm.bias);
    let (a, b) = (
        pth.take_item_table().unwrap(),
        st.take_item_table().unwrap(),
    );
    assert_eq!(a.rows(), 40);
    assert_eq!(a.id(0), 1);
    assert_eq!(a.embedding(39), b.embedding(39));
    // Row 0 of item_emb.weight is padding, not item 0.
    assert_eq!(a.row_of(0), None);
}

#[test]
fn a_missing_misshapen_or_non_finite_tensor_is_named_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = Box<dyn Fn(&mut HashMap<String, Tensor>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing",
            Box::new(|t| {
                t.remove("attention_layers.1.out_proj.bias");
            }),
            "tensor `attention_layers.1.out_proj.bias` is missing",
        ),
        (
            "transposed",
            Box::new(|t| {
                let w = t["attention_layers.0.in_proj_weight"]
                    .t()
                    .unwrap()
                    .contiguous()
                    .unwrap();
                t.insert("attention_layers.0.in_proj_weight".into(), w);
            }),
            "tensor `attention_layers.0.in_proj_weight` has shape [16, 48], expected [48, 16]",
        ),
        (
            "window",
            Box::new(|t| {
                let p = Tensor::zeros((12, 16), DType::F32, &Device::Cpu).unwrap();
                t.insert("pos_emb.weight".into(), p);
            }),
            "tensor `pos_emb.weight` has shape [12, 16], expected [9, 16]",
        ),
        (
            "nan",
            Box::new(|t| {
                let mut v = t["forward_layers.0.conv1.bias"].to_vec1::<f32>().unwrap();
                v[3] = f32::NAN;
                t.insert(
                    "forward_layers.0.conv1.bias".into(),
                    Tensor::from_vec(v, 16, &Device::Cpu).unwrap(),
                );
            }),
            "tensor `forward_layers.0.conv1.bias`: element 3 is NaN, values must be finite",
        ),
        (
            "f64",
            Box::new(|t| {
                let w = t["last_layernorm.weight"].to_dtype(DType::F64).unwrap();
                t.insert("last_layernorm.weight".into(), w);
            }),
            "tensor `last_layernorm.weight` has dtype F64, expected F32",
        ),
        (
            "no item table",
            Box::new(|t| {
                t.remove("item_emb.weight");
            }),
            "tensor `item_emb.weight` is missing",
        ),
    ];
    for (what, edit, needle) in cases {
        let mut t = tensors();
        edit(&mut t);
        let path = save(dir.path(), &t);
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains(needle), "{what}: {e}");
        assert!(e.contains(&path.display().to_string()), "{what}: {e}");
    }
    // Tensors the model does not read are ignored.
    let mut t = tensors();
    t.insert(
        "optimizer.step".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    load(&save(dir.path(), &t)).unwrap();
    // Without `items = "item_emb"` the item embeddings are optional:
    // padding is then zero.
    let mut t = tensors();
    t.remove("item_emb.weight");
    let w = SasrecWeights::load(
        &save(dir.path(), &t),
        16,
        8,
        options(&spec("").unwrap()),
        false,
    )
    .unwrap();
    assert_eq!(w.padding, vec![0.0; 16]);

    let other = dir.path().join("model.onnx");
    std::fs::write(&other, b"x").unwrap();
    let e = load(&other).unwrap_err().to_string();
    assert!(e.contains("got extension `onnx`"), "{e}");
    // A training checkpoint that nests the state_dict ({"model": ..., "epoch": 3}).
    let nested = fixture().parent().unwrap().join("../nested.pth");
    let e = load(&nested).unwrap_err().to_string();
    assert!(e.contains("no tensors at the top level"), "{e}");
    let e = load(&dir.path().join("absent.pth"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("absent.pth") && e.contains("no such file"),
        "{e}"
    );
}
