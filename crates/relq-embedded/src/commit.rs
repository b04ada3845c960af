//! The commit cycle: the committer takes every queued operation and state change, appends
//! to the logs, syncs them, commits the state database, then answers the callers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, Notify};

use relq_core::{
    replay_message, BackendError, BackendErrorKind, DeadLetter, DeadLetterId, DedupIndex,
    MessageId, Outgoing, Subscription, Timestamp,
};

use super::codec::{self, Record};
use super::fs::StorageFile;
use super::log::{LogConfig, TopicLog};
use super::state::{self, Batch, DedupPut};
use super::{
    db_error, fatal, group_deleted, invalid, io_error, lock, panicked, panicked_here, terminated,
    topic_dir, Durability, Inner, Op, Replayed, Reply, Shared, TopicState, NAME, SYNCER,
};

/// A replayed dead letter, an index into `CycleWork::published` and the record's index there.
type ReplayItem = (DeadLetterId, usize, usize);

/// Where a published message's id comes from.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// The n-th record this publish appended.
    New(usize),
    /// A message stored earlier with the same idempotency key.
    Known(MessageId),
}

/// The ids a publish answers with: its records', and the known ones of its duplicates.
fn publish_ids(records: &[Arc<Record>], n: usize, slots: Option<&[Slot]>) -> Vec<MessageId> {
    let id = |r: &Record| MessageId::new(r.ms, r.offset);
    match slots {
        None => records[..n].iter().map(|r| id(r)).collect(),
        Some(slots) => slots
            .iter()
            .map(|s| match s {
                Slot::New(j) => id(&records[*j]),
                Slot::Known(k) => *k,
            })
            .collect(),
    }
}

/// A publish to answer once its cycle committed.
struct PublishReply {
    reply: Reply<Vec<MessageId>>,
    /// Its records' index in `CycleWork::published`.
    published: usize,
    /// How many records it appended.
    appended: usize,
    /// When some of its messages were duplicates: where each message's id comes from.
    slots: Option<Vec<Slot>>,
}

impl PublishReply {
    fn answer(self, published: &[Published]) {
        let ids = publish_ids(
            &published[self.published].records,
            self.appended,
            self.slots.as_deref(),
        );
        let _ = self.reply.send(Ok(ids));
    }
}

