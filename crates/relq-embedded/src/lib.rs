//! The embedded engine: a crash-safe message store in a data directory, the default backend.
//!
//! ```text
//! <data dir>/
//!   LOCK                      held (flock) while a process has the directory open
//!   state.redb                topics, groups, redelivery rows, stop markers, dead letters
//!   topics/<topic>@<epoch>/   the topic's log: 00000000000000000000.seg, ...
//!                             (and <from>-<to>.gap: offsets skipped after damage, see [`log`])
//! ```
//!
//! # Damage
//! Open recovers each topic's active segment (a torn tail is cut; a damaged record followed by
//! valid ones is corruption, refused unless [`Recovery::CutDamagedTail`]), never hands out an
//! offset the state database refers to again, and reports a damaged state database as
//! [`BackendErrorKind::Corrupt`] (a panic inside redb included). The session record in the
//! state database (`session_gen`, `session_end`) tells recovery whether the last session closed
//! cleanly. [`EmbeddedBackend::check`] inspects a directory without changing it, and
//! [`EmbeddedBackend::open_read_only`] serves its topics and dead letters without changing it
//! (no lock, no recovery, no writes), even while another process has it open.
//!
//! Messages live in a per-topic segmented log (`log.rs`); what changes as messages are read and
//! settled lives in a small redb database (`state.rs`). A message id is `<ms>-<offset>`: the
//! publish time and the record's position in the topic's log.
//!
//! # Commit cycle
//! One committer thread owns all writes. A cycle takes every queued operation (publishes, topic
//! creation and termination, dead-letter replay/delete/purge) and every state change made since
//! the last cycle (reads, acks, retries, dead letters, stops), then:
//! 1. appends the publishes to the topics' logs (page cache);
//! 2. fdatasyncs every log file written, in parallel when several topics were written;
//! 3. writes the state changes in one redb transaction and commits it (fsync);
//! 4. makes the new records readable and completes the callers.
//!
//! Callers queue while a cycle runs, so the next cycle takes everything that arrived during the
//! sync: group commit. No lock a caller needs is held during a sync. A failed write or sync
//! poisons the engine: every call fails with [`BackendErrorKind::Fatal`] until the directory is
//! reopened, because after a failed fsync the kernel may have dropped the data.
//!
//! # Panics
//! A panic in engine code poisons the engine the same way, with an error that names where it
//! happened and its message: on the committer or syncer thread (caught around each batch's
//! staging and each round's commit, and around each thread as a whole), in engine code a
//! caller's task runs under the engine lock or against the state database (redb may panic on a
//! damaged page rather than report it), and in log reads on tokio's blocking pool. Every waiter
//! is answered at once: a caller whose reply the panicking thread dropped waits for the poison
//! to be recorded and gets it; reads waiting for messages, callers waiting for a commit or for
//! room in the queue are woken; once the committer has ended, operations are failed as they
//! are queued. The engine lock is never left poisoned (in std's sense) for a caller to panic
//! on: `lock` takes it as it is. Nothing acknowledged is lost: a reopen recovers as after a
//! crash.
//!
//! # What is durable when
//! See [`Durability`]. In-flight deliveries are kept in memory only: after a crash, a message
//! that was delivered and not settled is delivered again (its delivery count is raised by one).

mod backend_impl;
mod check;
mod codec;
mod commit;
mod config;
mod fs;
mod group;
mod group_ops;
#[cfg(unix)]
mod local;
mod log;
mod read;
mod recovery;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_tests;
mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

pub use self::check::{CheckReport, DamageKind, SegmentDamage, TopicCheck};
use self::codec::Record;
pub use self::config::{Durability, EmbeddedConfig, Recovery};
use self::fs::{RealFs, Storage};
use self::group::GroupState;
use self::log::TopicLog;
use self::state::{Batch, DeadKey, RowKey, SpillRange, TopicRecord};
use relq_core::Backend;
use relq_core::DeadLetterId;
use relq_core::{BackendError, BackendErrorKind};
use relq_core::{Message, MessageId, Outgoing, Timestamp};

