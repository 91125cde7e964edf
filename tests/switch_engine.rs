//! The switch engine's spec: `-dry-run` prints the plan the real run then
//! carries out. For each situation, the same command runs with `-dry-run`,
//! then for real, on the same fleet (three agents, real Consul); the steps
//! each says it takes (the writes: create, retry, switch, waves, resume,
//! undo, prune) must be the same, and so must a refusal (its exit code and
//! its error).

mod support;

use support::{Fleet, Output, without_elapsed};

/// The steps a dry run says it would take.
fn planned(out: &Output) -> Vec<String> {
    let mut steps = Vec::new();
    for line in out.stdout.lines() {
        let Some(line) = line.strip_prefix("dry run: ") else {
            continue;
        };
        if let Some(rest) = line.strip_prefix("would roll out in waves") {
            let waves = rest.split("as of now: ").nth(1).unwrap();
            let waves = waves.split(')').next().unwrap();
            steps.push(format!("waves {waves}"));
        } else if let Some(rest) = line.strip_prefix("would roll ") {
            let (_, versions) = rest.split_once(" back from ").unwrap();
            steps.push(format!("rollback {}", versions.replace(" to ", " -> ")));
        } else if line.starts_with("would create ") {
            steps.push("create".into());
        } else if let Some(rest) = line.strip_prefix("would delete ") {
            let node = rest.rsplit("ask ").next().unwrap();
            steps.push(format!("retry {}", node.trim_end_matches(" to try again")));
        } else if line.contains("then stop: current unchanged") {
            steps.push("stop".into());
        } else if line.contains("is already current") {
            steps.push("already current".into());
        } else if let Some(rest) = line.strip_prefix("would resume the progressive rollout of ") {
            let wave = rest.split(" at wave ").nth(1).unwrap();
            let (k, rest) = wave.split_once(" of ").unwrap();
            let m = rest.split(' ').next().unwrap();
            steps.push(format!("resume at wave {k}/{m}"));
        } else if let Some(rest) = line.strip_prefix("would switch ") {
            let to = rest.split(" to ").nth(1).unwrap();
            steps.push(format!("switch to {}", to.split(' ').next().unwrap()));
        } else if line.starts_with("would undo ") {
            steps.push("undo".into());
        } else if let Some(rest) = line.split(": restart ").nth(1) {
            // `… restart v5 on the 3 nodes that run it, in 3 waves (node1 | node2 | node3)`
            let waves = rest.rsplit_once(" (").unwrap().1.trim_end_matches(')');
            let waves: Vec<String> = waves.split(" | ").map(|w| format!("[{w}]")).collect();
            steps.push(format!("restart {}", waves.join(" ")));
        } else if let Some(rest) = line.strip_prefix("would resume the restart of ") {
            let wave = rest.split(" at wave ").nth(1).unwrap();
            let (k, rest) = wave.split_once(" of ").unwrap();
            let m = rest.split(' ').next().unwrap();
            steps.push(format!("resume restart at wave {k}/{m}"));
        } else if let Some(list) = line.strip_prefix("would then prune ") {
            for version in list.split(", ") {
                steps.push(format!("prune {version}"));
            }
        }
    }
    steps
}

