//! `relq`: run the demo, publish, consume, inspect topics and operate dead letters.
//!
//! Exit codes (see [`Exit`]): 0 success, 1 operation failed, 2 bad usage or input (clap's
//! convention), 3 not found, 4 the topic was terminated, 5 `relq check` found damage, 130
//! interrupted.

mod check;
mod consume;
mod demo;
mod dlq;
mod group;
mod route;
mod serve;
mod tail;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relq::{Broker, DeadLetter, Message, MessageId, NewMessage};
use serde_json::json;

/// The backend of every command but the demo when no `--url` is given.
const DEFAULT_URL: &str = "file://relq-data";

#[derive(Parser)]
#[command(
    name = "relq",
    version,
    about = "Reliable message processing: at-least-once delivery, retries, dead letters"
)]
struct Cli {
    /// Backend URL: file:///path (the embedded engine; default file://relq-data, a directory
    /// in the working directory), memory:// (a fresh in-process store, lost at exit),
    /// redis://host:port or redis+cluster://host:port,host:port. Also RELQ_URL, or
    /// backend.url in the configuration file. The demo uses a fresh temporary data directory
    /// unless one of these is given.
    #[arg(long, global = true)]
    url: Option<String>,
    /// Configuration file (TOML, or YAML for .yaml/.yml): see `relq config show`.
    #[arg(long, global = true, env = "RELQ_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the system end to end: producers, consumers with failures, retries and dead letters.
    Demo(demo::DemoArgs),
    /// Serve the HTTP admin API, Prometheus metrics and health checks.
    Serve(serve::ServeArgs),
    /// Publish one message, or (--jsonl) many from JSON lines on stdin.
    Publish {
        /// Topic.
        topic: String,
        /// Message type.
        #[arg(required_unless_present = "jsonl")]
        kind: Option<String>,
        /// Payload (UTF-8 text); `-` reads it from stdin.
        #[arg(required_unless_present_any = ["file", "jsonl"], conflicts_with = "file")]
        payload: Option<String>,
        /// Read messages from stdin, one JSON object per line:
        /// {"type": "...", "payload": "text" or any JSON value (published as its JSON text),
        /// "payload_hex": "00ff..", "headers": {"k": "v"}, "delay": "5s", "ttl": "10m",
        /// "compress": "zstd", "idempotency_key": "order-42", "ordering_key": "customer-7"};
        /// published in batches with a progress bar. A bad line stops it: the lines before it
        /// are published.
        #[arg(long, conflicts_with_all = ["kind", "payload", "file", "headers", "delay", "ttl", "idempotency_key", "ordering_key"])]
        jsonl: bool,
        /// Messages per batch with --jsonl.
        #[arg(long, default_value_t = 500, requires = "jsonl")]
        batch: usize,
        /// Read the payload from this file (any bytes).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Header as name=value (repeatable).
        #[arg(short = 'H', long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Deliver after this delay (e.g. 5s, 2m).
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        /// Time to live (e.g. 10m): a consumer that takes it later does not handle it (it
        /// becomes a dead letter with reason `expired`, or is dropped).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Store the payload compressed: lz4, gzip or zstd (kept as it is if that would not
        /// make it smaller); consumers see it decompressed. With --jsonl, for every line
        /// without its own "compress".
        #[arg(long, value_parser = parse_compression)]
        compress: Option<relq::Compression>,
        /// Publish at most once per key within the topic's deduplication window (default 2m,
        /// `[[topics]] dedup_window`): a repeat stores nothing and prints the first message's
        /// id, so a script may retry a publish it is unsure of.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Order by this key in every group: the key's messages are handled one at a time, in
        /// publish order, across every consumer of a group.
        #[arg(long)]
        ordering_key: Option<String>,
    },
    /// Consume and print messages, acknowledging each only after it was written to stdout.
    Consume(consume::ConsumeArgs),
    /// Show topics, groups, pending, lag and dead letters.
    Info {
        /// One topic (default: all).
        topic: Option<String>,
    },
    /// List topic names.
    Topics,
    /// Follow new messages of a topic live, without joining a group (nothing changes).
    Tail(tail::TailArgs),
    /// Run routes until SIGINT or SIGTERM: forward every message of the topics matching a
    /// pattern into other topics, at least once (a source message is acknowledged only after
    /// every target stored it). `relq route NAME PATTERN TARGET...`, or every `[[routes]]` of
    /// the configuration.
    Route(route::RouteArgs),
    /// Show one message: its payload and headers, and where it stands in each group (unread,
    /// pending with its consumer and delivery count, scheduled with its due time, stopped,
    /// done) and its dead letters.
    Message {
        /// Topic.
        topic: String,
        /// Message id.
        id: MessageId,
    },
    /// The audit log: every operator action that changed state (API and command line), newest
    /// first.
    Audit {
        /// Entries before this id (the `next` of the previous page).
        #[arg(long)]
        before: Option<MessageId>,
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Terminate a topic: remove its messages, groups, pending and scheduled state and dead
    /// letters; its consumers stop. Asks to type the topic's name unless --yes.
    Terminate {
        topic: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Remove messages every group acknowledged (older than --min-age), and apply --max-len.
    Cleanup {
        topic: String,
        /// Keep acknowledged messages younger than this.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        min_age: Duration,
        /// Keep at most this many messages, removing the oldest even if a group has not
        /// acknowledged them (they are counted as trimmed).
        #[arg(long)]
        max_len: Option<u64>,
        /// Only show what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop one message for every group: held back, neither processed nor lost, until resumed.
    Stop { topic: String, id: relq::MessageId },
    /// Resume a stopped message.
    Resume { topic: String, id: relq::MessageId },
    /// Validate a configuration file, or show the effective configuration and where each value
    /// comes from (flags > RELQ_* environment > file > defaults).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Benchmarks (embedded, redis, memory); every figure in the docs comes from here. Runs the
    /// relq-bench binary (beside relq, or on the PATH), so relq itself links no benchmark code.
    #[command(disable_help_flag = true)]
    Bench {
        /// What relq-bench takes: `relq bench --help`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Verify a data directory (the embedded engine): every segment's checksums and the state
    /// database's consistency with the logs. Changes nothing; works while another process holds
    /// the directory. Exit 0 when nothing needs the operator, 5 when damage was found.
    Check {
        /// The data directory (default: the --url's directory, or ./relq-data).
        dir: Option<std::path::PathBuf>,
        /// After reporting, cut damaged records (and every record after them in that segment)
        /// out of active segments, so the directory opens again. Records cut are lost: restore
        /// from a backup instead if you can. Needs the directory not to be in use.
        #[arg(long)]
        repair: bool,
    },
    /// Consumer groups: list, create at a start position, move, delete.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// Inspect and operate dead letters.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a file: exit 0 when it is valid, 2 with the line and key of the first mistake.
    Check { file: std::path::PathBuf },
    /// Print every key's effective value and its origin.
    Show,
}

/// The configuration: defaults, then --config (or RELQ_CONFIG), then RELQ_* variables, then
/// flags.
fn resolve_config(cli: &Cli) -> anyhow::Result<relq::Resolved> {
    let mut layers = relq::Layers::new();
    if let Some(path) = &cli.config {
        layers = layers.file(path)?;
    }
    layers = layers.env(std::env::vars())?;
    if let Some(url) = &cli.url {
        layers = layers.flag("backend.url", url, "--url")?;
    }
    Ok(layers.resolve()?)
}

/// `relq bench ...`: runs `relq-bench ...` in this process's place (its output, signals and exit
/// code are the command's).
fn bench(args: Vec<std::ffi::OsString>, json: bool) -> anyhow::Result<()> {
    let name = format!("relq-bench{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(&name)))
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(&name))
                .find(|p| p.is_file())
        })
    };
    let Some(exe) = beside.or_else(on_path) else {
        return Err(exit(
            Exit::FAILED,
            "relq bench runs the relq-bench binary, which is neither beside relq nor on the PATH: \
             build it with `cargo build --release -p relq-bench` (then `target/release/relq bench` \
             finds it), or run `cargo run --release -p relq-bench -- ...`",
        ));
    };
    let mut command = std::process::Command::new(&exe);
    if json {
        command.arg("--json");
    }
    command.args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = command.exec();
        Err(anyhow::Error::new(e).context(format!("cannot run {}", exe.display())))
    }
    #[cfg(not(unix))]
    {
        let status = command
            .status()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        match status.code() {
            Some(0) => Ok(()),
            Some(code) => Err(exit(
                u8::try_from(code).unwrap_or(Exit::FAILED),
                format!("relq-bench exited with {code}"),
            )),
            None => Err(exit(Exit::FAILED, "relq-bench was killed")),
        }
    }
}

