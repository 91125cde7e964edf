//! Command-line parsing: argv in, a [`Command`] out. No I/O happens here;
//! reading config files and the environment is `config`'s job.
//!
//! Flags are accepted Go-style (`-config-dir=/etc/depro/`, `-nodes 3`) as
//! the original depro and Consul write them, and GNU-style
//! (`--config-dir /etc/depro/`, `--nodes=3`). Which flags a command takes,
//! and whether one takes a value, is the flag table's (`flags`); the code
//! here turns the values into typed args.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;

use crate::error::Error;
use crate::flags::{self, Kind};

/// What the user asked for.
#[derive(Debug, PartialEq)]
pub(crate) enum Command {
    Help(Option<String>),
    /// No command at all: the usage, on stderr, and exit 1.
    Missing,
    Version,
    Agent(AgentArgs),
    Deploy(DeployArgs),
    Rollout(RolloutArgs),
    Rollback(RollbackArgs),
    /// `depro restart`: current's rollout hook runs again, in waves.
    Restart(RestartArgs),
    Remove(RemoveArgs),
    Prune(PruneArgs),
    Status(StatusArgs),
    History(HistoryArgs),
    Events(EventsArgs),
    Policy(PolicyArgs),
    /// `depro pause`: no further wave of the rollout under way starts.
    Pause(TreeArgs),
    /// `depro resume`: the rollout under way goes on.
    Resume(TreeArgs),
    /// `depro promote VERSION`: the rollout of VERSION, stopped after its
    /// canary (`-promote=manual`), goes on.
    Promote(TreeArgs, String),
    /// `depro forget NODE`: a retired host is no longer shown absent.
    Forget(TreeArgs, String),
    /// `depro keygen FILE`: a key pair to sign releases with.
    Keygen(std::path::PathBuf),
    Wait(WaitArgs),
    Completion(crate::completion::Shell),
}

/// How to reach Consul, as given on the command line.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub(crate) struct ConnectionFlags {
    pub server: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub datacenter: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub tls_skip_verify: bool,
}

#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub(crate) struct AgentArgs {
    pub config_dirs: Vec<PathBuf>,
    pub config_files: Vec<PathBuf>,
    /// Accept config files others could change (logged as warnings).
    pub allow_insecure_config: bool,
    /// Only validate the configuration (`-check`), then exit.
    pub check: bool,
    /// `-log-format=text|json`.
    pub log_format: crate::logging::Format,
    pub name: Option<String>,
    pub log_level: Option<String>,
    pub connection: ConnectionFlags,
}

/// Flags shared by the commands that drive a prefix.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub(crate) struct TreeArgs {
    pub prefix: Option<String>,
    /// `-quiet`: no progress on stderr, only the result and errors.
    pub quiet: bool,
    /// `-json`: the command's result (or document) as JSON on stdout.
    pub json: bool,
    pub connection: ConnectionFlags,
}

/// How many nodes `-nodes` asks for.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Need {
    /// At least this many (today's meaning of a plain number).
    Count(u32),
    /// Every live agent that follows the prefix when the switch is decided.
    All,
    /// This share (1 to 100 percent) of those agents, rounded up.
    Share(u32),
}

impl Need {
    /// The count it means when `live` agents follow the prefix.
    pub(crate) fn count(self, live: usize) -> u32 {
        match self {
            Need::Count(n) => n,
            Need::All => (live as u32).max(1),
            Need::Share(percent) => {
                ((live as u64 * u64::from(percent)).div_ceil(100) as u32).max(1)
            }
        }
    }

    /// Whether it depends on the agents that follow the prefix.
    pub(crate) fn counts_agents(self) -> bool {
        !matches!(self, Need::Count(_))
    }
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Need::Count(n) => write!(f, "{n}"),
            Need::All => f.write_str("all"),
            Need::Share(p) => write!(f, "{p}%"),
        }
    }
}

/// A wave size: a number of nodes or a share of them.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Batch {
    Count(u32),
    Share(u32),
}

impl Batch {
    /// How many nodes a wave takes out of `total`.
    pub(crate) fn of(self, total: usize) -> usize {
        match self {
            Batch::Count(n) => n as usize,
            Batch::Share(p) => (total * p as usize).div_ceil(100),
        }
        .max(1)
    }
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Batch::Count(n) => write!(f, "{n}"),
            Batch::Share(p) => write!(f, "{p}%"),
        }
    }
}

/// Flags of the commands that move `current` (deploy, rollout, rollback).
#[derive(Debug, PartialEq, Eq, Clone)]
pub(crate) struct SwitchFlags {
    /// How many nodes must have the version before the switch (see
    /// [`SwitchFlags::need`]).
    pub nodes: Need,
    /// `-nodes` was given.
    pub nodes_given: bool,
    pub timeout: Duration,
    pub rollback_on_failure: bool,
    /// `-promote=manual`: a progressive rollout this command starts stops
    /// after its first wave, until `depro promote`.
    pub promote_manual: bool,
    /// A first wave of this many nodes.
    pub canary: Option<u32>,
    /// Then waves of this size.
    pub batch: Option<Batch>,
    /// How long to wait between waves.
    pub pause: Duration,
    /// Print what would be done, do nothing (`-dry-run`).
    pub dry_run: bool,
    /// Why, recorded with the switch (`-message`).
    pub message: Option<String>,
    /// A floor under the count `-nodes` gives (`-min-nodes`; 0: none): with
    /// `-nodes=all`, a fleet where most agents died is not "all".
    pub min_nodes: u32,
    /// The policy flags ([`POLICY_FLAGS`]) given on the command line, which
    /// the prefix's policy does not override.
    pub given: BTreeSet<&'static str>,
}

/// The flags a prefix's rollout policy holds (`depro policy`), in the order
/// it writes them.
pub(crate) const POLICY_FLAGS: [&str; 7] = [
    "nodes",
    "min-nodes",
    "canary",
    "batch",
    "pause",
    "rollback-on-failure",
    "promote",
];

impl SwitchFlags {
    /// Whether nodes switch in waves rather than all at once.
    pub(crate) fn progressive(&self) -> bool {
        self.canary.is_some() || self.batch.is_some()
    }

    /// The nodes to wait for: `-nodes`, or with waves and no `-nodes`,
    /// every live agent (waves are drawn from the nodes ready at the
    /// start; one node ready of a fleet would leave the rest to switch at
    /// once at the end).
    pub(crate) fn need(&self) -> Need {
        match (self.nodes_given, self.progressive()) {
            (false, true) => Need::All,
            _ => self.nodes,
        }
    }

