//! Authentication, authorization, audit and TLS against a running `ballast serve`: the full
//! principal × action × namespace matrix over Basic credentials and over the token flow,
//! refused tokens, failed-login throttling, robot revocation, catalog filtering, mounts
//! across namespaces, the audit trail, real clients logging in, and HTTPS with HTTP/2.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::http::{call, Res};
use crate::{have, oci, push_image_as, seeded, sha256, Registry, STDERR_FILE};
use ballast_server::auth::token::{AccessEntry, Signer};

/// Runs `ballast` with `stdin`; returns (exit code, stdout, stderr).
pub fn ballast(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ballast");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn basic(user: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    )
}

/// A registry with authentication on, its accounts and their secrets.
pub struct Secure {
    // Fields drop in order: the server stops before its directory goes.
    pub r: Registry,
    pub robot_token: String,
    /// Holds the data directory, `htpasswd` and `ballast.toml`.
    pub tmp: tempfile::TempDir,
}

pub const ADMIN_PW: &str = "admin-password-1";
const RUNTIME_PW: &str = "runtime-password-1";
const OUTSIDER_PW: &str = "outsider-password-1";

fn policy_toml(dir: &Path) -> String {
    format!(
        r#"
[auth]
enabled = true
htpasswd = "{}"
login_failures_max = 3
login_lockout_secs = 1

[auth.groups]
builders = ["robot:ci"]

[[auth.policy]]
subjects = ["group:builders"]
repositories = ["team-a/**"]
actions = ["pull", "push"]

[[auth.policy]]
subjects = ["user:runtime"]
repositories = ["team-a/**", "team-b/**"]
actions = ["pull"]

[[auth.policy]]
subjects = ["anonymous", "authenticated"]
repositories = ["public/**"]
actions = ["pull"]

[[auth.policy]]
subjects = ["user:admin"]
repositories = ["**"]
actions = ["admin"]
"#,
        dir.join("htpasswd").display()
    )
}

/// Sets up accounts with the CLI (and one user with Apache's own `htpasswd -B`) and starts
/// the server with `extra` settings.
pub fn secure(extra: &[(&str, &str)]) -> Secure {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let data = dir.join("data");
    let htpasswd = dir.join("htpasswd");
    let audit = data.join("audit").join("audit.log");
    for (user, pw) in [("admin", ADMIN_PW), ("runtime", RUNTIME_PW)] {
        let (code, _, err) = ballast(
            &[
                "passwd",
                &htpasswd.to_string_lossy(),
                user,
                "--cost",
                "4",
                "--audit-log",
                &audit.to_string_lossy(),
            ],
            &format!("{pw}\n"),
        );
        assert_eq!(code, 0, "{err}");
    }
    // A line written by Apache's htpasswd is accepted as it is.
    assert!(
        have("htpasswd"),
        "htpasswd is not installed: run scripts/install-test-deps"
    );
    let out = Command::new("htpasswd")
        .args(["-nbB", "-C", "4", "outsider", OUTSIDER_PW])
        .output()
        .expect("htpasswd");
    assert!(out.status.success());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&htpasswd)
        .expect("htpasswd file");
    f.write_all(String::from_utf8_lossy(&out.stdout).trim().as_bytes())
        .expect("append");
    f.write_all(b"\n").expect("append");

    let (code, token, err) = ballast(&["robot", "create", &data.to_string_lossy(), "ci"], "");
    assert_eq!(code, 0, "{err}");
    let robot_token = token.trim().to_owned();
    assert!(robot_token.starts_with("blt_") && robot_token.len() > 40);
    let (code, list, _) = ballast(&["robot", "list", &data.to_string_lossy(), "--json"], "");
    assert_eq!(code, 0);
    assert!(!list.contains(&robot_token), "the token is shown once only");

    let config = dir.join("ballast.toml");
    std::fs::write(&config, policy_toml(&dir)).expect("config");
    let r = Registry::start_args(&data, extra, &["--config", &config.to_string_lossy()]);
    Secure {
        tmp,
        r,
        robot_token,
    }
}

