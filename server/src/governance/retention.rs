//! Retention (`[retention]`, `[[retention.rules]]`): which tags of a repository survive,
//! and so which manifests nothing reaches any more and go. The first rule whose
//! repositories match a repository is its rule; a repository no rule matches is left alone.
//! A tag survives when any keep selector of its rule keeps it, or when it is immutable.
//! Runs on a schedule, on request (`POST /admin/retention`) and offline
//! (`ballast retention DIR`); a dry run reports and changes nothing.

use std::collections::{BTreeSet, HashSet};

use anyhow::{bail, Context};
use ballast_engine::catalog::{Op, Repo, State};
use ballast_engine::{Digest, Store};
use globset::GlobMatcher;
use serde::{Deserialize, Serialize};

use super::ImmutableRules;
use crate::error::ApiError;

/// The `[retention]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Seconds between scheduled runs (0: never on a schedule).
    pub interval_secs: u64,
    /// Scheduled runs only report what they would delete.
    pub dry_run: bool,
    /// Referrers (signatures, SBOMs) whose subject is deleted are deleted with it.
    pub delete_orphan_referrers: bool,
    /// The rules, first match per repository.
    pub rules: Vec<RetentionRule>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            interval_secs: 24 * 3600,
            dry_run: false,
            delete_orphan_referrers: true,
            rules: Vec::new(),
        }
    }
}

/// One `[[retention.rules]]` table: repositories, and what keeps a tag.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Repository globs, as in policies.
    pub repositories: Vec<String>,
    /// Keep the N most recently pushed (set) tags.
    #[serde(default)]
    pub keep_pushed: Option<usize>,
    /// Keep the N tags whose manifests were most recently pulled.
    #[serde(default)]
    pub keep_pulled: Option<usize>,
    /// Keep tags set within this long (`30d`, `12h`).
    #[serde(default)]
    pub pushed_within: Option<String>,
    /// Keep tags whose manifest was pulled within this long.
    #[serde(default)]
    pub pulled_within: Option<String>,
    /// Keep tags matching this regular expression (anchor it: `^v\d+$`).
    #[serde(default)]
    pub tags_matching: Option<String>,
    /// Keep manifests no tag reaches for this long after their push (default: not kept).
    #[serde(default)]
    pub untagged_for: Option<String>,
}

struct Compiled {
    number: usize,
    repos: Vec<GlobMatcher>,
    keep_pushed: Option<usize>,
    keep_pulled: Option<usize>,
    pushed_within: Option<u64>,
    pulled_within: Option<u64>,
    tags: Option<regex::Regex>,
    untagged_for: Option<u64>,
}

/// The compiled rules.
#[derive(Default)]
pub struct Retention {
    rules: Vec<Compiled>,
    delete_orphan_referrers: bool,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention")
            .field("rules", &self.rules.len())
            .finish()
    }
}

fn duration(at: &str, what: &str, v: &Option<String>) -> anyhow::Result<Option<u64>> {
    v.as_deref()
        .map(|s| {
            humantime::parse_duration(s)
                .map(|d| d.as_secs())
                .with_context(|| {
                    format!("{at}: {what} = {s:?} is not a duration like \"30d\" or \"12h\"")
                })
        })
        .transpose()
}

/// A cosign-style tag (`sha256-<hex>.sig`, `.att`, `.sbom`): it names the manifest it is
/// about, and stays exactly as long as that manifest does.
fn tag_subject(tag: &str) -> Option<Digest> {
    let rest = tag.strip_prefix("sha256-")?;
    let (hex, kind) = rest.split_once('.')?;
    if !matches!(kind, "sig" | "att" | "sbom") {
        return None;
    }
    format!("sha256:{hex}").parse().ok()
}

/// What a rule decides for one repository: the rule's number, the tags (with what they
/// point at) and the manifests that go.
pub type RepoPlan = (usize, Vec<(String, Digest)>, Vec<Digest>);

