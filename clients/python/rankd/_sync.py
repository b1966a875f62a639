"""The blocking client. One socket connection guarded by a lock, so a client
may be shared between threads (calls from several threads take turns on the
connection; use one client per thread, or AsyncClient, for concurrency)."""

import itertools
import select
import socket
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence

import msgpack

from . import _core
from . import _types as t
from ._errors import ConnectionError


class _SocketTransport:
    def __init__(self, target: str, path: str, timeout: Optional[float]):
        self.target, self.path, self.timeout = target, path, timeout
        self.lock = threading.Lock()
        self.sock: Optional[socket.socket] = None
        self.buf = bytearray()
        self.ids = itertools.count(1)  # id 0 is the daemon's "no id" answer

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise ConnectionError(self.target, f"cannot connect: {e}") from e
        self.buf.clear()
        return s

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def call(self, call: _core.Call) -> Any:
        with self.lock:
            if self.sock is not None and self._closed_by_peer():
                self._drop()  # e.g. the daemon restarted since the last call
            if self.sock is None:
                self.sock = self._connect()
            req_id = next(self.ids)
            payload = msgpack.packb({"id": req_id, "op": call.op, **call.socket_fields})
            try:
                self.sock.sendall(_core.frame(payload))
                while True:
                    answer = self._read()
                    if answer.get("id") == req_id:
                        return call.parse(_core.socket_answer(answer))
                    if answer.get("id") == 0:
                        self._drop()  # too_large: the daemon closes the connection
                        _core.socket_answer(answer)
            except (OSError, EOFError) as e:
                self._drop()
                raise ConnectionError(self.target, f"connection lost: {e}") from e

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

    def call(self, call: _core.Call) -> Any:
        try:
            r = self.http.request(call.method, call.path, json=call.body)
        except self.httpx.TransportError as e:
            raise ConnectionError(self.target, f"{type(e).__name__}: {e}") from e
        return _core.http_answer(call, r.status_code, r.headers, r.content)

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
                  priority: Optional[str] = None) -> t.Recommendation:
        return self._t.call(_core.recommend(model, user_id, k, exclude, timeout_ms, version, priority))

    def score(self, model: str, user_id: int, items: Sequence[int], timeout_ms: Optional[int] = None,
              version: Optional[int] = None, priority: Optional[str] = None) -> t.Scores:
        return self._t.call(_core.score(model, user_id, items, timeout_ms, version, priority))

    def upsert_user(self, user_id: int, history: Optional[Iterable[int]] = None,
                    features: Optional[Iterable[float]] = None) -> t.User:
        return self._t.call(_core.upsert_user(user_id, history, features))

    def upsert_item(self, item_id: int, embedding: Optional[Iterable[float]] = None, deleted: bool = False,
                    version: Optional[int] = None) -> t.Item:
        return self._t.call(_core.upsert_item(item_id, embedding, deleted, version))

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
