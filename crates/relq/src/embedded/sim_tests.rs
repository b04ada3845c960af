//! Crash tests on the simulated file layer: random workloads, then a simulated power loss that
//! drops, tears or reorders every unsynced write (log segments, directories and the state
//! database alike), then a reopen that must still hold everything acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::sim::SimFs;
use super::{EmbeddedBackend, EmbeddedConfig};
use crate::backend::{Backend, Settlement};
use crate::dead_letter::{DeadLetter, DeadLetterQuery};
use crate::error::BackendErrorKind;
use crate::model::{MessageId, Outgoing, StartPosition, Timestamp};
use crate::FailureKind;

const ROOT: &str = "/data";

fn open(fs: &SimFs) -> Result<EmbeddedBackend, crate::BackendError> {
    EmbeddedBackend::open_on(
        Arc::new(fs.clone()),
        Path::new(ROOT),
        EmbeddedConfig::default()
            .segment_size(8 * 1024)
            .tail_cache(4 * 1024),
    )
}

fn msg(payload: String) -> Outgoing {
    Outgoing {
        kind: "job".into(),
        payload: payload.into(),
        headers: Default::default(),
        deliver_at: None,
    }
}

fn dead_letter(d: &crate::Delivery) -> DeadLetter {
    let now = Timestamp::now();
    DeadLetter {
        id: MessageId::ZERO,
        message: d.message.clone(),
        topic: "t".into(),
        group: "g".into(),
        consumer: "c".into(),
        handler: "job".into(),
        reason: FailureKind::Permanent,
        category: None,
        error_chain: vec!["no".into()],
        backtrace: None,
        attempts: d.message.attempt,
        first_failed_at: now,
        last_failed_at: now,
        failures: Vec::new(),
    }
}

fn text(d: &crate::Delivery) -> String {
    String::from_utf8_lossy(&d.message.payload).into_owned()
}

/// What the callers were told.
#[derive(Default)]
struct Acked {
    published: BTreeMap<String, MessageId>,
    /// Topics created by their first publish: topic -> the id it was given.
    created: BTreeMap<String, MessageId>,
    acked: BTreeSet<String>,
    dead: BTreeSet<String>,
}

/// Random publishes, reads, acks and dead letters; everything that returned Ok is recorded.
async fn workload(b: &EmbeddedBackend, rng: &mut fastrand::Rng, next: &mut u64, seen: &mut Acked) {
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    for _ in 0..rng.usize(20..60) {
        match rng.u8(0..12) {
            10 | 11 => {
                // A publish that creates its topic.
                let topic = format!("new{}", *next);
                *next += 1;
                let ids = b.publish(&topic, vec![msg("first".into())]).await.unwrap();
                seen.created.insert(topic, ids[0]);
            }
            0..=4 => {
                let n = rng.usize(1..8);
                let batch: Vec<Outgoing> = (0..n)
                    .map(|i| msg(format!("m{}", *next + i as u64)))
                    .collect();
                let ids = b.publish("t", batch).await.unwrap();
                for (i, id) in ids.into_iter().enumerate() {
                    seen.published.insert(format!("m{}", *next + i as u64), id);
                }
                *next += n as u64;
            }
            _ => {
                let got = b
                    .read(&sub, rng.usize(1..10), Duration::ZERO)
                    .await
                    .unwrap();
                let mut settle = Vec::new();
                let mut acked = Vec::new();
                let mut dead = Vec::new();
                for d in &got {
                    match rng.u8(0..10) {
                        0 => {
                            settle.push(Settlement::DeadLetter(Box::new(dead_letter(d))));
                            dead.push(text(d));
                        }
                        1 => {} // left in flight
                        _ => {
                            settle.push(Settlement::Ack(d.message.id));
                            acked.push(text(d));
                        }
                    }
                }
                b.settle(&sub, &settle).await.unwrap();
                seen.acked.extend(acked);
                seen.dead.extend(dead);
            }
        }
    }
}

/// Every guarantee the reopened engine breaks.
async fn violations(b: &EmbeddedBackend, seen: &Acked, round: usize) -> Vec<String> {
    let mut out = Vec::new();
    let audit = b
        .join("t", &format!("audit{round}"), "a", StartPosition::Earliest)
        .await
        .unwrap();
    let mut stored = BTreeMap::new();
    loop {
        let got = b.read(&audit, 500, Duration::ZERO).await.unwrap();
        if got.is_empty() {
            break;
        }
        for d in &got {
            stored.insert(text(d), d.message.id);
        }
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        b.settle(&audit, &acks).await.unwrap();
    }
    for (p, id) in &seen.published {
        if stored.get(p) != Some(id) {
            out.push(format!("acknowledged publish {p} ({id}) lost or changed"));
        }
    }
    for (topic, id) in &seen.created {
        match b.topic_info(topic).await.unwrap() {
            Some(info) if info.last_id == Some(*id) => {}
            other => out.push(format!(
                "topic {topic} created by an acknowledged publish: {other:?}"
            )),
        }
    }
    // What group g delivers now must not include anything whose settlement was committed.
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let again = b.read(&sub, 100_000, Duration::ZERO).await.unwrap();
    for d in &again {
        let p = text(d);
        if seen.acked.contains(&p) || seen.dead.contains(&p) {
            out.push(format!("{p} was settled (committed) and came back"));
        }
    }
    // Leave them in flight: the next round's workload settles some.
    let dls = b
        .dead_letters("t", &DeadLetterQuery::all().limit(100_000))
        .await
        .unwrap();
    let stored_dead: BTreeSet<String> = dls
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
        .collect();
    for p in &seen.dead {
        if !stored_dead.contains(p) {
            out.push(format!("committed dead letter {p} lost"));
        }
    }
    out
}

