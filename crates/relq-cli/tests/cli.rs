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

fn relq_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_relq"))
        .args(args)
        .current_dir(dir)
        .env_remove("RELQ_URL")
        .output()
        .expect("run relq")
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
