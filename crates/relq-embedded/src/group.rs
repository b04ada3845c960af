//! A group's in-memory state, mirrored durably by [`GroupRecord`] and [`Row`]s.
//!
//! Offsets below `cursor` were read. A read offset is either pending (a first delivery in flight,
//! in memory only), *done* (acknowledged, or handed over to a row or a dead letter), or both done
//! and the key of a row. Done offsets are kept as `floor` (everything below is done) plus ranges
//! above it, so the record stays small: its size follows the number of messages in flight, not
//! the backlog.
//!
//! Rows due later than the resident window are *spilled*: once their durable copy sits in the
//! state database's `spill` table (committed), they leave memory, and reads take them back in
//! due order when their time comes. `spill_at` and `unspilling` tell which committed `spill`
//! entries memory knows better about (see `docs/design.md`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::log::ReadHint;
use super::state::{GroupRecord, Row};
use relq_core::Timestamp;

/// A delivery in flight.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) consumer: String,
    pub(crate) delivered_at: Timestamp,
    pub(crate) attempt: u32,
    /// The delivery comes from a row (the row holds its count and failures).
    pub(crate) row: bool,
}

#[derive(Debug, Default)]
pub(crate) struct GroupState {
    pub(crate) cursor: u64,
    pub(crate) cursor_ms: u64,
    pub(crate) floor: u64,
    /// Done ranges `start -> end` (exclusive) above `floor`.
    pub(crate) done: BTreeMap<u64, u64>,
    pub(crate) pending: BTreeMap<u64, Pending>,
    pub(crate) rows: HashMap<u64, Row>,
    /// Rows waiting for their time: (due, offset). Rows in flight or parked are not here.
    pub(crate) due: BTreeSet<(u64, u64)>,
    pub(crate) parked: usize,
    /// Rows whose durable copy is (or is being written) in the `spill` table, with its due
    /// time there. A resident row, or one removed whose removal is not snapshotted yet.
    pub(crate) spill_at: HashMap<u64, u64>,
    /// Offsets whose `spill` entry's removal is in the commit under way.
    pub(crate) unspilling: HashSet<u64>,
    /// Rows held only in the `spill` table.
    pub(crate) spilled: u64,
    /// No spilled row is due before this (a lower bound).
    pub(crate) spill_min: Option<u64>,
    pub(crate) consumers: BTreeMap<String, Timestamp>,
    pub(crate) hint: Option<ReadHint>,
    /// After a move back, offsets below this one may be done (a row's key) or pending already:
    /// a read passes over those instead of delivering them twice.
    pub(crate) rewound: u64,
    /// Keys recorded as processed (`Backend::record_processed`), until their records expire.
    pub(crate) processed: relq_core::DedupIndex,
    /// Ordering keys of the messages read and not settled (rows with a key, and first
    /// deliveries of keyed messages in flight).
    pub(crate) keys: relq_core::KeyQueues<u64>,
}

impl GroupState {
    pub(crate) fn from_record(rec: &GroupRecord) -> GroupState {
        let done: BTreeMap<u64, u64> = rec.done.iter().copied().collect();
        // Done offsets at or above the cursor are left by a move back (in ranges, or in a
        // floor above the cursor when the rows start right at it).
        let rewound = done
            .last_key_value()
            .map_or(0, |(_, e)| *e)
            .max(rec.floor)
            .max(rec.cursor);
        GroupState {
            cursor: rec.cursor,
            cursor_ms: rec.cursor_ms,
            floor: rec.floor,
            done,
            rewound,
            ..GroupState::default()
        }
    }

    pub(crate) fn record(&self) -> GroupRecord {
        GroupRecord {
            cursor: self.cursor,
            cursor_ms: self.cursor_ms,
            floor: self.floor,
            done: self.done.iter().map(|(a, b)| (*a, *b)).collect(),
        }
    }

    pub(crate) fn is_done(&self, offset: u64) -> bool {
        offset < self.floor
            || self
                .done
                .range(..=offset)
                .next_back()
                .is_some_and(|(_, end)| offset < *end)
    }