    /// How many nodes must have the version ready with `live` agents: what
    /// `-nodes` counts, raised to `-min-nodes`.
    pub(crate) fn needed(&self, live: usize) -> u32 {
        self.need().count(live).max(self.min_nodes)
    }

    /// The flags as a command to paste repeats them, so that a retry is the
    /// same rollout (canary and batches included): ` -nodes=all -canary=1
    /// -batch=25% -pause=1m -rollback-on-failure`.
    pub(crate) fn repeated(&self) -> String {
        // A flag given as "off" (-canary=0, -rollback-on-failure=false…) is
        // repeated too: left out, a policy would fill it in again.
        let mut flags = format!(" -nodes={}", self.need());
        for flag in &POLICY_FLAGS[1..] {
            let set = match *flag {
                "min-nodes" => self.min_nodes > 0,
                "canary" => self.canary.is_some(),
                "batch" => self.batch.is_some(),
                "pause" => !self.pause.is_zero(),
                "promote" => self.promote_manual,
                _ => self.rollback_on_failure,
            };
            if set || self.given.contains(flag) {
                flags.push(' ');
                flags.push_str(&self.flag_text(flag));
            }
        }
        flags
    }
    /// The policy flags given, as a policy stores them: `-nodes=all
    /// -canary=1 -pause=1m` (empty: none).
    pub(crate) fn policy_text(&self) -> String {
        let given = POLICY_FLAGS.iter().filter(|f| self.given.contains(*f));
        given
            .map(|f| self.flag_text(f))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// One policy flag as the command line takes it, "off" included
    /// (`-canary=0`, `-rollback-on-failure=false`).
    fn flag_text(&self, flag: &str) -> String {
        match flag {
            "nodes" => format!("-nodes={}", self.nodes),
            "min-nodes" => format!("-min-nodes={}", self.min_nodes),
            "canary" => format!("-canary={}", self.canary.unwrap_or(0)),
            "batch" => format!(
                "-batch={}",
                self.batch.map_or("0".into(), |b| b.to_string())
            ),
            "pause" => format!("-pause={}", crate::duration::human(self.pause)),
            "promote" => match self.promote_manual {
                true => "-promote=manual".into(),
                false => "-promote=auto".into(),
            },
            _ => match self.rollback_on_failure {
                true => "-rollback-on-failure".into(),
                false => "-rollback-on-failure=false".into(),
            },
        }
    }

    /// This command's flags over the prefix's `policy`: each policy flag the
    /// command does not give is the policy's. Returns what it took, as flags.
    pub(crate) fn over(&mut self, policy: &SwitchFlags) -> String {
        let mut taken = SwitchFlags::default();
        for flag in POLICY_FLAGS {
            if !policy.given.contains(flag) || self.given.contains(flag) {
                continue;
            }
            match flag {
                "nodes" => {
                    self.nodes = policy.nodes;
                    self.nodes_given = true;
                    taken.nodes = policy.nodes;
                }
                "min-nodes" => {
                    (self.min_nodes, taken.min_nodes) = (policy.min_nodes, policy.min_nodes)
                }
                "canary" => (self.canary, taken.canary) = (policy.canary, policy.canary),
                "batch" => (self.batch, taken.batch) = (policy.batch, policy.batch),
                "pause" => (self.pause, taken.pause) = (policy.pause, policy.pause),
                "promote" => {
                    (self.promote_manual, taken.promote_manual) =
                        (policy.promote_manual, policy.promote_manual)
                }
                _ => {
                    self.rollback_on_failure = policy.rollback_on_failure;
                    taken.rollback_on_failure = policy.rollback_on_failure;
                }
            }
            self.given.insert(flag);
            taken.given.insert(flag);
        }
        taken.policy_text()
    }
}

/// A policy as stored (`-nodes=all -canary=1 …`), read with the same rules
/// as the command line; the error says what is wrong with it.
pub(crate) fn parse_policy(text: &str) -> Result<SwitchFlags, Error> {
    let mut parser =
        lexopt::Parser::from_args(normalize(text.split_whitespace().map(OsString::from)));
    let mut flags = SwitchFlags::default();
    while let Some(arg) = next(&mut parser, "policy")? {
        let policy_flag = matches!(&arg, Arg::Flag(name, _) if POLICY_FLAGS.contains(name));
        if !policy_flag || !switch_flag(&arg, &mut flags, "policy")? {
            return Err(Error::Usage(format!(
                "{} is not a rollout policy flag ({})",
                describe(&arg),
                POLICY_FLAGS.map(|f| format!("-{f}")).join(", ")
            )));
        }
    }
    Ok(flags)
}

impl Default for SwitchFlags {
    fn default() -> SwitchFlags {
        SwitchFlags {
            nodes: Need::Count(1),
            nodes_given: false,
            timeout: DEFAULT_TIMEOUT,
            rollback_on_failure: false,
            promote_manual: false,
            canary: None,
            batch: None,
            pause: Duration::ZERO,
            dry_run: false,
            message: None,
            min_nodes: 0,
            given: BTreeSet::new(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DeployArgs {
    pub tree: TreeArgs,
    pub version: String,
    pub switch: SwitchFlags,
    pub keep: Option<u32>,
    pub no_rollout: bool,
    pub artifact: Option<ArtifactArgs>,
}

/// `-artifact=URL` and how its digest is given: `-sha256` (and `-size`),
/// or a local copy to compute them from (`-artifact-file`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ArtifactArgs {
    pub url: String,
    pub sha256: Option<String>,
    pub size: Option<u64>,
    pub file: Option<std::path::PathBuf>,
    /// `-sign=FILE`: the private key (`depro keygen`) that signs it.
    pub sign: Option<std::path::PathBuf>,
    /// `-origin-hosts=N`: how many hosts fetch it from its origin.
    pub origin_hosts: Option<u32>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RolloutArgs {
    pub tree: TreeArgs,
    pub version: String,
    pub switch: SwitchFlags,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RollbackArgs {
    pub tree: TreeArgs,
    pub to: Option<String>,
    pub switch: SwitchFlags,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RestartArgs {
    pub tree: TreeArgs,
    pub switch: SwitchFlags,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RemoveArgs {
    pub tree: TreeArgs,
    pub versions: Vec<String>,
    pub wait: bool,
    pub timeout: Duration,
    pub dry_run: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PruneArgs {
    pub tree: TreeArgs,
    /// `None` with `-failed` alone: every good version is kept.
    pub keep: Option<u32>,
    /// Remove the versions that failed everywhere too.
    pub failed: bool,
    pub dry_run: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StatusArgs {
    pub tree: TreeArgs,
    pub version: Option<String>,
    /// Follow changes until interrupted.
    pub watch: bool,
}

/// What `depro wait` waits for.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum WaitFor {
    Ready,
    Active,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct WaitArgs {
    pub tree: TreeArgs,
    pub version: String,
    pub state: WaitFor,
    pub nodes: Need,
    pub timeout: Duration,
}

/// `depro policy`: show, set or clear the prefix's rollout policy.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PolicyArgs {
    pub tree: TreeArgs,
    /// The policy flags given (none: show the policy).
    pub switch: SwitchFlags,
    pub clear: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HistoryArgs {
    pub tree: TreeArgs,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EventsArgs {
    pub tree: TreeArgs,
    /// `-since=INDEX`.
    pub since: Option<u64>,
}

/// The default of `-timeout` for commands that wait on nodes.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The commands, for `help` and error messages (completion lists them
/// too, each with a line: `completion::COMMANDS`).
pub(crate) const COMMANDS: [&str; 21] = [
    "agent",
    "deploy",
    "rollout",
    "rollback",
    "restart",
    "remove",
    "prune",
    "status",
    "query",
    "history",
    "policy",
    "pause",
    "resume",
    "promote",
    "forget",
    "wait",
    "events",
    "keygen",
    "version",
    "help",
    "completion",
];

/// Turns Go-style single-dash long flags into GNU-style ones, which is what
/// lexopt understands: `-nodes=3` → `--nodes=3`. `-h` stays short; nothing
/// after `--` is touched.
fn normalize(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut after_dashes = false;
    for arg in args {
        if !after_dashes {
            if arg == "--" {
                after_dashes = true;
            } else if let Some(text) = arg.to_str() {
                let name = text.split('=').next().unwrap_or("");
                if text.starts_with('-') && !text.starts_with("--") && name.len() > 2 {
                    out.push(OsString::from(format!("-{text}")));
                    continue;
                }
            }
        }
        out.push(arg);
    }
    out
}

/// Parses the arguments after the program name.
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, Error> {
    let mut parser = lexopt::Parser::from_args(normalize(args));
    // No command yet: the flags known here are -h and -V.
    let first = match parser.next().map_err(usage(None))? {
        None => return Ok(Command::Missing),
        Some(Short('h') | Long("help")) => return Ok(Command::Help(None)),
        Some(Short('V') | Long("version")) => return Ok(Command::Version),
        Some(Value(value)) => value.string().map_err(usage(None))?,
        Some(Short(c)) => return Err(before_the_command(&c.to_string())),
        Some(Long(name)) => return Err(before_the_command(name)),
    };
    match first.as_str() {
        "agent" => parse_agent(&mut parser),
        "deploy" => parse_deploy(&mut parser),
        "rollout" => parse_rollout(&mut parser),
        "rollback" => parse_rollback(&mut parser),
        "restart" => parse_restart(&mut parser),
        "remove" => parse_remove(&mut parser),
        "prune" => parse_prune(&mut parser),
        "status" | "query" => parse_status(&mut parser, &first),
        "history" => parse_history(&mut parser),
        "policy" => parse_policy_command(&mut parser),
        "pause" | "resume" | "promote" | "forget" => parse_control(&mut parser, &first),
        "wait" => parse_wait(&mut parser),
        "events" => parse_events(&mut parser),
        "keygen" => parse_keygen(&mut parser),
        "version" => Ok(Command::Version),
        "completion" => match next(&mut parser, "completion")? {
            Some(Arg::Operand(shell)) => {
                if let Some(extra) = next(&mut parser, "completion")? {
                    return Err(unexpected(&extra, "completion"));
                }
                crate::completion::Shell::parse(&shell).map(Command::Completion)
            }
            Some(Arg::Help) => Ok(Command::Help(Some("completion".into()))),
            _ => Err(Error::Usage(
                "completion needs a shell: bash, zsh or fish, e.g. `depro completion bash`".into(),
            )),
        },
        "help" => {
            let topic = match next(&mut parser, "help")? {
                Some(Arg::Operand(v)) => Some(v),
                _ => None,
            };
            Ok(Command::Help(topic))
        }
        other => Err(Error::Usage(format!(
            "unknown command {other:?}; the commands are {}; run `depro help`",
            COMMANDS.join(", ")
        ))),
    }
}

fn before_the_command(flag: &str) -> Error {
    Error::Usage(format!(
        "-{flag}: unknown flag before the command; run `depro help`"
    ))
}

/// One argument of a command, read by the flag table's rules.
enum Arg {
    /// `-h` or `-help`.
    Help,
    /// A flag the command takes (by its name in the table, an alias read as
    /// the flag it stands for), with its value.
    Flag(&'static str, FlagValue),
    /// A flag the command does not take, as written (`-bogus`).
    Unknown(String),
    /// A word that is not a flag.
    Operand(String),
}

/// A flag's value, as its kind in the table reads it.
enum FlagValue {
    On(bool),
    Text(String),
    Path(PathBuf),
}

impl FlagValue {
    fn on(&self) -> bool {
        matches!(self, FlagValue::On(true))
    }

    /// The text of a valued flag ("" for a boolean, which has none).
    fn text(&self) -> &str {
        match self {
            FlagValue::Text(text) => text,
            _ => "",
        }
    }

    fn path(&self) -> PathBuf {
        match self {
            FlagValue::Path(path) => path.clone(),
            _ => PathBuf::new(),
        }
    }
}

/// The next argument of `command`: a flag it does not take (by the table)
/// comes back as [`Arg::Unknown`] for the caller to refuse in its words, a
/// flag it takes with its value read: none or `=true|false` for a boolean,
/// any bytes for a file name, text for the rest.
fn next(parser: &mut lexopt::Parser, command: &str) -> Result<Option<Arg>, Error> {
    let err = usage(Some(command));
    let flag = match parser.next().map_err(&err)? {
        None => return Ok(None),
        Some(Short('h') | Long("help")) => return Ok(Some(Arg::Help)),
        Some(Value(value)) => return Ok(Some(Arg::Operand(value.string().map_err(&err)?))),
        Some(Short(c)) => return Ok(Some(Arg::Unknown(format!("-{c}")))),
        Some(Long(name)) => match flags::find(name, command) {
            Some(flag) => flag,
            None => return Ok(Some(Arg::Unknown(format!("-{name}")))),
        },
    };
    let value = match flag.kind {
        Kind::Bool => FlagValue::On(boolean(parser, flag.name, command)?),
        Kind::File(_) | Kind::Dir(_) => FlagValue::Path(parser.value().map_err(&err)?.into()),
        _ => FlagValue::Text(parser.value().map_err(&err)?.string().map_err(&err)?),
    };
    Ok(Some(Arg::Flag(flag.name, value)))
}

fn usage(command: Option<&str>) -> impl Fn(lexopt::Error) -> Error + '_ {
    move |e| {
        let help = match command {
            Some(c) => format!("depro help {c}"),
            None => "depro help".to_string(),
        };
        let text = e.to_string().replace("--", "-");
        Error::Usage(format!("{text}; run `{help}`"))
    }
}

fn describe(arg: &Arg) -> String {
    match arg {
        Arg::Help => "-h".into(),
        Arg::Flag(name, _) => format!("-{name}"),
        Arg::Unknown(flag) => flag.clone(),
        Arg::Operand(v) => format!("{v:?}"),
    }
}

/// Takes a connection flag if `arg` is one; returns whether it was.
fn connection_flag(arg: &Arg, flags: &mut ConnectionFlags) -> bool {
    let Arg::Flag(name, value) = arg else {
        return false;
    };
    let text = || Some(value.text().to_string());
    match *name {
        "server" => flags.server = text(),
        "token" => flags.token = text(),
        "token-file" => flags.token_file = Some(value.path()),
        "datacenter" => flags.datacenter = text(),
        "ca-file" => flags.ca_file = Some(value.path()),
        "client-cert" => flags.client_cert = Some(value.path()),
        "client-key" => flags.client_key = Some(value.path()),
        "tls-skip-verify" => flags.tls_skip_verify = value.on(),
        _ => return false,
    }
    true
}

/// A boolean flag: `-json`, or Go-style `-json=true` / `-json=false`.
fn boolean(parser: &mut lexopt::Parser, name: &str, command: &str) -> Result<bool, Error> {
    match parser.optional_value() {
        None => Ok(true),
        Some(value) => match value.to_str() {
            Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            _ => Err(Error::Usage(format!(
                "-{name}: {value:?} is not true or false; run `depro help {command}`"
            ))),
        },
    }
}

fn number(name: &str, text: &str, command: &str) -> Result<u32, Error> {
    text.parse().map_err(|_| {
        Error::Usage(format!(
            "-{name}: {text:?} is not a whole number; run `depro help {command}`"
        ))
    })
}

/// `-nodes`: a number (at least 1), `all`, or a share such as `90%`.
fn nodes(text: &str, command: &str) -> Result<Need, Error> {
    if text == "all" {
        return Ok(Need::All);
    }
    match share(text) {
        Some(Ok(p)) => return Ok(Need::Share(p)),
        Some(Err(())) => return Err(bad_share("nodes", text, command)),
        None => {}
    }
    match text.parse::<u32>() {
        Ok(0) => Err(Error::Usage(format!(
            "-nodes=0: at least 1 node must have the version before current moves; \
             run `depro help {command}`"
        ))),
        Ok(n) => Ok(Need::Count(n)),
        Err(_) => Err(Error::Usage(format!(
            "-nodes: {text:?} is not a whole number, `all` or a share such as 90%; \
             run `depro help {command}`"
        ))),
    }
}

/// `P%` with P from 1 to 100: `Some(Ok(P))`; another `…%`: `Some(Err)`.
fn share(text: &str) -> Option<Result<u32, ()>> {
    let number = text.strip_suffix('%')?;
    Some(
        number
            .parse::<u32>()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .ok_or(()),
    )
}

fn bad_share(name: &str, text: &str, command: &str) -> Error {
    Error::Usage(format!(
        "-{name}: {text:?} is not a share from 1% to 100%; run `depro help {command}`"
    ))
}

fn duration(name: &str, text: &str) -> Result<Duration, Error> {
    crate::duration::parse(text).map_err(|why| Error::Usage(format!("-{name}: {why}")))
}

/// `-timeout`: a duration longer than zero.
fn timeout(text: &str, command: &str) -> Result<Duration, Error> {
    let value = duration("timeout", text)?;
    if value.is_zero() {
        return Err(Error::Usage(format!(
            "-timeout must be longer than 0s (e.g. -timeout=10m); run `depro help {command}`"
        )));
    }
    Ok(value)
}

/// A flag whose value is one of a few words, given another.
fn not_one_of(name: &str, text: &str, words: &str, command: &str) -> Error {
    Error::Usage(format!(
        "-{name}: {text:?} is not {words}; run `depro help {command}`"
    ))
}

fn unexpected(arg: &Arg, command: &str) -> Error {
    match arg {
        Arg::Operand(v) => Error::Usage(format!(
            "unexpected argument {v:?} for `depro {command}`; run `depro help {command}`"
        )),
        other => Error::Usage(format!(
            "{}: unknown flag for `depro {command}`; run `depro help {command}`",
            describe(other)
        )),
    }
}

fn parse_agent(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "agent";
    let mut args = AgentArgs::default();
    while let Some(arg) = next(parser, command)? {
        if connection_flag(&arg, &mut args.connection) {
            continue;
        }
        match &arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("config-dir", v) => args.config_dirs.push(v.path()),
            Arg::Flag("config-file", v) => args.config_files.push(v.path()),
            Arg::Flag("name", v) => args.name = Some(v.text().into()),
            Arg::Flag("log-level", v) => args.log_level = Some(v.text().into()),
            Arg::Flag("allow-insecure-config", v) => args.allow_insecure_config = v.on(),
            Arg::Flag("check", v) => args.check = v.on(),
            Arg::Flag("log-format", v) => {
                args.log_format = crate::logging::Format::parse(v.text())
                    .ok_or_else(|| not_one_of("log-format", v.text(), "text or json", command))?;
            }
            _ => return Err(unexpected(&arg, command)),
        }
    }
    Ok(Command::Agent(args))
}

/// Takes a flag every tree command takes (`-prefix`, `-quiet`, connection
/// flags) if `arg` is one; returns whether it was.
fn tree_flag(arg: &Arg, tree: &mut TreeArgs) -> bool {
    match arg {
        Arg::Flag("prefix", v) => tree.prefix = Some(v.text().into()),
        Arg::Flag("quiet", v) => tree.quiet = v.on(),
        Arg::Flag("json", v) => tree.json = v.on(),
        _ => return connection_flag(arg, &mut tree.connection),
    }
    true
}

/// Takes a flag of the commands that move `current` if `arg` is one;
/// returns whether it was.
fn switch_flag(arg: &Arg, flags: &mut SwitchFlags, command: &str) -> Result<bool, Error> {
    let Arg::Flag(name, value) = arg else {
        return Ok(false);
    };
    let text = value.text();
    match *name {
        "nodes" => {
            flags.nodes = nodes(text, command)?;
            flags.nodes_given = true;
        }
        "min-nodes" => {
            let n = number(name, text, command)?;
            if n == 0 {
                return Err(Error::Usage(format!(
                    "-min-nodes=0: a floor of at least 1 node; leave the flag out for none; \
                     run `depro help {command}`"
                )));
            }
            flags.min_nodes = n;
        }
        "message" => {
            if text.trim().is_empty() || text.len() > 500 || text.contains('\n') {
                return Err(Error::Usage(format!(
                    "-message: one line of 1 to 500 bytes, e.g. -message=\"fixes the login timeout\"; \
                     run `depro help {command}`"
                )));
            }
            flags.message = Some(text.into());
        }
        // 0: none (a command's way to override a policy's waves).
        "canary" => {
            let n = number(name, text, command)?;
            flags.canary = (n > 0).then_some(n);
        }
        "batch" => {
            flags.batch = match share(text) {
                Some(Ok(p)) => Some(Batch::Share(p)),
                Some(Err(())) => return Err(bad_share("batch", text, command)),
                None => match text.parse::<u32>() {
                    Ok(n) => (n > 0).then_some(Batch::Count(n)),
                    _ => {
                        return Err(Error::Usage(format!(
                            "-batch: {text:?} is not a number of nodes or a share such as 25%; \
                             run `depro help {command}`"
                        )));
                    }
                },
            };
        }
        "pause" => flags.pause = duration(name, text)?,
        "dry-run" => flags.dry_run = value.on(),
        "timeout" => flags.timeout = timeout(text, command)?,
        "rollback-on-failure" => flags.rollback_on_failure = value.on(),
        "promote" => {
            flags.promote_manual = match text {
                "manual" => true,
                "auto" => false,
                other => return Err(not_one_of(name, other, "auto or manual", command)),
            }
        }
        _ => return Ok(false),
    }
    if let Some(flag) = POLICY_FLAGS.iter().find(|f| *f == name) {
        flags.given.insert(flag);
    }
    Ok(true)
}

fn parse_deploy(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "deploy";
    let (mut tree, mut switch) = (TreeArgs::default(), SwitchFlags::default());
    let (mut version, mut keep, mut no_rollout) = (None, None, false);
    let (mut url, mut artifact) = (None, ArtifactArgs::default());
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) || switch_flag(&arg, &mut switch, command)? {
            continue;
        }
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("keep", v) => keep = Some(number("keep", v.text(), command)?),
            Arg::Flag("no-rollout", v) => no_rollout = v.on(),
            Arg::Flag("artifact", v) => {
                let text = v.text().to_string();
                crate::artifact::check_url(&text)
                    .map_err(|e| Error::Usage(format!("-artifact: {e}")))?;
                url = Some(text);
            }
            Arg::Flag("sha256", v) => {
                artifact.sha256 = Some(
                    crate::artifact::parse_sha256(v.text())
                        .map_err(|e| Error::Usage(format!("-sha256: {e}")))?,
                )
            }
            Arg::Flag("size", v) => {
                artifact.size = Some(v.text().parse().map_err(|_| {
                    Error::Usage(format!(
                        "-size: {:?} is not a number of bytes; run `depro help deploy`",
                        crate::tree::shown(v.text())
                    ))
                })?)
            }
            Arg::Flag("artifact-file", v) => artifact.file = Some(v.path()),
            Arg::Flag("sign", v) => artifact.sign = Some(v.path()),
            Arg::Flag("origin-hosts", v) => match number("origin-hosts", v.text(), command)? {
                0 => {
                    return Err(Error::Usage(
                        "-origin-hosts=0: at least one host must fetch from the origin".into(),
                    ));
                }
                n => artifact.origin_hosts = Some(n),
            },
            Arg::Operand(v) if version.is_none() => version = Some(v),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    let version = version.ok_or_else(|| missing_version(command))?;
    let given = artifact != ArtifactArgs::default();
    let artifact = match url {
        Some(url) if artifact.sha256.is_none() && artifact.file.is_none() => {
            return Err(Error::Usage(format!(
                "-artifact={} needs its digest: -sha256=HEX (as `sha256sum FILE` prints), or \
                 -artifact-file=FILE to compute it from a local copy",
                crate::artifact::redact(&url)
            )));
        }
        Some(url) => Some(ArtifactArgs { url, ..artifact }),
        None if given => {
            return Err(Error::Usage(
                "-sha256, -size, -artifact-file, -sign and -origin-hosts describe an artifact: \
                 give its \
                 -artifact=URL too; run `depro help deploy`"
                    .into(),
            ));
        }
        None => None,
    };
    Ok(Command::Deploy(DeployArgs {
        tree,
        version,
        switch,
        keep,
        no_rollout,
        artifact,
    }))
}

fn parse_keygen(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "keygen";
    let mut file = None;
    while let Some(arg) = next(parser, command)? {
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Operand(v) if file.is_none() => file = Some(std::path::PathBuf::from(v)),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    file.map(Command::Keygen).ok_or_else(|| {
        Error::Usage(
            "keygen: name the private key's file, e.g. `depro keygen /etc/depro/release.key` \
             (it writes that file and release.key.pub)"
                .into(),
        )
    })
}

fn missing_version(command: &str) -> Error {
    Error::Usage(format!(
        "`depro {command}` needs a VERSION, e.g. `depro {command} 1.2.3 -prefix=api/version`"
    ))
}

fn parse_rollout(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "rollout";
    let (mut tree, mut switch, mut version) = (TreeArgs::default(), SwitchFlags::default(), None);
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) || switch_flag(&arg, &mut switch, command)? {
            continue;
        }
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Operand(v) if version.is_none() => version = Some(v),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    let version = version.ok_or_else(|| missing_version(command))?;
    Ok(Command::Rollout(RolloutArgs {
        tree,
        version,
        switch,
    }))
}

fn parse_rollback(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "rollback";
    let (mut tree, mut switch, mut to) = (TreeArgs::default(), SwitchFlags::default(), None);
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) || switch_flag(&arg, &mut switch, command)? {
            continue;
        }
        match &arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("to", v) => to = Some(v.text().into()),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    Ok(Command::Rollback(RollbackArgs { tree, to, switch }))
}

fn parse_restart(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "restart";
    let (mut tree, mut switch) = (TreeArgs::default(), SwitchFlags::default());
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) || switch_flag(&arg, &mut switch, command)? {
            continue;
        }
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    Ok(Command::Restart(RestartArgs { tree, switch }))
}

fn parse_remove(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "remove";
    let mut tree = TreeArgs::default();
    let (mut versions, mut wait, mut timeout) = (Vec::new(), false, DEFAULT_TIMEOUT);
    let mut dry_run = false;
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) {
            continue;
        }
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("wait", v) => wait = v.on(),
            Arg::Flag("timeout", v) => timeout = self::timeout(v.text(), command)?,
            Arg::Flag("dry-run", v) => dry_run = v.on(),
            Arg::Operand(v) => versions.push(v),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    if versions.is_empty() {
        return Err(missing_version(command));
    }
    Ok(Command::Remove(RemoveArgs {
        tree,
        versions,
        wait,
        timeout,
        dry_run,
    }))
}

fn parse_prune(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "prune";
    let mut tree = TreeArgs::default();
    let (mut keep, mut failed, mut dry_run) = (None, false, false);
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) {
            continue;
        }
        match &arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("keep", v) => keep = Some(number("keep", v.text(), command)?),
            Arg::Flag("failed", v) => failed = v.on(),
            Arg::Flag("dry-run", v) => dry_run = v.on(),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    if keep.is_none() && !failed {
        return Err(Error::Usage(
            "`depro prune` needs -keep=K, the number of newest good versions to keep, or -failed"
                .into(),
        ));
    }
    Ok(Command::Prune(PruneArgs {
        tree,
        keep,
        failed,
        dry_run,
    }))
}

fn parse_wait(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "wait";
    let mut tree = TreeArgs::default();
    let (mut version, mut state, mut need, mut timeout) =
        (None, WaitFor::Active, Need::Count(1), DEFAULT_TIMEOUT);
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) {
            continue;
        }
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("for", v) => {
                state = match v.text() {
                    "ready" => WaitFor::Ready,
                    "active" => WaitFor::Active,
                    other => return Err(not_one_of("for", other, "ready or active", command)),
                }
            }
            Arg::Flag("nodes", v) => need = nodes(v.text(), command)?,
            Arg::Flag("timeout", v) => timeout = self::timeout(v.text(), command)?,
            Arg::Operand(v) if version.is_none() => version = Some(v),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    let version = version.ok_or_else(|| missing_version(command))?;
    Ok(Command::Wait(WaitArgs {
        tree,
        version,
        state,
        nodes: need,
        timeout,
    }))
}

fn parse_policy_command(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "policy";
    let (mut tree, mut switch, mut clear) = (TreeArgs::default(), SwitchFlags::default(), false);
    while let Some(arg) = next(parser, command)? {
        // The table gives policy the policy flags and -message of the
        // switch flags, no others.
        if tree_flag(&arg, &mut tree) || switch_flag(&arg, &mut switch, command)? {
            continue;
        }
        match &arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("clear", v) => clear = v.on(),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    if clear && !switch.given.is_empty() {
        return Err(Error::Usage(
            "-clear takes no policy flags: clear the policy, or set a new one; run `depro help policy`"
                .into(),
        ));
    }
    Ok(Command::Policy(PolicyArgs {
        tree,
        switch,
        clear,
    }))
}

fn parse_control(parser: &mut lexopt::Parser, command: &str) -> Result<Command, Error> {
    let (mut tree, mut version) = (TreeArgs::default(), None);
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) {
            continue;
        }
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Operand(v) if matches!(command, "promote" | "forget") && version.is_none() => {
                version = Some(v)
            }
            _ => return Err(unexpected(&arg, command)),
        }
    }
    Ok(match command {
        "pause" => Command::Pause(tree),
        "resume" => Command::Resume(tree),
        "forget" => Command::Forget(
            tree,
            version.ok_or_else(|| {
                Error::Usage(
                    "forget: name the node of the retired host, e.g. `depro forget node05 \
                     -prefix=api/version`"
                        .into(),
                )
            })?,
        ),
        _ => Command::Promote(
            tree,
            version.ok_or_else(|| {
                Error::Usage(
                    "promote: name the version whose canary passed, e.g. `depro promote v42 \
                     -prefix=api/version`"
                        .into(),
                )
            })?,
        ),
    })
}

fn parse_history(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "history";
    let mut tree = TreeArgs::default();
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) {
            continue;
        }
        match &arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    Ok(Command::History(HistoryArgs { tree }))
}

fn parse_events(parser: &mut lexopt::Parser) -> Result<Command, Error> {
    let command = "events";
    let mut tree = TreeArgs::default();
    let mut since = None;
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) {
            continue;
        }
        match &arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("since", v) => since = Some(v.text().parse::<u64>().map_err(|_| {
                Error::Usage(format!(
                    "-since: {:?} is not a Consul index (a whole number, an event's \"index\"); \
                         run `depro help events`",
                    crate::tree::shown(v.text())
                ))
            })?),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    Ok(Command::Events(EventsArgs { tree, since }))
}

