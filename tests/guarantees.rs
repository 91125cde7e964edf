//! The CLI's guarantees under races and lost answers, each made
//! deterministic with a proxy between the command and Consul. Every test
//! here reproduces a break that was found, and is named after what must
//! hold instead.

mod support;

use std::process::Child;
use std::time::{Duration, Instant};

use support::proxy::{Action, Match, Proxy};
use support::{Fleet, Output, finish, spawn, wait_for};

/// The transaction that switches `current` (it names the current key).
fn switch_txn() -> Match {
    Match::put("/v1/txn").body("/current\"")
}

/// Waits up to `window` for `child` to exit; true if it did.
fn exits_within(child: &mut Child, window: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < window {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_deploy_racing_the_removal_of_its_version_never_makes_the_removed_version_current() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let proxy = Proxy::start(&fleet.consul.addr());
    let switch = proxy.rule(switch_txn(), Action::Hold, 1);
    let deploy = spawn(fleet.depro_via(&proxy.addr(), &["deploy", "v2", "-nodes=2"]));
    // v2 is ready on both nodes and the switch is on its way...
    proxy.wait_for(&switch, 1);
    // ...when another operator removes v2, and every node cleans it.
    fleet.depro(&["remove", "v2", "-wait"]).ok();
    proxy.release(&switch);
    let out = finish(deploy);
    out.fails(2, &["v2", "removed"]);
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    assert_eq!(
        fleet.consul.get(&format!("{}/v2/", fleet.prefix)),
        None,
        "the removed version's folder key was re-created"
    );
    fleet.expect_active("v1");
    fleet.expect_gone("v2");
}

#[test]
fn a_switch_whose_answer_is_lost_finds_out_what_happened_and_reports_it() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let proxy = Proxy::start(&fleet.consul.addr());
    // The switch commits, then the connection drops before the answer.
    let lost = proxy.rule(switch_txn(), Action::DropAnswer, 1);
    let out = Output::of(
        fleet
            .depro_via(&proxy.addr(), &["deploy", "v2", "-nodes=2"])
            .output()
            .unwrap(),
    );
    assert_eq!(proxy.applied(&lost), 1, "the switch never went through");
    let text = out.ok();
    assert!(text.contains("v2 is current"), "{out:#?}");
    assert!(
        out.stderr.contains("the answer to the switch was lost"),
        "{out:#?}"
    );
    fleet.expect_active("v2");
}

#[test]
fn current_moved_by_someone_else_during_the_rollout_ends_the_wait_at_once_with_exit_5() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("block-rollout", true);
    let deploy = spawn(fleet.depro_command(&["deploy", "v2", "-nodes=2", "-timeout=60s"]));
    wait_for("node2's rollout of v2 to start", || {
        fleet.agents[1].dir.join("rollout.pid").exists()
    });
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    // Another operator (or tool) moves current elsewhere.
    fleet.set_current("v1");
    let out = finish(deploy);
    out.fails(5, &["current was changed to v1", "while"]);
    fleet.agents[1].set_flag("release-rollout", true);
    fleet.expect_active("v1");
}

#[test]
fn a_version_removed_while_a_deploy_waits_for_it_ends_the_wait_at_once_with_exit_2() {
    let fleet = Fleet::start(1);
    // Two nodes are needed and there is one: the deploy waits...
    let deploy = spawn(fleet.depro_command(&["deploy", "v1", "-nodes=2", "-timeout=60s"]));
    fleet.expect_state("v1", "ready");
    // ...until someone removes the version.
    fleet.remove_version("v1");
    let out = finish(deploy);
    out.fails(2, &["v1 was removed", "current unchanged"]);
    assert_eq!(fleet.current(), None);
}

#[test]
fn rolling_back_after_a_failed_rollout_waits_for_the_node_to_run_its_rollout_hook_again() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("fail-rollout-v2", true);
    fleet
        .depro(&["deploy", "v2", "-nodes=2"])
        .fails(2, &["the rollout of v2 failed on node2"]);
    // node2 half-switched to v2; rolling back makes it run v1's rollout
    // hook again, which waits here.
    fleet.agents[1].set_flag("block-rollout", true);
    let mut back = spawn(fleet.depro_command(&["rollback", "-nodes=2", "-timeout=60s"]));
    wait_for("node2's rollout of v1 to start", || {
        fleet.agents[1].dir.join("rollout.pid").exists()
    });
    fleet.wait("node1 back on v1", |f| {
        f.node_state("v1", "node1").as_deref() == Some("active")
    });
    // Every node but node2 is done, and node2's hook has not finished: the
    // rollback must not report success yet.
    assert!(
        !exits_within(&mut back, Duration::from_secs(2)),
        "the rollback ended while node2's rollout hook was still running: {:#?}",
        finish(back)
    );
    fleet.agents[1].set_flag("release-rollout", true);
    let out = finish(back);
    assert!(out.ok().contains("v1 is current"), "{out:#?}");
    let node2 = fleet.agents[1].hooks_log();
    assert_eq!(node2.last().map(String::as_str), Some("rollout v1 from=v1"));
    fleet.expect_active("v1");
}

