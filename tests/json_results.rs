//! `-json` on deploy, rollout, rollback, wait, remove and prune (issue 22):
//! one result document on stdout with `"schema": 1`, for every exit code,
//! against real agents on a real Consul.

mod support;

use serde_json::Value;
use support::Fleet;

/// The command's stdout, which must be one JSON document, and its exit code.
fn result(fleet: &Fleet, args: &[&str]) -> (Value, i32) {
    let mut args = args.to_vec();
    args.push("-json");
    let out = fleet.depro(&args);
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {out:#?}"));
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["exit_code"], out.code.unwrap());
    assert_eq!(doc["ok"], out.code == Some(0));
    assert!(doc["meaning"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(doc["duration_seconds"].as_f64().is_some());
    (doc, out.code.unwrap())
}

#[test]
fn every_exit_code_comes_with_a_result_document_on_stdout() {
    let fleet = Fleet::start(2);

    // 0: a deploy that switched current.
    let (doc, code) = result(&fleet, &["deploy", "v1"]);
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(doc["command"], "deploy");
    assert_eq!(doc["switched"], true);
    assert_eq!(doc["current"]["before"], Value::Null);
    assert_eq!(doc["current"]["after"], "v1");
    assert_eq!(
        doc["nodes"]["v1"]["active"],
        serde_json::json!(["node1", "node2"])
    );
    assert_eq!(doc["error"], Value::Null);
    let (doc, code) = result(&fleet, &["deploy", "v2"]);
    assert_eq!((code, &doc["current"]["before"]), (0, &Value::from("v1")));
    let (doc, code) = result(&fleet, &["rollback"]);
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(doc["current"]["after"], "v1");
    let (doc, code) = result(&fleet, &["rollout", "v2"]);
    assert_eq!((code, &doc["current"]["after"]), (0, &Value::from("v2")));
    let (doc, code) = result(&fleet, &["wait", "v2", "-for=active", "-nodes=all"]);
    assert_eq!((code, &doc["switched"]), (0, &Value::from(false)));
    let (doc, code) = result(&fleet, &["remove", "v1", "-wait"]);
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(doc["removed"], serde_json::json!(["v1"]));

    // 2: a node failed, with its reason.
    fleet.agents[1].set_flag("fail-deploy", true);
    let (doc, code) = result(&fleet, &["deploy", "v3"]);
    assert_eq!(code, 2, "{doc:#}");
    assert_eq!(doc["switched"], false);
    assert_eq!(doc["nodes"]["v3"]["failed"], serde_json::json!(["node2"]));
    assert!(
        doc["reasons"]["v3"]["node2"]
            .as_str()
            .is_some_and(|r| r.contains("exit")),
        "{doc:#}"
    );
    assert!(
        doc["error"]
            .as_str()
            .is_some_and(|e| e.contains("v3 failed on node2"))
    );
    fleet.agents[1].set_flag("fail-deploy", false);

    // 3: timed out (three nodes asked of two).
    let (doc, code) = result(&fleet, &["wait", "v2", "-nodes=3", "-timeout=1s"]);
    assert_eq!(code, 3, "{doc:#}");

    // 5: another version's progressive rollout is under way.
    let (doc, code) = result(&fleet, &["deploy", "v4", "-canary=1", "-promote=manual"]);
    assert_eq!(code, 0, "{doc:#}");
    let (doc, code) = result(&fleet, &["deploy", "v5", "-canary=1"]);
    assert_eq!(code, 5, "{doc:#}");
    assert_eq!(doc["switched"], false);

    // 4: Consul unreachable; 1: a bad setting, found once the command
    // line was read.
    let prefix = format!("-prefix={}", fleet.prefix);
    let missing = "-token-file=/nonexistent/token";
    for (extra, code, says) in [("-quiet", 4, "unreachable"), (missing, 1, "token file")] {
        let out = support::Output::of(
            support::depro_command(
                "127.0.0.1:1",
                &["prune", "-keep=1", "-json", &prefix, extra],
            )
            .output()
            .unwrap(),
        );
        let doc: Value =
            serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:#?}"));
        assert_eq!(
            (out.code, &doc["exit_code"]),
            (Some(code), &Value::from(code))
        );
        assert!(
            doc["error"].as_str().is_some_and(|e| e.contains(says)),
            "{doc:#}"
        );
    }

    // 130: interrupted, with what it leaves behind (once it catches
    // SIGINT: its signal mask says so).
    let waiting = support::spawn(fleet.depro_command(&["wait", "v2", "-nodes=3", "-json"]));
    let status = format!("/proc/{}/status", waiting.id());
    fleet.wait("the wait catching SIGINT", |_| {
        std::fs::read_to_string(&status).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                .is_some_and(|mask| mask & (1 << 1) != 0)
        })
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(waiting.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = support::finish(waiting);
    assert_eq!(out.code, Some(130), "{out:#?}");
    let doc: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:#?}"));
    assert_eq!(
        (&doc["exit_code"], &doc["meaning"]),
        (&Value::from(130), &Value::from("interrupted"))
    );
    assert!(
        doc["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing was written")),
        "{doc:#}"
    );
}
