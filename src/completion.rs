//! Shell completion: `depro completion bash|zsh|fish` prints a script that
//! completes the commands and each command's flags. The packages install
//! the scripts (generated from this module, kept in packaging/completions/)
//! in each shell's standard directory.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl Shell {
    pub(crate) fn parse(name: &str) -> Result<Shell> {
        match name {
            "bash" => Ok(Shell::Bash),
            "zsh" => Ok(Shell::Zsh),
            "fish" => Ok(Shell::Fish),
            other => Err(Error::Usage(format!(
                "completion: unknown shell {other:?}; use bash, zsh or fish, e.g. \
                 `depro completion bash > /etc/bash_completion.d/depro`"
            ))),
        }
    }
}

/// What a flag's value is, for completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// A boolean flag: no value.
    None,
    /// A file name.
    File,
    /// A directory name.
    Dir,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// Anything else.
    Text,
}

pub(crate) struct Flag {
    pub name: &'static str,
    value: Value,
    help: &'static str,
}

const fn flag(name: &'static str, value: Value, help: &'static str) -> Flag {
    Flag { name, value, help }
}

const CONNECTION: &[Flag] = &[
    flag("server", Value::Text, "the Consul HTTP address"),
    flag("http-addr", Value::Text, "the Consul HTTP address"),
    flag("token", Value::Text, "Consul ACL token"),
    flag("token-file", Value::File, "file holding the ACL token"),
    flag("datacenter", Value::Text, "Consul datacenter"),
    flag("dc", Value::Text, "Consul datacenter"),
    flag("ca-file", Value::File, "CA certificate for https"),
    flag("client-cert", Value::File, "client certificate for https"),
    flag("client-key", Value::File, "client key for https"),
    flag(
        "tls-skip-verify",
        Value::None,
        "do not verify the Consul certificate",
    ),
];

const PREFIX: Flag = flag("prefix", Value::Text, "the KV prefix of the deployment");
const QUIET: Flag = flag(
    "quiet",
    Value::None,
    "no progress: the result and errors only",
);

const SWITCH: &[Flag] = &[
    flag(
        "nodes",
        Value::Text,
        "nodes that must have the version: N, all or P%",
    ),
    flag(
        "min-nodes",
        Value::Text,
        "but at least M nodes, however few are live",
    ),
    flag("timeout", Value::Text, "give up after this long"),
    flag(
        "rollback-on-failure",
        Value::None,
        "switch back (or undo the waves) on failure",
    ),
    flag("canary", Value::Text, "switch N nodes first (0: none)"),
    flag(
        "batch",
        Value::Text,
        "then K nodes (or P%) per wave (0: none)",
    ),
    flag("pause", Value::Text, "wait this long between waves"),
    flag(
        "promote",
        Value::Choice(&["auto", "manual"]),
        "manual: stop after the first wave until depro promote",
    ),
    flag("message", Value::Text, "why: recorded with the switch"),
    flag(
        "dry-run",
        Value::None,
        "print what would be done, do nothing",
    ),
];

/// The commands, with a line each.
pub(crate) const COMMANDS: &[(&str, &str)] = &[
    ("agent", "run the agent on this host"),
    ("deploy", "add a version and make it current"),
    ("rollout", "make a version in the tree current"),
    ("rollback", "make the previous version current again"),
    ("restart", "run the rollout hook of current again, in waves"),
    ("remove", "remove versions from the tree"),
    ("prune", "remove all but the newest versions"),
    ("status", "show versions and nodes"),
    ("query", "show versions and nodes (as status)"),
    ("history", "which version was current when, and how"),
    ("policy", "show or set the rollout policy of the prefix"),
    ("pause", "start no further wave of the rollout under way"),
    ("resume", "go on with the rollout under way"),
    ("promote", "go on with a rollout stopped after its canary"),
    ("forget", "stop showing a retired host as absent"),
    (
        "wait",
        "wait until a version is ready or active on enough nodes",
    ),
    ("version", "print the depro version"),
    ("help", "show help for a command"),
    ("completion", "print a shell completion script"),
];

