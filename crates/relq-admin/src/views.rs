//! What the API answers with: the JSON shapes of topics, messages, dead letters and the rest,
//! kept apart from the library's types so the HTTP contract changes only on purpose.

use std::collections::BTreeMap;

use relq::{
    AttemptFailure, ConsumerInfo, DeadLetter, FailureGroup, GroupInfo, Message, MessageId,
    ReplayOutlook, Suggestion, Timestamp, TopicInfo,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub(crate) fn time(t: Timestamp) -> String {
    t.to_string()
}

fn age_ms(id: Option<MessageId>, now: Timestamp) -> Option<u64> {
    id.map(|id| now.since(Timestamp(id.ms)).as_millis() as u64)
}

/// One page of a list; `next` is the cursor of the following page, absent on the last.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page<T: ToSchema> {
    /// The items of this page.
    pub(crate) items: Vec<T>,
    /// Pass as `after` (or `before`, newest first) to get the next page.
    pub(crate) next: Option<String>,
}

/// A topic and its groups.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TopicView {
    /// Its name.
    pub(crate) name: String,
    /// Messages stored.
    pub(crate) length: u64,
    /// The oldest stored id.
    pub(crate) first_id: Option<String>,
    /// The newest id.
    pub(crate) last_id: Option<String>,
    /// Dead letters stored.
    pub(crate) dead_letters: u64,
    /// Ids of stopped messages.
    pub(crate) stopped: Vec<String>,
    /// Its consumer groups.
    pub(crate) groups: Vec<GroupView>,
    /// Messages published since it was created (a counter: its rate is the publish rate).
    pub(crate) published: u64,
}

/// A consumer group.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupView {
    /// Its name.
    pub(crate) name: String,
    /// The last id it read.
    pub(crate) cursor: String,
    /// Delivered, not settled.
    pub(crate) pending: u64,
    /// Not yet read.
    pub(crate) lag: u64,
    /// Retries and delayed messages waiting for their time.
    pub(crate) scheduled: u64,
    /// Stopped messages held back.
    pub(crate) stopped: u64,
    /// Messages waiting behind an earlier message of their ordering key.
    pub(crate) blocked: u64,
    /// Milliseconds since the oldest pending message was published.
    pub(crate) oldest_pending_age_ms: Option<u64>,
    /// Milliseconds since the oldest unread message was published.
    pub(crate) oldest_unread_age_ms: Option<u64>,
    /// Its consumers.
    pub(crate) consumers: Vec<ConsumerView>,
}

/// A consumer of a group.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConsumerView {
    /// Its name.
    pub(crate) name: String,
    /// Messages it holds.
    pub(crate) pending: u64,
    /// Milliseconds since it last received a delivery.
    pub(crate) idle_ms: u64,
}

impl TopicView {
    pub(crate) fn new(t: TopicInfo, now: Timestamp) -> TopicView {
        TopicView {
            name: t.name,
            published: t.published,
            length: t.length,
            first_id: t.first_id.map(|i| i.to_string()),
            last_id: t.last_id.map(|i| i.to_string()),
            dead_letters: t.dead_letters,
            stopped: t.stopped.iter().map(ToString::to_string).collect(),
            groups: t
                .groups
                .into_iter()
                .map(|g| GroupView::new(g, now))
                .collect(),
        }
    }
}

/// A route of the configuration and how far its group is on each topic it forwards.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RouteView {
    /// Its name.
    pub(crate) name: String,
    /// The topic pattern it forwards from.
    pub(crate) from: String,
    /// The topics it forwards into.
    pub(crate) to: Vec<String>,
    /// Its consumer group on every source topic: `route.<name>`.
    pub(crate) group: String,
    /// Each existing topic the pattern matches, with the route's group there (absent until a
    /// `relq route` process joined it).
    pub(crate) sources: Vec<RouteSourceView>,
}

/// A source topic of a route.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RouteSourceView {
    /// The topic.
    pub(crate) topic: String,
    /// The route's group on it.
    pub(crate) group: Option<GroupView>,
}

