//! Compression and typed messages (seed 004's 消息压缩 and 消息版本化): payloads are stored
//! compressed on the backend and reach handlers whole; a payload that does not decode is a
//! permanent failure with category `decode` whose dead letter keeps the stored bytes; typed
//! handlers decode, upgrade older schema versions and refuse what is not theirs.

use relq::{typed, Compression, Json, MsgPack, Outgoing, Protobuf, HEADER_ENCODING};
use serde::{Deserialize, Serialize};

use super::*;

/// A realistic JSON payload of about `n` orders (compresses several times over).
fn orders_json(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"order_id":"ord-{i:06}","customer":{{"id":"c-{}","tier":"gold"}},"status":"created","lines":[{{"sku":"SKU-{}","qty":{}}}],"currency":"EUR"}}"#,
                i % 50,
                i % 13,
                i % 4 + 1
            )
        })
        .collect();
    format!("[{}]", rows.join(","))
}

/// Every algorithm this build has.
fn algorithms() -> Vec<Compression> {
    Compression::ALL.to_vec()
}

/// The message as the backend stores it (not decompressed).
async fn stored(b: &Broker, topic: &str, id: MessageId) -> Message {
    b.backend()
        .browse(topic, &Browse::oldest().limit(1000))
        .await
        .expect("browse")
        .expect("the topic exists")
        .into_iter()
        .find(|m| m.id == id)
        .expect("the message is stored")
}

/// Each algorithm, per publish and per topic (above its threshold only): the backend holds the
/// payload compressed with the algorithm in its header; the handler, `message` and `browse`
/// see the payload as published and no header.
pub async fn compressed_payloads_are_stored_compressed_and_handled_whole(b: Broker) {
    let topic = unique("compressed");
    let big = orders_json(40);
    let b = b
        .with_topic_compression(&topic, Compression::Gzip, 1024)
        .unwrap();
    let mut published = Vec::new();
    for c in algorithms() {
        let m = NewMessage::new("job", big.clone())
            .header("algo", c.as_str())
            .compress(c);
        published.push((b.publish(&topic, m).await.unwrap(), Some(c)));
    }
    // The topic's compression: above its threshold, and below it (left alone).
    published.push((
        b.publish(&topic, NewMessage::new("job", big.clone()))
            .await
            .unwrap(),
        Some(Compression::Gzip),
    ));
    published.push((
        b.publish(&topic, NewMessage::new("job", "small"))
            .await
            .unwrap(),
        None,
    ));
    for (id, algorithm) in &published {
        let raw = stored(&b, &topic, *id).await;
        match algorithm {
            Some(c) => {
                assert_eq!(raw.header(HEADER_ENCODING), Some(c.as_str()), "{id}");
                assert!(
                    raw.payload.len() * 3 < big.len(),
                    "{c}: stored {} bytes of {}",
                    raw.payload.len(),
                    big.len()
                );
                let shown = b.message(&topic, *id).await.unwrap();
                assert_eq!(shown.payload, big.as_bytes(), "{c}");
                assert_eq!(shown.header(HEADER_ENCODING), None);
            }
            None => {
                assert_eq!(raw.header(HEADER_ENCODING), None);
                assert_eq!(&raw.payload[..], b"small");
            }
        }
    }
    let page = b.browse(&topic, &Browse::oldest()).await.unwrap();
    assert!(page.iter().all(|m| m.header(HEADER_ENCODING).is_none()));
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
    wait_until("every message handled", LONG, || async {
        log.len() == published.len()
    })
    .await;
    for s in log.all() {
        assert!(!s.headers.contains_key(HEADER_ENCODING), "{:?}", s.headers);
        if s.payload != "small" {
            assert_eq!(s.payload, big, "{:?}", s.headers.get("algo"));
        }
    }
    assert_eq!(c.stats().failed, 0);
    c.shutdown(LONG).await;
}

