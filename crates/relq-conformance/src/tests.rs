//! The conformance tests. Each takes a fresh broker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relq::{
    Backoff, BatchConfig, Broker, Browse, DeadLetterQuery, Delivery, Error, FailureKind,
    HandlerError, Message, MessageId, NewMessage, Retention, Settlement, StartPosition, StopReason,
    Timestamp,
};

use crate::wait_until;

const LONG: Duration = Duration::from_secs(60);
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What a recording handler saw.
#[derive(Clone, Debug)]
struct Seen {
    id: MessageId,
    attempt: u32,
    at: Timestamp,
    payload: String,
    headers: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn record(&self, m: &Message) {
        self.0.lock().unwrap().push(Seen {
            id: m.id,
            attempt: m.attempt,
            at: Timestamp::now(),
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            headers: m.headers.clone(),
        });
    }
    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn payloads(&self) -> BTreeSet<String> {
        self.all().into_iter().map(|s| s.payload).collect()
    }
}

/// A handler that records and succeeds.
fn ok_handler(
    log: &Log,
) -> impl Fn(Message) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static {
    let log = log.clone();
    move |m: Message| {
        log.record(&m);
        std::future::ready(Ok(()))
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

async fn publish_n(b: &Broker, topic: &str, n: usize) -> Vec<MessageId> {
    let msgs = (0..n)
        .map(|i| NewMessage::new("job", format!("m{i}")))
        .collect();
    b.publish_batch(topic, msgs).await.expect("publish")
}

async fn dead_count(b: &Broker, topic: &str) -> u64 {
    b.dead_letters(topic)
        .count(&DeadLetterQuery::all())
        .await
        .expect("count")
}

/// Every group receives every message.
pub async fn publish_and_consume_every_group_gets_every_message(b: Broker) {
    let topic = unique("pubsub");
    let (l1, l2) = (Log::default(), Log::default());
    let c1 = b
        .consumer(&topic, "g1")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&l1))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let c2 = b
        .consumer(&topic, "g2")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&l2))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let ids = publish_n(&b, &topic, 50).await;
    assert_eq!(ids.len(), 50);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids are ordered");
    wait_until("both groups processed 50", LONG, || async {
        l1.len() >= 50 && l2.len() >= 50
    })
    .await;
    assert_eq!(l1.payloads().len(), 50);
    assert_eq!(l2.payloads().len(), 50);
    // Handlers ran; their acknowledgements are committed shortly after (a durable backend
    // syncs them first).
    wait_until("both groups settled", LONG, || async {
        let info = b.topic_info(&topic).await.unwrap();
        info.groups.len() == 2
            && info
                .groups
                .iter()
                .all(|g| (g.pending, g.lag, g.scheduled) == (0, 0, 0))
    })
    .await;
    c1.shutdown(LONG).await;
    c2.shutdown(LONG).await;
}

/// Consumers inside one group share the messages: each message is processed once.
pub async fn consumers_in_a_group_compete(b: Broker) {
    let topic = unique("compete");
    let log = Log::default();
    let mut handles = Vec::new();
    for i in 0..3 {
        handles.push(
            b.consumer(&topic, "g")
                .name(format!("w{i}"))
                .start(StartPosition::Earliest)
                .read_batch(4)
                .handler("job", ok_handler(&log))
                .build()
                .unwrap()
                .start()
                .await
                .unwrap(),
        );
    }
    publish_n(&b, &topic, 120).await;
    wait_until("120 processed", LONG, || async { log.len() >= 120 }).await;
    tokio::time::sleep(ms(200)).await;
    assert_eq!(log.len(), 120, "no message processed twice");
    assert_eq!(log.payloads().len(), 120);
    let total: u64 = handles.iter().map(|h| h.stats().processed).sum();
    assert_eq!(total, 120);
    for h in handles {
        h.shutdown(LONG).await;
    }
}

/// A message held by a consumer that died is claimed by another after `claim_after`.
pub async fn stuck_message_is_claimed_after_its_consumer_dies(b: Broker) {
    let topic = unique("stuck");
    let backend = b.backend().clone();
    let dead = backend
        .join(&topic, "g", "dead", StartPosition::Earliest)
        .await
        .unwrap();
    let id = b
        .publish(&topic, NewMessage::new("job", "stuck"))
        .await
        .unwrap();
    let got = backend.read(&dead, 10, ms(100)).await.unwrap();
    assert_eq!(got.len(), 1, "the dying consumer took the message");
    // "dead" never settles it.
    let log = Log::default();
    let started = Timestamp::now();
    let c = b
        .consumer(&topic, "g")
        .name("alive")
        .claim_after(ms(2000))
        .handler_timeout(ms(500))
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("claimed and processed", LONG, || async { log.len() == 1 }).await;
    let seen = &log.all()[0];
    assert_eq!(seen.id, id);
    assert_eq!(seen.attempt, 2, "the claim is the second delivery");
    assert!(
        seen.at.since(started) >= ms(1900),
        "not claimed before claim_after: {:?}",
        seen.at.since(started)
    );
    wait_until("settled", LONG, || async {
        b.topic_info(&topic).await.unwrap().groups[0].pending == 0
    })
    .await;
    c.shutdown(LONG).await;
}

