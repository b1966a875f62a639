"""`bulk` against a real rankd: both clients over both transports give what
one-by-one calls give, in input order, a bad line alone fails, the input is
read lazily and streamed, and a call cut by a shutdown raises after the
results that arrived."""

import asyncio
import itertools
import signal
import time

import pytest

import rankd
from conftest import USERS, Daemon

MODES = [("sync", "unix"), ("sync", "http"), ("async", "unix"), ("async", "http")]
IDS = [f"{c}-{t}" for c, t in MODES]
NEW_USER = 777_001  # never written: a cold start


def target(d, transport):
    return d.unix if transport == "unix" else d.http


def run_bulk(client, d, transport, model, requests, on_result=None, timeout=30.0, **kw):
    """All results of one bulk call, and the exception that ended it (or None)."""
    got = []
    if client == "sync":
        with rankd.Client(target(d, transport), timeout=timeout) as c:
            try:
                for r in c.bulk(model, requests, **kw):
                    got.append(r)
                    if on_result is not None:
                        on_result(c, r)
            except Exception as e:  # noqa: BLE001 -- returned to the test
                return got, e
        return got, None

    async def run():
        async with rankd.AsyncClient(target(d, transport), timeout=timeout) as c:
            try:
                async for r in c.bulk(model, requests, **kw):
                    got.append(r)
                    if on_result is not None:
                        await on_result(c, r)
            except Exception as e:  # noqa: BLE001 -- returned to the test
                return e
        return None

    return got, asyncio.run(run())


def one_by_one(d, transport, model, requests):
    with rankd.Client(target(d, transport)) as c:
        out = []
        for q in requests:
            if isinstance(q, rankd.ScoreRequest):
                out.append(c.score(model, q.user_id, q.items))
            elif isinstance(q, rankd.RecommendRequest):
                out.append(c.recommend(model, q.user_id, k=q.k, exclude=q.exclude))
            elif "items" in q:
                out.append(c.score(model, q["user_id"], q["items"]))
            else:
                out.append(c.recommend(model, q["user_id"], k=q.get("k", 10), exclude=q.get("exclude")))
        return out


