//! A consumer of every topic matching a pattern: one consumer of the group per matching topic,
//! all sharing the builder's handlers and one set of counters, and a supervisor that lists the
//! topics every `discover_every` to start on new ones.
//!
//! Where the group starts on a topic:
//! - the first time the pattern consumer runs (its group exists on no matching topic yet), at
//!   `start` on the topics that match then;
//! - on every other topic, at the earliest message: such a topic was created after the
//!   subscription (while it ran, or while it was down), so nothing in it predates the
//!   subscription, and a message published before the topic was found is not missed.
//!
//! A topic consumer that stops because its topic was terminated or its group deleted is dropped
//! until a listing no longer shows the topic (a topic published to again afterwards is found
//! again); one that fails stops the whole consumer with its reason, after shutting the others
//! down gracefully. With dead-letter forwarding on, the failure topics (`<topic><suffix>`) are
//! not consumed even where the pattern matches them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{start_one, Config, ConsumerHandle, Counters, ShutdownReport, StopReason};
use crate::broker::Broker;
use crate::pattern::TopicPattern;
use relq_core::{Error, StartPosition};

/// Topic consumers started so far: stopped at once if dropped before handed over (a start that
/// failed, or whose future was cancelled), so none runs on unowned.
struct Started(BTreeMap<String, ConsumerHandle>);

impl Drop for Started {
    fn drop(&mut self) {
        for h in self.0.values() {
            let _ = h.stop.send(Some(Duration::ZERO));
        }
    }
}

/// Whether the pattern consumer reads `topic`.
fn wanted(pattern: &TopicPattern, config: &Config, topic: &str) -> bool {
    pattern.matches(topic)
        && !config
            .forward
            .as_ref()
            .is_some_and(|f| topic.ends_with(f.suffix.as_str()))
}

pub(super) async fn start(
    broker: Broker,
    template: Arc<Config>,
    pattern: Arc<TopicPattern>,
    every: Duration,
    counters: Arc<Counters>,
) -> Result<ConsumerHandle, Error> {
    let mut matching = Vec::new();
    let mut resumed = false;
    for topic in broker.topics().await? {
        if !wanted(&pattern, &template, &topic) {
            continue;
        }
        let has_group = broker
            .topic_info(&topic)
            .await
            .map(|i| i.groups.iter().any(|g| g.name == template.group))
            .unwrap_or(false);
        resumed |= has_group;
        matching.push((topic, has_group));
    }
    let mut started = Started(BTreeMap::new());
    for (topic, has_group) in matching {
        // A topic the group is new to on a subscription that existed before: created since.
        let start = if resumed && !has_group {
            StartPosition::Earliest
        } else {
            template.start
        };
        let h = start_topic(&broker, &template, &topic, start, &counters).await?;
        started.0.insert(topic, h);
    }
    let running = std::mem::take(&mut started.0);
    let (stop_tx, stop_rx) = watch::channel(None::<Duration>);
    let (done_tx, done_rx) = watch::channel(None::<StopReason>);
    let (report_tx, report_rx) = watch::channel(None::<ShutdownReport>);
    let name = template.consumer.clone();
    let span = tracing::info_span!("relq.pattern_consumer", pattern = %pattern, group = %template.group, consumer = %name);
    tokio::spawn(tracing::Instrument::instrument(
        supervise(Supervisor {
            broker,
            template,
            pattern,
            every,
            counters: counters.clone(),
            running,
            stop: stop_rx,
            done: done_tx,
            report: report_tx,
        }),
        span,
    ));
    Ok(ConsumerHandle {
        name,
        counters,
        stop: stop_tx,
        done: done_rx,
        report: report_rx,
    })
}

async fn start_topic(
    broker: &Broker,
    template: &Config,
    topic: &str,
    start: StartPosition,
    counters: &Arc<Counters>,
) -> Result<ConsumerHandle, Error> {
    let mut config = template.clone();
    config.topic = topic.to_owned();
    config.start = start;
    let h = start_one(broker, Arc::new(config), counters.clone()).await?;
    tracing::info!(topic, "consuming a matching topic");
    Ok(h)
}

