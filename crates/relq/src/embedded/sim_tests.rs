//! Crash tests on the simulated file layer: random workloads, then a simulated power loss that
//! drops, tears or reorders every unsynced write (log segments, directories and the state
//! database alike), then a reopen that must still hold everything acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::sim::SimFs;
use super::{EmbeddedBackend, EmbeddedConfig};
use crate::backend::{AttemptFailure, Backend, Retention, Settlement};
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
            .segment_size(4 * 1024)
            .tail_cache(4 * 1024)
            // Every retry and delayed message goes through the spill table.
            .resident_window(Duration::ZERO),
    )
}

/// Messages are delayed (or retried) by at most this much, except far retries.
const SHORT_MS: u64 = 150;
/// How long after a reopen every outstanding message must have been delivered again.
const OWED_WITHIN: Duration = Duration::from_secs(3);

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
    /// Messages retried an hour ahead at some point: the check brings them forward (stop, then
    /// resume) before it demands them.
    far: BTreeMap<String, MessageId>,
    /// Delivered to group g by this process and not retried since: delivering one again
    /// (there are no claims here) is a duplicate the engine made up.
    in_hand: BTreeSet<String>,
    /// Such duplicates.
    duplicates: Vec<String>,
    /// Messages retention removed.
    removed: u64,
}

impl Acked {
    fn delivered(&mut self, p: String) {
        if !self.in_hand.insert(p.clone()) {
            self.duplicates
                .push(format!("{p} delivered twice by one process"));
        }
    }
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
                let now = Timestamp::now();
                let batch: Vec<Outgoing> = (0..n)
                    .map(|i| {
                        let mut m = msg(format!("m{}", *next + i as u64));
                        if rng.u8(0..3) == 0 {
                            m.deliver_at =
                                Some(now.plus(Duration::from_millis(rng.u64(0..SHORT_MS))));
                        }
                        m
                    })
                    .collect();
                let ids = b.publish("t", batch).await.unwrap();
                for (i, id) in ids.into_iter().enumerate() {
                    seen.published.insert(format!("m{}", *next + i as u64), id);
                }
                *next += n as u64;
            }
            9 => {
                // Retention removes whole segments every group is done with; never one a
                // pending, scheduled (spilled or not) or unread message needs.
                let r = b
                    .cleanup("t", &Retention::default().min_age(Duration::ZERO))
                    .await
                    .unwrap();
                seen.removed += r.removed;
            }
            _ => {
                let got = b
                    .read(&sub, rng.usize(1..10), Duration::ZERO)
                    .await
                    .unwrap();
                let mut settle = Vec::new();
                let mut acked = Vec::new();
                let mut dead = Vec::new();
                let mut far = Vec::new();
                let now = Timestamp::now();
                for d in &got {
                    seen.delivered(text(d));
                    match rng.u8(0..12) {
                        0 => {
                            settle.push(Settlement::DeadLetter(Box::new(dead_letter(d))));
                            dead.push(text(d));
                        }
                        1 => {} // left in flight
                        2..=4 => {
                            let far_away = rng.u8(0..4) == 0;
                            let after = match far_away {
                                true => Duration::from_secs(3600),
                                false => Duration::from_millis(rng.u64(0..SHORT_MS)),
                            };
                            settle.push(Settlement::Retry {
                                id: d.message.id,
                                at: now.plus(after),
                                failure: AttemptFailure {
                                    attempt: d.message.attempt,
                                    at: now,
                                    consumer: "c".into(),
                                    kind: FailureKind::Retryable,
                                    error: "again".into(),
                                },
                            });
                            if far_away {
                                far.push((text(d), d.message.id));
                            }
                            seen.in_hand.remove(&text(d));
                        }
                        _ => {
                            settle.push(Settlement::Ack(d.message.id));
                            acked.push(text(d));
                        }
                    }
                }
                b.settle(&sub, &settle).await.unwrap();
                seen.acked.extend(acked);
                seen.dead.extend(dead);
                seen.far.extend(far);
            }
        }
    }
}

