//! Streaming bulk scoring: many score or recommend requests in one call,
//! answered one result per input line, in input order, as they complete.
//! Every line runs as a `bulk` request, so it uses the capacity interactive
//! callers leave.
//!
//! Memory stays bounded whatever the input: at most `WINDOW` lines are in
//! flight, and results go out through a bounded channel, so a caller that
//! reads its results slowly slows the reading of its input (backpressure).
//! Over HTTP the body is NDJSON read as a stream (`Lines`); on the socket the
//! lines arrive as one frame's `requests` list.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::pipeline::Recommended;
use super::Service;
use crate::error::ServeError;
use rankd_client::types::*;

/// Lines of one bulk call being served at once.
pub const WINDOW: usize = 256;

/// One input line: `items` makes it a score request, otherwise a recommend
/// of `k` (default 10).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkLine {
    pub user_id: u64,
    #[serde(default)]
    pub items: Option<Vec<u64>>,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub exclude: Option<Vec<u64>>,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Recommend lines only: attribute → allowed value(s), as in `recommend`.
    #[serde(default)]
    pub filter: Option<rankd_client::types::Filter>,
    /// The line's context, as in `recommend` and `score`.
    #[serde(default)]
    pub context: Option<Vec<f64>>,
}

/// The answer to one input line.
#[derive(Debug, Clone, Serialize)]
pub struct BulkResult {
    /// 1-based number of the input line.
    pub line: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What a line got: its scores, its items, or the error for that line
/// alone. Serialized without a tag, beside `line` over HTTP and as the
/// `result` (or `error`) of a socket frame.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    Scores {
        user_id: u64,
        version: u64,
        scores: Vec<f32>,
    },
    Items {
        user_id: u64,
        version: u64,
        items: Vec<ScoredItem>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        degraded: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cold_start: bool,
    },
    /// A pipeline's recommend line.
    Ranked {
        user_id: u64,
        versions: StageVersions,
        items: Vec<PipelineItem>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        degraded: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        degraded_reason: Option<String>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cold_start: bool,
    },
    Error {
        error: ErrorDetail,
    },
}

impl BulkResult {
    pub fn error(line: u64, e: &ServeError) -> Self {
        Self {
            line,
            outcome: Outcome::Error { error: detail(e) },
        }
    }
}

pub fn detail(e: &ServeError) -> ErrorDetail {
    ErrorDetail {
        kind: e.kind().to_string(),
        message: e.to_string(),
    }
}

/// How a bulk call ended.
#[derive(Debug, Clone)]
pub enum Ended {
    /// Every line was answered.
    Done(u64),
    /// The caller stopped reading results.
    Gone,
    /// The daemon's grace period ended, after this many lines.
    Cut(u64),
}

/// The error a call cut by the grace period ends with, on both transports.
pub fn cut_error(lines: u64) -> ServeError {
    ServeError::NotReady(format!(
        "rankd is shutting down: the bulk call was cut at the end of the grace period after {lines} lines"
    ))
}

/// Serves the lines of `input` against `model`, sending each result to
/// `out` in input order. `input` yields each line's 1-based number and the
/// line or the reason it cannot be served.
pub async fn run<S>(
    service: Arc<Service>,
    model: String,
    input: &mut S,
    out: mpsc::Sender<BulkResult>,
) -> Ended
where
    S: Stream<Item = (u64, Result<BulkLine, ServeError>)> + Unpin,
{
    let mut input = input.fuse();
    let mut inflight = FuturesOrdered::new();
    let mut done = 0u64;
    let mut eof = false;
    let mut cut = std::pin::pin!(service.cut());
    loop {
        if eof && inflight.is_empty() {
            return Ended::Done(done);
        }
        tokio::select! {
            biased;
            _ = &mut cut => return Ended::Cut(done),
            Some(result) = inflight.next(), if !inflight.is_empty() => {
                // A full channel stops the loop here, so no more input is
                // read; the cut still ends a call whose reader is slow.
                tokio::select! {
                    biased;
                    _ = &mut cut => return Ended::Cut(done),
                    sent = out.send(result) => {
                        if sent.is_err() {
                            return Ended::Gone;
                        }
                    }
                }
                done += 1;
            }
            next = input.next(), if !eof && inflight.len() < WINDOW => match next {
                Some((line, Ok(req))) => {
                    let (service, model) = (service.clone(), model.clone());
                    inflight.push_back(Box::pin(async move { one(&service, &model, line, req).await })
                        as std::pin::Pin<Box<dyn std::future::Future<Output = BulkResult> + Send>>);
                }
                Some((line, Err(e))) => {
                    inflight.push_back(Box::pin(std::future::ready(BulkResult::error(line, &e))));
                }
                None => eof = true,
            },
        }
    }
}

