//! The conformance suite on the Redis Streams backend, each test against its own `redis-server`
//! (started on a free loopback port, no persistence).

use relq_conformance::redis_server::RedisServer;

async fn open() -> Option<relq::Broker> {
    let server = RedisServer::start()?;
    let backend = relq::RedisBackend::connect(&server.url())
        .await
        .expect("connect to the test server");
    // The server lives until the test process exits (its watchdog then stops it).
    std::mem::forget(server);
    Some(relq::Broker::new(backend))
}

relq_conformance::conformance_suite!(real_optional, open().await);
