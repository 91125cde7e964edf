//! `depro help [COMMAND]` and `-h`: short usage texts. The full reference
//! is the man page, depro(1). The usage, description and example of each
//! command are written here; its flags are listed from the flag table.

use crate::error::{Error, Result};
use crate::flags::{self, Flag, Kind, Section};

const OVERVIEW: &str = "\
depro: deploy versions to a fleet through Consul's KV store

Usage: depro <command> [flags]

Commands:
  agent      run on every host: follow the tree and deploy, roll out, clean
  deploy     add a version, wait until enough nodes have it, make it current
  rollout    make a version that is already deployed current
  rollback   make the previous current version current again
  restart    run current's rollout hook again on its nodes, in waves
  remove     remove versions from every node
  prune      remove all but the newest good versions
  status     show versions and every node's state (alias: query)
  history    which version was current when, switched by whom and how
  policy     show or set the prefix's rollout policy, which every switch follows
  pause      start no further wave of the progressive rollout under way
  resume     go on with it (and drive it, if no command does)
  promote    go on with a rollout stopped after its first wave (-promote=manual)
  forget     stop showing a retired host's node as absent
  keygen     make a key pair to sign releases with (deploy -sign, trusted_keys)
  wait       wait until a version is ready or active on enough nodes
  version    print the version
  completion print a completion script for bash, zsh or fish

Flags take Go style (-nodes=3, -nodes 3) or GNU style (--nodes 3).
Run `depro help <command>` for a command's flags, `man depro` for all of it.
";

/// Before and after the flags under "Output:" (the commands that take -prefix).
const OUTPUT: (&str, &str) = (
    "Output: the result on stdout, progress (with seconds since the start) on stderr.\n",
    "Ctrl-C while a command writes or waits says what it leaves behind and how to finish
or undo it (exit 130).
",
);

/// Before the Consul connection flags.
const CONNECTION: &str = "\
Consul connection (also from CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE,
CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_HTTP_SSL_VERIFY, DEPRO_SERVER,
DEPRO_TOKEN, DEPRO_DATACENTER):
";

/// How wide `-h` wraps the help of a flag.
const WIDTH: usize = 80;

