//! TLS to Consul with client certificates: a key that is not the
//! certificate's, a certificate out of its validity, and a certificate
//! renewed in place. Real agents and CLI against a real Consul that
//! requires client certificates (`verify_incoming`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Agent, Consul, free_port, wait_for};

/// An https Consul that requires client certificates, with its CA and two
/// client certificates (`client0`, `client1`) made by `consul tls`.
struct TlsBed {
    dir: tempfile::TempDir,
    consul: Consul,
    server: String,
}

impl TlsBed {
    fn start() -> TlsBed {
        let dir = tempfile::tempdir().unwrap();
        let tls = |args: &[&str]| {
            let out = Command::new(support::consul_bin())
                .arg("tls")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        tls(&["ca", "create"]);
        tls(&["cert", "create", "-server", "-dc", "dc1"]);
        tls(&["cert", "create", "-client", "-dc", "dc1"]);
        tls(&["cert", "create", "-client", "-dc", "dc1"]);
        let file = |name: &str| dir.path().join(name).display().to_string();
        let https = free_port();
        let consul = Consul::start_with(&format!(
            "ports {{ https = {https} }}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nverify_incoming = true",
            file("consul-agent-ca.pem"),
            file("dc1-server-consul-0.pem"),
            file("dc1-server-consul-0-key.pem"),
        ));
        TlsBed {
            dir,
            consul,
            server: format!("https://127.0.0.1:{https}"),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> String {
        self.file("consul-agent-ca.pem").display().to_string()
    }

    fn cert(&self, n: usize) -> PathBuf {
        self.file(&format!("dc1-client-consul-{n}.pem"))
    }

    fn key(&self, n: usize) -> PathBuf {
        self.file(&format!("dc1-client-consul-{n}-key.pem"))
    }

    /// An agent whose TLS files are copies of client `n`'s, in its own
    /// directory (so that a test can renew them in place).
    fn agent(&self, root: &Path, name: &str, prefix: &str, n: usize) -> Agent {
        let mut agent = Agent::new(root, name, &self.server, prefix);
        let cert = agent.dir.join("client.pem");
        let key = agent.dir.join("client-key.pem");
        std::fs::copy(self.cert(n), &cert).unwrap();
        std::fs::copy(self.key(n), &key).unwrap();
        agent.extra = serde_json::json!({
            "ca_file": self.ca(),
            "cert_file": cert,
            "key_file": key,
        });
        agent
    }

    fn status(&self, prefix: &str, cert: &Path, key: &Path) -> support::Output {
        let out = support::depro_command(&self.server, &["status", &format!("-prefix={prefix}")])
            .arg(format!("-ca-file={}", self.ca()))
            .arg(format!("-client-cert={}", cert.display()))
            .arg(format!("-client-key={}", key.display()))
            .output()
            .unwrap();
        support::Output::of(out)
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

fn registrations(agent: &Agent) -> usize {
    agent.log().matches("registered with Consul").count()
}

#[test]
fn a_client_key_that_is_not_the_certificates_is_refused_in_one_line_everywhere() {
    let bed = TlsBed::start();
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("mismatch");
    let (cert, wrong_key) = (bed.cert(0), bed.key(1));
    let expect_about = |text: &str, cert: &Path, key: &Path| {
        for needle in [
            key.display().to_string(),
            cert.display().to_string(),
            "does not belong to the client certificate".into(),
        ] {
            assert!(text.contains(&needle), "{needle:?} missing: {text}");
        }
        assert!(!text.contains("panicked"), "{text}");
    };

    // The CLI.
    let out = bed.status(&prefix, &cert, &wrong_key);
    assert_eq!(out.code, Some(1), "{out:#?}");
    expect_about(out.error(), &cert, &wrong_key);

    // `agent -check`, and an agent starting with it.
    let mut agent = bed.agent(root.path(), "node1", &prefix, 0);
    let (agent_cert, agent_key) = (
        agent.dir.join("client.pem"),
        agent.dir.join("client-key.pem"),
    );
    let expect = |text: &str| expect_about(text, &agent_cert, &agent_key);
    std::fs::copy(&wrong_key, &agent_key).unwrap();
    agent.write_config();
    let check = Command::new(support::depro_bin())
        .args(["agent", "-check"])
        .arg(format!("-config-dir={}", agent.dir.join("conf").display()))
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    expect(&String::from_utf8_lossy(&check.stderr));
    agent.start();
    assert_eq!(agent.wait_exit(), Some(1));
    expect(&agent.log());

    // A running agent given such a key by a reload keeps its configuration.
    std::fs::copy(bed.key(0), agent.dir.join("client-key.pem")).unwrap();
    agent.start();
    wait_for("the agent to register", || registrations(&agent) == 1);
    std::fs::copy(&wrong_key, agent.dir.join("client-key.pem")).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the reload to be refused", || {
        agent.log().contains("keeping the running configuration")
    });
    assert!(agent.is_running());
    bed.consul.add_version(&prefix, "v1");
    bed.consul.put(&format!("{prefix}/current"), "v1");
    wait_for("v1 active with the running configuration", || {
        bed.consul.get(&format!("{prefix}/v1/node1")).as_deref() == Some("active")
    });
}

#[test]
fn a_certificate_out_of_its_validity_or_of_version_1_is_refused_by_agent_check_saying_so() {
    let root = tempfile::tempdir().unwrap();
    for (cert, needle) in [
        ("ec-expired.crt", "expired at 2021-01-01"),
        ("ec-future.crt", "valid only from 2036-01-01"),
        ("ec-v1.crt", "X.509 version 1, which TLS refuses"),
    ] {
        let mut agent = Agent::new(root.path(), cert, "https://127.0.0.1:1", "p/version");
        agent.extra = serde_json::json!({
            "cert_file": data(cert),
            "key_file": data("ec.key"),
        });
        agent.write_config();
        let check = Command::new(support::depro_bin())
            .args(["agent", "-check"])
            .arg(format!("-config-dir={}", agent.dir.join("conf").display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} missing: {stderr}");
        assert!(stderr.contains(cert), "{stderr}");
    }
}

#[test]
fn a_client_certificate_renewed_in_place_is_taken_on_sighup() {
    let bed = TlsBed::start();
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("renewed");
    let mut agent = bed.agent(root.path(), "node1", &prefix, 0);
    agent.start();
    wait_for("the agent to register", || registrations(&agent) == 1);
    // What cert tools do: new files over the old paths, then SIGHUP.
    std::fs::copy(bed.cert(1), agent.dir.join("client.pem")).unwrap();
    std::fs::copy(bed.key(1), agent.dir.join("client-key.pem")).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    // The agent reconnects with the new files: a new session.
    wait_for("the agent to register again", || registrations(&agent) == 2);
    bed.consul.add_version(&prefix, "v1");
    bed.consul.put(&format!("{prefix}/current"), "v1");
    wait_for("v1 active with the renewed certificate", || {
        bed.consul.get(&format!("{prefix}/v1/node1")).as_deref() == Some("active")
    });
}

#[test]
fn each_refused_handshake_says_what_to_fix() {
    let bed = TlsBed::start();
    let prefix = support::unique_prefix("refused");
    let status = |extra: &[String]| {
        let out = support::depro_command(&bed.server, &["status", &format!("-prefix={prefix}")])
            .args(extra)
            .output()
            .unwrap();
        support::Output::of(out)
    };
    // No client certificate, where Consul requires one.
    let out = status(&[format!("-ca-file={}", bed.ca())]);
    assert_eq!(out.code, Some(4), "{out:#?}");
    assert!(
        out.error().contains("give cert_file and key_file"),
        "{out:#?}"
    );
    // A client certificate of a CA Consul does not trust.
    let other = tempfile::tempdir().unwrap();
    for args in [
        &["ca", "create", "-domain", "elsewhere"][..],
        &[
            "cert",
            "create",
            "-client",
            "-dc",
            "dc1",
            "-domain",
            "elsewhere",
            "-ca",
            "elsewhere-agent-ca.pem",
            "-key",
            "elsewhere-agent-ca-key.pem",
        ][..],
    ] {
        let made = Command::new(support::consul_bin())
            .arg("tls")
            .args(args)
            .current_dir(other.path())
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let cert = other.path().join("dc1-client-elsewhere-0.pem");
    let key = other.path().join("dc1-client-elsewhere-0-key.pem");
    let out = bed.status(&prefix, &cert, &key);
    assert_eq!(out.code, Some(4), "{out:#?}");
    assert!(
        out.error().contains(&format!(
            "Consul refused the client certificate {}",
            cert.display()
        )),
        "{out:#?}"
    );
    // A CA that did not sign Consul's certificate.
    let out = support::depro_command(&bed.server, &["status", &format!("-prefix={prefix}")])
        .arg(format!(
            "-ca-file={}",
            other.path().join("elsewhere-agent-ca.pem").display()
        ))
        .output()
        .unwrap();
    let out = support::Output::of(out);
    assert!(
        out.error()
            .contains("is not signed by a CA this client trusts"),
        "{out:#?}"
    );
    // Plain http to the https port.
    let plain = bed.server.replace("https://", "http://");
    let out = support::depro_command(&plain, &["status", &format!("-prefix={prefix}")])
        .output()
        .unwrap();
    let out = support::Output::of(out);
    assert!(
        out.error()
            .contains(&format!("that port speaks https: use {}", bed.server)),
        "{out:#?}"
    );
}

/// A client certificate signed by the bed's CA that expires `seconds`
/// from now (`openssl ca`, which `consul tls` cannot do), and its key.
fn short_lived(bed: &TlsBed, seconds: u64) -> (PathBuf, PathBuf) {
    let dir = bed.file("short");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} (scripts/test.sh installs it): {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + seconds;
    let end = run("date", &["-u", "-d", &format!("@{end}"), "+%Y%m%d%H%M%SZ"]);
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "01\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nserial=serial\nnew_certs_dir=.\n\
         policy=p\ndefault_md=sha256\n[p]\ncommonName=supplied\n\
         [ext]\nbasicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(
        "openssl",
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "short-key.pem",
        ],
    );
    run(
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            "short-key.pem",
            "-subj",
            "/CN=short",
            "-out",
            "short.csr",
        ],
    );
    let ca = bed.ca();
    let ca_key = bed.file("consul-agent-ca-key.pem").display().to_string();
    run(
        "openssl",
        &[
            "ca",
            "-config",
            "ca.cnf",
            "-extensions",
            "ext",
            "-batch",
            "-notext",
            "-cert",
            &ca,
            "-keyfile",
            &ca_key,
            "-in",
            "short.csr",
            "-out",
            "short.pem",
            "-enddate",
            &end,
        ],
    );
    (dir.join("short.pem"), dir.join("short-key.pem"))
}

#[test]
fn an_expired_client_certificate_is_named_and_one_renewed_in_place_is_taken_without_sighup() {
    let bed = TlsBed::start();
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("expiring");
    let mut agent = bed.agent(root.path(), "node1", &prefix, 0);
    let (short, short_key) = short_lived(&bed, 15);
    std::fs::copy(&short, agent.dir.join("client.pem")).unwrap();
    std::fs::copy(&short_key, agent.dir.join("client-key.pem")).unwrap();
    agent.start();
    support::wait_for_within(
        std::time::Duration::from_secs(10),
        "the agent to register",
        &mut || registrations(&agent) == 1,
        || agent.log(),
    );
    bed.consul.add_version(&prefix, "v1");
    bed.consul.put(&format!("{prefix}/current"), "v1");
    wait_for("v1 active", || {
        bed.consul.get(&format!("{prefix}/v1/node1")).as_deref() == Some("active")
    });
    // It expires soon: the start said so.
    assert!(
        agent.log().contains("the client certificate expires at"),
        "{}",
        agent.log()
    );

    // Left to expire. Connections made before go on (TLS checks a
    // certificate at the handshake only): Consul restarting makes the agent
    // connect anew, and Consul refuses it; the agent says which and why.
    let valid_until = std::time::Instant::now() + std::time::Duration::from_secs(16);
    while std::time::Instant::now() < valid_until {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    bed.consul.restart();
    let cert = agent.dir.join("client.pem").display().to_string();
    support::wait_for_within(
        std::time::Duration::from_secs(60),
        "the expired certificate to be named",
        &mut || {
            agent
                .log()
                .contains(&format!("the client certificate {cert} expired at"))
        },
        || agent.log(),
    );

    // Renewed in place, without SIGHUP (a cert tool that sends none): the
    // next refusal makes the agent read its files again.
    std::fs::copy(bed.cert(1), agent.dir.join("client.pem")).unwrap();
    std::fs::copy(bed.key(1), agent.dir.join("client-key.pem")).unwrap();
    wait_for("the agent to reconnect with the renewed files", || {
        agent.log().contains("reconnecting with the new ones")
    });
    bed.consul.add_version(&prefix, "v2");
    bed.consul.put(&format!("{prefix}/current"), "v2");
    wait_for("v2 active with the renewed certificate", || {
        bed.consul.get(&format!("{prefix}/v2/node1")).as_deref() == Some("active")
    });
}
