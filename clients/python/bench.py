#!/usr/bin/env python3
"""Round trips per second of the blocking client, one thread, socket
`recommend`, on users with histories (written first, users 1..USERS).

Usage: python3 clients/python/bench.py unix:///path/rankd.sock [SECONDS] [USERS]
Compare with `rankd bench --uds PATH --concurrency 1 --users USERS` on the
same daemon: the difference is the client's own overhead."""

import sys
import time

import rankd


def main():
    target = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    users = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    with rankd.Client(target) as c:
        for u in range(1, users + 1):
            c.upsert_user(u, history=[(u * 7919 + j * 104729) % 100000 + 1 for j in range(1 + u % 50)])
        end = time.perf_counter() + 1.0
        u = 0
        while time.perf_counter() < end:  # warm-up
            c.recommend("demo", 1 + u % users)
            u += 1
        lat = []
        start = time.perf_counter()
        end = start + seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            c.recommend("demo", 1 + u % users, k=10)
            lat.append(time.perf_counter() - t0)
            u += 1
        took = time.perf_counter() - start
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6  # noqa: E731
    print(f"python Client, 1 thread: {len(lat) / took:.0f} req/s, p50 {p(0.5):.0f} us, "
          f"p99 {p(0.99):.0f} us ({len(lat)} requests in {took:.1f} s)")


if __name__ == "__main__":
    main()
