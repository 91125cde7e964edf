//! Resolving settings: config files, environment and flags, merged and
//! validated into the values the agent and the commands run with.
//!
//! Precedence: flag > environment > config file > default. Config files come
//! from `-config-dir` (every `*.json` in name order) and `-config-file`, in
//! the order given; scalars from later files override earlier ones and
//! deployments append. Every error names the file and line/column or the
//! key, and says what to do. The token is never part of an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{AgentArgs, ConnectionFlags};
use crate::consul::{ConsulSettings, Secret};
use crate::error::Error;
use crate::tree::{Prefix, check_node_name};

pub(crate) const DEFAULT_SERVER: &str = "127.0.0.1:8500";
pub(crate) const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(600);
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(15);
pub(crate) const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(300);
pub(crate) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads an environment variable; empty counts as unset.
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, as an [`Env`].
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// One config file, as written. Field names are the documented ones
/// (depro.json(5)); unknown fields are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    server: Option<String>,
    datacenter: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    tls_skip_verify: Option<bool>,
    log_level: Option<String>,
    shutdown_grace: Option<String>,
    session_ttl: Option<String>,
    rescan_interval: Option<String>,
    max_parallel_hooks: Option<u32>,
    /// `ADDR:PORT` to serve verified artifacts to the fleet's agents on.
    listen: Option<String>,
    /// This host's site: peers in the same zone are asked first.
    zone: Option<String>,
    /// The most this host uploads to peers, e.g. `"20MB/s"`.
    upload_limit: Option<String>,
    /// Where to write the agent's metrics (Prometheus' text format).
    metrics_file: Option<PathBuf>,
    #[serde(default)]
    deployments: Vec<FileDeployment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDeployment {
    id: String,
    path: String,
    prefix: String,
    shell: Option<String>,
    #[serde(default)]
    deploy: Vec<String>,
    #[serde(default)]
    rollout: Vec<String>,
    #[serde(default)]
    clean: Vec<String>,
    #[serde(default)]
    health: Vec<String>,
    timeout: Option<String>,
    health_timeout: Option<String>,
    /// Public key lines (`depro keygen`'s FILE.pub): when set, only
    /// versions whose artifact one of them signed are deployed.
    #[serde(default)]
    trusted_keys: Vec<String>,
}

/// A deployment, ready to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Deployment {
    pub id: String,
    pub path: PathBuf,
    pub prefix: Prefix,
    pub shell: PathBuf,
    pub deploy: Vec<String>,
    pub rollout: Vec<String>,
    pub clean: Vec<String>,
    /// Run after each rollout, again until it succeeds or `health_timeout`
    /// passes: the node reports the version `active` only once healthy.
    pub health: Vec<String>,
    pub timeout: Duration,
    pub health_timeout: Duration,
    /// Only versions whose artifact one of these signed are deployed
    /// (none: any version).
    pub trusted_keys: Vec<crate::signing::PublicKey>,
    /// Where it was defined, for messages: `/etc/depro/api.json, deployments[0]`.
    pub origin: String,
}

/// Everything the agent runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AgentConfig {
    /// What was accepted only because of `-allow-insecure-config`, to log.
    pub warnings: Vec<String>,
    pub name: String,
    pub consul: ConsulSettings,
    pub log_level: log::LevelFilter,
    pub shutdown_grace: Duration,
    pub session_ttl: Duration,
    /// How often at most an agent reads each tree whole, to catch changes
    /// made by tools that do not ring the doorbell.
    pub rescan_interval: Duration,
    /// How many deploy and clean hooks may run at once on the host
    /// (`None`: one per deployment). Rollout and health hooks are not
    /// counted: they never wait.
    pub max_parallel_hooks: Option<usize>,
    /// Where to serve verified artifacts to the fleet's agents (`listen`).
    pub listen: Option<std::net::SocketAddr>,
    /// This host's site (`zone`): peers in the same zone are asked first.
    pub zone: Option<String>,
    /// The most it uploads to peers, in bytes per second (`upload_limit`).
    pub upload_limit: Option<u64>,
    /// Where to write its metrics (`metrics_file`).
    pub metrics_file: Option<PathBuf>,
    pub deployments: Vec<Deployment>,
    /// The config files that were read, for messages.
    pub files: Vec<PathBuf>,
}

