//! The broker: the entry point that publishes, builds consumers and runs operations.

use std::sync::Arc;
use std::time::Duration;

use crate::analysis::{self, FailureGroup, SharedSuggestions, Suggestion, Suggestions};
use crate::compression::{self, Compression, TopicCompression};
use crate::consumer::{ConsumerBuilder, ConsumerDefaults};
use crate::memory::MemoryBackend;
use crate::message::{NewMessage, TopicSettings};
use relq_core::{
    validate_name, Backend, BackendError, BackendErrorKind, Browse, CleanupReport, DeadLetter,
    DeadLetterId, DeadLetterQuery, DeadLetterStats, Error, GroupPlacement, Health, Message,
    MessageId, NotFound, Result, Retention, StartPosition, Timestamp, TopicInfo,
};

/// Largest payload accepted by default: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// How long dead letters are kept by default by [`DeadLetters::purge_expired`]: 30 days.
pub const DEFAULT_DEAD_LETTER_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A handle to a backend: publishes messages, builds consumers, inspects and operates topics.
/// Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    backend: Arc<dyn Backend>,
    max_payload: usize,
    /// Each topic's settings for the messages this broker publishes (a time to live, a
    /// compression).
    topics: Arc<std::collections::HashMap<String, TopicSettings>>,
    suggestions: SharedSuggestions,
    defaults: Arc<ConsumerDefaults>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Broker {
    /// A broker on `backend`.
    pub fn new(backend: impl Backend) -> Broker {
        Broker::from_arc(Arc::new(backend))
    }

    /// A broker on a backend that is shared with other code (to read backend-specific statistics,
    /// for example).
    pub fn from_arc(backend: Arc<dyn Backend>) -> Broker {
        Broker {
            backend,
            max_payload: DEFAULT_MAX_PAYLOAD,
            topics: Arc::default(),
            suggestions: Arc::new(Suggestions::default()),
            defaults: Arc::new(ConsumerDefaults::default()),
        }
    }

    /// A broker on a fresh in-memory backend (not durable).
    pub fn memory() -> Broker {
        Broker::new(MemoryBackend::new())
    }

    /// A broker on the embedded engine in data directory `path` (created if needed): durable,
    /// nothing to install. See [`EmbeddedBackend`](crate::EmbeddedBackend). When another
    /// process has the directory open, the broker reaches the directory through that process.
    ///
    /// # Errors
    /// The directory is held by a process that cannot be reached, cannot be created, or holds
    /// corrupt data.
    #[cfg(feature = "embedded")]
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Broker> {
        let backend = relq_embedded::EmbeddedBackend::open_shared(
            path.as_ref(),
            relq_embedded::EmbeddedConfig::default(),
        )?;
        Ok(Broker::from_arc(backend))
    }

    /// A broker for a backend URL: `file:///path/to/data` (or `file://relative/path`) for the
    /// embedded engine, `memory://` for the in-memory backend, and with the `redis` feature
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` or
    /// `redis+cluster://host:port,host:port` for Redis Streams.
    ///
    /// # Errors
    /// An unsupported URL, or the backend failed to open.
    pub async fn connect(url: &str) -> Result<Broker> {
        match url.split_once("://") {
            Some(("memory", _)) => Ok(Broker::memory()),
            Some(("file", "")) => Err(Error::UnsupportedUrl {
                url: url.to_owned(),
                reason: "a file:// URL needs a directory, e.g. file:///var/lib/relq".into(),
            }),
            #[cfg(feature = "embedded")]
            Some(("file", path)) => Broker::open(path),
            #[cfg(not(feature = "embedded"))]
            Some(("file", _)) => Err(not_compiled_in(url, "embedded engine", "embedded")),
            #[cfg(feature = "redis")]
            Some((scheme, _)) if REDIS_SCHEMES.contains(&scheme) => Ok(Broker::new(
                relq_redis::RedisBackend::connect(url).await?,
            )),
            #[cfg(not(feature = "redis"))]
            Some((scheme, _)) if REDIS_SCHEMES.contains(&scheme) => {
                Err(not_compiled_in(url, "Redis backend", "redis"))
            }
            _ => Err(Error::UnsupportedUrl {
                url: url.to_owned(),
                reason: "expected file:///path, memory://, redis://host:port or redis+cluster://host:port,host:port".into(),
            }),
        }
    }

    /// A broker as `config` describes: its backend URL with the backend's options, and its
    /// consumer defaults (`[consumer]`, `[retry]`, `[dead_letters]`) for every
    /// [`consumer`](Self::consumer) it builds.
    ///
    /// # Errors
    /// An invalid configuration, an unsupported URL, or the backend failed to open.
    #[cfg(feature = "config")]
    pub async fn from_config(config: &crate::config::Config) -> Result<Broker> {
        config.validate()?;
        let url = config.backend.url.as_str();
        let mut broker = match url.split_once("://") {
            #[cfg(feature = "embedded")]
            Some(("file", path)) if !path.is_empty() => {
                Broker::from_arc(relq_embedded::EmbeddedBackend::open_shared(
                    std::path::Path::new(path),
                    config.embedded(),
                )?)
            }
            #[cfg(feature = "redis")]
            Some((scheme, _)) if REDIS_SCHEMES.contains(&scheme) => {
                Broker::new(relq_redis::RedisBackend::connect_with(url, config.redis()?).await?)
            }
            _ => Broker::connect(url).await?,
        };
        let c = &config.consumer;
        broker.defaults = Arc::new(ConsumerDefaults {
            concurrency: c.concurrency,
            read_batch: c.read_batch,
            claim_after: c.claim_after,
            handler_timeout: c.handler_timeout,
            poll_wait: c.poll_wait,
            backoff: Some(config.retry.backoff()),
            include_stack_trace: config.dead_letters.include_stack_trace,
            forward: config
                .dead_letters
                .forward
                .then(|| crate::consumer::Forwarding {
                    suffix: config.dead_letters.topic_suffix.clone(),
                    attempts: config.dead_letters.forward_attempts,
                    delay: config.dead_letters.forward_retry_delay,
                }),
            on_expired: c.on_expired,
            key_retries: c.key_retries,
        });
        for t in &config.topics {
            if let Some(ttl) = t.ttl {
                broker = broker.with_topic_ttl(&t.name, ttl)?;
            }
            if let Some(window) = t.dedup_window {
                broker = broker.with_topic_dedup_window(&t.name, window)?;
            }
            if let Some(algorithm) = t.compression {
                broker = broker.with_topic_compression(
                    &t.name,
                    algorithm,
                    t.compress_above
                        .unwrap_or(crate::config::DEFAULT_COMPRESS_ABOVE),
                )?;
            }
        }
        Ok(broker)
    }

    pub(crate) fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub(crate) fn consumer_defaults(&self) -> &ConsumerDefaults {
        &self.defaults
    }

    /// Gives every message this broker publishes on `topic` a time to live of `ttl` (from its
    /// publish), unless the message has its own ([`NewMessage::ttl`]). A consumer does not
    /// handle an expired message: it becomes a dead letter with reason `expired`, or is
    /// dropped (see [`ConsumerBuilder::on_expired`](crate::ConsumerBuilder::on_expired)). The
    /// expiry is stamped on each message at publish (header `relq-expires-at`), so it holds
    /// on every backend and for every consumer; a publisher without this setting publishes
    /// without it (the configuration file's `[[topics]]` gives every process the same).
    ///
    /// # Errors
    /// An invalid topic name, or a zero `ttl` (every message would expire at once).
    pub fn with_topic_ttl(mut self, topic: &str, ttl: Duration) -> Result<Broker> {
        validate_name("topic", topic)?;
        if ttl.is_zero() {
            return Err(relq_core::ConfigError::new(
                "topic ttl",
                format!("the time to live of topic {topic:?} must be above zero: every message would expire at once"),
            )
            .into());
        }
        Arc::make_mut(&mut self.topics)
            .entry(topic.to_owned())
            .or_default()
            .ttl = Some(ttl);
        Ok(self)
    }

    /// Compresses the payload of every message this broker publishes on `topic` that is at
    /// least `min_size` bytes, with `algorithm`, unless the message names its own
    /// ([`NewMessage::compress`]). A payload stays as it is when compressing would not make it
    /// smaller. It is stored compressed (header `relq-encoding`) on every backend; consumers
    /// decompress it before their handlers see it, and [`browse`](Self::browse),
    /// [`message`](Self::message) and the dead-letter reads show it decompressed. The payload
    /// limit ([`with_max_payload`](Self::with_max_payload)) applies to the payload before
    /// compression. Counted in `relq_compression_input_bytes_total` and
    /// `relq_compression_output_bytes_total`.
    ///
    /// # Errors
    /// An invalid topic name, or zstd in a build without relq's `zstd` feature.
    pub fn with_topic_compression(
        mut self,
        topic: &str,
        algorithm: Compression,
        min_size: usize,
    ) -> Result<Broker> {
        validate_name("topic", topic)?;
        if cfg!(not(feature = "zstd")) && algorithm == Compression::Zstd {
            return Err(relq_core::ConfigError::new(
                "compression",
                format!(
                    "topic {topic:?}: this build of relq has no zstd: enable relq's `zstd` feature"
                ),
            )
            .into());
        }
        Arc::make_mut(&mut self.topics)
            .entry(topic.to_owned())
            .or_default()
            .compression = Some(TopicCompression {
            algorithm,
            min_size,
        });
        Ok(self)
    }

    /// How long `topic` remembers the idempotency key of a message this broker publishes
    /// ([`NewMessage::idempotency_key`]): a publish with a key the topic stored less than
    /// `window` ago stores nothing and returns the first message's id. Two minutes by default
    /// ([`DEFAULT_DEDUP_WINDOW`](crate::DEFAULT_DEDUP_WINDOW)); the window of each key is the
    /// one its first publish set. The embedded engine and the in-memory backend keep the keys
    /// of the window in memory (about 100 bytes each plus the key), Redis in a hash per topic.
    ///
    /// # Errors
    /// An invalid topic name, or a window of zero or over 30 days.
    pub fn with_topic_dedup_window(mut self, topic: &str, window: Duration) -> Result<Broker> {
        validate_name("topic", topic)?;
        if window.is_zero() || window > relq_core::MAX_DEDUP_WINDOW {
            return Err(relq_core::ConfigError::new(
                "dedup window",
                format!(
                    "the deduplication window of topic {topic:?} must be above zero and at \
                     most 30 days, not {}",
                    humantime::format_duration(window)
                ),
            )
            .into());
        }
        Arc::make_mut(&mut self.topics)
            .entry(topic.to_owned())
            .or_default()
            .dedup_window = Some(window);
        Ok(self)
    }

    /// Gives `topic` `levels` priority levels (2 to 10): a message published with
    /// [`NewMessage::priority`] is stored on its level's topic
    /// ([`priority_topic`](crate::priority_topic)), and a consumer of `topic` built from this
    /// broker reads every level, taking free handler slots for the levels in smooth weighted
    /// round-robin order over those with messages (level `l` weighs `4^l` unless
    /// [`ConsumerBuilder::priority_weights`](crate::ConsumerBuilder::priority_weights) says
    /// otherwise): with three levels and a backlog on each, 16 of 21 slots go to level 2, 4 to
    /// level 1 and 1 to level 0, which is never starved. Give publishers and consumers the
    /// same setting (the configuration file's `[[topics]] priorities` does).
    ///
    /// # Errors
    /// An invalid topic name, a level's topic name over the length limit, or `levels` outside
    /// 2 to 10.
    pub fn with_topic_priorities(mut self, topic: &str, levels: u8) -> Result<Broker> {
        validate_name("topic", topic)?;
        if !(2..=crate::MAX_PRIORITIES).contains(&levels) {
            return Err(relq_core::ConfigError::new(
                "priorities",
                format!("topic {topic:?} may have 2 to 10 priority levels, not {levels}"),
            )
            .into());
        }
        validate_name("topic", &crate::priority_topic(topic, levels - 1))?;
        Arc::make_mut(&mut self.topics)
            .entry(topic.to_owned())
            .or_default()
            .priorities = levels;
        Ok(self)
    }

    /// `topic`'s priority levels (0 when it has none).
    pub(crate) fn topic_priorities(&self, topic: &str) -> u8 {
        self.topics.get(topic).map_or(0, |t| t.priorities)
    }

    /// Sets the largest payload [`publish`](Self::publish) accepts.
    pub fn with_max_payload(mut self, bytes: usize) -> Broker {
        self.max_payload = bytes;
        self
    }

    /// Sets the suggestions [`DeadLetters::failure_groups`] and
    /// [`DeadLetters::suggestion`] give per failure category: the built-in ones plus what
    /// `suggestions` registers.
    pub fn with_suggestions(mut self, suggestions: Suggestions) -> Broker {
        self.suggestions = Arc::new(suggestions);
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Publishes one message and returns its id once the backend holds it.
    ///
    /// # Errors
    /// An invalid topic or type, an oversize payload, a reserved header, a backend that stayed
    /// full ([`Error::Full`]) or failed. On error nothing was published.
    pub async fn publish(&self, topic: &str, message: NewMessage) -> Result<MessageId> {
        let ids = self.publish_batch(topic, vec![message]).await?;
        self.only_id(ids)
    }

    /// The id of a publish of one message.
    fn only_id(&self, ids: Vec<MessageId>) -> Result<MessageId> {
        ids.into_iter().next().ok_or_else(|| {
            Error::Backend(BackendError::new(
                self.backend.name(),
                BackendErrorKind::Invalid,
                "publish returned no id",
            ))
        })
    }

    /// Stores prepared messages on `topic`, counted; a full backend is [`Error::Full`].
    async fn store(&self, topic: &str, batch: Vec<relq_core::Outgoing>) -> Result<Vec<MessageId>> {
        let n = batch.len() as u64;
        let ids = self
            .backend
            .publish(topic, batch)
            .await
            .map_err(|e| match e.kind {
                BackendErrorKind::Full => Error::Full {
                    topic: topic.to_owned(),
                    limit: e.limit(),
                    detail: e.message,
                },
                _ => Error::Backend(e),
            })?;
        metrics::counter!("relq_published_total", "topic" => topic.to_owned()).increment(n);
        Ok(ids)
    }

    /// Publishes messages in one backend call; ids are returned in order.
    ///
    /// # Errors
    /// As [`publish`](Self::publish); the batch is validated as a whole first.
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageId>> {
        validate_name("topic", topic)?;
        let settings = if self.topics.is_empty() {
            TopicSettings::default()
        } else {
            self.topics.get(topic).copied().unwrap_or_default()
        };
        if messages.iter().any(|m| m.priority > 0) {
            return self.publish_by_priority(topic, settings, messages).await;
        }
        let mut batch = Vec::with_capacity(messages.len());
        // What compression did (counted once the batch is stored).
        let mut packed = Vec::new();
        for m in messages {
            let (out, compressed) = m.prepare(self.max_payload, settings)?;
            packed.extend(compressed);
            batch.push(out);
        }
        let ids = self.store(topic, batch).await?;
        count_compression(topic, &packed);
        Ok(ids)
    }

    /// A batch with priorities: each level's messages go to its topic, one backend call per
    /// level (highest first); the ids come back in the batch's order.
    async fn publish_by_priority(
        &self,
        topic: &str,
        settings: TopicSettings,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageId>> {
        type Level = (Vec<usize>, Vec<relq_core::Outgoing>);
        let n = messages.len();
        let mut levels: std::collections::BTreeMap<u8, Level> = std::collections::BTreeMap::new();
        let mut packed = Vec::new();
        for (i, m) in messages.into_iter().enumerate() {
            let level = m.priority;
            if level >= settings.priorities.max(1) {
                let why = match settings.priorities {
                    0 => format!("topic {topic:?} has no priority levels (give it some with Broker::with_topic_priorities or [[topics]] priorities)"),
                    p => format!("topic {topic:?} has priority levels 0 to {}, not {level}", p - 1),
                };
                return Err(relq_core::ConfigError::new("priority", why).into());
            }
            let (out, compressed) = m.prepare(self.max_payload, settings)?;
            packed.extend(compressed);
            let e = levels.entry(level).or_default();
            e.0.push(i);
            e.1.push(out);
        }
        let mut ids = vec![MessageId::ZERO; n];
        for (level, (at, batch)) in levels.into_iter().rev() {
            let stored = self
                .store(&crate::priority_topic(topic, level), batch)
                .await?;
            for (i, id) in at.into_iter().zip(stored) {
                ids[i] = id;
            }
        }
        count_compression(topic, &packed);
        Ok(ids)
    }

    /// Starts building a consumer in `group` of every topic matching `pattern`, current and
    /// future ([`TopicPattern`](crate::TopicPattern): `orders.*`, `orders.>`, or a regular
    /// expression after `re:`); an invalid pattern is an error of `build`. One consumer runs
    /// per matching topic, sharing the handlers and the counters; the topics are listed every
    /// [`discover_every`](ConsumerBuilder::discover_every). On the topics that match when it
    /// starts the group starts where [`start`](ConsumerBuilder::start) says; on topics found
    /// later, at their earliest message (they were created after the subscription, so nothing
    /// in them is older than it). A handler tells the topics apart by
    /// [`Message::topic`](crate::Message::topic).
    pub fn consumer_matching(&self, pattern: &str, group: &str) -> ConsumerBuilder {
        ConsumerBuilder::matching(self.clone(), pattern, group)
    }

    /// A route named `name`: forwards every message published on topics matching `from` (a
    /// [`TopicPattern`](crate::TopicPattern)) into each topic of `to`, durably and at least
    /// once: the source message is acknowledged only after every target stored it. Returns the
    /// route's consumer (group `route.<name>`, a fallback handler that forwards) to tune and
    /// start like any other; it starts at the earliest message of each topic (a route forwards
    /// everything; where its group already exists it goes on from where it was), unless told
    /// otherwise with [`start`](ConsumerBuilder::start). The
    /// forwarded message keeps its type, payload (compressed again by the target's setting),
    /// headers, time to live, content type and schema version, and gains `relq-routed-from:
    /// <topic>/<id>` and a hop count: a message that has passed through 8 routes (a loop) is a
    /// permanent failure (category `route_loop`) instead.
    ///
    /// # Errors
    /// An invalid name, pattern or target, no target, or a target the pattern matches.
    pub fn route(&self, name: &str, from: &str, to: &[&str]) -> Result<ConsumerBuilder> {
        crate::route::route(self, name, from, to)
    }

    /// Publishes a message prepared elsewhere (a route's forward): the target topic's
    /// compression applies; its headers are not checked against the reserved prefix.
    pub(crate) async fn publish_outgoing(
        &self,
        topic: &str,
        mut out: relq_core::Outgoing,
    ) -> Result<MessageId> {
        validate_name("topic", topic)?;
        if let Some(c) = self.topics.get(topic).and_then(|s| s.compression) {
            if out.payload.len() >= c.min_size
                && !out.headers.contains_key(relq_core::HEADER_ENCODING)
            {
                let done =
                    compression::compress_stored(&mut out.payload, &mut out.headers, c.algorithm)?;
                count_compression(topic, &[done]);
            }
        }
        let ids = self.store(topic, vec![out]).await?;
        self.only_id(ids)
    }

    /// Starts building a consumer of `topic` in `group`.
    pub fn consumer(&self, topic: &str, group: &str) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone(), topic, group)
    }

    /// Stops message `id` for every group of `topic`: it is held back, neither processed nor lost,
    /// until [`resume_message`](Self::resume_message). A delivery already running finishes.
    ///
    /// # Errors
    /// The topic does not exist, or the backend failed.
    pub async fn stop_message(&self, topic: &str, id: MessageId) -> Result<()> {
        validate_name("topic", topic)?;
        if self.backend.stop_message(topic, id).await? {
            Ok(())
        } else {
            Err(Error::NotFound(NotFound::Topic(topic.to_owned())))
        }
    }

    /// Makes a stopped message deliverable again. Returns whether it was stopped.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool> {
        validate_name("topic", topic)?;
        Ok(self.backend.resume_message(topic, id).await?)
    }

    /// Terminates `topic`: removes its messages, groups, pending and scheduled state and dead
    /// letters. Its running consumers stop with [`StopReason::TopicTerminated`](crate::StopReason).
    /// Returns whether it existed.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn terminate(&self, topic: &str) -> Result<bool> {
        validate_name("topic", topic)?;
        Ok(self.backend.terminate(topic).await?)
    }

    /// Creates consumer group `group` on `topic` (and the topic, if needed) at `start`, before
    /// any consumer joins it: from then on the group keeps every message published after its
    /// start position for its consumers. Returns false, changing nothing, if the group exists.
    ///
    /// # Errors
    /// An invalid name, or the backend failed.
    pub async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        Ok(self.backend.create_group(topic, group, start).await?)
    }

    /// Deletes consumer group `group` of `topic` with its position and its pending, scheduled
    /// and stopped entries; the messages stay for the other groups. Its running consumers stop
    /// with [`StopReason::GroupDeleted`](crate::StopReason). Returns whether it existed.
    ///
    /// # Errors
    /// An invalid name, or the backend failed.
    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<bool> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        Ok(self.backend.delete_group(topic, group).await?)
    }

    /// Moves consumer group `group` of `topic` so the next new message it reads is the first at
    /// `to`: forward skips a backlog, back delivers messages again (replays them; those the group
    /// holds pending, scheduled or stopped are not delivered twice). Running consumers go on
    /// from the new position. Returns false if the group does not exist.
    ///
    /// # Errors
    /// An invalid name, or the backend failed.
    pub async fn move_group(&self, topic: &str, group: &str, to: StartPosition) -> Result<bool> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        Ok(self.backend.move_group(topic, group, to).await?)
    }

    /// Removes messages of `topic` that every group acknowledged and that are older than the
    /// retention's minimum age; applies its max length.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn cleanup(&self, topic: &str, retention: &Retention) -> Result<CleanupReport> {
        validate_name("topic", topic)?;
        Ok(self.backend.cleanup(topic, retention).await?)
    }

    /// Runs [`cleanup`](Self::cleanup) and expired dead-letter purging every `interval` until the
    /// returned task is dropped or aborted.
    pub fn spawn_cleanup(
        &self,
        topic: &str,
        retention: Retention,
        interval: Duration,
    ) -> CleanupTask {
        let broker = self.clone();
        let topic = topic.to_owned();
        let task = tokio::spawn(async move {
            // A zero period would panic in tokio; an interval below a millisecond is a busy loop.
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match broker.cleanup(&topic, &retention).await {
                    Ok(r) => tracing::debug!(
                        topic,
                        removed = r.removed,
                        trimmed = r.trimmed_unacknowledged,
                        "cleanup"
                    ),
                    Err(e) => tracing::warn!(topic, error = %e, "cleanup failed"),
                }
                if let Err(e) = broker.dead_letters(&topic).purge_expired().await {
                    tracing::warn!(topic, error = %e, "dead-letter purge failed");
                }
            }
        });
        CleanupTask(task)
    }

    /// All topic names.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn topics(&self) -> Result<Vec<String>> {
        Ok(self.backend.topics().await?)
    }

    /// A topic's length, groups, pending, lag, scheduled and dead-letter counts.
    ///
    /// # Errors
    /// The topic does not exist, or the backend failed.
    pub async fn topic_info(&self, topic: &str) -> Result<TopicInfo> {
        validate_name("topic", topic)?;
        self.backend
            .topic_info(topic)
            .await?
            .ok_or_else(|| Error::NotFound(NotFound::Topic(topic.to_owned())))
    }

    /// A page of `topic`'s stored messages, read without joining a group: nothing is delivered
    /// or changed. Page on with `query.after(last.id)` (or `before` when newest first).
    /// Compressed payloads are shown decompressed; one that does not decompress is shown as
    /// stored, its `relq-encoding` header kept.
    ///
    /// # Errors
    /// The topic does not exist, or the backend failed.
    pub async fn browse(&self, topic: &str, query: &Browse) -> Result<Vec<Message>> {
        validate_name("topic", topic)?;
        let mut page = self
            .backend
            .browse(topic, query)
            .await?
            .ok_or_else(|| Error::NotFound(NotFound::Topic(topic.to_owned())))?;
        let shared: Arc<str> = Arc::from(topic);
        let mut budget = READ_DECODE_BUDGET;
        for m in &mut page {
            shown(m, self.max_payload, &mut budget);
            m.set_topic(shared.clone());
        }
        Ok(page)
    }

    /// One stored message of `topic` by id.
    ///
    /// # Errors
    /// The topic or the message does not exist (any more), or the backend failed.
    pub async fn message(&self, topic: &str, id: MessageId) -> Result<Message> {
        // The newest message below the id just above it (ids order by (ms, seq) everywhere; the
        // embedded engine reads only `seq`, its offset).
        let above = match id.seq.checked_add(1) {
            Some(seq) => MessageId::new(id.ms, seq),
            None => MessageId::new(id.ms.saturating_add(1), 0),
        };
        let query = Browse::newest().before(above).limit(1);
        match self.browse(topic, &query).await?.into_iter().next() {
            Some(m) if m.id == id => Ok(m),
            _ => Err(Error::NotFound(NotFound::Message {
                topic: topic.to_owned(),
                id,
            })),
        }
    }

    /// Stops sharing the backend with other processes after answering their requests in flight
    /// (the embedded engine's admin socket: other processes reach a directory this one holds
    /// through it). Call it before the process exits; the broker keeps working in this process.
    pub async fn close(&self) {
        self.backend.close().await;
    }

    /// Whether the backend can do its work now (reachable, not poisoned, with room); never
    /// fails: a failed check is part of the report.
    pub async fn health(&self) -> Health {
        self.backend.health().await
    }

    /// Where message `id` stands in each group of `topic`: unread, pending (with its consumer and
    /// delivery count), scheduled (with its due time), stopped, or done.
    ///
    /// # Errors
    /// The topic or the message does not exist, or the backend failed.
    pub async fn locate(&self, topic: &str, id: MessageId) -> Result<Vec<GroupPlacement>> {
        validate_name("topic", topic)?;
        // Only a stored message has a place (backends may look at part of the id only).
        self.message(topic, id).await?;
        self.backend
            .locate(topic, id)
            .await?
            .ok_or_else(|| Error::NotFound(NotFound::Topic(topic.to_owned())))
    }

    /// Replays dead letter `id` of `topic` with a corrected payload (an operator's fix):
    /// publishes its message again with `payload` instead of the stored one, its type and
    /// headers, the replay headers and [`HEADER_EDITED`](crate::HEADER_EDITED), then deletes the
    /// dead letter. The publish comes first: a failure (or crash) between the two leaves the
    /// new message and the dead letter, never neither. Returns the new message's id.
    ///
    /// # Errors
    /// An invalid topic, a payload over the limit, no such dead letter, or the backend failed.
    pub async fn replay_edited(
        &self,
        topic: &str,
        id: DeadLetterId,
        payload: impl Into<bytes::Bytes>,
    ) -> Result<MessageId> {
        validate_name("topic", topic)?;
        let payload = payload.into();
        if payload.len() > self.max_payload {
            return Err(Error::PayloadTooLarge {
                size: payload.len(),
                max: self.max_payload,
            });
        }
        let dl = self.dead_letters(topic).get(id).await?;
        let mut out = relq_core::replay_message(&dl);
        out.payload = payload;
        // The operator's payload is stored as given.
        out.headers.remove(relq_core::HEADER_ENCODING);
        out.headers
            .insert(relq_core::HEADER_EDITED.to_owned(), "true".to_owned());
        let new = self
            .backend
            .publish(topic, vec![out])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::Backend(BackendError::new(
                    self.backend.name(),
                    BackendErrorKind::Corrupt,
                    "a publish of one message returned no id",
                ))
            })?;
        self.backend.delete_dead_letters(topic, &[id]).await?;
        metrics::counter!("relq_replayed_total", "topic" => topic.to_owned()).increment(1);
        Ok(new)
    }

    /// The dead letters of `topic`.
    pub fn dead_letters(&self, topic: &str) -> DeadLetters {
        DeadLetters {
            backend: self.backend.clone(),
            topic: topic.to_owned(),
            suggestions: self.suggestions.clone(),
            max_payload: self.max_payload,
        }
    }
}

