//! A message to publish, and its checks before a backend sees it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use relq_core::{
    shorten, validate_headers, validate_kind, Outgoing, Timestamp, HEADER_CONTENT_TYPE,
    HEADER_EXPIRES_AT, HEADER_IDEMPOTENCY_KEY, HEADER_ORDERING_KEY, HEADER_PRIORITY,
    HEADER_SCHEMA_VERSION, MAX_IDEMPOTENCY_KEY_LEN, MAX_ORDERING_KEY_LEN, RESERVED_HEADER_PREFIX,
};
use relq_core::{Error, Result};

use crate::compression::{compress_stored, Compressed, Compression, TopicCompression};

/// A message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a message does nothing until it is published"]
pub struct NewMessage {
    pub(crate) kind: String,
    pub(crate) payload: Bytes,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) deliver_at: Option<Timestamp>,
    pub(crate) delay: Option<Duration>,
    pub(crate) expiry: Option<Expiry>,
    pub(crate) compression: Option<Compression>,
    /// Set by a typed publish ([`NewMessage::encode`]).
    pub(crate) content_type: Option<&'static str>,
    pub(crate) schema_version: Option<u32>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) ordering_key: Option<String>,
    pub(crate) priority: u8,
}

/// A topic's settings a publisher applies to each message: a time to live and a compression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TopicSettings {
    pub(crate) ttl: Option<Duration>,
    pub(crate) compression: Option<TopicCompression>,
    pub(crate) dedup_window: Option<Duration>,
    /// Priority levels (0: none).
    pub(crate) priorities: u8,
}

/// The most priority levels a topic can have.
pub const MAX_PRIORITIES: u8 = 10;

/// The topic that stores `topic`'s messages of priority `level`: `topic` itself for level 0,
/// `<topic>.priority-<level>` above it. Each level is a topic of its own on every backend (its
/// groups, dead letters and retention are its own), so a consumer asks the levels in turn
/// instead of skipping over low ones in one log.
pub fn priority_topic(topic: &str, level: u8) -> String {
    match level {
        0 => topic.to_owned(),
        l => format!("{topic}.priority-{l}"),
    }
}

/// How long a topic remembers an idempotency key unless configured otherwise
/// ([`Broker::with_topic_dedup_window`](crate::Broker::with_topic_dedup_window)): two minutes.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// When a message expires: at a time, or a time to live counted from its publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expiry {
    At(Timestamp),
    After(Duration),
}

