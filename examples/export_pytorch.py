#!/usr/bin/env python3
"""Train a PyTorch two-tower model and export it as a rankd model.

rankd serves models from a repository laid out as

    <out>/<name>/<version>/model.toml
    <out>/<name>/<version>/weights.safetensors  tower.<i>.weight f32 [out, in], tower.<i>.bias f32 [out]
    <out>/<name>/<version>/items.safetensors    ids u64 [N], embeddings f32 [N, d]

and scores a `two_tower` model for a user with recent items and dense features f as

    h = mean of E[item] over the user's last `history_len` items (zeros if none)
    q = tower([h || f])    Linear, ReLU, Linear, ..., Linear (no ReLU after the last)
    score(i) = E[i] . q

`TwoTower` below is exactly that model, so its parameters export as they are
(nn.Linear already stores its weight as [out, in]). The training data is
synthetic: replace `ClickWorld.batch` with batches from your own click log.

Usage:

    pip install torch safetensors numpy
    python3 examples/export_pytorch.py --out ./my-models --name pytorch-demo
    rankd serve --models ./my-models

The script ends by re-reading the exported files, recomputing one user's scores
with numpy the way rankd does, and printing the requests that give that user's
top items from the running server.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn


def tower(widths):
    """rankd's tower: Linear layers of these widths with ReLU between them."""
    layers = []
    for a, b in zip(widths, widths[1:]):
        if layers:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """rankd's `two_tower` model. Items are arbitrary u64 ids: the model works
    on row numbers, and `ids[row]` is the id of embedding row `row`."""

    def __init__(self, ids, dim, user_feature_dim, hidden):
        super().__init__()
        self.ids = np.ascontiguousarray(ids, dtype=np.uint64)
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("item ids must be unique")
        self.item_embeddings = nn.Embedding(len(self.ids), dim)
        nn.init.normal_(self.item_embeddings.weight, std=dim**-0.5)
        self.tower = tower([dim + user_feature_dim, *hidden, dim])

    def query(self, history, mask, features):
        """history: item rows [B, L]; mask: [B, L], False where a user has
        fewer than L items; features: [B, user_feature_dim]. Returns q [B, d]."""
        summed = (self.item_embeddings(history) * mask.unsqueeze(-1)).sum(1)
        h = summed / mask.sum(1, keepdim=True).clamp(min=1)  # zeros without history
        return self.tower(torch.cat([h, features], dim=1))

    def forward(self, history, mask, features):
        """Scores of every item, [B, N]."""
        return self.query(history, mask, features) @ self.item_embeddings.weight.T


