//! Per-key ordering (seed 004's 消息顺序): within a group, the messages of one ordering key run
//! one at a time in publish order, across consumers, through retries, dead letters and a dead
//! consumer's claim; different keys run in parallel.

use std::collections::HashMap;

use relq::KeyRetries;

use super::*;

fn keyed(key: &str, n: usize) -> NewMessage {
    NewMessage::new("job", format!("{key}:{n}")).ordering_key(key)
}

/// The handled sequence of each key, from payloads `key:n`.
fn per_key(seen: &[Seen]) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for s in seen {
        let (k, n) = s.payload.split_once(':').expect("key:n");
        out.entry(k.to_owned())
            .or_default()
            .push(n.parse().expect("n"));
    }
    out
}

/// Tracks which keys are being handled: a second message of a key starting while one runs is a
/// violation; the most keys running at once shows they ran in parallel.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<RunningKeys>>);

#[derive(Default)]
struct RunningKeys {
    /// Key -> messages of it running now.
    now: HashMap<String, usize>,
    most_at_once: usize,
    violations: Vec<String>,
}

impl Running {
    fn enter(&self, key: &str) {
        let mut g = self.0.lock().unwrap();
        let n = g.now.entry(key.to_owned()).or_default();
        *n += 1;
        if *n > 1 {
            g.violations
                .push(format!("two messages of key {key} ran at once"));
        }
        let busy = g.now.values().filter(|n| **n > 0).count();
        g.most_at_once = g.most_at_once.max(busy);
    }
    fn leave(&self, key: &str) {
        *self.0.lock().unwrap().now.get_mut(key).expect("entered") -= 1;
    }
    fn violations(&self) -> Vec<String> {
        self.0.lock().unwrap().violations.clone()
    }
    fn most_at_once(&self) -> usize {
        self.0.lock().unwrap().most_at_once
    }
}

/// 8 keys of 12 messages each, published interleaved, handled by two consumers of 8 slots each
/// whose handlers take a moment: each key's messages run one at a time in publish order, each
/// once, while several keys run at once.
pub async fn messages_of_one_key_run_one_at_a_time_in_publish_order(b: Broker) {
    let topic = unique("order");
    let mut batch = Vec::new();
    for n in 0..12 {
        for k in 0..8 {
            batch.push(keyed(&format!("k{k}"), n));
        }
    }
    b.publish_batch(&topic, batch).await.unwrap();
    let log = Log::default();
    let running = Running::default();
    let start = |name: &str| {
        let (log, running) = (log.clone(), running.clone());
        b.consumer(&topic, "g")
            .name(name)
            .start(StartPosition::Earliest)
            .concurrency(8)
            .handler("job", move |m: Message| {
                let (log, running) = (log.clone(), running.clone());
                async move {
                    let key = m.ordering_key().expect("keyed").to_owned();
                    running.enter(&key);
                    log.record(&m);
                    tokio::time::sleep(ms(5)).await;
                    running.leave(&key);
                    Ok::<(), HandlerError>(())
                }
            })
            .build()
            .unwrap()
            .start()
    };
    let c1 = start("c1").await.unwrap();
    let c2 = start("c2").await.unwrap();
    wait_until("96 handled", LONG, || async { log.len() >= 96 }).await;
    c1.shutdown(LONG).await;
    c2.shutdown(LONG).await;
    assert_eq!(running.violations(), Vec::<String>::new());
    let order = per_key(&log.all());
    assert_eq!(order.len(), 8);
    for (k, seq) in &order {
        assert_eq!(seq, &(0..12).collect::<Vec<_>>(), "key {k}");
    }
    assert!(
        running.most_at_once() > 1,
        "different keys ran in parallel (at most {} at once)",
        running.most_at_once()
    );
    let info = b.topic_info(&topic).await.unwrap();
    assert_eq!((info.groups[0].pending, info.groups[0].blocked), (0, 0));
}

