//! Configuration from a file (TOML or YAML), `RELQ_*` environment variables and flags, with the
//! precedence flags > environment > file > defaults.
//!
//! ```toml
//! [backend]
//! url = "file:///var/lib/relq"
//!
//! [backend.embedded]
//! durability = "sync"          # or "periodic"
//! sync_interval = "100ms"      # with periodic
//!
//! [consumer]
//! concurrency = 16
//! claim_after = "60s"
//!
//! [retry]
//! kind = "exponential"         # fixed | linear
//! initial = "1s"
//! max = "60s"
//! max_attempts = 5
//!
//! [[topics]]                   # per-topic settings, one table per topic
//! name = "notifications"
//! ttl = "10m"                  # messages published without their own expire after this
//! compression = "zstd"         # lz4 | gzip | zstd: payloads of compress_above bytes or more
//! compress_above = 1024        # bytes (the default)
//! dedup_window = "10m"         # how long an idempotency key is remembered (default 2m)
//!
//! [[routes]]                   # run by `relq route`: forward matching topics into others
//! name = "audit"
//! from = "orders.>"            # orders.* (one segment), orders.> (one or more), re:REGEX
//! to = ["audit-log"]
//! ```
//!
//! Every key has a default. An unknown key, a value of the wrong type or out of range is an
//! error naming the file, line, key and what is allowed; nothing is silently ignored. The
//! environment variable of a key is `RELQ_` and its path in upper case joined by `_`
//! (`RELQ_CONSUMER_CONCURRENCY`, `RELQ_BACKEND_REDIS_RETRY_FOR`); `RELQ_URL` sets
//! `backend.url` too.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::retry::Backoff;
use relq_core::{ConfigError, Error};
#[cfg(feature = "embedded")]
use relq_embedded::{Durability, EmbeddedConfig};

/// Durations in configuration: `"30s"`, `"5m"`, `"1h 30m"`, `"250ms"`.
mod duration {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"250ms\", \"30s\", \"5m\", \"1h\""
            ))
        })
    }
}

/// The whole configuration. Every field has a default; see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Config {
    /// Which backend, and its options.
    pub backend: BackendSection,
    /// Defaults of every consumer built from the broker (a builder call still overrides them).
    pub consumer: ConsumerSection,
    /// The default retry policy of consumers.
    pub retry: RetrySection,
    /// Dead letters.
    pub dead_letters: DeadLetterSection,
    /// `relq serve`: the HTTP admin API and metrics.
    pub server: ServerSection,
    /// Per-topic settings (`[[topics]]`).
    pub topics: Vec<TopicSection>,
    /// Routes (`[[routes]]`), run by `relq route`.
    pub routes: Vec<RouteSection>,
}

/// `[[routes]]`: a route forwarding every message of the topics matching `from` into each of
/// `to` (see `Broker::route`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouteSection {
    /// The route's name (its consumer group is `route.<name>`).
    pub name: String,
    /// A topic pattern: `orders.*`, `orders.>`, or a regular expression after `re:`.
    pub from: String,
    /// The target topics.
    pub to: Vec<String>,
}

/// `[[topics]]`: one topic's settings, applied by every broker built from the configuration.
/// Each table sets at least one of `ttl`, `compression` and `dedup_window`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TopicSection {
    /// The topic.
    pub name: String,
    /// The time to live of messages published on the topic without their own (`"10m"`): a
    /// consumer does not handle an expired message (see `consumer.on_expired`).
    #[serde(
        with = "opt_duration",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// Compress payloads of at least `compress_above` bytes: `"lz4"`, `"gzip"` or `"zstd"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::Compression>,
    /// The smallest payload compressed, in bytes (with `compression` only). Default 1024:
    /// smaller payloads gain little.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_above: Option<usize>,
    /// How long the topic remembers an idempotency key (`"10m"`; default 2 minutes, at most
    /// 30 days): a publish with a key stored within it stores nothing and returns the first
    /// message's id.
    #[serde(
        with = "opt_duration",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dedup_window: Option<Duration>,
}

/// `compress_above` when a topic does not set it.
pub(crate) const DEFAULT_COMPRESS_ABOVE: usize = 1024;

/// Optional durations in configuration (absent: `None`).
mod opt_duration {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration::deserialize(d).map(Some)
    }
}

/// `[backend]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct BackendSection {
    /// `file:///path` (the embedded engine), `memory://`, `redis://host:port`,
    /// `redis+cluster://host:port,host:port`. Default `file://relq-data`.
    pub url: String,
    /// Options of the embedded engine.
    pub embedded: EmbeddedSection,
    /// Options of the Redis backend.
    pub redis: RedisSection,
}

impl Default for BackendSection {
    fn default() -> Self {
        BackendSection {
            url: "file://relq-data".into(),
            embedded: EmbeddedSection::default(),
            redis: RedisSection::default(),
        }
    }
}

/// Durability of the embedded engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DurabilityKind {
    /// Fsynced before every call returns (survives power loss).
    Sync,
    /// Synced every `sync_interval` (survives a process crash).
    Periodic,
}

