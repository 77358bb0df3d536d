//! Repository names and tags, validated as the OCI distribution spec says.

use crate::error::{Error, Input, Result};

/// Longest repository name.
pub const REPO_NAME_LEN_MAX: usize = 255;

/// Checks a repository name: lowercase alphanumeric path components separated by `/`, each
/// component's alphanumeric runs joined by `.`, `_`, `__` or runs of `-`.
pub fn validate_repo(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(
            Input::RepositoryName,
            format!("{name:?}: {why}"),
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > REPO_NAME_LEN_MAX {
        return bad("longer than 255 characters");
    }
    for component in name.split('/') {
        if component.is_empty() {
            return bad("empty path component");
        }
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return bad("components start and end with a lowercase letter or digit");
        }
        let mut i = 0;
        while i < bytes.len() {
            if alnum(bytes[i]) {
                i += 1;
                continue;
            }
            // A separator run: ".", "_", "__" or one or more "-".
            let start = i;
            while i < bytes.len() && !alnum(bytes[i]) {
                i += 1;
            }
            let sep = &component[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
            if !ok {
                return bad("only lowercase letters, digits and the separators '.', '_', '__', '-' are allowed");
            }
        }
    }
    Ok(())
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            Input::Tag,
            format!("{tag:?} must match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        for ok in [
            "a",
            "library/ubuntu",
            "team-a/api",
            "a.b_c__d---e/f0",
            "x/y/z",
        ] {
            assert!(validate_repo(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "", "A", "a/", "/a", "a//b", "-a", "a-", "a..b", "a___b", "a/../b", "..", "a b", &long,
        ] {
            assert!(validate_repo(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.2.3", "_x", "A-b.c_d"] {
            assert!(validate_tag(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in ["", ".x", "-x", "a/b", "a:b", &long] {
            assert!(validate_tag(bad).is_err(), "{bad}");
        }
    }
}
