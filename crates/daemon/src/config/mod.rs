//! Daemon configuration: the defaults, overridden by an optional TOML file,
//! overridden by flags and `RANKD_*` environment variables (clap reads both).
//!
//! It comes in sections, one per part of the daemon that uses it, each with
//! its defaults, its checks and its flags: models and device (`exec`), HTTP
//! (`http`), request deadlines (`requests`), the Unix socket (`socket`), Kafka
//! ingestion (`kafka`), snapshots (`snapshot`), model lifecycle
//! (`lifecycle`), tokens (`access`), TLS (`tls`), shutdown and durability
//! (`durability`), overload answers (`pressure`), the limits on slow, idle
//! and too many clients (`connections`) and span export (`tracing`). The file stays flat: every
//! key is at the top level (plus the `[kafka_properties]` table), named like
//! its flag, and a key no section knows is an error.
//!
//! Each setting is defined once, as an entry of its section's
//! [`settings!`](setting::settings): its field, default, file key, flag,
//! variable and help all come from that entry ([`setting`]).

mod access;
mod connections;
mod durability;
mod exec;
mod http;
mod kafka;
mod lifecycle;
mod pressure;
mod requests;
mod setting;
mod snapshot;
mod socket;
mod tls;
mod tracing;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use access::{AccessArgs, AccessConfig};
pub use connections::{ConnectionsArgs, ConnectionsConfig};
pub use durability::{DurabilityArgs, DurabilityConfig, WalSync};
pub use exec::{ExecArgs, ExecConfig};
pub use http::{HttpArgs, HttpConfig};
pub use kafka::{KafkaArgs, KafkaConfig};
pub use lifecycle::{LifecycleArgs, LifecycleConfig};
pub use pressure::{PressureArgs, PressureConfig};
pub use requests::{RequestArgs, RequestConfig};
pub use setting::Setting;
pub use snapshot::{SnapshotArgs, SnapshotConfig};
pub use socket::{SocketArgs, SocketConfig};
pub use tls::{TlsArgs, TlsConfig};
pub use tracing::{OtlpProtocol, TracingArgs, TracingConfig};

/// The whole configuration. In the file (and written back with serde) the
/// sections' keys all sit at the top level.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Config {
    #[serde(flatten)]
    pub exec: ExecConfig,
    #[serde(flatten)]
    pub http: HttpConfig,
    #[serde(flatten)]
    pub requests: RequestConfig,
    #[serde(flatten)]
    pub socket: SocketConfig,
    #[serde(flatten)]
    pub kafka: KafkaConfig,
    #[serde(flatten)]
    pub snapshot: SnapshotConfig,
    #[serde(flatten)]
    pub lifecycle: LifecycleConfig,
    #[serde(flatten)]
    pub access: AccessConfig,
    #[serde(flatten)]
    pub tls: TlsConfig,
    #[serde(flatten)]
    pub durability: DurabilityConfig,
    #[serde(flatten)]
    pub pressure: PressureConfig,
    #[serde(flatten)]
    pub connections: ConnectionsConfig,
    #[serde(flatten)]
    pub tracing: TracingConfig,
}

impl Config {
    /// Every setting, section by section, in the order of the help.
    pub fn settings() -> impl Iterator<Item = &'static Setting> {
        SECTIONS.iter().copied().flatten()
    }

    /// Every key of the config file, section by section.
    pub fn keys() -> impl Iterator<Item = &'static str> {
        Self::settings().map(|s| s.key)
    }

    /// The key of the config file that flag `--LONG` sets: its name with `_`
    /// for `-`, `kafka_properties` for the repeatable `--kafka-property`;
    /// `None` for a flag the file has no key for (`--config`).
    pub fn file_key(long: &str) -> Option<&'static str> {
        Self::settings()
            .find(|s| s.flag == Some(long))
            .map(|s| s.key)
    }

    /// A key's default as TOML (`1000`, `"./models"`, `["click", ...]`);
    /// `None` for a key that is unset by default (`kafka_brokers`, the token
    /// files, ...) or an empty table.
    pub fn default_toml(key: &str) -> Option<String> {
        Self::default_value(key).map(|v| v.to_string())
    }

    fn default_value(key: &str) -> Option<toml::Value> {
        setting::default_value(&Self::default(), key)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config file {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// The document is parsed once and each section reads its own keys from
    /// it (rather than through `#[serde(flatten)]`, which loses where a wrong
    /// value is); a key no section knows is looked for here, as a section's
    /// `deny_unknown_fields` would refuse the other sections' keys.
    fn from_toml(text: &str) -> Result<Self, String> {
        let doc = crate::toml_doc::Doc::parse(text)?;
        doc.refuse_unknown(Self::keys())?;
        Ok(Self {
            exec: doc.part()?,
            http: doc.part()?,
            requests: doc.part()?,
            socket: doc.part()?,
            kafka: doc.part()?,
            snapshot: doc.part()?,
            lifecycle: doc.part()?,
            access: doc.part()?,
            tls: doc.part()?,
            durability: doc.part()?,
            pressure: doc.part()?,
            connections: doc.part()?,
            tracing: doc.part()?,
        })
    }

    /// A copy safe to log: values of secret-looking Kafka properties hidden.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.kafka.redact();
        c
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.http.validate()?;
        self.requests.validate()?;
        self.socket.validate()?;
        self.kafka.validate()?;
        self.snapshot.validate()?;
        self.lifecycle.validate()?;
        self.access.validate()?;
        self.tls.validate()?;
        self.durability.validate()?;
        self.pressure.validate()?;
        self.connections.validate()?;
        self.tracing.validate()?;
        self.exec.validate()
    }
}

