//! `rankd gpu-check`: every kernel against the CPU reference on fresh random
//! inputs, then bandwidth and throughput against the device's own copy
//! bandwidth, ending in one table. With `dry_run` (no GPU) it runs every
//! host-side part (inputs, CPU references, NVRTC compiles when NVRTC is
//! there, the table) and says which device parts were skipped and why.

mod bench;
mod correct;
mod inputs;

use std::fmt::Write as _;
use std::time::Instant;

use rankd::internals::cuda::kernels::{self, SOURCES};
use rankd::internals::cuda::CudaBackend;

#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Host-side parts only; no GPU needed.
    pub dry_run: bool,
    /// CUDA device to check.
    pub ordinal: usize,
    /// Rows of the throughput table (10M by default).
    pub bench_rows: usize,
    /// Embedding dim of the throughput table (128 by default).
    pub bench_dim: usize,
    /// Seed of the random inputs; `None` draws one (printed, to reproduce).
    pub seed: Option<u64>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            ordinal: 0,
            bench_rows: 10_000_000,
            bench_dim: 128,
            seed: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    Skipped,
    Info,
}

struct Row {
    section: &'static str,
    check: String,
    inputs: String,
    measured: String,
    target: String,
    status: Status,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        check: impl Into<String>,
        inputs: impl Into<String>,
        measured: impl Into<String>,
        target: impl Into<String>,
        status: Status,
    ) {
        self.rows.push(Row {
            section,
            check: check.into(),
            inputs: inputs.into(),
            measured: measured.into(),
            target: target.into(),
            status,
        });
    }

    /// A row judged against an upper bound.
    fn bound(
        &mut self,
        section: &'static str,
        check: impl Into<String>,
        inputs: impl Into<String>,
        value: f64,
        limit: f64,
    ) {
        let status = if value.is_finite() && value <= limit {
            Status::Pass
        } else {
            Status::Fail
        };
        self.add(
            section,
            check,
            inputs,
            sci(value),
            format!("<= {}", sci(limit)),
            status,
        );
    }

    fn skip(&mut self, section: &'static str, check: impl Into<String>, inputs: impl Into<String>) {
        self.add(section, check, inputs, "-", "-", Status::Skipped);
    }

    fn failures(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.status == Status::Fail)
            .count()
    }

    fn render(&self, header: &[String]) -> String {
        let mut out = String::new();
        for h in header {
            let _ = writeln!(out, "{h}");
        }
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.section.to_string(),
                    r.check.clone(),
                    r.inputs.clone(),
                    r.measured.clone(),
                    r.target.clone(),
                    match r.status {
                        Status::Pass => "ok",
                        Status::Fail => "FAIL",
                        Status::Skipped => "skipped",
                        Status::Info => "info",
                    }
                    .to_string(),
                ]
            })
            .collect();
        let titles = ["section", "check", "inputs", "measured", "target", "result"];
        let mut width = titles.map(str::len);
        for c in &cells {
            for (w, s) in width.iter_mut().zip(c) {
                *w = (*w).max(s.chars().count());
            }
        }
        let line = |c: &[String]| {
            let mut l = String::from("|");
            for (s, w) in c.iter().zip(width) {
                let _ = write!(l, " {s:<w$} |");
            }
            l
        };
        let _ = writeln!(out, "{}", line(&titles.map(String::from)));
        let _ = writeln!(out, "{}", line(&width.map(|w| "-".repeat(w))));
        for c in &cells {
            let _ = writeln!(out, "{}", line(c));
        }
        for n in &self.notes {
            let _ = writeln!(out, "{n}");
        }
        let fails = self.failures();
        let _ = writeln!(
            out,
            "{}",
            if fails == 0 {
                "all checks passed".to_string()
            } else {
                format!("{fails} check(s) FAILED")
            }
        );
        out
    }
}

