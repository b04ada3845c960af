//! Filters (seed 004's `HeaderFilter`, `ContentFilter`): which messages a group handles. A
//! message that does not pass every filter of the group is acknowledged for that group without
//! running a handler, and counted (`ConsumerStats::filtered`, `relq_filtered_total`): other
//! groups still get it, and it is never confused with a lost one. The seed's filtered queue drops
//! a message at send, for every reader; here the decision is the group's, at delivery.
//!
//! Written as text (the CLI's `--filter`, [`Filter::from_str`]), one condition each:
//!
//! | text | passes when |
//! |---|---|
//! | `type:GLOB` | the message type matches (`*` any run of characters, `?` one) |
//! | `header:NAME` | the header exists |
//! | `header:NAME=VALUE` | the header equals VALUE |
//! | `header:NAME~GLOB` | the header matches GLOB |
//! | `payload~REGEX` | the payload (as text) contains a match of REGEX |
//! | `json:POINTER` | the payload is JSON and has a value at POINTER (`/order/status`; an empty pointer is the whole document: the payload is JSON) |
//! | `json:POINTER=JSON` | that value equals JSON (`json:/status="paid"`, `json:/count=3`) |
//! | `json:POINTER>NUMBER`, `json:POINTER<NUMBER` | that value is a number above / below (integers compared exactly) |
//! | `!FILTER` | FILTER does not pass |

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use relq_core::{shorten, ConfigError, Error, Message};

/// A condition a message must meet for a group to handle it; see the module documentation.
#[derive(Clone)]
pub struct Filter {
    text: Arc<str>,
    test: Test,
}

#[derive(Clone)]
enum Test {
    Kind(Glob),
    HeaderExists(String),
    HeaderEquals(String, String),
    HeaderGlob(String, Glob),
    Payload(regex::Regex),
    Json(String, JsonTest),
    Not(Box<Test>),
}

#[derive(Clone)]
enum JsonTest {
    Exists,
    Equals(serde_json::Value),
    Above(serde_json::Number),
    Below(serde_json::Number),
}

/// Two JSON values equal, numbers by value (`3` equals `3.0`).
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            num_cmp(x, y) == Some(std::cmp::Ordering::Equal)
        }
        _ => a == b,
    }
}

/// A JSON value against a number: `None` when it is not a number.
fn compare(v: &serde_json::Value, n: &serde_json::Number) -> Option<std::cmp::Ordering> {
    v.as_number().and_then(|x| num_cmp(x, n))
}

