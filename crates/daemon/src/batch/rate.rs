//! How fast a model answers: its throughput (behind `Retry-After`) and its
//! service rate, how fast a backlog drains (behind shedding at admission:
//! a request whose deadline the queue ahead of it cannot meet is refused on
//! arrival). Measured from the batches the executor runs, with explicit
//! instants, so the estimate is unit-tested without clocks.
//!
//! The service rate counts the time from one batch's start to the next
//! batch's start while requests wait, so whatever slows the executor (other
//! models, updates, a busy CPU) slows it too. Time with none of the model's
//! requests waiting is not service time: the executor calls `idle` for a
//! model whose queue it finds empty, which forgets the interval in
//! progress, so a pause after a backlog cannot collapse the estimate. And an estimate
//! cannot stay below what the model was just seen to answer: each window
//! raises it to at least the window's throughput, so a wrong estimate that
//! sheds requests (which then never run to correct it) recovers within a
//! window of load.
//!
//! `Meters` keeps every model's `Rates` on the executor thread; each window's
//! figures go to the model's `Gauges`, which admission reads on any thread:
//! the expected wait of an arriving request and the `Retry-After` of a
//! refused one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the rates are published.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// One window's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Published {
    /// Requests answered per second.
    pub throughput: f64,
    /// How fast a backlog drained, in requests per second: `None` keeps
    /// the previous estimate (no backlog, and nothing faster was seen).
    pub service_rate: Option<f64>,
}

/// A model's rates, fed by the executor.
#[derive(Debug, Clone)]
pub struct Rates {
    since: Instant,
    answered: u64,
    backlogged: u64,
    busy: Duration,
    /// The previous batch's start and size, when requests still waited
    /// after it was taken.
    previous: Option<(Instant, u64)>,
    /// The service rate last published.
    service_rate: Option<f64>,
}

impl Rates {
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            answered: 0,
            backlogged: 0,
            busy: Duration::ZERO,
            previous: None,
            service_rate: None,
        }
    }

    /// A batch of `n` requests started at `started`; `backlog`: requests of
    /// the model were waiting when it was answered.
    pub fn batch(&mut self, started: Instant, n: u64, backlog: bool) {
        self.answered += n;
        if let Some((at, size)) = self.previous.take() {
            self.busy += started.saturating_duration_since(at);
            self.backlogged += size;
        }
        if backlog {
            self.previous = Some((started, n));
        }
    }

    /// None of the model's requests wait: the interval since its last
    /// batch started was not all spent on a backlog, so it is not counted.
    pub fn idle(&mut self) {
        self.previous = None;
    }

    /// Once `RATE_WINDOW` has passed since the last publication, the
    /// window's throughput and service rate; the window starts again.
    pub fn publish(&mut self, now: Instant) -> Option<Published> {
        let window = now.saturating_duration_since(self.since);
        if window < RATE_WINDOW {
            return None;
        }
        let throughput = self.answered as f64 / window.as_secs_f64();
        let measured = (self.backlogged > 0 && !self.busy.is_zero())
            .then(|| self.backlogged as f64 / self.busy.as_secs_f64());
        let service_rate = match (measured, self.service_rate) {
            (Some(m), _) => Some(m.max(throughput)),
            (None, Some(old)) if throughput > old => Some(throughput),
            (None, _) => None,
        };
        if service_rate.is_some() {
            self.service_rate = service_rate;
        }
        self.answered = 0;
        self.backlogged = 0;
        self.busy = Duration::ZERO;
        self.since = now;
        Some(Published {
            throughput,
            service_rate,
        })
    }
}

/// How long `ahead` waiting requests take at `service_rate` requests per
/// second (`None` without an estimate, or with nobody ahead).
pub fn expected_wait(service_rate: f64, ahead: usize) -> Option<Duration> {
    (service_rate > 0.0 && ahead > 0).then(|| Duration::from_secs_f64(ahead as f64 / service_rate))
}

/// The longest `Retry-After` given, however deep the queue.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a refused caller should wait: the time `throughput` requests per
/// second need to answer `waiting` requests, at least a second (the header
/// counts whole seconds), at most [`MAX_RETRY_AFTER`]; a second while no
/// throughput is measured.
pub fn retry_after(throughput: f64, waiting: usize) -> Duration {
    let secs = if throughput > 0.0 {
        (waiting as f64 / throughput).ceil()
    } else {
        1.0
    };
    Duration::from_secs_f64(secs.max(1.0)).min(MAX_RETRY_AFTER)
}

/// A model's rates as last published, read by admission on any thread.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Requests answered per second lately (f64 bits), for `Retry-After`.
    throughput: AtomicU64,
    /// Requests answered per second lately while a backlog waited (f64
    /// bits): how fast the queue drains.
    service_rate: AtomicU64,
}

