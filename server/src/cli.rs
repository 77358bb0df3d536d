//! Account and audit commands of the `ballast` binary: robot accounts, htpasswd users, and
//! queries over the audit log. They work on files, beside a running server or without one.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context};

use crate::audit::{self, Event};
use crate::auth::accounts::{self, RobotsFile};

/// The actor of account changes made from the command line: the user behind `sudo`, else the
/// login name, else the name of the effective user id (`cli:uid:N` if it has none).
pub(crate) fn cli_actor() -> String {
    use std::os::unix::fs::MetadataExt;
    let from_env = ["SUDO_USER", "LOGNAME", "USER"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.is_empty());
    let who = from_env.unwrap_or_else(|| {
        // /proc/self belongs to the process's effective user.
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        let name = uid.and_then(|uid| {
            let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
            passwd.lines().find_map(|l| {
                let mut f = l.split(':');
                let (name, id) = (f.next()?, f.nth(1)?);
                (id.parse() == Ok(uid)).then(|| name.to_owned())
            })
        });
        match (name, uid) {
            (Some(n), _) => n,
            (None, Some(uid)) => format!("uid:{uid}"),
            (None, None) => "unknown".into(),
        }
    });
    format!("cli:{}", ballast_tools::printable(&who))
}

/// Tells the operator when the account file just written could not be read by the server.
fn warn_if_unreadable(path: &Path) {
    if let Some(w) = crate::auth::unreadable_warning(path) {
        eprintln!("{w}");
    }
}

fn audit_change(log: &Path, action: &str, what: &str, reason: Option<String>) {
    let mut e = Event::new(cli_actor(), action);
    e.tag = Some(what.to_owned());
    e.reason = reason;
    if let Err(err) = audit::append(log, &e) {
        eprintln!(
            "warning: could not write the audit log {}: {err}",
            log.display()
        );
    }
}

/// `ballast robot create`: adds a robot and prints its token, once.
pub fn robot_create(
    robots: &Path,
    audit_log: &Path,
    name: &str,
    description: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let token = accounts::edit_robots(robots, |file| {
        file.create(name, description, crate::now_secs())
    })?;
    warn_if_unreadable(robots);
    audit_change(audit_log, "robot.create", &format!("robot:{name}"), None);
    writeln!(out, "{token}")?;
    eprintln!(
        "robot {name:?} created. Its token is printed above, once: store it now (it cannot \
         be shown again). Log in with user name {name:?} and the token as password; grant it \
         rights with subject \"robot:{name}\" in [[auth.policy]]."
    );
    Ok(())
}

/// `ballast robot revoke`: removes a robot; its token and tokens issued to it stop working.
pub fn robot_revoke(robots: &Path, audit_log: &Path, name: &str) -> anyhow::Result<()> {
    accounts::edit_robots(robots, |file| file.revoke(name))?;
    warn_if_unreadable(robots);
    audit_change(audit_log, "robot.revoke", &format!("robot:{name}"), None);
    eprintln!("robot {name:?} revoked");
    Ok(())
}

/// `ballast robot list`.
pub fn robot_list(robots: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let file = RobotsFile::load(robots)?;
    if json {
        let list: Vec<_> = file
            .robots
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "created_at": r.created_at,
                    "description": r.description,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(());
    }
    if file.robots.is_empty() {
        writeln!(out, "no robots in {}", robots.display())?;
    }
    for r in &file.robots {
        let created = std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.created_at);
        writeln!(
            out,
            "{:<24} created {}  {}",
            r.name,
            humantime::format_rfc3339_seconds(created),
            r.description
        )?;
    }
    Ok(())
}

/// `ballast passwd`: sets a user's password (read from `input`'s first line) or removes the
/// user, in an htpasswd file.
pub fn passwd(
    htpasswd: &Path,
    audit_log: Option<&Path>,
    user: &str,
    delete: bool,
    cost: u32,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    if !(4..=31).contains(&cost) {
        bail!("--cost must be between 4 and 31");
    }
    let _lock = accounts::edit_lock(htpasswd)?;
    if delete {
        if !accounts::set_password(htpasswd, user, None, 0)? {
            bail!("there is no user {user:?} in {}", htpasswd.display());
        }
        warn_if_unreadable(htpasswd);
        if let Some(log) = audit_log {
            audit_change(log, "user.delete", &format!("user:{user}"), None);
        }
        eprintln!("user {user:?} removed");
        return Ok(());
    }
    let mut line = String::new();
    input.read_line(&mut line).context("reading the password")?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.len() < 8 {
        bail!("the password must be at least 8 characters");
    }
    // bcrypt uses the first 72 bytes only; refuse rather than silently truncate.
    if password.len() > 72 {
        bail!("the password must be at most 72 bytes (bcrypt's limit)");
    }
    let existed = accounts::set_password(htpasswd, user, Some(password), cost)?;
    warn_if_unreadable(htpasswd);
    if let Some(log) = audit_log {
        let why = if existed {
            "password changed"
        } else {
            "user added"
        };
        audit_change(log, "user.set", &format!("user:{user}"), Some(why.into()));
    }
    eprintln!(
        "user {user:?} {} in {}",
        if existed { "updated" } else { "added" },
        htpasswd.display()
    );
    Ok(())
}

/// `ballast audit`: prints the matching lines of the log and its rotated files, oldest first.
pub fn audit_query(
    log: &Path,
    filter: &audit::query::Filter,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    audit::query::each(log, filter, |line, v| {
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
        if json {
            writeln!(out, "{line}")?;
        } else {
            let what = [field("repository"), field("tag"), field("digest")]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            // Every field as text a terminal shows as it is: a user name or a tag sent
            // by a client must not move the cursor or start a line of its own.
            let p = ballast_tools::printable;
            writeln!(
                out,
                "{} {:<8} {:<20} {:<16} {} {}",
                p(field("time")),
                p(field("outcome")),
                p(field("actor")),
                p(field("action")),
                p(&what),
                p(field("reason"))
            )?;
        }
        Ok(())
    })
}
