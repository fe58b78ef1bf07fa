//! [`Locker`]: the entry point, cheap to clone, over any backend.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::backend::{Entry, LeaseId, LockBackend};
use crate::error::{Error, Result};
use crate::handle::{self as lock, LockGuard, LockHandle};
use crate::hub::Hub;
use crate::machine::Mode;
use crate::reaper::{Job, Reaper};
use crate::resume::ResumeToken;
use crate::retry::Backoff;
use crate::retry::Jitter;
use crate::session::{Session, Timing};
use crate::types::{FencingToken, Holder, HolderUpdate};
use crate::watch;

/// The default TTL of a session's lease: **10 seconds**. A holder that stops renewing (a crash, a
/// partition) is replaced after about this long; [`LockerBuilder::ttl`] sets another.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// What a [`Locker`] is built over: any [`LockBackend`] (moved into the locker), or one already
/// shared, as an `Arc<B>` or an `Arc<dyn LockBackend>` (the same backend under several lockers,
/// without another wrapper).
///
/// ```
/// use std::sync::Arc;
/// use locker_core::{LockBackend, Locker};
/// use locker_memory::MemoryBackend;
///
/// let owned = Locker::new(MemoryBackend::new());
/// let shared: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
/// let a = Locker::new(shared.clone());
/// let b = Locker::builder(shared).build()?;
/// # Ok::<(), locker_core::Error>(())
/// ```
pub trait IntoBackend {
    /// The backend, shared.
    fn into_backend(self) -> Arc<dyn LockBackend>;
}

impl<B: LockBackend> IntoBackend for B {
    fn into_backend(self) -> Arc<dyn LockBackend> {
        Arc::new(self)
    }
}

impl<B: LockBackend> IntoBackend for Arc<B> {
    fn into_backend(self) -> Arc<dyn LockBackend> {
        self
    }
}

impl IntoBackend for Arc<dyn LockBackend> {
    fn into_backend(self) -> Arc<dyn LockBackend> {
        self
    }
}

/// A client of a lock store: locks, guards, reads and watches, over one backend.
///
/// Cheap to clone; clones share one default session (one lease kept alive for all the locks that
/// use it) and the watches of the store (one for all locks, deletes only, and one for all watch
/// streams). Needs a tokio runtime (with the `time` driver).
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker_core::Error> {
/// use locker_core::Locker;
/// use locker_memory::MemoryBackend;
///
/// let store = MemoryBackend::new();
/// let a = Locker::new(store.new_client());
/// let b = Locker::new(store.new_client());
///
/// let guard = a.acquire("www.example.com", "10.1.1.1").await?;
/// assert!(b.try_acquire("www.example.com", "10.1.1.2").await?.is_none());
///
/// let holder = b.get("www.example.com").await?.expect("held");
/// assert_eq!(holder.value_str(), Some("10.1.1.1"));
/// assert_eq!(holder.token, guard.token());
///
/// guard.release().await?;
/// assert!(b.get("www.example.com").await?.is_none());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Locker {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) hub: Hub,
    pub(crate) jitter: Arc<Jitter>,
    pub(crate) ttl: Duration,
    pub(crate) timing: Timing,
    /// The shared sessions: slot 0 is the default session; a lock on a key that another lock of
    /// this locker already has on every lower slot uses the next slot (one entry per key per
    /// lease). Extra slots are kept for reuse while the locker lives.
    sessions: std::sync::Mutex<Vec<Option<Arc<Session>>>>,
    /// Held while a shared session is granted, so that a slot gets one.
    granting: tokio::sync::Mutex<()>,
    /// The sessions taken up from resumed tenures, by lease: the locks that resume tenures of
    /// one lease share one keeper (and the lease expires once the last of them ends).
    taken_up: std::sync::Mutex<TakenUp>,
    /// Removes what locks leave behind.
    reaper: Reaper,
    /// The keys, each with a session slot, that locks of this locker use.
    claims: Claims,
}

