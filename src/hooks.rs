//! Running hook scripts: `std::process`, process groups, output, outcomes.
//!
//! A hook is a list of lines from the config. depro runs them as one script,
//! `<shell> -c <script>`, where the script is:
//!
//! ```sh
//! set -e
//! set -o pipefail        # only if the shell has it (probed once at start)
//! <line 1>
//! <line 2>
//! ```
//!
//! so any failing line fails the hook (errexit), and where the shell knows
//! `pipefail` (bash, zsh, ksh, busybox ash) a pipeline fails when any of its
//! commands fails, not only the last. Debian's `sh` (dash 0.5.12) has no
//! `pipefail`: there a pipeline's status is its last command's, and the agent
//! warns at start-up about hooks that use a pipe with such a shell (use
//! `"shell": "bash"`). The usual `set -e` exceptions apply: commands tested
//! by `if`, `while`, `&&`, `||` or `!` do not end the script.
//!
//! Each hook runs in a process group of its own, so that a timeout, a
//! shutdown or a preemption can signal every process it started. Its
//! stdout and stderr are one pipe, read by [`crate::hook_output`]. The ACL
//! token variables are removed from its environment.
//!
//! Every process a hook starts ends with it (start long-running services
//! through systemd, not as a hook's children). When the hook's shell ends,
//! [`end_leftovers`] kills, with SIGKILL:
//! - what is left of its process group (its background jobs);
//! - every process that carries its mark: each run has one in its
//!   environment, `DEPRO_HOOK_ID=<random>`, which every process it starts
//!   inherits and keeps across `exec` and `setsid`;
//! - every orphan the agent inherited that belongs to no running hook: the
//!   agent is a child subreaper ([`become_subreaper`]), so a process that
//!   left the group with `setsid` and cleared its environment still comes
//!   back to the agent when its parent dies, and is killed then.
//!
//! The agent reaps every child itself ([`reap`], on SIGCHLD): no thread or
//! call waits for a hook. If the agent dies while a hook runs, the next
//! agent finds what is left of it by its mark (in `/proc/<pid>/environ`),
//! even after the shell replaced itself with another program or the
//! group's leader exited, and kills it before deploying afresh.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Environment variables never passed to hooks (they hold the ACL token).
const SECRET_VARIABLES: [&str; 2] = ["CONSUL_HTTP_TOKEN", "DEPRO_TOKEN"];

/// The variable that marks every process of one hook run.
pub(crate) const MARK_VARIABLE: &str = "DEPRO_HOOK_ID";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HookKind {
    Deploy,
    Rollout,
    /// Run after the rollout hook until it succeeds or `health_timeout`.
    Health,
    Clean,
}

impl HookKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HookKind::Deploy => "deploy",
            HookKind::Rollout => "rollout",
            HookKind::Health => "health",
            HookKind::Clean => "clean",
        }
    }
}

/// Why a hook failed: how it ended and the last lines it printed. The
/// agent logs it and reports it with the node's `failed` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HookFailure {
    pub kind: HookKind,
    /// How it ended, in words: `exited with status 3`, `timed out after
    /// 5s and was killed by SIGTERM`.
    pub what: String,
    pub exit_code: Option<i32>,
    /// The signal that killed it (`SIGKILL`).
    pub signal: Option<String>,
    pub timed_out: bool,
    /// Its last output lines, at most [`crate::hook_output::TAIL_MAX`]
    /// bytes (not escaped).
    pub output: String,
}

impl HookFailure {
    /// A hook that ended with `status`; `None` if it succeeded.
    pub(crate) fn of(kind: HookKind, status: &std::io::Result<ExitStatus>) -> Option<HookFailure> {
        let what = failure(status)?;
        let (exit_code, signal) = match status {
            Ok(status) => (
                status.code(),
                status
                    .signal()
                    .map(|number| match Signal::try_from(number) {
                        Ok(signal) => signal.to_string(),
                        Err(_) => format!("signal {number}"),
                    }),
            ),
            Err(_) => (None, None),
        };
        Some(HookFailure {
            kind,
            what,
            exit_code,
            signal,
            timed_out: false,
            output: String::new(),
        })
    }

    /// A hook that could not run at all.
    pub(crate) fn not_run(kind: HookKind, what: String) -> HookFailure {
        HookFailure {
            kind,
            what,
            exit_code: None,
            signal: None,
            timed_out: false,
            output: String::new(),
        }
    }
}

