//! Eviction of cached images. The unit is an image: a cached manifest that is tagged or that
//! no other manifest of its repository lists, with the manifests it lists (an index's
//! children) and those that refer to it (signatures, SBOMs). Its last use is its last pull,
//! or when it or one of its tags was fetched. Per upstream:
//!
//! 1. images not used for `evict_unpulled_days` go;
//! 2. then, most recently used first, images are kept while the bytes they hold together
//!    (blobs shared between them counted once) stay within `bytes_max`; the rest go.
//!
//! Evicting deletes manifests; their blobs' links go with the next collection's mark once no
//! kept manifest references them, and their bytes with its compaction (as for any delete).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ballast_engine::catalog::{Op, Repo, State};
use ballast_engine::Digest;
use serde::Serialize;

use super::Upstream;
use crate::error::ApiError;
use crate::handlers::blocking;
use crate::App;

/// An image evicted (or that a dry run would evict).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Evicted {
    /// The upstream's name.
    pub upstream: String,
    /// Repository.
    pub repository: String,
    /// The image's manifest.
    pub digest: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Bytes it holds (its manifests and blobs, shared ones included).
    pub bytes: u64,
    /// Its last use, Unix seconds.
    pub last_used: u64,
    /// `unpulled` or `bytes_max`.
    pub reason: &'static str,
}

/// What an eviction did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// True when nothing was changed.
    pub dry_run: bool,
    /// The images evicted.
    pub evicted: Vec<Evicted>,
    /// Manifests deleted (images with their children and referrers).
    pub manifests_deleted: usize,
    /// Per upstream: bytes its kept images hold.
    pub kept_bytes: BTreeMap<String, u64>,
}

struct Image<'s> {
    repo: &'s str,
    digest: &'s Digest,
    /// The image's manifests: itself, its children, its referrers.
    manifests: Vec<&'s Digest>,
    /// Every digest it holds (manifests and blobs).
    holds: HashSet<&'s Digest>,
    last_used: u64,
}

fn images<'s>(name: &'s str, repo: &'s Repo) -> Vec<Image<'s>> {
    let listed: HashSet<&Digest> = repo
        .manifests
        .values()
        .flat_map(|l| l.references.iter())
        .filter(|r| repo.manifests.contains_key(*r))
        .collect();
    let tagged: HashSet<&Digest> = repo.tags.values().collect();
    let mut out = Vec::new();
    for (d, link) in &repo.manifests {
        if link.subject.is_some() && !tagged.contains(d) {
            continue; // a referrer: goes with its subject
        }
        if listed.contains(d) && !tagged.contains(d) {
            continue; // a child: goes with its index
        }
        let mut manifests = vec![d];
        let mut holds: HashSet<&Digest> = HashSet::from([d]);
        let mut i = 0;
        while i < manifests.len() {
            let m = manifests[i];
            i += 1;
            if let Some(l) = repo.manifests.get(m) {
                for r in &l.references {
                    if holds.insert(r) && repo.manifests.contains_key(r) {
                        manifests.push(r);
                    }
                }
            }
            for (rd, rl) in &repo.manifests {
                if rl.subject.as_ref() == Some(m) && holds.insert(rd) {
                    manifests.push(rd);
                }
            }
        }
        let mut last_used = 0;
        for m in &manifests {
            if let Some(l) = repo.manifests.get(*m) {
                last_used = last_used.max(l.pushed_at);
            }
            if let Some(p) = repo.pulls.get(*m) {
                last_used = last_used.max(p.last);
            }
        }
        for (t, td) in &repo.tags {
            if td == d {
                last_used = last_used.max(repo.tag_set_at.get(t).copied().unwrap_or(0));
            }
        }
        out.push(Image {
            repo: name,
            digest: d,
            manifests,
            holds,
            last_used,
        });
    }
    out
}

