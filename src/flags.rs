//! Every flag of every command, once: its name, the commands that take it,
//! the kind of value it takes, its help line and the default `-h` shows.
//! The parser (`cli`) accepts exactly these, `-h` (`help`) lists them and
//! the shell scripts (`completion`) offer them, so the three cannot drift.
//! What a value means is not here: `cli` turns values into typed args.

/// The commands that take a flag, as a set of bits (`DEPLOY | ROLLOUT`).
pub(crate) type Commands = u16;

pub(crate) const AGENT: Commands = 1;
pub(crate) const DEPLOY: Commands = 1 << 1;
pub(crate) const ROLLOUT: Commands = 1 << 2;
pub(crate) const ROLLBACK: Commands = 1 << 3;
pub(crate) const REMOVE: Commands = 1 << 4;
pub(crate) const PRUNE: Commands = 1 << 5;
pub(crate) const STATUS: Commands = 1 << 6;
pub(crate) const HISTORY: Commands = 1 << 7;
pub(crate) const POLICY: Commands = 1 << 8;
pub(crate) const PAUSE: Commands = 1 << 9;
pub(crate) const RESUME: Commands = 1 << 10;
pub(crate) const PROMOTE: Commands = 1 << 11;
pub(crate) const FORGET: Commands = 1 << 12;
pub(crate) const WAIT: Commands = 1 << 13;
pub(crate) const RESTART: Commands = 1 << 14;
pub(crate) const EVENTS: Commands = 1 << 15;
/// The commands that move `current`.
pub(crate) const SWITCH: Commands = DEPLOY | ROLLOUT | ROLLBACK;
/// The commands that run waves: those that move `current`, and `restart`
/// (which runs on the nodes that run current: no -nodes, and nothing to
/// roll back to).
pub(crate) const WAVES: Commands = SWITCH | RESTART;
/// The commands that drive a prefix: every one but the agent.
pub(crate) const TREE: Commands = WAVES
    | REMOVE
    | PRUNE
    | STATUS
    | HISTORY
    | POLICY
    | PAUSE
    | RESUME
    | PROMOTE
    | FORGET
    | WAIT
    | EVENTS;

/// The command's bit; 0 for a command that takes no flags.
pub(crate) fn command_bit(command: &str) -> Commands {
    match command {
        "agent" => AGENT,
        "deploy" => DEPLOY,
        "rollout" => ROLLOUT,
        "rollback" => ROLLBACK,
        "restart" => RESTART,
        "remove" => REMOVE,
        "prune" => PRUNE,
        "status" | "query" => STATUS,
        "history" => HISTORY,
        "policy" => POLICY,
        "pause" => PAUSE,
        "resume" => RESUME,
        "promote" => PROMOTE,
        "forget" => FORGET,
        "wait" => WAIT,
        "events" => EVENTS,
        _ => 0,
    }
}

