//! The audit log: every operator action that changes state, stored durably in the backend as
//! messages of the topic [`AUDIT_TOPIC`].

use std::collections::BTreeMap;

use relq::{Broker, Browse, MessageId, NewMessage};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The topic that holds the audit log (one message per action, type `relq.audit`).
pub const AUDIT_TOPIC: &str = "_relq-audit";

/// One operator action.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Its id (the id of the message that stores it).
    #[serde(default)]
    pub id: String,
    /// When the action finished (RFC 3339).
    pub at: String,
    /// Who: the name of the token used (`anonymous` without authentication, `cli` for the
    /// command line).
    pub actor: String,
    /// What: `replay`, `delete`, `purge`, `stop`, `resume`, `terminate`, `cleanup`, `publish`.
    pub action: String,
    /// The topic acted on.
    pub topic: String,
    /// The parameters given.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// The HTTP status of the answer (200 when it succeeded).
    pub status: u16,
    /// What happened: a summary of the result, or the error.
    pub outcome: String,
}

/// Stores `entry`; retried a few times. An entry that cannot be stored is logged at error
/// level with its content, so the action is still on record in the logs.
pub(crate) async fn record(broker: &Broker, entry: &AuditEntry) {
    let payload = match serde_json::to_vec(entry) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, ?entry, "audit entry not encodable");
            return;
        }
    };
    let mut last = None;
    for _ in 0..3 {
        match broker
            .publish(AUDIT_TOPIC, NewMessage::new("relq.audit", payload.clone()))
            .await
        {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        tracing::error!(error = %e, actor = %entry.actor, action = %entry.action,
            topic = %entry.topic, params = %entry.params, status = entry.status,
            outcome = %entry.outcome, "audit entry could not be stored");
    }
}

/// Records an action taken outside the HTTP API (the `relq` command line, a service's own
/// tooling) in the audit log: `actor` did `action` on `topic` with `params`, with this outcome
/// (a summary, or the error, whose HTTP-equivalent status is recorded).
pub async fn record_action(
    broker: &Broker,
    actor: &str,
    action: &str,
    topic: &str,
    params: serde_json::Value,
    outcome: Result<String, &relq::Error>,
) {
    let (status, outcome) = match outcome {
        Ok(summary) => (200, summary),
        Err(e) => {
            let p = crate::problem::status_of(e);
            (p.as_u16(), e.to_string())
        }
    };
    let entry = AuditEntry {
        id: String::new(),
        at: relq::Timestamp::now().to_string(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        topic: topic.to_owned(),
        params,
        status,
        outcome,
    };
    record(broker, &entry).await;
}

/// A page of the audit log, newest first, before `before` (the `next` of the previous page),
/// and the `next` of this one.
///
/// # Errors
/// The backend failed.
pub async fn audit_entries(
    broker: &Broker,
    before: Option<MessageId>,
    limit: usize,
) -> relq::Result<(Vec<AuditEntry>, Option<MessageId>)> {
    list(broker, before, limit).await
}

/// A page of the audit log, newest first, before `before`.
pub(crate) async fn list(
    broker: &Broker,
    before: Option<MessageId>,
    limit: usize,
) -> relq::Result<(Vec<AuditEntry>, Option<MessageId>)> {
    let mut query = Browse::newest().limit(limit);
    if let Some(b) = before {
        query = query.before(b);
    }
    let page = match broker.browse(AUDIT_TOPIC, &query).await {
        Ok(p) => p,
        Err(relq::Error::NotFound(_)) => return Ok((Vec::new(), None)),
        Err(e) => return Err(e),
    };
    let next = (page.len() == query.page_size())
        .then(|| page.last().map(|m| m.id))
        .flatten();
    let entries = page
        .iter()
        .map(|m| {
            serde_json::from_slice::<AuditEntry>(&m.payload)
                .map(|mut e| {
                    e.id = m.id.to_string();
                    e
                })
                .unwrap_or_else(|e| AuditEntry {
                    id: m.id.to_string(),
                    at: m.published_at.to_string(),
                    actor: "?".into(),
                    action: "?".into(),
                    topic: String::new(),
                    params: serde_json::Value::Object(Default::default()),
                    status: 0,
                    outcome: format!("unreadable audit entry: {e}"),
                })
        })
        .collect();
    Ok((entries, next))
}

/// Parameters as a JSON object, for an entry.
pub(crate) fn params(
    pairs: impl IntoIterator<Item = (&'static str, serde_json::Value)>,
) -> serde_json::Value {
    let m: BTreeMap<&str, serde_json::Value> = pairs.into_iter().collect();
    serde_json::to_value(m).unwrap_or_default()
}
