//! Redis Streams as a relq [`Backend`].

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use ::redis::Value;
use async_trait::async_trait;

use relq_core::{
    instant_after, replay_message, Backend, BackendError, BackendErrorKind, BackendMetric, Browse,
    CleanupReport, ConsumerInfo, DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats,
    Delivery, GroupInfo, GroupPlacement, Health, HealthCheck, Message, MessageId, Outgoing,
    Placement, Retention, Settlement, StartPosition, Subscription, Timestamp, TopicInfo,
};

use super::admin::DL_PAGE;
use super::decode::{
    dead_letter_of, fields_map, flatten_text, id_of, int, items, stream_messages, text,
};
use super::error::{corrupt, err, redis_code};
use super::keys::{group_prefix, prefix, redis_millis, start_id, stream_key, IdArg, REGISTRY};
use super::read::Promoted;
use super::{scripts, RedisBackend, NAME};

/// A publish script's arguments for one message: type, data, headers (JSON or ""), deliver_at
/// (ms or "").
fn message_args(inv: &mut ::redis::ScriptInvocation<'_>, m: &Outgoing, headers: &str) {
    inv.arg(&m.kind).arg(m.payload.as_ref()).arg(headers);
    match m.deliver_at {
        Some(at) => inv.arg(at.0),
        None => inv.arg(""),
    };
    inv.arg(m.ordering_key().unwrap_or(""));
}

/// The ids a publish of `n` messages answered with, one per message.
fn published_ids(reply: Value, n: usize) -> Result<Vec<MessageId>, BackendError> {
    let ids = items(reply)
        .iter()
        .map(id_of)
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() != n {
        return Err(corrupt(format!(
            "publish of {n} messages returned {} ids",
            ids.len()
        )));
    }
    Ok(ids)
}

