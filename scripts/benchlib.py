"""The pieces depro's benchmark harness is made of (see scripts/bench.py):
Consul dev agents and 3-server clusters on loopback, depro (and the Go
original's) agents as processes, and readings of /proc. Standard library only.
"""

import hashlib
import http.server
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import tarfile
import threading
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def free_port(host="127.0.0.1"):
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(what, condition, timeout=120.0, step=0.002):
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(step)


def median(values):
    return statistics.median(values) if values else float("nan")


def p95(values):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def ms(v):
    return f"{v * 1000:.1f}"


def raise_fd_limit():
    """Lets this process (and so its children) open as many files as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def lifted_conns_limit():
    """As many connections per client as the file descriptor limit allows."""
    return max(200, min(16384, raise_fd_limit() - 100))


class Consul:
    """A dev agent on free loopback ports, logging every HTTP request.

    `conns`: Consul's per-client HTTP connection limit. All agents here
    connect from 127.0.0.1, where a fleet has one address per host; `None`
    keeps Consul's default (200)."""

    def __init__(self, binary, work, conns="lifted", name="bench", server_args=None, port=None):
        self.binary = binary
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.work = work
        self.log_path = os.path.join(work, f"consul-{name}.log")
        self.log = open(self.log_path, "w")
        args = [binary, "agent", "-log-level=debug", "-node", name,
                "-bind", "127.0.0.1", "-client", "127.0.0.1",
                f"-http-port={self.port}", "-dns-port=-1", "-grpc-port=-1"]
        if conns == "lifted":
            conns = lifted_conns_limit()
        if conns is not None:
            args += ["-hcl", f"limits {{ http_max_conns_per_client = {conns} }}"]
        self.conns = conns or 200
        if server_args is None:
            args += ["-dev", f"-serf-lan-port={free_port()}", f"-serf-wan-port={free_port()}",
                     f"-server-port={free_port()}"]
        else:
            args += server_args
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        if server_args is None:
            self.wait_leader()

    def _leader(self):
        try:
            return urllib.request.urlopen(f"http://{self.addr}/v1/status/leader", timeout=1).read().decode()
        except OSError:
            return ""

    def wait_leader(self):
        wait_until("consul's leader", lambda: "127.0.0.1" in self._leader(), timeout=60, step=0.05)

    def call(self, method, path, body=None):
        req = urllib.request.Request(f"http://{self.addr}/v1/{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def put(self, key, value=""):
        self.call("PUT", f"kv/{key}", value.encode())

    def get(self, key):
        return self.call("GET", f"kv/{key}?raw")

    def txn(self, ops):
        self.call("PUT", "txn", json.dumps(ops).encode())

    def put_many(self, keys, value=""):
        """Writes many keys, 64 to a transaction."""
        import base64
        encoded = base64.b64encode(value.encode()).decode()
        for i in range(0, len(keys), 64):
            self.txn([{"KV": {"Verb": "set", "Key": k, "Value": encoded}} for k in keys[i:i + 64]])

    def add_versions(self, prefix, names):
        """Creates versions' folder keys as a tool other than the depro CLI
        would, then rings the prefix's doorbell with a new value (agents
        then read the tree whole; Consul ignores a write that changes
        nothing)."""
        self.put_many([f"{prefix}/{n}/" for n in names])
        self.put(f"{prefix}/.changed", f"changed by the benchmark at {time.time_ns()}")

    def cpu(self):
        return proc_times(self.proc.pid)[0]

    def log_offset(self):
        self.log.flush()
        return os.path.getsize(self.log_path)

    def requests_since(self, offset, prefixes=None):
        """Counts the HTTP requests Consul finished since a log offset, by
        kind. With `prefixes`, KV requests count only under them: agents
        stopped earlier leave blocking queries that finish up to their wait
        (a minute) later, and must not be counted against what follows."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        kinds = {}
        for method, url in re.findall(r"Request finished: method=(\w+) url=(\S+)", text):
            if prefixes and url.startswith("/v1/kv/") and \
                    not any(url.startswith(f"/v1/kv/{p}") for p in prefixes):
                continue
            kind = method + " " + classify(url)
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Cluster:
    """Three Consul servers on loopback (raft_multiplier 1, data dirs)."""

    def __init__(self, binary, work):
        ports = [{k: free_port() for k in ("http", "lan", "wan", "rpc")} for _ in range(3)]
        self.servers = []
        for i, p in enumerate(ports):
            data = os.path.join(work, f"s{i}")
            os.makedirs(data, exist_ok=True)
            args = ["-server", "-bootstrap-expect", "3", f"-data-dir={data}",
                    f"-serf-lan-port={p['lan']}", f"-serf-wan-port={p['wan']}",
                    f"-server-port={p['rpc']}", "-hcl", "performance { raft_multiplier = 1 }"]
            args += [f"-retry-join=127.0.0.1:{q['lan']}" for j, q in enumerate(ports) if j != i]
            self.servers.append(Consul(binary, work, name=f"s{i}", server_args=args, port=p["http"]))
        for s in self.servers:
            s.wait_leader()

        def voters():
            try:
                config = json.loads(self.servers[0].call("GET", "operator/raft/configuration") or "{}")
                return sum(1 for s in config.get("Servers", []) if s.get("Voter"))
            except OSError:
                return 0
        wait_until("three voters", lambda: voters() == 3, timeout=60, step=0.1)

    def stop(self):
        for s in self.servers:
            s.stop()


def classify(url):
    if url.startswith("/v1/session/renew"):
        return "session renew"
    if url.startswith("/v1/session/"):
        return "session other"
    if url.startswith("/v1/txn"):
        return "txn"
    if "index=" in url:
        return "blocking read"
    if url.startswith("/v1/kv/"):
        return "kv"
    return url.split("?")[0]


def registered(consul, name_prefix):
    """How many sessions of agents whose name starts with a prefix exist."""
    sessions = json.loads(consul.call("GET", "session/list") or "[]")
    return sum(1 for s in sessions if s.get("Name", "").startswith(name_prefix))


def proc_stat(pid):
    """(user, system, children's user, children's system) CPU seconds of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0, 0.0, 0.0
    return tuple(int(x) / TICK for x in fields[11:15])


def proc_split(pid):
    """(user, system) CPU seconds of a process itself."""
    return proc_stat(pid)[:2]


def proc_times(pid):
    """(own CPU seconds, reaped children's CPU seconds) of a process."""
    utime, stime, cutime, cstime = proc_stat(pid)
    return utime + stime, cutime + cstime


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def threads_sockets(pid):
    """(threads, open sockets) of a process."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    return threads, sockets


ALL_AGENTS = []


class CpuMeter:
    """Who spent CPU between two moments: the agents' hooks (their reaped
    children), the agents themselves, Consul, and this harness's own reaped
    children (the CLI)."""

    def __init__(self, consul, agents):
        self.consul, self.agents = consul, agents

    def now(self):
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"hooks_cpu": sum(proc_times(a.proc.pid)[1] for a in self.agents),
                "agents_cpu": sum(proc_times(a.proc.pid)[0] for a in self.agents),
                "consul_cpu": self.consul.cpu(),
                "cli_cpu": usage.ru_utime + usage.ru_stime}

    def since(self, before):
        now = self.now()
        return {k: now[k] - before[k] for k in now}


class Agent:
    """A depro agent (or, with `go=True`, the Go original's) as a process."""

    def __init__(self, depro, work, name, server, deployments, go=False, log_level="warn", extra=None):
        ALL_AGENTS.append(self)
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(os.path.join(self.dir, "conf"), mode=0o700, exist_ok=True)
        addr = server.addr if hasattr(server, "addr") else server
        # `extra`: more top-level fields (listen, zone, upload_limit).
        config = {"name": name, "server": addr, **(extra or {}), "deployments": deployments(self.dir)}
        with open(os.path.join(self.dir, "conf", "depro.json"), "w") as f:
            json.dump(config, f)
        self.log = open(os.path.join(self.dir, "agent.log"), "w")
        self.proc = subprocess.Popen([depro, "agent", f"-config-dir={self.dir}/conf"],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "DEPRO_LOG": log_level})

    def live(self, deployment="app"):
        try:
            return os.path.basename(os.readlink(os.path.join(self.dir, deployment, "live")))
        except OSError:
            return None

    def has_dir(self, version, deployment="app"):
        return os.path.isdir(os.path.join(self.dir, deployment, version))

    def cpu(self):
        return proc_times(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self):
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class CountingProxy:
    """A TCP proxy on loopback in front of `target` (host:port), counting
    the connections made through it, the HTTP requests sent (request lines
    from the client; those with `index=` are blocking queries) and the most
    requests in flight at once (sent, their response's status line not yet
    back). Plain HTTP/1.1, no pipelining assumed beyond what it counts."""

    REQUEST = re.compile(rb"(?:GET|PUT|POST|DELETE|HEAD) (/v1/[^ \r\n]*) HTTP/1\.[01]\r\n")
    RESPONSE = re.compile(rb"HTTP/1\.[01] \d{3} ")

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.lock = threading.Lock()
        self.connections = self.requests = self.blocking = self.in_flight = self.max_in_flight = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self):
        with self.lock:
            return {"connections": self.connections, "requests": self.requests, "blocking": self.blocking,
                    "max_in_flight": self.max_in_flight}

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self.lock:
                self.connections += 1
            state = {"pending": 0, "closed": False}  # this connection's requests in flight
            threading.Thread(target=self._pump, args=(client, upstream, True, state), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, state), daemon=True).start()

    def _pump(self, src, dst, requests, state):
        pattern = self.REQUEST if requests else self.RESPONSE
        tail = b""
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self.lock:  # a request left unanswered (a client gone) is in flight no more
                    if not state["closed"]:
                        self.in_flight -= state["pending"]
                        state["pending"], state["closed"] = 0, True
                for s in (dst, src):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            buf = tail + data
            found = [m for m in pattern.finditer(buf) if m.end() > len(tail)]  # not counted before
            tail = buf[-256:]
            if found:
                with self.lock:
                    if state["closed"]:
                        pass
                    elif requests:
                        state["pending"] += len(found)
                        self.requests += len(found)
                        self.blocking += sum(1 for m in found if b"index=" in m.group(1))
                        self.in_flight += len(found)
                        self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    else:
                        done = min(len(found), state["pending"])
                        state["pending"] -= done
                        self.in_flight -= done
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self.sock.close()