/// A secure registry over HTTPS with a self-signed certificate for `localhost` and
/// `127.0.0.1`.
pub struct Tls {
    // Fields drop in order: the server stops before its certificate goes.
    pub s: Secure,
    /// The certificate (PEM), to trust.
    pub ca: String,
    /// A directory holding it as `ca.crt` (containers' `--cert-dir`).
    pub certs: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

pub fn secure_with_tls() -> Tls {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    let (cert_pem, key_pem) = (certs.join("ca.crt"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).expect("cert");
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).expect("key");
    let (c, k) = (cert_pem.to_string_lossy(), key_pem.to_string_lossy());
    let s = secure(&[("BALLAST_TLS_CERT", &c), ("BALLAST_TLS_KEY", &k)]);
    assert!(s.r.url("/").starts_with("https://"));
    Tls {
        s,
        ca: c.into_owned(),
        certs,
        _dir: dir,
    }
}

impl Secure {
    fn creds(&self, principal: &str) -> Option<(&'static str, String)> {
        match principal {
            "admin" => Some(("admin", ADMIN_PW.into())),
            "runtime" => Some(("runtime", RUNTIME_PW.into())),
            "outsider" => Some(("outsider", OUTSIDER_PW.into())),
            "ci" => Some(("ci", self.robot_token.clone())),
            _ => None,
        }
    }

    fn admin(&self) -> String {
        basic("admin", ADMIN_PW)
    }

    /// Asks the token endpoint (GET with Basic credentials, or none).
    fn token(&self, principal: &str, scopes: &[&str]) -> (Res, String) {
        let q: Vec<String> = scopes
            .iter()
            .map(|s| format!("scope={}", s.replace(':', "%3A").replace('/', "%2F")))
            .collect();
        let url = self
            .r
            .url(&format!("/token?service=ballast&{}", q.join("&")));
        let auth = self.creds(principal).map(|(u, p)| basic(u, &p));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let res = call("GET", &url, &headers, None);
        let token = res.json()["token"].as_str().unwrap_or("").to_owned();
        (res, token)
    }

    fn audit_lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.r.data.join("audit").join("audit.log"))
            .expect("audit log");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }
}

/// The actions a token grants on a repository, read from its claims.
fn granted(token: &str, repo: &str) -> BTreeSet<String> {
    let payload = token.split('.').nth(1).expect("jwt payload");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("b64"),
    )
    .expect("claims");
    claims["access"]
        .as_array()
        .expect("access")
        .iter()
        .filter(|e| e["type"] == "repository" && e["name"] == repo)
        .flat_map(|e| e["actions"].as_array().cloned().unwrap_or_default())
        .map(|a| a.as_str().unwrap_or("").to_owned())
        .collect()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

const REPOS: [&str; 3] = ["team-a/app", "team-b/app", "public/app"];
const ACTIONS: [&str; 3] = ["pull", "push", "delete"];

/// Every principal × action × namespace cell, written out by hand from the policy above.
/// Rows: team-a, team-b, public; columns: pull, push, delete.
const MATRIX: [(&str, [[bool; 3]; 3]); 5] = [
    (
        "admin",
        [[true, true, true], [true, true, true], [true, true, true]],
    ),
    (
        "ci",
        [
            [true, true, false],
            [false, false, false],
            [true, false, false],
        ],
    ),
    (
        "runtime",
        [
            [true, false, false],
            [true, false, false],
            [true, false, false],
        ],
    ),
    (
        "outsider",
        [
            [false, false, false],
            [false, false, false],
            [true, false, false],
        ],
    ),
    (
        "anonymous",
        [
            [false, false, false],
            [false, false, false],
            [true, false, false],
        ],
    ),
];

/// Tries one action with one `Authorization` header (or none); returns the response.
fn attempt(s: &Secure, repo: &str, action: &str, auth: Option<&str>, seed: u64) -> Res {
    let headers: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
    match action {
        "pull" => call(
            "GET",
            &s.r.url(&format!("/v2/{repo}/manifests/v1")),
            &headers,
            None,
        ),
        "push" => {
            let data = seeded(100, seed);
            let d = sha256(&data);
            call(
                "POST",
                &s.r.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")),
                &headers,
                Some(&data),
            )
        }
        "delete" => {
            // A tag of its own to delete, put there by the admin.
            let tag = format!("del-{seed}");
            let admin = s.admin();
            let m = call(
                "GET",
                &s.r.url(&format!("/v2/{repo}/manifests/v1")),
                &[("Authorization", &admin)],
                None,
            );
            assert_eq!(m.status, 200);
            let put = call(
                "PUT",
                &s.r.url(&format!("/v2/{repo}/manifests/{tag}")),
                &[
                    ("Authorization", &admin),
                    ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
                ],
                Some(&m.body),
            );
            assert_eq!(put.status, 201);
            let res = call(
                "DELETE",
                &s.r.url(&format!("/v2/{repo}/manifests/{tag}")),
                &headers,
                None,
            );
            let after = call(
                "GET",
                &s.r.url(&format!("/v2/{repo}/manifests/{tag}")),
                &[("Authorization", &admin)],
                None,
            );
            // A refused delete changes nothing; an allowed one removes the tag.
            let want = if res.status == 202 { 404 } else { 200 };
            assert_eq!(
                after.status, want,
                "{repo} {tag} after DELETE {}",
                res.status
            );
            res
        }
        other => panic!("unknown action {other}"),
    }
}

