//! `relq demo`: producers publish orders, emails and notifications; two competing consumers
//! process them while failures are injected (database 15%, external API 12%, validation 10%,
//! timeout 8% of attempts). Validation errors are permanent; the others are retried with
//! exponential backoff and dead-lettered when attempts run out.
//!
//! Orders are typed messages (JSON, schema version 2; one in ten is published as version 1 and
//! upgraded by the handler).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use relq::{
    typed, Backoff, BatchConfig, Broker, ConsumerHandle, DeadLetterQuery, HandlerError, Json,
    Message, NewMessage, StartPosition,
};
use serde_json::json;

const HANDLER_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Messages to publish.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    producers: u64,
    /// Handler concurrency per consumer (two consumers run).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Dead letters to print in full at the end.
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// The fraction of attempts that fail, 0 to 1, spread over the failure categories in the
    /// proportions above (1: every attempt fails, so every message becomes a dead letter).
    #[arg(long, default_value_t = DEFAULT_FAIL_RATE, value_parser = parse_rate)]
    fail_rate: f64,
}

/// The failing fraction of attempts with the categories' rates as documented above.
const DEFAULT_FAIL_RATE: f64 = 0.45;

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a fraction from 0 to 1 (e.g. 0.45)")),
    }
}

/// What the injected failure of one attempt is, when `rate` of attempts fail.
fn inject(rate: f64) -> Option<(&'static str, bool)> {
    let r = fastrand::f64();
    if r >= rate {
        return None;
    }
    // Which category, in the documented proportions.
    let r = r / rate * DEFAULT_FAIL_RATE;
    match r {
        _ if r < 0.15 => Some(("database", false)),
        _ if r < 0.27 => Some(("external_api", false)),
        _ if r < 0.37 => Some(("validation", true)),
        _ => Some(("timeout", false)),
    }
}

fn failure(category: &'static str, permanent: bool, m: &Message) -> HandlerError {
    let text = match category {
        "database" => format!(
            "database: connection refused while saving {} {}",
            m.kind, m.id
        ),
        "external_api" => format!("external API: 503 Service Unavailable for {}", m.id),
        "validation" => format!("validation: {} payload failed schema check", m.kind),
        _ => format!("{category} failure"),
    };
    let e = if permanent {
        HandlerError::permanent(text)
    } else {
        HandlerError::retryable(text)
    };
    e.category(category)
}

async fn handle(m: Message, rate: f64) -> Result<(), HandlerError> {
    match inject(rate) {
        // A real hang: the runtime's handler timeout cuts it off.
        Some(("timeout", _)) => {
            tokio::time::sleep(HANDLER_TIMEOUT * 20).await;
            Ok(())
        }
        Some((category, permanent)) => Err(failure(category, permanent, &m)),
        None => Ok(()),
    }
}

async fn handle_batch(batch: Vec<Message>, rate: f64) -> Vec<Result<(), HandlerError>> {
    batch
        .iter()
        .map(|m| match inject(rate) {
            // In a batch, a timeout of the notification gateway fails that message alone.
            Some(("timeout", _)) => Err(failure("timeout", false, m)),
            Some((category, permanent)) => Err(failure(category, permanent, m)),
            None => Ok(()),
        })
        .collect()
}

/// An order as its handler sees it (schema version 2).
#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    order_id: String,
    amount_cents: u64,
}

/// Version 1 of an order: the amount in whole euros.
#[derive(serde::Serialize, serde::Deserialize)]
struct OrderV1 {
    order_id: String,
    amount: u64,
}

async fn handle_order(order: Order, m: Message, rate: f64) -> Result<(), HandlerError> {
    if order.order_id.is_empty() {
        return Err(HandlerError::permanent("an order without an id").category("validation"));
    }
    handle(m, rate).await
}

