//! `relq dlq ...`: list, show, export, replay, delete, purge and count dead letters.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use relq::{Broker, DeadLetter, DeadLetterQuery, FailureKind, MessageId, Timestamp};
use serde_json::json;

use crate::{audit, dead_letter_json, exit, print_out, shutdown_signal, Exit};

#[derive(Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters (oldest first), one page.
    List {
        topic: String,
        /// Page size.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Continue after this dead-letter id.
        #[arg(long)]
        after: Option<MessageId>,
        #[command(flatten)]
        filter: Filter,
    },
    /// Show one dead letter in full, with the suggestion for its failure category.
    Show { topic: String, id: MessageId },
    /// Group matching dead letters by error fingerprint (the error text with numbers, ids,
    /// hex, UUIDs and quoted values normalised): counts, first and last seen, types, handlers,
    /// sample ids, and what to check. Start here during an incident.
    Groups {
        topic: String,
        #[command(flatten)]
        filter: Filter,
    },
    /// Write every matching dead letter as JSON lines or CSV (to stdout or --output).
    Export {
        topic: String,
        #[command(flatten)]
        filter: Filter,
        /// jsonl (one dead letter per line, as `dlq show --json` prints it) or csv.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Replay dead letters to their topic: by id, every one (--all), or those matching filters.
    /// Each becomes a new message for the group that gave up on it. Interrupted (SIGINT), it
    /// stops between batches; run it again to replay the rest.
    Replay {
        topic: String,
        /// Dead-letter ids.
        #[arg(conflicts_with_all = ["all", "type", "reason", "category", "group", "handler", "since", "until"])]
        ids: Vec<MessageId>,
        /// Every dead letter of the topic.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: Filter,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many replays per second.
        #[arg(long)]
        rate: Option<u32>,
    },
    /// Delete dead letters by id.
    Delete {
        topic: String,
        /// Dead-letter ids.
        #[arg(required = true)]
        ids: Vec<MessageId>,
    },
    /// Delete dead letters older than an age (default 30 days).
    Purge {
        topic: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
        older_than: Duration,
        /// Only count what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Counts by reason, type and category.
    Stats { topic: String },
}

/// Which dead letters a command applies to.
#[derive(Args, Clone, Default)]
pub(crate) struct Filter {
    /// Only this message type.
    #[arg(long = "type", id = "type")]
    kind: Option<String>,
    /// Only this reason (retryable, permanent, panic, timeout, no_handler, delivery_limit, expired).
    #[arg(long)]
    reason: Option<FailureKind>,
    /// Only this error category.
    #[arg(long)]
    category: Option<String>,
    /// Only dead letters of this group.
    #[arg(long)]
    group: Option<String>,
    /// Only dead letters of this handler (a message type, or "fallback").
    #[arg(long)]
    handler: Option<String>,
    /// Only those whose last failure is at or after this time (RFC 3339, e.g.
    /// 2026-12-01T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    since: Option<Timestamp>,
    /// Only those whose last failure is before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<Timestamp>,
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| format!("{e} (expected RFC 3339)"))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "before 1970".to_owned())?
        .as_millis();
    Ok(Timestamp(u64::try_from(ms).unwrap_or(u64::MAX)))
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.kind.is_none()
            && self.reason.is_none()
            && self.category.is_none()
            && self.group.is_none()
            && self.handler.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    fn query(&self) -> DeadLetterQuery {
        let mut q = DeadLetterQuery::all();
        if let Some(k) = &self.kind {
            q = q.kind(k);
        }
        if let Some(r) = self.reason {
            q = q.reason(r);
        }
        if let Some(c) = &self.category {
            q = q.category(c);
        }
        if let Some(g) = &self.group {
            q = q.group(g);
        }
        if let Some(h) = &self.handler {
            q = q.handler(h);
        }
        if self.since.is_some() || self.until.is_some() {
            q = q.between(self.since, self.until);
        }
        q
    }
}

fn summary(d: &DeadLetter) -> String {
    format!(
        "{} msg={} type={} group={} reason={} category={} attempts={} error={}",
        d.id,
        d.message.id,
        d.message.kind,
        d.group,
        d.reason.as_str(),
        d.category.as_deref().unwrap_or("-"),
        d.attempts,
        d.error_chain.join(": ")
    )
}