/// Counts payload bytes before compression and as stored, per algorithm: every payload
/// compression was tried on (one kept as it was counts the same on both sides), so `output /
/// input` is the ratio the topic gets.
fn count_compression(topic: &str, done: &[compression::Compressed]) {
    let mut sums: Vec<(Compression, u64, u64)> = Vec::new();
    for c in done {
        match sums.iter_mut().find(|s| s.0 == c.algorithm) {
            Some(s) => {
                s.1 += c.before as u64;
                s.2 += c.after as u64;
            }
            None => sums.push((c.algorithm, c.before as u64, c.after as u64)),
        }
    }
    for (algorithm, before, after) in sums {
        let labels = [
            ("topic", topic.to_owned()),
            ("algorithm", algorithm.as_str().to_owned()),
        ];
        metrics::counter!("relq_compression_input_bytes_total", &labels).increment(before);
        metrics::counter!("relq_compression_output_bytes_total", &labels).increment(after);
    }
}

/// The most one read (a page of messages or dead letters) decompresses in all: a page of small
/// stored payloads must not expand into gigabytes. Past it, payloads are shown as stored.
const READ_DECODE_BUDGET: usize = 64 << 20;

/// A stored message as the read operations show it: decompressed if it was stored compressed
/// and decompresses within `limit` and what is left of the read's `budget`, else as stored (its
/// `relq-encoding` header says how).
fn shown(m: &mut Message, limit: usize, budget: &mut usize) {
    if compression::is_encoded(m) {
        match compression::decode_message(m, limit.min(*budget)) {
            Ok(()) => *budget -= m.payload.len(),
            Err(e) => {
                tracing::debug!(id = %m.id, error = %e, "a stored payload is shown as stored")
            }
        }
    }
}

