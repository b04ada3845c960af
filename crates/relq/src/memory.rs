//! The in-memory backend: complete and concurrent, **not durable**. Everything is lost when the
//! process exits. Use it for tests and for work that may be lost; use the embedded engine or
//! Redis when a published message must survive a crash.
//!
//! # Data structures
//! One mutex guards a map of topics. A topic is its messages in id order (a deque: ids only grow
//! and messages leave from the front) plus, per group, the cursor, pending (a hash map by id),
//! scheduled and parked entries described in [`relq_core::Backend`]. Readers that
//! find nothing wait on a [`Notify`] woken by publishes, retries and resumes, or until the next
//! scheduled entry is due.
//!
//! # Capacity
//! A topic holds at most `capacity` messages. When a publish does not fit, messages every group
//! has acknowledged are dropped first (they are done); if that frees too little, the publish waits
//! up to `publish_timeout` for space, then fails with a `Full` error. Nothing is dropped silently.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::fast_hash::IdMap;
use relq_core::{
    instant_after, ordering_key, DedupIndex, KeyQueues, Message, MessageId, Outgoing,
    StartPosition, Timestamp,
};
use relq_core::{
    replay_message, AttemptFailure, Backend, Browse, CleanupReport, ConsumerInfo, Delivery,
    GroupInfo, GroupPlacement, Placement, Retention, Settlement, Subscription, TopicInfo,
};
use relq_core::{BackendError, BackendErrorKind, ConfigError, Limit};
use relq_core::{DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats};

const NAME: &str = "memory";

/// Configuration of a [`MemoryBackend`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Most messages one topic holds. Default 1,000,000.
    pub capacity: usize,
    /// How long a publish waits for space when the topic is full. Default 5 s.
    pub publish_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: 1_000_000,
            publish_timeout: Duration::from_secs(5),
        }
    }
}

impl MemoryConfig {
    /// Sets the per-topic capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }
    /// Sets how long a publish waits for space.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }
}

/// The in-memory backend. **Not durable**: everything is lost when the process exits. A topic
/// holds at most `capacity` messages; a publish that does not fit first drops messages every group
/// acknowledged, then waits up to `publish_timeout`, then fails with a `Full` error.
#[derive(Debug)]
pub struct MemoryBackend {
    config: MemoryConfig,
    state: Mutex<State>,
    /// Woken when something may have become deliverable or a topic ended.
    ready: Notify,
    /// Woken when space may have been freed.
    space: Notify,
}

#[derive(Debug, Default)]
struct State {
    topics: HashMap<String, Topic>,
    next_epoch: u64,
    /// The groups' rate limit buckets.
    buckets: relq_core::TokenBuckets,
}

impl State {
    /// The topic, created (as a new generation) if it does not exist.
    fn topic_or_create(&mut self, name: &str) -> &mut Topic {
        let next_epoch = &mut self.next_epoch;
        self.topics.entry(name.to_owned()).or_insert_with(|| {
            *next_epoch += 1;
            Topic {
                epoch: *next_epoch,
                ..Topic::default()
            }
        })
    }
}

/// A topic's messages in id order. Ids only grow and messages leave only from the front
/// (acknowledged, or trimmed), so a deque with binary search does what an ordered map would, with
/// an append and a removal that cost next to nothing.
#[derive(Debug, Default)]
struct Log(std::collections::VecDeque<(MessageId, Stored)>);

