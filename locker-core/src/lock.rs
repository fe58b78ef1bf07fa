//! Lock handles and guards, and the ownership state machine that drives them (one task per lock).
//!
//! ```text
//!             join             predecessor gone, own entry still there
//!  Acquiring ──────► waiting ────────────────────────────────────────► Owned ◄──► Unconfirmed
//!      ▲                │ own entry or lease gone                         │ lease gone, deadline
//!      │                ▼                                                 │ passed, entry deleted
//!      └───────────── rejoin ◄──────────────── Lost ◄─────────────────────┘
//!                                    (a guard stops at Lost)
//! ```
//!
//! A held lock costs one small task and one [`Shared`] allocation: the handle's commands, the
//! hub's events for the key and the published state all live in it, and the task sleeps on one
//! doorbell plus its session's state. Everything that is not holding (joining, waiting, failing,
//! releasing) runs in boxed futures that are freed once done.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend::{Entry, EventKind, Revision, WatchEvent, entry_key};
use crate::error::{Error, LossReason, Result};
use crate::hub::{HubMsg, Registration, Sink};
use crate::locker::{KeyClaim, LockOptions, Locker, check_ttl};
use crate::session::{Session, SessionState};
use crate::types::{FencingToken, Ownership};

/// How long a lock task keeps at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A handle: keeps trying to own until released; rejoins after a loss.
    Persistent,
    /// A guard from `acquire`: waits to own; stops at the first loss.
    Once,
    /// A guard from `try_acquire`: owns at once or gives up.
    TryOnce,
}

enum Command {
    Release(oneshot::Sender<Result<()>>),
    Abandon,
    SetValue(Vec<u8>, oneshot::Sender<Result<()>>),
}

/// What a lock's task shares with its handle and with its locker's hub, in one allocation.
struct Shared {
    key: Arc<str>,
    /// The published ownership.
    published: Mutex<Published>,
    /// Woken at every change of `published` (for `wait_owned` and `lost`).
    changed: Notify,
    /// Commands from the handle and events from the hub, for the task. Lock order: `inbox`, then
    /// `published` (taking the tenure publishes under `inbox`); never the other way round.
    inbox: Mutex<Inbox>,
    /// Rung when something lands in `inbox`: the task's one wake-up besides its session.
    doorbell: Notify,
    /// The session of the current tenure, so readers can check its deadline themselves.
    session: Mutex<Option<watch::Receiver<SessionState>>>,
    /// Why a one-shot attempt ended without owning.
    error: Mutex<Option<Error>>,
}

struct Published {
    state: Ownership,
    /// For [`LockHandle::subscribe`]: made on first use, dropped when the task ends.
    sender: Option<watch::Sender<Ownership>>,
    /// The task has ended: nothing changes any more.
    ended: bool,
}

/// Queues allocated on first use: a held lock that hears nothing costs a few bytes here.
#[derive(Default)]
struct Inbox {
    commands: VecDeque<Command>,
    events: VecDeque<HubMsg>,
    /// The hub's watch failed for good (or the hub is gone): subscribe again.
    hub_closed: bool,
    /// The handle is gone: once the commands are served, the task stops (and releases).
    handle_gone: bool,
    /// The task has ended: nothing is read any more.
    task_gone: bool,
    /// The tenure the task holds now, which the handle may release on its own task.
    tenure: Option<Tenure>,
    /// The handle took the tenure and released it: the task only cleans up.
    released: bool,
}

/// What releasing a held lock needs, without the task: the handle deletes the entry itself
/// (one round trip, no hand-off between tasks).
struct Tenure {
    locker: Locker,
    session: Arc<Session>,
    create_revision: Revision,
    /// The task's claim on the key, given up once the entry is deleted.
    claim: Option<KeyClaim>,
    /// A guard's tenure (`acquire`, `try_acquire`): releasing one that had ended is an error.
    one_shot: bool,
    /// The lock's place among its hub's subscribers: a release leaves at once, so that a lock
    /// task that is slow to end costs the hub nothing.
    registration: Option<Registration>,
}

/// What the task finds in its inbox.
enum Taken {
    Command(Command),
    HandleGone,
    Nothing,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("key", &self.key)
            .field("state", &lock(&self.published).state)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn new(key: Arc<str>) -> Self {
        Shared {
            key,
            published: Mutex::new(Published {
                state: Ownership::Acquiring,
                sender: None,
                ended: false,
            }),
            changed: Notify::new(),
            inbox: Mutex::default(),
            doorbell: Notify::new(),
            session: Mutex::new(None),
            error: Mutex::new(None),
        }
    }

    fn state(&self) -> Ownership {
        lock(&self.published).state
    }

    /// Publishes `state`; [`Ownership::Released`] is final.
    fn publish(&self, state: Ownership) {
        let mut published = lock(&self.published);
        if published.ended || published.state == state || published.state == Ownership::Released {
            return;
        }
        published.state = state;
        if let Some(sender) = &published.sender {
            sender.send_replace(state);
        }
        drop(published);
        self.changed.notify_waiters();
    }

    /// The task has ended: readers see the last state, and watch receivers see the sender go.
    fn end(&self) {
        let mut published = lock(&self.published);
        published.ended = true;
        published.sender = None;
        drop(published);
        self.changed.notify_waiters();
    }

    fn subscribe(&self) -> watch::Receiver<Ownership> {
        let mut published = lock(&self.published);
        if let Some(sender) = &published.sender {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(published.state);
        if !published.ended {
            published.sender = Some(sender);
        }
        receiver
    }

    /// Waits until `done` answers for the published state (and whether the task has ended).
    async fn wait_for<T>(&self, mut done: impl FnMut(Ownership, bool) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check: a change right after it still wakes us.
            notified.as_mut().enable();
            let (state, ended) = {
                let published = lock(&self.published);
                (published.state, published.ended)
            };
            if let Some(answer) = done(state, ended) {
                return answer;
            }
            notified.await;
        }
    }

    /// Whether the current tenure's session is within its local deadline.
    fn session_valid(&self) -> bool {
        lock(&self.session)
            .as_ref()
            .is_some_and(|s| s.borrow().valid_at(Instant::now()))
    }

    fn set_session(&self, session: Option<watch::Receiver<SessionState>>) {
        *lock(&self.session) = session;
    }

    /// Queues `cmd` for the task; gives it back if the task has ended.
    fn send(&self, cmd: Command) -> std::result::Result<(), Command> {
        let mut inbox = lock(&self.inbox);
        if inbox.task_gone {
            return Err(cmd);
        }
        inbox.commands.push_back(cmd);
        drop(inbox);
        self.doorbell.notify_one();
        Ok(())
    }

