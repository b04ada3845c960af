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

mod check;
mod codec;
mod fs;
mod group;
#[cfg(unix)]
mod local;
mod log;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_tests;
mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

pub use self::check::{CheckReport, DamageKind, SegmentDamage, TopicCheck};
use self::codec::Record;
use self::fs::{RealFs, Storage, StorageFile};
use self::group::{GroupState, Pending};
use self::log::{LogConfig, ReadHint, TopicLog};
use self::state::{Batch, DeadKey, Row, RowKey, SpillRange, TopicRecord};
use relq_core::{
    replay_message, Backend, BackendMetric, Browse, CleanupReport, ConsumerInfo, Delivery,
    GroupInfo, GroupPlacement, Health, HealthCheck, Placement, Retention, Settlement, Subscription,
    TopicInfo,
};
use relq_core::{BackendError, BackendErrorKind, ConfigError};
use relq_core::{DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats};
use relq_core::{Message, MessageId, Outgoing, StartPosition, Timestamp};

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

/// What an acknowledged operation survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every publish, acknowledgement, retry and dead letter is fdatasynced before the call
    /// returns (many callers share one sync). Survives a process crash and a power loss, on a
    /// disk that honours flushes. The default.
    #[default]
    Sync,
    /// Writes reach the operating system before the call returns and are synced every
    /// `interval`. A publish survives a process crash (kill -9) once acknowledged; a power loss
    /// or kernel crash loses up to `interval` of publishes. Acknowledgements, retries and dead
    /// letters since the last sync are forgotten by any crash, so those messages are delivered
    /// again (never lost).
    Periodic(Duration),
}

/// What open does with damage in a topic's active (newest) log segment that is not a torn write:
/// a damaged record followed by valid ones. (A torn tail, with nothing valid after it, is always
/// cut and logged; see `docs/design.md`, failure model.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Recovery {
    /// Refuse to open: the error ([`BackendErrorKind::Corrupt`]) names the topic, segment,
    /// position and offsets, and nothing on disk changes. The default.
    #[default]
    Refuse,
    /// The operator's decision: cut the damaged record and every record after it in that
    /// segment, logging at error level exactly what was dropped. Offsets of dropped records are
    /// never handed out again. Use it after `relq check` showed the damage and a restore from a
    /// backup is not possible.
    CutDamagedTail,
}

/// Configuration of an [`EmbeddedBackend`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EmbeddedConfig {
    /// What an acknowledged operation survives. Default [`Durability::Sync`].
    pub durability: Durability,
    /// Size of a log segment file. Retention frees disk space a segment at a time. Default
    /// 64 MiB.
    pub segment_size: u64,
    /// Bytes of recent messages kept in memory per topic, so consumers that keep up never read
    /// the disk. Default 16 MiB.
    pub tail_cache: usize,
    /// Most messages waiting for a commit cycle; publishers wait beyond it. Default 65,536.
    pub max_queued: usize,
    /// Scheduled messages (retries, delayed messages a group has read past) due within this
    /// window are held in memory; later ones wait in the state database only, and reads take
    /// them back in due order when their time comes. So millions of far-future messages cost
    /// disk, not memory or reopen time. Default 30 s.
    pub resident_window: Duration,
    /// What open does with a damaged record followed by valid ones in an active segment.
    /// Default [`Recovery::Refuse`].
    pub recovery: Recovery,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            durability: Durability::Sync,
            segment_size: 64 << 20,
            tail_cache: 16 << 20,
            max_queued: 65_536,
            resident_window: Duration::from_secs(30),
            recovery: Recovery::Refuse,
        }
    }
}

impl EmbeddedConfig {
    /// Sets the durability mode.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
    /// Sets the segment size.
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }
    /// Sets the per-topic tail cache size.
    pub fn tail_cache(mut self, bytes: usize) -> Self {
        self.tail_cache = bytes;
        self
    }
    /// Sets how many messages may wait for a commit cycle.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }
    /// Sets the window of scheduled messages held in memory.
    pub fn resident_window(mut self, window: Duration) -> Self {
        self.resident_window = window;
        self
    }
    /// Sets what open does with damage followed by valid records (see [`Recovery`]).
    pub fn recovery(mut self, recovery: Recovery) -> Self {
        self.recovery = recovery;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.segment_size < 4096 {
            return Err(ConfigError::new(
                "segment_size",
                "must be at least 4096 bytes",
            ));
        }
        if self.max_queued == 0 {
            return Err(ConfigError::new("max_queued", "must be at least 1"));
        }
        if let Durability::Periodic(d) = self.durability {
            if d.is_zero() {
                return Err(ConfigError::new(
                    "durability",
                    "the periodic sync interval must be positive (use Durability::Sync)",
                ));
            }
        }
        Ok(())
    }
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
            ..Batch::default()
        };
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
                .filter(|r| !r.parked && r.due > line && !gs.pending.contains_key(&o))
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
                && gs.rows.get(o).is_some_and(|r| !r.parked && r.due == *d);
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

fn no_state(root: &Path) -> BackendError {
    corrupt(format!(
        "{} holds topic logs but no state.redb; refusing to guess their state (restore \
         state.redb or remove the topics directory)",
        root.display()
    ))
}

