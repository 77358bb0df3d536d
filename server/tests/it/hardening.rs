//! Security defects found by testing from outside (issue #13), each with the test that
//! failed before its fix: account files rewritten with another owner and mode, stale
//! accounts served when a file broke, the login throttle outrun by concurrency, forged
//! lines in `ballast audit`, a challenge header with injected parameters, unaudited
//! anonymous mutation attempts, a world-readable data directory, and passwords that look
//! like robot tokens.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::auth::{ballast, basic, secure, ADMIN_PW};
use crate::http::call;
use crate::{push_image_as, Registry};

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").mode() & 0o7777
}

fn owner(p: &Path) -> (u32, u32) {
    let m = std::fs::metadata(p).expect("metadata");
    (m.uid(), m.gid())
}

fn set_owner_and_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    if is_root() {
        std::os::unix::fs::chown(p, Some(4242), Some(4343)).expect("chown");
    }
}

/// Polls `f` until it is true (at most 10 s); the account files are re-read within 1 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ballast passwd` and `ballast robot` keep an account file's owner, group and mode (the
/// service's user reads `root:ballast 0640`), and say so when the result is unreadable to
/// the owner of its directory.
#[test]
fn account_commands_keep_the_files_owner_and_mode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let htpasswd = tmp.path().join("htpasswd");
    let h = htpasswd.to_string_lossy().into_owned();
    for user in ["alice", "bob"] {
        let (code, _, err) = ballast(&["passwd", &h, user, "--cost", "4"], "a long password\n");
        assert_eq!(code, 0, "{err}");
    }
    set_owner_and_mode(&htpasswd, 0o640);
    let before = owner(&htpasswd);
    let (code, _, err) = ballast(&["passwd", &h, "bob", "--delete"], "");
    assert_eq!(code, 0, "{err}");
    assert_eq!((mode(&htpasswd), owner(&htpasswd)), (0o640, before));
    let (code, _, err) = ballast(
        &["passwd", &h, "carol", "--cost", "4"],
        "another password\n",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!((mode(&htpasswd), owner(&htpasswd)), (0o640, before));
    let text = std::fs::read_to_string(&htpasswd).expect("read");
    assert!(text.contains("alice:") && text.contains("carol:") && !text.contains("bob:"));

    let data = tmp.path().join("data");
    let d = data.to_string_lossy().into_owned();
    let (code, _, err) = ballast(&["robot", "create", &d, "ci"], "");
    assert_eq!(code, 0, "{err}");
    let robots = data.join("auth").join("robots.json");
    set_owner_and_mode(&robots, 0o640);
    let before = owner(&robots);
    for args in [
        vec!["robot", "create", &d, "ci2"],
        vec!["robot", "revoke", &d, "ci"],
    ] {
        let (code, _, err) = ballast(&args, "");
        assert_eq!(code, 0, "{args:?}: {err}");
        assert_eq!((mode(&robots), owner(&robots)), (0o640, before), "{args:?}");
    }

    // A file the owner of its directory cannot read is reported, not silently written.
    if is_root() {
        set_owner_and_mode(&htpasswd, 0o600);
        let (code, _, err) = ballast(&["passwd", &h, "dave", "--cost", "4"], "a long password\n");
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("warning:") && err.contains("cannot read"),
            "{err}"
        );
    }
}

