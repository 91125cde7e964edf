//! What hooks print: one thread reads the output pipe of every running hook
//! (`poll`), logs it line by line with the hook's label, and keeps the last
//! bytes of each for its failure reason.
//!
//! Bounded whatever the hooks do: one thread for all hooks; per hook at most
//! [`HEAD_MAX`] bytes of the line being read (the part the log shows), the
//! last [`TAIL_MAX`] bytes of that line, and the last [`TAIL_MAX`] bytes of
//! whole lines (the failure reason's); a longer line is logged cut, with its
//! length. The agent tells the hub when a hook has ended
//! ([`OutputHub::finish`]): the hub reads what is still in the pipe, closes
//! its end (so a process that escaped the hook and kept its output open
//! pins nothing), and posts the hook's last lines.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::tree::shown_cut_line;

/// How many bytes of a hook's output line the log shows (the line's head).
pub(crate) const HEAD_MAX: usize = 4096;
/// How many bytes of a hook's last output a failure keeps.
pub(crate) const TAIL_MAX: usize = 1024;
/// What one read takes from a pipe.
const CHUNK: usize = 64 * 1024;
/// How much log one hook run's output may take (its lines as logged,
/// escaped, with their prefixes); the rest is counted and said once.
pub(crate) const LOG_MAX: usize = 1024 * 1024;

/// One hook's output, cut into lines, in bounded memory.
#[derive(Default)]
pub(crate) struct Lines {
    /// The start of the line being read, at most [`HEAD_MAX`] bytes.
    head: Vec<u8>,
    /// The line's length so far (its bytes past the head are not kept).
    length: usize,
    /// The last [`TAIL_MAX`] bytes of the line being read, once it is
    /// longer than its head.
    end: VecDeque<u8>,
    /// The last whole lines, at most [`TAIL_MAX`] bytes with their newlines.
    tail: VecDeque<String>,
    tail_bytes: usize,
}

impl Lines {
    /// Takes the next bytes of output; `log` gets each line that ends in
    /// them, as the log shows it.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], log: &mut impl FnMut(&str)) {
        while !bytes.is_empty() {
            let (part, ended) = match bytes.iter().position(|b| *b == b'\n') {
                Some(at) => (&bytes[..at], true),
                None => (bytes, false),
            };
            self.extend(part);
            if ended {
                self.end_line(log);
                bytes = &bytes[part.len() + 1..];
            } else {
                bytes = &[];
            }
        }
    }

    /// The output ended: a last line without a newline counts too.
    pub(crate) fn flush(&mut self, log: &mut impl FnMut(&str)) {
        if self.length > 0 {
            self.end_line(log);
        }
    }

    /// The last lines, joined (at most [`TAIL_MAX`] bytes).
    pub(crate) fn tail(&self) -> String {
        let lines: Vec<&str> = self.tail.iter().map(String::as_str).collect();
        lines.join("\n")
    }

    fn extend(&mut self, part: &[u8]) {
        let room = HEAD_MAX - self.head.len();
        self.head.extend_from_slice(&part[..part.len().min(room)]);
        self.length += part.len();
        if self.length > HEAD_MAX {
            let past_head = &part[part.len().min(room)..];
            let keep = &past_head[past_head.len().saturating_sub(TAIL_MAX)..];
            self.end.extend(keep);
            while self.end.len() > TAIL_MAX {
                self.end.pop_front();
            }
        }
    }

    fn end_line(&mut self, log: &mut impl FnMut(&str)) {
        let head = String::from_utf8_lossy(&self.head);
        let head = head.trim_end_matches('\r');
        let length = if self.length > HEAD_MAX {
            self.length
        } else {
            head.len()
        };
        log(&shown_cut_line(head, length));
        // The line's last bytes, for the failure reason.
        let last: Vec<u8> = if self.length <= HEAD_MAX {
            self.head[self.head.len().saturating_sub(TAIL_MAX)..].to_vec()
        } else {
            let mut bytes = self.head.clone();
            bytes.extend(self.end.iter());
            bytes[bytes.len().saturating_sub(TAIL_MAX)..].to_vec()
        };
        let last = String::from_utf8_lossy(&last)
            .trim_end_matches('\r')
            .to_string();
        self.push_tail(last);
        self.head.clear();
        self.end.clear();
        self.length = 0;
    }

    fn push_tail(&mut self, line: String) {
        self.tail_bytes += line.len() + 1;
        self.tail.push_back(line);
        while self.tail_bytes > TAIL_MAX + 1 {
            let Some(first) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= first.len() + 1;
        }
    }
}

