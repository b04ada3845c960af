//! The `relq` binary as an operator runs it: the demo accounts for every message, errors map to
//! meaningful exit codes.

use std::process::Command;

/// Runs relq in a fresh working directory (its default data directory lives there).
fn relq(args: &[&str]) -> std::process::Output {
    let dir = fresh_dir();
    let out = relq_in(&dir, args);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn fresh_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "relq-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `relq` binary with `args`, run in `dir` without a `RELQ_URL` from the environment.
fn relq_cmd(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relq"));
    cmd.args(args).current_dir(dir).env_remove("RELQ_URL");
    cmd
}

fn relq_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    relq_cmd(dir, args).output().expect("run relq")
}

#[test]
fn demo_accounts_for_every_message() {
    let out = relq(&["demo", "--messages", "600", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"))
    };
    assert_eq!(n("messages"), 600);
    assert_eq!(n("processed") + n("dead_lettered"), 600);
    assert_eq!(n("pending"), 0);
    assert!(
        n("retried") > 0 && n("dead_lettered") > 0,
        "failures were injected: {v}"
    );
    let by_cat = v["dead_lettered_by_category"].as_object().unwrap();
    assert_eq!(
        by_cat.values().map(|x| x.as_u64().unwrap()).sum::<u64>(),
        n("dead_lettered")
    );
    let dl = &v["dead_letters"][0];
    assert!(
        dl["error_chain"][0].is_string() && dl["message"]["id"].is_string(),
        "{dl}"
    );
}

#[test]
fn exit_codes_mean_something() {
    let unsupported = relq(&["--url", "nats://localhost", "info"]);
    assert_eq!(unsupported.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unsupported.stderr).contains("unsupported backend URL"));
    let missing = relq(&["dlq", "show", "orders", "1-0"]);
    assert_eq!(
        missing.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    let bad_name = relq(&["publish", "bad topic", "job", "x"]);
    assert_eq!(bad_name.status.code(), Some(2));
    let bad_id = relq(&["dlq", "show", "orders", "not-an-id"]);
    assert_eq!(bad_id.status.code(), Some(2));
    let ok = relq(&["--json", "publish", "orders", "job", "hello", "-H", "k=v"]);
    assert!(ok.status.success());
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(v["id"].as_str().unwrap().contains('-'));
}

/// Output into a pipe whose reader is gone (`relq ... | head`) ends the command quietly with
/// the SIGPIPE status, like other Unix tools: never an "internal panic".
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    let dir = fresh_dir();
    // The reader is closed before relq starts: its first write fails, whatever the timing.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = relq_cmd(&dir, &["--json", "topics"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panic"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn messages_persist_between_commands_in_the_default_data_directory() {
    let dir = fresh_dir();
    for i in 0..3 {
        let out = relq_in(&dir, &["publish", "orders", "job", &format!("order-{i}")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(dir.join("relq-data").join("state.redb").exists());
    let out = relq_in(
        &dir,
        &[
            "--json", "consume", "orders", "--count", "3", "--idle", "2s",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 0..3 {
        assert!(text.contains(&format!("order-{i}")), "{text}");
    }
    // Acknowledged: a second consume of the same group finds nothing.
    let out = relq_in(&dir, &["--json", "info", "orders"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("\"lag\":0"), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same commands against Redis (`--url redis://...`), on a server the test starts: publish,
/// consume, info, and the dead-letter commands after a demo run.
#[test]
fn commands_work_against_redis() {
    let Some(server) = relq_conformance::redis_server::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let dir = fresh_dir();
    for i in 0..3 {
        let out = relq_in(
            &dir,
            &[
                "--url",
                &url,
                "publish",
                "orders",
                "job",
                &format!("order-{i}"),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = relq_in(
        &dir,
        &[
            "--url", &url, "--json", "consume", "orders", "--count", "3", "--idle", "2s",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 0..3 {
        assert!(text.contains(&format!("order-{i}")), "{text}");
    }
    assert!(
        !dir.join("relq-data").exists(),
        "nothing was written to the default data directory"
    );
    let out = relq_in(&dir, &["--url", &url, "--json", "info", "orders"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("\"lag\":0"), "{v}");
    // The demo on Redis accounts for every message; its dead letters are listed by the CLI.
    let out = relq_in(
        &dir,
        &["--url", &url, "--json", "demo", "--messages", "300"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let demo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |k: &str| demo[k].as_u64().unwrap();
    assert_eq!(n("processed") + n("dead_lettered"), 300, "{demo}");
    assert_eq!(n("pending"), 0, "{demo}");
    let topic = demo["topic"].as_str().expect("the demo names its topic");
    let out = relq_in(&dir, &["--url", &url, "--json", "dlq", "stats", topic]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["total"].as_u64(), Some(n("dead_lettered")), "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Publishes `n` messages `m-0`.. to `topic` through the library (one process, fast).
fn publish_many(dir: &std::path::Path, topic: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = relq::Broker::open(dir.join("relq-data")).unwrap();
        let batch = (0..n)
            .map(|i| relq::NewMessage::new("job", format!("m-{i}")))
            .collect();
        broker.publish_batch(topic, batch).await.unwrap();
    });
}

/// The payloads printed by `relq --json consume`.
fn payloads(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["payload"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// `--count N` prints and acknowledges exactly N: the next run of the group gets the rest, none
/// lost and none twice.
#[test]
fn consume_acknowledges_exactly_what_it_printed() {
    let dir = fresh_dir();
    publish_many(&dir, "orders", 40);
    let mut seen = Vec::new();
    for count in ["1", "15"] {
        let out = relq_in(
            &dir,
            &[
                "--json", "consume", "orders", "--group", "g", "--count", count,
            ],
        );
        let got = payloads(&ok(&out));
        assert_eq!(got.len().to_string(), count, "{got:?}");
        seen.extend(got);
    }
    let out = relq_in(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--idle", "5s",
        ],
    );
    seen.extend(payloads(&ok(&out)));
    let expected: Vec<String> = (0..40).map(|i| format!("m-{i}")).collect();
    assert_eq!(seen, expected, "every message printed once, in order");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `relq consume` killed with SIGKILL after printing one message loses nothing: every message
/// it did not print is printed by the next run (same consumer name, so its pending messages come
/// back at once).
#[test]
fn consume_killed_with_sigkill_loses_nothing() {
    use std::io::{BufRead, BufReader};
    let dir = fresh_dir();
    publish_many(&dir, "orders", 200);
    let mut child = relq_cmd(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--name", "w1", "--idle", "60s",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::inherit())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    // What the killed run managed to print before it died.
    let mut seen = payloads(&first);
    seen.extend(lines.map_while(Result::ok).flat_map(|l| payloads(&l)));
    let out = relq_in(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--name", "w1", "--idle", "5s",
        ],
    );
    seen.extend(payloads(&ok(&out)));
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 200, "every message printed at least once");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM and SIGINT stop `relq consume` gracefully: it exits by itself with code 0 (not
/// killed by the signal) and says why on stderr.
#[test]
fn consume_shuts_down_gracefully_on_sigterm_and_sigint() {
    use std::io::{BufRead, BufReader, Read};
    let dir = fresh_dir();
    publish_many(&dir, "orders", 2);
    for signal in ["TERM", "INT"] {
        let mut child = relq_cmd(
            &dir,
            &[
                "--json", "consume", "orders", "--idle", "60s", "--group", signal,
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..2 {
            lines.next().expect("a printed message").unwrap();
        }
        let kill = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(0), "SIG{signal}: {status:?} {stderr}");
        assert!(stderr.contains(&format!("SIG{signal}")), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn fails_with(out: &std::process::Output, code: i32, stderr_has: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout {} stderr {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(stderr_has),
        "{stderr:?} lacks {stderr_has:?}"
    );
}

/// Usage mistakes exit 2, a topic that does not exist 3, and an invalid name is a usage error
/// (never "no dead letters") whose message does not echo a huge input back.
#[test]
fn usage_errors_and_names_are_checked_everywhere() {
    let dir = fresh_dir();
    fails_with(
        &relq_in(&dir, &["publish", "t", "job", "x", "-H", "novalue"]),
        2,
        "name=value",
    );
    fails_with(
        &relq_in(&dir, &["dlq", "replay", "t"]),
        2,
        "give dead-letter ids",
    );
    fails_with(
        &relq_in(&dir, &["dlq", "replay", "t", "1-0", "--all"]),
        2,
        "cannot be used",
    );
    fails_with(&relq_in(&dir, &["publish", "t", "job"]), 2, "<PAYLOAD>");
    for bad in [" ", "*", &"x".repeat(10_000)] {
        let out = relq_in(&dir, &["dlq", "list", bad]);
        fails_with(&out, 2, "invalid topic name");
        assert!(
            out.stderr.len() < 500,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ok(&relq_in(&dir, &["publish", "orders", "job", "x"]));
    fails_with(
        &relq_in(&dir, &["dlq", "stats", "nothere"]),
        3,
        "topic \"nothere\" not found",
    );
    fails_with(&relq_in(&dir, &["dlq", "list", "nothere"]), 3, "not found");
    let stats = ok(&relq_in(&dir, &["--json", "dlq", "stats", "orders"]));
    assert!(stats.contains("\"total\":0"), "{stats}");
    // An oversize header is refused with the limit named, and nothing is published.
    let huge = format!("{}=v", "k".repeat(70_000));
    fails_with(
        &relq_in(&dir, &["publish", "orders", "job", "x", "-H", &huge]),
        2,
        "over the limit",
    );
    let info = ok(&relq_in(&dir, &["--json", "info", "orders"]));
    assert!(info.contains("\"length\":1"), "{info}");
    // A data directory that is a file names the path.
    std::fs::write(dir.join("afile"), b"x").unwrap();
    fails_with(
        &relq_in(&dir, &["--url", "file://afile/sub", "info"]),
        1,
        "afile",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Payloads too big for an argument come from a file or stdin, byte for byte.
#[test]
fn publish_reads_the_payload_from_a_file_or_stdin() {
    use std::io::Write;
    let dir = fresh_dir();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("payload.bin"), &big).unwrap();
    ok(&relq_in(
        &dir,
        &["publish", "blobs", "blob", "--file", "payload.bin"],
    ));
    let mut child = relq_cmd(&dir, &["publish", "blobs", "text", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let out = ok(&relq_in(
        &dir,
        &["--json", "consume", "blobs", "--count", "2"],
    ));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let hex: String = big.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(lines[0]["payload"]["hex"].as_str(), Some(hex.as_str()));
    assert_eq!(lines[1]["payload"].as_str(), Some("from stdin"));
    fails_with(
        &relq_in(&dir, &["publish", "blobs", "blob", "--file", "missing.bin"]),
        1,
        "missing.bin",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A topic whose sealed segment is damaged: `relq info` shows the other topics and that topic's
/// error and exits 1; `relq consume` of it exits non-zero and says why.
#[test]
fn a_damaged_topic_is_reported_and_does_not_hide_the_others() {
    let dir = fresh_dir();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = relq::EmbeddedConfig::default().segment_size(4096);
        let backend = relq::EmbeddedBackend::open_with(dir.join("relq-data"), config).unwrap();
        let broker = relq::Broker::new(backend);
        // One message per publish: segments roll between commits, so the first is sealed.
        for topic in ["good", "bad"] {
            for i in 0..100 {
                let m = relq::NewMessage::new("job", format!("{topic}-{i:0>60}"));
                broker.publish(topic, m).await.unwrap();
            }
        }
    });
    let topics = dir.join("relq-data").join("topics");
    let bad = std::fs::read_dir(&topics)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("bad@"))
        .unwrap();
    let first = bad.join("00000000000000000000.seg");
    let mut bytes = std::fs::read(&first).unwrap();
    for b in &mut bytes[1000..1010] {
        *b ^= 0xff;
    }
    std::fs::write(&first, bytes).unwrap();

    let out = relq_in(&dir, &["--json", "info"]);
    fails_with(&out, 1, "1 of 2 topics could not be read: bad");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let good = rows.iter().find(|r| r["name"] == "good").unwrap();
    assert_eq!(good["length"], 100, "{v}");
    let bad = rows.iter().find(|r| r["name"] == "bad").unwrap();
    assert!(bad["error"].as_str().unwrap().contains("corrupt"), "{v}");

    let out = relq_in(&dir, &["consume", "bad", "--idle", "30s"]);
    fails_with(&out, 1, "the consumer stopped");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A topic terminated while `relq consume` runs (Redis: another process terminates it) ends the
/// command with exit code 4 and a message.
#[test]
fn consume_exits_4_when_its_topic_is_terminated() {
    use std::io::{BufRead, BufReader, Read};
    let Some(server) = relq_conformance::redis_server::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let dir = fresh_dir();
    ok(&relq_in(
        &dir,
        &["--url", &url, "publish", "doomed", "job", "x"],
    ));
    let mut child = relq_cmd(&dir, &["--url", &url, "consume", "doomed", "--idle", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next().expect("the message").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = relq::Broker::connect(&url).await.unwrap();
        assert!(broker.terminate("doomed").await.unwrap());
    });
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("terminated"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The topic directory of `topic` in the default data directory under `dir`.
fn topic_dir(dir: &std::path::Path, topic: &str) -> std::path::PathBuf {
    std::fs::read_dir(dir.join("relq-data").join("topics"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{topic}@"))
        })
        .unwrap()
}

/// Damage inside record 2 of 5 acknowledged messages in the active segment: `relq info` refuses
/// loudly (never a silent cut), `relq check` reports the corruption with its offsets and exits 5
/// without changing anything, `relq check --repair` is the operator's decision to cut, and a new
/// publish afterwards gets an id no group has passed.
#[test]
fn damage_in_the_active_segment_is_reported_and_repaired_only_on_request() {
    let dir = fresh_dir();
    for i in 0..5 {
        ok(&relq_in(
            &dir,
            &["publish", "orders", "job", &format!("order-{i}")],
        ));
    }
    let out = ok(&relq_in(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--count", "5",
        ],
    ));
    assert_eq!(payloads(&out).len(), 5);
    let seg = topic_dir(&dir, "orders").join("00000000000000000000.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize + 8;
    for b in &mut bytes[first_len + 12..first_len + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&seg, &bytes).unwrap();

    let out = relq_in(&dir, &["info", "orders"]);
    fails_with(&out, 1, "relq check");
    let out = relq_in(&dir, &["--json", "check"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damage = &report["topics"][0]["damage"][0];
    assert_eq!(damage["kind"], "corruption", "{report}");
    assert_eq!(damage["records_after"], 3, "{report}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "check changed nothing");

    let out = relq_in(&dir, &["check", "--repair"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&relq_in(&dir, &["check"]));
    ok(&relq_in(
        &dir,
        &["publish", "orders", "job", "after-repair"],
    ));
    let out = ok(&relq_in(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--idle", "5s",
        ],
    ));
    assert_eq!(
        payloads(&out),
        ["after-repair"],
        "group g gets the new message"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Errors and warnings reach the operator by default, as plain text when stderr is not a
/// terminal: the records `relq check --repair` cuts are logged at error level without
/// `RELQ_LOG` set.
#[test]
fn warnings_are_shown_by_default_without_colour_codes() {
    let dir = fresh_dir();
    for i in 0..5 {
        ok(&relq_in(
            &dir,
            &["publish", "orders", "job", &format!("order-{i}")],
        ));
    }
    let seg = topic_dir(&dir, "orders").join("00000000000000000000.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    // Zero the end of the last record: after a clean close that is damage, not a torn write.
    let mut at = 0;
    for _ in 0..4 {
        at += u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize + 8;
    }
    for b in &mut bytes[at + 10..] {
        *b = 0;
    }
    std::fs::write(&seg, &bytes).unwrap();
    fails_with(&relq_in(&dir, &["info", "orders"]), 1, "relq check");
    let out = relq_in(&dir, &["check", "--repair"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ERROR"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in {stderr:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGINT stops `relq demo` gracefully: its consumers shut down, it says how far it got, exits
/// 130, and removes its temporary data directory.
#[test]
fn demo_stops_gracefully_on_sigint() {
    use std::io::Read;
    let dir = fresh_dir();
    let mut child = relq_cmd(&dir, &["--json", "demo", "--messages", "10000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The demo installs its signal handling before it creates its data directory.
    let data = std::env::temp_dir().join(format!("relq-demo-{}", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !data.join("state.redb").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the demo never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("SIGINT: demo stopped after"), "{stderr}");
    assert!(!data.exists(), "the demo's data directory was removed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An unreachable backend is named in the error, each cause said once, credentials hidden.
#[test]
fn an_unreachable_backend_is_named_once() {
    let out = relq(&["--url", "redis://user:secret@127.0.0.1:1", "info"]);
    fails_with(&out, 1, "connecting to redis://user:***@127.0.0.1:1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("refused").count(), 1, "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}

/// `n` dead letters in `topic` of the default data directory under `dir`: messages of type
/// `bad` (payload `b-<i>`, category `validation`) and `worse` (category `database`), alternating,
/// each failing permanently.
fn dead_letters(dir: &std::path::Path, topic: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = relq::Broker::open(dir.join("relq-data")).unwrap();
        let batch = (0..n)
            .map(|i| {
                relq::NewMessage::new(if i % 2 == 0 { "bad" } else { "worse" }, format!("b-{i}"))
            })
            .collect();
        broker.publish_batch(topic, batch).await.unwrap();
        let consumer = broker
            .consumer(topic, "g")
            .start(relq::StartPosition::Earliest)
            .fallback(|m: relq::Message| async move {
                let category = if m.kind == "bad" {
                    "validation"
                } else {
                    "database"
                };
                Err(relq::HandlerError::permanent("rejected by the test").category(category))
            })
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let dls = broker.dead_letters(topic);
        while dls.count(&relq::DeadLetterQuery::all()).await.unwrap() < n as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        consumer.shutdown(std::time::Duration::from_secs(5)).await;
    });
}

/// Dead letters are exported as JSON lines and CSV, filtered; a replay by filter with --dry-run
/// changes nothing, and with --rate replays exactly the matching ones.
#[test]
fn dead_letters_export_and_replay_by_filter() {
    let dir = fresh_dir();
    dead_letters(&dir, "orders", 10);
    let out = ok(&relq_in(
        &dir,
        &["dlq", "export", "orders", "--category", "validation"],
    ));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    assert!(rows
        .iter()
        .all(|r| r["category"] == "validation" && r["message"]["type"] == "bad"));
    ok(&relq_in(
        &dir,
        &[
            "dlq", "export", "orders", "--format", "csv", "-o", "out.csv",
        ],
    ));
    let csv = std::fs::read_to_string(dir.join("out.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11, "{csv}");
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("id,message_id,type"));

    let out = ok(&relq_in(
        &dir,
        &[
            "--json",
            "dlq",
            "replay",
            "orders",
            "--type",
            "worse",
            "--dry-run",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["would_replay"], 5, "{v}");
    let stats = ok(&relq_in(&dir, &["--json", "dlq", "stats", "orders"]));
    assert!(
        stats.contains("\"total\":10"),
        "the dry run changed nothing: {stats}"
    );

    let out = ok(&relq_in(
        &dir,
        &[
            "--json", "dlq", "replay", "orders", "--type", "worse", "--rate", "50",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replayed"].as_object().unwrap().len(), 5, "{v}");
    let left = ok(&relq_in(&dir, &["dlq", "export", "orders"]));
    assert_eq!(left.lines().count(), 5);
    assert!(!left.contains("\"worse\""), "{left}");
    // The replayed messages are back in the topic for group g.
    let info = ok(&relq_in(&dir, &["--json", "info", "orders"]));
    assert!(info.contains("\"lag\":5"), "{info}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Topic and message operations: list, stop/resume, cleanup, terminate (which needs --yes when
/// nobody can be asked), completions.
#[test]
fn topic_and_message_operations() {
    let dir = fresh_dir();
    let id = ok(&relq_in(&dir, &["publish", "orders", "job", "x"]))
        .trim()
        .to_owned();
    ok(&relq_in(&dir, &["publish", "other", "job", "y"]));
    let topics = ok(&relq_in(&dir, &["--json", "topics"]));
    assert_eq!(topics.trim(), r#"["orders","other"]"#);
    ok(&relq_in(&dir, &["stop", "orders", &id]));
    let info = ok(&relq_in(&dir, &["--json", "info", "orders"]));
    assert!(info.contains(&id), "{info}");
    ok(&relq_in(&dir, &["resume", "orders", &id]));
    fails_with(
        &relq_in(&dir, &["resume", "orders", &id]),
        3,
        "was not stopped",
    );
    let out = ok(&relq_in(&dir, &["--json", "cleanup", "orders"]));
    assert!(
        out.contains("\"removed\":0"),
        "nothing acknowledged yet: {out}"
    );
    fails_with(&relq_in(&dir, &["terminate", "orders"]), 2, "--yes");
    ok(&relq_in(&dir, &["terminate", "orders", "--yes"]));
    fails_with(&relq_in(&dir, &["info", "orders"]), 3, "not found");
    fails_with(
        &relq_in(&dir, &["terminate", "orders", "--yes"]),
        3,
        "not found",
    );
    let bash = ok(&relq_in(&dir, &["completions", "bash"]));
    assert!(bash.contains("relq") && bash.contains("consume"), "{bash}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relq publish --jsonl` publishes JSON lines from stdin in batches; a bad line stops it with
/// its line number after publishing the lines before it.
#[test]
fn publish_reads_json_lines() {
    use std::io::Write;
    let dir = fresh_dir();
    let run = |input: String| {
        let mut child = relq_cmd(
            &dir,
            &["--json", "publish", "jobs", "--jsonl", "--batch", "7"],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let mut input: String = (0..20)
        .map(|i| {
            format!("{{\"type\":\"job\",\"payload\":\"p{i}\",\"headers\":{{\"n\":\"{i}\"}}}}\n")
        })
        .collect();
    input += "{\"type\":\"job\",\"payload\":{\"json\":true}}\n";
    input += "{\"type\":\"blob\",\"payload_hex\":\"00ff\",\"delay\":\"1h\"}\n";
    let out = run(input);
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["published"], 22, "{v}");
    let got = ok(&relq_in(
        &dir,
        &["--json", "consume", "jobs", "--count", "21"],
    ));
    let got = payloads(&got);
    assert_eq!(got[0], "p0");
    assert_eq!(got[20], r#"{"json":true}"#);
    // The delayed one waits: not yet read (lag) or read past and scheduled, never delivered.
    let info = ok(&relq_in(&dir, &["--json", "info", "jobs"]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let g = &info[0]["groups"][0];
    assert_eq!(
        g["lag"].as_u64().unwrap() + g["scheduled"].as_u64().unwrap(),
        1,
        "{info}"
    );
    assert_eq!(g["pending"], 0, "{info}");

    let out = run(
        "{\"type\":\"job\",\"payload\":\"a\"}\n{\"type\":\"job\",\"payload\":\"b\"}\nnot json\n"
            .into(),
    );
    fails_with(&out, 2, "line 3");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the 2 messages before it were published")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relq dlq groups` groups dead letters by error fingerprint with suggestions; `dlq show`
/// carries the suggestion for the dead letter's category.
#[test]
fn dead_letters_are_grouped_by_fingerprint_with_suggestions() {
    let dir = fresh_dir();
    dead_letters(&dir, "orders", 6);
    let out = ok(&relq_in(&dir, &["--json", "dlq", "groups", "orders"]));
    let groups: serde_json::Value = serde_json::from_str(&out).unwrap();
    let groups = groups.as_array().unwrap();
    // One error text, two categories: one group of 6.
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["count"], 6);
    assert_eq!(groups[0]["categories"]["validation"], 3);
    assert_eq!(groups[0]["types"]["worse"], 3);
    assert!(groups[0]["suggestion"]["check"].is_string(), "{groups:?}");
    let out = ok(&relq_in(
        &dir,
        &[
            "--json",
            "dlq",
            "groups",
            "orders",
            "--category",
            "database",
        ],
    ));
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g[0]["count"], 3);
    assert_eq!(g[0]["suggestion"]["replay"], "likely", "{g}");
    let id = g[0]["sample_ids"][0].as_str().unwrap().to_owned();
    let show: serde_json::Value = serde_json::from_str(&ok(&relq_in(
        &dir,
        &["--json", "dlq", "show", "orders", &id],
    )))
    .unwrap();
    assert_eq!(show["suggestion"]["replay"], "likely", "{show}");
    let human = ok(&relq_in(&dir, &["dlq", "groups", "orders"]));
    assert!(human.contains("6 x rejected by the test"), "{human}");
    fails_with(
        &relq_in(&dir, &["dlq", "groups", "nothere"]),
        3,
        "not found",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relq config check` validates a file (exit 2 naming the line and key of a mistake); `relq
/// config show` prints every effective value with its origin, flags over the environment over
/// the file; commands use the file's backend.
#[test]
fn configuration_files_environment_and_flags() {
    let dir = fresh_dir();
    std::fs::write(
        dir.join("relq.toml"),
        "[backend]\nurl = \"file://from-file\"\n\n[consumer]\nconcurrency = 4\nread_batch = 8\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.toml"),
        "[consumer]\nconcurrency = 4\nconcurency = 5\n",
    )
    .unwrap();
    std::fs::write(dir.join("bad.yaml"), "retry:\n  kind: sometimes\n").unwrap();
    let out = ok(&relq_in(&dir, &["config", "check", "relq.toml"]));
    assert!(out.contains("valid"), "{out}");
    let out = relq_in(&dir, &["config", "check", "bad.toml"]);
    fails_with(&out, 2, "line 3");
    assert!(String::from_utf8_lossy(&out.stderr).contains("concurency"));
    fails_with(
        &relq_in(&dir, &["config", "check", "bad.yaml"]),
        2,
        "exponential",
    );

    let show = |extra: &[(&str, &str)], args: &[&str]| {
        let out = relq_cmd(&dir, &["--json", "--config", "relq.toml"])
            .args(args)
            .args(["config", "show"])
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&ok(&out)).unwrap()
    };
    let v = show(
        &[("RELQ_CONSUMER_READ_BATCH", "32")],
        &["--url", "memory://"],
    );
    assert_eq!(v["consumer.concurrency"]["value"], 4);
    assert_eq!(v["consumer.concurrency"]["origin"]["kind"], "file");
    assert_eq!(v["consumer.read_batch"]["value"], 32);
    assert_eq!(
        v["consumer.read_batch"]["origin"]["name"],
        "RELQ_CONSUMER_READ_BATCH"
    );
    assert_eq!(v["backend.url"]["value"], "memory://");
    assert_eq!(v["backend.url"]["origin"]["kind"], "flag");
    assert_eq!(v["retry.max_attempts"]["origin"]["kind"], "default");
    let v = show(&[("RELQ_URL", "file://from-env")], &[]);
    assert_eq!(v["backend.url"]["value"], "file://from-env");
    // A typo in a section's variable is an error, not ignored.
    let out = Command::new(env!("CARGO_BIN_EXE_relq"))
        .args(["config", "show"])
        .current_dir(&dir)
        .env("RELQ_CONSUMER_CONCURENCY", "3")
        .output()
        .unwrap();
    fails_with(&out, 2, "RELQ_CONSUMER_CONCURENCY");
    // Commands open the file's backend.
    ok(&relq_in(
        &dir,
        &["--config", "relq.toml", "publish", "t", "job", "x"],
    ));
    assert!(dir.join("from-file").join("state.redb").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// While a process holds the data directory and cannot be reached (its admin socket's record
/// is gone), the inspection commands still work (they open it read-only and say so); a command
/// that writes is refused with the reason.
#[test]
fn inspection_works_on_a_data_directory_another_process_holds_without_a_socket() {
    use std::io::{BufRead, BufReader};
    let dir = fresh_dir();
    publish_many(&dir, "orders", 3);
    dead_letters(&dir, "failing", 2);
    let mut child = relq_cmd(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--idle", "60s",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next().expect("the consumer runs").unwrap();
    std::fs::remove_file(dir.join("relq-data").join("ADMIN")).unwrap();
    let out = relq_in(&dir, &["--json", "info", "orders"]);
    let info = ok(&out);
    assert!(info.contains("\"length\":3"), "{info}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
    let list = ok(&relq_in(&dir, &["--json", "dlq", "list", "failing"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    ok(&relq_in(&dir, &["--json", "dlq", "groups", "failing"]));
    fails_with(
        &relq_in(&dir, &["publish", "orders", "job", "x"]),
        1,
        "in use",
    );
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relq --json --config relq.toml serve` on a free loopback port in `dir`: the process and the
/// base URL it printed.
fn serve_on_loopback(dir: &std::path::Path) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = relq_cmd(
        dir,
        &[
            "--json",
            "--config",
            "relq.toml",
            "serve",
            "--bind",
            "127.0.0.1:0",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value =
        serde_json::from_str(&lines.next().expect("the listening line").unwrap()).unwrap();
    (child, first["listening"].as_str().unwrap().to_owned())
}

/// `curl` against `relq serve` over a real socket; panics loudly when curl is missing.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is needed by this test (apt-get install -y curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl printed a status");
    (code.trim().parse().unwrap(), body.to_owned())
}

#[test]
fn serve_answers_curl_over_a_real_socket_with_tokens_and_an_audit_log() {
    let dir = fresh_dir();
    publish_many(&dir, "orders", 3);
    std::fs::write(
        dir.join("relq.toml"),
        r#"
[[server.tokens]]
name = "ops"
token = "admin-secret-0123456789"
role = "admin"

[[server.tokens]]
name = "grafana"
token = "reader-secret-0123456789"
role = "read"
"#,
    )
    .unwrap();
    // Refused: a public address without tokens.
    let open = relq_in(&dir, &["serve", "--bind", "0.0.0.0:0"]);
    fails_with(&open, 2, "without authentication");
    let (mut child, base) = serve_on_loopback(&dir);
    let admin = "Authorization: Bearer admin-secret-0123456789";
    let reader = "Authorization: Bearer reader-secret-0123456789";

    let (code, body) = curl(&[&format!("{base}/api/topics")]);
    assert_eq!(code, 401, "{body}");
    let (code, body) = curl(&["-H", reader, &format!("{base}/api/topics")]);
    assert_eq!(code, 200, "{body}");
    let topics: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(topics[0]["name"], "orders");
    assert_eq!(topics[0]["length"], 3);
    let (code, body) = curl(&[
        "-H",
        reader,
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"type":"t","payload":"x"}"#,
        &format!("{base}/api/topics/orders/messages"),
    ]);
    assert_eq!(code, 403, "{body}");
    let (code, body) = curl(&[
        "-H",
        admin,
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"type":"t","payload":"from curl"}"#,
        &format!("{base}/api/topics/orders/messages"),
    ]);
    assert_eq!(code, 200, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, body) = curl(&[
        "-H",
        admin,
        "-X",
        "POST",
        &format!("{base}/api/topics/orders/messages/{id}/stop"),
    ]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(&["-H", reader, &format!("{base}/api/audit")]);
    assert_eq!(code, 200, "{body}");
    let audit: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(audit["items"][0]["action"], "stop");
    assert_eq!(audit["items"][1]["action"], "publish");
    assert_eq!(audit["items"][1]["actor"], "ops");
    let (code, body) = curl(&["-H", reader, &format!("{base}/metrics")]);
    assert_eq!(code, 200);
    assert!(
        body.contains("relq_topic_messages{topic=\"orders\"} 4"),
        "{body}"
    );
    // The engine's own counters: it committed at least the publish and the stop.
    let cycles = body
        .lines()
        .find_map(|l| l.strip_prefix("relq_engine_commit_cycles_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(cycles.is_some_and(|c| c >= 1.0), "{body}");
    let (code, body) = curl(&[&format!("{base}/readyz")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"disk\""), "{body}");

    // SIGTERM: a graceful stop, exit 0; the audit log is stored in the data directory.
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let out = relq_in(&dir, &["--json", "topics"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("_relq-audit"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tail_follows_new_messages_without_joining_a_group() {
    use std::io::{BufRead, BufReader};
    let Some(server) = relq_conformance::redis_server::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let dir = fresh_dir();
    for p in ["a", "b", "c"] {
        ok(&relq_in(
            &dir,
            &["--url", &url, "publish", "orders", "job", p],
        ));
    }
    let mut child = relq_cmd(
        &dir,
        &[
            "--url",
            &url,
            "--json",
            "tail",
            "orders",
            "--last",
            "2",
            "--count",
            "4",
            "--interval",
            "20ms",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut payload = || -> String {
        let l = lines.next().expect("a line").unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        v["payload"].as_str().unwrap().to_owned()
    };
    // The last two stored ones first, then what is published while it runs.
    assert_eq!((payload(), payload()), ("b".to_owned(), "c".to_owned()));
    ok(&relq_in(
        &dir,
        &["--url", &url, "publish", "orders", "job", "d"],
    ));
    assert_eq!(payload(), "d");
    ok(&relq_in(
        &dir,
        &["--url", &url, "publish", "orders", "job", "e"],
    ));
    assert_eq!(payload(), "e");
    assert_eq!(child.wait().unwrap().code(), Some(0), "--count 4 ends it");
    // No group was created.
    let info = relq_in(&dir, &["--url", &url, "--json", "info", "orders"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v[0]["groups"].as_array().map(Vec::len), Some(0), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn operator_actions_of_the_command_line_are_in_the_audit_log() {
    let dir = fresh_dir();
    publish_many(&dir, "orders", 2);
    let id = {
        let out = ok(&relq_in(&dir, &["--json", "publish", "orders", "job", "x"]));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    ok(&relq_in(&dir, &["stop", "orders", &id]));
    ok(&relq_in(&dir, &["resume", "orders", &id]));
    // A dry run counts and is not audited.
    let dry = ok(&relq_in(
        &dir,
        &[
            "--json",
            "dlq",
            "purge",
            "orders",
            "--older-than",
            "0s",
            "--dry-run",
        ],
    ));
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(
        (&dry["would_purge"], &dry["dry_run"]),
        (&serde_json::json!(0), &serde_json::json!(true)),
        "{dry}"
    );
    ok(&relq_in(
        &dir,
        &["dlq", "purge", "orders", "--older-than", "0s"],
    ));
    let out = ok(&relq_in(&dir, &["--json", "audit"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let items = v["items"].as_array().unwrap();
    let actions: Vec<&str> = items
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["purge", "resume", "stop"], "{v}");
    assert!(
        items
            .iter()
            .all(|e| e["actor"].as_str().unwrap().starts_with("cli:")),
        "{v}"
    );
    assert_eq!(items[2]["params"]["id"], id.as_str());
    let human = ok(&relq_in(&dir, &["audit", "--limit", "1"]));
    assert!(
        human.contains("purge orders -> 200") && human.contains("more: relq audit --before"),
        "{human}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A real Prometheus server (Debian's `prometheus`) scrapes `relq serve` with a read-only token,
/// loads the alert rules, and answers queries for relq's series. Without the binary the test
/// says so loudly and, with `RELQ_REQUIRE_PROMETHEUS=1` (set by CI), fails.
#[test]
fn a_real_prometheus_scrapes_relq_serve() {
    let Some(prometheus) = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("!!! prometheus is not installed (apt-get install -y prometheus): the Prometheus end-to-end test did not run");
        assert!(
            std::env::var_os("RELQ_REQUIRE_PROMETHEUS").is_none(),
            "RELQ_REQUIRE_PROMETHEUS is set and prometheus is missing"
        );
        return;
    };
    let dir = fresh_dir();
    publish_many(&dir, "orders", 3);
    std::fs::write(
        dir.join("relq.toml"),
        "[[server.tokens]]\nname = \"prometheus\"\ntoken = \"reader-secret-0123456789\"\nrole = \"read\"\n",
    )
    .unwrap();
    let (mut serve, base) = serve_on_loopback(&dir);
    let target = base.trim_start_matches("http://").to_owned();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/prometheus/relq-alerts.yml")
        .canonicalize()
        .unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: relq\n    authorization:\n      credentials: reader-secret-0123456789\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut prom = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("prom-data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let query = |q: &str| -> serde_json::Value {
        let (code, body) = curl(&[
            "--get",
            "--data-urlencode",
            &format!("query={q}"),
            &format!("http://127.0.0.1:{port}/api/v1/query"),
        ]);
        if code != 200 {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    };
    // Scrapes every second; polled for up to 60 s (a slow machine, Prometheus starting up).
    let mut series = serde_json::Value::Null;
    for _ in 0..600 {
        series = query("relq_topic_messages");
        if series["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let up = query("up{job=\"relq\"}");
    let (_, rules_body) = curl(&[&format!("http://127.0.0.1:{port}/api/v1/rules")]);
    let _ = prom.kill();
    let _ = prom.wait();
    let _ = serve.kill();
    let _ = serve.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let result = &series["data"]["result"][0];
    assert_eq!(result["metric"]["topic"], "orders", "{series}");
    assert_eq!(result["value"][1], "3", "{series}");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let rules: serde_json::Value = serde_json::from_str(&rules_body).unwrap();
    let group = &rules["data"]["groups"][0];
    assert_eq!(group["name"], "relq", "{rules}");
    assert!(group["rules"].as_array().unwrap().len() >= 10, "{rules}");
}

/// Reads the payload of the next message `relq --json consume` printed.
fn next_payload(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> String {
    let l = lines.next().expect("a printed message").unwrap();
    let v: serde_json::Value = serde_json::from_str(&l).unwrap();
    v["payload"].as_str().unwrap().to_owned()
}

#[test]
fn commands_work_on_a_data_directory_a_running_consumer_holds() {
    use std::io::{BufRead, BufReader};
    let dir = fresh_dir();
    publish_many(&dir, "orders", 2);
    let mut holder = relq_cmd(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--idle", "60s",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(
        (next_payload(&mut lines), next_payload(&mut lines)),
        ("m-0".into(), "m-1".into())
    );

    // Reads, publishes and dead-letter commands go through the holder.
    let info: serde_json::Value =
        serde_json::from_str(&ok(&relq_in(&dir, &["--json", "info", "orders"]))).unwrap();
    assert_eq!(info[0]["groups"][0]["name"], "g", "{info}");
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = ok(&relq_in(
            &dir,
            &["publish", "orders", "job", &format!("outside-{i}")],
        ));
        ids.push(id.trim().to_owned());
    }
    for i in 0..4 {
        assert_eq!(next_payload(&mut lines), format!("outside-{i}"));
    }
    ok(&relq_in(&dir, &["dlq", "list", "orders"]));

    // Groups and a cleanup preview go through the holder too.
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(&relq_in(&dir, args))).unwrap()
    };
    let created = json(&[
        "--json", "group", "create", "orders", "audit", "--start", "earliest",
    ]);
    assert_eq!(
        (&created["created"], &created["group"]["lag"]),
        (&serde_json::json!(true), &serde_json::json!(6)),
        "{created}"
    );
    let again = json(&["--json", "group", "create", "orders", "audit"]);
    assert_eq!(again["created"], false, "{again}");
    let list = ok(&relq_in(&dir, &["group", "list", "orders"]));
    assert!(
        list.contains("audit: position") && list.contains("g: position"),
        "{list}"
    );
    let preview = json(&["--json", "cleanup", "orders", "--dry-run"]);
    assert_eq!(
        (&preview["dry_run"], &preview["removed"]),
        (&serde_json::json!(true), &serde_json::json!(0)),
        "the new group still needs every message: {preview}"
    );
    // The running consumer's group moved back: it prints those messages again.
    let moved = json(&["--json", "group", "move", "orders", "g", "--to", &ids[2]]);
    assert_eq!(moved["before"]["name"], "g", "{moved}");
    assert_eq!(
        (next_payload(&mut lines), next_payload(&mut lines)),
        ("outside-2".into(), "outside-3".into())
    );
    fails_with(
        &relq_in(&dir, &["group", "move", "orders", "none", "--to", "latest"]),
        3,
        "not found",
    );
    fails_with(
        &relq_in(&dir, &["group", "move", "orders", "g", "--to", "soon"]),
        2,
        "invalid",
    );
    fails_with(
        &relq_in(&dir, &["group", "delete", "orders", "audit"]),
        2,
        "--yes",
    );
    ok(&relq_in(
        &dir,
        &["group", "delete", "orders", "audit", "--yes"],
    ));
    fails_with(
        &relq_in(&dir, &["group", "delete", "orders", "audit", "--yes"]),
        3,
        "not found",
    );
    let audit = ok(&relq_in(&dir, &["audit"]));
    for action in ["group.create", "group.move", "group.delete"] {
        assert!(audit.contains(action), "{action} missing: {audit}");
    }
    let topics = ok(&relq_in(&dir, &["--json", "topics"]));
    assert!(topics.contains("orders"), "{topics}");
    // Terminate through the holder: its consumer stops with "terminated" (exit 4).
    ok(&relq_in(&dir, &["terminate", "orders", "--yes"]));
    assert_eq!(holder.wait().unwrap().code(), Some(4));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_holder_killed_with_sigkill_leaves_a_record_that_is_not_trusted() {
    use std::io::{BufRead, BufReader};
    let dir = fresh_dir();
    publish_many(&dir, "orders", 1);
    let mut holder = relq_cmd(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g", "--idle", "60s",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(next_payload(&mut lines), "m-0");
    let record = dir.join("relq-data").join("ADMIN");
    assert!(record.exists(), "the holder records its socket");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(record.exists(), "SIGKILL leaves the record behind");
    // The lock went with the process: the next command opens the directory itself.
    let info: serde_json::Value =
        serde_json::from_str(&ok(&relq_in(&dir, &["--json", "info", "orders"]))).unwrap();
    assert_eq!(info[0]["length"], 1, "{info}");
    ok(&relq_in(
        &dir,
        &["publish", "orders", "job", "after-the-kill"],
    ));
    let out = ok(&relq_in(
        &dir,
        &[
            "--json", "consume", "orders", "--group", "g2", "--count", "2",
        ],
    ));
    assert!(out.contains("after-the-kill"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn concurrent_publishers_on_one_data_directory_all_succeed() {
    let dir = fresh_dir();
    let loops: Vec<_> = (0..4)
        .map(|p| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| relq_in(&dir, &["publish", "orders", "job", &format!("p{p}-{i}")]))
                    .filter(|o| !o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let failures: Vec<String> = loops.into_iter().flat_map(|l| l.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} of 40 publishes failed: {failures:?}",
        failures.len()
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(&relq_in(&dir, &["--json", "info", "orders"]))).unwrap();
    assert_eq!(info[0]["length"], 40, "{info}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_speaks_https_with_the_configured_certificate() {
    let dir = fresh_dir();
    let gen = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(&dir)
        .output()
        .expect("openssl is needed by this test (apt-get install -y openssl)");
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    std::fs::write(
        dir.join("relq.toml"),
        "[server]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n",
    )
    .unwrap();
    // Half a TLS configuration is refused before anything starts.
    std::fs::write(dir.join("half.toml"), "[server]\ntls_cert = \"cert.pem\"\n").unwrap();
    fails_with(
        &relq_in(&dir, &["--config", "half.toml", "serve"]),
        2,
        "tls_key",
    );
    let (mut child, base) = serve_on_loopback(&dir);
    assert!(base.starts_with("https://"), "{base}");
    let cert = dir.join("cert.pem");
    let (code, body) = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        &format!("{base}/readyz"),
    ]);
    assert_eq!(code, 200, "{body}");
    // Plain HTTP to the TLS port gets no answer from the API.
    let (code, _) = curl(&[&format!("{}/readyz", base.replace("https://", "http://"))]);
    assert_ne!(code, 200);
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_show_never_prints_token_secrets() {
    let dir = fresh_dir();
    std::fs::write(
        dir.join("relq.toml"),
        "[[server.tokens]]\nname = \"ops\"\ntoken = \"very-secret-token-0123\"\nrole = \"admin\"\n",
    )
    .unwrap();
    for json in [false, true] {
        let mut args = vec!["--config", "relq.toml", "config", "show"];
        if json {
            args.insert(0, "--json");
        }
        let out = ok(&relq_in(&dir, &args));
        assert!(!out.contains("very-secret-token"), "{out}");
        assert!(out.contains("redacted") && out.contains("ops"), "{out}");
    }
    // A short token is a configuration error naming the key.
    std::fs::write(
        dir.join("short.toml"),
        "[[server.tokens]]\nname = \"ops\"\ntoken = \"short\"\nrole = \"admin\"\n",
    )
    .unwrap();
    fails_with(
        &relq_in(&dir, &["--config", "short.toml", "config", "show"]),
        2,
        "server.tokens",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn message_shows_payload_and_where_it_stands_in_each_group() {
    let dir = fresh_dir();
    dead_letters(&dir, "orders", 1);
    let later = ok(&relq_in(
        &dir,
        &[
            "--json",
            "publish",
            "orders",
            "job",
            "{\"n\":2}",
            "-H",
            "tenant=acme",
        ],
    ));
    let later = serde_json::from_str::<serde_json::Value>(&later).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = serde_json::from_str::<serde_json::Value>(&ok(&relq_in(
        &dir,
        &["--json", "dlq", "list", "orders"],
    )))
    .unwrap()["items"][0]["message"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v: serde_json::Value = serde_json::from_str(&ok(&relq_in(
        &dir,
        &["--json", "message", "orders", &first],
    )))
    .unwrap();
    assert_eq!(v["groups"][0]["group"], "g", "{v}");
    assert_eq!(v["groups"][0]["state"], "done", "{v}");
    assert_eq!(v["dead_letters"].as_array().unwrap().len(), 1, "{v}");
    let v: serde_json::Value = serde_json::from_str(&ok(&relq_in(
        &dir,
        &["--json", "message", "orders", &later],
    )))
    .unwrap();
    assert_eq!(v["groups"][0]["state"], "unread", "{v}");
    assert_eq!(v["message"]["headers"]["tenant"], "acme");
    let human = ok(&relq_in(&dir, &["message", "orders", &later]));
    assert!(
        human.contains("group g: unread") && human.contains("tenant: acme"),
        "{human}"
    );
    fails_with(
        &relq_in(&dir, &["message", "orders", "1-0"]),
        3,
        "not found",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `publish --ttl` and `consume --on-expired`: an expired message is never printed; by default
/// it becomes a dead letter with reason `expired` (listed with `dlq list --reason expired`),
/// with `--on-expired drop` it is acknowledged and gone; a bad value is a usage error.
#[test]
fn expired_messages_are_not_consumed() {
    let dir = fresh_dir();
    ok(&relq_in(
        &dir,
        &["publish", "t", "job", "stale", "--ttl", "0s"],
    ));
    ok(&relq_in(
        &dir,
        &["publish", "t", "job", "fresh", "--ttl", "1h"],
    ));
    let out = relq_in(
        &dir,
        &["--json", "consume", "t", "--group", "g", "--idle", "1s"],
    );
    assert_eq!(payloads(&ok(&out)), ["fresh"]);
    let out = ok(&relq_in(
        &dir,
        &["--json", "dlq", "list", "t", "--reason", "expired"],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["reason"], "expired");
    assert_eq!(items[0]["message"]["payload"], "stale");

    ok(&relq_in(
        &dir,
        &["publish", "u", "job", "stale", "--ttl", "0s"],
    ));
    let out = relq_in(
        &dir,
        &[
            "--json",
            "consume",
            "u",
            "--group",
            "g",
            "--idle",
            "1s",
            "--on-expired",
            "drop",
        ],
    );
    assert!(payloads(&ok(&out)).is_empty());
    let out = ok(&relq_in(&dir, &["--json", "dlq", "list", "u"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 0, "dropped: {v}");
    let info = ok(&relq_in(&dir, &["--json", "info", "u"]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let g = &info[0]["groups"][0];
    assert_eq!(g["name"], "g", "{info}");
    assert_eq!(
        (&g["pending"], &g["lag"], &g["scheduled"]),
        (
            &serde_json::json!(0),
            &serde_json::json!(0),
            &serde_json::json!(0)
        ),
        "settled: {info}"
    );

    fails_with(
        &relq_in(&dir, &["consume", "u", "--on-expired", "maybe"]),
        2,
        "neither dead_letter nor drop",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `publish --compress` (and a `--jsonl` line's own `compress`): reads show the payload
/// decompressed and `consume` prints it whole (the conformance suite checks the stored form on
/// every backend). A bad algorithm is a usage error.
#[test]
fn compressed_publishes_are_consumed_whole() {
    let dir = fresh_dir();
    let doc: String = (0..60)
        .map(|i| format!(r#"{{"order":"ord-{i:05}","status":"created","currency":"EUR"}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let doc = format!("[{doc}]");
    let out = ok(&relq_in(
        &dir,
        &["--json", "publish", "t", "job", &doc, "--compress", "zstd"],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let mut child = relq_cmd(&dir, &["publish", "t", "--jsonl", "--compress", "lz4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let stdin = child.stdin.as_mut().unwrap();
        let line = |c: Option<&str>| {
            let mut v = serde_json::json!({"type": "job", "payload": doc});
            if let Some(c) = c {
                v["compress"] = c.into();
            }
            v.to_string()
        };
        writeln!(stdin, "{}", line(None)).unwrap();
        writeln!(stdin, "{}", line(Some("gzip"))).unwrap();
    }
    ok(&child.wait_with_output().unwrap());
    let out = ok(&relq_in(&dir, &["--json", "message", "t", &id]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["message"]["payload"],
        doc.as_str(),
        "shown decompressed: {v}"
    );
    assert!(
        v["message"]["headers"].get("relq-encoding").is_none(),
        "{v}"
    );
    let out = relq_in(
        &dir,
        &["--json", "consume", "t", "--count", "3", "--idle", "2s"],
    );
    assert_eq!(payloads(&ok(&out)), [doc.clone(), doc.clone(), doc.clone()]);
    fails_with(
        &relq_in(&dir, &["publish", "t", "job", "x", "--compress", "brotli"]),
        2,
        "none of lz4, gzip, zstd",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relq route NAME PATTERN TARGET` forwards what is published on matching topics (a topic it
/// finds after starting too) into the target while other processes publish and consume through
/// it; SIGTERM stops it with exit 0 and a report. `consume --pattern` reads every matching
/// topic and prints each message with its topic. A bad pattern is a usage error.
#[test]
fn route_forwards_and_consume_reads_a_pattern() {
    use std::io::{BufRead, BufReader, Read};
    let dir = fresh_dir();
    ok(&relq_in(&dir, &["publish", "in.eu", "job", "before"]));
    let mut route = relq_cmd(
        &dir,
        &[
            "--json",
            "route",
            "audit",
            "in.>",
            "audit-log",
            "--start",
            "earliest",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut stderr = BufReader::new(route.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("audit: in.> -> audit-log"), "{line}");
    // Through the route's process (it holds the data directory): a new matching topic.
    ok(&relq_in(&dir, &["publish", "in.us.east", "job", "after"]));
    ok(&relq_in(&dir, &["publish", "other", "job", "not routed"]));
    let out = relq_in(
        &dir,
        &[
            "--json",
            "consume",
            "audit-log",
            "--count",
            "2",
            "--idle",
            "30s",
        ],
    );
    let mut got = payloads(&ok(&out));
    got.sort();
    assert_eq!(got, ["after", "before"]);
    let kill = Command::new("kill")
        .args(["-TERM", &route.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = route.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert_eq!(status.code(), Some(0), "{rest}");
    let mut report = String::new();
    route
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut report)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(v["routes"][0]["forwarded"], 2, "{v}");

    // A pattern consumer: every matching topic, each line naming its topic.
    let out = relq_in(
        &dir,
        &[
            "consume",
            "in.>",
            "--pattern",
            "--count",
            "2",
            "--group",
            "p",
        ],
    );
    let text = ok(&out);
    assert!(
        text.contains("in.eu ") && text.contains("in.us.east "),
        "{text}"
    );
    assert!(!text.contains("not routed"), "{text}");
    fails_with(
        &relq_in(&dir, &["consume", "in.>.x", "--pattern"]),
        2,
        "last segment",
    );
    fails_with(&relq_in(&dir, &["route"]), 2, "no route");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `consume --filter`: only what passes every filter is printed; the rest is acknowledged for
/// the group (a second run prints nothing more); a bad filter is a usage error.
#[test]
fn consume_prints_only_what_passes_its_filters() {
    let dir = fresh_dir();
    for (tenant, body) in [
        ("acme", r#"{"amount":120}"#),
        ("other", r#"{"amount":130}"#),
        ("acme", r#"{"amount":5}"#),
    ] {
        ok(&relq_in(
            &dir,
            &[
                "publish",
                "t",
                "job",
                body,
                "-H",
                &format!("tenant={tenant}"),
            ],
        ));
    }
    let out = relq_in(
        &dir,
        &[
            "--json",
            "consume",
            "t",
            "--name",
            "w",
            "--filter",
            "header:tenant=acme",
            "--filter",
            "json:/amount>100",
        ],
    );
    assert_eq!(payloads(&ok(&out)), [r#"{"amount":120}"#]);
    // The same consumer name takes back at once anything the first run left pending: nothing.
    let out = relq_in(&dir, &["--json", "consume", "t", "--name", "w"]);
    assert!(payloads(&ok(&out)).is_empty(), "settled for the group");
    let info = ok(&relq_in(&dir, &["--json", "info", "t"]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let g = &info[0]["groups"][0];
    assert_eq!(
        (&g["pending"], &g["lag"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "{info}"
    );
    fails_with(
        &relq_in(&dir, &["consume", "t", "--filter", "tenant=acme"]),
        2,
        "write type:GLOB",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three `relq consume` processes of one group with `--rate-limit 20/1s` on Redis share one
/// bucket: a backlog of 60 is consumed once in all, and at no time more than the bucket (20)
/// plus the rate times the time since they started (a bucket per process would let 60 through
/// at once).
#[test]
fn a_rate_limit_is_held_across_three_consumer_processes_on_redis() {
    use std::io::{BufRead, BufReader};
    let Some(server) = relq_conformance::redis_server::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let dir = fresh_dir();
    let lines: String = (0..60)
        .map(|i| format!("{{\"type\":\"job\",\"payload\":\"m{i}\"}}\n"))
        .collect();
    let mut publish = relq_cmd(&dir, &["--url", &url, "publish", "limited", "--jsonl"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut publish.stdin.take().unwrap(), lines.as_bytes()).unwrap();
    assert!(publish.wait().unwrap().success());
    let started = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let children: Vec<_> = (0..3)
        .map(|i| {
            let name = format!("c{i}");
            let mut child = relq_cmd(
                &dir,
                &[
                    "--url",
                    &url,
                    "--json",
                    "consume",
                    "limited",
                    "--group",
                    "g",
                    "--name",
                    &name,
                    "--rate-limit",
                    "20/1s",
                    "--idle",
                    "3s",
                ],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
            let out = child.stdout.take().unwrap();
            let tx = tx.clone();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let line = line.unwrap();
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let payload = v["payload"].as_str().unwrap_or_default().to_owned();
                    tx.send((started.elapsed(), i, payload)).unwrap();
                }
            });
            (child, reader)
        })
        .collect();
    drop(tx);
    for (mut child, reader) in children {
        assert!(child.wait().unwrap().success());
        reader.join().unwrap();
    }
    let mut got: Vec<(std::time::Duration, usize, String)> = rx.into_iter().collect();
    got.sort();
    let payloads: std::collections::BTreeSet<&str> =
        got.iter().map(|(_, _, p)| p.as_str()).collect();
    assert_eq!(got.len(), 60, "each message consumed once: {got:?}");
    assert_eq!(payloads.len(), 60);
    let processes: std::collections::BTreeSet<usize> = got.iter().map(|(_, i, _)| *i).collect();
    assert!(processes.len() >= 2, "the work was shared: {processes:?}");
    // Lines arrive after their messages were taken, so counting by arrival never overstates.
    for (n, (at, _, _)) in got.iter().enumerate() {
        let allowed = 20.0 + 20.0 * at.as_secs_f64() + 1.0;
        assert!(
            (n + 1) as f64 <= allowed,
            "{} consumed {at:?} after the start; the limit allows {allowed:.1}",
            n + 1
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relq publish --idempotency-key` run twice, as two processes (a script retrying a publish it
/// was unsure of), stores the message once and prints the first id both times: on the
/// embedded engine (the second process reopens the directory) and on Redis.
#[test]
fn a_publish_retried_by_another_process_with_its_idempotency_key_is_stored_once() {
    let server = relq_conformance::redis_server::RedisServer::start();
    let dir = fresh_dir();
    let mut urls = vec![format!("file://{}", dir.join("data").display())];
    if let Some(s) = &server {
        urls.push(s.url());
    }
    for url in &urls {
        let publish = |payload: &str| {
            let out = ok(&relq_in(
                &dir,
                &[
                    "--url",
                    url,
                    "--json",
                    "publish",
                    "payments",
                    "charge",
                    payload,
                    "--idempotency-key",
                    "charge-7",
                ],
            ));
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            v["id"].as_str().unwrap().to_owned()
        };
        let first = publish("first");
        assert_eq!(publish("retry"), first, "{url}");
        let info = ok(&relq_in(
            &dir,
            &["--url", url, "--json", "info", "payments"],
        ));
        let v: serde_json::Value = serde_json::from_str(info.trim()).unwrap();
        assert_eq!(v[0]["length"], 1, "{url}: {info}");
        let shown = ok(&relq_in(
            &dir,
            &["--url", url, "--json", "message", "payments", &first],
        ));
        assert!(shown.contains("\"first\""), "{url}: {shown}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Per-key ordering under kill -9, model-checked: consumer processes of one group print keyed
/// messages (20 keys, 60 messages each, paced by a group rate limit) into one shared pipe, so the pipe's order is the order
/// of the prints (a line is one atomic write, flushed before its ack). Every few hundred
/// milliseconds one process is killed with SIGKILL and another started (under the same name
/// half the time, which recovers what the dead one held at once; else under a new name, which
/// claims it after `--claim-after`). For each key, every printed message must be the one
/// printed last (a delivery redone after a kill) or the key's next message in publish order;
/// and every message is printed. Redis with three processes; the embedded engine with one
/// process at a time (each restart reopens the directory).
#[test]
fn per_key_order_holds_while_consumers_are_killed() {
    let server = relq_conformance::redis_server::RedisServer::start();
    let dir = fresh_dir();
    let mut runs = vec![(format!("file://{}", dir.join("data").display()), 1usize)];
    if let Some(s) = &server {
        runs.push((s.url(), 3));
    }
    for (url, processes) in runs {
        killed_consumers_keep_key_order(&dir, &url, processes);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn killed_consumers_keep_key_order(dir: &std::path::Path, url: &str, processes: usize) {
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::{BufRead, BufReader};
    const KEYS: usize = 20;
    const PER_KEY: usize = 60;
    // In runs of three per key (k0:0, k0:1, k0:2, k1:0, ...), so unordered consumers would
    // take a key's messages at once.
    let lines: String = (0..PER_KEY / 3)
        .flat_map(|r| {
            (0..KEYS).flat_map(move |k| {
                (3 * r..3 * r + 3).map(move |n| {
                    format!(
                        "{{\"type\":\"job\",\"payload\":\"k{k}:{n}\",\"ordering_key\":\"k{k}\"}}\n"
                    )
                })
            })
        })
        .collect();
    let mut publish = relq_cmd(dir, &["--url", url, "publish", "keyed", "--jsonl"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut publish.stdin.take().unwrap(), lines.as_bytes()).unwrap();
    assert!(publish.wait().unwrap().success(), "{url}: publish");
    let (reader, writer) = std::io::pipe().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let collector = std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let spawn = |name: &str| {
        relq_cmd(
            dir,
            &[
                "--url",
                url,
                "--json",
                "consume",
                "keyed",
                "--group",
                "g",
                "--name",
                name,
                "--claim-after",
                "1s",
                // Paced, so the kills land while the keys are being worked through.
                "--rate-limit",
                "200/1s",
                "--idle",
                "600s",
            ],
        )
        .stdout(std::process::Stdio::from(writer.try_clone().unwrap()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
    };
    let mut rng = fastrand::Rng::with_seed(7);
    let mut next_name = 0;
    let mut children: Vec<(String, std::process::Child)> = (0..processes)
        .map(|_| {
            next_name += 1;
            let name = format!("c{next_name}");
            let child = spawn(&name);
            (name, child)
        })
        .collect();
    let mut printed: Vec<String> = Vec::new();
    let mut distinct: BTreeSet<String> = BTreeSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let mut kills = 0;
    while distinct.len() < KEYS * PER_KEY && std::time::Instant::now() < deadline {
        let wait = std::time::Duration::from_millis(rng.u64(200..700));
        let until = std::time::Instant::now() + wait;
        while let Ok(line) =
            rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
        {
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{url}: a torn line {line:?}: {e}"));
            let p = v["payload"].as_str().unwrap().to_owned();
            distinct.insert(p.clone());
            printed.push(p);
        }
        if distinct.len() >= KEYS * PER_KEY || kills >= 15 {
            continue;
        }
        let i = rng.usize(0..children.len());
        let (name, mut child) = children.swap_remove(i);
        child.kill().unwrap();
        let _ = child.wait();
        kills += 1;
        let name = if rng.bool() {
            name
        } else {
            next_name += 1;
            format!("c{next_name}")
        };
        let child = spawn(&name);
        children.push((name, child));
    }
    for (_, mut child) in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(writer);
    drop(rx);
    let _ = collector.join();
    assert_eq!(
        distinct.len(),
        KEYS * PER_KEY,
        "{url}: every message printed ({} after {kills} kills)",
        distinct.len()
    );
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    let mut repeats = 0;
    for p in &printed {
        let (k, n) = p.split_once(':').unwrap();
        let n: usize = n.parse().unwrap();
        match last.get(k) {
            Some(&l) if l == n => repeats += 1,
            Some(&l) => assert_eq!(n, l + 1, "{url}: key {k} printed {n} after {l}"),
            None => assert_eq!(n, 0, "{url}: key {k} began with {n}"),
        }
        last.insert(k.to_owned(), n);
    }
    eprintln!(
        "{url}: {} prints of {} messages, {repeats} redone after {kills} kills",
        printed.len(),
        KEYS * PER_KEY
    );
}