struct Supervisor {
    broker: Broker,
    template: Arc<Config>,
    pattern: Arc<TopicPattern>,
    every: Duration,
    counters: Arc<Counters>,
    running: BTreeMap<String, ConsumerHandle>,
    stop: watch::Receiver<Option<Duration>>,
    done: watch::Sender<Option<StopReason>>,
    report: watch::Sender<Option<ShutdownReport>>,
}

impl Supervisor {
    /// The deadline a shutdown asked for, if one did.
    fn stopping(&self) -> Option<Duration> {
        *self.stop.borrow()
    }
}

async fn supervise(mut s: Supervisor) {
    // Topics whose consumer stopped by itself (terminated, group deleted): not restarted while
    // a listing still shows them.
    let mut ended = BTreeSet::new();
    // The handle was dropped: nobody can stop it any more; it keeps consuming.
    let mut orphaned = false;
    let (deadline, reason) = 'run: loop {
        tokio::select! {
            changed = s.stop.changed(), if !orphaned => {
                match changed {
                    Ok(()) => {
                        if let Some(deadline) = s.stopping() {
                            break (deadline, StopReason::Shutdown);
                        }
                        continue;
                    }
                    Err(_) => orphaned = true,
                }
            }
            () = tokio::time::sleep(s.every) => {}
        }
        // Consumers that stopped by themselves.
        let mut failed = None;
        let stopped: Vec<String> = s
            .running
            .iter()
            .filter(|(_, h)| h.is_stopped())
            .map(|(t, _)| t.clone())
            .collect();
        for topic in stopped {
            if let Some(h) = s.running.remove(&topic) {
                let reason = h.done().await;
                match reason {
                    StopReason::TopicTerminated | StopReason::GroupDeleted => {
                        tracing::info!(topic, ?reason, "a matching topic's consumer stopped");
                        ended.insert(topic);
                    }
                    other => failed = Some(other),
                }
            }
        }
        if let Some(reason) = failed {
            break (Duration::from_secs(30), reason);
        }
        // New topics; a shutdown asked for meanwhile is not kept waiting.
        let listed = tokio::select! {
            listed = s.broker.topics() => listed,
            _ = s.stop.changed(), if !orphaned => match s.stopping() {
                Some(deadline) => break (deadline, StopReason::Shutdown),
                None => continue,
            },
        };
        let topics = match listed {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "listing topics failed; trying again");
                continue;
            }
        };
        let present: BTreeSet<&String> = topics.iter().collect();
        ended.retain(|t| present.contains(t));
        for topic in &topics {
            if let Some(deadline) = s.stopping() {
                break 'run (deadline, StopReason::Shutdown);
            }
            if !wanted(&s.pattern, &s.template, topic)
                || s.running.contains_key(topic)
                || ended.contains(topic)
            {
                continue;
            }
            match start_topic(
                &s.broker,
                &s.template,
                topic,
                StartPosition::Earliest,
                &s.counters,
            )
            .await
            {
                Ok(h) => {
                    s.running.insert(topic.clone(), h);
                }
                Err(e) => {
                    tracing::warn!(topic, error = %e, "could not start on a matching topic; trying again at the next listing");
                }
            }
        }
    };
    // Every topic's consumer drains at once, within the same deadline.
    let mut abandoned = 0;
    let shutdowns: Vec<_> = std::mem::take(&mut s.running)
        .into_values()
        .map(|h| tokio::spawn(h.shutdown(deadline)))
        .collect();
    for t in shutdowns {
        if let Ok(r) = t.await {
            abandoned += r.abandoned;
        }
    }
    let _ = s.report.send(Some(ShutdownReport {
        abandoned,
        stats: s.counters.snapshot(),
    }));
    let _ = s.done.send(Some(reason));
}
