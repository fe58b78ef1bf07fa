//! What a backend gives the conformance suite: clients on one shared store, fault injection,
//! operator actions, and a unique key prefix per test.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::backend::{
    Entry, Joined, Lease, LeaseId, Limits, LockBackend, Position, Resumption, Revision, Snapshot,
    WatchStream, Watcher,
};
use locker_core::{Locker, LockerBuilder, Result};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::calls::{Counts, Method};

/// How a client is cut off from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Calls fail at once as unavailable (a refused connection).
    Fail,
    /// Calls hang until healed (a black hole).
    Hang,
}

/// Faults on one client's link to the store.
#[async_trait]
pub trait ClientFaults: Send + Sync {
    /// Cuts the client off until [`ClientFaults::heal`].
    async fn cut(&self, how: Cut);
    /// Restores the link.
    async fn heal(&self);
    /// Adds `latency` to every call (zero removes it).
    async fn set_latency(&self, latency: Duration);
}

/// One client of the shared store: a backend of its own (another process, as far as the store
/// can tell) and the faults of its link.
pub struct Client {
    /// The client's backend.
    pub backend: Arc<dyn LockBackend>,
    /// Its link's faults.
    pub faults: Arc<dyn ClientFaults>,
}

impl Client {
    /// A locker over this client, with the given TTL and a fixed jitter seed.
    ///
    /// # Panics
    ///
    /// If the options are rejected (the suite only uses valid ones).
    pub fn locker(&self, ttl: Duration) -> Locker {
        self.builder(ttl).build().expect("valid locker options")
    }

    /// A locker builder over this client with the given TTL and a fixed jitter seed.
    pub fn builder(&self, ttl: Duration) -> LockerBuilder {
        Locker::builder(self.backend.clone())
            .ttl(ttl)
            .jitter_seed(0x5eed)
            .retry_delays(Duration::from_millis(20), Duration::from_millis(250))
    }
}

/// A backend under test, as the conformance suite sees it. One harness per test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;

    /// A key unique to this test: the test's prefix followed by `name`.
    fn key(&self, name: &str) -> String;

    /// A fresh client on the shared store.
    async fn client(&self) -> Client;

    /// Whether tokio time is paused (virtual) in this test.
    fn virtual_time(&self) -> bool;

    /// Every entry in the store under the queue `key` (exactly one segment below), as an
    /// operator would list them.
    async fn entries(&self, key: &str) -> Vec<Entry>;

    /// Whether the store still has `lease`.
    async fn lease_exists(&self, lease: LeaseId) -> bool;

    /// Ends `lease` now, as if its TTL ran out.
    async fn expire_lease(&self, lease: LeaseId);

    /// Deletes a key, as an operator would (not through locker).
    async fn delete_key(&self, key: &str);

    /// Declares, first thing in a test, that it uses the store's history (the changes before the
    /// current revision) as `how` says, for the rest of the test.
    ///
    /// Compaction is store-wide: on a store that tests share, one test's compaction would break
    /// another's watch or read from a past revision. This waits until `how` cannot conflict with
    /// another test (tests that read history exclude compactions, a compaction excludes them),
    /// then holds that until the harness is dropped. A store of the test's own answers at once.
    ///
    /// # Panics
    ///
    /// If the test already declared [`HistoryUse::Reads`] and now asks for
    /// [`HistoryUse::Compacts`] (it would wait for itself).
    async fn use_history(&self, how: HistoryUse);

    /// Compacts the store's history up to its current revision.
    ///
    /// # Panics
    ///
    /// Unless the test declared [`HistoryUse::Compacts`] through [`Harness::use_history`].
    async fn compact(&self);

    /// Every lease granted to this test's clients so far (see [`RecordingBackend`]).
    fn granted_leases(&self) -> Vec<LeaseId>;

    /// What is left of this test in the store: keys under its prefix (every key, on a store of
    /// the test's own), and those of `leases` still alive. Empty when the test cleaned up after
    /// itself.
    async fn leftovers(&self, leases: &[LeaseId]) -> Vec<String>;
}

/// How a test uses the store's history, for [`Harness::use_history`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HistoryUse {
    /// The test reads or watches from past revisions: no compaction may happen meanwhile.
    Reads,
    /// The test compacts the store ([`Harness::compact`]), removing every test's history.
    Compacts,
}

/// What one test holds of its store's history: how a harness implements
/// [`Harness::use_history`].
#[derive(Debug)]
pub struct HistoryClaim {
    /// The lock of a store that tests share; `None` for a store of the test's own.
    shared: Option<&'static RwLock<()>>,
    held: std::sync::Mutex<Held>,
}

