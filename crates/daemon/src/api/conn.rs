//! HTTP connections, plain and TLS alike: one accept loop admits up to
//! `max_connections` (the rest get a 503), serves each connection with hyper,
//! closes it when a request head is late or it sits idle, lingers after a 413
//! so a client still writing its body reads the answer, and drains at stop.
//!
//! The timeouts are kept here rather than in hyper: hyper's
//! `header_read_timeout` starts as soon as a connection waits for a head, so
//! it would also close every keep-alive connection idle for longer than the
//! header timeout. Here a head's clock starts with its first byte (for the
//! first request: when the connection opened), and the idle clock runs while
//! nothing is in flight and no bytes move.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::ConnectionsConfig;
use crate::metrics::Metrics;
use crate::shutdown::CancellationToken;
use rankd_client::types::{ErrorBody, ErrorDetail};

/// After a 413, at most this much of the rest of the body is read and
/// discarded before the connection closes...
pub const LINGER_BYTES: usize = 16 << 20;
/// ...for at most this long.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// A refused connection gets its 503 and this long to take it.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// Refusals being answered at once; past this a refused connection is closed
/// without an answer, so a flood of them costs no more than this.
const REFUSALS_AT_ONCE: usize = 256;

/// The limits every connection of a transport lives under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl From<&ConnectionsConfig> for Limits {
    fn from(c: &ConnectionsConfig) -> Self {
        Self {
            header_timeout: c.header_timeout(),
            idle_timeout: c.idle_timeout(),
            max_connections: c.max_connections,
        }
    }
}

/// Why a connection was closed by the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// A request head (or socket frame) did not arrive whole in time.
    Header,
    /// Nothing in flight and nothing moving for the idle timeout.
    Idle,
}

impl Timeout {
    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::Header => "header_timeout",
            Timeout::Idle => "idle_timeout",
        }
    }
}

/// One open connection in `rankd_connections{transport}`, for as long as
/// this lives (also when its task is aborted).
pub(super) struct Open(prometheus::IntGauge);

