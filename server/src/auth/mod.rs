//! Authentication and authorization: who is asking (users, robots, anonymous), what they
//! may do (policy rules over repository globs), and the Docker token flow that docker,
//! podman, skopeo and containerd speak. See docs/security.md.

pub mod access;
pub mod accounts;
mod audit_bound;
mod limiter;
mod policy;
pub mod token;

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use hyper::header::{HeaderMap, AUTHORIZATION};

pub use self::access::Access;
use self::access::AccessKind;
pub use self::accounts::Accounts;
use self::audit_bound::AuditBound;
use self::limiter::{Limiter, Refusal};
pub use self::policy::{repo_glob, repo_globs, Action, Policy, Principal, Rule};
use self::token::{AccessEntry, Grants, Scope, Signer};
use crate::audit::Event;
use crate::config::Config;
use crate::error::ApiError;

/// What a request needs to be allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing (health checks, the token endpoint).
    Nothing,
    /// Any valid credentials or token (`GET /v2/`).
    Authenticated,
    /// An action on a repository.
    Repo(String, Action),
    /// The repository catalog (filtered by what the caller may pull).
    Catalog,
    /// The registry's admin endpoints.
    Admin,
}

impl Need {
    /// The scope a client should ask a token for.
    fn scope(&self) -> Option<String> {
        match self {
            Need::Nothing | Need::Authenticated => None,
            // Pushing clients read too (blob existence checks): ask for both at once.
            Need::Repo(name, Action::Push) => Some(format!("repository:{name}:pull,push")),
            Need::Repo(name, a) => Some(format!("repository:{name}:{}", a.as_str())),
            Need::Catalog => Some("registry:catalog:*".into()),
            Need::Admin => Some("registry:admin:*".into()),
        }
    }

    /// True when the request would change something (a push, a delete, an admin action).
    fn mutates(&self) -> bool {
        matches!(
            self,
            Need::Repo(_, Action::Push | Action::Delete) | Need::Admin
        )
    }

    /// The action named in audit lines of denied requests.
    fn audit_action(&self) -> &'static str {
        match self {
            Need::Repo(_, a) => a.as_str(),
            Need::Catalog => "catalog",
            Need::Admin => "admin",
            Need::Nothing | Need::Authenticated => "login",
        }
    }
}

/// An RFC 9110 quoted-string: `"` and `\` escaped, control characters dropped.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| !c.is_control()) {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A refused request: the error, the challenge to send, and the audit line to write.
pub struct Denial {
    /// The error answered.
    pub error: ApiError,
    /// `WWW-Authenticate` value, for 401s.
    pub challenge: Option<String>,
    /// `Retry-After` seconds, for 429s.
    pub retry_after: Option<u64>,
    /// The audit line (none for the ordinary first 401 of the token flow).
    pub audit: Option<Event>,
}

enum Credentials {
    None,
    Basic(String, String),
    Bearer(String),
    Malformed,
}

fn credentials(headers: &HeaderMap) -> Credentials {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Credentials::None;
    };
    let Ok(value) = value.to_str() else {
        return Credentials::Malformed;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Credentials::Bearer(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        if let Some((u, p)) = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())))
        {
            return Credentials::Basic(u, p);
        }
    }
    Credentials::Malformed
}

/// The authentication and authorization state of a server.
pub struct Auth {
    enabled: bool,
    policy: Policy,
    accounts: Accounts,
    signer: Signer,
    limiter: Limiter,
    anonymous_audit: AuditBound,
    realm: Option<String>,
    service: String,
    ttl: u64,
    scheme: &'static str,
}

/// A login attempt admitted by the limiter and not decided yet.
struct Admitted<'a> {
    limiter: &'a Limiter,
    keys: &'a [String],
    decided: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.decided {
            self.limiter.released(self.keys);
        }
    }
}

/// Longest a login waits for the attempts in flight before it (see `Limiter::reserve`).
const BUSY_WAIT_MAX: Duration = Duration::from_secs(10);

/// Longest list of scopes honoured in one token request.
const SCOPES_MAX: usize = 64;

