//! The Unix-socket transport: length-prefixed MessagePack frames, pipelined.
//! Each connection has a reader (frames in, one task per request, at most
//! `max_inflight` at once: past that it stops reading, which pushes back on the
//! client) and a writer (answers out, in completion order). A client that
//! stops reading is cut off after `write_timeout`; a broken frame ends only
//! its own connection. At most `max_connections` are open (the next gets an
//! `overloaded` error frame with id 0 and is closed); a connection whose
//! frame has not arrived whole within the header timeout of its first byte,
//! or with nothing in flight and nothing read for the idle timeout, is closed.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

mod request;

use self::request::{Op, SocketOp};
use super::conn::{Limits, Open, Timeout};
use super::{bulk, Service};
use crate::error::ServeError;
use crate::shutdown::CancellationToken;
use rankd_client::frame::{encode_frame, FrameDecoder, FrameError};
use rankd_client::types::*;
use rankd_client::wire::*;

#[derive(Debug, Clone)]
pub struct UdsConfig {
    pub path: PathBuf,
    pub max_frame_bytes: usize,
    /// Requests of one connection being served at once.
    pub max_inflight: usize,
    /// How long a write may block on a client that does not read.
    pub write_timeout: Duration,
    /// The header (partial frame) and idle timeouts, the connection cap.
    pub limits: Limits,
}

/// Binds the socket with mode 0660. A socket file left by a dead process is
/// replaced; one that still accepts connections is not taken over.
/// Binds the socket at `path` with permission bits `mode` and, when given,
/// group `group` (a name from /etc/group or a numeric gid).
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "socket {} is in use by a running process; stop it or choose another --uds path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
        tracing::info!(path = %path.display(), "removed a stale socket file");
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if let Some(group) = group {
        let gid = resolve_group(group)?;
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "setting the group of {} to {group} (gid {gid})",
                path.display()
            )
        })?;
    }
    Ok(listener)
}

/// A group name (looked up in /etc/group) or a numeric gid.
fn resolve_group(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            Some((name, gid))
        })
        .find(|(name, _)| *name == group)
        .map(|(_, gid)| gid)
        .ok_or_else(|| anyhow::anyhow!("uds_group: no group named '{group}' in /etc/group"))
}

