//! The write-ahead log of user and item writes made over HTTP and the socket.
//!
//! The executor appends each write it applied during a turn and, once per
//! turn, hands the turn's records to the log's writer thread with the
//! acknowledgements they wait for. The writer writes out everything handed
//! to it since its last sync and (with `wal_sync = always`) syncs the file
//! once before acknowledging any of it: one fsync covers every write that
//! arrived while the previous one ran (group commit), and the executor goes
//! on serving while the disk works. Kafka-fed updates need no log: their
//! offsets are in snapshots.
//!
//! Files: `wal-<seq>.log` in the snapshot folder. A capture for a snapshot
//! starts a new segment; the snapshot records the first segment it does not
//! cover (`wal_next`), and once it is written the segments before are
//! removed. On start the segments from the newest snapshot's `wal_next` on
//! are replayed in order. A record is `len: u32 LE`, `crc32: u32 LE` of the
//! payload, then the MessagePack payload; a last record cut short or failing
//! its checksum (a write torn by a crash) is skipped with a warning, and
//! nothing after it in that segment is read.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::store::{ItemWrite, UserUpdate};

/// One acknowledged write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    User(UserUpdate),
    Item(ItemWrite),
}

/// Called once the records it came with are durable (or could not be
/// written: the error's text).
pub type Acknowledge = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The write-ahead log as the executor sees it: records are appended to the
/// turn's batch, which `commit` hands to the writer thread.
pub struct Wal {
    seq: u64,
    buf: Vec<u8>,
    jobs: Option<flume::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

enum Job {
    /// Records, and who waits for them.
    Commit(Vec<u8>, Acknowledge),
    /// Everything before is written and synced, then segment `seq` begins.
    Rotate(u64, flume::Sender<std::io::Result<()>>),
}

fn segment(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:020}.log"))
}

