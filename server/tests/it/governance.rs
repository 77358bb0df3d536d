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
fn catalog_of(data: &std::path::Path) -> ballast_engine::catalog::State {
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
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .arg("fsck")
        .arg(&data)
        .output()
        .expect("fsck");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
