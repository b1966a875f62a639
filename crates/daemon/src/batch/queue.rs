//! One model's waiting requests. A batch is ready when `max_batch_rows` rows
//! wait or the oldest request has waited `max_delay`; it is taken only when the
//! executor is free, so requests keep joining while the device is busy.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub trait Queued {
    /// Rows this request adds to a batch (a ranker request: one per candidate).
    fn rows(&self) -> usize;
    fn enqueued(&self) -> Instant;
}

#[derive(Debug)]
pub struct BatchQueue<T> {
    items: VecDeque<T>,
    rows: usize,
    max_batch_rows: usize,
    max_delay: Duration,
}

impl<T: Queued> BatchQueue<T> {
    pub fn new(max_batch_rows: usize, max_delay: Duration) -> Self {
        assert!(
            max_batch_rows > 0,
            "max_batch_size is checked at load: this is a bug"
        );
        Self {
            items: VecDeque::new(),
            rows: 0,
            max_batch_rows,
            max_delay,
        }
    }

    pub fn push(&mut self, item: T) {
        self.rows += item.rows();
        self.items.push_back(item);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn oldest(&self) -> Option<Instant> {
        self.items.front().map(Queued::enqueued)
    }

    /// When the oldest request's wait runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest().map(|t| t + self.max_delay)
    }

    pub fn is_ready(&self, now: Instant) -> bool {
        match self.deadline() {
            None => false,
            Some(d) => self.rows >= self.max_batch_rows || d <= now,
        }
    }

    /// Takes requests from the front while they fit in `max_batch_rows`
    /// (always at least one, so an oversized request still runs alone).
    pub fn take_batch(&mut self) -> Vec<T> {
        let mut batch = Vec::new();
        let mut rows = 0;
        while let Some(front) = self.items.front() {
            let r = front.rows();
            if !batch.is_empty() && rows + r > self.max_batch_rows {
                break;
            }
            rows += r;
            batch.push(self.items.pop_front().expect("front exists"));
        }
        self.rows -= rows;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct R(usize, Instant);
    impl Queued for R {
        fn rows(&self) -> usize {
            self.0
        }
        fn enqueued(&self) -> Instant {
            self.1
        }
    }

    #[test]
    fn ready_when_full_or_when_the_oldest_has_waited() {
        let t0 = Instant::now();
        let delay = Duration::from_micros(500);
        let mut q = BatchQueue::new(4, delay);
        assert!(!q.is_ready(t0));
        assert_eq!(q.deadline(), None);
        q.push(R(1, t0));
        q.push(R(1, t0 + Duration::from_micros(100)));
        assert!(!q.is_ready(t0 + Duration::from_micros(499)));
        assert!(q.is_ready(t0 + delay));
        assert_eq!(q.deadline(), Some(t0 + delay));
        q.push(R(2, t0 + Duration::from_micros(200)));
        assert!(q.is_ready(t0), "4 rows waiting fill a batch at once");
    }

    #[test]
    fn batches_respect_the_row_limit_and_arrival_order() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(4, Duration::ZERO);
        for (i, rows) in [1, 2, 2, 9, 1].into_iter().enumerate() {
            q.push(R(rows, t0 + Duration::from_micros(i as u64)));
        }
        let sizes = |b: Vec<R>| b.iter().map(|r| r.0).collect::<Vec<_>>();
        assert_eq!(sizes(q.take_batch()), vec![1, 2]);
        assert_eq!(sizes(q.take_batch()), vec![2]);
        assert_eq!(
            sizes(q.take_batch()),
            vec![9],
            "an oversized request runs alone"
        );
        assert_eq!(q.rows(), 1);
        assert_eq!(sizes(q.take_batch()), vec![1]);
        assert!(q.is_empty());
        assert_eq!(q.rows(), 0);
    }
}