/// Per topic, the offset after the highest one the committed state refers to: group cursors,
/// floors and done ranges, redelivery rows (resident and spilled), the retention start. Those
/// offsets were handed out. (A dead letter's message was read by a group, so its cursor covers
/// it; stop markers are not counted, as a stop may name any id.)
fn referenced_offsets(
    db: &redb::Database,
    loaded: &state::Loaded,
) -> Result<HashMap<String, u64>, BackendError> {
    let mut out: HashMap<String, u64> = HashMap::new();
    let mut raise = |t: &str, o: u64| {
        let e = out.entry(t.to_owned()).or_default();
        *e = (*e).max(o);
    };
    for (t, rec) in &loaded.topics {
        raise(t, rec.start);
    }
    for ((t, g), rec) in &loaded.groups {
        let done = rec.done.iter().map(|(_, b)| *b).max().unwrap_or(0);
        raise(t, rec.cursor.max(rec.floor).max(done));
        if let Some(o) = state::spilled_offset(db, t, g, true)? {
            raise(t, o.saturating_add(1));
        }
    }
    for (t, _, o) in loaded.rows.keys() {
        raise(t, o.saturating_add(1));
    }
    Ok(out)
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

    /// Opens the data directory, for writing or (`read_only`) for inspection. Every step that
    /// would change the disk is skipped read-only; what recovery decides is applied in memory
    /// only.
    fn open_mode(
        storage: Arc<dyn Storage>,
        root: &Path,
        config: EmbeddedConfig,
        read_only: bool,
    ) -> Result<EmbeddedBackend, BackendError> {
        let topics_dir = root.join("topics");
        let db_path = root.join("state.redb");
        let (db, lock_guard, logs_present): (_, Box<dyn std::any::Any + Send + Sync>, _) =
            if read_only {
                let names = storage.list(root).map_err(|e| {
                    BackendError::new(
                        NAME,
                        BackendErrorKind::Unavailable,
                        format!("reading the data directory {}: {e}", root.display()),
                    )
                    .with_source(e)
                })?;
                let had_state = names.iter().any(|n| n == "state.redb");
                let logs_present = match storage.list(&topics_dir) {
                    Ok(names) => !names.is_empty(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => return Err(io_error("listing topics")(e)),
                };
                if !had_state && logs_present {
                    return Err(no_state(root));
                }
                // Without a state database there is nothing yet: an empty one, in memory.
                let db = guard_db(&db_path, root, || {
                    fs::open_db_copy(&*storage, &db_path, had_state)
                })?;
                (db, Box::new(()), logs_present)
            } else {
                let had_state = storage
                    .list(root)
                    .map(|names| names.iter().any(|n| n == "state.redb"))
                    .unwrap_or(false);
                storage.create_dir_all(&topics_dir).map_err(|e| {
                    BackendError::new(
                        NAME,
                        BackendErrorKind::Fatal,
                        format!("creating the data directory {}: {e}", root.display()),
                    )
                    .with_source(e)
                })?;
                let lock_guard = match storage
                    .lock_dir(root)
                    .map_err(io_error("locking the data directory"))?
                {
                    Some(g) => g,
                    None => {
                        return Err(BackendError::new(
                            NAME,
                            BackendErrorKind::Unavailable,
                            format!(
                                "data directory {} is in use by another process (or another \
                                 backend in this one); `EmbeddedBackend::open_read_only` can \
                                 inspect it meanwhile",
                                root.display()
                            ),
                        ))
                    }
                };
                let logs_present = !storage
                    .list(&topics_dir)
                    .map_err(io_error("listing topics"))?
                    .is_empty();
                if !had_state && logs_present {
                    return Err(no_state(root));
                }
                let db = guard_db(&db_path, root, || storage.open_db(&db_path))?;
                // The new entries (topics/, state.redb) must survive a power loss too.
                storage
                    .sync_dir(root)
                    .map_err(io_error("syncing the data directory"))?;
                if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                    let _ = storage.sync_dir(parent);
                }
                (db, lock_guard, logs_present)
            };
        // This boot of the machine: a last session that crashed in the same one was killed, not
        // cut off by a power loss (see `log`, "Recovery").
        let boot = storage.boot_id();
        // Every offset the committed state refers to, per topic: the log must not hand any of
        // them out again (see `log`, "Offsets are never reused").
        let (loaded, referenced) = guard_db(&db_path, root, || {
            let loaded = state::load(&db, boot)?;
            let referenced = referenced_offsets(&db, &loaded)?;
            Ok((loaded, referenced))
        })?;
        let log_config = |gen| LogConfig {
            segment_size: config.segment_size,
            tail_bytes: config.tail_cache,
            gen,
        };
        // Topic directories: open those the state knows, remove the rest (a crash between a
        // terminate's commit and the removal, or a creation that never committed).
        let mut logs = HashMap::new();
        let mut damaged = BTreeMap::new();
        let dirs = match logs_present {
            true => storage
                .list(&topics_dir)
                .map_err(io_error("listing topics"))?,
            false => Vec::new(),
        };
        for name in dirs {
            let known = name.rsplit_once('@').and_then(|(t, e)| {
                let e: u64 = e.parse().ok()?;
                loaded
                    .topics
                    .get(t)
                    .filter(|r| r.epoch == e)
                    .map(|_| t.to_owned())
            });
            let dir = topics_dir.join(&name);
            match known {
                Some(t) => {
                    let ctx = log::OpenContext {
                        topic: &t,
                        last: loaded.last_session,
                        referenced: referenced.get(&t).copied().unwrap_or(0),
                        repair: config.recovery == Recovery::CutDamagedTail,
                        read_only,
                        high_water: loaded.high_water.get(&name).copied(),
                    };
                    match TopicLog::open(storage.clone(), dir, log_config(loaded.gen), &ctx) {
                        Ok(opened) => {
                            logs.insert(t, (Arc::new(opened.log), opened.found_end));
                        }
                        Err(e) if read_only && e.kind == BackendErrorKind::Corrupt => {
                            damaged.insert(t, e.message);
                        }
                        Err(e) => return Err(e),
                    }
                }
                None if read_only => {
                    tracing::debug!(dir = %dir.display(), "a topic directory the state does not know (left as it is: opened read-only)");
                }
                None => {
                    tracing::info!(dir = %dir.display(), "removing a topic directory the state does not know");
                    log::destroy_dir(&*storage, &dir)?;
                }
            }
        }
        let now = Timestamp::now();
        let mut inner = Inner {
            topics: HashMap::new(),
            next_epoch: loaded.next_epoch,
            change_seq: 0,
            dirty: Dirty::default(),
            dead_deleting: HashSet::new(),
            poison: None,
            window_ms: config
                .resident_window
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        };
        // Where each log's stored records ended before open skipped past offsets handed out.
        let mut found_ends = HashMap::new();
        for (name, rec) in &loaded.topics {
            if damaged.contains_key(name) {
                continue;
            }
            let Some((log, found_end)) = logs.remove(name) else {
                let why = format!(
                    "topic {name:?} (generation {}) has no log directory",
                    rec.epoch
                );
                // Read-only, that topic's info is the error; the others are served.
                if read_only {
                    damaged.insert(name.clone(), why);
                    continue;
                }
                return Err(corrupt(why));
            };
            found_ends.insert(name.clone(), found_end);
            inner.topics.insert(
                name.clone(),
                TopicState {
                    epoch: rec.epoch,
                    start: rec.start.max(log.first_offset()),
                    log,
                    last_dead: rec.last_dead,
                    dead_count: rec.dead_count,
                    groups: BTreeMap::new(),
                    stopped: BTreeMap::new(),
                    ready: Arc::new(Notify::new()),
                },
            );
        }
        for ((t, g), rec) in &loaded.groups {
            if let Some(ts) = inner.topics.get_mut(t) {
                let mut gs = GroupState::from_record(rec);
                if let Some((n, first)) = loaded.spilled.get(&(t.clone(), g.clone())) {
                    gs.spilled = *n;
                    gs.spill_min = *first;
                }
                ts.groups.insert(g.clone(), gs);
            }
        }
        // Rows beyond the window (written by a build without spilling, or with a wider window)
        // are spilled by the first commit.
        let line = now.0.saturating_add(inner.window_ms);
        let mut dirty_rows = Vec::new();
        for ((t, g, o), row) in loaded.rows {
            if let Some(gs) = inner
                .topics
                .get_mut(&t)
                .and_then(|ts| ts.groups.get_mut(&g))
            {
                if !row.parked && row.due > line {
                    dirty_rows.push((t, g.clone(), o));
                }
                gs.put_row(o, row, false);
            }
        }
        for ((t, o), ms) in loaded.stopped {
            if let Some(ts) = inner.topics.get_mut(&t) {
                ts.stopped.insert(o, ms);
            }
        }
        // Deliveries in flight when the process died come back as redelivery rows, due now, with
        // the lost delivery counted.
        let mut recovered = 0usize;
        let mut dirty_groups = Vec::new();
        let mut dirty_stopped = Vec::new();
        // Spilled rows of messages the log no longer has.
        let mut trim_spill = Vec::new();
        for (t, ts) in &mut inner.topics {
            let start = ts.start;
            let end = ts.log.visible();
            // Offsets `found..end` were handed out but are not stored (lost with damage, or
            // with a power loss in periodic mode) or were never used: nothing refers to them
            // any more, and the log never hands them out again.
            let found = found_ends.get(t).copied().unwrap_or(end).min(end);
            let ahead: Vec<u64> = ts.stopped.range(found..).map(|(o, _)| *o).collect();
            for o in ahead {
                ts.stopped.remove(&o);
                dirty_stopped.push((t.clone(), o));
            }
            let read_past = ts.groups.values().filter(|g| g.cursor > found).count();
            let mut rows_lost = 0usize;
            for (g, gs) in &mut ts.groups {
                let before = gs.record();
                if gs.cursor < start {
                    gs.cursor = start;
                }
                let lost: Vec<u64> = gs
                    .rows
                    .keys()
                    .filter(|o| (found..end).contains(*o))
                    .copied()
                    .collect();
                rows_lost += lost.len();
                for o in lost {
                    gs.remove_row(o);
                    dirty_rows.push((t.clone(), g.clone(), o));
                }
                if found < end {
                    if gs.spilled > 0 {
                        trim_spill.push((t.clone(), g.clone(), found, end));
                    }
                    gs.mark_range_done(found, end);
                }
                gs.raise_floor(start.min(gs.cursor));
                for o in gs.lost_in_flight() {
                    gs.mark_done(o);
                    if gs.rows.contains_key(&o) {
                        continue;
                    }
                    gs.put_row(
                        o,
                        Row {
                            due: now.0,
                            deliveries: 1,
                            failures: Vec::new(),
                            parked: false,
                        },
                        false,
                    );
                    dirty_rows.push((t.clone(), g.clone(), o));
                    recovered += 1;
                }
                if gs.record() != before {
                    dirty_groups.push((t.clone(), g.clone()));
                }
            }
            let known = referenced.get(t).copied().unwrap_or(0);
            // Read-only, a running writer may be ahead of the snapshot: nothing to report.
            if known > found && !read_only {
                // Committed state refers to records the log no longer has. In sync mode that
                // takes damage to synced data; in periodic mode a power loss can do it.
                let periodic = matches!(
                    loaded.last_session,
                    log::LastSession::Crashed { sync: false, .. } | log::LastSession::Unknown
                );
                let lost = known - found;
                if periodic {
                    tracing::warn!(topic = %t, log_end = found, state_refers_up_to = known, lost, groups_past_the_end = read_past, rows_dropped = rows_lost,
                        "the state database is ahead of the log (a power loss in periodic mode): {lost} messages that were read are gone; their offsets are not reused");
                } else {
                    tracing::error!(topic = %t, log_end = found, state_refers_up_to = known, lost, groups_past_the_end = read_past, rows_dropped = rows_lost,
                        "the state database is ahead of the log: {lost} committed messages (offsets {found} to {}) are gone from the log, which takes damage to synced data; their offsets are not reused, new messages start at {end}", known - 1);
                }
            }
        }
        if recovered > 0 && !read_only {
            tracing::warn!(
                messages = recovered,
                "deliveries in flight at the last crash will be delivered again"
            );
        }
        inner.dirty.rows.extend(dirty_rows);
        inner.dirty.stopped.extend(dirty_stopped);
        inner.dirty.groups.extend(dirty_groups);
        inner.dirty.trim_spill.extend(trim_spill);
        let counters = Counters::default();
        if read_only {
            // What recovery decided stays in memory: nothing is written.
            inner.dirty = Dirty::default();
        } else {
            let (mut batch, _) = inner.snapshot();
            // This session starts writing: until it closes cleanly, a later open must allow
            // for torn writes of its `gen` (see `log`, "Recovery"). Recorded only now, after
            // every log was recovered, so a failed open leaves the last writer's record in
            // place.
            let running = match config.durability {
                Durability::Sync => state::SESSION_RUNNING_SYNC,
                Durability::Periodic(_) => state::SESSION_RUNNING_PERIODIC,
            };
            batch.session = Some((u64::from(loaded.gen), running, boot.unwrap_or(0)));
            let trimmed = guard_db(&db_path, root, || {
                let tx = db.begin_write().map_err(db_error)?;
                let trimmed = state::apply(&tx, &batch)?;
                tx.commit().map_err(db_error)?;
                Ok(trimmed)
            })?;
            let evicted = inner.after_commit(&batch, &trimmed);
            counters.rows_spilled.store(evicted, Ordering::Relaxed);
        }
        // Read-only, nothing will ever be committed: anything queued by mistake fails at once,
        // and nobody waits for a commit.
        let (progress, _) = watch::channel(Progress {
            stopped: read_only,
            ..Progress::default()
        });
        let queue = Queue {
            closed: read_only,
            ..Queue::default()
        };
        let shared = Arc::new(Shared {
            queue_space: Arc::new(Semaphore::new(config.max_queued)),
            queued_rounds: std::sync::atomic::AtomicUsize::new(0),
            counters,
            config,
            root: root.to_owned(),
            storage,
            db: StateDb(Some(db)),
            gen: loaded.gen,
            inner: Mutex::new(inner),
            queue: Mutex::new(queue),
            wake: Condvar::new(),
            progress,
            _lock: lock_guard,
            read_only,
            damaged,
        });
        if read_only {
            return Ok(EmbeddedBackend {
                shared,
                committer: Mutex::new(None),
                #[cfg(unix)]
                local: Mutex::new(None),
            });
        }
        let committer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(COMMITTER.into())
                .spawn(move || {
                    // A panic anywhere in the writer poisons the engine; then (or on a normal
                    // close) whatever is still queued is answered and nobody waits any more.
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        shared.clone().run()
                    }));
                    if let Err(p) = run {
                        shared.poison(&panicked_here(&*p));
                    }
                    shared.writer_stopped();
                })
                .map_err(io_error("starting the committer thread"))?
        };
        Ok(EmbeddedBackend {
            shared,
            committer: Mutex::new(Some(committer)),
            #[cfg(unix)]
            local: Mutex::new(None),
        })
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
/// A replayed dead letter, an index into `CycleWork::published` and the record's index there.
type ReplayItem = (DeadLetterId, usize, usize);

/// Records appended for one operation.
struct Published {
    log: Arc<TopicLog>,
    ready: Arc<Notify>,
    records: Vec<Arc<Record>>,
}

/// Results to deliver once a cycle committed.
#[derive(Default)]
struct CycleWork {
    published: Vec<Published>,
    publish_replies: Vec<(Reply<Vec<MessageId>>, usize, usize)>,
    created: Vec<Reply<()>>,
    terminated: Vec<(Reply<bool>, bool)>,
    destroy: Vec<(Arc<TopicLog>, Arc<Notify>)>,
    /// Each replay's reply and (dead letter, index into `published`, index of the record).
    replays: Vec<(Reply<Replayed>, Vec<ReplayItem>)>,
    counts: Vec<(Reply<u64>, u64)>,
    touched: Vec<Arc<TopicLog>>,
    /// The last batch before the engine closes.
    shutdown: bool,
    /// Sync this round even in periodic mode.
    force_sync: bool,
}

impl CycleWork {
    /// Makes the synced records readable and answers their publishers (not replays: those wait
    /// for the dead letters' removal).
    fn publish_early(&mut self) {
        if !self.replays.is_empty() {
            return;
        }
        for p in &self.published {
            p.log.make_visible(&p.records);
            p.ready.notify_waiters();
        }
        for (reply, i, n) in self.publish_replies.drain(..) {
            let r = &self.published[i].records;
            let _ = reply.send(Ok(r[..n]
                .iter()
                .map(|r| MessageId::new(r.ms, r.offset))
                .collect()));
        }
        self.published.clear();
    }

    /// Answers every caller of the batch with `e`.
    fn fail(self, e: &BackendError) {
        let err = || BackendError::new(NAME, e.kind, e.message.clone());
        for (r, _, _) in self.publish_replies {
            let _ = r.send(Err(err()));
        }
        for r in self.created {
            let _ = r.send(Err(err()));
        }
        for (r, _) in self.terminated {
            let _ = r.send(Err(err()));
        }
        for (r, _) in self.replays {
            let _ = r.send(Err(err()));
        }
        for (r, _) in self.counts {
            let _ = r.send(Err(err()));
        }
    }
}

impl Shared {
    fn check(&self) -> Result<(), BackendError> {
        match &lock(&self.inner).poison {
            Some(p) => Err(poisoned(p)),
            None => Ok(()),
        }
    }