/// 3 significant digits, scientific below 1e-3.
fn sci(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() < 1e-3 || v.abs() >= 1e6 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// Runs the check and returns the table. An `Err` means a check failed (its
/// message holds the whole table) or, without `dry_run`, that no GPU could be
/// opened.
pub fn run_check(opts: CheckOptions) -> anyhow::Result<String> {
    let started = Instant::now();
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut header = vec![format!(
        "rankd {} gpu-check, seed {seed}",
        env!("CARGO_PKG_VERSION")
    )];
    let mut report = Report::default();

    let backend = if opts.dry_run {
        header.push("dry run: host-side parts only, device parts skipped".into());
        None
    } else {
        match CudaBackend::new_for_check(opts.ordinal) {
            Ok((b, test)) => {
                self_test_rows(&mut report, &test);
                Some(b)
            }
            Err(why) => anyhow::bail!(
                "cuda:{}: {why} (use --dry-run on hosts without a GPU)",
                opts.ordinal
            ),
        }
    };
    let arch = match &backend {
        Some(b) => {
            let i = b.info();
            header.push(format!(
                "device cuda:{}: {} ({}, {} SMs, {:.1} GiB), driver {}.{}, NVRTC {}.{}",
                i.ordinal,
                i.name,
                i.arch(),
                i.sms,
                i.total_mem as f64 / (1u64 << 30) as f64,
                i.driver_version / 1000,
                i.driver_version % 1000 / 10,
                i.nvrtc.0,
                i.nvrtc.1
            ));
            i.arch()
        }
        None => "sm_90".to_string(),
    };

    nvrtc_section(&mut report, &arch);
    let mut backend = backend;
    correct::run(&mut report, backend.as_mut(), seed)?;
    bench::run(&mut report, backend.as_mut(), &opts, seed)?;

    header.push(format!(
        "finished in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let table = report.render(&header);
    if report.failures() > 0 {
        anyhow::bail!("{table}");
    }
    Ok(table)
}

/// The start-up check `rankd serve` enforces, as rows: here it does not stop
/// the run, so the detailed checks below can show what a failure means.
fn self_test_rows(report: &mut Report, test: &rankd::internals::cuda::SelfTest) {
    const S: &str = "start-up check";
    let inputs = "3000 × 100 synthetic table, 11 + 29 queries, vs f64 on the host";
    let mut row =
        |check: &str, r: Option<&Result<(), rankd::internals::cuda::selftest::Failure>>| {
            let (measured, status) = match r {
                None => (
                    "no bf16 tensor cores before sm_80".to_string(),
                    Status::Skipped,
                ),
                Some(Ok(())) => ("agrees".to_string(), Status::Pass),
                Some(Err(e)) => (e.to_string(), Status::Fail),
            };
            report.add(
                S,
                check,
                inputs,
                measured,
                "agrees (else not served)",
                status,
            );
        };
    row(
        "fused top-k, CUDA cores (f32, bf16)",
        Some(&test.cuda_cores),
    );
    row(
        "fused top-k, tensor cores (bf16)",
        test.tensor_cores.as_ref(),
    );
}

/// Compiles every kernel source for `arch` and reports ptxas's resources.
fn nvrtc_section(report: &mut Report, arch: &str) {
    const S: &str = "nvrtc";
    if let Err(why) = kernels::nvrtc_version() {
        for src in SOURCES {
            report.skip(S, format!("compile {}", src.file), format!("{arch}: {why}"));
        }
        return;
    }
    for src in SOURCES {
        let t = Instant::now();
        match kernels::compile(src, arch, true) {
            Ok(c) => {
                let missing: Vec<&str> = src
                    .entries
                    .iter()
                    .filter(|e| !c.ptx.contains(&format!(".entry {e}(")))
                    .copied()
                    .collect();
                let (regs, spills) = ptxas_resources(&c.log);
                let measured = format!(
                    "{} entries, max {regs} regs, {spills} spill bytes, {} ms",
                    src.entries.len() - missing.len(),
                    t.elapsed().as_millis()
                );
                let status = if missing.is_empty() && spills == 0 {
                    Status::Pass
                } else {
                    Status::Fail
                };
                report.add(
                    S,
                    format!("compile {}", src.file),
                    arch,
                    measured,
                    "all entries, no spills",
                    status,
                );
            }
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                report.add(
                    S,
                    format!("compile {}", src.file),
                    arch,
                    first,
                    "compiles",
                    Status::Fail,
                );
            }
        }
    }
}

/// (most registers of any kernel, total spill bytes) from a ptxas -v log.
fn ptxas_resources(log: &str) -> (u32, u32) {
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    let mut regs = 0;
    let mut spills = 0;
    for line in log.lines() {
        if let Some(r) = num_before(line, "registers") {
            regs = regs.max(r);
        }
        spills += num_before(line, "bytes spill stores").unwrap_or(0);
        spills += num_before(line, "bytes spill loads").unwrap_or(0);
    }
    (regs, spills)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_parsed() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                   ptxas         .     0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
                   ptxas info    : Used 105 registers, used 1 barriers\n\
                   ptxas info    : Used 32 registers, used 0 barriers";
        assert_eq!(ptxas_resources(log), (105, 12));
    }

    #[test]
    fn table_marks_failures_and_skips() {
        let mut r = Report::default();
        r.bound("a", "x", "n=1", 1e-7, 1e-5);
        r.bound("a", "y", "n=1", 1e-3, 1e-5);
        r.bound("a", "nan", "n=1", f64::NAN, 1e-5);
        r.skip("b", "z", "no GPU");
        let t = r.render(&["head".into()]);
        assert_eq!(r.failures(), 2);
        assert!(t.starts_with("head\n| section |"), "{t}");
        assert!(t.contains("| ok "), "{t}");
        assert!(t.contains("| skipped |"), "{t}");
        assert!(t.ends_with("2 check(s) FAILED\n"), "{t}");
    }
}
