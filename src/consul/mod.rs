//! The Consul HTTP API client: the only module that knows HTTP and `ureq`.
//!
//! It speaks the small part of the API depro needs: KV reads (single keys,
//! recursive listings, key listings, blocking queries, at a chosen
//! consistency), transactions (writes that check-and-set, check, lock keys
//! with a session; read-only ones any server answers) whose rejections say
//! why, and sessions. Invariants it keeps:
//! - the ACL token travels only in the `X-Consul-Token` header, never in a
//!   URL, a log line or an error;
//! - every error names the request and the key it was about;
//! - a blocking query's HTTP timeout is longer than Consul's own wait plus
//!   its jitter (wait/16), so Consul, not the client, ends an idle wait;
//! - a missing key or prefix is a value (`None`, empty), not an error;
//! - a client made with [`Consul::with_own_connections`] can be shut down,
//!   ending its requests in flight at once.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

pub(crate) mod tls;
mod x509;

pub(crate) use tls::{TlsFacts, expiry_warning};

/// Connection settings, resolved from flags, environment and config files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConsulSettings {
    /// `host:port`, `http://host:port` or `https://host:port`.
    pub address: String,
    pub token: Option<Secret>,
    /// Where the token came from, for the hint of a denial (`token_file
    /// /etc/depro/token`, `CONSUL_HTTP_TOKEN`, …).
    pub token_origin: String,
    pub datacenter: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Verify the server's TLS certificate (`CONSUL_HTTP_SSL_VERIFY`).
    pub verify_tls: bool,
}

/// A string that must never be printed: an ACL token.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(value: String) -> Secret {
        Secret(value)
    }
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What went wrong talking to Consul, and about what.
#[derive(Debug)]
pub(crate) struct ConsulError {
    /// The Consul address, for the message.
    pub server: String,
    /// Where the client's ACL token came from, for the hint of a denial.
    pub token_origin: String,
    /// What was being done, e.g. `reading key "api/version/current"`.
    pub doing: String,
    pub kind: ConsulErrorKind,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ConsulErrorKind {
    /// No HTTP answer at all: refused, reset, timed out, TLS failure.
    Unreachable(String),
    /// 403: the ACL token is missing, unknown, or lacks a permission.
    Denied(String),
    /// Any other unexpected status.
    Status(u16, String),
    /// An answer depro could not understand.
    BadAnswer(String),
    /// Something answers, but not like Consul's HTTP API (no
    /// X-Consul-Index on a KV read): the address names another server.
    NotConsul(String),
    /// Consul has no path to the datacenter asked for.
    NoDatacenter(String),
    /// The TLS handshake failed, for a reason depro can name: what to fix.
    Tls(String),
    /// An answer larger than depro reads (the limit, in bytes).
    TooLarge(u64),
}

impl ConsulErrorKind {
    /// A word for the kind (a metric's label).
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            ConsulErrorKind::Unreachable(_) => "unreachable",
            ConsulErrorKind::Denied(_) => "denied",
            ConsulErrorKind::Status(..) => "status",
            ConsulErrorKind::BadAnswer(_) => "bad_answer",
            ConsulErrorKind::NotConsul(_) => "not_consul",
            ConsulErrorKind::NoDatacenter(_) => "no_datacenter",
            ConsulErrorKind::Tls(_) => "tls",
            ConsulErrorKind::TooLarge(_) => "too_large",
        }
    }
}

impl ConsulError {
    /// True for errors that may go away on their own (network, 5xx), as
    /// opposed to denials and bad requests, which need an operator.
    pub(crate) fn is_transient(&self) -> bool {
        match &self.kind {
            ConsulErrorKind::Unreachable(_) | ConsulErrorKind::Tls(_) => true,
            ConsulErrorKind::Status(code, _) => *code >= 500 || *code == 429,
            ConsulErrorKind::Denied(_)
            | ConsulErrorKind::BadAnswer(_)
            | ConsulErrorKind::NotConsul(_)
            | ConsulErrorKind::TooLarge(_)
            | ConsulErrorKind::NoDatacenter(_) => false,
        }
    }

    /// A short description of the failure without the request, for
    /// "state changed" log lines.
    pub(crate) fn summary(&self) -> String {
        match &self.kind {
            ConsulErrorKind::Unreachable(why) => format!("unreachable ({why})"),
            ConsulErrorKind::Denied(body) => format!("permission denied ({body})"),
            ConsulErrorKind::Status(code, body) => format!("HTTP {code} ({body})"),
            ConsulErrorKind::BadAnswer(why) => format!("unexpected answer ({why})"),
            ConsulErrorKind::NotConsul(why) => format!("not Consul ({why})"),
            ConsulErrorKind::NoDatacenter(body) => format!("no such datacenter ({body})"),
            ConsulErrorKind::Tls(why) => format!("TLS refused ({why})"),
            ConsulErrorKind::TooLarge(limit) => format!("an answer over {} MiB", limit >> 20),
        }
    }
}

