//! Routing by pattern (seed 004's `TopicRouter`): a pattern consumer reads every current and
//! future matching topic; a route forwards messages from matching topics into others, at least
//! once, acknowledging the source only after the target stored it; a loop of routes ends in a
//! dead letter instead of circling.

use relq::{Compression, HEADER_ROUTED_FROM, HEADER_ROUTE_HOPS};

use super::*;

/// What a pattern consumer's handler saw: the topic and the payload.
type Seen2 = Arc<Mutex<Vec<(String, String)>>>;

fn recorder(seen: &Seen2) -> impl Fn(Message) -> std::future::Ready<Result<(), HandlerError>> {
    let seen = seen.clone();
    move |m: Message| {
        seen.lock().unwrap().push((
            m.topic().to_owned(),
            String::from_utf8_lossy(&m.payload).into_owned(),
        ));
        std::future::ready(Ok(()))
    }
}

/// The first time it runs, the topics that match are read from where `start` says (latest: the
/// old messages are not read); a matching topic created later is found and read from its first
/// message; so is one created while the consumer was down, once it runs again; other topics are
/// not read. The handler tells topics apart by `Message::topic`; one set of counters covers
/// every topic.
pub async fn a_pattern_consumer_reads_current_and_future_matching_topics(b: Broker) {
    let p = unique("pat");
    let t = |s: &str| format!("{p}{s}");
    for (topic, payload) in [
        (t(".eu"), "eu-old"),
        (t(".us"), "us-old"),
        (t("-other"), "other-1"),
        (t(".eu.paris"), "paris-1"),
    ] {
        b.publish(&topic, NewMessage::new("job", payload))
            .await
            .unwrap();
    }
    let seen: Seen2 = Arc::default();
    let start = || async {
        b.consumer_matching(&format!("{p}.*"), "g")
            .name("w")
            .start(StartPosition::Latest)
            .discover_every(ms(50))
            .handler("job", recorder(&seen))
            .build()
            .unwrap()
            .start()
            .await
            .unwrap()
    };
    let c = start().await;
    b.publish(&t(".eu"), NewMessage::new("job", "eu-1"))
        .await
        .unwrap();
    b.publish(&t(".us"), NewMessage::new("job", "us-1"))
        .await
        .unwrap();
    // A new matching topic: its first message is published before the consumer can know of it.
    for m in ["asia-1", "asia-2"] {
        b.publish(&t(".asia"), NewMessage::new("job", m))
            .await
            .unwrap();
    }
    wait_until("four read", LONG, || async {
        seen.lock().unwrap().len() == 4
    })
    .await;
    let report = c.shutdown(LONG).await;
    assert_eq!(
        report.stats.processed, 4,
        "one set of counters for every topic"
    );
    assert_eq!(report.abandoned, 0);
    // While it is down: a new matching topic, and a message on an old one.
    b.publish(&t(".jp"), NewMessage::new("job", "jp-1"))
        .await
        .unwrap();
    b.publish(&t(".eu"), NewMessage::new("job", "eu-2"))
        .await
        .unwrap();
    let c = start().await;
    wait_until("six read", LONG, || async {
        seen.lock().unwrap().len() == 6
    })
    .await;
    c.shutdown(LONG).await;
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    let want: Vec<(String, String)> = [
        (".asia", "asia-1"),
        (".asia", "asia-2"),
        (".eu", "eu-1"),
        (".eu", "eu-2"),
        (".jp", "jp-1"),
        (".us", "us-1"),
    ]
    .iter()
    .map(|(topic, m)| (t(topic), (*m).to_owned()))
    .collect();
    assert_eq!(got, want);
    // Nothing was read from the topics that do not match: their groups do not exist.
    for other in [t("-other"), t(".eu.paris")] {
        let info = b.topic_info(&other).await.unwrap();
        assert!(info.groups.is_empty(), "{other}: {:?}", info.groups);
    }
    // An invalid pattern is an error of build.
    let e = b
        .consumer_matching("orders.>.eu", "g")
        .handler("job", recorder(&seen))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("last segment"), "{e}");
}

