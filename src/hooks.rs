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
//! shutdown can signal every process it started. Its stdout and stderr go to
//! the agent's log line by line, prefixed with the deployment and version.
//! The ACL token variables are removed from its environment.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Environment variables never passed to hooks (they hold the ACL token).
const SECRET_VARIABLES: [&str; 2] = ["CONSUL_HTTP_TOKEN", "DEPRO_TOKEN"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HookKind {
    Deploy,
    Rollout,
    Clean,
}

impl HookKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HookKind::Deploy => "deploy",
            HookKind::Rollout => "rollout",
            HookKind::Clean => "clean",
        }
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
}

/// Kills the process group of a hook that an earlier run of the agent left
/// behind (it died with `kill -9`), so that it cannot write into a version
/// being deployed afresh. Checks `/proc` first that the group leader is still
/// a depro hook (its `$0` is `depro-<kind>`), not a reused process ID.
/// Returns whether it killed something.
pub(crate) fn kill_leftover(pgid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pgid}/cmdline")).unwrap_or_default();
    let last = cmdline
        .split(|b| *b == 0)
        .rfind(|part| !part.is_empty())
        .unwrap_or_default();
    let ours = [HookKind::Deploy, HookKind::Rollout, HookKind::Clean]
        .iter()
        .any(|k| last == format!("depro-{}", k.as_str()).as_bytes());
    ours && pgid > 1 && killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok()
}

impl Running {
    pub(crate) fn pgid(&self) -> i32 {
        self.pgid.as_raw()
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

    /// Stops every process of the hook at once (SIGKILL to the group).
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
    command.envs(hook.env.iter().map(|(k, v)| (*k, v)));
    let child = command.spawn()?;
    drop(command); // closes our copies of the pipe's write end
    let pgid = Pid::from_raw(child.id() as i32);
    forward_lines(
        std::fs::File::from(output),
        format!("{} {}", hook.label, hook.kind.as_str()),
    );
    Ok(Running { child, pgid })
}

/// Sends each line a hook prints to the log, with its label.
fn forward_lines(stream: impl Read + Send + 'static, label: String) {
    let _ = std::thread::Builder::new()
        .name("hook-output".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line);
                log::info!("[{label}] {}", text.trim_end_matches(['\n', '\r']));
                line.clear();
            }
        });
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
    fn a_killed_hook_names_the_signal() {
        assert_eq!(
            run(&["kill -KILL $$"]).as_deref(),
            Some("was killed by SIGKILL")
        );
    }
}