enum Request {
    Add { id: u64, fd: OwnedFd, label: String },
    Finish { id: u64 },
}

/// The thread that reads every hook's output.
pub(crate) struct OutputHub {
    requests: Arc<Mutex<Vec<Request>>>,
    wake: OwnedFd,
}

struct Reading {
    id: u64,
    label: String,
    /// `None` once the pipe said end of file.
    fd: Option<OwnedFd>,
    lines: Lines,
    log: LogBudget,
}

/// What of a hook run's output went to the log, and what did not.
#[derive(Default)]
struct LogBudget {
    logged: usize,
    dropped_lines: usize,
    dropped_bytes: usize,
}

impl LogBudget {
    fn line(&mut self, label: &str, line: &str) {
        // What the log line takes: the line, its label, and about 32 bytes
        // of time and level.
        let cost = line.len() + label.len() + 32;
        if self.logged + cost <= LOG_MAX {
            self.logged += cost;
            log::info!("[{label}] {line}");
        } else {
            self.dropped_lines += 1;
            self.dropped_bytes += line.len();
        }
    }

    fn end(&self, label: &str) {
        if self.dropped_lines > 0 {
            log::info!(
                "[{label}] … {} more lines ({} bytes) not logged: the log takes the first {} MiB \
                 of a hook's output (its failure reason keeps the last lines)",
                self.dropped_lines,
                self.dropped_bytes,
                LOG_MAX >> 20
            );
        }
    }
}

impl OutputHub {
    /// Starts the thread; `ended(id, tail)` is called for each hook the
    /// agent finishes, with its last lines. It returns false once nobody
    /// listens, which ends the thread.
    pub(crate) fn start(
        ended: impl Fn(u64, String) -> bool + Send + 'static,
    ) -> std::io::Result<OutputHub> {
        let (wake_read, wake) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(std::io::Error::from)?;
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let shared = requests.clone();
        std::thread::Builder::new()
            .name("hook-output".into())
            .stack_size(128 * 1024)
            .spawn(move || serve(wake_read, shared, ended))?;
        Ok(OutputHub { requests, wake })
    }

    /// Reads `fd`, the output of hook run `id`, from now on.
    pub(crate) fn add(&self, id: u64, fd: OwnedFd, label: String) {
        self.request(Request::Add { id, fd, label });
    }

    /// Hook run `id` has ended: read what is left in its pipe, close it,
    /// and report its last lines.
    pub(crate) fn finish(&self, id: u64) {
        self.request(Request::Finish { id });
    }

    fn request(&self, request: Request) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
        let _ = nix::unistd::write(&self.wake, b"x");
    }
}

fn serve(wake: OwnedFd, requests: Arc<Mutex<Vec<Request>>>, ended: impl Fn(u64, String) -> bool) {
    let mut readings: Vec<Reading> = Vec::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let taken = std::mem::take(&mut *requests.lock().unwrap_or_else(|e| e.into_inner()));
        for request in taken {
            match request {
                Request::Add { id, fd, label } => readings.push(Reading {
                    id,
                    label,
                    fd: Some(fd),
                    lines: Lines::default(),
                    log: LogBudget::default(),
                }),
                Request::Finish { id } => {
                    let Some(at) = readings.iter().position(|r| r.id == id) else {
                        if !ended(id, String::new()) {
                            return;
                        }
                        continue;
                    };
                    let mut reading = readings.swap_remove(at);
                    drain(&mut reading, &mut buffer);
                    if !ended(id, reading.lines.tail()) {
                        return;
                    }
                }
            }
        }
        let open: Vec<usize> = (0..readings.len())
            .filter(|i| readings[*i].fd.is_some())
            .collect();
        let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        for i in &open {
            if let Some(fd) = &readings[*i].fd {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
        }
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue; // EINTR
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            while matches!(nix::unistd::read(&wake, &mut buffer), Ok(n) if n > 0) {}
        }
        for (k, i) in open.into_iter().enumerate() {
            if ready[k + 1] {
                read_once(&mut readings[i], &mut buffer);
            }
        }
    }
}

