//! One round (`ingest_bench run`): targets 2-4 in order against one broker
//! and one rankd, each a named step, then the round's figures as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rankd::internals::Rng;
use rdkafka::producer::Producer;

use super::broker::{produce_paced, producer, send};
use super::consume::{plain_consume, probe, rate_between};
use super::cpu::{loadavg, CpuMeter};
use super::figures::{BenchRun, Consume, Freshness, Probe, Round};
use super::mix::{Mix, Msg};
use super::process::{daemon_target, run_bench, start_rankd, Rankd};
use super::report::table;
use super::scrape::{freshness_between, wait_applied, Http};
use super::{EVENTS, NA};

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    #[arg(long)]
    pub brokers: String,
    #[arg(long, default_value = "target/release/rankd")]
    pub rankd: PathBuf,
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Where rankd's socket, snapshots and logs go
    #[arg(long)]
    pub workdir: PathBuf,
    /// The round's figures (JSON)
    #[arg(long)]
    pub out: PathBuf,
    /// Pids of started processes are appended here
    #[arg(long)]
    pub pids: Option<PathBuf>,
    /// The broker's pid, for CPU accounting
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Events for the catch-up measurement (target 2)
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Paced update rate for targets 3 and 4
    #[arg(long, default_value_t = 5000.0)]
    pub update_rate: f64,
    /// Length of the paced freshness run (target 3)
    #[arg(long, default_value_t = 10.0)]
    pub fresh_secs: f64,
    /// Open-loop recommend rates of the p99 comparison (target 4): numbers,
    /// or `half` for half the measured closed-loop saturation
    #[arg(long, value_delimiter = ',', default_value = "half,1800")]
    pub bench_rates: Vec<String>,
    /// Duration of each `rankd bench` run
    #[arg(long, default_value = "10s")]
    pub bench_duration: String,
    /// Without/with-ingestion pairs of `rankd bench` runs
    #[arg(long, default_value_t = 2)]
    pub bench_pairs: usize,
    /// Extra `rankd serve` arguments, for experiments (repeat the flag:
    /// --rankd-arg=--snapshot-interval-ms --rankd-arg=600000)
    #[arg(long, allow_hyphen_values = true)]
    pub rankd_arg: Vec<String>,
    /// Closed-loop saturation probe before target 4 (0 skips it)
    #[arg(long, default_value_t = 5)]
    pub saturation_secs: u64,
}

/// What the steps of a round share.
struct Steps<'a> {
    a: &'a RunArgs,
    http: Http,
    /// The round's name (the `--out` file's stem), in every line printed.
    label: String,
    /// Every rankd command run, for the figures.
    commands: Vec<String>,
    /// Messages produced to rankd's topics so far (target 2's events, then
    /// each paced run's), which it must have applied after each step.
    expected: BTreeMap<String, i64>,
}