    fn handle_dropped(&self) {
        lock(&self.inbox).handle_gone = true;
        self.doorbell.notify_one();
    }

    fn take_command(&self) -> Taken {
        let mut inbox = lock(&self.inbox);
        match inbox.commands.pop_front() {
            Some(cmd) => {
                if inbox.commands.is_empty() {
                    inbox.commands = VecDeque::new();
                }
                Taken::Command(cmd)
            }
            None if inbox.handle_gone => Taken::HandleGone,
            None => Taken::Nothing,
        }
    }

    fn has_commands(&self) -> bool {
        let inbox = lock(&self.inbox);
        !inbox.commands.is_empty() || inbox.handle_gone
    }

    /// Takes the hub's messages so far, and whether the hub's watch has failed.
    fn take_events(&self) -> (VecDeque<HubMsg>, bool) {
        let mut inbox = lock(&self.inbox);
        (std::mem::take(&mut inbox.events), inbox.hub_closed)
    }

    /// Forgets the messages of an earlier subscription.
    fn clear_events(&self) {
        let mut inbox = lock(&self.inbox);
        inbox.events = VecDeque::new();
        inbox.hub_closed = false;
    }

    /// Stops reading: later sends fail; answers the commands still queued.
    fn close_inbox(&self) -> VecDeque<Command> {
        let mut inbox = lock(&self.inbox);
        inbox.task_gone = true;
        inbox.events = VecDeque::new();
        std::mem::take(&mut inbox.commands)
    }

    fn set_tenure(&self, tenure: Tenure) {
        lock(&self.inbox).tenure = Some(tenure);
    }

    /// Keeps a new hub registration in the tenure; `false` if there is no tenure (any more).
    fn set_registration(&self, registration: Registration) -> bool {
        let mut inbox = lock(&self.inbox);
        let Some(tenure) = inbox.tenure.as_mut() else {
            drop(inbox);
            return false;
        };
        let old = tenure.registration.replace(registration);
        drop(inbox);
        // Unregistering locks the hub, which may deliver to this inbox: not under its lock.
        drop(old);
        true
    }

    /// The task takes its tenure back (holding ended); `true` if the handle released it.
    fn end_tenure(&self) -> (Option<Tenure>, bool) {
        let mut inbox = lock(&self.inbox);
        (inbox.tenure.take(), inbox.released)
    }

    /// The handle takes the tenure to release it, if the task holds one, and publishes
    /// [`Ownership::Released`]: before the task can see the release, since the task then ends
    /// without publishing anything, and nothing is published after it ends (a reader would keep
    /// seeing `Owned` after a successful release).
    fn take_tenure_to_release(&self) -> Option<Tenure> {
        let mut inbox = lock(&self.inbox);
        let tenure = inbox.tenure.take()?;
        self.publish(Ownership::Released);
        inbox.released = true;
        Some(tenure)
    }

    fn released_by_handle(&self) -> bool {
        lock(&self.inbox).released
    }

    fn set_error(&self, err: Error) {
        *lock(&self.error) = Some(err);
    }

    fn take_error(&self) -> Error {
        lock(&self.error).take().unwrap_or_else(|| Error::Released {
            key: self.key.to_string(),
        })
    }
}

impl Sink for Shared {
    fn deliver(&self, msg: HubMsg) {
        if let HubMsg::Event(event) = &msg
            && !self.wants(event)
        {
            return;
        }
        let mut inbox = lock(&self.inbox);
        if inbox.task_gone {
            return;
        }
        inbox.events.push_back(msg);
        drop(inbox);
        self.doorbell.notify_one();
    }

    /// Only deletes move a lock (its own entry's, its predecessor's): a put, such as the one of
    /// its own join, is neither copied, nor queued, nor wakes the task.
    fn wants(&self, event: &WatchEvent) -> bool {
        event.kind == EventKind::Delete
    }

    fn close(&self) {
        lock(&self.inbox).hub_closed = true;
        self.doorbell.notify_one();
    }
}

/// `Locker::lock`: a handle whose task joins, waits, holds and rejoins.
pub(crate) fn start(
    locker: Locker,
    key: String,
    value: Vec<u8>,
    options: LockOptions,
) -> Result<LockHandle> {
    let (driver, handle) = prepare(locker, key, value, options, Mode::Persistent)?;
    tokio::spawn(driver.run(Start::Fresh));
    Ok(handle)
}

/// `Locker::acquire` (`Mode::Once`) and `Locker::try_acquire` (`Mode::TryOnce`): joins and
/// waits on the caller's task, then leaves the holding to a task of the lock's own. `None` if
/// the attempt ended without owning (a `try_acquire` that found the lock held).
///
/// Cancel safe: a dropped call removes the entry it made, in the background.
pub(crate) async fn acquire(
    locker: Locker,
    key: String,
    value: Vec<u8>,
    options: LockOptions,
    mode: Mode,
) -> Result<Option<LockGuard>> {
    let (mut driver, handle) = prepare(locker, key, value, options, mode)?;
    match Box::pin(driver.acquire()).await {
        Ok((session, registration)) => match driver.begin_hold(&session, registration) {
            Some(token) => {
                let holding = Box::new((session, token));
                tokio::spawn(driver.run(Start::Holding(holding)));
                return Ok(Some(LockGuard { handle, token }));
            }
            None => {
                // The session ended just before owning: the task joins again on a new one.
                let next = match driver.after_hold(HoldEnd::NeverOwned, session).await {
                    Some(exit) => Start::Exited(exit),
                    None => Start::Fresh,
                };
                tokio::spawn(driver.run(next));
            }
        },
        Err(exit) => {
            tokio::spawn(driver.run(Start::Exited(exit)));
        }
    }
    handle.into_guard().await
}

/// Checks the input (no I/O) and makes a lock's driver and handle.
fn prepare(
    locker: Locker,
    key: String,
    value: Vec<u8>,
    options: LockOptions,
    mode: Mode,
) -> Result<(Driver, LockHandle)> {
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
    let shared = Arc::new(Shared::new(Arc::from(key)));
    let driver = Driver {
        locker,
        shared: shared.clone(),
        value,
        mode,
        dedicated_ttl: options.ttl,
        own_session: None,
        claim: None,
        pending: None,
        held: None,
        failures: 0,
    };
    Ok((driver, LockHandle { shared }))
}

