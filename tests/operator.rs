//! The operator's day (issue 11): the checks and outputs an operator and
//! their scripts rely on, against the real binary.

mod support;

use std::path::Path;
use std::process::Command;

use support::{Output, depro_bin};

/// `depro agent -check` with a config directory holding `files`.
fn check(dir: &Path, files: &[(&str, &str)]) -> Output {
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    for (name, text) in files {
        std::fs::write(conf.join(name), text).unwrap();
    }
    Output::of(
        Command::new(depro_bin())
            .arg("agent")
            .arg("-check")
            .arg(format!("-config-dir={}", conf.display()))
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("CONSUL_HTTP_TOKEN")
            .output()
            .unwrap(),
    )
}

fn deployment(dir: &Path, extra: &str) -> String {
    format!(
        r#"{{ "name": "web-1", "server": "127.0.0.1:1",
             "deployments": [ {{ "id": "api", "path": "{}/deploy/api", "prefix": "api/version",
                                 "deploy": ["true"]{extra} }} ] }}"#,
        dir.display()
    )
}

#[test]
fn agent_check_accepts_a_valid_configuration_without_contacting_consul() {
    let dir = tempfile::tempdir().unwrap();
    // 127.0.0.1:1 answers nothing: a check that contacted Consul would fail.
    let out = check(dir.path(), &[("depro.json", &deployment(dir.path(), ""))]);
    let text = out.ok();
    assert!(
        text.contains("the configuration is valid: node web-1, 1 deployment (api)"),
        "{out:#?}"
    );
    assert!(text.contains("(not contacted)"), "{out:#?}");
    assert!(text.contains("depro.json"), "{out:#?}");
    assert!(
        !dir.path().join("deploy/api/.depro").exists(),
        "a check changes nothing"
    );
}

#[test]
fn agent_check_names_the_file_and_field_of_each_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, &[&str])> = vec![
        (
            deployment(dir.path(), r#", "timeout": "ten""#),
            &["depro.json", "timeout", "ten"],
        ),
        (
            deployment(dir.path(), r#", "shell": "no-such-shell""#),
            &["depro.json", "shell", "no-such-shell"],
        ),
        (
            deployment(dir.path(), r#", "health_timeout": "1m""#),
            &["health_timeout", "no health hook"],
        ),
        ("{ \"nmae\": \"x\" }".to_string(), &["depro.json", "nmae"]),
    ];
    for (text, needles) in cases {
        check(dir.path(), &[("depro.json", &text)]).fails(1, needles);
    }
    // A deployment path that cannot be a directory.
    std::fs::write(dir.path().join("file"), "").unwrap();
    let text = format!(
        r#"{{ "deployments": [ {{ "id": "api", "path": "{}/file/api", "prefix": "api/version" }} ] }}"#,
        dir.path().display()
    );
    check(dir.path(), &[("depro.json", &text)]).fails(1, &["path", "Not a directory"]);
    // A config file others may change.
    let conf = dir.path().join("conf/depro.json");
    std::fs::write(&conf, deployment(dir.path(), "")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o666)).unwrap();
    check(dir.path(), &[]).fails(1, &["depro.json", "chmod"]);
}

/// The example of depro.json(5), as the page shows it (roff escapes undone).
fn man_page_example() -> String {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("man/depro.json.5"))
            .unwrap();
    let examples = &page[page.find(".SH EXAMPLES").unwrap()..];
    let start = examples.find(".EX\n").unwrap() + 4;
    let end = examples.find(".EE\n").unwrap();
    examples[start..end]
        .replace("\\-", "-")
        .replace("\\e", "\\")
}

