//! Progress output of the commands: one line per node state change, and a
//! count that updates in place on a terminal (and is printed as a line when
//! it changes otherwise, so logs of deploy scripts stay readable).

use std::io::{IsTerminal, Write};

pub(crate) struct Progress {
    tty: bool,
    /// The count line shown (tty) or last printed (not a tty).
    count: Option<String>,
    count_on_screen: bool,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            tty: std::io::stdout().is_terminal(),
            count: None,
            count_on_screen: false,
        }
    }

    /// A line of its own, e.g. `node3: busy -> ready`.
    pub(crate) fn line(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.count_on_screen {
            let _ = write!(out, "\r\x1b[K");
        }
        let _ = writeln!(out, "{text}");
        if self.count_on_screen {
            let _ = write!(out, "{}", self.count.as_deref().unwrap_or(""));
        }
        let _ = out.flush();
    }

    /// The running count, e.g. `2/3 ready`.
    pub(crate) fn count(&mut self, text: &str) {
        if self.count.as_deref() == Some(text) {
            return;
        }
        self.count = Some(text.to_string());
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\r\x1b[K{text}");
            self.count_on_screen = true;
        } else {
            let _ = writeln!(out, "{text}");
        }
        let _ = out.flush();
    }

    /// Ends an in-place count line.
    pub(crate) fn finish(&mut self) {
        if self.count_on_screen {
            println!();
            self.count_on_screen = false;
        }
        self.count = None;
    }
}