/// The URL schemes of the Redis backend.
const REDIS_SCHEMES: [&str; 4] = ["redis", "rediss", "redis+cluster", "rediss+cluster"];

/// The error for a URL whose backend this build of relq does not include.
#[cfg(any(not(feature = "embedded"), not(feature = "redis")))]
fn not_compiled_in(url: &str, backend: &str, feature: &str) -> Error {
    Error::UnsupportedUrl {
        url: url.to_owned(),
        reason: format!("this build of relq has no {backend}: enable relq's `{feature}` feature"),
    }
}

/// A periodic cleanup started by [`Broker::spawn_cleanup`]; dropping it stops it.
#[derive(Debug)]
#[must_use = "dropping the task stops the cleanup"]
pub struct CleanupTask(tokio::task::JoinHandle<()>);

impl Drop for CleanupTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Dead-letter operations on one topic.
#[derive(Clone)]
pub struct DeadLetters {
    backend: Arc<dyn Backend>,
    topic: String,
    suggestions: SharedSuggestions,
    max_payload: usize,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("backend", &self.backend.name())
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetters {
    /// One page of dead letters matching `query`, oldest first. Continue with
    /// `query.after(last.id)`. Compressed payloads are shown decompressed where they decompress
    /// (a replay republishes the stored bytes).
    ///
    /// # Errors
    /// The backend failed.
    pub async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        validate_name("topic", &self.topic)?;
        let mut page = self.backend.dead_letters(&self.topic, query).await?;
        if page.is_empty() {
            self.exists().await?;
        }
        let mut budget = READ_DECODE_BUDGET;
        for d in &mut page {
            shown(&mut d.message, self.max_payload, &mut budget);
        }
        Ok(page)
    }