/// When an account file becomes unreadable or invalid, the running server refuses its
/// accounts (it kept serving the ones read before) and says so in /healthz.
#[test]
fn a_broken_account_file_fails_closed() {
    let s = secure(&[]);
    let htpasswd = s.tmp.path().join("htpasswd");
    let robots = s.r.data.join("auth").join("robots.json");
    let admin = basic("admin", ADMIN_PW);
    let robot = basic("ci", &s.robot_token);
    let status =
        |auth: &str| call("GET", &s.r.url("/v2/"), &[("Authorization", auth)], None).status;
    let health = || call("GET", &s.r.url("/healthz"), &[], None);
    assert_eq!((status(&admin), status(&robot)), (200, 200));
    assert_eq!(health().json()["status"], "ok");
    // A bearer token issued before the file broke.
    let token_res = call(
        "GET",
        &s.r.url("/token?service=ballast&scope=repository:team-a/x:pull"),
        &[("Authorization", admin.as_str())],
        None,
    );
    let bearer = format!(
        "Bearer {}",
        token_res.json()["token"].as_str().expect("token")
    );

    // An invalid line (an MD5 hash) makes the whole file unusable. (Polled through
    // /healthz: failed logins would lock this address out.)
    let good = std::fs::read_to_string(&htpasswd).expect("read");
    std::fs::write(&htpasswd, format!("{good}mallory:$apr1$abc$def\n")).expect("write");
    eventually("the htpasswd file is refused", || {
        health().json()["status"] == "degraded"
    });
    assert_eq!(status(&admin), 401, "the admin is refused");
    assert_eq!(status(&bearer), 401, "tokens of the refused accounts too");
    assert_eq!(status(&robot), 200, "robots come from their own file");
    let h = health();
    assert_eq!(h.status, 200, "a restart would not help: not a 503");
    let v = h.json();
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("htpasswd")),
        "{v}"
    );
    assert!(
        !v.to_string().contains(&*s.tmp.path().to_string_lossy()),
        "no paths to anonymous callers: {v}"
    );

    // Fixed: the accounts are back.
    std::fs::write(&htpasswd, &good).expect("write");
    eventually("the htpasswd file is read again", || {
        health().json()["status"] == "ok"
    });
    assert_eq!(status(&admin), 200);

    // An unreadable robots file (here: a directory in its place).
    let saved = std::fs::read(&robots).expect("robots");
    std::fs::remove_file(&robots).expect("rm");
    std::fs::create_dir(&robots).expect("mkdir");
    eventually("the robots file is refused", || {
        health().json()["status"] == "degraded"
    });
    assert_eq!(status(&robot), 401, "the robot is refused");
    assert_eq!(status(&admin), 200);
    let v = health().json();
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("robots")),
        "{v}"
    );
    std::fs::remove_dir(&robots).expect("rmdir");
    std::fs::write(&robots, saved).expect("restore");
    eventually("the robots file is read again", || {
        health().json()["status"] == "ok"
    });
    assert_eq!(status(&robot), 200);
}

/// 40 wrong passwords at once with `login_failures_max = 5`: at most 5 are verified (401),
/// the rest are throttled (429). Before, every one of them was verified. 40 right ones at
/// once all get in.
#[test]
fn parallel_wrong_passwords_cannot_outrun_the_throttle() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let htpasswd = tmp.path().join("htpasswd");
    // The default cost: each verification takes long enough for all 40 to overlap.
    let (code, _, err) = ballast(
        &["passwd", &htpasswd.to_string_lossy(), "victim"],
        "the right password\n",
    );
    assert_eq!(code, 0, "{err}");
    let config = tmp.path().join("ballast.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nenabled = true\nhtpasswd = \"{}\"\nlogin_failures_max = 5\nlogin_lockout_secs = 60\n",
            htpasswd.display()
        ),
    )
    .expect("config");
    let r = Registry::start_args(
        &tmp.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    let url = r.url("/v2/");
    let parallel = |auth: &str| -> Vec<u16> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..40)
                .map(|_| scope.spawn(|| call("GET", &url, &[("Authorization", auth)], None).status))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        })
    };
    // The right password 40 times at once is not throttled: attempts beyond those that
    // could still fail wait for them, and each success makes room.
    let right = basic("victim", "the right password");
    assert!(parallel(&right).iter().all(|&s| s == 200));
    let wrong = basic("victim", "a wrong password");
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..40)
            .map(|_| {
                scope.spawn(|| call("GET", &url, &[("Authorization", wrong.as_str())], None).status)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let verified = statuses.iter().filter(|&&s| s == 401).count();
    let throttled = statuses.iter().filter(|&&s| s == 429).count();
    assert!(
        verified <= 5 && verified + throttled == 40,
        "401: {verified}, 429: {throttled}, all: {statuses:?}"
    );
}

/// Fields a client chooses (a user name, a mount source) cannot forge or overwrite lines of
/// `ballast audit`'s text output; control characters in user names are refused at the door.
#[test]
fn audit_text_output_cannot_be_forged() {
    let s = secure(&[]);
    let evil_user = basic("x\nFAKE forged line\u{1b}[2J\r", "whatever-password");
    let res = call(
        "GET",
        &s.r.url("/v2/"),
        &[("Authorization", evil_user.as_str())],
        None,
    );
    assert_eq!(res.status, 401);
    let admin = basic("admin", ADMIN_PW);
    let res = call(
        "POST",
        &s.r.url("/v2/team-a/app/blobs/uploads/?mount=sha256:%0D%0AFAKE%1B%5B2J&from=team-b/x"),
        &[("Authorization", admin.as_str())],
        None,
    );
    assert!(res.status < 500, "{}", res.status);
    let data = s.r.data.to_string_lossy().into_owned();
    let (code, text, err) = ballast(&["audit", &data], "");
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("login:x\\nFAKE"),
        "escaped, still readable:\n{text}"
    );
    for bad in ['\u{1b}', '\r'] {
        assert!(!text.contains(bad), "{bad:?} in:\n{text}");
    }
    assert!(
        text.lines().all(|l| !l.starts_with("FAKE")),
        "a forged line:\n{text}"
    );
    // The JSON lines keep the exact value (escaped by JSON itself).
    let (_, json, _) = ballast(&["audit", &data, "--json"], "");
    assert!(json
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).is_ok()));

    // Account names with control characters cannot be made.
    let (code, _, err) = ballast(
        &[
            "passwd",
            &s.tmp.path().join("other").to_string_lossy(),
            "a\u{1b}b",
            "--cost",
            "4",
        ],
        "a long password\n",
    );
    assert_ne!(code, 0);
    assert!(err.contains("control characters"), "{err}");
}