#[test]
fn rollback_on_failure_never_overwrites_another_operators_switch() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet
        .depro(&["deploy", "v3", "-nodes=2", "-no-rollout"])
        .ok();
    fleet.agents[1].set_flag("fail-rollout-v2", true);
    fleet.agents[1].set_flag("block-rollout", true);
    let proxy = Proxy::start(&fleet.consul.addr());
    // The switch commits, and its answer takes a while to come back...
    proxy.rule(switch_txn(), Action::DelayAnswer(Duration::from_secs(3)), 1);
    let deploy = spawn(fleet.depro_via(
        &proxy.addr(),
        &[
            "deploy",
            "v2",
            "-nodes=2",
            "-rollback-on-failure",
            "-timeout=60s",
        ],
    ));
    fleet.wait("current switched to v2", |f| {
        f.current().as_deref() == Some("v2")
    });
    // ...during which another operator switches to v3.
    fleet.set_current("v3");
    // node2's rollout of v2 fails.
    fleet.agents[1].set_flag("release-rollout", true);
    let out = finish(deploy);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert_eq!(
        fleet.current().as_deref(),
        Some("v3"),
        "the other operator's switch was overwritten: {out:#?}"
    );
}

#[test]
fn nodes_0_and_timeout_0s_are_refused() {
    let fleet = Fleet::start(1);
    fleet
        .depro(&["deploy", "v1", "-nodes=0"])
        .fails(1, &["-nodes", "at least 1"]);
    fleet
        .depro(&["deploy", "v1", "-timeout=0s"])
        .fails(1, &["-timeout", "longer than 0s"]);
    fleet
        .depro(&["remove", "v1", "-wait", "-timeout=0s"])
        .fails(1, &["-timeout"]);
    assert_eq!(fleet.consul.get(&format!("{}/v1/", fleet.prefix)), None);
    assert_eq!(fleet.current(), None);
}

#[test]
fn remove_wait_says_which_nodes_vanished_with_their_agent_instead_of_counting_them_cleaned() {
    let mut fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=2"]).ok();
    let node2_session = fleet.session_of("v1", "node2").unwrap();
    fleet.agents[1].kill9();
    let remove = spawn(fleet.depro_command(&["remove", "v1", "-wait", "-timeout=60s"]));
    fleet.wait("node1 to clean v1", |f| {
        f.node_state("v1", "node1").is_none()
    });
    // node2's agent is dead: its session expires and its keys go with it.
    fleet.consul.destroy_session(&node2_session);
    let out = finish(remove);
    let text = out.ok();
    assert!(text.contains("purged from 1 node"), "{out:#?}");
    assert!(
        text.contains("node2") && text.contains("gone") && text.contains("may remain"),
        "{out:#?}"
    );
    assert!(
        fleet.agents[1].deployment_path("api").join("v1").exists(),
        "node2's directory is still there, as the message says"
    );
}

#[test]
fn the_reads_a_command_decides_on_are_consistent_not_served_by_a_leader_still_catching_up() {
    // Right after an election, Consul serves default reads before the new
    // leader has applied what the old one committed (its barrier); only
    // `?consistent` waits for it. A deploy that read an old `current` there
    // exited 5, saying current had moved "while it waited" (seen in the soak).
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let proxy = Proxy::start(&fleet.consul.addr());
    fleet
        .depro_via(&proxy.addr(), &["deploy", "v2", "-nodes=2"])
        .output()
        .unwrap();
    let log = proxy.log();
    let reads: Vec<&String> = log
        .iter()
        .filter(|r| r.starts_with("GET ") && !r.contains("stale") && !r.contains("index="))
        .collect();
    assert!(!reads.is_empty(), "{log:#?}");
    for read in reads {
        assert!(
            read.contains("consistent"),
            "a deciding read that may be stale: {read}"
        );
    }
}
