//! HTTP behaviour of every endpoint, including every error path.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{seeded, sha256, Registry};

pub struct Res {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Res {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// The OCI error code of an error response.
    pub fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Res {
    try_call(method, url, headers, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// [`call`] that reports transport failures (connection refused or reset) instead of
/// panicking: for tests that kill the server under its clients.
pub fn try_call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Res, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| {
            resp.header(&n)
                .map(|v| (n.to_ascii_lowercase(), v.to_owned()))
        })
        .collect();
    let mut body = Vec::new();
    resp.into_reader()
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok(Res {
        status,
        headers,
        body,
    })
}

pub fn push_blob(r: &Registry, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let res = call(
        "POST",
        &r.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")),
        &[],
        Some(data),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    d
}

pub fn manifest_for(config: &str, config_len: usize, layers: &[(&str, usize)]) -> Vec<u8> {
    json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
        "layers": layers.iter().map(|(d, n)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n})).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes()
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn base_and_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    let res = call("GET", &r.url("/v2/"), &[], None);
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("Docker-Distribution-API-Version"),
        Some("registry/2.0")
    );
    assert_eq!(call("GET", &r.url("/healthz"), &[], None).status, 200);
    let res = call("GET", &r.url("/v3/"), &[], None);
    assert_eq!(res.status, 404);
    let res = call("PUT", &r.url("/v2/_catalog"), &[], Some(b""));
    assert_eq!(res.status, 405);
}

#[test]
fn blob_push_pull_and_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    let data = seeded(1_500_000, 1);
    let d = push_blob(&r, "team-a/api", &data);
    let res = call(
        "GET",
        &r.url(&format!("/v2/team-a/api/blobs/{d}")),
        &[],
        None,
    );
    assert_eq!(res.status, 200);
    assert_eq!(res.body, data);
    assert_eq!(res.header("Docker-Content-Digest"), Some(d.as_str()));
    assert_eq!(res.header("Content-Type"), Some("application/octet-stream"));
    let head = call(
        "HEAD",
        &r.url(&format!("/v2/team-a/api/blobs/{d}")),
        &[],
        None,
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Length"), Some("1500000"));
    assert!(head.body.is_empty());

    let res = call(
        "GET",
        &r.url(&format!("/v2/team-a/api/blobs/{d}")),
        &[("Range", "bytes=65530-70000")],
        None,
    );
    assert_eq!(res.status, 206);
    assert_eq!(res.body, &data[65530..70001]);
    assert_eq!(
        res.header("Content-Range"),
        Some("bytes 65530-70000/1500000")
    );
    let res = call(
        "GET",
        &r.url(&format!("/v2/team-a/api/blobs/{d}")),
        &[("Range", "bytes=-10")],
        None,
    );
    assert_eq!(res.body, &data[data.len() - 10..]);
    let res = call(
        "GET",
        &r.url(&format!("/v2/team-a/api/blobs/{d}")),
        &[("Range", "bytes=1500000-")],
        None,
    );
    assert_eq!(res.status, 416);
    assert_eq!(res.header("Content-Range"), Some("bytes */1500000"));

    // A thousand ranges in one header, as podman's partial pulls send.
    let ranges: Vec<(usize, usize)> = (0..1000)
        .map(|i| (i * 1400 + 7, i * 1400 + 7 + (i % 50) + 1))
        .collect();
    let header = range_header(&ranges);
    assert!(header.len() > 12_000, "{}", header.len());
    let res = call(
        "GET",
        &r.url(&format!("/v2/team-a/api/blobs/{d}")),
        &[("Range", &header)],
        None,
    );
    assert_eq!(res.status, 206);
    let parts = multipart_parts(&res);
    assert_eq!(parts.len(), 1000);
    for (part, (a, b)) in parts.iter().zip(&ranges) {
        assert_eq!(part, &data[*a..*b]);
    }
}

/// A `Range` header asking for the `[start, end)` ranges, in this order.
fn range_header(ranges: &[(usize, usize)]) -> String {
    let specs: Vec<String> = ranges
        .iter()
        .map(|(a, b)| format!("{a}-{}", b - 1))
        .collect();
    format!("bytes={}", specs.join(","))
}

