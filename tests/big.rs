//! Trees bigger than one answer can carry: every command that reads the
//! whole prefix works on a prefix of 260,000 keys (26 versions × 10,000
//! nodes), more than 64 MiB as one listing, and `status` of such a fleet
//! summarises. Real CLI, real Consul; the node keys are written directly
//! (held by one session, as agents' keys are), not by 10,000 agents.
//! scripts/bench.sh measures each command at 10k, 100k and 1M keys.

mod support;

use support::Consul;

const VERSIONS: usize = 26;
const NODES: usize = 10_000;

/// A node name as long as real host names are (fully qualified).
fn node(n: usize) -> String {
    format!("web-{n:05}.rack12.dc1.example.internal")
}

/// Writes the tree: versions v00…v25 (v25 current), each with NODES nodes
/// ready (active on the current one), in transactions of 64 operations.
fn big_tree(consul: &Consul, prefix: &str) {
    // The node registers itself a moment after Consul starts: until then
    // sessions are refused.
    let wait_for_node = || consul.get("missing-key");
    support::wait_for("Consul's node to register", || {
        wait_for_node();
        consul.agent_sessions("nobody").is_empty()
            && serde_json::from_str::<serde_json::Value>(&consul.call("GET", "catalog/nodes", None))
                .is_ok_and(|nodes| nodes.as_array().is_some_and(|n| !n.is_empty()))
    });
    let session: serde_json::Value = serde_json::from_str(&consul.call(
        "PUT",
        "session/create",
        Some(br#"{"Name": "big-tree", "TTL": "600s", "Behavior": "delete", "LockDelay": "0s"}"#),
    ))
    .unwrap();
    let session = session["ID"].as_str().unwrap().to_string();
    let mut ops: Vec<serde_json::Value> = Vec::new();
    // A client of its own: thousands of writes in a row, each tried again
    // on a connection Consul closed meanwhile (they are repeatable).
    let client = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let url = format!("http://{}/v1/txn", consul.addr());
    let flush = |ops: &mut Vec<serde_json::Value>| {
        if ops.is_empty() {
            return;
        }
        let body = serde_json::to_vec(&ops).unwrap();
        let mut tries = 0;
        loop {
            match client.put(&url).send(&body[..]) {
                // Read to its end, so that the connection is used again.
                Ok(mut response) if response.status() == 200 => {
                    let _ = response.body_mut().read_to_vec();
                    break;
                }
                other if tries < 5 => {
                    tries += 1;
                    eprintln!(
                        "txn of {} bytes: {:?}; again",
                        body.len(),
                        other.map(|r| r.status())
                    );
                }
                other => {
                    let log = consul.log();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    panic!("txn: {:?}\n{tail:#?}", other.map(|r| r.status()))
                }
            }
        }
        ops.clear();
    };
    for v in 0..VERSIONS {
        let version = format!("v{v:02}");
        let current = v == VERSIONS - 1;
        let state = |n: usize| match n {
            // Two nodes are not where they should be.
            7 if current => "failed",
            8 if current => "busy",
            _ if current => "active",
            _ => "ready",
        };
        let folder = format!("{prefix}/{version}/");
        let folder_op = serde_json::json!({"KV": {"Verb": "set", "Key": folder, "Value": ""}});
        let node_ops = (0..NODES).map(|n| {
            serde_json::json!({"KV": {
                "Verb": "lock",
                "Key": format!("{prefix}/{version}/{}", node(n)),
                "Value": support::base64(state(n)),
                "Session": session,
            }})
        });
        for op in std::iter::once(folder_op).chain(node_ops) {
            ops.push(op);
            if ops.len() == 64 {
                flush(&mut ops);
            }
        }
    }
    flush(&mut ops);
    consul.put(
        &format!("{prefix}/current"),
        &format!("v{:02}", VERSIONS - 1),
    );
}

#[test]
fn every_command_that_reads_the_whole_prefix_works_beyond_what_one_answer_carries() {
    let consul = Consul::start();
    let prefix = support::unique_prefix("big");
    big_tree(&consul, &prefix);
    let depro = |args: &[&str]| {
        let mut all = args.to_vec();
        let flag = format!("-prefix={prefix}");
        all.push(&flag);
        support::Output::of(
            support::depro_command(&consul.addr(), &all)
                .output()
                .unwrap(),
        )
    };
    // status: a summary, counts per version.
    let out = depro(&["status"]);
    let text = out.ok().to_string();
    assert!(text.contains("v25"), "{text}");
    assert!(text.contains("10000"), "{text}");
    assert!(
        text.lines().count() < 200,
        "summarised: {} lines",
        text.lines().count()
    );
    // ...and the nodes that are not where they should be.
    assert!(text.contains("2 nodes are not active on v25"), "{text}");
    assert!(text.contains(&format!("{}: v25 failed", node(7))), "{text}");
    assert!(text.contains(&format!("{}: v25 busy", node(8))), "{text}");
    // status -json: every version, with its node counts.
    let out = depro(&["status", "-json"]);
    let doc: serde_json::Value = serde_json::from_str(out.result()).unwrap();
    assert_eq!(doc["versions"].as_array().unwrap().len(), VERSIONS);
    // One version's nodes.
    let out = depro(&["status", "v03"]);
    assert!(out.ok().contains(&node(NODES - 1)));
    // history, and the commands that change the tree.
    depro(&["history"]).ok();
    depro(&["prune", "-keep=20", "-dry-run"]).ok();
    let out = depro(&["remove", "v00"]);
    assert!(out.result().contains("removed v00"), "{out:#?}");
    let out = depro(&["rollback", "-dry-run"]);
    assert!(out.ok().contains("v24"), "{out:#?}");
}
