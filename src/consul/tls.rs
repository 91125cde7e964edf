//! TLS to Consul: the CAs depro trusts and the client certificate it shows.
//!
//! depro compiles in no root certificates (Mozilla's list would cost the
//! static binary ~100 KB and age with it). It trusts the operator's CA
//! (`ca_file`, `CONSUL_CACERT`, `-ca-file`) when one is given, which is how
//! Consul's TLS is nearly always set up. Without one, it trusts the host's
//! own store, found the way Go's crypto/x509 (and so Consul's own CLI) finds
//! it: the file `SSL_CERT_FILE` names; else the first of the well-known
//! bundles that exists ([`BUNDLES`]: the `ca-certificates` package's
//! `/etc/ssl/certs/ca-certificates.crt` on Debian, Ubuntu and Alpine, its
//! counterparts elsewhere); else every file of the directories `SSL_CERT_DIR`
//! names (or of [`CERT_DIRS`]). A host with none of them gets an error that
//! says to give `ca_file` or install its CA bundle. The store is read when a
//! client is built: at start, and at each reload of the agent.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, ClientCert, PemItem, RootCerts, TlsConfig, parse_pem};

use super::ConsulSettings;
use super::x509::{self, KeyFormat, KeyMatch};

/// What a client's TLS was built from, beyond its settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsFacts {
    /// A digest of every file read (CA, certificate, key): a file renewed
    /// in place changes it, so a reload can tell.
    pub fingerprint: u64,
    /// The client certificate and when it expires (seconds since the epoch).
    pub client_cert: Option<(PathBuf, i64)>,
}

/// The CA bundles of Linux distributions, in the order Go looks for them.
pub(crate) const BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL 6
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/pki/tls/cacert.pem",            // OpenELEC
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", // CentOS, RHEL 7+
    "/etc/ssl/cert.pem",                  // Alpine, BSD-likes
];

/// Directories of single certificates, read when no bundle exists.
pub(crate) const CERT_DIRS: &[&str] = &["/etc/ssl/certs", "/etc/pki/tls/certs"];

/// The TLS configuration of a client built from `settings`, and what it was
/// built from. Refuses a client certificate that has expired, is not valid
/// yet, or whose key is not its own: Consul would refuse it (and the TLS
/// library would abort on the last).
pub(super) fn config(settings: &ConsulSettings) -> Result<(TlsConfig, TlsFacts), String> {
    let mut facts = TlsFacts::default();
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    let mut read = |path: &Path, what: &str| {
        let bytes = read(path, what)?;
        bytes.hash(&mut digest);
        Ok::<Vec<u8>, String>(bytes)
    };
    let mut builder = TlsConfig::builder().disable_verification(!settings.verify_tls);
    if let Some(ca) = &settings.ca_file {
        let pem = read(ca, "CA certificate (ca_file, CONSUL_CACERT)")?;
        let certs = certificates(&pem);
        if certs.is_empty() {
            return Err(format!(
                "{}: no PEM certificate found in the CA file",
                ca.display()
            ));
        }
        builder = builder.root_certs(RootCerts::new_with_certs(&certs));
    } else if settings.verify_tls {
        let store = HostStore::from_env();
        let certs = store.read()?;
        builder = builder.root_certs(RootCerts::new_with_certs(&certs));
    }
    match (&settings.cert_file, &settings.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let certs = certificates(&read(cert_path, "client certificate")?);
            if certs.is_empty() {
                return Err(format!("{}: no PEM certificate found", cert_path.display()));
            }
            let key_pem = read(key_path, "client key")?;
            let key = parse_pem(&key_pem)
                .find_map(|item| match item {
                    Ok(PemItem::PrivateKey(key)) => Some(key),
                    _ => None,
                })
                .ok_or_else(|| format!("{}: no PEM private key found", key_path.display()))?;
            let not_after = check_client_cert(cert_path, &certs[0], key_path, &key_pem, key.der())?;
            facts.client_cert = Some((cert_path.clone(), not_after));
            builder = builder.client_cert(Some(ClientCert::new_with_certs(&certs, key)));
        }
        (None, None) => {}
        _ => {
            return Err(
                "a client certificate needs both a certificate file and a key file \
                        (CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY)"
                    .into(),
            );
        }
    }
    facts.fingerprint = digest.finish();
    Ok((builder.build(), facts))
}