pub fn run(a: RunArgs) -> Result<()> {
    std::fs::create_dir_all(&a.workdir)?;
    let mut s = Steps {
        a: &a,
        http: Http::new()?,
        label: a
            .out
            .file_stem()
            .map_or("round".into(), |s| s.to_string_lossy().into_owned()),
        commands: Vec::new(),
        expected: [(EVENTS.to_string(), a.messages as i64)].into(),
    };

    let saturation_no_kafka_rps = s.saturation_without_kafka()?;

    // Target 2: the same N events read by a plain consumer and by rankd.
    let (mut mix, produce_secs) = s.produce_events()?;
    let mut plain = vec![s.plain_read(1, false, None)?];
    eprintln!("[{}] plain consumer: {:?}", s.label, plain[0]);
    let probes = s.latency_probes()?;
    let r = start_rankd(&a, &a.workdir.join("rankd.log"), &mut s.commands)?;
    let rankd_consume = s.rankd_catch_up(&r)?;
    plain.push(s.plain_read(2, false, Some(&r))?);
    eprintln!("[{}] plain consumer again: {:?}", s.label, plain[1]);
    // Not in the ratio: the same read with rankd's consumer settings and its
    // 9 partitions, to tell the consumer's shape from rankd's own work.
    let plain_like_rankd = s.plain_read(3, true, Some(&r))?;
    eprintln!(
        "[{}] plain consumer like rankd: {plain_like_rankd:?}",
        s.label
    );

    let (freshness, freshness_rankd) = s.paced_freshness(&r, &mut mix)?;

    // Target 4: recommend p99 without and with ingestion.
    let target = daemon_target(&r);
    let saturation_rps = s.saturation(&target)?;
    let rates = bench_rates(&a.bench_rates, saturation_rps)?;
    let bench = s.bench_pairs(&r, &target, &rates, mix.version + 1_000_000_000)?;
    let startup_secs = r.startup_secs;
    drop(r);

    let round = Round {
        label: s.label,
        messages: a.messages,
        produce_secs,
        produce_rate: a.messages as f64 / produce_secs,
        plain,
        plain_like_rankd: Some(plain_like_rankd),
        rankd: rankd_consume,
        rankd_startup_secs: startup_secs,
        freshness,
        freshness_rankd: Some(freshness_rankd),
        probes,
        saturation_no_kafka_rps,
        saturation_rps,
        bench,
        commands: s.commands,
    };
    std::fs::write(&a.out, serde_json::to_vec_pretty(&round)?)?;
    println!("{}", table(std::slice::from_ref(&round)));
    Ok(())
}

/// The open-loop rates of target 4: `half` is half the closed-loop
/// saturation (rounded to 50/s; left out when it was not measured).
fn bench_rates(specs: &[String], saturation_rps: Option<f64>) -> Result<Vec<f64>> {
    let mut rates = Vec::new();
    for spec in specs {
        if spec == "half" {
            if let Some(sat) = saturation_rps {
                rates.push(((sat / 2.0) / 50.0).round() * 50.0);
            }
        } else {
            rates.push(
                spec.parse::<f64>()
                    .context("--bench-rates: half or a number")?,
            );
        }
    }
    Ok(rates)
}

