//! Behaviour of the embedded engine that the backend-agnostic suite cannot see: what survives a
//! close and reopen, recovery of deliveries in flight at a crash, the directory lock, torn tails
//! and corruption.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_publishing_resumes() {
    let dir = TempDir::new("torn");
    let ids = {
        let b = open(&dir);
        publish(&b, "t", 5, 10).await
    };
    // Simulate a crash mid-write: garbage where the next record would go.
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
    let b = open(&dir);
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(info.length, 5, "the acknowledged records are all there");
    assert_eq!(info.last_id, ids.last().copied());
    let more = publish(&b, "t", 3, 10).await;
    assert_eq!(more[0].seq, 5);
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
    assert_eq!(report.topics[0].skipped_offsets, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_truncated_mid_record_is_cut_and_its_offsets_are_not_reused() {
    let dir = TempDir::new("truncated");
    let ids = published_and_acked(&dir, 5).await;
    let seg = segments(&dir).pop().unwrap();
    let starts = record_starts(&seg);
    // Mid-record 3 (offset 2): nothing valid follows, a torn tail by definition.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(starts[2] + 10)
        .unwrap();
    let b = open(&dir);
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
