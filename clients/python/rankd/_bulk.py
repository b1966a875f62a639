"""Streaming bulk scoring (`bulk`), shared by both clients: the request lines,
the socket chunks, and the HTTP exchange.

Over HTTP, `POST /v1/models/{model}/bulk` reads an NDJSON body while it
answers, one NDJSON result per line, so the body must be sent while the
answer is read (the daemon reads no more input while its answers go unread).
The exchange below is a small HTTP/1.1 client on asyncio streams that does
both at once: a task writes the body with chunked transfer encoding, lazily
from the caller's iterable, while the answer is parsed line by line. The
blocking client drives it on a private event loop.

Over the socket, the `bulk` op carries a list: the input is cut into chunks
(at most `chunk_size` entries and about `CHUNK_BYTES` bytes, well under the
daemon's 1 MiB `max_frame_bytes`), each sent as its own op, at most two in
flight, and the daemon's per-op line numbers are renumbered to count across
chunks."""

import asyncio
import json
import select
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import quote, urlsplit

import msgpack

from . import _core
from . import _types as t
from ._errors import ConnectionError, RankdError, error_from

CHUNK_SIZE = 1000
CHUNK_BYTES = 512 * 1024
# The body's writer waits while this much is unsent.
BODY_FLUSH = 64 * 1024
# How long the body waits for 100 Continue before it is sent anyway.
CONTINUE_WAIT = 1.0
# Reading from the daemon pauses while this much of its answer is unread.
READ_HIGH = 1 << 20

def wire_line(req: Any, timeout_ms: Optional[int], version: Optional[int]) -> Dict[str, Any]:
    """One input line as the daemon reads it; `timeout_ms` and `version` fill
    in what the line does not set."""
    if isinstance(req, (t.ScoreRequest, t.RecommendRequest)):
        d = req.to_wire()
    elif isinstance(req, Mapping):
        d = dict(req)
    else:
        raise TypeError(f"a bulk request is a dict, rankd.ScoreRequest or rankd.RecommendRequest, "
                        f"not {type(req).__name__}")
    if timeout_ms is not None:
        d.setdefault("timeout_ms", timeout_ms)
    if version is not None:
        d.setdefault("version", version)
    return d


# --- socket -------------------------------------------------------------------

class Chunker:
    """Cuts packed request entries into chunks by count and size."""

    def __init__(self, chunk_size: int, timeout_ms: Optional[int], version: Optional[int]):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size, self.timeout_ms, self.version = chunk_size, timeout_ms, version
        self.held: Optional[bytes] = None  # the entry that did not fit the last chunk
        self.packer = msgpack.Packer()

    def pack(self, req: Any) -> bytes:
        return self.packer.pack(wire_line(req, self.timeout_ms, self.version))

    def take(self, entries: List[bytes], size: int, entry: bytes) -> Tuple[bool, int]:
        """Adds `entry` unless the chunk is full; True when the chunk is done."""
        if entries and (len(entries) >= self.chunk_size or size + len(entry) > CHUNK_BYTES):
            self.held = entry
            return True, size
        entries.append(entry)
        return len(entries) >= self.chunk_size, size + len(entry)

    def start(self) -> Tuple[List[bytes], int]:
        entries: List[bytes] = []
        size = 0
        if self.held is not None:
            entries.append(self.held)
            size = len(self.held)
            self.held = None
        return entries, size

    def chunks(self, requests: Iterable[Any]) -> Iterator[List[bytes]]:
        it = iter(requests)
        exhausted = False
        while True:
            entries, size = self.start()
            done = len(entries) >= self.chunk_size
            while not done and not exhausted:
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                done, size = self.take(entries, size, self.pack(req))
            if not entries:
                return
            yield entries
            if exhausted and self.held is None:
                return

    async def achunks(self, requests: Any) -> AsyncIterator[List[bytes]]:
        it = aiter_of(requests)
        exhausted = False
        while True:
            entries, size = self.start()
            done = len(entries) >= self.chunk_size
            while not done and not exhausted:
                try:
                    req = await it.__anext__()
                except StopAsyncIteration:
                    exhausted = True
                    break
                done, size = self.take(entries, size, self.pack(req))
            if not entries:
                return
            yield entries
            if exhausted and self.held is None:
                return


