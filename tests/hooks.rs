//! The agent never waits on a hook: deployments run their hooks at the same
//! time, `current` goes first (a rollback stops another version's deploy,
//! a new host rolls out `current` before deploying the rest), every process
//! a hook starts ends with it, and a hook's output costs bounded memory.
//! Real agents against a real Consul.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{Agent, Consul, Fleet, wait_for, wait_for_within};

fn pid_in(path: &Path) -> i32 {
    wait_for(&format!("{} to be written", path.display()), || {
        std::fs::read_to_string(path).is_ok_and(|t| t.trim().parse::<i32>().is_ok())
    });
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn threads_and_fds(pid: i32) -> (usize, usize) {
    let count = |dir: String| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    (
        count(format!("/proc/{pid}/task")),
        count(format!("/proc/{pid}/fd")),
    )
}

/// The agent's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_slow_deploy_in_one_deployment_does_not_delay_another_deployment_of_the_same_agent() {
    let root = tempfile::tempdir().unwrap();
    let consul = Consul::shared();
    let slow = support::unique_prefix("slow");
    let fast = support::unique_prefix("fast");
    let mut agent = Agent::new(root.path(), "both", &consul.addr(), &fast);
    let ctl = agent.dir.display().to_string();
    let mut slow_deployment = support::default_deployment("slow", &agent.dir, &slow);
    slow_deployment["deploy"] =
        serde_json::json!([format!("echo $$ > {ctl}/slow.pid"), "sleep 60"]);
    agent.deployments.push(slow_deployment);
    agent.start();
    consul.add_version(&slow, "v1");
    let slow_hook = pid_in(&agent.dir.join("slow.pid"));

    // While the slow deployment's 60 s hook runs, the other deploys and
    // rolls out, each version in a few hundred milliseconds.
    for version in ["v1", "v2", "v3"] {
        let started = Instant::now();
        let prefix = format!("-prefix={fast}");
        let out = support::depro_command(
            &consul.addr(),
            &["deploy", version, &prefix, "-nodes=1", "-timeout=5s"],
        )
        .output()
        .unwrap();
        let out = support::Output::of(out);
        assert_eq!(out.code, Some(0), "{out:#?}\n{}", agent.log());
        assert!(support::alive(slow_hook), "the slow hook ended early");
        eprintln!("{version} active after {:?}", started.elapsed());
    }
    assert_eq!(agent.live("api").as_deref(), Some("v3"));
}

#[test]
fn a_rollback_stops_a_hung_deploy_of_another_version_which_is_deployed_again_afterwards() {
    let fleet = Fleet::start(1);
    fleet.depro(&["deploy", "v3", "-nodes=1"]).ok();
    fleet.depro(&["deploy", "v4", "-nodes=1"]).ok();
    let agent = &fleet.agents[0];
    agent.set_flag("block-deploy", true);
    fleet.add_version("v5");
    let hook = pid_in(&agent.dir.join("hook.pid"));

    // The default hook timeout is 10 minutes: without the agent stopping
    // v5's deploy, this rollout would wait for it.
    let out = fleet.depro(&["rollout", "v3", "-nodes=1", "-timeout=20s"]);
    assert!(out.result().contains("v3"), "{out:#?}");
    assert_eq!(fleet.agents[0].live("api").as_deref(), Some("v3"));
    wait_for("v5's deploy hook to be stopped", || !support::alive(hook));
    let log = fleet.agents[0].log();
    assert!(
        log.contains("current is ready here and is rolled out first; stopping it"),
        "{log}"
    );
    // v5 was left busy (not ready) meanwhile.
    assert_eq!(fleet.node_state("v5", "node1").as_deref(), Some("busy"));

    // Once the rollback is done, v5 is deployed again (its second deploy
    // may have started blocked already: release it).
    fleet.agents[0].set_flag("block-deploy", false);
    fleet.agents[0].set_flag("release", true);
    fleet.expect_state("v5", "ready");
    let deploys = fleet.agents[0]
        .hooks_log()
        .iter()
        .filter(|l| l.starts_with("deploy v5"))
        .count();
    assert_eq!(deploys, 2, "{:#?}", fleet.agents[0].hooks_log());
    fleet.expect_active("v3");
}

