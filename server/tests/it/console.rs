//! The web console over HTTP: sign-in, sessions, form tokens, what each viewer sees, escaping
//! and headers. `browser.rs` drives the same console in a real Chromium.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::auth::ballast;
use crate::http::call;
use crate::{sha256, Registry};

/// What a user-supplied label and annotation hold: markup that must never run.
pub const EVIL: &str = "<script>alert('pwned')</script>";

/// A browser without a browser: keeps the session cookie, follows no redirects.
pub struct Visitor {
    base: String,
    cookie: Option<String>,
    agent: ureq::Agent,
}

/// An answer to a [`Visitor`].
pub struct Page {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Page {
    /// The value of the hidden form-token field.
    pub fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no form token in {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').expect("end")].to_owned()
    }

    /// The redirect target.
    pub fn location(&self) -> &str {
        self.headers.get("location").map_or("", String::as_str)
    }
}

impl Visitor {
    pub fn new(base: &str) -> Visitor {
        Visitor {
            base: base.trim_end_matches('/').to_owned(),
            cookie: None,
            agent: ureq::AgentBuilder::new()
                .redirects(0)
                .timeout(Duration::from_secs(60))
                .build(),
        }
    }

    fn send(&mut self, method: &str, path: &str, form: Option<&[(&str, &str)]>) -> Page {
        let mut req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Accept", "text/html");
        if let Some(c) = &self.cookie {
            req = req.set("Cookie", &format!("ballast_session={c}"));
        }
        let result = match form {
            Some(f) => req.send_form(f),
            None => req.call(),
        };
        let res = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let headers: HashMap<String, String> = res
            .headers_names()
            .into_iter()
            .filter_map(|n| {
                res.header(&n)
                    .map(|v| (n.to_ascii_lowercase(), v.to_owned()))
            })
            .collect();
        if let Some(c) = headers.get("set-cookie") {
            let value = c
                .split(';')
                .next()
                .and_then(|kv| kv.split_once('='))
                .map(|(_, v)| v.to_owned())
                .unwrap_or_default();
            self.cookie = (!value.is_empty()).then_some(value);
        }
        let status = res.status();
        let mut body = String::new();
        res.into_reader().read_to_string(&mut body).expect("body");
        Page {
            status,
            headers,
            body,
        }
    }

    pub fn get(&mut self, path: &str) -> Page {
        self.send("GET", path, None)
    }

    pub fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        self.send("POST", path, Some(form))
    }

    /// Signs in (after fetching the sign-in form for its token); the answer to the POST.
    pub fn sign_in(&mut self, user: &str, password: &str) -> Page {
        let form = self.get("/ui/login");
        assert_eq!(form.status, 200, "{}", form.body);
        let csrf = form.csrf();
        self.post(
            "/ui/login",
            &[
                ("csrf", &csrf),
                ("username", user),
                ("password", password),
                ("next", "/ui/"),
            ],
        )
    }

    pub fn cookie(&self) -> Option<&str> {
        self.cookie.as_deref()
    }

    pub fn set_cookie(&mut self, c: Option<String>) {
        self.cookie = c;
    }
}

