//! Rate limits (seed 004's 限流): a group's consumers together take no more messages than its
//! limit allows, and a message over the limit waits without burning an attempt.

use relq::RateLimit;

use super::*;

/// Two consumers of a group limited to 10 per 200 ms handle a backlog of 40: every message is
/// handled on its first attempt, and at no time have more been handled than the bucket (10)
/// plus the rate times the time since the first; the run takes at least the time the rate
/// needs for the messages beyond the bucket.
pub async fn a_rate_limited_group_stays_within_its_limit(b: Broker) {
    let topic = unique("rate");
    let limit = RateLimit::new(10, ms(200)).unwrap();
    publish_n(&b, &topic, 40).await;
    let log = Log::default();
    let start = |name: &str| {
        b.consumer(&topic, "g")
            .name(name)
            .start(StartPosition::Earliest)
            .rate_limit(limit)
            .handler("job", ok_handler(&log))
            .build()
            .unwrap()
            .start()
    };
    let started = Timestamp::now();
    let c1 = start("c1").await.unwrap();
    let c2 = start("c2").await.unwrap();
    wait_until("40 handled", LONG, || async { log.len() >= 40 }).await;
    c1.shutdown(LONG).await;
    c2.shutdown(LONG).await;
    let seen = log.all();
    assert_eq!(seen.len(), 40, "each handled once");
    assert!(
        seen.iter().all(|s| s.attempt == 1),
        "waiting burned no attempt"
    );
    let mut times: Vec<u64> = seen.iter().map(|s| s.at.0).collect();
    times.sort_unstable();
    // Tokens per ms: 10 / 200. The bucket starts full. (Redis counts by its own clock: 1
    // token of slack.)
    for (i, t) in times.iter().enumerate() {
        let allowed = 10.0 + (t.saturating_sub(started.0)) as f64 / 20.0 + 1.0;
        assert!(
            (i + 1) as f64 <= allowed,
            "{} handled {} ms after the start, the limit allows {allowed:.1}",
            i + 1,
            t - started.0
        );
    }
    assert!(
        times[39] - started.0 >= 30 * 20 - 20,
        "30 messages beyond the bucket need 600 ms at the limit, took {} ms",
        times[39] - started.0
    );
}

/// A slow limit (one message per 300 ms) on a consumer that looks for stuck messages every
/// 100 ms: a look that finds nothing hands its token back, so the messages still flow at the
/// limit instead of every token going to empty looks.
pub async fn a_slow_rate_limit_is_not_spent_on_fetches_that_find_nothing(b: Broker) {
    let topic = unique("rate-slow");
    let limit = RateLimit::new(1, ms(300)).unwrap();
    publish_n(&b, &topic, 5).await;
    let log = Log::default();
    let c = b
        .consumer(&topic, "g")
        .start(StartPosition::Earliest)
        .rate_limit(limit)
        .claim_after(ms(200))
        .handler_timeout(ms(100))
        .handler("job", ok_handler(&log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // At the limit, 4 messages beyond the bucket take 1.2 s; ten times that is starvation.
    wait_until(
        "5 handled at the limit",
        Duration::from_secs(12),
        || async { log.len() >= 5 },
    )
    .await;
    c.shutdown(LONG).await;
    assert_eq!(log.len(), 5);
}