pub(crate) const NAME: &str = "embedded";

pub(crate) fn io_error(what: &'static str) -> impl Fn(std::io::Error) -> BackendError {
    move |e| BackendError::new(NAME, BackendErrorKind::Fatal, format!("{what}: {e}")).with_source(e)
}

pub(crate) fn corrupt(message: String) -> BackendError {
    BackendError::new(NAME, BackendErrorKind::Corrupt, message)
}

pub(crate) fn db_error(e: impl Into<redb::Error>) -> BackendError {
    let e: redb::Error = e.into();
    // redb reports damage it detects as `Corrupted`, and a file that is not a database at all
    // as an I/O error of kind `InvalidData`.
    let kind = match &e {
        redb::Error::Corrupted(_) => BackendErrorKind::Corrupt,
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            BackendErrorKind::Corrupt
        }
        _ => BackendErrorKind::Fatal,
    };
    BackendError::new(NAME, kind, format!("state database: {e}")).with_source(e)
}

/// The name of the writer thread (see "Commit cycle").
const COMMITTER: &str = "relq-committer";
/// The name of the thread that syncs and commits written batches.
const SYNCER: &str = "relq-syncer";

fn fatal(message: impl Into<String>) -> BackendError {
    BackendError::new(NAME, BackendErrorKind::Fatal, message)
}

fn invalid(message: impl Into<String>) -> BackendError {
    BackendError::new(NAME, BackendErrorKind::Invalid, message)
}

/// The error for a panic caught in engine code: `place` panicked, and why. The engine is
/// poisoned with it (see [`Shared::poison`]).
fn panicked(place: &str, p: &(dyn std::any::Any + Send)) -> BackendError {
    fatal(format!("{place} panicked: {}", panic_message(p)))
}

/// The error for a panic caught on the current engine thread (it names the thread).
fn panicked_here(p: &(dyn std::any::Any + Send)) -> BackendError {
    let name = std::thread::current().name().map_or_else(
        || "an engine thread".to_owned(),
        |n| format!("the {n} thread"),
    );
    panicked(&name, p)
}

/// Checks a message the way the broker does (type, headers) and against the record format
/// (which a caller of [`Backend::publish`] could otherwise exceed, bypassing the broker):
/// message `i` of a batch of `n`.
fn validate_outgoing(i: usize, n: usize, m: &Outgoing) -> Result<(), BackendError> {
    let which = || match n {
        1 => String::new(),
        _ => format!("message {} of the batch of {n}: ", i + 1),
    };
    relq_core::validate_kind(&m.kind)
        .map_err(|e| invalid(format!("{}{e}; nothing was published", which())).with_source(e))?;
    // Its message already ends with "nothing was published".
    relq_core::validate_headers(&m.headers)
        .map_err(|e| invalid(format!("{}{e}", which())).with_source(e))?;
    codec::check(&m.kind, &m.headers, m.payload.len(), m.deliver_at.is_some())
        .map_err(|why| invalid(format!("{}{why}; nothing was published", which())))
}

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Runs `f`, which reads the state database, turning a panic inside redb (which may panic on a
/// file damaged outside it rather than report it) into a `Corrupt` error.
fn catch_db<T>(f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(corrupt(format!(
            "state database: reading it panicked ({})",
            panic_message(&*p)
        )))
    })
}

/// As [`catch_db`], and a `Corrupt` error also says which file is damaged and what to do.
fn guard_db<T>(
    path: &Path,
    root: &Path,
    f: impl FnOnce() -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    catch_db(f).map_err(|mut e| {
        if e.kind == BackendErrorKind::Corrupt {
            e.message = format!(
                "the state database {} is damaged ({}). Run `relq check {}` to see what is \
                 damaged, and restore the data directory (state.redb together \
                 with its topics directory) from a backup: the topic logs alone cannot rebuild \
                 the groups' positions, retries and dead letters",
                path.display(),
                e.message,
                root.display()
            );
        }
        e
    })
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

/// The embedded engine. Open it with [`EmbeddedBackend::open`] or
/// `relq::Broker::open`. One process at a time may open a data directory.
pub struct EmbeddedBackend {
    shared: Arc<Shared>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The admin socket other processes reach the directory through (see `crate::local`).
    #[cfg(unix)]
    local: Mutex<Option<crate::local::LocalServer>>,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend")
            .field("root", &self.shared.root)
            .finish()
    }
}

