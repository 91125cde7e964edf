//! The agent's Consul session: making one, keeping it alive, losing it,
//! and knowing its own old ones.
//!
//! Node keys are acquired with one session per agent (TTL, behavior
//! `delete`, lock-delay 0), so an agent that dies drops out of every count
//! when its session expires (Consul expires it at 2 × TTL). A keeper thread
//! renews it every half TTL, also while the main loop runs a long hook.
//! When Consul answers that the session is gone (expired, destroyed, Consul
//! restarted without its state), the keeper reports the loss and ends; the
//! main loop makes a new session and re-registers every version.
//!
//! Every session the agent makes is recorded on disk (the last
//! [`HISTORY`] of them), so that it recognises its own old sessions: the
//! one an earlier run left (destroyed at start, so a restart after `kill -9`
//! does not wait for the old keys to expire), and those a snapshot restore
//! brings back still holding this node's keys (destroyed when found).
//! A session it does not know is never destroyed: that may be another agent
//! given the same name by mistake.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::watch::Health;
use crate::consul::{Consul, ConsulError};
use crate::pacing::Backoff;

/// How many of its own sessions an agent remembers.
pub(crate) const HISTORY: usize = 32;

pub(crate) struct Sessions {
    active: Option<Active>,
    /// The session the previous run used, destroyed before a new one is made.
    leftover: BTreeSet<String>,
    /// Every session this agent made, oldest first.
    history: VecDeque<String>,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

struct Active {
    id: String,
    _keeper: Keeper,
}

/// What `ensure` did.
pub(crate) enum Ensured {
    /// A session exists (it may be new: then every key must be written again).
    Ready { new: bool },
    /// None yet; `retry_at` says when to try again.
    Later,
}

impl Sessions {
    /// Starts from what earlier runs recorded: their sessions, newest last.
    pub(crate) fn new(recorded: Vec<String>) -> Sessions {
        let leftover = recorded.last().cloned().into_iter().collect();
        let mut history: VecDeque<String> = recorded.into_iter().collect();
        while history.len() > HISTORY {
            history.pop_front();
        }
        Sessions {
            active: None,
            leftover,
            history,
            retry_at: None,
            // Short: while it has no session an agent is missing from every
            // count (`-nodes=all`), and a try costs Consul one request.
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(2)),
        }
    }

    /// Consul answers again: try at once, from the shortest backoff.
    pub(crate) fn hurry(&mut self) {
        self.retry_at = None;
        self.backoff.reset();
    }

    /// The session in use, if any.
    pub(crate) fn id(&self) -> Option<&str> {
        self.active.as_ref().map(|a| a.id.as_str())
    }

    /// Every session this agent has made, oldest first, for the record.
    pub(crate) fn history(&self) -> Vec<String> {
        self.history.iter().cloned().collect()
    }

    /// Whether `id` is one of this agent's own sessions, but not the one in use.
    pub(crate) fn is_own_old(&self, id: &str) -> bool {
        self.id() != Some(id) && self.history.iter().any(|h| h == id)
    }

    /// Makes sure a session exists: destroys the previous run's, creates a
    /// new one and starts its keeper. `on_lost` is called (from the keeper
    /// thread) if Consul loses it.
    pub(crate) fn ensure(
        &mut self,
        consul: &Arc<Consul>,
        name: &str,
        ttl: Duration,
        health: &Arc<Health>,
        on_lost: impl FnOnce(String) + Send + 'static,
    ) -> Ensured {
        if self.active.is_some() {
            return Ensured::Ready { new: false };
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Ensured::Later;
        }
        match self.create(consul, name, ttl, health, on_lost) {
            Ok(()) => {
                health.reachable(consul);
                self.backoff.reset();
                self.retry_at = None;
                Ensured::Ready { new: true }
            }
            Err(why) => {
                match why {
                    Failed::Consul(e) => health.unreachable(&e),
                    Failed::Thread(e) => {
                        log::error!("cannot start the session keeper thread: {e}; retrying")
                    }
                }
                self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                Ensured::Later
            }
        }
    }

