//! Bearer tokens, read from files so they never appear in `ps`: one accepted
//! token per line (blank lines and `#` comments ignored), so a new token can
//! be added before the old one is removed. A file is re-read when its size or
//! modification time changes (checked at most every [`RECHECK`]); a file that
//! cannot be read keeps the tokens last read, and says so in the log.
//! Presented tokens are compared in constant time.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderMap;

/// How often a token file's metadata is looked at.
pub const RECHECK: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    inner: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    tokens: Vec<Vec<u8>>,
    stamp: Option<(u64, Option<SystemTime>)>,
    checked: Instant,
}

fn read_tokens(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect())
}

fn stamp(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

impl TokenFile {
    /// Reads the file; an unreadable or empty file is an error at start.
    pub fn open(path: &Path, what: &str) -> anyhow::Result<Self> {
        let tokens = read_tokens(path).map_err(|e| {
            anyhow::anyhow!("cannot read the {what} token file {}: {e}", path.display())
        })?;
        anyhow::ensure!(
            !tokens.is_empty(),
            "the {what} token file {} holds no token (one per line)",
            path.display()
        );
        Ok(Self {
            path: path.to_path_buf(),
            inner: Mutex::new(Loaded {
                tokens,
                stamp: stamp(path),
                checked: Instant::now(),
            }),
        })
    }

    /// Whether `presented` is one of the file's tokens.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut g = self.inner.lock().expect("token lock poisoned");
        if g.checked.elapsed() >= RECHECK {
            g.checked = Instant::now();
            let now = stamp(&self.path);
            if now != g.stamp {
                match read_tokens(&self.path) {
                    Ok(tokens) => {
                        tracing::info!(path = %self.path.display(), tokens = tokens.len(), "token file re-read");
                        g.tokens = tokens;
                        g.stamp = now;
                    }
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "token file unreadable; keeping the tokens read before");
                    }
                }
            }
        }
        // Every token is compared, so the time taken does not say which matched.
        g.tokens
            .iter()
            .fold(false, |found, t| found | constant_time_eq(t, presented))
    }
}

/// Equal slices, in time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer <token>` header, if well-formed.
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_per_line_and_a_changed_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# admins\nalpha\n\n  beta  \n").unwrap();
        let f = TokenFile::open(&path, "admin").unwrap();
        assert!(f.accepts(b"alpha"));
        assert!(f.accepts(b"beta"));
        assert!(!f.accepts(b"# admins"));
        assert!(!f.accepts(b"alph"));
        assert!(!f.accepts(b""));
        std::fs::write(&path, "gamma-longer-token\n").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(f.accepts(b"gamma-longer-token"));
        assert!(!f.accepts(b"alpha"), "rotated out");
        // An unreadable file keeps the last tokens.
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(f.accepts(b"gamma-longer-token"));
    }

    #[test]
    fn an_empty_or_missing_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        assert!(TokenFile::open(&path, "client").is_err());
        std::fs::write(&path, "\n# none\n").unwrap();
        let e = TokenFile::open(&path, "client").unwrap_err().to_string();
        assert!(e.contains("holds no token"), "{e}");
    }

    #[test]
    fn bearer_headers_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
        assert!(constant_time_eq(b"x", b"x"));
        assert!(!constant_time_eq(b"x", b"y"));
        assert!(!constant_time_eq(b"x", b"xx"));
    }
}
