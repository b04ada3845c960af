//! `relq`: run the demo, publish, consume, inspect topics and operate dead letters.
//!
//! Exit codes: 0 success, 1 operation failed, 2 bad usage or input (clap's convention), 3 not found.

mod bench;
mod bench_redis;
mod crash;
mod demo;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use relq::{
    Broker, DeadLetter, DeadLetterQuery, FailureKind, Message, MessageId, NewMessage, StartPosition,
};
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
    /// in the working directory) or memory:// (a fresh in-process store, lost at exit). The demo
    /// uses a fresh temporary data directory unless this is given.
    #[arg(long, global = true, env = "RELQ_URL")]
    url: Option<String>,
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
    /// Publish one message.
    Publish {
        /// Topic.
        topic: String,
        /// Message type.
        kind: String,
        /// Payload (UTF-8).
        payload: String,
        /// Header as name=value (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Deliver after this delay (e.g. 5s, 2m).
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
    },
    /// Consume and print messages (acknowledging them).
    Consume {
        /// Topic.
        topic: String,
        /// Consumer group.
        #[arg(long, default_value = "relq-cli")]
        group: String,
        /// Where a new group starts: earliest, latest or a message id.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop when no message arrived for this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        idle: Duration,
    },
    /// Show topics, groups, pending, lag and dead letters.
    Info {
        /// One topic (default: all).
        topic: Option<String>,
    },
    /// Benchmarks; every figure in the docs comes from here.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// The workload of the kill -9 crash test (see crates/relq-cli/tests/crash.rs).
    #[command(hide = true)]
    CrashChild(crash::CrashArgs),
    /// Inspect and operate dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters (oldest first).
    List {
        topic: String,
        /// Page size.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Continue after this dead-letter id.
        #[arg(long)]
        after: Option<MessageId>,
        /// Only this message type.
        #[arg(long = "type")]
        kind: Option<String>,
        /// Only this reason (retryable, permanent, panic, timeout, no_handler, delivery_limit).
        #[arg(long)]
        reason: Option<FailureKind>,
        /// Only this error category.
        #[arg(long)]
        category: Option<String>,
    },
    /// Show one dead letter in full.
    Show { topic: String, id: MessageId },
    /// Replay dead letters to their topic (by id, or --all).
    Replay {
        topic: String,
        ids: Vec<MessageId>,
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters.
    Delete { topic: String, ids: Vec<MessageId> },
    /// Delete dead letters older than an age (default 30 days).
    Purge {
        topic: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
        older_than: Duration,
    },
    /// Counts by reason, type and category.
    Stats { topic: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<relq::Error>() {
                Some(relq::Error::NotFound(_)) => ExitCode::from(3),
                Some(
                    relq::Error::Name(_)
                    | relq::Error::Config(_)
                    | relq::Error::InvalidId(_)
                    | relq::Error::UnsupportedUrl { .. }
                    | relq::Error::PayloadTooLarge { .. }
                    | relq::Error::ReservedHeader(_),
                ) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Demo(args) => return demo::run(args, cli.url.as_deref(), cli.json).await,
        Command::CrashChild(args) => return crash::run(args).await,
        Command::Bench { command } => return bench::run(command, cli.json).await,
        other => other,
    };
    let url = cli.url.as_deref().unwrap_or(DEFAULT_URL);
    let broker = Broker::connect(url).await?;
    match command {
        Command::Demo(_) | Command::CrashChild(_) | Command::Bench { .. } => {
            unreachable!("handled above")
        }
        Command::Publish {
            topic,
            kind,
            payload,
            headers,
            delay,
        } => {
            let mut m = NewMessage::new(kind, payload);
            for h in headers {
                let (k, v) = h
                    .split_once('=')
                    .with_context(|| format!("header {h:?} is not name=value"))?;
                m = m.header(k, v);
            }
            if let Some(d) = delay {
                m = m.delay(d);
            }
            let id = broker.publish(&topic, m).await?;
            print_out(cli.json, json!({ "id": id }), || id.to_string());
        }
        Command::Consume {
            topic,
            group,
            from,
            count,
            idle,
        } => {
            let start: StartPosition = from.parse()?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
            let consumer = broker
                .consumer(&topic, &group)
                .start(start)
                .fallback(move |m: Message| {
                    let tx = tx.clone();
                    async move {
                        tx.send(m)
                            .map_err(|_| relq::HandlerError::retryable("printer stopped"))
                    }
                })
                .build()?
                .start()
                .await?;
            let mut n = 0;
            while let Ok(Some(m)) = tokio::time::timeout(idle, rx.recv()).await {
                print_out(cli.json, message_json(&m), || {
                    format!(
                        "{} {} attempt={} {}",
                        m.id,
                        m.kind,
                        m.attempt,
                        String::from_utf8_lossy(&m.payload)
                    )
                });
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    break;
                }
            }
            consumer.shutdown(Duration::from_secs(5)).await;
        }
        Command::Info { topic } => {
            let topics = match topic {
                Some(t) => vec![t],
                None => broker.topics().await?,
            };
            let mut infos = Vec::new();
            for t in &topics {
                infos.push(broker.topic_info(t).await?);
            }
            print_out(cli.json, serde_json::to_value(&infos)?, || {
                if infos.is_empty() {
                    return "no topics".to_owned();
                }
                let mut out = String::new();
                for i in &infos {
                    out += &format!(
                        "topic {}: {} messages, {} dead letters, {} stopped\n",
                        i.name,
                        i.length,
                        i.dead_letters,
                        i.stopped.len()
                    );
                    for g in &i.groups {
                        out += &format!(
                            "  group {}: pending {} lag {} scheduled {} parked {} consumers {}\n",
                            g.name,
                            g.pending,
                            g.lag,
                            g.scheduled,
                            g.parked,
                            g.consumers.len()
                        );
                    }
                }
                out.trim_end().to_owned()
            });
        }
        Command::Dlq { command } => dlq(&broker, command, cli.json).await?,
    }
    Ok(())
}