struct Shared {
    config: EmbeddedConfig,
    root: PathBuf,
    storage: Arc<dyn Storage>,
    db: StateDb,
    gen: u32,
    inner: Mutex<Inner>,
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    queue_space: Arc<Semaphore>,
    /// Batches handed to the syncer and not yet completed.
    queued_rounds: std::sync::atomic::AtomicUsize,
    counters: Counters,
    _lock: Box<dyn std::any::Any + Send + Sync>,
    /// Opened with [`EmbeddedBackend::open_read_only`]: no committer runs, and every call that
    /// would change anything is refused (see [`Shared::writable`]).
    read_only: bool,
    /// Read-only only: topics whose log an open would refuse (corruption), with the error their
    /// info answers. A normal open fails as a whole instead.
    damaged: BTreeMap<String, String>,
    /// The groups' rate limit buckets (not durable: a reopen starts them full).
    buckets: Mutex<relq_core::TokenBuckets>,
}

/// The state database. It is closed under `catch_unwind`: redb left broken by a panic inside it
/// (its internal locks poisoned, see [`Shared::poison`]) panics when closed, and that panic must
/// not reach whoever drops the engine last. (The unwinding still closes the rest: the file and
/// its lock, so the directory can be reopened.)
struct StateDb(Option<redb::Database>);

impl std::ops::Deref for StateDb {
    type Target = redb::Database;

    fn deref(&self) -> &redb::Database {
        match &self.0 {
            Some(db) => db,
            // Taken only by `drop`, after which nothing can borrow it.
            None => unreachable!("the state database is taken only when dropped"),
        }
    }
}

impl Drop for StateDb {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db)));
            if closed.is_err() {
                tracing::warn!(
                    "closing the state database panicked after an earlier failure; the next \
                     open recovers it"
                );
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    cycles: AtomicU64,
    syncs: AtomicU64,
    records: AtomicU64,
    state_commits: AtomicU64,
    sync_micros: AtomicU64,
    rows_spilled: AtomicU64,
    rows_unspilled: AtomicU64,
}

/// What the engine has done since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct EngineStats {
    /// Commit cycles run.
    pub cycles: u64,
    /// fdatasync calls on log files (one per written file per cycle, plus one per sealed segment).
    pub syncs: u64,
    /// Messages appended to logs.
    pub records: u64,
    /// State database transactions committed.
    pub state_commits: u64,
    /// Time spent in commit rounds' syncs (log and state), in microseconds.
    pub sync_micros: u64,
    /// Scheduled rows that left memory for the state database (due beyond the resident window).
    pub rows_spilled: u64,
    /// Spilled rows taken back into memory (due, or needed by a stop).
    pub rows_unspilled: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// State changes up to this sequence number are durable.
    durable: u64,
    poisoned: bool,
    /// The committer thread ended (closed, or a panic): nothing more becomes durable.
    stopped: bool,
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    state_dirty: bool,
    /// A caller needs a sync round even in periodic mode.
    force_sync: bool,
    shutdown: bool,
    /// The committer thread ended: an operation queued now would never be taken, so it is
    /// failed at once. Set, and the queue drained, under this lock, so no operation slips in
    /// between.
    closed: bool,
}

type Reply<T> = oneshot::Sender<Result<T, BackendError>>;

