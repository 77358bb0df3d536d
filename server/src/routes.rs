//! The route table: which endpoint a request path names.

/// An endpoint of the distribution API, with its path parameters.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags { name: &'a str },
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: &'a str },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: &'a str, id: &'a str },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: &'a str, digest: &'a str },
    /// `/healthz`
    Health,
    /// `/admin/gc`: run a garbage collection now.
    AdminGc,
    /// `/token`: the token endpoint of the Docker token flow.
    Token,
}

/// Resolves a request path. Repository names may contain `/`, and even path components such
/// as `blobs`, so each pattern is matched from the end.
pub fn route(path: &str) -> Option<Route<'_>> {
    if path == "/healthz" {
        return Some(Route::Health);
    }
    if path == "/admin/gc" {
        return Some(Route::AdminGc);
    }
    if path == "/token" {
        return Some(Route::Token);
    }
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags { name });
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Route::UploadStart { name });
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    if name.is_empty() || last.is_empty() {
        return None;
    }
    match kind {
        "manifests" => Some(Route::Manifest {
            name,
            reference: last,
        }),
        "blobs" => Some(Route::Blob { name, digest: last }),
        "referrers" => Some(Route::Referrers { name, digest: last }),
        "uploads" => head
            .strip_suffix("/blobs/uploads")
            .map(|name| Route::Upload { name, id: last }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        assert_eq!(route("/v2/"), Some(Route::Base));
        assert_eq!(route("/v2"), Some(Route::Base));
        assert_eq!(route("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(
            route("/v2/a/b/tags/list"),
            Some(Route::Tags { name: "a/b" })
        );
        assert_eq!(
            route("/v2/a/manifests/latest"),
            Some(Route::Manifest {
                name: "a",
                reference: "latest"
            })
        );
        assert_eq!(
            route("/v2/x/blobs/y/blobs/sha256:00"),
            Some(Route::Blob {
                name: "x/blobs/y",
                digest: "sha256:00"
            })
        );
        assert_eq!(
            route("/v2/a/blobs/uploads/"),
            Some(Route::UploadStart { name: "a" })
        );
        assert_eq!(
            route("/v2/a/b/blobs/uploads/abc"),
            Some(Route::Upload {
                name: "a/b",
                id: "abc"
            })
        );
        assert_eq!(
            route("/v2/a/referrers/sha256:1"),
            Some(Route::Referrers {
                name: "a",
                digest: "sha256:1"
            })
        );
        assert_eq!(route("/v2/a/uploads/x"), None);
        assert_eq!(route("/v3/a"), None);
        assert_eq!(route("/v2/a/manifests/"), None);
    }
}
