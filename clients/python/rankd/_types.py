"""Typed results: the daemon's answers as dataclasses."""

import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    model: str
    version: int
    items: List[ScoredItem]
    degraded: bool = False
    cold_start: bool = False

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "Recommendation":
        return cls(
            model=r["model"],
            version=r["version"],
            items=[ScoredItem(int(i["id"]), _f32(i["score"])) for i in r["items"]],
            degraded=bool(r.get("degraded", False)),
            cold_start=bool(r.get("cold_start", False)),
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

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "User":
        f = r.get("features")
        return cls(
            int(r["user_id"]),
            [int(i) for i in r["history"]],
            None if f is None else [float(x) for x in f],
        )


@dataclass(frozen=True)
class Item:
    item_id: int
    version: int
    deleted: bool
    applied: bool

    @classmethod
    def from_wire(cls, r: Dict[str, Any]) -> "Item":
        return cls(int(r["item_id"]), int(r["version"]), bool(r["deleted"]), bool(r["applied"]))


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
