"""A pipeline's recommend against the two calls a client would make instead
(the retrieval model's recommend of `candidates` items, then the ranker's
score of them, then a sort), over the socket, closed loop, in one run.

Usage: python3 benches/pipeline.py SOCKET CLIENTS SECONDS (benches/pipeline.sh
starts the daemon and sets the paths)."""

import asyncio
import sys
import time

import rankd

CANDIDATES = 200
K = 10
USERS = 5000


def history(u):
    # Items of a few neighbourhoods of the id space: real histories, so every
    # query vector differs and nothing ties.
    return [(u * 7919 + j * 104729) % 100000 + 1 for j in range(5 + u % 20)]


async def pipeline_call(c, user):
    r = await c.recommend("feed", user, k=K)
    return [i.id for i in r.items]


async def two_calls(c, user):
    r = await c.recommend("demo", user, k=CANDIDATES)
    ids = [i.id for i in r.items]
    s = await c.score("demo-ranker", user, ids)
    ranked = sorted(zip(s.scores, ids), key=lambda t: (-t[0], t[1]))
    return [i for _, i in ranked[:K]]


async def closed_loop(target, call, clients, seconds):
    latencies = []
    async with rankd.AsyncClient(target) as c:
        stop = time.perf_counter() + seconds

        async def worker(w):
            user = w
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await call(c, 1 + user % USERS)
                latencies.append(time.perf_counter() - t)
                user += clients

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return len(latencies) / elapsed, q(0.5), q(0.99)


async def main():
    sock, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    target = f"unix://{sock}"
    with rankd.Client(target) as c:
        for u in range(1, USERS + 1):
            c.upsert_user(u, history=history(u))
    async with rankd.AsyncClient(target) as c:
        # Both ways give the same lists (ranker scores of one batch of 200).
        for u in (1, 2, 3):
            assert await pipeline_call(c, u) == await two_calls(c, u), u
    rows = []
    for name, call in (("pipeline (one call)", pipeline_call), ("two calls by the client", two_calls)):
        await closed_loop(target, call, clients, 1.0)  # warm-up
        rows.append((name, *await closed_loop(target, call, clients, seconds)))
    print(f"| way | clients | lists/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for name, rps, p50, p99 in rows:
        print(f"| {name} | {clients} | {rps:.0f} | {p50:.2f} | {p99:.2f} |")


asyncio.run(main())
