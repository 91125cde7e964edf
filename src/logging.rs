//! The agent's log: one line per event on stderr. Under systemd (when
//! `JOURNAL_STREAM` is set) lines carry a syslog priority prefix instead of
//! a timestamp, so the journal records levels and times itself. With
//! `-log-format=json`, each line is one JSON object for log shippers:
//! `time`, `level`, `node`, `deployment` and `version` (when the line is
//! about one), `message`.

use std::io::Write;
use std::sync::RwLock;

/// The log's format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Format {
    #[default]
    Text,
    Json,
}

impl Format {
    pub(crate) fn parse(text: &str) -> Option<Format> {
        match text {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// What JSON lines name: this node, and the deployments it runs (a line is
/// about a deployment when it starts with its id, as the agent writes them:
/// `api v1: active`, `api: …`, `[api v1 deploy] …`).
#[derive(Default)]
struct Context {
    node: String,
    deployments: Vec<String>,
}

static CONTEXT: RwLock<Context> = RwLock::new(Context {
    node: String::new(),
    deployments: Vec::new(),
});

/// Sets the node name and deployment ids JSON lines are labelled with (at
/// start and on reload).
pub(crate) fn set_context(node: &str, deployments: Vec<String>) {
    let mut context = CONTEXT.write().unwrap_or_else(|e| e.into_inner());
    context.node = node.to_string();
    context.deployments = deployments;
}

/// The deployment and version a line is about, from its start.
fn about(message: &str, deployments: &[String]) -> (Option<String>, Option<String>) {
    let text = message.strip_prefix('[').unwrap_or(message);
    for id in deployments {
        let Some(rest) = text.strip_prefix(id.as_str()) else {
            continue;
        };
        if rest.starts_with(':') {
            return (Some(id.clone()), None);
        }
        if let Some(rest) = rest.strip_prefix(' ') {
            let word = rest.split([' ', ':', ']']).next().unwrap_or("");
            let version = crate::version_name::VersionName::parse(word)
                .ok()
                .map(|v| v.to_string());
            return (Some(id.clone()), version);
        }
    }
    (None, None)
}

/// One JSON log line.
fn json_line(level: log::Level, message: &str) -> String {
    let context = CONTEXT.read().unwrap_or_else(|e| e.into_inner());
    let (deployment, version) = about(message, &context.deployments);
    let mut line = serde_json::json!({
        "time": timestamp(),
        "level": level.as_str().to_ascii_lowercase(),
        "node": context.node,
        "message": message,
    });
    if let Some(deployment) = deployment {
        line["deployment"] = deployment.into();
    }
    if let Some(version) = version {
        line["version"] = version.into();
    }
    line.to_string()
}

/// Starts logging at `level`. `DEPRO_LOG` (env_logger syntax, e.g.
/// `debug` or `depro=trace`) overrides it for debugging.
pub(crate) fn init(level: log::LevelFilter, format: Format) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut builder = env_logger::Builder::new();
    // depro's own lines at any level; the libraries' only when they warn.
    builder.filter_level(log::LevelFilter::Warn);
    builder.filter_module("depro", log::LevelFilter::Trace);
    builder.target(env_logger::Target::Stderr);
    builder.format(move |out, record| {
        if format == Format::Json {
            writeln!(
                out,
                "{}",
                json_line(record.level(), &record.args().to_string())
            )
        } else if journal {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(out, "<{priority}>{}", record.args())
        } else {
            writeln!(
                out,
                "{} {:<5} {}",
                timestamp(),
                record.level(),
                record.args()
            )
        }
    });
    let _ = builder.try_init();
    set_level(level);
}

/// Changes the level (on reload). `DEPRO_LOG` still wins.
pub(crate) fn set_level(level: log::LevelFilter) {
    let level = std::env::var("DEPRO_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(level);
    log::set_max_level(level);
}

/// Now, as `2026-11-26T10:18:16.123Z` (UTC).
pub(crate) fn timestamp() -> String {
    timestamp_of(now_ms())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// `ms` since the Unix epoch in RFC 3339, UTC, e.g. `2026-11-27T10:00:00.000Z`.
pub(crate) fn timestamp_of(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_line_about_a_deployment_names_it_and_its_version() {
        let ids = vec!["api".to_string(), "api-web".to_string()];
        let about = |m: &str| super::about(m, &ids);
        assert_eq!(
            about("api v1: active"),
            (Some("api".into()), Some("v1".into()))
        );
        assert_eq!(
            about("[api v1 deploy] fetching"),
            (Some("api".into()), Some("v1".into()))
        );
        assert_eq!(
            about("api: nothing under x; waiting"),
            (Some("api".into()), None)
        );
        assert_eq!(
            about("api-web v2: ready"),
            (Some("api-web".into()), Some("v2".into()))
        );
        assert_eq!(about("registered with Consul"), (None, None));
        assert_eq!(about("apixyz: other"), (None, None));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_418), (2025, 11, 26));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
