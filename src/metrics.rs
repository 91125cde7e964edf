//! The agent's metrics (issue 22), in Prometheus' text exposition format:
//! what the agent counts as it goes (hooks, artifacts, Consul), and a
//! rendering of those counts with a snapshot of its deployments. Written
//! atomically to `metrics_file` (for node_exporter's textfile collector)
//! and served on the agent's `listen` address at `/metrics`.
//!
//! Counting is a lock and an add; rendering is pure. Series are bounded:
//! hooks by deployment and kind, artifacts by deployment and source, one
//! state series per deployment and version on the host (versions that are
//! gone disappear), Consul errors by kind.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of the hook duration histogram's buckets, in seconds.
const BUCKETS: [f64; 9] = [0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];

/// What this agent counted since it started (one per process, like its
/// log: every thread counts into it).
pub(crate) static METRICS: Metrics = Metrics(Mutex::new(Counts {
    hooks: BTreeMap::new(),
    fetched: BTreeMap::new(),
    served: 0,
    consul_contact: 0.0,
    consul_errors: BTreeMap::new(),
    outages: 0,
}));

/// What the agent counted since it started.
pub(crate) struct Metrics(Mutex<Counts>);

struct Counts {
    /// By (deployment, hook kind).
    hooks: BTreeMap<(String, &'static str), HookCounts>,
    /// Bytes fetched, by (deployment, `origin` or `peer`).
    fetched: BTreeMap<(String, &'static str), u64>,
    /// Bytes served to peers.
    served: u64,
    /// When Consul last answered (seconds since the Unix epoch).
    consul_contact: f64,
    /// Consul requests that failed, by kind.
    consul_errors: BTreeMap<&'static str, u64>,
    /// Outages begun.
    outages: u64,
}

#[derive(Default)]
struct HookCounts {
    runs: u64,
    failures: u64,
    /// Runs at most as long as each bound of [`BUCKETS`] (not cumulative).
    buckets: [u64; BUCKETS.len()],
    seconds: f64,
}

/// A deployment as the metrics show it: its live version and the state of
/// each version on this host.
pub(crate) struct DeploymentSeen<'a> {
    pub id: &'a str,
    pub live: Option<&'a str>,
    pub states: Vec<(&'a str, &'a str)>,
}

impl Metrics {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A hook of `kind` ran for `seconds` and succeeded or failed.
    pub(crate) fn hook_ran(&self, deployment: &str, kind: &'static str, seconds: f64, ok: bool) {
        let mut counts = self.counts();
        let hook = counts.hooks.entry((deployment.into(), kind)).or_default();
        hook.runs += 1;
        hook.failures += u64::from(!ok);
        hook.seconds += seconds;
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            hook.buckets[i] += 1;
        }
    }

    /// An artifact of `bytes` was fetched from `source` (`origin`, `peer`).
    pub(crate) fn fetched(&self, deployment: &str, source: &'static str, bytes: u64) {
        *self
            .counts()
            .fetched
            .entry((deployment.into(), source))
            .or_default() += bytes;
    }

    /// Bytes sent to a peer.
    pub(crate) fn served(&self, bytes: u64) {
        self.counts().served += bytes;
    }

    /// Consul answered.
    pub(crate) fn consul_answered(&self) {
        self.counts().consul_contact = crate::logging::now_ms() as f64 / 1000.0;
    }

    /// A Consul request failed (`kind`: unreachable, denied, …); `outage`
    /// if it began one.
    pub(crate) fn consul_failed(&self, kind: &'static str, outage: bool) {
        let mut counts = self.counts();
        *counts.consul_errors.entry(kind).or_default() += 1;
        counts.outages += u64::from(outage);
    }