type Claims = Arc<std::sync::Mutex<HashSet<(Arc<str>, usize)>>>;

/// The sessions of a locker's taken-up leases, by lease (see [`Locker::take_up_session`]).
type TakenUp = std::collections::HashMap<LeaseId, std::sync::Weak<Session>>;

/// A lock task's claim on a key in one session slot of its locker; released on drop.
#[derive(Debug)]
pub(crate) struct KeyClaim {
    key: Arc<str>,
    slot: usize,
    claims: Claims,
}

impl KeyClaim {
    /// The session slot of the claim.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.remove(&(self.key.clone(), self.slot));
        // A locker that held many keys at once gives the room back as they are released.
        if claims.capacity() > 64 && claims.capacity() > 4 * claims.len() {
            let len = claims.len();
            claims.shrink_to(2 * len);
        }
    }
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", &self.inner.backend)
            .field("ttl", &self.inner.ttl)
            .field("safety_margin", &self.inner.timing.safety_margin)
            .finish_non_exhaustive()
    }
}

/// Options of a [`Locker`]; see [`Locker::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct LockerBuilder {
    backend: Arc<dyn LockBackend>,
    ttl: Duration,
    safety_margin: Option<Duration>,
    retry_base: Duration,
    retry_max: Duration,
    jitter_seed: Option<u64>,
    key_watches: usize,
}

impl LockerBuilder {
    /// The TTL of the default session's lease (default 10 s). A holder that stops renewing (a
    /// crash, a partition) is replaced after about this long.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long before the store could expire a lease this client stops claiming what is under it
    /// (default: a tenth of the TTL, at least 100 ms). Must be shorter than a third of the TTL.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// The first and the longest delay between retries of a failed store call (default 50 ms
    /// and 1 s); each delay is jittered.
    pub fn retry_delays(mut self, first: Duration, max: Duration) -> Self {
        self.retry_base = first;
        self.retry_max = max;
        self
    }

    /// Seeds the jitter of retry delays, so that a run can be replayed (default: random).
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
        self
    }

    /// How many keys this locker watches one by one, at most (default 128).
    ///
    /// Each key a locker uses (a lock, a watch stream) gets a watch of its own on the store, a
    /// range of the one gRPC stream on etcd, opened from the current revision before the key is
    /// first read. So a client hears of the keys it uses only, however many other clients share
    /// the store. A locker that uses more keys than this at once watches the whole backend root
    /// with one watch instead (every change under the root then reaches it), and takes a watch
    /// per key again once it uses a quarter of this number or fewer. Neither switch loses or
    /// repeats a change. `0`: always the one watch over the root.
    pub fn key_watches(mut self, max: usize) -> Self {
        self.key_watches = max;
        self
    }

    /// Checks the options (no I/O) and builds the locker.
    ///
    /// # Errors
    ///
    /// [`Error::TtlOutOfRange`] for a TTL the store does not accept; [`Error::InvalidConfig`] for a
    /// safety margin of a third of the TTL or more, or zero retry delays.
    pub fn build(self) -> Result<Locker> {
        check_ttl(self.backend.as_ref(), self.ttl)?;
        let safety_margin = self
            .safety_margin
            .unwrap_or_else(|| (self.ttl / 10).max(Duration::from_millis(100)));
        check_margin(self.ttl, safety_margin)?;
        if self.retry_base.is_zero() || self.retry_max < self.retry_base {
            return Err(Error::InvalidConfig(format!(
                "retry delays must be positive with first <= max (got {:?} and {:?})",
                self.retry_base, self.retry_max
            )));
        }
        let jitter = Arc::new(Jitter::new(
            self.jitter_seed.unwrap_or_else(Jitter::random_seed),
        ));
        let timing = Timing {
            safety_margin,
            retry_base: self.retry_base,
            retry_max: self.retry_max,
        };
        Ok(Locker {
            inner: Arc::new(Inner {
                hub: Hub::new(
                    self.backend.clone(),
                    jitter.clone(),
                    (self.retry_base, self.retry_max),
                    // Watch streams learn that the store may be unreachable within two thirds
                    // of the TTL: a probe every third, answered within a third.
                    self.ttl / 3,
                    self.key_watches,
                ),
                reaper: Reaper::new(self.backend.clone(), (self.retry_base, self.retry_max)),
                backend: self.backend,
                jitter,
                ttl: self.ttl,
                timing,
                sessions: std::sync::Mutex::new(Vec::new()),
                granting: tokio::sync::Mutex::new(()),
                taken_up: std::sync::Mutex::default(),
                claims: Arc::default(),
            }),
        })
    }
}

