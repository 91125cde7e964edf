//! `depro events` (issue 22): one line per change of a real fleet's tree on
//! a real Consul, as JSON objects, resumed with `-since`, ended cleanly by
//! SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::Fleet;

/// `depro events -json` running, and the events it printed so far.
struct Follower {
    child: std::process::Child,
    events: Arc<Mutex<Vec<Value>>>,
    /// It said on stderr that it follows.
    following: Arc<std::sync::atomic::AtomicBool>,
}

impl Follower {
    fn start(fleet: &Fleet, extra: &[&str]) -> Follower {
        let mut args = vec!["events", "-json"];
        args.extend(extra);
        let mut child = support::spawn(fleet.depro_command(&args));
        let stdout = child.stdout.take().unwrap();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line: {line:?}: {e}"));
                sink.lock().unwrap().push(event);
            }
        });
        let following: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let said = following.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("following ") {
                    said.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        let follower = Follower {
            child,
            events,
            following,
        };
        fleet.wait("events following the prefix", |_| {
            follower.following.load(std::sync::atomic::Ordering::SeqCst)
        });
        follower
    }

    fn has(&self, want: &[(&str, &str)]) -> Option<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|e| want.iter().all(|(k, v)| e[*k] == *v))
            .cloned()
    }

    fn wait_for(&self, fleet: &Fleet, want: &[(&str, &str)]) -> Value {
        let mut found = None;
        fleet.wait(&format!("the event {want:?}"), |_| {
            found = self.has(want);
            found.is_some()
        });
        found.unwrap()
    }
}

#[test]
fn events_follow_versions_switches_waves_states_failures_and_agents_and_resume_with_since() {
    let mut fleet = Fleet::start(2);
    let follower = Follower::start(&fleet, &[]);
    fleet.depro(&["deploy", "v1", "-message=first"]).ok();
    let created = follower.wait_for(&fleet, &[("event", "created"), ("version", "v1")]);
    assert!(
        created["by"].as_str().is_some_and(|b| b.contains('@')),
        "{created}"
    );
    assert!(created["index"].as_u64().is_some_and(|i| i > 0));
    let switched = follower.wait_for(&fleet, &[("event", "switched"), ("to", "v1")]);
    assert_eq!(switched["how"], "deploy");
    assert_eq!(switched["message"], "first");
    follower.wait_for(
        &fleet,
        &[
            ("event", "state"),
            ("version", "v1"),
            ("node", "node2"),
            ("to", "active"),
        ],
    );

    // A canary rollout: its waves.
    fleet.depro(&["deploy", "v2", "-canary=1"]).ok();
    let wave = follower.wait_for(&fleet, &[("event", "wave_started"), ("version", "v2")]);
    assert_eq!(wave["wave"], 1);
    assert_eq!(wave["nodes"].as_array().map(Vec::len), Some(1));
    follower.wait_for(&fleet, &[("event", "wave_finished"), ("version", "v2")]);
    follower.wait_for(
        &fleet,
        &[("event", "switched"), ("from", "v1"), ("to", "v2")],
    );

    // A failure, with its reason; a removal; an agent leaving.
    fleet.agents[1].set_flag("fail-deploy", true);
    fleet.depro(&["deploy", "v3"]);
    let failed = follower.wait_for(
        &fleet,
        &[("event", "failed"), ("version", "v3"), ("node", "node2")],
    );
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("exit")),
        "{failed}"
    );
    fleet.depro(&["remove", "v1"]).ok();
    follower.wait_for(&fleet, &[("event", "removed"), ("version", "v1")]);
    fleet.agents[1].kill9();
    // Its session ends with its TTL (the harness's 10 s) at the latest.
    follower.wait_for(&fleet, &[("event", "left"), ("node", "node2")]);

    // SIGTERM ends it cleanly.
    let mut follower = follower;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follower.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = follower.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "exit after SIGTERM");

    // Resumed from the index of v2's switch: what came after it and is
    // still in the tree is told first (v3 created, node1's state of it; not
    // node2's failure: its keys went with its agent's session), not what
    // came before.
    let after = follower
        .has(&[("event", "switched"), ("to", "v2")])
        .unwrap()["index"]
        .as_u64()
        .unwrap();
    let resumed = Follower::start(&fleet, &[&format!("-since={after}")]);
    resumed.wait_for(&fleet, &[("event", "created"), ("version", "v3")]);
    resumed.wait_for(
        &fleet,
        &[("event", "state"), ("version", "v3"), ("node", "node1")],
    );
    assert!(
        resumed
            .has(&[("event", "created"), ("version", "v2")])
            .is_none()
    );
    let mut resumed = resumed;
    let _ = resumed.child.kill();
}

