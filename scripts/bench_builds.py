#!/usr/bin/env python3
"""Two builds of depro side by side, in the same run (a size or compiler
change must not cost the agent's speed):

    python3 scripts/bench_builds.py --consul CONSUL BASELINE CANDIDATE [--rounds 6]
    python3 scripts/bench_builds.py --consul CONSUL --metrics BUILD [--rounds 6]

With --metrics, one build against itself: the candidate's agents have
`"metrics_file": "<agent dir>/depro.prom"` in their config (metrics on, the
agent rendering them every 5 s), the baseline's none (off).

Each round runs both builds, in alternating order, against one dev Consul on
loopback, and for each measures:
- reaction latency: the time from the write of `current` to the start of the
  rollout hook, over --changes switches between two ready versions;
- the agent's CPU per deploy: its own CPU time (hooks excluded) over
  --cycles cycles of `deploy` (a new version, made current) and `remove
  -wait` (the one before), divided by the cycles;
- its resident memory and threads idle (before), and its memory after them;
- reaction latency while another deployment of the same agent runs deploy
  hooks (5 s each, one after another): --busy-changes switches.
It prints a Markdown table: the median of each measure per build over the
rounds, and the candidate's ratio to the baseline. Only the standard library.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Agent, Consul, app_deployment, latency_while_busy, median, proc_times,  # noqa: E402
                      raise_fd_limit, rss_kib, run_depro, stop_all, threads_sockets, wait_until)


def one_build(depro, consul, work, tag, changes, cycles, busy_changes, metrics=False):
    prefix = f"builds-{tag}/version"
    record = "echo $EPOCHREALTIME >> {dir}/starts"
    prom = os.path.join(work, f"agent-{tag}", "depro.prom")
    agent = Agent(depro, work, f"agent-{tag}", consul,
                  app_deployment(prefix, rollout_first_line=record, shell="bash"),
                  extra={"metrics_file": prom} if metrics else None)
    try:
        consul.add_versions(prefix, ["a", "b"])
        consul.put(f"{prefix}/current", "a")
        wait_until("the first rollout", lambda: agent.live() == "a")
        wait_until("b ready", lambda: consul.get(f"{prefix}/b/agent-{tag}") == "ready")
        time.sleep(1)
        idle_rss = rss_kib(agent.proc.pid)
        idle_threads = threads_sockets(agent.proc.pid)[0]
        starts = os.path.join(agent.dir, "starts")

        def lines():
            try:
                with open(starts) as f:
                    return [float(x) for x in f.read().split()]
            except OSError:
                return []

        latencies = []
        for i in range(changes):
            target = "b" if i % 2 == 0 else "a"
            seen = len(lines())
            time.sleep(0.05)
            t_write = time.time()
            consul.put(f"{prefix}/current", target)
            wait_until("the rollout hook", lambda: len(lines()) > seen)
            wait_until("active", lambda: consul.get(f"{prefix}/{target}/agent-{tag}") == "active")
            latencies.append(lines()[seen] - t_write)

        cpu0 = proc_times(agent.proc.pid)[0]
        previous = consul.get(f"{prefix}/current")
        for i in range(cycles):
            run_depro(depro, consul, "deploy", f"c{i}", f"-prefix={prefix}", "-quiet")
            run_depro(depro, consul, "remove", previous, "-wait", f"-prefix={prefix}", "-quiet")
            previous = f"c{i}"
        cpu = (proc_times(agent.proc.pid)[0] - cpu0) / cycles
        time.sleep(1)
        rss = rss_kib(agent.proc.pid)
        if metrics and not os.path.exists(prom):
            raise RuntimeError(f"metrics on, but no {prom}")
    finally:
        stop_all([agent])
    extra = {"metrics_file": os.path.join(work, f"agent-busy-{tag}", "depro.prom")} if metrics else None
    busy = latency_while_busy(depro, consul, work, busy_changes, tag=f"busy-{tag}",
                              extra=extra) if busy_changes else [0.0]
    return {"latency": median(latencies), "cpu": cpu, "rss": rss, "busy": median(busy),
            "idle_rss": idle_rss, "idle_threads": idle_threads}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline")
    parser.add_argument("candidate", nargs="?", help="the same as BASELINE if omitted (with --metrics)")
    parser.add_argument("--metrics", action="store_true",
                        help="the candidate's agents with a metrics_file (metrics on), the baseline's without")
    parser.add_argument("--consul", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--busy-changes", type=int, default=4)
    args = parser.parse_args()
    raise_fd_limit()
    work = tempfile.mkdtemp(prefix="depro-builds.")
    if args.candidate is None and not args.metrics:
        parser.error("CANDIDATE is needed (or --metrics, to compare BASELINE with itself)")
    builds = {"baseline": os.path.abspath(args.baseline),
              "candidate": os.path.abspath(args.candidate or args.baseline)}
    results = {name: [] for name in builds}
    # Lifted per-client connection limit: with Consul's default (200), the
    # CLI run ~100 times a minute from one address locks it out (each run
    # that exits leaves its blocking query held on the server until its
    # wait ends), which this benchmark is not about.
    consul = Consul(args.consul, work)
    try:
        for r in range(args.rounds):
            order = list(builds) if r % 2 == 0 else list(reversed(builds))
            for name in order:
                m = one_build(builds[name], consul, work, f"{name}-{r}", args.changes, args.cycles,
                              args.busy_changes, metrics=args.metrics and name == "candidate")
                results[name].append(m)
                print(f"round {r + 1} {name}: latency {m['latency'] * 1000:.2f} ms, "
                      f"CPU/deploy {m['cpu'] * 1000:.2f} ms, RSS {m['rss']} KiB, "
                      f"latency while busy {m['busy'] * 1000:.1f} ms", file=sys.stderr, flush=True)
    finally:
        consul.stop()

    def med(name, key):
        return median([m[key] for m in results[name]])

    heads = ("metrics off", "metrics on") if args.metrics else ("baseline", "candidate")
    print(f"| measure (median of {args.rounds} rounds, alternating) | {heads[0]} | {heads[1]} | ratio |")
    print("|---|---|---|---|")
    for key, label, scale, unit in (("latency", f"reaction latency (median of {args.changes} switches)", 1000, "ms"),
                                    ("cpu", f"agent CPU per deploy + remove ({args.cycles} cycles)", 1000, "ms"),
                                    ("idle_rss", "agent RSS idle (one deployment, two versions)", 1, "KiB"),
                                    ("idle_threads", "agent threads idle", 1, ""),
                                    ("rss", "agent RSS after the cycles", 1, "KiB"),
                                    ("busy", "reaction latency while another deployment's deploy hook "
                                     f"runs (median of {args.busy_changes})", 1000, "ms")):
        a, b = med("baseline", key), med("candidate", key)
        print(f"| {label} | {a * scale:.2f} {unit} | {b * scale:.2f} {unit} | ×{b / a:.2f} |")
    for name, path in builds.items():
        print(f"\n{name}: {path} ({os.path.getsize(path)} bytes)"
              + (", metrics on" if args.metrics and name == "candidate" else ""))


if __name__ == "__main__":
    main()
