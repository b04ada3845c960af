//! The Redis Streams backend (Redis 7.0 or newer, and Redis Cluster).
//!
//! # Keys
//! Every key of topic `T` starts with `relq:{T}:`; the braces make `{T}` the hash tag, so all of
//! a topic's keys live in one cluster slot and one Lua script can touch them atomically.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `relq:{T}:s` | stream | the messages; relq groups are this stream's consumer groups |
//! | `relq:{T}:meta` | hash | `epoch`: the topic's generation (set when a consumer first joins) |
//! | `relq:{T}:ended` | string | the highest terminated epoch (the terminate marker) |
//! | `relq:{T}:stop` | set | stopped message ids |
//! | `relq:{T}:dl` | stream | dead letters: fields `record` (JSON) and `data` (payload) |
//! | `relq:{T}:g:{G}:sched` | sorted set | group G's retries and delayed messages, by due ms |
//! | `relq:{T}:g:{G}:park` | set | group G's parked (stopped) messages |
//! | `relq:{T}:g:{G}:m` | hash | id → `"<deliveries> <failures JSON array>"` |
//! | `relq:{T}:g:{G}:held` | sorted set | ids in `sched` or `park`, by id ms (retention floor) |
//! | `relq:{T}:g:{G}:skip` | sorted set | after a move back: ids the group holds that a read passes over |
//! | `relq:{T}:deleted` | set | groups deleted by an operator (their consumers stop; a join clears it) |
//! | `relq:topics` | set | topic names (a registry for listing; not in the topic's slot) |
//!
//! A message is a stream entry with fields `type`, `data` (the payload bytes), optionally
//! `headers` (a JSON object of strings) and `deliver_at` (ms since the epoch), and, on the first
//! entry of a published batch, `nonce` (makes a retried publish idempotent). The id is the
//! Redis stream id. A service in another language publishes with
//! `XADD relq:{orders}:s * type order.created data <bytes>`; see `docs/design.md`.
//!
//! # Delivery
//! A delivered message is in the group's pending entries list (PEL) under its consumer, with the
//! PEL's delivery counter as its delivery count. A retry or a delayed message is acknowledged in
//! the PEL and kept in `sched`; when due, the promote script that starts every read puts it back
//! into the PEL with `XCLAIM ... FORCE RETRYCOUNT n` (so the count survives). There is no
//! separate promoter process to elect: the script runs atomically, so two readers never promote
//! the same entry. The hot paths run without Lua: publish is a MULTI/EXEC of XADDs, new messages
//! come from a plain XREADGROUP, acks of first deliveries are one XACK.

mod conn;
mod scripts;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::{RedisError, RedisResult, Script, Value};
use async_trait::async_trait;
use bytes::Bytes;

use conn::{BlockingPool, Conn, Target};
use relq_core::{
    instant_after, validate_name, Message, MessageId, Outgoing, StartPosition, Timestamp,
};
use relq_core::{
    replay_message, Backend, BackendMetric, Browse, CleanupReport, ConsumerInfo, Delivery,
    GroupInfo, GroupPlacement, Health, HealthCheck, Placement, Retention, Settlement, Subscription,
    TopicInfo,
};
use relq_core::{BackendError, BackendErrorKind, ConfigError, Limit};
use relq_core::{DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats};

const NAME: &str = "redis";
/// The set listing topic names.
const REGISTRY: &str = "relq:topics";
/// Header set on a message whose stored entry could not be decoded.
const HEADER_MALFORMED: &str = "relq-malformed";
/// The message type given to an entry without a readable `type` field; no handler is registered
/// for it unless the user does so, so it is dead-lettered with the reason in its headers.
const MALFORMED_KIND: &str = "relq.malformed";

/// Configuration of a [`RedisBackend`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisConfig {
    /// How long one command may take before it counts as failed. Default 5 s.
    pub response_timeout: Duration,
    /// How long a failing call (connection lost, timeout, server loading) is retried before the
    /// error reaches the caller. Default 30 s.
    pub retry_for: Duration,
    /// Connect even when `maxmemory-policy` lets Redis evict keys (queue data could vanish
    /// silently). Default false: such a server is refused.
    pub allow_eviction: bool,
    /// PEM root certificate(s) to trust for `rediss://` instead of the system's roots.
    pub tls_root_cert: Option<Vec<u8>>,
    /// A consumer that holds no message and was not seen for this long is removed from its
    /// group (by claims of other consumers), so restarts under new names do not pile up. A
    /// live consumer is added back by its next read. Default 1 hour.
    pub consumer_expiry: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            response_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            allow_eviction: false,
            tls_root_cert: None,
            consumer_expiry: Duration::from_secs(3600),
        }
    }
}

impl RedisConfig {
    /// Sets the per-command response timeout.
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }
    /// Sets how long failing calls are retried.
    pub fn retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }
    /// Accepts a server whose eviction policy could drop queue data.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }
    /// Sets how long an idle consumer holding nothing stays listed in its group.
    pub fn consumer_expiry(mut self, d: Duration) -> Self {
        self.consumer_expiry = d;
        self
    }
    /// Trusts these PEM root certificates for `rediss://` (e.g. a private CA) instead of the
    /// system's roots.
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }
}

struct Scripts {
    publish: Script,
    join: Script,
    promote: Script,
    recreate: Script,
    hold: Script,
    redeliver: Script,
    settle: Script,
    stop: Script,
    resume: Script,
    terminate: Script,
    cleanup: Script,
    replay: Script,
    group_create: Script,
    group_delete: Script,
    group_move: Script,
    skip: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&scripts::source(body));
        Scripts {
            publish: s(scripts::PUBLISH),
            join: s(scripts::JOIN),
            promote: s(scripts::PROMOTE),
            recreate: s(scripts::RECREATE),
            hold: s(scripts::HOLD),
            redeliver: s(scripts::REDELIVER),
            settle: s(scripts::SETTLE),
            stop: s(scripts::STOP),
            resume: s(scripts::RESUME),
            terminate: s(scripts::TERMINATE),
            cleanup: s(scripts::CLEANUP),
            replay: s(scripts::REPLAY),
            group_create: s(scripts::GROUP_CREATE),
            group_delete: s(scripts::GROUP_DELETE),
            group_move: s(scripts::GROUP_MOVE),
            skip: s(scripts::SKIP),
        }
    }
}

/// The Redis Streams backend. Durability is the server's: with `appendonly yes` and
/// `appendfsync always` an acknowledged publish survives a server crash; with the default
/// `everysec`, up to a second of writes can be lost on a power loss. See the module source for
/// the key layout.
pub struct RedisBackend {
    config: RedisConfig,
    target: Target,
    conn: Conn,
    blocking: BlockingPool,
    scripts: Scripts,
    /// Topics this process has registered in [`REGISTRY`], and when (re-registered after
    /// [`REGISTER_AGAIN`], in case another process terminated the topic meanwhile).
    registered: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Ids delivered with a failure history (`g:{G}:m`), and when: their acks go through the
    /// settle script, which deletes the history only if the ack removed the entry.
    with_history: Mutex<History>,
    /// Subscriptions (topic, group, consumer) whose last read handed out messages but failed
    /// in a later step: the next read reports an error, so the runtime recovers the consumer's
    /// pending messages (what the failed step may have left pending for it).
    needs_recovery: Mutex<HashSet<(String, String, String)>>,
    /// Commands and scripts sent on the shared connection, and those that failed.
    calls: std::sync::atomic::AtomicU64,
    call_errors: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("config", &self.config)
            .finish()
    }
}

fn prefix(topic: &str) -> String {
    format!("relq:{{{topic}}}:")
}

/// The prefix of group `group`'s keys under topic prefix `pre` (the scripts' `gk`).
fn group_prefix(pre: &str, group: &str) -> String {
    format!("{pre}g:{group}:")
}

/// How long an id with a failure history is remembered without being settled. Deliveries this
/// process never settles (abandoned at shutdown, or settled by whoever claimed them) would
/// otherwise pile up; past this age the delivery was long claimed or recovered, and an ack of
/// it that still comes takes the plain XACK path (leaving at most its history hash field).
const HISTORY_KEEP: Duration = Duration::from_secs(3600);

/// Ids delivered with a failure history, pruned of entries older than [`HISTORY_KEEP`].
#[derive(Default)]
struct History {
    ids: HashMap<MessageId, tokio::time::Instant>,
    last_prune: Option<tokio::time::Instant>,
}

impl History {
    fn note(&mut self, ids: impl Iterator<Item = MessageId>, now: tokio::time::Instant) {
        for id in ids {
            self.ids.insert(id, now);
        }
        // One pass over the set at most once a minute.
        if self
            .last_prune
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.last_prune = Some(now);
            self.ids
                .retain(|_, seen| now.duration_since(*seen) < HISTORY_KEEP);
        }
    }
}