/// The exit codes of `relq`; documented in the README.
pub(crate) struct Exit;

impl Exit {
    /// The operation failed (backend error, damaged data, I/O).
    pub(crate) const FAILED: u8 = 1;
    /// Bad usage or input: an unknown flag, an invalid name, id, header or URL.
    pub(crate) const USAGE: u8 = 2;
    /// What was asked for does not exist.
    pub(crate) const NOT_FOUND: u8 = 3;
    /// The topic was terminated (while `relq consume` ran, or before an operation on it).
    pub(crate) const TERMINATED: u8 = 4;
    /// `relq check` found damage that needs the operator.
    pub(crate) const DAMAGED: u8 = 5;
    /// Interrupted by SIGINT/SIGTERM before a command that runs to completion (demo, bench)
    /// finished, or a second signal during a graceful stop.
    pub(crate) const INTERRUPTED: u8 = 130;
}

/// An error that carries its exit code.
#[derive(Debug)]
pub(crate) struct ExitError {
    code: u8,
    message: String,
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitError {}

pub(crate) fn exit(code: u8, message: impl Into<String>) -> anyhow::Error {
    ExitError {
        code,
        message: message.into(),
    }
    .into()
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(x) = e.downcast_ref::<ExitError>() {
        return x.code;
    }
    match e.downcast_ref::<relq::Error>() {
        Some(relq::Error::NotFound(_)) => Exit::NOT_FOUND,
        Some(relq::Error::Terminated(_)) => Exit::TERMINATED,
        Some(relq::Error::Backend(b)) if b.kind == relq::BackendErrorKind::Terminated => {
            Exit::TERMINATED
        }
        Some(
            relq::Error::Name(_)
            | relq::Error::Config(_)
            | relq::Error::InvalidId(_)
            | relq::Error::UnsupportedUrl { .. }
            | relq::Error::Encode(_)
            | relq::Error::PayloadTooLarge { .. }
            | relq::Error::ReservedHeader(_)
            | relq::Error::InvalidHeader { .. },
        ) => Exit::USAGE,
        _ => Exit::FAILED,
    }
}

/// The error and its causes on one line, each cause once: a cause whose text the line already
/// holds (errors that print their source themselves) is not repeated.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Resolves on the first SIGINT or SIGTERM with the signal's name. The handlers are installed
/// when this is called (not when the future is first polled), so a signal that arrives after it
/// cannot kill the process. Long-running commands select on it and shut down gracefully; a
/// second signal ends the process at once (exit 130).
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = &'static str> {
    let first = Signals::install();
    async move {
        let name = first.recv().await;
        let second = Signals::install();
        tokio::spawn(async move {
            second.recv().await;
            eprintln!("second signal: exiting now; unfinished messages stay pending");
            std::process::exit(i32::from(Exit::INTERRUPTED));
        });
        name
    }
}

struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot handle SIGINT/SIGTERM; they end the process at once");
                    None
                }
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn recv(self) -> &'static str {
        #[cfg(unix)]
        {
            match self.streams {
                Some((mut int, mut term)) => tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                },
                None => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected name=value".to_owned()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    use std::io::IsTerminal;
    // Warnings and errors reach the operator by default (a warning such as "Redis lost this
    // topic's group" means messages may be gone); colour only on a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // A panic (say, inside the state database's library on a damaged file) is usually caught
    // and reported as an error that carries its message; the default hook would also print a
    // backtrace meant for developers. One line on stderr instead, the details at debug level.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        // Output piped into a reader that stopped early (`relq dlq export .. | head`): like
        // any Unix tool killed by SIGPIPE, stop quietly (Rust ignores SIGPIPE, so the write
        // fails with EPIPE and `println!` panics instead).
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        eprintln!("relq: internal panic{location}: {message}");
        tracing::debug!(backtrace = %std::backtrace::Backtrace::force_capture(), "panic");
    }));
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Config {
        command: ConfigCommand::Check { file },
    } = &cli.command
    {
        relq::Layers::new().file(file)?.resolve()?;
        print_out(cli.json, json!({ "valid": true, "file": file }), || {
            format!("{}: valid", file.display())
        });
        return Ok(());
    }
    let resolved = resolve_config(&cli)?;
    let config = &resolved.config;
    // The URL chosen by a flag, the environment or a file (not the default).
    let chosen_url = (resolved.origins.get("backend.url") != Some(&relq::Origin::Default))
        .then(|| config.backend.url.clone());
    let command = match cli.command {
        Command::Config { .. } => {
            let mut value = serde_json::to_value(config)?;
            // Token secrets are never printed.
            if let Some(tokens) = value["server"]["tokens"].as_array_mut() {
                for t in tokens {
                    t["token"] = json!("<redacted>");
                }
            }
            let flat = flatten(&value);
            print_out(
                cli.json,
                json!(flat
                    .iter()
                    .map(|(k, v)| (
                        k.clone(),
                        json!({ "value": v, "origin": resolved.origins.get(k) })
                    ))
                    .collect::<serde_json::Map<_, _>>()),
                || {
                    flat.iter()
                        .map(|(k, v)| {
                            let origin = resolved
                                .origins
                                .get(k)
                                .map_or_else(|| "default".to_owned(), ToString::to_string);
                            format!("{k} = {v}    # {origin}")
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
            return Ok(());
        }
        Command::Demo(args) => return demo::run(args, chosen_url.as_deref(), cli.json).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "relq", &mut std::io::stdout());
            return Ok(());
        }
        Command::Serve(args) if serve::wants_openapi(&args) => {
            println!("{}", relq_admin::openapi());
            return Ok(());
        }
        Command::Bench { args } => return bench(args, cli.json),
        Command::Check { dir, repair } => {
            let dir = match (dir, chosen_url.as_deref()) {
                (Some(d), _) => d,
                (None, Some(url)) => match url.split_once("://") {
                    Some(("file", path)) if !path.is_empty() => path.into(),
                    _ => {
                        return Err(exit(
                            Exit::USAGE,
                            format!(
                            "relq check verifies a data directory; {url:?} is not a file:// URL"
                        ),
                        ))
                    }
                },
                (None, None) => DEFAULT_URL.trim_start_matches("file://").into(),
            };
            return check::run(&dir, repair, cli.json);
        }
        other => other,
    };
    let broker = open(config, read_only(&command)).await?;
    // Other processes may reach the directory through this one meanwhile: their requests are
    // answered before it exits (the same on an error).
    let outcome: anyhow::Result<()> = async {
    match command {
        Command::Demo(_)
        | Command::Bench { .. }
        | Command::Check { .. }
        | Command::Config { .. } => {
            unreachable!("handled above")
        }
        Command::Publish {
            topic,
            jsonl,
            batch,
            compress,
            ..
        } if jsonl => {
            publish_lines(&broker, &topic, batch, compress, cli.json).await?;
        }
        Command::Publish {
            topic,
            kind,
            payload,
            file,
            headers,
            delay,
            ttl,
            compress,
            idempotency_key,
            ordering_key,
            ..
        } => {
            let kind = kind.unwrap_or_default();
            let body: Vec<u8> = match (payload, file) {
                (_, Some(path)) => std::fs::read(&path)
                    .with_context(|| format!("reading the payload from {}", path.display()))?,
                (Some(p), None) if p == "-" => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                        .context("reading the payload from stdin")?;
                    buf
                }
                (Some(p), None) => p.into_bytes(),
                (None, None) => unreachable!("clap requires a payload or --file"),
            };
            let mut m = NewMessage::new(kind, body);
            for (k, v) in headers {
                m = m.header(k, v);
            }
            if let Some(d) = delay {
                m = m.delay(d);
            }
            if let Some(t) = ttl {
                m = m.ttl(t);
            }
            if let Some(c) = compress {
                m = m.compress(c);
            }
            if let Some(k) = idempotency_key {
                m = m.idempotency_key(k);
            }
            if let Some(k) = ordering_key {
                m = m.ordering_key(k);
            }
            let id = broker.publish(&topic, m).await?;
            print_out(cli.json, json!({ "id": id }), || id.to_string());
        }
        Command::Consume(args) => {
            let r = consume::run(&broker, config, args, cli.json).await;
            // Answers what other processes asked through this one before exiting (a terminate
            // that stopped this consumer included).
            broker.close().await;
            r?
        }
        Command::Serve(args) => {
            let r = serve::run(broker.clone(), config, args, cli.json).await;
            broker.close().await;
            r?
        }
        Command::Info { topic } => info(&broker, topic, cli.json).await?,
        Command::Tail(args) => tail::run(&broker, args, cli.json).await?,
        Command::Route(args) => {
            let r = route::run(&broker, config, args, cli.json).await;
            broker.close().await;
            r?
        }
        Command::Message { topic, id } => show_message(&broker, &topic, id, cli.json).await?,
        Command::Audit { before, limit } => {
            if !(1..=1000).contains(&limit) {
                return Err(exit(Exit::USAGE, "--limit must be 1 to 1000"));
            }
            let (entries, next) = relq_admin::audit_entries(&broker, before, limit).await?;
            print_out(
                cli.json,
                json!({ "items": entries, "next": next.map(|n| n.to_string()) }),
                || {
                    let mut out: Vec<String> = entries
                        .iter()
                        .map(|e| {
                            format!(
                                "{} {} {} {} {} -> {} {}",
                                e.id, e.at, e.actor, e.action, e.topic, e.status, e.outcome
                            )
                        })
                        .collect();
                    if out.is_empty() {
                        out.push("no audit entries".into());
                    }
                    if let Some(n) = next {
                        out.push(format!("more: relq audit --before {n}"));
                    }
                    out.join("\n")
                },
            );
        }
        Command::Topics => {
            let topics = broker.topics().await?;
            print_out(cli.json, json!(topics), || {
                if topics.is_empty() {
                    "no topics".to_owned()
                } else {
                    topics.join("\n")
                }
            });
        }
        Command::Terminate { topic, yes } => {
            relq::validate_name("topic", &topic)?;
            if !yes {
                confirm(&topic)?;
            }
            let r = broker.terminate(&topic).await;
            audit(&broker, "terminate", &topic, json!({}), &r, |e| {
                format!("terminated (existed: {e})")
            })
            .await;
            let existed = r?;
            if !existed {
                return Err(relq::Error::NotFound(relq::NotFound::Topic(topic)).into());
            }
            print_out(cli.json, json!({ "terminated": topic }), || {
                format!("terminated topic {topic}")
            });
        }
        Command::Cleanup {
            topic,
            min_age,
            max_len,
            dry_run,
        } => {
            let mut retention = relq::Retention::default().min_age(min_age);
            if let Some(n) = max_len {
                retention = retention.max_len(n);
            }
            broker.topic_info(&topic).await?;
            if dry_run {
                let r = broker.cleanup(&topic, &retention.dry_run(true)).await?;
                print_out(
                    cli.json,
                    json!({ "dry_run": true, "removed": r.removed, "trimmed_unacknowledged": r.trimmed_unacknowledged }),
                    || {
                        format!(
                            "dry run: would remove {} acknowledged messages and trim {} unacknowledged; nothing changed",
                            r.removed, r.trimmed_unacknowledged
                        )
                    },
                );
                return Ok(());
            }
            let r = broker.cleanup(&topic, &retention).await;
            let params = json!({ "min_age": humantime::format_duration(min_age).to_string(), "max_len": max_len });
            audit(&broker, "cleanup", &topic, params, &r, |c| {
                format!(
                    "removed {} ({} unacknowledged)",
                    c.removed, c.trimmed_unacknowledged
                )
            })
            .await;
            let r = r?;
            print_out(cli.json, serde_json::to_value(&r)?, || {
                format!(
                    "removed {} acknowledged messages, trimmed {} unacknowledged",
                    r.removed, r.trimmed_unacknowledged
                )
            });
        }
        Command::Stop { topic, id } => {
            let r = broker.stop_message(&topic, id).await;
            audit(
                &broker,
                "stop",
                &topic,
                json!({ "id": id.to_string() }),
                &r,
                |()| "stopped".into(),
            )
            .await;
            r?;
            print_out(cli.json, json!({ "stopped": id }), || {
                format!("stopped {id} in topic {topic}")
            });
        }
        Command::Resume { topic, id } => {
            let r = broker.resume_message(&topic, id).await;
            audit(
                &broker,
                "resume",
                &topic,
                json!({ "id": id.to_string() }),
                &r,
                |was| {
                    if *was {
                        "resumed".into()
                    } else {
                        "was not stopped".into()
                    }
                },
            )
            .await;
            let was = r?;
            if !was {
                return Err(exit(
                    Exit::NOT_FOUND,
                    format!("message {id} of topic {topic:?} was not stopped"),
                ));
            }
            print_out(cli.json, json!({ "resumed": id }), || {
                format!("resumed {id} in topic {topic}")
            });
        }
        Command::Completions { .. } => unreachable!("handled above"),
        Command::Dlq { command } => dlq::run(&broker, command, cli.json).await?,
        Command::Group { command } => group::run(&broker, command, cli.json).await?,
    }
    Ok(())
    }
    .await;
    broker.close().await;
    outcome
}

