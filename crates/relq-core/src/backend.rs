//! The backend trait: what a storage system must do for relq to run on it.
//!
//! Every operation is semantic (publish, read, settle a batch, park a stopped message, ...), not a
//! storage primitive, so each backend can map it onto its own atomic unit: one lock section for
//! the in-memory backend, one commit cycle for the embedded engine, one Lua script or pipeline for
//! Redis Streams. `docs/design.md` holds the mapping table.
//!
//! # Per-group state a backend keeps
//! For every (topic, group): a cursor (the last id read), pending entries (id, owner, delivery
//! count, last delivery time, failure history), scheduled entries (id, due time, delivery count,
//! failure history: retries and delayed messages) and parked entries (stopped messages). A message
//! counts as acknowledged by a group when its id is at or below the cursor and it is in none of
//! those sets.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::rate::{Grant, RateLimit};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::dead_letter::{DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats};
use crate::error::BackendError;
use crate::failure::AttemptFailure;
use crate::model::{Message, MessageId, Outgoing, StartPosition, Timestamp};

/// A consumer's membership in a group, returned by [`Backend::join`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
    /// The consumer.
    pub consumer: String,
    /// The topic's generation when the consumer joined. A terminate ends the generation: every
    /// later call with this subscription fails with [`BackendErrorKind::Terminated`](crate::BackendErrorKind),
    /// even if the topic was created again meanwhile.
    pub epoch: u64,
}

/// A delivered message with the failures of its earlier attempts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The message; `message.attempt` is the delivery count including this one.
    pub message: Message,
    /// Failures of earlier attempts, oldest first.
    pub failures: Vec<AttemptFailure>,
}

impl Delivery {
    /// A delivery of `message` after the earlier attempts' `failures` (oldest first).
    pub fn new(message: Message, failures: Vec<AttemptFailure>) -> Delivery {
        Delivery { message, failures }
    }
}

/// How a delivered message ends this delivery. Applied by [`Backend::settle`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Settlement {
    /// Processed: remove from pending.
    Ack(MessageId),
    /// Failed, to be delivered again at `at`: move from pending to scheduled, keeping the delivery
    /// count and appending `failure` to the history.
    Retry {
        /// The message.
        id: MessageId,
        /// When to deliver it again.
        at: Timestamp,
        /// The failure of this attempt.
        failure: AttemptFailure,
        /// For a message with an ordering key: let the key's next message go ahead while this
        /// one waits for its retry (it then runs outside the key's order). Otherwise (the
        /// default) the message keeps its key, and the later messages of the key wait behind
        /// it until it succeeds or becomes a dead letter.
        #[serde(default)]
        release_key: bool,
    },
    /// Given up: remove from pending and store the dead letter, in one atomic step.
    DeadLetter(Box<DeadLetter>),
}

impl Settlement {
    /// The message this settles.
    pub fn id(&self) -> MessageId {
        match self {
            Settlement::Ack(id) | Settlement::Retry { id, .. } => *id,
            Settlement::DeadLetter(d) => d.message.id,
        }
    }
}

/// Retention policy for [`Backend::cleanup`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Retention {
    /// Messages younger than this are kept even when every group acknowledged them.
    pub min_age: Duration,
    /// When set, the topic is trimmed to at most this many messages, oldest first, even if some
    /// group has not acknowledged them. Unset by default: cleanup then never removes a message a
    /// group still needs.
    pub max_len: Option<u64>,
    /// Messages removed per step, so one cleanup does not stall the backend.
    pub batch: usize,
    /// Only count what a cleanup would remove; remove nothing.
    #[serde(default)]
    pub dry_run: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            min_age: Duration::from_secs(3600),
            max_len: None,
            batch: 1000,
            dry_run: false,
        }
    }
}

impl Retention {
    /// Keeps acknowledged messages for at least `min_age`.
    pub fn min_age(mut self, min_age: Duration) -> Self {
        self.min_age = min_age;
        self
    }
    /// Trims the topic to `max_len` messages even when unacknowledged.
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.max_len = Some(max_len);
        self
    }
    /// Only counts what would be removed (the report of a real cleanup run now); removes
    /// nothing.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
    /// Removes at most `batch` messages per step (at least 1).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }
}