/// Resolves the agent's settings from its flags, the environment and the
/// config files the flags name.
pub(crate) fn resolve_agent(args: &AgentArgs, env: Env<'_>) -> Result<AgentConfig, Error> {
    let files = config_files(args)?;
    let mut warnings = Vec::new();
    for problem in insecure_config(args, &files) {
        if !args.allow_insecure_config {
            return Err(Error::Config(format!(
                "{problem}, and the agent runs its hooks as its own user (often root); \
                 fix the owner or mode (chmod go-w), or start the agent with -allow-insecure-config \
                 to accept it knowingly"
            )));
        }
        warnings.push(format!("{problem} (accepted: -allow-insecure-config)"));
    }
    let mut merged = FileConfig::default();
    let mut scalar_origin: BTreeMap<&'static str, PathBuf> = BTreeMap::new();
    let mut deployments = Vec::new();
    for path in &files {
        let file = read_file(path)?;
        macro_rules! take {
            ($($field:ident),*) => {$(
                if file.$field.is_some() {
                    merged.$field = file.$field;
                    scalar_origin.insert(stringify!($field), path.clone());
                }
            )*};
        }
        take!(
            name, server, datacenter, token, token_file, ca_file, cert_file, key_file
        );
        take!(
            tls_skip_verify,
            log_level,
            shutdown_grace,
            session_ttl,
            rescan_interval,
            max_parallel_hooks,
            listen,
            zone,
            upload_limit,
            metrics_file
        );
        for (i, deployment) in file.deployments.into_iter().enumerate() {
            deployments.push((format!("{}: deployments[{i}]", path.display()), deployment));
        }
    }
    let origin = |field: &'static str| match scalar_origin.get(field) {
        Some(path) => format!("{}: {field}", path.display()),
        None => field.to_string(),
    };

    let name = match args
        .name
        .clone()
        .or_else(|| env("DEPRO_NAME"))
        .or(merged.name.clone())
    {
        Some(name) => name,
        None => hostname()?,
    };
    check_node_name(&name).map_err(|why| {
        Error::Config(format!(
            "node name {name:?} (from -name, DEPRO_NAME, \"name\" or the hostname): {why}; set -name"
        ))
    })?;

    let file_connection = FileConnection {
        server: merged.server.clone(),
        datacenter: merged.datacenter.clone(),
        token: merged.token.clone(),
        token_file: merged.token_file.clone(),
        ca_file: merged.ca_file.clone(),
        cert_file: merged.cert_file.clone(),
        key_file: merged.key_file.clone(),
        tls_skip_verify: merged.tls_skip_verify,
    };
    let consul = resolve_connection(&args.connection, env, &file_connection)?;

    let log_level = match args
        .log_level
        .clone()
        .map(|l| (l, "-log-level".to_string()))
        .or_else(|| merged.log_level.clone().map(|l| (l, origin("log_level"))))
    {
        Some((text, from)) => parse_log_level(&text).ok_or_else(|| {
            Error::Config(format!(
                "{from}: {text:?} is not a log level; use error, warn, info, debug or trace"
            ))
        })?,
        None => log::LevelFilter::Info,
    };
    let duration_field =
        |value: &Option<String>, field: &'static str, default: Duration| match value {
            None => Ok(default),
            Some(text) => crate::duration::parse(text)
                .map_err(|why| Error::Config(format!("{}: {why}", origin(field)))),
        };
    let shutdown_grace = duration_field(&merged.shutdown_grace, "shutdown_grace", DEFAULT_GRACE)?;
    let session_ttl = duration_field(&merged.session_ttl, "session_ttl", DEFAULT_SESSION_TTL)?;
    if !(Duration::from_secs(10)..=Duration::from_secs(86400)).contains(&session_ttl) {
        return Err(Error::Config(format!(
            "{}: Consul accepts session TTLs from 10s to 24h",
            origin("session_ttl")
        )));
    }
    let rescan_interval = duration_field(
        &merged.rescan_interval,
        "rescan_interval",
        DEFAULT_RESCAN_INTERVAL,
    )?;
    if !(Duration::from_secs(1)..=Duration::from_secs(86400)).contains(&rescan_interval) {
        return Err(Error::Config(format!(
            "{}: give an interval from 1s to 24h",
            origin("rescan_interval")
        )));
    }
    if merged.max_parallel_hooks == Some(0) {
        return Err(Error::Config(format!(
            "{}: 0 would never run a deploy; give 1 or more, or leave it out for one per deployment",
            origin("max_parallel_hooks")
        )));
    }
    let max_parallel_hooks = merged.max_parallel_hooks.map(|n| n as usize);
    let listen = match &merged.listen {
        None => None,
        Some(text) => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
            Error::Config(format!(
                "{}: {text:?} is not ADDR:PORT, e.g. \"10.0.0.5:8571\" (the address other \
                 agents reach this one on)",
                origin("listen")
            ))
        })?),
    };
    if let Some(addr) = listen.filter(|a| a.ip().is_unspecified() || a.port() == 0) {
        return Err(Error::Config(format!(
            "{}: {addr} is not an address other agents can reach; give this host's own address \
             and a port, e.g. \"10.0.0.5:8571\" (the agent listens there and announces it)",
            origin("listen")
        )));
    }
    if let Some(zone) = &merged.zone
        && crate::tree::check_node_name(zone).is_err()
    {
        return Err(Error::Config(format!(
            "{}: {zone:?} is not a usable zone name: letters, digits, . _ + -",
            origin("zone")
        )));
    }
    let zone = merged.zone.clone();
    if let Some(file) = &merged.metrics_file {
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
        if !file.is_absolute() || !dir.is_some_and(|d| d.is_dir()) {
            return Err(Error::Config(format!(
                "{}: {} is not a file in an existing directory; give an absolute path such as \
                 \"/var/lib/prometheus/node-exporter/depro.prom\"",
                origin("metrics_file"),
                file.display()
            )));
        }
    }
    let upload_limit = match &merged.upload_limit {
        None => None,
        Some(text) => Some(rate(text).ok_or_else(|| {
            Error::Config(format!(
                "{}: {text:?} is not a rate: a number of bytes per second with B, KB, MB or GB, \
                 e.g. \"20MB/s\"",
                origin("upload_limit")
            ))
        })?),
    };

    let mut resolved: Vec<Deployment> = Vec::new();
    for (origin, raw) in deployments {
        let deployment = resolve_deployment(&origin, raw, env)?;
        if let Some(other) = resolved.iter().find(|d| d.id == deployment.id) {
            return Err(Error::Config(format!(
                "{origin}: the id {:?} is already used by {}; give each deployment its own id",
                deployment.id, other.origin
            )));
        }
        if let Some(other) = resolved
            .iter()
            .find(|d| overlaps(d.prefix.as_dir(), deployment.prefix.as_dir()))
        {
            return Err(Error::Config(format!(
                "{origin}: the prefix {} overlaps the prefix {} of {}; give each deployment its own prefix",
                deployment.prefix, other.prefix, other.origin
            )));
        }
        if let Some(other) = resolved.iter().find(|d| d.path == deployment.path) {
            return Err(Error::Config(format!(
                "{origin}: the path {} is already used by {}; give each deployment its own path",
                deployment.path.display(),
                other.origin
            )));
        }
        if let Some(other) = resolved
            .iter()
            .find(|d| d.path.starts_with(&deployment.path) || deployment.path.starts_with(&d.path))
        {
            let (inner, outer) = if other.path.starts_with(&deployment.path) {
                (other, &deployment)
            } else {
                (&deployment, other)
            };
            return Err(Error::Config(format!(
                "{}: the path {} is inside {}, the path of {}; deployment paths must not nest \
                 (cleaning one would delete the other's files): give each its own directory",
                inner.origin,
                inner.path.display(),
                outer.path.display(),
                outer.origin
            )));
        }
        resolved.push(deployment);
    }

    Ok(AgentConfig {
        warnings,
        name,
        consul,
        log_level,
        shutdown_grace,
        session_ttl,
        rescan_interval,
        max_parallel_hooks,
        listen,
        zone,
        upload_limit,
        metrics_file: merged.metrics_file.clone(),
        deployments: resolved,
        files,
    })
}