/// The parts of a `multipart/byteranges` answer, checked to end with the closing boundary.
fn multipart_parts(res: &Res) -> Vec<Vec<u8>> {
    let ct = res.header("Content-Type").expect("content type");
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .expect("multipart");
    let body = &res.body;
    let sep = format!("\r\n--{boundary}");
    let mut parts = Vec::new();
    let text_positions: Vec<usize> = body
        .windows(sep.len())
        .enumerate()
        .filter(|(_, w)| *w == sep.as_bytes())
        .map(|(i, _)| i)
        .collect();
    for w in text_positions.windows(2) {
        let part = &body[w[0] + sep.len()..w[1]];
        let split = part
            .windows(4)
            .position(|x| x == b"\r\n\r\n")
            .expect("part headers");
        parts.push(part[split + 4..].to_vec());
    }
    assert!(body.ends_with(format!("\r\n--{boundary}--\r\n").as_bytes()));
    parts
}

/// Raw chunks of sealed segments leave through `sendfile` (server/src/sendfile.rs): whole
/// blobs, ranges that start and end inside chunks and cross segments, and many ranges in one
/// answer arrive byte-exact, the bytes sent so are counted, and `sendfile = false` sends the
/// same bytes from memory.
#[test]
fn sealed_chunks_are_sent_from_their_files_byte_exact() {
    let data = seeded(12 << 20, 21);
    let ranges = [(0usize, 1usize), (70_001, 4_500_000), (5_000_000, 12 << 20)];
    let mut sent = Vec::new();
    for sendfile in ["true", "false"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Registry::start_with(
            dir.path(),
            &[
                ("BALLAST_SEGMENT_BYTES_MAX", &(2u64 << 20).to_string()),
                ("BALLAST_SENDFILE", sendfile),
            ],
        );
        let d = push_blob(&r, "team-a/api", &data);
        let url = r.url(&format!("/v2/team-a/api/blobs/{d}"));
        for _ in 0..2 {
            let res = call("GET", &url, &[], None);
            assert_eq!(res.status, 200);
            assert!(res.body == data, "the whole blob, sendfile = {sendfile}");
        }
        for (a, b) in ranges {
            let res = call(
                "GET",
                &url,
                &[("Range", &format!("bytes={a}-{}", b - 1))],
                None,
            );
            assert_eq!(res.status, 206);
            assert!(
                res.body == data[a..b],
                "bytes {a}..{b}, sendfile = {sendfile}"
            );
        }
        let res = call("GET", &url, &[("Range", &range_header(&ranges))], None);
        assert_eq!(res.status, 206);
        let parts = multipart_parts(&res);
        assert_eq!(parts.len(), ranges.len());
        for (part, (a, b)) in parts.iter().zip(ranges) {
            assert!(*part == data[a..b], "part {a}..{b}, sendfile = {sendfile}");
        }
        sent.push(crate::metric(&r, "ballast_http_sendfile_bytes_total"));
    }
    // Most of the 2 x 12 MiB of whole pulls and the ranges lie in sealed segments.
    assert!(
        sent[0] > (24 << 20) as f64 * 0.7,
        "sent with sendfile: {}",
        sent[0]
    );
    assert_eq!(sent[1], 0.0, "sendfile = false sends nothing from files");
}

