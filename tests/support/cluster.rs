//! A real 3-server Consul cluster on loopback: servers with data
//! directories of their own (a restart keeps the data), elections sped up
//! (`raft_multiplier = 1`, as Consul recommends for production), and verbs
//! to kill, restart and find the leader.
//!
//! Every server lifts the per-client connection limit (200): all test
//! agents connect from 127.0.0.1, where a fleet has one address per host.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{PATIENCE, conns_limit, consul_bin, die_with_parent, free_port};

pub struct Cluster {
    servers: Vec<Server>,
    pub data: tempfile::TempDir,
    agent: ureq::Agent,
}

struct Server {
    name: String,
    http: u16,
    serf_lan: u16,
    serf_wan: u16,
    rpc: u16,
    child: Mutex<Option<Child>>,
}

impl Cluster {
    /// Starts three servers and waits for a leader and three voters.
    pub fn start() -> Cluster {
        let data = tempfile::tempdir().unwrap();
        let servers: Vec<Server> = (1..=3)
            .map(|n| Server {
                name: format!("s{n}"),
                http: free_port(),
                serf_lan: free_port(),
                serf_wan: free_port(),
                rpc: free_port(),
                child: Mutex::new(None),
            })
            .collect();
        let cluster = Cluster {
            servers,
            data,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .new_agent(),
        };
        for i in 0..3 {
            cluster.launch(i);
        }
        cluster.wait_healthy();
        cluster
    }

    /// The HTTP address of server `i` (0..3).
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.servers[i].http)
    }

    pub fn addrs(&self) -> Vec<String> {
        (0..3).map(|i| self.addr(i)).collect()
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.data.path().join(&self.servers[i].name)
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.data_dir(i).join("consul.log")).unwrap_or_default()
    }

    fn launch(&self, i: usize) {
        let server = &self.servers[i];
        let dir = self.data_dir(i);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("consul.log"))
            .unwrap();
        let mut command = Command::new(consul_bin());
        command
            .args(["agent", "-server", "-bootstrap-expect", "3"])
            .args(["-node", &server.name, "-datacenter", "dc1"])
            .args(["-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .arg(format!("-data-dir={}", dir.join("data").display()))
            .arg(format!("-http-port={}", server.http))
            .arg(format!("-serf-lan-port={}", server.serf_lan))
            .arg(format!("-serf-wan-port={}", server.serf_wan))
            .arg(format!("-server-port={}", server.rpc))
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(["-hcl", "performance { raft_multiplier = 1 }"])
            .args([
                "-hcl",
                &format!("limits {{ http_max_conns_per_client = {} }}", conns_limit()),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        for (j, other) in self.servers.iter().enumerate() {
            if j != i {
                command.arg(format!("-retry-join=127.0.0.1:{}", other.serf_lan));
            }
        }
        die_with_parent(&mut command);
        *server.child.lock().unwrap() = Some(command.spawn().expect("cannot start consul"));
    }

    fn get(&self, i: usize, path: &str) -> Option<String> {
        let url = format!("http://{}/v1/{path}", self.addr(i));
        let mut response = self.agent.get(&url).call().ok()?;
        (response.status() == 200)
            .then(|| response.body_mut().read_to_string().ok())
            .flatten()
    }

    /// The index of the server that leads, as the servers that answer see it.
    pub fn leader(&self) -> Option<usize> {
        (0..3).filter(|i| self.is_up(*i)).find_map(|i| {
            let leader = self.get(i, "status/leader")?;
            let port: u16 = leader
                .trim()
                .trim_matches('"')
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            self.servers.iter().position(|s| s.rpc == port)
        })
    }

    /// How many voters the raft configuration has, as a live server sees it.
    fn voters(&self) -> usize {
        (0..3)
            .filter(|i| self.is_up(*i))
            .find_map(|i| {
                let text = self.get(i, "operator/raft/configuration")?;
                let config: serde_json::Value = serde_json::from_str(&text).ok()?;
                Some(
                    config["Servers"]
                        .as_array()?
                        .iter()
                        .filter(|s| s["Voter"] == true)
                        .count(),
                )
            })
            .unwrap_or(0)
    }

    /// Waits for a leader and three voters (a restarted server rejoins as a
    /// non-voter and is promoted later: killing another one before that
    /// can leave the cluster without a leader for long).
    pub fn wait_healthy(&self) {
        let start = Instant::now();
        while self.leader().is_none() || self.voters() < 3 {
            assert!(
                start.elapsed() < PATIENCE * 2,
                "the cluster did not become healthy: leader {:?}, {} voters\n{}",
                self.leader(),
                self.voters(),
                self.log(0)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for some leader (not necessarily three voters).
    pub fn wait_leader(&self) {
        let start = Instant::now();
        while self.leader().is_none() {
            assert!(start.elapsed() < PATIENCE * 2, "no leader was elected");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.servers[i].child.lock().unwrap().is_some()
    }

    /// Kills server `i` (SIGKILL).
    pub fn kill(&self, i: usize) {
        if let Some(mut child) = self.servers[i].child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the leader; returns which server it was.
    pub fn kill_leader(&self) -> usize {
        self.wait_leader();
        let leader = self.leader().unwrap();
        self.kill(leader);
        leader
    }

    /// Starts server `i` again, with its data.
    pub fn restart(&self, i: usize) {
        self.kill(i);
        self.launch(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}
