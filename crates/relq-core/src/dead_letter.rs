//! Dead letters: the failure record of a message relq gave up on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::failure::{AttemptFailure, FailureKind};
use crate::model::{Message, MessageId, Timestamp};

/// A dead letter's id, unique within its topic (`<ms>-<seq>`, like message ids).
pub type DeadLetterId = MessageId;

/// The failure record of a message that was given up on. It holds a copy of the message, so topic
/// retention never loses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id; assigned by the backend when stored.
    pub id: DeadLetterId,
    /// The original message (`message.attempt` is the last delivery count).
    pub message: Message,
    /// The topic.
    pub topic: String,
    /// The group that gave up.
    pub group: String,
    /// The consumer that ran the last attempt.
    pub consumer: String,
    /// The handler that ran it (its message type, or `"fallback"`).
    pub handler: String,
    /// Why it was given up on: the kind of the last failure.
    pub reason: FailureKind,
    /// The error category the handler attached, if any (e.g. "database").
    pub category: Option<String>,
    /// The last error and its causes, outermost first.
    pub error_chain: Vec<String>,
    /// A backtrace of the last error, when `include_stack_trace` is on.
    pub backtrace: Option<String>,
    /// Deliveries made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: Timestamp,
    /// When the last attempt failed.
    pub last_failed_at: Timestamp,
    /// Every failed attempt, oldest first.
    pub failures: Vec<AttemptFailure>,
}

impl DeadLetter {
    /// The dead letter of `message` in `topic`, given up on by `group` after `last` failed: the
    /// consumer, reason, error and attempt count come from `last`; the handler is the message's
    /// type. The id is assigned by the backend when it is stored. Set the other fields (category,
    /// error chain, the earlier failures) as needed.
    pub fn new(
        message: Message,
        topic: impl Into<String>,
        group: impl Into<String>,
        last: AttemptFailure,
    ) -> DeadLetter {
        DeadLetter {
            id: DeadLetterId::ZERO,
            handler: message.kind.clone(),
            topic: topic.into(),
            group: group.into(),
            consumer: last.consumer.clone(),
            reason: last.kind,
            category: None,
            error_chain: vec![last.error.clone()],
            backtrace: None,
            attempts: last.attempt,
            first_failed_at: last.at,
            last_failed_at: last.at,
            failures: vec![last],
            message,
        }
    }
}

/// A filter and page for listing dead letters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadLetterQuery {
    /// Start after this dead-letter id (the `next` of the previous page).
    pub after: Option<DeadLetterId>,
    /// Page size; 0 means 100.
    pub limit: usize,
    /// Only this message type.
    pub kind: Option<String>,
    /// Only this reason.
    pub reason: Option<FailureKind>,
    /// Only this group.
    pub group: Option<String>,
    /// Only this error category.
    pub category: Option<String>,
    /// Only dead letters of this handler (a message type, or `"fallback"`).
    #[serde(default)]
    pub handler: Option<String>,
    /// Only dead letters that failed last at or after this time.
    pub since: Option<Timestamp>,
    /// Only dead letters that failed last before this time.
    pub until: Option<Timestamp>,
}

impl DeadLetterQuery {
    /// The first page of every dead letter.
    pub fn all() -> Self {
        Self::default()
    }
    /// Sets the page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
    /// Continues after `id`.
    pub fn after(mut self, id: DeadLetterId) -> Self {
        self.after = Some(id);
        self
    }
    /// Filters by message type.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }
    /// Filters by reason.
    pub fn reason(mut self, reason: FailureKind) -> Self {
        self.reason = Some(reason);
        self
    }
    /// Filters by group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
    /// Filters by error category.
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.category = Some(category.into());
        self
    }
    /// Filters by the handler that gave up (a message type, or `"fallback"`).
    pub fn handler(mut self, handler: impl Into<String>) -> Self {
        self.handler = Some(handler.into());
        self
    }
    /// Filters by last failure time: `since <= t < until`.
    pub fn between(mut self, since: Option<Timestamp>, until: Option<Timestamp>) -> Self {
        self.since = since;
        self.until = until;
        self
    }

    /// The page size to use.
    pub fn page_size(&self) -> usize {
        if self.limit == 0 {
            100
        } else {
            self.limit
        }
    }

    /// Whether `dl` passes the filters (not the page bounds).
    pub fn matches(&self, dl: &DeadLetter) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == dl.message.kind)
            && self.reason.is_none_or(|r| r == dl.reason)
            && self.group.as_ref().is_none_or(|g| *g == dl.group)
            && self
                .category
                .as_ref()
                .is_none_or(|c| dl.category.as_ref() == Some(c))
            && self.handler.as_ref().is_none_or(|h| *h == dl.handler)
            && self.since.is_none_or(|s| dl.last_failed_at >= s)
            && self.until.is_none_or(|u| dl.last_failed_at < u)
    }
}

/// Dead-letter counts by category.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterStats {
    /// All dead letters of the topic.
    pub total: u64,
    /// By reason.
    pub by_reason: BTreeMap<String, u64>,
    /// By message type.
    pub by_kind: BTreeMap<String, u64>,
    /// By error category ("none" when the handler set none).
    pub by_category: BTreeMap<String, u64>,
    /// The oldest last-failure time.
    pub oldest: Option<Timestamp>,
}

impl DeadLetterStats {
    /// Adds one dead letter to the counts.
    pub fn add(&mut self, dl: &DeadLetter) {
        self.total += 1;
        *self
            .by_reason
            .entry(dl.reason.as_str().to_owned())
            .or_default() += 1;
        *self.by_kind.entry(dl.message.kind.clone()).or_default() += 1;
        *self
            .by_category
            .entry(dl.category.clone().unwrap_or_else(|| "none".to_owned()))
            .or_default() += 1;
        self.oldest = Some(match self.oldest {
            Some(o) => o.min(dl.last_failed_at),
            None => dl.last_failed_at,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Outgoing;

    #[test]
    fn the_handler_filter_is_the_handler_not_the_type() {
        let out = Outgoing {
            kind: "invoice".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            headers: BTreeMap::new(),
            deliver_at: None,
            dedup_window: None,
        };
        let m = Message::new(MessageId { ms: 1, seq: 0 }, out, Timestamp(1), 1);
        let failure = AttemptFailure {
            attempt: 1,
            at: Timestamp(2),
            consumer: "c".into(),
            kind: FailureKind::Permanent,
            error: "no".into(),
        };
        let mut dl = DeadLetter::new(m, "t", "g", failure);
        dl.handler = "fallback".into();
        assert!(DeadLetterQuery::all().handler("fallback").matches(&dl));
        assert!(!DeadLetterQuery::all().handler("invoice").matches(&dl));
        assert!(DeadLetterQuery::all().kind("invoice").matches(&dl));
        assert!(!DeadLetterQuery::all()
            .handler("fallback")
            .kind("other")
            .matches(&dl));
    }
}
