//! A Rust client for rankd, over the Unix socket (pipelined: any number of
//! concurrent calls share one connection) or over HTTP, behind one trait so
//! benchmarks and tests drive either transport with the same code.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::frame::{encode_frame, FrameDecoder};
use crate::types::*;
use crate::wire::{WireId, WireRequest, WireResponse};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{kind}: {message}")]
    Server { kind: String, message: String },
    /// The connection failed or the answer could not be read.
    #[error("transport: {0}")]
    Transport(String),
}

impl ClientError {
    /// The error type as the daemon names it (`overloaded`, ...), or `transport`.
    pub fn kind(&self) -> &str {
        match self {
            ClientError::Server { kind, .. } => kind,
            ClientError::Transport(_) => "transport",
        }
    }
}

pub(crate) type Answer<T> = Result<T, ClientError>;

/// The calls every transport offers.
pub trait Client: Clone + Send + Sync + 'static {
    fn recommend(
        &self,
        model: &str,
        req: RecommendRequest,
    ) -> impl Future<Output = Answer<RecommendResponse>> + Send;
    fn score(
        &self,
        model: &str,
        req: ScoreRequest,
    ) -> impl Future<Output = Answer<ScoreResponse>> + Send;
    fn upsert_user(
        &self,
        user_id: u64,
        req: UserRequest,
    ) -> impl Future<Output = Answer<UserResponse>> + Send;
    fn health(&self) -> impl Future<Output = Answer<Readiness>> + Send;
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Answer<BytesMut>>>>;

/// Bytes accepted by `call` and not yet taken by the socket.
struct Outbox {
    buf: Vec<u8>,
    /// Set when the connection can no longer be written.
    broken: bool,
}

struct Shared {
    wr: tokio::net::unix::OwnedWriteHalf,
    out: Mutex<Outbox>,
    /// Wakes the flusher when a caller could not write everything at once
    /// (and when the connection is dropped, so the flusher ends).
    backlog: Arc<tokio::sync::Notify>,
    pending: Pending,
    next_id: AtomicU64,
    closed: AtomicBool,
}

/// A pipelined socket connection. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct UdsClient {
    shared: Arc<Shared>,
}

impl UdsClient {
    pub async fn connect(path: impl AsRef<Path>) -> std::io::Result<Self> {
        Self::connect_with_limit(path, 64 << 20).await
    }

    /// `max_frame_bytes` bounds the answers this client accepts.
    pub async fn connect_with_limit(
        path: impl AsRef<Path>,
        max_frame_bytes: usize,
    ) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path).await?;
        let (mut rd, wr) = stream.into_split();
        let shared = Arc::new(Shared {
            wr,
            out: Mutex::new(Outbox {
                buf: Vec::with_capacity(16 * 1024),
                broken: false,
            }),
            backlog: Arc::new(tokio::sync::Notify::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        // Callers write straight into the socket (no hand-off on the common
        // path); what the socket does not take at once is flushed here.
        let flusher = Arc::downgrade(&shared);
        let backlog = shared.backlog.clone();
        tokio::spawn(async move {
            loop {
                let notified = backlog.notified();
                let Some(s) = flusher.upgrade() else { return };
                if s.out.lock().expect("outbox lock").buf.is_empty() {
                    drop(s);
                    notified.await;
                    continue;
                }
                if s.wr.writable().await.is_err() || !s.flush() {
                    return;
                }
            }
        });
        // The reader holds the connection weakly: once every clone of the
        // client is gone, the write half closes and the daemon ends the stream.
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let decoder = FrameDecoder::new(max_frame_bytes);
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let why = 'read: loop {
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(frame)) => {
                            let Some(reader) = weak.upgrade() else { return };
                            let id = rmp_serde::from_slice::<WireId>(&frame).map_or(0, |w| w.id);
                            let waiter = reader.pending.lock().expect("pending lock").remove(&id);
                            match waiter {
                                Some(tx) => {
                                    let _ = tx.send(Ok(frame));
                                }
                                None if id == 0 => {
                                    break 'read describe_error_frame(&frame);
                                }
                                None => {}
                            }
                        }
                        Ok(None) => break,
                        Err(e) => break 'read e.to_string(),
                    }
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) => break "connection closed by the daemon".to_string(),
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                }
            };
            let Some(reader) = weak.upgrade() else { return };
            reader.closed.store(true, Ordering::SeqCst);
            let waiters: Vec<_> = reader
                .pending
                .lock()
                .expect("pending lock")
                .drain()
                .collect();
            for (_, tx) in waiters {
                let _ = tx.send(Err(ClientError::Transport(why.clone())));
            }
        });
        Ok(Self { shared })
    }

    async fn call<R: DeserializeOwned>(&self, mut req: WireRequest) -> Answer<R> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        let payload = rmp_serde::to_vec_named(&req)
            .map_err(|e| ClientError::Transport(format!("encoding the request: {e}")))?;
        let mut frame = Vec::with_capacity(payload.len() + 4);
        encode_frame(&payload, &mut frame);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .expect("pending lock")
            .insert(id, tx);
        if self.shared.closed.load(Ordering::SeqCst) || !self.shared.send(&frame) {
            self.shared
                .pending
                .lock()
                .expect("pending lock")
                .remove(&id);
            return Err(ClientError::Transport("connection is closed".into()));
        }
        let frame = rx
            .await
            .map_err(|_| ClientError::Transport("connection is closed".into()))??;
        let resp: WireResponse<R> = rmp_serde::from_slice(&frame)
            .map_err(|e| ClientError::Transport(format!("decoding the answer: {e}")))?;
        match (resp.ok, resp.result, resp.error) {
            (true, Some(r), _) => Ok(r),
            (_, _, Some(e)) => Err(ClientError::Server {
                kind: e.kind,
                message: e.message,
            }),
            _ => Err(ClientError::Transport(
                "answer has neither result nor error".into(),
            )),
        }
    }

    /// Sends a raw request map (any `op`), for tools and tests.
    pub async fn request<R: DeserializeOwned>(&self, req: WireRequest) -> Answer<R> {
        self.call(req).await
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.backlog.notify_one();
    }
}