async fn dlq(broker: &Broker, command: DlqCommand, json_out: bool) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            topic,
            limit,
            after,
            kind,
            reason,
            category,
        } => {
            let mut q = DeadLetterQuery::all().limit(limit);
            if let Some(a) = after {
                q = q.after(a);
            }
            if let Some(k) = kind {
                q = q.kind(k);
            }
            if let Some(r) = reason {
                q = q.reason(r);
            }
            if let Some(c) = category {
                q = q.category(c);
            }
            let page = broker.dead_letters(&topic).list(&q).await?;
            let next = (page.len() == limit)
                .then(|| page.last().map(|d| d.id))
                .flatten();
            print_out(
                json_out,
                json!({ "items": page.iter().map(dead_letter_json).collect::<Vec<_>>(), "next": next }),
                || {
                    let mut out: Vec<String> = page
                        .iter()
                        .map(|d| {
                            format!(
                                "{} msg={} type={} reason={} category={} attempts={} error={}",
                                d.id,
                                d.message.id,
                                d.message.kind,
                                d.reason.as_str(),
                                d.category.as_deref().unwrap_or("-"),
                                d.attempts,
                                d.error_chain.join(": ")
                            )
                        })
                        .collect();
                    if let Some(n) = next {
                        out.push(format!("(more: --after {n})"));
                    }
                    if out.is_empty() {
                        "no dead letters".to_owned()
                    } else {
                        out.join("\n")
                    }
                },
            );
        }
        DlqCommand::Show { topic, id } => {
            let d = broker.dead_letters(&topic).get(id).await?;
            let v = dead_letter_json(&d);
            print_out(json_out, v.clone(), || {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            });
        }
        DlqCommand::Replay { topic, ids, all } => {
            let dls = broker.dead_letters(&topic);
            let done = match (all, ids.is_empty()) {
                (true, true) => dls.replay_matching(&DeadLetterQuery::all()).await?,
                (false, false) => dls.replay(&ids).await?,
                _ => bail!("give dead-letter ids or --all (not both)"),
            };
            let map: BTreeMap<String, String> = done
                .iter()
                .map(|(d, m)| (d.to_string(), m.to_string()))
                .collect();
            print_out(json_out, json!({ "replayed": map }), || {
                format!("replayed {} dead letters", done.len())
            });
        }
        DlqCommand::Delete { topic, ids } => {
            let n = broker.dead_letters(&topic).delete(&ids).await?;
            print_out(json_out, json!({ "deleted": n }), || {
                format!("deleted {n} dead letters")
            });
        }
        DlqCommand::Purge { topic, older_than } => {
            let n = broker
                .dead_letters(&topic)
                .purge_older_than(older_than)
                .await?;
            print_out(json_out, json!({ "purged": n }), || {
                format!("purged {n} dead letters")
            });
        }
        DlqCommand::Stats { topic } => {
            let s = broker.dead_letters(&topic).stats().await?;
            let v = serde_json::to_value(&s)?;
            print_out(json_out, v.clone(), || {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            });
        }
    }
    Ok(())
}

fn print_out(json_out: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
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

fn message_json(m: &Message) -> serde_json::Value {
    json!({
        "id": m.id, "type": m.kind, "payload": payload_json(&m.payload), "headers": m.headers,
        "published_at": m.published_at.to_string(), "attempt": m.attempt,
    })
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
