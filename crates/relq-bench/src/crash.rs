//! `relq-bench crash-child` (hidden): the workload of the kill -9 test. It publishes, reads and settles
//! through the backend API as fast as it can and reports on stdout what the backend acknowledged,
//! one line per event, flushed before the next call, until it is killed:
//!
//! ```text
//! P <payload> <id>        publish returned Ok
//! R <payload> <attempt>   delivered
//! A <payload>             ack committed (settle returned Ok)
//! D <payload>             dead letter committed
//! T <payload>             retry committed (due up to 100 ms later)
//! ```
//!
//! A committed retry must be delivered again. The embedded engine runs with a resident window of zero, so each such retry is
//! spilled to the state database and taken back from there.
//!
//! The parent (`crates/relq-bench/tests/crash.rs`) kills it at random moments, reopens the data
//! directory and checks the lines against what is stored.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use relq::{
    AttemptFailure, Backend, DeadLetter, EmbeddedBackend, EmbeddedConfig, FailureKind, Outgoing,
    Settlement, StartPosition, Timestamp,
};

#[derive(Args)]
pub(crate) struct CrashArgs {
    /// Data directory (the embedded engine).
    #[arg(long, required_unless_present_any = ["url", "memory"])]
    dir: Option<std::path::PathBuf>,
    /// A backend URL instead of a data directory (e.g. redis://127.0.0.1:7000).
    #[arg(long)]
    url: Option<String>,
    /// First payload number (unique across rounds).
    #[arg(long)]
    start: u64,
    /// Consumer name.
    #[arg(long, default_value = "c")]
    consumer: String,
    /// Use the in-memory backend (the control: it must lose messages).
    #[arg(long)]
    memory: bool,
}

fn emit(lines: &[String]) {
    let mut out = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
}

pub(crate) async fn run(args: CrashArgs) -> anyhow::Result<()> {
    let backend: std::sync::Arc<dyn Backend> = if args.memory {
        std::sync::Arc::new(relq::MemoryBackend::new())
    } else if let Some(url) = &args.url {
        relq::Broker::connect(url).await?.backend().clone()
    } else {
        // Small segments, so kills land around rollovers too.
        std::sync::Arc::new(EmbeddedBackend::open_with(
            args.dir.as_deref().expect("clap requires --dir"),
            EmbeddedConfig::default()
                .segment_size(256 * 1024)
                .resident_window(Duration::ZERO),
        )?)
    };
    let publisher = {
        let backend = backend.clone();
        let mut n = args.start;
        tokio::spawn(async move {
            loop {
                let size = fastrand::usize(1..=16);
                let batch: Vec<Outgoing> = (0..size)
                    .map(|i| Outgoing {
                        kind: "job".into(),
                        payload: format!("m{}", n + i as u64).into(),
                        headers: Default::default(),
                        deliver_at: None,
                        dedup_window: None,
                    })
                    .collect();
                let ids = backend.publish("t", batch).await?;
                let lines: Vec<String> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| format!("P m{} {id}", n + i as u64))
                    .collect();
                emit(&lines);
                n += size as u64;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    };
    let sub = backend
        .join("t", "g", &args.consumer, StartPosition::Earliest)
        .await?;
    loop {
        if publisher.is_finished() {
            return publisher.await?;
        }
        let got = backend.read(&sub, 32, Duration::from_millis(20)).await?;
        if got.is_empty() {
            continue;
        }
        let payload = |d: &relq::Delivery| String::from_utf8_lossy(&d.message.payload).into_owned();
        emit(
            &got.iter()
                .map(|d| format!("R {} {}", payload(d), d.message.attempt))
                .collect::<Vec<_>>(),
        );
        let mut settlements = Vec::new();
        let mut done = Vec::new();
        let now = Timestamp::now();
        for d in &got {
            let pick = fastrand::u8(0..10);
            if pick == 0 {
                settlements.push(Settlement::DeadLetter(Box::new(dead_letter(
                    &sub.consumer,
                    d,
                ))));
                done.push(format!("D {}", payload(d)));
            } else if pick == 1 && d.message.attempt < 4 {
                settlements.push(Settlement::Retry {
                    id: d.message.id,
                    at: now.plus(Duration::from_millis(fastrand::u64(0..100))),
                    failure: AttemptFailure {
                        attempt: d.message.attempt,
                        at: now,
                        consumer: sub.consumer.clone(),
                        kind: FailureKind::Retryable,
                        error: "retried by the crash test".into(),
                    },
                    release_key: false,
                });
                done.push(format!("T {}", payload(d)));
            } else {
                settlements.push(Settlement::Ack(d.message.id));
                done.push(format!("A {}", payload(d)));
            }
        }
        backend.settle(&sub, &settlements).await?;
        emit(&done);
    }
}

fn dead_letter(consumer: &str, d: &relq::Delivery) -> DeadLetter {
    let last = AttemptFailure {
        attempt: d.message.attempt,
        at: Timestamp::now(),
        consumer: consumer.to_owned(),
        kind: FailureKind::Permanent,
        error: "rejected by the crash test".into(),
    };
    let mut dl = DeadLetter::new(d.message.clone(), "t", "g", last);
    dl.category = Some("crash-test".into());
    dl.failures = Vec::new();
    dl
}
