//! `relq bench rate-limit`: how close a rate-limited group comes to its limit. A backlog of
//! `--messages` is published first; `--consumers` consumers of one group (in this process, each
//! with its own fetch loop; on Redis the bucket is in the server, as for separate processes)
//! consume it under `--limit`. The bucket starts full, so the achieved rate is the messages
//! beyond the bucket over the time from the start to the last one handled; the report gives
//! each round's and the median's ratio to the limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use relq::{Broker, EmbeddedBackend, Message, NewMessage, RateLimit, StartPosition};
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Where {
    /// The in-memory backend.
    Memory,
    /// The embedded engine (every ack fsynced).
    Embedded,
    /// Redis, on a redis-server this command starts: the bucket is global across processes.
    Redis,
}

impl Where {
    /// The redis-server this backend needs, started (none for the others).
    pub(crate) fn server(self) -> anyhow::Result<Option<relq_redis_server::RedisServer>> {
        match self {
            Where::Redis => match relq_redis_server::RedisServer::start() {
                Some(s) => Ok(Some(s)),
                None => {
                    anyhow::bail!("redis-server is not installed (apt-get install -y redis-server)")
                }
            },
            _ => Ok(None),
        }
    }

    /// A broker on this backend: on `server`, in `scratch`, or in memory.
    pub(crate) async fn broker(
        self,
        server: Option<&relq_redis_server::RedisServer>,
        scratch: &crate::bench::Scratch,
    ) -> anyhow::Result<Broker> {
        Ok(match (server, self) {
            (Some(s), _) => Broker::connect(&s.url()).await?,
            (None, Where::Embedded) => {
                Broker::from_arc(Arc::new(EmbeddedBackend::open(&scratch.0)?))
            }
            (None, _) => Broker::memory(),
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Where::Memory => "memory",
            Where::Embedded => "embedded",
            Where::Redis => "redis",
        }
    }
}

#[derive(Args)]
pub(crate) struct RateArgs {
    /// The group's limit (`2000/s`, `500/100ms`).
    #[arg(long, default_value = "2000/s", value_parser = parse_limit)]
    limit: RateLimit,
    /// Messages per round (the bucket's worth of them go through at once).
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Consumers of the group.
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The backend.
    #[arg(long, value_enum, default_value_t = Where::Memory)]
    backend: Where,
}

fn parse_limit(s: &str) -> Result<RateLimit, relq::Error> {
    s.parse()
}

pub(crate) async fn run(args: RateArgs, json_out: bool) -> anyhow::Result<()> {
    let bucket = u64::from(args.limit.n());
    anyhow::ensure!(
        args.messages > 2 * bucket && args.rounds > 0 && args.consumers > 0,
        "--messages must exceed twice the limit's count ({bucket}), and --rounds and --consumers be above zero"
    );
    let server = args.backend.server()?;
    let mut ratios = Vec::new();
    for round in 0..args.rounds {
        let scratch = crate::bench::Scratch::new(&std::env::temp_dir(), "rate");
        let broker = args.backend.broker(server.as_ref(), &scratch).await?;
        let topic = format!("rate-{round}-{:08x}", fastrand::u32(..));
        let mut i = 0;
        while i < args.messages {
            let k = (args.messages - i).min(500);
            let batch = (i..i + k)
                .map(|j| NewMessage::new("job", format!("m{j}")))
                .collect();
            broker.publish_batch(&topic, batch).await?;
            i += k;
        }
        let handled = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut consumers = Vec::new();
        for c in 0..args.consumers {
            let h = handled.clone();
            consumers.push(
                broker
                    .consumer(&topic, "g")
                    .name(format!("c{c}"))
                    .start(StartPosition::Earliest)
                    .rate_limit(args.limit)
                    .handler("job", move |_m: Message| {
                        h.fetch_add(1, Ordering::Relaxed);
                        std::future::ready(Ok(()))
                    })
                    .build()?
                    .start()
                    .await?,
            );
        }
        // The limit needs (messages - bucket) / rate; ten times that (and a minute) is a hang.
        let limit_per_s = f64::from(args.limit.n()) / args.limit.per().as_secs_f64();
        let give_up =
            Duration::from_secs_f64((args.messages - bucket) as f64 / limit_per_s * 10.0 + 60.0);
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
        let achieved = (args.messages - bucket) as f64 / took;
        let ratio = achieved / limit_per_s;
        crate::bench::say(
            json_out,
            format!(
                "round {}: {} messages in {took:.2} s: {achieved:.0} msg/s beyond the bucket, {:.3} of the limit",
                round + 1,
                args.messages,
                ratio
            ),
        );
        ratios.push(ratio);
        if let Some(s) = &server {
            let _ = s.cli(&["FLUSHALL"]);
        }
    }
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let backend = args.backend.name();
    if json_out {
        println!(
            "{}",
            json!({"backend": backend, "limit": args.limit.to_string(), "consumers": args.consumers,
                   "messages": args.messages, "ratios": ratios, "median_ratio": median})
        );
    } else {
        println!(
            "{backend}, limit {} shared by {} consumers: achieved / limit, median of {} rounds: {median:.3}",
            args.limit,
            args.consumers,
            args.rounds
        );
    }
    Ok(())
}
