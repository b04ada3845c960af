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

/// While one handler blocks its thread, the other messages of the same read run on the other
/// thread: the idle workers woken for them one after another are never left waiting behind the
/// blocked one (tokio keeps a task woken from a worker thread in that thread's own slot, and a
/// task that yields on that thread's own list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_its_thread_does_not_hold_up_the_rest_of_its_read() {
    blocking_in_one_read(true).await;
}

/// The same with the blocking message last in the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_its_thread_last_in_its_read_does_not_hold_up_the_rest() {
    blocking_in_one_read(false).await;
}

async fn blocking_in_one_read(block_first: bool) {
    let broker = Broker::memory();
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = events.clone();
    let consumer = broker
        .consumer("blocking-read", "g")
        .start(StartPosition::Earliest)
        .concurrency(8)
        .read_batch(8)
        .poll_wait(Duration::from_millis(50))
        .handler_timeout(Duration::from_secs(20))
        .claim_after(Duration::from_secs(60))
        .handler("job", move |m: Message| {
            if m.payload.as_ref() == b"block" {
                std::thread::sleep(Duration::from_secs(2)); // blocks the worker thread
                log.lock().unwrap().push("blocker returned".to_owned());
            } else {
                log.lock().unwrap().push(format!("{:?}", m.payload));
            }
            async { Ok::<(), HandlerError>(()) }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // A first read of eight starts eight workers, which then wait idle.
    let warm: Vec<NewMessage> = (0..8)
        .map(|i| NewMessage::new("job", format!("w{i}")))
        .collect();
    broker.publish_batch("blocking-read", warm).await.unwrap();
    until_processed(
        &consumer,
        8,
        Duration::from_secs(20),
        "warm-up not processed",
    )
    .await;
    // Not a synchronisation, a sharpening: once reads have come back empty (poll_wait), the
    // consumer has one read out with all eight permits, so the batch below arrives in one read
    // and is handed to the idle workers at once. Were the reads still split, the test would
    // pass without testing the hand-over; it cannot fail because of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quick = (0..7).map(|i| NewMessage::new("job", format!("q{i}")));
    let batch: Vec<NewMessage> = if block_first {
        std::iter::once(NewMessage::new("job", "block"))
            .chain(quick)
            .collect()
    } else {
        quick.chain([NewMessage::new("job", "block")]).collect()
    };
    events.lock().unwrap().clear();
    broker.publish_batch("blocking-read", batch).await.unwrap();
    until_processed(&consumer, 16, Duration::from_secs(20), "not processed").await;
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 8, "{events:?}");
    assert_eq!(
        events.last().map(String::as_str),
        Some("blocker returned"),
        "the quick messages ran while the blocked handler held its thread: {events:?}"
    );
    consumer.shutdown(Duration::from_secs(5)).await;
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