impl fmt::Display for ConsulError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            server,
            doing,
            kind,
            ..
        } = self;
        match kind {
            ConsulErrorKind::Unreachable(why)
                if server.starts_with("https://") && speaks_plain_http(why) =>
            {
                write!(
                    f,
                    "Consul at {server} does not speak https on that port while {doing} ({why}); \
                     use http://{}, or the port of Consul's HTTPS listener",
                    server.trim_start_matches("https://")
                )
            }
            ConsulErrorKind::Unreachable(why) => write!(
                f,
                "Consul at {server} is unreachable while {doing}: {why}; check that Consul runs there \
                 or set -server / CONSUL_HTTP_ADDR"
            ),
            ConsulErrorKind::NotConsul(why) => write!(
                f,
                "the server at {server} does not answer like Consul's HTTP API while {doing} ({why}); \
                 check -server / CONSUL_HTTP_ADDR: it should be a Consul agent's HTTP address \
                 (127.0.0.1:8500 by default)"
            ),
            ConsulErrorKind::NoDatacenter(body) => write!(
                f,
                "Consul at {server} knows no such datacenter while {doing} ({body}); check \
                 -datacenter (DEPRO_DATACENTER, \"datacenter\"): `consul catalog datacenters` lists them"
            ),
            ConsulErrorKind::Denied(body) => write!(
                f,
                "Consul at {server} denied {doing}: {body}; check the ACL token \
                 ({}) and its policy",
                self.token_origin
            ),
            ConsulErrorKind::Tls(why) => write!(
                f,
                "Consul at {server} could not be reached over TLS while {doing}: {why}"
            ),
            ConsulErrorKind::TooLarge(limit) => write!(
                f,
                "Consul at {server} answered with more than {} MiB while {doing}, more than depro \
                 reads in one answer; this is depro's limit, not Consul's: report it with the \
                 number of keys under the prefix",
                limit >> 20
            ),
            ConsulErrorKind::Status(code, body) => {
                write!(
                    f,
                    "Consul at {server} answered HTTP {code} while {doing}: {body}"
                )
            }
            ConsulErrorKind::BadAnswer(why) => {
                write!(
                    f,
                    "Consul at {server} gave an unexpected answer while {doing}: {why}"
                )
            }
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, ConsulError>;

/// Who may answer a read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Consistency {
    /// The leader, from its state as it is (Consul's default mode). Right
    /// after an election that state may lag what was committed: fine for
    /// following, not for deciding.
    #[default]
    Default,
    /// Any server (`?stale`), spreading the load over followers.
    Stale,
    /// The leader, after it verified it leads and has applied everything
    /// committed (`?consistent`): for reads that decide something.
    Consistent,
}

/// How to read: a plain read, or a blocking query.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Read {
    /// Block until the index moves past this one (0: answer at once).
    pub index: u64,
    /// How long Consul may block (only with `index > 0`).
    pub wait: Option<Duration>,
    pub consistency: Consistency,
}

impl Read {
    /// At once, Consul's default mode.
    pub(crate) fn now() -> Read {
        Read::default()
    }
    /// At once, from a leader that has caught up (`?consistent`).
    pub(crate) fn consistent() -> Read {
        Read {
            consistency: Consistency::Consistent,
            ..Read::default()
        }
    }
    pub(crate) fn blocking(index: u64, wait: Duration, consistency: Consistency) -> Read {
        Read {
            index,
            wait: Some(wait),
            consistency,
        }
    }
}

/// An answer to a read: the value and the `X-Consul-Index` to block on next.
#[derive(Debug)]
pub(crate) struct Answer<T> {
    pub index: u64,
    pub value: T,
}

/// One KV entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub session: Option<String>,
    pub create_index: u64,
    pub modify_index: u64,
    /// The key's flags: on node keys, when the agent wrote the state
    /// (milliseconds since the Unix epoch; 0 from older agents).
    pub flags: u64,
}

#[cfg(test)]
impl KvEntry {
    /// An entry for unit tests: `key` = `value`, created and last modified
    /// at `index`, held by session `s` if `held`.
    pub(crate) fn sample(key: &str, value: &str, held: bool, index: u64) -> KvEntry {
        KvEntry {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            session: held.then(|| "s".to_string()),
            create_index: index,
            modify_index: index,
            flags: 0,
        }
    }
}