enum Op {
    Publish {
        topic: String,
        msgs: Vec<Outgoing>,
        reply: Reply<Vec<MessageId>>,
        _permit: OwnedSemaphorePermit,
    },
    Create {
        topic: String,
        reply: Reply<()>,
    },
    Terminate {
        topic: String,
        reply: Reply<bool>,
    },
    Replay {
        topic: String,
        ids: Vec<DeadLetterId>,
        reply: Reply<Replayed>,
    },
    DeleteDead {
        topic: String,
        ids: Vec<DeadLetterId>,
        reply: Reply<u64>,
    },
    PurgeDead {
        topic: String,
        before: Timestamp,
        reply: Reply<u64>,
    },
}

impl Op {
    fn fail(self, e: &BackendError) {
        let err = || BackendError::new(NAME, e.kind, e.message.clone());
        match self {
            Op::Publish { reply, .. } => drop(reply.send(Err(err()))),
            Op::Create { reply, .. } => drop(reply.send(Err(err()))),
            Op::Terminate { reply, .. } => drop(reply.send(Err(err()))),
            Op::Replay { reply, .. } => drop(reply.send(Err(err()))),
            Op::DeleteDead { reply, .. } | Op::PurgeDead { reply, .. } => {
                drop(reply.send(Err(err())))
            }
        }
    }
}

struct TopicState {
    epoch: u64,
    log: Arc<TopicLog>,
    start: u64,
    last_dead: MessageId,
    dead_count: u64,
    groups: BTreeMap<String, GroupState>,
    /// Stopped offsets and their ids' milliseconds.
    stopped: BTreeMap<u64, u64>,
    ready: Arc<Notify>,
    /// Idempotency keys published within their window (see `state::DEDUP`).
    dedup: relq_core::DedupIndex,
}

impl TopicState {
    fn record(&self) -> TopicRecord {
        TopicRecord {
            epoch: self.epoch,
            start: self.start,
            last_dead: self.last_dead,
            dead_count: self.dead_count,
        }
    }
}

#[derive(Default)]
struct Dirty {
    next_epoch: bool,
    drop_topics: Vec<String>,
    drop_groups: Vec<(String, String)>,
    topics: BTreeSet<String>,
    groups: BTreeSet<(String, String)>,
    rows: BTreeSet<RowKey>,
    /// Spilled rows to remove by offset range.
    trim_spill: Vec<SpillRange>,
    stopped: BTreeSet<(String, u64)>,
    dead: Vec<(DeadKey, Option<Vec<u8>>)>,
    /// Processed-key records: (topic, group, key) and the end of the record, `None` to remove.
    processed: Vec<((String, String, String), Option<u64>)>,
    /// Ended idempotency keys: topic, key, when found ended (see `Batch::dedup_remove`).
    dedup_remove: Vec<(String, String, u64)>,
    /// Rows an ordering key passed to, made due once committed (see `Batch::promote`).
    promote: Vec<RowKey>,
}

struct Inner {
    topics: HashMap<String, TopicState>,
    next_epoch: u64,
    /// Bumped by every state change; the committer reports how far it made changes durable.
    change_seq: u64,
    dirty: Dirty,
    /// Dead letters whose removal is not committed yet, so two operations never remove (or
    /// replay) one twice.
    dead_deleting: HashSet<DeadKey>,
    poison: Option<String>,
    /// Rows due later than now plus this many milliseconds are spilled.
    window_ms: u64,
}