/// What a flag takes. The `&str` of a valued kind is its placeholder in
/// `-h` (`-nodes=N|all|P%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// No value, or Go-style `=true` / `=false`.
    Bool,
    /// A file name (completed as one).
    File(&'static str),
    /// A directory name.
    Dir(&'static str),
    /// One of these words (the parser of the flag checks which).
    Choice(&'static str, &'static [&'static str]),
    /// Anything else: a number, a duration, a name.
    Text(&'static str),
    /// Another name of this flag, kept for Consul's spelling: read as that
    /// flag, completed, and left out of `-h`.
    Alias(&'static str),
}

/// Where `-h` lists a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Section {
    /// Among the command's own flags.
    Own,
    /// Under "Output:".
    Output,
    /// Under "Consul connection".
    Connection,
}

pub(crate) struct Flag {
    pub name: &'static str,
    pub commands: Commands,
    pub kind: Kind,
    /// One line, no `'`, `[` or `]` (the shell scripts quote it).
    pub help: &'static str,
    /// What `-h` shows in brackets after the help ("" for nothing).
    pub default: &'static str,
    pub section: Section,
}

impl Flag {
    /// Whether `command` takes this flag.
    pub(crate) fn takes(&self, command: &str) -> bool {
        self.commands & command_bit(command) != 0
    }

    /// The placeholder of its value; `None` for a boolean or an alias.
    pub(crate) fn placeholder(&self) -> Option<&'static str> {
        match self.kind {
            Kind::File(p) | Kind::Dir(p) | Kind::Choice(p, _) | Kind::Text(p) => Some(p),
            Kind::Bool | Kind::Alias(_) => None,
        }
    }

    const fn or(self, default: &'static str) -> Flag {
        Flag { default, ..self }
    }

    const fn under(self, section: Section) -> Flag {
        Flag { section, ..self }
    }
}

const fn flag(name: &'static str, commands: Commands, kind: Kind, help: &'static str) -> Flag {
    Flag {
        name,
        commands,
        kind,
        help,
        default: "",
        section: Section::Own,
    }
}

/// A flag every command that talks to Consul takes.
const fn connection(name: &'static str, kind: Kind, help: &'static str) -> Flag {
    flag(name, TREE | AGENT, kind, help).under(Section::Connection)
}

/// The table. `-h` lists a command's flags in this order.
pub(crate) const FLAGS: &[Flag] = &[
    flag(
        "prefix",
        TREE,
        Kind::Text("PREFIX"),
        "the KV prefix of the deployment",
    )
    .or("DEPRO_PREFIX"),
    // The agent's.
    flag(
        "config-dir",
        AGENT,
        Kind::Dir("DIR"),
        "read every *.json in DIR, in name order (repeatable)",
    ),
    flag(
        "config-file",
        AGENT,
        Kind::File("FILE"),
        "read FILE (repeatable)",
    ),
    flag(
        "name",
        AGENT,
        Kind::Text("NAME"),
        "the name of this node in the tree",
    )
    .or("DEPRO_NAME, \"name\", hostname"),
    flag(
        "log-level",
        AGENT,
        Kind::Choice("LEVEL", &["error", "warn", "info", "debug", "trace"]),
        "error, warn, info, debug or trace",
    )
    .or("info"),
    flag(
        "log-format",
        AGENT,
        Kind::Choice("FORMAT", &["text", "json"]),
        "text, or json: one object per line (time, level, node, deployment, version, \
         message) for log shippers",
    )
    .or("text"),
    flag(
        "allow-insecure-config",
        AGENT,
        Kind::Bool,
        "accept config files or directories others could change",
    ),
    flag(
        "check",
        AGENT,
        Kind::Bool,
        "validate the configuration as the agent would, without contacting Consul, and \
         exit (0: valid, 1: the problem)",
    ),
    // What the commands that move `current`, wait and policy take.
    flag(
        "to",
        ROLLBACK,
        Kind::Text("VERSION"),
        "roll back to this version instead",
    ),
    flag(
        "for",
        WAIT,
        Kind::Choice("STATE", &["ready", "active"]),
        "ready or active",
    )
    .or("active"),
    flag(
        "nodes",
        SWITCH | POLICY | WAIT,
        Kind::Text("N|all|P%"),
        "nodes that must have the version: N, all (every live agent of the prefix) or \
         P% of them",
    )
    .or("1"),
    flag(
        "min-nodes",
        SWITCH | POLICY,
        Kind::Text("M"),
        "but at least M nodes, however few agents are live",
    ),
    flag(
        "timeout",
        WAVES | REMOVE | WAIT,
        Kind::Text("DURATION"),
        "give up waiting after this long",
    )
    .or("10m"),
    flag(
        "keep",
        DEPLOY | PRUNE,
        Kind::Text("K"),
        "remove all but the K newest good versions",
    ),
    flag(
        "no-rollout",
        DEPLOY,
        Kind::Bool,
        "stop once the version is ready everywhere",
    ),
    flag(
        "artifact",
        DEPLOY,
        Kind::Text("URL"),
        "the build: each agent fetches and verifies it before the deploy hook ($ARTIFACT)",
    ),
    flag(
        "sha256",
        DEPLOY,
        Kind::Text("HEX"),
        "the SHA-256 of the artifact, as sha256sum prints it",
    ),
    flag(
        "size",
        DEPLOY,
        Kind::Text("BYTES"),
        "the size of the artifact",
    ),
    flag(
        "artifact-file",
        DEPLOY,
        Kind::File("FILE"),
        "a local copy of the artifact: -sha256 and -size are taken from it",
    ),
    flag(
        "origin-hosts",
        DEPLOY,
        Kind::Text("N"),
        "how many hosts fetch the artifact from its origin; the others from them (default 2)",
    ),
    flag(
        "sign",
        DEPLOY,
        Kind::File("FILE"),
        "sign the artifact with this private key (depro keygen FILE)",
    ),
    flag(
        "rollback-on-failure",
        SWITCH | POLICY,
        Kind::Bool,
        "switch current back (or undo the waves) on failure",
    ),
    flag(
        "message",
        WAVES | POLICY,
        Kind::Text("TEXT"),
        "why, recorded with the change (history, status)",
    ),
    flag(
        "canary",
        WAVES | POLICY,
        Kind::Text("N"),
        "switch N nodes first, then the rest in waves (0: none)",
    ),
    flag(
        "batch",
        WAVES | POLICY,
        Kind::Text("K|P%"),
        "switch K nodes (or P% of them) per wave (0: none)",
    ),
    flag(
        "pause",
        WAVES | POLICY,
        Kind::Text("DURATION"),
        "wait this long between waves",
    ),
    flag(
        "promote",
        WAVES | POLICY,
        Kind::Choice("manual|auto", &["auto", "manual"]),
        "manual: stop after the first wave until `depro promote`",
    ),
    // remove, prune, status, history, policy.
    flag(
        "wait",
        REMOVE,
        Kind::Bool,
        "follow the purge until no node has the version",
    ),
    flag(
        "failed",
        PRUNE,
        Kind::Bool,
        "remove the versions that failed everywhere too",
    ),
    flag(
        "dry-run",
        WAVES | REMOVE | PRUNE,
        Kind::Bool,
        "print what would be done; change nothing",
    ),
    flag(
        "json",
        STATUS | HISTORY | EVENTS | SWITCH | WAIT | REMOVE | PRUNE,
        Kind::Bool,
        "print a machine-readable document on stdout (events: one object per line)",
    ),
    flag(
        "since",
        EVENTS,
        Kind::Text("INDEX"),
        "first print what changed after this Consul index (the index of an event): resume without gaps",
    ),
    flag(
        "watch",
        STATUS,
        Kind::Bool,
        "follow changes until interrupted: the table redrawn on a terminal, one line per \
         change otherwise",
    ),
    flag("clear", POLICY, Kind::Bool, "remove the policy"),
    flag(
        "quiet",
        TREE,
        Kind::Bool,
        "no progress: the result and errors only",
    )
    .under(Section::Output),
    connection(
        "server",
        Kind::Text("ADDR"),
        "Consul HTTP address, host:port or http(s)://host:port",
    )
    .or("127.0.0.1:8500"),
    connection("http-addr", Kind::Alias("server"), "same as -server"),
    connection(
        "token",
        Kind::Text("TOKEN"),
        "ACL token (prefer CONSUL_HTTP_TOKEN or -token-file)",
    ),
    connection(
        "token-file",
        Kind::File("FILE"),
        "read the ACL token from FILE",
    ),
    connection("datacenter", Kind::Text("DC"), "Consul datacenter"),
    connection("dc", Kind::Alias("datacenter"), "same as -datacenter"),
    connection("ca-file", Kind::File("FILE"), "CA certificate for https"),
    connection(
        "client-cert",
        Kind::File("FILE"),
        "client certificate for https",
    ),
    connection("client-key", Kind::File("FILE"), "client key for https"),
    connection(
        "tls-skip-verify",
        Kind::Bool,
        "do not verify the certificate of Consul",
    ),
];

/// The flags `command` takes (aliases included), in the table's order.
pub(crate) fn of(command: &str) -> impl Iterator<Item = &'static Flag> + '_ {
    FLAGS.iter().filter(move |f| f.takes(command))
}

/// The flag `-name` means for `command`, an alias read as the flag it
/// stands for; `None` if the command does not take it.
pub(crate) fn find(name: &str, command: &str) -> Option<&'static Flag> {
    let flag = of(command).find(|f| f.name == name)?;
    match flag.kind {
        Kind::Alias(to) => find(to, command),
        _ => Some(flag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMANDS: [&str; 16] = [
        "agent", "deploy", "rollout", "rollback", "restart", "remove", "prune", "status",
        "history", "policy", "pause", "resume", "promote", "forget", "wait", "events",
    ];

    #[test]
    fn a_command_takes_a_name_once_and_every_alias_stands_for_a_flag_it_takes() {
        for command in COMMANDS {
            let names: Vec<&str> = of(command).map(|f| f.name).collect();
            let mut unique = names.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(names.len(), unique.len(), "{command}: {names:?}");
            for flag in of(command) {
                let found = find(flag.name, command).unwrap();
                assert!(!matches!(found.kind, Kind::Alias(_)), "-{}", flag.name);
            }
        }
        assert!(find("nodes", "status").is_none());
        assert_eq!(find("http-addr", "agent").unwrap().name, "server");
    }

    /// The shell scripts quote help lines in '…' and zsh reads `[…]`.
    #[test]
    fn help_lines_are_one_line_the_shells_can_quote() {
        for flag in FLAGS {
            for c in ['\'', '[', ']', '\n'] {
                assert!(!flag.help.contains(c), "-{}: {:?}", flag.name, flag.help);
            }
            assert!(flag.commands != 0, "-{} is taken by no command", flag.name);
        }
    }
}