#[test]
fn the_depro_json_5_example_deploys_and_rolls_out_on_a_fresh_host_and_again() {
    let consul = support::Consul::shared();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The tools the example calls, as stand-ins: wget serves a build,
    // rackadmin, systemctl and curl succeed.
    let bin = root.join("bin");
    std::fs::create_dir_all(root.join("build")).unwrap();
    std::fs::write(root.join("build/index.html"), "hello").unwrap();
    let tarball = root.join("build.tar.gz");
    assert!(
        Command::new("tar")
            .arg("czf")
            .arg(&tarball)
            .arg("-C")
            .arg(root.join("build"))
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
    std::fs::create_dir_all(&bin).unwrap();
    for (tool, body) in [
        ("wget", format!("cat {}", tarball.display())),
        ("rackadmin", "exit 0".into()),
        ("systemctl", "exit 0".into()),
        ("curl", "exit 0".into()),
    ] {
        let path = bin.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let api = support::unique_prefix("api");
    let web = support::unique_prefix("website");
    let example = man_page_example();
    let mut config = example.clone();
    for (from, to) in [
        ("localhost:8500", consul.addr()),
        ("/data/deploy/", format!("{}/deploy/", root.display())),
        ("\"api/version\"", format!("\"{api}\"")),
        ("\"website/version\"", format!("\"{web}\"")),
    ] {
        assert!(config.contains(from), "the example no longer has {from:?}");
        config = config.replace(from, &to);
    }
    std::fs::create_dir_all(root.join("conf")).unwrap();
    std::fs::write(root.join("conf/depro.json"), &config).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new(depro_bin());
    command
        .arg("agent")
        .arg(format!("-config-dir={}", root.join("conf").display()))
        .env("PATH", &path)
        .env_remove("CONSUL_HTTP_ADDR")
        .stdout(std::fs::File::create(root.join("agent.log")).unwrap())
        .stderr(std::fs::File::create(root.join("agent.err")).unwrap());
    support::die_with_parent(&mut command);
    let mut agent = command.spawn().unwrap();
    let log = || std::fs::read_to_string(root.join("agent.err")).unwrap_or_default();
    // A fresh host (no live link yet), then again over a live version.
    for version in ["v1", "v2"] {
        for prefix in [&api, &web] {
            let out = Output::of(
                support::depro_command(&consul.addr(), &["deploy", version])
                    .arg(format!("-prefix={prefix}"))
                    .output()
                    .unwrap(),
            );
            assert_eq!(out.code, Some(0), "{out:#?}\n{}", log());
        }
        let live = std::fs::read_link(root.join("deploy/website/live")).unwrap();
        assert_eq!(live, root.join("deploy/website").join(version));
        assert_eq!(
            std::fs::read_to_string(live.join("index.html")).unwrap(),
            "hello"
        );
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

// ------------------------------------------------------------ completion

fn completion(shell: &str) -> String {
    Output::of(
        Command::new(depro_bin())
            .args(["completion", shell])
            .output()
            .unwrap(),
    )
    .ok()
    .to_string()
}

/// Runs `script` in `shell` (installed by scripts/test.sh).
fn in_shell(shell: &str, script: &str) -> String {
    let out = Command::new(shell)
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("{shell}: {e} (apt-get install {shell}; scripts/test.sh does)"));
    assert!(out.status.success(), "{shell}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_packaged_completion_scripts_are_what_depro_completion_prints() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/completions");
    for (shell, file) in [
        ("bash", "depro.bash"),
        ("zsh", "_depro"),
        ("fish", "depro.fish"),
    ] {
        assert_eq!(
            std::fs::read_to_string(dir.join(file)).unwrap(),
            completion(shell),
            "packaging/completions/{file} is stale: run `depro completion {shell} > packaging/completions/{file}`"
        );
    }
    Output::of(
        Command::new(depro_bin())
            .args(["completion", "tcsh"])
            .output()
            .unwrap(),
    )
    .fails(1, &["bash, zsh or fish"]);
}

#[test]
fn bash_completes_commands_flags_and_file_names() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("depro.bash");
    std::fs::write(&script, completion("bash")).unwrap();
    std::fs::write(dir.path().join("token.txt"), "").unwrap();
    let complete = |words: &str| {
        in_shell(
            "bash",
            &format!(
                "source {}; cd {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                 _depro; echo \"${{COMPREPLY[@]}}\"",
                script.display(),
                dir.path().display()
            ),
        )
    };
    assert_eq!(complete("depro dep").trim(), "deploy");
    assert_eq!(complete("depro deploy -pre").trim(), "-prefix=");
    assert_eq!(complete("depro rollout -can").trim(), "-canary=");
    assert_eq!(complete("depro agent -che").trim(), "-check");
    assert_eq!(
        complete("depro status -prefix = x -token-file = tok").trim(),
        "token.txt"
    );
    assert_eq!(complete("depro completion f").trim(), "fish");
    // Values of a few words (issue 20).
    assert_eq!(complete("depro wait v1 -for = a").trim(), "active");
    assert_eq!(complete("depro agent -log-format = j").trim(), "json");
    assert_eq!(complete("depro agent -log-level = d").trim(), "debug");
    assert_eq!(complete("depro agent -log-f").trim(), "-log-format=");
}

#[test]
fn zsh_and_fish_complete_commands_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let zsh = dir.path().join("_depro");
    std::fs::write(&zsh, completion("zsh")).unwrap();
    // zsh's completion system needs a terminal; its functions are stood in
    // for, so that what the script asks them to offer is printed.
    let offered = in_shell(
        "zsh",
        &format!(
            "_describe() {{ print -l -- \"${{(@P)2}}\" }}; _arguments() {{ print -l -- \"$@\" }}; \
             _values() {{ print -l -- \"$@\" }}; source {}; \
             words=(depro); CURRENT=2; _depro; echo SPLIT; \
             words=(depro deploy -); CURRENT=3; _depro",
            zsh.display()
        ),
    );
    let (commands, deploy) = offered.split_once("SPLIT").unwrap();
    assert!(commands.contains("deploy:add a version"), "{offered}");
    assert!(
        deploy.contains("-prefix=[the KV prefix of the deployment]"),
        "{offered}"
    );
    assert!(deploy.contains("-canary=["), "{offered}");

    let fish = dir.path().join("depro.fish");
    std::fs::write(&fish, completion("fish")).unwrap();
    let offered = in_shell(
        "fish",
        &format!(
            "source {}; complete -C 'depro dep'; complete -C 'depro rollout -ba'; \
             complete -C 'depro wait v1 -for='",
            fish.display()
        ),
    );
    assert!(offered.contains("deploy\tadd a version"), "{offered}");
    assert!(offered.contains("-batch\t"), "{offered}");
    // A value of a few words: those words, no file names.
    assert!(offered.contains("-for=ready\t"), "{offered}");
    assert!(offered.contains("-for=active\t"), "{offered}");
    assert!(!offered.contains("-for=Cargo"), "{offered}");
}

// ------------------------------------------------------- status -json

#[test]
fn status_json_is_an_interface_even_on_an_empty_prefix() {
    let fleet = support::Fleet::start(1);
    // A prefix with neither agents nor versions: the document, then exit 2.
    let unused = format!("-prefix={}-unused", fleet.prefix);
    let empty = support::Output::of(
        support::depro_command(&fleet.consul.addr(), &["status", "-json", &unused])
            .output()
            .unwrap(),
    );
    assert_eq!(empty.code, Some(2), "{empty:#?}");
    assert_eq!(empty.stderr.lines().count(), 1, "{empty:#?}");
    let doc: serde_json::Value = serde_json::from_str(&empty.stdout).unwrap();
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["versions"], serde_json::json!([]));
    assert!(doc["current"].is_null(), "{doc}");
    // One its agent follows, before any version: the document, exit 0
    // (once the agent announced itself: it may still be starting).
    fleet.wait("node1's announcement", |f| {
        f.consul
            .get(&format!("{}/.agents/node1", f.prefix))
            .is_some()
    });
    let doc: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert_eq!(doc["versions"], serde_json::json!([]));
    assert!(doc["agents"]["node1"].is_object(), "{doc}");

    fleet.depro(&["deploy", "v1"]).ok();
    fleet.depro(&["deploy", "v2"]).ok();
    let doc: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert_eq!(doc["current"], "v2");
    assert_eq!(doc["previous"], "v1", "the rollback target");
    assert!(doc["versions"][0]["current_since"].is_null(), "{doc}");
    assert!(doc["versions"][1]["current_since"].is_string(), "{doc}");
    // When each node's state was written: v1 went back to ready before
    // v2's rollout hook ran, and v2 became active after it.
    let since = |v: usize| {
        doc["versions"][v]["nodes_since"]["node1"]
            .as_str()
            .map(String::from)
    };
    let (v1_ready, v2_active) = (since(0).expect("v1's time"), since(1).expect("v2's time"));
    assert!(v1_ready.ends_with('Z') && v1_ready.len() == 24, "{doc}");
    assert!(v1_ready <= v2_active, "{doc}");
    assert!(
        v2_active.as_str() >= doc["versions"][1]["current_since"].as_str().unwrap(),
        "active before current moved: {doc}"
    );
}

// ------------------------------------------------------------- history