/// A `SCAN MATCH` pattern for every topic's stream key (braces are literal in Redis globs).
const STREAM_KEY_PATTERN: &str = "relq:{*}:s";

/// The `host:port` of every primary in a `CLUSTER NODES` reply (flags include `master`, not
/// `fail`).
fn cluster_primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_id, addr, flags) = (f.next()?, f.next()?, f.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            // host:port@cport[,hostname]
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
        })
        .collect()
}

fn stream_key(topic: &str) -> String {
    format!("relq:{{{topic}}}:s")
}

fn err(kind: BackendErrorKind, message: impl Into<String>) -> BackendError {
    BackendError::new(NAME, kind, message)
}

fn corrupt(what: impl std::fmt::Display) -> BackendError {
    err(
        BackendErrorKind::Corrupt,
        format!("unexpected reply from Redis: {what}"),
    )
}

/// Whether a failed call may succeed if tried again.
fn transient(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        return true;
    }
    matches!(
        e.code(),
        Some("LOADING" | "TRYAGAIN" | "BUSY" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY")
    )
}

/// The error code scripts reply with when the topic was terminated (`redis.error_reply`).
const TERMINATED_CODE: &str = "RELQ_TERMINATED";
/// The scripts' error code for a group an operator deleted.
const GROUP_DELETED_CODE: &str = "RELQ_GROUP_DELETED";

/// The Redis error code behind a mapped error, if it came from a server reply.
fn redis_code(e: &BackendError) -> Option<&str> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<RedisError>())
        .and_then(RedisError::code)
}

fn map_err(e: RedisError) -> BackendError {
    let text = e.to_string();
    // The scripts' own error code; matched as the code, never searched for in the text, which
    // can hold key names (a topic may be called RELQ_TERMINATED).
    if e.code() == Some(TERMINATED_CODE) {
        return err(BackendErrorKind::Terminated, "the topic was terminated");
    }
    if e.code() == Some(GROUP_DELETED_CODE) {
        return err(BackendErrorKind::GroupDeleted, "the group was deleted");
    }
    // A MULTI/EXEC aborted by an error inside reports EXECABORT; then look at the cause in the
    // text (only then: elsewhere the text can hold key names such as a topic called "ROOM").
    let aborted = e.code() == Some("EXECABORT") || text.starts_with("EXECABORT");
    let has = |code: &str| e.code() == Some(code) || (aborted && text.contains(code));
    let kind = if has("OOM") {
        BackendErrorKind::Full
    } else if transient(&e)
        || [
            "LOADING",
            "READONLY",
            "MASTERDOWN",
            "CLUSTERDOWN",
            "TRYAGAIN",
        ]
        .iter()
        .any(|c| has(c))
    {
        BackendErrorKind::Unavailable
    } else if has("WRONGTYPE") {
        BackendErrorKind::Corrupt
    } else if e.code().is_some() {
        // Any other server error (NOPERM, NOAUTH, ERR from a command or a script) is not going
        // to go away by itself: retrying would spin.
        BackendErrorKind::Invalid
    } else {
        BackendErrorKind::Unavailable
    };
    if kind == BackendErrorKind::Full {
        let message = format!("Redis is out of memory (maxmemory reached): {text}");
        return BackendError::full(NAME, Limit::Memory, message).with_source(e);
    }
    err(kind, text).with_source(e)
}

// ---- reply parsing -------------------------------------------------------------------------

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Every text in a reply, through nested arrays and maps.
fn flatten_text(v: Value, out: &mut Vec<String>) {
    match v {
        Value::Array(_) | Value::Set(_) | Value::Map(_) => {
            for v in items(v) {
                flatten_text(v, out);
            }
        }
        other => out.extend(text(&other)),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn id_of(v: &Value) -> Result<MessageId, BackendError> {
    let s = text(v).ok_or_else(|| corrupt(format!("{v:?} is not an id")))?;
    s.parse()
        .map_err(|_| corrupt(format!("{s:?} is not an id")))
}

/// A key/value reply (RESP2 flat array or RESP3 map) as a map by key name.
fn fields_map(v: Value) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let mut it = items(v).into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Some(k) = text(&k) {
            out.insert(k, v);
        }
    }
    out
}

/// Decodes a stream entry's fields into a message. An entry that cannot be decoded becomes a
/// message of type [`MALFORMED_KIND`] with the reason in a header, so it is dead-lettered and
/// visible rather than lost or looping.
fn message_of(id: MessageId, fields: Value, attempt: u32) -> Message {
    let mut kind = None;
    let mut payload = Bytes::new();
    let mut headers = BTreeMap::new();
    let mut deliver_at = None;
    let mut problems = Vec::new();
    let mut it = items(fields).into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        // Field names compared as bytes: no allocation per field.
        let key: &[u8] = match &k {
            Value::BulkString(b) => b,
            Value::SimpleString(s) => s.as_bytes(),
            _ => b"",
        };
        match key {
            b"type" => {
                kind = match v {
                    Value::BulkString(b) => String::from_utf8(b).ok(),
                    other => text(&other),
                }
            }
            b"data" => {
                if let Value::BulkString(b) = v {
                    payload = Bytes::from(b);
                }
            }
            b"headers" => match text(&v).map(|s| serde_json::from_str(&s)) {
                Some(Ok(h)) => headers = h,
                _ => problems.push("the headers field is not a JSON object of strings"),
            },
            b"deliver_at" => match int(&v) {
                Some(ms) if ms >= 0 => deliver_at = Some(Timestamp(ms as u64)),
                _ => problems.push("the deliver_at field is not a number of milliseconds"),
            },
            _ => {}
        }
    }
    let kind = match kind {
        Some(k) if relq_core::validate_kind(&k).is_ok() => k,
        _ => {
            problems.push("the type field is missing or invalid");
            MALFORMED_KIND.to_owned()
        }
    };
    let kind = if problems.is_empty() {
        kind
    } else {
        headers.insert(HEADER_MALFORMED.to_owned(), problems.join("; "));
        MALFORMED_KIND.to_owned()
    };
    let stored = Outgoing {
        kind,
        payload,
        headers,
        deliver_at,
    };
    Message::new(id, stored, Timestamp(id.ms), attempt)
}

/// Parses `{id, deliveries, fields, failures|false}` entries.
fn deliveries(v: Value) -> Result<Vec<Delivery>, BackendError> {
    items(v)
        .into_iter()
        .map(|d| {
            let mut parts = items(d).into_iter();
            let (Some(id), Some(n), Some(fields)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(corrupt("a delivery with fewer than 3 parts"));
            };
            let id = id_of(&id)?;
            let attempt = int(&n).ok_or_else(|| corrupt("a delivery count"))? as u32;
            let failures = match parts.next().as_ref().and_then(text) {
                Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                    tracing::warn!(%id, error = %e, "unreadable failure history; delivering without it");
                    Vec::new()
                }),
                None => Vec::new(),
            };
            Ok(Delivery {
                message: message_of(id, fields, attempt),
                failures,
            })
        })
        .collect()
}

/// Decodes `[id, fields]` stream entries (XRANGE) as messages with attempt 0.
fn stream_messages(v: Value) -> Result<Vec<Message>, BackendError> {
    items(v)
        .into_iter()
        .map(|e| {
            let mut parts = items(e).into_iter();
            let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                return Err(corrupt("a stream entry without id and fields"));
            };
            Ok(message_of(id_of(&id)?, fields, 0))
        })
        .collect()
}

/// Decodes a dead-letter stream entry.
fn dead_letter_of(entry: Value) -> Result<DeadLetter, BackendError> {
    let mut parts = items(entry).into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(corrupt("a dead-letter entry"));
    };
    let id = id_of(&id)?;
    let mut f = fields_map(fields);
    let record = f
        .remove("record")
        .and_then(|v| text(&v))
        .ok_or_else(|| corrupt(format!("dead letter {id} has no record field")))?;
    let mut dl: DeadLetter = serde_json::from_str(&record).map_err(|e| {
        err(
            BackendErrorKind::Corrupt,
            format!("dead letter {id} has an unreadable record: {e}"),
        )
    })?;
    dl.id = id;
    if let Some(Value::BulkString(b)) = f.remove("data") {
        dl.message.payload = Bytes::from(b);
    }
    Ok(dl)
}

/// A message id as a command argument, written straight into the command (no `String` per
/// id on the ack path).
struct IdArg(MessageId);

impl ::redis::ToRedisArgs for IdArg {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + ::redis::RedisWrite,
    {
        use std::io::Write as _;
        // Writing into the command's own buffer cannot fail.
        let _ = write!(out.writer_for_next_arg(), "{}-{}", self.0.ms, self.0.seq);
    }
}

