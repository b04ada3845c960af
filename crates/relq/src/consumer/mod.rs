//! Consumers: the builder, the running handle, stop reasons and statistics.

mod nack;
mod pattern;
mod priority;
mod runtime;
mod slots;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::broker::Broker;
use crate::fast_hash::KindMap;
use crate::filter::Filter;
use crate::handler::{BatchConfig, BatchHandler, Handler};
use crate::pattern::TopicPattern;
use crate::retry::{Backoff, RetryPolicy};
use relq_core::{validate_kind, validate_name, RateLimit, Result, StartPosition};
use relq_core::{BackendError, BackendErrorKind, ConfigError, Error};
use runtime::Runner;
pub(crate) use runtime::DECODE_CATEGORY;

/// Why a consumer stopped.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum StopReason {
    /// [`ConsumerHandle::shutdown`] was called.
    Shutdown,
    /// The topic was terminated; the consumer stopped by itself.
    TopicTerminated,
    /// The consumer's group was deleted; the consumer stopped by itself.
    GroupDeleted,
    /// The backend failed in a way the consumer cannot recover from (corrupt data, a poisoned
    /// engine, a refused request), or the runtime itself failed (kind
    /// [`Fatal`](crate::BackendErrorKind::Fatal)). The error says which; its messages stay
    /// pending and are delivered again once the cause is fixed.
    Failed(Arc<BackendError>),
}

impl StopReason {
    /// A failure of the consumer runtime itself (not of the backend).
    pub(crate) fn runtime_failure(message: &str) -> StopReason {
        StopReason::Failed(Arc::new(BackendError::new(
            "consumer runtime",
            BackendErrorKind::Fatal,
            message,
        )))
    }
}

/// Two failures are equal when their kind and message are.
impl PartialEq for StopReason {
    fn eq(&self, other: &StopReason) -> bool {
        match (self, other) {
            (StopReason::Shutdown, StopReason::Shutdown)
            | (StopReason::TopicTerminated, StopReason::TopicTerminated)
            | (StopReason::GroupDeleted, StopReason::GroupDeleted) => true,
            (StopReason::Failed(a), StopReason::Failed(b)) => {
                a.kind == b.kind && a.backend == b.backend && a.message == b.message
            }
            _ => false,
        }
    }
}

impl Eq for StopReason {}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Shutdown => f.write_str("shut down"),
            StopReason::TopicTerminated => f.write_str("the topic was terminated"),
            StopReason::GroupDeleted => f.write_str("the group was deleted"),
            StopReason::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Counters of one running consumer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Messages acknowledged after success.
    pub processed: u64,
    /// Failed attempts (errors, panics, timeouts).
    pub failed: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages being handled now.
    pub in_flight: u64,
    /// Messages not handled because their time to live had ended (dead-lettered with reason
    /// `expired`, or dropped, as [`OnExpired`] says).
    pub expired: u64,
    /// Messages acknowledged unhandled because they did not pass the group's filters
    /// ([`ConsumerBuilder::filter`]).
    pub filtered: u64,
    /// Messages acknowledged unhandled because their key was recorded as processed
    /// ([`ConsumerBuilder::skip_processed`]).
    pub already_processed: u64,
}

/// What a consumer does with a message whose time to live ended before it was handled
/// ([`NewMessage::ttl`](crate::NewMessage::ttl)): it is never handled, and counted either way
/// (`relq_expired_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpired {
    /// Keep it as a dead letter with reason `expired` (an operator can inspect and replay it).
    #[default]
    DeadLetter,
    /// Acknowledge it without handling it (seed 004's "discard expired messages").
    Drop,
}

