//! Leader election: the lock under other names, as etcd's `concurrency.Election` (campaign = lock
//! with a value, proclaim = set the value, resign = release, observe = watch, leader = get), on the
//! same keys, so that `etcdctl elect` and Go services see our leaders and we theirs; and
//! [`Locker::run_while_leader`], work that runs once per term and stops when the term ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures::stream::BoxStream;
use tracing::{info, warn};

use crate::error::{Error, LossReason, Result};
use crate::fence::Fence;
use crate::handle::{LockGuard, Tenure};
use crate::locker::{LockOptions, Locker};
use crate::resume::ResumeToken;
use crate::types::{FencingToken, Holder, Ownership};

/// Leading an election: from [`Locker::campaign`], until [`resign`](Leadership::resign) or a loss.
///
/// It is a [`LockGuard`] on the election's name whose value is the leader's (an address, a
/// name): other candidates wait behind it, and [`Locker::leader`] and [`Locker::observe`] (and
/// `etcdctl elect -l`) show its value. Leading can end without the leadership's say (its lease
/// lost, its deadline passed, its entry deleted): race the leader's work against
/// [`lost`](Leadership::lost), fence its writes with [`fence`](Leadership::fence), or let
/// [`Locker::run_while_leader`] do both. Dropping it resigns in the background.
#[must_use = "dropping a Leadership resigns"]
pub struct Leadership {
    guard: LockGuard,
    value: Mutex<Vec<u8>>,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name())
            .field("token", &self.token())
            .field("value", &String::from_utf8_lossy(&self.value()))
            .field("ownership", &self.ownership())
            .finish()
    }
}

impl Leadership {
    /// The election's name (the lock key).
    pub fn name(&self) -> &str {
        self.guard.key()
    }

    /// The fencing token of this term: greater for every later leader.
    pub fn token(&self) -> FencingToken {
        self.guard.token()
    }

    /// What this term is fenced by (see [`Fence`]).
    pub fn fence(&self) -> &Fence {
        self.guard.fence()
    }

    /// The value this leader proclaims now.
    pub fn value(&self) -> Vec<u8> {
        self.value
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether this term goes on: leading, within the local deadline of its lease.
    pub fn is_leader(&self) -> bool {
        self.guard.is_owned()
    }

    /// Where the leadership stands now (see [`Ownership`]).
    pub fn ownership(&self) -> Ownership {
        self.guard.ownership()
    }

    /// What a new process needs to continue this term after this one exits (see
    /// [`ResumeToken`]); `None` once the term has ended. Campaign with
    /// [`LockOptions::resume`] to take it up.
    pub fn resume_token(&self) -> Option<ResumeToken> {
        self.guard.resume_token()
    }

    /// This term as a [`Tenure`]: its token, its fence, and [`Tenure::lost`].
    pub fn tenure(&self) -> Tenure {
        self.guard.tenure()
    }

    /// Completes when the term ends, with the reason.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) -> LossReason {
        self.guard.lost().await
    }

    /// Sets the leader's value in the store, guarded by this term (etcd's `Proclaim`): observers
    /// see it at once.
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; [`Error::NotOwned`](crate::Error::NotOwned) if the term has
    /// ended; store errors.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        let value = value.into();
        self.guard.set_value(value.clone()).await?;
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = value;
        Ok(())
    }

    /// Steps down now: the next candidate leads one round trip later (etcd's `Resign`).
    ///
    /// # Errors
    ///
    /// [`Error::NotOwned`](crate::Error::NotOwned) if the term had ended before; store errors
    /// (the lease then expires as usual).
    pub async fn resign(self) -> Result<()> {
        self.guard.release().await
    }
}

/// When [`Locker::run_while_leader`] stops the work of a term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum StopWork {
    /// At the first doubt: as soon as the leadership is [`Ownership::Unconfirmed`] (a keep-alive
    /// failed, or went unanswered for a third of the TTL), the work is cancelled and the
    /// leadership resigned; the replica campaigns again. The safe choice for work that must not
    /// overlap with a next leader's (Curator's default): it stops a whole TTL before the store
    /// could give the leadership away. The cost: a short stall of the store ends the term, and
    /// another replica may take over.
    #[default]
    WhenUnconfirmed,
    /// At the loss only: the work goes on through `Unconfirmed`, and is cancelled when the term
    /// ends (the store said the lease or the entry is gone, or the local deadline passed, which
    /// comes a safety margin before the store could expire the lease). A stall shorter than the
    /// deadline costs nothing; the work may run until shortly before the store can move on, so
    /// fence its writes.
    AtLoss,
}

