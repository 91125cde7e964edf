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
//! Each hook runs in a process group of its own, so that a timeout or a
//! shutdown can signal every process it started; when the hook ends, what is
//! left of its group is killed too (a hook's background jobs end with it:
//! start long-running services through systemd, not as a hook's children).
//! Its stdout and stderr go to the agent's log line by line, prefixed with
//! the deployment and version. The ACL token variables are removed from its
//! environment.
//!
//! Each run carries a mark in its environment, `DEPRO_HOOK_ID=<random>`,
//! which every process it starts inherits and keeps across `exec`. If the
//! agent dies while a hook runs, the next agent finds what is left of that
//! hook by this mark (in `/proc/<pid>/environ`), even after the shell
//! replaced itself with another program or the group's leader exited, and
//! kills it before deploying afresh.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
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

/// How many bytes of a hook's last output lines a failure keeps.
pub(crate) const TAIL_MAX: usize = 1024;

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
    /// Its last output lines, at most [`TAIL_MAX`] bytes (not escaped).
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

/// The last lines a hook printed, bounded to [`TAIL_MAX`] bytes, filled by
/// its output's reader thread.
#[derive(Default)]
pub(crate) struct Tail {
    state: Mutex<TailState>,
    ended: Condvar,
}

#[derive(Default)]
struct TailState {
    lines: VecDeque<String>,
    bytes: usize,
    ended: bool,
}

impl Tail {
    fn push(&self, line: &str) {
        let mut line = line.to_string();
        if line.len() > TAIL_MAX {
            let mut cut = line.len() - TAIL_MAX;
            while !line.is_char_boundary(cut) {
                cut += 1;
            }
            line = line.split_off(cut);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.bytes += line.len() + 1;
        state.lines.push_back(line);
        while state.bytes > TAIL_MAX + 1 {
            let Some(first) = state.lines.pop_front() else {
                break;
            };
            state.bytes -= first.len() + 1;
        }
    }

    fn end(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
        self.ended.notify_all();
    }

    /// The lines so far, joined; waits up to `patience` for the output to
    /// end (a hook's last lines may still be in the pipe when it exits).
    pub(crate) fn text(&self, patience: Duration) -> String {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = self
            .ended
            .wait_timeout_while(state, patience, |s| !s.ended)
            .unwrap_or_else(|e| e.into_inner());
        let lines: Vec<&str> = state.lines.iter().map(String::as_str).collect();
        lines.join("\n")
    }
}

/// Everything needed to start one hook.
pub(crate) struct Hook<'a> {
    pub kind: HookKind,
    pub shell: &'a Path,
    pub lines: &'a [String],
    pub cwd: &'a Path,
    pub env: Vec<(&'static str, String)>,
    /// Prefix of the hook's log lines, e.g. `api 1.2.3`.
    pub label: String,
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

/// Whether `shell` understands `set -o pipefail`.
pub(crate) fn supports_pipefail(shell: &Path) -> bool {
    Command::new(shell)
        .args(["-c", "set -o pipefail"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a hook line has a pipeline (a `|` that is not part of `||`).
pub(crate) fn has_pipe(line: &str) -> bool {
    line.replace("||", "").contains('|')
}

/// A started hook: the leader of its own process group.
pub(crate) struct Running {
    child: std::process::Child,
    pgid: Pid,
    mark: String,
    tail: Arc<Tail>,
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
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == entry))
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
    /// What to record to find this hook after a crash.
    pub(crate) fn leftover(&self) -> Leftover {
        Leftover {
            pgid: self.pgid.as_raw(),
            mark: Some(self.mark.clone()),
        }
    }

    /// The hook's exit status, if it has ended (reaps it). The agent calls
    /// this when SIGCHLD arrives, so no thread waits for each hook.
    pub(crate) fn try_wait(&mut self) -> Option<std::io::Result<ExitStatus>> {
        self.child.try_wait().transpose()
    }

    /// Asks every process of the hook to stop (SIGTERM to the group).
    pub(crate) fn terminate(&self) {
        let _ = killpg(self.pgid, Signal::SIGTERM);
    }

    /// The last lines the hook printed (after it ended: waits briefly for
    /// what is still in the pipe).
    pub(crate) fn output_tail(&self) -> String {
        self.tail.text(Duration::from_millis(500))
    }

    /// Stops every process of the hook at once (SIGKILL to the group).
    /// Also what ends a finished hook's leftover background jobs.
    pub(crate) fn kill(&self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}

/// Starts a hook; [`Running::try_wait`] tells when it has ended.
pub(crate) fn spawn(hook: &Hook<'_>) -> std::io::Result<Running> {
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
    let mut child = command.spawn()?;
    drop(command); // closes our copies of the pipe's write end
    let pgid = Pid::from_raw(child.id() as i32);
    let tail = Arc::new(Tail::default());
    let forwarded = forward_lines(
        std::fs::File::from(output),
        format!("{} {}", hook.label, hook.kind.as_str()),
        tail.clone(),
    );
    if let Err(e) = forwarded {
        // Nobody would read its output: stop it rather than let it block.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.wait();
        return Err(e);
    }
    Ok(Running {
        child,
        pgid,
        mark,
        tail,
    })
}

/// Sends each line a hook prints to the log, with its label (bounded and
/// with control characters escaped: a hook's output is not trusted either).
fn forward_lines(
    stream: impl Read + Send + 'static,
    label: String,
    tail: Arc<Tail>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("hook-output".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let raw = String::from_utf8_lossy(&line);
                let raw = raw.trim_end_matches(['\n', '\r']);
                log::info!("[{label}] {}", crate::tree::shown_line(raw));
                tail.push(raw);
                line.clear();
            }
            tail.end();
        })
        .map(drop)
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
            label: "test v1".into(),
            pipefail: supports_pipefail(Path::new(shell)),
        };
        let mut running = spawn(&hook).unwrap();
        failure(&running.child.wait())
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
    fn a_failure_keeps_the_last_kilobyte_of_output_in_whole_lines() {
        let lines: Vec<String> = vec![
            "for i in $(seq 1 200); do echo \"line $i\"; done".into(),
            "printf 'esc \\033[31m red\\n' >&2".into(),
            "exit 9".into(),
        ];
        let hook = Hook {
            kind: HookKind::Health,
            shell: Path::new("sh"),
            lines: &lines,
            cwd: Path::new("/"),
            env: vec![],
            label: "test v1".into(),
            pipefail: false,
        };
        let mut running = spawn(&hook).unwrap();
        let status = running.child.wait();
        let mut failure = HookFailure::of(HookKind::Health, &status).unwrap();
        failure.output = running.output_tail();
        assert_eq!(failure.exit_code, Some(9));
        assert_eq!(failure.to_string(), "the health hook exited with status 9");
        assert!(failure.output.len() <= TAIL_MAX, "{}", failure.output.len());
        assert!(
            failure.output.ends_with("line 200\nesc \u{1b}[31m red"),
            "{:?}",
            failure.output
        );
        assert!(
            failure.output.starts_with("line "),
            "whole lines: {:?}",
            failure.output
        );
        assert!(!failure.output.contains("line 1\n"));
    }

    #[test]
    fn a_killed_hook_names_the_signal() {
        assert_eq!(
            run(&["kill -KILL $$"]).as_deref(),
            Some("was killed by SIGKILL")
        );
    }
}
