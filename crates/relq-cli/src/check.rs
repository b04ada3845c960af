//! `relq check DIR`: what is damaged in a data directory, before anyone decides what to do.

use std::path::Path;

use relq::{CheckReport, DamageKind, EmbeddedBackend, EmbeddedConfig, Recovery};

use crate::{exit, print_out, Exit};

/// Damage an open does not handle by itself: corruption in a segment, a state database that
/// does not read back, or state that refers to records the logs lack. A torn tail (the unsynced
/// end of the log after a crash) is reported but is not this: an open cuts it and logs it.
/// (A database that kept changing while it was read is inconclusive, not damaged; state ahead
/// of the log after a periodic-mode crash is expected: an open handles both.)
fn needs_operator(r: &CheckReport) -> bool {
    !r.state_db.is_empty()
        || r.topics.iter().any(|t| {
            !t.state_problems.is_empty()
                || t.damage.iter().any(|d| d.kind == DamageKind::Corruption)
        })
}

fn human(r: &CheckReport) -> String {
    let mut out = format!("data directory {}\n", r.path.display());
    if r.state_db.is_empty() {
        out += "  state database: ok\n";
    } else {
        for p in &r.state_db {
            out += &format!("  state database: DAMAGED: {p}\n");
        }
    }
    if r.state_db_changed {
        out +=
            "  note: the state database changed while it was read (in use); run the check again\n";
    }
    if let Some(why) = &r.state_db_inconclusive {
        out += &format!("  state database: INCONCLUSIVE: {why}; run the check again\n");
    }
    for t in &r.topics {
        let status = if t.damage.is_empty() && t.state_problems.is_empty() {
            "ok"
        } else {
            "DAMAGED"
        };
        out += &format!(
            "  topic {}: {status}: {} segments, {} records, {} bytes, offsets {}..{}{}\n",
            t.topic,
            t.segments,
            t.records,
            t.bytes,
            t.first_offset,
            t.end_offset,
            if t.skipped_offsets > 0 {
                format!(" ({} skipped after earlier damage)", t.skipped_offsets)
            } else {
                String::new()
            }
        );
        for d in &t.damage {
            let kind = match d.kind {
                DamageKind::TornTail => "torn tail (an open cuts it)",
                DamageKind::TornUnsynced => {
                    "unsynced writes of a crashed session (an open cuts them)"
                }
                DamageKind::Corruption => "CORRUPTION (an open refuses)",
                _ => "damage",
            };
            out += &format!(
                "    {} at byte {}: {kind}: {}; last good offset {}; {} valid records after it{}\n",
                d.segment.display(),
                d.position,
                d.what,
                d.last_good_offset
                    .map_or_else(|| "none".to_owned(), |o| o.to_string()),
                d.records_after,
                match (d.first_offset_after, d.last_offset_after) {
                    (Some(a), Some(b)) => format!(" (offsets {a}..={b})"),
                    _ => String::new(),
                }
            );
        }
        for p in &t.state_problems {
            out += &format!("    state: {p}\n");
        }
        for p in &t.expected_state_ahead {
            out += &format!(
                "    note (expected after a periodic-mode crash; an open handles it): {p}\n"
            );
        }
    }
    for d in &r.unknown_dirs {
        out += &format!(
            "  note: {} is not a known topic (left by a crash; an open removes it)\n",
            d.display()
        );
    }
    if needs_operator(r) {
        out += "\nDamage needs a decision: restore the data directory from a backup, or run \
                `relq check --repair` to cut the damaged records (they are lost).";
    } else {
        out += "\nNothing needs the operator.";
    }
    out
}

pub(crate) fn run(dir: &Path, repair: bool, json: bool) -> anyhow::Result<()> {
    if !dir.is_dir() {
        return Err(exit(
            Exit::NOT_FOUND,
            format!("{} is not a data directory", dir.display()),
        ));
    }
    let report = EmbeddedBackend::check(dir)?;
    let damaged = needs_operator(&report);
    print_out(json, serde_json::to_value(&report)?, || human(&report));
    if let (Some(why), false) = (&report.state_db_inconclusive, damaged) {
        return Err(exit(
            Exit::FAILED,
            format!("the check was inconclusive ({why}): run it again"),
        ));
    }
    if !repair {
        return if damaged {
            Err(exit(
                Exit::DAMAGED,
                format!("{} is damaged (see above)", dir.display()),
            ))
        } else {
            Ok(())
        };
    }
    if !report.state_db.is_empty() {
        return Err(exit(
            Exit::DAMAGED,
            "the state database is damaged: --repair cannot rebuild it; restore the data directory from a backup",
        ));
    }
    // Opening with the operator's decision cuts damaged active segments (logged at error level
    // with what was dropped); closing it writes the result.
    let config = EmbeddedConfig::default().recovery(Recovery::CutDamagedTail);
    drop(EmbeddedBackend::open_with(dir, config)?);
    let after = EmbeddedBackend::check(dir)?;
    eprintln!("after --repair:");
    print_out(json, serde_json::to_value(&after)?, || human(&after));
    if needs_operator(&after) {
        Err(exit(
            Exit::DAMAGED,
            format!(
                "{} is still damaged: damage in sealed segments cannot be cut; restore from a backup",
                dir.display()
            ),
        ))
    } else {
        Ok(())
    }
}