#[test]
fn chunked_upload_status_resume_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut r = Registry::start(dir.path());
    let data = seeded(3_000_000, 2);
    let d = sha256(&data);
    let res = call("POST", &r.url("/v2/a/blobs/uploads/"), &[], None);
    assert_eq!(res.status, 202);
    let loc = res.header("Location").expect("location").to_owned();
    assert!(res.header("Docker-Upload-UUID").is_some());

    let res = call(
        "PATCH",
        &r.url(&loc),
        &[("Content-Range", "0-999999")],
        Some(&data[..1_000_000]),
    );
    assert_eq!(res.status, 202);
    assert_eq!(res.header("Range"), Some("0-999999"));
    let loc2 = res.header("Location").expect("location").to_owned();

    // A chunk that does not start at the current offset: 416.
    let res = call(
        "PATCH",
        &r.url(&loc2),
        &[("Content-Range", "5-10")],
        Some(&data[5..11]),
    );
    assert_eq!(res.status, 416);
    assert_eq!(res.code(), "BLOB_UPLOAD_INVALID");

    // The session survives a restart; the older Location still answers.
    r.restart();
    let res = call("GET", &r.url(&loc), &[], None);
    assert_eq!(res.status, 204);
    assert_eq!(res.header("Range"), Some("0-999999"));

    // Streamed PATCH without Content-Range.
    let res = call(
        "PATCH",
        &r.url(&loc2),
        &[],
        Some(&data[1_000_000..2_500_000]),
    );
    assert_eq!(res.status, 202);
    assert_eq!(res.header("Range"), Some("0-2499999"));
    // Finish with the last chunk in the PUT.
    let res = call(
        "PUT",
        &r.url(&format!("{loc2}?digest={d}")),
        &[],
        Some(&data[2_500_000..]),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.header("Docker-Content-Digest"), Some(d.as_str()));
    assert_eq!(
        call("GET", &r.url(&format!("/v2/a/blobs/{d}")), &[], None).body,
        data
    );
    // The session is gone.
    assert_eq!(
        call("GET", &r.url(&loc2), &[], None).code(),
        "BLOB_UPLOAD_UNKNOWN"
    );

    // Digest mismatch: 400, nothing kept, session ended.
    let res = call("POST", &r.url("/v2/a/blobs/uploads/"), &[], None);
    let loc = res.header("Location").expect("location").to_owned();
    let other = seeded(1000, 9);
    let wrong = sha256(b"not this");
    let res = call(
        "PUT",
        &r.url(&format!("{loc}?digest={wrong}")),
        &[],
        Some(&other),
    );
    assert_eq!(res.status, 400);
    assert_eq!(res.code(), "DIGEST_INVALID");
    assert_eq!(
        call("HEAD", &r.url(&format!("/v2/a/blobs/{wrong}")), &[], None).status,
        404
    );
    assert_eq!(
        call(
            "HEAD",
            &r.url(&format!("/v2/a/blobs/{}", sha256(&other))),
            &[],
            None
        )
        .status,
        404
    );
    assert_eq!(call("GET", &r.url(&loc), &[], None).status, 404);

    // Monolithic with a wrong digest.
    let res = call(
        "POST",
        &r.url(&format!("/v2/a/blobs/uploads/?digest={wrong}")),
        &[],
        Some(&other),
    );
    assert_eq!(res.code(), "DIGEST_INVALID");

    // Cancel.
    let loc = call("POST", &r.url("/v2/a/blobs/uploads/"), &[], None)
        .header("Location")
        .expect("loc")
        .to_owned();
    assert_eq!(call("DELETE", &r.url(&loc), &[], None).status, 204);
    assert_eq!(
        call("DELETE", &r.url(&loc), &[], None).code(),
        "BLOB_UPLOAD_UNKNOWN"
    );
    // A session of another repository, and a malformed id.
    let loc = call("POST", &r.url("/v2/a/blobs/uploads/"), &[], None)
        .header("Location")
        .expect("loc")
        .to_owned();
    let stolen = loc.replace("/v2/a/", "/v2/b/");
    assert_eq!(
        call("GET", &r.url(&stolen), &[], None).code(),
        "BLOB_UPLOAD_UNKNOWN"
    );
    assert_eq!(
        call(
            "GET",
            &r.url("/v2/a/blobs/uploads/..%2f..%2fetc"),
            &[],
            None
        )
        .code(),
        "BLOB_UPLOAD_UNKNOWN"
    );
    // PUT without a digest.
    assert_eq!(
        call("PUT", &r.url(&loc), &[], Some(b"")).code(),
        "DIGEST_INVALID"
    );
}

