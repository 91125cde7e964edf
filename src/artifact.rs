//! A version's artifact (issue 21): the build the operator names with
//! `depro deploy V -artifact=URL -sha256=HEX [-size=N]`, recorded in V's
//! folder key, fetched by each agent before the deploy hook and passed to
//! it (`$ARTIFACT`) only once its SHA-256 is the one recorded.
//!
//! The fetch runs in a process of its own (`depro __fetch-artifact`, its
//! inputs in its environment, never in a shell's text), started like a
//! hook: the agent's loop never waits on it, its timeout, preemption and
//! output are a hook's. It downloads into `<dest>.partial`, resumes a
//! partial file (`Range`) after a cut connection or a killed agent, retries
//! with backoff on transient trouble, and renames the file into place only
//! after the digest (and size) matched: nothing half-fetched or unverified
//! ever reaches a hook. A URL's credentials are never shown.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a version's folder key records of its artifact.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Artifact {
    /// Where to fetch it: `http://` or `https://` (credentials allowed, never shown).
    pub url: String,
    /// Its SHA-256, 64 lowercase hex digits.
    pub sha256: String,
    /// Its size in bytes, if the operator gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The digests of its pieces (`-artifact-file`): bytes from a peer are
    /// checked piece by piece, so a lying peer is dropped at its first bad
    /// piece. Not signed: the whole digest still decides what is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pieces: Option<Pieces>,
    /// How many hosts fetch it from the origin at once (`-origin-hosts`);
    /// the others from them (`fan_out`). Not signed: it decides only
    /// where verified bytes come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_hosts: Option<u32>,
    /// Its signature (`depro deploy -sign`), over the prefix, the version,
    /// the digest and the size (`signing::message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::signing::Signature>,
    /// Fields of a newer depro, kept when the key is rewritten.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// An artifact's pieces: their size (the last may be shorter) and their
/// SHA-256s, one after the other in hex.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pieces {
    pub size: u64,
    pub sha256: String,
}

impl Pieces {
    /// The piece size for an artifact of `total` bytes: 1 MiB, doubled
    /// until there are at most 1024 pieces (at most 64 KiB of digests in
    /// the version's key).
    fn size_for(total: u64) -> u64 {
        let mut size = 1 << 20;
        while total.div_ceil(size) > 1024 {
            size *= 2;
        }
        size
    }

    /// Checked against the artifact's size (from Consul: untrusted).
    pub(crate) fn usable(&self, total: Option<u64>) -> bool {
        let Some(total) = total else { return false };
        self.size >= 64 << 10
            && total.div_ceil(self.size) as usize * 64 == self.sha256.len()
            && self.sha256.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// The digest of piece `n`.
    fn of(&self, n: usize) -> Option<&str> {
        self.sha256.get(n * 64..n * 64 + 64)
    }
}

impl Artifact {
    /// Checks an artifact as given on the command line or read from the
    /// tree (untrusted): a usable URL and a well-formed digest.
    pub(crate) fn check(&self) -> Result<(), String> {
        check_url(&self.url)?;
        parse_sha256(&self.sha256).map(|_| ())
    }
}

/// `Ok` for an http(s) URL with a host, as the HTTP client will read it;
/// says what is wrong otherwise (never showing its credentials).
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    // A URL read wrongly may hold its password anywhere: only its scheme
    // is shown.
    let scheme = match url.split_once("://") {
        Some((scheme, _)) if scheme.len() < 10 => crate::tree::shown(scheme),
        _ => "a URL without a scheme".into(),
    };
    let unusable = || format!("{scheme}://…: not a usable URL (scheme://host[:port]/path)");
    let uri: ureq::http::Uri = url.parse().map_err(|_| unusable())?;
    // A port that is not a number is a misread URL (`user:pa?ss@host`).
    let host_port = uri.authority().map_or("", |a| a.as_str());
    let host_port = host_port.rsplit('@').next().unwrap_or_default();
    let port_ok = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.contains('[') || host.ends_with(']') => {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
        }
        _ => true,
    };
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() && port_ok => Ok(()),
        (Some("http" | "https"), _) => Err(unusable()),
        _ => Err(format!("{scheme}://…: not an http:// or https:// URL")),
    }
}