#[test]
fn since_an_index_tells_the_removals_and_the_departures_made_while_not_following() {
    let mut fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v0"]).ok();
    fleet.depro(&["deploy", "v1"]).ok();
    fleet.depro(&["deploy", "v2"]).ok();
    let since = fleet.consul.index();
    // While nothing follows: two switches (v3, then back to v2), v1 removed
    // by the CLI, v0 by a plain Consul
    // delete (the seed's protocol: the scout records it), node2 stopped
    // (cleanly), node3 died (recorded by the scout, or by the next one if
    // it was the scout).
    fleet.depro(&["deploy", "v3"]).ok();
    fleet.depro(&["rollback"]).ok();
    fleet.depro(&["remove", "v1"]).ok();
    fleet.wait("v1's keys gone", |f| f.node_state("v1", "node1").is_none());
    fleet.consul.delete(&format!("{}/v0/", fleet.prefix));
    fleet.wait("v0's keys gone", |f| f.node_state("v0", "node1").is_none());
    assert!(
        !fleet.agents[0].log().contains(".removed"),
        "agents leave the removal records alone"
    );
    fleet.agents[1].signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(fleet.agents[1].wait_exit(), Some(0));
    fleet.agents[2].kill9();
    let known = format!("{}/.known/node3", fleet.prefix);
    // Its session ends with its TTL (the harness's 10 s) at the latest.
    fleet.wait_within(Duration::from_secs(60), "node3's departure recorded", |f| {
        f.consul.get(&known).is_some_and(|r| r.contains("\"left\""))
    });

    let resumed = Follower::start(&fleet, &[&format!("-since={since}")]);
    let forth = resumed.wait_for(
        &fleet,
        &[("event", "switched"), ("from", "v2"), ("to", "v3")],
    );
    let back = resumed.wait_for(
        &fleet,
        &[("event", "switched"), ("from", "v3"), ("to", "v2")],
    );
    assert_eq!(
        (&forth["how"], &back["how"]),
        (&"deploy".into(), &"rollback".into())
    );
    let index = |e: &Value| e["index"].as_u64().unwrap();
    assert!(since < index(&forth) && index(&forth) < index(&back));
    let removed = resumed.wait_for(&fleet, &[("event", "removed"), ("version", "v1")]);
    assert!(
        removed["by"].as_str().is_some_and(|b| b.contains('@')),
        "{removed}"
    );
    assert!(removed["index"].as_u64().is_some_and(|i| i > since));
    let removed = resumed.wait_for(&fleet, &[("event", "removed"), ("version", "v0")]);
    assert!(
        removed["by"]
            .as_str()
            .is_some_and(|b| b.contains("another client")),
        "{removed}"
    );
    resumed.wait_for(&fleet, &[("event", "left"), ("node", "node2")]);
    resumed.wait_for(&fleet, &[("event", "left"), ("node", "node3")]);
    // What came before the index is not told again, and nothing twice.
    assert!(
        resumed
            .has(&[("event", "created"), ("version", "v2")])
            .is_none()
    );
    let told = resumed.events.lock().unwrap().clone();
    let count = |event: &str, version: &str| {
        told.iter()
            .filter(|e| e["event"] == event && (e["version"] == version || e["to"] == version))
            .count()
    };
    assert_eq!(
        (
            count("switched", "v3"),
            count("switched", "v2"),
            count("created", "v3")
        ),
        (1, 1, 1),
        "{told:#?}"
    );
    assert_eq!(
        count("removed", "v2") + count("removed", "v3"),
        0,
        "{told:#?}"
    );
    let indexes: Vec<u64> = told.iter().map(index).collect();
    assert!(
        indexes.is_sorted(),
        "in the order they happened: {indexes:?}"
    );
    let mut resumed = resumed;
    let _ = resumed.child.kill();
}