    /// Marks `offset`'s first delivery done.
    pub(crate) fn mark_done(&mut self, offset: u64) {
        if self.is_done(offset) {
            return;
        }
        let mut start = offset;
        let mut end = offset + 1;
        if let Some((&s, &e)) = self.done.range(..offset).next_back() {
            if e == offset {
                start = s;
                self.done.remove(&s);
            }
        }
        if let Some(e) = self.done.remove(&end) {
            end = e;
        }
        if start == self.floor {
            self.floor = end;
        } else {
            self.done.insert(start, end);
        }
    }

    /// Marks every offset of `from..to` done (offsets that hold no message any more), merging
    /// with the floor and the ranges it touches.
    pub(crate) fn mark_range_done(&mut self, from: u64, to: u64) {
        let from = from.max(self.floor);
        if from >= to {
            return;
        }
        let (mut start, mut end) = (from, to);
        let touching: Vec<u64> = self
            .done
            .range(..=to)
            .filter(|(_, e)| **e >= from)
            .map(|(s, _)| *s)
            .collect();
        for s in touching {
            if let Some(e) = self.done.remove(&s) {
                start = start.min(s);
                end = end.max(e);
            }
        }
        if start <= self.floor {
            self.floor = end;
        } else {
            self.done.insert(start, end);
        }
    }

    /// Whether a read reaching `offset` must pass over it: after a move back, the group holds it
    /// already (a row, or pending).
    pub(crate) fn held_already(&self, offset: u64) -> bool {
        offset < self.rewound && (self.is_done(offset) || self.pending.contains_key(&offset))
    }

    /// Moves the cursor forward to `to`: the offsets in between count as read and done, except
    /// first deliveries pending there (they stay pending).
    pub(crate) fn skip_to(&mut self, to: u64) {
        let from = self.cursor;
        if to <= from {
            return;
        }
        let pending: Vec<u64> = self
            .pending
            .range(from..to)
            .filter(|(_, p)| !p.row)
            .map(|(o, _)| *o)
            .collect();
        let mut at = from;
        for o in pending {
            self.mark_range_done(at, o);
            at = o + 1;
        }
        self.mark_range_done(at, to);
        self.cursor = to;
        self.hint = None;
    }

    /// Moves the cursor back to `to`: the offsets `to..cursor` are unread again, except `rows`
    /// (offsets that key a row: they stay done) and pending first deliveries (they stay
    /// pending); a read passes over both.
    pub(crate) fn rewind(&mut self, to: u64, rows: impl IntoIterator<Item = u64>) {
        let old = self.cursor;
        if to >= old {
            return;
        }
        let mut fresh = GroupState::default();
        let ranges =
            std::iter::once((0, self.floor)).chain(self.done.iter().map(|(s, e)| (*s, *e)));
        for (s, e) in ranges {
            if s < to {
                fresh.mark_range_done(s, e.min(to));
            }
            if e > old {
                fresh.mark_range_done(s.max(old), e);
            }
        }
        for o in rows {
            if (to..old).contains(&o) {
                fresh.mark_done(o);
            }
        }
        self.floor = fresh.floor;
        self.done = fresh.done;
        self.rewound = self.rewound.max(old);
        self.cursor = to;
        self.hint = None;
    }

    /// Moves the floor up to `to`, forgetting done ranges below it.
    pub(crate) fn raise_floor(&mut self, to: u64) {
        if to <= self.floor {
            return;
        }
        self.floor = to;
        let below: Vec<u64> = self.done.range(..to).map(|(s, _)| *s).collect();
        for s in below {
            if let Some(e) = self.done.remove(&s) {
                if e > to {
                    self.done.insert(to, e);
                }
            }
        }
        if let Some(e) = self.done.remove(&self.floor) {
            self.floor = e;
        }
    }

    /// Offsets read, not done and not pending: deliveries in flight when the process died.
    pub(crate) fn lost_in_flight(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut o = self.floor;
        while o < self.cursor {
            if let Some(e) = self.done.get(&o) {
                o = *e;
                continue;
            }
            if !self.pending.contains_key(&o) {
                out.push(o);
            }
            o += 1;
        }
        out
    }

