//! The message model: ids, timestamps, names, and messages as published and as delivered.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, NameError};

/// Milliseconds since the Unix epoch.
///
/// relq reads time through [`Timestamp::now`], which follows tokio's clock: in a test that calls
/// `tokio::time::pause()`, retry delays, claim timeouts and delayed publishes advance with the
/// paused clock, so they can be tested without sleeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current time: the wall clock read once, advanced by tokio's clock, and moved along
    /// whenever the wall clock steps away from that by more than a second. So a process
    /// that started before NTP stepped the clock, or a VM that was suspended, does not carry a
    /// stale offset into due times and publish times that other processes compare with theirs,
    /// and under `tokio::time::pause()` time stands exactly still and jumps with the paused
    /// clock (the wall clock and the real monotonic clock move together meanwhile: no step).
    pub fn now() -> Timestamp {
        let (wall0, real0, tokio0) = anchor();
        let tokio_ms = tokio::time::Instant::now()
            .saturating_duration_since(tokio0)
            .as_millis() as i64;
        let real_ms = real0.elapsed().as_millis() as i64;
        let mut shift = SHIFT_MS.load(Ordering::Relaxed);
        if let Some(s) = restep(wall0, real_ms, wall_ms(), shift) {
            SHIFT_MS.store(s, Ordering::Relaxed);
            shift = s;
        }
        Timestamp(u64::try_from(wall0 + shift + tokio_ms).unwrap_or(0))
    }

    /// The time at `instant` (of tokio's clock) as [`Timestamp::now`] gives it, without reading
    /// the wall clock again: a clock step since the last `now` is not noticed. For hot paths
    /// that hold an instant already (the consumer runtime's per-message metrics).
    #[doc(hidden)]
    pub fn at(instant: tokio::time::Instant) -> Timestamp {
        let (wall0, _, tokio0) = anchor();
        let tokio_ms = instant.saturating_duration_since(tokio0).as_millis() as i64;
        let shift = SHIFT_MS.load(Ordering::Relaxed);
        Timestamp(u64::try_from(wall0 + shift + tokio_ms).unwrap_or(0))
    }

    /// The latest time relq computes: 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can
    /// write. A delay of [`Duration::MAX`] means "this far", not an overflow.
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999);

    /// This timestamp plus `d`, saturating at [`Timestamp::MAX`].
    pub fn plus(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms).min(Timestamp::MAX.0.max(self.0)))
    }

    /// This timestamp minus `d`, saturating at the epoch.
    pub fn minus(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_sub(ms))
    }

    /// How long after `earlier` this timestamp is (zero if it is not after it).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// As a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

/// [`Timestamp::now`]'s anchor: the wall clock, the real monotonic clock and tokio's clock, read
/// together once.
fn anchor() -> (i64, std::time::Instant, tokio::time::Instant) {
    static ANCHOR: OnceLock<(i64, std::time::Instant, tokio::time::Instant)> = OnceLock::new();
    *ANCHOR.get_or_init(|| {
        (
            wall_ms(),
            std::time::Instant::now(),
            tokio::time::Instant::now(),
        )
    })
}

/// How far [`Timestamp::now`] has moved its anchor's wall clock along with clock steps.
static SHIFT_MS: AtomicI64 = AtomicI64::new(0);

/// Wall-clock steps larger than this move [`Timestamp::now`] along with the wall clock.
const CLOCK_STEP_MS: i64 = 1000;

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The new shift of [`Timestamp::now`]'s anchor if the wall clock (`wall`) is more than
/// [`CLOCK_STEP_MS`] away from the anchor's `wall0` plus the real time elapsed plus the shift
/// so far.
fn restep(wall0: i64, real_elapsed: i64, wall: i64, shift: i64) -> Option<i64> {
    let drift = wall - (wall0 + real_elapsed + shift);
    (drift.abs() > CLOCK_STEP_MS).then_some(shift + drift)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self > Timestamp::MAX {
            // Only from stored data relq did not write; RFC 3339 has no year past 9999.
            return write!(f, "{} ms after the Unix epoch", self.0);
        }
        write!(
            f,
            "{}",
            humantime::format_rfc3339_millis(self.to_system_time())
        )
    }
}