impl std::str::FromStr for OnExpired {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dead_letter" => Ok(OnExpired::DeadLetter),
            "drop" => Ok(OnExpired::Drop),
            other => Err(relq_core::ConfigError::new(
                "on_expired",
                format!(
                    "{:?} is neither dead_letter nor drop",
                    relq_core::shorten(other)
                ),
            )
            .into()),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) filtered: AtomicU64,
    pub(crate) already_processed: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            processed: self.processed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
            already_processed: self.already_processed.load(Ordering::Relaxed),
        }
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Handlers still running at the deadline, cancelled; their messages stay pending and are
    /// delivered again (to this consumer name on restart, or claimed by another consumer).
    pub abandoned: u64,
    /// The consumer's counters once it stopped (what it did in all, the drain included).
    pub stats: ConsumerStats,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) consumer: String,
    pub(crate) start: StartPosition,
    pub(crate) concurrency: usize,
    pub(crate) read_batch: usize,
    pub(crate) claim_after: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) poll_wait: Duration,
    pub(crate) retry: Arc<dyn RetryPolicy>,
    /// Each handler with its type as a shared string (a job keeps that instead of a copy).
    pub(crate) handlers: KindMap<(Arc<str>, Arc<dyn Runner>)>,
    pub(crate) batch_handlers: HashMap<String, (BatchConfig, Arc<dyn BatchHandler>)>,
    pub(crate) fallback: Option<Arc<dyn Runner>>,
    pub(crate) include_stack_trace: bool,
    pub(crate) forward: Option<Forwarding>,
    pub(crate) on_expired: OnExpired,
    /// The largest payload a compressed one may expand to (the broker's payload limit).
    pub(crate) max_payload: usize,
    /// Every one must pass for a message to be handled.
    pub(crate) filters: Vec<Filter>,
    /// Record handled messages' keys for this long, and skip a message whose key is recorded.
    pub(crate) skip_processed: Option<Duration>,
    /// The group's rate limit, shared through the backend.
    pub(crate) rate_limit: Option<RateLimit>,
    /// What a retried message with an ordering key does with its key.
    pub(crate) key_retries: KeyRetries,
    /// A run of one priority level: the slots it shares with the other levels, and its level.
    pub(crate) shared_slots: Option<(Arc<slots::Shared>, usize)>,
}

/// What a message with an ordering key does with its key while it waits for a retry (see
/// [`NewMessage::ordering_key`](crate::NewMessage::ordering_key)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRetries {
    /// It keeps the key: the later messages of its key wait until it succeeds or becomes a dead
    /// letter, so the key's messages are handled in publish order even across failures (the
    /// default).
    #[default]
    Hold,
    /// It lets the key go: the key's next message is delivered while this one waits for its
    /// retry, which then runs outside the key's order. For keys whose messages must not be
    /// held up by one that keeps failing.
    SkipAhead,
}

impl std::str::FromStr for KeyRetries {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hold" => Ok(KeyRetries::Hold),
            "skip_ahead" | "skip-ahead" => Ok(KeyRetries::SkipAhead),
            other => Err(ConfigError::new(
                "key_retries",
                format!(
                    "{:?} is neither hold nor skip_ahead",
                    relq_core::shorten(other)
                ),
            )
            .into()),
        }
    }
}

/// Where dead letters are also published (seed 000's failure topic): `<topic><suffix>`, each
/// publish tried `attempts` times, `delay` apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Forwarding {
    pub(crate) suffix: String,
    pub(crate) attempts: u32,
    pub(crate) delay: Duration,
}

impl Forwarding {
    pub(crate) fn new(suffix: String) -> Forwarding {
        Forwarding {
            suffix,
            attempts: 3,
            delay: Duration::from_secs(1),
        }
    }
}

/// What a new [`ConsumerBuilder`] starts from: the built-in defaults, or a configuration's
/// `[consumer]`, `[retry]` and `[dead_letters]` sections.
#[derive(Clone, Debug)]
pub(crate) struct ConsumerDefaults {
    pub(crate) concurrency: usize,
    pub(crate) read_batch: usize,
    pub(crate) claim_after: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) poll_wait: Duration,
    pub(crate) backoff: Option<Backoff>,
    pub(crate) include_stack_trace: bool,
    pub(crate) forward: Option<Forwarding>,
    pub(crate) on_expired: OnExpired,
    pub(crate) key_retries: KeyRetries,
}

impl Default for ConsumerDefaults {
    fn default() -> Self {
        ConsumerDefaults {
            concurrency: 16,
            read_batch: 64,
            claim_after: Duration::from_secs(60),
            handler_timeout: Duration::from_secs(30),
            poll_wait: Duration::from_secs(1),
            backoff: None,
            include_stack_trace: false,
            forward: None,
            on_expired: OnExpired::DeadLetter,
            key_retries: KeyRetries::Hold,
        }
    }
}