pub(crate) fn check_ttl(backend: &dyn LockBackend, ttl: Duration) -> Result<()> {
    let limits = backend.limits();
    if ttl < limits.min_ttl || ttl > limits.max_ttl {
        return Err(Error::TtlOutOfRange {
            ttl,
            min: limits.min_ttl,
            max: limits.max_ttl,
        });
    }
    Ok(())
}

fn check_margin(ttl: Duration, margin: Duration) -> Result<()> {
    if margin.is_zero() || margin >= ttl / 3 {
        return Err(Error::InvalidConfig(format!(
            "safety margin {margin:?} must be above zero and below a third of the TTL ({:?})",
            ttl / 3
        )));
    }
    Ok(())
}

/// Options of one lock; see [`Locker::lock_with`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct LockOptions {
    pub(crate) ttl: Option<Duration>,
    pub(crate) resume: Option<ResumeToken>,
}

impl LockOptions {
    /// The defaults: the lock uses the locker's default session.
    pub fn new() -> Self {
        LockOptions::default()
    }

    /// Holds the lock on a session (lease) of its own with this TTL, instead of the locker's
    /// default session. Its lease is revoked on release; [`LockHandle::abandon`] lets it expire.
    pub fn dedicated_session(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Starts by resuming the tenure of `token`, exported by a process that has exited (see
    /// [`ResumeToken`]): if its lease still lives and nobody wrote its entry since, the lock owns
    /// at once with the same fencing token, keeps that lease alive while it holds the tenure, and
    /// goes on as any lock. Otherwise it reports that tenure's loss
    /// ([`Ownership::Lost`](crate::Ownership::Lost) with its token: `LeaseGone`,
    /// `EntryDeleted`, `DeadlinePassed` or `ResumedElsewhere`), and then a handle joins the
    /// queue as any other lock, while `acquire` answers [`Error::NotOwned`] with that reason.
    ///
    /// The lease is taken up, not taken over: the locks of this locker that resume tenures of
    /// one lease keep it alive together, and when the last of them ends the lease is left to
    /// expire, never revoked (another process may have resumed another tenure under it; the
    /// entries of these locks are deleted as usual). Every tenure of a lease that nobody
    /// resumes stays in its queue while the lease is kept alive: resume all of a process's
    /// tokens, or none. [`Locker::close`] does not touch taken-up leases.
    ///
    /// The token's key must be the lock's key (checked before any I/O).
    pub fn resume(mut self, token: ResumeToken) -> Self {
        self.resume = Some(token);
        self
    }
}

impl Locker {
    /// A locker over `backend` with the default options.
    ///
    /// # Panics
    ///
    /// Never for the memory and etcd backends, whose limits accept the default TTL; a backend
    /// whose limits do not should be used through [`Locker::builder`], which returns an error.
    pub fn new(backend: impl IntoBackend) -> Self {
        match Locker::builder(backend).build() {
            Ok(locker) => locker,
            Err(err) => panic!("default locker options rejected by the backend: {err}"),
        }
    }

    /// A builder of a locker over `backend`: a [`LockBackend`], or an `Arc` of one
    /// ([`IntoBackend`]).
    pub fn builder(backend: impl IntoBackend) -> LockerBuilder {
        LockerBuilder {
            backend: backend.into_backend(),
            ttl: DEFAULT_TTL,
            safety_margin: None,
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_secs(1),
            jitter_seed: None,
            key_watches: crate::hub::KEY_WATCHES,
        }
    }

    /// The backend this locker uses.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.inner.backend
    }

    /// The TTL of the default session.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Starts trying to own `key` with `value`, for as long as the handle lives: the seed's
    /// `client.Lock(key, value, owned, quit)`.
    ///
    /// The handle joins the queue of `key`, waits its turn (watching the entry before it, never
    /// polling), publishes every change of [`Ownership`](crate::Ownership), and after a loss joins
    /// again. [`LockHandle::release`] gives the lock up at once; dropping the handle does too, in
    /// the background.
    ///
    /// # Errors
    ///
    /// Bad input ([`Error::EmptyKey`], [`Error::KeyTooLong`], [`Error::InvalidKey`],
    /// [`Error::ValueTooLarge`]), before any I/O. What a key may be is in
    /// [`check_key_shape`](crate::backend::check_key_shape).
    pub async fn lock(
        &self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Result<LockHandle> {
        self.lock_with(key, value, LockOptions::new()).await
    }

    /// [`Locker::lock`] with options.
    ///
    /// # Errors
    ///
    /// Bad input, including a TTL the store does not accept, before any I/O.
    pub async fn lock_with(
        &self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        options: LockOptions,
    ) -> Result<LockHandle> {
        lock::start(self.clone(), key.into(), value.into(), options)
    }

    /// Waits until `key` is owned with `value` and returns a guard: mutex style.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the entry it made is removed
    /// in the background and nothing is left held.
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; a permanent store error (permission denied, ...).
    pub async fn acquire(
        &self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Result<LockGuard> {
        self.acquire_with(key, value, LockOptions::new()).await
    }

    /// [`Locker::acquire`] with options.
    ///
    /// # Errors
    ///
    /// As [`Locker::acquire`]; with [`LockOptions::resume`], [`Error::InvalidConfig`] for a
    /// token of another key (before any I/O), and [`Error::NotOwned`] with the reason when the
    /// tenure to resume had ended.
    pub async fn acquire_with(
        &self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        options: LockOptions,
    ) -> Result<LockGuard> {
        let guard = lock::acquire(self.clone(), key.into(), value.into(), options, Mode::Once);
        guard
            .await?
            .ok_or_else(|| Error::unavailable("the lock task ended before owning"))
    }

    /// Owns `key` with `value` if nobody holds it, in one round trip; `None` if it is held.
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; store errors.
    pub async fn try_acquire(
        &self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Option<LockGuard>> {
        self.try_acquire_with(key, value, LockOptions::new()).await
    }

    /// [`Locker::try_acquire`] with options.
    ///
    /// # Errors
    ///
    /// As [`Locker::try_acquire`], and as [`Locker::acquire_with`] for a resume.
    pub async fn try_acquire_with(
        &self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        options: LockOptions,
    ) -> Result<Option<LockGuard>> {
        lock::acquire(
            self.clone(),
            key.into(),
            value.into(),
            options,
            Mode::TryOnce,
        )
        .await
    }

    /// The current holder of `key`, or `None`: the seed's `client.Get(key)`.
    ///
    /// # Errors
    ///
    /// Bad input before any I/O; store errors.
    pub async fn get(&self, key: &str) -> Result<Option<Holder>> {
        self.check_key(key)?;
        let (holder, _) = self.inner.backend.holder(key).await?;
        Ok(holder.map(Holder::from_entry))
    }

    /// A stream of the holder of `key`: the current state first, then every change of holder or
    /// of the holder's value; `None` whenever nobody holds it. The seed's `client.Watch(key)`.
    ///
    /// The stream rides on the locker's one watch of the store for all its watch streams, opened
    /// by the first (no polling of the store; it does its work as it is polled, with no task of
    /// its own), resumes by itself after a broken connection or a compaction (re-reading the
    /// state), and retries transient errors. It yields an error only for a permanent failure,
    /// and then ends. A stream nobody polls holds bounded memory: when it is polled again it
    /// yields the holder as it is then.
    ///
    /// It is [`watch_updates`](Locker::watch_updates) with only the holders: use that one to
    /// also learn when the view may be stale (the store unreachable) and when changes were
    /// skipped.
    ///
    /// # Errors
    ///
    /// Bad input, before any I/O.
    pub fn watch(&self, key: &str) -> Result<BoxStream<'static, Result<Option<Holder>>>> {
        Ok(self
            .watch_updates(key)?
            .filter_map(|update| {
                std::future::ready(match update {
                    Ok(HolderUpdate::Holder(holder)) => Some(Ok(holder)),
                    Ok(_) => None,
                    Err(err) => Some(Err(err)),
                })
            })
            .boxed())
    }

    /// A stream of the holder of `key` (as [`watch`](Locker::watch)), and of how current it is:
    /// [`HolderUpdate::Stale`] when the store may be unreachable, so that the last holder
    /// yielded may be out of date (a resolver should not keep serving a dead leader's address
    /// through an outage without knowing it), [`HolderUpdate::Current`] when it is reachable
    /// and read afresh again, and [`HolderUpdate::Skipped`] when changes were skipped
    /// (compaction, or a reader that fell behind its bounded backlog).
    ///
    /// While any of its watch streams lives, the locker probes the store with a read every third
    /// of its TTL, cut off after another third: a watch alone says nothing while the store is
    /// silent. A stream says `Stale` within about two thirds of the TTL of an outage.
    ///
    /// # Errors
    ///
    /// Bad input, before any I/O.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> locker_core::Result<()> {
    /// use futures::StreamExt;
    /// use locker_core::{HolderUpdate, Locker};
    /// use locker_memory::MemoryBackend;
    ///
    /// let locker = Locker::new(MemoryBackend::new());
    /// let mut updates = locker.watch_updates("www.example.com")?;
    /// assert_eq!(updates.next().await.transpose()?, Some(HolderUpdate::Holder(None)));
    /// let guard = locker.acquire("www.example.com", "10.1.1.1").await?;
    /// match updates.next().await.transpose()? {
    ///     Some(HolderUpdate::Holder(Some(holder))) => {
    ///         assert_eq!(holder.value_str(), Some("10.1.1.1"));
    ///     }
    ///     other => panic!("expected the new holder, got {other:?}"),
    /// }
    /// guard.release().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn watch_updates(&self, key: &str) -> Result<BoxStream<'static, Result<HolderUpdate>>> {
        self.check_key(key)?;
        Ok(watch::holder_stream(self.clone(), key.to_owned()))
    }

    /// Stops the default session now, revoking its lease: every lock on it loses ownership
    /// (guards stay lost; handles, which keep trying, join again on a new session). Returns once the store has answered, or after at most the TTL
    /// if it cannot be reached (the lease then expires by itself). Locks on dedicated sessions
    /// are not affected. The locker stays usable: a later lock starts a new session.
    ///
    /// Dropping every clone of a locker (and its handles) revokes the session in the background;
    /// call `close` before a process exits to be sure the lease is gone. Leases taken up to
    /// resume tenures ([`LockOptions::resume`]) are not revoked: they expire once their last
    /// lock ends.
    pub async fn close(&self) {
        let sessions: Vec<Arc<Session>> = {
            let mut slots = self.sessions();
            slots.iter_mut().filter_map(Option::take).collect()
        };
        for session in sessions {
            session.close().await;
        }
    }

    pub(crate) fn check_key(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let max = self.inner.backend.limits().max_key_len;
        if key.len() > max {
            return Err(Error::KeyTooLong {
                len: key.len(),
                max,
            });
        }
        crate::backend::check_key_shape(key)
    }

    pub(crate) fn check_value(&self, value: &[u8]) -> Result<()> {
        let max = self.inner.backend.limits().max_value_len;
        if value.len() > max {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max,
            });
        }
        Ok(())
    }

