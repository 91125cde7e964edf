//! Signed releases (issue 21): Ed25519 keys made by `depro keygen`, a
//! signature over (prefix, version, artifact digest, size) made by `depro
//! deploy -sign=FILE`, and the check an agent whose deployment lists
//! `trusted_keys` makes before it fetches or deploys a version: writing the
//! prefix alone no longer decides what the hosts run. ring (already in the
//! build through rustls) does the cryptography; keys and signatures are
//! written in hex, one line each.

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::artifact::Artifact;

/// How a public key's line starts (`FILE.pub`, and `trusted_keys`).
const PUBLIC: &str = "depro-ed25519";
/// How a private key's file starts.
const PRIVATE: &str = "depro-ed25519-private";

/// A signature of a version's artifact, as its folder key records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Signature {
    /// The public key that made it (hex), to say which one.
    pub key: String,
    /// The Ed25519 signature (hex).
    pub sig: String,
    /// Fields of a newer depro, kept when the key is rewritten.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// An Ed25519 public key an agent trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PublicKey([u8; 32]);

impl PublicKey {
    /// Reads a public key's line: `depro-ed25519 <64 hex digits> [comment]`.
    pub(crate) fn parse(line: &str) -> Result<PublicKey, String> {
        let mut words = line.split_whitespace();
        let bytes = match (words.next(), words.next()) {
            (Some(PUBLIC), Some(hex)) => unhex(hex),
            _ => None,
        };
        bytes
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(PublicKey)
            .ok_or_else(|| {
                format!(
                    "{:?} is not a public key line (`{PUBLIC} <64 hex digits> [comment]`, as \
                     `depro keygen FILE` writes FILE.pub)",
                    crate::tree::shown(&line.chars().take(80).collect::<String>())
                )
            })
    }

    fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// What a signature covers: the prefix, the version and its artifact, so
/// that a signature cannot be moved to another version or prefix.
pub(crate) fn message(prefix: &str, version: &str, artifact: &Artifact) -> Vec<u8> {
    format!(
        "depro signed artifact v1\nprefix {prefix}\nversion {version}\nsha256 {}\nsize {}\n",
        artifact.sha256,
        artifact.size.map_or("-".into(), |s| s.to_string())
    )
    .into_bytes()
}

/// `depro keygen FILE`: a new key pair, FILE (private, mode 0600, never
/// overwritten) and FILE.pub (the public key's line, with `comment`).
pub(crate) fn keygen(path: &Path, comment: &str) -> Result<PathBuf, String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| "the system's random source failed".to_string())?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| "the new key does not read back".to_string())?;
    let public = path.with_file_name(format!(
        "{}.pub",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    for file in [path, public.as_path()] {
        if file.exists() {
            return Err(format!(
                "{} exists: keygen never overwrites a key; choose another name",
                file.display()
            ));
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(file, "{PRIVATE} {}", hex(pkcs8.as_ref()))
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let line = format!("{PUBLIC} {} {comment}\n", hex(pair.public_key().as_ref()));
    std::fs::write(&public, line).map_err(|e| format!("{}: {e}", public.display()))?;
    Ok(public)
}

/// Signs `message` with the private key in `path`.
pub(crate) fn sign(path: &Path, message: &[u8]) -> Result<Signature, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let pair = match text.split_whitespace().collect::<Vec<_>>()[..] {
        [PRIVATE, hex] => unhex(hex).and_then(|der| Ed25519KeyPair::from_pkcs8(&der).ok()),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "{}: not a private key made by `depro keygen` (a line `{PRIVATE} <hex>`)",
            path.display()
        )
    })?;
    Ok(Signature {
        key: hex(pair.public_key().as_ref()),
        sig: hex(pair.sign(message).as_ref()),
        other: Default::default(),
    })
}

/// Whether `signature` is one of `trusted` over `message`; says why not.
pub(crate) fn verify(
    trusted: &[PublicKey],
    message: &[u8],
    signature: Option<&Signature>,
) -> Result<(), String> {
    let Some(signature) = signature else {
        return Err(
            "it is not signed, and this deployment trusts only signed versions \
                    (trusted_keys)"
                .into(),
        );
    };
    let Some(key) = trusted.iter().find(|k| k.hex() == signature.key) else {
        return Err(format!(
            "it is signed by a key this deployment does not trust ({}…)",
            crate::tree::shown(&signature.key.chars().take(16).collect::<String>())
        ));
    };
    let sig = unhex(&signature.sig).unwrap_or_default();
    UnparsedPublicKey::new(&ED25519, &key.0)
        .verify(message, &sig)
        .map_err(|_| {
            "its signature does not match its prefix, version and artifact (tampered, or \
             signed for another version)"
                .to_string()
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || text.len() > 4096 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact() -> Artifact {
        Artifact {
            url: "http://origin/v1.tar".into(),
            sha256: "ab".repeat(32),
            size: Some(3),
            ..Artifact::default()
        }
    }

    #[test]
    fn a_signature_holds_for_its_version_only_and_from_a_trusted_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        let public = keygen(&one, "ops@b1").unwrap();
        keygen(&two, "ops@b2").unwrap();
        let mode = std::fs::metadata(&one).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(
            keygen(&one, "again")
                .unwrap_err()
                .contains("never overwrites")
        );
        let line = std::fs::read_to_string(public).unwrap();
        let trusted = [PublicKey::parse(&line).unwrap()];

        let message = message("api/version", "v1", &artifact());
        let signed = sign(&one, &message).unwrap();
        assert_eq!(verify(&trusted, &message, Some(&signed)), Ok(()));
        // Another version, another digest: the signature does not hold.
        let other = super::message("api/version", "v2", &artifact());
        assert!(
            verify(&trusted, &other, Some(&signed))
                .unwrap_err()
                .contains("does not match")
        );
        let by_two = sign(&two, &message).unwrap();
        assert!(
            verify(&trusted, &message, Some(&by_two))
                .unwrap_err()
                .contains("does not trust")
        );
        assert!(
            verify(&trusted, &message, None)
                .unwrap_err()
                .contains("not signed")
        );
        // A forged signature under the trusted key's name.
        let forged = Signature {
            key: signed.key.clone(),
            sig: by_two.sig,
            other: Default::default(),
        };
        assert!(verify(&trusted, &message, Some(&forged)).is_err());
    }

    #[test]
    fn key_lines_and_files_are_read_strictly() {
        assert!(PublicKey::parse(&format!("depro-ed25519 {}", "00".repeat(32))).is_ok());
        assert!(PublicKey::parse(&format!("ssh-ed25519 {}", "00".repeat(32))).is_err());
        assert!(
            PublicKey::parse("depro-ed25519 abc")
                .unwrap_err()
                .contains("depro keygen")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "not a key").unwrap();
        assert!(sign(&path, b"x").unwrap_err().contains("not a private key"));
    }
}