fn success(action: &str) -> u16 {
    match action {
        "pull" => 200,
        "push" => 201,
        _ => 202,
    }
}

#[test]
fn authorization_matrix_tokens_and_audit() {
    let s = secure(&[]);
    let admin = s.admin();
    for (i, repo) in REPOS.iter().enumerate() {
        push_image_as(
            &s.r.url(""),
            repo,
            "v1",
            900 + i as u64,
            5000,
            &[("Authorization", &admin)],
        );
    }

    // The entry point challenges for the token flow.
    let res = call("GET", &s.r.url("/v2/"), &[], None);
    assert_eq!(res.status, 401);
    assert_eq!(res.code(), "UNAUTHORIZED");
    assert_eq!(
        res.header("www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"http://{}/token\",service=\"ballast\"",
                s.r.host()
            )
            .as_str()
        )
    );
    let res = call(
        "GET",
        &s.r.url("/v2/"),
        &[("Authorization", &basic("runtime", RUNTIME_PW))],
        None,
    );
    assert_eq!(res.status, 200);

    let mut seed = 1000;
    for (principal, rows) in MATRIX {
        for (ri, repo) in REPOS.iter().enumerate() {
            let allowed: BTreeSet<String> = ACTIONS
                .iter()
                .zip(rows[ri])
                .filter(|(_, ok)| *ok)
                .map(|(a, _)| a.to_string())
                .collect();
            // Token flow: the token carries exactly the allowed actions.
            let (res, token) =
                s.token(principal, &[&format!("repository:{repo}:pull,push,delete")]);
            assert_eq!(
                res.status,
                200,
                "{principal} token: {}",
                String::from_utf8_lossy(&res.body)
            );
            assert_eq!(granted(&token, repo), allowed, "{principal} on {repo}");
            for (ai, action) in ACTIONS.iter().enumerate() {
                seed += 1;
                let ok = rows[ri][ai];
                let res = attempt(&s, repo, action, Some(&bearer(&token)), seed);
                if ok {
                    assert_eq!(
                        res.status,
                        success(action),
                        "token {principal} {action} {repo}"
                    );
                } else {
                    assert_eq!(res.status, 401, "token {principal} {action} {repo}");
                    let challenge = res.header("www-authenticate").unwrap_or("");
                    assert!(
                        challenge.contains("error=\"insufficient_scope\""),
                        "{challenge}"
                    );
                    assert!(
                        challenge.contains(&format!("scope=\"repository:{repo}:")),
                        "{challenge}"
                    );
                }
                // Basic credentials (or none at all for anonymous).
                seed += 1;
                let auth = s.creds(principal).map(|(u, p)| basic(u, &p));
                let res = attempt(&s, repo, action, auth.as_deref(), seed);
                let want = match (ok, principal) {
                    (true, _) => success(action),
                    (false, "anonymous") => 401,
                    (false, _) => 403,
                };
                assert_eq!(res.status, want, "basic {principal} {action} {repo}");
                if !ok {
                    let code = if want == 401 {
                        "UNAUTHORIZED"
                    } else {
                        "DENIED"
                    };
                    assert_eq!(res.code(), code);
                }
            }
        }
    }

    // Refused tokens: expired, not yet valid, forged, for another audience or issuer, for
    // another repository, of a revoked robot.
    let key = hex::decode(
        std::fs::read_to_string(s.r.data.join("auth").join("token.key"))
            .expect("key")
            .trim(),
    )
    .expect("hex key");
    let now = ballast_server::now_secs();
    let pull_a = || {
        vec![AccessEntry {
            kind: "repository".into(),
            name: "team-a/app".into(),
            actions: vec!["pull".into()],
        }]
    };
    let url = s.r.url("/v2/team-a/app/manifests/v1");
    let good = Signer::new(&key, "ballast", "ballast").issue("user:runtime", pull_a(), now, 60);
    assert_eq!(
        call("GET", &url, &[("Authorization", &bearer(&good))], None).status,
        200
    );
    let refused = [
        (
            "expired",
            Signer::new(&key, "ballast", "ballast").issue("user:runtime", pull_a(), now - 3600, 60),
        ),
        (
            "not yet valid",
            Signer::new(&key, "ballast", "ballast").issue("user:runtime", pull_a(), now + 3600, 60),
        ),
        (
            "forged",
            Signer::new(&[7u8; 32], "ballast", "ballast").issue("user:runtime", pull_a(), now, 60),
        ),
        (
            "wrong audience",
            Signer::new(&key, "ballast", "other-registry").issue("user:runtime", pull_a(), now, 60),
        ),
        (
            "wrong issuer",
            Signer::new(&key, "mallory", "ballast").issue("user:runtime", pull_a(), now, 60),
        ),
        (
            "unknown user",
            Signer::new(&key, "ballast", "ballast").issue("user:ghost", pull_a(), now, 60),
        ),
    ];
    for (why, t) in refused {
        let res = call("GET", &url, &[("Authorization", &bearer(&t))], None);
        assert_eq!(res.status, 401, "{why}");
        assert!(
            res.header("www-authenticate")
                .unwrap_or("")
                .contains("invalid_token"),
            "{why}"
        );
    }
    let (_, team_b) = s.token("runtime", &["repository:team-b/app:pull"]);
    let res = call("GET", &url, &[("Authorization", &bearer(&team_b))], None);
    assert_eq!(res.status, 401, "a token for another repository");
    assert!(res
        .header("www-authenticate")
        .unwrap_or("")
        .contains("insufficient_scope"));
    let res = call("GET", &url, &[("Authorization", "Bearer not.a.jwt")], None);
    assert_eq!(res.status, 401);
    let res = call("GET", &url, &[("Authorization", "Digest abc")], None);
    assert_eq!(res.status, 401);

    // The catalog lists only what the caller may pull.
    for (principal, want) in [
        ("admin", json!(["public/app", "team-a/app", "team-b/app"])),
        ("runtime", json!(["public/app", "team-a/app", "team-b/app"])),
        ("ci", json!(["public/app", "team-a/app"])),
        ("anonymous", json!(["public/app"])),
    ] {
        let (_, t) = s.token(principal, &["registry:catalog:*"]);
        let res = call(
            "GET",
            &s.r.url("/v2/_catalog"),
            &[("Authorization", &bearer(&t))],
            None,
        );
        assert_eq!(res.status, 200, "{principal}");
        assert_eq!(res.json()["repositories"], want, "{principal}");
    }

    // Mounts need pull on the source: the robot cannot mount from team-b, explicitly or
    // automatically, but can within team-a.
    let secret = seeded(3000, 77);
    let secret_d = sha256(&secret);
    let res = call(
        "POST",
        &s.r.url(&format!("/v2/team-b/app/blobs/uploads/?digest={secret_d}")),
        &[("Authorization", &admin)],
        Some(&secret),
    );
    assert_eq!(res.status, 201);
    let (_, ci) = s.token(
        "ci",
        &[
            "repository:team-a/app:pull,push",
            "repository:team-b/app:pull",
        ],
    );
    for q in [
        format!("mount={secret_d}&from=team-b/app"),
        format!("mount={secret_d}"),
    ] {
        let res = call(
            "POST",
            &s.r.url(&format!("/v2/team-a/app/blobs/uploads/?{q}")),
            &[("Authorization", &bearer(&ci))],
            None,
        );
        assert_eq!(res.status, 202, "{q}: no mount, an upload session instead");
    }
    let layer_d = sha256(&seeded(5000, 900));
    let (_, ci2) = s.token(
        "ci",
        &[
            "repository:team-a/other:pull,push",
            "repository:team-a/app:pull",
        ],
    );
    let res = call(
        "POST",
        &s.r.url(&format!(
            "/v2/team-a/other/blobs/uploads/?mount={layer_d}&from=team-a/app"
        )),
        &[("Authorization", &bearer(&ci2))],
        None,
    );
    assert_eq!(res.status, 201);

    // Admin endpoints need admin on every repository.
    let gc = s.r.url("/admin/gc?dry_run=true");
    assert_eq!(call("POST", &gc, &[], None).status, 401);
    assert_eq!(
        call(
            "POST",
            &gc,
            &[("Authorization", &basic("runtime", RUNTIME_PW))],
            None
        )
        .status,
        403
    );
    assert_eq!(
        call("POST", &gc, &[("Authorization", &admin)], None).status,
        200
    );

    // Moving a tag, deleting a manifest by digest and a blob link: all audited.
    let moved = push_image_as(
        &s.r.url(""),
        "team-a/app",
        "v1",
        950,
        4000,
        &[("Authorization", &admin)],
    );
    let res = call(
        "DELETE",
        &s.r.url(&format!("/v2/team-a/app/manifests/{moved}")),
        &[("Authorization", &admin)],
        None,
    );
    assert_eq!(res.status, 202);
    let res = call(
        "DELETE",
        &s.r.url(&format!("/v2/team-b/app/blobs/{secret_d}")),
        &[("Authorization", &admin)],
        None,
    );
    assert_eq!(res.status, 202);

    // A failed upload (wrong digest) and a cancelled session are audited with their outcome.
    let res = call(
        "POST",
        &s.r.url(&format!(
            "/v2/team-a/app/blobs/uploads/?digest={}",
            sha256(b"other")
        )),
        &[("Authorization", &admin)],
        Some(b"these bytes"),
    );
    assert_eq!(res.status, 400);
    let res = call(
        "POST",
        &s.r.url("/v2/team-a/app/blobs/uploads/"),
        &[("Authorization", &admin)],
        None,
    );
    assert_eq!(res.status, 202);
    let session = res.header("location").expect("Location").to_owned();
    let res = call(
        "DELETE",
        &s.r.url(&session),
        &[("Authorization", &admin)],
        None,
    );
    assert_eq!(res.status, 204);
    let htpasswd = s.tmp.path().join("htpasswd");
    let audit_path = s.r.data.join("audit").join("audit.log");
    let (code, _, err) = ballast(
        &[
            "passwd",
            &htpasswd.to_string_lossy(),
            "outsider",
            "--delete",
            "--audit-log",
            &audit_path.to_string_lossy(),
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");

    // A revoked robot's token stops working at once, and so does its secret.
    let (_, ci_token) = s.token("ci", &["repository:team-a/app:pull"]);
    let pull = s.r.url("/v2/team-a/app/tags/list");
    assert_eq!(
        call("GET", &pull, &[("Authorization", &bearer(&ci_token))], None).status,
        200
    );
    let (code, _, err) = ballast(&["robot", "revoke", &s.r.data.to_string_lossy(), "ci"], "");
    assert_eq!(code, 0, "{err}");
    let mut refused = false;
    for _ in 0..40 {
        // The server notices a changed robots file within a second.
        if call("GET", &pull, &[("Authorization", &bearer(&ci_token))], None).status == 401 {
            refused = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(refused, "the revoked robot's token still works");

    // Failed logins are throttled per address and account: 429 with Retry-After, even for
    // the right password, until the lockout ends.
    let wrong = basic("runtime", "not-the-password");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(call("GET", &pull, &[("Authorization", &wrong)], None).status);
    }
    assert_eq!(&statuses[..3], &[401, 401, 401]);
    let res = call(
        "GET",
        &pull,
        &[("Authorization", &basic("runtime", RUNTIME_PW))],
        None,
    );
    assert_eq!(res.status, 429);
    assert_eq!(res.code(), "TOOMANYREQUESTS");
    let retry: u64 = res
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("secs");
    assert!((1..=2).contains(&retry), "{retry}");
    let (tres, _) = s.token("runtime", &["repository:team-a/app:pull"]);
    assert_eq!(tres.status, 429, "the token endpoint is throttled too");
    std::thread::sleep(std::time::Duration::from_secs(retry + 1));
    let res = call(
        "GET",
        &pull,
        &[("Authorization", &basic("runtime", RUNTIME_PW))],
        None,
    );
    assert_eq!(res.status, 200, "the lockout ended");
    let ci_basic = basic("ci", &s.robot_token);
    assert_eq!(
        call("GET", &pull, &[("Authorization", &ci_basic)], None).status,
        401
    );

    // The audit trail: one JSON line per mutation, denial and failed login.
    let lines = s.audit_lines();
    let find = |pred: &dyn Fn(&Value) -> bool, what: &str| -> Value {
        lines
            .iter()
            .find(|l| pred(l))
            .cloned()
            .unwrap_or_else(|| panic!("no audit line for {what}"))
    };
    let ev = find(&|l| l["action"] == "user.set", "user.set");
    assert!(ev["actor"].as_str().unwrap_or("").starts_with("cli:"));
    find(
        &|l| l["action"] == "robot.create" && l["tag"] == "robot:ci",
        "robot.create",
    );
    find(
        &|l| l["action"] == "robot.revoke" && l["tag"] == "robot:ci",
        "robot.revoke",
    );
    let ev = find(
        &|l| {
            l["action"] == "blob.upload"
                && l["actor"] == "user:admin"
                && l["repository"] == "team-a/app"
        },
        "blob.upload",
    );
    assert_eq!(ev["client"], "127.0.0.1");
    assert_eq!(ev["outcome"], "ok");
    assert!(ev["time"].as_str().unwrap_or("").ends_with('Z'));
    find(
        &|l| {
            l["action"] == "blob.upload"
                && l["actor"] == "robot:ci"
                && l["repository"] == "team-a/app"
        },
        "robot push",
    );
    find(
        &|l| l["action"] == "manifest.put" && l["tag"] == "v1" && l["repository"] == "public/app",
        "manifest.put",
    );
    let ev = find(
        &|l| l["action"] == "tag.move" && l["repository"] == "team-a/app",
        "tag.move",
    );
    assert_eq!(ev["digest"], moved);
    assert!(ev["previous"]
        .as_str()
        .is_some_and(|p| p.starts_with("sha256:") && p != moved));
    find(
        &|l| l["action"] == "tag.delete" && l["actor"] == "user:admin",
        "tag.delete",
    );
    find(
        &|l| l["action"] == "manifest.delete" && l["digest"] == moved,
        "manifest.delete",
    );
    find(
        &|l| l["action"] == "blob.delete" && l["digest"] == secret_d.as_str(),
        "blob.delete",
    );
    let ev = find(&|l| l["action"] == "blob.mount", "blob.mount");
    assert_eq!(ev["actor"], "robot:ci");
    assert_eq!(ev["previous"], "team-a/app");
    assert_eq!(ev["repository"], "team-a/other");
    find(
        &|l| l["action"] == "gc.run" && l["actor"] == "user:admin",
        "gc.run",
    );
    let ev = find(
        &|l| l["action"] == "blob.upload" && l["outcome"] == "failed",
        "failed upload",
    );
    assert!(
        ev["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("DIGEST_INVALID")),
        "{ev}"
    );
    find(
        &|l| l["action"] == "upload.cancel" && l["actor"] == "user:admin",
        "upload.cancel",
    );
    find(
        &|l| l["action"] == "user.delete" && l["tag"] == "user:outsider",
        "user.delete",
    );
    let ev = find(
        &|l| {
            l["outcome"] == "denied"
                && l["action"] == "push"
                && l["actor"] == "robot:ci"
                && l["repository"] == "team-b/app"
        },
        "denied push",
    );
    assert_eq!(ev["reason"], "token scope");
    find(
        &|l| l["outcome"] == "denied" && l["action"] == "delete" && l["actor"] == "user:runtime",
        "denied delete over Basic",
    );
    find(
        &|l| l["outcome"] == "denied" && l["action"] == "admin",
        "denied admin",
    );
    find(
        &|l| l["action"] == "login" && l["outcome"] == "failed" && l["actor"] == "login:runtime",
        "failed login",
    );
    find(
        &|l| l["action"] == "login" && l["outcome"] == "denied",
        "throttled login",
    );
    find(
        &|l| {
            l["outcome"] == "denied"
                && l["actor"] == "robot:ci"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("no longer exists"))
        },
        "revoked robot",
    );
    // Reads are not audited.
    assert!(lines
        .iter()
        .all(|l| l["action"] != "pull" || l["outcome"] == "denied"));

    // The query command filters the same lines.
    let (code, out, err) = ballast(
        &[
            "audit",
            &s.r.data.to_string_lossy(),
            "--action",
            "login",
            "--outcome",
            "failed",
            "--json",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let n = out.lines().count();
    assert_eq!(
        n,
        3 + 1,
        "three wrong passwords and the revoked robot's secret: {out}"
    );
    let (code, out, _) = ballast(
        &[
            "audit",
            &s.r.data.to_string_lossy(),
            "--action",
            "tag.",
            "--since",
            "1h",
        ],
        "",
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("tag.move") && out.contains("tag.delete"),
        "{out}"
    );
}

fn require(program: &str) {
    assert!(
        have(program),
        "{program} is not installed: run scripts/install-test-deps"
    );
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("stdin");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("wait");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn skopeo_and_podman_log_in_over_the_token_flow() {
    require("skopeo");
    require("podman");
    let s = secure(&[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let lower = tempfile::Builder::new()
        .prefix(&format!("ballast-auth-{}", std::process::id()))
        .rand_bytes(0)
        .tempdir()
        .expect("lowercase temp dir");
    let layout = lower.path().join("in");
    let manifest = oci::image(&layout, 61, 2, 100_000, "amd64");
    oci::finish_layout(&layout, &manifest, "v1");
    let host = s.r.host();
    let authfile = tmp.path().join("auth.json");
    let authfile = authfile.to_string_lossy();
    let src = format!("oci:{}:v1", layout.display());

    // The robot logs in with skopeo and pushes into its namespace.
    let (ok, out) = run(
        "skopeo",
        &[
            "login",
            "--tls-verify=false",
            "--authfile",
            &authfile,
            "-u",
            "ci",
            "--password-stdin",
            &host,
        ],
        Some(&s.robot_token),
    );
    assert!(ok, "skopeo login: {out}");
    let dest = format!("docker://{host}/team-a/img:v1");
    let (ok, out) = run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--authfile",
            &authfile,
            "--preserve-digests",
            &src,
            &dest,
        ],
        None,
    );
    assert!(ok, "skopeo copy as the robot: {out}");
    // But not outside it.
    let (ok, out) = run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--authfile",
            &authfile,
            &src,
            &format!("docker://{host}/team-b/img:v1"),
        ],
        None,
    );
    assert!(!ok, "the robot pushed to team-b: {out}");
    // A wrong password does not log in.
    let (ok, _) = run(
        "skopeo",
        &[
            "login",
            "--tls-verify=false",
            "--authfile",
            &authfile,
            "-u",
            "runtime",
            "--password-stdin",
            &host,
        ],
        Some("wrong-password"),
    );
    assert!(!ok);
    // The runtime reads with --creds, may not write, and anonymous may not read team-a.
    let creds = format!("runtime:{RUNTIME_PW}");
    let (ok, out) = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            &creds,
            &dest,
        ],
        None,
    );
    assert!(ok, "skopeo inspect --creds: {out}");
    assert_eq!(sha256(out.as_bytes()), manifest.digest);
    let (ok, _) = run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds,
            &src,
            &format!("docker://{host}/team-a/img:v2"),
        ],
        None,
    );
    assert!(!ok, "the runtime may not push");
    let (ok, _) = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--no-creds",
            &dest,
        ],
        None,
    );
    assert!(!ok, "anonymous may not read team-a");

    // podman logs in as the runtime and pulls; its push is refused.
    let (root, runroot) = (tmp.path().join("root"), tmp.path().join("run"));
    let pod_auth = tmp.path().join("podman-auth.json");
    let podman = |args: &[&str], stdin: Option<&str>| {
        let mut all: Vec<String> = vec![
            "--root".into(),
            root.to_string_lossy().into_owned(),
            "--runroot".into(),
            runroot.to_string_lossy().into_owned(),
            "--storage-driver".into(),
            "vfs".into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run("podman", &refs, stdin)
    };
    let pa = pod_auth.to_string_lossy();
    let (ok, out) = podman(
        &[
            "login",
            "--tls-verify=false",
            "--authfile",
            &pa,
            "-u",
            "runtime",
            "--password-stdin",
            &host,
        ],
        Some(RUNTIME_PW),
    );
    assert!(ok, "podman login: {out}");
    let image = format!("{host}/team-a/img:v1");
    let (ok, out) = podman(
        &[
            "pull",
            "-q",
            "--tls-verify=false",
            "--authfile",
            &pa,
            &image,
        ],
        None,
    );
    assert!(ok, "podman pull: {out}");
    let (ok, _) = podman(
        &[
            "push",
            "-q",
            "--tls-verify=false",
            "--authfile",
            &pa,
            &image,
            &format!("{host}/team-a/img:v3"),
        ],
        None,
    );
    assert!(!ok, "the runtime may not push with podman either");
}

