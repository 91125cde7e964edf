//! `depro help [COMMAND]` and `-h`: short usage texts. The full reference
//! is the man page, depro(1).

use crate::error::{Error, Result};

const OVERVIEW: &str = "\
depro: deploy versions to a fleet through Consul's KV store

Usage: depro <command> [flags]

Commands:
  agent      run on every host: follow the tree and deploy, roll out, clean
  deploy     add a version, wait until enough nodes have it, make it current
  rollout    make a version that is already deployed current
  rollback   make the previous current version current again
  remove     remove versions from every node
  prune      remove all but the newest good versions
  status     show versions and every node's state (alias: query)
  history    which version was current when, switched by whom and how
  policy     show or set the prefix's rollout policy, which every switch follows
  pause      start no further wave of the progressive rollout under way
  resume     go on with it (and drive it, if no command does)
  promote    go on with a rollout stopped after its first wave (-promote=manual)
  forget     stop showing a retired host's node as absent
  wait       wait until a version is ready or active on enough nodes
  version    print the version
  completion print a completion script for bash, zsh or fish

Flags take Go style (-nodes=3, -nodes 3) or GNU style (--nodes 3).
Run `depro help <command>` for a command's flags, `man depro` for all of it.
";

/// For the commands that take -prefix (not the agent).
const OUTPUT: &str = "\
Output: the result on stdout, progress (with seconds since the start) on stderr.
  -quiet              no progress: the result and errors only
Ctrl-C while a command writes or waits says what it leaves behind and how to finish
or undo it (exit 130).
";

const CONNECTION: &str = "\
Consul connection (also from CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE,
CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_HTTP_SSL_VERIFY, DEPRO_SERVER,
DEPRO_TOKEN, DEPRO_DATACENTER):
  -server=ADDR        Consul HTTP address, host:port or http(s)://host:port [127.0.0.1:8500]
  -token=TOKEN        ACL token (prefer CONSUL_HTTP_TOKEN or -token-file)
  -token-file=FILE    read the ACL token from FILE
  -datacenter=DC      Consul datacenter
  -ca-file=FILE       CA certificate for https
  -client-cert=FILE   client certificate for https
  -client-key=FILE    client key for https
  -tls-skip-verify    do not verify Consul's certificate
";

