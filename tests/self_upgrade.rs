//! packaging/self-upgrade/depro-upgrade.json, run as shipped: a fleet of
//! agents upgrades the depro binary it runs through its own tree, in
//! batches, under a supervisor that restarts an agent when it exits (what
//! systemd's `Restart=` does; the test machine has no systemd, so the
//! example's `systemctl --no-block restart depro` becomes a SIGTERM to the
//! agent, which is what systemd sends with `KillMode=mixed`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Consul, wait_for, wait_for_within};

/// One host: a supervisor loop that runs the installed depro as its agent.
struct Host {
    name: String,
    dir: PathBuf,
    supervisor: Child,
}

impl Host {
    fn start(root: &Path, name: &str, consul: &Consul, upgrade: &str, api_prefix: &str) -> Host {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        // The depro the host runs at first: this build, marked as "0".
        install(&dir.join("bin/depro"), "installed 0");
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/self-upgrade/depro-upgrade.json"),
        )
        .unwrap();
        let replacements = [
            (
                "/usr/bin/depro",
                dir.join("bin/depro").display().to_string(),
            ),
            (
                "/var/lib/depro/self",
                dir.join("self").display().to_string(),
            ),
            (
                "https://artifacts.example.com/depro",
                format!("file://{}/artifacts", root.display()),
            ),
            (
                "systemctl --no-block restart depro",
                "kill -TERM $PPID".into(),
            ),
            ("depro/version", upgrade.to_string()),
        ];
        let mut config = example;
        for (from, to) in replacements {
            assert!(config.contains(from), "the example no longer has {from:?}");
            config = config.replace(from, &to);
        }
        std::fs::write(dir.join("conf/upgrade.json"), config).unwrap();
        let base = serde_json::json!({
            "name": name,
            "server": consul.addr(),
            "session_ttl": "10s",
            "deployments": [support::default_deployment("api", &dir, api_prefix)],
        });
        std::fs::write(dir.join("conf/base.json"), base.to_string()).unwrap();
        // The supervisor: restarts the agent whenever it exits, unless told
        // to stop; while `hold` exists, it waits for `go` first.
        let script = r#"
            d="$1"
            while :; do
              "$d/bin/depro" agent -config-dir="$d/conf" >> "$d/agent.log" 2>&1 &
              echo $! > "$d/agent.pid"
              wait $!
              echo "exited $?" >> "$d/restarts"
              [ -e "$d/stop" ] && exit 0
              if [ -e "$d/hold" ]; then
                touch "$d/down"
                while [ ! -e "$d/go" ] && [ ! -e "$d/stop" ]; do sleep 0.02; done
                rm -f "$d/hold" "$d/go" "$d/down"
              fi
            done"#;
        let mut command = Command::new("bash");
        command
            .args(["-c", script, "supervisor"])
            .arg(&dir)
            .env("DEPRO_LOG", "debug")
            .env_remove("CONSUL_HTTP_ADDR")
            .stdin(Stdio::null());
        support::die_with_parent(&mut command);
        let supervisor = command.spawn().unwrap();
        Host {
            name: name.to_string(),
            dir,
            supervisor,
        }
    }

    fn restarts(&self) -> usize {
        std::fs::read_to_string(self.dir.join("restarts"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// The running agent's process ID (0 before the first start).
    fn agent_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.join("agent.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The mark of the binary the running agent was started from (see
    /// [`install`]), or why it cannot be told.
    fn running(&self) -> String {
        let pid = self.agent_pid();
        match std::fs::read(format!("/proc/{pid}/exe")) {
            Ok(bytes) => mark_of(&bytes),
            Err(e) => format!("no agent running as {pid} ({e})"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("stop"), "");
        let pid = self.agent_pid();
        if pid > 1 {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.supervisor.wait();
    }
}

/// A copy of this build of depro with `mark` appended: it runs the same,
/// and compares different.
fn install(path: &Path, mark: &str) {
    let mut bytes = std::fs::read(support::depro_bin()).unwrap();
    bytes.extend_from_slice(format!("\n{mark}\n").as_bytes());
    std::fs::write(path, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The mark [`install`] appended to a binary.
fn mark_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(64)..]);
    text.trim_end()
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Publishes a build of depro as `version` in the artifact store; returns
/// its mark.
fn publish(root: &Path, version: &str) -> String {
    let dir = root.join("artifacts").join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("depro-{}", std::env::consts::ARCH));
    let mark = format!("artifact {version}");
    install(&path, &mark);
    mark
}

/// Processes that are hooks of this test's agents (their environment
/// names a deployment path under `root`).
fn hooks_running_under(root: &Path) -> Vec<i32> {
    let needle = format!("DEPLOYMENT_PATH={}", root.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|var| var.starts_with(needle.as_bytes()))
            })
        })
        .collect()
}

