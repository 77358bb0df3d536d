//! Governance rules a running server enforces: tag immutability, over HTTP and against a
//! real client (what skopeo prints when it is refused).

use std::process::Command;

use crate::http::call;
use crate::{have, oci, push_image_as, Registry};

const RULES: &str = r#"
[[immutable_tags]]
repositories = ["prod/**"]
tags = ["v*"]
except = ["v*-rc"]
"#;

fn start(dir: &std::path::Path) -> Registry {
    let cfg = dir.join("ballast.toml");
    std::fs::write(&cfg, RULES).expect("config");
    Registry::start_args(
        &dir.join("data"),
        &[],
        &["--config", &cfg.to_string_lossy()],
    )
}

#[test]
fn immutable_tags_refuse_moves_and_deletes_with_a_409_that_names_the_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = start(dir.path());
    let base = r.url("");
    let first = push_image_as(&base, "prod/api", "v1", 1, 1000, &[]);
    // The same manifest again: accepted.
    assert_eq!(push_image_as(&base, "prod/api", "v1", 1, 1000, &[]), first);
    // Another manifest under it: refused, and the tag still points at the first.
    let (res, _) = crate::try_push_image_as(&base, "prod/api", "v1", 2, 1000, &[]);
    assert_eq!(res.status, 409, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.code(), "DENIED");
    let msg = res.json()["errors"][0]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        msg.contains("tag prod/api:v1 is immutable")
            && msg.contains("immutable_tags rule 1")
            && msg.contains(&first),
        "{msg}"
    );
    let head = call("HEAD", &r.url("/v2/prod/api/manifests/v1"), &[], None);
    assert_eq!(head.header("docker-content-digest"), Some(first.as_str()));
    // Deleting the tag, or its manifest, is refused too.
    let del = call("DELETE", &r.url("/v2/prod/api/manifests/v1"), &[], None);
    assert_eq!((del.status, del.code()), (409, "DENIED".to_owned()));
    let del = call(
        "DELETE",
        &r.url(&format!("/v2/prod/api/manifests/{first}")),
        &[],
        None,
    );
    assert_eq!(del.status, 409);
    assert!(del.json()["errors"][0]["message"]
        .as_str()
        .is_some_and(|m| m.contains("prod/api:v1")));
    // Exceptions and other repositories move freely.
    push_image_as(&base, "prod/api", "v2-rc", 3, 1000, &[]);
    push_image_as(&base, "prod/api", "v2-rc", 4, 1000, &[]);
    push_image_as(&base, "prod/api", "latest", 3, 1000, &[]);
    push_image_as(&base, "prod/api", "latest", 4, 1000, &[]);
    push_image_as(&base, "dev/api", "v1", 3, 1000, &[]);
    push_image_as(&base, "dev/api", "v1", 4, 1000, &[]);
    assert_eq!(
        call("DELETE", &r.url("/v2/prod/api/manifests/latest"), &[], None).status,
        202
    );
    // The refusal is audited with its reason.
    let audit = std::fs::read_to_string(r.data.join("audit").join("audit.log")).expect("audit");
    assert!(audit
        .lines()
        .any(|l| l.contains("\"action\":\"manifest.put\"")
            && l.contains("\"outcome\":\"failed\"")
            && l.contains("is immutable")));
}

#[test]
fn two_concurrent_pushes_to_a_new_immutable_tag_cannot_both_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = start(dir.path());
    let base = r.url("");
    // Blobs first, so the race is between the two manifest PUTs.
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let base = base.clone();
                s.spawn(move || {
                    let (res, digest) =
                        crate::try_push_image_as(&base, "prod/race", "v1", 100 + i, 500, &[]);
                    (res.status, digest)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    let won: Vec<&String> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, d)| d)
        .collect();
    assert_eq!(won.len(), 1, "{results:?}");
    assert!(
        results.iter().all(|(s, _)| *s == 201 || *s == 409),
        "{results:?}"
    );
    let head = call("HEAD", &r.url("/v2/prod/race/manifests/v1"), &[], None);
    assert_eq!(head.header("docker-content-digest"), Some(won[0].as_str()));
}

