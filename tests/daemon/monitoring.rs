//! The monitoring shipped in `docker/monitoring/`: every metric and label the
//! alert rules and the Grafana dashboard use is exported by a live rankd
//! (after each path has run), `promtool` checks the rules and runs their unit
//! tests, and a real Prometheus scraping a real rankd raises the shed-rate
//! alert when rankd is overloaded.
//!
//! `scripts/test.sh` installs Debian's `prometheus` package and exports the
//! paths of its two binaries in `RANKD_PROMETHEUS` and `RANKD_PROMTOOL`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

fn monitoring_dir() -> PathBuf {
    repo_root().join("docker/monitoring")
}

/// A Prometheus binary from `var` (`RANKD_PROMETHEUS`, `RANKD_PROMTOOL`), or
/// the place `scripts/test.sh` installs it; missing is a failure.
fn prometheus_tool(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME is set");
        PathBuf::from(home)
            .join(".cache/rankd/tools/prometheus-2.42.0/usr/bin")
            .join(name)
    });
    assert!(
        path.is_file(),
        "{name} is not installed at {} (scripts/test.sh installs it; or set {var})",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------
// What the rules and the dashboard use
// ---------------------------------------------------------------------------

/// One PromQL expression (or a legend/summary template) with where it came from.
struct Use {
    place: String,
    expr: String,
    /// Labels the text shows (`{{model}}`, `$labels.model`), beside `expr`.
    shown: Vec<String>,
}

/// The expressions of `alerts.yaml`: each rule keeps its `expr:` on one line,
/// and its summary names the labels it shows.
#[cfg(feature = "kafka")]
fn rule_uses() -> Vec<Use> {
    let text = std::fs::read_to_string(monitoring_dir().join("alerts.yaml")).unwrap();
    let mut uses: Vec<Use> = Vec::new();
    let mut alert = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        } else if let Some(expr) = line.strip_prefix("expr:") {
            uses.push(Use {
                place: format!("alerts.yaml {alert}"),
                expr: expr.trim().to_string(),
                shown: Vec::new(),
            });
        } else if let Some(summary) = line.strip_prefix("summary:") {
            let u = uses.last_mut().expect("a summary follows its expr");
            u.shown = template_labels(summary, "$labels.");
        }
    }
    assert!(uses.len() >= 10, "alerts.yaml: {} rules read", uses.len());
    uses
}

/// The expressions of `dashboard.json`: every panel target and the variables.
#[cfg(feature = "kafka")]
fn dashboard_uses() -> Vec<Use> {
    let text = std::fs::read_to_string(monitoring_dir().join("dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    let mut uses = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let legend = t["legendFormat"].as_str().unwrap_or_default();
            uses.push(Use {
                place: format!("dashboard.json panel {:?}", p["title"]),
                expr: t["expr"].as_str().expect("expr").to_string(),
                shown: template_labels(legend, "{{"),
            });
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            uses.push(Use {
                place: format!("dashboard.json variable {}", v["name"]),
                expr: q.to_string(),
                shown: Vec::new(),
            });
        }
    }
    assert!(
        uses.len() >= 20,
        "dashboard.json: {} targets read",
        uses.len()
    );
    uses
}