/// One operation of a transaction (`/v1/txn`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum TxnOp<'a> {
    /// Set `key` only if its ModifyIndex is `index` (0: only if absent; an
    /// index on a missing key fails, so this never re-creates a key).
    Cas {
        key: &'a str,
        value: &'a [u8],
        index: u64,
    },
    /// Delete `key` only if its ModifyIndex is `index`.
    DeleteCas { key: &'a str, index: u64 },
    /// Set `key` and hold it with `session` (fails if another session
    /// holds it), with `flags` (see [`KvEntry::flags`]).
    Lock {
        key: &'a str,
        value: &'a [u8],
        session: &'a str,
        flags: u64,
    },
    /// Set `key` unconditionally.
    Set { key: &'a str, value: &'a [u8] },
    /// Delete `key` unconditionally.
    Delete { key: &'a str },
    /// Read `key`; the transaction fails if it does not exist. In a write,
    /// a check that the key still exists.
    Get { key: &'a str },
    /// The transaction fails unless `key` exists with this ModifyIndex.
    CheckIndex { key: &'a str, index: u64 },
    /// The transaction fails if `key` exists.
    CheckNotExists { key: &'a str },
}

impl TxnOp<'_> {
    pub(crate) fn key(&self) -> &str {
        match self {
            TxnOp::Cas { key, .. }
            | TxnOp::DeleteCas { key, .. }
            | TxnOp::Lock { key, .. }
            | TxnOp::Set { key, .. }
            | TxnOp::Delete { key }
            | TxnOp::Get { key }
            | TxnOp::CheckIndex { key, .. }
            | TxnOp::CheckNotExists { key } => key,
        }
    }

    fn to_json(self) -> serde_json::Value {
        let kv = match self {
            TxnOp::Cas { key, value, index } => serde_json::json!({
                "Verb": "cas", "Key": key, "Value": base64_encode(value), "Index": index}),
            TxnOp::DeleteCas { key, index } => {
                serde_json::json!({"Verb": "delete-cas", "Key": key, "Index": index})
            }
            TxnOp::Lock {
                key,
                value,
                session,
                flags,
            } => serde_json::json!({
                "Verb": "lock", "Key": key, "Value": base64_encode(value), "Session": session,
                "Flags": flags}),
            TxnOp::Set { key, value } => {
                serde_json::json!({"Verb": "set", "Key": key, "Value": base64_encode(value)})
            }
            TxnOp::Delete { key } => serde_json::json!({"Verb": "delete", "Key": key}),
            TxnOp::Get { key } => serde_json::json!({"Verb": "get", "Key": key}),
            TxnOp::CheckIndex { key, index } => {
                serde_json::json!({"Verb": "check-index", "Key": key, "Index": index})
            }
            TxnOp::CheckNotExists { key } => {
                serde_json::json!({"Verb": "check-not-exists", "Key": key})
            }
        };
        serde_json::json!({ "KV": kv })
    }
}

/// How a transaction ended, when Consul answered it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TxnOutcome {
    /// Every operation applied. The entries Consul returned: one per
    /// operation that has one (writes without their values, reads with).
    Committed(Vec<KvEntry>),
    /// Nothing was written; why each failing operation failed.
    Rejected(Vec<TxnFailure>),
}

impl TxnOutcome {
    /// The ModifyIndex a committed transaction left on `key`.
    pub(crate) fn index_of(&self, key: &str) -> Option<u64> {
        match self {
            TxnOutcome::Committed(entries) => entries
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.modify_index),
            TxnOutcome::Rejected(_) => None,
        }
    }

    /// The failure of the operation at `op`, if it failed.
    pub(crate) fn failure_of(&self, op: usize) -> Option<&TxnFailure> {
        match self {
            TxnOutcome::Committed(_) => None,
            TxnOutcome::Rejected(failures) => failures.iter().find(|f| f.op == op),
        }
    }
}

/// Why one operation of a rejected transaction failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TxnFailure {
    /// The position of the operation in the transaction.
    pub op: usize,
    pub conflict: Conflict,
    /// Consul's words.
    pub what: String,
}

/// The reasons a transaction operation fails, as Consul words them. A 409
/// is not always a lost race: callers must tell these apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Conflict {
    /// A check-and-set, delete-cas or check-index found another index (or
    /// a check-not-exists found the key).
    Stale,
    /// The key does not exist (a `get` or `check-index`).
    Missing,
    /// Another session holds the lock.
    LockHeld,
    /// The key was held by a session that was invalidated moments ago.
    LockDelay,
    /// The session does not exist (expired, destroyed, Consul lost it).
    InvalidSession,
    /// The ACL token may not do this.
    Denied,
    Other,
}

impl Conflict {
    fn classify(what: &str) -> Conflict {
        if what.contains("Permission denied") {
            Conflict::Denied
        } else if what.contains("due to lock delay") {
            Conflict::LockDelay
        } else if what.contains("lock is already held") {
            Conflict::LockHeld
        } else if what.contains("invalid session") {
            Conflict::InvalidSession
        } else if what.contains("doesn't exist") {
            Conflict::Missing
        } else if what.contains("index is stale")
            || what.contains("failed index check")
            || what.ends_with(" exists")
        {
            Conflict::Stale
        } else {
            Conflict::Other
        }
    }
}

/// A session as `session/info` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SessionInfo {
    pub id: String,
    pub name: String,
}

/// A connection to one Consul agent.
pub(crate) struct Consul {
    agent: ureq::Agent,
    /// What `agent` was built from, for clients with connections of their own.
    config: ureq::config::Config,
    base: String,
    token: Option<Secret>,
    token_origin: String,
    datacenter: Option<String>,
    requests: AtomicU64,
    tls: TlsFacts,
}

/// Consul takes at most this many operations in one transaction.
pub(crate) const MAX_TXN_OPS: usize = 64;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const BODY_LIMIT: u64 = 64 << 20;

