//! The processes a round starts, `rankd serve` and `rankd bench`: each is
//! killed and reaped when its guard drops, and its pid appended to `--pids`
//! so that benches/ingest.sh can kill it if this program dies first.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::round::RunArgs;

/// Kills and reaps the child when dropped.
pub struct Guard {
    pub child: Child,
    pub name: &'static str,
}

impl Guard {
    pub fn spawn(cmd: &mut Command, name: &'static str, pids: Option<&Path>) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        if let Some(p) = pids {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            writeln!(f, "{}", child.id())?;
        }
        Ok(Self { child, name })
    }

    /// Waits up to `within` for the child to exit by itself.
    pub fn wait(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} did not finish within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Rankd {
    pub pid: u32,
    /// Kills the daemon when the handle drops.
    pub _guard: Guard,
    pub http: String,
    pub uds: PathBuf,
    pub started_at: Instant,
    pub ready_at: Instant,
    pub startup_secs: f64,
}

pub fn start_rankd(a: &RunArgs, log: &Path, commands: &mut Vec<String>) -> Result<Rankd> {
    let uds = a.workdir.join("rankd.sock");
    let state = a.workdir.join("state");
    let args: Vec<String> = vec![
        "serve".into(),
        "--models".into(),
        a.models.display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--uds".into(),
        uds.display().to_string(),
        "--snapshot-dir".into(),
        state.display().to_string(),
        "--kafka-brokers".into(),
        a.brokers.clone(),
        "--device".into(),
        "cpu".into(),
    ];
    let mut args = args;
    args.extend(a.rankd_arg.iter().cloned());
    commands.push(format!("{} {}", a.rankd.display(), args.join(" ")));
    let started = Instant::now();
    let mut guard = Guard::spawn(
        Command::new(&a.rankd)
            .args(&args)
            .env("RANKD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?),
        "rankd serve",
        a.pids.as_deref(),
    )?;
    let stdout = guard.child.stdout.take().context("piped stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep reading so the daemon never writes into a closed pipe.
        let mut sink = String::new();
        while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .context("no ready line from rankd within 120 s")?;
    let ready_at = Instant::now();
    ensure!(
        line.starts_with("ready: "),
        "rankd did not start: {line:?}\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let http = line
        .trim()
        .split("; ")
        .find(|p| p.starts_with("http://"))
        .with_context(|| format!("no http address in {line:?}"))?
        .to_string();
    Ok(Rankd {
        pid: guard.child.id(),
        _guard: guard,
        http,
        uds,
        started_at: started,
        ready_at,
        startup_secs: (ready_at - started).as_secs_f64(),
    })
}

pub fn bench_json(path: &Path) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(v[0].clone())
}

/// `rankd bench` against the daemon (`target` = its socket and URL, or `--start`).
pub fn run_bench(
    a: &RunArgs,
    target: &[String],
    load: &[&str],
    tag: &str,
    commands: &mut Vec<String>,
) -> Result<serde_json::Value> {
    let json = a.workdir.join(format!("bench-{tag}.json"));
    let mut args: Vec<String> = vec!["bench".into(), "--transport".into(), "uds".into()];
    args.extend(target.iter().cloned());
    args.extend(load.iter().map(|s| s.to_string()));
    args.extend([
        "--json".into(),
        json.display().to_string(),
        "--quiet".into(),
    ]);
    commands.push(format!("{} {}", a.rankd.display(), args.join(" ")));
    let mut g = Guard::spawn(
        Command::new(&a.rankd)
            .args(&args)
            .env("RANKD_LOG", "warn")
            .stdout(std::fs::File::create(
                a.workdir.join(format!("bench-{tag}.txt")),
            )?)
            .stderr(Stdio::inherit()),
        "rankd bench",
        a.pids.as_deref(),
    )?;
    let status = g.wait(Duration::from_secs(180))?;
    ensure!(status.success(), "rankd bench {tag} failed: {status}");
    bench_json(&json)
}

pub fn daemon_target(r: &Rankd) -> Vec<String> {
    vec![
        "--uds".into(),
        r.uds.display().to_string(),
        "--http".into(),
        r.http.clone(),
    ]
}
