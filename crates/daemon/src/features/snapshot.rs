//! Snapshots of the feature state: every user's history and features, every
//! item changed since the catalogue was loaded, and the source offsets the
//! state includes. On start rankd loads the newest snapshot and resumes each
//! topic-partition at the recorded offset, so an update is neither lost nor
//! applied twice across a restart.
//!
//! Format (documented in the README): one MessagePack map per file,
//! `snapshot-<created_ms>.msgpack`, written to a temporary name, synced and
//! renamed, so a crash never leaves a partial file under the final name.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::UserState;

pub const FORMAT: u32 = 1;
/// Snapshots kept on disk; older ones are removed after a successful write.
const KEEP: usize = 3;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub created_ms: u64,
    pub offsets: Vec<SnapshotOffset>,
    pub users: Vec<SnapshotUser>,
    pub items: Vec<SnapshotItem>,
    /// The first write-ahead log segment this snapshot does not cover.
    #[serde(default)]
    pub wal_next: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotOffset {
    pub topic: String,
    pub partition: i32,
    /// The first offset not included in the state.
    pub next_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotUser {
    pub id: u64,
    /// Oldest first.
    pub history: Vec<u64>,
    pub features: Option<Vec<f32>>,
    pub features_version: u64,
    /// Categorical features; absent from snapshots written before rankd
    /// stored them, and for a user without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<Vec<i64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotItem {
    /// The item's catalogue. Snapshots written before catalogues had names
    /// lack it; their items are restored into every table of their
    /// dimension, as writes then reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalogue: Option<String>,
    pub id: u64,
    pub version: u64,
    pub deleted: bool,
    pub embedding: Vec<f32>,
    /// The item's attribute values, when its catalogue has attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<std::collections::BTreeMap<String, i64>>,
}

/// What changed in the feature state since the previous capture: users are
/// shared with the executor's store (copy on write), items copied. The
/// executor's pause for it scales with the changes, not with the state; the
/// snapshot thread folds it into its own full copy, a `SnapshotBase`.
#[derive(Debug, Clone, Default)]
pub struct SnapshotDelta {
    /// The executor's change counter at capture.
    pub changes: u64,
    /// `users` and `items` are the whole state, not only changes.
    pub full: bool,
    /// Always all of them.
    pub offsets: Vec<SnapshotOffset>,
    pub users: Vec<(u64, Arc<UserState>)>,
    /// Users gone since the previous capture (evicted).
    pub removed_users: Vec<u64>,
    pub items: Vec<SnapshotItem>,
    /// The first write-ahead log segment the state does not cover.
    pub wal_next: u64,
}

/// The snapshot thread's copy of the state, kept in step by deltas and
/// written from there, off the executor.
#[derive(Debug, Default)]
pub struct SnapshotBase {
    offsets: Vec<SnapshotOffset>,
    users: HashMap<u64, Arc<UserState>>,
    /// By catalogue and id.
    items: HashMap<(Option<String>, u64), SnapshotItem>,
    /// A full capture has been merged: the copy is the whole state.
    complete: bool,
    wal_next: u64,
}

/// A snapshot borrowed from a `SnapshotBase`: serialises exactly as
/// `Snapshot` (same field names and order) without cloning the state.
#[derive(Serialize)]
struct SnapshotView<'a> {
    format: u32,
    created_ms: u64,
    offsets: &'a [SnapshotOffset],
    users: Vec<UserView<'a>>,
    items: Vec<&'a SnapshotItem>,
    wal_next: u64,
}

/// A `SnapshotUser` borrowed from a user's state (same fields, same order).
#[derive(Serialize)]
struct UserView<'a> {
    id: u64,
    history: &'a VecDeque<u64>,
    features: &'a Option<Vec<f32>>,
    features_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sparse: Option<&'a Vec<i64>>,
}

impl UserView<'_> {
    #[cfg(test)]
    fn to_owned(&self) -> SnapshotUser {
        SnapshotUser {
            id: self.id,
            history: self.history.iter().copied().collect(),
            features: self.features.clone(),
            features_version: self.features_version,
            sparse: self.sparse.cloned(),
        }
    }
}

