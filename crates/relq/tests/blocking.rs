//! A handler that blocks its thread (a synchronous sleep or a stuck FFI call: a bug, but one
//! that happens) is still cut off at its timeout: the consumer's watchdog settles the attempt as
//! a timeout and the retry runs on another worker thread while the first call is still stuck.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relq::{Backoff, Broker, HandlerError, Message, NewMessage, StartPosition};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_its_thread_is_cut_off_at_the_timeout() {
    let broker = Broker::memory();
    let starts: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let seen = starts.clone();
    let block = Duration::from_millis(1500);
    let consumer = broker
        .consumer("blocking", "g")
        .start(StartPosition::Earliest)
        .handler_timeout(Duration::from_millis(200))
        .claim_after(Duration::from_secs(30))
        .retry(Backoff::fixed(Duration::from_millis(1)).max_attempts(3))
        .handler("job", move |m: Message| {
            seen.lock().unwrap().push((m.attempt, Instant::now()));
            if m.attempt == 1 {
                std::thread::sleep(block); // blocks the worker thread, ignores cancellation
            }
            async { Ok::<(), HandlerError>(()) }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    broker
        .publish("blocking", NewMessage::new("job", "x"))
        .await
        .unwrap();
    until_processed(&consumer, 1, Duration::from_secs(20), "never processed").await;
    let starts = starts.lock().unwrap().clone();
    assert_eq!(
        starts.len(),
        2,
        "one timed-out attempt, one retry: {starts:?}"
    );
    assert_eq!((starts[0].0, starts[1].0), (1, 2));
    assert!(
        starts[1].1 - starts[0].1 < block,
        "the retry started {:?} after the first attempt, before the blocked call returned",
        starts[1].1 - starts[0].1
    );
    assert_eq!(
        consumer.stats().failed,
        1,
        "the first attempt failed as a timeout"
    );
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// A retry due at once is run by the same consumer right away; it does not wait for
/// `claim_after` (a retried message must never look like one this consumer is still running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_due_at_once_is_not_stuck_until_claim_after() {
    // The embedded engine: its settle returns only after a commit, which leaves time for the
    // retry to come due while its settlement is still in flight.
    let dir = std::env::temp_dir().join(format!("relq-quick-retry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = Broker::open(&dir).unwrap();
    let consumer = broker
        .consumer("quick-retry", "g")
        .start(StartPosition::Earliest)
        .claim_after(Duration::from_secs(120))
        .retry(Backoff::fixed(Duration::from_millis(1)).max_attempts(5))
        .handler("job", |m: Message| async move {
            if m.attempt < 4 {
                Err(HandlerError::retryable("not yet"))
            } else {
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for i in 0..50 {
        broker
            .publish("quick-retry", NewMessage::new("job", format!("{i}")))
            .await
            .unwrap();
    }
    // 60 s is far below claim_after: only a stuck retry could take that long.
    until_processed(&consumer, 50, Duration::from_secs(60), "retries were stuck").await;
    assert_eq!(consumer.stats().retried, 150);
    consumer.shutdown(Duration::from_secs(5)).await;
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A handler still blocking its thread when the consumer shuts down does not hold the
/// shutdown up: its attempt was settled as a timeout already, and nothing of the consumer
/// waits for the stuck call (which returns only after the shutdown is over).
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_handler_blocking_its_thread_does_not_hold_up_shutdown() {
    blocking_handler_at_shutdown(Broker::memory()).await;
}

/// The same on the embedded engine, whose settle waits for a commit: the settler is then
/// waiting on the engine (not on its queue) when handlers queue more settlements, and must
/// still not be stranded behind the stuck call.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_handler_blocking_its_thread_does_not_hold_up_shutdown_embedded() {
    let dir = std::env::temp_dir().join(format!("relq-blocking-shutdown-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = Broker::open(&dir).unwrap();
    blocking_handler_at_shutdown(broker.clone()).await;
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn blocking_handler_at_shutdown(broker: Broker) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let released = Arc::new(AtomicBool::new(false));
    let shut_down = Arc::new(AtomicBool::new(false));
    let (r, s) = (released.clone(), shut_down.clone());
    let consumer = broker
        .consumer("blocking-shutdown", "g")
        .start(StartPosition::Earliest)
        .handler_timeout(Duration::from_millis(100))
        .claim_after(Duration::from_secs(30))
        .retry(Backoff::fixed(Duration::from_millis(1)).max_attempts(3))
        .concurrency(8)
        .handler("job", move |m: Message| {
            if m.attempt == 1 && m.payload == "block" {
                // Stuck until the consumer has shut down (or 30 s, so a failure ends).
                let until = Instant::now() + Duration::from_secs(30);
                while !s.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                r.store(true, Ordering::SeqCst);
            }
            async { Ok::<(), HandlerError>(()) }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // The stuck one comes amid others: a worker takes it right after finishing one, and what
    // that one woke (the settler, the fetch loop) must not be stranded behind the stuck call.
    for i in 0..60 {
        let payload = if i == 30 {
            "block".to_owned()
        } else {
            format!("{i}")
        };
        broker
            .publish("blocking-shutdown", NewMessage::new("job", payload))
            .await
            .unwrap();
    }
    until_processed(
        &consumer,
        60,
        Duration::from_secs(20),
        "not all handled while one call is stuck",
    )
    .await;
    let report = consumer.shutdown(Duration::from_secs(60)).await;
    assert!(
        !released.load(Ordering::SeqCst),
        "the shutdown waited for the blocked handler"
    );
    shut_down.store(true, Ordering::SeqCst);
    assert_eq!(report.abandoned, 0);
}

/// Waits (real time) until `consumer` has processed `n` messages; fails with `what` and its
/// stats after `limit`.
async fn until_processed(consumer: &relq::ConsumerHandle, n: u64, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while consumer.stats().processed < n {
        assert!(Instant::now() < deadline, "{what}: {:?}", consumer.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