/// `[backend.embedded]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct EmbeddedSection {
    /// `sync` (default) or `periodic`.
    pub durability: DurabilityKind,
    /// With `periodic`: how often. Default 100 ms.
    #[serde(with = "duration")]
    pub sync_interval: Duration,
    /// Size of a log segment file, bytes. Default 64 MiB.
    pub segment_size: u64,
    /// Scheduled messages due within this window stay in memory. Default 30 s.
    #[serde(with = "duration")]
    pub resident_window: Duration,
}

impl Default for EmbeddedSection {
    fn default() -> Self {
        // The engine's own defaults (a test checks they agree); written out so the section
        // parses in a build without the engine.
        EmbeddedSection {
            durability: DurabilityKind::Sync,
            sync_interval: Duration::from_millis(100),
            segment_size: 64 << 20,
            resident_window: Duration::from_secs(30),
        }
    }
}

/// `[backend.redis]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RedisSection {
    /// How long one command may take. Default 5 s.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// How long failing calls are retried. Default 30 s.
    #[serde(with = "duration")]
    pub retry_for: Duration,
    /// Connect even when `maxmemory-policy` can evict queue data. Default false.
    pub allow_eviction: bool,
    /// A PEM file of root certificates to trust for `rediss://`.
    pub tls_root_cert: Option<std::path::PathBuf>,
    /// Idle consumers holding nothing are removed after this long. Default 1 h.
    #[serde(with = "duration")]
    pub consumer_expiry: Duration,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            response_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            allow_eviction: false,
            tls_root_cert: None,
            consumer_expiry: Duration::from_secs(3600),
        }
    }
}

/// `[consumer]`: defaults of consumers built from the broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ConsumerSection {
    /// Messages handled at once. Default 16.
    pub concurrency: usize,
    /// Most messages per backend read. Default 64.
    pub read_batch: usize,
    /// Messages another consumer held this long are claimed. Default 60 s.
    #[serde(with = "duration")]
    pub claim_after: Duration,
    /// A handler running longer is cancelled. Default 30 s.
    #[serde(with = "duration")]
    pub handler_timeout: Duration,
    /// How long one read waits for new messages. Default 1 s.
    #[serde(with = "duration")]
    pub poll_wait: Duration,
    /// What becomes of a message whose time to live ended before it was handled:
    /// `"dead_letter"` (default; reason `expired`) or `"drop"`.
    pub on_expired: crate::OnExpired,
    /// What a failed message with an ordering key does with its key while it waits for its
    /// retry: `"hold"` (default; the key's later messages wait) or `"skip_ahead"`.
    pub key_retries: crate::KeyRetries,
}

impl Default for ConsumerSection {
    fn default() -> Self {
        ConsumerSection {
            concurrency: 16,
            read_batch: 64,
            claim_after: Duration::from_secs(60),
            handler_timeout: Duration::from_secs(30),
            poll_wait: Duration::from_secs(1),
            on_expired: crate::OnExpired::DeadLetter,
            key_retries: crate::KeyRetries::Hold,
        }
    }
}

/// The shape of retry delays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RetryKind {
    /// `initial * multiplier^(n-1)`, capped at `max`, randomized by `jitter`.
    Exponential,
    /// Always `initial`.
    Fixed,
    /// `initial + (n-1) * increment`, capped at `max`.
    Linear,
}

/// `[retry]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RetrySection {
    /// `exponential` (default), `fixed` or `linear`.
    pub kind: RetryKind,
    /// The first delay. Default 1 s.
    #[serde(with = "duration")]
    pub initial: Duration,
    /// The longest delay. Default 60 s.
    #[serde(with = "duration")]
    pub max: Duration,
    /// With `linear`: added per attempt. Default 1 s.
    #[serde(with = "duration")]
    pub increment: Duration,
    /// With `exponential`: the growth factor, >= 1. Default 2.
    pub multiplier: f64,
    /// With `exponential`: each delay is randomized by +/- this fraction, 0 to 1. Default 0.1.
    pub jitter: f64,
    /// Deliveries before a message is dead-lettered, >= 1. Default 5.
    pub max_attempts: u32,
}

impl Default for RetrySection {
    fn default() -> Self {
        RetrySection {
            kind: RetryKind::Exponential,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            increment: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.1,
            max_attempts: 5,
        }
    }
}

impl RetrySection {
    /// The policy these settings describe.
    pub fn backoff(&self) -> Backoff {
        let b = match self.kind {
            RetryKind::Exponential => Backoff::exponential(self.initial, self.max)
                .multiplier(self.multiplier)
                .randomization(self.jitter),
            RetryKind::Fixed => Backoff::fixed(self.initial),
            RetryKind::Linear => Backoff::linear(self.initial, self.increment, self.max),
        };
        b.max_attempts(self.max_attempts)
    }
}

/// `[dead_letters]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct DeadLetterSection {
    /// Dead letters older than this are purged by periodic cleanup. Default 30 days.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Capture a backtrace where a handler creates an error, into the dead letter. Default
    /// false.
    pub include_stack_trace: bool,
    /// Also publish every dead letter as a JSON failure record on `<topic><topic_suffix>`
    /// (seed 000's `failed_message.enabled`). Default false.
    pub forward: bool,
    /// The failure topic's suffix. Default `_failed_channel`.
    pub topic_suffix: String,
    /// How often a forward is tried (seed 000's `max_retry_attempts`). Default 3.
    pub forward_attempts: u32,
    /// How long apart (seed 000's `retry_delay`). Default 1 s.
    #[serde(with = "duration")]
    pub forward_retry_delay: Duration,
}