impl Consul {
    /// Builds a client. Fails only on bad settings (address, TLS files).
    pub(crate) fn new(settings: &ConsulSettings) -> std::result::Result<Consul, String> {
        let base = base_url(settings)?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("depro/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(64);
        let mut facts = TlsFacts::default();
        if base.starts_with("https://") {
            let (tls, read) = tls::config(settings)?;
            config = config.tls_config(tls);
            facts = read;
        }
        let config = config.build();
        Ok(Consul {
            agent: config.clone().new_agent(),
            config,
            base,
            token: settings.token.clone(),
            token_origin: settings.token_origin.clone(),
            datacenter: settings.datacenter.clone(),
            requests: AtomicU64::new(0),
            tls: facts,
        })
    }

    /// A client of the same Consul with connections of its own, so that
    /// [`Consul::shut_down`] on it ends only its own requests.
    pub(crate) fn with_own_connections(&self) -> Consul {
        Consul {
            agent: self.config.clone().new_agent(),
            config: self.config.clone(),
            base: self.base.clone(),
            token: self.token.clone(),
            token_origin: self.token_origin.clone(),
            datacenter: self.datacenter.clone(),
            requests: AtomicU64::new(0),
            tls: self.tls.clone(),
        }
    }

    /// What its TLS was built from (files' digest, the client certificate's
    /// expiry).
    pub(crate) fn tls(&self) -> &TlsFacts {
        &self.tls
    }

    /// Closes this client's connections, idle ones and those in use: a
    /// blocking query in flight on another thread fails at once instead of
    /// holding its thread and connection until its wait ends. New requests
    /// fail too.
    pub(crate) fn shut_down(&self) {
        self.agent.clone().shutdown();
    }

    /// The base URL, for messages (it never contains a token).
    pub(crate) fn server(&self) -> &str {
        &self.base
    }

    /// How many HTTP requests this client has sent.
    pub(crate) fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Reads one key; `None` if it does not exist.
    pub(crate) fn get(&self, key: &str, read: Read) -> Result<Answer<Option<KvEntry>>> {
        let doing = || format!("reading key {key:?}");
        self.read_kv(key, "", read, &doing, |body| match body {
            None => Ok(None),
            Some(body) => Ok(parse_entries(&body)?.into_iter().next()),
        })
    }

    /// Reads every key under `prefix` (which must end in `/`), values included.
    pub(crate) fn list(&self, prefix: &str, read: Read) -> Result<Answer<Vec<KvEntry>>> {
        debug_assert!(prefix.ends_with('/'));
        let doing = || format!("listing {prefix:?}");
        self.read_kv(prefix, "recurse", read, &doing, |body| {
            body.map_or(Ok(Vec::new()), |body| parse_entries(&body))
        })
    }

    /// Reads every key whose name starts with `text`, values included. Unlike
    /// [`Consul::list`], `text` need not end in `/`: it also matches longer
    /// names, which the caller must filter out.
    pub(crate) fn list_starting_with(
        &self,
        text: &str,
        read: Read,
    ) -> Result<Answer<Vec<KvEntry>>> {
        let doing = || format!("listing {text:?}");
        self.read_kv(text, "recurse", read, &doing, |body| {
            body.map_or(Ok(Vec::new()), |body| parse_entries(&body))
        })
    }

    /// Lists the key names under `prefix` one level deep (`?keys&separator=/`);
    /// `None` if nothing exists under it.
    pub(crate) fn keys(&self, prefix: &str, read: Read) -> Result<Answer<Option<Vec<String>>>> {
        debug_assert!(prefix.ends_with('/'));
        let doing = || format!("listing keys under {prefix:?}");
        self.read_kv(prefix, "keys&separator=%2F", read, &doing, |body| {
            body.map(|body| serde_json::from_slice(&body).map_err(|e| e.to_string()))
                .transpose()
        })
    }

    /// A KV read: the body (`None` for 404) parsed by `parse`, and the index.
    fn read_kv<T>(
        &self,
        key: &str,
        params: &str,
        read: Read,
        doing: &dyn Fn() -> String,
        parse: impl FnOnce(Option<Vec<u8>>) -> std::result::Result<T, String>,
    ) -> Result<Answer<T>> {
        let url = self.url(
            &format!("kv/{}", encode_path(key)),
            &read_params(read, params),
        );
        let (index, body) = self.read_call(&url, read, doing)?;
        let value = parse(body).map_err(|why| self.bad(doing(), why))?;
        Ok(Answer { index, value })
    }

    /// Runs operations atomically, through the leader. A rejected
    /// transaction is an answer, not an error: see [`TxnOutcome`]. At most
    /// [`MAX_TXN_OPS`] operations.
    pub(crate) fn txn(&self, ops: &[TxnOp<'_>]) -> Result<TxnOutcome> {
        self.run_txn(ops, None)
    }

    /// Runs read-only operations (`Get`, `CheckIndex`) in one request: no
    /// raft write. Its answer carries no index, so nothing tells a lagging
    /// follower's answer apart; `consistency` says who may answer.
    pub(crate) fn read_txn(
        &self,
        ops: &[TxnOp<'_>],
        consistency: Consistency,
    ) -> Result<TxnOutcome> {
        debug_assert!(ops.iter().all(|op| matches!(
            op,
            TxnOp::Get { .. } | TxnOp::CheckIndex { .. } | TxnOp::CheckNotExists { .. }
        )));
        self.run_txn(ops, Some(consistency))
    }

    fn run_txn(&self, ops: &[TxnOp<'_>], read: Option<Consistency>) -> Result<TxnOutcome> {
        let stale = read.is_some();
        debug_assert!(ops.len() <= MAX_TXN_OPS);
        let doing = || {
            let keys: Vec<&str> = ops.iter().map(TxnOp::key).collect();
            if stale {
                format!("reading {keys:?} in one transaction")
            } else {
                format!("writing {keys:?} in one transaction")
            }
        };
        let body: Vec<serde_json::Value> = ops.iter().map(|op| op.to_json()).collect();
        let url = self.url(
            "txn",
            match read {
                Some(Consistency::Stale) => "stale",
                Some(Consistency::Consistent) => "consistent",
                Some(Consistency::Default) | None => "",
            },
        );
        let payload = serde_json::to_vec(&body).map_err(|e| self.bad(doing(), e.to_string()))?;
        let (status, _, answer) = self.send("PUT", &url, Some(&payload), CALL_TIMEOUT, &doing)?;
        if status != 200 && status != 409 {
            return Err(self.status_error(doing(), status, &answer));
        }
        parse_txn_answer(&answer).map_err(|why| self.bad(doing(), why))
    }

    /// Which of `keys` do not exist, by read-only transactions of `Get`s
    /// (no raft write). The leader answers: a transaction's answer carries
    /// no index, so a follower that lags could not be told apart.
    pub(crate) fn missing_keys<'a>(&self, keys: &[&'a str]) -> Result<BTreeSet<&'a str>> {
        let mut missing = BTreeSet::new();
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp<'_>> = chunk.iter().map(|key| TxnOp::Get { key }).collect();
            let TxnOutcome::Rejected(failures) = self.read_txn(&ops, Consistency::Default)? else {
                continue;
            };
            for failure in failures {
                let key = chunk.get(failure.op).copied().unwrap_or_default();
                let doing = || format!("reading {key:?}");
                match failure.conflict {
                    Conflict::Missing => {
                        missing.insert(key);
                    }
                    Conflict::Denied => return Err(self.denied(doing(), failure.what)),
                    _ => return Err(self.unexpected(doing(), failure.what)),
                }
            }
        }
        Ok(missing)
    }