/// Sends raw request bytes (what a URL library would refuse to send) and returns the
/// response head.
fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(request.as_bytes()).expect("send");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n").next().unwrap_or("").to_owned()
}

/// A `"` in a repository name or the Host header cannot add parameters to the challenge;
/// off loopback, the realm must be configured rather than taken from Host.
#[test]
fn the_challenge_cannot_be_injected() {
    let s = secure(&[]);
    let head = raw_request(
        s.r.addr,
        "GET /v2/x\",realm=\"https://evil.example/t/tags/list HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(!head.contains("evil.example"), "{head}");
    let head = raw_request(
        s.r.addr,
        "GET /v2/ HTTP/1.1\r\nHost: evil\",realm=\"https://evil.example\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let challenge = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("www-authenticate:"))
        .unwrap_or_else(|| panic!("no challenge in {head}"));
    assert_eq!(challenge.matches("realm=").count(), 1, "{challenge}");
    assert!(!challenge.contains("https://evil"), "{challenge}");

    let config = s.tmp.path().join("ballast.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(s.tmp.path().join("other-data"))
        .arg("--config")
        .arg(&config)
        .env("BALLAST_INSECURE_PLAIN_HTTP", "true")
        .output()
        .expect("ballast serve");
    let (code, err) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr),
    );
    // (The config enables auth without a realm; refused before anything is bound.)
    assert_ne!(code, 0);
    assert!(err.contains("realm is required"), "{err}");
}

/// A push or delete attempted without credentials is audited (at most 10 lines a minute per
/// address); a read without credentials, the token flow's first step, is not.
#[test]
fn unauthenticated_mutation_attempts_are_audited_at_a_bounded_rate() {
    let s = secure(&[]);
    for _ in 0..15 {
        let res = call("POST", &s.r.url("/v2/team-a/app/blobs/uploads/"), &[], None);
        assert_eq!(res.status, 401);
    }
    let res = call("DELETE", &s.r.url("/v2/team-b/app/manifests/v1"), &[], None);
    assert_eq!(res.status, 401);
    assert_eq!(
        call("GET", &s.r.url("/v2/team-a/app/tags/list"), &[], None).status,
        401
    );
    let lines: Vec<Value> = std::fs::read_to_string(s.r.data.join("audit").join("audit.log"))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|v: &Value| v["actor"] == "anonymous")
        .collect();
    let pushes = lines.iter().filter(|v| v["action"] == "push").count();
    assert_eq!(pushes, 10, "{lines:?}");
    assert!(lines
        .iter()
        .all(|v| v["outcome"] == "denied" && v["reason"] == "no credentials"));
    assert_eq!(lines.iter().filter(|v| v["action"] == "pull").count(), 0);
    assert_eq!(
        lines.iter().filter(|v| v["action"] == "delete").count(),
        0,
        "the address's 10 lines this minute are spent"
    );
}