/// One read of a pipe that poll says is ready.
fn read_once(reading: &mut Reading, buffer: &mut [u8]) {
    let Some(fd) = &reading.fd else {
        return;
    };
    let (label, budget) = (&reading.label, &mut reading.log);
    let mut log = |line: &str| budget.line(label, line);
    match nix::unistd::read(fd, buffer) {
        Ok(0) | Err(_) => {
            reading.lines.flush(&mut log);
            reading.fd = None;
        }
        Ok(n) => reading.lines.feed(&buffer[..n], &mut log),
    }
}

/// Reads what is in the pipe now, without waiting for more, then closes it.
fn drain(reading: &mut Reading, buffer: &mut [u8]) {
    let (label, budget) = (&reading.label, &mut reading.log);
    let mut log = |line: &str| budget.line(label, line);
    if let Some(fd) = reading.fd.take() {
        let _ = fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        // More than a pipe holds, and no more: a writer that is still
        // alive must not keep this going.
        for _ in 0..64 {
            match nix::unistd::read(&fd, buffer) {
                Ok(n) if n > 0 => reading.lines.feed(&buffer[..n], &mut log),
                _ => break,
            }
        }
    }
    reading.lines.flush(&mut log);
    reading.log.end(&reading.label);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(lines: &mut Lines, chunks: &[&[u8]]) -> Vec<String> {
        let mut logged = Vec::new();
        for chunk in chunks {
            lines.feed(chunk, &mut |l| logged.push(l.to_string()));
        }
        lines.flush(&mut |l| logged.push(l.to_string()));
        logged
    }

    #[test]
    fn lines_are_logged_whole_across_reads_and_the_last_one_without_a_newline() {
        let mut lines = Lines::default();
        let logged = feed_all(&mut lines, &[b"one\ntw", b"o\r\nthr", b"ee"]);
        assert_eq!(logged, ["one", "two", "three"]);
        assert_eq!(lines.tail(), "one\ntwo\nthree");
    }

    #[test]
    fn a_long_line_is_logged_cut_with_its_length_and_the_tail_keeps_its_end() {
        let mut lines = Lines::default();
        let mut chunks: Vec<Vec<u8>> = vec![b"start-".to_vec()];
        for _ in 0..100 {
            chunks.push(vec![b'x'; 10_000]);
        }
        chunks.push(b"-end\n".to_vec());
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let logged = feed_all(&mut lines, &refs);
        assert_eq!(logged.len(), 1);
        assert!(logged[0].starts_with("start-xxx"));
        assert!(
            logged[0].ends_with("(a line of 1000010 bytes, cut)"),
            "{}",
            &logged[0][logged[0].len() - 60..]
        );
        assert!(logged[0].len() < HEAD_MAX + 100);
        let tail = lines.tail();
        assert!(
            tail.starts_with("xxx") && tail.ends_with("xxx-end"),
            "{tail}"
        );
        assert!(tail.len() <= TAIL_MAX, "{}", tail.len());
        // Whatever the line's length, what is kept is bounded.
        assert!(lines.head.capacity() <= 2 * HEAD_MAX);
        assert!(lines.end.capacity() <= 2 * TAIL_MAX + 64);
    }

    #[test]
    fn the_tail_keeps_the_last_kilobyte_in_whole_lines() {
        let mut lines = Lines::default();
        let text: String = (1..=200).map(|i| format!("line {i}\n")).collect();
        feed_all(&mut lines, &[text.as_bytes()]);
        let tail = lines.tail();
        assert!(tail.len() <= TAIL_MAX);
        assert!(tail.ends_with("line 200"));
        assert!(tail.starts_with("line "));
    }

    #[test]
    fn control_characters_are_escaped_in_the_log_and_kept_in_the_tail() {
        let mut lines = Lines::default();
        let logged = feed_all(&mut lines, &[b"esc \x1b[31m red\n"]);
        assert_eq!(logged, ["esc \\u{1b}[31m red"]);
        assert_eq!(lines.tail(), "esc \u{1b}[31m red");
    }
}
