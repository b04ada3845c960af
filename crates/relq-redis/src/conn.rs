//! Connections: one multiplexed connection for every short command, plus a pool of dedicated
//! connections for blocking reads (a blocked `XREADGROUP` would hold up every command queued
//! behind it on a shared connection). Handles both a single server and Redis Cluster.

use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A connection to a server or a cluster.
#[derive(Clone)]
pub(super) enum Conn {
    /// Reconnects in the background (the command in flight at a disconnect fails; we retry).
    Managed(ConnectionManager),
    /// A dedicated connection (blocking reads).
    Plain(MultiplexedConnection),
    /// A cluster connection (routes by key slot, follows MOVED/ASK).
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where connections come from.
pub(super) enum Target {
    Single(Box<Client>),
    Cluster {
        /// For short commands.
        main: Box<ClusterClient>,
        /// For blocking reads: no response timeout of its own (we bound the wait ourselves).
        blocking: Box<ClusterClient>,
    },
}

/// TLS settings for `rediss://` URLs.
#[derive(Clone, Debug, Default)]
pub(super) struct Tls {
    /// PEM root certificate(s) to trust instead of the system's.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(super) root_cert: Option<Vec<u8>>,
}

#[cfg(feature = "tls")]
fn certificates(tls: &Tls) -> ::redis::TlsCertificates {
    // rustls needs a process-wide crypto provider; install ring's unless one is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    ::redis::TlsCertificates {
        client_tls: None,
        root_cert: tls.root_cert.clone(),
    }
}

/// The parsed form of a backend URL.
pub(super) fn target(url: &str, response_timeout: Duration, tls: &Tls) -> RedisResult<Target> {
    let secure = url.starts_with("rediss");
    if secure && !cfg!(feature = "tls") {
        return Err(::redis::RedisError::from((
            ::redis::ErrorKind::InvalidClientConfig,
            "rediss:// needs TLS support: build relq with the `redis-tls` feature",
        )));
    }
    #[cfg(not(feature = "tls"))]
    let _ = tls;
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some(base) = scheme.strip_suffix("+cluster") {
            // redis+cluster://[user:password@]host:port,host:port,...
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.trim_end_matches('/');
            let nodes: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("{base}://{auth}{h}"))
                .collect();
            let build = |timeout: Duration| {
                let builder = ClusterClient::builder(nodes.clone())
                    .response_timeout(timeout)
                    .connection_timeout(Duration::from_secs(2))
                    .retries(4);
                #[cfg(feature = "tls")]
                let builder = if secure {
                    builder
                        .tls(::redis::TlsMode::Secure)
                        .certs(certificates(tls))
                } else {
                    builder
                };
                builder.build()
            };
            return Ok(Target::Cluster {
                main: Box::new(build(response_timeout)?),
                blocking: Box::new(build(Duration::from_secs(24 * 3600))?),
            });
        }
    }
    #[cfg(feature = "tls")]
    if secure {
        return Ok(Target::Single(Box::new(Client::build_with_tls(
            url,
            certificates(tls),
        )?)));
    }
    Ok(Target::Single(Box::new(Client::open(url)?)))
}

impl Target {
    pub(super) async fn main(&self, response_timeout: Duration) -> RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response_timeout))
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(3)
                    .set_max_delay(Duration::from_secs(1));
                Ok(Conn::Managed(
                    ConnectionManager::new_with_config((**client).clone(), config).await?,
                ))
            }
            Target::Cluster { main, .. } => Ok(Conn::Cluster(main.get_async_connection().await?)),
        }
    }

    async fn blocking(&self) -> RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(Duration::from_secs(2)));
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Target::Cluster { blocking, .. } => {
                Ok(Conn::Cluster(blocking.get_async_connection().await?))
            }
        }
    }
}

/// Dedicated connections for blocking reads, reused between reads.
pub(super) struct BlockingPool {
    idle: Mutex<Vec<Conn>>,
}

impl BlockingPool {
    pub(super) fn new() -> Self {
        BlockingPool {
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A connection, taken from the pool or opened.
    pub(super) async fn take(&self, target: &Target) -> RedisResult<Conn> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => target.blocking().await,
        }
    }

    /// Returns a connection whose last command completed (never one that was cancelled or failed
    /// mid-command: its reply could still arrive).
    pub(super) fn give_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 64 {
            idle.push(conn);
        }
    }
}