impl Log {
    /// Appends `id`, which is above every id in the log.
    fn push(&mut self, id: MessageId, stored: Stored) {
        debug_assert!(self.0.back().is_none_or(|(last, _)| *last < id));
        self.0.push_back((id, stored));
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn first_id(&self) -> Option<MessageId> {
        self.0.front().map(|(id, _)| *id)
    }

    fn pop_first(&mut self) -> Option<(MessageId, Stored)> {
        self.0.pop_front()
    }

    /// The position `id` has, or would have, in the log.
    fn position(&self, id: MessageId, include: bool) -> usize {
        self.0
            .partition_point(|(x, _)| if include { *x < id } else { *x <= id })
    }

    fn get(&self, id: &MessageId) -> Option<&Stored> {
        let i = self.position(*id, true);
        self.0.get(i).filter(|(x, _)| x == id).map(|(_, s)| s)
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = (&MessageId, &Stored)> {
        self.0.iter().map(|(id, s)| (id, s))
    }

    fn range(
        &self,
        range: impl std::ops::RangeBounds<MessageId>,
    ) -> impl DoubleEndedIterator<Item = (&MessageId, &Stored)> {
        use std::ops::Bound;
        let lo = match range.start_bound() {
            Bound::Included(id) => self.position(*id, true),
            Bound::Excluded(id) => self.position(*id, false),
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(id) => self.position(*id, false),
            Bound::Excluded(id) => self.position(*id, true),
            Bound::Unbounded => self.0.len(),
        };
        self.0.range(lo..hi.max(lo)).map(|(id, s)| (id, s))
    }
}

#[derive(Debug)]
struct Stored {
    kind: String,
    payload: bytes::Bytes,
    headers: BTreeMap<String, String>,
    published_at: Timestamp,
    deliver_at: Option<Timestamp>,
}

#[derive(Debug, Default, Clone)]
struct Meta {
    deliveries: u32,
    failures: Vec<AttemptFailure>,
}

#[derive(Debug)]
struct Pending {
    consumer: Arc<str>,
    delivered_at: Timestamp,
    meta: Meta,
}

#[derive(Debug, Default)]
struct Group {
    cursor: MessageId,
    /// Unordered: the paths that need an order (recovery, the floor) sort or scan.
    pending: IdMap<Pending>,
    scheduled: BTreeSet<(Timestamp, MessageId)>,
    scheduled_meta: HashMap<MessageId, (Timestamp, Meta)>,
    parked: BTreeMap<MessageId, Meta>,
    consumers: BTreeMap<String, Timestamp>,
    /// After a move back: the ids the group held (pending, scheduled or parked) between the
    /// new and the old cursor; a read passes over them instead of delivering them twice.
    skip: BTreeSet<MessageId>,
    /// Keys recorded as processed, until their records expire.
    processed: DedupIndex,
    /// Ordering keys of the messages read and not settled; waiting messages are only here.
    keys: KeyQueues<MessageId>,
}

impl Group {
    /// Ends `id`'s place under its ordering key; the key's next message becomes due (at its
    /// delivery time if it is delayed). Returns whether one did.
    fn release_key(&mut self, id: MessageId, messages: &Log, now: Timestamp) -> bool {
        let mut id = id;
        loop {
            let Some(next) = self.keys.release(id) else {
                return false;
            };
            match messages.get(&next) {
                Some(s) => {
                    let due = s.deliver_at.map_or(now, |at| at.max(now));
                    self.schedule(next, due, Meta::default());
                    return true;
                }
                // Trimmed by a max-length policy while it waited: the key passes on.
                None => id = next,
            }
        }
    }

    fn schedule(&mut self, id: MessageId, due: Timestamp, meta: Meta) {
        if let Some((old, _)) = self.scheduled_meta.insert(id, (due, meta)) {
            self.scheduled.remove(&(old, id));
        }
        self.scheduled.insert((due, id));
    }

    fn unschedule(&mut self, id: MessageId) -> Option<Meta> {
        let (due, meta) = self.scheduled_meta.remove(&id)?;
        self.scheduled.remove(&(due, id));
        Some(meta)
    }

    /// The lowest id this group still needs (everything below it is acknowledged).
    fn floor(&self) -> MessageId {
        let mut floor = self.cursor.next_after(0);
        if let Some(id) = self.pending.keys().min() {
            floor = floor.min(*id);
        }
        if let Some(id) = self.scheduled_meta.keys().min() {
            floor = floor.min(*id);
        }
        if let Some((id, _)) = self.parked.first_key_value() {
            floor = floor.min(*id);
        }
        if let Some(id) = self.keys.first_waiting() {
            floor = floor.min(id);
        }
        floor
    }

    /// Whether the group holds `id` already (pending, scheduled or parked).
    fn holds(&self, id: MessageId) -> bool {
        self.pending.contains_key(&id)
            || self.scheduled_meta.contains_key(&id)
            || self.parked.contains_key(&id)
            || self.keys.is_waiting(id)
    }

    /// `id` left the topic (trimmed): the group forgets it, and its key passes on.
    fn forget(&mut self, id: MessageId, messages: &Log, now: Timestamp) {
        self.skip.remove(&id);
        self.pending.remove(&id);
        self.unschedule(id);
        self.parked.remove(&id);
        self.release_key(id, messages, now);
    }
}

#[derive(Debug, Default)]
struct Topic {
    epoch: u64,
    /// Messages appended since the topic was created.
    published: u64,
    messages: Log,
    last_id: MessageId,
    groups: BTreeMap<String, Group>,
    stopped: BTreeSet<MessageId>,
    dead: BTreeMap<DeadLetterId, DeadLetter>,
    last_dead_id: DeadLetterId,
    /// Idempotency keys published within their window.
    dedup: DedupIndex,
}

impl Topic {
    /// How many of `batch` a publish at `now` appends (the rest are duplicates).
    fn appended_by(&self, batch: &[Outgoing], now: Timestamp) -> usize {
        if batch.iter().all(|m| m.dedup().is_none()) {
            return batch.len();
        }
        let mut fresh = std::collections::HashSet::new();
        batch
            .iter()
            .filter(|m| match m.dedup() {
                Some((key, _)) => self.dedup.get(key, now.0).is_none() && fresh.insert(key),
                None => true,
            })
            .count()
    }

    /// Appends `m`, or returns the id of the message its idempotency key already became.
    fn publish(&mut self, m: Outgoing, now: Timestamp) -> MessageId {
        let Some((key, window)) = m.dedup() else {
            return self.append(m, now);
        };
        self.dedup.prune(now.0, |_| {});
        if let Some(id) = self.dedup.get(key, now.0) {
            return id;
        }
        let key = key.to_owned();
        let until = now.plus(window).0;
        let id = self.append(m, now);
        self.dedup.insert(&key, id, until);
        id
    }

    fn append(&mut self, m: Outgoing, now: Timestamp) -> MessageId {
        let id = self.last_id.next_after(now.0);
        self.last_id = id;
        self.published += 1;
        self.messages.push(
            id,
            Stored {
                kind: m.kind,
                payload: m.payload,
                headers: m.headers,
                published_at: now,
                deliver_at: m.deliver_at,
            },
        );
        id
    }

    /// The id below which every group has acknowledged everything; `None` without groups.
    fn acked_floor(&self) -> Option<MessageId> {
        self.groups.values().map(Group::floor).min()
    }

    /// Removes up to `max` messages below the acknowledged floor published at or before `cutoff`.
    fn remove_acked(&mut self, cutoff: Timestamp, max: usize) -> u64 {
        let Some(floor) = self.acked_floor() else {
            return 0;
        };
        // A prefix of the log: the oldest messages.
        let doomed = self
            .messages
            .range(..floor)
            .take_while(|(_, s)| s.published_at <= cutoff)
            .take(max)
            .count();
        for _ in 0..doomed {
            self.messages.pop_first();
        }
        doomed as u64
    }

    /// What a cleanup would remove now (see [`Backend::cleanup`]), changing nothing.
    fn cleanup_preview(&self, retention: &Retention, now: Timestamp) -> CleanupReport {
        let cutoff = now.minus(retention.min_age);
        let floor = self.acked_floor();
        let mut report = CleanupReport::default();
        if let Some(floor) = floor {
            report.removed = self
                .messages
                .range(..floor)
                .take_while(|(_, s)| s.published_at <= cutoff)
                .count() as u64;
        }
        if let Some(max_len) = retention.max_len {
            let left = self.messages.len() as u64 - report.removed;
            let excess = left.saturating_sub(max_len);
            for (id, _) in self
                .messages
                .iter()
                .skip(report.removed as usize)
                .take(excess as usize)
            {
                match floor.is_some_and(|f| *id < f) {
                    true => report.removed += 1,
                    false => report.trimmed_unacknowledged += 1,
                }
            }
        }
        report
    }

    fn take_ready(
        &mut self,
        group: &str,
        consumer: &str,
        max: usize,
        now: Timestamp,
    ) -> Vec<Delivery> {
        let mut out = Vec::new();
        let Some(g) = self.groups.get_mut(group) else {
            return out;
        };
        seen(&mut g.consumers, consumer, now);
        let consumer: Arc<str> = Arc::from(consumer);
        // Due retries and delayed messages first.
        while out.len() < max {
            let Some(&(due, id)) = g.scheduled.first() else {
                break;
            };
            if due > now {
                break;
            }
            let Some(mut meta) = g.unschedule(id) else {
                break;
            };
            if self.stopped.contains(&id) {
                g.parked.insert(id, meta);
                continue;
            }
            meta.deliveries += 1;
            let Some(message) = message_of(&self.messages, id, meta.deliveries) else {
                // Trimmed by a max-length policy.
                g.release_key(id, &self.messages, now);
                continue;
            };
            out.push(Delivery {
                message,
                failures: meta.failures.clone(),
            });
            g.pending.insert(
                id,
                Pending {
                    consumer: consumer.clone(),
                    delivered_at: now,
                    meta,
                },
            );
        }
        // Then new messages after the cursor, in one pass over the log.
        let after = (
            std::ops::Bound::Excluded(g.cursor),
            std::ops::Bound::Unbounded,
        );
        for (&id, stored) in self.messages.range(after) {
            if out.len() >= max {
                break;
            }
            g.cursor = id;
            if g.skip.remove(&id) {
                continue;
            }
            if let Some(key) = ordering_key(&stored.headers) {
                if !g.keys.enter(key, id) {
                    continue; // waits behind an earlier message of its key
                }
            }
            if self.stopped.contains(&id) {
                g.parked.insert(id, Meta::default());
                continue;
            }
            if let Some(at) = stored.deliver_at.filter(|at| *at > now) {
                g.schedule(id, at, Meta::default());
                continue;
            }
            out.push(Delivery {
                message: stored.message(id, 1),
                failures: Vec::new(),
            });
            g.pending.insert(
                id,
                Pending {
                    consumer: consumer.clone(),
                    delivered_at: now,
                    meta: Meta {
                        deliveries: 1,
                        failures: Vec::new(),
                    },
                },
            );
        }
        out
    }

    /// Redelivers pending entries selected by `pick` to `consumer`.
    fn redeliver(
        &mut self,
        group: &str,
        consumer: &str,
        max: usize,
        now: Timestamp,
        pick: impl Fn(MessageId, &Pending) -> bool,
    ) -> Vec<Delivery> {
        let mut out = Vec::new();
        let Some(g) = self.groups.get_mut(group) else {
            return out;
        };
        seen(&mut g.consumers, consumer, now);
        let consumer: Arc<str> = Arc::from(consumer);
        let mut ids: Vec<MessageId> = g
            .pending
            .iter()
            .filter(|(id, p)| pick(**id, p))
            .map(|(id, _)| *id)
            .collect();
        // In id order: recovery pages by the last id it returned.
        ids.sort_unstable();
        for id in ids {
            if out.len() >= max {
                break;
            }
            if self.stopped.contains(&id) {
                if let Some(p) = g.pending.remove(&id) {
                    g.parked.insert(id, p.meta);
                }
                continue;
            }
            let Some(p) = g.pending.get_mut(&id) else {
                continue;
            };
            let Some(message) = message_of(&self.messages, id, p.meta.deliveries + 1) else {
                g.pending.remove(&id);
                g.release_key(id, &self.messages, now);
                continue;
            };
            p.meta.deliveries += 1;
            p.consumer = consumer.clone();
            p.delivered_at = now;
            out.push(Delivery {
                message,
                failures: p.meta.failures.clone(),
            });
        }
        out
    }
}

fn message_of(messages: &Log, id: MessageId, attempt: u32) -> Option<Message> {
    messages.get(&id).map(|s| s.message(id, attempt))
}

impl Stored {
    fn message(&self, id: MessageId, attempt: u32) -> Message {
        let stored = Outgoing {
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            headers: self.headers.clone(),
            deliver_at: self.deliver_at,
            dedup_window: None,
        };
        Message::new(id, stored, self.published_at, attempt)
    }
}

fn terminated(topic: &str) -> BackendError {
    BackendError::new(
        NAME,
        BackendErrorKind::Terminated,
        format!("topic {topic:?} was terminated"),
    )
}

fn group_deleted(topic: &str, group: &str) -> BackendError {
    BackendError::new(
        NAME,
        BackendErrorKind::GroupDeleted,
        format!("group {group:?} of topic {topic:?} was deleted"),
    )
}

/// Where a group's cursor goes for `start`: the id before the first message to read.
fn cursor_for(t: &Topic, start: StartPosition) -> MessageId {
    match start {
        StartPosition::Latest => t.last_id,
        StartPosition::Earliest => MessageId::ZERO,
        StartPosition::From(id) => before(id),
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

impl MemoryBackend {
    /// A backend with the default configuration.
    pub fn new() -> MemoryBackend {
        MemoryBackend::with_config(MemoryConfig::default()).expect("default config is valid")
    }

    /// A backend with `config`.
    ///
    /// # Errors
    /// A zero capacity.
    pub fn with_config(config: MemoryConfig) -> Result<MemoryBackend, ConfigError> {
        if config.capacity == 0 {
            return Err(ConfigError::new("capacity", "must be at least 1"));
        }
        Ok(MemoryBackend {
            config,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            space: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way later
        // operations misread: every mutation is a single map operation or ends with one.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_topic<T>(
        &self,
        sub: &Subscription,
        f: impl FnOnce(&mut Topic) -> T,
    ) -> Result<T, BackendError> {
        let mut state = self.lock();
        match state.topics.get_mut(&sub.topic) {
            Some(t) if t.epoch == sub.epoch && t.groups.contains_key(&sub.group) => Ok(f(t)),
            Some(t) if t.epoch == sub.epoch => Err(group_deleted(&sub.topic, &sub.group)),
            _ => Err(terminated(&sub.topic)),
        }
    }

    /// One bounded cleanup step under the lock; returns how many messages it removed.
    fn cleanup_step(
        &self,
        topic: &str,
        retention: &Retention,
        batch: usize,
        report: &mut CleanupReport,
    ) -> u64 {
        let mut state = self.lock();
        let Some(t) = state.topics.get_mut(topic) else {
            return 0;
        };
        let cutoff = Timestamp::now().minus(retention.min_age);
        let removed = t.remove_acked(cutoff, batch);
        report.removed += removed;
        let mut trimmed = 0;
        if let Some(max_len) = retention.max_len {
            let floor = t.acked_floor().unwrap_or(MessageId::ZERO);
            while (t.messages.len() as u64) > max_len && trimmed < batch as u64 {
                let Some((id, _)) = t.messages.pop_first() else {
                    break;
                };
                trimmed += 1;
                if id >= floor {
                    report.trimmed_unacknowledged += 1;
                } else {
                    report.removed += 1;
                }
                let now = Timestamp::now();
                for g in t.groups.values_mut() {
                    g.forget(id, &t.messages, now);
                }
            }
        }
        removed + trimmed
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(
        &self,
        topic: &str,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<MessageId>, BackendError> {
        if batch.len() > self.config.capacity {
            return Err(BackendError::new(
                NAME,
                BackendErrorKind::Invalid,
                format!(
                    "a batch of {} messages exceeds the topic capacity of {}",
                    batch.len(),
                    self.config.capacity
                ),
            ));
        }
        let deadline = instant_after(tokio::time::Instant::now(), self.config.publish_timeout);
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut state = self.lock();
                let topic_state = state.topic_or_create(topic);
                let now = Timestamp::now();
                // Duplicates of stored keys take no room (a retried publish on a full topic
                // gets its first id).
                let needed = topic_state.appended_by(&batch, now);
                let free =
                    self.config.capacity - topic_state.messages.len().min(self.config.capacity);
                if free < needed {
                    topic_state.remove_acked(now, needed - free);
                }
                if topic_state.messages.len() + needed <= self.config.capacity {
                    let ids = batch
                        .into_iter()
                        .map(|m| topic_state.publish(m, now))
                        .collect();
                    self.ready.notify_waiters();
                    return Ok(ids);
                }
            }
            if tokio::time::timeout_at(deadline, space).await.is_err() {
                return Err(BackendError::full(
                    NAME,
                    Limit::Capacity,
                    format!(
                        "it holds its capacity of {} messages and no space was freed within {:?}",
                        self.config.capacity, self.config.publish_timeout
                    ),
                ));
            }
        }
    }

    async fn join(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        start: StartPosition,
    ) -> Result<Subscription, BackendError> {
        let mut state = self.lock();
        let t = state.topic_or_create(topic);
        let cursor = cursor_for(t, start);
        let g = t.groups.entry(group.to_owned()).or_insert_with(|| Group {
            cursor,
            ..Group::default()
        });
        g.consumers.insert(consumer.to_owned(), Timestamp::now());
        Ok(Subscription {
            topic: topic.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            epoch: t.epoch,
        })
    }

    async fn recover(
        &self,
        sub: &Subscription,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        let now = Timestamp::now();
        self.with_topic(sub, |t| {
            t.redeliver(&sub.group, &sub.consumer, max, now, |id, p| {
                id > after && *p.consumer == *sub.consumer
            })
        })
    }

    async fn claim(
        &self,
        sub: &Subscription,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        let now = Timestamp::now();
        self.with_topic(sub, |t| {
            t.redeliver(&sub.group, &sub.consumer, max, now, |_, p| {
                now.since(p.delivered_at) >= min_idle
            })
        })
    }

    async fn read(
        &self,
        sub: &Subscription,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BackendError> {
        let deadline = instant_after(tokio::time::Instant::now(), wait);
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let now = Timestamp::now();
            let (out, next_due) = self.with_topic(sub, |t| {
                let out = t.take_ready(&sub.group, &sub.consumer, max, now);
                let next_due = t
                    .groups
                    .get(&sub.group)
                    .and_then(|g| g.scheduled.first().map(|(d, _)| *d));
                (out, next_due)
            })?;
            let now_instant = tokio::time::Instant::now();
            if !out.is_empty() || now_instant >= deadline {
                return Ok(out);
            }
            let mut wake = deadline;
            if let Some(due) = next_due {
                wake = wake.min(now_instant + due.since(now).max(Duration::from_millis(1)));
            }
            let _ = tokio::time::timeout_at(wake, ready).await;
        }
    }

    async fn settle(&self, sub: &Subscription, batch: &[Settlement]) -> Result<(), BackendError> {
        let mut retried = false;
        let now = Timestamp::now();
        self.with_topic(sub, |t| {
            let Topic {
                groups,
                dead,
                last_dead_id,
                messages,
                ..
            } = t;
            let Some(g) = groups.get_mut(&sub.group) else {
                return;
            };
            for s in batch {
                match s {
                    Settlement::Ack(id) => {
                        if g.pending.remove(id).is_some() {
                            retried |= g.release_key(*id, messages, now);
                        }
                    }
                    Settlement::Retry {
                        id,
                        at,
                        failure,
                        release_key,
                    } => {
                        if g.pending
                            .get(id)
                            .is_some_and(|p| current(p, &sub.consumer, failure.attempt))
                        {
                            let mut p = g.pending.remove(id).expect("pending");
                            p.meta.failures.push(failure.clone());
                            g.schedule(*id, *at, p.meta);
                            if *release_key {
                                g.release_key(*id, messages, now);
                            }
                            retried = true;
                        }
                    }
                    Settlement::DeadLetter(dl) => {
                        if g.pending
                            .get(&dl.message.id)
                            .is_some_and(|p| current(p, &sub.consumer, dl.message.attempt))
                        {
                            g.pending.remove(&dl.message.id);
                            retried |= g.release_key(dl.message.id, messages, now);
                            let id = last_dead_id.next_after(Timestamp::now().0);
                            *last_dead_id = id;
                            let mut dl = (**dl).clone();
                            dl.id = id;
                            dead.insert(id, dl);
                        }
                    }
                }
            }
        })?;
        if retried {
            self.ready.notify_waiters();
        }
        self.space.notify_waiters();
        Ok(())
    }

    async fn stop_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let mut state = self.lock();
        let Some(t) = state.topics.get_mut(topic) else {
            return Ok(false);
        };
        t.stopped.insert(id);
        // Entries already waiting for a retry are parked now rather than at their due time.
        for g in t.groups.values_mut() {
            if let Some(meta) = g.unschedule(id) {
                g.parked.insert(id, meta);
            }
        }
        Ok(true)
    }

    async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let was_stopped = {
            let mut state = self.lock();
            let Some(t) = state.topics.get_mut(topic) else {
                return Ok(false);
            };
            let was = t.stopped.remove(&id);
            let now = Timestamp::now();
            for g in t.groups.values_mut() {
                if let Some(meta) = g.parked.remove(&id) {
                    g.schedule(id, now, meta);
                }
            }
            was
        };
        self.ready.notify_waiters();
        Ok(was_stopped)
    }

    async fn terminate(&self, topic: &str) -> Result<bool, BackendError> {
        let existed = {
            let mut state = self.lock();
            state.buckets.forget_topic(topic);
            state.topics.remove(topic).is_some()
        };
        self.ready.notify_waiters();
        self.space.notify_waiters();
        Ok(existed)
    }

    async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError> {
        let mut state = self.lock();
        let t = state.topic_or_create(topic);
        if t.groups.contains_key(group) {
            return Ok(false);
        }
        let cursor = cursor_for(t, start);
        t.groups.insert(
            group.to_owned(),
            Group {
                cursor,
                ..Group::default()
            },
        );
        Ok(true)
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<bool, BackendError> {
        let existed = {
            let mut state = self.lock();
            state.buckets.forget_group(topic, group);
            state
                .topics
                .get_mut(topic)
                .is_some_and(|t| t.groups.remove(group).is_some())
        };
        self.ready.notify_waiters();
        self.space.notify_waiters();
        Ok(existed)
    }

    async fn move_group(
        &self,
        topic: &str,
        group: &str,
        to: StartPosition,
    ) -> Result<bool, BackendError> {
        let mut state = self.lock();
        let Some(t) = state.topics.get_mut(topic) else {
            return Ok(false);
        };
        let cursor = cursor_for(t, to);
        let Some(g) = t.groups.get_mut(group) else {
            return Ok(false);
        };
        if cursor < g.cursor {
            let held: Vec<MessageId> = t
                .messages
                .range((
                    std::ops::Bound::Excluded(cursor),
                    std::ops::Bound::Included(g.cursor),
                ))
                .map(|(id, _)| *id)
                .filter(|id| g.holds(*id))
                .collect();
            g.skip.extend(held);
        } else {
            g.skip = g.skip.split_off(&cursor.next_after(0));
        }
        g.cursor = cursor;
        drop(state);
        self.ready.notify_waiters();
        self.space.notify_waiters();
        Ok(true)
    }

    async fn cleanup(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        if retention.dry_run {
            let state = self.lock();
            return Ok(state
                .topics
                .get(topic)
                .map(|t| t.cleanup_preview(retention, Timestamp::now()))
                .unwrap_or_default());
        }
        let mut report = CleanupReport::default();
        let batch = retention.batch.max(1);
        loop {
            let step = self.cleanup_step(topic, retention, batch, &mut report);
            if step == 0 {
                break;
            }
            self.space.notify_waiters();
            tokio::task::yield_now().await;
        }
        Ok(report)
    }

    async fn topics(&self) -> Result<Vec<String>, BackendError> {
        let mut names: Vec<String> = self.lock().topics.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BackendError> {
        let state = self.lock();
        let Some(t) = state.topics.get(topic) else {
            return Ok(None);
        };
        let now = Timestamp::now();
        let groups = t
            .groups
            .iter()
            .map(|(name, g)| {
                let consumers = g
                    .consumers
                    .iter()
                    .map(|(c, seen)| ConsumerInfo {
                        name: c.clone(),
                        pending: g.pending.values().filter(|p| *p.consumer == **c).count() as u64,
                        idle_ms: now.since(*seen).as_millis() as u64,
                    })
                    .collect();
                GroupInfo {
                    name: name.clone(),
                    cursor: g.cursor,
                    pending: g.pending.len() as u64,
                    lag: t
                        .messages
                        .range((
                            std::ops::Bound::Excluded(g.cursor),
                            std::ops::Bound::Unbounded,
                        ))
                        .count() as u64,
                    scheduled: g.scheduled.len() as u64,
                    parked: g.parked.len() as u64,
                    blocked: g.keys.waiting() as u64,
                    consumers,
                    oldest_pending: g.pending.keys().min().copied(),
                    oldest_unread: t
                        .messages
                        .range((
                            std::ops::Bound::Excluded(g.cursor),
                            std::ops::Bound::Unbounded,
                        ))
                        .next()
                        .map(|(id, _)| *id),
                }
            })
            .collect();
        Ok(Some(TopicInfo {
            name: topic.to_owned(),
            length: t.messages.len() as u64,
            first_id: t.messages.first_id(),
            last_id: (t.last_id != MessageId::ZERO).then_some(t.last_id),
            groups,
            stopped: t.stopped.iter().copied().collect(),
            dead_letters: t.dead.len() as u64,
            published: t.published,
        }))
    }

    async fn locate(
        &self,
        topic: &str,
        id: MessageId,
    ) -> Result<Option<Vec<GroupPlacement>>, BackendError> {
        let state = self.lock();
        let Some(t) = state.topics.get(topic) else {
            return Ok(None);
        };
        Ok(Some(
            t.groups
                .iter()
                .map(|(name, g)| {
                    let placement = if let Some(p) = g.pending.get(&id) {
                        Placement::Pending {
                            consumer: p.consumer.to_string(),
                            deliveries: p.meta.deliveries,
                        }
                    } else if let Some((due, meta)) = g.scheduled_meta.get(&id) {
                        Placement::Scheduled {
                            due: *due,
                            deliveries: meta.deliveries,
                        }
                    } else if g.parked.contains_key(&id) {
                        Placement::Stopped
                    } else if g.keys.is_waiting(id) {
                        Placement::Blocked
                    } else if id > g.cursor {
                        Placement::Unread
                    } else {
                        Placement::Done
                    };
                    GroupPlacement::new(name.clone(), placement)
                })
                .collect(),
        ))
    }

    async fn browse(
        &self,
        topic: &str,
        query: &Browse,
    ) -> Result<Option<Vec<Message>>, BackendError> {
        let state = self.lock();
        let Some(t) = state.topics.get(topic) else {
            return Ok(None);
        };
        let lo = query
            .after
            .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let hi = query
            .before
            .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        if query.after.is_some() && query.before.is_some() && query.after >= query.before {
            return Ok(Some(Vec::new()));
        }
        let range = t.messages.range((lo, hi)).map(|(id, _)| *id);
        let ids: Vec<MessageId> = if query.newest_first {
            range.rev().take(query.page_size()).collect()
        } else {
            range.take(query.page_size()).collect()
        };
        Ok(Some(
            ids.into_iter()
                .filter_map(|id| message_of(&t.messages, id, 0))
                .collect(),
        ))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let state = self.lock();
        let Some(t) = state.topics.get(topic) else {
            return Ok(Vec::new());
        };
        let start = match query.after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        Ok(t.dead
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, d)| d)
            .filter(|d| query.matches(d))
            .take(query.page_size())
            .cloned()
            .collect())
    }

    async fn dead_letter(
        &self,
        topic: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError> {
        Ok(self
            .lock()
            .topics
            .get(topic)
            .and_then(|t| t.dead.get(&id).cloned()))
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError> {
        let mut out = Vec::new();
        {
            let mut state = self.lock();
            let Some(t) = state.topics.get_mut(topic) else {
                return Ok(out);
            };
            let now = Timestamp::now();
            for id in ids {
                let Some(dl) = t.dead.remove(id) else {
                    continue;
                };
                let new_id = t.append(replay_message(&dl), now);
                out.push((*id, new_id));
            }
        }
        self.ready.notify_waiters();
        Ok(out)
    }

    async fn delete_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError> {
        let mut state = self.lock();
        let Some(t) = state.topics.get_mut(topic) else {
            return Ok(0);
        };
        Ok(ids.iter().filter(|id| t.dead.remove(id).is_some()).count() as u64)
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        before: Timestamp,
    ) -> Result<u64, BackendError> {
        let mut state = self.lock();
        let Some(t) = state.topics.get_mut(topic) else {
            return Ok(0);
        };
        let n = t.dead.len();
        t.dead.retain(|_, d| d.last_failed_at >= before);
        Ok((n - t.dead.len()) as u64)
    }

    async fn dead_letter_stats(&self, topic: &str) -> Result<DeadLetterStats, BackendError> {
        let mut stats = DeadLetterStats::default();
        if let Some(t) = self.lock().topics.get(topic) {
            t.dead.values().for_each(|d| stats.add(d));
        }
        Ok(stats)
    }

    async fn processed(&self, topic: &str, group: &str, key: &str) -> Result<bool, BackendError> {
        let now = Timestamp::now().0;
        Ok(self
            .lock()
            .topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .is_some_and(|g| g.processed.get(key, now).is_some()))
    }

    async fn record_processed(
        &self,
        sub: &Subscription,
        key: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let now = Timestamp::now();
        let mut state = self.lock();
        if let Some(g) = state
            .topics
            .get_mut(&sub.topic)
            .filter(|t| t.epoch == sub.epoch)
            .and_then(|t| t.groups.get_mut(&sub.group))
        {
            g.processed.prune(now.0, |_| {});
            let until = now.plus(ttl.min(relq_core::MAX_DEDUP_WINDOW)).0;
            g.processed.insert(key, MessageId::ZERO, until);
        }
        Ok(())
    }

    async fn take_tokens(
        &self,
        topic: &str,
        group: &str,
        want: u32,
        give_back: u32,
        limit: relq_core::RateLimit,
    ) -> Result<relq_core::Grant, BackendError> {
        Ok(self
            .lock()
            .buckets
            .take_now(topic, group, want, give_back, limit))
    }
}

/// Whether a retry or dead letter for delivery `attempt`, settled by `consumer`, still applies
/// to pending entry `p`: it is that delivery, or the settling consumer still holds the message
/// (it recovered it meanwhile). Claimed by another consumer since: stale.
fn current(p: &Pending, consumer: &str, attempt: u32) -> bool {
    p.meta.deliveries == attempt || *p.consumer == *consumer
}

/// The cursor that makes `id` the next id read.
fn before(id: MessageId) -> MessageId {
    if id.seq > 0 {
        MessageId::new(id.ms, id.seq - 1)
    } else if id.ms > 0 {
        MessageId::new(id.ms - 1, u64::MAX)
    } else {
        MessageId::ZERO
    }
}

/// Records that `consumer` was seen at `now` (allocating its name only the first time).
fn seen(consumers: &mut BTreeMap<String, Timestamp>, consumer: &str, now: Timestamp) {
    match consumers.get_mut(consumer) {
        Some(t) => *t = now,
        None => {
            consumers.insert(consumer.to_owned(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Broker, Error, NewMessage};

    #[test]
    fn the_log_finds_ids_and_ranges_like_an_ordered_map() {
        let mut log = Log::default();
        let mut map = BTreeMap::new();
        // Gaps between the ids, so bounds fall both on ids and between them.
        for i in 0..20u64 {
            let id = MessageId::new(10 + i * 3, i % 2);
            let stored = || Stored {
                kind: "job".into(),
                payload: bytes::Bytes::new(),
                headers: BTreeMap::new(),
                published_at: Timestamp(0),
                deliver_at: None,
            };
            log.push(id, stored());
            map.insert(id, ());
        }
        for _ in 0..3 {
            let (id, _) = log.pop_first().expect("not empty");
            map.remove(&id);
        }
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let probes: Vec<MessageId> = (0..80u64)
            .flat_map(|ms| [MessageId::new(ms, 0), MessageId::new(ms, 1)])
            .collect();
        for a in &probes {
            assert_eq!(log.get(a).is_some(), map.contains_key(a), "get {a}");
            for b in &probes {
                for bounds in [
                    (Included(*a), Included(*b)),
                    (Included(*a), Excluded(*b)),
                    (Excluded(*a), Included(*b)),
                    (Excluded(*a), Excluded(*b)),
                    (Unbounded, Excluded(*b)),
                    (Excluded(*a), Unbounded),
                ] {
                    // An ordered map panics on a range that ends before it starts; the log
                    // gives an empty one.
                    let expected: Vec<MessageId> = match (bounds.0, bounds.1) {
                        (Included(x) | Excluded(x), Included(y) | Excluded(y)) if x > y => {
                            Vec::new()
                        }
                        (Excluded(x), Excluded(y)) if x == y => Vec::new(),
                        _ => map.range(bounds).map(|(id, _)| *id).collect(),
                    };
                    let got: Vec<MessageId> = log.range(bounds).map(|(id, _)| *id).collect();
                    assert_eq!(got, expected, "{bounds:?}");
                }
            }
        }
        assert_eq!(log.first_id(), map.keys().next().copied());
        assert_eq!(log.len(), map.len());
    }

    fn msg() -> Outgoing {
        Outgoing {
            kind: "job".into(),
            payload: bytes::Bytes::from_static(b"x"),
            headers: BTreeMap::new(),
            deliver_at: None,
            dedup_window: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_topic_makes_publish_wait_then_fail_without_dropping() {
        let b = MemoryBackend::with_config(
            MemoryConfig::default()
                .capacity(3)
                .publish_timeout(Duration::from_secs(1)),
        )
        .unwrap();
        b.publish("t", vec![msg(), msg(), msg()]).await.unwrap();
        let started = tokio::time::Instant::now();
        let e = b.publish("t", vec![msg()]).await.unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Full);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "waited the publish timeout"
        );
        assert_eq!(
            b.topic_info("t").await.unwrap().unwrap().length,
            3,
            "nothing dropped"
        );
        let broker = Broker::new(b);
        assert!(matches!(
            broker.publish("t", NewMessage::new("job", "y")).await,
            Err(Error::Full {
                limit: Some(crate::Limit::Capacity),
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_publish_completes_once_messages_are_acknowledged() {
        let b = std::sync::Arc::new(
            MemoryBackend::with_config(
                MemoryConfig::default()
                    .capacity(2)
                    .publish_timeout(Duration::from_secs(60)),
            )
            .unwrap(),
        );
        let sub = b
            .join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        b.publish("t", vec![msg(), msg()]).await.unwrap();
        let got = b.read(&sub, 10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 2);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.publish("t", vec![msg()]).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !waiting.is_finished(),
            "no space until the group acknowledges"
        );
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        b.settle(&sub, &acks).await.unwrap();
        waiting.await.unwrap().unwrap();
        // One acknowledged message made room (only as much as needed is reclaimed).
        assert_eq!(b.topic_info("t").await.unwrap().unwrap().length, 2);
        let e = b.publish("t", vec![msg(), msg()]).await;
        assert!(
            e.is_err(),
            "one unacknowledged message plus two does not fit"
        );
        // The acknowledged one was reclaimed; the unacknowledged one is never dropped for space.
        let info = b.topic_info("t").await.unwrap().unwrap();
        assert_eq!((info.length, info.groups[0].lag), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_cleanup_removes_acknowledged_messages_only() {
        let broker = Broker::memory();
        let sub = broker
            .backend()
            .join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        for i in 0..5 {
            broker
                .publish("t", NewMessage::new("job", format!("{i}")))
                .await
                .unwrap();
        }
        let got = broker
            .backend()
            .read(&sub, 3, Duration::ZERO)
            .await
            .unwrap();
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        broker.backend().settle(&sub, &acks).await.unwrap();
        let task = broker.spawn_cleanup(
            "t",
            Retention::default().min_age(Duration::from_secs(10)),
            Duration::from_secs(1),
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            broker.topic_info("t").await.unwrap().length,
            5,
            "younger than min_age"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            broker.topic_info("t").await.unwrap().length,
            2,
            "the 3 acknowledged ones are gone"
        );
        drop(task);
    }

    #[test]
    fn zero_capacity_is_a_config_error() {
        assert!(MemoryBackend::with_config(MemoryConfig::default().capacity(0)).is_err());
    }

    #[test]
    fn from_id_start_position_cursor() {
        assert_eq!(before(MessageId::new(5, 2)), MessageId::new(5, 1));
        assert_eq!(before(MessageId::new(5, 0)), MessageId::new(4, u64::MAX));
        assert_eq!(before(MessageId::ZERO), MessageId::ZERO);
    }
}