class ClickWorld:
    """Synthetic clicks. Item row r is in cluster r % clusters. A user likes one
    cluster: 0..history_len past clicks in it, features that hint at it, and
    one more click in it (the training target)."""

    def __init__(self, n_items, clusters, user_feature_dim, history_len, g):
        self.clusters, self.history_len = clusters, history_len
        self.sizes = torch.tensor(
            [(n_items - c + clusters - 1) // clusters for c in range(clusters)]
        )
        self.cluster_features = torch.randn(clusters, user_feature_dim, generator=g)

    def items_of(self, cluster, n, g):
        """n random item rows of each user's cluster: [B] -> [B, n]."""
        k = torch.randint(1 << 62, (len(cluster), n), generator=g) % self.sizes[cluster].unsqueeze(1)
        return cluster.unsqueeze(1) + self.clusters * k

    def batch(self, size, g):
        cluster = torch.randint(self.clusters, (size,), generator=g)
        history = self.items_of(cluster, self.history_len, g)
        lengths = torch.randint(self.history_len + 1, (size, 1), generator=g)
        mask = torch.arange(self.history_len) < lengths
        features = self.cluster_features[cluster]
        features = features + 0.5 * torch.randn(features.shape, generator=g)
        target = self.items_of(cluster, 1, g)[:, 0]
        return history, mask, features, target


def f32(t):
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


def tower_tensors(tower):
    """tower.<i>.weight / tower.<i>.bias of the i-th Linear of the tower."""
    kinds = [type(m) for m in tower]
    if kinds != [nn.Linear, nn.ReLU] * (len(kinds) // 2) + [nn.Linear]:
        raise ValueError(f"rankd towers are Linear, ReLU, ..., Linear; got {kinds}")
    tensors = {}
    for i, linear in enumerate(tower[::2]):
        if linear.bias is None:
            raise ValueError(f"tower layer {i} has no bias")
        tensors[f"tower.{i}.weight"] = f32(linear.weight)
        tensors[f"tower.{i}.bias"] = f32(linear.bias)
    return tensors


MODEL_TOML = """\
# Exported by examples/export_pytorch.py.
kind = "two_tower"
dim = {dim}
user_feature_dim = {user_feature_dim}
history_len = {history_len}
items = "items.safetensors"
weights = "weights.safetensors"

[batching]
max_batch_size = {max_batch_size}
max_queue_delay_us = {max_queue_delay_us}
max_queue_size = {max_queue_size}

[limits]
max_k = 1000
max_items = 1000
max_exclude = 10000
"""


def export(model, args):
    """Writes <out>/<name>/<version>/ through a temporary folder that rankd
    ignores (its name is not a number), so a scan never sees half a model."""
    final = args.out / args.name / str(args.version)
    if final.exists():
        sys.exit(f"{final} already exists: model versions are immutable, pick a new --version")
    tmp = final.with_name(f".{args.version}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = tower_tensors(model.tower)
    embeddings = f32(model.item_embeddings.weight)
    for name, t in [*weights.items(), ("embeddings", embeddings)]:
        if not np.isfinite(t).all():
            sys.exit(f"{name} has non-finite values (training diverged?): rankd would refuse it")
    save_file(weights, str(tmp / "weights.safetensors"))
    save_file({"ids": model.ids, "embeddings": embeddings}, str(tmp / "items.safetensors"))
    (tmp / "model.toml").write_text(MODEL_TOML.format(**vars(args)))
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; rankd may run as another user
    tmp.rename(final)
    return final


def rankd_scores(version_dir, history_rows, features):
    """One user's scores recomputed from the exported files with numpy."""
    weights = load_file(str(version_dir / "weights.safetensors"))
    items = load_file(str(version_dir / "items.safetensors"))
    assert items["ids"].dtype == np.uint64 and items["embeddings"].dtype == np.float32
    emb = items["embeddings"]
    h = emb[history_rows].mean(0) if len(history_rows) else np.zeros(emb.shape[1], np.float32)
    x = np.concatenate([h, features])
    n_layers = sum(1 for k in weights if k.endswith(".weight"))
    for i in range(n_layers):
        x = weights[f"tower.{i}.weight"] @ x + weights[f"tower.{i}.bias"]
        if i + 1 < n_layers:
            x = np.maximum(x, 0)
    return emb @ x


def model_name(s):
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", s) or s.startswith("."):
        raise argparse.ArgumentTypeError("use letters, digits, '-', '_' and '.', not starting with '.'")
    return s


def positive(s):
    if int(s) <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(s)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="model repository root (rankd --models)")
    p.add_argument("--name", type=model_name, default="pytorch-demo", help="model name (in URLs)")
    p.add_argument("--version", type=positive, default=1, help="version folder; rankd serves the highest")
    p.add_argument("--items", type=positive, default=10_000, help="catalogue size N")
    p.add_argument("--dim", type=positive, default=64, help="item embedding dimension d")
    p.add_argument("--user-feature-dim", type=int, default=16, help="dense user features (0 for none)")
    p.add_argument("--history-len", type=positive, default=50, help="recent items pooled into h")
    p.add_argument("--hidden", type=positive, nargs="*", default=[128], help="hidden layer widths")
    p.add_argument("--clusters", type=positive, default=20, help="synthetic item clusters")
    p.add_argument("--steps", type=int, default=300, help="training steps (0: export untrained)")
    p.add_argument("--batch-size", type=positive, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=positive, default=64, help="[batching] rows per batch")
    p.add_argument("--max-queue-delay-us", type=int, default=500, help="[batching] wait before a partial batch")
    p.add_argument("--max-queue-size", type=positive, default=1024, help="[batching] waiting requests before 429")
    args = p.parse_args()
    if args.user_feature_dim < 0 or args.max_queue_delay_us < 0 or args.steps < 0:
        p.error("--user-feature-dim, --max-queue-delay-us and --steps must be >= 0")
    if args.items < args.clusters:
        p.error("--items must be at least --clusters")

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    # Any distinct u64 values work as ids; these spread over the whole range.
    ids = np.arange(1, args.items + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    model = TwoTower(ids, args.dim, args.user_feature_dim, args.hidden)
    world = ClickWorld(args.items, args.clusters, args.user_feature_dim, args.history_len, g)

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        history, mask, features, target = world.batch(args.batch_size, g)
        loss = nn.functional.cross_entropy(model(history, mask, features), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f}")

    model.eval()
    version_dir = export(model, args)
    print(f"wrote {version_dir}/{{model.toml,weights.safetensors,items.safetensors}}")

    # A user of cluster 0 with a few past clicks: the exported files must
    # score exactly like the PyTorch model.
    history = world.items_of(torch.tensor([0]), min(5, args.history_len), g)
    features = world.cluster_features[:1]
    with torch.no_grad():
        expected = model(history, torch.ones_like(history, dtype=torch.bool), features)[0].numpy()
    scores = rankd_scores(version_dir, history[0].numpy(), features[0].numpy())
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    scores[history[0].numpy()] = -np.inf  # rankd leaves a user's history out of results
    top = np.argsort(-scores, kind="stable")[:5]
    print("export check passed: numpy on the files matches PyTorch")

    user = {"history": [int(model.ids[r]) for r in history[0].tolist()]}
    if args.user_feature_dim:
        # 9 significant digits give back the exact float32 values.
        user["features"] = [float(f"{v:.9g}") for v in features[0].tolist()]
    base = "http://127.0.0.1:8080"
    print(f"\nrankd serve --models {args.out}\n")
    print(f"curl -s -X POST {base}/v1/users/42 -H 'content-type: application/json' -d '{json.dumps(user)}'")
    print(
        f"curl -s -X POST {base}/v1/models/{args.name}/recommend"
        " -H 'content-type: application/json' -d '{\"user_id\": 42, \"k\": 5}'"
    )
    print("\nexpected top 5 (id: score):")
    for r in top:
        print(f"  {int(model.ids[r])}: {scores[r]:.4f}")


if __name__ == "__main__":
    main()
