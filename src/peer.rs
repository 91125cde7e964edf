//! Hosts passing artifacts to each other (issue 21): an agent with a
//! `listen` address serves the artifacts it has verified, read-only, by
//! digest, to the other agents of its prefixes only; a host fetching a
//! version tries the peers that have it (same `zone` first) before the
//! origin, and drops a peer that fails or sends bad bytes.
//!
//! Authentication: each prefix has a secret in the tree (`<prefix>/.secret`,
//! made by the first agent that needs it; only readers of the prefix can
//! read it). A request carries `X-Depro-Token: HMAC-SHA256(secret, digest)`:
//! it opens that one artifact, nothing else, and never reveals the secret.
//!
//! The server is std's `TcpListener` and a fixed pool of threads (bounded
//! uploads, bounded thread count), each with socket timeouts, so serving
//! never starves the host nor hangs on a slow client.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many uploads run at once, at most.
pub(crate) const UPLOADS: usize = 4;

/// Threads that answer without uploading (a busy server still says 503,
/// "busy", or 404 at once rather than leave a request waiting).
const SPARE: usize = 2;

/// How long a request for an artifact this host is fetching is held.
const HOLD: Duration = Duration::from_secs(2);
/// How often a held request looks whether the artifact is here.
const HELD_CHECK: Duration = Duration::from_millis(20);

/// How long a replaced secret still opens artifacts (agents take a
/// rotation up within 5 minutes, or at a reload).
const GRACE: Duration = Duration::from_secs(600);

/// Requests held at once, at most (the others are answered at once).
const HELD: usize = 4;

/// A progress file written this recently is a fetch under way.
const FETCHING: Duration = Duration::from_secs(10);

/// The header a request's token comes in.
pub(crate) const TOKEN_HEADER: &str = "x-depro-token";

/// A request with this header set to `0` is answered at once, never held
/// (a first host that asks around once before it goes to the origin).
pub(crate) const HOLD_HEADER: &str = "x-depro-hold";