/// Whether a command only reads: it may then inspect a data directory another process holds,
/// or one it may not write.
fn read_only(command: &Command) -> bool {
    use dlq::DlqCommand as D;
    match command {
        Command::Cleanup { dry_run: true, .. } => true,
        Command::Info { .. }
        | Command::Topics
        | Command::Audit { .. }
        | Command::Message { .. } => true,
        Command::Group { command } => command.read_only(),
        Command::Dlq { command } => matches!(
            command,
            D::List { .. } | D::Show { .. } | D::Groups { .. } | D::Export { .. } | D::Stats { .. }
        ),
        _ => false,
    }
}

/// The broker of the configuration. For a read-only command on a data directory that another
/// process holds (or that this user may not write), the directory is opened read-only instead:
/// what is on disk is shown, nothing is written, and stderr says so.
async fn open(config: &relq::Config, read_only: bool) -> anyhow::Result<Broker> {
    // A directory held by a process that does not share it (or not yet: it is opening, or just
    // closing, like another short `relq publish`) is tried again for a few seconds.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut pause = std::time::Duration::from_millis(5);
    let err = loop {
        let e = match Broker::from_config(config).await {
            Ok(b) => return Ok(b),
            Err(e) => e,
        };
        let held = matches!(&e, relq::Error::Backend(b) if b.backend == "embedded"
            && b.kind == relq::BackendErrorKind::Unavailable && b.message.contains("in use"));
        if !held || read_only || tokio::time::Instant::now() >= deadline {
            break e;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(200));
    };
    let fallback = matches!(
        &err,
        relq::Error::Backend(b) if b.backend == "embedded"
            && matches!(b.kind, relq::BackendErrorKind::Unavailable | relq::BackendErrorKind::Fatal)
    );
    let dir = match config.backend.url.split_once("://") {
        Some(("file", path)) if read_only && fallback => path,
        _ => return Err(err.into()),
    };
    match relq::EmbeddedBackend::open_read_only(dir) {
        Ok(b) => {
            eprintln!("note: {err}; showing what is on disk, read-only");
            Ok(Broker::new(b))
        }
        Err(_) => Err(err.into()),
    }
}

