//! The summary: every round's figures as a Markdown table, each against its
//! target where it has one.

use super::cpu::num_cpus;
use super::figures::{BenchRun, Consume, Freshness, Round};
use super::{INF_LE, NA};

pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// "in bucket (100, 250] ms, interpolated 180.0 ms"
pub fn p99_text(f: &Freshness) -> String {
    let (lo, hi) = f.p99_bucket_ms;
    if hi >= INF_LE * 1e3 {
        format!("in bucket ({lo:.0} ms, +Inf)")
    } else {
        format!(
            "in bucket ({lo}, {hi}] ms, interpolated {:.1} ms",
            f.p99_interpolated_ms
        )
    }
}

/// "machine 1.9 (others 0.1); tansu 0.6; rankd 0.8 (ingest 0.2, ...); ..."
pub fn cpu_text(cpu: &[(String, f64)]) -> String {
    let get = |k: &str| cpu.iter().find(|x| x.0 == k).map(|x| x.1);
    let mut parts = Vec::new();
    if let Some(m) = get("machine") {
        parts.push(format!(
            "machine {m:.2} of {} (others {:.2})",
            num_cpus(),
            get("others").unwrap_or(NA)
        ));
    }
    for k in ["tansu", "rankd", "ingest_bench", "bench children"] {
        if let Some(v) = get(k) {
            let mut t = format!("{k} {v:.2}");
            if k == "rankd" {
                let threads: Vec<String> = cpu
                    .iter()
                    .filter_map(|(l, v)| {
                        let n = l.strip_prefix("rankd/")?;
                        (*v >= 0.005).then(|| format!("{n} {v:.2}"))
                    })
                    .collect();
                t.push_str(&format!(" ({})", threads.join(", ")));
            }
            parts.push(t);
        }
    }
    parts.join("; ")
}

