//! What `rankd bench` prints and writes: a table per run, JSON figures, an SVG
//! of latency percentiles against offered load, and the batch sizes the daemon
//! formed (read from its /metrics before and after the run).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::workload::OpKind;
use super::{BenchArgs, Load, Recorder, Transport};

#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Batches {
    pub batches: f64,
    /// Mean requests per batch the daemon executed during the run.
    pub mean_requests: f64,
    /// Seconds the executor spent running this model's batches on the
    /// backend (towers and scoring) during the run.
    pub execution_seconds: f64,
    /// Requests per second the backend alone sustains at this mean batch
    /// size: requests executed / execution seconds.
    pub kernel_rps: f64,
    /// Requests per second answered by the model (executed in batches; a
    /// cold-start answer comes from the popular items, outside batches).
    pub executed_rps: f64,
    /// `executed_rps` as a share of `kernel_rps`: the share of the run's
    /// wall time the executor spent executing.
    pub serving_vs_kernel: f64,
}

/// Counters read from the daemon's /metrics for one model.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Scraped {
    /// Requests in executed batches (`rankd_batch_requests_sum`).
    requests: f64,
    /// Batches executed (`rankd_batch_requests_count`).
    batches: f64,
    /// `rankd_batch_execution_seconds_sum` over every version and device.
    execution_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub transport: Transport,
    pub op: OpKind,
    pub model: String,
    pub load: Load,
    pub seconds: f64,
    pub requests: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub throughput_rps: f64,
    /// Latency in microseconds.
    pub latency_us: Figures,
    pub batches: Option<Batches>,
    /// Users given a history before the run (`--populate`).
    pub populated_users: u64,
}

impl Report {
    pub(super) fn new(
        args: &BenchArgs,
        load: Load,
        elapsed: Duration,
        rec: &Recorder,
        before: Option<Scraped>,
        after: Option<Scraped>,
    ) -> Self {
        let h = rec.latency.lock().expect("histogram lock");
        let us = |ns: u64| ns as f64 / 1000.0;
        let errors = rec.errors.lock().expect("errors lock").clone();
        let requests = h.len();
        let wall = elapsed.as_secs_f64().max(1e-9);
        let throughput = requests as f64 / wall;
        let batches = match (before, after) {
            (Some(b), Some(a)) => {
                let (n, executed) = (a.batches - b.batches, a.requests - b.requests);
                let execution_seconds = a.execution_seconds - b.execution_seconds;
                let kernel_rps = if execution_seconds > 0.0 {
                    executed / execution_seconds
                } else {
                    0.0
                };
                Some(Batches {
                    batches: n,
                    mean_requests: if n > 0.0 { executed / n } else { 0.0 },
                    execution_seconds,
                    kernel_rps,
                    executed_rps: executed / wall,
                    serving_vs_kernel: if kernel_rps > 0.0 {
                        executed / wall / kernel_rps
                    } else {
                        0.0
                    },
                })
            }
            _ => None,
        };
        Self {
            transport: args.transport,
            op: args.op,
            model: args.model.clone(),
            load,
            seconds: elapsed.as_secs_f64(),
            requests,
            ok: rec.ok.load(Ordering::Relaxed),
            errors,
            throughput_rps: throughput,
            latency_us: Figures {
                p50: us(h.value_at_quantile(0.5)),
                p90: us(h.value_at_quantile(0.9)),
                p99: us(h.value_at_quantile(0.99)),
                p999: us(h.value_at_quantile(0.999)),
                max: us(h.max()),
                mean: h.mean() / 1000.0,
            },
            batches,
            populated_users: 0,
        }
    }