/// Every leaf of a JSON tree as (dotted key, value), in key order.
fn flatten(v: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => out.push((prefix.to_owned(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One line of `relq publish --jsonl`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Option<serde_json::Value>,
    #[serde(default)]
    payload_hex: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    delay: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    compress: Option<relq::Compression>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    ordering_key: Option<String>,
}

/// `--compress`.
fn parse_compression(s: &str) -> Result<relq::Compression, relq::Error> {
    s.parse()
}

/// One line of `relq publish --jsonl`; `compress` applies unless the line names its own.
fn parse_line(text: &str, compress: Option<relq::Compression>) -> anyhow::Result<NewMessage> {
    let line: Line = serde_json::from_str(text)?;
    let payload: Vec<u8> = match (line.payload, line.payload_hex) {
        (Some(_), Some(_)) => anyhow::bail!("give payload or payload_hex, not both"),
        (Some(serde_json::Value::String(s)), None) => s.into_bytes(),
        (Some(v), None) => v.to_string().into_bytes(),
        (None, Some(h)) => {
            if h.len() % 2 != 0 {
                anyhow::bail!("payload_hex has an odd number of digits");
            }
            (0..h.len())
                .step_by(2)
                .map(|i| {
                    h.get(i..i + 2)
                        .and_then(|b| u8::from_str_radix(b, 16).ok())
                        .ok_or_else(|| anyhow::anyhow!("payload_hex is not hex"))
                })
                .collect::<anyhow::Result<_>>()?
        }
        (None, None) => Vec::new(),
    };
    let mut m = NewMessage::new(line.kind, payload);
    for (k, v) in line.headers {
        m = m.header(k, v);
    }
    if let Some(d) = line.delay {
        m = m.delay(humantime::parse_duration(&d).map_err(|e| anyhow::anyhow!("delay: {e}"))?);
    }
    if let Some(t) = line.ttl {
        m = m.ttl(humantime::parse_duration(&t).map_err(|e| anyhow::anyhow!("ttl: {e}"))?);
    }
    if let Some(c) = line.compress.or(compress) {
        m = m.compress(c);
    }
    if let Some(k) = line.idempotency_key {
        m = m.idempotency_key(k);
    }
    if let Some(k) = line.ordering_key {
        m = m.ordering_key(k);
    }
    Ok(m)
}

/// `relq publish --jsonl`: batches of lines from stdin; a bad line stops it after publishing
/// the lines before it.
async fn publish_lines(
    broker: &Broker,
    topic: &str,
    batch: usize,
    compress: Option<relq::Compression>,
    json_out: bool,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    relq::validate_name("topic", topic)?;
    let batch = batch.max(1);
    let bar = if json_out {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {pos} published {per_sec}",
        )
        .map_err(|e| anyhow::anyhow!("progress template: {e}"))?,
    );
    let (mut first, mut last, mut published) = (None, None, 0u64);
    let mut pending = Vec::with_capacity(batch);
    let mut failure = None;
    let stdin = std::io::stdin().lock();
    for (n, line) in stdin.lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line, compress) {
            Ok(m) => pending.push(m),
            Err(e) => {
                failure = Some(format!("line {}: {e:#}", n + 1));
                break;
            }
        }
        if pending.len() == batch {
            let ids = broker
                .publish_batch(topic, std::mem::take(&mut pending))
                .await
                .with_context(|| {
                    format!("the batch ending at line {} was not published ({published} messages before it were)", n + 1)
                })?;
            first = first.or(ids.first().copied());
            last = ids.last().copied().or(last);
            published += ids.len() as u64;
            bar.set_position(published);
        }
    }
    if !pending.is_empty() {
        let ids = broker
            .publish_batch(topic, pending)
            .await
            .with_context(|| {
                format!("the last batch was not published ({published} messages before it were)")
            })?;
        first = first.or(ids.first().copied());
        last = ids.last().copied().or(last);
        published += ids.len() as u64;
    }
    bar.finish_and_clear();
    print_out(
        json_out,
        json!({ "published": published, "first_id": first, "last_id": last }),
        || format!("published {published} messages"),
    );
    match failure {
        Some(f) => Err(exit(
            Exit::USAGE,
            format!("{f}; the {published} messages before it were published"),
        )),
        None => Ok(()),
    }
}

