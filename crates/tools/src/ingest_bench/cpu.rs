//! CPU accounting from /proc: cores used between two readings by each
//! process measured (rankd's threads by name), by this program's reaped
//! children, and by the whole machine, the rest being other work on it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::NA;

/// utime + stime (clock ticks) of a process or thread from its stat file, and its name.
pub fn stat_ticks(path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 2..].split(' ').collect();
    // Fields after the name: state is 0, utime 11, stime 12, cutime 13, cstime 14.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((comm, ticks))
}

/// Children's (reaped) utime + stime of this process.
pub fn children_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(close) = text.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = text[close + 2..].split(' ').collect();
    f.get(13).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(14).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// (busy, all) jiffies of the whole machine.
pub fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (all - idle, all)
}

/// Per-label ticks: each process's total, and rankd's threads by name.
pub fn labelled_ticks(pids: &[(String, u32)]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (label, pid) in pids {
        if let Some((_, t)) = stat_ticks(Path::new(&format!("/proc/{pid}/stat"))) {
            m.insert(label.clone(), t);
        }
        if label == "rankd" {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for e in dir.flatten() {
                if let Some((comm, t)) = stat_ticks(&e.path().join("stat")) {
                    // Group numbered librdkafka and tokio threads.
                    let name = if comm.starts_with("rdk:") {
                        "rdk:*".to_string()
                    } else if comm.starts_with("tokio") {
                        "tokio".to_string()
                    } else {
                        comm
                    };
                    *m.entry(format!("rankd/{name}")).or_insert(0) += t;
                }
            }
        }
    }
    m.insert("bench children".into(), children_ticks());
    m
}

/// Cores used between `start` and `stop`, by label, plus the machine's.
pub struct CpuMeter {
    pub pids: Vec<(String, u32)>,
    pub at: Instant,
    pub machine: (u64, u64),
    pub ticks: BTreeMap<String, u64>,
}

pub fn clock_ticks_per_sec() -> f64 {
    100.0
}

impl CpuMeter {
    pub fn start(pids: &[(String, u32)]) -> Self {
        Self {
            pids: pids.to_vec(),
            at: Instant::now(),
            machine: machine_ticks(),
            ticks: labelled_ticks(pids),
        }
    }

    pub fn stop(self) -> Vec<(String, f64)> {
        let secs = self.at.elapsed().as_secs_f64();
        let (busy, all) = machine_ticks();
        let after = labelled_ticks(&self.pids);
        let cores = |t: u64| t as f64 / clock_ticks_per_sec() / secs;
        let machine_cores = if all > self.machine.1 {
            (busy - self.machine.0) as f64 / (all - self.machine.1) as f64 * num_cpus()
        } else {
            NA
        };
        let mut out = vec![("machine".to_string(), machine_cores)];
        let mut ours = 0.0;
        for (label, &t) in &after {
            let d = cores(t.saturating_sub(self.ticks.get(label).copied().unwrap_or(0)));
            if !label.contains('/') {
                ours += d;
            }
            out.push((label.clone(), d));
        }
        out.push(("others".into(), (machine_cores - ours).max(0.0)));
        out
    }
}

pub fn num_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(NA)
}
