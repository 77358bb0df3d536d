//! Load and hostile input against a running server: a thousand concurrent connections,
//! oversized headers, manifests and range lists, invalid digests, path traversal in names
//! and references, and uploads cut off at random points. The server stays up, answers with
//! the spec's errors, and keeps nothing partial or visible from a failed request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::{call, Res};
use crate::{seeded, sha256, Registry};

/// Sends raw bytes and reads what comes back until the server closes or `limit` passes.
fn raw(r: &Registry, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(r.addr).expect("connect");
    s.set_read_timeout(Some(limit)).expect("timeout");
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Sends a PATCH announcing `announced` body bytes, then only `part` of them, and hangs up.
fn cut_patch(mut s: TcpStream, loc: &str, announced: usize, part: &[u8]) {
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {announced}\r\n\r\n"
    )
    .expect("head");
    s.write_all(part).expect("part");
}

/// The last offset an upload status answer's `Range: 0-<end>` names.
fn range_end(status: &Res) -> usize {
    status
        .header("range")
        .and_then(|v| v.split('-').nth(1))
        .and_then(|v| v.parse().ok())
        .expect("Range")
}

fn status_of(response: &[u8]) -> u16 {
    std::str::from_utf8(&response[..response.len().min(12)])
        .ok()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_thousand_concurrent_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    let data = seeded(50_000, 3);
    let d = sha256(&data);
    let res = call(
        "POST",
        &r.url(&format!("/v2/load/app/blobs/uploads/?digest={d}")),
        &[],
        Some(&data),
    );
    assert_eq!(res.status, 201);
    // Open them all first, then send a request on each, then read every answer.
    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(r.addr).expect("connect"))
        .collect();
    let request = format!("GET /v2/load/app/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n");
    for c in &mut conns {
        c.write_all(request.as_bytes()).expect("send");
    }
    // With a thousand connections open, another client is still served promptly.
    let t0 = Instant::now();
    assert_eq!(call("GET", &r.url("/v2/"), &[], None).status, 200);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        // Headers, then exactly the blob's bytes.
        let body_at = loop {
            let n = c.read(&mut buf).expect("read");
            assert!(n > 0, "connection {i} closed early");
            got.extend_from_slice(&buf[..n]);
            if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        assert_eq!(status_of(&got), 200, "connection {i}");
        while got.len() < body_at + data.len() {
            let n = c.read(&mut buf).expect("read body");
            assert!(n > 0, "connection {i} closed mid-body");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got[body_at..] == data[..], "connection {i} got other bytes");
    }
}