/// `from + d`, or a point ~30 years after `from` when `d` is too large to add (a deadline of
/// [`Duration::MAX`] means "never", not a panic).
#[doc(hidden)]
pub fn instant_after(from: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    from.checked_add(d.min(FAR)).unwrap_or(from)
}

/// A message id, ordered within a topic: `<milliseconds>-<sequence>`, the form Redis Streams uses,
/// on every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    /// Milliseconds since the epoch at which the backend assigned the id.
    pub ms: u64,
    /// Sequence number within that millisecond.
    pub seq: u64,
}

impl MessageId {
    /// The smallest id; no message has it.
    pub const ZERO: MessageId = MessageId { ms: 0, seq: 0 };

    /// Creates an id from its two parts.
    pub const fn new(ms: u64, seq: u64) -> MessageId {
        MessageId { ms, seq }
    }

    /// The id that follows `self` in a topic where ids are assigned at `now_ms`.
    pub fn next_after(self, now_ms: u64) -> MessageId {
        if now_ms > self.ms {
            MessageId::new(now_ms, 0)
        } else {
            MessageId::new(self.ms, self.seq + 1)
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for MessageId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || Error::InvalidId(s.to_owned());
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        Ok(MessageId::new(
            ms.parse().map_err(|_| bad())?,
            seq.parse().map_err(|_| bad())?,
        ))
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest topic, group or consumer name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest message type.
pub const MAX_KIND_LEN: usize = 256;

/// Checks a topic, group or consumer name: 1 to 128 characters from `A-Z a-z 0-9 _ - .`.
///
/// The character set keeps names safe as Redis key parts (no `{`, `}` or `:`), file names and URL
/// path segments.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    let err = |reason: &'static str| NameError {
        what,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(err("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(err("it is longer than 128 bytes"));
    }
    if name.starts_with('.') {
        return Err(err("it starts with '.'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(err("only letters, digits, '_', '-' and '.' are allowed"));
    }
    Ok(())
}

/// Checks a message type: 1 to [`MAX_KIND_LEN`] bytes, no whitespace or control characters.
pub fn validate_kind(kind: &str) -> Result<(), NameError> {
    let err = |reason: &'static str| NameError {
        what: "message type",
        name: kind.to_owned(),
        reason,
    };
    if kind.is_empty() {
        return Err(err("it is empty"));
    }
    if kind.len() > MAX_KIND_LEN {
        return Err(err("it is longer than 256 bytes"));
    }
    if kind.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(err("it contains whitespace or control characters"));
    }
    Ok(())
}

/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Most reserved `relq-` headers on one message, on top of [`MAX_HEADERS`].
pub const MAX_RESERVED_HEADERS: usize = 16;
/// Longest header name.
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// Longest header value.
pub const MAX_HEADER_VALUE_LEN: usize = 16 * 1024;

/// Checks a message's headers against the limits every backend stores: at most [`MAX_HEADERS`]
/// of the publisher's own (relq's reserved `relq-` headers, such as a replay's or an expiry's,
/// come on top, at most [`MAX_RESERVED_HEADERS`] of them), names of 1 to
/// [`MAX_HEADER_NAME_LEN`] bytes without control characters, values of at most
/// [`MAX_HEADER_VALUE_LEN`] bytes.
pub fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), Error> {
    let err = |name: &str, reason: String| Error::InvalidHeader {
        name: shorten(name),
        reason,
    };
    let reserved = headers
        .keys()
        .filter(|k| k.starts_with(RESERVED_HEADER_PREFIX))
        .count();
    let own = headers.len() - reserved;
    if own > MAX_HEADERS {
        return Err(err(
            "",
            format!("{own} headers exceed the limit of {MAX_HEADERS}"),
        ));
    }
    if reserved > MAX_RESERVED_HEADERS {
        return Err(err(
            "",
            format!("{reserved} relq- headers exceed the limit of {MAX_RESERVED_HEADERS}"),
        ));
    }
    for (k, v) in headers {
        if k.is_empty() {
            return Err(err(k, "a header name must not be empty".into()));
        }
        if k.len() > MAX_HEADER_NAME_LEN {
            return Err(err(
                k,
                format!(
                    "the name is {} bytes, over the limit of {MAX_HEADER_NAME_LEN}",
                    k.len()
                ),
            ));
        }
        if k.chars().any(char::is_control) {
            return Err(err(k, "the name contains control characters".into()));
        }
        if v.len() > MAX_HEADER_VALUE_LEN {
            return Err(err(
                k,
                format!(
                    "the value is {} bytes, over the limit of {MAX_HEADER_VALUE_LEN}",
                    v.len()
                ),
            ));
        }
    }
    Ok(())
}

/// A name as shown in an error: at most 64 characters, so a hostile 10 KB input is not echoed
/// back whole.
#[doc(hidden)]
pub fn shorten(s: &str) -> String {
    const SHOWN: usize = 64;
    if s.chars().count() <= SHOWN {
        return s.to_owned();
    }
    let head: String = s.chars().take(SHOWN).collect();
    format!("{head}... ({} bytes)", s.len())
}

/// Header names starting with this prefix are reserved for relq.
pub const RESERVED_HEADER_PREFIX: &str = "relq-";
/// Header set on a replayed dead letter: the id of the dead letter it came from.
pub const HEADER_REPLAY_OF: &str = "relq-replay-of";
/// Header set on a replayed dead letter: the id of the original message.
pub const HEADER_ORIGINAL_ID: &str = "relq-original-id";
/// Header set on a replayed dead letter: the only group that should process it. Other groups of
/// the topic acknowledge it without running a handler.
pub const HEADER_REPLAY_GROUP: &str = "relq-replay-group";
/// On a message replayed with an operator's corrected payload (relq's `Broker::replay_edited`):
/// `true`.
pub const HEADER_EDITED: &str = "relq-edited";
/// On a message with a time to live: when it expires, in milliseconds since the epoch. A
/// consumer does not handle a message past it: the message becomes a dead letter with reason
/// `expired`, or is dropped (counted either way). A replay removes it.
pub const HEADER_EXPIRES_AT: &str = "relq-expires-at";
/// On a message a route forwarded: where it came from, `<topic>/<id>`.
pub const HEADER_ROUTED_FROM: &str = "relq-routed-from";
/// On a message a route forwarded: how many routes it has passed through. A route refuses a
/// message that has passed through 8 (a loop of routes), as a permanent failure.
pub const HEADER_ROUTE_HOPS: &str = "relq-route-hops";
/// On a message stored compressed: the algorithm (`lz4`, `gzip` or `zstd`). A consumer
/// decompresses the payload before its handler sees it (and drops this header); a payload that
/// does not decompress is a permanent failure with category `decode`, its stored bytes kept in
/// the dead letter.
pub const HEADER_ENCODING: &str = "relq-encoding";
/// On a message published typed: how its payload is encoded (`application/json`,
/// `application/msgpack`, `application/protobuf`). A typed handler refuses a payload of another
/// content type (a permanent failure with category `decode`).
pub const HEADER_CONTENT_TYPE: &str = "relq-content-type";
/// On a message published typed with a schema version: the version, a positive integer. A typed
/// handler upgrades an older version with the function registered for it.
pub const HEADER_SCHEMA_VERSION: &str = "relq-schema-version";
/// On a message published with an idempotency key: the key. Within the topic's deduplication
/// window a second publish with the same key stores nothing and returns the first one's id (see
/// [`Outgoing::dedup_window`]).
pub const HEADER_IDEMPOTENCY_KEY: &str = "relq-idempotency-key";
/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 512;
/// On a message published with an ordering key: the key. Within a group, messages with the same
/// key are handled one at a time, in publish order, across every consumer of the group; a
/// message waits (unread by any handler) while an earlier one of its key is delivered, waiting
/// for a retry, or stopped. Different keys run in parallel.
pub const HEADER_ORDERING_KEY: &str = "relq-ordering-key";
/// On a message published with a priority above 0: the level (see relq's
/// `NewMessage::priority`).
pub const HEADER_PRIORITY: &str = "relq-priority";
/// The longest ordering key, in bytes.
pub const MAX_ORDERING_KEY_LEN: usize = 512;
/// The longest deduplication window: 30 days.
pub const MAX_DEDUP_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// A message as a backend stores it: what was published, with the time it becomes deliverable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The message type.
    pub kind: String,
    /// The payload.
    pub payload: Bytes,
    /// The headers.
    pub headers: BTreeMap<String, String>,
    /// Not delivered before this time.
    pub deliver_at: Option<Timestamp>,
    /// Deduplicate by the message's [`HEADER_IDEMPOTENCY_KEY`] over this window (at most
    /// [`MAX_DEDUP_WINDOW`]): when the topic stored a message with the same key less than this
    /// long ago, the publish stores nothing for this message and returns that message's id. The
    /// check and the append are one atomic step, so concurrent publishers of one key store it
    /// once. `None` or zero, or no key header (or an empty one): stored as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window: Option<Duration>,
}

impl Outgoing {
    /// Its ordering key ([`HEADER_ORDERING_KEY`]), if it has a non-empty one.
    pub fn ordering_key(&self) -> Option<&str> {
        ordering_key(&self.headers)
    }

