//! The conformance tests, one file per behaviour. Each test is a `pub async fn NAME(b: Broker)`
//! taking a fresh broker; `build.rs` lists them for [`conformance_suite!`](crate::conformance_suite),
//! so a new test runs on every backend without being listed by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relq::{
    Backoff, BatchConfig, Broker, Browse, DeadLetterQuery, Delivery, Error, FailureKind,
    HandlerError, Message, MessageId, NewMessage, Retention, Settlement, StartPosition, StopReason,
    Timestamp,
};

use crate::wait_until;

const LONG: Duration = Duration::from_secs(60);
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What a recording handler saw.
#[derive(Clone, Debug)]
struct Seen {
    id: MessageId,
    attempt: u32,
    at: Timestamp,
    payload: String,
    headers: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn record(&self, m: &Message) {
        self.0.lock().unwrap().push(Seen {
            id: m.id,
            attempt: m.attempt,
            at: Timestamp::now(),
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            headers: m.headers.clone(),
        });
    }
    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn payloads(&self) -> BTreeSet<String> {
        self.all().into_iter().map(|s| s.payload).collect()
    }
}

/// A handler that records and succeeds.
fn ok_handler(
    log: &Log,
) -> impl Fn(Message) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static {
    let log = log.clone();
    move |m: Message| {
        log.record(&m);
        std::future::ready(Ok(()))
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

async fn publish_n(b: &Broker, topic: &str, n: usize) -> Vec<MessageId> {
    let msgs = (0..n)
        .map(|i| NewMessage::new("job", format!("m{i}")))
        .collect();
    b.publish_batch(topic, msgs).await.expect("publish")
}

/// The oldest dead letter of `topic`.
async fn first_dead_letter(b: &Broker, topic: &str) -> relq::DeadLetter {
    b.dead_letters(topic)
        .list(&DeadLetterQuery::all())
        .await
        .expect("list dead letters")
        .into_iter()
        .next()
        .expect("a dead letter")
}

async fn dead_count(b: &Broker, topic: &str) -> u64 {
    b.dead_letters(topic)
        .count(&DeadLetterQuery::all())
        .await
        .expect("count")
}

mod codecs;
mod dead_letters;
mod dedup;
mod delivery;
mod expiry;
mod filters;
mod input;
mod model;
mod operations;
mod ordering;
mod priority;
mod rate;
mod recovery;
mod retries;
mod routing;

pub use codecs::*;
pub use dead_letters::*;
pub use dedup::*;
pub use delivery::*;
pub use expiry::*;
pub use filters::*;
pub use input::*;
pub use model::*;
pub use operations::*;
pub use ordering::*;
pub use priority::*;
pub use rate::*;
pub use recovery::*;
pub use retries::*;
pub use routing::*;
