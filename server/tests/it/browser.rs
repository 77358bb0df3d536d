//! The web console in a real browser: Debian's Chromium, driven through chromedriver with a
//! WebDriver client. Sign in, search, open an image with its layers and a referrer, copy a
//! pull command, delete a tag and find the deletion in Activity; another team's user sees
//! nothing of it and cannot delete there, even by forging the form; a form without its
//! token is refused; sign out. Screenshots of the main pages are taken on the way (into
//! `BALLAST_SCREENSHOTS_DIR` when set, e.g. docs/console, else the test's temporary
//! directory).

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::console::{push_rich_image, teams, ADMIN_PW, ALICE_PW, BOB_PW};
use crate::have;
use crate::http::call;

/// A chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver and the browsers it started are one process group of their own:
        // all of it goes, also when a failed assertion left a browser session open.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Driver {
        assert!(
            have("chromedriver") && have("chromium"),
            "chromium and chromium-driver are not installed: run scripts/install-test-deps"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting chromedriver");
        let d = Driver { child, port };
        // Ready when its status says so.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = crate::http::try_call("GET", &d.url(), &[], None) {
                if r.status == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/status", self.port)
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1360,900", "--no-first-run", "--disable-extensions",
                "--disable-crash-reporter", "--disable-breakpad",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

fn shots_dir() -> PathBuf {
    let dir = std::env::var_os("BALLAST_SCREENSHOTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console"));
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).expect("write screenshot");
}

async fn text(c: &Client, css: &str) -> String {
    // (An element found just as a page was being replaced goes stale: find it again.)
    for _ in 0..50 {
        let el = c
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        match el.text().await {
            Ok(t) => return t,
            Err(e) if e.to_string().contains("stale") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{css}: {e}"),
        }
    }
    panic!("{css} kept going stale")
}

