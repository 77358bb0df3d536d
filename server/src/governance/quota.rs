//! Quotas (`[[quotas]]`): per namespace (repository globs; the first quota whose globs match
//! a repository charges it) a bound on stored bytes, on repositories, and on tags per
//! repository. A namespace is charged the size of the distinct blobs and manifests its
//! manifests reference (a blob shared by two of its repositories counts once, as Harbor
//! counts). Usage is kept incrementally: the catalog tells every op as plans see it
//! (`catalog::Observer`), so a check inside a commit sees exactly what the commits before it
//! did, and two concurrent pushes cannot both pass a limit only one fits under. It is
//! computed once from the catalog at start.

use std::collections::{HashMap, HashSet};

use anyhow::bail;
use ballast_engine::catalog::{ManifestLink, Observer, Op, State};
use ballast_engine::{Digest, Store};
use globset::GlobMatcher;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// One `[[quotas]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    /// Repository globs that make up the namespace.
    pub namespaces: Vec<String>,
    /// Bytes the namespace may be charged (absent: no bound).
    #[serde(default)]
    pub bytes_max: Option<u64>,
    /// Repositories it may hold.
    #[serde(default)]
    pub repositories_max: Option<usize>,
    /// Tags one of its repositories may hold.
    #[serde(default)]
    pub tags_per_repository_max: Option<usize>,
    /// Above this percentage of a limit, a warning (log, `/admin/usage`).
    #[serde(default = "default_soft")]
    pub soft_percent: u8,
}

fn default_soft() -> u8 {
    80
}

struct Compiled {
    cfg: QuotaRule,
    globs: Vec<GlobMatcher>,
}

#[derive(Default)]
struct Usage {
    /// Blob or manifest → (how many manifests of the namespace reference it, its size).
    refs: HashMap<Digest, (u64, u64)>,
    bytes: u64,
    warned: bool,
}

/// The quotas and their usage.
pub struct Quotas {
    rules: Vec<Compiled>,
    usage: Mutex<Vec<Usage>>,
    store: Store,
    /// Namespaces that just went past their soft percentage, (globs, bytes, limit), for the
    /// `quota.warning` webhook event (recorded after the commit that crossed it).
    crossed: Mutex<Vec<(String, u64, u64)>>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// One namespace's usage, as `GET /admin/usage` answers.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NamespaceUsage {
    /// The quota's globs.
    pub namespaces: Vec<String>,
    /// Bytes charged.
    pub bytes: u64,
    /// The bound on them.
    pub bytes_max: Option<u64>,
    /// Repositories.
    pub repositories: usize,
    /// The bound on them.
    pub repositories_max: Option<usize>,
    /// Most tags in one of its repositories.
    pub tags_most: usize,
    /// The bound on tags per repository.
    pub tags_per_repository_max: Option<usize>,
    /// Physical bytes only this namespace uses (with `?detail=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_bytes: Option<u64>,
    /// Physical bytes it shares with other namespaces or repositories (with `?detail=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_bytes: Option<u64>,
    /// A limit is past its soft percentage (or exceeded).
    pub warning: bool,
}

/// Checks the `[[quotas]]` tables.
pub fn compile_rules(cfg: &[QuotaRule]) -> anyhow::Result<()> {
    compile(cfg).map(drop)
}

fn compile(cfg: &[QuotaRule]) -> anyhow::Result<Vec<Compiled>> {
    cfg.iter()
        .enumerate()
        .map(|(i, q)| {
            let at = format!("[[quotas]] #{}", i + 1);
            if q.namespaces.is_empty() {
                bail!("{at}: namespaces is required (e.g. [\"team-a/**\"])");
            }
            if q.soft_percent == 0 || q.soft_percent > 100 {
                bail!("{at}: soft_percent is a percentage from 1 to 100");
            }
            let globs = crate::auth::repo_globs(&q.namespaces, &at)?;
            Ok(Compiled {
                cfg: q.clone(),
                globs,
            })
        })
        .collect()
}

