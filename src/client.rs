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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::api::frame::{encode_frame, FrameDecoder};
use crate::api::types::*;
use crate::api::wire::{WireId, WireRequest, WireResponse};

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

type Answer<T> = Result<T, ClientError>;

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

struct Shared {
    frames: mpsc::UnboundedSender<Vec<u8>>,
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
        let (mut rd, mut wr) = stream.into_split();
        let (frames, mut outbox) = mpsc::unbounded_channel::<Vec<u8>>();
        let shared = Arc::new(Shared {
            frames,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(16 * 1024);
            while let Some(frame) = outbox.recv().await {
                out.extend_from_slice(&frame);
                while let Ok(more) = outbox.try_recv() {
                    out.extend_from_slice(&more);
                }
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        });
        let reader = shared.clone();
        tokio::spawn(async move {
            let decoder = FrameDecoder::new(max_frame_bytes);
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let why = 'read: loop {
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(frame)) => {
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
        if self.shared.closed.load(Ordering::SeqCst) || self.shared.frames.send(frame).is_err() {
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

/// The same calls over HTTP/JSON.
#[derive(Clone)]
pub struct HttpClient {
    base: Arc<str>,
    http: reqwest::Client,
}

impl HttpClient {
    /// `base` is like `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').into(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()
                .expect("building an HTTP client"),
        }
    }

    async fn post<B: serde::Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Answer<R> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::answer(resp).await
    }

    async fn answer<R: DeserializeOwned>(resp: reqwest::Response) -> Answer<R> {
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Transport(e.to_string()))
        } else {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => Err(ClientError::Server {
                    kind: b.error.kind,
                    message: b.error.message,
                }),
                Err(_) => Err(ClientError::Transport(format!("HTTP {status}"))),
            }
        }
    }
}

impl Client for HttpClient {
    fn recommend(
        &self,
        model: &str,
        req: RecommendRequest,
    ) -> impl Future<Output = Answer<RecommendResponse>> + Send {
        let path = format!("/v1/models/{model}/recommend");
        async move { self.post(&path, &req).await }
    }

    fn score(
        &self,
        model: &str,
        req: ScoreRequest,
    ) -> impl Future<Output = Answer<ScoreResponse>> + Send {
        let path = format!("/v1/models/{model}/score");
        async move { self.post(&path, &req).await }
    }

    fn upsert_user(
        &self,
        user_id: u64,
        req: UserRequest,
    ) -> impl Future<Output = Answer<UserResponse>> + Send {
        async move { self.post(&format!("/v1/users/{user_id}"), &req).await }
    }

    fn health(&self) -> impl Future<Output = Answer<Readiness>> + Send {
        async move {
            let resp = self
                .http
                .get(format!("{}/readyz", self.base))
                .send()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Transport(e.to_string()))
        }
    }
}