/// What a run decided for one repository.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RepoOutcome {
    /// The repository.
    pub repository: String,
    /// The rule (1-based) that applies.
    pub rule: usize,
    /// Tags deleted (or that would be), with what they pointed at.
    pub tags: Vec<(String, String)>,
    /// Manifests deleted (or that would be).
    pub manifests: Vec<String>,
    /// Bytes a collection would then free that only this repository's deletions free.
    pub freed_bytes: u64,
}

/// What a run did (or would do).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Report {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Per repository with something to delete.
    pub repositories: Vec<RepoOutcome>,
    /// Bytes a collection would then free in all (chunks shared with what stays count as
    /// not freed).
    pub freed_bytes: u64,
    /// Of those, bytes freed by deletions in several repositories together.
    pub shared_freed_bytes: u64,
}

impl Retention {
    /// Compiles the config; an error names the rule and the setting.
    pub fn compile(cfg: &RetentionConfig) -> anyhow::Result<Retention> {
        let mut rules = Vec::new();
        for (i, r) in cfg.rules.iter().enumerate() {
            let number = i + 1;
            let at = format!("[[retention.rules]] #{number}");
            if r.repositories.is_empty() {
                bail!("{at}: repositories is required (e.g. [\"team-a/**\"])");
            }
            let keeps = r.keep_pushed.is_some()
                || r.keep_pulled.is_some()
                || r.pushed_within.is_some()
                || r.pulled_within.is_some()
                || r.tags_matching.is_some();
            if !keeps {
                bail!(
                    "{at}: no keep selector (keep_pushed, keep_pulled, pushed_within, \
                     pulled_within, tags_matching): the rule would delete every tag"
                );
            }
            rules.push(Compiled {
                number,
                repos: crate::auth::repo_globs(&r.repositories, &at)?,
                keep_pushed: r.keep_pushed,
                keep_pulled: r.keep_pulled,
                pushed_within: duration(&at, "pushed_within", &r.pushed_within)?,
                pulled_within: duration(&at, "pulled_within", &r.pulled_within)?,
                tags: r
                    .tags_matching
                    .as_deref()
                    .map(|t| {
                        regex::Regex::new(t).with_context(|| {
                            format!("{at}: tags_matching = {t:?} is not a regular expression")
                        })
                    })
                    .transpose()?,
                untagged_for: duration(&at, "untagged_for", &r.untagged_for)?,
            });
        }
        Ok(Retention {
            rules,
            delete_orphan_referrers: cfg.delete_orphan_referrers,
        })
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn rule_for(&self, repo: &str) -> Option<&Compiled> {
        self.rules
            .iter()
            .find(|r| r.repos.iter().any(|g| g.is_match(repo)))
    }

    /// The ops that apply the rule to one repository (none when nothing goes), with the
    /// rule's number, the tags and the manifests deleted.
    fn plan_repo(
        &self,
        name: &str,
        repo: &Repo,
        now: u64,
        immutable: &ImmutableRules,
    ) -> Option<RepoPlan> {
        let rule = self.rule_for(name)?;
        let pushed = |tag: &str, d: &Digest| {
            repo.tag_set_at
                .get(tag)
                .copied()
                .filter(|t| *t > 0)
                .or_else(|| repo.manifests.get(d).map(|m| m.pushed_at))
                .unwrap_or(0)
        };
        let pulled = |d: &Digest| repo.pulls.get(d).map_or(0, |p| p.last);
        let ordinary: Vec<(&String, &Digest)> = repo
            .tags
            .iter()
            .filter(|(t, _)| tag_subject(t).is_none())
            .collect();
        let mut keep: HashSet<&str> = HashSet::new();
        if let Some(n) = rule.keep_pushed {
            let mut by: Vec<_> = ordinary
                .iter()
                .map(|(t, d)| (pushed(t, d), t.as_str()))
                .collect();
            by.sort_by(|a, b| b.cmp(a));
            keep.extend(by.into_iter().take(n).map(|(_, t)| t));
        }
        if let Some(n) = rule.keep_pulled {
            let mut by: Vec<_> = ordinary
                .iter()
                .map(|(t, d)| (pulled(d), t.as_str()))
                .filter(|(p, _)| *p > 0)
                .collect();
            by.sort_by(|a, b| b.cmp(a));
            keep.extend(by.into_iter().take(n).map(|(_, t)| t));
        }
        for (t, d) in &ordinary {
            let within = |w: Option<u64>, at: u64| w.is_some_and(|w| at > 0 && at + w >= now);
            if within(rule.pushed_within, pushed(t, d))
                || within(rule.pulled_within, pulled(d))
                || rule.tags.as_ref().is_some_and(|re| re.is_match(t))
                || immutable.rule_for(name, t).is_some()
            {
                keep.insert(t.as_str());
            }
        }
        // What stays reachable: kept tags' manifests, untagged manifests still young, index
        // children of what stays, referrers of what stays, the subjects of referrers that
        // stay, and cosign-style tags of what stays. Until nothing changes.
        let mut live: HashSet<&Digest> = ordinary
            .iter()
            .filter(|(t, _)| keep.contains(t.as_str()))
            .map(|(_, d)| *d)
            .collect();
        let tagged: HashSet<&Digest> = repo.tags.values().collect();
        for (d, m) in &repo.manifests {
            let young = rule.untagged_for.is_some_and(|w| m.pushed_at + w >= now);
            if !tagged.contains(d) && young {
                live.insert(d);
            }
            // Orphaned referrers stay when so configured.
            if !self.delete_orphan_referrers && m.subject.is_some() {
                live.insert(d);
            }
        }
        loop {
            let before = live.len();
            for (d, m) in &repo.manifests {
                if live.contains(d) {
                    let children: Vec<&Digest> = m
                        .references
                        .iter()
                        .filter(|r| repo.manifests.contains_key(*r))
                        .collect();
                    live.extend(children);
                    if let Some(s) = &m.subject {
                        if self.delete_orphan_referrers && repo.manifests.contains_key(s) {
                            live.insert(s);
                        }
                    }
                } else if m.subject.as_ref().is_some_and(|s| live.contains(s)) {
                    live.insert(d);
                }
            }
            for (t, d) in &repo.tags {
                if tag_subject(t).is_some_and(|s| live.contains(&s)) {
                    keep.insert(t.as_str());
                    live.insert(d);
                }
            }
            if live.len() == before {
                break;
            }
        }
        let tags: Vec<(String, Digest)> = repo
            .tags
            .iter()
            .filter(|(t, _)| !keep.contains(t.as_str()))
            .map(|(t, d)| (t.clone(), d.clone()))
            .collect();
        let manifests: Vec<Digest> = repo
            .manifests
            .keys()
            .filter(|d| !live.contains(d))
            .cloned()
            .collect();
        if tags.is_empty() && manifests.is_empty() {
            return None;
        }
        Some((rule.number, tags, manifests))
    }

    /// What the rules would delete from a catalog state, per repository with something to
    /// delete: the rule's number, the tags (with what they point at), the manifests.
    pub fn plan(
        &self,
        state: &State,
        now: u64,
        immutable: &ImmutableRules,
    ) -> Vec<(String, RepoPlan)> {
        state
            .repos
            .iter()
            .filter_map(|(name, repo)| {
                self.plan_repo(name, repo, now, immutable)
                    .map(|p| (name.clone(), p))
            })
            .collect()
    }

    /// Runs the rules over the store (blocking): per repository one catalog batch, planned
    /// again inside the commit against the state it applies to (a push meanwhile is seen),
    /// so a crash leaves each repository either as it was or with its deletions done.
    /// Returns the report, and the audit lines and webhook events of what was deleted.
    pub fn run(
        &self,
        store: &Store,
        immutable: &ImmutableRules,
        now: u64,
        dry_run: bool,
    ) -> Result<Report, ApiError> {
        let state: State = store.catalog().read().clone();
        let planned = self.plan(&state, now, immutable);
        let deleted: Vec<(String, Digest)> = planned
            .iter()
            .flat_map(|(n, (_, _, ms))| ms.iter().map(move |d| (n.clone(), d.clone())))
            .collect();
        let freed = ballast_engine::inspect::freed_by(store, &state, &deleted)
            .map_err(ApiError::from_engine)?;
        let mut report = Report {
            dry_run,
            freed_bytes: freed.bytes,
            shared_freed_bytes: freed.shared_bytes,
            ..Report::default()
        };
        for (name, (rule, tags, manifests)) in planned {
            let (rule, tags, manifests) = if dry_run {
                (rule, tags, manifests)
            } else {
                let done = store.commit_catalog(|st: &State| {
                    let Some(repo) = st.repos.get(&name) else {
                        return Ok((Vec::new(), None));
                    };
                    let Some((rule, tags, manifests)) = self.plan_repo(&name, repo, now, immutable)
                    else {
                        return Ok((Vec::new(), None));
                    };
                    let mut ops: Vec<Op> = tags
                        .iter()
                        .map(|(t, _)| Op::Untag {
                            repo: name.clone(),
                            tag: t.clone(),
                        })
                        .collect();
                    ops.extend(manifests.iter().map(|d| Op::DeleteManifest {
                        repo: name.clone(),
                        digest: d.clone(),
                    }));
                    Ok::<_, ApiError>((ops, Some((rule, tags, manifests))))
                })?;
                match done {
                    Some(x) => x,
                    None => continue,
                }
            };
            report.repositories.push(RepoOutcome {
                freed_bytes: freed.by_repository.get(&name).copied().unwrap_or(0),
                repository: name,
                rule,
                tags: tags.into_iter().map(|(t, d)| (t, d.to_string())).collect(),
                manifests: manifests.iter().map(|d| d.to_string()).collect(),
            });
        }
        Ok(report)
    }
}

impl Report {
    /// The audit lines of what a run deleted (actor `system:retention` or the admin who
    /// asked), each naming the rule.
    pub fn audit_lines(&self, actor: &str) -> Vec<crate::audit::Event> {
        if self.dry_run {
            return Vec::new();
        }
        let mut out = Vec::new();
        for r in &self.repositories {
            let gone: BTreeSet<&String> = r.manifests.iter().collect();
            for (tag, digest) in &r.tags {
                let mut e = crate::audit::Event::new(actor, "tag.delete");
                e.repository = Some(r.repository.clone());
                e.tag = Some(tag.clone());
                e.digest = Some(digest.clone());
                e.reason = Some(format!("retention rule {}", r.rule));
                out.push(e);
            }
            for d in gone {
                let mut e = crate::audit::Event::new(actor, "manifest.delete");
                e.repository = Some(r.repository.clone());
                e.digest = Some(d.clone());
                e.reason = Some(format!("retention rule {}: nothing keeps it", r.rule));
                out.push(e);
            }
        }
        out
    }

