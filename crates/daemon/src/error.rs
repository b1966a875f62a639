//! The errors a request can end in. One kind string per variant: it is the
//! `error.type` of the HTTP/socket answer and the label of the metrics.

use crate::backend::BackendError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// The request could not be parsed.
    #[error("{0}")]
    Malformed(String),
    /// Well-formed, but a value is out of range or unknown.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    /// The queue is full; retry after roughly `retry_after_ms`.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_ms: u64,
    },
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    NotReady(String),
    /// The request conflicts with the current state (e.g. unloading a
    /// version that still carries traffic).
    #[error("{0}")]
    Conflict(String),
    /// No valid token. The message never says which part was wrong.
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::Malformed(_) => "malformed",
            ServeError::Invalid(_) => "invalid",
            ServeError::NotFound(_) => "not_found",
            ServeError::TooLarge(_) => "too_large",
            ServeError::Overloaded { .. } => "overloaded",
            ServeError::DeadlineExceeded(_) => "deadline_exceeded",
            ServeError::NotReady(_) => "not_ready",
            ServeError::Conflict(_) => "conflict",
            ServeError::Unauthorized(_) => "unauthorized",
            ServeError::Backend(_) => "backend",
            ServeError::Internal(_) => "internal",
        }
    }

    /// The HTTP status for this kind (the socket carries the kind alone).
    pub fn status(&self) -> u16 {
        match self {
            ServeError::Malformed(_) => 400,
            ServeError::Invalid(_) => 422,
            ServeError::NotFound(_) => 404,
            ServeError::TooLarge(_) => 413,
            ServeError::Overloaded { .. } => 429,
            ServeError::DeadlineExceeded(_) => 504,
            ServeError::NotReady(_) => 503,
            ServeError::Conflict(_) => 409,
            ServeError::Unauthorized(_) => 401,
            ServeError::Backend(_) | ServeError::Internal(_) => 500,
        }
    }
}
