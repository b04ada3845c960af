//! The kill -9 loop: a child process (`relq-bench crash-child`) publishes, reads, acknowledges and
//! dead-letters as fast as it can; the parent kills it with SIGKILL at random moments, several
//! rounds on one data directory, then reopens the directory and checks:
//! - every publish the child saw acknowledged is stored (and ids were never reused);
//! - every message is eventually acknowledged or dead-lettered (a final drain), including every
//!   message whose retry was committed;
//! - a message whose ack or dead letter was committed is never delivered again: duplicates occur
//!   only for deliveries in flight at a kill;
//! - every committed dead letter is in the dead-letter store, once.
//!
//! CI runs a few rounds. A long soak: `RELQ_CRASH_ROUNDS=300 cargo test --release -p relq-bench
//! --test crash`.
//!
//! The control runs the same child on the in-memory backend, which keeps nothing across a process
//! death: the checker must report loss. (Disabling fsync cannot lose data on kill -9, since the
//! page cache survives the process; the power-loss control lives in the simulated file layer.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use relq::{Broker, DeadLetterQuery, Settlement, StartPosition};

#[derive(Default, Debug)]
struct Seen {
    /// payload -> id, for every acknowledged publish.
    published: BTreeMap<String, String>,
    /// Per round: payloads delivered.
    delivered: Vec<Vec<String>>,
    acked: BTreeSet<String>,
    dead: BTreeSet<String>,
    /// Payloads delivered again after their settlement was committed.
    after_commit: Vec<String>,
    /// Delivered in a round without a reported settlement: in flight at the kill. Their
    /// settlement may have committed unreported.
    in_flight: BTreeSet<String>,
    reused_ids: Vec<String>,
    ids: BTreeSet<String>,
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relq-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Where the child keeps its messages.
enum Store<'a> {
    Dir(&'a Path),
    /// The in-memory backend: the control.
    Memory,
    Url(&'a str),
}

/// Runs one child for a random time, kills it with SIGKILL, and folds its report into `seen`.
fn round(store: &Store<'_>, round: usize, seen: &mut Seen) {
    let start = (round as u64) * 10_000_000;
    let mut args = vec!["crash-child".to_owned()];
    match store {
        Store::Dir(dir) => args.extend(["--dir".into(), dir.display().to_string()]),
        Store::Memory => args.push("--memory".into()),
        Store::Url(url) => args.extend(["--url".into(), url.to_string()]),
    }
    args.extend([
        "--start".into(),
        start.to_string(),
        "--consumer".into(),
        format!("c{round}"),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_relq-bench"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    std::thread::sleep(Duration::from_millis(fastrand::u64(150..700)));
    child.kill().expect("SIGKILL");
    let status = child.wait().unwrap();
    let lines = reader.join().unwrap();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.code().is_none(),
        "the child must die by the signal, not exit: {status:?} {stderr}"
    );
    let mut delivered = Vec::new();
    // Each message's last event this round: 'R' delivered, 'T' retry committed, 'S' settled.
    let mut last = BTreeMap::new();
    for l in lines {
        let mut parts = l.split(' ');
        let (tag, payload) = (parts.next().unwrap(), parts.next().unwrap_or("").to_owned());
        match tag {
            "P" => {
                let id = parts.next().unwrap().to_owned();
                if !seen.ids.insert(id.clone()) {
                    seen.reused_ids.push(id.clone());
                }
                seen.published.insert(payload, id);
            }
            "R" => {
                if seen.acked.contains(&payload) || seen.dead.contains(&payload) {
                    seen.after_commit.push(payload.clone());
                }
                last.insert(payload.clone(), 'R');
                delivered.push(payload);
            }
            "A" => {
                last.insert(payload.clone(), 'S');
                seen.acked.insert(payload);
            }
            "D" => {
                last.insert(payload.clone(), 'S');
                seen.dead.insert(payload);
            }
            "T" => {
                last.insert(payload, 'T');
            }
            _ => {} // a line cut by the kill
        }
    }
    // In flight at the kill: delivered, nothing reported after. Their settlement may have
    // committed unreported. A committed retry, though, is owed: it must be delivered again.
    for (p, e) in last {
        match e {
            'R' => {
                seen.in_flight.insert(p);
            }
            'T' => {
                seen.in_flight.remove(&p);
            }
            _ => {}
        }
    }
    seen.delivered.push(delivered);
}

/// Reopens the store, drains the group, and lists every violated guarantee.
async fn check(broker: &Broker, seen: &Seen) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    let mut claimed = 0;
    let backend = broker.backend().clone();
    // Every acknowledged publish is stored: read the whole log with a fresh group.
    let audit = backend
        .join("t", "audit", "a", StartPosition::Earliest)
        .await
        .unwrap();
    let mut stored = BTreeMap::new();
    loop {
        let got = backend.read(&audit, 1000, Duration::ZERO).await.unwrap();
        if got.is_empty() {
            break;
        }
        for d in got {
            stored.insert(
                String::from_utf8_lossy(&d.message.payload).into_owned(),
                d.message.id.to_string(),
            );
        }
    }
    for (p, id) in &seen.published {
        match stored.get(p) {
            None => problems.push(format!("acknowledged publish {p} ({id}) is lost")),
            Some(s) if s != id => {
                problems.push(format!("{p} was acknowledged as {id}, stored as {s}"))
            }
            _ => {}
        }
    }
    if !seen.reused_ids.is_empty() {
        problems.push(format!("ids reused after a crash: {:?}", seen.reused_ids));
    }
    if !seen.after_commit.is_empty() {
        problems.push(format!(
            "delivered again after the ack/dead letter was committed: {:?}",
            seen.after_commit
        ));
    }
    // Drain: everything left is delivered once more, then acknowledged. The killed consumers'
    // pending messages are claimed (the embedded engine already made them due at reopen; Redis
    // keeps them in the group's pending list under the dead consumer's name).
    let sub = backend
        .join("t", "g", "final", StartPosition::Earliest)
        .await
        .unwrap();
    let mut drained = BTreeSet::new();
    // Retries are due up to 100 ms after the kill: the drain goes on until none is scheduled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut got = backend.claim(&sub, Duration::ZERO, 1000).await.unwrap();
        claimed += got.len();
        if got.is_empty() {
            got = backend
                .read(&sub, 1000, Duration::from_millis(50))
                .await
                .unwrap();
        }
        if got.is_empty() {
            let info = broker.topic_info("t").await.unwrap();
            let g = info.groups.iter().find(|g| g.name == "g").unwrap();
            if g.scheduled == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            continue;
        }
        let acks: Vec<Settlement> = got.iter().map(|d| Settlement::Ack(d.message.id)).collect();
        for d in &got {
            let p = String::from_utf8_lossy(&d.message.payload).into_owned();
            if seen.acked.contains(&p) || seen.dead.contains(&p) {
                problems.push(format!("{p} was settled before the crash and came back"));
            }
            if !drained.insert(p.clone()) {
                problems.push(format!("{p} delivered twice by the drain"));
            }
        }
        backend.settle(&sub, &acks).await.unwrap();
    }
    for p in seen.published.keys() {
        let settled = seen.acked.contains(p) || seen.dead.contains(p) || drained.contains(p);
        if !settled && !seen.in_flight.contains(p) {
            problems.push(format!("{p} was never acknowledged nor dead-lettered"));
        }
    }
    // Committed dead letters are stored, once each.
    let dls = broker
        .dead_letters("t")
        .list(&DeadLetterQuery::all().limit(1_000_000))
        .await
        .unwrap_or_default();
    let mut stored_dead: BTreeMap<String, usize> = BTreeMap::new();
    for d in &dls {
        *stored_dead
            .entry(String::from_utf8_lossy(&d.message.payload).into_owned())
            .or_default() += 1;
    }
    for p in &seen.dead {
        if !stored_dead.contains_key(p) {
            problems.push(format!("committed dead letter {p} is missing"));
        }
    }
    for (p, n) in &stored_dead {
        if *n > 1 {
            problems.push(format!("{p} dead-lettered {n} times"));
        }
    }
    let info = broker.topic_info("t").await.unwrap();
    let g = info.groups.iter().find(|g| g.name == "g").unwrap();
    if (g.pending, g.lag, g.scheduled) != (0, 0, 0) {
        problems.push(format!("group not drained: {g:?}"));
    }
    (problems, claimed)
}

fn rounds() -> usize {
    std::env::var("RELQ_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

/// Runs the rounds against `store`, checks with `broker` (opened after the last kill), and
/// asserts nothing was violated.
/// Returns how many messages the checker had to claim from killed consumers.
async fn kill9_loop(store: Store<'_>, open: impl FnOnce() -> Broker) -> usize {
    let mut seen = Seen::default();
    for r in 0..rounds() {
        round(&store, r, &mut seen);
    }
    assert!(
        seen.published.len() > 100 && !seen.acked.is_empty() && !seen.dead.is_empty(),
        "the child did real work: {} published, {} acked, {} dead",
        seen.published.len(),
        seen.acked.len(),
        seen.dead.len()
    );
    let redelivered = {
        let mut all = BTreeMap::<&String, usize>::new();
        for r in &seen.delivered {
            for p in r {
                *all.entry(p).or_default() += 1;
            }
        }
        all.values().filter(|n| **n > 1).count()
    };
    let (problems, claimed) = check(&open(), &seen).await;
    eprintln!(
        "kill -9 loop: {} rounds, {} publishes acknowledged, {} acks and {} dead letters committed, {} redelivered after a kill, {} claimed from killed consumers",
        rounds(),
        seen.published.len(),
        seen.acked.len(),
        seen.dead.len(),
        redelivered,
        claimed
    );
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
    claimed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loop_loses_nothing_acknowledged() {
    let dir = fresh_dir("embedded");
    kill9_loop(Store::Dir(&dir), || {
        Broker::open(&dir).expect("the directory reopens after kill -9")
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same loop with the consumer process on Redis: each killed consumer leaves messages pending
/// under its name; the checker's consumer claims and processes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loop_on_redis_loses_nothing_and_orphans_are_claimed() {
    let Some(server) = relq_conformance::redis_server::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let broker = Broker::connect(&url).await.expect("connect");
    let claimed = kill9_loop(Store::Url(&url), || broker).await;
    assert!(
        claimed > 0,
        "the killed consumers left pending messages, and another consumer claimed them"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_control_without_persistence_is_caught() {
    let dir = fresh_dir("control");
    let mut seen = Seen::default();
    round(&Store::Memory, 0, &mut seen);
    assert!(!seen.published.is_empty(), "the control child published");
    std::fs::create_dir_all(&dir).unwrap();
    let broker = Broker::open(&dir).expect("open");
    let (problems, _) = check(&broker, &seen).await;
    assert!(
        problems.iter().any(|p| p.contains("is lost")),
        "the checker must see the loss: {problems:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
