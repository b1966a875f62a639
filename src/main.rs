//! The `rankd` command line: parse, build a config, hand over to the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rankd",
    version,
    about = "A batch inference daemon for real-time recommendations"
)]
struct Cli {
    /// Log lines on stderr: text (ANSI colours only on a terminal) or json
    /// (one object per line: timestamp, level, target, fields)
    #[arg(
        long,
        global = true,
        env = "RANKD_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by `RANKD_LOG` (default `info`), and span
/// export when `tracing` names an OTLP endpoint.
fn init_logs(
    format: LogFormat,
    tracing: Option<&rankd::config::TracingConfig>,
) -> anyhow::Result<rankd::trace::Guard> {
    rankd::trace::init(format == LogFormat::Json, tracing)
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of a repository over HTTP
    Serve(Box<rankd::config::ServeArgs>),
    /// Drive load at a daemon and report throughput, latency and batch sizes
    Bench(Box<rankd_tools::bench::BenchArgs>),
    /// Check the GPU backend: kernels against the CPU reference, bandwidth,
    /// fused top-k against GEMM + top-k (--dry-run: the host-side parts only)
    #[cfg(feature = "cuda")]
    GpuCheck {
        /// Run without a GPU: references, inputs and NVRTC compiles only
        #[arg(long)]
        dry_run: bool,
        /// GPU ordinal
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Print the configuration reference of `rankd serve` (flag, environment
    /// variable, config file key, default, meaning) as a Markdown table, from
    /// the CLI's own definitions; the README's table is this output
    ConfigReference,
    /// Manage the model repository
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Write the demo repository's missing files (deterministic, from a fixed seed)
    Generate {
        /// Repository to write into
        #[arg(
            long,
            env = "RANKD_MODELS",
            default_value = "./models",
            value_name = "DIR"
        )]
        models: PathBuf,
        /// Seed for the generated weights
        #[arg(long, default_value_t = rankd::DEMO_SEED)]
        seed: u64,
        /// Items in the generated catalogue (ids 1..=N, drawn like the demo's;
        /// the default writes the bundled demo's bytes). The items file is
        /// written as it is drawn: N = 10,000,000 makes a 2.6 GB file
        #[arg(long, default_value_t = rankd::DEMO_ITEMS, value_name = "N")]
        items: usize,
    },
}

fn main() -> anyhow::Result<()> {
    rankd::tune_allocator();
    let Cli {
        log_format,
        command,
    } = Cli::parse();
    let config = match &command {
        Command::Serve(args) => Some(args.clone().into_config()?),
        _ => None,
    };
    // Dropped last: flushes the spans still buffered once the daemon stopped.
    let _logs = init_logs(log_format, config.as_ref().map(|c| &c.tracing))?;
    match command {
        Command::Serve(_) => {
            let config = config.expect("read above");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async { rankd::run(config, shutdown_signal()).await })
        }
        Command::Bench(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(rankd_tools::bench::run(*args))
            .map(|_| ()),
        #[cfg(feature = "cuda")]
        Command::GpuCheck { dry_run, device } => {
            let table = rankd_tools::gpu_check::run_check(rankd_tools::gpu_check::CheckOptions {
                dry_run,
                ordinal: device,
                ..Default::default()
            })?;
            println!("{table}");
            Ok(())
        }
        Command::ConfigReference => {
            print!("{}", config_reference());
            Ok(())
        }
        Command::Models {
            command:
                ModelsCommand::Generate {
                    models,
                    seed,
                    items,
                },
        } => {
            let written = rankd::generate_demo_items(&models, seed, items)?;
            for f in &written {
                println!("wrote {}", models.join(f).display());
            }
            if written.is_empty() {
                println!("{}: every demo file is already there", models.display());
            }
            Ok(())
        }
    }
}

/// The `rankd serve` options as a Markdown table, one row per option and one
/// per key of the config file that no flag sets, grouped by their help
/// heading, rendered from clap's definitions and the config's own keys and
/// defaults.
fn config_reference() -> String {
    use clap::CommandFactory;
    use rankd::config::{Config, FILE_ONLY_KEYS};
    let cli = Cli::command();
    let serve = cli
        .find_subcommand("serve")
        .expect("the serve subcommand")
        .clone();
    let mut args: Vec<&clap::Arg> = serve
        .get_arguments()
        .chain(cli.get_arguments().filter(|a| a.is_global_set()))
        .filter(|a| a.get_long().is_some() && a.get_id() != "help")
        .collect();
    // Stable: the help's own order within each heading, headings in order of
    // first appearance; a file-only key closes its heading's group.
    let mut headings: Vec<&str> = Vec::new();
    for a in &args {
        let h = a.get_help_heading().unwrap_or("General");
        if !headings.contains(&h) {
            headings.push(h);
        }
    }
    let position = |h: &str| headings.iter().position(|x| *x == h).unwrap_or(0);
    args.sort_by_key(|a| position(a.get_help_heading().unwrap_or("General")));
    let mut rows: Vec<(usize, String)> = Vec::new();
    for a in args {
        let long = a.get_long().unwrap_or_default();
        let value = a
            .get_value_names()
            .and_then(|v| v.first())
            .map(|v| format!(" {v}"))
            .unwrap_or_default();
        let takes_value = a.get_num_args().is_none_or(|n| n.takes_values());
        let flag = if takes_value && !value.is_empty() {
            format!("`--{long}{value}`")
        } else if takes_value {
            format!("`--{long} {}`", long.to_uppercase().replace('-', "_"))
        } else {
            format!("`--{long}`")
        };
        let env = a
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let key = Config::file_key(long);
        let file_key = match key {
            Some("kafka_properties") => "`[kafka_properties]`".to_string(),
            Some(k) => format!("`{k}`"),
            None => String::new(),
        };
        let defaults: Vec<String> = a
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        let mut help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        // Options merged from flags, RANKD_* and the config file carry their
        // default in the help text: it moves to its own column, as a value
        // when the file has it, as words ("none", "off") when it is unset.
        let mut default = if defaults.is_empty() {
            String::new()
        } else {
            format!("`{}`", defaults.join(","))
        };
        if let Some(i) = help.find(" [default: ") {
            if default.is_empty() {
                let d = help[i + " [default: ".len()..].trim_end_matches(']');
                default = if key.and_then(Config::default_toml).is_some() {
                    format!("`{d}`")
                } else {
                    cell(d)
                };
            }
            help.truncate(i);
        }
        let heading = a.get_help_heading().unwrap_or("General");
        rows.push((
            position(heading),
            format!(
                "| {flag} | {env} | {file_key} | {default} | {}: {} |\n",
                cell(heading),
                cell(&help)
            ),
        ));
    }
    for (key, heading, meaning) in FILE_ONLY_KEYS {
        let default = Config::default_toml(key)
            .map(|d| format!("`{}`", d.replace('|', "\\|")))
            .unwrap_or_default();
        rows.push((
            position(heading),
            format!(
                "|  |  | `{key}` | {default} | {}: {} |\n",
                cell(heading),
                cell(meaning)
            ),
        ));
    }
    rows.sort_by_key(|(heading, _)| *heading);
    let mut out =
        String::from("| flag | env | file key | default | meaning |\n|---|---|---|---|---|\n");
    for (_, row) in rows {
        out.push_str(&row);
    }
    out
}

/// Text for a Markdown table cell: on one line, `|` escaped, and outside
/// code spans `<`, `>` and `*` escaped, so that `DIR/<name>` is not taken
/// for an HTML tag nor `RANKD_*` for emphasis.
fn cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_code = false;
    for c in s.chars() {
        match c {
            '`' => in_code = !in_code,
            '\n' => {
                out.push(' ');
                continue;
            }
            '|' => out.push('\\'),
            '<' | '>' | '*' if !in_code => out.push('\\'),
            _ => {}
        }
        out.push(c);
    }
    out
}

/// Resolves on SIGINT or SIGTERM, the first of them; a second one while
/// draining exits at once with status 130. The handlers are installed when
/// this is called (before the ready line), not when first polled.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (mut term, mut int) = match (term, int) {
            (Ok(t), Ok(i)) => (t, i),
            _ => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("rankd: second signal while draining; exiting now");
            std::process::exit(130);
        });
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
