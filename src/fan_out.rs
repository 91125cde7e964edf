//! Who fetches an artifact from where (issue 21): a pure decision, the
//! same on every host from the same listing, so that a deploy costs the
//! origin a few copies whatever the fleet's size.
//!
//! The agents that serve artifacts (`listen`) are ranked per artifact by a
//! hash of its digest and their names (rendezvous: each artifact has other
//! first hosts). The first `origin_hosts` of them fetch from the origin at
//! once; every other host asks the peers above it in a tree: in its zone,
//! those first hosts (or, in a zone that has none, the zone's first host,
//! which asks them across zones) have [`FAN_OUT`] children each, who have as
//! many each, and so on. A host asks its parent, the parent's parent, … up
//! to the first hosts (a first host asks the others and those right below
//! them once, for a host that joins late). So each peer serves a few hosts, a
//! zone pulls about one copy across its uplink, and the copies double and
//! more at each step: the time grows with the tree's depth, the logarithm
//! of the fleet. A host that finds no peer with it for a while (its
//! parents failed or are gone) fetches from the origin after all.

use std::net::SocketAddr;

/// How many hosts each peer feeds in the tree (its upload slots).
pub(crate) const FAN_OUT: usize = crate::peer::UPLOADS;

/// How many hosts fetch an artifact from the origin at once, when the
/// deploy does not say.
pub(crate) const ORIGIN_HOSTS: usize = 2;

/// An agent of the prefix, as it announces itself and reports the version.
#[derive(Clone, Debug)]
pub(crate) struct Member<'a> {
    pub name: &'a str,
    /// Where it serves artifacts, if it does.
    pub listen: Option<SocketAddr>,
    pub zone: Option<&'a str>,
}

/// Where a host fetches an artifact from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sources {
    /// The peers to ask, in this order, again until one serves it.
    pub peers: Vec<SocketAddr>,
    /// The origin is for this host now (after one pass over its peers);
    /// otherwise only when no peer has had it for a while.
    pub origin_now: bool,
}

/// Where `me` (in `my_zone`) fetches the artifact `sha256` from, given the
/// prefix's agents (`me` among them or not).
pub(crate) fn sources(
    me: &str,
    my_zone: Option<&str>,
    members: &[Member<'_>],
    sha256: &str,
    origin_hosts: usize,
) -> Sources {
    let mut servers: Vec<&Member<'_>> = members.iter().filter(|m| m.listen.is_some()).collect();
    servers.sort_by_cached_key(|m| (rank(sha256, m.name), m.name));
    servers.dedup_by_key(|m| m.name);
    // The first hosts: the best-ranked host of each zone in turn (zones in
    // the order of their best host), so that with hosts in several sites
    // each of the first few sites pulls its own copy from the origin.
    let wanted = origin_hosts.max(1).min(servers.len());
    let mut first: Vec<&Member<'_>> = Vec::with_capacity(wanted);
    while first.len() < wanted {
        let mut zones = Vec::new();
        for m in &servers {
            if first.len() < wanted
                && !zones.contains(&m.zone)
                && !first.iter().any(|f| f.name == m.name)
            {
                zones.push(m.zone);
                first.push(m);
            }
        }
    }
    let is_first = |m: &Member<'_>| first.iter().any(|f| f.name == m.name);
    let same_zone = |m: &Member<'_>| m.zone == my_zone;
    let mut peers = Vec::new();
    let mut add = |member: &Member<'_>| {
        if let Some(addr) = member.listen
            && member.name != me
            && !peers.contains(&addr)
        {
            peers.push(addr);
        }
    };
    if first.iter().any(|m| m.name == me) || !servers.iter().any(|m| m.name != me) {
        // A first host asks, once, the other first hosts and the hosts
        // right below them in its zone (they have it when this host joins
        // late, or comes back), then the origin.
        first.iter().for_each(|m| add(m));
        let below = servers.iter().filter(|m| same_zone(m) && !is_first(m));
        below.take(FAN_OUT).for_each(|m| add(m));
        return Sources {
            peers,
            origin_now: true,
        };
    }
    // This zone's tree: its first hosts at the top (or its own first host,
    // hanging below the first hosts of another zone), the others below.
    let same_zone = |m: &Member<'_>| m.zone == my_zone;
    let mut zone: Vec<&Member<'_>> = first.iter().copied().filter(|m| same_zone(m)).collect();
    let tops = zone.len().max(1);
    zone.extend(servers.iter().filter(|m| same_zone(m) && !is_first(m)));
    let position = zone.iter().position(|m| m.name == me);
    let mut at = match position {
        Some(i) if i >= tops => Some((i - tops) / FAN_OUT),
        Some(_) => None, // the zone's first host: straight to the first hosts
        // Not serving: a leaf below any of the zone's hosts.
        None if !zone.is_empty() => Some(spin(me) % zone.len()),
        None => None,
    };
    while let Some(i) = at {
        add(zone[i]);
        at = (i >= tops).then(|| (i - tops) / FAN_OUT);
    }
    // Then the first hosts: of any zone for the zone's top host (or a host
    // of a zone that serves nothing), of its own zone for the others: a
    // zone's copy crosses once, through its top.
    let top = position.is_some_and(|i| i < tops) || zone.is_empty();
    first
        .iter()
        .filter(|m| top || same_zone(m))
        .for_each(|m| add(m));
    Sources {
        peers,
        origin_now: false,
    }
}

