//! The failure vocabulary: how an attempt failed, and the record of a failed attempt. Retry
//! policies, the runtime, dead letters and the backends all speak it; it depends on nothing but
//! the model.

use serde::{Deserialize, Serialize};

use crate::model::Timestamp;

/// One failed attempt, as stored with a pending or scheduled entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptFailure {
    /// Which delivery failed (1 = the first).
    pub attempt: u32,
    /// When it failed.
    pub at: Timestamp,
    /// The consumer that ran it.
    pub consumer: String,
    /// What kind of failure it was.
    pub kind: FailureKind,
    /// The error's message.
    pub error: String,
}

/// How an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler returned a retryable error.
    Retryable,
    /// The handler returned a permanent error.
    Permanent,
    /// The handler panicked.
    Panic,
    /// The handler ran past its timeout.
    Timeout,
    /// No handler is registered for the message type.
    NoHandler,
    /// The message was delivered more times than the retry policy allows without being settled
    /// (consumers crashed or hung while holding it).
    DeliveryLimit,
    /// The message's time to live ended before it was handled (or before a retry would be due).
    Expired,
}

impl FailureKind {
    /// The name used in filters, metrics and output.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
            FailureKind::Panic => "panic",
            FailureKind::Timeout => "timeout",
            FailureKind::NoHandler => "no_handler",
            FailureKind::DeliveryLimit => "delivery_limit",
            FailureKind::Expired => "expired",
        }
    }
}

impl std::str::FromStr for FailureKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "retryable" => FailureKind::Retryable,
            "permanent" => FailureKind::Permanent,
            "panic" => FailureKind::Panic,
            "timeout" => FailureKind::Timeout,
            "no_handler" => FailureKind::NoHandler,
            "delivery_limit" => FailureKind::DeliveryLimit,
            "expired" => FailureKind::Expired,
            other => {
                return Err(crate::error::ConfigError::new(
                    "failure kind",
                    format!(
                        "{:?} is none of retryable, permanent, panic, timeout, no_handler, delivery_limit, expired",
                        crate::model::shorten(other)
                    ),
                )
                .into())
            }
        })
    }
}
