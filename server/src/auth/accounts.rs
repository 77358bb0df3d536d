//! Accounts: users from an htpasswd file (bcrypt hashes only, as `htpasswd -B` writes them)
//! and robot accounts with long random tokens (`ballast robot create`). Both files are read
//! again when they change, so adding a user or revoking a robot needs no restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use base64::Engine as _;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::policy::Principal;

/// Robot tokens start with this, so a robot's secret is recognisable in a leak scanner and
/// distinguishable from a user's password.
pub const ROBOT_TOKEN_PREFIX: &str = "blt_";

/// How often a changed account file is noticed, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// bcrypt cost assumed for an unknown user when no file names one (`ballast passwd`'s
/// default).
pub const COST_DEFAULT: u32 = 10;

/// A file read again when its modification time or length changes.
struct Watched<T> {
    path: PathBuf,
    /// What it is, for messages (`htpasswd file`, `robots file`).
    what: &'static str,
    stamp: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
    value: T,
    /// Why the file cannot be used now, while it cannot.
    error: Option<String>,
}

impl<T: Default> Watched<T> {
    fn new(path: PathBuf, what: &'static str) -> Self {
        Watched {
            path,
            what,
            stamp: None,
            checked: None,
            value: T::default(),
            error: None,
        }
    }

    /// Re-reads the file when it changed (checked at most once per [`RECHECK`]); a missing
    /// file is empty. A file that cannot be read or parsed fails closed: its accounts are
    /// refused (not the ones read before: a revocation must never be lost to a permission
    /// or syntax error) until it is readable again, and the reason is logged once and kept
    /// for `/healthz`.
    fn refresh(&mut self, parse: impl Fn(&str) -> anyhow::Result<T>) -> &T {
        if self.checked.is_some_and(|t| t.elapsed() < RECHECK) {
            return &self.value;
        }
        self.checked = Some(Instant::now());
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp == self.stamp && self.error.is_none() {
            return &self.value;
        }
        let text = match stamp {
            None => Ok(String::new()),
            Some(_) => std::fs::read_to_string(&self.path),
        };
        match text.map_err(anyhow::Error::from).and_then(|t| parse(&t)) {
            Ok(v) => {
                if self.error.take().is_some() {
                    tracing::warn!(file = %self.path.display(), "{} is readable again", self.what);
                }
                self.value = v;
                self.stamp = stamp;
            }
            Err(e) => {
                let why = format!("{e:#}");
                if self.error.as_deref() != Some(why.as_str()) {
                    tracing::error!(
                        file = %self.path.display(),
                        error = %why,
                        "{} is unreadable or invalid: its accounts are refused until it is \
                         fixed",
                        self.what
                    );
                }
                self.value = T::default();
                self.stamp = None;
                self.error = Some(why);
            }
        }
        &self.value
    }
}

/// Users and their bcrypt hashes, as read from an htpasswd file.
#[derive(Default)]
pub struct Users {
    /// Hash by user name.
    pub hashes: BTreeMap<String, String>,
    /// Highest bcrypt cost among the hashes (what an unknown user's check must cost).
    pub cost_max: Option<u32>,
}

/// The cost of a bcrypt hash (`$2y$10$…` → 10).
fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.get(4..6)?.parse().ok()
}

fn parse_users(text: &str) -> anyhow::Result<Users> {
    let hashes = parse_htpasswd(text)?;
    let cost_max = hashes.values().filter_map(|h| bcrypt_cost(h)).max();
    Ok(Users { hashes, cost_max })
}

/// True when a user name can be logged in with: no control characters (they would forge
/// lines in text output such as `ballast audit`'s), no `:`, not empty, at most 256 bytes.
pub fn user_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.contains(':')
        && !name.chars().any(char::is_control)
}

/// Users and their bcrypt hashes, parsed from htpasswd text. Lines that are not
/// `name:$2y$…` bcrypt entries are refused (MD5, SHA-1 and crypt hashes are too weak).
pub fn parse_htpasswd(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut users = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = line.split_once(':') else {
            bail!("line {}: not NAME:HASH", i + 1);
        };
        if !user_name_ok(name) {
            bail!(
                "line {}: the user name has control characters or is empty",
                i + 1
            );
        }
        if !["$2y$", "$2a$", "$2b$"].iter().any(|p| hash.starts_with(p)) {
            bail!(
                "line {} (user {name:?}): only bcrypt hashes are accepted (htpasswd -B, or \
                 `ballast passwd`)",
                i + 1
            );
        }
        users.insert(name.to_owned(), hash.to_owned());
    }
    Ok(users)
}

