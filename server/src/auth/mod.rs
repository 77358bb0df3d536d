//! Authentication and authorization: who is asking (users, robots, anonymous), what they
//! may do (policy rules over repository globs), and the Docker token flow that docker,
//! podman, skopeo and containerd speak. See docs/security.md.

pub mod accounts;
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

pub use self::accounts::Accounts;
use self::limiter::Limiter;
pub use self::policy::{Action, Policy, Principal, Rule};
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

/// What a request's caller may do.
pub struct Access {
    /// Who is asking.
    pub principal: Principal,
    kind: AccessKind,
}

enum AccessKind {
    /// Authentication is off: everything is allowed.
    Open,
    /// Credentials (or none) checked against the live policy.
    Live,
    /// A bearer token: exactly what it grants.
    Token(Grants),
}

impl Access {
    /// Access with authentication off.
    pub fn open() -> Access {
        Access {
            principal: Principal::Anonymous,
            kind: AccessKind::Open,
        }
    }

    /// True when the caller may do `action` on `repo` (cross-repository mounts check the
    /// source with this).
    pub fn may(&self, auth: &Auth, repo: &str, action: Action) -> bool {
        match &self.kind {
            AccessKind::Open => true,
            AccessKind::Live => auth.policy.allows(&self.principal, repo, action),
            AccessKind::Token(g) => g
                .repositories
                .get(repo)
                .is_some_and(|s| s.contains(&action)),
        }
    }

    /// True when the catalog should list `repo` to the caller: the policy lets the caller's
    /// principal pull it (a catalog token names no repositories, so the policy decides).
    pub fn may_see(&self, auth: &Auth, repo: &str) -> bool {
        match &self.kind {
            AccessKind::Open => true,
            _ => auth.policy.allows(&self.principal, repo, Action::Pull),
        }
    }

    /// The actor written in audit lines.
    pub fn actor(&self) -> String {
        match self.kind {
            AccessKind::Open => "anonymous".to_owned(),
            _ => self.principal.subject(),
        }
    }
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
    realm: Option<String>,
    service: String,
    ttl: u64,
    scheme: &'static str,
}

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

    fn challenge(&self, host: Option<&str>, need: &Need, error: Option<&str>) -> String {
        let realm = match &self.realm {
            Some(r) => r.clone(),
            None => {
                let host: String = host
                    .unwrap_or("localhost")
                    .chars()
                    .filter(|c| !matches!(c, '"' | '\\') && !c.is_control())
                    .collect();
                format!("{}://{host}/token", self.scheme)
            }
        };
        let mut c = format!("Bearer realm=\"{realm}\",service=\"{}\"", self.service);
        if let Some(s) = need.scope() {
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error=\"{e}\""));
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
        let keys = vec![format!("ip:{peer}"), format!("account:{user}")];
        let mut failed = Event::new(format!("login:{user}"), "login");
        failed.client = Some(peer.to_string());
        failed.outcome = "failed".into();
        if let Err(wait) = self.limiter.check(&keys) {
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
        let me = self.clone();
        let (u, s) = (user.to_owned(), secret.to_owned());
        let verified = tokio::task::spawn_blocking(move || me.accounts.verify(&u, &s))
            .await
            .unwrap_or(None);
        match verified {
            Some(p) => {
                self.limiter.clear(&keys[1]);
                Ok(p)
            }
            None => {
                self.limiter.fail(&keys);
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
                // The ordinary first step of the token flow: not audited.
                Err(unauthorized("authentication required", None, None))
            }
            Credentials::Malformed => Err(unauthorized(
                "the Authorization header is neither Basic nor Bearer credentials",
                Some("invalid_request"),
                Some(self.denied_event("anonymous", peer, need, "malformed Authorization")),
            )),
            Credentials::Basic(user, secret) => {
                let challenge = self.challenge(host, need, None);
                let p = self.login(&user, &secret, peer, Some(challenge)).await?;
                if self.live_allows(&p, need) {
                    return Ok(Access {
                        principal: p,
                        kind: AccessKind::Live,
                    });
                }
                Err(Denial {
                    error: ApiError::Denied(format!(
                        "{} may not {}{}",
                        p.subject(),
                        need.audit_action(),
                        match need {
                            Need::Repo(n, _) => format!(" {n}"),
                            _ => String::new(),
                        }
                    )),
                    challenge: None,
                    retry_after: None,
                    audit: Some(self.denied_event(&p.subject(), peer, need, "not granted")),
                })
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
                "Basic realm=\"{}\"",
                self.realm.as_deref().unwrap_or("ballast")
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

/// Writes a file only its owner can read, atomically (temporary file, fsync, rename, fsync
/// of the directory).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
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
            write_private(path, hex::encode(key).as_bytes())?;
            tracing::info!(file = %path.display(), "created the token signing key");
            Ok(key.to_vec())
        }
        Err(e) => Err(e).with_context(|| format!("reading token key {}", path.display())),
    }
}
