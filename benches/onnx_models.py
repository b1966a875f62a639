#!/usr/bin/env python3
"""Models for benches/onnx.sh, at a serving size (d = 64, L = 50, 20,000
items), each in a version folder as rankd reads it, one catalogue shared:

- `tower-onnx`: scripts/fixtures/onnx.py's YouTube-DNN tower (masked mean of
  the history ‖ 16 dense features → 128 → 128 → 64), exported by
  torch.onnx; `tower-native`: the same weights as a `two_tower` model
  (`tower.<i>.weight`), whose math is the same;
- `sasrec-onnx`: the fixtures' SASRec tower (2 blocks, 2 heads) exported by
  torch.onnx; `sasrec-native`: the same weights under the reference
  implementation's state_dict names, served as `kind = "sasrec"` (its
  padding positions differ, so only the timings compare);
- `dcn-onnx`: the fixtures' DCN-v2 ranker at d = 64.

Needs torch, onnx, onnxscript and safetensors (a developer's Python):

    python3 benches/onnx_models.py OUT_DIR
"""

import importlib.util
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

spec = importlib.util.spec_from_file_location("fixtures_onnx", HERE.parent / "scripts/fixtures/onnx.py")
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)

ITEMS = 20_000
fx.DIM, fx.HISTORY_LEN, fx.FEATURES, fx.CONTEXT, fx.HIDDEN, fx.HEADS = 64, 50, 16, 0, 128, 2


def example(names, rng, rows=4):
    shapes = {
        "history_embeddings": (rows, fx.HISTORY_LEN, fx.DIM),
        "history_mask": (rows, fx.HISTORY_LEN),
        "user_features": (rows, fx.FEATURES),
        "context": (rows, fx.CONTEXT),
        "candidate_embeddings": (rows, fx.DIM),
    }
    out = {}
    for n in names:
        if n == "user_sparse":
            out[n] = np.zeros((rows, len(fx.SPARSE)), dtype=np.int64)
        elif n == "candidate_attributes":
            out[n] = np.zeros((rows, len(fx.ATTRIBUTES)), dtype=np.int64)
        elif n == "history_mask":
            out[n] = np.ones(shapes[n], dtype=np.float32)
        else:
            out[n] = rng.normal(size=shapes[n]).astype(np.float32)
    return out


def write(out, name, proto_or_weights, toml):
    version = out / name / "1"
    version.mkdir(parents=True)
    if isinstance(proto_or_weights, dict):
        save_file(proto_or_weights, str(version / "model.safetensors"))
    else:
        fx.onnx.save(proto_or_weights, str(version / "model.onnx"))
    (version / "model.toml").write_text(toml)


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(fx.SEED)
    rng = np.random.default_rng(fx.SEED)
    shop = out / "catalogues" / "bench"
    shop.mkdir(parents=True)
    ids = (1 + np.arange(ITEMS)).astype(np.uint64)
    embeddings = rng.normal(0.0, 0.5, size=(ITEMS, fx.DIM)).astype(np.float32)
    save_file({"ids": ids, "embeddings": embeddings}, str(shop / "items.safetensors"))
    save_file({"brand": rng.integers(0, 8, ITEMS).astype(np.int64),
               "category": rng.integers(0, 5, ITEMS).astype(np.int64)}, str(shop / "attributes.safetensors"))
    common = f'dim = {fx.DIM}\nhistory_len = {fx.HISTORY_LEN}\ncatalogue = "bench"\n'

    tower = fx.randomise(fx.Tower(), np.random.default_rng(1))
    write(out, "tower-onnx", fx.export(tower, example(tower.inputs, rng), dynamo=False),
          f'kind = "onnx"\nrole = "tower"\ngraph = "model.onnx"\nuser_feature_dim = {fx.FEATURES}\n{common}')
    linears = [m for m in tower.mlp if isinstance(m, torch.nn.Linear)]
    weights = {}
    for i, layer in enumerate(linears):
        weights[f"tower.{i}.weight"] = layer.weight.detach().numpy().copy()
        weights[f"tower.{i}.bias"] = layer.bias.detach().numpy().copy()
    write(out, "tower-native", weights,
          f'kind = "two_tower"\nweights = "model.safetensors"\nuser_feature_dim = {fx.FEATURES}\n{common}')

    sasrec = fx.randomise(fx.SASRec(), np.random.default_rng(2))
    write(out, "sasrec-onnx", fx.export(sasrec, example(sasrec.inputs, rng), dynamo=True),
          f'kind = "onnx"\nrole = "tower"\ngraph = "model.onnx"\n{common}')
    d, state = fx.DIM, {}
    pos = sasrec.pos_emb.detach().numpy()
    state["pos_emb.weight"] = np.concatenate([np.zeros((1, d), np.float32), pos])
    for i in range(len(sasrec.attention_layers)):
        for part, module in [("attention_layernorms", sasrec.attention_layernorms[i]),
                             ("forward_layernorms", sasrec.forward_layernorms[i])]:
            state[f"{part}.{i}.weight"] = module.weight.detach().numpy().copy()
            state[f"{part}.{i}.bias"] = module.bias.detach().numpy().copy()
        attn = sasrec.attention_layers[i]
        state[f"attention_layers.{i}.in_proj_weight"] = attn.in_proj_weight.detach().numpy().copy()
        state[f"attention_layers.{i}.in_proj_bias"] = attn.in_proj_bias.detach().numpy().copy()
        state[f"attention_layers.{i}.out_proj.weight"] = attn.out_proj.weight.detach().numpy().copy()
        state[f"attention_layers.{i}.out_proj.bias"] = attn.out_proj.bias.detach().numpy().copy()
        ffn = sasrec.forward_layers[i]
        for conv, lin in [("conv1", ffn.linear1), ("conv2", ffn.linear2)]:
            state[f"forward_layers.{i}.{conv}.weight"] = lin.weight.detach().numpy()[:, :, None].copy()
            state[f"forward_layers.{i}.{conv}.bias"] = lin.bias.detach().numpy().copy()
    state["last_layernorm.weight"] = sasrec.last_layernorm.weight.detach().numpy().copy()
    state["last_layernorm.bias"] = sasrec.last_layernorm.bias.detach().numpy().copy()
    write(out, "sasrec-native", state,
          f'kind = "sasrec"\nweights = "model.safetensors"\nblocks = 2\nheads = {fx.HEADS}\n{common}')

    fx.CONTEXT = 2
    dcn = fx.randomise(fx.DCN(), np.random.default_rng(3))
    write(out, "dcn-onnx", fx.export(dcn, example(dcn.inputs, rng), dynamo=False),
          f'kind = "onnx"\nrole = "ranker"\ngraph = "model.onnx"\nuser_sparse_dim = {len(fx.SPARSE)}\n'
          f'context_dim = 2\n{common}')
    print(f"models in {out}")


if __name__ == "__main__":
    main()