#[derive(Debug)]
enum Held {
    Nothing,
    /// Reads, holding the shared lock for reading (if the store is shared) until dropped.
    Reads {
        _guard: Option<RwLockReadGuard<'static, ()>>,
    },
    /// Compacts, holding the shared lock for writing (if the store is shared) until dropped.
    Compacts {
        _guard: Option<RwLockWriteGuard<'static, ()>>,
    },
}

impl Held {
    fn how(&self) -> Option<HistoryUse> {
        match self {
            Held::Nothing => None,
            Held::Reads { .. } => Some(HistoryUse::Reads),
            Held::Compacts { .. } => Some(HistoryUse::Compacts),
        }
    }
}

impl HistoryClaim {
    /// The claim of a test on a store of its own: nothing to wait for.
    pub fn own_store() -> Self {
        HistoryClaim {
            shared: None,
            held: std::sync::Mutex::new(Held::Nothing),
        }
    }

    /// The claim of a test on a store shared with the other tests of the process, whose history
    /// `lock` guards: readers of history take it for reading, compactions for writing.
    pub fn shared_store(lock: &'static RwLock<()>) -> Self {
        HistoryClaim {
            shared: Some(lock),
            held: std::sync::Mutex::new(Held::Nothing),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the test may use the history as `how` says, and holds that until dropped.
    ///
    /// # Panics
    ///
    /// If `how` is [`HistoryUse::Compacts`] and the test already holds [`HistoryUse::Reads`].
    pub async fn claim(&self, how: HistoryUse) {
        match self.held().how() {
            Some(held) if held >= how => return,
            Some(_) => panic!(
                "a test that declared it reads history cannot then compact (it would wait for \
                 itself): declare HistoryUse::Compacts first thing instead"
            ),
            None => {}
        }
        // The lock is taken with nothing else held (not the std mutex above): readers never
        // wait for anything while holding it, so a waiting compaction always gets it.
        let held = match how {
            HistoryUse::Reads => Held::Reads {
                _guard: match self.shared {
                    Some(lock) => Some(lock.read().await),
                    None => None,
                },
            },
            HistoryUse::Compacts => Held::Compacts {
                _guard: match self.shared {
                    Some(lock) => Some(lock.write().await),
                    None => None,
                },
            },
        };
        *self.held() = held;
    }

    /// Asserts that the test declared [`HistoryUse::Compacts`].
    ///
    /// # Panics
    ///
    /// If it did not.
    pub fn assert_may_compact(&self) {
        assert_eq!(
            self.held().how(),
            Some(HistoryUse::Compacts),
            "a test compacts the store without having declared \
             `h.use_history(HistoryUse::Compacts)` first thing: it would break other tests' \
             history on a shared store"
        );
    }
}

/// Sends `tracing` output to the test's captured output, filtered by `RUST_LOG` (default: warn).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The leases granted to some clients, in order: what a harness answers for
/// [`Harness::granted_leases`]. Clones share the list.
#[derive(Debug, Clone, Default)]
pub struct LeaseLog(Arc<std::sync::Mutex<Vec<LeaseId>>>);

impl LeaseLog {
    /// Adds `lease`.
    pub fn record(&self, lease: LeaseId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(lease);
    }

    /// Every lease recorded, in order.
    pub fn all(&self) -> Vec<LeaseId> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lease recorded last.
    pub fn last(&self) -> Option<LeaseId> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .copied()
    }
}

/// A backend that records the leases it grants (so a test can check that none outlives it) and
/// counts every call (so a test or the benchmark can say which round trips an operation costs).
#[derive(Debug)]
pub struct RecordingBackend {
    inner: Arc<dyn LockBackend>,
    granted: LeaseLog,
    counts: Arc<Counts>,
}

impl RecordingBackend {
    /// Wraps `inner`, adding each lease it grants to `granted`.
    pub fn new(inner: Arc<dyn LockBackend>, granted: LeaseLog) -> Self {
        RecordingBackend {
            inner,
            granted,
            counts: Arc::default(),
        }
    }

    /// The counts of the calls made through this backend.
    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }
}

/// `stream`, counting the events it delivers in `counts`.
fn count_events(stream: WatchStream, counts: Arc<Counts>) -> WatchStream {
    use futures::StreamExt;
    WatchStream {
        start_revision: stream.start_revision,
        events: stream
            .events
            .inspect(move |batch| {
                if let Ok(batch) = batch {
                    counts.add_events(batch.len());
                }
            })
            .boxed(),
    }
}

