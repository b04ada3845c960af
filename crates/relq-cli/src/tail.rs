//! `relq tail TOPIC`: follow new messages live without joining a group (nothing is delivered,
//! acknowledged or changed).

use std::io::Write as _;
use std::time::Duration;

use relq::{Broker, Browse, Message};

use crate::{message_json, shutdown_signal};

#[derive(clap::Args)]
pub(crate) struct TailArgs {
    /// Topic.
    topic: String,
    /// Also print the last N stored messages first.
    #[arg(long, default_value_t = 0)]
    last: usize,
    /// Stop after printing N messages.
    #[arg(long)]
    count: Option<usize>,
    /// How often to look for new messages.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    interval: Duration,
}

fn line(m: &Message) -> String {
    format!(
        "{} {} {}",
        m.id,
        m.kind,
        String::from_utf8_lossy(&m.payload)
    )
}

pub(crate) async fn run(broker: &Broker, args: TailArgs, json_out: bool) -> anyhow::Result<()> {
    // Where to start: after the newest stored message, or N back from it.
    let newest = broker
        .browse(
            &args.topic,
            &Browse::newest().limit(args.last.clamp(1, Browse::MAX_LIMIT)),
        )
        .await?;
    let mut cursor = newest.first().map(|m| m.id);
    let mut printed = 0usize;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut out = std::io::stdout().lock();
    let print = |out: &mut std::io::StdoutLock<'_>, m: &Message| -> std::io::Result<()> {
        let text = if json_out {
            message_json(m).to_string()
        } else {
            line(m)
        };
        writeln!(out, "{text}")
    };
    if args.last > 0 {
        for m in newest.iter().rev() {
            print(&mut out, m)?;
            printed += 1;
            if args.count.is_some_and(|n| printed >= n) {
                out.flush()?;
                return Ok(());
            }
        }
    }
    loop {
        let mut q = Browse::oldest().limit(500);
        if let Some(c) = cursor {
            q = q.after(c);
        }
        let page = broker.browse(&args.topic, &q).await?;
        for m in &page {
            print(&mut out, m)?;
            printed += 1;
            cursor = Some(m.id);
            if args.count.is_some_and(|n| printed >= n) {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
        if page.len() < 500 {
            tokio::select! {
                () = tokio::time::sleep(args.interval) => {}
                _ = &mut signal => return Ok(()),
            }
        }
    }
}