impl Auth {
    /// Builds the state from the config: compiles the policy, reads the accounts, and loads
    /// (or on first start creates) the token signing key.
    pub fn new(config: &Config) -> anyhow::Result<Auth> {
        let a = &config.auth;
        let policy = Policy::compile(&a.policy, &a.groups).context("[auth] policy")?;
        let (accounts, key) = if a.enabled {
            (
                Accounts::new(a.htpasswd.clone(), config.robots_path())?,
                load_or_create_key(&config.token_key_path())?,
            )
        } else {
            (
                Accounts::new(None, config.robots_path())?,
                rand::random::<[u8; 32]>().to_vec(),
            )
        };
        Ok(Auth {
            enabled: a.enabled,
            policy,
            accounts,
            signer: Signer::new(&key, &a.issuer, &a.service),
            limiter: Limiter::new(
                a.login_failures_max,
                Duration::from_secs(a.login_lockout_secs),
            ),
            anonymous_audit: AuditBound::default(),
            realm: a.realm.clone(),
            service: a.service.clone(),
            ttl: a.token_ttl_secs,
            scheme: if config.tls() { "https" } else { "http" },
        })
    }

    /// True when requests are checked.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// What is wrong with the account files now (their accounts are refused meanwhile).
    pub fn problems(&self) -> Vec<String> {
        if self.enabled {
            self.accounts.problems()
        } else {
            Vec::new()
        }
    }