/// Each command's flags.
pub(crate) fn flags(command: &str) -> Vec<&'static Flag> {
    const AGENT: &[Flag] = &[
        flag(
            "config-dir",
            Value::Dir,
            "read every *.json in this directory",
        ),
        flag("config-file", Value::File, "read this file"),
        flag("name", Value::Text, "the name of this node in the tree"),
        flag(
            "log-level",
            Value::Choice(&["error", "warn", "info", "debug", "trace"]),
            "error, warn, info, debug or trace",
        ),
        flag(
            "log-format",
            Value::Choice(&["text", "json"]),
            "text, or one JSON object per line",
        ),
        flag(
            "allow-insecure-config",
            Value::None,
            "accept config files others could change",
        ),
        flag("check", Value::None, "validate the configuration and exit"),
    ];
    const DEPLOY: &[Flag] = &[
        flag(
            "keep",
            Value::Text,
            "afterwards keep only the K newest versions",
        ),
        flag("no-rollout", Value::None, "stop once the version is ready"),
    ];
    const ROLLBACK: &[Flag] = &[flag("to", Value::Text, "roll back to this version")];
    const REMOVE: &[Flag] = &[
        flag(
            "dry-run",
            Value::None,
            "print what would be done, do nothing",
        ),
        flag("wait", Value::None, "follow the purge node by node"),
        flag(
            "timeout",
            Value::Text,
            "with -wait, give up after this long",
        ),
    ];
    const PRUNE: &[Flag] = &[
        flag("keep", Value::Text, "how many good versions to keep"),
        flag(
            "failed",
            Value::None,
            "remove the versions that failed everywhere too",
        ),
        flag(
            "dry-run",
            Value::None,
            "print what would be done, do nothing",
        ),
    ];
    const STATUS: &[Flag] = &[
        flag("json", Value::None, "print JSON"),
        flag("watch", Value::None, "follow changes until interrupted"),
    ];
    const HISTORY: &[Flag] = &[flag("json", Value::None, "print JSON")];
    const CLEAR: &[Flag] = &[flag("clear", Value::None, "remove the policy")];
    const WAIT: &[Flag] = &[
        flag(
            "for",
            Value::Choice(&["ready", "active"]),
            "ready or active",
        ),
        flag("nodes", Value::Text, "how many nodes: N, all or P%"),
        flag("timeout", Value::Text, "give up after this long"),
    ];
    let own: &[&'static [Flag]] = match command {
        "agent" => &[AGENT, CONNECTION],
        "deploy" => &[DEPLOY, SWITCH, CONNECTION],
        "rollout" => &[SWITCH, CONNECTION],
        "rollback" => &[ROLLBACK, SWITCH, CONNECTION],
        "restart" => &[SWITCH, CONNECTION],
        "remove" => &[REMOVE, CONNECTION],
        "prune" => &[PRUNE, CONNECTION],
        "status" | "query" => &[STATUS, CONNECTION],
        "history" => &[HISTORY, CONNECTION],
        // The switch flags a policy holds, and -message (see below).
        "policy" => &[SWITCH, CLEAR, CONNECTION],
        "pause" | "resume" | "promote" | "forget" => &[&[], CONNECTION],
        "wait" => &[WAIT, CONNECTION],
        _ => &[],
    };
    let mut all: Vec<&'static Flag> = own.iter().flat_map(|f| f.iter()).collect();
    if command == "restart" {
        // A restart runs on the nodes that run current (see cli.rs).
        all.retain(|f| !matches!(f.name, "nodes" | "min-nodes" | "rollback-on-failure"));
    }
    if command == "policy" {
        let switch_only = |f: &Flag| {
            SWITCH.iter().any(|s| s.name == f.name)
                && f.name != "message"
                && !crate::cli::POLICY_FLAGS.contains(&f.name)
        };
        all.retain(|f| !switch_only(f));
    }
    if command != "agent" && own.iter().any(|f| !f.is_empty()) {
        all.insert(0, &PREFIX);
        all.insert(1, &QUIET);
    }
    all
}

