//! Failure analysis: dead letters grouped by an error fingerprint, and what to do about each
//! failure category.
//!
//! The fingerprint of an error is its text with the parts that differ between occurrences of
//! the same failure normalised: numbers, ids, hex strings, UUIDs and quoted values. Grouping by
//! it turns ten thousand dead letters into the handful of distinct failures an operator looks
//! at first during an incident.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use relq_core::Timestamp;
use relq_core::{DeadLetter, DeadLetterId};

/// How many sample ids a [`FailureGroup`] keeps.
const SAMPLES: usize = 5;

/// The error text with the parts that vary between occurrences replaced by placeholders:
/// UUIDs by `<uuid>`, quoted values by `"<v>"` (any quote character), `0x..` and long hex
/// strings (8 or more hex digits mixing digits and letters) by `<hex>`, and every run of
/// digits by `<n>`. Whitespace runs become one space.
///
/// ```
/// assert_eq!(
///     relq::fingerprint("timeout after 30s connecting to 10.0.0.7:5432 for order 'o-77'"),
///     "timeout after <n>s connecting to <n>.<n>.<n>.<n>:<n> for order '<v>'"
/// );
/// ```
pub fn fingerprint(error: &str) -> String {
    let chars: Vec<char> = error.chars().collect();
    let mut out = String::with_capacity(error.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '\'' | '"' | '`') {
            if let Some(end) = chars[i + 1..].iter().position(|&d| d == c) {
                out.push(c);
                out.push_str("<v>");
                out.push(c);
                i += end + 2;
                continue;
            }
        }
        if is_uuid(&chars[i..]) && (i == 0 || !chars[i - 1].is_ascii_alphanumeric()) {
            out.push_str("<uuid>");
            i += 36;
            continue;
        }
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            word(&chars[start..i], &mut out);
            continue;
        }
        if c.is_whitespace() {
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            out.push(' ');
            continue;
        }
        out.push(c);
        i += 1;
    }
    out.trim().to_owned()
}

fn is_uuid(s: &[char]) -> bool {
    s.len() >= 36
        && s[..36].iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == '-',
            _ => c.is_ascii_hexdigit(),
        })
        && s.get(36).is_none_or(|c| !c.is_ascii_alphanumeric())
}

/// One word: `0x..` and hex-looking runs (8 or more hex digits, with both digits and letters)
/// become `<hex>`; otherwise each run of digits becomes `<n>`.
fn word(w: &[char], out: &mut String) {
    let hexish = |s: &[char]| s.iter().all(char::is_ascii_hexdigit);
    if w.len() > 2 && w[0] == '0' && matches!(w[1], 'x' | 'X') && hexish(&w[2..]) {
        out.push_str("<hex>");
        return;
    }
    if w.len() >= 8
        && hexish(w)
        && w.iter().any(char::is_ascii_digit)
        && w.iter().any(char::is_ascii_alphabetic)
    {
        out.push_str("<hex>");
        return;
    }
    let mut i = 0;
    while i < w.len() {
        if w[i].is_ascii_digit() {
            while i < w.len() && w[i].is_ascii_digit() {
                i += 1;
            }
            out.push_str("<n>");
        } else {
            out.push(w[i]);
            i += 1;
        }
    }
}

/// Whether replaying a failure's dead letters is likely to succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplayOutlook {
    /// Likely, once the cause (an outage, an overload) is over.
    Likely,
    /// Only after a fix: to the handler, the data, or the producer.
    AfterFix,
    /// Unlikely: the message itself is the problem; fix or delete it.
    Unlikely,
}

/// What to check for a failure category, and whether a replay is likely to succeed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Suggestion {
    /// What to look at.
    pub check: String,
    /// Whether replaying is likely to succeed.
    pub replay: ReplayOutlook,
}

impl Suggestion {
    /// A suggestion.
    pub fn new(check: impl Into<String>, replay: ReplayOutlook) -> Suggestion {
        Suggestion {
            check: check.into(),
            replay,
        }
    }
}

/// Suggestions by failure category: the built-in ones (`database`, `external_api`,
/// `validation`, `timeout`, `panic`, `no_handler`, `delivery_limit`, `expired`, `permanent`,
/// `retryable`)
/// and those a service registers for its own categories.
#[derive(Clone, Debug)]
pub struct Suggestions {
    by_category: HashMap<String, Suggestion>,
}

impl Default for Suggestions {
    fn default() -> Self {
        use ReplayOutlook::{AfterFix, Likely, Unlikely};
        let built_in = [
            ("database", "Check the database: is it up, reachable, not overloaded (connections, locks, disk)? Look at its logs around the first failure.", Likely),
            ("external_api", "Check the external service: its status page, rate limits, credentials and the responses logged. Replay once it answers again; lower the replay rate if it was rate-limited.", Likely),
            ("validation", "The message failed validation: compare its payload with what the handler expects (schema, version, required fields). Fix the producer or the payload (edit before replaying), or delete it.", Unlikely),
            ("timeout", "The handler ran past its timeout: check what it waits on (slow queries, a remote call without its own timeout) and whether handler_timeout fits the work.", Likely),
            ("panic", "The handler panicked: the error chain holds the panic message (and the backtrace with include_stack_trace). Fix the handler bug, deploy, then replay.", AfterFix),
            ("no_handler", "No handler is registered for the message type: deploy a consumer that handles it (or a fallback), then replay.", AfterFix),
            ("delivery_limit", "Its consumers crashed or hung while holding it, more times than the attempt limit: look for a crash (OOM, segfault) or a hang that this message causes before replaying.", AfterFix),
            ("expired", "Its time to live ended before a consumer handled it: look at why it waited (a backlog, consumers down, retries) and whether the TTL fits. Replay only if it still matters: a replay drops the TTL and is handled.", Unlikely),
            ("permanent", "The handler rejected the message as permanently failing: read the error chain; fix the message or the handler.", Unlikely),
            ("retryable", "Every retry failed: read the error chain and the attempt timeline for the cause; replay once it is fixed.", AfterFix),
        ];
        Suggestions {
            by_category: built_in
                .into_iter()
                .map(|(c, check, replay)| (c.to_owned(), Suggestion::new(check, replay)))
                .collect(),
        }
    }
}

