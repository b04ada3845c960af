//! Test utilities (feature `testing`): [`Faulty`], a backend that passes every call to another
//! one except where a test switched a fault on, for testing what the runtime does while a
//! backend refuses calls, fails, or panics.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{
    Backend, BackendMetric, Browse, CleanupReport, Delivery, GroupPlacement, Health, Retention,
    Settlement, Subscription, TopicInfo,
};
use crate::dead_letter::{DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats};
use crate::error::{BackendError, BackendErrorKind};
use crate::model::{Message, MessageId, Outgoing, StartPosition, Timestamp};

type FetchHook = Box<dyn Fn(usize) + Send + Sync>;

/// The switches of a [`Faulty`] backend. Shared: flip them while a consumer runs.
#[derive(Default)]
pub struct Faults {
    refuse_settle: AtomicBool,
    fail_next_read: AtomicBool,
    panic_settle: AtomicBool,
    fail_processed: AtomicBool,
    refuse_publish: Mutex<Option<String>>,
    on_fetch: Mutex<Option<FetchHook>>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("refuse_settle", &self.refuse_settle.load(Ordering::Relaxed))
            .field(
                "fail_next_read",
                &self.fail_next_read.load(Ordering::Relaxed),
            )
            .field("panic_settle", &self.panic_settle.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// While on, `settle` fails as [`BackendErrorKind::Unavailable`] and changes nothing.
    pub fn refuse_settle(&self, on: bool) {
        self.refuse_settle.store(on, Ordering::SeqCst);
    }

    /// While on, `processed` and `record_processed` fail as [`BackendErrorKind::Unavailable`]
    /// and change nothing.
    pub fn fail_processed(&self, on: bool) {
        self.fail_processed.store(on, Ordering::SeqCst);
    }

    /// The next `read` fails as [`BackendErrorKind::Unavailable`] (once).
    pub fn fail_next_read(&self) {
        self.fail_next_read.store(true, Ordering::SeqCst);
    }

    /// Whether a read failure asked for by [`Faults::fail_next_read`] is still to happen.
    pub fn read_failure_pending(&self) -> bool {
        self.fail_next_read.load(Ordering::SeqCst)
    }

    /// While set, `publish` to this topic fails as [`BackendErrorKind::Unavailable`] and
    /// stores nothing (`None`: every publish goes through).
    pub fn refuse_publish(&self, topic: Option<&str>) {
        *self
            .refuse_publish
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = topic.map(str::to_owned);
    }

    /// While on, `settle` panics (a backend bug).
    pub fn panic_settle(&self, on: bool) {
        self.panic_settle.store(on, Ordering::SeqCst);
    }

    /// Calls `hook` with the most messages each `read`, `recover` and `claim` asks for, before
    /// the call reaches the inner backend.
    pub fn on_fetch(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        *self.on_fetch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
    }

    fn fetching(&self, max: usize) {
        if let Some(hook) = &*self.on_fetch.lock().unwrap_or_else(|e| e.into_inner()) {
            hook(max);
        }
    }
}

/// A backend that forwards every call to `inner`, with the faults its [`Faults`] switch on.
#[derive(Debug)]
pub struct Faulty<B> {
    inner: B,
    faults: Arc<Faults>,
}

impl<B: Backend> Faulty<B> {
    /// `inner` with every fault off.
    pub fn new(inner: B) -> Faulty<B> {
        Faulty {
            inner,
            faults: Arc::default(),
        }
    }

    /// The switches.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    fn refused(&self, what: &str) -> BackendError {
        BackendError::new(
            self.inner.name(),
            BackendErrorKind::Unavailable,
            format!("{what} refused by a test fault"),
        )
    }
}

