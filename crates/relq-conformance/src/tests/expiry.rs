//! Expiry (seed 004's "discard expired messages"): a message whose time to live ended is never
//! handled; it becomes a dead letter with reason `expired`, or is dropped, and is counted either
//! way; a retry that would fall after the expiry is not scheduled; a replay is handled.

use relq::OnExpired;

use super::*;

/// How many messages of `topic` group "g" still holds (pending, scheduled or stopped).
async fn unsettled(b: &Broker, topic: &str) -> u64 {
    let info = b.topic_info(topic).await.expect("topic info");
    info.groups
        .iter()
        .filter(|g| g.name == "g")
        .map(|g| g.pending + g.scheduled + g.parked + g.lag)
        .sum()
}

/// An expired message is not handled: it is a dead letter with reason `expired`, holding the
/// message as published; the one published beside it without a TTL is handled.
pub async fn an_expired_message_is_dead_lettered_not_handled(b: Broker) {
    let topic = unique("expired");
    let past = Timestamp::now().minus(ms(1));
    let ids = b
        .publish_batch(
            &topic,
            vec![
                NewMessage::new("job", "stale").expires_at(past),
                NewMessage::new("job", "fresh"),
                NewMessage::new("job", "long-lived").ttl(Duration::from_secs(3600)),
            ],
        )
        .await
        .unwrap();
    let stored = b.message(&topic, ids[0]).await.unwrap();
    assert_eq!(stored.expires_at(), Some(past));
    assert!(b
        .message(&topic, ids[1])
        .await
        .unwrap()
        .expires_at()
        .is_none());
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
    wait_until("two handled and one dead-lettered", LONG, || async {
        log.len() == 2 && dead_count(&b, &topic).await == 1
    })
    .await;
    assert_eq!(
        log.payloads(),
        BTreeSet::from(["fresh".to_owned(), "long-lived".to_owned()])
    );
    let dl = first_dead_letter(&b, &topic).await;
    assert_eq!(dl.reason, FailureKind::Expired);
    assert_eq!(dl.message.id, ids[0]);
    assert_eq!(&dl.message.payload[..], b"stale");
    assert_eq!(dl.handler, "none");
    assert!(
        dl.error_chain[0].contains("time to live"),
        "{:?}",
        dl.error_chain
    );
    let s = c.stats();
    assert_eq!(
        (s.processed, s.expired, s.dead_lettered, s.failed),
        (2, 1, 1, 0),
        "an expiry is counted, and is not a failed attempt"
    );
    wait_until("everything settled", LONG, || async {
        unsettled(&b, &topic).await == 0
    })
    .await;
    c.shutdown(LONG).await;
}

/// With `OnExpired::Drop` an expired message is acknowledged without being handled: no dead
/// letter, nothing left pending, counted as expired.
pub async fn expired_messages_are_dropped_when_the_consumer_says_so(b: Broker) {
    let topic = unique("expired-drop");
    let gone = Timestamp::now().minus(ms(1));
    let msgs = (0..5)
        .map(|i| NewMessage::new("job", format!("old{i}")).expires_at(gone))
        .chain([NewMessage::new("job", "new")])
        .collect();
    b.publish_batch(&topic, msgs).await.unwrap();
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .on_expired(OnExpired::Drop)
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("all settled", LONG, || async {
        c.stats().expired == 5 && log.len() == 1 && unsettled(&b, &topic).await == 0
    })
    .await;
    assert_eq!(log.payloads(), BTreeSet::from(["new".to_owned()]));
    assert_eq!(
        dead_count(&b, &topic).await,
        0,
        "dropped, not dead-lettered"
    );
    let s = c.stats();
    assert_eq!((s.processed, s.dead_lettered, s.failed), (1, 0, 0));
    c.shutdown(LONG).await;
}

/// A message that expires during its retry backoff: the failed attempt whose next retry would
/// fall after the expiry dead-letters it at once with reason `expired`, keeping the failures
/// that led there. With a retry due before the expiry it is retried as usual first.
pub async fn a_message_expiring_during_its_retry_backoff_is_dead_lettered(b: Broker) {
    let topic = unique("expired-retry");
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .retry(Backoff::fixed(ms(400)).max_attempts(50))
        .handler("job", move |m: Message| {
            l.record(&m);
            async { Err(HandlerError::retryable(std::io::Error::other("db down"))) }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // Retries 400 ms apart, a time to live of 1 s: two or three attempts fit, never fifty.
    let id = b
        .publish(&topic, NewMessage::new("job", "x").ttl(ms(1000)))
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let dl = first_dead_letter(&b, &topic).await;
    assert_eq!(dl.message.id, id);
    assert_eq!(dl.reason, FailureKind::Expired);
    let attempts = log.len();
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} attempts within a 1 s time to live, 400 ms apart"
    );
    // Every failed attempt is kept. A retry due before the expiry but delivered after it (a
    // backend may deliver a due retry a little late) is not handled: one more record, of kind
    // `expired`, for that delivery.
    let (handled, expired): (Vec<_>, Vec<_>) = dl
        .failures
        .iter()
        .partition(|f| f.kind == FailureKind::Retryable);
    assert_eq!(handled.len(), attempts, "{:?}", dl.failures);
    assert!(handled.iter().all(|f| f.error.contains("db down")));
    assert!(expired.len() <= 1, "{:?}", dl.failures);
    assert!(expired.iter().all(|f| f.kind == FailureKind::Expired));
    assert_eq!(dl.attempts as usize, attempts + expired.len());
    let expires = dl.message.expires_at().expect("the expiry header");
    let next_retry = log.all().last().unwrap().at.plus(ms(400));
    let s = c.stats();
    assert_eq!((s.expired, s.dead_lettered), (1, 1));
    if expired.is_empty() {
        // Given up on at the last failure: its retry would have been due after the expiry.
        assert!(
            next_retry >= expires,
            "the last retry would have been due at {next_retry:?}, before the expiry {expires:?}"
        );
        assert_eq!(s.retried as usize, attempts - 1);
    } else {
        // Its last retry was due before the expiry and delivered after it.
        assert!(next_retry < expires, "{next_retry:?} {expires:?}");
        assert_eq!(s.retried as usize, attempts);
    }
    c.shutdown(LONG).await;
}