/// Waits until the browser is at another address than `from` (a link followed, a form
/// sent).
async fn left(c: &Client, from: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.current_url().await.expect("url").as_str() == from {
        assert!(Instant::now() < deadline, "still at {from}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clicks what `css` finds and waits for the page it leads to.
async fn follow(c: &Client, css: Locator<'_>) {
    let from = c.current_url().await.expect("url").to_string();
    c.find(css)
        .await
        .expect("element")
        .click()
        .await
        .expect("click");
    left(c, &from).await;
}

async fn sign_in(c: &Client, base: &str, user: &str, password: &str) {
    c.goto(&format!("{base}/ui/")).await.expect("goto");
    let url = c.current_url().await.expect("url");
    assert!(url.path().starts_with("/ui/login"), "{url}");
    c.find(Locator::Css("#username"))
        .await
        .expect("user field")
        .send_keys(user)
        .await
        .expect("type");
    c.find(Locator::Css("#password"))
        .await
        .expect("password field")
        .send_keys(password)
        .await
        .expect("type");
    c.find(Locator::Css("#signin"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#who"))
        .await
        .expect("signed in");
}

/// Submits a form built in the page (as a page on another site would, or a user editing
/// the form): fields as given.
async fn forge(c: &Client, action: &str, fields: serde_json::Value) {
    let from = c.current_url().await.expect("url").to_string();
    c.execute(
        "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];
         for (const [k, v] of Object.entries(arguments[1])) {
           const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v;
           f.appendChild(i);
         }
         document.body.appendChild(f); f.submit();",
        vec![json!(action), fields],
    )
    .await
    .expect("forged form");
    left(c, &from).await;
}

#[test]
fn console_in_a_real_browser() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, _) = teams(tmp.path(), &[]);
    let base = r.url("");
    let admin = crate::auth::basic("admin", ADMIN_PW);
    let h = [("Authorization", admin.as_str())];
    // Something to look at: images sharing layers across namespaces, a signed image.
    let digest = push_rich_image(&base, "team-a/app", "v1", 11, &h, true);
    push_rich_image(&base, "team-a/app", "v2", 12, &h, false);
    crate::push_image_as(&base, "team-a/worker", "1.0", 13, 200_000, &h);
    crate::push_image_as(&base, "team-b/tools", "latest", 13, 200_000, &h);
    crate::push_image_as(&base, "team-b/tools", "1.1", 14, 150_000, &h);
    crate::push_image_as(&base, "public/base", "bookworm", 15, 400_000, &h);
    let gc = call("POST", &r.url("/admin/gc?grace=0"), &h, None);
    assert_eq!(gc.status, 200);
    let driver = Driver::start();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // alice: team-a.
        let c = browser(&driver, &tmp.path().join("profile-alice")).await;
        sign_in(&c, &base, "alice", ALICE_PW).await;
        let list = text(&c, "#repositories").await;
        assert!(
            list.contains("team-a/app") && list.contains("team-a/worker"),
            "{list}"
        );
        assert!(
            !list.contains("team-b") && !list.contains("public"),
            "{list}"
        );
        shot(&c, "repositories").await;

        // Find the image by search and open it.
        c.find(Locator::Css("#search"))
            .await
            .expect("search")
            .send_keys("app")
            .await
            .expect("type");
        follow(&c, Locator::Css("form.filters button")).await;
        let found = text(&c, "#repositories").await;
        assert!(
            found.contains("team-a/app") && !found.contains("team-a/worker"),
            "{found}"
        );
        follow(&c, Locator::LinkText("team-a/app")).await;
        let tags = text(&c, "#tags").await;
        assert!(tags.contains("v1") && tags.contains("v2"), "{tags}");
        shot(&c, "repository").await;
        follow(&c, Locator::LinkText("v1")).await;
        let layers = text(&c, "#layers").await;
        assert!(
            layers.contains("application/vnd.oci.image.layer.v1.tar"),
            "{layers}"
        );
        let referrers = text(&c, "#referrers").await;
        assert!(
            referrers.contains("application/vnd.dev.cosign.artifact.sig.v1+json"),
            "{referrers}"
        );
        // The label and annotation holding a script are shown as text, and never ran.
        let labels = text(&c, "#labels").await;
        assert!(
            labels.contains("<script>alert('pwned')</script>"),
            "{labels}"
        );
        assert!(
            c.get_alert_text().await.is_err(),
            "a script from a label ran"
        );

        // Copy the pull command by digest.
        let expected = format!("docker pull {}/team-a/app@{digest}", r.host());
        let field = c.find(Locator::Css("#pull-digest")).await.expect("field");
        assert_eq!(
            field.prop("value").await.expect("value").as_deref(),
            Some(expected.as_str())
        );
        let button = c
            .find(Locator::Css("button[data-for='pull-digest']"))
            .await
            .expect("copy");
        button.click().await.expect("click");
        c.wait()
            .at_most(Duration::from_secs(5))
            .for_element(Locator::Css("button[data-for='pull-digest'][data-copied]"))
            .await
            .expect("the copy button answered");
        assert_eq!(button.text().await.expect("text"), "Copied");
        shot(&c, "image").await;

        // Delete tag v2, confirmed, and find it in Activity.
        c.goto(&format!("{base}/ui/repo?name=team-a/app"))
            .await
            .expect("goto");
        follow(&c, Locator::Css("tr[data-tag='v2'] a.button.danger")).await;
        follow(&c, Locator::Css("#confirm-delete")).await;
        let done = text(&c, "main").await;
        assert!(done.contains("Deleted tag v2 of team-a/app"), "{done}");
        assert_eq!(
            call("GET", &r.url("/v2/team-a/app/manifests/v2"), &h, None).status,
            404
        );
        c.goto(&format!("{base}/ui/activity")).await.expect("goto");
        let activity = text(&c, "#activity").await;
        assert!(
            activity.contains("tag.delete")
                && activity.contains("user:alice")
                && activity.contains("v2"),
            "{activity}"
        );

        // A form without its token is refused.
        forge(
            &c,
            "/ui/tag/delete",
            json!({"repo": "team-a/app", "tag": "v1"}),
        )
        .await;
        let refused = text(&c, "main").await;
        assert!(refused.contains("Form refused"), "{refused}");
        assert_eq!(
            call("GET", &r.url("/v2/team-a/app/manifests/v1"), &h, None).status,
            200
        );

        // Sign out.
        c.goto(&format!("{base}/ui/")).await.expect("goto");
        follow(&c, Locator::Css("#logout")).await;
        c.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("#signin"))
            .await
            .expect("back at the sign-in page");
        c.goto(&format!("{base}/ui/repo?name=team-a/app"))
            .await
            .expect("goto");
        assert!(c
            .current_url()
            .await
            .expect("url")
            .path()
            .starts_with("/ui/login"));
        c.close().await.expect("close");

        // bob: team-b sees nothing of team-a and cannot delete there.
        let c = browser(&driver, &tmp.path().join("profile-bob")).await;
        sign_in(&c, &base, "bob", BOB_PW).await;
        let list = text(&c, "#repositories").await;
        assert!(
            list.contains("team-b/tools") && !list.contains("team-a"),
            "{list}"
        );
        c.goto(&format!("{base}/ui/repo?name=team-a/app"))
            .await
            .expect("goto");
        assert!(text(&c, "main").await.contains("or you may not pull it"));
        c.goto(&format!("{base}/ui/activity")).await.expect("goto");
        assert!(!text(&c, "main").await.contains("team-a"));
        // Forged: the right form with bob's own token, aimed at team-a.
        let token = c
            .find(Locator::Css("header form input[name='csrf']"))
            .await
            .expect("token field")
            .prop("value")
            .await
            .expect("value")
            .expect("a token");
        forge(
            &c,
            "/ui/tag/delete",
            json!({"csrf": token, "repo": "team-a/app", "tag": "v1"}),
        )
        .await;
        let refused = text(&c, "main").await;
        assert!(
            refused.contains("DENIED") && refused.contains("Not deleted"),
            "{refused}"
        );
        assert_eq!(
            call("GET", &r.url("/v2/team-a/app/manifests/v1"), &h, None).status,
            200
        );
        c.close().await.expect("close");

        // The admin's pages.
        let c = browser(&driver, &tmp.path().join("profile-admin")).await;
        sign_in(&c, &base, "admin", ADMIN_PW).await;
        c.goto(&format!("{base}/ui/storage")).await.expect("goto");
        let ns = text(&c, "#namespaces").await;
        assert!(
            ns.contains("team-a") && ns.contains("team-b") && ns.contains("public"),
            "{ns}"
        );
        shot(&c, "storage").await;
        c.goto(&format!("{base}/ui/activity")).await.expect("goto");
        text(&c, "#activity").await;
        shot(&c, "activity").await;
        c.goto(&format!("{base}/ui/admin")).await.expect("goto");
        text(&c, "#robots").await;
        shot(&c, "admin").await;
        c.close().await.expect("close");
    });
}