/// Runs `seeds` workloads, each with three simulated power losses; returns the violations.
async fn run(seeds: u64, sync_disabled: bool) -> Vec<String> {
    let mut all = Vec::new();
    for seed in 0..seeds {
        let mut rng = fastrand::Rng::with_seed(seed);
        let fs = SimFs::new();
        fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
        fs.set_sync_disabled(sync_disabled);
        let mut seen = Acked::default();
        let mut next = 0;
        for round in 0..3 {
            let b = match open(&fs) {
                Ok(b) => b,
                Err(e) => {
                    all.push(format!("seed {seed} round {round}: reopen failed: {e}"));
                    break;
                }
            };
            if round > 0 {
                for v in violations(&b, &seen, round).await {
                    all.push(format!("seed {seed} round {round}: {v}"));
                }
            }
            workload(&b, &mut rng, &mut next, &mut seen).await;
            // Power loss while the engine is open; then the process is gone too.
            fs.crash(&mut rng);
            drop(b);
        }
    }
    all
}

/// Seeds per run: 16 in CI; `RELQ_SIM_SEEDS=2000` for a soak.
fn seeds() -> u64 {
    std::env::var("RELQ_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_simulated_power_loss() {
    let problems = run(seeds(), false).await;
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_syncs_disabled_the_same_checks_detect_loss() {
    let problems = run(16, true).await;
    assert!(
        problems.iter().any(|p| p.contains("lost")),
        "the control must lose acknowledged data, or the test cannot see loss: {problems:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_poisons_the_engine_until_reopened() {
    let fs = SimFs::new();
    fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
    let b = open(&fs).unwrap();
    let kept = b.publish("t", vec![msg("kept".into())]).await.unwrap();
    fs.fail_next_sync();
    let e = b
        .publish("t", vec![msg("failed".into())])
        .await
        .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Fatal, "{e}");
    // Poisoned: no retry of the sync is trusted, every call fails.
    let e = b.publish("t", vec![msg("later".into())]).await.unwrap_err();
    assert!(e.to_string().contains("reopened"), "{e}");
    assert!(b.topic_info("t").await.is_err());
    drop(b);
    let b = open(&fs).unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 10, Duration::ZERO).await.unwrap();
    assert_eq!(got[0].message.id, kept[0]);
    assert!(got.iter().all(|d| text(d) != "later"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_without_poisoning_the_engine() {
    let fs = SimFs::new();
    fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
    let b = open(&fs).unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let kept = b.publish("t", vec![msg("kept".into())]).await.unwrap();
    fs.set_disk_full(true);
    // Fill the current 8 KiB segment until a new one is needed: that publish is refused.
    let mut refused = None;
    for i in 0..100 {
        match b.publish("t", vec![msg(format!("{i:0200}"))]).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("a new segment was needed and the disk is full");
    assert_eq!(e.kind, BackendErrorKind::Full, "{e}");
    assert!(e.to_string().contains("disk is full"), "{e}");
    // A new topic cannot be created either, with the same clear error.
    let e = b.publish("other", vec![msg("x".into())]).await.unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Full, "{e}");
    // Still healthy: reads and settlements work, and publishing resumes once space is back.
    let got = b.read(&sub, 1, Duration::ZERO).await.unwrap();
    assert_eq!(got[0].message.id, kept[0]);
    b.settle(&sub, &[Settlement::Ack(kept[0])]).await.unwrap();
    fs.set_disk_full(false);
    let more = b.publish("t", vec![msg("after".into())]).await.unwrap();
    drop(b);
    let b = open(&fs).unwrap();
    let info = b.topic_info("t").await.unwrap().unwrap();
    assert_eq!(
        info.last_id,
        Some(more[0]),
        "nothing half-written in between"
    );
}

/// A consumer reading a backlog from a stalled disk, a claim of old pending messages and a
/// `topic_info` that needs a record from disk hold no lock that publishers, acks or other topics'
/// consumers need: the engine goes on while they wait, and they then return the right records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_for_the_disk_does_not_stall_the_engine() {
    let fs = SimFs::new();
    fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
    let b = Arc::new(open(&fs).unwrap());
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        // 100 x 200 B: far more than the 4 KiB tail cache, over several 8 KiB segments.
        ids.extend(
            b.publish("t", vec![msg(format!("{i:0200}"))])
                .await
                .unwrap(),
        );
    }
    let other = b
        .join("u", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    // A consumer of another group takes 5 messages and goes quiet: they are pending, their
    // records long out of the tail cache.
    let quiet = b
        .join("t", "g2", "quiet", StartPosition::Earliest)
        .await
        .unwrap();
    let taken = b.read(&quiet, 5, Duration::ZERO).await.unwrap();
    assert_eq!(taken.len(), 5);
    let claimer = b
        .join("t", "g2", "claimer", StartPosition::Earliest)
        .await
        .unwrap();
    // The disk stalls until this test resumes it, or until a watchdog thread does after 20 s
    // (a stalled engine may block every runtime thread, and then no tokio timer fires).
    fs.set_reads_paused(true);
    let watchdog_fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (resume, resumed) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let (fs, fired) = (fs.clone(), watchdog_fired.clone());
        std::thread::spawn(move || {
            if resumed.recv_timeout(Duration::from_secs(20)).is_err() {
                fired.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            fs.set_reads_paused(false);
        })
    };
    let reader = {
        let (b, sub) = (b.clone(), sub.clone());
        tokio::spawn(async move { b.read(&sub, 10, Duration::ZERO).await })
    };
    // So do a claim of the quiet consumer's messages, and an admin call that needs a record on
    // disk (the topic's first id).
    let claim = {
        let (b, claimer) = (b.clone(), claimer.clone());
        tokio::spawn(async move { b.claim(&claimer, Duration::ZERO, 10).await })
    };
    let info = {
        let b = b.clone();
        tokio::spawn(async move { b.topic_info("t").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !watchdog_fired.load(std::sync::atomic::Ordering::SeqCst),
        "the engine stalled behind a read waiting for the disk"
    );
    assert!(
        !reader.is_finished(),
        "the read must be waiting for the disk"
    );
    assert!(
        !claim.is_finished(),
        "the claim must be waiting for the disk"
    );
    assert!(
        !info.is_finished(),
        "topic_info must be waiting for the disk"
    );
    // Meanwhile: publishes to both topics, and a read, an ack and topic_info on the other topic.
    let busy = tokio::spawn({
        let b = b.clone();
        async move {
            b.publish("t", vec![msg("during".into())]).await.unwrap();
            let u = b.publish("u", vec![msg("u".into())]).await.unwrap();
            let got = b.read(&other, 10, Duration::ZERO).await.unwrap();
            assert_eq!(got[0].message.id, u[0]);
            b.settle(&other, &[Settlement::Ack(u[0])]).await.unwrap();
            b.topic_info("u").await.unwrap().unwrap()
        }
    });
    let u = busy.await.unwrap();
    assert!(
        !watchdog_fired.load(std::sync::atomic::Ordering::SeqCst),
        "the engine stalled behind a read waiting for the disk"
    );
    assert_eq!((u.length, u.groups[0].pending, u.groups[0].lag), (1, 0, 0));
    let _ = resume.send(());
    watchdog.join().unwrap();
    let info = info.await.unwrap().unwrap().unwrap();
    assert_eq!(info.first_id, Some(ids[0]));
    assert!(info.length >= 100);
    let got = reader.await.unwrap().unwrap();
    let got: Vec<MessageId> = got.iter().map(|d| d.message.id).collect();
    assert_eq!(got, ids[..10]);
    let claimed = claim.await.unwrap().unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|d| (d.message.id, d.message.attempt))
            .collect::<Vec<_>>(),
        ids[..5].iter().map(|id| (*id, 2)).collect::<Vec<_>>()
    );
}

/// A read that has to pass a long run of delayed messages stored only on disk sets them aside a
/// round at a time (each round's records read without the engine lock) and then delivers what
/// follows them, in order; the delayed ones stay scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_passes_a_run_of_delayed_messages_on_disk() {
    let fs = SimFs::new();
    fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
    let b = open(&fs).unwrap();
    let later = Timestamp::now().plus(Duration::from_secs(3600));
    for i in 0..60 {
        let mut m = msg(format!("{i:0200}"));
        m.deliver_at = Some(later);
        b.publish("t", vec![m]).await.unwrap();
    }
    let mut now_ids = Vec::new();
    for i in 0..5 {
        now_ids.extend(b.publish("t", vec![msg(format!("now {i}"))]).await.unwrap());
    }
    // Reopened: nothing is in the tail cache, every record must come from the segment files.
    drop(b);
    let b = open(&fs).unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let got = b.read(&sub, 4, Duration::ZERO).await.unwrap();
    let ids: Vec<MessageId> = got.iter().map(|d| d.message.id).collect();
    assert_eq!(ids, now_ids[..4]);
    let got = b.read(&sub, 4, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id, now_ids[4]);
    let info = b.topic_info("t").await.unwrap().unwrap();
    let g = &info.groups[0];
    assert_eq!((g.scheduled, g.pending, g.lag), (60, 5, 0));
}
