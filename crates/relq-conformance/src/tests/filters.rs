//! Filters (seed 004's `HeaderFilter`, `ContentFilter`): a group handles only the messages that
//! pass its filters; the others are acknowledged for that group unhandled and counted, never
//! dead-lettered, never lost to the other groups.

use relq::{Compression, Filter};

use super::*;

fn filter(s: &str) -> Filter {
    s.parse().expect("a valid filter")
}

/// A group with header, type and JSON filters handles what passes all of them (a compressed
/// payload is judged decompressed); the rest is acknowledged for it unhandled and counted;
/// another group without filters handles everything.
pub async fn a_group_handles_only_what_passes_its_filters(b: Broker) {
    let topic = unique("filtered");
    let big = format!(
        r#"{{"status":"paid","amount":250,"note":"{}"}}"#,
        "x".repeat(3000)
    );
    let msgs = vec![
        // Passes.
        NewMessage::new("order.created", r#"{"status":"paid","amount":120}"#)
            .header("tenant", "acme"),
        // Passes, compressed.
        NewMessage::new("order.created", big.clone())
            .header("tenant", "acme")
            .compress(Compression::Lz4),
        // Wrong tenant.
        NewMessage::new("order.created", r#"{"status":"paid","amount":500}"#)
            .header("tenant", "other"),
        // Not paid.
        NewMessage::new("order.created", r#"{"status":"open","amount":500}"#)
            .header("tenant", "acme"),
        // Too small.
        NewMessage::new("order.created", r#"{"status":"paid","amount":5}"#)
            .header("tenant", "acme"),
        // Not JSON.
        NewMessage::new("order.created", "paid").header("tenant", "acme"),
        // An audit type.
        NewMessage::new("audit.order", r#"{"status":"paid","amount":120}"#)
            .header("tenant", "acme"),
    ];
    let n = msgs.len();
    b.publish_batch(&topic, msgs).await.unwrap();
    let log = Log::default();
    let c = b
        .consumer(&topic, "billing")
        .start(StartPosition::Earliest)
        .filter(filter("header:tenant=acme"))
        .filter(filter("!type:audit.*"))
        .filter(filter("json:/status=\"paid\""))
        .filter(filter("json:/amount>100"))
        .fallback(ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let all = Log::default();
    let c2 = b
        .consumer(&topic, "audit")
        .start(StartPosition::Earliest)
        .fallback(ok_handler(&all))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("every message settled in both groups", LONG, || async {
        let s = c.stats();
        s.processed + s.filtered == n as u64 && all.len() == n
    })
    .await;
    let s = c.stats();
    assert_eq!(
        (s.processed, s.filtered, s.dead_lettered, s.failed),
        (2, 5, 0, 0)
    );
    let mut got: Vec<String> = log.all().into_iter().map(|s| s.payload).collect();
    got.sort();
    assert!(
        got == [r#"{"status":"paid","amount":120}"#.to_owned(), big.clone()],
        "handled: {:?}",
        got.iter()
            .map(|p| p.chars().take(40).collect::<String>())
            .collect::<Vec<_>>()
    );
    assert_eq!(c2.stats().filtered, 0);
    // Filtered-out messages are settled for the group, not pending, not dead letters.
    wait_until("the filtering group settled", LONG, || async {
        let info = b.topic_info(&topic).await.unwrap();
        info.groups
            .iter()
            .any(|g| g.name == "billing" && g.pending + g.lag + g.scheduled == 0)
    })
    .await;
    assert_eq!(dead_count(&b, &topic).await, 0);
    c.shutdown(LONG).await;
    c2.shutdown(LONG).await;
}

/// A filter reading the payload of a compressed message that does not decompress lets it
/// through, so it becomes a `decode` dead letter instead of vanishing as filtered; the group's
/// other filters still apply (one of another type is filtered out).
pub async fn an_undecodable_payload_is_not_filtered_away(b: Broker) {
    let topic = unique("filtered-bad");
    let raw = |kind: &str| relq::Outgoing {
        kind: kind.into(),
        payload: bytes::Bytes::from_static(b"not lz4"),
        headers: [(relq::HEADER_ENCODING.to_owned(), "lz4".to_owned())].into(),
        deliver_at: None,
        dedup_window: None,
    };
    b.backend()
        .publish(&topic, vec![raw("job"), raw("other")])
        .await
        .unwrap();
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .filter(filter("type:job"))
        .filter(filter("payload~never-matches"))
        .fallback(ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("one dead-lettered, one filtered", LONG, || async {
        dead_count(&b, &topic).await == 1 && c.stats().filtered == 1
    })
    .await;
    assert_eq!(log.len(), 0);
    let dl = first_dead_letter(&b, &topic).await;
    assert_eq!(dl.category.as_deref(), Some("decode"));
    assert_eq!(dl.message.kind, "job");
    c.shutdown(LONG).await;
}