#[test]
fn skopeo_shows_the_immutability_message() {
    assert!(
        have("skopeo"),
        "skopeo is not installed: run scripts/install-test-deps"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let r = start(dir.path());
    let copy = |seed: u64| {
        let layout = dir.path().join(format!("img{seed}"));
        let m = oci::image(&layout, seed, 1, 20_000, "amd64");
        oci::finish_layout(&layout, &m, "v1");
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{}/prod/web:v1.0", r.host()))
            .output()
            .expect("skopeo")
    };
    assert!(copy(1).status.success());
    let out = copy(2);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // What the user sees: the registry's message, not just a status code.
    assert!(
        err.contains("tag prod/web:v1.0 is immutable"),
        "skopeo printed: {err}"
    );
}

/// The catalog of a stopped registry's data directory.
pub fn catalog_of(data: &std::path::Path) -> ballast_engine::catalog::State {
    let store =
        ballast_engine::Store::open(data, ballast_engine::Options::default()).expect("open");
    let state = store.catalog().read().clone();
    store.close().expect("close");
    state
}

#[test]
fn pulls_and_tag_times_are_recorded_in_batches_and_survive_restart_and_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut r = Registry::start_with(&data, &[("BALLAST_PULL_FLUSH_SECS", "1")]);
    let base = r.url("");
    let before = crate::now();
    let digest = push_image_as(&base, "team/app", "v1", 1, 1000, &[]);
    let url = r.url("/v2/team/app/manifests/");
    let get = |reference: &str| {
        let res = call("GET", &format!("{url}{reference}"), &[], None);
        assert_eq!(res.status, 200);
    };
    get("v1");
    get("v1");
    get(&digest);
    // HEAD is a check, not a pull.
    assert_eq!(
        call("HEAD", &r.url("/v2/team/app/manifests/v1"), &[], None).status,
        200
    );
    r.stop();
    let cat = catalog_of(&data);
    let repo = &cat.repos["team/app"];
    let d: ballast_engine::Digest = digest.parse().expect("digest");
    assert_eq!(repo.pulls[&d].count, 3);
    assert!(repo.pulls[&d].last >= before);
    assert!(repo.tag_set_at["v1"] >= before);

    // Killed: what was flushed (every second here) is there.
    r.restart();
    get("v1");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    r.kill();
    let cat = catalog_of(&data);
    assert_eq!(cat.repos["team/app"].pulls[&d].count, 4);
    // A deleted manifest takes its counts with it; fsck finds the catalog consistent.
    r.restart();
    assert_eq!(
        call(
            "DELETE",
            &r.url(&format!("/v2/team/app/manifests/{digest}")),
            &[],
            None
        )
        .status,
        202
    );
    r.stop();
    assert!(!catalog_of(&data)
        .repos
        .get("team/app")
        .is_some_and(|r| r.pulls.contains_key(&d)));
    crate::assert_fsck_clean(&data);
}

