//! The `/api` endpoints: every operation of the library over HTTP, JSON in and out.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use relq::{
    Browse, DeadLetterQuery, FailureKind, MessageId, NewMessage, Retention, StartPosition,
    Timestamp,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::audit::{self, AuditEntry, AUDIT_TOPIC};
use crate::auth::Caller;
use crate::extract::{Body, Path, Query};
use crate::jobs::JobView;
use crate::problem::{ApiResult, Problem};
use crate::views::{
    decode_payload, DeadLetterView, Encoding, FailureGroupView, GroupView, MessageView, Page,
    RouteSourceView, RouteView, TopicView,
};
use crate::Shared;

type St = State<Arc<Shared>>;

/// The largest `max_len` of a cleanup (no log reaches 2^62 offsets).
const MAX_LEN: u64 = 1 << 62;
/// The largest page any list returns.
const MAX_PAGE: usize = 1000;

/// A message or dead-letter id in its full form, `<milliseconds>-<sequence>` (the library also
/// takes Redis's short form `<milliseconds>`; the API does not, so its schema is exact).
fn id(text: &str) -> ApiResult<MessageId> {
    let full = text.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
    });
    if !full {
        return Err(Problem::bad_request(format!(
            "invalid id {text:?}: expected <milliseconds>-<sequence>, e.g. 1700000000000-0"
        )));
    }
    MessageId::from_str(text).map_err(|e| Problem::bad_request(e.to_string()))
}

fn page_size(limit: Option<usize>) -> ApiResult<usize> {
    match limit {
        None => Ok(100),
        Some(n @ 1..=MAX_PAGE) => Ok(n),
        Some(n) => Err(Problem::bad_request(format!(
            "limit {n} is out of range: 1 to {MAX_PAGE}"
        ))),
    }
}

fn parse_time(field: &str, s: &str) -> ApiResult<Timestamp> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        Problem::bad_request(format!(
            "{field} = {s:?}: {e} (expected RFC 3339, e.g. 2026-12-01T00:00:00Z)"
        ))
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| Problem::bad_request(format!("{field} = {s:?} is before 1970")))?
        .as_millis();
    Ok(Timestamp(u64::try_from(ms).unwrap_or(u64::MAX)))
}

fn parse_duration(field: &str, s: &str) -> ApiResult<Duration> {
    humantime::parse_duration(s).map_err(|e| {
        Problem::bad_request(format!(
            "{field} = {s:?}: {e} (write e.g. \"30s\", \"5m\", \"7d\")"
        ))
    })
}

fn writable_topic(topic: &str) -> ApiResult<()> {
    if topic == AUDIT_TOPIC {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the audit log cannot be changed through the API",
        ));
    }
    relq::validate_name("topic", topic).map_err(|e| Problem::from(relq::Error::from(e)))
}

/// Records an operator action in the audit log, with its result, and passes the result on.
async fn audited<T>(
    s: &Shared,
    caller: &Caller,
    action: &str,
    topic: &str,
    params: serde_json::Value,
    result: ApiResult<T>,
    summary: impl FnOnce(&T) -> String,
) -> ApiResult<T> {
    let (status, outcome) = match &result {
        Ok(v) => (200, summary(v)),
        Err(p) => (p.status, p.detail.clone()),
    };
    let entry = AuditEntry {
        id: String::new(),
        at: Timestamp::now().to_string(),
        actor: caller.name.clone(),
        action: action.to_owned(),
        topic: topic.to_owned(),
        params,
        status,
        outcome,
    };
    audit::record(&s.broker, &entry).await;
    result
}

/// The topic of a request (documentation of the path only).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct TopicPath {
    /// The topic.
    #[param(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    topic: String,
}

/// The topic and id of a request (documentation of the path only).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct TopicIdPath {
    /// The topic.
    #[param(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    topic: String,
    /// The message or dead-letter id.
    #[param(pattern = r"^[0-9]{1,20}-[0-9]{1,20}$")]
    id: String,
}

// ---------------------------------------------------------------------------------------------
// Topics