/// Checks a client certificate (its first certificate) and its key;
/// returns when the certificate expires.
fn check_client_cert(
    cert_path: &Path,
    cert: &Certificate<'_>,
    key_path: &Path,
    key_pem: &[u8],
    key_der: &[u8],
) -> Result<i64, String> {
    let facts = x509::cert_facts(cert.der()).ok_or_else(|| {
        format!(
            "{}: the client certificate cannot be read (not an X.509 certificate)",
            cert_path.display()
        )
    })?;
    if facts.version != 3 {
        return Err(format!(
            "{}: the client certificate is X.509 version {}, which TLS refuses; issue it as \
             version 3 (with extensions, as `consul tls cert create -client` does)",
            cert_path.display(),
            facts.version
        ));
    }
    if !facts.unknown_critical.is_empty() {
        return Err(format!(
            "{}: the client certificate has critical extensions TLS does not know ({}); issue \
             it without them",
            cert_path.display(),
            facts.unknown_critical.join(", ")
        ));
    }
    let now = now_secs();
    if now >= facts.not_after {
        return Err(format!(
            "{}: the client certificate expired at {}; renew it (Consul refuses an expired certificate)",
            cert_path.display(),
            date(facts.not_after)
        ));
    }
    if now < facts.not_before {
        return Err(format!(
            "{}: the client certificate is valid only from {}; is this host's clock right?",
            cert_path.display(),
            date(facts.not_before)
        ));
    }
    let matched = KeyFormat::of_pem(key_pem).map(|f| x509::key_matches(&facts, f, key_der));
    if matched == Some(KeyMatch::Mismatch) {
        return Err(format!(
            "{} does not belong to the client certificate {}: give the key the certificate was issued for",
            key_path.display(),
            cert_path.display()
        ));
    }
    Ok(facts.not_after)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A time in seconds since the epoch, as the log writes times.
pub(crate) fn date(secs: i64) -> String {
    crate::logging::timestamp_of(secs.max(0) as u64 * 1000)
}

/// What to fix, when a transport error `why` is a TLS refusal depro can
/// name (by either side; with the client certificate's facts).
pub(crate) fn trouble(why: &str, facts: &TlsFacts) -> Option<String> {
    let cert = facts.client_cert.as_ref();
    let alert = [
        "BadCertificate",
        "CertificateRequired",
        "CertificateExpired",
        "CertificateUnknown",
        "CertificateRevoked",
        "UnknownCA",
        "AccessDenied",
    ]
    .into_iter()
    .find(|alert| why.contains(alert));
    let broken = ["Broken pipe", "Connection reset"]
        .iter()
        .any(|sign| why.contains(sign));
    if let Some((path, not_after)) = cert
        && now_secs() >= *not_after
        && (alert.is_some() || broken)
    {
        return Some(format!(
            "the client certificate {} expired at {} ({why}); renew it: a renewal in place is \
             taken at the next reload (SIGHUP) or the next refusal",
            path.display(),
            date(*not_after)
        ));
    }
    if why.contains("invalid peer certificate") {
        return Some(if why.contains("UnknownIssuer") {
            format!(
                "Consul's certificate is not signed by a CA this client trusts ({why}); give \
                 the CA that signed it as ca_file (CONSUL_CACERT, -ca-file)"
            )
        } else if why.contains("Expired") {
            format!("Consul's certificate has expired ({why}); renew it on the Consul servers")
        } else if why.contains("NotValidFor") {
            format!(
                "Consul's certificate is not issued for the name in the address ({why}); use a \
                 name it was issued for (`consul tls` issues them for server.<dc>.consul and \
                 localhost)"
            )
        } else {
            format!("this client does not accept Consul's certificate ({why})")
        });
    }
    let alert = alert?;
    Some(match cert {
        None => format!(
            "Consul asks for a client certificate ({alert}): give cert_file and key_file \
             (CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY, -client-cert and -client-key)"
        ),
        Some((path, _)) => format!(
            "Consul refused the client certificate {} ({alert}): it must be signed by a CA that \
             Consul trusts (Consul's ca_file) and be valid now",
            path.display()
        ),
    })
}

/// A warning when the client certificate expires within `window`.
pub(crate) fn expiry_warning(facts: &TlsFacts, window: std::time::Duration) -> Option<String> {
    let (path, not_after) = facts.client_cert.as_ref()?;
    let left = not_after - now_secs();
    (left < window.as_secs() as i64).then(|| {
        format!(
            "{}: the client certificate expires at {} (in {}); renew it before then \
             (a renewal in place is picked up on SIGHUP, or when Consul refuses the old one)",
            path.display(),
            date(*not_after),
            crate::duration::human(std::time::Duration::from_secs(left.max(0) as u64))
        )
    })
}

/// TLS that trusts the host's store (SSL_CERT_FILE, the distributions'
/// bundles, SSL_CERT_DIR): for an artifact's origin.
pub(crate) fn host_store() -> Result<TlsConfig, String> {
    let certs = HostStore::from_env().read()?;
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&certs))
        .build())
}