/// Builds a [`Consumer`]; from [`Broker::consumer`].
#[must_use = "a consumer builder does nothing until built and started"]
pub struct ConsumerBuilder {
    broker: Broker,
    topic: String,
    group: String,
    consumer: Option<String>,
    start: StartPosition,
    concurrency: usize,
    read_batch: usize,
    claim_after: Duration,
    handler_timeout: Duration,
    poll_wait: Duration,
    retry: Option<Arc<dyn RetryPolicy>>,
    backoff: Option<Backoff>,
    handlers: HashMap<String, Arc<dyn Runner>>,
    batch_handlers: HashMap<String, (BatchConfig, Arc<dyn BatchHandler>)>,
    fallback: Option<Arc<dyn Runner>>,
    include_stack_trace: bool,
    forward: Option<Forwarding>,
    on_expired: OnExpired,
    filters: Vec<Filter>,
    skip_processed: Option<Duration>,
    rate_limit: Option<RateLimit>,
    key_retries: KeyRetries,
    priority_weights: Option<Vec<u64>>,
    /// Set by [`Broker::consumer_matching`]: `topic` is a pattern.
    matching: bool,
    discover_every: Duration,
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("start", &self.start)
            .field("concurrency", &self.concurrency)
            .field("read_batch", &self.read_batch)
            .field("claim_after", &self.claim_after)
            .field("handler_timeout", &self.handler_timeout)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field(
                "batch_handlers",
                &self.batch_handlers.keys().collect::<Vec<_>>(),
            )
            .field("fallback", &self.fallback.is_some())
            .finish_non_exhaustive()
    }
}

impl ConsumerBuilder {
    pub(crate) fn new(broker: Broker, topic: &str, group: &str) -> ConsumerBuilder {
        let d = broker.consumer_defaults().clone();
        ConsumerBuilder {
            broker,
            topic: topic.to_owned(),
            group: group.to_owned(),
            consumer: None,
            start: StartPosition::Latest,
            concurrency: d.concurrency,
            read_batch: d.read_batch,
            claim_after: d.claim_after,
            handler_timeout: d.handler_timeout,
            poll_wait: d.poll_wait,
            retry: None,
            backoff: d.backoff,
            handlers: HashMap::new(),
            batch_handlers: HashMap::new(),
            fallback: None,
            include_stack_trace: d.include_stack_trace,
            forward: d.forward,
            on_expired: d.on_expired,
            filters: Vec::new(),
            skip_processed: None,
            rate_limit: None,
            key_retries: d.key_retries,
            priority_weights: None,
            matching: false,
            discover_every: Duration::from_secs(5),
        }
    }

    /// A builder whose `pattern` is a topic pattern (see [`Broker::consumer_matching`]).
    pub(crate) fn matching(broker: Broker, pattern: &str, group: &str) -> ConsumerBuilder {
        ConsumerBuilder {
            matching: true,
            ..ConsumerBuilder::new(broker, pattern, group)
        }
    }

    /// Handles only messages that pass `filter` (add several: each must pass). A message that
    /// does not is acknowledged for this group without a handler and counted
    /// ([`ConsumerStats::filtered`], `relq_filtered_total`); the group never sees it again,
    /// other groups are not affected. Filters are checked before anything else (a filtered-out
    /// message is not dead-lettered by this group for any reason), on the payload as the handler
    /// would see it (decompressed).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    /// Seed 004's 记录已处理的消息ID: records, for `ttl`, the key of every message a handler
    /// of this group handled successfully (its idempotency key, else its id), and acknowledges
    /// a message whose key is recorded without running its handler again (counted in
    /// [`ConsumerStats::already_processed`] and `relq_already_processed_total`). The record is
    /// written to the backend (durable as its acks are) before the ack.
    ///
    /// It closes the window between a handler's success and its ack (a crash, a backend outage,
    /// a claim by another consumer meanwhile), and catches a message published twice with one
    /// idempotency key outside the topic's deduplication window. A duplicate can still run
    /// when the process dies after the handler's side effects and before the record is stored;
    /// when two deliveries of one key run at once (the record is written after the handler);
    /// and after `ttl`. For no window at all, record the key in the handler's own transaction.
    /// Costs a backend call before and after each handler. Single-message handlers only.
    pub fn skip_processed(mut self, ttl: Duration) -> Self {
        self.skip_processed = Some(ttl);
        self
    }