impl Quotas {
    /// Compiles the rules and computes the usage from the catalog, then follows it.
    pub fn install(store: &Store, cfg: &[QuotaRule]) -> anyhow::Result<std::sync::Arc<Quotas>> {
        let q = std::sync::Arc::new(Quotas {
            rules: compile(cfg)?,
            usage: Mutex::new(Vec::new()),
            store: store.clone(),
            crossed: Mutex::new(Vec::new()),
        });
        if q.rules.is_empty() {
            return Ok(q);
        }
        let observer = q.clone();
        store.catalog().observe(move |state| {
            observer.recount(state);
            observer
        });
        Ok(q)
    }

    /// True when there are no quotas.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn namespace(&self, repo: &str) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.globs.iter().any(|g| g.is_match(repo)))
    }

    fn size_of(&self, state: &State, repo: &str, d: &Digest) -> u64 {
        if let Some(m) = state.repos.get(repo).and_then(|r| r.manifests.get(d)) {
            return m.size;
        }
        self.store.stat(d).ok().flatten().unwrap_or(0)
    }

    /// What a namespace's usage is from a whole state (at start, and for checks).
    fn count(&self, state: &State) -> Vec<Usage> {
        let mut usage: Vec<Usage> = (0..self.rules.len()).map(|_| Usage::default()).collect();
        for (name, repo) in &state.repos {
            let Some(ns) = self.namespace(name) else {
                continue;
            };
            for (d, link) in &repo.manifests {
                self.add(&mut usage[ns], state, name, d, link);
            }
        }
        usage
    }

    fn recount(&self, state: &State) {
        *self.usage.lock() = self.count(state);
    }

    fn add(&self, u: &mut Usage, state: &State, repo: &str, d: &Digest, link: &ManifestLink) {
        for r in std::iter::once(d).chain(&link.references) {
            let size = if r == d {
                link.size
            } else {
                match u.refs.get(r) {
                    Some(&(_, s)) => s,
                    None => self.size_of(state, repo, r),
                }
            };
            let e = u.refs.entry(r.clone()).or_insert((0, size));
            if e.0 == 0 {
                u.bytes += size;
            }
            e.0 += 1;
        }
    }

    fn remove(u: &mut Usage, d: &Digest, link: &ManifestLink) {
        for r in std::iter::once(d).chain(&link.references) {
            if let Some(e) = u.refs.get_mut(r) {
                e.0 = e.0.saturating_sub(1);
                if e.0 == 0 {
                    u.bytes = u.bytes.saturating_sub(e.1);
                    u.refs.remove(r);
                }
            }
        }
    }

    /// Refuses a manifest push that would take its namespace past a bound: bytes (what it
    /// adds that the namespace does not hold yet), repositories (a new one), tags (new ones).
    /// Called inside the commit, with the state it applies to.
    pub fn check_put(
        &self,
        state: &State,
        repo: &str,
        digest: &Digest,
        link: &ManifestLink,
        tags: &[String],
    ) -> Result<(), ApiError> {
        let Some(ns) = self.namespace(repo) else {
            return Ok(());
        };
        let rule = &self.rules[ns].cfg;
        let name = || rule.namespaces.join(", ");
        let existing = state.repos.get(repo);
        if let Some(max) = rule.repositories_max {
            // (A repository counts once it holds a manifest: the blobs of a first push are
            // linked before its manifest arrives.)
            if existing.is_none_or(|r| r.manifests.is_empty()) {
                let n = self.repositories(state, ns);
                if n >= max {
                    return Err(ApiError::Quota(format!(
                        "quota: namespace {} holds {n} repositories, its limit is {max}; \
                         repository {repo} cannot be created",
                        name()
                    )));
                }
            }
        }
        if let Some(max) = rule.tags_per_repository_max {
            let have = existing.map_or(0, |r| r.tags.len());
            let new = tags
                .iter()
                .filter(|t| !existing.is_some_and(|r| r.tags.contains_key(*t)))
                .count();
            if new > 0 && have + new > max {
                return Err(ApiError::Quota(format!(
                    "quota: {repo} holds {have} tags, the limit per repository in namespace \
                     {} is {max}; delete tags first",
                    name()
                )));
            }
        }
        if let Some(max) = rule.bytes_max {
            let usage = self.usage.lock();
            let u = &usage[ns];
            let adds: u64 = std::iter::once(digest)
                .chain(&link.references)
                .collect::<HashSet<_>>()
                .into_iter()
                .filter(|r| !u.refs.contains_key(*r))
                .map(|r| {
                    if r == digest {
                        link.size
                    } else {
                        self.size_of(state, repo, r)
                    }
                })
                .sum();
            if adds > 0 && u.bytes + adds > max {
                return Err(ApiError::Quota(format!(
                    "quota: namespace {} uses {} of its {max} bytes; this push adds {adds}; \
                     delete images (and let garbage collection run) or ask for a larger quota",
                    name(),
                    u.bytes
                )));
            }
        }
        Ok(())
    }

    /// Refuses an upload into a namespace that is already past its byte bound.
    pub fn check_upload(&self, repo: &str) -> Result<(), ApiError> {
        let Some(ns) = self.namespace(repo) else {
            return Ok(());
        };
        let rule = &self.rules[ns].cfg;
        let Some(max) = rule.bytes_max else {
            return Ok(());
        };
        let bytes = self.usage.lock()[ns].bytes;
        if bytes >= max {
            return Err(ApiError::Quota(format!(
                "quota: namespace {} uses {bytes} of its {max} bytes; no more uploads until \
                 images are deleted",
                rule.namespaces.join(", ")
            )));
        }
        Ok(())
    }

    /// Repositories of a namespace that hold a manifest.
    fn repositories(&self, state: &State, ns: usize) -> usize {
        state
            .repos
            .iter()
            .filter(|(name, r)| !r.manifests.is_empty() && self.namespace(name) == Some(ns))
            .count()
    }

    /// Every namespace's usage; `detail` adds unique and shared physical bytes (it reads
    /// the recipes of every live blob).
    pub fn report(&self, detail: bool) -> Result<Vec<NamespaceUsage>, ApiError> {
        // Counts under a short read of the catalog (not held while recipes are read below).
        let counts: Vec<(usize, usize)> = {
            let state = self.store.catalog().read();
            (0..self.rules.len())
                .map(|ns| {
                    let tags_most = state
                        .repos
                        .iter()
                        .filter(|(n, _)| self.namespace(n) == Some(ns))
                        .map(|(_, r)| r.tags.len())
                        .max()
                        .unwrap_or(0);
                    (self.repositories(&state, ns), tags_most)
                })
                .collect()
        };
        let bytes: Vec<u64> = self.usage.lock().iter().map(|u| u.bytes).collect();
        let sharing = if detail {
            let groups: Vec<HashSet<Digest>> = {
                let usage = self.usage.lock();
                usage
                    .iter()
                    .map(|u| u.refs.keys().cloned().collect())
                    .collect()
            };
            Some(
                ballast_engine::inspect::sharing(&self.store, &groups)
                    .map_err(ApiError::from_engine)?,
            )
        } else {
            None
        };
        Ok(self
            .rules
            .iter()
            .enumerate()
            .map(|(ns, r)| {
                let (repositories, tags_most) = counts[ns];
                let soft = |have: u64, max: Option<u64>| {
                    max.is_some_and(|m| have * 100 >= m * u64::from(r.cfg.soft_percent))
                };
                NamespaceUsage {
                    namespaces: r.cfg.namespaces.clone(),
                    bytes: bytes[ns],
                    bytes_max: r.cfg.bytes_max,
                    repositories,
                    repositories_max: r.cfg.repositories_max,
                    tags_most,
                    tags_per_repository_max: r.cfg.tags_per_repository_max,
                    unique_bytes: sharing.as_ref().map(|s| s[ns].0),
                    shared_bytes: sharing.as_ref().map(|s| s[ns].1),
                    warning: soft(bytes[ns], r.cfg.bytes_max)
                        || soft(
                            repositories as u64,
                            r.cfg.repositories_max.map(|m| m as u64),
                        )
                        || soft(
                            tags_most as u64,
                            r.cfg.tags_per_repository_max.map(|m| m as u64),
                        ),
                }
            })
            .collect())
    }

    /// True when the usage kept incrementally equals a full recount of the catalog.
    pub fn consistent(&self) -> bool {
        let state = self.store.catalog().read().clone();
        let fresh: Vec<u64> = self.count(&state).iter().map(|u| u.bytes).collect();
        let kept: Vec<u64> = self.usage.lock().iter().map(|u| u.bytes).collect();
        fresh == kept
    }

    fn soft_warning(&self, ns: usize, u: &mut Usage) {
        let r = &self.rules[ns].cfg;
        let Some(max) = r.bytes_max else { return };
        let over = u.bytes * 100 >= max * u64::from(r.soft_percent);
        if over && !u.warned {
            tracing::warn!(
                namespace = %r.namespaces.join(", "),
                bytes = u.bytes,
                bytes_max = max,
                "quota: namespace past {}% of its byte limit",
                r.soft_percent
            );
            self.crossed
                .lock()
                .push((r.namespaces.join(","), u.bytes, max));
        }
        u.warned = over;
    }

    /// The namespaces that went past their soft percentage since the last call.
    pub fn take_crossed(&self) -> Vec<(String, u64, u64)> {
        std::mem::take(&mut *self.crossed.lock())
    }
}