/// The token that opens the artifact `sha256` under a prefix's `secret`.
pub(crate) fn token(secret: &str, sha256: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, sha256.as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new secret for a prefix: 32 random bytes, hex.
pub(crate) fn new_secret() -> Option<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A deployment's path, a secret that opens its artifacts, and when that
/// secret was replaced.
type Allowed = (PathBuf, String, Option<Instant>);

/// What the server may serve: each deployment's path and its prefix's
/// secret, as the agent learns them.
#[derive(Clone, Default)]
pub(crate) struct Served {
    /// Each deployment's path, a secret, and when that secret was replaced
    /// (the one before is accepted for [`GRACE`]).
    list: Arc<Mutex<Vec<Allowed>>>,
    /// The agent's metrics as last rendered (`/metrics`).
    metrics: Arc<Mutex<String>>,
}

impl Served {
    /// Serves the verified artifacts under `path` to holders of `secret`,
    /// and of the secret before it (agents take a rotated secret up at
    /// different times).
    pub(crate) fn allow(&self, path: PathBuf, secret: String) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list
            .iter()
            .any(|(p, s, replaced)| *p == path && *s == secret && replaced.is_none())
        {
            return;
        }
        // The secret in use becomes the one before; older ones go.
        list.retain(|(p, s, replaced)| *p != path || (replaced.is_none() && *s != secret));
        for entry in list.iter_mut().filter(|(p, _, _)| *p == path) {
            entry.2 = Some(Instant::now());
        }
        list.push((path, secret, None));
    }

    /// What `/metrics` answers from now on.
    pub(crate) fn set_metrics(&self, text: String) {
        *self.metrics.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    /// Serves only the artifacts under these paths (the deployments a
    /// reload kept).
    pub(crate) fn keep_only(&self, paths: &[PathBuf]) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|(p, _, _)| paths.contains(p));
    }

    /// The verified file of `sha256` a request with `token` may have; or
    /// the status to answer: 403 (not a token of ours), 425 (this host is
    /// fetching it: ask again), 404.
    fn find(&self, sha256: &str, token: &str) -> Result<PathBuf, u16> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (mut allowed, mut fetching) = (false, false);
        for (path, secret, replaced) in list {
            if replaced.is_some_and(|at| at.elapsed() > GRACE)
                || !constant_time_eq(self::token(&secret, sha256).as_bytes(), token.as_bytes())
            {
                continue;
            }
            allowed = true;
            let versions = std::fs::read_dir(path.join(".depro/artifacts"));
            for entry in versions.into_iter().flatten().flatten() {
                let file = entry.path().join(sha256);
                if file.is_file() {
                    return Ok(file);
                }
                // A fetch under way, downloading or waiting for a peer,
                // says how it goes every second or so (a killed one stops).
                fetching |= std::fs::metadata(file.with_extension("progress"))
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() < FETCHING);
            }
        }
        Err(match (allowed, fetching) {
            (false, _) => 403,
            (true, true) => 425,
            (true, false) => 404,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Starts serving on `addr`: at most [`UPLOADS`] uploads at once, in all at
/// most `limit` bytes per second if given, and a fixed number of threads.
pub(crate) fn serve(addr: SocketAddr, served: Served, limit: Option<u64>) -> std::io::Result<()> {
    let listener = Arc::new(TcpListener::bind(addr)?);
    let uploads = Arc::new(Uploads {
        running: AtomicUsize::new(0),
        held: AtomicUsize::new(0),
        limit,
        next: Mutex::new(Instant::now()),
    });
    for i in 0..UPLOADS + HELD + SPARE {
        let (listener, served) = (listener.clone(), served.clone());
        let uploading = uploads.clone();
        std::thread::Builder::new()
            .name(format!("peer-{i}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(stream) => {
                            if let Err(e) = answer(stream, &served, &uploading) {
                                log::debug!("serving a peer: {e}");
                            }
                        }
                        // Out of file descriptors, say: not a busy loop.
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })?;
    }
    log::info!("serving verified artifacts to the fleet's agents on {addr}");
    Ok(())
}

/// One request: `GET /artifacts/<sha256>`, with the token and maybe a
/// `Range: bytes=N-`.
fn answer(stream: TcpStream, served: &Served, uploads: &Uploads) -> std::io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    // The request's head within 5 s in all (not per read: a client that
    // drips a byte at a time does not hold a thread).
    let head = Deadline {
        stream: stream.try_clone()?,
        until: std::time::Instant::now() + HEAD_TIME,
    };
    let mut reader = BufReader::new(head).take(16 << 10);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let sha256 = line
        .strip_prefix("GET /artifacts/")
        .and_then(|rest| rest.split(' ').next())
        .filter(|s| crate::artifact::parse_sha256(s).is_ok_and(|hex| hex == *s))
        .map(String::from);
    let (mut token, mut from, mut hold) = (String::new(), 0u64, true);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            TOKEN_HEADER => token = value.to_string(),
            HOLD_HEADER => hold = value != "0",
            "range" => {
                from = value
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            }
            _ => {}
        }
    }
    let mut stream = stream;
    if line.starts_with("GET /metrics ") {
        // For Prometheus: no token, nothing but the agent's counts.
        let text = served
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        return write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \
             {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
    }
    let Some(sha256) = sha256 else {
        return status(&mut stream, 400);
    };
    // A host that is fetching it holds the request a while rather than
    // answer "not yet": the asker gets it the moment it is verified here,
    // not at its next ask (each level of the tree would add a pause).
    let holding = hold
        && uploads
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < HELD).then_some(n + 1)
            })
            .is_ok();
    let hold_until = Instant::now() + if holding { HOLD } else { Duration::ZERO };
    let unhold = || {
        if holding {
            uploads.held.fetch_sub(1, Ordering::SeqCst);
        }
    };
    let path = loop {
        match served.find(&sha256, &token) {
            Ok(path) => break path,
            Err(425) if Instant::now() < hold_until => std::thread::sleep(HELD_CHECK),
            Err(code) => {
                unhold();
                return status(&mut stream, code);
            }
        }
    };
    // Busy: a slot that frees within the hold is taken then (the asker
    // would otherwise ask again later, or elsewhere).
    loop {
        let taken = uploads
            .running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < UPLOADS).then_some(n + 1)
            });
        match taken {
            Ok(_) => break,
            Err(_) if Instant::now() < hold_until => std::thread::sleep(HELD_CHECK),
            Err(_) => {
                unhold();
                return status(&mut stream, 503);
            }
        }
    }
    unhold();
    let sent = upload(&mut stream, &path, from, uploads);
    uploads.running.fetch_sub(1, Ordering::SeqCst);
    sent
}

/// The uploads of a host: how many run, and the pace they share.
struct Uploads {
    running: AtomicUsize,
    /// Requests held (for an artifact being fetched, or a slot).
    held: AtomicUsize,
    /// Bytes per second, in all.
    limit: Option<u64>,
    /// When the next piece may go (with a limit).
    next: Mutex<Instant>,
}

