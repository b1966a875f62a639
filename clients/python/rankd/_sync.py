"""The blocking client. One socket connection guarded by a lock, so a client
may be shared between threads (calls from several threads take turns on the
connection; use one client per thread, or AsyncClient, for concurrency).

A `bulk` call holds the lock only to send a chunk or read a frame, so other
calls (from its own loop too) go on while it runs: frames of a bulk call that
another call reads are kept for it, in `streams`, until it asks."""

import collections
import itertools
import select
import socket
import threading
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import msgpack

from . import _bulk, _core
from . import _types as t
from ._errors import ConnectionError


class _SocketTransport:
    def __init__(self, target: str, path: str, timeout: Optional[float]):
        self.target, self.path, self.timeout = target, path, timeout
        self.lock = threading.Lock()
        self.sock: Optional[socket.socket] = None
        self.buf = bytearray()
        self.ids = itertools.count(1)  # id 0 is the daemon's "no id" answer
        # Bulk ops in progress: their frames read while another call waited.
        self.streams: Dict[int, Deque[Dict[str, Any]]] = {}
        self.gen = 0  # counts connections, so a bulk call notices a new one
        self.broken = -1  # the connection a send failed on, to drop once read

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise ConnectionError(self.target, f"cannot connect: {e}") from e
        self.buf.clear()
        self.gen += 1
        return s

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def _ready(self) -> socket.socket:
        """The connection, (re)connected if needed; under the lock."""
        if self.sock is not None and (self.broken == self.gen or self._closed_by_peer()):
            self._drop()  # e.g. the daemon restarted since the last call
        if self.sock is None:
            self.sock = self._connect()
        return self.sock

    def _answer_to(self, req_id: int) -> Dict[str, Any]:
        """Reads frames until `req_id`'s next one; under the lock. Frames of
        other bulk calls in progress are kept for them; any other is an
        answer to a call given up on, skipped."""
        while True:
            answer = self._read()
            rid = answer.get("id")
            if rid == req_id:
                return answer
            if rid == 0:
                self._drop()  # too_large: the daemon closes the connection
                _core.socket_answer(answer)
            q = self.streams.get(rid)  # type: ignore[arg-type]
            if q is not None:
                q.append(answer)

    def call(self, call: _core.Call) -> Any:
        with self.lock:
            self._ready()
            assert self.sock is not None
            req_id = next(self.ids)
            payload = msgpack.packb({"id": req_id, "op": call.op, **call.socket_fields})
            try:
                self.sock.sendall(_core.frame(payload))
                return call.parse(_core.socket_answer(self._answer_to(req_id)))
            except (OSError, EOFError) as e:
                self._drop()
                raise ConnectionError(self.target, f"connection lost: {e}") from e

    def _send_chunk(self, model: str, entries: List[bytes]) -> Tuple[int, int]:
        """Sends one chunk as a `bulk` op; its id and the connection's number."""
        with self.lock:
            self._ready()
            assert self.sock is not None
            rid = next(self.ids)
            self.streams[rid] = collections.deque()
            try:
                self.sock.sendall(_core.frame(_bulk.socket_payload(rid, model, entries)))
            except OSError as e:
                # Not dropped yet: the chunks sent before may still be answered.
                self.streams.pop(rid, None)
                self.broken = self.gen
                raise ConnectionError(self.target, f"connection lost: {e}") from e
            return rid, self.gen

    def _next_frame(self, rid: int, gen: int) -> Dict[str, Any]:
        with self.lock:
            q = self.streams.get(rid)
            if q:
                return q.popleft()
            if self.sock is None or self.gen != gen:
                raise ConnectionError(self.target, "connection lost during a bulk call")
            try:
                return self._answer_to(rid)
            except (OSError, EOFError) as e:
                self._drop()
                raise ConnectionError(self.target, f"connection lost: {e}") from e

    def bulk(self, model: str, requests: Iterable[Any], chunk_size: int, timeout_ms: Optional[int],
             version: Optional[int]) -> Iterator[t.BulkResult]:
        chunks = _bulk.Chunker(chunk_size, timeout_ms, version).chunks(requests)
        outstanding: Deque[Tuple[int, int, int, int]] = collections.deque()  # id, gen, offset, count
        sent = 0
        # A failed send is raised once the chunks sent before it are read.
        send_error: Optional[ConnectionError] = None

        def send_next() -> None:
            nonlocal sent, send_error
            if send_error is not None:
                return
            entries = next(chunks, None)
            if entries is not None:
                try:
                    rid, gen = self._send_chunk(model, entries)
                except ConnectionError as e:
                    send_error = e
                    return
                outstanding.append((rid, gen, sent, len(entries)))
                sent += len(entries)

        try:
            # One chunk ahead: the next is served while this one's results are read.
            send_next()
            send_next()
            while outstanding:
                rid, gen, offset, count = outstanding[0]
                while True:
                    frame = self._next_frame(rid, gen)
                    if "line" not in frame:
                        break
                    yield _bulk.socket_result(model, offset, frame)
                outstanding.popleft()
                with self.lock:
                    self.streams.pop(rid, None)
                _bulk.socket_end(frame, count)
                send_next()
            if send_error is not None:
                raise send_error
        finally:
            with self.lock:
                for rid, *_ in outstanding:
                    self.streams.pop(rid, None)

    def _closed_by_peer(self) -> bool:
        """True when the idle connection has been closed by the daemon: nothing
        was sent on it since, so a new connection can safely take the call."""
        assert self.sock is not None
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read(self) -> Dict[str, Any]:
        assert self.sock is not None
        h = _core.HEADER.size
        while True:
            if len(self.buf) >= h:
                (n,) = _core.HEADER.unpack_from(self.buf)
                if len(self.buf) >= h + n:
                    payload = bytes(self.buf[h : h + n])
                    del self.buf[: h + n]
                    return msgpack.unpackb(payload)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("rankd closed the connection")
            self.buf += chunk

    def close(self) -> None:
        with self.lock:
            self._drop()


