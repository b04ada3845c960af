//! The engine as a relq [`Backend`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use relq_core::{
    Backend, BackendError, BackendMetric, Browse, CleanupReport, ConsumerInfo, DeadLetter,
    DeadLetterId, DeadLetterQuery, DeadLetterStats, Delivery, GroupInfo, GroupPlacement, Health,
    HealthCheck, Message, MessageId, Outgoing, Placement, Retention, Settlement, StartPosition,
    Subscription, Timestamp, TopicInfo,
};

use super::codec::Record;
use super::group::GroupState;
use super::group_ops::{start_offset, Taken};
use super::read::{blocking, Prefetch, MAX_DIRTY_ROWS};
use super::{
    corrupt, lock, message_of, state, terminated, validate_outgoing, EmbeddedBackend, Inner, Op,
    MIN_FREE_DISK, NAME,
};

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
                retried |= ops.settle(s, &sub.consumer, now);
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
                // One waiting behind its ordering key is parked when its key passes to it.
                let scheduled = !gs.pending.contains_key(&o)
                    && gs.rows.get(&o).is_some_and(|r| !r.parked && !r.waiting);
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
        lock(&self.shared.buckets).forget_topic(topic);
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
        lock(&s.buckets).forget_group(topic, group);
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
                    let now = Timestamp::now().0;
                    let mut passed = false;
                    for (g, gs) in ts.groups.iter_mut() {
                        let mut doomed: Vec<u64> =
                            gs.rows.keys().filter(|o| **o < start).copied().collect();
                        doomed.extend(gs.pending.range(..start).map(|(o, _)| *o));
                        doomed.sort_unstable();
                        doomed.dedup();
                        for &o in &doomed {
                            gs.remove_row(o);
                            dirty.rows.insert((topic.to_owned(), g.clone(), o));
                        }
                        gs.pending.retain(|o, _| *o >= start);
                        // Their ordering keys pass on (to messages kept, or trimmed too).
                        for o in doomed {
                            if let Some(next) = gs.release_key(o, now) {
                                dirty.rows.insert((topic.to_owned(), g.clone(), next));
                                passed = true;
                            }
                        }
                        dirty
                            .trim_spill
                            .push((topic.to_owned(), g.clone(), 0, start));
                        if gs.cursor < start {
                            gs.cursor = start;
                        }
                        gs.raise_floor(start);
                        dirty.groups.insert((topic.to_owned(), g.clone()));
                    }
                    if passed {
                        ts.ready.notify_waiters();
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
                    Some(r) => Some((r.due, r.deliveries, r.parked, r.waiting)),
                    None if g.spilled > 0 && !g.unspilling.contains(&o) => {
                        state::spilled_row(&s.db, topic, name, o)?
                            .map(|r| (r.due, r.deliveries, r.parked, r.waiting))
                    }
                    None => None,
                };
                let placement = if let Some(p) = g.pending.get(&o) {
                    Placement::Pending {
                        consumer: p.consumer.clone(),
                        deliveries: p.attempt,
                    }
                } else if let Some((due, deliveries, parked, waiting)) = row {
                    if parked {
                        Placement::Stopped
                    } else if waiting {
                        Placement::Blocked
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
                    blocked: g.keys.waiting() as u64,
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

    async fn processed(&self, topic: &str, group: &str, key: &str) -> Result<bool, BackendError> {
        let s = &self.shared;
        s.check()?;
        let now = Timestamp::now().0;
        let inner = lock(&s.inner);
        Ok(inner
            .topics
            .get(topic)
            .and_then(|ts| ts.groups.get(group))
            .is_some_and(|gs| gs.processed.get(key, now).is_some()))
    }

    async fn record_processed(
        &self,
        sub: &Subscription,
        key: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let s = &self.shared;
        s.writable()?;
        let now = Timestamp::now();
        let (topic, group) = (sub.topic.as_str(), sub.group.as_str());
        let ticket = {
            let mut inner = lock(&s.inner);
            let Inner { topics, dirty, .. } = &mut *inner;
            let Some(gs) = topics
                .get_mut(topic)
                .filter(|ts| ts.epoch == sub.epoch)
                .and_then(|ts| ts.groups.get_mut(group))
            else {
                return Ok(());
            };
            gs.processed.prune(now.0, |k| {
                dirty
                    .processed
                    .push(((topic.to_owned(), group.to_owned(), k.to_owned()), None))
            });
            let until = now.plus(ttl.min(relq_core::MAX_DEDUP_WINDOW)).0;
            gs.processed.insert(key, MessageId::ZERO, until);
            dirty.processed.push((
                (topic.to_owned(), group.to_owned(), key.to_owned()),
                Some(until),
            ));
            inner.touch()
        };
        s.durable(ticket).await
    }

    async fn take_tokens(
        &self,
        topic: &str,
        group: &str,
        want: u32,
        give_back: u32,
        limit: relq_core::RateLimit,
    ) -> Result<relq_core::Grant, BackendError> {
        self.shared.check()?;
        Ok(lock(&self.shared.buckets).take_now(topic, group, want, give_back, limit))
    }
}