def socket_payload(rid: int, model: str, entries: List[bytes]) -> bytes:
    """The MessagePack `bulk` op with its already packed entries."""
    p = msgpack.Packer()
    head = (p.pack_map_header(4) + p.pack("id") + p.pack(rid) + p.pack("op") + p.pack("bulk")
            + p.pack("model") + p.pack(model) + p.pack("requests") + p.pack_array_header(len(entries)))
    return head + b"".join(entries)


def socket_result(model: str, offset: int, frame: Dict[str, Any]) -> t.BulkResult:
    line = offset + int(frame["line"])
    if frame.get("ok"):
        return t.BulkResult.from_wire(model, line, frame.get("result") or {})
    return t.BulkResult.from_wire(model, line, None, frame.get("error") or {})


def socket_end(frame: Dict[str, Any], sent: int) -> None:
    """Checks a chunk's final frame: raises the error of a cut (or of the
    whole op), or if fewer lines were answered than sent."""
    _core.socket_answer(frame)
    done = (frame.get("result") or {}).get("done")
    if done != sent:
        raise RankdError("internal", f"the bulk op answered {done} of {sent} lines")


# --- HTTP ---------------------------------------------------------------------

async def _from_sync(it: Iterable[Any]) -> AsyncIterator[Any]:
    for x in it:
        yield x


def aiter_of(requests: Any) -> AsyncIterator[Any]:
    if hasattr(requests, "__aiter__"):
        return requests.__aiter__()
    return _from_sync(requests).__aiter__()