impl Observer for Quotas {
    fn applied(&self, before: &State, op: &Op) {
        let (repo, digest) = match op {
            Op::PutManifest { repo, digest, .. } | Op::DeleteManifest { repo, digest } => {
                (repo, digest)
            }
            _ => return,
        };
        let Some(ns) = self.namespace(repo) else {
            return;
        };
        let old = before.repos.get(repo).and_then(|r| r.manifests.get(digest));
        let mut usage = self.usage.lock();
        let u = &mut usage[ns];
        match op {
            // The same digest is the same content: a push again changes nothing.
            Op::PutManifest { link, .. } if old.is_none() => {
                self.add(u, before, repo, digest, link)
            }
            Op::DeleteManifest { .. } => {
                if let Some(link) = old {
                    Self::remove(u, digest, link);
                }
            }
            _ => {}
        }
        self.soft_warning(ns, u);
    }
}

/// `ballast inspect DIR --config FILE`: every namespace's usage against its limits, offline;
/// returns the exit code (0, or 2 when it could not run).
pub fn offline_report(
    dir: &std::path::Path,
    rules: &[QuotaRule],
    json: bool,
    out: &mut dyn std::io::Write,
) -> i32 {
    use ballast_tools::{printable, EXIT_FAILED};
    if rules.is_empty() {
        return 0;
    }
    let store = match ballast_tools::open_offline(dir, ballast_engine::Options::default()) {
        Ok(s) => s,
        Err(msg) => {
            let _ = writeln!(out, "inspect: {}", printable(&msg));
            return EXIT_FAILED;
        }
    };
    let report = Quotas::install(&store, rules)
        .map_err(|e| format!("{e:#}"))
        .and_then(|q| q.report(true).map_err(|e| e.to_string()));
    let _ = store.close();
    match report {
        Ok(usage) if json => {
            let _ = writeln!(out, "{}", serde_json::json!({ "namespaces": usage }));
            0
        }
        Ok(usage) => {
            let _ = writeln!(out, "\nquotas:");
            let limit = |m: Option<String>| m.unwrap_or_else(|| "-".into());
            for u in usage {
                let _ = writeln!(
                    out,
                    "  {:<24} {} of {} bytes (unique {}, shared {}), {} of {} repositories, \
                     at most {} of {} tags{}",
                    printable(&u.namespaces.join(",")),
                    u.bytes,
                    limit(u.bytes_max.map(|m| m.to_string())),
                    u.unique_bytes.unwrap_or(0),
                    u.shared_bytes.unwrap_or(0),
                    u.repositories,
                    limit(u.repositories_max.map(|m| m.to_string())),
                    u.tags_most,
                    limit(u.tags_per_repository_max.map(|m| m.to_string())),
                    if u.warning {
                        "  WARNING: near or past a limit"
                    } else {
                        ""
                    }
                );
            }
            0
        }
        Err(msg) => {
            let _ = writeln!(out, "inspect: {}", printable(&msg));
            EXIT_FAILED
        }
    }
}
