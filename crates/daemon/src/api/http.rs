//! The HTTP/JSON transport (axum). Handlers only extract and answer; the
//! service validates and dispatches. Every error, including extractor
//! rejections and unknown routes, is `{"error": {"type", "message"}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::Service;
use crate::error::ServeError;
use rankd_client::types::*;

#[derive(Clone)]
pub struct HttpState {
    pub service: Arc<Service>,
    pub max_body_bytes: usize,
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    pub tokens: Tokens,
    /// The effective configuration, secrets redacted (`/v1/admin/config`).
    pub config: Arc<crate::config::Config>,
}

/// The token files, when configured.
#[derive(Clone, Default)]
pub struct Tokens {
    pub admin: Option<Arc<super::auth::TokenFile>>,
    pub client: Option<Arc<super::auth::TokenFile>>,
}

pub fn router(state: HttpState) -> Router {
    let limit = state.max_body_bytes;
    // Scoring, user and item routes: behind the client tokens when set.
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/models/{model}/recommend", post(recommend))
        .route("/v1/models/{model}/score", post(score))
        .route("/v1/models/{model}/bulk", post(bulk))
        .route("/v1/users/{user_id}", post(upsert_user).get(get_user))
        .route("/v1/items/{item_id}", post(write_item))
        .route("/v1/catalogues", get(list_catalogues))
        .route(
            "/v1/catalogues/{catalogue}/items/{item_id}",
            post(write_catalogue_item).get(get_catalogue_item),
        )
        .route("/v1/ingest", get(ingest))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::admin::require_client,
        ))
        .route_layer(axum::middleware::from_fn(traced));
    // Without an admin token file the admin routes do not exist (404).
    let admin = match state.tokens.admin {
        Some(_) => super::admin::routes()
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::admin::require_admin,
            ))
            .route_layer(axum::middleware::from_fn(traced)),
        None => Router::new(),
    };
    // Probes and scrapers stay open.
    Router::new()
        .merge(api)
        .merge(admin)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// One span per API request while spans are exported, named after the
/// matched route and a child of the caller's `traceparent`, if any.
async fn traced(req: Request, next: axum::middleware::Next) -> Response {
    if !crate::trace::enabled() {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let model = match req.uri().path().split('/').collect::<Vec<_>>()[..] {
        ["", "v1", "models", model, ..] | ["", "v1", "admin", "models", model, ..] => model,
        _ => "",
    }
    .to_string();
    let span = crate::trace::request_span(&format!("{} {route}", req.method()), &route, &model);
    crate::trace::set_remote_parent(&span, req.headers());
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let error = resp.extensions().get::<ErrorKind>().map(|k| k.0);
    crate::trace::finish(&span, resp.status().as_u16(), error);
    resp
}

/// The error type of an error answer, for its span.
#[derive(Clone, Copy)]
struct ErrorKind(&'static str);

/// An error as an HTTP answer.
pub struct ApiError(pub ServeError);

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                kind: self.0.kind().to_string(),
                message: self.0.to_string(),
            },
        };
        let mut resp = (status, Json(body)).into_response();
        resp.extensions_mut().insert(ErrorKind(self.0.kind()));
        if let ServeError::Unauthorized(_) = &self.0 {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rankd\""),
            );
        }
        if let ServeError::Overloaded { retry_after_ms, .. } = &self.0 {
            let secs = retry_after_ms.div_ceil(1000).max(1);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&secs.to_string()).expect("digits are a valid header"),
            );
        }
        resp
    }
}

/// A JSON body parsed with rankd's error mapping: syntax errors are 400,
/// well-formed JSON with wrong types or values 422, an oversized body 413.
/// The content type is not required, so a bare `curl -d` works.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<HttpState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &HttpState) -> Result<Self, Self::Rejection> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Refuse on the header alone rather than after reading the limit.
        if let Some(n) = declared.filter(|&n| n > state.max_body_bytes as u64) {
            return Err(ApiError(ServeError::TooLarge(format!(
                "request body must be <= {} bytes, got {n}",
                state.max_body_bytes
            ))));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                let got = declared.map_or_else(|| "more".to_string(), |n| n.to_string());
                ServeError::TooLarge(format!(
                    "request body must be <= {} bytes, got {got}",
                    state.max_body_bytes
                ))
            } else {
                ServeError::Malformed(format!("could not read the request body: {rejection}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody).map_err(ApiError)
    }
}

/// Syntax first (400 for any syntax error anywhere in the body), then shape
/// and values (422): a body must be a JSON object of the request's fields.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ServeError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ServeError::Malformed(format!("request body is not valid UTF-8: {e}")))?;
    let Some(first) = text.trim_start().chars().next() else {
        return Err(ServeError::Malformed(
            "request body is empty; a JSON object is required".into(),
        ));
    };
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| ServeError::Malformed(format!("malformed JSON: {e}")))?;
    if first != '{' {
        let kind = match first {
            '[' => "an array",
            '"' => "a string",
            't' | 'f' => "a boolean",
            'n' => "null",
            _ => "a number",
        };
        let value: String = text.trim().chars().take(64).collect();
        return Err(ServeError::Invalid(format!(
            "invalid type: the request body must be a JSON object, got {kind}: {value}"
        )));
    }
    serde_json::from_str(text).map_err(|e| ServeError::Invalid(format!("invalid request: {e}")))
}

