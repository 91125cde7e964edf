//! An agent cut off from Consul for a long time (issue 12), as an edge box
//! on a link that drops for hours: it keeps running its version, logs the
//! outage once at each end, stays flat in memory and CPU, and catches up in
//! one pass when the link returns.
//!
//! The cut lasts two minutes here (twelve session TTLs: the node's keys are
//! long gone). `DEPRO_OFFLINE=2h cargo test --test offline` holds it for hours.

mod support;

use std::time::{Duration, Instant};

use support::{Fleet, proxy::Proxy};

/// How long the link stays cut: `DEPRO_OFFLINE` (e.g. `90s`, `2h`) or 2 minutes.
fn offline_for() -> Duration {
    let Ok(text) = std::env::var("DEPRO_OFFLINE") else {
        return Duration::from_secs(120);
    };
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = number.parse().expect("DEPRO_OFFLINE: e.g. 90s, 30m, 2h");
    Duration::from_secs(match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => panic!("DEPRO_OFFLINE: e.g. 90s, 30m, 2h"),
    })
}

/// The process's resident memory (KiB) and CPU time (clock ticks).
fn rss_and_cpu(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime, stime
    // are the 12th and 13th of them.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let cpu = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (rss, cpu)
}

/// How the link goes down.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// Connections are refused and closed: the agent knows at once.
    Refused,
    /// Every packet is dropped: connections hang, and only the agent's
    /// own timeouts tell it.
    Silent,
}

#[test]
fn an_agent_cut_off_from_consul_keeps_its_version_and_catches_up_in_one_pass() {
    ride_out(Outage::Refused);
}

#[test]
fn an_agent_whose_link_drops_every_packet_notices_keeps_its_version_and_catches_up() {
    ride_out(Outage::Silent);
}

