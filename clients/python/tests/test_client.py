"""The client against a real rankd: every method on both transports and both
clients, the same answers everywhere, pipelining, errors, and restarts."""

import asyncio
import shutil
import struct
import threading

import pytest

import rankd
from conftest import USERS, Daemon, history, wait_gone


def targets(d):
    return [d.unix, d.http]


def c_f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_every_method_sync(with_state):
    d = with_state
    for n, target in enumerate(targets(d)):
        with rankd.Client(target) as c:
            h = c.health()
            assert isinstance(h, rankd.Health) and h.ready and h.models["demo"] == "ready", h
            ms = {m.name: m for m in c.models()}
            assert ms["demo"].kind == "two_tower" and ms["demo"].dim == 64, ms
            assert ms["demo-ranker"].kind == "ranker"
            user = 1000 + n
            u = c.upsert_user(user, history=[1, 2, 3])
            assert u == rankd.User(user, [1, 2, 3], None)
            u = c.upsert_user(user, features=[0.5] * 16)
            assert u.history == [1, 2, 3] and u.features == [0.5] * 16
            r = c.recommend("demo", user, k=5, exclude=[1], timeout_ms=500)
            assert isinstance(r, rankd.Recommendation)
            assert (r.model, r.version, r.degraded, len(r.items)) == ("demo", 1, False, 5)
            assert all(isinstance(i, rankd.ScoredItem) for i in r.items)
            assert [i.score for i in r.items] == sorted((i.score for i in r.items), reverse=True)
            assert 1 not in [i.id for i in r.items]
            s = c.score("demo-ranker", user, [i.id for i in r.items])
            assert isinstance(s, rankd.Scores) and s.model == "demo-ranker" and len(s.scores) == 5
            assert all(0.0 <= x <= 1.0 for x in s.scores)
            item = 99000 + n
            it = c.upsert_item(item, embedding=[0.01] * 64, version=10)
            assert it == rankd.Item(item, 10, False, True, "demo")
            assert c.upsert_item(item, embedding=[0.02] * 64, version=5).applied is False
            stored = c.get_item("demo", item)
            assert stored == rankd.StoredItem("demo", item, 10, False, [c_f32(0.01)] * 64)
            it = c.upsert_item(item, deleted=True, version=11, catalogue="demo")
            assert (it.deleted, it.applied, it.catalogue) == (True, True, "demo")
            [cat] = c.catalogues()
            assert (cat.name, cat.dim) == ("demo", 64) and "demo@1" in cat.models, cat
            assert cat.rows > cat.live_rows, "deleted rows stay allocated"
            # The filter reaches the daemon on both transports (the demo
            # catalogue has no attributes to filter on).
            with pytest.raises(rankd.InvalidRequest, match="catalogue 'demo' has: none"):
                c.recommend("demo", user, k=3, filter={"in_stock": 1})
            with pytest.raises(rankd.InvalidRequest, match="unknown attribute 'in_stock'"):
                c.upsert_item(item, attributes={"in_stock": 1}, catalogue="demo")


def test_every_method_async(with_state):
    d = with_state

    async def run():
        for n, target in enumerate(targets(d)):
            async with rankd.AsyncClient(target) as c:
                h = await c.health()
                assert h.ready, h
                assert {m.name for m in await c.models()} >= {"demo", "demo-ranker"}
                user = 2000 + n
                u = await c.upsert_user(user, history=[4, 5, 6], features=[0.25] * 16)
                assert u == rankd.User(user, [4, 5, 6], [0.25] * 16)
                r = await c.recommend("demo", user, k=3, exclude=[4])
                assert len(r.items) == 3 and 4 not in [i.id for i in r.items]
                s = await c.score("demo", user, [i.id for i in r.items])
                assert s.scores == pytest.approx([i.score for i in r.items], rel=1e-6)
                item = 98000 + n
                it = await c.upsert_item(item, embedding=[0.01] * 64)
                assert (it.item_id, it.deleted, it.applied) == (item, False, True)
                it = await c.upsert_item(item, deleted=True)
                assert it.deleted
                assert (await c.get_item("demo", item)).deleted
                assert [x.name for x in await c.catalogues()] == ["demo"]

    asyncio.run(run())