impl Shared {
    /// Queues a whole frame and writes what the socket takes now. No await
    /// happens between queueing and writing, so a cancelled caller never
    /// leaves half a frame behind. False once the connection is broken.
    fn send(&self, frame: &[u8]) -> bool {
        let mut out = self.out.lock().expect("outbox lock");
        if out.broken {
            return false;
        }
        let was_empty = out.buf.is_empty();
        out.buf.extend_from_slice(frame);
        if was_empty {
            drop(out);
            if !self.flush() {
                return false;
            }
            if !self.out.lock().expect("outbox lock").buf.is_empty() {
                self.backlog.notify_one();
            }
        }
        true
    }

    /// Writes queued bytes until the socket would block; false on a write error.
    fn flush(&self) -> bool {
        let mut out = self.out.lock().expect("outbox lock");
        while !out.buf.is_empty() {
            match self.wr.try_write(&out.buf) {
                Ok(n) => {
                    out.buf.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    out.broken = true;
                    return false;
                }
            }
        }
        true
    }
}

fn describe_error_frame(frame: &[u8]) -> String {
    match rmp_serde::from_slice::<WireResponse<()>>(frame) {
        Ok(WireResponse { error: Some(e), .. }) => format!("{}: {}", e.kind, e.message),
        _ => "the daemon closed the connection after a protocol error".into(),
    }
}

impl Client for UdsClient {
    fn recommend(
        &self,
        model: &str,
        req: RecommendRequest,
    ) -> impl Future<Output = Answer<RecommendResponse>> + Send {
        self.call(WireRequest {
            op: "recommend".into(),
            model: Some(model.to_string()),
            user_id: Some(req.user_id),
            k: Some(req.k),
            exclude: (!req.exclude.is_empty()).then_some(req.exclude),
            timeout_ms: req.timeout_ms,
            version: req.version,
            context: req.context,
            ..Default::default()
        })
    }

    fn score(
        &self,
        model: &str,
        req: ScoreRequest,
    ) -> impl Future<Output = Answer<ScoreResponse>> + Send {
        self.call(WireRequest {
            op: "score".into(),
            model: Some(model.to_string()),
            user_id: Some(req.user_id),
            items: Some(req.items),
            timeout_ms: req.timeout_ms,
            version: req.version,
            context: req.context,
            ..Default::default()
        })
    }

    fn upsert_user(
        &self,
        user_id: u64,
        req: UserRequest,
    ) -> impl Future<Output = Answer<UserResponse>> + Send {
        self.call(WireRequest {
            op: "upsert_user".into(),
            user_id: Some(user_id),
            history: req.history,
            features: req.features,
            sparse: req.sparse,
            ..Default::default()
        })
    }

    fn health(&self) -> impl Future<Output = Answer<Readiness>> + Send {
        self.call(WireRequest {
            op: "health".into(),
            ..Default::default()
        })
    }
}