/// Every topic with its groups.
#[utoipa::path(get, path = "/api/topics", tag = "topics",
    responses((status = 200, body = Vec<TopicView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_topics(State(s): St) -> ApiResult<Json<Vec<TopicView>>> {
    let now = Timestamp::now();
    let mut out = Vec::new();
    for t in s.broker.topics().await? {
        if t == AUDIT_TOPIC {
            continue;
        }
        match s.broker.topic_info(&t).await {
            Ok(info) => out.push(TopicView::new(info, now)),
            Err(relq::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(out))
}

/// The configuration's routes (`[[routes]]`) and, on each topic their pattern matches, how far
/// the route's group (`route.<name>`) is: its lag is what is still to be forwarded.
#[utoipa::path(get, path = "/api/routes", tag = "topics",
    responses((status = 200, body = Vec<RouteView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_routes(State(s): St) -> ApiResult<Json<Vec<RouteView>>> {
    let now = Timestamp::now();
    let topics = if s.routes.is_empty() {
        Vec::new()
    } else {
        s.broker.topics().await?
    };
    let mut out = Vec::new();
    for r in &s.routes {
        let group = format!("route.{}", r.name);
        // The configuration was validated at start: the pattern parses.
        let pattern = relq::TopicPattern::from_str(&r.from).map_err(Problem::from)?;
        let mut sources = Vec::new();
        for t in topics
            .iter()
            .filter(|t| pattern.matches(t) && **t != AUDIT_TOPIC)
        {
            let info = match s.broker.topic_info(t).await {
                Ok(info) => info,
                Err(relq::Error::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let g = info
                .groups
                .into_iter()
                .find(|g| g.name == group)
                .map(|g| GroupView::new(g, now));
            sources.push(RouteSourceView {
                topic: t.clone(),
                group: g,
            });
        }
        out.push(RouteView {
            name: r.name.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            group,
            sources,
        });
    }
    Ok(Json(out))
}

/// One topic with its groups and consumers.
#[utoipa::path(get, path = "/api/topics/{topic}", tag = "topics",
    params(TopicPath),
    responses((status = 200, body = TopicView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_topic(
    State(s): St,
    Path(topic): Path<String>,
) -> ApiResult<Json<TopicView>> {
    let info = s.broker.topic_info(&topic).await?;
    Ok(Json(TopicView::new(info, Timestamp::now())))
}

/// Confirmation of a terminate: the topic's name typed again.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TerminateParams {
    /// Must equal the topic's name.
    #[param(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    confirm: Option<String>,
}

/// The result of a terminate.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Terminated {
    /// The topic.
    pub(crate) topic: String,
    /// Whether it existed.
    pub(crate) existed: bool,
}

/// Terminates a topic: removes its messages, groups and dead letters; running consumers stop.
#[utoipa::path(delete, path = "/api/topics/{topic}", tag = "topics",
    params(TopicPath, TerminateParams),
    responses((status = 200, body = Terminated), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn terminate(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Query(p): Query<TerminateParams>,
) -> ApiResult<Json<Terminated>> {
    writable_topic(&topic)?;
    if p.confirm.as_deref() != Some(topic.as_str()) {
        return Err(Problem::bad_request(format!(
            "terminating deletes every message of {topic:?}: repeat its name as ?confirm={topic}"
        )));
    }
    let r = s.broker.terminate(&topic).await.map_err(Problem::from);
    let r = r.map(|existed| Terminated {
        topic: topic.clone(),
        existed,
    });
    audited(
        &s,
        &caller,
        "terminate",
        &topic,
        audit::params([]),
        r,
        |t| format!("terminated (existed: {})", t.existed),
    )
    .await
    .map(Json)
}

/// A cleanup's policy.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CleanupRequest {
    /// Remove acknowledged messages older than this (`"1h"`, `"7d"`).
    pub(crate) min_age: Option<String>,
    /// Keep at most this many messages (trims unacknowledged ones too).
    #[schema(maximum = 4611686018427387904_u64)]
    pub(crate) max_len: Option<u64>,
    /// Only count what would be removed; remove nothing (not audited).
    #[serde(default)]
    pub(crate) dry_run: bool,
}

/// What a cleanup removed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CleanupView {
    /// Messages removed that every group had acknowledged.
    pub(crate) removed: u64,
    /// Messages removed by `max_len` that some group had not acknowledged.
    pub(crate) trimmed_unacknowledged: u64,
    /// True for a dry run: the counts are what a cleanup would remove now; nothing changed.
    pub(crate) dry_run: bool,
}

/// Removes acknowledged messages (and, with `max_len`, the oldest beyond it); with `dry_run`,
/// only counts what it would remove.
#[utoipa::path(post, path = "/api/topics/{topic}/cleanup", tag = "topics",
    params(TopicPath), request_body = CleanupRequest,
    responses((status = 200, body = CleanupView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn cleanup(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Body(req): Body<CleanupRequest>,
) -> ApiResult<Json<CleanupView>> {
    writable_topic(&topic)?;
    let mut retention = Retention::default();
    if let Some(a) = &req.min_age {
        retention = retention.min_age(parse_duration("min_age", a)?);
    }
    if let Some(n) = req.max_len {
        if n > MAX_LEN {
            return Err(Problem::bad_request(format!(
                "max_len {n} is above {MAX_LEN}"
            )));
        }
        retention = retention.max_len(n);
    }
    let view = |c: relq::CleanupReport| CleanupView {
        removed: c.removed,
        trimmed_unacknowledged: c.trimmed_unacknowledged,
        dry_run: req.dry_run,
    };
    if req.dry_run {
        let preview = s.broker.cleanup(&topic, &retention.dry_run(true)).await?;
        return Ok(Json(view(preview)));
    }
    let params = audit::params([
        ("min_age", serde_json::json!(req.min_age)),
        ("max_len", serde_json::json!(req.max_len)),
    ]);
    let r = s
        .broker
        .cleanup(&topic, &retention)
        .await
        .map_err(Problem::from);
    let r = r.map(view);
    audited(&s, &caller, "cleanup", &topic, params, r, |c| {
        format!(
            "removed {} ({} unacknowledged)",
            c.removed, c.trimmed_unacknowledged
        )
    })
    .await
    .map(Json)
}

// ---------------------------------------------------------------------------------------------
// Groups

/// The topic and group of a request (documentation of the path only).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct TopicGroupPath {
    /// The topic.
    #[param(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    topic: String,
    /// The group.
    #[param(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    group: String,
}

/// A position in a topic: `latest` (the next message published), `earliest` (the oldest
/// stored) or a message id (that message and every later one).
fn position(field: &str, text: &str) -> ApiResult<StartPosition> {
    match text {
        "latest" => Ok(StartPosition::Latest),
        "earliest" => Ok(StartPosition::Earliest),
        other => id(other).map(StartPosition::From).map_err(|_| {
            Problem::bad_request(format!(
                "{field} = {other:?}: expected latest, earliest or a message id (<milliseconds>-<sequence>)"
            ))
        }),
    }
}

/// The group, or 404.
async fn group_view(s: &Shared, topic: &str, group: &str) -> ApiResult<GroupView> {
    let info = s.broker.topic_info(topic).await?;
    let now = Timestamp::now();
    TopicView::new(info, now)
        .groups
        .into_iter()
        .find(|g| g.name == group)
        .ok_or_else(|| group_not_found(topic, group))
}

fn group_not_found(topic: &str, group: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("group {group:?} of topic {topic:?} not found"),
    )
}

fn valid_group(group: &str) -> ApiResult<()> {
    relq::validate_name("group", group).map_err(|e| Problem::from(relq::Error::from(e)))
}

/// A topic's consumer groups.
#[utoipa::path(get, path = "/api/topics/{topic}/groups", tag = "groups",
    params(TopicPath),
    responses((status = 200, body = Vec<GroupView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_groups(
    State(s): St,
    Path(topic): Path<String>,
) -> ApiResult<Json<Vec<GroupView>>> {
    let info = s.broker.topic_info(&topic).await?;
    Ok(Json(TopicView::new(info, Timestamp::now()).groups))
}

/// A group to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateGroupRequest {
    /// Its name.
    #[schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    pub(crate) name: String,
    /// Where it starts: `latest` (default), `earliest` or a message id.
    #[schema(pattern = r"^(latest|earliest|[0-9]{1,20}-[0-9]{1,20})$")]
    pub(crate) start: Option<String>,
}

/// The result of creating a group.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupCreated {
    /// False when the group existed (it is unchanged).
    pub(crate) created: bool,
    /// The group now.
    pub(crate) group: GroupView,
}

/// Creates a consumer group at a start position before any consumer joins it (and the topic,
/// if needed). An existing group is left unchanged (`created: false`).
#[utoipa::path(post, path = "/api/topics/{topic}/groups", tag = "groups",
    params(TopicPath), request_body = CreateGroupRequest,
    responses((status = 200, body = GroupCreated), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create_group(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Body(req): Body<CreateGroupRequest>,
) -> ApiResult<Json<GroupCreated>> {
    writable_topic(&topic)?;
    valid_group(&req.name)?;
    let start_text = req.start.as_deref().unwrap_or("latest");
    let start = position("start", start_text)?;
    let params = audit::params([
        ("group", serde_json::json!(req.name)),
        ("start", serde_json::json!(start_text)),
    ]);
    let r = s
        .broker
        .create_group(&topic, &req.name, start)
        .await
        .map_err(Problem::from);
    let r = match r {
        Ok(created) => group_view(&s, &topic, &req.name)
            .await
            .map(|group| GroupCreated { created, group }),
        Err(e) => Err(e),
    };
    audited(
        &s,
        &caller,
        "group.create",
        &topic,
        params,
        r,
        |g| match g.created {
            true => "created".into(),
            false => "existed; unchanged".into(),
        },
    )
    .await
    .map(Json)
}

/// Where to move a group.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MoveGroupRequest {
    /// `latest`, `earliest` or a message id: the next new message the group reads is the
    /// first there.
    #[schema(pattern = r"^(latest|earliest|[0-9]{1,20}-[0-9]{1,20})$")]
    pub(crate) to: String,
}

/// A group before and after a move.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupMoved {
    /// Before.
    pub(crate) before: GroupView,
    /// After.
    pub(crate) after: GroupView,
}

/// Moves a group: forward skips a backlog; back delivers messages again (those it holds
/// pending, scheduled or stopped are not delivered twice). Running consumers go on from there.
#[utoipa::path(post, path = "/api/topics/{topic}/groups/{group}/move", tag = "groups",
    params(TopicGroupPath), request_body = MoveGroupRequest,
    responses((status = 200, body = GroupMoved), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn move_group(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((topic, group)): Path<(String, String)>,
    Body(req): Body<MoveGroupRequest>,
) -> ApiResult<Json<GroupMoved>> {
    writable_topic(&topic)?;
    valid_group(&group)?;
    let to = position("to", &req.to)?;
    let before = group_view(&s, &topic, &group).await?;
    let params = audit::params([
        ("group", serde_json::json!(group)),
        ("to", serde_json::json!(req.to)),
    ]);
    let r = match s.broker.move_group(&topic, &group, to).await {
        Ok(true) => group_view(&s, &topic, &group).await,
        Ok(false) => Err(group_not_found(&topic, &group)),
        Err(e) => Err(Problem::from(e)),
    };
    let from = before.cursor.clone();
    let r = r.map(|after| GroupMoved { before, after });
    audited(&s, &caller, "group.move", &topic, params, r, |_| {
        format!("moved from {from}")
    })
    .await
    .map(Json)
}

/// Confirmation of a group delete: the group's name typed again.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeleteGroupParams {
    /// Must equal the group's name.
    #[param(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    confirm: Option<String>,
}

/// The result of a group delete.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupDeleted {
    /// The group.
    pub(crate) group: String,
}

/// Deletes a group with its position and its pending, scheduled and stopped entries (the
/// messages stay for the other groups); its running consumers stop.
#[utoipa::path(delete, path = "/api/topics/{topic}/groups/{group}", tag = "groups",
    params(TopicGroupPath, DeleteGroupParams),
    responses((status = 200, body = GroupDeleted), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn delete_group(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((topic, group)): Path<(String, String)>,
    Query(p): Query<DeleteGroupParams>,
) -> ApiResult<Json<GroupDeleted>> {
    writable_topic(&topic)?;
    valid_group(&group)?;
    if p.confirm.as_deref() != Some(group.as_str()) {
        return Err(Problem::bad_request(format!(
            "deleting drops the position and the pending entries of group {group:?}: repeat its name as ?confirm={group}"
        )));
    }
    let r = match s.broker.delete_group(&topic, &group).await {
        Ok(true) => Ok(GroupDeleted {
            group: group.clone(),
        }),
        Ok(false) => Err(group_not_found(&topic, &group)),
        Err(e) => Err(Problem::from(e)),
    };
    let params = audit::params([("group", serde_json::json!(group))]);
    audited(&s, &caller, "group.delete", &topic, params, r, |_| {
        "deleted".into()
    })
    .await
    .map(Json)
}

// ---------------------------------------------------------------------------------------------
// Messages

/// A message to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    /// Its type.
    #[serde(rename = "type")]
    #[schema(min_length = 1, max_length = 256)]
    pub(crate) kind: String,
    /// The payload, as `payload_encoding` says.
    pub(crate) payload: String,
    /// `utf8` (default) or `hex`.
    #[serde(default)]
    pub(crate) payload_encoding: Encoding,
    /// Headers.
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
    /// Deliver no earlier than this from now (`"30s"`).
    pub(crate) delay: Option<String>,
    /// Time to live from now (`"10m"`): a consumer that takes the message later does not
    /// handle it (a dead letter with reason `expired`, or dropped).
    pub(crate) ttl: Option<String>,
    /// Store the payload compressed (kept as it is if that would not make it smaller);
    /// consumers and reads see it decompressed.
    pub(crate) compress: Option<CompressionName>,
    /// Publish at most once per key within the topic's deduplication window (two minutes
    /// unless configured): a repeat stores nothing and answers the first message's id.
    #[schema(min_length = 1, max_length = 512)]
    pub(crate) idempotency_key: Option<String>,
    /// Order by this key in every group: the key's messages are handled one at a time, in
    /// publish order.
    #[schema(min_length = 1, max_length = 512)]
    pub(crate) ordering_key: Option<String>,
}

/// A compression algorithm.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CompressionName {
    /// LZ4 (frame format).
    Lz4,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl From<CompressionName> for relq::Compression {
    fn from(c: CompressionName) -> relq::Compression {
        match c {
            CompressionName::Lz4 => relq::Compression::Lz4,
            CompressionName::Gzip => relq::Compression::Gzip,
            CompressionName::Zstd => relq::Compression::Zstd,
        }
    }
}

/// The id a publish got.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Published {
    /// The new message's id.
    pub(crate) id: String,
}

/// Publishes one message.
#[utoipa::path(post, path = "/api/topics/{topic}/messages", tag = "messages",
    params(TopicPath), request_body = PublishRequest,
    responses((status = 200, body = Published), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn publish(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Body(req): Body<PublishRequest>,
) -> ApiResult<Json<Published>> {
    writable_topic(&topic)?;
    let payload =
        decode_payload(&req.payload, req.payload_encoding).map_err(Problem::bad_request)?;
    let mut m = NewMessage::new(req.kind.clone(), payload);
    for (k, v) in &req.headers {
        m = m.header(k.clone(), v.clone());
    }
    if let Some(d) = &req.delay {
        m = m.delay(parse_duration("delay", d)?);
    }
    if let Some(t) = &req.ttl {
        m = m.ttl(parse_duration("ttl", t)?);
    }
    if let Some(c) = req.compress {
        m = m.compress(c.into());
    }
    if let Some(k) = &req.idempotency_key {
        m = m.idempotency_key(k.clone());
    }
    if let Some(k) = &req.ordering_key {
        m = m.ordering_key(k.clone());
    }
    let params = audit::params([
        ("type", serde_json::json!(req.kind)),
        ("bytes", serde_json::json!(req.payload.len())),
        ("delay", serde_json::json!(req.delay)),
        ("ttl", serde_json::json!(req.ttl)),
        (
            "compress",
            serde_json::json!(req.compress.map(|c| relq::Compression::from(c).as_str())),
        ),
        ("idempotency_key", serde_json::json!(req.idempotency_key)),
        ("ordering_key", serde_json::json!(req.ordering_key)),
    ]);
    let r = s.broker.publish(&topic, m).await.map_err(Problem::from);
    let r = r.map(|id| Published { id: id.to_string() });
    audited(&s, &caller, "publish", &topic, params, r, |p| {
        format!("published {}", p.id)
    })
    .await
    .map(Json)
}

/// Which page of messages.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct BrowseParams {
    /// Only ids greater than this.
    #[param(pattern = r"^[0-9]{1,20}-[0-9]{1,20}$")]
    after: Option<String>,
    /// Only ids smaller than this.
    #[param(pattern = r"^[0-9]{1,20}-[0-9]{1,20}$")]
    before: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `oldest` (default) or `newest` first.
    #[param(pattern = r"^(oldest|newest)$")]
    order: Option<String>,
    /// Only messages of this type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
    /// Only messages with this header: `name` (present) or `name=value`.
    header: Option<String>,
    /// Only messages published at or after this time (RFC 3339, UTC).
    #[param(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    since: Option<String>,
    /// Only messages published before this time (RFC 3339, UTC).
    #[param(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    until: Option<String>,
}

/// How many stored messages one filtered browse request looks at, at most; `next` continues.
const BROWSE_SCAN: usize = 10_000;

/// A page of the topic's stored messages, read without a group (nothing changes); filtered by
/// type, header and publish time. A filtered request looks at up to 10,000 messages: a page
/// with fewer items and a `next` means continue from there.
#[utoipa::path(get, path = "/api/topics/{topic}/messages", tag = "messages",
    params(TopicPath, BrowseParams),
    responses((status = 200, body = Page<MessageView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn browse(
    State(s): St,
    Path(topic): Path<String>,
    Query(p): Query<BrowseParams>,
) -> ApiResult<Json<Page<MessageView>>> {
    let order = match p.order.as_deref() {
        None | Some("oldest") => Browse::oldest(),
        Some("newest") => Browse::newest(),
        Some(o) => {
            return Err(Problem::bad_request(format!(
                "order = {o:?}: expected oldest or newest"
            )))
        }
    };
    let limit = page_size(p.limit)?;
    let mut after = p.after.as_deref().map(id).transpose()?;
    let mut before = p.before.as_deref().map(id).transpose()?;
    // A time range is a range of ids (an id starts with its publish time in milliseconds).
    if let Some(t) = &p.since {
        if let Some(ms) = parse_time("since", t)?.0.checked_sub(1) {
            let below = MessageId::new(ms, u64::MAX);
            after = Some(after.map_or(below, |a| a.max(below)));
        }
    }
    if let Some(t) = &p.until {
        let to = MessageId::new(parse_time("until", t)?.0, 0);
        before = Some(before.map_or(to, |b| b.min(to)));
    }
    let header = p.header.as_deref().map(|h| match h.split_once('=') {
        Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
        None => (h.to_owned(), None),
    });
    let keep = |m: &relq::Message| {
        p.kind.as_deref().is_none_or(|k| m.kind == k)
            && header.as_ref().is_none_or(|(k, v)| match v {
                Some(v) => m.header(k) == Some(v.as_str()),
                None => m.header(k).is_some(),
            })
    };
    let filtered = p.kind.is_some() || header.is_some();
    let mut items = Vec::new();
    let mut scanned = 0;
    let mut last = None;
    let more = loop {
        let mut q = order.limit(if filtered { Browse::MAX_LIMIT } else { limit });
        if let Some(a) = after {
            q = q.after(a);
        }
        if let Some(b) = before {
            q = q.before(b);
        }
        let page = s.broker.browse(&topic, &q).await?;
        let full = page.len() == q.page_size();
        let mut cut = false;
        for (i, m) in page.iter().enumerate() {
            scanned += 1;
            last = Some(m.id);
            if keep(m) {
                items.push(MessageView::from(m));
                if items.len() == limit {
                    cut = i + 1 < page.len();
                    break;
                }
            }
        }
        // The page was full, or enough matched before its end: there may be more.
        if !filtered || !full || items.len() == limit || scanned >= BROWSE_SCAN {
            break full || cut;
        }
        match (q.newest_first, last) {
            (true, Some(l)) => before = Some(l),
            (false, Some(l)) => after = Some(l),
            (_, None) => break false,
        }
    };
    let next = more.then(|| last.map(|l| l.to_string())).flatten();
    Ok(Json(Page { items, next }))
}

/// One stored message.
#[utoipa::path(get, path = "/api/topics/{topic}/messages/{id}", tag = "messages",
    params(TopicIdPath),
    responses((status = 200, body = MessageView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_message(
    State(s): St,
    Path((topic, mid)): Path<(String, String)>,
) -> ApiResult<Json<MessageView>> {
    let m = s.broker.message(&topic, id(&mid)?).await?;
    Ok(Json(MessageView::from(&m)))
}

/// Where a message stands in one group.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PlacementView {
    /// The group.
    pub(crate) group: String,
    /// `unread`, `pending`, `scheduled`, `stopped`, `blocked` (waiting behind an earlier
    /// message of its ordering key) or `done`.
    pub(crate) state: String,
    /// The consumer holding it (pending).
    pub(crate) consumer: Option<String>,
    /// Deliveries so far (pending, scheduled).
    pub(crate) deliveries: Option<u32>,
    /// When it is delivered again (scheduled; RFC 3339).
    pub(crate) due: Option<String>,
}

/// Where the message stands in each group of the topic.
#[utoipa::path(get, path = "/api/topics/{topic}/messages/{id}/groups", tag = "messages",
    params(TopicIdPath),
    responses((status = 200, body = Vec<PlacementView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn locate(
    State(s): St,
    Path((topic, mid)): Path<(String, String)>,
) -> ApiResult<Json<Vec<PlacementView>>> {
    use relq::Placement as P;
    let placements = s.broker.locate(&topic, id(&mid)?).await?;
    Ok(Json(
        placements
            .into_iter()
            .map(|p| {
                let (state, consumer, deliveries, due) = match p.placement {
                    P::Unread => ("unread", None, None, None),
                    P::Pending {
                        consumer,
                        deliveries,
                    } => ("pending", Some(consumer), Some(deliveries), None),
                    P::Scheduled { due, deliveries } => {
                        ("scheduled", None, Some(deliveries), Some(due.to_string()))
                    }
                    P::Stopped => ("stopped", None, None, None),
                    P::Blocked => ("blocked", None, None, None),
                    P::Done => ("done", None, None, None),
                    _ => ("unknown", None, None, None),
                };
                PlacementView {
                    group: p.group,
                    state: state.into(),
                    consumer,
                    deliveries,
                    due,
                }
            })
            .collect(),
    ))
}

/// The result of a stop or resume.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StopView {
    /// The message.
    pub(crate) id: String,
    /// Stopped now (after a stop) or resumed now (false: it was not stopped).
    pub(crate) changed: bool,
}

/// Stops a message: no group delivers it again until it is resumed.
#[utoipa::path(post, path = "/api/topics/{topic}/messages/{id}/stop", tag = "messages",
    params(TopicIdPath),
    responses((status = 200, body = StopView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn stop(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((topic, mid)): Path<(String, String)>,
) -> ApiResult<Json<StopView>> {
    writable_topic(&topic)?;
    let m = id(&mid)?;
    let r = s
        .broker
        .stop_message(&topic, m)
        .await
        .map_err(Problem::from);
    let r = r.map(|()| StopView {
        id: m.to_string(),
        changed: true,
    });
    audited(
        &s,
        &caller,
        "stop",
        &topic,
        audit::params([("id", serde_json::json!(mid))]),
        r,
        |_| "stopped".into(),
    )
    .await
    .map(Json)
}

/// Resumes a stopped message.
#[utoipa::path(post, path = "/api/topics/{topic}/messages/{id}/resume", tag = "messages",
    params(TopicIdPath),
    responses((status = 200, body = StopView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn resume(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((topic, mid)): Path<(String, String)>,
) -> ApiResult<Json<StopView>> {
    writable_topic(&topic)?;
    let m = id(&mid)?;
    let r = s
        .broker
        .resume_message(&topic, m)
        .await
        .map_err(Problem::from);
    let r = r.map(|changed| StopView {
        id: m.to_string(),
        changed,
    });
    audited(
        &s,
        &caller,
        "resume",
        &topic,
        audit::params([("id", serde_json::json!(mid))]),
        r,
        |v| {
            if v.changed {
                "resumed".into()
            } else {
                "was not stopped".into()
            }
        },
    )
    .await
    .map(Json)
}

// ---------------------------------------------------------------------------------------------
// Dead letters

/// Which dead letters.
#[derive(Debug, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadLetterFilter {
    /// Only this message type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub(crate) kind: Option<String>,
    /// Only this reason (`retryable`, `permanent`, `panic`, `timeout`, `no_handler`,
    /// `delivery_limit`, `expired`).
    #[param(pattern = r"^(retryable|permanent|panic|timeout|no_handler|delivery_limit|expired)$")]
    #[schema(pattern = r"^(retryable|permanent|panic|timeout|no_handler|delivery_limit|expired)$")]
    pub(crate) reason: Option<String>,
    /// Only this error category.
    pub(crate) category: Option<String>,
    /// Only dead letters of this group.
    pub(crate) group: Option<String>,
    /// Only dead letters of this handler (a message type, or `fallback`).
    pub(crate) handler: Option<String>,
    /// Only those whose last failure is at or after this time (RFC 3339, UTC).
    #[param(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    #[schema(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    pub(crate) since: Option<String>,
    /// Only those whose last failure is before this time (RFC 3339, UTC).
    #[param(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    #[schema(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    pub(crate) until: Option<String>,
}

impl DeadLetterFilter {
    fn is_empty(&self) -> bool {
        self.kind.is_none()
            && self.reason.is_none()
            && self.category.is_none()
            && self.group.is_none()
            && self.handler.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    fn query(&self) -> ApiResult<DeadLetterQuery> {
        let mut q = DeadLetterQuery::all();
        if let Some(k) = &self.kind {
            q = q.kind(k);
        }
        if let Some(r) = &self.reason {
            q = q
                .reason(FailureKind::from_str(r).map_err(|e| Problem::bad_request(e.to_string()))?);
        }
        if let Some(c) = &self.category {
            q = q.category(c);
        }
        if let Some(g) = &self.group {
            q = q.group(g);
        }
        if let Some(h) = &self.handler {
            q = q.handler(h);
        }
        let since = self
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?;
        let until = self
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?;
        if since.is_some() || until.is_some() {
            q = q.between(since, until);
        }
        Ok(q)
    }
}

/// Which page of dead letters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeadLetterPage {
    /// Continue after this dead-letter id (the previous page's `next`).
    #[param(pattern = r"^[0-9]{1,20}-[0-9]{1,20}$")]
    after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Only this message type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
    /// Only this reason.
    #[param(pattern = r"^(retryable|permanent|panic|timeout|no_handler|delivery_limit|expired)$")]
    reason: Option<String>,
    /// Only this error category.
    category: Option<String>,
    /// Only dead letters of this group.
    group: Option<String>,
    /// Only dead letters of this handler (a message type, or `fallback`).
    handler: Option<String>,
    /// Only those whose last failure is at or after this time (RFC 3339, UTC).
    #[param(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    since: Option<String>,
    /// Only those whose last failure is before this time (RFC 3339, UTC).
    #[param(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    until: Option<String>,
}

impl DeadLetterPage {
    fn filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            kind: self.kind.clone(),
            reason: self.reason.clone(),
            category: self.category.clone(),
            group: self.group.clone(),
            handler: self.handler.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
        }
    }
}

/// A page of dead letters, oldest first, filtered.
#[utoipa::path(get, path = "/api/topics/{topic}/dead-letters", tag = "dead letters",
    params(TopicPath, DeadLetterPage),
    responses((status = 200, body = Page<DeadLetterView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_dead_letters(
    State(s): St,
    Path(topic): Path<String>,
    Query(p): Query<DeadLetterPage>,
) -> ApiResult<Json<Page<DeadLetterView>>> {
    let mut q = p.filter().query()?.limit(page_size(p.limit)?);
    if let Some(a) = &p.after {
        q = q.after(id(a)?);
    }
    let dls = s.broker.dead_letters(&topic);
    let page = dls.list(&q).await?;
    let next = (page.len() == q.page_size())
        .then(|| page.last().map(|d| d.id.to_string()))
        .flatten();
    Ok(Json(Page {
        items: page
            .iter()
            .map(|d| DeadLetterView::new(d, dls.suggestion(d)))
            .collect(),
        next,
    }))
}

/// The matching dead letters grouped by error fingerprint, most frequent first, with the
/// suggestion for each group's most common category.
#[utoipa::path(get, path = "/api/topics/{topic}/dead-letters/groups", tag = "dead letters",
    params(TopicPath, DeadLetterFilter),
    responses((status = 200, body = Vec<FailureGroupView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn failure_groups(
    State(s): St,
    Path(topic): Path<String>,
    Query(f): Query<DeadLetterFilter>,
) -> ApiResult<Json<Vec<FailureGroupView>>> {
    let groups = s
        .broker
        .dead_letters(&topic)
        .failure_groups(&f.query()?)
        .await?;
    Ok(Json(
        groups.into_iter().map(FailureGroupView::from).collect(),
    ))
}

/// Dead-letter counts.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetterStatsView {
    /// All dead letters of the topic.
    pub(crate) total: u64,
    /// By reason.
    pub(crate) by_reason: BTreeMap<String, u64>,
    /// By message type.
    pub(crate) by_type: BTreeMap<String, u64>,
    /// By error category (`none` when the handler set none).
    pub(crate) by_category: BTreeMap<String, u64>,
    /// The oldest last failure.
    pub(crate) oldest: Option<String>,
}

/// Counts by reason, type and category.
#[utoipa::path(get, path = "/api/topics/{topic}/dead-letters/stats", tag = "dead letters",
    params(TopicPath),
    responses((status = 200, body = DeadLetterStatsView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn dead_letter_stats(
    State(s): St,
    Path(topic): Path<String>,
) -> ApiResult<Json<DeadLetterStatsView>> {
    let st = s.broker.dead_letters(&topic).stats().await?;
    Ok(Json(DeadLetterStatsView {
        total: st.total,
        by_reason: st.by_reason,
        by_type: st.by_kind,
        by_category: st.by_category,
        oldest: st.oldest.map(|t| t.to_string()),
    }))
}

/// One dead letter with its suggestion.
#[utoipa::path(get, path = "/api/topics/{topic}/dead-letters/{id}", tag = "dead letters",
    params(TopicIdPath),
    responses((status = 200, body = DeadLetterView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_dead_letter(
    State(s): St,
    Path((topic, did)): Path<(String, String)>,
) -> ApiResult<Json<DeadLetterView>> {
    let dls = s.broker.dead_letters(&topic);
    let d = dls.get(id(&did)?).await?;
    Ok(Json(DeadLetterView::new(&d, dls.suggestion(&d))))
}

/// A corrected payload for one dead letter's replay.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EditReplayRequest {
    /// The new payload, as `payload_encoding` says.
    pub(crate) payload: String,
    /// `utf8` (default) or `hex`.
    #[serde(default)]
    pub(crate) payload_encoding: Encoding,
}

/// Replays one dead letter with a corrected payload (its type and headers kept, the replay
/// headers and `relq-edited: true` added), then deletes it. The audit log records the edit.
#[utoipa::path(post, path = "/api/topics/{topic}/dead-letters/{id}/replay", tag = "dead letters",
    params(TopicIdPath), request_body = EditReplayRequest,
    responses((status = 200, body = Published), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn replay_edited(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((topic, did)): Path<(String, String)>,
    Body(req): Body<EditReplayRequest>,
) -> ApiResult<Json<Published>> {
    writable_topic(&topic)?;
    let dl_id = id(&did)?;
    let payload =
        decode_payload(&req.payload, req.payload_encoding).map_err(Problem::bad_request)?;
    let before = s.broker.dead_letters(&topic).get(dl_id).await?;
    let params = audit::params([
        ("id", serde_json::json!(did)),
        ("edited", serde_json::json!(true)),
        (
            "bytes_before",
            serde_json::json!(before.message.payload.len()),
        ),
        ("bytes_after", serde_json::json!(payload.len())),
    ]);
    let r = s
        .broker
        .replay_edited(&topic, dl_id, payload)
        .await
        .map_err(Problem::from)
        .map(|id| Published { id: id.to_string() });
    audited(
        &s,
        &caller,
        "dead_letter.replay_edited",
        &topic,
        params,
        r,
        |p| format!("replayed with an edited payload as {}", p.id),
    )
    .await
    .map(Json)
}

/// What to replay: ids, or every dead letter matching a filter (`all` for no filter).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayRequest {
    /// These dead letters.
    #[serde(default)]
    #[schema(max_items = 10000)]
    pub(crate) ids: Vec<String>,
    /// Or every dead letter matching this filter.
    pub(crate) filter: Option<DeadLetterFilter>,
    /// Or every dead letter of the topic.
    #[serde(default)]
    pub(crate) all: bool,
    /// Only show what would be replayed.
    #[serde(default)]
    pub(crate) dry_run: bool,
    /// At most this many per second.
    #[schema(minimum = 1)]
    pub(crate) rate: Option<u32>,
    /// Run as a background job: the answer (202) is the job, followed at `/api/jobs/{id}`.
    /// Needed when a rate makes the replay take longer than 5 seconds.
    #[serde(default)]
    pub(crate) background: bool,
}

/// One replayed dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReplayedView {
    /// The dead letter.
    pub(crate) dead_letter: String,
    /// The new message.
    pub(crate) message: String,
}

/// The result of a replay (or of its dry run).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReplayResult {
    /// Nothing changed.
    pub(crate) dry_run: bool,
    /// How many dead letters were chosen.
    pub(crate) matched: u64,
    /// The chosen dead-letter ids (a dry run).
    pub(crate) would_replay: Vec<String>,
    /// What was replayed.
    pub(crate) replayed: Vec<ReplayedView>,
}

/// The most dead-letter ids one replay request names.
const MAX_REPLAY_IDS: usize = 10_000;

/// How long a replay may run inside one request; longer ones run as a background job.
const MAX_INLINE_SECONDS: u64 = 5;

/// Replays `chosen` in batches at most `rate` per second, calling `each` with every batch done;
/// stops between batches when `job` is cancelled. Returns the error that stopped it, if any.
async fn run_replay(
    dls: &relq::DeadLetters,
    chosen: &[MessageId],
    rate: Option<u32>,
    job: Option<&crate::jobs::Job>,
    mut each: impl FnMut(Vec<(MessageId, MessageId)>),
) -> Option<relq::Error> {
    // Batches of at most a tenth of a second's worth at the rate: the rate holds over any
    // second, and a cancel takes effect within one batch.
    let chunk = rate.map_or(100, |r| (r as usize / 10).clamp(1, 100));
    let started = tokio::time::Instant::now();
    let mut done = 0usize;
    for batch in chosen.chunks(chunk) {
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64(done as f64 / f64::from(r));
            match job {
                Some(j) => tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = j.cancelled() => return None,
                },
                None => tokio::time::sleep_until(due).await,
            }
        }
        if job.is_some_and(|j| j.is_cancelled()) {
            return None;
        }
        match dls.replay(batch).await {
            Ok(r) => {
                done += batch.len();
                each(r);
            }
            Err(e) => return Some(e),
        }
    }
    None
}

/// Replays dead letters: each becomes a new message for the group that gave up on it.
#[utoipa::path(post, path = "/api/topics/{topic}/dead-letters/replay", tag = "dead letters",
    params(TopicPath), request_body = ReplayRequest,
    responses((status = 200, body = ReplayResult), (status = 202, description = "Started as a background job", body = JobView),
        (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn replay(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Body(req): Body<ReplayRequest>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    writable_topic(&topic)?;
    let filter = req.filter.as_ref().filter(|f| !f.is_empty());
    let ways =
        usize::from(!req.ids.is_empty()) + usize::from(filter.is_some()) + usize::from(req.all);
    if ways != 1 {
        return Err(Problem::bad_request(
            "give exactly one of: ids, a non-empty filter, or all = true",
        ));
    }
    if req.rate == Some(0) {
        return Err(Problem::bad_request("rate must be at least 1 per second"));
    }
    let dls = s.broker.dead_letters(&topic);
    let chosen: Vec<MessageId> = if req.ids.is_empty() {
        let q = match filter {
            Some(f) => f.query()?,
            None => DeadLetterQuery::all(),
        };
        let mut ids = Vec::new();
        let mut q = q.limit(500);
        loop {
            let page = dls.list(&q).await?;
            ids.extend(page.iter().map(|d| d.id));
            match page.last() {
                Some(last) if page.len() == 500 => q = q.after(last.id),
                _ => break,
            }
        }
        ids
    } else {
        if req.ids.len() > MAX_REPLAY_IDS {
            return Err(Problem::bad_request(format!(
                "at most {MAX_REPLAY_IDS} ids per request; use a filter for more"
            )));
        }
        let mut ids = req
            .ids
            .iter()
            .map(|i| id(i))
            .collect::<ApiResult<Vec<_>>>()?;
        let mut seen = std::collections::HashSet::new();
        ids.retain(|i| seen.insert(*i));
        for i in &ids {
            dls.get(*i).await?;
        }
        ids
    };
    if req.dry_run {
        return Ok(Json(ReplayResult {
            dry_run: true,
            matched: chosen.len() as u64,
            would_replay: chosen.iter().map(ToString::to_string).collect(),
            replayed: Vec::new(),
        })
        .into_response());
    }
    if let (Some(r), false) = (req.rate, req.background) {
        if chosen.len() as u64 > u64::from(r) * MAX_INLINE_SECONDS {
            return Err(Problem::bad_request(format!(
                "{} dead letters at {r}/s take longer than {MAX_INLINE_SECONDS}s: pass \"background\": true and follow the job at /api/jobs/{{id}}",
                chosen.len()
            )));
        }
    }
    let params = audit::params([
        ("ids", serde_json::json!(req.ids)),
        (
            "filter",
            serde_json::json!(filter.map(|f| serde_json::json!({
            "type": f.kind, "reason": f.reason, "category": f.category, "group": f.group,
            "handler": f.handler, "since": f.since, "until": f.until}))),
        ),
        ("all", serde_json::json!(req.all)),
        ("rate", serde_json::json!(req.rate)),
        ("background", serde_json::json!(req.background)),
        ("matched", serde_json::json!(chosen.len())),
    ]);
    if req.background {
        let job = s.jobs.start(
            "replay",
            &topic,
            &caller.name,
            chosen.len() as u64,
            req.rate,
        );
        let view = job.view();
        let shared = s.clone();
        tokio::spawn(async move {
            let failure = run_replay(&dls, &chosen, req.rate, Some(&job), |r| {
                job.progress(r.len() as u64);
            })
            .await;
            job.end(failure.as_ref().map(ToString::to_string));
            let v = job.view();
            let mut params = params;
            params["job"] = serde_json::json!(v.id);
            let r: ApiResult<JobView> = match failure {
                Some(e) => Err(Problem::from(e)),
                None => Ok(v),
            };
            let _ = audited(&shared, &caller, "replay", &topic, params, r, |v| {
                format!(
                    "job {} {}: replayed {} of {}",
                    v.id, v.state, v.done, v.total
                )
            })
            .await;
        });
        return Ok((StatusCode::ACCEPTED, Json(view)).into_response());
    }
    let mut replayed = Vec::new();
    let failure = run_replay(&dls, &chosen, req.rate, None, |r| {
        replayed.extend(r.into_iter().map(|(d, m)| ReplayedView {
            dead_letter: d.to_string(),
            message: m.to_string(),
        }));
    })
    .await;
    let n = replayed.len();
    let r = match failure {
        Some(e) => {
            let mut p = Problem::from(e);
            p.detail = format!(
                "{} (replayed {n} of {} before the failure)",
                p.detail,
                chosen.len()
            );
            Err(p)
        }
        None => Ok(ReplayResult {
            dry_run: false,
            matched: chosen.len() as u64,
            would_replay: Vec::new(),
            replayed,
        }),
    };
    audited(&s, &caller, "replay", &topic, params, r, |r| {
        format!("replayed {} of {}", r.replayed.len(), r.matched)
    })
    .await
    .map(|r| Json(r).into_response())
}

// ---------------------------------------------------------------------------------------------
// Jobs

/// The id of a job (documentation of the path only).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct JobPath {
    /// The job's id.
    #[param(pattern = r"^[0-9]{1,19}$")]
    id: String,
}

fn job_id(text: &str) -> ApiResult<u64> {
    text.parse::<u64>()
        .map_err(|_| Problem::bad_request(format!("invalid job id {text:?}: expected a number")))
}

/// Background jobs (the last 100 finished, and every running one), newest first.
#[utoipa::path(get, path = "/api/jobs", tag = "jobs",
    responses((status = 200, body = Vec<JobView>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_jobs(State(s): St) -> Json<Vec<JobView>> {
    Json(s.jobs.list())
}

/// One job's progress.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_job(State(s): St, Path(jid): Path<String>) -> ApiResult<Json<JobView>> {
    let job = s.jobs.get(job_id(&jid)?).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("job {jid} not found"),
        )
    })?;
    Ok(Json(job.view()))
}

/// Cancels a running job after its current batch (what it did stays done).
#[utoipa::path(delete, path = "/api/jobs/{id}", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn cancel_job(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(jid): Path<String>,
) -> ApiResult<Json<JobView>> {
    let job = s.jobs.get(job_id(&jid)?).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("job {jid} not found"),
        )
    })?;
    s.jobs.cancel(&job);
    let v = job.view();
    let r: ApiResult<JobView> = Ok(v);
    let topic = job.view().topic;
    audited(
        &s,
        &caller,
        "cancel",
        &topic,
        audit::params([("job", serde_json::json!(jid))]),
        r,
        |v| format!("asked job {} to stop at {} of {}", v.id, v.done, v.total),
    )
    .await
    .map(Json)
}

/// Dead letters to delete.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteRequest {
    /// Their ids.
    #[schema(min_items = 1, max_items = 1000)]
    pub(crate) ids: Vec<String>,
}

/// How many were removed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Removed {
    /// The count.
    pub(crate) removed: u64,
}

/// Deletes dead letters by id.
#[utoipa::path(post, path = "/api/topics/{topic}/dead-letters/delete", tag = "dead letters",
    params(TopicPath), request_body = DeleteRequest,
    responses((status = 200, body = Removed), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn delete_dead_letters(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Body(req): Body<DeleteRequest>,
) -> ApiResult<Json<Removed>> {
    writable_topic(&topic)?;
    if req.ids.is_empty() || req.ids.len() > MAX_PAGE {
        return Err(Problem::bad_request(format!("give 1 to {MAX_PAGE} ids")));
    }
    let ids = req
        .ids
        .iter()
        .map(|i| id(i))
        .collect::<ApiResult<Vec<_>>>()?;
    let r = s
        .broker
        .dead_letters(&topic)
        .delete(&ids)
        .await
        .map_err(Problem::from);
    let r = r.map(|removed| Removed { removed });
    audited(
        &s,
        &caller,
        "delete",
        &topic,
        audit::params([("ids", serde_json::json!(req.ids))]),
        r,
        |r| format!("deleted {}", r.removed),
    )
    .await
    .map(Json)
}

/// Which dead letters to purge: those that failed last more than `older_than` ago, or before
/// `before` (the cutoff a dry run answered, so the purge removes exactly what it previewed).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurgeRequest {
    /// Those whose last failure is older than this (`"7d"`; `"0s"` for all).
    pub(crate) older_than: Option<String>,
    /// Those whose last failure is before this time (RFC 3339, UTC).
    #[schema(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$")]
    pub(crate) before: Option<String>,
    /// Only count what would be deleted; delete nothing (not audited).
    #[serde(default)]
    pub(crate) dry_run: bool,
}

/// What a purge deleted, or (dry run) would delete.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PurgeView {
    /// Dead letters deleted (or, in a dry run, that would be).
    pub(crate) removed: u64,
    /// The cutoff used: pass it as `before` to purge exactly what a dry run counted.
    pub(crate) before: String,
    /// True for a dry run: nothing changed.
    pub(crate) dry_run: bool,
}

/// Deletes dead letters that failed last before a cutoff; with `dry_run`, only counts them.
#[utoipa::path(post, path = "/api/topics/{topic}/dead-letters/purge", tag = "dead letters",
    params(TopicPath), request_body = PurgeRequest,
    responses((status = 200, body = PurgeView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn purge_dead_letters(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Body(req): Body<PurgeRequest>,
) -> ApiResult<Json<PurgeView>> {
    writable_topic(&topic)?;
    let before = match (&req.older_than, &req.before) {
        (Some(age), None) => relq::Timestamp::now().minus(parse_duration("older_than", age)?),
        (None, Some(t)) => parse_time("before", t)?,
        _ => {
            return Err(Problem::bad_request(
                "give exactly one of: older_than, before",
            ))
        }
    };
    let dls = s.broker.dead_letters(&topic);
    if req.dry_run {
        let removed = dls
            .count(&DeadLetterQuery::all().between(None, Some(before)))
            .await?;
        return Ok(Json(PurgeView {
            removed,
            before: before.to_string(),
            dry_run: true,
        }));
    }
    let r = dls.purge_before(before).await.map_err(Problem::from);
    let r = r.map(|removed| PurgeView {
        removed,
        before: before.to_string(),
        dry_run: false,
    });
    let params = audit::params([
        ("older_than", serde_json::json!(req.older_than)),
        ("before", serde_json::json!(before.to_string())),
    ]);
    audited(&s, &caller, "purge", &topic, params, r, |r| {
        format!("purged {}", r.removed)
    })
    .await
    .map(Json)
}

// ---------------------------------------------------------------------------------------------
// Audit

/// Which page of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditParams {
    /// Entries before this id (the previous page's `next`).
    #[param(pattern = r"^[0-9]{1,20}-[0-9]{1,20}$")]
    before: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/api/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = Page<AuditEntry>), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn audit_log(
    State(s): St,
    Query(p): Query<AuditParams>,
) -> ApiResult<Json<Page<AuditEntry>>> {
    let before = p.before.as_deref().map(id).transpose()?;
    let (items, next) = audit::list(&s.broker, before, page_size(p.limit)?).await?;
    Ok(Json(Page {
        items,
        next: next.map(|n| n.to_string()),
    }))
}

/// Who the caller is: the token's name and role (the console hides what the role may not do).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WhoAmI {
    /// The token's name (`anonymous` without tokens).
    pub(crate) name: String,
    /// `read` or `admin`.
    pub(crate) role: String,
    /// Whether the server checks tokens.
    pub(crate) authenticated: bool,
}

/// The caller's name and role.
#[utoipa::path(get, path = "/api/whoami", tag = "audit",
    responses((status = 200, body = WhoAmI), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn whoami(State(s): St, Extension(caller): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        role: match caller.role {
            relq::TokenRole::Admin => "admin".into(),
            _ => "read".into(),
        },
        name: caller.name,
        authenticated: !s.tokens.is_empty(),
    })
}

// ---------------------------------------------------------------------------------------------
// Latency (from Prometheus)

/// Which stretch of time.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LatencyWindow {
    /// Minutes back from now, 1 to 1440 (default 15).
    #[param(minimum = 1, maximum = 1440)]
    minutes: Option<u64>,
}

/// One topic's latency over time.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LatencySeries {
    /// The topic.
    pub(crate) topic: String,
    /// `[unix milliseconds, seconds]` pairs; seconds is null where nothing was handled.
    #[schema(value_type = Vec<Vec<Option<f64>>>)]
    pub(crate) points: Vec<(u64, Option<f64>)>,
}