/// One robot account as stored.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Robot {
    /// Its name (the login user name).
    pub name: String,
    /// SHA-256 of its token, hex. Tokens carry 256 random bits, so a fast hash suffices.
    pub token_sha256: String,
    /// When it was created (seconds since the epoch).
    pub created_at: u64,
    /// What it is for.
    #[serde(default)]
    pub description: String,
}

/// The robots file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RobotsFile {
    /// Every robot, by creation.
    pub robots: Vec<Robot>,
}

impl RobotsFile {
    fn parse(text: &str) -> anyhow::Result<RobotsFile> {
        if text.trim().is_empty() {
            return Ok(RobotsFile::default());
        }
        serde_json::from_str(text).context("parsing the robots file")
    }

    /// Reads the file (missing: no robots).
    pub fn load(path: &Path) -> anyhow::Result<RobotsFile> {
        match std::fs::read_to_string(path) {
            Ok(t) => RobotsFile::parse(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RobotsFile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file atomically, keeping an existing file's owner, group and mode (a new
    /// one is 0640, owned as its directory).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        super::replace_file(path, &bytes, 0o640)
    }

    /// Adds a robot and returns its token (shown once, never stored).
    pub fn create(&mut self, name: &str, description: &str, now: u64) -> anyhow::Result<String> {
        validate_robot_name(name)?;
        if self.robots.iter().any(|r| r.name == name) {
            bail!("robot {name:?} exists; revoke it first to replace its token");
        }
        let secret: [u8; 32] = rand::random();
        let token = format!(
            "{ROBOT_TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        self.robots.push(Robot {
            name: name.to_owned(),
            token_sha256: hex_sha256(token.as_bytes()),
            created_at: now,
            description: description.to_owned(),
        });
        Ok(token)
    }

    /// Removes a robot; an error when there is none of that name.
    pub fn revoke(&mut self, name: &str) -> anyhow::Result<()> {
        let before = self.robots.len();
        self.robots.retain(|r| r.name != name);
        if self.robots.len() == before {
            bail!("there is no robot {name:?}");
        }
        Ok(())
    }
}

/// Holds an exclusive lock beside `path` while an account file is edited.
pub fn edit_lock(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    if let Some(dir) = lock.parent() {
        crate::auth::create_dir_owned_as_parent(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .mode(ballast_engine::storage::FILE_MODE)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(|| format!("opening {}", lock.display()))?;
    f.lock()
        .with_context(|| format!("locking {}", lock.display()))?;
    Ok(f)
}

/// Changes the robots file under its edit lock (the command line and a running server may
/// both edit it): read, changed by `f`, written atomically.
pub fn edit_robots<T>(
    path: &Path,
    f: impl FnOnce(&mut RobotsFile) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let _lock = edit_lock(path)?;
    let mut file = RobotsFile::load(path)?;
    let out = f(&mut file)?;
    file.save(path)?;
    Ok(out)
}

/// Robot names: lowercase letters, digits, `.`, `_`, `-`, up to 64, starting alphanumeric.
pub fn validate_robot_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
        });
    if !ok {
        bail!(
            "robot name {name:?}: use lowercase letters, digits, '.', '_' and '-' (up to 64, \
             starting with a letter or digit)"
        );
    }
    Ok(())
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The accounts the server checks credentials against.
pub struct Accounts {
    users: Option<Mutex<Watched<Users>>>,
    robots: Mutex<Watched<RobotsFile>>,
    /// A hash of the cost an unknown user's check must take, and that cost.
    dummy: Mutex<(u32, String)>,
    /// User passwords verified lately (see [`Verified`]): a client sending basic
    /// credentials with every request pays bcrypt once a minute, not per request.
    verified: Verified,
    /// bcrypt verifications done (for tests and figures).
    bcrypt_runs: std::sync::atomic::AtomicU64,
}

/// Successful password checks, remembered for [`VERIFIED_FOR`] by a keyed hash of the user,
/// their stored bcrypt hash and the password (the password itself is never kept; the key is
/// random per process). A changed password changes the stored hash, so it misses; a wrong
/// password is never remembered and always pays bcrypt.
struct Verified {
    key: [u8; 32],
    seen: Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
}

/// How long a verified password is taken as verified.
const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// Most remembered verifications (a full table is emptied: they are only a short-cut).
const VERIFIED_MAX: usize = 4096;

impl Verified {
    fn new() -> Verified {
        Verified {
            key: rand::random(),
            seen: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn id(&self, name: &str, hash: &str, secret: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        for part in [name, hash, secret] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    fn knows(&self, id: &[u8; 32]) -> bool {
        self.seen
            .lock()
            .get(id)
            .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
    }

    fn remember(&self, id: [u8; 32]) {
        let mut seen = self.seen.lock();
        if seen.len() >= VERIFIED_MAX {
            seen.retain(|_, at| at.elapsed() < VERIFIED_FOR);
            if seen.len() >= VERIFIED_MAX {
                seen.clear();
            }
        }
        seen.insert(id, std::time::Instant::now());
    }
}

impl Accounts {
    /// Accounts from an optional htpasswd file and the robots file.
    pub fn new(htpasswd: Option<PathBuf>, robots: PathBuf) -> anyhow::Result<Accounts> {
        let mut cost = COST_DEFAULT;
        if let Some(p) = &htpasswd {
            // Fail at start, not at the first login, when the file is there but wrong.
            if p.exists() {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading htpasswd file {}", p.display()))?;
                let users =
                    parse_users(&text).with_context(|| format!("htpasswd file {}", p.display()))?;
                cost = users.cost_max.unwrap_or(COST_DEFAULT);
            } else {
                tracing::warn!(file = %p.display(), "htpasswd file does not exist (yet): no users");
            }
        }
        RobotsFile::load(&robots)?;
        Ok(Accounts {
            users: htpasswd.map(|p| Mutex::new(Watched::new(p, "the htpasswd file"))),
            robots: Mutex::new(Watched::new(robots, "the robots file")),
            dummy: Mutex::new((cost, dummy_hash(cost)?)),
            verified: Verified::new(),
            bcrypt_runs: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Checks a user name and secret; blocking (bcrypt is deliberately slow). A secret with
    /// the robot token prefix is checked as the token of the robot of that name when there
    /// is one; anything else (including a user's password that happens to start with the
    /// prefix) is checked as a user's password.
    pub fn verify(&self, name: &str, secret: &str) -> Option<Principal> {
        if secret.starts_with(ROBOT_TOKEN_PREFIX) {
            let want = {
                let mut robots = self.robots.lock();
                robots
                    .refresh(RobotsFile::parse)
                    .robots
                    .iter()
                    .find(|r| r.name == name)
                    .map(|r| r.token_sha256.clone())
            };
            if let Some(want) = want {
                let got = hex_sha256(secret.as_bytes());
                if bool::from(got.as_bytes().ct_eq(want.as_bytes())) {
                    return Some(Principal::Robot(name.to_owned()));
                }
            }
        }
        let (hash, cost) = match &self.users {
            None => (None, None),
            Some(u) => {
                let mut u = u.lock();
                let users = u.refresh(parse_users);
                (users.hashes.get(name).cloned(), users.cost_max)
            }
        };
        let bcrypt_runs = || {
            self.bcrypt_runs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        match hash {
            Some(h) => {
                let id = self.verified.id(name, &h, secret);
                if self.verified.knows(&id) {
                    return Some(Principal::User(name.to_owned()));
                }
                bcrypt_runs();
                let ok = bcrypt::verify(secret, &h).unwrap_or(false);
                if ok {
                    self.verified.remember(id);
                }
                ok.then(|| Principal::User(name.to_owned()))
            }
            None => {
                // An unknown user costs what a known user's wrong password costs, so timing
                // does not tell which names exist.
                let dummy = self.dummy_for(cost.unwrap_or(COST_DEFAULT));
                bcrypt_runs();
                let _ = bcrypt::verify(secret, &dummy);
                None
            }
        }
    }

    /// bcrypt verifications done so far.
    pub fn bcrypt_runs(&self) -> u64 {
        self.bcrypt_runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The dummy hash of `cost`, made again when the files' highest cost changed.
    fn dummy_for(&self, cost: u32) -> String {
        {
            let d = self.dummy.lock();
            if d.0 == cost {
                return d.1.clone();
            }
        }
        let Ok(hash) = dummy_hash(cost) else {
            return self.dummy.lock().1.clone();
        };
        *self.dummy.lock() = (cost, hash.clone());
        hash
    }

    /// Reads the files again at the next check, whenever they last were (the server changed
    /// one: its change takes effect at once, not after [`RECHECK`]).
    pub fn changed(&self) {
        self.robots.lock().checked = None;
        if let Some(u) = &self.users {
            u.lock().checked = None;
        }
    }

    /// A fingerprint of an account's current secret (a user's password hash, a robot's
    /// token hash): it changes when the password or token does; `None` when the account is
    /// gone. (For console sessions: one signed in with an old password ends.)
    pub fn secret_stamp(&self, p: &Principal) -> Option<u64> {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match p {
            Principal::Anonymous => return Some(0),
            Principal::Robot(n) => self
                .robots
                .lock()
                .refresh(RobotsFile::parse)
                .robots
                .iter()
                .find(|r| &r.name == n)?
                .token_sha256
                .hash(&mut h),
            Principal::User(n) => self
                .users
                .as_ref()?
                .lock()
                .refresh(parse_users)
                .hashes
                .get(n)?
                .hash(&mut h),
        }
        Some(h.finish())
    }

    /// True while the account behind a principal still exists (a token outlives neither a
    /// revoked robot nor a removed user).
    pub fn exists(&self, p: &Principal) -> bool {
        self.secret_stamp(p).is_some()
    }

    /// What is wrong with the account files now (each unreadable or invalid file, whose
    /// accounts are refused meanwhile); empty when nothing is. Names no paths: `/healthz`
    /// answers it to anyone.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(u) = &self.users {
            let mut u = u.lock();
            u.refresh(parse_users);
            if u.error.is_some() {
                out.push(format!(
                    "{} is unreadable or invalid: its users are refused until it is fixed \
                     (the server log says why)",
                    u.what
                ));
            }
        }
        let mut r = self.robots.lock();
        r.refresh(RobotsFile::parse);
        if r.error.is_some() {
            out.push(format!(
                "{} is unreadable or invalid: its robots are refused until it is fixed (the \
                 server log says why)",
                r.what
            ));
        }
        out
    }
}

fn dummy_hash(cost: u32) -> anyhow::Result<String> {
    bcrypt::hash("not a password", cost).context("preparing the password checker")
}

/// Sets (or with `password == None` removes) a user in an htpasswd file, keeping the other
/// lines; the hash is bcrypt `$2y$`, as `htpasswd -B` writes.
pub fn set_password(
    path: &Path,
    user: &str,
    password: Option<&str>,
    cost: u32,
) -> anyhow::Result<bool> {
    if !user_name_ok(user) || user.chars().any(char::is_whitespace) {
        bail!(
            "user name {user:?} may not be empty, longer than 256 bytes, or contain ':', spaces \
             or control characters"
        );
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut found = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.split_once(':').is_some_and(|(n, _)| n == user) {
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(pw) = password {
        let hash = bcrypt::hash_with_result(pw, cost)
            .context("hashing the password")?
            .format_for_version(bcrypt::Version::TwoY);
        out.push_str(&format!("{user}:{hash}\n"));
    }
    parse_htpasswd(&out)?;
    super::replace_file(path, out.as_bytes(), 0o640)?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Apache's `htpasswd -nbB alice s3cret` (apache2-utils 2.4.71, Debian 12).
    const HTPASSWD_B: &str = "alice:$2y$05$Bi9AWYoxlo1p3gvi6TO57uGfM.Fysy27OaZlXsVAiul1vvMLV.Kca\n";

    #[test]
    fn htpasswd_from_apache() {
        let users = parse_htpasswd(HTPASSWD_B).expect("parse");
        let hash = &users["alice"];
        assert!(bcrypt::verify("s3cret", hash).expect("verify"));
        assert!(!bcrypt::verify("s3cret ", hash).expect("verify"));
        assert!(parse_htpasswd("bob:$apr1$abc$def\n").is_err());
        assert!(parse_htpasswd("no colon\n").is_err());
        assert!(parse_htpasswd("# comment\n\n").expect("parse").is_empty());
    }

    /// Issue #13: an unknown user's check costs what a known user's wrong password costs
    /// (the dummy hash had cost 5 against real hashes of cost 10: 10 ms against 263 ms).
    #[test]
    fn timing_does_not_tell_which_users_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let htpasswd = dir.path().join("htpasswd");
        set_password(&htpasswd, "bob", Some("hunter22"), 9).expect("set");
        let accounts =
            Accounts::new(Some(htpasswd), dir.path().join("robots.json")).expect("accounts");
        let time = |user: &str| {
            let start = Instant::now();
            assert_eq!(accounts.verify(user, "wrong password"), None);
            start.elapsed()
        };
        // One call of each in turn, and the fastest of each compared: a busy machine only
        // adds time, so the minimum is the check's own cost (a median of a few calls was
        // thrown 2x off by other work on a 2-core machine).
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            known.push(time("bob"));
            unknown.push(time("nobody"));
        }
        let (k, u) = (known.iter().min().copied(), unknown.iter().min().copied());
        let (k, u) = (k.expect("timing"), u.expect("timing"));
        let ratio = u.as_secs_f64() / k.as_secs_f64();
        assert!(
            (0.5..2.0).contains(&ratio),
            "unknown user {u:?} vs known user with a wrong password {k:?}"
        );
    }

    /// A client that sends basic credentials with every request pays bcrypt once, not per
    /// request; a wrong password always pays it, and a changed password is checked afresh
    /// (the old one fails at once).
    #[test]
    fn a_verified_password_is_not_hashed_again_until_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let htpasswd = dir.path().join("htpasswd");
        set_password(&htpasswd, "bob", Some("hunter22"), 4).expect("set");
        let accounts = Accounts::new(Some(htpasswd.clone()), dir.path().join("robots.json"))
            .expect("accounts");
        let bob = Some(Principal::User("bob".into()));
        assert_eq!(accounts.verify("bob", "hunter22"), bob);
        let after_first = accounts.bcrypt_runs();
        for _ in 0..20 {
            assert_eq!(accounts.verify("bob", "hunter22"), bob);
        }
        assert_eq!(accounts.bcrypt_runs(), after_first, "verified once");
        for _ in 0..3 {
            assert_eq!(accounts.verify("bob", "hunter2"), None);
        }
        assert_eq!(
            accounts.bcrypt_runs(),
            after_first + 3,
            "wrong passwords always pay"
        );
        set_password(&htpasswd, "bob", Some("new password"), 4).expect("change");
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(
            accounts.verify("bob", "hunter22"),
            None,
            "the old password fails"
        );
        assert_eq!(accounts.verify("bob", "new password"), bob);
    }

    #[test]
    fn users_and_robots_verify_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let htpasswd = dir.path().join("htpasswd");
        let robots = dir.path().join("robots.json");
        set_password(&htpasswd, "bob", Some("hunter22"), 4).expect("set");
        let accounts = Accounts::new(Some(htpasswd.clone()), robots.clone()).expect("accounts");
        assert_eq!(
            accounts.verify("bob", "hunter22"),
            Some(Principal::User("bob".into()))
        );
        assert_eq!(accounts.verify("bob", "hunter2"), None);
        assert_eq!(accounts.verify("eve", "hunter22"), None);

        let mut file = RobotsFile::load(&robots).expect("load");
        let token = file.create("ci", "builds", 1).expect("create");
        assert!(file.create("ci", "again", 2).is_err());
        assert!(file.create("Bad Name", "", 2).is_err());
        file.save(&robots).expect("save");
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(
            accounts.verify("ci", &token),
            Some(Principal::Robot("ci".into()))
        );
        assert_eq!(accounts.verify("other", &token), None);
        assert_eq!(accounts.verify("ci", &format!("{token}x")), None);
        assert!(accounts.exists(&Principal::Robot("ci".into())));

        // Revocation and password removal take effect without a restart.
        file.revoke("ci").expect("revoked");
        file.save(&robots).expect("save");
        assert!(set_password(&htpasswd, "bob", None, 4).expect("remove"));
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(accounts.verify("ci", &token), None);
        assert!(!accounts.exists(&Principal::Robot("ci".into())));
        assert!(!accounts.exists(&Principal::User("bob".into())));
        let text = std::fs::read_to_string(&htpasswd).expect("read");
        assert!(!text.contains("bob"));
    }
}
