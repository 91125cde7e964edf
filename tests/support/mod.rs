//! The test bed: a real Consul agent on loopback, real `depro` agents as
//! child processes, and a small vocabulary to write tests as specs:
//!
//! ```ignore
//! let fleet = Fleet::start(3);
//! fleet.add_version("v1");
//! fleet.set_current("v1");
//! fleet.expect_active("v1");
//! ```
//!
//! Most tests share one Consul (started once per test binary) and get a
//! prefix of their own; tests that kill or restart Consul start their own.
//! Nothing is mocked. Waiting is always polling a condition, with a
//! deadline; on timeout the test fails with the agents' logs.
#![allow(dead_code)]

pub mod cluster;
pub mod proxy;
pub mod recorder;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a condition may take before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn depro_bin() -> &'static str {
    env!("CARGO_BIN_EXE_depro")
}

/// Finds a `consul` binary: `$CONSUL_BIN`, the one `scripts/get-consul.sh`
/// unpacks under `target/consul`, or `consul` on PATH.
pub fn consul_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CONSUL_BIN") {
        return PathBuf::from(path);
    }
    let fetched = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/consul/usr/bin/consul");
    if fetched.exists() {
        return fetched;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = Path::new(dir).join("consul");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "no consul binary found: run scripts/get-consul.sh (it unpacks one into target/consul), \
         put consul on PATH, or set CONSUL_BIN"
    );
}

/// Finds a free TCP port on loopback.
pub fn free_port() -> u16 {
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut used = USED.lock().unwrap();
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
}

/// As many HTTP connections per client as Consul's file descriptor limit
/// allows (it refuses to start otherwise), from `/proc/self/limits`.
pub(crate) fn conns_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024);
    soft.saturating_sub(100).clamp(200, 4096)
}

/// Makes a child die with the test process (SIGKILL when its parent
/// thread exits), so that no Consul or agent outlives a test run.
pub(crate) fn die_with_parent(command: &mut Command) {
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// Polls `condition` until it holds or PATIENCE runs out.
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    wait_for_within(PATIENCE, what, &mut condition, String::new)
}

