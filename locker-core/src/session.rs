//! Sessions: one lease, kept alive every ttl/3, with a local ownership deadline.
//!
//! A keep-alive that fails, or stays unanswered for ttl/3, makes the session `Unconfirmed` until
//! one is answered; at the deadline (`sent + ttl - safety margin` of the last answered one) it is
//! lost. No call waits past that deadline, except the revoke on close (bounded by the TTL).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend::{LeaseId, LockBackend};
use crate::error::{Error, LossReason, Result};
use crate::retry::Jitter;

/// The health of a session's lease, as this client knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionState {
    /// The last keep-alive succeeded; everything under the lease is owned until `deadline`.
    Live { deadline: Instant },
    /// Keep-alives are failing, or one is unanswered for a third of the TTL; still owned until
    /// `deadline` unless one succeeds.
    Unconfirmed { deadline: Instant },
    /// The lease is gone, or its local deadline passed. Terminal.
    Lost(LossReason),
}

impl SessionState {
    /// Whether entries under the lease may be treated as owned at `now`.
    pub(crate) fn valid_at(&self, now: Instant) -> bool {
        match *self {
            SessionState::Live { deadline } | SessionState::Unconfirmed { deadline } => {
                now < deadline
            }
            SessionState::Lost(_) => false,
        }
    }
}

/// Timing of keep-alives, shared by every session of a locker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How long before the store could expire the lease this client stops claiming it.
    pub(crate) safety_margin: Duration,
    /// The first retry delay after a failed call.
    pub(crate) retry_base: Duration,
    /// The longest retry delay.
    pub(crate) retry_max: Duration,
}

/// A lease kept alive by a background task. Dropping the last reference revokes the lease.
#[derive(Debug)]
pub(crate) struct Session {
    lease: LeaseId,
    ttl: Duration,
    state: watch::Receiver<SessionState>,
    stop: std::sync::Mutex<Option<oneshot::Sender<Stop>>>,
}

#[derive(Debug)]
enum Stop {
    /// Revoke the lease; answer on the sender (if any) once done.
    Revoke(Option<oneshot::Sender<()>>),
    Abandon,
}

impl Session {
    /// Grants a lease of `ttl` and starts keeping it alive.
    pub(crate) async fn grant(
        backend: Arc<dyn LockBackend>,
        ttl: Duration,
        timing: Timing,
        jitter: Arc<Jitter>,
    ) -> Result<Arc<Session>> {
        let sent = Instant::now();
        let lease = backend.grant_lease(ttl).await?;
        let deadline = local_deadline(sent, lease.ttl, timing.safety_margin);
        debug!(lease = format_args!("{:x}", lease.id), ttl = ?lease.ttl, "session started");
        let (state_tx, state_rx) = watch::channel(SessionState::Live { deadline });
        let (stop_tx, stop_rx) = oneshot::channel();
        let keeper = Keeper {
            backend,
            lease: lease.id,
            ttl: lease.ttl,
            timing,
            jitter,
            state: state_tx,
        };
        tokio::spawn(keeper.run(sent, deadline, stop_rx));
        Ok(Arc::new(Session {
            lease: lease.id,
            ttl: lease.ttl,
            state: state_rx,
            stop: std::sync::Mutex::new(Some(stop_tx)),
        }))
    }