/// What a cleanup removed (or, for a dry run, would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupReport {
    /// Messages removed because every group had acknowledged them.
    pub removed: u64,
    /// Messages removed by the max-length policy although some group had not acknowledged them.
    pub trimmed_unacknowledged: u64,
}

/// Which stored messages [`Backend::browse`] returns: a page of a topic's messages read without
/// a group (nothing is delivered or changed), in id order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Browse {
    /// Only ids greater than this.
    pub after: Option<MessageId>,
    /// Only ids smaller than this.
    pub before: Option<MessageId>,
    /// Page size; 0 means 100, and at most [`Browse::MAX_LIMIT`].
    pub limit: usize,
    /// Newest first (down from `before`) instead of oldest first (up from `after`).
    pub newest_first: bool,
}

impl Browse {
    /// The largest page.
    pub const MAX_LIMIT: usize = 1000;

    /// The oldest messages first.
    pub fn oldest() -> Browse {
        Browse::default()
    }
    /// The newest messages first.
    pub fn newest() -> Browse {
        Browse {
            newest_first: true,
            ..Browse::default()
        }
    }
    /// Only ids greater than `id`.
    pub fn after(mut self, id: MessageId) -> Browse {
        self.after = Some(id);
        self
    }
    /// Only ids smaller than `id`.
    pub fn before(mut self, id: MessageId) -> Browse {
        self.before = Some(id);
        self
    }
    /// Sets the page size.
    pub fn limit(mut self, limit: usize) -> Browse {
        self.limit = limit;
        self
    }
    /// The page size to use: `limit`, 100 when 0, capped at [`Browse::MAX_LIMIT`].
    pub fn page_size(&self) -> usize {
        match self.limit {
            0 => 100,
            n => n.min(Self::MAX_LIMIT),
        }
    }
    /// Whether `id` is inside the bounds.
    pub fn contains(&self, id: MessageId) -> bool {
        self.after.is_none_or(|a| id > a) && self.before.is_none_or(|b| id < b)
    }
}

/// Where a message stands in one group, from [`Backend::locate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Placement {
    /// The group has not read it yet.
    Unread,
    /// Delivered and not settled.
    Pending {
        /// The consumer holding it.
        consumer: String,
        /// Deliveries so far, this one included.
        deliveries: u32,
    },
    /// Waiting for its time: a retry, or a delayed message.
    Scheduled {
        /// When it is delivered again.
        due: Timestamp,
        /// Deliveries so far.
        deliveries: u32,
    },
    /// Held back by a stop until it is resumed.
    Stopped,
    /// Waiting behind an earlier message of its ordering key, which is delivered, waiting for a
    /// retry, or stopped.
    Blocked,
    /// Settled: acknowledged, or given up on (then it is among the dead letters).
    Done,
}

/// A message's [`Placement`] in one group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlacement {
    /// The group.
    pub group: String,
    /// Where the message stands in it.
    pub placement: Placement,
}

impl GroupPlacement {
    /// `placement` in `group`.
    pub fn new(group: impl Into<String>, placement: Placement) -> GroupPlacement {
        GroupPlacement {
            group: group.into(),
            placement,
        }
    }
}

/// One of a backend's own counters (they only grow), exported by the metrics endpoint
/// (`relq_engine_*` for the embedded engine, `relq_redis_*` for Redis).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendMetric {
    /// The metric's name (Prometheus conventions: `relq_` prefix, `_total` for counters).
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    /// Its value.
    pub value: f64,
}

impl BackendMetric {
    /// A counter.
    pub fn counter(name: &'static str, help: &'static str, value: f64) -> BackendMetric {
        BackendMetric { name, help, value }
    }
}

/// One check of a backend's [`Health`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What was checked (`backend`, `engine`, `disk`, `eviction_policy`, ...).
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, for a human.
    pub detail: String,
}