    /// Limits the whole group to `limit` ([`RateLimit`], e.g. `"100/s".parse()?`): every
    /// consumer of the group takes tokens from one bucket kept by the backend (on Redis shared
    /// by every process, on the embedded engine by every process using the directory) before
    /// it fetches, and fetches only as many messages as it got tokens for. A message over the
    /// limit waits in the topic: it is not fetched, not failed and burns no attempt. Retries,
    /// recoveries and claims count against the limit like first deliveries. Give every
    /// consumer of the group the same limit (each take uses the caller's). The wait is in
    /// `relq_rate_limit_wait_seconds`. A rate-limited consumer fetches one batch at a time.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// What a failed message with an ordering key does with its key while it waits for its
    /// retry: [`KeyRetries::Hold`] (the default) keeps the key, so its later messages wait;
    /// [`KeyRetries::SkipAhead`] lets them go on. A dead letter always lets the key go.
    pub fn key_retries(mut self, policy: KeyRetries) -> Self {
        self.key_retries = policy;
        self
    }

    /// On a topic with priority levels
    /// ([`Broker::with_topic_priorities`](crate::Broker::with_topic_priorities)): each level's
    /// weight, lowest level first (one per level, each at least 1). When several levels have
    /// messages, each gets free handler slots in proportion to its weight. Default `4^level`.
    pub fn priority_weights(mut self, weights: impl Into<Vec<u64>>) -> Self {
        self.priority_weights = Some(weights.into());
        self
    }

    /// With a topic pattern ([`Broker::consumer_matching`]): how often the topics are listed to
    /// find new matches. Default 5 s.
    pub fn discover_every(mut self, d: Duration) -> Self {
        self.discover_every = d;
        self
    }

    /// The consumer's name within its group. Use a stable name per process (e.g. the host name)
    /// so a restart recovers what the previous run left pending. Default: `consumer-<random>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Where the group starts if this consumer creates it. Default [`StartPosition::Latest`].
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Most messages handled at once. Default 16.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Most messages fetched per backend read. Default 64.
    pub fn read_batch(mut self, n: usize) -> Self {
        self.read_batch = n;
        self
    }

    /// Messages another consumer has held this long are claimed. Must exceed the handler timeout.
    /// Default 60 s.
    pub fn claim_after(mut self, d: Duration) -> Self {
        self.claim_after = d;
        self
    }

    /// A handler running longer is cancelled and the attempt fails with reason `timeout`.
    /// Default 30 s.
    pub fn handler_timeout(mut self, d: Duration) -> Self {
        self.handler_timeout = d;
        self
    }

    /// What becomes of a message whose time to live ended before it was handled: a dead letter
    /// with reason `expired` (the default) or dropped. Either way it is not handled, and a
    /// failed message whose next retry would fall after its expiry goes the same way at once.
    pub fn on_expired(mut self, action: OnExpired) -> Self {
        self.on_expired = action;
        self
    }

    /// How long one backend read waits for new messages. Default 1 s.
    pub fn poll_wait(mut self, d: Duration) -> Self {
        self.poll_wait = d;
        self
    }

    /// The built-in retry policy. Default [`Backoff::default`].
    pub fn retry(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self.retry = None;
        self
    }