async fn one(service: &Service, model: &str, line: u64, req: BulkLine) -> BulkResult {
    let timeout = req
        .timeout_ms
        .map_or(service.max_timeout(), std::time::Duration::from_millis);
    // (The first attempt checks the line's own timeout_ms.)
    let give_up = tokio::time::Instant::now() + timeout.min(service.max_timeout());
    // A full bulk queue is waited out (other bulk calls hold it), not
    // answered with an error line, until the line's own deadline.
    let mut pause = std::time::Duration::from_millis(2);
    let mut timeout_ms = timeout.as_millis() as u64;
    loop {
        match attempt(service, model, &req, timeout_ms).await {
            Err(ServeError::Overloaded { .. }) if tokio::time::Instant::now() + pause < give_up => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
                let left = give_up.saturating_duration_since(tokio::time::Instant::now());
                timeout_ms = (left.as_millis() as u64).max(1);
            }
            Ok(outcome) => return BulkResult { line, outcome },
            Err(e) => return BulkResult::error(line, &e),
        }
    }
}

async fn attempt(
    service: &Service,
    model: &str,
    req: &BulkLine,
    timeout_ms: u64,
) -> Result<Outcome, ServeError> {
    let timeout_ms = Some(timeout_ms);
    match (&req.items, req.k) {
        (Some(_), Some(_)) => Err(ServeError::Invalid(
            "a bulk line has `items` (score) or `k` (recommend), not both".into(),
        )),
        (Some(items), None) => service
            .score(
                model,
                ScoreRequest {
                    user_id: req.user_id,
                    items: items.clone(),
                    timeout_ms,
                    version: req.version,
                    priority: Some(Priority::Bulk),
                    context: req.context.clone(),
                },
            )
            .await
            .map(|r| Outcome::Scores {
                user_id: req.user_id,
                version: r.version,
                scores: r.scores,
            }),
        (None, k) => service
            .recommend_any(
                model,
                RecommendRequest {
                    user_id: req.user_id,
                    k: k.unwrap_or(10),
                    exclude: req.exclude.clone().unwrap_or_default(),
                    timeout_ms,
                    version: req.version,
                    priority: Some(Priority::Bulk),
                    filter: req.filter.clone(),
                    context: req.context.clone(),
                },
            )
            .await
            .map(|r| match r {
                Recommended::Model(r) => Outcome::Items {
                    user_id: req.user_id,
                    version: r.version,
                    items: r.items,
                    degraded: r.degraded,
                    cold_start: r.cold_start,
                },
                Recommended::Pipeline(p) => Outcome::Ranked {
                    user_id: req.user_id,
                    versions: p.versions,
                    items: p.items,
                    degraded: p.degraded,
                    degraded_reason: p.degraded_reason,
                    cold_start: p.cold_start,
                },
            }),
    }
}

/// Parses one NDJSON line into a request, or the error for that line.
pub fn parse_line(bytes: &[u8]) -> Result<BulkLine, ServeError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ServeError::Invalid(format!("the line is not valid UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| {
        // The position is within the line: "column", not "line 1 column".
        let e = e.to_string().replace(" at line 1 column ", " at column ");
        ServeError::Invalid(format!("invalid line: {e}"))
    })
}

/// Splits a body stream into NDJSON lines of at most `max_line` bytes
/// without holding more than one line (plus one chunk) in memory. A longer
/// line is skipped to its end and reported as an error for that line; blank
/// lines are skipped but counted.
pub struct Lines<B> {
    body: B,
    buf: BytesMut,
    max_line: usize,
    /// 1-based number of the line being read.
    line: u64,
    /// Bytes of an overlong line skipped so far (`None`: not skipping).
    skipping: Option<usize>,
    /// How much of `buf` holds no newline (already searched).
    scanned: usize,
    eof: bool,
}

/// What `Lines` yields besides a line: a broken input.
pub enum Piece {
    Line(u64, Result<BulkLine, ServeError>),
    Broken(String),
}