#[test]
fn history_lists_each_switch_newest_first_with_who_and_how() {
    let fleet = support::Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=2"]).ok();
    fleet.depro(&["rollback", "-nodes=2"]).ok();
    fleet.depro(&["rollout", "v2", "-nodes=2", "-batch=1"]).ok();
    // A rollout that fails on node2 and is switched back.
    fleet.agents[1].set_flag("fail-rollout-v3", true);
    fleet
        .depro(&["deploy", "v3", "-nodes=2", "-rollback-on-failure"])
        .fails(2, &["failed on node2"]);

    let doc: serde_json::Value =
        serde_json::from_str(fleet.depro(&["history", "-json"]).ok()).unwrap();
    let switches: Vec<(String, String, String)> = doc["switches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["version"].as_str().unwrap().to_string(),
                s["from"].as_str().unwrap().to_string(),
                s["how"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("v2", "v3", "rollback-on-failure"),
        ("v3", "v2", "deploy"),
        ("v2", "v1", "rollout (waves)"),
        ("v1", "v2", "rollback"),
        ("v2", "v1", "deploy"),
        ("v1", "", "deploy"),
    ]
    .map(|(v, f, h)| (v.to_string(), f.to_string(), h.to_string()));
    assert_eq!(switches, expected, "{doc}");
    assert!(
        doc["switches"][0]["by"].as_str().unwrap().contains('@'),
        "{doc}"
    );

    let table = fleet.depro(&["history"]).ok().to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SINCE"), "{table}");
    assert!(lines[1].contains("rollback-on-failure"), "{table}");
    assert_eq!(lines.len(), 7, "{table}");
}

// ---------------------------------------------------------------- wait

#[test]
fn wait_returns_once_a_version_deployed_elsewhere_is_ready_or_active_on_enough_nodes() {
    let fleet = support::Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    // Another script deploys v2 (node2 is slow); this one waits for it.
    fleet.agents[1].set_flag("block-deploy", true);
    let deploy = support::spawn(fleet.depro_command(&["deploy", "v2", "-no-rollout", "-nodes=2"]));
    fleet.wait("node2 busy with v2", |f| {
        f.node_state("v2", "node2").as_deref() == Some("busy")
    });
    let mut waiting =
        support::spawn(fleet.depro_command(&["wait", "v2", "-for=ready", "-nodes=all"]));
    // It waits: its progress says one of the two is ready before node2 may finish.
    let progress = std::io::BufReader::new(waiting.stderr.take().unwrap());
    let mut lines = std::io::BufRead::lines(progress);
    let mut seen = Vec::new();
    // (`lines` lives on: the command's later progress must not meet a closed pipe.)
    for line in lines.by_ref() {
        let line = line.unwrap();
        let waiting_for_node2 = line.ends_with(" 1/2 ready");
        seen.push(line);
        if waiting_for_node2 {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.ends_with(" 1/2 ready")),
        "{seen:#?}"
    );
    fleet.agents[1].set_flag("release", true);
    let out = support::finish(waiting);
    assert!(out.result().contains("v2 is ready on 2 nodes"), "{out:#?}");
    drop(lines);
    support::finish(deploy).ok();

    // Active: only once rolled out. Until something makes it current it
    // cannot be, and the wait says so at once, and again when it ends
    // (issue 20: it waited its whole timeout in silence).
    let out = fleet.depro(&["wait", "v2", "-for=active", "-nodes=2", "-timeout=1s"]);
    out.fails(
        3,
        &[
            "timed out",
            "v2 is active on 0 of the 2 nodes",
            "v2 is not current and no rollout of it is under way",
        ],
    );
    assert!(
        out.stderr.lines().any(|l| l.contains(
            "v2 is not current and no rollout of it is under way: it becomes active once \
             something makes it current (`depro rollout v2"
        )),
        "{out:#?}"
    );
    // A count never above what it needs: not "2/1 ready".
    let out = fleet.depro(&["wait", "v2", "-for=ready", "-nodes=1"]);
    assert!(
        out.ok().contains("2/2 ready") && !out.stderr.contains("2/1"),
        "{out:#?}"
    );
    fleet.depro(&["rollout", "v2", "-nodes=2"]).ok();
    let out = fleet.depro(&["wait", "v2", "-nodes=all"]);
    assert!(out.ok().contains("v2 is active on 2 nodes"), "{out:#?}");

    // A failure ends the wait at once, with the reason.
    fleet.agents[0].set_flag("fail-deploy", true);
    fleet
        .depro(&["deploy", "v3", "-no-rollout", "-nodes=2"])
        .fails(2, &["failed"]);
    fleet.depro(&["wait", "v3", "-for=ready"]).fails(
        2,
        &["v3 failed on node1 (the deploy hook exited with status 3)"],
    );
    fleet
        .depro(&["wait", "v9"])
        .fails(2, &["v9 is not in the tree"]);
}

// -------------------------------------------------------- agent logs

#[test]
fn the_agent_logs_one_json_object_per_line_with_its_deployment_and_version() {
    let consul = support::Consul::shared();
    let dir = tempfile::tempdir().unwrap();
    let prefix = support::unique_prefix("json");
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    let mut deployment = support::default_deployment("api", dir.path(), &prefix);
    deployment["deploy"]
        .as_array_mut()
        .unwrap()
        .insert(0, "echo fetching $VERSION".into());
    let config = serde_json::json!({
        "name": "web-1",
        "server": consul.addr(),
        "deployments": [deployment],
    });
    std::fs::write(dir.path().join("conf/depro.json"), config.to_string()).unwrap();
    let log = dir.path().join("agent.log");
    let mut command = Command::new(depro_bin());
    command
        .arg("agent")
        .arg(format!("-config-dir={}", dir.path().join("conf").display()))
        .arg("-log-format=json")
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("DEPRO_LOG")
        .env_remove("JOURNAL_STREAM")
        .stderr(std::fs::File::create(&log).unwrap());
    support::die_with_parent(&mut command);
    let mut agent = command.spawn().unwrap();
    let out = Output::of(
        support::depro_command(&consul.addr(), &["deploy", "v1"])
            .arg(format!("-prefix={prefix}"))
            .output()
            .unwrap(),
    );
    out.ok();
    let _ = agent.kill();
    let _ = agent.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(lines.len() > 5, "{text}");
    for line in &lines {
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
        assert!(["info", "warn", "error", "debug"].contains(&line["level"].as_str().unwrap()));
        assert_eq!(line["node"], "web-1");
    }
    let active = lines
        .iter()
        .find(|l| l["message"] == "api v1: active")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(active["deployment"], "api");
    assert_eq!(active["version"], "v1");
    let hook = lines.iter().find(|l| {
        l["message"]
            .as_str()
            .unwrap()
            .starts_with("[api v1 deploy]")
    });
    assert!(hook.is_some_and(|h| h["version"] == "v1"), "{text}");
}

// ------------------------------------------------------- status -watch

#[test]
fn status_watch_prints_the_state_then_a_line_per_change_when_not_on_a_terminal() {
    use std::io::BufRead;
    let fleet = support::Fleet::start(2);
    let mut watch = support::spawn(fleet.depro_command(&["status", "-watch"]));
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    // Answers may coalesce quick changes (busy, then ready), so only what
    // every reading shows is required: the creation, the switch, and each
    // node ending active.
    let mut seen: Vec<String> = Vec::new();
    let done = |seen: &[String]| {
        seen.iter().any(|l| l.ends_with("v1: created"))
            && seen.iter().any(|l| l.ends_with("current: unset -> v1"))
            && ["node1", "node2"].iter().all(|n| {
                seen.iter()
                    .any(|l| l.contains(&format!("v1 {n}: ")) && l.ends_with("active"))
            })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done(&seen) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("not every change was printed: {seen:#?}"),
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    // The starting state comes first, as a state (issue 20: it was printed
    // as changes from nothing).
    assert!(seen[0].ends_with("Z now: current unset"), "{seen:#?}");
    // Each line starts with a timestamp.
    assert!(
        seen.iter().all(|l| l.starts_with("20") && l.contains("Z ")),
        "{seen:#?}"
    );
    // The order of events is kept: created first, the switch before the
    // nodes are active.
    let at = |f: &dyn Fn(&String) -> bool| seen.iter().position(f).unwrap();
    assert_eq!(
        at(&|l| l.contains("v1")),
        at(&|l| l.ends_with("v1: created"))
    );
    assert!(
        at(&|l| l.ends_with("current: unset -> v1"))
            < at(&|l| l.contains("v1 node1: ") && l.ends_with("active"))
    );
}

// -------------------------------------------------------------- errors

#[test]
fn an_empty_config_file_gets_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    check(dir.path(), &[("depro.json", "  \n// nothing yet\n")]).fails(
        1,
        &["depro.json", "the config file is empty", "remove the file"],
    );
}

#[test]
fn a_relative_token_file_is_read_from_the_config_file_s_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(dir.path().join("conf/token"), "s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("conf/token"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let text = r#"{ "name": "web-1", "token_file": "token" }"#;
    // The check runs from the crate's directory, not from conf/.
    let out = check(dir.path(), &[("depro.json", text)]);
    assert!(out.ok().contains("is valid"), "{out:#?}");
    assert!(!out.stdout.contains("s3cret") && !out.stderr.contains("s3cret"));
    let missing = r#"{ "name": "web-1", "token_file": "nope" }"#;
    check(dir.path(), &[("depro.json", missing)]).fails(
        1,
        &[&format!("{}/conf/nope", dir.path().display()), "token_file"],
    );
}

// ------------------------------------------------------------- dry run

#[test]
fn dry_runs_print_what_would_happen_write_nothing_and_exit_as_the_real_run_would_start() {
    let fleet = support::Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=2"]).ok();
    let prefix = format!("{}/", fleet.prefix);
    let before = fleet.consul.tree(&prefix);

    let out = fleet.depro(&["deploy", "v3", "-nodes=all", "-canary=1", "-dry-run"]);
    let text = out.ok();
    for line in [
        &format!("dry run: would create {prefix}v3/"),
        "would wait until 2 nodes (-nodes=all of 2 live agents) have v3 ready",
        "would roll out in waves",
        "would switch",
        "from v2 to v3",
        "dry run: nothing was written",
    ] {
        assert!(text.contains(line), "{line:?} missing: {out:#?}");
    }
    let out = fleet.depro(&["rollback", "-dry-run"]);
    assert!(out.ok().contains("from v2 to v1"), "{out:#?}");
    let out = fleet.depro(&["remove", "v1", "-wait", "-dry-run"]);
    assert!(
        out.ok().contains(&format!("would delete {prefix}v1/")),
        "{out:#?}"
    );
    let out = fleet.depro(&["prune", "-keep=1", "-dry-run"]);
    assert!(out.ok().contains("dry run: nothing to prune"), "{out:#?}");
    // Refusals are the real run's, with its exit code.
    fleet
        .depro(&["remove", "v2", "-dry-run"])
        .fails(2, &["v2 is current"]);
    fleet
        .depro(&["rollout", "v9", "-dry-run"])
        .fails(2, &["v9 is not in the tree"]);

    assert_eq!(fleet.consul.tree(&prefix), before, "a dry run wrote");
}

#[test]
fn a_wrong_datacenter_https_on_an_http_port_and_a_server_that_is_not_consul_each_say_what_to_fix() {
    let consul = support::Consul::shared();
    let status = |server: &str, extra: &[&str]| {
        let mut args = vec!["status", "-prefix=api/version"];
        args.extend_from_slice(extra);
        Output::of(support::depro_command(server, &args).output().unwrap())
    };
    status(&consul.addr(), &["-datacenter=nowhere"]).fails(
        4,
        &[
            "knows no such datacenter",
            "-datacenter",
            "consul catalog datacenters",
        ],
    );
    let addr = consul.addr();
    let host_port = addr.trim_start_matches("http://");
    status(&format!("https://{host_port}"), &[]).fails(
        4,
        &["does not speak https", &format!("use http://{host_port}")],
    );
    // Another web server on that address: it answers, but not like Consul.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer);
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
            );
        }
    });
    status(&format!("{other}"), &[])
        .fails(4, &["does not answer like Consul's HTTP API", "-server"]);
}