#[test]
fn https_with_http2_and_a_self_signed_certificate() {
    require("curl");
    require("skopeo");
    let t = secure_with_tls();
    let (s, c, certs) = (&t.s, t.ca.as_str(), &t.certs);

    let curl = |extra: &[&str]| {
        let mut args = vec![
            "-sS",
            "--cacert",
            c,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ];
        args.extend_from_slice(extra);
        let url = s.r.url("/v2/");
        args.push(&url);
        let (ok, out) = run("curl", &args, None);
        assert!(ok, "curl: {out}");
        out
    };
    assert_eq!(curl(&["--http2"]), "2 401");
    assert_eq!(curl(&["--http1.1"]), "1.1 401");
    let admin = format!("admin:{ADMIN_PW}");
    assert_eq!(curl(&["--http2", "-u", &admin]), "2 200");
    // Without the certificate, the server is not trusted; plain HTTP gets no answer.
    let (ok, _) = run("curl", &["-sS", "-o", "/dev/null", &s.r.url("/v2/")], None);
    assert!(!ok);
    let (ok, _) = run(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            &format!("http://{}/v2/", s.r.host()),
        ],
        None,
    );
    assert!(!ok);

    // skopeo over HTTPS, verifying the certificate, through the token flow.
    let lower = tempfile::Builder::new()
        .prefix(&format!("ballast-tls-{}", std::process::id()))
        .rand_bytes(0)
        .tempdir()
        .expect("lowercase temp dir");
    let layout = lower.path().join("in");
    let manifest = oci::image(&layout, 62, 1, 50_000, "amd64");
    oci::finish_layout(&layout, &manifest, "v1");
    let dest = format!("docker://{}/team-a/tls:v1", s.r.host());
    let cert_dir = certs.to_string_lossy();
    let creds = format!("ci:{}", s.robot_token);
    let (ok, out) = run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-cert-dir",
            &cert_dir,
            "--dest-creds",
            &creds,
            "--preserve-digests",
            &format!("oci:{}:v1", layout.display()),
            &dest,
        ],
        None,
    );
    assert!(ok, "skopeo over TLS: {out}");
    let (ok, out) = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--cert-dir",
            &cert_dir,
            "--creds",
            &creds,
            &dest,
        ],
        None,
    );
    assert!(ok, "{out}");
    assert_eq!(sha256(out.as_bytes()), manifest.digest);
}

