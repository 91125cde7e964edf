//! `VersionName`: a version as it may appear in the Consul tree and on disk.
//!
//! Version names come from Consul, so they are untrusted input. A name that
//! passes [`VersionName::parse`] is a single, harmless path component: it
//! cannot climb out of the deployment directory, cannot be mistaken for an
//! option, and cannot collide with depro's own files (`current`, `.depro`).

use std::fmt;
use std::sync::Arc;

/// Longest accepted version name, in bytes.
pub(crate) const MAX_LEN: usize = 128;

/// A validated version name: 1 to 128 characters of `[A-Za-z0-9._+-]`, not
/// starting with `.` or `-`, and never `current`.
///
/// Shared, not copied, when cloned: an agent holds each name in several
/// maps (the tree it saw, what it wants, what it has, what it reported),
/// and with thousands of versions the copies were most of its memory.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct VersionName(Arc<str>);

impl VersionName {
    /// Accepts `name` if it is a valid version name, or says why not.
    pub(crate) fn parse(name: &str) -> Result<VersionName, String> {
        if name.is_empty() {
            return Err("a version name cannot be empty".into());
        }
        if name.len() > MAX_LEN {
            return Err(format!(
                "a version name is at most {MAX_LEN} characters, this one has {}",
                name.len()
            ));
        }
        if name == "current" {
            return Err("\"current\" is reserved for the pointer to the live version".into());
        }
        if name.starts_with('.') || name.starts_with('-') {
            return Err("a version name cannot start with '.' or '-'".into());
        }
        if let Some(bad) = name.chars().find(|c| !is_allowed(*c)) {
            return Err(format!(
                "{bad:?} is not allowed in a version name (use letters, digits and . _ + -)"
            ));
        }
        Ok(VersionName(Arc::from(name)))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')
}

impl fmt::Display for VersionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hashes_semvers_and_build_tags() {
        for ok in [
            "585ecfabf5b41bae1db7bd566ce984d77568987d",
            "v1.2.3",
            "1.0.0+build.7",
            "release_2026-11-26",
            "a",
            &"x".repeat(MAX_LEN),
        ] {
            assert_eq!(VersionName::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_anything_that_could_become_a_path_or_an_option() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-rf",
            "current",
            "a/b",
            "../etc",
            "a b",
            "a\nb",
            "a\0b",
            "$(reboot)",
            "v1;rm",
            "é",
            &"x".repeat(MAX_LEN + 1),
        ] {
            assert!(VersionName::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn errors_say_what_is_allowed() {
        let err = VersionName::parse("a/b").unwrap_err();
        assert!(
            err.contains("'/'") && err.contains("letters, digits"),
            "{err}"
        );
    }
}