fn command_text(command: &str) -> Option<(&'static str, &'static str)> {
    Some(match command {
        "agent" => (
            "\
Usage: depro agent -config-dir=/etc/depro/ [flags]

Runs on every host: watches each configured deployment's prefix in Consul and
makes its directory follow it. SIGTERM/SIGINT stop it (a running hook may
finish within shutdown_grace), SIGHUP reloads the configuration.
",
            "\
Example: depro agent -check -config-dir=/etc/depro/ && systemctl reload depro
",
        ),
        "deploy" => (
            "\
Usage: depro deploy VERSION -prefix=PREFIX [-nodes=N] [flags]

Creates VERSION in the tree, waits until at least N nodes have it and none
failed, switches current to it (check-and-set), and waits for the rollout;
with -keep, then removes older versions.
",
            "\
Example: depro deploy v2 -prefix=api/version -nodes=all -canary=1 -batch=25%
",
        ),
        "rollout" => (
            "\
Usage: depro rollout VERSION -prefix=PREFIX [-nodes=N] [flags]

Makes a version that is already in the tree current, with the same checks as
deploy (rollforward, or rollback to a named version). A progressive rollout
of VERSION that was interrupted is resumed.
",
            "\
Example: depro rollout v42 -prefix=api/version -nodes=all -batch=25% -pause=1m
",
        ),
        "rollback" => (
            "\
Usage: depro rollback -prefix=PREFIX [-nodes=N] [-to=VERSION] [flags]

Makes the version that was current before the present one current again.
While a progressive rollout is under way, undoes it instead.
",
            "\
Examples: depro rollback -prefix=api/version -nodes=all
          depro rollback -prefix=api/version -to=v41
",
        ),
        "keygen" => (
            "\
Usage: depro keygen FILE

Makes an Ed25519 key pair to sign releases with: FILE, the private key (mode
0600, never overwritten), and FILE.pub, the public key on one line. `depro
deploy ... -sign=FILE` signs a version's artifact (with the prefix and the
version); an agent whose deployment lists the public key's line in
\"trusted_keys\" deploys only versions a trusted key signed. List several keys
to rotate them.

",
            "\
Example: depro keygen /etc/depro/release.key
",
        ),
        "restart" => (
            "\
Usage: depro restart -prefix=PREFIX [flags]

Runs current's rollout hook (and health checks) again on every node that runs
it, in waves with a rollout's gates, without moving current: a node reports
the version ready while its hook runs and active once healthy; the first
failure halts the restart. Resumes a restart under way.
",
            "\
Example: depro restart -prefix=api/version -canary=1 -batch=25% -message=\"new TLS cert\"
",
        ),
        "remove" => (
            "\
Usage: depro remove VERSION... -prefix=PREFIX [-wait] [flags]

Removes versions (never current): every node cleans its directory.
",
            "\
Example: depro remove v40 v41 -prefix=api/version -wait
",
        ),
        "prune" => (
            "\
Usage: depro prune -prefix=PREFIX -keep=K [-failed] [flags]

Removes all but the K newest good versions (never current nor the one
rollback would go back to). Versions that failed everywhere do not count
among the K; they go with -failed.
",
            "\
Example: depro prune -prefix=api/version -keep=5
",
        ),
        "status" | "query" => (
            "\
Usage: depro status -prefix=PREFIX [VERSION] [-json] [flags]

Shows every version in creation order, which is current, and each node's state.
",
            "\
Examples: depro status -prefix=api/version
          depro status -prefix=api/version v42 -json | jq '.versions[0].counts'
",
        ),
        "wait" => (
            "\
Usage: depro wait VERSION -prefix=PREFIX [-for=ready|active] [-nodes=N|all|P%] [flags]

Waits until VERSION is active (or ready) on enough nodes, for scripts that
started a deploy elsewhere; a failed node ends it at once, with its reason.
",
            "\
Example: depro wait v42 -prefix=api/version -for=active -nodes=all -timeout=5m
",
        ),
        "history" => (
            "\
Usage: depro history -prefix=PREFIX [-json] [flags]

Which version was current when, switched by whom and how (deploy, rollout,
rollback, rollback-on-failure; \"(waves)\" for a progressive rollout), newest
first: the last 100 switches, then older ones from the versions' keys.
",
            "\
Example: depro history -prefix=api/version -json | jq -r '.switches[0].by'
",
        ),
        "events" => (
            "\
Usage: depro events -prefix=PREFIX [-json] [-since=INDEX] [flags]

Follows the prefix and prints one line per change until interrupted (SIGINT
or SIGTERM end it cleanly): versions created and removed, switches of current
(by whom, how, the message), a rollout's waves started and finished, nodes'
state changes, failures with their reason, agents joining and leaving. Each
event carries the Consul index it was seen at; -since=INDEX first prints what
changed after it (what was removed meanwhile cannot be seen), to resume
after a disconnect. One blocking query at a time, whatever the fleet's size.
",
            "\
Example: depro events -prefix=api/version -json | while read -r e; do curl -sd \"$e\" $HOOK; done
",
        ),
        "policy" => (
            "\
Usage: depro policy -prefix=PREFIX [policy flags] [-message=TEXT] [-clear] [flags]

Without flags, shows the prefix's rollout policy. With policy flags, sets it
(replacing the one before; check-and-set, recorded in history): every deploy,
rollout, rollback, retry and resume then takes from it each of these flags it
is not given, and says so in its progress.
",
            "\
Example: depro policy -prefix=api/version -nodes=all -canary=1 -batch=25% -pause=1m
",
        ),
        "pause" => (
            "\
Usage: depro pause -prefix=PREFIX [flags]

Pauses the progressive rollout under way, from any terminal: the wave under way
completes, and no further wave starts (the command driving the waves waits;
its -timeout runs on) until `depro resume`. `depro rollback` undoes it.
",
            "\
Example: depro pause -prefix=api/version
",
        ),
        "resume" => (
            "\
Usage: depro resume -prefix=PREFIX [flags]

Lets a paused progressive rollout go on. When no command drives its waves (the
one that started it was interrupted or is gone), drives them from here, as
`depro rollout VERSION` would, with the rollout's own flags.
",
            "\
Example: depro resume -prefix=api/version
",
        ),
        "promote" => (
            "\
Usage: depro promote VERSION -prefix=PREFIX [flags]

Lets the progressive rollout of VERSION go on after its first wave: one started
with -promote=manual stops there (exit 0, \"waiting for promotion\"). Drives the
remaining waves from here, with the rollout's own flags (as `depro resume`).
",
            "\
Example: depro promote v42 -prefix=api/version
",
        ),
        "forget" => (
            "\
Usage: depro forget NODE -prefix=PREFIX [flags]

Every agent that followed the prefix is remembered (PREFIX/.known/NODE), and
`depro status` shows one that stopped as absent. For a retired host, forget
it. Refused while its agent runs.
",
            "\
Example: depro forget node05 -prefix=api/version
",
        ),
        "completion" => (
            "\
Usage: depro completion bash|zsh|fish

Prints a completion script (the packages install them already).

Examples: source <(depro completion bash)
          depro completion fish > ~/.config/fish/completions/depro.fish
",
            "",
        ),
        "version" => ("Usage: depro version (or depro --version)\n", ""),
        "help" => ("Usage: depro help [COMMAND]\n", ""),
        _ => return None,
    })
}

/// The text `depro help [topic]` prints.
pub(crate) fn text(topic: Option<&str>) -> Result<String> {
    let Some(command) = topic else {
        return Ok(OVERVIEW.to_string());
    };
    let (intro, example) = command_text(command).ok_or_else(|| {
        Error::Usage(format!(
            "no help for {command:?}; the commands are {}",
            crate::cli::COMMANDS.join(", ")
        ))
    })?;
    if flags::command_bit(command) == 0 {
        return Ok(format!("{intro}{example}"));
    }
    // One column for the page: two spaces after its longest flag.
    let column = 4 + listed(command).map(|f| spelled(f).len()).max().unwrap_or(0);
    let lines = |section| flag_lines(command, section, column);
    let mut out = format!("{intro}\n{}\n{example}", lines(Section::Own));
    let output = lines(Section::Output);
    if !output.is_empty() {
        out += &format!("\n{}{output}{}", OUTPUT.0, OUTPUT.1);
    }
    out += &format!("\n{CONNECTION}{}", lines(Section::Connection));
    Ok(out)
}

/// The flags `-h` lists for `command`: all it takes but aliases.
fn listed(command: &str) -> impl Iterator<Item = &'static Flag> + '_ {
    flags::of(command).filter(|f| !matches!(f.kind, Kind::Alias(_)))
}

/// `-name` or `-name=PLACEHOLDER`.
fn spelled(flag: &Flag) -> String {
    match flag.placeholder() {
        Some(value) => format!("-{}={value}", flag.name),
        None => format!("-{}", flag.name),
    }
}

/// The lines of `command`'s flags in `section`: each flag, then its help
/// and default at `column`, wrapped at [`WIDTH`].
fn flag_lines(command: &str, section: Section, column: usize) -> String {
    let mut out = String::new();
    for flag in listed(command).filter(|f| f.section == section) {
        let mut line = format!("  {}", spelled(flag));
        // The default is one word: never broken over two lines.
        let default = (!flag.default.is_empty()).then(|| format!("[{}]", flag.default));
        for word in flag.help.split(' ').chain(default.as_deref()) {
            if line.len() > column && line.len() + 1 + word.len() > WIDTH {
                out += &line;
                out.push('\n');
                line.clear();
            }
            if line.len() < column {
                line += &" ".repeat(column - line.len());
            } else {
                line.push(' ');
            }
            line += word;
        }
        out += &line;
        out.push('\n');
    }
    out
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
    fn a_command_s_help_lists_every_flag_of_the_table_it_takes_aligned() {
        let text = text(Some("deploy")).unwrap();
        let listed = listed_flags(&text);
        for flag in flags::of("deploy").filter(|f| !matches!(f.kind, Kind::Alias(_))) {
            assert!(listed.iter().any(|l| l == flag.name), "-{}", flag.name);
        }
        assert!(
            !listed.iter().any(|l| l == "http-addr"),
            "aliases are not listed"
        );
        // One column for the page, two spaces after the longest flag, and
        // lines of at most 80 columns.
        let flag_lines = text.lines().filter(|l| l.starts_with("  -"));
        let column = |line: &str| {
            let gap = 2 + line[2..].find(' ')?;
            Some(gap + line[gap..].len() - line[gap..].trim_start().len())
        };
        let columns: Vec<Option<usize>> = flag_lines.clone().map(column).collect();
        assert!(columns.iter().all(|c| *c == columns[0]), "{text}");
        assert!(flag_lines.clone().all(|l| l.len() <= WIDTH), "{text}");
        assert!(
            text.contains("  -rollback-on-failure  switch current back"),
            "{text}"
        );
        assert!(
            text.contains("-timeout=DURATION") && text.contains("[10m]"),
            "{text}"
        );
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