/// A rate such as `20MB/s` (decimal units; `/s` optional), in bytes per
/// second; at least 1 KB/s.
fn rate(text: &str) -> Option<u64> {
    let text = text.trim();
    let text = text.strip_suffix("/s").unwrap_or(text).trim_end();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let unit = match unit.trim() {
        "B" | "" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    number
        .parse::<u64>()
        .ok()?
        .checked_mul(unit)
        .filter(|&r| r >= 1_000)
}

fn overlaps(a: &str, b: &str) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn parse_log_level(text: &str) -> Option<log::LevelFilter> {
    text.parse().ok()
}

/// Connection values from config files.
#[derive(Debug, Default)]
pub(crate) struct FileConnection {
    pub server: Option<String>,
    pub datacenter: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub tls_skip_verify: Option<bool>,
}

/// Resolves how to reach Consul. The environment variables are Consul's own
/// (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, …) and the original depro's
/// (`DEPRO_SERVER`, `DEPRO_TOKEN`, `DEPRO_DATACENTER`); depro's win.
pub(crate) fn resolve_connection(
    flags: &ConnectionFlags,
    env: Env<'_>,
    file: &FileConnection,
) -> Result<ConsulSettings, Error> {
    let mut address = flags
        .server
        .clone()
        .or_else(|| env("DEPRO_SERVER"))
        .or_else(|| env("CONSUL_HTTP_ADDR"))
        .or_else(|| file.server.clone())
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let ssl = env("CONSUL_HTTP_SSL").is_some_and(|v| truthy(&v));
    if ssl && !address.contains("://") {
        address = format!("https://{address}");
    }

    // The token, and where it came from (for the hint of a denial).
    let (token, token_origin) = if let Some(token) = flags.token.clone() {
        (Some(token), "-token".to_string())
    } else if let Some(path) = &flags.token_file {
        let origin = format!("-token-file {}", path.display());
        (Some(read_token(path, "-token-file")?), origin)
    } else if let Some(token) = env("DEPRO_TOKEN") {
        (Some(token), "DEPRO_TOKEN".to_string())
    } else if let Some(token) = env("CONSUL_HTTP_TOKEN") {
        (Some(token), "CONSUL_HTTP_TOKEN".to_string())
    } else if let Some(path) = env("CONSUL_HTTP_TOKEN_FILE") {
        let origin = format!("CONSUL_HTTP_TOKEN_FILE {path}");
        (
            Some(read_token(Path::new(&path), "CONSUL_HTTP_TOKEN_FILE")?),
            origin,
        )
    } else if let Some(token) = file.token.clone() {
        (Some(token), "token in the config".to_string())
    } else if let Some(path) = &file.token_file {
        let origin = format!("token_file {}", path.display());
        (Some(read_token(path, "token_file")?), origin)
    } else {
        (
            None,
            "none given: -token, CONSUL_HTTP_TOKEN or token_file".to_string(),
        )
    };

    let path_setting = |flag: &Option<PathBuf>, var: &str, file: &Option<PathBuf>| {
        flag.clone()
            .or_else(|| env(var).map(PathBuf::from))
            .or_else(|| file.clone())
    };
    let verify_tls = if flags.tls_skip_verify {
        false
    } else if let Some(value) = env("CONSUL_HTTP_SSL_VERIFY") {
        truthy(&value)
    } else {
        !file.tls_skip_verify.unwrap_or(false)
    };
    let settings = ConsulSettings {
        address,
        token: token.map(Secret::new),
        token_origin,
        datacenter: flags
            .datacenter
            .clone()
            .or_else(|| env("DEPRO_DATACENTER"))
            .or_else(|| file.datacenter.clone()),
        ca_file: path_setting(&flags.ca_file, "CONSUL_CACERT", &file.ca_file),
        cert_file: path_setting(&flags.client_cert, "CONSUL_CLIENT_CERT", &file.cert_file),
        key_file: path_setting(&flags.client_key, "CONSUL_CLIENT_KEY", &file.key_file),
        verify_tls,
    };
    // Catch a bad address or TLS file now, with a clear message.
    crate::consul::Consul::new(&settings).map_err(Error::Config)?;
    Ok(settings)
}

fn truthy(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

fn read_token(path: &Path, from: &str) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "{} (from {from}): cannot read the token file: {e}",
            path.display()
        ))
    })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(Error::Config(format!(
            "{} (from {from}): the token file is empty",
            path.display()
        )));
    }
    Ok(token)
}