fn ride_out(outage: Outage) {
    let offline = offline_for();
    let mut fleet = Fleet::new(2);
    let proxy = Proxy::start(&fleet.consul.addr());
    fleet.agents[1].server = proxy.addr();
    fleet.start_all();
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet
        .depro(&["deploy", "v2", "-nodes=2", "-no-rollout"])
        .ok();
    let edge = &fleet.agents[1];
    let hooks_before = edge.hooks_log().len();
    // What the agent logs from the outage on (a hiccup at its start, such
    // as a session refused by a Consul still registering itself, is not
    // this outage).
    let log_before = edge.log().len();
    let log_since = || edge.log()[log_before..].to_string();

    match outage {
        Outage::Refused => proxy.cut(),
        Outage::Silent => proxy.silence(),
    }
    let pid = edge.pid();
    // Silent: a request in flight ends with its timeout (a blocking query's
    // wait and margin at most).
    fleet.wait_within(Duration::from_secs(90), "the outage to be logged", |_| {
        log_since().contains("retrying with backoff")
    });
    let cut_at = Instant::now();
    let (_, cpu_start) = rss_and_cpu(pid);

    // While it is away its session expires and its keys go with it: a
    // deploy started elsewhere counts it as absent and goes on without it.
    fleet.wait_within(Duration::from_secs(60), "node2's keys to expire", |f| {
        f.node_state("v1", "node2").is_none()
    });
    let out = fleet.depro(&["deploy", "v3", "-nodes=all"]);
    assert!(
        out.result().contains("active on 1/1 nodes"),
        "node2 was counted: {out:#?}"
    );
    fleet.depro(&["remove", "v2"]).ok();
    // It keeps running what it ran.
    assert_eq!(edge.live("api").as_deref(), Some("v1"));

    // The rest of the outage, sampled once a second: the version stays,
    // memory and CPU stay flat. Memory settles first: the outage's first
    // seconds (the failing requests, the session's loss, the deploy above
    // counting the node out) take a few hundred KiB once (344-552 KiB
    // measured), and a silent link's keys may expire before the outage is
    // even logged. So the first quarter of what is left of the outage (20 s
    // at most) sets the level, and the rest must stay within 256 KiB of it.
    let sampling = Instant::now();
    let settle = (offline.saturating_sub(cut_at.elapsed()) / 4).min(Duration::from_secs(20));
    let mut settled_rss = rss_and_cpu(pid).0;
    let mut peak_rss = settled_rss;
    while cut_at.elapsed() < offline {
        std::thread::sleep(Duration::from_secs(1).min(offline.saturating_sub(cut_at.elapsed())));
        let (rss, _) = rss_and_cpu(pid);
        if sampling.elapsed() < settle {
            settled_rss = settled_rss.max(rss);
        }
        peak_rss = peak_rss.max(rss);
        assert_eq!(edge.live("api").as_deref(), Some("v1"));
    }
    let (_, cpu_end) = rss_and_cpu(pid);
    let ticks = (cpu_end - cpu_start) as f64;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    let cpu_share = ticks / per_second / cut_at.elapsed().as_secs_f64();
    assert!(
        cpu_share < 0.01,
        "{:.2}% of a core while cut off",
        cpu_share * 100.0
    );
    assert!(
        peak_rss <= settled_rss + 256,
        "memory grew while cut off: {settled_rss} KiB after {settle:?} -> {peak_rss} KiB"
    );

    // The link returns: one pass deploys v3, rolls it out, cleans v2, and
    // registers again (a new session, its node keys and announcement).
    proxy.heal();
    let healed = Instant::now();
    fleet.wait_within(Duration::from_secs(60), "node2 caught up", |f| {
        f.node_state("v3", "node2").as_deref() == Some("active")
            && f.node_state("v1", "node2").as_deref() == Some("ready")
            && f.node_state("v2", "node2").is_none()
            && !f.agents[1].dir.join("api/v2").exists()
            && f.agents[1].live("api").as_deref() == Some("v3")
    });
    let caught_up = healed.elapsed();
    assert!(
        fleet
            .consul
            .get(&format!("{}/.agents/node2", fleet.prefix))
            .is_some(),
        "node2 did not announce itself again"
    );

    // Each hook ran once: nothing run again for having been away.
    let hooks: Vec<String> = edge.hooks_log()[hooks_before..].to_vec();
    let count = |line: &str| hooks.iter().filter(|l| l.starts_with(line)).count();
    assert_eq!(count("deploy v3 "), 1, "{hooks:#?}");
    assert_eq!(count("rollout v3 "), 1, "{hooks:#?}");
    assert_eq!(count("clean v2"), 1, "{hooks:#?}");
    assert_eq!(
        hooks.len(),
        4,
        "deploy, deployed, rollout, clean: {hooks:#?}"
    );

    // The outage is in the log once at each end, with how long it lasted.
    let log = log_since();
    assert_eq!(
        log.matches("retrying with backoff").count(),
        1,
        "the outage's start, once:\n{log}"
    );
    let ends: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("answers again after"))
        .collect();
    assert_eq!(ends.len(), 1, "the outage's end, once:\n{log}");
    eprintln!(
        "{outage:?}: cut off for {:?}; caught up {caught_up:?} after the link returned; {}",
        cut_at.elapsed(),
        ends[0]
    );
}

#[test]
fn reports_held_back_during_an_outage_go_out_as_soon_as_consul_answers_again() {
    let mut fleet = Fleet::new(1);
    let proxy = Proxy::start(&fleet.consul.addr());
    fleet.agents[0].server = proxy.addr();
    fleet.start_all();
    fleet.depro(&["deploy", "v1", "-nodes=1"]).ok();
    // A deploy that finishes while the link is down: its `ready` cannot be
    // written, and the agent retries with a backoff that grows to 30 s.
    let agent = &fleet.agents[0];
    agent.set_flag("block-deploy", true);
    fleet.add_version("v2");
    let hook = agent.dir.join("hook.pid");
    support::wait_for("v2's deploy hook", || hook.exists());
    proxy.cut();
    agent.set_flag("release", true);
    support::wait_for("the deploy to finish offline", || {
        agent.log().contains("api v2: deployed")
    });
    // Long enough for the backoff to grow (0.5 s doubling: after the try at
    // 15.5 s the next is at 31.5 s), short enough for the session to live
    // (its TTL is 10 s here: Consul keeps it 20 s).
    let offline = Instant::now();
    while offline.elapsed() < Duration::from_secs(16) {
        std::thread::sleep(Duration::from_millis(500));
    }
    proxy.heal();
    let healed = Instant::now();
    fleet.wait("v2 ready", |f| {
        f.node_state("v2", "node1").as_deref() == Some("ready")
    });
    assert!(
        healed.elapsed() < Duration::from_secs(5),
        "the report waited out its backoff: {:?}",
        healed.elapsed()
    );
}
