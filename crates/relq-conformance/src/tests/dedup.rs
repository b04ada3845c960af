//! Deduplication (seed 004's 消息去重, like JetStream's `Nats-Msg-Id`): a publish whose
//! idempotency key the topic stored within its window stores nothing and returns the first
//! message's id; concurrent publishers of one key store it once; the window ends; a terminated
//! topic forgets its keys; an invalid key is refused before anything is stored.

use relq::HEADER_IDEMPOTENCY_KEY;

use super::*;

fn keyed(key: &str, payload: &str) -> NewMessage {
    NewMessage::new("job", payload.to_owned()).idempotency_key(key)
}

/// Every stored message of `topic`, oldest first.
async fn stored(b: &Broker, topic: &str) -> Vec<Message> {
    b.browse(topic, &Browse::oldest().limit(1000))
        .await
        .expect("browse")
}

/// Repeats within the window, alone and in batches (with the key twice in one batch), return
/// the first id and store nothing; the first payload is the one kept; handlers see each stored
/// message once, with its key in the header.
pub async fn a_repeated_idempotency_key_returns_the_first_id_and_stores_nothing(b: Broker) {
    let topic = unique("dedup");
    let b = b
        .with_topic_dedup_window(&topic, Duration::from_secs(600))
        .unwrap();
    let a = b.publish(&topic, keyed("order-1", "first")).await.unwrap();
    let again = b.publish(&topic, keyed("order-1", "second")).await.unwrap();
    assert_eq!(again, a, "a repeat returns the first id");
    let other = b.publish(&topic, keyed("order-2", "other")).await.unwrap();
    assert_ne!(other, a);
    let ids = b
        .publish_batch(
            &topic,
            vec![
                keyed("order-3", "three"),
                keyed("order-3", "three again"),
                NewMessage::new("job", "unkeyed"),
                keyed("order-1", "third"),
                NewMessage::new("job", "unkeyed"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[0], ids[1], "a key twice in one batch is stored once");
    assert_ne!(ids[2], ids[4], "unkeyed messages are each stored");
    assert_eq!(ids[3], a);
    let all = stored(&b, &topic).await;
    let payloads: Vec<String> = all
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        ["first", "other", "three", "unkeyed", "unkeyed"],
        "only first publishes are stored"
    );
    assert_eq!(
        all.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![a, other, ids[0], ids[2], ids[4]]
    );
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
    wait_until("five messages handled", LONG, || async { log.len() >= 5 }).await;
    c.shutdown(LONG).await;
    let seen = log.all();
    assert_eq!(seen.len(), 5, "each stored message is handled once");
    assert_eq!(
        seen.iter()
            .filter_map(|s| s.headers.get(HEADER_IDEMPOTENCY_KEY).cloned())
            .collect::<BTreeSet<_>>(),
        ["order-1", "order-2", "order-3"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

/// Publishers racing with one key store one message and all get its id.
pub async fn concurrent_publishes_of_one_key_store_it_once(b: Broker) {
    let topic = unique("dedup-race");
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let b = b.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                b.publish(&topic, keyed("payment-7", &format!("try {i}")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "every publisher got the same id: {ids:?}");
    let all = stored(&b, &topic).await;
    assert_eq!(all.len(), 1);
    assert_eq!(Some(&all[0].id), ids.first());
}

/// Once a key's window has ended, a publish with it is stored again (and the new message
/// starts a window of its own).
pub async fn a_key_is_stored_again_once_its_window_ended(b: Broker) {
    let topic = unique("dedup-window");
    let window = Duration::from_millis(300);
    let b = b.with_topic_dedup_window(&topic, window).unwrap();
    // Backends read time as `Timestamp::now` (the paused test clock moves it).
    let started = Timestamp::now();
    let elapsed = || Duration::from_millis(Timestamp::now().0.saturating_sub(started.0));
    let first = b.publish(&topic, keyed("k", "one")).await.unwrap();
    let repeat = b.publish(&topic, keyed("k", "two")).await.unwrap();
    if elapsed() < window {
        assert_eq!(repeat, first, "a repeat within the window is not stored");
    }
    let second = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let id = b.publish(&topic, keyed("k", "three")).await.unwrap();
        if id != first {
            // The publish read the time after `started` plus the window, and `elapsed` after it.
            let after = elapsed();
            // Redis reads its own clock, in whole milliseconds: a little slack.
            assert!(
                after + ms(5) >= window,
                "stored again {after:?} after the first, within its window"
            );
            break id;
        }
        assert!(
            elapsed() < Duration::from_secs(30),
            "the key was still remembered 30 s after a window of {window:?}"
        );
    };
    assert_eq!(
        b.publish(&topic, keyed("k", "four")).await.unwrap(),
        second,
        "the new message has a window of its own"
    );
    let payloads: Vec<String> = stored(&b, &topic)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(payloads.first().map(String::as_str), Some("one"));
    assert_eq!(payloads.len(), 2, "{payloads:?}");
}

/// A terminated topic forgets its keys: the key is stored in the new topic.
pub async fn a_terminated_topic_forgets_its_keys(b: Broker) {
    let topic = unique("dedup-term");
    b.publish(&topic, keyed("k", "old")).await.unwrap();
    assert!(b.terminate(&topic).await.unwrap());
    let id = b.publish(&topic, keyed("k", "new")).await.unwrap();
    let all = stored(&b, &topic).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, id);
    assert_eq!(&all[0].payload[..], b"new");
}

/// An empty, oversize or control-character key is refused, and nothing of the batch is
/// stored; a valid key of the largest size is taken.
pub async fn an_invalid_idempotency_key_is_refused(b: Broker) {
    let topic = unique("dedup-bad");
    for key in [String::new(), "k".repeat(513), "a\nb".to_owned()] {
        let err = b
            .publish_batch(
                &topic,
                vec![NewMessage::new("job", "fine"), keyed(&key, "bad")],
            )
            .await
            .expect_err("an invalid key is refused");
        assert!(
            err.to_string().contains("idempotency key"),
            "the error names the key: {err}"
        );
    }
    match b.browse(&topic, &Browse::oldest()).await {
        Err(Error::NotFound(_)) => {}
        Ok(all) => assert!(all.is_empty(), "nothing of the batch is stored: {all:?}"),
        Err(e) => panic!("browse: {e}"),
    }
    let long = "k".repeat(512);
    let id = b.publish(&topic, keyed(&long, "ok")).await.unwrap();
    assert_eq!(b.publish(&topic, keyed(&long, "ok")).await.unwrap(), id);
}

/// With `skip_processed`, a message whose idempotency key a handler of the group already
/// processed (here published again after the topic's window) is acknowledged unhandled and
/// counted; a failed message is not recorded, so its next delivery runs; another group runs
/// everything; deleting the group forgets its records.
pub async fn skip_processed_acknowledges_a_processed_key_unhandled(b: Broker) {
    let topic = unique("processed");
    let window = Duration::from_millis(50);
    let b = b.with_topic_dedup_window(&topic, window).unwrap();
    b.create_group(&topic, "g", StartPosition::Earliest)
        .await
        .unwrap();
    let log = Log::default();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let log = log.clone();
        let failed_once = failed_once.clone();
        move |m: Message| {
            log.record(&m);
            let fail = &m.payload[..] == b"flaky"
                && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(if fail {
                Err(HandlerError::retryable(std::io::Error::other("once")))
            } else {
                Ok(())
            })
        }
    };
    let c = b
        .consumer(&topic, "g")
        .skip_processed(Duration::from_secs(600))
        .retry(Backoff::fixed(ms(10)).max_attempts(5))
        .handler("job", handler)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let first = b.publish(&topic, keyed("pay-1", "first")).await.unwrap();
    // Two deliveries of one key running at once both run (the record is written after the
    // handler): the second is published once the first was handled, after the window.
    wait_until("the first handled", LONG, || async {
        c.stats().processed >= 1
    })
    .await;
    let later = loop {
        tokio::time::sleep(ms(20)).await;
        let id = b.publish(&topic, keyed("pay-1", "second")).await.unwrap();
        if id != first {
            break id;
        }
    };
    b.publish(&topic, NewMessage::new("job", "plain"))
        .await
        .unwrap();
    // Fails once, then succeeds: recorded only after the success.
    b.publish(&topic, keyed("flaky", "flaky")).await.unwrap();
    wait_until("the group settled everything", LONG, || async {
        let s = c.stats();
        s.processed + s.already_processed >= 4
    })
    .await;
    let report = c.shutdown(LONG).await;
    let payloads: Vec<String> = log.all().into_iter().map(|s| s.payload).collect();
    assert_eq!(
        payloads.iter().filter(|p| *p == "first").count(),
        1,
        "{payloads:?}"
    );
    assert!(
        !payloads.iter().any(|p| p == "second"),
        "the second message of key pay-1 was handled: {payloads:?}"
    );
    assert_eq!(
        payloads.iter().filter(|p| *p == "flaky").count(),
        2,
        "a failure is not recorded: {payloads:?}"
    );
    assert!(payloads.iter().any(|p| p == "plain"));
    assert_eq!(report.stats.already_processed, 1);
    assert_eq!(report.stats.processed, 3);
    assert_eq!(dead_count(&b, &topic).await, 0);
    let info = b.topic_info(&topic).await.unwrap();
    let g = info.groups.iter().find(|g| g.name == "g").unwrap();
    assert_eq!(g.pending, 0, "the skipped message is acknowledged");
    assert!(
        b.backend().processed(&topic, "g", "k:pay-1").await.unwrap(),
        "the record is in the backend"
    );
    // Another group has no records.
    assert!(!b.backend().processed(&topic, "h", "k:pay-1").await.unwrap());
    assert!(
        b.message(&topic, later).await.is_ok(),
        "the second is stored"
    );
    // Deleting the group forgets its records, also when it is created again.
    assert!(b.delete_group(&topic, "g").await.unwrap());
    b.create_group(&topic, "g", StartPosition::Earliest)
        .await
        .unwrap();
    assert!(!b.backend().processed(&topic, "g", "k:pay-1").await.unwrap());
    // Nothing is recorded for a group that does not exist, nor for an ended generation.
    let sub = b
        .backend()
        .join(&topic, "g", "probe", StartPosition::Earliest)
        .await
        .unwrap();
    let nobody = relq::Subscription {
        group: "nobody".into(),
        ..sub.clone()
    };
    let ttl = Duration::from_secs(600);
    b.backend()
        .record_processed(&nobody, "k:x", ttl)
        .await
        .unwrap();
    assert!(!b
        .backend()
        .processed(&topic, "nobody", "k:x")
        .await
        .unwrap());
    assert!(b.terminate(&topic).await.unwrap());
    b.create_group(&topic, "g", StartPosition::Earliest)
        .await
        .unwrap();
    // A late record of the terminated generation does not reach the new group.
    let _ = b.backend().record_processed(&sub, "k:late", ttl).await;
    assert!(!b.backend().processed(&topic, "g", "k:late").await.unwrap());
}