/// A publish split by deduplication (see `Shared::deduplicate`).
struct Deduplicated {
    /// The messages to append.
    append: Vec<Outgoing>,
    /// Where each published message's id comes from.
    slots: Vec<Slot>,
    /// The keys to index once appended: position among `append`, key, end of the window.
    keyed: Vec<(usize, String, u64)>,
}

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
    publish_replies: Vec<PublishReply>,
    /// New entries of the deduplication index, committed on their own before the logs are
    /// synced.
    dedup: Vec<DedupPut>,
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
        for r in self.publish_replies.drain(..) {
            r.answer(&self.published);
        }
        self.published.clear();
    }

    /// Answers every caller of the batch with `e`.
    fn fail(self, e: &BackendError) {
        let err = || BackendError::new(NAME, e.kind, e.message.clone());
        for r in self.publish_replies {
            let _ = r.reply.send(Err(err()));
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
    pub(crate) fn check(&self) -> Result<(), BackendError> {
        match &lock(&self.inner).poison {
            Some(p) => Err(poisoned(p)),
            None => Ok(()),
        }
    }

    /// The first check of every call that changes anything: fails at once when the directory
    /// was opened read-only, or the engine is poisoned.
    pub(crate) fn writable(&self) -> Result<(), BackendError> {
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
    pub(crate) fn closed_error(&self) -> BackendError {
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
    pub(crate) fn writer_stopped(&self) {
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
    pub(crate) fn guarded<T>(
        &self,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
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
    pub(crate) fn locked<T>(
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
    pub(crate) async fn durable(&self, ticket: u64) -> Result<(), BackendError> {
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
    pub(crate) async fn durable_synced(&self, ticket: u64) -> Result<(), BackendError> {
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

    pub(crate) async fn call<T>(
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
    pub(crate) fn run(self: Arc<Self>) {
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
    pub(crate) fn poison(&self, e: &BackendError) {
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
        // New index entries first: an entry whose message did not become durable (a crash
        // before the log sync) is dropped by open, which checks it against the log's end; the
        // other order would leave a durable message without its entry, stored again by a
        // repeat. As durable as the round (periodic mode keeps its sync interval).
        let dedup: Vec<DedupPut> = works
            .iter_mut()
            .flat_map(|w| std::mem::take(&mut w.dedup))
            .collect();
        if !dedup.is_empty() {
            state::commit_dedup(&self.db, &dedup, sync)?;
        }
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
        for r in w.publish_replies.drain(..) {
            r.answer(&w.published);
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
                    dedup: DedupIndex::default(),
                },
            );
            inner.dirty.topics.insert(topic.to_owned());
            inner.touch();
        }
        Ok(inner.topics.get_mut(topic).expect("inserted above"))
    }

    /// Splits a publish into the messages to append and, for each message, where its id comes
    /// from: a key stored within its window answers with that id, a key repeated within the
    /// batch with its first message's. Prunes the topic's ended keys first.
    fn deduplicate(&self, topic: &str, msgs: Vec<Outgoing>, now: u64) -> Deduplicated {
        let mut inner = lock(&self.inner);
        let Inner { topics, dirty, .. } = &mut *inner;
        let index = topics.get_mut(topic).map(|ts| &mut ts.dedup);
        if let Some(ix) = index {
            ix.prune(now, |k| {
                dirty
                    .dedup_remove
                    .push((topic.to_owned(), k.to_owned(), now))
            });
        }
        let index = topics.get(topic).map(|ts| &ts.dedup);
        let mut d = Deduplicated {
            append: Vec::with_capacity(msgs.len()),
            slots: Vec::with_capacity(msgs.len()),
            keyed: Vec::new(),
        };
        // The keys new in this batch, by their position among the appended messages.
        let mut fresh: HashMap<String, usize> = HashMap::new();
        for m in msgs {
            if let Some((key, window)) = m.dedup() {
                if let Some(id) = index.and_then(|ix| ix.get(key, now)) {
                    d.slots.push(Slot::Known(id));
                    continue;
                }
                if let Some(j) = fresh.get(key) {
                    d.slots.push(Slot::New(*j));
                    continue;
                }
                let j = d.append.len();
                fresh.insert(key.to_owned(), j);
                d.keyed
                    .push((j, key.to_owned(), Timestamp(now).plus(window).0));
            }
            d.slots.push(Slot::New(d.append.len()));
            d.append.push(m);
        }
        d
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
                let now = Timestamp::now().0;
                let (msgs, slots, keyed) = if msgs.iter().any(|m| m.dedup().is_some()) {
                    let d = self.deduplicate(&topic, msgs, now);
                    (d.append, Some(d.slots), d.keyed)
                } else {
                    (msgs, None, Vec::new())
                };
                let mut records = Vec::with_capacity(msgs.len());
                let n = msgs.len();
                let appended = match n {
                    0 => Ok(()),
                    _ => log.append(msgs, now, &mut records),
                };
                match appended {
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
                if !keyed.is_empty() {
                    let mut inner = lock(&self.inner);
                    if let Some(ts) = inner.topics.get_mut(&topic) {
                        for (j, key, until) in keyed {
                            let r = &records[j];
                            ts.dedup.insert(&key, MessageId::new(r.ms, r.offset), until);
                            w.dedup.push(DedupPut {
                                topic: topic.clone(),
                                key,
                                ms: r.ms,
                                offset: r.offset,
                                until,
                                epoch: ts.epoch,
                            });
                        }
                    }
                }
                w.touched.push(log.clone());
                w.publish_replies.push(PublishReply {
                    reply,
                    published: w.published.len(),
                    appended: n,
                    slots,
                });
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
    pub(crate) fn with_group<T>(
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

impl Shared {
    /// Asks for a commit cycle for the changes made so far, without waiting for it.
    pub(crate) fn request_commit(&self) {
        lock(&self.queue).state_dirty = true;
        self.wake.notify_one();
    }
}
