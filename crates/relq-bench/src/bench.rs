//! `relq bench embedded`: throughput, latency, memory and recovery of the embedded engine, each
//! beside this machine's limit measured in the same run (fdatasync rate, sequential write
//! bandwidth), and the same scenarios on the in-memory backend as a reference.
//!
//! Every figure the docs quote comes from this command.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use relq::{Backend, Broker, EmbeddedBackend, Message, NewMessage, StartPosition};
use serde_json::{json, Value};

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// The embedded engine against this machine's fsync and bandwidth limits.
    Embedded(EmbeddedArgs),
    /// The Redis Streams backend against redis-benchmark and a naive loop, on a redis-server
    /// this command starts.
    Redis(crate::bench_redis::RedisArgs),
    /// The consumer runtime alone on the in-memory backend (small enough for callgrind).
    Memory(crate::bench_memory::MemoryArgs),
    /// Payload compression (off, lz4, gzip, zstd) on realistic JSON: throughput against
    /// compression off in the same round, and the bytes stored.
    Compression(crate::bench_compression::CompressionArgs),
    /// A rate-limited group: the achieved rate against the limit.
    RateLimit(crate::bench_rate::RateArgs),
    /// Per-key ordering: throughput with messages spread over ordering keys against none.
    Ordering(crate::bench_ordering::OrderingArgs),
    /// Internal: fills a data directory with a backlog, prints "ready", waits to be killed.
    #[command(hide = true)]
    Fill {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        messages: u64,
        /// Publish the messages due in an hour, then have the group read past them.
        #[arg(long)]
        delayed: bool,
    },
}

#[derive(Args)]
pub(crate) struct EmbeddedArgs {
    /// Messages per publish scenario.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Messages of the end-to-end scenario.
    #[arg(long, default_value_t = 300_000)]
    e2e_messages: u64,
    /// Backlog for the memory and recovery scenario (the target is 10,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Delayed messages of the scheduled-backlog scenario (due in an hour: the group reads past
    /// them, so each becomes a scheduled row).
    #[arg(long, default_value_t = 1_000_000)]
    delayed: u64,
    /// Where to put the data directories (default: the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only these scenarios (publish, e2e, latency, backlog, delayed); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Publish rate of the latency scenario (default: half the end-to-end maximum).
    #[arg(long)]
    latency_rate: Option<f64>,
}

/// A directory removed (with what is in it) when dropped: declare it before the broker using it.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(base: &Path, name: &str) -> Scratch {
        let dir = base.join(format!("relq-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) async fn run(cmd: BenchCommand, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Fill {
            dir,
            messages,
            delayed,
        } => fill(&dir, messages, delayed).await,
        BenchCommand::Embedded(args) => embedded(args, json_out).await,
        BenchCommand::Redis(args) => crate::bench_redis::run(args, json_out).await,
        BenchCommand::Memory(args) => crate::bench_memory::run(args, json_out).await,
        BenchCommand::Compression(args) => crate::bench_compression::run(args, json_out).await,
        BenchCommand::RateLimit(args) => crate::bench_rate::run(args, json_out).await,
        BenchCommand::Ordering(args) => crate::bench_ordering::run(args, json_out).await,
    }
}

pub(crate) fn say(json_out: bool, line: String) {
    if !json_out {
        eprintln!("{line}");
    }
}