/// The URL as it may be shown: scheme, host, port and path; credentials
/// (`user:password@`) and the query (a presigned URL's signature, a token)
/// are replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        // Not a URL the client would use: only its scheme, if any.
        return match url.split_once("://") {
            Some((scheme, _)) if scheme.len() < 10 => {
                format!("{}://***", crate::tree::shown(scheme))
            }
            _ => "***".into(),
        };
    };
    let authority = uri.authority().map_or("", |a| a.as_str());
    let credentials = if authority.contains('@') { "***@" } else { "" };
    let host = authority.rsplit('@').next().unwrap_or_default();
    let query = if uri.query().is_some() { "?***" } else { "" };
    crate::tree::shown(&format!(
        "{}://{credentials}{host}{}{query}",
        uri.scheme_str().unwrap_or_default(),
        uri.path()
    ))
}

/// A SHA-256 as 64 hex digits, lowercased.
pub(crate) fn parse_sha256(text: &str) -> Result<String, String> {
    let hex = text.trim().to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{:?} is not a SHA-256 (64 hex digits, as `sha256sum FILE` prints)",
            crate::tree::shown(text)
        ));
    }
    Ok(hex)
}

/// The lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 and size of a file.
pub(crate) fn digest_file(path: &Path) -> std::io::Result<(String, u64)> {
    digest_file_in_pieces(path).map(|(digest, size, _)| (digest, size))
}

/// The SHA-256, size and pieces of a file.
pub(crate) fn digest_file_in_pieces(path: &Path) -> std::io::Result<(String, u64, Pieces)> {
    let mut file = File::open(path)?;
    let piece_size = Pieces::size_for(file.metadata()?.len());
    let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
    let mut pieces = PieceCheck::new(piece_size);
    let mut buffer = vec![0; 64 << 10];
    let mut size = 0;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        whole.update(&buffer[..n]);
        pieces.feed(&buffer[..n], &mut |_, _| Ok::<(), ()>(())).ok();
        size += n as u64;
    }
    let sha256 = pieces
        .finish(&mut |_, _| Ok::<(), ()>(()))
        .ok()
        .unwrap_or_default();
    Ok((
        hex(whole.finish().as_ref()),
        size,
        Pieces {
            size: piece_size,
            sha256,
        },
    ))
}

/// Digests bytes piece by piece as they come, and hands each piece's
/// digest (its number, its hex) to a check.
struct PieceCheck {
    size: u64,
    context: ring::digest::Context,
    /// Bytes of the current piece so far.
    filled: u64,
    done: usize,
    /// Every piece's digest so far, one after the other.
    all: String,
}

impl PieceCheck {
    fn new(size: u64) -> PieceCheck {
        PieceCheck {
            size,
            context: ring::digest::Context::new(&ring::digest::SHA256),
            filled: 0,
            done: 0,
            all: String::new(),
        }
    }

    fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        check: &mut impl FnMut(usize, &str) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            let take = ((self.size - self.filled) as usize).min(bytes.len());
            self.context.update(&bytes[..take]);
            self.filled += take as u64;
            bytes = &bytes[take..];
            if self.filled == self.size {
                self.close(check)?;
            }
        }
        Ok(())
    }

    fn close<E>(&mut self, check: &mut impl FnMut(usize, &str) -> Result<(), E>) -> Result<(), E> {
        let context = std::mem::replace(
            &mut self.context,
            ring::digest::Context::new(&ring::digest::SHA256),
        );
        let digest = hex(context.finish().as_ref());
        self.filled = 0;
        self.done += 1;
        self.all.push_str(&digest);
        check(self.done - 1, &digest)
    }

    /// The last, shorter piece (if any); every piece's digest.
    fn finish<E>(
        mut self,
        check: &mut impl FnMut(usize, &str) -> Result<(), E>,
    ) -> Result<String, E> {
        if self.filled > 0 {
            self.close(check)?;
        }
        Ok(self.all)
    }
}

/// The agent's helper process: `depro __fetch-artifact`.
pub(crate) const FETCH_COMMAND: &str = "__fetch-artifact";

