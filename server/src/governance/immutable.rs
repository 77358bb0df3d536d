//! Tag immutability (`[[immutable_tags]]`): a tag a rule covers may be created, and pushed
//! again with the same manifest, but never moved to another manifest or deleted, and the
//! manifest it points at is not deleted while it does. Checked inside the catalog commit,
//! against the state the commit applies to, so concurrent pushes cannot both pass.

use anyhow::{bail, Context};
use ballast_engine::catalog::State;
use ballast_engine::Digest;
use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::error::ApiError;

/// One `[[immutable_tags]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImmutableTagRule {
    /// Repository globs, as in policies (default: every repository).
    #[serde(default = "everything")]
    pub repositories: Vec<String>,
    /// Tag globs the rule covers (`v*`, `release-*`; default: every tag).
    #[serde(default = "every_tag")]
    pub tags: Vec<String>,
    /// Tag globs it leaves mutable (`latest`, `*-dev`).
    #[serde(default)]
    pub except: Vec<String>,
}

fn everything() -> Vec<String> {
    vec!["**".into()]
}
fn every_tag() -> Vec<String> {
    vec!["*".into()]
}

struct Compiled {
    repos: Vec<GlobMatcher>,
    tags: GlobSet,
    except: GlobSet,
    text: String,
}

/// The compiled rules. A tag is immutable when any rule covers it (rules only add
/// protection; each rule's `except` narrows that rule alone).
#[derive(Default)]
pub struct ImmutableRules {
    rules: Vec<Compiled>,
}

impl std::fmt::Debug for ImmutableRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImmutableRules")
            .field("rules", &self.rules.len())
            .finish()
    }
}

fn tag_set(patterns: &[String], what: &str) -> anyhow::Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).with_context(|| format!("{what} pattern {p:?}"))?);
    }
    Ok(b.build()?)
}

impl ImmutableRules {
    /// Compiles the rules; an error names the rule and the pattern.
    pub fn compile(cfg: &[ImmutableTagRule]) -> anyhow::Result<ImmutableRules> {
        let mut rules = Vec::new();
        for (i, r) in cfg.iter().enumerate() {
            let number = i + 1;
            let at = || format!("[[immutable_tags]] #{number}");
            if r.repositories.is_empty() || r.tags.is_empty() {
                bail!("{}: repositories and tags may not be empty lists", at());
            }
            let repos = crate::auth::repo_globs(&r.repositories, &at())?;
            rules.push(Compiled {
                repos,
                tags: tag_set(&r.tags, "tag").with_context(at)?,
                except: tag_set(&r.except, "except").with_context(at)?,
                text: format!(
                    "immutable_tags rule {number}: repositories {:?}, tags {:?}{}",
                    r.repositories,
                    r.tags,
                    if r.except.is_empty() {
                        String::new()
                    } else {
                        format!(", except {:?}", r.except)
                    }
                ),
            });
        }
        Ok(ImmutableRules { rules })
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule that makes `repo:tag` immutable, described, if one does.
    pub fn rule_for(&self, repo: &str, tag: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| {
                r.repos.iter().any(|g| g.is_match(repo))
                    && r.tags.is_match(tag)
                    && !r.except.is_match(tag)
            })
            .map(|r| r.text.as_str())
    }

    fn refuse(repo: &str, tag: &str, current: &Digest, rule: &str, what: &str) -> ApiError {
        ApiError::Immutable(format!(
            "tag {repo}:{tag} is immutable ({rule}): it points at {current} and cannot be \
             {what}; push the new image under a new tag (only a change to the config lifts \
             the rule)"
        ))
    }

