#!/usr/bin/env python3
"""depro's benchmark harness (run it through scripts/bench.sh).

Against Consul agents it starts itself on loopback, with depro agents as
separate processes on this machine, it measures:

1. fleet scaling: for N agents on one dev Consul, the time from the start
   of `depro deploy V -nodes=N` until every node's `live` points at V and
   the command has exited, and of `depro remove V -wait` until every
   directory is gone; the hooks' CPU and the rest (coordination); the CPU
   of the agents, Consul and the CLI per deploy and per host; requests;
2. reaction latency: from the write of `current` to the start of the
   rollout hook, for a depro agent and for `consul watch`, same changes;
3. footprint: an agent's resident memory idle and over deploy/remove
   cycles, its idle CPU and requests, the binary's size;
4. versions: one agent with 2, 100 and 1,000 versions under its prefix:
   threads, sockets, memory, idle CPU, reaction latency;
5. 1,000 agents on this machine, with Consul's per-client connection limit
   set to what they are counted to use;
6. a 3-server cluster with the agents spread over the servers;
7. the server's cost of the requests agents make, against the number of
   keys under a prefix;
8. back-to-back deploys, against the Go original (`../shared/baselines/`)
   in the same run;
9. the seed's protocol spoken with plain KV writes (served through the
   scout) against the depro CLI, same fleet, N agents;
10. the CLI's commands on prefixes of 10k, 100k and 1M keys;
11. artifacts (issue 21): a random build from an origin throttled to a
    few MB/s, to N agents, three ways (the deploy hook downloads it, depro
    fetches it from the origin only, peers help): converged time and the
    origin's egress; with --artifact-origin-hosts K, peers again with
    -origin-hosts=K; then two zones, and the copies crossing between them;
12. `depro events -json` on a fleet of N agents deploying and removing
    versions: its requests to Consul (through a counting proxy), how many
    at once, and the lines it prints.

It writes docs/benchmarks.md, docs/fleet-scaling.svg and
docs/benchmarks.json. Only the standard library is used.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import (ALL_AGENTS, CORES, Agent, Cluster, Consul, CountingProxy, CpuMeter, Origin, app_deployment,
                      free_port, latency_while_busy, make_artifact, median, ms, p95, proc_split, proc_times, raise_fd_limit,
                      registered, rss_kib, run_depro, stop_all, threads_sockets, wait_until)

def fleet_scaling(depro, consul, work, artifact, sizes, rounds):
    """Section 1: N agents on one dev Consul; deploy and cleanup times, CPU by
    process kind, requests by kind."""
    results = []
    for n in sizes:
        prefix = f"bench{n}/version"
        agents = [Agent(depro, work, f"n{n}-{i}", consul, app_deployment(prefix, artifact)) for i in range(n)]
        wait_until(f"{n} agents registered", lambda: registered(consul, f"depro agent n{n}-") >= n, timeout=300, step=0.05)

        meter = CpuMeter(consul, agents)

        def measure(run, done, step=0.002):
            """Runs one operation; its wall time and who spent CPU on it."""
            offset, before = consul.log_offset(), meter.now()
            t0 = time.monotonic()
            run()
            wait_until("the fleet to converge", done, step=step)
            elapsed = time.monotonic() - t0
            time.sleep(0.3)  # let the last node-state wake-ups land in the log
            return {"t": elapsed, **meter.since(before), "requests": consul.requests_since(offset, [prefix])}

        deploys, removes = [], []
        previous = None
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            version = f"v{r}"
            sample = measure(
                lambda: run_depro(depro, consul, "deploy", version, f"-nodes={n}", f"-prefix={prefix}", "-timeout=60s"),
                lambda: all(a.live() == version for a in agents), step=0.005 if n < 200 else 0.02)
            if r > 0:
                deploys.append(sample)
            if previous is not None:
                sample = measure(
                    lambda: run_depro(depro, consul, "remove", previous, "-wait", f"-prefix={prefix}", "-timeout=60s"),
                    lambda: not any(a.has_dir(previous) for a in agents), step=0.005 if n < 200 else 0.02)
                if r > 1:
                    removes.append(sample)
            previous = version
        user = sum(proc_split(a.proc.pid)[0] for a in agents)
        system = sum(proc_split(a.proc.pid)[1] for a in agents)
        for a in agents:
            a.stop()
        for a in agents:
            a.wait()
        print(f"      agents' CPU over the whole run: user {user:.2f} s, system {system:.2f} s", flush=True)
        results.append({"n": n, "deploy": summarize(deploys), "remove": summarize(removes)})
        d, c = results[-1]["deploy"], results[-1]["remove"]
        print(f"N={n:4}: deploy {d['t']*1000:7.1f} ms (coordination {d['coord']*1000:6.1f} ms, "
              f"{d['requests']:6.0f} requests); remove {c['t']*1000:7.1f} ms "
              f"(coordination {c['coord']*1000:6.1f} ms, {c['requests']:6.0f} requests)", flush=True)
    return results


def summarize(samples):
    t = median([s["t"] for s in samples])
    hooks = median([s["hooks_cpu"] for s in samples])
    agents = median([s["agents_cpu"] for s in samples])
    consul_cpu = median([s["consul_cpu"] for s in samples])
    cli = median([s["cli_cpu"] for s in samples])
    # On one machine the hooks of all N hosts share CORES cores; on a fleet they
    # run in parallel on N machines. Their share of the wall time here is at
    # least their CPU time divided by the cores.
    coords = [max(0.0, s["t"] - s["hooks_cpu"] / CORES) for s in samples]
    totals = [sum(s["requests"].values()) for s in samples]
    kinds = {}
    for s in samples:
        for k, v in s["requests"].items():
            kinds[k] = kinds.get(k, 0) + v / len(samples)
    return {"t": t, "t_all": [s["t"] for s in samples], "hooks_cpu": hooks, "agents_cpu": agents,
            "consul_cpu": consul_cpu, "cli_cpu": cli,
            "coord": median(coords), "requests": median(totals), "kinds": kinds, "rounds": len(samples)}


def reaction_latency(depro, consul, work, artifact, changes):
    prefix = "latency/version"
    record = "echo $EPOCHREALTIME >> {dir}/starts"
    agent = Agent(depro, work, "latency", consul,
                  app_deployment(prefix, artifact, rollout_first_line=record, shell="bash"))
    consul.add_versions(prefix, ["a", "b"])
    consul.put(f"{prefix}/current", "a")
    wait_until("the latency agent's first rollout", lambda: agent.live() == "a")
    wait_until("b ready", lambda: consul.get(f"{prefix}/b/latency") == "ready")

    watch_dir = os.path.join(work, "watch")
    os.makedirs(watch_dir, exist_ok=True)
    handler = os.path.join(watch_dir, "handler.sh")
    with open(handler, "w") as f:
        f.write(f"#!/bin/bash\necho $EPOCHREALTIME >> {watch_dir}/starts\ncat > /dev/null\n")
    os.chmod(handler, 0o755)
    watch = subprocess.Popen([consul.binary, "watch", f"-http-addr={consul.addr}", "-type=key",
                              f"-key={prefix}/current", handler],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch_starts = os.path.join(watch_dir, "starts")
    agent_starts = os.path.join(agent.dir, "starts")
    wait_until("consul watch's first run", lambda: os.path.exists(watch_starts))

    def lines(path):
        try:
            with open(path) as f:
                return [float(x) for x in f.read().split()]
        except OSError:
            return []

    depro_lat, watch_lat = [], []
    for i in range(changes):
        target = "b" if i % 2 == 0 else "a"
        seen_agent, seen_watch = len(lines(agent_starts)), len(lines(watch_starts))
        time.sleep(0.05)  # a quiet moment between changes
        t_write = time.time()
        consul.put(f"{prefix}/current", target)
        wait_until("the rollout hook", lambda: len(lines(agent_starts)) > seen_agent)
        wait_until("the watch handler", lambda: len(lines(watch_starts)) > seen_watch)
        wait_until("active", lambda: consul.get(f"{prefix}/{target}/latency") == "active")
        depro_lat.append(lines(agent_starts)[seen_agent] - t_write)
        watch_lat.append(lines(watch_starts)[seen_watch] - t_write)
    rss_watch = rss_kib(watch.pid)
    watch.terminate()
    watch.wait()
    agent.stop()
    agent.wait()
    return {"depro": depro_lat, "watch": watch_lat, "watch_rss_kib": rss_watch}


def footprint(depro, consul, work, artifact, cycles, idle_seconds):
    prefixes = ["foot-a/version", "foot-b/version"]

    def deployments(node_dir):
        ds = []
        for i, prefix in enumerate(prefixes):
            d = app_deployment(prefix, artifact)(node_dir)[0]
            d["id"] = f"app{i}"
            d["path"] = os.path.join(node_dir, f"app{i}")
            ds.append(d)
        return ds

    agent = Agent(depro, work, "footprint", consul, deployments)
    for prefix in prefixes:
        consul.add_versions(prefix, ["v0"])
        consul.put(f"{prefix}/current", "v0")
    wait_until("both deployments live", lambda: agent.live("app0") == "v0" and agent.live("app1") == "v0")
    time.sleep(1)
    rss_idle = rss_kib(agent.proc.pid)

    offset = consul.log_offset()
    cpu0 = proc_times(agent.proc.pid)[0]
    time.sleep(idle_seconds)
    idle_cpu = proc_times(agent.proc.pid)[0] - cpu0
    idle_requests = consul.requests_since(offset, prefixes)

    prefix = prefixes[0]
    previous = "v0"
    rss_samples = []
    for i in range(1, cycles + 1):
        version = f"c{i}"
        run_depro(depro, consul, "deploy", version, f"-prefix={prefix}")
        run_depro(depro, consul, "remove", previous, "-wait", f"-prefix={prefix}")
        previous = version
        if i % 50 == 0:
            rss_samples.append((i, rss_kib(agent.proc.pid)))
    time.sleep(1)
    rss_after = rss_kib(agent.proc.pid)
    agent.stop()
    agent.wait()
    return {"rss_idle_kib": rss_idle, "rss_after_kib": rss_after, "rss_samples": rss_samples,
            "idle_seconds": idle_seconds, "idle_cpu": idle_cpu, "idle_requests": idle_requests,
            "cycles": cycles}


def svg_chart(results, path):
    """Deploy and cleanup time and their coordination parts vs N (log x)."""
    import math
    width, height, left, right, top, bottom = 720, 420, 70, 190, 30, 50
    ns = [r["n"] for r in results]
    series = [
        ("deploy, total", [r["deploy"]["t"] for r in results], "#1f77b4", ""),
        ("deploy, coordination", [r["deploy"]["coord"] for r in results], "#1f77b4", "6,4"),
        ("cleanup, total", [r["remove"]["t"] for r in results], "#d62728", ""),
        ("cleanup, coordination", [r["remove"]["coord"] for r in results], "#d62728", "6,4"),
    ]
    ymax = max(max(v) for _, v, _, _ in series) * 1.1 or 1
    xmin, xmax = math.log2(min(ns)), math.log2(max(ns)) or 1

    def x(n):
        return left + (math.log2(n) - xmin) / max(xmax - xmin, 1e-9) * (width - left - right)

    def y(v):
        return top + (1 - v / ymax) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">depro: time to deploy / clean up vs fleet size (median)</text>']
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v * 1000:.0f} ms</text>')
    for n in ns:
        out.append(f'<line x1="{x(n):.1f}" x2="{x(n):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x(n):.1f}" y="{height - bottom + 18}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">'
               f'agents (N, log scale)</text>')
    for i, (label, values, color, dash) in enumerate(series):
        points = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v in zip(ns, values))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/>')
        for n, v in zip(ns, values):
            out.append(f'<circle cx="{x(n):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"/>')
        ly = top + 20 + 22 * i
        out.append(f'<line x1="{width - right + 15}" x2="{width - right + 45}" y1="{ly}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{width - right + 52}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def versions_section(depro, consul, work, counts, idle_seconds, changes):
    """Section 4: one agent, `count` versions under its prefix."""
    results = []
    for count in counts:
        prefix = f"versions{count}/version"
        name = f"ver{count}"
        record = "echo $EPOCHREALTIME >> {dir}/starts"
        agent = Agent(depro, work, name, consul,
                      app_deployment(prefix, None, rollout_first_line=record, shell="bash"))
        names = [f"x{i}" for i in range(count)]
        consul.add_versions(prefix, names)
        consul.put(f"{prefix}/current", names[0])
        wait_until(f"{count} versions ready", lambda: consul.get(f"{prefix}/{names[-1]}/{name}") in ("ready", "active")
                   and agent.live() == names[0], timeout=900, step=0.05)
        time.sleep(1)
        pid = agent.proc.pid
        threads, sockets = threads_sockets(pid)
        rss = rss_kib(pid)
        cpu0, offset = proc_times(pid)[0], consul.log_offset()
        time.sleep(idle_seconds)
        idle_cpu = proc_times(pid)[0] - cpu0
        idle_requests = sum(consul.requests_since(offset, [prefix]).values())
        starts = os.path.join(agent.dir, "starts")

        def lines():
            try:
                with open(starts) as f:
                    return [float(x) for x in f.read().split()]
            except OSError:
                return []
        if count < 2:
            # Switching needs a second version: added after the footprint
            # was measured with one.
            names.append("x1")
            consul.add_versions(prefix, ["x1"])
            wait_until("x1 ready", lambda: consul.get(f"{prefix}/x1/{name}") == "ready", step=0.05)
        latencies = []
        for i in range(changes):
            target = names[1] if i % 2 == 0 else names[0]
            seen = len(lines())
            time.sleep(0.05)
            t_write = time.time()
            consul.put(f"{prefix}/current", target)
            wait_until("the rollout hook", lambda: len(lines()) > seen)
            wait_until("active", lambda: consul.get(f"{prefix}/{target}/{name}") == "active")
            latencies.append(lines()[seen] - t_write)
        agent.stop()
        agent.wait()
        row = {"count": count, "threads": threads, "sockets": sockets, "rss_kib": rss,
               "idle_seconds": idle_seconds, "idle_cpu": idle_cpu, "idle_requests": idle_requests,
               "latency": latencies}
        results.append(row)
        print(f"  {count:5} versions: {threads} threads, {sockets} sockets, {rss / 1024:.2f} MiB, "
              f"idle CPU {idle_cpu * 1000:.0f} ms/{idle_seconds} s, latency {ms(median(latencies))} ms", flush=True)
    return results


def many_agents(depro, consul_binary, work, n, rounds):
    """Section 5: n agents with trivial hooks, Consul's per-client limit set
    to what they use (counted on a probe agent first)."""
    raise_fd_limit()
    probe_consul = Consul(consul_binary, work, name="probe")
    probe = Agent(depro, work, "probe", probe_consul, app_deployment("probe/version"))
    wait_until("the probe registered", lambda: registered(probe_consul, "depro agent probe") >= 1, step=0.05)
    probe_consul.add_versions("probe/version", ["p1"])
    probe_consul.put("probe/version/current", "p1")
    wait_until("the probe live", lambda: probe.live() == "p1", step=0.02)
    time.sleep(1)
    per_agent = threads_sockets(probe.proc.pid)[1]
    probe.stop()
    probe.wait()
    probe_consul.stop()
    # What n hosts would use, each with its own limit: n × an agent's
    # connections, plus one each for the main loop's occasional extra one.
    limit = n * (per_agent + 1)
    consul = Consul(consul_binary, work, name="many", conns=limit)
    prefix = "many/version"
    start = time.monotonic()
    agents = [Agent(depro, work, f"k{i}", consul, app_deployment(prefix)) for i in range(n)]
    wait_until(f"{n} agents registered", lambda: registered(consul, "depro agent k") >= n, timeout=600, step=0.5)
    startup = time.monotonic() - start
    print(f"  {n} agents registered in {startup:.1f} s; {per_agent} sockets each, limit {limit}", flush=True)

    meter = CpuMeter(consul, agents)
    samples = []
    previous = None
    cleanups = []
    for r in range(rounds + 1):
        version = f"m{r}"
        offset, before = consul.log_offset(), meter.now()
        t0 = time.monotonic()
        run_depro(depro, consul, "deploy", version, f"-nodes={n}", f"-prefix={prefix}", "-timeout=300s")
        wait_until("every node live", lambda: all(a.live() == version for a in agents), timeout=300, step=0.05)
        elapsed = time.monotonic() - t0
        time.sleep(1)
        sample = {"t": elapsed, **meter.since(before), "requests": consul.requests_since(offset, [prefix])}
        if r > 0:
            samples.append(sample)
        print(f"  deploy {version}: {elapsed:.2f} s", flush=True)
        if previous is not None:
            t0 = time.monotonic()
            run_depro(depro, consul, "remove", previous, "-wait", f"-prefix={prefix}", "-timeout=300s")
            cleanups.append(time.monotonic() - t0)
        previous = version
    rss = median([rss_kib(a.proc.pid) for a in agents[:50]])
    threads, sockets = threads_sockets(agents[0].proc.pid)
    stop_all(agents)
    consul.stop()
    return {"n": n, "per_agent_sockets": per_agent, "limit": limit, "startup": startup,
            "deploy": summarize(samples), "cleanup": cleanups, "rss_kib": rss, "threads": threads,
            "sockets": sockets}


def ready_nodes(consul, prefix, version):
    """How many nodes report `version` ready (one recursive read)."""
    import base64
    text = consul.call("GET", f"kv/{prefix}/{version}/?recurse")
    entries = json.loads(text) if text else []
    return sum(1 for e in entries
               if e["Key"].count("/") == prefix.count("/") + 2 and not e["Key"].endswith("/")
               and base64.b64decode(e.get("Value") or "").decode() == "ready")


def plain_path(depro, consul_binary, work, sizes, rounds):
    """Section 9: the seed's protocol spoken by a client that is not depro
    (plain KV writes: the folder key, then `current` once every node is
    ready), against the depro CLI on the same fleet, for N agents: the time
    from the write to every node ready and to every node live, and what a
    version costs the server (requests and Consul CPU, per host). The scout
    rings the doorbell for the plain writes."""
    results = []
    for n in sizes:
        consul = Consul(consul_binary, work, name=f"plain{n}", conns=max(200, n * 8))
        prefix = f"plain{n}/version"
        agents = [Agent(depro, work, f"p{n}-{i}", consul, app_deployment(prefix)) for i in range(n)]
        wait_until(f"{n} agents registered", lambda: registered(consul, f"depro agent p{n}-") >= n,
                   timeout=600, step=0.1)
        wait_until("a scout", lambda: consul.get(f"{prefix}/.scout") is not None, timeout=60)
        meter = CpuMeter(consul, agents)
        step = 0.005 if n < 200 else 0.05
        samples = {"plain": [], "cli": []}
        for r in range(2 * rounds + 2):  # alternating; rounds 0 and 1 warm up
            version = f"v{r}"
            how = "plain" if r % 2 == 0 else "cli"
            offset, before = consul.log_offset(), meter.now()
            t0 = time.monotonic()
            if how == "plain":
                consul.put(f"{prefix}/{version}/")
                wait_until("every node ready", lambda: ready_nodes(consul, prefix, version) >= n,
                           timeout=120, step=max(step, 0.02))
                ready = time.monotonic() - t0
                consul.put(f"{prefix}/current", version)
            else:
                run_depro(depro, consul, "deploy", version, f"-nodes={n}", f"-prefix={prefix}",
                          "-no-rollout", "-timeout=120s")
                ready = time.monotonic() - t0
                run_depro(depro, consul, "rollout", version, f"-nodes={n}", f"-prefix={prefix}",
                          "-timeout=120s")
            wait_until("every node live", lambda: all(a.live() == version for a in agents),
                       timeout=120, step=step)
            live = time.monotonic() - t0
            time.sleep(0.5)
            spent = meter.since(before)
            requests = consul.requests_since(offset, [prefix])
            if r >= 2:
                samples[how].append({"ready": ready, "live": live, "consul_cpu": spent["consul_cpu"],
                                     "requests": sum(requests.values()), "kinds": requests})
            print(f"  N={n} {how} {version}: ready {ready:.2f} s, live {live:.2f} s, "
                  f"{sum(requests.values()) / n:.1f} requests per host", flush=True)
        stop_all(agents)
        consul.stop()
        row = {"n": n}
        for how, runs in samples.items():
            row[how] = {"ready": median([x["ready"] for x in runs]), "live": median([x["live"] for x in runs]),
                        "requests_per_host": median([x["requests"] for x in runs]) / n,
                        "consul_cpu_per_host": median([x["consul_cpu"] for x in runs]) / n}
        results.append(row)
    return results


def big_trees(depro, consul_binary, work, shapes):
    """Section 10: the CLI's commands on prefixes of many keys (hosts x
    versions: node keys held by one session, as agents' are), each timed
    once per shape: what an operator waits for on a big fleet."""
    import base64
    results = []
    for hosts, versions in shapes:
        consul = Consul(consul_binary, work, name=f"big{hosts}x{versions}")
        prefix = f"big{hosts}x{versions}/version"
        session = None
        for _ in range(100):
            try:
                session = json.loads(consul.call("PUT", "session/create", json.dumps(
                    {"Name": "bench", "TTL": "3600s", "LockDelay": "0s"}).encode()))["ID"]
                break
            except Exception:
                time.sleep(0.1)
        t0 = time.monotonic()
        ops = []
        for v in range(versions):
            ops.append({"KV": {"Verb": "set", "Key": f"{prefix}/v{v:03}/", "Value": ""}})
            if len(ops) == 64:
                consul.txn(ops)
                ops = []
            value = base64.b64encode(b"active" if v == versions - 1 else b"ready").decode()
            for h in range(hosts):
                ops.append({"KV": {"Verb": "lock", "Key": f"{prefix}/v{v:03}/web-{h:05}.rack1.dc1.example.internal",
                                   "Value": value, "Session": session}})
                if len(ops) == 64:
                    consul.txn(ops)
                    ops = []
        if ops:
            consul.txn(ops)
        consul.put(f"{prefix}/current", f"v{versions - 1:03}")
        filled = time.monotonic() - t0
        keys = hosts * versions
        print(f"  {keys} keys ({hosts} hosts x {versions} versions) written in {filled:.0f} s", flush=True)
        row = {"hosts": hosts, "versions": versions, "keys": keys, "commands": {}}
        commands = [
            ("status", ["status"]),
            ("status -json", ["status", "-json"]),
            ("status V", ["status", f"v{versions - 1:03}"]),
            ("history", ["history"]),
            ("prune -dry-run", ["prune", "-keep=3", "-dry-run"]),
            ("rollback -dry-run", ["rollback", "-dry-run"]),
            ("remove", ["remove", "v000"]),
        ]
        for label, args in commands:
            t = time.monotonic()
            out = run_depro(depro, consul, *args, f"-prefix={prefix}", check=False)
            took = time.monotonic() - t
            row["commands"][label] = {"seconds": took, "exit": out.returncode}
            print(f"    {label:18} {took:6.2f} s (exit {out.returncode})", flush=True)
        results.append(row)
        consul.stop()
    return results


def cluster_section(depro, consul_binary, work, artifact, sizes, rounds):
    """Section 6: a 3-server cluster, agents spread over the servers."""
    cluster = Cluster(consul_binary, work)
    results = []
    try:
        for n in sizes:
            prefix = f"cluster{n}/version"
            agents = [Agent(depro, work, f"c{n}-{i}", cluster.servers[i % 3], app_deployment(prefix, artifact))
                      for i in range(n)]
            wait_until(f"{n} agents registered", lambda: registered(cluster.servers[0], f"depro agent c{n}-") >= n,
                       timeout=300, step=0.1)
            times, server_cpu = [], [[] for _ in cluster.servers]
            for r in range(rounds + 1):
                version = f"v{r}"
                cpu0 = [s.cpu() for s in cluster.servers]
                t0 = time.monotonic()
                run_depro(depro, cluster.servers[0], "deploy", version, f"-nodes={n}", f"-prefix={prefix}",
                          "-timeout=120s")
                wait_until("every node live", lambda: all(a.live() == version for a in agents), step=0.01)
                elapsed = time.monotonic() - t0
                time.sleep(0.5)
                if r > 0:
                    times.append(elapsed)
                    for i, s in enumerate(cluster.servers):
                        server_cpu[i].append(s.cpu() - cpu0[i])
            stop_all(agents)
            leader = next((i for i, s in enumerate(cluster.servers)
                           if "127.0.0.1" in s._leader() and str(s.port) != ""), None)
            results.append({"n": n, "t": median(times), "server_cpu": [median(c) for c in server_cpu],
                            "leader": leader})
            print(f"  cluster N={n}: {median(times):.2f} s; servers' CPU "
                  + ", ".join(f"{median(c) * 1000:.0f} ms" for c in server_cpu), flush=True)
    finally:
        cluster.stop()
    return results


def server_cost(consul_binary, work, key_counts, samples):
    """Section 7: what the requests an agent makes cost the server, against
    the keys under the prefix (10 versions, the rest node keys)."""
    import urllib.request
    consul = Consul(consul_binary, work, name="cost")
    results = []

    def timed(url, count, method="GET", body=None):
        cpu0, t0 = consul.cpu(), time.monotonic()
        for _ in range(count):
            req = urllib.request.Request(url, data=body, method=method)
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
        return (time.monotonic() - t0) / count, (consul.cpu() - cpu0) / count
    try:
        for keys in key_counts:
            prefix = f"cost{keys}/version"
            nodes = keys // 10
            names = [f"{prefix}/v{v}/" for v in range(10)]
            names += [f"{prefix}/v{v}/n{i}" for v in range(10) for i in range(nodes)]
            consul.put_many(names, "ready")
            consul.put(f"{prefix}/current", "v0")
            base = f"http://{consul.addr}/v1"
            listing = timed(f"{base}/kv/{prefix}/?keys&separator=%2F&stale", samples)
            single = timed(f"{base}/kv/{prefix}/current?stale", samples)
            folders = json.dumps([{"KV": {"Verb": "get", "Key": f"{prefix}/v{v}/"}} for v in range(10)]).encode()
            txn = timed(f"{base}/txn?stale", samples, "PUT", folders)
            recurse = timed(f"{base}/kv/{prefix}/v0/?recurse&stale", max(5, samples // 10))
            # A blocking listing's answer after a node write: the wake-up.
            wakes = []
            for i in range(max(5, samples // 10)):
                with urllib.request.urlopen(f"{base}/kv/{prefix}/?keys&separator=%2F&stale", timeout=30) as r:
                    index = r.headers["X-Consul-Index"]
                result = {}

                def block():
                    with urllib.request.urlopen(f"{base}/kv/{prefix}/?keys&separator=%2F&stale&index={index}&wait=30s",
                                                timeout=60) as r:
                        r.read()
                    result["at"] = time.monotonic()
                waiter = threading.Thread(target=block)
                waiter.start()
                time.sleep(0.05)
                t_write = time.monotonic()
                consul.put(f"{prefix}/v0/n{i}", "active")
                waiter.join()
                wakes.append(result["at"] - t_write)
            results.append({"keys": len(names), "listing": listing, "single": single, "txn": txn,
                            "recurse_one_version": recurse, "wake": median(wakes)})
            print(f"  {len(names):6} keys: listing {listing[1] * 1e6:.0f} µs CPU, get {single[1] * 1e6:.0f} µs, "
                  f"txn of 10 gets {txn[1] * 1e6:.0f} µs, one version's recurse {recurse[1] * 1e6:.0f} µs", flush=True)
    finally:
        consul.stop()
    return results


def back_to_back(depro, go_binary, consul_binary, work, sizes, rounds, pause):
    """Section 8: deploys started as soon as the previous command returned,
    and with a pause before each, for depro and the Go original, converged
    measured on the hosts (their `live` links)."""
    results = []
    impls = [("depro", depro)] + ([("go", go_binary)] if go_binary else [])
    for impl, binary in impls:
        for n in sizes:
            consul = Consul(consul_binary, work, name=f"b2b-{impl}-{n}")
            prefix = f"b2b/version"
            # bash for both: the Go original's executor knows no other shell.
            agents = [Agent(binary, work, f"{impl}{n}-{i}", consul, app_deployment(prefix, shell="bash"),
                            go=impl == "go") for i in range(n)]
            done = {}
            stop = threading.Event()

            def monitor():
                # Records when each version was first live on every node.
                while not stop.is_set():
                    lives = {a.live() for a in agents}
                    if len(lives) == 1:
                        version = lives.pop()
                        if version and version not in done:
                            done[version] = time.monotonic()
                    time.sleep(0.0005)
            watcher = threading.Thread(target=monitor)
            watcher.start()

            def deploy(version):
                if impl == "depro":
                    return subprocess.run([binary, "deploy", version, f"-nodes={n}", f"-prefix={prefix}",
                                           f"-server={consul.addr}", "-timeout=30s"], capture_output=True)
                wait = os.path.join(work, f"wait-{n}.json")
                with open(wait, "w") as f:
                    json.dump({"wait": "30s", "server": consul.addr, "prefix": prefix}, f)
                return subprocess.run([binary, "deploy", f"-server={consul.addr}", f"-prefix={prefix}",
                                       f"-nodes={n}", f"-config={wait}", version], capture_output=True)
            # Warm up: every agent up and following.
            deploy("w0")
            try:
                wait_until(f"{impl} N={n} warm-up", lambda: "w0" in done, timeout=60, step=0.01)
            except SystemExit:
                pass
            row = {"impl": impl, "n": n}
            for mode in ("back-to-back", "spaced"):
                times, lost = [], 0
                for r in range(rounds):
                    version = f"{mode[0]}{r}"
                    if mode == "spaced":
                        time.sleep(pause)
                    t0 = time.monotonic()
                    deploy(version)
                    if mode == "spaced" or r == rounds - 1:
                        deadline = time.monotonic() + 30
                        while version not in done and time.monotonic() < deadline:
                            time.sleep(0.001)
                    started = t0
                    done.setdefault(f"start-{version}", started)
                # Converged times, measured from each command's start.
                for r in range(rounds):
                    version = f"{mode[0]}{r}"
                    if version in done:
                        times.append(done[version] - done[f"start-{version}"])
                    else:
                        lost += 1
                row[mode] = {"t": median(times), "all": times, "lost": lost}
            stop.set()
            watcher.join()
            stop_all(agents)
            consul.stop()
            results.append(row)
            print(f"  {impl:5} N={n:3}: back-to-back {ms(row['back-to-back']['t'])} ms "
                  f"(lost {row['back-to-back']['lost']}), spaced {ms(row['spaced']['t'])} ms "
                  f"(lost {row['spaced']['lost']})", flush=True)
    return results

# Section 11's three ways of getting a build onto the hosts.
WAYS = {"hook": "the deploy hook downloads it", "origin": "depro fetches it, from the origin only",
        "peers": "depro fetches it, peers helping"}


def events_section(depro, consul_binary, work, sizes, cycles):
    """Section 12: what `depro events -prefix=P -json` costs Consul while N
    agents deploy: its requests counted by a proxy between it and Consul
    (connections, requests, blocking queries, the most in flight at once),
    over `cycles` cycles of `deploy` (a new version, every node active) and
    `remove -wait` (the one before); and the lines it prints."""
    results = []
    for n in sizes:
        # Per-client limit as in section 9: N agents share one address here.
        consul = Consul(consul_binary, work, name=f"events{n}", conns=max(200, n * 8))
        prefix = f"ev{n}/version"
        agents = [Agent(depro, work, f"ev{n}-{i}", consul, app_deployment(prefix)) for i in range(n)]
        proxy = events = None
        try:
            wait_until(f"{n} agents registered", lambda: registered(consul, f"depro agent ev{n}-") >= n,
                       timeout=600, step=0.1)
            run_depro(depro, consul, "deploy", "e0", f"-nodes={n}", f"-prefix={prefix}", "-quiet")
            proxy = CountingProxy(consul.addr)
            events = subprocess.Popen([depro, "events", f"-prefix={prefix}", "-json", f"-server={proxy.addr}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            lines = []
            threading.Thread(target=lambda: [lines.append(x) for x in events.stdout], daemon=True).start()
            time.sleep(2)  # its first read, then a blocking query held
            start = proxy.counts()
            deploy_lines, remove_lines = [], []
            previous = "e0"
            t0 = time.monotonic()
            for i in range(1, cycles + 1):
                seen = len(lines)
                run_depro(depro, consul, "deploy", f"e{i}", f"-nodes={n}", f"-prefix={prefix}", "-quiet")
                time.sleep(1)  # the last state changes printed
                deploy_lines.append(len(lines) - seen)
                seen = len(lines)
                run_depro(depro, consul, "remove", previous, "-wait", f"-prefix={prefix}", "-quiet")
                time.sleep(1)
                remove_lines.append(len(lines) - seen)
                previous = f"e{i}"
            seconds = time.monotonic() - t0
            end = proxy.counts()
            row = {"n": n, "cycles": cycles, "seconds": seconds, "startup": start,
                   "requests": end["requests"] - start["requests"], "blocking": end["blocking"] - start["blocking"],
                   "connections": end["connections"], "max_in_flight": end["max_in_flight"],
                   "deploy_lines": deploy_lines, "remove_lines": remove_lines,
                   "running": events.poll() is None}
            results.append(row)
            print(f"  N={n:3}: {row['requests'] / cycles:.1f} requests per deploy + remove "
                  f"({row['blocking'] / cycles:.1f} blocking), {row['connections']} connection(s), at most "
                  f"{row['max_in_flight']} in flight; lines per deploy {median(deploy_lines):g}, "
                  f"per remove {median(remove_lines):g}", flush=True)
        finally:
            if events is not None and events.poll() is None:
                events.terminate()
                try:
                    events.wait(10)
                except subprocess.TimeoutExpired:
                    events.kill()
            if proxy is not None:
                proxy.close()
            stop_all(agents)
            consul.stop()
    return results


def artifact_sources(agent, offset, artifact_size):
    """Where an agent's fetch got its bytes from, read from its log past
    `offset` (the fetch helper's lines): {"source": "origin" or a peer's
    address (the last source before "verified"), "fallback": it went to
    the origin after waiting for peers, "dropped": peers it dropped}."""
    with open(os.path.join(agent.dir, "agent.log"), "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found = {"source": None, "fallback": 0, "dropped": []}
    for line in text.splitlines():
        peer = re.search(r"fetching from the peer http://([0-9.]+):\d+", line)
        if peer:
            found["source"] = peer.group(1)
        elif re.search(r"\] fetching http://", line):
            found["source"] = "origin"
        elif "fetching from the origin" in line:
            found["fallback"] += 1
        elif "dropped the peer" in line:
            found["dropped"].append(line.split("dropped the peer", 1)[1].strip())
    return found


def artifact_fleet(depro, consul_binary, work, origin, way, n, rounds, size, zones=1, tag=None, origin_hosts=0):
    """N agents that deploy a `size`-byte build one of three ways (`WAYS`);
    `rounds` deploys of a new random build each, after a warm-up with a
    small one: converged time, the origin's egress, where each host's copy
    came from. With `zones` = 2, peers in two zones (half each; their
    listen addresses 127.1.x.x and 127.2.x.x). With `origin_hosts`, the
    deploy passes `-origin-hosts=K` (else depro's default)."""
    tag = tag or f"{way[0]}{n}"
    prefix = f"art{tag}/version"
    # As in section 9: all agents connect from 127.0.0.1, where a fleet has
    # one address per host; the per-client limit allows them 8 each.
    consul = Consul(consul_binary, work, name=f"art{tag}", conns=max(200, n * 8))
    fetch = (f'curl -sf -o build.bin "http://{origin.addr}/$VERSION.bin"' if shutil.which("curl") else
             f'python3 -c \'import sys, urllib.request as u; u.urlretrieve(sys.argv[1], "build.bin")\' '
             f'"http://{origin.addr}/$VERSION.bin"')
    check = (f'curl -sf "http://{origin.addr}/$VERSION.sha256"' if shutil.which("curl") else
             f'python3 -c \'import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1]).read().decode())\' '
             f'"http://{origin.addr}/$VERSION.sha256"')
    deploy = [fetch, f"{check} | sha256sum -c --quiet"] if way == "hook" else ['ln -s "$ARTIFACT" build.bin']

    def deployments(node_dir):
        ds = app_deployment(prefix)(node_dir)
        ds[0]["deploy"] = deploy
        return ds

    agents, zone_of = [], {}
    for i in range(n):
        extra = {}
        if way == "peers":
            z = 1 + (i * zones // n)
            ip = f"127.{z}.{i // 250}.{i % 250 + 1}"
            extra = {"listen": f"{ip}:{free_port(ip)}"}
            if zones > 1:
                extra["zone"] = "ab"[z - 1]
                zone_of[ip] = "ab"[z - 1]
        agent = Agent(depro, work, f"art{tag}-{i}", consul, deployments, log_level="info", extra=extra)
        agent.zone = extra.get("zone", "a")
        agents.append(agent)
    try:
        wait_until(f"{n} agents registered", lambda: registered(consul, f"depro agent art{tag}-") >= n,
                   timeout=300, step=0.05)
        meter = CpuMeter(consul, agents)
        samples, previous = [], None
        for r in range(rounds + 1):  # round 0 warms up, with a small build, and is not counted
            version = f"{tag}r{r}"
            digest = origin.add(version, size if r > 0 else max(1, size // 20))
            args = [] if way == "hook" else [f"-artifact={origin.url(version)}", f"-sha256={digest}",
                                             f"-size={len(origin.blobs[version][0])}"]
            if origin_hosts:
                args.append(f"-origin-hosts={origin_hosts}")
            offsets = [os.path.getsize(os.path.join(a.dir, "agent.log")) for a in agents]
            sent, before = origin.sent, meter.now()
            t0 = time.monotonic()
            run_depro(depro, consul, "deploy", version, f"-nodes={n}", f"-prefix={prefix}", "-timeout=900s",
                      *args)
            wait_until("every node live", lambda: all(a.live() == version for a in agents), timeout=300, step=0.02)
            elapsed = time.monotonic() - t0
            time.sleep(0.5)
            egress = origin.sent - sent
            spent = meter.since(before)
            origin.blobs.pop(previous, None)
            if previous is not None:
                run_depro(depro, consul, "remove", previous, "-wait", f"-prefix={prefix}", "-timeout=120s")
            previous = version
            if r == 0:
                continue
            sample = {"t": elapsed, "egress": egress, "hooks_cpu": spent["hooks_cpu"],
                      "agents_cpu": spent["agents_cpu"]}
            if way != "hook":
                found = [artifact_sources(a, o, size) for a, o in zip(agents, offsets)]
                sample["from_origin"] = sum(1 for f in found if f["source"] == "origin")
                sample["fallbacks"] = sum(f["fallback"] for f in found)
                sample["dropped"] = [f"{a.name}: {x}" for a, f in zip(agents, found) for x in f["dropped"]]
                sample["unknown"] = sum(1 for f in found if f["source"] is None)
                if zones > 1:
                    # The origin counts as zone a's.
                    source_zone = [zone_of.get(f["source"], "a") for f in found]
                    sample["origin_hosts"] = "".join(sorted(a.zone for a, f in zip(agents, found)
                                                            if f["source"] == "origin"))
                    sample["crossing"] = sum(1 for a, z in zip(agents, source_zone) if a.zone != z)
                    sample["crossing_from_origin"] = sum(1 for a, f in zip(agents, found)
                                                         if f["source"] == "origin" and a.zone != "a")
            samples.append(sample)
            print(f"  {way:6} N={n:3}{' (2 zones)' if zones > 1 else ''}"
                  f"{f' (-origin-hosts={origin_hosts})' if origin_hosts else ''}: converged {elapsed:6.2f} s, origin "
                  f"sent {egress / size:5.2f} copies" + (f", {sample['from_origin']} hosts from the origin, "
                  f"{sample['fallbacks']} after waiting, {len(sample['dropped'])} peers dropped"
                  if way != "hook" else "") + (f", {sample['crossing']} copies crossed (origin hosts in zones "
                  f"{sample['origin_hosts']})" if zones > 1 else ""), flush=True)
    finally:
        stop_all(agents)
        consul.stop()
        for a in agents:
            shutil.rmtree(os.path.join(a.dir, "app"), ignore_errors=True)
    row = {"way": way, "n": n, "zones": zones, "origin_hosts": origin_hosts, "t": median([x["t"] for x in samples]),
           "t_all": [x["t"] for x in samples], "egress": median([x["egress"] for x in samples]),
           "egress_all": [x["egress"] for x in samples],
           "cpu": median([x["hooks_cpu"] + x["agents_cpu"] for x in samples]), "samples": samples}
    return row


def artifacts_section(depro, consul_binary, work, sizes, mb, mbps, rounds, zone_fleet, origin_hosts=0,
                      origin_hosts_sizes=()):
    """Section 11 (issue 21): a throttled origin, a random build, N agents,
    three ways (`WAYS`); then, with `origin_hosts`, peers deploying with
    `-origin-hosts=K` at `origin_hosts_sizes`; then two zones."""
    size, rate = int(mb * 1e6), mbps * 1e6
    origin = Origin(rate)
    results = {"size": size, "rate": rate, "rounds": rounds, "runs": [], "zones": None, "origin_hosts_runs": []}
    try:
        for way in WAYS:
            for n in sizes:
                results["runs"].append(artifact_fleet(depro, consul_binary, work, origin, way, n, rounds, size))
        for n in (origin_hosts_sizes if origin_hosts else ()):
            results["origin_hosts_runs"].append(artifact_fleet(depro, consul_binary, work, origin, "peers", n, rounds,
                                                               size, tag=f"o{origin_hosts}x{n}",
                                                               origin_hosts=origin_hosts))
        if zone_fleet:
            results["zones"] = artifact_fleet(depro, consul_binary, work, origin, "peers", zone_fleet,
                                              max(rounds, 3), size, zones=2, tag=f"z{zone_fleet}")
    finally:
        origin.stop()
    return results


def machine():
    """This machine, as the report names it."""
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.release()}, {CORES} cores ({cpu_model}), {mem_gib:.0f} GiB"


def measured_apart(d, part):
    """The line that says a section comes from a run of its own (merged in
    with `--merge`), or nothing when it was measured in this run."""
    run = d.get("runs", {}).get(part)
    if not run:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run["started"]))
    return f"Measured in a run of its own: `{run['command_line']}`, {when}, binary {run['binary_size']} bytes.\n"


def report(args, d, path):
    started = d["started"]
    fleet, latency, foot = d.get("fleet"), d.get("latency"), d.get("footprint")
    lines = []
    w = lines.append
    targets = []  # (name, wanted, measured, met)
    w("# depro benchmarks\n")
    w("Generated by the harness; do not edit by hand. Figures are medians unless said otherwise; "
      "these machines are shared and noisy, so compare ratios within one run, not across runs.\n")
    w(f"- Command: `{args.command_line}`")
    w(f"- Machine: {d.get('machine') or machine()}")
    w(f"- Consul: {d.get('consul_version', '?')} on loopback; depro binary: `{os.path.relpath(d['depro'])}` "
      f"({d['binary_size']} bytes)")
    w(f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; run time "
      f"{d.get('run_minutes', 0):.1f} min\n")

    if fleet:
        w("## 1. Fleet scaling\n")
        w(f"N agents on this machine against one dev Consul, each with its own directory; hooks do real but "
          f"small work: the deploy hook extracts a {args.artifact_kib} KiB tarball of {args.artifact_files} files, "
          f"the rollout hook swaps a `live` symlink (shell: `sh`). Deploy: from the start of "
          f"`depro deploy V -nodes=N` until every node's `live` points at V and the command has exited (it exits "
          f"only once every node reports `active`). Cleanup: `depro remove V -wait` until every directory is gone. "
          f"{args.rounds} rounds per N after one warm-up round.\n")
        w("The hooks of all N hosts share this machine's cores, while on a real fleet they run in parallel on N "
          "machines, so each time is split: **coordination** = total − (hooks' CPU time summed over the N "
          f"hosts) / {CORES} cores.\n")
        w("| N | deploy total ms | hooks CPU ms (sum) | deploy coordination ms | cleanup total ms | "
          "cleanup coordination ms | requests per deploy | requests per deploy per host |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in fleet:
            dd, c = r["deploy"], r["remove"]
            w(f"| {r['n']} | {ms(dd['t'])} | {ms(dd['hooks_cpu'])} | {ms(dd['coord'])} | {ms(c['t'])} | "
              f"{ms(c['coord'])} | {dd['requests']:.0f} | {dd['requests'] / r['n']:.1f} |")
        w("")
        w("![deploy and cleanup time vs N](fleet-scaling.svg)\n")
        w(f"Where the CPU went per deploy (summed over processes; {CORES} cores), and per host:\n")
        w("| N | hooks ms | agents ms | Consul ms | CLI ms | ÷ cores ms | wall ms | **Consul ms per host** | "
          "**agent ms per host** |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in fleet:
            dd = r["deploy"]
            total = dd["hooks_cpu"] + dd["agents_cpu"] + dd["consul_cpu"] + dd["cli_cpu"]
            w(f"| {r['n']} | {ms(dd['hooks_cpu'])} | {ms(dd['agents_cpu'])} | {ms(dd['consul_cpu'])} | "
              f"{ms(dd['cli_cpu'])} | {ms(total / CORES)} | {ms(dd['t'])} | {ms(dd['consul_cpu'] / r['n'])} | "
              f"{ms(dd['agents_cpu'] / r['n'])} |")
        w("")
        w("Consul requests per deploy, by kind (mean over the rounds, all agents and the CLI together):\n")
        kinds = sorted({k for r in fleet for k in r["deploy"]["kinds"]})
        w("| N | " + " | ".join(kinds) + " |")
        w("|---:|" + "---:|" * len(kinds))
        for r in fleet:
            w(f"| {r['n']} | " + " | ".join(f"{r['deploy']['kinds'].get(k, 0):.0f}" for k in kinds) + " |")
        w("")
        by_n = {r["n"]: r for r in fleet}
        if 128 in by_n:
            big = by_n[128]
            targets.append(("deploy converged at N=128", "≤ 2.0 s", f"{big['deploy']['t']:.2f} s",
                            big["deploy"]["t"] <= 2.0))
            targets.append(("deploy coordination at N=128", "≤ 0.5 s", f"{big['deploy']['coord']:.2f} s",
                            big["deploy"]["coord"] <= 0.5))
        ends = [n for n in (16, 256) if n in by_n]
        if len(ends) == 2:
            a, b = by_n[16], by_n[256]
            for label, key in (("Consul", "consul_cpu"), ("agents'", "agents_cpu")):
                ra = a["deploy"][key] / 16
                rb = b["deploy"][key] / 256
                growth = rb / ra if ra > 0 else float("nan")
                targets.append((f"{label} CPU per deploy per host, N=16 → 256", "flat within ×1.3",
                                f"{ms(ra)} → {ms(rb)} ms (×{growth:.2f})", growth <= 1.3))

    if latency:
        w("## 2. Reaction latency\n")
        w(f"From just before the HTTP write of `current` to the first line of the rollout hook (bash, "
          f"`echo $EPOCHREALTIME`), over {len(latency['depro'])} changes alternating between two deployed "
          f"versions. In the same run, on the same key changes, `consul watch -type=key` ran an equivalent "
          f"bash handler.\n")
        w("| watcher | median ms | p95 ms | min ms | max ms |")
        w("|---|---:|---:|---:|---:|")
        for label, key in (("depro agent", "depro"), ("consul watch", "watch")):
            v = latency[key]
            w(f"| {label} | {ms(median(v))} | {ms(p95(v))} | {ms(min(v))} | {ms(max(v))} |")
        if latency.get("busy"):
            v = latency["busy"]
            w(f"| depro agent, rollout while another deployment's deploy hook runs (5 s hooks, "
              f"{len(v)} changes) | {ms(median(v))} | {ms(p95(v))} | {ms(min(v))} | {ms(max(v))} |")
        lat = median(latency["depro"])
        w("")
        if latency.get("busy"):
            busy = median(latency["busy"])
            targets.append(("reaction latency while another deployment's 5 s hook runs", "≤ 100 ms",
                            f"{ms(busy)} ms", busy <= 0.1))
        targets.append(("reaction latency, median", "below consul watch",
                        f"{ms(lat)} ms (consul watch {ms(median(latency['watch']))} ms)",
                        lat < median(latency["watch"])))

    if foot:
        w("## 3. Footprint\n")
        reqs = foot["idle_requests"]
        per_min = sum(reqs.values()) * 60 / foot["idle_seconds"]
        w("| measure | value |")
        w("|---|---:|")
        w(f"| agent resident memory, idle, 2 deployments | {foot['rss_idle_kib'] / 1024:.2f} MiB |")
        w(f"| after {foot['cycles']} deploy/remove cycles | {foot['rss_after_kib'] / 1024:.2f} MiB |")
        w("| during the cycles (every 50) | " + ", ".join(f"{kib / 1024:.2f}" for _, kib in foot["rss_samples"])
          + " MiB |")
        w(f"| CPU time over {foot['idle_seconds']} idle seconds | {foot['idle_cpu'] * 1000:.0f} ms |")
        w(f"| Consul requests per idle minute | {per_min:.1f} "
          f"({', '.join(f'{k}: {v}' for k, v in sorted(reqs.items())) or 'none'} in {foot['idle_seconds']} s) |")
        w(f"| binary size of the benchmarked build (stripped) | {d['binary_size'] / 1e6:.2f} MB |")
        for target, size in sorted(d.get("binary_sizes", {}).items()):
            w(f"| binary size, {target} (stripped, static; dist/ when this report was written) "
              f"| {size / 1e6:.2f} MB ({size} bytes) |")
        w("")
        targets.append(("idle resident memory", "≤ 5 MiB", f"{foot['rss_idle_kib'] / 1024:.2f} MiB",
                        foot["rss_idle_kib"] <= 5 * 1024))

    versions = d.get("versions")
    if versions:
        w("## 4. Versions under the prefix\n")
        w("One agent, one deployment, trivial hooks; all versions deployed, then threads, sockets and memory "
          "read, an idle spell, and a series of switches of `current` between two versions (with one version, "
          "a second one is added for the switches, after the rest was measured). Latency: from the write of "
          "`current` to the start of the rollout hook.\n")
        w("| versions | threads | sockets | resident MiB | CPU ms per idle minute | requests per idle minute | "
          "reaction latency ms |")
        w("|---:|---:|---:|---:|---:|---:|---:|")
        for r in versions:
            per_min = 60 / r["idle_seconds"]
            w(f"| {r['count']} | {r['threads']} | {r['sockets']} | {r['rss_kib'] / 1024:.2f} | "
              f"{r['idle_cpu'] * 1000 * per_min:.0f} | {r['idle_requests'] * per_min:.1f} | "
              f"{ms(median(r['latency']))} |")
        w("")
        a, b = versions[0], versions[-1]
        targets.append((f"threads and sockets, {a['count']} → {b['count']} versions", "flat",
                        f"{a['threads']}/{a['sockets']} → {b['threads']}/{b['sockets']}",
                        b["threads"] <= a["threads"] and b["sockets"] <= a["sockets"] + 1))
        targets.append((f"resident memory, {a['count']} → {b['count']} versions", "flat within ×1.3",
                        f"{a['rss_kib'] / 1024:.2f} → {b['rss_kib'] / 1024:.2f} MiB",
                        b["rss_kib"] <= 1.3 * a["rss_kib"]))
        la, lb = median(a["latency"]), median(b["latency"])
        targets.append((f"reaction latency, {a['count']} → {b['count']} versions", "flat within ×1.3",
                        f"{ms(la)} → {ms(lb)} ms", lb <= 1.3 * la))
        ia, ib = (r["idle_cpu"] * 60 / r["idle_seconds"] for r in (a, b))
        targets.append((f"idle CPU, {a['count']} → {b['count']} versions", "flat (within 10 ms a minute)",
                        f"{ia * 1000:.0f} → {ib * 1000:.0f} ms a minute", ib <= ia + 0.010))

    many = d.get("many")
    if many:
        dd = many["deploy"]
        n = many["n"]
        w(f"## 5. {n} agents on this machine\n")
        w(f"{n} depro agent processes, trivial hooks (`true`, and a symlink swap), one dev Consul whose "
          f"per-client connection limit is set to what they use: a probe agent kept {many['per_agent_sockets']} "
          f"sockets open, so the limit is {n} × ({many['per_agent_sockets']} + 1) = {many['limit']} (on a fleet "
          f"each host is its own client, under Consul's default of 200). The harness raises its open-files limit "
          f"to the hard limit; the agents inherit it. All {n} registered in {many['startup']:.0f} s.\n")
        w("| measure | value |")
        w("|---|---:|")
        w(f"| deploy converged (median of {dd['rounds']}) | {dd['t']:.2f} s |")
        w(f"| hooks CPU (sum) | {dd['hooks_cpu']:.2f} s |")
        w(f"| agents CPU (sum) | {dd['agents_cpu']:.2f} s ({ms(dd['agents_cpu'] / n)} ms per host) |")
        w(f"| Consul CPU | {dd['consul_cpu']:.2f} s ({ms(dd['consul_cpu'] / n)} ms per host) |")
        w(f"| CLI CPU | {dd['cli_cpu']:.2f} s |")
        w(f"| requests per deploy | {dd['requests']:.0f} ({dd['requests'] / n:.1f} per host) |")
        w(f"| cleanup (`remove -wait`), median | {median(many['cleanup']):.2f} s |")
        w(f"| one agent: threads, sockets; resident memory (median of 50) | {many['threads']}, "
          f"{many['sockets']}; {many['rss_kib'] / 1024:.2f} MiB |")
        w("")
        w("Requests by kind per deploy: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(dd["kinds"].items()))
          + ".\n")
        targets.append((f"deploy converged on {n} agents", "≤ 5 s", f"{dd['t']:.2f} s", dd["t"] <= 5))
        if fleet:
            by_n = {r["n"]: r for r in fleet}
            if 128 in by_n:
                ref = by_n[128]["deploy"]
                for label, key in (("Consul", "consul_cpu"), ("agents'", "agents_cpu")):
                    a, b = ref[key] / 128, dd[key] / n
                    targets.append((f"{label} CPU per host, N={n} vs N=128", "equal (within ×1.3)",
                                    f"{ms(b)} vs {ms(a)} ms (×{b / a:.2f})", b <= a * 1.3))

    cluster = d.get("cluster")
    if cluster:
        w("## 6. A 3-server cluster\n")
        w("Three Consul servers on loopback (`raft_multiplier = 1`), the agents spread over the three HTTP "
          "addresses (agents read with `?stale`: followers answer them), the CLI on the first server; "
          "same hooks as section 1.\n")
        w("| N | deploy converged ms | server 1 CPU ms | server 2 CPU ms | server 3 CPU ms |")
        w("|---:|---:|---:|---:|---:|")
        for r in cluster:
            w(f"| {r['n']} | {ms(r['t'])} | " + " | ".join(ms(c) for c in r["server_cpu"]) + " |")
        w("")

    cost = d.get("cost")
    if cost:
        w("## 7. What a request costs the server\n")
        w("A prefix holding 10 versions and the rest node keys; each request repeated, Consul's CPU per request "
          "(with its HTTP handling). The agent's tree watch makes the listing and the transaction on each wake-up; "
          "its `current` and doorbell watches make single-key reads; the CLI follows one version's folder.\n")
        w("| keys under the prefix | one-level listing µs | single key µs | transaction of 10 gets µs | "
          "one version's folder (recurse) µs | blocking listing, write → answer ms |")
        w("|---:|---:|---:|---:|---:|---:|")
        for r in cost:
            w(f"| {r['keys']} | {r['listing'][1] * 1e6:.0f} | {r['single'][1] * 1e6:.0f} | {r['txn'][1] * 1e6:.0f} | "
              f"{r['recurse_one_version'][1] * 1e6:.0f} | {ms(r['wake'])} |")
        w("")

    b2b = d.get("b2b")
    if b2b:
        w("## 8. Back-to-back deploys, against the Go original\n")
        w(f"Trivial hooks; each deploy starts as soon as the previous command returned (back-to-back), or after "
          f"{args.b2b_pause if hasattr(args, 'b2b_pause') else 2} s (spaced). Converged: from the command's start "
          f"until every node's `live` names the version, measured on the hosts (the Go original's command can "
          f"return before that). Lost: versions that never became live everywhere within 30 s.\n")
        w("| implementation | N | back-to-back ms | lost | spaced ms | lost |")
        w("|---|---:|---:|---:|---:|---:|")
        for r in b2b:
            w(f"| {r['impl']} | {r['n']} | {ms(r['back-to-back']['t'])} | {r['back-to-back']['lost']} | "
              f"{ms(r['spaced']['t'])} | {r['spaced']['lost']} |")
        w("")
        rows = {(r["impl"], r["n"]): r for r in b2b}
        for n in sorted({r["n"] for r in b2b}):
            ours = rows.get(("depro", n))
            theirs = rows.get(("go", n))
            if ours:
                b, sp = ours["back-to-back"]["t"], ours["spaced"]["t"]
                targets.append((f"back-to-back vs spaced, N={n}", "within ×1.5",
                                f"{ms(b)} vs {ms(sp)} ms (×{b / sp:.2f})", b <= 1.5 * sp))
            if ours and theirs:
                b, g = ours["back-to-back"]["t"], theirs["back-to-back"]["t"]
                lost = theirs["back-to-back"]["lost"]
                ok = b <= g or (lost > 0 and ours["back-to-back"]["lost"] == 0)
                targets.append((f"back-to-back converged vs the Go original, N={n}", "at least as fast",
                                f"{ms(b)} vs {ms(g)} ms (Go lost {lost})", ok))

    plain = d.get("plain")
    if plain:
        w("## 9. The seed's protocol: plain KV writes against the CLI\n")
        w(measured_apart(d, "plain"))
        w("A client that is not depro adds `<prefix>/<version>/`, polls the node keys until every node is "
          "`ready`, then sets `current`; the depro CLI deploys with `-no-rollout`, then `rollout`, on the same "
          "fleet, alternating. Ready and live: from the first write, medians. Requests and Consul CPU: per host "
          "and version (see docs/scaling.md).\n")
        w("| N | plain: ready s | live s | requests/host | Consul CPU ms/host | CLI: ready s | live s "
          "| requests/host | Consul CPU ms/host |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in plain:
            cells = []
            for how in ("plain", "cli"):
                x = r[how]
                cells += [f"{x['ready']:.2f}", f"{x['live']:.2f}", f"{x['requests_per_host']:.1f}",
                          f"{x['consul_cpu_per_host'] * 1000:.1f}"]
            w(f"| {r['n']} | " + " | ".join(cells) + " |")
        w("")
    big = d.get("big")
    if big:
        w("## 10. Commands on big trees\n")
        w(measured_apart(d, "big"))
        w("A prefix of hosts × versions node keys (held by one session, as agents' are), `current` on the last "
          "version; each command run once against a single Consul server, wall time (exit status).\n")
        labels = list(big[0]["commands"])
        w("| keys (hosts × versions) | " + " | ".join(f"`{label}`" for label in labels) + " |")
        w("|---|" + "---:|" * len(labels))
        for r in big:
            cells = [f"{r['commands'][label]['seconds']:.2f} s"
                     + ("" if r["commands"][label]["exit"] == 0 else f" (exit {r['commands'][label]['exit']})")
                     for label in labels]
            w(f"| {r['keys']:,} ({r['hosts']:,} × {r['versions']}) | " + " | ".join(cells) + " |")
        w("")

    arts = d.get("artifacts")
    if arts:
        size, mb = arts["size"], arts["size"] / 1e6
        w("## 11. Artifacts: a throttled origin, and peers\n")
        w(measured_apart(d, "artifacts"))
        w(f"An origin in the harness (Python's threaded HTTP server, `Range` served) sends a random {mb:g} MB build "
          f"at {arts['rate'] / 1e6:g} MB/s in all (one token bucket across its connections) and counts every byte "
          f"it sends; N agents on one dev Consul (per-client connection limit as in section 9) deploy it three "
          f"ways: **hook**, the deploy hook downloads it (`curl` into the version's directory, then "
          f"`sha256sum -c` on a digest fetched beside it); **origin only**, `depro deploy V -artifact=URL "
          f"-sha256=HEX -size=N` to agents without `listen`, each fetching it from the origin (deploy hook "
          f"`ln -s \"$ARTIFACT\" build.bin`); **peers**, the same deploy to agents with `listen` on distinct "
          f"loopback addresses (127.1.x.x), `-origin-hosts` left at 2. Peers have no `upload_limit`: they share "
          f"this machine's {CORES} cores and disk (each host writes, syncs and hashes its {mb:g} MB copy), "
          f"not a network. Converged: from the start of `depro deploy V -nodes=N` until every node's `live` "
          f"names V (the command exits once every node is `active`). Origin egress in copies of the build. "
          f"Median of {arts['rounds']} round{'s' if arts['rounds'] != 1 else ''} per row, each with a new build, after a warm-up round with a build "
          f"a twentieth the size.\n")
        runs = {(r["way"], r["n"]): r for r in arts["runs"]}
        ns = sorted({r["n"] for r in arts["runs"]})
        ways = [way for way in WAYS if any(r["way"] == way for r in arts["runs"])]
        labels = {"hook": "hook", "origin": "origin only", "peers": "peers"}
        w("| N | " + " | ".join(f"{labels[way]}: converged s | × N={ns[0]} | origin copies" for way in ways)
          + f" | peers: hosts that fetched from the origin | peers: CPU s (agents and fetches) | peers: converged "
          f"− CPU ÷ {CORES} cores s |")
        w("|---:|" + "---:|---:|---:|" * len(ways) + "---:|---:|---:|")
        for n in ns:
            cells = []
            for way in ways:
                r, base = runs.get((way, n)), runs.get((way, ns[0]))
                cells += ([f"{r['t']:.2f}", f"×{r['t'] / base['t']:.1f}", f"{r['egress'] / size:.2f}"]
                          if r and base else ["", "", ""])
            p = runs.get(("peers", n))
            if p:
                cells += [f"{median([x['from_origin'] for x in p['samples']]):.0f}", f"{p['cpu']:.2f}",
                          f"{max(0.0, p['t'] - p['cpu'] / CORES):.2f}"]
            else:
                cells += ["", "", ""]
            w(f"| {n} | " + " | ".join(cells) + " |")
        w("")
        odd = [x for r in arts["runs"] + (arts.get("origin_hosts_runs") or []) for x in r["samples"] if x.get("fallbacks") or x.get("dropped")]
        if odd:
            w("Peers' trouble: " + "; ".join(f"{x['fallbacks']} hosts went to the origin after waiting, "
                                            f"{len(x['dropped'])} peers dropped ({', '.join(x['dropped'][:3])})"
                                            for x in odd) + ".\n")
        extra = arts.get("origin_hosts_runs") or []
        if extra:
            k = extra[0]["origin_hosts"]
            w(f"Peers again, the deploy passing `-origin-hosts={k}` (one host fetches from the origin, every other "
              f"from peers):\n")
            w("| N | converged s | × N=1 of this run | origin copies | hosts that fetched from the origin | "
              "CPU s (agents and fetches) |")
            w("|---:|---:|---:|---:|---:|---:|")
            base = min(extra, key=lambda r: r["n"])
            for r in sorted(extra, key=lambda r: r["n"]):
                w(f"| {r['n']} | {r['t']:.2f} | ×{r['t'] / base['t']:.1f} | {r['egress'] / size:.2f} | "
                  f"{median([x['from_origin'] for x in r['samples']]):.0f} | {r['cpu']:.2f} |")
            w("")
        z = arts.get("zones")
        if z:
            w(f"Two zones: {z['n']} agents with peers, half with `\"zone\": \"a\"` (listening on 127.1.x.x), half "
              f"with `\"zone\": \"b\"` (127.2.x.x); the origin counts as zone a's. A host's copy crosses between "
              f"the zones when the peer (or the origin) it came from is in the other zone, read from the fetch's "
              f"lines in each agent's log (`fetching from the peer ADDR`, `fetching URL`, the last before "
              f"`verified`). {len(z['samples'])} rounds, each a new build (so other hosts rank first):\n")
            w("| round | converged s | origin copies | zones of the hosts that fetched from the origin | "
              "copies crossing | of which origin → zone b |")
            w("|---:|---:|---:|---|---:|---:|")
            for i, x in enumerate(z["samples"], 1):
                w(f"| {i} | {x['t']:.2f} | {x['egress'] / size:.2f} | {x['origin_hosts'] or '-'} | {x['crossing']} | "
                  f"{x['crossing_from_origin']} |")
            w("")
        peers = [r for r in arts["runs"] if r["way"] == "peers"]
        if peers:
            worst = max(peers, key=lambda r: r["egress"])
            targets.append(("peers: origin egress, any N", "≤ 2 copies",
                            f"{worst['egress'] / size:.2f} copies (N={worst['n']})", worst["egress"] <= 2 * size))
            big, small = runs.get(("peers", 64)), runs.get(("peers", 1))
            if big and small:
                ratio = big["t"] / small["t"]
                apart = max(0.0, big["t"] - big["cpu"] / CORES)
                targets.append(("peers: converged at N=64 vs N=1", "≤ ×3",
                                f"{big['t']:.2f} vs {small['t']:.2f} s (×{ratio:.1f}; less the CPU ÷ {CORES} cores: "
                                f"{apart:.2f} s, ×{apart / small['t']:.1f})", ratio <= 3))
        if z:
            crossing = median([x["crossing"] for x in z["samples"]])
            targets.append((f"two zones ({z['n']} hosts): copies crossing between them", "about 1",
                            f"{crossing:g} (rounds: {', '.join(str(x['crossing']) for x in z['samples'])})",
                            crossing <= 1.5))

    ev = d.get("events")
    if ev:
        w("## 12. `depro events`: what it costs Consul\n")
        w(measured_apart(d, "events"))
        w("N agents on one dev Consul (per-client connection limit as in section 9) and `depro events "
          "-prefix=P -json` talking to Consul through a counting TCP proxy in the harness (connections, HTTP "
          "requests, those with `index=` i.e. blocking queries, and the most requests sent and not yet "
          "answered at once). After a first version deployed and 2 s for `events`' first read, "
          f"{ev[0]['cycles']} cycles of `depro deploy V -nodes=N` (every node active) and `depro remove "
          "PREVIOUS -wait`, 1 s after each for the last lines. Lines: what `events` printed during each "
          "deploy / remove (median).\n")
        w("| N | requests per deploy + remove | of which blocking | connections | most in flight at once "
          "| lines per deploy | lines per remove | startup requests |")
        w("|---|---|---|---|---|---|---|---|")
        for r in ev:
            w(f"| {r['n']} | {r['requests'] / r['cycles']:.1f} | {r['blocking'] / r['cycles']:.1f} | "
              f"{r['connections']} | {r['max_in_flight']} | {median(r['deploy_lines']):g} | "
              f"{median(r['remove_lines']):g} | {r['startup']['requests']} |")
        w("")
        targets.append(("`depro events`: requests to Consul at once, whatever N", "1",
                        ", ".join(f"{r['max_in_flight']} (N={r['n']})" for r in ev),
                        all(r["max_in_flight"] <= 1 for r in ev)))

    if targets:
        w("## Targets\n")
        w("| target | wanted | measured | |")
        w("|---|---|---|---|")
        for name, wanted, got, ok in targets:
            w(f"| {name} | {wanted} | {got} | {'met' if ok else '**missed**'} |")
        w("")
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            w(f.read())
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

PARTS = ["fleet", "latency", "footprint", "versions", "many", "cluster", "cost", "b2b", "plain", "big", "artifacts",
         "events"]


def dist_sizes(depro):
    """The sizes of the static binaries packaging/build.sh left next to
    `depro` (dist/depro-<version>-<target>), by target."""
    name = os.path.basename(depro)
    if not name.startswith("depro-"):
        return {}
    version = name.split("-")[1]
    folder = os.path.dirname(os.path.abspath(depro))
    sizes = {}
    if not os.path.isdir(folder):  # dist/ cleaned since the run
        return sizes
    for entry in sorted(os.listdir(folder)):
        prefix = f"depro-{version}-"
        if entry.startswith(prefix) and not entry.endswith((".deb", ".rpm", ".tmp")):
            sizes[entry[len(prefix):]] = os.path.getsize(os.path.join(folder, entry))
    return sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depro", required=True)
    parser.add_argument("--consul", required=True)
    parser.add_argument("--go", default="", help="the Go original's binary, for section 8")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--sizes", default="1,16,64,128,256")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--idle", type=int, default=60)
    parser.add_argument("--version-counts", default="1,100,1000")
    parser.add_argument("--many", type=int, default=1000)
    parser.add_argument("--many-rounds", type=int, default=3)
    parser.add_argument("--cluster-sizes", default="64,128")
    parser.add_argument("--cost-keys", default="1000,10000,50000")
    parser.add_argument("--cost-samples", type=int, default=300)
    parser.add_argument("--b2b-sizes", default="1,8,32")
    parser.add_argument("--plain-sizes", default="16,256,1000")
    parser.add_argument("--plain-rounds", type=int, default=3)
    parser.add_argument("--big-shapes", default="1000x10,10000x10,10000x100",
                        help="hosts x versions of each big tree (10k, 100k, 1M keys)")
    parser.add_argument("--b2b-rounds", type=int, default=10)
    parser.add_argument("--b2b-pause", type=float, default=2.0)
    parser.add_argument("--artifact-files", type=int, default=20)
    parser.add_argument("--artifact-kib", type=int, default=64)
    parser.add_argument("--artifact-sizes", default="1,8,32,64", help="section 11's fleet sizes")
    parser.add_argument("--artifact-mb", type=float, default=20, help="section 11's build, MB")
    parser.add_argument("--origin-mbps", type=float, default=20, help="section 11's origin, MB/s in all")
    parser.add_argument("--artifact-rounds", type=int, default=2)
    parser.add_argument("--artifact-origin-hosts", type=int, default=0,
                        help="section 11: also peers deploying with -origin-hosts=K (0: no such run)")
    parser.add_argument("--artifact-origin-hosts-sizes", default="1,64",
                        help="section 11: the fleet sizes of the -origin-hosts=K run")
    parser.add_argument("--artifact-zone-fleet", type=int, default=32,
                        help="section 11's two-zone fleet (half in each zone; 0: none)")
    parser.add_argument("--events-sizes", default="4,32", help="section 12's fleet sizes")
    parser.add_argument("--events-cycles", type=int, default=5, help="section 12's deploy + remove cycles")
    parser.add_argument("--keep-work", action="store_true", help="keep the agents' directories and logs")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--command-line", default="scripts/bench.sh")
    parser.add_argument("--notes", default="docs/benchmarks-notes.md",
                        help="hand-written analysis appended to the report")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report and chart from OUT/benchmarks.json (after editing the notes)")
    parser.add_argument("--merge", action="append", default=[], metavar="JSON",
                        help="with --report-only: take the parts measured in another run (its benchmarks.json) "
                             "into OUT's, the report naming that run")
    args = parser.parse_args()

    if args.report_only:
        with open(os.path.join(args.out, "benchmarks.json")) as f:
            d = json.load(f)
        for other in args.merge:
            with open(other) as f:
                m = json.load(f)
            measured = [part for part in PARTS if m.get(part)]
            command = m.get("command_line", "")
            if "--parts" not in command:
                command += " --parts " + ",".join(measured)
            for part in measured:
                d[part] = m[part]
                d.setdefault("runs", {})[part] = {"started": m["started"], "command_line": command,
                                                  "binary_size": m["binary_size"]}
        # The report lists the sizes of the static binaries in dist/ when it
        # is written: today's, where dist/ has them.
        sizes = dist_sizes(d["depro"])
        if sizes or "binary_sizes" not in d or args.merge:
            if sizes or "binary_sizes" not in d:
                d["binary_sizes"] = sizes
            with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
                json.dump(d, f, indent=1)
        for key in ("rounds", "artifact_kib", "artifact_files", "command_line"):
            setattr(args, key, d.get(key, getattr(args, key)))
        if d.get("fleet"):
            svg_chart(d["fleet"], os.path.join(args.out, "fleet-scaling.svg"))
        report(args, d, os.path.join(args.out, "benchmarks.md"))
        return

    parts = [p for p in args.parts.split(",") if p]
    started = time.time()
    work = tempfile.mkdtemp(prefix="depro-bench.")
    raise_fd_limit()
    d = {"started": started, "machine": machine(), "depro": args.depro, "rounds": args.rounds, "artifact_kib": args.artifact_kib,
         "artifact_files": args.artifact_files, "command_line": args.command_line,
         "binary_size": os.path.getsize(args.depro), "binary_sizes": dist_sizes(args.depro)}
    consul = Consul(args.consul, work)
    try:
        d["consul_version"] = subprocess.run([args.consul, "version"], capture_output=True,
                                             text=True).stdout.split("\n")[0]
        artifact = make_artifact(work, args.artifact_files, args.artifact_kib)
        if "fleet" in parts:
            sizes = [int(n) for n in args.sizes.split(",")]
            print(f"bench: 1. fleet scaling for N in {sizes}", flush=True)
            d["fleet"] = fleet_scaling(args.depro, consul, work, artifact, sizes, args.rounds)
            # A fresh Consul for what follows: not one still busy with the
            # state and the held queries that hundreds of agents left.
            consul.stop()
            consul = Consul(args.consul, work, name="single")
        if "latency" in parts:
            # Let the disk settle first: section 1's hosts left lots of
            # dirty data behind, and a rename that waits for the journal
            # would be measured as the agent's latency.
            os.sync()
            print("bench: 2. reaction latency", flush=True)
            d["latency"] = reaction_latency(args.depro, consul, work, artifact, args.changes)
            d["latency"]["busy"] = latency_while_busy(args.depro, consul, work, max(4, args.changes // 5))
        if "footprint" in parts:
            print("bench: 3. footprint", flush=True)
            d["footprint"] = footprint(args.depro, consul, work, artifact, args.cycles, args.idle)
        if "versions" in parts:
            print("bench: 4. versions", flush=True)
            counts = [int(n) for n in args.version_counts.split(",")]
            d["versions"] = versions_section(args.depro, consul, work, counts, args.idle, min(args.changes, 20))
        consul.stop()
        if "many" in parts:
            print(f"bench: 5. {args.many} agents", flush=True)
            d["many"] = many_agents(args.depro, args.consul, work, args.many, args.many_rounds)
        if "cluster" in parts:
            print("bench: 6. 3-server cluster", flush=True)
            sizes = [int(n) for n in args.cluster_sizes.split(",")]
            d["cluster"] = cluster_section(args.depro, args.consul, work, artifact, sizes, args.rounds)
        if "cost" in parts:
            print("bench: 7. server cost model", flush=True)
            keys = [int(n) for n in args.cost_keys.split(",")]
            d["cost"] = server_cost(args.consul, work, keys, args.cost_samples)
        if "plain" in parts:
            print("bench: 9. the seed's protocol (plain KV writes) against the CLI", flush=True)
            sizes = [int(n) for n in args.plain_sizes.split(",")]
            d["plain"] = plain_path(args.depro, args.consul, work, sizes, args.plain_rounds)
        if "big" in parts:
            print("bench: 10. commands on big trees", flush=True)
            shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.big_shapes.split(",")]
            d["big"] = big_trees(args.depro, args.consul, work, shapes)
        if "b2b" in parts:
            print("bench: 8. back-to-back deploys", flush=True)
            sizes = [int(n) for n in args.b2b_sizes.split(",")]
            d["b2b"] = back_to_back(args.depro, args.go, args.consul, work, sizes, args.b2b_rounds,
                                    args.b2b_pause)
        if "artifacts" in parts:
            print("bench: 11. artifacts: a throttled origin, peers", flush=True)
            sizes = [int(n) for n in args.artifact_sizes.split(",")]
            d["artifacts"] = artifacts_section(args.depro, args.consul, work, sizes, args.artifact_mb,
                                               args.origin_mbps, args.artifact_rounds, args.artifact_zone_fleet,
                                               args.artifact_origin_hosts,
                                               [int(n) for n in args.artifact_origin_hosts_sizes.split(",") if n])
        if "events" in parts:
            print("bench: 12. depro events: its requests to Consul", flush=True)
            d["events"] = events_section(args.depro, args.consul, work,
                                         [int(n) for n in args.events_sizes.split(",") if n], args.events_cycles)
        d["run_minutes"] = (time.time() - started) / 60
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
            json.dump(d, f, indent=1)
        if d.get("fleet"):
            svg_chart(d["fleet"], os.path.join(args.out, "fleet-scaling.svg"))
        report(args, d, os.path.join(args.out, "benchmarks.md"))
        print(f"bench: wrote {args.out}/benchmarks.md in {d['run_minutes']:.1f} min", flush=True)
    except BaseException:
        for agent in ALL_AGENTS:
            if agent.proc.poll() is None:
                agent.proc.kill()
        consul.stop()
        print(f"bench: failed; logs kept in {work}", file=sys.stderr)
        raise
    for agent in ALL_AGENTS:
        if agent.proc.poll() is None:
            agent.proc.kill()
    if args.keep_work:
        print(f"bench: logs kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
