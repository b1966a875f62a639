//! What rankd reports over HTTP: the offsets applied per topic
//! (`/v1/ingest`), and the freshness histogram (`/metrics`), whose delta
//! between two scrapes gives the freshness figures of a run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::broker::Paced;
use super::figures::Freshness;
use super::{INF_LE, NA};

/// Blocking HTTP GETs through reqwest on a small runtime.
pub struct Http {
    pub rt: tokio::runtime::Runtime,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new() -> Result<Self> {
        Ok(Self {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    pub fn get(&self, url: &str) -> Result<String> {
        self.rt.block_on(async {
            let r = self.client.get(url).send().await?;
            ensure!(r.status().is_success(), "{url}: {}", r.status());
            Ok(r.text().await?)
        })
    }

    /// Next offsets applied, summed per topic.
    pub fn applied(&self, base: &str) -> Result<BTreeMap<String, i64>> {
        let v: serde_json::Value = serde_json::from_str(&self.get(&format!("{base}/v1/ingest"))?)?;
        let mut m = BTreeMap::new();
        for p in v["partitions"].as_array().into_iter().flatten() {
            let topic = p["topic"].as_str().unwrap_or_default().to_string();
            *m.entry(topic).or_insert(0) += p["applied_offset"].as_i64().unwrap_or(0);
        }
        Ok(m)
    }

    /// The freshness histogram of `stage` (`end_to_end`: from the message
    /// timestamp; `rankd`: from the fetch): cumulative (le, count), plus sum
    /// and count.
    pub fn freshness(&self, base: &str, stage: &str) -> Result<Hist> {
        let text = self.get(&format!("{base}/metrics"))?;
        let mut h = Hist::default();
        let labels = format!("{{stage=\"{stage}\"");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("rankd_ingest_freshness_seconds") else {
                continue;
            };
            let value = |s: &str| s.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            let Some((kind, rest)) = rest.split_once(&labels) else {
                continue;
            };
            let rest = format!("{kind}{{{}", rest.trim_start_matches(','));
            let rest = rest.as_str();
            if let Some(b) = rest.strip_prefix("_bucket{le=\"") {
                let (le, tail) = b.split_once('"').context("bucket line")?;
                let le = if le == "+Inf" { INF_LE } else { le.parse()? };
                h.cumulative
                    .push((le, value(tail).context("bucket value")?));
            } else if rest.starts_with("_sum{") {
                h.sum = value(rest).context("sum")?;
            } else if rest.starts_with("_count{") {
                h.count = value(rest).context("count")?;
            }
        }
        ensure!(
            !h.cumulative.is_empty(),
            "no rankd_ingest_freshness_seconds{{stage=\"{stage}\"}} in /metrics"
        );
        Ok(h)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Hist {
    pub cumulative: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// Percentiles of the messages observed between two scrapes.
pub fn freshness_between(
    what: &str,
    before: &Hist,
    after: &Hist,
    target_rate: f64,
    p: &Paced,
) -> Freshness {
    let cum: Vec<(f64, f64)> = after
        .cumulative
        .iter()
        .map(|&(le, c)| {
            let b = before
                .cumulative
                .iter()
                .find(|x| x.0 == le)
                .map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect();
    let total = after.count - before.count;
    let mut buckets = Vec::new();
    let mut prev = 0.0;
    for &(le, c) in &cum {
        buckets.push((le, c - prev));
        prev = c;
    }
    let at = |q: f64| -> ((f64, f64), f64) {
        let want = q * total;
        let mut lo = (0.0, 0.0);
        for &(le, c) in &cum {
            if c >= want {
                let interp = if le < INF_LE && c > lo.1 {
                    lo.0 + (le - lo.0) * (want - lo.1) / (c - lo.1)
                } else {
                    le
                };
                return ((lo.0 * 1e3, le * 1e3), interp * 1e3);
            }
            lo = (le, c);
        }
        ((NA, NA), NA)
    };
    let le50 = cum
        .iter()
        .find(|x| (x.0 - 0.05).abs() < 1e-12)
        .map_or(NA, |x| x.1);
    Freshness {
        what: what.to_string(),
        target_rate,
        produced: p.produced,
        produce_secs: p.secs,
        achieved_rate: p.produced as f64 / p.secs.max(1e-9),
        delivery_failures: p.failed,
        ack_ms: p.ack_ms,
        observations: total,
        mean_ms: if total > 0.0 {
            (after.sum - before.sum) / total * 1e3
        } else {
            NA
        },
        buckets,
        fraction_le_50ms: if total > 0.0 && le50 >= 0.0 {
            le50 / total
        } else {
            NA
        },
        p50_bucket_ms: at(0.50).0,
        p99_bucket_ms: at(0.99).0,
        p99_interpolated_ms: at(0.99).1,
        cpu: Vec::new(),
    }
}

/// Polls /v1/ingest until each topic's applied offsets sum to `want`.
pub fn wait_applied(
    http: &Http,
    base: &str,
    want: &BTreeMap<String, i64>,
    within: Duration,
) -> Result<(Instant, Option<(Instant, i64)>)> {
    let deadline = Instant::now() + within;
    let mut first = None;
    loop {
        let got = http.applied(base)?;
        let total: i64 = got.values().sum();
        if first.is_none() && total > 0 {
            first = Some((Instant::now(), total));
        }
        if want
            .iter()
            .all(|(t, &n)| got.get(t).copied().unwrap_or(0) >= n)
        {
            return Ok((Instant::now(), first));
        }
        ensure!(
            Instant::now() < deadline,
            "applied {got:?}, want {want:?}, after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
