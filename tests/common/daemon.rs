//! Starting the real `rankd` binary on a free port (and socket path), the demo
//! repository and models derived from it, and turns: the tests that time the
//! daemon run with no other test's daemon beside them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex, Once};
use std::thread::ThreadId;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bundled demo repository, generated once per test binary.
pub fn demo_models() -> PathBuf {
    static GEN: Once = Once::new();
    let models = repo_root().join("models");
    GEN.call_once(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_rankd"))
            .args(["models", "generate", "--models"])
            .arg(&models)
            .output()
            .expect("running rankd models generate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    models
}

/// Item id → cluster, from the demo catalogue's side file.
pub fn demo_clusters() -> std::collections::HashMap<u64, u32> {
    let text = std::fs::read_to_string(demo_models().join("catalogues/demo/clusters.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let (id, c) = l.split_once(',').unwrap();
            (id.parse().unwrap(), c.parse().unwrap())
        })
        .collect()
}

/// Cluster → its item ids, sorted.
pub fn demo_cluster_members() -> std::collections::HashMap<u32, Vec<u64>> {
    let mut m: std::collections::HashMap<u32, Vec<u64>> = std::collections::HashMap::new();
    for (id, c) in demo_clusters() {
        m.entry(c).or_default().push(id);
    }
    m.values_mut().for_each(|v| v.sort_unstable());
    m
}

// ---------------------------------------------------------------------------
// Turns
// ---------------------------------------------------------------------------

/// Who runs daemons now: tests holding a shared turn (one entry per turn, by
/// the thread that took it), or the one test that runs alone.
#[derive(Default)]
struct Turns {
    shared: Vec<ThreadId>,
    alone: Option<ThreadId>,
    waiting_alone: usize,
}

static TURNS: Mutex<Turns> = Mutex::new(Turns {
    shared: Vec::new(),
    alone: None,
    waiting_alone: 0,
});
static TURN_CHANGED: Condvar = Condvar::new();

/// A test's right to run daemons (or a broker). Every [`Daemon`] holds a
/// shared one; a test that measures latencies takes [`alone`] first, and no
/// other test's daemon runs until it is dropped.
pub struct Turn {
    holder: ThreadId,
    alone: bool,
}

fn turns() -> std::sync::MutexGuard<'static, Turns> {
    TURNS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until no other test runs a daemon, then keeps them out.
pub fn alone() -> Turn {
    let me = std::thread::current().id();
    let mut t = turns();
    assert!(t.alone != Some(me), "this test already runs alone");
    t.waiting_alone += 1;
    while t.alone.is_some() || t.shared.iter().any(|id| *id != me) {
        t = TURN_CHANGED.wait(t).unwrap_or_else(|e| e.into_inner());
    }
    t.waiting_alone -= 1;
    t.alone = Some(me);
    Turn {
        holder: me,
        alone: true,
    }
}

/// A turn beside other tests: waits while a test runs alone (or waits to),
/// unless this thread already holds a turn.
pub fn shared() -> Turn {
    let me = std::thread::current().id();
    let mut t = turns();
    loop {
        let mine = t.alone == Some(me) || t.shared.contains(&me);
        if mine || (t.alone.is_none() && t.waiting_alone == 0) {
            break;
        }
        t = TURN_CHANGED.wait(t).unwrap_or_else(|e| e.into_inner());
    }
    t.shared.push(me);
    Turn {
        holder: me,
        alone: false,
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut t = turns();
        if self.alone {
            t.alone = None;
        } else if let Some(i) = t.shared.iter().position(|id| *id == self.holder) {
            t.shared.swap_remove(i);
        }
        drop(t);
        TURN_CHANGED.notify_all();
    }
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

pub struct Daemon {
    child: Child,
    pub http: String,
    /// The daemon's socket (in its temporary folder).
    pub uds: PathBuf,
    pub stderr_log: PathBuf,
    _dir: tempfile::TempDir,
    _turn: Turn,
}

impl Daemon {
    /// `rankd serve` on the demo repository.
    pub fn start() -> Self {
        Self::start_with(&demo_models(), &[])
    }

    pub fn start_with(models: &Path, extra: &[&str]) -> Self {
        Self::start_bin(Path::new(env!("CARGO_BIN_EXE_rankd")), models, extra)
    }

    /// As [`Daemon::start_with`], running the `rankd` binary at `bin`.
    pub fn start_bin(bin: &Path, models: &Path, extra: &[&str]) -> Self {
        let turn = shared();
        let dir = tempfile::tempdir().unwrap();
        let stderr_log = dir.path().join("stderr.log");
        let uds = match extra.iter().position(|a| *a == "--uds") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => dir.path().join("rankd.sock"),
        };
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--models")
            .arg(models)
            .args(["--http", "127.0.0.1:0"])
            .args(if extra.contains(&"--uds") {
                vec![]
            } else {
                vec!["--uds".into(), uds.clone().into_os_string()]
            })
            // Each daemon keeps its snapshots to itself (the default folder
            // is relative to the working directory, shared by every test).
            .args(if extra.contains(&"--snapshot-dir") {
                vec![]
            } else {
                vec![
                    "--snapshot-dir".into(),
                    dir.path().join("state").into_os_string(),
                ]
            })
            .args(extra)
            .env("RANKD_LOG", "info")
            // The test command exports ONNX Runtime's library for the tests
            // themselves; a daemon gets it only from a test's own flag.
            .env_remove("RANKD_ONNXRUNTIME_LIB")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .expect("starting rankd");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
        assert!(
            line.starts_with("ready: "),
            "no ready line; got {line:?}\n{log}"
        );
        let http = line
            .trim()
            .split("; ")
            .find(|p| p.starts_with("http://") || p.starts_with("https://"))
            .unwrap_or_else(|| panic!("no http address in {line:?}"))
            .to_string();
        Self {
            child,
            http,
            uds,
            stderr_log,
            _dir: dir,
            _turn: turn,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.http, path)
    }

    /// `host:port` of the HTTP listener, for raw TCP.
    pub fn addr(&self) -> String {
        self.http.trim_start_matches("http://").to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `wait` for the daemon to exit; its status if it did.
    pub fn wait_exit(&mut self, wait: std::time::Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + wait;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends `signal` (`TERM`, `KILL`) and waits up to `wait` for the exit;
    /// true if the daemon stopped.
    pub fn signal_and_wait(&mut self, signal: &str, wait: std::time::Duration) -> bool {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
        let until = std::time::Instant::now() + wait;
        while self.is_running() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rankd serve` run to completion with `args` (a start that must fail).
pub fn serve_output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rankd"))
        .arg("serve")
        .args(args)
        .output()
        .expect("running rankd serve")
}

// ---------------------------------------------------------------------------
// Derived repositories
// ---------------------------------------------------------------------------

/// A copy of a demo model.toml pointing at the demo files by absolute path,
/// with `edit` applied to the text, written as `<root>/<name>/1/model.toml`.
pub fn derived_model(root: &Path, name: &str, base: &str, edit: impl Fn(String) -> String) {
    derived_version(root, name, 1, base, edit);
}

/// As [`derived_model`], as version `version` (`<root>/<name>/<version>/`).
pub fn derived_version(
    root: &Path,
    name: &str,
    version: u64,
    base: &str,
    edit: impl Fn(String) -> String,
) {
    let demo = demo_models();
    let text = std::fs::read_to_string(demo.join(base).join("1/model.toml")).unwrap();
    let items = demo.join("catalogues/demo/items.safetensors");
    let weights = demo.join(base).join("1/weights.safetensors");
    let text = text
        .replace(
            "items = \"../../catalogues/demo/items.safetensors\"",
            &format!("items = {:?}", items.to_str().unwrap()),
        )
        .replace(
            "weights = \"weights.safetensors\"",
            &format!("weights = {:?}", weights.to_str().unwrap()),
        );
    let text = edit(text)
        .lines()
        .filter(|l| !l.starts_with("[demo]") && !l.starts_with("seed ="))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = root.join(name).join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.toml"), text).unwrap();
}

/// A repository with `demo` and `slow`, a copy of it whose batches wait
/// `delay_us` for company and whose queue holds `queue` requests.
pub fn slow_repo(delay_us: u64, queue: usize) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    derived_model(root.path(), "demo", "demo", |t| t);
    derived_model(root.path(), "slow", "demo", move |t| {
        let edited = t
            .replace(
                "max_queue_delay_us = 500",
                &format!("max_queue_delay_us = {delay_us}"),
            )
            .replace(
                "max_queue_size = 1024",
                &format!("max_queue_size = {queue}"),
            );
        assert_ne!(edited, t, "the demo batching settings moved");
        // Its tests are about queueing: users without state queue too.
        format!("cold_start = \"model\"\n{edited}")
    });
    root
}

/// One tensor for [`write_tensors`]: name, safetensors dtype, shape and its
/// little-endian bytes.
pub type RawTensor<'a> = (&'a str, &'static str, Vec<usize>, Vec<u8>);

/// Writes `tensors` as a safetensors file (the header padded to 8 bytes),
/// creating its folder.
pub fn write_tensors(path: &Path, tensors: &[RawTensor<'_>]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        let end = offset + bytes.len();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, out).unwrap();
}

/// Writes `tensors` (name, shape, f32 values) as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let raw: Vec<RawTensor<'_>> = tensors
        .iter()
        .map(|(name, shape, values)| {
            assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (*name, "F32", shape.clone(), bytes)
        })
        .collect();
    write_tensors(path, &raw);
}

/// Writes an item table (`ids` u64 [N], `embeddings` f32 [N, dim]).
pub fn write_item_table(path: &Path, ids: &[u64], dim: usize, embeddings: &[f32]) {
    let n = ids.len();
    assert_eq!(embeddings.len(), n * dim);
    write_tensors(
        path,
        &[
            (
                "ids",
                "U64",
                vec![n],
                ids.iter().flat_map(|id| id.to_le_bytes()).collect(),
            ),
            (
                "embeddings",
                "F32",
                vec![n, dim],
                embeddings.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ],
    );
}

/// Writes integer attribute columns (`I64` [N] each) as a safetensors file.
pub fn write_attributes(path: &Path, columns: &[(&str, Vec<i64>)]) {
    let raw: Vec<RawTensor<'_>> = columns
        .iter()
        .map(|(name, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (*name, "I64", vec![values.len()], bytes)
        })
        .collect();
    write_tensors(path, &raw);
}

/// A repository with two catalogues of the demo's dimension, `videos` and
/// `creators` (copies of the demo table), and a two-tower model on each,
/// named after its catalogue.
pub fn two_catalogue_repo() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let demo = demo_models().join("catalogues/demo/items.safetensors");
    for name in ["videos", "creators"] {
        let dir = root.path().join("catalogues").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&demo, dir.join("items.safetensors")).unwrap();
        derived_model(root.path(), name, "demo", |t| {
            let items = t
                .lines()
                .find(|l| l.starts_with("items = "))
                .unwrap()
                .to_string();
            t.replace(&items, &format!("catalogue = \"{name}\""))
        });
    }
    root
}

/// A repository with `heavy`: a ranker over the demo catalogue whose tower
/// has three layers of `hidden` units, so that a batch of 1,000 candidates
/// takes long enough on a CPU (about 70 GFLOP at 4,096) to stand for a
/// slow model.
pub fn heavy_ranker_repo(hidden: usize) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let weights = root.path().join("heavy-weights.safetensors");
    // The demo ranker's input: [history ‖ features ‖ item ‖ history ⊙ item].
    let input = 3 * 64 + 16;
    let mut rng = crate::common::Rng::new(0x0068_6561_7679);
    let mut noise = |n: usize, scale: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.uniform() - 0.5) * scale) as f32)
            .collect()
    };
    let layers = [
        (
            "tower.0.weight",
            vec![hidden, input],
            noise(hidden * input, 0.2),
        ),
        ("tower.0.bias", vec![hidden], noise(hidden, 0.02)),
        (
            "tower.1.weight",
            vec![hidden, hidden],
            noise(hidden * hidden, 0.05),
        ),
        ("tower.1.bias", vec![hidden], noise(hidden, 0.02)),
        (
            "tower.2.weight",
            vec![hidden, hidden],
            noise(hidden * hidden, 0.05),
        ),
        ("tower.2.bias", vec![hidden], noise(hidden, 0.02)),
        ("tower.3.weight", vec![1, hidden], noise(hidden, 0.05)),
        ("tower.3.bias", vec![1], vec![0.0]),
    ];
    write_safetensors(&weights, &layers);
    let demo_weights = demo_models().join("demo-ranker/1/weights.safetensors");
    derived_model(root.path(), "heavy", "demo-ranker", |t| {
        t.replace(
            &format!("weights = {:?}", demo_weights.to_str().unwrap()),
            &format!("weights = {:?}", weights.to_str().unwrap()),
        )
    });
    root
}