/// Label names after each `marker` in a template (`{{model}}`, `$labels.model`).
fn template_labels(text: &str, marker: &str) -> Vec<String> {
    text.split(marker)
        .skip(1)
        .map(|rest| {
            rest.trim_start_matches([' ', '$'])
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// `rankd_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("rankd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Label names in a PromQL expression: matchers inside `{…}` and the lists
/// of `by`, `without`, `on`, `ignoring`, `group_left/right` and `label_values`.
fn label_names(expr: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut labels = BTreeSet::new();
    // Matchers: `{a="x", b=~"y"}` (Grafana's `$__rate_interval` is in `[…]`).
    for part in expr.split('{').skip(1) {
        let inner = part.split('}').next().unwrap_or_default();
        for m in inner.split(',') {
            let l = ident(m);
            if !l.is_empty() {
                labels.insert(l);
            }
        }
    }
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let pat = format!("{kw} (");
        for part in expr.split(&pat).skip(1) {
            let inner = part.split(')').next().unwrap_or_default();
            labels.extend(inner.split(',').map(ident).filter(|l| !l.is_empty()));
        }
    }
    if let Some(rest) = expr.strip_prefix("label_values(") {
        let last = rest.trim_end_matches(')').rsplit(',').next().unwrap();
        labels.insert(ident(last));
    }
    labels
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Metrics only a GPU's NVML reports: a live daemon exports them only on a
/// host with a GPU; where it does not, they must at least be registered by
/// the daemon under this name (all of them carry the `device` label).
fn nvml_only(name: &str) -> bool {
    name.starts_with("rankd_gpu_")
}

/// Series name → label names, from a Prometheus text exposition.
fn exposed(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_string()).or_default();
        if line[end..].starts_with('{') {
            let inner = &line[end + 1..line.find('}').unwrap()];
            for pair in inner.split("\",") {
                if let Some((k, _)) = pair.split_once('=') {
                    labels.insert(k.trim().to_string());
                }
            }
        }
    }
    out
}

/// Every name and label of `uses` exists in `live`; the problems otherwise.
fn missing(uses: &[Use], live: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let source = std::fs::read_to_string(repo_root().join("crates/daemon/src/metrics.rs")).unwrap();
    let mut problems = Vec::new();
    for u in uses {
        let names = metric_names(&u.expr);
        if names.is_empty() {
            // Only `up`, Prometheus's own.
            assert!(
                u.expr.starts_with("up{"),
                "{}: no rankd metric in {}",
                u.place,
                u.expr
            );
            continue;
        }
        let mut have: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
        for n in &names {
            match live.get(n) {
                Some(labels) => have.extend(labels.iter().cloned()),
                None if nvml_only(n) => {
                    if !source.contains(&format!("\"{n}\"")) {
                        problems.push(format!("{}: {n} is not a rankd metric", u.place));
                    }
                    have.insert("device".into());
                }
                None => problems.push(format!("{}: {n} is not exported", u.place)),
            }
        }
        for l in label_names(&u.expr).iter().chain(&u.shown) {
            if !have.contains(l) {
                problems.push(format!(
                    "{}: label {l} is on none of {names:?} ({})",
                    u.place, u.expr
                ));
            }
        }
    }
    problems
}

#[test]
fn the_expression_parser_finds_names_and_labels() {
    let e = r#"sum by (model, le) (rate(rankd_x_bucket{instance=~"$instance",status=~"429|504"}[$__rate_interval])) / on (instance) rankd_y"#;
    assert_eq!(
        metric_names(e),
        ["rankd_x_bucket", "rankd_y"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert_eq!(
        label_names(e),
        ["instance", "le", "model", "status"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert_eq!(
        template_labels("{{model}} v{{ version }}", "{{"),
        ["model", "version"]
    );
    assert_eq!(
        template_labels("on {{ $labels.instance }}", "$labels."),
        ["instance"]
    );
    let live = exposed("# HELP a b\nrankd_y{model=\"a,b\",device=\"c\"} 1\nrankd_z 2\n");
    assert_eq!(live["rankd_y"].len(), 2, "{live:?}");
    assert!(live["rankd_z"].is_empty());
    // A renamed metric or label is caught.
    let uses = [Use {
        place: "t".into(),
        expr: "sum by (route) (rankd_y)".into(),
        shown: vec![],
    }];
    assert_eq!(missing(&uses, &live).len(), 1);
}

/// Every path a dashboard panel watches, run once: recommend and score, user
/// and item writes, overload (429), a passed deadline (504), CPU fallback (a
/// device that fails every third batch), Kafka ingestion and a snapshot.
#[cfg(feature = "kafka")]
#[tokio::test]
async fn every_metric_and_label_in_the_rules_and_the_dashboard_is_exported() {
    use crate::common::kafka::Broker;
    let broker = Broker::start();
    broker.create_topics(&["rankd.events", "rankd.items"], 1);
    let dir = slow_repo(300_000, 1);
    // `shed`: the slow model, degrading what it sheds and answering new
    // users from popularity.
    derived_model(dir.path(), "shed", "demo", |t| {
        let t = t
            .replace("max_queue_delay_us = 500", "max_queue_delay_us = 300000")
            .replace("max_queue_size = 1024", "max_queue_size = 1");
        format!("degrade = \"popular\"\n{t}")
    });
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &[
            "--device",
            "faulty-cpu:3",
            "--kafka-brokers",
            &broker.bootstrap(),
            "--snapshot-dir",
            state.path().to_str().unwrap(),
            "--snapshot-interval-ms",
            "100",
        ],
    );
    let c = Daemon::client();
    for u in 0..6u64 {
        let (s, body) = post(
            &c,
            &d.url(&format!("/v1/users/{u}")),
            json!({ "history": [u + 1, u + 2] }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/recommend"),
            json!({ "user_id": u, "k": 3 }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        // A click on a recommended item: a hit for online evaluation.
        if u == 0 {
            let clicked = ids(&body)[0];
            let (s, body) = post(
                &c,
                &d.url(&format!("/v1/users/{u}")),
                json!({ "history": [u + 1, u + 2, clicked] }),
            )
            .await;
            assert_eq!(s, 200, "{body}");
        }
        let (s, body) = post(
            &c,
            &d.url("/v1/models/demo/score"),
            json!({ "user_id": u, "items": [1, 2, 3] }),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let embedding: Vec<f64> = (0..64).map(|i| f64::from(i) / 64.0).collect();
    let (s, body) = post(
        &c,
        &d.url("/v1/items/5"),
        json!({ "embedding": embedding, "version": 7 }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    // The slow model's one-slot queue: a waiting request with a short
    // deadline (504), and one more that finds the queue full (429).
    let url = d.url("/v1/models/slow/recommend");
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, json!({ "user_id": 1, "timeout_ms": 50 })).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, body) = post(&c, &url, json!({ "user_id": 2 })).await;
    assert_eq!(s, 429, "{body}");
    let (s, body) = first.await.unwrap();
    assert_eq!(s, 504, "{body}");
    // `shed`: one request holds the queue, the next is degraded; a user
    // without state is a cold start.
    let url = d.url("/v1/models/shed/recommend");
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, json!({ "user_id": 1 })).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, body) = post(&c, &url, json!({ "user_id": 2 })).await;
    assert_eq!((s, &body["degraded"]), (200, &json!(true)), "{body}");
    assert_eq!(first.await.unwrap().0, 200);
    let (s, body) = post(&c, &url, json!({ "user_id": 999_999 })).await;
    assert_eq!((s, &body["cold_start"]), (200, &json!(true)), "{body}");
    // Kafka: clicks applied (lag, freshness, applied counts).
    let producer = broker.producer();
    for i in 0..20u64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let event = json!({"user_id": i % 4, "item_id": i + 10, "type": "click", "ts_ms": now_ms});
        producer.send("rankd.events", &(i % 4).to_string(), &event.to_string());
    }
    // And one that is not JSON (rejected).
    producer.send("rankd.events", "0", "{not json");
    producer.flush();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = metrics(&c, &d).await;
        let applied = sample(
            &text,
            "rankd_ingest_updates_applied_total{topic=\"rankd.events\"}",
        )
        .unwrap_or(0.0);
        let lag = text.contains("rankd_ingest_lag{");
        let fallback = text.contains("rankd_fallback_total{");
        let rejected = text.contains("rankd_ingest_rejected_total{");
        if applied >= 20.0 && lag && fallback && rejected {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "ingestion, rejection and fallback not seen within 30 s:\n{text}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sample(&text, "rankd_kafka_connected"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "rankd_ingest_enabled"), Some(1.0), "{text}");
    let live = exposed(&text);
    let uses: Vec<Use> = rule_uses().into_iter().chain(dashboard_uses()).collect();
    let problems = missing(&uses, &live);
    assert!(
        problems.is_empty(),
        "the monitoring uses what rankd does not export:\n{}\n\n{text}",
        problems.join("\n")
    );
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let promtool = prometheus_tool("RANKD_PROMTOOL", "promtool");
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts_test.yaml"][..],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(monitoring_dir())
            .output()
            .expect("running promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
    // Every alert in the rules has a unit test and a runbook entry.
    let rules = std::fs::read_to_string(monitoring_dir().join("alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(monitoring_dir().join("alerts_test.yaml")).unwrap();
    let readme = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert:") {
            let name = name.trim();
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "{name} has no test in alerts_test.yaml"
            );
            assert!(
                readme.contains(&format!("**{name}**")),
                "{name} has no runbook entry in docs/operations.md"
            );
        }
    }
}

/// A Prometheus server in a temporary folder, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second and evaluates `rules` every second.
    fn start(target: &str, rules: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: rankd\n    static_configs:\n      - targets: [{target:?}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_tool("RANKD_PROMETHEUS", "prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn prometheus_raises_the_shed_rate_alert_when_rankd_is_overloaded() {
    // The slow model waits 300 ms for company with a one-slot queue: of a
    // handful of concurrent requests, all but one are shed with 429.
    let dir = slow_repo(300_000, 1);
    let d = Daemon::start_with(dir.path(), &[]);
    let prom = Prometheus::start(&d.addr(), &monitoring_dir().join("alerts.yaml"));
    let c = Daemon::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Prometheus up, its rules loaded and rankd scraped.
    loop {
        let r = c.get(format!("{}/api/v1/targets", prom.url)).send().await;
        if let Ok(r) = r {
            let v: Value = r.json().await.unwrap_or_default();
            let health = &v["data"]["activeTargets"][0]["health"];
            if health == "up" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped rankd:\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = d.url("/v1/models/slow/recommend");
    let mut shed = 0;
    let alert = loop {
        let wave = futures::future::join_all((0..4u64).map(|u| {
            let (c, url) = (c.clone(), url.clone());
            async move { post(&c, &url, json!({ "user_id": u })).await.0 }
        }))
        .await;
        shed += wave.iter().filter(|&&s| s == 429).count();
        let v: Value = c
            .get(format!("{}/api/v1/alerts", prom.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let found = v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == "RankdShedRateHigh")
            .cloned();
        if let Some(a) = found {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no RankdShedRateHigh alert after {shed} shed requests: {v}\n{}",
            prom.log()
        );
    };
    assert!(shed > 0, "rankd shed nothing");
    assert_eq!(alert["labels"]["model"], "slow", "{alert}");
    assert_eq!(alert["labels"]["instance"], d.addr().as_str(), "{alert}");
    assert!(
        alert["state"] == "pending" || alert["state"] == "firing",
        "{alert}"
    );
    let summary = alert["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("slow") && summary.contains("429"),
        "{summary}"
    );
    // The demo model, not overloaded, raises nothing; rankd is up.
    let v: Value = c
        .get(format!("{}/api/v1/alerts", prom.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for a in v["data"]["alerts"].as_array().unwrap() {
        assert_ne!(a["labels"]["model"], "demo", "{a}");
        assert_ne!(a["labels"]["alertname"], "RankdDown", "{a}");
    }
}