    /// Everything, in Prometheus' text format.
    pub(crate) fn render(&self, node: &str, deployments: &[DeploymentSeen<'_>]) -> String {
        let counts = self.counts();
        let mut out = String::new();
        family(
            &mut out,
            "agent_info",
            "gauge",
            "The agent: its depro version and node name.",
        );
        let _ = writeln!(
            out,
            "depro_agent_info{{version=\"{}\",node=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            label(node)
        );
        family(
            &mut out,
            "live_version_info",
            "gauge",
            "The version a deployment runs on this host.",
        );
        for d in deployments {
            if let Some(live) = d.live {
                let _ = writeln!(
                    out,
                    "depro_live_version_info{{deployment=\"{}\",version=\"{}\"}} 1",
                    label(d.id),
                    label(live)
                );
            }
        }
        family(
            &mut out,
            "version_state",
            "gauge",
            "Each version on this host, labelled with its state (busy, ready, active, failed).",
        );
        for d in deployments {
            for (version, state) in &d.states {
                let _ = writeln!(
                    out,
                    "depro_version_state{{deployment=\"{}\",version=\"{}\",state=\"{state}\"}} 1",
                    label(d.id),
                    label(version)
                );
            }
        }
        for (name, help, failures) in [
            (
                "hook_runs_total",
                "Hooks run, by deployment and kind (fetch: an artifact's fetch).",
                false,
            ),
            (
                "hook_failures_total",
                "Hooks that failed (an exit status, a signal, a timeout), by deployment and kind.",
                true,
            ),
        ] {
            family(&mut out, name, "counter", help);
            for ((d, kind), hook) in &counts.hooks {
                let n = if failures { hook.failures } else { hook.runs };
                let _ = writeln!(
                    out,
                    "depro_{name}{{deployment=\"{}\",kind=\"{kind}\"}} {n}",
                    label(d)
                );
            }
        }
        family(
            &mut out,
            "hook_duration_seconds",
            "histogram",
            "How long hooks ran, by deployment and kind.",
        );
        for ((d, kind), hook) in &counts.hooks {
            let labels = format!("deployment=\"{}\",kind=\"{kind}\"", label(d));
            let mut below = 0;
            for (bound, n) in BUCKETS.iter().zip(hook.buckets) {
                below += n;
                let _ = writeln!(
                    out,
                    "depro_hook_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {below}"
                );
            }
            let _ = writeln!(
                out,
                "depro_hook_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n\
                 depro_hook_duration_seconds_sum{{{labels}}} {}\n\
                 depro_hook_duration_seconds_count{{{labels}}} {}",
                hook.runs, hook.seconds, hook.runs
            );
        }
        family(
            &mut out,
            "artifact_fetched_bytes_total",
            "counter",
            "Bytes of verified artifacts fetched, by deployment and source (origin, peer).",
        );
        for ((d, source), bytes) in &counts.fetched {
            let _ = writeln!(
                out,
                "depro_artifact_fetched_bytes_total{{deployment=\"{}\",source=\"{source}\"}} \
                 {bytes}",
                label(d)
            );
        }
        family(
            &mut out,
            "artifact_served_bytes_total",
            "counter",
            "Bytes of artifacts sent to peers.",
        );
        let _ = writeln!(out, "depro_artifact_served_bytes_total {}", counts.served);
        family(
            &mut out,
            "consul_last_contact_timestamp_seconds",
            "gauge",
            "When Consul last answered this agent (seconds since the Unix epoch; 0: never).",
        );
        let _ = writeln!(
            out,
            "depro_consul_last_contact_timestamp_seconds {:.3}",
            counts.consul_contact
        );
        family(
            &mut out,
            "consul_errors_total",
            "counter",
            "Consul requests that failed, by kind.",
        );
        for (kind, n) in &counts.consul_errors {
            let _ = writeln!(out, "depro_consul_errors_total{{kind=\"{kind}\"}} {n}");
        }
        family(
            &mut out,
            "consul_outages_total",
            "counter",
            "Times Consul stopped answering this agent.",
        );
        let _ = writeln!(out, "depro_consul_outages_total {}", counts.outages);
        out
    }
}

/// A metric family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP depro_{name} {help}\n# TYPE depro_{name} {kind}"
    );
}

/// A label value as the format wants it: `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