impl Uploads {
    /// Waits until `n` more bytes may go.
    fn pace(&self, n: usize) {
        let Some(limit) = self.limit else { return };
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + Duration::from_secs_f64(n as f64 / limit as f64);
            at
        };
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }
}

/// Sends the file from byte `from` on.
fn upload(
    stream: &mut TcpStream,
    path: &std::path::Path,
    from: u64,
    uploads: &Uploads,
) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if from >= size && from > 0 {
        return status(stream, 416);
    }
    file.seek(SeekFrom::Start(from))?;
    let head = match from {
        0 => format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"),
        _ => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes \
             {from}-{}/{size}\r\nConnection: close\r\n\r\n",
            size - from,
            size - 1
        ),
    };
    stream.write_all(head.as_bytes())?;
    let mut buffer = vec![0; 64 << 10];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        uploads.pace(n);
        stream.write_all(&buffer[..n])?;
        crate::metrics::METRICS.served(n as u64);
    }
    stream.flush()
}

/// How long a client has to send a request's head.
const HEAD_TIME: Duration = Duration::from_secs(5);

/// A socket read against a deadline for all its reads.
struct Deadline {
    stream: TcpStream,
    until: std::time::Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

fn status(stream: &mut TcpStream, code: u16) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {code} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        match code {
            403 => "Forbidden",
            404 => "Not Found",
            416 => "Range Not Satisfiable",
            425 => "Too Early",
            503 => "Service Unavailable",
            _ => "Bad Request",
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_secret_and_the_one_before_open_it_and_a_dropped_deployment_is_served_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "ab".repeat(32);
        let (api, web) = (dir.path().join("api"), dir.path().join("web"));
        for path in [&api, &web] {
            std::fs::create_dir_all(path.join(".depro/artifacts/v1")).unwrap();
            std::fs::write(path.join(".depro/artifacts/v1").join(&sha), b"x").unwrap();
        }
        let served = Served::default();
        served.allow(api.clone(), "s1".into());
        served.allow(web.clone(), "s2".into());
        assert!(served.find(&sha, &token("s2", &sha)).is_ok());
        // A rotated secret: the new one and the one before open it.
        served.allow(web.clone(), "s3".into());
        served.allow(web.clone(), "s4".into());
        assert_eq!(served.find(&sha, &token("s2", &sha)), Err(403));
        assert!(served.find(&sha, &token("s3", &sha)).is_ok());
        assert!(served.find(&sha, &token("s4", &sha)).is_ok());
        served.keep_only(std::slice::from_ref(&api));
        assert_eq!(served.find(&sha, &token("s4", &sha)), Err(403));
        assert_eq!(served.find(&sha, &token("s2", &sha)), Err(403));
        assert!(served.find(&sha, &token("s1", &sha)).is_ok());
        assert_eq!(
            served.find(&"cd".repeat(32), &token("s1", &"cd".repeat(32))),
            Err(404)
        );
    }

    #[test]
    fn a_request_for_an_artifact_being_fetched_is_held_unless_it_asks_not_to_be() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "ab".repeat(32);
        let versions = dir.path().join(".depro/artifacts/v1");
        std::fs::create_dir_all(&versions).unwrap();
        std::fs::write(versions.join(format!("{sha}.progress")), "waiting").unwrap();
        let served = Served::default();
        served.allow(dir.path().to_path_buf(), "s".into());
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        serve(addr, served, None).unwrap();
        let ask = |hold: &str| {
            let mut stream = TcpStream::connect(addr).unwrap();
            let token = token("s", &sha);
            write!(
                stream,
                "GET /artifacts/{sha} HTTP/1.1\r\n{TOKEN_HEADER}: {token}\r\n{hold}\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        };
        // Not held: "fetching it, ask again".
        assert!(ask("x-depro-hold: 0\r\n").starts_with("HTTP/1.1 425 "));
        // Held: answered with the artifact once it is verified here.
        let file = versions.join(&sha);
        let verified = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(file, b"the build").unwrap();
        });
        let answer = ask("");
        verified.join().unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("the build"),
            "{answer}"
        );
    }

    #[test]
    fn a_token_opens_one_artifact_under_one_secret() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        assert_eq!(token("s1", &a), token("s1", &a));
        assert_ne!(token("s1", &a), token("s1", &b));
        assert_ne!(token("s1", &a), token("s2", &a));
        assert_eq!(token("s1", &a).len(), 64);
        assert!(new_secret().is_some_and(|s| s.len() == 64));
    }
}
