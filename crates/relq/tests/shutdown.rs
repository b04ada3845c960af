//! The runtime while the backend refuses calls: shutdown keeps its deadline even when the backend
//! refuses settlements (the messages stay pending and are delivered again), and a message whose
//! ack is still queued when the consumer recovers its pending messages after an outage is not
//! run a second time; a settler that panics stops the consumer.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use relq::{
    Backend, BackendError, BackendErrorKind, Broker, CleanupReport, DeadLetter, DeadLetterId,
    DeadLetterQuery, DeadLetterStats, Delivery, MemoryBackend, Message, MessageId, NewMessage,
    Outgoing, Retention, Settlement, StartPosition, Subscription, Timestamp, TopicInfo,
};

/// The in-memory backend, whose `settle` can be switched to fail as unavailable, and whose next
/// `read` can be made to fail once.
struct Flaky {
    inner: MemoryBackend,
    refuse_settle: Arc<AtomicBool>,
    fail_next_read: Arc<AtomicBool>,
    /// `settle` panics (a backend bug).
    panic_settle: bool,
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
        self.inner.recover(s, a, m).await
    }
    async fn claim(
        &self,
        s: &Subscription,
        i: Duration,
        m: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
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
    async fn cleanup(&self, t: &str, r: &Retention) -> Result<CleanupReport, BackendError> {
        self.inner.cleanup(t, r).await
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