    fn create(
        &mut self,
        consul: &Arc<Consul>,
        name: &str,
        ttl: Duration,
        health: &Arc<Health>,
        on_lost: impl FnOnce(String) + Send + 'static,
    ) -> Result<(), Failed> {
        while let Some(old) = self.leftover.first().cloned() {
            consul.destroy_session(&old).map_err(Failed::Consul)?;
            log::info!("destroyed the session {old} of an earlier run");
            self.leftover.remove(&old);
        }
        let id = consul
            .create_session(&format!("depro agent {name}"), ttl)
            .map_err(Failed::Consul)?;
        let lost = id.clone();
        let keeper = keep_alive(consul.clone(), id.clone(), ttl, health.clone(), move || {
            on_lost(lost)
        });
        let keeper = match keeper {
            Ok(keeper) => keeper,
            Err(e) => {
                // Without a keeper it would expire unnoticed: give it up.
                let _ = consul.destroy_session(&id);
                return Err(Failed::Thread(e));
            }
        };
        log::info!("registered with Consul (session {id})");
        self.history.push_back(id.clone());
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.active = Some(Active {
            id,
            _keeper: keeper,
        });
        Ok(())
    }

    /// Consul lost session `id`: forget it (its keys are gone with it).
    /// Returns whether it was the one in use.
    pub(crate) fn lost(&mut self, id: &str) -> bool {
        if self.id() == Some(id) {
            log::warn!(
                "the Consul session expired or was lost; making a new one and registering again"
            );
            self.active = None;
            // Due now: the main loop may have passed `ensure` already in
            // this pass, and must not sleep before making a new one.
            self.retry_at = Some(Instant::now());
            true
        } else {
            false
        }
    }

    /// Destroys the session in use (on shutdown or reconnect).
    pub(crate) fn end(&mut self, consul: &Consul) {
        if let Some(active) = self.active.take() {
            match consul.destroy_session(&active.id) {
                Ok(()) => log::info!("destroyed the session {}", active.id),
                Err(e) => log::warn!("{e}; it expires by itself"),
            }
        }
    }

    /// Whether a new session can be tried before `at`.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| self.active.is_none())
    }
}

enum Failed {
    Consul(ConsulError),
    Thread(std::io::Error),
}

/// Stops the keeper when dropped.
pub(crate) struct Keeper {
    _stop: mpsc::Sender<()>,
}

/// Starts renewing session `id`; `on_lost` is called once if it is lost.
fn keep_alive(
    consul: Arc<Consul>,
    id: String,
    ttl: Duration,
    health: Arc<Health>,
    on_lost: impl FnOnce() + Send + 'static,
) -> std::io::Result<Keeper> {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("session".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut interval = ttl / 2;
            let mut backoff = Backoff::new(Duration::from_millis(500), ttl / 4);
            loop {
                match stop_rx.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return, // stopped
                }
                match consul.renew_session(&id) {
                    Ok(Some(granted)) => {
                        health.reachable(&consul);
                        backoff.reset();
                        interval = (granted.max(ttl)) / 2;
                    }
                    Ok(None) => {
                        if stop_rx.try_recv() == Err(mpsc::TryRecvError::Empty) {
                            on_lost();
                        }
                        return;
                    }
                    Err(e) => {
                        health.unreachable(&e);
                        interval = backoff.next_delay();
                    }
                }
            }
        })?;
    Ok(Keeper { _stop: stop_tx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_runs_session_is_a_leftover_and_all_recorded_ones_are_its_own() {
        let sessions = Sessions::new(vec!["a".into(), "b".into()]);
        assert_eq!(sessions.leftover, BTreeSet::from(["b".to_string()]));
        assert!(sessions.is_own_old("a") && sessions.is_own_old("b"));
        assert!(!sessions.is_own_old("someone-else"));
    }

    #[test]
    fn a_lost_session_asks_the_main_loop_to_make_a_new_one_at_once() {
        // Found when a session loss was noticed after `ensure` in the same
        // pass (the agent's announcement was refused): with nothing else
        // due, the main loop slept until its watches' next answer, up to a
        // minute, without a session.
        let mut sessions = Sessions::new(Vec::new());
        let (stop, _) = mpsc::channel();
        sessions.active = Some(Active {
            id: "s1".into(),
            _keeper: Keeper { _stop: stop },
        });
        assert_eq!(sessions.retry_at(), None);
        assert!(sessions.lost("s1"));
        assert!(
            sessions.retry_at().is_some_and(|at| at <= Instant::now()),
            "nothing wakes the main loop to make a new session"
        );
    }

    #[test]
    fn the_history_is_bounded() {
        let recorded: Vec<String> = (0..HISTORY + 10).map(|i| i.to_string()).collect();
        let sessions = Sessions::new(recorded);
        assert_eq!(sessions.history().len(), HISTORY);
        assert!(!sessions.is_own_old("0"));
        assert!(sessions.is_own_old(&(HISTORY + 9).to_string()));
    }
}