pub fn table(rounds: &[Round]) -> String {
    let mut s = String::new();
    let mut row = |what: String, figure: String, target: &str, result: &str| {
        s.push_str(&format!("| {what} | {figure} | {target} | {result} |\n"));
    };
    row("figure".into(), "measured".into(), "target", "result");
    row("---".into(), "---".into(), "---", "---");
    for r in rounds {
        let l = &r.label;
        row(
            format!("{l}: produce {} events (linger 5 ms)", r.messages),
            format!("{:.2} s, {:.0} msg/s", r.produce_secs, r.produce_rate),
            "-",
            "info",
        );
        for (i, p) in r.plain.iter().enumerate() {
            row(
                format!(
                    "{l}: plain consumer read #{} ({})",
                    i + 1,
                    if i == 0 {
                        "before rankd"
                    } else {
                        "after rankd, rankd idle"
                    }
                ),
                format!(
                    "{:.0} msg/s from start ({:.2} s); steady (10-90%) {:.0} msg/s; CPU {}",
                    p.rate_from_start,
                    p.secs_from_start,
                    p.rate_10_90,
                    cpu_text(&p.cpu)
                ),
                "-",
                "info",
            );
        }
        if let Some(p3) = &r.plain_like_rankd {
            row(
                format!("{l}: plain consumer with rankd's settings on its 9 partitions (after rankd, rankd idle)"),
                format!(
                    "{:.0} msg/s from start ({:.2} s); steady (10-90%) {:.0} msg/s; CPU {}",
                    p3.rate_from_start,
                    p3.secs_from_start,
                    p3.rate_10_90,
                    cpu_text(&p3.cpu)
                ),
                "-",
                "info",
            );
        }
        let mean = |f: fn(&Consume) -> f64| {
            r.plain.iter().map(f).sum::<f64>() / r.plain.len().max(1) as f64
        };
        let plain_start = mean(|p| p.rate_from_start);
        row(
            format!("{l}: rankd consume + apply (startup to ready {:.2} s)", r.rankd_startup_secs),
            format!(
                "{:.0} msg/s from process spawn ({:.2} s); {:.0} msg/s from ready line; steady (10-90%) {:.0} msg/s; CPU {}",
                r.rankd.rate_from_start,
                r.rankd.secs_from_start,
                r.rankd.rate_from_ready,
                r.rankd.rate_10_90,
                cpu_text(&r.rankd.cpu)
            ),
            "-",
            "info",
        );
        // rankd counts from its ready line (printed once its consumer thread
        // runs: start-up subtracted); from its spawn is shown beside it.
        let ratio = r.rankd.rate_from_ready / plain_start;
        row(
            format!("{l}: T2 rankd / plain consumer"),
            format!(
                "{:.1}% ({:.0} / {:.0} msg/s: rankd from its ready line, plain from consumer creation, plain = mean of both reads); from rankd's process spawn {:.1}%",
                ratio * 100.0,
                r.rankd.rate_from_ready,
                plain_start,
                r.rankd.rate_from_start / plain_start * 100.0
            ),
            ">= 90%",
            verdict(ratio >= 0.9),
        );
        let f = &r.freshness;
        row(
            format!("{l}: T3 freshness p99 at {:.0}/s", f.target_rate),
            format!(
                "p99 {}; {:.2}% <= 50 ms; mean {:.1} ms; {} msgs at {:.0}/s",
                p99_text(f),
                f.fraction_le_50ms * 100.0,
                f.mean_ms,
                f.observations,
                f.achieved_rate
            ),
            "p99 <= 50 ms",
            verdict(f.fraction_le_50ms >= 0.99),
        );
        if let Some(own) = &r.freshness_rankd {
            row(
                format!("{l}: T3 rankd's own share (fetch to applied) p99"),
                format!(
                    "p99 {}; mean {:.2} ms; {} msgs",
                    p99_text(own),
                    own.mean_ms,
                    own.observations
                ),
                "p99 <= 5 ms",
                verdict(own.p99_interpolated_ms <= 5.0),
            );
        }
        row(
            format!("{l}: T3 producer ack latency (same run)"),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                f.ack_ms.0, f.ack_ms.1, f.ack_ms.2
            ),
            "-",
            "info",
        );
        row(
            format!("{l}: T3 CPU (cores)"),
            cpu_text(&f.cpu),
            "-",
            "info",
        );
        for pr in &r.probes {
            let commits = match pr.commit_ms {
                None => "no commits".to_string(),
                Some(ms) => format!(
                    "async commit every {ms} ms when dirty: {} commits",
                    pr.commits
                ),
            };
            row(
                format!(
                    "{l}: T3 reference: plain consumer (fetch.wait.max.ms 10, {commits}), {:.0}/s, same broker",
                    pr.achieved_rate
                ),
                format!(
                    "receive - timestamp p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} of {} received); ack p50 {:.0} ms, p99 {:.0} ms; CPU {}",
                    pr.e2e_ms.0, pr.e2e_ms.1, pr.e2e_ms.2, pr.received, pr.produced, pr.ack_ms.0, pr.ack_ms.1, cpu_text(&pr.cpu)
                ),
                "-",
                "info",
            );
        }
        if let Some(sat) = r.saturation_no_kafka_rps {
            row(
                format!("{l}: recommend saturation, closed loop 32 callers, daemon without Kafka"),
                format!("{sat:.0} req/s"),
                "-",
                "info",
            );
        }
        if let Some(sat) = r.saturation_rps {
            row(
                format!("{l}: recommend saturation, closed loop 32 callers, the measured rankd (Kafka on, topics idle)"),
                format!("{sat:.0} req/s (half: {:.0})", sat / 2.0),
                "-",
                "info",
            );
        }
        let mut idle = None;
        for b in r.bench.iter() {
            let pair = b.pair;
            let base = idle.unwrap_or(NA);
            let worse = b.p99_us / base - 1.0;
            let figures = |b: &BenchRun| {
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, {:.0} req/s, {} errors",
                    b.p50_us / 1e3,
                    b.p99_us / 1e3,
                    b.p999_us / 1e3,
                    b.throughput_rps,
                    b.errors
                )
            };
            match b.mode.as_str() {
                "idle" => {
                    idle = Some(b.p99_us);
                    row(
                        format!("{l}: recommend at {:.0}/s, no updates (pair {pair})", b.rate),
                        figures(b),
                        "-",
                        "info",
                    );
                }
                "ingest" => row(
                    format!(
                        "{l}: T4 recommend at {:.0}/s with {:.0} updates/s ingested (pair {pair})",
                        b.rate, b.update_rate
                    ),
                    format!("{}; p99 {:+.1}% vs no updates", figures(b), worse * 100.0),
                    "p99 <= +25%",
                    verdict(base > 0.0 && worse <= 0.25),
                ),
                _ => row(
                    format!(
                        "{l}: control: recommend at {:.0}/s with {:.0} msgs/s produced to topics rankd does not read (pair {pair})",
                        b.rate, b.update_rate
                    ),
                    format!("{}; p99 {:+.1}% vs no updates", figures(b), worse * 100.0),
                    "-",
                    "info",
                ),
            }
            if let Some(f) = &b.freshness {
                row(
                    format!("{l}:   freshness during that run"),
                    format!(
                        "p99 {}; {:.2}% <= 50 ms; mean {:.1} ms; producer ack p99 {:.0} ms",
                        p99_text(f),
                        f.fraction_le_50ms * 100.0,
                        f.mean_ms,
                        f.ack_ms.1
                    ),
                    "-",
                    "info",
                );
            }
            row(
                format!(
                    "{l}:   CPU during that run (cores; load average before {:.2})",
                    b.loadavg_before
                ),
                cpu_text(&b.cpu),
                "-",
                "info",
            );
        }
    }
    s
}