/// An agent's rank for an artifact (FNV-1a over both names).
fn rank(sha256: &str, name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sha256.bytes().chain([0]).chain(name.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix (splitmix64's): names that differ in their last byte
    // (node18, node19) would otherwise rank side by side for every artifact.
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// A number of this host's own, to turn lists by.
fn spin(me: &str) -> usize {
    rank("", me) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn fleet(n: usize, zones: &[&'static str]) -> Vec<(String, SocketAddr, Option<&'static str>)> {
        (0..n)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
                (
                    format!("node{i}"),
                    addr,
                    zones.get(i % zones.len().max(1)).copied(),
                )
            })
            .collect()
    }

    fn members<'a>(fleet: &'a [(String, SocketAddr, Option<&'static str>)]) -> Vec<Member<'a>> {
        fleet
            .iter()
            .map(|(name, addr, zone)| Member {
                name,
                listen: Some(*addr),
                zone: *zone,
            })
            .collect()
    }

    /// Who each host asks first (its parent), and whether it may go to
    /// the origin at once.
    fn decide(fleet: &[(String, SocketAddr, Option<&'static str>)], k: usize) -> Vec<Sources> {
        let members = members(fleet);
        fleet
            .iter()
            .map(|(name, _, zone)| sources(name, *zone, &members, SHA, k))
            .collect()
    }

    #[test]
    fn only_the_first_hosts_go_to_the_origin_and_every_other_host_has_a_parent() {
        for n in [1, 2, 3, 8, 64, 1000] {
            let fleet = fleet(n, &[]);
            let decided = decide(&fleet, 2);
            let to_origin = decided.iter().filter(|s| s.origin_now).count();
            assert_eq!(to_origin, n.min(2), "n = {n}");
            for sources in decided.iter().filter(|s| !s.origin_now) {
                assert!(!sources.peers.is_empty());
            }
        }
    }

    #[test]
    fn each_peer_feeds_a_few_hosts_and_the_tree_is_shallow() {
        let fleet = fleet(1000, &[]);
        let decided = decide(&fleet, 2);
        let mut children = std::collections::HashMap::new();
        for sources in decided.iter().filter(|s| !s.origin_now) {
            *children.entry(sources.peers[0]).or_insert(0) += 1;
            // Parent, grandparent, … and the other first host.
            assert!(sources.peers.len() <= 7, "{:?}", sources.peers);
        }
        assert!(children.values().all(|&c| c <= FAN_OUT), "{children:?}");
        // Every host's parent is a host that fetches before it: no cycles.
        let by_addr: std::collections::HashMap<_, _> =
            fleet.iter().zip(&decided).map(|(f, s)| (f.1, s)).collect();
        for sources in &decided {
            let mut at = sources;
            let mut steps = 0;
            while !at.origin_now {
                at = by_addr[&at.peers[0]];
                steps += 1;
                assert!(steps < 10);
            }
        }
    }

    #[test]
    fn a_first_host_asks_the_other_first_hosts_and_those_below_them_once() {
        // When it joins late they have it; on a fresh deploy they answer
        // "fetching" or "not yet", and it goes to the origin.
        let fleet = fleet(8, &[]);
        let members = members(&fleet);
        let decided = decide(&fleet, 2);
        let (first, _) = fleet
            .iter()
            .zip(&decided)
            .find(|(_, s)| s.origin_now)
            .unwrap();
        let mine = sources(&first.0, None, &members, SHA, 2);
        assert!(mine.origin_now);
        assert_eq!(mine.peers.len(), 1 + FAN_OUT, "{:?}", mine.peers);
        assert!(!mine.peers.contains(&first.1));
    }

    #[test]
    fn a_zone_pulls_its_copy_across_through_one_host() {
        // Zone b has no first host: its own first host asks across zones,
        // all other hosts of b ask within b first.
        let fleet = fleet(16, &["a", "b"]);
        let members = members(&fleet);
        let first: Vec<_> = fleet
            .iter()
            .filter(|(n, _, z)| sources(n, *z, &members, SHA, 1).origin_now)
            .collect();
        assert_eq!(first.len(), 1);
        let other = if first[0].2 == Some("a") { "b" } else { "a" };
        let zone_of = |addr: &SocketAddr| fleet.iter().find(|f| f.1 == *addr).unwrap().2;
        let across = fleet
            .iter()
            .filter(|f| f.2 == Some(other))
            .filter(|(n, _, z)| zone_of(&sources(n, *z, &members, SHA, 1).peers[0]) != *z)
            .count();
        assert_eq!(across, 1, "one host of zone {other} asks across");
    }

    #[test]
    fn the_first_hosts_are_spread_over_the_zones() {
        let fleet = fleet(16, &["a", "b", "c"]);
        let decided = decide(&fleet, 2);
        let mut zones: Vec<_> = fleet
            .iter()
            .zip(&decided)
            .filter(|(_, s)| s.origin_now)
            .map(|(f, _)| f.2)
            .collect();
        zones.dedup();
        assert_eq!(zones.len(), 2, "two first hosts, in two zones");
        // Only the top host of the zone without one asks across zones.
        let zone_of = |addr: &SocketAddr| fleet.iter().find(|f| f.1 == *addr).unwrap().2;
        let asking_across = fleet
            .iter()
            .zip(&decided)
            .filter(|(f, s)| !s.origin_now && s.peers.iter().any(|p| zone_of(p) != f.2))
            .count();
        assert_eq!(asking_across, 1);
    }

    #[test]
    fn the_first_hosts_of_different_artifacts_are_spread_over_the_fleet() {
        // 200 artifacts on 64 hosts: the first host of each is drawn from
        // most of the fleet, and the two first hosts are not neighbours.
        let fleet = fleet(64, &[]);
        let members = members(&fleet);
        let mut firsts = std::collections::BTreeSet::new();
        let mut neighbours = 0;
        for i in 0..200u32 {
            let sha = format!("{:064x}", u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let first: Vec<usize> = fleet
                .iter()
                .enumerate()
                .filter(|(_, (n, _, z))| sources(n, *z, &members, &sha, 2).origin_now)
                .map(|(i, _)| i)
                .collect();
            firsts.insert(first[0]);
            neighbours += usize::from(first[1] - first[0] == 1);
        }
        assert!(firsts.len() >= 48, "{} hosts ever first", firsts.len());
        assert!(neighbours < 20, "{neighbours} of 200 pairs were neighbours");
    }

    #[test]
    fn a_host_that_serves_nothing_is_a_leaf_and_a_lone_host_goes_to_the_origin() {
        let fleet = fleet(4, &[]);
        let members = members(&fleet);
        let leaf = sources("edge", None, &members, SHA, 2);
        assert!(!leaf.origin_now && !leaf.peers.is_empty());
        assert!(sources("edge", None, &[], SHA, 2).origin_now);
        let alone = members[..1].to_vec();
        assert!(sources("node0", None, &alone, SHA, 2).origin_now);
    }
}
