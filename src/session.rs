//! The agent's Consul session: the thread that keeps it alive.
//!
//! Node keys are acquired with one session per agent (TTL, behavior
//! `delete`, lock-delay 0), so an agent that dies drops out of every count
//! when its session expires (Consul expires it at 2 × TTL). This thread
//! renews it every half TTL, also while the main loop runs a long hook.
//! When Consul answers that the session is gone (expired, destroyed, Consul
//! restarted without its state), it reports the loss and ends; the main loop
//! makes a new session and re-registers every version.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use crate::consul::Consul;
use crate::pacing::Backoff;
use crate::watch::Health;

/// Stops the keeper when dropped.
pub(crate) struct Keeper {
    _stop: mpsc::Sender<()>,
}

/// Starts renewing session `id`; `on_lost` is called once if it is lost.
pub(crate) fn keep_alive(
    consul: Arc<Consul>,
    id: String,
    ttl: Duration,
    health: Arc<Health>,
    on_lost: impl FnOnce() + Send + 'static,
) -> Keeper {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
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
        });
    if let Err(e) = spawned {
        log::error!("cannot start the session thread: {e}");
    }
    Keeper { _stop: stop_tx }
}