    /// Ends `offset`'s place under its ordering key; the key passes to its next message, whose
    /// row (still waiting) is returned, to be made due ([`make_due`](Self::make_due)).
    pub(crate) fn pass_key(&mut self, offset: u64) -> Option<u64> {
        let mut o = offset;
        loop {
            let next = self.keys.release(o)?;
            if self.rows.contains_key(&next) {
                return Some(next);
            }
            // Its row is gone (trimmed by retention): the key passes on.
            o = next;
        }
    }

    /// A waiting row the key passed to becomes due, at `now` or its delivery time if later.
    /// Returns whether it was waiting.
    pub(crate) fn make_due(&mut self, offset: u64, now: u64) -> bool {
        if !self.rows.get(&offset).is_some_and(|r| r.waiting) {
            return false;
        }
        let Some(mut row) = self.remove_row(offset) else {
            return false;
        };
        row.waiting = false;
        row.due = row.due.max(now);
        self.put_row(offset, row, false);
        true
    }

    /// [`pass_key`](Self::pass_key) and [`make_due`](Self::make_due) at once (for a holder
    /// that left without a settlement to wait for: trimmed, gone). Returns the row made due.
    pub(crate) fn release_key(&mut self, offset: u64, now: u64) -> Option<u64> {
        let next = self.pass_key(offset)?;
        self.make_due(next, now).then_some(next)
    }

    /// Rebuilds the ordering keys from the rows (at open). Returns the rows it changed: a key
    /// whose holder is gone passes to its first waiting message, which becomes due at `now`.
    pub(crate) fn rebuild_keys(&mut self, now: u64) -> Vec<u64> {
        let mut keyed: Vec<(u64, bool, String)> = self
            .rows
            .iter()
            .filter_map(|(o, r)| r.key.clone().map(|k| (*o, r.waiting, k)))
            .collect();
        keyed.sort_unstable();
        let mut changed = Vec::new();
        for (o, waiting, k) in &keyed {
            // Holders first (in offset order), so waiting rows queue behind them.
            if !waiting && !self.keys.enter(k, *o) {
                // Two holders of one key (not written by this build): the later one waits.
                if let Some(mut row) = self.remove_row(*o) {
                    row.waiting = true;
                    self.put_row(*o, row, false);
                    changed.push(*o);
                }
            }
        }
        for (o, waiting, k) in &keyed {
            if *waiting {
                self.keys.restore_waiting(k, *o);
            }
        }
        for o in self.keys.settle_holders() {
            if self.make_due(o, now) {
                changed.push(o);
            }
        }
        changed
    }

    /// Inserts or replaces a row, keeping `due` and `parked` consistent.
    pub(crate) fn put_row(&mut self, offset: u64, row: Row, in_flight: bool) {
        self.remove_row(offset);
        if row.parked {
            self.parked += 1;
        } else if !in_flight && !row.waiting {
            self.due.insert((row.due, offset));
        }
        self.rows.insert(offset, row);
    }

    pub(crate) fn remove_row(&mut self, offset: u64) -> Option<Row> {
        let row = self.rows.remove(&offset)?;
        if row.parked {
            self.parked -= 1;
        }
        self.due.remove(&(row.due, offset));
        Some(row)
    }

    /// The lowest offset this group still needs, given the lowest offset among its spilled
    /// rows.
    pub(crate) fn needs_from(&self, spilled_from: Option<u64>) -> u64 {
        let mut min = self.floor.min(self.cursor);
        if let Some(o) = self.rows.keys().min() {
            min = min.min(*o);
        }
        if let Some(o) = spilled_from {
            min = min.min(o);
        }
        min
    }

    /// Counts a row that left memory for the `spill` table.
    pub(crate) fn spilled_out(&mut self, due: u64) {
        self.spilled += 1;
        self.spill_min = Some(self.spill_min.map_or(due, |m| m.min(due)));
    }

