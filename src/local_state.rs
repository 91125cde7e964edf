//! A deployment's directory on this host, and depro's bookkeeping in it.
//!
//! ```text
//! <path>/<version>/                 one directory per deployed version
//! <path>/current                    the version rolled out last (the seed's local version file)
//! <path>/.depro/lock                held (flock) by the agent that owns this directory
//! <path>/.depro/versions/<version>  "deploying" or "ready": depro made this directory
//! <path>/.depro/rollout             the target of a rollout that has not finished
//! <path>/.depro/sessions            the agent's Consul sessions, newest last (its own, known after a restore)
//! <path>/.depro/hook                the process group of the running hook, killed after a crash
//! ```
//!
//! Invariants:
//! - `kill -9` at any instant leaves every file with its old or its new
//!   content, or (for the two files rewritten in place) a content that reads
//!   as the safe choice: `deploying`, `current`, the rollout intent and the
//!   session are replaced by rename; `ready` overwrites `deploying` in place,
//!   where a torn write reads as "not ready" (deploy again); the running
//!   hook's process group too, where a torn one is simply not killed;
//! - the facts that must survive a power loss (`deploying`, `ready`,
//!   `current`) are fsynced; the rollout intent, the session and the hook
//!   are not: fsyncing them would delay every rollout hook by a disk flush,
//!   and after a power loss the hook and the session are gone anyway;
//! - `deploying` is recorded before a version directory is made, and `ready`
//!   only after the deploy hook succeeded and the file system was synced: a
//!   crash can leave a half-deployed directory, but never one marked ready;
//! - depro deletes a version directory only if its bookkeeping says depro
//!   made it; a directory someone else put there is never touched;
//! - paths are built only from validated [`VersionName`]s.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::plan::{LocalVersion, OnDisk, RolloutAttempt};
use crate::version_name::VersionName;

const READY: &str = "ready";
const DEPLOYING: &str = "deploying";

pub(crate) struct DeploymentDir {
    path: PathBuf,
    meta: PathBuf,
    _lock: Flock<File>,
}