    /// Totals for the log.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.repositories.iter().map(|r| r.tags.len()).sum(),
            self.repositories.iter().map(|r| r.manifests.len()).sum(),
        )
    }
}

/// Runs retention in the server (off the async threads): the deletions are audited and
/// are webhook events; returns the report.
pub async fn run_in_server(
    app: &std::sync::Arc<crate::App>,
    dry_run: bool,
    actor: &str,
) -> Result<Report, ApiError> {
    let a = app.clone();
    let report = crate::handlers::blocking(move || {
        a.retention()
            .run(&a.store, &a.immutable(), crate::now_secs(), dry_run)
    })
    .await?;
    let (tags, manifests) = report.counts();
    tracing::info!(
        dry_run,
        tags,
        manifests,
        freed_bytes = report.freed_bytes,
        "retention"
    );
    let lines = report.audit_lines(actor);
    if app.config.metrics {
        app.metrics.retention_deletions.inc_by(lines.len() as u64);
    }
    let events: Vec<crate::webhooks::Event> = lines
        .iter()
        .map(|l| {
            let kind = if l.action == "tag.delete" {
                crate::webhooks::Kind::TagDeleted
            } else {
                crate::webhooks::Kind::ManifestDeleted
            };
            crate::webhooks::Event::of_audit(kind, l)
        })
        .collect();
    if !events.is_empty() {
        let hooks = app.webhooks.clone();
        crate::handlers::blocking(move || hooks.record(&events)).await?;
    }
    app.audit.record_all(lines).await;
    Ok(report)
}

