"""Typed results: the daemon's answers as dataclasses."""

import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from ._errors import RankdError, error_from

_F32 = struct.Struct("<f")


def _f32(x: Any) -> float:
    """The daemon computes in float 32: the socket sends float 32, HTTP the
    shortest decimal of it; both read back to the same float 32 value here."""
    return _F32.unpack(_F32.pack(float(x)))[0]


@dataclass(frozen=True)
class ScoredItem:
    id: int
    score: float


@dataclass(frozen=True)
class Recommendation:
    """A recommend's answer. For a pipeline (`kind = "pipeline"`), `version`
    is the retrieval stage's, `versions` holds both stages' (`retrieve`,
    `rank`), `retrieval_scores` the retrieval model's score of each item,
    and `degraded_reason` says which stage did not run."""

    model: str
    version: int
    items: List[ScoredItem]
    degraded: bool = False
    cold_start: bool = False
    versions: Optional[Dict[str, int]] = None
    retrieval_scores: Optional[List[float]] = None
    degraded_reason: Optional[str] = None

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "Recommendation":
        versions = r.get("versions")
        return cls(
            model=r["model"],
            version=versions["retrieve"] if versions is not None else r["version"],
            items=[ScoredItem(int(i["id"]), _f32(i["score"])) for i in r["items"]],
            degraded=bool(r.get("degraded", False)),
            cold_start=bool(r.get("cold_start", False)),
            versions=dict(versions) if versions is not None else None,
            retrieval_scores=[_f32(i["retrieval_score"]) for i in r["items"]] if versions is not None else None,
            degraded_reason=r.get("degraded_reason"),
        )


@dataclass(frozen=True)
class Scores:
    model: str
    version: int
    scores: List[float]

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "Scores":
        return cls(r["model"], r["version"], [_f32(s) for s in r["scores"]])


@dataclass(frozen=True)
class User:
    user_id: int
    history: List[int]
    features: Optional[List[float]]
    # Categorical features; None when none are stored.
    sparse: Optional[List[int]] = None

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "User":
        f = r.get("features")
        s = r.get("sparse")
        return cls(
            int(r["user_id"]),
            [int(i) for i in r["history"]],
            None if f is None else [float(x) for x in f],
            None if s is None else [int(x) for x in s],
        )


@dataclass(frozen=True)
class Item:
    item_id: int
    version: int
    deleted: bool
    applied: bool
    #: The catalogue written.
    catalogue: Optional[str] = None

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "Item":
        return cls(int(r["item_id"]), int(r["version"]), bool(r["deleted"]), bool(r["applied"]),
                   r.get("catalogue"))


@dataclass(frozen=True)
class StoredItem:
    """An item as its catalogue stores it."""
    catalogue: str
    item_id: int
    version: int
    deleted: bool
    embedding: List[float]
    attributes: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "StoredItem":
        return cls(str(r["catalogue"]), int(r["item_id"]), int(r["version"]), bool(r["deleted"]),
                   [_f32(x) for x in r["embedding"]], {str(k): int(v) for k, v in r.get("attributes", {}).items()})


@dataclass(frozen=True)
class Catalogue:
    name: str
    dim: int
    live_rows: int
    rows: int
    attributes: List[str]
    models: List[str]

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "Catalogue":
        return cls(str(r["name"]), int(r["dim"]), int(r["live_rows"]), int(r["rows"]),
                   list(r["attributes"]), list(r["models"]))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: Optional[int]
    kind: Optional[str]
    state: str
    error: Optional[str]
    device: Optional[str]
    dim: Optional[int]
    user_feature_dim: Optional[int]
    history_len: Optional[int]
    items: Optional[int]
    queue_depth: Optional[int]
    batching: Optional[Dict[str, Any]] = None
    limits: Optional[Dict[str, Any]] = None
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "ModelInfo":
        return cls(
            name=r["name"],
            version=r.get("version"),
            kind=r.get("kind"),
            state=r.get("state", ""),
            error=r.get("error"),
            device=r.get("device"),
            dim=r.get("dim"),
            user_feature_dim=r.get("user_feature_dim"),
            history_len=r.get("history_len"),
            items=r.get("items"),
            queue_depth=r.get("queue_depth"),
            batching=r.get("batching"),
            limits=r.get("limits"),
            raw=dict(r),
        )