/// A stored payload that does not decompress (garbage, an unknown algorithm, one that expands
/// past the payload limit) is never handed to a handler: it is a permanent failure with
/// category `decode`, and its dead letter keeps the bytes as stored, header and all. The good
/// message beside them is handled.
pub async fn a_payload_that_does_not_decode_is_dead_lettered_with_its_stored_bytes(b: Broker) {
    let topic = unique("undecodable");
    // 4 MiB of zeros: a few KiB compressed, four times the default 1 MiB payload limit.
    let bomb = Compression::Lz4.compress(&vec![0u8; 4 << 20]).unwrap();
    assert!(bomb.len() < 64 << 10);
    let raw = |encoding: &str, payload: Vec<u8>| Outgoing {
        kind: "job".into(),
        payload: payload.into(),
        headers: [(HEADER_ENCODING.to_owned(), encoding.to_owned())].into(),
        deliver_at: None,
        dedup_window: None,
    };
    let bad = vec![
        raw("zstd", b"not zstd at all".to_vec()),
        raw("brotli", b"who knows".to_vec()),
        raw("lz4", bomb),
    ];
    let bad_ids = b.backend().publish(&topic, bad.clone()).await.unwrap();
    b.publish(
        &topic,
        NewMessage::new("job", orders_json(20)).compress(Compression::Lz4),
    )
    .await
    .unwrap();
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
    wait_until("one handled, three dead-lettered", LONG, || async {
        log.len() == 1 && dead_count(&b, &topic).await == 3
    })
    .await;
    assert_eq!(log.all()[0].payload, orders_json(20));
    let dls = b
        .backend()
        .dead_letters(&topic, &DeadLetterQuery::all())
        .await
        .unwrap();
    for (out, id) in bad.iter().zip(&bad_ids) {
        let dl = dls
            .iter()
            .find(|d| d.message.id == *id)
            .expect("its dead letter");
        assert_eq!(dl.reason, FailureKind::Permanent);
        assert_eq!(dl.category.as_deref(), Some("decode"));
        assert_eq!(dl.message.payload, out.payload, "the stored bytes are kept");
        assert_eq!(dl.message.headers, out.headers);
        assert_eq!(dl.attempts, 1, "a decode failure is not retried");
        // The broker's read shows it as stored too: it cannot be decompressed.
        let shown = b.dead_letters(&topic).get(dl.id).await.unwrap();
        assert_eq!(shown.message.payload, out.payload);
    }
    let chains: Vec<String> = dls.iter().map(|d| d.error_chain.join(": ")).collect();
    for says in [
        "not valid zstd",
        "unknown payload encoding",
        "limit of 1048576",
    ] {
        assert!(
            chains.iter().any(|c| c.contains(says)),
            "{says}: {chains:?}"
        );
    }
    assert_eq!(c.stats().processed, 1);
    c.shutdown(LONG).await;
}