class Origin:
    """A build server on loopback: blobs held in memory, served as
    `/<name>.bin` (with `Range`) and `/<name>.sha256` (a `sha256sum -c`
    line for `build.bin`), all its connections together paced to `rate`
    bytes a second (one token bucket, no burst), every byte it sends
    counted."""

    CHUNK = 64 << 10

    def __init__(self, rate):
        self.rate = rate
        self.blobs = {}
        self.lock = threading.Lock()
        self.free_at = time.monotonic()  # when the bucket has the next chunk
        self.sent = 0
        self.requests = 0
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                origin.serve(self)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # a fleet connects at once (the default is 5)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name, size):
        """A new random blob; returns its SHA-256 (hex)."""
        blob = os.urandom(size)
        digest = hashlib.sha256(blob).hexdigest()
        self.blobs[name] = (blob, digest)
        return digest

    def url(self, name):
        return f"http://{self.addr}/{name}.bin"

    def take(self, n):
        """Waits until the bucket lets `n` more bytes out."""
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + n / self.rate
            until = self.free_at
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def serve(self, handler):
        name, _, kind = handler.path.lstrip("/").rpartition(".")
        with self.lock:
            self.requests += 1
        if name not in self.blobs or kind not in ("bin", "sha256"):
            handler.send_error(404)
            return
        blob, digest = self.blobs[name]
        if kind == "sha256":
            blob = f"{digest}  build.bin\n".encode()
        start, end = 0, len(blob)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range", ""))
        if match and kind == "bin":
            start = int(match.group(1))
            if match.group(2):
                end = min(end, int(match.group(2)) + 1)
            if start >= len(blob):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(blob)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(blob)}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(end - start))
        handler.end_headers()
        try:
            for at in range(start, end, self.CHUNK):
                chunk = blob[at:min(end, at + self.CHUNK)]
                self.take(len(chunk))
                handler.wfile.write(chunk)
                with self.lock:
                    self.sent += len(chunk)
        except OSError:
            pass  # the client went away: what it got is counted

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def stop_all(agents):
    for a in agents:
        a.stop()
    for a in agents:
        a.wait()


