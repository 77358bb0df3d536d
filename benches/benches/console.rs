//! The console on a big registry (issue #20: a repository with 10,000 tags and a registry
//! with 5,000 repositories page in under 200 ms server time): a real server on loopback over
//! a store holding that catalog (every manifest stored), pages fetched over one kept-alive
//! connection. The time is the whole round trip, so an upper bound on the server's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use ballast_engine::catalog::{ManifestLink, Op};
use ballast_engine::{Algorithm, Digest, Options, Store};
use criterion::{criterion_group, criterion_main, Criterion};

const REPOS: u64 = 5_000;
const TAGS: u64 = 10_000;
const NOW: u64 = 1_800_000_000;

/// Stores a small image manifest (its layer is not stored: the pages only read manifests)
/// and returns the ops that link and tag it.
fn image(store: &Store, repo: &str, tag: &str, n: u64) -> Vec<Op> {
    let layer = format!("sha256:{:064x}", n);
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer}","size":1000}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{}}}],"annotations":{{"n":"{n}"}}}}"#,
        1_000_000 + n
    );
    let d = Digest::of(Algorithm::Sha256, m.as_bytes());
    store.put_blob(m.as_bytes(), None).expect("manifest");
    let at = NOW - (n * 7919 % 365) * 86_400;
    vec![
        Op::PutManifest {
            repo: repo.into(),
            digest: d.clone(),
            link: ManifestLink {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: m.len() as u64,
                artifact_type: None,
                annotations: Default::default(),
                subject: None,
                references: vec![layer.parse().expect("digest")],
                pushed_at: at,
                origin: None,
            },
        },
        Op::Tag {
            repo: repo.into(),
            tag: tag.into(),
            digest: d,
            at,
        },
    ]
}

fn build(dir: &std::path::Path) {
    let store = Store::open(dir, Options::default()).expect("open");
    let mut ops = Vec::new();
    for r in 0..REPOS {
        ops.extend(image(
            &store,
            &format!("team-{}/app-{r}", r % 50),
            "latest",
            r,
        ));
        if ops.len() > 2_000 {
            store.commit_ops(std::mem::take(&mut ops)).expect("commit");
        }
    }
    for t in 0..TAGS {
        ops.extend(image(
            &store,
            "big/app",
            &format!("build-{t}"),
            1_000_000 + t,
        ));
        if ops.len() > 2_000 {
            store.commit_ops(std::mem::take(&mut ops)).expect("commit");
        }
    }
    store.commit_ops(ops).expect("commit");
    store.close().expect("close");
}

/// One GET over a kept-alive connection: the status line and the body.
fn fetch(conn: &mut BufReader<TcpStream>, path: &str) -> (String, String) {
    // One write (with Nagle off below): the time is the server's, not delayed ACKs'.
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n\r\n");
    conn.get_mut().write_all(req.as_bytes()).expect("send");
    let mut status = String::new();
    conn.read_line(&mut status).expect("status");
    let mut len = 0;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).expect("header");
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A page that must be complete: 200, every figure made (a cell reads "…" until they are).
fn get(conn: &mut BufReader<TcpStream>, path: &str) -> usize {
    let (status, body) = fetch(conn, path);
    assert!(status.contains(" 200 "), "{path}: {status}");
    assert!(!body.contains(">…<"), "{path}: figures not ready");
    body.len()
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    build(&data);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let config = ballast_server::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data,
        ..Default::default()
    };
    let server = rt
        .block_on(ballast_server::Server::start(config))
        .expect("server");
    let addr = server.addr();
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut conn = BufReader::new(stream);
    // Until the byte figures are made (the first pages wait for them briefly).
    let ready = std::time::Instant::now();
    while fetch(&mut conn, "/ui/").1.contains(">…<") {
        assert!(ready.elapsed().as_secs() < 120, "figures never ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut g = c.benchmark_group("console");
    g.sample_size(30);
    for (name, path) in [
        ("repositories_first_page_of_5000", "/ui/"),
        ("repositories_by_size_page_50", "/ui/?sort=size&page=50"),
        ("repositories_search", "/ui/?q=app-49"),
        ("tags_first_page_of_10000", "/ui/repo?name=big/app"),
        (
            "tags_by_name_page_150",
            "/ui/repo?name=big/app&sort=name&page=150",
        ),
        ("tag_search_of_10000", "/ui/repo?name=big/app&q=build-99"),
    ] {
        g.bench_function(name, |b| b.iter(|| get(&mut conn, path)));
    }
    g.finish();
    drop(conn);
    rt.block_on(server.shutdown()).expect("shutdown");
}

criterion_group!(benches, bench);
criterion_main!(benches);