def ssl_context(verify: Any) -> ssl.SSLContext:
    """`verify` as httpx takes it: True, False, a CA bundle path or a context."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if isinstance(verify, str):
        import os

        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


class _Stream(asyncio.Protocol):
    """The connection of one HTTP bulk call. Unlike asyncio's streams, what
    arrived before the connection broke stays readable: a daemon that ends
    its answer (a cut) and closes while the body is still being written
    resets the connection, and the answer's last lines must still be read."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.lost: Optional[BaseException] = None
        self.transport: Optional[asyncio.Transport] = None
        self._data: Optional["asyncio.Future[None]"] = None
        self._writable: Optional["asyncio.Future[None]"] = None
        self._paused = False
        self.tls = False

    # protocol callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.tls = transport.get_extra_info("sslcontext") is not None
        transport.set_write_buffer_limits(high=BODY_FLUSH)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > READ_HIGH and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return not self.tls  # plain TCP stays half open; TLS cannot

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.eof = True
        self.lost = exc
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _wake(self) -> None:
        if self._data is not None and not self._data.done():
            self._data.set_result(None)

    # writing
    @property
    def ended(self) -> bool:
        """The daemon will read no more: its answer ended or the connection broke."""
        return self.eof

    def unread(self) -> bool:
        """Whether the connection has bytes the event loop has yet to take in
        (False while reading is paused: they wait for the caller)."""
        if self.transport is None or self._paused or self.eof:
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.lost is not None or self.transport.is_closing():
            raise BrokenPipeError("the connection is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable
        if self.lost is not None:
            raise self.lost

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # reading
    async def _more(self) -> None:
        """Waits for data; raises at the end of what arrived."""
        if self.eof:
            if self.lost is not None:
                raise self.lost
            raise asyncio.IncompleteReadError(bytes(self.buf), None)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._data = asyncio.get_running_loop().create_future()
        try:
            await self._data
        finally:
            self._data = None

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        if self._paused and len(self.buf) < READ_HIGH // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return out

    async def readuntil(self, sep: bytes, limit: int = 1 << 16) -> bytes:
        while True:
            at = self.buf.find(sep)
            if at >= 0:
                return self._take(at + len(sep))
            if len(self.buf) > limit:
                raise ValueError(f"no {sep!r} in {limit} bytes of the answer")
            await self._more()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        return self._take(n)

    async def read(self, n: int) -> bytes:
        while not self.buf:
            if self.eof and self.lost is None:
                return b""
            await self._more()
        return self._take(min(n, len(self.buf)))


@dataclass
class HttpConf:
    target: str
    base: str
    token: Optional[str]
    timeout: Optional[float]
    verify: Any


class _Exchange:
    """One bulk call over its own HTTP/1.1 connection."""

    def __init__(self, conf: HttpConf, model: str, requests: Any, timeout_ms: Optional[int],
                 version: Optional[int]):
        self.conf, self.model = conf, model
        self.requests, self.timeout_ms, self.version = requests, timeout_ms, version
        self.sent = 0
        self.input_error: Optional[BaseException] = None
        self.write_error: Optional[BaseException] = None
        self.stream: Optional[_Stream] = None
        self.go = asyncio.Event()  # the daemon said 100 Continue (or answered)
        self.refused = False  # the daemon answered before the body was sent
        self.answered = 0
        self.body_done = False
        self.headers_seen = False

    def _lost(self, why: Any) -> RankdError:
        return ConnectionError(self.conf.target, f"{type(why).__name__}: {why}" if isinstance(why, BaseException)
                               else str(why))

    async def _wait(self, aw: Any) -> Any:
        if self.conf.timeout is None:
            return await aw
        return await asyncio.wait_for(aw, self.conf.timeout)

    def _owed(self) -> bool:
        """Whether the daemon owes something: the answer's head, lines sent
        and not yet answered, or the answer's end once the body is complete."""
        return not self.headers_seen or self.answered < self.sent or self.body_done

    async def _wait_body(self, aw: Any) -> Any:
        """A read of the answer, under the client's timeout only while the
        daemon owes something: an input that pauses is no stuck daemon."""
        if self.conf.timeout is None:
            return await aw
        task = asyncio.ensure_future(aw)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.conf.timeout)
                if done:
                    return task.result()
                assert self.stream is not None
                if self._owed() and not self.stream.unread():
                    raise asyncio.TimeoutError(f"no answer in {self.conf.timeout} s")
        finally:
            if not task.done():
                task.cancel()

    async def connect(self) -> str:
        u = urlsplit(self.conf.base)
        tls = u.scheme == "https"
        host = u.hostname or "localhost"
        port = u.port or (443 if tls else 80)
        try:
            _, self.stream = await self._wait(asyncio.get_running_loop().create_connection(
                _Stream, host, port, ssl=ssl_context(self.conf.verify) if tls else None))
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectionError(self.conf.target, f"cannot connect: {type(e).__name__}: {e}") from e
        hostport = host if u.port is None else f"{host}:{u.port}"
        if ":" in host and not host.startswith("["):
            hostport = f"[{host}]" if u.port is None else f"[{host}]:{u.port}"
        path = u.path.rstrip("/") + f"/v1/models/{quote(self.model, safe='')}/bulk"
        # Expect: 100-continue: the daemon checks the call (the model, the
        # token) before it reads the body, and a refusal closes the
        # connection; the body waits for the go-ahead, so the refusal is read
        # rather than lost to a reset.
        head = [f"POST {path} HTTP/1.1", f"Host: {hostport}", "Content-Type: application/x-ndjson",
                "Accept: application/x-ndjson", "Transfer-Encoding: chunked", "Connection: close",
                "Expect: 100-continue", "User-Agent: rankd-python"]
        if self.conf.token is not None:
            head.append(f"Authorization: Bearer {self.conf.token}")
        return "\r\n".join(head) + "\r\n\r\n"

    async def write_body(self, head: str) -> None:
        """Sends the request head, the body, one chunk per line as the input
        yields it (nothing waits in a buffer here for more input), and the
        last chunk. Writing stops once the daemon has ended its answer (a cut
        or an error), so the answer is not lost to a reset connection. A
        failing input aborts the connection and is raised to the caller by
        `lines`."""
        assert self.stream is not None
        w = self.stream
        try:
            w.write(head.encode("latin-1"))
            try:
                # A server that does not answer 100 Continue gets the body anyway.
                await asyncio.wait_for(self.go.wait(), CONTINUE_WAIT)
            except asyncio.TimeoutError:
                pass
            if self.refused:
                return
            it = aiter_of(self.requests)
            while True:
                try:
                    req = await it.__anext__()
                    line = json.dumps(wire_line(req, self.timeout_ms, self.version),
                                      separators=(",", ":")).encode() + b"\n"
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    raise
                except BaseException as e:  # noqa: BLE001 -- the caller's input failed
                    self.input_error = e
                    w.abort()
                    return
                # What arrived while the input was read is taken in first:
                # a daemon that has ended its answer and closed must not be
                # written to, or the connection resets and the answer's end
                # is lost.
                await asyncio.sleep(0)
                for _ in range(100):
                    if w.ended or not w.unread():
                        break
                    await asyncio.sleep(0)
                if w.ended:
                    return
                self.sent += 1
                w.write(b"%x\r\n%s\r\n" % (len(line), line))
                await w.drain()
            if not w.ended:
                w.write(b"0\r\n\r\n")
                await w.drain()
            self.body_done = True
        except (OSError, RuntimeError) as e:
            # An answer sent before the body was read (an error, or a cut)
            # may close the connection under the writer: the answer tells.
            self.write_error = e

    async def _headers(self) -> Tuple[int, Dict[str, str]]:
        assert self.stream is not None
        raw = await self._wait_body(self.stream.readuntil(b"\r\n\r\n"))
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ConnectionError(self.conf.target, f"not an HTTP answer: {lines[0][:100]!r}")
        headers: Dict[str, str] = {}
        for h in lines[1:]:
            if ":" in h:
                k, v = h.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return int(parts[1]), headers

    async def _body(self, headers: Dict[str, str]) -> AsyncIterator[bytes]:
        r = self.stream
        assert r is not None
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await self._wait_body(r.readuntil(b"\r\n"))
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await self._wait_body(r.readuntil(b"\r\n"))) != b"\r\n":
                        pass  # trailers
                    return
                data = await self._wait_body(r.readexactly(size + 2))
                yield data[:-2]
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left > 0:
                data = await self._wait_body(r.read(min(left, 1 << 16)))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                yield data
        else:
            while True:
                data = await self._wait_body(r.read(1 << 16))
                if not data:
                    return
                yield data

    async def lines(self) -> AsyncIterator[t.BulkResult]:
        head = await self.connect()
        sender = asyncio.ensure_future(self.write_body(head))
        try:
            try:
                status, headers = await self._headers()
                while 100 <= status < 200:
                    self.go.set()
                    status, headers = await self._headers()
                self.headers_seen = True
                self.refused = status != 200 and not self.go.is_set()
                self.go.set()
                if status != 200:
                    body = b"".join([b async for b in self._body(headers)])
                    _core.http_answer(_core.Call("bulk", "POST", "", None, {}, lambda d: d),
                                      status, headers, body)
                    raise error_from("internal", f"HTTP {status}")
                pending = bytearray()
                async for data in self._body(headers):
                    pending += data
                    while True:
                        at = pending.find(b"\n")
                        if at < 0:
                            break
                        raw = bytes(pending[:at])
                        del pending[: at + 1]
                        if not raw.strip():
                            continue
                        obj = json.loads(raw)
                        if "line" not in obj:
                            err = obj.get("error") or {}
                            raise error_from(err.get("type", "internal"), err.get("message", "no message"))
                        self.answered += 1
                        yield t.BulkResult.from_wire(self.model, int(obj["line"]), obj, obj.get("error"))
                if pending.strip():
                    raise ConnectionError(self.conf.target, "the bulk answer ended mid-line")
            except RankdError:
                raise
            except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                if self.input_error is not None:
                    raise self.input_error
                raise self._lost(e) from e
            if self.input_error is not None:
                raise self.input_error
            await sender
            if self.answered != self.sent:
                raise ConnectionError(self.conf.target,
                                      f"the bulk answer ended after {self.answered} of {self.sent} lines")
        finally:
            if not sender.done():
                sender.cancel()
                try:
                    await sender
                except BaseException:  # noqa: BLE001 -- cancelled on purpose
                    pass
            if self.stream is not None:
                self.stream.abort()


def http_bulk(conf: HttpConf, model: str, requests: Any, timeout_ms: Optional[int] = None,
              version: Optional[int] = None) -> AsyncIterator[t.BulkResult]:
    return _Exchange(conf, model, requests, timeout_ms, version).lines()


def http_bulk_blocking(conf: HttpConf, model: str, requests: Iterable[Any], timeout_ms: Optional[int] = None,
                       version: Optional[int] = None) -> Iterator[t.BulkResult]:
    """`http_bulk` for the blocking client, on an event loop of its own that
    runs while the caller waits for the next result."""
    loop = asyncio.new_event_loop()
    agen = http_bulk(conf, model, requests, timeout_ms, version)
    try:
        while True:
            try:
                r = loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
            yield r
    finally:
        try:
            loop.run_until_complete(agen.aclose())
        finally:
            loop.close()


__all__ = ["Chunker", "HttpConf", "http_bulk", "http_bulk_blocking", "socket_payload"]