fn random_nonce() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(
        &self,
        topic: &str,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<MessageId>, BackendError> {
        self.register(topic).await?;
        let key = stream_key(topic);
        let pre = prefix(topic);
        let nonce = random_nonce();
        let headers: Vec<String> = batch
            .iter()
            .map(|m| {
                if m.headers.is_empty() {
                    String::new()
                } else {
                    serde_json::to_string(&m.headers).expect("string maps serialize")
                }
            })
            .collect();
        if batch.iter().any(|m| m.dedup().is_some()) {
            return self
                .publish_keyed(&key, &pre, &nonce, &batch, &headers)
                .await;
        }
        if batch.iter().any(|m| m.ordering_key().is_some()) && !self.is_keyed(topic) {
            // Once per topic and process: reads check ordering keys on a topic marked so.
            self.call(|mut c| {
                let mut inv = self.scripts.mark_keyed.key(&key);
                inv.arg(&pre);
                async move { inv.invoke_async::<Value>(&mut c).await }
            })
            .await?;
            self.note_keyed(topic);
        }
        let started = tokio::time::Instant::now();
        let mut first = true;
        enum Attempt<'a> {
            Append(::redis::Pipeline),
            Retry(::redis::ScriptInvocation<'a>),
        }
        let reply: Value = self
            .call(|mut c| {
                let attempt = if first {
                    // The hot path, without Lua: the batch's XADDs in one MULTI/EXEC, so the
                    // batch is contiguous in the stream (a retry finds it by the nonce on its
                    // first entry).
                    let mut pipe = ::redis::pipe();
                    if batch.len() > 1 {
                        pipe.atomic();
                    }
                    for (i, (m, h)) in batch.iter().zip(&headers).enumerate() {
                        let cmd = pipe.cmd("XADD");
                        cmd.arg(&key)
                            .arg("*")
                            .arg("type")
                            .arg(&m.kind)
                            .arg("data")
                            .arg(m.payload.as_ref());
                        if !h.is_empty() {
                            cmd.arg("headers").arg(h);
                        }
                        if let Some(at) = m.deliver_at {
                            cmd.arg("deliver_at").arg(at.0);
                        }
                        if let Some(k) = m.ordering_key() {
                            cmd.arg("key").arg(k);
                        }
                        if i == 0 {
                            cmd.arg("nonce").arg(&nonce);
                        }
                    }
                    Attempt::Append(pipe)
                } else {
                    // The first attempt may have been applied before the connection dropped:
                    // look for the batch's nonce among recent entries before appending.
                    let window = started.elapsed().as_millis() as u64 + 10_000;
                    let mut inv = self.scripts.publish.key(&key);
                    inv.arg(&pre).arg(window).arg(&nonce).arg(batch.len());
                    for (m, h) in batch.iter().zip(&headers) {
                        message_args(&mut inv, m, h);
                    }
                    Attempt::Retry(inv)
                };
                first = false;
                async move {
                    match attempt {
                        Attempt::Append(pipe) => pipe.query_async(&mut c).await,
                        Attempt::Retry(inv) => inv.invoke_async(&mut c).await,
                    }
                }
            })
            .await?;
        published_ids(reply, batch.len())
    }

    async fn join(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        start: StartPosition,
    ) -> Result<Subscription, BackendError> {
        self.register(topic).await?;
        let key = stream_key(topic);
        let pre = prefix(topic);
        let start = start_id(start);
        let epoch: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.join.key(&key);
                inv.arg(&pre).arg(group).arg(consumer).arg(&start);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let epoch = text(&epoch)
            .and_then(|e| e.parse::<u64>().ok())
            .ok_or_else(|| corrupt(format!("topic epoch {epoch:?}")))?;
        Ok(Subscription {
            topic: topic.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            epoch,
        })
    }

    async fn recover(
        &self,
        sub: &Subscription,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.redeliver(sub, max, "recover", after.to_string()).await
    }

    async fn claim(
        &self,
        sub: &Subscription,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.redeliver(sub, max, "claim", redis_millis(min_idle).to_string())
            .await
    }

    async fn read(
        &self,
        sub: &Subscription,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BackendError> {
        let flagged = {
            let mut flagged = self
                .needs_recovery
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // The key is built only when some subscription is flagged: none is, nearly always.
            !flagged.is_empty()
                && flagged.remove(&(sub.topic.clone(), sub.group.clone(), sub.consumer.clone()))
        };
        if flagged {
            return Err(err(
                BackendErrorKind::Unavailable,
                "part of the previous read failed after it handed out messages; recover this consumer's pending messages",
            ));
        }
        let deadline = instant_after(tokio::time::Instant::now(), wait);
        loop {
            // One round trip while there is work: due retries (by the promote script, only when
            // one may be due), then new entries.
            let (due, stamp) = self.due().look(&sub.topic, &sub.group, Timestamp::now().0);
            let read = match due {
                true => self.promote(sub, max).await?,
                false => match self.read_ready(sub, max).await.inspect_err(|e| {
                    // The next read goes through the promote script (a script call follows a
                    // cluster redirect that aborted the transaction).
                    if e.kind == BackendErrorKind::Unavailable {
                        self.due().forget(&sub.topic);
                    }
                })? {
                    Some(read) => read,
                    None => {
                        // Redis lost the group: recreate it (unless the topic was terminated),
                        // then promote, which warns if the metadata went too.
                        self.recreate_group(sub).await?;
                        self.due().forget(&sub.topic);
                        continue;
                    }
                },
            };
            self.due()
                .seen(&sub.topic, &sub.group, read.next_due, stamp);
            let Promoted {
                out,
                next_due,
                stopped,
                read_new,
            } = read;
            if !out.is_empty() {
                return Ok(out);
            }
            let now = tokio::time::Instant::now();
            let mut block = deadline.saturating_duration_since(now);
            if let Some(due) = next_due {
                block = block.min(Timestamp(due).since(Timestamp::now()));
            }
            // New entries were read and all set aside (delayed ones are now scheduled, perhaps
            // due sooner than `next_due`), or the next retry is due already: look again now
            // rather than block on a stale due time.
            if read_new || block.is_zero() {
                if now >= deadline {
                    return Ok(Vec::new());
                }
                continue;
            }
            match self.read_new(sub, max, block, &stopped).await? {
                None => {
                    // Redis lost the group (restart without persistence, FLUSHALL): recreate
                    // it, unless the topic was terminated (the script then says so).
                    self.recreate_group(sub).await?;
                    continue;
                }
                Some(out) if !out.is_empty() => return Ok(out),
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
        }
    }

    async fn settle(&self, sub: &Subscription, batch: &[Settlement]) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let plain_acks = !self.is_keyed(&sub.topic) && {
            let history = self.with_history.lock().unwrap_or_else(|e| e.into_inner());
            batch
                .iter()
                .all(|s| matches!(s, Settlement::Ack(_)) && !history.ids.contains_key(&s.id()))
        };
        if plain_acks {
            // The hot path, without Lua: first deliveries of new entries have no failure
            // history, so one XACK does (idempotent: a retry after a lost reply is harmless).
            self.call(|mut c| {
                let mut cmd = ::redis::cmd("XACK");
                cmd.arg(&key).arg(&sub.group);
                for s in batch {
                    cmd.arg(IdArg(s.id()));
                }
                async move { cmd.query_async::<Value>(&mut c).await }
            })
            .await?;
            return Ok(());
        }
        // Encode once; retries reuse the arguments.
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(batch.len() * 2);
        for s in batch {
            match s {
                Settlement::Ack(id) => {
                    args.push(scripts::SETTLE_ACK.to_vec());
                    args.push(id.to_string().into_bytes());
                }
                Settlement::Retry {
                    id,
                    at,
                    failure,
                    release_key,
                } => {
                    args.push(scripts::SETTLE_RETRY.to_vec());
                    args.push(id.to_string().into_bytes());
                    args.push(at.0.to_string().into_bytes());
                    args.push(serde_json::to_vec(failure).expect("failures serialize"));
                    args.push(failure.attempt.to_string().into_bytes());
                    args.push(if *release_key {
                        b"1".to_vec()
                    } else {
                        b"0".to_vec()
                    });
                }
                Settlement::DeadLetter(dl) => {
                    let mut record = (**dl).clone();
                    let payload = std::mem::take(&mut record.message.payload);
                    args.push(scripts::SETTLE_DEAD_LETTER.to_vec());
                    args.push(dl.message.id.to_string().into_bytes());
                    args.push(serde_json::to_vec(&record).expect("dead letters serialize"));
                    args.push(payload.to_vec());
                    args.push(dl.message.attempt.to_string().into_bytes());
                }
            }
        }
        let woke: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.settle.key(&key);
                inv.arg(&pre)
                    .arg(&sub.group)
                    .arg(sub.epoch)
                    .arg(&sub.consumer);
                for a in &args {
                    inv.arg(a.as_slice());
                }
                async move { inv.invoke_async::<Value>(&mut c).await }
            })
            .await?;
        if int(&woke).is_some_and(|n| n > 0) {
            // Settled entries let their ordering keys pass to entries now due.
            self.due().scheduled(&sub.topic, &sub.group, 0);
        }
        // Reads promote once the first retry is due (a call that failed after being applied
        // is seen by the next read's look at the schedule).
        if let Some(at) = batch
            .iter()
            .filter_map(|s| match s {
                Settlement::Retry { at, .. } => Some(at.0),
                _ => None,
            })
            .min()
        {
            self.due().scheduled(&sub.topic, &sub.group, at);
        }
        let mut history = self.with_history.lock().unwrap_or_else(|e| e.into_inner());
        for s in batch {
            history.ids.remove(&s.id());
        }
        Ok(())
    }

    async fn stop_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.stop.key(&key);
                inv.arg(&pre).arg(id.to_string());
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(int(&r) == Some(1))
    }

    async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let now = Timestamp::now().0;
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.resume.key(&key);
                inv.arg(&pre).arg(id.to_string()).arg(now);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        // Parked entries are due now, in every group of the topic.
        self.due().forget(topic);
        Ok(items(r).get(1).and_then(int) == Some(1))
    }

    async fn terminate(&self, topic: &str) -> Result<bool, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.terminate.key(&key);
                inv.arg(&pre);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let mut cmd = ::redis::cmd("SREM");
        cmd.arg(REGISTRY).arg(topic);
        self.query(cmd).await?;
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
        Ok(int(&r) == Some(1))
    }

    async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError> {
        self.register(topic).await?;
        self.group_script(
            &self.scripts.group_create,
            topic,
            group,
            Some(start_id(start)),
        )
        .await
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<bool, BackendError> {
        self.group_script(&self.scripts.group_delete, topic, group, None)
            .await
    }

    async fn move_group(
        &self,
        topic: &str,
        group: &str,
        to: StartPosition,
    ) -> Result<bool, BackendError> {
        self.group_script(&self.scripts.group_move, topic, group, Some(start_id(to)))
            .await
    }

    async fn cleanup(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        if retention.dry_run {
            return self.cleanup_preview(topic, retention).await;
        }
        let mut report = CleanupReport::default();
        let max_len = retention.max_len.map(|m| m as i64).unwrap_or(-1);
        loop {
            let cutoff = Timestamp::now().minus(retention.min_age).0;
            let r: Value = self
                .call(|mut c| {
                    let mut inv = self.scripts.cleanup.key(&key);
                    inv.arg(&pre)
                        .arg(cutoff)
                        .arg(retention.batch.max(1))
                        .arg(max_len)
                        .arg(scripts::CLEANUP_APPLY);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await?;
            let r = items(r);
            let removed = r.first().and_then(int).unwrap_or(0) as u64;
            let trimmed = r.get(1).and_then(int).unwrap_or(0) as u64;
            report.removed += removed;
            report.trimmed_unacknowledged += trimmed;
            if removed + trimmed == 0 {
                return Ok(report);
            }
            tokio::task::yield_now().await;
        }
    }

    fn metrics(&self) -> Vec<BackendMetric> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            BackendMetric::counter("relq_redis_calls_total", "Commands and scripts sent on the shared connection (reads on the blocking pool not counted)", self.calls.load(Relaxed) as f64),
            BackendMetric::counter("relq_redis_call_errors_total", "Of those, the ones that failed", self.call_errors.load(Relaxed) as f64),
        ]
    }

    async fn locate(
        &self,
        topic: &str,
        id: MessageId,
    ) -> Result<Option<Vec<GroupPlacement>>, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(format!("{pre}meta")).arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(Some(Vec::new()));
        }
        let id_text = id.to_string();
        let mut cmd = ::redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(&key);
        let mut out = Vec::new();
        for g in items(self.query(cmd).await?) {
            let g = fields_map(g);
            let name = g.get("name").and_then(text).unwrap_or_default();
            let cursor = g
                .get("last-delivered-id")
                .and_then(|v| id_of(v).ok())
                .unwrap_or_default();
            let gkey = group_prefix(&pre, &name);
            let mut cmd = ::redis::cmd("XPENDING");
            cmd.arg(&key).arg(&name).arg(&id_text).arg(&id_text).arg(1);
            let pending = items(self.query(cmd).await?).into_iter().next().map(items);
            let placement = if let Some(p) = pending {
                Placement::Pending {
                    consumer: p.get(1).and_then(text).unwrap_or_default(),
                    deliveries: p.get(3).and_then(int).unwrap_or(0) as u32,
                }
            } else {
                let mut cmd = ::redis::cmd("ZSCORE");
                cmd.arg(format!("{gkey}sched")).arg(&id_text);
                let due = text(&self.query(cmd).await?).and_then(|t| t.parse::<f64>().ok());
                let mut cmd = ::redis::cmd("SISMEMBER");
                cmd.arg(format!("{gkey}park")).arg(&id_text);
                let parked = int(&self.query(cmd).await?).unwrap_or(0) == 1;
                let mut cmd = ::redis::cmd("ZSCORE");
                cmd.arg(format!("{gkey}kw")).arg(&id_text);
                let blocked = !matches!(self.query(cmd).await?, Value::Nil);
                if let Some(due) = due {
                    let mut cmd = ::redis::cmd("HGET");
                    cmd.arg(format!("{gkey}m")).arg(&id_text);
                    let deliveries = text(&self.query(cmd).await?)
                        .and_then(|m| m.split(' ').next().and_then(|n| n.parse().ok()))
                        .unwrap_or(0);
                    Placement::Scheduled {
                        due: Timestamp(due.max(0.0) as u64),
                        deliveries,
                    }
                } else if parked {
                    Placement::Stopped
                } else if blocked {
                    Placement::Blocked
                } else if id > cursor {
                    Placement::Unread
                } else {
                    Placement::Done
                }
            };
            out.push(GroupPlacement::new(name, placement));
        }
        Ok(Some(out))
    }

    async fn health(&self) -> Health {
        let mut checks = Vec::new();
        match self.query(::redis::cmd("PING")).await {
            Ok(_) => checks.push(HealthCheck::new("backend", true, "PING answered")),
            Err(e) => {
                checks.push(HealthCheck::new("backend", false, e.to_string()));
                return Health::new(NAME, checks);
            }
        }
        checks.push(HealthCheck::new(
            "server_version",
            true,
            match self.server_version.get() {
                Some(v) => format!("Redis {v}"),
                None => "not readable (INFO denied); relq needs Redis 7.0 or newer".to_owned(),
            },
        ));
        let mut cmd = ::redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        match self.query(cmd).await {
            Ok(v) => {
                let mut out = Vec::new();
                flatten_text(v, &mut out);
                out.retain(|t| t != "maxmemory-policy");
                let evicting: Vec<&String> = out.iter().filter(|p| *p != "noeviction").collect();
                checks.push(if evicting.is_empty() || self.config.allow_eviction {
                    HealthCheck::new("eviction_policy", true, format!("maxmemory-policy {out:?}"))
                } else {
                    HealthCheck::new(
                        "eviction_policy",
                        false,
                        format!(
                            "maxmemory-policy {evicting:?} may evict queue data; set noeviction"
                        ),
                    )
                });
            }
            Err(e) => checks.push(HealthCheck::new(
                "eviction_policy",
                true,
                format!("not readable ({e}); make sure it is noeviction"),
            )),
        }
        let mut h = Health::new(NAME, checks);
        let mut cmd = ::redis::cmd("INFO");
        cmd.arg("memory");
        if let Ok(v) = self.query(cmd).await {
            let mut texts = Vec::new();
            flatten_text(v, &mut texts);
            let field = |name: &str| -> Option<f64> {
                texts.iter().flat_map(|t| t.lines()).find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|v| v.strip_prefix(':'))
                        .and_then(|v| v.trim().parse().ok())
                })
            };
            if let (Some(used), Some(max)) = (field("used_memory"), field("maxmemory")) {
                if max > 0.0 {
                    h.usage_ratio = Some((used / max).min(1.0));
                }
            }
        }
        h
    }

    async fn topics(&self) -> Result<Vec<String>, BackendError> {
        let mut cmd = ::redis::cmd("SMEMBERS");
        cmd.arg(REGISTRY);
        let mut names: BTreeSet<String> = items(self.query(cmd).await?)
            .iter()
            .filter_map(text)
            .collect();
        // Streams another program created by the documented format (`XADD relq:{t}:s ...`)
        // before any relq process registered the topic.
        match self.scan_streams().await {
            Ok(found) => names.extend(found),
            // An ACL user without SCAN (or CLUSTER NODES) still lists the registered topics.
            Err(e) if redis_code(&e) == Some("NOPERM") => {
                tracing::warn!(error = %e, "cannot scan for topics other programs created; listing registered topics only");
            }
            Err(e) => return Err(e),
        }
        let mut out = Vec::new();
        for name in names {
            let mut cmd = ::redis::cmd("EXISTS");
            cmd.arg(format!("{}meta", prefix(&name)))
                .arg(stream_key(&name));
            if int(&self.query(cmd).await?).unwrap_or(0) > 0 {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BackendError> {
        let key = stream_key(topic);
        let pre = prefix(topic);
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(format!("{pre}meta")).arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let mut info = TopicInfo {
            name: topic.to_owned(),
            length: 0,
            first_id: None,
            last_id: None,
            groups: Vec::new(),
            stopped: Vec::new(),
            dead_letters: 0,
            published: 0,
        };
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(&key);
        let has_stream = int(&self.query(cmd).await?).unwrap_or(0) == 1;
        if has_stream {
            let mut cmd = ::redis::cmd("XINFO");
            cmd.arg("STREAM").arg(&key);
            let s = fields_map(self.query(cmd).await?);
            info.length = s.get("length").and_then(int).unwrap_or(0) as u64;
            // Redis 7.0+: every entry ever added to the stream.
            info.published = s
                .get("entries-added")
                .and_then(int)
                .map_or(info.length, |n| n.max(0) as u64);
            info.last_id = s
                .get("last-generated-id")
                .and_then(|v| id_of(v).ok())
                .filter(|id| *id != MessageId::ZERO);
            info.first_id = s
                .get("first-entry")
                .and_then(|e| items(e.clone()).first().and_then(|v| id_of(v).ok()));
            let mut cmd = ::redis::cmd("XINFO");
            cmd.arg("GROUPS").arg(&key);
            for g in items(self.query(cmd).await?) {
                let g = fields_map(g);
                let name = g.get("name").and_then(text).unwrap_or_default();
                let cursor = g
                    .get("last-delivered-id")
                    .and_then(|v| id_of(v).ok())
                    .unwrap_or_default();
                let lag = match g.get("lag").and_then(int) {
                    Some(l) => l as u64,
                    None => self.count_after(&key, &cursor.to_string()).await?,
                };
                let gkey = group_prefix(&pre, &name);
                let mut cmd = ::redis::cmd("ZCARD");
                cmd.arg(format!("{gkey}sched"));
                let scheduled = int(&self.query(cmd).await?).unwrap_or(0) as u64;
                let mut cmd = ::redis::cmd("SCARD");
                cmd.arg(format!("{gkey}park"));
                let parked = int(&self.query(cmd).await?).unwrap_or(0) as u64;
                let mut cmd = ::redis::cmd("ZCARD");
                cmd.arg(format!("{gkey}kw"));
                let blocked = int(&self.query(cmd).await?).unwrap_or(0) as u64;
                let mut cmd = ::redis::cmd("XINFO");
                cmd.arg("CONSUMERS").arg(&key).arg(&name);
                let consumers = items(self.query(cmd).await?)
                    .into_iter()
                    .map(|c| {
                        let c = fields_map(c);
                        ConsumerInfo {
                            name: c.get("name").and_then(text).unwrap_or_default(),
                            pending: c.get("pending").and_then(int).unwrap_or(0) as u64,
                            idle_ms: c.get("idle").and_then(int).unwrap_or(0) as u64,
                        }
                    })
                    .collect();
                let pending = g.get("pending").and_then(int).unwrap_or(0) as u64;
                let oldest_pending = if pending > 0 {
                    let mut cmd = ::redis::cmd("XPENDING");
                    cmd.arg(&key).arg(&name);
                    items(self.query(cmd).await?)
                        .get(1)
                        .and_then(|v| id_of(v).ok())
                } else {
                    None
                };
                let oldest_unread = if lag > 0 {
                    let mut cmd = ::redis::cmd("XRANGE");
                    cmd.arg(&key)
                        .arg(format!("({cursor}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(1);
                    stream_messages(self.query(cmd).await?)?
                        .first()
                        .map(|m| m.id)
                } else {
                    None
                };
                info.groups.push(GroupInfo {
                    name,
                    cursor,
                    pending,
                    lag,
                    scheduled,
                    parked,
                    blocked,
                    consumers,
                    oldest_pending,
                    oldest_unread,
                });
            }
        }
        let mut cmd = ::redis::cmd("SMEMBERS");
        cmd.arg(format!("{pre}stop"));
        info.stopped = items(self.query(cmd).await?)
            .iter()
            .filter_map(|v| id_of(v).ok())
            .collect();
        info.stopped.sort();
        let mut cmd = ::redis::cmd("XLEN");
        cmd.arg(format!("{pre}dl"));
        info.dead_letters = int(&self.query(cmd).await?).unwrap_or(0) as u64;
        Ok(Some(info))
    }

    async fn browse(
        &self,
        topic: &str,
        query: &Browse,
    ) -> Result<Option<Vec<Message>>, BackendError> {
        let key = stream_key(topic);
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(format!("{}meta", prefix(topic))).arg(&key);
        if int(&self.query(cmd).await?).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let max = MessageId::new(u64::MAX, u64::MAX);
        // Exclusive bounds Redis cannot express (past the largest id, below the smallest) and
        // empty intervals select nothing.
        let empty = query.after == Some(max)
            || query.before == Some(MessageId::ZERO)
            || matches!((query.after, query.before), (Some(a), Some(b)) if a >= b);
        if empty {
            return Ok(Some(Vec::new()));
        }
        let low = query.after.map_or("-".to_owned(), |a| format!("({a}"));
        let high = query.before.map_or("+".to_owned(), |b| format!("({b}"));
        let mut cmd = if query.newest_first {
            let mut c = ::redis::cmd("XREVRANGE");
            c.arg(&key).arg(high).arg(low);
            c
        } else {
            let mut c = ::redis::cmd("XRANGE");
            c.arg(&key).arg(low).arg(high);
            c
        };
        cmd.arg("COUNT").arg(query.page_size());
        Ok(Some(stream_messages(self.query(cmd).await?)?))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let want = query.page_size();
        let mut out = Vec::new();
        let mut start = match query.after {
            Some(after) => format!("({after}"),
            None => "-".to_owned(),
        };
        loop {
            let page = self.dead_letter_page(topic, &start, DL_PAGE).await?;
            let full = page.len() == DL_PAGE;
            let last = page.last().map(|d| d.id);
            for dl in page {
                if query.matches(&dl) {
                    out.push(dl);
                    if out.len() == want {
                        return Ok(out);
                    }
                }
            }
            match last {
                Some(last) if full => start = format!("({last}"),
                _ => return Ok(out),
            }
        }
    }

    async fn dead_letter(
        &self,
        topic: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError> {
        let mut cmd = ::redis::cmd("XRANGE");
        let id = id.to_string();
        cmd.arg(format!("{}dl", prefix(topic))).arg(&id).arg(&id);
        match items(self.query(cmd).await?).into_iter().next() {
            Some(e) => Ok(Some(dead_letter_of(e)?)),
            None => Ok(None),
        }
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError> {
        let mut found = Vec::new();
        let mut named = HashSet::new();
        for id in ids.iter().filter(|id| named.insert(**id)) {
            if let Some(dl) = self.dead_letter(topic, *id).await? {
                found.push((dl.id, replay_message(&dl)));
            }
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let key = stream_key(topic);
        let pre = prefix(topic);
        let args: Vec<(String, &Outgoing, String)> = found
            .iter()
            .map(|(id, m)| {
                (
                    id.to_string(),
                    m,
                    serde_json::to_string(&m.headers).expect("string maps serialize"),
                )
            })
            .collect();
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.replay.key(&key);
                inv.arg(&pre);
                for (id, m, h) in &args {
                    inv.arg(id).arg(&m.kind).arg(m.payload.as_ref()).arg(h);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        items(r)
            .into_iter()
            .map(|pair| {
                let p = items(pair);
                match (p.first(), p.get(1)) {
                    (Some(a), Some(b)) => Ok((id_of(a)?, id_of(b)?)),
                    _ => Err(corrupt("replay script reply")),
                }
            })
            .collect()
    }

    async fn delete_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError> {
        let mut n = 0;
        for chunk in ids.chunks(1000) {
            let mut cmd = ::redis::cmd("XDEL");
            cmd.arg(format!("{}dl", prefix(topic)));
            for id in chunk {
                cmd.arg(id.to_string());
            }
            n += int(&self.query(cmd).await?).unwrap_or(0) as u64;
        }
        Ok(n)
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        before: Timestamp,
    ) -> Result<u64, BackendError> {
        let mut doomed = Vec::new();
        self.each_dead_letter(topic, |dl| {
            if dl.last_failed_at < before {
                doomed.push(dl.id);
            }
        })
        .await?;
        self.delete_dead_letters(topic, &doomed).await
    }

    async fn dead_letter_stats(&self, topic: &str) -> Result<DeadLetterStats, BackendError> {
        let mut stats = DeadLetterStats::default();
        self.each_dead_letter(topic, |dl| stats.add(dl)).await?;
        Ok(stats)
    }

    async fn processed(&self, topic: &str, group: &str, key: &str) -> Result<bool, BackendError> {
        let stream = stream_key(topic);
        let pre = prefix(topic);
        let r: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.processed.key(&stream);
                inv.arg(&pre).arg(group).arg(key);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(int(&r) == Some(1))
    }

    async fn record_processed(
        &self,
        sub: &Subscription,
        key: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let stream = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let ttl = redis_millis(ttl.min(relq_core::MAX_DEDUP_WINDOW)).max(1);
        let _: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.record_processed.key(&stream);
                inv.arg(&pre)
                    .arg(&sub.group)
                    .arg(key)
                    .arg(ttl)
                    .arg(sub.epoch);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(())
    }

    async fn take_tokens(
        &self,
        topic: &str,
        group: &str,
        want: u32,
        give_back: u32,
        limit: relq_core::RateLimit,
    ) -> Result<relq_core::Grant, BackendError> {
        let stream = stream_key(topic);
        let pre = prefix(topic);
        let per_ms = redis_millis(limit.per()).max(1);
        // One attempt: the fetch loop waits and asks again (a stop must not wait out retries).
        let r: Value = self
            .call_once(|mut c| {
                let mut inv = self.scripts.take_tokens.key(&stream);
                inv.arg(&pre)
                    .arg(group)
                    .arg(want)
                    .arg(limit.n())
                    .arg(per_ms)
                    .arg(give_back);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let v = items(r);
        match (v.first().and_then(int), v.get(1).and_then(int)) {
            (Some(granted), Some(wait)) => Ok(relq_core::Grant {
                granted: u32::try_from(granted.max(0)).unwrap_or(0).min(want),
                retry_after: Duration::from_millis(u64::try_from(wait.max(0)).unwrap_or(0)),
            }),
            _ => Err(corrupt(format!("a token take answered {v:?}"))),
        }
    }
}

impl RedisBackend {
    /// A publish with idempotency keys, in one script (see `scripts::PUBLISH_KEYED`). Every
    /// attempt runs the same script: a keyed message applied by an attempt whose reply was lost
    /// is found by its key, and an unkeyed one by the batch's nonce.
    async fn publish_keyed(
        &self,
        key: &str,
        pre: &str,
        nonce: &str,
        batch: &[Outgoing],
        headers: &[String],
    ) -> Result<Vec<MessageId>, BackendError> {
        let nonce_ttl = if batch.iter().all(|m| m.dedup().is_some()) {
            0
        } else {
            redis_millis(self.config.retry_for).saturating_add(60_000)
        };
        let reply: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.publish_keyed.key(key);
                inv.arg(pre).arg(nonce).arg(nonce_ttl).arg(batch.len());
                for (m, h) in batch.iter().zip(headers) {
                    message_args(&mut inv, m, h);
                    match m.dedup() {
                        Some((k, window)) => inv.arg(k).arg(redis_millis(window).max(1)),
                        None => inv.arg("").arg(0),
                    };
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        published_ids(reply, batch.len())
    }
}
