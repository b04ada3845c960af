//! Connecting: the URL, the server's version and settings checked, calls with retries.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::{RedisError, RedisResult, Value};

use relq_core::{instant_after, BackendError, BackendErrorKind, ConfigError};

use super::conn::{self, BlockingPool, Conn};
use super::decode::{flatten_text, text};
use super::error::{err, map_err, redis_code};
use super::{History, RedisBackend, RedisConfig, Scripts};

impl RedisBackend {
    /// Connects to `url` with the default configuration. See [`connect_with`](Self::connect_with).
    ///
    /// # Errors
    /// As for [`connect_with`](Self::connect_with).
    pub async fn connect(url: &str) -> Result<RedisBackend, relq_core::Error> {
        Self::connect_with(url, RedisConfig::default()).await
    }

    /// Connects to `url`: `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS; needs
    /// relq's `redis-tls` feature, this crate's `tls`; the server certificate is checked against the system's
    /// roots or [`RedisConfig::tls_root_cert`]), or
    /// `redis+cluster://[user:password@]host:port,host:port` (`rediss+cluster://` with TLS) for
    /// Redis Cluster. Checks that the server is Redis 7.0 or newer and that its
    /// `maxmemory-policy` cannot evict queue data.
    ///
    /// # Errors
    /// A malformed URL, an unreachable server, authentication failure, a server older than 7.0,
    /// or an evicting memory policy (unless [`RedisConfig::allow_eviction`]).
    pub async fn connect_with(
        url: &str,
        config: RedisConfig,
    ) -> Result<RedisBackend, relq_core::Error> {
        let bad_url = |e: RedisError| relq_core::Error::UnsupportedUrl {
            url: redact(url),
            reason: e.to_string(),
        };
        if config.response_timeout.is_zero() {
            return Err(ConfigError::new("response_timeout", "must be greater than zero").into());
        }
        let tls = conn::Tls {
            root_cert: config.tls_root_cert.clone(),
        };
        let target = conn::target(url, config.response_timeout, &tls).map_err(bad_url)?;
        let conn = target.main(config.response_timeout).await.map_err(|e| {
            let mut e = map_err(e);
            e.message = format!("connecting to {}: {}", redact(url), e.message);
            relq_core::Error::Backend(e)
        })?;
        let backend = RedisBackend {
            config,
            target,
            conn,
            blocking: BlockingPool::new(),
            scripts: Scripts::new(),
            registered: Mutex::new(HashMap::new()),
            with_history: Mutex::new(History::default()),
            keyed_topics: Mutex::new(Default::default()),
            needs_recovery: Mutex::new(HashSet::new()),
            due: Mutex::new(Default::default()),
            server_version: std::sync::OnceLock::new(),
            calls: std::sync::atomic::AtomicU64::new(0),
            call_errors: std::sync::atomic::AtomicU64::new(0),
        };
        backend.check_server().await.map_err(|mut e| {
            e.message = format!("{}: {}", redact(url), e.message);
            e
        })?;
        Ok(backend)
    }

    /// Refuses servers older than 7.0 and (unless allowed) an evicting memory policy.
    async fn check_server(&self) -> Result<(), BackendError> {
        // A restricted ACL user may not run INFO or CONFIG (both are in @dangerous): then the
        // checks are skipped with a warning, and relq runs with what the user may do.
        let info: Value = match self
            .call(
                |mut c| async move { ::redis::cmd("INFO").arg("server").query_async(&mut c).await },
            )
            .await
        {
            Ok(v) => v,
            Err(e) if redis_code(&e) == Some("NOPERM") => {
                tracing::warn!(error = %e, "could not read the server version (INFO denied); relq needs Redis 7.0 or newer");
                Value::Nil
            }
            Err(e) => return Err(e),
        };
        let info = match info {
            Value::Map(nodes) => nodes.into_iter().filter_map(|(_, v)| text(&v)).collect(),
            other => text(&other).unwrap_or_default(),
        };
        // On a cluster, one `redis_version` per node: the oldest decides.
        let oldest = info
            .lines()
            .filter_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| (version_parts(v), v.trim().to_owned()))
            .min();
        if let Some((parts, v)) = oldest {
            if parts < (7, 0, 0) {
                return Err(err(
                    BackendErrorKind::Invalid,
                    format!("Redis {v} is too old: relq needs Redis 7.0 or newer"),
                ));
            }
            let _ = self.server_version.set(v);
        }
        let policy: RedisResult<Value> = ::redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut self.conn.clone())
            .await;
        // `[name, value]`, or on a cluster one such reply per node.
        let policies: Vec<String> = match policy {
            Ok(v) => {
                let mut out = Vec::new();
                flatten_text(v, &mut out);
                out.retain(|t| t != "maxmemory-policy");
                out
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read maxmemory-policy (CONFIG GET denied?); make sure it is noeviction, or Redis may silently evict queue data");
                Vec::new()
            }
        };
        for p in policies {
            if p != "noeviction" {
                let msg = format!(
                    "the server's maxmemory-policy is {p:?}: Redis may evict queue data (messages, pending entries, dead letters) when memory is full, losing messages silently; set `maxmemory-policy noeviction`"
                );
                if self.config.allow_eviction {
                    tracing::warn!("{msg} (allowed by configuration)");
                } else {
                    return Err(err(
                        BackendErrorKind::Invalid,
                        format!("{msg}, or allow it explicitly with RedisConfig::allow_eviction"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs `f` on the shared connection, retrying transient failures for `retry_for`.
    pub(crate) async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, BackendError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = instant_after(tokio::time::Instant::now(), self.config.retry_for);
        let mut delay = Duration::from_millis(20);
        loop {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = f(self.conn.clone()).await.map_err(map_err);
            if r.is_err() {
                self.call_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match r {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.kind == BackendErrorKind::Unavailable
                        && instant_after(tokio::time::Instant::now(), delay) < deadline =>
                {
                    tracing::debug!(error = %e, ?delay, "redis call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `f` once. For calls that hand messages to this consumer (read, recover, claim): if
    /// the connection drops after the server applied one, retrying would hand out other messages
    /// and hide the loss of the reply; the error goes to the consumer runtime instead, which then
    /// recovers this consumer's pending messages.
    pub(crate) async fn call_once<T, Fut>(
        &self,
        f: impl FnOnce(Conn) -> Fut,
    ) -> Result<T, BackendError>
    where
        Fut: Future<Output = RedisResult<T>>,
    {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = f(self.conn.clone()).await.map_err(map_err);
        if r.is_err() {
            self.call_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

/// The URL without its password, for error messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// `"7.0.15"` as `(7, 0, 15)`; a part that is not a number counts as 0.
fn version_parts(v: &str) -> (u32, u32, u32) {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

#[cfg(test)]
mod tests {
    use super::version_parts;

    #[test]
    fn versions_compare_by_number_not_text() {
        assert_eq!(version_parts("7.0.15"), (7, 0, 15));
        assert_eq!(version_parts(" 8.6.3\r"), (8, 6, 3));
        assert!(version_parts("10.0.0") > version_parts("8.6.3"));
        assert!(version_parts("6.2.14") < (7, 0, 0));
        assert_eq!(version_parts("garbage"), (0, 0, 0));
        assert_eq!(version_parts("7"), (7, 0, 0));
    }
}
