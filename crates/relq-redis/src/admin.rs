//! Topics and dead letters: the registry, group scripts, scans, dead-letter pages, cleanup
//! previews.

use std::time::Duration;

use ::redis::{Script, Value};

use relq_core::{
    validate_name, BackendError, CleanupReport, DeadLetter, MessageId, Retention, Timestamp,
};

use super::conn::Conn;
use super::decode::{cluster_primaries, dead_letter_of, int, items, text};
use super::error::map_err;
use super::keys::{prefix, stream_key, ORIGIN, REGISTRY, STREAM_KEY_PATTERN};
use super::{scripts, RedisBackend};

/// How long a topic counts as registered before a publish or join adds it to the registry again.
const REGISTER_AGAIN: Duration = Duration::from_secs(10);

/// Largest number of dead letters looked at per page by list, purge and stats.
pub(crate) const DL_PAGE: usize = 500;

impl RedisBackend {
    /// Adds `topic` to the registry once per process (before it is created, so the registry
    /// never misses a topic).
    pub(crate) async fn register(&self, topic: &str) -> Result<(), BackendError> {
        let fresh = self
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .is_some_and(|at| at.elapsed() < REGISTER_AGAIN);
        if fresh {
            return Ok(());
        }
        self.call(|mut c| async move {
            ::redis::cmd("SADD")
                .arg(REGISTRY)
                .arg(topic)
                .query_async::<Value>(&mut c)
                .await
        })
        .await?;
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), tokio::time::Instant::now());
        Ok(())
    }

    /// Runs one of the group scripts (ARGV: prefix, group, then `arg`); true if it returned 1.
    pub(crate) async fn group_script(
        &self,
        script: &Script,
        topic: &str,
        group: &str,
        arg: Option<String>,
    ) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let done: Value = self
            .call(|mut c| {
                let mut inv = script.key(&key);
                inv.arg(&pre).arg(group);
                if let Some(a) = &arg {
                    inv.arg(a);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(int(&done) == Some(1))
    }

    /// Topic names of every stream key relq's format names (`relq:{<topic>}:s`), found with
    /// `SCAN ... TYPE stream` on the server, or on every primary of a cluster. O(keys) on the
    /// server, in pages; for listing topics, never on a message path.
    pub(crate) async fn scan_streams(&self) -> Result<Vec<String>, BackendError> {
        let nodes: Vec<Option<(String, u16)>> = match &self.conn {
            Conn::Cluster(_) => {
                let mut cmd = ::redis::cmd("CLUSTER");
                cmd.arg("NODES");
                let nodes = text(&self.query(cmd).await?).unwrap_or_default();
                cluster_primaries(&nodes).into_iter().map(Some).collect()
            }
            _ => vec![None],
        };
        let mut out = Vec::new();
        for node in nodes {
            let mut cursor = ORIGIN.to_owned();
            loop {
                let mut cmd = ::redis::cmd("SCAN");
                cmd.arg(&cursor)
                    .arg("MATCH")
                    .arg(STREAM_KEY_PATTERN)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("stream");
                let reply = match (&self.conn, &node) {
                    (Conn::Cluster(c), Some((host, port))) => {
                        let route = ::redis::cluster_routing::RoutingInfo::SingleNode(
                            ::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                                host: host.clone(),
                                port: *port,
                            },
                        );
                        c.clone().route_command(cmd, route).await.map_err(map_err)?
                    }
                    _ => self.query(cmd).await?,
                };
                let mut parts = items(reply).into_iter();
                let next = parts.next().as_ref().and_then(text).unwrap_or_default();
                for key in parts.next().map(items).unwrap_or_default() {
                    let topic = text(&key).and_then(|k| {
                        k.strip_prefix("relq:{")?
                            .strip_suffix("}:s")
                            .map(str::to_owned)
                    });
                    if let Some(t) = topic.filter(|t| validate_name("topic", t).is_ok()) {
                        out.push(t);
                    }
                }
                if next.is_empty() || next == ORIGIN {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }

    pub(crate) async fn query(&self, cmd: ::redis::Cmd) -> Result<Value, BackendError> {
        self.call(|mut c| {
            let cmd = cmd.clone();
            async move { cmd.query_async(&mut c).await }
        })
        .await
    }

    /// Dead letters of `topic` from `start` (an XRANGE bound), one raw page.
    pub(crate) async fn dead_letter_page(
        &self,
        topic: &str,
        start: &str,
        count: usize,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let mut cmd = ::redis::cmd("XRANGE");
        cmd.arg(format!("{}dl", prefix(topic)))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count);
        items(self.query(cmd).await?)
            .into_iter()
            .map(dead_letter_of)
            .collect()
    }

    /// Calls `f` on every dead letter of `topic`, a page at a time, oldest first.
    pub(crate) async fn each_dead_letter(
        &self,
        topic: &str,
        mut f: impl FnMut(&DeadLetter),
    ) -> Result<(), BackendError> {
        let mut start = "-".to_owned();
        loop {
            let page = self.dead_letter_page(topic, &start, DL_PAGE).await?;
            for dl in &page {
                f(dl);
            }
            match page.last() {
                Some(last) if page.len() == DL_PAGE => start = format!("({}", last.id),
                _ => return Ok(()),
            }
        }
    }

    /// What a cleanup would remove now: the cleanup script's floor, then counts of the stream's
    /// entries below it and below the age cutoff (in pages, read only).
    pub(crate) async fn cleanup_preview(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let cutoff = Timestamp::now().minus(retention.min_age).0;
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.cleanup.key(&key);
                inv.arg(&pre)
                    .arg(cutoff)
                    .arg(1)
                    .arg(-1)
                    .arg(scripts::CLEANUP_PREVIEW);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let floor = items(r).first().and_then(text);
        let mut xlen = ::redis::cmd("XLEN");
        xlen.arg(&key);
        let len = int(&self.query(xlen).await?).unwrap_or(0).max(0) as u64;
        let mut report = CleanupReport::default();
        // Entries up to the cutoff are those below `<cutoff + 1>-0`.
        let young = format!("{}-0", cutoff.saturating_add(1));
        let below_floor = match &floor {
            Some(f) => self.count_below(&key, f).await?,
            None => 0,
        };
        if let Some(f) = &floor {
            let boundary = match (f.parse::<MessageId>(), young.parse::<MessageId>()) {
                (Ok(fid), Ok(y)) if y < fid => young,
                _ => f.clone(),
            };
            report.removed = self.count_below(&key, &boundary).await?;
        }
        if let Some(max_len) = retention.max_len {
            let excess = (len - report.removed.min(len)).saturating_sub(max_len);
            let acked = below_floor.saturating_sub(report.removed).min(excess);
            report.removed += acked;
            report.trimmed_unacknowledged = excess - acked;
        }
        Ok(report)
    }

    /// How many entries of the stream have an id below `id`.
    async fn count_below(&self, key: &str, id: &str) -> Result<u64, BackendError> {
        let end = format!("({id}");
        let mut start = "-".to_owned();
        let mut n = 0u64;
        loop {
            let mut cmd = ::redis::cmd("XRANGE");
            cmd.arg(key).arg(&start).arg(&end).arg("COUNT").arg(1000);
            let page = items(self.query(cmd).await?);
            n += page.len() as u64;
            if page.len() < 1000 {
                return Ok(n);
            }
            let last = items(page.last().cloned().unwrap_or(Value::Nil))
                .first()
                .and_then(text)
                .unwrap_or_default();
            start = format!("({last}");
        }
    }

    /// Counts stream entries after `id` (used when Redis cannot report a group's lag).
    pub(crate) async fn count_after(&self, key: &str, id: &str) -> Result<u64, BackendError> {
        let mut start = format!("({id}");
        let mut n = 0u64;
        loop {
            let mut cmd = ::redis::cmd("XRANGE");
            cmd.arg(key).arg(&start).arg("+").arg("COUNT").arg(1000);
            let page = items(self.query(cmd).await?);
            n += page.len() as u64;
            if page.len() < 1000 {
                return Ok(n);
            }
            let last = items(page.last().cloned().unwrap_or(Value::Nil))
                .first()
                .and_then(text)
                .unwrap_or_default();
            start = format!("({last}");
        }
    }
}