#[test]
fn the_fleet_upgrades_depro_through_its_own_tree_in_batches() {
    let consul = Consul::shared();
    let root = tempfile::tempdir().unwrap();
    let upgrade = support::unique_prefix("depro");
    let api = support::unique_prefix("api");
    let hosts: Vec<Host> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| Host::start(root.path(), n, consul, &upgrade, &api))
        .collect();
    let depro = |args: &[&str]| {
        let mut command = support::depro_command(&consul.addr(), args);
        command.arg(format!("-prefix={upgrade}"));
        support::Output::of(command.output().unwrap())
    };
    wait_for("every agent to announce itself", || {
        hosts.iter().all(|h| {
            consul
                .get(&format!("{upgrade}/.agents/{}", h.name))
                .is_some()
        })
    });

    // The first build goes everywhere at once (there is no current yet).
    let v1 = publish(root.path(), "1.0.1");
    let out = depro(&["deploy", "1.0.1", "-nodes=all", "-timeout=2m"]);
    assert!(out.code == Some(0), "{out:#?}\n{}", hosts[0].log());
    for host in &hosts {
        assert_eq!(host.running(), v1, "{}:\n{}", host.name, host.log());
        assert_eq!(host.restarts(), 1, "{}:\n{}", host.name, host.log());
    }

    // The next one in batches. node1, the canary, is held down after its
    // restart, while an operator deploys a version of another deployment.
    let v2 = publish(root.path(), "1.0.2");
    std::fs::write(hosts[0].dir.join("hold"), "").unwrap();
    let deploy = support::spawn({
        let mut command = support::depro_command(
            &consul.addr(),
            &[
                "deploy",
                "1.0.2",
                "-nodes=all",
                "-canary=1",
                "-batch=1",
                "-timeout=2m",
            ],
        );
        command.arg(format!("-prefix={upgrade}"));
        command
    });
    wait_for_within(
        Duration::from_secs(60),
        "node1 down for its restart",
        &mut || hosts[0].dir.join("down").exists(),
        || hosts[0].log(),
    );
    consul.put(&format!("{api}/av1/"), "");
    consul.ring(&api);
    std::fs::write(hosts[0].dir.join("go"), "").unwrap();
    let out = support::finish(deploy);
    let text = out.ok();
    for line in [
        "wave 1/3: node1 active on 1.0.2",
        "wave 2/3: node2 active on 1.0.2",
        "wave 3/3: node3 active on 1.0.2",
    ] {
        assert!(text.contains(line), "{line:?} missing: {out:#?}");
    }
    for host in &hosts {
        assert_eq!(host.running(), v2, "{} runs another binary", host.name);
        assert_eq!(
            host.restarts(),
            2,
            "{}: restarted once per upgrade",
            host.name
        );
        assert_eq!(
            consul
                .get(&format!("{upgrade}/1.0.2/{}", host.name))
                .as_deref(),
            Some("active")
        );
    }
    // The change made while node1's agent was down was not missed.
    wait_for("node1 to deploy av1", || {
        consul.get(&format!("{api}/av1/node1")).as_deref() == Some("ready")
    });
    assert!(
        hooks_running_under(root.path()).is_empty(),
        "orphaned hooks: {:?}",
        hooks_running_under(root.path())
    );
}
