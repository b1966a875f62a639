//! Acknowledging durable writes. A user or item write made over HTTP or the
//! socket is answered only once the write-ahead log (`wal`) holds it: the
//! executor applies the write, records it here with the caller waiting on
//! it, and once per turn `commit` hands the turn's records to the log's
//! writer, which answers every caller of the turn after one sync (or each
//! with the error when the log could not be written). Without a log the
//! callers are answered at the commit. Either way no caller hears of its
//! write before the turn that applied it has ended, so what a turn does
//! after applying its writes (evicting users beyond `--max-users`) is seen
//! by a caller whose write was acknowledged.

use std::path::Path;

use tokio::sync::oneshot;

use super::store::{ItemSummary, ItemWrite, State, UserSummary, UserUpdate};
use super::wal::{self, Record, Wal};
use super::UserDims;
use crate::error::ServeError;

/// Where a caller waits for the answer to its write.
pub type Reply<T> = oneshot::Sender<Result<T, ServeError>>;

/// A write applied this turn, acknowledged once the log is committed.
enum Ack {
    User(Reply<UserSummary>, UserSummary),
    Item(Reply<ItemSummary>, ItemSummary),
}

/// The write-ahead log, when there is one, and the writes of the turn
/// waiting for it.
#[derive(Default)]
pub struct Durable {
    wal: Option<Wal>,
    acks: Vec<Ack>,
}