/// A route forwards every message of the matching topics into its target with its type,
/// payload (compressed or not at the source) and headers, `relq-routed-from` and a hop count;
/// the source message is acknowledged (the route's group holds nothing) once the target has
/// it. A route into a topic its own pattern matches is refused.
pub async fn a_route_forwards_every_matching_message_into_its_targets(b: Broker) {
    let p = unique("route");
    let (orders, audit, archive) = (
        format!("{p}.orders"),
        format!("{p}-audit"),
        format!("{p}-archive"),
    );
    // A message published before the route's first run is forwarded too (routes start at the
    // earliest message).
    let early = b
        .publish(&orders, NewMessage::new("order.created", "o-0"))
        .await
        .unwrap();
    let route = b
        .route("audit", &format!("{p}.>"), &[&audit, &archive])
        .unwrap()
        .discover_every(ms(50))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let body = "x".repeat(4000);
    let ids = b
        .publish_batch(
            &orders,
            vec![
                NewMessage::new("order.created", "o-1").header("tenant", "acme"),
                NewMessage::new("order.created", body.clone()).compress(Compression::Zstd),
                NewMessage::new("order.paid", "o-3").ttl(Duration::from_secs(3600)),
            ],
        )
        .await
        .unwrap();
    for target in [&audit, &archive] {
        let log = Log::default();
        let c = b
            .consumer(target, "readers")
            .start(StartPosition::Earliest)
            .fallback(ok_handler(&log))
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        wait_until("the four forwarded", LONG, || async { log.len() == 4 }).await;
        c.shutdown(LONG).await;
        let source_id = |s: &Seen| -> MessageId {
            let from = &s.headers[HEADER_ROUTED_FROM];
            from.rsplit('/').next().unwrap().parse().unwrap()
        };
        let mut seen = log.all();
        seen.sort_by_key(source_id);
        let payloads: Vec<&str> = seen.iter().map(|s| s.payload.as_str()).collect();
        assert_eq!(payloads, ["o-0", "o-1", body.as_str(), "o-3"], "{target}");
        let all_ids: Vec<MessageId> = std::iter::once(early).chain(ids.iter().copied()).collect();
        for (s, id) in seen.iter().zip(&all_ids) {
            assert_eq!(
                s.headers.get(HEADER_ROUTED_FROM),
                Some(&format!("{orders}/{id}"))
            );
            assert_eq!(
                s.headers.get(HEADER_ROUTE_HOPS).map(String::as_str),
                Some("1")
            );
        }
        let seen = &seen[1..];
        assert_eq!(
            seen[0].headers.get("tenant").map(String::as_str),
            Some("acme")
        );
        assert!(seen[2].headers.contains_key(relq::HEADER_EXPIRES_AT));
    }
    wait_until("the route's group settled", LONG, || async {
        let info = b.topic_info(&orders).await.unwrap();
        info.groups
            .iter()
            .any(|g| g.name == "route.audit" && g.pending + g.lag + g.scheduled == 0)
    })
    .await;
    route.shutdown(LONG).await;
    let e = b.route("loop", "x.>", &["x.y"]).unwrap_err();
    assert!(e.to_string().contains("go round"), "{e}");
    assert!(b.route("bad", "x.*", &[]).is_err());
    assert!(b.route("bad name", "x.*", &["y"]).is_err());
}

/// Two routes that forward into each other's topics give up after 8 hops (a dead letter with
/// category `route_loop` in one of the routes' groups) instead of circling for ever. (That a
/// route acknowledges nothing its target did not store is tested on a backend that refuses
/// publishes: crates/relq/tests/routing.rs.)
pub async fn a_loop_of_routes_ends_in_a_dead_letter(b: Broker) {
    // a.> -> b.x and b.> -> a.x: a loop.
    let (a, z) = (unique("ping"), unique("pong"));
    let mut routes = Vec::new();
    for (name, from, to) in [
        ("ping", format!("{a}.>"), format!("{z}.x")),
        ("pong", format!("{z}.>"), format!("{a}.x")),
    ] {
        routes.push(
            b.route(name, &from, &[&to])
                .unwrap()
                .start(StartPosition::Earliest)
                .discover_every(ms(50))
                .build()
                .unwrap()
                .start()
                .await
                .unwrap(),
        );
    }
    b.publish(&format!("{a}.x"), NewMessage::new("job", "round"))
        .await
        .unwrap();
    wait_until("the loop broken by a dead letter", LONG, || async {
        dead_count(&b, &format!("{a}.x")).await + dead_count(&b, &format!("{z}.x")).await == 1
    })
    .await;
    let mut all = Vec::new();
    for t in [format!("{a}.x"), format!("{z}.x")] {
        all.extend(
            b.dead_letters(&t)
                .list(&DeadLetterQuery::all())
                .await
                .unwrap(),
        );
    }
    assert_eq!(all[0].category.as_deref(), Some("route_loop"));
    assert_eq!(
        all[0].message.header(HEADER_ROUTE_HOPS),
        Some("8"),
        "{:?}",
        all[0].message.headers
    );
    for r in routes {
        r.shutdown(LONG).await;
    }
}