#[test]
fn rollbacks_that_stop_deploys_never_roll_out_a_half_deployed_version_even_with_kill_9() {
    let mut fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=2"]).ok();
    let recorder = fleet.record(&[fleet.consul.addr()]);
    let mut rng = support::Rng::new("rollback-kill9");
    for round in 0..4 {
        let version = format!("n{round}");
        for agent in &fleet.agents {
            agent.set_flag("block-deploy", true);
            agent.set_flag("release", false);
            let _ = std::fs::remove_file(agent.dir.join("hook.pid"));
        }
        fleet.add_version(&version);
        for agent in &fleet.agents {
            pid_in(&agent.dir.join("hook.pid"));
        }
        let back = if round % 2 == 0 { "v1" } else { "v2" };
        let rollout =
            support::spawn(fleet.depro_command(&["rollout", back, "-nodes=2", "-timeout=60s"]));
        // kill -9 one agent at a random moment of the dance, and restart it.
        std::thread::sleep(rng.upto(Duration::from_millis(400)));
        let victim = rng.below(2);
        fleet.agents[victim].kill9();
        fleet.agents[victim].start();
        let out = support::finish(rollout);
        assert!(out.code == Some(0), "{out:#?}");
        for agent in &fleet.agents {
            agent.set_flag("block-deploy", false);
            agent.set_flag("release", true);
        }
        fleet.expect_state(&version, "ready");
        fleet.expect_active(back);
        fleet.remove_version(&version);
        fleet.expect_gone(&version);
    }
    let findings = recorder.finish();
    assert!(findings.violations.is_empty(), "{:#?}", findings.violations);
    assert!(findings.samples > 100, "{}", findings.samples);
}