/// A data directory removed when the demo ends.
struct DemoDir(std::path::PathBuf);

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) async fn run(args: DemoArgs, url: Option<&str>, json_out: bool) -> anyhow::Result<()> {
    // SIGINT/SIGTERM from here on: the consumers shut down gracefully (what they hold stays
    // pending) and the demo says how far it got.
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    // The durable embedded engine in a fresh directory, unless the operator chose a backend.
    let mut _dir = None;
    let (broker, backend) = match url {
        Some(url) => (Broker::connect(url).await?, url.to_owned()),
        None => {
            let dir = std::env::temp_dir().join(format!("relq-demo-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let broker = Broker::open(&dir)?;
            let shown = format!("embedded engine in {}", dir.display());
            _dir = Some(DemoDir(dir));
            (broker, shown)
        }
    };
    // A topic of its own, so a reused data directory does not mix runs.
    let topic_name: std::sync::Arc<str> = format!("demo-{}", relq::Timestamp::now().0).into();
    let topic = &*topic_name;
    let started = Instant::now();
    let mut consumers = Vec::new();
    let rate = args.fail_rate;
    for i in 1..=2 {
        consumers.push(
            broker
                .consumer(topic, "workers")
                .name(format!("worker-{i}"))
                .start(StartPosition::Earliest)
                .concurrency(args.concurrency)
                .handler_timeout(HANDLER_TIMEOUT)
                .claim_after(Duration::from_secs(5))
                .retry(
                    Backoff::exponential(Duration::from_millis(5), Duration::from_millis(100))
                        .max_attempts(4),
                )
                .handler(
                    "order",
                    typed(Json, move |o: Order, m| handle_order(o, m, rate))
                        .version(2)
                        .upgrade_from(1, |o: OrderV1| Order {
                            order_id: o.order_id,
                            amount_cents: o.amount * 100,
                        }),
                )
                .handler("email", move |m| handle(m, rate))
                .batch_handler(
                    "notification",
                    BatchConfig::default()
                        .size(20.min(args.concurrency.max(1)))
                        .timeout(Duration::from_millis(5))
                        .max_wait(Duration::from_millis(20)),
                    move |b| handle_batch(b, rate),
                )
                .build()?
                .start()
                .await?,
        );
    }

    let per = args.messages / args.producers.max(1);
    let mut producers = Vec::new();
    for p in 0..args.producers.max(1) {
        let broker = broker.clone();
        let topic = topic_name.clone();
        let n = if p == 0 {
            args.messages - per * (args.producers.max(1) - 1)
        } else {
            per
        };
        producers.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < n {
                let chunk = (n - sent).min(50);
                let batch = (0..chunk)
                    .map(|i| {
                        let k = sent + i;
                        let m = match k % 3 {
                            0 if k % 10 == 0 => NewMessage::encode(
                                "order",
                                &OrderV1 { order_id: format!("o-{p}-{k}"), amount: 10 + k % 90 },
                                &Json,
                            )?
                            .schema_version(1),
                            0 => NewMessage::encode(
                                "order",
                                &Order { order_id: format!("o-{p}-{k}"), amount_cents: 1000 + k % 9000 },
                                &Json,
                            )?
                            .schema_version(2),
                            1 => NewMessage::new("email", json!({"to": format!("user{k}@example.com"), "template": "welcome"}).to_string()),
                            _ => NewMessage::new("notification", json!({"user": k, "text": "your order shipped"}).to_string()),
                        };
                        Ok(m.header("producer", p.to_string()))
                    })
                    .collect::<relq::Result<Vec<_>>>()?;
                broker.publish_batch(&topic, batch).await?;
                sent += chunk;
            }
            anyhow::Ok(())
        }));
    }

    let bar = if json_out {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.messages)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} settled  {msg}",
        )
        .map_err(|e| anyhow::anyhow!("progress template: {e}"))?,
    );
    let settled = |cs: &[ConsumerHandle]| {
        cs.iter()
            .map(|c| c.stats().processed + c.stats().dead_lettered)
            .sum::<u64>()
    };
    loop {
        let done = settled(&consumers);
        let retried: u64 = consumers.iter().map(|c| c.stats().retried).sum();
        let dead: u64 = consumers.iter().map(|c| c.stats().dead_lettered).sum();
        bar.set_position(done);
        bar.set_message(format!("retried {retried}  dead-lettered {dead}"));
        if done >= args.messages {
            break;
        }
        if let Some(c) = consumers.iter().find(|c| c.is_stopped()) {
            anyhow::bail!("consumer {} stopped: {:?}", c.name(), c.done().await);
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            name = &mut signal => {
                bar.abandon();
                for p in &producers {
                    p.abort();
                }
                let mut abandoned = 0;
                for c in consumers {
                    abandoned += c.shutdown(Duration::from_secs(5)).await.abandoned;
                }
                return Err(crate::exit(
                    crate::Exit::INTERRUPTED,
                    format!(
                        "{name}: demo stopped after {done} of {} messages settled ({abandoned} handlers cancelled at the deadline)",
                        args.messages
                    ),
                ));
            }
        }
    }
    for p in producers {
        p.await??;
    }
    let elapsed = started.elapsed();
    bar.finish();

    let mut processed = 0;
    let mut failed = 0;
    let mut retried = 0;
    let mut dead = 0;
    for c in consumers {
        let s = c.stats();
        processed += s.processed;
        failed += s.failed;
        retried += s.retried;
        dead += s.dead_lettered;
        c.shutdown(Duration::from_secs(5)).await;
    }
    let dls = broker.dead_letters(topic);
    let all = dls.list(&DeadLetterQuery::all().limit(usize::MAX)).await?;
    let mut by_category: BTreeMap<String, u64> = BTreeMap::new();
    for d in &all {
        let key = d
            .category
            .clone()
            .unwrap_or_else(|| d.reason.as_str().to_owned());
        *by_category.entry(key).or_default() += 1;
    }
    let stats = dls.stats().await?;
    let info = broker.topic_info(topic).await?;
    let throughput = args.messages as f64 / elapsed.as_secs_f64();
    let examples: Vec<_> = all
        .iter()
        .step_by((all.len() / args.show.max(1)).max(1))
        .take(args.show)
        .collect();

    if json_out {
        println!(
            "{}",
            json!({
                "backend": backend, "topic": topic, "messages": args.messages, "processed": processed, "failed_attempts": failed,
                "retried": retried, "dead_lettered": dead, "dead_lettered_by_category": by_category,
                "dead_lettered_by_reason": stats.by_reason, "elapsed_seconds": elapsed.as_secs_f64(),
                "throughput_per_second": throughput,
                "pending": info.groups.iter().map(|g| g.pending).sum::<u64>(),
                "dead_letters": examples.iter().map(|d| crate::dead_letter_json(d)).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "\nrelq demo: {} messages on the {backend}, 2 consumers x {} handlers",
            args.messages, args.concurrency
        );
        println!("  processed       {processed}");
        println!("  failed attempts {failed}");
        println!("  retried         {retried}");
        println!("  dead-lettered   {dead}");
        for (k, v) in &by_category {
            println!("    {k:<15} {v}");
        }
        println!(
            "  still pending   {}",
            info.groups
                .iter()
                .map(|g| g.pending + g.scheduled)
                .sum::<u64>()
        );
        println!(
            "  elapsed         {:.2?}  ({throughput:.0} messages/s end to end, incl. retry delays)",
            elapsed
        );
        println!(
            "\n{} of {} dead letters in full:",
            examples.len(),
            all.len()
        );
        for d in examples {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::dead_letter_json(d))?
            );
        }
        println!(
            "\nEvery message ended processed or dead-lettered: {}",
            if processed + dead == args.messages {
                "yes"
            } else {
                "NO"
            }
        );
    }
    if processed + dead != args.messages {
        anyhow::bail!(
            "{} messages unaccounted for",
            args.messages - processed - dead
        );
    }
    Ok(())
}
