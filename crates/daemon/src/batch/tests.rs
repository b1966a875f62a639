//! The batching policy, driven with explicit instants.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::*;
use crate::backend::ModelId;

#[derive(Debug)]
struct R {
    id: u32,
    key: QueueKey,
    rows: usize,
    class: Class,
    enqueued: Instant,
    deadline: Instant,
    cancelled: Rc<Cell<bool>>,
}

impl Request for R {
    fn key(&self) -> QueueKey {
        self.key
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn class(&self) -> Class {
        self.class
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn is_cancelled(&self) -> bool {
        self.cancelled.get()
    }
}

const A: QueueKey = QueueKey {
    model: ModelId::new(0),
};
const B: QueueKey = QueueKey {
    model: ModelId::new(1),
};

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

struct Fixture {
    t0: Instant,
    s: Scheduler<R>,
    admission: Admission,
    next_id: u32,
}

impl Fixture {
    fn new(policies: &[(QueueKey, usize, u64)]) -> Self {
        let mut s = Scheduler::new();
        for &(key, max_rows, delay_us) in policies {
            s.add_queue(
                key,
                BatchPolicy {
                    max_rows,
                    max_delay: us(delay_us),
                    bulk_min_share: 0.05,
                },
            );
        }
        Self {
            t0: Instant::now(),
            s,
            admission: Admission::new(1000),
            next_id: 0,
        }
    }

    fn at(&self, micros: u64) -> Instant {
        self.t0 + us(micros)
    }

    /// Queues a request of `rows` at `at_us` with a deadline `ttl_us` later;
    /// returns its id and the switch that cancels it.
    fn push(
        &mut self,
        key: QueueKey,
        rows: usize,
        at_us: u64,
        ttl_us: u64,
    ) -> (u32, Rc<Cell<bool>>) {
        self.push_class(key, Class::Interactive, rows, at_us, ttl_us)
    }

    fn push_class(
        &mut self,
        key: QueueKey,
        class: Class,
        rows: usize,
        at_us: u64,
        ttl_us: u64,
    ) -> (u32, Rc<Cell<bool>>) {
        let id = self.next_id;
        self.next_id += 1;
        let cancelled = Rc::new(Cell::new(false));
        let r = R {
            id,
            key,
            rows,
            class,
            enqueued: self.at(at_us),
            deadline: self.at(at_us + ttl_us),
            cancelled: cancelled.clone(),
        };
        let permit = self.admission.try_admit().unwrap();
        self.s.push(r, permit).unwrap();
        (id, cancelled)
    }

    fn run(&mut self, now_us: u64) -> Run<R> {
        match self.s.poll(self.at(now_us)) {
            Poll::Run(run) => run,
            other => panic!("expected a batch at {now_us} us, got {other:?}"),
        }
    }
}

fn ids(batch: &[R]) -> Vec<u32> {
    batch.iter().map(|r| r.id).collect()
}

const LONG: u64 = 1_000_000_000;

#[test]
fn a_batch_closes_when_full_or_when_its_oldest_request_has_waited() {
    let mut f = Fixture::new(&[(A, 4, 500)]);
    assert!(matches!(f.s.poll(f.at(0)), Poll::Idle));
    f.push(A, 1, 0, LONG);
    f.push(A, 1, 100, LONG);
    match f.s.poll(f.at(499)) {
        Poll::Sleep(at) => assert_eq!(at, f.at(500), "sleeps until the oldest has waited"),
        other => panic!("{other:?}"),
    }
    let run = f.run(500);
    assert_eq!((run.key, ids(&run.batch)), (A, vec![0, 1]));
    assert!(run.dropped.is_empty());
    assert!(matches!(f.s.poll(f.at(500)), Poll::Idle));

    // Four rows fill a batch at once, whatever the delay.
    f.push(A, 1, 600, LONG);
    f.push(A, 3, 601, LONG);
    assert_eq!(ids(&f.run(601).batch), vec![2, 3]);
}

#[test]
fn batches_respect_the_row_limit_and_arrival_order() {
    let mut f = Fixture::new(&[(A, 4, 0)]);
    for (i, rows) in [1, 2, 2, 9, 1].into_iter().enumerate() {
        f.push(A, rows, i as u64, LONG);
    }
    assert_eq!(ids(&f.run(10).batch), vec![0, 1]);
    assert_eq!(ids(&f.run(10).batch), vec![2]);
    assert_eq!(
        ids(&f.run(10).batch),
        vec![3],
        "an oversized request runs alone"
    );
    assert_eq!(ids(&f.run(10).batch), vec![4]);
    assert!(matches!(f.s.poll(f.at(10)), Poll::Idle));
    assert_eq!(f.admission.depth(), 0);
}

#[test]
fn the_ready_queue_whose_oldest_request_waited_longest_goes_first() {
    let mut f = Fixture::new(&[(A, 2, 1000), (B, 2, 1000)]);
    f.push(B, 1, 0, LONG);
    f.push(A, 1, 10, LONG);
    f.push(A, 1, 20, LONG);
    // A is full (ready at once), B is not yet ready: A runs.
    assert_eq!(f.run(30).key, A);
    // Once B's delay has run out, B runs even while A keeps filling up.
    f.push(A, 1, 1000, LONG);
    f.push(A, 1, 1001, LONG);
    assert_eq!(f.run(1002).key, B);
    assert_eq!(f.run(1002).key, A);
}

#[test]
fn a_model_under_sustained_load_does_not_starve_another() {
    let mut f = Fixture::new(&[(A, 4, 500), (B, 4, 500)]);
    let mut served_b = 0;
    let mut b_since: Option<u64> = None;
    let mut t = 0;
    let mut last_was_b = false;
    for step in 0..200 {
        // A fills a batch every step (the executor's whole capacity, less the
        // turns B takes); B gets one lone request every 10 steps.
        if !last_was_b {
            for _ in 0..4 {
                f.push(A, 1, t, LONG);
            }
        }
        if step % 10 == 0 && b_since.is_none() {
            f.push(B, 1, t, LONG);
            b_since = Some(t);
        }
        t += 100;
        let run = f.run(t);
        last_was_b = run.key == B;
        if run.key == B {
            let waited = t - b_since.take().expect("B had a request waiting");
            assert!(
                waited <= 500 + 100,
                "B waited {waited} us: more than its delay and one step"
            );
            served_b += 1;
        }
    }
    assert_eq!(served_b, 20, "every B request was served");
}

#[test]
fn expired_and_cancelled_requests_are_dropped_with_their_reason_and_take_no_room() {
    let mut f = Fixture::new(&[(A, 2, 500)]);
    let (expired, _) = f.push(A, 1, 0, 100);
    let (gone, cancel) = f.push(A, 1, 10, LONG);
    let (both, cancel_both) = f.push(A, 1, 20, 100);
    f.push(A, 1, 30, LONG);
    f.push(A, 1, 40, LONG);
    f.push(A, 1, 50, LONG);
    cancel.set(true);
    cancel_both.set(true);
    let run = f.run(500);
    let reasons: Vec<(u32, DropReason)> = run
        .dropped
        .iter()
        .map(|d| (d.request.id, d.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (expired, DropReason::Deadline),
            (gone, DropReason::Cancelled),
            (both, DropReason::Deadline),
        ],
        "a passed deadline counts as a deadline drop even when the caller left"
    );
    assert_eq!(ids(&run.batch), vec![3, 4], "dropped requests take no room");
    assert_eq!(f.s.waiting(A), 1);
    assert_eq!(
        f.admission.depth(),
        1,
        "taken and dropped requests gave their slots back"
    );
}

#[test]
fn a_batch_of_only_dropped_requests_is_empty_and_reports_them() {
    let mut f = Fixture::new(&[(A, 8, 0)]);
    f.push(A, 1, 0, 5);
    f.push(A, 1, 1, 5);
    let run = f.run(100);
    assert!(run.batch.is_empty());
    assert_eq!(run.dropped.len(), 2);
    assert_eq!(f.admission.depth(), 0);
}

#[test]
fn depth_is_exact_whatever_happens_to_the_requests() {
    let mut f = Fixture::new(&[(A, 3, 0)]);
    let mut cancels = Vec::new();
    for i in 0..30 {
        let (_, c) = f.push(
            A,
            1 + (i % 3) as usize,
            i,
            if i % 4 == 0 { 2 } else { LONG },
        );
        cancels.push(c);
    }
    assert_eq!(f.admission.depth(), 30);
    for c in cancels.iter().step_by(3) {
        c.set(true);
    }
    let mut seen = 0;
    while let Poll::Run(run) = f.s.poll(f.at(100)) {
        seen += run.batch.len() + run.dropped.len();
        drop(run);
        assert_eq!(f.admission.depth(), 30 - seen);
    }
    assert_eq!(seen, 30);
    // A request for a queue that does not exist is handed back; its permit
    // is released with it.
    let permit = f.admission.try_admit().unwrap();
    let stray = R {
        class: Class::Interactive,
        id: 99,
        key: QueueKey {
            model: ModelId::new(7),
        },
        rows: 1,
        enqueued: f.at(0),
        deadline: f.at(LONG),
        cancelled: Rc::new(Cell::new(false)),
    };
    assert_eq!(f.s.push(stray, permit).unwrap_err().id, 99);
    assert_eq!(f.admission.depth(), 0);
}

#[test]
fn dropping_the_scheduler_frees_every_slot() {
    let mut f = Fixture::new(&[(A, 4, LONG), (B, 4, LONG)]);
    for i in 0..5 {
        f.push(if i % 2 == 0 { A } else { B }, 1, i, LONG);
    }
    let admission = f.admission.clone();
    assert_eq!(admission.depth(), 5);
    drop(f);
    assert_eq!(admission.depth(), 0);
}

#[test]
fn drain_takes_every_queue_oldest_first_ready_or_not() {
    let mut f = Fixture::new(&[(A, 2, LONG), (B, 2, LONG)]);
    f.push(B, 1, 0, LONG);
    f.push(A, 1, 1, LONG);
    f.push(A, 1, 2, LONG);
    f.push(A, 1, 3, LONG);
    assert!(matches!(f.s.poll(f.at(4)), Poll::Run(_)), "A is full");
    let mut order = Vec::new();
    while let Some(run) = f.s.drain(f.at(5)) {
        order.push((run.key.model.get(), ids(&run.batch)));
    }
    assert_eq!(order, vec![(1, vec![0]), (0, vec![3])]);
    assert!(matches!(f.s.poll(f.at(5)), Poll::Idle));
}

#[test]
fn a_removed_queue_takes_no_requests_and_the_others_keep_their_order() {
    const C: QueueKey = QueueKey {
        model: ModelId::new(2),
    };
    let mut f = Fixture::new(&[(A, 4, 1_000), (B, 4, 1_000), (C, 4, 1_000)]);
    f.push(A, 1, 0, LONG);
    assert!(!f.s.remove_queue(A), "not empty: kept");
    assert!(f.s.remove_queue(B));
    assert!(f.s.remove_queue(B), "removing twice is harmless");
    let stray = R {
        class: Class::Interactive,
        id: 99,
        key: B,
        rows: 1,
        enqueued: f.at(0),
        deadline: f.at(LONG),
        cancelled: Rc::new(Cell::new(false)),
    };
    assert!(f.s.push(stray, f.admission.try_admit().unwrap()).is_err());
    let (c, _) = f.push(C, 1, 10, LONG);
    assert_eq!(f.s.waiting(C), 1);
    assert_eq!(f.s.waiting(A), 1);
    assert_eq!(ids(&f.run(1_000).batch), vec![0]);
    assert_eq!(ids(&f.run(1_010).batch), vec![c]);
    assert!(f.s.remove_queue(A));
}

fn classes(f: &Fixture, batch: &[R]) -> (usize, usize) {
    let _ = f;
    let bulk = batch.iter().filter(|r| r.class == Class::Bulk).count();
    (batch.len() - bulk, bulk)
}

#[test]
fn interactive_rows_go_first_and_bulk_fills_the_room_left() {
    let mut f = Fixture::new(&[(A, 4, 500)]);
    for i in 0..6 {
        f.push_class(A, Class::Bulk, 1, i, LONG);
    }
    f.push(A, 1, 10, LONG);
    f.push(A, 1, 20, LONG);
    // The bulk lane alone fills a batch, but the interactive requests that
    // arrived later still go first, alone while interactive traffic is about
    // (bulk rows would make their batch longer).
    let run = f.run(30);
    assert_eq!(ids(&run.batch), vec![6, 7], "interactive first, alone");
    // Only bulk is left: its lane is full, so it runs at once, in small
    // batches (an eighth of a batch, at least one row) while interactive
    // requests arrived within 100 ms ...
    let run = f.run(30);
    assert_eq!(ids(&run.batch), vec![0], "bulk in arrival order");
    // ... and in whole ones after.
    let run = f.run(100_030);
    assert_eq!(ids(&run.batch), vec![1, 2, 3, 4]);
    // Without interactive traffic lately, bulk fills the room interactive
    // rows leave.
    f.push(A, 1, 300_000, LONG);
    for i in 0..4 {
        f.push_class(A, Class::Bulk, 1, 300_000 + i, LONG);
    }
    let run = f.run(500_000);
    assert_eq!(classes(&f, &run.batch), (1, 3), "{:?}", ids(&run.batch));
}

#[test]
fn bulk_work_waits_while_interactive_work_waits_in_any_queue() {
    let mut f = Fixture::new(&[(A, 4, 500), (B, 4, 500)]);
    for i in 0..4 {
        f.push_class(B, Class::Bulk, 1, i, LONG);
    }
    f.push(A, 1, 10, LONG);
    // B's bulk batch is full, but A holds an interactive request that is
    // not ready yet: the scheduler waits for A's batch to close.
    match f.s.poll(f.at(20)) {
        Poll::Sleep(at) => assert_eq!(at, f.at(510)),
        other => panic!("expected a sleep until A closes, got {other:?}"),
    }
    assert_eq!(f.run(510).key, A);
    let run = f.run(100_010);
    assert_eq!((run.key, classes(&f, &run.batch)), (B, (0, 4)));
}

#[test]
fn bulk_keeps_its_minimum_share_under_sustained_interactive_load() {
    // bulk_min_share is 0.05: of 20 full batches of 20 rows (400 rows), at
    // least 20 rows must be bulk even though interactive rows alone fill
    // every batch.
    let mut f = Fixture::new(&[(A, 20, 500)]);
    for i in 0..500 {
        f.push_class(A, Class::Bulk, 1, i, LONG);
    }
    let (mut interactive, mut bulk) = (0, 0);
    for step in 0..20u64 {
        let t = 1000 + step * 100;
        for j in 0..20 {
            f.push(A, 1, t + j, LONG);
        }
        let run = f.run(t + 20);
        assert_eq!(run.batch.len(), 20);
        let (i, b) = classes(&f, &run.batch);
        interactive += i;
        bulk += b;
    }
    let share = bulk as f64 / (bulk + interactive) as f64;
    assert!(
        (0.04..=0.10).contains(&share),
        "bulk got {bulk} of {} rows ({share:.3}), want about 0.05",
        bulk + interactive
    );
    assert!(bulk >= 19, "bulk got {bulk} rows, fewer than its share");
}

#[test]
fn bulk_work_of_another_model_keeps_its_share_under_sustained_interactive_load() {
    // A runs full interactive batches of 20 rows, one after another; B holds
    // only bulk work. B still gets about 5 % of the rows executed.
    let mut f = Fixture::new(&[(A, 20, 500), (B, 20, 500)]);
    for i in 0..500 {
        f.push_class(B, Class::Bulk, 1, i, LONG);
    }
    let (mut a_rows, mut b_rows) = (0, 0);
    let mut t = 1000;
    for _ in 0..40 {
        for j in 0..20 {
            f.push(A, 1, t + j, LONG);
        }
        t += 20;
        // Run until A's batch has gone.
        loop {
            let run = f.run(t);
            let rows = run.batch.len();
            if run.key == A {
                a_rows += rows;
                break;
            }
            b_rows += rows;
        }
        t += 100;
    }
    let share = b_rows as f64 / (a_rows + b_rows) as f64;
    assert!(
        (0.04..=0.10).contains(&share),
        "B got {b_rows} of {} rows ({share:.3}), want about 0.05",
        a_rows + b_rows
    );
}

#[test]
fn a_request_that_cannot_finish_before_its_deadline_is_dropped_before_it_runs() {
    let mut f = Fixture::new(&[(A, 4, 0)]);
    // Nothing measured yet: nothing is dropped on a guess.
    f.push(A, 1, 0, 300);
    assert_eq!(f.run(10).batch.len(), 1);
    // Batches of up to two rows take 1 ms.
    f.s.record(A, 2, Duration::from_millis(1));
    assert_eq!(f.s.expected(A, 2), Duration::from_millis(1));
    let (tight, _) = f.push(A, 1, 100, 500);
    let (roomy, _) = f.push(A, 1, 100, 5_000);
    let run = f.run(110);
    assert_eq!(ids(&run.batch), vec![roomy]);
    let reasons: Vec<(u32, DropReason)> = run
        .dropped
        .iter()
        .map(|d| (d.request.id, d.reason))
        .collect();
    assert_eq!(reasons, vec![(tight, DropReason::Predicted)]);
}

#[test]
fn an_oversized_request_is_judged_by_the_estimate_for_its_own_size() {
    // Batches hold 4 rows, but one request of 1,000 rows runs alone, and
    // such batches take 200 ms.
    let mut f = Fixture::new(&[(A, 4, 0)]);
    f.s.record(A, 1, Duration::from_micros(100));
    f.s.record(A, 1000, Duration::from_millis(200));
    let (tight, _) = f.push(A, 1000, 0, 50_000);
    let run = f.run(10);
    assert!(run.batch.is_empty());
    let reasons: Vec<(u32, DropReason)> = run
        .dropped
        .iter()
        .map(|d| (d.request.id, d.reason))
        .collect();
    assert_eq!(reasons, vec![(tight, DropReason::Predicted)]);
    let (roomy, _) = f.push(A, 1000, 100, 500_000);
    assert_eq!(ids(&f.run(110).batch), vec![roomy]);
}

#[test]
fn a_bulk_backlog_does_not_make_an_interactive_request_look_late() {
    // One row runs in 1 ms, eight in 10 ms. Bulk work fills the queue; an
    // interactive request with 5 ms to spare runs alone (bulk rows do not
    // join it while interactive traffic is about), so it is not dropped.
    let mut f = Fixture::new(&[(A, 8, 0)]);
    f.s.record(A, 1, Duration::from_millis(1));
    f.s.record(A, 8, Duration::from_millis(10));
    for i in 0..8 {
        f.push_class(A, Class::Bulk, 1, i, LONG);
    }
    let (urgent, _) = f.push(A, 1, 10, 5_000);
    let run = f.run(20);
    assert!(run.dropped.is_empty(), "{:?}", run.dropped.len());
    assert_eq!(ids(&run.batch), vec![urgent]);
}

#[test]
fn execution_estimates_are_a_running_mean_per_size_bucket() {
    let mut f = Fixture::new(&[(A, 64, 0)]);
    assert_eq!(f.s.expected(A, 8), Duration::ZERO);
    f.s.record(A, 4, Duration::from_millis(10));
    // A larger, unmeasured bucket borrows the nearest smaller one.
    assert_eq!(f.s.expected(A, 64), Duration::from_millis(10));
    // A smaller bucket has nothing below it to borrow.
    assert_eq!(f.s.expected(A, 1), Duration::ZERO);
    f.s.record(A, 3, Duration::from_millis(20));
    // 3 and 4 rows share a bucket: 10 + 0.2 * (20 - 10).
    let e = f.s.expected(A, 4).as_secs_f64();
    assert!((e - 0.012).abs() < 1e-9, "got {e}");
    f.s.record(A, 64, Duration::from_millis(50));
    assert_eq!(f.s.expected(A, 40), Duration::from_millis(50));
}