    /// The shared session of `slot` (0: the default session), started (or restarted after a
    /// loss) if need be.
    pub(crate) async fn shared_session(&self, slot: usize) -> Result<Arc<Session>> {
        if let Some(session) = self.live_session(slot) {
            return Ok(session);
        }
        let _granting = self.inner.granting.lock().await;
        if let Some(session) = self.live_session(slot) {
            return Ok(session);
        }
        let session = self.new_session(self.inner.ttl).await?;
        let mut slots = self.sessions();
        if slots.len() <= slot {
            slots.resize(slot + 1, None);
        }
        slots[slot] = Some(session.clone());
        Ok(session)
    }

    /// The shared session of `slot`, if it is there and not lost.
    fn live_session(&self, slot: usize) -> Option<Arc<Session>> {
        self.sessions()
            .get(slot)
            .and_then(Option::as_ref)
            .filter(|s| !s.is_lost())
            .cloned()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<Session>>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The session of `lease`, a resumed tenure's: the one this locker keeps for it already, or
    /// a new one once a keep-alive says the lease lives.
    pub(crate) async fn take_up_session(&self, lease: LeaseId) -> Result<Arc<Session>> {
        let live = |map: &TakenUp| {
            map.get(&lease)
                .and_then(std::sync::Weak::upgrade)
                .filter(|s| !s.is_lost())
        };
        if let Some(session) = live(&self.taken_up()) {
            return Ok(session);
        }
        let session = Session::take_up(
            self.inner.backend.clone(),
            lease,
            self.inner.timing,
            self.inner.jitter.clone(),
        )
        .await?;
        let mut map = self.taken_up();
        if let Some(other) = live(&map) {
            // Another lock took it up meanwhile: one keeper is enough.
            session.abandon();
            return Ok(other);
        }
        map.retain(|_, s| s.strong_count() > 0);
        map.insert(lease, Arc::downgrade(&session));
        Ok(session)
    }

    fn taken_up(&self) -> std::sync::MutexGuard<'_, TakenUp> {
        self.inner
            .taken_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) async fn new_session(&self, ttl: Duration) -> Result<Arc<Session>> {
        Session::grant(
            self.inner.backend.clone(),
            ttl,
            self.inner.timing,
            self.inner.jitter.clone(),
        )
        .await
    }
}

