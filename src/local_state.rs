//! A deployment's directory on this host, and depro's bookkeeping in it.
//!
//! ```text
//! <path>/<version>/                 one directory per deployed version
//! <path>/current                    the version rolled out last (the seed's local version file)
//! <path>/.depro/lock                held (flock) by the agent that owns this directory (and so is <path> itself)
//! <path>/.depro/versions/<version>  "deploying", "ready" or "cleaning": depro made this directory
//! <path>/.depro/rollout             the target of a rollout that has not finished
//! <path>/.depro/switched            the version whose rollout hook last succeeded, while that rollout is unsettled
//! <path>/.depro/restarted           the id of the last restart (`depro restart`) that settled here
//! <path>/.depro/artifacts/<version>/<sha256>  the version's artifact, verified (`.partial` while fetched)
//! <path>/.depro/sessions            the agent's Consul sessions, newest last (its own, known after a restore)
//! <path>/.depro/hook                the running hook's process group and mark, killed after a crash
//! ```
//!
//! Invariants:
//! - the agent holds a lock on `<path>` itself and on `.depro/lock`: a
//!   hook that deletes `.depro` cannot let a second agent in;
//! - anything in the bookkeeping that is not exactly `ready` (a torn or
//!   unreadable file, `deploying`, `cleaning`) means "not ready": deploy
//!   again (or clean);
//! - a version is marked `cleaning` (durably) before its clean hook runs,
//!   so a crash in the middle of a clean never leaves a partial directory
//!   marked ready;
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
use crate::hooks::Leftover;
use crate::plan::{LocalVersion, OnDisk, RolloutAttempt};
use crate::version_name::VersionName;

const READY: &str = "ready";
const DEPLOYING: &str = "deploying";
const CLEANING: &str = "cleaning";

pub(crate) struct DeploymentDir {
    path: PathBuf,
    meta: PathBuf,
    /// The lock on `<path>` itself: survives a hook deleting `.depro`.
    _dir_lock: Flock<File>,
    /// The lock on `.depro/lock` (what older agents take).
    _lock: Flock<File>,
}

impl DeploymentDir {
    /// Opens (creating if needed) the directory and takes its lock, so that
    /// two agents never manage the same directory.
    pub(crate) fn open(path: &Path) -> Result<DeploymentDir> {
        let meta = path.join(".depro");
        fs::create_dir_all(meta.join("versions"))
            .map_err(|e| Error::io(&meta, "cannot create depro's state directory", e))?;
        let dir = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
        let dir_lock = lock(dir, path)?;
        Ok(DeploymentDir {
            path: path.to_path_buf(),
            _lock: lock_file(&meta)?,
            meta,
            _dir_lock: dir_lock,
        })
    }

    /// Whether depro's state directory is still there; if a hook deleted
    /// it, makes it again (and its lock) and says so. The caller writes its
    /// markers again from what it knows ([`DeploymentDir::restore`]).
    pub(crate) fn recover_state_dir(&mut self) -> Result<bool> {
        if self.meta.join("versions").is_dir() && self.meta.join("lock").exists() {
            return Ok(false);
        }
        fs::create_dir_all(self.meta.join("versions"))
            .map_err(|e| Error::io(&self.meta, "cannot create depro's state directory", e))?;
        self._lock = lock_file(&self.meta)?;
        Ok(true)
    }

    /// Writes every marker again from what the agent knows (after a hook
    /// deleted them).
    pub(crate) fn restore(&self, disk: &OnDisk) -> Result<()> {
        for (version, state) in &disk.versions {
            let text = match state {
                LocalVersion::Ready => READY,
                LocalVersion::Deploying | LocalVersion::DeployFailed => DEPLOYING,
            };
            atomic_write(&self.state_path(version), text, Durability::Durable)?;
        }
        if let Some(rollout) = &disk.rollout {
            self.begin_rollout(&rollout.to)?;
        }
        if let Some(switched) = &disk.switched {
            self.mark_switched(switched)?;
        }
        Ok(())
    }

    pub(crate) fn version_path(&self, version: &VersionName) -> PathBuf {
        self.path.join(version.as_str())
    }

    fn state_path(&self, version: &VersionName) -> PathBuf {
        self.meta.join("versions").join(version.as_str())
    }

