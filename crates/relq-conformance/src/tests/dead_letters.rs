//! Dead letters: the failure record, replay, list/filter/delete/purge/stats, forwarding to a failure topic.

use super::*;

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