/// The steps a real run says it took, in the same words.
fn taken(out: &Output) -> Vec<String> {
    let mut steps = Vec::new();
    let mut waves: Vec<String> = Vec::new();
    let shown = out.stderr.lines().chain(out.stdout.lines());
    for line in shown.map(without_elapsed) {
        if let Some(rest) = line.strip_prefix("rolling back ") {
            let (_, versions) = rest.split_once(" from ").unwrap();
            steps.push(format!("rollback {}", versions.replace(" to ", " -> ")));
        } else if line.starts_with("created ") {
            steps.push("create".into());
        } else if let Some(node) = line.strip_suffix(": failed before; asked it to try again") {
            steps.push(format!("retry {node}"));
        } else if line.contains("; current unchanged") && line.contains(" is ready on ") {
            steps.push("stop".into());
        } else if line.contains(" was already current under ") {
            steps.push("already current".into());
        } else if let Some(rest) = line.strip_prefix("resuming the rollout of ") {
            let wave = rest.split(": wave ").nth(1).unwrap();
            let (k, rest) = wave.split_once(" of ").unwrap();
            let m = rest.split(' ').next().unwrap();
            steps.push(format!("resume at wave {k}/{m}"));
        } else if line.starts_with("rolling out ") && line.contains(" waves (") {
            steps.push("waves".into());
        } else if line.starts_with("restarting ") && line.contains(" wave") {
            steps.push("restart".into());
        } else if let Some(rest) = line.strip_prefix("resuming the restart of ") {
            let wave = rest.split(": wave ").nth(1).unwrap();
            let (k, rest) = wave.split_once(" of ").unwrap();
            let m = rest.split(' ').next().unwrap();
            steps.push(format!("resume restart at wave {k}/{m}"));
        } else if let Some(rest) = line.strip_prefix("wave ") {
            // `wave 1/3: node1 switching to v4`
            // (or `wave 1/3: node1 restarting v5`)
            if let Some((_, nodes)) = rest.split_once(": ") {
                let version = nodes.rsplit(' ').next().unwrap();
                let nodes = nodes
                    .strip_suffix(&format!(" switching to {version}"))
                    .or_else(|| nodes.strip_suffix(&format!(" restarting {version}")));
                if let Some(nodes) = nodes {
                    waves.push(format!("[{nodes}]"));
                }
            }
        } else if let Some(rest) = line.strip_prefix("current: ") {
            let to = rest.split(" -> ").nth(1).unwrap();
            steps.push(format!("switch to {to}"));
        } else if line.starts_with("undid the rollout of ") {
            steps.push("undo".into());
        } else if let Some(version) = line.strip_prefix("pruned ") {
            steps.push(format!("prune {version}"));
        }
    }
    // The waves a real run started, in the dry run's words.
    if let Some(step) = steps.iter_mut().find(|s| *s == "waves" || *s == "restart") {
        *step = format!("{step} {}", waves.join(" "));
    }
    steps
}

/// Runs `args` with `-dry-run`, then for real; both must agree on the
/// steps (and on the refusal, if any). Returns the real run's output.
fn same_plan(fleet: &Fleet, args: &[&str], expected: &[&str]) -> Output {
    let mut dry_args = args.to_vec();
    dry_args.push("-dry-run");
    let dry = fleet.depro(&dry_args);
    let real = fleet.depro(args);
    assert_eq!(
        dry.code, real.code,
        "exit codes differ:\n{dry:#?}\n{real:#?}"
    );
    if real.code != Some(0) {
        assert_eq!(dry.error(), real.error(), "refusals differ");
        assert!(expected.is_empty(), "refused: {real:#?}");
        return real;
    }
    let planned = planned(&dry);
    assert_eq!(planned, taken(&real), "\n{dry:#?}\n{real:#?}");
    assert_eq!(planned, expected, "{dry:#?}");
    real
}

