#!/usr/bin/env python3
"""Answers of a rankd under test against a CPU rankd, end to end over HTTP.

    compare.py URL_UNDER_TEST URL_CPU_REFERENCE OUT.json

Both daemons serve the same demo models. The script gives the same users
(random histories, half with features) to both, then sends both the same
recommend requests (k from 1 to 1000, some with exclusions) and score
requests (two-tower and ranker), 16 at a time so the daemon under test runs
multi-request batches of changing sizes. It prints one line and writes the
details; the exit status is 1 when any answer disagrees beyond rounding.

Agreement rule (f32 item table): every score within 1e-4 relative (1e-4
absolute below 1); a top-k list may differ in ids only where the two items'
scores are that close (a near tie that rounding may order either way).
"""
import json
import random
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TOL = 1e-4


def call(base, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def close(a, b):
    return abs(a - b) <= TOL * max(1.0, abs(b))


def main():
    dut, ref, out = sys.argv[1], sys.argv[2], sys.argv[3]
    device = call(dut, "/readyz").get("device")
    rng = random.Random(7)
    pool = [it["id"] for it in call(ref, "/v1/models/demo/recommend", {"user_id": 10**15, "k": 1000})["items"]]
    users = list(range(1, 65))
    for u in users:
        body = {"history": rng.sample(pool, rng.randint(0, 40))}
        if u % 2:
            body["features"] = [rng.uniform(-1, 1) for _ in range(16)]
        for base in (dut, ref):
            call(base, f"/v1/users/{u}", body)

    requests = []
    for u in users:
        k = rng.choice([1, 10, 10, 100, 1000])
        body = {"user_id": u, "k": k}
        if rng.random() < 0.3:
            body["exclude"] = rng.sample(pool, 20)
        requests.append(("/v1/models/demo/recommend", body))
        requests.append(("/v1/models/demo/score", {"user_id": u, "items": rng.sample(pool, 50)}))
        requests.append(("/v1/models/demo-ranker/score", {"user_id": u, "items": rng.sample(pool, 100)}))
    rng.shuffle(requests)

    def both(req):
        path, body = req
        return path, body, call(dut, path, body), call(ref, path, body)

    # The daemon under test gets 16 concurrent requests (multi-request batches).
    with ThreadPoolExecutor(16) as ex:
        answers = list(ex.map(lambda r: (r[0], r[1], call(dut, r[0], r[1])), requests))
    report = {"device": device, "recommend": 0, "identical_lists": 0, "near_tie_swaps": 0,
              "scores": 0, "max_rel_diff": 0.0, "failures": []}
    for path, body, got in answers:
        want = call(ref, path, body)
        if path.endswith("/recommend"):
            report["recommend"] += 1
            g, w = got["items"], want["items"]
            ok = len(g) == len(w)
            for a, b in zip(g, w):
                report["max_rel_diff"] = max(report["max_rel_diff"], abs(a["score"] - b["score"]) / max(1.0, abs(b["score"])))
                ok &= close(a["score"], b["score"])
            if [x["id"] for x in g] == [x["id"] for x in w]:
                report["identical_lists"] += 1
            elif ok:
                report["near_tie_swaps"] += 1
            if not ok:
                report["failures"].append({"request": body, "got": g[:5], "want": w[:5]})
        else:
            g, w = got["scores"], want["scores"]
            report["scores"] += len(w)
            ok = len(g) == len(w)
            for a, b in zip(g, w):
                report["max_rel_diff"] = max(report["max_rel_diff"], abs(a - b) / max(1.0, abs(b)))
                ok &= close(a, b)
            if not ok:
                report["failures"].append({"path": path, "request": body, "got": g[:5], "want": w[:5]})
    json.dump(report, open(out, "w"), indent=1)
    n = report["recommend"]
    print(f"{device} vs cpu: {report['identical_lists']}/{n} top-k lists identical, "
          f"{report['near_tie_swaps']} near-tie swaps, {report['scores']} scores, "
          f"max rel diff {report['max_rel_diff']:.2e}, {len(report['failures'])} disagreements")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