// ------------------------------------------------- output for scripts

/// Whether `line` starts with the time since the command started (` 1.2s `).
fn is_timed(line: &str) -> bool {
    line.trim_start()
        .split_once("s ")
        .is_some_and(|(time, _)| time.parse::<f64>().is_ok())
}

#[test]
fn a_deploy_prints_its_result_alone_on_stdout_and_timed_progress_on_stderr() {
    let fleet = support::Fleet::start(2);
    let out = fleet.depro(&["deploy", "v1", "-nodes=2"]);
    // `v=$(depro deploy …)` gets exactly the result.
    let result = out.result();
    assert_eq!(result.lines().count(), 1, "{out:#?}");
    assert!(
        result.starts_with(&format!("v1 is current under {}", fleet.prefix)),
        "{out:#?}"
    );
    assert!(out.stderr.contains("node1: "), "{out:#?}");
    assert!(out.stderr.lines().all(is_timed), "{out:#?}");
    // -quiet: the result and nothing else.
    let quiet = fleet.depro(&["deploy", "v2", "-nodes=2", "-quiet"]);
    assert!(quiet.result().starts_with("v2 is current"), "{quiet:#?}");
    assert_eq!(quiet.stderr, "", "{quiet:#?}");
    // An error is still printed, alone.
    fleet.agents[1].set_flag("fail-deploy", true);
    let failed = fleet.depro(&["deploy", "v3", "-nodes=2", "-quiet"]);
    failed.fails(2, &["v3 failed on node2"]);
    assert_eq!(failed.stderr.lines().count(), 1, "{failed:#?}");
    assert_eq!(failed.stdout, "", "{failed:#?}");
}