    /// An empty answer for a topic that does not exist is "not found", not "none".
    async fn exists(&self) -> Result<()> {
        match self.backend.topic_info(&self.topic).await? {
            Some(_) => Ok(()),
            None => Err(Error::NotFound(NotFound::Topic(self.topic.clone()))),
        }
    }

    /// One dead letter.
    ///
    /// # Errors
    /// It does not exist, or the backend failed.
    pub async fn get(&self, id: DeadLetterId) -> Result<DeadLetter> {
        validate_name("topic", &self.topic)?;
        let mut d = self
            .backend
            .dead_letter(&self.topic, id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(NotFound::DeadLetter {
                    topic: self.topic.clone(),
                    id,
                })
            })?;
        let mut budget = READ_DECODE_BUDGET;
        shown(&mut d.message, self.max_payload, &mut budget);
        Ok(d)
    }

    /// How many dead letters match `query`'s filters.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn count(&self, query: &DeadLetterQuery) -> Result<u64> {
        let mut n = 0;
        self.for_each_page(query, |page| n += page.len() as u64)
            .await?;
        Ok(n)
    }

    async fn for_each_page(
        &self,
        query: &DeadLetterQuery,
        mut f: impl FnMut(&[DeadLetter]),
    ) -> Result<()> {
        validate_name("topic", &self.topic)?;
        let mut q = query.clone().limit(500);
        loop {
            let page = self.backend.dead_letters(&self.topic, &q).await?;
            f(&page);
            match page.last() {
                Some(last) if page.len() == q.page_size() => q = q.after(last.id),
                _ => return Ok(()),
            }
        }
    }

    /// Replays dead letters back to the topic: each becomes a new message with a fresh attempt
    /// budget, headers marking the replay, delivered only to the group that gave up on it.
    /// Returns (dead letter, new message id) for each that existed.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn replay(&self, ids: &[DeadLetterId]) -> Result<Vec<(DeadLetterId, MessageId)>> {
        validate_name("topic", &self.topic)?;
        // Each dead letter once, however often it is named.
        let mut unique = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        unique.extend(ids.iter().copied().filter(|id| seen.insert(*id)));
        let done = self
            .backend
            .replay_dead_letters(&self.topic, &unique)
            .await?;
        metrics::counter!("relq_replayed_total", "topic" => self.topic.clone())
            .increment(done.len() as u64);
        Ok(done)
    }

    /// Replays every dead letter matching `query`'s filters.
    ///
    /// # Errors
    /// The backend failed; what was replayed before stays replayed.
    pub async fn replay_matching(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<Vec<(DeadLetterId, MessageId)>> {
        let mut ids = Vec::new();
        self.for_each_page(query, |page| ids.extend(page.iter().map(|d| d.id)))
            .await?;
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            out.extend(self.replay(chunk).await?);
        }
        Ok(out)
    }

    /// Deletes dead letters; returns how many existed.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn delete(&self, ids: &[DeadLetterId]) -> Result<u64> {
        validate_name("topic", &self.topic)?;
        Ok(self.backend.delete_dead_letters(&self.topic, ids).await?)
    }

    /// Deletes dead letters whose last failure is older than `age`.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64> {
        self.purge_before(Timestamp::now().minus(age)).await
    }

    /// Deletes dead letters whose last failure is before `before` (what a count with
    /// `DeadLetterQuery::all().between(None, Some(before))` previewed).
    ///
    /// # Errors
    /// The backend failed.
    pub async fn purge_before(&self, before: Timestamp) -> Result<u64> {
        validate_name("topic", &self.topic)?;
        Ok(self.backend.purge_dead_letters(&self.topic, before).await?)
    }

    /// Deletes dead letters older than the default retention of 30 days.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn purge_expired(&self) -> Result<u64> {
        self.purge_older_than(DEFAULT_DEAD_LETTER_RETENTION).await
    }

    /// The matching dead letters grouped by error fingerprint (see [`fingerprint`](crate::fingerprint)), most
    /// frequent first, each with its counts by type, handler, group and category, first and
    /// last seen, sample ids, and the suggestion for its most common category. Reads every
    /// matching dead letter (in pages): narrow `query` on a topic with millions.
    ///
    /// # Errors
    /// The topic does not exist, or the backend failed.
    pub async fn failure_groups(&self, query: &DeadLetterQuery) -> Result<Vec<FailureGroup>> {
        let mut all = Vec::new();
        self.for_each_page(query, |page| all.extend_from_slice(page))
            .await?;
        if all.is_empty() {
            self.exists().await?;
        }
        Ok(analysis::group(&all, &self.suggestions))
    }

    /// What to check for this dead letter's failure category (or its reason), and whether a
    /// replay is likely to succeed.
    pub fn suggestion(&self, dead_letter: &DeadLetter) -> Option<Suggestion> {
        self.suggestions.for_dead_letter(dead_letter).cloned()
    }

    /// Counts by reason, message type and error category.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn stats(&self) -> Result<DeadLetterStats> {
        validate_name("topic", &self.topic)?;
        let stats = self.backend.dead_letter_stats(&self.topic).await?;
        if stats.total == 0 {
            self.exists().await?;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `connect` says about a URL whose backend this build lacks (CI builds the library
    /// without its backend features too, so both sides of each `cfg` run).
    fn refusal(url: &str) -> Option<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        match rt.block_on(Broker::connect(url)) {
            Err(Error::UnsupportedUrl { reason, .. }) => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn a_url_names_the_feature_its_backend_needs_when_it_is_not_compiled_in() {
        let dir = std::env::temp_dir().join(format!("relq-connect-{}", fastrand::u64(..)));
        let file = refusal(&format!("file://{}", dir.display()));
        if cfg!(feature = "embedded") {
            assert_eq!(file, None, "the embedded engine opens {}", dir.display());
        } else {
            let reason = file.expect("file:// refused without the engine");
            assert!(reason.contains("`embedded` feature"), "{reason}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        // Port 1 on loopback: nothing listens, so a compiled-in backend fails to connect
        // (another error), and a missing one is refused before any connection.
        let redis = refusal("redis://127.0.0.1:1");
        if cfg!(feature = "redis") {
            assert_eq!(redis, None);
        } else {
            let reason = redis.expect("redis:// refused without the Redis backend");
            assert!(reason.contains("`redis` feature"), "{reason}");
        }
        assert!(refusal("memory://").is_none());
        assert!(refusal("kafka://broker:9092")
            .unwrap()
            .contains("expected file:///path"));
    }
}
