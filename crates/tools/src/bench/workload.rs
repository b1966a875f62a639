//! The request mix: user ids drawn Zipf-like from a population (a few heavy
//! users, a long tail), candidate lists for `score`, all from a seeded RNG so
//! two runs offer the same sequence.

use std::collections::HashMap;
use std::sync::Mutex;

use rankd::internals::Rng;
use rankd_client::types::{RecommendRequest, ScoreRequest, UserRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Recommend,
    Score,
    Health,
    /// A user's history replaced (5 item ids): a write the daemon logs.
    UpsertUser,
}

/// P(rank r) ∝ r^-s for r in 1..=n, sampled by inverting a precomputed CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Self {
        assert!(n > 0, "population must be > 0");
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|r| {
                acc += (r as f64).powf(-s);
                acc
            })
            .collect();
        let total = acc;
        cdf.iter_mut().for_each(|c| *c /= total);
        Self { cdf }
    }

    /// A rank in 1..=n.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.uniform();
        self.cdf.partition_point(|&c| c < u) as u64 + 1
    }
}

#[derive(Debug)]
pub struct Workload {
    pub op: OpKind,
    pub zipf: Zipf,
    /// User ids are ranks scattered over the id space by a fixed odd multiplier,
    /// so heavy users are not all small ids.
    pub k: usize,
    pub candidates: usize,
    /// Candidate item ids are drawn from 1..=items.
    pub items: u64,
    pub timeout_ms: u64,
    /// Sent with every recommend.
    pub filter: Option<rankd_client::types::Filter>,
    /// Fraction of calls that are a click of the drawn user (`--clicks`).
    pub clicks: f64,
    /// Newest ids kept of a clicking user's history.
    pub history_len: usize,
    /// The histories written so far, by user, for clicks to extend.
    pub histories: Mutex<HashMap<u64, Vec<u64>>>,
}

pub enum Call {
    Recommend(RecommendRequest),
    Score(ScoreRequest),
    Health,
    UpsertUser(u64, UserRequest),
}

impl Workload {
    pub fn user(&self, rng: &mut Rng) -> u64 {
        self.user_of_rank(self.zipf.sample(rng))
    }

    /// The id of the user of popularity rank `rank` (1 = most frequent).
    pub fn user_of_rank(&self, rank: u64) -> u64 {
        rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16
    }

    /// Records `history` as what `user`'s history was written as.
    pub fn remember(&self, user: u64, history: &[u64]) {
        self.histories
            .lock()
            .expect("histories lock poisoned")
            .insert(user, history.to_vec());
    }

    /// A click of `user` on a random item: the history written with it.
    fn click(&self, user: u64, rng: &mut Rng) -> Call {
        let item = 1 + rng.below(self.items);
        let mut histories = self.histories.lock().expect("histories lock poisoned");
        let h = histories.entry(user).or_default();
        h.push(item);
        let extra = h.len().saturating_sub(self.history_len);
        h.drain(..extra);
        Call::UpsertUser(
            user,
            UserRequest {
                history: Some(h.clone()),
                features: None,
                sparse: None,
            },
        )
    }

    pub fn next(&self, rng: &mut Rng) -> Call {
        if self.clicks > 0.0 && rng.uniform() < self.clicks {
            let user = self.user(rng);
            return self.click(user, rng);
        }
        match self.op {
            OpKind::Health => Call::Health,
            OpKind::UpsertUser => Call::UpsertUser(
                self.user(rng),
                UserRequest {
                    history: Some((0..5).map(|_| 1 + rng.below(self.items)).collect()),
                    features: None,
                    sparse: None,
                },
            ),
            OpKind::Recommend => Call::Recommend(RecommendRequest {
                user_id: self.user(rng),
                k: self.k,
                exclude: Vec::new(),
                timeout_ms: Some(self.timeout_ms),
                version: None,
                priority: None,
                filter: self.filter.clone(),
                context: None,
            }),
            OpKind::Score => Call::Score(ScoreRequest {
                user_id: self.user(rng),
                items: (0..self.candidates)
                    .map(|_| 1 + rng.below(self.items))
                    .collect(),
                timeout_ms: Some(self.timeout_ms),
                version: None,
                priority: None,
                context: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_click_extends_the_users_history_to_its_newest_ids() {
        let w = Workload {
            op: OpKind::Recommend,
            zipf: Zipf::new(3, 1.1),
            k: 10,
            candidates: 1,
            items: 1000,
            timeout_ms: 100,
            filter: None,
            clicks: 1.0,
            history_len: 4,
            histories: Default::default(),
        };
        let mut rng = Rng::new(5);
        let user = w.user_of_rank(1);
        w.remember(user, &[1, 2, 3]);
        let mut before: Vec<u64> = vec![1, 2, 3];
        for _ in 0..6 {
            let Call::UpsertUser(u, r) = w.click(user, &mut rng) else {
                panic!("a click writes the user");
            };
            let h = r.history.unwrap();
            assert_eq!(u, user);
            assert!(
                h.len() <= 4 && (1..=1000).contains(h.last().unwrap()),
                "{h:?}"
            );
            // The ids before the click are still there, oldest dropped first.
            let kept = &before[before.len() + 1 - h.len()..];
            assert_eq!(&h[..h.len() - 1], kept, "{before:?} then {h:?}");
            before = h;
        }
        // With --clicks 1 every call is a click.
        assert!(matches!(w.next(&mut rng), Call::UpsertUser(..)));
    }

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let z = Zipf::new(1000, 1.1);
        let mut rng = Rng::new(3);
        let draws: Vec<u64> = (0..20_000).map(|_| z.sample(&mut rng)).collect();
        assert!(draws.iter().all(|&r| (1..=1000).contains(&r)));
        let ones = draws.iter().filter(|&&r| r == 1).count();
        let tail = draws.iter().filter(|&&r| r > 500).count();
        // With s = 1.1 over 1000 ranks, rank 1 carries about 15% of the mass.
        assert!(ones > 2000 && ones < 4500, "{ones}");
        assert!(tail > 0 && tail < ones, "{tail}");
    }
}
