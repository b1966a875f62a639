//! `rankd bench`: the load generator every performance figure of rankd is
//! measured with. Closed loop (`--concurrency N` callers, each waiting for its
//! answer) or open loop (`--rate R` Poisson arrivals; latency counts from the
//! scheduled send time, so a slow server cannot hide queueing behind a slower
//! sender), over the socket or HTTP, against a running daemon or one it starts.

pub mod report;
pub mod workload;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use rankd::internals::Rng;
use rankd_client::types::UserRequest;
use rankd_client::{Client, ClientError, HttpClient, UdsClient};
pub use report::{Figures, Report};
use workload::{Call, OpKind, Workload, Zipf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Uds,
    Http,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Transport to drive
    #[arg(long, value_enum, default_value = "uds")]
    pub transport: Transport,
    /// Socket of a running daemon
    #[arg(long, default_value = "./rankd.sock", value_name = "PATH")]
    pub uds: PathBuf,
    /// HTTP base URL of a running daemon (also where /metrics is read)
    #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
    pub http: String,
    /// Start a daemon on this model repository for the run instead of using a running one
    #[arg(long, value_name = "DIR")]
    pub start: Option<PathBuf>,
    /// Operation to send
    #[arg(long, value_enum, default_value = "recommend")]
    pub op: OpKind,
    /// Model to call
    #[arg(long, default_value = "demo")]
    pub model: String,
    /// Closed loop: this many callers, each waiting for its answer [default: 32]
    #[arg(long, conflicts_with_all = ["rate", "sweep"])]
    pub concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second
    #[arg(long, conflicts_with = "sweep")]
    pub rate: Option<f64>,
    /// Open loop at each of these rates in turn, e.g. 500,1000,2000
    #[arg(long, value_delimiter = ',')]
    pub sweep: Option<Vec<f64>>,
    /// Length of each run, e.g. 10s or 500ms
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many requests instead (closed loop)
    #[arg(long)]
    pub requests: Option<u64>,
    /// Socket connections to spread the callers over (the socket pipelines many calls on one)
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Distinct users in the population
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    /// Before measuring, give the N most frequent users of the population a
    /// history (written through the daemon's API); 0 measures users without
    /// state, whose query is the tower of a zero input
    #[arg(long, default_value_t = 10_000)]
    pub populate: u64,
    /// item_id,cluster CSV that --populate draws histories from (one or two
    /// clusters per user, like the demo's users) [default: the demo
    /// catalogue's clusters.csv under --start, when there is one]
    #[arg(long, value_name = "FILE")]
    pub clusters: Option<PathBuf>,
    /// Longest history written by --populate
    #[arg(long, default_value_t = 50)]
    pub history_len: usize,
    /// Fraction of calls (0–1) that are a click instead: the drawn user
    /// engages with one more item (a random id), their stored history gains
    /// it (the newest --history-len kept) and is written through the API, so
    /// the user's next answer must see it. 0.2 is a replay where a user asks
    /// about four times between clicks
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub clicks: f64,
    /// Zipf exponent of user popularity
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// k of recommend requests
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Candidates per score request
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    /// Candidate ids are drawn from 1..=ITEMS
    #[arg(long, default_value_t = 100_000)]
    pub items: u64,
    /// timeout_ms sent with each request
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Seed of the request mix
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Untimed warm-up before each run
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Write the figures as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw latency percentiles against offered load (with --sweep) as SVG
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
    /// Recommend with this filter (JSON: attribute → value or list of
    /// values), e.g. '{"in_stock": 1}'
    #[arg(long, value_name = "JSON", value_parser = parse_filter)]
    pub filter: Option<rankd_client::types::Filter>,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("--clicks takes a fraction from 0 to 1, got '{s}'")),
    }
}

