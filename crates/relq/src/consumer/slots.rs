//! Handler slots. A consumer run has its own (its `concurrency`), so its shutdown waits for its
//! own handlers only. The runs of a consumer with priority levels (one run per level) also share
//! one pool of `concurrency` slots: a permit holds a slot of both. Who gets a shared slot when
//! several levels wait for one is decided by a [`Gate`]: smooth weighted round-robin over the
//! waiting levels, so a level with weight `w` gets at least `w / Σw` of the slots while it waits
//! for them, and a level is never starved.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The semaphore closed (never, while a run holds its slots).
#[derive(Debug)]
pub(crate) struct Closed;

/// Held handler slots (possibly several, split off one at a time).
#[derive(Debug)]
pub(crate) struct Permit {
    own: OwnedSemaphorePermit,
    shared: Option<OwnedSemaphorePermit>,
}

impl Permit {
    pub(crate) fn num_permits(&self) -> usize {
        self.own.num_permits()
    }

    /// Splits `n` slots off; `None` if it holds fewer.
    pub(crate) fn split(&mut self, n: usize) -> Option<Permit> {
        if n > self.own.num_permits() {
            return None;
        }
        let own = self.own.split(n)?;
        let shared = match &mut self.shared {
            Some(s) => Some(s.split(n)?),
            None => None,
        };
        Some(Permit { own, shared })
    }
}

/// The slots a run takes its permits from.
#[derive(Clone)]
pub(crate) struct Slots {
    own: Arc<Semaphore>,
    shared: Option<(Arc<Shared>, usize)>,
}

/// Slots shared by the runs of a consumer with priority levels.
pub(crate) struct Shared {
    sem: Arc<Semaphore>,
    gate: Gate,
}

impl Shared {
    /// `slots` shared by levels with these weights (level `i` has `weights[i]`, at least 1).
    pub(crate) fn new(slots: usize, weights: Vec<u64>) -> Arc<Shared> {
        Arc::new(Shared {
            sem: Arc::new(Semaphore::new(slots)),
            gate: Gate::new(weights),
        })
    }
}

impl Slots {
    /// `n` slots of the run's own, and a share of `shared` as level `level`, if given.
    pub(crate) fn new(n: usize, shared: Option<(Arc<Shared>, usize)>) -> Slots {
        Slots {
            own: Arc::new(Semaphore::new(n)),
            shared,
        }
    }

    /// Says whether the run's level has a backlog (its last read came back full): a level with
    /// one keeps its claim on turns at the shared slots between its waits for them.
    pub(crate) fn backlog(&self, backlog: bool) {
        if let Some((shared, level)) = &self.shared {
            shared.gate.set_active(*level, backlog);
        }
    }

    /// Waits for `min` slots (in the gate's order, when shared), then takes what else is free,
    /// up to `max` in all. Cancel safe: a dropped wait holds nothing.
    pub(crate) async fn acquire(&self, min: usize, max: usize) -> Result<Permit, Closed> {
        let min = u32::try_from(min.max(1)).unwrap_or(u32::MAX);
        let mut own = self
            .own
            .clone()
            .acquire_many_owned(min)
            .await
            .map_err(|_| Closed)?;
        let Some((shared, level)) = &self.shared else {
            top_up(&self.own, &mut own, max);
            return Ok(Permit { own, shared: None });
        };
        let _turn = shared.gate.turn(*level).await;
        let mut common = shared
            .sem
            .clone()
            .acquire_many_owned(min)
            .await
            .map_err(|_| Closed)?;
        // More of both, as many as both have free.
        let extra = self
            .own
            .available_permits()
            .min(shared.sem.available_permits())
            .min(max.saturating_sub(own.num_permits()));
        if extra > 0 {
            let n = u32::try_from(extra).unwrap_or(u32::MAX);
            if let Ok(more) = self.own.clone().try_acquire_many_owned(n) {
                match shared.sem.clone().try_acquire_many_owned(n) {
                    Ok(more_common) => {
                        own.merge(more);
                        common.merge(more_common);
                    }
                    Err(_) => drop(more),
                }
            }
        }
        Ok(Permit {
            own,
            shared: Some(common),
        })
    }

    /// Waits until every one of the run's own slots is free (its handlers are done).
    pub(crate) async fn drain(&self, all: u32) {
        let _ = self.own.acquire_many(all).await;
    }

    /// The run's own slots in use.
    pub(crate) fn in_use(&self, all: usize) -> usize {
        all.saturating_sub(self.own.available_permits())
    }
}

/// Takes free permits of `sem` into `permit`, up to `max` in all.
fn top_up(sem: &Arc<Semaphore>, permit: &mut OwnedSemaphorePermit, max: usize) {
    let extra = sem
        .available_permits()
        .min(max.saturating_sub(permit.num_permits()));
    if extra > 0 {
        if let Ok(more) = sem
            .clone()
            .try_acquire_many_owned(u32::try_from(extra).unwrap_or(u32::MAX))
        {
            permit.merge(more);
        }
    }
}

