//! Opening a data directory: the lock, the state database, each topic's log recovered and
//! checked against the state that refers to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::{watch, Notify, Semaphore};

use relq_core::{BackendError, BackendErrorKind, Timestamp};

use super::fs::{self, Storage};
use super::group::GroupState;
use super::log::{self, LogConfig, TopicLog};
use super::state::{self, Row};
use super::{
    corrupt, db_error, guard_db, io_error, panicked_here, Counters, Dirty, Durability,
    EmbeddedBackend, EmbeddedConfig, Inner, Progress, Queue, Recovery, Shared, StateDb, TopicState,
    COMMITTER, NAME,
};

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
pub(crate) fn referenced_offsets(
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

impl EmbeddedBackend {
    /// Opens the data directory, for writing or (`read_only`) for inspection. Every step that
    /// would change the disk is skipped read-only; what recovery decides is applied in memory
    /// only.
    pub(crate) fn open_mode(
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
        let (mut loaded, referenced) = guard_db(&db_path, root, || {
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
                    dedup: relq_core::DedupIndex::default(),
                },
            );
        }
        // Idempotency keys: those whose window ended, and those past their log's end (the
        // index is committed before the log is synced, and that message never became durable),
        // go.
        for (t, key, ms, o, until, epoch) in std::mem::take(&mut loaded.dedup) {
            let ts = inner.topics.get_mut(&t);
            let live = until > now.0
                && ts.as_ref().is_some_and(|ts| ts.epoch == epoch)
                && found_ends.get(&t).is_some_and(|end| o < *end);
            match ts {
                Some(ts) if live => ts
                    .dedup
                    .insert(&key, relq_core::MessageId::new(ms, o), until),
                _ => inner.dirty.dedup_remove.push((t, key, u64::MAX)),
            }
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
        for (t, g, key, until) in std::mem::take(&mut loaded.processed) {
            match inner
                .topics
                .get_mut(&t)
                .and_then(|ts| ts.groups.get_mut(&g))
            {
                Some(gs) if until > now.0 => {
                    gs.processed.insert(&key, relq_core::MessageId::ZERO, until)
                }
                _ => inner.dirty.processed.push(((t, g, key), None)),
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
                if row.spillable() && row.due > line {
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
                    // A keyed message in flight held its key: its row keeps it.
                    let key = match ts.log.get(o) {
                        Ok(Some(rec)) => relq_core::ordering_key(&rec.headers).map(str::to_owned),
                        _ => None,
                    };
                    gs.put_row(
                        o,
                        Row {
                            due: now.0,
                            deliveries: 1,
                            key,
                            ..Row::default()
                        },
                        false,
                    );
                    dirty_rows.push((t.clone(), g.clone(), o));
                    recovered += 1;
                }
                for o in gs.rebuild_keys(now.0) {
                    dirty_rows.push((t.clone(), g.clone(), o));
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
            buckets: Mutex::new(relq_core::TokenBuckets::default()),
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
}
