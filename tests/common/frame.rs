//! rankd's socket framing, written independently of the client crate: a
//! 4-byte big-endian length N, then N bytes of MessagePack. Encoding, and
//! raw-socket reads and writes that fail the test instead of hanging.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long any single socket read or write may take before the test fails.
pub const IO_WAIT: Duration = Duration::from_secs(10);

/// One frame: the length header, then `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A request map encoded as MessagePack (with field names).
pub fn msgpack(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("encoding a test request")
}

/// A request as one whole frame.
pub fn request_frame(v: &Value) -> Vec<u8> {
    frame(&msgpack(v))
}

pub async fn connect(path: &Path) -> UnixStream {
    tokio::time::timeout(IO_WAIT, UnixStream::connect(path))
        .await
        .unwrap_or_else(|_| panic!("connecting to {} timed out", path.display()))
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()))
}

pub async fn send(s: &mut (impl AsyncWrite + Unpin), bytes: &[u8], ctx: &str) {
    tokio::time::timeout(IO_WAIT, s.write_all(bytes))
        .await
        .unwrap_or_else(|_| panic!("{ctx}: writing {} bytes timed out", bytes.len()))
        .unwrap_or_else(|e| panic!("{ctx}: writing {} bytes failed: {e}", bytes.len()));
}

pub fn decode(payload: &[u8], ctx: &str) -> Value {
    rmp_serde::from_slice::<Value>(payload).unwrap_or_else(|e| {
        panic!(
            "{ctx}: the daemon's answer is not MessagePack ({e}): {:?}",
            &payload[..payload.len().min(200)]
        )
    })
}

/// Reads one whole answer frame, failing the test on a timeout, on a close or
/// on an error.
pub async fn read_frame(s: &mut (impl AsyncRead + Unpin), ctx: &str) -> Value {
    read_frame_within(s, IO_WAIT, ctx).await
}

/// [`read_frame`], where the header may take up to `wait` to arrive.
pub async fn read_frame_within(
    s: &mut (impl AsyncRead + Unpin),
    wait: Duration,
    ctx: &str,
) -> Value {
    let mut header = [0u8; 4];
    tokio::time::timeout(wait, s.read_exact(&mut header))
        .await
        .unwrap_or_else(|_| panic!("{ctx}: no answer within {wait:?}"))
        .unwrap_or_else(|e| panic!("{ctx}: reading an answer header failed: {e}"));
    let len = u32::from_be_bytes(header) as usize;
    assert!(len <= 64 << 20, "{ctx}: absurd answer length {len}");
    let mut payload = vec![0u8; len];
    tokio::time::timeout(IO_WAIT, s.read_exact(&mut payload))
        .await
        .unwrap_or_else(|_| panic!("{ctx}: the answer body did not arrive within {IO_WAIT:?}"))
        .unwrap_or_else(|e| panic!("{ctx}: reading an answer body of {len} bytes failed: {e}"));
    decode(&payload, ctx)
}

/// Reads `n` answers (in any order).
pub async fn read_frames(s: &mut (impl AsyncRead + Unpin), n: usize, ctx: &str) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(read_frame(s, &format!("{ctx} (answer {} of {n})", i + 1)).await);
    }
    out
}

/// What was left on a connection the daemon closed.
pub struct Closed {
    /// Whole frames received before the end.
    pub frames: Vec<Value>,
    /// Bytes of an incomplete trailing frame.
    pub partial: usize,
    /// `eof` or the read error that ended it.
    pub how: String,
}

/// Reads until the daemon closes the connection (EOF, or a reset: the daemon
/// may close while bytes we sent are still unread), without closing our side.
/// Fails if the connection is still open after `within`.
pub async fn expect_closed(s: &mut UnixStream, within: Duration, ctx: &str) -> Closed {
    let deadline = Instant::now() + within;
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let how = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "{ctx}: the daemon did not close the connection within {within:?} \
                 ({} bytes received meanwhile)",
                bytes.len()
            ),
            Ok(Ok(0)) => break "eof".to_string(),
            Ok(Ok(n)) => {
                bytes.extend_from_slice(&chunk[..n]);
                assert!(
                    bytes.len() <= 512 << 20,
                    "{ctx}: over 512 MiB received while waiting for the close"
                );
            }
            Ok(Err(e)) => break format!("error: {e}"),
        }
    };
    let mut frames = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 4 {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if bytes.len() - at - 4 < len {
            break;
        }
        frames.push(decode(&bytes[at + 4..at + 4 + len], ctx));
        at += 4 + len;
    }
    Closed {
        frames,
        partial: bytes.len() - at,
        how,
    }
}

/// Finds the one answer with `id` among `answers`.
pub fn by_id<'a>(answers: &'a [Value], id: u64, ctx: &str) -> &'a Value {
    let hits: Vec<&Value> = answers.iter().filter(|v| v["id"] == json!(id)).collect();
    assert_eq!(
        hits.len(),
        1,
        "{ctx}: expected exactly one answer with id {id}, got {answers:?}"
    );
    hits[0]
}