impl SnapshotBase {
    /// True once a full capture has been merged.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    pub fn merge(&mut self, delta: SnapshotDelta) {
        if delta.full {
            self.users.clear();
            self.items.clear();
            self.complete = true;
        }
        self.offsets = delta.offsets;
        self.wal_next = delta.wal_next;
        for id in &delta.removed_users {
            self.users.remove(id);
        }
        self.users.extend(delta.users);
        self.items.extend(
            delta
                .items
                .into_iter()
                .map(|i| ((i.catalogue.clone(), i.id), i)),
        );
    }

    fn view(&self) -> SnapshotView<'_> {
        let mut users: Vec<UserView<'_>> = self
            .users
            .iter()
            .map(|(&id, u)| UserView {
                id,
                history: &u.history,
                features: &u.features,
                features_version: u.features_version,
                sparse: u.sparse.as_ref(),
            })
            .collect();
        users.sort_unstable_by_key(|u| u.id);
        let mut items: Vec<&SnapshotItem> = self.items.values().collect();
        items.sort_unstable_by(|a, b| (&a.catalogue, a.id).cmp(&(&b.catalogue, b.id)));
        SnapshotView {
            format: FORMAT,
            created_ms: now_ms(),
            offsets: &self.offsets,
            users,
            items,
            wal_next: self.wal_next,
        }
    }

    /// The first log segment the copy does not cover.
    pub fn wal_next(&self) -> u64 {
        self.wal_next
    }

    /// Writes the copy as a snapshot file into `dir` (see `Snapshot::write`).
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let view = self.view();
        let bytes = rmp_serde::to_vec_named(&view).map_err(std::io::Error::other)?;
        write_file(dir, view.created_ms, &bytes)
    }

    #[cfg(test)]
    /// The copy as an owned snapshot.
    pub fn to_snapshot(&self) -> Snapshot {
        let v = self.view();
        Snapshot {
            format: v.format,
            created_ms: v.created_ms,
            offsets: v.offsets.to_vec(),
            users: v.users.iter().map(UserView::to_owned).collect(),
            items: v.items.into_iter().cloned().collect(),
            wal_next: v.wal_next,
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Snapshot {
    pub fn new() -> Self {
        Self {
            format: FORMAT,
            created_ms: now_ms(),
            ..Default::default()
        }
    }

    /// Writes the snapshot into `dir` and prunes old ones; returns its path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let bytes = rmp_serde::to_vec_named(self).map_err(std::io::Error::other)?;
        write_file(dir, self.created_ms, &bytes)
    }

    /// The newest readable snapshot in `dir`, if any. Unreadable files are
    /// skipped with a warning (an older snapshot plus replay is still correct).
    pub fn load_newest(dir: &Path) -> std::io::Result<Option<(PathBuf, Snapshot)>> {
        if !dir.exists() {
            return Ok(None);
        }
        for (_, path) in list(dir)?.into_iter().rev() {
            let loaded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| rmp_serde::from_slice::<Snapshot>(&b).map_err(|e| e.to_string()));
            match loaded {
                Ok(s) if s.format == FORMAT => return Ok(Some((path, s))),
                Ok(s) => {
                    tracing::warn!(path = %path.display(), format = s.format, "snapshot of an unknown format skipped")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable snapshot skipped")
                }
            }
        }
        Ok(None)
    }
}