def test_answers_are_equal_across_transports_and_clients(with_state):
    d = with_state
    answers = []
    for target in targets(d):
        with rankd.Client(target) as c:
            answers.append([(c.recommend("demo", u, k=10), c.score("demo-ranker", u, [1, 2, 3]))
                            for u in USERS])

    async def run(target):
        async with rankd.AsyncClient(target) as c:
            return [(await c.recommend("demo", u, k=10), await c.score("demo-ranker", u, [1, 2, 3]))
                    for u in USERS]

    for target in targets(d):
        answers.append(asyncio.run(run(target)))
    assert all(a == answers[0] for a in answers[1:])
    # The histories matter: users do not all get the same items.
    assert len({tuple(i.id for i in r.items) for r, _ in answers[0]}) > 1


def test_a_thousand_concurrent_async_calls_share_one_connection(with_state):
    d = with_state
    with rankd.Client(d.unix) as c:
        want = {(u, k): c.recommend("demo", u, k=k) for u in USERS for k in (1, 7, 20)}

    async def run():
        async with rankd.AsyncClient(d.unix) as c:
            await c.health()
            conn = c._t.conn
            keys = [(USERS[i % len(USERS)], (1, 7, 20)[i % 3]) for i in range(1000)]
            got = await asyncio.gather(*(c.recommend("demo", u, k=k) for u, k in keys))
            assert c._t.conn is conn and not conn.closed
            assert next(conn.ids) == 1002  # health and the 1000 calls, all on it
            return keys, got

    keys, got = asyncio.run(run())
    # Matched by id: each answer is its own request's (users and k differ).
    # Batched scoring may differ from a lone request's in the last bits.
    for key, r in zip(keys, got):
        w = want[key]
        assert (r.model, [i.id for i in r.items]) == (w.model, [i.id for i in w.items]), key
        assert [i.score for i in r.items] == pytest.approx([i.score for i in w.items], rel=1e-5)


def test_sync_client_is_shared_between_threads(with_state):
    d = with_state
    with rankd.Client(d.unix) as c:
        want = {u: c.recommend("demo", u) for u in USERS}
        errors = []

        def worker():
            try:
                for u in USERS:
                    assert c.recommend("demo", u) == want[u]
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == []


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_errors_are_typed(with_state, transport):
    d = with_state
    target = d.unix if transport == "unix" else d.http
    with rankd.Client(target) as c:
        with pytest.raises(rankd.NotFound) as e:
            c.recommend("nope", 1)
        assert e.value.type == "not_found" and "nope" in e.value.message
        with pytest.raises(rankd.InvalidRequest) as e:
            c.recommend("demo", 1, k=5000)
        assert e.value.type == "invalid" and "1000" in e.value.message and "5000" in e.value.message
        with pytest.raises(rankd.InvalidRequest):
            c.score("demo", 1, [])
        assert isinstance(e.value, rankd.RankdError)
        # The connection survives an error answer.
        assert c.health().ready


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_overloaded_and_deadline_exceeded(with_state, transport):
    d = with_state
    target = d.unix if transport == "unix" else d.http

    async def run():
        async with rankd.AsyncClient(target) as c:
            first = asyncio.ensure_future(c.recommend("slow", 1, timeout_ms=50))
            await asyncio.sleep(0.02)
            with pytest.raises(rankd.Overloaded) as e:
                await c.recommend("slow", 2)
            assert "max_queue_size is 1" in e.value.message
            assert e.value.retry_after == (1.0 if transport == "http" else None)
            with pytest.raises(rankd.DeadlineExceeded) as e:
                await first
            assert "50" in e.value.message
            await asyncio.sleep(0.4)
            assert len((await c.recommend("slow", 3, k=3)).items) == 3

    asyncio.run(run())