    /// The first check of every call that changes anything: fails at once when the directory
    /// was opened read-only, or the engine is poisoned.
    fn writable(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Err(invalid(format!(
                "the data directory {} was opened read-only (for inspection): publishing, \
                 consuming, settling and every other change need `EmbeddedBackend::open`",
                self.root.display()
            )));
        }
        self.check()
    }

    fn sync_mode(&self) -> bool {
        self.config.durability == Durability::Sync
    }

    fn submit(&self, op: Op) {
        let mut q = lock(&self.queue);
        if q.closed {
            drop(q);
            op.fail(&self.closed_error());
            return;
        }
        q.ops.push(op);
        drop(q);
        self.wake.notify_one();
    }

    /// Why the engine no longer answers: its poison, or that it was closed.
    fn closed_error(&self) -> BackendError {
        self.check()
            .err()
            .unwrap_or_else(|| fatal("the engine was closed"))
    }

    /// The answer for a caller whose reply was dropped unanswered. That happens only when the
    /// thread holding it panicked (or failed) before answering, and the poison is recorded only
    /// once that thread has unwound: so wait for it (or for the committer's end) and answer with
    /// it.
    async fn lost_reply(&self) -> BackendError {
        let mut rx = self.progress.subscribe();
        let _ = rx.wait_for(|p| p.poisoned || p.stopped).await;
        self.closed_error()
    }

    /// The committer thread ended: fails every operation still queued (and, through `closed`,
    /// every one queued later), and tells the waiters that nothing more becomes durable.
    fn writer_stopped(&self) {
        let ops = {
            let mut q = lock(&self.queue);
            q.closed = true;
            std::mem::take(&mut q.ops)
        };
        let e = self.closed_error();
        for op in ops {
            op.fail(&e);
        }
        self.progress.send_modify(|p| p.stopped = true);
    }

    /// Runs `f` (engine code in a caller's task), turning a panic in it into the poison of the
    /// engine: the caller gets that error instead of the panic, and every later call fails with
    /// it. (Were it to unwind into the caller, any state `f` changed halfway would stay behind
    /// for the others.) Never call it with the engine lock held: poisoning takes it.
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
            let e = panicked("engine code in a caller's task", &*p);
            self.poison(&e);
            Err(e)
        })
    }

    /// Runs `f` under the engine lock, failing at once if the engine is poisoned; a panic in
    /// `f` poisons it (see [`guarded`](Self::guarded)). The lock is released before poisoning,
    /// and a lock left poisoned (in std's sense) by a panic is taken as it is (see [`lock`]),
    /// so no later caller panics on it.
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.guarded(|| {
            let mut inner = lock(&self.inner);
            if let Some(p) = &inner.poison {
                return Err(poisoned(p));
            }
            f(&mut inner)
        })
    }

    /// Waits until the state change numbered `ticket` is durable (or at once in periodic mode).
    async fn durable(&self, ticket: u64) -> Result<(), BackendError> {
        if !self.sync_mode() {
            {
                let mut q = lock(&self.queue);
                q.state_dirty = true;
            }
            self.wake.notify_one();
            return self.check();
        }
        self.durable_synced(ticket).await
    }

    /// Waits until change `ticket` was synced, forcing a sync round in periodic mode too.
    async fn durable_synced(&self, ticket: u64) -> Result<(), BackendError> {
        {
            let mut q = lock(&self.queue);
            q.state_dirty = true;
            q.force_sync = true;
        }
        self.wake.notify_one();
        let mut rx = self.progress.subscribe();
        let p = *rx
            .wait_for(|p| p.durable >= ticket || p.poisoned || p.stopped)
            .await
            .map_err(|_| fatal("the engine was closed"))?;
        if p.durable < ticket {
            return Err(self.closed_error());
        }
        Ok(())
    }

    async fn call<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        self.check()?;
        self.submit(op);
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.lost_reply().await),
        }
    }

    /// The writer thread: takes queued operations and appends them to the logs (page cache),
    /// then hands each batch to the syncer and goes on with the next one. So batch k+1 is
    /// written while batch k is being synced.
    fn run(self: Arc<Self>) {
        let interval = match self.config.durability {
            Durability::Sync => None,
            Durability::Periodic(d) => Some(d),
        };
        let (to_syncer, rounds) = std::sync::mpsc::channel::<CycleWork>();
        let syncer = {
            let shared = self.clone();
            std::thread::Builder::new()
                .name(SYNCER.into())
                .spawn(move || {
                    // The batches in hand when it panics are dropped unanswered; their callers
                    // wait for this poison (see `lost_reply`).
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        shared.sync_loop(rounds)
                    }));
                    if let Err(p) = run {
                        shared.poison(&panicked_here(&*p));
                    }
                })
        };
        let syncer = match syncer {
            Ok(t) => t,
            Err(e) => {
                self.poison(&io_error("starting the syncer thread")(e));
                return;
            }
        };
        let mut last_tick = Instant::now();
        loop {
            let (ops, shutdown, state_dirty, force_sync) = {
                let mut q = lock(&self.queue);
                loop {
                    if !q.ops.is_empty() || q.state_dirty || q.shutdown {
                        break;
                    }
                    match interval {
                        None => q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner()),
                        Some(d) => {
                            let left = d.saturating_sub(last_tick.elapsed());
                            if left.is_zero() {
                                break;
                            }
                            q = self
                                .wake
                                .wait_timeout(q, left)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                    }
                }
                (
                    std::mem::take(&mut q.ops),
                    q.shutdown,
                    std::mem::take(&mut q.state_dirty),
                    std::mem::take(&mut q.force_sync),
                )
            };
            let tick = interval.is_some_and(|d| last_tick.elapsed() >= d);
            if tick {
                last_tick = Instant::now();
            }
            if ops.is_empty() && !state_dirty && !tick && !shutdown {
                continue;
            }
            let mut w = CycleWork {
                shutdown,
                // 11: the writer's tick forces the sync, so syncs keep to the interval.
                force_sync: force_sync || tick,
                ..CycleWork::default()
            };
            let poison = lock(&self.inner).poison.clone();
            let mut ops = ops.into_iter();
            let staged = match poison {
                Some(p) => Err(poisoned(&p)),
                // A panic while staging fails the batch and poisons like an error (the op being
                // staged is lost with its reply: its caller waits for the poison).
                None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    ops.by_ref().try_for_each(|op| self.stage(op, &mut w))
                }))
                .unwrap_or_else(|p| Err(panicked_here(&*p))),
            };
            match staged {
                Ok(()) if interval.is_none() && self.queued_rounds.load(Ordering::Acquire) == 0 => {
                    // The syncer has nothing in hand: commit this batch here and spare the
                    // hand-off (a light load gets one thread wake-up less per commit).
                    self.round(vec![w], &mut last_tick);
                }
                Ok(()) => {
                    self.queued_rounds.fetch_add(1, Ordering::AcqRel);
                    if let Err(std::sync::mpsc::SendError(w)) = to_syncer.send(w) {
                        // The syncer ended (it panicked): once it has recorded why, fail this
                        // batch with that and stop; the queue is failed as the thread ends.
                        let _ = syncer.join();
                        if lock(&self.inner).poison.is_none() {
                            self.poison(&fatal("the relq-syncer thread stopped"));
                        }
                        w.fail(&self.closed_error());
                        return;
                    }
                }
                Err(e) => {
                    self.poison(&e);
                    ops.for_each(|op| op.fail(&e));
                    w.fail(&e);
                }
            }
            if shutdown {
                drop(to_syncer);
                // The syncer catches its own panics and poisons; should one escape anyway, the
                // last rounds may not have synced: poison, so no clean close is recorded.
                if syncer.join().is_err() && lock(&self.inner).poison.is_none() {
                    self.poison(&fatal("the relq-syncer thread stopped"));
                }
                return;
            }
        }
    }

    /// Counts dead letters removed in this cycle (written in the same transaction).
    fn dead_removed(&self, topic: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut inner = lock(&self.inner);
        if let Some(ts) = inner.topics.get_mut(topic) {
            ts.dead_count = ts.dead_count.saturating_sub(n);
            inner.dirty.topics.insert(topic.to_owned());
        }
    }

    /// Marks the engine failed: every later call errs until the directory is reopened.
    /// Marks the engine failed: every later call errs until the directory is reopened. Every
    /// waiter is woken to see it: reads waiting for messages, callers waiting for a commit or
    /// for room in the queue.
    fn poison(&self, e: &BackendError) {
        tracing::error!(error = %e, "the embedded engine failed and is poisoned; reopen the data directory");
        let mut inner = lock(&self.inner);
        if inner.poison.is_none() {
            inner.poison = Some(e.message.clone());
        }
        for t in inner.topics.values() {
            t.ready.notify_waiters();
        }
        drop(inner);
        self.queue_space.close();
        self.progress.send_modify(|p| p.poisoned = true);
    }

    /// The syncer thread: makes written batches durable (log fdatasync, state commit), then
    /// completes their callers. Every batch that arrived while it synced goes into the next round.
    fn sync_loop(&self, rounds: std::sync::mpsc::Receiver<CycleWork>) {
        let mut last_sync = Instant::now();
        while let Ok(first) = rounds.recv() {
            let mut works = vec![first];
            works.extend(rounds.try_iter());
            let n = works.len();
            self.round(works, &mut last_sync);
            self.queued_rounds.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Makes `works` durable and answers their callers (or fails them and poisons).
    fn round(&self, mut works: Vec<CycleWork>, last_sync: &mut Instant) {
        let sync = match self.config.durability {
            Durability::Sync => true,
            Durability::Periodic(d) => {
                last_sync.elapsed() >= d || works.iter().any(|w| w.shutdown || w.force_sync)
            }
        };
        let poison = lock(&self.inner).poison.clone();
        let result = match poison {
            Some(p) => Err(poisoned(&p)),
            // A panic (in redb's commit, say) fails the round and poisons like an error.
            None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.commit(&mut works, sync)
            }))
            .unwrap_or_else(|p| Err(panicked_here(&*p))),
        };
        match result {
            Ok(()) => {
                for w in works {
                    if let Err(e) = self.complete(w) {
                        self.poison(&e);
                    }
                }
            }
            Err(e) => {
                // Poisoned before anyone hears of the failure, so no caller can slip in.
                self.poison(&e);
                for w in works {
                    w.fail(&e);
                }
            }
        }
        if sync {
            *last_sync = Instant::now();
        }
    }

    /// Syncs the written log files and commits the state changes made so far.
    fn commit(&self, works: &mut [CycleWork], sync: bool) -> Result<(), BackendError> {
        let files: Vec<Arc<dyn StorageFile>> = if sync {
            // The log handles are copied out first: take_dirty waits for the writer's lock,
            // which must never stall callers of `inner`.
            let mut logs: Vec<Arc<TopicLog>> = {
                let inner = lock(&self.inner);
                inner.topics.values().map(|t| t.log.clone()).collect()
            };
            logs.extend(works.iter().flat_map(|w| w.touched.iter().cloned()));
            logs.iter().filter_map(|l| l.take_dirty()).collect()
        } else {
            Vec::new()
        };
        let (batch, seq) = lock(&self.inner).snapshot();
        // State never refers to unsynced records (readers only see synced ones), so the two
        // syncs can overlap; a replay deletes dead letters whose copies it just appended, so
        // there the log goes first.
        let replay = works.iter().any(|w| !w.replays.is_empty());
        // A new topic's record must be durable before its first publishes are acknowledged
        // (open removes directories the state does not know), in periodic mode too: redb
        // forgets a non-durable commit at a crash (or after a failed commit), and with it every
        // publish to the topic. Likewise a terminate, whose directory goes once it committed.
        let structural = batch.next_epoch.is_some() || !batch.drop_topics.is_empty();
        let started = Instant::now();
        if batch.is_empty() || files.is_empty() || replay || structural {
            sync_all(&files)?;
            self.commit_state(&batch, sync || structural)?;
            self.check()?;
        } else {
            std::thread::scope(|s| {
                // Publishes need only their log sync: answer them without waiting for the
                // state commit.
                let files = &files;
                let logs = s.spawn(move || {
                    sync_all(files)?;
                    // Another thread's failed sync (a seal, a replay) poisons: trust nothing.
                    self.check()?;
                    for w in works.iter_mut() {
                        w.publish_early();
                    }
                    Ok(())
                });
                let state = self.commit_state(&batch, sync);
                let logs = logs
                    .join()
                    .unwrap_or_else(|p| Err(panicked("a log sync thread", &*p)));
                logs.and(state)
            })?;
        }
        let c = &self.counters;
        c.sync_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.syncs.fetch_add(files.len() as u64, Ordering::Relaxed);
        c.cycles.fetch_add(1, Ordering::Relaxed);
        if sync {
            self.progress
                .send_modify(|p| p.durable = p.durable.max(seq));
        }
        Ok(())
    }

    fn commit_state(&self, batch: &Batch, sync: bool) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(db_error)?;
        if !sync {
            tx.set_durability(redb::Durability::None)
                .map_err(|e| db_error(redb::Error::from(e)))?;
        }
        let trimmed = state::apply(&tx, batch)?;
        tx.commit().map_err(db_error)?;
        self.counters.state_commits.fetch_add(1, Ordering::Relaxed);
        let evicted = lock(&self.inner).after_commit(batch, &trimmed);
        self.counters
            .rows_spilled
            .fetch_add(evicted, Ordering::Relaxed);
        Ok(())
    }

    /// Makes a committed batch's records readable and answers its callers.
    fn complete(&self, mut w: CycleWork) -> Result<(), BackendError> {
        for p in &w.published {
            p.log.make_visible(&p.records);
            p.ready.notify_waiters();
        }
        let id = |i: usize, j: usize| {
            let r = &w.published[i].records[j];
            MessageId::new(r.ms, r.offset)
        };
        for (reply, i, n) in w.publish_replies.drain(..) {
            let ids = (0..n).map(|j| id(i, j)).collect();
            let _ = reply.send(Ok(ids));
        }
        for (reply, items) in w.replays.drain(..) {
            let out = items.iter().map(|(dl, i, j)| (*dl, id(*i, *j))).collect();
            let _ = reply.send(Ok(out));
        }
        for (reply, n) in w.counts {
            let _ = reply.send(Ok(n));
        }
        for r in w.created {
            let _ = r.send(Ok(()));
        }
        for (log, ready) in &w.destroy {
            ready.notify_waiters();
            log.destroy()?;
        }
        for (r, existed) in w.terminated {
            let _ = r.send(Ok(existed));
        }
        Ok(())
    }

    /// The topic's state, created (directory, first segment, record) if needed. Committer only.
    fn topic_or_create<'a>(
        &self,
        inner: &'a mut Inner,
        topic: &str,
    ) -> Result<&'a mut TopicState, BackendError> {
        if !inner.topics.contains_key(topic) {
            let epoch = inner.next_epoch;
            inner.next_epoch += 1;
            inner.dirty.next_epoch = true;
            let log = TopicLog::create(
                self.storage.clone(),
                topic_dir(&self.root, topic, epoch),
                LogConfig {
                    segment_size: self.config.segment_size,
                    tail_bytes: self.config.tail_cache,
                    gen: self.gen,
                },
            )?;
            inner.topics.insert(
                topic.to_owned(),
                TopicState {
                    epoch,
                    log: Arc::new(log),
                    start: 0,
                    last_dead: MessageId::ZERO,
                    dead_count: 0,
                    groups: BTreeMap::new(),
                    stopped: BTreeMap::new(),
                    ready: Arc::new(Notify::new()),
                },
            );
            inner.dirty.topics.insert(topic.to_owned());
            inner.touch();
        }
        Ok(inner.topics.get_mut(topic).expect("inserted above"))
    }

    /// Carries out the log part of one operation (committer only).
    fn stage(&self, op: Op, w: &mut CycleWork) -> Result<(), BackendError> {
        match op {
            Op::Publish {
                topic, msgs, reply, ..
            } => {
                let created = {
                    let mut inner = lock(&self.inner);
                    self.topic_or_create(&mut inner, &topic)
                        .map(|ts| (ts.log.clone(), ts.ready.clone()))
                };
                let (log, ready) = match created {
                    Ok(x) => x,
                    Err(e) if e.kind == BackendErrorKind::Full => {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let mut records = Vec::with_capacity(msgs.len());
                let n = msgs.len();
                match log.append(msgs, Timestamp::now().0, &mut records) {
                    Ok(()) => {}
                    // A full disk, or a message the record format cannot hold, refuses this
                    // publish before anything is written; the engine stays healthy.
                    Err(e)
                        if matches!(e.kind, BackendErrorKind::Full | BackendErrorKind::Invalid) =>
                    {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
                self.counters.records.fetch_add(n as u64, Ordering::Relaxed);
                w.touched.push(log.clone());
                w.publish_replies.push((reply, w.published.len(), n));
                w.published.push(Published {
                    log,
                    ready,
                    records,
                });
            }
            Op::Create { topic, reply } => {
                let mut inner = lock(&self.inner);
                match self.topic_or_create(&mut inner, &topic) {
                    Ok(_) => w.created.push(reply),
                    Err(e) if e.kind == BackendErrorKind::Full => {
                        let _ = reply.send(Err(e));
                    }
                    Err(e) => return Err(e),
                }
            }
            Op::Terminate { topic, reply } => {
                let mut inner = lock(&self.inner);
                match inner.topics.remove(&topic) {
                    Some(ts) => {
                        // Dead letters settled but not yet written belong to the old topic.
                        inner.dirty.dead.retain(|((t, _, _), _)| *t != topic);
                        inner.dirty.trim_spill.retain(|(t, _, _, _)| *t != topic);
                        inner.dirty.drop_topics.push(topic.clone());
                        inner.dirty.topics.remove(&topic);
                        inner.touch();
                        w.destroy.push((ts.log.clone(), ts.ready.clone()));
                        w.terminated.push((reply, true));
                    }
                    None => w.terminated.push((reply, false)),
                }
            }
            Op::Replay { topic, ids, reply } => {
                let log_ready = {
                    let inner = lock(&self.inner);
                    inner
                        .topics
                        .get(&topic)
                        .map(|ts| (ts.log.clone(), ts.ready.clone()))
                };
                let Some((log, ready)) = log_ready else {
                    let _ = reply.send(Ok(Vec::new()));
                    return Ok(());
                };
                let mut found = Vec::new();
                let mut named = std::collections::HashSet::new();
                for id in ids {
                    let key = (topic.clone(), id.ms, id.seq);
                    // Each dead letter once, however often the call names it.
                    if !named.insert(id) || lock(&self.inner).dead_deleting.contains(&key) {
                        continue;
                    }
                    if let Some(dl) = state::get_dead(&self.db, &topic, id)? {
                        found.push((key, dl));
                    }
                }
                let msgs: Vec<Outgoing> = found.iter().map(|(_, dl)| replay_message(dl)).collect();
                // A dead letter settled through the backend trait was never checked: one whose
                // message the log cannot hold refuses the replay (nothing is written, the dead
                // letters stay).
                let unfit = found.iter().zip(&msgs).find_map(|((_, dl), m)| {
                    codec::check(&m.kind, &m.headers, m.payload.len(), m.deliver_at.is_some())
                        .err()
                        .map(|why| (dl.id, why))
                });
                if let Some((id, why)) = unfit {
                    let _ = reply.send(Err(invalid(format!(
                        "dead letter {id} cannot be replayed: {why}; nothing was replayed"
                    ))));
                    return Ok(());
                }
                let mut records = Vec::with_capacity(msgs.len());
                log.append(msgs, Timestamp::now().0, &mut records)?;
                // The copies are durable before the dead letters' removal can commit, so a
                // crash leaves the dead letter, the new message or both, never neither.
                log.sync_now()?;
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                {
                    let mut inner = lock(&self.inner);
                    for (key, _) in &found {
                        inner.dead_deleting.insert(key.clone());
                        inner.dirty.dead.push((key.clone(), None));
                    }
                }
                let found: Vec<DeadLetter> = found.into_iter().map(|(_, dl)| dl).collect();
                w.touched.push(log.clone());
                self.dead_removed(&topic, found.len() as u64);
                let i = w.published.len();
                let items = found
                    .iter()
                    .enumerate()
                    .map(|(j, dl)| (dl.id, i, j))
                    .collect();
                w.replays.push((reply, items));
                w.published.push(Published {
                    log,
                    ready,
                    records,
                });
                lock(&self.inner).touch();
            }
            Op::DeleteDead { topic, ids, reply } => {
                let mut n = 0;
                for id in ids {
                    let key = (topic.clone(), id.ms, id.seq);
                    if lock(&self.inner).dead_deleting.contains(&key) {
                        continue;
                    }
                    if state::get_dead(&self.db, &topic, id)?.is_some() {
                        let mut inner = lock(&self.inner);
                        inner.dead_deleting.insert(key.clone());
                        inner.dirty.dead.push((key, None));
                        n += 1;
                    }
                }
                self.dead_removed(&topic, n);
                w.counts.push((reply, n));
            }
            Op::PurgeDead {
                topic,
                before,
                reply,
            } => {
                let mut doomed = Vec::new();
                state::scan_dead(&self.db, &topic, None, |dl| {
                    if dl.last_failed_at < before {
                        doomed.push(dl.id);
                    }
                    true
                })?;
                let mut n = 0;
                let mut inner = lock(&self.inner);
                for id in doomed {
                    let key = (topic.clone(), id.ms, id.seq);
                    if inner.dead_deleting.insert(key.clone()) {
                        inner.dirty.dead.push((key, None));
                        n += 1;
                    }
                }
                drop(inner);
                self.dead_removed(&topic, n);
                w.counts.push((reply, n));
            }
        }
        Ok(())
    }

    /// Runs `f` on the subscription's topic and group, or fails with `Terminated`.
    fn with_group<T>(
        &self,
        sub: &Subscription,
        f: impl FnOnce(&mut Inner) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.locked(|inner| match inner.topics.get(&sub.topic) {
            Some(t) if t.epoch == sub.epoch && t.groups.contains_key(&sub.group) => f(inner),
            Some(t) if t.epoch == sub.epoch => Err(group_deleted(&sub.topic, &sub.group)),
            _ => Err(terminated(&sub.topic)),
        })
    }
}

fn poisoned(p: &str) -> BackendError {
    fatal(format!(
        "the engine stopped after a failure and must be reopened: {p}"
    ))
}

/// fdatasyncs the files, in parallel when there are several.
fn sync_all(files: &[Arc<dyn StorageFile>]) -> Result<(), BackendError> {
    match files {
        [] => Ok(()),
        [one] => one.sync_data().map_err(io_error("syncing a segment")),
        many => std::thread::scope(|s| {
            let handles: Vec<_> = many
                .iter()
                .map(|f| s.spawn(move || f.sync_data()))
                .collect();
            for h in handles {
                h.join()
                    .map_err(|p| panicked("a log sync thread", &*p))?
                    .map_err(io_error("syncing a segment"))?;
            }
            Ok(())
        }),
    }
}

/// The group-local part of the operations, under the engine lock.
struct GroupOps<'a> {
    topic: &'a str,
    group: &'a str,
    ts: &'a mut TopicState,
    dirty: &'a mut Dirty,
    db: &'a redb::Database,
    counters: &'a Counters,
}

impl GroupOps<'_> {
    fn g(&mut self) -> &mut GroupState {
        self.ts
            .groups
            .get_mut(self.group)
            .expect("checked by with_group")
    }

    fn dirty_row(&mut self, o: u64) {
        self.dirty
            .rows
            .insert((self.topic.to_owned(), self.group.to_owned(), o));
    }

    fn dirty_group(&mut self) {
        self.dirty
            .groups
            .insert((self.topic.to_owned(), self.group.to_owned()));
    }

    /// Ends the delivery of `o` for good (acknowledged or dead-lettered).
    fn drop_delivery(&mut self, o: u64, had_row: bool) {
        if had_row {
            self.g().remove_row(o);
            self.dirty_row(o);
        } else {
            self.g().mark_done(o);
            self.dirty_group();
        }
    }

    /// Takes out the row that carries `o` on (a retry, a redelivery, a park). A first delivery
    /// has none yet: its offset is handed over (marked done) and a fresh row starts.
    fn take_row(&mut self, o: u64, had_row: bool, now_ms: u64) -> Row {
        self.dirty_row(o);
        if had_row {
            if let Some(row) = self.g().remove_row(o) {
                return row;
            }
        }
        self.g().mark_done(o);
        self.dirty_group();
        Row {
            due: now_ms,
            deliveries: 0,
            failures: Vec::new(),
            parked: false,
        }
    }

    /// Due rows first, then new records after the cursor. Records come from the tail cache or
    /// `pre`; one that would have to be read from a segment file is read here only if
    /// `allow_io`, otherwise the deliveries so far are returned with `missed` set, so the caller
    /// can read it without holding the engine lock (see [`EmbeddedBackend::prefetch`]).
    fn take_ready(
        &mut self,
        consumer: &str,
        max: usize,
        now: Timestamp,
        pre: &mut Prefetch,
        allow_io: bool,
    ) -> Result<Taken, BackendError> {
        let mut out = Vec::new();
        let mut missed = false;
        let mut set_aside = 0;
        let mut more = false;
        let log = self.ts.log.clone();
        self.g().consumers.insert(consumer.to_owned(), now);
        self.promote(now.0, max)?;
        while out.len() < max {
            let Some(&(due, o)) = self.g().due.first() else {
                break;
            };
            if due > now.0 {
                break;
            }
            // Read first: an error leaves the row as it was.
            let rec = match pre.rows.remove(&o) {
                Some(rec) => rec,
                None => match log.get_cached(o) {
                    Some(rec) => rec,
                    None if allow_io => log.get(o)?,
                    None => {
                        return Ok(Taken {
                            out,
                            missed: true,
                            more: false,
                        })
                    }
                },
            };
            let mut row = self.g().remove_row(o).expect("due rows exist");
            self.dirty_row(o);
            if self.ts.stopped.contains_key(&o) {
                row.parked = true;
                self.g().put_row(o, row, false);
                continue;
            }
            let Some(rec) = rec else {
                continue; // removed by retention: the row goes
            };
            row.deliveries += 1;
            let attempt = row.deliveries;
            out.push(Delivery {
                message: message_of(&rec, attempt),
                failures: row.failures.clone(),
            });
            self.g().put_row(o, row, true);
            self.g().pending.insert(
                o,
                Pending {
                    consumer: consumer.to_owned(),
                    delivered_at: now,
                    attempt,
                    row: true,
                },
            );
        }
        let start = self.ts.start;
        let mut moved = false;
        while out.len() < max {
            let g = self.g();
            if g.cursor < start {
                g.cursor = start;
                g.raise_floor(start);
                moved = true;
            }
            // A cursor at or in a gap (offsets skipped after damage, never stored) moves past
            // it: a read from there returns the records after the gap, which must be taken as
            // the records at the cursor (a prefetch would never match it otherwise).
            let past = log.past_gaps(g.cursor);
            if past > g.cursor {
                let from = g.cursor;
                g.mark_range_done(from, past);
                g.cursor = past;
                moved = true;
            }
            let cursor = g.cursor;
            let want = max - out.len();
            // Prefetched records the cursor has passed meanwhile (another consumer of the group
            // took them) are dropped; the rest is used if it starts at the cursor.
            let passed = pre.new.partition_point(|r| r.offset < cursor);
            pre.new.drain(..passed);
            let recs = if pre.new.first().is_some_and(|r| r.offset == cursor) {
                let n = want.min(pre.new.len());
                g.hint = pre.hint.take();
                pre.new.drain(..n).collect()
            } else if let Some(recs) = log.read_cached(cursor, want) {
                recs
            } else if allow_io {
                let mut hint = g.hint.take();
                let recs = log.read(cursor, want, &mut hint)?;
                self.g().hint = hint;
                recs
            } else {
                missed = true;
                break;
            };
            if recs.is_empty() || more {
                break;
            }
            for rec in recs {
                if out.len() >= max {
                    break;
                }
                if set_aside >= SET_ASIDE_MAX {
                    // A long run of delayed messages: the lock is not held for all of it.
                    more = true;
                    break;
                }
                let o = rec.offset;
                let g = self.g();
                g.cursor = o + 1;
                g.cursor_ms = rec.ms;
                moved = true;
                if g.held_already(o) {
                    continue;
                }
                if self.ts.stopped.contains_key(&o) || rec.deliver_at.is_some_and(|at| at > now.0) {
                    let parked = self.ts.stopped.contains_key(&o);
                    let g = self.g();
                    g.mark_done(o);
                    g.put_row(
                        o,
                        Row {
                            due: rec.deliver_at.unwrap_or(now.0),
                            deliveries: 0,
                            failures: Vec::new(),
                            parked,
                        },
                        false,
                    );
                    self.dirty_row(o);
                    set_aside += 1;
                    continue;
                }
                out.push(Delivery {
                    message: message_of(&rec, 1),
                    failures: Vec::new(),
                });
                self.g().pending.insert(
                    o,
                    Pending {
                        consumer: consumer.to_owned(),
                        delivered_at: now,
                        attempt: 1,
                        row: false,
                    },
                );
            }
        }
        if moved {
            self.dirty_group();
        }
        Ok(Taken { out, missed, more })
    }

    /// Takes spilled rows that are due back into memory (at most enough to make `max` due rows
    /// there). They leave the spill table with the next commit; until that is committed, the
    /// table still shows them, so `spill_at` and `unspilling` tell which entries to pass over.
    /// A bounded lookup in the state database (its cache, mostly), under the engine lock.
    fn promote(&mut self, now: u64, max: usize) -> Result<(), BackendError> {
        let start = self.ts.start;
        let g = self
            .ts
            .groups
            .get_mut(self.group)
            .expect("checked by with_group");
        if g.spill_min.is_none_or(|m| m > now) {
            return Ok(());
        }
        let ready = g
            .due
            .iter()
            .take_while(|(d, _)| *d <= now)
            .take(max)
            .count();
        if ready >= max {
            return Ok(());
        }
        let (found, next) =
            state::spilled_due(self.db, self.topic, self.group, now, max - ready, |o| {
                // Below the start: trimmed by retention (the removal rides the next commit).
                o < start || g.spill_at.contains_key(&o) || g.unspilling.contains(&o)
            })?;
        g.spill_min = next;
        self.counters
            .rows_unspilled
            .fetch_add(found.len() as u64, Ordering::Relaxed);
        for (o, row) in found {
            g.spilled = g.spilled.saturating_sub(1);
            g.spill_at.insert(o, row.due);
            g.put_row(o, row, false);
            self.dirty
                .rows
                .insert((self.topic.to_owned(), self.group.to_owned(), o));
        }
        Ok(())
    }

    /// Delivers again the pending entries `pick` selects, to `consumer`.
    fn redeliver(
        &mut self,
        consumer: &str,
        max: usize,
        now: Timestamp,
        pre: &mut HashMap<u64, Option<Arc<Record>>>,
        pick: impl Fn(u64, &Pending) -> bool,
    ) -> Result<Vec<Delivery>, BackendError> {
        let log = self.ts.log.clone();
        self.g().consumers.insert(consumer.to_owned(), now);
        let chosen: Vec<u64> = self
            .g()
            .pending
            .iter()
            .filter(|(o, p)| pick(**o, p))
            .map(|(o, _)| *o)
            .collect();
        let mut out = Vec::new();
        for o in chosen {
            if out.len() >= max {
                break;
            }
            let stopped = self.ts.stopped.contains_key(&o);
            let rec = match pre.remove(&o) {
                Some(rec) => rec,
                None => log.get(o)?,
            };
            let Some(had_row) = self.g().pending.get(&o).map(|p| p.row) else {
                continue;
            };
            // Every redelivery is recorded in a row, so the count survives a crash.
            let mut row = self.take_row(o, had_row, now.0);
            let g = self.g();
            let rec = match rec {
                Some(rec) if !stopped => rec,
                rec => {
                    // Parked (or gone) without counting a delivery that did not happen.
                    let p = g.pending.remove(&o).expect("checked above");
                    if rec.is_some() {
                        row.deliveries = p.attempt;
                        row.parked = true;
                        g.put_row(o, row, false);
                    }
                    continue;
                }
            };
            let p = g.pending.get_mut(&o).expect("checked above");
            p.attempt += 1;
            p.consumer = consumer.to_owned();
            p.delivered_at = now;
            p.row = true;
            let attempt = p.attempt;
            row.deliveries = attempt;
            let failures = row.failures.clone();
            g.put_row(o, row, true);
            out.push(Delivery {
                message: message_of(&rec, attempt),
                failures,
            });
        }
        Ok(out)
    }

    /// Applies one settlement; returns whether the message was pending.
    fn settle(&mut self, s: &Settlement, consumer: &str, now: Timestamp) -> bool {
        let o = s.id().seq;
        let g = self.g();
        // Settled already (by this or another consumer): nothing to do. A retry or dead letter
        // of a superseded delivery (claimed or recovered since) is stale: ignored too.
        let (current, owner_settles) = match g.pending.get(&o) {
            Some(p) => (p.attempt, p.consumer == consumer),
            None => return false,
        };
        let settles = match s {
            Settlement::Ack(_) => None,
            Settlement::Retry { failure, .. } => Some(failure.attempt),
            Settlement::DeadLetter(dl) => Some(dl.message.attempt),
        };
        // Stale: for a delivery that another consumer superseded by a claim. (The settling
        // consumer may have recovered its own message meanwhile: still its run.)
        if settles.is_some_and(|a| a != current) && !owner_settles {
            return false;
        }
        let g = self.g();
        let Some(p) = g.pending.remove(&o) else {
            return false;
        };
        match s {
            Settlement::Ack(_) => self.drop_delivery(o, p.row),
            Settlement::Retry { at, failure, .. } => {
                let mut row = self.take_row(o, p.row, at.0);
                row.due = at.0;
                row.deliveries = p.attempt;
                row.failures.push(failure.clone());
                self.g().put_row(o, row, false);
            }
            Settlement::DeadLetter(dl) => {
                self.drop_delivery(o, p.row);
                let id = self.ts.last_dead.next_after(now.0);
                self.ts.last_dead = id;
                self.ts.dead_count += 1;
                let mut dl = (**dl).clone();
                dl.id = id;
                self.dirty.dead.push((
                    (self.topic.to_owned(), id.ms, id.seq),
                    Some(state::encode_dead(&dl)),
                ));
                self.dirty.topics.insert(self.topic.to_owned());
            }
        }
        true
    }
}

/// The offset a new group at `start` begins reading from.
fn start_offset(log: &TopicLog, begin: u64, start: StartPosition) -> Result<u64, BackendError> {
    let end = log.visible();
    Ok(match start {
        StartPosition::Latest => end,
        StartPosition::Earliest => begin,
        StartPosition::From(id) => {
            // The first record whose id is >= `id`; ids grow with offsets. An offset that holds
            // no record (skipped after damage) stands for the next record stored.
            let (mut lo, mut hi) = (begin, end);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let below = match log.read(mid, 1, &mut None)?.first() {
                    Some(r) => MessageId::new(r.ms, r.offset) < id,
                    None => true,
                };
                if below {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            lo
        }
    })
}

impl Shared {
    fn group_ops<T>(
        &self,
        sub: &Subscription,
        f: impl FnOnce(&mut GroupOps<'_>) -> Result<T, BackendError>,
    ) -> Result<(T, u64), BackendError> {
        self.with_group(sub, |inner| {
            let Inner { topics, dirty, .. } = &mut *inner;
            let ts = topics.get_mut(&sub.topic).expect("checked");
            let mut ops = GroupOps {
                topic: &sub.topic,
                group: &sub.group,
                ts,
                dirty,
                db: &self.db,
                counters: &self.counters,
            };
            let out = f(&mut ops)?;
            let ticket = inner.touch();
            Ok((out, ticket))
        })
    }
}

impl EmbeddedBackend {
    /// Creates the topic and the group (at `start`) if needed, and registers `consumer`.
    /// Returns the topic's epoch and whether the group was created.
    async fn place_group(
        &self,
        topic: &str,
        group: &str,
        consumer: Option<&str>,
        start: StartPosition,
    ) -> Result<(u64, bool), BackendError> {
        let s = &self.shared;
        s.writable()?;
        let exists = lock(&s.inner).topics.contains_key(topic);
        if !exists {
            let (reply, rx) = oneshot::channel();
            s.call(
                Op::Create {
                    topic: topic.to_owned(),
                    reply,
                },
                rx,
            )
            .await?;
        }
        // Where a new group starts is found without the engine lock: it may read the log (a
        // binary search for a start id, the record before the start). If the topic was
        // recreated meanwhile, it is found again in the new generation.
        let mut placed = None;
        let (epoch, created, ticket) = loop {
            let new_group = {
                let inner = lock(&s.inner);
                let Some(ts) = inner.topics.get(topic) else {
                    return Err(terminated(topic));
                };
                match &placed {
                    Some((epoch, _, _)) if *epoch == ts.epoch => None,
                    _ if ts.groups.contains_key(group) => None,
                    _ => Some((ts.epoch, ts.log.clone(), ts.start)),
                }
            };
            if let Some((epoch, log, begin)) = new_group {
                let (cursor, cursor_ms) = blocking(s, move || {
                    let cursor = start_offset(&log, begin, start)?;
                    let cursor_ms = match cursor.checked_sub(1) {
                        Some(prev) => log.get(prev)?.map_or(0, |r| r.ms),
                        None => 0,
                    };
                    Ok((cursor, cursor_ms))
                })
                .await?;
                placed = Some((epoch, cursor, cursor_ms));
            }
            let mut inner = lock(&s.inner);
            let Some(ts) = inner.topics.get(topic) else {
                return Err(terminated(topic));
            };
            let epoch = ts.epoch;
            let created = if ts.groups.contains_key(group) {
                false
            } else {
                let Some((cursor, cursor_ms)) = placed
                    .filter(|(e, _, _)| *e == epoch)
                    .map(|(_, c, ms)| (c, ms))
                else {
                    continue; // recreated meanwhile: place it in the new generation
                };
                // Retention may have moved the start on meanwhile (the record before it is then
                // gone: no remembered time).
                let (cursor, cursor_ms) = match cursor < ts.start {
                    true => (ts.start, 0),
                    false => (cursor, cursor_ms),
                };
                let ts = inner.topics.get_mut(topic).expect("checked");
                ts.groups.insert(
                    group.to_owned(),
                    GroupState {
                        cursor,
                        cursor_ms,
                        floor: cursor,
                        ..GroupState::default()
                    },
                );
                inner
                    .dirty
                    .groups
                    .insert((topic.to_owned(), group.to_owned()));
                true
            };
            let ts = inner.topics.get_mut(topic).expect("checked");
            if let (Some(g), Some(c)) = (ts.groups.get_mut(group), consumer) {
                g.consumers.insert(c.to_owned(), Timestamp::now());
            }
            let ticket = if created { inner.touch() } else { 0 };
            break (epoch, created, ticket);
        };
        if ticket > 0 {
            s.durable(ticket).await?;
        }
        Ok((epoch, created))
    }

    /// Where `to` puts a group's cursor in the topic's current generation: (epoch, offset, the
    /// time of the record before it). Reads the log, so it runs without the engine lock.
    async fn position(
        &self,
        topic: &str,
        to: StartPosition,
    ) -> Result<Option<(u64, u64, u64)>, BackendError> {
        let s = &self.shared;
        let Some((epoch, log, begin)) = lock(&s.inner)
            .topics
            .get(topic)
            .map(|ts| (ts.epoch, ts.log.clone(), ts.start))
        else {
            return Ok(None);
        };
        blocking(s, move || {
            let cursor = start_offset(&log, begin, to)?;
            let cursor_ms = match cursor.checked_sub(1) {
                Some(prev) => log.get(prev)?.map_or(0, |r| r.ms),
                None => 0,
            };
            Ok(Some((epoch, cursor, cursor_ms)))
        })
        .await
    }
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(
        &self,
        topic: &str,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<MessageId>, BackendError> {
        let s = &self.shared;
        s.writable()?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // The trait is public: what reaches the committer must be storable, whoever calls.
        for (i, m) in batch.iter().enumerate() {
            validate_outgoing(i, batch.len(), m)?;
        }
        let n = u32::try_from(batch.len().min(s.config.max_queued)).unwrap_or(u32::MAX);
        // Closed when the engine is poisoned: a publisher waiting for room hears it at once.
        let permit = match s.queue_space.clone().acquire_many_owned(n).await {
            Ok(p) => p,
            Err(_) => return Err(s.closed_error()),
        };
        let (reply, rx) = oneshot::channel();
        s.call(
            Op::Publish {
                topic: topic.to_owned(),
                msgs: batch,
                reply,
                _permit: permit,
            },
            rx,
        )
        .await
    }

    async fn join(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        start: StartPosition,
    ) -> Result<Subscription, BackendError> {
        let (epoch, _) = self
            .place_group(topic, group, Some(consumer), start)
            .await?;
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
        self.shared.writable()?;
        let min = if after == MessageId::ZERO {
            0
        } else {
            after.seq.saturating_add(1)
        };
        self.redeliver(sub, max, |o, p, _| o >= min && p.consumer == sub.consumer)
            .await
    }

    async fn claim(
        &self,
        sub: &Subscription,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.shared.writable()?;
        self.redeliver(sub, max, |_, p, now| now.since(p.delivered_at) >= min_idle)
            .await
    }

    async fn read(
        &self,
        sub: &Subscription,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.shared.writable()?;
        let deadline = relq_core::instant_after(tokio::time::Instant::now(), wait);
        let ready = self
            .shared
            .locked(|inner| match inner.topics.get(&sub.topic) {
                Some(t) if t.epoch == sub.epoch => Ok(t.ready.clone()),
                _ => Err(terminated(&sub.topic)),
            })?;
        let mut pre = Prefetch::default();
        let mut allow_io = false;
        // Set when a pass took nothing and left many changed rows uncommitted: the next pass
        // waits for that commit first (nothing is taken yet, so dropping this future loses
        // nothing). Reading past delayed messages makes rows faster than commits write them.
        let mut catch_up = None;
        loop {
            if let Some(ticket) = catch_up.take() {
                self.shared.durable_synced(ticket).await?;
            }
            let notified = ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Timestamp::now();
            let ((taken, next_due, rows_dirty), ticket) = self.shared.group_ops(sub, |ops| {
                let taken = ops.take_ready(&sub.consumer, max, now, &mut pre, allow_io)?;
                let g = ops.g();
                let next_due = match (g.due.first().map(|(d, _)| *d), g.spill_min) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Ok((taken, next_due, ops.dirty.rows.len()))
            })?;
            let Taken { out, missed, more } = taken;
            if !out.is_empty() || rows_dirty > 0 {
                self.shared.request_commit();
            }
            if out.is_empty() && rows_dirty > MAX_DIRTY_ROWS {
                catch_up = Some(ticket);
            }
            if out.is_empty() && missed {
                // The records are on disk: read them without the engine lock, then try again.
                // Each round moves on (records delivered or set aside, or the group's cursor
                // moved by another consumer); a round handles at most `max` records, so a long
                // run of delayed messages on disk is never walked under the lock. Only if the
                // prefetch found nothing to read is the next round allowed to read under the
                // lock, so the loop cannot spin.
                pre = self.prefetch(sub, max, now).await?;
                allow_io = pre.new.is_empty() && pre.rows.is_empty();
                continue;
            }
            if out.is_empty() && more {
                continue;
            }
            pre = Prefetch::default();
            allow_io = false;
            let now_instant = tokio::time::Instant::now();
            if !out.is_empty() || now_instant >= deadline {
                return Ok(out);
            }
            let mut wake = deadline;
            if let Some(due) = next_due {
                let wait =
                    Duration::from_millis(due.saturating_sub(now.0)).max(Duration::from_millis(1));
                wake = wake.min(now_instant + wait);
            }
            let _ = tokio::time::timeout_at(wake, notified).await;
        }
    }

    async fn settle(&self, sub: &Subscription, batch: &[Settlement]) -> Result<(), BackendError> {
        self.shared.writable()?;
        let now = Timestamp::now();
        let (retried, ticket) = self.shared.group_ops(sub, |ops| {
            let mut retried = false;
            for s in batch {
                retried |=
                    ops.settle(s, &sub.consumer, now) && matches!(s, Settlement::Retry { .. });
            }
            Ok(retried)
        })?;
        if retried {
            let inner = lock(&self.shared.inner);
            if let Some(t) = inner.topics.get(&sub.topic) {
                t.ready.notify_waiters();
            }
        }
        // Wait even when every settlement was applied already (a retried call): the first
        // call's commit may still be running.
        self.shared.durable(ticket).await?;
        Ok(())
    }

    async fn stop_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let s = &self.shared;
        s.writable()?;
        // Reads the state database under the lock (a spilled row): see `locked`.
        let ticket = s.locked(|inner| {
            let Inner { topics, dirty, .. } = &mut *inner;
            let Some(ts) = topics.get_mut(topic) else {
                return Ok(None);
            };
            let o = id.seq;
            ts.stopped.insert(o, id.ms);
            dirty.stopped.insert((topic.to_owned(), o));
            for (g, gs) in ts.groups.iter_mut() {
                // A spilled row comes back into memory to be parked there. (A group with none
                // counted has none: this also keeps a recreated topic's group from finding the
                // old generation's rows before their removal is committed.)
                let spilled = gs.spilled > 0
                    && o >= ts.start
                    && !gs.rows.contains_key(&o)
                    && !gs.spill_at.contains_key(&o)
                    && !gs.unspilling.contains(&o);
                if spilled {
                    if let Some(row) = state::spilled_row(&s.db, topic, g, o)? {
                        gs.spilled = gs.spilled.saturating_sub(1);
                        s.counters.rows_unspilled.fetch_add(1, Ordering::Relaxed);
                        gs.spill_at.insert(o, row.due);
                        gs.put_row(o, row, false);
                    }
                }
                // Waiting for its time (not in flight, not parked already): park it.
                let scheduled =
                    !gs.pending.contains_key(&o) && gs.rows.get(&o).is_some_and(|r| !r.parked);
                if scheduled {
                    let mut row = gs.remove_row(o).expect("scheduled rows exist");
                    row.parked = true;
                    gs.put_row(o, row, false);
                    dirty.rows.insert((topic.to_owned(), g.clone(), o));
                }
            }
            Ok(Some(inner.touch()))
        })?;
        let Some(ticket) = ticket else {
            return Ok(false);
        };
        s.durable(ticket).await?;
        Ok(true)
    }

    async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let s = &self.shared;
        s.writable()?;
        let (was, ticket) = {
            let mut inner = lock(&s.inner);
            let Inner { topics, dirty, .. } = &mut *inner;
            let Some(ts) = topics.get_mut(topic) else {
                return Ok(false);
            };
            let o = id.seq;
            let was = ts.stopped.remove(&o).is_some();
            dirty.stopped.insert((topic.to_owned(), o));
            let now = Timestamp::now();
            for (g, gs) in ts.groups.iter_mut() {
                if gs.rows.get(&o).is_some_and(|r| r.parked) {
                    let mut row = gs.remove_row(o).expect("checked");
                    row.parked = false;
                    row.due = now.0;
                    gs.put_row(o, row, false);
                    dirty.rows.insert((topic.to_owned(), g.clone(), o));
                }
            }
            ts.ready.notify_waiters();
            (was, inner.touch())
        };
        s.durable(ticket).await?;
        Ok(was)
    }

    async fn terminate(&self, topic: &str) -> Result<bool, BackendError> {
        self.shared.writable()?;
        let (reply, rx) = oneshot::channel();
        self.shared
            .call(
                Op::Terminate {
                    topic: topic.to_owned(),
                    reply,
                },
                rx,
            )
            .await
    }

    async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError> {
        self.shared.writable()?;
        Ok(self.place_group(topic, group, None, start).await?.1)
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<bool, BackendError> {
        let s = &self.shared;
        s.writable()?;
        let ticket = {
            let mut inner = lock(&s.inner);
            let Inner { topics, dirty, .. } = &mut *inner;
            let Some(ts) = topics.get_mut(topic) else {
                return Ok(false);
            };
            if ts.groups.remove(group).is_none() {
                return Ok(false);
            }
            dirty.drop_groups.push((topic.to_owned(), group.to_owned()));
            ts.ready.notify_waiters();
            inner.touch()
        };
        s.durable(ticket).await?;
        Ok(true)
    }

    async fn move_group(
        &self,
        topic: &str,
        group: &str,
        to: StartPosition,
    ) -> Result<bool, BackendError> {
        let s = &self.shared;
        s.writable()?;
        loop {
            let Some((epoch, target, target_ms)) = self.position(topic, to).await? else {
                return Ok(false);
            };
            // Reads the state database under the lock (spilled rows): see `locked`.
            let ticket = s.locked(|inner| {
                let Inner { topics, dirty, .. } = &mut *inner;
                let Some(ts) = topics.get_mut(topic) else {
                    return Ok(Some(None));
                };
                if ts.epoch != epoch {
                    return Ok(None); // recreated meanwhile: place it in the new generation
                }
                let start = ts.start;
                let Some(gs) = ts.groups.get_mut(group) else {
                    return Ok(Some(None));
                };
                // Retention may have moved the start on meanwhile (the record before it is
                // then gone: no remembered time).
                let (target, target_ms) = match target < start {
                    true => (start, 0),
                    false => (target, target_ms),
                };
                if target > gs.cursor {
                    gs.skip_to(target);
                } else if target < gs.cursor {
                    // The rows: those in memory, and those only in the `spill` table. A
                    // committed spill entry memory knows about (`spill_at`, `unspilling`) is
                    // either in memory or of a row that ended (acknowledged, dead-lettered).
                    let mut rows: Vec<u64> = gs
                        .rows
                        .keys()
                        .copied()
                        .filter(|o| (target..gs.cursor).contains(o))
                        .collect();
                    if gs.spilled > 0 {
                        let spilled =
                            state::spilled_offsets(&s.db, topic, group, target, gs.cursor)?;
                        rows.extend(spilled.into_iter().filter(|o| {
                            !gs.spill_at.contains_key(o) && !gs.unspilling.contains(o)
                        }));
                    }
                    gs.rewind(target, rows);
                }
                gs.cursor_ms = target_ms;
                dirty.groups.insert((topic.to_owned(), group.to_owned()));
                ts.ready.notify_waiters();
                Ok(Some(Some(inner.touch())))
            })?;
            match ticket {
                None => continue,
                Some(None) => return Ok(false),
                Some(Some(ticket)) => {
                    s.durable(ticket).await?;
                    return Ok(true);
                }
            }
        }
    }

    async fn cleanup(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        let s = &self.shared;
        if !retention.dry_run {
            s.writable()?;
        }
        let mut report = CleanupReport::default();
        let cutoff = Timestamp::now().minus(retention.min_age);
        // Reads the log and the state database under the lock: `locked` keeps a panic there
        // from reaching this task with the engine half-changed.
        let moved = s.locked(|inner| {
            let Inner { topics, dirty, .. } = &mut *inner;
            let Some(ts) = topics.get_mut(topic) else {
                return Ok(None);
            };
            let end = ts.log.visible();
            let old = ts.start;
            // Everything below `needed` is acknowledged by every group.
            let mut needs = Vec::with_capacity(ts.groups.len());
            for (g, gs) in &ts.groups {
                // Spilled rows still in memory (their spill not yet committed) are among `rows`;
                // the committed ones are looked up (one lookup, not trusting the count).
                let spilled = state::spilled_offset(&s.db, topic, g, false)?;
                needs.push(gs.needs_from(spilled));
            }
            let needed = needs
                .into_iter()
                .chain(ts.stopped.keys().copied().filter(|o| *o >= old))
                .min();
            let mut start = old;
            if let Some(needed) = needed {
                let needed = needed.min(end);
                // Publish times never decrease along the log, so the first record younger than
                // min_age is found by binary search: O(log n) reads, not a scan under the lock.
                let (mut lo, mut hi) = (start, needed);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    // An offset skipped after damage stands for the next record stored.
                    match ts.log.read(mid, 1, &mut None)?.first() {
                        Some(r) if r.ms > cutoff.0 => hi = mid,
                        _ => lo = mid + 1,
                    }
                }
                start = lo;
            }
            // A start in a gap (offsets skipped after damage) is the first stored offset after
            // it; counts are of stored records, never of skipped offsets.
            start = ts.log.past_gaps(start).min(end).max(old);
            report.removed = ts.log.stored_between(old, start);
            if let Some(max_len) = retention.max_len {
                // The offset from which `max_len` stored records remain (gaps hold none).
                let trim_to = ts.log.past_gaps(ts.log.keeping(end, max_len)).min(end);
                if trim_to > start {
                    let needed = needed.unwrap_or(end);
                    let acked_end = needed.clamp(start, trim_to);
                    report.removed += ts.log.stored_between(start, acked_end);
                    report.trimmed_unacknowledged += ts.log.stored_between(acked_end, trim_to);
                    if retention.dry_run {
                        return Ok(None);
                    }
                    start = trim_to;
                    for (g, gs) in ts.groups.iter_mut() {
                        let doomed: Vec<u64> =
                            gs.rows.keys().filter(|o| **o < start).copied().collect();
                        for o in doomed {
                            gs.remove_row(o);
                            dirty.rows.insert((topic.to_owned(), g.clone(), o));
                        }
                        gs.pending.retain(|o, _| *o >= start);
                        dirty
                            .trim_spill
                            .push((topic.to_owned(), g.clone(), 0, start));
                        if gs.cursor < start {
                            gs.cursor = start;
                        }
                        gs.raise_floor(start);
                        dirty.groups.insert((topic.to_owned(), g.clone()));
                    }
                }
            }
            if start == old || retention.dry_run {
                return Ok(None);
            }
            ts.start = start;
            dirty.topics.insert(topic.to_owned());
            let log = ts.log.clone();
            Ok(Some((log, start, inner.touch())))
        })?;
        let Some((log, new_start, ticket)) = moved else {
            return Ok(report);
        };
        s.durable_synced(ticket).await?;
        // The new start is durable: whole segments below it can go.
        log.remove_below(new_start)?;
        Ok(report)
    }

    async fn browse(
        &self,
        topic: &str,
        query: &Browse,
    ) -> Result<Option<Vec<Message>>, BackendError> {
        if let Some(why) = self.shared.damaged.get(topic) {
            self.shared.check()?;
            return Err(corrupt(why.clone()));
        }
        let found = self.shared.locked(|inner| {
            Ok(inner
                .topics
                .get(topic)
                .map(|t| (t.log.clone(), t.start, t.log.visible())))
        })?;
        let Some((log, start, end)) = found else {
            return Ok(None);
        };
        // Message ids carry their offset in `seq`.
        let lo = query
            .after
            .map_or(start, |a| a.seq.saturating_add(1).max(start));
        let hi = query.before.map_or(end, |b| b.seq.min(end));
        let max = query.page_size();
        let newest_first = query.newest_first;
        let records = blocking(&self.shared, move || {
            let mut out: Vec<Arc<Record>> = Vec::new();
            if lo >= hi {
                return Ok(out);
            }
            if !newest_first {
                out = log.read(lo, max, &mut None)?;
                out.retain(|r| r.offset >= lo && r.offset < hi);
                return Ok(out);
            }
            // Newest first: windows read forward, from the top down, skipping gaps.
            let mut top = hi;
            while out.len() < max {
                let Some(below) = log.stored_before(top) else {
                    break;
                };
                if below < lo {
                    break;
                }
                let want = (max - out.len()) as u64;
                let from = (below + 1).saturating_sub(want).max(lo);
                let mut window = log.read(from, (below + 1 - from) as usize, &mut None)?;
                window.retain(|r| r.offset >= from && r.offset <= below);
                out.extend(window.into_iter().rev());
                top = from;
            }
            out.truncate(max);
            Ok(out)
        })
        .await?;
        Ok(Some(records.iter().map(|r| message_of(r, 0)).collect()))
    }

    fn metrics(&self) -> Vec<BackendMetric> {
        let st = self.stats();
        vec![
            BackendMetric::counter(
                "relq_engine_commit_cycles_total",
                "Commit cycles run by the embedded engine",
                st.cycles as f64,
            ),
            BackendMetric::counter(
                "relq_engine_fsyncs_total",
                "fdatasync calls on log files",
                st.syncs as f64,
            ),
            BackendMetric::counter(
                "relq_engine_records_appended_total",
                "Messages appended to logs (records / cycles = the mean commit size)",
                st.records as f64,
            ),
            BackendMetric::counter(
                "relq_engine_state_commits_total",
                "State database transactions committed",
                st.state_commits as f64,
            ),
            BackendMetric::counter(
                "relq_engine_sync_seconds_total",
                "Time spent in commit rounds' syncs",
                st.sync_micros as f64 / 1e6,
            ),
            BackendMetric::counter(
                "relq_engine_rows_spilled_total",
                "Scheduled rows moved from memory to the state database",
                st.rows_spilled as f64,
            ),
            BackendMetric::counter(
                "relq_engine_rows_unspilled_total",
                "Spilled rows taken back into memory",
                st.rows_unspilled as f64,
            ),
        ]
    }

    async fn locate(
        &self,
        topic: &str,
        id: MessageId,
    ) -> Result<Option<Vec<GroupPlacement>>, BackendError> {
        let s = &self.shared;
        // Reads the state database under the lock (a spilled row): see `locked`.
        s.locked(|inner| {
            let Some(t) = inner.topics.get(topic) else {
                return Ok(None);
            };
            // Ids carry their offset in `seq`.
            let o = id.seq;
            let mut out = Vec::new();
            for (name, g) in &t.groups {
                let row = match g.rows.get(&o) {
                    Some(r) => Some((r.due, r.deliveries, r.parked)),
                    None if g.spilled > 0 && !g.unspilling.contains(&o) => {
                        state::spilled_row(&s.db, topic, name, o)?
                            .map(|r| (r.due, r.deliveries, r.parked))
                    }
                    None => None,
                };
                let placement = if let Some(p) = g.pending.get(&o) {
                    Placement::Pending {
                        consumer: p.consumer.clone(),
                        deliveries: p.attempt,
                    }
                } else if let Some((due, deliveries, parked)) = row {
                    if parked {
                        Placement::Stopped
                    } else {
                        Placement::Scheduled {
                            due: Timestamp(due),
                            deliveries,
                        }
                    }
                } else if o >= g.cursor.max(t.start) {
                    Placement::Unread
                } else {
                    Placement::Done
                };
                out.push(GroupPlacement::new(name.clone(), placement));
            }
            Ok(Some(out))
        })
    }

    async fn close(&self) {
        #[cfg(unix)]
        {
            let server = lock(&self.local).take();
            if let Some(server) = server {
                server.drain().await;
            }
        }
    }

    async fn health(&self) -> Health {
        let mut checks = Vec::new();
        checks.push(match self.shared.check() {
            Ok(()) => HealthCheck::new("engine", true, "running"),
            Err(e) => HealthCheck::new("engine", false, e.to_string()),
        });
        let mut usage = None;
        match rustix::fs::statvfs(&self.shared.root) {
            Ok(st) => {
                let total = st.f_blocks.saturating_mul(st.f_frsize);
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                if total > 0 {
                    usage = Some(1.0 - free as f64 / total as f64);
                }
                let ok = free >= MIN_FREE_DISK;
                checks.push(HealthCheck::new(
                    "disk",
                    ok,
                    format!(
                        "{} MiB free of {} MiB under {}{}",
                        free >> 20,
                        total >> 20,
                        self.shared.root.display(),
                        if ok {
                            ""
                        } else {
                            " (below 256 MiB: publishes may soon fail)"
                        }
                    ),
                ));
            }
            Err(e) => checks.push(HealthCheck::new(
                "disk",
                false,
                format!("statvfs {}: {e}", self.shared.root.display()),
            )),
        }
        let mut h = Health::new(NAME, checks);
        h.usage_ratio = usage;
        h
    }

    async fn topics(&self) -> Result<Vec<String>, BackendError> {
        let s = &self.shared;
        let mut names: Vec<String> =
            s.locked(|inner| Ok(inner.topics.keys().cloned().collect()))?;
        // Read-only: topics whose log could not be opened are listed too (their info is the
        // error).
        names.extend(s.damaged.keys().cloned());
        names.sort();
        Ok(names)
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BackendError> {
        if let Some(why) = self.shared.damaged.get(topic) {
            self.shared.check()?;
            return Err(corrupt(why.clone()));
        }
        // Counts under the engine lock; the ids that need a record are looked up after it is
        // released (they may be on disk, and a metrics scrape must not stall the engine).
        let counted = self.shared.locked(|inner| {
            let Some(t) = inner.topics.get(topic) else {
                return Ok(None);
            };
            let end = t.log.visible();
            let now = Timestamp::now();
            // The last record each group read: (offset, its remembered milliseconds).
            let cursors: Vec<Option<(u64, u64)>> = t
                .groups
                .values()
                .map(|g| g.cursor.checked_sub(1).map(|o| (o, g.cursor_ms)))
                .collect();
            // Per group: its oldest pending offset, and where its unread records start.
            let edges: Vec<(Option<u64>, Option<u64>)> = t
                .groups
                .values()
                .map(|g| {
                    let unread = g.cursor.max(t.start);
                    (
                        g.pending.keys().next().copied(),
                        (unread < end).then_some(unread),
                    )
                })
                .collect();
            let groups = t
                .groups
                .iter()
                .map(|(name, g)| GroupInfo {
                    name: name.clone(),
                    cursor: MessageId::ZERO,
                    pending: g.pending.len() as u64,
                    lag: t.log.stored_between(g.cursor, end),
                    scheduled: g.scheduled(),
                    parked: g.parked as u64,
                    oldest_pending: None,
                    oldest_unread: None,
                    consumers: g
                        .consumers
                        .iter()
                        .map(|(c, seen)| ConsumerInfo {
                            name: c.clone(),
                            pending: g.pending.values().filter(|p| &p.consumer == c).count() as u64,
                            idle_ms: now.since(*seen).as_millis() as u64,
                        })
                        .collect(),
                })
                .collect();
            let info = TopicInfo {
                name: topic.to_owned(),
                length: t.log.stored_between(t.start, end),
                first_id: None,
                last_id: None,
                groups,
                stopped: t
                    .stopped
                    .iter()
                    .map(|(o, ms)| MessageId::new(*ms, *o))
                    .collect(),
                dead_letters: t.dead_count,
                published: end,
            };
            Ok(Some((info, t.log.clone(), t.start, end, cursors, edges)))
        })?;
        let Some((mut info, log, start, end, cursors, edges)) = counted else {
            return Ok(None);
        };
        let (first, last, cursors, edges) = blocking(&self.shared, move || {
            let id_of = |o: u64| -> Result<Option<MessageId>, BackendError> {
                Ok(log.get(o)?.map(|r| MessageId::new(r.ms, r.offset)))
            };
            // The first record still stored (retention may have moved on since the snapshot).
            let first = if start < end {
                log.read(start, 1, &mut None)?
                    .first()
                    .map(|r| MessageId::new(r.ms, r.offset))
            } else {
                None
            };
            let last = match log.stored_before(end) {
                Some(o) => id_of(o)?,
                None => None,
            };
            // The record itself may be gone (retention): the remembered milliseconds stand in.
            let cursors = cursors
                .into_iter()
                .map(|c| match c {
                    Some((o, ms)) => Ok(id_of(o)?.unwrap_or(MessageId::new(ms, o))),
                    None => Ok(MessageId::ZERO),
                })
                .collect::<Result<Vec<_>, BackendError>>()?;
            let edges = edges
                .into_iter()
                .map(|(pending, unread)| {
                    let pending = match pending {
                        Some(o) => id_of(o)?,
                        None => None,
                    };
                    let unread = match unread {
                        Some(o) => log
                            .read(o, 1, &mut None)?
                            .first()
                            .map(|r| MessageId::new(r.ms, r.offset)),
                        None => None,
                    };
                    Ok((pending, unread))
                })
                .collect::<Result<Vec<_>, BackendError>>()?;
            Ok((first, last, cursors, edges))
        })
        .await?;
        info.first_id = first;
        info.last_id = last;
        for ((g, c), (pending, unread)) in info.groups.iter_mut().zip(cursors).zip(edges) {
            g.cursor = c;
            g.oldest_pending = pending;
            g.oldest_unread = unread;
        }
        Ok(Some(info))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let s = &self.shared;
        s.check()?;
        let mut out = Vec::new();
        let limit = query.page_size();
        // redb may panic on a damaged page rather than report it: that poisons, never reaches
        // the caller as a panic.
        s.guarded(|| {
            state::scan_dead(&s.db, topic, query.after, |dl| {
                if query.matches(&dl) {
                    out.push(dl);
                }
                out.len() < limit
            })
        })?;
        Ok(out)
    }

    async fn dead_letter(
        &self,
        topic: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError> {
        let s = &self.shared;
        s.check()?;
        s.guarded(|| state::get_dead(&s.db, topic, id))
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError> {
        self.shared.writable()?;
        let (reply, rx) = oneshot::channel();
        self.shared
            .call(
                Op::Replay {
                    topic: topic.to_owned(),
                    ids: ids.to_vec(),
                    reply,
                },
                rx,
            )
            .await
    }

    async fn delete_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError> {
        self.shared.writable()?;
        let (reply, rx) = oneshot::channel();
        self.shared
            .call(
                Op::DeleteDead {
                    topic: topic.to_owned(),
                    ids: ids.to_vec(),
                    reply,
                },
                rx,
            )
            .await
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        before: Timestamp,
    ) -> Result<u64, BackendError> {
        self.shared.writable()?;
        let (reply, rx) = oneshot::channel();
        self.shared
            .call(
                Op::PurgeDead {
                    topic: topic.to_owned(),
                    before,
                    reply,
                },
                rx,
            )
            .await
    }

    async fn dead_letter_stats(&self, topic: &str) -> Result<DeadLetterStats, BackendError> {
        let s = &self.shared;
        s.check()?;
        let mut stats = DeadLetterStats::default();
        s.guarded(|| {
            state::scan_dead(&s.db, topic, None, |dl| {
                stats.add(&dl);
                true
            })
        })?;
        Ok(stats)
    }
}

impl Shared {
    /// Asks for a commit cycle for the changes made so far, without waiting for it.
    fn request_commit(&self) {
        lock(&self.queue).state_dirty = true;
        self.wake.notify_one();
    }
}

/// Rows changed and not yet committed (in every group) beyond which a read that found nothing
/// to deliver waits for a synced commit before it goes on.
const MAX_DIRTY_ROWS: usize = 1 << 16;
/// Delayed or stopped messages one pass of a read sets aside under the engine lock.
const SET_ASIDE_MAX: usize = 4096;

/// What one pass of a read took.
struct Taken {
    out: Vec<Delivery>,
    /// Records it needs are only on disk.
    missed: bool,
    /// It stopped after setting aside [`SET_ASIDE_MAX`] messages; there may be more to read.
    more: bool,
}

/// Runs `f` (reads of segment files) on tokio's blocking pool.
/// A panic there poisons the engine like one on its own threads.
async fn blocking<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => {
            let e = panicked("a read of the log (on the blocking pool)", &*e.into_panic());
            shared.poison(&e);
            Err(e)
        }
        Err(e) => Err(fatal(format!("reading the log failed: {e}"))),
    }
}

/// Records a read needs that are not in memory, read from the segment files without holding the
/// engine lock.
#[derive(Default)]
struct Prefetch {
    /// Records from the group's cursor on.
    new: Vec<Arc<Record>>,
    /// Where reading `new` stopped.
    hint: Option<ReadHint>,
    /// Due rows' records (`None`: removed by retention).
    rows: HashMap<u64, Option<Arc<Record>>>,
}

impl EmbeddedBackend {
    /// Reads what the next `read` of `sub` needs from disk (the records of due rows and new
    /// records at the cursor that are not in the tail cache) on the blocking pool, so neither
    /// the engine lock nor a runtime worker waits for the disk. Building a sealed segment's
    /// index (a scan of the whole segment, the first time it is read after an open) happens
    /// here too.
    async fn prefetch(
        &self,
        sub: &Subscription,
        max: usize,
        now: Timestamp,
    ) -> Result<Prefetch, BackendError> {
        let (log, cursor, hint, due) = self.shared.with_group(sub, |inner| {
            let ts = &inner.topics[&sub.topic];
            let g = &ts.groups[&sub.group];
            let due: Vec<u64> = g
                .due
                .iter()
                .take_while(|(d, _)| *d <= now.0)
                .take(max)
                .map(|(_, o)| *o)
                .filter(|o| !ts.log.in_memory(*o))
                .collect();
            Ok((ts.log.clone(), g.cursor.max(ts.start), g.hint, due))
        })?;
        blocking(&self.shared, move || {
            let mut pre = Prefetch::default();
            for o in due {
                pre.rows.insert(o, log.get(o)?);
            }
            if !log.in_memory(cursor) {
                let mut hint = hint;
                pre.new = log.read(cursor, max, &mut hint)?;
                pre.hint = hint;
            }
            Ok(pre)
        })
        .await
    }

    /// Delivers again the pending entries `pick` selects (`recover` and `claim`). Raised
    /// delivery counts ride the next cycle; nobody waits for it.
    async fn redeliver(
        &self,
        sub: &Subscription,
        max: usize,
        pick: impl Fn(u64, &Pending, Timestamp) -> bool,
    ) -> Result<Vec<Delivery>, BackendError> {
        let now = Timestamp::now();
        // The records to deliver again that are no longer in the tail cache are read first,
        // without the engine lock (see `prefetch`); one chosen meanwhile is read under it.
        let (log, on_disk) = self.shared.with_group(sub, |inner| {
            let ts = &inner.topics[&sub.topic];
            let on_disk: Vec<u64> = ts.groups[&sub.group]
                .pending
                .iter()
                .filter(|(o, p)| pick(**o, p, now))
                .map(|(o, _)| *o)
                .take(max)
                .filter(|o| !ts.log.in_memory(*o))
                .collect();
            Ok((ts.log.clone(), on_disk))
        })?;
        let mut pre = HashMap::new();
        if !on_disk.is_empty() {
            pre = blocking(&self.shared, move || {
                on_disk
                    .into_iter()
                    .map(|o| Ok((o, log.get(o)?)))
                    .collect::<Result<HashMap<_, _>, BackendError>>()
            })
            .await?;
        }
        let (out, _) = self.shared.group_ops(sub, |ops| {
            ops.redeliver(&sub.consumer, max, now, &mut pre, |o, p| pick(o, p, now))
        })?;
        if !out.is_empty() {
            self.shared.request_commit();
        }
        Ok(out)
    }
}
