//! The group-local part of the operations, under the engine lock: taking ready messages,
//! settling, redelivering.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use relq_core::{
    BackendError, Delivery, MessageId, Settlement, StartPosition, Subscription, Timestamp,
};

use super::codec::Record;
use super::group::{GroupState, Pending};
use super::log::TopicLog;
use super::read::Prefetch;
use super::state::{self, Row};
use super::{message_of, Counters, Dirty, Inner, Shared, TopicState};

/// The group-local part of the operations, under the engine lock.
pub(crate) struct GroupOps<'a> {
    topic: &'a str,
    group: &'a str,
    ts: &'a mut TopicState,
    pub(crate) dirty: &'a mut Dirty,
    db: &'a redb::Database,
    counters: &'a Counters,
}

impl GroupOps<'_> {
    pub(crate) fn g(&mut self) -> &mut GroupState {
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
            key: self.g().keys.key(o).map(str::to_owned),
            ..Row::fresh(now_ms)
        }
    }

    /// Ends `o`'s place under its ordering key; the key's next message becomes due. Returns
    /// whether one did.
    fn release_key(&mut self, o: u64, now_ms: u64) -> bool {
        match self.g().release_key(o, now_ms) {
            Some(next) => {
                self.dirty_row(next);
                true
            }
            None => false,
        }
    }

    /// Ends settled `o`'s place under its ordering key: the key's next message becomes due
    /// once this change is durable (see `Batch::promote`).
    fn pass_key(&mut self, o: u64) {
        if let Some(next) = self.g().pass_key(o) {
            self.dirty
                .promote
                .push((self.topic.to_owned(), self.group.to_owned(), next));
        }
    }

    /// Due rows first, then new records after the cursor. Records come from the tail cache or
    /// `pre`; one that would have to be read from a segment file is read here only if
    /// `allow_io`, otherwise the deliveries so far are returned with `missed` set, so the caller
    /// can read it without holding the engine lock (see [`EmbeddedBackend::prefetch`]).
    pub(crate) fn take_ready(
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
                // Removed by retention: the row goes, and its key passes on.
                self.release_key(o, now.0);
                continue;
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
                let key = relq_core::ordering_key(&rec.headers);
                if let Some(k) = key {
                    if !g.keys.enter(k, o) {
                        // Waits behind an earlier message of its key.
                        g.mark_done(o);
                        g.put_row(
                            o,
                            Row {
                                key: Some(k.to_owned()),
                                waiting: true,
                                ..Row::fresh(rec.deliver_at.unwrap_or(0))
                            },
                            false,
                        );
                        self.dirty_row(o);
                        set_aside += 1;
                        continue;
                    }
                }
                if self.ts.stopped.contains_key(&o) || rec.deliver_at.is_some_and(|at| at > now.0) {
                    let parked = self.ts.stopped.contains_key(&o);
                    let g = self.g();
                    g.mark_done(o);
                    g.put_row(
                        o,
                        Row {
                            parked,
                            key: key.map(str::to_owned),
                            ..Row::fresh(rec.deliver_at.unwrap_or(now.0))
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
    pub(crate) fn redeliver(
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
                    } else {
                        self.release_key(o, now.0);
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

    /// Applies one settlement; returns whether it scheduled a retry. (An ordering key it lets go
    /// passes to the key's next message once the change is durable: `Batch::promote`.)
    pub(crate) fn settle(&mut self, s: &Settlement, consumer: &str, now: Timestamp) -> bool {
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
            Settlement::Ack(_) => {
                self.drop_delivery(o, p.row);
                self.pass_key(o);
                false
            }
            Settlement::Retry {
                at,
                failure,
                release_key,
                ..
            } => {
                let mut row = self.take_row(o, p.row, at.0);
                row.due = at.0;
                row.deliveries = p.attempt;
                row.failures.push(failure.clone());
                if *release_key {
                    row.key = None;
                }
                self.g().put_row(o, row, false);
                if *release_key {
                    self.pass_key(o);
                }
                true
            }
            Settlement::DeadLetter(dl) => {
                self.drop_delivery(o, p.row);
                self.pass_key(o);
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
                false
            }
        }
    }
}

/// The offset a new group at `start` begins reading from.
pub(crate) fn start_offset(
    log: &TopicLog,
    begin: u64,
    start: StartPosition,
) -> Result<u64, BackendError> {
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
    pub(crate) fn group_ops<T>(
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

/// Delayed or stopped messages one pass of a read sets aside under the engine lock.
const SET_ASIDE_MAX: usize = 4096;

/// What one pass of a read took.
pub(crate) struct Taken {
    pub(crate) out: Vec<Delivery>,
    /// Records it needs are only on disk.
    pub(crate) missed: bool,
    /// It stopped after setting aside [`SET_ASIDE_MAX`] messages; there may be more to read.
    pub(crate) more: bool,
}
