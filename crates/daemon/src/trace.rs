//! Logs and request tracing.
//!
//! Logs go to stderr as text or JSON lines. With an OTLP endpoint, rankd
//! also exports OpenTelemetry spans: one per request (`route`, `model`,
//! `version`, `status`), with two children made from the executor's own
//! clock readings, the wait in the queue and the batch the request ran in
//! (`batch.id`, `batch.size`, `batch.rows`, `device`,
//! `batch.execution_seconds`), and one per applied update batch. An HTTP
//! request's `traceparent` header makes its span a child of the caller's.
//!
//! Spans exist only while export is on: without it every helper here
//! returns at once and the request path does no tracing work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::config::TracingConfig;

/// The target of rankd's exported spans; the OTLP layer sees only these.
pub const TARGET: &str = "rankd::trace";

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// What the executor reports about the batch a request ran in, for its
/// spans; made only while tracing is on.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchTrace {
    /// Counts the executor's batches from 1.
    pub id: u64,
    /// Requests in the batch.
    pub requests: usize,
    /// Rows (candidates) the batch scored.
    pub rows: usize,
    pub device: String,
    /// When the batch was taken from the queue.
    pub taken: Instant,
    pub started: Instant,
    pub finished: Instant,
}

/// Flushes the spans still buffered when dropped (at exit).
#[must_use = "dropping the guard flushes and stops span export"]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            ON.store(false, Ordering::Relaxed);
            if let Err(e) = p.shutdown() {
                eprintln!("rankd: flushing spans at exit failed: {e}");
            }
        }
    }
}

/// Sets up logs on stderr (`json` or text, ANSI colours only on a terminal;
/// filtered by `RANKD_LOG`, default `info`) and, when `tracing` names an
/// endpoint, span export. Call it before any async runtime starts: the
/// exporter's HTTP client runs on its own thread.
pub fn init(json: bool, tracing: Option<&TracingConfig>) -> anyhow::Result<Guard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter =
        tracing_subscriber::EnvFilter::try_from_env("RANKD_LOG").unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        logs.json().flatten_event(true).boxed()
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed()
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    match tracing.and_then(TracingConfig::traces_url) {
        None => {
            registry.init();
            Ok(Guard {
                #[cfg(feature = "otlp")]
                provider: None,
            })
        }
        #[cfg(feature = "otlp")]
        Some(url) => {
            let config = tracing.expect("a URL comes from a config");
            let (layer, provider) = otlp::layer(&url, config)?;
            registry.with(layer).init();
            ON.store(true, Ordering::Relaxed);
            tracing::info!(url = %url, protocol = ?config.otlp_protocol, "exporting spans");
            Ok(Guard {
                provider: Some(provider),
            })
        }
        #[cfg(not(feature = "otlp"))]
        Some(url) => {
            anyhow::bail!("span export to {url} needs a rankd built with the `otlp` feature")
        }
    }
}

/// A request's span, named `name` (`POST /v1/models/{model}/recommend`, or
/// the socket op); `route` is the HTTP route or the socket op. A disabled
/// span when export is off.
pub fn request_span(name: &str, route: &str, model: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        route = %route,
        model = %model,
        version = tracing::field::Empty,
        status = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Records a request's outcome on its span: `status` is the HTTP status
/// (a socket error carries its HTTP equivalent), `error` the error type.
pub fn finish(span: &tracing::Span, status: u16, error: Option<&str>) {
    if span.is_none() {
        return;
    }
    span.record("status", status);
    if let Some(kind) = error {
        span.record("error.type", kind);
    }
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
}

/// Records the model version on the current request span.
pub fn record_version(version: u64) {
    if enabled() {
        tracing::Span::current().record("version", version);
    }
}

/// The current request's `queue` and `batch` child spans, from the
/// executor's clock readings: the queue wait runs from `enqueued` until
/// the batch was taken from the queue (until now when the request ran in
/// no batch), the batch from the start of its execution to its end.
pub fn batch_spans(class: &str, enqueued: Instant, batch: Option<&BatchTrace>) {
    #[cfg(feature = "otlp")]
    if enabled() {
        otlp::batch_spans(class, enqueued, batch);
    }
    #[cfg(not(feature = "otlp"))]
    let _ = (class, enqueued, batch);
}

/// The span of one applied update batch (a disabled one when export is off).
pub fn update_span(messages: usize) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "apply updates",
        otel.kind = "consumer",
        messages,
        events = tracing::field::Empty,
        users = tracing::field::Empty,
        items = tracing::field::Empty,
    )
}

