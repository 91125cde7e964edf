//! Progress output of the commands, on stderr, so that stdout carries only
//! the one-line result (`v=$(depro deploy …)` works). Every line starts
//! with the time since the command started.
//!
//! Up to [`COMPACT_ABOVE`] nodes, one line per node state change; above,
//! only the nodes that fail or go away get a line, and the counts (with the
//! few nodes still lagging) carry the rest. On a terminal the count updates
//! in place; otherwise it is printed as a line when it changes, at most once
//! a second in compact mode, so that logs of deploy scripts stay readable.
//! `-quiet` turns all of it off: the result and errors stay.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Above this many nodes, progress is counts, not a line per node.
pub(crate) const COMPACT_ABOVE: usize = 20;

/// In compact mode, the count lagging nodes are named below.
const LAGGING_NAMED: usize = 5;

/// In compact mode off a terminal, counts are printed at most this often.
const COUNT_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Progress {
    start: Instant,
    quiet: bool,
    tty: bool,
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    compact: bool,
    /// The count line shown (tty) or last printed (not a tty).
    count: Option<String>,
    /// A count not printed yet because of [`COUNT_EVERY`].
    pending: Option<String>,
    printed_at: Option<Instant>,
    count_on_screen: bool,
    /// The Consul failure being retried: its text, the attempts since it
    /// was last printed, and when that was.
    retrying: Option<(String, u32, Instant)>,
    /// When anything was last printed off a terminal (see [`Progress::tick`]).
    said_at: Option<Instant>,
}