/// A lock that keeps trying to own `key` with its value until released: the seed's `Lock`.
///
/// Ownership is published as [`Ownership`] through a watch channel ([`LockHandle::subscribe`]) and
/// as a stream of `bool` transitions ([`LockHandle::owned_changes`]); a slow reader never delays
/// the keep-alive. After a loss the handle joins the queue again on its own.
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
        self.shared.handle_dropped();
    }
}

impl LockHandle {
    /// The lock key.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The last published state.
    pub fn ownership(&self) -> Ownership {
        self.shared.state()
    }

    /// Whether the lock is owned right now: the published state claims it **and** the local
    /// deadline of its lease has not passed (checked here, so it holds even if the lock task has
    /// not run yet).
    pub fn is_owned(&self) -> bool {
        self.ownership().is_owned() && self.shared.session_valid()
    }

    /// A receiver of every published [`Ownership`] (latest value wins; a loss followed by a new
    /// tenure shows as a new token).
    pub fn subscribe(&self) -> watch::Receiver<Ownership> {
        self.shared.subscribe()
    }

    /// The seed's `owned` channel: `true`/`false` at every change of "do we own the lock?",
    /// starting with the current answer. A tenure that ends and a new one that begins between two
    /// polls still shows as `false` then `true`. Ends when the lock task ends.
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
    /// [`Error::Released`] if the handle stopped (released, or a one-shot attempt ended), with the
    /// error that stopped it if there was one.
    pub async fn wait_owned(&self) -> Result<FencingToken> {
        let shared = &self.shared;
        shared
            .wait_for(|state, ended| match state {
                // Owned by the published state *and* within the local deadline.
                Ownership::Owned { token } | Ownership::Unconfirmed { token, .. }
                    if shared.session_valid() =>
                {
                    Some(Ok(token))
                }
                Ownership::Released => Some(Err(shared.take_error())),
                _ if ended => Some(Err(shared.take_error())),
                _ => None,
            })
            .await
    }

