//! Real `redis-server` processes for tests and benchmarks, each on a free loopback port with its
//! own temporary directory; never a shared server on 6379.
//!
//! When `redis-server` is not installed, [`RedisServer::start`] prints a loud notice and returns
//! `None` so the caller can skip; with `RELQ_REQUIRE_REDIS=1` (CI sets it) it panics instead.
//! A watchdog shell kills the server if the test process dies without dropping the guard.
//!
//! `RELQ_REDIS_SERVER` (and `RELQ_REDIS_CLI`) name the binaries to run instead of the
//! `redis-server` (and `redis-cli`) on the `PATH`: CI runs the Redis tests once on Debian's 7.0,
//! the oldest version relq supports, and once on a Redis 8 built from source.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How a server is started.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// `appendonly yes` with `appendfsync always`: every acknowledged write is on disk.
    pub durable: bool,
    /// Extra `--name value` arguments.
    pub extra: Vec<(String, String)>,
}

impl ServerOptions {
    /// `appendonly yes`, `appendfsync always`.
    pub fn durable() -> Self {
        ServerOptions {
            durable: true,
            ..Self::default()
        }
    }
    /// Adds a config argument (a value with spaces becomes several arguments, as in
    /// `user app on >secret ~relq:* +@all`).
    pub fn arg(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A running `redis-server`; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    options: ServerOptions,
}

/// The binary `var` names, or `default` (found on the `PATH`).
fn program(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// The `redis-server` binary the tests run: `RELQ_REDIS_SERVER`, or the one on the `PATH`.
pub fn server_program() -> String {
    program("RELQ_REDIS_SERVER", "redis-server")
}

/// The `redis-cli` binary the tests run: `RELQ_REDIS_CLI`, or the one on the `PATH`.
pub fn cli_program() -> String {
    program("RELQ_REDIS_CLI", "redis-cli")
}

/// The version [`server_program`] reports (`7.0.15`), if it runs.
pub fn server_version() -> Option<String> {
    let out = Command::new(server_program())
        .arg("--version")
        .output()
        .ok()?;
    // "Redis server v=7.0.15 sha=..."
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .map(str::to_owned)
}

/// Whether `redis-server` can be run here. Panics when it cannot and `RELQ_REQUIRE_REDIS=1`.
pub fn available() -> bool {
    let ok = Command::new(server_program())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("RELQ_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
            panic!(
                "{} does not run and RELQ_REQUIRE_REDIS=1: install it (apt-get install -y redis-server)",
                server_program()
            );
        }
        eprintln!(
            "\n**********************************************************************\n\
             * redis-server NOT FOUND: the Redis backend tests are SKIPPED.        *\n\
             * Install it (apt-get install -y redis-server); CI sets               *\n\
             * RELQ_REQUIRE_REDIS=1, which turns this into a failure.             *\n\
             **********************************************************************\n"
        );
    }
    ok
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl RedisServer {
    /// Starts a server with no persistence. `None` (after a loud notice) when `redis-server` is
    /// not installed.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(ServerOptions::default())
    }

    /// Starts a server with `options`.
    pub fn start_with(options: ServerOptions) -> Option<RedisServer> {
        if !available() {
            return None;
        }
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relq-redis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir,
            options,
        };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            "--logfile".into(),
            self.dir.join("redis.log").display().to_string(),
        ];
        if self.options.durable {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        for (k, v) in &self.options.extra {
            args.push(format!("--{k}"));
            // A multi-word value (an ACL rule) is several arguments.
            args.extend(v.split_whitespace().map(str::to_owned));
        }
        // A watchdog: if this process dies without dropping the guard, the server goes too.
        let quoted: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        let script = format!(
            "'{program}' {} & R=$!; trap 'kill $R 2>/dev/null; exit 0' TERM; \
             while kill -0 {parent} 2>/dev/null && kill -0 $R 2>/dev/null; do sleep 0.5; done; \
             kill $R 2>/dev/null; wait $R",
            quoted.join(" "),
            program = server_program().replace('\'', "'\\''"),
            parent = std::process::id()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ping(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 20 s; log: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL to redis-server: no shutdown save).
    pub fn kill(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "pkill -9 -f 'redis-server 127.0.0.1:{}' ; true",
                self.port
            ))
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while ping(self.port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server and starts it again on the same port and directory (loading its AOF if
    /// it is durable).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli -p <port> <args>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(cli_program())
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `masters` nodes (no replicas), each a [`RedisServer`] on a free port.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create`, and waits until every
    /// node reports `cluster_state:ok`. `None` (after a loud notice) without `redis-server`.
    pub fn start(masters: usize) -> Option<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..masters {
            let options = ServerOptions::default()
                .arg("cluster-enabled", "yes")
                .arg("cluster-config-file", "nodes.conf")
                .arg("cluster-node-timeout", "5000");
            nodes.push(RedisServer::start_with(options)?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new(cli_program())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &nodes {
            while !n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(RedisCluster { nodes })
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,...`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}