pub fn wait_for_within(
    patience: Duration,
    what: &str,
    condition: &mut dyn FnMut() -> bool,
    diagnostics: impl Fn() -> String,
) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > patience {
            panic!(
                "timed out after {patience:?} waiting for {what}\n{}",
                diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- Consul

/// The harness's own HTTP client: statuses are answers, not errors.
fn http_client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

/// A Consul agent in dev mode on loopback ports of its own; or, made with
/// [`Consul::remote`], a client of servers the harness runs elsewhere (a
/// [`cluster::Cluster`]).
pub struct Consul {
    child: Mutex<Option<Child>>,
    pub http_port: u16,
    ports: [u16; 3],
    data: tempfile::TempDir,
    agent: ureq::Agent,
    /// The token the harness itself uses (the ACL master token, if any).
    pub token: Mutex<Option<String>>,
    /// For a remote Consul: the servers' addresses, tried in turn.
    remote: Vec<String>,
}

impl Consul {
    /// Starts a private Consul (for tests that kill or restart it).
    pub fn start() -> Consul {
        Consul::start_with("")
    }

    /// Starts a private Consul with extra agent configuration (HCL), e.g.
    /// ACLs or TLS. `{data}` in it is replaced by its data directory.
    pub fn start_with(extra_config: &str) -> Consul {
        Consul::start_configured(extra_config, false)
    }

    /// Starts a private Consul with its default limits, among them 200 HTTP
    /// connections per client address (the others lift it: all test agents
    /// share 127.0.0.1, where a fleet has one address per host).
    pub fn start_with_default_limits() -> Consul {
        Consul::start_configured("", true)
    }

    fn start_configured(extra_config: &str, default_limits: bool) -> Consul {
        let ports = [free_port(), free_port(), free_port()];
        let consul = Consul {
            child: Mutex::new(None),
            http_port: free_port(),
            ports,
            data: tempfile::tempdir().unwrap(),
            agent: http_client(),
            token: Mutex::new(None),
            remote: Vec::new(),
        };
        if !extra_config.is_empty() {
            let text = extra_config.replace("{data}", &consul.data.path().display().to_string());
            std::fs::write(consul.data.path().join("extra.hcl"), text).unwrap();
        }
        if default_limits {
            // Read by every launch, restarts included.
            std::fs::write(consul.data.path().join("default-limits"), "").unwrap();
        }
        consul.launch();
        consul
    }

    /// A client of servers that run elsewhere: every request goes to the
    /// first that answers, and writes are retried through elections.
    pub fn remote(addrs: Vec<String>) -> Consul {
        Consul {
            child: Mutex::new(None),
            http_port: 0,
            ports: [0; 3],
            data: tempfile::tempdir().unwrap(),
            agent: http_client(),
            token: Mutex::new(None),
            remote: addrs,
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The Consul shared by the tests of this test binary.
    pub fn shared() -> &'static Consul {
        static SHARED: OnceLock<Consul> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Spawned from a thread that never ends, so that the death
            // signal fires only when the whole test process exits.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                tx.send(Consul::start()).unwrap();
                loop {
                    std::thread::park();
                }
            });
            rx.recv().unwrap()
        })
    }

    fn launch(&self) {
        let [serf_lan, serf_wan, server] = self.ports;
        let log = std::fs::File::create(self.data.path().join("consul.log")).unwrap();
        let mut command = Command::new(consul_bin());
        command
            .args([
                "agent",
                "-dev",
                "-node",
                "dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(self.limits_args())
            .arg(format!("-http-port={}", self.http_port))
            .arg(format!("-serf-lan-port={serf_lan}"))
            .arg(format!("-serf-wan-port={serf_wan}"))
            .arg(format!("-server-port={server}"))
            .args(self.extra_config_args())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        die_with_parent(&mut command);
        *self.child.lock().unwrap() = Some(command.spawn().expect("cannot start consul"));
        let start = Instant::now();
        loop {
            let leader = self.raw("GET", "status/leader", None).map(|(_, body)| body);
            if leader.is_some_and(|b| b.contains("127.0.0.1")) {
                break;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "consul did not elect a leader: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// All test agents connect from 127.0.0.1, where a fleet has one
    /// address per host: the per-client connection limit (200) is lifted,
    /// unless made with [`Consul::start_with_default_limits`].
    fn limits_args(&self) -> Vec<String> {
        if self.data.path().join("default-limits").exists() {
            return Vec::new();
        }
        vec![
            "-hcl".into(),
            format!("limits {{ http_max_conns_per_client = {} }}", conns_limit()),
        ]
    }

    fn extra_config_args(&self) -> Vec<String> {
        let extra = self.data.path().join("extra.hcl");
        if extra.exists() {
            vec!["-config-file".into(), extra.display().to_string()]
        } else {
            Vec::new()
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("consul.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        match self.remote.first() {
            Some(first) => first.clone(),
            None => format!("127.0.0.1:{}", self.http_port),
        }
    }

    fn addresses(&self) -> Vec<String> {
        if self.remote.is_empty() {
            vec![self.addr()]
        } else {
            self.remote.clone()
        }
    }

    /// Kills Consul (SIGKILL). Its data is gone: it runs in dev mode.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Consul again on the same ports.
    pub fn restart(&self) {
        self.kill();
        self.launch();
    }

    fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Option<(u16, String)> {
        let mut last = None;
        for addr in self.addresses() {
            let url = format!("http://{addr}/v1/{path}");
            let mut request = ureq::http::Request::builder().method(method).uri(&url);
            if let Some(token) = self.token.lock().unwrap().as_ref() {
                request = request.header("X-Consul-Token", token);
            }
            let response = match body {
                Some(body) => self.agent.run(request.body(body.to_vec()).unwrap()),
                None => self.agent.run(request.body(()).unwrap()),
            };
            let mut response = match response {
                Ok(response) => response,
                Err(e) => {
                    eprintln!("{method} {url}: {e}");
                    continue;
                }
            };
            let status = response.status().as_u16();
            let Ok(text) = response.body_mut().read_to_string() else {
                continue;
            };
            if status < 500 {
                return Some((status, text));
            }
            last = Some((status, text));
        }
        last
    }

    /// A request that must succeed (200, or 404 for a read); with a remote
    /// cluster, retried while it has no leader.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> String {
        let start = Instant::now();
        loop {
            match self.raw(method, path, body) {
                Some((status, text)) if status == 200 || status == 404 => return text,
                other if !self.remote.is_empty() && start.elapsed() < PATIENCE => {
                    let _ = other;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some((status, text)) => panic!("{method} {path}: HTTP {status}: {text}"),
                None => panic!("{method} {path}: consul unreachable"),
            }
        }
    }

    pub fn put(&self, key: &str, value: &str) {
        assert_eq!(
            self.call("PUT", &format!("kv/{key}"), Some(value.as_bytes()))
                .trim(),
            "true"
        );
    }

    /// Rings the doorbell of `prefix` as a tool other than the depro CLI
    /// would after changing its versions: agents read the tree whole.
    pub fn ring(&self, prefix: &str) {
        // A new value each time: Consul ignores a write that changes nothing.
        static RINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let ring = RINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.put(
            &format!("{prefix}/.changed"),
            &format!("changed by the test harness ({ring}, {:?})", Instant::now()),
        );
    }

    /// Creates a version's folder key under `prefix` as another tool
    /// would, and rings the doorbell (see [`Consul::ring`]).
    pub fn add_version(&self, prefix: &str, version: &str) {
        self.put(&format!("{prefix}/{version}/"), "");
        self.ring(prefix);
    }

    pub fn delete(&self, key: &str) {
        self.call("DELETE", &format!("kv/{key}"), None);
    }

    /// Writes a key verbatim through the transaction API, which (unlike a
    /// plain PUT's URL path) keeps `..` segments: for hostile-key tests.
    pub fn put_verbatim(&self, key: &str, value: &str) {
        let body = serde_json::json!([{"KV": {"Verb": "set", "Key": key, "Value": base64(value)}}]);
        self.call("PUT", "txn", Some(body.to_string().as_bytes()));
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let (status, text) = self.raw("GET", &format!("kv/{key}?raw"), None)?;
        (status == 200).then_some(text)
    }

    /// Every key under `prefix` with its value and whether a session holds it.
    pub fn tree(&self, prefix: &str) -> BTreeMap<String, (String, bool)> {
        let text = self.call("GET", &format!("kv/{prefix}?recurse"), None);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        entries
            .into_iter()
            .map(|e| {
                let key = e["Key"].as_str().unwrap().to_string();
                let value = e["Value"].as_str().map(unbase64).unwrap_or_default();
                let held = e["Session"].as_str().is_some_and(|s| !s.is_empty());
                (key, (value, held))
            })
            .collect()
    }

    /// The sessions holding keys under `prefix`.
    pub fn sessions_under(&self, prefix: &str) -> std::collections::BTreeSet<String> {
        let text = self.call("GET", &format!("kv/{prefix}?recurse"), None);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        entries
            .iter()
            .filter_map(|e| e["Session"].as_str().map(String::from))
            .collect()
    }

    /// Destroys a session, as if it had expired.
    pub fn destroy_session(&self, id: &str) {
        self.call("PUT", &format!("session/destroy/{id}"), Some(b""));
    }

    /// The live sessions whose name is `depro agent <node>`.
    pub fn agent_sessions(&self, node: &str) -> Vec<String> {
        let text = self.call("GET", "session/list", None);
        let sessions: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        sessions
            .iter()
            .filter(|s| s["Name"].as_str() == Some(&format!("depro agent {node}")))
            .filter_map(|s| s["ID"].as_str().map(String::from))
            .collect()
    }

    /// Consul's raft index, as a read answers it.
    pub fn index(&self) -> u64 {
        let url = format!("http://{}/v1/kv/?keys&separator=/", self.addr());
        let mut request = ureq::http::Request::builder().method("GET").uri(&url);
        if let Some(token) = self.token.lock().unwrap().as_ref() {
            request = request.header("X-Consul-Token", token);
        }
        let response = self.agent.run(request.body(()).unwrap()).unwrap();
        response.headers()["X-Consul-Index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Writes `count` throw-away keys, so that Consul's index is far above
    /// what a fresh Consul starts from.
    pub fn pump_index(&self, count: usize) {
        for round in 0..count {
            // A new value each round: Consul skips writes that change nothing.
            self.put("pump/index", &round.to_string());
        }
    }

    /// A snapshot of Consul's whole state (`consul snapshot save`).
    pub fn snapshot(&self) -> Vec<u8> {
        let (status, body) = self.raw_bytes("GET", "snapshot", None).unwrap();
        assert_eq!(status, 200, "snapshot: {}", String::from_utf8_lossy(&body));
        body
    }

    /// Restores a snapshot (`consul snapshot restore`).
    pub fn restore(&self, snapshot: &[u8]) {
        let (status, body) = self.raw_bytes("PUT", "snapshot", Some(snapshot)).unwrap();
        assert_eq!(status, 200, "restore: {}", String::from_utf8_lossy(&body));
    }

    fn raw_bytes(&self, method: &str, path: &str, body: Option<&[u8]>) -> Option<(u16, Vec<u8>)> {
        let url = format!("http://{}/v1/{path}", self.addr());
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = self.token.lock().unwrap().as_ref() {
            request = request.header("X-Consul-Token", token);
        }
        let response = match body {
            Some(body) => self.agent.run(request.body(body.to_vec()).unwrap()),
            None => self.agent.run(request.body(()).unwrap()),
        };
        let mut response = response.ok()?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .ok()?;
        Some((status, bytes))
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn base64(text: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> String {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        bits = (bits << 6) | u32::from(v);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- agents

/// Hook lines the tests use: real but small work, plus switches a test can
/// flip per node through files in the node's directory (`fail-deploy`,
/// `block-deploy`, …). Each hook appends to `hooks.log` to record order.
pub fn default_deployment(id: &str, node_dir: &Path, prefix: &str) -> serde_json::Value {
    let path = node_dir.join(id);
    let ctl = node_dir.display().to_string();
    serde_json::json!({
        "id": id,
        "path": path,
        "prefix": prefix,
        "shell": "bash",
        "deploy": [
            format!("echo \"deploy $VERSION $PWD\" >> {ctl}/hooks.log"),
            format!("if [ -e {ctl}/slow ]; then sleep 0.2; fi"),
            format!("env > {ctl}/env-deploy-$VERSION"),
            format!("if [ -e {ctl}/fail-deploy ]; then echo 'deploy fails on purpose' >&2; exit 3; fi"),
            format!("if [ -e {ctl}/background-child ]; then sleep 600 & echo $! > {ctl}/child.pid; fi"),
            format!("if [ -e {ctl}/block-deploy ]; then echo $$ > {ctl}/hook.pid; touch partial; while [ ! -e {ctl}/release ] && [ -d {ctl} ]; do sleep 0.02; done; fi"),
            format!("if [ -e {ctl}/exec-sleep ]; then echo $$ > {ctl}/hook.pid; exec sleep 600; fi"),
            format!("if [ -e {ctl}/rm-state ]; then rm -rf \"$DEPLOYMENT_PATH/.depro\"; fi"),
            "echo \"$VERSION\" > version.txt",
            "tar czf app.tar.gz version.txt",
            format!("echo \"deployed $VERSION\" >> {ctl}/hooks.log"),
        ],
        "rollout": [
            format!("echo \"rollout $VERSION from=$PREVIOUS_VERSION\" >> {ctl}/hooks.log"),
            format!("if [ -e {ctl}/slow ]; then sleep 0.2; fi"),
            format!("if [ -e {ctl}/fail-rollout ] || [ -e {ctl}/fail-rollout-$VERSION ]; then exit 4; fi"),
            format!("if [ -e {ctl}/block-rollout ]; then echo $$ > {ctl}/rollout.pid; while [ ! -e {ctl}/release-rollout ] && [ -d {ctl} ]; do sleep 0.02; done; fi"),
            "test -f \"$VERSION_PATH/version.txt\"",
            "ln -sfn \"$VERSION_PATH\" \"$DEPLOYMENT_PATH/live.tmp\"",
            "mv -T \"$DEPLOYMENT_PATH/live.tmp\" \"$DEPLOYMENT_PATH/live\"",
            format!("if [ -e {ctl}/fill-disk ]; then dd if=/dev/zero of=\"$DEPLOYMENT_PATH/.filler\" bs=64k 2>/dev/null || true; fi"),
        ],
        "clean": [
            format!("echo \"clean $VERSION\" >> {ctl}/hooks.log"),
            format!("if [ -e {ctl}/slow ]; then sleep 0.2; fi"),
            format!("if [ -e {ctl}/block-clean ]; then echo $$ > {ctl}/clean.pid; while [ ! -e {ctl}/release-clean ] && [ -d {ctl} ]; do sleep 0.02; done; fi"),
        ],
    })
}

/// One `depro agent` process with a directory of its own.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub server: String,
    pub extra: serde_json::Value,
    pub deployments: Vec<serde_json::Value>,
    /// Extra environment variables for the agent process.
    pub env: Vec<(String, String)>,
    /// What runs the agent, if not this build's depro: a program and its
    /// first arguments (e.g. qemu-user and an ARM binary).
    pub program: Vec<String>,
    child: Option<Child>,
    starts: usize,
}

impl Agent {
    /// An agent with one deployment `api` on `prefix` (not started).
    pub fn new(root: &Path, name: &str, server: &str, prefix: &str) -> Agent {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        let deployment = default_deployment("api", &dir, prefix);
        Agent {
            name: name.to_string(),
            dir,
            server: server.to_string(),
            extra: serde_json::json!({}),
            deployments: vec![deployment],
            env: Vec::new(),
            program: Vec::new(),
            child: None,
            starts: 0,
        }
    }

    pub fn config(&self) -> serde_json::Value {
        let mut config = serde_json::json!({
            "name": self.name,
            "server": self.server,
            "session_ttl": "10s",
            "deployments": self.deployments,
        });
        for (k, v) in self.extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    pub fn write_config(&self) {
        std::fs::write(
            self.dir.join("conf/depro.json"),
            serde_json::to_string_pretty(&self.config()).unwrap(),
        )
        .unwrap();
    }

    pub fn start(&mut self) {
        self.write_config();
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = match &self.program[..] {
            [] => Command::new(depro_bin()),
            [program, args @ ..] => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
        };
        command
            .arg("agent")
            .arg(format!("-config-dir={}", self.dir.join("conf").display()))
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("CONSUL_HTTP_TOKEN")
            .env("DEPRO_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut command);
        self.child = Some(command.spawn().expect("cannot start depro agent"));
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn hooks_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("hooks.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent not running").id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Kills the agent with SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the agent to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let child = self.child.as_mut().expect("agent not running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if start.elapsed() > PATIENCE {
                panic!("agent {} did not exit\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Flips a switch file in the node's directory.
    pub fn set_flag(&self, flag: &str, on: bool) {
        let path = self.dir.join(flag);
        if on {
            std::fs::write(path, "").unwrap();
        } else {
            let _ = std::fs::remove_file(path);
        }
    }

    pub fn deployment_path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Where `live` points, as a version name.
    pub fn live(&self, id: &str) -> Option<String> {
        let target = std::fs::read_link(self.deployment_path(id).join("live")).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// The version directories present (excluding depro's own files).
    pub fn version_dirs(&self, id: &str) -> Vec<String> {
        let mut dirs: Vec<String> = std::fs::read_dir(self.deployment_path(id))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".depro")
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        dirs
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // A hook the agent was running survives it (it has a process group
        // of its own, on purpose); the agent records it, so end it here.
        for deployment in &self.deployments {
            let Some(path) = deployment["path"].as_str() else {
                continue;
            };
            let recorded = std::fs::read_to_string(Path::new(path).join(".depro/hook"));
            if let Ok(pgid) = recorded.unwrap_or_default().trim().parse::<i32>() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A small tmpfs mounted over a directory (needs root): a disk that fills up.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Writes a file until the disk is full (the file is depro's neighbour,
    /// not its business: its name can never be a version).
    pub fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.path.join(".filler").display()))
            .stderr(Stdio::null())
            .status();
    }

    pub fn free(&self) {
        let _ = std::fs::remove_file(self.path.join(".filler"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The pid a hook wrote to `path`, once it is all there (the file exists
/// before its line is written).
pub fn pid_written(path: &Path) -> i32 {
    let read = || {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()
    };
    wait_for(&format!("a pid in {}", path.display()), || read().is_some());
    read().unwrap()
}

/// Whether process `pid` is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Reads a pid a hook wrote into a file.
pub fn read_pid(path: &Path) -> i32 {
    pid_written(path)
}

// ---------------------------------------------------------------- fleets

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A prefix no other test uses.
pub fn unique_prefix(tag: &str) -> String {
    format!(
        "t{}-{}-{tag}/version",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Several agents following one prefix on one Consul.
pub struct Fleet<'c> {
    pub consul: &'c Consul,
    pub prefix: String,
    pub agents: Vec<Agent>,
    pub root: tempfile::TempDir,
}

impl<'c> Fleet<'c> {
    /// `n` agents (node1…noden) on the shared Consul, not started.
    pub fn new(n: usize) -> Fleet<'static> {
        Fleet::on(Consul::shared(), n)
    }

    pub fn on(consul: &'c Consul, n: usize) -> Fleet<'c> {
        Fleet::through(consul, &consul.addr(), n)
    }

    /// `n` agents spread over the servers of a cluster (`consul` is a
    /// remote client of the same cluster).
    pub fn spread(consul: &'c Consul, servers: &[String], n: usize) -> Fleet<'c> {
        let mut fleet = Fleet::through(consul, &servers[0], n);
        for (i, agent) in fleet.agents.iter_mut().enumerate() {
            agent.server = servers[i % servers.len()].clone();
        }
        fleet
    }

    /// `n` agents that reach `consul` at `server` (a proxy in front of it).
    pub fn through(consul: &'c Consul, server: &str, n: usize) -> Fleet<'c> {
        let root = tempfile::tempdir().unwrap();
        let prefix = unique_prefix("fleet");
        let agents = (1..=n)
            .map(|i| Agent::new(root.path(), &format!("node{i}"), server, &prefix))
            .collect();
        Fleet {
            consul,
            prefix,
            agents,
            root,
        }
    }

    /// `n` agents, started.
    pub fn start(n: usize) -> Fleet<'static> {
        let mut fleet = Fleet::new(n);
        fleet.start_all();
        fleet
    }

    pub fn start_all(&mut self) {
        for agent in &mut self.agents {
            agent.start();
        }
    }

    /// Adds and starts another agent.
    pub fn join(&mut self, name: &str) -> &mut Agent {
        let mut agent = Agent::new(self.root.path(), name, &self.consul.addr(), &self.prefix);
        agent.start();
        self.agents.push(agent);
        self.agents.last_mut().unwrap()
    }

    /// Creates a version's folder key as another tool would, then rings
    /// the doorbell (with a value that is not a depro ring: the agents then
    /// read the whole tree).
    pub fn add_version(&self, version: &str) {
        self.consul.put(&format!("{}/{version}/", self.prefix), "");
        self.consul.ring(&self.prefix);
    }

    pub fn remove_version(&self, version: &str) {
        self.consul.delete(&format!("{}/{version}/", self.prefix));
        self.consul.ring(&self.prefix);
    }

    pub fn set_current(&self, version: &str) {
        self.consul
            .put(&format!("{}/current", self.prefix), version);
    }

    /// The value of a node's key for a version, if the key exists.
    pub fn node_state(&self, version: &str, node: &str) -> Option<String> {
        self.consul
            .get(&format!("{}/{version}/{node}", self.prefix))
    }

    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "tree: {:#?}\n",
            self.consul.tree(&format!("{}/", self.prefix))
        );
        for agent in &self.agents {
            out.push_str(&format!("---- {} log:\n{}\n", agent.name, agent.log()));
            out.push_str(&format!(
                "---- {} hooks: {:?}\n",
                agent.name,
                agent.hooks_log()
            ));
        }
        out
    }

    /// Starts a recorder of this fleet's invariants; the tree is read from
    /// any of `servers`.
    pub fn record(&self, servers: &[String]) -> recorder::Recorder {
        let nodes = self
            .agents
            .iter()
            .map(|a| recorder::Node {
                name: a.name.clone(),
                deployment_path: a.deployment_path("api"),
                hooks_log: a.dir.join("hooks.log"),
            })
            .collect();
        let token = self.consul.token.lock().unwrap().clone();
        recorder::Recorder::start(
            self.root.path(),
            nodes,
            servers.to_vec(),
            &self.prefix,
            token,
        )
    }

    /// After the faults stop: within `patience`, every running agent runs
    /// the tree's current (key active, live link), no version outside the
    /// tree has a directory or key anywhere, and no stopped agent has a key.
    pub fn expect_converged(&mut self, patience: Duration) {
        let prefix = format!("{}/", self.prefix);
        let running: Vec<bool> = self.agents.iter_mut().map(|a| a.is_running()).collect();
        let mut last = String::new();
        let mut check = || -> bool {
            let tree = self.consul.tree(&prefix);
            let current = tree
                .get(&format!("{prefix}current"))
                .map(|(v, _)| v.clone());
            let versions: BTreeSet<String> = tree
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter_map(|rest| rest.strip_suffix('/'))
                .map(String::from)
                .collect();
            for (agent, running) in self.agents.iter().zip(&running) {
                // Node keys and failure reasons; the agent's announcement
                // (`.agents/<node>`) is checked apart.
                let mine: Vec<&String> = tree
                    .keys()
                    .filter(|k| k.ends_with(&format!("/{}", agent.name)))
                    .filter(|k| !k[prefix.len()..].starts_with('.'))
                    .collect();
                let announced = tree.contains_key(&format!("{prefix}.agents/{}", agent.name));
                if announced != *running {
                    last = format!(
                        "{} is {} but its announcement is {}",
                        agent.name,
                        if *running { "running" } else { "stopped" },
                        if announced { "there" } else { "missing" }
                    );
                    return false;
                }
                if !running {
                    if !mine.is_empty() {
                        last = format!("{} is stopped but has keys {mine:?}", agent.name);
                        return false;
                    }
                    continue;
                }
                if let Some(current) = &current {
                    let key = format!("{prefix}{current}/{}", agent.name);
                    if tree.get(&key).map(|(v, _)| v.as_str()) != Some("active")
                        || agent.live("api").as_deref() != Some(current)
                    {
                        last = format!(
                            "{} is not active on {current}: key {:?}, live {:?}",
                            agent.name,
                            tree.get(&key),
                            agent.live("api")
                        );
                        return false;
                    }
                }
                for dir in agent.version_dirs("api") {
                    if !versions.contains(&dir) && Some(&dir) != agent.live("api").as_ref() {
                        last = format!("{} still has {dir}, not in the tree", agent.name);
                        return false;
                    }
                }
                for key in mine {
                    let version = key[prefix.len()..].split('/').next().unwrap_or("");
                    if !versions.contains(version) {
                        last = format!("{key} remains for a removed version");
                        return false;
                    }
                }
            }
            true
        };
        let start = Instant::now();
        while !check() {
            if start.elapsed() > patience {
                panic!(
                    "not converged after {patience:?}: {last}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_within(
        &self,
        patience: Duration,
        what: &str,
        mut condition: impl FnMut(&Fleet) -> bool,
    ) {
        wait_for_within(patience, what, &mut || condition(self), || {
            self.diagnostics()
        });
    }

    pub fn wait(&self, what: &str, mut condition: impl FnMut(&Fleet) -> bool) {
        wait_for_within(PATIENCE, what, &mut || condition(self), || {
            self.diagnostics()
        });
    }

    /// Every agent reports `state` for `version` (held by its session).
    pub fn expect_state(&self, version: &str, state: &str) {
        let names: Vec<String> = self.agents.iter().map(|a| a.name.clone()).collect();
        self.wait(&format!("{version} {state} on {names:?}"), |f| {
            names
                .iter()
                .all(|n| f.node_state(version, n).as_deref() == Some(state))
        });
    }

    /// Every agent runs `version`: its key says active and `live` points at it.
    pub fn expect_active(&self, version: &str) {
        self.expect_state(version, "active");
        for agent in &self.agents {
            assert_eq!(
                agent.live("api").as_deref(),
                Some(version),
                "{}",
                agent.name
            );
        }
    }

    /// No agent has `version`: no key, no directory.
    pub fn expect_gone(&self, version: &str) {
        let names: Vec<String> = self.agents.iter().map(|a| a.name.clone()).collect();
        self.wait(&format!("{version} purged from {names:?}"), |f| {
            f.agents.iter().all(|a| {
                f.node_state(version, &a.name).is_none()
                    && !a.deployment_path("api").join(version).exists()
            })
        });
    }
}

// ---------------------------------------------------------------- the CLI

/// What a `depro` command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    /// The result: one line for the commands that follow a deploy.
    pub stdout: String,
    /// Progress lines, then the error if any.
    pub stderr: String,
    /// What a terminal shows: the progress (stderr), then the result.
    pub shown: String,
}

impl Output {
    pub fn of(out: std::process::Output) -> Output {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Output {
            code: out.status.code(),
            shown: format!("{stderr}{stdout}"),
            stdout,
            stderr,
        }
    }

    /// Asserts success and returns what a terminal shows (progress and result).
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "failed: {self:#?}");
        &self.shown
    }

    /// Asserts success and returns the result alone (stdout).
    pub fn result(&self) -> &str {
        assert_eq!(self.code, Some(0), "failed: {self:#?}");
        &self.stdout
    }

    /// The error: the last line of stderr (progress lines come before it).
    pub fn error(&self) -> &str {
        self.stderr.lines().last().unwrap_or("")
    }

    /// Asserts exit code `code` with a one-line error mentioning `needles`:
    /// the last line of stderr, and the only one that starts with `depro:`
    /// (the lines before it are progress).
    pub fn fails(&self, code: i32, needles: &[&str]) {
        assert_eq!(self.code, Some(code), "{self:#?}");
        let errors = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("depro:"))
            .count();
        assert_eq!(errors, 1, "not one error line: {self:#?}");
        let error = self.error();
        assert!(error.starts_with("depro:"), "not last: {self:#?}");
        for needle in needles {
            assert!(error.contains(needle), "{needle:?} missing: {self:#?}");
        }
    }
}

/// A progress line without the time since the command started
/// (`  1.2s node1: busy` → `node1: busy`).
pub fn without_elapsed(line: &str) -> &str {
    let trimmed = line.trim_start();
    match trimmed.split_once("s ") {
        Some((time, rest)) if time.parse::<f64>().is_ok() => rest,
        _ => line,
    }
}

/// A `depro` command against `server`, with no Consul settings inherited.
pub fn depro_command(server: &str, args: &[&str]) -> Command {
    let mut command = Command::new(depro_bin());
    command
        .args(args)
        .arg(format!("-server={server}"))
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("DEPRO_PREFIX")
        .stdin(Stdio::null());
    command
}

impl Fleet<'_> {
    /// Runs `depro <args> -prefix=<this fleet's prefix>` to its end.
    pub fn depro(&self, args: &[&str]) -> Output {
        Output::of(self.depro_command(args).output().unwrap())
    }

    pub fn depro_command(&self, args: &[&str]) -> Command {
        self.depro_via(&self.consul.addr(), args)
    }

    /// `depro <args> -prefix=…` against `server` (e.g. a proxy).
    pub fn depro_via(&self, server: &str, args: &[&str]) -> Command {
        let mut command = depro_command(server, args);
        command.arg(format!("-prefix={}", self.prefix));
        command
    }

    /// The session that holds `node`'s key for `version`.
    pub fn session_of(&self, version: &str, node: &str) -> Option<String> {
        let text = self
            .consul
            .call("GET", &format!("kv/{}/{version}/{node}", self.prefix), None);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).ok()?;
        entries.first()?["Session"].as_str().map(String::from)
    }

    /// A key's ModifyIndex, if it exists.
    pub fn modify_index(&self, key: &str) -> Option<u64> {
        let text = self.consul.call("GET", &format!("kv/{key}"), None);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).ok()?;
        entries.first()?["ModifyIndex"].as_u64()
    }

    /// `current` as stored.
    pub fn current(&self) -> Option<String> {
        self.consul.get(&format!("{}/current", self.prefix))
    }
}

/// A small, seedable random source for fault scenarios (the seed is
/// printed, and `DEPRO_SEED` replays a run).
pub struct Rng(u64);

impl Rng {
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("DEPRO_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: DEPRO_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A duration in 0..max.
    pub fn upto(&mut self, max: Duration) -> Duration {
        Duration::from_millis(self.next() % (max.as_millis() as u64).max(1))
    }
}

/// Starts a command with its output captured, to [`finish`] later.
pub fn spawn(mut command: Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Collects a spawned command's output.
pub fn finish(child: Child) -> Output {
    Output::of(child.wait_with_output().unwrap())
}
