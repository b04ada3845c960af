//! Every duration a user can hand relq (builders, backoff, shutdown, delays, retention, purge
//! ages, cleanup periods) is validated or saturated: `Duration::MAX`, zero and anything between
//! give a value or a clear configuration error, never a panic. The property test drives a real
//! consumer on the in-memory and embedded backends with each extreme and checks that a message
//! is still handled (or the builder said why not) and that shutdown returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use relq::{
    Backoff, BatchConfig, Broker, EmbeddedBackend, EmbeddedConfig, Error, MemoryBackend,
    MemoryConfig, Message, NewMessage, Retention, StartPosition, Timestamp,
};

fn extreme() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::from_millis(u64::MAX)),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..5_000).prop_map(Duration::from_millis),
    ]
}

/// Panics anywhere in this test binary, including inside spawned tasks whose panic a join
/// would otherwise turn into a quiet "consumer task ended".
static PANICS: AtomicU64 = AtomicU64::new(0);

fn runtime() -> tokio::runtime::Runtime {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn backoff_delays_saturate() {
    let all = [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_secs(1),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ];
    for initial in all {
        for max in all {
            for b in [
                Backoff::exponential(initial, max),
                Backoff::exponential(initial, max).multiplier(1e300),
                Backoff::exponential(initial, max).randomization(1.0),
                Backoff::fixed(max),
                Backoff::linear(initial, max, max),
                Backoff::linear(initial, Duration::MAX, max),
            ] {
                if b.validate().is_err() {
                    continue;
                }
                for attempt in [0, 1, 2, 64, 1024, u32::MAX] {
                    assert!(b.delay(attempt) <= max.max(initial), "{b:?} {attempt}");
                }
            }
        }
    }
}

#[test]
fn timestamps_saturate_at_the_last_writable_instant() {
    let now = Timestamp::now();
    assert_eq!(now.plus(Duration::MAX), Timestamp::MAX);
    assert_eq!(now.minus(Duration::MAX), Timestamp(0));
    // Displaying any timestamp never panics, even one past year 9999 from foreign data.
    for t in [Timestamp(0), Timestamp::MAX, Timestamp(u64::MAX)] {
        assert!(!t.to_string().is_empty());
    }
}

/// A consumer built with `d` in every duration setting: building answers Ok or a configuration
/// error; a consumer that starts handles a published message and shuts down with deadline `d`.
/// Returns whether it started.
async fn consumer_with(broker: &Broker, topic: &str, d: Duration) -> bool {
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let built = broker
        .consumer(topic, "g")
        .start(StartPosition::Earliest)
        .claim_after(d)
        .handler_timeout((d / 4).clamp(Duration::from_millis(1), Duration::from_secs(3600)))
        .poll_wait(d)
        .retry(Backoff::exponential(Duration::from_millis(1), d).max_attempts(3))
        .batch_handler(
            "batch",
            BatchConfig::default()
                .size(1)
                .timeout(d / 8)
                .max_wait(d / 4),
            |ms: Vec<Message>| async move {
                ms.iter()
                    .map(|_| Ok::<(), relq::HandlerError>(()))
                    .collect::<Vec<_>>()
            },
        )
        .handler("job", move |_m: Message| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build();
    let consumer = match built {
        Ok(c) => c,
        Err(Error::Config(e)) => {
            assert!(!e.to_string().is_empty());
            return false;
        }
        Err(e) => panic!("unexpected error for {d:?}: {e}"),
    };
    let handle = consumer.start().await.unwrap();
    broker
        .publish(topic, NewMessage::new("job", "x"))
        .await
        .unwrap();
    // A delayed publish of any length is accepted and stays scheduled.
    broker
        .publish(
            topic,
            NewMessage::new("job", "later").delay(d.max(Duration::from_secs(3600))),
        )
        .await
        .unwrap();
    // The message is handled (poll_wait only bounds how long an empty read waits).
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while handled.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "message not handled with {d:?}");
    let report = tokio::time::timeout(Duration::from_secs(20), handle.shutdown(d))
        .await
        .unwrap_or_else(|_| panic!("shutdown({d:?}) did not return"));
    assert_eq!(report.abandoned, 0);
    // Operations taking ages and periods.
    broker
        .dead_letters(topic)
        .purge_older_than(d)
        .await
        .unwrap();
    broker
        .cleanup(topic, &Retention::default().min_age(d))
        .await
        .unwrap();
    drop(broker.spawn_cleanup(topic, Retention::default().min_age(d), d));
    tokio::task::yield_now().await;
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "something panicked with {d:?}"
    );
    true
}

/// The largest values run a consumer end to end (they are valid settings, not errors).
#[test]
fn the_largest_durations_are_valid_settings() {
    for d in [
        Duration::MAX,
        Duration::from_secs(u64::MAX),
        Duration::from_millis(u64::MAX),
        Duration::from_secs(10),
    ] {
        runtime().block_on(async {
            let broker = Broker::memory();
            assert!(consumer_with(&broker, "t", d).await, "{d:?} was refused");
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn extreme_durations_never_panic_on_the_memory_backend(d in extreme()) {
        runtime().block_on(async {
            let config = MemoryConfig::default().publish_timeout(d);
            let broker = Broker::new(MemoryBackend::with_config(config).unwrap());
            consumer_with(&broker, "t", d).await;
        });
    }

    #[test]
    fn extreme_durations_never_panic_on_the_embedded_engine(d in extreme()) {
        let dir = std::env::temp_dir().join(format!(
            "relq-durations-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        runtime().block_on(async {
            let config = EmbeddedConfig::default().resident_window(d);
            let broker = Broker::new(EmbeddedBackend::open_with(&dir, config).unwrap());
            consumer_with(&broker, "t", d).await;
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