/// Pushes `repo:tag`: a config with a label holding [`EVIL`], one layer, an annotation
/// holding [`EVIL`]; with `referrer`, also a signature-like artifact whose subject is the
/// image. Returns the image manifest's digest.
pub fn push_rich_image(
    base: &str,
    repo: &str,
    tag: &str,
    seed: u64,
    headers: &[(&str, &str)],
    referrer: bool,
) -> String {
    let config = json!({
        "architecture": "amd64", "os": "linux", "created": "2026-12-01T10:00:00Z",
        "config": {
            "Entrypoint": ["/app/server"], "Cmd": ["--port", "8080"],
            "Env": ["PATH=/usr/bin", "MODE=production"],
            "Labels": { "org.opencontainers.image.title": "demo", "note": EVIL },
        },
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [{"created": "2026-12-01T10:00:00Z", "created_by": "COPY server /app/server"}],
    })
    .to_string()
    .into_bytes();
    let layer = crate::seeded(300_000, seed);
    let mut descs = Vec::new();
    for (data, media) in [
        (&config, "application/vnd.oci.image.config.v1+json"),
        (&layer, "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let (res, desc) = crate::upload_blob(base, repo, data, media, headers);
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
        descs.push(desc);
    }
    let m = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descs[0], "layers": [descs[1]],
        "annotations": {"org.example.note": EVIL},
    });
    let body = m.to_string().into_bytes();
    let (res, digest) = crate::put_manifest(base, repo, tag, &body, headers);
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    if referrer {
        let empty = b"{}";
        let (res, _) = crate::upload_blob(
            base,
            repo,
            empty,
            "application/vnd.oci.empty.v1+json",
            headers,
        );
        assert_eq!(res.status, 201);
        let ed = sha256(empty);
        let sig = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": body.len()},
            "annotations": {"dev.sigstore.signer": "ci@example.com"},
        })
        .to_string()
        .into_bytes();
        let (res, _) = crate::put_manifest(base, repo, &sha256(&sig), &sig, headers);
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    }
    digest
}

pub const ALICE_PW: &str = "alice-password-1";
pub const BOB_PW: &str = "bob-password-1";
pub const ADMIN_PW: &str = "admin-password-1";

/// A registry with authentication on: `alice` owns team-a, `bob` team-b, `admin` is the
/// registry's admin, robot `ci` pushes to team-a. Returns the registry and ci's token.
pub fn teams(dir: &Path, env: &[(&str, &str)]) -> (Registry, String) {
    let data = dir.join("data");
    let htpasswd = dir.join("htpasswd");
    for (user, pw) in [("alice", ALICE_PW), ("bob", BOB_PW), ("admin", ADMIN_PW)] {
        let (code, _, err) = ballast(
            &["passwd", &htpasswd.to_string_lossy(), user, "--cost", "4"],
            &format!("{pw}\n"),
        );
        assert_eq!(code, 0, "{err}");
    }
    let (code, token, err) = ballast(&["robot", "create", &data.to_string_lossy(), "ci"], "");
    assert_eq!(code, 0, "{err}");
    let config = dir.join("ballast.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[auth]
enabled = true
htpasswd = "{}"

[[auth.policy]]
subjects = ["user:alice", "robot:ci"]
repositories = ["team-a/**"]
actions = ["pull", "push", "delete"]

[[auth.policy]]
subjects = ["user:bob"]
repositories = ["team-b/**"]
actions = ["pull", "push", "delete"]

[[auth.policy]]
subjects = ["user:admin"]
repositories = ["**"]
actions = ["pull", "push", "delete", "admin"]

[[immutable_tags]]
repositories = ["team-a/**"]
tags = ["release-*"]
"#,
            htpasswd.display()
        ),
    )
    .expect("config");
    let r = Registry::start_args(&data, env, &["--config", &config.to_string_lossy()]);
    (r, token.trim().to_owned())
}