async fn embedded(args: EmbeddedArgs, json_out: bool) -> anyhow::Result<()> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut report = serde_json::Map::new();

    // The machine's limits, measured now, in the same directory.
    let scratch = Scratch::new(&base, "limits");
    std::fs::create_dir_all(&scratch.0)?;
    let sync_rate = fsync_rate(&scratch.0.join("sync"), Duration::from_secs(2))?;
    let bandwidth = write_bandwidth(&scratch.0.join("bw"), 512 << 20)?;
    drop(scratch);
    say(
        json_out,
        format!(
            "machine: fdatasync after a 256 B write: {sync_rate:.0}/s; sequential write + fsync: {:.0} MB/s",
            bandwidth / 1e6
        ),
    );
    report.insert(
        "machine".into(),
        json!({"fdatasync_per_second": sync_rate, "sequential_write_bytes_per_second": bandwidth}),
    );

    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    // Durable publish throughput.
    let mut publish = Vec::new();
    for size in [256usize, 1024].into_iter().filter(|_| want("publish")) {
        for publishers in [1usize, 64] {
            let n = if publishers == 1 {
                (args.messages / 20).max(1000)
            } else {
                args.messages
            };
            let scratch = Scratch::new(&base, "publish");
            let engine = Arc::new(EmbeddedBackend::open(&scratch.0)?);
            let broker = Broker::from_arc(engine.clone());
            let elapsed = publish_load(&broker, n, size, publishers).await?;
            let stats = engine.stats();
            let rate = n as f64 / elapsed.as_secs_f64();
            let per_sync = stats.records as f64 / stats.syncs.max(1) as f64;
            // The limit at this batching: sync rate x records per sync, or the bandwidth.
            let record = (size + 40) as f64;
            let limit = (sync_rate * per_sync).min(bandwidth / record);
            // The same, with syncs of the size this run actually wrote per sync.
            let sized_rate = fsync_rate_at(
                &base.join(format!("relq-bench-sync-{}", std::process::id())),
                (per_sync * record) as usize,
                Duration::from_secs(1),
            )?;
            let sized_limit = (sized_rate * per_sync).min(bandwidth / record);
            let mem = {
                let broker = Broker::memory();
                let e = publish_load(&broker, n, size, publishers).await?;
                n as f64 / e.as_secs_f64()
            };
            say(
                json_out,
                format!(
                    "publish {size:>4} B x {publishers:>2} publishers: {rate:>9.0} msg/s ({:.0} MB/s), {per_sync:.1} msgs per sync ({:.0} us each, {} rounds), limit {limit:.0} msg/s -> {:.0}% of limit ({:.0}% of {sized_limit:.0} with syncs of that size); in-memory {mem:.0} msg/s",
                    rate * size as f64 / 1e6,
                    stats.sync_micros as f64 / stats.cycles.max(1) as f64,
                    stats.cycles,
                    100.0 * rate / limit,
                    100.0 * rate / sized_limit
                ),
            );
            publish.push(json!({
                "payload_bytes": size, "publishers": publishers, "messages": n,
                "messages_per_second": rate, "records_per_sync": per_sync,
                "limit_messages_per_second": limit, "ratio_of_limit": rate / limit,
                "sized_sync_limit_messages_per_second": sized_limit, "ratio_of_sized_limit": rate / sized_limit,
                "memory_backend_messages_per_second": mem,
            }));
        }
    }
    report.insert("publish".into(), Value::Array(publish));

    // End to end: 64 publishers and a consumer with concurrency 100, no-op handler.
    let mut e2e = 0.0;
    if want("e2e") || (want("latency") && args.latency_rate.is_none()) {
        let scratch = Scratch::new(&base, "e2e");
        let broker = Broker::open(&scratch.0)?;
        e2e = end_to_end(&broker, args.e2e_messages, 1).await?;
        drop(broker);
        drop(scratch);
        let scratch = Scratch::new(&base, "e2e-batched");
        let engine = Arc::new(EmbeddedBackend::open(&scratch.0)?);
        let broker = Broker::from_arc(engine.clone());
        let e2e_batched = end_to_end(&broker, args.e2e_messages, 50).await?;
        let cycles = engine.stats();
        drop(broker);
        drop(engine);
        drop(scratch);
        let e2e_mem = end_to_end(&Broker::memory(), args.e2e_messages, 1).await?;
        say(
        json_out,
        format!(
            "end to end (publish, consume, ack; 256 B; concurrency 100): {e2e:.0} msg/s with single publishes, {e2e_batched:.0} msg/s with batches of 50 ({} commit cycles, {:.0} us each, {} state commits); in-memory {e2e_mem:.0} msg/s",
            cycles.cycles,
            cycles.sync_micros as f64 / cycles.cycles.max(1) as f64,
            cycles.state_commits,
        ),
    );
        report.insert(
            "end_to_end".into(),
            json!({"messages": args.e2e_messages, "messages_per_second": e2e,
               "batched_50_messages_per_second": e2e_batched,
               "batched_50_commit_cycles": cycles.cycles,
               "batched_50_commit_micros_per_cycle": cycles.sync_micros as f64 / cycles.cycles.max(1) as f64,
               "memory_backend_messages_per_second": e2e_mem}),
        );
    }

    // Latency at half the end-to-end maximum.
    if want("latency") {
        let scratch = Scratch::new(&base, "latency");
        let broker = Broker::open(&scratch.0)?;
        let rate = args.latency_rate.unwrap_or((e2e / 2.0).max(100.0));
        let lat = latency(&broker, rate, Duration::from_secs(5)).await?;
        drop(broker);
        drop(scratch);
        let lat_mem = latency(&Broker::memory(), rate, Duration::from_secs(3)).await?;
        say(
        json_out,
        format!(
            "publish-to-handler latency at {rate:.0} msg/s: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms; in-memory p50 {:.3} p99 {:.3} p99.9 {:.3} ms",
            lat[0], lat[1], lat[2], lat_mem[0], lat_mem[1], lat_mem[2]
        ),
    );
        report.insert(
        "latency".into(),
        json!({"rate_per_second": rate, "p50_ms": lat[0], "p99_ms": lat[1], "p999_ms": lat[2],
               "memory_backend": {"p50_ms": lat_mem[0], "p99_ms": lat_mem[1], "p999_ms": lat_mem[2]}}),
    );
    }

    // Backlog: memory while filling, then recovery after kill -9. Scheduled backlog: what
    // delayed messages cost once their group has read past them (each a scheduled row, spilled
    // to the state database beyond the resident window), and the reopen.
    for (name, n, delayed) in [
        ("backlog", args.backlog, false),
        ("delayed", args.delayed, true),
    ] {
        if !want(name) {
            continue;
        }
        let scratch = Scratch::new(&base, name);
        let (rss, recovery) = fill_and_reopen(&scratch.0, n, delayed).await?;
        let (first, last) = match delayed {
            false => (format!("backlog of {n} messages: filler RSS {} MiB at 10%", rss.0 >> 20), "at 100%"),
            true => (
                format!(
                    "scheduled backlog of {n} delayed messages (due in 1 h): filler RSS {} MiB once the group read past 10% of them",
                    rss.0 >> 20
                ),
                "past all",
            ),
        };
        say(
            json_out,
            format!(
                "{first} / {} MiB {last}; reopen after kill -9 + first read: {:.0} ms",
                rss.1 >> 20,
                recovery.as_secs_f64() * 1e3
            ),
        );
        report.insert(
            name.into(),
            json!({"messages": n, "rss_bytes_at_10_percent": rss.0, "rss_bytes_at_end": rss.1,
                   "recovery_ms": recovery.as_secs_f64() * 1e3}),
        );
    }
    if json_out {
        println!("{}", Value::Object(report));
    }
    Ok(())
}