fn command_text(command: &str) -> Option<&'static str> {
    Some(match command {
        "agent" => {
            "\
Usage: depro agent -config-dir=/etc/depro/ [flags]

Runs on every host: watches each configured deployment's prefix in Consul and
makes its directory follow it. SIGTERM/SIGINT stop it (a running hook may
finish within shutdown_grace), SIGHUP reloads the configuration.

  -config-dir=DIR     read every *.json in DIR, in name order (repeatable)
  -config-file=FILE   read FILE (repeatable)
  -name=NAME          this node's name in the tree [DEPRO_NAME, \"name\", hostname]
  -log-level=LEVEL    error, warn, info, debug or trace [info]
  -log-format=FORMAT  text, or json: one object per line (time, level, node,
                      deployment, version, message) for log shippers [text]
  -allow-insecure-config  accept config files or directories others could change
  -check              validate the configuration as the agent would, without
                      contacting Consul, and exit (0: valid, 1: the problem)

Example: depro agent -check -config-dir=/etc/depro/ && systemctl reload depro
"
        }
        "deploy" => {
            "\
Usage: depro deploy VERSION -prefix=PREFIX [-nodes=N] [flags]

Creates VERSION in the tree, waits until at least N nodes have it and none
failed, switches current to it (check-and-set), and waits for the rollout.

  -prefix=PREFIX          the deployment's KV prefix [DEPRO_PREFIX]
  -nodes=N|all|P%         nodes that must have the version [1]; all: every
                          live agent of the prefix; P%: a share of them
  -min-nodes=M            but at least M nodes, however few agents are live
  -timeout=DURATION       give up after this long [10m]
  -keep=K                 afterwards, remove all but the K newest versions
  -no-rollout             stop once the version is ready everywhere
  -rollback-on-failure    switch current back (or undo the waves) on failure
  -message=TEXT           why, recorded with the switch (history, status)
  -canary=N               switch N nodes first, then the rest in waves
  -batch=K|P%             switch K nodes (or P% of them) per wave
  -pause=DURATION         wait this long between waves
  -promote=manual         stop after the first wave until `depro promote`
  -dry-run                print what would be written and waited for; write nothing

Example: depro deploy v2 -prefix=api/version -nodes=all -canary=1 -batch=25%
"
        }
        "rollout" => {
            "\
Usage: depro rollout VERSION -prefix=PREFIX [-nodes=N] [flags]

Makes a version that is already in the tree current, with the same checks as
deploy (rollforward, or rollback to a named version).

  -prefix=PREFIX          the deployment's KV prefix [DEPRO_PREFIX]
  -nodes=N|all|P%         nodes that must have the version [1]
  -min-nodes=M            but at least M nodes, however few agents are live
  -timeout=DURATION       give up after this long [10m]
  -rollback-on-failure    switch current back (or undo the waves) on failure
  -message=TEXT           why, recorded with the switch (history, status)
  -canary=N               switch N nodes first, then the rest in waves
  -batch=K|P%             switch K nodes (or P% of them) per wave
  -pause=DURATION         wait this long between waves
  -promote=manual         stop after the first wave until `depro promote`
  -dry-run                print what would be written and waited for; write nothing

A progressive rollout of VERSION that was interrupted is resumed.

Example: depro rollout v42 -prefix=api/version -nodes=all -batch=25% -pause=1m
"
        }
        "rollback" => {
            "\
Usage: depro rollback -prefix=PREFIX [-nodes=N] [-to=VERSION] [flags]

Makes the version that was current before the present one current again.
While a progressive rollout is under way, undoes it instead.

  -prefix=PREFIX          the deployment's KV prefix [DEPRO_PREFIX]
  -to=VERSION             roll back to this version instead
  -nodes=N|all|P%         nodes that must have the version [1]
  -min-nodes=M            but at least M nodes, however few agents are live
  -timeout=DURATION       give up after this long [10m]
  -rollback-on-failure    switch current back (or undo the waves) on failure
  -message=TEXT           why, recorded with the switch (history, status)
  -canary=N               switch N nodes first, then the rest in waves
  -batch=K|P%             switch K nodes (or P% of them) per wave
  -pause=DURATION         wait this long between waves
  -promote=manual         stop after the first wave until `depro promote`
  -dry-run                print what would be written and waited for; write nothing

Examples: depro rollback -prefix=api/version -nodes=all
          depro rollback -prefix=api/version -to=v41
"
        }
        "restart" => {
            "\
Usage: depro restart -prefix=PREFIX [flags]

Runs current's rollout hook (and health checks) again on every node that runs
it, in waves with a rollout's gates, without moving current: a node reports
the version ready while its hook runs and active once healthy; the first
failure halts the restart. Resumes a restart under way.

  -prefix=PREFIX          the deployment's KV prefix [DEPRO_PREFIX]
  -timeout=DURATION       give up after this long [10m]
  -message=TEXT           why, recorded with the restart (history)
  -canary=N               restart N nodes first, then the rest in waves
  -batch=K|P%             restart K nodes (or P% of them) per wave
  -pause=DURATION         wait this long between waves
  -promote=manual         stop after the first wave until `depro promote`
  -dry-run                print what would be written and waited for; write nothing

Example: depro restart -prefix=api/version -canary=1 -batch=25% -message=\"new TLS cert\"
"
        }
        "remove" => {
            "\
Usage: depro remove VERSION... -prefix=PREFIX [-wait] [flags]

Removes versions (never current): every node cleans its directory.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]
  -wait               follow the purge until no node has the version
  -timeout=DURATION   with -wait, give up after this long [10m]
  -dry-run            print what would be deleted; delete nothing

Example: depro remove v40 v41 -prefix=api/version -wait
"
        }
        "prune" => {
            "\
Usage: depro prune -prefix=PREFIX -keep=K [-failed] [flags]

Removes all but the K newest good versions (never current nor the one
rollback would go back to). Versions that failed everywhere do not count
among the K; they go with -failed.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]
  -keep=K             how many good versions to keep
  -failed             remove the versions that failed everywhere too
  -dry-run            print what would be removed; remove nothing

Example: depro prune -prefix=api/version -keep=5
"
        }
        "status" | "query" => {
            "\
Usage: depro status -prefix=PREFIX [VERSION] [-json] [flags]

Shows every version in creation order, which is current, and each node's state.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]
  -json               print a machine-readable document instead of a table
  -watch              follow changes until interrupted: the table redrawn on a
                      terminal, one line per change otherwise

Examples: depro status -prefix=api/version
          depro status -prefix=api/version v42 -json | jq '.versions[0].counts'
"
        }
        "wait" => {
            "\
Usage: depro wait VERSION -prefix=PREFIX [-for=ready|active] [-nodes=N|all|P%] [flags]

Waits until VERSION is active (or ready) on enough nodes, for scripts that
started a deploy elsewhere; a failed node ends it at once, with its reason.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]
  -for=STATE          ready or active [active]
  -nodes=N|all|P%     how many nodes [1]; all: every live agent of the prefix
  -timeout=DURATION   give up after this long [10m]

