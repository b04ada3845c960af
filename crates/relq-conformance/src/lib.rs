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
        $crate::__conformance_each!([$attr] $mode $make;
            publish_and_consume_every_group_gets_every_message,
            consumers_in_a_group_compete,
            stuck_message_is_claimed_after_its_consumer_dies,
            own_pending_messages_are_recovered_on_restart,
            retries_follow_the_policy_exactly,
            dead_letter_holds_the_full_failure_record,
            replay_redelivers_to_the_failing_group_only,
            dead_letter_list_filter_delete_purge_stats,
            stopped_message_is_held_then_resumed,
            browse_pages_without_a_group_and_groups_report_their_oldest,
            dead_letters_are_forwarded_to_the_failure_topic,
            locate_tells_where_a_message_stands_in_each_group,
            terminate_stops_consumers_and_topic_can_return,
            start_positions_apply_when_the_group_is_created,
            groups_are_created_moved_and_deleted,
            cleanup_never_removes_unacknowledged_messages,
            batch_handler_partial_failure_fails_only_the_bad_message,
            shutdown_during_a_handler_leaves_the_message_pending,
            panicking_handler_is_retried_then_dead_lettered,
            hanging_handler_times_out,
            delayed_publish_is_not_delivered_early,
            message_without_handler_is_dead_lettered,
            bad_input_is_rejected_and_nothing_is_published,
            headers_at_their_limits_round_trip,
            model_based_random_operations_lose_nothing,
        );
    };
}

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