/// Numbers compared exactly when both are integers (no loss above 2^53), else as floats.
fn num_cmp(a: &serde_json::Number, b: &serde_json::Number) -> Option<std::cmp::Ordering> {
    let int = |n: &serde_json::Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// `*` any run of characters, `?` one character, the rest literal.
#[derive(Clone)]
struct Glob(Vec<char>);

impl Glob {
    fn matches(&self, s: &str) -> bool {
        let text: Vec<char> = s.chars().collect();
        let pat = &self.0;
        // Iterative wildcard matching with one backtrack point: linear in practice, never
        // exponential.
        let (mut p, mut t) = (0, 0);
        let (mut star, mut mark) = (None, 0);
        while t < text.len() {
            // `*` first: a `*` in the text is not the pattern's wildcard matched literally.
            if p < pat.len() && pat[p] == '*' {
                star = Some(p);
                mark = t;
                p += 1;
            } else if p < pat.len() && (pat[p] == '?' || pat[p] == text[t]) {
                p += 1;
                t += 1;
            } else if let Some(sp) = star {
                p = sp + 1;
                mark += 1;
                t = mark;
            } else {
                return false;
            }
        }
        pat[p..].iter().all(|&c| c == '*')
    }
}

/// The largest regex a filter may compile to.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// The longest payload a payload or JSON filter reads: beyond it the filter does not pass (so
/// under `!` it does; a filter is a routing decision, not a reason to parse megabytes per
/// message).
const MAX_FILTERED_PAYLOAD: usize = 1 << 20;

impl Filter {
    /// Whether `m` passes. A payload filter reads the payload as the handler would see it
    /// (`m` decompressed).
    pub fn passes(&self, m: &Message) -> bool {
        self.test.passes(m)
    }

    /// Whether it reads the payload (and so needs it decompressed).
    pub(crate) fn reads_payload(&self) -> bool {
        self.test.reads_payload()
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Test {
    fn reads_payload(&self) -> bool {
        match self {
            Test::Payload(_) | Test::Json(..) => true,
            Test::Not(t) => t.reads_payload(),
            _ => false,
        }
    }

    fn passes(&self, m: &Message) -> bool {
        match self {
            Test::Kind(g) => g.matches(&m.kind),
            Test::HeaderExists(h) => m.headers.contains_key(h),
            Test::HeaderEquals(h, v) => m.header(h) == Some(v.as_str()),
            Test::HeaderGlob(h, g) => m.header(h).is_some_and(|v| g.matches(v)),
            Test::Payload(re) => {
                m.payload.len() <= MAX_FILTERED_PAYLOAD
                    && re.is_match(&String::from_utf8_lossy(&m.payload))
            }
            Test::Json(pointer, test) => {
                if m.payload.len() > MAX_FILTERED_PAYLOAD {
                    return false;
                }
                let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                    return false;
                };
                let Some(v) = doc.pointer(pointer) else {
                    return false;
                };
                match test {
                    JsonTest::Exists => true,
                    JsonTest::Equals(want) => json_eq(v, want),
                    JsonTest::Above(n) => compare(v, n) == Some(std::cmp::Ordering::Greater),
                    JsonTest::Below(n) => compare(v, n) == Some(std::cmp::Ordering::Less),
                }
            }
            Test::Not(t) => !t.passes(m),
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({:?})", &*self.text)
    }
}

impl FromStr for Filter {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Filter {
            text: Arc::from(s),
            test: parse(s).map_err(|why| -> Error {
                ConfigError::new("filter", format!("{:?} is not a filter: {why}", shorten(s)))
                    .into()
            })?,
        })
    }
}

fn parse(s: &str) -> Result<Test, String> {
    if let Some(rest) = s.strip_prefix('!') {
        return Ok(Test::Not(Box::new(parse(rest)?)));
    }
    if let Some(g) = s.strip_prefix("type:") {
        return nonempty(g, "type").map(|g| Test::Kind(Glob(g.chars().collect())));
    }
    if let Some(h) = s.strip_prefix("header:") {
        // The first `=` or `~` ends the name (names cannot hold either): the value or glob
        // after it may.
        return Ok(match h.find(['=', '~']) {
            Some(at) => {
                let name = nonempty(&h[..at], "header name")?.to_owned();
                let rest = &h[at + 1..];
                if h[at..].starts_with('=') {
                    Test::HeaderEquals(name, rest.to_owned())
                } else {
                    Test::HeaderGlob(name, Glob(rest.chars().collect()))
                }
            }
            None => Test::HeaderExists(nonempty(h, "header name")?.to_owned()),
        });
    }
    if let Some(re) = s.strip_prefix("payload~") {
        return regex::RegexBuilder::new(re)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(Test::Payload)
            .map_err(|e| format!("an invalid regular expression ({e})"));
    }
    if let Some(j) = s.strip_prefix("json:") {
        let at = j.find(['=', '>', '<']).unwrap_or(j.len());
        let pointer = &j[..at];
        if !(pointer.is_empty() || pointer.starts_with('/')) {
            return Err("a JSON pointer starts with `/` (`json:/order/status=\"paid\"`)".into());
        }
        let test = match j[at..].chars().next() {
            None => JsonTest::Exists,
            Some('=') => JsonTest::Equals(serde_json::from_str(&j[at + 1..]).map_err(|e| {
                format!("the value after `=` is not JSON ({e}): write strings in quotes")
            })?),
            Some(op) => {
                let n: serde_json::Number = j[at + 1..]
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{op}` needs a finite number"))?;
                if op == '>' {
                    JsonTest::Above(n)
                } else {
                    JsonTest::Below(n)
                }
            }
        };
        return Ok(Test::Json(pointer.to_owned(), test));
    }
    Err("write type:GLOB, header:NAME[=VALUE|~GLOB], payload~REGEX, json:POINTER[=JSON|>N|<N], or ! before one".into())
}

fn nonempty<'a>(s: &'a str, what: &str) -> Result<&'a str, String> {
    if s.is_empty() {
        Err(format!("an empty {what}"))
    } else {
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relq_core::{MessageId, Outgoing, Timestamp};

    fn msg(kind: &str, payload: &str, headers: &[(&str, &str)]) -> Message {
        let out = Outgoing {
            kind: kind.into(),
            payload: payload.to_owned().into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            deliver_at: None,
            dedup_window: None,
        };
        Message::new(MessageId::new(1, 0), out, Timestamp(1), 1)
    }

    fn f(s: &str) -> Filter {
        s.parse().unwrap()
    }

    #[test]
    fn each_condition_passes_and_fails() {
        let m = msg(
            "order.created",
            r#"{"order":{"status":"paid","amount":120.5},"tags":["a"]}"#,
            &[("tenant", "acme"), ("region", "eu-west-1")],
        );
        for (filter, passes) in [
            ("type:order.*", true),
            ("type:order.paid", false),
            ("type:*", true),
            ("type:order.creat?d", true),
            ("header:tenant", true),
            ("header:missing", false),
            ("header:tenant=acme", true),
            ("header:tenant=other", false),
            ("header:region~eu-*", true),
            ("header:region~us-*", false),
            ("payload~\"status\":\"paid\"", true),
            ("payload~refunded", false),
            ("json:/order/status", true),
            ("json:/order/missing", false),
            ("json:/order/status=\"paid\"", true),
            ("json:/order/status=\"open\"", false),
            ("json:/order/amount>100", true),
            ("json:/order/amount<100", false),
            ("json:/order/status>1", false),
            ("json:/tags=[\"a\"]", true),
            ("!header:tenant=acme", false),
            ("!type:audit.*", true),
            ("!!header:tenant", true),
        ] {
            assert_eq!(f(filter).passes(&m), passes, "{filter}");
        }
        // Globs with a `*` in the text, `=` in a glob, big integers, `3` against `3.0`.
        let m2 = msg(
            "x",
            r#"{"id":9007199254740993,"n":3.0}"#,
            &[("accept", "*/*"), ("auth", "k==")],
        );
        for (filter, passes) in [
            ("header:accept~*/*", true),
            ("header:accept~a*", false),
            ("header:auth~*==", true),
            ("header:auth=k==", true),
            ("json:/id>9007199254740992", true),
            ("json:/id<9007199254740993", false),
            ("json:/n=3", true),
            ("json:/n>2.5", true),
        ] {
            assert_eq!(f(filter).passes(&m2), passes, "{filter}");
        }
        // A payload that is not JSON fails every JSON condition, `!` turns that round.
        let text = msg("x", "not json", &[]);
        assert!(!f("json:/a").passes(&text));
        assert!(f("!json:/a").passes(&text));
        assert!(f("payload~^not").passes(&text));
        assert!(f("payload~^not").reads_payload() && !f("header:a").reads_payload());
    }

    #[test]
    fn bad_filters_say_why() {
        for (bad, says) in [
            ("tenant=acme", "write type:GLOB"),
            ("type:", "empty type"),
            ("header:=x", "empty header name"),
            ("payload~(", "regular expression"),
            ("json:order=1", "starts with `/`"),
            ("json:/a=paid", "not JSON"),
            ("json:/a>x", "needs a finite number"),
            ("json:/a>inf", "finite"),
            ("!", "write type:GLOB"),
        ] {
            let e = bad.parse::<Filter>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn globs_never_backtrack_exponentially() {
        let g = Glob("*a*a*a*a*a*a*a*a*a*b".chars().collect());
        let s = "a".repeat(10_000);
        assert!(!g.matches(&s));
        assert!(Glob("a*".chars().collect()).matches("a"));
        assert!(Glob("a*".chars().collect()).matches("a*x"));
        assert!(Glob("*b".chars().collect()).matches("*ab"));
        assert!(Glob("a*b".chars().collect()).matches("aXbYb"));
        assert!(!Glob("a*b".chars().collect()).matches("aXbYc"));
        assert!(Glob("*".chars().collect()).matches(""));
        assert!(!Glob("?".chars().collect()).matches(""));
    }
}