    pub fn table(&self) -> String {
        let load = match self.load {
            Load::Closed(n) => format!("closed loop, concurrency {n}"),
            Load::Open(r) => format!("open loop, {r:.0} req/s offered"),
        };
        let transport = match self.transport {
            Transport::Uds => "uds",
            Transport::Http => "http",
        };
        let op = serde_json::to_value(self.op)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let l = &self.latency_us;
        let mut t = format!(
            "rankd bench: {op} on {} over {transport}, {load}, {:.1} s, {} users with a history\n\
             {:>10} {:>10} {:>10} {:>12}\n\
             {:>10} {:>10} {:>10} {:>12.1}\n\
             latency µs {:>9} {:>9} {:>9} {:>9} {:>9}\n\
             {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
            self.model,
            self.seconds,
            self.populated_users,
            "requests",
            "ok",
            "errors",
            "req/s",
            self.requests,
            self.ok,
            self.requests - self.ok,
            self.throughput_rps,
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "",
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
        );
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            t.push_str(&format!("errors by type: {}\n", list.join(", ")));
        }
        match &self.batches {
            Some(b) if b.batches == 0.0 => t.push_str(
                "daemon batches: none (every answer came from outside a batch: cold starts)\n",
            ),
            Some(b) => t.push_str(&format!(
                "daemon batches: {:.0}, mean {:.1} requests per batch\n\
                 model answers: {:.0} req/s (the rest cold starts); the backend alone at this \
                 batch size: {:.0} req/s ({:.2} s executing of {:.2} s); served {:.1}% of it\n",
                b.batches,
                b.mean_requests,
                b.executed_rps,
                b.kernel_rps,
                b.execution_seconds,
                self.seconds,
                100.0 * b.serving_vs_kernel
            )),
            None => t.push_str("daemon batches: not read (no /metrics at --http)\n"),
        }
        t
    }
}

/// `model`'s batch counters, from /metrics.
pub(super) async fn scrape_batches(http: &str, model: &str) -> Option<Scraped> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let text = client
        .get(format!("{}/metrics", http.trim_end_matches('/')))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| -> Option<f64> {
        let prefix = format!("{name}{{model=\"{model}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    };
    let label = format!("model=\"{model}\"");
    let execution_seconds = text
        .lines()
        .filter_map(|l| l.strip_prefix("rankd_batch_execution_seconds_sum{"))
        .filter_map(|l| l.split_once("} "))
        .filter(|(labels, _)| labels.split(',').any(|kv| kv == label))
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum();
    Some(Scraped {
        requests: value("rankd_batch_requests_sum").unwrap_or(0.0),
        batches: value("rankd_batch_requests_count").unwrap_or(0.0),
        execution_seconds,
    })
}

pub(super) fn progress(duration: Duration, load: Load) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("valid template"),
    );
    bar.set_message(match load {
        Load::Closed(n) => format!("concurrency {n}"),
        Load::Open(r) => format!("{r:.0} req/s"),
    });
    bar
}

/// Updates the bar every 100 ms with the requests so far.
pub(super) fn tick(
    bar: Option<ProgressBar>,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(bar) = bar else { return };
        let start = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = rec.latency.lock().expect("histogram lock").len();
            bar.set_position(start.elapsed().as_millis() as u64);
            bar.set_message(format!(
                "{n} requests, {:.0} req/s",
                n as f64 / start.elapsed().as_secs_f64()
            ));
        }
    })
}

/// Latency percentiles (ms) against offered load, one line per percentile.
pub fn plot(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let points: Vec<(f64, &Figures)> = reports
        .iter()
        .map(|r| {
            let x = match r.load {
                Load::Open(rate) => rate,
                Load::Closed(_) => r.throughput_rps,
            };
            (x, &r.latency_us)
        })
        .collect();
    anyhow::ensure!(!points.is_empty(), "nothing to plot");
    let x_max = points.iter().map(|p| p.0).fold(0.0, f64::max) * 1.05;
    let y_max = points.iter().map(|p| p.1.p999 / 1000.0).fold(0.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("rankd: latency against offered load", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max.max(1.0), 0.0..y_max.max(0.1))?;
    chart
        .configure_mesh()
        .x_desc("offered load (requests/s)")
        .y_desc("latency (ms)")
        .draw()?;
    type Series = (&'static str, fn(&Figures) -> f64, RGBColor);
    let series: [Series; 4] = [
        ("p50", |f| f.p50, BLUE),
        ("p90", |f| f.p90, GREEN),
        ("p99", |f| f.p99, RED),
        ("p99.9", |f| f.p999, BLACK),
    ];
    for (name, get, color) in series {
        let line: Vec<(f64, f64)> = points.iter().map(|(x, f)| (*x, get(f) / 1000.0)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