/// Whatever the umask, nothing the server or the account commands create is open to other
/// users; fsck warns about what is (and still exits 0 when nothing is damaged).
#[test]
fn the_data_directory_is_private() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut r = Registry::start(&data);
    push_image_as(&r.url(""), "team-a/app", "v1", 5, 300_000, &[]);
    let res = call("POST", &r.url("/v2/team-a/app/blobs/uploads/"), &[], None);
    assert_eq!(res.status, 202, "an open upload session");
    r.stop();
    let (code, _, err) = ballast(&["robot", "create", &data.to_string_lossy(), "ci"], "");
    assert_eq!(code, 0, "{err}");
    let mut seen = 0;
    let mut stack = vec![data.clone()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).expect("metadata");
        assert_eq!(
            m.mode() & 0o007,
            0,
            "{} is {:o}",
            p.display(),
            m.mode() & 0o7777
        );
        seen += 1;
        if m.is_dir() {
            stack.extend(
                std::fs::read_dir(&p)
                    .expect("list")
                    .flatten()
                    .map(|e| e.path()),
            );
        }
    }
    assert!(seen > 8, "walked {seen} entries");
    assert_eq!(mode(&data), 0o750);

    let d = data.to_string_lossy().into_owned();
    let (code, out, _) = ballast(&["fsck", &d], "");
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (code, out, _) = ballast(&["fsck", &d], "");
    assert_eq!(code, 0, "a warning, not a finding: {out}");
    assert!(
        out.contains("open to other users") && out.contains("chmod"),
        "{out}"
    );
}

/// A user whose password starts like a robot token (`blt_`) can log in.
#[test]
fn passwords_with_the_robot_token_prefix_log_in() {
    let s = secure(&[]);
    let htpasswd = s.tmp.path().join("htpasswd");
    let (code, _, err) = ballast(
        &["passwd", &htpasswd.to_string_lossy(), "dave", "--cost", "4"],
        "blt_not-a-robot-token\n",
    );
    assert_eq!(code, 0, "{err}");
    let dave = basic("dave", "blt_not-a-robot-token");
    eventually("dave logs in", || {
        call(
            "GET",
            &s.r.url("/v2/"),
            &[("Authorization", dave.as_str())],
            None,
        )
        .status
            == 200
    });
    // A robot's token still works, and is not taken for dave's password.
    let robot = basic("ci", &s.robot_token);
    assert_eq!(
        call(
            "GET",
            &s.r.url("/v2/"),
            &[("Authorization", robot.as_str())],
            None
        )
        .status,
        200
    );
    let wrong = basic("dave", &s.robot_token);
    assert_eq!(
        call(
            "GET",
            &s.r.url("/v2/"),
            &[("Authorization", wrong.as_str())],
            None
        )
        .status,
        401
    );
}

/// `ballast robot` writes its audit line where the server's config puts the log, and names
/// the person even when `USER` is not set.
#[test]
fn robot_commands_follow_the_config_and_name_the_person() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("elsewhere").join("audit.log");
    let robots = tmp.path().join("accounts").join("robots.json");
    let config = tmp.path().join("ballast.toml");
    std::fs::write(
        &config,
        format!(
            "audit_log = \"{}\"\n[auth]\nrobots = \"{}\"\n",
            log.display(),
            robots.display()
        ),
    )
    .expect("config");
    let data = tmp.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["robot", "create"])
        .arg(&data)
        .args(["ci", "--config"])
        .arg(&config)
        .env_remove("USER")
        .env_remove("LOGNAME")
        .env_remove("SUDO_USER")
        .output()
        .expect("ballast robot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(robots.exists(), "the config's robots file");
    assert!(!data.join("audit").exists(), "nothing in the default place");
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .expect("the config's audit log")
            .lines()
            .last()
            .expect("a line"),
    )
    .expect("json");
    assert_eq!(line["action"], "robot.create");
    let actor = line["actor"].as_str().expect("actor");
    assert!(
        actor.starts_with("cli:") && actor != "cli:unknown",
        "{actor}"
    );
}