    /// The `WWW-Authenticate` value of a 401. Without a configured realm (loopback only, see
    /// `Config::check`), the realm is this server's `/token` at the host the client used,
    /// reduced to the characters a host and port can have. Every value is quoted with its
    /// `"` and `\` escaped, so nothing from the request can add a parameter.
    fn challenge(&self, host: Option<&str>, need: &Need, error: Option<&str>) -> String {
        let realm = match &self.realm {
            Some(r) => r.clone(),
            None => {
                let host: String = host
                    .unwrap_or("localhost")
                    .chars()
                    .filter(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
                    })
                    .collect();
                format!("{}://{host}/token", self.scheme)
            }
        };
        let mut c = format!(
            "Bearer realm={},service={}",
            quoted(&realm),
            quoted(&self.service)
        );
        if let Some(s) = need.scope() {
            c.push_str(&format!(",scope={}", quoted(&s)));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error={}", quoted(e)));
        }
        c
    }

    fn live_allows(&self, p: &Principal, need: &Need) -> bool {
        match need {
            Need::Nothing => true,
            Need::Authenticated | Need::Catalog => *p != Principal::Anonymous,
            Need::Repo(name, a) => self.policy.allows(p, name, *a),
            Need::Admin => self.policy.is_registry_admin(p),
        }
    }

    /// The access of a principal that signed in earlier (a console session) with the secret
    /// whose fingerprint is `stamp`: what the live policy grants them now, or `None` when the
    /// account is gone or its password or token changed since. With authentication off, open
    /// access.
    pub fn session_access(&self, p: &Principal, stamp: u64) -> Option<Access> {
        if !self.enabled {
            return Some(Access::open());
        }
        (self.accounts.secret_stamp(p) == Some(stamp)).then(|| Access {
            principal: p.clone(),
            kind: AccessKind::Live,
        })
    }

    /// The fingerprint of a principal's secret a session keeps from its sign-in (see
    /// [`Auth::session_access`]).
    pub fn session_stamp(&self, p: &Principal) -> u64 {
        if !self.enabled {
            return 0;
        }
        self.accounts.secret_stamp(p).unwrap_or(0)
    }

    /// Reads the account files again at the next check (the server just changed one).
    pub fn accounts_changed(&self) {
        self.accounts.changed();
    }

    /// True when `access` grants what `need` asks (the registry admin's pages and buttons).
    pub fn grants(&self, access: &Access, need: &Need) -> bool {
        match &access.kind {
            AccessKind::Open => true,
            AccessKind::Live => self.live_allows(&access.principal, need),
            AccessKind::Token(g) => match need {
                Need::Nothing | Need::Authenticated => true,
                Need::Repo(name, a) => g.repositories.get(name).is_some_and(|s| s.contains(a)),
                Need::Catalog => g.registry.contains("catalog"),
                Need::Admin => g.registry.contains("admin"),
            },
        }
    }

    /// Decides a request made on behalf of a caller whose access is known (a console
    /// session): allowed, or the denial to answer with its audit line.
    pub fn permits(&self, access: &Access, peer: IpAddr, need: &Need) -> Result<(), Box<Denial>> {
        if self.grants(access, need) {
            return Ok(());
        }
        let subject = access.actor();
        Err(Box::new(Denial {
            error: ApiError::Denied(format!(
                "{subject} may not {}{}",
                need.audit_action(),
                match need {
                    Need::Repo(n, _) => format!(" {n}"),
                    _ => String::new(),
                }
            )),
            challenge: None,
            retry_after: None,
            audit: Some(self.denied_event(&subject, peer, need, "not granted")),
        }))
    }

    fn denied_event(&self, actor: &str, peer: IpAddr, need: &Need, reason: &str) -> Event {
        let mut e = Event::new(actor, need.audit_action());
        e.client = Some(peer.to_string());
        if let Need::Repo(name, _) = need {
            e.repository = Some(name.clone());
        }
        e.outcome = "denied".into();
        e.reason = Some(reason.to_owned());
        e
    }

    /// Checks user name and secret with failed-login throttling; the answer is the
    /// principal, or the denial to send (401 or 429) with its audit line.
    pub async fn login(
        self: &Arc<Self>,
        user: &str,
        secret: &str,
        peer: IpAddr,
        challenge: Option<String>,
    ) -> Result<Principal, Denial> {
        // (The name as text a terminal shows as it is, also for `jq -r` over the log.)
        let mut failed = Event::new(format!("login:{}", ballast_tools::printable(user)), "login");
        failed.client = Some(peer.to_string());
        failed.outcome = "failed".into();
        if !accounts::user_name_ok(user) {
            failed.reason = Some("user name with control characters, ':' or empty".into());
            return Err(Denial {
                error: ApiError::Unauthorized(
                    "a user name may not be empty or contain ':' or control characters".into(),
                ),
                challenge,
                retry_after: None,
                audit: Some(failed),
            });
        }
        let keys = vec![format!("ip:{peer}"), format!("account:{user}")];
        // Attempts beyond what may still fail wait for those in flight (right passwords in
        // parallel get through one after another), for at most this long.
        let busy_until = tokio::time::Instant::now() + BUSY_WAIT_MAX;
        loop {
            let wait = match self.limiter.reserve(&keys) {
                Ok(()) => break,
                Err(Refusal::Busy) if tokio::time::Instant::now() < busy_until => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(Refusal::Busy) => Duration::from_secs(1),
                Err(Refusal::Locked(wait)) => wait,
            };
            let secs = wait.as_secs().max(1);
            failed.outcome = "denied".into();
            failed.reason = Some(format!("too many failed logins; locked for {secs} s"));
            return Err(Denial {
                error: ApiError::TooManyRequests(format!(
                    "too many failed logins from this address or for this account; retry in \
                     {secs} s"
                )),
                challenge: None,
                retry_after: Some(secs),
                audit: Some(failed),
            });
        }
        // Decided below; released if this future is dropped before (the client went away).
        let mut admitted = Admitted {
            limiter: &self.limiter,
            keys: &keys,
            decided: false,
        };
        let me = self.clone();
        let (u, s) = (user.to_owned(), secret.to_owned());
        let verified = tokio::task::spawn_blocking(move || me.accounts.verify(&u, &s))
            .await
            .unwrap_or(None);
        admitted.decided = true;
        match verified {
            Some(p) => {
                self.limiter.succeeded(&keys, &keys[1]);
                Ok(p)
            }
            None => {
                self.limiter.failed(&keys);
                failed.reason = Some("wrong user name or password".into());
                Err(Denial {
                    error: ApiError::Unauthorized("wrong user name or password (or token)".into()),
                    challenge,
                    retry_after: None,
                    audit: Some(failed),
                })
            }
        }
    }

    /// Decides a registry request: the caller's access, or the denial to answer.
    pub async fn check(
        self: &Arc<Self>,
        headers: &HeaderMap,
        host: Option<&str>,
        peer: IpAddr,
        need: &Need,
    ) -> Result<Access, Denial> {
        if !self.enabled {
            return Ok(Access::open());
        }
        if *need == Need::Nothing {
            return Ok(Access {
                principal: Principal::Anonymous,
                kind: AccessKind::Live,
            });
        }
        let unauthorized = |msg: &str, error: Option<&str>, audit: Option<Event>| Denial {
            error: ApiError::Unauthorized(msg.to_owned()),
            challenge: Some(self.challenge(host, need, error)),
            retry_after: None,
            audit,
        };
        match credentials(headers) {
            Credentials::None => {
                if self.live_allows(&Principal::Anonymous, need) {
                    return Ok(Access {
                        principal: Principal::Anonymous,
                        kind: AccessKind::Live,
                    });
                }
                // A read without credentials is the ordinary first step of the token flow:
                // not audited. A mutation attempt is, at a bounded rate per address.
                let audit = if need.mutates() {
                    self.anonymous_audit.admit(peer).map(|left_out| {
                        let mut why = "no credentials".to_owned();
                        if left_out > 0 {
                            why.push_str(&format!(
                                "; {left_out} more such attempts from this address were not \
                                 audited (at most {} lines a minute per address)",
                                audit_bound::PER_MINUTE
                            ));
                        }
                        self.denied_event("anonymous", peer, need, &why)
                    })
                } else {
                    None
                };
                Err(unauthorized("authentication required", None, audit))
            }
            Credentials::Malformed => Err(unauthorized(
                "the Authorization header is neither Basic nor Bearer credentials",
                Some("invalid_request"),
                Some(self.denied_event("anonymous", peer, need, "malformed Authorization")),
            )),
            Credentials::Basic(user, secret) => {
                let challenge = self.challenge(host, need, None);
                let p = self.login(&user, &secret, peer, Some(challenge)).await?;
                let access = Access {
                    principal: p,
                    kind: AccessKind::Live,
                };
                self.permits(&access, peer, need)
                    .map(|()| access)
                    .map_err(|d| *d)
            }
            Credentials::Bearer(t) => {
                let claims = match self.signer.verify(&t) {
                    Ok(c) => c,
                    Err(e) => {
                        let why = e.to_string();
                        return Err(unauthorized(
                            &why,
                            Some("invalid_token"),
                            Some(self.denied_event("anonymous", peer, need, &why)),
                        ));
                    }
                };
                let Some(p) = Principal::parse(&claims.sub) else {
                    return Err(unauthorized(
                        "token has no valid subject",
                        Some("invalid_token"),
                        None,
                    ));
                };
                if !self.accounts.exists(&p) {
                    let why = format!("{} no longer exists", p.subject());
                    return Err(unauthorized(
                        &why,
                        Some("invalid_token"),
                        Some(self.denied_event(&p.subject(), peer, need, &why)),
                    ));
                }
                let grants = Grants::of(&claims.access);
                let ok = match need {
                    Need::Nothing | Need::Authenticated => true,
                    Need::Repo(name, a) => {
                        grants.repositories.get(name).is_some_and(|s| s.contains(a))
                    }
                    Need::Catalog => grants.registry.contains("catalog"),
                    Need::Admin => grants.registry.contains("admin"),
                };
                if ok {
                    return Ok(Access {
                        principal: p,
                        kind: AccessKind::Token(grants),
                    });
                }
                Err(unauthorized(
                    "the token does not grant this",
                    Some("insufficient_scope"),
                    Some(self.denied_event(&p.subject(), peer, need, "token scope")),
                ))
            }
        }
    }

    /// The token endpoint (`GET /token?service=…&scope=…`, or `POST /token` with an OAuth2
    /// password grant): checks the credentials, if any, and issues a token granting the
    /// requested actions the policy allows (possibly none).
    pub async fn issue(
        self: &Arc<Self>,
        headers: &HeaderMap,
        params: &std::collections::BTreeMap<String, Vec<String>>,
        peer: IpAddr,
    ) -> Result<serde_json::Value, Denial> {
        let bad = |msg: String| Denial {
            error: ApiError::Unsupported(msg),
            challenge: None,
            retry_after: None,
            audit: None,
        };
        if !self.enabled {
            return Err(Denial {
                error: ApiError::NotFound("authentication is not enabled on this registry".into()),
                challenge: None,
                retry_after: None,
                audit: None,
            });
        }
        let one = |k: &str| params.get(k).and_then(|v| v.first()).map(String::as_str);
        if let Some(s) = one("service") {
            if s != self.service {
                return Err(bad(format!(
                    "this token endpoint issues tokens for service {:?}, not {s:?}",
                    self.service
                )));
            }
        }
        let realm_challenge = || {
            Some(format!(
                "Basic realm={}",
                quoted(self.realm.as_deref().unwrap_or("ballast"))
            ))
        };
        let principal = match one("grant_type") {
            Some("password") => {
                let (Some(u), Some(p)) = (one("username"), one("password")) else {
                    return Err(bad("password grant needs username and password".into()));
                };
                self.login(u, p, peer, realm_challenge()).await?
            }
            Some(other) => {
                return Err(bad(format!(
                    "grant_type {other:?} is not supported (use password, or GET with Basic \
                     credentials)"
                )))
            }
            None => match credentials(headers) {
                Credentials::None => Principal::Anonymous,
                Credentials::Basic(u, p) => self.login(&u, &p, peer, realm_challenge()).await?,
                Credentials::Bearer(_) | Credentials::Malformed => {
                    return Err(bad("the token endpoint takes Basic credentials".into()))
                }
            },
        };
        let scopes = Scope::parse_all(params.get("scope").into_iter().flatten());
        if scopes.len() > SCOPES_MAX {
            return Err(bad(format!("at most {SCOPES_MAX} scopes per token")));
        }
        let access = self.grant(&principal, &scopes);
        let now = crate::now_secs();
        let token = self
            .signer
            .issue(&principal.subject(), access, now, self.ttl);
        Ok(serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": self.ttl,
            "issued_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }))
    }

    /// The part of each requested scope the policy grants `p`.
    fn grant(&self, p: &Principal, scopes: &[Scope]) -> Vec<AccessEntry> {
        let mut out = Vec::new();
        for s in scopes {
            match s.kind.as_str() {
                "repository" => {
                    if ballast_engine::names::validate_repo(&s.name).is_err() {
                        continue;
                    }
                    let granted = self.policy.granted(p, &s.name);
                    let mut actions: Vec<Action> = if s.actions.iter().any(|a| a == "*") {
                        granted.iter().copied().collect()
                    } else {
                        s.actions
                            .iter()
                            .filter_map(|a| Action::parse(a))
                            .filter(|a| granted.contains(a))
                            .collect()
                    };
                    actions.sort();
                    actions.dedup();
                    out.push(AccessEntry {
                        kind: "repository".into(),
                        name: s.name.clone(),
                        actions: actions.iter().map(|a| a.as_str().to_owned()).collect(),
                    });
                }
                "registry" => {
                    let ok = match s.name.as_str() {
                        // The listing is filtered per repository, so anyone may ask.
                        "catalog" => true,
                        "admin" => self.policy.is_registry_admin(p),
                        _ => false,
                    };
                    out.push(AccessEntry {
                        kind: "registry".into(),
                        name: s.name.clone(),
                        actions: if ok && s.actions.iter().any(|a| a == "*") {
                            vec!["*".into()]
                        } else {
                            Vec::new()
                        },
                    });
                }
                _ => {}
            }
        }
        out
    }
}