/// Options of [`Locker::run_while_leader`].
#[must_use]
#[derive(Default)]
pub struct LeaderOptions {
    lock: LockOptions,
    stop: StopWork,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl fmt::Debug for LeaderOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderOptions")
            .field("lock", &self.lock)
            .field("stop", &self.stop)
            .field("shutdown", &self.shutdown.is_some())
            .finish()
    }
}

impl LeaderOptions {
    /// The defaults: the locker's session, work stopped when unconfirmed, no shutdown.
    pub fn new() -> Self {
        LeaderOptions::default()
    }

    /// The options of each campaign's lock (a session of its own, say). A
    /// [`resume`](LockOptions::resume) token is for the first campaign only: it continues the
    /// term a process before this one exported, and if that term had ended, campaigns as anyone.
    pub fn lock(mut self, options: LockOptions) -> Self {
        self.lock = options;
        self
    }

    /// When a term's work is stopped (default [`StopWork::WhenUnconfirmed`]).
    pub fn stop_work(mut self, stop: StopWork) -> Self {
        self.stop = stop;
        self
    }

    /// Stops campaigning when `shutdown` completes: the work of a term in progress is cancelled,
    /// the leadership resigned, and `run_while_leader` returns `Ok(())`. Without it,
    /// `run_while_leader` goes on until its future is dropped (which resigns in the background).
    pub fn until(mut self, shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(shutdown));
        self
    }
}

/// Why a term's work stopped.
enum TermEnd<E> {
    Shutdown,
    NotLeading,
    Done(std::result::Result<(), E>),
}

impl Locker {
    /// Campaigns for leadership of `name` with `value`: waits until this candidate leads (the
    /// candidates before it resigned or lost), and answers the [`Leadership`]. etcd's
    /// `Election.Campaign`, on the same keys.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped campaign leaves nothing in the queue.
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; a permanent store error.
    pub async fn campaign(
        &self,
        name: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Leadership> {
        self.campaign_with(name, value, LockOptions::new()).await
    }

    /// [`Locker::campaign`] with options.
    ///
    /// # Errors
    ///
    /// As [`Locker::campaign`]; with [`LockOptions::resume`], as [`Locker::acquire_with`] (a
    /// term to resume that had ended: [`Error::NotOwned`]).
    pub async fn campaign_with(
        &self,
        name: impl Into<String>,
        value: impl Into<Vec<u8>>,
        options: LockOptions,
    ) -> Result<Leadership> {
        let value = value.into();
        let guard = self.acquire_with(name, value.clone(), options).await?;
        Ok(Leadership {
            guard,
            value: Mutex::new(value),
        })
    }

    /// The leader of `name` now, or `None`: its value, token and lease (etcd's `Election.Leader`).
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; store errors.
    pub async fn leader(&self, name: &str) -> Result<Option<Holder>> {
        self.get(name).await
    }

    /// A stream of the leader of `name`: the current one first, then every change of leader or of
    /// its value (a proclaim), `None` whenever there is none (etcd's `Election.Observe`, which
    /// says nothing when there is no leader). It is [`Locker::watch`] on the election's name.
    ///
    /// # Errors
    ///
    /// Bad input, before any I/O.
    pub fn observe(&self, name: &str) -> Result<BoxStream<'static, Result<Option<Holder>>>> {
        self.watch(name)
    }