impl DeploymentDir {
    /// Opens (creating if needed) the directory and takes its lock, so that
    /// two agents never manage the same directory.
    pub(crate) fn open(path: &Path) -> Result<DeploymentDir> {
        let meta = path.join(".depro");
        fs::create_dir_all(meta.join("versions"))
            .map_err(|e| Error::io(&meta, "cannot create depro's state directory", e))?;
        let lock_path = meta.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, "cannot open the lock file", e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            Error::Config(format!(
                "{}: locked ({errno}): another depro agent manages this deployment path; \
                 give each deployment its own path",
                lock_path.display()
            ))
        })?;
        Ok(DeploymentDir {
            path: path.to_path_buf(),
            meta,
            _lock: lock,
        })
    }

    pub(crate) fn version_path(&self, version: &VersionName) -> PathBuf {
        self.path.join(version.as_str())
    }

    fn state_path(&self, version: &VersionName) -> PathBuf {
        self.meta.join("versions").join(version.as_str())
    }

    /// Reads the local state. A version still `deploying` (the agent died
    /// mid-deploy) comes back as `Deploying`, so it is deployed afresh or
    /// cleaned; it never counts as had.
    pub(crate) fn load(&self) -> Result<OnDisk> {
        let dir = self.meta.join("versions");
        let mut versions = BTreeMap::new();
        let entries = fs::read_dir(&dir).map_err(|e| Error::io(&dir, "cannot list", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, "cannot list", e))?;
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(|n| VersionName::parse(n).ok()) else {
                continue; // temporary files and strangers
            };
            let state = match read_trimmed(&entry.path())?.as_deref() {
                Some(READY) => LocalVersion::Ready,
                _ => LocalVersion::Deploying,
            };
            versions.insert(version, state);
        }
        let live = read_version(&self.path.join("current"))?
            .filter(|v| versions.get(v) == Some(&LocalVersion::Ready));
        let rollout = read_version(&self.meta.join("rollout"))?
            .filter(|v| versions.get(v) == Some(&LocalVersion::Ready))
            .map(|to| RolloutAttempt { to });
        Ok(OnDisk {
            versions,
            live,
            rollout,
            rollout_failed: Default::default(),
        })
    }

    /// Records that a deploy of `version` starts. Refuses when a directory
    /// of that name exists that depro did not make.
    pub(crate) fn stage(&self, version: &VersionName) -> Result<()> {
        let dir = self.version_path(version);
        let ours = self.state_path(version).exists();
        if !ours && fs::symlink_metadata(&dir).is_ok() {
            return Err(Error::Refused(format!(
                "{}: exists and was not made by depro; move it away so that depro can deploy {version} here",
                dir.display()
            )));
        }
        atomic_write(&self.state_path(version), DEPLOYING, Durability::Durable)
    }

    /// Whether depro made the directory of `version` (its bookkeeping exists).
    pub(crate) fn owns(&self, version: &VersionName) -> bool {
        self.state_path(version).exists()
    }

    /// Makes a fresh, empty directory for a staged deploy (removing what an
    /// earlier, unfinished attempt left) and returns its path.
    pub(crate) fn fresh_version_dir(&self, version: &VersionName) -> Result<PathBuf> {
        let dir = self.version_path(version);
        if !self.owns(version) {
            return Err(Error::Refused(format!(
                "{}: not staged by depro; refusing to replace it",
                dir.display()
            )));
        }
        remove_if_present(&dir)?;
        fs::create_dir(&dir)
            .map_err(|e| Error::io(&dir, "cannot create the version directory", e))?;
        sync_dir(&self.path)?;
        Ok(dir)
    }

    /// Records that the deploy of `version` succeeded, after syncing what
    /// the hook wrote.
    pub(crate) fn mark_ready(&self, version: &VersionName) -> Result<()> {
        let dir = self.version_path(version);
        let handle = File::open(&dir).map_err(|e| Error::io(&dir, "cannot open", e))?;
        nix::unistd::syncfs(&handle)
            .map_err(|e| Error::io(&dir, "cannot sync", io::Error::from(e)))?;
        // In place, not by rename: a torn write reads as "not ready", which
        // only means deploying again; and no new inode is made per deploy.
        overwrite(&self.state_path(version), READY, Durability::Durable)
    }

    /// Records that a rollout to `version` starts.
    pub(crate) fn begin_rollout(&self, version: &VersionName) -> Result<()> {
        atomic_write(
            &self.meta.join("rollout"),
            version.as_str(),
            Durability::CrashSafe,
        )
    }

    /// Records that `version` is now live and the rollout is over.
    pub(crate) fn finish_rollout(&self, version: &VersionName) -> Result<()> {
        atomic_write(
            &self.path.join("current"),
            version.as_str(),
            Durability::Durable,
        )?;
        remove_if_present(&self.meta.join("rollout"))
    }

    /// Deletes a version directory depro made, then its bookkeeping.
    pub(crate) fn remove_version(&self, version: &VersionName) -> Result<()> {
        if !self.state_path(version).exists() {
            return Ok(()); // not ours
        }
        remove_if_present(&self.version_path(version))?;
        sync_dir(&self.path)?;
        remove_if_present(&self.state_path(version))?;
        sync_dir(&self.meta.join("versions"))
    }

    /// Records the process group of the hook that runs now.
    pub(crate) fn record_hook(&self, pgid: i32) -> Result<()> {
        atomic_write(
            &self.meta.join("hook"),
            &pgid.to_string(),
            Durability::CrashSafe,
        )
    }

    pub(crate) fn clear_hook(&self) -> Result<()> {
        overwrite(&self.meta.join("hook"), "", Durability::CrashSafe)
    }

    /// The process group of a hook an earlier run left running, if recorded.
    pub(crate) fn leftover_hook(&self) -> Option<i32> {
        read_trimmed(&self.meta.join("hook"))
            .ok()
            .flatten()?
            .parse()
            .ok()
    }

    /// The sessions earlier runs of the agent made, oldest first (one ID
    /// per line in `sessions`; an older agent's single `session` too).
    pub(crate) fn saved_sessions(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for file in ["session", "sessions"] {
            if let Ok(Some(text)) = read_trimmed(&self.meta.join(file)) {
                for id in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    if !ids.iter().any(|i| i == id) {
                        ids.push(id.to_string());
                    }
                }
            }
        }
        ids
    }

    /// Records the sessions this agent made, oldest first.
    pub(crate) fn save_sessions(&self, ids: &[String]) -> Result<()> {
        atomic_write(
            &self.meta.join("sessions"),
            &ids.join("\n"),
            Durability::CrashSafe,
        )?;
        remove_if_present(&self.meta.join("session"))
    }
}