    /// What Consul knows of a session; `None` if it does not exist.
    pub(crate) fn session_info(&self, id: &str) -> Result<Option<SessionInfo>> {
        let doing = || format!("reading session {id}");
        let url = self.url(&format!("session/info/{}", encode_path(id)), "");
        let (status, _, body) = self.send("GET", &url, None, CALL_TIMEOUT, &doing)?;
        if status != 200 {
            return Err(self.status_error(doing(), status, &body));
        }
        #[derive(Deserialize)]
        struct Raw {
            #[serde(rename = "ID")]
            id: String,
            #[serde(rename = "Name", default)]
            name: String,
        }
        let sessions: Option<Vec<Raw>> =
            serde_json::from_slice(&body).map_err(|e| self.bad(doing(), e.to_string()))?;
        Ok(sessions
            .unwrap_or_default()
            .into_iter()
            .next()
            .map(|r| SessionInfo {
                id: r.id,
                name: r.name,
            }))
    }

    /// Creates a session with behavior `delete`, lock-delay 0 and this TTL.
    pub(crate) fn create_session(&self, name: &str, ttl: Duration) -> Result<String> {
        let doing = || "creating a session".to_string();
        let body = serde_json::json!({
            "Name": name,
            "TTL": crate::duration::to_consul(ttl),
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let url = self.url("session/create", "");
        let answer = self.call(
            "PUT",
            &url,
            Some(body.to_string().as_bytes()),
            CALL_TIMEOUT,
            &doing,
        )?;
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created =
            serde_json::from_slice(&answer).map_err(|e| self.bad(doing(), e.to_string()))?;
        Ok(created.id)
    }

    /// Renews a session. `Ok(None)` when Consul no longer knows it (expired,
    /// destroyed, or Consul lost its state): its keys are gone with it.
    /// Otherwise the TTL Consul granted, which may be longer than asked.
    pub(crate) fn renew_session(&self, id: &str) -> Result<Option<Duration>> {
        let doing = || "renewing the session".to_string();
        let url = self.url(&format!("session/renew/{}", encode_path(id)), "");
        let (status, _, body) = self.send("PUT", &url, Some(b""), CALL_TIMEOUT, &doing)?;
        match status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.status_error(doing(), status, &body)),
        }
        #[derive(Deserialize)]
        struct Renewed {
            #[serde(rename = "TTL")]
            ttl: String,
        }
        let renewed: Vec<Renewed> =
            serde_json::from_slice(&body).map_err(|e| self.bad(doing(), e.to_string()))?;
        Ok(renewed
            .first()
            .and_then(|r| crate::duration::parse(&r.ttl).ok())
            .or(Some(Duration::ZERO)))
    }

    /// Destroys a session (idempotent); with behavior `delete`, its keys go too.
    pub(crate) fn destroy_session(&self, id: &str) -> Result<()> {
        let doing = || "destroying the session".to_string();
        let url = self.url(&format!("session/destroy/{}", encode_path(id)), "");
        self.call("PUT", &url, Some(b""), CALL_TIMEOUT, &doing)?;
        Ok(())
    }

