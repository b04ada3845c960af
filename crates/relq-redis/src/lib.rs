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
//! the PEL and kept in `sched`; when due, the promote script, which starts a read when an entry
//! may be due, puts it back into the PEL with `XCLAIM ... FORCE RETRYCOUNT n` (so the count
//! survives). There is no separate promoter process to elect: the script runs atomically, so two
//! readers never promote the same entry. The same script then reads new entries (a non-blocking
//! XREADGROUP). While nothing may be due, a read is one MULTI/EXEC without Lua that also fetches
//! the group's first due time. So a busy consumer's read is one round trip; publish is a
//! MULTI/EXEC of XADDs and acks of first deliveries are one XACK, without Lua.

mod admin;
mod backend_impl;
mod config;
mod conn;
mod connect;
mod decode;
mod error;
mod keys;
mod read;
mod scripts;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use ::redis::Script;

use conn::{BlockingPool, Conn, Target};
use relq_core::MessageId;

pub use self::config::RedisConfig;

const NAME: &str = "redis";

struct Scripts {
    publish: Script,
    publish_keyed: Script,
    processed: Script,
    record_processed: Script,
    take_tokens: Script,
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
    keycheck: Script,
    mark_keyed: Script,
    give_back: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&scripts::source(body));
        Scripts {
            publish: s(scripts::PUBLISH),
            publish_keyed: s(scripts::PUBLISH_KEYED),
            processed: s(scripts::PROCESSED),
            record_processed: s(scripts::RECORD_PROCESSED),
            take_tokens: s(scripts::TAKE_TOKENS),
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
            keycheck: s(scripts::KEYCHECK),
            mark_keyed: s(scripts::MARK_KEYED),
            give_back: s(scripts::GIVE_BACK),
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
    /// Topics this process has registered in [`keys::REGISTRY`], and when (re-registered after
    /// [`admin::REGISTER_AGAIN`], in case another process terminated the topic meanwhile).
    registered: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Ids delivered with a failure history (`g:{G}:m`), and when: their acks go through the
    /// settle script, which deletes the history only if the ack removed the entry.
    with_history: Mutex<History>,
    /// Topics this process has handed out a message with an ordering key from: every ack on
    /// them goes through the settle script, which passes the key on (never the plain XACK).
    keyed_topics: Mutex<HashSet<String>>,
    /// Subscriptions (topic, group, consumer) whose last read handed out messages but failed
    /// in a later step: the next read reports an error, so the runtime recovers the consumer's
    /// pending messages (what the failed step may have left pending for it).
    needs_recovery: Mutex<HashSet<(String, String, String)>>,
    /// When each group's first scheduled entry is due: a read runs the promote script only when
    /// one may be due by now.
    due: Mutex<DueTimes>,
    /// The lowest `redis_version` the server's nodes reported at connect, if readable.
    server_version: std::sync::OnceLock<String>,
    /// Commands and scripts sent on the shared connection, and those that failed.
    calls: std::sync::atomic::AtomicU64,
    call_errors: std::sync::atomic::AtomicU64,
}

impl RedisBackend {
    fn due(&self) -> std::sync::MutexGuard<'_, DueTimes> {
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("config", &self.config)
            .finish()
    }
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

/// When each group's first scheduled entry is due (ms since the epoch), as this process last
/// saw it: a read runs the promote script only when one may be due. A group not listed may have
/// one due. Scheduling here (a retry, a held delayed message, a resume) lowers the time at
/// once; a read that was on its way meanwhile, and saw the set before that, cannot raise it
/// back (`changed`). (A stopped message resumed just before a read held it again is the
/// exception: the next read's look at the schedule finds it, one read later.) Another process's retries are seen by the next read (each read fetches
/// the first due time), so they wait one read longer at most. Few groups per process: a list
/// searched in place, so a read allocates no key.
#[derive(Default)]
struct DueTimes {
    /// (topic, group, due ms; `u64::MAX`: nothing scheduled).
    groups: Vec<(String, String, u64)>,
    /// Bumped whenever this process schedules something.
    changed: u64,
}

impl DueTimes {
    /// Past this many groups the list is cleared: forgetting only costs each a promote script.
    const MAX: usize = 1024;

    fn find(&mut self, topic: &str, group: &str) -> Option<&mut u64> {
        self.groups
            .iter_mut()
            .find(|(t, g, _)| t == topic && g == group)
            .map(|(_, _, at)| at)
    }