/// Path segments parsed by hand so a bad one gets rankd's error shape.
fn parse_id(field: &str, raw: &str) -> Result<u64, ServeError> {
    raw.parse::<u64>().map_err(|_| {
        ServeError::Invalid(format!(
            "{field} must be an unsigned 64-bit integer, got '{raw}'"
        ))
    })
}

async fn list_models(State(s): State<HttpState>) -> Json<ModelsResponse> {
    Json(s.service.models())
}

async fn get_model(
    State(s): State<HttpState>,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelInfo>, ApiError> {
    Ok(Json(s.service.model(&decoded(model)?)?))
}

/// What a handler extracted before the service saw the request; a refusal
/// (unreadable body, bad path id) is counted in `rankd_requests_total`
/// under the route it was meant for, like the service's own refusals.
fn admitted<T>(
    s: &HttpState,
    model: &str,
    route: &str,
    r: Result<T, ApiError>,
) -> Result<T, ApiError> {
    r.inspect_err(|e| s.service.count_refused(model, route, &e.0))
}

/// A path segment, or rankd's error for one that does not decode (bad
/// percent-encoding, not UTF-8), counted under `route`.
fn segment(
    s: &HttpState,
    route: &str,
    p: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    admitted(s, "", route, decoded(p))
}

pub(super) fn decoded(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(v)| v).map_err(|e| {
        ApiError(ServeError::Invalid(format!(
            "the path segment does not decode: {}",
            e.body_text()
        )))
    })
}

async fn recommend(
    State(s): State<HttpState>,
    model: Result<Path<String>, PathRejection>,
    body: Result<JsonBody<RecommendRequest>, ApiError>,
) -> Result<Json<super::pipeline::Recommended>, ApiError> {
    let model = segment(&s, "recommend", model)?;
    let JsonBody(req) = admitted(&s, &model, "recommend", body)?;
    Ok(Json(s.service.recommend_any(&model, req).await?))
}

