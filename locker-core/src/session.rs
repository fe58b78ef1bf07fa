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

use crate::backend::{Lease, LeaseId, LockBackend};
use crate::error::{Error, LossReason, Result};
use crate::retry::Jitter;

/// The health of a session's lease, as this client knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Whether the lease is this client's, to revoke when the last reference goes: a granted
    /// lease is; a taken-up one is not (other processes may have taken up other tenures under
    /// it): it is left to expire once nobody here keeps it alive.
    ours: bool,
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
        debug!(lease = format_args!("{:x}", lease.id), ttl = ?lease.ttl, "session started");
        Ok(Session::start(backend, lease, sent, timing, jitter, true))
    }

    /// Takes up a lease another process granted (a resumed tenure's): checks with a keep-alive
    /// that it lives (its TTL is what the store answers), then keeps it alive as any session.
    pub(crate) async fn take_up(
        backend: Arc<dyn LockBackend>,
        lease: LeaseId,
        timing: Timing,
        jitter: Arc<Jitter>,
    ) -> Result<Arc<Session>> {
        let sent = Instant::now();
        let ttl = backend
            .keep_alive(lease)
            .await?
            .ok_or(Error::LeaseLost { lease })?;
        debug!(lease = format_args!("{lease:x}"), ?ttl, "session taken up");
        let lease = Lease { id: lease, ttl };
        Ok(Session::start(backend, lease, sent, timing, jitter, false))
    }

    /// A session of `lease`, whose last good keep-alive (or grant) was sent at `sent`, kept
    /// alive from now on; revoked when the last reference goes if it is `ours`.
    fn start(
        backend: Arc<dyn LockBackend>,
        lease: Lease,
        sent: Instant,
        timing: Timing,
        jitter: Arc<Jitter>,
        ours: bool,
    ) -> Arc<Session> {
        let deadline = local_deadline(sent, lease.ttl, timing.safety_margin);
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
        Arc::new(Session {
            lease: lease.id,
            ttl: lease.ttl,
            state: state_rx,
            stop: std::sync::Mutex::new(Some(stop_tx)),
            ours,
        })
    }

    /// Whether the lease is this client's own grant (not a taken-up one).
    pub(crate) fn is_ours(&self) -> bool {
        self.ours
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
        if self.ours {
            self.send_stop(Stop::Revoke(None));
        } else {
            self.send_stop(Stop::Abandon);
        }
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
        let mut backoff = self.jitter.new_backoff(
            self.timing.retry_base,
            self.timing.retry_max.min(self.ttl / 3),
        );
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
                    if backoff.failures() > 0 {
                        info!(%lease, "keep-alive recovered");
                    }
                    backoff.reset();
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
                    next = Instant::now() + backoff.next_delay();
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
            .send_replace(SessionState::Lost(LossReason::Stopped));
        // Bounded by the TTL: retried while the store is briefly unreachable; past the TTL the
        // lease has expired by itself anyway.
        let give_up = Instant::now() + self.ttl;
        let mut backoff = self
            .jitter
            .new_backoff(self.timing.retry_base, self.timing.retry_max);
        loop {
            match tokio::time::timeout_at(give_up, self.backend.revoke_lease(self.lease)).await {
                Ok(Ok(())) => {
                    debug!(%lease, "session revoked");
                    break;
                }
                Ok(Err(err)) if err.is_retryable() => {
                    let delay = backoff.next_delay();
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

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::backend::{Entry, Joined, Lease, Limits, Position, Resumption, Revision, Snapshot};
    use crate::backend::{WatchStream, Watcher};

    const TTL: Duration = Duration::from_secs(3);
    const MARGIN: Duration = Duration::from_millis(300);

    /// How the store answers keep-alives.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Link {
        /// At once.
        Up,
        /// After this long.
        Slow(Duration),
        /// Not until the link changes.
        Hang,
        /// With an error, at once.
        Fail,
    }

    /// A store of leases only (a session makes no other call), with a scripted link.
    #[derive(Debug)]
    struct Leases {
        link: watch::Sender<Link>,
    }

    #[async_trait]
    impl Watcher for Leases {
        async fn watch(&self, _: &str, _: Option<Revision>) -> Result<WatchStream> {
            unreachable!("a session never watches")
        }
    }

    #[async_trait]
    impl LockBackend for Leases {
        fn limits(&self) -> Limits {
            unreachable!("a session never asks")
        }

        async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
            Ok(Lease { id: 0x5e55, ttl })
        }

        async fn keep_alive(&self, _: LeaseId) -> Result<Option<Duration>> {
            let mut link = self.link.subscribe();
            loop {
                let now = *link.borrow_and_update();
                match now {
                    Link::Up => return Ok(Some(TTL)),
                    Link::Slow(latency) => {
                        tokio::time::sleep(latency).await;
                        return Ok(Some(TTL));
                    }
                    Link::Fail => return Err(Error::unavailable("link down")),
                    Link::Hang => {
                        let _ = link.changed().await;
                    }
                }
            }
        }

        async fn revoke_lease(&self, _: LeaseId) -> Result<()> {
            Ok(())
        }

        async fn join(&self, _: &str, _: LeaseId, _: &[u8]) -> Result<Joined> {
            unreachable!("a session never joins")
        }

        async fn position(&self, _: &str, _: &str, _: Revision) -> Result<Position> {
            unreachable!("a session never reads entries")
        }

        async fn holder(&self, _: &str) -> Result<(Option<Entry>, Revision)> {
            unreachable!("a session never reads entries")
        }

        async fn entries(&self, _: &str) -> Result<Snapshot> {
            unreachable!("a session never reads entries")
        }

        async fn delete_entry(&self, _: &str, _: Revision) -> Result<bool> {
            unreachable!("a session never deletes entries")
        }

        async fn update_value(&self, _: &str, _: Revision, _: &[u8]) -> Result<Option<Revision>> {
            unreachable!("a session never writes entries")
        }

        async fn resume(
            &self,
            _: &str,
            _: &str,
            _: Revision,
            _: Revision,
            _: &[u8],
        ) -> Result<Resumption> {
            unreachable!("a session never writes entries")
        }
    }

    /// Grants a session of [`TTL`] on a link that starts as `link`, and records the states it
    /// publishes.
    async fn session_on(link: Link) -> (Arc<Session>, watch::Sender<Link>, Recorder) {
        let leases = Arc::new(Leases {
            link: watch::channel(link).0,
        });
        let timing = Timing {
            safety_margin: MARGIN,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(400),
        };
        let session = Session::grant(leases.clone(), TTL, timing, Arc::new(Jitter::new(7)))
            .await
            .expect("granted");
        let recorder = Recorder::follow(&session);
        (session, leases.link.clone(), recorder)
    }

    /// The distinct states a session published, each with when (since the recorder started).
    struct Recorder(tokio::task::JoinHandle<Vec<(Duration, SessionState)>>);

    impl Recorder {
        fn follow(session: &Session) -> Recorder {
            let mut rx = session.subscribe();
            let start = Instant::now();
            Recorder(tokio::spawn(async move {
                let mut seen: Vec<(Duration, SessionState)> = Vec::new();
                loop {
                    let state = *rx.borrow_and_update();
                    if seen.last().is_none_or(|(_, last)| *last != state) {
                        seen.push((start.elapsed(), state));
                    }
                    if matches!(state, SessionState::Lost(_)) || rx.changed().await.is_err() {
                        return seen;
                    }
                }
            }))
        }

        /// Everything recorded until the session was lost.
        async fn until_lost(self) -> Vec<(Duration, SessionState)> {
            self.0.await.expect("the recorder ran")
        }
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A keep-alive (sent at ttl/3 = 1 s) that hangs makes the session `Unconfirmed` once it has
    /// been outstanding for ttl/3 (at 2 s), with the deadline of the last answered one
    /// (0 + 3 s - 300 ms); it is lost at that deadline.
    #[tokio::test(start_paused = true)]
    async fn keepalive_unanswered_for_a_third_of_the_ttl_is_unconfirmed() {
        let start = Instant::now();
        let (session, _link, recorder) = session_on(Link::Hang).await;
        let deadline = start + ms(2700);
        assert_eq!(
            recorder.until_lost().await,
            [
                (ms(0), SessionState::Live { deadline }),
                (ms(2000), SessionState::Unconfirmed { deadline }),
                (ms(2700), SessionState::Lost(LossReason::DeadlinePassed)),
            ]
        );
        drop(session);
    }

    /// The same as a failed keep-alive, which is `Unconfirmed` at once (at 1 s), same deadline.
    #[tokio::test(start_paused = true)]
    async fn failed_keepalive_is_unconfirmed_at_once() {
        let start = Instant::now();
        let (session, _link, recorder) = session_on(Link::Fail).await;
        let deadline = start + ms(2700);
        assert_eq!(
            recorder.until_lost().await,
            [
                (ms(0), SessionState::Live { deadline }),
                (ms(1000), SessionState::Unconfirmed { deadline }),
                (ms(2700), SessionState::Lost(LossReason::DeadlinePassed)),
            ]
        );
        drop(session);
    }

    /// An answer that comes after ttl/3 makes the session `Live` again. The keep-alive it answers
    /// (sent at 1 s) gives 3.7 s; the next one, due since 2 s, goes at once and is answered at
    /// once, so the session reads `Live` until 2.5 s + 3 s - 300 ms.
    #[tokio::test(start_paused = true)]
    async fn late_keepalive_answer_makes_the_session_live_again() {
        let start = Instant::now();
        let (session, link, _recorder) = session_on(Link::Hang).await;
        let mut states = session.subscribe();
        tokio::time::sleep_until(start + ms(2500)).await;
        assert_eq!(
            *states.borrow_and_update(),
            SessionState::Unconfirmed {
                deadline: start + ms(2700)
            }
        );
        link.send_replace(Link::Up);
        states.changed().await.expect("a new state");
        assert_eq!(
            *states.borrow_and_update(),
            SessionState::Live {
                deadline: start + ms(5200)
            }
        );
    }

    /// Keep-alives answered in just under ttl/3 never make the session `Unconfirmed`.
    #[tokio::test(start_paused = true)]
    async fn slow_keepalives_answered_within_a_third_of_the_ttl_stay_live() {
        let (session, link, recorder) = session_on(Link::Slow(ms(999))).await;
        tokio::time::sleep(TTL * 10).await;
        link.send_replace(Link::Hang);
        let seen = recorder.until_lost().await;
        let first_suspicion = seen
            .iter()
            .position(|(_, state)| !matches!(state, SessionState::Live { .. }))
            .expect("suspected once hung");
        assert!(
            seen[first_suspicion].0 > TTL * 10,
            "unconfirmed while answered in time: {seen:?}"
        );
        assert!(first_suspicion > 10, "kept alive meanwhile: {seen:?}");
        drop(session);
    }
}