/// A failing message holds its key: the key's later messages wait (shown as blocked) until it
/// succeeds on its third attempt, while another key goes on.
pub async fn a_failing_message_holds_its_key_until_it_succeeds(b: Broker) {
    let topic = unique("order-retry");
    b.publish_batch(
        &topic,
        vec![keyed("a", 0), keyed("a", 1), keyed("b", 0), keyed("a", 2)],
    )
    .await
    .unwrap();
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .concurrency(4)
        .retry(Backoff::fixed(ms(300)).max_attempts(5))
        .handler("job", move |m: Message| {
            l.record(&m);
            let fail = m.payload.as_ref() == b"a:0" && m.attempt < 3;
            async move {
                match fail {
                    true => Err(HandlerError::retryable(std::io::Error::other("not yet"))),
                    false => Ok(()),
                }
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("a:1 and a:2 blocked behind a:0", LONG, || async {
        b.topic_info(&topic).await.unwrap().groups[0].blocked == 2
    })
    .await;
    wait_until("all handled", LONG, || async { log.len() >= 6 }).await;
    c.shutdown(LONG).await;
    let seen = log.all();
    let a: Vec<(String, u32)> = seen
        .iter()
        .filter(|s| s.payload.starts_with("a:"))
        .map(|s| (s.payload.clone(), s.attempt))
        .collect();
    assert_eq!(
        a,
        [
            ("a:0".into(), 1),
            ("a:0".into(), 2),
            ("a:0".into(), 3),
            ("a:1".into(), 1),
            ("a:2".into(), 1)
        ]
    );
    let b0 = seen.iter().position(|s| s.payload == "b:0").unwrap();
    let a0_last = seen.iter().rposition(|s| s.payload == "a:0").unwrap();
    assert!(b0 < a0_last, "key b did not wait for key a");
    assert_eq!(seen.len(), 6);
}

/// A message that becomes a dead letter lets its key go on; where each message stands is
/// visible meanwhile (`Placement::Blocked` for one waiting behind its key).
pub async fn a_dead_letter_lets_the_key_go_on(b: Broker) {
    let topic = unique("order-dead");
    let ids = b
        .publish_batch(&topic, vec![keyed("a", 0), keyed("a", 1)])
        .await
        .unwrap();
    let log = Log::default();
    let l = log.clone();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .concurrency(4)
        .handler("job", move |m: Message| {
            l.record(&m);
            let g = g.clone();
            async move {
                if m.payload.as_ref() == b"a:0" {
                    let _ = g.acquire().await;
                    return Err(HandlerError::permanent(std::io::Error::other("bad")));
                }
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("a:0 running", LONG, || async { log.len() == 1 }).await;
    let placements = b.locate(&topic, ids[1]).await.unwrap();
    assert_eq!(placements[0].placement, relq::Placement::Blocked);
    gate.add_permits(1);
    wait_until("a:1 handled", LONG, || async { log.len() == 2 }).await;
    c.shutdown(LONG).await;
    assert_eq!(dead_count(&b, &topic).await, 1);
    assert_eq!(log.all()[1].payload, "a:1");
}

/// With `KeyRetries::SkipAhead`, a failed message lets the key's next one run while it waits
/// for its retry.
pub async fn skip_ahead_lets_the_next_message_pass_a_retry(b: Broker) {
    let topic = unique("order-skip");
    b.publish_batch(&topic, vec![keyed("a", 0), keyed("a", 1)])
        .await
        .unwrap();
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .key_retries(KeyRetries::SkipAhead)
        .retry(Backoff::fixed(ms(500)).max_attempts(3))
        .handler("job", move |m: Message| {
            l.record(&m);
            let fail = m.payload.as_ref() == b"a:0" && m.attempt == 1;
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
        .await
        .unwrap();
    wait_until("3 runs", LONG, || async { log.len() >= 3 }).await;
    c.shutdown(LONG).await;
    let runs: Vec<(String, u32)> = log
        .all()
        .into_iter()
        .map(|s| (s.payload, s.attempt))
        .collect();
    assert_eq!(
        runs,
        [("a:0".into(), 1), ("a:1".into(), 1), ("a:0".into(), 2)]
    );
}

/// A consumer that dies holding a key's first message blocks the key until another consumer
/// claims that message: the claim runs it first, then the key's later messages, in order.
pub async fn a_dead_consumers_key_passes_on_in_order_after_the_claim(b: Broker) {
    let topic = unique("order-claim");
    let backend = b.backend().clone();
    let dead = backend
        .join(&topic, "g", "dead", StartPosition::Earliest)
        .await
        .unwrap();
    b.publish_batch(&topic, vec![keyed("a", 0), keyed("a", 1), keyed("a", 2)])
        .await
        .unwrap();
    let got = backend.read(&dead, 10, ms(200)).await.unwrap();
    let taken: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
        .collect();
    assert_eq!(taken, ["a:0"], "one message of a key at a time");
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .name("alive")
        .claim_after(ms(1000))
        .handler_timeout(ms(300))
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("3 handled", LONG, || async { log.len() >= 3 }).await;
    c.shutdown(LONG).await;
    let runs: Vec<(String, u32)> = log
        .all()
        .into_iter()
        .map(|s| (s.payload, s.attempt))
        .collect();
    assert_eq!(
        runs,
        [("a:0".into(), 2), ("a:1".into(), 1), ("a:2".into(), 1)]
    );
}

/// Messages without a key, and with an empty key, are not ordered: they run at once beside a
/// key held by a failing message. An invalid key is refused at publish.
pub async fn unkeyed_messages_are_not_held_and_bad_keys_are_refused(b: Broker) {
    let topic = unique("order-free");
    for bad in [String::new(), "a\nb".into(), "k".repeat(513)] {
        let e = b
            .publish(&topic, NewMessage::new("job", "x").ordering_key(bad))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidHeader { .. }), "{e}");
    }
    b.publish_batch(
        &topic,
        vec![
            keyed("a", 0),
            NewMessage::new("job", "free:0"),
            NewMessage::new("job", "free:1"),
        ],
    )
    .await
    .unwrap();
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .concurrency(1)
        .retry(Backoff::fixed(ms(2000)).max_attempts(2))
        .handler("job", move |m: Message| {
            l.record(&m);
            let fail = m.payload.as_ref() == b"a:0" && m.attempt == 1;
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
        .await
        .unwrap();
    wait_until("4 runs", LONG, || async { log.len() >= 4 }).await;
    c.shutdown(LONG).await;
    let runs: Vec<String> = log.all().into_iter().map(|s| s.payload).collect();
    assert_eq!(runs, ["a:0", "free:0", "free:1", "a:0"]);
}

/// Two groups of one topic, consumed in one process, each keep every key's order and finish:
/// an ack in one group passes the key on in that group only.
pub async fn two_groups_keep_key_order_independently(b: Broker) {
    let topic = unique("order-groups");
    let mut batch = Vec::new();
    for n in 0..10 {
        for k in 0..3 {
            batch.push(keyed(&format!("k{k}"), n));
        }
    }
    b.publish_batch(&topic, batch).await.unwrap();
    let logs = [Log::default(), Log::default()];
    let mut handles = Vec::new();
    for (g, log) in ["g1", "g2"].into_iter().zip(&logs) {
        handles.push(
            b.consumer(&topic, g)
                .start(StartPosition::Earliest)
                .concurrency(4)
                .handler("job", ok_handler(log))
                .build()
                .unwrap()
                .start()
                .await
                .unwrap(),
        );
    }
    wait_until("both groups handled 30", LONG, || async {
        logs.iter().all(|l| l.len() >= 30)
    })
    .await;
    for h in handles {
        h.shutdown(LONG).await;
    }
    for log in &logs {
        for (k, seq) in per_key(&log.all()) {
            assert_eq!(seq, (0..10).collect::<Vec<_>>(), "key {k}");
        }
    }
    wait_until("nothing pending or blocked", LONG, || async {
        let info = b.topic_info(&topic).await.unwrap();
        info.groups.iter().all(|g| g.pending == 0 && g.blocked == 0)
    })
    .await;
}

/// A replayed dead letter keeps its ordering key: it waits behind the key's message in flight.
pub async fn a_replayed_dead_letter_keeps_its_key(b: Broker) {
    let topic = unique("order-replay");
    b.publish(&topic, keyed("a", 0)).await.unwrap();
    let log = Log::default();
    let l = log.clone();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .concurrency(4)
        .handler("job", move |m: Message| {
            l.record(&m);
            let g = g.clone();
            async move {
                match (m.payload.as_ref(), m.header(relq::HEADER_REPLAY_OF)) {
                    (b"a:0", None) => Err(HandlerError::permanent(std::io::Error::other("bad"))),
                    (b"a:1", _) => {
                        let _ = g.acquire().await;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    b.publish(&topic, keyed("a", 1)).await.unwrap();
    wait_until("a:1 running", LONG, || async { log.len() == 2 }).await;
    let dl = first_dead_letter(&b, &topic).await;
    b.dead_letters(&topic).replay(&[dl.id]).await.unwrap();
    wait_until("the replay blocked behind a:1", LONG, || async {
        b.topic_info(&topic).await.unwrap().groups[0].blocked == 1
    })
    .await;
    assert_eq!(log.len(), 2);
    gate.add_permits(1);
    wait_until("the replay handled", LONG, || async { log.len() == 3 }).await;
    c.shutdown(LONG).await;
    assert_eq!(log.all()[2].payload, "a:0");
}
