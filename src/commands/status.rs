//! `status` (alias `query`): every version in creation order, which one is
//! current, and each live node's state, as aligned tables or as JSON.
//!
//! The JSON document (stable; fields are only ever added):
//!
//! ```json
//! { "prefix": "api/version",
//!   "current": "v2",                       // null when unset or invalid
//!   "versions": [
//!     { "name": "v1", "current": false,
//!       "removing": false,                  // folder key gone, nodes still cleaning
//!       "create_index": 12,
//!       "created_at": "2026-11-26T10:00:00.000Z", "created_by": "ops@host",   // or null
//!       "current_since": null, "current_by": null,
//!       "counts": { "busy": 0, "ready": 3, "active": 0, "failed": 0 },
//!       "nodes": { "node1": "ready", "node2": "ready", "node3": "ready" } } ],
//!   "ignored": [ "../" ] }
//! ```

use std::collections::BTreeSet;

use super::{Ctx, version_arg};
use crate::cli::StatusArgs;
use crate::config::Env;
use crate::error::{Error, Result};
use crate::tree::{NodeState, Prefix, Tree, shown};

pub(crate) fn status(args: StatusArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let only = args.version.as_deref().map(version_arg).transpose()?;
    let tree = ctx.read_existing_tree()?;
    if let Some(version) = &only {
        if !tree.versions.contains_key(version) {
            return Err(Error::Refused(format!(
                "{version} is not in the tree under {}; `depro status -prefix={}` lists the versions",
                ctx.prefix, ctx.prefix
            )));
        }
    }
    let filter = |v: &crate::version_name::VersionName| only.as_ref().is_none_or(|o| o == v);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&ctx.prefix, &tree, &filter)).unwrap_or_default()
        );
    } else {
        print!("{}", table(&ctx.prefix, &tree, &filter));
    }
    Ok(())
}

/// Above this many nodes, the node × version table is only printed for one version.
const MATRIX_NODES: usize = 20;

const STATES: [NodeState; 4] = [
    NodeState::Active,
    NodeState::Ready,
    NodeState::Busy,
    NodeState::Failed,
];

pub(crate) fn json(
    prefix: &Prefix,
    tree: &Tree,
    filter: &dyn Fn(&crate::version_name::VersionName) -> bool,
) -> serde_json::Value {
    let current = tree.current_version();
    let versions: Vec<serde_json::Value> = tree
        .in_creation_order()
        .into_iter()
        .filter(|(v, _)| filter(v))
        .map(|(name, info)| {
            let count = |s: NodeState| info.nodes.values().filter(|e| e.state == s).count();
            let nodes: serde_json::Map<String, serde_json::Value> = info
                .nodes
                .iter()
                .map(|(n, e)| (n.clone(), e.state.as_str().into()))
                .collect();
            serde_json::json!({
                "name": name.as_str(),
                "current": Some(name) == current,
                "removing": !info.exists,
                "create_index": info.create_index,
                "created_at": info.meta.created_at,
                "created_by": info.meta.created_by,
                "current_since": info.meta.current_since,
                "current_by": info.meta.current_by,
                "counts": {
                    "busy": count(NodeState::Busy), "ready": count(NodeState::Ready),
                    "active": count(NodeState::Active), "failed": count(NodeState::Failed),
                },
                "nodes": nodes,
            })
        })
        .collect();
    serde_json::json!({
        "prefix": prefix.to_string(),
        "current": current.map(|c| c.as_str()),
        "versions": versions,
        "ignored": tree.ignored.iter().collect::<Vec<_>>(),
    })
}

