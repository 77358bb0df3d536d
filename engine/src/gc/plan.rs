//! Mark and plan, pure: which links and manifests a catalog state no longer needs and which

//! digests stay, and which sealed segments are dead enough to compact.

use std::collections::HashSet;

use crate::catalog::{Op, State};
use crate::digest::Digest;
use crate::segment::FILE_HEADER_LEN;

use super::GcOptions;

/// Marks one catalog state: the ops that drop what nothing needs, and every digest (blob or
/// manifest, any repository) that stays.
pub fn mark(state: &State, now: u64, opts: &GcOptions) -> (Vec<Op>, HashSet<Digest>) {
    let cutoff = now.saturating_sub(opts.grace_secs);
    let mut ops = Vec::new();
    let mut live_all = HashSet::new();
    for (name, repo) in &state.repos {
        let mut live: HashSet<&Digest> = repo.tags.values().collect();
        for (d, link) in &repo.manifests {
            if !opts.delete_untagged || link.pushed_at > cutoff {
                live.insert(d);
            }
        }
        // Close over references (index → manifests) and referrers (subject → referrer).
        let mut blobs: HashSet<&Digest> = HashSet::new();
        loop {
            let before = live.len();
            for d in live.clone() {
                if let Some(link) = repo.manifests.get(d) {
                    for r in &link.references {
                        if repo.manifests.contains_key(r) {
                            live.insert(r);
                        } else {
                            blobs.insert(r);
                        }
                    }
                }
            }
            for (d, link) in &repo.manifests {
                if link.subject.as_ref().is_some_and(|s| live.contains(s)) {
                    live.insert(d);
                }
            }
            if live.len() == before {
                break;
            }
        }
        for d in repo.manifests.keys() {
            if live.contains(d) {
                live_all.insert(d.clone());
            } else {
                ops.push(Op::DeleteManifest {
                    repo: name.clone(),
                    digest: d.clone(),
                });
            }
        }
        for (d, at) in &repo.blobs {
            if blobs.contains(d) || *at > cutoff {
                live_all.insert(d.clone());
            } else {
                ops.push(Op::UnlinkBlob {
                    repo: name.clone(),
                    digest: d.clone(),
                });
            }
        }
    }
    (ops, live_all)
}

/// A sealed segment as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentStats {
    /// Segment id.
    pub id: u64,
    /// File size.
    pub size: u64,
    /// Bytes of records something still needs.
    pub live: u64,
    /// Last modification, seconds since the epoch.
    pub mtime: u64,
}

/// Chooses the segments to compact: dead fraction at or above the threshold (half of it for
/// segments older than a week), and older than the grace period (a segment written within
/// it may hold a blob committed but not linked yet).
pub fn plan(segments: &[SegmentStats], now: u64, opts: &GcOptions) -> Vec<u64> {
    const WEEK: u64 = 7 * 24 * 3600;
    segments
        .iter()
        .filter(|s| s.size > FILE_HEADER_LEN as u64)
        .filter(|s| s.mtime.saturating_add(opts.grace_secs) <= now)
        .filter(|s| {
            let dead = s.size.saturating_sub(s.live) as f64 / s.size as f64;
            let min = if s.mtime.saturating_add(WEEK) <= now {
                opts.dead_fraction_min / 2.0
            } else {
                opts.dead_fraction_min
            };
            dead >= min
        })
        .map(|s| s.id)
        .collect()
}

/// Small segments are folded only when at least this many are: fewer are not worth a copy.
pub const FOLD_MIN_SEGMENTS: usize = 4;

