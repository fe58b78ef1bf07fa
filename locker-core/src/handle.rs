//! What a user holds: [`LockHandle`] (the seed's `Lock`: keeps trying to own) and [`LockGuard`]
//! (mutex style). Both are views of one lock's [`Shared`] state; everything they do is an input
//! to the lock's [state machine](crate::machine), carried out by its [driver](crate::driver).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{broadcast, watch};

use crate::driver::{self, Shared, Until};
use crate::error::{Error, LossReason, Result};
use crate::fence::Fence;
use crate::locker::{LockOptions, Locker, check_ttl};
use crate::machine::{Command, Exported, Input, Machine, Mode};
use crate::resume::ResumeToken;
use crate::types::{FencingToken, Ownership, OwnershipEvents, OwnershipWatch};

/// Checks the input (no I/O) and makes a lock's state.
fn prepare(
    locker: Locker,
    key: String,
    value: Vec<u8>,
    options: LockOptions,
    mode: Mode,
) -> Result<Arc<Shared>> {
    locker.check_key(&key)?;
    locker.check_value(&value)?;
    if let Some(ttl) = options.ttl {
        check_ttl(locker.inner.backend.as_ref(), ttl)?;
        let margin = locker.inner.timing.safety_margin;
        if margin >= ttl / 3 {
            return Err(Error::InvalidConfig(format!(
                "the locker's safety margin {margin:?} must be below a third of the lock's TTL {ttl:?}"
            )));
        }
    }
    tokio::runtime::Handle::try_current().map_err(|_| {
        Error::InvalidConfig("locks must be started within a tokio runtime".to_owned())
    })?;
    let exported = match &options.resume {
        Some(token) if token.key() != key => {
            return Err(Error::InvalidConfig(format!(
                "the resume token is for the key {:?}, not {key:?}",
                token.key()
            )));
        }
        Some(token) => Some(Exported {
            lease: token.lease(),
            create_revision: token.token().as_i64(),
            mod_revision: token.written(),
        }),
        None => None,
    };
    let backoff = locker.backoff();
    let machine = Machine::taking_up(Arc::from(key), value, mode, backoff, exported);
    Ok(Arc::new(Shared::new(locker, machine, options.ttl)))
}

/// `Locker::lock`: a handle whose own task joins, waits, holds and joins again.
pub(crate) fn start(
    locker: Locker,
    key: String,
    value: Vec<u8>,
    options: LockOptions,
) -> Result<LockHandle> {
    let shared = prepare(locker, key, value, options, Mode::Persistent)?;
    driver::spawn_task(shared.clone());
    Ok(LockHandle { shared })
}

/// `Locker::acquire` (`Mode::Once`) and `Locker::try_acquire` (`Mode::TryOnce`): joins and
/// waits on the caller's task, then leaves the holding to a task of the lock's own. `None` if
/// the attempt ended without owning (a `try_acquire` that found the lock held).
///
/// Cancel safe: a dropped call hands what it started to the lock's task, which cleans up.
pub(crate) async fn acquire(
    locker: Locker,
    key: String,
    value: Vec<u8>,
    options: LockOptions,
    mode: Mode,
) -> Result<Option<LockGuard>> {
    let resuming = options.resume.is_some();
    let shared = prepare(locker, key, value, options, mode)?;
    let handle = LockHandle { shared };
    driver::drive_here(&handle.shared, Until::Settled).await;
    match handle.shared.ownership() {
        // The tenure to resume had ended: why.
        Ownership::Lost { reason, .. } if resuming => {
            Err(driver::not_owned(&handle.shared.key, reason))
        }
        Ownership::Owned { token } | Ownership::Unconfirmed { token, .. } => {
            let fence = handle.fence_of(token);
            Ok(Some(LockGuard { handle, fence }))
        }
        Ownership::Failed { .. } => Err(handle.shared.error()),
        Ownership::Released if mode == Mode::TryOnce => match handle.shared.stopped_on() {
            Some(err) => Err(err),
            None => Ok(None),
        },
        // Ended before owning (a failure), or lost at once: wait as a handle would.
        _ => handle.into_guard().await,
    }
}

/// A lock that keeps trying to own `key` with its value until released: the seed's `Lock`.
///
/// Ownership is published as [`Ownership`] through a watch channel ([`LockHandle::subscribe`]) and
/// as a stream of `bool` transitions ([`LockHandle::owned_changes`]); a slow reader never delays
/// the keep-alive. After a loss the handle joins the queue again on its own. A permanent store
/// error (permission denied on the lock's keys, say) stops it: [`Ownership::Failed`], and
/// [`LockHandle::wait_owned`] answers the error.
///
/// Dropping the handle releases the lock in the background; [`LockHandle::release`] does it now
/// and waits; [`LockHandle::abandon`] lets it expire after the TTL.
#[must_use = "dropping a LockHandle releases the lock"]
pub struct LockHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for LockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockHandle")
            .field("key", &self.key())
            .field("ownership", &self.ownership())
            .finish()
    }
}