    /// Whether an entry of the group may be due at `now`, and the stamp to hand to
    /// [`seen`](Self::seen) after the read.
    fn look(&mut self, topic: &str, group: &str, now: u64) -> (bool, u64) {
        let due = self.find(topic, group).is_none_or(|at| *at <= now);
        (due, self.changed)
    }

    /// What a read that began at `stamp` saw: the first due time (`None`: nothing scheduled).
    fn seen(&mut self, topic: &str, group: &str, at: Option<u64>, stamp: u64) {
        let at = at.unwrap_or(u64::MAX);
        // Something was scheduled while the read was out: it may not show in what it saw.
        let raced = self.changed != stamp;
        match self.find(topic, group) {
            Some(known) => *known = if raced { (*known).min(at) } else { at },
            None => {
                if self.groups.len() >= Self::MAX {
                    self.groups.clear();
                }
                let at = if raced { 0 } else { at };
                self.groups.push((topic.to_owned(), group.to_owned(), at));
            }
        }
    }

    /// This process scheduled an entry of the group due at `at`.
    fn scheduled(&mut self, topic: &str, group: &str, at: u64) {
        self.changed += 1;
        if let Some(known) = self.find(topic, group) {
            *known = (*known).min(at);
        }
    }

    /// Entries of any group of the topic may have become due (resumed).
    fn forget(&mut self, topic: &str) {
        self.changed += 1;
        for (t, _, at) in &mut self.groups {
            if t == topic {
                *at = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::connect::redact;
    use super::keys::before;
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

    #[test]
    fn due_times_promote_only_when_something_may_be_due() {
        let mut d = DueTimes::default();
        // Never read: anything may be due.
        let (due, stamp) = d.look("t", "g", 100);
        assert!(due);
        d.seen("t", "g", Some(500), stamp);
        assert!(!d.look("t", "g", 499).0);
        assert!(d.look("t", "g", 500).0);
        // Nothing scheduled: never due until something is.
        let (_, stamp) = d.look("t", "g", 100);
        d.seen("t", "g", None, stamp);
        assert!(!d.look("t", "g", u64::MAX - 1).0);
        d.scheduled("t", "g", 300);
        assert!(d.look("t", "g", 300).0);
        // Another group or topic is not affected.
        let (_, stamp) = d.look("t", "h", 0);
        d.seen("t", "h", None, stamp);
        let (_, stamp) = d.look("u", "g", 0);
        d.seen("u", "g", None, stamp);
        d.forget("t");
        assert!(d.look("t", "h", 0).0);
        assert!(!d.look("u", "g", 1000).0);
    }

    #[test]
    fn a_read_out_while_something_was_scheduled_cannot_hide_it() {
        let mut d = DueTimes::default();
        let (_, stamp) = d.look("t", "g", 0);
        d.seen("t", "g", None, stamp);
        // A read starts, a retry due at 200 is scheduled, the read (which looked before the
        // retry was stored) comes back with "nothing scheduled".
        let (_, stamp) = d.look("t", "g", 100);
        d.scheduled("t", "g", 200);
        d.seen("t", "g", None, stamp);
        assert!(d.look("t", "g", 200).0);
        // The same for a group not seen before: it stays "may be due".
        let (_, stamp) = d.look("t", "new", 100);
        d.scheduled("t", "other", 200);
        d.seen("t", "new", None, stamp);
        assert!(d.look("t", "new", 0).0);
    }

    #[test]
    fn schedule_scores_in_both_protocols() {
        use ::redis::Value;
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let first = |score: Value| read::first_score(Value::Array(vec![bulk("1-0"), score]));
        assert_eq!(read::first_score(Value::Array(vec![])), None);
        assert_eq!(first(bulk("1733000000123")), Some(1_733_000_000_123));
        let resp3 = Value::Array(vec![Value::Array(vec![bulk("1-0"), Value::Double(42.0)])]);
        assert_eq!(read::first_score(resp3), Some(42));
        // Never due; due now; not a number: due now (the promote script looks itself).
        assert_eq!(first(bulk("inf")), None);
        assert_eq!(first(bulk("-5")), Some(0));
        assert_eq!(first(bulk("-inf")), Some(0));
        assert_eq!(first(bulk("nan")), Some(0));
        assert_eq!(first(bulk("x")), Some(0));
        assert_eq!(first(Value::Nil), Some(0));
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
