//! A TCP proxy between depro and Consul that understands just enough
//! HTTP/1.1 to act on one kind of request: hold it until released, delay
//! it or its answer, forward it and then drop the answer (the request
//! happened, the client cannot know), cut every connection (a network
//! partition that refuses), or go silent (a link that drops every packet:
//! connections open, nothing comes back). It makes races deterministic
//! without touching depro.
//!
//! ```ignore
//! let proxy = Proxy::start(&consul.addr());
//! let held = proxy.rule(Match::put("/v1/txn").body("current"), Action::Hold, 1);
//! // ... start a command against proxy.addr() ...
//! proxy.wait_for(&held, 1);
//! proxy.release(&held);
//! ```
//!
//! One thread per client connection: depro never pipelines, so a request
//! is read whole, acted on, forwarded, and its answer read whole and
//! passed back before the next request on that connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Which requests a rule applies to.
#[derive(Clone, Debug, Default)]
pub struct Match {
    pub method: Option<String>,
    /// A substring of the request target (path and query).
    pub target: String,
    /// A substring of the request body.
    pub body: Option<String>,
}

impl Match {
    pub fn new(method: &str, target: &str) -> Match {
        Match {
            method: Some(method.to_string()),
            target: target.to_string(),
            body: None,
        }
    }
    pub fn get(target: &str) -> Match {
        Match::new("GET", target)
    }
    pub fn put(target: &str) -> Match {
        Match::new("PUT", target)
    }
    pub fn any(target: &str) -> Match {
        Match {
            method: None,
            target: target.to_string(),
            body: None,
        }
    }
    pub fn body(mut self, needle: &str) -> Match {
        self.body = Some(needle.to_string());
        self
    }
    fn matches(&self, request: &Request) -> bool {
        self.method.as_deref().is_none_or(|m| m == request.method)
            && request.target.contains(&self.target)
            && self
                .body
                .as_deref()
                .is_none_or(|b| String::from_utf8_lossy(&request.body).contains(b))
    }
}

/// What to do with a matching request.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    /// Keep it until `release`, then forward it.
    Hold,
    /// Forward it after this long.
    DelayRequest(Duration),
    /// Forward it, and pass its answer back after this long.
    DelayAnswer(Duration),
    /// Forward it, read the answer, and close the client's connection
    /// instead of answering: the request took effect, the client sees a
    /// dropped connection.
    DropAnswer,
    /// Close the client's connection without forwarding anything.
    Refuse,
}

/// A rule in force; a handle for `wait_for` and `release`.
#[derive(Clone)]
pub struct Rule {
    id: usize,
}

struct RuleState {
    id: usize,
    matcher: Match,
    action: Action,
    /// How many more requests it applies to (`None`: all).
    remaining: Option<usize>,
    /// How many requests it has applied to.
    applied: usize,
    released: bool,
}

#[derive(Default)]
struct Shared {
    rules: Vec<RuleState>,
    next_rule: usize,
    /// Every request seen, as "METHOD target", in order.
    log: Vec<String>,
    cut: bool,
    /// Requests are read and never forwarded nor answered (see `silence`).
    silent: bool,
}

