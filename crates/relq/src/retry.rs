//! Retry policies: after a failed attempt, "retry after D" or "give up".

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use relq_core::ConfigError;
use relq_core::FailureKind;

/// A failed attempt, as a retry policy sees it.
#[derive(Clone, Debug)]
pub struct Failure<'a> {
    /// Which delivery failed (1 = the first).
    pub attempt: u32,
    /// How it failed.
    pub kind: FailureKind,
    /// The error message.
    pub error: &'a str,
    /// The category the handler attached, if any.
    pub category: Option<&'a str>,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryDecision {
    /// Deliver again after this delay. The retry is scheduled in the backend; no task sleeps.
    RetryAfter(Duration),
    /// Stop retrying: dead-letter the message.
    GiveUp,
}

/// Decides whether and when a failed message is retried. Implement it for custom schedules;
/// [`Backoff`] covers exponential, fixed and linear delays.
pub trait RetryPolicy: Send + Sync + 'static {
    /// The decision after `failure`. Permanent failures never reach the policy.
    fn decide(&self, failure: &Failure<'_>) -> RetryDecision;

    /// The most deliveries a message gets. A message delivered more often than this without being
    /// settled (its consumers crashed) is dead-lettered with reason `delivery_limit`.
    fn max_attempts(&self) -> u32;
}

#[derive(Clone, Debug, PartialEq)]
enum Schedule {
    Exponential {
        initial: Duration,
        max: Duration,
        multiplier: f64,
        randomization: f64,
    },
    Fixed(Duration),
    Linear {
        initial: Duration,
        increment: Duration,
        max: Duration,
    },
}

