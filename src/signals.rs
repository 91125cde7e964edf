//! Signals turned into data: a thread that forwards SIGTERM, SIGINT, SIGHUP
//! and SIGCHLD to the agent's main loop as events. What a signal means is
//! decided there, in one place.

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// SIGTERM or SIGINT: finish the running hook (within the grace period),
    /// then exit. A second one: exit at once.
    Stop(i32),
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGCHLD: a child (the running hook) may have ended.
    ChildExited,
}

/// Starts forwarding signals to `post`.
pub(crate) fn forward(post: impl Fn(Signal) -> bool + Send + 'static) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGCHLD])?;
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for number in signals.forever() {
                let signal = match number {
                    SIGHUP => Signal::Reload,
                    SIGCHLD => Signal::ChildExited,
                    _ => Signal::Stop(number),
                };
                if !post(signal) {
                    return;
                }
            }
        })?;
    Ok(())
}

/// A signal's name, for the log.
pub(crate) fn name(number: i32) -> &'static str {
    match number {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
