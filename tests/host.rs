//! The agent when the host misbehaves: a full disk, hooks that delete
//! depro's state or leave processes behind, crashes in the middle of a
//! clean, unreadable bookkeeping. Each test reproduces a break that was
//! found and is named after what must hold instead. Needs root (tmpfs).

mod support;

use nix::sys::signal::Signal;
use support::{Fleet, Tmpfs, alive, read_pid, wait_for};

fn deploys_of(agent: &support::Agent, version: &str) -> usize {
    agent
        .hooks_log()
        .iter()
        .filter(|l| l.starts_with(&format!("deploy {version} ")))
        .count()
}

#[test]
fn a_full_disk_fails_the_new_version_with_its_reason_and_never_blocks_cleaning_the_old_one() {
    let mut fleet = Fleet::new(1);
    let disk = Tmpfs::mount(&fleet.agents[0].deployment_path("api"), "2m");
    fleet.start_all();
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    disk.fill();
    // In one transaction: v1 is removed (cleaning it frees space) and v3 added.
    let p = &fleet.prefix;
    let txn = serde_json::json!([
        {"KV": {"Verb": "delete", "Key": format!("{p}/v1/")}},
        {"KV": {"Verb": "set", "Key": format!("{p}/v3/"), "Value": ""}},
        // A ring in the same transaction, as a tool would that rings.
        {"KV": {"Verb": "set", "Key": format!("{p}/.changed"),
                "Value": support::base64("removed v1 and created v3")}},
    ]);
    fleet
        .consul
        .call("PUT", "txn", Some(txn.to_string().as_bytes()));
    fleet.expect_state("v3", "failed");
    fleet.expect_gone("v1");
    let agent = &fleet.agents[0];
    assert!(
        agent.log().contains("No space left on device"),
        "{}",
        agent.log()
    );
    fleet.expect_active("v2");
}

#[test]
fn a_rollout_whose_bookkeeping_cannot_be_written_is_reported_failed_not_retried_forever() {
    let mut fleet = Fleet::new(1);
    let _disk = Tmpfs::mount(&fleet.agents[0].deployment_path("api"), "2m");
    fleet.start_all();
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    fleet.expect_state("v2", "ready");
    // v2's rollout hook succeeds and fills the disk on its way out: the
    // agent cannot record that v2 is live.
    let agent = &fleet.agents[0];
    agent.set_flag("fill-disk", true);
    fleet.set_current("v2");
    fleet.expect_state("v2", "failed");
    let agent = &fleet.agents[0];
    assert!(
        agent.log().contains("No space left on device"),
        "{}",
        agent.log()
    );
    let rollouts = agent
        .hooks_log()
        .iter()
        .filter(|l| l.starts_with("rollout v2"))
        .count();
    assert_eq!(rollouts, 1, "{:?}", agent.hooks_log());
}

#[test]
fn unreadable_bookkeeping_means_not_ready_and_the_version_is_deployed_again() {
    let mut fleet = Fleet::start(1);
    fleet.add_version("v1");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    fleet.agents[0].signal(Signal::SIGTERM);
    assert_eq!(fleet.agents[0].wait_exit(), Some(0));
    let marker = fleet.agents[0]
        .deployment_path("api")
        .join(".depro/versions/v1");
    std::fs::write(&marker, b"re\xffady\n").unwrap();
    std::fs::write(
        fleet.agents[0].deployment_path("api").join("current"),
        b"v\xfe1\n",
    )
    .unwrap();
    fleet.agents[0].start();
    fleet.wait("v1 deployed a second time", |f| {
        deploys_of(&f.agents[0], "v1") == 2
    });
    fleet.expect_active("v1");
    assert!(fleet.agents[0].is_running());
}

