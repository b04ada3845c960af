//! The runtime while the backend refuses calls: shutdown keeps its deadline even when the backend
//! refuses settlements (the messages stay pending and are delivered again), and a message whose
//! ack is still queued when the consumer recovers its pending messages after an outage is not
//! run a second time; a settler that panics stops the consumer. And the runtime never fetches
//! more messages than it has free handler slots for (each fetch is a delivery the backend
//! counts against the attempt limit).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use relq::{Broker, MemoryBackend, Message, NewMessage, StartPosition};
use relq_core::testing::{Faults, Faulty};

/// A broker on a [`Faulty`] in-memory backend (its switches), with a consumer "w" of group "g"
/// on topic "t" whose handler counts its runs and succeeds, and one message published to it.
struct Setup {
    broker: Broker,
    consumer: relq::ConsumerHandle,
    faults: Arc<Faults>,
    runs: Arc<AtomicU32>,
}

async fn setup(panic_settle: bool, refuse_settle: bool) -> Setup {
    let backend = Faulty::new(MemoryBackend::new());
    let faults = backend.faults();
    faults.panic_settle(panic_settle);
    faults.refuse_settle(refuse_settle);
    let broker = Broker::new(backend);
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let consumer = broker
        .consumer("t", "g")
        .name("w")
        .start(StartPosition::Earliest)
        .handler("job", move |_m: Message| {
            r.fetch_add(1, Ordering::Relaxed);
            async { Ok(()) }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    broker
        .publish("t", NewMessage::new("job", "x"))
        .await
        .unwrap();
    Setup {
        broker,
        consumer,
        faults,
        runs,
    }
}

impl Setup {
    async fn until_handled(&self) {
        while self.runs.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn pending(broker: &Broker) -> u64 {
    broker.topic_info("t").await.unwrap().groups[0].pending
}

#[tokio::test(start_paused = true)]
async fn shutdown_keeps_its_deadline_while_the_backend_refuses_settlements() {
    let s = setup(false, true).await;
    s.until_handled().await;
    let started = tokio::time::Instant::now();
    s.consumer.shutdown(Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert!(
        took <= Duration::from_millis(1500),
        "shutdown took {took:?} (the settler's retries alone would take ~30 s)"
    );
    // The ack never reached the backend: the message is still pending, to be delivered again.
    assert_eq!(pending(&s.broker).await, 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_ack_is_queued_is_not_run_again_after_an_outage() {
    // The backend is down when the handler finishes: its ack waits in the settler.
    let s = setup(false, true).await;
    s.until_handled().await;
    // A read fails too: the consumer recovers its pending messages, which include this one.
    s.faults.fail_next_read();
    while s.faults.read_failure_pending() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The backend comes back: the queued ack is applied.
    s.faults.refuse_settle(false);
    while pending(&s.broker).await > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.consumer.shutdown(Duration::from_secs(1)).await;
    assert_eq!(
        s.runs.load(Ordering::Relaxed),
        1,
        "the recovered message ran again although its ack was queued"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_settler_stops_the_consumer() {
    let s = setup(true, false).await;
    let reason = tokio::time::timeout(Duration::from_secs(60), s.consumer.done())
        .await
        .expect("the consumer must stop when its settler is gone");
    assert!(
        matches!(&reason, relq::StopReason::Failed(why) if why.message.contains("settler panicked")),
        "{reason:?}"
    );
    // The message was handled but never settled: it stays pending.
    assert_eq!(s.runs.load(Ordering::Relaxed), 1);
    assert_eq!(pending(&s.broker).await, 1);
}

/// With every handler slot but one busy, the runtime fetches one message, never a full read
/// batch: a message fetched beyond the free slots would wait unstarted while the backend counts
/// it as delivered (and a crash meanwhile would burn one of its attempts).
#[tokio::test(start_paused = true)]
async fn the_runtime_never_fetches_more_than_it_can_start() {
    let running = Arc::new(AtomicU32::new(0));
    let over = Arc::new(AtomicU32::new(0));
    let backend = Faulty::new(MemoryBackend::new());
    let (r, o) = (running.clone(), over.clone());
    // A fetch asking for more than the free handler slots (of 4) is counted.
    backend.faults().on_fetch(move |max| {
        if max as u32 > 4u32.saturating_sub(r.load(Ordering::SeqCst)) {
            o.fetch_add(1, Ordering::SeqCst);
        }
    });
    let broker = Broker::new(backend);
    let batch = (0..60)
        .map(|i| NewMessage::new("job", format!("m{i}")))
        .collect();
    broker.publish_batch("t", batch).await.unwrap();
    let done = Arc::new(AtomicU32::new(0));
    let (r, d) = (running.clone(), done.clone());
    let consumer = broker
        .consumer("t", "g")
        .start(StartPosition::Earliest)
        .concurrency(4)
        .read_batch(64)
        .handler("job", move |m: Message| {
            let (r, d) = (r.clone(), d.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                // Uneven handler times, so slots free up one at a time.
                let n: u64 = m.payload[1..].iter().map(|b| u64::from(*b)).sum();
                tokio::time::sleep(Duration::from_millis(1 + n % 7)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                d.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    while done.load(Ordering::SeqCst) < 60 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    consumer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        over.load(Ordering::SeqCst),
        0,
        "fetches asked for more than the free slots"
    );
}

/// A consumer handles a message but its ack never reaches the backend (down, then the consumer
/// stops): another consumer of the group claims the message. With `skip_processed` the record
/// written before the ack makes it acknowledge the message without running it again; without,
/// it runs twice (the control).
#[tokio::test(start_paused = true)]
async fn skip_processed_stops_a_claimed_message_whose_ack_was_lost_from_running_again() {
    for skip in [true, false] {
        let backend = Faulty::new(MemoryBackend::new());
        let faults = backend.faults();
        faults.refuse_settle(true);
        let broker = Broker::new(backend);
        let runs = Arc::new(AtomicU32::new(0));
        let consumer = |name: &str| {
            let r = runs.clone();
            let mut c = broker
                .consumer("t", "g")
                .name(name)
                .start(StartPosition::Earliest)
                .claim_after(Duration::from_secs(2))
                .handler_timeout(Duration::from_secs(1))
                .handler("job", move |_m: Message| {
                    r.fetch_add(1, Ordering::Relaxed);
                    async { Ok(()) }
                });
            if skip {
                c = c.skip_processed(Duration::from_secs(600));
            }
            c.build().unwrap()
        };
        let w = consumer("w").start().await.unwrap();
        broker
            .publish("t", NewMessage::new("job", "x"))
            .await
            .unwrap();
        while runs.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        w.shutdown(Duration::from_secs(1)).await;
        assert_eq!(pending(&broker).await, 1, "the ack never arrived");
        faults.refuse_settle(false);
        let v = consumer("v").start().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while pending(&broker).await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never claimed and settled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let report = v.shutdown(Duration::from_secs(1)).await;
        if skip {
            assert_eq!(runs.load(Ordering::Relaxed), 1, "it ran again");
            assert_eq!(report.stats.already_processed, 1);
        } else {
            assert_eq!(runs.load(Ordering::Relaxed), 2, "the control runs it twice");
            assert_eq!(report.stats.already_processed, 0);
        }
    }
}

/// With `skip_processed`, a check the backend fails is a retryable failure (category
/// `processed_check`, the handler not run: here until the attempts run out); a record that
/// fails after a success leaves the message acknowledged (its work is done), unrecorded.
#[tokio::test(start_paused = true)]
async fn skip_processed_fails_a_failed_check_and_acks_despite_a_failed_record() {
    let backend = Faulty::new(MemoryBackend::new());
    let faults = backend.faults();
    let broker = Broker::new(backend);
    let runs = Arc::new(AtomicU32::new(0));
    let (r, f) = (runs.clone(), faults.clone());
    let c = broker
        .consumer("t", "g")
        .start(StartPosition::Earliest)
        .skip_processed(Duration::from_secs(600))
        .retry(relq::Backoff::fixed(Duration::from_millis(100)).max_attempts(2))
        .handler("job", move |m: Message| {
            r.fetch_add(1, Ordering::Relaxed);
            // The backend goes down while this one runs: its record fails.
            if &m.payload[..] == b"y" {
                f.fail_processed(true);
            }
            async { Ok(()) }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    faults.fail_processed(true);
    broker
        .publish("t", NewMessage::new("job", "x"))
        .await
        .unwrap();
    while c.stats().dead_lettered == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(runs.load(Ordering::Relaxed), 0, "not run while unchecked");
    let dl = broker
        .dead_letters("t")
        .list(&relq::DeadLetterQuery::all())
        .await
        .unwrap();
    assert_eq!(dl[0].category.as_deref(), Some("processed_check"), "{dl:?}");
    faults.fail_processed(false);
    let y = broker
        .publish("t", NewMessage::new("job", "y"))
        .await
        .unwrap();
    while c.stats().processed == 0 {
        assert!(tokio::time::Instant::now() < deadline, "y never acked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = c.shutdown(Duration::from_secs(1)).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    assert_eq!(report.stats.dead_lettered, 1);
    assert_eq!(pending(&broker).await, 0, "y is acknowledged");
    faults.fail_processed(false);
    assert!(
        !broker
            .backend()
            .processed("t", "g", &format!("i:{y}"))
            .await
            .unwrap(),
        "the failed record is not there"
    );
}