    fn url(&self, path: &str, params: &str) -> String {
        let mut url = format!("{}/v1/{path}", self.base);
        let mut sep = '?';
        for param in [
            params,
            &self
                .datacenter
                .as_ref()
                .map(|dc| format!("dc={}", encode_path(dc)))
                .unwrap_or_default(),
        ] {
            if !param.is_empty() {
                url.push(sep);
                url.push_str(param);
                sep = '&';
            }
        }
        url
    }

    /// A read: 200 gives the body, 404 gives `None`; both give the index.
    fn read_call(
        &self,
        url: &str,
        read: Read,
        doing: &dyn Fn() -> String,
    ) -> Result<(u64, Option<Vec<u8>>)> {
        let timeout = match (read.index, read.wait) {
            (index, Some(wait)) if index > 0 => wait + wait / 16 + CALL_TIMEOUT,
            _ => CALL_TIMEOUT,
        };
        let (status, index, body) = self.send("GET", url, None, timeout, doing)?;
        if index.is_none() && matches!(status, 200 | 404) {
            return Err(self.error(
                doing(),
                ConsulErrorKind::NotConsul(format!(
                    "an HTTP {status} answer without an X-Consul-Index header"
                )),
            ));
        }
        let index = index.ok_or_else(|| self.bad(doing(), "no X-Consul-Index header".into()));
        match status {
            200 => Ok((index?, Some(body))),
            404 => Ok((index?, None)),
            _ => Err(self.status_error(doing(), status, &body)),
        }
    }

    /// A write: only 200 is success.
    fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        timeout: Duration,
        doing: &dyn Fn() -> String,
    ) -> Result<Vec<u8>> {
        let (status, _, answer) = self.send(method, url, body, timeout, doing)?;
        if status == 200 {
            Ok(answer)
        } else {
            Err(self.status_error(doing(), status, &answer))
        }
    }

    fn send(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        timeout: Duration,
        doing: &dyn Fn() -> String,
    ) -> Result<(u16, Option<u64>, Vec<u8>)> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        log::trace!("{method} {url}");
        let unreachable = |e: ureq::Error| {
            let kind = match &e {
                ureq::Error::BodyExceedsLimit(limit) => ConsulErrorKind::TooLarge(*limit),
                _ => {
                    let why = describe_transport_error(&e);
                    match tls::trouble(&why, &self.tls) {
                        Some(trouble) => ConsulErrorKind::Tls(trouble),
                        None => ConsulErrorKind::Unreachable(why),
                    }
                }
            };
            self.error(doing(), kind)
        };
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token.expose());
        }
        let sent = match body {
            Some(body) => request.body(body.to_vec()).map(|r| self.run(r, timeout)),
            None => request.body(()).map(|r| self.run(r, timeout)),
        };
        let mut response = sent
            .map_err(|e| self.bad(doing(), e.to_string()))?
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let answer = response
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_vec()
            .map_err(unreachable)?;
        Ok((status, index, answer))
    }

    /// Sends a request with per-phase timeouts. Not a global timeout: with
    /// one, ureq resolves the address on a new thread for every request.
    fn run<B: ureq::AsSendBody>(
        &self,
        request: ureq::http::Request<B>,
        timeout: Duration,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let request = self
            .agent
            .configure_request(request)
            .timeout_send_request(Some(CALL_TIMEOUT))
            .timeout_send_body(Some(CALL_TIMEOUT))
            .timeout_recv_response(Some(timeout))
            .timeout_recv_body(Some(timeout))
            .build();
        self.agent.run(request)
    }

    fn status_error(&self, doing: String, status: u16, body: &[u8]) -> ConsulError {
        let text = String::from_utf8_lossy(body);
        let text: String = text.trim().chars().take(300).collect();
        let text = text.replace('\n', " ");
        let kind = if status == 403 {
            ConsulErrorKind::Denied(text)
        } else if text.contains("No path to datacenter") {
            ConsulErrorKind::NoDatacenter(text)
        } else if status == 400 && text.contains("HTTP request to an HTTPS server") {
            ConsulErrorKind::Status(
                status,
                format!(
                    "{text}; that port speaks https: use https://{}",
                    self.base.trim_start_matches("http://")
                ),
            )
        } else {
            ConsulErrorKind::Status(status, text)
        };
        self.error(doing, kind)
    }

    fn error(&self, doing: String, kind: ConsulErrorKind) -> ConsulError {
        ConsulError {
            server: self.base.clone(),
            token_origin: self.token_origin.clone(),
            doing,
            kind,
        }
    }

    /// An answer that is a denial of `doing` (a rejected operation of a
    /// transaction): exit 4, like any other denial.
    pub(crate) fn denied(&self, doing: String, why: String) -> ConsulError {
        self.error(doing, ConsulErrorKind::Denied(why))
    }

    /// An answer depro cannot make sense of while `doing`.
    pub(crate) fn unexpected(&self, doing: String, why: String) -> ConsulError {
        self.bad(doing, why)
    }

    fn bad(&self, doing: String, why: String) -> ConsulError {
        self.error(doing, ConsulErrorKind::BadAnswer(why))
    }
}