/// Makes `span` a child of the trace named by a W3C `traceparent` (and
/// `tracestate`) header, when there is one.
pub fn set_remote_parent(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    #[cfg(feature = "otlp")]
    if !span.is_none() && headers.contains_key("traceparent") {
        otlp::set_remote_parent(span, headers);
    }
    #[cfg(not(feature = "otlp"))]
    let _ = (span, headers);
}

#[cfg(feature = "otlp")]
mod otlp {
    use std::time::{Instant, SystemTime};

    use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt, Tracer, TracerProvider};
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider};
    use opentelemetry_sdk::Resource;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    use super::{BatchTrace, TARGET};
    use crate::config::{OtlpProtocol, TracingConfig};

    static TRACER: std::sync::OnceLock<SdkTracer> = std::sync::OnceLock::new();

    pub(super) fn layer<S>(
        url: &str,
        config: &TracingConfig,
    ) -> anyhow::Result<(impl Layer<S>, SdkTracerProvider)>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let protocol = match config.otlp_protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .with_protocol(protocol)
            .with_timeout(std::time::Duration::from_secs(10))
            .with_headers(Default::default())
            .build()
            .map_err(|e| anyhow::anyhow!("span exporter for {url}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_resource(
                Resource::builder()
                    .with_service_name("rankd")
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("rankd");
        let _ = TRACER.set(tracer.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target(TARGET, LevelFilter::TRACE));
        Ok((layer, provider))
    }

    /// `at` on the wall clock, from the gap between it and now.
    fn wall(at: Instant, now: Instant, now_wall: SystemTime) -> SystemTime {
        now_wall
            .checked_sub(now.saturating_duration_since(at))
            .unwrap_or(now_wall)
    }

    pub(super) fn batch_spans(class: &str, enqueued: Instant, batch: Option<&BatchTrace>) {
        let Some(tracer) = TRACER.get() else {
            return;
        };
        let current = tracing::Span::current();
        if current.is_none() {
            return;
        }
        let parent = current.context();
        if !parent.span().span_context().is_valid() {
            return;
        }
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let queued_until = batch.map_or(now, |b| b.taken);
        let mut queue = tracer
            .span_builder("queue")
            .with_kind(SpanKind::Internal)
            .with_start_time(wall(enqueued, now, now_wall))
            .with_attributes([KeyValue::new("class", class.to_string())])
            .start_with_context(tracer, &parent);
        queue.end_with_timestamp(wall(queued_until, now, now_wall));
        let Some(b) = batch else {
            return;
        };
        let execution = b.finished.saturating_duration_since(b.started);
        let mut span = tracer
            .span_builder("batch")
            .with_kind(SpanKind::Internal)
            .with_start_time(wall(b.started, now, now_wall))
            .with_attributes([
                KeyValue::new("batch.id", b.id as i64),
                KeyValue::new("batch.size", b.requests as i64),
                KeyValue::new("batch.rows", b.rows as i64),
                KeyValue::new("device", b.device.clone()),
                KeyValue::new("batch.execution_seconds", execution.as_secs_f64()),
            ])
            .start_with_context(tracer, &parent);
        span.end_with_timestamp(wall(b.finished, now, now_wall));
    }

    struct Headers<'a>(&'a axum::http::HeaderMap);

    impl opentelemetry::propagation::Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }

    pub(super) fn set_remote_parent(span: &tracing::Span, headers: &axum::http::HeaderMap) {
        let parent: Context =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
}