#[test]
fn removing_a_version_stops_its_hung_deploy_at_once() {
    let fleet = Fleet::start(1);
    let agent = &fleet.agents[0];
    agent.set_flag("block-deploy", true);
    fleet.add_version("v1");
    let hook = pid_in(&agent.dir.join("hook.pid"));
    let out = fleet.depro(&["remove", "v1", "-wait", "-timeout=20s"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    // SIGTERM first: the hook's processes are gone within the grace period.
    wait_for_within(
        Duration::from_secs(6),
        "the removed version's deploy hook to end",
        &mut || !support::alive(hook),
        || fleet.agents[0].log(),
    );
    assert!(fleet.agents[0].version_dirs("api").is_empty());
    assert!(
        fleet.agents[0]
            .log()
            .contains("its version was removed; stopping it")
    );
}

#[test]
fn a_fresh_host_rolls_out_current_before_deploying_the_other_versions() {
    let mut fleet = Fleet::new(1);
    let ctl = fleet.agents[0].dir.display().to_string();
    fleet.agents[0].deployments[0]["deploy"]
        .as_array_mut()
        .unwrap()
        .insert(
            0,
            serde_json::json!(format!(
                "sleep 1; echo \"slept $VERSION\" >> {ctl}/hooks.log"
            )),
        );
    for i in 1..=20 {
        fleet.consul.add_version(&fleet.prefix, &format!("v{i:02}"));
    }
    fleet
        .consul
        .put(&format!("{}/current", fleet.prefix), "v07");
    fleet.start_all();
    wait_for("v07 live", || {
        fleet.agents[0].live("api").as_deref() == Some("v07")
    });
    let log = fleet.agents[0].hooks_log();
    let first_deploys: Vec<&String> = log.iter().filter(|l| l.starts_with("deploy ")).collect();
    assert!(
        first_deploys[0].starts_with("deploy v07"),
        "current first: {log:#?}"
    );
    let rollout = log
        .iter()
        .position(|l| l.starts_with("rollout v07"))
        .unwrap();
    let deploys_before = log[..rollout]
        .iter()
        .filter(|l| l.starts_with("deploy "))
        .count();
    assert_eq!(
        deploys_before, 1,
        "rolled out before the other 19: {log:#?}"
    );
}

#[test]
fn processes_a_hook_starts_end_with_it_however_they_escape() {
    let mut fleet = Fleet::new(1);
    let ctl = fleet.agents[0].dir.display().to_string();
    let escapes = [
        // A new session, the hook's output kept open.
        format!("if [ -e {ctl}/escape ]; then setsid sleep 600 & echo $! > {ctl}/setsid.pid; fi"),
        // A double fork into a new session.
        format!(
            "if [ -e {ctl}/escape ]; then ( setsid sh -c 'echo $$ > {ctl}/double.pid; exec sleep 600' & ); fi"
        ),
        // A new session, an empty environment (no mark), a double fork.
        format!(
            "if [ -e {ctl}/escape ]; then ( setsid env -i sh -c 'echo $$ > {ctl}/bare.pid; exec sleep 600' & ); fi"
        ),
        format!("if [ -e {ctl}/escape ]; then sleep 0.2; fi"),
    ];
    let deploy = fleet.agents[0].deployments[0]["deploy"]
        .as_array_mut()
        .unwrap();
    for (i, line) in escapes.iter().enumerate() {
        deploy.insert(i, serde_json::json!(line));
    }
    fleet.start_all();
    fleet.depro(&["deploy", "v1", "-nodes=1"]).ok();
    let agent_pid = fleet.agents[0].pid();
    let idle = threads_and_fds(agent_pid);

    fleet.agents[0].set_flag("escape", true);
    for i in 2..=4 {
        let version = format!("v{i}");
        for file in ["setsid.pid", "double.pid", "bare.pid"] {
            let _ = std::fs::remove_file(fleet.agents[0].dir.join(file));
        }
        fleet.depro(&["deploy", &version, "-nodes=1"]).ok();
        let dir = &fleet.agents[0].dir;
        for file in ["setsid.pid", "double.pid", "bare.pid"] {
            let pid = pid_in(&dir.join(file));
            wait_for_within(
                Duration::from_secs(5),
                &format!("{file} ({pid}) to end with its hook"),
                &mut || !support::alive(pid),
                || fleet.agents[0].log(),
            );
        }
    }
    // Nothing is pinned: the agent's threads and descriptors are back.
    wait_for("the agent's threads and descriptors to be back", || {
        threads_and_fds(agent_pid) == idle
    });

    // kill -9 of the agent while a hook with escapees runs: the next agent
    // ends them.
    fleet.agents[0].set_flag("block-deploy", true);
    for file in ["setsid.pid", "double.pid", "hook.pid"] {
        let _ = std::fs::remove_file(fleet.agents[0].dir.join(file));
    }
    fleet.add_version("v5");
    let dir = fleet.agents[0].dir.clone();
    let pids: Vec<i32> = ["setsid.pid", "double.pid", "hook.pid"]
        .iter()
        .map(|f| pid_in(&dir.join(f)))
        .collect();
    fleet.agents[0].kill9();
    assert!(pids.iter().all(|p| support::alive(*p)));
    fleet.agents[0].set_flag("block-deploy", false);
    fleet.agents[0].start();
    for pid in pids {
        wait_for(&format!("{pid} to be killed by the new agent"), || {
            !support::alive(pid)
        });
    }
    fleet.expect_state("v5", "ready");
}

#[test]
fn a_hook_printing_a_1_gb_line_costs_the_agent_little_memory() {
    let mut fleet = Fleet::new(1);
    fleet.agents[0].deployments[0]["deploy"] = serde_json::json!([
        "head -c 1000000000 /dev/zero | tr '\\0' x",
        "printf 'the end\\n'",
        "exit 3"
    ]);
    fleet.start_all();
    let out = fleet.depro(&["deploy", "v1", "-nodes=1", "-timeout=120s"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("exited with status 3"), "{out:#?}");
    let peak = peak_rss_kib(fleet.agents[0].pid());
    assert!(peak < 20 * 1024, "peak RSS {peak} KiB");
    let log = fleet.agents[0].log();
    let hook_lines: Vec<String> = log
        .lines()
        .filter(|l| l.contains("[api v1 deploy]"))
        .map(|l| {
            l.chars()
                .rev()
                .take(80)
                .collect::<String>()
                .chars()
                .rev()
                .collect()
        })
        .collect();
    assert!(
        log.contains("(a line of 1000000007 bytes, cut)"),
        "the line is logged cut: {hook_lines:#?}"
    );
    assert!(log.len() < 1024 * 1024, "the log holds {} bytes", log.len());
    let reason = fleet
        .consul
        .get(&format!("{}/v1/.reason/node1", fleet.prefix))
        .unwrap();
    assert!(reason.contains("the end"), "{reason}");
}

#[test]
fn previous_version_is_the_one_live_on_the_node_after_a_failed_health_check() {
    let mut fleet = Fleet::new(1);
    let ctl = fleet.agents[0].dir.display().to_string();
    fleet.agents[0].deployments[0]["health"] =
        serde_json::json!([format!("if [ -e {ctl}/fail-health ]; then exit 1; fi")]);
    fleet.agents[0].deployments[0]["health_timeout"] = serde_json::json!("2s");
    fleet.start_all();
    fleet.depro(&["deploy", "v1", "-nodes=1"]).ok();
    fleet.agents[0].set_flag("fail-health", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=1"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    fleet.agents[0].set_flag("fail-health", false);
    // v2's rollout hook switched the node; its health checks failed. The
    // rollback's hook is told that v2 is what runs.
    fleet.depro(&["rollback", "-nodes=1"]).ok();
    let log = fleet.agents[0].hooks_log();
    let rollouts: Vec<&String> = log.iter().filter(|l| l.starts_with("rollout ")).collect();
    assert_eq!(
        rollouts,
        [
            "rollout v1 from=",
            "rollout v2 from=v1",
            "rollout v1 from=v2"
        ],
        "{log:#?}"
    );
}

#[test]
fn health_timeout_is_honoured_to_its_end_and_the_reason_counts_the_attempts() {
    let mut fleet = Fleet::new(1);
    let ctl = fleet.agents[0].dir.display().to_string();
    fleet.agents[0].deployments[0]["health"] = serde_json::json!([
        format!("echo \"health $VERSION $(date +%s.%N)\" >> {ctl}/hooks.log"),
        format!("if [ -e {ctl}/fail-health ]; then exit 1; fi")
    ]);
    fleet.agents[0].deployments[0]["health_timeout"] = serde_json::json!("3s");
    fleet.start_all();
    fleet.depro(&["deploy", "v1", "-nodes=1"]).ok();
    fleet.agents[0].set_flag("fail-health", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=1"]);
    let failed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(out.code, Some(2), "{out:#?}");
    let starts: Vec<f64> = fleet.agents[0]
        .hooks_log()
        .iter()
        .filter_map(|l| l.strip_prefix("health v2 "))
        .map(|t| t.parse().unwrap())
        .collect();
    // Attempts at 0, 1 and 2 s; the gate fails at 3 s, not before.
    assert_eq!(starts.len(), 3, "{starts:?}");
    assert!(
        failed_at - starts[0] >= 2.9,
        "failed after {}s",
        failed_at - starts[0]
    );
    assert!(
        out.stderr
            .contains("did not pass within 3s (3 attempts in 3"),
        "{out:#?}"
    );
}

#[test]
fn a_deployment_unconfigured_while_its_hook_hangs_has_the_hook_killed_and_nothing_pinned() {
    let root = tempfile::tempdir().unwrap();
    let consul = Consul::shared();
    let kept = support::unique_prefix("kept");
    let dropped = support::unique_prefix("dropped");
    let mut agent = Agent::new(root.path(), "reloaded", &consul.addr(), &kept);
    let ctl = agent.dir.display().to_string();
    let mut doomed = support::default_deployment("doomed", &agent.dir, &dropped);
    doomed["deploy"] = serde_json::json!([format!("echo $$ > {ctl}/doomed.pid"), "sleep 600"]);
    agent.deployments.push(doomed);
    agent.start();
    wait_for("the agent to register", || {
        agent.log().contains("registered with Consul")
    });
    consul.add_version(&dropped, "v1");
    let hook = pid_in(&agent.dir.join("doomed.pid"));
    // Its watches run (they read the tree that started the hook), and the
    // hook's output is open.
    let busy = threads_and_fds(agent.pid());
    agent.deployments.pop();
    agent.write_config();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_within(
        Duration::from_secs(5),
        "the unconfigured deployment's hook to be killed",
        &mut || !support::alive(hook),
        || agent.log(),
    );
    // Its watches, its output and the hook are gone; the agent goes on.
    wait_for("the agent's threads and descriptors to be back", || {
        let (threads, fds) = threads_and_fds(agent.pid());
        threads <= busy.0 - 2 && fds < busy.1
    });
    let prefix = format!("-prefix={kept}");
    let out = support::depro_command(&consul.addr(), &["deploy", "v1", &prefix, "-nodes=1"])
        .output()
        .unwrap();
    assert_eq!(support::Output::of(out).code, Some(0));
}

#[test]
fn a_deploy_hook_that_exits_0_when_stopped_for_its_timeout_still_fails() {
    let mut fleet = Fleet::new(1);
    fleet.agents[0].deployments[0]["deploy"] =
        serde_json::json!(["trap 'exit 0' TERM", "sleep 600 & wait"]);
    fleet.agents[0].deployments[0]["timeout"] = serde_json::json!("1s");
    fleet.start_all();
    let out = fleet.depro(&["deploy", "v1", "-nodes=1", "-timeout=30s"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(
        out.stderr.contains("timed out after 1s and exited 0"),
        "{out:#?}"
    );
    assert_eq!(fleet.node_state("v1", "node1").as_deref(), Some("failed"));
}

#[test]
fn max_parallel_hooks_bounds_deploys_across_deployments_but_never_a_rollout() {
    let root = tempfile::tempdir().unwrap();
    let consul = Consul::shared();
    let first = support::unique_prefix("first");
    let second = support::unique_prefix("second");
    let mut agent = Agent::new(root.path(), "small", &consul.addr(), &first);
    let ctl = agent.dir.display().to_string();
    agent.extra = serde_json::json!({"max_parallel_hooks": 1});
    let mut other = support::default_deployment("other", &agent.dir, &second);
    other["deploy"].as_array_mut().unwrap().insert(
        0,
        serde_json::json!(format!(
            "if [ -e {ctl}/block-other ]; then echo $$ > {ctl}/other.pid; \
             while [ ! -e {ctl}/release-other ]; do sleep 0.02; done; fi"
        )),
    );
    agent.deployments.push(other);
    agent.start();
    let deploy = |prefix: &str, version: &str| {
        let prefix = format!("-prefix={prefix}");
        support::spawn(support::depro_command(
            &consul.addr(),
            &["deploy", version, &prefix, "-nodes=1", "-timeout=30s"],
        ))
    };
    // Both deployments have a version ready and live; this one two.
    for (prefix, version) in [(&first, "v0"), (&first, "v1"), (&second, "v1")] {
        assert_eq!(support::finish(deploy(prefix, version)).code, Some(0));
    }
    // The other deployment's deploy hook runs and blocks, taking the host's
    // one slot.
    agent.set_flag("block-other", true);
    let blocked = deploy(&second, "v2");
    let other_hook = pid_in(&agent.dir.join("other.pid"));
    // A rollout does not wait for the slot.
    let prefix = format!("-prefix={first}");
    let out = support::depro_command(
        &consul.addr(),
        &["rollout", "v0", &prefix, "-nodes=1", "-timeout=10s"],
    )
    .output()
    .unwrap();
    assert_eq!(support::Output::of(out).code, Some(0));
    assert_eq!(agent.live("api").as_deref(), Some("v0"));
    assert!(support::alive(other_hook));
    // A deploy does.
    let waiting = deploy(&first, "v2");
    wait_for("v2 staged here", || {
        consul.get(&format!("{first}/v2/small")).as_deref() == Some("busy")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !agent.hooks_log().iter().any(|l| l.starts_with("deploy v2")),
        "deployed while the host's one slot was taken: {:#?}",
        agent.hooks_log()
    );
    agent.set_flag("release-other", true);
    assert_eq!(support::finish(blocked).code, Some(0));
    assert_eq!(support::finish(waiting).code, Some(0));
}

#[test]
fn a_hook_s_output_costs_the_log_at_most_a_mebibyte_and_unicode_that_reorders_text_is_escaped() {
    let mut fleet = Fleet::new(1);
    fleet.agents[0].deployments[0]["deploy"] = serde_json::json!([
        "printf 'evil\\342\\200\\256txt.exe\\n'",
        "yes 0123456789 | head -c 10000000 || true",
        "echo the end; exit 3"
    ]);
    fleet.start_all();
    let before = fleet.agents[0].log().len();
    let out = fleet.depro(&["deploy", "v1", "-nodes=1", "-timeout=60s"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    let log = fleet.agents[0].log()[before..].to_string();
    assert!(log.len() < 3 * 1024 * 1024, "{} bytes of log", log.len());
    assert!(log.contains("more lines ("), "the cut is said");
    assert!(!log.contains('\u{202E}') && log.contains("evil\\u{202e}txt.exe"));
    assert!(!out.shown.contains('\u{202E}'));
    assert!(out.stderr.contains("the end"), "{out:#?}");
}
