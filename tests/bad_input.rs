//! Bad input to the real binary: a one-line error that names the file and
//! line, the key or the flag, says what to do, and a non-zero exit.

mod support;

use std::process::Command;

/// Runs `depro agent -config-dir=<dir>` on a config and returns (exit code, stderr).
fn agent_with_config(config: &str) -> (tempfile::TempDir, Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("depro.json"), config).unwrap();
    let (code, stderr) = run(&["agent", &format!("-config-dir={}", dir.path().display())]);
    (dir, code, stderr)
}

/// Runs depro to its end; an agent that does not refuse its config (it
/// runs instead of exiting) is stopped after a while and counts as `None`.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(support::depro_bin())
        .args(args)
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(stderr.path()).unwrap())
}

/// Asserts one line of error, exit code 1, and that it mentions each of `needles`.
fn assert_one_line_error(code: Option<i32>, stderr: &str, needles: &[&str]) {
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("depro: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
}

fn deployment(fields: &str) -> String {
    format!(
        r#"{{"server": "127.0.0.1:1", "deployments": [{{"id": "api", "path": "/tmp/depro-never/api", "prefix": "api/version"{fields}}}]}}"#
    )
}

/// The seed config exactly as the issue printed it: without the comma
/// after the first `deploy` line.
fn seed_as_printed() -> String {
    let fixed = include_str!("data/seed-config.json");
    let printed = fixed.replacen("tar zxf - || exit 1\",", "tar zxf - || exit 1\"", 1);
    assert_ne!(printed, fixed);
    printed
}

#[test]
fn the_seed_example_as_printed_is_refused_at_its_missing_comma() {
    let (dir, code, stderr) = agent_with_config(&seed_as_printed());
    let file = dir.path().join("depro.json");
    assert_one_line_error(
        code,
        &stderr,
        &[&format!("{}:5:", file.display()), "missing comma"],
    );
}

#[test]
fn an_unknown_field_is_named_with_its_line_and_column() {
    let (_dir, code, stderr) =
        agent_with_config("{\n  \"server\": \"x:1\",\n  \"deploymnets\": []\n}");
    assert_one_line_error(
        code,
        &stderr,
        &[
            "depro.json:3:",
            "unknown field `deploymnets`",
            "depro.json(5)",
        ],
    );
}

#[test]
fn an_unknown_deployment_field_is_named_too() {
    let (_dir, code, stderr) = agent_with_config(&deployment(r#", "rolout": []"#));
    assert_one_line_error(code, &stderr, &["unknown field `rolout`"]);
}

#[test]
fn duplicate_ids_and_prefixes_are_refused_naming_both() {
    let config = r#"{"deployments": [
        {"id": "api", "path": "/tmp/depro-never/a", "prefix": "api/version"},
        {"id": "api", "path": "/tmp/depro-never/b", "prefix": "web/version"}]}"#;
    let (_dir, code, stderr) = agent_with_config(config);
    assert_one_line_error(
        code,
        &stderr,
        &["deployments[1]", "already used by", "deployments[0]"],
    );
    let config = r#"{"deployments": [
        {"id": "api", "path": "/tmp/depro-never/a", "prefix": "api/version"},
        {"id": "web", "path": "/tmp/depro-never/b", "prefix": "api/version/"}]}"#;
    let (_dir, code, stderr) = agent_with_config(config);
    assert_one_line_error(code, &stderr, &["deployments[1]", "overlaps", "own prefix"]);
}

#[test]
fn a_relative_path_is_refused() {
    let config = r#"{"deployments": [{"id": "api", "path": "data/api", "prefix": "api/version"}]}"#;
    let (_dir, code, stderr) = agent_with_config(config);
    assert_one_line_error(
        code,
        &stderr,
        &["deployments[0] (id \"api\").path", "relative", "absolute"],
    );
}

#[test]
fn an_unwritable_path_is_refused_at_start() {
    let scratch = tempfile::tempdir().unwrap();
    let blocker = scratch.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let path = blocker.join("api");
    let config = format!(
        r#"{{"server": "127.0.0.1:1", "deployments": [{{"id": "api", "path": "{}", "prefix": "api/version"}}]}}"#,
        path.display()
    );
    let (_dir, code, stderr) = agent_with_config(&config);
    assert_one_line_error(
        code,
        &stderr,
        &[
            "(id \"api\").path",
            &path.display().to_string(),
            "cannot create",
        ],
    );
}

