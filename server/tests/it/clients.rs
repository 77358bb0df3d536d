//! Real registry clients against a running server: skopeo (copy in and out, by tag and by
//! digest, inspect, list-tags, delete, zstd recompression, multi-arch indexes), buildah (build,
//! push, pull back), podman (push,
//! pull; podman 5 for a partial pull of a zstd:chunked layer, in many byte ranges per request),
//! the Docker Engine (a daemon of the test's own: push, pull by tag and by digest), containerd
//! (one platform of an index, by tag and by digest, as Kubernetes nodes pull), the oras CLI
//! (an artifact, a referrer attached and discovered through the referrers API), and the oras
//! Python client (artifacts with several files, chunked uploads).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::http::call;
use crate::{have, oci, Registry};

/// Runs a client command to the end; it must succeed. Returns what it printed.
fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().unwrap_or_else(|e| panic!("run {line}: {e}"));
    assert!(
        out.status.success(),
        "{line} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// [`run_ok`], its output as text.
fn run_text(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd)).into_owned()
}

pub fn skopeo(args: &[&str]) -> String {
    run_text(Command::new("skopeo").args(args))
}

/// Pushes the image (or index, with every platform) tagged `tag` in `layout` to `dest`, with
/// the layout's digests.
pub fn push_layout_all(layout: &Path, tag: &str, dest: &str) {
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:{tag}", layout.display()),
        dest,
    ]);
}

pub fn require(program: &str) {
    // The project's scripts install the clients (scripts/install-test-deps); a missing one is a
    // broken setup, not a reason to pass.
    assert!(
        have(program),
        "{program} is not installed: run scripts/install-test-deps"
    );
}

pub fn blob_files(layout: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("blob"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn skopeo_copy_inspect_tags_delete() {
    require("skopeo");
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("in");
    let manifest = oci::image(&layout, 7, 3, 300_000, "amd64");
    oci::finish_layout(&layout, &manifest, "v1");
    let r = Registry::start(&tmp.path().join("data"));
    let host = r.host();
    let dest = format!("docker://{host}/skopeo/img:v1");
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &format!("oci:{}:v1", layout.display()),
        &dest,
    ]);
    // The exact manifest bytes were pushed.
    let res = call(
        "GET",
        &r.url(&format!("/v2/skopeo/img/manifests/{}", manifest.digest)),
        &[],
        None,
    );
    assert_eq!(res.status, 200);
    assert_eq!(crate::sha256(&res.body), manifest.digest);

    // By digest too.
    let by_digest = format!("docker://{host}/skopeo/img@{}", manifest.digest);
    let inspect: Value =
        serde_json::from_str(&skopeo(&["inspect", "--tls-verify=false", &by_digest]))
            .expect("inspect json");
    assert_eq!(inspect["Digest"].as_str(), Some(manifest.digest.as_str()));
    assert_eq!(inspect["Layers"].as_array().map(Vec::len), Some(3));
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]);
    assert_eq!(crate::sha256(raw.as_bytes()), manifest.digest);

    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{host}/skopeo/img:v2"),
    ]);
    let tags: Value = serde_json::from_str(&skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{host}/skopeo/img"),
    ]))
    .expect("tags json");
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]));

    // Out again, by tag and by digest: the same blobs, byte for byte.
    for (i, src) in [dest.as_str(), by_digest.as_str()].into_iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        skopeo(&[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--preserve-digests",
            "--dest-oci-accept-uncompressed-layers",
            src,
            &format!("oci:{}:v1", out.display()),
        ]);
        assert_eq!(blob_files(&out), blob_files(&layout));
    }

    // zstd recompression on push: new layers, a new manifest, and they pull back intact.
    // (Fresh layers: skopeo reuses blobs the registry already holds instead of recompressing.)
    let zlayout = tmp.path().join("zin");
    let zmanifest = oci::image(&zlayout, 8, 2, 200_000, "amd64");
    oci::finish_layout(&zlayout, &zmanifest, "v1");
    let zdest = format!("docker://{host}/skopeo/zstd:v1");
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--dest-compress-format",
        "zstd",
        &format!("oci:{}:v1", zlayout.display()),
        &zdest,
    ]);
    let inspect: Value =
        serde_json::from_str(&skopeo(&["inspect", "--raw", "--tls-verify=false", &zdest]))
            .expect("json");
    let layers = inspect["layers"].as_array().expect("layers");
    assert!(
        layers.iter().all(|l| l["mediaType"]
            .as_str()
            .is_some_and(|m| m.ends_with("+zstd"))),
        "{inspect}"
    );
    let zout = tmp.path().join("zout");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &zdest,
        &format!("dir:{}", zout.display()),
    ]);

    // Delete by digest: the tags go with it.
    skopeo(&["delete", "--tls-verify=false", &by_digest]);
    let res = call("GET", &r.url("/v2/skopeo/img/manifests/v1"), &[], None);
    assert_eq!(res.status, 404);
}

