"""The asyncio client. Over the socket, every call from every task shares one
connection: requests are pipelined and answers matched by id. A `bulk` op is
answered by many frames with its id: they go to the call's queue (`streams`)
until its final frame."""

import asyncio
import itertools
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Sequence, Tuple

import msgpack

from . import _bulk, _core
from . import _types as t
from ._errors import ConnectionError


class _Conn:
    def __init__(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.target, self.reader, self.writer = target, reader, writer
        self.pending: Dict[int, "asyncio.Future[Any]"] = {}
        self.streams: Dict[int, "asyncio.Queue[Any]"] = {}
        self.ids = itertools.count(1)
        self.closed = False
        self.task = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        reason = "rankd closed the connection"
        try:
            while True:
                header = await self.reader.readexactly(_core.HEADER.size)
                (n,) = _core.HEADER.unpack(header)
                answer = msgpack.unpackb(await self.reader.readexactly(n))
                rid = answer.get("id")
                if rid == 0:
                    err = (answer.get("error") or {})
                    reason = f"{err.get('type')}: {err.get('message')}"
                    continue  # the daemon closes the connection next
                q = self.streams.get(rid)
                if q is not None:
                    if "line" not in answer:
                        del self.streams[rid]  # the final frame
                    q.put_nowait(answer)
                    continue
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        except (asyncio.IncompleteReadError, OSError) as e:
            if not isinstance(e, asyncio.IncompleteReadError):
                reason = f"connection lost: {e}"
        except asyncio.CancelledError:
            reason = "client closed"
        finally:
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(self.target, reason))
        self.pending.clear()
        for q in self.streams.values():
            q.put_nowait(ConnectionError(self.target, reason))
        self.streams.clear()
        self.writer.close()

    async def request(self, fields: Dict[str, Any]) -> Any:
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            self.writer.write(_core.frame(msgpack.packb({"id": rid, **fields})))
            await self.writer.drain()
        except OSError as e:
            self.pending.pop(rid, None)
            self._fail(f"connection lost: {e}")
            raise ConnectionError(self.target, f"connection lost: {e}") from e
        return await fut

    async def open_stream(self, model: str, entries: List[bytes]) -> Tuple[int, "asyncio.Queue[Any]"]:
        """Sends one chunk as a `bulk` op; its id and the queue of its frames."""
        if self.closed:
            raise ConnectionError(self.target, "connection lost")
        rid = next(self.ids)
        q: "asyncio.Queue[Any]" = asyncio.Queue()
        self.streams[rid] = q
        try:
            self.writer.write(_core.frame(_bulk.socket_payload(rid, model, entries)))
            await self.writer.drain()
        except OSError as e:
            self.streams.pop(rid, None)
            self._fail(f"connection lost: {e}")
            raise ConnectionError(self.target, f"connection lost: {e}") from e
        return rid, q

    async def close(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


class _SocketTransport:
    def __init__(self, target: str, path: str):
        self.target, self.path = target, path
        self.conn: Optional[_Conn] = None
        self.lock: Optional[asyncio.Lock] = None

    async def _get(self) -> _Conn:
        if self.conn is not None and not self.conn.closed:
            return self.conn
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            if self.conn is None or self.conn.closed:
                try:
                    r, w = await asyncio.open_unix_connection(self.path, limit=1 << 24)
                except OSError as e:
                    raise ConnectionError(self.target, f"cannot connect: {e}") from e
                self.conn = _Conn(self.target, r, w)
            return self.conn

    async def call(self, call: _core.Call) -> Any:
        conn = await self._get()
        answer = await conn.request({"op": call.op, **call.socket_fields})
        return call.parse(_core.socket_answer(answer))

    async def bulk(self, model: str, requests: Any, chunk_size: int, timeout_ms: Optional[int],
                   version: Optional[int]) -> AsyncIterator[t.BulkResult]:
        conn = await self._get()
        chunks = _bulk.Chunker(chunk_size, timeout_ms, version).achunks(requests)
        # The chunks sent, in order (id, frames, offset, count), then None at
        # the end of the input, or the error that ended the sending.
        sent: "asyncio.Queue[Any]" = asyncio.Queue()
        # One chunk ahead: the next is served while this one's results are read.
        slots = asyncio.Semaphore(2)
        live: Dict[int, None] = {}

        async def sender() -> None:
            offset = 0
            try:
                while True:
                    await slots.acquire()  # before the input is read for the chunk
                    try:
                        entries = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    rid, q = await conn.open_stream(model, entries)
                    live[rid] = None
                    sent.put_nowait((rid, q, offset, len(entries)))
                    offset += len(entries)
                sent.put_nowait(None)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 -- raised after the chunks sent before
                sent.put_nowait(e)

        # The input is read by its own task, so an input that waits (for
        # results, say) does not hold back the results of what was sent.
        task = asyncio.ensure_future(sender())
        try:
            while True:
                chunk = await sent.get()
                if chunk is None:
                    break
                if isinstance(chunk, BaseException):
                    raise chunk
                rid, q, offset, count = chunk
                while True:
                    frame = await q.get()
                    if isinstance(frame, BaseException):
                        raise frame
                    if "line" not in frame:
                        break
                    yield _bulk.socket_result(model, offset, frame)
                live.pop(rid, None)
                _bulk.socket_end(frame, count)
                slots.release()
        finally:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 -- cancelled on purpose
                pass
            for rid in live:
                conn.streams.pop(rid, None)
            await chunks.aclose()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


class _HttpTransport:
    def __init__(self, target: str, base: str, token: Optional[str], timeout: Optional[float], verify: Any):
        import httpx

        self.httpx = httpx
        self.target = target
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.http = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, verify=verify)
        self.conf = _bulk.HttpConf(target, base, token, timeout, verify)

    async def call(self, call: _core.Call) -> Any:
        try:
            r = await self.http.request(call.method, call.path, json=call.body)
        except self.httpx.TransportError as e:
            raise ConnectionError(self.target, f"{type(e).__name__}: {e}") from e
        return _core.http_answer(call, r.status_code, r.headers, r.content)

    def bulk(self, model: str, requests: Any, chunk_size: int, timeout_ms: Optional[int],
             version: Optional[int]) -> AsyncIterator[t.BulkResult]:
        return _bulk.http_bulk(self.conf, model, requests, timeout_ms, version)

    async def close(self) -> None:
        await self.http.aclose()