#[test]
fn a_hook_that_deletes_depros_state_fails_its_version_and_the_lock_stays_held() {
    let fleet = Fleet::start(1);
    fleet.agents[0].set_flag("rm-state", true);
    fleet.add_version("v1");
    fleet.expect_state("v1", "failed");
    let agent = &fleet.agents[0];
    assert!(
        agent.log().contains("deleted depro's state"),
        "{}",
        agent.log()
    );
    // A second agent on the same path is still refused.
    let path = agent.deployment_path("api");
    let mut intruder = support::Agent::new(
        fleet.root.path(),
        "intruder",
        &fleet.consul.addr(),
        &fleet.prefix,
    );
    intruder.deployments[0]["path"] = path.display().to_string().into();
    intruder.start();
    assert_eq!(intruder.wait_exit(), Some(1));
    assert!(
        intruder.log().contains("another depro agent"),
        "{}",
        intruder.log()
    );
    // The version is not stuck: it can be removed, and deployed again.
    fleet.agents[0].set_flag("rm-state", false);
    fleet.remove_version("v1");
    fleet.expect_gone("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    assert!(path.join(".depro/versions/v2").exists());
}

#[test]
fn a_hook_left_running_is_killed_on_restart_even_after_it_exec_ed_another_program() {
    let mut fleet = Fleet::start(1);
    fleet.agents[0].set_flag("exec-sleep", true);
    fleet.add_version("v1");
    let pid_file = fleet.agents[0].dir.join("hook.pid");
    wait_for("the hook to exec", || {
        pid_file.exists()
            && std::fs::read_to_string(format!("/proc/{}/cmdline", read_pid(&pid_file)))
                .is_ok_and(|c| c.starts_with("sleep"))
    });
    let hook = read_pid(&pid_file);
    fleet.agents[0].kill9();
    fleet.agents[0].set_flag("exec-sleep", false);
    fleet.agents[0].start();
    wait_for("the exec-ed hook to be killed", || !alive(hook));
    fleet.expect_state("v1", "ready");
}

#[test]
fn a_hook_left_running_is_killed_on_restart_even_after_its_leader_exited() {
    let mut fleet = Fleet::start(1);
    fleet.agents[0].set_flag("background-child", true);
    fleet.agents[0].set_flag("block-deploy", true);
    fleet.add_version("v1");
    let pid_file = fleet.agents[0].dir.join("hook.pid");
    wait_for("the hook to block", || pid_file.exists());
    let (leader, child) = (
        read_pid(&pid_file),
        read_pid(&fleet.agents[0].dir.join("child.pid")),
    );
    fleet.agents[0].kill9();
    // The hook's leader ends; its child lives on.
    fleet.agents[0].set_flag("release", true);
    wait_for("the leader to exit", || !alive(leader));
    assert!(alive(child));
    fleet.agents[0].set_flag("background-child", false);
    fleet.agents[0].set_flag("block-deploy", false);
    fleet.agents[0].start();
    wait_for("the orphaned child to be killed", || !alive(child));
    fleet.expect_state("v1", "ready");
}

#[test]
fn a_background_child_of_a_successful_hook_ends_with_it() {
    let fleet = Fleet::start(1);
    fleet.agents[0].set_flag("background-child", true);
    fleet.add_version("v1");
    fleet.expect_state("v1", "ready");
    let child = read_pid(&fleet.agents[0].dir.join("child.pid"));
    wait_for("the hook's background child to be gone", || !alive(child));
}

#[test]
fn a_crash_in_the_middle_of_a_clean_never_leaves_a_partial_version_marked_ready() {
    let mut fleet = Fleet::start(1);
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    // v1 deployed too (current goes first on a fresh host: v1 may still
    // be on its way when v2 is active).
    fleet.expect_state("v1", "ready");
    fleet.agents[0].set_flag("block-clean", true);
    fleet.remove_version("v1");
    let pid_file = fleet.agents[0].dir.join("clean.pid");
    wait_for("v1's clean hook to run", || pid_file.exists());
    let before = fleet.session_of("v2", "node1").unwrap();
    fleet.agents[0].kill9();
    // v1 comes back before the agent does.
    fleet.agents[0].set_flag("block-clean", false);
    fleet.add_version("v1");
    fleet.agents[0].start();
    fleet.wait("v1 ready under the restarted agent's session", |f| {
        f.session_of("v1", "node1").is_some_and(|s| s != before)
            && f.node_state("v1", "node1").as_deref() == Some("ready")
    });
    assert_eq!(
        deploys_of(&fleet.agents[0], "v1"),
        2,
        "v1 was reported ready over a half-cleaned directory: {:?}",
        fleet.agents[0].hooks_log()
    );
}
