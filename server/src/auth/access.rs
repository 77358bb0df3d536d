//! What a request's caller may do: open access (authentication off), the live policy for
//! credentials or a session, or exactly what a bearer token grants.

use super::token::Grants;
use super::{Action, Auth, Principal};

/// What a request's caller may do.
#[derive(Clone)]
pub struct Access {
    /// Who is asking.
    pub principal: Principal,
    pub(super) kind: AccessKind,
}

#[derive(Clone)]
pub(super) enum AccessKind {
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

    /// Access that grants nothing.
    pub fn nobody() -> Access {
        Access {
            principal: Principal::Anonymous,
            kind: AccessKind::Token(Grants::default()),
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