    /// The idempotency key and window this message is deduplicated by, if any.
    pub fn dedup(&self) -> Option<(&str, Duration)> {
        let w = self.dedup_window.filter(|w| !w.is_zero())?;
        let k = self
            .headers
            .get(HEADER_IDEMPOTENCY_KEY)
            .filter(|k| !k.is_empty())?;
        Some((k.as_str(), w.min(MAX_DEDUP_WINDOW)))
    }
}

/// A message as stored in a topic and handed to handlers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// The id the backend assigned.
    pub id: MessageId,
    /// The message type, which routes it to a handler.
    pub kind: String,
    /// The payload.
    pub payload: Bytes,
    /// The headers.
    pub headers: BTreeMap<String, String>,
    /// When it was published.
    pub published_at: Timestamp,
    /// Not delivered before this time (a delayed publish).
    pub deliver_at: Option<Timestamp>,
    /// How many times this message has been delivered to this group, this delivery included.
    /// Kept by the backend, so it survives consumer restarts.
    pub attempt: u32,
    /// The topic it came from (see [`Message::topic`]); `None` costs no allocation, which
    /// matters on the per-message path.
    #[serde(skip)]
    topic: Option<std::sync::Arc<str>>,
}

impl Message {
    /// The message a backend stored as `id` from `outgoing`, published at `published_at`, in its
    /// delivery number `attempt` (1 for the first).
    pub fn new(
        id: MessageId,
        outgoing: Outgoing,
        published_at: Timestamp,
        attempt: u32,
    ) -> Message {
        Message {
            id,
            kind: outgoing.kind,
            payload: outgoing.payload,
            headers: outgoing.headers,
            published_at,
            deliver_at: outgoing.deliver_at,
            attempt,
            topic: None,
        }
    }

