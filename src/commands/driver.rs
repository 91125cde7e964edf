//! `<prefix>/.driver`: held by the command that drives a progressive
//! rollout's waves, with a session of its own (TTL 10 s, renewed every 3 s,
//! behavior delete). While the key is there, a command is at work on the
//! rollout: `status` says by whom, `depro resume` leaves the waves to it,
//! and a second command refuses to drive them too (exit 5). When the
//! command ends, is interrupted, or dies, the key goes with its session
//! (at once, or once the session's TTL runs out after a kill -9), and the
//! rollout is abandoned: `depro resume` or `depro rollout V` takes it up.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

use super::Ctx;
use crate::consul::{Conflict, Consul, ConsulErrorKind, Read, TxnOp, TxnOutcome};
use crate::error::{Error, Result};
use crate::tree::driver_of;
use crate::version_name::VersionName;

const TTL: Duration = Duration::from_secs(10);
const RENEW_EVERY: Duration = Duration::from_secs(3);

/// The driver's claim: held until dropped.
pub(crate) struct Driver {
    consul: Arc<Consul>,
    session: String,
    stop: Option<Sender<()>>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Driver {
    /// Claims `.driver` for the rollout of `version` from `current`'s index
    /// `base_index`; exit 5 when another command holds it for the same
    /// rollout. A claim left by a command that died, for a rollout since
    /// finished or undone, is taken over.
    ///
    /// `None` when the ACL token may not create sessions (the documented
    /// least CLI policy reads them only): the rollout is driven without the
    /// claim, and the progress says what that costs.
    pub(crate) fn take(
        ctx: &Ctx,
        version: &VersionName,
        base_index: u64,
    ) -> Result<Option<Driver>> {
        let session = match ctx.retrying(|c| c.create_session("depro rollout driver", TTL)) {
            Ok(session) => session,
            Err(Error::Consul(e)) if matches!(e.kind, ConsulErrorKind::Denied(_)) => {
                ctx.out.line(&format!(
                    "the ACL token may not create sessions: no claim on {} for this rollout, so \
                     `depro status` cannot tell it is driven and another command could drive it \
                     too (give the token session_prefix \"\" {{ policy = \"write\" }})",
                    ctx.prefix.driver_key()
                ));
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        match claim(ctx, &session, version, base_index) {
            Ok(()) => {}
            Err(error) => {
                let _ = ctx.consul.destroy_session(&session);
                return Err(error);
            }
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let renewer = {
            let (consul, session) = (ctx.consul.clone(), session.clone());
            std::thread::Builder::new()
                .name("driver".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(RENEW_EVERY) {
                        // A session Consul lost takes the key with it: the
                        // rollout then looks abandoned, which a resume
                        // takes up; nothing else to do here.
                        let _ = consul.renew_session(&session);
                    }
                })
                .ok()
        };
        {
            let (consul, session) = (ctx.consul.clone(), session.clone());
            // At most a second or two: Ctrl-C must not hang on a Consul
            // that does not answer (the session then lapses on its own).
            super::interrupt::on_interrupt(Box::new(move || {
                let (done, wait) = mpsc::channel();
                let _ = std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        let _ = consul.destroy_session(&session);
                        let _ = done.send(());
                    });
                let _ = wait.recv_timeout(Duration::from_secs(2));
            }));
        }
        Ok(Some(Driver {
            consul: ctx.consul.clone(),
            session,
            stop: Some(stop),
            renewer,
        }))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        super::interrupt::keep_nothing();
        drop(self.stop.take());
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.join();
        }
        let _ = self.consul.destroy_session(&self.session);
    }
}

/// Locks `.driver` with `session`, taking over a stale claim once.
fn claim(ctx: &Ctx, session: &str, version: &VersionName, base_index: u64) -> Result<()> {
    let key = ctx.prefix.driver_key();
    let value = serde_json::json!({
        "by": ctx.user,
        "since": crate::logging::timestamp(),
        "version": version.as_str(),
        "base_index": base_index,
    })
    .to_string();
    for _ in 0..2 {
        let op = TxnOp::Lock {
            key: &key,
            value: value.as_bytes(),
            session,
            flags: 0,
        };
        let failures = match ctx.retrying(|c| c.txn(std::slice::from_ref(&op)))? {
            TxnOutcome::Committed(_) => return Ok(()),
            TxnOutcome::Rejected(failures) => failures,
        };
        if let Some(denied) = failures.iter().find(|f| f.conflict == Conflict::Denied) {
            return Err(Error::Consul(Box::new(
                ctx.consul
                    .denied(format!("writing {key:?}"), denied.what.clone()),
            )));
        }
        let Some(held) = ctx.retrying(|c| c.get(&key, Read::consistent()))?.value else {
            continue; // let go meanwhile
        };
        let record: serde_json::Value = serde_json::from_slice(&held.value).unwrap_or_default();
        let same = record["version"] == version.as_str() && record["base_index"] == base_index;
        if same {
            return Err(Error::LostRace(format!(
                "another command drives this rollout under {} ({}); wait for it, pause it with \
                 `depro pause -prefix={}`, or stop that command first (one that was killed lets \
                 go within 20 s)",
                ctx.prefix,
                driver_of(&held.value),
                ctx.prefix
            )));
        }
        // A claim on the rollout under way (another command's, of another
        // version or base) is never taken: that command lives.
        let claimed = |plan: &crate::tree::RolloutPlan| {
            record["version"] == plan.version.as_str() && record["base_index"] == plan.base_index
        };
        if let Some((plan, _)) = ctx.read_rollout()?.filter(|(plan, _)| claimed(plan)) {
            return Err(Error::LostRace(format!(
                "another command drives the progressive rollout of {} under {} ({}); nothing was \
                 written; see `depro status -prefix={}`",
                crate::tree::shown(&plan.version),
                ctx.prefix,
                driver_of(&held.value),
                ctx.prefix
            )));
        }
        // The claim of a command that died driving a rollout since
        // finished or undone: taken over.
        let op = TxnOp::DeleteCas {
            key: &key,
            index: held.modify_index,
        };
        ctx.retrying(|c| c.txn(std::slice::from_ref(&op)))?;
    }
    Err(Error::LostRace(format!(
        "{key} kept changing while this command tried to drive the rollout; try again"
    )))
}