class _HttpTransport:
    def __init__(self, target: str, base: str, token: Optional[str], timeout: Optional[float], verify: Any):
        import httpx

        self.httpx = httpx
        self.target = target
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=timeout, verify=verify)
        self.conf = _bulk.HttpConf(target, base, token, timeout, verify)

    def call(self, call: _core.Call) -> Any:
        try:
            r = self.http.request(call.method, call.path, json=call.body)
        except self.httpx.TransportError as e:
            raise ConnectionError(self.target, f"{type(e).__name__}: {e}") from e
        return _core.http_answer(call, r.status_code, r.headers, r.content)

    def bulk(self, model: str, requests: Iterable[Any], chunk_size: int, timeout_ms: Optional[int],
             version: Optional[int]) -> Iterator[t.BulkResult]:
        return _bulk.http_bulk_blocking(self.conf, model, requests, timeout_ms, version)

    def close(self) -> None:
        self.http.close()


class Client:
    """`Client("unix:///run/rankd/rankd.sock")` or `Client("http://127.0.0.1:8080")`
    (`https://` too, with `token=` sent as `Authorization: Bearer <token>`)."""

    def __init__(self, target: str, *, token: Optional[str] = None, timeout: Optional[float] = 30.0,
                 verify: Any = True):
        self.target = target
        kind, where = _core.parse_target(target)
        if kind == "unix":
            self._t: Any = _SocketTransport(target, where, timeout)
        else:
            self._t = _HttpTransport(target, where, token, timeout, verify)

    def recommend(self, model: str, user_id: int, k: int = 10, exclude: Optional[Iterable[int]] = None,
                  timeout_ms: Optional[int] = None, version: Optional[int] = None,
                  priority: Optional[str] = None, filter: Optional[Dict[str, Any]] = None,
                  context: Optional[Iterable[float]] = None) -> t.Recommendation:
        """The top `k` items for `user_id`; `filter` maps attribute names to an
        allowed value or a list of them (every attribute named must hold);
        `context` is the request's `context_dim` floats, for models that read
        one."""
        return self._t.call(_core.recommend(model, user_id, k, exclude, timeout_ms, version, priority,
                                                filter, context))

    def score(self, model: str, user_id: int, items: Sequence[int], timeout_ms: Optional[int] = None,
              version: Optional[int] = None, priority: Optional[str] = None,
              context: Optional[Iterable[float]] = None) -> t.Scores:
        return self._t.call(_core.score(model, user_id, items, timeout_ms, version, priority, context))

    def upsert_user(self, user_id: int, history: Optional[Iterable[int]] = None,
                    features: Optional[Iterable[float]] = None,
                    sparse: Optional[Iterable[int]] = None) -> t.User:
        """Replaces the parts of the user's state given: the history, dense
        `features` (`user_feature_dim` floats) and categorical `sparse`
        features (`user_sparse_dim` ids)."""
        return self._t.call(_core.upsert_user(user_id, history, features, sparse))

    def upsert_item(self, item_id: int, embedding: Optional[Iterable[float]] = None, deleted: bool = False,
                    version: Optional[int] = None, catalogue: Optional[str] = None,
                    attributes: Optional[Dict[str, int]] = None) -> t.Item:
        """Writes (or with `deleted=True` removes) an item of `catalogue`; leave
        `catalogue` out while the daemon serves exactly one. `attributes` alone
        changes an existing item's attributes and keeps its embedding."""
        return self._t.call(_core.upsert_item(item_id, embedding, deleted, version, catalogue,
                                                  attributes))

    def get_item(self, catalogue: str, item_id: int) -> t.StoredItem:
        """An item as its catalogue stores it."""
        return self._t.call(_core.get_item(catalogue, item_id))

    def catalogues(self) -> List[t.Catalogue]:
        """The resident catalogues."""
        return self._t.call(_core.catalogues())

    def bulk(self, model: str, requests: Iterable[Any], *, timeout_ms: Optional[int] = None,
             version: Optional[int] = None, chunk_size: int = _bulk.CHUNK_SIZE) -> Iterator[t.BulkResult]:
        """Scores or recommends for many users in one call: `requests` is an
        iterable (read lazily) of `ScoreRequest`, `RecommendRequest` or dicts
        in the daemon's bulk line shape (`{"user_id", "items"}` or
        `{"user_id", "k", "exclude"}`, optional `version`, `timeout_ms`;
        `timeout_ms=` and `version=` here fill in lines that lack them).
        Yields one `BulkResult` per request, in input order, as results
        arrive; a line that failed carries its `error` and the rest go on. A
        call cut short (the daemon shutting down) raises after the results
        that arrived. Over the socket the input is sent as ops of at most
        `chunk_size` requests."""
        return self._t.bulk(model, requests, chunk_size, timeout_ms, version)

    def models(self) -> List[t.ModelInfo]:
        return self._t.call(_core.models())

    def health(self) -> t.Health:
        return self._t.call(_core.health())

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