#[test]
fn skopeo_multi_arch_index_round_trip() {
    require("skopeo");
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("in");
    let index = oci::multi_arch(&layout, 40);
    oci::finish_layout(&layout, &index, "multi");
    let r = Registry::start(&tmp.path().join("data"));
    let dest = format!("docker://{}/multi/app:latest", r.host());
    push_layout_all(&layout, "multi", &dest);
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]);
    assert_eq!(crate::sha256(raw.as_bytes()), index.digest);
    let out = tmp.path().join("out");
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
        &dest,
        &format!("oci:{}:multi", out.display()),
    ]);
    assert_eq!(blob_files(&out), blob_files(&layout));
    // Each architecture resolves on its own.
    let arm: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--override-arch",
        "arm64",
        &dest,
    ]))
    .expect("json");
    assert_eq!(arm["Architecture"].as_str(), Some("arm64"));
}

#[test]
fn podman_push_and_pull() {
    require("podman");
    let tmp = tempfile::tempdir().expect("tempdir");
    // podman names an image pulled from a layout after its path, which must be lowercase.
    let lower = tempfile::Builder::new()
        .prefix(&format!("ballast-podman-{}", std::process::id()))
        .rand_bytes(0)
        .tempdir()
        .expect("lowercase temp dir");
    let layout = lower.path().join("in");
    let manifest = oci::image(&layout, 60, 2, 200_000, "amd64");
    oci::finish_layout(&layout, &manifest, "v1");
    let r = Registry::start(&tmp.path().join("data"));
    let (root, run) = (tmp.path().join("root"), tmp.path().join("run"));
    let podman = |args: &[&str]| -> String {
        run_text(
            Command::new("podman")
                .arg("--root")
                .arg(&root)
                .arg("--runroot")
                .arg(&run)
                .args(["--storage-driver", "vfs"])
                .args(args),
        )
    };
    let image = format!("{}/pod/app:v1", r.host());
    let id = podman(&["pull", "-q", &format!("oci:{}:v1", layout.display())])
        .trim()
        .to_owned();
    podman(&["tag", &id, &image]);
    podman(&["push", "-q", "--tls-verify=false", &image]);
    podman(&["rmi", "-a", "-f"]);
    let pulled = podman(&["pull", "-q", "--tls-verify=false", &image])
        .trim()
        .to_owned();
    assert_eq!(pulled, id, "the same image (config digest) comes back");
    let tags: Value =
        serde_json::from_slice(&call("GET", &r.url("/v2/pod/app/tags/list"), &[], None).body)
            .expect("json");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
}

/// A client from Debian trixie, provisioned by scripts/install-trixie-clients (podman 5:
/// bookworm's 4.3 cannot pull zstd:chunked layers partially; oras: bookworm has none).
fn trixie_client(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("BALLAST_TEST_TRIXIE_CLIENTS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/trixie"),
        Into::into,
    );
    let bin = dir.join("root/usr/bin").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run scripts/install-test-deps",
        bin.display()
    );
    bin
}

/// A root file system of `files` files of seeded bytes, as a tar file.
fn rootfs_tar(dir: &Path, name: &str, files: &[(String, Vec<u8>)]) -> std::path::PathBuf {
    let root = dir.join(name);
    for (path, bytes) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write");
    }
    let tar = dir.join(format!("{name}.tar"));
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    tar
}

