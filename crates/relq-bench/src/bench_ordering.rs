//! `relq bench ordering`: what per-key ordering costs. Each round publishes a backlog of
//! `--messages` twice, once without keys and once spread over `--keys` ordering keys (message
//! `j` has key `j % keys`), and consumes each with `--consumers` consumers of one group; the
//! two runs alternate within a round (unordered first in odd rounds, ordered first in even
//! ones), so the machine's drift falls on both. The report gives each run's throughput and the
//! ordered / unordered ratio, per round and the median.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use relq::{Broker, Message, NewMessage, StartPosition};
use serde_json::json;

use crate::bench_rate::Where;

#[derive(Args)]
pub(crate) struct OrderingArgs {
    /// Ordering keys the ordered backlog is spread over.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Messages per backlog.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Consumers of the group.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Handler slots per consumer.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Each handler waits this long (a handler that does I/O); 0 is a no-op handler.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    handler_time: Duration,
    /// Rounds (each an unordered and an ordered run).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The backend.
    #[arg(long, value_enum, default_value_t = Where::Memory)]
    backend: Where,
}

/// Publishes the backlog and consumes it; returns messages per second of the consuming.
async fn one_run(
    broker: &Broker,
    args: &OrderingArgs,
    topic: &str,
    keyed: bool,
) -> anyhow::Result<f64> {
    let mut i = 0;
    while i < args.messages {
        let k = (args.messages - i).min(500);
        let batch = (i..i + k)
            .map(|j| {
                let m = NewMessage::new("job", format!("m{j}"));
                match keyed {
                    true => m.ordering_key(format!("key-{}", j % args.keys)),
                    false => m,
                }
            })
            .collect();
        broker.publish_batch(topic, batch).await?;
        i += k;
    }
    let handled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut consumers = Vec::new();
    for c in 0..args.consumers {
        let h = handled.clone();
        let wait = args.handler_time;
        consumers.push(
            broker
                .consumer(topic, "g")
                .name(format!("c{c}"))
                .start(StartPosition::Earliest)
                .concurrency(args.concurrency)
                .handler("job", move |_m: Message| {
                    let h = h.clone();
                    async move {
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        h.fetch_add(1, Ordering::Relaxed);
                        Ok::<(), relq::HandlerError>(())
                    }
                })
                .build()?
                .start()
                .await?,
        );
    }
    let give_up = Duration::from_secs(600);
    while handled.load(Ordering::Relaxed) < args.messages {
        anyhow::ensure!(
            started.elapsed() < give_up,
            "only {} of {} messages handled after {give_up:?}",
            handled.load(Ordering::Relaxed),
            args.messages
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed().as_secs_f64();
    for c in consumers {
        c.shutdown(Duration::from_secs(10)).await;
    }
    Ok(args.messages as f64 / took)
}

pub(crate) async fn run(args: OrderingArgs, json_out: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.keys > 0 && args.messages > 0 && args.rounds > 0 && args.consumers > 0,
        "--keys, --messages, --rounds and --consumers must be above zero"
    );
    let server = args.backend.server()?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let scratch = crate::bench::Scratch::new(&std::env::temp_dir(), "ordering");
        let broker = args.backend.broker(server.as_ref(), &scratch).await?;
        let tag = fastrand::u32(..);
        let mut rates = [0.0f64; 2];
        let order: [bool; 2] = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for keyed in order {
            let topic = format!("ordering-{round}-{keyed}-{tag:08x}");
            rates[usize::from(keyed)] = one_run(&broker, &args, &topic, keyed).await?;
        }
        let ratio = rates[1] / rates[0];
        crate::bench::say(
            json_out,
            format!(
                "round {}: unordered {:.0} msg/s, {} keys {:.0} msg/s: {ratio:.3}",
                round + 1,
                rates[0],
                args.keys,
                rates[1]
            ),
        );
        rounds.push((rates[0], rates[1], ratio));
        broker.close().await;
        if let Some(s) = &server {
            let _ = s.cli(&["FLUSHALL"]);
        }
    }
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r.2).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let backend = args.backend.name();
    if json_out {
        println!(
            "{}",
            json!({"backend": backend, "keys": args.keys, "messages": args.messages,
                   "consumers": args.consumers, "concurrency": args.concurrency,
                   "handler_time_ms": args.handler_time.as_millis() as u64,
                   "rounds": rounds.iter().map(|(u, o, r)| json!({"unordered": u, "ordered": o, "ratio": r})).collect::<Vec<_>>(),
                   "median_ratio": median})
        );
    } else {
        println!(
            "{backend}, {} messages over {} keys, {} consumers x {} slots: ordered / unordered throughput, median of {} rounds: {median:.3}",
            args.messages, args.keys, args.consumers, args.concurrency, args.rounds
        );
    }
    Ok(())
}