impl GroupView {
    pub(crate) fn new(g: GroupInfo, now: Timestamp) -> GroupView {
        GroupView {
            oldest_pending_age_ms: age_ms(g.oldest_pending, now),
            oldest_unread_age_ms: age_ms(g.oldest_unread, now),
            name: g.name,
            cursor: g.cursor.to_string(),
            pending: g.pending,
            lag: g.lag,
            scheduled: g.scheduled,
            stopped: g.parked,
            blocked: g.blocked,
            consumers: g.consumers.into_iter().map(ConsumerView::from).collect(),
        }
    }
}

impl From<ConsumerInfo> for ConsumerView {
    fn from(c: ConsumerInfo) -> ConsumerView {
        ConsumerView {
            name: c.name,
            pending: c.pending,
            idle_ms: c.idle_ms,
        }
    }
}

/// How a payload is written in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Encoding {
    /// As text (the payload is UTF-8).
    #[default]
    Utf8,
    /// As lowercase hexadecimal (any bytes).
    Hex,
}

pub(crate) fn encode_payload(p: &[u8]) -> (String, Encoding) {
    match std::str::from_utf8(p) {
        Ok(s) => (s.to_owned(), Encoding::Utf8),
        Err(_) => (
            p.iter().map(|b| format!("{b:02x}")).collect(),
            Encoding::Hex,
        ),
    }
}

pub(crate) fn decode_payload(p: &str, enc: Encoding) -> Result<Vec<u8>, String> {
    match enc {
        Encoding::Utf8 => Ok(p.as_bytes().to_vec()),
        Encoding::Hex => {
            if !p.len().is_multiple_of(2) {
                return Err("a hex payload has an even number of digits".into());
            }
            (0..p.len())
                .step_by(2)
                .map(|i| {
                    p.get(i..i + 2)
                        .and_then(|d| u8::from_str_radix(d, 16).ok())
                        .ok_or_else(|| {
                            format!("{:?} is not hexadecimal", p.get(i..i + 2).unwrap_or(""))
                        })
                })
                .collect()
        }
    }
}

/// A stored message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageView {
    /// Its id.
    pub(crate) id: String,
    /// Its type.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// The payload, as `payload_encoding` says.
    pub(crate) payload: String,
    /// `utf8` or `hex`.
    pub(crate) payload_encoding: Encoding,
    /// Its headers.
    pub(crate) headers: BTreeMap<String, String>,
    /// When it was published (RFC 3339).
    pub(crate) published_at: String,
    /// When it is due, if it was published with a delay.
    pub(crate) deliver_at: Option<String>,
    /// Deliveries so far (0 when browsed).
    pub(crate) attempt: u32,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> MessageView {
        let (payload, payload_encoding) = encode_payload(&m.payload);
        MessageView {
            id: m.id.to_string(),
            kind: m.kind.clone(),
            payload,
            payload_encoding,
            headers: m.headers.clone(),
            published_at: time(m.published_at),
            deliver_at: m.deliver_at.map(time),
            attempt: m.attempt,
        }
    }
}

/// One failed attempt.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AttemptView {
    /// The delivery count of the attempt.
    pub(crate) attempt: u32,
    /// When it failed.
    pub(crate) at: String,
    /// The consumer that ran it.
    pub(crate) consumer: String,
    /// The kind of failure (`retryable`, `permanent`, `panic`, `timeout`, `no_handler`,
    /// `delivery_limit`, `expired`).
    pub(crate) kind: String,
    /// The error.
    pub(crate) error: String,
}

impl From<&AttemptFailure> for AttemptView {
    fn from(f: &AttemptFailure) -> AttemptView {
        AttemptView {
            attempt: f.attempt,
            at: time(f.at),
            consumer: f.consumer.clone(),
            kind: f.kind.as_str().to_owned(),
            error: f.error.clone(),
        }
    }
}

/// What to check for a failure, and whether a replay is likely to succeed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SuggestionView {
    /// What to look at.
    pub(crate) check: String,
    /// `likely`, `after_fix` or `unlikely`.
    pub(crate) replay: String,
}

