//! ACL tokens and TLS against a real Consul: the agent works with the right
//! credentials, says clearly what is wrong with bad ones, and never prints
//! a token.

mod support;

use std::process::Command;

use support::{Agent, Consul, free_port, wait_for};

const MASTER: &str = "6f2d1c3e-0b1a-4c55-9d3e-7a1b2c3d4e5f";

fn acl_consul() -> Consul {
    let consul = Consul::start_with(&format!(
        r#"primary_datacenter = "dc1"
acl {{ enabled = true
  default_policy = "deny"
  tokens {{ master = "{MASTER}" agent = "{MASTER}" }} }}"#
    ));
    *consul.token.lock().unwrap() = Some(MASTER.to_string());
    consul
}

/// Creates a token that may write under `prefix/` and make sessions.
fn token_for(consul: &Consul, prefix: &str) -> String {
    let rules = format!(
        "key_prefix \"{prefix}/\" {{ policy = \"write\" }}\nsession_prefix \"\" {{ policy = \"write\" }}\nnode_prefix \"\" {{ policy = \"read\" }}"
    );
    token_with(
        consul,
        &format!("depro-{}", prefix.replace('/', "-")),
        &rules,
    )
}

/// Creates a token with a policy of these rules.
fn token_with(consul: &Consul, name: &str, rules: &str) -> String {
    let policy = serde_json::json!({"Name": name, "Rules": rules});
    consul.call("PUT", "acl/policy", Some(policy.to_string().as_bytes()));
    let body = serde_json::json!({"Policies": [{"Name": policy["Name"]}]});
    let created: serde_json::Value =
        serde_json::from_str(&consul.call("PUT", "acl/token", Some(body.to_string().as_bytes())))
            .unwrap();
    created["SecretID"].as_str().unwrap().to_string()
}

#[test]
fn with_acls_a_good_token_works_and_a_bad_one_is_reported_without_showing_it() {
    let consul = acl_consul();
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("acl");
    let token = token_for(&consul, &prefix);

    // The good agent gets its token from the environment; the bad one from its config.
    let mut good = Agent::new(root.path(), "good", &consul.addr(), &prefix);
    good.env.push(("CONSUL_HTTP_TOKEN".into(), token.clone()));
    good.start();

    let mut bad = Agent::new(root.path(), "bad", &consul.addr(), &prefix);
    bad.extra = serde_json::json!({"token": "bogus-s3cr3t-token"});
    bad.start();

    consul.add_version(&prefix, "v1");
    wait_for("the good agent to report v1 ready", || {
        consul.get(&format!("{prefix}/v1/good")).as_deref() == Some("ready")
    });
    wait_for("the bad agent to report the denial", || {
        bad.log().contains("check the ACL token")
    });
    assert!(bad.log().contains("denied"), "{}", bad.log());
    assert_eq!(consul.get(&format!("{prefix}/v1/bad")), None);
    // A token file works too (and wins over nothing else here).
    let mut filed = Agent::new(root.path(), "filed", &consul.addr(), &prefix);
    let token_file = filed.dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    filed.extra = serde_json::json!({"token_file": token_file});
    filed.start();
    wait_for("the token-file agent to report v1 ready", || {
        consul.get(&format!("{prefix}/v1/filed")).as_deref() == Some("ready")
    });
    assert!(
        !bad.log().contains("bogus-s3cr3t-token"),
        "the token leaked: {}",
        bad.log()
    );
    assert!(
        !good.log().contains(&token),
        "the token leaked: {}",
        good.log()
    );
    // Denials are logged once at warning level, not once per retry.
    let denials = |level: &str| {
        bad.log()
            .lines()
            .filter(|l| l.contains(level) && l.contains("check the ACL token"))
            .count()
    };
    wait_for("several retries", || denials("DEBUG") >= 3);
    assert_eq!(denials("WARN"), 1, "{}", bad.log());
}