#[async_trait]
impl Watcher for RecordingBackend {
    async fn watch(&self, prefix: &str, from_revision: Option<Revision>) -> Result<WatchStream> {
        self.counts.bump(Method::Watch);
        let stream = self.inner.watch(prefix, from_revision).await?;
        Ok(count_events(stream, self.counts.clone()))
    }

    async fn watch_deletes(
        &self,
        prefix: &str,
        from_revision: Option<Revision>,
    ) -> Result<WatchStream> {
        self.counts.bump(Method::Watch);
        let stream = self.inner.watch_deletes(prefix, from_revision).await?;
        Ok(count_events(stream, self.counts.clone()))
    }
}

#[async_trait]
impl LockBackend for RecordingBackend {
    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        self.counts.bump(Method::GrantLease);
        let lease = self.inner.grant_lease(ttl).await?;
        self.granted.record(lease.id);
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>> {
        self.counts.bump(Method::KeepAlive);
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.counts.bump(Method::RevokeLease);
        self.inner.revoke_lease(lease).await
    }

    async fn join(&self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined> {
        self.counts.bump(Method::Join);
        self.inner.join(key, lease, value).await
    }

    async fn position(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
    ) -> Result<Position> {
        self.counts.bump(Method::Position);
        self.inner.position(key, entry_key, create_revision).await
    }

    async fn holder(&self, key: &str) -> Result<(Option<Entry>, Revision)> {
        self.counts.bump(Method::Holder);
        self.inner.holder(key).await
    }

    async fn entries(&self, key: &str) -> Result<Snapshot> {
        self.counts.bump(Method::Entries);
        self.inner.entries(key).await
    }

    async fn delete_entry(&self, entry_key: &str, create_revision: Revision) -> Result<bool> {
        self.counts.bump(Method::DeleteEntry);
        self.inner.delete_entry(entry_key, create_revision).await
    }

    async fn update_value(
        &self,
        entry_key: &str,
        create_revision: Revision,
        value: &[u8],
    ) -> Result<Option<Revision>> {
        self.counts.bump(Method::UpdateValue);
        self.inner
            .update_value(entry_key, create_revision, value)
            .await
    }

    async fn resume(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
        mod_revision: Revision,
        value: &[u8],
    ) -> Result<Resumption> {
        self.counts.bump(Method::Resume);
        self.inner
            .resume(key, entry_key, create_revision, mod_revision, value)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::RwLock;
    use tokio::time::timeout;

    use super::{HistoryClaim, HistoryUse};

    /// Readers of a shared store's history go together; a compaction waits for them, and readers
    /// that come later wait for it.
    #[tokio::test(start_paused = true)]
    async fn shared_history_excludes_compaction_while_it_is_read() {
        static LOCK: RwLock<()> = RwLock::const_new(());
        let (reader, other_reader) = (
            HistoryClaim::shared_store(&LOCK),
            HistoryClaim::shared_store(&LOCK),
        );
        reader.claim(HistoryUse::Reads).await;
        other_reader.claim(HistoryUse::Reads).await;
        reader.claim(HistoryUse::Reads).await; // again: nothing more to wait for
        let compactor = HistoryClaim::shared_store(&LOCK);
        let wait = Duration::from_secs(1);
        assert!(
            timeout(wait, compactor.claim(HistoryUse::Compacts))
                .await
                .is_err()
        );
        drop((reader, other_reader));
        timeout(wait, compactor.claim(HistoryUse::Compacts))
            .await
            .expect("no reader left");
        compactor.assert_may_compact();
        let late = HistoryClaim::shared_store(&LOCK);
        assert!(timeout(wait, late.claim(HistoryUse::Reads)).await.is_err());
        drop(compactor);
        timeout(wait, late.claim(HistoryUse::Reads))
            .await
            .expect("the compaction is over");
    }

    /// A store of the test's own never waits; the rules are the same.
    #[tokio::test]
    async fn own_history_never_waits_and_compaction_must_be_declared() {
        let compactor = HistoryClaim::own_store();
        compactor.claim(HistoryUse::Compacts).await;
        compactor.claim(HistoryUse::Reads).await; // compacting covers reading
        compactor.assert_may_compact();
        let undeclared = HistoryClaim::own_store();
        let compact = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            undeclared.assert_may_compact();
        }));
        assert!(compact.is_err(), "compaction without declaring it");
        let reader = HistoryClaim::own_store();
        reader.claim(HistoryUse::Reads).await;
        let upgrade = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
            reader.claim(HistoryUse::Compacts),
        ))
        .await;
        assert!(
            upgrade.is_err(),
            "a reader that then compacts would wait for itself"
        );
    }
}