/// Each section's settings, in the order of the file's keys and the help.
const SECTIONS: &[&[Setting]] = &[
    ExecConfig::SETTINGS,
    HttpConfig::SETTINGS,
    RequestConfig::SETTINGS,
    SocketConfig::SETTINGS,
    KafkaConfig::SETTINGS,
    SnapshotConfig::SETTINGS,
    LifecycleConfig::SETTINGS,
    AccessConfig::SETTINGS,
    TlsConfig::SETTINGS,
    DurabilityConfig::SETTINGS,
    PressureConfig::SETTINGS,
    ConnectionsConfig::SETTINGS,
    TracingConfig::SETTINGS,
];

/// The keys of the config file that no flag sets, each with its help heading
/// and meaning, for `rankd config-reference`: the settings without a flag.
pub const FILE_ONLY_KEYS: &[(&str, &str, &str)] = &file_only::<{ file_only_count() }>();

const fn file_only_count() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < SECTIONS.len() {
        let mut j = 0;
        while j < SECTIONS[i].len() {
            if SECTIONS[i][j].flag.is_none() {
                n += 1;
            }
            j += 1;
        }
        i += 1;
    }
    n
}

const fn file_only<const N: usize>() -> [(&'static str, &'static str, &'static str); N] {
    let mut out = [("", "", ""); N];
    let mut n = 0;
    let mut i = 0;
    while i < SECTIONS.len() {
        let mut j = 0;
        while j < SECTIONS[i].len() {
            let s = &SECTIONS[i][j];
            if s.flag.is_none() {
                out[n] = (s.key, s.heading, s.doc);
                n += 1;
            }
            j += 1;
        }
        i += 1;
    }
    out
}

/// `rankd serve` flags, a group per section. Each is optional so that an
/// unset flag leaves the config file's value (or the default) in place.
#[derive(Debug, Clone, Default, clap::Args)]
// Each help text under its flag, in every group alike.
#[command(next_line_help = true)]
pub struct ServeArgs {
    /// TOML config file with any of the keys below; flags and RANKD_* variables win
    #[arg(long, env = "RANKD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub exec: ExecArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub requests: RequestArgs,
    #[command(flatten)]
    pub socket: SocketArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub snapshot: SnapshotArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub durability: DurabilityArgs,
    #[command(flatten)]
    pub pressure: PressureArgs,
    #[command(flatten)]
    pub connections: ConnectionsArgs,
    #[command(flatten)]
    pub tracing: TracingArgs,
}

impl ServeArgs {
    /// The defaults, then the file, then the flags and variables; checked.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.exec.apply(&mut c.exec)?;
        self.http.apply(&mut c.http)?;
        self.requests.apply(&mut c.requests)?;
        self.socket.apply(&mut c.socket)?;
        self.kafka.apply(&mut c.kafka)?;
        self.snapshot.apply(&mut c.snapshot)?;
        self.lifecycle.apply(&mut c.lifecycle)?;
        self.access.apply(&mut c.access)?;
        self.tls.apply(&mut c.tls)?;
        self.durability.apply(&mut c.durability)?;
        self.pressure.apply(&mut c.pressure)?;
        self.connections.apply(&mut c.connections)?;
        self.tracing.apply(&mut c.tracing)?;
        c.validate()?;
        Ok(c)
    }
}

