//! Logs as an operator ships them: `--log-format json` writes one JSON object
//! per line (timestamp, level, target, message and fields); text logs carry no
//! ANSI escapes when stderr is not a terminal.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// Serves one request, then stops the daemon cleanly so its last lines are out.
async fn exercised(extra: &[&str]) -> String {
    let mut d = Daemon::start_with(&demo_models(), extra);
    let c = Daemon::client();
    let (s, body) = post(
        &c,
        &d.url("/v1/models/demo/recommend"),
        json!({"user_id": 1, "k": 3}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        d.signal_and_wait("TERM", Duration::from_secs(10)),
        "rankd stopped on SIGTERM"
    );
    d.log()
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_level_target_and_message() {
    let log = exercised(&["--log-format", "json"]).await;
    assert!(!log.contains('\u{1b}'), "no ANSI escapes: {log}");
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.len() >= 3,
        "start-up, model load and stop are logged: {log}"
    );
    for l in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(l[key].is_string(), "{key} missing in {l}");
        }
        assert!(l["target"].as_str().unwrap().starts_with("rankd"), "{l}");
    }
    let loaded = lines
        .iter()
        .find(|l| l["message"] == "model loaded and warmed" && l["model"] == "demo")
        .unwrap_or_else(|| panic!("no load line for demo: {log}"));
    assert_eq!(loaded["level"], "INFO");
    assert_eq!(
        loaded["device"], "cpu",
        "fields sit beside the message: {loaded}"
    );
    assert!(
        lines.iter().any(|l| l["message"] == "shutting down"),
        "{log}"
    );
}

#[tokio::test]
async fn text_logs_to_a_file_carry_no_ansi_escapes() {
    let log = exercised(&[]).await;
    assert!(log.contains(" INFO "), "text lines: {log}");
    assert!(log.contains("model loaded and warmed"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes when stderr is a file: {log}"
    );
}