/// The audit lines with this action.
pub fn audit_lines(data: &Path, action: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(data.join("audit").join("audit.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["action"] == action)
        .collect()
}

#[test]
fn open_console_escapes_user_text_sends_a_strict_policy_and_deletes_only_with_the_form_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut r = Registry::start(&tmp.path().join("data"));
    let digest = push_rich_image(&r.url(""), "team-a/app", "v1", 7, &[], true);
    crate::push_image_as(&r.url(""), "team-a/app", "v2", 8, 1000, &[]);
    let mut v = Visitor::new(&r.url(""));

    // Browsers asking for / land in the console; API clients still get the API's answer.
    let root = v.get("/");
    assert_eq!((root.status, root.location()), (303, "/ui/"));
    let api_root = call("GET", &r.url("/"), &[], None);
    assert_eq!(api_root.status, 404);

    let list = v.get("/ui/");
    assert_eq!(list.status, 200);
    let csp = &list.headers["content-security-policy"];
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(list.headers["x-frame-options"], "DENY");
    assert!(list.body.contains("team-a/app"));
    for asset in ["/ui/assets/console.css", "/ui/assets/console.js"] {
        let a = v.get(asset);
        assert_eq!(a.status, 200, "{asset}");
        assert!(a.body.len() > 200);
    }
    // Nothing is fetched from elsewhere.
    assert!(!list.body.contains("http://") && !list.body.contains("https://"));

    // A multi-platform index of two images.
    let arm = crate::push_image_as(&r.url(""), "team-a/app", "arm-only", 9, 1000, &[]);
    let index = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 1,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm, "size": 1,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
    })
    .to_string()
    .into_bytes();
    let put = call(
        "PUT",
        &r.url("/v2/team-a/app/manifests/multi"),
        &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
        Some(&index),
    );
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));

    let repo = v.get("/ui/repo?name=team-a/app");
    assert_eq!(repo.status, 200);
    assert!(repo.body.contains("data-tag=\"v1\"") && repo.body.contains("data-tag=\"v2\""));
    let multi = &repo.body[repo
        .body
        .find("data-tag=\"multi\"")
        .expect("the index's row")..];
    let multi = &multi[..multi.find("</tr>").expect("row end")];
    assert!(
        multi.contains("index")
            && multi.contains("linux/amd64")
            && multi.contains("linux/arm64/v8"),
        "{multi}"
    );
    let children = v.get(&format!(
        "/ui/image?repo=team-a/app&digest={}",
        sha256(&index)
    ));
    assert!(
        children.body.contains("id=\"children\""),
        "{}",
        children.body
    );
    assert!(children.body.contains("linux/arm64/v8") && children.body.contains(&arm[..19]));

    let image = v.get(&format!("/ui/image?repo=team-a/app&digest={digest}"));
    assert_eq!(image.status, 200, "{}", image.body);
    for shown in [
        "id=\"layers\"",
        "id=\"referrers\"",
        "application/vnd.dev.cosign.artifact.sig.v1+json",
        "ci@example.com",
        "/app/server",
        "MODE=production",
        "COPY server /app/server",
    ] {
        assert!(
            image.body.contains(shown),
            "{shown} missing from the image page"
        );
    }
    // The label and the annotation are shown, as text.
    assert!(
        !image.body.contains("<script>alert"),
        "user text became markup"
    );
    assert!(image.body.matches("&lt;script&gt;alert(").count() >= 2);
    let pull = format!("docker pull {}/team-a/app@{digest}", r.host());
    assert!(image.body.contains(&pull), "no pull command by digest");

    // A deletion without the session's form token is refused and changes nothing.
    let forged = v.post("/ui/tag/delete", &[("repo", "team-a/app"), ("tag", "v2")]);
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(forged.body.contains("security token"));
    assert_eq!(
        call(
            "GET",
            &r.url("/v2/team-a/app/manifests/v2"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            None
        )
        .status,
        200
    );
    let stale = v.post(
        "/ui/tag/delete",
        &[
            ("csrf", "not-the-token"),
            ("repo", "team-a/app"),
            ("tag", "v2"),
        ],
    );
    assert_eq!(stale.status, 403);

    let confirm = v.get("/ui/tag/delete?repo=team-a/app&tag=v2");
    assert_eq!(confirm.status, 200);
    let csrf = confirm.csrf();
    let done = v.post(
        "/ui/tag/delete",
        &[("csrf", &csrf), ("repo", "team-a/app"), ("tag", "v2")],
    );
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(
        call("GET", &r.url("/v2/team-a/app/manifests/v2"), &[], None).status,
        404
    );
    // Audited as the API's deletion is, and shown in Activity.
    let deleted = audit_lines(&r.data, "tag.delete");
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0]["tag"], "v2");
    let activity = v.get("/ui/activity?action=tag.delete");
    assert!(
        activity.body.contains("data-action=\"tag.delete\""),
        "{}",
        activity.body
    );
    assert_eq!(
        audit_lines(&r.data, "console.form").len(),
        2,
        "refused forms are audited"
    );
    // Console requests have a route of their own in the metrics.
    let metrics = call("GET", &r.url("/metrics"), &[], None);
    assert!(String::from_utf8_lossy(&metrics.body).contains("route=\"console\""));

    // Storage and Admin are open with authentication off, like the admin endpoints.
    let storage = v.get("/ui/storage");
    assert_eq!(storage.status, 200);
    assert!(storage.body.contains("id=\"namespaces\"") && storage.body.contains("team-a"));
    let csrf = storage.csrf();
    let preview = v.post("/ui/gc", &[("csrf", &csrf), ("dry_run", "true")]);
    assert_eq!(preview.status, 200, "{}", preview.body);
    assert!(preview.body.contains("dry run"));
    r.stop();
    crate::assert_fsck_clean(&r.data);
}