impl Inner {
    /// Encodes every change since the last snapshot.
    fn snapshot(&mut self) -> (Batch, u64) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut b = Batch {
            drop_topics: dirty.drop_topics,
            drop_groups: dirty.drop_groups,
            next_epoch: dirty.next_epoch.then_some(self.next_epoch),
            dead: dirty.dead,
            trim_spill: dirty.trim_spill,
            dedup_remove: dirty.dedup_remove,
            promote: dirty.promote,
            ..Batch::default()
        };
        // A record of a group deleted since is removed (the group's drop comes first).
        for ((t, g, k), v) in dirty.processed {
            let exists = self
                .topics
                .get(&t)
                .is_some_and(|ts| ts.groups.contains_key(&g));
            b.processed.push(((t, g, k), v.filter(|_| exists)));
        }
        for t in dirty.topics {
            let v = self
                .topics
                .get(&t)
                .map(|ts| state::encode_json(&ts.record()));
            b.topics.push((t, v));
        }
        for (t, g) in dirty.groups {
            if let Some(gs) = self.topics.get(&t).and_then(|ts| ts.groups.get(&g)) {
                b.groups.push(((t, g), gs.record().encode()));
            }
        }
        // A row waiting beyond the window goes to the spill table (and leaves memory once that
        // is committed, see `after_commit`); any other row goes to `rows`.
        let line = Timestamp::now().0.saturating_add(self.window_ms);
        for (t, g, o) in dirty.rows {
            let Some(gs) = self.topics.get_mut(&t).and_then(|ts| ts.groups.get_mut(&g)) else {
                b.rows.push(((t, g, o), None));
                continue;
            };
            let row = gs.rows.get(&o);
            let spill = row
                .filter(|r| r.spillable() && r.due > line && !gs.pending.contains_key(&o))
                .map(|r| (r.due, state::encode_spilled(r)));
            let spill_due = spill.as_ref().map(|(d, _)| *d);
            let v = match spill {
                Some((_, v)) => Some(v),
                None => row.map(state::encode_json),
            };
            if let Some(d) = gs.spill_at.get(&o).copied() {
                if spill_due != Some(d) {
                    gs.spill_at.remove(&o);
                    gs.unspilling.insert(o);
                    b.unspill.push(((t.clone(), g.clone(), o), d));
                }
            }
            match (spill_due, v) {
                (Some(d), Some(v)) => {
                    gs.spill_at.insert(o, d);
                    b.spill.push(((t.clone(), g.clone(), o), d, v));
                    b.rows.push(((t, g, o), None));
                }
                (_, v) => b.rows.push(((t, g, o), v)),
            }
        }
        for (t, o) in dirty.stopped {
            let v = self
                .topics
                .get(&t)
                .and_then(|ts| ts.stopped.get(&o).copied());
            b.stopped.push(((t, o), v));
        }
        (b, self.change_seq)
    }

    fn touch(&mut self) -> u64 {
        self.change_seq += 1;
        self.change_seq
    }

    /// Bookkeeping once `batch` is committed: spilled rows that did not change since leave
    /// memory; removed spill entries stop being skipped. Returns how many rows left memory.
    fn after_commit(&mut self, batch: &Batch, trimmed: &[u64]) -> u64 {
        for (key, v) in &batch.dead {
            if v.is_none() {
                self.dead_deleting.remove(key);
            }
        }
        let Inner { topics, dirty, .. } = self;
        let mut evicted = 0;
        fn group<'a>(
            topics: &'a mut HashMap<String, TopicState>,
            t: &str,
            g: &str,
        ) -> Option<&'a mut GroupState> {
            topics.get_mut(t).and_then(|ts| ts.groups.get_mut(g))
        }
        for ((t, g, o), _) in &batch.unspill {
            if let Some(gs) = group(topics, t, g) {
                gs.unspilling.remove(o);
            }
        }
        // Keys passed on by settlements now durable: their next messages become due.
        let now = Timestamp::now().0;
        for (t, g, o) in &batch.promote {
            let Some(ts) = topics.get_mut(t) else {
                continue;
            };
            let Some(gs) = ts.groups.get_mut(g) else {
                continue;
            };
            if gs.make_due(*o, now) {
                dirty.rows.insert((t.clone(), g.clone(), *o));
                ts.ready.notify_waiters();
            }
        }
        for ((t, g, _, _), n) in batch.trim_spill.iter().zip(trimmed) {
            if let Some(gs) = group(topics, t, g) {
                gs.spilled = gs.spilled.saturating_sub(*n);
            }
        }
        for ((t, g, o), d, _) in &batch.spill {
            let Some(gs) = group(topics, t, g) else {
                continue;
            };
            let unchanged = gs.spill_at.get(o) == Some(d)
                && !gs.pending.contains_key(o)
                && gs.rows.get(o).is_some_and(|r| r.spillable() && r.due == *d);
            // A row changed since the snapshot is dirty again: the next snapshot decides.
            if unchanged && !dirty.rows.contains(&(t.clone(), g.clone(), *o)) {
                gs.remove_row(*o);
                gs.spill_at.remove(o);
                gs.spilled_out(*d);
                evicted += 1;
            }
        }
        evicted
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Below this much free disk space the engine reports itself not ready.
const MIN_FREE_DISK: u64 = 256 << 20;