@dataclass(frozen=True)
class Health:
    ready: bool
    device: Optional[str]
    models: Dict[str, str]
    reason: Optional[str] = None

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "Health":
        return cls(bool(r["ready"]), r.get("device"), dict(r.get("models") or {}), r.get("reason"))


@dataclass(frozen=True)
class ScoreRequest:
    """One `bulk` line that scores `items` for `user_id`, in the given order."""

    user_id: int
    items: Sequence[int]
    version: Optional[int] = None
    timeout_ms: Optional[int] = None
    context: Optional[Sequence[float]] = None

    def to_wire(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"user_id": self.user_id, "items": list(self.items)}
        if self.context is not None:
            d["context"] = [float(x) for x in self.context]
        if self.version is not None:
            d["version"] = self.version
        if self.timeout_ms is not None:
            d["timeout_ms"] = self.timeout_ms
        return d


@dataclass(frozen=True)
class RecommendRequest:
    """One `bulk` line that recommends the `k` best items for `user_id`."""

    user_id: int
    k: int = 10
    exclude: Optional[Sequence[int]] = None
    version: Optional[int] = None
    timeout_ms: Optional[int] = None
    filter: Optional[Dict[str, Any]] = None
    context: Optional[Sequence[float]] = None

    def to_wire(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"user_id": self.user_id, "k": self.k}
        if self.exclude is not None:
            d["exclude"] = list(self.exclude)
        if self.filter is not None:
            d["filter"] = dict(self.filter)
        if self.context is not None:
            d["context"] = [float(x) for x in self.context]
        if self.version is not None:
            d["version"] = self.version
        if self.timeout_ms is not None:
            d["timeout_ms"] = self.timeout_ms
        return d


@dataclass(frozen=True, eq=False)
class BulkResult:
    """The answer to one line of a `bulk` call. `line` is the 1-based position
    of the request in the input. A score line carries `scores`, a recommend
    line `items` (and `degraded`, `cold_start`); a line that failed carries
    `error`, the exception a lone call would have raised (`InvalidRequest`,
    `DeadlineExceeded`, `Overloaded`, ...), and the other lines go on."""

    line: int
    model: str
    user_id: Optional[int] = None
    version: Optional[int] = None
    scores: Optional[List[float]] = None
    items: Optional[List[ScoredItem]] = None
    degraded: bool = False
    cold_start: bool = False
    error: Optional[RankdError] = None
    #: A pipeline's line: both stages' versions, the retrieval scores and
    #: which stage did not run when degraded.
    versions: Optional[Dict[str, int]] = None
    retrieval_scores: Optional[List[float]] = None
    degraded_reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> Any:
        """The line's answer as a lone call gives it (`Scores` or
        `Recommendation`), or raises the line's error."""
        if self.error is not None:
            raise self.error
        if self.scores is not None:
            return Scores(self.model, self.version or 0, self.scores)
        return Recommendation(self.model, self.version or 0, self.items or [], self.degraded,
                              self.cold_start, self.versions, self.retrieval_scores,
                              self.degraded_reason)

    def _key(self) -> Any:
        e = self.error
        err = None if e is None else (type(e), e.type, e.message)
        return (self.line, self.model, self.user_id, self.version, self.scores, self.items,
                self.degraded, self.cold_start, err, self.versions, self.retrieval_scores,
                self.degraded_reason)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, BulkResult):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_wire(cls, model: str, line: int, r: Optional[Dict[str, Any]],
                  error: Optional[Dict[str, Any]] = None) -> "BulkResult":
        """A line's result `r`, or its `error` (`{"type", "message"}`)."""
        if error is not None or r is None:
            err = error or {}
            return cls(line, model, error=error_from(err.get("type", "internal"),
                                                     err.get("message", "no message")))
        items = r.get("items")
        scores = r.get("scores")
        versions = r.get("versions")
        return cls(
            line=line,
            model=model,
            user_id=int(r["user_id"]),
            version=versions["retrieve"] if versions is not None else r.get("version"),
            scores=None if scores is None else [_f32(s) for s in scores],
            items=None if items is None else [ScoredItem(int(i["id"]), _f32(i["score"])) for i in items],
            degraded=bool(r.get("degraded", False)),
            cold_start=bool(r.get("cold_start", False)),
            versions=None if versions is None else dict(versions),
            retrieval_scores=None if versions is None or items is None
            else [_f32(i["retrieval_score"]) for i in items],
            degraded_reason=r.get("degraded_reason"),
        )