    /// Changes the value: at once in the store if the handle has an entry (owned or waiting),
    /// and for every later tenure. The new value is taken for later tenures even if writing it
    /// to the current entry fails.
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; [`Error::NotOwned`] if the entry was found gone; store errors;
    /// [`Error::Released`] if the handle stopped.
    pub async fn set_value(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        let value = value.into();
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetValue(value, tx))?;
        rx.await.map_err(|_| self.released())?
    }

    /// Gives the lock up now: deletes the entry (hand-off in one round trip) and stops.
    ///
    /// # Errors
    ///
    /// [`Error::NotOwned`] if a one-shot lock was lost before the release; store errors while
    /// deleting (the lease then expires as usual).
    pub async fn release(self) -> Result<()> {
        // Read before the task can hear of the release (it then stops publishing).
        let was_owned = self.ownership().is_owned();
        let still_valid = self.shared.session_valid();
        if let Some(tenure) = self.shared.take_tenure_to_release() {
            return self.release_here(tenure, was_owned, still_valid).await;
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.send(Command::Release(tx)).is_err() {
            return match self.ownership() {
                Ownership::Lost { reason, .. } => Err(Error::NotOwned {
                    key: self.key().to_owned(),
                    reason,
                }),
                _ => Ok(()),
            };
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// Releases a held lock on the caller's task; the lock task only cleans up after.
    async fn release_here(&self, tenure: Tenure, was_owned: bool, still_valid: bool) -> Result<()> {
        // `Released` is published already (when the tenure was taken): ownership is not claimed
        // any more when the entry goes, and the next holder may own as soon as it is deleted.
        self.shared.set_session(None);
        let Tenure {
            locker,
            session,
            create_revision,
            claim,
            one_shot,
            registration,
        } = tenure;
        // This lock hears nothing more from the hub.
        drop(registration);
        let entry = entry_key(self.key(), session.lease());
        // Should this call be dropped before the store answered, the delete goes on in the
        // background (the task, told that the handle released, no longer deletes anything).
        let mut unfinished = DeleteOnDrop {
            entry: Some((
                locker.clone(),
                session.clone(),
                entry.clone(),
                create_revision,
            )),
            claim,
        };
        let not_owned = |reason| Error::NotOwned {
            key: self.key().to_owned(),
            reason,
        };
        let mut result = match locker
            .inner
            .backend
            .delete_entry(&entry, create_revision)
            .await
        {
            Ok(true) => Ok(()),
            // Gone before the release: ownership had ended before this guard heard of it (a
            // handle, which would have joined again, just stops).
            Ok(false) | Err(Error::LeaseLost { .. }) if one_shot => {
                Err(not_owned(if session.is_lost() {
                    LossReason::LeaseGone
                } else {
                    LossReason::EntryDeleted
                }))
            }
            Ok(false) | Err(Error::LeaseLost { .. }) => Ok(()),
            // No answer (a timeout, a broken connection): retry; a later "not there" may be
            // this very delete having gone through.
            Err(_) => delete_until_gone(&locker, &session, &entry, create_revision).await,
        };
        match &result {
            Err(err) if !matches!(err, Error::NotOwned { .. }) => {
                // Keep `unfinished` armed: it retries in the background, holding the claim.
                warn!(key = %self.key(), error = %err, "release failed; retrying in the background");
            }
            // Done: the key is free for another lock of this locker.
            _ => unfinished.entry = None,
        }
        drop(unfinished);
        // The task (told that the handle released) only ends.
        self.shared.doorbell.notify_one();
        if result.is_ok() && was_owned && !still_valid {
            // Released, but ownership had already ended before it.
            result = Err(not_owned(match *session.subscribe().borrow() {
                SessionState::Lost(LossReason::Released) => LossReason::LeaseGone,
                SessionState::Lost(reason) => reason,
                _ => LossReason::DeadlinePassed,
            }));
        }
        info!(key = %self.key(), "released");
        result
    }

    /// Stops without deleting: the entry stays until the lease would expire, as if this process
    /// had died (the seed's `quit`). With a dedicated session the lease is simply not renewed;
    /// with the shared session the entry is deleted once the session's TTL has passed.
    pub fn abandon(self) {
        let _ = self.shared.send(Command::Abandon);
    }

    /// Waits until owned, then wraps the handle in a guard; `None` if the attempt ended without
    /// owning (a `try_acquire` that found the lock held).
    pub(crate) async fn into_guard(self) -> Result<Option<LockGuard>> {
        match self.wait_owned().await {
            Ok(token) => Ok(Some(LockGuard {
                handle: self,
                token,
            })),
            Err(Error::Released { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.shared.send(cmd).map_err(|_| self.released())
    }

    fn released(&self) -> Error {
        Error::Released {
            key: self.key().to_owned(),
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
    token: FencingToken,
}

impl LockGuard {
    /// The lock key.
    pub fn key(&self) -> &str {
        self.handle.key()
    }

    /// The fencing token of this tenure.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether the lock is still owned (see [`LockHandle::is_owned`]).
    pub fn is_owned(&self) -> bool {
        self.handle.is_owned()
    }

    /// The last published state.
    pub fn ownership(&self) -> Ownership {
        self.handle.ownership()
    }

    /// A receiver of every published [`Ownership`].
    pub fn subscribe(&self) -> watch::Receiver<Ownership> {
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
                Ownership::Released => Some(LossReason::Released),
                _ if ended => Some(LossReason::Released),
                _ => None,
            })
            .await
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

/// Why the task stops.
enum Exit {
    /// Release (with the caller to answer), or the handle was dropped.
    Release(Option<oneshot::Sender<Result<()>>>),
    Abandon,
    /// A one-shot attempt ended (not owned, lost, or failed); state already published.
    Done,
    /// The handle released the tenure itself: only clean up.
    Gone,
}

/// Where a lock task begins.
enum Start {
    /// Join the queue.
    Fresh,
    /// The caller's task acquired the lock and began the tenure: hold it. (Boxed: the task's
    /// future keeps its arguments for its whole life.)
    Holding(Box<(Arc<Session>, FencingToken)>),
    /// The caller's task's attempt ended: clean up.
    Exited(Exit),
}

/// The outcome of waiting for one's turn.
enum Turn {
    Owned(Entry),
    Rejoin,
    Exit(Exit),
}

/// The outcome of holding.
enum HoldEnd {
    Lost(FencingToken, LossReason),
    /// The session was no longer valid when ownership would have begun: nothing was published
    /// as owned, so join again.
    NeverOwned,
    Exit(Exit),
}

struct Driver {
    locker: Locker,
    shared: Arc<Shared>,
    value: Vec<u8>,
    mode: Mode,
    dedicated_ttl: Option<Duration>,
    own_session: Option<Arc<Session>>,
    /// This task's claim on `key` in the locker's default session (one lock per key per
    /// session: the entry name comes from the lease).
    claim: Option<KeyClaim>,
    /// A join sent whose answer was not seen (the entry may exist): its session and entry key.
    pending: Option<(Arc<Session>, String)>,
    /// The entry this task has in the store, with the session it is under.
    held: Option<(Arc<Session>, Entry)>,
    failures: u32,
}

impl Driver {
    async fn run(mut self, start: Start) {
        debug!(key = %self.key(), mode = ?self.mode, "lock task started");
        let mut start = Some(start);
        // Only `hold` is awaited in place: while a lock is held, the task keeps nothing else.
        let exit = loop {
            let (session, token) = match start.take() {
                Some(Start::Holding(holding)) => *holding,
                Some(Start::Exited(exit)) => break exit,
                Some(Start::Fresh) | None => {
                    let (session, registration) = match Box::pin(self.acquire()).await {
                        Ok(acquired) => acquired,
                        Err(exit) => break exit,
                    };
                    match self.begin_hold(&session, registration) {
                        Some(token) => (session, token),
                        None => {
                            let end = HoldEnd::NeverOwned;
                            match Box::pin(self.after_hold(end, session)).await {
                                Some(exit) => break exit,
                                None => continue,
                            }
                        }
                    }
                }
            };
            let end = self.hold(&session, token).await;
            let end = self.end_tenure(end);
            if let Some(exit) = Box::pin(self.after_hold(end, session)).await {
                break exit;
            }
        };
        Box::pin(self.finish(exit)).await;
        // Answer what came too late: a release after a loss says so.
        let state = self.shared.state();
        for cmd in self.shared.close_inbox() {
            if let Command::Release(reply) = cmd {
                let _ = reply.send(match state {
                    Ownership::Lost { reason, .. } => Err(Error::NotOwned {
                        key: self.key().to_owned(),
                        reason,
                    }),
                    _ => Ok(()),
                });
            }
        }
        self.shared.end();
        debug!(key = %self.key(), "lock task ended");
    }

    /// Begins a tenure of the entry in `held` under `session`: publishes it as owned and lets
    /// the handle release it. `None` if the session was no longer valid (nothing published).
    fn begin_hold(
        &mut self,
        session: &Arc<Session>,
        registration: Registration,
    ) -> Option<FencingToken> {
        let token = FencingToken(self.held.as_ref()?.1.create_revision);
        let state = *session.subscribe().borrow();
        let now = Instant::now();
        match state {
            SessionState::Live { deadline } if now < deadline => {
                self.shared.set_session(Some(session.subscribe()));
                self.shared.publish(Ownership::Owned { token });
            }
            SessionState::Unconfirmed { deadline } if now < deadline => {
                self.shared.set_session(Some(session.subscribe()));
                self.shared
                    .publish(Ownership::Unconfirmed { token, deadline });
            }
            _ => return None,
        }
        self.shared.set_tenure(Tenure {
            locker: self.locker.clone(),
            session: session.clone(),
            create_revision: token.0,
            claim: self.claim.take(),
            one_shot: self.mode != Mode::Persistent,
            registration: Some(registration),
        });
        info!(key = %self.key(), %token, "owned");
        Some(token)
    }

    /// Takes the tenure back once holding ended; the handle may have released it meanwhile.
    fn end_tenure(&mut self, end: HoldEnd) -> HoldEnd {
        let (tenure, released) = self.shared.end_tenure();
        if let Some(tenure) = tenure {
            self.claim = tenure.claim;
        }
        if released {
            HoldEnd::Exit(Exit::Gone)
        } else {
            end
        }
    }

    fn key(&self) -> &str {
        &self.shared.key
    }

    fn backend(&self) -> &dyn crate::backend::LockBackend {
        self.locker.inner.backend.as_ref()
    }

    /// Joins the queue and waits until owned: `Ok` with the session and the hub registration
    /// to hold with (the entry is in `held`), `Err` if the task must stop.
    async fn acquire(&mut self) -> std::result::Result<(Arc<Session>, Registration), Exit> {
        loop {
            self.shared.publish(Ownership::Acquiring);
            let session = match self.session().await {
                Ok(session) => session,
                Err(err) => match self.failed(err).await {
                    Some(exit) => return Err(exit),
                    None => continue,
                },
            };
            // Subscribe before joining: every change after the join is then seen.
            let registration = match self.register().await {
                Ok(Ok(registration)) => registration,
                Ok(Err(exit)) => return Err(exit),
                Err(err) => match self.failed(err).await {
                    Some(exit) => return Err(exit),
                    None => continue,
                },
            };
            self.pending = Some((session.clone(), entry_key(self.key(), session.lease())));
            let joined = match self
                .backend()
                .join(self.key(), session.lease(), &self.value)
                .await
            {
                Ok(joined) => joined,
                Err(Error::LeaseLost { .. }) => {
                    self.pending = None;
                    self.drop_session(&session).await;
                    continue;
                }
                Err(err) => match self.failed(err).await {
                    Some(exit) => return Err(exit),
                    None => continue,
                },
            };
            self.pending = None;
            self.failures = 0;
            let mut entry = joined.entry;
            self.held = Some((session.clone(), entry.clone()));
            if entry.value != self.value {
                // A retried join found our entry from before, with an older value.
                if let Ok(true) = self
                    .backend()
                    .update_value(&entry.key, entry.create_revision, &self.value)
                    .await
                {
                    entry.value = self.value.clone();
                    self.held = Some((session.clone(), entry.clone()));
                }
            }
            if let Some(predecessor) = joined.predecessor {
                if self.mode == Mode::TryOnce {
                    debug!(key = %self.key(), "try_acquire: held by another");
                    return Err(Exit::Release(None));
                }
                debug!(key = %self.key(), token = entry.create_revision, "waiting in queue");
                let known = (predecessor, joined.revision);
                match self.wait_turn(&session, entry, Some(known)).await {
                    Turn::Owned(owned) => self.held = Some((session.clone(), owned)),
                    Turn::Rejoin => continue,
                    Turn::Exit(exit) => return Err(exit),
                }
            }
            return Ok((session, registration));
        }
    }

    /// Registers this lock with the locker's hub (serving commands while the hub's watch is
    /// being established). `Ok(Err(exit))` if told to stop meanwhile.
    async fn register(&mut self) -> Result<std::result::Result<Registration, Exit>> {
        self.shared.clear_events();
        let locker = self.locker.clone();
        let registering = locker
            .inner
            .hub
            .register(self.shared.key.clone(), self.shared.clone());
        tokio::pin!(registering);
        loop {
            tokio::select! {
                biased;
                registered = &mut registering => return registered.map(Ok),
                () = self.shared.doorbell.notified() => {
                    if let Some(exit) = self.serve_commands().await {
                        return Ok(Err(exit));
                    }
                }
            }
        }
    }

    /// What to do once holding ended: `Some` if the task must stop.
    async fn after_hold(&mut self, end: HoldEnd, session: Arc<Session>) -> Option<Exit> {
        match end {
            HoldEnd::Exit(exit) => Some(exit),
            HoldEnd::NeverOwned => {
                debug!(key = %self.key(), "session ended before owning; joining again");
                self.forget_entry_in_background();
                self.drop_session(&session).await;
                None
            }
            HoldEnd::Lost(token, reason) => {
                warn!(key = %self.key(), %token, %reason, "lost");
                self.shared.set_session(None);
                self.shared.publish(Ownership::Lost { token, reason });
                // The store may still have the entry (deadline passed, or a stale view):
                // take it away (guarded) so the next holder need not wait for the lease.
                self.forget_entry_in_background();
                if matches!(reason, LossReason::LeaseGone | LossReason::DeadlinePassed) {
                    self.drop_session(&session).await;
                }
                (self.mode != Mode::Persistent).then_some(Exit::Done)
            }
        }
    }

    /// The session to use: a shared one of the locker (the default session, or, for a second
    /// lock on the same key in the same locker, the next shared session: one entry per key per
    /// lease), or this lock's own.
    async fn session(&mut self) -> Result<Arc<Session>> {
        if self.dedicated_ttl.is_none() {
            let slot = match &self.claim {
                Some(claim) => claim.slot(),
                None => {
                    let claim = self.locker.claim_key(&self.shared.key);
                    let slot = claim.slot();
                    self.claim = Some(claim);
                    slot
                }
            };
            return self.locker.shared_session(slot).await;
        }
        if let Some(session) = self.own_session.as_ref().filter(|s| !s.is_lost()) {
            return Ok(session.clone());
        }
        let ttl = self.dedicated_ttl.unwrap_or(self.locker.inner.ttl);
        let session = self.locker.new_session(ttl).await?;
        self.own_session = Some(session.clone());
        Ok(session)
    }

    /// Stops using a session whose lease is gone (or whose deadline passed).
    async fn drop_session(&mut self, session: &Arc<Session>) {
        if self
            .own_session
            .as_ref()
            .is_some_and(|own| Arc::ptr_eq(own, session))
        {
            self.own_session = None;
        } else {
            self.locker.forget_shared_session(session).await;
        }
    }

    /// Handles a failed store call: `try_acquire` gives up on any error, `acquire` on a
    /// permanent one; otherwise waits a jittered back-off (serving commands) and goes on.
    async fn failed(&mut self, err: Error) -> Option<Exit> {
        let give_up = match self.mode {
            Mode::TryOnce => true,
            Mode::Once => !err.is_retryable(),
            Mode::Persistent => false,
        };
        if give_up {
            warn!(key = %self.key(), error = %err, "lock attempt failed");
            self.shared.set_error(err);
            return Some(Exit::Done);
        }
        if err.is_retryable() {
            debug!(key = %self.key(), error = %err, "store call failed; retrying");
        } else {
            warn!(key = %self.key(), error = %err, "store call failed; the handle keeps trying");
        }
        self.pause().await
    }

    /// Sleeps a jittered back-off, serving commands; `Some` if told to stop meanwhile.
    async fn pause(&mut self) -> Option<Exit> {
        let mut failures = self.failures;
        let delay = self.locker.retry_delay(&mut failures);
        self.failures = failures;
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            if let Some(exit) = self.serve_commands().await {
                return Some(exit);
            }
            tokio::select! {
                biased;
                () = &mut sleep => return None,
                () = self.shared.doorbell.notified() => {}
            }
        }
    }

    /// Serves the queued commands; `Some` if the task must stop.
    async fn serve_commands(&mut self) -> Option<Exit> {
        loop {
            match self.shared.take_command() {
                Taken::Command(Command::Release(reply)) => return Some(Exit::Release(Some(reply))),
                Taken::Command(Command::Abandon) => return Some(Exit::Abandon),
                Taken::Command(Command::SetValue(value, reply)) => {
                    let result = self.set_value(value).await;
                    let _ = reply.send(result);
                }
                Taken::HandleGone => return Some(Exit::Release(None)),
                Taken::Nothing => return None,
            }
        }
    }

    /// Takes `value` as the value of this and every later tenure, and writes it to the entry
    /// this task has now, if any (guarded by the entry's create revision).
    async fn set_value(&mut self, value: Vec<u8>) -> Result<()> {
        self.locker.check_value(&value)?;
        self.value = value;
        let Some((_, entry)) = &self.held else {
            return Ok(());
        };
        let (key, rev) = (entry.key.clone(), entry.create_revision);
        match self.backend().update_value(&key, rev, &self.value).await {
            Ok(true) => {
                if let Some((_, entry)) = &mut self.held {
                    entry.value = self.value.clone();
                }
                Ok(())
            }
            Ok(false) | Err(Error::LeaseLost { .. }) => {
                self.held = None;
                let reason = match self.shared.session_valid() {
                    true => LossReason::EntryDeleted,
                    false => LossReason::LeaseGone,
                };
                // If it was owned, it is not any more: say so now, whatever the task is in the
                // middle of (holding notices the missing entry when it next looks).
                if let state @ (Ownership::Owned { token } | Ownership::Unconfirmed { token, .. }) =
                    self.shared.state()
                {
                    debug!(key = %self.key(), ?state, "set_value found the entry gone");
                    self.shared.set_session(None);
                    self.shared.publish(Ownership::Lost { token, reason });
                }
                Err(Error::NotOwned {
                    key: self.key().to_owned(),
                    reason,
                })
            }
            Err(err) => Err(err),
        }
    }

    /// Waits until `entry` is the oldest in its queue, watching only the entry just before it.
    /// `known`: the predecessor and the revision it was read at, if the join just answered it
    /// (saves one read).
    async fn wait_turn(
        &mut self,
        session: &Arc<Session>,
        mut entry: Entry,
        mut known: Option<(Entry, Revision)>,
    ) -> Turn {
        self.shared.publish(Ownership::Acquiring);
        let mut session_rx = session.subscribe();
        loop {
            if session.is_lost() {
                self.forget_entry_in_background();
                return Turn::Rejoin;
            }
            let (predecessor, read_at) = match known.take() {
                Some(known) => known,
                None => {
                    let position = match self
                        .backend()
                        .position(self.key(), &entry.key, entry.create_revision)
                        .await
                    {
                        Ok(position) => position,
                        Err(Error::LeaseLost { .. }) => {
                            self.held = None;
                            return Turn::Rejoin;
                        }
                        Err(err) => match self.failed(err).await {
                            Some(exit) => return Turn::Exit(exit),
                            None => continue,
                        },
                    };
                    self.failures = 0;
                    let Some(own) = position.own else {
                        debug!(key = %self.key(), "own entry gone while waiting; joining again");
                        self.held = None;
                        return Turn::Rejoin;
                    };
                    entry.value = own.value;
                    match position.predecessor {
                        Some(predecessor) => (predecessor, position.revision),
                        None => return Turn::Owned(entry),
                    }
                }
            };
            // Wait for the predecessor (or our own entry) to go, after the read.
            loop {
                let (events, hub_closed) = self.shared.take_events();
                let mut moved = false;
                for msg in events {
                    match msg {
                        HubMsg::Event(event) => {
                            moved |= event.kind == EventKind::Delete
                                && event.entry.mod_revision > read_at
                                && (event.entry.key == predecessor.key
                                    || event.entry.key == entry.key);
                        }
                        HubMsg::Resync => moved = true,
                    }
                }
                // The hub's watch failed: subscribe again by joining again (the join finds our
                // entry where it is).
                if hub_closed {
                    return Turn::Rejoin;
                }
                if let Some(exit) = self.serve_commands().await {
                    return Turn::Exit(exit);
                }
                if moved {
                    break;
                }
                tokio::select! {
                    biased;
                    changed = session_rx.changed() => {
                        if changed.is_err() || session.is_lost() {
                            self.forget_entry_in_background();
                            return Turn::Rejoin;
                        }
                    }
                    () = self.shared.doorbell.notified() => {}
                }
            }
        }
    }

    /// Holds the lock until it is lost or the task is told to stop, publishing every change.
    ///
    /// This is the one state a lock spends most of its life in, so its future stays small:
    /// it waits on its session's state and on its doorbell, and boxes everything else.
    async fn hold(&mut self, session: &Arc<Session>, token: FencingToken) -> HoldEnd {
        let mut session_rx = session.subscribe();
        loop {
            if self.shared.released_by_handle() {
                return HoldEnd::Exit(Exit::Gone);
            }
            let state = *session_rx.borrow_and_update();
            match state {
                SessionState::Live { deadline } | SessionState::Unconfirmed { deadline }
                    if Instant::now() >= deadline =>
                {
                    return HoldEnd::Lost(token, LossReason::DeadlinePassed);
                }
                SessionState::Live { .. } => self.shared.publish(Ownership::Owned { token }),
                SessionState::Unconfirmed { deadline } => self
                    .shared
                    .publish(Ownership::Unconfirmed { token, deadline }),
                SessionState::Lost(LossReason::Released) => {
                    return HoldEnd::Lost(token, LossReason::LeaseGone);
                }
                SessionState::Lost(reason) => return HoldEnd::Lost(token, reason),
            }
            let (events, hub_closed) = self.shared.take_events();
            let mut resync = false;
            for msg in events {
                match msg {
                    // A delete of our key from before this tenure (same lease, earlier entry) is
                    // not about this entry.
                    HubMsg::Event(event)
                        if event.kind == EventKind::Delete
                            && event.entry.mod_revision > token.0
                            && self
                                .held
                                .as_ref()
                                .is_some_and(|(_, entry)| entry.key == event.entry.key) =>
                    {
                        let reason = if session.is_lost() {
                            LossReason::LeaseGone
                        } else {
                            LossReason::EntryDeleted
                        };
                        return HoldEnd::Lost(token, reason);
                    }
                    HubMsg::Event(_) => {}
                    HubMsg::Resync => resync = true,
                }
            }
            let mut unwatched = false;
            if hub_closed {
                // The hub's watch failed: subscribe again, then check what was missed.
                match Box::pin(self.resubscribe()).await {
                    Ok(Some(fresh)) => {
                        if !self.shared.set_registration(fresh) {
                            // The handle released meanwhile.
                            return HoldEnd::Exit(Exit::Gone);
                        }
                    }
                    // Not watched: try again (after the back-off `resubscribe` waited).
                    Ok(None) => unwatched = true,
                    Err(exit) => return HoldEnd::Exit(exit),
                }
                resync = true;
            }
            if self.shared.has_commands()
                && let Some(exit) = Box::pin(self.serve_commands()).await
            {
                return HoldEnd::Exit(exit);
            }
            // A set_value served anywhere while holding (here, or in resubscribe's register or
            // pause) may have found the entry gone.
            if self.held.is_none() {
                let reason = match self.shared.state() {
                    Ownership::Lost { reason, .. } => reason,
                    _ => LossReason::EntryDeleted,
                };
                return HoldEnd::Lost(token, reason);
            }
            if resync && let Some(end) = Box::pin(self.check_still_there(session, token)).await {
                return end;
            }
            if unwatched {
                continue;
            }
            tokio::select! {
                biased;
                changed = session_rx.changed() => {
                    if changed.is_err() && !matches!(*session_rx.borrow(), SessionState::Lost(_)) {
                        return HoldEnd::Lost(token, LossReason::DeadlinePassed);
                    }
                }
                () = self.shared.doorbell.notified() => {}
            }
        }
    }

    /// Registers with the hub again after its watch failed; on failure, waits a back-off and
    /// leaves the next attempt to the caller. `Err` if told to stop meanwhile.
    async fn resubscribe(&mut self) -> std::result::Result<Option<Registration>, Exit> {
        match self.register().await {
            Ok(Ok(registration)) => Ok(Some(registration)),
            Ok(Err(exit)) => Err(exit),
            Err(err) => {
                warn!(key = %self.key(), error = %err, "cannot watch the lock; retrying");
                Sink::close(&*self.shared);
                match self.pause().await {
                    Some(exit) => Err(exit),
                    None => Ok(None),
                }
            }
        }
    }

    /// After a gap in the watch: reads whether our entry is still there, retrying until the
    /// store answers (or the session ends). `Some` if holding must end.
    async fn check_still_there(
        &mut self,
        session: &Arc<Session>,
        token: FencingToken,
    ) -> Option<HoldEnd> {
        let entry_key = self.held.as_ref()?.1.key.clone();
        let mut session_rx = session.subscribe();
        let mut failures = 0u32;
        loop {
            match self
                .backend()
                .position(self.key(), &entry_key, token.0)
                .await
            {
                Ok(position) if position.own.is_none() => {
                    return Some(HoldEnd::Lost(token, LossReason::EntryDeleted));
                }
                Ok(_) => return None,
                Err(Error::LeaseLost { .. }) => {
                    return Some(HoldEnd::Lost(token, LossReason::LeaseGone));
                }
                Err(err) => {
                    let delay = self.locker.retry_delay(&mut failures);
                    debug!(key = %self.key(), error = %err, ?delay, "cannot check the entry; retrying");
                    tokio::select! {
                        biased;
                        _ = session_rx.changed() => {
                            if let SessionState::Lost(reason) = *session_rx.borrow() {
                                return Some(HoldEnd::Lost(token, match reason {
                                    LossReason::Released => LossReason::LeaseGone,
                                    other => other,
                                }));
                            }
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Deletes what this task has in the store: the held entry (guarded by its create
    /// revision), or the entry of a join whose answer was not seen. Retries transient errors
    /// until the entry or its lease is gone; after a permanent error keeps retrying in the
    /// background for as long as the session lives.
    async fn delete_held(&mut self) -> Result<()> {
        if self.held.is_none()
            && let Some((session, key)) = self.pending.take()
            && let Some(entry) = find_unseen_join(&self.locker, &session, self.key(), &key).await
        {
            // The join went through although its answer was not seen.
            self.held = Some((session, entry));
        }
        let Some((session, entry)) = self.held.take() else {
            return Ok(());
        };
        let result =
            delete_until_gone(&self.locker, &session, &entry.key, entry.create_revision).await;
        if result.is_err() {
            delete_in_background(
                self.locker.clone(),
                session,
                entry.key,
                entry.create_revision,
                true,
                self.claim.take(),
            );
        }
        result
    }

    fn forget_entry_in_background(&mut self) {
        if let Some((session, entry)) = self.held.take() {
            delete_in_background(
                self.locker.clone(),
                session,
                entry.key,
                entry.create_revision,
                false,
                None,
            );
        }
    }

    async fn finish(&mut self, exit: Exit) {
        let was_owned = self.shared.state().is_owned();
        let still_valid = self.shared.session_valid();
        self.shared.set_session(None);
        match exit {
            Exit::Release(reply) => {
                // Stop claiming ownership before the entry goes: the next holder may own as
                // soon as it is deleted.
                self.shared.publish(Ownership::Released);
                let mut result = self.delete_held().await;
                if let Err(err) = &result {
                    warn!(key = %self.key(), error = %err, "release failed; retrying in the background");
                }
                if result.is_ok() && was_owned && !still_valid {
                    // Released, but ownership had already ended (deadline passed) before it.
                    result = Err(Error::NotOwned {
                        key: self.key().to_owned(),
                        reason: LossReason::DeadlinePassed,
                    });
                }
                self.own_session = None; // revokes a dedicated lease
                info!(key = %self.key(), "released");
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Exit::Abandon => {
                if let Some(session) = self.own_session.take() {
                    session.abandon();
                    self.held = None;
                } else if let Some((session, entry)) = self.held.take() {
                    // The shared session lives on: delete the entry when its lease would have
                    // expired. Keep the claim on the key until then, so that a new lock on the
                    // same key in this locker does not take this entry for its own.
                    let backend = self.locker.inner.backend.clone();
                    let claim = self.claim.take();
                    let ttl = session.ttl();
                    tokio::spawn(async move {
                        tokio::time::sleep(ttl).await;
                        let _ = backend
                            .delete_entry(&entry.key, entry.create_revision)
                            .await;
                        drop((session, claim));
                    });
                }
                self.shared.publish(Ownership::Released);
                info!(key = %self.key(), "abandoned");
            }
            Exit::Done => {
                // A one-shot attempt: clean up whatever is left, keep a published loss visible.
                if !matches!(self.shared.state(), Ownership::Lost { .. }) {
                    self.shared.publish(Ownership::Released);
                }
                let _ = self.delete_held().await;
                self.own_session = None;
            }
            Exit::Gone => {
                // The handle deleted the entry; a dedicated lease goes now.
                self.held = None;
                self.own_session = None;
            }
        }
    }
}

impl Drop for Driver {
    /// A driver dropped before it finished (an `acquire` cancelled on the caller's task, or a
    /// runtime shutting down): removes what it has in the store, in the background.
    fn drop(&mut self) {
        // However the task ended (finished, panicked, or dropped with its runtime): readers and
        // senders must not wait for it.
        drop(self.shared.close_inbox());
        self.shared.end();
        // A tenure left in the state (the task dropped while holding) refers to the locker and
        // the hub: take it back, keeping its claim for the clean-up below.
        if let (Some(tenure), _) = self.shared.end_tenure()
            && self.claim.is_none()
        {
            self.claim = tenure.claim;
        }
        if self.held.is_none() && self.pending.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the lease expires by itself
        };
        let locker = self.locker.clone();
        let key = self.shared.key.clone();
        let (held, pending) = (self.held.take(), self.pending.take());
        // Keep the claim on the key (and a dedicated session) until the entry is gone, so that
        // another lock of this locker does not take the entry for its own meanwhile.
        let keep = (self.claim.take(), self.own_session.take());
        runtime.spawn(async move {
            let held = match (held, pending) {
                (Some(held), _) => Some(held),
                (None, Some((session, entry_key))) => {
                    // The join may have gone through although its answer was not seen.
                    find_unseen_join(&locker, &session, &key, &entry_key)
                        .await
                        .map(|entry| (session, entry))
                }
                (None, None) => None,
            };
            if let Some((session, entry)) = held
                && delete_until_gone(&locker, &session, &entry.key, entry.create_revision)
                    .await
                    .is_err()
            {
                // A permanent error: go on retrying while the session lives.
                let (claim, _own_session) = keep;
                let (key, revision) = (entry.key, entry.create_revision);
                delete_in_background(locker, session, key, revision, true, claim);
            }
        });
    }
}

/// Deletes an entry in the background if dropped with it set (a release cancelled half-way),
/// keeping the claim on the key until then.
struct DeleteOnDrop {
    entry: Option<(Locker, Arc<Session>, String, Revision)>,
    claim: Option<KeyClaim>,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some((locker, session, entry_key, revision)) = self.entry.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let claim = self.claim.take();
            delete_in_background(locker, session, entry_key, revision, true, claim);
        }
    }
}

/// Deletes `entry_key` if it still has `create_revision`, retrying transient errors until the
/// entry or its lease is gone; answers a permanent error (the caller goes on in the background).
async fn delete_until_gone(
    locker: &Locker,
    session: &Arc<Session>,
    entry_key: &str,
    create_revision: Revision,
) -> Result<()> {
    let mut failures = 0u32;
    loop {
        match locker
            .inner
            .backend
            .delete_entry(entry_key, create_revision)
            .await
        {
            Ok(_) | Err(Error::LeaseLost { .. }) => return Ok(()),
            // The lease is no longer renewed, so the entry goes with it.
            Err(_) if session.is_lost() => return Ok(()),
            Err(err) if err.is_retryable() => {
                let delay = locker.retry_delay(&mut failures);
                debug!(entry = %entry_key, error = %err, ?delay, "release failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// The entry `entry_key` of a join whose answer was not seen, if the join went through. A failed
/// read is retried (with the locker's back-off) while the session lives: an entry forgotten here
/// would stay in the queue for as long as the session's lease is kept alive, and block the key.
async fn find_unseen_join(
    locker: &Locker,
    session: &Session,
    key: &str,
    entry_key: &str,
) -> Option<Entry> {
    let mut failures = 0u32;
    loop {
        match locker.inner.backend.entries(key).await {
            Ok(snapshot) => return snapshot.entries.into_iter().find(|e| e.key == entry_key),
            // The lease is no longer renewed, so the entry (if any) goes with it.
            Err(_) if session.is_lost() => return None,
            Err(err) if err.is_retryable() => {
                let delay = locker.retry_delay(&mut failures);
                debug!(entry = %entry_key, error = %err, ?delay, "looking for an unseen join failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(err) => {
                warn!(entry = %entry_key, error = %err, "cannot look for the entry of an unseen join; it stays until its lease ends");
                return None;
            }
        }
    }
}

/// Deletes an entry (guarded by its create revision) in the background, so that a loss or an
/// exit never waits for the store. With `until_gone`, retries (with back-off) while the session
/// lives.
fn delete_in_background(
    locker: Locker,
    session: Arc<Session>,
    entry_key: String,
    create_revision: Revision,
    until_gone: bool,
    claim: Option<KeyClaim>,
) {
    tokio::spawn(async move {
        // Held until the entry is gone, so that another lock of this locker does not take the
        // entry for its own meanwhile.
        let _claim = claim;
        let mut failures = 0u32;
        loop {
            match locker
                .inner
                .backend
                .delete_entry(&entry_key, create_revision)
                .await
            {
                Ok(_) | Err(Error::LeaseLost { .. }) => return,
                Err(_) if !until_gone || session.is_lost() => return,
                Err(_) => tokio::time::sleep(locker.retry_delay(&mut failures)).await,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::backend::Entry;

    fn event(kind: EventKind, key: &str) -> HubMsg {
        HubMsg::Event(WatchEvent {
            kind,
            entry: Entry {
                key: key.to_owned(),
                value: Vec::new(),
                lease: 1,
                create_revision: 2,
                mod_revision: 3,
            },
        })
    }

    #[test]
    fn a_lock_keeps_deletes_and_resyncs_but_not_puts() {
        let shared = Shared::new(Arc::from("k"));
        let wanted = |msg: HubMsg| match msg {
            HubMsg::Event(event) => shared.wants(&event),
            HubMsg::Resync => true,
        };
        assert!(!wanted(event(EventKind::Put, "k/1")));
        assert!(wanted(event(EventKind::Delete, "k/1")));
        shared.deliver(event(EventKind::Put, "k/1"));
        assert!(shared.take_events().0.is_empty(), "a put was queued");
        assert!(
            shared.doorbell.notified().now_or_never().is_none(),
            "a put rang the doorbell"
        );
        shared.deliver(event(EventKind::Delete, "k/1"));
        assert!(shared.doorbell.notified().now_or_never().is_some());
        shared.deliver(HubMsg::Resync);
        let (events, closed) = shared.take_events();
        assert!(!closed);
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0], HubMsg::Event(e) if e.kind == EventKind::Delete));
        assert!(matches!(events[1], HubMsg::Resync));
    }
}
