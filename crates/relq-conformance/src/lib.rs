//! The backend-agnostic conformance suite: every relq backend must pass it.
//!
//! Each test takes a fresh [`Broker`](relq::Broker) and checks one behaviour through the public API (and, for
//! the model-based test, through the [`Backend`](relq::Backend) trait directly). A backend crate
//! runs the whole suite with one macro call in an integration test:
//!
//! ```text
//! relq_conformance::conformance_suite!(paused, relq::Broker::memory());
//! ```
//!
//! `paused` runs every test on tokio's paused clock (retry delays and claim timeouts take no real
//! time; only for backends whose time follows [`relq::Timestamp::now`]); `real` runs them in real
//! time on a multi-threaded runtime (for backends with a server-side clock); `real_optional`
//! takes an `Option<Broker>` and skips the test on `None` (a server that is not installed, which
//! [`redis_server`] reports loudly, and which CI turns into a failure).

/// Real `redis-server` processes for the tests (the `relq-redis-server` crate).
pub use relq_redis_server as redis_server;
pub mod tests;

use std::future::Future;
use std::time::Duration;

/// Polls `cond` every 5 ms until it holds; panics with `what` after `limit` (of tokio time).
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Generates one `#[tokio::test]` per conformance test, each on a broker from `$make`.
#[macro_export]
macro_rules! conformance_suite {
    (paused, $make:expr) => {
        $crate::__conformance_tests!([tokio::test(start_paused = true)] $make);
    };
    (real, $make:expr) => {
        $crate::__conformance_tests!([tokio::test(flavor = "multi_thread", worker_threads = 2)] $make);
    };
    (real_optional, $make:expr) => {
        $crate::__conformance_tests!([tokio::test(flavor = "multi_thread", worker_threads = 2)] optional $make);
    };
}

/// Internal to [`conformance_suite!`]: the list of tests.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ([$attr:meta] optional $make:expr) => {
        $crate::__conformance_tests!(@list [$attr] optional $make);
    };
    ([$attr:meta] $make:expr) => {
        $crate::__conformance_tests!(@list [$attr] always $make);
    };
    (@list [$attr:meta] $mode:ident $make:expr) => {
        $crate::__conformance_list!([$attr] $mode $make);
    };
}

include!(concat!(env!("OUT_DIR"), "/conformance_list.rs"));

/// Internal to [`conformance_suite!`]: one test function per name.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_each {
    ([$attr:meta] always $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[$attr]
            async fn $name() {
                $crate::tests::$name($make).await;
            }
        )*
    };
    ([$attr:meta] optional $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[$attr]
            async fn $name() {
                if let Some(broker) = $make {
                    $crate::tests::$name(broker).await;
                }
            }
        )*
    };
}
