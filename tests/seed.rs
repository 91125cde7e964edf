//! The seed's own protocol, spoken by a client that is not depro: plain
//! HTTP writes to Consul's KV API (add `<prefix>/<version>/`, poll the node
//! keys until enough are `ready`, set `current`), against real agents. It
//! gets the same prompt service as the depro CLI: the agent that holds
//! `<prefix>/.scout` rings the doorbell for such changes.

mod support;

use std::time::{Duration, Instant};

use support::Fleet;

/// Waits until `condition` holds; returns how long it took.
fn timed(fleet: &Fleet<'_>, what: &str, mut condition: impl FnMut(&Fleet<'_>) -> bool) -> Duration {
    let start = Instant::now();
    fleet.wait(what, |f| condition(f));
    start.elapsed()
}

fn all_in(fleet: &Fleet<'_>, version: &str, state: &str) -> bool {
    fleet
        .agents
        .iter()
        .all(|a| fleet.node_state(version, &a.name).as_deref() == Some(state))
}

#[test]
fn the_seed_s_workflow_with_plain_kv_writes_is_served_as_promptly_as_the_cli() {
    let mut fleet = Fleet::new(3);
    fleet.start_all();
    fleet.wait("a scout", |f| {
        f.consul.get(&format!("{}/.scout", f.prefix)).is_some()
    });
    let put = |key: &str, value: &str| fleet.consul.put(&format!("{}/{key}", fleet.prefix), value);

    for (round, version) in ["v1", "v2", "v3"].into_iter().enumerate() {
        // 1. Add the version: every node deploys it at once (not at its next
        //    rescan, minutes away).
        put(&format!("{version}/"), "");
        let deployed = timed(&fleet, &format!("{version} ready everywhere"), |f| {
            all_in(f, version, "ready") || (round > 0 && all_in(f, version, "active"))
        });
        // 2. Set current: every node rolls it out at once, the first time
        //    too (when `current` did not exist yet).
        put("current", version);
        let rolled = timed(&fleet, &format!("{version} active everywhere"), |f| {
            all_in(f, version, "active")
        });
        eprintln!("{version}: ready after {deployed:?}, active after {rolled:?}");
        assert!(
            deployed < Duration::from_secs(3),
            "{version} deployed after {deployed:?}"
        );
        assert!(
            rolled < Duration::from_secs(2),
            "{version} rolled out after {rolled:?}\n{}",
            fleet
                .agents
                .iter()
                .map(|a| a.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
    }
    // 3. Remove a version with a plain delete of its folder key: every node
    //    cleans it at once.
    fleet.consul.delete(&format!("{}/v1/", fleet.prefix));
    let cleaned = timed(&fleet, "v1 cleaned everywhere", |f| {
        f.agents
            .iter()
            .all(|a| !a.version_dirs("api").contains(&"v1".to_string()))
    });
    assert!(
        cleaned < Duration::from_secs(3),
        "v1 cleaned after {cleaned:?}"
    );
    let scout_rang = fleet.agents.iter().any(|a| {
        a.log()
            .contains("without a ring of the doorbell (another client)")
    });
    assert!(scout_rang, "the scout rang for the plain writes");
}

#[test]
fn when_the_scout_dies_another_agent_scouts() {
    let mut fleet = Fleet::new(2);
    fleet.start_all();
    let scout_key = format!("{}/.scout", fleet.prefix);
    fleet.wait("a scout", |f| f.consul.get(&scout_key).is_some());
    let scout = fleet.consul.get(&scout_key).unwrap();
    let (dead, alive) = if scout == "node1" { (0, 1) } else { (1, 0) };
    fleet.agents[dead].kill9();
    // Its session expires (TTL 10 s here, Consul keeps it 20 s): the other
    // agent takes the lock.
    fleet.wait_within(Duration::from_secs(60), "the other agent to scout", |f| {
        f.consul.get(&scout_key).as_deref() == Some(f.agents[alive].name.as_str())
    });
    fleet.consul.put(&format!("{}/v1/", fleet.prefix), "");
    let alive_name = fleet.agents[alive].name.clone();
    let deployed = timed(&fleet, "v1 ready on the live node", |f| {
        f.node_state("v1", &alive_name).as_deref() == Some("ready")
    });
    assert!(
        deployed < Duration::from_secs(3),
        "deployed after {deployed:?}"
    );
}
