//! `ballast tag DIR REPOSITORY:TAG DIGEST`: names a stored manifest again, offline. After
//! catalog damage that could not be rebuilt, fsck lists the manifests that are stored but
//! that no repository names (`manifest_unnamed`); this puts one back under a tag, linking
//! the blobs it references, as a push of the same manifest would.

use std::io::Write;
use std::path::Path;

use ballast_engine::catalog::Op;
use ballast_engine::{names, Digest, Options};
use ballast_tools::{printable, EXIT_FAILED, EXIT_FINDINGS};

use crate::audit::{self, Event};
use crate::error::ApiError;

/// Runs the command; returns the exit code (0 tagged, 1 refused, 2 could not run).
pub fn run(dir: &Path, target: &str, digest: &str, audit_log: &Path, out: &mut dyn Write) -> i32 {
    let fail = |out: &mut dyn Write, code: i32, msg: String| {
        let _ = writeln!(out, "tag: {}", printable(&msg));
        code
    };
    let Some((repo, tag)) = target
        .rsplit_once(':')
        .filter(|(r, t)| !r.is_empty() && !t.is_empty())
    else {
        return fail(
            out,
            EXIT_FAILED,
            format!("{target:?} is not REPOSITORY:TAG"),
        );
    };
    if let Err(e) = names::validate_repo(repo).and_then(|()| names::validate_tag(tag)) {
        return fail(out, EXIT_FAILED, e.to_string());
    }
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return fail(out, EXIT_FAILED, format!("{digest:?}: {e}")),
    };
    let store = match ballast_tools::open_offline(dir, Options::default()) {
        Ok(s) => s,
        Err(msg) => return fail(out, EXIT_FAILED, msg),
    };
    let bytes = match store.read_blob(&digest) {
        Ok(b) => b,
        Err(e) => return fail(out, EXIT_FINDINGS, format!("{digest} cannot be read: {e}")),
    };
    let (link, blobs, children) =
        match crate::handlers::manifests::link_of(&bytes, None, crate::now_secs()) {
            Ok(x) => x,
            Err(e) => {
                return fail(
                    out,
                    EXIT_FINDINGS,
                    format!("{digest} is not a manifest: {e}"),
                )
            }
        };
    let missing: Vec<String> = blobs
        .iter()
        .filter(|b| !store.contains(b))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return fail(
            out,
            EXIT_FINDINGS,
            format!(
                "{digest} references blobs that are not stored ({}): push the image again instead",
                missing.join(", ")
            ),
        );
    }
    let now = crate::now_secs();
    let (r, d) = (repo.to_owned(), digest.clone());
    let committed = store.commit_catalog(|state| {
        let held = state.repos.get(&r);
        if let Some(c) = children
            .iter()
            .find(|c| !held.is_some_and(|h| h.manifests.contains_key(*c)))
        {
            return Err(ApiError::ManifestUnknown(format!(
                "the index lists manifest {c}, which {r} does not hold: tag it there first"
            )));
        }
        let mut ops: Vec<Op> = blobs
            .iter()
            .map(|b| Op::LinkBlob {
                repo: r.clone(),
                digest: b.clone(),
                at: now,
            })
            .collect();
        ops.push(Op::PutManifest {
            repo: r.clone(),
            digest: d.clone(),
            link,
        });
        ops.push(Op::Tag {
            repo: r.clone(),
            tag: tag.to_owned(),
            digest: d.clone(),
            at: crate::now_secs(),
        });
        Ok((ops, ()))
    });
    if let Err(e) = committed {
        return fail(out, EXIT_FINDINGS, e.to_string());
    }
    drop(store);
    let mut e = Event::new(crate::cli::cli_actor(), "manifest.put");
    e.repository = Some(repo.to_owned());
    e.tag = Some(tag.to_owned());
    e.digest = Some(digest.to_string());
    e.reason = Some("ballast tag (offline)".into());
    if let Err(err) = audit::append(audit_log, &e) {
        let _ = writeln!(
            out,
            "warning: could not write the audit log {}: {err}",
            audit_log.display()
        );
    }
    let _ = writeln!(
        out,
        "tagged {repo}:{tag} -> {digest} ({} blobs linked)",
        blobs.len()
    );
    0
}