    pub(crate) fn lease(&self) -> LeaseId {
        self.lease
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    pub(crate) fn state(&self) -> SessionState {
        *self.state.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    pub(crate) fn is_lost(&self) -> bool {
        matches!(self.state(), SessionState::Lost(_))
    }

    /// Stops keeping the lease alive without revoking it: the store expires it after its TTL.
    pub(crate) fn abandon(&self) {
        self.send_stop(Stop::Abandon);
    }

    /// Revokes the lease now, whoever else still uses the session, and waits until the store
    /// answered (or the attempt, bounded by the TTL, gave up: the lease then expires by itself).
    pub(crate) async fn close(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        self.send_stop(Stop::Revoke(Some(done_tx)));
        let _ = done_rx.await;
    }

    fn send_stop(&self, stop: Stop) {
        let tx = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(stop);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.send_stop(Stop::Revoke(None));
    }
}

/// `sent + ttl - margin`: the last instant this client may believe it holds what is under a lease
/// whose last good keep-alive was sent at `sent`.
fn local_deadline(sent: Instant, ttl: Duration, margin: Duration) -> Instant {
    sent + ttl.saturating_sub(margin)
}

struct Keeper {
    backend: Arc<dyn LockBackend>,
    lease: LeaseId,
    ttl: Duration,
    timing: Timing,
    jitter: Arc<Jitter>,
    state: watch::Sender<SessionState>,
}

impl Keeper {
    async fn run(
        self,
        mut last_sent: Instant,
        mut deadline: Instant,
        mut stop: oneshot::Receiver<Stop>,
    ) {
        let lease = format_args!("{:x}", self.lease).to_string();
        let mut failures: u32 = 0;
        let mut next = last_sent + self.ttl / 3;
        loop {
            tokio::select! {
                biased;
                msg = &mut stop => {
                    match msg {
                        Ok(Stop::Abandon) => {
                            debug!(%lease, "session abandoned: the lease will expire");
                        }
                        Ok(Stop::Revoke(done)) => self.revoke(&lease, done).await,
                        Err(_) => self.revoke(&lease, None).await,
                    }
                    return;
                }
                _ = tokio::time::sleep_until(next.min(deadline)) => {}
            }
            if Instant::now() >= deadline {
                self.lose(&lease, LossReason::DeadlinePassed);
                return;
            }
            let sent = Instant::now();
            let call = tokio::time::timeout_at(deadline, self.backend.keep_alive(self.lease));
            tokio::pin!(call);
            // Unanswered for a third of the TTL is as suspect as failed (a hung store).
            let silence = tokio::time::sleep_until(sent + self.ttl / 3);
            tokio::pin!(silence);
            let mut suspect = matches!(*self.state.borrow(), SessionState::Live { .. });
            let answer = loop {
                tokio::select! {
                    biased;
                    msg = &mut stop => {
                        match msg {
                            Ok(Stop::Abandon) => {}
                            Ok(Stop::Revoke(done)) => self.revoke(&lease, done).await,
                            Err(_) => self.revoke(&lease, None).await,
                        }
                        return;
                    }
                    answer = &mut call => break answer,
                    () = &mut silence, if suspect => {
                        suspect = false;
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        warn!(%lease, ?remaining, "keep-alive unanswered for a third of the TTL");
                        self.state
                            .send_replace(SessionState::Unconfirmed { deadline });
                    }
                }
            };
            match answer {
                Err(_elapsed) => {
                    self.lose(&lease, LossReason::DeadlinePassed);
                    return;
                }
                Ok(Ok(Some(ttl_left))) => {
                    if failures > 0 {
                        info!(%lease, "keep-alive recovered");
                    }
                    failures = 0;
                    last_sent = sent;
                    deadline = local_deadline(sent, ttl_left, self.timing.safety_margin);
                    next = last_sent + self.ttl / 3;
                    self.state.send_replace(SessionState::Live { deadline });
                }
                Ok(Ok(None)) | Ok(Err(Error::LeaseLost { .. })) => {
                    self.lose(&lease, LossReason::LeaseGone);
                    return;
                }
                Ok(Err(err)) => {
                    warn!(%lease, error = %err, remaining = ?deadline.saturating_duration_since(Instant::now()), "keep-alive failed");
                    self.state
                        .send_replace(SessionState::Unconfirmed { deadline });
                    let delay = self.jitter.backoff(
                        failures,
                        self.timing.retry_base,
                        self.timing.retry_max.min(self.ttl / 3),
                    );
                    failures = failures.saturating_add(1);
                    next = Instant::now() + delay;
                }
            }
        }
    }

    fn lose(&self, lease: &str, reason: LossReason) {
        warn!(%lease, %reason, "session lost");
        self.state.send_replace(SessionState::Lost(reason));
    }

    async fn revoke(&self, lease: &str, done: Option<oneshot::Sender<()>>) {
        self.state
            .send_replace(SessionState::Lost(LossReason::Released));
        // Bounded by the TTL: retried while the store is briefly unreachable; past the TTL the
        // lease has expired by itself anyway.
        let give_up = Instant::now() + self.ttl;
        let mut failures = 0u32;
        loop {
            match tokio::time::timeout_at(give_up, self.backend.revoke_lease(self.lease)).await {
                Ok(Ok(())) => {
                    debug!(%lease, "session revoked");
                    break;
                }
                Ok(Err(err)) if err.is_retryable() => {
                    let delay = self.jitter.backoff(
                        failures,
                        self.timing.retry_base,
                        self.timing.retry_max,
                    );
                    failures = failures.saturating_add(1);
                    debug!(%lease, error = %err, ?delay, "revoke failed; retrying");
                    if Instant::now() + delay >= give_up {
                        debug!(%lease, "giving up the revoke; the lease will expire");
                        break;
                    }
                    tokio::time::sleep(delay).await;
                }
                Ok(Err(err)) => {
                    debug!(%lease, error = %err, "revoke failed; the lease will expire");
                    break;
                }
                Err(_) => {
                    debug!(%lease, "revoke timed out; the lease will expire");
                    break;
                }
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}