impl HealthCheck {
    /// A check result.
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> HealthCheck {
        HealthCheck {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

/// Whether a backend can do its work now: reachable, not poisoned, with room (seed 003's
/// `Health()`), from [`Backend::health`] or `relq::Broker::health`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The backend's name.
    pub backend: String,
    /// Every check made.
    pub checks: Vec<HealthCheck>,
    /// How full a bounded backend is, 0 to 1 (the disk under the embedded engine's directory,
    /// Redis `used_memory / maxmemory`), when known.
    pub usage_ratio: Option<f64>,
}

impl Health {
    /// A report of `checks`.
    pub fn new(backend: impl Into<String>, checks: Vec<HealthCheck>) -> Health {
        Health {
            backend: backend.into(),
            checks,
            usage_ratio: None,
        }
    }

    /// Whether every check passed.
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// One consumer of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// Messages it holds (delivered, not settled).
    pub pending: u64,
    /// Time since it last received a delivery.
    pub idle_ms: u64,
}

/// One group of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Its name.
    pub name: String,
    /// The last id read.
    pub cursor: MessageId,
    /// Messages delivered and not settled.
    pub pending: u64,
    /// Messages not yet read by the group.
    pub lag: u64,
    /// Retries and delayed messages waiting for their time.
    pub scheduled: u64,
    /// Stopped messages held back.
    pub parked: u64,
    /// Messages waiting behind an earlier message of their ordering key (delivered, waiting
    /// for a retry, or stopped).
    #[serde(default)]
    pub blocked: u64,
    /// Its consumers.
    pub consumers: Vec<ConsumerInfo>,
    /// The smallest id delivered and not settled (its `ms` is when it was published).
    pub oldest_pending: Option<MessageId>,
    /// The first id the group has not read yet, when there is one.
    pub oldest_unread: Option<MessageId>,
}

/// A topic's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    /// Its name.
    pub name: String,
    /// Messages stored.
    pub length: u64,
    /// The oldest stored id.
    pub first_id: Option<MessageId>,
    /// The newest id assigned.
    pub last_id: Option<MessageId>,
    /// Its groups.
    pub groups: Vec<GroupInfo>,
    /// Ids stopped with [`Backend::stop_message`].
    pub stopped: Vec<MessageId>,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Messages published since the topic was created: a counter (retention does not lower
    /// it), so its rate is the publish rate.
    #[serde(default)]
    pub published: u64,
}

impl TopicInfo {
    /// An empty topic named `name`; a backend fills in the rest.
    pub fn new(name: impl Into<String>) -> TopicInfo {
        TopicInfo {
            name: name.into(),
            length: 0,
            first_id: None,
            last_id: None,
            groups: Vec::new(),
            published: 0,
            stopped: Vec::new(),
            dead_letters: 0,
        }
    }
}

impl GroupInfo {
    /// A group named `name` whose cursor is at `cursor`; a backend fills in the rest.
    pub fn new(name: impl Into<String>, cursor: MessageId) -> GroupInfo {
        GroupInfo {
            name: name.into(),
            cursor,
            pending: 0,
            lag: 0,
            scheduled: 0,
            parked: 0,
            blocked: 0,
            consumers: Vec::new(),
            oldest_pending: None,
            oldest_unread: None,
        }
    }
}

impl ConsumerInfo {
    /// A consumer holding `pending` messages, idle for `idle_ms`.
    pub fn new(name: impl Into<String>, pending: u64, idle_ms: u64) -> ConsumerInfo {
        ConsumerInfo {
            name: name.into(),
            pending,
            idle_ms,
        }
    }
}

/// A storage system relq runs on.
///
/// Implementations must make every method atomic with respect to the others, and durable to the
/// degree they document before returning `Ok`.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and errors ("memory", "embedded", "redis").
    fn name(&self) -> &'static str;