/// Grants turns at the shared slots, one level at a time, in smooth weighted round-robin order
/// over the levels that want slots: those waiting for one, and those with a backlog (between two
/// of its waits, a level with a backlog is busy fetching; the turn waits for it, so its share
/// does not depend on whether it happened to be waiting the moment a slot came free).
pub(crate) struct Gate {
    state: Mutex<GateState>,
    notify: Notify,
}

struct GateState {
    weights: Vec<i64>,
    /// Smooth weighted round-robin credit per level.
    credit: Vec<i64>,
    /// Waits in progress per level.
    waiting: Vec<u32>,
    /// Levels with a backlog.
    active: Vec<bool>,
    /// The level whose turn it is, and whether one of its waits took it.
    turn: Option<(usize, bool)>,
}

impl GateState {
    /// Gives the turn to the next waiting level, if no level has it.
    fn grant(&mut self) -> bool {
        if self.turn.is_some() {
            return false;
        }
        let wants = |s: &GateState, l: usize| s.waiting[l] > 0 || s.active[l];
        // Only a level that waits now can start a round (the others are busy fetching).
        if !(0..self.weights.len()).any(|l| self.waiting[l] > 0) {
            return false;
        }
        let total: i64 = (0..self.weights.len())
            .filter(|l| wants(self, *l))
            .map(|l| self.weights[l])
            .sum();
        let mut best: Option<usize> = None;
        for l in 0..self.weights.len() {
            if !wants(self, l) {
                continue;
            }
            self.credit[l] += self.weights[l];
            if best.is_none_or(|b| self.credit[l] > self.credit[b]) {
                best = Some(l);
            }
        }
        let Some(b) = best else { return false };
        self.credit[b] -= total;
        self.turn = Some((b, false));
        true
    }
}

/// A level's turn at the gate: passed on when dropped.
pub(crate) struct Turn<'a>(&'a Gate);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.turn = None;
        if s.grant() {
            self.0.notify.notify_waiters();
        }
    }
}

/// A wait at the gate; unregisters when dropped before its turn.
struct Waiting<'a> {
    gate: &'a Gate,
    level: usize,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut s = self.gate.lock();
        s.waiting[self.level] -= 1;
        // The turn went to this level and no other wait of it is left to take it.
        if s.turn == Some((self.level, false))
            && s.waiting[self.level] == 0
            && !s.active[self.level]
        {
            s.turn = None;
            if s.grant() {
                self.gate.notify.notify_waiters();
            }
        }
    }
}

impl Gate {
    fn new(weights: Vec<u64>) -> Gate {
        let n = weights.len();
        Gate {
            state: Mutex::new(GateState {
                weights: weights
                    .into_iter()
                    .map(|w| i64::try_from(w.max(1)).unwrap_or(i64::MAX / 64))
                    .collect(),
                credit: vec![0; n],
                waiting: vec![0; n],
                active: vec![false; n],
                turn: None,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_active(&self, level: usize, active: bool) {
        let mut s = self.lock();
        if s.active[level] == active {
            return;
        }
        s.active[level] = active;
        // A turn held for a level that no longer wants it passes on.
        if !active && s.turn == Some((level, false)) && s.waiting[level] == 0 {
            s.turn = None;
        }
        if s.grant() {
            self.notify.notify_waiters();
        }
    }

    /// Waits for `level`'s turn. Cancel safe.
    pub(crate) async fn turn(&self, level: usize) -> Turn<'_> {
        let mut w = Waiting {
            gate: self,
            level,
            done: false,
        };
        {
            let mut s = self.lock();
            s.waiting[level] += 1;
            if s.grant() {
                self.notify.notify_waiters();
            }
        }
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if s.turn == Some((level, false)) {
                    s.turn = Some((level, true));
                    s.waiting[level] -= 1;
                    w.done = true;
                    return Turn(self);
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every level waiting all the time, turns follow the weights exactly.
    #[tokio::test]
    async fn turns_follow_the_weights_among_waiting_levels() {
        let gate = Arc::new(Gate::new(vec![1, 4, 16]));
        let mut counts = [0u32; 3];
        // Three levels always waiting: each takes its turn and waits again.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for level in 0..3 {
            let (gate, tx) = (gate.clone(), tx.clone());
            gate.set_active(level, true);
            tasks.push(tokio::spawn(async move {
                loop {
                    let turn = gate.turn(level).await;
                    if tx.send(level).is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                    drop(turn);
                }
            }));
        }
        for _ in 0..210 {
            counts[rx.recv().await.unwrap()] += 1;
        }
        drop(rx);
        for t in tasks {
            t.abort();
        }
        assert_eq!(counts, [10, 40, 160], "1:4:16 of 210 turns");
    }

    /// A level waiting alone gets every turn; a dropped wait passes its turn on.
    #[tokio::test]
    async fn a_dropped_wait_passes_its_turn_on() {
        let gate = Gate::new(vec![1, 1]);
        let first = gate.turn(0).await;
        {
            // Level 1 waits, and gives up before its turn comes.
            let waiting = gate.turn(1);
            tokio::pin!(waiting);
            assert!(futures_poll(&mut waiting).is_none());
        }
        drop(first);
        // Level 0 gets the turn again at once: level 1 is not waiting any more.
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), gate.turn(0)).await;
        assert!(again.is_ok());
    }

    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
