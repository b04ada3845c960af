//! Behaviour of the embedded engine that the backend-agnostic suite cannot see: what survives a
//! close and reopen, recovery of deliveries in flight at a crash, the directory lock, torn tails
//! and corruption.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use relq::{
    Backend, BackendErrorKind, Broker, DamageKind, EmbeddedBackend, EmbeddedConfig, NewMessage,
    Recovery, Retention, Settlement, StartPosition,
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relq-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn small() -> EmbeddedConfig {
    EmbeddedConfig::default().segment_size(16 * 1024)
}

fn open(dir: &TempDir) -> EmbeddedBackend {
    EmbeddedBackend::open_with(dir.path(), small()).expect("open")
}

/// Publishes `n` messages in batches of 10 (a batch goes into one segment, so many batches
/// span several).
async fn publish(b: &EmbeddedBackend, topic: &str, n: usize, size: usize) -> Vec<relq::MessageId> {
    let mut ids = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let batch = chunk
            .iter()
            .map(|i| relq::Outgoing {
                kind: "job".into(),
                payload: bytes::Bytes::from(format!("{i:0size$}")),
                headers: Default::default(),
                deliver_at: None,
                dedup_window: None,
            })
            .collect();
        ids.extend(b.publish(topic, batch).await.expect("publish"));
    }
    ids
}

