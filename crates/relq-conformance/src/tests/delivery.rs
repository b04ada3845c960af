//! Delivery: every group gets every message, consumers of a group compete, start positions, delayed publish.

use super::*;

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

/// A delayed message already stored when a consumer starts is delivered at its time, however
/// long the consumer's reads wait for new messages: a read that finds only messages to set aside
/// looks again at once instead of waiting out its poll on a due time from before.
pub async fn delayed_publish_is_not_held_past_its_time(b: Broker) {
    let topic = unique("delay-held");
    let log = Log::default();
    let t0 = Timestamp::now();
    b.publish(&topic, NewMessage::new("job", "later").delay(ms(500)))
        .await
        .unwrap();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .poll_wait(Duration::from_secs(30))
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("delivered", LONG, || async { log.len() == 1 }).await;
    let after = log.all()[0].at.since(t0);
    assert!(after >= ms(500), "delivered early, after {after:?}");
    // Far below the 30 s poll a stale due time would wait out.
    assert!(
        after < Duration::from_secs(10),
        "delivered late, after {after:?}"
    );
    c.shutdown(LONG).await;
}