/// Asks the operator to type the topic's name; refuses when stdin is not a terminal.
fn confirm(topic: &str) -> anyhow::Result<()> {
    confirm_name(
        topic,
        &format!("terminating {topic:?} deletes all its messages, groups and dead letters"),
    )
}

/// Asks to type `name` to go on with `what` (which must not happen by accident).
pub(crate) fn confirm_name(name: &str, what: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(exit(
            Exit::USAGE,
            format!("{what}: pass --yes to confirm (stdin is not a terminal to ask)"),
        ));
    }
    eprint!("{what}. Type {name:?} to confirm: ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if line.trim() != name {
        return Err(exit(Exit::USAGE, "not confirmed; nothing changed"));
    }
    Ok(())
}

/// Every topic's info; a topic that fails (a damaged segment, say) is reported with its error
/// and the others are still shown. Exits non-zero when any failed.
async fn info(broker: &Broker, topic: Option<String>, json_out: bool) -> anyhow::Result<()> {
    let one = topic.is_some();
    let topics = match topic {
        Some(t) => vec![t],
        None => broker.topics().await?,
    };
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for t in &topics {
        match broker.topic_info(t).await {
            Ok(i) => rows.push(serde_json::to_value(&i)?),
            Err(e) if one => return Err(e.into()),
            Err(e) => {
                let e = anyhow::Error::from(e);
                rows.push(json!({ "name": t, "error": error_line(&e) }));
                failed.push(t.clone());
            }
        }
    }
    print_out(json_out, json!(rows), || {
        if rows.is_empty() {
            return "no topics".to_owned();
        }
        let mut out = String::new();
        for i in &rows {
            let name = i["name"].as_str().unwrap_or("?");
            if let Some(e) = i["error"].as_str() {
                out += &format!("topic {name}: ERROR {e}\n");
                continue;
            }
            out += &format!(
                "topic {name}: {} messages, {} dead letters, {} stopped\n",
                i["length"],
                i["dead_letters"],
                i["stopped"].as_array().map_or(0, Vec::len)
            );
            for g in i["groups"].as_array().into_iter().flatten() {
                out += &format!(
                    "  group {}: pending {} lag {} scheduled {} parked {} blocked {} consumers {}\n",
                    g["name"].as_str().unwrap_or("?"),
                    g["pending"],
                    g["lag"],
                    g["scheduled"],
                    g["parked"],
                    g["blocked"],
                    g["consumers"].as_array().map_or(0, Vec::len)
                );
            }
        }
        out.trim_end().to_owned()
    });
    if failed.is_empty() {
        Ok(())
    } else {
        Err(exit(
            Exit::FAILED,
            format!(
                "{} of {} topics could not be read: {}",
                failed.len(),
                topics.len(),
                failed.join(", ")
            ),
        ))
    }
}

