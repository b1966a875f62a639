//! The client calls over HTTP/JSON (the `http` feature).

use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::client::{Answer, Client, ClientError};
use crate::types::*;

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

    #[allow(clippy::manual_async_fn)] // the trait promises a Send future
    fn upsert_user(
        &self,
        user_id: u64,
        req: UserRequest,
    ) -> impl Future<Output = Answer<UserResponse>> + Send {
        async move { self.post(&format!("/v1/users/{user_id}"), &req).await }
    }

    #[allow(clippy::manual_async_fn)] // the trait promises a Send future
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
