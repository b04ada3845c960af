//! A route acknowledges a source message only once its target stored it: while the target
//! refuses publishes, the message stays unacknowledged (retried, never dropped), and once the
//! target takes publishes again it is forwarded and acknowledged; a route that runs out of
//! attempts leaves a dead letter in its group, the message kept.

use std::sync::Arc;
use std::time::Duration;

use relq::{Backoff, Broker, DeadLetterQuery, MemoryBackend, NewMessage};
use relq_core::testing::{Faults, Faulty};

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn route_group_holds(b: &Broker, topic: &str) -> u64 {
    let info = b.topic_info(topic).await.unwrap();
    info.groups
        .iter()
        .filter(|g| g.name == "route.out")
        .map(|g| g.pending + g.lag + g.scheduled)
        .sum()
}

/// A broker on a faulty in-memory backend refusing publishes to `refused`, and route "out" from
/// `in.>` into `targets`, retried every 20 ms up to `attempts` times.
async fn setup(
    refused: &str,
    targets: &[&str],
    attempts: u32,
) -> (Broker, Arc<Faults>, relq::ConsumerHandle) {
    let backend = Faulty::new(MemoryBackend::new());
    let faults = backend.faults();
    let b = Broker::new(backend);
    faults.refuse_publish(Some(refused));
    let route = b
        .route("out", "in.>", targets)
        .unwrap()
        .discover_every(Duration::from_millis(20))
        .retry(Backoff::fixed(Duration::from_millis(20)).max_attempts(attempts))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    (b, faults, route)
}

#[tokio::test]
async fn a_route_holds_what_its_target_refuses_until_it_is_stored() {
    let (b, faults, route) = setup("out", &["out"], 1000).await;
    b.publish("in.a", NewMessage::new("job", "held"))
        .await
        .unwrap();
    // Refused several times over: still held by the route's group, nowhere dropped.
    wait_for("retries", async || route.stats().retried >= 3).await;
    assert_eq!(route_group_holds(&b, "in.a").await, 1);
    assert_eq!(route.stats().processed, 0);
    assert!(
        b.topic_info("out").await.is_err(),
        "nothing stored on the target"
    );
    // The target takes publishes again: forwarded, then acknowledged.
    faults.refuse_publish(None);
    wait_for("the forward", async || route.stats().processed == 1).await;
    let got = b.browse("out", &relq::Browse::oldest()).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"held");
    wait_for("the ack", async || route_group_holds(&b, "in.a").await == 0).await;
    route.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_route_out_of_attempts_leaves_a_dead_letter() {
    let (b, _faults, route) = setup("out", &["out"], 3).await;
    let id = b
        .publish("in.a", NewMessage::new("job", "kept"))
        .await
        .unwrap();
    let dls = b.dead_letters("in.a");
    wait_for("the dead letter", async || {
        dls.count(&DeadLetterQuery::all()).await.unwrap() == 1
    })
    .await;
    let dl = &dls.list(&DeadLetterQuery::all()).await.unwrap()[0];
    assert_eq!(dl.message.id, id);
    assert_eq!(dl.group, "route.out");
    assert_eq!(dl.attempts, 3);
    assert_eq!(dl.category.as_deref(), Some("route"));
    assert_eq!(&dl.message.payload[..], b"kept");
    assert!(
        dl.error_chain
            .join(": ")
            .contains("refused by a test fault"),
        "{:?}",
        dl.error_chain
    );
    route.shutdown(Duration::from_secs(5)).await;
}

/// Two targets, the second refusing: the source stays unacknowledged (the first target may get
/// copies, told apart by nothing lost), and once the second takes publishes both hold it.
#[tokio::test]
async fn a_route_acks_only_once_every_target_has_the_message() {
    let (b, faults, route) = setup("out2", &["out1", "out2"], 1000).await;
    b.publish("in.a", NewMessage::new("job", "both"))
        .await
        .unwrap();
    wait_for("retries", async || route.stats().retried >= 2).await;
    assert_eq!(route_group_holds(&b, "in.a").await, 1, "not acknowledged");
    assert!(b.topic_info("out2").await.is_err());
    faults.refuse_publish(None);
    wait_for("the forward", async || route.stats().processed == 1).await;
    for t in ["out1", "out2"] {
        let got = b.browse(t, &relq::Browse::oldest()).await.unwrap();
        assert!(
            !got.is_empty() && got.iter().all(|m| &m.payload[..] == b"both"),
            "{t}"
        );
    }
    assert_eq!(
        b.browse("out2", &relq::Browse::oldest())
            .await
            .unwrap()
            .len(),
        1
    );
    wait_for("the ack", async || route_group_holds(&b, "in.a").await == 0).await;
    let report = route.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.stats.processed, report.abandoned), (1, 0));
}