    /// A custom retry policy.
    pub fn retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.retry = Some(Arc::new(policy));
        self.backoff = None;
        self
    }

    /// Handles messages of type `kind` with `handler`.
    pub fn handler(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(kind.into(), runtime::runner(handler));
        self
    }

    /// Handles messages of type `kind` in batches.
    pub fn batch_handler(
        mut self,
        kind: impl Into<String>,
        config: BatchConfig,
        handler: impl BatchHandler,
    ) -> Self {
        self.batch_handlers
            .insert(kind.into(), (config, Arc::new(handler)));
        self
    }

    /// Handles messages of every type without a handler of its own.
    pub fn fallback(mut self, handler: impl Handler) -> Self {
        self.fallback = Some(runtime::runner(handler));
        self
    }

    /// Captures a backtrace where a handler creates a [`HandlerError`](crate::HandlerError) and
    /// stores it in the dead letter. Off by default: capturing costs time on every failure.
    pub fn include_stack_trace(mut self, on: bool) -> Self {
        self.include_stack_trace = on;
        self
    }

    /// Also publishes every dead letter of this consumer as a JSON failure record (type
    /// `relq.dead_letter`, header `relq-original-id`) on the topic `<topic><suffix>`, so other
    /// services can subscribe to failures (seed 000's `_failed_channel`). The dead letter is
    /// stored first; the publish happens after, off the handler path, and is tried 3 times 1 s
    /// apart (see [`forward_retry`](Self::forward_retry)); a failed forward is logged and
    /// counted, never loses the dead letter. A process that dies between the two loses the
    /// forward (the dead letter stays): see docs/design.md.
    pub fn forward_dead_letters(mut self, suffix: impl Into<String>) -> Self {
        let (attempts, delay) = self
            .forward
            .as_ref()
            .map_or((3, Duration::from_secs(1)), |f| (f.attempts, f.delay));
        self.forward = Some(Forwarding {
            suffix: suffix.into(),
            attempts,
            delay,
        });
        self
    }

    /// How often a dead letter's forward is tried and how long apart (seed 000's
    /// `max_retry_attempts` and `retry_delay`). Default 3 times, 1 s apart.
    pub fn forward_retry(mut self, attempts: u32, delay: Duration) -> Self {
        let f = self
            .forward
            .get_or_insert_with(|| Forwarding::new(String::new()));
        f.attempts = attempts;
        f.delay = delay;
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// Invalid names, zero concurrency or batch sizes, a claim time not above the handler
    /// timeout, an invalid retry policy, or no handler at all.
    pub fn build(self) -> Result<Consumer, Error> {
        let pattern = if self.matching {
            if self.discover_every.is_zero() {
                return Err(ConfigError::new("discover_every", "must be above zero").into());
            }
            Some(Arc::new(self.topic.parse::<TopicPattern>()?))
        } else {
            validate_name("topic", &self.topic)?;
            None
        };
        validate_name("group", &self.group)?;
        let consumer = self
            .consumer
            .unwrap_or_else(|| format!("consumer-{:08x}", fastrand::u32(..)));
        validate_name("consumer", &consumer)?;
        for kind in self.handlers.keys().chain(self.batch_handlers.keys()) {
            validate_kind(kind)?;
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new("concurrency", "must be at least 1").into());
        }
        if self.read_batch == 0 {
            return Err(ConfigError::new("read_batch", "must be at least 1").into());
        }
        if self.handler_timeout.is_zero() {
            return Err(ConfigError::new("handler_timeout", "must be above zero").into());
        }
        if self.claim_after <= self.handler_timeout {
            return Err(ConfigError::new(
                "claim_after",
                format!(
                    "must exceed handler_timeout ({:?}), or a slow handler's message is claimed by another consumer while it still runs",
                    self.handler_timeout
                ),
            )
            .into());
        }
        for (kind, (c, _)) in &self.batch_handlers {
            if c.size == 0 || c.timeout.is_zero() || c.max_wait < c.timeout {
                return Err(ConfigError::new(
                    "batch",
                    format!("batch handler {kind:?}: size must be >= 1, timeout > 0, max_wait >= timeout"),
                )
                .into());
            }
            if c.size > self.concurrency {
                // Each message waiting in a batch holds a concurrency slot: a batch larger than
                // the concurrency could never fill and would always wait for its timeout.
                return Err(ConfigError::new(
                    "batch",
                    format!(
                        "batch handler {kind:?}: size {} exceeds the concurrency {}",
                        c.size, self.concurrency
                    ),
                )
                .into());
            }
        }
        // A message waits in a batch up to max_wait, then runs up to handler_timeout: only
        // after both may another consumer take it over.
        let batch_wait = self
            .batch_handlers
            .values()
            .map(|(c, _)| c.max_wait)
            .max()
            .unwrap_or_default();
        if !self.batch_handlers.is_empty()
            && self.claim_after <= self.handler_timeout.saturating_add(batch_wait)
        {
            return Err(ConfigError::new(
                "claim_after",
                format!(
                    "must exceed handler_timeout plus the longest batch max_wait ({:?}), or a message waiting in a batch is claimed while it is still held",
                    self.handler_timeout.saturating_add(batch_wait)
                ),
            )
            .into());
        }
        if let Some(f) = &self.forward {
            if f.suffix.is_empty() {
                return Err(ConfigError::new(
                    "forward_dead_letters",
                    "the failure topic's suffix is empty (forward_retry needs forward_dead_letters)",
                )
                .into());
            }
            // The failure topic's name (with a pattern, a name of the pattern's shape).
            let sample = if self.matching { "t" } else { &self.topic };
            validate_name("topic", &format!("{sample}{}", f.suffix))?;
            if f.attempts == 0 {
                return Err(
                    ConfigError::new("forward_retry", "attempts must be at least 1").into(),
                );
            }
        }
        if let Some(ttl) = self.skip_processed {
            if ttl.is_zero() || ttl > relq_core::MAX_DEDUP_WINDOW {
                return Err(ConfigError::new(
                    "skip_processed",
                    "the record time must be above zero and at most 30 days",
                )
                .into());
            }
            if let Some(kind) = self.batch_handlers.keys().next() {
                return Err(ConfigError::new(
                    "skip_processed",
                    format!(
                        "applies to single-message handlers; batch handler {kind:?} would not skip"
                    ),
                )
                .into());
            }
        }
        if self.handlers.is_empty() && self.batch_handlers.is_empty() && self.fallback.is_none() {
            return Err(ConfigError::new(
                "handlers",
                "register at least one handler or a fallback",
            )
            .into());
        }
        let retry: Arc<dyn RetryPolicy> = match (self.retry, self.backoff) {
            (Some(p), _) => p,
            (None, b) => {
                let b = b.unwrap_or_default();
                b.validate()?;
                Arc::new(b)
            }
        };
        let levels = match pattern {
            Some(_) => 0,
            None => self.broker.topic_priorities(&self.topic),
        };
        let priority = match (levels, self.priority_weights) {
            (0 | 1, None) => None,
            (0 | 1, Some(_)) => {
                return Err(ConfigError::new(
                    "priority_weights",
                    format!("topic {:?} has no priority levels", self.topic),
                )
                .into())
            }
            (n, Some(w)) if w.len() != usize::from(n) || w.contains(&0) => {
                return Err(ConfigError::new(
                    "priority_weights",
                    format!("topic {:?} has {n} priority levels: give {n} weights, each at least 1, not {w:?}", self.topic),
                )
                .into())
            }
            (_, Some(w)) => Some(w),
            (n, None) => Some((0..u32::from(n)).map(|l| 4u64.pow(l)).collect()),
        };
        let max_payload = self.broker.max_payload();
        let discover_every = self.discover_every;
        Ok(Consumer {
            pattern: pattern.map(|p| (p, discover_every)),
            priority,
            broker: self.broker,
            config: Arc::new(Config {
                topic: self.topic,
                group: self.group,
                consumer,
                start: self.start,
                concurrency: self.concurrency,
                read_batch: self.read_batch,
                claim_after: self.claim_after,
                handler_timeout: self.handler_timeout,
                poll_wait: self.poll_wait,
                retry,
                handlers: self
                    .handlers
                    .into_iter()
                    .map(|(kind, h)| {
                        let shared = Arc::from(kind.as_str());
                        (kind, (shared, h))
                    })
                    .collect(),
                batch_handlers: self.batch_handlers,
                fallback: self.fallback,
                include_stack_trace: self.include_stack_trace,
                forward: self.forward,
                on_expired: self.on_expired,
                max_payload,
                filters: self.filters,
                skip_processed: self.skip_processed,
                rate_limit: self.rate_limit,
                key_retries: self.key_retries,
                shared_slots: None,
            }),
        })
    }
}

