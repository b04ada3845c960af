//! The Prometheus exporter: the process's runtime metrics (from the `metrics` facade) plus
//! gauges read from the backend at scrape time, O(topics + groups) backend calls per scrape.

use std::fmt::Write as _;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use relq::{Broker, Timestamp};

use crate::audit::AUDIT_TOPIC;

/// Histogram buckets (seconds) of handler durations and publish-to-handled latency.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs a Prometheus recorder as the process's `metrics` recorder and returns the handle
/// that renders it; `None` when another recorder is installed already (then relq's runtime
/// metrics go to that one, and [`render`] exports only the backend gauges).
pub fn install_recorder() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new().set_buckets(&BUCKETS).ok()?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    Some(handle)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family {
    name: &'static str,
    help: &'static str,
    lines: Vec<String>,
}

impl Family {
    fn new(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            lines: Vec::new(),
        }
    }

    fn add(&mut self, labels: &[(&str, &str)], v: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        self.lines.push(format!("{}{labels} {v}", self.name));
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} gauge", self.name);
        for l in &self.lines {
            let _ = writeln!(out, "{l}");
        }
    }
}

fn age_seconds(id: Option<relq::MessageId>, now: Timestamp) -> f64 {
    id.map_or(0.0, |id| now.since(Timestamp(id.ms)).as_secs_f64())
}

/// The exposition text: `handle`'s runtime metrics (if any), then the backend's gauges.
pub async fn render(broker: &Broker, handle: Option<&PrometheusHandle>) -> String {
    let mut out = String::new();
    if let Some(h) = handle {
        h.run_upkeep();
        out.push_str(&h.render());
    }
    let started = std::time::Instant::now();
    let health = broker.health().await;
    let mut up = Family::new("relq_up", "1 when the backend answered this scrape");
    let mut ready = Family::new(
        "relq_ready",
        "1 when every readiness check passes (see /readyz)",
    );
    let mut usage = Family::new(
        "relq_backend_usage_ratio",
        "How full a bounded backend is (disk under the data directory; Redis maxmemory), 0-1",
    );
    let mut messages = Family::new("relq_topic_messages", "Messages stored in the topic");
    let mut dead = Family::new(
        "relq_topic_dead_letters",
        "Dead letters stored for the topic",
    );
    let mut pending = Family::new(
        "relq_group_pending",
        "Messages delivered to the group and not settled",
    );
    let mut lag = Family::new("relq_group_lag", "Messages the group has not read yet");
    let mut scheduled = Family::new(
        "relq_group_scheduled",
        "Retries and delayed messages waiting for their time",
    );
    let mut stopped = Family::new(
        "relq_group_stopped",
        "Stopped messages the group holds back",
    );
    let mut blocked = Family::new(
        "relq_group_blocked",
        "Messages waiting behind an earlier message of their ordering key",
    );
    let mut consumers = Family::new("relq_group_consumers", "Consumers registered in the group");
    let mut oldest_pending = Family::new(
        "relq_group_oldest_pending_age_seconds",
        "Age (since publish) of the group's oldest pending message; 0 when none",
    );
    let mut oldest_unread = Family::new(
        "relq_group_oldest_unread_age_seconds",
        "Age (since publish) of the group's oldest unread message; 0 when none",
    );
    let mut reachable = health.checks.first().is_some_and(|c| c.ok);
    if let Some(u) = health.usage_ratio {
        usage.add(&[], u);
    }
    if reachable {
        match broker.topics().await {
            Ok(topics) => {
                let now = Timestamp::now();
                for t in topics.iter().filter(|t| *t != AUDIT_TOPIC) {
                    let info = match broker.topic_info(t).await {
                        Ok(i) => i,
                        // Terminated between the listing and now.
                        Err(relq::Error::NotFound(_)) => continue,
                        Err(e) => {
                            tracing::warn!(topic = %t, error = %e, "metrics: topic not readable");
                            reachable = false;
                            break;
                        }
                    };
                    messages.add(&[("topic", t)], info.length as f64);
                    dead.add(&[("topic", t)], info.dead_letters as f64);
                    for g in &info.groups {
                        let l = [("topic", t.as_str()), ("group", g.name.as_str())];
                        pending.add(&l, g.pending as f64);
                        lag.add(&l, g.lag as f64);
                        scheduled.add(&l, g.scheduled as f64);
                        stopped.add(&l, g.parked as f64);
                        blocked.add(&l, g.blocked as f64);
                        consumers.add(&l, g.consumers.len() as f64);
                        oldest_pending.add(&l, age_seconds(g.oldest_pending, now));
                        oldest_unread.add(&l, age_seconds(g.oldest_unread, now));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: topics not readable");
                reachable = false;
            }
        }
    }
    up.add(&[], if reachable { 1.0 } else { 0.0 });
    ready.add(
        &[],
        if health.ready() && reachable {
            1.0
        } else {
            0.0
        },
    );
    let mut took = Family::new(
        "relq_scrape_backend_seconds",
        "Time this scrape spent reading the backend",
    );
    took.add(&[], started.elapsed().as_secs_f64());
    for f in [
        &up,
        &ready,
        &usage,
        &messages,
        &dead,
        &pending,
        &lag,
        &scheduled,
        &stopped,
        &blocked,
        &consumers,
        &oldest_pending,
        &oldest_unread,
        &took,
    ] {
        f.write(&mut out);
    }
    // The backend's own counters (embedded engine: commit cycles, fsyncs; Redis: calls, errors).
    for m in broker.backend().metrics() {
        let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
        let _ = writeln!(out, "# TYPE {} counter", m.name);
        let _ = writeln!(out, "{} {}", m.name, m.value);
    }
    out
}