fn hostname() -> Result<String, Error> {
    let name = nix::unistd::gethostname()
        .map_err(|e| Error::Config(format!("cannot read the hostname ({e}); set -name")))?;
    Ok(name.to_string_lossy().into_owned())
}

/// Lists the config files to read, in order.
fn config_files(args: &AgentArgs) -> Result<Vec<PathBuf>, Error> {
    let mut files = Vec::new();
    for dir in &args.config_dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::Config(format!(
                "{} (-config-dir): cannot read the directory: {e}",
                dir.display()
            ))
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.is_dir())
            .collect();
        found.sort();
        files.extend(found);
    }
    for file in &args.config_files {
        files.push(file.clone());
    }
    Ok(files)
}

fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "{}: cannot read the config file: {e}",
            path.display()
        ))
    })?;
    let json = strip_comments(&text);
    if json.trim().is_empty() {
        return Err(Error::Config(format!(
            "{}: the config file is empty; write a JSON object (e.g. {{\"deployments\": []}}, \
             see depro.json(5)) or remove the file",
            path.display()
        )));
    }
    let mut file: FileConfig = parse_file(path, &json)?;
    // Relative file names in a config file are relative to its directory,
    // not to wherever the agent was started.
    let dir = path.parent().unwrap_or(Path::new("/"));
    for name in [
        &mut file.token_file,
        &mut file.ca_file,
        &mut file.cert_file,
        &mut file.key_file,
    ]
    .into_iter()
    .flatten()
    {
        if name.is_relative() {
            *name = dir.join(&*name);
        }
    }
    Ok(file)
}

/// Parses a config file's text, its comments already blanked out (lines
/// and columns are those of the file).
fn parse_file(path: &Path, json: &str) -> Result<FileConfig, Error> {
    serde_json::from_str(json).map_err(|e| {
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(at) => message[..at].to_string(),
            None => message,
        };
        let hint = if e.is_syntax() || e.is_eof() {
            "fix the JSON syntax (a missing comma?)"
        } else {
            "see depro.json(5) for the fields"
        };
        Error::Config(format!(
            "{}:{}:{}: {message}; {hint}",
            path.display(),
            e.line(),
            e.column()
        ))
    })
}