/// The log segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let seq = name
                .strip_prefix("wal-")?
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            Some((seq, e.path()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Removes the segments before `seq` (a written snapshot covers them).
pub fn remove_before(dir: &Path, seq: u64) {
    if let Ok(all) = segments(dir) {
        for (s, path) in all {
            if s < seq {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The records of the segments from `from` on, in order, and the sequence
/// number the next segment should take.
pub fn replay(dir: &Path, from: u64) -> std::io::Result<(Vec<Record>, u64)> {
    let mut records = Vec::new();
    let mut next = from;
    for (seq, path) in segments(dir)? {
        next = next.max(seq + 1);
        if seq < from {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let mut at = 0;
        while at < bytes.len() {
            let torn = |why: &str| {
                tracing::warn!(
                    path = %path.display(),
                    offset = at,
                    why,
                    "torn write-ahead log record skipped (the rest of this segment is ignored)"
                );
            };
            if bytes.len() - at < 8 {
                torn("header cut short");
                break;
            }
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
            let body = at + 8;
            if bytes.len() - body < len {
                torn("record cut short");
                break;
            }
            let payload = &bytes[body..body + len];
            if crc32fast::hash(payload) != crc {
                torn("checksum mismatch");
                break;
            }
            match rmp_serde::from_slice::<Record>(payload) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), offset = at, error = %e, "undecodable write-ahead log record skipped");
                }
            }
            at = body + len;
        }
    }
    Ok((records, next))
}

impl Wal {
    /// Starts segment `seq` in `dir` and its writer thread.
    pub fn open(dir: &Path, seq: u64, sync: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = create(dir, seq)?;
        let (jobs, rx) = flume::unbounded();
        let dir = dir.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("rankd-wal".into())
            .spawn(move || write_loop(dir, file, sync, rx))?;
        Ok(Self {
            seq,
            buf: Vec::with_capacity(64 * 1024),
            jobs: Some(jobs),
            writer: Some(writer),
        })
    }

    /// Adds a record to the turn's batch (handed on by `commit`).
    pub fn append(&mut self, record: &Record) {
        let payload = rmp_serde::to_vec(record).expect("records always encode");
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        self.buf.extend_from_slice(&payload);
    }

    /// Hands the batch to the writer; `ack` is called once it is durable.
    pub fn commit(&mut self, ack: Acknowledge) {
        let records = std::mem::replace(&mut self.buf, Vec::with_capacity(64 * 1024));
        let job = Job::Commit(records, ack);
        if let Err(flume::SendError(Job::Commit(_, ack))) = self.send(job) {
            ack(Err("the write-ahead log writer has stopped".into()));
        }
    }

    /// Waits until everything committed is written (and synced), then
    /// starts the next segment; returns its sequence number (a snapshot of
    /// the state now covers every segment before it).
    pub fn rotate(&mut self) -> std::io::Result<u64> {
        let next = self.seq + 1;
        let (done, rx) = flume::bounded(1);
        let stopped = || std::io::Error::other("the write-ahead log writer has stopped");
        self.send(Job::Rotate(next, done)).map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())??;
        self.seq = next;
        Ok(next)
    }

    /// The segment being written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn send(&self, job: Job) -> Result<(), flume::SendError<Job>> {
        match &self.jobs {
            Some(jobs) => jobs.send(job),
            None => Err(flume::SendError(job)),
        }
    }
}

impl Drop for Wal {
    /// Lets the writer finish what it was handed, and waits for it.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn create(dir: &Path, seq: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment(dir, seq))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(file)
}

/// The writer thread: takes every job waiting, writes the records of all of
/// them with one write and one sync, then acknowledges them.
fn write_loop(dir: PathBuf, mut file: File, sync: bool, jobs: flume::Receiver<Job>) {
    let mut bytes = Vec::new();
    let mut acks: Vec<Acknowledge> = Vec::new();
    let flush = |file: &mut File, bytes: &mut Vec<u8>, acks: &mut Vec<Acknowledge>| {
        let result = if bytes.is_empty() {
            Ok(())
        } else {
            file.write_all(bytes)
                .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
        };
        bytes.clear();
        let result = result.map_err(|e| e.to_string());
        for ack in acks.drain(..) {
            ack(result.clone());
        }
        result
    };
    while let Ok(first) = jobs.recv() {
        for job in std::iter::once(first).chain(jobs.try_iter()) {
            match job {
                Job::Commit(records, ack) => {
                    bytes.extend_from_slice(&records);
                    acks.push(ack);
                }
                Job::Rotate(seq, done) => {
                    let result = flush(&mut file, &mut bytes, &mut acks)
                        .map_err(std::io::Error::other)
                        .and_then(|()| create(&dir, seq))
                        .map(|f| file = f);
                    let _ = done.send(result);
                }
            }
        }
        let _ = flush(&mut file, &mut bytes, &mut acks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64) -> Record {
        Record::User(UserUpdate {
            user_id: id,
            history: Some(vec![id, id + 1]),
            features: None,
            sparse: (id % 2 == 1).then(|| vec![id as i64, -1]),
        })
    }

    /// A user record written before users had categorical features (three
    /// fields by position) reads with none.
    #[test]
    fn a_user_record_without_sparse_reads_with_none() {
        // The record types as they were, encoded as the log encodes them.
        #[derive(Serialize)]
        struct OldUserUpdate {
            user_id: u64,
            history: Option<Vec<u64>>,
            features: Option<Vec<f32>>,
        }
        #[derive(Serialize)]
        enum OldRecord {
            User(OldUserUpdate),
        }
        let old = rmp_serde::to_vec(&OldRecord::User(OldUserUpdate {
            user_id: 7,
            history: Some(vec![1, 2]),
            features: Some(vec![0.5]),
        }))
        .unwrap();
        assert_eq!(
            rmp_serde::from_slice::<Record>(&old).unwrap(),
            Record::User(UserUpdate {
                user_id: 7,
                history: Some(vec![1, 2]),
                features: Some(vec![0.5]),
                sparse: None,
            })
        );
    }

    #[test]
    fn records_come_back_in_order_and_a_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 0, true).unwrap();
        let (acked, acks) = flume::unbounded();
        let ack = || -> Acknowledge {
            let acked = acked.clone();
            Box::new(move |r| acked.send(r).unwrap())
        };
        for id in 0..3 {
            wal.append(&user(id));
        }
        wal.commit(ack());
        assert_eq!(wal.rotate().unwrap(), 1);
        assert_eq!(
            acks.try_recv(),
            Ok(Ok(())),
            "acknowledged before the rotation"
        );
        wal.append(&user(3));
        wal.append(&user(4));
        wal.commit(ack());
        drop(wal);
        assert_eq!(
            acks.try_recv(),
            Ok(Ok(())),
            "acknowledged before the writer stops"
        );
        let (all, next) = replay(dir.path(), 0).unwrap();
        assert_eq!(all, (0..5).map(user).collect::<Vec<_>>());
        assert_eq!(next, 2);
        let (after, _) = replay(dir.path(), 1).unwrap();
        assert_eq!(after, vec![user(3), user(4)]);
        // Cut the last record in the middle.
        let path = segment(dir.path(), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (torn, _) = replay(dir.path(), 0).unwrap();
        assert_eq!(torn, (0..4).map(user).collect::<Vec<_>>());
        remove_before(dir.path(), 1);
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }
}
