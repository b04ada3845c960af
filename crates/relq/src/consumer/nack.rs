//! The nack decision: what becomes of a failed attempt. One pure function, so the rule is in
//! one place and tested on its own: a failure the handler called permanent, a message without
//! a handler, or one delivered past the limit is dead-lettered at once; any other failure
//! (retryable, panic, timeout) goes to the retry policy, which says "retry after D" (scheduled
//! in the backend at `now + D`) or "give up" (dead-lettered). The dead letter's reason is the
//! kind of the last failure. A retry that would be due at or after the message's expiry is not
//! scheduled: the message is given up on at once with reason `expired` (it would never be
//! handled).

use crate::retry::{Failure, RetryDecision, RetryPolicy};
use relq_core::FailureKind;
use relq_core::Timestamp;

/// What to do with a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Nack {
    /// Deliver it again at this time.
    Retry { at: Timestamp },
    /// Give up: store it as a dead letter with this reason.
    DeadLetter { reason: FailureKind },
}

/// The decision for `failure` under `policy`, at `now`, for a message that expires at
/// `expires_at` (if it has a time to live).
pub(crate) fn nack(
    policy: &dyn RetryPolicy,
    failure: &Failure<'_>,
    now: Timestamp,
    expires_at: Option<Timestamp>,
) -> Nack {
    let give_up = Nack::DeadLetter {
        reason: failure.kind,
    };
    match failure.kind {
        FailureKind::Permanent
        | FailureKind::NoHandler
        | FailureKind::DeliveryLimit
        | FailureKind::Expired => give_up,
        FailureKind::Retryable | FailureKind::Panic | FailureKind::Timeout => {
            // A policy is user code: one that panics gives up (the message is kept as a dead
            // letter, not lost, and the consumer lives on).
            let decided =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| policy.decide(failure)));
            match decided.unwrap_or(RetryDecision::GiveUp) {
                RetryDecision::RetryAfter(delay) => {
                    let at = now.plus(delay);
                    match expires_at {
                        Some(e) if at >= e => Nack::DeadLetter {
                            reason: FailureKind::Expired,
                        },
                        _ => Nack::Retry { at },
                    }
                }
                RetryDecision::GiveUp => give_up,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::retry::Backoff;

    const KINDS: [FailureKind; 7] = [
        FailureKind::Retryable,
        FailureKind::Permanent,
        FailureKind::Panic,
        FailureKind::Timeout,
        FailureKind::NoHandler,
        FailureKind::DeliveryLimit,
        FailureKind::Expired,
    ];

    fn failure(kind: FailureKind, attempt: u32) -> Failure<'static> {
        Failure {
            attempt,
            kind,
            error: "boom",
            category: Some("database"),
        }
    }

    #[test]
    fn permanent_kinds_are_dead_lettered_at_once_the_others_retried() {
        let policy = Backoff::fixed(Duration::from_millis(250)).max_attempts(5);
        let now = Timestamp(1_000);
        for kind in KINDS {
            let got = nack(&policy, &failure(kind, 1), now, None);
            let want = match kind {
                FailureKind::Permanent
                | FailureKind::NoHandler
                | FailureKind::DeliveryLimit
                | FailureKind::Expired => Nack::DeadLetter { reason: kind },
                _ => Nack::Retry {
                    at: Timestamp(1_250),
                },
            };
            assert_eq!(got, want, "{kind:?}");
        }
    }

    #[test]
    fn the_policy_giving_up_dead_letters_with_the_last_kind() {
        let policy = Backoff::fixed(Duration::from_millis(1))
            .max_attempts(3)
            .retry_if(|f| f.category != Some("database"));
        assert_eq!(
            nack(
                &policy,
                &failure(FailureKind::Timeout, 1),
                Timestamp(0),
                None
            ),
            Nack::DeadLetter {
                reason: FailureKind::Timeout
            },
            "retry_if said no"
        );
        let policy = Backoff::fixed(Duration::from_millis(1)).max_attempts(3);
        assert_eq!(
            nack(&policy, &failure(FailureKind::Panic, 3), Timestamp(0), None),
            Nack::DeadLetter {
                reason: FailureKind::Panic
            },
            "attempts used up"
        );
    }

    #[test]
    fn a_retry_due_at_or_after_the_expiry_is_an_expired_dead_letter() {
        let policy = Backoff::fixed(Duration::from_millis(250)).max_attempts(5);
        let now = Timestamp(1_000);
        let f = failure(FailureKind::Retryable, 1);
        assert_eq!(
            nack(&policy, &f, now, Some(Timestamp(1_251))),
            Nack::Retry {
                at: Timestamp(1_250)
            },
            "due before the expiry"
        );
        for expires in [1_250, 1_000, 0] {
            assert_eq!(
                nack(&policy, &f, now, Some(Timestamp(expires))),
                Nack::DeadLetter {
                    reason: FailureKind::Expired
                },
                "expires at {expires}"
            );
        }
        // A permanent failure keeps its own reason, expired or not.
        assert_eq!(
            nack(
                &policy,
                &failure(FailureKind::Permanent, 1),
                now,
                Some(Timestamp(0))
            ),
            Nack::DeadLetter {
                reason: FailureKind::Permanent
            }
        );
    }

    #[test]
    fn a_panicking_policy_gives_up() {
        struct Broken;
        impl RetryPolicy for Broken {
            fn decide(&self, _: &Failure<'_>) -> RetryDecision {
                panic!("policy bug")
            }
            fn max_attempts(&self) -> u32 {
                5
            }
        }
        assert_eq!(
            nack(
                &Broken,
                &failure(FailureKind::Retryable, 1),
                Timestamp(0),
                None
            ),
            Nack::DeadLetter {
                reason: FailureKind::Retryable
            }
        );
    }

    proptest! {
        /// For any schedule and attempt: a retry is due no earlier than now and no later than
        /// now plus the schedule's cap; the last allowed attempt and every one after it are
        /// dead-lettered; permanent kinds never retry.
        #[test]
        fn retries_stay_within_the_policy_bounds(
            initial_ms in 1u64..60_000,
            cap_factor in 1u32..100,
            multiplier in 1.0f64..4.0,
            randomization in 0.0f64..=1.0,
            max_attempts in 1u32..50,
            attempt in 1u32..80,
            kind in 0usize..7,
            now_ms in 0u64..4_000_000_000_000,
            ttl_ms in proptest::option::of(0u64..10_000_000),
        ) {
            let initial = Duration::from_millis(initial_ms);
            let cap = initial * cap_factor;
            let policy = Backoff::exponential(initial, cap)
                .multiplier(multiplier)
                .randomization(randomization)
                .max_attempts(max_attempts);
            prop_assert!(policy.validate().is_ok());
            let kind = KINDS[kind];
            let now = Timestamp(now_ms);
            let expires_at = ttl_ms.map(|t| Timestamp(now_ms + t));
            match nack(&policy, &failure(kind, attempt), now, expires_at) {
                Nack::Retry { at } => {
                    prop_assert!(expires_at.is_none_or(|e| at < e), "retry at {at:?} not before the expiry {expires_at:?}");
                    prop_assert!(matches!(kind, FailureKind::Retryable | FailureKind::Panic | FailureKind::Timeout));
                    prop_assert!(attempt < max_attempts, "retried attempt {attempt} of {max_attempts}");
                    prop_assert!(at >= now);
                    prop_assert!(at.0 - now.0 <= u64::try_from(cap.as_millis()).unwrap(), "{} ms above the cap {cap:?}", at.0 - now.0);
                }
                Nack::DeadLetter { reason } if reason == FailureKind::Expired && kind != FailureKind::Expired => {
                    // Only a retry the policy would have scheduled past the expiry.
                    prop_assert!(matches!(kind, FailureKind::Retryable | FailureKind::Panic | FailureKind::Timeout));
                    prop_assert!(expires_at.is_some());
                }
                Nack::DeadLetter { reason } => {
                    prop_assert_eq!(reason, kind);
                    prop_assert!(
                        attempt >= max_attempts
                            || matches!(kind, FailureKind::Permanent | FailureKind::NoHandler | FailureKind::DeliveryLimit | FailureKind::Expired)
                    );
                }
            }
        }
    }
}