#[test]
fn a_fleet_of_more_than_twenty_nodes_gets_counts_and_the_failing_nodes_not_a_line_per_node() {
    let fleet = support::Fleet::start(22);
    let out = fleet.depro(&["deploy", "v1", "-nodes=22"]);
    assert!(out.result().contains("active on 22/22 nodes"), "{out:#?}");
    let progress = &out.stderr;
    assert!(
        !progress.contains("node7: busy") && !progress.contains("node7: ready"),
        "a line per node:\n{progress}"
    );
    assert!(progress.contains("22/22 ready"), "{progress}");
    assert!(progress.contains("22/22 active"), "{progress}");
    assert!(
        progress.lines().count() < 22,
        "not compact ({} lines):\n{progress}",
        progress.lines().count()
    );
    // The node that fails gets its line, with its reason.
    fleet.agents[16].set_flag("fail-deploy", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=22"]);
    out.fails(2, &["v2 failed on node17"]);
    assert!(
        out.stderr.lines().any(|l| l.contains("node17: ")
            && l.contains("failed: the deploy hook exited with status 3")),
        "{out:#?}"
    );
    assert!(!out.stderr.contains("node3: busy"), "{out:#?}");
    // The few nodes that lag are named.
    fleet.agents[16].set_flag("fail-deploy", false);
    fleet.agents[4].set_flag("block-deploy", true);
    let out = fleet.depro(&["deploy", "v3", "-nodes=22", "-timeout=3s"]);
    out.fails(3, &["timed out"]);
    assert!(
        out.stderr.contains("21/22 ready; waiting for node5\n"),
        "{out:#?}"
    );
    fleet.agents[4].set_flag("release", true);
}

/// The command between backticks after `after` in `text`, as arguments.
fn pasted_command(text: &str, after: &str) -> Vec<String> {
    let rest = &text[text
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} missing: {text}"))
        + after.len()..];
    let command = &rest[rest.find('`').unwrap() + 1..];
    let command = &command[..command.find('`').unwrap()];
    let words: Vec<String> = command.split_whitespace().map(String::from).collect();
    assert_eq!(words[0], "depro", "{command}");
    words[1..].to_vec()
}

/// Runs the command `text` names between backticks after `after`, as an
/// operator would paste it.
fn run_pasted(fleet: &support::Fleet, text: &str, after: &str) -> Output {
    let words = pasted_command(text, after);
    let args: Vec<&str> = words.iter().map(String::as_str).collect();
    Output::of(
        support::depro_command(&fleet.consul.addr(), &args)
            .output()
            .unwrap(),
    )
}

fn interrupt(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
}

#[test]
fn ctrl_c_while_waiting_for_nodes_says_what_is_left_and_the_command_it_names_finishes() {
    let fleet = support::Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("block-deploy", true);
    let child = support::spawn(fleet.depro_command(&["deploy", "v2", "-nodes=2"]));
    fleet.wait("v2 ready on node1", |f| {
        f.node_state("v2", "node1").as_deref() == Some("ready")
    });
    interrupt(&child);
    let out = support::finish(child);
    out.fails(
        130,
        &[
            "interrupted",
            "v2 stays under",
            "current is unchanged (still v1)",
            &format!("`depro remove v2 -prefix={}`", fleet.prefix),
        ],
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    // The command it names finishes the deploy, pasted as it is.
    fleet.agents[1].set_flag("release", true);
    let done = run_pasted(&fleet, out.error(), "finish with");
    assert!(done.result().starts_with("v2 is current"), "{done:#?}");
}

#[test]
fn ctrl_c_after_the_switch_says_current_moved_and_how_to_go_back() {
    let fleet = support::Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet
        .depro(&["deploy", "v2", "-nodes=2", "-no-rollout"])
        .ok();
    fleet.agents[1].set_flag("block-rollout", true);
    let child = support::spawn(fleet.depro_command(&["rollout", "v2", "-nodes=2"]));
    fleet.wait("current moved to v2", |f| {
        f.current().as_deref() == Some("v2")
    });
    interrupt(&child);
    let out = support::finish(child);
    out.fails(
        130,
        &[
            "current is v2",
            &format!(
                "follow them with `depro wait v2 -for=active -prefix={} -nodes=2`",
                fleet.prefix
            ),
            &format!(
                "go back with `depro rollout v1 -prefix={} -nodes=2`",
                fleet.prefix
            ),
        ],
    );
    fleet.agents[1].set_flag("release-rollout", true);
    let done = run_pasted(&fleet, out.error(), "go back with");
    assert!(done.result().starts_with("v1 is current"), "{done:#?}");
    for agent in &fleet.agents {
        assert_eq!(agent.live("api").as_deref(), Some("v1"));
    }
}

/// The command lines of depro(1)'s EXAMPLES, in order, as the page shows
/// them (roff escapes undone, continued lines joined).
fn depro_1_examples() -> Vec<String> {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("man/depro.1")).unwrap();
    let examples = &page[page.find(".SH EXAMPLES").unwrap()..page.find(".SH SEE ALSO").unwrap()];
    let mut lines = Vec::new();
    for block in examples.split(".EX\n").skip(1) {
        let block = &block[..block.find(".EE\n").unwrap()];
        let text = block
            .replace("\\-", "-")
            .replace("\\e", "\\")
            .replace("\\\n", " ");
        lines.extend(text.lines().map(str::to_string));
    }
    lines
}

