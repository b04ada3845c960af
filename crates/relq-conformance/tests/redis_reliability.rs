//! Reliability of the Redis Streams backend against real `redis-server` processes: server
//! restarts with and without persistence, dropped connections, an evicting memory policy, entries
//! written by other programs, and Redis Cluster.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relq::{Broker, Message, NewMessage, RedisBackend, RedisConfig, StartPosition};
use relq_conformance::redis_server::{RedisServer, ServerOptions};
use relq_conformance::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LONG: Duration = Duration::from_secs(60);

/// Payloads a handler saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<BTreeSet<String>>>);

impl Seen {
    fn handler(
        &self,
    ) -> impl Fn(Message) -> std::future::Ready<Result<(), relq::HandlerError>> + Send + Sync + 'static
    {
        let seen = self.clone();
        move |m: Message| {
            seen.0
                .lock()
                .unwrap()
                .insert(String::from_utf8_lossy(&m.payload).into_owned());
            std::future::ready(Ok(()))
        }
    }
    /// Starts a consumer of `topic` (group "g", from the earliest message) recording `kind`.
    async fn consume(&self, broker: &Broker, topic: &str, kind: &str) -> relq::ConsumerHandle {
        broker
            .consumer(topic, "g")
            .start(StartPosition::Earliest)
            .handler(kind, self.handler())
            .build()
            .unwrap()
            .start()
            .await
            .unwrap()
    }
    fn contains_all(&self, want: &BTreeSet<String>) -> bool {
        let seen = self.0.lock().unwrap();
        want.iter().all(|p| seen.contains(p))
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// How many times `cmd` ran on the server (from INFO commandstats).
fn calls(server: &RedisServer, cmd: &str) -> u64 {
    let info = server.cli(&["INFO", "commandstats"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Stream entries of `topic`, as (id, data) pairs.
fn entries(server: &RedisServer, topic: &str) -> Vec<String> {
    server
        .cli(&["XRANGE", &format!("relq:{{{topic}}}:s"), "-", "+"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Publishers keep publishing while the server is killed and restarted from its append-only
/// file (`appendfsync always`): every publish that returned Ok is consumed afterwards, and the
/// consumer carries on without being restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_restart_mid_load_loses_no_acknowledged_publish() {
    let Some(mut server) = RedisServer::start_with(ServerOptions::durable()) else {
        return;
    };
    let broker = Broker::connect(&server.url()).await.unwrap();
    let seen = Seen::default();
    let consumer = seen.consume(&broker, "load", "job").await;
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (broker, acked, stop, failed) =
            (broker.clone(), acked.clone(), stop.clone(), failed.clone());
        publishers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let payload = format!("p{p}-{i}");
                match broker
                    .publish("load", NewMessage::new("job", payload.clone()))
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().insert(payload);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }
    wait_until("some publishes", LONG, || async {
        acked.lock().unwrap().len() > 300
    })
    .await;
    server.restart();
    let after_restart = acked.lock().unwrap().len();
    wait_until("publishes after the restart", LONG, || async {
        acked.lock().unwrap().len() > after_restart + 300
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let deadline = tokio::time::Instant::now() + LONG;
    while !seen.contains_all(&acked) {
        if tokio::time::Instant::now() > deadline {
            let got = seen.0.lock().unwrap().clone();
            let missing: Vec<&String> = acked.difference(&got).collect();
            let stored = entries(&server, "load");
            let in_stream: Vec<&&String> = missing.iter().filter(|p| stored.contains(p)).collect();
            panic!(
                "{} acknowledged publishes never consumed (first: {:?}); {} of them are in the stream; pending: {}; groups: {}",
                missing.len(),
                &missing[..missing.len().min(5)],
                in_stream.len(),
                server.cli(&["XPENDING", "relq:{load}:s", "g"]),
                server.cli(&["XINFO", "GROUPS", "relq:{load}:s"]),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Retried publishes created no duplicates: the stream holds each payload once.
    let stored = entries(&server, "load");
    let payloads: Vec<&String> = stored.iter().filter(|l| l.starts_with('p')).collect();
    let unique: BTreeSet<&&String> = payloads.iter().collect();
    assert_eq!(
        payloads.len(),
        unique.len(),
        "a retried publish duplicated a message"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "publishes were retried across the restart, none failed"
    );
    consumer.shutdown(LONG).await;
}

/// A TCP proxy in front of the server that can drop a connection right after the server
/// answered, so the client never sees the reply of a command that was applied.
struct Proxy {
    port: u16,
    cut_next_reply: Arc<AtomicBool>,
    /// Holds the next reply back this many ms (0 = none).
    delay_next_reply: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_next_reply = cut.clone();
        let delay = Arc::new(AtomicU64::new(0));
        let delay_next_reply = delay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = TcpStream::connect(("127.0.0.1", target)).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let cut = cut.clone();
                let delay = delay.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let hold = delay.swap(0, Ordering::SeqCst);
                        if hold > 0 {
                            tokio::time::sleep(Duration::from_millis(hold)).await;
                        }
                        if cut.swap(false, Ordering::SeqCst) {
                            // The reply is swallowed and the client's connection closed.
                            let _ = cw.shutdown().await;
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Proxy {
            port,
            cut_next_reply,
            delay_next_reply,
        }
    }
}

/// The connection drops after the server applied a publish but before the client read the
/// reply. The backend retries; the retry finds the batch by its nonce and returns its ids
/// instead of appending it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retried_after_a_dropped_reply_is_not_duplicated() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port()).await;
    let backend = RedisBackend::connect(&format!("redis://127.0.0.1:{}", proxy.port))
        .await
        .unwrap();
    let broker = Broker::new(backend);
    broker
        .publish("idem", NewMessage::new("job", "before"))
        .await
        .unwrap();
    let calls_before = calls(&server, "evalsha") + calls(&server, "eval");
    proxy.cut_next_reply.store(true, Ordering::SeqCst);
    let ids = broker
        .publish_batch(
            "idem",
            vec![
                NewMessage::new("job", "x1"),
                NewMessage::new("job", "x2"),
                NewMessage::new("job", "x3"),
            ],
        )
        .await
        .expect("the publish is retried after the dropped connection");
    assert!(
        !proxy.cut_next_reply.load(Ordering::SeqCst),
        "the proxy did cut a reply"
    );
    assert!(
        calls(&server, "exec") >= 1
            && calls(&server, "evalsha") + calls(&server, "eval") > calls_before,
        "the publish ran twice on the server (the MULTI/EXEC applied, then the retry script)"
    );
    let stored = entries(&server, "idem");
    for p in ["x1", "x2", "x3"] {
        assert_eq!(
            stored.iter().filter(|l| *l == p).count(),
            1,
            "{p} stored once: {stored:?}"
        );
    }
    let info = broker.topic_info("idem").await.unwrap();
    assert_eq!(info.length, 4);
    assert_eq!(
        info.last_id,
        Some(ids[2]),
        "the retry returned the stored ids"
    );
}

/// The reply to a publish arrives after the response timeout: the backend retries, and the
/// retry finds the batch (applied on the first attempt) instead of appending it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retried_after_a_timeout_is_not_duplicated() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port()).await;
    let backend = RedisBackend::connect_with(
        &format!("redis://127.0.0.1:{}", proxy.port),
        RedisConfig::default().response_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let broker = Broker::new(backend);
    broker
        .publish("slow", NewMessage::new("job", "before"))
        .await
        .unwrap();
    let calls_before = calls(&server, "evalsha") + calls(&server, "eval");
    proxy.delay_next_reply.store(1000, Ordering::SeqCst);
    let ids = broker
        .publish_batch(
            "slow",
            vec![NewMessage::new("job", "y1"), NewMessage::new("job", "y2")],
        )
        .await
        .expect("the publish is retried after the timeout");
    assert_eq!(
        proxy.delay_next_reply.load(Ordering::SeqCst),
        0,
        "the proxy did hold a reply back"
    );
    assert!(
        calls(&server, "evalsha") + calls(&server, "eval") > calls_before,
        "the publish was retried (through the retry script)"
    );
    let stored = entries(&server, "slow");
    for p in ["y1", "y2"] {
        assert_eq!(
            stored.iter().filter(|l| *l == p).count(),
            1,
            "{p} stored once: {stored:?}"
        );
    }
    let info = broker.topic_info("slow").await.unwrap();
    assert_eq!(info.length, 3);
    assert_eq!(info.last_id, Some(ids[1]));
}

/// Redis restarts without persistence: the topic and its group are gone. The running consumer
/// recreates the group (with a warning), processes new messages, and does not spin meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_recreates_the_group_and_does_not_spin() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let broker = Broker::connect(&server.url()).await.unwrap();
    let seen = Seen::default();
    let consumer = seen.consume(&broker, "volatile", "job").await;
    broker
        .publish("volatile", NewMessage::new("job", "before"))
        .await
        .unwrap();
    wait_until("first message", LONG, || async { seen.len() == 1 }).await;
    server.restart();
    // Idle after the restart: the consumer polls at its normal pace, not in a tight loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = calls(&server, "evalsha") + calls(&server, "xreadgroup");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_calls = calls(&server, "evalsha") + calls(&server, "xreadgroup") - base;
    assert!(
        idle_calls < 100,
        "{idle_calls} calls in 2 idle seconds: the consumer spins"
    );
    for i in 0..5 {
        broker
            .publish("volatile", NewMessage::new("job", format!("after{i}")))
            .await
            .unwrap();
    }
    wait_until("messages after the restart", LONG, || async {
        seen.len() == 6
    })
    .await;
    assert_eq!(
        consumer.stats().processed,
        6,
        "the consumer kept running across the restart"
    );
    consumer.shutdown(LONG).await;
}

/// The backend reports the server's version in its health, and it is the version of the binary
/// the tests were told to run (`RELQ_REDIS_SERVER`; CI runs this suite on Redis 7.0 and 8.x, and
/// this fails if the second run silently used the first server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_version_of_the_server_under_test() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let want = relq_conformance::redis_server::server_version().expect("the server's --version");
    let broker = Broker::new(RedisBackend::connect(&server.url()).await.unwrap());
    let health = broker.health().await;
    let check = health
        .checks
        .iter()
        .find(|c| c.name == "server_version")
        .expect("a server_version check");
    assert!(check.ok, "{check:?}");
    assert_eq!(check.detail, format!("Redis {want}"));
    eprintln!("the Redis tests run against Redis {want}");
}

/// A server that may evict keys is refused (queue data could vanish); allowing it explicitly
/// connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_memory_policy_is_refused_at_connect() {
    let Some(server) =
        RedisServer::start_with(ServerOptions::default().arg("maxmemory-policy", "allkeys-lru"))
    else {
        return;
    };
    let e = RedisBackend::connect(&server.url()).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("allkeys-lru") && text.contains("noeviction"),
        "{text}"
    );
    RedisBackend::connect_with(&server.url(), RedisConfig::default().allow_eviction(true))
        .await
        .expect("allowed explicitly");
}

/// Entries written by another program: a well-formed one is consumed like any message; one
/// without a type is dead-lettered with the reason, not lost and not retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_from_other_programs_are_consumed_or_dead_lettered() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let broker = Broker::connect(&server.url()).await.unwrap();
    // The topic exists once a relq program touched it (or a consumer joined).
    let seen = Seen::default();
    let consumer = seen.consume(&broker, "foreign", "order.created").await;
    let key = "relq:{foreign}:s";
    server.cli(&[
        "XADD",
        key,
        "*",
        "type",
        "order.created",
        "data",
        "from-python",
        "headers",
        r#"{"source":"py"}"#,
    ]);
    server.cli(&["XADD", key, "*", "data", "no type"]);
    wait_until("foreign message consumed", LONG, || async {
        seen.len() == 1
    })
    .await;
    let dls = broker.dead_letters("foreign");
    wait_until("malformed entry dead-lettered", LONG, || async {
        dls.count(&relq::DeadLetterQuery::all()).await.unwrap() == 1
    })
    .await;
    let dl = &dls.list(&relq::DeadLetterQuery::all()).await.unwrap()[0];
    assert_eq!(dl.message.kind, "relq.malformed");
    assert!(dl
        .message
        .header("relq-malformed")
        .unwrap()
        .contains("type"));
    assert_eq!(dl.message.payload.as_ref(), b"no type");
    consumer.shutdown(LONG).await;
}

/// Consumers that hold nothing and were not seen for `consumer_expiry` are removed from the group
/// by another consumer's claims; one that still holds a message is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_holding_nothing_are_forgotten() {
    use relq::Backend;
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::connect_with(
        &server.url(),
        RedisConfig::default().consumer_expiry(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let gone = backend
        .join("crowd", "g", "gone", StartPosition::Earliest)
        .await
        .unwrap();
    let holder = backend
        .join("crowd", "g", "holder", StartPosition::Earliest)
        .await
        .unwrap();
    let live = backend
        .join("crowd", "g", "live", StartPosition::Earliest)
        .await
        .unwrap();
    backend
        .publish(
            "crowd",
            vec![relq::Outgoing {
                kind: "job".into(),
                payload: "x".into(),
                headers: Default::default(),
                deliver_at: None,
                dedup_window: None,
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        backend
            .read(&holder, 1, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        1
    );
    let _ = gone;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A claim with a long min-idle takes nothing, but tidies the group.
    assert!(backend
        .claim(&live, Duration::from_secs(60), 10)
        .await
        .unwrap()
        .is_empty());
    let info = backend.topic_info("crowd").await.unwrap().unwrap();
    let names: BTreeSet<String> = info.groups[0]
        .consumers
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        names,
        ["holder", "live"].into_iter().map(String::from).collect(),
        "the idle consumer without messages is gone; the one holding a message stays"
    );
}

/// ACL users: `redis://user:password@host:port`. A user limited to relq's keys and without the
/// dangerous commands (INFO, CONFIG) can do everything relq needs; a wrong password is a clear
/// error that is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_with_password_works_and_a_wrong_password_is_refused() {
    let Some(server) = RedisServer::start_with(
        ServerOptions::default().arg("user", "app on >s3cret ~relq:* &* +@all -@dangerous"),
    ) else {
        return;
    };
    let url = format!("redis://app:s3cret@127.0.0.1:{}", server.port());
    let broker = Broker::connect(&url)
        .await
        .expect("connect as the ACL user");
    let seen = Seen::default();
    let consumer = seen.consume(&broker, "acl", "job").await;
    broker
        .publish("acl", NewMessage::new("job", "as app"))
        .await
        .unwrap();
    wait_until("consumed as the ACL user", LONG, || async {
        seen.len() == 1
    })
    .await;
    assert_eq!(broker.topics().await.unwrap(), vec!["acl".to_owned()]);
    consumer.shutdown(LONG).await;

    let started = std::time::Instant::now();
    let wrong = format!("redis://app:wrong@127.0.0.1:{}", server.port());
    let e = RedisBackend::connect(&wrong).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.to_lowercase().contains("password") || text.contains("WRONGPASS"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a wrong password is not retried for the whole retry window"
    );
}

/// A topic another program created by the documented format, before any relq process touched
/// it, is listed and described like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_written_by_other_programs_are_listed() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    server.cli(&["XADD", "relq:{outside}:s", "*", "type", "job", "data", "x"]);
    // Keys that only look similar are not topics.
    server.cli(&["XADD", "relq:{bad name}:s", "*", "type", "job", "data", "x"]);
    server.cli(&["SET", "relq:{notastream}:s", "x"]);
    let broker = Broker::connect(&server.url()).await.unwrap();
    assert_eq!(broker.topics().await.unwrap(), vec!["outside".to_owned()]);
    assert_eq!(broker.topic_info("outside").await.unwrap().length, 1);
}

/// The Redis backend's own durations at their extremes (`Duration::MAX` response timeout, retry
/// window and consumer expiry; a consumer whose claim time and poll wait are `Duration::MAX`)
/// work like any others: no overflow, no command Redis refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_durations_work_on_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let config = RedisConfig::default()
        .response_timeout(Duration::MAX)
        .retry_for(Duration::MAX)
        .consumer_expiry(Duration::MAX);
    let broker = Broker::new(
        RedisBackend::connect_with(&server.url(), config)
            .await
            .unwrap(),
    );
    let seen = Seen::default();
    let consumer = broker
        .consumer("far", "g")
        .start(StartPosition::Earliest)
        .claim_after(Duration::MAX)
        .poll_wait(Duration::MAX)
        .handler("job", seen.handler())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    broker
        .publish("far", NewMessage::new("job", "x"))
        .await
        .unwrap();
    broker
        .publish("far", NewMessage::new("job", "later").delay(Duration::MAX))
        .await
        .unwrap();
    wait_until("handled", LONG, || async { seen.len() == 1 }).await;
    assert_eq!(consumer.shutdown(Duration::MAX).await.abandoned, 0);
    let info = broker.topic_info("far").await.unwrap();
    assert_eq!(info.groups[0].scheduled, 1, "{info:?}");
}