impl Default for DeadLetterSection {
    fn default() -> Self {
        DeadLetterSection {
            retention: crate::broker::DEFAULT_DEAD_LETTER_RETENTION,
            include_stack_trace: false,
            forward: false,
            topic_suffix: "_failed_channel".into(),
            forward_attempts: 3,
            forward_retry_delay: Duration::from_secs(1),
        }
    }
}

/// `[server]`: `relq serve`, the HTTP admin API, console and metrics endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ServerSection {
    /// The address to listen on. Default `127.0.0.1:8080` (loopback). A non-loopback address
    /// needs at least one token.
    pub bind: String,
    /// Bearer tokens and their roles (`[[server.tokens]]`). None: the API is unauthenticated
    /// (loopback only). `RELQ_ADMIN_TOKEN` adds one admin token named `env`.
    pub tokens: Vec<TokenEntry>,
    /// PEM certificate chain for HTTPS (with `tls_key`). Default none: plain HTTP.
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for HTTPS.
    pub tls_key: Option<std::path::PathBuf>,
    /// Origins allowed to call the API from a browser on another origin. Default none (no CORS).
    pub cors_origins: Vec<String>,
    /// The largest request body accepted, in bytes. Default 4 MiB.
    pub max_body_bytes: u64,
    /// A Prometheus server (`http://host:port`) that scrapes the consumers' `/metrics`: the
    /// console asks it for the p99 publish-to-handled latency. Default none (no latency chart).
    pub prometheus_url: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            bind: "127.0.0.1:8080".into(),
            tokens: Vec::new(),
            tls_cert: None,
            tls_key: None,
            cors_origins: Vec::new(),
            max_body_bytes: 4 << 20,
            prometheus_url: None,
        }
    }
}

/// One bearer token of `relq serve`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenEntry {
    /// Who holds it: recorded in the audit log with every action taken with it.
    pub name: String,
    /// The secret (at least 16 characters).
    pub token: String,
    /// What it may do.
    pub role: TokenRole,
}

impl TokenEntry {
    /// A token.
    pub fn new(name: impl Into<String>, token: impl Into<String>, role: TokenRole) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            token: token.into(),
            role,
        }
    }
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TokenRole {
    /// Read everything; change nothing.
    Read,
    /// Read and operate: replay, delete, stop, resume, terminate, cleanup, publish.
    Admin,
}

/// Where an effective value came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
#[non_exhaustive]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The configuration file (its path).
    File(String),
    /// An environment variable (its name).
    Env(String),
    /// A command-line flag (its name).
    Flag(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "file {p}"),
            Origin::Env(v) => write!(f, "environment {v}"),
            Origin::Flag(n) => write!(f, "flag {n}"),
        }
    }
}

/// A configuration with the origin of every value: built with [`Layers`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Resolved {
    /// The effective configuration.
    pub config: Config,
    /// Each key (`consumer.concurrency`) and where its value came from.
    pub origins: BTreeMap<String, Origin>,
}

/// Builds a [`Config`] from layers: defaults, then a file, then the environment, then flags.
#[derive(Debug)]
pub struct Layers {
    value: Value,
    origins: BTreeMap<String, Origin>,
}

fn config_error(field: &'static str, reason: impl Into<String>) -> Error {
    ConfigError::new(field, reason).into()
}

/// Every leaf of `v` as (dotted path, value).
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&path, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

fn set(root: &mut Value, path: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            if let Value::Object(m) = cur {
                m.insert((*p).to_owned(), v);
            }
            return;
        }
        let Value::Object(m) = cur else { return };
        cur = m
            .entry((*p).to_owned())
            .or_insert_with(|| Value::Object(Default::default()));
    }
}

impl Default for Layers {
    fn default() -> Self {
        Layers::new()
    }
}

impl Layers {
    /// The defaults.
    pub fn new() -> Layers {
        let value = serde_json::to_value(Config::default()).unwrap_or(Value::Null);
        let mut all = Vec::new();
        leaves("", &value, &mut all);
        Layers {
            origins: all.into_iter().map(|(k, _)| (k, Origin::Default)).collect(),
            value,
        }
    }

    fn apply(&mut self, layer: &Value, origin: &Origin) {
        let mut all = Vec::new();
        leaves("", layer, &mut all);
        for (path, v) in all {
            set(&mut self.value, &path, v);
            self.origins.insert(path, origin.clone());
        }
    }

    /// Applies a configuration file: TOML, or YAML for `.yaml`/`.yml`.
    ///
    /// # Errors
    /// The file cannot be read, or holds an unknown key or an invalid value: the error names
    /// the file, the line and the key.
    pub fn file(mut self, path: impl AsRef<Path>) -> Result<Layers, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            config_error(
                "config file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let value = parse(&text, yaml)
            .map_err(|e| config_error("config file", format!("{}: {e}", path.display())))?;
        self.apply(&value, &Origin::File(path.display().to_string()));
        Ok(self)
    }