/// The completion script for `shell`.
pub(crate) fn script(shell: Shell) -> String {
    match shell {
        Shell::Bash => bash(),
        Shell::Zsh => zsh(),
        Shell::Fish => fish(),
    }
}

fn command_names() -> Vec<&'static str> {
    COMMANDS.iter().map(|(c, _)| *c).collect()
}

fn bash() -> String {
    let mut cases = String::new();
    for (command, _) in COMMANDS {
        let flags = flags(command);
        if flags.is_empty() {
            continue;
        }
        let words: Vec<String> = flags
            .iter()
            .map(|f| match f.value {
                Value::None => format!("-{}", f.name),
                _ => format!("-{}=", f.name),
            })
            .collect();
        cases.push_str(&format!("    {command}) opts=\"{}\" ;;\n", words.join(" ")));
    }
    let files: Vec<String> = all_flags(|v| v == Value::File || v == Value::Dir)
        .iter()
        .map(|f| format!("-{f}"))
        .collect();
    let mut choices = String::new();
    for (name, words) in choice_flags() {
        choices.push_str(&format!(
            "      -{name}) COMPREPLY=($(compgen -W \"{}\" -- \"$cur\")) ;;\n",
            words.join(" ")
        ));
    }
    format!(
        r#"# bash completion for depro (generated by `depro completion bash`)
_depro() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} opts=""
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=($(compgen -W "{commands}" -- "$cur"))
    return
  fi
  case "${{COMP_WORDS[1]}}" in
{cases}    help) [ "$COMP_CWORD" -eq 2 ] && COMPREPLY=($(compgen -W "{commands}" -- "$cur")); return ;;
    completion) [ "$COMP_CWORD" -eq 2 ] && COMPREPLY=($(compgen -W "bash zsh fish" -- "$cur")); return ;;
    *) return ;;
  esac
  # A value after `-flag=` (bash splits words at `=`): files where a file is wanted.
  if [ "$cur" = "=" ] || [ "$prev" = "=" ]; then
    local name=${{COMP_WORDS[COMP_CWORD-1]}}
    [ "$cur" = "=" ] || name=${{COMP_WORDS[COMP_CWORD-2]}}
    [ "$cur" = "=" ] && cur=""
    case "$name" in
      {file_flags}) COMPREPLY=($(compgen -f -- "$cur")) ;;
{choices}    esac
    return
  fi
  COMPREPLY=($(compgen -W "$opts" -- "$cur"))
  case "${{COMPREPLY[0]}}" in *=) compopt -o nospace 2>/dev/null ;; esac
}}
complete -F _depro depro
"#,
        commands = command_names().join(" "),
        file_flags = files.join("|"),
        choices = choices,
    )
}

fn zsh() -> String {
    let mut cases = String::new();
    for (command, _) in COMMANDS {
        let flags = flags(command);
        if flags.is_empty() {
            continue;
        }
        let specs: Vec<String> = flags
            .iter()
            .map(|f| {
                let help = f.help.replace('\'', "");
                match f.value {
                    Value::None => format!("'-{}[{help}]'", f.name),
                    Value::File => format!("'-{}=[{help}]:file:_files'", f.name),
                    Value::Dir => format!("'-{}=[{help}]:directory:_files -/'", f.name),
                    Value::Choice(words) => {
                        format!("'-{}=[{help}]:{}:({})'", f.name, f.name, words.join(" "))
                    }
                    Value::Text => format!("'-{}=[{help}]:{}:'", f.name, f.name),
                }
            })
            .collect();
        cases.push_str(&format!(
            "    {command}) _arguments {} '*:argument:' ;;\n",
            specs.join(" \\\n        ")
        ));
    }
    let commands: Vec<String> = COMMANDS
        .iter()
        .map(|(c, h)| format!("    '{c}:{h}'"))
        .collect();
    format!(
        r#"#compdef depro
# zsh completion for depro (generated by `depro completion zsh`)
_depro() {{
  local -a commands
  commands=(
{commands}
  )
  if (( CURRENT == 2 )); then
    _describe 'command' commands
    return
  fi
  local command=$words[2]
  shift words
  (( CURRENT-- ))
  case $command in
{cases}    help) _describe 'command' commands ;;
    completion) _values 'shell' bash zsh fish ;;
  esac
}}
_depro "$@"
"#,
        commands = commands.join("\n"),
    )
}