/// Accepts connections until `stop` is cancelled, then stops accepting, removes
/// the socket file and drains: every connection stops reading new frames,
/// answers the requests it has read and closes. Returns once all are closed
/// (the caller bounds the wait; dropping this future closes what is left).
pub async fn serve(
    listener: UnixListener,
    service: Arc<Service>,
    config: UdsConfig,
    stop: CancellationToken,
) {
    let config = Arc::new(config);
    let mut connections = tokio::task::JoinSet::new();
    let admitted = Arc::new(Semaphore::new(config.limits.max_connections));
    let limit = config.limits.max_connections;
    let refusal = error_frame(
        0,
        &ServeError::Overloaded {
            message: super::conn::refusal_error(limit).error.message,
            retry_after_ms: 1000,
        },
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    while connections.try_join_next().is_some() {}
                    let Ok(permit) = admitted.clone().try_acquire_owned() else {
                        service.metrics().connections_refused.with_label_values(&["uds"]).inc();
                        tracing::debug!(limit, "socket connection limit reached: refused");
                        // The error frame if the socket buffer takes it at
                        // once, then closed: a refusal never waits.
                        let _ = stream.try_write(&refusal);
                        continue;
                    };
                    connections.spawn(connection(stream, service.clone(), config.clone(), stop.clone(), permit));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "socket accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = stop.cancelled() => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&config.path);
    if !connections.is_empty() {
        tracing::info!(
            connections = connections.len(),
            "draining socket connections"
        );
    }
    while connections.join_next().await.is_some() {}
}

fn encode<R: serde::Serialize>(resp: &WireResponse<R>) -> Vec<u8> {
    frame_of(resp)
}

fn frame_of<T: serde::Serialize>(resp: &T) -> Vec<u8> {
    let payload = rmp_serde::to_vec_named(resp).expect("responses always encode");
    let mut out = Vec::with_capacity(payload.len() + 4);
    encode_frame(&payload, &mut out);
    out
}

fn error_frame(id: u64, e: &ServeError) -> Vec<u8> {
    encode::<()>(&WireResponse {
        id,
        ok: false,
        result: None,
        error: Some(ErrorDetail {
            kind: e.kind().to_string(),
            message: e.to_string(),
        }),
    })
}

async fn connection(
    stream: UnixStream,
    service: Arc<Service>,
    config: Arc<UdsConfig>,
    drain: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let metrics = service.metrics();
    let _open = Open::new(metrics, "uds");
    metrics.uds_connections.inc();
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(config.max_inflight.max(1) * 2);
    let writer = tokio::spawn(write_loop(wr, rx, config.write_timeout));
    let inflight = Arc::new(Semaphore::new(config.max_inflight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let decoder = FrameDecoder::new(config.max_frame_bytes);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let limits = config.limits;
    // The idle clock runs from the last read or answered request.
    let mut last_activity = Instant::now();
    let mut frame_started: Option<Instant> = None;
    'conn: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    frame_started = None;
                    let req = match decode(&frame) {
                        Ok(req) => req,
                        Err(answer) => {
                            if tx.send(answer).await.is_err() {
                                break 'conn;
                            }
                            continue;
                        }
                    };
                    // Calls that never wait on the executor are answered here,
                    // without a task hand-off; an unknown op gets its refusal
                    // from a task, as the other ops do.
                    let op = Op::parse(&req.op);
                    if op.is_some_and(Op::answered_in_place) {
                        if tx.send(answer(&service, req).await).await.is_err() {
                            break 'conn;
                        }
                        continue;
                    }
                    let permit = tokio::select! {
                        p = inflight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                        _ = tx.closed() => break 'conn,
                    };
                    let (service, tx) = (service.clone(), tx.clone());
                    while tasks.try_join_next().is_some() {}
                    tasks.spawn(async move {
                        if op == Some(Op::Bulk) {
                            bulk(service, req, &tx).await;
                        } else {
                            let _ = tx.send(answer(&service, req).await).await;
                        }
                        drop(permit);
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    protocol_error(&service, &tx, e).await;
                    break 'conn;
                }
            }
        }
        // A partial frame's clock starts when the reader waits for its rest
        // (not at the read that brought its first bytes: the reader may
        // have been held since by the in-flight limit, no fault of the
        // client's).
        if buf.is_empty() {
            frame_started = None;
        } else if frame_started.is_none() {
            frame_started = Some(Instant::now());
        }
        while tasks.try_join_next().is_some() {
            last_activity = Instant::now();
        }
        let deadline = match frame_started {
            Some(t) => Some((t + limits.header_timeout, Timeout::Header)),
            None if tasks.is_empty() => Some((last_activity + limits.idle_timeout, Timeout::Idle)),
            None => None,
        };
        let expiry = async {
            match deadline {
                Some((at, why)) => {
                    tokio::time::sleep_until(at).await;
                    why
                }
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = tx.closed() => break,
            // Draining: no new requests; those read are answered below.
            _ = drain.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                last_activity = Instant::now();
                continue;
            }
            why = expiry => {
                metrics
                    .connections_timed_out
                    .with_label_values(&["uds", why.as_str()])
                    .inc();
                tracing::debug!(reason = why.as_str(), "closing a slow or idle socket connection");
                break;
            }
        };
        match read {
            Ok(0) => {
                if let Err(e) = decoder.finish(&buf) {
                    metrics.uds_errors.with_label_values(&["truncated"]).inc();
                    tracing::debug!(error = %e, "socket client left mid-frame");
                }
                break;
            }
            Ok(_) => last_activity = Instant::now(),
            Err(e) => {
                tracing::debug!(error = %e, "socket read failed");
                break;
            }
        }
    }
    if tx.is_closed() {
        // The writer gave up on this client: its pending work is wasted.
        tasks.abort_all();
    }
    drop(tx);
    while tasks.join_next().await.is_some() {}
    let _ = writer.await;
    metrics.uds_connections.dec();
}

async fn protocol_error(service: &Service, tx: &mpsc::Sender<Vec<u8>>, e: FrameError) {
    let reason = match e {
        FrameError::TooLarge { .. } => "too_large",
        FrameError::Truncated { .. } => "truncated",
    };
    service
        .metrics()
        .uds_errors
        .with_label_values(&[reason])
        .inc();
    tracing::debug!(error = %e, "closing a socket connection");
    let _ = tx
        .send(error_frame(0, &ServeError::TooLarge(e.to_string())))
        .await;
}

async fn write_loop(
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    write_timeout: Duration,
) {
    let mut out = Vec::with_capacity(16 * 1024);
    while let Some(frame) = rx.recv().await {
        out.extend_from_slice(&frame);
        // Coalesce whatever else is ready into one write.
        while out.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(more) => out.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        match tokio::time::timeout(write_timeout, wr.write_all(&out)).await {
            Ok(Ok(())) => out.clear(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "socket write failed");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = write_timeout.as_millis() as u64,
                    "socket client stopped reading its answers; disconnecting it"
                );
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// Decodes one request frame, or returns the error frame that answers it.
fn decode(frame: &[u8]) -> Result<WireRequest, Vec<u8>> {
    // A request is a map; serde would also read a struct from an array.
    let is_map = matches!(frame.first(), Some(0x80..=0x8f | 0xde | 0xdf));
    if !is_map {
        let err = if frame.is_empty() {
            ServeError::Malformed("empty frame; a request is a MessagePack map".into())
        } else if rmp_serde::from_slice::<serde::de::IgnoredAny>(frame).is_err() {
            ServeError::Malformed("the frame is not a complete MessagePack value".into())
        } else {
            ServeError::Invalid("a request must be a MessagePack map".into())
        };
        return Err(error_frame(0, &err));
    }
    rmp_serde::from_slice(frame).map_err(|e| {
        let id = rmp_serde::from_slice::<WireId>(frame).map_or(0, |w| w.id);
        let err = match e {
            rmp_serde::decode::Error::Syntax(_) | rmp_serde::decode::Error::TypeMismatch(_) => {
                ServeError::Invalid(format!("invalid request: {e}"))
            }
            _ => ServeError::Malformed(format!("undecodable MessagePack request: {e}")),
        };
        error_frame(id, &err)
    })
}

/// One result frame of a bulk call: the call's `id`, the entry's `line`,
/// and its `result` or `error`.
#[derive(serde::Serialize)]
struct BulkFrame<'a> {
    id: u64,
    line: u64,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a bulk::Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorDetail>,
}

/// Serves a `bulk` op: one frame per entry, in order, as results complete,
/// then `{"id", "ok": true, "result": {"done": N}}`. A client that does not
/// read its frames stops the call (the writer's timeout cuts it off).
async fn bulk(service: Arc<Service>, req: WireRequest, tx: &mpsc::Sender<Vec<u8>>) {
    let id = req.id;
    // Named only when `requests` is missing: the model is looked up before
    // the entries are required, so an unknown model is `not_found` either way.
    let named = req.requests.is_none().then(|| req.model.clone()).flatten();
    let checked = match SocketOp::try_from(req) {
        Ok(SocketOp::Bulk { model, requests }) => {
            service.bulk_target(&model).map(|()| (model, requests))
        }
        Ok(_) => unreachable!("the connection hands only bulk calls to `bulk`"),
        Err(r) => Err(match named {
            Some(model) if r.is_missing("requests") => service
                .bulk_target(&model)
                .err()
                .unwrap_or_else(|| r.into()),
            _ => r.into(),
        }),
    };
    let (model, requests) = match checked {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(error_frame(id, &e)).await;
            return;
        }
    };
    let mut input = futures::stream::iter(requests.into_iter().enumerate().map(|(i, v)| {
        let parsed = serde_json::from_value::<bulk::BulkLine>(v)
            .map_err(|e| ServeError::Invalid(format!("invalid request: {e}")));
        (i as u64 + 1, parsed)
    }));
    let (results, mut rx) = mpsc::channel::<bulk::BulkResult>(64);
    let forward = async {
        while let Some(r) = rx.recv().await {
            let (result, error) = match &r.outcome {
                bulk::Outcome::Error { error } => (None, Some(error)),
                outcome => (Some(outcome), None),
            };
            let frame = frame_of(&BulkFrame {
                id,
                line: r.line,
                ok: error.is_none(),
                result,
                error,
            });
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    };
    let (ended, ()) = tokio::join!(
        bulk::run(service.clone(), model, &mut input, results),
        forward
    );
    let last = match ended {
        bulk::Ended::Done(n) => encode(&WireResponse {
            id,
            ok: true,
            result: Some(serde_json::json!({ "done": n })),
            error: None,
        }),
        bulk::Ended::Cut(n) => error_frame(id, &bulk::cut_error(n)),
        bulk::Ended::Gone => return,
    };
    let _ = tx.send(last).await;
}

/// Serves one decoded request; always returns an answer frame.
async fn answer(service: &Service, req: WireRequest) -> Vec<u8> {
    let id = req.id;
    let span = crate::trace::request_span(&req.op, &req.op, req.model.as_deref().unwrap_or(""));
    let result = async { dispatch(service, SocketOp::try_from(req)?).await }
        .instrument(span.clone())
        .await;
    match &result {
        Ok(_) => crate::trace::finish(&span, 200, None),
        Err(e) => crate::trace::finish(&span, e.status(), Some(e.kind())),
    }
    match result {
        Ok(result) => encode(&WireResponse {
            id,
            ok: true,
            result: Some(result),
            error: None,
        }),
        Err(e) => error_frame(id, &e),
    }
}

/// Serves one request. A `bulk` call never comes here: it streams its
/// answers (`bulk`).
async fn dispatch(service: &Service, op: SocketOp) -> Result<WireResult, ServeError> {
    match op {
        SocketOp::Recommend {
            model,
            user_id,
            k,
            exclude,
            timeout_ms,
            version,
            priority,
            filter,
            context,
        } => {
            let body = RecommendRequest {
                user_id,
                k: k.unwrap_or(10),
                exclude: exclude.unwrap_or_default(),
                timeout_ms,
                version,
                priority,
                filter,
                context,
            };
            service.recommend_any(&model, body).await.map(|r| match r {
                super::pipeline::Recommended::Model(r) => WireResult::Recommend(r),
                super::pipeline::Recommended::Pipeline(p) => WireResult::Pipeline(p),
            })
        }
        SocketOp::Score {
            model,
            user_id,
            items,
            timeout_ms,
            version,
            priority,
            context,
        } => {
            let body = ScoreRequest {
                user_id,
                items,
                timeout_ms,
                version,
                priority,
                context,
            };
            service.score(&model, body).await.map(WireResult::Score)
        }
        SocketOp::UpsertUser {
            user_id,
            history,
            features,
            sparse,
        } => {
            let body = UserRequest {
                history,
                features,
                sparse,
            };
            service
                .upsert_user(user_id, body)
                .await
                .map(WireResult::User)
        }
        SocketOp::UpsertItem {
            item_id,
            catalogue,
            embedding,
            deleted,
            version,
            attributes,
        } => {
            let body = ItemRequest {
                embedding,
                deleted: deleted.unwrap_or(false),
                version,
                attributes,
            };
            service
                .write_item(catalogue, item_id, body)
                .await
                .map(WireResult::Item)
        }
        SocketOp::GetItem { item_id, catalogue } => service
            .get_item(catalogue, item_id)
            .await
            .map(WireResult::StoredItem),
        SocketOp::Catalogues => service.catalogues().await.map(WireResult::Catalogues),
        SocketOp::Ingest => Ok(WireResult::Ingest(service.ingest())),
        SocketOp::Models { model: Some(m) } => {
            service.model(&m).map(|m| WireResult::Model(Box::new(m)))
        }
        SocketOp::Models { model: None } => Ok(WireResult::Models(service.models())),
        SocketOp::Health => Ok(WireResult::Health(service.readiness())),
        SocketOp::Bulk { .. } => unreachable!("the connection hands a bulk call to `bulk`"),
    }
}
