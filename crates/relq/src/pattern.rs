//! Topic patterns (seed 004's `TopicRouter`): which topics a pattern consumer reads and a route
//! forwards from.
//!
//! - A glob over dot-separated segments: `*` stands for exactly one segment, `>` (last only) for
//!   one or more: `orders.*` matches `orders.eu` but not `orders` or `orders.eu.paris`;
//!   `orders.>` matches both of the latter's longer forms. Other segments match themselves.
//! - A regular expression after `re:`, matched against the whole topic name:
//!   `re:orders\.(eu|us)-[0-9]+`.

use std::fmt;
use std::str::FromStr;

use relq_core::{shorten, validate_name, ConfigError, Error};

/// A pattern of topic names; see the module documentation for the syntax.
#[derive(Clone)]
pub struct TopicPattern {
    text: String,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Glob(Vec<Segment>),
    Regex(regex::Regex),
}

#[derive(Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: one segment.
    One,
    /// `>`: one or more segments (last only).
    Rest,
}

/// The most a regex may compile to: a pattern is configuration, not an attack surface, but a
/// typo should not take the process's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl TopicPattern {
    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        match &self.kind {
            Kind::Regex(re) => re.is_match(topic),
            Kind::Glob(segments) => {
                let mut parts = topic.split('.');
                for (i, s) in segments.iter().enumerate() {
                    match s {
                        Segment::Rest => {
                            debug_assert_eq!(i, segments.len() - 1);
                            // One or more segments, none of them empty.
                            let mut any = false;
                            for p in parts.by_ref() {
                                if p.is_empty() {
                                    return false;
                                }
                                any = true;
                            }
                            return any;
                        }
                        Segment::One => {
                            if parts.next().is_none_or(str::is_empty) {
                                return false;
                            }
                        }
                        Segment::Literal(l) => {
                            if parts.next() != Some(l.as_str()) {
                                return false;
                            }
                        }
                    }
                }
                parts.next().is_none()
            }
        }
    }

    /// Whether the pattern has no wildcard: it names one topic.
    pub fn is_literal(&self) -> bool {
        matches!(&self.kind, Kind::Glob(s) if s.iter().all(|s| matches!(s, Segment::Literal(_))))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicPattern({:?})", self.text)
    }
}

impl PartialEq for TopicPattern {
    fn eq(&self, other: &TopicPattern) -> bool {
        self.text == other.text
    }
}

impl Eq for TopicPattern {}

impl FromStr for TopicPattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| -> Error {
            ConfigError::new(
                "topic pattern",
                format!("{:?} is not a topic pattern: {why}", shorten(s)),
            )
            .into()
        };
        if let Some(re) = s.strip_prefix("re:") {
            // Checked alone first: `a)|(b` must not turn the anchors below into part of it.
            regex::RegexBuilder::new(re)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| bad(format!("an invalid regular expression ({e})")))?;
            let re = regex::RegexBuilder::new(&format!("^(?:{re})$"))
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| bad(format!("an invalid regular expression ({e})")))?;
            return Ok(TopicPattern {
                text: s.to_owned(),
                kind: Kind::Regex(re),
            });
        }
        let tokens: Vec<&str> = s.split('.').collect();
        let mut segments = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            segments.push(match *t {
                "*" => Segment::One,
                ">" if i + 1 == tokens.len() => Segment::Rest,
                ">" => return Err(bad("`>` may only be the last segment".into())),
                t if t.contains(['*', '>']) => {
                    return Err(bad(format!(
                        "segment {:?} mixes a wildcard with text: `*` and `>` stand for whole segments (or write a regular expression after `re:`)",
                        shorten(t)
                    )))
                }
                "" => return Err(bad("an empty segment".into())),
                t => Segment::Literal(t.to_owned()),
            });
        }
        // The literal parts follow the rules of topic names (a pattern of literals alone is one).
        let probe: String = tokens
            .iter()
            .map(|t| if matches!(*t, "*" | ">") { "x" } else { t })
            .collect::<Vec<_>>()
            .join(".");
        validate_name("topic", &probe).map_err(|e| bad(e.to_string()))?;
        Ok(TopicPattern {
            text: s.to_owned(),
            kind: Kind::Glob(segments),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        s.parse().unwrap()
    }

    #[test]
    fn globs_match_whole_segments() {
        let one = p("orders.*");
        assert!(one.matches("orders.eu"));
        assert!(!one.matches("orders"));
        assert!(!one.matches("orders.eu.paris"));
        assert!(!one.matches("orders-eu"));
        assert!(!one.matches("audit.eu"));
        let rest = p("orders.>");
        assert!(rest.matches("orders.eu"));
        assert!(rest.matches("orders.eu.paris"));
        assert!(!rest.matches("orders"));
        let mid = p("*.created.*");
        assert!(mid.matches("order.created.eu"));
        assert!(!mid.matches("order.updated.eu"));
        assert!(p(">").matches("anything.at.all"));
        // `>` stands for segments, never empty ones.
        assert!(!rest.matches("orders."));
        assert!(!rest.matches("orders..x"));
        let lit = p("orders.v1_eu-west");
        assert!(lit.is_literal() && lit.matches("orders.v1_eu-west"));
        assert!(!lit.matches("orders.v1_eu"));
        assert!(!one.is_literal());
    }

    #[test]
    fn regexes_match_the_whole_name() {
        let r = p(r"re:orders\.(eu|us)-[0-9]+");
        assert!(r.matches("orders.eu-1"));
        assert!(!r.matches("xorders.eu-1"));
        assert!(!r.matches("orders.eu-1x"));
        assert!(!r.is_literal());
    }

    #[test]
    fn invalid_patterns_say_why() {
        for (bad, says) in [
            ("orders.>.eu", "last segment"),
            ("orders.e*", "whole segments"),
            ("orders..eu", "empty segment"),
            ("", "empty segment"),
            ("orders:eu.*", "topic"),
            ("re:orders(", "regular expression"),
            ("re:(a{1000}){1000}", "regular expression"),
            ("re:a)|(b", "regular expression"),
        ] {
            let e = bad.parse::<TopicPattern>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