fn parse_status(parser: &mut lexopt::Parser, command: &str) -> Result<Command, Error> {
    let mut tree = TreeArgs::default();
    let (mut version, mut watch) = (None, false);
    while let Some(arg) = next(parser, command)? {
        if tree_flag(&arg, &mut tree) {
            continue;
        }
        match arg {
            Arg::Help => return Ok(Command::Help(Some(command.into()))),
            Arg::Flag("watch", v) => watch = v.on(),
            Arg::Operand(v) if version.is_none() => version = Some(v),
            _ => return Err(unexpected(&arg, command)),
        }
    }
    if watch && tree.json {
        return Err(Error::Usage(
            "-watch and -json do not go together; use -watch for people and logs, or poll -json"
                .into(),
        ));
    }
    Ok(Command::Status(StatusArgs {
        tree,
        version,
        watch,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Command, Error> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn a_retry_hint_repeats_the_rollout_s_flags() {
        let given = [
            "deploy",
            "v2",
            "-canary=1",
            "-batch=25%",
            "-pause=1m30s",
            "-rollback-on-failure",
        ];
        let Command::Deploy(args) = parse_str(&given).unwrap() else {
            panic!()
        };
        let hint = args.switch.repeated();
        assert_eq!(
            hint,
            " -nodes=all -canary=1 -batch=25% -pause=1m30s -rollback-on-failure"
        );
        let mut again = vec!["deploy", "v2"];
        again.extend(hint.split_whitespace());
        let Command::Deploy(pasted) = parse_str(&again).unwrap() else {
            panic!()
        };
        assert_eq!(pasted.switch.repeated(), hint);
        let Command::Deploy(plain) = parse_str(&["deploy", "v2", "-nodes=3"]).unwrap() else {
            panic!()
        };
        assert_eq!(plain.switch.repeated(), " -nodes=3");
    }

    /// A value the flag's own parser takes, by its placeholder.
    fn a_valid_value(flag: &flags::Flag) -> Option<&'static str> {
        match flag.kind {
            Kind::Bool => None,
            Kind::Choice(_, words) => Some(words[0]),
            _ => Some(match flag.placeholder() {
                Some("DURATION") => "5s",
                Some("N" | "M" | "K" | "K|P%" | "N|all|P%" | "BYTES") => "2",
                Some("URL") => "http://origin/v1.tar",
                Some("HEX") => ZEROS,
                _ => "x",
            }),
        }
    }

    const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    /// Each command's words around a flag, so that only the flag is tried
    /// (a deploy's artifact flags go together).
    fn around(command: &str) -> Vec<String> {
        let mut args = vec![command.to_string()];
        match command {
            "deploy" => args.extend([
                "v1".into(),
                "-artifact=http://origin/v1.tar".into(),
                format!("-sha256={ZEROS}"),
            ]),
            "rollout" | "remove" | "wait" | "promote" | "forget" => args.push("v1".into()),
            "prune" => args.push("-failed".into()),
            _ => {}
        }
        args
    }

    #[test]
    fn each_command_takes_exactly_the_flags_the_table_gives_it() {
        let commands = [
            "agent", "deploy", "rollout", "rollback", "restart", "remove", "prune", "status",
            "query", "history", "policy", "pause", "resume", "promote", "forget", "wait",
        ];
        for command in commands {
            for flag in flags::FLAGS {
                let value = match flag.kind {
                    Kind::Alias(to) => a_valid_value(flags::find(to, command).unwrap_or(flag)),
                    _ => a_valid_value(flag),
                };
                // Go style, GNU style, and with `=`.
                let (name, value) = (flag.name, value.unwrap_or("true"));
                let mut forms = vec![vec![format!("-{name}={value}")]];
                for dashes in ["-", "--"] {
                    let mut form = vec![format!("{dashes}{name}")];
                    if !matches!(flag.kind, Kind::Bool) {
                        form.push(value.into());
                    }
                    forms.push(form);
                }
                for form in forms {
                    let mut args = around(command);
                    args.extend(form);
                    let parsed = parse(args.iter().map(OsString::from));
                    if flag.takes(command) {
                        assert!(parsed.is_ok(), "{args:?}: {:?}", parsed.err());
                    } else {
                        let err = parsed.unwrap_err().to_string();
                        assert_eq!(
                            err,
                            format!(
                                "-{}: unknown flag for `depro {command}`; run `depro help {command}`",
                                flag.name
                            ),
                            "{args:?}"
                        );
                    }
                }
            }
        }
        // Nor a flag the table does not have.
        let err = parse_str(&["status", "-h2"]).unwrap_err().to_string();
        assert!(err.contains("-h2: unknown flag"), "{err}");
    }

    #[test]
    fn the_seed_agent_invocation_parses_verbatim() {
        let Command::Agent(args) = parse_str(&["agent", "-config-dir=/etc/depro/"]).unwrap() else {
            panic!()
        };
        assert_eq!(args.config_dirs, [PathBuf::from("/etc/depro/")]);
    }

    #[test]
    fn the_seed_deploy_invocation_parses_verbatim() {
        let cmd = parse_str(&[
            "deploy",
            "585ecfabf5b41bae1db7bd566ce984d77568987d",
            "-prefix=api/version",
            "-nodes=3",
        ])
        .unwrap();
        let Command::Deploy(args) = cmd else { panic!() };
        assert_eq!(args.version, "585ecfabf5b41bae1db7bd566ce984d77568987d");
        assert_eq!(args.tree.prefix.as_deref(), Some("api/version"));
        assert_eq!(args.switch.nodes, Need::Count(3));
        assert_eq!(args.switch.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn go_style_and_gnu_style_flags_are_the_same() {
        let forms: [&[&str]; 4] = [
            &["deploy", "v1", "-nodes", "3", "-timeout=1m"],
            &["deploy", "v1", "--nodes", "3", "--timeout", "1m"],
            &["deploy", "v1", "--nodes=3", "-timeout", "1m"],
            &["deploy", "-nodes=3", "v1", "-timeout=1m"],
        ];
        for form in forms {
            let Command::Deploy(args) = parse_str(form).unwrap() else {
                panic!()
            };
            assert_eq!(
                (args.switch.nodes, args.switch.timeout),
                (Need::Count(3), Duration::from_secs(60)),
                "{form:?}"
            );
        }
    }

    #[test]
    fn repeatable_config_flags_accumulate_in_order() {
        let Command::Agent(args) = parse_str(&[
            "agent",
            "-config-dir=/a",
            "-config-file",
            "/b.json",
            "--config-dir",
            "/c",
            "-server=https://c:8501",
            "-token=x",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(args.config_dirs, [PathBuf::from("/a"), PathBuf::from("/c")]);
        assert_eq!(args.config_files, [PathBuf::from("/b.json")]);
        assert_eq!(args.connection.server.as_deref(), Some("https://c:8501"));
    }

    #[test]
    fn help_and_version_work_everywhere() {
        assert_eq!(parse_str(&[]).unwrap(), Command::Missing);
        assert_eq!(parse_str(&["--version"]).unwrap(), Command::Version);
        assert_eq!(parse_str(&["version"]).unwrap(), Command::Version);
        assert_eq!(
            parse_str(&["help", "deploy"]).unwrap(),
            Command::Help(Some("deploy".into()))
        );
        for command in [
            "agent", "deploy", "rollout", "rollback", "remove", "prune", "status",
        ] {
            assert_eq!(
                parse_str(&[command, "-h"]).unwrap(),
                Command::Help(Some(command.into())),
                "{command}"
            );
        }
    }

    #[test]
    fn bad_flags_are_named_with_a_hint() {
        let err = parse_str(&["deploy", "v1", "-nodes=three"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("-nodes") && err.contains("three"), "{err}");
        let err = parse_str(&["deploy", "v1", "-bogus"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("-bogus") && err.contains("depro help deploy"),
            "{err}"
        );
        let err = parse_str(&["deploy", "v1", "-timeout=5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("-timeout") && err.contains("no unit"), "{err}");
        for (flag, why) in [
            ("-nodes=0%", "1% to 100%"),
            ("-nodes=101%", "1% to 100%"),
            ("-nodes=most", "`all`"),
            ("-batch=x%", "1% to 100%"),
            ("-batch=-1", "not a number"),
            ("-pause=5", "no unit"),
        ] {
            let err = parse_str(&["rollout", "v1", flag]).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("depro help rollout") || flag == "-pause=5",
                "{flag}: {err}"
            );
            assert!(
                err.contains(&flag[..flag.find('=').unwrap()]),
                "{flag}: {err}"
            );
        }
        let err = parse_str(&["deploy", "v1", "-nodes=0"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("-nodes=0") && err.contains("at least 1"),
            "{err}"
        );
        for command in ["deploy", "rollout", "remove"] {
            let err = parse_str(&[command, "v1", "-timeout=0s"])
                .unwrap_err()
                .to_string();
            assert!(err.contains("longer than 0s"), "{command}: {err}");
        }
        let err = parse_str(&["frobnicate"]).unwrap_err().to_string();
        assert!(err.contains("unknown command"), "{err}");
        let err = parse_str(&["deploy", "-prefix=x"]).unwrap_err().to_string();
        assert!(err.contains("needs a VERSION"), "{err}");
        let err = parse_str(&["agent", "-config-dir"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("-config-dir") && !err.contains("--"), "{err}");
    }

    #[test]
    fn boolean_flags_take_go_style_values() {
        let Command::Status(args) = parse_str(&["status", "-json=false"]).unwrap() else {
            panic!()
        };
        assert!(!args.tree.json);
        let Command::Status(args) = parse_str(&["query", "-json"]).unwrap() else {
            panic!()
        };
        assert!(args.tree.json);
    }

    #[test]
    fn nodes_all_and_shares_and_waves_parse_and_mean_what_they_say() {
        let Command::Rollout(args) = parse_str(&[
            "rollout",
            "v2",
            "-nodes=all",
            "-canary=1",
            "-batch=25%",
            "-pause=30s",
        ])
        .unwrap() else {
            panic!("not a rollout")
        };
        assert_eq!(args.switch.nodes, Need::All);
        assert_eq!(args.switch.canary, Some(1));
        assert_eq!(args.switch.batch, Some(Batch::Share(25)));
        assert_eq!(args.switch.pause, Duration::from_secs(30));
        assert!(args.switch.progressive());
        assert_eq!(Need::All.count(7), 7);
        assert_eq!(Need::Share(90).count(10), 9);
        assert_eq!(Need::Share(90).count(11), 10, "rounded up");
        assert_eq!(Need::Count(3).count(100), 3, "a number keeps its meaning");
        assert_eq!(Batch::Share(25).of(10), 3);
        assert_eq!(Batch::Share(1).of(10), 1, "never an empty wave");
        let Command::Deploy(args) = parse_str(&["deploy", "v2", "-nodes=90%", "-batch=2"]).unwrap()
        else {
            panic!("not a deploy")
        };
        assert_eq!(args.switch.nodes, Need::Share(90));
        assert_eq!(args.switch.batch, Some(Batch::Count(2)));
        assert_eq!(args.switch.need(), Need::Share(90));
        let Command::Rollout(args) = parse_str(&["rollout", "v2", "-batch=1"]).unwrap() else {
            panic!("not a rollout")
        };
        assert_eq!(args.switch.need(), Need::All, "waves wait for every agent");
        let Command::Rollout(args) = parse_str(&["rollout", "v2"]).unwrap() else {
            panic!("not a rollout")
        };
        assert_eq!(args.switch.need(), Need::Count(1));
    }

    #[test]
    fn a_policy_gives_each_flag_the_command_does_not() {
        let policy =
            parse_policy("-nodes=all -canary=1 -batch=25% -pause=1m -rollback-on-failure").unwrap();
        assert_eq!(
            policy.policy_text(),
            "-nodes=all -canary=1 -batch=25% -pause=1m -rollback-on-failure"
        );
        let Command::Rollout(mut args) =
            parse_str(&["rollout", "v2", "-nodes=2", "-canary=0"]).unwrap()
        else {
            panic!("not a rollout")
        };
        let taken = args.switch.over(&policy);
        assert_eq!(taken, "-batch=25% -pause=1m -rollback-on-failure");
        // The command's own flags hold: -nodes=2, and -canary=0 (none).
        assert_eq!(args.switch.nodes, Need::Count(2));
        assert_eq!(args.switch.canary, None);
        assert_eq!(args.switch.batch, Some(Batch::Share(25)));
        assert!(args.switch.rollback_on_failure);
        // -canary=0 -batch=0 override a policy's waves: all at once.
        let Command::Rollout(mut args) =
            parse_str(&["rollout", "v2", "-canary=0", "-batch=0"]).unwrap()
        else {
            panic!("not a rollout")
        };
        args.switch.over(&policy);
        assert!(!args.switch.progressive());
        assert_eq!(args.switch.need(), Need::All, "the policy's -nodes");
        // A stored policy is read with the command line's rules.
        for (text, why) in [
            ("-timeout=5m", "not a rollout policy flag"),
            ("-canary=x", "-canary"),
            ("v2", "not a rollout policy flag"),
        ] {
            let err = parse_policy(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn repeated_flags_keep_what_was_turned_off_so_a_policy_cannot_fill_it_in() {
        let Command::Rollout(args) = parse_str(&[
            "rollout",
            "v2",
            "-canary=0",
            "-batch=0",
            "-pause=0s",
            "-rollback-on-failure=false",
            "-promote=auto",
        ])
        .unwrap() else {
            panic!("not a rollout")
        };
        let text = args.switch.repeated();
        assert_eq!(
            text,
            " -nodes=1 -canary=0 -batch=0 -pause=0ms -rollback-on-failure=false -promote=auto"
        );
        // Read back (a resume, a pasted hint), over a policy of waves: the
        // offs hold.
        let mut again = parse_policy(text.trim()).unwrap();
        let policy =
            parse_policy("-canary=1 -batch=25% -pause=1m -rollback-on-failure -promote=manual")
                .unwrap();
        assert_eq!(again.over(&policy), "");
        assert!(!again.progressive() && !again.rollback_on_failure && !again.promote_manual);
        assert!(again.pause.is_zero());
    }
}