/// `POST /v1/models/{model}/bulk`: NDJSON in, NDJSON out, one result per
/// input line in input order (see `bulk`). The body is streamed, so
/// `max_body_bytes` bounds each line, not the body.
async fn bulk(
    State(s): State<HttpState>,
    model: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let model = segment(&s, "bulk", model)?;
    admitted(
        &s,
        &model,
        "bulk",
        s.service.bulk_target(&model).map_err(ApiError),
    )?;
    let body = req.into_body().into_data_stream();
    let broken = Arc::new(std::sync::Mutex::new(None::<String>));
    let lines = {
        let broken = broken.clone();
        futures::stream::unfold(
            super::bulk::Lines::new(body, s.max_body_bytes),
            move |mut lines| {
                let broken = broken.clone();
                async move {
                    match lines.next().await? {
                        super::bulk::Piece::Line(n, r) => Some(((n, r), lines)),
                        super::bulk::Piece::Broken(why) => {
                            *broken.lock().expect("bulk lock") = Some(why);
                            None
                        }
                    }
                }
            },
        )
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let service = s.service.clone();
    tokio::spawn(async move {
        let (results, mut encoded) = tokio::sync::mpsc::channel(64);
        // Fused: read on after the cut, whether or not it had ended.
        let mut lines = Box::pin(lines.fuse());
        let run = super::bulk::run(service, model, &mut lines, results);
        let forward = {
            let tx = tx.clone();
            async move {
                while let Some(r) = encoded.recv().await {
                    if tx.send(ndjson(&r)).await.is_err() {
                        return;
                    }
                }
            }
        };
        let (ended, ()) = tokio::join!(run, forward);
        let last = match ended {
            super::bulk::Ended::Cut(n) => Some(super::bulk::cut_error(n)),
            super::bulk::Ended::Done(_) => broken
                .lock()
                .expect("bulk lock")
                .take()
                .map(ServeError::Malformed),
            super::bulk::Ended::Gone => None,
        };
        let cut = matches!(ended, super::bulk::Ended::Cut(_));
        if let Some(e) = last {
            let _ = tx
                .send(ndjson(
                    &serde_json::json!({ "error": super::bulk::detail(&e) }),
                ))
                .await;
        }
        if cut {
            // Ending the answer now would close the connection while the
            // caller still sends, and the reset could destroy the last line
            // before it is read: keep reading (and dropping) the input until
            // the connection is closed at the end of the grace period.
            while lines.next().await.is_some() {}
        }
        drop(tx);
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

fn ndjson<T: serde::Serialize>(v: &T) -> Bytes {
    let mut out = serde_json::to_vec(v).expect("results always encode");
    out.push(b'\n');
    Bytes::from(out)
}

async fn score(
    State(s): State<HttpState>,
    model: Result<Path<String>, PathRejection>,
    body: Result<JsonBody<ScoreRequest>, ApiError>,
) -> Result<Json<ScoreResponse>, ApiError> {
    let model = segment(&s, "score", model)?;
    let JsonBody(req) = admitted(&s, &model, "score", body)?;
    Ok(Json(s.service.score(&model, req).await?))
}

async fn upsert_user(
    State(s): State<HttpState>,
    user_id: Result<Path<String>, PathRejection>,
    body: Result<JsonBody<UserRequest>, ApiError>,
) -> Result<Json<UserResponse>, ApiError> {
    let user_id = segment(&s, "upsert_user", user_id)?;
    let JsonBody(req) = admitted(&s, "", "upsert_user", body)?;
    let id = parse_id("user_id", &user_id).map_err(ApiError);
    let user_id = admitted(&s, "", "upsert_user", id)?;
    Ok(Json(s.service.upsert_user(user_id, req).await?))
}

async fn get_user(
    State(s): State<HttpState>,
    user_id: Result<Path<String>, PathRejection>,
) -> Result<Json<UserResponse>, ApiError> {
    let user_id = segment(&s, "get_user", user_id)?;
    let id = parse_id("user_id", &user_id).map_err(ApiError);
    let user_id = admitted(&s, "", "get_user", id)?;
    Ok(Json(s.service.get_user(user_id).await?))
}

async fn write_item(
    State(s): State<HttpState>,
    item_id: Result<Path<String>, PathRejection>,
    body: Result<JsonBody<ItemRequest>, ApiError>,
) -> Result<Json<rankd_client::types::ItemSummary>, ApiError> {
    let item_id = segment(&s, "write_item", item_id)?;
    let JsonBody(req) = admitted(&s, "", "write_item", body)?;
    let id = parse_id("item_id", &item_id).map_err(ApiError);
    let item_id = admitted(&s, "", "write_item", id)?;
    Ok(Json(s.service.write_item(None, item_id, req).await?))
}

/// The catalogue and item id of `/v1/catalogues/{catalogue}/items/{item_id}`.
fn catalogue_item(
    s: &HttpState,
    route: &str,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, u64), ApiError> {
    let decoded = p.map(|Path(v)| v).map_err(|e| {
        ApiError(ServeError::Invalid(format!(
            "the path does not decode: {}",
            e.body_text()
        )))
    });
    let (catalogue, item_id) = admitted(s, "", route, decoded)?;
    let id = parse_id("item_id", &item_id).map_err(ApiError);
    Ok((catalogue, admitted(s, "", route, id)?))
}

async fn write_catalogue_item(
    State(s): State<HttpState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<JsonBody<ItemRequest>, ApiError>,
) -> Result<Json<rankd_client::types::ItemSummary>, ApiError> {
    let (catalogue, item_id) = catalogue_item(&s, "write_item", path)?;
    let JsonBody(req) = admitted(&s, "", "write_item", body)?;
    Ok(Json(
        s.service.write_item(Some(catalogue), item_id, req).await?,
    ))
}

async fn get_catalogue_item(
    State(s): State<HttpState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<rankd_client::types::StoredItem>, ApiError> {
    let (catalogue, item_id) = catalogue_item(&s, "get_item", path)?;
    Ok(Json(s.service.get_item(catalogue, item_id).await?))
}

async fn list_catalogues(
    State(s): State<HttpState>,
) -> Result<Json<rankd_client::types::CataloguesResponse>, ApiError> {
    Ok(Json(s.service.catalogues().await?))
}

async fn ingest(State(s): State<HttpState>) -> Json<rankd_client::types::IngestReport> {
    Json(s.service.ingest())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let r = s.service.readiness();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.service.metrics().render(),
    )
        .into_response()
}

async fn not_found(State(s): State<HttpState>, req: Request) -> ApiError {
    let e = ServeError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ));
    s.service.count_refused("", "unmatched", &e);
    ApiError(e)
}

async fn method_not_allowed(State(s): State<HttpState>, req: Request) -> Response {
    s.service
        .count_status("", "unmatched", StatusCode::METHOD_NOT_ALLOWED.as_u16());
    let body = ErrorBody {
        error: ErrorDetail {
            kind: "method_not_allowed".into(),
            message: format!("{} is not allowed on {}", req.method(), req.uri().path()),
        },
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}
