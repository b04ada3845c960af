//! `relq bench redis`: the Redis Streams backend against a `redis-server` this command starts
//! (loopback, no persistence), in the scenarios the established Redis-queue benchmarks use, each
//! beside two baselines measured in the same run on the same server:
//! - `redis-benchmark` pipelined `XADD` (what Redis itself can take here);
//! - a naive loop that publishes, reads and acknowledges one message at a time.

use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use relq::{Backoff, Broker, HandlerError, Message, NewMessage, StartPosition};
use serde_json::json;

use crate::bench::{end_to_end, latency, noop_consumer, say, settled};

#[derive(Args)]
pub(crate) struct RedisArgs {
    /// Messages per scenario (queue-add uses a tenth, the naive loop a twentieth).
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Run only these scenarios (baseline, queue-add, queue-add-bulk, worker-concurrent,
    /// worker-retry-throughput, e2e, latency); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Batches in flight at once in queue-add-bulk.
    #[arg(long, default_value_t = 8)]
    bulk_in_flight: usize,
    /// Publish rate of the latency scenario (default: half the end-to-end rate).
    #[arg(long)]
    latency_rate: Option<f64>,
}

pub(crate) async fn run(args: RedisArgs, json_out: bool) -> anyhow::Result<()> {
    let Some(server) = relq_redis_server::RedisServer::start() else {
        anyhow::bail!("redis-server is not installed (apt-get install -y redis-server)");
    };
    let url = server.url();
    let version = server.cli(&["INFO", "server"]);
    let version = version
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    say(
        json_out,
        format!(
            "redis-server {version} on {url} (no persistence), payload {} B",
            args.size
        ),
    );
    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let mut report = serde_json::Map::new();
    report.insert("redis_version".into(), json!(version));
    report.insert("payload_bytes".into(), json!(args.size));

    let mut xadd = None;
    let mut naive = None;
    if want("baseline") {
        // Redis's limit: the better of two runs (a short run under-measures it).
        let n = (args.messages * 5).max(100_000);
        let rate = redis_benchmark_xadd(server.port(), args.size, n)?.max(redis_benchmark_xadd(
            server.port(),
            args.size,
            n,
        )?);
        server.cli(&["DEL", "rb-stream"]);
        say(
            json_out,
            format!(
                "baseline redis-benchmark XADD -c 50 -P 32 (best of 2 x {n}): {rate:>9.0} msg/s"
            ),
        );
        let n = (args.messages / 20).max(1000);
        let rate_naive = naive_loop(&url, n, &payload).await?;
        say(
            json_out,
            format!("baseline naive loop (XADD, XREADGROUP 1, XACK):      {rate_naive:>9.0} msg/s"),
        );
        server.cli(&["FLUSHALL"]);
        report.insert(
            "baselines".into(),
            json!({"redis_benchmark_xadd_pipelined": rate, "naive_loop": rate_naive}),
        );
        xadd = Some(rate);
        naive = Some(rate_naive);
    }
    let broker = Broker::connect(&url).await?;
    let ratio = |rate: f64, base: Option<f64>, what: &str| match base {
        Some(b) if b > 0.0 => format!(" = {:.2}x {what}", rate / b),
        _ => String::new(),
    };

    if want("queue-add") {
        let n = (args.messages / 10).max(1000);
        let start = Instant::now();
        for _ in 0..n {
            broker
                .publish("queue-add", NewMessage::new("job", payload.clone()))
                .await?;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        say(
            json_out,
            format!(
                "queue-add (one publish in flight):                  {rate:>9.0} msg/s{}",
                ratio(rate, xadd, "redis-benchmark XADD")
            ),
        );
        report.insert(
            "queue_add".into(),
            json!({"messages": n, "messages_per_second": rate}),
        );
    }

    if want("queue-add-bulk") {
        let n = args.messages;
        let k = args.bulk_in_flight.max(1);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..k as u64 {
            let (broker, payload) = (broker.clone(), payload.clone());
            let share = n / k as u64 + u64::from(i < n % k as u64);
            tasks.push(tokio::spawn(async move {
                bulk_publish(&broker, "queue-add-bulk", share, &payload).await
            }));
        }
        for t in tasks {
            t.await??;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        say(
            json_out,
            format!(
                "queue-add-bulk (batches of 50, {k} in flight):        {rate:>9.0} msg/s{} (target 0.5x)",
                ratio(rate, xadd, "redis-benchmark XADD")
            ),
        );
        report.insert(
            "queue_add_bulk".into(),
            json!({"messages": n, "batches_in_flight": k, "messages_per_second": rate, "ratio_to_redis_benchmark": xadd.map(|x| rate / x)}),
        );
    }

    if want("worker-concurrent") {
        let n = args.messages;
        bulk_publish(&broker, "worker", n, &payload).await?;
        let before = commands(&server);
        let start = Instant::now();
        let consumer = noop_consumer(&broker, "worker").await?;
        while consumer.stats().processed < n || !settled(&broker, "worker").await? {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        consumer.shutdown(Duration::from_secs(10)).await;
        // What the server ran per message (INFO commandstats; a script counts once, with the
        // commands it ran inside counted too): the round trips the runtime costs.
        let after = commands(&server);
        let per_message: serde_json::Map<String, serde_json::Value> = after
            .iter()
            .filter_map(|(name, calls)| {
                let d = calls.saturating_sub(before.get(name).copied().unwrap_or(0));
                // Everything but the INFO calls that take these counts; the scenario's own
                // `settled` polls (EXISTS, XINFO) show too, a few per thousand messages.
                (d > 0 && name != "info").then(|| (name.clone(), json!(d as f64 / n as f64)))
            })
            .collect();
        say(
            json_out,
            format!(
                "worker-concurrent (consume + ack, concurrency 100): {rate:>9.0} msg/s{} (target 10x)",
                ratio(rate, naive, "naive loop")
            ),
        );
        let shown: Vec<String> = ["evalsha", "xreadgroup", "xack"]
            .iter()
            .map(|c| {
                format!(
                    "{c} {:.3}",
                    per_message.get(*c).and_then(|v| v.as_f64()).unwrap_or(0.0)
                )
            })
            .collect();
        say(
            json_out,
            format!("  server commands per message: {}", shown.join(", ")),
        );
        report.insert(
            "worker_concurrent".into(),
            json!({"messages": n, "messages_per_second": rate, "ratio_to_naive_loop": naive.map(|b| rate / b), "server_commands_per_message": per_message}),
        );
    }

    if want("worker-retry-throughput") {
        let n = (args.messages / 4).max(1000);
        bulk_publish(&broker, "retry", n, &payload).await?;
        let start = Instant::now();
        let consumer = broker
            .consumer("retry", "g")
            .start(StartPosition::Earliest)
            .concurrency(100)
            .read_batch(256)
            .retry(Backoff::fixed(Duration::from_millis(1)).max_attempts(3))
            .handler("job", move |m: Message| {
                let first = m.attempt == 1;
                async move {
                    if first {
                        Err(HandlerError::retryable("fails once"))
                    } else {
                        Ok(())
                    }
                }
            })
            .build()?
            .start()
            .await?;
        while consumer.stats().processed < n || !settled(&broker, "retry").await? {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let elapsed = start.elapsed();
        consumer.shutdown(Duration::from_secs(10)).await;
        let rate = n as f64 / elapsed.as_secs_f64();
        say(
            json_out,
            format!(
                "worker-retry-throughput (fail once, then succeed):  {rate:>9.0} msg/s (whole run: fail, reschedule, promote, succeed)"
            ),
        );
        report.insert(
            "worker_retry_throughput".into(),
            json!({"messages": n, "messages_per_second": rate}),
        );
    }

    let mut e2e_rate = None;
    if want("e2e") {
        let n = args.messages;
        let rate = end_to_end(&broker, n, 1).await?;
        say(
            json_out,
            format!(
                "end to end (64 publishers, single publishes, consume + ack): {rate:>9.0} msg/s"
            ),
        );
        report.insert(
            "end_to_end".into(),
            json!({"messages": n, "messages_per_second": rate}),
        );
        e2e_rate = Some(rate);
    }

    if want("latency") {
        let rate = args
            .latency_rate
            .or(e2e_rate.map(|r| r / 2.0))
            .unwrap_or(10_000.0);
        let [p50, p99, p999] = latency(&broker, rate, Duration::from_secs(5)).await?;
        say(
            json_out,
            format!(
                "publish-to-handler latency at {rate:.0} msg/s: p50 {p50:.3} ms, p99 {p99:.3} ms, p99.9 {p999:.3} ms"
            ),
        );
        report.insert(
            "latency".into(),
            json!({"rate": rate, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999}),
        );
    }
    drop(broker);
    drop(server);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Calls per command so far (`INFO commandstats`), by lower-case command name.
fn commands(server: &relq_redis_server::RedisServer) -> std::collections::BTreeMap<String, u64> {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Publishes `n` messages in batches of 50, one batch in flight.
async fn bulk_publish(
    broker: &Broker,
    topic: &str,
    n: u64,
    payload: &bytes::Bytes,
) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(50);
        let batch = (0..k)
            .map(|_| NewMessage::new("job", payload.clone()))
            .collect();
        broker.publish_batch(topic, batch).await?;
        left -= k;
    }
    Ok(())
}

/// `redis-benchmark` pipelined XADD: 50 clients, 32 commands per pipeline.
fn redis_benchmark_xadd(port: u16, size: usize, n: u64) -> anyhow::Result<f64> {
    let value = "x".repeat(size);
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "50", "-P", "32", "-n", &n.to_string(), "-q"])
        .args(["XADD", "rb-stream", "*", "data", &value])
        .output()
        .map_err(|e| anyhow::anyhow!("run redis-benchmark: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last "<n> requests per second" figure (-q prints progress lines first).
    text.split(['\r', '\n'])
        .filter_map(|l| {
            let (_, rest) = l.rsplit_once(": ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .next_back()
        .ok_or_else(|| anyhow::anyhow!("unexpected redis-benchmark output: {text}"))
}

/// The approach of a hand-rolled consumer: publish one, read one, acknowledge one.
async fn naive_loop(url: &str, n: u64, payload: &bytes::Bytes) -> anyhow::Result<f64> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("naive")
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut c)
        .await?;
    let start = Instant::now();
    for _ in 0..n {
        redis::cmd("XADD")
            .arg("naive")
            .arg("*")
            .arg("data")
            .arg(payload.as_ref())
            .query_async::<redis::Value>(&mut c)
            .await?;
        let got: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg("naive")
            .arg(">")
            .query_async(&mut c)
            .await?;
        let id = first_id(&got).ok_or_else(|| anyhow::anyhow!("naive loop read nothing"))?;
        redis::cmd("XACK")
            .arg("naive")
            .arg("g")
            .arg(id)
            .query_async::<redis::Value>(&mut c)
            .await?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The id of the first entry of an XREADGROUP reply.
fn first_id(v: &redis::Value) -> Option<Vec<u8>> {
    use redis::Value::{Array, BulkString, Map};
    let streams = match v {
        Array(a) => a.first()?.clone(),
        Map(m) => Array(vec![m.first()?.0.clone(), m.first()?.1.clone()]),
        _ => return None,
    };
    let Array(parts) = streams else { return None };
    let Array(entries) = parts.get(1)? else {
        return None;
    };
    let Array(entry) = entries.first()? else {
        return None;
    };
    match entry.first()? {
        BulkString(id) => Some(id.clone()),
        _ => None,
    }
}