#[test]
fn a_shell_that_does_not_exist_is_refused() {
    let (_dir, code, stderr) =
        agent_with_config(&deployment(r#", "shell": "fish-that-is-not-here""#));
    assert_one_line_error(
        code,
        &stderr,
        &[".shell", "fish-that-is-not-here", "not found"],
    );
}

#[test]
fn a_bad_duration_is_refused_with_the_accepted_forms() {
    let (_dir, code, stderr) = agent_with_config(&deployment(r#", "timeout": "10""#));
    assert_one_line_error(code, &stderr, &[".timeout", "no unit", "10m"]);
    let (_dir, code, stderr) = agent_with_config(r#"{"shutdown_grace": "forever"}"#);
    assert_one_line_error(code, &stderr, &["shutdown_grace", "30s"]);
}

#[test]
fn a_bad_server_address_is_refused_and_the_token_never_shows() {
    let (_dir, code, stderr) =
        agent_with_config(r#"{"server": "ftp://x:1", "token": "tok-s3cr3t"}"#);
    assert_one_line_error(code, &stderr, &["ftp", "http:// or https://"]);
    assert!(!stderr.contains("tok-s3cr3t"));
}

#[test]
fn a_missing_config_dir_is_named() {
    let (code, stderr) = run(&["agent", "-config-dir=/no/such/depro/dir"]);
    assert_one_line_error(code, &stderr, &["/no/such/depro/dir", "-config-dir"]);
}

#[test]
fn bad_flags_are_named_with_where_to_get_help() {
    let (code, stderr) = run(&["agent", "-config-dri=/etc/depro"]);
    assert_one_line_error(code, &stderr, &["-config-dri", "depro help agent"]);
    let empty = tempfile::tempdir().unwrap();
    let (code, stderr) = run(&[
        "agent",
        "-log-level=loud",
        "-config-dir",
        &empty.path().display().to_string(),
    ]);
    assert_one_line_error(code, &stderr, &["loud", "log level"]);
    let (code, stderr) = run(&["deploy", "v1", "-nodes=many"]);
    assert_one_line_error(code, &stderr, &["-nodes", "many"]);
}

#[test]
fn help_and_version_answer_without_consul() {
    let out = Command::new(support::depro_bin())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(concat!("depro ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.git")).exists() {
        assert!(
            version.contains("(commit "),
            "built from a checkout: {version}"
        );
    }
    for args in [
        &["help"][..],
        &["help", "deploy"],
        &["deploy", "-h"],
        &["status", "--help"],
    ] {
        let out = Command::new(support::depro_bin())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: depro"),
            "{args:?}"
        );
    }
    let deploy = Command::new(support::depro_bin())
        .args(["help", "deploy"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&deploy.stdout);
    assert!(
        text.contains("-nodes=N") && text.contains("CONSUL_HTTP_TOKEN"),
        "{text}"
    );
    let (code, stderr) = run(&["help", "frobnicate"]);
    assert_one_line_error(code, &stderr, &["no help for \"frobnicate\""]);
}

/// A config with deployments at these paths (`{root}` is a scratch dir).
fn deployments_at(paths: &[&str]) -> (tempfile::TempDir, String) {
    let root = tempfile::tempdir().unwrap();
    let list: Vec<String> = paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let path = path.replace("{root}", &root.path().display().to_string());
            format!(r#"{{"id": "d{i}", "path": "{path}", "prefix": "p{i}/version"}}"#)
        })
        .collect();
    let config = format!(
        r#"{{"server": "127.0.0.1:1", "deployments": [{}]}}"#,
        list.join(", ")
    );
    (root, config)
}

#[test]
fn a_path_that_resolves_to_the_root_directory_is_refused() {
    let (root, config) = deployments_at(&["{root}/to-root"]);
    std::os::unix::fs::symlink("/", root.path().join("to-root")).unwrap();
    let (_dir, code, stderr) = agent_with_config(&config);
    assert_one_line_error(
        code,
        &stderr,
        &["(id \"d0\").path", "to-root", "resolves to /"],
    );
    let (_root, config) = deployments_at(&["/tmp/.."]);
    let (_dir, code, stderr) = agent_with_config(&config);
    assert_one_line_error(
        code,
        &stderr,
        &["(id \"d0\").path", "/tmp/..", "resolves to /"],
    );
    assert!(!std::path::Path::new("/.depro").exists());
}

#[test]
fn deployment_paths_that_nest_are_refused_naming_both() {
    for paths in [
        ["{root}/api", "{root}/api/web"],
        ["{root}/api/v1/inner", "{root}/api"],
    ] {
        let (_root, config) = deployments_at(&paths);
        let (_dir, code, stderr) = agent_with_config(&config);
        assert_one_line_error(code, &stderr, &["deployments[", "d0", "d1", "inside"]);
    }
    // Through a symlink too.
    let (root, config) = deployments_at(&["{root}/api", "{root}/link/web"]);
    std::fs::create_dir(root.path().join("api")).unwrap();
    std::os::unix::fs::symlink(root.path().join("api"), root.path().join("link")).unwrap();
    let (_dir, code, stderr) = agent_with_config(&config);
    assert_one_line_error(code, &stderr, &["d0", "d1", "inside"]);
    assert!(
        !root.path().join("api/web").exists(),
        "created before refusing"
    );
}

#[test]
fn a_config_others_may_write_is_refused_unless_allowed_knowingly() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("depro.json");
    std::fs::write(&file, r#"{"server": "127.0.0.1:1"}"#).unwrap();
    let args = |extra: &[&str]| {
        let mut args = vec![
            "agent".to_string(),
            format!("-config-dir={}", dir.path().display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run_args = |extra: &[&str]| {
        let args = args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args)
    };
    // A world-writable file.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, stderr) = run_args(&[]);
    assert_one_line_error(
        code,
        &stderr,
        &[
            &file.display().to_string(),
            "writable by others",
            "-allow-insecure-config",
        ],
    );
    // A group-writable directory.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
    let (code, stderr) = run_args(&[]);
    assert_one_line_error(
        code,
        &stderr,
        &[&dir.path().display().to_string(), "writable by its group"],
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // A file owned by another user (nobody), when the agent runs as root.
    std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
    let (code, stderr) = run_args(&[]);
    assert_one_line_error(
        code,
        &stderr,
        &[&file.display().to_string(), "owned by user 65534"],
    );
    // Allowed knowingly: the agent starts (idle: this config has no
    // deployments), and says what it allowed.
    let log = dir.path().join("agent.log");
    let mut child = Command::new(support::depro_bin())
        .args(args(&["-allow-insecure-config"]))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    support::wait_for("the agent to start", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("is idle"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("owned by user 65534"), "warned: {text}");
}

/// Issue 20: `depro` alone printed the usage and exited 0, so a script
/// that lost its command (an empty variable) went on as if it had run.
#[test]
fn depro_without_a_command_prints_the_usage_on_stderr_and_exits_1() {
    let out = Command::new(support::depro_bin()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("Usage: depro <command>"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("depro: no command given") && last.contains("depro help"),
        "{stderr}"
    );
}