/// Replaying an expired dead letter delivers it without its time to live: the operator wants it
/// handled.
pub async fn a_replayed_expired_message_is_handled(b: Broker) {
    let topic = unique("expired-replay");
    let gone = Timestamp::now().minus(ms(1));
    b.publish(&topic, NewMessage::new("job", "late").expires_at(gone))
        .await
        .unwrap();
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
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    assert_eq!(log.len(), 0);
    let dls = b.dead_letters(&topic);
    let dl = dls.list(&DeadLetterQuery::all()).await.unwrap().remove(0);
    dls.replay(&[dl.id]).await.unwrap();
    wait_until("the replay handled", LONG, || async { log.len() == 1 }).await;
    let seen = log.all().remove(0);
    assert_eq!(seen.payload, "late");
    assert!(
        !seen.headers.contains_key(relq::HEADER_EXPIRES_AT),
        "{:?}",
        seen.headers
    );
    assert_eq!(c.stats().expired, 1);
    c.shutdown(LONG).await;
}

/// A topic's time to live (set on the broker) is stamped on messages published without their
/// own; a message's own wins; the header cannot be set by hand.
pub async fn a_topic_time_to_live_applies_to_messages_without_their_own(b: Broker) {
    let topic = unique("topic-ttl");
    let b = b.with_topic_ttl(&topic, Duration::from_secs(60)).unwrap();
    let before = Timestamp::now();
    let ids = b
        .publish_batch(
            &topic,
            vec![
                NewMessage::new("job", "default"),
                NewMessage::new("job", "own").ttl(Duration::from_secs(3600)),
            ],
        )
        .await
        .unwrap();
    let after = Timestamp::now();
    let default = b
        .message(&topic, ids[0])
        .await
        .unwrap()
        .expires_at()
        .unwrap();
    assert!(
        default >= before.plus(Duration::from_secs(60))
            && default <= after.plus(Duration::from_secs(60)),
        "{default:?}"
    );
    let own = b
        .message(&topic, ids[1])
        .await
        .unwrap()
        .expires_at()
        .unwrap();
    assert!(own >= before.plus(Duration::from_secs(3600)), "{own:?}");
    // Other topics are untouched.
    let other = unique("no-ttl");
    let id = b
        .publish(&other, NewMessage::new("job", "x"))
        .await
        .unwrap();
    assert!(b.message(&other, id).await.unwrap().expires_at().is_none());
    // A zero time to live for a whole topic is a mistake.
    assert!(matches!(
        b.clone().with_topic_ttl(&topic, Duration::ZERO),
        Err(Error::Config(_))
    ));
    // The header is relq's own.
    let e = b
        .publish(
            &topic,
            NewMessage::new("job", "x").header(relq::HEADER_EXPIRES_AT, "1"),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ReservedHeader(_)), "{e}");
    // Extreme times to live saturate instead of overflowing.
    let id = b
        .publish(&topic, NewMessage::new("job", "forever").ttl(Duration::MAX))
        .await
        .unwrap();
    assert_eq!(
        b.message(&topic, id).await.unwrap().expires_at(),
        Some(Timestamp::MAX)
    );
}

/// A message that expires while its batch fills is not given to the batch handler: the others
/// are, and it becomes an expired dead letter.
pub async fn a_message_expiring_while_its_batch_fills_is_not_handled(b: Broker) {
    let topic = unique("expired-batch");
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .batch_handler(
            "email",
            // The batch waits for ten messages, or 1.5 s after its first one.
            BatchConfig::default()
                .size(10)
                .timeout(ms(1500))
                .max_wait(ms(1500)),
            move |msgs: Vec<Message>| {
                for m in &msgs {
                    l.record(m);
                }
                let n = msgs.len();
                async move { (0..n).map(|_| Ok(())).collect() }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    b.publish_batch(
        &topic,
        vec![
            NewMessage::new("email", "short-lived").ttl(ms(300)),
            NewMessage::new("email", "kept"),
        ],
    )
    .await
    .unwrap();
    wait_until(
        "the batch ran and the expired one is a dead letter",
        LONG,
        || async { log.len() == 1 && dead_count(&b, &topic).await == 1 },
    )
    .await;
    assert_eq!(log.payloads(), BTreeSet::from(["kept".to_owned()]));
    let dl = first_dead_letter(&b, &topic).await;
    assert_eq!(dl.reason, FailureKind::Expired);
    assert_eq!(&dl.message.payload[..], b"short-lived");
    assert_eq!(c.stats().expired, 1);
    c.shutdown(LONG).await;
}
