//! Test harness: starts the real `rankd` binary on a free port (and socket
//! path) and talks to it as a client would.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

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

pub struct Daemon {
    child: Child,
    pub http: String,
    /// The daemon's socket (in its temporary folder).
    pub uds: PathBuf,
    pub stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// `rankd serve` on the demo repository.
    pub fn start() -> Self {
        Self::start_with(&demo_models(), &[])
    }

    pub fn start_with(models: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stderr_log = dir.path().join("stderr.log");
        let uds = match extra.iter().position(|a| *a == "--uds") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => dir.path().join("rankd.sock"),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_rankd"))
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
            .find(|p| p.starts_with("http://"))
            .unwrap_or_else(|| panic!("no http address in {line:?}"))
            .to_string();
        Self {
            child,
            http,
            uds,
            stderr_log,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.http, path)
    }

    pub fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs JSON and returns (status, body as JSON or Null).
pub async fn post(
    c: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

pub async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A copy of a demo model.toml pointing at the demo files by absolute path,
/// with `edit` applied to the text, written as `<root>/<name>/1/model.toml`.
pub fn derived_model(root: &Path, name: &str, base: &str, edit: impl Fn(String) -> String) {
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
    let dir = root.join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.toml"), text).unwrap();
}
pub mod kafka;
