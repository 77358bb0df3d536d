//! Who may do what: principals, actions, and the policy rules of the config, compiled.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context};
use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

/// An action on a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Read manifests, blobs, tags and referrers.
    Pull,
    /// Upload blobs, mount them, push manifests and move tags.
    Push,
    /// Delete manifests, tags and blob links.
    Delete,
    /// Everything above; on `**`, also the registry's admin endpoints.
    Admin,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 4] = [Action::Pull, Action::Push, Action::Delete, Action::Admin];

    /// The action's name, as in configs and token scopes.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Admin => "admin",
        }
    }

    /// Parses an action name.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// No credentials.
    Anonymous,
    /// A user of the htpasswd file.
    User(String),
    /// A robot account (token from `ballast robot create`).
    Robot(String),
}

impl Principal {
    /// The principal as a policy subject: `anonymous`, `user:NAME` or `robot:NAME`.
    pub fn subject(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::User(n) => format!("user:{n}"),
            Principal::Robot(n) => format!("robot:{n}"),
        }
    }

    /// Parses a subject written by [`Principal::subject`].
    pub fn parse(s: &str) -> Option<Principal> {
        match s.split_once(':') {
            None if s == "anonymous" => Some(Principal::Anonymous),
            Some(("user", n)) if !n.is_empty() => Some(Principal::User(n.to_owned())),
            Some(("robot", n)) if !n.is_empty() => Some(Principal::Robot(n.to_owned())),
            _ => None,
        }
    }
}

/// One rule of the config: these subjects may do these actions on these repositories.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `user:NAME`, `robot:NAME`, `group:NAME`, `anonymous`, or `authenticated` (any user or
    /// robot).
    pub subjects: Vec<String>,
    /// Glob patterns over repository names: `*` stays within one path component, `**`
    /// crosses them (`team-a/**` is every repository under `team-a/`).
    pub repositories: Vec<String>,
    /// The actions granted.
    pub actions: Vec<Action>,
}

struct Compiled {
    subjects: BTreeSet<String>,
    repositories: Vec<GlobMatcher>,
    everything: bool,
    actions: BTreeSet<Action>,
}

/// The compiled rules and groups. Nothing is allowed that no rule grants.
pub struct Policy {
    rules: Vec<Compiled>,
    /// Member subject → the groups it is in (as `group:NAME` subjects).
    groups: BTreeMap<String, Vec<String>>,
}

impl Policy {
    /// Compiles rules and groups, refusing what would silently grant nothing or too much: an
    /// unknown subject kind, a group used but never defined, an empty list, a bad glob.
    pub fn compile(
        rules: &[Rule],
        groups: &BTreeMap<String, Vec<String>>,
    ) -> anyhow::Result<Policy> {
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (group, list) in groups {
            for m in list {
                match Principal::parse(m) {
                    Some(Principal::User(_) | Principal::Robot(_)) => {}
                    _ => bail!("group {group:?}: member {m:?} is not user:NAME or robot:NAME"),
                }
                members
                    .entry(m.clone())
                    .or_default()
                    .push(format!("group:{group}"));
            }
        }
        let mut compiled = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let n = i + 1;
            if rule.subjects.is_empty() || rule.repositories.is_empty() || rule.actions.is_empty() {
                bail!("policy rule {n}: subjects, repositories and actions must all be non-empty");
            }
            for s in &rule.subjects {
                let known = match s.split_once(':') {
                    Some(("group", g)) => {
                        if !groups.contains_key(g) {
                            bail!("policy rule {n}: group {g:?} is not defined in [auth.groups]");
                        }
                        true
                    }
                    _ => s == "authenticated" || Principal::parse(s).is_some(),
                };
                if !known {
                    bail!(
                        "policy rule {n}: subject {s:?} is not user:NAME, robot:NAME, \
                         group:NAME, anonymous or authenticated"
                    );
                }
            }
            let repositories = repo_globs(&rule.repositories, &format!("policy rule {n}"))?;
            compiled.push(Compiled {
                subjects: rule.subjects.iter().cloned().collect(),
                repositories,
                everything: rule.repositories.iter().any(|p| p == "**"),
                actions: rule.actions.iter().copied().collect(),
            });
        }
        Ok(Policy {
            rules: compiled,
            groups: members,
        })
    }

    fn subjects_of(&self, p: &Principal) -> Vec<String> {
        let own = p.subject();
        let mut out = vec![own.clone()];
        if *p != Principal::Anonymous {
            out.push("authenticated".to_owned());
        }
        if let Some(groups) = self.groups.get(&own) {
            out.extend(groups.iter().cloned());
        }
        out
    }

    fn applies(&self, rule: &Compiled, subjects: &[String]) -> bool {
        subjects.iter().any(|s| rule.subjects.contains(s))
    }

    /// The actions `p` may do on repository `repo`. `admin` implies the others.
    pub fn granted(&self, p: &Principal, repo: &str) -> BTreeSet<Action> {
        let subjects = self.subjects_of(p);
        let mut out = BTreeSet::new();
        for rule in &self.rules {
            if self.applies(rule, &subjects) && rule.repositories.iter().any(|g| g.is_match(repo)) {
                out.extend(rule.actions.iter().copied());
            }
        }
        if out.contains(&Action::Admin) {
            out.extend(Action::ALL);
        }
        out
    }

    /// True when `p` may do `action` on `repo`.
    pub fn allows(&self, p: &Principal, repo: &str, action: Action) -> bool {
        self.granted(p, repo).contains(&action)
    }

    /// True when `p` is granted `admin` on `**` (every repository): the registry's admin
    /// endpoints (garbage collection) need it.
    pub fn is_registry_admin(&self, p: &Principal) -> bool {
        let subjects = self.subjects_of(p);
        self.rules.iter().any(|r| {
            r.everything && r.actions.contains(&Action::Admin) && self.applies(r, &subjects)
        })
    }
}