def app_deployment(prefix, artifact=None, rollout_first_line=None, shell="sh"):
    """A deployment whose deploy hook unpacks `artifact` (or does nothing),
    and whose rollout hook swaps a `live` symlink (with the variables the Go
    original sets too: it has no VERSION_PATH)."""
    def make(node_dir):
        rollout = ["ln -sfn \"$DEPLOYMENT_PATH/$VERSION\" \"$DEPLOYMENT_PATH/live.tmp\"",
                   "mv -T \"$DEPLOYMENT_PATH/live.tmp\" \"$DEPLOYMENT_PATH/live\""]
        if rollout_first_line:
            rollout.insert(0, rollout_first_line.replace("{dir}", node_dir))
        deploy = [f"tar xzf {artifact}"] if artifact else ["true"]
        return [{"id": "app", "path": os.path.join(node_dir, "app"), "prefix": prefix, "shell": shell,
                 "deploy": deploy, "rollout": rollout}]
    return make


def run_depro(depro, consul, *args, check=True):
    addr = consul.addr if hasattr(consul, "addr") else consul
    out = subprocess.run([depro, *args, f"-server={addr}"], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"bench: depro {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def make_artifact(work, files, kib):
    src = os.path.join(work, "artifact-src")
    os.makedirs(src, exist_ok=True)
    per = max(1, kib * 1024 // files)
    for i in range(files):
        with open(os.path.join(src, f"file{i}.txt"), "wb") as f:
            f.write(os.urandom(per // 2).hex().encode()[:per])
    path = os.path.join(work, "artifact.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=".")
    return path


def latency_while_busy(depro, consul, work, changes, tag="busy", hook_seconds=5, extra=None):
    """Reaction latency of one deployment while another deployment of the
    same agent runs a deploy hook: one agent, deployment `app` switched
    between two ready versions `changes` times, deployment `slow` deploying
    one version after another with a hook of `hook_seconds` all along.
    Returns the latencies (write of `current` → first line of the rollout
    hook), in seconds."""
    app_prefix, slow_prefix = f"{tag}-app/version", f"{tag}-slow/version"
    record = "echo $EPOCHREALTIME >> {dir}/starts"

    def deployments(node_dir):
        app = app_deployment(app_prefix, rollout_first_line=record, shell="bash")(node_dir)[0]
        slow = app_deployment(slow_prefix, shell="bash")(node_dir)[0]
        slow.update({"id": "slow", "path": os.path.join(node_dir, "slow"),
                     "deploy": [f"sleep {hook_seconds}"]})
        return [app, slow]

    name = f"agent-{tag}"
    agent = Agent(depro, work, name, consul, deployments, extra=extra)
    try:
        consul.add_versions(app_prefix, ["a", "b"])
        consul.put(f"{app_prefix}/current", "a")
        wait_until("the first rollout", lambda: agent.live() == "a")
        wait_until("b ready", lambda: consul.get(f"{app_prefix}/b/{name}") == "ready")
        starts = os.path.join(agent.dir, "starts")

        def lines():
            try:
                with open(starts) as f:
                    return [float(x) for x in f.read().split()]
            except OSError:
                return []

        # Keep the slow deployment busy: a new version whenever the last one
        # is done.
        slow_versions = [0]

        def keep_busy():
            last = f"s{slow_versions[0]}"
            if slow_versions[0] == 0 or consul.get(f"{slow_prefix}/{last}/{name}") in ("ready", "failed"):
                slow_versions[0] += 1
                consul.add_versions(slow_prefix, [f"s{slow_versions[0]}"])

        latencies = []
        for i in range(changes):
            keep_busy()
            time.sleep(0.2)  # the slow hook has started (or is running)
            target = "b" if i % 2 == 0 else "a"
            seen = len(lines())
            t_write = time.time()
            consul.put(f"{app_prefix}/current", target)
            wait_until("the rollout hook", lambda: len(lines()) > seen, timeout=hook_seconds * 4 + 60)
            wait_until("active", lambda: consul.get(f"{app_prefix}/{target}/{name}") == "active")
            latencies.append(lines()[seen] - t_write)
        return latencies
    finally:
        stop_all([agent])