def same_answer(got, want):
    """Batched scoring may differ from a lone request's in the last bits."""
    assert type(got) is type(want), (got, want)
    assert (got.model, got.version) == (want.model, want.version)
    if isinstance(want, rankd.Scores):
        assert got.scores == pytest.approx(want.scores, rel=1e-5, abs=1e-6)
    else:
        assert [i.id for i in got.items] == [i.id for i in want.items]
        assert [i.score for i in got.items] == pytest.approx([i.score for i in want.items], rel=1e-5)
        assert (got.degraded, got.cold_start) == (want.degraded, want.cold_start)


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_bulk_matches_one_by_one_calls(with_state, client, transport):
    d = with_state
    demo = []
    for u in USERS:
        demo.append(rankd.RecommendRequest(u, k=10) if u % 2 else {"user_id": u, "k": 7, "exclude": [u, u + 1]})
        demo.append(rankd.ScoreRequest(u, [u, 2 * u, 3 * u]) if u % 3 else {"user_id": u, "items": [5, 1, 4]})
    ranker = [rankd.ScoreRequest(u, [1, 2, 3]) for u in USERS]
    for model, requests in (("demo", demo), ("demo-ranker", ranker)):
        got, err = run_bulk(client, d, transport, model, iter(requests))
        assert err is None, err
        want = one_by_one(d, transport, model, requests)
        assert [r.line for r in got] == list(range(1, len(requests) + 1))
        for q, r, w in zip(requests, got, want):
            uid = q.user_id if not isinstance(q, dict) else q["user_id"]
            assert r.ok and r.user_id == uid and r.model == model, r
            assert (r.scores is None) == isinstance(w, rankd.Recommendation)
            same_answer(r.unwrap(), w)
            assert not r.cold_start  # every one of USERS has a history
    # The histories matter: users do not all get the same items.
    recs = [r for r in got if r.items is not None]
    assert len({tuple(i.id for i in r.items) for r in recs}) > 1 or model == "demo-ranker"


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_a_user_without_history_is_a_cold_start(with_state, client, transport):
    d = with_state
    got, err = run_bulk(client, d, transport, "demo", [{"user_id": NEW_USER, "k": 5}, {"user_id": 1, "k": 5}])
    assert err is None, err
    assert [(r.line, r.user_id, r.cold_start, len(r.items)) for r in got] == [
        (1, NEW_USER, True, 5), (2, 1, False, 5)]
    with rankd.Client(target(d, transport)) as c:
        assert c.recommend("demo", NEW_USER, k=5).cold_start


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_a_bad_line_yields_its_error_and_the_rest_go_on(with_state, client, transport):
    d = with_state
    requests = [
        {"user_id": 1, "k": 3},
        {"user_id": 2, "k": 3, "nope": 1},         # unknown field
        {"user_id": 3, "k": 5000},                 # k over the limit
        {"user_id": 4, "items": [1], "k": 2},      # both kinds
        {"user_id": "five", "k": 3},               # wrong type
        {"user_id": 6, "items": []},               # nothing to score
        rankd.ScoreRequest(7, [1, 2]),
        {"user_id": 8, "k": 3},
    ]
    got, err = run_bulk(client, d, transport, "demo", requests)
    assert err is None, err
    assert [r.line for r in got] == list(range(1, 9))
    assert [r.ok for r in got] == [True, False, False, False, False, False, True, True]
    for r in got:
        if not r.ok:
            assert isinstance(r.error, rankd.InvalidRequest) and r.error.type == "invalid", r
            assert r.user_id is None and r.items is None and r.scores is None
            with pytest.raises(rankd.InvalidRequest):
                r.unwrap()
    assert "nope" in got[1].error.message
    assert "5000" in got[2].error.message
    assert (got[6].user_id, len(got[6].scores)) == (7, 2)
    assert (got[7].user_id, len(got[7].items)) == (8, 3)


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_results_stay_in_input_order_across_chunks(with_state, client, transport):
    d = with_state
    n = 2500
    requests = [{"user_id": 1 + i % 60, "items": list(range(1, 2 + i % 9))} if i % 3 == 0 else
                {"user_id": 1 + i % 60, "k": 1 + i % 50} for i in range(n)]
    # Small chunks: many socket ops, their line numbers continued.
    got, err = run_bulk(client, d, transport, "demo", requests, chunk_size=300)
    assert err is None, err
    assert [r.line for r in got] == list(range(1, n + 1))
    for q, r in zip(requests, got):
        assert r.ok and r.user_id == q["user_id"], r
        if "items" in q:
            assert len(r.scores) == len(q["items"])
        else:
            assert len(r.items) == q["k"]


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_a_generator_of_5000_lines_is_read_as_results_arrive(with_state, client, transport):
    d = with_state
    n = 5000
    read = [0]
    ahead = []

    def lines():
        for i in range(n):
            read[0] += 1
            yield {"user_id": 1 + i % 50, "k": 5}

    def note(c, r):
        ahead.append(read[0] - r.line)  # lines read beyond this result

    async def anote(c, r):
        note(c, r)

    got, err = run_bulk(client, d, transport, "demo", lines(),
                        on_result=note if client == "sync" else anote)
    assert err is None, err
    assert [r.line for r in got] == list(range(1, n + 1))
    assert all(r.ok and len(r.items) == 5 for r in got)
    if transport == "unix":
        # At most two chunks of 1,000 in flight, and the one line that
        # started the next chunk.
        assert max(ahead) <= 2001, max(ahead)


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_results_arrive_while_the_input_is_still_open(with_state, transport):
    """Full duplex: the input waits for the first result before it goes on."""
    d = with_state

    async def run():
        first = asyncio.Event()

        async def lines():
            for i in range(10):
                yield {"user_id": 1 + i, "k": 2}
            await asyncio.wait_for(first.wait(), 10)
            for i in range(10):
                yield {"user_id": 11 + i, "k": 2}

        async with rankd.AsyncClient(target(d, transport)) as c:
            got = []
            async for r in c.bulk("demo", lines(), chunk_size=10):
                got.append(r)
                first.set()
            return got

    got = asyncio.run(run())
    assert [(r.line, r.user_id) for r in got] == [(i, i) for i in range(1, 21)]


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_an_input_that_pauses_past_the_timeout_is_no_error(with_state, client, transport):
    """The client's timeout waits on the daemon, not on the caller's input."""
    d = with_state

    def lines():
        for i in range(10):
            yield {"user_id": 1 + i, "k": 2}
        time.sleep(1.0)
        for i in range(10):
            yield {"user_id": 11 + i, "k": 2}

    async def alines():
        for i in range(10):
            yield {"user_id": 1 + i, "k": 2}
        await asyncio.sleep(1.0)
        for i in range(10):
            yield {"user_id": 11 + i, "k": 2}

    got, err = run_bulk(client, d, transport, "demo", lines() if client == "sync" else alines(),
                        timeout=0.3, chunk_size=5)
    assert err is None, err
    assert [(r.line, r.user_id) for r in got] == [(i, i) for i in range(1, 21)]


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_an_unknown_model_raises_not_found(with_state, client, transport):
    got, err = run_bulk(client, with_state, transport, "nope", [{"user_id": 1}])
    assert got == [] and isinstance(err, rankd.NotFound) and "nope" in err.message, err


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_a_failing_input_is_raised_and_the_client_goes_on(with_state, client, transport):
    d = with_state

    def lines():
        yield {"user_id": 1, "k": 2}
        yield {"user_id": 2, "k": 2}
        raise ValueError("the input broke")

    got, err = run_bulk(client, d, transport, "demo", lines(), chunk_size=1)
    assert isinstance(err, ValueError) and "the input broke" in str(err), err
    got, err = run_bulk(client, d, transport, "demo", [object()])
    assert isinstance(err, TypeError) and "object" in str(err), err
    with rankd.Client(target(d, transport)) as c:
        assert c.health().ready


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_other_calls_share_the_client_during_a_bulk_call(with_state, client, transport):
    d = with_state
    with rankd.Client(d.unix) as c:
        want = {u: c.recommend("demo", u, k=3) for u in USERS}
    seen = []

    def check(c, r):
        if r.line % 250 == 0:
            u = USERS[r.line % len(USERS)]
            same_answer(c.recommend("demo", u, k=3), want[u])
            seen.append(r.line)

    async def acheck(c, r):
        if r.line % 250 == 0:
            u = USERS[r.line % len(USERS)]
            same_answer(await c.recommend("demo", u, k=3), want[u])
            seen.append(r.line)

    requests = ({"user_id": 1 + i % 50, "k": 3} for i in range(3000))
    got, err = run_bulk(client, d, transport, "demo", requests, chunk_size=400,
                        on_result=check if client == "sync" else acheck)
    assert err is None, err
    assert [r.line for r in got] == list(range(1, 3001)) and len(seen) == 12


