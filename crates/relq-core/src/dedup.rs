//! A topic's deduplication index, for backends that keep it in memory: which message each
//! idempotency key published within its window became.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::MessageId;

/// Idempotency keys of one topic and the ids their first publish got, each until its window
/// ends (milliseconds since the epoch). Lookups ignore ended entries; [`prune`](Self::prune)
/// removes them.
#[derive(Debug, Default)]
pub struct DedupIndex {
    entries: HashMap<Arc<str>, (MessageId, u64)>,
    /// Every entry by the end of its window (a key published again after its window ended has
    /// a second, later item here; the first one is skipped when it comes up).
    by_end: BTreeSet<(u64, Arc<str>)>,
}

impl DedupIndex {
    /// The id `key` got, if its window has not ended at `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<MessageId> {
        match self.entries.get(key) {
            Some((id, until)) if *until > now_ms => Some(*id),
            _ => None,
        }
    }

    /// Records that `key` became `id`, until `until_ms`.
    pub fn insert(&mut self, key: &str, id: MessageId, until_ms: u64) {
        let key: Arc<str> = Arc::from(key);
        self.by_end.insert((until_ms, key.clone()));
        self.entries.insert(key, (id, until_ms));
    }

    /// Removes the entries whose window ended at `now_ms`, calling `removed` with each key.
    pub fn prune(&mut self, now_ms: u64, mut removed: impl FnMut(&str)) {
        while let Some(first) = self.by_end.first() {
            if first.0 > now_ms {
                break;
            }
            let Some((until, key)) = self.by_end.pop_first() else {
                break;
            };
            // Only when that entry is still the key's (not replaced by a later publish).
            if self.entries.get(&key).is_some_and(|(_, u)| *u == until) {
                self.entries.remove(&key);
                removed(&key);
            }
        }
    }

    /// How many keys it holds (ended ones not yet pruned included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_lives_until_its_window_ends_and_a_later_publish_replaces_it() {
        let mut d = DedupIndex::default();
        let a = MessageId::new(1, 0);
        let b = MessageId::new(2, 1);
        d.insert("k", a, 100);
        assert_eq!(d.get("k", 99), Some(a));
        assert_eq!(d.get("k", 100), None);
        assert_eq!(d.get("other", 0), None);
        // Published again after the window: the new entry stands, and pruning the old item
        // leaves it.
        d.insert("k", b, 300);
        let mut gone = Vec::new();
        d.prune(150, |k| gone.push(k.to_owned()));
        assert!(gone.is_empty());
        assert_eq!(d.get("k", 150), Some(b));
        d.prune(300, |k| gone.push(k.to_owned()));
        assert_eq!(gone, ["k"]);
        assert!(d.is_empty());
    }

    #[test]
    fn prune_takes_every_ended_entry_whatever_the_insert_order() {
        let mut d = DedupIndex::default();
        for (i, until) in [50u64, 10, 40, 20, 30].into_iter().enumerate() {
            d.insert(&format!("k{i}"), MessageId::new(i as u64, 0), until);
        }
        let mut gone = Vec::new();
        d.prune(30, |k| gone.push(k.to_owned()));
        gone.sort();
        assert_eq!(gone, ["k1", "k3", "k4"]);
        assert_eq!(d.len(), 2);
    }
}
