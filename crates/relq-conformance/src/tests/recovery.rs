//! Recovery: a dead consumer's messages are claimed, a restarting one recovers its own, shutdown leaves what it cut off pending.

use super::*;

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