/// Every dead letter matching `query`, page by page, passed to `each`.
async fn for_each(
    broker: &Broker,
    topic: &str,
    query: DeadLetterQuery,
    mut each: impl FnMut(&DeadLetter) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dls = broker.dead_letters(topic);
    let mut q = query.limit(500);
    loop {
        let page = dls.list(&q).await?;
        for d in &page {
            each(d)?;
        }
        match page.last() {
            Some(last) if page.len() == 500 => q = q.after(last.id),
            _ => return Ok(()),
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

const CSV_HEADER: &str = "id,message_id,type,topic,group,consumer,handler,reason,category,attempts,first_failed_at,last_failed_at,error,payload,payload_encoding";

fn csv_row(d: &DeadLetter) -> String {
    let (payload, encoding) = match std::str::from_utf8(&d.message.payload) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (
            d.message
                .payload
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            "hex",
        ),
    };
    [
        d.id.to_string(),
        d.message.id.to_string(),
        d.message.kind.clone(),
        d.topic.clone(),
        d.group.clone(),
        d.consumer.clone(),
        d.handler.clone(),
        d.reason.as_str().to_owned(),
        d.category.clone().unwrap_or_default(),
        d.attempts.to_string(),
        d.first_failed_at.to_string(),
        d.last_failed_at.to_string(),
        d.error_chain.join(": "),
        payload,
        encoding.to_owned(),
    ]
    .iter()
    .map(|f| csv_field(f))
    .collect::<Vec<_>>()
    .join(",")
}

pub(crate) async fn run(
    broker: &Broker,
    command: DlqCommand,
    json_out: bool,
) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            topic,
            limit,
            after,
            filter,
        } => {
            let mut q = filter.query().limit(limit);
            if let Some(a) = after {
                q = q.after(a);
            }
            let page = broker.dead_letters(&topic).list(&q).await?;
            let next = (page.len() == limit)
                .then(|| page.last().map(|d| d.id))
                .flatten();
            print_out(
                json_out,
                json!({ "items": page.iter().map(dead_letter_json).collect::<Vec<_>>(), "next": next }),
                || {
                    let mut out: Vec<String> = page.iter().map(summary).collect();
                    if let Some(n) = next {
                        out.push(format!("(more: --after {n})"));
                    }
                    if out.is_empty() {
                        "no dead letters".to_owned()
                    } else {
                        out.join("\n")
                    }
                },
            );
        }
        DlqCommand::Show { topic, id } => {
            let dls = broker.dead_letters(&topic);
            let d = dls.get(id).await?;
            let mut v = dead_letter_json(&d);
            v["suggestion"] = serde_json::to_value(dls.suggestion(&d))?;
            print_out(json_out, v.clone(), || {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            });
        }
        DlqCommand::Groups { topic, filter } => {
            let groups = broker
                .dead_letters(&topic)
                .failure_groups(&filter.query())
                .await?;
            print_out(json_out, serde_json::to_value(&groups)?, || {
                if groups.is_empty() {
                    return "no dead letters".to_owned();
                }
                let mut out = String::new();
                for g in &groups {
                    let counts = |m: &BTreeMap<String, u64>| {
                        m.iter()
                            .map(|(k, n)| format!("{k} {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    out += &format!(
                        "{} x {}\n  first {}  last {}\n  types: {}\n  handlers: {}\n  groups: {}\n  categories: {}\n  e.g. {}\n",
                        g.count,
                        g.fingerprint,
                        g.first_seen,
                        g.last_seen,
                        counts(&g.types),
                        counts(&g.handlers),
                        counts(&g.groups),
                        counts(&g.categories),
                        g.sample_ids
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                    if let Some(s) = &g.suggestion {
                        let outlook = match s.replay {
                            relq::ReplayOutlook::Likely => {
                                "replay likely to succeed once the cause is over"
                            }
                            relq::ReplayOutlook::AfterFix => "replay after a fix",
                            relq::ReplayOutlook::Unlikely => "replay unlikely to help",
                            _ => "",
                        };
                        out += &format!("  suggestion: {} ({outlook})\n", s.check);
                    }
                    out.push('\n');
                }
                out.trim_end().to_owned()
            });
        }
        DlqCommand::Export {
            topic,
            filter,
            format,
            output,
        } => {
            let mut out: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let csv = format == "csv";
            if csv {
                writeln!(out, "{CSV_HEADER}")?;
            }
            let mut n = 0u64;
            for_each(broker, &topic, filter.query(), |d| {
                if csv {
                    writeln!(out, "{}", csv_row(d))?;
                } else {
                    writeln!(out, "{}", dead_letter_json(d))?;
                }
                n += 1;
                Ok(())
            })
            .await?;
            out.flush()?;
            drop(out);
            if let Some(path) = output {
                print_out(
                    json_out,
                    json!({ "exported": n, "file": path.display().to_string() }),
                    || format!("exported {n} dead letters to {}", path.display()),
                );
            }
        }
        DlqCommand::Replay {
            topic,
            ids,
            all,
            filter,
            dry_run,
            rate,
        } => replay(broker, &topic, ids, all, filter, dry_run, rate, json_out).await?,
        DlqCommand::Delete { topic, ids } => {
            let r = broker.dead_letters(&topic).delete(&ids).await;
            let params = json!({ "ids": ids.iter().map(ToString::to_string).collect::<Vec<_>>() });
            audit(broker, "delete", &topic, params, &r, |n| {
                format!("deleted {n}")
            })
            .await;
            let n = r?;
            print_out(json_out, json!({ "deleted": n }), || {
                format!("deleted {n} dead letters")
            });
        }
        DlqCommand::Purge {
            topic,
            older_than,
            dry_run: true,
        } => {
            let before = relq::Timestamp::now().minus(older_than);
            let n = broker
                .dead_letters(&topic)
                .count(&DeadLetterQuery::all().between(None, Some(before)))
                .await?;
            print_out(
                json_out,
                json!({ "would_purge": n, "dry_run": true }),
                || {
                    format!(
                        "dry run: {n} dead letters last failed before {before} and would be purged"
                    )
                },
            );
        }
        DlqCommand::Purge {
            topic, older_than, ..
        } => {
            let r = broker
                .dead_letters(&topic)
                .purge_older_than(older_than)
                .await;
            let params =
                json!({ "older_than": humantime::format_duration(older_than).to_string() });
            audit(broker, "purge", &topic, params, &r, |n| {
                format!("purged {n}")
            })
            .await;
            let n = r?;
            print_out(json_out, json!({ "purged": n }), || {
                format!("purged {n} dead letters")
            });
        }
        DlqCommand::Stats { topic } => {
            let s = broker.dead_letters(&topic).stats().await?;
            let v = serde_json::to_value(&s)?;
            print_out(json_out, v.clone(), || {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            });
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn replay(
    broker: &Broker,
    topic: &str,
    ids: Vec<MessageId>,
    all: bool,
    filter: Filter,
    dry_run: bool,
    rate: Option<u32>,
    json_out: bool,
) -> anyhow::Result<()> {
    if ids.is_empty() && !all && filter.is_empty() {
        return Err(exit(
            Exit::USAGE,
            "give dead-letter ids, --all, or a filter (--type, --reason, --category, --group, --since, --until)",
        ));
    }
    if rate == Some(0) {
        return Err(exit(Exit::USAGE, "--rate must be at least 1 per second"));
    }
    let dls = broker.dead_letters(topic);
    // What to replay, decided before anything changes: by id, or every match of the filter now.
    let mut chosen: Vec<DeadLetter> = Vec::new();
    if ids.is_empty() {
        for_each(broker, topic, filter.query(), |d| {
            chosen.push(d.clone());
            Ok(())
        })
        .await?;
    } else {
        for id in &ids {
            chosen.push(dls.get(*id).await?);
        }
    }
    if dry_run {
        print_out(
            json_out,
            json!({ "dry_run": true, "would_replay": chosen.len(),
                    "items": chosen.iter().map(dead_letter_json).collect::<Vec<_>>() }),
            || {
                let mut out: Vec<String> = chosen.iter().map(summary).collect();
                out.push(format!(
                    "dry run: would replay {} dead letters; nothing changed",
                    chosen.len()
                ));
                out.join("\n")
            },
        );
        return Ok(());
    }
    let bar = if json_out {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(chosen.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} replayed {per_sec}",
        )
        .map_err(|e| anyhow::anyhow!("progress template: {e}"))?,
    );
    // Batches of at most a tenth of a second's worth at the rate: the rate holds over any
    // second, and an interrupt stops within one batch.
    let chunk = rate.map_or(100, |r| (r as usize / 10).clamp(1, 100));
    let started = tokio::time::Instant::now();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut done: BTreeMap<String, String> = BTreeMap::new();
    let mut interrupted = None;
    for batch in chosen.chunks(chunk) {
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64(done.len() as f64 / f64::from(r));
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                name = &mut signal => { interrupted = Some(name); break; }
            }
        }
        // A replay call is never cancelled halfway: the signal is looked at between batches.
        let fired = tokio::select! {
            biased;
            name = &mut signal => Some(name),
            () = std::future::ready(()) => None,
        };
        if fired.is_some() {
            interrupted = fired;
            break;
        }
        let ids: Vec<MessageId> = batch.iter().map(|d| d.id).collect();
        let r = dls.replay(&ids).await;
        if r.is_err() {
            let params = json!({ "chosen": chosen.len(), "replayed": done.len() });
            audit(broker, "replay", topic, params, &r, |_| String::new()).await;
        }
        let replayed = r?;
        bar.inc(batch.len() as u64);
        done.extend(replayed.iter().map(|(d, m)| (d.to_string(), m.to_string())));
    }
    bar.finish_and_clear();
    let skipped = chosen.len() - done.len();
    let r: relq::Result<()> = Ok(());
    audit(
        broker,
        "replay",
        topic,
        json!({ "chosen": chosen.len(), "rate": rate, "interrupted": interrupted.is_some() }),
        &r,
        |()| format!("replayed {} of {}", done.len(), chosen.len()),
    )
    .await;
    print_out(
        json_out,
        json!({ "replayed": done, "remaining": skipped, "interrupted": interrupted.is_some() }),
        || format!("replayed {} dead letters", done.len()),
    );
    match interrupted {
        Some(name) => Err(exit(
            Exit::INTERRUPTED,
            format!(
                "{name}: replay stopped after {} of {}; run the same command again to replay the rest",
                done.len(),
                chosen.len()
            ),
        )),
        None => Ok(()),
    }
}