#[test]
fn plain_http_off_loopback_needs_an_explicit_opt_in() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, _, err) = ballast(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data",
            &tmp.path().join("d").to_string_lossy(),
        ],
        "",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("refusing plain HTTP") && err.contains("insecure_plain_http"),
        "{err}"
    );
}

/// The request log names who made each request (also when they were denied), and a log
/// written to a file carries no terminal colour codes.
#[test]
fn request_log_lines_name_the_actor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let htpasswd = dir.join("htpasswd");
    let (code, _, err) = ballast(
        &[
            "passwd",
            &htpasswd.to_string_lossy(),
            "runtime",
            "--cost",
            "4",
        ],
        &format!("{RUNTIME_PW}\n"),
    );
    assert_eq!(code, 0, "{err}");
    let config = dir.join("ballast.toml");
    std::fs::write(&config, policy_toml(dir)).expect("config");
    let log = dir.join("server.log");
    let log_s = log.to_string_lossy().into_owned();
    let mut r = Registry::start_args(
        &dir.join("data"),
        &[("BALLAST_LOG", "info"), (STDERR_FILE, log_s.as_str())],
        &["--config", &config.to_string_lossy()],
    );
    let runtime = basic("runtime", RUNTIME_PW);
    let as_runtime = [("Authorization", runtime.as_str())];
    assert_eq!(
        call("GET", &r.url("/v2/team-a/api/tags/list"), &as_runtime, None).status,
        404
    );
    assert_eq!(
        call("GET", &r.url("/v2/team-c/api/tags/list"), &as_runtime, None).status,
        403
    );
    assert_eq!(
        call("GET", &r.url("/v2/public/base/tags/list"), &[], None).status,
        404
    );
    r.stop();

    let text = std::fs::read_to_string(&log).expect("server log");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file:\n{text}"
    );
    let line = |path: &str| {
        text.lines()
            .find(|l| l.contains(" request ") && l.contains(&format!("path=\"{path}\"")))
            .unwrap_or_else(|| panic!("no request line for {path} in:\n{text}"))
            .to_owned()
    };
    let granted = line("/v2/team-a/api/tags/list");
    assert!(
        granted.contains("actor=\"user:runtime\"") && granted.contains("status=404"),
        "{granted}"
    );
    let denied = line("/v2/team-c/api/tags/list");
    assert!(
        denied.contains("actor=\"user:runtime\"") && denied.contains("status=403"),
        "{denied}"
    );
    let ms = granted
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ms="))
        .expect("ms field");
    assert!(
        ms.split_once('.').is_some_and(|(_, frac)| frac.len() == 3),
        "duration in ms with three decimals: {granted}"
    );
    let anonymous = line("/v2/public/base/tags/list");
    assert!(anonymous.contains("actor=\"anonymous\""), "{anonymous}");
}