/// Repository patterns of a rule; an error names the rule (`at`) and the pattern.
pub fn repo_globs(patterns: &[String], at: &str) -> anyhow::Result<Vec<GlobMatcher>> {
    patterns
        .iter()
        .map(|p| repo_glob(p).with_context(|| format!("{at}: repository pattern {p:?}")))
        .collect()
}

/// A repository pattern: `*` within one path component, `**` across them, `?`, `[abc]`,
/// `{a,b}` (policies, webhooks and every rule that names repositories).
pub fn repo_glob(pattern: &str) -> anyhow::Result<GlobMatcher> {
    Ok(GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()?
        .compile_matcher())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(subjects: &[&str], repos: &[&str], actions: &[Action]) -> Rule {
        Rule {
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            repositories: repos.iter().map(|s| s.to_string()).collect(),
            actions: actions.to_vec(),
        }
    }

    #[test]
    fn globs_groups_and_admin() {
        let groups = BTreeMap::from([("ci".to_owned(), vec!["robot:builder".to_owned()])]);
        let p = Policy::compile(
            &[
                rule(&["group:ci"], &["team-a/**"], &[Action::Pull, Action::Push]),
                rule(&["anonymous"], &["public/*"], &[Action::Pull]),
                rule(&["authenticated"], &["shared"], &[Action::Pull]),
                rule(&["user:root"], &["**"], &[Action::Admin]),
                rule(&["user:ops"], &["team-*/**"], &[Action::Admin]),
            ],
            &groups,
        )
        .expect("compile");
        let robot = Principal::Robot("builder".into());
        let anon = Principal::Anonymous;
        let root = Principal::User("root".into());
        let ops = Principal::User("ops".into());
        assert!(p.allows(&robot, "team-a/api", Action::Push));
        assert!(p.allows(&robot, "team-a/x/y", Action::Pull));
        assert!(!p.allows(&robot, "team-a/api", Action::Delete));
        assert!(!p.allows(&robot, "team-b/api", Action::Pull));
        assert!(!p.allows(&robot, "team-a", Action::Pull));
        // `*` stays within a component.
        assert!(p.allows(&anon, "public/app", Action::Pull));
        assert!(!p.allows(&anon, "public/a/b", Action::Pull));
        assert!(!p.allows(&anon, "shared", Action::Pull));
        assert!(p.allows(&robot, "shared", Action::Pull));
        // A user named like the robot is someone else.
        assert!(!p.allows(
            &Principal::User("builder".into()),
            "team-a/api",
            Action::Pull
        ));
        assert!(p.allows(&root, "anything/at/all", Action::Delete));
        assert!(p.is_registry_admin(&root));
        assert!(p.allows(&ops, "team-b/x", Action::Delete));
        assert!(!p.is_registry_admin(&ops));
        assert!(!p.is_registry_admin(&robot));
    }

    #[test]
    fn bad_rules_are_refused() {
        let none = BTreeMap::new();
        for bad in [
            rule(&["group:nope"], &["a"], &[Action::Pull]),
            rule(&["someone"], &["a"], &[Action::Pull]),
            rule(&["user:a"], &[], &[Action::Pull]),
            rule(&["user:a"], &["a"], &[]),
            rule(&["user:a"], &["a[b"], &[Action::Pull]),
        ] {
            assert!(
                Policy::compile(std::slice::from_ref(&bad), &none).is_err(),
                "{bad:?}"
            );
        }
        let groups = BTreeMap::from([("g".to_owned(), vec!["anonymous".to_owned()])]);
        assert!(Policy::compile(&[], &groups).is_err());
    }

    #[test]
    fn subjects_round_trip() {
        for p in [
            Principal::Anonymous,
            Principal::User("a".into()),
            Principal::Robot("b".into()),
        ] {
            assert_eq!(Principal::parse(&p.subject()), Some(p));
        }
        assert_eq!(Principal::parse("user:"), None);
        assert_eq!(Principal::parse("group:x"), None);
    }
}
