//! Snapshots of the feature state: every user's history and features, every
//! item changed since the catalogue was loaded, and the source offsets the
//! state includes. On start rankd loads the newest snapshot and resumes each
//! topic-partition at the recorded offset, so an update is neither lost nor
//! applied twice across a restart.
//!
//! Format (documented in the README): one MessagePack map per file,
//! `snapshot-<created_ms>.msgpack`, written to a temporary name, synced and
//! renamed, so a crash never leaves a partial file under the final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotItem {
    pub id: u64,
    pub version: u64,
    pub deleted: bool,
    pub embedding: Vec<f32>,
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
        std::fs::create_dir_all(dir)?;
        let bytes = rmp_serde::to_vec_named(self).map_err(std::io::Error::other)?;
        // Never go back in time, even if the clock does.
        let newest = list(dir)?.last().map_or(0, |(ms, _)| *ms);
        let ms = self.created_ms.max(newest + 1);
        let path = dir.join(format!("snapshot-{ms:013}.msgpack"));
        let tmp = dir.join(format!(".snapshot-{ms:013}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
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
}