impl Gauges {
    /// Publishes a window's figures; a window without a service rate keeps
    /// the previous one.
    pub fn publish(&self, p: &Published) {
        self.set_throughput(p.throughput);
        if let Some(rate) = p.service_rate {
            self.set_service_rate(rate);
        }
    }

    /// Publishes the requests answered per second lately.
    pub fn set_throughput(&self, per_second: f64) {
        self.throughput
            .store(per_second.to_bits(), Ordering::Relaxed);
    }

    /// Publishes how fast a backlog drained lately, in requests per second.
    pub fn set_service_rate(&self, per_second: f64) {
        self.service_rate
            .store(per_second.to_bits(), Ordering::Relaxed);
    }

    /// How long `ahead` waiting requests take to be answered at the recent
    /// service rate (`None` before a backlog was measured).
    pub fn expected_wait(&self, ahead: usize) -> Option<Duration> {
        expected_wait(
            f64::from_bits(self.service_rate.load(Ordering::Relaxed)),
            ahead,
        )
    }

    /// How long a caller refused with `waiting` requests in the queue should
    /// wait ([`retry_after`] at the recent throughput).
    pub fn retry_after(&self, waiting: usize) -> Duration {
        retry_after(
            f64::from_bits(self.throughput.load(Ordering::Relaxed)),
            waiting,
        )
    }
}

/// Every model's `Rates`, by model (`M`: the executor's model index), fed by
/// the executor as it answers batches; each window's figures go to the
/// model's `Gauges`.
#[derive(Debug)]
pub struct Meters<M>(HashMap<M, Rates>);

impl<M> Default for Meters<M> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<M: Copy + Eq + std::hash::Hash> Meters<M> {
    /// `model` answered a batch of `n` requests that started at `started`;
    /// `queued` of its requests wait now. Once per window (checked at `now`)
    /// the window's figures are published to `gauges`.
    pub fn answered(
        &mut self,
        model: M,
        started: Instant,
        n: u64,
        queued: usize,
        now: Instant,
        gauges: &Gauges,
    ) {
        let r = self.0.entry(model).or_insert_with(|| Rates::new(started));
        r.batch(started, n, queued > 0);
        if let Some(p) = r.publish(now) {
            gauges.publish(&p);
        }
    }