fn topic_dir(root: &Path, topic: &str, epoch: u64) -> PathBuf {
    root.join("topics").join(format!("{topic}@{epoch}"))
}

fn message_of(r: &Record, attempt: u32) -> Message {
    let stored = Outgoing {
        kind: r.kind.clone(),
        payload: r.payload.clone(),
        headers: r.headers.clone(),
        deliver_at: r.deliver_at.map(Timestamp),
        dedup_window: None,
    };
    Message::new(
        MessageId::new(r.ms, r.offset),
        stored,
        Timestamp(r.ms),
        attempt,
    )
}

impl EmbeddedBackend {
    /// Opens (creating if needed) the data directory `path` with the default configuration.
    ///
    /// # Errors
    /// The directory is in use by another process, cannot be created, or holds corrupt data.
    pub fn open(path: impl AsRef<Path>) -> Result<EmbeddedBackend, BackendError> {
        Self::open_with(path, EmbeddedConfig::default())
    }

    /// Opens the data directory `path` with `config`.
    ///
    /// # Errors
    /// As [`open`](Self::open), or an invalid configuration.
    pub fn open_with(
        path: impl AsRef<Path>,
        config: EmbeddedConfig,
    ) -> Result<EmbeddedBackend, BackendError> {
        config.validate().map_err(|e| {
            BackendError::new(NAME, BackendErrorKind::Invalid, e.to_string()).with_source(e)
        })?;
        Self::open_on(Arc::new(RealFs), path.as_ref(), config)
    }

