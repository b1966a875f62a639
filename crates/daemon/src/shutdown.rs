//! How each part of a running daemon learns that it must stop: one tree of
//! cancellation tokens. The daemon holds the root; every part that runs on
//! its own (the HTTP and socket listeners, the repository polls, streaming
//! calls, Kafka ingestion, the popularity, snapshot and GPU telemetry
//! threads) holds a child, and `Daemon::shutdown` cancels them in its
//! order: draining, then accepting, the cut of the streaming calls,
//! ingestion, the popularity counts and the snapshots, and last the root,
//! which also stops the GPU telemetry and whatever a daemon dropped without
//! a shutdown left running.
//!
//! Async parts wait on `cancelled()`; a thread checks `is_cancelled()` where
//! it would poll, or sleeps on `Wake::sleep`, which a cancellation ends at
//! once.

use std::convert::Infallible;
use std::sync::mpsc;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

/// The stop signals of a running daemon, one per part or group of parts.
pub struct Stops {
    /// Cancels everything below.
    root: CancellationToken,
    /// `/readyz` answers 503 `draining`; everything still serves.
    pub draining: CancellationToken,
    /// Accepting ends: the parent of `http`, `socket` and `repository`.
    pub serving: CancellationToken,
    /// The HTTP listener stops accepting; each connection finishes its
    /// request in flight and closes.
    pub http: CancellationToken,
    /// The socket stops accepting; each connection stops reading frames,
    /// answers those it read and closes.
    pub socket: CancellationToken,
    /// The repository polls (model versions and pipelines) stop.
    pub repository: CancellationToken,
    /// The streaming (bulk) calls still running end with a final error.
    pub cut: CancellationToken,
    /// Kafka ingestion applies what it holds, commits and stops.
    pub ingest: CancellationToken,
}

impl Stops {
    pub fn new() -> Self {
        let root = CancellationToken::new();
        let serving = root.child_token();
        Self {
            draining: root.child_token(),
            http: serving.child_token(),
            socket: serving.child_token(),
            repository: serving.child_token(),
            serving,
            cut: root.child_token(),
            ingest: root.child_token(),
            root,
        }
    }

    /// A new part's own token, cancelled with the root (or by the part).
    pub fn part(&self) -> CancellationToken {
        self.root.child_token()
    }

    /// Stops every part still running.
    pub fn all(&self) {
        self.root.cancel();
    }
}

impl Default for Stops {
    fn default() -> Self {
        Self::new()
    }
}

/// A daemon dropped without its shutdown stops every part all the same.
impl Drop for Stops {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

/// What a thread sleeps on between rounds: `sleep` returns at the end of
/// its time, or at once when the token is cancelled (or the runtime that
/// watches the token is gone).
pub struct Wake {
    token: CancellationToken,
    closed: mpsc::Receiver<Infallible>,
}

impl Wake {
    /// Watches `token` from a task of the current runtime: the thread is
    /// woken by its channel closing, with no polling.
    pub fn new(token: CancellationToken) -> Self {
        let (tx, closed) = mpsc::channel::<Infallible>();
        let watched = token.clone();
        tokio::spawn(async move {
            watched.cancelled().await;
            drop(tx);
        });
        Self { token, closed }
    }

    /// Sleeps `time` unless stopped first; `true` once stopped.
    pub fn sleep(&self, time: Duration) -> bool {
        match self.closed.recv_timeout(time) {
            Ok(never) => match never {},
            Err(mpsc::RecvTimeoutError::Timeout) => self.token.is_cancelled(),
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_root_stops_every_part_and_a_part_stops_alone() {
        let stops = Stops::new();
        let part = stops.part();
        stops.http.cancel();
        assert!(!stops.socket.is_cancelled() && !stops.serving.is_cancelled());
        stops.serving.cancel();
        assert!(stops.socket.is_cancelled() && stops.repository.is_cancelled());
        assert!(!stops.draining.is_cancelled() && !part.is_cancelled());
        part.cancel();
        assert!(!stops.ingest.is_cancelled());
        stops.all();
        for t in [&stops.draining, &stops.cut, &stops.ingest] {
            assert!(t.is_cancelled());
        }
        // Dropped, the tree stops its parts.
        let stops = Stops::new();
        let (http, part) = (stops.http.clone(), stops.part());
        drop(stops);
        assert!(http.is_cancelled() && part.is_cancelled());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_sleeping_thread_wakes_when_cancelled() {
        let token = CancellationToken::new();
        let wake = Wake::new(token.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let stopped = wake.sleep(Duration::from_secs(60));
            (stopped, start.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        token.cancel();
        let (stopped, slept) = tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        assert!(stopped);
        assert!(slept < Duration::from_secs(5), "{slept:?}");
        // Not cancelled: the whole time, then `false`.
        let wake = Wake::new(CancellationToken::new());
        let stopped = tokio::task::spawn_blocking(move || wake.sleep(Duration::from_millis(30)))
            .await
            .unwrap();
        assert!(!stopped);
    }
}