#[test]
fn mounts_and_blob_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    let data = seeded(200_000, 3);
    let d = push_blob(&r, "src/app", &data);
    let res = call(
        "POST",
        &r.url(&format!(
            "/v2/dst/app/blobs/uploads/?mount={d}&from=src/app"
        )),
        &[],
        None,
    );
    assert_eq!(res.status, 201);
    assert_eq!(
        res.header("Location"),
        Some(format!("/v2/dst/app/blobs/{d}").as_str())
    );
    // Automatic mount: `from` does not hold it, but the registry does.
    let res = call(
        "POST",
        &r.url(&format!("/v2/third/blobs/uploads/?mount={d}&from=nowhere")),
        &[],
        None,
    );
    assert_eq!(res.status, 201);
    let res = call(
        "POST",
        &r.url(&format!("/v2/fourth/blobs/uploads/?mount={d}")),
        &[],
        None,
    );
    assert_eq!(res.status, 201);
    // Unknown blob: falls back to a session.
    let unknown = sha256(b"unknown");
    let res = call(
        "POST",
        &r.url(&format!(
            "/v2/dst/app/blobs/uploads/?mount={unknown}&from=src/app"
        )),
        &[],
        None,
    );
    assert_eq!(res.status, 202);
    // Not readable from a repository that has no link.
    assert_eq!(
        call("GET", &r.url(&format!("/v2/other/blobs/{d}")), &[], None).code(),
        "BLOB_UNKNOWN"
    );
    // Delete unlinks from one repository only.
    assert_eq!(
        call(
            "DELETE",
            &r.url(&format!("/v2/dst/app/blobs/{d}")),
            &[],
            None
        )
        .status,
        202
    );
    assert_eq!(
        call("GET", &r.url(&format!("/v2/dst/app/blobs/{d}")), &[], None).status,
        404
    );
    assert_eq!(
        call("GET", &r.url(&format!("/v2/src/app/blobs/{d}")), &[], None).body,
        data
    );
    assert_eq!(
        call(
            "DELETE",
            &r.url(&format!("/v2/dst/app/blobs/{d}")),
            &[],
            None
        )
        .code(),
        "BLOB_UNKNOWN"
    );
}