impl Suggestions {
    /// Registers (or replaces) the suggestion for `category`.
    pub fn register(mut self, category: impl Into<String>, suggestion: Suggestion) -> Self {
        self.by_category.insert(category.into(), suggestion);
        self
    }

    /// The suggestion for `category`, if any.
    pub fn get(&self, category: &str) -> Option<&Suggestion> {
        self.by_category.get(category)
    }

    /// The suggestion for a dead letter: its category's, or its reason's.
    pub fn for_dead_letter(&self, dl: &DeadLetter) -> Option<&Suggestion> {
        dl.category
            .as_deref()
            .and_then(|c| self.get(c))
            .or_else(|| self.get(dl.reason.as_str()))
    }
}

/// Dead letters that failed the same way: one error fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FailureGroup {
    /// The normalised error text (see [`fingerprint`]).
    pub fingerprint: String,
    /// One of the original error texts.
    pub example: String,
    /// Dead letters with it.
    pub count: u64,
    /// The earliest first failure among them.
    pub first_seen: Timestamp,
    /// The latest last failure among them.
    pub last_seen: Timestamp,
    /// Counts by message type.
    pub types: BTreeMap<String, u64>,
    /// Counts by handler.
    pub handlers: BTreeMap<String, u64>,
    /// Counts by group.
    pub groups: BTreeMap<String, u64>,
    /// Counts by category (the handler's, or the failure reason when it set none).
    pub categories: BTreeMap<String, u64>,
    /// The first few dead-letter ids.
    pub sample_ids: Vec<DeadLetterId>,
    /// What to check, for the most common category.
    pub suggestion: Option<Suggestion>,
}

/// Groups dead letters by fingerprint, most frequent first.
pub(crate) fn group<'a>(
    dead_letters: impl IntoIterator<Item = &'a DeadLetter>,
    suggestions: &Suggestions,
) -> Vec<FailureGroup> {
    let mut groups: HashMap<String, FailureGroup> = HashMap::new();
    for dl in dead_letters {
        let error = dl.error_chain.join(": ");
        let fp = fingerprint(&error);
        let g = groups.entry(fp.clone()).or_insert_with(|| FailureGroup {
            fingerprint: fp,
            example: error,
            count: 0,
            first_seen: dl.first_failed_at,
            last_seen: dl.last_failed_at,
            types: BTreeMap::new(),
            handlers: BTreeMap::new(),
            groups: BTreeMap::new(),
            categories: BTreeMap::new(),
            sample_ids: Vec::new(),
            suggestion: None,
        });
        g.count += 1;
        g.first_seen = g.first_seen.min(dl.first_failed_at);
        g.last_seen = g.last_seen.max(dl.last_failed_at);
        *g.types.entry(dl.message.kind.clone()).or_default() += 1;
        *g.handlers.entry(dl.handler.clone()).or_default() += 1;
        *g.groups.entry(dl.group.clone()).or_default() += 1;
        let category = dl
            .category
            .clone()
            .unwrap_or_else(|| dl.reason.as_str().to_owned());
        *g.categories.entry(category).or_default() += 1;
        if g.sample_ids.len() < SAMPLES {
            g.sample_ids.push(dl.id);
        }
    }
    let mut out: Vec<FailureGroup> = groups
        .into_values()
        .map(|mut g| {
            g.suggestion = g
                .categories
                .iter()
                .max_by_key(|(c, n)| (**n, std::cmp::Reverse((*c).clone())))
                .and_then(|(c, _)| suggestions.get(c).cloned());
            g
        })
        .collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.fingerprint.cmp(&b.fingerprint))
    });
    out
}

/// Shared by a broker and its clones.
pub(crate) type SharedSuggestions = Arc<Suggestions>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalise_what_varies() {
        let cases = [
            (
                "database: connection refused while saving order 1700000000000-12",
                "database: connection refused while saving order <n>-<n>",
            ),
            (
                "user 550e8400-e29b-41d4-a716-446655440000 not found",
                "user <uuid> not found",
            ),
            ("bad key \"abc\" in `x y`", "bad key \"<v>\" in `<v>`"),
            (
                "ptr 0xdeadBEEF and sha 9f86d081884c7d65",
                "ptr <hex> and sha <hex>",
            ),
            ("user42   failed\ttwice", "user<n> failed twice"),
            ("deadbeef is a word", "deadbeef is a word"),
            ("an 'unclosed quote", "an 'unclosed quote"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(fingerprint(input), want, "{input:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fingerprints_never_panic_and_are_stable(s in "\\PC{0,80}") {
            let f = fingerprint(&s);
            proptest::prop_assert_eq!(fingerprint(&s), f);
        }

        /// The same failure with different numbers has the same fingerprint.
        #[test]
        fn numbers_do_not_split_a_group(a in 0u64.., b in 0u64..) {
            proptest::prop_assert_eq!(
                fingerprint(&format!("order {a} failed after {b} ms")),
                fingerprint(&format!("order {b} failed after {a} ms"))
            );
        }
    }
}