/// The p99 publish-to-handled latency per topic.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LatencyView {
    /// Whether `server.prometheus_url` is set (without it there is no latency to show).
    pub(crate) configured: bool,
    /// The Prometheus asked.
    pub(crate) source: Option<String>,
    /// The PromQL asked (paste it into Grafana or Prometheus for more).
    pub(crate) query: String,
    /// The quantile.
    pub(crate) quantile: f64,
    /// Seconds between points.
    pub(crate) step_seconds: u64,
    /// Per topic, by name.
    pub(crate) series: Vec<LatencySeries>,
}

/// The p99 publish-to-handled latency per topic over the last minutes, from the Prometheus
/// that scrapes the consumers (`server.prometheus_url`); `configured: false` without one.
#[utoipa::path(get, path = "/api/latency", tag = "topics", params(LatencyWindow),
    responses((status = 200, body = LatencyView), (status = "default", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn latency(
    State(s): St,
    Query(w): Query<LatencyWindow>,
) -> ApiResult<Json<LatencyView>> {
    let minutes = w.minutes.unwrap_or(15);
    if !(1..=1440).contains(&minutes) {
        return Err(Problem::bad_request(format!(
            "minutes = {minutes}: give 1 to 1440"
        )));
    }
    // About 240 points whatever the window, and never closer than Prometheus' 1 s.
    let step = (minutes * 60 / 240).max(1);
    let mut view = LatencyView {
        configured: s.prometheus.is_some(),
        source: s.prometheus.as_ref().map(|p| p.url().to_owned()),
        query: crate::latency::query(crate::latency::window(step)),
        quantile: crate::latency::QUANTILE,
        step_seconds: step,
        series: Vec::new(),
    };
    let Some(prom) = &s.prometheus else {
        return Ok(Json(view));
    };
    let end = relq::Timestamp::now().0 / 1000;
    let series = prom
        .latency(end.saturating_sub(minutes * 60), end, step)
        .await
        .map_err(|e| {
            Problem::new(
                StatusCode::BAD_GATEWAY,
                "prometheus",
                format!("Prometheus at {}: {e}", prom.url()),
            )
        })?;
    view.series = series
        .into_iter()
        .map(|(topic, points)| LatencySeries { topic, points })
        .collect();
    Ok(Json(view))
}
