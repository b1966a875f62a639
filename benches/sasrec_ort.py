#!/usr/bin/env python3
"""The sasrec tower in ONNX Runtime, for benches/sasrec.sh: what a team would
otherwise put behind a Python web service.

    sasrec_ort.py make --reference CHECKOUT --out DIR   (needs torch)
    sasrec_ort.py time DIR [ROUNDS] [THREADS]           (needs onnxruntime)

`make` builds a SASRec with the reference implementation's own model code
(pmixer/SASRec.pytorch at 9f6a02b, the block its published checkpoints use)
at the shape of its MovieLens-1M setting scaled to d = 64, L = 50, 2 blocks,
2 heads, 3,416 items; saves `model.pth` (torch.save of the state_dict) with a
rankd `model.toml`, users' histories, and one ONNX graph per batch size
(1, 16, 64; fixed shapes, the fastest way to run ONNX Runtime) of the query
vector, each checked against the reference's own `log2feats` to 1e-5.
`time` prints `onnxruntime batch B: MEAN ms per batch (min MIN)`.
"""

import json
import pathlib
import sys
import time

import numpy as np

ITEMS, DIM, MAXLEN, BLOCKS, HEADS, USERS = 3416, 64, 50, 2, 2, 512
BATCHES = [1, 16, 64]
ORIGINAL = "9f6a02b86a95e616fe815a0edc92dafa9911773d"


def padded(h):
    tail = h[-MAXLEN:]
    return [0] * (MAXLEN - len(tail)) + tail


def make(reference, out):
    import importlib.util
    import subprocess
    import types

    import torch

    out.mkdir(parents=True, exist_ok=True)
    source = subprocess.run(["git", "-C", str(reference), "show", f"{ORIGINAL}:python/model.py"],
                            check=True, capture_output=True, text=True).stdout
    (out / "reference_model.py").write_text(source)
    spec = importlib.util.spec_from_file_location("reference_model", out / "reference_model.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.manual_seed(1)
    args = types.SimpleNamespace(device="cpu", hidden_units=DIM, maxlen=MAXLEN, num_blocks=BLOCKS,
                                 num_heads=HEADS, dropout_rate=0.2)
    model = ref.SASRec(6040, ITEMS, args)
    model.eval()
    torch.save(model.state_dict(), out / "model.pth")
    (out / "model.toml").write_text(
        f'kind = "sasrec"\ndim = {DIM}\nhistory_len = {MAXLEN}\nblocks = {BLOCKS}\nheads = {HEADS}\n'
        'weights = "model.pth"\nitems = "item_emb"\n')
    rng = np.random.default_rng(7)
    histories = [[int(i) for i in rng.integers(1, ITEMS + 1, size=int(n))]
                 for n in rng.integers(5, 121, size=USERS)]
    (out / "histories.json").write_text(json.dumps(histories))

    class Tower(torch.nn.Module):
        """log2feats(...)[:, -1] in traceable torch ops (the reference builds
        positions with numpy, which an export cannot follow)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, log_seqs):
            m = self.m
            seqs = m.item_emb(log_seqs) * (m.item_emb.embedding_dim ** 0.5)
            poss = torch.arange(1, MAXLEN + 1).unsqueeze(0) * (log_seqs != 0)
            seqs = seqs + m.pos_emb(poss)
            mask = ~torch.tril(torch.ones((MAXLEN, MAXLEN), dtype=torch.bool))
            for i in range(len(m.attention_layers)):
                seqs = torch.transpose(seqs, 0, 1)
                q = m.attention_layernorms[i](seqs)
                mha, _ = m.attention_layers[i](q, seqs, seqs, attn_mask=mask)
                seqs = torch.transpose(q + mha, 0, 1)
                seqs = m.forward_layers[i](m.forward_layernorms[i](seqs))
            return m.last_layernorm(seqs)[:, -1, :]

    import onnxruntime as ort
    tower = Tower(model).eval()
    for b in BATCHES:
        seqs = np.array([padded(h) for h in histories[:b]], dtype=np.int64)
        path = out / f"tower_b{b}.onnx"
        torch.onnx.export(tower, (torch.from_numpy(seqs),), str(path), input_names=["log_seqs"],
                          output_names=["query"], opset_version=17, dynamo=False)
        with torch.no_grad():
            want = model.log2feats(seqs)[:, -1, :].numpy()
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"log_seqs": seqs})[0]
        err = float(np.abs(got - want).max())
        assert err < 1e-5, f"batch {b}: ONNX Runtime differs from the reference by {err}"
        print(f"batch {b}: {path.name}, ONNX Runtime matches the reference to {err:.1e}", file=sys.stderr)


def timing(out, rounds, threads):
    import onnxruntime as ort
    histories = json.loads((out / "histories.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    for b in BATCHES:
        sess = ort.InferenceSession(str(out / f"tower_b{b}.onnx"), opts, providers=["CPUExecutionProvider"])
        batches = [np.array([padded(h) for h in histories[i:i + b]], dtype=np.int64)
                   for i in range(0, len(histories) - b + 1, b)]
        for x in batches[:3]:
            sess.run(None, {"log_seqs": x})
        times = []
        for r in range(rounds):
            x = batches[r % len(batches)]
            t = time.perf_counter()
            sess.run(None, {"log_seqs": x})
            times.append(time.perf_counter() - t)
        print(f"onnxruntime batch {b}: {1e3 * sum(times) / len(times):.4f} ms per batch (min {1e3 * min(times):.4f})")


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "make" and sys.argv[2] == "--reference" and sys.argv[4] == "--out":
        make(pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[5]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "time":
        timing(pathlib.Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 200,
               int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    else:
        sys.exit(__doc__)