/// Every guarantee the reopened engine breaks.
async fn violations(b: &EmbeddedBackend, seen: &mut Acked, round: usize) -> Vec<String> {
    let mut out = Vec::new();
    let audit = b
        .join("t", &format!("audit{round}"), "a", StartPosition::Earliest)
        .await
        .unwrap();
    // Retention may have removed messages below the topic's start (every group was done with
    // them); every other acknowledged publish must be there.
    let first = b
        .topic_info("t")
        .await
        .unwrap()
        .and_then(|i| i.first_id)
        .unwrap_or(MessageId::ZERO);
    let settled = |p: &String| seen.acked.contains(p) || seen.dead.contains(p);
    let mut stored = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + OWED_WITHIN;
    while tokio::time::Instant::now() < deadline
        && !seen
            .published
            .iter()
            .all(|(p, id)| *id < first || stored.contains_key(p))
    {
        let got = b
            .read(&audit, 500, Duration::from_millis(20))
            .await
            .unwrap();
        for d in &got {
            stored.insert(text(d), d.message.id);
        }
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        b.settle(&audit, &acks).await.unwrap();
    }
    for (p, id) in &seen.published {
        match stored.get(p) {
            Some(got) if got != id => {
                out.push(format!("acknowledged publish {p} ({id}) changed to {got}"));
            }
            None if *id >= first => {
                out.push(format!("acknowledged publish {p} ({id}) lost"));
            }
            None if !settled(p) => {
                out.push(format!(
                    "acknowledged publish {p} ({id}) removed by retention before group g settled it"
                ));
            }
            _ => {}
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
    // Group g owes every message it has not acknowledged or dead-lettered (at least once):
    // new ones, ones in flight at the crash, retries and delayed ones once due. Those retried an
    // hour ahead are brought forward first: a stop takes a spilled row back from the state
    // database (parked), a resume makes it due now.
    for (p, id) in &seen.far {
        if !settled(p) {
            b.stop_message("t", *id).await.unwrap();
            b.resume_message("t", *id).await.unwrap();
        }
    }
    let owed: BTreeSet<String> = seen
        .published
        .keys()
        .filter(|p| !settled(p))
        .cloned()
        .collect();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let mut delivered = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + OWED_WITHIN;
    while tokio::time::Instant::now() < deadline && !owed.iter().all(|p| delivered.contains(p)) {
        for d in b.read(&sub, 1000, Duration::from_millis(20)).await.unwrap() {
            let p = text(&d);
            // Nothing whose settlement was committed comes back.
            if seen.acked.contains(&p) || seen.dead.contains(&p) {
                out.push(format!("{p} was settled (committed) and came back"));
            }
            seen.delivered(p.clone());
            delivered.insert(p);
        }
    }
    for p in &owed {
        if !delivered.contains(p) {
            out.push(format!("{p}, never settled, was lost by group g"));
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

/// Runs `seeds` workloads, each with three simulated power losses; returns the violations and
/// how many messages retention removed.
async fn run(seeds: u64, sync_disabled: bool) -> (Vec<String>, u64) {
    let mut all = Vec::new();
    let mut removed = 0;
    for seed in 0..seeds {
        let mut rng = fastrand::Rng::with_seed(seed);
        let fs = SimFs::new();
        fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
        fs.set_sync_disabled(sync_disabled);
        let mut seen = Acked::default();
        let mut next = 0;
        // Three workloads, each ended by a power loss, and a check after each.
        for round in 0..4 {
            let b = match open(&fs) {
                Ok(b) => b,
                Err(e) => {
                    all.push(format!("seed {seed} round {round}: reopen failed: {e}"));
                    break;
                }
            };
            seen.in_hand.clear();
            if round > 0 {
                for v in violations(&b, &mut seen, round).await {
                    all.push(format!("seed {seed} round {round}: {v}"));
                }
            }
            if round == 3 {
                break;
            }
            workload(&b, &mut rng, &mut next, &mut seen).await;
            for v in std::mem::take(&mut seen.duplicates) {
                all.push(format!("seed {seed} round {round}: {v}"));
            }
            // Power loss while the engine is open; then the process is gone too.
            fs.crash(&mut rng);
            drop(b);
        }
        removed += seen.removed;
        if sync_disabled && all.iter().any(|p| p.contains("lost")) {
            break; // the control made its point; its later seeds would only repeat it, slowly
        }
    }
    (all, removed)
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
    let (problems, removed) = run(seeds(), false).await;
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(removed > 0, "retention removed segments in these workloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_syncs_disabled_the_same_checks_detect_loss() {
    let (problems, _) = run(16, true).await;
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

/// A full disk when the state database must grow fails that commit as a whole. redb cannot go on
/// after a failed commit, so the engine is poisoned: every caller is told, none is answered Ok
/// for a change that was not written. Reopened once space is back, everything acknowledged
/// before is there and the messages whose settlement failed are delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_state_database_poisons_and_a_reopen_loses_nothing() {
    let fs = SimFs::new();
    fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
    let config = EmbeddedConfig::default().segment_size(1 << 20);
    let b =
        EmbeddedBackend::open_on(Arc::new(fs.clone()), Path::new(ROOT), config.clone()).unwrap();
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let big = "x".repeat(50_000);
    let mut published = Vec::new();
    for i in 0..200 {
        let p = format!("{i:03}{big}");
        published.push(p.clone());
        b.publish("t", vec![msg(p)]).await.unwrap();
    }
    // Each dead letter keeps a copy of its 50 KB payload in the state database, which must grow.
    // Five while there is space, then on a full disk until a commit fails.
    let mut dead = BTreeSet::new();
    let mut failure = None;
    for i in 0..200 {
        if i == 5 {
            fs.set_disk_full(true);
        }
        let got = b.read(&sub, 1, Duration::ZERO).await.unwrap();
        let d = &got[0];
        match b
            .settle(&sub, &[Settlement::DeadLetter(Box::new(dead_letter(d)))])
            .await
        {
            Ok(()) => {
                dead.insert(text(d));
            }
            Err(e) => {
                assert!(i >= 5, "failed with space left: {e}");
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("the state database had to grow on a full disk");
    assert_eq!(e.kind, BackendErrorKind::Fatal, "{e}");
    let e = b.read(&sub, 1, Duration::ZERO).await.unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Fatal, "poisoned: {e}");
    fs.set_disk_full(false);
    drop(b);
    let b = EmbeddedBackend::open_on(Arc::new(fs.clone()), Path::new(ROOT), config).unwrap();
    let stored: BTreeSet<String> = b
        .dead_letters("t", &DeadLetterQuery::all().limit(1000))
        .await
        .unwrap()
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
        .collect();
    assert_eq!(stored, dead, "exactly the committed dead letters");
    let sub = b
        .join("t", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let mut again = Vec::new();
    loop {
        let got = b.read(&sub, 100, Duration::ZERO).await.unwrap();
        if got.is_empty() {
            break;
        }
        again.extend(got.iter().map(text));
    }
    again.sort();
    let owed: Vec<String> = published
        .into_iter()
        .filter(|p| !dead.contains(p))
        .collect();
    assert_eq!(
        again, owed,
        "everything not dead-lettered is delivered again, once"
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
        // 100 x 200 B: far more than the 4 KiB tail cache, over several 4 KiB segments.
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
    // And a new group starting at an id: a binary search over records on disk.
    let from = ids[40];
    let joiner = {
        let b = b.clone();
        tokio::spawn(async move {
            b.join("t", "g3", "c", StartPosition::From(from))
                .await
                .map(|sub| (b, sub))
        })
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
    assert!(
        !joiner.is_finished(),
        "the join must be waiting for the disk"
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
    let (b2, g3) = joiner.await.unwrap().unwrap();
    let first = b2.read(&g3, 1, Duration::ZERO).await.unwrap();
    assert_eq!(first[0].message.id, from, "the new group starts at the id");
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

/// A power loss while publishes and acknowledgements are under way: the crash tears the
/// unsynced writes in any order of their sectors, so a later part of a batch can land while an
/// earlier part does not, leaving valid records after damage. Reopening must take that for the
/// torn tail it is (never report corruption), keep every acknowledged publish with its id, and
/// hand out no offset twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_mid_write_is_a_torn_tail_never_corruption() {
    use std::sync::Mutex;

    use super::log::test_counts;

    let torn = || test_counts::TORN.with(|c| c.get());
    let torn_before = torn();
    // About one crash in ten lands on an unsynced write: go on past the usual seeds until one
    // did, so the test always tests recovery.
    for seed in (0..500).take_while(|s| *s < seeds() || torn() == torn_before) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let fs = SimFs::new();
        fs.create_dir_all_durable(Path::new(ROOT)).unwrap();
        let b = Arc::new(open(&fs).unwrap());
        let sub = b
            .join("t", "g", "c", StartPosition::Earliest)
            .await
            .unwrap();
        let acked: Arc<Mutex<BTreeMap<String, MessageId>>> = Arc::default();
        let mut tasks = Vec::new();
        for p in 0..3u64 {
            let (b, acked) = (b.clone(), acked.clone());
            let mut rng = fastrand::Rng::with_seed(seed * 10 + p);
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    // Batches of records over several sectors.
                    let n = rng.usize(1..12);
                    let batch: Vec<Outgoing> = (0..n)
                        .map(|j| msg(format!("p{p}-{i}-{j}-{}", "x".repeat(rng.usize(50..400)))))
                        .collect();
                    let texts: Vec<String> = batch
                        .iter()
                        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                        .collect();
                    let Ok(ids) = b.publish("t", batch).await else {
                        return;
                    };
                    acked.lock().unwrap().extend(texts.into_iter().zip(ids));
                }
            }));
        }
        {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                // Reads and acknowledgements: committed state refers to synced offsets.
                while let Ok(got) = b.read(&sub, 50, Duration::from_millis(2)).await {
                    let acks: Vec<Settlement> =
                        got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
                    if b.settle(&sub, &acks).await.is_err() {
                        return;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(5..40))).await;
        fs.crash(&mut rng);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("calls end once the engine fails")
                .unwrap();
        }
        drop(Arc::try_unwrap(b).expect("tasks ended"));
        let b = match open(&fs) {
            Ok(b) => b,
            Err(e) => panic!("seed {seed}: reopen after a power loss mid-write failed: {e}"),
        };
        let audit = b
            .join("t", "audit", "a", StartPosition::Earliest)
            .await
            .unwrap();
        let mut stored = BTreeMap::new();
        loop {
            let got = b.read(&audit, 1000, Duration::ZERO).await.unwrap();
            if got.is_empty() {
                break;
            }
            for d in &got {
                stored.insert(text(d), d.message.id);
            }
        }
        let acked = acked.lock().unwrap().clone();
        for (p, id) in &acked {
            assert_eq!(
                stored.get(p),
                Some(id),
                "seed {seed}: acknowledged {p:.12} lost"
            );
        }
        let highest = stored.values().map(|id| id.seq).max();
        let new = b.publish("t", vec![msg("after".into())]).await.unwrap();
        assert!(
            highest.is_none_or(|h| new[0].seq > h),
            "seed {seed}: offset {} handed out again",
            new[0].seq
        );
    }
    assert!(
        torn() > torn_before,
        "no seed crashed mid-write: the test did not test recovery"
    );
}
