//! Console sessions: a random token in an HttpOnly, SameSite=Strict cookie (Secure under
//! TLS), kept in memory by the hash of the token, with the form token (CSRF) every mutation
//! must carry. Sessions end when idle for `console_idle_secs`, after
//! `console_session_max_secs` in any case, at sign-out, and with the process (signing in
//! again is the way back after a restart). Every visitor gets a session, signed in or not,
//! so that the sign-in form carries a form token as well.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::auth::Principal;

/// The cookie's name.
pub const COOKIE: &str = "ballast_session";

/// Sessions kept at most; past it the least recently used go first (a visitor cannot grow
/// the server's memory without bound by collecting cookies).
pub const SESSIONS_MAX: usize = 10_000;

/// One session.
#[derive(Clone, Debug)]
pub struct Session {
    /// Who signed in; `None` before signing in.
    pub user: Option<Principal>,
    /// The form token every POST of this session carries.
    pub csrf: String,
    /// The fingerprint of the user's secret at sign-in (a changed password ends the session).
    pub stamp: u64,
    created: Instant,
    last: Instant,
}

impl Session {
    /// True when `token` is this session's form token (compared in constant time).
    pub fn csrf_ok(&self, token: Option<&str>) -> bool {
        token.is_some_and(|t| bool::from(t.as_bytes().ct_eq(self.csrf.as_bytes())))
    }
}

/// What a cookie led to.
#[derive(Debug)]
pub enum Found {
    /// A live session (its last use is now).
    Live(Session),
    /// A signed-in session that ran out (idle or too old): the page says so.
    Expired,
    /// No session.
    None,
}

/// The live sessions.
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
    idle: Duration,
    max_age: Duration,
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Sessions {
    /// Sessions that end after `idle` unused and after `max_age` in any case.
    pub fn new(idle: Duration, max_age: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            idle,
            max_age,
        }
    }

    /// The session of a cookie's token; its last use becomes now.
    pub fn find(&self, token: &str) -> Found {
        let mut map = self.map.lock();
        let k = key(token);
        let Some(s) = map.get_mut(&k) else {
            return Found::None;
        };
        let now = Instant::now();
        if now.duration_since(s.last) > self.idle || now.duration_since(s.created) > self.max_age {
            let signed_in = s.user.is_some();
            map.remove(&k);
            return if signed_in {
                Found::Expired
            } else {
                Found::None
            };
        }
        s.last = now;
        Found::Live(s.clone())
    }

    /// A new session: its token (for the cookie) and the session.
    pub fn create(&self, user: Option<Principal>, stamp: u64) -> (String, Session) {
        let token = random_token();
        let now = Instant::now();
        let s = Session {
            user,
            csrf: random_token(),
            stamp,
            created: now,
            last: now,
        };
        let mut map = self.map.lock();
        let (idle, max_age) = (self.idle, self.max_age);
        map.retain(|_, s| {
            now.duration_since(s.last) <= idle && now.duration_since(s.created) <= max_age
        });
        if map.len() >= SESSIONS_MAX {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(key(&token), s.clone());
        (token, s)
    }

    /// Ends a session.
    pub fn remove(&self, token: &str) {
        self.map.lock().remove(&key(token));
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session token a request's `Cookie` headers carry.
pub fn token_of(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The `Set-Cookie` value that gives the browser `token` (or, with `None`, removes it).
pub fn set_cookie(token: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some(t) => format!("{COOKIE}={t}; Path=/ui; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_and_tokens_are_checked() {
        let s = Sessions::new(Duration::from_millis(50), Duration::from_secs(60));
        let (token, session) = s.create(Some(Principal::User("alice".into())), 0);
        assert!(matches!(s.find(&token), Found::Live(x) if x.user == session.user));
        assert!(matches!(s.find("forged"), Found::None));
        assert!(session.csrf_ok(Some(&session.csrf)));
        assert!(!session.csrf_ok(Some("x")));
        assert!(!session.csrf_ok(None));
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(s.find(&token), Found::Expired));
        assert!(matches!(s.find(&token), Found::None));
        let (anon, _) = s.create(None, 0);
        std::thread::sleep(Duration::from_millis(80));
        // A visitor who never signed in has nothing to be told.
        assert!(matches!(s.find(&anon), Found::None));
    }

    #[test]
    fn sessions_end_at_their_maximum_age_even_when_used() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_millis(60));
        let (token, _) = s.create(Some(Principal::User("a".into())), 0);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(15));
            assert!(matches!(s.find(&token), Found::Live(_)));
        }
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(s.find(&token), Found::Expired));
    }

    #[test]
    fn cookies_are_read_among_others_and_written_strict() {
        let mut h = hyper::HeaderMap::new();
        h.append(
            hyper::header::COOKIE,
            "a=1; ballast_session=tok; b=2".parse().expect("header"),
        );
        assert_eq!(token_of(&h).as_deref(), Some("tok"));
        let c = set_cookie(Some("tok"), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(!set_cookie(Some("tok"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}
