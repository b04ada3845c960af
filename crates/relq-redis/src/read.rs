//! The read path: due retries promoted, new entries read, a group recreated after Redis lost
//! it, and what a consumer holds redelivered.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ::redis::Value;

use relq_core::{BackendError, BackendErrorKind, Delivery, MessageId, Subscription, Timestamp};

use super::decode::{deliveries, id_of, int, items, message_of, text};
use super::error::{corrupt, err, map_err};
use super::keys::{group_prefix, prefix, redis_millis, stream_key, NEVER_DELIVERED};
use super::RedisBackend;

impl RedisBackend {
    pub(crate) fn flag_recovery(&self, sub: &Subscription) {
        self.needs_recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sub.topic.clone(), sub.group.clone(), sub.consumer.clone()));
    }

    /// Notes which deliveries carry a failure history (all but first deliveries of new entries),
    /// and whether any carries an ordering key.
    fn note_history(&self, sub: &Subscription, out: &[Delivery]) {
        self.note_history_ids(out.iter().map(|d| d.message.id));
        if out.iter().any(|d| d.message.ordering_key().is_some()) {
            self.note_keyed(&sub.topic);
        }
    }

    /// Notes that `topic` carries ordering keys: this process's acks on it go through the
    /// settle script from now on.
    pub(crate) fn note_keyed(&self, topic: &str) {
        let mut k = self.keyed_topics.lock().unwrap_or_else(|e| e.into_inner());
        if !k.contains(topic) {
            k.insert(topic.to_owned());
        }
    }

    /// Whether this process handed out keyed messages of `topic`.
    pub(crate) fn is_keyed(&self, topic: &str) -> bool {
        let k = self.keyed_topics.lock().unwrap_or_else(|e| e.into_inner());
        !k.is_empty() && k.contains(topic)
    }

    /// Notes deliveries whose settlement needs the settle script: those with a failure history,
    /// and those with an ordering key (an ack passes the key on).
    fn note_history_ids(&self, ids: impl Iterator<Item = MessageId>) {
        let mut h = self.with_history.lock().unwrap_or_else(|e| e.into_inner());
        h.note(ids, tokio::time::Instant::now());
    }

    fn warn_lost(&self, sub: &Subscription, lost: bool) {
        if lost {
            tracing::warn!(
                topic = %sub.topic,
                group = %sub.group,
                "Redis lost this topic's group (restart without persistence, eviction or FLUSHALL?): recreated it; messages published before the loss are gone"
            );
        }
    }

    /// Runs the promote script: due scheduled entries come back to this consumer, and new
    /// entries fill the rest of `max` (screened as a read's are).
    pub(crate) async fn promote(
        &self,
        sub: &Subscription,
        max: usize,
    ) -> Result<Promoted, BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let now = Timestamp::now().0;
        let reply: Value = self
            .call_once(|mut c| {
                let mut inv = self.scripts.promote.key(&key);
                inv.arg(&pre)
                    .arg(&sub.group)
                    .arg(&sub.consumer)
                    .arg(sub.epoch)
                    .arg(now)
                    .arg(max);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let mut parts = items(reply).into_iter();
        let (Some(lost), Some(out), Some(next_due), Some(stopped), Some(fresh), Some(skip)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(corrupt("promote script reply"));
        };
        self.warn_lost(sub, int(&lost) == Some(1));
        let stopped = items(stopped)
            .iter()
            .filter_map(|v| id_of(v).ok())
            .collect();
        let mut out = deliveries(out)?;
        self.note_history(sub, &out);
        let entries = stream_entries(fresh);
        let read_new = !entries.is_empty();
        if read_new {
            match self
                .screen(sub, entries, int(&skip).unwrap_or(0), &stopped)
                .await
            {
                Ok(more) => out.extend(more),
                // The new entries stay pending for this consumer (recovered later); the
                // promoted ones are handed over.
                Err(e) if !out.is_empty() => {
                    tracing::debug!(error = %e, "screening a read's new entries failed");
                    self.flag_recovery(sub);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Promoted {
            out,
            next_due: int(&next_due).map(|d| d as u64),
            stopped,
            read_new,
        })
    }

    /// The read while nothing scheduled is due: one MULTI/EXEC without Lua (a script's
    /// `XREADGROUP` reply is copied into Lua tables and back, which costs the server more than
    /// the read itself). Besides the new entries it fetches what the promote script would look at:
    /// the terminate marker, whether the topic's metadata exists, the stopped ids, when the
    /// group's first scheduled entry is due and the size of its skip set. `None` when the group
    /// is missing. When the metadata is gone (Redis lost it), `next_due` is 0, so the next read
    /// runs the promote script, which recreates it and warns.
    pub(crate) async fn read_ready(
        &self,
        sub: &Subscription,
        max: usize,
    ) -> Result<Option<Promoted>, BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let group = group_prefix(&pre, &sub.group);
        let mut pipe = ::redis::pipe();
        pipe.atomic().ignore_errors();
        pipe.cmd("GET").arg(format!("{pre}ended"));
        pipe.cmd("EXISTS").arg(format!("{pre}meta"));
        pipe.cmd("SMEMBERS").arg(format!("{pre}stop"));
        pipe.cmd("ZRANGE")
            .arg(format!("{group}sched"))
            .arg(0)
            .arg(0)
            .arg("WITHSCORES");
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&sub.group)
            .arg(&sub.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("STREAMS")
            .arg(&key)
            .arg(NEVER_DELIVERED);
        pipe.cmd("ZCARD").arg(format!("{group}skip"));
        // On a connection of its own (from the blocking reads' pool): the reply, the largest
        // of all, is parsed by that connection's task, beside the acks on the shared one.
        let mut conn = self.blocking.take(&self.target).await.map_err(map_err)?;
        let limit = self.config.response_timeout;
        let reply: Vec<Value> = match tokio::time::timeout(limit, pipe.query_async(&mut conn)).await
        {
            Ok(Ok(v)) => {
                self.blocking.give_back(conn);
                v
            }
            Ok(Err(e)) => return Err(map_err(e)),
            Err(_) => {
                return Err(err(
                    BackendErrorKind::Unavailable,
                    format!("read got no reply within {limit:?}"),
                ))
            }
        };
        let Ok([ended, meta, stopped, first, fresh, skip]) = <[Value; 6]>::try_from(reply) else {
            return Err(corrupt("read transaction reply"));
        };
        let fresh = match fresh {
            Value::ServerError(e) if e.code() == "NOGROUP" => return Ok(None),
            other => other,
        };
        let [ended, meta, stopped, first, fresh, skip] = [ended, meta, stopped, first, fresh, skip]
            .map(|v| match v {
                Value::ServerError(e) => Err(map_err(e.into())),
                v => Ok(v),
            });
        if let Some(ended) = text(&ended?) {
            // Decimal epochs: the longer is the larger, then digit by digit (the scripts' numcmp).
            let epoch = sub.epoch.to_string();
            if !ended.bytes().all(|b| b.is_ascii_digit()) {
                return Err(corrupt(format!("terminate marker {ended:?}")));
            }
            if (ended.len(), ended.as_str()) >= (epoch.len(), epoch.as_str()) {
                // What the read took belongs to the topic's next generation (created again, and
                // its group joined): hand it back before stopping.
                if let Ok(fresh) = fresh {
                    self.give_back(sub, &stream_entries(fresh)).await;
                }
                return Err(err(
                    BackendErrorKind::Terminated,
                    "the topic was terminated",
                ));
            }
        }
        let stopped = items(stopped?)
            .iter()
            .filter_map(|v| id_of(v).ok())
            .collect();
        let next_due = match int(&meta?) {
            Some(1) => first_score(first?),
            _ => Some(0),
        };
        let entries = stream_entries(fresh?);
        let read_new = !entries.is_empty();
        let out = self
            .screen(sub, entries, int(&skip?).unwrap_or(0), &stopped)
            .await?;
        Ok(Some(Promoted {
            out,
            next_due,
            stopped,
            read_new,
        }))
    }

    /// Hands back entries a read of a terminated generation took from the next one: each still
    /// pending for this consumer is scheduled for delivery now (a delayed one when due), its
    /// delivery count unchanged, as if never read. If that fails they stay pending for this
    /// consumer, which never reads again, and are claimed by the new generation's consumers
    /// after their claim time.
    async fn give_back(&self, sub: &Subscription, entries: &[Value]) {
        let ids = entry_ids(entries);
        if ids.is_empty() {
            return;
        }
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let now = Timestamp::now().0;
        let r = self
            .call(|mut c| {
                let mut inv = self.scripts.give_back.key(&key);
                inv.arg(&pre).arg(&sub.group).arg(&sub.consumer).arg(now);
                for id in &ids {
                    inv.arg(id);
                }
                async move { inv.invoke_async::<Value>(&mut c).await }
            })
            .await;
        match r {
            Ok(_) => self.due().scheduled(&sub.topic, &sub.group, now),
            Err(e) => tracing::warn!(
                topic = %sub.topic,
                group = %sub.group,
                error = %e,
                "a consumer of a terminated generation took {} messages of the next one and could not hand them back: they are claimed after the group's claim time",
                ids.len()
            ),
        }
    }

    /// Recreates the group after a read found it missing.
    pub(crate) async fn recreate_group(&self, sub: &Subscription) -> Result<(), BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        self.call(|mut c| {
            let mut inv = self.scripts.recreate.key(&key);
            inv.arg(&pre).arg(&sub.group).arg(sub.epoch);
            async move { inv.invoke_async::<Value>(&mut c).await }
        })
        .await?;
        self.warn_lost(sub, true);
        Ok(())
    }

    /// Reads new entries with `XREADGROUP`, blocking up to `block` (not at all when zero), on a
    /// dedicated connection; screens what arrives (stopped or not yet due entries are moved
    /// aside by the hold script). `None` when the group is missing.
    pub(crate) async fn read_new(
        &self,
        sub: &Subscription,
        max: usize,
        block: Duration,
        stopped: &HashSet<MessageId>,
    ) -> Result<Option<Vec<Delivery>>, BackendError> {
        let key = stream_key(&sub.topic);
        let mut conn = self.blocking.take(&self.target).await.map_err(map_err)?;
        // The read, then (on the same connection, so after the read was served, however long
        // it blocked) the size of the group's skip set: a move back that happened before the
        // read was served has filled it, even one after the promote step looked.
        let pipe = {
            let mut pipe = ::redis::pipe();
            let cmd = pipe
                .cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&sub.group)
                .arg(&sub.consumer)
                .arg("COUNT")
                .arg(max);
            if !block.is_zero() {
                cmd.arg("BLOCK").arg(redis_millis(block).max(1));
            }
            cmd.arg("STREAMS").arg(&key).arg(NEVER_DELIVERED);
            pipe.cmd("ZCARD")
                .arg(group_prefix(&prefix(&sub.topic), &sub.group) + "skip");
            pipe
        };
        let limit = block.saturating_add(self.config.response_timeout);
        let reply =
            match tokio::time::timeout(limit, pipe.query_async::<(Value, i64)>(&mut conn)).await {
                Ok(Ok(v)) => {
                    self.blocking.give_back(conn);
                    v
                }
                // NOGROUP: the group is gone; UNBLOCKED: the stream was deleted while we waited
                // (a terminate, or a FLUSHALL). The recreate script tells which.
                Ok(Err(e)) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                    self.blocking.give_back(conn);
                    return Ok(None);
                }
                Ok(Err(e)) => return Err(map_err(e)),
                Err(_) => {
                    return Err(err(
                        BackendErrorKind::Unavailable,
                        format!("blocking read got no reply within {limit:?}"),
                    ))
                }
            };
        let (reply, skip) = reply;
        self.screen(sub, stream_entries(reply), skip, stopped)
            .await
            .map(Some)
    }

    /// Deliveries from the entries an `XREADGROUP` returned: entries a move back made the group
    /// read again and that it holds already are passed over (if `skip`, the size of its skip set,
    /// says there may be some); stopped ones (in `stopped`) and delayed ones not yet due are set
    /// aside by the hold script.
    pub(crate) async fn screen(
        &self,
        sub: &Subscription,
        entries: Vec<Value>,
        skip: i64,
        stopped: &HashSet<MessageId>,
    ) -> Result<Vec<Delivery>, BackendError> {
        let key = stream_key(&sub.topic);
        let passed = match skip > 0 && !entries.is_empty() {
            true => self.skip_again(sub, &entries).await?,
            false => HashSet::new(),
        };
        let mut read = Vec::with_capacity(entries.len());
        for e in entries {
            let mut parts = items(e).into_iter();
            let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                continue;
            };
            let id = id_of(&id)?;
            if passed.contains(&id) {
                continue;
            }
            read.push(message_of(id, fields, 1));
        }
        if read.iter().any(|m| m.ordering_key().is_some()) {
            match self.check_keys(sub, &read).await {
                Ok(waiting) => {
                    read.retain(|m| !waiting.contains(&m.id));
                    // Acks of keyed messages go through the settle script, which passes keys on.
                    self.note_keyed(&sub.topic);
                }
                // Unchecked, the keyed entries must not run: they stay pending for this
                // consumer, and its recovery checks them first. The others go on.
                Err(e) => {
                    read.retain(|m| m.ordering_key().is_none());
                    self.flag_recovery(sub);
                    if read.is_empty() {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "checking ordering keys failed; those messages are recovered");
                }
            }
        }
        let now = Timestamp::now();
        let mut out = Vec::new();
        let mut held: Vec<(MessageId, i64)> = Vec::new();
        let mut parked = HashMap::new();
        for message in read {
            let id = message.id;
            if stopped.contains(&id) {
                held.push((id, -1));
                parked.insert(id, message);
            } else if let Some(at) = message.deliver_at.filter(|at| *at > now) {
                held.push((id, at.0 as i64));
            } else {
                out.push(Delivery {
                    message,
                    failures: Vec::new(),
                });
            }
        }
        if !held.is_empty() {
            let pre = prefix(&sub.topic);
            let hold = self
                .call(|mut c| {
                    let mut inv = self.scripts.hold.key(&key);
                    inv.arg(&pre)
                        .arg(&sub.group)
                        .arg(sub.epoch)
                        .arg(Timestamp::now().0);
                    for (id, due) in &held {
                        inv.arg(id.to_string()).arg(*due);
                    }
                    async move { inv.invoke_async::<Value>(&mut c).await }
                })
                .await;
            if let Some(at) = held
                .iter()
                .filter_map(|(_, due)| u64::try_from(*due).ok())
                .min()
            {
                self.due().scheduled(&sub.topic, &sub.group, at);
            }
            match hold {
                // Resumed since the promote step looked: deliver after all.
                Ok(released) => out.extend(
                    items(released)
                        .iter()
                        .filter_map(|v| id_of(v).ok())
                        .filter_map(|id| parked.remove(&id))
                        .map(|message| Delivery {
                            message,
                            failures: Vec::new(),
                        }),
                ),
                // The set-aside entries stay pending for this consumer (recovered or claimed
                // later); what is deliverable is not lost with them.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, "could not set aside stopped or delayed messages; they stay pending");
                    self.flag_recovery(sub);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Runs the key check (see the KEYCHECK script) for the keyed messages among `read` (in id
    /// order); returns those the reader must not run.
    async fn check_keys(
        &self,
        sub: &Subscription,
        read: &[relq_core::Message],
    ) -> Result<HashSet<MessageId>, BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let mut keyed: Vec<(MessageId, &str)> = read
            .iter()
            .filter_map(|m| Some((m.id, m.ordering_key()?)))
            .collect();
        keyed.sort_unstable();
        let waiting: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.keycheck.key(&key);
                inv.arg(&pre)
                    .arg(&sub.group)
                    .arg(sub.epoch)
                    .arg(&sub.consumer);
                for (id, k) in &keyed {
                    inv.arg(id.to_string()).arg(*k);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(items(waiting)
            .iter()
            .filter_map(|v| id_of(v).ok())
            .collect())
    }

    /// After a move back: which of the entries a read took again the group holds already (the
    /// skip script passes over them). If the script fails, the entries stay pending for this
    /// consumer and the runtime recovers them.
    async fn skip_again(
        &self,
        sub: &Subscription,
        entries: &[Value],
    ) -> Result<HashSet<MessageId>, BackendError> {
        let ids = entry_ids(entries);
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let passed: Value = self
            .call(|mut c| {
                let mut inv = self.scripts.skip.key(&key);
                inv.arg(&pre).arg(&sub.group).arg(sub.epoch);
                for id in &ids {
                    inv.arg(id);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await
            .inspect_err(|_| self.flag_recovery(sub))?;
        Ok(items(passed).iter().filter_map(|v| id_of(v).ok()).collect())
    }

    pub(crate) async fn redeliver(
        &self,
        sub: &Subscription,
        max: usize,
        mode: &str,
        arg: String,
    ) -> Result<Vec<Delivery>, BackendError> {
        let key = stream_key(&sub.topic);
        let pre = prefix(&sub.topic);
        let now = Timestamp::now().0;
        let reply: Value = self
            .call_once(|mut c| {
                let mut inv = self.scripts.redeliver.key(&key);
                inv.arg(&pre)
                    .arg(&sub.group)
                    .arg(&sub.consumer)
                    .arg(sub.epoch)
                    .arg(now)
                    .arg(max)
                    .arg(mode)
                    .arg(&arg)
                    .arg(redis_millis(self.config.consumer_expiry));
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        // It schedules entries it finds not yet due: the next read looks for due ones.
        self.due().scheduled(&sub.topic, &sub.group, 0);
        let mut parts = items(reply).into_iter();
        let (Some(lost), Some(out)) = (parts.next(), parts.next()) else {
            return Err(corrupt("redeliver script reply"));
        };
        self.warn_lost(sub, int(&lost) == Some(1));
        let out = deliveries(out)?;
        self.note_history(sub, &out);
        Ok(out)
    }
}

/// The entries of an `XREADGROUP` reply (RESP2: `[[key, entries]]`; RESP3 maps flatten to the
/// same shape), of every stream in it.
pub(crate) fn stream_entries(reply: Value) -> Vec<Value> {
    let mut entries = Vec::new();
    for stream in items(reply) {
        let mut parts = items(stream).into_iter();
        if let (Some(_), Some(list)) = (parts.next(), parts.next()) {
            entries.extend(items(list));
        }
    }
    entries
}

/// The score of a `ZRANGE key 0 0 WITHSCORES` reply (RESP2 `[member, score]`, RESP3
/// `[[member, score]]`) as whole milliseconds; `None` when the set is empty or its first entry
/// is never due (`+inf`). A score that does not parse counts as due now: the promote script,
/// which looks itself, sorts it out.
pub(crate) fn first_score(v: Value) -> Option<u64> {
    let mut parts = items(v);
    if let [Value::Array(_)] = parts.as_slice() {
        parts = parts.into_iter().flat_map(items).collect();
    }
    let score = parts.get(1)?;
    let ms = match score {
        Value::Double(d) => Some(*d),
        other => text(other).and_then(|t| t.parse::<f64>().ok()),
    };
    match ms {
        Some(ms) if ms == f64::INFINITY => None,
        // Due times in ms; a negative one (or -inf) is due now. `as` saturates.
        Some(ms) if !ms.is_nan() => Some(ms.max(0.0) as u64),
        _ => Some(0),
    }
}

/// The ids of `XREADGROUP` entries, as the text scripts take.
fn entry_ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| match e {
            Value::Array(parts) => parts.first().and_then(text),
            _ => None,
        })
        .collect()
}

/// What the promote script handed over.
pub(crate) struct Promoted {
    /// Due scheduled entries, then (when asked to fill) new ones.
    pub(crate) out: Vec<Delivery>,
    /// When the group's next scheduled entry is due.
    pub(crate) next_due: Option<u64>,
    /// The topic's stopped ids.
    pub(crate) stopped: HashSet<MessageId>,
    /// Whether new entries were read (and perhaps all set aside: stopped, or delayed).
    pub(crate) read_new: bool,
}
