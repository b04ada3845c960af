//! Failures: retries follow the policy, batch handlers fail per message, panics and hangs are failures, a message without a handler is dead-lettered.

use super::*;

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

/// Retries are delivered when they fall due even while the consumer waits for new messages on
/// an idle topic (here up to 20 s per read): not when that wait ends. Two messages whose
/// retries fall due at different times: each on time.
pub async fn a_retry_is_delivered_when_due_while_the_consumer_waits(b: Broker) {
    let topic = unique("retry-due");
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .poll_wait(Duration::from_secs(20))
        .claim_after(Duration::from_secs(120))
        .retry(Backoff::fixed(ms(300)).max_attempts(3))
        .handler("job", move |m: Message| {
            l.record(&m);
            let first = m.attempt == 1;
            async move {
                if first {
                    Err(HandlerError::retryable("not yet"))
                } else {
                    Ok(())
                }
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    b.publish(&topic, NewMessage::new("job", "a"))
        .await
        .unwrap();
    // The second message fails after the first did: its retry falls due later.
    wait_until("a's first attempt", LONG, || async { log.len() == 1 }).await;
    b.publish(&topic, NewMessage::new("job", "b"))
        .await
        .unwrap();
    wait_until("both handled on their retries", LONG, || async {
        log.len() == 4
    })
    .await;
    let seen = log.all();
    for p in ["a", "b"] {
        let at: Vec<Timestamp> = seen
            .iter()
            .filter(|s| s.payload == p)
            .map(|s| s.at)
            .collect();
        assert_eq!(at.len(), 2, "{p}: {seen:?}");
        let gap = at[1].since(at[0]);
        assert!(
            gap >= ms(300),
            "{p} retried after {gap:?}, before its backoff"
        );
        assert!(
            gap < Duration::from_secs(5),
            "{p} retried after {gap:?}: it waited for the read's 20 s wait instead of its 300 ms backoff"
        );
    }
    assert_eq!(c.stats().processed, 2);
    c.shutdown(LONG).await;
}