#[test]
fn retention_dry_run_changes_nothing_then_a_run_deletes_what_no_rule_keeps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("ballast.toml");
    std::fs::write(
        &cfg,
        r#"
pull_flush_secs = 1
[retention]
interval_secs = 0
[[retention.rules]]
repositories = ["ret/pulled"]
keep_pulled = 1
[[retention.rules]]
repositories = ["ret/**"]
keep_pushed = 1
tags_matching = '^keep-'
[[immutable_tags]]
repositories = ["ret/app"]
tags = ["v0"]
"#,
    )
    .expect("config");
    let data = dir.path().join("data");
    let mut r = Registry::start_args(&data, &[], &["--config", &cfg.to_string_lossy()]);
    let base = r.url("");
    let v0 = push_image_as(&base, "ret/app", "v0", 1, 3000, &[]);
    let old = push_image_as(&base, "ret/app", "old", 2, 3000, &[]);
    let keep = push_image_as(&base, "ret/app", "keep-me", 3, 3000, &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let newest = push_image_as(&base, "ret/app", "newest", 4, 3000, &[]);
    push_image_as(&base, "other/app", "x", 5, 3000, &[]);
    // In ret/pulled, a pull decides.
    let a = push_image_as(&base, "ret/pulled", "a", 6, 3000, &[]);
    let b = push_image_as(&base, "ret/pulled", "b", 7, 3000, &[]);
    assert_eq!(
        call("GET", &r.url("/v2/ret/pulled/manifests/a"), &[], None).status,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));

    let tags = |repo: &str| -> Vec<String> {
        let v = call("GET", &r.url(&format!("/v2/{repo}/tags/list")), &[], None).json();
        v["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let dry = call("POST", &r.url("/admin/retention?dry_run=true"), &[], None);
    assert_eq!(dry.status, 200, "{}", String::from_utf8_lossy(&dry.body));
    let report = dry.json();
    assert_eq!(report["dry_run"], true);
    assert_eq!(
        tags("ret/app"),
        ["keep-me", "newest", "old", "v0"],
        "a dry run changes nothing"
    );
    let by_repo = |rep: &serde_json::Value, name: &str| {
        rep["repositories"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["repository"] == name).cloned())
            .unwrap_or_default()
    };
    assert_eq!(
        by_repo(&report, "ret/app")["tags"],
        serde_json::json!([["old", old]])
    );
    assert_eq!(
        by_repo(&report, "ret/app")["manifests"],
        serde_json::json!([old])
    );
    assert_eq!(by_repo(&report, "ret/pulled")["rule"], 1);
    assert_eq!(
        by_repo(&report, "ret/pulled")["manifests"],
        serde_json::json!([b])
    );
    assert!(by_repo(&report, "other/app").is_null());
    // Each image has a unique 3000-byte layer, so the bytes freed are at least the two layers.
    let freed = report["freed_bytes"].as_u64().unwrap_or(0);
    assert!(freed >= 6000, "{report}");
    assert!(
        by_repo(&report, "ret/app")["freed_bytes"]
            .as_u64()
            .unwrap_or(0)
            >= 3000
    );

    let run = call("POST", &r.url("/admin/retention"), &[], None);
    assert_eq!(run.status, 200);
    assert_eq!(run.json()["freed_bytes"], freed);
    assert_eq!(tags("ret/app"), ["keep-me", "newest", "v0"]);
    assert_eq!(tags("ret/pulled"), ["a"]);
    assert_eq!(tags("other/app"), ["x"]);
    for (d, status) in [(&old, 404), (&v0, 200), (&keep, 200), (&newest, 200)] {
        let res = call(
            "HEAD",
            &r.url(&format!("/v2/ret/app/manifests/{d}")),
            &[],
            None,
        );
        assert_eq!(res.status, status, "{d}");
    }
    let _ = a;
    let audit = std::fs::read_to_string(r.data.join("audit").join("audit.log")).expect("audit");
    assert!(audit
        .lines()
        .any(|l| l.contains("\"action\":\"tag.delete\"")
            && l.contains("\"tag\":\"old\"")
            && l.contains("retention rule 2")));
    assert!(audit.contains("\"action\":\"retention.run\""));

    // Offline, with nothing left to delete: a report of nothing, exit 0.
    r.stop();
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["retention", "--json", "--config"])
        .arg(&cfg)
        .arg(&data)
        .output()
        .expect("ballast retention");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rep["repositories"], serde_json::json!([]));
    crate::assert_fsck_clean(&data);
}