type RetryIf = Arc<dyn Fn(&Failure<'_>) -> bool + Send + Sync>;

/// The built-in retry policy: a delay schedule, an attempt limit, and an optional per-error
/// "should retry" predicate.
///
/// The default is exponential: 1 s initial delay, 60 s cap, multiplier 2, randomization 0.1,
/// 5 attempts.
#[derive(Clone)]
pub struct Backoff {
    schedule: Schedule,
    max_attempts: u32,
    retry_if: Option<RetryIf>,
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("schedule", &self.schedule)
            .field("max_attempts", &self.max_attempts)
            .field("retry_if", &self.retry_if.is_some())
            .finish()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Backoff {
    /// Delays of `initial * multiplier^(n-1)` capped at `max`, each randomized by +/- the
    /// randomization factor (multiplier 2, randomization 0.1 unless set).
    pub fn exponential(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            schedule: Schedule::Exponential {
                initial,
                max,
                multiplier: 2.0,
                randomization: 0.1,
            },
            max_attempts: 5,
            retry_if: None,
        }
    }

    /// The same delay before every retry.
    pub fn fixed(delay: Duration) -> Backoff {
        Backoff {
            schedule: Schedule::Fixed(delay),
            max_attempts: 5,
            retry_if: None,
        }
    }

    /// Delays of `initial + increment * (n-1)`, capped at `max`.
    pub fn linear(initial: Duration, increment: Duration, max: Duration) -> Backoff {
        Backoff {
            schedule: Schedule::Linear {
                initial,
                increment,
                max,
            },
            max_attempts: 5,
            retry_if: None,
        }
    }

    /// Sets the exponential multiplier (ignored by other schedules).
    pub fn multiplier(mut self, m: f64) -> Backoff {
        if let Schedule::Exponential { multiplier, .. } = &mut self.schedule {
            *multiplier = m;
        }
        self
    }

    /// Sets the exponential randomization factor, 0.0 to 1.0 (ignored by other schedules).
    pub fn randomization(mut self, r: f64) -> Backoff {
        if let Schedule::Exponential { randomization, .. } = &mut self.schedule {
            *randomization = r;
        }
        self
    }

    /// Sets the most deliveries (the first one included). At least 1.
    pub fn max_attempts(mut self, n: u32) -> Backoff {
        self.max_attempts = n;
        self
    }

    /// Retries only failures for which `f` returns true; others are dead-lettered at once.
    pub fn retry_if(mut self, f: impl Fn(&Failure<'_>) -> bool + Send + Sync + 'static) -> Backoff {
        self.retry_if = Some(Arc::new(f));
        self
    }

    /// Checks the values.
    ///
    /// # Errors
    /// Zero attempts, a multiplier below 1 or not finite, a randomization outside 0..=1, or an
    /// initial delay above the cap.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new("retry.max_attempts", "must be at least 1"));
        }
        match self.schedule {
            Schedule::Exponential {
                initial,
                max,
                multiplier,
                randomization,
            } => {
                if !(multiplier.is_finite() && multiplier >= 1.0) {
                    return Err(ConfigError::new(
                        "retry.multiplier",
                        format!("must be a finite number >= 1, got {multiplier}"),
                    ));
                }
                if !(0.0..=1.0).contains(&randomization) {
                    return Err(ConfigError::new(
                        "retry.randomization",
                        format!("must be between 0 and 1, got {randomization}"),
                    ));
                }
                if initial > max {
                    return Err(ConfigError::new(
                        "retry.initial_delay",
                        "exceeds retry.max_delay",
                    ));
                }
            }
            Schedule::Linear { initial, max, .. } if initial > max => {
                return Err(ConfigError::new(
                    "retry.initial_delay",
                    "exceeds retry.max_delay",
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The delay before retry number `attempt` (1 = after the first failure).
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = attempt.max(1) - 1;
        match self.schedule {
            Schedule::Fixed(d) => d,
            Schedule::Linear {
                initial,
                increment,
                max,
            } => initial.saturating_add(increment.saturating_mul(n)).min(max),
            Schedule::Exponential {
                initial,
                max,
                multiplier,
                randomization,
            } => {
                let base = (initial.as_secs_f64() * multiplier.powi(n.min(1024) as i32))
                    .min(max.as_secs_f64());
                let jitter = if randomization > 0.0 {
                    1.0 + randomization * (fastrand::f64() * 2.0 - 1.0)
                } else {
                    1.0
                };
                // Saturating: `max` may be Duration::MAX, beyond what f64 seconds convert back.
                Duration::try_from_secs_f64((base * jitter).min(max.as_secs_f64()).max(0.0))
                    .map_or(max, |d| d.min(max))
            }
        }
    }
}

impl RetryPolicy for Backoff {
    fn decide(&self, failure: &Failure<'_>) -> RetryDecision {
        if failure.attempt >= self.max_attempts {
            return RetryDecision::GiveUp;
        }
        if let Some(f) = &self.retry_if {
            if !f(failure) {
                return RetryDecision::GiveUp;
            }
        }
        RetryDecision::RetryAfter(self.delay(failure.attempt))
    }

    fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn failure(attempt: u32) -> Failure<'static> {
        Failure {
            attempt,
            kind: FailureKind::Retryable,
            error: "boom",
            category: None,
        }
    }

    #[test]
    fn schedules_give_the_documented_delays() {
        let ms = Duration::from_millis;
        let e = Backoff::exponential(ms(100), ms(1000)).randomization(0.0);
        let got: Vec<_> = (1..=6).map(|a| e.delay(a)).collect();
        assert_eq!(
            got,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        let l = Backoff::linear(ms(100), ms(50), ms(220));
        let got: Vec<_> = (1..=4).map(|a| l.delay(a)).collect();
        assert_eq!(got, [ms(100), ms(150), ms(200), ms(220)]);
        assert_eq!(Backoff::fixed(ms(7)).delay(9), ms(7));
    }

    #[test]
    fn gives_up_after_max_attempts_and_on_retry_if() {
        let p = Backoff::fixed(Duration::from_millis(1)).max_attempts(3);
        assert!(matches!(
            p.decide(&failure(1)),
            RetryDecision::RetryAfter(_)
        ));
        assert!(matches!(
            p.decide(&failure(2)),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(p.decide(&failure(3)), RetryDecision::GiveUp);
        let p = p.retry_if(|f| f.error != "boom");
        assert_eq!(p.decide(&failure(1)), RetryDecision::GiveUp);
    }

    #[test]
    fn bad_values_are_rejected() {
        let ms = Duration::from_millis;
        assert!(Backoff::default().validate().is_ok());
        assert!(Backoff::default().max_attempts(0).validate().is_err());
        assert!(Backoff::default().multiplier(0.5).validate().is_err());
        assert!(Backoff::default().multiplier(f64::NAN).validate().is_err());
        assert!(Backoff::default().randomization(1.5).validate().is_err());
        assert!(Backoff::exponential(ms(10), ms(1)).validate().is_err());
        assert!(Backoff::linear(ms(10), ms(1), ms(1)).validate().is_err());
    }

    proptest! {
        #[test]
        fn exponential_delay_stays_within_jitter_bounds(
            initial_ms in 1u64..10_000,
            cap_factor in 1u64..100,
            multiplier in 1.0f64..5.0,
            randomization in 0.0f64..=1.0,
            attempt in 1u32..200,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = initial * cap_factor as u32;
            let p = Backoff::exponential(initial, max).multiplier(multiplier).randomization(randomization);
            prop_assert!(p.validate().is_ok());
            let d = p.delay(attempt).as_secs_f64();
            let base = (initial.as_secs_f64() * multiplier.powi(attempt as i32 - 1)).min(max.as_secs_f64());
            prop_assert!(d <= max.as_secs_f64() + 1e-9, "{d} above cap");
            prop_assert!(d >= base * (1.0 - randomization) - 1e-6, "{d} below {base} - jitter");
            prop_assert!(d <= base * (1.0 + randomization) + 1e-6, "{d} above {base} + jitter");
        }
    }
}
