"""What both clients share: targets, the calls (one description per method,
used by both transports), and the socket framing."""

import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import quote

from . import _types as t
from ._errors import RankdError, error_from, status_type

HEADER = struct.Struct(">I")  # 4-byte big-endian payload length


def parse_target(target: str) -> Tuple[str, str]:
    """`unix:///path/to.sock` -> ("unix", "/path/to.sock"); `http(s)://host:port`
    -> ("http", the base URL without a trailing slash)."""
    if target.startswith("unix://"):
        path = target[len("unix://") :]
        if not path:
            raise ValueError(f"target {target!r} names no socket path")
        return "unix", path
    if target.startswith(("http://", "https://")):
        return "http", target.rstrip("/")
    raise ValueError(f"target {target!r}: expected unix:///path, http://host:port or https://host:port")


@dataclass
class Call:
    op: str
    method: str
    path: str
    body: Optional[Dict[str, Any]]
    socket_fields: Dict[str, Any]
    parse: Callable[[Dict[str, Any]], Any]


def _opt(d: Dict[str, Any], **kv: Any) -> Dict[str, Any]:
    for k, v in kv.items():
        if v is not None:
            d[k] = v
    return d


def _floats(values: Optional[Iterable[float]]) -> Optional[List[float]]:
    return None if values is None else [float(x) for x in values]


def recommend(model: str, user_id: int, k: int = 10, exclude: Optional[Iterable[int]] = None,
              timeout_ms: Optional[int] = None, version: Optional[int] = None,
              priority: Optional[str] = None, filter: Optional[Dict[str, Any]] = None,
              context: Optional[Iterable[float]] = None) -> Call:
    body = _opt({"user_id": user_id, "k": k}, timeout_ms=timeout_ms, version=version, priority=priority,
                filter=filter, context=_floats(context))
    if exclude is not None:
        body["exclude"] = list(exclude)
    return Call("recommend", "POST", f"/v1/models/{quote(model, safe='')}/recommend", body,
                {"model": model, **body}, t.Recommendation.from_wire)


def score(model: str, user_id: int, items: Sequence[int], timeout_ms: Optional[int] = None,
          version: Optional[int] = None, priority: Optional[str] = None,
          context: Optional[Iterable[float]] = None) -> Call:
    body = _opt({"user_id": user_id, "items": list(items)}, timeout_ms=timeout_ms, version=version,
                priority=priority, context=_floats(context))
    return Call("score", "POST", f"/v1/models/{quote(model, safe='')}/score", body,
                {"model": model, **body}, t.Scores.from_wire)


def upsert_user(user_id: int, history: Optional[Iterable[int]] = None,
                features: Optional[Iterable[float]] = None, sparse: Optional[Iterable[int]] = None) -> Call:
    body: Dict[str, Any] = {}
    if history is not None:
        body["history"] = list(history)
    if features is not None:
        body["features"] = [float(x) for x in features]
    if sparse is not None:
        body["sparse"] = [int(x) for x in sparse]
    return Call("upsert_user", "POST", f"/v1/users/{int(user_id)}", body,
                {"user_id": user_id, **body}, t.User.from_wire)


def upsert_item(item_id: int, embedding: Optional[Iterable[float]] = None, deleted: bool = False,
                version: Optional[int] = None, catalogue: Optional[str] = None,
                attributes: Optional[Dict[str, int]] = None) -> Call:
    body: Dict[str, Any] = _opt({}, version=version, attributes=attributes)
    if embedding is not None:
        body["embedding"] = [float(x) for x in embedding]
    if deleted:
        body["deleted"] = True
    if catalogue is None:
        path = f"/v1/items/{int(item_id)}"
        fields = {"item_id": item_id, **body}
    else:
        path = f"/v1/catalogues/{quote(catalogue, safe='')}/items/{int(item_id)}"
        fields = {"item_id": item_id, "catalogue": catalogue, **body}
    return Call("upsert_item", "POST", path, body, fields, t.Item.from_wire)


def get_item(catalogue: str, item_id: int) -> Call:
    return Call("get_item", "GET", f"/v1/catalogues/{quote(catalogue, safe='')}/items/{int(item_id)}",
                None, {"catalogue": catalogue, "item_id": item_id}, t.StoredItem.from_wire)


def _catalogues(r: Dict[str, Any]) -> List[t.Catalogue]:
    return [t.Catalogue.from_wire(c) for c in r["catalogues"]]


def catalogues() -> Call:
    return Call("catalogues", "GET", "/v1/catalogues", None, {}, _catalogues)


def _models(r: Dict[str, Any]) -> List[t.ModelInfo]:
    return [t.ModelInfo.from_wire(m) for m in r["models"]]


def models() -> Call:
    return Call("models", "GET", "/v1/models", None, {}, _models)


def health() -> Call:
    return Call("health", "GET", "/readyz", None, {}, t.Health.from_wire)


def socket_answer(answer: Any) -> Dict[str, Any]:
    """The result of a decoded socket answer, or the error it carries."""
    if answer.get("ok"):
        return answer["result"]
    err = answer.get("error") or {}
    raise error_from(err.get("type", "internal"), err.get("message", "no message"))


def http_answer(call: Call, status: int, headers: Any, body: bytes) -> Any:
    """The parsed result of an HTTP answer, or the error it carries."""
    import json

    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if 200 <= status < 300 or (call.op == "health" and status == 503 and isinstance(data, dict)
                               and "ready" in data):
        return call.parse(data)
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        text = body.decode("utf-8", "replace")[:200]
        raise error_from(status_type(status), f"HTTP {status}: {text}")
    retry_after = None
    ra = headers.get("retry-after")
    if ra is not None:
        try:
            retry_after = float(ra)
        except ValueError:
            pass
    raise error_from(err.get("type", status_type(status)), err.get("message", ""), retry_after)


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


__all__ = ["RankdError"]