/// Runs retention every `interval_secs` (never when 0 or without rules).
pub async fn scheduled(app: std::sync::Arc<crate::App>) {
    let every = app.config.retention.interval_secs;
    if every == 0 {
        return;
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(every)).await;
        // (Rules may come with a reload: none now, none run.)
        if app.retention().is_empty() {
            continue;
        }
        let dry_run = app.config.retention.dry_run;
        if let Err(e) = run_in_server(&app, dry_run, "system:retention").await {
            tracing::warn!(error = %e, "scheduled retention failed");
        }
    }
}

/// `ballast retention DIR`: runs the config's rules on a stopped server's data directory;
/// returns the exit code (0 done, 2 could not run).
pub fn offline(
    dir: &std::path::Path,
    config: &crate::Config,
    dry_run: bool,
    json: bool,
    out: &mut dyn std::io::Write,
) -> i32 {
    use ballast_tools::{printable, EXIT_FAILED};
    let fail = |out: &mut dyn std::io::Write, msg: String| {
        let _ = writeln!(out, "retention: {}", printable(&msg));
        EXIT_FAILED
    };
    let rules = match Retention::compile(&config.retention) {
        Ok(r) if r.is_empty() => {
            return fail(
                out,
                "the config has no [[retention.rules]] (pass --config)".into(),
            )
        }
        Ok(r) => r,
        Err(e) => return fail(out, format!("{e:#}")),
    };
    let immutable = match ImmutableRules::compile(&config.immutable_tags) {
        Ok(r) => r,
        Err(e) => return fail(out, format!("{e:#}")),
    };
    let store = match ballast_tools::open_offline(dir, ballast_engine::Options::default()) {
        Ok(s) => s,
        Err(msg) => return fail(out, msg),
    };
    let report = match rules.run(&store, &immutable, crate::now_secs(), dry_run) {
        Ok(r) => r,
        Err(e) => return fail(out, e.to_string()),
    };
    let actor = crate::cli::cli_actor();
    for line in report.audit_lines(&actor) {
        if let Err(e) = crate::audit::append(&config.audit_path(), &line) {
            eprintln!("warning: could not write the audit log: {e}");
            break;
        }
    }
    if let Err(e) = store.close() {
        return fail(out, format!("closing the store: {e}"));
    }
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(&report).unwrap_or_default()
        );
        return 0;
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    for r in &report.repositories {
        let _ = writeln!(
            out,
            "{} (rule {}): {verb} {} tags, {} manifests; frees {} bytes",
            printable(&r.repository),
            r.rule,
            r.tags.len(),
            r.manifests.len(),
            r.freed_bytes
        );
        for (t, d) in &r.tags {
            let _ = writeln!(out, "  tag {}  {d}", printable(t));
        }
        for d in &r.manifests {
            let _ = writeln!(out, "  manifest {d}");
        }
    }
    let _ = writeln!(
        out,
        "{} bytes would be freed by the next garbage collection ({} of them shared between repositories)",
        report.freed_bytes, report.shared_freed_bytes
    );
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::catalog::{ManifestLink, Pulls};

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    fn d(n: u8) -> Digest {
        format!("sha256:{}", hex::encode([n; 32]))
            .parse()
            .expect("digest")
    }

    fn link(pushed_at: u64, references: Vec<Digest>, subject: Option<Digest>) -> ManifestLink {
        ManifestLink {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 100,
            artifact_type: None,
            annotations: Default::default(),
            subject,
            references,
            pushed_at,
            origin: None,
        }
    }

    /// A repository with tag `t<n>` → manifest n set `n` days ago, for n in `tags`.
    fn repo(tags: &[u8]) -> Repo {
        let mut r = Repo::default();
        for &n in tags {
            let at = NOW - u64::from(n) * DAY;
            r.manifests.insert(d(n), link(at, vec![], None));
            r.tags.insert(format!("t{n}"), d(n));
            r.tag_set_at.insert(format!("t{n}"), at);
        }
        r
    }

    fn rules(toml_text: &str) -> Retention {
        #[derive(Deserialize)]
        struct C {
            retention: RetentionConfig,
        }
        let c: C = toml::from_str(toml_text).expect("toml");
        Retention::compile(&c.retention).expect("compile")
    }

    fn plan(r: &Retention, repo: &Repo) -> (Vec<String>, Vec<Digest>) {
        plan_with(r, repo, &ImmutableRules::default())
    }

    fn plan_with(r: &Retention, repo: &Repo, imm: &ImmutableRules) -> (Vec<String>, Vec<Digest>) {
        match r.plan_repo("a/b", repo, NOW, imm) {
            Some((_, tags, ms)) => (tags.into_iter().map(|(t, _)| t).collect(), ms),
            None => (vec![], vec![]),
        }
    }

    #[test]
    fn each_selector_keeps_what_it_says() {
        let r = repo(&[1, 2, 3, 4, 5]);
        let keep2 = rules("[[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pushed = 2\n");
        assert_eq!(plan(&keep2, &r).0, ["t3", "t4", "t5"]);
        assert_eq!(plan(&keep2, &r).1, [d(3), d(4), d(5)]);
        let within =
            rules("[[retention.rules]]\nrepositories = [\"a/**\"]\npushed_within = \"2d 12h\"\n");
        assert_eq!(plan(&within, &r).0, ["t3", "t4", "t5"]);
        let re =
            rules("[[retention.rules]]\nrepositories = [\"a/**\"]\ntags_matching = '^t[15]$'\n");
        assert_eq!(plan(&re, &r).0, ["t2", "t3", "t4"]);
        // Pulls: t4 pulled yesterday, t5 long ago, the rest never.
        let mut pulled = r.clone();
        pulled.pulls.insert(
            d(4),
            Pulls {
                count: 3,
                last: NOW - DAY,
            },
        );
        pulled.pulls.insert(
            d(5),
            Pulls {
                count: 1,
                last: NOW - 40 * DAY,
            },
        );
        let keep_pulled =
            rules("[[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pulled = 1\n");
        assert_eq!(plan(&keep_pulled, &pulled).0, ["t1", "t2", "t3", "t5"]);
        let pulled_within =
            rules("[[retention.rules]]\nrepositories = [\"a/**\"]\npulled_within = \"30d\"\n");
        assert_eq!(plan(&pulled_within, &pulled).0, ["t1", "t2", "t3", "t5"]);
        // Any selector keeps: union.
        let both = rules("[[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pushed = 1\ntags_matching = '^t5$'\n");
        assert_eq!(plan(&both, &r).0, ["t2", "t3", "t4"]);
        // Immutable tags are never deleted.
        let imm = ImmutableRules::compile(&[crate::governance::ImmutableTagRule {
            repositories: vec!["**".into()],
            tags: vec!["t5".into()],
            except: vec![],
        }])
        .expect("imm");
        assert_eq!(plan_with(&keep2, &r, &imm).0, ["t3", "t4"]);
    }

    #[test]
    fn first_matching_rule_governs_and_unmatched_repositories_are_left_alone() {
        let r = repo(&[1, 2, 3]);
        let two = rules(
            "[[retention.rules]]\nrepositories = [\"a/b\"]\nkeep_pushed = 3\n\
             [[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pushed = 1\n",
        );
        assert_eq!(plan(&two, &r).0, Vec::<String>::new());
        let other = rules("[[retention.rules]]\nrepositories = [\"z/**\"]\nkeep_pushed = 1\n");
        assert!(other
            .plan_repo("a/b", &r, NOW, &ImmutableRules::default())
            .is_none());
    }

    #[test]
    fn index_children_referrers_and_cosign_tags_follow_what_they_belong_to() {
        let mut r = repo(&[1, 9]);
        // t9 (old) is an index of manifests 20 and 21; t1 is an image with a signature
        // (referrer 30) and a cosign tag; manifest 9 has a referrer 31.
        r.manifests
            .insert(d(9), link(NOW - 9 * DAY, vec![d(20), d(21)], None));
        r.manifests.insert(d(20), link(NOW - 9 * DAY, vec![], None));
        r.manifests.insert(d(21), link(NOW - 9 * DAY, vec![], None));
        r.manifests
            .insert(d(30), link(NOW - DAY, vec![], Some(d(1))));
        r.manifests
            .insert(d(31), link(NOW - 9 * DAY, vec![], Some(d(9))));
        r.manifests.insert(d(40), link(NOW - DAY, vec![], None));
        let sig_tag = format!("sha256-{}.sig", hex::encode([1u8; 32]));
        r.tags.insert(sig_tag.clone(), d(40));
        let old_sig = format!("sha256-{}.sig", hex::encode([9u8; 32]));
        r.manifests.insert(d(41), link(NOW - 9 * DAY, vec![], None));
        r.tags.insert(old_sig.clone(), d(41));
        let keep1 = rules("[[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pushed = 1\n");
        let (tags, ms) = plan(&keep1, &r);
        assert_eq!(tags, [old_sig, "t9".to_owned()]);
        assert_eq!(ms, [d(9), d(20), d(21), d(31), d(41)]);
        // Keeping the index keeps its children; orphans can be kept.
        let keep_all =
            rules("[[retention.rules]]\nrepositories = [\"a/**\"]\ntags_matching = '^t'\n");
        assert_eq!(plan(&keep_all, &r), (vec![], vec![]));
        let keep_orphans = rules(
            "[retention]\ndelete_orphan_referrers = false\n[[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pushed = 1\n",
        );
        assert_eq!(plan(&keep_orphans, &r).1, [d(9), d(20), d(21), d(41)]);
    }

    #[test]
    fn untagged_manifests_stay_for_a_while_if_asked() {
        let mut r = repo(&[1]);
        r.manifests.insert(d(50), link(NOW - 2 * DAY, vec![], None));
        r.manifests
            .insert(d(51), link(NOW - 20 * DAY, vec![], None));
        let plain = rules("[[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pushed = 5\n");
        assert_eq!(plan(&plain, &r).1, [d(50), d(51)]);
        let week = rules("[[retention.rules]]\nrepositories = [\"a/**\"]\nkeep_pushed = 5\nuntagged_for = \"7d\"\n");
        assert_eq!(plan(&week, &r).1, [d(51)]);
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (text, want) in [
            ("repositories = [\"a\"]", "no keep selector"),
            (
                "repositories = [\"a\"]\npushed_within = \"soon\"",
                "pushed_within = \"soon\"",
            ),
            (
                "repositories = [\"a\"]\ntags_matching = '('",
                "not a regular expression",
            ),
            (
                "repositories = []\nkeep_pushed = 1",
                "repositories is required",
            ),
        ] {
            #[derive(Deserialize)]
            struct C {
                retention: RetentionConfig,
            }
            let c: C = toml::from_str(&format!("[[retention.rules]]\n{text}\n")).expect("toml");
            let e = Retention::compile(&c.retention).expect_err(text);
            assert!(
                format!("{e:#}").contains(want) && format!("{e:#}").contains("#1"),
                "{e:#}"
            );
        }
    }
}