impl Open {
    pub(super) fn new(metrics: &Metrics, transport: &str) -> Self {
        let gauge = metrics.connections.with_label_values(&[transport]);
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The JSON error a refused connection gets (HTTP body, socket frame).
pub(super) fn refusal_error(limit: usize) -> ErrorBody {
    ErrorBody {
        error: ErrorDetail {
            kind: "overloaded".into(),
            message: format!("connection limit {limit} reached; retry later"),
        },
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `stop`
/// is cancelled; then stops accepting and lets each open connection finish
/// the request in flight and close. Returns once all have closed (the caller
/// bounds the wait; dropping this future closes what is left).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> io::Result<()> {
    let admitted = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let refusal = Arc::new(refusal_answer(limits.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
        let Ok(permit) = admitted.clone().try_acquire_owned() else {
            metrics
                .connections_refused
                .with_label_values(&["http"])
                .inc();
            tracing::debug!(%peer, limit = limits.max_connections, "connection limit reached: refused");
            // Over TLS an answer would cost a handshake: the connection is
            // closed at once. In plain HTTP the 503 is cheap, within bounds.
            if tls.is_none() {
                if let Ok(slot) = refusals.clone().try_acquire_owned() {
                    conns.spawn(refuse(tcp, refusal.clone(), slot));
                }
            }
            continue;
        };
        let conn = Connection {
            app: app.clone(),
            limits,
            metrics: metrics.clone(),
            closing: stop.clone(),
            _permit: permit,
        };
        let tls = tls.clone();
        conns.spawn(async move {
            let _open = Open::new(&conn.metrics, "http");
            match tls {
                None => conn.serve(tcp).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(tcp);
                    match tokio::time::timeout(limits.header_timeout, handshake).await {
                        Ok(Ok(stream)) => conn.serve(stream).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            conn.timed_out(Timeout::Header);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// `HTTP/1.1 503` with the overloaded error and `Connection: close`.
fn refusal_answer(limit: usize) -> Vec<u8> {
    let body = serde_json::to_string(&refusal_error(limit)).expect("an error body encodes");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a refused connection and closes it; what the client sent is read
/// and discarded meanwhile, so that closing does not reset the connection
/// before the client has read the answer.
async fn refuse(mut tcp: TcpStream, answer: Arc<Vec<u8>>, _slot: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        tcp.write_all(&answer).await?;
        tcp.shutdown().await?;
        discard(&mut tcp, 64 << 10).await;
        io::Result::Ok(())
    })
    .await;
}

/// Reads and drops up to `limit` bytes, until the peer closes or errs.
async fn discard<I: AsyncRead + Unpin>(io: &mut I, limit: usize) {
    let mut buf = vec![0u8; 16 << 10];
    let mut left = limit;
    while left > 0 {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// What one admitted connection needs.
struct Connection {
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// The listener's stop: the connection drains.
    closing: CancellationToken,
    /// The connection's place under `max_connections`.
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    fn timed_out(&self, why: Timeout) {
        self.metrics
            .connections_timed_out
            .with_label_values(&["http", why.as_str()])
            .inc();
    }

    /// HTTP/1.1 on `io` until the client leaves, a timeout closes it, or the
    /// drain ends it after its request in flight.
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let clock = Arc::new(Clock::new(Instant::now()));
        let linger = Arc::new(AtomicBool::new(false));
        let service = Served {
            inner: TowerToHyperService::new(self.app.clone()),
            clock: clock.clone(),
            linger: linger.clone(),
        };
        let io = TokioIo::new(Watched {
            inner: io,
            clock: clock.clone(),
        });
        // hyper's own header timer stays off: the clock above keeps time.
        let mut conn = http1::Builder::new()
            .header_read_timeout(None::<Duration>)
            .serve_connection(io, service);
        let mut draining = self.closing.is_cancelled();
        if draining {
            Pin::new(&mut conn).graceful_shutdown();
        }
        let ended = loop {
            tokio::select! {
                r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
                _ = self.closing.cancelled(), if !draining => {
                    draining = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
                why = clock.expired(&self.limits) => {
                    self.timed_out(why);
                    tracing::debug!(reason = why.as_str(), "closing a slow or idle HTTP connection");
                    return;
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
            return;
        }
        let mut io = conn.into_parts().io.into_inner().inner;
        if linger.load(Ordering::Relaxed) {
            // The 413 is written; a client still writing the body it was
            // refused must be able to finish writing and read it, so the
            // rest is read and dropped (bounded) before closing.
            let _ = tokio::time::timeout(LINGER_TIME, async {
                let _ = io.shutdown().await;
                discard(&mut io, LINGER_BYTES).await;
            })
            .await;
        } else {
            let _ = tokio::time::timeout(LINGER_TIME, io.shutdown()).await;
        }
    }
}

/// The router, as hyper calls it: each call marks the connection busy until
/// its answer is ready, and a 413 closes the connection (with lingering).
#[derive(Clone)]
struct Served {
    inner: TowerToHyperService<Router>,
    clock: Arc<Clock>,
    linger: Arc<AtomicBool>,
}

impl hyper::service::Service<Request<Incoming>> for Served {
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.clock.clone());
        let answer = self.inner.call(req);
        let linger = self.linger.clone();
        Box::pin(async move {
            let mut resp = answer.await?;
            if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
                linger.store(true, Ordering::Relaxed);
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            // The connection stays busy until the answer's body has been
            // sent (a streamed answer, such as a bulk call's, outlives its
            // head, and its request body may still be arriving).
            Ok(resp.map(|body| axum::body::Body::new(Holding { body, _busy: busy })))
        })
    }
}

/// A response body that keeps its connection busy while it lives.
struct Holding {
    body: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Where a connection is in its life, for its two clocks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// A request head has begun (or the connection just opened) at this
    /// instant and is not whole yet.
    Head(Instant),
    /// Requests being answered.
    Busy(usize),
    /// Between requests.
    Idle,
}

/// A connection's clocks, moved by its reads and writes (a read while idle
/// begins a head) and by its requests (in flight: no clock).
pub(super) struct Clock {
    state: Mutex<ClockState>,
    changed: Notify,
}

struct ClockState {
    phase: Phase,
    last_io: Instant,
}

impl Clock {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(ClockState {
                phase: Phase::Head(now),
                last_io: now,
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived.
    fn read(&self) {
        let now = Instant::now();
        let mut s = self.state();
        s.last_io = now;
        if s.phase == Phase::Idle {
            s.phase = Phase::Head(now);
            drop(s);
            self.changed.notify_one();
        }
    }

    /// Bytes left.
    fn wrote(&self) {
        self.state().last_io = Instant::now();
    }

    /// When the connection expires, and why; `None` while requests are in
    /// flight.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Timeout)> {
        let s = self.state();
        match s.phase {
            Phase::Head(since) => Some((since + limits.header_timeout, Timeout::Header)),
            Phase::Busy(_) => None,
            Phase::Idle => Some((s.last_io + limits.idle_timeout, Timeout::Idle)),
        }
    }

    /// Resolves when the connection has expired.
    pub(super) async fn expired(&self, limits: &Limits) -> Timeout {
        loop {
            match self.deadline(limits) {
                Some((at, _)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {
                            // The state may have moved while asleep.
                            if let Some((at, why)) = self.deadline(limits) {
                                if at <= Instant::now() {
                                    return why;
                                }
                            }
                        }
                        _ = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

/// A request in flight on a connection; dropping it (answered, or given up)
/// starts the idle clock when it was the last.
struct Busy(Arc<Clock>);

impl Busy {
    fn new(clock: Arc<Clock>) -> Self {
        {
            let mut s = clock.state();
            s.phase = match s.phase {
                Phase::Busy(n) => Phase::Busy(n + 1),
                _ => Phase::Busy(1),
            };
        }
        Self(clock)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.phase = match s.phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle,
        };
        s.last_io = Instant::now();
        drop(s);
        self.0.changed.notify_one();
    }
}

/// The connection's stream, telling its clock about every read and write.
struct Watched<I> {
    inner: I,
    clock: Arc<Clock>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1000),
        max_connections: 1,
    };

    #[tokio::test(start_paused = true)]
    async fn a_head_has_the_header_timeout_from_its_first_byte() {
        let start = Instant::now();
        let clock = Clock::new(start);
        // The first head: from the connection's start, however bytes trickle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        clock.read();
        assert_eq!(clock.expired(&LIMITS).await, Timeout::Header);
        assert_eq!(start.elapsed(), LIMITS.header_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_runs_from_the_last_answer_and_a_new_head_restarts_the_clock() {
        let clock = Arc::new(Clock::new(Instant::now()));
        let busy = Busy::new(clock.clone());
        // In flight: no clock, however long.
        let waited = tokio::time::timeout(Duration::from_secs(30), clock.expired(&LIMITS)).await;
        assert!(waited.is_err());
        drop(busy);
        let answered = Instant::now();
        tokio::time::sleep(Duration::from_millis(600)).await;
        clock.wrote();
        let wrote = Instant::now();
        assert_eq!(clock.expired(&LIMITS).await, Timeout::Idle);
        assert_eq!(wrote.elapsed(), LIMITS.idle_timeout);
        assert!(answered.elapsed() > LIMITS.idle_timeout);

        // A byte while idle begins a head: the header timeout from then on,
        // even though the idle deadline was later.
        let clock = Arc::new(Clock::new(Instant::now()));
        drop(Busy::new(clock.clone()));
        let expiry = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.expired(&LIMITS).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let head = Instant::now();
        clock.read();
        assert_eq!(expiry.await.unwrap(), Timeout::Header);
        assert_eq!(head.elapsed(), LIMITS.header_timeout);
    }
}
