//! Every metric the alert rules and the Grafana dashboard use is one that `/metrics` exports
//! after real work (publish, handle, fail, retry, dead-letter, replay): a renamed metric breaks
//! this test, not a dashboard in production.

use std::collections::BTreeSet;
use std::time::Duration;

use relq::{Backoff, Broker, DeadLetterQuery, HandlerError, Message, NewMessage, StartPosition};

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("relq_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_alert_rules_and_the_dashboard_is_exported() {
    let handle = relq_admin::install_recorder().expect("no other recorder in this test binary");
    let b = Broker::memory();
    let c = b
        .consumer("orders", "billing")
        .start(StartPosition::Earliest)
        .retry(Backoff::fixed(Duration::from_millis(1)).max_attempts(2))
        .on_expired(relq::OnExpired::Drop)
        // Filtered out: relq_filtered_total.
        .filter("!header:skip".parse().unwrap())
        .handler("order", |m: Message| async move {
            if &m.payload[..] == b"bad" {
                Err(HandlerError::retryable(std::io::Error::other("db down")).category("database"))
            } else {
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // An expired message (dropped: relq_expired_total).
    b.publish(
        "orders",
        NewMessage::new("order", "late").expires_at(relq::Timestamp(1)),
    )
    .await
    .unwrap();
    for p in ["ok", "bad", "ok"] {
        b.publish("orders", NewMessage::new("order", p))
            .await
            .unwrap();
    }
    // A compressed publish (relq_compression_*_bytes_total) and one the filter skips.
    b.publish(
        "orders",
        NewMessage::new("order", "y".repeat(2000)).compress(relq::Compression::Gzip),
    )
    .await
    .unwrap();
    b.publish("orders", NewMessage::new("order", "x").header("skip", "1"))
        .await
        .unwrap();
    let dls = b.dead_letters("orders");
    for _ in 0..2000 {
        if dls.count(&DeadLetterQuery::all()).await.unwrap() == 1
            && c.stats().expired == 1
            && c.stats().filtered == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ids: Vec<_> = dls
        .list(&DeadLetterQuery::all())
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids.len(), 1);
    dls.replay(&ids).await.unwrap();
    c.shutdown(Duration::from_secs(5)).await;

    let text = relq_admin::render(&b, Some(&handle)).await;
    let exported = metric_names(&text);
    assert!(
        text.contains("relq_failed_total{topic=\"orders\",group=\"billing\",reason=\"retryable\",category=\"database\"}"),
        "{text}"
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = 0;
    for file in [
        "deploy/prometheus/relq-alerts.yml",
        "deploy/grafana/relq-dashboard.json",
    ] {
        let used = metric_names(&std::fs::read_to_string(root.join(file)).unwrap());
        assert!(!used.is_empty(), "{file} uses no relq metric?");
        for name in &used {
            assert!(
                exported.contains(name),
                "{file} uses {name}, which /metrics does not export:\n{text}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10);
}