impl Holder {
    pub(crate) fn from_entry(entry: Entry) -> Holder {
        Holder {
            token: FencingToken(entry.create_revision),
            lease: entry.lease,
            value: entry.value,
        }
    }
}

impl Locker {
    /// A back-off with this locker's retry delays, seeded from its jitter.
    pub(crate) fn backoff(&self) -> Backoff {
        let timing = &self.inner.timing;
        self.inner
            .jitter
            .new_backoff(timing.retry_base, timing.retry_max)
    }

    /// Hands `job` to this locker's reaper.
    pub(crate) fn reap(&self, job: Job) {
        self.inner.reaper.reap(job, self.inner.jitter.next_u64());
    }

    /// Claims `key` in the lowest session slot where no other lock of this locker has it.
    pub(crate) fn claim_key(&self, key: &Arc<str>) -> KeyClaim {
        let claims = &self.inner.claims;
        let mut all = claims.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (0..)
            .find(|&slot| !all.contains(&(key.clone(), slot)))
            .unwrap_or(0);
        all.insert((key.clone(), slot));
        KeyClaim {
            key: key.clone(),
            slot,
            claims: claims.clone(),
        }
    }

    /// Stops using `session` as a shared session (its lease is gone).
    pub(crate) fn forget_shared_session(&self, session: &Arc<Session>) {
        let mut slots = self.sessions();
        for slot in slots.iter_mut() {
            if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
                *slot = None;
            }
        }
    }
}
