//! Bounded top-k selection with rankd's ordering: higher score first, equal
//! scores broken by the smaller item id.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Scored;

#[derive(Debug, Clone, Copy)]
struct Worst(Scored);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    /// Greater means worse, so the heap's top is the entry to evict.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .score
            .total_cmp(&self.0.score)
            .then(self.0.id.cmp(&other.0.id))
    }
}

#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// The bar a candidate must clear, as (score, id): it enters if its score
    /// is higher, or equal with an id at most the bar's (ids are unique, so
    /// "at most" only matters before the heap is full, when the bar is
    /// (-inf, u64::MAX) and every candidate enters). A scan tests rows
    /// against it without calling into the heap.
    #[inline]
    pub fn bar(&self) -> (f32, u64) {
        match self.heap.peek() {
            Some(w) if self.heap.len() >= self.k => (w.0.score, w.0.id),
            _ => (f32::NEG_INFINITY, u64::MAX),
        }
    }

    #[inline]
    pub fn offer(&mut self, c: Scored) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Worst(c));
        } else if let Some(mut top) = self.heap.peek_mut() {
            if Worst(c) < *top {
                *top = Worst(c);
            }
        }
    }

    pub fn merge(&mut self, other: TopK) {
        for w in other.heap {
            self.offer(w.0);
        }
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Scored> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|w| w.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo::Rng;

    fn s(id: u64, score: f32) -> Scored {
        Scored { id, score }
    }

    #[test]
    fn ties_break_by_smaller_id() {
        let mut t = TopK::new(2);
        for c in [s(9, 1.0), s(3, 1.0), s(5, 1.0), s(1, 0.5)] {
            t.offer(c);
        }
        assert_eq!(t.into_sorted(), vec![s(3, 1.0), s(5, 1.0)]);
    }

    #[test]
    fn matches_a_full_sort_on_random_input() {
        let mut rng = Rng::new(7);
        for k in [1, 5, 37, 200] {
            // Coarse scores so ties are frequent.
            let all: Vec<Scored> = (0..2000)
                .map(|i| s(i, (rng.below(50) as f32) / 7.0))
                .collect();
            let mut t = TopK::new(k);
            let (a, b) = all.split_at(700);
            let mut t2 = TopK::new(k);
            a.iter().for_each(|c| t.offer(*c));
            b.iter().for_each(|c| t2.offer(*c));
            t.merge(t2);
            let mut expected = all.clone();
            expected.sort_by(|x, y| y.score.total_cmp(&x.score).then(x.id.cmp(&y.id)));
            expected.truncate(k);
            assert_eq!(t.into_sorted(), expected, "k = {k}");
        }
    }
}