#[test]
fn podman_partial_pull_of_a_zstd_chunked_layer_fetches_only_changed_files() {
    // A zstd:chunked layer carries a table of its files; podman with partial pulls enabled
    // (overlay storage) fetches the table, then only the files it does not have, as many
    // byte ranges in one request (answered 206 multipart/byteranges).
    let podman = trixie_client("podman");
    let tmp = tempfile::tempdir().expect("tempdir");
    let storage_conf = tmp.path().join("storage.conf");
    std::fs::write(
        &storage_conf,
        format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n\
             [storage.options]\npull_options = {{enable_partial_images = \"true\", \
             use_hard_links = \"false\", ostree_repos = \"\"}}\n",
            tmp.path().join("root").display(),
            tmp.path().join("run").display()
        ),
    )
    .expect("storage.conf");
    let run = |args: &[&str]| -> String {
        run_text(
            Command::new(&podman)
                .env("CONTAINERS_STORAGE_CONF", &storage_conf)
                .env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1")
                .args(args),
        )
        .trim()
        .to_owned()
    };
    // v2 changes 3 of 40 files, spread through the layer.
    let v1: Vec<(String, Vec<u8>)> = (0..40u64)
        .map(|i| {
            let len = 20_000 + 1_000 * i as usize;
            (format!("data/f{i:02}"), crate::seeded(len, 100 + i))
        })
        .collect();
    let mut v2 = v1.clone();
    for i in [5usize, 17, 33] {
        v2[i].1 = crate::seeded(30_000, 900 + i as u64);
    }
    let log = tmp.path().join("server.log");
    let log_s = log.to_string_lossy().into_owned();
    let mut r = Registry::start_with(
        &tmp.path().join("data"),
        &[
            ("BALLAST_LOG", "info"),
            (crate::STDERR_FILE, log_s.as_str()),
        ],
    );
    for (tag, files) in [("v1", &v1), ("v2", &v2)] {
        let tar = rootfs_tar(tmp.path(), tag, files);
        let local = format!("localhost/partial:{tag}");
        run(&["import", "-q", &tar.to_string_lossy(), &local]);
        let remote = format!("{}/partial/app:{tag}", r.host());
        run(&[
            "push",
            "-q",
            "--tls-verify=false",
            "--compression-format",
            "zstd:chunked",
            &local,
            &remote,
        ]);
    }
    run(&["rmi", "-a", "-f"]);
    let image = |tag: &str| format!("{}/partial/app:{tag}", r.host());
    run(&["pull", "-q", "--tls-verify=false", &image("v1")]);
    run(&["pull", "-q", "--tls-verify=false", &image("v2")]);

    // What was pulled is v2, file for file.
    let mounted = run(&["image", "mount", &image("v2")]);
    for (path, bytes) in &v2 {
        let got = std::fs::read(Path::new(&mounted).join(path)).expect("pulled file");
        assert!(&got == bytes, "{path} differs after the partial pull");
    }
    run(&["image", "unmount", &image("v2")]);
    run(&["rmi", "-a", "-f"]);

    // The v2 layer came in byte ranges, far fewer bytes than the layer: only the changed
    // files. They lie far apart in the layer, so one contiguous range covering them would
    // be most of it: this took several ranges in a request.
    let manifest: Value = serde_json::from_slice(
        &call(
            "GET",
            &r.url("/v2/partial/app/manifests/v2"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            None,
        )
        .body,
    )
    .expect("manifest");
    let layer = &manifest["layers"][0];
    assert!(
        layer["annotations"]["io.github.containers.zstd-chunked.manifest-position"].is_string(),
        "podman pushed zstd:chunked: {layer}"
    );
    let (digest, size) = (
        layer["digest"].as_str().expect("digest"),
        layer["size"].as_u64().expect("size"),
    );
    let v1: Value = serde_json::from_slice(
        &call(
            "GET",
            &r.url("/v2/partial/app/manifests/v1"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            None,
        )
        .body,
    )
    .expect("manifest");
    let v1_size = v1["layers"][0]["size"].as_u64().expect("size");
    r.stop();
    // Cut at zstd frame ends, v2's unchanged files are v1's chunks: both layers together
    // take little more than one in the store (Distribution keeps both whole).
    let (code, out, err) =
        crate::auth::ballast(&["inspect", "--json", &r.data.to_string_lossy()], "");
    assert_eq!(code, 0, "{err}");
    let inspect: Value = serde_json::from_str(&out).expect("inspect json");
    let stored = inspect["chunk_stored_bytes"].as_u64().expect("chunk bytes");
    let ratio = stored as f64 / (v1_size + size) as f64;
    eprintln!("zstd:chunked v1 + v2 layers {v1_size} + {size} bytes, stored as {stored} bytes of chunks ({ratio:.2})");
    assert!(
        ratio < 0.65,
        "the two zstd:chunked layers ({v1_size} + {size} bytes) take {stored} bytes of chunks ({ratio:.2})"
    );
    let text = std::fs::read_to_string(&log).expect("server log");
    let gets: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("method=GET") && l.contains(&format!("/blobs/{digest}")))
        .collect();
    assert!(
        !gets.is_empty() && gets.iter().all(|l| l.contains("status=206")),
        "the v2 layer was fetched in ranges only:\n{}",
        gets.join("\n")
    );
    let fetched: u64 = gets
        .iter()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("bytes=")))
        .map(|b| b.parse::<u64>().expect("bytes"))
        .sum();
    assert!(
        fetched < size / 4,
        "{fetched} of the layer's {size} bytes fetched:\n{}",
        gets.join("\n")
    );
}