pub struct Proxy {
    addr: String,
    upstream: String,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (host:port).
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let proxy = Proxy {
            addr,
            upstream: upstream.to_string(),
            shared: Arc::new((Mutex::new(Shared::default()), Condvar::new())),
            connections: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            accepted: Arc::new(AtomicUsize::new(0)),
        };
        let (shared, connections, stop, accepted, upstream) = (
            proxy.shared.clone(),
            proxy.connections.clone(),
            proxy.stop.clone(),
            proxy.accepted.clone(),
            proxy.upstream.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                if shared.0.lock().unwrap().cut {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                if let Ok(clone) = client.try_clone() {
                    connections.lock().unwrap().push(clone);
                }
                let (shared, connections, upstream) =
                    (shared.clone(), connections.clone(), upstream.clone());
                std::thread::spawn(move || serve(client, &upstream, &shared, &connections));
            }
        });
        proxy
    }

    /// The address clients should use instead of Consul's.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Adds a rule for the next `times` matching requests (0: all of them).
    pub fn rule(&self, matcher: Match, action: Action, times: usize) -> Rule {
        let mut shared = self.shared.0.lock().unwrap();
        shared.next_rule += 1;
        let id = shared.next_rule;
        shared.rules.push(RuleState {
            id,
            matcher,
            action,
            remaining: (times > 0).then_some(times),
            applied: 0,
            released: false,
        });
        Rule { id }
    }

    /// Removes a rule; requests it holds are let through.
    pub fn release(&self, rule: &Rule) {
        let mut shared = self.shared.0.lock().unwrap();
        for state in shared.rules.iter_mut().filter(|r| r.id == rule.id) {
            state.released = true;
            state.remaining = Some(0);
        }
        self.shared.1.notify_all();
    }

    /// How many requests `rule` has applied to.
    pub fn applied(&self, rule: &Rule) -> usize {
        let shared = self.shared.0.lock().unwrap();
        shared
            .rules
            .iter()
            .find(|r| r.id == rule.id)
            .map_or(0, |r| r.applied)
    }

    /// Waits until `rule` has applied to `count` requests.
    pub fn wait_for(&self, rule: &Rule, count: usize) {
        let deadline = Instant::now() + super::PATIENCE;
        let mut shared = self.shared.0.lock().unwrap();
        loop {
            let applied = shared
                .rules
                .iter()
                .find(|r| r.id == rule.id)
                .map_or(0, |r| r.applied);
            if applied >= count {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "the proxy saw {applied} of {count} matching requests; it saw: {:#?}",
                shared.log
            );
            shared = self
                .shared
                .1
                .wait_timeout(shared, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Every request seen so far, as "METHOD target".
    pub fn log(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().log.clone()
    }

    /// A partition: closes every connection and refuses new ones until `heal`.
    pub fn cut(&self) {
        self.shared.0.lock().unwrap().cut = true;
        self.shared.1.notify_all();
        for stream in self.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// A link that drops every packet: connections still open (as behind a
    /// middlebox), requests go unanswered, answers on their way are lost;
    /// the client finds out only through its own timeouts. `heal` ends it,
    /// and the connections that went silent are closed then (by then a
    /// real TCP connection would have timed out).
    pub fn silence(&self) {
        self.shared.0.lock().unwrap().silent = true;
    }

    pub fn heal(&self) {
        let mut state = self.shared.0.lock().unwrap();
        state.cut = false;
        state.silent = false;
        self.shared.1.notify_all();
    }

    /// How many connections clients have opened.
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
    }
}

struct Request {
    method: String,
    target: String,
    head: Vec<u8>,
    body: Vec<u8>,
}

fn serve(
    client: TcpStream,
    upstream: &str,
    shared: &(Mutex<Shared>, Condvar),
    connections: &Mutex<Vec<TcpStream>>,
) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut client = client;
    let mut server: Option<(TcpStream, BufReader<TcpStream>)> = None;
    loop {
        let Some(request) = read_request(&mut reader) else {
            return;
        };
        if wait_out_silence(shared) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        let action = {
            let mut state = shared.0.lock().unwrap();
            if state.cut {
                return;
            }
            state
                .log
                .push(format!("{} {}", request.method, request.target));
            let rule = state.rules.iter_mut().find(|r| {
                r.remaining.is_none_or(|n| n > 0) && !r.released && r.matcher.matches(&request)
            });
            let action = rule.map(|rule| {
                rule.applied += 1;
                if let Some(n) = &mut rule.remaining {
                    *n -= 1;
                }
                (rule.id, rule.action)
            });
            shared.1.notify_all();
            action
        };
        match action {
            Some((_, Action::Refuse)) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Some((id, Action::Hold)) => {
                let mut state = shared.0.lock().unwrap();
                while !state.rules.iter().any(|r| r.id == id && r.released) && !state.cut {
                    state = shared.1.wait(state).unwrap();
                }
                if state.cut {
                    return;
                }
            }
            Some((_, Action::DelayRequest(delay))) => std::thread::sleep(delay),
            _ => {}
        }
        if server.is_none() {
            let Ok(stream) = TcpStream::connect(upstream) else {
                let _ = client.shutdown(Shutdown::Both);
                return;
            };
            if let Ok(clone) = stream.try_clone() {
                connections.lock().unwrap().push(clone);
            }
            let reader = BufReader::new(stream.try_clone().unwrap());
            server = Some((stream, reader));
        }
        let (stream, response_reader) = server.as_mut().unwrap();
        if stream.write_all(&request.head).is_err() || stream.write_all(&request.body).is_err() {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        let head_only = request.method == "HEAD";
        let Some(response) = read_response(response_reader, head_only) else {
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        match action {
            Some((_, Action::DropAnswer)) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Some((_, Action::DelayAnswer(delay))) => std::thread::sleep(delay),
            _ => {}
        }
        if wait_out_silence(shared) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        if client.write_all(&response).is_err() {
            return;
        }
    }
}

/// If the link is silent, waits until it is healed and says to close the
/// connection (whatever was on its way is lost; other handles of the socket
/// are held elsewhere, so the caller shuts it down rather than drop it).
fn wait_out_silence(shared: &(Mutex<Shared>, Condvar)) -> bool {
    let mut state = shared.0.lock().unwrap();
    if !state.silent {
        return false;
    }
    while state.silent && !state.cut {
        state = shared.1.wait(state).unwrap();
    }
    true
}

/// Reads one request: its head (verbatim) and its body (Content-Length).
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let head = read_head(reader)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut first = text.lines().next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let length = header(&text, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        head,
        body,
    })
}

/// Reads one response whole: head and body (Content-Length or chunked).
fn read_response(reader: &mut BufReader<TcpStream>, head_only: bool) -> Option<Vec<u8>> {
    let mut out = read_head(reader)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Some(out);
    }
    if header(&text, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line).ok()?;
            out.extend_from_slice(&line);
            let size_text = String::from_utf8_lossy(&line);
            let size = usize::from_str_radix(size_text.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers, then an empty line.
                loop {
                    let mut trailer = Vec::new();
                    reader.read_until(b'\n', &mut trailer).ok()?;
                    out.extend_from_slice(&trailer);
                    if trailer == b"\r\n" || trailer.is_empty() {
                        return Some(out);
                    }
                }
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            out.extend_from_slice(&chunk);
        }
    }
    match header(&text, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(length) => {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).ok()?;
            out.extend_from_slice(&body);
        }
        None => {
            reader.read_to_end(&mut out).ok()?;
        }
    }
    Some(out)
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader.read_until(b'\n', &mut line).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            return Some(head);
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}
