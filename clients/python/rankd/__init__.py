"""Python client for rankd: `rankd.Client` (blocking) and `rankd.AsyncClient`
(asyncio), over the Unix socket (`unix:///path`) or HTTP (`http(s)://host:port`)."""

from ._async import AsyncClient
from ._errors import (
    ConnectionError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    NotReady,
    Overloaded,
    RankdError,
    Unauthorized,
)
from ._sync import Client
from ._types import (
    BulkResult,
    Catalogue,
    Health,
    Item,
    ModelInfo,
    Recommendation,
    RecommendRequest,
    ScoredItem,
    Scores,
    ScoreRequest,
    StoredItem,
    User,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BulkResult",
    "Catalogue",
    "Client",
    "ConnectionError",
    "DeadlineExceeded",
    "Health",
    "InvalidRequest",
    "Item",
    "ModelInfo",
    "NotFound",
    "NotReady",
    "Overloaded",
    "RankdError",
    "RecommendRequest",
    "Recommendation",
    "ScoreRequest",
    "ScoredItem",
    "Scores",
    "StoredItem",
    "Unauthorized",
    "User",
]
