//! A dead letter whose forward to the failure topic fails stays stored: forwarding is tried the
//! configured number of times, off the handler path, and a failure is only logged and counted.

use std::time::Duration;

use relq::{
    Broker, Browse, DeadLetterQuery, HandlerError, MemoryBackend, MemoryConfig, Message,
    NewMessage, StartPosition,
};

#[tokio::test(start_paused = true)]
async fn a_failed_forward_never_loses_the_dead_letter() {
    // The failure topic holds one unacknowledged message and has room for no other.
    let b = Broker::new(
        MemoryBackend::with_config(
            MemoryConfig::default()
                .capacity(1)
                .publish_timeout(Duration::from_millis(10)),
        )
        .unwrap(),
    );
    b.publish("orders_failed", NewMessage::new("x", "occupied"))
        .await
        .unwrap();
    b.backend()
        .join("orders_failed", "auditors", "a", StartPosition::Earliest)
        .await
        .unwrap();
    let c = b
        .consumer("orders", "billing")
        .start(StartPosition::Earliest)
        .forward_dead_letters("_failed")
        .forward_retry(3, Duration::from_millis(100))
        .handler("order", |_m: Message| async move {
            Err(HandlerError::permanent(std::io::Error::other("no")))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    b.publish("orders", NewMessage::new("order", "1"))
        .await
        .unwrap();
    let dls = b.dead_letters("orders");
    while dls.count(&DeadLetterQuery::all()).await.unwrap() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Past every forward attempt (3 tries, 100 ms apart, each waiting 10 ms for room).
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.shutdown(Duration::from_secs(5)).await;
    assert_eq!(dls.count(&DeadLetterQuery::all()).await.unwrap(), 1);
    let failed = b.browse("orders_failed", &Browse::oldest()).await.unwrap();
    assert_eq!(failed.len(), 1, "nothing was forwarded");
    assert_eq!(&failed[0].payload[..], b"occupied");
}
