//! Reading the audit log back: the lines that match a filter, oldest first (`ballast
//! audit`), or newest first a page at a time (`GET /admin/audit` and the console's Activity
//! page). Rotated files are read too; the log is never changed here.

use std::io::BufRead as _;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context as _};

/// Which lines to show. Every field that is set must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Actor, exactly (`user:alice`).
    pub actor: Option<String>,
    /// Action, exactly or by prefix with a trailing `.` (`manifest.`).
    pub action: Option<String>,
    /// Repository, exactly.
    pub repository: Option<String>,
    /// Outcome (`ok`, `denied`, `failed`).
    pub outcome: Option<String>,
    /// Only lines at or after this time.
    pub since: Option<SystemTime>,
    /// Only lines before this time.
    pub until: Option<SystemTime>,
}

impl Filter {
    /// True when the line (parsed) matches.
    pub fn matches(&self, v: &serde_json::Value) -> bool {
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
        let is = |want: &Option<String>, k: &str| match want {
            None => true,
            Some(w) => {
                let got = field(k);
                got == w || (w.ends_with('.') && got.starts_with(w.as_str()))
            }
        };
        if !(is(&self.actor, "actor")
            && is(&self.action, "action")
            && is(&self.repository, "repository")
            && is(&self.outcome, "outcome"))
        {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(t) = humantime::parse_rfc3339_weak(field("time")) else {
            return false;
        };
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }
}

/// A time as a filter takes it: RFC 3339 (`2026-11-28T10:00:00Z`), the same without
/// seconds or zone (what a browser's date-time field sends; UTC), or a duration back from
/// now (`2h`, `30m`). `what` names the field in the error.
pub fn parse_time(s: &str, what: &str) -> anyhow::Result<SystemTime> {
    let s = s.trim();
    let with_seconds;
    let text = if s.len() == 16 && s.as_bytes().get(10) == Some(&b'T') {
        with_seconds = format!("{s}:00");
        with_seconds.as_str()
    } else {
        s
    };
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(ago) => Ok(SystemTime::now() - ago),
        Err(_) => {
            bail!("{what} {s:?} is neither a time (2026-11-28T10:00:00Z) nor a duration back (2h)")
        }
    }
}

/// Calls `f` with each matching line (text and parsed), oldest first; the number of them.
pub fn each(
    log: &Path,
    filter: &Filter,
    mut f: impl FnMut(&str, &serde_json::Value) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let files = super::files(log);
    if files.is_empty() {
        bail!("no audit log at {}", log.display());
    }
    let mut n = 0;
    for path in files {
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if filter.matches(&v) {
                n += 1;
                f(&line, &v)?;
            }
        }
    }
    Ok(n)
}

/// A page of matching lines, newest first.
#[derive(Debug, Default)]
pub struct Page {
    /// The lines, parsed.
    pub lines: Vec<serde_json::Value>,
    /// More match beyond this page.
    pub more: bool,
}

/// The matching lines that `visible` also admits, newest first, after skipping `skip` of
/// them; at most `limit`. Reads one file at a time, newest file first (memory is bounded by
/// one file: `audit_log_bytes_max`). A log not written yet is an empty page.
pub fn newest(
    log: &Path,
    filter: &Filter,
    visible: impl Fn(&serde_json::Value) -> bool,
    skip: usize,
    limit: usize,
) -> anyhow::Result<Page> {
    let mut page = Page::default();
    let mut skipped = 0;
    for path in super::files(log).iter().rev() {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // Rotated away between listing and reading.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        for line in text.lines().rev() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if !filter.matches(&v) || !visible(&v) {
                continue;
            }
            if skipped < skip {
                skipped += 1;
                continue;
            }
            if page.lines.len() == limit {
                page.more = true;
                return Ok(page);
            }
            page.lines.push(v);
        }
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{append, Event};

    #[test]
    fn pages_newest_first_across_rotated_files_with_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("audit.log");
        for i in 0..10 {
            let mut e = Event::new(if i % 2 == 0 { "user:a" } else { "user:b" }, "tag.delete");
            e.repository = Some(format!("team-{}/app", i % 3));
            e.tag = Some(format!("t{i}"));
            append(&log, &e).expect("append");
            if i == 4 {
                std::fs::rename(&log, dir.path().join("audit.log.1")).expect("rotate");
            }
        }
        let tags = |p: &Page| -> Vec<String> {
            p.lines
                .iter()
                .map(|v| v["tag"].as_str().expect("tag").to_owned())
                .collect()
        };
        let all = Filter::default();
        let p = newest(&log, &all, |_| true, 0, 4).expect("page");
        assert_eq!(tags(&p), ["t9", "t8", "t7", "t6"]);
        assert!(p.more);
        let p = newest(&log, &all, |_| true, 8, 4).expect("page");
        assert_eq!(tags(&p), ["t1", "t0"]);
        assert!(!p.more);
        let a = Filter {
            actor: Some("user:a".into()),
            ..Filter::default()
        };
        let p = newest(&log, &a, |_| true, 0, 10).expect("page");
        assert_eq!(tags(&p), ["t8", "t6", "t4", "t2", "t0"]);
        let only_team_0 = |v: &serde_json::Value| v["repository"] == "team-0/app";
        let p = newest(&log, &all, only_team_0, 0, 10).expect("page");
        assert_eq!(tags(&p), ["t9", "t6", "t3", "t0"]);
        let future = Filter {
            since: Some(SystemTime::now() + std::time::Duration::from_secs(3600)),
            ..Filter::default()
        };
        assert!(newest(&log, &future, |_| true, 0, 10)
            .expect("page")
            .lines
            .is_empty());
        let mut n = 0;
        each(&log, &a, |_, _| {
            n += 1;
            Ok(())
        })
        .expect("each");
        assert_eq!(n, 5);
    }

    #[test]
    fn times_take_browser_fields_and_durations() {
        let t = parse_time("2026-11-28T10:00", "since").expect("browser field");
        assert_eq!(
            t,
            humantime::parse_rfc3339("2026-11-28T10:00:00Z").expect("rfc3339")
        );
        assert!(parse_time("2h", "since").expect("duration") < SystemTime::now());
        let e = parse_time("yesterday-ish", "until").expect_err("refused");
        assert!(e.to_string().contains("until"), "{e}");
    }
}