impl Drop for LockHandle {
    fn drop(&mut self) {
        self.shared.input(Input::Command(Command::Release(None)));
    }
}

impl LockHandle {
    /// The lock key.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// Where the lock stands now. It never claims ownership past the local deadline: a held
    /// lock whose deadline has passed answers [`Ownership::Lost`] (with
    /// [`LossReason::DeadlinePassed`]) even before the lock's task has heard of it.
    pub fn ownership(&self) -> Ownership {
        self.shared.ownership()
    }

    /// Whether the lock is owned right now: held, and within the local deadline of its lease.
    pub fn is_owned(&self) -> bool {
        self.ownership().is_owned()
    }

    /// A receiver of every published [`Ownership`] (latest value wins; a loss followed by a new
    /// tenure shows as a new token).
    pub fn subscribe(&self) -> OwnershipWatch {
        self.shared.subscribe()
    }

    /// Every state the lock publishes, in order, none coalesced away: a loss is always seen as
    /// [`Ownership::Lost`] with its reason, even when the handle joins again at once. (The
    /// receiver of [`subscribe`](Self::subscribe) keeps only the latest state.) It starts with the
    /// next change: read [`ownership`](Self::ownership) first. A receiver that falls more than 64
    /// states behind gets tokio's `broadcast::error::RecvError::Lagged`: memory stays bounded whoever does not read.
    pub fn events(&self) -> OwnershipEvents {
        self.shared.events()
    }

