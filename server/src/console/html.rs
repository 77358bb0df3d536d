//! The console's page frame and the small pieces pages share (sizes, times, digests, links,
//! pagers, copy fields). Templates are maud's `html!`: every `(value)` spliced into a page is
//! escaped, so text from users (names, tags, labels, annotations) can never become markup;
//! nothing here marks user text as pre-escaped.

use maud::{html, Markup, DOCTYPE};

/// Rows per page in every list.
pub const PAGE_ROWS: usize = 50;

/// Which top-level page a page belongs to (the highlighted link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    /// Repositories, a repository, an image.
    Repositories,
    /// Storage.
    Storage,
    /// Activity.
    Activity,
    /// Admin.
    Admin,
    /// Sign-in and messages outside the navigation.
    None,
}

/// What the frame needs to know of the viewer.
#[derive(Clone, Debug)]
pub struct Viewer {
    /// The name shown (`alice`), when signed in with authentication on.
    pub name: Option<String>,
    /// The registry's admin (Storage and Admin pages, GC and robots).
    pub admin: bool,
    /// The session's form token.
    pub csrf: String,
    /// On a read replica: the bucket it follows (every page says changes go to the primary).
    pub replica_of: Option<String>,
}

/// A whole page: the frame with its navigation around `body`.
pub fn page(viewer: Option<&Viewer>, nav: Nav, title: &str, body: Markup) -> Markup {
    let link = |n: Nav, href: &str, text: &str| {
        html! { a href=(href) class=[(n == nav).then_some("here")] { (text) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Ballast" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/ui/" { "Ballast" }
                    @if let Some(v) = viewer {
                        (link(Nav::Repositories, "/ui/", "Repositories"))
                        @if v.admin {
                            (link(Nav::Storage, "/ui/storage", "Storage"))
                        }
                        (link(Nav::Activity, "/ui/activity", "Activity"))
                        @if v.admin {
                            (link(Nav::Admin, "/ui/admin", "Admin"))
                        }
                        @if let Some(name) = &v.name {
                            div.who {
                                span #who { (name) }
                                form.inline method="post" action="/ui/logout" {
                                    input type="hidden" name="csrf" value=(v.csrf);
                                    button.secondary #logout type="submit" { "Sign out" }
                                }
                            }
                        }
                    }
                }
                main {
                    @if let Some(b) = viewer.and_then(|v| v.replica_of.as_ref()) {
                        div.message.note #replica {
                            "This registry is a read replica of " (b) ": it serves pulls, and \
                             changes (pushes, deletes, tags, policies, collections) are made on \
                             its primary."
                        }
                    }
                    (body)
                }
            }
        }
    }
}

/// A message box (`ok`, `error` or `note`).
pub fn message(kind: &str, text: &str) -> Markup {
    html! { div class={"message " (kind)} role="status" { (text) } }
}

/// A hidden form token field.
pub fn csrf_field(token: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(token); }
}

/// A read-only field with a copy button (the button works with the console's script; the
/// field can be selected and copied by hand without it).
pub fn copy_field(id: &str, text: &str) -> Markup {
    html! {
        div.copy {
            input #(id) type="text" readonly value=(text) aria-label="command";
            button type="button" data-copy=(text) data-for=(id) { "Copy" }
        }
    }
}

/// Bytes for people (IEC units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A time in seconds since the epoch, in UTC; "—" for 0 (not known).
pub fn time(secs: u64) -> String {
    if secs == 0 {
        return "—".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// A digest shortened for tables (`sha256:0123456789ab`).
pub fn short(digest: &str) -> String {
    match digest.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}", &hex[..12]),
        _ => digest.to_owned(),
    }
}

/// A percentage of `part` in `whole` ("—" when whole is 0).
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "—".into();
    }
    format!("{:.0} %", part as f64 * 100.0 / whole as f64)
}

/// A console URL with query parameters (empty values left out), percent-encoded.
pub fn url(path: &str, params: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params.iter().filter(|(_, v)| !v.is_empty()) {
        q.append_pair(k, v);
    }
    let q = q.finish();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

/// The console page of a repository.
pub fn repo_url(name: &str) -> String {
    url("/ui/repo", &[("name", name)])
}

/// The console page of a manifest in a repository.
pub fn image_url(repo: &str, digest: &str) -> String {
    url("/ui/image", &[("repo", repo), ("digest", digest)])
}

/// The number of pages of `rows` rows (at least 1).
pub fn pages(rows: usize) -> usize {
    rows.div_ceil(PAGE_ROWS).max(1)
}

/// Previous / next links, keeping the other parameters.
pub fn pager(path: &str, params: &[(&str, &str)], page: usize, pages: usize) -> Markup {
    let to = |p: usize| {
        let n = p.to_string();
        let mut all: Vec<(&str, &str)> = params.to_vec();
        all.push(("page", &n));
        url(path, &all)
    };
    html! {
        nav.pager aria-label="pages" {
            @if page > 1 { a rel="prev" href=(to(page - 1)) { "← Previous" } }
            span.muted { "Page " (page) " of " (pages) }
            @if page < pages { a rel="next" href=(to(page + 1)) { "Next →" } }
        }
    }
}

/// Key-value rows of JSON objects (status of webhooks, replication, upstreams): the scalar
/// fields as columns, every value escaped.
pub fn json_table(rows: &[serde_json::Value]) -> Markup {
    let mut columns: Vec<String> = Vec::new();
    for r in rows {
        if let Some(o) = r.as_object() {
            for (k, v) in o {
                if !v.is_object() && !v.is_array() && !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    let cell = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    html! {
        table {
            thead { tr { @for c in &columns { th { (c) } } } }
            tbody {
                @for r in rows {
                    tr { @for c in &columns { td { (cell(r.get(c))) } } }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(short("sha256:0123456789abcdef"), "sha256:0123456789ab");
        assert_eq!(time(0), "—");
        assert_eq!(time(1_764_676_800), "2025-12-02 12:00:00 UTC");
        assert_eq!(percent(1, 4), "25 %");
        assert_eq!(
            url("/ui/repo", &[("name", "a/b c"), ("q", "")]),
            "/ui/repo?name=a%2Fb+c"
        );
    }

    #[test]
    fn user_text_is_escaped_everywhere() {
        let evil = "<script>alert(1)</script>\"'&";
        let v = Viewer {
            name: Some(evil.into()),
            admin: true,
            csrf: evil.into(),
            replica_of: Some(evil.into()),
        };
        let html = page(Some(&v), Nav::Repositories, evil, message("ok", evil)).into_string();
        let html = html + &json_table(&[serde_json::json!({ "name": evil })]).into_string();
        let html = html + &copy_field("x", evil).into_string();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }
}