def test_concurrent_async_bulk_calls_share_one_connection(with_state):
    d = with_state

    async def run():
        async with rankd.AsyncClient(d.unix) as c:
            await c.health()
            conn = c._t.conn

            async def one(base):
                return [r async for r in c.bulk("demo", ({"user_id": base + i % 7, "k": 2} for i in range(1500)),
                                                chunk_size=200)]

            a, b, rec = await asyncio.gather(one(1), one(20), c.recommend("demo", 3, k=2))
            assert c._t.conn is conn and not conn.closed and conn.streams == {}
            return a, b, rec

    a, b, rec = asyncio.run(run())
    assert [r.line for r in a] == [r.line for r in b] == list(range(1, 1501))
    assert {r.user_id for r in a} == set(range(1, 8)) and {r.user_id for r in b} == set(range(20, 27))
    assert len(rec.items) == 2


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_an_abandoned_bulk_call_leaves_the_client_usable(with_state, client, transport):
    d = with_state
    requests = [{"user_id": 1 + i % 50, "k": 4} for i in range(3000)]
    if client == "sync":
        with rankd.Client(target(d, transport)) as c:
            for r in c.bulk("demo", requests):
                if r.line == 5:
                    break
            assert len(c.recommend("demo", 1, k=2).items) == 2
            assert [r.line for r in c.bulk("demo", requests[:700])] == list(range(1, 701))
        return

    async def run():
        async with rankd.AsyncClient(target(d, transport)) as c:
            agen = c.bulk("demo", requests)
            async for r in agen:
                if r.line == 5:
                    break
            await agen.aclose()
            assert len((await c.recommend("demo", 1, k=2)).items) == 2
            assert [r.line async for r in c.bulk("demo", requests[:700])] == list(range(1, 701))

    asyncio.run(run())


@pytest.mark.parametrize("client,transport", MODES, ids=IDS)
def test_a_call_cut_by_shutdown_raises_after_the_results_that_arrived(demo_repo, tmp_path, monkeypatch,
                                                                      client, transport):
    # The daemon cuts streaming calls a tenth of the grace period (at most
    # 200 ms) before its end, when it closes what is still open.
    monkeypatch.setenv("RANKD_GRACE_MS", "100" if transport == "http" else "2000")
    d = Daemon(demo_repo, tmp_path).start()
    try:
        if transport == "http":
            # The body stays open, idle, past the grace period: the daemon
            # cuts the call, after the 100 lines it had.
            def lines():
                for i in range(100):
                    yield {"user_id": 1 + i % 50, "k": 2}
                d.proc.send_signal(signal.SIGTERM)
                time.sleep(1.0)
                yield {"user_id": 1, "k": 2}

            async def alines():
                for i in range(100):
                    yield {"user_id": 1 + i % 50, "k": 2}
                d.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(5)
                yield {"user_id": 1, "k": 2}

            got, err = run_bulk(client, d, transport, "demo", lines() if client == "sync" else alines())
            assert len(got) == 100
        else:
            # A chunk as large as a frame allows (about 34,000 lines, seconds
            # of work at k=100) is still being served when the call is cut.
            def stop(c, r):
                if r.line == 1:
                    d.proc.send_signal(signal.SIGTERM)

            async def astop(c, r):
                stop(c, r)

            got, err = run_bulk(client, d, transport, "demo",
                                ({"user_id": 1 + i % 50, "k": 100} for i in itertools.count()),
                                on_result=stop if client == "sync" else astop, chunk_size=100_000)
        if transport == "unix" and isinstance(err, rankd.ConnectionError):
            # The daemon closes its socket connections at the end of the
            # grace period, and that can overtake the cut frame still queued
            # behind the results; the results that came stay whole.
            assert "closed the connection" in err.message or "reset" in err.message, err
        else:
            assert isinstance(err, rankd.NotReady) and "shutting down" in err.message, err
        assert len(got) > 0
        assert [r.line for r in got] == list(range(1, len(got) + 1)) and all(r.ok for r in got)
    finally:
        d.stop()
