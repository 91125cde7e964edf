//! `history`: which version was current when, switched by whom and how,
//! newest first, from what the tree records: `<prefix>/.history` (the last
//! 100 switches made by depro), then, for older switches or other tools,
//! what each version's key says of the last time it was made current.

use super::{Ctx, status::SCHEMA};
use crate::cli::HistoryArgs;
use crate::config::Env;
use crate::error::Result;
use crate::tree::{Switch, Tree, shown};

pub(crate) fn history(args: HistoryArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let tree = ctx.read_existing_tree()?;
    let switches = switches(&tree);
    if args.tree.json {
        let doc = serde_json::json!({
            "schema": SCHEMA,
            "prefix": ctx.prefix.to_string(),
            "current": tree.current_version().map(|v| v.as_str()),
            "switches": switches,
            "policies": tree.history.policies,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(());
    }
    if switches.is_empty() {
        println!(
            "{}: no switch of current recorded (current {})",
            ctx.prefix,
            tree.current_version()
                .map_or("unset".to_string(), |v| v.to_string())
        );
        print_policies(&tree);
        return Ok(());
    }
    let mut rows = vec![
        ["SINCE", "VERSION", "FROM", "HOW", "BY", "MESSAGE"]
            .map(String::from)
            .to_vec(),
    ];
    for switch in &switches {
        let dash = |text: &str| {
            if text.is_empty() {
                "-".to_string()
            } else {
                shown(text)
            }
        };
        rows.push(vec![
            dash(&switch.since),
            dash(&switch.version),
            dash(&switch.from),
            dash(&switch.how),
            dash(&switch.by),
            crate::tree::shown_line(&switch.message),
        ]);
    }
    print!("{}", super::status::align(&rows));
    print_policies(&tree);
    Ok(())
}

/// The changes of the rollout policy (`depro policy`), newest first.
fn print_policies(tree: &Tree) {
    if tree.history.policies.is_empty() {
        return;
    }
    let mut rows = vec![
        ["POLICY SINCE", "POLICY", "BY", "MESSAGE"]
            .map(String::from)
            .to_vec(),
    ];
    for policy in &tree.history.policies {
        rows.push(vec![
            shown(&policy.since),
            match policy.flags.is_empty() {
                true => "(cleared)".into(),
                false => shown(&policy.flags),
            },
            shown(&policy.by),
            crate::tree::shown_line(&policy.message),
        ]);
    }
    println!();
    print!("{}", super::status::align(&rows));
}

/// The switches, newest first: `.history`, then older ones from the
/// versions' keys (the last time each was made current).
pub(crate) fn switches(tree: &Tree) -> Vec<Switch> {
    let mut switches = tree.history.switches.clone();
    let oldest = switches.last().map(|s| s.since.clone());
    let mut older: Vec<(u64, Switch)> = tree
        .versions
        .iter()
        .filter_map(|(version, info)| {
            let since = info.meta.current_since.clone()?;
            let recorded = switches
                .iter()
                .any(|s| s.version == version.as_str() && s.since == since);
            let before = oldest.as_ref().is_none_or(|oldest| since < *oldest);
            (!recorded && before).then(|| {
                (
                    info.meta.current_order.unwrap_or_default(),
                    Switch {
                        version: version.to_string(),
                        from: String::new(),
                        since,
                        by: info.meta.current_by.clone().unwrap_or_default(),
                        how: info.meta.current_how.clone().unwrap_or_default(),
                        message: info.meta.current_message.clone().unwrap_or_default(),
                        after: 0,
                    },
                )
            })
        })
        .collect();
    older.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
    switches.extend(older.into_iter().map(|(_, s)| s));
    switches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::KvEntry;
    use crate::tree::{History, Prefix};

    fn entry(key: &str, value: &str, index: u64) -> KvEntry {
        KvEntry::sample(key, value, false, index)
    }

    #[test]
    fn the_record_comes_first_then_older_switches_from_the_versions_keys() {
        let prefix = Prefix::parse("p").unwrap();
        let history = History::default()
            .with(Switch {
                version: "v2".into(),
                from: "v1".into(),
                since: "2026-11-27T10:00:00Z".into(),
                by: "ops".into(),
                how: "deploy".into(),
                message: "fixes the login timeout".into(),
                ..Switch::default()
            })
            .with(Switch {
                version: "v1".into(),
                from: "v2".into(),
                since: "2026-11-27T11:00:00Z".into(),
                by: "ops".into(),
                how: "rollback".into(),
                ..Switch::default()
            });
        let json = String::from_utf8(history.to_json()).unwrap();
        let tree = Tree::parse(
            &prefix,
            &[
                entry("p/current", "v1", 20),
                entry("p/.history", &json, 20),
                // Recorded, and the last time it was current: not repeated.
                entry(
                    "p/v1/",
                    r#"{"current_since":"2026-11-27T11:00:00Z","current_order":9}"#,
                    1,
                ),
                entry(
                    "p/v2/",
                    r#"{"current_since":"2026-11-27T10:00:00Z","current_order":5}"#,
                    2,
                ),
                // Made current before the record began.
                entry(
                    "p/v0/",
                    r#"{"current_since":"2026-11-26T09:00:00Z","current_by":"seed","current_order":2}"#,
                    1,
                ),
            ],
        );
        let switches = switches(&tree);
        let versions: Vec<&str> = switches.iter().map(|s| s.version.as_str()).collect();
        assert_eq!(versions, ["v1", "v2", "v0"]);
        assert_eq!(switches[0].how, "rollback");
        assert_eq!(switches[1].message, "fixes the login timeout");
        assert_eq!(switches[2].by, "seed");
    }

    #[test]
    fn the_record_keeps_the_last_hundred_switches() {
        let mut history = History::default();
        for i in 0..150 {
            history = history.with(Switch {
                version: format!("v{i}"),
                ..Switch::default()
            });
        }
        assert_eq!(history.switches.len(), crate::tree::HISTORY_KEPT);
        assert_eq!(history.switches[0].version, "v149");
    }
}