class AsyncClient:
    """The asyncio twin of `Client`: the same targets, arguments and results."""

    def __init__(self, target: str, *, token: Optional[str] = None, timeout: Optional[float] = 30.0,
                 verify: Any = True):
        self.target = target
        kind, where = _core.parse_target(target)
        if kind == "unix":
            self._t: Any = _SocketTransport(target, where)
        else:
            self._t = _HttpTransport(target, where, token, timeout, verify)

    async def recommend(self, model: str, user_id: int, k: int = 10, exclude: Optional[Iterable[int]] = None,
                  timeout_ms: Optional[int] = None, version: Optional[int] = None,
                  priority: Optional[str] = None, filter: Optional[Dict[str, Any]] = None,
                  context: Optional[Iterable[float]] = None) -> t.Recommendation:
        """The top `k` items for `user_id`; `filter` maps attribute names to an
        allowed value or a list of them (every attribute named must hold);
        `context` is the request's `context_dim` floats, for models that read
        one."""
        return await self._t.call(_core.recommend(model, user_id, k, exclude, timeout_ms, version, priority,
                                                filter, context))

    async def score(self, model: str, user_id: int, items: Sequence[int], timeout_ms: Optional[int] = None,
                    version: Optional[int] = None, priority: Optional[str] = None,
                    context: Optional[Iterable[float]] = None) -> t.Scores:
        return await self._t.call(_core.score(model, user_id, items, timeout_ms, version, priority, context))

    async def upsert_user(self, user_id: int, history: Optional[Iterable[int]] = None,
                          features: Optional[Iterable[float]] = None,
                          sparse: Optional[Iterable[int]] = None) -> t.User:
        """Replaces the parts of the user's state given: the history, dense
        `features` (`user_feature_dim` floats) and categorical `sparse`
        features (`user_sparse_dim` ids)."""
        return await self._t.call(_core.upsert_user(user_id, history, features, sparse))

    async def upsert_item(self, item_id: int, embedding: Optional[Iterable[float]] = None, deleted: bool = False,
                    version: Optional[int] = None, catalogue: Optional[str] = None,
                    attributes: Optional[Dict[str, int]] = None) -> t.Item:
        """Writes (or with `deleted=True` removes) an item of `catalogue`; leave
        `catalogue` out while the daemon serves exactly one. `attributes` alone
        changes an existing item's attributes and keeps its embedding."""
        return await self._t.call(_core.upsert_item(item_id, embedding, deleted, version, catalogue,
                                                  attributes))

    async def get_item(self, catalogue: str, item_id: int) -> t.StoredItem:
        """An item as its catalogue stores it."""
        return await self._t.call(_core.get_item(catalogue, item_id))

    async def catalogues(self) -> List[t.Catalogue]:
        """The resident catalogues."""
        return await self._t.call(_core.catalogues())

    async def bulk(self, model: str, requests: Any, *, timeout_ms: Optional[int] = None,
                   version: Optional[int] = None,
                   chunk_size: int = _bulk.CHUNK_SIZE) -> AsyncIterator[t.BulkResult]:
        """`Client.bulk` as an async generator: `requests` may also be an
        async iterable; `async for r in c.bulk(...)`."""
        results = self._t.bulk(model, requests, chunk_size, timeout_ms, version)
        try:
            async for r in results:
                yield r
        finally:
            await results.aclose()  # at once, when the caller stops early

    async def models(self) -> List[t.ModelInfo]:
        return await self._t.call(_core.models())

    async def health(self) -> t.Health:
        return await self._t.call(_core.health())

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