    /// Every tenure of the lock, one item each as it begins (the current one first, if the lock
    /// is owned now): its fencing token, and a [`Tenure::lost`] future that completes with the
    /// reason it ended. A tenure that begins and ends between two polls is still reported.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locker_core::Error> {
    /// use futures::StreamExt;
    /// # let locker = locker_core::Locker::new(locker_memory::MemoryBackend::new());
    /// let handle = locker.lock("leader", "me").await?;
    /// let mut tenures = handle.tenures();
    /// while let Some(tenure) = tenures.next().await {
    ///     // Lead, fencing every write with tenure.token(), until tenure.lost() completes.
    ///     println!("leading with token {}", tenure.token());
    ///     # break;
    /// }
    /// handle.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn tenures(&self) -> BoxStream<'static, Tenure> {
        tenures(self.shared.clone())
    }

    /// The seed's `owned` channel: `true`/`false` at every change of "do we own the lock?",
    /// starting with the current answer. A tenure that ends and a new one that begins between two
    /// polls still shows as `false` then `true`. Ends when the lock stops.
    pub fn owned_changes(&self) -> BoxStream<'static, bool> {
        owned_changes(self.subscribe())
    }

    /// Waits until the lock is owned and answers the fencing token.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// # Errors
    ///
    /// The error that stopped the lock ([`Ownership::Failed`]: permission denied, ...; a
    /// one-shot attempt's failure), or [`Error::Closed`] if it was released.
    pub async fn wait_owned(&self) -> Result<FencingToken> {
        let shared = &self.shared;
        let answer = shared
            .wait_for(|state, ended| match state {
                Ownership::Owned { token } | Ownership::Unconfirmed { token, .. } => {
                    Some(Ok(token))
                }
                Ownership::Released | Ownership::Failed { .. } => Some(Err(())),
                _ if ended => Some(Err(())),
                _ => None,
            })
            .await;
        answer.map_err(|()| shared.error())
    }

    /// Changes the value: at once in the store if the handle has an entry (owned or waiting),
    /// and for every later tenure. The new value is taken for later tenures even if writing it
    /// to the current entry fails.
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; [`Error::NotOwned`] if the entry was found gone; store errors;
    /// [`Error::Closed`] if the handle stopped.
    pub async fn set_value(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        let value = value.into();
        self.shared.check_value(&value)?;
        self.shared
            .command_here(|to| Command::SetValue(value, to), Until::Idle)
            .await
    }

    /// Gives the lock up now: deletes the entry (hand-off in one round trip) and stops.
    ///
    /// # Errors
    ///
    /// [`Error::NotOwned`] if a one-shot lock was lost before the release (or its deadline had
    /// passed); store errors while deleting (the lease then expires as usual).
    pub async fn release(self) -> Result<()> {
        // On this task if nobody else is driving: no hand-off to the lock's task.
        self.shared
            .command_here(|to| Command::Release(Some(to)), Until::Ended)
            .await
    }

    /// Stops without deleting: the entry stays until the lease would expire, as if this process
    /// had died (the seed's `quit`). With a dedicated session the lease is simply not renewed;
    /// with the shared session the entry is deleted once the session's TTL has passed.
    pub fn abandon(self) {
        self.shared.input(Input::Command(Command::Abandon));
    }

    /// The fence of the tenure `token` of this lock.
    fn fence_of(&self, token: FencingToken) -> Fence {
        self.shared
            .fence_of(token)
            .unwrap_or_else(|| Fence::new(self.shared.key.clone(), 0, token))
    }

    /// Waits until owned, then wraps the handle in a guard; `None` if the attempt ended without
    /// owning (a `try_acquire` that found the lock held).
    pub(crate) async fn into_guard(self) -> Result<Option<LockGuard>> {
        match self.wait_owned().await {
            Ok(token) => Ok(Some(LockGuard {
                fence: self.fence_of(token),
                handle: self,
            })),
            Err(Error::Closed { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// Proof of owning a lock, mutex style: from [`Locker::acquire`] or [`Locker::try_acquire`].
///
/// Owning can end without the guard's say (lease lost, deadline passed, entry deleted): check
/// [`LockGuard::is_owned`] before a protected write, send [`LockGuard::token`] along with it, or
/// race the work against [`LockGuard::lost`]. A guard never re-acquires.
///
/// Dropping the guard releases the lock in the background; [`LockGuard::release`] does it now.
#[must_use = "dropping a LockGuard releases the lock"]
#[derive(Debug)]
pub struct LockGuard {
    handle: LockHandle,
    fence: Fence,
}

impl LockGuard {
    /// The lock key.
    pub fn key(&self) -> &str {
        self.handle.key()
    }

    /// The fencing token of this tenure.
    pub fn token(&self) -> FencingToken {
        self.fence.token()
    }

    /// What this tenure is fenced by: the key, the entry's key, the lease and the token. Give it
    /// to `locker_etcd::EtcdBackend::txn_fenced` for a write to etcd that is refused once the
    /// tenure has ended, however late it runs; see [`Fence`].
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Whether the lock is still owned (see [`LockHandle::is_owned`]).
    pub fn is_owned(&self) -> bool {
        self.handle.is_owned()
    }

    /// Where the lock stands now (see [`LockHandle::ownership`]).
    pub fn ownership(&self) -> Ownership {
        self.handle.ownership()
    }

    /// A receiver of every published [`Ownership`].
    pub fn subscribe(&self) -> OwnershipWatch {
        self.handle.subscribe()
    }

    /// Completes when ownership ends, with the reason. Use it to stop protected work (the example
    /// runs on tokio's paused clock, `start_paused = true`, which needs tokio's `test-util`
    /// feature: its second of work takes no real time):
    ///
    /// ```
    /// #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// async fn main() -> Result<(), locker_core::Error> {
    ///     let locker = locker_core::Locker::new(locker_memory::MemoryBackend::new());
    ///     let guard = locker.acquire("jobs/cleanup", "worker-1").await?;
    ///     tokio::select! {
    ///         reason = guard.lost() => println!("lost the lock: {reason}"),
    ///         _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => println!("work done"),
    ///     }
    ///     guard.release().await?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) -> LossReason {
        self.handle
            .shared
            .wait_for(|state, ended| match state {
                Ownership::Lost { reason, .. } => Some(reason),
                Ownership::Released | Ownership::Failed { .. } => Some(LossReason::Stopped),
                _ if ended => Some(LossReason::Stopped),
                _ => None,
            })
            .await
    }

    /// What a new process needs to continue this tenure after this one exits (see
    /// [`ResumeToken`]); `None` once the tenure has ended.
    pub fn resume_token(&self) -> Option<ResumeToken> {
        self.handle.shared.resume_token(self.fence.token())
    }

    /// This guard's tenure: its token, its fence, and [`Tenure::lost`].
    pub fn tenure(&self) -> Tenure {
        Tenure {
            shared: self.handle.shared.clone(),
            fence: self.fence.clone(),
        }
    }

    /// Completes as soon as the lock is not owned any more (a loss, even before its reason is
    /// known), or, with `confirmed`, as soon as it is not confirmed owned (`Unconfirmed` too).
    pub(crate) async fn until_not_owned(&self, confirmed: bool) {
        self.handle
            .shared
            .wait_for(|state, ended| match state {
                Ownership::Owned { .. } if !ended => None,
                Ownership::Unconfirmed { .. } if !ended && !confirmed => None,
                _ => Some(()),
            })
            .await;
    }

    /// Changes the holder's value in the store (etcd's `Proclaim`), guarded by this tenure.
    ///
    /// # Errors
    ///
    /// As [`LockHandle::set_value`].
    pub async fn set_value(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        self.handle.set_value(value).await
    }

    /// Releases the lock now: the next waiter owns it one round trip later.
    ///
    /// # Errors
    ///
    /// [`Error::NotOwned`] if ownership was lost before the release (the critical section was not
    /// protected to the end); store errors while deleting.
    pub async fn release(self) -> Result<()> {
        self.handle.release().await
    }
}

/// One tenure of a lock: from owning it with a fencing token to losing it
/// ([`LockHandle::tenures`]).
#[derive(Clone)]
pub struct Tenure {
    shared: Arc<Shared>,
    fence: Fence,
}

impl fmt::Debug for Tenure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenure")
            .field("key", &self.shared.key)
            .field("token", &self.fence.token())
            .finish()
    }
}

impl Tenure {
    /// The fencing token of this tenure.
    pub fn token(&self) -> FencingToken {
        self.fence.token()
    }

    /// What this tenure is fenced by: the key, the entry's key, the lease and the token (see
    /// [`Fence`], and [`LockGuard::fence`]).
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// What a new process needs to continue this tenure after this one exits (see
    /// [`ResumeToken`]); `None` once the tenure has ended.
    pub fn resume_token(&self) -> Option<ResumeToken> {
        self.shared.resume_token(self.fence.token())
    }

    /// Where this tenure stands now: [`Ownership::Owned`] or [`Ownership::Unconfirmed`] (keep-alives
    /// failing: a cautious worker pauses) while it lasts, [`Ownership::Lost`] with its reason once
    /// it has ended (and [`Ownership::Ending`] for the round trip in between, if its entry went).
    pub fn ownership(&self) -> Ownership {
        let token = self.fence.token();
        let now = self.shared.ownership();
        if now.token() == Some(token) && !matches!(now, Ownership::Released) {
            return now;
        }
        let reason = self.shared.tenure_end(token).unwrap_or(LossReason::Stopped);
        Ownership::Lost { token, reason }
    }

    /// Whether this tenure is still going on: owned now (within the local deadline).
    pub fn is_current(&self) -> bool {
        self.shared.tenure_now() == Some(self.fence.token())
    }

    /// Completes when this tenure has ended, with the reason (at once if it already has).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) -> LossReason {
        let token = self.fence.token();
        let shared = &self.shared;
        shared.wait_for(|_, _| shared.tenure_end(token)).await
    }
}

