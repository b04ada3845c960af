//! Operations on topics and groups: stop/resume, locate, browse, terminate, groups created/moved/deleted, cleanup.

use super::*;

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
                release_key: false,
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

/// A subscription of a terminated generation is refused and takes nothing, even once the topic
/// and a group of the same name are back (another consumer joined the new generation).
pub async fn a_terminated_generation_reads_nothing_of_the_next(b: Broker) {
    let backend = b.backend().clone();
    let topic = unique("epoch");
    let old = backend
        .join(&topic, "g", "old", StartPosition::Earliest)
        .await
        .unwrap();
    publish_n(&b, &topic, 4).await;
    // Two reads, so a backend that skips work on later reads is on its usual path.
    for _ in 0..2 {
        let got = backend.read(&old, 1, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
    }
    assert!(b.terminate(&topic).await.unwrap());
    let new = backend
        .join(&topic, "g", "new", StartPosition::Earliest)
        .await
        .unwrap();
    let ids = publish_n(&b, &topic, 3).await;
    let e = backend
        .read(&old, 10, Duration::ZERO)
        .await
        .expect_err("a terminated generation reads nothing");
    assert_eq!(e.kind, relq::BackendErrorKind::Terminated, "{e}");
    let got = backend.read(&new, 10, Duration::ZERO).await.unwrap();
    assert!(
        got.iter().all(|d| d.message.attempt == 1),
        "first deliveries: {got:?}"
    );
    let got: Vec<MessageId> = got.iter().map(|d| d.message.id).collect();
    assert_eq!(got, ids, "the new generation gets every message of its own");
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