/// Plans the eviction of one upstream's images from a catalog state: the images, and the
/// bytes the kept ones hold. `size` gives a digest's stored size (0 when not held).
pub fn plan(
    state: &State,
    up: &Upstream,
    size: &dyn Fn(&Digest) -> u64,
    now: u64,
) -> (Vec<Evicted>, Vec<Op>, u64) {
    let mut all: Vec<Image<'_>> = state
        .repos
        .iter()
        .filter(|(name, _)| name.starts_with(&up.local))
        .flat_map(|(name, repo)| images(name, repo))
        .collect();
    // Most recently used first.
    all.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.digest.cmp(b.digest)));
    let cutoff = up
        .cfg
        .evict_unpulled_days
        .map(|d| now.saturating_sub(d.saturating_mul(86_400)));
    let mut kept: HashSet<(&str, &Digest)> = HashSet::new();
    // (A blob is stored once, whichever repositories hold it.)
    let mut kept_digests: HashSet<&Digest> = HashSet::new();
    let mut kept_bytes = 0u64;
    let mut evicted: Vec<(&Image<'_>, &'static str)> = Vec::new();
    for img in &all {
        if cutoff.is_some_and(|c| img.last_used < c) {
            evicted.push((img, "unpulled"));
            continue;
        }
        let new: u64 = img
            .holds
            .iter()
            .filter(|d| !kept_digests.contains(*d))
            .map(|d| size(d))
            .sum();
        if up.cfg.bytes_max.is_some_and(|cap| kept_bytes + new > cap) {
            evicted.push((img, "bytes_max"));
            continue;
        }
        kept_bytes += new;
        kept.extend(img.holds.iter().map(|d| (img.repo, *d)));
        kept_digests.extend(img.holds.iter().copied());
    }
    let mut ops = Vec::new();
    let mut out = Vec::new();
    for (img, reason) in evicted {
        let repo = &state.repos[img.repo];
        for m in &img.manifests {
            // (A manifest another kept image also lists stays.)
            if !kept.contains(&(img.repo, *m)) {
                ops.push(Op::DeleteManifest {
                    repo: img.repo.to_owned(),
                    digest: (*m).clone(),
                });
            }
        }
        out.push(Evicted {
            upstream: up.cfg.name.clone(),
            repository: img.repo.to_owned(),
            digest: img.digest.to_string(),
            tags: repo
                .tags
                .iter()
                .filter(|(_, d)| *d == img.digest)
                .map(|(t, _)| t.clone())
                .collect(),
            bytes: img.holds.iter().map(|d| size(d)).sum(),
            last_used: img.last_used,
            reason,
        });
    }
    (out, ops, kept_bytes)
}

