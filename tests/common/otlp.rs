//! An OTLP/HTTP trace receiver standing in for a collector: a plain HTTP/1.1
//! server on a free port that accepts `POST /v1/traces` in protobuf or JSON
//! and keeps every span it was sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One received span, ids in lowercase hex (an empty parent: a root span).
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// Attribute values as text (integers and doubles printed).
    pub attributes: HashMap<String, String>,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Content types of the export requests.
    content_types: Vec<String>,
    paths: Vec<String>,
}

/// The receiver runs on its own thread, so a test that blocks (waiting for
/// the daemon to exit) does not stall the export it waits for.
pub struct Receiver {
    pub url: String,
    received: Arc<Mutex<Received>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Received::default()));
        let r = received.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let accept = async {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(serve(stream, r.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            url,
            received,
            stop: Some(stop),
        }
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    pub fn content_types(&self) -> Vec<String> {
        self.received.lock().unwrap().content_types.clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.received.lock().unwrap().paths.clone()
    }

    /// Waits up to `within` until `found` picks something from the spans.
    pub async fn wait_for<T>(&self, within: Duration, found: impl Fn(&[Span]) -> Option<T>) -> T {
        let until = Instant::now() + within;
        loop {
            if let Some(t) = found(&self.spans()) {
                return t;
            }
            if Instant::now() > until {
                let names: Vec<String> = self
                    .spans()
                    .iter()
                    .map(|s| format!("{} {:?}", s.name, s.attributes))
                    .collect();
                panic!(
                    "not among the {} spans received within {within:?}: {names:#?}",
                    names.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Serves one connection: requests with a `Content-Length` body, each
/// answered 200 with an empty export response.
async fn serve(mut stream: TcpStream, received: Arc<Mutex<Received>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.lines();
        let path = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("")
            .to_string();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let content_type = header("content-type").unwrap_or_default();
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        let spans = if content_type.contains("json") {
            from_json(&body)
        } else {
            from_protobuf(&body)
        };
        {
            let mut r = received.lock().unwrap();
            r.spans.extend(spans);
            r.content_types.push(content_type.clone());
            r.paths.push(path);
        }
        let (answer, kind): (&[u8], &str) = if content_type.contains("json") {
            (b"{}", "application/json")
        } else {
            (b"", "application/x-protobuf")
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        if stream.write_all(resp.as_bytes()).await.is_err()
            || stream.write_all(answer).await.is_err()
        {
            return;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_protobuf(body: &[u8]) -> Vec<Span> {
    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
    let mut out = Vec::new();
    for rs in req.resource_spans {
        for ss in rs.scope_spans {
            for s in ss.spans {
                let attributes = s
                    .attributes
                    .into_iter()
                    .map(|kv| {
                        let v = match kv.value.and_then(|v| v.value) {
                            Some(any_value::Value::StringValue(v)) => v,
                            Some(any_value::Value::IntValue(v)) => v.to_string(),
                            Some(any_value::Value::DoubleValue(v)) => v.to_string(),
                            Some(any_value::Value::BoolValue(v)) => v.to_string(),
                            other => format!("{other:?}"),
                        };
                        (kv.key, v)
                    })
                    .collect();
                out.push(Span {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    attributes,
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                });
            }
        }
    }
    out
}

/// OTLP's JSON encoding: camelCase fields, ids in hex, 64-bit integers as
/// strings or numbers.
fn from_json(body: &[u8]) -> Vec<Span> {
    let v: Value = serde_json::from_slice(body).expect("an OTLP JSON export");
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let number = |v: &Value| match v {
        Value::String(s) => s.parse().unwrap_or(0),
        other => other.as_u64().unwrap_or(0),
    };
    let mut out = Vec::new();
    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let attributes = s["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|kv| {
                        let value = kv["value"]
                            .as_object()
                            .and_then(|o| o.values().next())
                            .map(text)
                            .unwrap_or_default();
                        (text(&kv["key"]), value)
                    })
                    .collect();
                out.push(Span {
                    trace_id: text(&s["traceId"]).to_lowercase(),
                    span_id: text(&s["spanId"]).to_lowercase(),
                    parent_span_id: text(&s["parentSpanId"]).to_lowercase(),
                    name: text(&s["name"]),
                    attributes,
                    start_ns: number(&s["startTimeUnixNano"]),
                    end_ns: number(&s["endTimeUnixNano"]),
                });
            }
        }
    }
    out
}