/// `relq message TOPIC ID`.
async fn show_message(
    broker: &Broker,
    topic: &str,
    id: MessageId,
    json_out: bool,
) -> anyhow::Result<()> {
    let m = broker.message(topic, id).await?;
    let placements = broker.locate(topic, id).await?;
    let stopped = broker.topic_info(topic).await?.stopped.contains(&id);
    // Its dead letters (a replay makes a new message, so usually at most one per group).
    let mut dead = Vec::new();
    let dls = broker.dead_letters(topic);
    let mut q = relq::DeadLetterQuery::all().limit(500);
    loop {
        let page = dls.list(&q).await?;
        dead.extend(
            page.iter()
                .filter(|d| d.message.id == id)
                .map(|d| (d.id, d.group.clone())),
        );
        match page.last() {
            Some(last) if page.len() == 500 => q = q.after(last.id),
            _ => break,
        }
    }
    let groups: Vec<serde_json::Value> = placements
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(&p.placement).unwrap_or_default();
            v["group"] = json!(p.group);
            if let relq::Placement::Scheduled { due, .. } = &p.placement {
                v["due"] = json!(due.to_string());
            }
            v
        })
        .collect();
    print_out(
        json_out,
        json!({
            "message": message_json(&m),
            "stopped": stopped,
            "groups": groups,
            "dead_letters": dead.iter().map(|(d, g)| json!({ "id": d.to_string(), "group": g })).collect::<Vec<_>>(),
        }),
        || {
            let mut out = vec![
                format!("id:        {}", m.id),
                format!("type:      {}", m.kind),
                format!("published: {}", m.published_at),
            ];
            for (k, v) in &m.headers {
                out.push(format!("header:    {k}: {v}"));
            }
            out.push(format!(
                "payload:   {}",
                String::from_utf8_lossy(&m.payload)
            ));
            if stopped {
                out.push("stopped:   yes (relq resume to release it)".into());
            }
            for p in &placements {
                let state = match &p.placement {
                    relq::Placement::Unread => "unread".to_owned(),
                    relq::Placement::Pending {
                        consumer,
                        deliveries,
                    } => {
                        format!("pending, held by {consumer}, delivery {deliveries}")
                    }
                    relq::Placement::Scheduled { due, deliveries } => {
                        format!("scheduled for {due}, after {deliveries} deliveries")
                    }
                    relq::Placement::Stopped => "stopped".to_owned(),
                    relq::Placement::Blocked => {
                        "blocked (waiting behind an earlier message of its ordering key)".to_owned()
                    }
                    relq::Placement::Done => "done".to_owned(),
                    _ => "unknown".to_owned(),
                };
                out.push(format!("group {}: {state}", p.group));
            }
            for (d, g) in &dead {
                out.push(format!(
                    "dead letter {d} (group {g}): relq dlq show {topic} {d}"
                ));
            }
            out.join("\n")
        },
    );
    Ok(())
}