/// Leaves a progressive rollout of `version` (already ready everywhere)
/// at its first wave: the command is interrupted during its pause.
fn leave_waves(fleet: &Fleet, version: &str) {
    let child = support::spawn(fleet.depro_command(&[
        "rollout",
        version,
        "-canary=1",
        "-batch=1",
        "-pause=10m",
    ]));
    fleet.wait("the canary active", |f| {
        f.node_state(version, "node1").as_deref() == Some("active")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(support::finish(child).code, Some(130));
}

#[test]
fn the_dry_run_prints_the_plan_the_real_run_carries_out() {
    let fleet = Fleet::start(3);

    // 1. Plain: a first version, created and switched to at once.
    same_plan(
        &fleet,
        &["deploy", "v1", "-nodes=3"],
        &["create", "switch to v1"],
    );
    same_plan(
        &fleet,
        &["deploy", "v2", "-nodes=3", "-keep=1"],
        &["create", "switch to v2"],
    );

    // 2. -keep: what is pruned once v3 is current (v3 and v2, the rollback
    // target, stay), not what pruning the tree before the switch gives.
    same_plan(
        &fleet,
        &["deploy", "v3", "-nodes=3", "-keep=1"],
        &["create", "switch to v3", "prune v1"],
    );

    // 3. Waves: a canary, then batches of one.
    same_plan(
        &fleet,
        &["deploy", "v4", "-nodes=3", "-no-rollout"],
        &["create", "stop"],
    );
    same_plan(
        &fleet,
        &["rollout", "v4", "-canary=1", "-batch=1"],
        &["waves [node1] [node2] [node3]", "switch to v4"],
    );

    // 4. Nothing to do: the version is current already.
    same_plan(&fleet, &["rollout", "v4", "-nodes=3"], &["already current"]);

    // 5. Retry: a node that failed is asked to try again.
    fleet.agents[2].set_flag("fail-deploy", true);
    fleet
        .depro(&["deploy", "v5", "-nodes=3", "-no-rollout"])
        .fails(2, &["v5 failed on node3"]);
    fleet.agents[2].set_flag("fail-deploy", false);
    same_plan(
        &fleet,
        &["deploy", "v5", "-nodes=3"],
        &["retry node3", "switch to v5"],
    );

    // 6. Resume: a rollout left at its first wave goes on from there,
    // whatever the flags of the command that resumes it.
    fleet
        .depro(&["deploy", "v6", "-nodes=3", "-no-rollout"])
        .ok();
    leave_waves(&fleet, "v6");
    // (-pause=0s: a resume takes the rollout's own -pause=10m otherwise.)
    same_plan(
        &fleet,
        &["rollout", "v6", "-nodes=3", "-pause=0s"],
        &["resume at wave 1/3", "switch to v6"],
    );

    // 7. A racing operator: another version's rollout is under way, so a
    // deploy is refused (exit 5) before it writes anything, dry or not.
    fleet
        .depro(&["deploy", "v7", "-nodes=3", "-no-rollout"])
        .ok();
    leave_waves(&fleet, "v7");
    let out = same_plan(&fleet, &["deploy", "v8", "-nodes=3"], &[]);
    out.fails(5, &["a progressive rollout of v7 is under way"]);
    assert!(
        fleet.consul.get(&format!("{}/v8/", fleet.prefix)).is_none(),
        "v8 was created"
    );

    // 8. Undo: a rollback while it is under way undoes it.
    same_plan(&fleet, &["rollback"], &["undo"]);
    assert_eq!(fleet.current().as_deref(), Some("v6"));

    // 9. A plain rollback goes to the last version before current.
    same_plan(
        &fleet,
        &["rollback", "-nodes=3"],
        &["rollback v6 -> v5", "switch to v5"],
    );

    // 10. Refused: a version removed from the tree (v1, pruned above), and
    // waves with nothing to keep outside them are refused the same way.
    let out = same_plan(&fleet, &["rollout", "v1"], &[]);
    out.fails(2, &["v1 is not in the tree"]);
    let out = same_plan(&fleet, &["rollback", "-to=v1"], &[]);
    out.fails(2, &["v1 is not in the tree"]);

    // 11. Restart: current's nodes in waves, current unmoved.
    same_plan(
        &fleet,
        &["restart", "-canary=1", "-batch=1", "-timeout=30s"],
        &["restart [node1] [node2] [node3]"],
    );
    assert_eq!(fleet.current().as_deref(), Some("v5"));

    // 12. A restart left at its first wave is resumed, not started again.
    let child =
        support::spawn(fleet.depro_command(&["restart", "-canary=1", "-batch=1", "-pause=10m"]));
    let ack = format!("{}/v5/.restarted/node1", fleet.prefix);
    let before = fleet.consul.get(&ack);
    fleet.wait("the canary restarted", |f| f.consul.get(&ack) != before);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(support::finish(child).code, Some(130));
    // (A deploy of current, the retry a halted restart names, resumes it
    // the same way, dry or not.)
    same_plan(
        &fleet,
        &["deploy", "v5", "-pause=0s", "-timeout=30s"],
        &["resume restart at wave 1/3"],
    );
}
