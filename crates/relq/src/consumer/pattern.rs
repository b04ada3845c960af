//! A consumer of every topic matching a pattern: one consumer of the group per matching topic,
//! all sharing the builder's handlers and one set of counters, and a supervisor that lists the
//! topics every `discover_every` to start on new ones.
//!
//! - Topics that match when it starts: the group starts where the builder says (`start`).
//! - Topics found later were created after the subscription: their group starts at the
//!   earliest message, so nothing published to a new topic before it was found is missed.
//! - A topic consumer that stops because its topic was terminated or its group deleted is
//!   dropped (and not restarted by this run); one that fails stops the whole consumer with its
//!   reason, after shutting the others down gracefully.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{start_one, Config, ConsumerHandle, Counters, ShutdownReport, StopReason};
use crate::broker::Broker;
use crate::pattern::TopicPattern;
use relq_core::{Error, StartPosition};

pub(super) async fn start(
    broker: Broker,
    template: Arc<Config>,
    pattern: Arc<TopicPattern>,
    every: Duration,
    counters: Arc<Counters>,
) -> Result<ConsumerHandle, Error> {
    let mut running = BTreeMap::new();
    for topic in broker.topics().await? {
        if !pattern.matches(&topic) {
            continue;
        }
        match start_topic(&broker, &template, &topic, template.start, &counters).await {
            Ok(h) => {
                running.insert(topic, h);
            }
            Err(e) => {
                // All or nothing: what started is stopped (it held nothing yet worth waiting for).
                for (_, h) in running {
                    h.shutdown(Duration::ZERO).await;
                }
                return Err(e);
            }
        }
    }
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

async fn supervise(mut s: Supervisor) {
    // Topics whose consumer stopped by itself (terminated, group deleted): not restarted.
    let mut ended = std::collections::BTreeSet::new();
    // The handle was dropped: nobody can stop it any more; it keeps consuming.
    let mut orphaned = false;
    let (deadline, reason) = loop {
        tokio::select! {
            changed = s.stop.changed(), if !orphaned => {
                match changed {
                    Ok(()) => {
                        if let Some(deadline) = *s.stop.borrow() {
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
        // New topics.
        match s.broker.topics().await {
            Ok(topics) => {
                for topic in topics {
                    if !s.pattern.matches(&topic)
                        || s.running.contains_key(&topic)
                        || ended.contains(&topic)
                    {
                        continue;
                    }
                    match start_topic(
                        &s.broker,
                        &s.template,
                        &topic,
                        StartPosition::Earliest,
                        &s.counters,
                    )
                    .await
                    {
                        Ok(h) => {
                            s.running.insert(topic, h);
                        }
                        Err(e) => {
                            tracing::warn!(topic, error = %e, "could not start on a matching topic; trying again at the next listing");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing topics failed; trying again"),
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
    let _ = s.report.send(Some(ShutdownReport { abandoned }));
    let _ = s.done.send(Some(reason));
}