/// Two aligned tables: versions with their counts, then nodes × versions.
pub(crate) fn table(
    prefix: &Prefix,
    tree: &Tree,
    filter: &dyn Fn(&crate::version_name::VersionName) -> bool,
) -> String {
    let current = tree.current_version();
    let versions: Vec<_> = tree
        .in_creation_order()
        .into_iter()
        .filter(|(v, _)| filter(v))
        .collect();
    let mut out = format!(
        "{prefix}: current {}\n\n",
        match (&tree.current, current) {
            (_, Some(c)) => c.to_string(),
            (Some(raw), None) => format!("\"{}\" (not a valid version)", shown(&raw.value)),
            (None, None) => "unset".to_string(),
        }
    );
    let mut rows = vec![vec![
        "VERSION".to_string(),
        "".into(),
        "ACTIVE".into(),
        "READY".into(),
        "BUSY".into(),
        "FAILED".into(),
        "CREATED".into(),
    ]];
    for (name, info) in &versions {
        let mark = if Some(*name) == current {
            "current"
        } else if !info.exists {
            "removing"
        } else {
            ""
        };
        let mut row = vec![name.to_string(), mark.to_string()];
        for state in STATES {
            row.push(
                info.nodes
                    .values()
                    .filter(|e| e.state == state)
                    .count()
                    .to_string(),
            );
        }
        row.push(
            info.meta
                .created_at
                .as_deref()
                .map_or_else(|| "-".into(), shown),
        );
        rows.push(row);
    }
    out.push_str(&align(&rows));
    let nodes: BTreeSet<&String> = versions.iter().flat_map(|(_, i)| i.nodes.keys()).collect();
    let one_version = versions.len() == 1;
    if nodes.len() > MATRIX_NODES && !one_version {
        out.push_str(&format!(
            "\n{} nodes: `depro status -prefix={prefix} VERSION` lists them for one version, -json for all\n",
            nodes.len()
        ));
    } else if !nodes.is_empty() {
        out.push('\n');
        let mut rows = vec![
            std::iter::once("NODE".to_string())
                .chain(versions.iter().map(|(v, _)| v.to_string()))
                .collect(),
        ];
        for node in nodes {
            let mut row = vec![node.clone()];
            for (_, info) in &versions {
                row.push(
                    info.nodes
                        .get(node)
                        .map_or("-".to_string(), |e| e.state.to_string()),
                );
            }
            rows.push(row);
        }
        out.push_str(&align(&rows));
    }
    if !tree.ignored.is_empty() {
        let list: Vec<String> = tree.ignored.iter().take(20).map(|n| shown(n)).collect();
        out.push_str(&format!(
            "\nignored (not valid names): {}\n",
            list.join(", ")
        ));
    }
    out
}

fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::KvEntry;

    fn entry(key: &str, value: &str, create: u64) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            session: (!key.ends_with('/') && !key.ends_with("/current")).then(|| "s".to_string()),
            create_index: create,
            modify_index: create,
        }
    }

    fn sample() -> (Prefix, Tree) {
        let prefix = Prefix::parse("api/version").unwrap();
        let tree = Tree::parse(
            &prefix,
            &[
                entry("api/version/current", "v2", 9),
                entry("api/version/v2/", "", 5),
                entry("api/version/v2/node1", "active", 6),
                entry("api/version/v2/node2", "busy", 7),
                entry("api/version/v1/", "", 1),
                entry("api/version/v1/node1", "ready", 2),
                entry("api/version/v1/node2", "failed", 3),
            ],
        );
        (prefix, tree)
    }

    #[test]
    fn the_table_lists_versions_in_creation_order_and_nodes_by_version() {
        let (prefix, tree) = sample();
        let text = table(&prefix, &tree, &|_| true);
        let expected = "\
api/version: current v2

VERSION           ACTIVE  READY  BUSY  FAILED  CREATED
v1                0       1      0     1       -
v2       current  1       0      1     0       -

NODE   v1      v2
node1  ready   active
node2  failed  busy
";
        assert_eq!(text, expected);
    }

    #[test]
    fn large_fleets_get_the_node_table_only_for_one_version() {
        let prefix = Prefix::parse("api/version").unwrap();
        let mut entries = vec![
            entry("api/version/v1/", "", 1),
            entry("api/version/v2/", "", 2),
        ];
        for n in 0..25 {
            entries.push(entry(
                &format!("api/version/v1/node{n:02}"),
                "ready",
                10 + n,
            ));
            entries.push(entry(
                &format!("api/version/v2/node{n:02}"),
                "active",
                100 + n,
            ));
        }
        let tree = Tree::parse(&prefix, &entries);
        let all = table(&prefix, &tree, &|_| true);
        assert!(
            all.contains("25 nodes: `depro status -prefix=api/version VERSION`"),
            "{all}"
        );
        assert!(!all.contains("node07"), "{all}");
        let one = table(&prefix, &tree, &|v| v.as_str() == "v2");
        assert!(one.contains("node07  active"), "{one}");
    }

    #[test]
    fn hostile_names_and_metadata_reach_the_terminal_escaped() {
        let prefix = Prefix::parse("api/version").unwrap();
        let mut hostile = entry("api/version/v1/", r#"{"created_at": "\u001b[2J"}"#, 1);
        hostile.session = None;
        let tree = Tree::parse(
            &prefix,
            &[hostile, entry("api/version/\x1b]0;owned\x07/", "", 2)],
        );
        let text = table(&prefix, &tree, &|_| true);
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(text.contains("\\u{1b}"), "{text}");
    }

    #[test]
    fn the_json_document_has_its_documented_shape() {
        let (prefix, tree) = sample();
        let doc = json(&prefix, &tree, &|_| true);
        assert_eq!(doc["prefix"], "api/version");
        assert_eq!(doc["current"], "v2");
        assert_eq!(doc["versions"][0]["name"], "v1");
        assert_eq!(doc["versions"][1]["current"], true);
        assert_eq!(doc["versions"][1]["counts"]["busy"], 1);
        assert_eq!(doc["versions"][0]["nodes"]["node2"], "failed");
        assert_eq!(doc["versions"][0]["removing"], false);
        assert!(doc["ignored"].as_array().unwrap().is_empty());
    }
}