impl Steps<'_> {
    /// Closed-loop recommend throughput (32 callers) of `rankd bench` against
    /// `target`, for `--saturation-secs` (None when that is 0).
    fn closed_loop(&mut self, target: &[String], tag: &str) -> Result<Option<f64>> {
        if self.a.saturation_secs == 0 {
            return Ok(None);
        }
        let dur = format!("{}s", self.a.saturation_secs);
        let v = run_bench(
            self.a,
            target,
            &["--concurrency", "32", "--duration", &dur],
            tag,
            &mut self.commands,
        )?;
        Ok(v["throughput_rps"].as_f64())
    }

    /// Reference: recommend saturation of a daemon without Kafka (broker idle).
    fn saturation_without_kafka(&mut self) -> Result<Option<f64>> {
        let target = vec!["--start".to_string(), self.a.models.display().to_string()];
        let rps = self.closed_loop(&target, "saturation-no-kafka")?;
        if self.a.saturation_secs > 0 {
            eprintln!(
                "[{}] saturation without Kafka (32 callers): {rps:?} req/s",
                self.label
            );
        }
        Ok(rps)
    }

    /// The measured rankd's saturation, consuming (idle) topics: what `half`
    /// of `--bench-rates` is half of.
    fn saturation(&mut self, target: &[String]) -> Result<Option<f64>> {
        let rps = self.closed_loop(target, "saturation")?;
        if self.a.saturation_secs > 0 {
            eprintln!("[{}] closed-loop saturation (32 callers, rankd consuming idle topics): {rps:?} req/s", self.label);
        }
        Ok(rps)
    }

    /// Target 2's input: `--messages` events to rankd.events, produced in
    /// bulk and all delivered. Returns the mix (its versions go on growing in
    /// the later steps) and the production time.
    fn produce_events(&mut self) -> Result<(Mix, f64)> {
        let (a, label) = (self.a, &self.label);
        eprintln!("[{label}] producing {} events to {EVENTS}", a.messages);
        let mut mix = Mix {
            rng: Rng::new(0x5EED ^ a.messages),
            version: 0,
        };
        let msgs: Vec<Msg> = (0..a.messages).map(|_| mix.event()).collect();
        let p = producer(&a.brokers, "5")?;
        let t = Instant::now();
        for m in &msgs {
            send(&p, m, None, None)?;
        }
        p.flush(Duration::from_secs(120))
            .context("flushing the bulk producer")?;
        let produce_secs = t.elapsed().as_secs_f64();
        let (ok, failed) = (
            p.context().ok.load(Ordering::Relaxed),
            p.context().failed.load(Ordering::Relaxed),
        );
        ensure!(
            ok == a.messages && failed == 0,
            "delivered {ok}, failed {failed}"
        );
        drop(p);
        drop(msgs);
        eprintln!(
            "[{label}] produced in {produce_secs:.2} s ({:.0}/s)",
            a.messages as f64 / produce_secs
        );
        Ok((mix, produce_secs))
    }

    /// Plain read number `n` of the events (group `bench-plain-LABEL-n`),
    /// with librdkafka's defaults or rankd's consumer settings.
    fn plain_read(&self, n: u32, like_rankd: bool, rankd: Option<&Rankd>) -> Result<Consume> {
        plain_consume(
            &self.a.brokers,
            EVENTS,
            self.a.messages,
            &format!("bench-plain-{}-{n}", self.label),
            like_rankd,
            &pids_of(self.a, rankd),
        )
    }

    /// Target 3's reference, before rankd runs: what a plain consumer
    /// configured like rankd's (fetch.wait.max.ms 10, the same 3 x 3
    /// partitions) sees at the same rate from this broker, without and with
    /// rankd's commit cadence (an async commit per 2 ms batch).
    fn latency_probes(&self) -> Result<Vec<Probe>> {
        let a = self.a;
        let mut probes = Vec::new();
        for (i, commit_ms) in [None, Some(2)].into_iter().enumerate() {
            let cpu = CpuMeter::start(&pids_of(a, None));
            let mut pr = probe(
                &a.brokers,
                a.update_rate,
                a.fresh_secs,
                0x9B0B + i as u64,
                commit_ms,
            )?;
            pr.cpu = cpu.stop();
            eprintln!("[{}] plain-consumer latency probe: {pr:?}", self.label);
            probes.push(pr);
        }
        Ok(probes)
    }

    /// Target 2, rankd's side: from its spawn until `/v1/ingest` (polled
    /// every 10 ms) has all the events applied.
    fn rankd_catch_up(&mut self, r: &Rankd) -> Result<Consume> {
        let a = self.a;
        let meter = CpuMeter::start(&pids_of(a, Some(r)));
        let deadline = Instant::now() + Duration::from_secs(300);
        let (mut m10, mut m90) = (None, None);
        let done = loop {
            let applied = self
                .http
                .applied(&r.http)?
                .get(EVENTS)
                .copied()
                .unwrap_or(0)
                .max(0) as u64;
            let now = Instant::now();
            if m10.is_none() && applied >= a.messages / 10 {
                m10 = Some((now, applied));
            }
            if m90.is_none() && applied >= a.messages * 9 / 10 {
                m90 = Some((now, applied));
            }
            if applied >= a.messages {
                break now;
            }
            ensure!(
                now < deadline,
                "rankd applied {applied} of {} in 300 s",
                a.messages
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let rankd_consume = Consume {
            who: "rankd serve".into(),
            messages: a.messages,
            secs_from_start: (done - r.started_at).as_secs_f64(),
            rate_from_start: a.messages as f64 / (done - r.started_at).as_secs_f64(),
            secs_from_ready: (done - r.ready_at).as_secs_f64(),
            rate_from_ready: a.messages as f64 / (done - r.ready_at).as_secs_f64(),
            rate_10_90: rate_between(m10, m90),
            cpu: meter.stop(),
        };
        eprintln!(
            "[{}] rankd: {rankd_consume:?} (start-up to ready {:.2} s)",
            self.label, r.startup_secs
        );
        Ok(rankd_consume)
    }

    /// Target 3: freshness at the paced rate, no request load.
    /// Returns the end-to-end figures and rankd's own share (fetch to
    /// applied) of the same messages.
    fn paced_freshness(&mut self, r: &Rankd, mix: &mut Mix) -> Result<(Freshness, Freshness)> {
        let a = self.a;
        let before = self.http.freshness(&r.http, "end_to_end")?;
        let own_before = self.http.freshness(&r.http, "rankd")?;
        let cpu = CpuMeter::start(&pids_of(a, Some(r)));
        let paced = produce_paced(
            &a.brokers,
            mix,
            false,
            a.update_rate,
            Duration::from_secs_f64(a.fresh_secs),
            &AtomicBool::new(false),
        )?;
        let t3_cpu = cpu.stop();
        for (t, n) in &paced.per_topic {
            *self.expected.entry(t.clone()).or_insert(0) += *n as i64;
        }
        wait_applied(
            &self.http,
            &r.http,
            &self.expected,
            Duration::from_secs(120),
        )?;
        let after = self.http.freshness(&r.http, "end_to_end")?;
        let own_after = self.http.freshness(&r.http, "rankd")?;
        let mut freshness =
            freshness_between("paced, no requests", &before, &after, a.update_rate, &paced);
        freshness.cpu = t3_cpu.clone();
        let mut own = freshness_between(
            "paced, no requests: fetch to applied",
            &own_before,
            &own_after,
            a.update_rate,
            &paced,
        );
        own.cpu = t3_cpu;
        eprintln!("[{}] freshness: {freshness:?}", self.label);
        eprintln!("[{}] rankd's own share: {own:?}", self.label);
        Ok((freshness, own))
    }

    /// Target 4: for each rate, `--bench-pairs` times, `rankd bench` with no
    /// updates (idle), with the mix at the update rate to rankd's topics
    /// (ingest), and with the same production to the probe topics, which
    /// rankd does not read, so the broker and producer load is there without
    /// rankd's ingestion work (broker-only, the control). Each producing run
    /// starts its mix at versions above every earlier one's (from `versions`).
    fn bench_pairs(
        &mut self,
        r: &Rankd,
        target: &[String],
        rates: &[f64],
        mut versions: u64,
    ) -> Result<Vec<BenchRun>> {
        let mut bench = Vec::new();
        for &rate in rates {
            let rate_s = format!("{rate}");
            let load = [
                "--rate",
                rate_s.as_str(),
                "--duration",
                self.a.bench_duration.as_str(),
            ];
            for pair in 0..self.a.bench_pairs {
                for mode in ["idle", "ingest", "broker-only"] {
                    std::thread::sleep(Duration::from_secs(1));
                    let tag = format!("{mode}-{rate}-{pair}");
                    let loadavg_before = loadavg();
                    let measured = if mode == "idle" {
                        let meter = CpuMeter::start(&pids_of(self.a, Some(r)));
                        let bench = run_bench(self.a, target, &load, &tag, &mut self.commands)?;
                        Measured {
                            bench,
                            update_rate: 0.0,
                            freshness: None,
                            cpu: meter.stop(),
                        }
                    } else {
                        let mix = Mix {
                            rng: Rng::new(versions),
                            version: versions,
                        };
                        versions += 1_000_000_000;
                        self.bench_while_producing(r, target, &load, &tag, mode, mix)?
                    };
                    let run = measured.into_run(mode, pair, rate, loadavg_before);
                    eprintln!(
                        "[{}] bench {tag}: p50 {:.0} us, p99 {:.0} us, {:.0} req/s, {} errors",
                        self.label, run.p50_us, run.p99_us, run.throughput_rps, run.errors
                    );
                    bench.push(run);
                }
            }
        }
        Ok(bench)
    }

    /// One `rankd bench` run while `mix` is produced at the update rate, to
    /// rankd's topics (`ingest`: then the freshness of that run too) or to the
    /// probe topics (`broker-only`).
    fn bench_while_producing(
        &mut self,
        r: &Rankd,
        target: &[String],
        load: &[&str],
        tag: &str,
        mode: &str,
        mut mix: Mix,
    ) -> Result<Measured> {
        let a = self.a;
        let to_probe = mode == "broker-only";
        let stop = Arc::new(AtomicBool::new(false));
        let before = self.http.freshness(&r.http, "end_to_end")?;
        let (brokers, update_rate) = (a.brokers.clone(), a.update_rate);
        let flag = stop.clone();
        let producer_thread = std::thread::spawn(move || {
            produce_paced(
                &brokers,
                &mut mix,
                to_probe,
                update_rate,
                Duration::from_secs(300),
                &flag,
            )
        });
        // Let the producer reach its pace before the bench's warm-up.
        std::thread::sleep(Duration::from_secs(1));
        let meter = CpuMeter::start(&pids_of(a, Some(r)));
        let bench = run_bench(a, target, load, tag, &mut self.commands);
        let cpu = meter.stop();
        stop.store(true, Ordering::Relaxed);
        let paced = producer_thread
            .join()
            .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
        let bench = bench?;
        let freshness = if to_probe {
            None
        } else {
            for (t, n) in &paced.per_topic {
                *self.expected.entry(t.clone()).or_insert(0) += *n as i64;
            }
            wait_applied(
                &self.http,
                &r.http,
                &self.expected,
                Duration::from_secs(120),
            )?;
            let after = self.http.freshness(&r.http, "end_to_end")?;
            Some(freshness_between(
                "paced, during rankd bench",
                &before,
                &after,
                a.update_rate,
                &paced,
            ))
        };
        Ok(Measured {
            bench,
            update_rate: paced.produced as f64 / paced.secs,
            freshness,
            cpu,
        })
    }
}

/// What one `rankd bench` run of target 4 measured.
struct Measured {
    /// `rankd bench`'s JSON figures.
    bench: serde_json::Value,
    /// Updates produced per second during the run (0 without production).
    update_rate: f64,
    /// Freshness over the run, when the updates went to rankd's topics.
    freshness: Option<Freshness>,
    cpu: Vec<(String, f64)>,
}

impl Measured {
    fn into_run(self, mode: &str, pair: usize, rate: f64, loadavg_before: f64) -> BenchRun {
        let v = &self.bench;
        let f = |k: &str| v["latency_us"][k].as_f64().unwrap_or(NA);
        let errors: u64 = v["errors"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(|x| x.as_u64()).sum());
        BenchRun {
            mode: mode.to_string(),
            pair,
            rate,
            requests: v["requests"].as_u64().unwrap_or(0),
            ok: v["ok"].as_u64().unwrap_or(0),
            errors,
            throughput_rps: v["throughput_rps"].as_f64().unwrap_or(NA),
            p50_us: f("p50"),
            p99_us: f("p99"),
            p999_us: f("p999"),
            max_us: f("max"),
            update_rate: self.update_rate,
            freshness: self.freshness,
            cpu: self.cpu,
            loadavg_before,
        }
    }
}

/// The processes whose CPU use is reported.
pub fn pids_of(a: &RunArgs, rankd: Option<&Rankd>) -> Vec<(String, u32)> {
    let mut v = vec![("ingest_bench".to_string(), std::process::id())];
    if let Some(r) = rankd {
        v.push(("rankd".to_string(), r.pid));
    }
    if let Some(b) = a.broker_pid {
        v.push(("tansu".to_string(), b));
    }
    v
}
