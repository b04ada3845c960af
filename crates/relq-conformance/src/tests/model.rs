//! The model-based test: random operations against the backend checked against a plain model.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    New,
    /// Delivered to `consumer` between `since` and `at` (the backend's own delivery time lies
    /// in between; in paused time they are equal).
    Pending {
        consumer: usize,
        since: Timestamp,
        at: Timestamp,
        /// The delivery count of this delivery.
        attempt: u32,
    },
    Scheduled {
        due: Timestamp,
    },
    Acked,
    Dead,
}

/// Random publish / read / ack / retry / dead-letter / crash / claim / recover sequences against
/// the backend, checked after every step against a plain model. Invariant: every message is
/// exactly one of new, pending, scheduled, acknowledged or dead-lettered; nothing is lost or
/// duplicated; at the end everything is acknowledged or dead-lettered exactly once.
pub async fn model_based_random_operations_lose_nothing(b: Broker) {
    let backend = b.backend().clone();
    for seed in 0..12u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let topic = unique("model");
        let mut subs = Vec::new();
        for c in 0..3 {
            subs.push(
                backend
                    .join(&topic, "g", &format!("c{c}"), StartPosition::Earliest)
                    .await
                    .unwrap(),
            );
        }
        let mut model: BTreeMap<MessageId, State> = BTreeMap::new();
        let mut dead_ids: Vec<MessageId> = Vec::new();
        let check_deliveries = |model: &mut BTreeMap<MessageId, State>,
                                got: &[Delivery],
                                c: usize,
                                eligible: &BTreeSet<MessageId>,
                                must: usize,
                                max: usize,
                                before: Timestamp,
                                step: &str| {
            // `eligible` holds what may be delivered (its time came by the end of the call);
            // `must` of them were due before the call began. In real time the two differ.
            assert!(got.len() <= max, "seed {seed} {step}: more than max");
            assert!(
                got.len() >= must.min(max) && got.len() <= eligible.len().min(max),
                "seed {seed} {step}: returned {} of {} eligible ({must} certainly due)",
                got.len(),
                eligible.len()
            );
            let now = Timestamp::now();
            for d in got {
                assert!(
                    eligible.contains(&d.message.id),
                    "seed {seed} {step}: {} was not eligible",
                    d.message.id
                );
                model.insert(
                    d.message.id,
                    State::Pending {
                        consumer: c,
                        since: before,
                        at: now,
                        attempt: d.message.attempt,
                    },
                );
            }
        };
        for step in 0..150 {
            let now = Timestamp::now();
            match rng.u8(0..100) {
                0..=19 => {
                    let n = rng.usize(1..5);
                    for id in publish_n(&b, &topic, n).await {
                        assert!(
                            model.insert(id, State::New).is_none(),
                            "seed {seed}: id reused"
                        );
                    }
                }
                20..=39 => {
                    let c = rng.usize(0..3);
                    let max = rng.usize(1..6);
                    let due_by = |t: Timestamp| -> BTreeSet<MessageId> {
                        model
                            .iter()
                            .filter(|(_, s)| match s {
                                State::New => true,
                                State::Scheduled { due } => *due <= t,
                                _ => false,
                            })
                            .map(|(id, _)| *id)
                            .collect()
                    };
                    let must = due_by(now).len();
                    let got = backend.read(&subs[c], max, Duration::ZERO).await.unwrap();
                    let eligible = due_by(Timestamp::now());
                    check_deliveries(&mut model, &got, c, &eligible, must, max, now, "read");
                }
                40..=64 => {
                    let pending: Vec<MessageId> = model
                        .iter()
                        .filter(|(_, s)| matches!(s, State::Pending { .. }))
                        .map(|(id, _)| *id)
                        .collect();
                    if pending.is_empty() {
                        continue;
                    }
                    let id = pending[rng.usize(0..pending.len())];
                    let State::Pending {
                        consumer, attempt, ..
                    } = model[&id]
                    else {
                        unreachable!()
                    };
                    // Now and then a stale settlement: for a delivery that was superseded (the
                    // message was claimed or recovered since). A retry or dead letter for it
                    // must be ignored; an ack still counts (the work was done).
                    let stale = rng.u8(0..5) == 0;
                    let attempt = if stale { attempt + 1 } else { attempt };
                    let failure = relq::AttemptFailure {
                        attempt,
                        at: now,
                        consumer: format!("c{consumer}"),
                        kind: FailureKind::Retryable,
                        error: "e".into(),
                    };
                    let (settlement, next) = match rng.u8(0..3) {
                        0 => (Settlement::Ack(id), State::Acked),
                        1 => {
                            let due = now.plus(ms(rng.u64(0..300)));
                            (
                                Settlement::Retry {
                                    id,
                                    at: due,
                                    failure,
                                    release_key: false,
                                },
                                State::Scheduled { due },
                            )
                        }
                        _ => {
                            let msg = Message::new(
                                id,
                                relq::Outgoing {
                                    kind: "job".into(),
                                    payload: Default::default(),
                                    headers: Default::default(),
                                    deliver_at: None,
                                    dedup_window: None,
                                },
                                now,
                                attempt,
                            );
                            let dl = relq::DeadLetter::new(msg, topic.clone(), "g", failure);
                            (Settlement::DeadLetter(Box::new(dl)), State::Dead)
                        }
                    };
                    // Any consumer may settle while the message is pending. A stale retry or dead
                    // letter applies only when the settling consumer holds the message.
                    let settler = rng.usize(0..3);
                    let applies =
                        !stale || matches!(settlement, Settlement::Ack(_)) || settler == consumer;
                    backend.settle(&subs[settler], &[settlement]).await.unwrap();
                    if applies {
                        if matches!(next, State::Dead) {
                            dead_ids.push(id);
                        }
                        model.insert(id, next);
                    }
                }
                65..=74 => {
                    let c = rng.usize(0..3);
                    let min_idle = ms(rng.u64(0..400));
                    // May be claimed: idle by the end of the call counting from the earliest
                    // possible delivery; must be: idle at its start from the latest one. A
                    // server-side backend (Redis) measures idleness with the server's clock,
                    // which is not relq's clock (both count whole milliseconds, and they may
                    // differ), so the two bounds are widened by CLOCK_SLACK.
                    const CLOCK_SLACK: Duration = Duration::from_millis(50);
                    let idle_by = |t: Timestamp, latest: bool| -> BTreeSet<MessageId> {
                        model
                            .iter()
                            .filter(|(_, s)| match s {
                                State::Pending { at, .. } if latest => {
                                    t.since(*at) >= min_idle + CLOCK_SLACK
                                }
                                State::Pending { since, .. } => {
                                    t.since(*since) + CLOCK_SLACK >= min_idle
                                }
                                _ => false,
                            })
                            .map(|(id, _)| *id)
                            .collect()
                    };
                    let must = idle_by(now, true).len();
                    let max = rng.usize(1..6);
                    let got = backend.claim(&subs[c], min_idle, max).await.unwrap();
                    let eligible = idle_by(Timestamp::now(), false);
                    check_deliveries(&mut model, &got, c, &eligible, must, max, now, "claim");
                }
                75..=84 => {
                    // Consumer c crashed and restarts: it recovers what it held.
                    let c = rng.usize(0..3);
                    let ids: Vec<MessageId> = model.keys().copied().collect();
                    let after = if ids.is_empty() || rng.bool() {
                        MessageId::ZERO
                    } else {
                        ids[rng.usize(0..ids.len())]
                    };
                    let eligible: BTreeSet<MessageId> = model
                        .iter()
                        .filter(|(id, s)| {
                            **id > after
                                && matches!(s, State::Pending { consumer, .. } if *consumer == c)
                        })
                        .map(|(id, _)| *id)
                        .collect();
                    let max = rng.usize(1..6);
                    let got = backend.recover(&subs[c], after, max).await.unwrap();
                    let must = eligible.len();
                    check_deliveries(&mut model, &got, c, &eligible, must, max, now, "recover");
                }
                _ => tokio::time::sleep(ms(rng.u64(1..200))).await,
            }
            // Counts agree with the model.
            let info = backend
                .topic_info(&topic)
                .await
                .unwrap()
                .expect("topic exists");
            let g = &info.groups[0];
            let count = |f: fn(&State) -> bool| model.values().filter(|s| f(s)).count() as u64;
            assert_eq!(
                g.pending,
                count(|s| matches!(s, State::Pending { .. })),
                "seed {seed} step {step}: pending"
            );
            assert_eq!(
                g.scheduled,
                count(|s| matches!(s, State::Scheduled { .. })),
                "seed {seed} step {step}: scheduled"
            );
            assert_eq!(
                g.lag,
                count(|s| matches!(s, State::New)),
                "seed {seed} step {step}: lag"
            );
            assert_eq!(
                info.dead_letters,
                count(|s| matches!(s, State::Dead)),
                "seed {seed} step {step}: dead letters"
            );
            assert_eq!(
                info.length,
                model.len() as u64,
                "seed {seed} step {step}: nothing removed"
            );
        }
        // Drain: wait out every schedule, take everything, ack it.
        tokio::time::sleep(ms(500)).await;
        loop {
            let mut got = backend.claim(&subs[0], Duration::ZERO, 100).await.unwrap();
            got.extend(backend.read(&subs[0], 100, Duration::ZERO).await.unwrap());
            if got.is_empty() {
                break;
            }
            let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
            backend.settle(&subs[0], &acks).await.unwrap();
            for d in &got {
                let prev = model.insert(d.message.id, State::Acked);
                assert!(
                    matches!(
                        prev,
                        Some(State::New | State::Pending { .. } | State::Scheduled { .. })
                    ),
                    "seed {seed}: drained {} from {prev:?}",
                    d.message.id
                );
            }
        }
        assert!(
            model
                .values()
                .all(|s| matches!(s, State::Acked | State::Dead)),
            "seed {seed}: something was left behind"
        );
        let dls = b
            .dead_letters(&topic)
            .list(&DeadLetterQuery::all().limit(10_000))
            .await
            .unwrap();
        let mut got: Vec<MessageId> = dls.iter().map(|d| d.message.id).collect();
        got.sort();
        dead_ids.sort();
        assert_eq!(
            got, dead_ids,
            "seed {seed}: each dead letter stored exactly once"
        );
        let g = &backend.topic_info(&topic).await.unwrap().unwrap().groups[0];
        assert_eq!((g.pending, g.scheduled, g.lag), (0, 0, 0));
    }
}