/// Runs the eviction of every upstream with a rule (a dry run changes nothing); audited as
/// `pull_through.evict` when it deletes something.
pub async fn run(app: &Arc<App>, dry_run: bool, actor: &str) -> Result<Report, ApiError> {
    let ups: Vec<Arc<Upstream>> = app
        .pull_through
        .upstreams()
        .iter()
        .filter(|u| u.cfg.evict_unpulled_days.is_some() || u.cfg.bytes_max.is_some())
        .cloned()
        .collect();
    if ups.is_empty() {
        return Ok(Report {
            dry_run,
            ..Report::default()
        });
    }
    let store = app.store.clone();
    let report = blocking(move || {
        // Sizes first, off the commit lock.
        let digests: HashSet<Digest> = {
            let state = store.catalog().read();
            state
                .repos
                .iter()
                .filter(|(n, _)| ups.iter().any(|u| n.starts_with(&u.local)))
                .flat_map(|(_, r)| {
                    r.manifests
                        .iter()
                        .flat_map(|(d, l)| std::iter::once(d).chain(&l.references))
                })
                .cloned()
                .collect()
        };
        let sizes: HashMap<Digest, u64> = digests
            .into_iter()
            .filter_map(|d| store.stat(&d).ok().flatten().map(|n| (d, n)))
            .collect();
        let size = |d: &Digest| sizes.get(d).copied().unwrap_or(0);
        let now = crate::now_secs();
        let plan_all = |state: &State| {
            let mut report = Report {
                dry_run,
                ..Report::default()
            };
            let mut ops = Vec::new();
            for u in &ups {
                let (evicted, o, kept) = plan(state, u, &size, now);
                report.evicted.extend(evicted);
                ops.extend(o);
                report.kept_bytes.insert(u.cfg.name.clone(), kept);
            }
            report.manifests_deleted = ops.len();
            (ops, report)
        };
        if dry_run {
            let state = store.catalog().read();
            return Ok(plan_all(&state).1);
        }
        let report = store.commit_catalog(|state| Ok::<_, ApiError>(plan_all(state)))?;
        for e in &report.evicted {
            if let Some(u) = ups.iter().find(|u| u.cfg.name == e.upstream) {
                u.counters.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(report)
    })
    .await?;
    if !dry_run && !report.evicted.is_empty() {
        let mut e = crate::audit::Event::new(actor, "pull_through.evict");
        e.reason = Some(format!(
            "{} cached images evicted ({} manifests): {}",
            report.evicted.len(),
            report.manifests_deleted,
            report
                .evicted
                .iter()
                .take(20)
                .map(|x| format!("{}@{} ({})", x.repository, x.digest, x.reason))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        app.audit.record(e).await;
        tracing::info!(
            images = report.evicted.len(),
            manifests = report.manifests_deleted,
            "pull-through cache eviction"
        );
    }
    Ok(report)
}

/// How often eviction runs on its own.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs eviction every [`INTERVAL`] while some upstream has a rule.
pub async fn scheduled(app: Arc<App>) {
    if !app
        .pull_through
        .upstreams()
        .iter()
        .any(|u| u.cfg.evict_unpulled_days.is_some() || u.cfg.bytes_max.is_some())
    {
        return;
    }
    loop {
        tokio::time::sleep(INTERVAL).await;
        if let Err(e) = run(&app, false, "system").await {
            tracing::warn!(error = %e, "pull-through cache eviction failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use ballast_engine::catalog::{ManifestLink, Pulls};

    use super::*;
    use crate::upstream::{compile, UpstreamConfig};

    const DAY: u64 = 86_400;
    const NOW: u64 = 1_800_000_000;

    fn d(n: u8) -> Digest {
        format!("sha256:{}", hex::encode([n; 32]))
            .parse()
            .expect("digest")
    }

    fn link(refs: &[u8], subject: Option<u8>, at: u64) -> ManifestLink {
        ManifestLink {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1,
            artifact_type: None,
            annotations: Default::default(),
            subject: subject.map(d),
            references: refs.iter().map(|r| d(*r)).collect(),
            pushed_at: at,
            origin: Some("http://up/x".into()),
        }
    }

    fn upstream(days: Option<u64>, bytes_max: Option<u64>) -> Arc<Upstream> {
        let cfg: UpstreamConfig =
            toml::from_str("name = \"up\"\nprefix = \"cache/up\"\nurl = \"http://127.0.0.1:1\"")
                .expect("config");
        let cfg = UpstreamConfig {
            evict_unpulled_days: days,
            bytes_max,
            ..cfg
        };
        compile(&[cfg]).expect("compile").remove(0)
    }

    /// cache/up/a: `old` (manifest 1, blobs 10 11) pulled 40 days ago; `new` (manifest 2,
    /// blobs 11 12) pulled yesterday, with a signature (3, subject 2); `multi` (index 4 of
    /// manifest 5, blob 13) fetched 10 days ago. A pushed repository beside it.
    fn state() -> State {
        let mut s = State::default();
        let r = s.repos.entry("cache/up/a".into()).or_default();
        r.manifests
            .insert(d(1), link(&[10, 11], None, NOW - 50 * DAY));
        r.manifests
            .insert(d(2), link(&[11, 12], None, NOW - 50 * DAY));
        r.manifests
            .insert(d(3), link(&[14], Some(2), NOW - 50 * DAY));
        r.manifests.insert(d(4), link(&[5], None, NOW - 10 * DAY));
        r.manifests.insert(d(5), link(&[13], None, NOW - 10 * DAY));
        r.tags.insert("old".into(), d(1));
        r.tags.insert("new".into(), d(2));
        r.tags.insert("multi".into(), d(4));
        r.pulls.insert(
            d(1),
            Pulls {
                count: 1,
                last: NOW - 40 * DAY,
            },
        );
        r.pulls.insert(
            d(2),
            Pulls {
                count: 9,
                last: NOW - DAY,
            },
        );
        let p = s.repos.entry("team/pushed".into()).or_default();
        p.manifests.insert(d(1), link(&[10, 11], None, 0));
        p.tags.insert("x".into(), d(1));
        s
    }

    fn size(x: &Digest) -> u64 {
        if x.to_string().starts_with("sha256:0a0a") || x.to_string().starts_with("sha256:0b0b") {
            100 // blobs 10 and 11
        } else if x.to_string().starts_with("sha256:0c0c")
            || x.to_string().starts_with("sha256:0d0d")
        {
            50 // 12 and 13
        } else {
            1
        }
    }

    fn deleted(ops: &[Op]) -> Vec<(String, Digest)> {
        ops.iter()
            .map(|o| match o {
                Op::DeleteManifest { repo, digest } => (repo.clone(), digest.clone()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn unpulled_images_go_with_nothing_else() {
        let up = upstream(Some(30), None);
        let (evicted, ops, _) = plan(&state(), &up, &size, NOW);
        assert_eq!(evicted.len(), 1, "{evicted:?}");
        assert_eq!(evicted[0].tags, vec!["old".to_owned()]);
        assert_eq!(evicted[0].reason, "unpulled");
        assert_eq!(deleted(&ops), vec![("cache/up/a".into(), d(1))]);
    }

    #[test]
    fn a_cap_keeps_the_most_recently_used_and_counts_shared_blobs_once() {
        // new: 1 + 100 + 50 (+ its signature 1 + 1) = 153; multi: 1 + 1 + 50 = 52 (used 10
        // days ago); old: 1 + 100 + 100, of which 11 is shared with new: +101.
        let up = upstream(None, Some(210));
        let (evicted, ops, kept) = plan(&state(), &up, &size, NOW);
        assert_eq!(kept, 153 + 52);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].digest, d(1).to_string());
        assert_eq!(evicted[0].reason, "bytes_max");
        assert_eq!(deleted(&ops), vec![("cache/up/a".into(), d(1))]);
        // A smaller cap: only the most recent image stays, with its signature; the index
        // goes with its child.
        let up = upstream(None, Some(160));
        let (evicted, ops, kept) = plan(&state(), &up, &size, NOW);
        assert_eq!(kept, 153);
        assert_eq!(evicted.len(), 2);
        let gone = deleted(&ops);
        for m in [1, 4, 5] {
            assert!(gone.contains(&("cache/up/a".into(), d(m))), "{gone:?}");
        }
        assert!(!gone.iter().any(|(r, _)| r == "team/pushed"));
        assert!(!gone.contains(&("cache/up/a".into(), d(3))), "{gone:?}");
    }
}