def test_not_ready(broken_repo, tmp_path):
    d = Daemon(broken_repo, tmp_path).start()
    try:
        for target in (d.unix, d.http):
            with rankd.Client(target) as c:
                h = c.health()
                assert not h.ready and h.models["broken"] == "failed" and h.reason, h
                with pytest.raises(rankd.NotReady) as e:
                    c.recommend("broken", 1)
                assert e.value.type == "not_ready"
                assert len(c.recommend("demo", 1, k=2).items) == 2
    finally:
        d.stop()


def test_connection_failures_name_the_target(tmp_path):
    for target in (f"unix://{tmp_path}/no.sock", "http://127.0.0.1:9"):
        with rankd.Client(target) as c:
            with pytest.raises(rankd.ConnectionError) as e:
                c.health()
            assert target in str(e.value) and isinstance(e.value, rankd.RankdError)

        async def run():
            async with rankd.AsyncClient(target) as c:
                await c.health()

        with pytest.raises(rankd.ConnectionError, match=target):
            asyncio.run(run())
    with pytest.raises(ValueError, match="ftp://x"):
        rankd.Client("ftp://x")


def test_the_client_reconnects_after_a_daemon_restart(own_daemon):
    d = own_daemon
    sync_clients = [rankd.Client(d.unix), rankd.Client(d.http)]
    for c in sync_clients:
        c.upsert_user(7, history=[1, 2, 3])
        assert c.health().ready

    async def run():
        c = rankd.AsyncClient(d.unix)
        before = await c.recommend("demo", 7)

        def restart():
            d.stop()
            wait_gone(d.sock_path)
            d.start()

        await asyncio.to_thread(restart)
        # The next call goes to the new daemon, on a new connection.
        assert (await c.health()).ready
        assert (await c.recommend("demo", 7)).model == before.model
        await c.close()

    asyncio.run(run())
    for c in sync_clients:
        assert c.health().ready, c.target
        assert len(c.recommend("demo", 7, k=4).items) == 4
        c.close()
    # Without the daemon: a ConnectionError, and after it is back, answers again.
    d.stop()
    with rankd.Client(d.unix) as c:
        with pytest.raises(rankd.ConnectionError):
            c.health()
        d.start()
        assert c.health().ready


def test_client_tokens_are_sent_as_bearer_and_a_refusal_is_unauthorized(demo_repo, tmp_path):
    tokens = tmp_path / "client-tokens"
    tokens.write_text("s3cret\n")
    d = Daemon(demo_repo, tmp_path, extra=["--client-token-file", str(tokens)]).start()
    try:
        with rankd.Client(d.http, token="s3cret") as c:
            assert len(c.recommend("demo", 1, k=2).items) == 2
        for token in ("wrong", None):
            with rankd.Client(d.http, token=token) as c:
                with pytest.raises(rankd.Unauthorized) as e:
                    c.recommend("demo", 1, k=2)
                assert e.value.type == "unauthorized"
                # Probes stay open.
                assert c.health().ready
    finally:
        d.stop()