#[test]
fn console_sign_in_shows_each_user_only_their_repositories_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, ci_token) = teams(tmp.path(), &[]);
    let admin = crate::auth::basic("admin", ADMIN_PW);
    let h = [("Authorization", admin.as_str())];
    push_rich_image(&r.url(""), "team-a/app", "v1", 1, &h, false);
    push_rich_image(&r.url(""), "team-b/secret", "v1", 2, &h, false);

    let mut v = Visitor::new(&r.url(""));
    let first = v.get("/ui/");
    assert_eq!(first.status, 303);
    assert!(
        first.location().starts_with("/ui/login?next="),
        "{}",
        first.location()
    );

    // Wrong password: refused and audited like an API login.
    let wrong = v.sign_in("alice", "not-her-password");
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(wrong.body.contains("wrong user name or password"));
    assert!(audit_lines(&r.data, "login")
        .iter()
        .any(|l| l["outcome"] == "failed"));

    // Robots are for clients.
    let robot = v.sign_in("ci", &ci_token);
    assert_eq!(robot.status, 403);
    assert!(robot.body.contains("Robot accounts cannot sign in"));

    let before = v.cookie().map(str::to_owned);
    let ok = v.sign_in("alice", ALICE_PW);
    assert_eq!((ok.status, ok.location()), (303, "/ui/"), "{}", ok.body);
    assert_ne!(
        v.cookie().map(str::to_owned),
        before,
        "a new session after signing in"
    );
    let set = &ok.headers["set-cookie"];
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert_eq!(
        audit_lines(&r.data, "console.login")
            .iter()
            .filter(|l| l["actor"] == "user:alice")
            .count(),
        1
    );

    let list = v.get("/ui/");
    assert_eq!(list.status, 200);
    assert!(list.body.contains("team-a/app"));
    assert!(!list.body.contains("team-b"), "alice sees team-b");
    assert_eq!(v.get("/ui/repo?name=team-b/secret").status, 404);
    assert_eq!(v.get("/ui/storage").status, 403);
    assert_eq!(v.get("/ui/admin").status, 403);
    assert!(!list.body.contains("/ui/storage"), "no link to admin pages");

    // A forged deletion in team-b, with alice's own valid form token: the API's check
    // refuses it, audited as alice's denied request.
    let csrf = list.csrf();
    let forged = v.post(
        "/ui/tag/delete",
        &[("csrf", &csrf), ("repo", "team-b/secret"), ("tag", "v1")],
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(forged.body.contains("DENIED"), "{}", forged.body);
    assert_eq!(
        call("GET", &r.url("/v2/team-b/secret/manifests/v1"), &h, None).status,
        200
    );
    assert!(audit_lines(&r.data, "delete")
        .iter()
        .any(|l| l["actor"] == "user:alice" && l["outcome"] == "denied"));
    // An immutable tag: the console shows the server's refusal.
    push_rich_image(&r.url(""), "team-a/app", "release-1", 3, &h, false);
    let refused = v.post(
        "/ui/tag/delete",
        &[
            ("csrf", &csrf),
            ("repo", "team-a/app"),
            ("tag", "release-1"),
        ],
    );
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.body.contains("immutable"), "{}", refused.body);
    assert_eq!(
        call(
            "GET",
            &r.url("/v2/team-a/app/manifests/release-1"),
            &h,
            None
        )
        .status,
        200
    );
    // Alice's own Activity shows nothing of team-b.
    let activity = v.get("/ui/activity");
    assert!(!activity.body.contains("team-b"), "{}", activity.body);

    // Sign out: the session is gone for good.
    let cookie = v.cookie().map(str::to_owned);
    let out = v.post("/ui/logout", &[("csrf", &csrf)]);
    assert_eq!((out.status, out.location()), (303, "/ui/login"));
    v.set_cookie(cookie);
    assert_eq!(v.get("/ui/").status, 303);

    // The admin sees everything, and manages robots through the console.
    let mut a = Visitor::new(&r.url(""));
    assert_eq!(a.sign_in("admin", ADMIN_PW).status, 303);
    let list = a.get("/ui/");
    assert!(list.body.contains("team-a/app") && list.body.contains("team-b/secret"));
    let csrf = list.csrf();
    let created = a.post(
        "/ui/robots/create",
        &[
            ("csrf", &csrf),
            ("name", "deploy"),
            ("description", "prod <deploys>"),
        ],
    );
    assert_eq!(created.status, 200, "{}", created.body);
    let at = created
        .body
        .find("value=\"blt_")
        .expect("the token is shown")
        + 7;
    let token = &created.body[at..at + created.body[at..].find('"').expect("end")];
    let robot = crate::auth::basic("deploy", token);
    assert_eq!(
        call(
            "GET",
            &r.url("/v2/"),
            &[("Authorization", robot.as_str())],
            None
        )
        .status,
        200
    );
    assert!(a.get("/ui/admin").body.contains("prod &lt;deploys&gt;"));
    let revoked = a.post("/ui/robots/revoke", &[("csrf", &csrf), ("name", "deploy")]);
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_eq!(
        call(
            "GET",
            &r.url("/v2/"),
            &[("Authorization", robot.as_str())],
            None
        )
        .status,
        401
    );
    let created_line = audit_lines(&r.data, "robot.create");
    assert!(
        created_line
            .iter()
            .any(|l| l["actor"] == "user:admin" && l["tag"] == "robot:deploy"),
        "{created_line:?}"
    );
    assert_eq!(audit_lines(&r.data, "robot.revoke").len(), 1);
}

