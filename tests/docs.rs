//! The man pages cover every flag, config field and environment variable
//! the code knows, and pass `mandoc -T lint`.

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Every string literal inside `open(...)` calls in `text`, e.g. the name
/// in `env("DEPRO_NAME")`.
fn literals_after(text: &str, open: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for chunk in text.split(open).skip(1) {
        let inside = &chunk[..chunk.find(')').unwrap_or(chunk.len())];
        for (i, part) in inside.split('"').enumerate() {
            if i % 2 == 1 {
                found.insert(part.to_string());
            }
        }
    }
    found
}

/// The field names of a `struct` in `text`.
fn struct_fields(text: &str, name: &str) -> Vec<String> {
    let start = text.find(&format!("struct {name} {{")).unwrap();
    let body = &text[start..start + text[start..].find("\n}").unwrap()];
    body.lines()
        .skip(1)
        .filter_map(|line| {
            let line = line.trim();
            let (field, _) = line.split_once(':')?;
            (!line.starts_with("//") && !line.starts_with('#')).then(|| field.trim().to_string())
        })
        .collect()
}

/// What the binary's bash completion offers, which it makes from its flag
/// table (the one the parser and `-h` read): the commands, and every flag
/// of every command (aliases included).
fn offered_by_depro() -> (BTreeSet<String>, BTreeSet<String>) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depro"))
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let script = String::from_utf8(out.stdout).unwrap();
    // The words of the "…" after each `open`, up to `lists` of them.
    let words = |open: &str, lists: usize| {
        let mut found = BTreeSet::new();
        for chunk in script.split(open).skip(1).take(lists) {
            let list = &chunk[..chunk.find('"').unwrap()];
            found.extend(
                list.split(' ')
                    .map(|w| w.trim_matches(['-', '=']).to_string()),
            );
        }
        found
    };
    // The first `compgen -W` offers the commands.
    (words("compgen -W \"", 1), words("opts=\"", usize::MAX))
}

#[test]
fn every_flag_and_command_is_in_depro_1() {
    let page = read("man/depro.1");
    let (commands, flags) = offered_by_depro();
    assert!(flags.len() > 20 && flags.contains("http-addr"), "{flags:?}");
    for flag in flags {
        let written = format!("\\-{}", flag.replace('-', "\\-"));
        assert!(page.contains(&written), "depro(1) does not mention -{flag}");
    }
    assert!(
        commands.len() > 10 && commands.contains("deploy"),
        "{commands:?}"
    );
    for command in commands {
        assert!(
            page.contains(&format!("depro {command}")) || page.contains(&format!(".B {command}")),
            "depro(1) does not mention the command {command}"
        );
    }
}

#[test]
fn every_environment_variable_is_in_depro_1() {
    let mut variables = BTreeSet::new();
    for file in [
        "src/config.rs",
        "src/commands/mod.rs",
        "src/logging.rs",
        "src/consul/tls.rs",
    ] {
        variables.extend(literals_after(&read(file), "env("));
    }
    variables.retain(|v| {
        v.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            && v != "PATH"
            && v != "USER"
            && v != "LOGNAME"
    });
    assert!(variables.len() >= 10, "{variables:?}");
    let page = read("man/depro.1");
    for variable in variables {
        assert!(
            page.contains(&variable),
            "depro(1) does not mention {variable}"
        );
    }
}

#[test]
fn every_config_field_and_hook_variable_is_in_depro_json_5() {
    let page = read("man/depro.json.5");
    let config = read("src/config.rs");
    let fields: Vec<String> = [
        struct_fields(&config, "FileConfig"),
        struct_fields(&config, "FileDeployment"),
    ]
    .concat();
    assert!(fields.len() > 15, "{fields:?}");
    for field in fields {
        let marked = page.lines().any(|l| {
            (l.starts_with(".B ") || l.starts_with(".BR "))
                && l.split([' ', ',', '"']).any(|w| w == field)
        });
        assert!(marked, "depro.json(5) does not describe the field {field}");
    }
    let agent = read("src/agent/hook_run.rs");
    for variable in [
        "VERSION",
        "VERSION_PATH",
        "DEPLOYMENT_ID",
        "DEPLOYMENT_PATH",
        "DEPLOYMENT_PREFIX",
        "AGENT_NAME",
        "PREVIOUS_VERSION",
    ] {
        assert!(
            agent.contains(&format!("\"{variable}\"")),
            "the agent no longer sets {variable}"
        );
        assert!(
            page.contains(&format!(".B {variable}\n")),
            "depro.json(5) does not describe {variable}"
        );
    }
}

#[test]
fn the_pages_pass_mandoc_lint() {
    let Ok(out) = std::process::Command::new("mandoc")
        .args(["-T", "lint", "-W", "warning"])
        .args(["man/depro.1", "man/depro.json.5", "man/depro.7"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    else {
        panic!("mandoc is not installed: apt-get install mandoc (scripts/test.sh does)");
    };
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "mandoc -T lint:\n{report}"
    );
}
