//! Bearer tokens of the Docker token flow: short-lived JWTs (HS256) carrying exactly the
//! actions granted, and the `scope` strings clients ask for them with.

use std::collections::{BTreeMap, BTreeSet};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::policy::Action;

/// One granted resource, as the token spec writes it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct AccessEntry {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository name, or `catalog` / `admin` for the registry.
    pub name: String,
    /// Granted actions (`pull`, `push`, `delete`, `admin`, or `*` for a registry resource).
    pub actions: Vec<String>,
}

/// A token's claims.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// The principal as a subject (`user:alice`, `robot:ci`, `anonymous`).
    pub sub: String,
    /// The service the token is for.
    pub aud: String,
    /// Expiry, not-before and issue times (seconds since the epoch).
    pub exp: u64,
    /// Not valid before.
    pub nbf: u64,
    /// Issued at.
    pub iat: u64,
    /// Unique id.
    pub jti: String,
    /// What the bearer may do.
    pub access: Vec<AccessEntry>,
}

/// A requested scope: `repository:NAME:pull,push` or `registry:catalog:*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// `repository` or `registry`.
    pub kind: String,
    /// The resource's name.
    pub name: String,
    /// Requested actions, as written.
    pub actions: Vec<String>,
}

impl Scope {
    /// Parses one scope. Repository names hold no `:`, but a type may carry a class
    /// (`repository(plugin)`), which is kept as part of the type and so grants nothing.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Scope {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    /// Scopes from `scope` parameters, each of which may hold several separated by spaces.
    pub fn parse_all<'a>(params: impl IntoIterator<Item = &'a String>) -> Vec<Scope> {
        params
            .into_iter()
            .flat_map(|p| p.split(' '))
            .filter_map(Scope::parse)
            .collect()
    }

    /// The scope written back, for a challenge.
    pub fn render(&self) -> String {
        format!("{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }
}

/// What a verified token grants, for checking requests.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Repository name → granted actions.
    pub repositories: BTreeMap<String, BTreeSet<Action>>,
    /// Registry resources granted (`catalog`, `admin`).
    pub registry: BTreeSet<String>,
}

impl Grants {
    /// Reads a token's access list. Unknown types and actions grant nothing.
    pub fn of(access: &[AccessEntry]) -> Grants {
        let mut g = Grants::default();
        for e in access {
            match e.kind.as_str() {
                "repository" => {
                    let set = g.repositories.entry(e.name.clone()).or_default();
                    set.extend(e.actions.iter().filter_map(|a| Action::parse(a)));
                }
                "registry" if e.actions.iter().any(|a| a == "*") => {
                    g.registry.insert(e.name.clone());
                }
                _ => {}
            }
        }
        g
    }
}

/// Signs and verifies tokens with one secret key.
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: String,
    audience: String,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadToken(pub String);

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

impl Signer {
    /// A signer for tokens from `issuer` for `audience` (the service).
    pub fn new(secret: &[u8], issuer: &str, audience: &str) -> Signer {
        Signer {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        }
    }

    /// Issues a token for `sub` granting `access`, valid `ttl` seconds from `now`.
    pub fn issue(&self, sub: &str, access: Vec<AccessEntry>, now: u64, ttl: u64) -> String {
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.to_owned(),
            aud: self.audience.clone(),
            exp: now + ttl,
            nbf: now.saturating_sub(1),
            iat: now,
            jti: format!("{:032x}", rand::random::<u128>()),
            access,
        };
        // HS256 over serializable claims cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Verifies signature, algorithm, issuer, audience, expiry and not-before.
    pub fn verify(&self, token: &str) -> Result<Claims, BadToken> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = LEEWAY_SECS;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| BadToken(format!("token rejected: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn now() -> u64 {
        crate::now_secs()
    }

    fn pull(name: &str) -> Vec<AccessEntry> {
        vec![AccessEntry {
            kind: "repository".into(),
            name: name.into(),
            actions: vec!["pull".into()],
        }]
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            Scope::parse("repository:team-a/api:pull,push"),
            Some(Scope {
                kind: "repository".into(),
                name: "team-a/api".into(),
                actions: vec!["pull".into(), "push".into()]
            })
        );
        let all = Scope::parse_all(&["repository:a:pull registry:catalog:*".to_owned()]);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].render(), "registry:catalog:*");
        assert_eq!(Scope::parse("repository:a"), None);
        assert_eq!(Scope::parse("::pull"), None);
    }

    #[test]
    fn tokens_verify_and_are_refused_when_wrong() {
        let s = Signer::new(b"0123456789abcdef0123456789abcdef", "ballast", "svc");
        let good = s.issue("user:a", pull("x"), now(), 300);
        let c = s.verify(&good).expect("valid token");
        assert_eq!(c.sub, "user:a");
        let g = Grants::of(&c.access);
        assert!(g.repositories["x"].contains(&Action::Pull));
        assert!(!g.repositories["x"].contains(&Action::Push));

        // Expired (beyond the leeway).
        let old = s.issue("user:a", pull("x"), now() - 1000, 300);
        assert!(s.verify(&old).is_err());
        // Not yet valid.
        let future = s.issue("user:a", pull("x"), now() + 1000, 300);
        assert!(s.verify(&future).is_err());
        // Forged: signed with another key.
        let other = Signer::new(b"another key of thirty-two bytes!", "ballast", "svc");
        assert!(s
            .verify(&other.issue("user:a", pull("x"), now(), 300))
            .is_err());
        // Wrong audience and wrong issuer.
        let aud = Signer::new(b"0123456789abcdef0123456789abcdef", "ballast", "elsewhere");
        assert!(s
            .verify(&aud.issue("user:a", pull("x"), now(), 300))
            .is_err());
        let iss = Signer::new(b"0123456789abcdef0123456789abcdef", "mallory", "svc");
        assert!(s
            .verify(&iss.issue("user:a", pull("x"), now(), 300))
            .is_err());
        // Tampered claims under the original signature, and `alg: none`.
        let parts: Vec<&str> = good.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).expect("b64")).expect("json");
        claims["access"][0]["actions"] = serde_json::json!(["pull", "push"]);
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(claims.to_string()),
            parts[2]
        );
        assert!(s.verify(&tampered).is_err());
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(s.verify(&none).is_err());
        assert!(s.verify("garbage").is_err());
    }

    #[test]
    fn grants_ignore_unknown_things() {
        let g = Grants::of(&[
            AccessEntry {
                kind: "repository".into(),
                name: "a".into(),
                actions: vec!["pull".into(), "fly".into()],
            },
            AccessEntry {
                kind: "registry".into(),
                name: "catalog".into(),
                actions: vec!["*".into()],
            },
            AccessEntry {
                kind: "repository(plugin)".into(),
                name: "b".into(),
                actions: vec!["pull".into()],
            },
        ]);
        assert_eq!(g.repositories["a"], BTreeSet::from([Action::Pull]));
        assert!(!g.repositories.contains_key("b"));
        assert!(g.registry.contains("catalog"));
    }
}
