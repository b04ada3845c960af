//! A consumer's concurrency permits: at most `concurrency` messages in its hands at once.
//!
//! Not a `tokio::sync::Semaphore`: here one task (the fetch loop) takes permits and every
//! handler returns one per message, and a semaphore's release takes its waiters' lock every
//! time. A return here is one atomic add, and wakes only a task that is waiting for permits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

pub(super) struct Permits {
    free: AtomicUsize,
    total: usize,
    /// Tasks waiting (registered with `returned`) for permits to come back.
    waiting: AtomicUsize,
    returned: Notify,
}

/// Permits taken from [`Permits`]; returned when dropped.
pub(super) struct Permit {
    pool: Arc<Permits>,
    n: usize,
}

impl Permits {
    pub(super) fn new(total: usize) -> Arc<Permits> {
        Arc::new(Permits {
            free: AtomicUsize::new(total),
            total,
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
        })
    }

    /// Takes every free permit up to `max` (at least one), waiting for one if none is free.
    pub(super) async fn acquire_up_to(self: &Arc<Self>, max: usize) -> Permit {
        let max = max.max(1);
        loop {
            if let Some(p) = self.try_take(max) {
                return p;
            }
            self.wait(|free| free > 0).await;
        }
    }

    /// Waits until every permit is back.
    pub(super) async fn all_back(&self) {
        while self.free.load(Ordering::SeqCst) < self.total {
            self.wait(|free| free >= self.total).await;
        }
    }

    fn try_take(self: &Arc<Self>, max: usize) -> Option<Permit> {
        let mut free = self.free.load(Ordering::SeqCst);
        loop {
            if free == 0 {
                return None;
            }
            let n = free.min(max);
            match self.free.compare_exchange_weak(
                free,
                free - n,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    return Some(Permit {
                        pool: self.clone(),
                        n,
                    })
                }
                Err(now) => free = now,
            }
        }
    }

    /// Waits for a return, unless `ready` holds for the free count once registered.
    async fn wait(&self, ready: impl Fn(usize) -> bool) {
        let returned = self.returned.notified();
        tokio::pin!(returned);
        returned.as_mut().enable();
        // Counted before looking (both sequentially consistent): a return either sees this
        // waiter and wakes it, or happened before the look, which then sees it.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        struct Uncount<'a>(&'a AtomicUsize);
        impl Drop for Uncount<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _uncount = Uncount(&self.waiting);
        if ready(self.free.load(Ordering::SeqCst)) {
            return;
        }
        returned.await;
    }

    /// Returns `n` permits.
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.free.fetch_add(n, Ordering::SeqCst);
        // Waiters wait for "some free" or "all free": only those two moments wake them.
        if (before == 0 || before + n == self.total) && self.waiting.load(Ordering::SeqCst) > 0 {
            self.returned.notify_waiters();
        }
    }
}

impl Permit {
    /// How many permits this holds.
    pub(super) fn count(&self) -> usize {
        self.n
    }

    /// Splits one permit off; `None` if this holds none.
    pub(super) fn split_one(&mut self) -> Option<Permit> {
        if self.n == 0 {
            return None;
        }
        self.n -= 1;
        Some(Permit {
            pool: self.pool.clone(),
            n: 1,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pool.release(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn takes_what_is_free_up_to_max_and_waits_for_a_return() {
        let pool = Permits::new(3);
        let mut a = pool.acquire_up_to(2).await;
        assert_eq!(a.count(), 2);
        let b = pool.acquire_up_to(5).await;
        assert_eq!(b.count(), 1);
        // None free: the next acquire waits until one comes back.
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire_up_to(5).await.count() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let one = a.split_one().expect("a holds two");
        assert_eq!(a.count(), 1);
        drop(one);
        assert_eq!(waiter.await.unwrap(), 1);
        drop((a, b));
        assert_eq!(pool.free.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn all_back_waits_for_every_permit() {
        let pool = Permits::new(2);
        let p = pool.acquire_up_to(2).await;
        let all = tokio::spawn({
            let pool = pool.clone();
            async move { pool.all_back().await }
        });
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!all.is_finished(), "returned before the permits were back");
        drop(p);
        tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .expect("all_back did not see the permits come back")
            .unwrap();
    }
}