fn read_trimmed(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, "cannot read", e)),
    }
}

fn read_version(path: &Path) -> Result<Option<VersionName>> {
    Ok(read_trimmed(path)?.and_then(|text| VersionName::parse(&text).ok()))
}

/// How hard a write tries to last.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Survives the death of the process (rename is atomic).
    CrashSafe,
    /// Also survives a power loss (fsync of the file and its directory).
    Durable,
}

/// Writes `contents` (plus a newline) to `path` atomically.
pub(crate) fn atomic_write(path: &Path, contents: &str, durability: Durability) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.write_all(b"\n")?;
        if durability == Durability::Durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    };
    write().map_err(|e| Error::io(path, "cannot write", e))?;
    match durability {
        Durability::Durable => sync_dir(dir),
        Durability::CrashSafe => Ok(()),
    }
}

/// Rewrites `path` in place (no new inode): for files whose torn content
/// is harmless.
fn overwrite(path: &Path, contents: &str, durability: Durability) -> Result<()> {
    let write = || -> io::Result<()> {
        let mut file = File::options()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        file.write_all(contents.as_bytes())?;
        file.write_all(b"\n")?;
        if durability == Durability::Durable {
            file.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| Error::io(path, "cannot write", e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "cannot sync", e))
}

fn remove_if_present(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| Error::io(path, "cannot remove", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str) -> VersionName {
        VersionName::parse(name).unwrap()
    }

    #[test]
    fn a_deploy_is_deploying_until_marked_ready() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        dir.stage(&v("v1")).unwrap();
        let made = dir.fresh_version_dir(&v("v1")).unwrap();
        fs::write(made.join("app"), "x").unwrap();
        assert_eq!(
            dir.load().unwrap().versions[&v("v1")],
            LocalVersion::Deploying
        );
        dir.mark_ready(&v("v1")).unwrap();
        assert_eq!(dir.load().unwrap().versions[&v("v1")], LocalVersion::Ready);
    }

    #[test]
    fn a_fresh_dir_replaces_what_an_unfinished_attempt_left() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        dir.stage(&v("v1")).unwrap();
        let made = dir.fresh_version_dir(&v("v1")).unwrap();
        fs::write(made.join("partial"), "x").unwrap();
        let made = dir.fresh_version_dir(&v("v1")).unwrap();
        assert_eq!(fs::read_dir(made).unwrap().count(), 0);
    }

    #[test]
    fn a_directory_depro_did_not_make_is_refused_and_never_removed() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("v1")).unwrap();
        fs::write(tmp.path().join("v1/precious"), "x").unwrap();
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        let err = dir.stage(&v("v1")).unwrap_err().to_string();
        assert!(err.contains("not made by depro"), "{err}");
        dir.remove_version(&v("v1")).unwrap();
        assert!(tmp.path().join("v1/precious").exists());
        assert!(dir.load().unwrap().versions.is_empty());
    }

    #[test]
    fn rollout_bookkeeping_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let dir = DeploymentDir::open(tmp.path()).unwrap();
            for name in ["v1", "v2"] {
                dir.stage(&v(name)).unwrap();
                dir.fresh_version_dir(&v(name)).unwrap();
                dir.mark_ready(&v(name)).unwrap();
            }
            dir.begin_rollout(&v("v1")).unwrap();
            dir.finish_rollout(&v("v1")).unwrap();
            dir.begin_rollout(&v("v2")).unwrap();
            // the agent dies here
        }
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        let state = dir.load().unwrap();
        assert_eq!(state.live, Some(v("v1")));
        assert_eq!(state.rollout, Some(RolloutAttempt { to: v("v2") }));
        assert_eq!(
            fs::read_to_string(tmp.path().join("current")).unwrap(),
            "v1\n"
        );
    }

    #[test]
    fn a_second_owner_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = DeploymentDir::open(tmp.path()).unwrap();
        let err = DeploymentDir::open(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("another depro agent"), "{err}");
    }

    #[test]
    fn removing_a_version_removes_its_directory_and_bookkeeping() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        dir.stage(&v("v1")).unwrap();
        dir.fresh_version_dir(&v("v1")).unwrap();
        dir.mark_ready(&v("v1")).unwrap();
        dir.remove_version(&v("v1")).unwrap();
        assert!(!tmp.path().join("v1").exists());
        assert!(dir.load().unwrap().versions.is_empty());
    }
}
