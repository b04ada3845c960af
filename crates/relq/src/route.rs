//! Routes (seed 004's `TopicRouter`): every message published on topics matching a pattern is
//! forwarded into other topics, durably and at least once.
//!
//! A route is a pattern consumer in a group of its own (`route.<name>`) whose only handler
//! publishes the message to each target and succeeds once every target stored it, so the source
//! message is acknowledged only after that: a crash or a failed publish leaves it pending or
//! retried, and it is forwarded again (a target can then hold it twice, as with any
//! at-least-once delivery; `relq-routed-from` tells the copies apart).
//!
//! The forwarded message keeps the type, the payload (compressed again by the target topic's
//! setting, if any), the headers, its time to live, content type and schema version; replay
//! headers of the source stay behind (they name the source's groups). It gains
//! `relq-routed-from: <topic>/<id>` and a hop count; a message that has passed through 8 routes
//! is refused (a loop of routes) as a permanent failure, so it becomes a dead letter of the
//! route's group instead of circling.

use std::sync::Arc;

use relq_core::{
    validate_name, ConfigError, Error, Message, Outgoing, Result, HEADER_ORIGINAL_ID,
    HEADER_REPLAY_GROUP, HEADER_REPLAY_OF, HEADER_ROUTED_FROM, HEADER_ROUTE_HOPS,
};

use crate::broker::Broker;
use crate::consumer::ConsumerBuilder;
use crate::handler::HandlerError;
use crate::pattern::TopicPattern;

/// Routes a message may pass through.
pub(crate) const MAX_ROUTE_HOPS: u32 = 8;

/// The group of route `name`.
pub(crate) fn route_group(name: &str) -> String {
    format!("route.{name}")
}

/// The consumer of route `name`: see [`Broker::route`].
pub(crate) fn route(
    broker: &Broker,
    name: &str,
    from: &str,
    to: &[&str],
) -> Result<ConsumerBuilder> {
    let targets: Arc<[String]> = check(name, from, to)?.into();
    let b = broker.clone();
    Ok(broker
        .consumer_matching(from, &route_group(name))
        .start(relq_core::StartPosition::Earliest)
        .fallback(move |m: Message| {
            let (b, targets) = (b.clone(), targets.clone());
            async move { forward(&b, &targets, m).await }
        }))
}

/// A route's definition checked: its targets, each once.
///
/// # Errors
/// An invalid name, pattern or target, no target, or a target the pattern matches.
pub(crate) fn check(name: &str, from: &str, to: &[&str]) -> Result<Vec<String>> {
    validate_name("route", name)?;
    let pattern: TopicPattern = from.parse()?;
    if to.is_empty() {
        return Err(
            ConfigError::new("route", format!("route {name:?} has no target topic")).into(),
        );
    }
    let mut targets = Vec::with_capacity(to.len());
    for t in to {
        validate_name("topic", t)?;
        if pattern.matches(t) {
            return Err(ConfigError::new(
                "route",
                format!(
                    "route {name:?} would forward into {t:?}, which its own pattern {from:?} matches: every message would go round"
                ),
            )
            .into());
        }
        if !targets.contains(&t.to_string()) {
            targets.push(t.to_string());
        }
    }
    Ok(targets)
}

/// Publishes `m` to every target; `Ok` once each holds it.
async fn forward(
    broker: &Broker,
    targets: &[String],
    m: Message,
) -> std::result::Result<(), HandlerError> {
    // A value that is not a count (only routes write it) counts as the limit: a loop is never
    // given a fresh start.
    let hops = match m.header(HEADER_ROUTE_HOPS) {
        None => 0,
        Some(h) => h.parse::<u32>().unwrap_or(MAX_ROUTE_HOPS),
    };
    if hops >= MAX_ROUTE_HOPS {
        return Err(HandlerError::permanent(Error::Config(ConfigError::new(
            "route",
            format!("the message has passed through {hops} routes: a loop of routes"),
        )))
        .category("route_loop"));
    }
    let from = format!("{}/{}", m.topic(), m.id);
    let mut headers = m.headers;
    for h in [HEADER_REPLAY_OF, HEADER_ORIGINAL_ID, HEADER_REPLAY_GROUP] {
        headers.remove(h);
    }
    headers.insert(HEADER_ROUTE_HOPS.to_owned(), (hops + 1).to_string());
    headers.insert(HEADER_ROUTED_FROM.to_owned(), from);
    let out = Outgoing {
        kind: m.kind,
        payload: m.payload,
        headers,
        deliver_at: None,
        dedup_window: None,
    };
    // A failed publish (a target that is down, full or terminated) is retried like any
    // failure, then dead-lettered with its reason in the route's group: never dropped.
    for t in targets {
        broker
            .publish_outgoing(t, out.clone())
            .await
            .map_err(|e| HandlerError::retryable(e).category("route"))?;
    }
    Ok(())
}