#[test]
fn the_depro_1_examples_run_as_shown_against_a_fleet() {
    let fleet = support::Fleet::start(10);
    let consul = fleet.consul;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    // ACLs are off here: Consul accepts any token; depro must read the file.
    std::fs::write(&token, "00000000-0000-0000-0000-000000000000\n").unwrap();
    let examples = depro_1_examples();
    assert!(examples.len() >= 12, "{examples:#?}");
    let mut env: Vec<(String, String)> = Vec::new();
    let mut ran = 0;
    for line in &examples {
        // Adapted to the test bed: this fleet's prefix, a token file of its
        // own, and pauses between waves of a second, not a minute.
        let line = line
            .replace("api/version", &fleet.prefix)
            .replace("/etc/depro/token", &token.display().to_string())
            .replace("-pause=1m", "-pause=1s");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["export", ref assignments @ ..] => {
                for assignment in assignments {
                    let (name, value) = assignment.split_once('=').unwrap();
                    env.push((name.into(), value.into()));
                }
            }
            // The agents of this fleet run already.
            ["depro", "agent", ..] => {}
            ["depro", ref args @ ..] => {
                let mut command = support::depro_command(&consul.addr(), args);
                command.envs(env.iter().map(|(k, v)| (k, v)));
                let out = Output::of(command.output().unwrap());
                assert_eq!(out.code, Some(0), "{line}\n{out:#?}");
                ran += 1;
            }
            _ => panic!("not a depro command: {line}"),
        }
    }
    assert!(ran >= 10, "{ran} commands ran");
    // The story the examples tell ends with v43 current on all ten hosts,
    // the five newest versions kept.
    fleet.expect_active("v43");
    assert!(
        fleet
            .consul
            .get(&format!("{}/v42/", fleet.prefix))
            .is_none()
    );
}

/// v1 active on the fleet's three nodes, v2 ready on them, and a rollout
/// of v2 with `flags` (waves) started in the background: returned once its
/// canary, node1, runs v2.
fn canary_of_v2_active(fleet: &support::Fleet<'_>, flags: &[&str]) -> std::process::Child {
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet
        .depro(&["deploy", "v2", "-nodes=3", "-no-rollout"])
        .ok();
    let mut args = vec!["rollout", "v2"];
    args.extend_from_slice(flags);
    let child = support::spawn(fleet.depro_command(&args));
    fleet.wait("the canary active on v2", |f| {
        f.node_state("v2", "node1").as_deref() == Some("active")
    });
    child
}

#[test]
fn ctrl_c_between_waves_says_which_wave_it_stays_at_and_the_resume_command_finishes_it() {
    let fleet = support::Fleet::start(3);
    // The canary runs v2; the command pauses 5 s before the next wave.
    let child = canary_of_v2_active(
        &fleet,
        &["-canary=1", "-batch=1", "-pause=5s", "-rollback-on-failure"],
    );
    interrupt(&child);
    let out = support::finish(child);
    out.fails(
        130,
        &[
            "the rollout of v2 stays at wave 1 of 3",
            "current is unchanged",
            &format!("undo with `depro rollback -prefix={}`", fleet.prefix),
            // The resume keeps the pause and the revert policy.
            "-pause=5s -rollback-on-failure`",
        ],
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    // The canary (node1, first in name order) runs v2, the others v1.
    assert_eq!(fleet.agents[0].live("api").as_deref(), Some("v2"));
    assert_eq!(fleet.agents[2].live("api").as_deref(), Some("v1"));
    // The command it names resumes from the wave reached.
    let done = run_pasted(&fleet, out.error(), "resume with");
    assert!(done.result().starts_with("v2 is current"), "{done:#?}");
    fleet.expect_active("v2");
}

/// Issue 20: `.rollout` did not keep the pause nor the revert policy, so a
/// resume from another terminal ran without them.
#[test]
fn a_resume_from_anywhere_runs_with_the_rollout_s_own_flags() {
    let fleet = support::Fleet::start(3);
    let child = canary_of_v2_active(
        &fleet,
        &[
            "-nodes=all",
            "-canary=1",
            "-batch=1",
            "-pause=10m",
            "-rollback-on-failure",
        ],
    );
    interrupt(&child);
    assert_eq!(support::finish(child).code, Some(130));
    let status = fleet.depro(&["status"]);
    assert!(
        status.result().contains(
            "its flags (a resume takes them): -nodes=all -canary=1 -batch=1 -pause=10m \
             -rollback-on-failure"
        ),
        "{status:#?}"
    );
    // Resumed as from another machine: no flags but a shorter pause.
    let out = fleet.depro(&["rollout", "v2", "-pause=1s"]);
    let text = out.ok();
    assert!(
        text.contains(
            "resuming with the rollout's own flags: -nodes=all -canary=1 -batch=1 \
             -rollback-on-failure"
        ),
        "{out:#?}"
    );
    assert!(text.contains("pausing 1s before wave 2/3"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v2"));
}

#[test]
fn ctrl_c_while_remove_waits_says_what_is_removed_and_that_the_agents_go_on() {
    let fleet = support::Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("block-clean", true);
    let child = support::spawn(fleet.depro_command(&["remove", "v1", "-wait"]));
    fleet.wait("node1 cleaned v1", |f| {
        f.node_state("v1", "node1").is_none()
    });
    interrupt(&child);
    let out = support::finish(child);
    out.fails(
        130,
        &[
            &format!("removed v1 from {}", fleet.prefix),
            "the agents go on cleaning up",
        ],
    );
    assert!(!out.error().contains("not removed yet"), "{out:#?}");
    // They do: node2 finishes once its clean hook may.
    fleet.agents[1].set_flag("release-clean", true);
    fleet.wait("node2 cleaned v1", |f| {
        f.node_state("v1", "node2").is_none()
    });
}

/// Issue 20: `agent -check` called a configuration valid and said nothing
/// of what the agent would then warn about: a pipe in a hook under a shell
/// without pipefail, a deployment without hooks.
#[test]
fn agent_check_prints_the_warnings_the_agent_would_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{{ "name": "web-1", "server": "127.0.0.1:1",
             "deployments": [
               {{ "id": "api", "path": "{0}/deploy/api", "prefix": "api/version", "shell": "sh",
                  "deploy": ["curl -fsS http://builds/$VERSION.tgz | tar xz"] }},
               {{ "id": "bare", "path": "{0}/deploy/bare", "prefix": "bare/version" }} ] }}"#,
        dir.path().display()
    );
    let out = check(dir.path(), &[("depro.json", &config)]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("the configuration is valid"),
        "{out:#?}"
    );
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("depro: warning: "))
        .collect();
    // (A `sh` that has pipefail, as newer dash, gets no such warning.)
    let sh_pipefail = Command::new("sh")
        .args(["-c", "set -o pipefail"])
        .status()
        .is_ok_and(|s| s.success());
    assert_eq!(
        warnings
            .iter()
            .any(|w| w.contains("has no pipefail") && w.contains("deployments[0]")),
        !sh_pipefail,
        "{out:#?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("no hooks") && w.contains("deployments[1]")),
        "{out:#?}"
    );
    assert_eq!(warnings.len(), if sh_pipefail { 1 } else { 2 }, "{out:#?}");
}

