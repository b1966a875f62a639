"""Exceptions mirroring the daemon's error types (docs/protocol.md §6)."""

import builtins
from typing import Optional


class RankdError(Exception):
    """An error answer from rankd; `type` is the daemon's error type."""

    def __init__(self, type: str, message: str):
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class Overloaded(RankdError):
    """The model's queue is full; back off for `retry_after` seconds (None if
    the transport gives no hint: the socket has no Retry-After)."""

    def __init__(self, type: str, message: str, retry_after: Optional[float] = None):
        super().__init__(type, message)
        self.retry_after = retry_after


class DeadlineExceeded(RankdError):
    pass


class NotFound(RankdError):
    pass


class InvalidRequest(RankdError):
    """`invalid`, `malformed`, `too_large` or `method_not_allowed`: do not retry as is."""


class NotReady(RankdError):
    pass


class Unauthorized(RankdError):
    pass


class ConnectionError(RankdError, builtins.ConnectionError):
    """The daemon could not be reached, or the connection broke mid-call."""

    def __init__(self, target: str, reason: str):
        RankdError.__init__(self, "connection", f"{target}: {reason}")
        self.target = target


_BY_TYPE = {
    "overloaded": Overloaded,
    "deadline_exceeded": DeadlineExceeded,
    "not_found": NotFound,
    "invalid": InvalidRequest,
    "malformed": InvalidRequest,
    "too_large": InvalidRequest,
    "method_not_allowed": InvalidRequest,
    "not_ready": NotReady,
    "unauthorized": Unauthorized,
    "forbidden": Unauthorized,
}

_BY_STATUS = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    422: "invalid",
    429: "overloaded",
    503: "not_ready",
    504: "deadline_exceeded",
}


def error_from(type: str, message: str, retry_after: Optional[float] = None) -> RankdError:
    cls = _BY_TYPE.get(type, RankdError)
    if cls is Overloaded:
        return Overloaded(type, message, retry_after)
    return cls(type, message)


def status_type(status: int) -> str:
    return _BY_STATUS.get(status, "internal")
