#![warn(missing_docs, missing_debug_implementations)]
//! The contract between relq and its backends: the message model, the errors, the failure
//! vocabulary, dead letters and the [`Backend`] trait.
//!
//! Applications depend on the `relq` crate, which re-exports what they need from here. A backend
//! (the embedded engine in `relq-embedded`, Redis Streams in `relq-redis`, the in-memory backend
//! in `relq` itself) depends on this crate only, so no backend's dependencies reach a build that
//! does not use it.

mod backend;
mod dead_letter;
mod dedup;
mod error;
mod failure;
mod model;
mod ordering;
mod rate;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{
    replay_headers, replay_message, Backend, BackendMetric, Browse, CleanupReport, ConsumerInfo,
    Delivery, GroupInfo, GroupPlacement, Health, HealthCheck, Placement, Retention, Settlement,
    Subscription, TopicInfo,
};
pub use dead_letter::{DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats};
pub use dedup::DedupIndex;
pub use error::{
    BackendError, BackendErrorKind, ConfigError, Error, Limit, NameError, NotFound, Result,
};
pub use failure::{AttemptFailure, FailureKind};
pub use model::{
    instant_after, ordering_key, shorten, validate_headers, validate_kind, validate_name, Message,
    MessageId, Outgoing, StartPosition, Timestamp, HEADER_CONTENT_TYPE, HEADER_EDITED,
    HEADER_ENCODING, HEADER_EXPIRES_AT, HEADER_IDEMPOTENCY_KEY, HEADER_ORDERING_KEY,
    HEADER_ORIGINAL_ID, HEADER_PRIORITY, HEADER_REPLAY_GROUP, HEADER_REPLAY_OF, HEADER_ROUTED_FROM,
    HEADER_ROUTE_HOPS, HEADER_SCHEMA_VERSION, MAX_DEDUP_WINDOW, MAX_HEADERS, MAX_HEADER_NAME_LEN,
    MAX_HEADER_VALUE_LEN, MAX_IDEMPOTENCY_KEY_LEN, MAX_KIND_LEN, MAX_NAME_LEN,
    MAX_ORDERING_KEY_LEN, MAX_RESERVED_HEADERS, RESERVED_HEADER_PREFIX,
};
pub use ordering::KeyQueues;
pub use rate::{Grant, RateLimit, TokenBuckets};