/// A configured consumer; [`Consumer::start`] runs it.
#[must_use = "a consumer does nothing until started"]
pub struct Consumer {
    broker: Broker,
    config: Arc<Config>,
    /// A consumer of every topic matching this pattern, listed this often.
    pattern: Option<(Arc<TopicPattern>, Duration)>,
    /// A topic with priority levels: their weights, lowest level first.
    priority: Option<Vec<u64>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("topic", &self.config.topic)
            .field("group", &self.config.group)
            .field("consumer", &self.config.consumer)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Joins the group (creating it at the start position if needed) and starts consuming in
    /// background tasks: first this consumer's own pending messages, then messages other
    /// consumers held past `claim_after`, then new ones.
    ///
    /// # Errors
    /// The backend failed to join.
    pub async fn start(self) -> Result<ConsumerHandle, Error> {
        let counters = Arc::new(Counters::default());
        match (self.pattern, self.priority) {
            (Some((pattern, every)), _) => {
                pattern::start(self.broker, self.config, pattern, every, counters).await
            }
            (None, Some(weights)) => {
                priority::start(&self.broker, self.config, weights, counters).await
            }
            (None, None) => start_one(&self.broker, self.config, counters).await,
        }
    }
}

/// Starts a consumer of one topic (`config.topic`), counting into `counters`.
async fn start_one(
    broker: &Broker,
    config: Arc<Config>,
    counters: Arc<Counters>,
) -> Result<ConsumerHandle, Error> {
    let c = &config;
    let sub = broker
        .backend()
        .join(&c.topic, &c.group, &c.consumer, c.start)
        .await?;
    let (stop_tx, stop_rx) = watch::channel(None::<Duration>);
    let (done_tx, done_rx) = watch::channel(None::<StopReason>);
    let (report_tx, report_rx) = watch::channel(None::<ShutdownReport>);
    let span = tracing::info_span!("relq.consumer", topic = %sub.topic, group = %sub.group, consumer = %sub.consumer);
    tokio::spawn(tracing::Instrument::instrument(
        runtime::run(
            broker.backend().clone(),
            config.clone(),
            sub,
            counters.clone(),
            stop_rx,
            done_tx,
            report_tx,
        ),
        span,
    ));
    Ok(ConsumerHandle {
        name: config.consumer.clone(),
        counters,
        stop: stop_tx,
        done: done_rx,
        report: report_rx,
    })
}

