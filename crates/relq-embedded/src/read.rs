//! Reading messages: segment reads on tokio's blocking pool, prefetched outside the engine
//! lock, and redelivery of what a group holds.

use std::collections::HashMap;
use std::sync::Arc;

use relq_core::{BackendError, Delivery, Subscription, Timestamp};

use super::codec::Record;
use super::group::Pending;
use super::log::ReadHint;
use super::{fatal, panicked, EmbeddedBackend, Shared};

/// Rows changed and not yet committed (in every group) beyond which a read that found nothing
/// to deliver waits for a synced commit before it goes on.
pub(crate) const MAX_DIRTY_ROWS: usize = 1 << 16;

/// Runs `f` (reads of segment files) on tokio's blocking pool.
/// A panic there poisons the engine like one on its own threads.
pub(crate) async fn blocking<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => {
            let e = panicked("a read of the log (on the blocking pool)", &*e.into_panic());
            shared.poison(&e);
            Err(e)
        }
        Err(e) => Err(fatal(format!("reading the log failed: {e}"))),
    }
}

/// Records a read needs that are not in memory, read from the segment files without holding the
/// engine lock.
#[derive(Default)]
pub(crate) struct Prefetch {
    /// Records from the group's cursor on.
    pub(crate) new: Vec<Arc<Record>>,
    /// Where reading `new` stopped.
    pub(crate) hint: Option<ReadHint>,
    /// Due rows' records (`None`: removed by retention).
    pub(crate) rows: HashMap<u64, Option<Arc<Record>>>,
}

impl EmbeddedBackend {
    /// Reads what the next `read` of `sub` needs from disk (the records of due rows and new
    /// records at the cursor that are not in the tail cache) on the blocking pool, so neither
    /// the engine lock nor a runtime worker waits for the disk. Building a sealed segment's
    /// index (a scan of the whole segment, the first time it is read after an open) happens
    /// here too.
    pub(crate) async fn prefetch(
        &self,
        sub: &Subscription,
        max: usize,
        now: Timestamp,
    ) -> Result<Prefetch, BackendError> {
        let (log, cursor, hint, due) = self.shared.with_group(sub, |inner| {
            let ts = &inner.topics[&sub.topic];
            let g = &ts.groups[&sub.group];
            let due: Vec<u64> = g
                .due
                .iter()
                .take_while(|(d, _)| *d <= now.0)
                .take(max)
                .map(|(_, o)| *o)
                .filter(|o| !ts.log.in_memory(*o))
                .collect();
            Ok((ts.log.clone(), g.cursor.max(ts.start), g.hint, due))
        })?;
        blocking(&self.shared, move || {
            let mut pre = Prefetch::default();
            for o in due {
                pre.rows.insert(o, log.get(o)?);
            }
            if !log.in_memory(cursor) {
                let mut hint = hint;
                pre.new = log.read(cursor, max, &mut hint)?;
                pre.hint = hint;
            }
            Ok(pre)
        })
        .await
    }

    /// Delivers again the pending entries `pick` selects (`recover` and `claim`). Raised
    /// delivery counts ride the next cycle; nobody waits for it.
    pub(crate) async fn redeliver(
        &self,
        sub: &Subscription,
        max: usize,
        pick: impl Fn(u64, &Pending, Timestamp) -> bool,
    ) -> Result<Vec<Delivery>, BackendError> {
        let now = Timestamp::now();
        // The records to deliver again that are no longer in the tail cache are read first,
        // without the engine lock (see `prefetch`); one chosen meanwhile is read under it.
        let (log, on_disk) = self.shared.with_group(sub, |inner| {
            let ts = &inner.topics[&sub.topic];
            let on_disk: Vec<u64> = ts.groups[&sub.group]
                .pending
                .iter()
                .filter(|(o, p)| pick(**o, p, now))
                .map(|(o, _)| *o)
                .take(max)
                .filter(|o| !ts.log.in_memory(*o))
                .collect();
            Ok((ts.log.clone(), on_disk))
        })?;
        let mut pre = HashMap::new();
        if !on_disk.is_empty() {
            pre = blocking(&self.shared, move || {
                on_disk
                    .into_iter()
                    .map(|o| Ok((o, log.get(o)?)))
                    .collect::<Result<HashMap<_, _>, BackendError>>()
            })
            .await?;
        }
        let (out, _) = self.shared.group_ops(sub, |ops| {
            ops.redeliver(&sub.consumer, max, now, &mut pre, |o, p| pick(o, p, now))
        })?;
        if !out.is_empty() {
            self.shared.request_commit();
        }
        Ok(out)
    }
}
