//! Behaviour of the embedded engine that the backend-agnostic suite cannot see: what survives a
//! close and reopen, recovery of deliveries in flight at a crash, the directory lock, torn tails
//! and corruption.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use relq::{
    Backend, BackendErrorKind, Broker, EmbeddedBackend, EmbeddedConfig, NewMessage, Retention,
    Settlement, StartPosition,
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
