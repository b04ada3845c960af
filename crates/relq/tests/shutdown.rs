//! The runtime while the backend refuses calls: shutdown keeps its deadline even when the backend
//! refuses settlements (the messages stay pending and are delivered again), and a message whose
//! ack is still queued when the consumer recovers its pending messages after an outage is not
//! run a second time; a settler that panics stops the consumer. And the runtime never fetches
//! more messages than it has free handler slots for (each fetch is a delivery the backend
//! counts against the attempt limit).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use relq::{
    Backend, BackendError, BackendErrorKind, Broker, Browse, CleanupReport, DeadLetter,
    DeadLetterId, DeadLetterQuery, DeadLetterStats, Delivery, MemoryBackend, Message, MessageId,
    NewMessage, Outgoing, Retention, Settlement, StartPosition, Subscription, Timestamp, TopicInfo,
};

/// The in-memory backend, whose `settle` can be switched to fail as unavailable, and whose next
/// `read` can be made to fail once.
struct Flaky {
    inner: MemoryBackend,
    refuse_settle: Arc<AtomicBool>,
    fail_next_read: Arc<AtomicBool>,
    /// `settle` panics (a backend bug).
    panic_settle: bool,
    /// Handlers running now (kept by the test's handler) and the consumer's concurrency: a
    /// fetch asking for more than the free slots is counted in `over_fetched`.
    running: Arc<AtomicU32>,
    concurrency: u32,
    over_fetched: Arc<AtomicU32>,
}

impl Flaky {
    fn fetching(&self, max: usize) {
        let free = self
            .concurrency
            .saturating_sub(self.running.load(Ordering::SeqCst));
        if max as u32 > free {
            self.over_fetched.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn unavailable() -> BackendError {
    BackendError::new(
        "flaky",
        BackendErrorKind::Unavailable,
        "refused by the test",
    )
}

#[async_trait]
impl Backend for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn publish(&self, t: &str, b: Vec<Outgoing>) -> Result<Vec<MessageId>, BackendError> {
        self.inner.publish(t, b).await
    }
    async fn join(
        &self,
        t: &str,
        g: &str,
        c: &str,
        s: StartPosition,
    ) -> Result<Subscription, BackendError> {
        self.inner.join(t, g, c, s).await
    }
    async fn recover(
        &self,
        s: &Subscription,
        a: MessageId,
        m: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.fetching(m);
        self.inner.recover(s, a, m).await
    }
    async fn claim(
        &self,
        s: &Subscription,
        i: Duration,
        m: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.fetching(m);
        self.inner.claim(s, i, m).await
    }
    async fn read(
        &self,
        s: &Subscription,
        m: usize,
        w: Duration,
    ) -> Result<Vec<Delivery>, BackendError> {
        if self.fail_next_read.swap(false, Ordering::Relaxed) {
            return Err(unavailable());
        }
        self.fetching(m);
        self.inner.read(s, m, w).await
    }
    async fn settle(&self, s: &Subscription, b: &[Settlement]) -> Result<(), BackendError> {
        assert!(!self.panic_settle, "settle panicked (as the test asked)");
        if self.refuse_settle.load(Ordering::Relaxed) {
            return Err(unavailable());
        }
        self.inner.settle(s, b).await
    }
    async fn stop_message(&self, t: &str, id: MessageId) -> Result<bool, BackendError> {
        self.inner.stop_message(t, id).await
    }
    async fn resume_message(&self, t: &str, id: MessageId) -> Result<bool, BackendError> {
        self.inner.resume_message(t, id).await
    }
    async fn terminate(&self, t: &str) -> Result<bool, BackendError> {
        self.inner.terminate(t).await
    }
    async fn create_group(
        &self,
        t: &str,
        g: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError> {
        self.inner.create_group(t, g, start).await
    }
    async fn delete_group(&self, t: &str, g: &str) -> Result<bool, BackendError> {
        self.inner.delete_group(t, g).await
    }
    async fn move_group(&self, t: &str, g: &str, to: StartPosition) -> Result<bool, BackendError> {
        self.inner.move_group(t, g, to).await
    }
    async fn cleanup(&self, t: &str, r: &Retention) -> Result<CleanupReport, BackendError> {
        self.inner.cleanup(t, r).await
    }
    async fn browse(&self, t: &str, q: &Browse) -> Result<Option<Vec<Message>>, BackendError> {
        self.inner.browse(t, q).await
    }
    async fn locate(
        &self,
        t: &str,
        id: MessageId,
    ) -> Result<Option<Vec<relq::GroupPlacement>>, BackendError> {
        self.inner.locate(t, id).await
    }
    async fn topics(&self) -> Result<Vec<String>, BackendError> {
        self.inner.topics().await
    }
    async fn topic_info(&self, t: &str) -> Result<Option<TopicInfo>, BackendError> {
        self.inner.topic_info(t).await
    }
    async fn dead_letters(
        &self,
        t: &str,
        q: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        self.inner.dead_letters(t, q).await
    }
    async fn dead_letter(
        &self,
        t: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError> {
        self.inner.dead_letter(t, id).await
    }
    async fn replay_dead_letters(
        &self,
        t: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError> {
        self.inner.replay_dead_letters(t, ids).await
    }
    async fn delete_dead_letters(
        &self,
        t: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError> {
        self.inner.delete_dead_letters(t, ids).await
    }
    async fn purge_dead_letters(&self, t: &str, before: Timestamp) -> Result<u64, BackendError> {
        self.inner.purge_dead_letters(t, before).await
    }
    async fn dead_letter_stats(&self, t: &str) -> Result<DeadLetterStats, BackendError> {
        self.inner.dead_letter_stats(t).await
    }
}

/// A broker on a [`Flaky`] backend (its switches), with a consumer "w" of group "g" on topic
/// "t" whose handler counts its runs and succeeds, and one message published to it.
struct Setup {
    broker: Broker,
    consumer: relq::ConsumerHandle,
    refuse_settle: Arc<AtomicBool>,
    fail_next_read: Arc<AtomicBool>,
    runs: Arc<AtomicU32>,
}

async fn setup(panic_settle: bool, refuse_settle: bool) -> Setup {
    let refuse = Arc::new(AtomicBool::new(refuse_settle));
    let fail_read = Arc::new(AtomicBool::new(false));
    let broker = Broker::new(Flaky {
        inner: MemoryBackend::new(),
        refuse_settle: refuse.clone(),
        fail_next_read: fail_read.clone(),
        panic_settle,
        running: Arc::default(),
        concurrency: 16,
        over_fetched: Arc::default(),
    });
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
        refuse_settle: refuse,
        fail_next_read: fail_read,
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
    s.fail_next_read.store(true, Ordering::Relaxed);
    while s.fail_next_read.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The backend comes back: the queued ack is applied.
    s.refuse_settle.store(false, Ordering::Relaxed);
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
    let broker = Broker::new(Flaky {
        inner: MemoryBackend::new(),
        refuse_settle: Arc::default(),
        fail_next_read: Arc::default(),
        panic_settle: false,
        running: running.clone(),
        concurrency: 4,
        over_fetched: over.clone(),
    });
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