/// A daemon of the test's own (dockerd, containerd) and its command-line client: started with
/// its log in a file, ready once a client command succeeds, stopped (SIGTERM, then waited for)
/// when dropped.
struct Daemon {
    child: std::process::Child,
    client: &'static str,
    client_args: Vec<String>,
}

impl Daemon {
    fn start(
        mut cmd: Command,
        log: &Path,
        client: &'static str,
        client_args: Vec<String>,
        ready: &[&str],
    ) -> Daemon {
        let program = cmd.get_program().to_string_lossy().into_owned();
        require(&program);
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).expect("daemon log"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let d = Daemon {
            child,
            client,
            client_args,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !d.try_run(ready) {
            assert!(
                std::time::Instant::now() < deadline,
                "{program} did not come up:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        d
    }

    /// The client, pointed at this daemon, with `args`.
    fn client(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.client);
        cmd.args(&self.client_args).args(args);
        cmd
    }

    /// True when the client command succeeds (for the readiness check).
    fn try_run(&self, args: &[&str]) -> bool {
        self.client(args)
            .output()
            .is_ok_and(|out| out.status.success())
    }

    fn run(&self, args: &[&str]) -> Vec<u8> {
        run_ok(&mut self.client(args))
    }

    /// [`Daemon::run`], its output as text.
    fn text(&self, args: &[&str]) -> String {
        run_text(&mut self.client(args))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A Docker daemon of the test's own: private data and exec roots, a unix socket in `dir`, no
/// networking set up.
fn dockerd(dir: &Path) -> Daemon {
    let sock = format!("unix://{}", dir.join("docker.sock").display());
    let mut cmd = Command::new("dockerd");
    cmd.arg("--data-root")
        .arg(dir.join("root"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .args(["-H", &sock])
        .args(["--iptables=false", "--ip6tables=false", "--bridge=none"]);
    Daemon::start(
        cmd,
        &dir.join("dockerd.log"),
        "docker",
        vec!["-H".into(), sock],
        &["version"],
    )
}

/// A containerd of the test's own (what Kubernetes nodes pull with, through its CRI plugin):
/// private root, state and socket in `dir`.
fn containerd(dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir).expect("containerd dir");
    let sock = dir.join("containerd.sock").display().to_string();
    let config = dir.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\naddress = \"{sock}\"\n\
             [ttrpc]\naddress = \"{sock}.ttrpc\"\n[debug]\naddress = \"\"\n\
             [metrics]\naddress = \"\"\n",
            dir.join("root").display(),
            dir.join("state").display()
        ),
    )
    .expect("containerd config");
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(&config);
    let client_args = ["--address", &sock, "--namespace", "ballast-test"];
    Daemon::start(
        cmd,
        &dir.join("containerd.log"),
        "ctr",
        client_args.iter().map(|a| a.to_string()).collect(),
        &["version"],
    )
}

#[test]
fn docker_push_and_pull_by_tag_and_by_digest() {
    // The Docker Engine pushes Docker schema 2 manifests and gzip layers with its own upload
    // sequence (POST, streamed PATCH, PUT).
    let tmp = tempfile::tempdir().expect("tempdir");
    let docker = dockerd(tmp.path());
    let r = Registry::start(&tmp.path().join("data"));
    let files: Vec<(String, Vec<u8>)> = (0..12u64)
        .map(|i| {
            (
                format!("srv/f{i:02}"),
                crate::seeded(10_000 + 5_000 * i as usize, 300 + i),
            )
        })
        .collect();
    let tar = rootfs_tar(tmp.path(), "rootfs", &files);
    let image = format!("{}/dock/app:v1", r.host());
    docker.run(&["import", &tar.to_string_lossy(), "localhost/dock:1"]);
    docker.run(&["tag", "localhost/dock:1", &image]);
    let pushed = docker.text(&["push", &image]);
    let digest = pushed
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in the push output:\n{pushed}"))
        .to_owned();
    // The registry holds what docker pushed: a Docker schema 2 manifest under that digest.
    let res = call(
        "GET",
        &r.url("/v2/dock/app/manifests/v1"),
        &[(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
        None,
    );
    assert_eq!(res.status, 200);
    assert_eq!(res.header("docker-content-digest"), Some(digest.as_str()));
    let manifest: Value = serde_json::from_slice(&res.body).expect("manifest");
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    docker.run(&["rmi", &image, "localhost/dock:1"]);
    docker.run(&["pull", &image]);
    docker.run(&["create", "--name", "by-tag", &image, "/none"]);
    let exported = tmp.path().join("exported.tar");
    docker.run(&["export", "-o", &exported.to_string_lossy(), "by-tag"]);
    let out = tmp.path().join("exported");
    std::fs::create_dir_all(&out).expect("mkdir");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&out)
            .arg("-xf")
            .arg(&exported),
    );
    for (path, bytes) in &files {
        let got = std::fs::read(out.join(path)).expect("pulled file");
        assert!(&got == bytes, "{path} differs after the pull");
    }
    docker.run(&["rm", "by-tag"]);
    docker.run(&["rmi", &image]);
    let by_digest = format!("{}/dock/app@{digest}", r.host());
    docker.run(&["pull", &by_digest]);
    let id = docker.text(&["image", "inspect", "--format", "{{.Id}}", &by_digest]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
}

#[test]
fn containerd_pulls_one_platform_of_an_index_and_by_digest() {
    // containerd resolves and fetches with its own client (the one Kubernetes nodes use):
    // the index by tag, the manifest of the asked platform, its config and layers, which it
    // unpacks and checks against the config's diff ids.
    require("skopeo");
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("in");
    let index = oci::multi_arch(&layout, 60);
    oci::finish_layout(&layout, &index, "multi");
    let r = Registry::start(&tmp.path().join("data"));
    let dest = format!("docker://{}/k8s/app:v1", r.host());
    push_layout_all(&layout, "multi", &dest);
    let blob = |digest: &str| -> Vec<u8> {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("layout blob")
    };
    let index_json: Value = serde_json::from_slice(&blob(&index.digest)).expect("index");
    let arm = index_json["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["platform"]["architecture"] == "arm64")
        .expect("arm64 manifest");
    let arm_digest = arm["digest"].as_str().expect("digest").to_owned();
    let arm_manifest: Value = serde_json::from_slice(&blob(&arm_digest)).expect("manifest");

    let c = containerd(&tmp.path().join("containerd"));
    let by_tag = format!("{}/k8s/app:v1", r.host());
    c.run(&[
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/arm64",
        &by_tag,
    ]);
    let listed = c.text(&["images", "ls"]);
    assert!(
        listed.contains(&by_tag) && listed.contains(&index.digest),
        "the tag resolves to the index:\n{listed}"
    );
    // What containerd stored is byte for byte what was pushed.
    let mut wanted = vec![
        arm_digest.clone(),
        arm_manifest["config"]["digest"]
            .as_str()
            .expect("config")
            .to_owned(),
    ];
    for l in arm_manifest["layers"].as_array().expect("layers") {
        wanted.push(l["digest"].as_str().expect("layer").to_owned());
    }
    for d in &wanted {
        assert!(
            c.run(&["content", "get", d]) == blob(d),
            "{d} differs in containerd's store"
        );
    }

    let by_digest = format!("{}/k8s/app@{arm_digest}", r.host());
    c.run(&["images", "rm", &by_tag]);
    c.run(&["content", "rm", &wanted[0]]);
    c.run(&[
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/arm64",
        &by_digest,
    ]);
    assert!(c.run(&["content", "get", &arm_digest]) == blob(&arm_digest));
}

#[test]
fn oras_cli_pushes_attaches_a_referrer_discovers_it_and_pulls() {
    // The oras CLI (Go, oras-go): an artifact of two files, then a signature attached to it
    // through the referrers API, listed back with its annotation.
    let oras = trixie_client("oras");
    let tmp = tempfile::tempdir().expect("tempdir");
    let files = tmp.path().join("files");
    std::fs::create_dir_all(&files).expect("mkdir");
    let contents = [
        ("notes.txt", b"release notes\n".to_vec()),
        ("payload.bin", crate::seeded(300_000, 71)),
        ("sig.txt", b"signed by ci\n".to_vec()),
    ];
    for (name, bytes) in &contents {
        std::fs::write(files.join(name), bytes).expect("write");
    }
    let r = Registry::start(&tmp.path().join("data"));
    let run = |args: &[&str]| -> String {
        run_text(
            Command::new(&oras)
                .current_dir(&files)
                .env("HOME", tmp.path())
                .args(args),
        )
    };
    let artifact = format!("{}/art/app:v1", r.host());
    run(&[
        "push",
        "--plain-http",
        "--artifact-type",
        "application/vnd.ballast.test",
        &artifact,
        "notes.txt:text/plain",
        "payload.bin",
    ]);
    run(&[
        "attach",
        "--plain-http",
        "--artifact-type",
        "application/vnd.ballast.signature",
        "--annotation",
        "org.example.signed-by=ci",
        &artifact,
        "sig.txt",
    ]);
    let found: Value = serde_json::from_str(&run(&[
        "discover",
        "--plain-http",
        "--format",
        "json",
        &artifact,
    ]))
    .expect("discover json");
    let referrers = found["manifests"].as_array().expect("manifests");
    assert_eq!(referrers.len(), 1, "{found}");
    assert_eq!(
        referrers[0]["artifactType"],
        "application/vnd.ballast.signature"
    );
    assert_eq!(referrers[0]["annotations"]["org.example.signed-by"], "ci");
    // oras used the referrers API: without it, it would have tagged the referrer
    // `sha256-<subject>` (the fallback scheme).
    let tags: Value =
        serde_json::from_slice(&call("GET", &r.url("/v2/art/app/tags/list"), &[], None).body)
            .expect("tags");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));

    let out = tmp.path().join("pulled");
    run(&[
        "pull",
        "--plain-http",
        "-o",
        &out.to_string_lossy(),
        &artifact,
    ]);
    for (name, bytes) in &contents[..2] {
        let got = std::fs::read(out.join(name)).expect("pulled file");
        assert!(&got == bytes, "{name} differs after the pull");
    }
}

#[test]
fn buildah_builds_pushes_and_pulls_back() {
    // buildah as CI pipelines use it: an image built from scratch, committed, pushed; then
    // pulled back into empty storage and its file read from a mounted container.
    require("buildah");
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(&tmp.path().join("data"));
    let (root, runroot) = (tmp.path().join("root"), tmp.path().join("run"));
    let buildah = |args: &[&str]| -> String {
        run_text(
            Command::new("buildah")
                .arg("--root")
                .arg(&root)
                .arg("--runroot")
                .arg(&runroot)
                .args(["--storage-driver", "vfs"])
                .args(args),
        )
        .trim()
        .to_owned()
    };
    let payload = crate::seeded(250_000, 81);
    let file = tmp.path().join("payload.bin");
    std::fs::write(&file, &payload).expect("write");
    let ctr = buildah(&["from", "scratch"]);
    buildah(&["copy", &ctr, &file.to_string_lossy(), "/srv/payload.bin"]);
    buildah(&["config", "--cmd", "/srv/run", &ctr]);
    buildah(&["commit", "-q", &ctr, "localhost/built:1"]);
    let image = format!("{}/build/app:v1", r.host());
    buildah(&[
        "push",
        "-q",
        "--tls-verify=false",
        "localhost/built:1",
        &format!("docker://{image}"),
    ]);
    buildah(&["rm", "-a"]);
    buildah(&["rmi", "-a", "-f"]);
    buildah(&["pull", "-q", "--tls-verify=false", &image]);
    let ctr = buildah(&["from", "-q", &image]);
    let mounted = buildah(&["mount", &ctr]);
    let got = std::fs::read(Path::new(&mounted).join("srv/payload.bin")).expect("pulled file");
    assert!(got == payload, "the pulled image's file differs");
    buildah(&["umount", &ctr]);
    buildah(&["rm", "-a"]);
}

#[test]
fn oras_artifact_round_trip() {
    let have_oras = Command::new("python3")
        .args(["-c", "import oras.client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_oras,
        "the oras Python package is not installed: run scripts/install-test-deps"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(&tmp.path().join("data"));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/oras_roundtrip.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(r.host())
        .arg(tmp.path().join("work"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "oras round trip failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tags: Value = serde_json::from_slice(
        &call("GET", &r.url("/v2/artifacts/bundle/tags/list"), &[], None).body,
    )
    .expect("json");
    assert_eq!(tags["tags"], serde_json::json!(["v1", "v1-chunked"]));
}