#[test]
fn sighup_reloads_the_rules_and_a_bad_config_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = start(dir.path());
    let base = r.url("");
    push_image_as(&base, "prod/api", "v1", 1, 500, &[]);
    let moved = |seed| {
        crate::try_push_image_as(&base, "prod/api", "v1", seed, 500, &[])
            .0
            .status
    };
    assert_eq!(moved(2), 409);
    let cfg = dir.path().join("ballast.toml");
    let hup = || {
        let ok = Command::new("kill")
            .args(["-HUP", &r.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(ok.success());
    };
    let audit = || std::fs::read_to_string(r.data.join("audit").join("audit.log")).expect("audit");
    let wait_audit = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while audit().matches("\"action\":\"config.reload\"").count() < n {
            assert!(std::time::Instant::now() < deadline, "no reload audited");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // A broken rule: refused, audited, the old rule still holds.
    std::fs::write(&cfg, "[[immutable_tags]]\ntags = [\"[\"]\n").expect("config");
    hup();
    wait_audit(1);
    assert!(audit()
        .lines()
        .any(|l| l.contains("config.reload") && l.contains("\"outcome\":\"failed\"")));
    assert_eq!(moved(3), 409);
    // The rule removed: the tag moves.
    std::fs::write(&cfg, "").expect("config");
    hup();
    wait_audit(2);
    assert_eq!(moved(4), 201);
}

fn quota_registry(dir: &std::path::Path, quotas: &str) -> Registry {
    let cfg = dir.join("ballast.toml");
    std::fs::write(&cfg, quotas).expect("config");
    Registry::start_args(
        &dir.join("data"),
        &[],
        &["--config", &cfg.to_string_lossy()],
    )
}

#[test]
fn a_byte_quota_lets_exactly_one_of_two_concurrent_pushes_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = quota_registry(
        dir.path(),
        "[[quotas]]\nnamespaces = [\"q/**\"]\nbytes_max = 7000\n",
    );
    let base = r.url("");
    let results: Vec<(u16, String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6u64)
            .map(|i| {
                let base = base.clone();
                s.spawn(move || {
                    let (res, d) = crate::try_push_image_as(
                        &base,
                        &format!("q/r{i}"),
                        "v1",
                        200 + i,
                        5000,
                        &[],
                    );
                    let msg = res.json()["errors"][0]["message"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned();
                    (res.status, d, msg)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    let won = results.iter().filter(|(s, _, _)| *s == 201).count();
    assert_eq!(won, 1, "{results:?}");
    for (s, _, msg) in results.iter().filter(|(s, _, _)| *s != 201) {
        assert_eq!(*s, 403);
        assert!(
            msg.starts_with("quota: namespace q/** uses") && msg.contains("7000"),
            "{msg}"
        );
    }
    let usage = call(
        "GET",
        &r.url("/admin/usage?verify=true&detail=true"),
        &[],
        None,
    )
    .json();
    let ns = &usage["namespaces"][0];
    let bytes = ns["bytes"].as_u64().expect("bytes");
    assert!(bytes > 5000 && bytes <= 7000, "{usage}");
    assert_eq!(usage["recount_matches"], true);
    assert!(
        ns["unique_bytes"].as_u64().is_some_and(|u| u >= 4000),
        "{usage}"
    );
    // Outside the namespace: no bound.
    push_image_as(&base, "free/x", "v1", 300, 9000, &[]);
    // Deleting frees the charge: a push fits again.
    let winner = results.iter().find(|(s, _, _)| *s == 201).expect("winner");
    let repo = format!("q/r{}", results.iter().position(|x| x.0 == 201).expect("i"));
    let del = call(
        "DELETE",
        &r.url(&format!("/v2/{repo}/manifests/{}", winner.1)),
        &[],
        None,
    );
    assert_eq!(del.status, 202);
    push_image_as(&base, "q/after", "v1", 301, 5000, &[]);
    let m = String::from_utf8_lossy(&call("GET", &r.url("/metrics"), &[], None).body).into_owned();
    assert!(m.contains("ballast_quota_refusals_total 5"), "{m}");
}

#[test]
fn repository_and_tag_quotas_and_a_quota_below_usage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut r = quota_registry(
        dir.path(),
        "[[quotas]]\nnamespaces = [\"t/**\"]\nrepositories_max = 2\ntags_per_repository_max = 2\n",
    );
    let base = r.url("");
    push_image_as(&base, "t/a", "1", 1, 100, &[]);
    push_image_as(&base, "t/a", "2", 2, 100, &[]);
    let (res, _) = crate::try_push_image_as(&base, "t/a", "3", 3, 100, &[]);
    assert_eq!(res.status, 403);
    assert!(String::from_utf8_lossy(&res.body).contains("holds 2 tags"));
    // A tag moved is not a new tag.
    push_image_as(&base, "t/a", "2", 3, 100, &[]);
    push_image_as(&base, "t/b", "1", 4, 100, &[]);
    let (res, _) = crate::try_push_image_as(&base, "t/c", "1", 5, 100, &[]);
    assert_eq!(res.status, 403);
    assert!(String::from_utf8_lossy(&res.body).contains("holds 2 repositories"));
    // A byte quota below what is stored: the server starts, pushes are refused until under.
    let cfg = dir.path().join("ballast.toml");
    std::fs::write(
        &cfg,
        "[[quotas]]\nnamespaces = [\"t/**\"]\nbytes_max = 10\n",
    )
    .expect("config");
    r.restart();
    let usage = call("GET", &r.url("/admin/usage?verify=true"), &[], None).json();
    assert_eq!(usage["recount_matches"], true);
    assert_eq!(usage["namespaces"][0]["warning"], true);
    let blob = b"more";
    let res = call(
        "POST",
        &r.url(&format!(
            "/v2/t/a/blobs/uploads/?digest={}",
            crate::sha256(blob)
        )),
        &[],
        Some(blob),
    );
    assert_eq!(res.status, 403, "an upload into a namespace past its quota");
    // Offline, inspect shows the same.
    r.stop();
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["inspect", "--config"])
        .arg(&cfg)
        .arg(&r.data)
        .output()
        .expect("inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let bytes = usage["namespaces"][0]["bytes"].as_u64().expect("bytes");
    assert!(text.contains("quotas:") && text.contains("t/**"), "{text}");
    assert!(
        text.contains(&format!("{bytes} of 10 bytes")) && text.contains("WARNING"),
        "{text}"
    );
}

#[test]
fn usage_kept_incrementally_matches_a_recount_after_random_pushes_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = quota_registry(
        dir.path(),
        "[[quotas]]\nnamespaces = [\"p/a/**\", \"p/b\"]\n[[quotas]]\nnamespaces = [\"p/**\"]\n",
    );
    let base = r.url("");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let repos = ["p/a/x", "p/a/y", "p/b", "p/c", "p/d/e"];
    let mut pushed: Vec<(String, String)> = Vec::new();
    for _ in 0..40 {
        let repo = repos[(next() % repos.len() as u64) as usize];
        if next() % 4 == 0 && !pushed.is_empty() {
            let (repo, d) = pushed.remove((next() % pushed.len() as u64) as usize);
            call(
                "DELETE",
                &r.url(&format!("/v2/{repo}/manifests/{d}")),
                &[],
                None,
            );
        } else {
            // Few seeds: the same layers land in several repositories and namespaces.
            let seed = next() % 6;
            let d = push_image_as(&base, repo, &format!("t{}", next() % 3), seed, 2000, &[]);
            pushed.push((repo.to_owned(), d));
        }
        let usage = call("GET", &r.url("/admin/usage?verify=true"), &[], None).json();
        assert_eq!(usage["recount_matches"], true, "{usage}");
    }
}

#[test]
fn a_retention_run_killed_midway_leaves_each_repository_whole_or_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("ballast.toml");
    std::fs::write(
        &cfg,
        "[retention]\ninterval_secs = 0\n[[retention.rules]]\nrepositories = [\"k/**\"]\ntags_matching = '^keep$'\n",
    )
    .expect("config");
    let data = dir.path().join("data");
    let mut r = Registry::start_args(&data, &[], &["--config", &cfg.to_string_lossy()]);
    let base = r.url("");
    let repos: Vec<String> = (0..60).map(|i| format!("k/r{i:02}")).collect();
    for (i, repo) in repos.iter().enumerate() {
        for (j, tag) in ["keep", "a", "b"].iter().enumerate() {
            push_image_as(&base, repo, tag, (i * 3 + j) as u64, 200, &[]);
        }
    }
    let url = r.url("/admin/retention");
    let run = std::thread::spawn(move || crate::http::try_call("POST", &url, &[], None));
    // Killed as soon as the first repository is done (repositories go in name order), so
    // most likely mid-run; whenever it lands, every repository must be whole or done.
    let first = r.url("/v2/k/r00/tags/list");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let v = call("GET", &first, &[], None).json();
        if v["tags"].as_array().is_some_and(|a| a.len() == 1) {
            break;
        }
    }
    r.kill();
    let _ = run.join();
    r.restart();
    let mut done = 0;
    for repo in &repos {
        let v = call("GET", &r.url(&format!("/v2/{repo}/tags/list")), &[], None).json();
        let tags: Vec<&str> = v["tags"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
            .unwrap_or_default();
        match tags.as_slice() {
            ["a", "b", "keep"] => {}
            ["keep"] => done += 1,
            other => panic!("{repo} is half done: {other:?}"),
        }
    }
    eprintln!(
        "retention killed midway: {done} of {} repositories done",
        repos.len()
    );
    r.stop();
    crate::assert_fsck_clean(&data);
}