/// The stream of [`LockHandle::tenures`]: the current tenure first, then each new one, read from
/// the events (after a lag, the current tenure is looked at again, so only a tenure that both
/// began and ended in the lag is missed).
fn tenures(shared: Arc<Shared>) -> BoxStream<'static, Tenure> {
    struct St {
        shared: Arc<Shared>,
        events: broadcast::Receiver<Ownership>,
        last: Option<FencingToken>,
        started: bool,
    }
    let events = shared.events();
    let st = St {
        shared,
        events,
        last: None,
        started: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            let token = if st.started {
                match st.events.recv().await {
                    Ok(state) if state.is_owned() => state.token(),
                    Ok(_) => None,
                    Err(broadcast::error::RecvError::Lagged(_)) => st.shared.tenure_now(),
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            } else {
                st.started = true;
                st.shared.tenure_now()
            };
            if let Some(token) = token
                && st.last.is_none_or(|last| token > last)
            {
                st.last = Some(token);
                let fence = st
                    .shared
                    .fence_of(token)
                    .unwrap_or_else(|| Fence::new(st.shared.key.clone(), 0, token));
                let tenure = Tenure {
                    shared: st.shared.clone(),
                    fence,
                };
                return Some((tenure, st));
            }
        }
    })
    .boxed()
}

fn owned_changes(rx: watch::Receiver<Ownership>) -> BoxStream<'static, bool> {
    struct St {
        rx: watch::Receiver<Ownership>,
        last: Option<Option<FencingToken>>,
        pending: VecDeque<bool>,
        started: bool,
    }
    let st = St {
        rx,
        last: None,
        pending: VecDeque::new(),
        started: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((b, st));
            }
            if st.started && st.rx.changed().await.is_err() {
                return None;
            }
            st.started = true;
            let state = *st.rx.borrow_and_update();
            let now = if state.is_owned() {
                state.token()
            } else {
                None
            };
            match st.last {
                None => st.pending.push_back(now.is_some()),
                Some(prev) if prev == now => {}
                Some(Some(_)) if now.is_some() => {
                    st.pending.push_back(false);
                    st.pending.push_back(true);
                }
                Some(prev) => {
                    if prev.is_some() != now.is_some() {
                        st.pending.push_back(now.is_some());
                    }
                }
            }
            st.last = Some(now);
        }
    })
    .boxed()
}