    /// Scheduled rows: those waiting in memory and those spilled.
    pub(crate) fn scheduled(&self) -> u64 {
        self.due.len() as u64 + self.spilled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Marking offsets done in any order gives the same set as a plain set, and the floor is
        /// the first offset not done.
        #[test]
        fn done_ranges_match_a_plain_set(order in proptest::collection::vec(0u64..64, 0..100)) {
            let mut g = GroupState { cursor: 64, ..GroupState::default() };
            let mut plain = BTreeSet::new();
            for o in order {
                g.mark_done(o);
                plain.insert(o);
                let floor = (0..).find(|o| !plain.contains(o)).unwrap();
                prop_assert_eq!(g.floor, floor);
                for o in 0..70 {
                    prop_assert_eq!(g.is_done(o), plain.contains(&o), "offset {}", o);
                }
                let round = GroupState::from_record(&g.record());
                prop_assert_eq!(round.done, g.done.clone());
                // Ranges never touch each other or the floor.
                let mut last = g.floor;
                for (s, e) in &g.done {
                    prop_assert!(*s > last && e > s);
                    last = *e;
                }
            }
            let lost = g.lost_in_flight();
            prop_assert_eq!(lost, (0..64).filter(|o| !plain.contains(o)).collect::<Vec<_>>());
        }
    }

    proptest! {
        /// Marking a range done is marking each of its offsets done.
        #[test]
        fn a_range_marked_done_is_its_offsets_marked_done(
            order in proptest::collection::vec(0u64..64, 0..40),
            from in 0u64..70,
            len in 0u64..20,
        ) {
            let mut a = GroupState { cursor: 64, ..GroupState::default() };
            for o in &order {
                a.mark_done(*o);
            }
            let mut b = GroupState { cursor: 64, ..GroupState::default() };
            for o in &order {
                b.mark_done(*o);
            }
            a.mark_range_done(from, from + len);
            for o in from..from + len {
                b.mark_done(o);
            }
            prop_assert_eq!(a.floor, b.floor);
            prop_assert_eq!(a.done, b.done);
        }
    }

    proptest! {
        /// A move back makes the offsets after it unread except rows, keeps everything else,
        /// and survives a round trip through the record; a move forward marks the skipped
        /// offsets done except pending first deliveries.
        #[test]
        fn moves_back_and_forward_keep_rows_and_pending(
            done in proptest::collection::btree_set(0u64..64, 0..60),
            rows in proptest::collection::btree_set(0u64..64, 0..10),
            pending in proptest::collection::btree_set(0u64..64, 0..10),
            to in 0u64..64,
            ahead in 0u64..80,
        ) {
            let mut g = GroupState { cursor: 64, ..GroupState::default() };
            for o in &done {
                g.mark_done(*o);
            }
            for o in &rows {
                g.mark_done(*o);
            }
            let pending: BTreeSet<u64> = pending.into_iter().filter(|o| !g.is_done(*o)).collect();
            for o in &pending {
                g.pending.insert(*o, Pending { consumer: "c".into(), delivered_at: Timestamp(0), attempt: 1, row: false });
            }
            g.rewind(to, rows.iter().copied());
            prop_assert_eq!(g.cursor, to);
            for o in 0..70 {
                let want = if o < to { done.contains(&o) || rows.contains(&o) } else if o < 64 { rows.contains(&o) } else { false };
                prop_assert_eq!(g.is_done(o), want, "offset {}", o);
                if o >= to && o < 64 {
                    prop_assert_eq!(g.held_already(o), rows.contains(&o) || pending.contains(&o), "held {}", o);
                }
            }
            let back = GroupState::from_record(&g.record());
            prop_assert!(back.rewound >= rows.iter().copied().filter(|o| *o >= to).max().map_or(0, |o| o + 1));
            let before: Vec<bool> = (0..80).map(|o| g.is_done(o)).collect();
            g.skip_to(ahead);
            for o in 0..80 {
                let want = before[o as usize] || ((to..ahead).contains(&o) && !pending.contains(&o));
                prop_assert_eq!(g.is_done(o), want, "after skip, offset {}", o);
            }
            prop_assert_eq!(g.cursor, ahead.max(to));
        }
    }

    #[test]
    fn raise_floor_drops_ranges_below() {
        let mut g = GroupState::default();
        for o in [3, 4, 8, 9, 12] {
            g.mark_done(o);
        }
        g.raise_floor(9);
        assert_eq!(g.floor, 10);
        assert_eq!(g.done.iter().collect::<Vec<_>>(), [(&12, &13)]);
    }
}