#[async_trait]
impl<B: Backend> Backend for Faulty<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn publish(
        &self,
        topic: &str,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<MessageId>, BackendError> {
        let refused = self
            .faults
            .refuse_publish
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(topic);
        if refused {
            return Err(self.refused("publish"));
        }
        self.inner.publish(topic, batch).await
    }
    async fn join(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        start: StartPosition,
    ) -> Result<Subscription, BackendError> {
        self.inner.join(topic, group, consumer, start).await
    }
    async fn recover(
        &self,
        sub: &Subscription,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.faults.fetching(max);
        self.inner.recover(sub, after, max).await
    }
    async fn claim(
        &self,
        sub: &Subscription,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.faults.fetching(max);
        self.inner.claim(sub, min_idle, max).await
    }
    async fn read(
        &self,
        sub: &Subscription,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BackendError> {
        if self.faults.fail_next_read.swap(false, Ordering::SeqCst) {
            return Err(self.refused("read"));
        }
        self.faults.fetching(max);
        self.inner.read(sub, max, wait).await
    }
    async fn settle(&self, sub: &Subscription, batch: &[Settlement]) -> Result<(), BackendError> {
        assert!(
            !self.faults.panic_settle.load(Ordering::SeqCst),
            "settle panicked (a test fault)"
        );
        if self.faults.refuse_settle.load(Ordering::SeqCst) {
            return Err(self.refused("settle"));
        }
        self.inner.settle(sub, batch).await
    }
    async fn stop_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        self.inner.stop_message(topic, id).await
    }
    async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        self.inner.resume_message(topic, id).await
    }
    async fn terminate(&self, topic: &str) -> Result<bool, BackendError> {
        self.inner.terminate(topic).await
    }
    async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError> {
        self.inner.create_group(topic, group, start).await
    }
    async fn delete_group(&self, topic: &str, group: &str) -> Result<bool, BackendError> {
        self.inner.delete_group(topic, group).await
    }
    async fn move_group(
        &self,
        topic: &str,
        group: &str,
        to: StartPosition,
    ) -> Result<bool, BackendError> {
        self.inner.move_group(topic, group, to).await
    }
    async fn cleanup(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        self.inner.cleanup(topic, retention).await
    }
    async fn browse(
        &self,
        topic: &str,
        query: &Browse,
    ) -> Result<Option<Vec<Message>>, BackendError> {
        self.inner.browse(topic, query).await
    }
    async fn locate(
        &self,
        topic: &str,
        id: MessageId,
    ) -> Result<Option<Vec<GroupPlacement>>, BackendError> {
        self.inner.locate(topic, id).await
    }
    fn metrics(&self) -> Vec<BackendMetric> {
        self.inner.metrics()
    }
    async fn health(&self) -> Health {
        self.inner.health().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    async fn topics(&self) -> Result<Vec<String>, BackendError> {
        self.inner.topics().await
    }
    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BackendError> {
        self.inner.topic_info(topic).await
    }
    async fn dead_letters(
        &self,
        topic: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        self.inner.dead_letters(topic, query).await
    }
    async fn dead_letter(
        &self,
        topic: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError> {
        self.inner.dead_letter(topic, id).await
    }
    async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError> {
        self.inner.replay_dead_letters(topic, ids).await
    }
    async fn delete_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError> {
        self.inner.delete_dead_letters(topic, ids).await
    }
    async fn purge_dead_letters(
        &self,
        topic: &str,
        before: Timestamp,
    ) -> Result<u64, BackendError> {
        self.inner.purge_dead_letters(topic, before).await
    }
    async fn dead_letter_stats(&self, topic: &str) -> Result<DeadLetterStats, BackendError> {
        self.inner.dead_letter_stats(topic).await
    }
    async fn processed(&self, topic: &str, group: &str, key: &str) -> Result<bool, BackendError> {
        if self.faults.fail_processed.load(Ordering::SeqCst) {
            return Err(self.refused("processed"));
        }
        self.inner.processed(topic, group, key).await
    }
    async fn record_processed(
        &self,
        sub: &Subscription,
        key: &str,
        ttl: std::time::Duration,
    ) -> Result<(), BackendError> {
        if self.faults.fail_processed.load(Ordering::SeqCst) {
            return Err(self.refused("record_processed"));
        }
        self.inner.record_processed(sub, key, ttl).await
    }
    async fn take_tokens(
        &self,
        topic: &str,
        group: &str,
        want: u32,
        give_back: u32,
        limit: crate::RateLimit,
    ) -> Result<crate::Grant, BackendError> {
        self.inner
            .take_tokens(topic, group, want, give_back, limit)
            .await
    }
}