impl From<Suggestion> for SuggestionView {
    fn from(s: Suggestion) -> SuggestionView {
        SuggestionView {
            check: s.check,
            replay: match s.replay {
                ReplayOutlook::Likely => "likely",
                ReplayOutlook::AfterFix => "after_fix",
                ReplayOutlook::Unlikely => "unlikely",
                _ => "unknown",
            }
            .to_owned(),
        }
    }
}

/// A dead letter: a message relq gave up on, with its failure record.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetterView {
    /// Its id.
    pub(crate) id: String,
    /// The message.
    pub(crate) message: MessageView,
    /// The topic.
    pub(crate) topic: String,
    /// The group that gave up.
    pub(crate) group: String,
    /// The consumer of the last attempt.
    pub(crate) consumer: String,
    /// The handler (message type, or `fallback`).
    pub(crate) handler: String,
    /// Why (the kind of the last failure).
    pub(crate) reason: String,
    /// The error category, if the handler set one.
    pub(crate) category: Option<String>,
    /// The last error and its causes, outermost first.
    pub(crate) error_chain: Vec<String>,
    /// A backtrace, when captured.
    pub(crate) backtrace: Option<String>,
    /// Deliveries made.
    pub(crate) attempts: u32,
    /// When the first attempt failed.
    pub(crate) first_failed_at: String,
    /// When the last attempt failed.
    pub(crate) last_failed_at: String,
    /// Every failed attempt, oldest first.
    pub(crate) failures: Vec<AttemptView>,
    /// What to check, from the failure category (or reason).
    pub(crate) suggestion: Option<SuggestionView>,
}

impl DeadLetterView {
    pub(crate) fn new(d: &DeadLetter, suggestion: Option<Suggestion>) -> DeadLetterView {
        DeadLetterView {
            id: d.id.to_string(),
            message: MessageView::from(&d.message),
            topic: d.topic.clone(),
            group: d.group.clone(),
            consumer: d.consumer.clone(),
            handler: d.handler.clone(),
            reason: d.reason.as_str().to_owned(),
            category: d.category.clone(),
            error_chain: d.error_chain.clone(),
            backtrace: d.backtrace.clone(),
            attempts: d.attempts,
            first_failed_at: time(d.first_failed_at),
            last_failed_at: time(d.last_failed_at),
            failures: d.failures.iter().map(AttemptView::from).collect(),
            suggestion: suggestion.map(SuggestionView::from),
        }
    }
}

/// Dead letters that failed with the same error, once numbers, ids and quoted values are
/// normalised.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FailureGroupView {
    /// The normalised error.
    pub(crate) fingerprint: String,
    /// One error text as it was.
    pub(crate) example: String,
    /// How many dead letters.
    pub(crate) count: u64,
    /// The earliest last failure.
    pub(crate) first_seen: String,
    /// The latest last failure.
    pub(crate) last_seen: String,
    /// Counts by message type.
    pub(crate) types: BTreeMap<String, u64>,
    /// Counts by handler.
    pub(crate) handlers: BTreeMap<String, u64>,
    /// Counts by group.
    pub(crate) groups: BTreeMap<String, u64>,
    /// Counts by category.
    pub(crate) categories: BTreeMap<String, u64>,
    /// A few dead-letter ids.
    pub(crate) sample_ids: Vec<String>,
    /// The suggestion of the most common category.
    pub(crate) suggestion: Option<SuggestionView>,
}

impl From<FailureGroup> for FailureGroupView {
    fn from(g: FailureGroup) -> FailureGroupView {
        FailureGroupView {
            fingerprint: g.fingerprint,
            example: g.example,
            count: g.count,
            first_seen: time(g.first_seen),
            last_seen: time(g.last_seen),
            types: g.types,
            handlers: g.handlers,
            groups: g.groups,
            categories: g.categories,
            sample_ids: g.sample_ids.iter().map(ToString::to_string).collect(),
            suggestion: g.suggestion.map(SuggestionView::from),
        }
    }
}