    /// Runs `work` while this candidate leads `name`, once per term, for as long as it runs:
    /// campaigns with `value`; when it leads, calls `work` with the term's [`Tenure`] (its token
    /// and its fence, for the writes the work makes); cancels the work (drops its future) when
    /// the term ends, at the first doubt or at the loss ([`StopWork`]); and campaigns again.
    ///
    /// # Behavior
    ///
    /// - **The work returns `Ok(())`**: its term is over by its own choice. The leadership is
    ///   resigned (another candidate may lead) and this one campaigns again, so the work runs
    ///   again at its next term.
    /// - **The work returns an error**: it is logged (`warn`), the leadership is resigned, and
    ///   this one campaigns again. To stop on an error instead, complete the shutdown future
    ///   from the work.
    /// - **The term ends** ([`StopWork`]): the work's future is dropped at once, before anything
    ///   else (the moment the leadership is not confirmed, or not owned), then the leadership is
    ///   resigned (or found lost) and this one campaigns again.
    /// - After a term that its work ended, or that was stopped while still leading
    ///   (`Unconfirmed`), it waits the locker's retry delay before it campaigns again, longer
    ///   each time while terms keep ending within a TTL (jittered, up to the locker's longest
    ///   retry delay): neither work that returns at once nor a store that keeps stalling makes
    ///   it spin. After a loss it campaigns again at once.
    /// - **Shutdown** ([`LeaderOptions::until`]): the work is dropped, the leadership resigned,
    ///   and `Ok(())` returned.
    ///
    /// Work that must not run in two places at once should still fence its writes (the
    /// [`Tenure::fence`]): cancellation stops the work in this process, but a write already on
    /// its way can land after the term ended.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> locker_core::Result<()> {
    /// use std::time::Duration;
    /// use locker_core::{LeaderOptions, Locker};
    /// use locker_memory::MemoryBackend;
    ///
    /// let locker = Locker::new(MemoryBackend::new());
    /// let shutdown = tokio::time::sleep(Duration::from_secs(5));
    /// locker
    ///     .run_while_leader("scheduler", "replica-1", LeaderOptions::new().until(shutdown), |term| async move {
    ///         loop {
    ///             // Schedule the next job, fencing its writes with term.fence().
    ///             println!("leading with token {}", term.token());
    ///             tokio::time::sleep(Duration::from_secs(1)).await;
    ///         }
    ///         #[allow(unreachable_code)]
    ///         Ok::<(), std::io::Error>(())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; a permanent store error (permission denied, ...).
    pub async fn run_while_leader<W, F, E>(
        &self,
        name: impl Into<String>,
        value: impl Into<Vec<u8>>,
        options: LeaderOptions,
        mut work: W,
    ) -> Result<()>
    where
        W: FnMut(Tenure) -> F,
        F: Future<Output = std::result::Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let name: Arc<str> = Arc::from(name.into());
        let value = value.into();
        let LeaderOptions {
            mut lock,
            stop,
            shutdown,
        } = options;
        let mut shutdown = shutdown.unwrap_or_else(|| Box::pin(std::future::pending()));
        // Between a term that ended early (its work returned or failed, or it was unconfirmed)
        // and the next campaign: so that none of them spins against the store.
        let mut pause = self.backoff();
        loop {
            let campaign = self.campaign_with(&*name, value.clone(), lock.clone());
            let resuming = lock.resume.take().is_some();
            let leadership = tokio::select! {
                leadership = campaign => leadership,
                () = &mut shutdown => return Ok(()),
            };
            let leadership = match leadership {
                Ok(leadership) => leadership,
                // The term to resume had ended: campaign as anyone.
                Err(Error::NotOwned { reason, .. }) if resuming => {
                    info!(name = %name, %reason, "the term to resume had ended: campaigning");
                    continue;
                }
                Err(err) => return Err(err),
            };
            let token = leadership.token();
            let began = tokio::time::Instant::now();
            info!(name = %name, %token, "leading: the work starts");
            let end = {
                let work = work(leadership.tenure());
                tokio::select! {
                    biased;
                    () = &mut shutdown => TermEnd::Shutdown,
                    () = leadership.guard.until_not_owned(stop == StopWork::WhenUnconfirmed) => TermEnd::NotLeading,
                    done = work => TermEnd::Done(done),
                }
                // The work's future is dropped here, before the leadership goes.
            };
            let early = match end {
                TermEnd::Shutdown => {
                    info!(name = %name, %token, "shutting down: resigning");
                    let _ = leadership.resign().await;
                    return Ok(());
                }
                // Still leading (the work was stopped at Unconfirmed, or the keep-alive came
                // back since): step down, so that a candidate whose store answers can lead.
                TermEnd::NotLeading if leadership.is_leader() => {
                    warn!(name = %name, %token, "leadership unconfirmed: the work stopped; resigning");
                    let _ = leadership.resign().await;
                    true
                }
                TermEnd::NotLeading => {
                    let reason = tokio::select! {
                        reason = leadership.lost() => reason,
                        () = &mut shutdown => return Ok(()),
                    };
                    warn!(name = %name, %token, %reason, "leadership lost: the work stopped");
                    let _ = leadership.resign().await;
                    false
                }
                TermEnd::Done(Ok(())) => {
                    info!(name = %name, %token, "the work ended its term: resigning");
                    let _ = leadership.resign().await;
                    true
                }
                TermEnd::Done(Err(err)) => {
                    let err = err.into();
                    warn!(name = %name, %token, error = %err, "the work failed: resigning");
                    let _ = leadership.resign().await;
                    true
                }
            };
            if !early {
                continue;
            }
            // A term that lasted a TTL or more was no spin: the pause starts short again.
            if began.elapsed() >= self.ttl() {
                pause.reset();
            }
            tokio::select! {
                () = tokio::time::sleep(pause.next_delay()) => {}
                () = &mut shutdown => return Ok(()),
            }
        }
    }
}