impl crate::tree::FailReason {
    /// A hook's failure, as the node reports it.
    pub(crate) fn of_hook(failure: &HookFailure) -> crate::tree::FailReason {
        crate::tree::FailReason {
            hook: Some(failure.kind.as_str().to_string()),
            error: failure.to_string(),
            exit_code: failure.exit_code,
            signal: failure.signal.clone(),
            timed_out: failure.timed_out,
            output: failure.output.clone(),
            at: Some(crate::logging::timestamp()),
        }
    }

    /// A failure that is not a hook's exit (`hook`: the step it stopped).
    pub(crate) fn other(hook: Option<HookKind>, error: String) -> crate::tree::FailReason {
        crate::tree::FailReason {
            hook: hook.map(|k| k.as_str().to_string()),
            error,
            at: Some(crate::logging::timestamp()),
            ..crate::tree::FailReason::default()
        }
    }
}

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} hook {}", self.kind.as_str(), self.what)
    }
}

/// Everything needed to start one hook.
pub(crate) struct Hook<'a> {
    pub kind: HookKind,
    pub shell: &'a Path,
    pub lines: &'a [String],
    pub cwd: &'a Path,
    pub env: Vec<(&'static str, String)>,
    /// The shell has `set -o pipefail` ([`supports_pipefail`]).
    pub pipefail: bool,
}

/// The script a hook's lines become.
pub(crate) fn script(lines: &[String], pipefail: bool) -> String {
    let mut script = String::from("set -e\n");
    if pipefail {
        script.push_str("set -o pipefail\n");
    }
    for line in lines {
        script.push_str(line);
        script.push('\n');
    }
    script
}