#[test]
fn hostile_requests_get_spec_errors_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start_with(dir.path(), &[("BALLAST_BODY_IDLE_TIMEOUT_SECS", "2")]);

    // Oversized headers: refused, the connection dropped, the server unharmed.
    let big = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2 << 20)
    );
    let out = raw(&r, big.as_bytes(), Duration::from_secs(10));
    assert!(
        out.is_empty() || [431, 400].contains(&status_of(&out)),
        "{}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    let many: String = (0..20_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw(
        &r,
        format!("GET /v2/ HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        Duration::from_secs(10),
    );
    assert!(out.is_empty() || [431, 400].contains(&status_of(&out)));

    // Path traversal and junk in names, references and digests: 4xx with a spec code, never
    // a 5xx, and nothing appears outside the data directory.
    let cases: &[(&str, &str)] = &[
        ("GET", "/v2/../../etc/passwd/manifests/latest"),
        ("GET", "/v2/a/..%2F..%2Fetc/manifests/latest"),
        ("GET", "/v2/a/manifests/..%2F..%2Fpasswd"),
        ("PUT", "/v2/a/manifests/..%2Fx"),
        ("GET", "/v2/a/blobs/sha256:..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/v2/a/blobs/sha256:zz"),
        ("GET", "/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e"),
        ("HEAD", "/v2/UPPER/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000"),
        ("POST", "/v2/a/blobs/uploads/?digest=sha256:short"),
        ("POST", "/v2/a/blobs/uploads/?mount=sha256:..%2F&from=..%2F..%2F"),
        ("PATCH", "/v2/a/blobs/uploads/..%2F..%2Fsegments"),
        ("PUT", "/v2/a/blobs/uploads/%2Fetc%2Fpasswd?digest=sha256:00"),
        ("GET", "/v2/a/referrers/sha256:not-hex"),
        ("DELETE", "/v2/a/manifests/sha256:%00%00"),
        ("GET", &format!("/v2/{}/tags/list", "a/".repeat(200))),
    ];
    for (method, path) in cases {
        let res = call(method, &r.url(path), &[], Some(b"x"));
        assert!(
            (400..500).contains(&res.status),
            "{method} {path}: {} {}",
            res.status,
            String::from_utf8_lossy(&res.body)
        );
        if res.status != 405 && !res.body.is_empty() {
            assert!(!res.code().is_empty(), "{method} {path}: no OCI error code");
        }
    }
    for outside in ["/etc/passwd.ballast", "/tmp/segments"] {
        assert!(!std::path::Path::new(outside).exists());
    }
    assert_eq!(
        call("GET", &r.url("/v2/_catalog"), &[], None).json()["repositories"],
        json!([])
    );

    // A manifest with twenty thousand layers (under the size limit; the limit itself is
    // tested in http.rs): its references are checked, it is refused with the spec's code,
    // and nothing is stored.
    let layers: Vec<_> = (0..20_000)
        .map(|i| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{i:064x}"), "size": 1}))
        .collect();
    let huge = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": layers[0], "layers": layers}).to_string();
    assert!(huge.len() < 4 << 20);
    let t0 = Instant::now();
    let res = call(
        "PUT",
        &r.url("/v2/big/manifests/v1"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        Some(huge.as_bytes()),
    );
    assert_eq!(
        (res.status, res.code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(
        call("GET", &r.url("/v2/big/manifests/v1"), &[], None).status,
        404
    );

    // A Range header with far too many ranges is served whole (as RFC 9110 allows), not
    // turned into a huge multipart answer.
    let data = seeded(10_000, 5);
    let d = sha256(&data);
    let url = r.url(&format!("/v2/ranges/app/blobs/uploads/?digest={d}"));
    assert_eq!(call("POST", &url, &[], Some(&data)).status, 201);
    let many: Vec<String> = (0..5_000).map(|i| format!("{i}-{i}")).collect();
    let res = call(
        "GET",
        &r.url(&format!("/v2/ranges/app/blobs/{d}")),
        &[("Range", &format!("bytes={}", many.join(",")))],
        None,
    );
    assert_eq!(res.status, 200);
    assert_eq!(res.body, data);

    // Uploads cut off at random points: nothing becomes visible, and the same blob uploads
    // cleanly afterwards.
    let blob = seeded(300_000, 9);
    let bd = sha256(&blob);
    let mut rng = ballast_engine::testdata::XorShift::new(0x1234_5678_9ABC_DEF1);
    for round in 0..8 {
        let cut = (rng.next() % blob.len() as u64) as usize;
        let mut s = TcpStream::connect(r.addr).expect("connect");
        if round % 2 == 0 {
            // Monolithic POST announcing the whole length, closed after `cut` bytes.
            write!(
                s,
                "POST /v2/cut/app/blobs/uploads/?digest={bd} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                blob.len()
            )
            .expect("head");
            s.write_all(&blob[..cut]).expect("part");
            drop(s);
        } else {
            // A chunked session whose PATCH is cut: the session keeps a consistent offset.
            let res = call("POST", &r.url("/v2/cut/app/blobs/uploads/"), &[], None);
            assert_eq!(res.status, 202);
            let loc = res.header("location").expect("Location").to_owned();
            cut_patch(s, &loc, blob.len(), &blob[..cut]);
            // The server notices the broken body; the session's range never runs past what
            // arrived, and finishing it with the wrong bytes is refused.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut offset = None;
            while Instant::now() < deadline {
                let st = call("GET", &r.url(&loc), &[], None);
                if st.status == 204 {
                    offset = Some(range_end(&st));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let end = offset.expect("upload status");
            assert!(
                end <= cut.max(1),
                "session claims {end} bytes, {cut} arrived"
            );
            let fin = call("PUT", &r.url(&format!("{loc}&digest={bd}")), &[], None);
            assert!((400..500).contains(&fin.status), "{}", fin.status);
        }
        let head = call(
            "HEAD",
            &r.url(&format!("/v2/cut/app/blobs/{bd}")),
            &[],
            None,
        );
        assert_eq!(
            head.status, 404,
            "round {round}: a cut upload became visible"
        );
    }
    let res = call(
        "POST",
        &r.url(&format!("/v2/cut/app/blobs/uploads/?digest={bd}")),
        &[],
        Some(&blob),
    );
    assert_eq!(res.status, 201);
    let back = call("GET", &r.url(&format!("/v2/cut/app/blobs/{bd}")), &[], None);
    assert_eq!(back.body, blob);
    // And the server is still healthy.
    assert_eq!(call("GET", &r.url("/healthz"), &[], None).status, 200);
}

/// A PATCH cut off mid-body keeps what arrived, and the client resumes from the offset the
/// session reports: the finished blob is byte-exact (the session's writer stayed in step with
/// its spool, or the finish read the spool).
#[test]
fn a_cut_patch_resumes_from_the_reported_offset() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(&tmp.path().join("data"));
    // Large enough that the cut lands past the writer's threads starting (1 MiB).
    let blob = seeded(3_000_000, 12);
    let bd = sha256(&blob);
    for (round, cut) in [1_700_000usize, 2_999_999, 12_345].into_iter().enumerate() {
        let repo = format!("resume/r{round}");
        let res = call(
            "POST",
            &r.url(&format!("/v2/{repo}/blobs/uploads/")),
            &[],
            None,
        );
        assert_eq!(res.status, 202);
        let loc = res.header("location").expect("Location").to_owned();
        cut_patch(
            TcpStream::connect(r.addr).expect("connect"),
            &loc,
            blob.len(),
            &blob[..cut],
        );
        // The server notices the broken body; then the session reports what it kept.
        let deadline = Instant::now() + Duration::from_secs(10);
        let kept = loop {
            let st = call("GET", &r.url(&loc), &[], None);
            assert_eq!(st.status, 204);
            let end = range_end(&st);
            // `Range: 0-0` is also what an empty session says.
            let kept = if end == 0 { 0 } else { end + 1 };
            if kept == cut || Instant::now() > deadline {
                break kept;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(kept <= cut, "round {round}: {kept} kept, {cut} sent");
        // The cut request may still hold the session a moment after its bytes are counted
        // (it has not seen the connection end yet): the server answers 409 BUSY, "retry
        // when it ends", and a client does.
        let rest = loop {
            let rest = call(
                "PATCH",
                &r.url(&loc),
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Range", &format!("{kept}-{}", blob.len() - 1)),
                ],
                Some(&blob[kept..]),
            );
            let busy = rest.status == 409 && String::from_utf8_lossy(&rest.body).contains("BUSY");
            if !busy || Instant::now() > deadline {
                break rest;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            rest.status,
            202,
            "round {round}: {}",
            String::from_utf8_lossy(&rest.body)
        );
        let loc = rest.header("location").expect("Location").to_owned();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let fin = call("PUT", &r.url(&format!("{loc}{sep}digest={bd}")), &[], None);
        assert_eq!(
            fin.status,
            201,
            "round {round}: {}",
            String::from_utf8_lossy(&fin.body)
        );
        let back = call("GET", &r.url(&format!("/v2/{repo}/blobs/{bd}")), &[], None);
        assert!(back.body == blob, "round {round}: the resumed blob differs");
    }
}

/// A manifest PUT that declares more bytes than the manifest limit is answered 413 at once,
/// before any body byte is sent (it waited for the body, up to the idle timeout).
#[test]
fn an_oversized_declared_manifest_is_refused_before_its_body() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(tmp.path());
    // (No body byte is ever sent: before, the server waited for the body until the read
    // limit here ran out and nothing came back.)
    let out = raw(
        &r,
        b"PUT /v2/big/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 5000000000\r\n\r\n",
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("SIZE_INVALID"), "{text}");
}

/// Upload sessions are bounded per client and in all, and their bytes per session (#14
/// item 7): past a bound the answer is 429 TOOMANYREQUESTS with Retry-After, and ending a
/// session makes room again. (Before, 5,000 sessions opened in 7 s were kept a day.)
#[test]
fn upload_sessions_are_bounded_per_client_in_all_and_in_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start_with(
        tmp.path(),
        &[
            ("BALLAST_UPLOAD_SESSIONS_PER_CLIENT_MAX", "3"),
            ("BALLAST_UPLOAD_SESSION_BYTES_MAX", "100000"),
        ],
    );
    let start = || call("POST", &r.url("/v2/caps/blobs/uploads/"), &[], None);
    let locs: Vec<String> = (0..3)
        .map(|_| {
            let res = start();
            assert_eq!(res.status, 202);
            res.header("location").expect("Location").to_owned()
        })
        .collect();
    let over = start();
    assert_eq!(over.status, 429, "{}", String::from_utf8_lossy(&over.body));
    assert!(over.header("retry-after").is_some());
    let text = String::from_utf8_lossy(&over.body);
    assert!(text.contains("TOOMANYREQUESTS"), "{text}");
    assert!(text.contains("upload_sessions_per_client_max"), "{text}");
    // Cancelling one makes room.
    assert_eq!(call("DELETE", &r.url(&locs[0]), &[], None).status, 204);
    assert_eq!(start().status, 202);
    // A session's bytes past its bound: refused, and the session keeps what it had.
    let patch = |loc: &str, body: &[u8]| {
        call(
            "PATCH",
            &r.url(loc),
            &[("Content-Type", "application/octet-stream")],
            Some(body),
        )
    };
    assert_eq!(patch(&locs[1], &seeded(60_000, 1)).status, 202);
    let past = patch(&locs[1], &seeded(60_000, 2));
    assert_eq!(past.status, 429, "{}", String::from_utf8_lossy(&past.body));
    assert!(String::from_utf8_lossy(&past.body).contains("upload_session_bytes_max"));
    assert_eq!(range_end(&call("GET", &r.url(&locs[1]), &[], None)), 59_999);
}

/// A body trickled slower than `body_min_bytes_per_sec` over its window is cut with 408,
/// although bytes keep coming within the idle timeout (before, only a 60 s stall was cut).
#[test]
fn a_trickled_body_is_cut() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start_with(
        tmp.path(),
        &[
            ("BALLAST_BODY_MIN_BYTES_PER_SEC", "1000"),
            ("BALLAST_BODY_RATE_WINDOW_SECS", "2"),
        ],
    );
    let res = call("POST", &r.url("/v2/slow/blobs/uploads/"), &[], None);
    let loc = res.header("location").expect("Location").to_owned();
    let mut s = TcpStream::connect(r.addr).expect("connect");
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
    )
    .expect("head");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let started = Instant::now();
    let mut out = Vec::new();
    // One byte every 300 ms: far below the bound, never idle for long.
    while Instant::now() < started + Duration::from_secs(20) {
        if s.write_all(b"x").is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_min_bytes_per_sec"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