/// Where the host keeps the CAs it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostStore {
    /// `SSL_CERT_FILE`: this bundle alone, instead of the well-known ones.
    pub file: Option<PathBuf>,
    /// `SSL_CERT_DIR` (colon-separated): these directories instead of [`CERT_DIRS`].
    pub dirs: Option<Vec<PathBuf>>,
    pub bundles: Vec<PathBuf>,
    pub default_dirs: Vec<PathBuf>,
}

impl HostStore {
    fn from_env() -> HostStore {
        let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        HostStore {
            file: env("SSL_CERT_FILE").map(PathBuf::from),
            dirs: env("SSL_CERT_DIR").map(|dirs| std::env::split_paths(&dirs).collect()),
            bundles: BUNDLES.iter().map(PathBuf::from).collect(),
            default_dirs: CERT_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// The certificates of the store, or why there are none.
    pub(crate) fn read(&self) -> Result<Vec<Certificate<'static>>, String> {
        if let Some(file) = &self.file {
            let certs = std::fs::read(file)
                .map_err(|e| e.to_string())
                .map(|pem| certificates(&pem));
            return match certs {
                Ok(certs) if !certs.is_empty() => Ok(certs),
                Ok(_) => Err("no PEM certificate in it".to_string()),
                Err(e) => Err(format!("cannot read it: {e}")),
            }
            .map_err(|why| {
                format!(
                    "{}, the CA bundle SSL_CERT_FILE names: {why}; fix or unset SSL_CERT_FILE",
                    file.display()
                )
            });
        }
        for bundle in &self.bundles {
            if let Ok(pem) = std::fs::read(bundle) {
                let certs = certificates(&pem);
                if !certs.is_empty() {
                    return Ok(certs);
                }
            }
        }
        let dirs = self.dirs.as_ref().unwrap_or(&self.default_dirs);
        let certs: Vec<_> = dirs.iter().flat_map(|dir| certificates_in(dir)).collect();
        if !certs.is_empty() {
            return Ok(certs);
        }
        Err(format!(
            "no CA certificates to check Consul's with: give the CA that signed it as \
             ca_file (CONSUL_CACERT, -ca-file), or install the host's CA bundle \
             (package ca-certificates: {}) or name one with SSL_CERT_FILE",
            BUNDLES[0]
        ))
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read the {what}: {e}", path.display()))
}

fn certificates(pem: &[u8]) -> Vec<Certificate<'static>> {
    parse_pem(pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect()
}

/// The certificates of every readable file in `dir`, in name order.
fn certificates_in(dir: &Path) -> Vec<Certificate<'static>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .flat_map(|pem| certificates(&pem))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A self-signed CA certificate (`openssl req -x509 -newkey ec ...`).
    const CA_ONE: &str = "-----BEGIN CERTIFICATE-----
MIIBhTCCASugAwIBAgIUUMdKAjdAJjZ8Kq9Mqv+TLE8mbqAwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNZGVwcm8tdGVzdC1jYTAeFw0yNjEyMDcwMjEwNDNaFw0zNjEy
MDQwMjEwNDNaMBgxFjAUBgNVBAMMDWRlcHJvLXRlc3QtY2EwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAS/DaDx+b6pNhRGN7y0KxQRxiVXMH46Vo+dkvauGjV8Cq86
ne02QKQTCLkk0iaNU0JeWhh5sSRo0AMIvhcimxwdo1MwUTAdBgNVHQ4EFgQUt7UV
zq2NxNv9YjTyD/3+EzzKUp0wHwYDVR0jBBgwFoAUt7UVzq2NxNv9YjTyD/3+EzzK
Up0wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiAJGK8DPAYM0vTO
tTXVbkz7G0ajH1ux3Z2CbICbsIbrQAIhAP2LQL/1DHkRwIJHnU1pF8gGtH+EpNZA
t2mZCIyUEMTS
-----END CERTIFICATE-----
";

    fn store(dir: &Path) -> HostStore {
        HostStore {
            file: None,
            dirs: None,
            bundles: vec![dir.join("missing.crt"), dir.join("bundle.crt")],
            default_dirs: vec![dir.join("certs")],
        }
    }

    #[test]
    fn the_first_well_known_bundle_that_exists_is_the_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.crt"), CA_ONE.repeat(2)).unwrap();
        assert_eq!(store(dir.path()).read().unwrap().len(), 2);
    }