/// Whether `shell` understands `set -o pipefail` (a shell that does not
/// answer within a second counts as not: the agent does not wait for it).
pub(crate) fn supports_pipefail(shell: &Path) -> bool {
    let mut command = Command::new(shell);
    command
        .args(["-c", "set -o pipefail"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for name in SECRET_VARIABLES {
        command.env_remove(name);
    }
    let Ok(mut child) = command.spawn() else {
        return false;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Whether a hook line has a pipeline (a `|` that is not part of `||`).
pub(crate) fn has_pipe(line: &str) -> bool {
    line.replace("||", "").contains('|')
}

/// A started hook: the leader of its own process group.
#[derive(Debug)]
pub(crate) struct Running {
    pid: Pid,
    mark: String,
}

/// What the agent records of a running hook, to find it after a crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Leftover {
    pub pgid: i32,
    /// The run's `DEPRO_HOOK_ID` (absent in what older agents recorded).
    pub mark: Option<String>,
}

impl Leftover {
    /// `<pgid> <mark>`, as recorded in `.depro/hook`.
    pub(crate) fn parse(text: &str) -> Option<Leftover> {
        let mut words = text.split_whitespace();
        let pgid = words.next()?.parse().ok().filter(|p| *p > 1)?;
        Some(Leftover {
            pgid,
            mark: words.next().map(String::from),
        })
    }

    pub(crate) fn record(&self) -> String {
        match &self.mark {
            Some(mark) => format!("{} {mark}", self.pgid),
            None => self.pgid.to_string(),
        }
    }
}

/// Kills what is left of a hook an earlier run of the agent left running
/// (it died with `kill -9`), so that it cannot write into a version being
/// deployed afresh: every process that carries the run's mark, and its
/// process group. Never a process without the mark: a process ID may have
/// been reused. Returns how many processes it killed.
pub(crate) fn kill_leftover(leftover: &Leftover) -> usize {
    let Some(mark) = &leftover.mark else {
        return kill_leftover_group(leftover.pgid);
    };
    let needle = format!("{MARK_VARIABLE}={mark}");
    let marked = processes_with(needle.as_bytes());
    for pid in &marked {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    if !marked.is_empty() {
        // Children that cleared their environment still share the group.
        let _ = killpg(Pid::from_raw(leftover.pgid), Signal::SIGKILL);
    }
    marked.len()
}

/// What older agents recorded: a process group whose leader's `$0` is
/// `depro-<kind>` (checked, not a reused process ID).
fn kill_leftover_group(pgid: i32) -> usize {
    let cmdline = std::fs::read(format!("/proc/{pgid}/cmdline")).unwrap_or_default();
    let last = cmdline
        .split(|b| *b == 0)
        .rfind(|part| !part.is_empty())
        .unwrap_or_default();
    let ours = [HookKind::Deploy, HookKind::Rollout, HookKind::Clean]
        .iter()
        .any(|k| last == format!("depro-{}", k.as_str()).as_bytes());
    usize::from(ours && killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok())
}

/// The processes whose environment holds `entry` (`NAME=value`).
fn processes_with(entry: &[u8]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id() as i32;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            environ(*pid).is_some_and(|env| env.split(|b| *b == 0).any(|var| var == entry))
        })
        .collect()
}

/// A fresh mark for one hook run.
fn new_mark() -> String {
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !random {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = (nanos as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Running {
    /// The hook's shell (the leader of its process group).
    pub(crate) fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// What to record to find this hook after a crash.
    pub(crate) fn leftover(&self) -> Leftover {
        Leftover {
            pgid: self.pid.as_raw(),
            mark: Some(self.mark.clone()),
        }
    }

    /// Asks every process of the hook to stop (SIGTERM to the group, and
    /// to the processes that left it but carry its mark).
    pub(crate) fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Stops every process of the hook at once (SIGKILL).
    pub(crate) fn kill(&self) {
        self.signal(Signal::SIGKILL);
    }

    /// Signals the group and the marked processes; how many were signalled.
    fn signal(&self, signal: Signal) -> usize {
        let mut count = usize::from(killpg(self.pid, signal).is_ok());
        for pid in processes_with(self.mark_entry().as_bytes()) {
            count += usize::from(nix::sys::signal::kill(Pid::from_raw(pid), signal).is_ok());
        }
        count
    }

    fn mark_entry(&self) -> String {
        format!("{MARK_VARIABLE}={}", self.mark)
    }
}

/// Makes this process a child subreaper: orphans among its descendants
/// become its children (rather than init's), so that what a hook left
/// behind can be found and ended. False where the kernel refuses (then the
/// process group and the mark remain).
pub(crate) fn become_subreaper() -> bool {
    let done = nix::sys::prctl::set_child_subreaper(true).is_ok();
    SUBREAPER.store(done, std::sync::atomic::Ordering::Relaxed);
    done
}

/// This process is a child subreaper: every process a hook leaves behind
/// comes back to it, so its children are all there is to look at.
static SUBREAPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The children that have ended, with how (reaps them). The agent calls
/// this when SIGCHLD arrives: it is the only place that waits for a child
/// while the agent runs hooks.
pub(crate) fn reap() -> Vec<(i32, std::io::Result<ExitStatus>)> {
    let mut ended = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                ended.push((pid.as_raw(), Ok(ExitStatus::from_raw((code & 0xff) << 8))));
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                ended.push((pid.as_raw(), Ok(ExitStatus::from_raw(signal as i32))));
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return ended,
            Ok(_) => {} // stopped or continued: not an end
        }
    }
}

/// Kills what is left of the hook that `ended` (its group, the processes
/// with its mark), and the orphans the agent inherited that belong to none
/// of the hooks still `running` (they left their group and cleared their
/// environment). Returns how many processes it signalled.
pub(crate) fn end_leftovers(ended: Option<&Running>, running: &[&Running]) -> usize {
    let mut killed = 0;
    if let Some(ended) = ended {
        killed += usize::from(killpg(ended.pid, Signal::SIGKILL).is_ok());
        // As a subreaper, a marked process that left the group comes back
        // as an orphan (below); otherwise look for the mark everywhere.
        if !SUBREAPER.load(std::sync::atomic::Ordering::Relaxed) {
            for pid in processes_with(ended.mark_entry().as_bytes()) {
                killed += usize::from(
                    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok(),
                );
            }
        }
    }
    let marks: Vec<String> = running.iter().map(|r| r.mark_entry()).collect();
    for pid in own_children() {
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid)));
        let of_running = running
            .iter()
            .any(|r| r.pid.as_raw() == pid || pgid == Ok(r.pid))
            || environ(pid).is_some_and(|env| {
                env.split(|b| *b == 0)
                    .any(|var| marks.iter().any(|m| var == m.as_bytes()))
            });
        if !of_running {
            killed +=
                usize::from(nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok());
        }
    }
    killed
}

