"""The anchors of benches/anchors.sh: FAISS IndexFlatIP and numpy (GEMM, then
argpartition and a sort of the top k) over the item table and query vectors
that `cargo bench --bench forward -- --anchors DIR` wrote, at the same batch
sizes, each user's history excluded as rankd excludes it.

  python3 anchors.py time DIR ROUNDS faiss|numpy|faiss1|numpy1
      time one anchor (one per process: neither's thread pool then spins
      while the other runs), appending every sample to DIR/samples.tsv;
      faiss1 and numpy1 are on one thread, for reference (numpy1 wants
      OPENBLAS_NUM_THREADS=1 set before the process starts)
  python3 anchors.py report DIR
      check the three agree on every user's top k, print the table
"""

import os
import statistics
import sys
import time

import faiss
import numpy as np

BATCHES = [1, 4, 16, 64, 256]


def load(d):
    table = np.load(os.path.join(d, "table.npy"))
    ids = np.load(os.path.join(d, "ids.npy"))
    queries = np.load(os.path.join(d, "queries.npy"))
    history = np.load(os.path.join(d, "history.npy")).astype(np.int64)
    meta = {}
    with open(os.path.join(d, "rankd.tsv")) as f:
        for line in f:
            key, value = line.rstrip("\n").split("\t")
            meta[key] = value
    return table, ids, queries, history, meta


def faiss_topk(index, ids, q, history, k):
    """FAISS's k + |history| best, the history dropped, the first k kept."""
    _, rows = index.search(q, k + history.shape[1])
    seen = (rows[:, :, None] == history[:, None, :]).any(axis=2)
    keep = np.argsort(seen, axis=1, kind="stable")[:, :k]
    return ids[np.take_along_axis(rows, keep, axis=1)]


def numpy_topk(table, ids, q, history, k):
    """The full score matrix, the history masked, argpartition, then a sort
    of the k (higher score first)."""
    scores = q @ table.T
    np.put_along_axis(scores, history, -np.inf, axis=1)
    part = np.argpartition(scores, -k, axis=1)[:, -k:]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return ids[np.take_along_axis(part, order, axis=1)]


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def time_anchor(d, rounds, which):
    table, ids, queries, history, meta = load(d)
    k = int(meta["k"])
    if which in ("faiss", "faiss1"):
        faiss.omp_set_num_threads(1 if which == "faiss1" else int(meta["threads"]))
        index = faiss.IndexFlatIP(table.shape[1])
        index.add(table)

        def run(q, h):
            return faiss_topk(index, ids, q, h, k)

    else:
        if which == "numpy1" and os.environ.get("OPENBLAS_NUM_THREADS") != "1":
            sys.exit("numpy1 wants OPENBLAS_NUM_THREADS=1")

        def run(q, h):
            return numpy_topk(table, ids, q, h, k)

    lines = []
    # Round 0 is the warm-up.
    for r in range(rounds + 1):
        for b in BATCHES:
            q, h = queries[:b], history[:b]
            for _ in range(5 if b <= 16 else 3):
                t = timed(lambda: run(q, h))
                if r > 0:
                    lines.append(f"{which}\t{b}\t{t:.9f}\n")
    with open(os.path.join(d, "samples.tsv"), "a") as f:
        f.writelines(lines)


