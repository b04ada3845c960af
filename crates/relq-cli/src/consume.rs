//! `relq consume`: print messages of a group and acknowledge each only after it was written.
//!
//! The handler itself writes the message to stdout and flushes before it returns `Ok`, so the
//! runtime acknowledges only what reached stdout. With `--count N` exactly N handlers print; a
//! message delivered beyond the count waits in its handler without printing until the shutdown
//! cancels it, which leaves it pending (delivered again later) instead of acknowledging it
//! unseen. A write that fails (stdout closed) leaves its message pending too and stops the
//! command.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use relq::{Broker, HandlerError, Message, StartPosition, StopReason};
use tokio::sync::Notify;

use crate::{exit, message_json, shutdown_signal, Exit};

#[derive(Args)]
pub(crate) struct ConsumeArgs {
    /// Topic (with --pattern: a topic pattern, `orders.*`, `orders.>` or `re:REGEX`).
    topic: String,
    /// Consume every topic matching TOPIC, current and future (new topics are found within a
    /// second and read from their first message); each message is printed with its topic.
    #[arg(long)]
    pattern: bool,
    /// Print only messages that pass this filter (repeatable: each must pass); the others are
    /// acknowledged for the group unprinted and counted. `type:GLOB`, `header:NAME`,
    /// `header:NAME=VALUE`, `header:NAME~GLOB`, `payload~REGEX`, `json:POINTER`,
    /// `json:POINTER=JSON`, `json:POINTER>N`, `json:POINTER<N`, `!FILTER`.
    #[arg(long = "filter", value_parser = parse_filter)]
    filters: Vec<relq::Filter>,
    /// Limit the whole group (every process consuming it with this limit) to N messages per
    /// period: `100/s`, `5/m`, `50/10s`. Messages over the limit wait in the topic.
    #[arg(long, value_parser = parse_rate_limit)]
    rate_limit: Option<relq::RateLimit>,
    /// Consumer group.
    #[arg(long, default_value = "relq-cli")]
    group: String,
    /// Consumer name within the group. Give the same name after a crash to take back the
    /// messages the killed run left pending at once (another name waits --claim-after).
    /// Default: a random name.
    #[arg(long)]
    name: Option<String>,
    /// Where a new group starts: earliest, latest or a message id.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Stop after printing (and acknowledging) exactly this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop when no message arrived for this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    idle: Duration,
    /// Messages another consumer of the group has held this long are taken over (default:
    /// consumer.claim_after of the configuration, 60 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    claim_after: Option<Duration>,
    /// Deliveries of one message before it is dead-lettered (a message whose consumers keep
    /// crashing while holding it). Default: retry.max_attempts of the configuration, 5.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// What becomes of a message whose time to live ended before it was printed: dead_letter
    /// (reason `expired`) or drop. Default: consumer.on_expired of the configuration,
    /// dead_letter.
    #[arg(long)]
    on_expired: Option<relq::OnExpired>,
    /// On SIGINT or SIGTERM, wait this long for messages being printed before leaving the rest
    /// pending.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    shutdown_timeout: Duration,
    /// Serve this process's Prometheus metrics (deliveries, handler durations,
    /// publish-to-handled latency, the backend's gauges) at http://ADDR/metrics, without
    /// authentication; port 0 picks a free port. The address is printed on stderr.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// Serves `GET /metrics` on `addr` for as long as the command runs. The recorder is installed
/// before the consumer starts, so its meters register with it.
async fn serve_metrics(broker: &Broker, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let handle = relq_admin::install_recorder();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::exit(crate::Exit::FAILED, format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    let app = relq_admin::metrics_router(broker.clone(), handle);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    eprintln!("relq consume: metrics at http://{local}/metrics");
    Ok(())
}

/// `--rate-limit`.
fn parse_rate_limit(s: &str) -> Result<relq::RateLimit, relq::Error> {
    s.parse()
}

/// `--filter`.
fn parse_filter(s: &str) -> Result<relq::Filter, relq::Error> {
    s.parse()
}

/// State shared by the printing handlers and the command.
struct Printer {
    json: bool,
    /// Consuming a pattern: each line names its topic.
    pattern: bool,
    count: Option<u64>,
    /// Slots taken by handlers (at most `count` print).
    taken: AtomicU64,
    /// Messages written and flushed.
    printed: AtomicU64,
    /// A write to stdout failed; the command stops with this error.
    failed: Mutex<Option<String>>,
    progress: Notify,
}

impl Printer {
    async fn handle(&self, m: Message) -> Result<(), HandlerError> {
        let slot = self.taken.fetch_add(1, Ordering::SeqCst);
        if self.count.is_some_and(|c| slot >= c) || self.has_failed() {
            // Over the count (or stdout is gone): never print, never acknowledge. The shutdown
            // cancels this wait and the message stays pending.
            std::future::pending::<()>().await;
        }
        let line = if self.json {
            message_json(&m).to_string()
        } else {
            format!(
                "{}{} {} attempt={} {}",
                if self.pattern {
                    format!("{} ", m.topic())
                } else {
                    String::new()
                },
                m.id,
                m.kind,
                m.attempt,
                String::from_utf8_lossy(&m.payload)
            )
        };
        let written = {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").and_then(|()| out.flush())
        };
        match written {
            Ok(()) => {
                self.printed.fetch_add(1, Ordering::SeqCst);
                self.progress.notify_one();
                Ok(())
            }
            Err(e) => {
                if let Ok(mut f) = self.failed.lock() {
                    f.get_or_insert_with(|| format!("writing to stdout failed: {e}"));
                }
                self.progress.notify_one();
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    }

    fn has_failed(&self) -> bool {
        self.failed.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    fn printed(&self) -> u64 {
        self.printed.load(Ordering::SeqCst)
    }
}

/// Why the command stopped waiting for messages.
enum End {
    Done,
    Signal(&'static str),
    Stopped(StopReason),
}

pub(crate) async fn run(
    broker: &Broker,
    config: &relq::Config,
    args: ConsumeArgs,
    json: bool,
) -> anyhow::Result<()> {
    let start: StartPosition = args.from.parse()?;
    let printer = Arc::new(Printer {
        json,
        pattern: args.pattern,
        count: args.count,
        taken: AtomicU64::new(0),
        printed: AtomicU64::new(0),
        failed: Mutex::new(None),
        progress: Notify::new(),
    });
    if args.count == Some(0) {
        return Ok(());
    }
    if let Some(addr) = args.metrics {
        serve_metrics(broker, addr).await?;
    }
    let claim_after = args.claim_after.unwrap_or(config.consumer.claim_after);
    let max_attempts = args.max_attempts.unwrap_or(config.retry.max_attempts);
    let handler_timeout = (claim_after / 2).min(Duration::from_secs(30));
    let builder = if args.pattern {
        broker
            .consumer_matching(&args.topic, &args.group)
            .discover_every(Duration::from_secs(1))
    } else {
        broker.consumer(&args.topic, &args.group)
    };
    let mut builder = builder
        .start(start)
        .concurrency(1)
        .read_batch(1)
        .claim_after(claim_after)
        .handler_timeout(handler_timeout.max(Duration::from_millis(1)))
        .retry(config.retry.backoff().max_attempts(max_attempts))
        .on_expired(args.on_expired.unwrap_or(config.consumer.on_expired));
    if let Some(n) = &args.name {
        builder = builder.name(n);
    }
    for f in &args.filters {
        builder = builder.filter(f.clone());
    }
    if let Some(limit) = args.rate_limit {
        builder = builder.rate_limit(limit);
    }
    // Installed before the consumer starts: a signal from now on is a graceful stop.
    let signal = shutdown_signal();
    let p = printer.clone();
    let consumer = builder
        .fallback(move |m: Message| {
            let p = p.clone();
            async move { p.handle(m).await }
        })
        .build()?
        .start()
        .await?;

    let end = {
        tokio::pin!(signal);
        let mut seen = 0;
        loop {
            let wait = printer.progress.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if printer.has_failed() {
                break End::Done;
            }
            let printed = printer.printed();
            if args.count.is_some_and(|c| printed >= c) {
                break End::Done;
            }
            tokio::select! {
                () = &mut wait => {}
                name = &mut signal => break End::Signal(name),
                reason = consumer.done() => break End::Stopped(reason),
                () = tokio::time::sleep(args.idle) => {
                    if printer.printed() == seen {
                        break End::Done;
                    }
                }
            }
            seen = printer.printed();
        }
    };
    // Every printed message's acknowledgement is queued once `processed` counts it; the
    // shutdown flushes queued acknowledgements whatever its deadline, and cancels the handlers
    // still waiting (their messages stay pending).
    let deadline = match end {
        End::Signal(name) => {
            eprintln!(
                "{name}: stopping; messages being printed get {:?}, the rest stay pending",
                args.shutdown_timeout
            );
            args.shutdown_timeout
        }
        _ => {
            // Bounded: a print slower than the handler timeout was counted as a timeout (and
            // is retried), never as processed.
            let printed = printer.printed();
            let settled = async {
                while consumer.stats().processed < printed && !consumer.is_stopped() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), settled).await;
            Duration::ZERO
        }
    };
    let stopped_by_itself = consumer.is_stopped();
    let reason = if stopped_by_itself {
        Some(consumer.done().await)
    } else {
        None
    };
    let report = consumer.shutdown(deadline).await;
    if report.abandoned > 0 && matches!(end, End::Signal(_)) {
        eprintln!(
            "{} messages were still being printed at the deadline; they stay pending",
            report.abandoned
        );
    }
    if let Some(e) = printer.failed.lock().ok().and_then(|f| f.clone()) {
        return Err(anyhow::anyhow!(e)).context("the message stays pending");
    }
    match (end, reason) {
        (End::Stopped(r), _) | (_, Some(r)) => stop_error(&args.topic, r),
        _ => Ok(()),
    }
}

fn stop_error(topic: &str, reason: StopReason) -> anyhow::Result<()> {
    match reason {
        StopReason::Shutdown => Ok(()),
        StopReason::TopicTerminated => Err(exit(
            Exit::TERMINATED,
            format!("topic {topic:?} was terminated while consuming"),
        )),
        StopReason::GroupDeleted => Err(exit(
            Exit::TERMINATED,
            format!("the group was deleted from topic {topic:?} while consuming"),
        )),
        other => Err(exit(Exit::FAILED, format!("the consumer stopped: {other}"))),
    }
}