/// A consumer restarting under the same name first redelivers what it held.
pub async fn own_pending_messages_are_recovered_on_restart(b: Broker) {
    let topic = unique("recover");
    let backend = b.backend().clone();
    let w1 = backend
        .join(&topic, "g", "w1", StartPosition::Earliest)
        .await
        .unwrap();
    publish_n(&b, &topic, 10).await;
    assert_eq!(backend.read(&w1, 100, ms(100)).await.unwrap().len(), 10);
    let log = Log::default();
    let l = log.clone();
    // claim_after is an hour: only recovery can deliver these. Recovery pages (read_batch 3) while
    // earlier pages are still being handled; none may be delivered twice.
    let c = b
        .consumer(&topic, "g")
        .name("w1")
        .claim_after(Duration::from_secs(3600))
        .read_batch(3)
        .concurrency(4)
        .handler("job", move |m: Message| {
            l.record(&m);
            async {
                tokio::time::sleep(ms(100)).await;
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("recovered", Duration::from_secs(10), || async {
        log.len() >= 10
    })
    .await;
    wait_until("settled", LONG, || async {
        b.topic_info(&topic).await.unwrap().groups[0].pending == 0
    })
    .await;
    assert_eq!(
        log.len(),
        10,
        "each recovered once: {:?}",
        log.all().iter().map(|s| s.id).collect::<Vec<_>>()
    );
    assert_eq!(log.payloads().len(), 10);
    assert!(log.all().iter().all(|s| s.attempt == 2));
    c.shutdown(LONG).await;
}

/// Retries happen exactly as the policy says, then the message is dead-lettered.
pub async fn retries_follow_the_policy_exactly(b: Broker) {
    let topic = unique("retry");
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .include_stack_trace(true)
        .retry(
            Backoff::exponential(ms(200), ms(5000))
                .randomization(0.0)
                .max_attempts(4),
        )
        .handler("job", move |m: Message| {
            l.record(&m);
            async {
                Err(HandlerError::retryable(std::io::Error::other("db down")).category("database"))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = b
        .publish(&topic, NewMessage::new("job", "x"))
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let seen = log.all();
    assert_eq!(seen.len(), 4, "exactly max_attempts deliveries");
    assert_eq!(
        seen.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(
        seen.iter().all(|s| s.id == id),
        "a retry keeps the message id"
    );
    for (i, want) in [200u64, 400, 800].into_iter().enumerate() {
        let gap = seen[i + 1].at.since(seen[i].at);
        assert!(gap >= ms(want), "retry {i}: {gap:?} < {want} ms");
        assert!(
            gap < ms(want + 1500),
            "retry {i}: {gap:?} far above {want} ms"
        );
    }
    let dl = b
        .dead_letters(&topic)
        .list(&DeadLetterQuery::all())
        .await
        .unwrap()
        .remove(0);
    assert!(
        dl.backtrace.as_deref().is_some_and(|t| !t.is_empty()),
        "include_stack_trace captured one"
    );
    assert_eq!(dl.category.as_deref(), Some("database"));
    let s = c.stats();
    assert_eq!(
        (s.failed, s.retried, s.dead_lettered, s.processed),
        (4, 3, 1, 0)
    );
    c.shutdown(LONG).await;
}

#[derive(Debug)]
struct Wrapped(std::io::Error);
impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("order is invalid")
    }
}
impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// A dead letter records the message, where and why it failed, and every attempt.
pub async fn dead_letter_holds_the_full_failure_record(b: Broker) {
    let topic = unique("dlrecord");
    let c = b
        .consumer(&topic, "billing")
        .name("w-7")
        .start(StartPosition::Earliest)
        .retry(Backoff::fixed(ms(50)).max_attempts(3))
        .handler("order", |m: Message| async move {
            if m.attempt < 2 {
                Err(HandlerError::retryable(std::io::Error::other(
                    "timeout talking to db",
                )))
            } else {
                Err(
                    HandlerError::permanent(Wrapped(std::io::Error::other("amount < 0")))
                        .category("validation"),
                )
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let before = Timestamp::now();
    let id = b
        .publish(
            &topic,
            NewMessage::new("order", "{\"amount\":-1}").header("tenant", "acme"),
        )
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let dl = b
        .dead_letters(&topic)
        .list(&DeadLetterQuery::all())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(b.dead_letters(&topic).get(dl.id).await.unwrap(), dl);
    assert_eq!(dl.message.id, id);
    assert_eq!(&dl.message.payload[..], b"{\"amount\":-1}");
    assert_eq!(dl.message.header("tenant"), Some("acme"));
    assert_eq!(dl.message.kind, "order");
    assert_eq!(
        (
            dl.topic.as_str(),
            dl.group.as_str(),
            dl.consumer.as_str(),
            dl.handler.as_str()
        ),
        (topic.as_str(), "billing", "w-7", "order")
    );
    assert_eq!(dl.reason, FailureKind::Permanent);
    assert_eq!(dl.category.as_deref(), Some("validation"));
    assert_eq!(dl.error_chain, ["order is invalid", "amount < 0"]);
    assert_eq!(dl.attempts, 2);
    assert_eq!(dl.backtrace, None, "include_stack_trace is off by default");
    assert_eq!(dl.failures.len(), 2);
    assert_eq!(dl.failures[0].kind, FailureKind::Retryable);
    assert_eq!(dl.failures[0].error, "timeout talking to db");
    assert_eq!(dl.failures[1].kind, FailureKind::Permanent);
    assert!(dl.first_failed_at >= before && dl.first_failed_at <= dl.last_failed_at);
    let info = b.topic_info(&topic).await.unwrap();
    assert_eq!(
        (
            info.groups[0].pending,
            info.groups[0].scheduled,
            info.dead_letters
        ),
        (0, 0, 1)
    );
    c.shutdown(LONG).await;
}

/// A replayed dead letter is processed again, with a fresh attempt budget, by its group only.
pub async fn replay_redelivers_to_the_failing_group_only(b: Broker) {
    let topic = unique("replay");
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (failing_log, other_log) = (Log::default(), Log::default());
    let (h, fl) = (healed.clone(), failing_log.clone());
    let failing = b
        .consumer(&topic, "flaky")
        .start(StartPosition::Earliest)
        .retry(Backoff::fixed(ms(10)).max_attempts(2))
        .handler("job", move |m: Message| {
            fl.record(&m);
            let ok = h.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(HandlerError::retryable(std::io::Error::other("down")))
                }
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let other = b
        .consumer(&topic, "steady")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&other_log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = b
        .publish(&topic, NewMessage::new("job", "p"))
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    let dl = b
        .dead_letters(&topic)
        .list(&DeadLetterQuery::all())
        .await
        .unwrap()
        .remove(0);
    let replayed = b.dead_letters(&topic).replay(&[dl.id]).await.unwrap();
    assert_eq!(replayed.len(), 1);
    let new_id = replayed[0].1;
    assert!(new_id > id);
    wait_until("replay processed", LONG, || async {
        failing_log.len() == 3
    })
    .await;
    let last = failing_log.all().pop().unwrap();
    assert_eq!(last.id, new_id);
    assert_eq!(last.attempt, 1, "fresh attempt budget");
    assert_eq!(
        last.headers.get(relq::HEADER_REPLAY_OF),
        Some(&dl.id.to_string())
    );
    assert_eq!(
        last.headers.get(relq::HEADER_ORIGINAL_ID),
        Some(&id.to_string())
    );
    assert_eq!(dead_count(&b, &topic).await, 0);
    wait_until("steady settled the replay", LONG, || async {
        b.topic_info(&topic)
            .await
            .unwrap()
            .groups
            .iter()
            .all(|g| g.pending == 0 && g.lag == 0)
    })
    .await;
    assert_eq!(
        other_log.len(),
        1,
        "the group that succeeded does not process the replay"
    );
    failing.shutdown(LONG).await;
    other.shutdown(LONG).await;
}

/// Listing pages and filters, delete, purge by age, stats by category.
pub async fn dead_letter_list_filter_delete_purge_stats(b: Broker) {
    let topic = unique("dlops");
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .concurrency(4)
        .handler("a", |_m: Message| async {
            Err(HandlerError::permanent("bad a").category("validation"))
        })
        .handler("b", |_m: Message| async {
            Err(HandlerError::permanent("bad b").category("database"))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for i in 0..7 {
        b.publish(
            &topic,
            NewMessage::new(if i % 2 == 0 { "a" } else { "b" }, format!("{i}")),
        )
        .await
        .unwrap();
    }
    wait_until("7 dead letters", LONG, || async {
        dead_count(&b, &topic).await == 7
    })
    .await;
    let dls = b.dead_letters(&topic);
    let mut pages = Vec::new();
    let mut q = DeadLetterQuery::all().limit(3);
    loop {
        let page = dls.list(&q).await.unwrap();
        if page.is_empty() {
            break;
        }
        q = q.after(page.last().unwrap().id);
        pages.push(page);
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(
        dls.count(&DeadLetterQuery::all().kind("a")).await.unwrap(),
        4
    );
    assert_eq!(
        dls.count(&DeadLetterQuery::all().category("database"))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        dls.count(&DeadLetterQuery::all().handler("b"))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        dls.count(&DeadLetterQuery::all().handler("fallback").kind("b"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        dls.count(&DeadLetterQuery::all().reason(FailureKind::Permanent))
            .await
            .unwrap(),
        7
    );
    assert_eq!(
        dls.count(&DeadLetterQuery::all().reason(FailureKind::Panic))
            .await
            .unwrap(),
        0
    );
    let stats = dls.stats().await.unwrap();
    assert_eq!(stats.total, 7);
    assert_eq!(stats.by_kind.get("a"), Some(&4));
    assert_eq!(stats.by_category.get("validation"), Some(&4));
    assert_eq!(stats.by_reason.get("permanent"), Some(&7));
    // Replay a filtered set: the three of type "b" go back, fail again, and return as new dead letters.
    let replayed = dls
        .replay_matching(&DeadLetterQuery::all().kind("b"))
        .await
        .unwrap();
    assert_eq!(replayed.len(), 3);
    // The consumer is running, so a replayed message may already be a dead letter again; none
    // of the originals may be left.
    let replayed_ids: BTreeSet<_> = replayed.iter().map(|(dl, _)| *dl).collect();
    let left = dls.list(&DeadLetterQuery::all().kind("b")).await.unwrap();
    assert!(
        left.iter()
            .all(|d| !replayed_ids.contains(&d.id)
                && d.message.header(relq::HEADER_REPLAY_OF).is_some()),
        "replayed dead letters are removed: {left:?}"
    );
    wait_until("replayed ones dead-lettered again", LONG, || async {
        dead_count(&b, &topic).await == 7
    })
    .await;
    let again = dls.list(&DeadLetterQuery::all().kind("b")).await.unwrap();
    assert!(again
        .iter()
        .all(|d| d.message.header(relq::HEADER_REPLAY_OF).is_some() && d.attempts == 1));
    // Handlers run concurrently, so the oldest dead letter may be one of the replayed "b"s.
    let first = pages
        .iter()
        .flatten()
        .find(|d| d.message.kind == "a")
        .unwrap()
        .id;
    assert_eq!(dls.delete(&[first]).await.unwrap(), 1);
    assert_eq!(dls.delete(&[first]).await.unwrap(), 0);
    assert!(matches!(dls.get(first).await, Err(Error::NotFound(_))));
    assert_eq!(
        dls.purge_expired().await.unwrap(),
        0,
        "young dead letters survive the 30-day purge"
    );
    tokio::time::sleep(ms(50)).await;
    assert_eq!(dls.purge_older_than(ms(10)).await.unwrap(), 6);
    assert_eq!(dead_count(&b, &topic).await, 0);
    c.shutdown(LONG).await;
}

/// A stopped message is neither processed nor lost; resume delivers it.
pub async fn stopped_message_is_held_then_resumed(b: Broker) {
    let topic = unique("stop");
    let ids = publish_n(&b, &topic, 3).await;
    b.stop_message(&topic, ids[1]).await.unwrap();
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("two processed", LONG, || async { log.len() == 2 }).await;
    tokio::time::sleep(ms(500)).await;
    assert_eq!(log.len(), 2, "the stopped message is not processed");
    let info = b.topic_info(&topic).await.unwrap();
    assert_eq!(info.stopped, vec![ids[1]]);
    assert_eq!(info.groups[0].parked, 1);
    assert!(b.resume_message(&topic, ids[1]).await.unwrap());
    wait_until("resumed message processed", LONG, || async {
        log.len() == 3
    })
    .await;
    assert_eq!(log.all()[2].id, ids[1]);
    assert!(matches!(
        b.stop_message("no-such-topic", ids[0]).await,
        Err(Error::NotFound(_))
    ));
    c.shutdown(LONG).await;
}

/// `locate` tells where a message stands in each group: unread, pending with its consumer and
/// count, scheduled with its due time, stopped, done.
pub async fn locate_tells_where_a_message_stands_in_each_group(b: Broker) {
    use relq::Placement;
    let topic = unique("locate");
    let ids = publish_n(&b, &topic, 3).await;
    let placement = |group: &str, id: MessageId| {
        let b = b.clone();
        let topic = topic.clone();
        let group = group.to_owned();
        async move {
            b.locate(&topic, id)
                .await
                .unwrap()
                .into_iter()
                .find(|p| p.group == group)
                .map(|p| p.placement)
        }
    };
    assert_eq!(placement("g", ids[0]).await, None, "no group yet");
    let backend = b.backend().clone();
    let sub = backend
        .join(&topic, "g", "c1", StartPosition::Earliest)
        .await
        .unwrap();
    assert_eq!(placement("g", ids[0]).await, Some(Placement::Unread));
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(backend.read(&sub, 2 - got.len(), ms(100)).await.unwrap());
    }
    assert_eq!(
        placement("g", ids[1]).await,
        Some(Placement::Pending {
            consumer: "c1".into(),
            deliveries: 1
        })
    );
    assert_eq!(placement("g", ids[2]).await, Some(Placement::Unread));
    backend
        .settle(&sub, &[Settlement::Ack(ids[0])])
        .await
        .unwrap();
    assert_eq!(placement("g", ids[0]).await, Some(Placement::Done));
    let due = Timestamp::now().plus(Duration::from_secs(3600));
    let failure = relq::AttemptFailure {
        attempt: 1,
        at: Timestamp::now(),
        consumer: "c1".into(),
        kind: FailureKind::Retryable,
        error: "later".into(),
    };
    backend
        .settle(
            &sub,
            &[Settlement::Retry {
                id: ids[1],
                at: due,
                failure,
            }],
        )
        .await
        .unwrap();
    match placement("g", ids[1]).await {
        // Redis keeps due times in milliseconds, as given.
        Some(Placement::Scheduled {
            due: d,
            deliveries: 1,
        }) => assert_eq!(d, due),
        other => panic!("expected scheduled, got {other:?}"),
    }
    b.stop_message(&topic, ids[1]).await.unwrap();
    assert_eq!(placement("g", ids[1]).await, Some(Placement::Stopped));
    assert!(matches!(
        b.locate("no-such-topic", ids[0]).await,
        Err(Error::NotFound(relq::NotFound::Topic(_)))
    ));
}

/// A consumer that forwards dead letters publishes each one's failure record on
/// `<topic><suffix>` after storing the dead letter, which stays.
pub async fn dead_letters_are_forwarded_to_the_failure_topic(b: Broker) {
    let topic = unique("fwd");
    let failures = format!("{topic}_failed_channel");
    let bad = b
        .consumer(&topic, "billing")
        .handler("order", ok_handler(&Log::default()))
        .forward_dead_letters("/no")
        .build();
    assert!(matches!(bad, Err(Error::Name(_))), "{bad:?}");
    let c = b
        .consumer(&topic, "billing")
        .start(StartPosition::Earliest)
        .forward_dead_letters("_failed_channel")
        .forward_retry(2, ms(10))
        .handler("order", |_m: Message| async move {
            Err(HandlerError::permanent(std::io::Error::other("card declined")).category("payment"))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = b
        .publish(
            &topic,
            NewMessage::new("order", "{\"n\":1}").header("tenant", "acme"),
        )
        .await
        .unwrap();
    wait_until("forwarded", LONG, || async {
        b.browse(&failures, &Browse::oldest())
            .await
            .is_ok_and(|p| !p.is_empty())
    })
    .await;
    c.shutdown(LONG).await;
    let fwd = b.browse(&failures, &Browse::oldest()).await.unwrap();
    assert_eq!(fwd.len(), 1);
    let m = &fwd[0];
    assert_eq!(m.kind, "relq.dead_letter");
    assert_eq!(
        m.header(relq::HEADER_ORIGINAL_ID),
        Some(id.to_string().as_str())
    );
    let record: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(record["version"], 1);
    assert_eq!(record["topic"], topic.as_str());
    assert_eq!(record["group"], "billing");
    assert_eq!(record["reason"], "permanent");
    assert_eq!(record["category"], "payment");
    assert_eq!(record["error_chain"][0], "card declined");
    assert_eq!(record["message"]["id"], id.to_string().as_str());
    assert_eq!(record["message"]["payload"], "{\"n\":1}");
    assert_eq!(record["message"]["headers"]["tenant"], "acme");
    assert_eq!(dead_count(&b, &topic).await, 1, "the dead letter stays");
}

/// Browsing pages through a topic's stored messages in both directions without creating a group
/// or changing anything; a message is found by id; a group reports its oldest pending and oldest
/// unread ids.
pub async fn browse_pages_without_a_group_and_groups_report_their_oldest(b: Broker) {
    let topic = unique("browse");
    let ids = publish_n(&b, &topic, 25).await;
    let page_ids = |page: &[Message]| page.iter().map(|m| m.id).collect::<Vec<_>>();

    // Oldest first, in pages of 10.
    let mut seen = Vec::new();
    let mut q = Browse::oldest().limit(10);
    loop {
        let page = b.browse(&topic, &q).await.unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        q = q.after(last.id);
        seen.extend(page_ids(&page));
    }
    assert_eq!(seen, ids, "every message once, in id order");
    // Newest first, in pages of 7.
    let mut seen = Vec::new();
    let mut q = Browse::newest().limit(7);
    loop {
        let page = b.browse(&topic, &q).await.unwrap();
        let Some(last) = page.last() else { break };
        q = q.before(last.id);
        seen.extend(page_ids(&page));
    }
    let mut reversed = ids.clone();
    reversed.reverse();
    assert_eq!(seen, reversed, "every message once, newest first");
    // A window between two ids, both ends exclusive, from either end.
    let window = Browse::oldest().after(ids[4]).before(ids[9]);
    assert_eq!(
        page_ids(&b.browse(&topic, &window).await.unwrap()),
        ids[5..9]
    );
    let newest = Browse::newest().after(ids[4]).before(ids[9]).limit(2);
    assert_eq!(
        page_ids(&b.browse(&topic, &newest).await.unwrap()),
        vec![ids[8], ids[7]]
    );
    let empty = Browse::oldest().after(ids[9]).before(ids[4]);
    assert!(b.browse(&topic, &empty).await.unwrap().is_empty());
    let m = &b.browse(&topic, &Browse::oldest().limit(1)).await.unwrap()[0];
    assert_eq!(
        (m.kind.as_str(), &m.payload[..], m.attempt),
        ("job", &b"m0"[..], 0)
    );

    // By id.
    for i in [0, 13, 24] {
        let m = b.message(&topic, ids[i]).await.unwrap();
        assert_eq!(
            (m.id, m.payload.clone()),
            (ids[i], bytes::Bytes::from(format!("m{i}")))
        );
    }
    let missing = MessageId::new(ids[24].ms + 1, 0);
    assert!(matches!(
        b.message(&topic, missing).await,
        Err(Error::NotFound(relq::NotFound::Message { .. }))
    ));
    assert!(matches!(
        b.browse("no-such-topic", &Browse::oldest()).await,
        Err(Error::NotFound(relq::NotFound::Topic(_)))
    ));
    let info = b.topic_info(&topic).await.unwrap();
    assert!(info.groups.is_empty(), "browsing creates no group");

    // A group that read 3 of 25: the oldest pending is the first, the oldest unread the fourth.
    let sub = b
        .backend()
        .join(&topic, "g", "c1", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.backend().read(&sub, 3, ms(100)).await.unwrap();
    assert_eq!(got.len(), 3);
    let g = &b.topic_info(&topic).await.unwrap().groups[0];
    assert_eq!(
        (g.oldest_pending, g.oldest_unread),
        (Some(ids[0]), Some(ids[3]))
    );
    b.backend()
        .settle(&sub, &[Settlement::Ack(ids[0])])
        .await
        .unwrap();
    let g = &b.topic_info(&topic).await.unwrap().groups[0];
    assert_eq!(g.oldest_pending, Some(ids[1]));
    let mut rest = Vec::new();
    while rest.len() < 22 {
        rest.extend(b.backend().read(&sub, 22, ms(100)).await.unwrap());
    }
    let mut acks: Vec<Settlement> = rest.iter().map(|d| Settlement::Ack(d.message.id)).collect();
    acks.extend([Settlement::Ack(ids[1]), Settlement::Ack(ids[2])]);
    b.backend().settle(&sub, &acks).await.unwrap();
    let g = &b.topic_info(&topic).await.unwrap().groups[0];
    assert_eq!((g.oldest_pending, g.oldest_unread), (None, None));
}

/// Terminate removes everything, running consumers stop by themselves with the reason, and the
/// topic can be created again.
pub async fn terminate_stops_consumers_and_topic_can_return(b: Broker) {
    let topic = unique("term");
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    publish_n(&b, &topic, 5).await;
    wait_until("processed", LONG, || async { log.len() == 5 }).await;
    assert!(b.terminate(&topic).await.unwrap());
    let reason = tokio::time::timeout(LONG, c.done())
        .await
        .expect("consumer stops by itself");
    assert_eq!(reason, StopReason::TopicTerminated);
    assert!(matches!(
        b.topic_info(&topic).await,
        Err(Error::NotFound(_))
    ));
    assert!(!b.topics().await.unwrap().contains(&topic));
    // Created again: a new consumer works; the old one stays stopped.
    let log2 = Log::default();
    let c2 = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&log2))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    publish_n(&b, &topic, 2).await;
    wait_until("new generation processed", LONG, || async {
        log2.len() == 2
    })
    .await;
    assert_eq!(log.len(), 5);
    assert_eq!(c2.shutdown(LONG).await.abandoned, 0);
    assert_eq!(c.done().await, StopReason::TopicTerminated);
}

/// Earliest, latest and from-id apply when the group is created.
pub async fn start_positions_apply_when_the_group_is_created(b: Broker) {
    let topic = unique("start");
    let old = publish_n(&b, &topic, 3).await;
    let (le, ll, lf) = (Log::default(), Log::default(), Log::default());
    let ce = b
        .consumer(&topic, "earliest")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&le))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let cl = b
        .consumer(&topic, "latest")
        .start(StartPosition::Latest)
        .handler("job", ok_handler(&ll))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let cf = b
        .consumer(&topic, "from")
        .start(StartPosition::From(old[1]))
        .handler("job", ok_handler(&lf))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let new = b
        .publish(&topic, NewMessage::new("job", "new"))
        .await
        .unwrap();
    wait_until("all groups caught up", LONG, || async {
        le.len() == 4 && ll.len() == 1 && lf.len() == 3
    })
    .await;
    tokio::time::sleep(ms(100)).await;
    assert_eq!(ll.all().iter().map(|s| s.id).collect::<Vec<_>>(), [new]);
    assert_eq!(
        lf.all().iter().map(|s| s.id).collect::<BTreeSet<_>>(),
        BTreeSet::from([old[1], old[2], new])
    );
    for c in [ce, cl, cf] {
        c.shutdown(LONG).await;
    }
    // An existing group keeps its position whatever a later consumer asks for.
    let again = Log::default();
    let c = b
        .consumer(&topic, "latest")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&again))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    tokio::time::sleep(ms(300)).await;
    assert_eq!(again.len(), 0);
    c.shutdown(LONG).await;
}

async fn group_stat(
    b: &Broker,
    topic: &str,
    group: &str,
    f: impl Fn(&relq::GroupInfo) -> u64,
) -> Option<u64> {
    let info = b.topic_info(topic).await.unwrap();
    info.groups.iter().find(|g| g.name == group).map(f)
}

/// Groups are created at a start position before any consumer joins; moved back (messages
/// are delivered again, except those the group holds: a stopped one stays parked) and forward
/// (a backlog is skipped), also under a running consumer; and deleted (their consumers stop, a
/// later join creates the group afresh).
pub async fn groups_are_created_moved_and_deleted(b: Broker) {
    use relq::Placement;
    let topic = unique("groups");
    let ids = publish_n(&b, &topic, 5).await;
    assert!(b
        .create_group(&topic, "all", StartPosition::Earliest)
        .await
        .unwrap());
    assert!(
        !b.create_group(&topic, "all", StartPosition::Latest)
            .await
            .unwrap(),
        "the group exists: nothing changes"
    );
    assert!(b
        .create_group(&topic, "late", StartPosition::Latest)
        .await
        .unwrap());
    assert!(b
        .create_group(&topic, "mid", StartPosition::From(ids[3]))
        .await
        .unwrap());
    let lag = |name| group_stat(&b, &topic, name, |g| g.lag);
    assert_eq!(lag("all").await, Some(5));
    assert_eq!(b.topic_info(&topic).await.unwrap().published, 5);
    assert_eq!(lag("late").await, Some(0));
    assert_eq!(lag("mid").await, Some(2));
    let elsewhere = unique("groups-new");
    assert!(b
        .create_group(&elsewhere, "g", StartPosition::Latest)
        .await
        .unwrap());
    assert!(
        b.topics().await.unwrap().contains(&elsewhere),
        "creating a group creates its topic"
    );

    // One message stopped (parked), one failing with a retry an hour away (scheduled).
    b.stop_message(&topic, ids[2]).await.unwrap();
    let log = Log::default();
    let start = || {
        let l = log.clone();
        b.consumer(&topic, "all")
            .concurrency(1)
            .retry(Backoff::fixed(Duration::from_secs(3600)))
            .handler("job", move |m: Message| {
                l.record(&m);
                let fail = m.payload.as_ref() == b"m1";
                async move {
                    match fail {
                        true => Err(HandlerError::retryable(std::io::Error::other("later"))),
                        false => Ok(()),
                    }
                }
            })
            .build()
            .unwrap()
            .start()
    };
    let c = start().await.unwrap();
    wait_until("the unstopped four handled", LONG, || async {
        log.len() == 4
    })
    .await;
    wait_until("the failed one scheduled", LONG, || async {
        group_stat(&b, &topic, "all", |g| g.scheduled).await == Some(1)
    })
    .await;
    c.shutdown(LONG).await;
    let count = |log: &Log, id: MessageId| log.all().iter().filter(|s| s.id == id).count();

    // Back to the start: everything again, except the stopped message, which stays parked.
    assert!(b
        .move_group(&topic, "all", StartPosition::Earliest)
        .await
        .unwrap());
    let c = start().await.unwrap();
    let marker = b
        .publish(&topic, NewMessage::new("job", "marker"))
        .await
        .unwrap();
    wait_until("handled again up to the marker", LONG, || async {
        count(&log, marker) == 1
    })
    .await;
    c.shutdown(LONG).await;
    for i in [0, 3, 4] {
        assert_eq!(count(&log, ids[i]), 2, "message {i} is delivered again");
    }
    assert_eq!(
        count(&log, ids[1]),
        1,
        "the scheduled message waits for its retry"
    );
    assert_eq!(
        count(&log, ids[2]),
        0,
        "the stopped message is not delivered"
    );
    let placed = b.locate(&topic, ids[2]).await.unwrap();
    let all = placed.iter().find(|p| p.group == "all").unwrap();
    assert_eq!(all.placement, Placement::Stopped);
    let placed = b.locate(&topic, ids[1]).await.unwrap();
    let all = placed.iter().find(|p| p.group == "all").unwrap();
    assert!(
        matches!(all.placement, Placement::Scheduled { deliveries: 1, .. }),
        "{:?}",
        all.placement
    );

    // Forward past a backlog: it is skipped.
    let backlog = publish_n(&b, &topic, 3).await;
    assert_eq!(lag("all").await, Some(3));
    assert!(b
        .move_group(&topic, "all", StartPosition::Latest)
        .await
        .unwrap());
    assert_eq!(lag("all").await, Some(0));
    let before = log.len();
    let c = start().await.unwrap();
    let after = b
        .publish(&topic, NewMessage::new("job", "after"))
        .await
        .unwrap();
    wait_until("the message after the move handled", LONG, || async {
        count(&log, after) == 1
    })
    .await;
    assert_eq!(
        log.len(),
        before + 1,
        "the skipped backlog is not delivered"
    );

    // Back to a given id under the running consumer: it goes on from there. A publish right
    // after the move serves a read that blocked before it (on Redis that read must still pass
    // over what the group holds).
    assert!(b
        .move_group(&topic, "all", StartPosition::From(backlog[1]))
        .await
        .unwrap());
    let wake = b
        .publish(&topic, NewMessage::new("job", "wake"))
        .await
        .unwrap();
    wait_until("delivered again from the id", LONG, || async {
        count(&log, after) == 2 && count(&log, wake) == 1
    })
    .await;
    assert_eq!(count(&log, backlog[0]), 0);
    assert_eq!(count(&log, backlog[1]), 1);
    assert_eq!(count(&log, backlog[2]), 1);

    assert!(!b
        .move_group(&topic, "none", StartPosition::Latest)
        .await
        .unwrap());
    assert!(!b
        .move_group("no-such-topic", "all", StartPosition::Latest)
        .await
        .unwrap());
    assert!(!b.delete_group(&topic, "none").await.unwrap());
    assert!(!b.delete_group("no-such-topic", "all").await.unwrap());

    // Deleted under its running consumer: the consumer stops; the other groups stay.
    assert!(b.delete_group(&topic, "all").await.unwrap());
    let reason = tokio::time::timeout(LONG, c.done())
        .await
        .expect("the consumer stops by itself");
    assert_eq!(reason, StopReason::GroupDeleted);
    let names: Vec<String> = b
        .topic_info(&topic)
        .await
        .unwrap()
        .groups
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["late", "mid"]);
    assert!(
        !b.delete_group(&topic, "all").await.unwrap(),
        "deleted already"
    );
    // A later join creates it afresh, at its start position.
    let fresh = Log::default();
    let c = b
        .consumer(&topic, "all")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&fresh))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // 11 stored, one of them stopped.
    wait_until("the new group handles the topic", LONG, || async {
        fresh.len() == 10
    })
    .await;
    c.shutdown(LONG).await;
}

/// A cleanup, after a dry run of it: the dry run changes nothing and reports what the cleanup
/// then does.
async fn cleaned(b: &Broker, topic: &str, retention: &Retention) -> relq::CleanupReport {
    let length = b.topic_info(topic).await.unwrap().length;
    let preview = b
        .cleanup(topic, &retention.clone().dry_run(true))
        .await
        .unwrap();
    assert_eq!(
        b.topic_info(topic).await.unwrap().length,
        length,
        "a dry run changes nothing"
    );
    let report = b.cleanup(topic, retention).await.unwrap();
    assert_eq!(preview, report, "the dry run tells what the cleanup does");
    report
}

/// Cleanup removes only what every group acknowledged (unless max-length says otherwise).
pub async fn cleanup_never_removes_unacknowledged_messages(b: Broker) {
    let topic = unique("cleanup");
    let backend = b.backend().clone();
    let _lagging = backend
        .join(&topic, "lagging", "idle", StartPosition::Earliest)
        .await
        .unwrap();
    let log = Log::default();
    let c = b
        .consumer(&topic, "fast")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    publish_n(&b, &topic, 10).await;
    wait_until("fast processed", LONG, || async { log.len() == 10 }).await;
    wait_until("fast settled", LONG, || async {
        b.topic_info(&topic)
            .await
            .unwrap()
            .groups
            .iter()
            .any(|g| g.name == "fast" && g.pending == 0)
    })
    .await;
    let keep = Retention::default().min_age(Duration::ZERO).batch(3);
    let r = cleaned(&b, &topic, &keep).await;
    assert_eq!(r.removed, 0, "the lagging group has not read them");
    assert_eq!(b.topic_info(&topic).await.unwrap().length, 10);
    // The lagging group catches up.
    let log2 = Log::default();
    let c2 = b
        .consumer(&topic, "lagging")
        .name("idle")
        .handler("job", ok_handler(&log2))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("lagging processed", LONG, || async { log2.len() == 10 }).await;
    wait_until("lagging settled", LONG, || async {
        b.topic_info(&topic)
            .await
            .unwrap()
            .groups
            .iter()
            .all(|g| g.pending == 0)
    })
    .await;
    let young = cleaned(
        &b,
        &topic,
        &Retention::default().min_age(Duration::from_secs(3600)),
    )
    .await;
    assert_eq!(young.removed, 0, "min_age keeps young messages");
    let r = cleaned(&b, &topic, &keep).await;
    assert_eq!(r.removed, 10);
    let info = b.topic_info(&topic).await.unwrap();
    assert_eq!(info.length, 0);
    assert_eq!(
        info.published, 10,
        "retention does not lower the publish counter"
    );
    c.shutdown(LONG).await;
    c2.shutdown(LONG).await;
    // A max-length policy trims unacknowledged messages, and says so.
    publish_n(&b, &topic, 6).await;
    let r = cleaned(
        &b,
        &topic,
        &Retention::default().min_age(Duration::ZERO).max_len(2),
    )
    .await;
    assert_eq!(r.trimmed_unacknowledged, 4);
    assert_eq!(b.topic_info(&topic).await.unwrap().length, 2);
}

/// One failing message in a batch fails alone.
pub async fn batch_handler_partial_failure_fails_only_the_bad_message(b: Broker) {
    let topic = unique("batch");
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let log = Log::default();
    let (s, l) = (sizes.clone(), log.clone());
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .concurrency(16)
        .retry(Backoff::fixed(ms(10)).max_attempts(1))
        .batch_handler(
            "email",
            BatchConfig::default()
                .size(5)
                .timeout(ms(200))
                .max_wait(ms(1000)),
            move |msgs: Vec<Message>| {
                s.lock().unwrap().push(msgs.len());
                let out = msgs
                    .iter()
                    .map(|m| {
                        l.record(m);
                        if &m.payload[..] == b"m2" {
                            Err(HandlerError::permanent("bad address"))
                        } else {
                            Ok(())
                        }
                    })
                    .collect();
                async move { out }
            },
        )
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let msgs = (0..5)
        .map(|i| NewMessage::new("email", format!("m{i}")))
        .collect();
    b.publish_batch(&topic, msgs).await.unwrap();
    b.publish(&topic, NewMessage::new("job", "single"))
        .await
        .unwrap();
    wait_until("all settled", LONG, || async {
        let s = c.stats();
        s.processed == 5 && s.dead_lettered == 1
    })
    .await;
    assert_eq!(*sizes.lock().unwrap(), [5], "one batch of five");
    // The consumer counts a dead letter when it hands it to the settler; it is stored once the
    // backend commits it.
    wait_until("dead letter stored", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let dl = b
        .dead_letters(&topic)
        .list(&DeadLetterQuery::all())
        .await
        .unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(&dl[0].message.payload[..], b"m2");
    // A partial batch runs after the timeout.
    b.publish_batch(
        &topic,
        vec![
            NewMessage::new("email", "late1"),
            NewMessage::new("email", "late2"),
        ],
    )
    .await
    .unwrap();
    wait_until("partial batch ran", LONG, || async {
        c.stats().processed == 7
    })
    .await;
    assert_eq!(*sizes.lock().unwrap(), [5, 2]);
    c.shutdown(LONG).await;
}

/// Shutdown lets handlers finish until the deadline; what is cut off stays pending and is
/// delivered again.
pub async fn shutdown_during_a_handler_leaves_the_message_pending(b: Broker) {
    let topic = unique("shutdown");
    let started = Log::default();
    let quick = Log::default();
    let s = started.clone();
    let c = b
        .consumer(&topic, "g")
        .name("w")
        .start(StartPosition::Earliest)
        .handler_timeout(Duration::from_secs(30))
        .claim_after(Duration::from_secs(3600))
        .handler("slow", move |m: Message| {
            s.record(&m);
            async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                Ok(())
            }
        })
        .handler("job", {
            let q = quick.clone();
            move |m: Message| {
                q.record(&m);
                async {
                    tokio::time::sleep(ms(50)).await;
                    Ok(())
                }
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    b.publish(&topic, NewMessage::new("slow", "s"))
        .await
        .unwrap();
    b.publish(&topic, NewMessage::new("job", "quick"))
        .await
        .unwrap();
    // Both are running before the shutdown starts (the quick one may otherwise still be unread,
    // and would rightly come back after the restart).
    wait_until("both handlers started", LONG, || async {
        started.len() == 1 && quick.len() == 1
    })
    .await;
    let report = c.shutdown(ms(500)).await;
    assert_eq!(
        report.abandoned, 1,
        "the slow handler was cut off, the quick one finished"
    );
    let g = b.topic_info(&topic).await.unwrap().groups.remove(0);
    assert_eq!(g.pending, 1, "the cut-off message is still pending");
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .name("w")
        .handler("slow", ok_handler(&log))
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("redelivered after restart", LONG, || async {
        log.len() >= 1
    })
    .await;
    tokio::time::sleep(ms(200)).await;
    let seen: Vec<(String, u32)> = log
        .all()
        .iter()
        .map(|s| (s.payload.clone(), s.attempt))
        .collect();
    assert_eq!(
        seen.len(),
        1,
        "only the cut-off message comes back: {seen:?}"
    );
    assert_eq!(log.all()[0].attempt, 2);
    assert_eq!(log.all()[0].payload, "s");
    c.shutdown(LONG).await;
}

/// A panic is caught, counted as a failure, retried, then dead-lettered with reason panic.
pub async fn panicking_handler_is_retried_then_dead_lettered(b: Broker) {
    let topic = unique("panic");
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .retry(Backoff::fixed(ms(20)).max_attempts(2))
        .handler("job", |m: Message| async move {
            if !m.payload.is_empty() {
                panic!("corrupt state for {}", m.id);
            }
            Ok(())
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = b
        .publish(&topic, NewMessage::new("job", "x"))
        .await
        .unwrap();
    b.publish(&topic, NewMessage::new("job", "")).await.unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let dl = b
        .dead_letters(&topic)
        .list(&DeadLetterQuery::all())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(dl.reason, FailureKind::Panic);
    assert_eq!(dl.attempts, 2);
    assert!(
        dl.error_chain[0].contains(&format!("corrupt state for {id}")),
        "{:?}",
        dl.error_chain
    );
    wait_until("the other message processed", LONG, || async {
        c.stats().processed == 1
    })
    .await;
    assert!(!c.is_stopped(), "a panic does not stop the consumer");
    c.shutdown(LONG).await;
}

/// A handler that hangs is cut off at the timeout and fails with reason timeout.
pub async fn hanging_handler_times_out(b: Broker) {
    let topic = unique("hang");
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler_timeout(ms(300))
        .claim_after(Duration::from_secs(10))
        .retry(Backoff::fixed(ms(10)).max_attempts(2))
        .handler("job", |_m: Message| async {
            std::future::pending::<()>().await;
            Ok(())
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    b.publish(&topic, NewMessage::new("job", "x"))
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let dl = b
        .dead_letters(&topic)
        .list(&DeadLetterQuery::all())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(dl.reason, FailureKind::Timeout);
    assert_eq!(
        dl.failures.iter().map(|f| f.kind).collect::<Vec<_>>(),
        [FailureKind::Timeout; 2]
    );
    assert_eq!(c.stats().in_flight, 0);
    c.shutdown(LONG).await;
}

/// A delayed publish is delivered at or after its time, not before.
pub async fn delayed_publish_is_not_delivered_early(b: Broker) {
    let topic = unique("delay");
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = Timestamp::now();
    b.publish(&topic, NewMessage::new("job", "later").delay(ms(1500)))
        .await
        .unwrap();
    b.publish(&topic, NewMessage::new("job", "now"))
        .await
        .unwrap();
    wait_until("both delivered", LONG, || async { log.len() == 2 }).await;
    let seen = log.all();
    assert_eq!(seen[0].payload, "now");
    assert_eq!(seen[1].payload, "later");
    assert!(
        seen[1].at.since(t0) >= ms(1500),
        "delivered after {:?}",
        seen[1].at.since(t0)
    );
    assert_eq!(seen[1].attempt, 1, "waiting for a delay is not an attempt");
    c.shutdown(LONG).await;
}

/// A message of a type nobody handles is dead-lettered, not dropped.
pub async fn message_without_handler_is_dead_lettered(b: Broker) {
    let topic = unique("nohandler");
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    b.publish(&topic, NewMessage::new("mystery", "?"))
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let dl = b
        .dead_letters(&topic)
        .list(&DeadLetterQuery::all())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(dl.reason, FailureKind::NoHandler);
    assert!(dl.error_chain[0].contains("mystery"));
    c.shutdown(LONG).await;
    // With a fallback, it is handled.
    let fb = Log::default();
    let c = b
        .consumer(&topic, "g2")
        .start(StartPosition::Earliest)
        .fallback(ok_handler(&fb))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("fallback ran", LONG, || async { fb.len() == 1 }).await;
    c.shutdown(LONG).await;
}

/// Bad names, payloads, headers and configuration are clear errors; nothing is published.
/// A message at every header limit (the most headers, the longest names and values) is stored
/// and delivered byte for byte.
pub async fn headers_at_their_limits_round_trip(b: Broker) {
    let topic = unique("hdr");
    let mut m = NewMessage::new("job", "x");
    let mut want = BTreeMap::new();
    for i in 0..relq::MAX_HEADERS {
        let name = format!("{i:03}{}", "n".repeat(relq::MAX_HEADER_NAME_LEN - 3));
        let prefix = format!("{i}é");
        let value = format!(
            "{prefix}{}",
            "v".repeat(relq::MAX_HEADER_VALUE_LEN - prefix.len())
        );
        m = m.header(name.clone(), value.clone());
        want.insert(name, value);
    }
    b.publish(&topic, m).await.unwrap();
    let got: Arc<Mutex<Vec<Message>>> = Arc::default();
    let g = got.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", move |m: Message| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(m);
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("delivered", LONG, || async {
        !got.lock().unwrap().is_empty()
    })
    .await;
    c.shutdown(LONG).await;
    let m = got.lock().unwrap()[0].clone();
    assert_eq!(m.headers, want);
}

pub async fn bad_input_is_rejected_and_nothing_is_published(b: Broker) {
    let topic = unique("bad");
    let b = b.with_max_payload(1024);
    assert!(matches!(
        b.publish("bad topic", NewMessage::new("job", "x")).await,
        Err(Error::Name(_))
    ));
    assert!(matches!(
        b.publish(&topic, NewMessage::new("", "x")).await,
        Err(Error::Name(_))
    ));
    let big = NewMessage::new("job", vec![0u8; 1025]);
    assert!(matches!(
        b.publish(&topic, big).await,
        Err(Error::PayloadTooLarge {
            size: 1025,
            max: 1024
        })
    ));
    let reserved = NewMessage::new("job", "x").header("relq-replay-of", "1-0");
    assert!(matches!(
        b.publish(&topic, reserved).await,
        Err(Error::ReservedHeader(_))
    ));
    // Every header limit: count, empty, long or control-character names, long values.
    let many = (0..=relq::MAX_HEADERS).fold(NewMessage::new("job", "x"), |m, i| {
        m.header(format!("h{i}"), "v")
    });
    let oversize = [
        many,
        NewMessage::new("job", "x").header("", "v"),
        NewMessage::new("job", "x").header("k".repeat(relq::MAX_HEADER_NAME_LEN + 1), "v"),
        NewMessage::new("job", "x").header("k".repeat(70_000), "v"),
        NewMessage::new("job", "x").header("a\nb", "v"),
        NewMessage::new("job", "x").header("k", "v".repeat(relq::MAX_HEADER_VALUE_LEN + 1)),
    ];
    for m in oversize {
        match b.publish(&topic, m).await {
            Err(Error::InvalidHeader { name, reason }) => {
                assert!(name.len() < 200 && !reason.is_empty(), "{name} {reason}");
            }
            other => panic!("expected an invalid-header error, got {other:?}"),
        }
    }
    // A batch with one bad message publishes nothing.
    let batch = vec![
        NewMessage::new("job", "ok"),
        NewMessage::new("job", vec![0u8; 2000]),
    ];
    assert!(b.publish_batch(&topic, batch).await.is_err());
    assert!(matches!(
        b.topic_info(&topic).await,
        Err(Error::NotFound(_))
    ));
    let h = |_m: Message| async { Ok(()) };
    let bh = |msgs: Vec<Message>| async move { msgs.iter().map(|_| Ok(())).collect() };
    let cfg = |r: Result<relq::Consumer, Error>| match r {
        Err(Error::Config(e)) => e.to_string(),
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error"),
    };
    assert!(cfg(b
        .consumer(&topic, "g")
        .concurrency(0)
        .handler("job", h)
        .build())
    .contains("concurrency"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .handler_timeout(ms(100))
        .claim_after(ms(100))
        .handler("job", h)
        .build())
    .contains("claim_after"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .retry(Backoff::default().max_attempts(0))
        .handler("job", h)
        .build())
    .contains("max_attempts"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .concurrency(4)
        .batch_handler("job", BatchConfig::default().size(10), bh,)
        .build())
    .contains("exceeds the concurrency"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .handler_timeout(ms(500))
        .claim_after(ms(1000))
        .batch_handler(
            "job",
            BatchConfig::default()
                .size(2)
                .timeout(ms(100))
                .max_wait(ms(600)),
            bh,
        )
        .build())
    .contains("max_wait"));
    assert!(cfg(b.consumer(&topic, "g").build()).contains("handler"));
    assert!(matches!(
        b.consumer(&topic, "bad group").handler("job", h).build(),
        Err(Error::Name(_))
    ));
}

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
