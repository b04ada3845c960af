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
            assert!(
                after >= window,
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