/// Replaces a file atomically (temporary file, fsync, rename, fsync of the directory).
///
/// An existing file keeps its owner, group and mode: an administrator who made the htpasswd
/// file `root:ballast 0640` for the service user keeps it so after `ballast passwd` (run as
/// root). A new file gets `new_mode` and, where the caller may give it away (root), the owner
/// and group of its directory, so a file root creates in the service's own directory is the
/// service's. If an existing file's owner cannot be kept, nothing is replaced.
pub fn replace_file(path: &Path, bytes: &[u8], new_mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    create_dir_owned_as_parent(dir)?;
    // (mode, owner, whether keeping that owner is required)
    let (mode, (uid, gid), keep) = match std::fs::metadata(path) {
        Ok(m) => (m.mode() & 0o7777, (m.uid(), m.gid()), true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let d = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
            (new_mode, (d.uid(), d.gid()), false)
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    remove_stale_temps(dir, path);
    let write = || -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let m = f.metadata()?;
        if (m.uid(), m.gid()) != (uid, gid) {
            let given = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
            if keep {
                given.with_context(|| {
                    format!(
                        "cannot keep {}'s owner and group ({uid}:{gid}): run this as root or as \
                         its owner",
                        path.display()
                    )
                })?;
            }
        }
        // After the chown, which may clear set-id bits; the umask does not apply here.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Removes what earlier [`replace_file`]s of `path` left when their process died between
/// creating the temporary file and renaming it: `.NAME.tmpPID` files whose process is gone
/// (a live one may be writing it now). Best effort: a file that cannot be removed stays.
fn remove_stale_temps(dir: &Path, path: &Path) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid != std::process::id().to_string() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Creates a missing directory (and its missing parents) 0750, owned as its parent where the
/// caller may give it away: `ballast robot create` run as root makes `DIR/auth` the
/// service's, not root's.
pub fn create_dir_owned_as_parent(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_owned_as_parent(parent)?;
    }
    std::fs::DirBuilder::new()
        .mode(ballast_engine::storage::DIR_MODE)
        .create(dir)
        .or_else(|e| if dir.is_dir() { Ok(()) } else { Err(e) })
        .with_context(|| format!("creating {}", dir.display()))?;
    if let Some(p) = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .and_then(|p| std::fs::metadata(p).ok())
    {
        let _ = std::os::unix::fs::chown(dir, Some(p.uid()), Some(p.gid()));
    }
    Ok(())
}

/// A warning when the user or group that owns `path`'s directory (taken to be the server's)
/// could not read `path`: the running server would then refuse every account in it.
pub fn unreadable_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let (f, d) = (std::fs::metadata(path).ok()?, std::fs::metadata(dir).ok()?);
    let mode = f.mode();
    let readable = mode & 0o004 != 0
        || (f.uid() == d.uid() && mode & 0o400 != 0)
        || (f.gid() == d.gid() && mode & 0o040 != 0);
    (!readable).then(|| {
        format!(
            "warning: {} is {:o} {}:{}, which the owner or group of its directory ({}:{}) \
             cannot read; if the server runs as that user, it will refuse every account in \
             it (chown/chmod it so the server's user can read it)",
            path.display(),
            mode & 0o7777,
            f.uid(),
            f.gid(),
            d.uid(),
            d.gid()
        )
    })
}

/// Reads the token signing key, creating a random one on first use.
fn load_or_create_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = hex::decode(text.trim())
                .with_context(|| format!("token key {} is not hex", path.display()))?;
            if key.len() < 32 {
                bail!("token key {} is shorter than 32 bytes", path.display());
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            replace_file(path, hex::encode(key).as_bytes(), 0o600)?;
            tracing::info!(file = %path.display(), "created the token signing key");
            Ok(key.to_vec())
        }
        Err(e) => Err(e).with_context(|| format!("reading token key {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_file_removes_the_temps_of_dead_writers_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("robots.json");
        let at = |name: &str| tmp.path().join(name);
        // No process has this id (above any pid_max); pid 1 is always running.
        let dead = at(".robots.json.tmp4294967295");
        let live = at(".robots.json.tmp1");
        let other_file = at(".htpasswd.tmp4294967295");
        let not_ours = at(".robots.json.tmpx");
        for p in [&dead, &live, &other_file, &not_ours] {
            std::fs::write(p, b"left over").expect("write");
        }
        replace_file(&path, b"{}", 0o640).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}");
        assert!(!dead.exists(), "a dead writer's temp goes");
        assert!(live.exists() && other_file.exists() && not_ours.exists());
    }
}
