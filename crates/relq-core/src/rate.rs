//! Rate limits: a group's limit, and the token buckets that backends keeping them in process use.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Error};

/// At most `n` messages per `per` for a consumer group, across every consumer of the group: a
/// token bucket holding up to `n` tokens, refilled at `n / per`. A message over the limit waits
/// (it is not fetched, so it burns no attempt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRateLimit")]
pub struct RateLimit {
    n: u32,
    #[serde(with = "millis")]
    per: Duration,
}

/// A rate limit as it travels (the admin socket), checked by [`RateLimit::new`] when read.
#[derive(Deserialize)]
struct RawRateLimit {
    n: u32,
    #[serde(with = "millis")]
    per: Duration,
}

impl TryFrom<RawRateLimit> for RateLimit {
    type Error = String;
    fn try_from(r: RawRateLimit) -> Result<RateLimit, String> {
        RateLimit::new(r.n, r.per).map_err(|e| e.to_string())
    }
}

mod millis {
    use super::*;
    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The longest period of a rate limit: a day.
const MAX_PER: Duration = Duration::from_secs(24 * 3600);

impl RateLimit {
    /// At most `n` messages per `per`.
    ///
    /// # Errors
    /// `n` is zero, or `per` is under a millisecond or over a day.
    pub fn new(n: u32, per: Duration) -> Result<RateLimit, Error> {
        if n == 0 {
            return Err(ConfigError::new(
                "rate_limit",
                "the number of messages must be above zero",
            )
            .into());
        }
        if per < Duration::from_millis(1) || per > MAX_PER {
            return Err(ConfigError::new(
                "rate_limit",
                format!("the period must be from 1ms to 1 day, not {per:?}"),
            )
            .into());
        }
        Ok(RateLimit { n, per })
    }

    /// The messages allowed per period (and the bucket's size).
    pub fn n(&self) -> u32 {
        self.n
    }

    /// The period.
    pub fn per(&self) -> Duration {
        self.per
    }

    /// Tokens added per millisecond.
    pub fn per_ms(&self) -> f64 {
        f64::from(self.n) / (self.per.as_secs_f64() * 1000.0)
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per {
            p if p == Duration::from_secs(1) => write!(f, "{}/s", self.n),
            p if p == Duration::from_secs(60) => write!(f, "{}/m", self.n),
            p if p == Duration::from_secs(3600) => write!(f, "{}/h", self.n),
            p => write!(f, "{}/{}", self.n, humantime::format_duration(p)),
        }
    }
}

/// `"100/s"`, `"5/m"`, `"1000/h"`, or a count over any duration: `"50/10s"`.
impl FromStr for RateLimit {
    type Err = Error;
    fn from_str(s: &str) -> Result<RateLimit, Error> {
        let bad = |why: &str| -> Error {
            ConfigError::new(
                "rate_limit",
                format!(
                    "{:?} is not a rate limit like 100/s, 5/m or 50/10s: {why}",
                    crate::shorten(s)
                ),
            )
            .into()
        };
        let (n, per) = s.split_once('/').ok_or_else(|| bad("no /"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| bad("the count is not a whole number"))?;
        let per = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|e| bad(&e.to_string()))?,
        };
        RateLimit::new(n, per)
    }
}

/// What a request for tokens got: `granted` of those asked for (maybe none), and, when none,
/// how long until one is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Tokens granted.
    pub granted: u32,
    /// With none granted: when to ask again.
    #[serde(with = "millis")]
    pub retry_after: Duration,
}

/// The groups' token buckets, for a backend that keeps them in its process (the in-memory
/// backend, the embedded engine), keyed by topic and group.
#[derive(Debug, Default)]
pub struct TokenBuckets {
    /// By `<topic>/<group>` (names cannot contain `/`): (tokens, time of the last take in ms).
    buckets: HashMap<String, (f64, f64)>,
}

impl TokenBuckets {
    /// [`Backend::take_tokens`](crate::Backend::take_tokens) for `group` of `topic`, at
    /// [`Timestamp::now`](crate::Timestamp::now) (whole milliseconds add up exactly: each take
    /// moves the bucket's time to now).
    pub fn take_now(
        &mut self,
        topic: &str,
        group: &str,
        want: u32,
        give_back: u32,
        limit: RateLimit,
    ) -> Grant {
        let now = crate::Timestamp::now().0 as f64;
        self.take(&format!("{topic}/{group}"), want, give_back, limit, now)
    }