impl<B, E> Lines<B>
where
    B: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(body: B, max_line: usize) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            max_line,
            line: 0,
            skipping: None,
            scanned: 0,
            eof: false,
        }
    }

    /// The next non-blank line, `Some(Broken)` if the body failed, `None` at
    /// its end.
    pub async fn next(&mut self) -> Option<Piece> {
        loop {
            // Only the bytes not searched yet are searched (a line sent in
            // many small chunks costs no more than one sent whole).
            let found = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| self.scanned + i);
            self.scanned = self.buf.len();
            if let Some(at) = found {
                self.scanned = 0;
                let raw = self.buf.split_to(at + 1);
                self.line += 1;
                if let Some(skipped) = self.skipping.take() {
                    return Some(Piece::Line(self.line, Err(self.too_long(skipped + at))));
                }
                if at > self.max_line {
                    return Some(Piece::Line(self.line, Err(self.too_long(at))));
                }
                let line = trim(&raw[..at]);
                if line.is_empty() {
                    continue;
                }
                return Some(Piece::Line(self.line, parse_line(line)));
            }
            if self.buf.len() > self.max_line {
                // No end in sight: drop what is held and skip to the next
                // newline.
                *self.skipping.get_or_insert(0) += self.buf.len();
                self.buf.clear();
                self.scanned = 0;
            }
            if self.eof {
                if let Some(skipped) = self.skipping.take() {
                    self.line += 1;
                    return Some(Piece::Line(self.line, Err(self.too_long(skipped))));
                }
                self.scanned = 0;
                let rest = self.buf.split();
                let line = trim(&rest);
                if line.is_empty() {
                    return None;
                }
                self.line += 1;
                return Some(Piece::Line(self.line, parse_line(line)));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    self.eof = true;
                    return Some(Piece::Broken(format!(
                        "the request body broke off after line {}: {e}",
                        self.line
                    )));
                }
                None => self.eof = true,
            }
        }
    }

    fn too_long(&self, len: usize) -> ServeError {
        ServeError::Invalid(format!(
            "a bulk line must be <= {} bytes (max_body_bytes), got {len}",
            self.max_line
        ))
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(chunks: Vec<&'static [u8]>, max: usize) -> Vec<(u64, Result<u64, String>)> {
        let body = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Bytes::from_static(c))),
        );
        let mut lines = Lines::new(body, max);
        let mut out = Vec::new();
        while let Some(p) = lines.next().await {
            match p {
                Piece::Line(n, r) => out.push((n, r.map(|l| l.user_id).map_err(|e| e.to_string()))),
                Piece::Broken(e) => panic!("{e}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn lines_split_across_chunks_blank_lines_and_a_missing_final_newline() {
        let got = collect(
            vec![
                b"{\"user_id\": 1}\n{\"user",
                b"_id\": 2}\n\n  \n{\"user_id\": 3}",
            ],
            1000,
        )
        .await;
        assert_eq!(got, vec![(1, Ok(1)), (2, Ok(2)), (5, Ok(3))]);
    }

    #[tokio::test]
    async fn an_overlong_line_is_an_error_for_that_line_alone() {
        let long: &'static [u8] = Box::leak(
            format!("{{\"user_id\": 9, \"items\": [{}1]}}\n", "1, ".repeat(100))
                .into_bytes()
                .into_boxed_slice(),
        );
        let got = collect(
            vec![
                b"{\"user_id\": 1}\n",
                &long[..150],
                &long[150..],
                b"{\"user_id\": 2}\n",
            ],
            64,
        )
        .await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], (1, Ok(1)));
        let (n, err) = &got[1];
        assert_eq!(*n, 2);
        let msg = err.as_ref().unwrap_err();
        assert!(
            msg.contains("<= 64 bytes") && msg.contains(&format!("got {}", long.len() - 1)),
            "{msg}"
        );
        assert_eq!(got[2], (3, Ok(2)));
    }

    #[tokio::test]
    async fn an_overlong_line_in_one_chunk_is_caught_too() {
        let got = collect(
            vec![b"{\"user_id\": 1,             \"k\": 2}\n{\"user_id\": 2}\n"],
            20,
        )
        .await;
        assert!(got[0].1.as_ref().unwrap_err().contains("got 34"), "{got:?}");
        assert_eq!(got[1], (2, Ok(2)));
    }

    #[tokio::test]
    async fn a_line_in_one_byte_chunks_is_found_whole() {
        let text: &'static [u8] = b"{\"user_id\": 12345, \"k\": 3}\n{\"user_id\": 6}\n";
        let chunks: Vec<&'static [u8]> = (0..text.len()).map(|i| &text[i..i + 1]).collect();
        let got = collect(chunks, 1000).await;
        assert_eq!(got, vec![(1, Ok(12345)), (2, Ok(6))]);
    }

    #[tokio::test]
    async fn a_bad_line_names_the_problem() {
        let got = collect(vec![b"{\"user_id\": 1, \"nope\": 2}\nnot json\n"], 1000).await;
        assert!(got[0].1.as_ref().unwrap_err().contains("nope"), "{got:?}");
        assert!(
            got[1].1.as_ref().unwrap_err().contains("invalid line"),
            "{got:?}"
        );
    }
}