def test_a_version_is_asked_for_by_number(demo_repo, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(demo_repo, repo, symlinks=True)
    shutil.copytree(repo / "demo" / "1", repo / "demo" / "2")
    d = Daemon(repo, tmp_path).start()
    try:
        for target in (d.http, d.unix):
            with rankd.Client(target) as c:
                c.upsert_user(1, history=history(1))
                assert c.recommend("demo", 1, k=2).version == 2
                assert c.recommend("demo", 1, k=2, version=2).version == 2
                assert c.score("demo", 1, [1, 2], version=2).version == 2
                with pytest.raises(rankd.NotFound) as e:
                    c.recommend("demo", 1, k=2, version=9)
                assert "9" in e.value.message
    finally:
        d.stop()


def test_version_is_sent_only_when_given(with_state):
    # HTTP rejects unknown fields: a recommend without version= answers, so
    # the client left the key out.
    with rankd.Client(with_state.http) as c:
        assert len(c.recommend("demo", 1, k=2).items) == 2
        assert len(c.score("demo", 1, [1, 2]).scores) == 2


def test_a_pipeline_answers_with_both_stages_versions(demo_repo, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(demo_repo, repo, symlinks=True)
    (repo / "feed" / "1").mkdir(parents=True)
    (repo / "feed" / "1" / "model.toml").write_text(
        'kind = "pipeline"\nretrieve = "demo"\ncandidates = 50\nrank = "demo-ranker"\n')
    d = Daemon(repo, tmp_path).start()
    try:
        answers = []
        for target in targets(d):
            with rankd.Client(target) as c:
                c.upsert_user(7, history=history(7))
                r = c.recommend("feed", 7, k=5)
                assert r.model == "feed" and r.versions == {"retrieve": 1, "rank": 1}, r
                assert len(r.items) == 5 and len(r.retrieval_scores) == 5
                assert [i.score for i in r.items] == sorted((i.score for i in r.items), reverse=True)
                ranked = c.score("demo-ranker", 7, [i.id for i in r.items])
                # One batch of 50 candidates against one of 5: equal to float rounding.
                assert [i.score for i in r.items] == pytest.approx(ranked.scores, rel=1e-5)
                answers.append(r)
                [line] = list(c.bulk("feed", [rankd.RecommendRequest(7, k=5)]))
                assert line.unwrap() == r, line
        assert answers[0] == answers[1]
    finally:
        d.stop()


def onnx_repo(tmp_path):
    """The PyTorch fixture repository's catalogue, its ranker reading
    categorical user features and a context (dcn-legacy), and a tower that
    reads no context (sasrec-legacy)."""
    import json

    from conftest import ROOT

    fixtures = ROOT / "tests" / "fixtures" / "onnx"
    repo = tmp_path / "models"
    for name in ("catalogues", "dcn-legacy", "sasrec-legacy"):
        shutil.copytree(fixtures / name, repo / name)
    expected = json.loads((fixtures / "expected.json").read_text())
    return repo, expected


def test_sparse_features_and_a_context_reach_the_model(tmp_path):
    repo, expected = onnx_repo(tmp_path)
    d = Daemon(repo, tmp_path).start()
    try:
        users = [u for u in expected["users"] if u["sparse"] is not None and u["context"] is not None]
        for target in targets(d):
            with rankd.Client(target) as c:
                for u in users:
                    stored = c.upsert_user(u["user"], history=u["history"], sparse=u["sparse"])
                    assert stored.sparse == u["sparse"], stored
                    want = u["dcn"]["probabilities"]
                    got = c.score("dcn-legacy", u["user"], u["dcn"]["candidates"], context=u["context"])
                    assert got.scores == pytest.approx(want, rel=1e-5, abs=1e-5)
                    [line] = list(c.bulk("dcn-legacy", [
                        rankd.ScoreRequest(u["user"], u["dcn"]["candidates"], context=u["context"])]))
                    assert line.unwrap().scores == pytest.approx(want, rel=1e-5, abs=1e-5)
                with pytest.raises(rankd.InvalidRequest) as e:
                    c.score("dcn-legacy", 1, [1000], context=[1.0, 2.0, 3.0])
                assert "context must have 2 values (context_dim), got 3" in e.value.message
                with pytest.raises(rankd.InvalidRequest) as e:
                    c.recommend("sasrec-legacy", 1, k=2, context=[1.0])
                assert "reads no context (context_dim = 0), got 1 values" in e.value.message
                with pytest.raises(rankd.InvalidRequest) as e:
                    c.upsert_user(1, sparse=[1, 2])
                assert "sparse must have 3 values (user_sparse_dim), got 2" in e.value.message
                assert c.upsert_user(99, history=[1003]).sparse is None

        async def run():
            async with rankd.AsyncClient(d.unix) as c:
                u = users[0]
                stored = await c.upsert_user(u["user"], sparse=u["sparse"])
                assert stored.sparse == u["sparse"]
                got = await c.score("dcn-legacy", u["user"], u["dcn"]["candidates"], context=u["context"])
                assert got.scores == pytest.approx(u["dcn"]["probabilities"], rel=1e-5, abs=1e-5)

        asyncio.run(run())
    finally:
        d.stop()