fn parse_filter(s: &str) -> Result<rankd_client::types::Filter, String> {
    serde_json::from_str(s)
        .map_err(|e| format!("--filter takes a JSON object of attribute → value(s): {e}"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("duration must look like 10s, 500ms or 2m, got '{s}'"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => {
            return Err(format!(
                "unknown duration unit '{unit}' in '{s}' (use ms, s or m)"
            ))
        }
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("duration must be >= 0, got '{s}'"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One run's raw results.
struct Recorder {
    latency: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    ok: AtomicU64,
}

impl Recorder {
    fn new() -> Self {
        Self {
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
            ),
            errors: Mutex::new(BTreeMap::new()),
            ok: AtomicU64::new(0),
        }
    }

    fn record(&self, latency: Duration, result: Result<(), ClientError>) {
        let ns = (latency.as_nanos() as u64).clamp(1, 60_000_000_000);
        self.latency
            .lock()
            .expect("histogram lock")
            .saturating_record(ns);
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                *self
                    .errors
                    .lock()
                    .expect("errors lock")
                    .entry(e.kind().to_string())
                    .or_default() += 1;
            }
        }
    }
}

async fn call<C: Client>(client: &C, model: &str, c: Call) -> Result<(), ClientError> {
    match c {
        Call::Recommend(r) => client.recommend(model, r).await.map(|_| ()),
        Call::Score(r) => client.score(model, r).await.map(|_| ()),
        Call::Health => client.health().await.map(|_| ()),
        Call::UpsertUser(id, r) => client.upsert_user(id, r).await.map(|_| ()),
    }
}

/// A daemon started for the run; killed when dropped.
struct Started {
    child: std::process::Child,
    http: String,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(models: &std::path::Path) -> anyhow::Result<Started> {
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("rankd.sock");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg("--models")
        .arg(models)
        .args(["--http", "127.0.0.1:0", "--uds"])
        .arg(&uds)
        .arg("--snapshot-dir")
        .arg(dir.path().join("state"))
        .env("RANKD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting rankd serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    let http = line
        .trim()
        .split("; ")
        .find(|p| p.starts_with("http://"))
        .with_context(|| format!("the daemon did not start: {line:?}"))?
        .to_string();
    Ok(Started {
        child,
        http,
        uds,
        _dir: dir,
    })
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<Vec<Report>> {
    let _started = match &args.start {
        Some(models) => {
            let s = start_daemon(models)?;
            args.http = s.http.clone();
            args.uds = s.uds.clone();
            Some(s)
        }
        None => None,
    };
    let workload = Arc::new(Workload {
        op: args.op,
        zipf: Zipf::new(args.users.max(1), args.zipf),
        k: args.k,
        candidates: args.candidates,
        items: args.items.max(1),
        timeout_ms: args.timeout_ms,
        filter: args.filter.clone(),
        clicks: args.clicks,
        history_len: args.history_len.max(1),
        histories: Default::default(),
    });
    let mut reports = match args.transport {
        Transport::Uds => {
            let mut clients = Vec::new();
            for _ in 0..args.connections.max(1) {
                clients.push(UdsClient::connect(&args.uds).await.with_context(|| {
                    format!(
                        "connecting to {} (is rankd running with --uds?)",
                        args.uds.display()
                    )
                })?);
            }
            populate(&args, &clients[0], &workload).await?;
            run_all(&args, &clients, &workload).await?
        }
        Transport::Http => {
            let clients = vec![HttpClient::new(&args.http); args.connections.max(1)];
            populate(&args, &clients[0], &workload).await?;
            run_all(&args, &clients, &workload).await?
        }
    };
    let populated = args.populate.min(args.users);
    for r in &mut reports {
        r.populated_users = populated;
    }
    for r in &reports {
        println!("{}", r.table());
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&reports)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        report::plot(&reports, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(reports)
}

/// The clusters' members from an `item_id,cluster` CSV (a header line).
fn read_clusters(path: &Path) -> anyhow::Result<Vec<Vec<u64>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --clusters {}", path.display()))?;
    let mut members: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let parsed = line
            .split_once(',')
            .and_then(|(item, c)| Some((item.trim().parse().ok()?, c.trim().parse().ok()?)));
        let Some((item, cluster)) = parsed else {
            anyhow::bail!(
                "{} line {}: expected item_id,cluster, got {line:?}",
                path.display(),
                i + 1
            );
        };
        members.entry(cluster).or_default().push(item);
    }
    anyhow::ensure!(!members.is_empty(), "{}: no clusters", path.display());
    Ok(members.into_values().collect())
}

/// Writes a history for each of the `--populate` most frequent users, of a
/// length spread over 1..=`--history-len`: items of one or two clusters
/// (from `--clusters`, or the demo catalogue's), or without a clusters
/// file, one or two runs of item ids seven apart.
async fn populate<C: Client>(args: &BenchArgs, client: &C, w: &Workload) -> anyhow::Result<()> {
    let n = args.populate.min(args.users);
    if n == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let file = args.clusters.clone().or_else(|| {
        let demo = args.start.as_ref()?.join("catalogues/demo/clusters.csv");
        demo.exists().then_some(demo)
    });
    let clusters = file.as_deref().map(read_clusters).transpose()?;
    let mut rng = Rng::new(args.seed ^ 0x9090);
    let mut pending = Vec::new();
    for rank in 1..=n {
        let user_id = w.user_of_rank(rank);
        let len = 1 + rng.below(args.history_len.max(1) as u64) as usize;
        let runs = 1 + rng.below(2) as usize;
        let mut history = Vec::with_capacity(len);
        for run in 0..runs {
            let take = if run + 1 == runs {
                len - history.len()
            } else {
                len / runs
            };
            match &clusters {
                Some(c) => {
                    let members = &c[rng.below(c.len() as u64) as usize];
                    history.extend(
                        (0..take).map(|_| members[rng.below(members.len() as u64) as usize]),
                    );
                }
                None => {
                    let start = 1 + rng.below(w.items);
                    history.extend((0..take as u64).map(|i| 1 + (start + i * 7) % w.items));
                }
            }
        }
        if w.clicks > 0.0 {
            w.remember(user_id, &history);
        }
        let c = client.clone();
        pending.push(tokio::spawn(async move {
            c.upsert_user(
                user_id,
                UserRequest {
                    history: Some(history),
                    features: None,
                    sparse: None,
                },
            )
            .await
        }));
        if pending.len() == 256 || rank == n {
            for p in pending.drain(..) {
                p.await?
                    .map_err(|e| anyhow::anyhow!("writing a user history for --populate: {e}"))?;
            }
        }
    }
    eprintln!(
        "populated {n} users with histories in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        match &file {
            Some(f) => format!("items of one or two clusters of {}", f.display()),
            None => "runs of item ids: no clusters file".to_string(),
        }
    );
    Ok(())
}

async fn run_all<C: Client>(
    args: &BenchArgs,
    clients: &[C],
    workload: &Arc<Workload>,
) -> anyhow::Result<Vec<Report>> {
    let loads: Vec<Load> = match (&args.sweep, args.rate, args.concurrency) {
        (Some(rates), _, _) => rates.iter().map(|&r| Load::Open(r)).collect(),
        (None, Some(r), _) => vec![Load::Open(r)],
        (None, None, c) => vec![Load::Closed(c.unwrap_or(32))],
    };
    for load in &loads {
        if let Load::Open(r) = load {
            anyhow::ensure!(r.is_finite() && *r > 0.0, "rate must be > 0, got {r}");
        }
        if let Load::Closed(0) = load {
            anyhow::bail!("concurrency must be > 0, got 0");
        }
    }
    let mut reports = Vec::new();
    for (i, load) in loads.iter().enumerate() {
        if !args.warmup.is_zero() {
            drive(
                args,
                clients,
                workload,
                *load,
                args.warmup,
                None,
                args.seed ^ 0xABCD,
                true,
            )
            .await;
        }
        let before = report::scrape_batches(&args.http, &args.model).await;
        let started = Instant::now();
        let rec = drive(
            args,
            clients,
            workload,
            *load,
            args.duration,
            args.requests,
            args.seed + i as u64,
            args.quiet,
        )
        .await;
        let elapsed = started.elapsed();
        let after = report::scrape_batches(&args.http, &args.model).await;
        reports.push(Report::new(args, *load, elapsed, &rec, before, after));
    }
    Ok(reports)
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Callers, each with one request outstanding.
    Closed(usize),
    /// Offered requests per second.
    Open(f64),
}

#[allow(clippy::too_many_arguments)]
async fn drive<C: Client>(
    args: &BenchArgs,
    clients: &[C],
    workload: &Arc<Workload>,
    load: Load,
    duration: Duration,
    limit: Option<u64>,
    seed: u64,
    quiet: bool,
) -> Arc<Recorder> {
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let bar = (!quiet).then(|| report::progress(duration, load));
    let deadline = Instant::now() + duration;
    match load {
        Load::Closed(n) => {
            let tasks: Vec<_> = (0..n)
                .map(|w| {
                    let (client, model) = (clients[w % clients.len()].clone(), args.model.clone());
                    let (rec, stop, sent, workload) =
                        (rec.clone(), stop.clone(), sent.clone(), workload.clone());
                    tokio::spawn(async move {
                        let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(w as u64));
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            if limit.is_some_and(|l| sent.fetch_add(1, Ordering::Relaxed) >= l) {
                                break;
                            }
                            let c = workload.next(&mut rng);
                            let t = Instant::now();
                            let r = call(&client, &model, c).await;
                            rec.record(t.elapsed(), r);
                        }
                    })
                })
                .collect();
            let ticker = report::tick(bar.clone(), rec.clone(), stop.clone());
            for t in tasks {
                let _ = t.await;
            }
            stop.store(true, Ordering::Relaxed);
            let _ = ticker.await;
        }
        Load::Open(rate) => {
            let mut rng = Rng::new(seed);
            let ticker = report::tick(bar.clone(), rec.clone(), stop.clone());
            let start = Instant::now();
            let mut next = start;
            let mut i = 0usize;
            let mut inflight = Vec::new();
            while next < deadline {
                // Exponential gaps make a Poisson process.
                let gap = -(1.0 - rng.uniform()).ln() / rate;
                next += Duration::from_secs_f64(gap);
                if next >= deadline {
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
                let c = workload.next(&mut rng);
                let (client, model, rec) = (
                    clients[i % clients.len()].clone(),
                    args.model.clone(),
                    rec.clone(),
                );
                i += 1;
                let scheduled = next;
                inflight.push(tokio::spawn(async move {
                    let r = call(&client, &model, c).await;
                    rec.record(scheduled.elapsed(), r);
                }));
                if inflight.len() >= 4096 {
                    inflight.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                }
            }
            for t in inflight {
                let _ = t.await;
            }
            stop.store(true, Ordering::Relaxed);
            let _ = ticker.await;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    rec
}
