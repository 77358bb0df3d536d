//! A real S3 store for the bucket tests: a 3-node Garage cluster (replication factor 3) on
//! loopback ports, built once per machine by `scripts/install-garage` (which
//! `scripts/install-test-deps` runs). Each node is a `garage server` process with its own
//! SQLite metadata and data directories; the cluster gets a layout, a bucket and a key
//! through Garage's own CLI. Every process is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::peers::free_port;

/// The key the tests sign with (Garage accepts imported keys of this shape).
pub const KEY_ID: &str = "GK5ba11a57b0cce7000000000a";
/// Its secret.
pub const SECRET: &str = "5ba11a575ecbe7000000000000000000000000000000000000000000000000aa";
/// The bucket.
pub const BUCKET: &str = "ballast";

struct Node {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    rpc: u16,
    s3: u16,
}

/// A running 3-node cluster.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// `<node id>@<rpc address>` of each node.
    ids: Vec<String>,
    _dir: tempfile::TempDir,
}

/// The garage binary (`scripts/install-garage` prints its path, building it only once per
/// machine).
fn garage_bin() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-garage");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/install-garage");
    assert!(
        out.status.success(),
        "scripts/install-garage failed (run scripts/install-test-deps)"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl Garage {
    /// Starts three nodes, joins them in one zone with equal capacity, and creates the
    /// bucket and the key (read, write, owner).
    pub fn start() -> Garage {
        let bin = garage_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = hex::encode(crate::seeded(32, crate::now()));
        let mut nodes = Vec::new();
        for i in 0..3 {
            let root = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&root).expect("node dir");
            let (rpc, s3) = (free_port(), free_port());
            let config = root.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{m}\"\ndata_dir = \"{d}\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = 3\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                     root_domain = \".s3.garage.localhost\"\n",
                    m = root.join("meta").display(),
                    d = root.join("data").display(),
                ),
            )
            .expect("garage.toml");
            // Garage refuses a config with a secret others may read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            nodes.push(Node {
                child: None,
                log: root.join("log"),
                config,
                rpc,
                s3,
            });
        }
        let mut g = Garage {
            bin,
            nodes,
            ids: Vec::new(),
            _dir: dir,
        };
        for i in 0..3 {
            g.start_node(i);
        }
        let ids: Vec<String> = (0..3)
            .map(|i| g.cli_on(i, &["node", "id", "-q"]).trim().to_owned())
            .collect();
        for id in &ids[1..] {
            g.cli(&["node", "connect", id]);
        }
        g.ids = ids.clone();
        for id in &ids {
            let short = id.split('@').next().expect("node id");
            g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", BUCKET]);
        g.cli(&["key", "import", "--yes", "-n", "ballast", KEY_ID, SECRET]);
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "ballast",
        ]);
        g
    }

    /// Starts node `i` (again, on its ports and data) and waits for its S3 port.
    pub fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&n.config)
            .arg("server")
            // (The API's info lines are its request log: one line per request.)
            .env("RUST_LOG", "warn,garage_api_common=info,garage_api=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start garage");
        n.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", n.s3)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", n.rpc)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "garage node {i} did not start: {}",
                std::fs::read_to_string(&n.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Answering on its ports is not enough: they could be someone else's if this node
        // failed to bind them.
        let exited = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        assert!(
            exited.is_none(),
            "garage node {i} exited ({exited:?}): {}",
            std::fs::read_to_string(&n.log).unwrap_or_default()
        );
        // A node started again finds its peers from the list it keeps, but only once that
        // list was saved; connect it to the running ones as an operator would.
        for j in 0..self.ids.len() {
            if j != i && self.nodes[j].child.is_some() {
                self.cli_on(i, &["node", "connect", &self.ids[j]]);
            }
        }
    }

    /// Kills node `i` (SIGKILL; its data stays).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3)
    }

    /// S3 requests node 0 has answered so far, by method (`GET`, `PUT`, ...), from its
    /// request log (this Garage is built without its metrics feature).
    pub fn s3_requests(&self) -> std::collections::BTreeMap<String, u64> {
        let text = std::fs::read_to_string(&self.nodes[0].log).unwrap_or_default();
        let mut out = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| l.contains("generic_server")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some(i) = words
                .iter()
                .position(|w| matches!(*w, "GET" | "PUT" | "POST" | "HEAD" | "DELETE"))
            else {
                continue;
            };
            // A GET of the bucket with a query is a LIST.
            let kind = match words.get(i + 1) {
                Some(path) if words[i] == "GET" && path.contains("list-type") => "LIST",
                _ => words[i],
            };
            *out.entry(kind.to_owned()).or_insert(0) += 1;
        }
        out
    }

    /// A `[bucket]` table for a registry shipping to this cluster through node 0.
    pub fn bucket_table(&self, prefix: &str, extra: &str) -> String {
        format!(
            "[bucket]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nprefix = \"{prefix}\"\n\
             region = \"garage\"\naccess_key_id = \"{KEY_ID}\"\nsecret_access_key = \"{SECRET}\"\n{extra}\n",
            self.endpoint(0)
        )
    }

    /// A client of the bucket (under `prefix`), to look at what the registry put there.
    pub fn client(&self, prefix: &str) -> ballast_bucket::Bucket {
        ballast_bucket::Bucket::connect(&ballast_bucket::BucketConfig {
            endpoint: self.endpoint(0),
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            region: "garage".into(),
            access_key_id: KEY_ID.into(),
            secret_access_key: SECRET.into(),
            request_timeout_secs: 10,
            ..ballast_bucket::BucketConfig::default()
        })
        .expect("bucket client")
    }

    fn cli(&self, args: &[&str]) -> String {
        self.cli_on(0, args)
    }

    /// Runs `garage -c <node i's config> ARGS`, retrying while the cluster settles (a node
    /// not connected yet, a layout not propagated).
    fn cli_on(&self, i: usize, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[i].config)
                .args(args)
                .output()
                .expect("garage cli");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "garage {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
