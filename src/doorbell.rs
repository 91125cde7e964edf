//! The doorbell, `<prefix>/.changed`: what the depro CLI writes in the same
//! transaction as every change it makes under a prefix, and what agents
//! read from it.
//!
//! Its value is one line, for people and for agents:
//!
//! ```text
//! created v2/ after 1234 by ops@build1 at 2026-11-27T08:00:00.000Z
//! ```
//!
//! a verb, what it was done to, the doorbell's ModifyIndex before this ring
//! (0 when it did not exist), then who and when. The CLI writes it by
//! check-and-set on that index, so rings form a chain: an agent that saw the
//! ring at index 1234 and next sees one `after 1234` knows it missed none,
//! and applies the change without reading anything. A broken chain, or a
//! value it cannot read (another tool rang), makes it read the whole tree.

use std::fmt;

use crate::version_name::VersionName;

/// What a ring says changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// The version's folder key was created.
    Created(VersionName),
    /// The key that made the version exist was deleted: its folder key
    /// (`folder`) or a plain key another tool wrote.
    Removed { version: VersionName, folder: bool },
    /// A node's `failed` key for the version was deleted: a retry.
    Retried { version: VersionName, node: String },
    /// `current` was switched to the version.
    Switched(VersionName),
    /// `current` was put back as it was (`None`: deleted).
    Restored(Option<VersionName>),
    /// The doorbell was created by an agent, so that it exists before the
    /// first change (a query on a missing key wakes at every write).
    Opened,
    /// The progressive rollout under way (`<prefix>/.rollout`) was started
    /// or moved to its next wave (`Some`), or undone (`None`): agents read
    /// that one key again.
    Wave(Option<VersionName>),
}

/// One ring: the change, and the doorbell's index before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ring {
    pub change: Change,
    pub after: u64,
}

impl Ring {
    /// The doorbell's value for this ring.
    pub(crate) fn text(&self, who: &str, when: &str) -> String {
        format!("{} after {} by {who} at {when}", self.change, self.after)
    }

    /// Reads a doorbell's value; `None` when it is not one the depro CLI
    /// wrote (another tool, another version of depro).
    pub(crate) fn parse(value: &[u8]) -> Option<Ring> {
        let text = std::str::from_utf8(value).ok()?;
        let mut words = text.split_ascii_whitespace();
        let (verb, subject) = (words.next()?, words.next()?);
        if words.next()? != "after" {
            return None;
        }
        let after = words.next()?.parse().ok()?;
        let version = |name: &str| VersionName::parse(name).ok();
        let change = match verb {
            "created" => Change::Created(version(subject.strip_suffix('/')?)?),
            "removed" => match subject.strip_suffix('/') {
                Some(name) => Change::Removed {
                    version: version(name)?,
                    folder: true,
                },
                None => Change::Removed {
                    version: version(subject)?,
                    folder: false,
                },
            },
            "retried" => {
                let (name, node) = subject.split_once('/')?;
                crate::tree::check_node_name(node).ok()?;
                Change::Retried {
                    version: version(name)?,
                    node: node.to_string(),
                }
            }
            "switched" => Change::Switched(version(subject)?),
            "restored" if subject == "-" => Change::Restored(None),
            "restored" => Change::Restored(Some(version(subject)?)),
            "opened" if subject == "-" => Change::Opened,
            "wave" if subject == "-" => Change::Wave(None),
            "wave" => Change::Wave(Some(version(subject)?)),
            _ => return None,
        };
        Some(Ring { change, after })
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Created(v) => write!(f, "created {v}/"),
            Change::Removed { version, folder } => {
                write!(f, "removed {version}{}", if *folder { "/" } else { "" })
            }
            Change::Retried { version, node } => write!(f, "retried {version}/{node}"),
            Change::Switched(v) => write!(f, "switched {v}"),
            Change::Restored(Some(v)) => write!(f, "restored {v}"),
            Change::Restored(None) => write!(f, "restored -"),
            Change::Opened => write!(f, "opened -"),
            Change::Wave(Some(v)) => write!(f, "wave {v}"),
            Change::Wave(None) => write!(f, "wave -"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str) -> VersionName {
        VersionName::parse(name).unwrap()
    }

    #[test]
    fn every_change_reads_back_as_written() {
        for change in [
            Change::Created(v("v2")),
            Change::Removed {
                version: v("v2"),
                folder: true,
            },
            Change::Removed {
                version: v("v2"),
                folder: false,
            },
            Change::Retried {
                version: v("v2"),
                node: "web-1".into(),
            },
            Change::Switched(v("v2")),
            Change::Restored(Some(v("v1"))),
            Change::Restored(None),
            Change::Opened,
            Change::Wave(Some(v("v3"))),
            Change::Wave(None),
        ] {
            let ring = Ring { change, after: 42 };
            let text = ring.text("ops@build1", "2026-11-27T08:00:00.000Z");
            assert_eq!(Ring::parse(text.as_bytes()), Some(ring), "{text}");
        }
    }

    #[test]
    fn the_text_is_for_people_too() {
        let ring = Ring {
            change: Change::Created(v("v2")),
            after: 1234,
        };
        assert_eq!(
            ring.text("ops@build1", "2026-11-27T08:00:00.000Z"),
            "created v2/ after 1234 by ops@build1 at 2026-11-27T08:00:00.000Z"
        );
    }

    #[test]
    fn values_the_cli_did_not_write_are_not_rings() {
        for value in [
            "",
            "x",
            "touched by a script",
            "created v2 by ops at now", // an older depro: no chain
            "created v2/ after x by ops",
            "created ../x/ after 3 by ops",
            "created v2 after 3 by ops", // a folder is created, never a plain key
            "retried v2/ after 3 by ops",
            "retried v2/a/b after 3 by ops",
            "renamed v2 after 3 by ops",
            "opened v2 after 3 by ops",
        ] {
            assert_eq!(Ring::parse(value.as_bytes()), None, "{value:?}");
        }
        assert_eq!(Ring::parse(&[0xff, 0xfe]), None);
    }
}