    /// Applies `RELQ_*` variables from `vars` (pass `std::env::vars()`): each key's variable is
    /// `RELQ_` and its path in upper case joined by `_`; `RELQ_URL` sets `backend.url`. A
    /// variable that starts with a section's prefix (`RELQ_CONSUMER_`, `RELQ_RETRY_`,
    /// `RELQ_BACKEND_`, `RELQ_DEAD_LETTERS_`) but names no key is an error (a typo would
    /// otherwise be ignored).
    ///
    /// # Errors
    /// An unknown variable in a section, or a value of the wrong type.
    pub fn env(
        mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Layers, Error> {
        let by_var: BTreeMap<String, String> = self
            .origins
            .keys()
            .map(|k| {
                (
                    format!("RELQ_{}", k.replace('.', "_").to_uppercase()),
                    k.clone(),
                )
            })
            .collect();
        let sections = [
            "RELQ_CONSUMER_",
            "RELQ_RETRY_",
            "RELQ_BACKEND_",
            "RELQ_DEAD_LETTERS_",
            "RELQ_SERVER_",
        ];
        let mut vars: Vec<(String, String)> = vars.into_iter().collect();
        vars.sort();
        for (var, raw) in vars {
            let key = match by_var.get(&var) {
                Some(k) => k.clone(),
                None if var == "RELQ_URL" => "backend.url".to_owned(),
                None if sections.iter().any(|s| var.starts_with(s)) => {
                    return Err(config_error(
                        "environment",
                        format!("{var} names no configuration key; `relq config show` lists them"),
                    ));
                }
                None => continue,
            };
            self.set_text(&key, &raw, Origin::Env(var))?;
        }
        Ok(self)
    }

    /// Sets `key` (`consumer.concurrency`) from a flag's text.
    ///
    /// # Errors
    /// An unknown key or a value of the wrong type.
    pub fn flag(mut self, key: &str, text: &str, flag: &str) -> Result<Layers, Error> {
        self.set_text(key, text, Origin::Flag(flag.to_owned()))?;
        Ok(self)
    }

    fn set_text(&mut self, key: &str, raw: &str, origin: Origin) -> Result<(), Error> {
        if !self.origins.contains_key(key) {
            return Err(config_error(
                "config",
                format!(
                    "{origin}: {key:?} is not a configuration key; `relq config show` lists them"
                ),
            ));
        }
        let mut all = Vec::new();
        leaves("", &self.value, &mut all);
        let current = all
            .into_iter()
            .find(|(k, _)| k == key)
            .map_or(Value::Null, |(_, v)| v);
        let v = match current {
            Value::Number(_) | Value::Bool(_) => {
                serde_json::from_str(raw.trim()).map_err(|_| {
                    let what = if current.is_boolean() {
                        "boolean (true or false)"
                    } else {
                        "number"
                    };
                    config_error(
                        "config",
                        format!("{origin}: {key} = {raw:?} is not a {what}"),
                    )
                })?
            }
            _ => Value::String(raw.to_owned()),
        };
        set(&mut self.value, key, v);
        self.origins.insert(key.to_owned(), origin);
        Ok(())
    }

    /// The first value set by a file, the environment or a flag that does not deserialize on
    /// its own, with its key and origin: for an error that says which key is wrong.
    fn blame(&self) -> Option<String> {
        let defaults = serde_json::to_value(Config::default()).ok()?;
        let mut all = Vec::new();
        leaves("", &self.value, &mut all);
        for (key, v) in all {
            let origin = self.origins.get(&key)?;
            if *origin == Origin::Default {
                continue;
            }
            let mut one = defaults.clone();
            set(&mut one, &key, v.clone());
            if let Err(e) = serde_json::from_value::<Config>(one) {
                return Some(format!("{key} = {v} (from {origin}): {e}"));
            }
        }
        None
    }

    /// The effective configuration, validated.
    ///
    /// # Errors
    /// A value of the wrong type or out of range, naming the key and where it came from.
    pub fn resolve(self) -> Result<Resolved, Error> {
        let config: Config = serde_json::from_value(self.value.clone()).map_err(|e| {
            let why = self
                .blame()
                .unwrap_or_else(|| format!("{e} (sources: {})", self.describe_sources()));
            config_error("config", why)
        })?;
        config.validate().map_err(|e| match e {
            Error::Config(c) => {
                let origin = self
                    .origins
                    .get(c.field())
                    .map_or_else(String::new, |o| format!(" (from {o})"));
                config_error(c.field(), format!("{}{origin}", c.reason()))
            }
            other => other,
        })?;
        Ok(Resolved {
            config,
            origins: self.origins,
        })
    }

    fn describe_sources(&self) -> String {
        let mut s: Vec<String> = self
            .origins
            .values()
            .filter(|o| **o != Origin::Default)
            .map(ToString::to_string)
            .collect();
        s.sort();
        s.dedup();
        if s.is_empty() {
            "defaults".into()
        } else {
            s.join(", ")
        }
    }
}

/// Parses a file's text and checks it against [`Config`] (unknown keys, types), keeping the
/// parser's line numbers in errors. Returns the file's own keys as a value tree.
fn parse(text: &str, yaml: bool) -> Result<Value, String> {
    if yaml {
        let _: Config = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
        let v: Value = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
        // An empty YAML document is null: no keys.
        Ok(if v.is_null() {
            Value::Object(Default::default())
        } else {
            v
        })
    } else {
        let _: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let v: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        serde_json::to_value(v).map_err(|e| e.to_string())
    }
}

impl Config {
    /// Loads `path` (TOML, or YAML for `.yaml`/`.yml`) over the defaults, then the `RELQ_*`
    /// environment.
    ///
    /// # Errors
    /// See [`Layers::file`], [`Layers::env`] and [`Layers::resolve`].
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        let mut layers = Layers::new();
        if let Some(p) = path {
            layers = layers.file(p)?;
        }
        Ok(layers.env(std::env::vars())?.resolve()?.config)
    }