/// This process's children: from `/proc/self/task/*/children` where the
/// kernel has it, else by reading every process's parent.
fn own_children() -> Vec<i32> {
    let parent = std::process::id() as i32;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let mut children = Vec::new();
        let mut readable = false;
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                readable = true;
                children.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
        if readable {
            return children;
        }
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

fn environ(pid: i32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/environ")).ok()
}

/// Starts a hook. Returns it and the read end of its output (stdout and
/// stderr); [`reap`] tells when it has ended.
pub(crate) fn spawn(hook: &Hook<'_>) -> std::io::Result<(Running, OwnedFd)> {
    let mut command = Command::new(hook.shell);
    // One pipe for stdout and stderr: one reader, and lines in the order
    // the hook wrote them.
    let (output, writer) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    command
        .arg("-c")
        .arg(script(hook.lines, hook.pipefail))
        .arg(format!("depro-{}", hook.kind.as_str()))
        .current_dir(hook.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer.try_clone()?))
        .stderr(Stdio::from(writer))
        .process_group(0);
    for name in SECRET_VARIABLES {
        command.env_remove(name);
    }
    let mark = new_mark();
    command.envs(hook.env.iter().map(|(k, v)| (*k, v)));
    command.env(MARK_VARIABLE, &mark);
    let child = command.spawn()?;
    drop(command); // closes our copies of the pipe's write end
    let pid = Pid::from_raw(child.id() as i32);
    drop(child); // reaped by `reap`, never through the `Child`
    Ok((Running { pid, mark }, output))
}

/// How a hook ended, in words for the log; `None` for success.
pub(crate) fn failure(status: &std::io::Result<ExitStatus>) -> Option<String> {
    match status {
        Ok(status) if status.success() => None,
        Ok(status) => Some(match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(signal) => format!("was killed by {signal}"),
                Err(_) => format!("was killed by signal {signal}"),
            },
            (None, None) => "ended abnormally".to_string(),
        }),
        Err(e) => Some(format!("could not be waited for: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lines: &[&str]) -> Option<String> {
        run_with("sh", lines)
    }

    fn run_with(shell: &str, lines: &[&str]) -> Option<String> {
        let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        let hook = Hook {
            kind: HookKind::Deploy,
            shell: Path::new(shell),
            lines: &lines,
            cwd: Path::new("/"),
            env: vec![("VERSION", "v1".into())],
            pipefail: supports_pipefail(Path::new(shell)),
        };
        let (running, _output) = spawn(&hook).unwrap();
        failure(&wait(&running))
    }

    /// Waits for one hook (tests only: the agent reaps through `reap`).
    fn wait(running: &Running) -> std::io::Result<ExitStatus> {
        match waitpid(running.pid, None).map_err(std::io::Error::from)? {
            WaitStatus::Exited(_, code) => Ok(ExitStatus::from_raw(code << 8)),
            WaitStatus::Signaled(_, signal, _) => Ok(ExitStatus::from_raw(signal as i32)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn any_failing_line_fails_the_hook() {
        assert_eq!(run(&["true", "true"]), None);
        assert_eq!(
            run(&["false", "true"]).as_deref(),
            Some("exited with status 1")
        );
        assert_eq!(run(&["exit 7"]).as_deref(), Some("exited with status 7"));
    }

    #[test]
    fn a_failing_command_inside_a_pipeline_fails_the_hook_where_the_shell_has_pipefail() {
        assert!(supports_pipefail(Path::new("bash")));
        assert!(run_with("bash", &["false | cat", "true"]).is_some());
        assert_eq!(run_with("bash", &["true | cat", "false || true"]), None);
    }

    #[test]
    fn shells_without_pipefail_still_run_hooks() {
        // dash: the pipefail probe must not break the script.
        assert_eq!(run_with("sh", &["true | cat"]), None);
        assert!(run_with("sh", &["true | false"]).is_some());
    }

    #[test]
    fn pipes_are_told_from_or_lists() {
        assert!(has_pipe("wget -O - x | tar zxf - || exit 1"));
        assert!(!has_pipe("test -f x || exit 1"));
    }

    #[test]
    fn hooks_see_their_environment() {
        assert_eq!(run(&["test \"$VERSION\" = v1"]), None);
    }

    #[test]
    fn a_recorded_hook_reads_back_and_an_old_record_has_no_mark() {
        let leftover = Leftover {
            pgid: 4242,
            mark: Some("0a1b".into()),
        };
        assert_eq!(Leftover::parse(&leftover.record()), Some(leftover));
        assert_eq!(
            Leftover::parse("77\n"),
            Some(Leftover {
                pgid: 77,
                mark: None
            })
        );
        assert_eq!(Leftover::parse("1"), None, "never init's group");
        assert_eq!(Leftover::parse(""), None);
    }

    #[test]
    fn hooks_carry_a_mark_of_their_own() {
        assert_eq!(run(&[&format!("test -n \"${MARK_VARIABLE}\"")]), None);
        assert_ne!(new_mark(), new_mark());
    }

    #[test]
    fn a_killed_hook_names_the_signal() {
        assert_eq!(
            run(&["kill -KILL $$"]).as_deref(),
            Some("was killed by SIGKILL")
        );
    }
}