    /// Reads the local state. A version still `deploying` or `cleaning`
    /// (the agent died in the middle), or whose marker cannot be read, comes
    /// back as `Deploying`, so it is deployed afresh or cleaned; it never
    /// counts as had.
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
        let switched = read_version(&self.meta.join("switched"))?
            .filter(|v| versions.get(v) == Some(&LocalVersion::Ready));
        let restarted = read_trimmed(&self.meta.join("restarted"))?.and_then(|t| t.parse().ok());
        Ok(OnDisk {
            versions,
            live,
            rollout,
            rollout_failed: Default::default(),
            switched,
            restarted,
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

    /// Records that the rollout hook of `version` succeeded: the node runs
    /// it, whatever its health checks say, until another rollout hook
    /// succeeds (a failed one leaves this as it is).
    pub(crate) fn mark_switched(&self, version: &VersionName) -> Result<()> {
        atomic_write(
            &self.meta.join("switched"),
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
        remove_if_present(&self.meta.join("rollout"))?;
        remove_if_present(&self.meta.join("switched"))
    }

    /// Where `version`'s artifact with this digest is kept once verified
    /// (`<dest>.partial` while it is fetched); removed with the version.
    pub(crate) fn artifact_path(&self, version: &VersionName, sha256: &str) -> PathBuf {
        self.meta
            .join("artifacts")
            .join(version.as_str())
            .join(sha256)
    }

    /// Records that the restart `id` settled here (`depro restart`): it is
    /// not run again, also after the agent restarts.
    pub(crate) fn mark_restarted(&self, id: u64) -> Result<()> {
        atomic_write(
            &self.meta.join("restarted"),
            &id.to_string(),
            Durability::CrashSafe,
        )
    }

    /// Records that `version` is being cleaned: from now on a crash leaves
    /// it "not ready", never a partial directory marked ready.
    pub(crate) fn begin_clean(&self, version: &VersionName) -> Result<()> {
        if !self.owns(version) {
            return Ok(());
        }
        overwrite(&self.state_path(version), CLEANING, Durability::Durable)
    }

    /// Deletes a version directory depro made, then its bookkeeping.
    pub(crate) fn remove_version(&self, version: &VersionName) -> Result<()> {
        if !self.state_path(version).exists() {
            return Ok(()); // not ours
        }
        remove_if_present(&self.version_path(version))?;
        remove_if_present(&self.meta.join("artifacts").join(version.as_str()))?;
        sync_dir(&self.path)?;
        remove_if_present(&self.state_path(version))?;
        sync_dir(&self.meta.join("versions"))
    }

    /// Records the hook that runs now (its process group and mark).
    pub(crate) fn record_hook(&self, hook: &Leftover) -> Result<()> {
        atomic_write(
            &self.meta.join("hook"),
            &hook.record(),
            Durability::CrashSafe,
        )
    }

    pub(crate) fn clear_hook(&self) -> Result<()> {
        overwrite(&self.meta.join("hook"), "", Durability::CrashSafe)
    }

    /// The hook an earlier run left running, if one was recorded.
    pub(crate) fn leftover_hook(&self) -> Option<Leftover> {
        Leftover::parse(&read_trimmed(&self.meta.join("hook")).ok().flatten()?)
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

/// A small file's text; bytes that are not UTF-8 become U+FFFD, so that a
/// damaged file reads as something that is not a valid value.
fn read_trimmed(path: &Path) -> Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, "cannot read", e)),
    }
}

/// Takes an exclusive lock on `file` (a directory or the lock file).
fn lock(file: File, path: &Path) -> Result<Flock<File>> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        Error::Config(format!(
            "{}: locked ({errno}): another depro agent manages this deployment path; \
             give each deployment its own path",
            path.display()
        ))
    })
}

fn lock_file(meta: &Path) -> Result<Flock<File>> {
    let lock_path = meta.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, "cannot open the lock file", e))?;
    lock(file, &lock_path)
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
        // Its rollout hook succeeded, the health checks had not: the node
        // runs v2, across a restart too, and after another rollout starts
        // (its hook may fail), until one finishes.
        dir.mark_switched(&v("v2")).unwrap();
        drop(dir);
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        assert_eq!(dir.load().unwrap().on_node(), Some(&v("v2")));
        dir.begin_rollout(&v("v1")).unwrap();
        assert_eq!(dir.load().unwrap().on_node(), Some(&v("v2")));
        dir.finish_rollout(&v("v1")).unwrap();
        assert_eq!(dir.load().unwrap().on_node(), Some(&v("v1")));
        assert_eq!(
            fs::read_to_string(tmp.path().join("current")).unwrap(),
            "v1\n"
        );
        // A restart that settled is remembered, so it runs once.
        assert_eq!(dir.load().unwrap().restarted, None);
        dir.mark_restarted(1_765_000_000_123).unwrap();
        drop(dir);
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        assert_eq!(dir.load().unwrap().restarted, Some(1_765_000_000_123));
    }

    #[test]
    fn a_second_owner_is_refused_even_after_the_state_directory_was_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let mut first = DeploymentDir::open(tmp.path()).unwrap();
        let err = DeploymentDir::open(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("another depro agent"), "{err}");
        fs::remove_dir_all(tmp.path().join(".depro")).unwrap();
        let err = DeploymentDir::open(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("another depro agent"), "{err}");
        assert!(first.recover_state_dir().unwrap());
        assert!(!first.recover_state_dir().unwrap());
        assert!(tmp.path().join(".depro/versions").is_dir());
    }

    #[test]
    fn unreadable_or_unfinished_markers_mean_not_ready() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeploymentDir::open(tmp.path()).unwrap();
        for name in ["a", "b", "c"] {
            dir.stage(&v(name)).unwrap();
            dir.fresh_version_dir(&v(name)).unwrap();
            dir.mark_ready(&v(name)).unwrap();
        }
        fs::write(tmp.path().join(".depro/versions/a"), b"re\xffady").unwrap();
        dir.begin_clean(&v("b")).unwrap();
        fs::write(tmp.path().join("current"), b"\xfe").unwrap();
        let state = dir.load().unwrap();
        assert_eq!(state.versions[&v("a")], LocalVersion::Deploying);
        assert_eq!(state.versions[&v("b")], LocalVersion::Deploying);
        assert_eq!(state.versions[&v("c")], LocalVersion::Ready);
        assert_eq!(state.live, None);
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