/// `''` turns an optional path (or URL) off.
fn off_if_empty<T: From<String>>(value: String) -> Option<T> {
    (!value.is_empty()).then(|| T::from(value))
}

/// A path in the file that `""` turns off (`None`), written back as `""`.
mod optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match path {
            Some(p) => p.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        Ok(super::off_if_empty(String::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `rankd serve ARGS`, as the command line parses it.
    fn serve(args: &[&str]) -> ServeArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap()
            .serve
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rankd.toml");
        std::fs::write(
            &path,
            "http = \"0.0.0.0:9000\"\ndefault_timeout_ms = 20\nuds_max_inflight = 7\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = serve(&["--config", file, "--default-timeout-ms", "30"])
            .into_config()
            .unwrap();
        assert_eq!(c.http.listen, "0.0.0.0:9000");
        assert_eq!(c.requests.default_timeout_ms, 30);
        assert_eq!(c.socket.max_inflight, 7);
        assert_eq!(c.exec.models, PathBuf::from("./models"));
        assert_eq!(c.socket.path, Some(PathBuf::from("./rankd.sock")));

        let args = ServeArgs {
            config: Some(path.clone()),
            requests: RequestArgs {
                max_timeout_ms: Some(10),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = args.into_config().unwrap_err().to_string();
        assert_eq!(err, "default_timeout_ms must be in 1..=10, got 20");
    }

    #[test]
    fn every_key_of_the_file_is_read() {
        let text = r#"
            models = "m"
            http = "127.0.0.1:1"
            device = "cpu"
            max_body_bytes = 2
            default_timeout_ms = 3
            max_timeout_ms = 4
            uds = "s.sock"
            max_frame_bytes = 5
            uds_max_inflight = 6
            uds_write_timeout_ms = 7
            kafka_brokers = "b:9092"
            kafka_group = "g"
            kafka_events_topic = "e"
            kafka_items_topic = "i"
            kafka_users_topic = "u"
            kafka_dead_letter_topic = "d"
            kafka_event_types = ["view"]
            ingest_batch_max = 8
            ingest_batch_wait_us = 9
            snapshot_dir = "state"
            snapshot_interval_ms = 10
            history_max = 11
            onnxruntime_lib = "libonnxruntime.so.1.32.0"
            onnx_threads = 22
            max_model_bytes = 23
            query_cache_bytes = 24
            repository_poll_ms = 12
            online_eval_users = 13
            online_eval_window_ms = 14
            admin_token_file = "admin.tokens"
            client_token_file = "client.tokens"
            uds_mode = "0600"
            uds_group = "rankd"
            tls_cert = "cert.pem"
            tls_key = "key.pem"
            shutdown_delay_ms = 15
            grace_ms = 16
            wal_sync = "off"
            max_users = 17
            header_timeout_ms = 18
            idle_timeout_ms = 19
            max_connections = 20
            degrade = "popular"
            popularity_half_life_s = 21
            otlp_endpoint = "http://collector:4318"
            otlp_protocol = "http/json"

            [kafka_properties]
            "client.id" = "c"
        "#;
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.exec.models, PathBuf::from("m"));
        assert_eq!(c.http.listen, "127.0.0.1:1");
        assert_eq!(c.exec.device, "cpu");
        assert_eq!(c.http.max_body_bytes, 2);
        assert_eq!(
            c.requests.default_timeout(),
            std::time::Duration::from_millis(3)
        );
        assert_eq!(c.requests.max_timeout_ms, 4);
        assert_eq!(c.socket.path, Some(PathBuf::from("s.sock")));
        assert_eq!(c.socket.max_frame_bytes, 5);
        assert_eq!(c.socket.max_inflight, 6);
        assert_eq!(c.socket.write_timeout_ms, 7);
        assert_eq!(c.kafka.brokers.as_deref(), Some("b:9092"));
        assert_eq!(c.kafka.group, "g");
        assert_eq!(c.kafka.events_topic, "e");
        assert_eq!(c.kafka.items_topic, "i");
        assert_eq!(c.kafka.users_topic, "u");
        assert_eq!(c.kafka.dead_letter_topic.as_deref(), Some("d"));
        assert_eq!(c.kafka.event_types, ["view"]);
        assert_eq!(c.kafka.properties["client.id"], "c");
        assert_eq!(c.kafka.batch_max, 8);
        assert_eq!(c.kafka.batch_wait_us, 9);
        assert_eq!(c.snapshot.dir, Some(PathBuf::from("state")));
        assert_eq!(c.snapshot.interval_ms, 10);
        assert_eq!(c.exec.history_max, 11);
        assert_eq!(
            c.exec.onnxruntime_lib,
            Some(PathBuf::from("libonnxruntime.so.1.32.0"))
        );
        assert_eq!(c.exec.onnx_threads, 22);
        assert_eq!(c.exec.max_model_bytes, 23);
        assert_eq!(c.exec.query_cache_bytes, 24);
        assert_eq!(c.lifecycle.repository_poll_ms, 12);
        assert_eq!(c.lifecycle.online_eval_users, 13);
        assert_eq!(c.lifecycle.online_eval_window_ms, 14);
        assert_eq!(
            c.access.admin_token_file,
            Some(PathBuf::from("admin.tokens"))
        );
        assert_eq!(
            c.access.client_token_file,
            Some(PathBuf::from("client.tokens"))
        );
        assert_eq!(c.access.uds_mode_bits().unwrap(), 0o600);
        assert_eq!(c.access.uds_group.as_deref(), Some("rankd"));
        assert_eq!(c.tls.tls_cert, Some(PathBuf::from("cert.pem")));
        assert_eq!(c.tls.tls_key, Some(PathBuf::from("key.pem")));
        assert_eq!(c.durability.shutdown_delay_ms, 15);
        assert_eq!(c.durability.grace_ms, 16);
        assert_eq!(c.durability.wal_sync, WalSync::Off);
        assert_eq!(c.durability.max_users, 17);
        assert_eq!(c.connections.header_timeout_ms, 18);
        assert_eq!(c.connections.idle_timeout_ms, 19);
        assert_eq!(c.connections.max_connections, 20);
        assert_eq!(c.pressure.degrade, crate::model::spec::Degrade::Popular);
        assert_eq!(c.pressure.popularity_half_life_s, 21);
        assert_eq!(
            c.tracing.otlp_endpoint.as_deref(),
            Some("http://collector:4318")
        );
        assert_eq!(c.tracing.otlp_protocol, OtlpProtocol::HttpJson);

        // The text above holds every key there is.
        let given: toml::Table = text.parse().unwrap();
        let mut given: Vec<&str> = given.keys().map(String::as_str).collect();
        given.sort_unstable();
        let mut all: Vec<&str> = Config::keys().collect();
        all.sort_unstable();
        assert_eq!(given, all);

        // The sections' key lists are what they read and write, no more.
        let written = toml::Table::try_from(&c).unwrap();
        let mut keys: Vec<&str> = written.keys().map(String::as_str).collect();
        let mut known: Vec<&str> = Config::keys().collect();
        keys.sort_unstable();
        known.sort_unstable();
        assert_eq!(keys, known);
        assert_eq!(Config::from_toml(&toml::to_string(&c).unwrap()).unwrap(), c);
    }

    /// What `rankd config-reference` relies on: every flag but `--config`
    /// sets a key of the file, every key is set by a flag or listed in
    /// [`FILE_ONLY_KEYS`], and the default a help text states is the file's.
    #[test]
    fn flags_keys_and_stated_defaults_agree() {
        use clap::Args;
        let serve = ServeArgs::augment_args(clap::Command::new("serve"));
        let mut by_flags = Vec::new();
        let mut headings = Vec::new();
        for a in serve.get_arguments() {
            let long = a.get_long().expect("every option is a long flag");
            headings.push(a.get_help_heading());
            let Some(key) = Config::file_key(long) else {
                assert_eq!(long, "config", "--{long} sets no key of the file");
                continue;
            };
            by_flags.push(key);
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            let stated = help
                .split_once(" [default: ")
                .map(|(_, d)| d.trim_end_matches(']').to_string());
            let file = Config::default_value(key).map(|v| match v {
                toml::Value::String(s) => s,
                v => v.to_string(),
            });
            match (stated, file) {
                (Some(stated), Some(file)) => assert_eq!(stated, file, "--{long}"),
                // Unset by default: the help says what that means.
                (Some(stated), None) => assert!(
                    ["none", "off", "unchanged", "plain HTTP"].contains(&stated.as_str()),
                    "--{long}: [default: {stated}], but the file's {key} is unset"
                ),
                (None, Some(file)) => panic!("--{long} states no default; the file's is {file}"),
                (None, None) => assert_eq!(long, "kafka-property"),
            }
        }
        for key in Config::keys() {
            let file_only = FILE_ONLY_KEYS.iter().any(|(k, _, _)| *k == key);
            assert!(
                by_flags.contains(&key) != file_only,
                "{key}: set by a flag {}, listed as file-only {file_only}",
                by_flags.contains(&key)
            );
        }
        for (key, heading, _) in FILE_ONLY_KEYS {
            assert!(
                headings.contains(&Some(*heading)),
                "{key}: no heading {heading}"
            );
            assert!(Config::default_toml(key).is_some(), "{key}: no default");
        }
        assert_eq!(Config::file_key("kafka-property"), Some("kafka_properties"));
        assert_eq!(
            Config::file_key("uds-max-inflight"),
            Some("uds_max_inflight")
        );
        assert_eq!(Config::file_key("log-format"), None);
        assert_eq!(
            Config::default_toml("kafka_event_types").as_deref(),
            Some(r#"["click", "add_to_cart", "purchase"]"#)
        );
    }

    /// Each setting's flag, variable and stated default follow from its key
    /// by the rule of [`setting`] (the one repeatable flag aside), clap and
    /// the file agree with them, and the configuration reference in
    /// docs/configuration.md has exactly one row for each.
    #[test]
    fn every_setting_is_named_by_its_key_and_listed_once() {
        use clap::Args;
        let serve = ServeArgs::augment_args(clap::Command::new("serve"));
        let reference = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/configuration.md"
        ))
        .unwrap();
        // flag, env, file key and default of each row.
        let rows: Vec<Vec<&str>> = reference
            .lines()
            .skip_while(|l| !l.starts_with("<!-- config-reference:begin"))
            .skip(3)
            .take_while(|l| !l.starts_with("<!-- config-reference:end"))
            .map(|l| l.split('|').skip(1).take(4).map(str::trim).collect())
            .collect();
        assert!(rows.len() > 40, "no reference in docs/configuration.md");

        let mut not_by_the_rule = Vec::new();
        for s in Config::settings() {
            let key = s.key;
            assert_eq!(Config::keys().filter(|k| *k == key).count(), 1, "{key}");
            assert!(
                !s.doc.is_empty() && !s.doc.contains("[default:") && !s.doc.starts_with(' '),
                "{key}: {:?}",
                s.doc
            );
            let default = Config::default_value(key).map(|v| match v {
                toml::Value::String(s) => s,
                v => v.to_string(),
            });
            assert!(
                default.is_none() || s.unset.is_none(),
                "{key}: a default and words for none"
            );
            let stated = default.clone().or(s.unset.map(str::to_string));

            let row: Vec<&Vec<&str>> = rows
                .iter()
                .filter(|r| r[2] == format!("`{key}`") || r[2] == format!("`[{key}]`"))
                .collect();
            assert_eq!(row.len(), 1, "{key}: rows of the reference {row:?}");
            let row = row[0];
            let in_reference = match (&default, s.unset) {
                (Some(d), _) => format!("`{d}`"),
                (None, Some(words)) => words.to_string(),
                (None, None) => String::new(),
            };
            assert_eq!(row[3], in_reference, "{key}: the reference's default");

            let Some(long) = s.flag else {
                assert_eq!(s.env, None, "{key}");
                let listed: Vec<_> = FILE_ONLY_KEYS.iter().filter(|k| k.0 == key).collect();
                assert_eq!(listed, [&(key, s.heading, s.doc)], "{key}");
                assert_eq!(row[..2], ["", ""], "{key}: the reference's flag");
                continue;
            };
            match s.env {
                Some(env) => {
                    assert_eq!(long, key.replace('_', "-"), "{key}: the flag");
                    assert_eq!(env, format!("RANKD_{}", key.to_uppercase()), "{key}");
                }
                None => not_by_the_rule.push((key, long)),
            }
            let args: Vec<&clap::Arg> = serve
                .get_arguments()
                .filter(|a| a.get_long() == Some(long))
                .collect();
            assert_eq!(args.len(), 1, "--{long}");
            let arg = args[0];
            assert_eq!(arg.get_id(), key, "--{long}");
            assert_eq!(arg.get_help_heading(), Some(s.heading), "--{long}");
            assert_eq!(
                arg.get_env().map(|e| e.to_str().unwrap()),
                s.env,
                "--{long}"
            );
            let help = arg.get_help().unwrap().to_string();
            let want = match &stated {
                Some(d) => format!("{} [default: {d}]", s.doc),
                None => s.doc.to_string(),
            };
            assert_eq!(help, want, "--{long}");
            let value = arg.get_value_names().unwrap()[0].to_string();
            assert_eq!(row[0], format!("`--{long} {value}`"), "{key}");
            assert_eq!(
                row[1],
                s.env.map(|e| format!("`{e}`")).unwrap_or_default(),
                "{key}"
            );
        }
        assert_eq!(not_by_the_rule, [("kafka_properties", "kafka-property")]);

        // Every flag but --config is a setting's, and every row of the
        // reference but those of --config and --log-format is a setting's.
        for a in serve.get_arguments() {
            let long = a.get_long().unwrap();
            assert!(
                long == "config" || Config::file_key(long).is_some(),
                "--{long}"
            );
        }
        let others: Vec<&str> = rows
            .iter()
            .filter(|r| r[2].is_empty())
            .map(|r| r[0])
            .collect();
        assert_eq!(others, ["`--config FILE`", "`--log-format LOG_FORMAT`"]);
        assert_eq!(rows.len(), Config::settings().count() + others.len());
    }

    #[test]
    fn empty_paths_turn_the_socket_and_snapshots_off() {
        let c = serve(&["--uds", "", "--snapshot-dir", ""])
            .into_config()
            .unwrap();
        assert_eq!(c.socket.path, None);
        assert_eq!(c.snapshot.dir, None);
        let c = serve(&["--uds", "a.sock", "--snapshot-dir", "st"])
            .into_config()
            .unwrap();
        assert_eq!(c.socket.path, Some(PathBuf::from("a.sock")));
        assert_eq!(c.snapshot.dir, Some(PathBuf::from("st")));

        let c = Config::from_toml("uds = \"\"\nsnapshot_dir = \"\"\n").unwrap();
        assert_eq!(
            (c.socket.path.clone(), c.snapshot.dir.clone()),
            (None, None)
        );
        // Written back, off stays off.
        let again = Config::from_toml(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rankd.toml");
        std::fs::write(&path, "uds = \"\"\n").unwrap();
        let c = serve(&["--config", path.to_str().unwrap(), "--uds", "b.sock"])
            .into_config()
            .unwrap();
        assert_eq!(c.socket.path, Some(PathBuf::from("b.sock")));
    }

    #[test]
    fn secret_kafka_properties_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rankd.toml");
        std::fs::write(
            &path,
            "[kafka_properties]\n\"sasl.password\" = \"hunter2\"\n\"client.id\" = \"a\"\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        let shown = format!("{:?}", c.redacted());
        assert!(
            !shown.contains("hunter2") && shown.contains("client.id"),
            "{shown}"
        );
        assert_eq!(c.kafka.properties["sasl.password"], "hunter2");
    }

    #[test]
    fn kafka_properties_from_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rankd.toml");
        std::fs::write(
            &path,
            "[kafka_properties]\n\"sasl.password\" = \"hunter2\"\n\"client.id\" = \"a\"\n\"acks\" = \"1\"\n",
        )
        .unwrap();
        let c = serve(&[
            "--config",
            path.to_str().unwrap(),
            "--kafka-property",
            "client.id=b",
            "--kafka-property",
            "fetch.wait.max.ms=50",
            "--kafka-property",
            " sasl.password =a=b",
        ])
        .into_config()
        .unwrap();
        let props = &c.kafka.properties;
        assert_eq!(props["client.id"], "b");
        assert_eq!(props["fetch.wait.max.ms"], "50");
        assert_eq!(props["sasl.password"], "a=b");
        assert_eq!(props["acks"], "1");
        assert!(!format!("{:?}", c.redacted()).contains("a=b"));
        for bad in ["fetch.wait.max.ms", "=50", " =secret"] {
            let err = serve(&["--kafka-property", bad])
                .into_config()
                .unwrap_err()
                .to_string();
            assert!(err.contains("--kafka-property must be KEY=VALUE"), "{err}");
            assert!(!err.contains("50") && !err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rankd.toml");
        std::fs::write(&path, "http = \"x\"\n  htp = \"x\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("unknown field `htp` at line 2, column 3")
                && err.contains("expected one of `models`, "),
            "{err}"
        );
        // The file is flat: a section's name is no key.
        std::fs::write(&path, "[kafka]\nbrokers = \"b:9092\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `kafka`"), "{err}");
        // A wrong type is shown where it is.
        std::fs::write(&path, "http = \"x\"\nuds_max_inflight = \"many\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 2, column 20") && err.contains("invalid type"),
            "{err}"
        );
    }
}
