//! Per-key ordering in one group: the messages of each ordering key that the group read and has
//! not settled, in order. The first read of a key holds it (it may be delivered); later ones
//! wait until the holder is settled (acknowledged, dead-lettered, released by a retry that lets
//! the key go on, or gone from the topic), then the next in id order holds it.
//!
//! The in-process backends keep one per group under their lock; the Redis backend keeps the same
//! structure in the server (see `docs/design.md`, "Per-key ordering").

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// One key's holder and the messages waiting behind it.
#[derive(Debug)]
struct Queue<Id> {
    holder: Option<Id>,
    waiting: BTreeSet<Id>,
}

/// The ordering keys of one group (see the module docs).
#[derive(Debug)]
pub struct KeyQueues<Id> {
    keys: HashMap<Arc<str>, Queue<Id>>,
    key_of: HashMap<Id, Arc<str>>,
    /// Every waiting id, for the group's floor.
    waiting: BTreeSet<Id>,
}

impl<Id> Default for KeyQueues<Id> {
    fn default() -> Self {
        KeyQueues {
            keys: HashMap::new(),
            key_of: HashMap::new(),
            waiting: BTreeSet::new(),
        }
    }
}

impl<Id: Ord + Copy + std::hash::Hash> KeyQueues<Id> {
    /// Enters `id`, read under `key`: true when it holds the key (no message of the key is
    /// unsettled), false when it waits. An id entered already keeps its place.
    pub fn enter(&mut self, key: &str, id: Id) -> bool {
        if let Some(k) = self.key_of.get(&id) {
            return self.keys.get(k).is_some_and(|q| q.holder == Some(id));
        }
        let key: Arc<str> = match self.keys.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        self.key_of.insert(id, key.clone());
        let q = self.keys.entry(key).or_insert(Queue {
            holder: None,
            waiting: BTreeSet::new(),
        });
        if q.holder.is_none() && q.waiting.is_empty() {
            q.holder = Some(id);
            true
        } else {
            q.waiting.insert(id);
            self.waiting.insert(id);
            false
        }
    }

    /// Restores a waiting `id` (a reopen rebuilding the queues): it waits behind the key's
    /// holder, whichever is entered first.
    pub fn restore_waiting(&mut self, key: &str, id: Id) {
        if self.key_of.contains_key(&id) {
            return;
        }
        let key: Arc<str> = match self.keys.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        self.key_of.insert(id, key.clone());
        self.keys
            .entry(key)
            .or_insert(Queue {
                holder: None,
                waiting: BTreeSet::new(),
            })
            .waiting
            .insert(id);
        self.waiting.insert(id);
    }

    /// Ends `id`'s place under its key. When it held the key, the key passes to the first
    /// waiting message, which is returned: it may be delivered now. `None` for an id that is
    /// not entered, or that was waiting.
    pub fn release(&mut self, id: Id) -> Option<Id> {
        let key = self.key_of.remove(&id)?;
        let q = self.keys.get_mut(&key)?;
        let mut next = None;
        if q.holder == Some(id) {
            q.holder = q.waiting.pop_first();
            if let Some(n) = q.holder {
                self.waiting.remove(&n);
                next = Some(n);
            }
        } else if q.waiting.remove(&id) {
            self.waiting.remove(&id);
        }
        if q.holder.is_none() {
            // A key with only waiting messages cannot stay so: its first takes over.
            match q.waiting.pop_first() {
                Some(n) => {
                    self.waiting.remove(&n);
                    q.holder = Some(n);
                    next = Some(n);
                }
                None => {
                    self.keys.remove(&key);
                }
            }
        }
        next
    }

    /// Keys whose holder is missing (a reopen restored only waiting messages): their first
    /// waiting message takes over. Returns those, to be made deliverable.
    pub fn settle_holders(&mut self) -> Vec<Id> {
        let mut out = Vec::new();
        for q in self.keys.values_mut() {
            if q.holder.is_none() {
                if let Some(n) = q.waiting.pop_first() {
                    self.waiting.remove(&n);
                    q.holder = Some(n);
                    out.push(n);
                }
            }
        }
        out
    }

    /// Whether `id` waits behind its key's holder.
    pub fn is_waiting(&self, id: Id) -> bool {
        self.waiting.contains(&id)
    }

    /// The key `id` was entered under.
    pub fn key(&self, id: Id) -> Option<&str> {
        self.key_of.get(&id).map(|k| &**k)
    }

    /// How many messages wait.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The lowest waiting id.
    pub fn first_waiting(&self) -> Option<Id> {
        self.waiting.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_passes_in_id_order_and_keys_are_independent() {
        let mut q = KeyQueues::default();
        assert!(q.enter("a", 1));
        assert!(!q.enter("a", 2));
        assert!(q.enter("b", 3));
        assert!(!q.enter("a", 4));
        assert!(q.enter("a", 1), "an entered id keeps its place");
        assert_eq!(q.waiting(), 2);
        assert_eq!(q.first_waiting(), Some(2));
        assert_eq!(q.release(3), None);
        assert_eq!(q.release(1), Some(2));
        assert!(!q.is_waiting(2));
        assert!(q.is_waiting(4));
        // A waiting message that goes (trimmed) leaves the holder alone.
        assert_eq!(q.release(4), None);
        assert_eq!(q.release(2), None);
        assert_eq!(q.waiting(), 0);
        assert!(q.enter("a", 9), "the key is free again");
        assert_eq!(q.key(9), Some("a"));
    }

    #[test]
    fn restored_waiting_messages_get_a_holder() {
        let mut q = KeyQueues::default();
        q.restore_waiting("a", 5);
        q.restore_waiting("a", 7);
        assert!(!q.enter("a", 8));
        assert_eq!(q.settle_holders(), vec![5]);
        assert_eq!(q.release(5), Some(7));
        assert_eq!(q.release(7), Some(8));
        assert_eq!(q.release(8), None);
        assert_eq!(q.waiting(), 0);
    }
}