fn segments(dir: &TempDir) -> Vec<PathBuf> {
    let topics = dir.path().join("topics");
    let mut out = Vec::new();
    for t in std::fs::read_dir(topics).unwrap() {
        for s in std::fs::read_dir(t.unwrap().path()).unwrap() {
            out.push(s.unwrap().path());
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_acknowledged_survives_a_reopen() {
    let dir = TempDir::new("reopen");
    let ids;
    {
        let b = open(&dir);
        let sub = b
            .join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        ids = publish(&b, "t", 300, 100).await; // several segments
        let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 100);
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        b.settle(&sub, &acks).await.unwrap();
    }
    assert!(segments(&dir).len() > 2, "the test spans segments");
    let b = open(&dir);
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 300);
    assert_eq!(info.last_id, ids.last().copied());
    let g = &info.groups[0];
    assert_eq!(
        (g.pending, g.lag),
        (0, 200),
        "acks survived; the rest is unread"
    );
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let rest = b.read(&sub, 1000, Duration::ZERO).await.unwrap();
    let got: Vec<_> = rest.iter().map(|d| d.message.id).collect();
    assert_eq!(
        got,
        ids[100..].to_vec(),
        "exactly the unacknowledged ones, in order"
    );
    assert!(rest.iter().all(|d| d.message.attempt == 1));
    // Publishing continues after the recovered tail with fresh ids.
    let more = publish(&b, "t", 5, 10).await;
    assert!(more[0] > *ids.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_flight_at_a_crash_come_back_with_the_delivery_counted() {
    let dir = TempDir::new("inflight");
    {
        let b = open(&dir);
        let sub = b
            .join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        publish(&b, "t", 10, 10).await;
        let got = b.read(&sub, 4, Duration::ZERO).await.unwrap();
        // Two acked, two in flight when the process "dies".
        b.settle(
            &sub,
            &[
                Settlement::Ack(got[0].message.id),
                Settlement::Ack(got[2].message.id),
            ],
        )
        .await
        .unwrap();
    }
    let b = open(&dir);
    let sub = b
        .join("t", "g", "other", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
    let seen: Vec<(u64, u32)> = got
        .iter()
        .map(|d| (d.message.id.seq, d.message.attempt))
        .collect();
    assert_eq!(
        seen,
        [
            (1, 2),
            (3, 2),
            (4, 1),
            (5, 1),
            (6, 1),
            (7, 1),
            (8, 1),
            (9, 1)
        ],
        "in-flight ones first (second delivery), then the unread ones"
    );
    // A crash during the redelivery counts again: the count is durable.
    drop(b);
    let b = open(&dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 2, Duration::ZERO).await.unwrap();
    let seen: Vec<(u64, u32)> = got
        .iter()
        .map(|d| (d.message.id.seq, d.message.attempt))
        .collect();
    assert_eq!(seen, [(1, 3), (3, 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_open_of_the_directory_is_refused_clearly() {
    let dir = TempDir::new("lock");
    let b = open(&dir);
    let e = EmbeddedBackend::open(dir.path()).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Unavailable);
    assert!(e.to_string().contains("in use"), "{e}");
    drop(b);
    EmbeddedBackend::open(dir.path()).expect("free again after close");
}

/// Garbage after the log's end, after a clean close: no write of that session can have been
/// torn (it synced everything before it recorded the close), so it is corruption, not a torn
/// tail: refused, nothing changed. The operator's cut drops it, and the offsets it could have
/// held are not handed out. (A torn tail after a crash is cut at open: the simulated power
/// losses and kills in `crates/relq-embedded/src/sim_tests.rs` and the kill -9 loop test that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_end_after_a_clean_close_is_corruption_and_the_operator_can_cut_it() {
    let dir = TempDir::new("torn");
    let ids = {
        let b = open(&dir);
        publish(&b, "t", 5, 10).await
    };
    // What a torn write would leave: garbage where the next record would go.
    let seg = segments(&dir).pop().unwrap();
    let data = std::fs::read(&seg).unwrap();
    let end = data.iter().rposition(|b| *b != 0).unwrap() + 1;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(
        &[0x30, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3],
        end as u64,
    )
    .unwrap();
    drop(f);
    let damaged = std::fs::read(&seg).unwrap();
    let e = EmbeddedBackend::open_with(dir.path(), small()).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Corrupt, "{e}");
    for want in ["closed cleanly", "relq check", "CutDamagedTail"] {
        assert!(e.message.contains(want), "{want:?} missing from: {e}");
    }
    assert_eq!(std::fs::read(&seg).unwrap(), damaged, "nothing changed");
    let b =
        EmbeddedBackend::open_with(dir.path(), small().recovery(Recovery::CutDamagedTail)).unwrap();
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 5, "the acknowledged records are all there");
    assert_eq!(info.last_id, ids.last().copied());
    let more = publish(&b, "t", 3, 10).await;
    assert!(
        more[0].seq > 5,
        "offset 5 could have been handed out: {}",
        more[0]
    );
    drop(b);
    let b = open(&dir);
    assert_eq!(b.topic_info("t").await.unwrap().unwrap().length, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_inside_a_sealed_segment_is_an_error_not_a_truncation() {
    let dir = TempDir::new("corrupt");
    {
        let b = open(&dir);
        publish(&b, "t", 300, 100).await;
    }
    let segs = segments(&dir);
    assert!(segs.len() > 2);
    let sealed = &segs[0];
    let mut data = std::fs::read(sealed).unwrap();
    data[200] ^= 0x40;
    std::fs::write(sealed, &data).unwrap();
    let b = open(&dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let e = b.read(&sub, 1000, Duration::ZERO).await.unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Corrupt, "{e}");
    let e = b.topic_info("t").await.unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Corrupt, "{e}");
    drop(b);
    // Nothing was cut: the segment is as it was, for an operator to inspect or restore.
    assert_eq!(std::fs::read(sealed).unwrap(), data);
    assert_eq!(segments(&dir), segs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_whole_segments_once_every_group_is_past_them() {
    let dir = TempDir::new("retention");
    let b = open(&dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    publish(&b, "t", 300, 100).await;
    let before = segments(&dir).len();
    let keep = Retention::default().min_age(Duration::ZERO);
    assert_eq!(b.cleanup("t", &keep).await.unwrap().removed, 0);
    assert_eq!(segments(&dir).len(), before, "nothing acknowledged yet");
    let got = b.read(&sub, 250, Duration::ZERO).await.unwrap();
    let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
    b.settle(&sub, &acks).await.unwrap();
    let r = b.cleanup("t", &keep).await.unwrap();
    assert_eq!(r.removed, 250);
    let after = segments(&dir).len();
    assert!(
        after < before,
        "segments below the acknowledged floor are gone ({before} -> {after})"
    );
    drop(b);
    let b = open(&dir);
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 50);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let rest = b.read(&sub, 1000, Duration::ZERO).await.unwrap();
    assert_eq!(rest.len(), 50);
    assert_eq!(rest[0].message.id.seq, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_open_and_file_urls_use_the_engine() {
    let dir = TempDir::new("url");
    let url = format!("file://{}", dir.path().display());
    {
        let b = Broker::connect(&url).await.unwrap();
        assert_eq!(b.backend().name(), "embedded");
        b.publish("t", NewMessage::new("job", "x")).await.unwrap();
    }
    let b = Broker::open(dir.path()).unwrap();
    assert_eq!(b.topic_info("t").await.unwrap().length, 1);
    assert!(Broker::connect("file://").await.is_err());
}

#[test]
fn invalid_configuration_is_refused() {
    let dir = TempDir::new("config");
    let e = EmbeddedBackend::open_with(dir.path(), EmbeddedConfig::default().segment_size(10))
        .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Invalid);
    let e = EmbeddedBackend::open_with(
        dir.path(),
        EmbeddedConfig::default().durability(relq::Durability::Periodic(Duration::ZERO)),
    )
    .unwrap_err();
    assert!(e.to_string().contains("interval"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_durability_works_and_keeps_publishes_across_a_reopen() {
    let dir = TempDir::new("periodic");
    let config = small().durability(relq::Durability::Periodic(Duration::from_millis(20)));
    let ids = {
        let b = EmbeddedBackend::open_with(dir.path(), config.clone()).unwrap();
        let sub = b
            .join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        let ids = publish(&b, "t", 50, 10).await;
        let got = b.read(&sub, 20, Duration::ZERO).await.unwrap();
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        b.settle(&sub, &acks).await.unwrap();
        // Past the interval, the acks were synced too.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(b.stats().syncs > 0, "the periodic sync ran");
        ids
    };
    let b = EmbeddedBackend::open_with(dir.path(), config).unwrap();
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.last_id, ids.last().copied());
    assert_eq!(info.groups[0].lag, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_min_age_splits_exactly_between_old_and_young_messages() {
    let dir = TempDir::new("minage");
    let b = open(&dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let old = publish(&b, "t", 7, 10).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let young_at = std::time::Instant::now();
    publish(&b, "t", 5, 10).await;
    let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
    let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
    b.settle(&sub, &acks).await.unwrap();
    // The cutoff falls 600 ms before the young messages were published, however long the steps
    // since then took (a loaded CI machine): between the two groups.
    let min_age = young_at.elapsed() + Duration::from_millis(600);
    let r = b
        .cleanup("t", &Retention::default().min_age(min_age))
        .await
        .unwrap();
    assert_eq!(r.removed, 7, "exactly the messages older than min_age");
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 5);
    assert!(info.first_id.unwrap() > *old.last().unwrap());
}

/// Publishes `n` messages due `after` from now (in one batch), then `normal` immediate ones.
async fn publish_delayed(
    b: &EmbeddedBackend,
    topic: &str,
    n: usize,
    after: Duration,
    normal: usize,
) -> Vec<relq::MessageId> {
    let at = relq::Timestamp::now().plus(after);
    let msg = |i: usize, deliver_at| relq::Outgoing {
        kind: "job".into(),
        payload: bytes::Bytes::from(format!("m{i}")),
        headers: Default::default(),
        deliver_at,
        dedup_window: None,
    };
    let mut batch: Vec<relq::Outgoing> = (0..n).map(|i| msg(i, Some(at))).collect();
    batch.extend((n..n + normal).map(|i| msg(i, None)));
    b.publish(topic, batch).await.expect("publish")
}

/// Reads (acking everything) until `want` messages arrived or `limit` passed.
async fn read_all(
    b: &EmbeddedBackend,
    sub: &relq::Subscription,
    want: usize,
    limit: Duration,
) -> Vec<relq::Delivery> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    while out.len() < want && tokio::time::Instant::now() < deadline {
        let got = b.read(sub, 500, Duration::from_millis(100)).await.unwrap();
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        b.settle(sub, &acks).await.unwrap();
        out.extend(got);
    }
    out
}

/// Waits until the engine has moved `n` rows out of memory.
async fn wait_spilled(b: &EmbeddedBackend, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.stats().rows_spilled < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} rows left memory",
            b.stats().rows_spilled
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_future_messages_wait_in_the_state_database_not_in_memory() {
    let dir = TempDir::new("spill");
    let b = open(&dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let ids = publish_delayed(&b, "t", 2000, Duration::from_secs(3600), 5).await;
    // The group reads past the delayed messages to the five after them.
    let got = read_all(&b, &sub, 5, Duration::from_secs(10)).await;
    let seqs: Vec<u64> = got.iter().map(|d| d.message.id.seq).collect();
    assert_eq!(seqs, (2000..2005).collect::<Vec<u64>>());
    wait_spilled(&b, 2000).await;
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.groups[0].scheduled, 2000);
    drop(b);
    // Reopened, they are still scheduled (and not loaded into memory).
    let b = open(&dir);
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.groups[0].scheduled, 2000);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    assert!(b
        .read(&sub, 10, Duration::from_millis(50))
        .await
        .unwrap()
        .is_empty());
    // Stopped while spilled: the row comes back into memory, parked.
    assert!(b.stop_message("t", ids[7]).await.unwrap());
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!((info.groups[0].scheduled, info.groups[0].parked), (1999, 1));
    assert_eq!(b.stats().rows_unspilled, 1);
    // Resumed: delivered now, with its payload.
    assert!(b.resume_message("t", ids[7]).await.unwrap());
    let got = read_all(&b, &sub, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].message.id, &got[0].message.payload[..]),
        (ids[7], &b"m7"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_messages_come_back_in_due_order_across_a_reopen() {
    let dir = TempDir::new("unspill");
    let config = small().resident_window(Duration::ZERO);
    let b = EmbeddedBackend::open_with(dir.path(), config.clone()).unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let mut ids = publish_delayed(&b, "t", 300, Duration::from_millis(1500), 1).await;
    ids.pop();
    let early = publish_delayed(&b, "t", 200, Duration::from_millis(1000), 0).await;
    assert_eq!(
        read_all(&b, &sub, 1, Duration::from_secs(10)).await.len(),
        1
    );
    // Read past the second batch too; nothing is due yet.
    assert!(b.read(&sub, 1000, Duration::ZERO).await.unwrap().is_empty());
    wait_spilled(&b, 500).await;
    drop(b);
    let b = EmbeddedBackend::open_with(dir.path(), config).unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = read_all(&b, &sub, 500, Duration::from_secs(10)).await;
    let got: Vec<relq::MessageId> = got.iter().map(|d| d.message.id).collect();
    // The ones due earlier first, each batch in offset order; each exactly once.
    let want: Vec<relq::MessageId> = early.iter().chain(&ids).copied().collect();
    assert_eq!(got, want);
    assert_eq!(b.stats().rows_unspilled, 500);
    assert_eq!(
        b.topic_info("t").await.unwrap().unwrap().groups[0].scheduled,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_segments_of_spilled_messages() {
    let dir = TempDir::new("spill-retention");
    let b =
        EmbeddedBackend::open_with(dir.path(), small().resident_window(Duration::ZERO)).unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let delayed = publish_delayed(&b, "t", 1, Duration::from_millis(1500), 0).await;
    publish(&b, "t", 300, 100).await;
    assert_eq!(
        read_all(&b, &sub, 300, Duration::from_secs(10)).await.len(),
        300
    );
    wait_spilled(&b, 1).await;
    let keep = Retention::default().min_age(Duration::ZERO);
    assert_eq!(b.cleanup("t", &keep).await.unwrap().removed, 0);
    // It comes due and is delivered from the log, which retention could not cut.
    let got = read_all(&b, &sub, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].message.id, &got[0].message.payload[..]),
        (delayed[0], &b"m0"[..])
    );
    assert_eq!(b.cleanup("t", &keep).await.unwrap().removed, 301);

    // max_len trims unacknowledged messages, spilled ones included.
    publish_delayed(&b, "t", 50, Duration::from_secs(3600), 1).await;
    assert_eq!(
        read_all(&b, &sub, 1, Duration::from_secs(10)).await.len(),
        1
    );
    wait_spilled(&b, 51).await;
    assert_eq!(
        b.topic_info("t").await.unwrap().unwrap().groups[0].scheduled,
        50
    );
    let r = b.cleanup("t", &keep.clone().max_len(0)).await.unwrap();
    assert_eq!(r.trimmed_unacknowledged + r.removed, 51);
    drop(b);
    let b = EmbeddedBackend::open_with(dir.path(), small()).unwrap();
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!((info.length, info.groups[0].scheduled), (0, 0));
}

/// The start position of each record in a segment file (until the first zero length).
fn record_starts(seg: &Path) -> Vec<u64> {
    let data = std::fs::read(seg).unwrap();
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        out.push(pos as u64);
        pos += 8 + len;
    }
    out
}

/// Publishes `n` messages one by one, has group `g` read and acknowledge them, and closes.
async fn published_and_acked(dir: &TempDir, n: usize) -> Vec<relq::MessageId> {
    let b = open(dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.extend(publish(&b, "t", 1, 10 + i).await);
    }
    let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), n);
    let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
    b.settle(&sub, &acks).await.unwrap();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_followed_by_valid_ones_is_corruption_not_a_torn_tail() {
    let dir = TempDir::new("active-corrupt");
    let ids = published_and_acked(&dir, 5).await;
    let seg = segments(&dir).pop().unwrap();
    let starts = record_starts(&seg);
    assert_eq!(starts.len(), 5);
    // Four bytes inside record 2 (offset 1), in its body.
    let before = std::fs::read(&seg).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xde, 0xad, 0xbe, 0xef], starts[1] + 20)
            .unwrap();
    }
    let damaged = std::fs::read(&seg).unwrap();
    assert_ne!(before, damaged);
    let e = EmbeddedBackend::open_with(dir.path(), small()).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    let name = seg.file_name().unwrap().to_str().unwrap();
    for want in [
        "\"t\"",
        name,
        &format!("position {}", starts[1]),
        "offset 0",
        "offset 2",
        "3 valid records",
        "relq check",
    ] {
        assert!(msg.contains(want), "{want:?} missing from: {msg}");
    }
    // Nothing was cut: the segment is as the damage left it.
    assert_eq!(std::fs::read(&seg).unwrap(), damaged);

    // `relq check` sees the same, and changes nothing either.
    let report = EmbeddedBackend::check(dir.path()).unwrap();
    assert!(!report.is_ok());
    let t = &report.topics[0];
    assert_eq!(t.damage.len(), 1, "{report:#?}");
    let d = &t.damage[0];
    assert_eq!(d.kind, DamageKind::Corruption);
    assert_eq!(d.position, starts[1]);
    assert_eq!(d.last_good_offset, Some(0));
    assert_eq!(
        (d.records_after, d.first_offset_after, d.last_offset_after),
        (3, Some(2), Some(4))
    );
    assert!(
        t.state_problems.iter().any(|p| p.contains("\"g\"")),
        "group g read past the damage: {report:#?}"
    );
    assert_eq!(std::fs::read(&seg).unwrap(), damaged);

    // The operator's decision: cut the damaged tail.
    let b = EmbeddedBackend::open_with(dir.path(), small().recovery(Recovery::CutDamagedTail))
        .expect("open with repair");
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 1, "record 0 is kept");
    assert_eq!(info.last_id, Some(ids[0]));
    let new = publish(&b, "t", 1, 10).await;
    assert!(
        ids.iter().all(|id| new[0].seq > id.seq),
        "offset {} handed out again",
        new[0].seq
    );
    // Group g had passed the old offsets: it still receives the new message.
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|d| d.message.id.seq).collect();
    assert_eq!(seqs, [new[0].seq]);
    drop(b);
    // Repaired for good: a plain open works, and a new group reads what is stored.
    let b = open(&dir);
    let sub = b
        .join("t", "fresh", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|d| d.message.id.seq).collect();
    assert_eq!(seqs, [0, new[0].seq]);
    drop(b);
    let report = EmbeddedBackend::check(dir.path()).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    // At least the four dropped records' offsets (1 to 4); the damaged bytes could have held
    // more records, whose offsets are skipped too.
    assert!(
        report.topics[0].skipped_offsets >= 4,
        "{}",
        report.topics[0].skipped_offsets
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_truncated_mid_record_is_corruption_and_its_offsets_are_not_reused() {
    let dir = TempDir::new("truncated");
    let ids = published_and_acked(&dir, 5).await;
    let seg = segments(&dir).pop().unwrap();
    let starts = record_starts(&seg);
    // Mid-record 3 (offset 2): nothing valid follows. After a clean close no write can have
    // been torn, so it is corruption: refused, nothing changed.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(starts[2] + 10)
        .unwrap();
    let damaged = std::fs::read(&seg).unwrap();
    let e = EmbeddedBackend::open_with(dir.path(), small()).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("runs past the file"), "{e}");
    assert_eq!(std::fs::read(&seg).unwrap(), damaged, "nothing changed");
    // The operator's cut.
    let b =
        EmbeddedBackend::open_with(dir.path(), small().recovery(Recovery::CutDamagedTail)).unwrap();
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 2, "records 0 and 1 are kept");
    assert_eq!(info.last_id, Some(ids[1]));
    // Group g had read and acknowledged offsets up to 4: a new message must come after them,
    // or g would never receive it.
    let new = publish(&b, "t", 1, 10).await;
    assert!(
        new[0].seq > ids[4].seq,
        "offset {} handed out again (the group passed {})",
        new[0].seq,
        ids[4].seq
    );
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|d| d.message.id.seq).collect();
    assert_eq!(seqs, [new[0].seq], "group g receives the new message");
    drop(b);
    // The skip survives a reopen: a new group reads what is stored, in order.
    let b = open(&dir);
    let sub = b
        .join("t", "fresh", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|d| d.message.id.seq).collect();
    assert_eq!(seqs, [0, 1, new[0].seq]);
    assert_eq!(b.topic_info("t").await.unwrap().unwrap().length, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_over_the_state_database_are_a_corrupt_error_not_a_panic() {
    let dir = TempDir::new("state-corrupt");
    {
        let b = open(&dir);
        for t in ["a", "b", "c"] {
            let sub = b.join(t, "g", "c", StartPosition::Earliest).await.unwrap();
            publish(&b, t, 50, 10).await;
            let got = b.read(&sub, 20, Duration::ZERO).await.unwrap();
            let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
            b.settle(&sub, &acks).await.unwrap();
        }
    }
    let path = dir.path().join("state.redb");
    let pristine = std::fs::read(&path).unwrap();
    // 4 KiB of pseudo-random bytes over each 4 KiB page of the file in turn (the middle of a
    // small database may be a free page; others hold the B-trees).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut corrupt = 0;
    for page in 0..pristine.len() / 4096 {
        let mut data = pristine.clone();
        data[page * 4096..(page + 1) * 4096].copy_from_slice(&junk);
        std::fs::write(&path, &data).unwrap();
        let opened = std::panic::catch_unwind(|| EmbeddedBackend::open_with(dir.path(), small()));
        match opened {
            Err(_) => panic!("opening a state database damaged at page {page} panicked"),
            Ok(Err(e)) => {
                assert_eq!(e.kind, BackendErrorKind::Corrupt, "page {page}: {e}");
                let msg = e.to_string();
                assert!(msg.contains("state.redb"), "{msg}");
                assert!(msg.contains("relq check"), "{msg}");
                corrupt += 1;
            }
            // A free page: nothing read it.
            Ok(Ok(b)) => drop(b),
        }
    }
    assert!(corrupt > 0, "some damage must be found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reads_a_directory_in_use_and_changes_nothing() {
    let dir = TempDir::new("check");
    let b = open(&dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    publish(&b, "t", 300, 100).await;
    let got = b.read(&sub, 50, Duration::ZERO).await.unwrap();
    let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
    b.settle(&sub, &acks).await.unwrap();
    let files = |dir: &TempDir| -> Vec<(PathBuf, Vec<u8>)> {
        let mut out: Vec<(PathBuf, Vec<u8>)> = segments(dir)
            .into_iter()
            .map(|p| {
                let data = std::fs::read(&p).unwrap();
                (p, data)
            })
            .collect();
        let db = dir.path().join("state.redb");
        out.push((db.clone(), std::fs::read(&db).unwrap()));
        out
    };
    let before = files(&dir);
    // While `b` holds the directory.
    let report = EmbeddedBackend::check(dir.path()).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    let t = &report.topics[0];
    assert_eq!((t.topic.as_str(), t.records, t.end_offset), ("t", 300, 300));
    assert!(t.segments > 2);
    assert_eq!(files(&dir), before, "the check changed nothing");
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"records\":300"), "{json}");
    drop(b);

    // Damage in a sealed segment is found too, and stays as it is.
    let sealed = segments(&dir)[0].clone();
    let mut data = std::fs::read(&sealed).unwrap();
    data[200] ^= 0x40;
    std::fs::write(&sealed, &data).unwrap();
    let report = EmbeddedBackend::check(dir.path()).unwrap();
    assert!(!report.is_ok());
    let d = &report.topics[0].damage[0];
    assert_eq!(d.kind, DamageKind::Corruption);
    assert_eq!(d.segment, sealed);
    assert_eq!(std::fs::read(&sealed).unwrap(), data);
    assert!(EmbeddedBackend::check(dir.path().join("nope")).is_err());
}

/// Waits for `f`, failing the test if it takes longer than a few seconds (a hang detector).
async fn prompt<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

fn outgoing(kind: &str, headers: BTreeMap<String, String>) -> relq::Outgoing {
    relq::Outgoing {
        kind: kind.into(),
        payload: bytes::Bytes::from_static(b"payload"),
        headers,
        deliver_at: None,
        dedup_window: None,
    }
}

/// `Backend::publish` is public, so a caller can reach the engine without the broker's checks.
/// The engine checks what it stores itself: a type or headers over the limits (which its record
/// format could not even encode: a 70,000-byte header name, 70,000 headers) are refused with a
/// clear `Invalid` error, alone or in a batch with valid messages; nothing of such a batch is
/// stored, and the engine keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_refuses_messages_over_the_limits_and_stays_healthy() {
    let dir = TempDir::new("limits");
    let b = open(&dir);
    let none = BTreeMap::new;
    let long_name = BTreeMap::from([("k".repeat(70_000), "v".to_owned())]);
    let many: BTreeMap<String, String> = (0..70_000)
        .map(|i| (format!("h{i}"), String::new()))
        .collect();
    let long_value = BTreeMap::from([("k".to_owned(), "v".repeat(70_000))]);
    let cases = [
        (
            "a 70,000-byte header name",
            outgoing("job", long_name),
            "header",
        ),
        ("70,000 headers", outgoing("job", many), "header"),
        (
            "a 70,000-byte header value",
            outgoing("job", long_value),
            "header",
        ),
        (
            "a 70,000-byte type",
            outgoing(&"t".repeat(70_000), none()),
            "type",
        ),
        ("an empty type", outgoing("", none()), "type"),
    ];
    for (what, bad, word) in cases {
        for batch in [vec![bad.clone()], vec![outgoing("job", none()), bad]] {
            let n = batch.len();
            let e = prompt(what, b.publish("t", batch))
                .await
                .expect_err("refused");
            assert_eq!(e.kind, BackendErrorKind::Invalid, "{what}: {e}");
            assert!(e.message.contains(word), "{what} (batch of {n}): {e}");
            assert!(
                e.message.contains("nothing was published"),
                "{what} (batch of {n}): {e}"
            );
            assert!(e.message.len() < 500, "the input is not echoed back: {e}");
        }
    }
    assert!(
        b.topic_info("t").await.unwrap().is_none(),
        "nothing was stored (not even the topic)"
    );
    // Healthy: a normal publish and read work.
    let ids = prompt("publish", b.publish("t", vec![outgoing("job", none())]))
        .await
        .unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = prompt("read", b.read(&sub, 10, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id, ids[0]);
    assert_eq!(b.topic_info("t").await.unwrap().unwrap().length, 1);
}

/// Every entry under `root` (recursively): path, size, modification time, permissions and
/// content.
type Listing = Vec<(PathBuf, u64, std::time::SystemTime, u32, Vec<u8>)>;

fn listing(root: &Path) -> Listing {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let data = if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            Vec::new()
        } else {
            std::fs::read(&p).unwrap()
        };
        out.push((
            p,
            meta.len(),
            meta.modified().unwrap(),
            meta.permissions().mode(),
            data,
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Makes every directory and file under `root` read-only (or writable again).
fn set_read_only(root: &Path, read_only: bool) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_owned()];
    let mut all = Vec::new();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        all.push(p);
    }
    // Children first when locking, parents first when unlocking.
    if read_only {
        all.reverse();
    }
    for p in all {
        let mode = match (p.is_dir(), read_only) {
            (true, true) => 0o555,
            (true, false) => 0o755,
            (false, true) => 0o444,
            (false, false) => 0o644,
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Every call that would change the directory fails at once with `Invalid`, saying why.
async fn assert_refused_read_only(ro: &EmbeddedBackend, sub: &relq::Subscription) {
    let id = relq::MessageId::new(1, 0);
    let dl = relq::DeadLetterId::new(1, 0);
    let mut results: Vec<(&str, Result<(), relq::BackendError>)> = Vec::new();
    let mut add = |what, r: Result<(), relq::BackendError>| results.push((what, r));
    add(
        "publish",
        prompt(
            "publish",
            ro.publish("t", vec![outgoing("job", BTreeMap::new())]),
        )
        .await
        .map(drop),
    );
    add(
        "join",
        prompt("join", ro.join("t", "g2", "c", StartPosition::Earliest))
            .await
            .map(drop),
    );
    add(
        "read",
        prompt("read", ro.read(sub, 10, Duration::from_secs(30)))
            .await
            .map(drop),
    );
    add(
        "recover",
        prompt("recover", ro.recover(sub, relq::MessageId::ZERO, 10))
            .await
            .map(drop),
    );
    add(
        "claim",
        prompt("claim", ro.claim(sub, Duration::ZERO, 10))
            .await
            .map(drop),
    );
    add(
        "settle",
        prompt("settle", ro.settle(sub, &[Settlement::Ack(id)])).await,
    );
    add(
        "stop",
        prompt("stop", ro.stop_message("t", id)).await.map(drop),
    );
    add(
        "resume",
        prompt("resume", ro.resume_message("t", id)).await.map(drop),
    );
    add(
        "terminate",
        prompt("terminate", ro.terminate("t")).await.map(drop),
    );
    add(
        "cleanup",
        prompt(
            "cleanup",
            ro.cleanup("t", &Retention::default().min_age(Duration::ZERO)),
        )
        .await
        .map(drop),
    );
    add(
        "replay",
        prompt("replay", ro.replay_dead_letters("t", &[dl]))
            .await
            .map(drop),
    );
    add(
        "delete",
        prompt("delete", ro.delete_dead_letters("t", &[dl]))
            .await
            .map(drop),
    );
    add(
        "purge",
        prompt("purge", ro.purge_dead_letters("t", relq::Timestamp::MAX))
            .await
            .map(drop),
    );
    for (what, r) in results {
        let e = r.expect_err(what);
        assert_eq!(e.kind, BackendErrorKind::Invalid, "{what}: {e}");
        assert!(e.message.contains("read-only"), "{what}: {e}");
    }
}

/// `EmbeddedBackend::open_read_only` serves topics, topic info and dead letters from what is on
/// disk, without the directory lock and without writing anything: it works while another
/// process holds the directory, on a directory whose permissions forbid writing, and over a torn
/// tail (which it serves up to, and does not cut). Every file is exactly as it was afterwards
/// (the tests run as root, which ignores permissions, so that is what shows nothing was
/// written). Every call that would change anything is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_inspects_a_directory_in_use_and_changes_nothing() {
    let dir = TempDir::new("read-only");
    let b = open(&dir);
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let ids = publish(&b, "t", 300, 100).await;
    publish(&b, "u", 3, 10).await;
    let got = b.read(&sub, 50, Duration::ZERO).await.unwrap();
    let failure = relq::AttemptFailure {
        attempt: 1,
        at: relq::Timestamp::now(),
        consumer: "c".into(),
        kind: relq::FailureKind::Permanent,
        error: "bad".into(),
    };
    let mut settle: Vec<Settlement> = got[..40]
        .iter()
        .map(|d| Settlement::Ack(d.message.id))
        .collect();
    for d in &got[40..42] {
        let dl = relq::DeadLetter::new(d.message.clone(), "t", "g", failure.clone());
        settle.push(Settlement::DeadLetter(Box::new(dl)));
    }
    b.settle(&sub, &settle).await.unwrap();

    set_read_only(dir.path(), true);
    let before = listing(dir.path());
    // While `b` holds the directory (and its state database is open for writing).
    let ro = EmbeddedBackend::open_read_only(dir.path()).expect("read-only open");
    assert_eq!(ro.topics().await.unwrap(), ["t", "u"]);
    let info = ro.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 300);
    assert_eq!(
        (info.first_id, info.last_id),
        (Some(ids[0]), Some(ids[299]))
    );
    assert_eq!(info.dead_letters, 2);
    assert_eq!(info.groups.len(), 1);
    assert_eq!(info.groups[0].name, "g");
    assert_eq!(info.groups[0].cursor, ids[49]);
    assert_eq!(info.groups[0].lag, 250);
    assert_eq!(ro.topic_info("u").await.unwrap().unwrap().length, 3);
    assert!(ro.topic_info("nope").await.unwrap().is_none());
    let dead = ro
        .dead_letters("t", &relq::DeadLetterQuery::all())
        .await
        .unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].message.id, got[40].message.id);
    let one = ro.dead_letter("t", dead[1].id).await.unwrap().unwrap();
    assert_eq!(one.message.id, got[41].message.id);
    assert_eq!(ro.dead_letter_stats("t").await.unwrap().total, 2);
    assert_refused_read_only(&ro, &sub).await;
    drop(ro);
    assert!(
        listing(dir.path()) == before,
        "the read-only open changed files"
    );

    // The writer is still fine, and once it closed, a torn tail (garbage after the last record
    // of the active segment) is served up to, not cut.
    b.publish("t", vec![outgoing("job", BTreeMap::new())])
        .await
        .unwrap();
    drop(b);
    set_read_only(dir.path(), false);
    let active = segments(&dir)
        .into_iter()
        .rev()
        .find(|p| {
            let topic_dir = p.parent().unwrap().file_name().unwrap();
            topic_dir.to_string_lossy().starts_with("t@")
                && p.extension().is_some_and(|e| e == "seg")
        })
        .unwrap();
    let mut data = std::fs::read(&active).unwrap();
    let last = *record_starts(&active).last().unwrap() as usize;
    let end = last + 8 + u32::from_le_bytes(data[last..last + 4].try_into().unwrap()) as usize;
    data[end..end + 20].copy_from_slice(&[0xAB; 20]);
    std::fs::write(&active, &data).unwrap();
    set_read_only(dir.path(), true);
    let before = listing(dir.path());
    let ro = EmbeddedBackend::open_read_only(dir.path()).expect("read-only open over a torn tail");
    assert_eq!(ro.topic_info("t").await.unwrap().unwrap().length, 301);
    drop(ro);
    assert!(
        listing(dir.path()) == before,
        "the torn tail was left as it is"
    );
    set_read_only(dir.path(), false);

    // A directory that does not exist is an error, and is not created.
    let missing = dir.path().join("missing");
    assert!(EmbeddedBackend::open_read_only(&missing).is_err());
    assert!(!missing.exists());
}

/// `max_len` counts stored records, not offsets: a gap of offsets skipped after damage holds
/// none. With 500-odd unread records, a gap of 10,000 offsets, then 40 records, a `max_len`
/// above the stored count trims nothing, and a smaller one trims exactly the excess; the
/// report counts records, never skipped offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_len_retention_counts_stored_records_across_a_gap() {
    let dir = TempDir::new("maxlen-gap");
    {
        let b = open(&dir);
        // g never reads; h reads and acknowledges everything.
        b.join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        let h = b
            .join("t", "h", "c", StartPosition::Earliest)
            .await
            .unwrap();
        publish(&b, "t", 10_500, 10).await;
        loop {
            let got = b.read(&h, 1000, Duration::ZERO).await.unwrap();
            if got.is_empty() {
                break;
            }
            let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
            b.settle(&h, &acks).await.unwrap();
        }
    }
    // Lose every segment from the one holding offset 600 on (damage): h had read up to 10,500,
    // so the log skips to there and leaves a gap.
    let segs = segments(&dir);
    let base = |p: &PathBuf| -> u64 { p.file_stem().unwrap().to_str().unwrap().parse().unwrap() };
    let cut = segs.iter().position(|p| base(p) > 600).unwrap();
    for p in &segs[cut..] {
        std::fs::remove_file(p).unwrap();
    }
    let b = open(&dir);
    let stored = b.topic_info("t").await.unwrap().unwrap().length;
    assert!((600..2000).contains(&stored), "{stored}");
    let new = publish(&b, "t", 40, 10).await;
    assert!(new[0].seq >= 10_500, "{}", new[0]);
    let len = stored + 40;
    assert_eq!(b.topic_info("t").await.unwrap().unwrap().length, len);
    let keep_all = Retention::default()
        .min_age(Duration::from_secs(3600))
        .max_len(len);
    let r = b.cleanup("t", &keep_all).await.unwrap();
    assert_eq!((r.removed, r.trimmed_unacknowledged), (0, 0), "{r:?}");
    assert_eq!(b.topic_info("t").await.unwrap().unwrap().length, len);
    let trim = Retention::default()
        .min_age(Duration::from_secs(3600))
        .max_len(len - 100);
    let r = b.cleanup("t", &trim).await.unwrap();
    assert_eq!((r.removed, r.trimmed_unacknowledged), (0, 100), "{r:?}");
    assert_eq!(b.topic_info("t").await.unwrap().unwrap().length, len - 100);
}

/// A gap marker or a segment file naming an offset near `u64::MAX` (damage, or a file someone
/// put there) is refused as corruption at open, never trusted: offsets would otherwise wrap
/// and be handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_offsets_in_file_names_are_refused_as_corruption() {
    for name in [
        format!("{:020}-{:020}.gap", 0, u64::MAX),
        format!("{:020}.seg", u64::MAX),
    ] {
        let dir = TempDir::new("huge-offset");
        {
            let b = open(&dir);
            publish(&b, "t", 3, 8).await;
        }
        let topic = segments(&dir)[0].parent().unwrap().to_path_buf();
        std::fs::write(topic.join(&name), b"").unwrap();
        match EmbeddedBackend::open_with(dir.path(), small()) {
            Err(e) => assert_eq!(e.kind, relq::BackendErrorKind::Corrupt, "{name}: {e}"),
            Ok(_) => panic!("{name}: an implausible offset was accepted"),
        }
    }
}

/// Publishes `key` on topic "t" with a window of `window`.
async fn publish_keyed(b: &Broker, key: &str, window: Duration) -> relq::MessageId {
    let b = b.clone().with_topic_dedup_window("t", window).unwrap();
    b.publish(
        "t",
        NewMessage::new("job", key.to_owned()).idempotency_key(key),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_survive_reopens_until_their_window_ends() {
    let dir = TempDir::new("dedup");
    let long = Duration::from_secs(600);
    let short = Duration::from_millis(200);
    let (kept, brief) = {
        let b = Broker::new(open(&dir));
        let kept: Vec<_> = publish_keys(&b, 0..20, long).await;
        (kept, publish_keyed(&b, "brief", short).await)
        // Dropped: closed (power loss is `sim_tests::idempotency_keys_survive_simulated_power_loss`).
    };
    // The short window ends while the engine is down.
    tokio::time::sleep(short + Duration::from_millis(50)).await;
    {
        let b = Broker::new(open(&dir));
        assert_eq!(publish_keys(&b, 0..20, long).await, kept, "after a reopen");
        let again = publish_keyed(&b, "brief", short).await;
        assert_ne!(again, brief, "a key whose window ended is stored again");
        assert_eq!(b.topic_info("t").await.unwrap().length, 22);
        b.backend().close().await;
    }
    let b = Broker::new(open(&dir));
    assert_eq!(
        publish_keys(&b, 0..20, long).await,
        kept,
        "after a second reopen"
    );
    assert_eq!(b.topic_info("t").await.unwrap().length, 22);
}

/// Publishes keys `k<i>` for `range`, one publish each, and returns their ids.
async fn publish_keys(
    b: &Broker,
    range: std::ops::Range<usize>,
    window: Duration,
) -> Vec<relq::MessageId> {
    let mut ids = Vec::new();
    for i in range {
        ids.push(publish_keyed(b, &format!("k{i}"), window).await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_whose_message_was_cut_from_the_log_is_forgotten() {
    let dir = TempDir::new("dedup-cut");
    let long = Duration::from_secs(600);
    let ids = {
        let b = Broker::new(open(&dir));
        publish_keys(&b, 0..5, long).await
    };
    // Records 3 and 4 cut away (the operator's cut of a damaged tail): their keys' entries
    // point past the log's end and must not answer for messages that are gone.
    let seg = segments(&dir).pop().unwrap();
    let starts = record_starts(&seg);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(starts[3] + 10)
        .unwrap();
    let b = Broker::new(
        EmbeddedBackend::open_with(dir.path(), small().recovery(Recovery::CutDamagedTail)).unwrap(),
    );
    assert_eq!(b.topic_info("t").await.unwrap().length, 3);
    let again = publish_keys(&b, 0..5, long).await;
    assert_eq!(again[..3], ids[..3], "the kept messages' keys still answer");
    // Stored again: each answered id is a message that exists and carries that key's payload
    // (an entry kept past the cut would answer with an id no message has).
    for (i, id) in again.iter().enumerate().skip(3) {
        let m = b.message("t", *id).await.unwrap();
        assert_eq!(&m.payload[..], format!("k{i}").as_bytes());
    }
    assert_eq!(b.topic_info("t").await.unwrap().length, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_topics_keys_do_not_answer_for_its_successor_after_a_reopen() {
    let dir = TempDir::new("dedup-term");
    let long = Duration::from_secs(600);
    let new_k0 = {
        let b = Broker::new(open(&dir));
        publish_keys(&b, 0..3, long).await;
        assert!(b.terminate("t").await.unwrap());
        // The successor: k0 again, and enough messages that the old keys' offsets are below
        // its log's end.
        let k0 = publish_keys(&b, 0..1, long).await[0];
        for i in 0..5 {
            b.publish("t", NewMessage::new("job", format!("u{i}")))
                .await
                .unwrap();
        }
        k0
    };
    let b = Broker::new(open(&dir));
    let again = publish_keys(&b, 0..3, long).await;
    assert_eq!(again[0], new_k0, "the successor's own key answers");
    for (i, id) in again.iter().enumerate().skip(1) {
        let m = b.message("t", *id).await.unwrap();
        assert_eq!(
            &m.payload[..],
            format!("k{i}").as_bytes(),
            "key k{i} of the terminated topic answered with {id}"
        );
    }
    assert_eq!(b.topic_info("t").await.unwrap().length, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_records_survive_a_reopen_until_they_expire_or_their_group_goes() {
    let dir = TempDir::new("processed");
    let brief = Duration::from_secs(1);
    {
        let b = open(&dir);
        let g = b
            .join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        let h = b
            .join("t", "h", "c", StartPosition::Earliest)
            .await
            .unwrap();
        b.record_processed(&g, "k:long", Duration::from_secs(600))
            .await
            .unwrap();
        b.record_processed(&g, "k:brief", brief).await.unwrap();
        assert!(b.processed("t", "g", "k:brief").await.unwrap());
        b.record_processed(&h, "k:long", Duration::from_secs(600))
            .await
            .unwrap();
        // No group, no record; nor for an older generation of the topic.
        let nobody = relq::Subscription {
            group: "nobody".into(),
            ..g.clone()
        };
        b.record_processed(&nobody, "k:long", Duration::from_secs(600))
            .await
            .unwrap();
        let stale = relq::Subscription {
            epoch: g.epoch + 1,
            ..g.clone()
        };
        b.record_processed(&stale, "k:stale", Duration::from_secs(600))
            .await
            .unwrap();
        assert!(!b.processed("t", "g", "k:stale").await.unwrap());
    }
    // The brief record's time passes while the engine is closed.
    tokio::time::sleep(brief + Duration::from_millis(100)).await;
    {
        let b = open(&dir);
        assert!(b.processed("t", "g", "k:long").await.unwrap());
        assert!(!b.processed("t", "g", "k:brief").await.unwrap(), "expired");
        assert!(!b.processed("t", "nobody", "k:long").await.unwrap());
        assert!(b.delete_group("t", "g").await.unwrap());
        b.create_group("t", "g", StartPosition::Earliest)
            .await
            .unwrap();
    }
    let b = open(&dir);
    assert!(
        !b.processed("t", "g", "k:long").await.unwrap(),
        "a deleted group's records went with it"
    );
    assert!(b.processed("t", "h", "k:long").await.unwrap());
}
