//! The Redis backend's configuration.

use std::time::Duration;

/// Configuration of a [`RedisBackend`](crate::RedisBackend).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisConfig {
    /// How long one command may take before it counts as failed. Default 5 s.
    pub response_timeout: Duration,
    /// How long a failing call (connection lost, timeout, server loading) is retried before the
    /// error reaches the caller. Default 30 s.
    pub retry_for: Duration,
    /// Connect even when `maxmemory-policy` lets Redis evict keys (queue data could vanish
    /// silently). Default false: such a server is refused.
    pub allow_eviction: bool,
    /// PEM root certificate(s) to trust for `rediss://` instead of the system's roots.
    pub tls_root_cert: Option<Vec<u8>>,
    /// A consumer that holds no message and was not seen for this long is removed from its
    /// group (by claims of other consumers), so restarts under new names do not pile up. A
    /// live consumer is added back by its next read. Default 1 hour.
    pub consumer_expiry: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            response_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            allow_eviction: false,
            tls_root_cert: None,
            consumer_expiry: Duration::from_secs(3600),
        }
    }
}

impl RedisConfig {
    /// Sets the per-command response timeout.
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }
    /// Sets how long failing calls are retried.
    pub fn retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }
    /// Accepts a server whose eviction policy could drop queue data.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }
    /// Sets how long an idle consumer holding nothing stays listed in its group.
    pub fn consumer_expiry(mut self, d: Duration) -> Self {
        self.consumer_expiry = d;
        self
    }
    /// Trusts these PEM root certificates for `rediss://` (e.g. a private CA) instead of the
    /// system's roots.
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }
}
