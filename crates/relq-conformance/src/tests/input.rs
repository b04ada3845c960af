//! Bad input is a clear error and publishes nothing; headers at their limits round-trip.

use super::*;

/// A message at every header limit (the most headers, the longest names and values) is stored
/// and delivered byte for byte, with a time to live on top (relq's own header does not count).
pub async fn headers_at_their_limits_round_trip(b: Broker) {
    let topic = unique("hdr");
    let mut m = NewMessage::new("job", "x");
    let mut want = BTreeMap::new();
    for i in 0..relq::MAX_HEADERS {
        let name = format!("{i:03}{}", "n".repeat(relq::MAX_HEADER_NAME_LEN - 3));
        let prefix = format!("{i}é");
        let value = format!(
            "{prefix}{}",
            "v".repeat(relq::MAX_HEADER_VALUE_LEN - prefix.len())
        );
        m = m.header(name.clone(), value.clone());
        want.insert(name, value);
    }
    b.publish(&topic, m.ttl(Duration::from_secs(3600)))
        .await
        .unwrap();
    let got: Arc<Mutex<Vec<Message>>> = Arc::default();
    let g = got.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", move |m: Message| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(m);
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("delivered", LONG, || async {
        !got.lock().unwrap().is_empty()
    })
    .await;
    c.shutdown(LONG).await;
    let mut m = got.lock().unwrap()[0].clone();
    assert!(m.expires_at().is_some());
    m.headers.remove(relq::HEADER_EXPIRES_AT);
    assert_eq!(m.headers, want);
}

/// Bad names, payloads, headers and configuration are clear errors; nothing is published.
pub async fn bad_input_is_rejected_and_nothing_is_published(b: Broker) {
    let topic = unique("bad");
    let b = b.with_max_payload(1024);
    assert!(matches!(
        b.publish("bad topic", NewMessage::new("job", "x")).await,
        Err(Error::Name(_))
    ));
    assert!(matches!(
        b.publish(&topic, NewMessage::new("", "x")).await,
        Err(Error::Name(_))
    ));
    let big = NewMessage::new("job", vec![0u8; 1025]);
    assert!(matches!(
        b.publish(&topic, big).await,
        Err(Error::PayloadTooLarge {
            size: 1025,
            max: 1024
        })
    ));
    let reserved = NewMessage::new("job", "x").header("relq-replay-of", "1-0");
    assert!(matches!(
        b.publish(&topic, reserved).await,
        Err(Error::ReservedHeader(_))
    ));
    // Every header limit: count, empty, long or control-character names, long values.
    let many = (0..=relq::MAX_HEADERS).fold(NewMessage::new("job", "x"), |m, i| {
        m.header(format!("h{i}"), "v")
    });
    let oversize = [
        many,
        NewMessage::new("job", "x").header("", "v"),
        NewMessage::new("job", "x").header("k".repeat(relq::MAX_HEADER_NAME_LEN + 1), "v"),
        NewMessage::new("job", "x").header("k".repeat(70_000), "v"),
        NewMessage::new("job", "x").header("a\nb", "v"),
        NewMessage::new("job", "x").header("k", "v".repeat(relq::MAX_HEADER_VALUE_LEN + 1)),
    ];
    for m in oversize {
        match b.publish(&topic, m).await {
            Err(Error::InvalidHeader { name, reason }) => {
                assert!(name.len() < 200 && !reason.is_empty(), "{name} {reason}");
            }
            other => panic!("expected an invalid-header error, got {other:?}"),
        }
    }
    // A batch with one bad message publishes nothing.
    let batch = vec![
        NewMessage::new("job", "ok"),
        NewMessage::new("job", vec![0u8; 2000]),
    ];
    assert!(b.publish_batch(&topic, batch).await.is_err());
    assert!(matches!(
        b.topic_info(&topic).await,
        Err(Error::NotFound(_))
    ));
    let h = |_m: Message| async { Ok(()) };
    let bh = |msgs: Vec<Message>| async move { msgs.iter().map(|_| Ok(())).collect() };
    let cfg = |r: Result<relq::Consumer, Error>| match r {
        Err(Error::Config(e)) => e.to_string(),
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error"),
    };
    assert!(cfg(b
        .consumer(&topic, "g")
        .concurrency(0)
        .handler("job", h)
        .build())
    .contains("concurrency"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .handler_timeout(ms(100))
        .claim_after(ms(100))
        .handler("job", h)
        .build())
    .contains("claim_after"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .retry(Backoff::default().max_attempts(0))
        .handler("job", h)
        .build())
    .contains("max_attempts"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .concurrency(4)
        .batch_handler("job", BatchConfig::default().size(10), bh,)
        .build())
    .contains("exceeds the concurrency"));
    assert!(cfg(b
        .consumer(&topic, "g")
        .handler_timeout(ms(500))
        .claim_after(ms(1000))
        .batch_handler(
            "job",
            BatchConfig::default()
                .size(2)
                .timeout(ms(100))
                .max_wait(ms(600)),
            bh,
        )
        .build())
    .contains("max_wait"));
    assert!(cfg(b.consumer(&topic, "g").build()).contains("handler"));
    assert!(matches!(
        b.consumer(&topic, "bad group").handler("job", h).build(),
        Err(Error::Name(_))
    ));
}