Example: depro wait v42 -prefix=api/version -for=active -nodes=all -timeout=5m
"
        }
        "history" => {
            "\
Usage: depro history -prefix=PREFIX [-json] [flags]

Which version was current when, switched by whom and how (deploy, rollout,
rollback, rollback-on-failure; \"(waves)\" for a progressive rollout), newest
first: the last 100 switches, then older ones from the versions' keys.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]
  -json               print a machine-readable document instead of a table

Example: depro history -prefix=api/version -json | jq -r '.switches[0].by'
"
        }
        "policy" => {
            "\
Usage: depro policy -prefix=PREFIX [policy flags] [-message=TEXT] [-clear] [flags]

Without flags, shows the prefix's rollout policy. With policy flags, sets it
(replacing the one before; check-and-set, recorded in history): every deploy,
rollout, rollback, retry and resume then takes from it each of these flags it
is not given, and says so in its progress.

  -prefix=PREFIX          the deployment's KV prefix [DEPRO_PREFIX]
  -nodes=N|all|P%         nodes that must have the version
  -min-nodes=M            but at least M nodes, however few agents are live
  -canary=N               switch N nodes first (0: none, to override it)
  -batch=K|P%             then K nodes (or P% of them) per wave (0: none)
  -pause=DURATION         wait this long between waves
  -rollback-on-failure    switch current back (or undo the waves) on failure
  -promote=manual|auto    manual: stop after the first wave until `depro promote`
  -message=TEXT           why, recorded with the policy (history)
  -clear                  remove the policy

Example: depro policy -prefix=api/version -nodes=all -canary=1 -batch=25% -pause=1m
"
        }
        "pause" => {
            "\
Usage: depro pause -prefix=PREFIX [flags]

Pauses the progressive rollout under way, from any terminal: the wave under way
completes, and no further wave starts (the command driving the waves waits;
its -timeout runs on) until `depro resume`. `depro rollback` undoes it.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]

Example: depro pause -prefix=api/version
"
        }
        "resume" => {
            "\
Usage: depro resume -prefix=PREFIX [flags]

Lets a paused progressive rollout go on. When no command drives its waves (the
one that started it was interrupted or is gone), drives them from here, as
`depro rollout VERSION` would, with the rollout's own flags.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]

Example: depro resume -prefix=api/version
"
        }
        "promote" => {
            "\
Usage: depro promote VERSION -prefix=PREFIX [flags]

Lets the progressive rollout of VERSION go on after its first wave: one started
with -promote=manual stops there (exit 0, \"waiting for promotion\"). Drives the
remaining waves from here, with the rollout's own flags (as `depro resume`).

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]

Example: depro promote v42 -prefix=api/version
"
        }
        "forget" => {
            "\
Usage: depro forget NODE -prefix=PREFIX [flags]

Every agent that followed the prefix is remembered (PREFIX/.known/NODE), and
`depro status` shows one that stopped as absent. For a retired host, forget
it. Refused while its agent runs.

  -prefix=PREFIX      the deployment's KV prefix [DEPRO_PREFIX]

Example: depro forget node05 -prefix=api/version
"
        }
        "completion" => {
            "\
Usage: depro completion bash|zsh|fish

Prints a completion script (the packages install them already).

Examples: source <(depro completion bash)
          depro completion fish > ~/.config/fish/completions/depro.fish
"
        }
        "version" => "Usage: depro version (or depro --version)\n",
        "help" => "Usage: depro help [COMMAND]\n",
        _ => return None,
    })
}

/// The text `depro help [topic]` prints.
pub(crate) fn text(topic: Option<&str>) -> Result<String> {
    match topic {
        None => Ok(OVERVIEW.to_string()),
        Some(command) => {
            let text = command_text(command).ok_or_else(|| {
                Error::Usage(format!(
                    "no help for {command:?}; the commands are {}",
                    crate::cli::COMMANDS.join(", ")
                ))
            })?;
            Ok(match command {
                "version" | "help" | "completion" => text.to_string(),
                "agent" => format!("{text}\n{CONNECTION}"),
                _ => format!("{text}\n{OUTPUT}\n{CONNECTION}"),
            })
        }
    }
}

/// `depro --version`: the version and, if built from a checkout, the commit.
pub(crate) fn version() -> String {
    match option_env!("DEPRO_COMMIT") {
        Some(commit) => format!("depro {} (commit {commit})", env!("CARGO_PKG_VERSION")),
        None => format!("depro {}", env!("CARGO_PKG_VERSION")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags a help text lists (`  -name=VALUE   …` lines).
    fn listed_flags(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|line| line.strip_prefix("  -"))
            .map(|rest| {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                name
            })
            .collect()
    }

    #[test]
    fn every_flag_a_command_s_help_lists_is_one_the_command_takes() {
        for command in crate::cli::COMMANDS {
            let Ok(text) = text(Some(command)) else {
                continue;
            };
            for flag in listed_flags(&text) {
                let args = [command.to_string(), format!("-{flag}=1")];
                let parsed = crate::cli::parse(args.iter().map(std::ffi::OsString::from));
                if let Err(e) = parsed {
                    assert!(
                        !e.to_string().contains("unknown flag"),
                        "`depro help {command}` lists -{flag}, which it refuses: {e}"
                    );
                }
            }
        }
    }
}
