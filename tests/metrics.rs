//! The agent's metrics (issue 22): Prometheus' text format, written to
//! `metrics_file` and served at `/metrics` on the `listen` address, checked
//! with a strict parser of the format against a real deploy on real Consul.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use support::Fleet;

/// One sample: its metric name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format strictly: every line a `# HELP`, a
/// `# TYPE` (before its family's samples, once) or a sample of a declared
/// family; well-formed names, labels and values; no series twice;
/// histograms cumulative with `+Inf` equal to `_count`.
fn parse(text: &str) -> Vec<Sample> {
    let name_ok = |n: &str| {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (what, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name_ok(name), "bad name: {line}");
            match what {
                "HELP" => assert!(parts.next().is_some_and(|h| !h.is_empty()), "{line}"),
                "TYPE" => {
                    let kind = parts.next().unwrap();
                    assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                    assert!(
                        types.insert(name.into(), kind.into()).is_none(),
                        "twice: {line}"
                    );
                    if kind == "counter" {
                        assert!(name.ends_with("_total"), "a counter ends in _total: {line}");
                    }
                }
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert!(name_ok(&key), "bad label: {line}");
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        match chars.next().unwrap_or_else(|| panic!("{line}")) {
                            '\\' => match chars.next() {
                                Some('n') => value.push('\n'),
                                Some(c @ ('\\' | '"')) => value.push(c),
                                _ => panic!("bad escape: {line}"),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    assert!(labels.insert(key, value).is_none(), "{line}");
                    match chars.next() {
                        Some(',') | None => {}
                        _ => panic!("{line}"),
                    }
                }
                (name, labels)
            }
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE before: {line}");
        assert!(seen.insert(series.to_string()), "a series twice: {line}");
        samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    // Histograms: buckets cumulative, +Inf = count.
    for s in samples.iter().filter(|s| s.name.ends_with("_count")) {
        let family = s.name.trim_end_matches("_count");
        let mut buckets: Vec<&Sample> = samples
            .iter()
            .filter(|b| b.name == format!("{family}_bucket"))
            .filter(|b| {
                let mut l = b.labels.clone();
                l.remove("le");
                l == s.labels
            })
            .collect();
        buckets.sort_by(|a, b| {
            let le = |x: &Sample| x.labels["le"].parse::<f64>().unwrap_or(f64::INFINITY);
            le(a).total_cmp(&le(b))
        });
        assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value));
        assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
        assert_eq!(buckets.last().unwrap().value, s.value);
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200 ") && head.contains("text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

#[test]
fn the_agent_s_metrics_file_and_endpoint_follow_a_real_deploy_in_prometheus_text_format() {
    let mut fleet = Fleet::new(1);
    let file = fleet.agents[0].dir.join("depro.prom");
    let listen = format!("127.0.0.1:{}", support::free_port());
    fleet.agents[0].extra = serde_json::json!({
        "metrics_file": file,
        "listen": listen,
    });
    fleet.start_all();
    fleet.depro(&["deploy", "v1"]).ok();
    fleet.depro(&["deploy", "v2"]).ok();
    fleet.depro(&["remove", "v1"]).ok();
    // Written every 5 s: wait for one that shows the removal.
    let mut samples = Vec::new();
    fleet.wait("metrics showing v2 live and v1 gone", |_| {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        samples = parse(&text);
        value(&samples, "depro_live_version_info", &[("version", "v2")]) == Some(1.0)
            && value(&samples, "depro_version_state", &[("version", "v1")]).is_none()
    });
    let api = ("deployment", "api");
    assert_eq!(
        value(&samples, "depro_agent_info", &[("node", "node1")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "depro_version_state",
            &[api, ("version", "v2"), ("state", "active")]
        ),
        Some(1.0)
    );
    assert_eq!(
        samples
            .iter()
            .filter(|s| s.name == "depro_live_version_info")
            .count(),
        1
    );
    let runs = |kind| value(&samples, "depro_hook_runs_total", &[api, ("kind", kind)]);
    assert_eq!(runs("deploy"), Some(2.0));
    assert_eq!(runs("rollout"), Some(2.0));
    assert_eq!(runs("clean"), Some(1.0));
    assert_eq!(
        value(
            &samples,
            "depro_hook_failures_total",
            &[api, ("kind", "deploy")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "depro_hook_duration_seconds_count",
            &[api, ("kind", "deploy")]
        ),
        Some(2.0)
    );
    let contact = value(&samples, "depro_consul_last_contact_timestamp_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        contact > now - 120.0 && contact <= now + 1.0,
        "{contact} vs {now}"
    );
    assert_eq!(
        value(&samples, "depro_consul_outages_total", &[]),
        Some(0.0)
    );

    // The endpoint serves the same families, also parsed strictly.
    let served = parse(&scrape(&listen));
    assert_eq!(
        value(
            &served,
            "depro_live_version_info",
            &[api, ("version", "v2")]
        ),
        Some(1.0)
    );

    // A failed hook is counted as one.
    fleet.agents[0].set_flag("fail-deploy", true);
    fleet.depro(&["deploy", "v3"]);
    fleet.wait("the failure counted", |_| {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        samples = parse(&text);
        value(
            &samples,
            "depro_hook_failures_total",
            &[api, ("kind", "deploy")],
        ) == Some(1.0)
    });
    assert_eq!(
        value(
            &samples,
            "depro_version_state",
            &[api, ("version", "v3"), ("state", "failed")]
        ),
        Some(1.0)
    );
}
