//! Retention rule evaluation at scale (issue #17: 100 repositories x 1,000 tags in under a
//! second): a catalog of that size with pushes and pulls spread over a year, and rules using
//! every selector, evaluated as a scheduled run does before it commits.

use ballast_engine::catalog::{ManifestLink, Op, State};
use ballast_engine::Digest;
use ballast_server::governance::{ImmutableRules, Retention, RetentionConfig};
use criterion::{criterion_group, criterion_main, Criterion};

const NOW: u64 = 1_800_000_000;

fn digest(repo: u64, n: u64) -> Digest {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&repo.to_le_bytes());
    bytes[8..16].copy_from_slice(&n.to_le_bytes());
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}").parse().expect("digest")
}

fn catalog(repos: u64, tags: u64) -> State {
    let mut s = State::default();
    for r in 0..repos {
        let repo = format!("team-{}/app-{r}", r % 10);
        for t in 0..tags {
            let d = digest(r, t);
            let at = NOW - (t * 7919 % 365) * 86_400;
            s.apply(&Op::PutManifest {
                repo: repo.clone(),
                digest: d.clone(),
                link: ManifestLink {
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                    size: 1000,
                    artifact_type: None,
                    annotations: Default::default(),
                    subject: None,
                    references: vec![digest(r, 1_000_000 + t)],
                    pushed_at: at,
                    origin: None,
                },
            });
            s.apply(&Op::Tag {
                repo: repo.clone(),
                tag: format!("build-{t}"),
                digest: d.clone(),
                at,
            });
            if t % 3 == 0 {
                s.apply(&Op::Pulled {
                    repo: repo.clone(),
                    digest: d,
                    count: t,
                    at: at + 3600,
                });
            }
        }
    }
    s
}

fn bench(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    struct C {
        retention: RetentionConfig,
    }
    let cfg: C = toml::from_str(
        r#"
[[retention.rules]]
repositories = ["team-0/**"]
keep_pushed = 50
[[retention.rules]]
repositories = ["team-*/**"]
keep_pushed = 20
keep_pulled = 20
pushed_within = "30d"
pulled_within = "90d"
tags_matching = '^build-(1|2)\d\d$'
untagged_for = "7d"
"#,
    )
    .expect("config");
    let rules = Retention::compile(&cfg.retention).expect("rules");
    let immutable = ImmutableRules::default();
    let state = catalog(100, 1000);
    let planned = rules.plan(&state, NOW, &immutable);
    let deleted: usize = planned.iter().map(|(_, p)| p.2.len()).sum();
    assert!(deleted > 10_000, "the rules delete something: {deleted}");
    let mut g = c.benchmark_group("retention");
    g.sample_size(10);
    g.bench_function("plan 100 repositories x 1000 tags", |b| {
        b.iter(|| rules.plan(&state, NOW, &immutable).len())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
