//! Hash maps with cheap hashes for the per-message paths, where SipHash would cost more than
//! the lookup:
//! - keyed by message id: ids are assigned by the backend (not chosen by whoever publishes),
//!   so the hash needs no defence against chosen collisions;
//! - keyed by message type, for a consumer's handlers: the map holds only the types the
//!   application registered, so a publisher choosing colliding types can slow a lookup down
//!   by a few comparisons at most (no flood of colliding entries can be inserted).

use std::hash::BuildHasherDefault;

use relq_core::MessageId;

/// A set of message ids.
pub(crate) type IdSet = std::collections::HashSet<MessageId, BuildHasherDefault<IdHasher>>;

/// A map from message ids.
pub(crate) type IdMap<V> = std::collections::HashMap<MessageId, V, BuildHasherDefault<IdHasher>>;

/// Multiply-rotate over the id's two integers (the top bits, which the table uses, mix both).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map from message types (a consumer's handlers).
pub(crate) type KindMap<V> = std::collections::HashMap<String, V, BuildHasherDefault<KindHasher>>;

/// FNV-1a over the bytes.
pub(crate) struct KindHasher(u64);

impl Default for KindHasher {
    fn default() -> Self {
        KindHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for KindHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