/// The small segments to fold together besides the `chosen` ones: smaller than
/// `fold_below_bytes`, older than the grace period, and at least [`FOLD_MIN_SEGMENTS`] of
/// them (none otherwise).
pub fn fold(
    segments: &[SegmentStats],
    chosen: &HashSet<u64>,
    now: u64,
    opts: &GcOptions,
) -> Vec<u64> {
    if opts.fold_below_bytes == 0 {
        return Vec::new();
    }
    let small: Vec<u64> = segments
        .iter()
        .filter(|s| s.size > FILE_HEADER_LEN as u64 && s.size < opts.fold_below_bytes)
        .filter(|s| s.mtime.saturating_add(opts.grace_secs) <= now)
        .filter(|s| !chosen.contains(&s.id))
        .map(|s| s.id)
        .collect();
    if small.len() >= FOLD_MIN_SEGMENTS {
        small
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ManifestLink, Repo};
    use crate::digest::Algorithm;
    use crate::gc::GcOptions;

    fn d(s: &str) -> Digest {
        Digest::of(Algorithm::Sha256, s.as_bytes())
    }

    fn manifest(refs: &[&str], subject: Option<&str>, pushed_at: u64) -> ManifestLink {
        ManifestLink {
            media_type: "m".into(),
            size: 1,
            artifact_type: None,
            annotations: Default::default(),
            subject: subject.map(d),
            references: refs.iter().map(|r| d(r)).collect(),
            pushed_at,
            origin: None,
        }
    }

    fn state() -> State {
        let mut repo = Repo::default();
        for b in ["cfg", "layer", "old-layer", "fresh-layer", "child-cfg"] {
            repo.blobs
                .insert(d(b), if b == "fresh-layer" { 990 } else { 10 });
        }
        repo.manifests
            .insert(d("m1"), manifest(&["cfg", "layer"], None, 10));
        repo.manifests
            .insert(d("child"), manifest(&["child-cfg"], None, 10));
        repo.manifests
            .insert(d("index"), manifest(&["child"], None, 10));
        repo.manifests
            .insert(d("sig"), manifest(&["layer"], Some("m1"), 10));
        repo.manifests
            .insert(d("untagged"), manifest(&["old-layer"], None, 10));
        repo.tags.insert("v1".into(), d("m1"));
        repo.tags.insert("multi".into(), d("index"));
        State {
            repos: [("r".to_owned(), repo)].into(),
            ..State::default()
        }
    }

    #[test]
    fn mark_keeps_what_tags_reach() {
        let opts = GcOptions {
            grace_secs: 100,
            ..GcOptions::default()
        };
        let (ops, live) = mark(&state(), 1000, &opts);
        // Untagged manifests are kept by default, and so is what they reference.
        assert!(ops.is_empty(), "{ops:?}");
        assert!(live.contains(&d("old-layer")) && live.contains(&d("untagged")));

        let opts = GcOptions {
            grace_secs: 100,
            delete_untagged: true,
            ..GcOptions::default()
        };
        let (ops, live) = mark(&state(), 1000, &opts);
        for keep in [
            "m1",
            "cfg",
            "layer",
            "index",
            "child",
            "child-cfg",
            "sig",
            "fresh-layer",
        ] {
            assert!(live.contains(&d(keep)), "{keep} must stay");
        }
        assert!(!live.contains(&d("untagged")) && !live.contains(&d("old-layer")));
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(ops.contains(&Op::DeleteManifest {
            repo: "r".into(),
            digest: d("untagged")
        }));
        assert!(ops.contains(&Op::UnlinkBlob {
            repo: "r".into(),
            digest: d("old-layer")
        }));
    }

    #[test]
    fn plan_takes_mostly_dead_old_enough_segments() {
        let opts = GcOptions {
            grace_secs: 100,
            ..GcOptions::default()
        };
        let s = |id, size, live, mtime| SegmentStats {
            id,
            size,
            live,
            mtime,
        };
        let now = 1_000_000_000;
        let segs = [
            s(1, 1000, 400, now - 200),           // 60% dead: compact
            s(2, 1000, 600, now - 200),           // 40% dead: keep
            s(3, 1000, 0, now - 50),              // all dead but within grace: keep
            s(4, 1000, 700, now - 8 * 24 * 3600), // 30% dead, older than a week: compact
            s(5, 16, 16, now - 200),              // empty: nothing to gain
        ];
        assert_eq!(plan(&segs, now, &opts), vec![1, 4]);
        assert!(
            fold(&segs, &HashSet::new(), now, &opts).is_empty(),
            "off by default"
        );
    }

    #[test]
    fn small_segments_are_folded_once_there_are_enough_of_them() {
        let opts = GcOptions {
            grace_secs: 100,
            fold_below_bytes: 1000,
            ..GcOptions::default()
        };
        let s = |id, size, mtime| SegmentStats {
            id,
            size,
            live: size,
            mtime,
        };
        let now = 1_000_000_000;
        let old = now - 200;
        let mut segs = vec![
            s(1, 500, old),
            s(2, 900, old),
            s(3, 5000, old),     // large: stays
            s(4, 300, now - 50), // within grace: stays
            s(5, 16, old),       // empty: nothing to gain
            s(6, 700, old),
        ];
        let chosen: HashSet<u64> = [2].into();
        assert!(
            fold(&segs, &chosen, now, &opts).is_empty(),
            "two small ones besides the chosen: not worth it"
        );
        segs.push(s(7, 100, old));
        segs.push(s(8, 999, old));
        assert_eq!(fold(&segs, &chosen, now, &opts), vec![1, 6, 7, 8]);
    }
}
