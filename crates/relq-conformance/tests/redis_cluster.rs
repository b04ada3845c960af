//! The conformance suite on Redis Cluster: three masters started by the harness
//! (`--cluster-enabled yes`, then `redis-cli --cluster create`), shared by the tests of this
//! binary (every test uses its own topics, which hash to different slots and so to different
//! nodes).

use std::sync::OnceLock;

use relq_conformance::redis_server::RedisCluster;

fn cluster_url() -> Option<String> {
    static CLUSTER: OnceLock<Option<String>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let cluster = RedisCluster::start(3)?;
            let url = cluster.url();
            // Lives until the test process exits (the watchdogs then stop the nodes).
            std::mem::forget(cluster);
            Some(url)
        })
        .clone()
}

async fn open() -> Option<relq::Broker> {
    let url = cluster_url()?;
    let backend = relq::RedisBackend::connect(&url)
        .await
        .expect("connect to the test cluster");
    Some(relq::Broker::new(backend))
}

/// Topics spread over the masters: each node holds some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_spread_over_the_masters() {
    let Some(broker) = open().await else {
        return;
    };
    for i in 0..30 {
        broker
            .publish(&format!("spread-{i}"), relq::NewMessage::new("job", "x"))
            .await
            .unwrap();
    }
    let url = cluster_url().unwrap();
    let ports: Vec<&str> = url
        .trim_start_matches("redis+cluster://")
        .split(',')
        .map(|h| h.rsplit(':').next().unwrap())
        .collect();
    for port in ports {
        let out = std::process::Command::new(relq_redis_server::cli_program())
            .args(["-p", port, "DBSIZE"])
            .output()
            .unwrap();
        let n: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(n > 0, "node {port} holds no key: the topics did not spread");
    }
    let mut topics = broker.topics().await.unwrap();
    topics.retain(|t| t.starts_with("spread-"));
    assert_eq!(topics.len(), 30);
}

relq_conformance::conformance_suite!(real_optional, open().await);