    #[test]
    fn ssl_cert_file_replaces_the_well_known_bundles_and_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.crt"), CA_ONE.repeat(2)).unwrap();
        std::fs::write(dir.path().join("mine.pem"), CA_ONE).unwrap();
        let mut store = store(dir.path());
        store.file = Some(dir.path().join("mine.pem"));
        assert_eq!(store.read().unwrap().len(), 1);
        std::fs::write(dir.path().join("mine.pem"), "not a certificate").unwrap();
        let why = store.read().unwrap_err();
        assert!(
            why.contains("mine.pem, the CA bundle SSL_CERT_FILE names: no PEM"),
            "{why}"
        );
        store.file = Some(dir.path().join("absent.pem"));
        let why = store.read().unwrap_err();
        assert!(
            why.contains("absent.pem, the CA bundle SSL_CERT_FILE names: cannot read"),
            "{why}"
        );
    }

    #[test]
    fn without_a_bundle_the_certificate_directories_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("a.pem"), CA_ONE).unwrap();
        std::fs::write(certs.join("b.pem"), CA_ONE).unwrap();
        std::fs::write(certs.join("README"), "no certificate here").unwrap();
        assert_eq!(store(dir.path()).read().unwrap().len(), 2);
        let mut store = store(dir.path());
        store.dirs = Some(vec![dir.path().join("elsewhere")]);
        assert!(store.read().is_err());
    }

    #[test]
    fn a_host_without_any_store_is_told_to_give_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let why = store(dir.path()).read().unwrap_err();
        assert!(!why.contains('\n'), "{why}");
        for hint in [
            "ca_file",
            "CONSUL_CACERT",
            "ca-certificates",
            "SSL_CERT_FILE",
        ] {
            assert!(why.contains(hint), "{hint} missing: {why}");
        }
    }
}