impl Durable {
    /// Replays the log in `dir` from segment `from` on (the segments after
    /// the snapshot `state` was restored from) into `state`, then starts a
    /// new segment, synced after every turn's writes when `sync`. Returns
    /// whether any record was replayed. A log that cannot be read is logged
    /// and skipped; one that cannot be opened leaves the log off.
    pub fn open(
        &mut self,
        dir: &Path,
        from: u64,
        sync: bool,
        state: &mut State,
        dims: &UserDims,
    ) -> bool {
        let (records, next) = match wal::replay(dir, from) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the write-ahead log");
                (Vec::new(), from)
            }
        };
        let replayed = !records.is_empty();
        if replayed {
            let (mut users, mut items, mut refused) = (0usize, 0usize, 0usize);
            for r in records {
                let ok = match r {
                    Record::User(u) => {
                        users += 1;
                        state.upsert_user(u, dims).is_ok()
                    }
                    Record::Item(w) => {
                        items += 1;
                        state.replay_item(w).is_ok()
                    }
                };
                refused += usize::from(!ok);
            }
            tracing::info!(users, items, refused, "write-ahead log replayed");
        }
        match Wal::open(dir, next, sync) {
            Ok(w) => self.wal = Some(w),
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "write-ahead log is off: cannot open it")
            }
        }
        replayed
    }

    /// A user write was applied: `update` is logged, and `summary` answers
    /// `reply` once the turn is committed.
    pub fn user(&mut self, update: UserUpdate, reply: Reply<UserSummary>, summary: UserSummary) {
        if let Some(wal) = &mut self.wal {
            wal.append(&Record::User(update));
        }
        self.acks.push(Ack::User(reply, summary));
    }

    /// An item write was applied: `write` is logged with the version and
    /// catalogue it was given (so a replay writes the same), and `summary`
    /// answers `reply` once the turn is committed.
    pub fn item(&mut self, mut write: ItemWrite, reply: Reply<ItemSummary>, summary: ItemSummary) {
        if let Some(wal) = &mut self.wal {
            write.version = Some(summary.version);
            write.catalogue = summary.catalogue.clone();
            wal.append(&Record::Item(write));
        }
        self.acks.push(Ack::Item(reply, summary));
    }

    /// Hands the turn's log records to the log's writer, which acknowledges
    /// them once they are written (and synced); without a log, at once.
    pub fn commit(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut self.acks);
        let acknowledge = move |result: Result<(), String>| {
            let failed = result.err().map(|e| {
                tracing::error!(error = %e, "write-ahead log write failed");
                ServeError::Internal(format!("the write-ahead log could not be written: {e}"))
            });
            for ack in acks {
                match ack {
                    Ack::User(r, s) => {
                        let _ = r.send(failed.clone().map_or(Ok(s), Err));
                    }
                    Ack::Item(r, s) => {
                        let _ = r.send(failed.clone().map_or(Ok(s), Err));
                    }
                }
            }
        };
        match &mut self.wal {
            Some(w) => w.commit(Box::new(acknowledge)),
            None => acknowledge(Ok(())),
        }
    }

    /// Once everything committed is durable, starts the log's next segment
    /// and returns its number: a capture of the state taken since the last
    /// commit covers every segment before it. `None` without a log.
    pub fn rotate(&mut self) -> Option<u64> {
        let wal = self.wal.as_mut()?;
        Some(match wal.rotate() {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "write-ahead log: cannot start a new segment");
                wal.seq()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ItemTable;

    fn state() -> State {
        let mut s = State::new(10);
        s.add_table(
            "videos",
            ItemTable::new(2, vec![1, 2], vec![1.0, 0.0, 0.0, 1.0]).unwrap(),
        );
        s
    }

    fn update(user_id: u64, history: &[u64]) -> UserUpdate {
        UserUpdate {
            user_id,
            history: Some(history.to_vec()),
            features: None,
            sparse: None,
        }
    }

    /// Applies a user write to `state` and records it in `d`; the receiver
    /// of its answer.
    fn write_user(
        d: &mut Durable,
        state: &mut State,
        u: UserUpdate,
    ) -> oneshot::Receiver<Result<UserSummary, ServeError>> {
        let (reply, rx) = oneshot::channel();
        let summary = state.upsert_user(u.clone(), &UserDims::default()).unwrap();
        d.user(u, reply, summary);
        rx
    }

    fn write_item(
        d: &mut Durable,
        state: &mut State,
        id: u64,
        embedding: Vec<f32>,
    ) -> oneshot::Receiver<Result<ItemSummary, ServeError>> {
        let write = ItemWrite {
            item_id: id,
            embedding: Some(embedding),
            version: None,
            catalogue: None,
            attributes: None,
        };
        let (reply, rx) = oneshot::channel();
        let summary = state.write_item_request(write.clone()).unwrap();
        d.item(write, reply, summary);
        rx
    }

    #[test]
    fn without_a_log_writes_are_answered_at_the_commit_and_not_before() {
        let mut d = Durable::default();
        let mut s = state();
        let mut user = write_user(&mut d, &mut s, update(7, &[1, 2]));
        let mut item = write_item(&mut d, &mut s, 3, vec![0.5, 0.5]);
        assert!(user.try_recv().is_err(), "answered before the commit");
        assert!(item.try_recv().is_err(), "answered before the commit");
        d.commit();
        assert_eq!(user.try_recv().unwrap().unwrap().user_id, 7);
        let item = item.try_recv().unwrap().unwrap();
        assert_eq!(
            (item.item_id, item.catalogue.as_deref()),
            (3, Some("videos"))
        );
        assert_eq!(d.rotate(), None, "no log, no segments");
    }

    /// Every write of a turn is answered once the log holds it, and a
    /// restart replays them in order, items with the version they were
    /// given; a capture's segment starts after every committed write.
    #[test]
    fn with_a_log_writes_are_answered_once_durable_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Durable::default();
        let mut s = state();
        assert!(!d.open(dir.path(), 0, true, &mut s, &UserDims::default()));
        let item = write_item(&mut d, &mut s, 3, vec![0.5, 0.5]);
        let histories: [&[u64]; 3] = [&[1], &[1, 2], &[2, 3]];
        let users: Vec<_> = histories
            .iter()
            .map(|h| write_user(&mut d, &mut s, update(7, h)))
            .collect();
        d.commit();
        let written = item.blocking_recv().unwrap().unwrap();
        for (h, rx) in histories.iter().zip(users) {
            assert_eq!(rx.blocking_recv().unwrap().unwrap().history, h.to_vec());
        }
        assert_eq!(d.rotate(), Some(1));
        let mut user = write_user(&mut d, &mut s, update(8, &[2]));
        d.commit();
        drop(d);
        assert!(
            user.try_recv().unwrap().is_ok(),
            "answered before the log closed"
        );

        let mut restored = state();
        let mut again = Durable::default();
        assert!(again.open(dir.path(), 0, true, &mut restored, &UserDims::default()));
        assert_eq!(restored.user_summary(7).history, vec![2, 3]);
        assert_eq!(restored.user_summary(8).history, vec![2]);
        let stored = restored.item("videos", 3).unwrap();
        assert_eq!(stored.version, written.version);
        // From the segment the capture started, only the later write.
        let mut after = state();
        assert!(Durable::default().open(dir.path(), 1, true, &mut after, &UserDims::default()));
        assert!(after.user_summary(7).history.is_empty());
        assert_eq!(after.user_summary(8).history, vec![2]);
    }

    /// A log that cannot be written answers every write of the turn with
    /// the error, not with success.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_log_write_that_fails_answers_every_write_of_the_turn_with_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Durable::default();
        let mut s = state();
        d.open(dir.path(), 0, true, &mut s, &UserDims::default());
        // The next segment is a device that refuses every write.
        let next = dir.path().join(format!("wal-{:020}.log", 1));
        std::os::unix::fs::symlink("/dev/full", next).unwrap();
        assert_eq!(d.rotate(), Some(1));
        let user = write_user(&mut d, &mut s, update(7, &[1]));
        let item = write_item(&mut d, &mut s, 3, vec![0.5, 0.5]);
        d.commit();
        for e in [
            user.blocking_recv().unwrap().unwrap_err(),
            item.blocking_recv().unwrap().unwrap_err(),
        ] {
            assert_eq!(e.status(), 500, "{e}");
            assert!(
                e.to_string()
                    .contains("the write-ahead log could not be written"),
                "{e}"
            );
        }
    }
}