/// Writes `bytes` as `snapshot-<ms>.msgpack` (never older than the newest
/// there, even if the clock went back) through a synced temporary file, then
/// prunes old snapshots; returns the path.
fn write_file(dir: &Path, created_ms: u64, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let newest = list(dir)?.last().map_or(0, |(ms, _)| *ms);
    let ms = created_ms.max(newest + 1);
    let path = dir.join(format!("snapshot-{ms:013}.msgpack"));
    let tmp = dir.join(format!(".snapshot-{ms:013}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let all = list(dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(KEEP)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// Snapshot files in `dir`, oldest first.
fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let ms = name
                .strip_prefix("snapshot-")?
                .strip_suffix(".msgpack")?
                .parse()
                .ok()?;
            Some((ms, e.path()))
        })
        .collect();
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_readable_snapshot_wins_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Snapshot::load_newest(dir.path()).unwrap().is_none());
        let mut last = None;
        for i in 0..5 {
            let mut s = Snapshot::new();
            s.offsets.push(SnapshotOffset {
                topic: "t".into(),
                partition: 0,
                next_offset: i,
            });
            s.users.push(SnapshotUser {
                id: 1,
                history: vec![i as u64],
                features: None,
                features_version: 0,
                sparse: None,
            });
            last = Some(s.write(dir.path()).unwrap());
        }
        assert_eq!(list(dir.path()).unwrap().len(), KEEP);
        let (path, s) = Snapshot::load_newest(dir.path()).unwrap().unwrap();
        assert_eq!(Some(path.clone()), last);
        assert_eq!(s.offsets[0].next_offset, 4);
        // A corrupt newest file falls back to the previous one.
        std::fs::write(
            dir.path().join("snapshot-9999999999999.msgpack"),
            b"garbage",
        )
        .unwrap();
        let (_, s) = Snapshot::load_newest(dir.path()).unwrap().unwrap();
        assert_eq!(s.offsets[0].next_offset, 4);
    }

    /// A snapshot written from the thread's copy (borrowed views, a
    /// VecDeque history) reads back as the same `Snapshot`.
    #[test]
    fn a_written_base_reads_back_as_the_same_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut base = SnapshotBase::default();
        let user = |h: &[u64], f: Option<Vec<f32>>| {
            Arc::new(UserState {
                history: h.iter().copied().collect(),
                sparse: f.as_ref().map(|f| vec![f.len() as i64, -1]),
                features: f,
                features_version: 3,
            })
        };
        base.merge(SnapshotDelta {
            changes: 1,
            full: true,
            offsets: vec![SnapshotOffset {
                topic: "t".into(),
                partition: 2,
                next_offset: 17,
            }],
            users: vec![
                (9, user(&[4, 5], None)),
                (2, user(&[], Some(vec![0.5, -1.0]))),
            ],
            items: vec![SnapshotItem {
                catalogue: Some("videos".into()),
                id: 7,
                version: 2,
                deleted: true,
                embedding: vec![1.0, 2.0],
                attributes: Some([("in_stock".to_string(), 0)].into()),
            }],
            ..Default::default()
        });
        base.merge(SnapshotDelta {
            changes: 2,
            users: vec![(9, user(&[4, 5, 6], None))],
            ..Default::default()
        });
        base.write(dir.path()).unwrap();
        let (_, read) = Snapshot::load_newest(dir.path()).unwrap().unwrap();
        let mut want = base.to_snapshot();
        want.created_ms = read.created_ms;
        assert_eq!(read, want);
        assert_eq!(read.users.iter().map(|u| u.id).collect::<Vec<_>>(), [2, 9]);
        assert_eq!(read.users[1].history, [4, 5, 6]);
        assert_eq!(read.users[0].sparse, Some(vec![2, -1]));
        assert_eq!(read.users[1].sparse, None);
        assert!(read.offsets.is_empty(), "a delta carries all offsets");
    }

    /// A snapshot written before users had categorical features (no
    /// `sparse` key) reads with none; one written now keeps them.
    #[test]
    fn users_without_a_sparse_key_read_as_having_none() {
        #[derive(Serialize)]
        struct OldUser {
            id: u64,
            history: Vec<u64>,
            features: Option<Vec<f32>>,
            features_version: u64,
        }
        #[derive(Serialize)]
        struct OldSnapshot {
            format: u32,
            created_ms: u64,
            offsets: Vec<SnapshotOffset>,
            users: Vec<OldUser>,
            items: Vec<SnapshotItem>,
        }
        let old = OldSnapshot {
            format: FORMAT,
            created_ms: 5,
            offsets: Vec::new(),
            users: vec![OldUser {
                id: 3,
                history: vec![1, 2],
                features: Some(vec![0.5]),
                features_version: 2,
            }],
            items: Vec::new(),
        };
        let bytes = rmp_serde::to_vec_named(&old).unwrap();
        let read: Snapshot = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            read.users,
            [SnapshotUser {
                id: 3,
                history: vec![1, 2],
                features: Some(vec![0.5]),
                features_version: 2,
                sparse: None,
            }]
        );
        let mut now = read.clone();
        now.users[0].sparse = Some(vec![7, 0, 3]);
        let bytes = rmp_serde::to_vec_named(&now).unwrap();
        let back: Snapshot = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, now);
    }
}