/// The environment of `depro __fetch-artifact` (set by the agent).
pub(crate) const ENV_URL: &str = "DEPRO_ARTIFACT_URL";
pub(crate) const ENV_SHA256: &str = "DEPRO_ARTIFACT_SHA256";
pub(crate) const ENV_SIZE: &str = "DEPRO_ARTIFACT_SIZE";
pub(crate) const ENV_DEST: &str = "DEPRO_ARTIFACT_DEST";
/// Peers that have it, best first (`http://ADDR` each, space-separated).
pub(crate) const ENV_PEERS: &str = "DEPRO_ARTIFACT_PEERS";
/// The token that opens it on a peer (`peer::token`).
pub(crate) const ENV_TOKEN: &str = "DEPRO_ARTIFACT_TOKEN";
/// `now`: the origin right after the peers that have it; `later`: only
/// once no peer has had it for [`PEER_PATIENCE`] (`fan_out`).
pub(crate) const ENV_ORIGIN: &str = "DEPRO_ARTIFACT_ORIGIN";

/// `depro __fetch-artifact`: fetches the artifact its environment names
/// into its destination; prints what it does on stdout (the agent's log,
/// and a failure's reason), one line per step.
pub(crate) fn fetch_main() -> i32 {
    let var = |name| std::env::var(name).unwrap_or_default();
    let artifact = Artifact {
        url: var(ENV_URL),
        sha256: var(ENV_SHA256),
        size: var(ENV_SIZE).parse().ok(),
        ..Artifact::default()
    };
    let dest = PathBuf::from(var(ENV_DEST));
    // The pieces' digests, if the version has them (`<dest>.pieces`, written
    // by the agent: too long for the environment).
    let pieces = fs::read_to_string(dest.with_extension("pieces")).unwrap_or_default();
    let artifact = Artifact {
        pieces: pieces.split_once(' ').and_then(|(size, sha256)| {
            let pieces = Pieces {
                size: size.parse().ok()?,
                sha256: sha256.trim().to_string(),
            };
            pieces.usable(artifact.size).then_some(pieces)
        }),
        ..artifact
    };
    let peers = var(ENV_PEERS);
    let peers: Vec<&str> = peers.split_whitespace().collect();
    let origin_now = var(ENV_ORIGIN) != "later";
    let fetched = fetch(&artifact, &dest, &peers, origin_now, &var(ENV_TOKEN));
    // Where it came from, for the agent's metrics (which then delete it).
    match fetched {
        Ok(source) => tell(&dest, &format!("{FETCHED_FROM}{source}")),
        Err(_) => drop(fs::remove_file(dest.with_extension("progress"))),
    }
    match fetched {
        Ok(_) => 0,
        Err(why) => {
            println!("{why}");
            1
        }
    }
}

/// What the fetch into `dest` last said of how it goes (`<dest>.progress`,
/// one line, written by the helper): the agent notes it in the tree for
/// `depro status` and a waiting command.
pub(crate) fn progress_of(dest: &Path) -> String {
    let text = fs::read(dest.with_extension("progress")).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
    text.lines().next().unwrap_or_default().trim().to_string()
}

/// Says how the fetch goes, for [`progress_of`] (best effort).
fn tell(dest: &Path, text: &str) {
    let _ = fs::write(dest.with_extension("progress"), text);
}

/// `3.1/20.0 MB, 2.4 MB/s, from SOURCE`.
fn progress_line(got: u64, size: Option<u64>, rate: f64, from: &str) -> String {
    let mb = |n: u64| format!("{:.1}", n as f64 / 1e6);
    let of = size.map_or(String::new(), |n| format!("/{}", mb(n)));
    format!("{}{of} MB, {:.1} MB/s, from {from}", mb(got), rate / 1e6)
}

/// How often to try again after transient trouble, at most.
const ATTEMPTS: u32 = 8;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// A progress line in the log at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The progress file (`tell`) at most this often.
const TOLD_EVERY: Duration = Duration::from_secs(1);

/// How long a host that is not for the origin waits for a peer that has
/// the artifact, or is fetching or serving it, before it goes there anyway.
const PEER_PATIENCE: Duration = Duration::from_secs(30);

/// How long a host waits for peers in all, progress or not (hosts whose
/// views of the fleet differ could otherwise wait on each other).
const PEER_WAIT_MAX: Duration = Duration::from_secs(90);