/// `XREADGROUP`'s id for "messages never delivered to this group".
const NEVER_DELIVERED: &str = ">";
/// `XGROUP CREATE`'s id for "after the last entry" (the stream's end).
const STREAM_END: &str = "$";
/// The id before every entry (a group created here reads from the start); also `SCAN`'s first
/// and last cursor.
const ORIGIN: &str = "0";

/// The cursor that makes `id` the next id read (`XGROUP CREATE` takes the last id read).
fn before(id: MessageId) -> String {
    if id.seq > 0 {
        MessageId::new(id.ms, id.seq - 1).to_string()
    } else if id.ms > 0 {
        format!("{}-{}", id.ms - 1, u64::MAX)
    } else {
        ORIGIN.to_owned()
    }
}

/// How long a topic counts as registered before a publish or join adds it to the registry again.
const REGISTER_AGAIN: Duration = Duration::from_secs(10);

/// Largest number of dead letters looked at per page by list, purge and stats.
const DL_PAGE: usize = 500;

impl RedisBackend {
    /// Connects to `url` with the default configuration. See [`connect_with`](Self::connect_with).
    ///
    /// # Errors
    /// As for [`connect_with`](Self::connect_with).
    pub async fn connect(url: &str) -> Result<RedisBackend, relq_core::Error> {
        Self::connect_with(url, RedisConfig::default()).await
    }

    /// Connects to `url`: `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS; needs
    /// the `redis-tls` build feature; the server certificate is checked against the system's
    /// roots or [`RedisConfig::tls_root_cert`]), or
    /// `redis+cluster://[user:password@]host:port,host:port` (`rediss+cluster://` with TLS) for
    /// Redis Cluster. Checks that the server is Redis 7.0 or newer and that its
    /// `maxmemory-policy` cannot evict queue data.
    ///
    /// # Errors
    /// A malformed URL, an unreachable server, authentication failure, a server older than 7.0,
    /// or an evicting memory policy (unless [`RedisConfig::allow_eviction`]).
    pub async fn connect_with(
        url: &str,
        config: RedisConfig,
    ) -> Result<RedisBackend, relq_core::Error> {
        let bad_url = |e: RedisError| relq_core::Error::UnsupportedUrl {
            url: redact(url),
            reason: e.to_string(),
        };
        if config.response_timeout.is_zero() {
            return Err(ConfigError::new("response_timeout", "must be greater than zero").into());
        }
        let tls = conn::Tls {
            root_cert: config.tls_root_cert.clone(),
        };
        let target = conn::target(url, config.response_timeout, &tls).map_err(bad_url)?;
        let conn = target.main(config.response_timeout).await.map_err(|e| {
            let mut e = map_err(e);
            e.message = format!("connecting to {}: {}", redact(url), e.message);
            relq_core::Error::Backend(e)
        })?;
        let backend = RedisBackend {
            config,
            target,
            conn,
            blocking: BlockingPool::new(),
            scripts: Scripts::new(),
            registered: Mutex::new(HashMap::new()),
            with_history: Mutex::new(History::default()),
            needs_recovery: Mutex::new(HashSet::new()),
            calls: std::sync::atomic::AtomicU64::new(0),
            call_errors: std::sync::atomic::AtomicU64::new(0),
        };
        backend.check_server().await.map_err(|mut e| {
            e.message = format!("{}: {}", redact(url), e.message);
            e
        })?;
        Ok(backend)
    }

