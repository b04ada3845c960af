//! `relq bench compression`: what compressing payloads costs and saves, on realistic JSON
//! order documents (about 1.5 KB each, every one different) on the embedded engine with every
//! publish and ack durable (or the in-memory backend). Each round publishes `--messages` in
//! batches of 100 and consumes them all with every mode (off, lz4, gzip, zstd), the modes in a
//! rotated order per round; the report gives each mode's median over the rounds, as a ratio to
//! "off" from the same round, with the payload bytes the backend holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use relq::{Broker, Compression, EmbeddedBackend, Message, NewMessage, StartPosition};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Where {
    /// The embedded engine, every publish and ack fsynced.
    Embedded,
    /// The in-memory backend: the CPU cost alone.
    Memory,
}

#[derive(Args)]
pub(crate) struct CompressionArgs {
    /// Messages per mode and round.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Rounds (each runs every mode once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The backend.
    #[arg(long, value_enum, default_value_t = Where::Embedded)]
    backend: Where,
    /// Only these algorithms (lz4, gzip, zstd) besides "off", which every round runs as the
    /// baseline; default all.
    #[arg(long, value_delimiter = ',', value_parser = parse_algorithm)]
    only: Vec<Compression>,
}

fn parse_algorithm(s: &str) -> Result<Compression, relq::Error> {
    s.parse()
}

/// One realistic order document: nested customer and address, one to six lines, free text;
/// `i` makes each different.
pub(crate) fn order(i: u64, rng: &mut fastrand::Rng) -> String {
    const SKUS: [&str; 8] = [
        "KB-MECH-87",
        "MS-WL-PRO",
        "HD-USB-C-7",
        "MN-27-4K",
        "CB-HDMI-2M",
        "LP-STAND-AL",
        "WC-1080P",
        "SP-BT-MINI",
    ];
    const CITIES: [&str; 5] = ["Lyon", "Porto", "Gdansk", "Utrecht", "Graz"];
    const TIERS: [&str; 3] = ["standard", "gold", "platinum"];
    let lines: Vec<Value> = (0..rng.usize(1..=6))
        .map(|l| {
            json!({
                "line": l + 1,
                "sku": SKUS[rng.usize(..SKUS.len())],
                "quantity": rng.u32(1..5),
                "unit_price_cents": rng.u32(499..89_999),
                "discount_cents": if rng.bool() { rng.u32(0..2_000) } else { 0 },
                "gift_wrap": rng.bool(),
            })
        })
        .collect();
    json!({
        "order_id": format!("ord-{i:010}"),
        "created_at": format!("2026-12-0{}T{:02}:{:02}:{:02}Z", rng.u8(1..4), rng.u8(0..24), rng.u8(0..60), rng.u8(0..60)),
        "status": "created",
        "customer": {
            "id": format!("cus-{:08}", rng.u32(0..5_000_000)),
            "email": format!("user{}@example.com", rng.u32(0..1_000_000)),
            "tier": TIERS[rng.usize(..TIERS.len())],
            "marketing_opt_in": rng.bool(),
        },
        "shipping_address": {
            "name": format!("Customer {}", rng.u32(0..100_000)),
            "street": format!("{} Rue de la Paix", rng.u16(1..300)),
            "city": CITIES[rng.usize(..CITIES.len())],
            "postal_code": format!("{:05}", rng.u32(1_000..99_999)),
            "country": "EU",
        },
        "lines": lines,
        "payment": {"method": "card", "currency": "EUR", "authorization": format!("auth_{:016x}", rng.u64(..))},
        "notes": "Leave the parcel with the neighbour if nobody answers; fragile items inside.",
        "source": {"channel": "web", "campaign": format!("winter-{}", rng.u8(1..20)), "ab_bucket": rng.u8(0..4)},
    })
    .to_string()
}

struct Run {
    publish_rate: f64,
    consume_rate: f64,
    payload_bytes: u64,
    stored_bytes: u64,
}