    /// Checks ranges and combinations.
    ///
    /// # Errors
    /// The first value out of range, as a [`ConfigError`] naming its key.
    pub fn validate(&self) -> Result<(), Error> {
        let c = &self.consumer;
        if c.concurrency == 0 {
            return Err(config_error("consumer.concurrency", "must be at least 1"));
        }
        if c.read_batch == 0 {
            return Err(config_error("consumer.read_batch", "must be at least 1"));
        }
        if c.handler_timeout.is_zero() {
            return Err(config_error(
                "consumer.handler_timeout",
                "must be above zero",
            ));
        }
        if c.claim_after <= c.handler_timeout {
            return Err(config_error(
                "consumer.claim_after",
                format!(
                    "must exceed consumer.handler_timeout ({}), or a slow handler's message is claimed while it still runs",
                    humantime::format_duration(c.handler_timeout)
                ),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &self.topics {
            relq_core::validate_name("topic", &t.name)
                .map_err(|e| config_error("topics.name", e.to_string()))?;
            if !names.insert(t.name.as_str()) {
                return Err(config_error(
                    "topics.name",
                    format!("topic {:?} is listed twice", t.name),
                ));
            }
            if t.ttl.is_none() && t.compression.is_none() && t.dedup_window.is_none() {
                return Err(config_error(
                    "topics",
                    format!(
                        "topic {:?} sets nothing: give it a ttl, a compression or a dedup_window",
                        t.name
                    ),
                ));
            }
            if t.compress_above.is_some() && t.compression.is_none() {
                return Err(config_error(
                    "topics.compress_above",
                    format!("topic {:?} sets compress_above without compression", t.name),
                ));
            }
            if t.dedup_window
                .is_some_and(|w| w.is_zero() || w > relq_core::MAX_DEDUP_WINDOW)
            {
                return Err(config_error(
                    "topics.dedup_window",
                    format!(
                        "must be above zero and at most 30 days (topic {:?})",
                        t.name
                    ),
                ));
            }
            if t.ttl.is_some_and(|ttl| ttl.is_zero()) {
                return Err(config_error(
                    "topics.ttl",
                    format!(
                        "must be above zero (topic {:?}): every message would expire at once",
                        t.name
                    ),
                ));
            }
        }
        let mut route_names = std::collections::BTreeSet::new();
        for r in &self.routes {
            if !route_names.insert(r.name.as_str()) {
                return Err(config_error(
                    "routes.name",
                    format!("route {:?} is listed twice", r.name),
                ));
            }
            let targets: Vec<&str> = r.to.iter().map(String::as_str).collect();
            crate::route::check(&r.name, &r.from, &targets)
                .map_err(|e| config_error("routes", e.to_string()))?;
        }
        self.retry.backoff().validate().map_err(|e| {
            let field = match e.field() {
                "retry.randomization" => "retry.jitter",
                "retry.initial_delay" => "retry.initial",
                other => other,
            };
            config_error(field, e.reason())
        })?;
        if self.backend.embedded.segment_size < 4096 {
            return Err(config_error(
                "backend.embedded.segment_size",
                "must be at least 4096 bytes",
            ));
        }
        if self.backend.embedded.durability == DurabilityKind::Periodic
            && self.backend.embedded.sync_interval.is_zero()
        {
            return Err(config_error(
                "backend.embedded.sync_interval",
                "must be above zero with durability = \"periodic\"",
            ));
        }
        if self.backend.redis.response_timeout.is_zero() {
            return Err(config_error(
                "backend.redis.response_timeout",
                "must be above zero",
            ));
        }
        for (i, t) in self.server.tokens.iter().enumerate() {
            if t.name.is_empty() {
                return Err(config_error(
                    "server.tokens",
                    format!("token {} has an empty name", i + 1),
                ));
            }
            if t.token.len() < 16 {
                return Err(config_error(
                    "server.tokens",
                    format!("the token of {:?} is shorter than 16 characters", t.name),
                ));
            }
            if self.server.tokens[..i]
                .iter()
                .any(|o| o.token == t.token || o.name == t.name)
            {
                return Err(config_error(
                    "server.tokens",
                    format!("{:?} repeats another token's name or secret", t.name),
                ));
            }
        }
        if self.dead_letters.forward_attempts == 0 {
            return Err(config_error(
                "dead_letters.forward_attempts",
                "must be at least 1",
            ));
        }
        if self.dead_letters.forward && self.dead_letters.topic_suffix.is_empty() {
            return Err(config_error(
                "dead_letters.topic_suffix",
                "must not be empty when dead_letters.forward is on",
            ));
        }
        if !self
            .dead_letters
            .topic_suffix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(config_error(
                "dead_letters.topic_suffix",
                "only letters, digits, '_', '-' and '.' are allowed (it becomes part of a topic name)",
            ));
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err(config_error(
                "server.tls_cert",
                "HTTPS needs both server.tls_cert and server.tls_key",
            ));
        }
        if let Some(u) = &self.server.prometheus_url {
            if let Err(e) = check_http_url(u) {
                return Err(config_error("server.prometheus_url", e));
            }
        }
        if self.server.max_body_bytes < 1024 {
            return Err(config_error(
                "server.max_body_bytes",
                "must be at least 1024",
            ));
        }
        if !self.backend.url.contains("://") {
            return Err(config_error(
                "backend.url",
                format!(
                    "{:?} is not a URL: expected file:///path, memory://, redis://host:port or redis+cluster://host:port,host:port",
                    self.backend.url
                ),
            ));
        }
        Ok(())
    }

    /// The embedded engine's configuration.
    #[cfg(feature = "embedded")]
    pub fn embedded(&self) -> EmbeddedConfig {
        let e = &self.backend.embedded;
        let durability = match e.durability {
            DurabilityKind::Sync => Durability::Sync,
            DurabilityKind::Periodic => Durability::Periodic(e.sync_interval),
        };
        EmbeddedConfig::default()
            .durability(durability)
            .segment_size(e.segment_size)
            .resident_window(e.resident_window)
    }

    /// The Redis backend's configuration.
    ///
    /// # Errors
    /// The TLS root certificate file cannot be read.
    #[cfg(feature = "redis")]
    pub fn redis(&self) -> Result<relq_redis::RedisConfig, Error> {
        let r = &self.backend.redis;
        let mut c = relq_redis::RedisConfig::default()
            .response_timeout(r.response_timeout)
            .retry_for(r.retry_for)
            .allow_eviction(r.allow_eviction)
            .consumer_expiry(r.consumer_expiry);
        if let Some(p) = &r.tls_root_cert {
            let pem = std::fs::read(p).map_err(|e| {
                config_error(
                    "backend.redis.tls_root_cert",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            c = c.tls_root_cert(pem);
        }
        Ok(c)
    }
}

/// Checks a plain `http://host[:port][/path]` address (what `server.prometheus_url` takes): no
/// user, query, fragment, spaces or escapes; an IPv6 host in brackets; a port from 1 to 65535.
fn check_http_url(u: &str) -> Result<(), String> {
    let Some(rest) = u.strip_prefix("http://") else {
        return Err(format!(
            "{u:?} is not an http:// address (e.g. http://127.0.0.1:9090; https is not supported)"
        ));
    };
    if rest.contains(['?', '#', '%', '@']) || rest.chars().any(char::is_whitespace) {
        return Err(format!(
            "{u:?}: give only http://host:port and an optional path (no user, query, fragment, spaces or escapes)"
        ));
    }
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) if !h.is_empty() => (h, p.strip_prefix(':')),
            _ => {
                return Err(format!(
                    "{u:?}: an IPv6 host goes in brackets, e.g. http://[::1]:9090"
                ))
            }
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) if !p.contains(':') => (h, Some(p)),
            Some(_) => {
                return Err(format!(
                    "{u:?}: an IPv6 host goes in brackets, e.g. http://[::1]:9090"
                ))
            }
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{u:?} names no host (e.g. http://127.0.0.1:9090)"));
    }
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!(
                "{u:?} has a port that is not a number from 1 to 65535"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "relq-config-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[cfg(feature = "embedded")]
    #[test]
    fn the_embedded_section_defaults_are_the_engines() {
        let (section, engine) = (EmbeddedSection::default(), EmbeddedConfig::default());
        assert_eq!(section.segment_size, engine.segment_size);
        assert_eq!(section.resident_window, engine.resident_window);
    }

    #[test]
    fn precedence_is_flags_then_env_then_file_then_defaults() {
        let p = write(
            "relq.toml",
            "[consumer]\nconcurrency = 4\nread_batch = 8\n[retry]\nmax_attempts = 9\n",
        );
        let env = [
            ("RELQ_CONSUMER_READ_BATCH".to_owned(), "32".to_owned()),
            ("RELQ_RETRY_MAX_ATTEMPTS".to_owned(), "7".to_owned()),
            ("RELQ_LOG".to_owned(), "debug".to_owned()),
        ];
        let r = Layers::new()
            .file(&p)
            .unwrap()
            .env(env)
            .unwrap()
            .flag("retry.max_attempts", "3", "--max-attempts")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(r.config.consumer.concurrency, 4);
        assert_eq!(r.config.consumer.read_batch, 32);
        assert_eq!(r.config.retry.max_attempts, 3);
        assert_eq!(r.config.consumer.claim_after, Duration::from_secs(60));
        assert_eq!(
            r.origins["consumer.concurrency"],
            Origin::File(p.display().to_string())
        );
        assert_eq!(
            r.origins["consumer.read_batch"],
            Origin::Env("RELQ_CONSUMER_READ_BATCH".into())
        );
        assert_eq!(
            r.origins["retry.max_attempts"],
            Origin::Flag("--max-attempts".into())
        );
        assert_eq!(r.origins["consumer.poll_wait"], Origin::Default);
    }

    #[test]
    fn prometheus_url_is_a_plain_http_address() {
        let env = |v: &str| {
            Layers::new()
                .env([("RELQ_SERVER_PROMETHEUS_URL".to_owned(), v.to_owned())])
                .unwrap()
                .resolve()
        };
        let c = env("http://127.0.0.1:9090").unwrap().config;
        assert_eq!(
            c.server.prometheus_url.as_deref(),
            Some("http://127.0.0.1:9090")
        );
        assert!(env("http://[::1]:9090/prom").is_ok());
        assert!(env("http://prom.internal/base").is_ok());
        for bad in [
            "https://prom:9090",
            "127.0.0.1:9090",
            "http://",
            "http://u:p@prom:9090",
            "http://prom:90x",
            "http://prom:0",
            "http://:9090",
            "http://::1",
            "http://[]:9090",
            "http://prom:9090/base?x=1",
            "http://prom:9090/a b",
            "http://prom:9090/#x",
        ] {
            let e = env(bad).unwrap_err().to_string();
            assert!(e.contains("server.prometheus_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn routes_are_read_and_checked() {
        let p = write(
            "relq.toml",
            "[[routes]]\nname = \"audit\"\nfrom = \"orders.>\"\nto = [\"audit-log\", \"archive\"]\n",
        );
        let r = Layers::new().file(&p).unwrap().resolve().unwrap();
        r.config.validate().unwrap();
        assert_eq!(r.config.routes[0].name, "audit");
        assert_eq!(r.config.routes[0].to, ["audit-log", "archive"]);
        for (text, want) in [
            ("[[routes]]\nname = \"a\"\nfrom = \"x.>.y\"\nto = [\"t\"]\n", "last segment"),
            ("[[routes]]\nname = \"a\"\nfrom = \"x.>\"\nto = [\"x.y\"]\n", "go round"),
            ("[[routes]]\nname = \"a\"\nfrom = \"x.>\"\nto = []\n", "no target"),
            (
                "[[routes]]\nname = \"a\"\nfrom = \"x.>\"\nto = [\"t\"]\n[[routes]]\nname = \"a\"\nfrom = \"y.>\"\nto = [\"t\"]\n",
                "listed twice",
            ),
            ("[[routes]]\nname = \"a\"\nfrom = \"x.>\"\n", "to"),
        ] {
            let p = write("bad.toml", text);
            let e = Layers::new()
                .file(&p)
                .and_then(Layers::resolve)
                .map(|r| r.config)
                .and_then(|c| c.validate().map(|()| c))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn topic_compression_is_read() {
        let p = write(
            "relq.toml",
            "[[topics]]\nname = \"events\"\ncompression = \"zstd\"\ncompress_above = 256\n[[topics]]\nname = \"logs\"\ncompression = \"lz4\"\nttl = \"1h\"\n",
        );
        let r = Layers::new().file(&p).unwrap().resolve().unwrap();
        r.config.validate().unwrap();
        let got: Vec<_> = r
            .config
            .topics
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.compression,
                    t.compress_above.unwrap_or(DEFAULT_COMPRESS_ABOVE),
                    t.ttl,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("events", Some(crate::Compression::Zstd), 256, None),
                (
                    "logs",
                    Some(crate::Compression::Lz4),
                    1024,
                    Some(Duration::from_secs(3600))
                )
            ]
        );
    }

    #[test]
    fn topics_and_on_expired_are_read_and_checked() {
        let p = write(
            "relq.toml",
            "[consumer]\non_expired = \"drop\"\n[[topics]]\nname = \"notifications\"\nttl = \"10m\"\n[[topics]]\nname = \"orders.v2\"\nttl = \"1h\"\n",
        );
        let r = Layers::new().file(&p).unwrap().resolve().unwrap();
        assert_eq!(r.config.consumer.on_expired, crate::OnExpired::Drop);
        assert_eq!(r.config.consumer.key_retries, crate::KeyRetries::Hold);
        let env = [(
            "RELQ_CONSUMER_KEY_RETRIES".to_owned(),
            "skip_ahead".to_owned(),
        )];
        let skip = Layers::new().env(env).unwrap().resolve().unwrap();
        assert_eq!(
            skip.config.consumer.key_retries,
            crate::KeyRetries::SkipAhead
        );
        let ttls: Vec<(&str, Duration)> = r
            .config
            .topics
            .iter()
            .filter_map(|t| Some((t.name.as_str(), t.ttl?)))
            .collect();
        assert_eq!(
            ttls,
            [
                ("notifications", Duration::from_secs(600)),
                ("orders.v2", Duration::from_secs(3600))
            ]
        );
        let env = [(
            "RELQ_CONSUMER_ON_EXPIRED".to_owned(),
            "dead_letter".to_owned(),
        )];
        let r = Layers::new().env(env).unwrap().resolve().unwrap();
        assert_eq!(r.config.consumer.on_expired, crate::OnExpired::DeadLetter);
        for (text, want) in [
            ("[consumer]\non_expired = \"later\"\n", "on_expired"),
            ("[consumer]\nkey_retries = \"skip\"\n", "key_retries"),
            ("[[topics]]\nname = \"t\"\nttl = \"0s\"\n", "topics.ttl"),
            (
                "[[topics]]\nname = \"t\"\ndedup_window = \"0s\"\n",
                "topics.dedup_window",
            ),
            (
                "[[topics]]\nname = \"t\"\ndedup_window = \"31d\"\n",
                "topics.dedup_window",
            ),
            (
                "[[topics]]\nname = \"t\"\nttl = \"1s\"\n[[topics]]\nname = \"t\"\nttl = \"2s\"\n",
                "listed twice",
            ),
            (
                "[[topics]]\nname = \"bad name\"\nttl = \"1s\"\n",
                "topics.name",
            ),
            ("[[topics]]\nname = \"t\"\n", "ttl"),
            (
                "[[topics]]\nname = \"t\"\ncompression = \"brotli\"\n",
                "none of lz4, gzip, zstd",
            ),
            (
                "[[topics]]\nname = \"t\"\ncompression = \"lz4\"\ncompress_above = -1\n",
                "compress_above",
            ),
            (
                "[[topics]]\nname = \"t\"\nttl = \"1s\"\ncompress_above = 10\n",
                "without compression",
            ),
            (
                "[[topics]]\nname = \"t\"\nttl = \"1s\"\nretention = \"1d\"\n",
                "retention",
            ),
        ] {
            let p = write("bad.toml", text);
            let e = Layers::new()
                .file(&p)
                .and_then(Layers::resolve)
                .map(|r| r.config)
                .and_then(|c| c.validate().map(|()| c))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn yaml_files_work_like_toml() {
        let p = write(
            "relq.yaml",
            "backend:\n  url: memory://\n  embedded:\n    durability: periodic\n    sync_interval: 50ms\nretry:\n  kind: fixed\n  initial: 2s\n",
        );
        let c = Layers::new().file(&p).unwrap().resolve().unwrap().config;
        assert_eq!(c.backend.url, "memory://");
        assert_eq!(c.backend.embedded.durability, DurabilityKind::Periodic);
        assert_eq!(c.retry.kind, RetryKind::Fixed);
        assert_eq!(c.retry.backoff().delay(3), Duration::from_secs(2));
    }

    #[test]
    fn mistakes_name_the_file_line_and_key() {
        let cases = [
            (
                "a.toml",
                "[consumer]\nconcurrency = 4\nconcurency = 5\n",
                &["a.toml", "line 3", "concurency"][..],
            ),
            (
                "b.toml",
                "[consumer]\nclaim_after = \"soon\"\n",
                &["line 2", "not a duration"],
            ),
            (
                "c.toml",
                "[retry]\nkind = \"random\"\n",
                &["line 2", "exponential"],
            ),
            (
                "d.yaml",
                "consumer:\n  concurrency: many\n",
                &["d.yaml", "line 2"],
            ),
            (
                "e.toml",
                "[consumer]\nconcurrency = 0\n",
                &["consumer.concurrency", "at least 1", "e.toml"],
            ),
            (
                "f.toml",
                "[consumer]\nhandler_timeout = \"2m\"\n",
                &["consumer.claim_after", "must exceed"],
            ),
            (
                "g.toml",
                "[retry]\njitter = 3.0\n",
                &["retry.jitter", "between 0 and 1"],
            ),
            ("h.toml", "nonsense", &["h.toml"]),
        ];
        for (name, text, want) in cases {
            let p = write(name, text);
            let e = Layers::new()
                .file(&p)
                .and_then(Layers::resolve)
                .expect_err(name)
                .to_string();
            for w in want {
                assert!(e.contains(w), "{name}: {e:?} lacks {w:?}");
            }
        }
        let e = Layers::new()
            .env([("RELQ_CONSUMER_CONCURENCY".to_owned(), "3".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RELQ_CONSUMER_CONCURENCY"), "{e}");
        let e = Layers::new()
            .env([("RELQ_CONSUMER_CONCURRENCY".to_owned(), "lots".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number"), "{e}");
    }

    proptest::proptest! {
        /// Any text, as TOML or YAML: a configuration or an error, never a panic.
        #[test]
        fn the_parsers_never_panic(text in "\\PC{0,200}", yaml in proptest::prelude::any::<bool>()) {
            if let Ok(v) = parse(&text, yaml) {
                let mut l = Layers::new();
                l.apply(&v, &Origin::Default);
                let _ = l.resolve();
            }
        }

        /// Key-shaped text in TOML, including near misses of real keys.
        #[test]
        fn key_value_lines_never_panic(
            section in "(consumer|retry|backend|backend\\.redis|backend\\.embedded|dead_letters|x)",
            key in "[a-z_]{1,20}",
            value in "(\"[a-z0-9 ]{0,10}\"|-?[0-9]{1,25}|true|[0-9]\\.[0-9]+e[0-9]{1,4}|\\[\\])",
        ) {
            let text = format!("[{section}]\n{key} = {value}\n");
            if let Ok(v) = parse(&text, false) {
                let mut l = Layers::new();
                l.apply(&v, &Origin::Default);
                let _ = l.resolve();
            }
        }
    }
}

#[cfg(test)]
mod doc_tests {
    /// docs/operations.md documents every configuration key.
    #[test]
    fn operations_md_lists_every_configuration_key() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md"),
        )
        .unwrap();
        let value = serde_json::to_value(super::Config::default()).unwrap();
        let mut keys = Vec::new();
        super::leaves("", &value, &mut keys);
        for (key, _) in keys {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "docs/operations.md lacks a row for {key}"
            );
        }
    }
}