    /// Opens the data directory `path` for inspection only: the topics, their info and the dead
    /// letters as they are on disk, without taking the directory's lock and without writing
    /// anything. So it works while another process has the directory open (a running service),
    /// and on a directory the user may read but not write.
    ///
    /// - Nothing on disk changes: no lock file, no recovery (a torn tail at a log's end is
    ///   simply where what is served ends, not cut), no syncs, no state commits, unknown topic
    ///   directories left alone. Segment files are opened read-only; the state database is read
    ///   into memory and opened there, so redb's own recovery of a database that was not closed
    ///   (the running writer's) happens on the copy. Its memory is the size of `state.redb`.
    /// - It is a snapshot: what a running writer commits afterwards is not seen. Deliveries in
    ///   flight in the writer show as scheduled (as a reopen after a crash would have them).
    /// - [`topics`](Backend::topics), [`topic_info`](Backend::topic_info),
    ///   [`dead_letters`](Backend::dead_letters), [`dead_letter`](Backend::dead_letter) and
    ///   [`dead_letter_stats`](Backend::dead_letter_stats) work; every other call (publish, join,
    ///   read, settle, stop and resume, terminate, cleanup, replay, delete, purge) fails at once
    ///   with [`BackendErrorKind::Invalid`], saying the directory was opened read-only.
    /// - A topic whose active segment an open would refuse (a damaged record followed by valid
    ///   ones) is listed, and its `topic_info` is that [`Corrupt`](BackendErrorKind::Corrupt)
    ///   error; the other topics are served. [`check`](Self::check) tells more.
    ///
    /// # Errors
    /// `path` is not a readable directory, a file cannot be read, or the state database is
    /// damaged ([`Corrupt`](BackendErrorKind::Corrupt)).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<EmbeddedBackend, BackendError> {
        Self::open_mode(
            Arc::new(fs::ReadOnlyFs),
            path.as_ref(),
            EmbeddedConfig::default(),
            true,
        )
    }

    fn open_on(
        storage: Arc<dyn Storage>,
        root: &Path,
        config: EmbeddedConfig,
    ) -> Result<EmbeddedBackend, BackendError> {
        Self::open_mode(storage, root, config, false)
    }

    /// The engine in `path`, shared with other processes through its admin socket; or, when
    /// another process holds the directory, that process reached through its socket. What
    /// `relq::Broker::open` and `file://` URLs use.
    ///
    /// # Errors
    /// As [`EmbeddedBackend::open_with`]; [`BackendErrorKind::Unavailable`] when another process
    /// holds the directory and cannot be reached.
    pub fn open_shared(
        path: &Path,
        config: EmbeddedConfig,
    ) -> Result<Arc<dyn Backend>, BackendError> {
        match EmbeddedBackend::open_with(path, config.clone()) {
            Ok(e) => Ok(Arc::new(e).share()),
            #[cfg(unix)]
            Err(e) if e.kind == BackendErrorKind::Unavailable => {
                match crate::local::LocalClient::connect(path, config) {
                    Some(holder) => Ok(Arc::new(holder)),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Shares the directory: other processes that open it (and find it locked) reach it through
    /// this one, on its admin socket (see docs/design.md, "A held data directory"). Needs a
    /// tokio runtime; without one, or if the socket cannot be created, the directory is simply
    /// not shared (logged at debug level).
    pub(crate) fn share(self: Arc<Self>) -> Arc<dyn Backend> {
        #[cfg(unix)]
        if !self.shared.read_only {
            let weak = Arc::downgrade(&self);
            let weak: std::sync::Weak<dyn Backend> = weak;
            match crate::local::serve(&self.shared.root, weak) {
                Ok(server) => *lock(&self.local) = Some(server),
                Err(e) => {
                    tracing::debug!(error = %e, "the data directory is not shared with other processes")
                }
            }
        }
        self
    }

    /// Counters of the commit cycles so far.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        EngineStats {
            rows_spilled: c.rows_spilled.load(Ordering::Relaxed),
            rows_unspilled: c.rows_unspilled.load(Ordering::Relaxed),
            cycles: c.cycles.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            state_commits: c.state_commits.load(Ordering::Relaxed),
            sync_micros: c.sync_micros.load(Ordering::Relaxed),
        }
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.shared.root
    }

    /// Checks the data directory `path` without changing anything: every segment's records and
    /// checksums (and the bytes after each segment's end, as recovery reads them), the state
    /// database (an in-memory copy, integrity-checked), and the state's consistency with the
    /// logs. Files are opened read-only and the directory lock is not taken, so it works while
    /// another process has the directory open, and on a read-only directory.
    ///
    /// Damage is reported in the [`CheckReport`], not as an error; see
    /// [`CheckReport::is_ok`].
    ///
    /// # Errors
    /// `path` is not a readable directory, or a file cannot be read.
    pub fn check(path: impl AsRef<Path>) -> Result<CheckReport, BackendError> {
        check::check(path.as_ref())
    }
}

impl Drop for EmbeddedBackend {
    fn drop(&mut self) {
        // Other processes stop reaching the directory through this one first.
        #[cfg(unix)]
        drop(lock(&self.local).take());
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = lock(&self.committer).take() {
            let joined = t.join().is_ok();
            // The committer's last round synced everything written: record a clean close, so
            // the next open knows no write of this session can be torn. Not after a failure.
            if joined && lock(&self.shared.inner).poison.is_none() {
                // Where each topic's records end, so the next open reads no further.
                let high_water: Vec<(String, (u64, u64))> = lock(&self.shared.inner)
                    .topics
                    .iter()
                    .map(|(t, ts)| (format!("{t}@{}", ts.epoch), ts.log.high_water()))
                    .collect();
                let closed =
                    catch_db(|| state::mark_closed(&self.shared.db, self.shared.gen, &high_water));
                if let Err(e) = closed {
                    tracing::warn!(error = %e, "could not record the clean close of the data directory");
                }
            }
        }
    }
}

type Replayed = Vec<(DeadLetterId, MessageId)>;