    /// Refuses pointing `repo:tag` at `digest` when the tag is immutable and points at
    /// another manifest (creating it, or pushing the same manifest again, is fine).
    pub fn check_tag(
        &self,
        state: &State,
        repo: &str,
        tag: &str,
        digest: &Digest,
    ) -> Result<(), ApiError> {
        let Some(current) = state.repos.get(repo).and_then(|r| r.tags.get(tag)) else {
            return Ok(());
        };
        match self.rule_for(repo, tag) {
            Some(rule) if current != digest => Err(Self::refuse(
                repo,
                tag,
                current,
                rule,
                &format!("moved to {digest}"),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses deleting `repo:tag` when it is immutable.
    pub fn check_untag(&self, state: &State, repo: &str, tag: &str) -> Result<(), ApiError> {
        let Some(current) = state.repos.get(repo).and_then(|r| r.tags.get(tag)) else {
            return Ok(());
        };
        match self.rule_for(repo, tag) {
            Some(rule) => Err(Self::refuse(repo, tag, current, rule, "deleted")),
            None => Ok(()),
        }
    }

    /// Refuses deleting manifest `digest` from `repo` while an immutable tag points at it.
    pub fn check_delete_manifest(
        &self,
        state: &State,
        repo: &str,
        digest: &Digest,
    ) -> Result<(), ApiError> {
        let Some(r) = state.repos.get(repo) else {
            return Ok(());
        };
        for (tag, d) in &r.tags {
            if d == digest {
                if let Some(rule) = self.rule_for(repo, tag) {
                    return Err(Self::refuse(
                        repo,
                        tag,
                        d,
                        rule,
                        "deleted with its manifest (delete the manifest only once no \
                         immutable tag points at it)",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::catalog::Op;

    fn d(n: u8) -> Digest {
        format!("sha256:{}", hex::encode([n; 32]))
            .parse()
            .expect("digest")
    }

    fn rules(toml_text: &str) -> ImmutableRules {
        #[derive(Deserialize)]
        struct C {
            immutable_tags: Vec<ImmutableTagRule>,
        }
        let c: C = toml::from_str(toml_text).expect("toml");
        ImmutableRules::compile(&c.immutable_tags).expect("compile")
    }

    #[test]
    fn rules_cover_tags_with_exceptions() {
        let r = rules(
            r#"
[[immutable_tags]]
repositories = ["team-a/**"]
tags = ["v*"]
except = ["v*-dev"]
[[immutable_tags]]
repositories = ["prod"]
except = ["latest"]
"#,
        );
        assert!(r
            .rule_for("team-a/api", "v1.2")
            .is_some_and(|t| t.contains("rule 1")));
        assert!(r.rule_for("team-a/api", "v1.2-dev").is_none());
        assert!(r.rule_for("team-a/api", "latest").is_none());
        assert!(r.rule_for("team-b/api", "v1").is_none());
        assert!(r
            .rule_for("prod", "anything")
            .is_some_and(|t| t.contains("rule 2")));
        assert!(r.rule_for("prod", "latest").is_none());
    }

    #[test]
    fn moves_and_deletes_are_refused_creation_and_same_digest_are_not() {
        let r = rules("[[immutable_tags]]\ntags = [\"v*\"]\n");
        let mut s = State::default();
        for op in [
            Op::PutManifest {
                repo: "a".into(),
                digest: d(1),
                link: ballast_engine::catalog::ManifestLink {
                    media_type: "x".into(),
                    size: 1,
                    artifact_type: None,
                    annotations: Default::default(),
                    subject: None,
                    references: vec![],
                    pushed_at: 0,
                    origin: None,
                },
            },
            Op::Tag {
                repo: "a".into(),
                tag: "v1".into(),
                digest: d(1),
                at: 0,
            },
        ] {
            s.apply(&op);
        }
        assert!(r.check_tag(&s, "a", "v2", &d(2)).is_ok(), "a new tag");
        assert!(
            r.check_tag(&s, "a", "v1", &d(1)).is_ok(),
            "the same manifest again"
        );
        let e = r.check_tag(&s, "a", "v1", &d(2)).expect_err("moved");
        let (code, status) = e.code_and_status();
        assert_eq!((code, status.as_u16()), ("DENIED", 409));
        assert!(e.to_string().contains("tag a:v1 is immutable"), "{e}");
        assert!(r.check_untag(&s, "a", "v1").is_err());
        assert!(
            r.check_untag(&s, "a", "v9").is_ok(),
            "no such tag: the delete says so"
        );
        assert!(r.check_delete_manifest(&s, "a", &d(1)).is_err());
        assert!(r.check_delete_manifest(&s, "a", &d(2)).is_ok());
        assert!(rules("[[immutable_tags]]\ntags = [\"latest\"]\n")
            .check_untag(&s, "a", "v1")
            .is_ok());
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = ImmutableRules::compile(&[ImmutableTagRule {
            repositories: vec!["**".into()],
            tags: vec!["[".into()],
            except: vec![],
        }])
        .expect_err("bad glob");
        assert!(
            format!("{e:#}").contains("#1") && format!("{e:#}").contains("\"[\""),
            "{e:#}"
        );
    }
}