#[test]
fn console_sessions_end_when_idle() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, _) = teams(tmp.path(), &[("BALLAST_CONSOLE_IDLE_SECS", "1")]);
    let mut v = Visitor::new(&r.url(""));
    assert_eq!(v.sign_in("bob", BOB_PW).status, 303);
    assert_eq!(v.get("/ui/").status, 200);
    std::thread::sleep(Duration::from_millis(2200));
    let after = v.get("/ui/");
    assert_eq!(after.status, 200, "the sign-in page, saying why");
    assert!(after.body.contains("Your session ended"), "{}", after.body);
    assert!(after.body.contains("id=\"signin\""));
}

#[test]
fn console_sessions_end_when_the_password_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, _) = teams(tmp.path(), &[]);
    let mut old = Visitor::new(&r.url(""));
    assert_eq!(old.sign_in("bob", BOB_PW).status, 303);
    assert_eq!(old.get("/ui/").status, 200);
    let htpasswd = tmp.path().join("htpasswd");
    let (code, _, err) = ballast(
        &["passwd", &htpasswd.to_string_lossy(), "bob", "--cost", "4"],
        "bob-new-password-2\n",
    );
    assert_eq!(code, 0, "{err}");
    // The account files are read again at most once a second.
    std::thread::sleep(Duration::from_millis(1300));
    let mut new = Visitor::new(&r.url(""));
    assert_eq!(new.sign_in("bob", "bob-new-password-2").status, 303);
    let after = old.get("/ui/");
    assert_eq!(after.status, 200, "the sign-in page, saying why");
    assert!(after.body.contains("password changed"), "{}", after.body);
    // The session signed in with the new password is not touched by the old one's end.
    let still = new.get("/ui/");
    assert_eq!(still.status, 200);
    assert!(
        still.body.contains("id=\"repositories\"") || still.body.contains("No repositories"),
        "{}",
        still.body
    );
}
