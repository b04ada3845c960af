//! A consumer of a topic with priority levels: one run per level's topic
//! ([`priority_topic`](crate::priority_topic)), all sharing the builder's handlers, one set of
//! counters and one pool of `concurrency` handler slots, which the levels take turns at by
//! weight (see `slots`). A level that stops by itself (its topic terminated, its group deleted,
//! a failure) stops the others too, with its reason.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::slots::Shared;
use super::{start_one, Config, ConsumerHandle, Counters, ShutdownReport, StopReason};
use crate::broker::Broker;
use relq_core::Error;

/// The level runs started so far: stopped at once if dropped before handed over (a start that
/// failed), so none runs unowned.
struct Started(Vec<ConsumerHandle>);

impl Drop for Started {
    fn drop(&mut self) {
        for h in &self.0 {
            let _ = h.stop.send(Some(Duration::ZERO));
        }
    }
}

pub(super) async fn start(
    broker: &Broker,
    template: Arc<Config>,
    weights: Vec<u64>,
    counters: Arc<Counters>,
) -> Result<ConsumerHandle, Error> {
    let shared = Shared::new(template.concurrency, weights.clone());
    let mut started = Started(Vec::with_capacity(weights.len()));
    for level in 0..weights.len() {
        let mut config = (*template).clone();
        let level_u8 = u8::try_from(level).unwrap_or(u8::MAX);
        config.topic = crate::priority_topic(&template.topic, level_u8);
        config.shared_slots = Some((shared.clone(), level));
        started
            .0
            .push(start_one(broker, Arc::new(config), counters.clone()).await?);
    }
    let levels = std::mem::take(&mut started.0);
    let (stop_tx, stop_rx) = watch::channel(None::<Duration>);
    let (done_tx, done_rx) = watch::channel(None::<StopReason>);
    let (report_tx, report_rx) = watch::channel(None::<ShutdownReport>);
    let name = template.consumer.clone();
    let span = tracing::info_span!("relq.priority_consumer", topic = %template.topic, group = %template.group, consumer = %name, levels = weights.len());
    tokio::spawn(tracing::Instrument::instrument(
        supervise(levels, counters.clone(), stop_rx, done_tx, report_tx),
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

async fn supervise(
    levels: Vec<ConsumerHandle>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<Option<Duration>>,
    done: watch::Sender<Option<StopReason>>,
    report: watch::Sender<Option<ShutdownReport>>,
) {
    // The first level that stops by itself.
    let (ended_tx, mut ended) = mpsc::channel::<StopReason>(levels.len().max(1));
    for h in &levels {
        let mut rx = h.done.clone();
        let tx = ended_tx.clone();
        tokio::spawn(async move {
            loop {
                let r = rx.borrow_and_update().clone();
                if let Some(r) = r {
                    let _ = tx.send(r).await;
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    drop(ended_tx);
    let mut orphaned = false;
    let (deadline, reason) = loop {
        tokio::select! {
            changed = stop.changed(), if !orphaned => match changed {
                Ok(()) => {
                    if let Some(d) = *stop.borrow() {
                        break (d, StopReason::Shutdown);
                    }
                }
                // The handle was dropped: nobody can stop it; it runs until a level stops.
                Err(_) => orphaned = true,
            },
            r = ended.recv() => {
                let r = r.unwrap_or_else(|| StopReason::runtime_failure("a priority level's run ended"));
                tracing::info!(reason = ?r, "a priority level stopped; stopping the others");
                break (Duration::from_secs(30), r);
            }
        }
    };
    let shutdowns: Vec<_> = levels
        .into_iter()
        .map(|h| tokio::spawn(h.shutdown(deadline)))
        .collect();
    let mut abandoned = 0;
    for t in shutdowns {
        if let Ok(r) = t.await {
            abandoned += r.abandoned;
        }
    }
    let _ = report.send(Some(ShutdownReport {
        abandoned,
        stats: counters.snapshot(),
    }));
    let _ = done.send(Some(reason));
}