    /// Appends messages to `topic` (creating it if needed) and returns their ids, in order. Returns
    /// only once the backend holds them with its documented durability. A full backend waits for
    /// space up to its own publish timeout, then fails with `Full`.
    async fn publish(
        &self,
        topic: &str,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<MessageId>, BackendError>;

    /// Joins `group` as `consumer`, creating the topic and the group (at `start`) if needed.
    async fn join(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        start: StartPosition,
    ) -> Result<Subscription, BackendError>;

    /// Delivers again up to `max` messages this consumer holds (left pending by a crash or an
    /// unclean stop) with ids greater than `after`, in id order. Increments their delivery counts.
    /// The runtime pages with `after` = the last id of the previous page, so messages it is
    /// already handling are not delivered twice.
    async fn recover(
        &self,
        sub: &Subscription,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError>;

    /// Takes over up to `max` pending messages whose last delivery is older than `min_idle`, from
    /// any consumer of the group. Increments their delivery counts.
    async fn claim(
        &self,
        sub: &Subscription,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError>;

    /// Delivers up to `max` messages: scheduled entries that are due first, then new messages
    /// after the cursor. Stopped messages are parked instead of delivered; delayed messages that
    /// are not yet due are scheduled. Waits up to `wait` when nothing is ready.
    ///
    /// Cancel safety: a cancelled read may leave messages pending for this consumer; [`recover`]
    /// delivers them again.
    ///
    /// [`recover`]: Backend::recover
    async fn read(
        &self,
        sub: &Subscription,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BackendError>;

    /// Applies settlements atomically as one batch. Settlements for messages no longer pending in
    /// the group (settled already, or claimed and settled by another consumer) are ignored, and
    /// so are a `Retry` or `DeadLetter` for a superseded delivery: its attempt
    /// (`failure.attempt`, `message.attempt`) is not the message's current delivery count and
    /// another consumer holds it now (claimed it since). The consumer that holds it may settle
    /// it even after recovering it (which raised the count). An `Ack` of a pending message
    /// always applies.
    async fn settle(&self, sub: &Subscription, batch: &[Settlement]) -> Result<(), BackendError>;

    /// Stops message `id` for every group: it is parked instead of delivered until resumed.
    /// Returns false if the topic does not exist.
    async fn stop_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError>;

    /// Resumes a stopped message: parked entries become deliverable at once. Returns whether it was
    /// stopped.
    async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError>;

    /// Removes the topic: messages, groups, pending, scheduled and parked state, stop markers and
    /// dead letters. Running consumers get `Terminated` from their next call. The topic can be
    /// created again. Returns whether it existed.
    async fn terminate(&self, topic: &str) -> Result<bool, BackendError>;

    /// Creates `group` on `topic` (and the topic, if needed) with its cursor at `start` and no
    /// consumer. Returns false, changing nothing, if the group exists.
    async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError>;

    /// Removes `group` with its cursor and its pending, scheduled and parked entries; the
    /// messages stay for the other groups. Its running consumers get
    /// [`GroupDeleted`](crate::BackendErrorKind::GroupDeleted) from their next call; a consumer
    /// that joins later creates the group again. Returns whether it existed.
    async fn delete_group(&self, topic: &str, group: &str) -> Result<bool, BackendError>;

    /// Moves `group`'s cursor: the next new message it reads is the first one at `to`
    /// (`Earliest`: the oldest stored; `Latest`: the next published; `From(id)`: the first at or
    /// after `id`). Moving forward skips the messages in between; moving back delivers the
    /// messages after `to` again, except those the group holds pending, scheduled or parked,
    /// which stay as they are and are not delivered twice. Returns false if the group does not
    /// exist.
    async fn move_group(
        &self,
        topic: &str,
        group: &str,
        to: StartPosition,
    ) -> Result<bool, BackendError>;

    /// Removes messages every group has acknowledged and that are older than
    /// `retention.min_age`, and applies `retention.max_len`. With `retention.dry_run`, only
    /// counts what it would remove.
    async fn cleanup(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError>;

    /// A page of `topic`'s stored messages, read without a group (see [`Browse`]); `None` if the
    /// topic does not exist. Each message's `attempt` is 0.
    async fn browse(
        &self,
        topic: &str,
        query: &Browse,
    ) -> Result<Option<Vec<Message>>, BackendError>;

    /// Where message `id` stands in each group of `topic`; `None` if the topic does not exist.
    async fn locate(
        &self,
        topic: &str,
        id: MessageId,
    ) -> Result<Option<Vec<GroupPlacement>>, BackendError>;

    /// The backend's own counters (commit cycles, fsyncs, round trips, errors), for metrics.
    /// The default has none.
    fn metrics(&self) -> Vec<BackendMetric> {
        Vec::new()
    }

    /// Whether the backend can do its work now. The default lists the topics: reachable or not.
    async fn health(&self) -> Health {
        let check = match self.topics().await {
            Ok(t) => HealthCheck::new("backend", true, format!("reachable; {} topics", t.len())),
            Err(e) => HealthCheck::new("backend", false, e.to_string()),
        };
        Health::new(self.name(), vec![check])
    }

    /// Lets go of what the backend shares with other processes, after answering their requests
    /// in flight (the embedded engine's admin socket). The default does nothing. Call it (through
    /// `relq::Broker::close`) before a process exits.
    async fn close(&self) {}

    /// The names of all topics.
    async fn topics(&self) -> Result<Vec<String>, BackendError>;

    /// A topic's state, or `None` if it does not exist.
    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BackendError>;

    /// Dead letters of `topic` matching `query`, oldest first, starting after `query.after`.
    async fn dead_letters(
        &self,
        topic: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError>;

    /// One dead letter.
    async fn dead_letter(
        &self,
        topic: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError>;

    /// Republishes the given dead letters to their topic (new ids, a fresh delivery count, replay
    /// headers) and removes them, atomically per dead letter. Returns (dead letter, new message id)
    /// for each one that existed.
    async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError>;

    /// Deletes dead letters; returns how many existed.
    async fn delete_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError>;

    /// Deletes dead letters that failed last before `before`; returns how many.
    async fn purge_dead_letters(&self, topic: &str, before: Timestamp)
        -> Result<u64, BackendError>;

    /// Counts by failure kind, message type and error category.
    async fn dead_letter_stats(&self, topic: &str) -> Result<DeadLetterStats, BackendError>;

    /// Whether `key` is recorded as processed for `group` of `topic` (by
    /// [`record_processed`](Self::record_processed)) and its record has not expired. `false`
    /// when the topic or the group does not exist.
    async fn processed(&self, topic: &str, group: &str, key: &str) -> Result<bool, BackendError>;

    /// Records `key` as processed for the subscription's group for `ttl` (at most
    /// [`MAX_DEDUP_WINDOW`](crate::MAX_DEDUP_WINDOW)), durably to the backend's degree before it
    /// returns. Nothing is recorded when the group does not exist or the subscription's topic
    /// generation ended (a terminate). Deleting the group or terminating the topic removes its
    /// records.
    async fn record_processed(
        &self,
        sub: &Subscription,
        key: &str,
        ttl: Duration,
    ) -> Result<(), BackendError>;

    /// Takes up to `want` tokens from the rate limit bucket of `group` on `topic` (a bucket of
    /// `limit.n()` tokens refilled at `limit`'s rate, created full), first putting back
    /// `give_back` tokens an earlier take got and did not use (never above the bucket's size). The bucket is shared by
    /// every consumer of the group that reaches this backend: on Redis every process, on the
    /// embedded engine every process using the directory, in memory the process. Not durable:
    /// a restart starts it full.
    async fn take_tokens(
        &self,
        topic: &str,
        group: &str,
        want: u32,
        give_back: u32,
        limit: RateLimit,
    ) -> Result<Grant, BackendError>;
}

/// The message a replay of `dl` publishes: the original type and payload, the replay headers, a
/// fresh delivery count (it is a new message).
pub fn replay_message(dl: &DeadLetter) -> Outgoing {
    Outgoing {
        kind: dl.message.kind.clone(),
        payload: dl.message.payload.clone(),
        headers: replay_headers(dl),
        deliver_at: None,
        dedup_window: None,
    }
}

/// Headers a replay adds, shared by every backend. The time to live goes: an operator who
/// replays a message wants it handled, and an expired one would only expire again.
pub fn replay_headers(dl: &DeadLetter) -> BTreeMap<String, String> {
    let mut headers = dl.message.headers.clone();
    headers.remove(crate::model::HEADER_EXPIRES_AT);
    headers.insert(crate::model::HEADER_REPLAY_OF.to_owned(), dl.id.to_string());
    headers.insert(
        crate::model::HEADER_ORIGINAL_ID.to_owned(),
        dl.message.id.to_string(),
    );
    headers.insert(
        crate::model::HEADER_REPLAY_GROUP.to_owned(),
        dl.group.clone(),
    );
    headers
}