impl NewMessage {
    /// A message of type `kind` (which routes it to a handler) carrying `payload`.
    pub fn new(kind: impl Into<String>, payload: impl Into<Bytes>) -> NewMessage {
        NewMessage {
            kind: kind.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
            deliver_at: None,
            delay: None,
            expiry: None,
            compression: None,
            content_type: None,
            schema_version: None,
            idempotency_key: None,
            ordering_key: None,
            priority: 0,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> NewMessage {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Delivers the message at or after `at`.
    pub fn deliver_at(mut self, at: Timestamp) -> NewMessage {
        self.deliver_at = Some(at);
        self
    }

    /// Delivers the message at or after `delay` from the moment it is published.
    pub fn delay(mut self, delay: Duration) -> NewMessage {
        self.delay = Some(delay);
        self
    }

    /// A time to live, counted from the moment it is published: a consumer that takes it later
    /// does not handle it, and it becomes a dead letter with reason `expired` (or is dropped,
    /// as the consumer's [`OnExpired`](crate::OnExpired) says). A failed message whose next
    /// retry would fall after it goes the same way at once. Overrides the topic's TTL
    /// ([`Broker::with_topic_ttl`](crate::Broker::with_topic_ttl)). A delayed message whose
    /// time to live ends before its delivery time is never handled.
    pub fn ttl(mut self, ttl: Duration) -> NewMessage {
        self.expiry = Some(Expiry::After(ttl));
        self
    }

    /// Expires at `at` (see [`ttl`](Self::ttl)).
    pub fn expires_at(mut self, at: Timestamp) -> NewMessage {
        self.expiry = Some(Expiry::At(at));
        self
    }

    /// Stores the payload compressed with `algorithm`, whatever its size, unless that would not
    /// make it smaller. Consumers decompress it before their handlers see it. Overrides the
    /// topic's compression ([`Broker::with_topic_compression`](crate::Broker::with_topic_compression)).
    pub fn compress(mut self, algorithm: Compression) -> NewMessage {
        self.compression = Some(algorithm);
        self
    }

    /// Publishes it at most once per `key` within the topic's deduplication window (two
    /// minutes unless [`Broker::with_topic_dedup_window`](crate::Broker::with_topic_dedup_window)
    /// says otherwise): when the topic stored a message with this key within the window, the
    /// publish stores nothing and returns that message's id. So a publisher that retries after
    /// a timeout or a crash, not knowing whether its publish landed, stores the message once.
    /// The check and the append are one atomic step on every backend, and the key survives a
    /// restart of the embedded engine. The key is the message's `relq-idempotency-key` header,
    /// which handlers see (and [`skip_processed`](crate::ConsumerBuilder::skip_processed)
    /// uses). At most 512 bytes, no control characters; a publish with an invalid key fails.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> NewMessage {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Orders it by `key` within every consumer group: the messages of one key are handled one
    /// at a time, in publish order, across every consumer process of a group, while different
    /// keys run in parallel (like a Kafka partition key, without partitions). A message waits,
    /// unread by any handler, while an earlier one of its key is being handled, waits for a
    /// retry (unless the consumer's [`KeyRetries`](crate::KeyRetries) says to skip ahead), or is
    /// stopped; a dead letter lets the key go on. A consumer that dies with a key's message
    /// leaves it pending, so another consumer claims it (after its claim time) before the key
    /// goes on. The key is the message's `relq-ordering-key` header; at most 512 bytes, no
    /// control characters. A replayed dead letter keeps the key but is a new message, ordered
    /// after those published before the replay.
    pub fn ordering_key(mut self, key: impl Into<String>) -> NewMessage {
        self.ordering_key = Some(key.into());
        self
    }

    /// Publishes it at priority `level` (0, the default, is the lowest) on a topic with
    /// priority levels ([`Broker::with_topic_priorities`](crate::Broker::with_topic_priorities),
    /// config `[[topics]] priorities`): a consumer of the topic takes higher levels first, by
    /// weight, so a lower level still gets its share. The message is stored on the level's
    /// topic ([`priority_topic`](crate::priority_topic)) with a `relq-priority` header. A
    /// level the topic does not have is refused at publish.
    pub fn priority(mut self, level: u8) -> NewMessage {
        self.priority = level;
        self
    }

    /// The message type.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }
}

impl NewMessage {
    /// The message as a backend stores it, once checked: a valid type, a payload of at most
    /// `max_payload` bytes, valid headers none of which is reserved; a delay becomes a time, and
    /// a time to live (the message's, else the topic's) the expiry header; the payload is
    /// compressed as the message or else the topic asks (the limit applies before).
    pub(crate) fn prepare(
        mut self,
        max_payload: usize,
        topic: TopicSettings,
    ) -> Result<(Outgoing, Option<Compressed>)> {
        validate_kind(&self.kind)?;
        if self.payload.len() > max_payload {
            return Err(Error::PayloadTooLarge {
                size: self.payload.len(),
                max: max_payload,
            });
        }
        if let Some(h) = self
            .headers
            .keys()
            .find(|h| h.starts_with(RESERVED_HEADER_PREFIX))
        {
            return Err(Error::ReservedHeader(shorten(h)));
        }
        validate_headers(&self.headers)?;
        // The clock is read only for a delay or a time to live (most messages have neither).
        let deliver_at = match (self.deliver_at, self.delay) {
            (Some(at), _) => Some(at),
            (None, Some(d)) => Some(Timestamp::now().plus(d)),
            (None, None) => None,
        };
        let expires_at = match self.expiry.or(topic.ttl.map(Expiry::After)) {
            Some(Expiry::At(at)) => Some(at),
            Some(Expiry::After(ttl)) => Some(Timestamp::now().plus(ttl)),
            None => None,
        };
        if let Some(at) = expires_at {
            self.headers
                .insert(HEADER_EXPIRES_AT.to_owned(), at.0.to_string());
        }
        if let Some(t) = self.content_type {
            self.headers
                .insert(HEADER_CONTENT_TYPE.to_owned(), t.to_owned());
        }
        let mut dedup_window = None;
        if let Some(key) = self.idempotency_key {
            validate_key(
                HEADER_IDEMPOTENCY_KEY,
                "idempotency",
                &key,
                MAX_IDEMPOTENCY_KEY_LEN,
            )?;
            self.headers.insert(HEADER_IDEMPOTENCY_KEY.to_owned(), key);
            dedup_window = Some(topic.dedup_window.unwrap_or(DEFAULT_DEDUP_WINDOW));
        }
        if let Some(key) = self.ordering_key {
            validate_key(HEADER_ORDERING_KEY, "ordering", &key, MAX_ORDERING_KEY_LEN)?;
            self.headers.insert(HEADER_ORDERING_KEY.to_owned(), key);
        }
        if self.priority > 0 {
            self.headers
                .insert(HEADER_PRIORITY.to_owned(), self.priority.to_string());
        }
        if let Some(v) = self.schema_version {
            self.headers
                .insert(HEADER_SCHEMA_VERSION.to_owned(), v.to_string());
        }
        let algorithm = self.compression.or(match topic.compression {
            Some(c) if self.payload.len() >= c.min_size => Some(c.algorithm),
            _ => None,
        });
        let compressed = match algorithm {
            Some(a) => Some(compress_stored(&mut self.payload, &mut self.headers, a)?),
            None => None,
        };
        Ok((
            Outgoing {
                kind: self.kind,
                payload: self.payload,
                headers: self.headers,
                deliver_at,
                dedup_window,
            },
            compressed,
        ))
    }
}

/// An idempotency or ordering key (the header `name`): 1 to `max` bytes, no control characters.
fn validate_key(name: &str, what: &str, key: &str, max: usize) -> Result<()> {
    let bad = |why: String| Error::InvalidHeader {
        name: name.to_owned(),
        reason: format!("the {what} key {:?} is invalid: {why}", shorten(key)),
    };
    if key.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if key.len() > max {
        return Err(bad(format!(
            "it is {} bytes, over the limit of {max}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(bad("it contains a control character".into()));
    }
    Ok(())
}