    /// The topic it came from: set on the messages a consumer hands to its handlers (a handler
    /// of a pattern consumer tells its topics apart by it) and on what relq's `Broker::browse`
    /// and `Broker::message` return; empty on a message read from a backend directly.
    pub fn topic(&self) -> &str {
        self.topic.as_deref().unwrap_or("")
    }

    /// Sets [`topic`](Self::topic) (relq's consumer and reads do; a shared name, no copy).
    #[doc(hidden)]
    pub fn set_topic(&mut self, topic: std::sync::Arc<str>) {
        self.topic = Some(topic);
    }

    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Its ordering key ([`HEADER_ORDERING_KEY`]), if it has a non-empty one.
    pub fn ordering_key(&self) -> Option<&str> {
        ordering_key(&self.headers)
    }

    /// When the message expires ([`HEADER_EXPIRES_AT`]), if it has a time to live. A value that
    /// is not a number of milliseconds (written by another program) counts as no expiry: the
    /// message is handled, never dropped for it.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.header(HEADER_EXPIRES_AT)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Timestamp)
    }
}

/// The ordering key among `headers`, if set and not empty (an empty one orders nothing).
pub fn ordering_key(headers: &BTreeMap<String, String>) -> Option<&str> {
    headers
        .get(HEADER_ORDERING_KEY)
        .map(String::as_str)
        .filter(|k| !k.is_empty())
}

