//! `relq bench memory`: the consumer runtime alone, on the in-memory backend. Publishes
//! `--messages` (256 B, batches of 100), then one consumer (concurrency 100, reads of 256, a
//! no-op handler) handles them all and shuts down (its acks applied). Nothing polls: the last
//! handler wakes the waiter, so the work done is proportional to the messages, which makes the
//! mode small and steady enough to count instructions per message under
//! `valgrind --tool=callgrind` (see `bench/callgrind.sh`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use relq::{Broker, Message, NewMessage, StartPosition};
use serde_json::json;

#[derive(Args)]
pub(crate) struct MemoryArgs {
    /// Messages to publish and then consume.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Run on a single-threaded runtime of its own: the same work in the same order every
    /// run, so callgrind counts the same instructions (bench/callgrind.sh uses it).
    #[arg(long)]
    current_thread: bool,
}

pub(crate) async fn run(args: MemoryArgs, json_out: bool) -> anyhow::Result<()> {
    let n = args.messages.max(1);
    anyhow::ensure!(
        n <= 1_000_000,
        "--messages is at most 1,000,000 (the in-memory backend's capacity)"
    );
    let (published, consumed) = if args.current_thread {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(work(n))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))??
    } else {
        work(n).await?
    };
    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    if json_out {
        println!(
            "{}",
            json!({
                "messages": n,
                "current_thread": args.current_thread,
                "publish_messages_per_second": rate(published),
                "consume_messages_per_second": rate(consumed),
            })
        );
    } else {
        println!(
            "in-memory, {n} messages of 256 B: publish (batches of 100) {:.0} msg/s; consume (concurrency 100, no-op handler, acks applied) {:.0} msg/s",
            rate(published),
            rate(consumed)
        );
    }
    Ok(())
}

/// Publishes `n` messages, then consumes them; returns how long each phase took.
async fn work(n: u64) -> anyhow::Result<(Duration, Duration)> {
    let broker = Broker::memory();
    let payload = bytes::Bytes::from(vec![b'x'; 256]);
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(100);
        let batch = (0..k)
            .map(|_| NewMessage::new("job", payload.clone()))
            .collect();
        broker.publish_batch("bench", batch).await?;
        left -= k;
    }
    let published = start.elapsed();
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (h, d) = (handled.clone(), done.clone());
    let start = Instant::now();
    let consumer = broker
        .consumer("bench", "g")
        .start(StartPosition::Earliest)
        .concurrency(100)
        .read_batch(256)
        .handler("job", move |_m: Message| {
            if h.fetch_add(1, Ordering::Relaxed) + 1 == n {
                d.notify_one();
            }
            async { Ok(()) }
        })
        .build()?
        .start()
        .await?;
    done.notified().await;
    consumer.shutdown(Duration::from_secs(30)).await;
    Ok((published, start.elapsed()))
}