fn read_params(read: Read, base: &str) -> String {
    let mut params: Vec<String> = Vec::new();
    if !base.is_empty() {
        params.push(base.to_string());
    }
    if read.index > 0 {
        params.push(format!("index={}", read.index));
        if let Some(wait) = read.wait {
            params.push(format!("wait={}", crate::duration::to_consul(wait)));
        }
    }
    match read.consistency {
        Consistency::Default => {}
        Consistency::Stale => params.push("stale".to_string()),
        Consistency::Consistent => params.push("consistent".to_string()),
    }
    params.join("&")
}

/// `host:port` → `http://host:port`; `https://…` and `http://…` kept.
fn base_url(settings: &ConsulSettings) -> std::result::Result<String, String> {
    let address = settings.address.trim().trim_end_matches('/');
    let (scheme, rest) = match address.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some((scheme, _)) => {
            return Err(format!(
                "Consul address {address:?} has the scheme {scheme:?}; use http:// or https://"
            ));
        }
        None => ("http", address),
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "Consul address {address:?} is not host:port (e.g. 127.0.0.1:8500 or https://consul.internal:8501)"
        ));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// Whether a TLS failure says the other end answered in plain text (https
/// spoken to an http port).
fn speaks_plain_http(why: &str) -> bool {
    [
        "InvalidContentType",
        "corrupt message",
        "invalid record",
        "wrong version number",
    ]
    .iter()
    .any(|sign| why.contains(sign))
}

/// A transport failure in words (for Consul and an artifact's origin).
pub(crate) fn describe_transport_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        other => other.to_string(),
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
fn encode_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A transaction's answer: `Results` when it committed, `Errors` when not.
fn parse_txn_answer(body: &[u8]) -> std::result::Result<TxnOutcome, String> {
    #[derive(Deserialize)]
    struct RawResult {
        #[serde(rename = "KV")]
        kv: Option<RawEntry>,
    }
    #[derive(Deserialize)]
    struct RawError {
        #[serde(rename = "OpIndex")]
        op: usize,
        #[serde(rename = "What")]
        what: String,
    }
    #[derive(Deserialize)]
    struct Raw {
        #[serde(rename = "Results")]
        results: Option<Vec<RawResult>>,
        #[serde(rename = "Errors")]
        errors: Option<Vec<RawError>>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    match raw.errors {
        Some(errors) if !errors.is_empty() => Ok(TxnOutcome::Rejected(
            errors
                .into_iter()
                .map(|e| TxnFailure {
                    op: e.op,
                    conflict: Conflict::classify(&e.what),
                    what: e.what,
                })
                .collect(),
        )),
        _ => Ok(TxnOutcome::Committed(
            raw.results
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r.kv)
                .map(entry_from_raw)
                .collect::<std::result::Result<_, _>>()?,
        )),
    }
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
    #[serde(rename = "Session", default)]
    session: Option<String>,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
    #[serde(rename = "Flags", default)]
    flags: u64,
}

fn parse_entries(body: &[u8]) -> std::result::Result<Vec<KvEntry>, String> {
    let raw: Vec<RawEntry> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    raw.into_iter().map(entry_from_raw).collect()
}