/// Where a new consumer group starts reading a topic (applied only when the group is created;
/// an existing group keeps its position), or where `relq::Broker::move_group`
/// moves one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StartPosition {
    /// Only messages published after the group was created (the default).
    #[default]
    Latest,
    /// Every message still stored in the topic.
    Earliest,
    /// Messages with an id greater than or equal to this one.
    From(MessageId),
}

impl FromStr for StartPosition {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "latest" | "$" => Ok(StartPosition::Latest),
            "earliest" | "0" => Ok(StartPosition::Earliest),
            id => Ok(StartPosition::From(id.parse()?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_follows_wall_clock_steps_and_the_paused_clock() {
        let w0 = 1_700_000_000_000;
        // Real time and the wall clock agree, or drift by a slew: no step.
        assert_eq!(restep(w0, 10_000, w0 + 10_000, 0), None);
        assert_eq!(restep(w0, 10_000, w0 + 10_400, 0), None);
        // A step of a minute forward (NTP at boot, a resumed VM), then one back.
        assert_eq!(restep(w0, 10_000, w0 + 70_000, 0), Some(60_000));
        assert_eq!(restep(w0, 20_000, w0 + 80_000, 60_000), None);
        assert_eq!(restep(w0, 30_000, w0 + 25_000, 60_000), Some(-5_000));
        // Paused (tokio's clock stands still, real time and the wall clock go on): no step, so
        // `now` stays exactly where tokio's clock puts it.
        assert_eq!(restep(w0, 5_000, w0 + 5_000, 0), None);
    }

    #[test]
    fn id_round_trips_and_orders() {
        let a: MessageId = "1700000000000-3".parse().unwrap();
        assert_eq!(a, MessageId::new(1_700_000_000_000, 3));
        assert_eq!(a.to_string(), "1700000000000-3");
        assert!(a < MessageId::new(1_700_000_000_000, 4));
        assert!(a < MessageId::new(1_700_000_000_001, 0));
        assert!("x-1".parse::<MessageId>().is_err());
        assert!("1-".parse::<MessageId>().is_err());
        assert_eq!(a.next_after(10), MessageId::new(1_700_000_000_000, 4));
        assert_eq!(
            a.next_after(1_700_000_000_005),
            MessageId::new(1_700_000_000_005, 0)
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("topic", "orders.v1_eu-west").is_ok());
        for bad in ["", ".hidden", "a b", "a{b}", "a:b", &"x".repeat(129)] {
            let e = validate_name("topic", bad).unwrap_err();
            assert!(e.to_string().contains("topic"), "{e}");
        }
        assert!(validate_kind("order.created").is_ok());
        assert!(validate_kind("a b").is_err());
        assert!(validate_kind("").is_err());
    }
}
