//! `ballast webhooks dead|redeliver DIR`: the dead letters of a data directory, offline
//! (the server must be stopped; `GET /admin/webhooks/dead` and
//! `POST /admin/webhooks/dead/redeliver` do the same on a running one).

use std::io::Write;
use std::path::Path;

use ballast_engine::outbox::Outbox;
use ballast_engine::Options;
use ballast_tools::{printable, EXIT_FAILED};

fn open(dir: &Path) -> Result<(ballast_engine::Store, Outbox), String> {
    let store = ballast_tools::open_offline(dir, Options::default())?;
    let outbox = Outbox::open(store.storage().clone(), dir, 0)
        .map_err(|e| format!("opening the webhook outbox: {e}"))?;
    Ok((store, outbox))
}

/// Lists the dead letters; returns the exit code (0, or 2 when it could not run).
pub fn dead(dir: &Path, json: bool, out: &mut dyn Write) -> i32 {
    let (_store, outbox) = match open(dir) {
        Ok(x) => x,
        Err(msg) => {
            let _ = writeln!(out, "webhooks: {}", printable(&msg));
            return EXIT_FAILED;
        }
    };
    let dead = outbox.dead_letters();
    if json {
        let list: Vec<serde_json::Value> = dead.iter().map(super::dead_letter_json).collect();
        let _ = writeln!(out, "{}", serde_json::json!({ "dead_letters": list }));
        return 0;
    }
    if dead.is_empty() {
        let _ = writeln!(out, "no dead letters");
    }
    for d in &dead {
        let v = super::dead_letter_json(d);
        let e = &v["event"];
        let _ = writeln!(
            out,
            "{:>8}  {}  {}  {} {}{}  — {}",
            d.entry.seq,
            printable(&d.consumer),
            e["time"].as_str().unwrap_or("-"),
            e["kind"].as_str().unwrap_or("?"),
            printable(e["repository"].as_str().unwrap_or("")),
            e["tag"]
                .as_str()
                .map(|t| format!(":{}", printable(t)))
                .unwrap_or_default(),
            printable(&d.reason)
        );
    }
    0
}

/// Puts dead letters (those with `ids`, or all) back for delivery when the server next
/// runs; returns the exit code (0, or 2 when it could not run).
pub fn redeliver(dir: &Path, ids: &[u64], audit_log: &Path, out: &mut dyn Write) -> i32 {
    let (_store, outbox) = match open(dir) {
        Ok(x) => x,
        Err(msg) => {
            let _ = writeln!(out, "webhooks: {}", printable(&msg));
            return EXIT_FAILED;
        }
    };
    let chosen = (!ids.is_empty()).then_some(ids);
    match outbox.redeliver(chosen, crate::now_secs()) {
        Ok(n) => {
            let _ = writeln!(
                out,
                "{n} dead letters will be delivered again when the server runs"
            );
            let mut e = crate::audit::Event::new(crate::cli::cli_actor(), "webhook.redeliver");
            e.reason = Some(match chosen {
                Some(ids) => format!("offline: ids {ids:?}, {n} redelivered"),
                None => format!("offline: all, {n} redelivered"),
            });
            if let Err(err) = crate::audit::append(audit_log, &e) {
                eprintln!(
                    "warning: could not write the audit log {}: {err}",
                    audit_log.display()
                );
            }
            0
        }
        Err(e) => {
            let _ = writeln!(out, "webhooks: {}", printable(&e.to_string()));
            EXIT_FAILED
        }
    }
}
