//! `relq group ...`: consumer groups.

use clap::Subcommand;
use relq::{Broker, GroupInfo, StartPosition};
use serde_json::json;

use crate::{audit, exit, print_out, Exit};

#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// List a topic's groups: position, pending, lag, scheduled, stopped and consumers.
    List {
        /// Topic.
        topic: String,
    },
    /// Create a group before any consumer joins it, so it keeps every message published after
    /// its start position. Exit 0 also when it exists (unchanged; the output says so).
    Create {
        /// Topic (created if needed).
        topic: String,
        /// Group.
        group: String,
        /// Where it starts: `latest` (the next message published), `earliest` (every stored
        /// message) or a message id (that message and every later one).
        #[arg(long, default_value = "latest")]
        start: StartPosition,
    },
    /// Move a group: the next new message it reads is the first at the position. Forward skips
    /// a backlog; back delivers messages again (those it holds pending, scheduled or stopped
    /// are not delivered twice). Running consumers go on from there.
    Move {
        /// Topic.
        topic: String,
        /// Group.
        group: String,
        /// `latest`, `earliest` or a message id.
        #[arg(long)]
        to: StartPosition,
    },
    /// Delete a group with its position and its pending, scheduled and stopped entries (the
    /// messages stay for the other groups); its running consumers stop. Asks to type the
    /// group's name unless --yes.
    Delete {
        /// Topic.
        topic: String,
        /// Group.
        group: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

impl GroupCommand {
    /// Whether the command only reads.
    pub(crate) fn read_only(&self) -> bool {
        matches!(self, GroupCommand::List { .. })
    }
}

fn position(p: &StartPosition) -> String {
    match p {
        StartPosition::Latest => "latest".into(),
        StartPosition::Earliest => "earliest".into(),
        StartPosition::From(id) => id.to_string(),
    }
}

/// The group's state, or a not-found error naming it.
async fn group_info(broker: &Broker, topic: &str, group: &str) -> anyhow::Result<GroupInfo> {
    let info = broker.topic_info(topic).await?;
    info.groups
        .into_iter()
        .find(|g| g.name == group)
        .ok_or_else(|| not_found(topic, group))
}

fn not_found(topic: &str, group: &str) -> anyhow::Error {
    exit(
        Exit::NOT_FOUND,
        format!("group {group:?} of topic {topic:?} not found"),
    )
}

fn line(g: &GroupInfo) -> String {
    format!(
        "{}: position {} pending {} lag {} scheduled {} stopped {} blocked {} consumers {}",
        g.name,
        g.cursor,
        g.pending,
        g.lag,
        g.scheduled,
        g.parked,
        g.blocked,
        g.consumers.len()
    )
}

pub(crate) async fn run(
    broker: &Broker,
    command: GroupCommand,
    json_out: bool,
) -> anyhow::Result<()> {
    match command {
        GroupCommand::List { topic } => {
            let info = broker.topic_info(&topic).await?;
            print_out(json_out, serde_json::to_value(&info.groups)?, || {
                if info.groups.is_empty() {
                    return format!("topic {topic} has no groups");
                }
                let mut out: Vec<String> = Vec::new();
                for g in &info.groups {
                    out.push(line(g));
                    for c in &g.consumers {
                        out.push(format!(
                            "  consumer {}: pending {} idle {} ms",
                            c.name, c.pending, c.idle_ms
                        ));
                    }
                }
                out.join("\n")
            });
        }
        GroupCommand::Create {
            topic,
            group,
            start,
        } => {
            let r = broker.create_group(&topic, &group, start).await;
            let params = json!({ "group": group, "start": position(&start) });
            audit(
                broker,
                "group.create",
                &topic,
                params,
                &r,
                |created| match created {
                    true => "created".into(),
                    false => "existed; unchanged".into(),
                },
            )
            .await;
            let created = r?;
            let g = group_info(broker, &topic, &group).await?;
            print_out(
                json_out,
                json!({ "created": created, "group": serde_json::to_value(&g)? }),
                || match created {
                    true => format!("created group {}", line(&g)),
                    false => format!("group exists, unchanged: {}", line(&g)),
                },
            );
        }
        GroupCommand::Move { topic, group, to } => {
            let before = group_info(broker, &topic, &group).await?;
            let r = broker.move_group(&topic, &group, to).await;
            let params = json!({ "group": group, "to": position(&to) });
            audit(
                broker,
                "group.move",
                &topic,
                params,
                &r,
                |moved| match moved {
                    true => format!("moved from {}", before.cursor),
                    false => "no such group".into(),
                },
            )
            .await;
            if !r? {
                return Err(not_found(&topic, &group));
            }
            let after = group_info(broker, &topic, &group).await?;
            print_out(
                json_out,
                json!({ "before": serde_json::to_value(&before)?, "after": serde_json::to_value(&after)? }),
                || {
                    format!(
                        "moved group {group} of topic {topic}: lag {} -> {}\n{}",
                        before.lag,
                        after.lag,
                        line(&after)
                    )
                },
            );
        }
        GroupCommand::Delete { topic, group, yes } => {
            relq::validate_name("topic", &topic)?;
            relq::validate_name("group", &group)?;
            if !yes {
                crate::confirm_name(
                    &group,
                    &format!(
                        "deleting group {group:?} of topic {topic:?} drops its position and its pending, scheduled and stopped entries; its consumers stop"
                    ),
                )?;
            }
            let r = broker.delete_group(&topic, &group).await;
            audit(
                broker,
                "group.delete",
                &topic,
                json!({ "group": group }),
                &r,
                |existed| match existed {
                    true => "deleted".into(),
                    false => "no such group".into(),
                },
            )
            .await;
            if !r? {
                return Err(not_found(&topic, &group));
            }
            print_out(
                json_out,
                json!({ "deleted": group, "topic": topic }),
                || format!("deleted group {group} of topic {topic}"),
            );
        }
    }
    Ok(())
}
