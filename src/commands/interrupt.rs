//! Ctrl-C (SIGINT), SIGTERM or SIGHUP during a command that writes or
//! waits: it says what it leaves behind and how to finish or undo it, then
//! exits 130.
//!
//! Stopping anywhere is safe: every write a command makes is one
//! transaction, so the tree is never half-written. What is left depends on
//! how far the command got, which it records here as it goes
//! ([`leaves`]); the signal thread prints the last record.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The exit code of an interrupted command (128 + SIGINT, as shells report it).
pub(crate) const EXIT_CODE: i32 = 130;

static LEAVES: Mutex<Option<String>> = Mutex::new(None);

/// What to let go of before the exit (the rollout driver's session).
type Release = Box<dyn FnOnce() + Send>;
static RELEASE: Mutex<Option<Release>> = Mutex::new(None);

/// Runs `release` if the command is interrupted (until [`keep_nothing`]).
pub(crate) fn on_interrupt(release: Release) {
    *RELEASE.lock().unwrap_or_else(|e| e.into_inner()) = Some(release);
}

/// Forgets what [`on_interrupt`] was given (it was let go of).
pub(crate) fn keep_nothing() {
    RELEASE.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// From now on, an interruption prints what [`leaves`] last recorded (at
/// first: nothing was written) and exits 130.
pub(crate) fn catch() {
    leaves("nothing was written");
    let Ok(mut signals) = Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        // Without the thread the default action stays: the command dies
        // silently, with the tree as consistent as ever.
        return;
    };
    let _ = std::thread::Builder::new()
        .name("interrupt".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            if signals.forever().next().is_some() {
                // Held until the exit: no phase changes under the message.
                let leaves = LEAVES.lock().unwrap_or_else(|e| e.into_inner());
                let mut err = std::io::stderr().lock();
                if err.is_terminal() {
                    // After `^C`, or a count drawn in place.
                    let _ = writeln!(err);
                }
                let _ = writeln!(
                    err,
                    "depro: interrupted; {}",
                    leaves.as_deref().unwrap_or("nothing was written")
                );
                let _ = err.flush();
                super::result::interrupted(leaves.as_deref().unwrap_or("nothing was written"));
                if let Some(release) = RELEASE.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    release();
                }
                std::process::exit(EXIT_CODE);
            }
        });
}

/// Records what an interruption from now on leaves behind, and how to
/// finish or undo it.
pub(crate) fn leaves(text: impl Into<String>) {
    *LEAVES.lock().unwrap_or_else(|e| e.into_inner()) = Some(text.into());
}