/// Off a terminal, a wait that prints nothing for this long prints its
/// count again, so that a log shows the command is alive.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// A failure retried again and again is printed once, then at most this
/// often, with the count of attempts.
const RETRY_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    pub(crate) fn new(quiet: bool) -> Progress {
        Progress {
            start: Instant::now(),
            quiet,
            tty: std::io::stderr().is_terminal(),
            state: RefCell::new(State::default()),
        }
    }

    /// Time since the command started, as progress lines begin: ` 12.3s`.
    fn elapsed(&self) -> String {
        format!("{:>5.1}s", self.start.elapsed().as_secs_f64())
    }

    /// Switches to counts when a version has more than [`COMPACT_ABOVE`] nodes.
    pub(crate) fn nodes_seen(&self, nodes: usize) {
        if nodes > COMPACT_ABOVE {
            self.state.borrow_mut().compact = true;
        }
    }

    pub(crate) fn is_compact(&self) -> bool {
        self.state.borrow().compact
    }

    /// A line of its own, e.g. `node3: failed: …` or `current: v1 -> v2`.
    pub(crate) fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        let mut state = self.state.borrow_mut();
        state.said_at = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        if state.count_on_screen {
            let _ = write!(err, "\r\x1b[K");
        }
        let _ = writeln!(err, "{} {text}", self.elapsed());
        if state.count_on_screen {
            let shown = state.count.as_deref().unwrap_or("");
            let _ = write!(err, "{} {shown}", self.elapsed());
        }
        let _ = err.flush();
    }

    /// A request to Consul failed and is tried again: `(Consul: why;
    /// retrying)` the first time, then, while the same failure repeats, a
    /// line every [`RETRY_EVERY`] with the count of attempts (an outage
    /// retried every 0.4 s printed a line each time).
    pub(crate) fn retrying(&self, why: &str) {
        let now = Instant::now();
        let text = {
            let mut state = self.state.borrow_mut();
            match &mut state.retrying {
                Some((last, attempts, at)) if last == why => {
                    *attempts += 1;
                    if now.duration_since(*at) < RETRY_EVERY {
                        return;
                    }
                    let text = format!(
                        "(Consul: {why}; still retrying: {attempts} attempts in the last {} s)",
                        now.duration_since(*at).as_secs()
                    );
                    *attempts = 0;
                    *at = now;
                    text
                }
                _ => {
                    state.retrying = Some((why.to_string(), 0, now));
                    format!("(Consul: {why}; retrying)")
                }
            }
        };
        self.line(&text);
    }

    /// A node's ordinary state change, e.g. `node3: busy -> ready`: a line
    /// of its own unless the fleet is too large for that.
    pub(crate) fn node_line(&self, text: &str) {
        if !self.is_compact() {
            self.line(text);
        }
    }

    /// The running count, e.g. `2/3 ready`.
    pub(crate) fn count(&self, text: &str) {
        self.count_lagging(text, 0, std::iter::empty::<&String>());
    }

    /// The running count and the nodes it still waits for: in compact mode,
    /// once only a few (`left`) are missing, those known are named, e.g.
    /// `198/200 ready; waiting for node17, node93`.
    pub(crate) fn count_lagging<'a>(
        &self,
        text: &str,
        left: usize,
        waiting: impl IntoIterator<Item = &'a String>,
    ) {
        if self.quiet {
            return;
        }
        let mut state = self.state.borrow_mut();
        let text = match state.compact && left <= LAGGING_NAMED {
            true => {
                let waiting: Vec<&String> = waiting.into_iter().take(LAGGING_NAMED + 1).collect();
                match waiting.len() {
                    1..=LAGGING_NAMED => format!("{text}; waiting for {}", super::names(waiting)),
                    _ => text.to_string(),
                }
            }
            false => text.to_string(),
        };
        if state.count.as_deref() == Some(&text) {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{} {text}", self.elapsed());
            state.count_on_screen = true;
        } else {
            let now = Instant::now();
            let too_soon = state.compact
                && state
                    .printed_at
                    .is_some_and(|at| now.duration_since(at) < COUNT_EVERY);
            if too_soon {
                state.pending = Some(text);
                return;
            }
            let _ = writeln!(err, "{} {text}", self.elapsed());
            state.printed_at = Some(now);
            state.said_at = Some(now);
            state.pending = None;
        }
        state.count = Some(text);
        let _ = err.flush();
    }

    /// Time passes while a command waits (called about once a second): on
    /// a terminal the count line is redrawn, its clock ticking; otherwise
    /// a count held back is printed once it may be, and after
    /// [`HEARTBEAT`] of silence the count again, `(still waiting)`.
    pub(crate) fn tick(&self) {
        if self.quiet {
            return;
        }
        let mut state = self.state.borrow_mut();
        let mut err = std::io::stderr().lock();
        let now = Instant::now();
        if self.tty {
            if let (true, Some(text)) = (state.count_on_screen, &state.count) {
                let _ = write!(err, "\r\x1b[K{} {text}", self.elapsed());
            }
        } else if let Some(text) = state
            .printed_at
            .is_none_or(|at| now.duration_since(at) >= COUNT_EVERY)
            .then(|| state.pending.take())
            .flatten()
        {
            let _ = writeln!(err, "{} {text}", self.elapsed());
            state.count = Some(text);
            state.printed_at = Some(now);
            state.said_at = Some(now);
        } else if let Some(text) = &state.count {
            if now.duration_since(state.said_at.unwrap_or(self.start)) >= HEARTBEAT {
                let _ = writeln!(err, "{} {text} (still waiting)", self.elapsed());
                state.said_at = Some(now);
            }
        }
        let _ = err.flush();
    }

    /// Ends an in-place count line, or prints the count held back.
    pub(crate) fn finish(&self) {
        let mut state = self.state.borrow_mut();
        // Never a panic for a closed stderr: progress is not worth dying for.
        let mut err = std::io::stderr().lock();
        if let Some(text) = state.pending.take() {
            if !self.quiet {
                let _ = writeln!(err, "{} {text}", self.elapsed());
            }
        }
        if state.count_on_screen {
            let _ = writeln!(err);
            state.count_on_screen = false;
        }
        state.count = None;
        state.printed_at = None;
    }
}