/// Issue 20: there was no control between "all at once" and Ctrl-C. From
/// another terminal, `depro pause` holds the next wave and `depro resume`
/// lets it go; `status` tells a driven rollout from an abandoned one.
#[test]
fn pause_and_resume_from_another_terminal_hold_and_release_the_next_wave() {
    let fleet = support::Fleet::start(3);
    let child = canary_of_v2_active(&fleet, &["-canary=1", "-batch=1", "-pause=1s"]);
    let status = fleet.depro(&["status"]);
    assert!(
        status.result().contains("driven by a command of "),
        "{status:#?}"
    );
    let out = fleet.depro(&["pause"]);
    assert!(
        out.result()
            .contains("paused the rollout of v2 at wave 1 of 3: no further wave starts (the command driving it"),
        "{out:#?}"
    );
    // Well past the -pause of 1 s, wave 2 has not started: node2 runs v1.
    let plan = || -> serde_json::Value {
        serde_json::from_str(
            &fleet
                .consul
                .get(&format!("{}/.rollout", fleet.prefix))
                .unwrap(),
        )
        .unwrap()
    };
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(plan()["started_waves"], 1, "{}", plan());
    assert_eq!(fleet.agents[1].live("api").as_deref(), Some("v1"));
    let status = fleet.depro(&["status"]);
    assert!(status.result().contains("paused by "), "{status:#?}");
    // One command at a time drives the waves.
    fleet
        .depro(&["rollout", "v2"])
        .fails(5, &["another command drives this rollout"]);
    assert!(
        status.result().contains("resume: depro resume -prefix="),
        "{status:#?}"
    );

    let out = fleet.depro(&["resume"]);
    assert!(
        out.result()
            .contains("the rollout of v2 goes on: the command driving it"),
        "{out:#?}"
    );
    let done = support::finish(child);
    let text = done.ok();
    assert!(text.contains("paused by "), "{done:#?}");
    assert!(text.contains("resumed"), "{done:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    fleet.expect_active("v2");
}

/// A rollout whose command was interrupted is abandoned: `status` says no
/// command drives it, and `depro resume` drives it from where it stood.
#[test]
fn resume_drives_an_abandoned_rollout_itself() {
    let fleet = support::Fleet::start(3);
    let child = canary_of_v2_active(&fleet, &["-canary=1", "-batch=1", "-pause=2s"]);
    interrupt(&child);
    assert_eq!(support::finish(child).code, Some(130));
    // The interrupted command let go of the waves at once.
    assert!(
        fleet
            .consul
            .get(&format!("{}/.driver", fleet.prefix))
            .is_none(),
        "the driver's key outlived its command"
    );
    let status = fleet.depro(&["status"]);
    assert!(
        status.result().contains("no command drives it"),
        "{status:#?}"
    );
    // Paused while abandoned, then resumed: driven from here to its end.
    let out = fleet.depro(&["pause"]);
    assert!(
        out.result().contains("no command drives it now"),
        "{out:#?}"
    );
    let out = fleet.depro(&["resume"]);
    let text = out.ok();
    assert!(text.contains("resumed the rollout of v2"), "{out:#?}");
    assert!(
        text.contains("no command drives the rollout of v2: driving it from here"),
        "{out:#?}"
    );
    assert!(out.result().starts_with("v2 is current"), "{out:#?}");
    fleet.expect_active("v2");
    fleet
        .depro(&["pause"])
        .fails(2, &["no progressive rollout is under way"]);
}

/// Issue 20: no manual promotion after the canary. `-promote=manual` stops
/// after the first wave (exit 0); `depro promote V` goes on.
#[test]
fn promote_manual_stops_after_the_canary_until_depro_promote() {
    let fleet = support::Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    let out = fleet.depro(&["deploy", "v2", "-canary=1", "-batch=1", "-promote=manual"]);
    assert!(
        out.result().contains(&format!(
            "v2's first wave is active on node1 under {}, the other nodes run v1; waiting for \
             promotion: `depro promote v2 -prefix={}` goes on",
            fleet.prefix, fleet.prefix
        )),
        "{out:#?}"
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    assert_eq!(fleet.agents[0].live("api").as_deref(), Some("v2"));
    assert_eq!(fleet.agents[2].live("api").as_deref(), Some("v1"));
    let status = fleet.depro(&["status"]);
    assert!(
        status.result().contains("(waiting for promotion)"),
        "{status:#?}"
    );
    fleet
        .depro(&["promote", "v9"])
        .fails(2, &["is of v2, not v9"]);

    let out = fleet.depro(&["promote", "v2"]);
    assert!(out.ok().contains("resumed the rollout of v2"), "{out:#?}");
    assert!(out.result().starts_with("v2 is current"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    fleet.expect_active("v2");

    // A policy of manual promotion does not stop a rollback halfway: it
    // keeps the policy's waves, not the wait for a person.
    fleet
        .depro(&["policy", "-canary=1", "-batch=1", "-promote=manual"])
        .ok();
    let dry = fleet.depro(&["deploy", "v3", "-dry-run"]);
    assert!(
        dry.ok()
            .contains("would stop after the first wave (-promote=manual)"),
        "{dry:#?}"
    );
    let out = fleet.depro(&["rollback"]);
    assert!(out.ok().contains("rolling out v1 in 3 waves"), "{out:#?}");
    assert!(out.result().starts_with("v1 is current"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v1"));
}

/// How often a node ran the rollout hook of `version` from itself: a restart.
fn restarts(agent: &support::Agent, version: &str) -> usize {
    let line = format!("rollout {version} from={version}");
    agent.hooks_log().iter().filter(|l| **l == line).count()
}

/// Issue 20: `depro restart` runs current's rollout hook again in waves,
/// once per restart on each node (also across an agent's restart), without
/// moving current, and records it in the history.
#[test]
fn a_restart_runs_current_s_rollout_hook_again_on_every_node_in_waves_once() {
    let mut fleet = support::Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    let before = fleet.modify_index(&format!("{}/current", fleet.prefix));
    assert!(fleet.agents.iter().all(|a| restarts(a, "v1") == 0));

    let dry = fleet.depro(&["restart", "-canary=1", "-batch=1", "-dry-run"]);
    let text = dry.ok();
    assert!(
        text.contains("restart v1 on the 3 nodes that run it, in 3 waves (node1 | node2 | node3)"),
        "{dry:#?}"
    );
    assert!(fleet.agents.iter().all(|a| restarts(a, "v1") == 0));

    let out = fleet.depro(&[
        "restart",
        "-canary=1",
        "-batch=1",
        "-promote=manual",
        "-message=new TLS certificate",
        "-timeout=1m",
    ]);
    // It stops after its canary: node1 restarted, the others not yet.
    assert!(
        out.ok().contains("wave 1/3: node1 restarting v1")
            && out.result().contains("waiting for promotion"),
        "{out:#?}"
    );
    assert_eq!(
        fleet
            .agents
            .iter()
            .map(|a| restarts(a, "v1"))
            .collect::<Vec<_>>(),
        [1, 0, 0]
    );
    let status = fleet.depro(&["status"]);
    assert!(
        status.ok().contains("restart of v1 under way: wave 1 of 3")
            && status.ok().contains("told to restart: node1"),
        "{status:#?}"
    );
    // Promoted from another command, which records the restart's message.
    let out = fleet.depro(&["promote", "v1"]);
    let text = out.ok();
    assert!(
        out.result().starts_with("v1 restarted under") && out.result().contains("on 3 nodes"),
        "{out:#?}"
    );
    assert!(text.contains("wave 3/3: node3 restarted v1"), "{out:#?}");
    assert!(fleet.agents.iter().all(|a| restarts(a, "v1") == 1));
    // current did not move; the plan is gone; the history says why.
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    assert_eq!(
        fleet.modify_index(&format!("{}/current", fleet.prefix)),
        before
    );
    assert_eq!(
        fleet.consul.get(&format!("{}/.rollout", fleet.prefix)),
        None
    );
    let history = fleet.depro(&["history"]);
    assert!(
        history.ok().contains("restart") && history.ok().contains("new TLS certificate"),
        "{history:#?}"
    );
    fleet.expect_active("v1");

    // An agent that restarts does not run a finished restart again; a new
    // restart (all at once) runs once more everywhere.
    let old = fleet.session_of("v1", "node1");
    fleet.agents[0].kill9();
    fleet.agents[0].start();
    fleet.wait("node1 back, active under its new session", |f| {
        f.node_state("v1", "node1").as_deref() == Some("active")
            && f.session_of("v1", "node1") != old
    });
    let out = fleet.depro(&["restart", "-timeout=1m"]);
    assert!(out.result().contains("on 3 nodes"), "{out:#?}");
    assert!(
        fleet.agents.iter().all(|a| restarts(a, "v1") == 2),
        "{}",
        fleet.diagnostics()
    );
}

#[test]
fn a_restart_halts_at_the_first_failure_and_the_retry_it_names_finishes_it() {
    let fleet = support::Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.agents[1].set_flag("fail-rollout", true);
    let out = fleet.depro(&["restart", "-canary=1", "-batch=1", "-timeout=1m"]);
    out.fails(
        2,
        &[
            "the restart of v1 halted in wave 2 of 3",
            "node2",
            "current stays v1",
            "go on with `depro deploy v1 -prefix=",
        ],
    );
    // The third wave never started.
    assert_eq!(restarts(&fleet.agents[2], "v1"), 0);
    assert_eq!(fleet.node_state("v1", "node2").as_deref(), Some("failed"));
    fleet.agents[1].set_flag("fail-rollout", false);
    let done = run_pasted(&fleet, out.error(), "go on with");
    assert!(done.result().starts_with("v1 restarted under"), "{done:#?}");
    assert!(fleet.agents.iter().all(|a| restarts(a, "v1") >= 1));
    assert_eq!(restarts(&fleet.agents[2], "v1"), 1);
    fleet.expect_active("v1");
}

#[test]
fn a_restart_with_nothing_running_current_is_refused_and_flags_it_cannot_use_are_named() {
    let fleet = support::Fleet::start(1);
    fleet.depro(&["restart"]).fails(
        2,
        &["current does not name a version: there is nothing to restart"],
    );
    fleet.depro(&["restart", "-nodes=all"]).fails(
        1,
        &[
            "-nodes: unknown flag for `depro restart`",
            "depro help restart",
        ],
    );
}

/// Issue 20: a hung hook left `0/1 ready` frozen, and `status` said `busy`
/// with no hook: a hook that runs long is noted, shown by status (with its
/// age) and by the waiting command, and the note goes when the hook ends.
#[test]
fn a_hook_that_runs_long_is_named_with_its_age_in_status_and_progress() {
    let fleet = support::Fleet::start(1);
    fleet.agents[0].set_flag("block-deploy", true);
    let deploy = support::spawn(fleet.depro_command(&["deploy", "v1", "-timeout=1m"]));
    let mut table = String::new();
    fleet.wait("status naming node1's deploy hook", |f| {
        table = f.depro(&["status"]).stdout;
        table.contains("deploy hook")
    });
    let row = table.lines().find(|l| l.starts_with("node1")).unwrap();
    assert!(
        row.contains("busy") && row.contains(", deploy hook "),
        "{table}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert_eq!(
        doc["versions"][0]["hooks"]["node1"]["hook"], "deploy",
        "{doc}"
    );
    assert!(
        doc["versions"][0]["hooks"]["node1"]["since"].is_string(),
        "{doc}"
    );
    fleet.agents[0].set_flag("release", true);
    let out = support::finish(deploy);
    assert!(
        out.ok().contains("node1: in its deploy hook for"),
        "{out:#?}"
    );
    // The note went with the hook.
    let note = format!("{}/v1/.hook/node1", fleet.prefix);
    fleet.wait("the note deleted", |f| f.consul.get(&note).is_none());
    assert!(!fleet.depro(&["status"]).result().contains("hook"));
}