fn entry_from_raw(r: RawEntry) -> std::result::Result<KvEntry, String> {
    let value = match r.value {
        None => Vec::new(),
        Some(text) => {
            base64_decode(&text).ok_or_else(|| format!("the value of {:?} is not base64", r.key))?
        }
    };
    Ok(KvEntry {
        key: r.key,
        value,
        session: r.session.filter(|s| !s.is_empty()),
        create_index: r.create_index,
        modify_index: r.modify_index,
        flags: r.flags,
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                TABLE[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Standard base64 (with padding), as Consul encodes KV values.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= sextet(c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(address: &str) -> ConsulSettings {
        ConsulSettings {
            address: address.into(),
            token: Some(Secret::new("s3cr3t-token".into())),
            token_origin: "CONSUL_HTTP_TOKEN".into(),
            datacenter: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            verify_tls: true,
        }
    }

    #[test]
    fn a_denial_names_where_the_token_came_from() {
        let mut with_file = settings("127.0.0.1:8500");
        with_file.token_origin = "token_file /etc/depro/token".into();
        let consul = Consul::new(&with_file).unwrap();
        let text = consul
            .denied("reading \"p/current\"".into(), "Permission denied".into())
            .to_string();
        assert!(text.contains("(token_file /etc/depro/token)"), "{text}");
        assert!(!text.contains("CONSUL_HTTP_TOKEN"), "{text}");
    }

    #[test]
    fn tls_refusals_say_what_to_fix() {
        let none = TlsFacts::default();
        let why = tls::trouble("received fatal alert: CertificateRequired", &none).unwrap();
        assert!(why.contains("give cert_file and key_file"), "{why}");
        let expired = TlsFacts {
            fingerprint: 0,
            client_cert: Some(("/etc/depro/client.pem".into(), 1_000_000)),
        };
        let why = tls::trouble("Broken pipe (os error 32)", &expired).unwrap();
        assert!(
            why.contains("/etc/depro/client.pem expired at 1970-01-12"),
            "{why}"
        );
        let why = tls::trouble(
            "invalid peer certificate: UnknownIssuer",
            &TlsFacts::default(),
        )
        .unwrap();
        assert!(why.contains("ca_file"), "{why}");
        assert_eq!(
            tls::trouble("Connection refused (os error 111)", &none),
            None
        );
        let valid = TlsFacts {
            fingerprint: 0,
            client_cert: Some(("/c.pem".into(), i64::MAX)),
        };
        assert_eq!(tls::trouble("Broken pipe (os error 32)", &valid), None);
        let why = tls::trouble("received fatal alert: BadCertificate", &valid).unwrap();
        assert!(
            why.contains("Consul refused the client certificate /c.pem"),
            "{why}"
        );
    }

    #[test]
    fn addresses_get_a_scheme_and_bad_ones_are_named() {
        assert_eq!(
            base_url(&settings("localhost:8500")).unwrap(),
            "http://localhost:8500"
        );
        assert_eq!(
            base_url(&settings("https://c:8501/")).unwrap(),
            "https://c:8501"
        );
        let err = base_url(&settings("ftp://c:1")).unwrap_err();
        assert!(err.contains("ftp"), "{err}");
        assert!(base_url(&settings("c:1/path")).is_err());
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        assert!(!format!("{:?}", settings("x:1")).contains("s3cr3t"));
    }

    #[test]
    fn base64_round_trips() {
        for text in ["", "a", "ab", "abc", "abcd", "{\"x\": 1}"] {
            assert_eq!(
                base64_decode(&base64_encode(text.as_bytes())).unwrap(),
                text.as_bytes()
            );
        }
        assert_eq!(base64_encode(b"ready"), "cmVhZHk=");
    }

    #[test]
    fn decodes_base64_values() {
        assert_eq!(base64_decode("cmVhZHk=").unwrap(), b"ready");
        assert_eq!(base64_decode("YWN0aXZl").unwrap(), b"active");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a!==").is_none());
    }

    #[test]
    fn parses_kv_entries_including_folder_keys() {
        let body = br#"[{"LockIndex":1,"Key":"app/v1/n1","Flags":0,"Value":"cmVhZHk=","Session":"abc","CreateIndex":7,"ModifyIndex":9},
                        {"LockIndex":0,"Key":"app/v1/","Flags":0,"Value":null,"CreateIndex":5,"ModifyIndex":5}]"#;
        let entries = parse_entries(body).unwrap();
        assert_eq!(entries[0].value, b"ready");
        assert_eq!(entries[0].session.as_deref(), Some("abc"));
        assert_eq!(entries[1].value, b"");
        assert_eq!(entries[1].session, None);
    }

    #[test]
    fn encodes_only_what_must_be() {
        assert_eq!(encode_path("api/version/v1.0+b"), "api/version/v1.0%2Bb");
        assert_eq!(encode_path("a b?&"), "a%20b%3F%26");
    }

    #[test]
    fn a_rejected_transaction_says_why_each_operation_failed() {
        let body = br#"{"Results":null,"Errors":[
            {"OpIndex":0,"What":"failed to set key \"p/current\", index is stale"},
            {"OpIndex":1,"What":"key \"p/v1/\" doesn't exist"},
            {"OpIndex":2,"What":"Permission denied"},
            {"OpIndex":3,"What":"failed to lock key \"p/v1/n1\", lock is already held"},
            {"OpIndex":4,"What":"failed to lock key \"p/v1/n1\" due to lock delay"},
            {"OpIndex":5,"What":"invalid session \"abc\""},
            {"OpIndex":6,"What":"failed index check for key \"p/current\", current modify index 9 != 8"}],
            "Index":0}"#;
        let outcome = parse_txn_answer(body).unwrap();
        let conflicts: Vec<Conflict> = (0..7)
            .map(|op| outcome.failure_of(op).unwrap().conflict)
            .collect();
        assert_eq!(
            conflicts,
            [
                Conflict::Stale,
                Conflict::Missing,
                Conflict::Denied,
                Conflict::LockHeld,
                Conflict::LockDelay,
                Conflict::InvalidSession,
                Conflict::Stale
            ]
        );
    }

    #[test]
    fn a_committed_transaction_gives_the_new_indexes() {
        let body = br#"{"Results":[{"KV":{"LockIndex":0,"Key":"p/current","Flags":0,"Value":null,"CreateIndex":3,"ModifyIndex":12}},
            {"KV":{"LockIndex":0,"Key":"p/v2/","Flags":0,"Value":null,"CreateIndex":5,"ModifyIndex":12}}],"Errors":null}"#;
        let outcome = parse_txn_answer(body).unwrap();
        assert_eq!(outcome.index_of("p/current"), Some(12));
        assert_eq!(outcome.index_of("p/v2/"), Some(12));
        assert_eq!(outcome.index_of("p/v3/"), None);
    }

    #[test]
    fn blocking_reads_carry_index_wait_and_stale() {
        let read = Read::blocking(42, Duration::from_secs(300), Consistency::Stale);
        assert_eq!(
            read_params(read, "recurse"),
            "recurse&index=42&wait=300s&stale"
        );
        assert_eq!(read_params(Read::now(), ""), "");
        assert_eq!(
            read_params(Read::consistent(), "recurse"),
            "recurse&consistent"
        );
    }
}