#[test]
fn a_switch_the_acl_denies_is_reported_as_a_denial_with_exit_4_not_as_a_lost_race() {
    let consul = acl_consul();
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("acl-switch");
    let mut agent = Agent::new(root.path(), "node1", &consul.addr(), &prefix);
    agent
        .env
        .push(("CONSUL_HTTP_TOKEN".into(), token_for(&consul, &prefix)));
    agent.start();
    // This operator may add versions but not move current.
    let operator = token_with(
        &consul,
        "no-switch",
        &format!(
            "key_prefix \"{prefix}/\" {{ policy = \"write\" }}\nkey \"{prefix}/current\" {{ policy = \"read\" }}"
        ),
    );
    let out = support::depro_command(&consul.addr(), &["deploy", "v1", "-timeout=30s"])
        .arg(format!("-prefix={prefix}"))
        .env("CONSUL_HTTP_TOKEN", &operator)
        .output()
        .unwrap();
    let out = support::Output::of(out);
    out.fails(4, &["denied", "current", "ACL"]);
    assert!(
        !out.stderr.contains(&operator),
        "the token leaked: {out:#?}"
    );
    assert_eq!(consul.get(&format!("{prefix}/current")), None);
}

#[test]
fn over_https_with_a_custom_ca_and_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let tls = |args: &[&str]| {
        let status = Command::new(support::consul_bin())
            .args(["tls"])
            .args(args)
            .current_dir(certs.path())
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
    };
    tls(&["ca", "create"]);
    tls(&["cert", "create", "-server", "-dc", "dc1"]);
    tls(&["cert", "create", "-client", "-dc", "dc1"]);
    let file = |name: &str| certs.path().join(name).display().to_string();
    let https = free_port();
    let consul = Consul::start_with(&format!(
        r#"ports {{ https = {https} }}
ca_file = "{}"
cert_file = "{}"
key_file = "{}"
verify_incoming = true"#,
        file("consul-agent-ca.pem"),
        file("dc1-server-consul-0.pem"),
        file("dc1-server-consul-0-key.pem"),
    ));
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("tls");
    let server = format!("https://127.0.0.1:{https}");

    let mut agent = Agent::new(root.path(), "secure", &server, &prefix);
    agent.extra = serde_json::json!({
        "ca_file": file("consul-agent-ca.pem"),
        "cert_file": file("dc1-client-consul-0.pem"),
        "key_file": file("dc1-client-consul-0-key.pem"),
    });
    agent.start();

    // No ca_file: the host's trust store is used, as for a Consul whose
    // certificate a public CA signed (SSL_CERT_FILE stands in for the
    // host's bundle, which the test may not change).
    let mut public = Agent::new(root.path(), "public", &server, &prefix);
    public.extra = serde_json::json!({
        "cert_file": file("dc1-client-consul-0.pem"),
        "key_file": file("dc1-client-consul-0-key.pem"),
    });
    public
        .env
        .push(("SSL_CERT_FILE".into(), file("consul-agent-ca.pem")));
    public.start();

    // Without a client certificate, Consul refuses the handshake.
    let mut anonymous = Agent::new(root.path(), "anonymous", &server, &prefix);
    anonymous.extra = serde_json::json!({"ca_file": file("consul-agent-ca.pem")});
    anonymous.start();

    consul.add_version(&prefix, "v1");
    consul.put(&format!("{prefix}/current"), "v1");
    wait_for("v1 active over https", || {
        consul.get(&format!("{prefix}/v1/secure")).as_deref() == Some("active")
            && consul.get(&format!("{prefix}/v1/public")).as_deref() == Some("active")
    });
    wait_for("the handshake failure to be logged", || {
        anonymous
            .log()
            .contains("Consul asks for a client certificate")
    });
    assert_eq!(consul.get(&format!("{prefix}/v1/anonymous")), None);

    // The CLI over https, with the TLS settings as flags and from the environment.
    let status = || support::depro_command(&server, &["status", &format!("-prefix={prefix}")]);
    let out = status()
        .arg(format!("-ca-file={}", file("consul-agent-ca.pem")))
        .arg(format!("-client-cert={}", file("dc1-client-consul-0.pem")))
        .arg(format!(
            "-client-key={}",
            file("dc1-client-consul-0-key.pem")
        ))
        .output()
        .unwrap();
    let stdout = support::Output::of(out).ok().to_string();
    assert!(
        stdout.contains("secure") && stdout.contains("active"),
        "{stdout}"
    );
    let out = status()
        .env("CONSUL_CACERT", file("consul-agent-ca.pem"))
        .env("CONSUL_CLIENT_CERT", file("dc1-client-consul-0.pem"))
        .env("CONSUL_CLIENT_KEY", file("dc1-client-consul-0-key.pem"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No -ca-file: the host's store decides (SSL_CERT_FILE here); a store
    // without Consul's CA is refused, and depro trusts no CA of its own.
    let with_host_store = |bundle: &str| {
        status()
            .arg(format!("-client-cert={}", file("dc1-client-consul-0.pem")))
            .arg(format!(
                "-client-key={}",
                file("dc1-client-consul-0-key.pem")
            ))
            .env("SSL_CERT_FILE", bundle)
            .output()
            .unwrap()
    };
    let out = with_host_store(&file("consul-agent-ca.pem"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tls(&["ca", "create", "-domain", "elsewhere"]);
    let out = support::Output::of(with_host_store(&file("elsewhere-agent-ca.pem")));
    out.fails(4, &["UnknownIssuer"]);
    // Without the client certificate: exit 4, and the reason.
    let out = status()
        .arg(format!("-ca-file={}", file("consul-agent-ca.pem")))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The policies docs/protocol.md documents (the test Consul's node is "dev").
fn agent_policy(prefix: &str) -> String {
    format!(
        "key_prefix \"{prefix}/\" {{ policy = \"write\" }}\nsession \"dev\" {{ policy = \"write\" }}"
    )
}

fn cli_policy(prefix: &str) -> String {
    format!(
        "key_prefix \"{prefix}/\" {{ policy = \"write\" }}\nsession_prefix \"\" {{ policy = \"read\" }}"
    )
}

#[test]
fn the_documented_least_privilege_policies_are_enough_and_less_is_reported_as_denied() {
    let consul = acl_consul();
    let mut fleet = support::Fleet::on(&consul, 2);
    let prefix = fleet.prefix.clone();
    let agent_token = token_with(&consul, "least-agent", &agent_policy(&prefix));
    let cli_token = token_with(&consul, "least-cli", &cli_policy(&prefix));
    for agent in &mut fleet.agents {
        agent
            .env
            .push(("CONSUL_HTTP_TOKEN".into(), agent_token.clone()));
    }
    fleet.start_all();
    let cli = |args: &[&str]| {
        let out = fleet
            .depro_command(args)
            .env("CONSUL_HTTP_TOKEN", &cli_token)
            .output()
            .unwrap();
        support::Output::of(out)
    };
    cli(&["deploy", "v1", "-nodes=2"]).ok();
    cli(&["deploy", "v2", "-nodes=2"]).ok();
    cli(&["rollback", "-nodes=2"]).ok();
    cli(&["rollout", "v2", "-nodes=2"]).ok();
    // Waves, a policy, a pause: the driver's claim needs a session the
    // least CLI token may not create; the rollout goes on without it, said.
    cli(&["policy", "-nodes=2"]).ok();
    cli(&["deploy", "v3", "-no-rollout"]).ok();
    let waves = cli(&["rollout", "v3", "-canary=1"]);
    assert!(
        waves
            .ok()
            .contains("the ACL token may not create sessions: no claim on"),
        "{waves:#?}"
    );
    cli(&["rollout", "v2"]).ok();
    let removed = cli(&["remove", "v1", "-wait"]);
    assert!(removed.ok().contains("purged from 2 nodes"), "{removed:#?}");
    cli(&["status"]).ok();
    fleet.expect_active("v2");

    // An agent whose token may not make sessions says so.
    let root = tempfile::tempdir().unwrap();
    let keys_only = token_with(
        &consul,
        "keys-only",
        &format!("key_prefix \"{prefix}/\" {{ policy = \"write\" }}"),
    );
    let mut sessionless = Agent::new(root.path(), "sessionless", &consul.addr(), &prefix);
    sessionless
        .env
        .push(("CONSUL_HTTP_TOKEN".into(), keys_only.clone()));
    sessionless.start();
    wait_for("the session denial", || {
        let log = sessionless.log();
        log.contains("denied creating a session") && log.contains("check the ACL token")
    });
    assert!(!sessionless.log().contains(&keys_only));
    // A CLI token that may only read: exit 4, the denial named.
    let reader = token_with(
        &consul,
        "reader",
        &format!("key_prefix \"{prefix}/\" {{ policy = \"read\" }}"),
    );
    let out = fleet
        .depro_command(&["deploy", "v3"])
        .env("CONSUL_HTTP_TOKEN", &reader)
        .output()
        .unwrap();
    support::Output::of(out).fails(4, &["denied", "v3"]);
}

#[test]
fn a_token_that_may_not_read_the_prefix_gets_exit_4_not_nothing_under_the_prefix() {
    let consul = acl_consul();
    let prefix = support::unique_prefix("acl");
    // Something is there, and this token may read nothing of it.
    consul.put(&format!("{prefix}/current"), "v1");
    let blind = token_with(
        &consul,
        "blind",
        "session_prefix \"\" { policy = \"read\" }",
    );
    let out = support::Output::of(
        support::depro_command(&consul.addr(), &["status", &format!("-prefix={prefix}")])
            .arg(format!("-token={blind}"))
            .output()
            .unwrap(),
    );
    out.fails(4, &["denied", "ACL token"]);
    assert!(!out.stderr.contains(&blind), "the token was printed");
    // An empty prefix the token may read is still "nothing under" (exit 2).
    let reader = token_for(&consul, "other/version");
    let out = support::Output::of(
        support::depro_command(&consul.addr(), &["status", "-prefix=other/version"])
            .arg(format!("-token={reader}"))
            .output()
            .unwrap(),
    );
    out.fails(2, &["nothing under other/version"]);
}

#[test]
fn a_token_file_rewritten_by_a_secrets_agent_without_sighup_is_taken_at_the_next_denial() {
    let consul = acl_consul();
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("rotated");
    let old = token_for(&consul, &prefix);
    let mut agent = Agent::new(root.path(), "node1", &consul.addr(), &prefix);
    let token_file = agent.dir.join("token");
    std::fs::write(&token_file, &old).unwrap();
    agent.extra = serde_json::json!({"token_file": token_file});
    agent.start();
    consul.add_version(&prefix, "v1");
    consul.put(&format!("{prefix}/current"), "v1");
    wait_for("v1 active", || {
        consul.get(&format!("{prefix}/v1/node1")).as_deref() == Some("active")
    });
    // What a secrets agent does: a new token in the file, the old one
    // revoked, and no signal.
    let new = token_with(
        &consul,
        "rotated-2",
        &format!(
            "key_prefix \"{prefix}/\" {{ policy = \"write\" }}\nsession_prefix \"\" {{ policy = \"write\" }}\nnode_prefix \"\" {{ policy = \"read\" }}"
        ),
    );
    std::fs::write(&token_file, &new).unwrap();
    // The old token's accessor, read with the old token itself.
    let master = consul.token.lock().unwrap().replace(old.clone());
    let me: serde_json::Value =
        serde_json::from_str(&consul.call("GET", "acl/token/self", None)).unwrap();
    *consul.token.lock().unwrap() = master;
    let id = me["AccessorID"].as_str().unwrap();
    consul.call("DELETE", &format!("acl/token/{id}"), None);
    wait_for("the agent to reconnect with the new token", || {
        agent.log().contains("reconnecting with the new ones")
    });
    consul.add_version(&prefix, "v2");
    consul.put(&format!("{prefix}/current"), "v2");
    wait_for("v2 active with the new token", || {
        consul.get(&format!("{prefix}/v2/node1")).as_deref() == Some("active")
    });
    assert!(!agent.log().contains(&old) && !agent.log().contains(&new));
}

/// Replaces the rules of the policy named `name`.
fn set_rules(consul: &Consul, name: &str, rules: &str) {
    let policy: serde_json::Value =
        serde_json::from_str(&consul.call("GET", &format!("acl/policy/name/{name}"), None))
            .unwrap();
    let id = policy["ID"].as_str().unwrap();
    let body = serde_json::json!({"ID": id, "Name": name, "Rules": rules});
    consul.call(
        "PUT",
        &format!("acl/policy/{id}"),
        Some(body.to_string().as_bytes()),
    );
}

#[test]
fn a_version_the_agents_token_may_no_longer_read_is_kept_as_it_is_not_cleaned() {
    let consul = acl_consul();
    let root = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("hidden");
    let rules = |deny_v1: bool| {
        let deny = if deny_v1 {
            format!("key_prefix \"{prefix}/v1/\" {{ policy = \"deny\" }}\n")
        } else {
            String::new()
        };
        format!(
            "key_prefix \"{prefix}/\" {{ policy = \"write\" }}\n{deny}session_prefix \"\" {{ policy = \"write\" }}\nnode_prefix \"\" {{ policy = \"read\" }}"
        )
    };
    let token = token_with(&consul, "hidden-agent", &rules(false));
    let mut agent = Agent::new(root.path(), "node1", &consul.addr(), &prefix);
    agent.env.push(("CONSUL_HTTP_TOKEN".into(), token));
    // Whole reads often, as for a tool that does not ring the doorbell.
    agent.extra = serde_json::json!({"rescan_interval": "1s"});
    agent.start();
    for version in ["v1", "v2"] {
        consul.add_version(&prefix, version);
        consul.put(&format!("{prefix}/current"), version);
        wait_for(&format!("{version} active"), || {
            consul.get(&format!("{prefix}/{version}/node1")).as_deref() == Some("active")
        });
    }
    // The token loses v1: Consul leaves v1 out of its listings from now on.
    set_rules(&consul, "hidden-agent", &rules(true));
    support::wait_for_within(
        std::time::Duration::from_secs(20),
        "the agent to notice it cannot tell v1 is gone",
        &mut || {
            agent
                .log()
                .contains("v1 is gone from the listing, but Consul denies")
        },
        || agent.log(),
    );
    // It keeps v1 as it is: its directory, and its key (which it could not
    // have deleted).
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(agent.version_dirs("api").contains(&"v1".to_string()));
    assert_eq!(
        consul.get(&format!("{prefix}/v1/node1")).as_deref(),
        Some("ready")
    );
    assert!(
        !agent.hooks_log().iter().any(|l| l == "clean v1"),
        "{:?}",
        agent.hooks_log()
    );
    // Restored: nothing was lost, nothing to redeploy.
    set_rules(&consul, "hidden-agent", &rules(false));
    let out = support::depro_command(
        &consul.addr(),
        &["rollout", "v1", &format!("-prefix={prefix}"), "-nodes=1"],
    )
    .env("CONSUL_HTTP_TOKEN", MASTER)
    .output()
    .unwrap();
    assert_eq!(support::Output::of(out).code, Some(0));
    assert_eq!(agent.live("api").as_deref(), Some("v1"));
    assert_eq!(
        agent
            .hooks_log()
            .iter()
            .filter(|l| l.starts_with("deploy v1"))
            .count(),
        1
    );
}

/// The agents' rules on their prefix; with `denied`, a version whose keys
/// their token may not touch.
fn agents_rules(prefix: &str, denied: Option<&str>) -> String {
    let deny = denied
        .map(|v| format!("key_prefix \"{prefix}/{v}/\" {{ policy = \"deny\" }}\n"))
        .unwrap_or_default();
    format!(
        "key_prefix \"{prefix}/\" {{ policy = \"write\" }}\n{deny}session_prefix \"\" {{ policy = \"write\" }}\nnode_prefix \"\" {{ policy = \"read\" }}"
    )
}

/// The accessor of a token, as the token itself reads it.
fn accessor_of(consul: &Consul, secret: &str) -> String {
    let master = consul.token.lock().unwrap().replace(secret.to_string());
    let me: serde_json::Value =
        serde_json::from_str(&consul.call("GET", "acl/token/self", None)).unwrap();
    *consul.token.lock().unwrap() = master;
    me["AccessorID"].as_str().unwrap().to_string()
}

/// The ACL fault scenario: three agents reading their token from a file
/// (as a secrets agent keeps it), while an operator's deploys run back to
/// back; the token is rotated (a new one in the files, the old revoked, no
/// SIGHUP), deleted, restored, then one older version is denied to the
/// agents and given back. Throughout, the recorder checks the invariants;
/// no version is ever cleaned (none is removed), no token reaches a log,
/// and deploys succeed again after each phase.
#[test]
fn tokens_rotated_deleted_partly_denied_and_restored_while_deploys_run_break_no_guarantee() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    let consul = acl_consul();
    let mut fleet = support::Fleet::on(&consul, 3);
    let prefix = fleet.prefix.clone();
    let policy = format!("agents-{}", prefix.replace('/', "-"));
    let mut tokens = vec![token_with(&consul, &policy, &agents_rules(&prefix, None))];
    let token_files: Vec<_> = fleet.agents.iter().map(|a| a.dir.join("token")).collect();
    let hand_out = |token: &str| {
        for file in &token_files {
            // Atomically, as a secrets agent writes it.
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, format!("{token}\n")).unwrap();
            std::fs::rename(&tmp, file).unwrap();
        }
    };
    hand_out(&tokens[0]);
    for (agent, file) in fleet.agents.iter_mut().zip(&token_files) {
        // Whole reads every second: the partly denied version is missed
        // from a listing at once.
        agent.extra = serde_json::json!({"token_file": file, "rescan_interval": "1s"});
    }
    fleet.start_all();
    let recorder = fleet.record(&[consul.addr()]);
    let log_marks = |fleet: &support::Fleet| -> Vec<usize> {
        fleet.agents.iter().map(|a| a.log().len()).collect()
    };
    let every_log_since = |fleet: &support::Fleet, marks: &[usize], text: &str| {
        fleet
            .agents
            .iter()
            .zip(marks)
            .all(|(a, mark)| a.log()[*mark..].contains(text))
    };

    let stop = AtomicBool::new(false);
    let succeeded = AtomicUsize::new(0);
    let exits = std::sync::Mutex::new(std::collections::BTreeMap::<Option<i32>, usize>::new());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let version = format!("v{round}");
                round += 1;
                let out = fleet
                    .depro_command(&["deploy", &version, "-nodes=3", "-timeout=10s"])
                    .env("CONSUL_HTTP_TOKEN", MASTER)
                    .output()
                    .unwrap();
                *exits.lock().unwrap().entry(out.status.code()).or_default() += 1;
                if out.status.code() == Some(0) {
                    recorder.check_switch(&version, 3);
                    succeeded.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // Stops the deployer however this scope ends (a failed wait too:
        // the scope joins its threads before the panic goes on).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let patience = Duration::from_secs(60);
        let wait = |what: &str, condition: &mut dyn FnMut() -> bool| {
            support::wait_for_within(patience, what, condition, || fleet.diagnostics())
        };
        let a_deploy_succeeds = |what: &str| {
            let before = succeeded.load(Ordering::Relaxed);
            wait(&format!("a deploy to succeed {what}"), &mut || {
                succeeded.load(Ordering::Relaxed) > before
            });
        };
        a_deploy_succeeds("at first");
        a_deploy_succeeds("again");

        // Rotated: a new token in the files, the old one revoked, no signal.
        let marks = log_marks(&fleet);
        tokens.push(token_with(
            &consul,
            &format!("{policy}-2"),
            &agents_rules(&prefix, None),
        ));
        hand_out(&tokens[1]);
        consul.call(
            "DELETE",
            &format!("acl/token/{}", accessor_of(&consul, &tokens[0])),
            None,
        );
        wait("every agent on the new token", &mut || {
            every_log_since(&fleet, &marks, "reconnecting with the new ones")
        });
        a_deploy_succeeds("after the rotation");

        // Deleted, and nothing else in the files: every agent is denied,
        // and keeps what it has.
        let marks = log_marks(&fleet);
        let dead = tokens[1].clone();
        consul.call(
            "DELETE",
            &format!("acl/token/{}", accessor_of(&consul, &dead)),
            None,
        );
        wait("every agent denied", &mut || {
            every_log_since(&fleet, &marks, "denied")
        });
        // The outage lasts while two deploys try (and time out: no agent
        // may report).
        let tried = exits.lock().unwrap().values().sum::<usize>();
        wait("two deploys tried while denied", &mut || {
            exits.lock().unwrap().values().sum::<usize>() >= tried + 2
        });

        // Restored: a fresh token in the files.
        let marks = log_marks(&fleet);
        tokens.push(token_with(
            &consul,
            &format!("{policy}-3"),
            &agents_rules(&prefix, None),
        ));
        hand_out(&tokens[2]);
        wait("every agent on the restored token", &mut || {
            every_log_since(&fleet, &marks, "reconnecting with the new ones")
        });
        a_deploy_succeeds("after the token is restored");

        // Partly denied: v0 (deployed everywhere, not current) vanishes
        // from the agents' listings; deploys go on.
        let marks = log_marks(&fleet);
        set_rules(
            &consul,
            &format!("{policy}-3"),
            &agents_rules(&prefix, Some("v0")),
        );
        wait("every agent to keep v0 it cannot see", &mut || {
            every_log_since(
                &fleet,
                &marks,
                "v0 is gone from the listing, but Consul denies",
            )
        });
        a_deploy_succeeds("while v0 is denied");
        set_rules(
            &consul,
            &format!("{policy}-3"),
            &agents_rules(&prefix, None),
        );
        a_deploy_succeeds("after v0 is given back");
    });

    fleet.expect_converged(Duration::from_secs(90));
    let findings = recorder.finish();
    eprintln!(
        "ACL faults: {} live checks, {} tree snapshots, exits {:?}",
        findings.samples,
        findings.snapshots,
        exits.lock().unwrap()
    );
    assert!(
        findings.violations.is_empty(),
        "invariants broken: {:#?}",
        findings.violations
    );
    for agent in &fleet.agents {
        let hooks = agent.hooks_log();
        assert!(
            !hooks.iter().any(|line| line.starts_with("clean ")),
            "{} cleaned a version no one removed: {hooks:?}",
            agent.name
        );
        assert!(
            agent.deployment_path("api").join("v0").exists(),
            "{} lost v0",
            agent.name
        );
        assert_eq!(
            fleet.node_state("v0", &agent.name).as_deref(),
            Some("ready"),
            "{}'s key for v0",
            agent.name
        );
        let log = agent.log();
        for token in &tokens {
            assert!(
                !log.contains(token.as_str()),
                "a token in {}'s log",
                agent.name
            );
        }
    }
}