    /// A model with none of its requests waiting (`queued(model)` is 0) is
    /// not draining a backlog: the time until its next batch is not its
    /// service time ([`Rates::idle`]).
    pub fn idle(&mut self, queued: impl Fn(M) -> usize) {
        for (&model, rates) in self.0.iter_mut() {
            if queued(model) == 0 {
                rates.idle();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Batches of `n` every `every`, each leaving a backlog, for `count`
    /// batches from `t`; returns the instant after the last.
    fn load(r: &mut Rates, mut t: Instant, n: u64, every: Duration, count: usize) -> Instant {
        for _ in 0..count {
            r.batch(t, n, true);
            t += every;
        }
        t
    }

    #[test]
    fn a_backlog_drains_at_the_measured_rate() {
        let t0 = Instant::now();
        let mut r = Rates::new(t0);
        // 10 requests every 10 ms: 1,000 per second.
        let t = load(&mut r, t0, 10, 10 * MS, 120);
        let p = r.publish(t).unwrap();
        let rate = p.service_rate.unwrap();
        assert!((rate - 1000.0).abs() < 1.0, "{p:?}");
        assert!((p.throughput - 1000.0).abs() < 1.0, "{p:?}");
        assert_eq!(expected_wait(rate, 500), Some(Duration::from_millis(500)));
        assert_eq!(expected_wait(rate, 0), None);
        assert_eq!(expected_wait(0.0, 10), None);
        assert_eq!(r.publish(t + 10 * MS), None, "once per window");
    }

    /// A backlog, then ten seconds idle (its last waiting requests expired
    /// without running), then load at half capacity: the estimate stays near
    /// capacity, so no request is shed for a predicted wait.
    #[test]
    fn an_idle_gap_after_a_backlog_is_not_service_time() {
        let deadline = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut r = Rates::new(t0);
        let t = load(&mut r, t0, 10, 10 * MS, 120);
        r.publish(t).unwrap();
        // The last batch left requests waiting (previous set); they expired.
        r.batch(t, 16, true);
        r.idle();
        let resumed = t + Duration::from_secs(10);
        // Half capacity: 5 requests every 10 ms, a backlog behind each.
        let end = load(&mut r, resumed, 5, 10 * MS, 110);
        let rate = r.publish(end).unwrap().service_rate.unwrap();
        assert!(rate >= 400.0, "the estimate collapsed: {rate}/s");
        // A queue of a full max_queue_size (1,024) is still within the deadline.
        assert!(expected_wait(rate, 1024).unwrap() < 3 * deadline);
        assert!(expected_wait(rate, 256).unwrap() < deadline);

        // The same sequence without the idle mark counts the gap, which is
        // what shed half the requests before.
        let mut bad = Rates::new(t0);
        let t = load(&mut bad, t0, 10, 10 * MS, 120);
        bad.publish(t).unwrap();
        bad.batch(t, 16, true);
        let end = load(&mut bad, t + Duration::from_secs(10), 5, 10 * MS, 110);
        let collapsed = bad.publish(end).unwrap().service_rate.unwrap();
        assert!(collapsed < rate / 2.0, "{collapsed} vs {rate}");
    }

    /// A wrong, too low estimate sheds requests, which then never run to
    /// correct it; the throughput of those still answered raises it within a
    /// window.
    #[test]
    fn a_low_estimate_recovers_within_a_window_of_load() {
        let t0 = Instant::now();
        let mut r = Rates::new(t0);
        // One slow backlogged interval: 1 request in 10 s.
        r.batch(t0, 1, true);
        r.batch(t0 + Duration::from_secs(10), 1, false);
        let low = r
            .publish(t0 + Duration::from_secs(10))
            .unwrap()
            .service_rate
            .unwrap();
        assert!(low < 1.0, "{low}");
        // Then requests are answered one at a time, never behind a backlog:
        // 400 in the next second.
        let mut t = t0 + Duration::from_secs(10);
        for _ in 0..400 {
            t += Duration::from_micros(2500);
            r.batch(t, 1, false);
        }
        let p = r.publish(t).unwrap();
        assert!(p.service_rate.unwrap() >= 399.0, "{p:?}");
        // A quieter window does not lower it again without a measurement.
        t += Duration::from_secs(1);
        r.batch(t, 10, false);
        let p = r.publish(t + MS).unwrap();
        assert_eq!(p.service_rate, None, "{p:?}");
    }

    #[test]
    fn retry_after_is_the_time_the_throughput_needs_for_the_queue_within_1_to_60_s() {
        let s = Duration::from_secs;
        assert_eq!(retry_after(0.0, 500), s(1), "no throughput yet");
        assert_eq!(retry_after(100.0, 50), s(1), "at least a second");
        assert_eq!(retry_after(100.0, 1024), s(11), "whole seconds, rounded up");
        assert_eq!(retry_after(1.0, 1_000_000), MAX_RETRY_AFTER);
        assert_eq!(MAX_RETRY_AFTER, s(60));
    }

    #[test]
    fn gauges_keep_the_last_service_rate_through_windows_without_a_backlog() {
        let g = Gauges::default();
        assert_eq!(g.retry_after(500), Duration::from_secs(1));
        assert_eq!(g.expected_wait(10), None, "nothing measured");
        g.publish(&Published {
            throughput: 100.0,
            service_rate: None,
        });
        assert_eq!(g.retry_after(1024), Duration::from_secs(11));
        assert_eq!(g.expected_wait(10), None, "no backlog measured");
        g.publish(&Published {
            throughput: 100.0,
            service_rate: Some(1000.0),
        });
        assert_eq!(g.expected_wait(250), Some(250 * MS));
        assert_eq!(g.expected_wait(0), None, "nobody ahead");
        g.publish(&Published {
            throughput: 10.0,
            service_rate: None,
        });
        assert_eq!(g.expected_wait(250), Some(250 * MS), "kept");
        assert_eq!(g.retry_after(1024), Duration::from_secs(60));
    }

    /// Two models: one drains a backlog for a second and publishes its rates
    /// then, not before; the other, found with nothing waiting between its
    /// two batches, is not charged the gap between them.
    #[test]
    fn meters_publish_each_model_once_a_window_and_forget_idle_gaps() {
        let t0 = Instant::now();
        let mut m = Meters::default();
        let (a, b) = (Gauges::default(), Gauges::default());
        let mut t = t0;
        for _ in 0..100 {
            m.answered(0, t, 10, 5, t, &a);
            t += 10 * MS;
        }
        assert_eq!(a.expected_wait(1000), None, "not a window yet");
        m.answered(0, t, 10, 5, t, &a);
        let wait = a.expected_wait(1000).unwrap();
        assert!(
            (980 * MS..=1000 * MS).contains(&wait),
            "about 1,000 requests a second: {wait:?}"
        );
        // Model 1 answers a batch with requests still waiting, then is found
        // with none (model 0 still has some), then answers again 10 s later.
        m.answered(1, t, 4, 3, t, &b);
        m.idle(|model| if model == 1 { 0 } else { 5 });
        let later = t + Duration::from_secs(10);
        m.answered(1, later, 4, 0, later, &b);
        assert_eq!(
            b.expected_wait(100),
            None,
            "the idle gap is no service time"
        );
        assert_eq!(b.retry_after(8), Duration::from_secs(10), "0.8 requests/s");
        // Model 0 was not idle: its interval still counts.
        m.answered(0, later, 10, 5, later, &a);
        assert!(a.expected_wait(1000).unwrap() > wait, "a 10 s interval");
    }
}