/// What asking a peer came to.
enum Asked {
    /// Verified, in `<dest>.peer` (so many bytes).
    Got(u64),
    /// It does not have it (yet), or is `fetching` it.
    NotYet { fetching: bool },
    /// It has it, and all its upload slots are taken.
    Busy,
    /// Gone, refusing, slow or lying: not asked again.
    Dropped(String),
}

/// Asks one peer for the artifact, into `<dest>.peer` (never resumed from
/// elsewhere: a peer that fails leaves the origin's partial file alone).
fn from_peer(
    agent: &ureq::Agent,
    peer: &str,
    artifact: &Artifact,
    expected: &str,
    dest: &Path,
    token: &str,
    hold: bool,
) -> Asked {
    let url = format!("{}/artifacts/{expected}", peer.trim_end_matches('/'));
    if check_url(&url).is_err() {
        return Asked::Dropped("not a usable address".into());
    }
    let source = Source {
        url: &url,
        shown: peer,
        token: Some(token),
        hold,
    };
    let from_peer = dest.with_extension("peer");
    let _ = fs::remove_file(&from_peer);
    let pieces = artifact.pieces.as_ref();
    let outcome = match attempt_fetch(agent, &source, artifact.size, pieces, &from_peer) {
        Ok(()) => verified(&from_peer, expected, artifact.size, peer),
        Err(Trouble::NotYet { status: 503 }) => return Asked::Busy,
        Err(Trouble::NotYet { status }) => {
            return Asked::NotYet {
                fetching: status == 425,
            };
        }
        Err(Trouble::Transient(why) | Trouble::Fatal(why)) => Err(why),
    };
    outcome.map(Asked::Got).unwrap_or_else(|why| {
        let _ = fs::remove_file(&from_peer);
        Asked::Dropped(why)
    })
}

/// A few random bits (to spread hosts' retries).
fn jitter() -> u16 {
    let mut bytes = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    u16::from_le_bytes(bytes)
}

/// Why an attempt failed: worth another try, or not.
enum Trouble {
    Transient(String),
    Fatal(String),
    /// A peer that does not have it (404), is fetching it (425) or busy
    /// serving it (503).
    NotYet {
        status: u16,
    },
}

/// What a successful fetch leaves in its progress file, before its source.
pub(crate) const FETCHED_FROM: &str = "fetched from the ";