/// Blanks out `//` comments (outside strings) so that config files can be
/// commented; lines and columns stay where they were for error messages.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped, mut in_comment) = (false, false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_comment {
            if c == '\n' {
                in_comment = false;
                out.push(c);
            } else {
                out.push(' ');
            }
            continue;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            out.push(c);
            continue;
        }
        match c {
            '"' => in_string = true,
            '/' if chars.peek() == Some(&'/') => {
                in_comment = true;
                out.push(' ');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

fn resolve_deployment(
    origin: &str,
    raw: FileDeployment,
    env: Env<'_>,
) -> Result<Deployment, Error> {
    let bad = |field: &str, why: String| Error::Config(format!("{origin}.{field}: {why}"));
    if raw.id.is_empty()
        || !raw
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(bad(
            "id",
            format!(
                "{:?} is not a usable id; use letters, digits, . _ -",
                raw.id
            ),
        ));
    }
    let origin = format!("{origin} (id {:?})", raw.id);
    let bad = |field: &str, why: String| Error::Config(format!("{origin}.{field}: {why}"));
    let path = PathBuf::from(&raw.path);
    if !path.is_absolute() {
        return Err(bad(
            "path",
            format!(
                "{:?} is relative; use an absolute path such as /data/deploy/{}",
                raw.path, raw.id
            ),
        ));
    }
    let path = resolve_path(&path)
        .map_err(|e| bad("path", format!("cannot create {:?}: {e}", raw.path)))?;
    if path == Path::new("/") {
        return Err(bad(
            "path",
            format!(
                "{:?} resolves to / (through \"..\" or a symlink), which cannot be a deployment path; \
                 use a directory of its own",
                raw.path
            ),
        ));
    }
    let prefix = Prefix::parse(&raw.prefix).map_err(|why| bad("prefix", why))?;
    let shell_name = raw.shell.unwrap_or_else(|| "sh".to_string());
    let shell = find_executable(&shell_name, env).ok_or_else(|| {
        bad("shell", format!("{shell_name:?} was not found or is not executable; install it or name another shell"))
    })?;
    let timeout = match &raw.timeout {
        None => DEFAULT_HOOK_TIMEOUT,
        Some(text) => crate::duration::parse(text).map_err(|why| bad("timeout", why))?,
    };
    if timeout.is_zero() {
        return Err(bad("timeout", "must be longer than 0s".into()));
    }
    let health_timeout = match &raw.health_timeout {
        None => DEFAULT_HEALTH_TIMEOUT,
        Some(text) => crate::duration::parse(text).map_err(|why| bad("health_timeout", why))?,
    };
    if health_timeout.is_zero() {
        return Err(bad("health_timeout", "must be longer than 0s".into()));
    }
    if raw.health_timeout.is_some() && raw.health.is_empty() {
        return Err(bad(
            "health_timeout",
            "is set but there is no health hook; add \"health\": [...] or remove it".into(),
        ));
    }
    let trusted_keys = raw
        .trusted_keys
        .iter()
        .enumerate()
        .map(|(i, line)| {
            crate::signing::PublicKey::parse(line)
                .map_err(|why| bad(&format!("trusted_keys[{i}]"), why))
        })
        .collect::<std::result::Result<Vec<_>, Error>>()?;
    Ok(Deployment {
        id: raw.id,
        path,
        prefix,
        shell,
        deploy: raw.deploy,
        rollout: raw.rollout,
        clean: raw.clean,
        health: raw.health,
        timeout,
        health_timeout,
        trusted_keys,
        origin,
    })
}

/// The path as the kernel will resolve it: symlinks and `..` of its part
/// that exists resolved (`canonicalize`), the rest (to be created) appended
/// with `..` and `.` resolved by name. So `/tmp/..` is `/`, and a symlink to
/// `/` is `/`.
fn resolve_path(path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(base) => {
                let mut resolved = base;
                for part in rest.iter().rev() {
                    match Path::new(part).components().next() {
                        Some(Component::ParentDir) => {
                            resolved.pop();
                        }
                        Some(Component::CurDir) | None => {}
                        Some(_) => resolved.push(part),
                    }
                }
                return Ok(resolved);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = existing.file_name().map(|n| n.to_os_string()) else {
                    // `..` or `.` at the end of a missing path: resolve by name.
                    let parent = existing.parent().map(Path::to_path_buf).ok_or(e)?;
                    rest.push(
                        existing
                            .components()
                            .next_back()
                            .map_or_else(Default::default, |c| c.as_os_str().to_os_string()),
                    );
                    existing = parent;
                    continue;
                };
                rest.push(name);
                existing = existing.parent().map(Path::to_path_buf).ok_or(e)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Config files and directories that someone other than root or the agent's
/// user could change (like sshd's StrictModes): each is a problem, since the
/// hooks they define run as the agent's user.
fn insecure_config(args: &AgentArgs, files: &[PathBuf]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let mut places: Vec<PathBuf> = args.config_dirs.clone();
    for file in &args.config_files {
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            places.push(parent.to_path_buf());
        }
    }
    places.extend(files.iter().cloned());
    let mut problems = Vec::new();
    for place in places {
        let Ok(meta) = std::fs::metadata(&place) else {
            continue; // reading it reports the error
        };
        let what = if meta.is_dir() { "directory" } else { "file" };
        let mode = meta.mode() & 0o7777;
        if meta.uid() != 0 && meta.uid() != me {
            problems.push(format!(
                "{}: the config {what} is owned by user {}, not by root or the agent's user ({me})",
                place.display(),
                meta.uid()
            ));
        } else if mode & 0o002 != 0 {
            problems.push(format!(
                "{}: the config {what} is writable by others (mode {mode:04o})",
                place.display()
            ));
        } else if mode & 0o020 != 0 {
            problems.push(format!(
                "{}: the config {what} is writable by its group (mode {mode:04o})",
                place.display()
            ));
        }
    }
    problems
}

fn find_executable(name: &str, env: Env<'_>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return executable(&path).then_some(path);
    }
    let search = env("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    search
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_limit_is_a_rate_in_decimal_units() {
        assert_eq!(rate("20MB/s"), Some(20_000_000));
        assert_eq!(rate("500 KB"), Some(500_000));
        assert_eq!(rate("1GB/s"), Some(1_000_000_000));
        for bad in ["", "fast", "20 MiB/s", "-1MB/s", "999B/s", "MB/s"] {
            assert_eq!(rate(bad), None, "{bad}");
        }
    }
    use std::collections::HashMap;

    /// The seed's example config, with the one fix the issue allows (shared
    /// with the integration tests).
    pub(crate) const SEED_CONFIG: &str = include_str!("../tests/data/seed-config.json");

    struct Setup {
        dir: tempfile::TempDir,
        env: HashMap<String, String>,
    }

    impl Setup {
        fn new() -> Setup {
            let mut env = HashMap::new();
            env.insert(
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_default(),
            );
            Setup {
                dir: tempfile::tempdir().unwrap(),
                env,
            }
        }
        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
        fn resolve(&self, args: &AgentArgs) -> Result<AgentConfig, String> {
            let env = |name: &str| self.env.get(name).cloned();
            resolve_agent(args, &env).map_err(|e| e.to_string())
        }
        fn resolve_dir(&self) -> Result<AgentConfig, String> {
            self.resolve(&AgentArgs {
                config_dirs: vec![self.dir.path().to_path_buf()],
                ..AgentArgs::default()
            })
        }
    }

    fn deployment(id: &str, path: &str, prefix: &str) -> String {
        format!(r#"{{"id": "{id}", "path": "{path}", "prefix": "{prefix}", "deploy": ["true"]}}"#)
    }

    #[test]
    fn the_seed_config_resolves() {
        let setup = Setup::new();
        setup.file("depro.json", SEED_CONFIG);
        let config = setup.resolve_dir().unwrap();
        assert_eq!(config.name, "workerNode1");
        assert_eq!(config.consul.address, "localhost:8500");
        assert_eq!(config.consul.datacenter.as_deref(), Some("dc1"));
        assert_eq!(config.deployments.len(), 2);
        let api = &config.deployments[0];
        assert_eq!(api.path, PathBuf::from("/data/deploy/api"));
        assert_eq!(api.prefix.as_dir(), "api/version/");
        assert!(api.shell.ends_with("bash"));
        assert_eq!(api.timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(config.deployments[1].clean, Vec::<String>::new());
    }

    #[test]
    fn the_seed_config_as_printed_is_rejected_at_the_missing_comma() {
        let setup = Setup::new();
        let broken = SEED_CONFIG.replacen("tar zxf - || exit 1\",", "tar zxf - || exit 1\"", 1);
        let path = setup.file("depro.json", &broken);
        let err = setup.resolve_dir().unwrap_err();
        assert!(err.starts_with(&format!("{}:5:", path.display())), "{err}");
        assert!(err.contains("missing comma"), "{err}");
    }

    #[test]
    fn unknown_fields_are_named_with_their_position() {
        let setup = Setup::new();
        let path = setup.file("a.json", "{\n  \"nmae\": \"x\"\n}");
        let err = setup.resolve_dir().unwrap_err();
        assert!(err.starts_with(&format!("{}:2:", path.display())), "{err}");
        assert!(err.contains("unknown field `nmae`"), "{err}");
    }

    #[test]
    fn later_files_override_scalars_and_append_deployments() {
        let setup = Setup::new();
        setup.file(
            "10-base.json",
            &format!(
                r#"{{"name": "a", "server": "x:1", "deployments": [{}]}}"#,
                deployment("api", "/d/api", "api/version")
            ),
        );
        setup.file(
            "20-more.json",
            &format!(
                r#"{{"name": "b", "deployments": [{}]}}"#,
                deployment("web", "/d/web", "web/version")
            ),
        );
        setup.file("ignored.txt", "not json");
        let config = setup.resolve_dir().unwrap();
        assert_eq!(config.name, "b");
        assert_eq!(config.consul.address, "x:1");
        let ids: Vec<&str> = config.deployments.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["api", "web"]);
    }

    #[test]
    fn flags_beat_environment_beats_files() {
        let mut setup = Setup::new();
        setup.file(
            "a.json",
            r#"{"name": "file", "server": "file:1", "token": "file-token"}"#,
        );
        setup.env.insert("DEPRO_NAME".into(), "env".into());
        setup.env.insert("CONSUL_HTTP_ADDR".into(), "env:1".into());
        setup
            .env
            .insert("CONSUL_HTTP_TOKEN".into(), "env-token".into());
        let from_env = setup.resolve_dir().unwrap();
        assert_eq!(
            (from_env.name.as_str(), from_env.consul.address.as_str()),
            ("env", "env:1")
        );
        assert_eq!(from_env.consul.token, Some(Secret::new("env-token".into())));
        let mut args = AgentArgs {
            config_dirs: vec![setup.dir.path().to_path_buf()],
            name: Some("flag".into()),
            ..AgentArgs::default()
        };
        args.connection.server = Some("flag:1".into());
        let from_flags = setup.resolve(&args).unwrap();
        assert_eq!(
            (from_flags.name.as_str(), from_flags.consul.address.as_str()),
            ("flag", "flag:1")
        );
        setup.env.insert("DEPRO_SERVER".into(), "depro:1".into());
        assert_eq!(setup.resolve_dir().unwrap().consul.address, "depro:1");
    }

    #[test]
    fn the_token_can_come_from_a_file_and_never_shows_in_errors() {
        let mut setup = Setup::new();
        let token = setup.file("token", "file-secret\n");
        setup
            .env
            .insert("CONSUL_HTTP_TOKEN_FILE".into(), token.display().to_string());
        assert_eq!(
            setup.resolve_dir().unwrap().consul.token,
            Some(Secret::new("file-secret".into()))
        );
        setup.file(
            "bad.json",
            r#"{"token": "very-secret", "session_ttl": "5s"}"#,
        );
        let err = setup.resolve_dir().unwrap_err();
        assert!(
            err.contains("session_ttl") && !err.contains("very-secret"),
            "{err}"
        );
    }

    #[test]
    fn max_parallel_hooks_defaults_to_no_limit_and_must_be_at_least_one() {
        let setup = Setup::new();
        assert_eq!(setup.resolve_dir().unwrap().max_parallel_hooks, None);
        setup.file("a.json", r#"{"max_parallel_hooks": 2}"#);
        assert_eq!(setup.resolve_dir().unwrap().max_parallel_hooks, Some(2));
        setup.file("a.json", r#"{"max_parallel_hooks": 0}"#);
        let err = setup.resolve_dir().unwrap_err().to_string();
        assert!(
            err.contains("a.json: max_parallel_hooks") && err.contains("1 or more"),
            "{err}"
        );
    }

    #[test]
    fn rescan_interval_defaults_to_five_minutes_and_is_bounded() {
        let setup = Setup::new();
        assert_eq!(
            setup.resolve_dir().unwrap().rescan_interval,
            Duration::from_secs(300)
        );
        setup.file("a.json", r#"{"rescan_interval": "30s"}"#);
        assert_eq!(
            setup.resolve_dir().unwrap().rescan_interval,
            Duration::from_secs(30)
        );
        setup.file("a.json", r#"{"rescan_interval": "100ms"}"#);
        let err = setup.resolve_dir().unwrap_err();
        assert!(
            err.contains("a.json") && err.contains("rescan_interval") && err.contains("1s to 24h"),
            "{err}"
        );
    }

    #[test]
    fn bad_deployments_are_named_by_file_index_and_field() {
        let cases = [
            (
                r#"{"id": "api", "path": "data/api", "prefix": "api"}"#,
                "deployments[0] (id \"api\").path",
                "relative",
            ),
            (
                r#"{"id": "api", "path": "/d/api", "prefix": "api", "shell": "no-such-shell"}"#,
                ".shell",
                "not found",
            ),
            (
                r#"{"id": "api", "path": "/d/api", "prefix": "api", "timeout": "ten"}"#,
                ".timeout",
                "30s, 10m",
            ),
            (
                r#"{"id": "api", "path": "/d/api", "prefix": "a b"}"#,
                ".prefix",
                "contains",
            ),
            (
                r#"{"id": "a/b", "path": "/d/api", "prefix": "api"}"#,
                "deployments[0].id",
                "not a usable id",
            ),
        ];
        for (text, field, why) in cases {
            let setup = Setup::new();
            let path = setup.file("a.json", &format!(r#"{{"deployments": [{text}]}}"#));
            let err = setup.resolve_dir().unwrap_err();
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(err.contains(field) && err.contains(why), "{err}");
        }
    }

    #[test]
    fn duplicate_ids_prefixes_and_paths_name_both_places() {
        let cases = [
            (
                deployment("api", "/d/a", "p/a"),
                deployment("api", "/d/b", "p/b"),
                "id \"api\" is already used",
            ),
            (
                deployment("a", "/d/a", "p/a"),
                deployment("b", "/d/b", "p/a/"),
                "overlaps",
            ),
            (
                deployment("a", "/d/a", "p/a"),
                deployment("b", "/d/b", "p/a/sub"),
                "overlaps",
            ),
            (
                deployment("a", "/d/a", "p/a"),
                deployment("b", "/d/a/", "p/b"),
                "already used",
            ),
        ];
        for (first, second, why) in cases {
            let setup = Setup::new();
            setup.file("1.json", &format!(r#"{{"deployments": [{first}]}}"#));
            setup.file("2.json", &format!(r#"{{"deployments": [{second}]}}"#));
            let err = setup.resolve_dir().unwrap_err();
            assert!(
                err.contains(why) && err.contains("1.json") && err.contains("2.json"),
                "{err}"
            );
        }
    }

    #[test]
    fn line_comments_are_allowed_and_keep_positions() {
        let text =
            "{ // the node\n  \"name\": \"a//b\", // not a comment inside strings\n  \"bad\": 1 }";
        let stripped = strip_comments(text);
        assert_eq!(stripped.lines().count(), 3);
        assert!(stripped.contains("\"a//b\""));
        let setup = Setup::new();
        let path = setup.file("c.json", text);
        let err = setup.resolve_dir().unwrap_err();
        assert!(err.starts_with(&format!("{}:3:", path.display())), "{err}");
        assert!(err.contains("unknown field `bad`"), "{err}");
    }

    #[test]
    fn the_packaged_example_config_is_valid() {
        let setup = Setup::new();
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/depro.json.example"
        ))
        .unwrap();
        setup.file("depro.json", &example);
        let config = setup.resolve_dir().unwrap();
        assert_eq!(config.deployments.len(), 1);
    }

    #[test]
    fn an_empty_config_dir_is_a_valid_idle_agent() {
        let setup = Setup::new();
        let config = setup.resolve_dir().unwrap();
        assert!(config.deployments.is_empty());
        assert_eq!(config.consul.address, DEFAULT_SERVER);
    }

    #[test]
    fn a_missing_config_dir_is_named() {
        let setup = Setup::new();
        let err = setup
            .resolve(&AgentArgs {
                config_dirs: vec!["/no/such/dir".into()],
                ..AgentArgs::default()
            })
            .unwrap_err();
        assert!(err.contains("/no/such/dir (-config-dir)"), "{err}");
    }

    #[test]
    fn paths_resolve_through_symlinks_and_dot_dot_even_where_they_do_not_exist_yet() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        assert_eq!(resolve_path(Path::new("/tmp/..")).unwrap(), Path::new("/"));
        std::os::unix::fs::symlink("/", base.join("root")).unwrap();
        assert_eq!(resolve_path(&base.join("root")).unwrap(), Path::new("/"));
        assert_eq!(
            resolve_path(&base.join("new/api/../web")).unwrap(),
            base.join("new/web")
        );
        std::fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        assert_eq!(
            resolve_path(&base.join("link/api")).unwrap(),
            base.join("real/api")
        );
    }

    #[test]
    fn bad_durations_and_names_are_named() {
        let setup = Setup::new();
        let path = setup.file("a.json", r#"{"shutdown_grace": "soon"}"#);
        let err = setup.resolve_dir().unwrap_err();
        assert!(
            err.starts_with(&format!("{}: shutdown_grace", path.display())),
            "{err}"
        );
        let setup = Setup::new();
        setup.file("a.json", r#"{"name": "bad/name"}"#);
        assert!(
            setup
                .resolve_dir()
                .unwrap_err()
                .contains("node name \"bad/name\"")
        );
    }
}
