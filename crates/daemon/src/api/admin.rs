//! The admin API (`/v1/admin/...`, HTTP only): load and unload model
//! versions, set the traffic split, read the effective configuration. It
//! exists only when an admin token file is configured, and every route
//! needs one of its tokens. The client-token check of the other `/v1/`
//! routes lives here too.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use super::http::{decoded, parse_json, ApiError, HttpState};
use crate::error::ServeError;
use crate::lifecycle::parse_split;
use rankd_client::types::{TrafficRequest, VersionRequest};

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/admin/models/{model}/load", post(load))
        .route("/v1/admin/models/{model}/unload", post(unload))
        .route("/v1/admin/models/{model}/traffic", post(traffic))
        .route("/v1/admin/config", get(config))
}

const UNAUTHORIZED: &str = "a valid bearer token is required (Authorization: Bearer <token>)";

/// Admin routes: an admin token.
pub async fn require_admin(State(s): State<HttpState>, req: Request, next: Next) -> Response {
    let ok = match (&s.tokens.admin, super::auth::bearer(req.headers())) {
        (Some(admin), Some(t)) => admin.accepts(t),
        _ => false,
    };
    if ok {
        next.run(req).await
    } else {
        refuse(&s)
    }
}

/// Scoring, user and item routes, when a client token file is configured:
/// a client or an admin token.
pub async fn require_client(State(s): State<HttpState>, req: Request, next: Next) -> Response {
    let Some(client) = &s.tokens.client else {
        return next.run(req).await;
    };
    let ok = super::auth::bearer(req.headers()).is_some_and(|t| {
        // Both are checked, so the time taken does not say which kind matched.
        let c = client.accepts(t);
        let a = s.tokens.admin.as_ref().is_some_and(|a| a.accepts(t));
        c | a
    });
    if ok {
        next.run(req).await
    } else {
        refuse(&s)
    }
}

fn refuse(s: &HttpState) -> Response {
    let e = ServeError::Unauthorized(UNAUTHORIZED.into());
    s.service.count_refused("", "unauthorized", &e);
    ApiError(e).into_response()
}

/// An optional JSON body: empty means the defaults.
fn optional_body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(bytes).map_err(ApiError)
    }
}

fn body_within(s: &HttpState, bytes: &Bytes) -> Result<(), ApiError> {
    if bytes.len() > s.max_body_bytes {
        return Err(ApiError(ServeError::TooLarge(format!(
            "request body must be <= {} bytes, got {}",
            s.max_body_bytes,
            bytes.len()
        ))));
    }
    Ok(())
}

async fn load(
    State(s): State<HttpState>,
    model: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let model = decoded(model)?;
    body_within(&s, &body)?;
    let req: VersionRequest = optional_body(&body)?;
    let (version, ready) = s.lifecycle.admin_load(&model, req.version).await?;
    let (status, state) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::ACCEPTED, "loading")
    };
    let mut body = serde_json::json!({ "model": model, "version": version, "state": state });
    if !ready {
        body["poll"] = serde_json::Value::String(format!("/v1/models/{model}"));
    }
    Ok((status, Json(body)).into_response())
}

async fn unload(
    State(s): State<HttpState>,
    model: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = decoded(model)?;
    body_within(&s, &body)?;
    let req: VersionRequest = parse_json(&body).map_err(ApiError)?;
    let version = req.version.ok_or_else(|| {
        ApiError(ServeError::Invalid(
            "`version` is required to unload".into(),
        ))
    })?;
    s.lifecycle.admin_unload(&model, version)?;
    Ok(Json(
        serde_json::json!({ "model": model, "version": version, "state": "unloaded" }),
    ))
}

async fn traffic(
    State(s): State<HttpState>,
    model: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = decoded(model)?;
    body_within(&s, &body)?;
    let req: TrafficRequest = parse_json(&body).map_err(ApiError)?;
    // `{}` must not quietly return the model to `latest`: only an explicit
    // `"split": null` does.
    let named = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .is_some_and(|v| v.get("split").is_some());
    if !named {
        return Err(ApiError(ServeError::Invalid(
            "`split` is required: {\"split\": {\"1\": 90, \"2\": 10}}, or {\"split\": null} for the latest version".into(),
        )));
    }
    let split = req.split.as_ref().map(parse_split).transpose()?;
    let effective = s.lifecycle.set_traffic(&model, split)?;
    let traffic: serde_json::Map<String, serde_json::Value> = effective
        .into_iter()
        .map(|(v, p)| (v.to_string(), p.into()))
        .collect();
    Ok(Json(
        serde_json::json!({ "model": model, "traffic": traffic }),
    ))
}

async fn config(State(s): State<HttpState>) -> Json<serde_json::Value> {
    Json(serde_json::to_value(s.config.as_ref()).expect("the config serialises"))
}