/// Fetches into `dest`; says where from: `peer` or `origin`.
fn fetch(
    artifact: &Artifact,
    dest: &Path,
    peers: &[&str],
    origin_now: bool,
    token: &str,
) -> Result<&'static str, String> {
    artifact.check()?;
    let expected = parse_sha256(&artifact.sha256)?;
    if dest.as_os_str().is_empty() {
        return Err("no destination given".into());
    }
    let partial = dest.with_extension("partial");
    // A size known is a size checked: an artifact the disk cannot hold is
    // refused before a byte is fetched (one that grows past the space
    // left fails at its first write that does not fit).
    if let (Some(size), Some(dir)) = (artifact.size, dest.parent())
        && let Ok(disk) = nix::sys::statvfs::statvfs(dir)
    {
        #[allow(clippy::useless_conversion)] // narrower on 32-bit targets
        let free = u64::from(disk.blocks_available()) * u64::from(disk.fragment_size());
        let have = fs::metadata(&partial).map_or(0, |m| m.len());
        if size.saturating_sub(have) > free {
            return Err(format!(
                "the artifact ({size} bytes) does not fit: {free} bytes free in {}; nothing \
                 fetched",
                dir.display()
            ));
        }
    }
    let agent = http_agent(&artifact.url)?;
    let shown = redact(&artifact.url);
    let size = artifact
        .size
        .map_or(String::new(), |n| format!(" ({n} bytes)"));
    // Peers that have it first (each once: a slow, gone or lying peer is
    // dropped for the next), then the origin. A peer slower than about
    // 1 MB/s is slow: the origin is the better bet.
    let patience = Duration::from_secs(30 + artifact.size.unwrap_or(570 << 20) / 1_000_000);
    // A peer answers at once or is dropped; it is reached directly (no
    // proxy), and never redirects (its token goes nowhere else).
    let peer_agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(3)))
        .timeout_recv_response(Some(Duration::from_secs(10)))
        .timeout_recv_body(Some(patience))
        .user_agent(concat!("depro/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent();
    // Each pass asks every peer still in the running; one that has it
    // serves it, one that is fetching it or busy serving it is worth
    // waiting for, one that is gone, slow or lying is dropped.
    let mut asking: Vec<&str> = peers.to_vec();
    tell(dest, "asking the peers");
    let (mut progress_at, waiting_since) = (Instant::now(), Instant::now());
    let mut said_waiting = false;
    while !asking.is_empty() {
        let mut progress = false;
        let mut i = 0;
        while i < asking.len() {
            let peer = asking[i];
            // A host for the origin asks around once, and is not held.
            match from_peer(
                &peer_agent,
                peer,
                artifact,
                &expected,
                dest,
                token,
                !origin_now,
            ) {
                Asked::Got(got) => {
                    let _ = fs::remove_file(&partial);
                    return keep(&dest.with_extension("peer"), dest, &expected, got)
                        .map(|()| "peer");
                }
                // A peer that is fetching it will have it soon: wait for
                // it rather than ask those above it (the tree's top serves
                // its own children, and a zone's copy stays in the zone).
                // (A host for the origin asks everyone on its list once.)
                Asked::NotYet { fetching: true } if !origin_now => {
                    progress = true;
                    break;
                }
                Asked::NotYet { fetching: true } => i += 1,
                Asked::NotYet { fetching: false } => i += 1,
                Asked::Busy => {
                    progress = true;
                    i += 1;
                }
                Asked::Dropped(why) => {
                    println!("dropped the peer {peer}: {why}");
                    asking.remove(i);
                }
            }
        }
        if progress {
            progress_at = Instant::now();
        }
        if origin_now || asking.is_empty() {
            break;
        }
        if progress_at.elapsed() >= PEER_PATIENCE || waiting_since.elapsed() >= PEER_WAIT_MAX {
            println!(
                "no peer had it after {} of waiting: fetching from the origin",
                crate::duration::human(waiting_since.elapsed())
            );
            break;
        }
        if !said_waiting {
            said_waiting = true;
            println!("waiting for a peer to have it ({} asked)", asking.len());
        }
        // Also what tells this host's own server to answer 425, "fetching
        // it": the hosts below it wait for it.
        tell(dest, "waiting for a peer to have it");
        std::thread::sleep(Duration::from_millis(400 + u64::from(jitter() % 400)));
    }
    println!("fetching {shown}{size}");
    let source = Source {
        url: &artifact.url,
        shown: &shown,
        token: None,
        hold: false,
    };
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        // Said before each attempt and through each backoff: the hosts
        // that wait on this one see it is still at it (their server's 425).
        tell(dest, &format!("asking the origin {shown}"));
        match attempt_fetch(&agent, &source, artifact.size, None, &partial) {
            Ok(()) => break,
            Err(Trouble::Fatal(why)) => {
                let _ = fs::remove_file(&partial);
                return Err(why);
            }
            Err(Trouble::NotYet { .. }) => unreachable!("the origin has no token"),
            Err(Trouble::Transient(why)) if attempt >= ATTEMPTS => {
                return Err(format!("{why}; gave up after {attempt} attempts"));
            }
            Err(Trouble::Transient(why)) => {
                println!("{why}; trying again in {}", crate::duration::human(backoff));
                let until = Instant::now() + backoff;
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    tell(dest, &format!("{why}; trying again"));
                    std::thread::sleep(left.min(Duration::from_secs(4)));
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
    match verified(&partial, &expected, artifact.size, &shown) {
        Ok(got) => keep(&partial, dest, &expected, got).map(|()| "origin"),
        Err(why) => {
            let _ = fs::remove_file(&partial);
            Err(format!("{why}; nothing kept"))
        }
    }
}

/// Where bytes come from: a peer (with the token) or the origin.
struct Source<'a> {
    url: &'a str,
    /// The URL as it may be shown (credentials hidden).
    shown: &'a str,
    token: Option<&'a str>,
    /// A peer may hold the request until it has the artifact.
    hold: bool,
}

/// Checks the whole of `partial` (every byte, also those an earlier run
/// fetched): its size, if known, and its digest. Returns its size.
fn verified(partial: &Path, expected: &str, size: Option<u64>, from: &str) -> Result<u64, String> {
    let (actual, got) =
        digest_file(partial).map_err(|e| format!("cannot read {}: {e}", partial.display()))?;
    if let Some(size) = size
        && got != size
    {
        return Err(format!(
            "size mismatch: expected {size} bytes, got {got} from {from}"
        ));
    }
    if actual != expected {
        return Err(format!(
            "digest mismatch: expected sha256 {expected}, got {actual} ({got} bytes from {from})"
        ));
    }
    Ok(got)
}

/// Puts the verified file in place.
fn keep(partial: &Path, dest: &Path, digest: &str, got: u64) -> Result<(), String> {
    File::open(partial)
        .and_then(|f| f.sync_all())
        .and_then(|()| fs::rename(partial, dest))
        .map_err(|e| format!("cannot keep the artifact at {}: {e}", dest.display()))?;
    println!("verified sha256 {digest} ({got} bytes)");
    Ok(())
}

/// An HTTP client for `url` (TLS trusts the host's store, as for Consul
/// without a ca_file). No timeout on the body: a download takes what it
/// takes, and the deploy's `timeout` (the agent stops this process as it
/// stops a hook) bounds it, a stalled connection included.
fn http_agent(url: &str) -> Result<ureq::Agent, String> {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .user_agent(concat!("depro/", env!("CARGO_PKG_VERSION")));
    if url.starts_with("https://") {
        config = config.tls_config(crate::consul::tls::host_store()?);
    }
    Ok(config.build().new_agent())
}

/// One attempt: continues `partial` where it ends (or starts it), and
/// appends the body to it. With `pieces`, a download from the start is
/// checked piece by piece: the first bad piece ends it.
fn attempt_fetch(
    agent: &ureq::Agent,
    source: &Source<'_>,
    size: Option<u64>,
    pieces: Option<&Pieces>,
    partial: &Path,
) -> Result<(), Trouble> {
    let shown = source.shown;
    let have = fs::metadata(partial).map_or(0, |m| m.len());
    if size.is_some_and(|size| have >= size) && have > 0 {
        return Ok(()); // all there: the digest decides
    }
    let mut request = agent.get(source.url);
    if let Some(token) = source.token {
        request = request.header(crate::peer::TOKEN_HEADER, token);
        if !source.hold {
            request = request.header(crate::peer::HOLD_HEADER, "0");
        }
    }
    if have > 0 {
        println!("resuming at byte {have}");
        request = request.header("Range", &format!("bytes={have}-"));
    }
    let response = request.call().map_err(|e| {
        Trouble::Transient(format!(
            "cannot reach {shown}: {}",
            crate::consul::describe_transport_error(&e)
        ))
    })?;
    let status = response.status().as_u16();
    // A peer's 403: it may not have read a rotated secret yet.
    if source.token.is_some() && matches!(status, 403 | 404 | 425 | 503) {
        return Err(Trouble::NotYet { status });
    }
    let append = match status {
        206 if have > 0 => true,
        200 => false,
        // Resuming past the end: the file is complete (or wrong: the
        // digest tells).
        416 if have > 0 => return Ok(()),
        500..=599 | 408 | 429 => {
            return Err(Trouble::Transient(format!("{shown} answered {status}")));
        }
        _ => {
            return Err(Trouble::Fatal(format!(
                "{shown} answered {status}; nothing kept"
            )));
        }
    };
    if source.token.is_some() {
        println!(
            "fetching from the peer {shown}{}",
            size.map_or(String::new(), |n| format!(" ({n} bytes)"))
        );
    }
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(partial)
        .map_err(|e| Trouble::Fatal(format!("cannot write {}: {e}", partial.display())))?;
    let mut body = response.into_body();
    let mut reader = body.as_reader();
    let mut buffer = vec![0; 64 << 10];
    let mut got = if append { have } else { 0 };
    let start = Instant::now();
    let (mut said, mut told) = (start, start);
    let from = match source.token {
        Some(_) => format!("the peer {shown}"),
        None => format!("the origin {shown}"),
    };
    tell(partial, &progress_line(got, size, 0.0, &from));
    let mut checking = pieces
        .filter(|_| !append)
        .map(|p| (p, PieceCheck::new(p.size)));
    let count = pieces.map_or(0, |p| p.sha256.len() / 64);
    let bad_piece = |n: usize, actual: &str, expected: Option<&str>| {
        (expected != Some(actual)).then(|| {
            Trouble::Fatal(format!(
                "piece {} of {count} does not match its digest (expected sha256 {}, got {actual}) \
                 from {shown}; nothing kept",
                n + 1,
                expected.unwrap_or("none: more pieces than the artifact has")
            ))
        })
    };
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(Trouble::Transient(format!(
                    "the download from {shown} broke off at byte {got}: {e}"
                )));
            }
        };
        if let Some((pieces, check)) = checking.as_mut() {
            check.feed(&buffer[..n], &mut |i, actual| {
                bad_piece(i, actual, pieces.of(i)).map_or(Ok(()), Err)
            })?;
        }
        file.write_all(&buffer[..n])
            .map_err(|e| Trouble::Fatal(format!("cannot write {}: {e}", partial.display())))?;
        got += n as u64;
        if size.is_some_and(|size| got > size) {
            return Err(Trouble::Fatal(format!(
                "{shown} sent more than the {} bytes announced; nothing kept",
                size.unwrap_or_default()
            )));
        }
        if told.elapsed() >= TOLD_EVERY {
            told = Instant::now();
            let rate = (got - if append { have } else { 0 }) as f64
                / start.elapsed().as_secs_f64().max(0.001);
            let line = progress_line(got, size, rate, &from);
            tell(partial, &line);
            if said.elapsed() >= PROGRESS_EVERY {
                said = told;
                println!("{line}");
            }
        }
    }
    if let Some((pieces, check)) = checking {
        check.finish(&mut |i, actual| bad_piece(i, actual, pieces.of(i)).map_or(Ok(()), Err))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_url_are_never_shown() {
        assert_eq!(
            redact("https://user:s3cret@origin.example/builds/v1.tar?X-Amz-Signature=abc"),
            "https://***@origin.example/builds/v1.tar?***"
        );
        assert_eq!(
            redact("http://origin:8080/v1.tar"),
            "http://origin:8080/v1.tar"
        );
        for url in [
            "ftp://user:s3cret@origin/v1",
            "https://user:pa?s3cret@host/x",
            "https://user:p/s3cret@host/",
        ] {
            let err = check_url(url).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn only_http_urls_with_a_host_and_sha256_digests_are_accepted() {
        assert!(check_url("http://127.0.0.1:8080/v1.tar").is_ok());
        assert!(check_url("https://origin/v1.tar").is_ok());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("http:///v1.tar").is_err());
        assert!(check_url("http://origin/v1 tar").is_err());
        let digest = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert_eq!(parse_sha256(digest).unwrap(), digest.to_ascii_lowercase());
        assert!(parse_sha256("e3b0").unwrap_err().contains("64 hex digits"));
    }

    #[test]
    fn a_file_s_pieces_are_the_digests_of_its_1_mib_slices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build");
        let bytes: Vec<u8> = (0..(5u32 << 19)).map(|i| ((i * 7) >> 3) as u8).collect();
        fs::write(&path, &bytes).unwrap();
        let (whole, size, pieces) = digest_file_in_pieces(&path).unwrap();
        assert_eq!((size, pieces.size), (bytes.len() as u64, 1 << 20));
        let sha = |b: &[u8]| hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
        assert_eq!(whole, sha(&bytes));
        let slices: String = bytes.chunks(1 << 20).map(sha).collect();
        assert_eq!(pieces.sha256, slices);
        assert!(pieces.usable(Some(size)));
        assert!(!pieces.usable(Some(size + (1 << 20))), "a piece too few");
        assert!(!pieces.usable(None));
        assert_eq!(Pieces::size_for(5 << 30), 8 << 20, "at most 1024 pieces");
    }

    #[test]
    fn a_file_s_digest_is_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        fs::write(&path, b"").unwrap();
        assert_eq!(
            digest_file(&path).unwrap(),
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
                0
            )
        );
    }
}