#[test]
fn manifests_tags_referrers_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    let repo = "lib/app";
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = seeded(100_000, 4);
    let cd = push_blob(&r, repo, config);
    let ld = push_blob(&r, repo, &layer);
    let m = manifest_for(&cd, config.len(), &[(&ld, layer.len())]);
    let md = sha256(&m);
    let url = |reference: &str| r.url(&format!("/v2/{repo}/manifests/{reference}"));

    let res = call(
        "PUT",
        &url("v1"),
        &[("Content-Type", OCI_MANIFEST)],
        Some(&m),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.header("Docker-Content-Digest"), Some(md.as_str()));
    assert_eq!(
        res.header("Location"),
        Some(format!("/v2/{repo}/manifests/{md}").as_str())
    );
    for reference in ["v1", md.as_str()] {
        let res = call("GET", &url(reference), &[("Accept", OCI_MANIFEST)], None);
        assert_eq!(res.status, 200);
        assert_eq!(res.body, m, "exact bytes");
        assert_eq!(res.header("Content-Type"), Some(OCI_MANIFEST));
        assert_eq!(res.header("Docker-Content-Digest"), Some(md.as_str()));
        let head = call("HEAD", &url(reference), &[], None);
        assert_eq!(
            head.header("Content-Length"),
            Some(m.len().to_string().as_str())
        );
    }
    assert_eq!(
        call("GET", &url("nope"), &[], None).code(),
        "MANIFEST_UNKNOWN"
    );
    assert_eq!(
        call("GET", &r.url("/v2/no/such/manifests/v1"), &[], None).code(),
        "MANIFEST_UNKNOWN"
    );
    let bad = call("GET", &url("sha256:xyz"), &[], None);
    assert_eq!((bad.status, bad.code().as_str()), (400, "DIGEST_INVALID"));

    // Without mediaType, inferred from Content-Type and structure; several tags at once.
    let mut v: Value = serde_json::from_slice(&m).expect("json");
    v.as_object_mut().expect("object").remove("mediaType");
    let bare = v.to_string().into_bytes();
    let bd = sha256(&bare);
    let res = call("PUT", &url(&bd), &[], Some(&bare));
    assert_eq!(res.status, 201);
    let res = call(
        "PUT",
        &r.url(&format!("/v2/{repo}/manifests/{bd}?tag=a&tag=b")),
        &[("Content-Type", OCI_MANIFEST)],
        Some(&bare),
    );
    assert_eq!(res.status, 201);
    assert_eq!(res.header("OCI-Tag"), Some("a,b"));
    assert_eq!(
        call("GET", &url("a"), &[], None).header("Content-Type"),
        Some(OCI_MANIFEST)
    );

    // Errors.
    let missing = manifest_for(&cd, config.len(), &[(&sha256(b"absent"), 6)]);
    let res = call(
        "PUT",
        &url("x"),
        &[("Content-Type", OCI_MANIFEST)],
        Some(&missing),
    );
    assert_eq!(
        (res.status, res.code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
    let res = call(
        "PUT",
        &url("x"),
        &[("Content-Type", OCI_MANIFEST)],
        Some(b"{not json"),
    );
    assert_eq!((res.status, res.code().as_str()), (400, "MANIFEST_INVALID"));
    let res = call(
        "PUT",
        &url(&sha256(b"other")),
        &[("Content-Type", OCI_MANIFEST)],
        Some(&m),
    );
    assert_eq!((res.status, res.code().as_str()), (400, "DIGEST_INVALID"));
    let big = vec![b' '; (4 << 20) + 1];
    let res = call(
        "PUT",
        &url("big"),
        &[("Content-Type", OCI_MANIFEST)],
        Some(&big),
    );
    assert_eq!(res.status, 413);
    let res = call(
        "PUT",
        &url("bad:tag"),
        &[("Content-Type", OCI_MANIFEST)],
        Some(&m),
    );
    assert_eq!(res.status, 400);
    let res = call(
        "PUT",
        &r.url("/v2/UPPER/manifests/v1"),
        &[("Content-Type", OCI_MANIFEST)],
        Some(&m),
    );
    assert_eq!((res.status, res.code().as_str()), (400, "NAME_INVALID"));
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(b"absent manifest"), "size": 3}]});
    let res = call(
        "PUT",
        &url("idx"),
        &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
        Some(index.to_string().as_bytes()),
    );
    assert_eq!((res.status, res.code().as_str()), (404, "MANIFEST_UNKNOWN"));
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": m.len()}]});
    let res = call(
        "PUT",
        &url("idx"),
        &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
        Some(index.to_string().as_bytes()),
    );
    assert_eq!(res.status, 201);

    // A referrer whose subject exists, and one whose subject does not exist yet.
    let empty = push_blob(&r, repo, b"{}");
    let sig = |subject: &str, ty: &str| {
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ty,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": ld, "size": layer.len()}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": m.len()},
            "annotations": {"org.example.kind": ty}})
        .to_string()
        .into_bytes()
    };
    let s1 = sig(&md, "application/vnd.example.sig");
    let s2 = sig(&md, "application/spdx+json");
    for s in [&s1, &s2] {
        let res = call(
            "PUT",
            &url(&sha256(s)),
            &[("Content-Type", OCI_MANIFEST)],
            Some(s),
        );
        assert_eq!(res.status, 201);
        assert_eq!(res.header("OCI-Subject"), Some(md.as_str()));
    }
    let dangling = sig(&sha256(b"future subject"), "application/vnd.example.sig");
    assert_eq!(
        call(
            "PUT",
            &url(&sha256(&dangling)),
            &[("Content-Type", OCI_MANIFEST)],
            Some(&dangling)
        )
        .status,
        201
    );
    let res = call(
        "GET",
        &r.url(&format!("/v2/{repo}/referrers/{md}")),
        &[],
        None,
    );
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("Content-Type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    let list = res.json();
    assert_eq!(list["manifests"].as_array().map(Vec::len), Some(2));
    let res = call(
        "GET",
        &r.url(&format!(
            "/v2/{repo}/referrers/{md}?artifactType=application/spdx%2Bjson"
        )),
        &[],
        None,
    );
    assert_eq!(res.header("OCI-Filters-Applied"), Some("artifactType"));
    let list = res.json();
    assert_eq!(list["manifests"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["manifests"][0]["digest"], json!(sha256(&s2)));
    assert_eq!(
        list["manifests"][0]["annotations"]["org.example.kind"],
        json!("application/spdx+json")
    );
    let res = call(
        "GET",
        &r.url(&format!("/v2/{repo}/referrers/{}", sha256(b"nothing"))),
        &[],
        None,
    );
    assert_eq!(
        (res.status, res.json()["manifests"].as_array().map(Vec::len)),
        (200, Some(0))
    );

    // Tag listing with pagination.
    for t in ["c", "d", "e"] {
        assert_eq!(
            call("PUT", &url(t), &[("Content-Type", OCI_MANIFEST)], Some(&m)).status,
            201
        );
    }
    let res = call("GET", &r.url(&format!("/v2/{repo}/tags/list")), &[], None);
    assert_eq!(
        res.json()["tags"],
        json!(["a", "b", "c", "d", "e", "idx", "v1"])
    );
    let res = call(
        "GET",
        &r.url(&format!("/v2/{repo}/tags/list?n=2")),
        &[],
        None,
    );
    assert_eq!(res.json()["tags"], json!(["a", "b"]));
    let link = res.header("Link").expect("link").to_owned();
    assert_eq!(
        link,
        format!("</v2/{repo}/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let res = call(
        "GET",
        &r.url(&format!("/v2/{repo}/tags/list?n=2&last=b")),
        &[],
        None,
    );
    assert_eq!(res.json()["tags"], json!(["c", "d"]));
    let res = call(
        "GET",
        &r.url(&format!("/v2/{repo}/tags/list?n=0")),
        &[],
        None,
    );
    assert_eq!(res.json()["tags"], json!([]));
    assert_eq!(
        call("GET", &r.url("/v2/none/tags/list"), &[], None).code(),
        "NAME_UNKNOWN"
    );

    // Catalog.
    push_blob(&r, "zeta", b"z");
    let res = call("GET", &r.url("/v2/_catalog?n=1"), &[], None);
    assert_eq!(res.json()["repositories"], json!(["lib/app"]));
    assert!(res
        .header("Link")
        .is_some_and(|l| l.contains("last=lib/app")));
    let res = call("GET", &r.url("/v2/_catalog?last=lib/app"), &[], None);
    assert_eq!(res.json()["repositories"], json!(["zeta"]));

    // Deletes: a tag only, then the manifest with its tags.
    assert_eq!(call("DELETE", &url("c"), &[], None).status, 202);
    assert_eq!(call("GET", &url("c"), &[], None).code(), "MANIFEST_UNKNOWN");
    assert_eq!(call("GET", &url("d"), &[], None).status, 200);
    assert_eq!(call("DELETE", &url(&md), &[], None).status, 202);
    for t in ["d", "e", "v1"] {
        assert_eq!(call("GET", &url(t), &[], None).code(), "MANIFEST_UNKNOWN");
    }
    assert_eq!(
        call("DELETE", &url(&md), &[], None).code(),
        "MANIFEST_UNKNOWN"
    );
}

#[test]
fn sha512_and_absolute_form_targets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    use sha2::Digest as _;
    let data = seeded(70_000, 5);
    let d = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&data)));
    let res = call(
        "POST",
        &r.url(&format!("/v2/s/blobs/uploads/?digest={d}")),
        &[],
        Some(&data),
    );
    assert_eq!(res.status, 201);
    assert_eq!(
        call("GET", &r.url(&format!("/v2/s/blobs/{d}")), &[], None).body,
        data
    );

    // A request target in absolute form.
    let mut s = TcpStream::connect(r.addr).expect("connect");
    write!(
        s,
        "GET http://{}/v2/s/blobs/{d} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        r.host(),
        r.host()
    )
    .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out[..40.min(out.len())])
    );
}

#[test]
fn slow_clients_are_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start_with(
        dir.path(),
        &[
            ("BALLAST_HEADER_TIMEOUT_SECS", "1"),
            ("BALLAST_BODY_IDLE_TIMEOUT_SECS", "1"),
        ],
    );
    // Slowloris: headers that never end.
    let mut slow = TcpStream::connect(r.addr).expect("connect");
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    // A trickled body that stalls.
    let loc = call("POST", &r.url("/v2/t/blobs/uploads/"), &[], None)
        .header("Location")
        .expect("loc")
        .to_owned();
    let mut trickle = TcpStream::connect(r.addr).expect("connect");
    write!(
        trickle,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc"
    )
    .expect("write");
    // Others are served meanwhile.
    let t0 = Instant::now();
    assert_eq!(call("GET", &r.url("/v2/"), &[], None).status, 200);
    assert!(t0.elapsed() < Duration::from_secs(1));
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "slowloris connection was closed by the server"
    );
    trickle
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = Vec::new();
    let _ = trickle.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // The bytes that did arrive are kept; the session can resume.
    let res = call("GET", &r.url(&loc), &[], None);
    assert_eq!(res.status, 204);
}