    /// Forgets the bucket of `group` of `topic` (deleted).
    pub fn forget_group(&mut self, topic: &str, group: &str) {
        self.buckets.remove(&format!("{topic}/{group}"));
    }

    /// Forgets every bucket of `topic` (terminated).
    pub fn forget_topic(&mut self, topic: &str) {
        let prefix = format!("{topic}/");
        self.buckets.retain(|k, _| !k.starts_with(&prefix));
    }

    /// Puts back `give_back` unused tokens, then takes up to `want` from bucket `name` under
    /// `limit` at `now_ms`; a new bucket starts full.
    fn take(
        &mut self,
        name: &str,
        want: u32,
        give_back: u32,
        limit: RateLimit,
        now_ms: f64,
    ) -> Grant {
        let cap = f64::from(limit.n());
        let rate = limit.per_ms();
        let (tokens, at) = self.buckets.entry(name.to_owned()).or_insert((cap, now_ms));
        *tokens = (*tokens + f64::from(give_back) + (now_ms - *at).max(0.0) * rate).min(cap);
        *at = now_ms.max(*at);
        let granted = (*tokens).floor().min(f64::from(want)).max(0.0);
        *tokens -= granted;
        // Whole tokens only: `granted` is below u32::MAX (it is at most `want`).
        let granted = granted as u32;
        let retry_after = if granted == 0 {
            Duration::from_secs_f64(((1.0 - *tokens) / rate).max(0.0) / 1000.0)
                .max(Duration::from_millis(1))
        } else {
            Duration::ZERO
        };
        Grant {
            granted,
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_shows_rate_limits() {
        for (text, n, per) in [
            ("100/s", 100, Duration::from_secs(1)),
            ("5/m", 5, Duration::from_secs(60)),
            ("7/h", 7, Duration::from_secs(3600)),
            ("50/10s", 50, Duration::from_secs(10)),
        ] {
            let r: RateLimit = text.parse().unwrap();
            assert_eq!((r.n(), r.per()), (n, per));
            assert_eq!(r.to_string().parse::<RateLimit>().unwrap(), r);
        }
        for bad in ["", "100", "0/s", "x/s", "1/0s", "1/2d", "-1/s", "1/banana"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bucket_grants_its_size_then_its_rate() {
        let limit = RateLimit::new(10, Duration::from_secs(1)).unwrap();
        let mut b = TokenBuckets::default();
        assert_eq!(b.take("g", 4, 0, limit, 0.0).granted, 4);
        assert_eq!(b.take("g", 100, 0, limit, 0.0).granted, 6);
        let none = b.take("g", 1, 0, limit, 0.0);
        assert_eq!(none.granted, 0);
        assert_eq!(none.retry_after, Duration::from_millis(100));
        // 250 ms later: 2.5 tokens, 2 granted.
        assert_eq!(b.take("g", 100, 0, limit, 250.0).granted, 2);
        // Unused tokens put back are taken again (never above the bucket's size).
        assert_eq!(b.take("g", 100, 2, limit, 250.0).granted, 2);
        assert_eq!(b.take("g", 100, 50, limit, 250.0).granted, 10);
        assert_eq!(b.take("g", 100, 0, limit, 250.0).granted, 0);
        // Over 10 s at most 10 + 100 are granted, whatever the asks.
        let mut total = 0;
        let mut t = 250.0;
        while t < 10_250.0 {
            t += 7.0;
            total += b.take("g", 3, 0, limit, t).granted;
        }
        assert!((99..=101).contains(&total), "{total}");
        // Another bucket is full.
        assert_eq!(b.take("h", 100, 0, limit, t).granted, 10);
    }

    #[test]
    fn a_forgotten_group_or_topic_starts_full_again() {
        let limit = RateLimit::new(5, Duration::from_secs(3600)).unwrap();
        let mut b = TokenBuckets::default();
        for (t, g) in [("t", "g"), ("t", "h"), ("t2", "g")] {
            assert_eq!(b.take_now(t, g, 5, 0, limit).granted, 5);
            assert_eq!(b.take_now(t, g, 5, 0, limit).granted, 0);
        }
        b.forget_group("t", "g");
        assert_eq!(b.take_now("t", "g", 5, 0, limit).granted, 5);
        assert_eq!(b.take_now("t", "h", 5, 0, limit).granted, 0);
        b.forget_topic("t");
        assert_eq!(b.take_now("t", "h", 5, 0, limit).granted, 5);
        assert_eq!(
            b.take_now("t2", "g", 5, 0, limit).granted,
            0,
            "another topic keeps its own"
        );
    }
}
