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
}