pub(crate) async fn run(args: CompressionArgs, json_out: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.messages > 0 && args.rounds > 0,
        "--messages and --rounds must be above zero"
    );
    anyhow::ensure!(
        args.backend == Where::Embedded || args.messages <= 1_000_000,
        "--messages is at most 1,000,000 on the in-memory backend"
    );
    let modes: Vec<Option<Compression>> = std::iter::once(None)
        .chain(
            Compression::ALL
                .into_iter()
                .filter(|c| args.only.is_empty() || args.only.contains(c))
                .map(Some),
        )
        .collect();
    let name = |m: Option<Compression>| m.map_or("off", |c| c.as_str());
    // runs[mode][round]
    let mut runs: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let r = one(args.backend, modes[i], args.messages).await?;
            crate::bench::say(
                json_out,
                format!(
                    "round {} {:>4}: publish {:.0} msg/s, consume {:.0} msg/s, {:.1} MB of payload stored as {:.1} MB",
                    round + 1,
                    name(modes[i]),
                    r.publish_rate,
                    r.consume_rate,
                    r.payload_bytes as f64 / 1e6,
                    r.stored_bytes as f64 / 1e6
                ),
            );
            runs[i].push(r);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut report = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let ratio = |f: fn(&Run) -> f64| {
            median(
                runs[i]
                    .iter()
                    .zip(&runs[0])
                    .map(|(r, off)| f(r) / f(off))
                    .collect(),
            )
        };
        let r = &runs[i];
        let stored: u64 = r.iter().map(|r| r.stored_bytes).sum();
        let payload: u64 = r.iter().map(|r| r.payload_bytes).sum();
        report.push(json!({
            "mode": name(*mode),
            "publish_messages_per_second": median(r.iter().map(|r| r.publish_rate).collect()),
            "consume_messages_per_second": median(r.iter().map(|r| r.consume_rate).collect()),
            "publish_vs_off": ratio(|r| r.publish_rate),
            "consume_vs_off": ratio(|r| r.consume_rate),
            "payload_bytes": payload / r.len() as u64,
            "stored_bytes": stored / r.len() as u64,
            "stored_vs_off": ratio(|r| r.stored_bytes as f64),
        }));
    }
    let backend = match args.backend {
        Where::Embedded => "embedded (every publish and ack fsynced)",
        Where::Memory => "memory",
    };
    if json_out {
        println!(
            "{}",
            json!({"backend": backend, "messages": args.messages, "rounds": args.rounds, "modes": report})
        );
    } else {
        println!(
            "{backend}, {} JSON orders per mode, median of {} rounds (ratios against off in the same round):",
            args.messages, args.rounds
        );
        println!(
            "{:>5} {:>12} {:>7} {:>12} {:>7} {:>12} {:>7}",
            "mode", "publish/s", "vs off", "consume/s", "vs off", "stored MB", "vs off"
        );
        for r in &report {
            println!(
                "{:>5} {:>12.0} {:>7.2} {:>12.0} {:>7.2} {:>12.1} {:>7.2}",
                r["mode"].as_str().unwrap_or("?"),
                r["publish_messages_per_second"].as_f64().unwrap_or(0.0),
                r["publish_vs_off"].as_f64().unwrap_or(0.0),
                r["consume_messages_per_second"].as_f64().unwrap_or(0.0),
                r["consume_vs_off"].as_f64().unwrap_or(0.0),
                r["stored_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                r["stored_vs_off"].as_f64().unwrap_or(0.0),
            );
        }
    }
    Ok(())
}

/// Publishes `n` orders with `mode`, then consumes them (checking each payload arrives whole).
async fn one(backend: Where, mode: Option<Compression>, n: u64) -> anyhow::Result<Run> {
    let scratch = crate::bench::Scratch::new(&std::env::temp_dir(), "compression");
    let broker = match backend {
        Where::Embedded => Broker::from_arc(Arc::new(EmbeddedBackend::open(&scratch.0)?)),
        Where::Memory => Broker::memory(),
    };
    // The same documents for every mode (the same seed).
    let mut rng = fastrand::Rng::with_seed(42);
    let docs: Vec<bytes::Bytes> = (0..n.min(10_000))
        .map(|i| bytes::Bytes::from(order(i, &mut rng)))
        .collect();
    let doc = |i: u64| docs[(i % docs.len() as u64) as usize].clone();
    let mut payload_bytes = 0u64;
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let k = (n - i).min(100);
        let batch = (i..i + k)
            .map(|j| {
                let d = doc(j);
                payload_bytes += d.len() as u64;
                let m = NewMessage::new("order", d);
                match mode {
                    Some(c) => m.compress(c),
                    None => m,
                }
            })
            .collect();
        broker.publish_batch("orders", batch).await?;
        i += k;
    }
    let published = start.elapsed();
    // The payload bytes as the backend holds them.
    let mut stored_bytes = 0u64;
    let mut q = relq::Browse::oldest().limit(1000);
    loop {
        let page = broker
            .backend()
            .browse("orders", &q)
            .await?
            .unwrap_or_default();
        stored_bytes += page.iter().map(|m| m.payload.len() as u64).sum::<u64>();
        match page.last() {
            Some(last) if page.len() == 1000 => q = q.after(last.id),
            _ => break,
        }
    }
    let handled = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (h, b, d) = (handled.clone(), bad.clone(), done.clone());
    let lens: Arc<Vec<usize>> = Arc::new(docs.iter().map(|d| d.len()).collect());
    let start = Instant::now();
    let consumer = broker
        .consumer("orders", "g")
        .start(StartPosition::Earliest)
        .concurrency(100)
        .read_batch(256)
        .handler("order", move |m: Message| {
            // Whole: a JSON document of one of the published lengths.
            if m.payload.last() != Some(&b'}') || !lens.contains(&m.payload.len()) {
                b.fetch_add(1, Ordering::Relaxed);
            }
            if h.fetch_add(1, Ordering::Relaxed) + 1 == n {
                d.notify_one();
            }
            async { Ok(()) }
        })
        .build()?
        .start()
        .await?;
    tokio::time::timeout(Duration::from_secs(600), done.notified())
        .await
        .map_err(|_| {
            anyhow::anyhow!("the consumer did not handle every message within 10 minutes")
        })?;
    let consumed = start.elapsed();
    consumer.shutdown(Duration::from_secs(30)).await;
    anyhow::ensure!(
        bad.load(Ordering::Relaxed) == 0,
        "{} payloads did not arrive whole",
        bad.load(Ordering::Relaxed)
    );
    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Ok(Run {
        publish_rate: rate(published),
        consume_rate: rate(consumed),
        payload_bytes,
        stored_bytes,
    })
}
