//! `relq route`: runs routes until SIGINT or SIGTERM. A route forwards every message of the
//! topics matching its pattern into its target topics, at least once: a source message is
//! acknowledged only after every target stored it (see `Broker::route`).

use std::time::Duration;

use clap::Args;
use relq::{Broker, ConsumerHandle, StartPosition, StopReason};
use serde_json::json;

use crate::{exit, shutdown_signal, Exit};

#[derive(Args)]
pub(crate) struct RouteArgs {
    /// The route's name (its consumer group is `route.<name>`). Without it, every `[[routes]]`
    /// of the configuration runs.
    #[arg(requires = "pattern")]
    name: Option<String>,
    /// The topics to forward from: `orders.*` (one segment), `orders.>` (one or more), or
    /// `re:REGEX`.
    #[arg(requires = "targets")]
    pattern: Option<String>,
    /// The topics to forward into.
    targets: Vec<String>,
    /// Where a route's group starts on the topics it finds the first time it runs (topics
    /// that appear later start at their first message; where the group exists it goes on).
    #[arg(long, default_value = "earliest")]
    start: String,
    /// On SIGINT or SIGTERM, wait this long for forwards in progress.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    shutdown_timeout: Duration,
}

pub(crate) async fn run(
    broker: &Broker,
    config: &relq::Config,
    args: RouteArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    let start: StartPosition = args.start.parse()?;
    let routes: Vec<(String, String, Vec<String>)> = match (args.name, args.pattern) {
        (Some(name), Some(pattern)) => vec![(name, pattern, args.targets)],
        _ => config
            .routes
            .iter()
            .map(|r| (r.name.clone(), r.from.clone(), r.to.clone()))
            .collect(),
    };
    if routes.is_empty() {
        return Err(exit(
            Exit::USAGE,
            "no route: give NAME PATTERN TARGET..., or list [[routes]] in the configuration",
        ));
    }
    let signal = shutdown_signal();
    let mut running: Vec<(String, ConsumerHandle)> = Vec::new();
    for (name, pattern, targets) in &routes {
        let to: Vec<&str> = targets.iter().map(String::as_str).collect();
        let started = match broker.route(name, pattern, &to) {
            Ok(b) => b
                .start(start)
                .discover_every(Duration::from_secs(1))
                .build(),
            Err(e) => Err(e),
        };
        let handle = match started {
            Ok(c) => c.start().await,
            Err(e) => Err(e),
        };
        match handle {
            Ok(h) => {
                eprintln!("relq route: {name}: {pattern} -> {}", targets.join(", "));
                running.push((name.clone(), h));
            }
            Err(e) => {
                for (_, h) in running {
                    h.shutdown(Duration::ZERO).await;
                }
                return Err(e.into());
            }
        }
    }
    tokio::pin!(signal);
    let failed = {
        let any_stopped = async {
            loop {
                if let Some((name, h)) = running.iter().find(|(_, h)| h.is_stopped()) {
                    return (name.clone(), h.done().await);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            name = &mut signal => {
                eprintln!("{name}: stopping the routes; forwards in progress get {:?}", args.shutdown_timeout);
                None
            }
            stopped = any_stopped => Some(stopped),
        }
    };
    // Every route drains at once, within the same deadline; the counts include the drain.
    let timeout = args.shutdown_timeout;
    let drains: Vec<_> = running
        .into_iter()
        .map(|(name, h)| tokio::spawn(async move { (name, h.shutdown(timeout).await) }))
        .collect();
    let mut report = Vec::new();
    for d in drains {
        let (name, r) = d.await?;
        report.push(json!({
            "name": name,
            "forwarded": r.stats.processed,
            "retried": r.stats.retried,
            "dead_lettered": r.stats.dead_lettered,
            "abandoned": r.abandoned,
        }));
    }
    if json_out {
        println!("{}", json!({ "routes": report }));
    } else {
        for r in &report {
            eprintln!(
                "relq route: {}: forwarded {}, retried {}, dead-lettered {}",
                r["name"].as_str().unwrap_or("?"),
                r["forwarded"],
                r["retried"],
                r["dead_lettered"]
            );
        }
    }
    match failed {
        None | Some((_, StopReason::Shutdown)) => Ok(()),
        Some((name, reason)) => Err(exit(
            Exit::FAILED,
            format!("route {name} stopped: {reason:?}"),
        )),
    }
}