/// Records an action of this command line in the audit log (actor `cli:$USER`).
pub(crate) async fn audit<T>(
    broker: &Broker,
    action: &str,
    topic: &str,
    params: serde_json::Value,
    result: &relq::Result<T>,
    summary: impl FnOnce(&T) -> String,
) {
    let actor = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
    relq_admin::record_action(
        broker,
        &actor,
        action,
        topic,
        params,
        result.as_ref().map(summary),
    )
    .await;
}

pub(crate) fn print_out(json_out: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    if json_out {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

/// A payload as text when it is UTF-8, else as hex.
fn payload_json(p: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(p) {
        Ok(s) => json!(s),
        Err(_) => json!({ "hex": p.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
    }
}

pub(crate) fn message_json(m: &Message) -> serde_json::Value {
    let mut v = json!({
        "id": m.id, "type": m.kind, "payload": payload_json(&m.payload), "headers": m.headers,
        "published_at": m.published_at.to_string(), "attempt": m.attempt,
    });
    // The topic it came from, where known (a consumer of a topic pattern reads several).
    if !m.topic().is_empty() {
        v["topic"] = json!(m.topic());
    }
    v
}

pub(crate) fn dead_letter_json(d: &DeadLetter) -> serde_json::Value {
    json!({
        "id": d.id, "message": message_json(&d.message), "topic": d.topic, "group": d.group,
        "consumer": d.consumer, "handler": d.handler, "reason": d.reason.as_str(), "category": d.category,
        "error_chain": d.error_chain, "backtrace": d.backtrace, "attempts": d.attempts,
        "first_failed_at": d.first_failed_at.to_string(), "last_failed_at": d.last_failed_at.to_string(),
        "failures": d.failures.iter().map(|f| json!({
            "attempt": f.attempt, "at": f.at.to_string(), "consumer": f.consumer, "kind": f.kind.as_str(), "error": f.error,
        })).collect::<Vec<_>>(),
    })
}