/// fdatasyncs per second after a 256-byte write to a preallocated file.
fn fsync_rate(path: &Path, for_: Duration) -> anyhow::Result<f64> {
    fsync_rate_at(path, 256, for_)
}

/// fdatasyncs per second, each after an appending write of `size` bytes to a file preallocated
/// the way the engine preallocates segments.
fn fsync_rate_at(path: &Path, size: usize, for_: Duration) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    const SPAN: u64 = 256 << 20;
    let f = std::fs::File::create(path)?;
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, SPAN)?;
    f.sync_all()?;
    let buf = vec![7u8; size];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_ {
        f.write_all_at(&buf, (n * size as u64) % (SPAN - size as u64))?;
        f.sync_data()?;
        n += 1;
    }
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Bytes per second of buffered sequential 1 MiB writes followed by one fsync.
fn write_bandwidth(path: &Path, total: usize) -> anyhow::Result<f64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![42u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..total / chunk.len() {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// `publishers` tasks each publish single messages (one in flight each) until `n` are published.
async fn publish_load(
    broker: &Broker,
    n: u64,
    size: usize,
    publishers: usize,
) -> anyhow::Result<Duration> {
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (broker, payload, next) = (broker.clone(), payload.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                broker
                    .publish("bench", NewMessage::new("job", payload.clone()))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

/// Messages per second through publish, consume and ack, with 64 publishers (each publishing
/// `batch` messages per call) running alongside a consumer of concurrency 100.
pub(crate) async fn end_to_end(broker: &Broker, n: u64, batch: u64) -> anyhow::Result<f64> {
    let consumer = noop_consumer(broker, "e2e").await?;
    let start = Instant::now();
    let payload = bytes::Bytes::from(vec![b'x'; 256]);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (broker, payload, next) = (broker.clone(), payload.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= n {
                    break;
                }
                let k = batch.min(n - from);
                let msgs = (0..k)
                    .map(|_| NewMessage::new("job", payload.clone()))
                    .collect();
                broker.publish_batch("e2e", msgs).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // Done when every message was handled and every ack committed.
    while consumer.stats().processed < n || !settled(broker, "e2e").await? {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// The benchmarks' consumer: group "g" from the earliest message, concurrency 100, reads of up
/// to 256, a no-op handler for type "job".
pub(crate) async fn noop_consumer(
    broker: &Broker,
    topic: &str,
) -> anyhow::Result<relq::ConsumerHandle> {
    Ok(broker
        .consumer(topic, "g")
        .start(StartPosition::Earliest)
        .concurrency(100)
        .read_batch(256)
        .handler("job", |_m: Message| async { Ok(()) })
        .build()?
        .start()
        .await?)
}

/// p50, p99 and p99.9 (ms) from publish call to handler start, publishing at `rate`.
pub(crate) async fn latency(
    broker: &Broker,
    rate: f64,
    for_: Duration,
) -> anyhow::Result<[f64; 3]> {
    let origin = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let s = samples.clone();
    let consumer = broker
        .consumer("latency", "g")
        .start(StartPosition::Earliest)
        .concurrency(100)
        .handler("job", move |m: Message| {
            let sent: u64 = std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let now = origin.elapsed().as_micros() as u64;
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(now.saturating_sub(sent));
            async { Ok(()) }
        })
        .build()?
        .start()
        .await?;
    // Open-loop: one publish task per tick, so a slow publish does not slow the schedule.
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (for_.as_secs_f64() * rate) as u64;
    let mut tasks = Vec::new();
    let start = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let broker = broker.clone();
        let sent = origin.elapsed().as_micros() as u64;
        tasks.push(tokio::spawn(async move {
            broker
                .publish("latency", NewMessage::new("job", sent.to_string()))
                .await
        }));
    }
    for t in tasks {
        t.await??;
    }
    while consumer.stats().processed < total || !settled(broker, "latency").await? {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await;
    let mut v = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_unstable();
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0;
    Ok([q(0.50), q(0.99), q(0.999)])
}

pub(crate) async fn settled(broker: &Broker, topic: &str) -> anyhow::Result<bool> {
    let info = broker.topic_info(topic).await?;
    Ok(info.groups.iter().all(|g| g.pending == 0 && g.lag == 0))
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs `bench fill` in a child process (its two RSS reports), kills it with SIGKILL, then
/// reopens the directory and reads once (expecting a message unless `delayed`).
async fn fill_and_reopen(
    dir: &Path,
    n: u64,
    delayed: bool,
) -> anyhow::Result<((u64, u64), Duration)> {
    use std::io::{BufRead, BufReader};
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["fill", "--dir"])
        .arg(dir)
        .args(["--messages", &n.to_string()]);
    if delayed {
        cmd.arg("--delayed");
    }
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut rss = (0, 0);
    for line in lines.by_ref() {
        let line = line?;
        if let Some(v) = line.strip_prefix("rss10 ") {
            rss.0 = v.parse()?;
        }
        if let Some(v) = line.strip_prefix("ready ") {
            rss.1 = v.parse()?;
            break;
        }
    }
    child.kill()?;
    child.wait()?;
    let start = Instant::now();
    let backend = EmbeddedBackend::open(dir)?;
    let sub = backend
        .join("backlog", "g", "c", StartPosition::Earliest)
        .await?;
    let wait = if delayed {
        Duration::ZERO
    } else {
        Duration::from_secs(1)
    };
    let first = backend.read(&sub, 1, wait).await?;
    let elapsed = start.elapsed();
    if delayed {
        let info = backend.topic_info("backlog").await?;
        let scheduled = info.map_or(0, |i| i.groups[0].scheduled);
        anyhow::ensure!(
            first.is_empty() && scheduled == n,
            "after recovery all {n} delayed messages are scheduled (found {scheduled}), none due"
        );
    } else {
        anyhow::ensure!(first.len() == 1, "the backlog is readable after recovery");
    }
    Ok((rss, elapsed))
}

async fn fill(dir: &Path, n: u64, delayed: bool) -> anyhow::Result<()> {
    let broker = Broker::open(dir)?;
    // The group exists from the start, so the backlog is unconsumed work, not garbage.
    broker
        .backend()
        .join("backlog", "g", "c", StartPosition::Earliest)
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 256]);
    let batch = 1000u64;
    let mut sent = 0;
    let mut reported = false;
    let due = relq::Timestamp::now().plus(Duration::from_secs(3600));
    while sent < n {
        let k = batch.min(n - sent);
        let msgs = (0..k)
            .map(|_| {
                let m = NewMessage::new("job", payload.clone());
                if delayed {
                    m.deliver_at(due)
                } else {
                    m
                }
            })
            .collect();
        broker.publish_batch("backlog", msgs).await?;
        sent += k;
        if !delayed && !reported && sent >= n / 10 {
            println!("rss10 {}", rss_bytes());
            reported = true;
        }
    }
    if delayed {
        // The group reads past them: each becomes a scheduled row (committed before "ready").
        let backend = broker.backend();
        let sub = backend
            .join("backlog", "g", "c", StartPosition::Earliest)
            .await?;
        let mut reported = false;
        loop {
            let got = backend.read(&sub, 1000, Duration::ZERO).await?;
            anyhow::ensure!(got.is_empty(), "delayed messages are not due yet");
            let lag = match backend.topic_info("backlog").await? {
                Some(i) => i.groups[0].lag,
                None => anyhow::bail!("the topic is gone"),
            };
            if !reported && lag <= n - n / 10 {
                println!("rss10 {}", rss_bytes());
                reported = true;
            }
            if lag == 0 {
                break;
            }
        }
        // An (empty) settlement returns once every state change before it was committed.
        backend.settle(&sub, &[]).await?;
    }
    println!("ready {}", rss_bytes());
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