    /// Refuses servers older than 7.0 and (unless allowed) an evicting memory policy.
    async fn check_server(&self) -> Result<(), BackendError> {
        // A restricted ACL user may not run INFO or CONFIG (both are in @dangerous): then the
        // checks are skipped with a warning, and relq runs with what the user may do.
        let info: Value = match self
            .call(
                |mut c| async move { ::redis::cmd("INFO").arg("server").query_async(&mut c).await },
            )
            .await
        {
            Ok(v) => v,
            Err(e) if redis_code(&e) == Some("NOPERM") => {
                tracing::warn!(error = %e, "could not read the server version (INFO denied); relq needs Redis 7.0 or newer");
                Value::Nil
            }
            Err(e) => return Err(e),
        };
        let info = match info {
            Value::Map(nodes) => nodes.into_iter().filter_map(|(_, v)| text(&v)).collect(),
            other => text(&other).unwrap_or_default(),
        };
        for line in info.lines() {
            if let Some(v) = line.strip_prefix("redis_version:") {
                let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
                let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                if (major, minor) < (7, 0) {
                    return Err(err(
                        BackendErrorKind::Invalid,
                        format!(
                            "Redis {} is too old: relq needs Redis 7.0 or newer",
                            v.trim()
                        ),
                    ));
                }
            }
        }
        let policy: RedisResult<Value> = ::redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut self.conn.clone())
            .await;
        // `[name, value]`, or on a cluster one such reply per node.
        let policies: Vec<String> = match policy {
            Ok(v) => {
                let mut out = Vec::new();
                flatten_text(v, &mut out);
                out.retain(|t| t != "maxmemory-policy");
                out
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read maxmemory-policy (CONFIG GET denied?); make sure it is noeviction, or Redis may silently evict queue data");
                Vec::new()
            }
        };
        for p in policies {
            if p != "noeviction" {
                let msg = format!(
                    "the server's maxmemory-policy is {p:?}: Redis may evict queue data (messages, pending entries, dead letters) when memory is full, losing messages silently; set `maxmemory-policy noeviction`"
                );
                if self.config.allow_eviction {
                    tracing::warn!("{msg} (allowed by configuration)");
                } else {
                    return Err(err(
                        BackendErrorKind::Invalid,
                        format!("{msg}, or allow it explicitly with RedisConfig::allow_eviction"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs `f` on the shared connection, retrying transient failures for `retry_for`.
    async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, BackendError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = instant_after(tokio::time::Instant::now(), self.config.retry_for);
        let mut delay = Duration::from_millis(20);
        loop {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = f(self.conn.clone()).await.map_err(map_err);
            if r.is_err() {
                self.call_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match r {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.kind == BackendErrorKind::Unavailable
                        && instant_after(tokio::time::Instant::now(), delay) < deadline =>
                {
                    tracing::debug!(error = %e, ?delay, "redis call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `f` once. For calls that hand messages to this consumer (read, recover, claim): if
    /// the connection drops after the server applied one, retrying would hand out other messages
    /// and hide the loss of the reply; the error goes to the consumer runtime instead, which then
    /// recovers this consumer's pending messages.
    async fn call_once<T, Fut>(&self, f: impl FnOnce(Conn) -> Fut) -> Result<T, BackendError>
    where
        Fut: Future<Output = RedisResult<T>>,
    {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = f(self.conn.clone()).await.map_err(map_err);
        if r.is_err() {
            self.call_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    /// Adds `topic` to the registry once per process (before it is created, so the registry
    /// never misses a topic).
    async fn register(&self, topic: &str) -> Result<(), BackendError> {
        let fresh = self
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .is_some_and(|at| at.elapsed() < REGISTER_AGAIN);
        if fresh {
            return Ok(());
        }
        self.call(|mut c| async move {
            ::redis::cmd("SADD")
                .arg(REGISTRY)
                .arg(topic)
                .query_async::<Value>(&mut c)
                .await
        })
        .await?;
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), tokio::time::Instant::now());
        Ok(())
    }

    fn flag_recovery(&self, sub: &Subscription) {
        self.needs_recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sub.topic.clone(), sub.group.clone(), sub.consumer.clone()));
    }

    /// Notes which deliveries carry a failure history (all but first deliveries of new entries).
    fn note_history(&self, out: &[Delivery]) {
        let mut h = self.with_history.lock().unwrap_or_else(|e| e.into_inner());
        h.note(
            out.iter().map(|d| d.message.id),
            tokio::time::Instant::now(),
        );
    }

    fn warn_lost(&self, sub: &Subscription, lost: bool) {
        if lost {
            tracing::warn!(
                topic = %sub.topic,
                group = %sub.group,
                "Redis lost this topic's group (restart without persistence, eviction or FLUSHALL?): recreated it; messages published before the loss are gone"
            );
        }
    }

    /// The promote script: due scheduled entries, put back into the pending list for this
    /// consumer. Also returns the next due time and the topic's stopped ids (for screening the
    /// new entries this read takes next).
    async fn promote(
        &self,
        sub: &Subscription,
        max: usize,
    ) -> Result<(Vec<Delivery>, Option<u64>, HashSet<MessageId>), BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let now = Timestamp::now().0;
        let reply: Value = self
            .call_once(|mut c| {
                let mut inv = self.scripts.promote.key(&key);
                inv.arg(&pre)
                    .arg(&sub.group)
                    .arg(&sub.consumer)
                    .arg(sub.epoch)
                    .arg(now)
                    .arg(max);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let mut parts = items(reply).into_iter();
        let (Some(lost), Some(out), Some(next_due), Some(stopped)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(corrupt("promote script reply"));
        };
        self.warn_lost(sub, int(&lost) == Some(1));
        let stopped = items(stopped)
            .iter()
            .filter_map(|v| id_of(v).ok())
            .collect();
        let out = deliveries(out)?;
        self.note_history(&out);
        Ok((out, int(&next_due).map(|d| d as u64), stopped))
    }

    /// Recreates the group after a read found it missing.
    async fn recreate_group(&self, sub: &Subscription) -> Result<(), BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        self.call(|mut c| {
            let mut inv = self.scripts.recreate.key(&key);
            inv.arg(&pre).arg(&sub.group).arg(sub.epoch);
            async move { inv.invoke_async::<Value>(&mut c).await }
        })
        .await?;
        self.warn_lost(sub, true);
        Ok(())
    }

    /// Reads new entries with `XREADGROUP`, blocking up to `block` (not at all when zero), on a
    /// dedicated connection; screens what arrives (stopped or not yet due entries are moved
    /// aside by the hold script). `None` when the group is missing.
    async fn read_new(
        &self,
        sub: &Subscription,
        max: usize,
        block: Duration,
        stopped: &HashSet<MessageId>,
    ) -> Result<Option<Vec<Delivery>>, BackendError> {
        let key = stream_key(&sub.topic);
        let mut conn = self.blocking.take(&self.target).await.map_err(map_err)?;
        // The read, then (on the same connection, so after the read was served, however long
        // it blocked) the size of the group's skip set: a move back that happened before the
        // read was served has filled it, even one after the promote step looked.
        let pipe = {
            let mut pipe = ::redis::pipe();
            let cmd = pipe
                .cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&sub.group)
                .arg(&sub.consumer)
                .arg("COUNT")
                .arg(max);
            if !block.is_zero() {
                cmd.arg("BLOCK").arg(redis_millis(block).max(1));
            }
            cmd.arg("STREAMS").arg(&key).arg(NEVER_DELIVERED);
            pipe.cmd("ZCARD")
                .arg(group_prefix(&prefix(&sub.topic), &sub.group) + "skip");
            pipe
        };
        let limit = block.saturating_add(self.config.response_timeout);
        let reply =
            match tokio::time::timeout(limit, pipe.query_async::<(Value, i64)>(&mut conn)).await {
                Ok(Ok(v)) => {
                    self.blocking.give_back(conn);
                    v
                }
                // NOGROUP: the group is gone; UNBLOCKED: the stream was deleted while we waited
                // (a terminate, or a FLUSHALL). The recreate script tells which.
                Ok(Err(e)) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                    self.blocking.give_back(conn);
                    return Ok(None);
                }
                Ok(Err(e)) => return Err(map_err(e)),
                Err(_) => {
                    return Err(err(
                        BackendErrorKind::Unavailable,
                        format!("blocking read got no reply within {limit:?}"),
                    ))
                }
            };
        let (reply, skip) = reply;
        let mut entries = Vec::new();
        for stream in items(reply) {
            // RESP2: [key, entries]; RESP3 maps flatten to the same shape.
            let mut parts = items(stream).into_iter();
            if let (Some(_), Some(list)) = (parts.next(), parts.next()) {
                entries.extend(items(list));
            }
        }
        let passed = match skip > 0 && !entries.is_empty() {
            true => self.skip_again(sub, &entries).await?,
            false => HashSet::new(),
        };
        let now = Timestamp::now();
        let mut out = Vec::new();
        let mut held: Vec<(MessageId, i64)> = Vec::new();
        let mut parked = HashMap::new();
        for e in entries {
            let mut parts = items(e).into_iter();
            let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                continue;
            };
            let id = id_of(&id)?;
            if passed.contains(&id) {
                continue;
            }
            let message = message_of(id, fields, 1);
            if stopped.contains(&id) {
                held.push((id, -1));
                parked.insert(id, message);
            } else if let Some(at) = message.deliver_at.filter(|at| *at > now) {
                held.push((id, at.0 as i64));
            } else {
                out.push(Delivery {
                    message,
                    failures: Vec::new(),
                });
            }
        }
        if !held.is_empty() {
            let pre = prefix(&sub.topic);
            let hold = self
                .call(|mut c| {
                    let mut inv = self.scripts.hold.key(&key);
                    inv.arg(&pre)
                        .arg(&sub.group)
                        .arg(sub.epoch)
                        .arg(Timestamp::now().0);
                    for (id, due) in &held {
                        inv.arg(id.to_string()).arg(*due);
                    }
                    async move { inv.invoke_async::<Value>(&mut c).await }
                })
                .await;
            match hold {
                // Resumed since the promote step looked: deliver after all.
                Ok(released) => out.extend(
                    items(released)
                        .iter()
                        .filter_map(|v| id_of(v).ok())
                        .filter_map(|id| parked.remove(&id))
                        .map(|message| Delivery {
                            message,
                            failures: Vec::new(),
                        }),
                ),
                // The set-aside entries stay pending for this consumer (recovered or claimed
                // later); what is deliverable is not lost with them.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, "could not set aside stopped or delayed messages; they stay pending");
                    self.flag_recovery(sub);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(out))
    }

    /// Runs one of the group scripts (ARGV: prefix, group, then `arg`); true if it returned 1.
    async fn group_script(
        &self,
        script: &Script,
        topic: &str,
        group: &str,
        arg: Option<String>,
    ) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let done: Value = self
            .call(|mut c| {
                let mut inv = script.key(&key);
                inv.arg(&pre).arg(group);
                if let Some(a) = &arg {
                    inv.arg(a);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(int(&done) == Some(1))
    }

    /// After a move back: which of the entries a read took again the group holds already (the
    /// skip script passes over them). If the script fails, the entries stay pending for this
    /// consumer and the runtime recovers them.
    async fn skip_again(
        &self,
        sub: &Subscription,
        entries: &[Value],
    ) -> Result<HashSet<MessageId>, BackendError> {
        let ids: Vec<String> = entries
            .iter()
            .filter_map(|e| match e {
                Value::Array(parts) => parts.first().and_then(text),
                _ => None,
            })
            .collect();
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let passed: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.skip.key(&key);
                inv.arg(&pre).arg(&sub.group).arg(sub.epoch);
                for id in &ids {
                    inv.arg(id);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await
            .inspect_err(|_| self.flag_recovery(sub))?;
        Ok(items(passed).iter().filter_map(|v| id_of(v).ok()).collect())
    }

    async fn redeliver(
        &self,
        sub: &Subscription,
        max: usize,
        mode: &str,
        arg: String,
    ) -> Result<Vec<Delivery>, BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let now = Timestamp::now().0;
        let reply: Value = self
            .call_once(|mut c| {
                let mut inv = self.scripts.redeliver.key(&key);
                inv.arg(&pre)
                    .arg(&sub.group)
                    .arg(&sub.consumer)
                    .arg(sub.epoch)
                    .arg(now)
                    .arg(max)
                    .arg(mode)
                    .arg(&arg)
                    .arg(redis_millis(self.config.consumer_expiry));
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let mut parts = items(reply).into_iter();
        let (Some(lost), Some(out)) = (parts.next(), parts.next()) else {
            return Err(corrupt("redeliver script reply"));
        };
        self.warn_lost(sub, int(&lost) == Some(1));
        let out = deliveries(out)?;
        self.note_history(&out);
        Ok(out)
    }

    /// Topic names of every stream key relq's format names (`relq:{<topic>}:s`), found with
    /// `SCAN ... TYPE stream` on the server, or on every primary of a cluster. O(keys) on the
    /// server, in pages; for listing topics, never on a message path.
    async fn scan_streams(&self) -> Result<Vec<String>, BackendError> {
        let nodes: Vec<Option<(String, u16)>> = match &self.conn {
            Conn::Cluster(_) => {
                let mut cmd = ::redis::cmd("CLUSTER");
                cmd.arg("NODES");
                let nodes = text(&self.query(cmd).await?).unwrap_or_default();
                cluster_primaries(&nodes).into_iter().map(Some).collect()
            }
            _ => vec![None],
        };
        let mut out = Vec::new();
        for node in nodes {
            let mut cursor = ORIGIN.to_owned();
            loop {
                let mut cmd = ::redis::cmd("SCAN");
                cmd.arg(&cursor)
                    .arg("MATCH")
                    .arg(STREAM_KEY_PATTERN)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("stream");
                let reply = match (&self.conn, &node) {
                    (Conn::Cluster(c), Some((host, port))) => {
                        let route = ::redis::cluster_routing::RoutingInfo::SingleNode(
                            ::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                                host: host.clone(),
                                port: *port,
                            },
                        );
                        c.clone().route_command(cmd, route).await.map_err(map_err)?
                    }
                    _ => self.query(cmd).await?,
                };
                let mut parts = items(reply).into_iter();
                let next = parts.next().as_ref().and_then(text).unwrap_or_default();
                for key in parts.next().map(items).unwrap_or_default() {
                    let topic = text(&key).and_then(|k| {
                        k.strip_prefix("relq:{")?
                            .strip_suffix("}:s")
                            .map(str::to_owned)
                    });
                    if let Some(t) = topic.filter(|t| validate_name("topic", t).is_ok()) {
                        out.push(t);
                    }
                }
                if next.is_empty() || next == ORIGIN {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }

    async fn query(&self, cmd: ::redis::Cmd) -> Result<Value, BackendError> {
        self.call(|mut c| {
            let cmd = cmd.clone();
            async move { cmd.query_async(&mut c).await }
        })
        .await
    }

    /// Dead letters of `topic` from `start` (an XRANGE bound), one raw page.
    async fn dead_letter_page(
        &self,
        topic: &str,
        start: &str,
        count: usize,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let mut cmd = ::redis::cmd("XRANGE");
        cmd.arg(format!("{}dl", prefix(topic)))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count);
        items(self.query(cmd).await?)
            .into_iter()
            .map(dead_letter_of)
            .collect()
    }

    /// Calls `f` on every dead letter of `topic`, a page at a time, oldest first.
    async fn each_dead_letter(
        &self,
        topic: &str,
        mut f: impl FnMut(&DeadLetter),
    ) -> Result<(), BackendError> {
        let mut start = "-".to_owned();
        loop {
            let page = self.dead_letter_page(topic, &start, DL_PAGE).await?;
            for dl in &page {
                f(dl);
            }
            match page.last() {
                Some(last) if page.len() == DL_PAGE => start = format!("({}", last.id),
                _ => return Ok(()),
            }
        }
    }

    /// What a cleanup would remove now: the cleanup script's floor, then counts of the stream's
    /// entries below it and below the age cutoff (in pages, read only).
    async fn cleanup_preview(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let cutoff = Timestamp::now().minus(retention.min_age).0;
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.cleanup.key(&key);
                inv.arg(&pre)
                    .arg(cutoff)
                    .arg(1)
                    .arg(-1)
                    .arg(scripts::CLEANUP_PREVIEW);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let floor = items(r).first().and_then(text);
        let mut xlen = ::redis::cmd("XLEN");
        xlen.arg(&key);
        let len = int(&self.query(xlen).await?).unwrap_or(0).max(0) as u64;
        let mut report = CleanupReport::default();
        // Entries up to the cutoff are those below `<cutoff + 1>-0`.
        let young = format!("{}-0", cutoff.saturating_add(1));
        let below_floor = match &floor {
            Some(f) => self.count_below(&key, f).await?,
            None => 0,
        };
        if let Some(f) = &floor {
            let boundary = match (f.parse::<MessageId>(), young.parse::<MessageId>()) {
                (Ok(fid), Ok(y)) if y < fid => young,
                _ => f.clone(),
            };
            report.removed = self.count_below(&key, &boundary).await?;
        }
        if let Some(max_len) = retention.max_len {
            let excess = (len - report.removed.min(len)).saturating_sub(max_len);
            let acked = below_floor.saturating_sub(report.removed).min(excess);
            report.removed += acked;
            report.trimmed_unacknowledged = excess - acked;
        }
        Ok(report)
    }

    /// How many entries of the stream have an id below `id`.
    async fn count_below(&self, key: &str, id: &str) -> Result<u64, BackendError> {
        let end = format!("({id}");
        let mut start = "-".to_owned();
        let mut n = 0u64;
        loop {
            let mut cmd = ::redis::cmd("XRANGE");
            cmd.arg(key).arg(&start).arg(&end).arg("COUNT").arg(1000);
            let page = items(self.query(cmd).await?);
            n += page.len() as u64;
            if page.len() < 1000 {
                return Ok(n);
            }
            let last = items(page.last().cloned().unwrap_or(Value::Nil))
                .first()
                .and_then(text)
                .unwrap_or_default();
            start = format!("({last}");
        }
    }

    /// Counts stream entries after `id` (used when Redis cannot report a group's lag).
    async fn count_after(&self, key: &str, id: &str) -> Result<u64, BackendError> {
        let mut start = format!("({id}");
        let mut n = 0u64;
        loop {
            let mut cmd = ::redis::cmd("XRANGE");
            cmd.arg(key).arg(&start).arg("+").arg("COUNT").arg(1000);
            let page = items(self.query(cmd).await?);
            n += page.len() as u64;
            if page.len() < 1000 {
                return Ok(n);
            }
            let last = items(page.last().cloned().unwrap_or(Value::Nil))
                .first()
                .and_then(text)
                .unwrap_or_default();
            start = format!("({last}");
        }
    }
}

/// The id `XGROUP` takes for a start position: the last id already read.
fn start_id(start: StartPosition) -> String {
    match start {
        StartPosition::Latest => STREAM_END.to_owned(),
        StartPosition::Earliest => ORIGIN.to_owned(),
        StartPosition::From(id) => before(id),
    }
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn random_nonce() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(
        &self,
        topic: &str,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<MessageId>, BackendError> {
        self.register(topic).await?;
        let key = stream_key(topic);
        let pre = prefix(topic);
        let nonce = random_nonce();
        let headers: Vec<String> = batch
            .iter()
            .map(|m| {
                if m.headers.is_empty() {
                    String::new()
                } else {
                    serde_json::to_string(&m.headers).expect("string maps serialize")
                }
            })
            .collect();
        let started = tokio::time::Instant::now();
        let mut first = true;
        enum Attempt<'a> {
            Append(::redis::Pipeline),
            Retry(::redis::ScriptInvocation<'a>),
        }
        let reply: Value = self
            .call(|mut c| {
                let attempt = if first {
                    // The hot path, without Lua: the batch's XADDs in one MULTI/EXEC, so the
                    // batch is contiguous in the stream (a retry finds it by the nonce on its
                    // first entry).
                    let mut pipe = ::redis::pipe();
                    if batch.len() > 1 {
                        pipe.atomic();
                    }
                    for (i, (m, h)) in batch.iter().zip(&headers).enumerate() {
                        let cmd = pipe.cmd("XADD");
                        cmd.arg(&key)
                            .arg("*")
                            .arg("type")
                            .arg(&m.kind)
                            .arg("data")
                            .arg(m.payload.as_ref());
                        if !h.is_empty() {
                            cmd.arg("headers").arg(h);
                        }
                        if let Some(at) = m.deliver_at {
                            cmd.arg("deliver_at").arg(at.0);
                        }
                        if i == 0 {
                            cmd.arg("nonce").arg(&nonce);
                        }
                    }
                    Attempt::Append(pipe)
                } else {
                    // The first attempt may have been applied before the connection dropped:
                    // look for the batch's nonce among recent entries before appending.
                    let window = started.elapsed().as_millis() as u64 + 10_000;
                    let mut inv = self.scripts.publish.key(&key);
                    inv.arg(&pre).arg(window).arg(&nonce).arg(batch.len());
                    for (m, h) in batch.iter().zip(&headers) {
                        inv.arg(&m.kind).arg(m.payload.as_ref()).arg(h);
                        match m.deliver_at {
                            Some(at) => inv.arg(at.0),
                            None => inv.arg(""),
                        };
                    }
                    Attempt::Retry(inv)
                };
                first = false;
                async move {
                    match attempt {
                        Attempt::Append(pipe) => pipe.query_async(&mut c).await,
                        Attempt::Retry(inv) => inv.invoke_async(&mut c).await,
                    }
                }
            })
            .await?;
        let ids = items(reply)
            .iter()
            .map(id_of)
            .collect::<Result<Vec<_>, _>>()?;
        if ids.len() != batch.len() {
            return Err(corrupt(format!(
                "publish of {} messages returned {} ids",
                batch.len(),
                ids.len()
            )));
        }
        Ok(ids)
    }

    async fn join(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        start: StartPosition,
    ) -> Result<Subscription, BackendError> {
        self.register(topic).await?;
        let key = stream_key(topic);
        let pre = prefix(topic);
        let start = start_id(start);
        let epoch: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.join.key(&key);
                inv.arg(&pre).arg(group).arg(consumer).arg(&start);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let epoch = text(&epoch)
            .and_then(|e| e.parse::<u64>().ok())
            .ok_or_else(|| corrupt(format!("topic epoch {epoch:?}")))?;
        Ok(Subscription {
            topic: topic.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            epoch,
        })
    }

    async fn recover(
        &self,
        sub: &Subscription,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.redeliver(sub, max, "recover", after.to_string()).await
    }

    async fn claim(
        &self,
        sub: &Subscription,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.redeliver(sub, max, "claim", redis_millis(min_idle).to_string())
            .await
    }

    async fn read(
        &self,
        sub: &Subscription,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BackendError> {
        let key = (sub.topic.clone(), sub.group.clone(), sub.consumer.clone());
        if self
            .needs_recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
        {
            return Err(err(
                BackendErrorKind::Unavailable,
                "part of the previous read failed after it handed out messages; recover this consumer's pending messages",
            ));
        }
        let deadline = instant_after(tokio::time::Instant::now(), wait);
        loop {
            let (mut out, next_due, stopped) = self.promote(sub, max).await?;
            if !out.is_empty() {
                if out.len() < max {
                    // Fill the rest with new messages, without waiting. On an error, the
                    // promoted messages are still handed over (they are pending for us).
                    match self
                        .read_new(sub, max - out.len(), Duration::ZERO, &stopped)
                        .await
                    {
                        Ok(Some(more)) => out.extend(more),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "filling a read failed");
                            self.flag_recovery(sub);
                        }
                    }
                }
                return Ok(out);
            }
            let now = tokio::time::Instant::now();
            let mut block = deadline.saturating_duration_since(now);
            if let Some(due) = next_due {
                block = block.min(Timestamp(due).since(Timestamp::now()));
            }
            match self.read_new(sub, max, block, &stopped).await? {
                None => {
                    // Redis lost the group (restart without persistence, FLUSHALL): recreate
                    // it, unless the topic was terminated (the script then says so).
                    self.recreate_group(sub).await?;
                    continue;
                }
                Some(out) if !out.is_empty() => return Ok(out),
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
        }
    }

    async fn settle(&self, sub: &Subscription, batch: &[Settlement]) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let plain_acks = {
            let history = self.with_history.lock().unwrap_or_else(|e| e.into_inner());
            batch
                .iter()
                .all(|s| matches!(s, Settlement::Ack(_)) && !history.ids.contains_key(&s.id()))
        };
        if plain_acks {
            // The hot path, without Lua: first deliveries of new entries have no failure
            // history, so one XACK does (idempotent: a retry after a lost reply is harmless).
            self.call(|mut c| {
                let mut cmd = ::redis::cmd("XACK");
                cmd.arg(&key).arg(&sub.group);
                for s in batch {
                    cmd.arg(IdArg(s.id()));
                }
                async move { cmd.query_async::<Value>(&mut c).await }
            })
            .await?;
            return Ok(());
        }
        // Encode once; retries reuse the arguments.
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(batch.len() * 2);
        for s in batch {
            match s {
                Settlement::Ack(id) => {
                    args.push(scripts::SETTLE_ACK.to_vec());
                    args.push(id.to_string().into_bytes());
                }
                Settlement::Retry { id, at, failure } => {
                    args.push(scripts::SETTLE_RETRY.to_vec());
                    args.push(id.to_string().into_bytes());
                    args.push(at.0.to_string().into_bytes());
                    args.push(serde_json::to_vec(failure).expect("failures serialize"));
                    args.push(failure.attempt.to_string().into_bytes());
                }
                Settlement::DeadLetter(dl) => {
                    let mut record = (**dl).clone();
                    let payload = std::mem::take(&mut record.message.payload);
                    args.push(scripts::SETTLE_DEAD_LETTER.to_vec());
                    args.push(dl.message.id.to_string().into_bytes());
                    args.push(serde_json::to_vec(&record).expect("dead letters serialize"));
                    args.push(payload.to_vec());
                    args.push(dl.message.attempt.to_string().into_bytes());
                }
            }
        }
        self.call(|mut c| {
            let mut inv = self.scripts.settle.key(&key);
            inv.arg(&pre)
                .arg(&sub.group)
                .arg(sub.epoch)
                .arg(&sub.consumer);
            for a in &args {
                inv.arg(a.as_slice());
            }
            async move { inv.invoke_async::<Value>(&mut c).await }
        })
        .await?;
        let mut history = self.with_history.lock().unwrap_or_else(|e| e.into_inner());
        for s in batch {
            history.ids.remove(&s.id());
        }
        Ok(())
    }

    async fn stop_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.stop.key(&key);
                inv.arg(&pre).arg(id.to_string());
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(int(&r) == Some(1))
    }

    async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let now = Timestamp::now().0;
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.resume.key(&key);
                inv.arg(&pre).arg(id.to_string()).arg(now);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(items(r).get(1).and_then(int) == Some(1))
    }

    async fn terminate(&self, topic: &str) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.terminate.key(&key);
                inv.arg(&pre);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let mut cmd = ::redis::cmd("SREM");
        cmd.arg(REGISTRY).arg(topic);
        self.query(cmd).await?;
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
        Ok(int(&r) == Some(1))
    }

    async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError> {
        self.register(topic).await?;
        self.group_script(
            &self.scripts.group_create,
            topic,
            group,
            Some(start_id(start)),
        )
        .await
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<bool, BackendError> {
        self.group_script(&self.scripts.group_delete, topic, group, None)
            .await
    }

    async fn move_group(
        &self,
        topic: &str,
        group: &str,
        to: StartPosition,
    ) -> Result<bool, BackendError> {
        self.group_script(&self.scripts.group_move, topic, group, Some(start_id(to)))
            .await
    }

    async fn cleanup(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        if retention.dry_run {
            return self.cleanup_preview(topic, retention).await;
        }
        let mut report = CleanupReport::default();
        let max_len = retention.max_len.map(|m| m as i64).unwrap_or(-1);
        loop {
            let cutoff = Timestamp::now().minus(retention.min_age).0;
            let r: Value = self
                .call(|mut c| {
                    let mut inv = self.scripts.cleanup.key(&key);
                    inv.arg(&pre)
                        .arg(cutoff)
                        .arg(retention.batch.max(1))
                        .arg(max_len)
                        .arg(scripts::CLEANUP_APPLY);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await?;
            let r = items(r);
            let removed = r.first().and_then(int).unwrap_or(0) as u64;
            let trimmed = r.get(1).and_then(int).unwrap_or(0) as u64;
            report.removed += removed;
            report.trimmed_unacknowledged += trimmed;
            if removed + trimmed == 0 {
                return Ok(report);
            }
            tokio::task::yield_now().await;
        }
    }

    fn metrics(&self) -> Vec<BackendMetric> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            BackendMetric::counter("relq_redis_calls_total", "Commands and scripts sent on the shared connection (reads on the blocking pool not counted)", self.calls.load(Relaxed) as f64),
            BackendMetric::counter("relq_redis_call_errors_total", "Of those, the ones that failed", self.call_errors.load(Relaxed) as f64),
        ]
    }

    async fn locate(
        &self,
        topic: &str,
        id: MessageId,
    ) -> Result<Option<Vec<GroupPlacement>>, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(format!("{pre}meta")).arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(Some(Vec::new()));
        }
        let id_text = id.to_string();
        let mut cmd = ::redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(&key);
        let mut out = Vec::new();
        for g in items(self.query(cmd).await?) {
            let g = fields_map(g);
            let name = g.get("name").and_then(text).unwrap_or_default();
            let cursor = g
                .get("last-delivered-id")
                .and_then(|v| id_of(v).ok())
                .unwrap_or_default();
            let gkey = group_prefix(&pre, &name);
            let mut cmd = ::redis::cmd("XPENDING");
            cmd.arg(&key).arg(&name).arg(&id_text).arg(&id_text).arg(1);
            let pending = items(self.query(cmd).await?).into_iter().next().map(items);
            let placement = if let Some(p) = pending {
                Placement::Pending {
                    consumer: p.get(1).and_then(text).unwrap_or_default(),
                    deliveries: p.get(3).and_then(int).unwrap_or(0) as u32,
                }
            } else {
                let mut cmd = ::redis::cmd("ZSCORE");
                cmd.arg(format!("{gkey}sched")).arg(&id_text);
                let due = text(&self.query(cmd).await?).and_then(|t| t.parse::<f64>().ok());
                let mut cmd = ::redis::cmd("SISMEMBER");
                cmd.arg(format!("{gkey}park")).arg(&id_text);
                let parked = int(&self.query(cmd).await?).unwrap_or(0) == 1;
                if let Some(due) = due {
                    let mut cmd = ::redis::cmd("HGET");
                    cmd.arg(format!("{gkey}m")).arg(&id_text);
                    let deliveries = text(&self.query(cmd).await?)
                        .and_then(|m| m.split(' ').next().and_then(|n| n.parse().ok()))
                        .unwrap_or(0);
                    Placement::Scheduled {
                        due: Timestamp(due.max(0.0) as u64),
                        deliveries,
                    }
                } else if parked {
                    Placement::Stopped
                } else if id > cursor {
                    Placement::Unread
                } else {
                    Placement::Done
                }
            };
            out.push(GroupPlacement::new(name, placement));
        }
        Ok(Some(out))
    }

    async fn health(&self) -> Health {
        let mut checks = Vec::new();
        match self.query(::redis::cmd("PING")).await {
            Ok(_) => checks.push(HealthCheck::new("backend", true, "PING answered")),
            Err(e) => {
                checks.push(HealthCheck::new("backend", false, e.to_string()));
                return Health::new(NAME, checks);
            }
        }
        let mut cmd = ::redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        match self.query(cmd).await {
            Ok(v) => {
                let mut out = Vec::new();
                flatten_text(v, &mut out);
                out.retain(|t| t != "maxmemory-policy");
                let evicting: Vec<&String> = out.iter().filter(|p| *p != "noeviction").collect();
                checks.push(if evicting.is_empty() || self.config.allow_eviction {
                    HealthCheck::new("eviction_policy", true, format!("maxmemory-policy {out:?}"))
                } else {
                    HealthCheck::new(
                        "eviction_policy",
                        false,
                        format!(
                            "maxmemory-policy {evicting:?} may evict queue data; set noeviction"
                        ),
                    )
                });
            }
            Err(e) => checks.push(HealthCheck::new(
                "eviction_policy",
                true,
                format!("not readable ({e}); make sure it is noeviction"),
            )),
        }
        let mut h = Health::new(NAME, checks);
        let mut cmd = ::redis::cmd("INFO");
        cmd.arg("memory");
        if let Ok(v) = self.query(cmd).await {
            let mut texts = Vec::new();
            flatten_text(v, &mut texts);
            let field = |name: &str| -> Option<f64> {
                texts.iter().flat_map(|t| t.lines()).find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|v| v.strip_prefix(':'))
                        .and_then(|v| v.trim().parse().ok())
                })
            };
            if let (Some(used), Some(max)) = (field("used_memory"), field("maxmemory")) {
                if max > 0.0 {
                    h.usage_ratio = Some((used / max).min(1.0));
                }
            }
        }
        h
    }

    async fn topics(&self) -> Result<Vec<String>, BackendError> {
        let mut cmd = ::redis::cmd("SMEMBERS");
        cmd.arg(REGISTRY);
        let mut names: BTreeSet<String> = items(self.query(cmd).await?)
            .iter()
            .filter_map(text)
            .collect();
        // Streams another program created by the documented format (`XADD relq:{t}:s ...`)
        // before any relq process registered the topic.
        match self.scan_streams().await {
            Ok(found) => names.extend(found),
            // An ACL user without SCAN (or CLUSTER NODES) still lists the registered topics.
            Err(e) if redis_code(&e) == Some("NOPERM") => {
                tracing::warn!(error = %e, "cannot scan for topics other programs created; listing registered topics only");
            }
            Err(e) => return Err(e),
        }
        let mut out = Vec::new();
        for name in names {
            let mut cmd = ::redis::cmd("EXISTS");
            cmd.arg(format!("{}meta", prefix(&name)))
                .arg(stream_key(&name));
            if int(&self.query(cmd).await?).unwrap_or(0) > 0 {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(format!("{pre}meta")).arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let mut info = TopicInfo {
            name: topic.to_owned(),
            length: 0,
            first_id: None,
            last_id: None,
            groups: Vec::new(),
            stopped: Vec::new(),
            dead_letters: 0,
            published: 0,
        };
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(&key);
        let has_stream = int(&self.query(cmd).await?).unwrap_or(0) == 1;
        if has_stream {
            let mut cmd = ::redis::cmd("XINFO");
            cmd.arg("STREAM").arg(&key);
            let s = fields_map(self.query(cmd).await?);
            info.length = s.get("length").and_then(int).unwrap_or(0) as u64;
            // Redis 7.0+: every entry ever added to the stream.
            info.published = s
                .get("entries-added")
                .and_then(int)
                .map_or(info.length, |n| n.max(0) as u64);
            info.last_id = s
                .get("last-generated-id")
                .and_then(|v| id_of(v).ok())
                .filter(|id| *id != MessageId::ZERO);
            info.first_id = s
                .get("first-entry")
                .and_then(|e| items(e.clone()).first().and_then(|v| id_of(v).ok()));
            let mut cmd = ::redis::cmd("XINFO");
            cmd.arg("GROUPS").arg(&key);
            for g in items(self.query(cmd).await?) {
                let g = fields_map(g);
                let name = g.get("name").and_then(text).unwrap_or_default();
                let cursor = g
                    .get("last-delivered-id")
                    .and_then(|v| id_of(v).ok())
                    .unwrap_or_default();
                let lag = match g.get("lag").and_then(int) {
                    Some(l) => l as u64,
                    None => self.count_after(&key, &cursor.to_string()).await?,
                };
                let gkey = group_prefix(&pre, &name);
                let mut cmd = ::redis::cmd("ZCARD");
                cmd.arg(format!("{gkey}sched"));
                let scheduled = int(&self.query(cmd).await?).unwrap_or(0) as u64;
                let mut cmd = ::redis::cmd("SCARD");
                cmd.arg(format!("{gkey}park"));
                let parked = int(&self.query(cmd).await?).unwrap_or(0) as u64;
                let mut cmd = ::redis::cmd("XINFO");
                cmd.arg("CONSUMERS").arg(&key).arg(&name);
                let consumers = items(self.query(cmd).await?)
                    .into_iter()
                    .map(|c| {
                        let c = fields_map(c);
                        ConsumerInfo {
                            name: c.get("name").and_then(text).unwrap_or_default(),
                            pending: c.get("pending").and_then(int).unwrap_or(0) as u64,
                            idle_ms: c.get("idle").and_then(int).unwrap_or(0) as u64,
                        }
                    })
                    .collect();
                let pending = g.get("pending").and_then(int).unwrap_or(0) as u64;
                let oldest_pending = if pending > 0 {
                    let mut cmd = ::redis::cmd("XPENDING");
                    cmd.arg(&key).arg(&name);
                    items(self.query(cmd).await?)
                        .get(1)
                        .and_then(|v| id_of(v).ok())
                } else {
                    None
                };
                let oldest_unread = if lag > 0 {
                    let mut cmd = ::redis::cmd("XRANGE");
                    cmd.arg(&key)
                        .arg(format!("({cursor}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(1);
                    stream_messages(self.query(cmd).await?)?
                        .first()
                        .map(|m| m.id)
                } else {
                    None
                };
                info.groups.push(GroupInfo {
                    name,
                    cursor,
                    pending,
                    lag,
                    scheduled,
                    parked,
                    consumers,
                    oldest_pending,
                    oldest_unread,
                });
            }
        }
        let mut cmd = ::redis::cmd("SMEMBERS");
        cmd.arg(format!("{pre}stop"));
        info.stopped = items(self.query(cmd).await?)
            .iter()
            .filter_map(|v| id_of(v).ok())
            .collect();
        info.stopped.sort();
        let mut cmd = ::redis::cmd("XLEN");
        cmd.arg(format!("{pre}dl"));
        info.dead_letters = int(&self.query(cmd).await?).unwrap_or(0) as u64;
        Ok(Some(info))
    }

    async fn browse(
        &self,
        topic: &str,
        query: &Browse,
    ) -> Result<Option<Vec<Message>>, BackendError> {
        let key = stream_key(topic);
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(format!("{}meta", prefix(topic))).arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let max = MessageId::new(u64::MAX, u64::MAX);
        // Exclusive bounds Redis cannot express (past the largest id, below the smallest) and
        // empty intervals select nothing.
        let empty = query.after == Some(max)
            || query.before == Some(MessageId::ZERO)
            || matches!((query.after, query.before), (Some(a), Some(b)) if a >= b);
        if empty {
            return Ok(Some(Vec::new()));
        }
        let low = query.after.map_or("-".to_owned(), |a| format!("({a}"));
        let high = query.before.map_or("+".to_owned(), |b| format!("({b}"));
        let mut cmd = if query.newest_first {
            let mut c = ::redis::cmd("XREVRANGE");
            c.arg(&key).arg(high).arg(low);
            c
        } else {
            let mut c = ::redis::cmd("XRANGE");
            c.arg(&key).arg(low).arg(high);
            c
        };
        cmd.arg("COUNT").arg(query.page_size());
        Ok(Some(stream_messages(self.query(cmd).await?)?))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let want = query.page_size();
        let mut out = Vec::new();
        let mut start = match query.after {
            Some(after) => format!("({after}"),
            None => "-".to_owned(),
        };
        loop {
            let page = self.dead_letter_page(topic, &start, DL_PAGE).await?;
            let full = page.len() == DL_PAGE;
            let last = page.last().map(|d| d.id);
            for dl in page {
                if query.matches(&dl) {
                    out.push(dl);
                    if out.len() == want {
                        return Ok(out);
                    }
                }
            }
            match last {
                Some(last) if full => start = format!("({last}"),
                _ => return Ok(out),
            }
        }
    }

    async fn dead_letter(
        &self,
        topic: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError> {
        let mut cmd = ::redis::cmd("XRANGE");
        let id = id.to_string();
        cmd.arg(format!("{}dl", prefix(topic))).arg(&id).arg(&id);
        match items(self.query(cmd).await?).into_iter().next() {
            Some(e) => Ok(Some(dead_letter_of(e)?)),
            None => Ok(None),
        }
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError> {
        let mut found = Vec::new();
        let mut named = HashSet::new();
        for id in ids.iter().filter(|id| named.insert(**id)) {
            if let Some(dl) = self.dead_letter(topic, *id).await? {
                found.push((dl.id, replay_message(&dl)));
            }
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let key = stream_key(topic);
        let pre = prefix(topic);
        let args: Vec<(String, &Outgoing, String)> = found
            .iter()
            .map(|(id, m)| {
                (
                    id.to_string(),
                    m,
                    serde_json::to_string(&m.headers).expect("string maps serialize"),
                )
            })
            .collect();
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.replay.key(&key);
                inv.arg(&pre);
                for (id, m, h) in &args {
                    inv.arg(id).arg(&m.kind).arg(m.payload.as_ref()).arg(h);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        items(r)
            .into_iter()
            .map(|pair| {
                let p = items(pair);
                match (p.first(), p.get(1)) {
                    (Some(a), Some(b)) => Ok((id_of(a)?, id_of(b)?)),
                    _ => Err(corrupt("replay script reply")),
                }
            })
            .collect()
    }

    async fn delete_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError> {
        let mut n = 0;
        for chunk in ids.chunks(1000) {
            let mut cmd = ::redis::cmd("XDEL");
            cmd.arg(format!("{}dl", prefix(topic)));
            for id in chunk {
                cmd.arg(id.to_string());
            }
            n += int(&self.query(cmd).await?).unwrap_or(0) as u64;
        }
        Ok(n)
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        before: Timestamp,
    ) -> Result<u64, BackendError> {
        let mut doomed = Vec::new();
        self.each_dead_letter(topic, |dl| {
            if dl.last_failed_at < before {
                doomed.push(dl.id);
            }
        })
        .await?;
        self.delete_dead_letters(topic, &doomed).await
    }

    async fn dead_letter_stats(&self, topic: &str) -> Result<DeadLetterStats, BackendError> {
        let mut stats = DeadLetterStats::default();
        self.each_dead_letter(topic, |dl| stats.add(dl)).await?;
        Ok(stats)
    }
}

/// A duration as the whole milliseconds Redis takes (a signed 64-bit count), saturating: a
/// caller's `Duration::MAX` is "forever", not an overflow or a rejected command.
fn redis_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).map_or(i64::MAX as u64, |ms| ms.min(i64::MAX as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_history_never_settled_here_are_forgotten_after_an_hour() {
        let t0 = tokio::time::Instant::now();
        let mut h = History::default();
        h.note([MessageId::new(1, 0)].into_iter(), t0);
        h.note(
            [MessageId::new(2, 0)].into_iter(),
            t0 + Duration::from_secs(1800),
        );
        assert_eq!(h.ids.len(), 2);
        h.note(
            [MessageId::new(3, 0)].into_iter(),
            t0 + HISTORY_KEEP + Duration::from_secs(1),
        );
        let mut left: Vec<_> = h.ids.keys().copied().collect();
        left.sort();
        assert_eq!(left, [MessageId::new(2, 0), MessageId::new(3, 0)]);
    }

    /// Any reply shape, nested: what a damaged key, another client or a hostile server can send.
    fn any_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::BulkString),
            // Field names and ids relq looks for, so decoding gets past the first checks.
            prop_oneof![
                Just("type"),
                Just("data"),
                Just("headers"),
                Just("deliver_at"),
                Just("record"),
                Just("1-0"),
                Just("{}"),
                Just("[]"),
                Just("job"),
                Just("18446744073709551615-18446744073709551615"),
                Just("{\"id\":\"1-0\",\"attempts\":1}"),
            ]
            .prop_map(|s| Value::BulkString(s.as_bytes().to_vec())),
            ".{0,20}".prop_map(Value::SimpleString),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
    }

    proptest::proptest! {
        /// Stored entries and replies of any shape decode to a value or an error, never a panic.
        #[test]
        fn decoders_never_panic(v in any_value(), id in proptest::prelude::any::<(u64, u64)>(), n in proptest::prelude::any::<u32>()) {
            let _ = deliveries(v.clone());
            let _ = dead_letter_of(v.clone());
            let _ = fields_map(v.clone());
            let _ = id_of(&v);
            let m = message_of(MessageId::new(id.0, id.1), v, n);
            let _ = m.published_at.to_string();
        }

        /// A dead-letter record of arbitrary JSON is an error or a dead letter, never a panic.
        #[test]
        fn dead_letter_records_never_panic(record in ".{0,200}") {
            let entry = Value::Array(vec![
                Value::BulkString(b"5-1".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"record".to_vec()),
                    Value::BulkString(record.into_bytes()),
                ]),
            ]);
            if let Ok(dl) = dead_letter_of(entry) {
                let _ = (dl.first_failed_at.to_string(), dl.message.published_at.to_string());
            }
        }
    }

    #[test]
    fn errors_are_classified_by_their_code_not_their_text() {
        let terminated = ::redis::make_extension_error(
            TERMINATED_CODE.into(),
            Some("the topic was terminated".into()),
        );
        assert_eq!(map_err(terminated).kind, BackendErrorKind::Terminated);
        // A key name in the text (a topic called RELQ_TERMINATED or OOM) says nothing.
        let nogroup = ::redis::make_extension_error(
            "NOGROUP".into(),
            Some("No such key 'relq:{RELQ_TERMINATED}:s' or consumer group 'OOM'".into()),
        );
        let e = map_err(nogroup);
        assert_eq!(e.kind, BackendErrorKind::Invalid);
        assert_eq!(redis_code(&e), Some("NOGROUP"));
        let noperm = ::redis::make_extension_error(
            "NOPERM".into(),
            Some("User x has no permissions to run the 'info' command".into()),
        );
        assert_eq!(redis_code(&map_err(noperm)), Some("NOPERM"));
    }

    #[test]
    fn malformed_entries_become_visible_messages() {
        let fields = Value::Array(vec![
            Value::BulkString(b"data".to_vec()),
            Value::BulkString(b"x".to_vec()),
            Value::BulkString(b"headers".to_vec()),
            Value::BulkString(b"not json".to_vec()),
        ]);
        let m = message_of(MessageId::new(5, 1), fields, 1);
        assert_eq!(m.kind, MALFORMED_KIND);
        let why = m.header(HEADER_MALFORMED).unwrap();
        assert!(why.contains("headers") && why.contains("type"), "{why}");
        assert_eq!(m.payload.as_ref(), b"x");
        assert_eq!(m.published_at, Timestamp(5));
    }

    #[test]
    fn well_formed_entry_decodes() {
        let fields = Value::Array(vec![
            Value::BulkString(b"type".to_vec()),
            Value::BulkString(b"order.created".to_vec()),
            Value::BulkString(b"data".to_vec()),
            Value::BulkString(vec![0, 255]),
            Value::BulkString(b"headers".to_vec()),
            Value::BulkString(br#"{"a":"b"}"#.to_vec()),
            Value::BulkString(b"deliver_at".to_vec()),
            Value::BulkString(b"77".to_vec()),
        ]);
        let m = message_of(MessageId::new(5, 1), fields, 3);
        assert_eq!(m.kind, "order.created");
        assert_eq!(m.payload.as_ref(), &[0, 255]);
        assert_eq!(m.header("a"), Some("b"));
        assert_eq!(m.deliver_at, Some(Timestamp(77)));
        assert_eq!(m.attempt, 3);
    }

    #[test]
    fn start_cursor_and_redaction() {
        assert_eq!(before(MessageId::new(5, 2)), "5-1");
        assert_eq!(before(MessageId::new(5, 0)), format!("4-{}", u64::MAX));
        assert_eq!(before(MessageId::ZERO), "0");
        assert_eq!(
            redact("redis://app:secret@h:6379/0"),
            "redis://app:***@h:6379/0"
        );
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn cluster_urls_split_into_nodes() {
        let t = conn::target(
            "redis+cluster://u:p@127.0.0.1:7000,127.0.0.1:7001",
            Duration::from_secs(1),
            &conn::Tls::default(),
        )
        .unwrap();
        assert!(matches!(t, Target::Cluster { .. }));
    }
}