/// A running consumer. Dropping the handle does not stop it; call [`shutdown`](Self::shutdown).
pub struct ConsumerHandle {
    name: String,
    counters: Arc<Counters>,
    stop: watch::Sender<Option<Duration>>,
    done: watch::Receiver<Option<StopReason>>,
    report: watch::Receiver<Option<ShutdownReport>>,
}

impl std::fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("name", &self.name)
            .field("stats", &self.stats())
            .field("stopped", &*self.done.borrow())
            .finish_non_exhaustive()
    }
}

impl ConsumerHandle {
    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its counters now.
    pub fn stats(&self) -> ConsumerStats {
        self.counters.snapshot()
    }

    /// Whether it has stopped.
    pub fn is_stopped(&self) -> bool {
        self.done.borrow().is_some()
    }

    /// Resolves when the consumer stops, with the reason.
    ///
    /// Cancel safety: cancel safe; call again to keep waiting.
    pub async fn done(&self) -> StopReason {
        let mut rx = self.done.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return rx
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| StopReason::runtime_failure("the consumer task ended"));
            }
        }
    }

    /// Stops fetching, lets in-flight handlers finish for up to `deadline`, flushes
    /// acknowledgements, and cancels what is still running. Cancelled messages stay pending and
    /// are delivered again later: nothing is lost.
    pub async fn shutdown(self, deadline: Duration) -> ShutdownReport {
        let _ = self.stop.send(Some(deadline));
        self.done().await;
        let mut rx = self.report.clone();
        loop {
            if let Some(r) = *rx.borrow_and_update() {
                return r;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().unwrap_or(ShutdownReport {
                    abandoned: 0,
                    stats: self.counters.snapshot(),
                });
            }
        }
    }
}