/// A compressed message that fails in its handler is dead-lettered compressed (the read shows it
/// decompressed); its replay is stored compressed and handled with the original payload. A batch
/// handler sees decompressed payloads too.
pub async fn a_compressed_dead_letter_replays_and_batches_see_payloads_whole(b: Broker) {
    let topic = unique("compressed-replay");
    let body = orders_json(30);
    let id = b
        .publish(
            &topic,
            NewMessage::new("job", body.clone()).compress(Compression::Zstd),
        )
        .await
        .unwrap();
    let log = Log::default();
    let l = log.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler("job", move |m: Message| {
            l.record(&m);
            let replayed = m.header(relq::HEADER_REPLAY_OF).is_some();
            async move {
                if replayed {
                    Ok(())
                } else {
                    Err(HandlerError::permanent(std::io::Error::other("refused")))
                }
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wait_until("dead-lettered", LONG, || async {
        dead_count(&b, &topic).await == 1
    })
    .await;
    let dl = first_dead_letter(&b, &topic).await;
    assert_eq!(dl.message.id, id);
    assert_eq!(dl.message.payload, body.as_bytes(), "shown decompressed");
    let raw = b
        .backend()
        .dead_letter(&topic, dl.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(raw.message.header(HEADER_ENCODING), Some("zstd"));
    assert!(raw.message.payload.len() < body.len());
    let replayed = b.dead_letters(&topic).replay(&[dl.id]).await.unwrap();
    wait_until("the replay handled", LONG, || async { log.len() == 2 }).await;
    let raw = stored(&b, &topic, replayed[0].1).await;
    assert_eq!(
        raw.header(HEADER_ENCODING),
        Some("zstd"),
        "replayed as stored"
    );
    assert!(log.all().iter().all(|s| s.payload == body));
    c.shutdown(LONG).await;

    // A batch handler: two compressed, one not.
    let topic = unique("compressed-batch");
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .batch_handler(
            "job",
            BatchConfig::default().size(3).timeout(ms(50)),
            move |ms: Vec<Message>| {
                let n = ms.len();
                g.lock().unwrap().extend(ms);
                async move { (0..n).map(|_| Ok(())).collect() }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    b.publish_batch(
        &topic,
        vec![
            NewMessage::new("job", body.clone()).compress(Compression::Lz4),
            NewMessage::new("job", "plain"),
            NewMessage::new("job", body.clone()).compress(Compression::Gzip),
        ],
    )
    .await
    .unwrap();
    wait_until("the batch handled", LONG, || async {
        got.lock().unwrap().len() == 3
    })
    .await;
    let got = got.lock().unwrap().clone();
    let payloads: Vec<&[u8]> = got.iter().map(|m| &m.payload[..]).collect();
    assert_eq!(payloads, [body.as_bytes(), b"plain", body.as_bytes()]);
    assert!(got.iter().all(|m| m.header(HEADER_ENCODING).is_none()));
    c.shutdown(LONG).await;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    cents: u64,
    currency: String,
}

/// Version 1 of an order: no currency, amounts in whole euros.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct OrderV1 {
    id: u64,
    euros: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Invoice {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(string, tag = "2")]
    customer: String,
}

/// Typed handlers on every codec: values decode (JSON, MessagePack, protobuf, compressed or
/// not), an older schema version is upgraded, and a payload of another codec, an undecodable
/// one or a version without an upgrade is a permanent `decode` failure with its bytes kept.
pub async fn typed_messages_decode_upgrade_and_refuse_what_is_not_theirs(b: Broker) {
    let topic = unique("typed");
    let orders = Arc::new(Mutex::new(Vec::new()));
    let invoices = Arc::new(Mutex::new(Vec::new()));
    let packed = Arc::new(Mutex::new(Vec::new()));
    let (o, i, p) = (orders.clone(), invoices.clone(), packed.clone());
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .handler(
            "order",
            typed(Json, move |order: Order, _m: Message| {
                o.lock().unwrap().push(order);
                async { Ok(()) }
            })
            .version(2)
            .upgrade_from(1, |old: OrderV1| Order {
                id: old.id,
                cents: old.euros * 100,
                currency: "EUR".into(),
            }),
        )
        .handler(
            "invoice",
            typed(Protobuf, move |inv: Invoice, _m: Message| {
                i.lock().unwrap().push(inv);
                async { Ok(()) }
            }),
        )
        .handler(
            "order.packed",
            typed(MsgPack, move |order: Order, _m: Message| {
                p.lock().unwrap().push(order);
                async { Ok(()) }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let v2 = Order {
        id: 2,
        cents: 1250,
        currency: "USD".into(),
    };
    let inv = Invoice {
        id: 9,
        customer: "acme".into(),
    };
    let good = vec![
        NewMessage::encode("order", &v2, &Json)
            .unwrap()
            .schema_version(2),
        NewMessage::encode("order", &OrderV1 { id: 1, euros: 3 }, &Json)
            .unwrap()
            .schema_version(1),
        NewMessage::encode("invoice", &inv, &Protobuf)
            .unwrap()
            .compress(Compression::Lz4),
        NewMessage::encode("order.packed", &v2, &MsgPack).unwrap(),
    ];
    b.publish_batch(&topic, good).await.unwrap();
    let bad = vec![
        // MessagePack to the JSON handler.
        NewMessage::encode("order", &v2, &MsgPack)
            .unwrap()
            .schema_version(2),
        // Not JSON at all.
        NewMessage::new("order", "{not json").header("note", "plain publish"),
        // Version 0 is stored as 1 (versions start at 1): upgraded as a version 1, whose
        // fields a version 2 payload lacks, so it does not decode either.
        NewMessage::encode("order", &v2, &Json)
            .unwrap()
            .schema_version(0),
    ];
    let bad_ids = b.publish_batch(&topic, bad).await.unwrap();
    wait_until("four handled, three dead-lettered", LONG, || async {
        orders.lock().unwrap().len() == 2
            && invoices.lock().unwrap().len() == 1
            && packed.lock().unwrap().len() == 1
            && dead_count(&b, &topic).await == 3
    })
    .await;
    let mut got = orders.lock().unwrap().clone();
    got.sort_by_key(|o| o.id);
    assert_eq!(
        got,
        [
            Order {
                id: 1,
                cents: 300,
                currency: "EUR".into()
            },
            v2.clone()
        ]
    );
    assert_eq!(*invoices.lock().unwrap(), [inv]);
    assert_eq!(*packed.lock().unwrap(), [v2]);
    let dls = b
        .backend()
        .dead_letters(&topic, &DeadLetterQuery::all())
        .await
        .unwrap();
    for (id, says) in bad_ids.iter().zip([
        "application/msgpack",
        "not a valid application/json",
        "schema version 1",
    ]) {
        let dl = dls
            .iter()
            .find(|d| d.message.id == *id)
            .expect("dead letter");
        assert_eq!(dl.reason, FailureKind::Permanent);
        assert_eq!(dl.category.as_deref(), Some("decode"));
        assert_eq!(dl.attempts, 1);
        let original = stored(&b, &topic, *id).await;
        assert_eq!(dl.message.payload, original.payload, "raw bytes kept");
        assert!(
            dl.error_chain[0].contains(says),
            "{says}: {:?}",
            dl.error_chain
        );
    }
    c.shutdown(LONG).await;
}