def report(d):
    table, ids, queries, history, meta = load(d)
    k = int(meta["k"])
    threads = int(meta["threads"])
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(table.shape[1])
    index.add(table)
    ours = np.load(os.path.join(d, "rankd_ids.npy"))
    ours_scores = np.load(os.path.join(d, "rankd_scores.npy"))
    users = queries.shape[0]

    # Agreement on every user (all of them in one batch, and one at a time
    # for FAISS, whose small batches take another code path).
    fa = faiss_topk(index, ids, queries, history, k)
    fa1 = np.concatenate(
        [faiss_topk(index, ids, queries[i : i + 1], history[i : i + 1], k) for i in range(users)]
    )
    npy = numpy_topk(table, ids, queries, history, k)
    rows = {int(i): r for r, i in enumerate(ids)}
    in_history = sum(
        rows[int(i)] in set(history[u].tolist()) for u in range(users) for i in ours[u]
    )
    exact = np.float64(queries) @ np.float64(table).T
    np.put_along_axis(exact, history, -np.inf, axis=1)
    agree = {}
    for name, other in [("FAISS", fa), ("FAISS, one user a batch", fa1), ("numpy", npy)]:
        ordered = int((other == ours).all(axis=1).sum())
        same = sum(set(other[u].tolist()) == set(ours[u].tolist()) for u in range(users))
        agree[name] = (ordered, same)
    row_of = np.array([rows[int(i)] for i in ours.ravel()]).reshape(ours.shape)
    ref = np.take_along_axis(exact, row_of, axis=1)
    score_err = float(np.abs(ref - ours_scores).max())
    # The closest call between a user's k-th and (k+1)-th items (float64).
    best = -np.sort(-np.partition(exact, -(k + 1), axis=1)[:, -(k + 1) :], axis=1)
    margin = float((best[:, k - 1] - best[:, k]).min())

    samples = {}
    with open(os.path.join(d, "samples.tsv")) as f:
        for line in f:
            case, b, t = line.split("\t")
            samples.setdefault((case, int(b)), []).append(float(t))
    med = {key: statistics.median(v) for key, v in samples.items()}
    t_read = min(samples[("read", 0)])
    t_mm = min(samples[("matmul", 0)])
    n, dim = table.shape
    table_bytes = float(meta["table_bytes"])
    rate = float(meta["matmul_flops"]) / t_mm
    counts = {case: len(v) for (case, b), v in samples.items() if b == 1}

    print(
        f"anchors: N = {n}, d = {dim}, k = {k}, {users} users with 20-item histories "
        f"(one or two clusters) through the demo tower, history excluded, {threads} threads"
    )
    print(
        f"rankd: fused scan, {meta['isa']}; FAISS {faiss.__version__} IndexFlatIP "
        f"(SIMD level {faiss.SIMDConfig.get_level_name()}), search k + 20 then drop the history; "
        f"numpy {np.__version__}: q @ table.T, history masked, argpartition, sort of the k"
    )
    print(
        "samples per batch size: "
        + ", ".join(f"{c} {counts[c]}" for c in ("rankd", "faiss", "numpy", "rankd1", "faiss1", "numpy1"))
        + " (median reported; the passes alternate)"
    )
    print(
        f"roofs, same run (best sample): streaming read of {table_bytes / 1e6:.1f} MB "
        f"{t_read * 1e3:.3f} ms = {table_bytes / t_read / 1e9:.1f} GB/s; "
        f"matmul 2048^3 f32 (candle -> gemm) {t_mm * 1e3:.1f} ms = {rate / 1e9:.1f} GFLOP/s"
    )
    for name, (ordered, same) in agree.items():
        print(f"agreement with rankd, {name}: {ordered}/{users} users the same top {k} in the same order, {same}/{users} the same set")
    print(
        f"rankd's scores against float64: max error {score_err:.2e}; closest k-th/(k+1)-th margin {margin:.2e}; "
        f"rankd answers holding a history item: {in_history}"
    )
    print()
    print(
        "| batch | rankd | FAISS | numpy | FAISS / rankd | numpy / rankd | memory bound | compute bound "
        "| 1 thread: rankd, FAISS, numpy (FAISS / rankd, numpy / rankd) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in BATCHES:
        r, fs, nm, r1, f1, n1 = (
            med[(c, b)] for c in ("rankd", "faiss", "numpy", "rankd1", "faiss1", "numpy1")
        )
        flops = 2.0 * n * dim * b
        print(
            f"| {b} | {r * 1e3:.3f} ms | {fs * 1e3:.3f} ms | {nm * 1e3:.3f} ms | "
            f"{fs / r:.2f}× | {nm / r:.2f}× | {t_read * 1e3:.3f} ms | {flops / rate * 1e3:.3f} ms | "
            f"{r1 * 1e3:.3f} ms, {f1 * 1e3:.3f} ms, {n1 * 1e3:.3f} ms ({f1 / r1:.2f}×, {n1 / r1:.2f}×) |"
        )


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "time" and sys.argv[4] in ("faiss", "numpy", "faiss1", "numpy1"):
        time_anchor(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