fn fish() -> String {
    let mut out = String::from(
        "# fish completion for depro (generated by `depro completion fish`)\ncomplete -c depro -f\n",
    );
    let names = command_names().join(" ");
    for (command, help) in COMMANDS {
        out.push_str(&format!(
            "complete -c depro -n 'not __fish_seen_subcommand_from {names}' -a {command} -d '{help}'\n"
        ));
    }
    for (command, _) in COMMANDS {
        for flag in flags(command) {
            let value = match flag.value {
                Value::None => String::new(),
                Value::File | Value::Dir => " -r -F".to_string(),
                Value::Choice(words) => format!(" -x -a '{}'", words.join(" ")),
                Value::Text => " -r".to_string(),
            };
            out.push_str(&format!(
                "complete -c depro -n '__fish_seen_subcommand_from {command}' -o {}{value} -d '{}'\n",
                flag.name,
                flag.help.replace('\'', "")
            ));
        }
    }
    out.push_str(&format!(
        "complete -c depro -n '__fish_seen_subcommand_from help' -a '{names}'\n\
         complete -c depro -n '__fish_seen_subcommand_from completion' -a 'bash zsh fish'\n"
    ));
    out
}

/// The flags whose value is one of a few words, and the words.
fn choice_flags() -> Vec<(&'static str, &'static [&'static str])> {
    let mut out: Vec<(&'static str, &'static [&'static str])> = COMMANDS
        .iter()
        .flat_map(|(c, _)| flags(c))
        .filter_map(|f| match f.value {
            Value::Choice(words) => Some((f.name, words)),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The names of every flag whose value is of a kind.
fn all_flags(kind: impl Fn(Value) -> bool) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = COMMANDS
        .iter()
        .flat_map(|(c, _)| flags(c))
        .filter(|f| kind(f.value))
        .map(|f| f.name)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag the scripts offer is one the command accepts.
    #[test]
    fn every_completed_flag_is_accepted_by_its_command() {
        for (command, _) in COMMANDS {
            for flag in flags(command) {
                let value = match flag.name {
                    "nodes" | "min-nodes" | "canary" | "batch" | "keep" => "=2",
                    "timeout" | "pause" => "=5s",
                    "log-level" => "=info",
                    "log-format" => "=json",
                    "for" => "=ready",
                    "promote" => "=manual",
                    _ if flag.value == Value::None => "",
                    _ => "=x",
                };
                let mut args = vec![command.to_string()];
                if matches!(
                    *command,
                    "deploy" | "rollout" | "remove" | "wait" | "promote"
                ) {
                    args.push("v1".into());
                }
                if *command == "prune" && flag.name != "keep" {
                    args.push("-keep=1".into());
                }
                args.push(format!("-{}{value}", flag.name));
                let parsed = crate::cli::parse(args.iter().map(std::ffi::OsString::from));
                if let Err(e) = parsed {
                    assert!(
                        !e.to_string().contains("unknown flag"),
                        "{command} -{}: {e}",
                        flag.name
                    );
                }
            }
        }
    }

    #[test]
    fn every_command_is_completed_in_every_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            for (command, _) in COMMANDS {
                assert!(text.contains(command), "{shell:?} lacks {command}");
            }
        }
        // Single quotes delimit the descriptions in every script.
        for (command, help) in COMMANDS {
            assert!(!help.contains('\''), "{command}");
            for flag in flags(command) {
                assert!(!flag.help.contains('\''), "{command} -{}", flag.name);
            }
        }
        assert!(
            Shell::parse("tcsh")
                .unwrap_err()
                .to_string()
                .contains("bash, zsh or fish")
        );
    }
}
