#![warn(missing_docs, missing_debug_implementations)]
//! relq: reliable, at-least-once message processing.
//!
//! Publish messages to topics; consume them in consumer groups. Every group receives every
//! message; consumers within a group share the work. A message is acknowledged only after its
//! handler succeeds. A failed handler's message is retried with backoff (scheduled in the backend,
//! not in a sleeping task) or dead-lettered with a full failure record an operator can list,
//! replay and purge. A consumer that dies leaves its messages pending; they are recovered on
//! restart or claimed by another consumer after `claim_after`.
//!
//! **Delivery is at-least-once**: a handler can see a message more than once (after a crash, a
//! timeout or a claim), so handlers must be idempotent.
//!
//! ```
//! use std::time::Duration;
//! use relq::{Backoff, Broker, HandlerError, Message, NewMessage, StartPosition};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), relq::Error> {
//! # let dir = std::env::temp_dir().join(format!("relq-doctest-{}", std::process::id()));
//! # #[cfg(feature = "embedded")]
//! let broker = Broker::open(&dir)?; // the embedded engine; Broker::memory() for tests
//! # #[cfg(not(feature = "embedded"))]
//! # let broker = Broker::memory();
//!
//! let consumer = broker
//!     .consumer("orders", "billing")
//!     .name("worker-1")
//!     .start(StartPosition::Earliest)
//!     .concurrency(8)
//!     .retry(Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10)).max_attempts(5))
//!     .handler("order.created", |msg: Message| async move {
//!         let order = std::str::from_utf8(&msg.payload).map_err(HandlerError::permanent)?;
//!         println!("billing order {order} (attempt {})", msg.attempt);
//!         Ok(())
//!     })
//!     .build()?
//!     .start()
//!     .await?;
//!
//! broker.publish("orders", NewMessage::new("order.created", "order-42")).await?;
//!
//! while consumer.stats().processed < 1 {
//!     tokio::time::sleep(Duration::from_millis(5)).await;
//! }
//! consumer.shutdown(Duration::from_secs(5)).await;
//! # drop(broker);
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(())
//! # }
//! ```

mod analysis;
mod broker;
mod codec;
mod compression;
#[cfg(feature = "config")]
mod config;
mod consumer;
mod fast_hash;
mod filter;
mod handler;
mod memory;
mod message;
mod pattern;
mod retry;
mod route;

pub use analysis::{fingerprint, FailureGroup, ReplayOutlook, Suggestion, Suggestions};
pub use broker::{
    Broker, CleanupTask, DeadLetters, DEFAULT_DEAD_LETTER_RETENTION, DEFAULT_MAX_PAYLOAD,
};
#[cfg(feature = "msgpack")]
pub use codec::MsgPack;
#[cfg(feature = "protobuf")]
pub use codec::Protobuf;
pub use codec::{typed, Codec, Decode, Json, TypedHandler};
pub use compression::{Compression, DecodeError};
#[cfg(feature = "config")]
pub use config::{
    BackendSection, Config, ConsumerSection, DeadLetterSection, DurabilityKind, EmbeddedSection,
    Layers, Origin, RedisSection, Resolved, RetryKind, RetrySection, RouteSection, ServerSection,
    TokenEntry, TokenRole, TopicSection,
};
pub use consumer::{
    Consumer, ConsumerBuilder, ConsumerHandle, ConsumerStats, KeyRetries, OnExpired,
    ShutdownReport, StopReason,
};
pub use filter::Filter;
pub use handler::{BatchConfig, BatchHandler, Handler, HandlerError};
pub use memory::{MemoryBackend, MemoryConfig};
pub use message::{priority_topic, NewMessage, DEFAULT_DEDUP_WINDOW, MAX_PRIORITIES};
pub use pattern::TopicPattern;
pub use relq_core::{
    replay_headers, validate_name, AttemptFailure, Backend, BackendError, BackendErrorKind,
    BackendMetric, Browse, CleanupReport, ConfigError, ConsumerInfo, DeadLetter, DeadLetterId,
    DeadLetterQuery, DeadLetterStats, Delivery, Error, FailureKind, Grant, GroupInfo,
    GroupPlacement, Health, HealthCheck, Limit, Message, MessageId, NameError, NotFound, Outgoing,
    Placement, RateLimit, Result, Retention, Settlement, StartPosition, Subscription, Timestamp,
    TopicInfo, HEADER_CONTENT_TYPE, HEADER_EDITED, HEADER_ENCODING, HEADER_EXPIRES_AT,
    HEADER_IDEMPOTENCY_KEY, HEADER_ORDERING_KEY, HEADER_ORIGINAL_ID, HEADER_PRIORITY,
    HEADER_REPLAY_GROUP, HEADER_REPLAY_OF, HEADER_ROUTED_FROM, HEADER_ROUTE_HOPS,
    HEADER_SCHEMA_VERSION, MAX_HEADERS, MAX_HEADER_NAME_LEN, MAX_HEADER_VALUE_LEN, MAX_KIND_LEN,
    MAX_NAME_LEN, MAX_RESERVED_HEADERS, RESERVED_HEADER_PREFIX,
};
#[cfg(feature = "embedded")]
pub use relq_embedded::{
    CheckReport, DamageKind, Durability, EmbeddedBackend, EmbeddedConfig, EngineStats, Recovery,
    SegmentDamage, TopicCheck,
};
#[cfg(feature = "redis")]
pub use relq_redis::{RedisBackend, RedisConfig};
pub use retry::{Backoff, Failure, RetryDecision, RetryPolicy};
