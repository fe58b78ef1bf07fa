//! [`MemoryBackend`]: the client handle, its builder, the operator methods and the trait impls.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use locker_core::backend::{
    Entry, Joined, Lease, LeaseId, Limits, Position, Resumption, Revision, Snapshot, WatchEvent,
    WatchStream,
};
use locker_core::{Error, LockBackend, Result, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::debug;

use crate::faults::{Faults, PartitionMode, PartitionState};
use crate::store::Store;

/// etcd's default limit on one request (`--max-request-bytes`): 1.5 MiB.
const ETCD_MAX_REQUEST_BYTES: usize = 1_572_864;
/// The bytes of each request that `locker-etcd` keeps for keys and request overhead (16 KiB).
const ETCD_KEY_BUDGET: usize = 16 * 1024;
/// The request overhead counted in [`ETCD_KEY_BUDGET`] (headers, tags, lease id, sort options).
const ETCD_REQUEST_OVERHEAD: usize = 512;
/// How often `locker-etcd`'s join transaction carries the key (its largest request).
const ETCD_KEY_COPIES: usize = 7;
/// `locker-etcd`'s default prefix, `locker/`.
const ETCD_DEFAULT_PREFIX_LEN: usize = "locker/".len();
/// `/` and 16 hex digits of a lease id.
const ENTRY_SUFFIX: usize = 17;

/// A deterministic in-process lock store with etcd's observable behaviour, and one client of it.
///
/// - **Clones** share the store *and* the [fault switches](MemoryBackend::faults): one process.
/// - [`new_client`](MemoryBackend::new_client) gives another client of the same store with its
///   own fault switches: another process on the same cluster.
/// - The **operator methods** ([`compact`](MemoryBackend::compact),
///   [`delete_key`](MemoryBackend::delete_key), [`expire_lease`](MemoryBackend::expire_lease),
///   [`keys`](MemoryBackend::keys), ...) act on the store directly, whatever this client's faults.
///
/// # Behavior
///
/// - One revision counter for the whole store: 1 when empty, +1 for each write (a join that
///   creates, a delete, an update, a lease ending with keys). Reads, lease grants and keep-alives,
///   guarded operations that do not match and leases ending without keys make no revision.
/// - Lease ids are positive, random-looking and the same on every run. A granted TTL is the
///   asked one rounded up to whole seconds and to at least [`Limits::min_ttl`] (so 1 s becomes
///   2 s, as with etcd); over [`Limits::max_ttl`] is [`Error::TtlOutOfRange`].
/// - Leases expire on tokio time (a paused clock works): a lease whose TTL ran out is gone for
///   every operation from that instant on, and its keys are deleted at one revision, a delete
///   event per key, in key order. A lazily spawned task per store sleeps until the next deadline
///   to deliver those events to watches; it ends when the store is dropped.
/// - Watches: see [`Watcher::watch`](MemoryBackend::watch).
///
/// # Cancel safety
///
/// Every trait method is cancel-safe: it awaits only before it touches the store (latency, a hung
/// partition), then does its whole operation at once, so a dropped call either did nothing or
/// did everything.
#[derive(Clone)]
pub struct MemoryBackend {
    store: Arc<Store>,
    faults: Faults,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("client", &self.faults.inner.client)
            .field("limits", &self.store.limits)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

/// Builds a [`MemoryBackend`]; from [`MemoryBackend::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct MemoryBackendBuilder {
    limits: Limits,
}

impl Default for MemoryBackendBuilder {
    fn default() -> Self {
        MemoryBackendBuilder {
            limits: MemoryBackend::DEFAULT_LIMITS,
        }
    }
}

impl MemoryBackendBuilder {
    /// What the store accepts ([`MemoryBackend::DEFAULT_LIMITS`] unless set). The store uses
    /// `min_ttl` and `max_ttl` when granting leases; the sizes are only reported through
    /// [`LockBackend::limits`] (core checks them before any call). Nothing is rejected here: with
    /// `min_ttl` above `max_ttl`, every grant fails with [`Error::TtlOutOfRange`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A fresh, empty store (revision 1), and its first client.
    pub fn build(self) -> MemoryBackend {
        MemoryBackend::with_store(Store::new(self.limits))
    }
}

impl MemoryBackend {
    /// Exactly the limits `locker-etcd`'s `EtcdBackend` reports with its default prefix `locker/`
    /// and etcd's default `--max-request-bytes` of 1.5 MiB (1 572 864 bytes), so that a key or a
    /// value that etcd refuses is refused here too (a test of `locker-etcd` checks they are equal):
    ///
    /// - `max_key_len` = (16 384 − 512) / 7 − 7 − 17 = 2 267 − 24 = **2 243** bytes: of each
    ///   request, 16 KiB are kept for keys and 512 bytes of those for the request's own overhead;
    ///   the join transaction carries the key 7 times (rounded down: 2 267 bytes per copy), and
    ///   each copy also holds the prefix `locker/` (7 bytes) and `/<lease hex>` (at most 17);
    /// - `max_value_len` = 1 572 864 − 16 384 = **1 556 480** bytes: the request less the 16 KiB
    ///   kept for keys;
    /// - `min_ttl` = **2 s**, etcd's minimum lease TTL with its default election timeout (1 s × 3/2,
    ///   rounded up);
    /// - `max_ttl` = **9 000 000 000 s**, etcd's `MaxLeaseTTL`.
    pub const DEFAULT_LIMITS: Limits = Limits {
        max_key_len: (ETCD_KEY_BUDGET - ETCD_REQUEST_OVERHEAD) / ETCD_KEY_COPIES
            - ETCD_DEFAULT_PREFIX_LEN
            - ENTRY_SUFFIX,
        max_value_len: ETCD_MAX_REQUEST_BYTES - ETCD_KEY_BUDGET,
        min_ttl: Duration::from_secs(2),
        max_ttl: Duration::from_secs(9_000_000_000),
    };

    /// A fresh, empty store with [`DEFAULT_LIMITS`](MemoryBackend::DEFAULT_LIMITS), and its first
    /// client.
    pub fn new() -> MemoryBackend {
        MemoryBackend::builder().build()
    }

    /// A builder, to set the store's [`Limits`].
    pub fn builder() -> MemoryBackendBuilder {
        MemoryBackendBuilder::default()
    }

    fn with_store(store: Arc<Store>) -> MemoryBackend {
        let client = store.state().next_client_id();
        debug!(client, "memory store: new client");
        MemoryBackend {
            store,
            faults: Faults::new(client),
        }
    }

    /// Another client of the same store, with its own fault switches (all off): another process
    /// on the same cluster.
    pub fn new_client(&self) -> MemoryBackend {
        MemoryBackend::with_store(Arc::clone(&self.store))
    }

    /// The fault switches of this client (shared with its clones).
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Operator: drops the history before `revision`; watches from a revision older than it then
    /// get [`Error::Compacted`] (watching from `revision` itself still works, as with etcd).
    ///
    /// # Errors
    ///
    /// As etcd: [`Error::Backend`] (not retryable) if `revision` is after the current revision;
    /// [`Error::Compacted`] if it is not after the current compaction revision.
    pub fn compact(&self, revision: Revision) -> Result<()> {
        self.store.state().compact(revision)
    }

    /// Operator: the store's current revision (that of its last write; 1 when nothing was ever
    /// written).
    pub fn current_revision(&self) -> Revision {
        self.store.state().revision()
    }

    /// Operator: the store's compaction revision (0 before any [`compact`](MemoryBackend::compact)).
    pub fn compact_revision(&self) -> Revision {
        self.store.state().compact_revision()
    }

    /// Operator: a plain delete of `key` (etcdctl del), at a new revision. Answers whether the key
    /// existed; deleting a missing key makes no revision.
    pub fn delete_key(&self, key: &str) -> bool {
        self.store
            .state()
            .delete_keys(vec![key.to_owned()])
            .is_some()
    }

    /// Operator: ends `lease` now, exactly as if its TTL had run out (its keys are deleted at one
    /// revision, and [`lease_expired_at`](MemoryBackend::lease_expired_at) records now). Answers
    /// whether the lease was live.
    pub fn expire_lease(&self, lease: LeaseId) -> bool {
        let now = Instant::now();
        let expired = self.store.state().expire(lease, now);
        debug!(
            lease = format_args!("{lease:x}"),
            expired, "memory store: lease expired by operator"
        );
        expired
    }

    /// Operator: every key in the store, in key order (for leak checks).
    pub fn keys(&self) -> Vec<Entry> {
        self.store.state().keys()
    }

    /// Operator: every live lease, in id order.
    pub fn leases(&self) -> Vec<LeaseId> {
        self.store.state().leases()
    }

    /// Operator: when the store expired `lease`, by its TTL running out (the deadline itself) or
    /// by [`expire_lease`](MemoryBackend::expire_lease) (the instant of the call); `None` if it
    /// is live, was revoked, or never existed.
    pub fn lease_expired_at(&self, lease: LeaseId) -> Option<Instant> {
        self.store.state().lease_expired_at(lease)
    }
}

#[cfg(test)]
impl MemoryBackend {
    pub(crate) fn watch_count(&self) -> usize {
        self.store.state().watch_count()
    }
}

/// Unregisters a watch from the store when its stream is dropped.
struct Registered {
    store: Weak<Store>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            store.unregister(self.id);
        }
    }
}

/// The state of a live watch stream.
struct Live {
    batches: mpsc::UnboundedReceiver<Vec<WatchEvent>>,
    faults: Faults,
    partition: watch::Receiver<PartitionState>,
    fail_epoch: u64,
    _registered: Registered,
}

impl Live {
    /// The next item, and whether the stream goes on after it.
    async fn next(&mut self) -> (Result<Vec<WatchEvent>>, bool) {
        loop {
            let state = *self.partition.borrow_and_update();
            if state.fail_epoch != self.fail_epoch || state.mode == Some(PartitionMode::Fail) {
                debug!(
                    client = self.faults.inner.client,
                    "memory store: watch stream cut by a partition"
                );
                return (
                    Err(self.faults.unavailable("partitioned", "watch stream")),
                    false,
                );
            }
            if state.mode == Some(PartitionMode::Hang) {
                if self.partition.changed().await.is_err() {
                    return (
                        Err(self.faults.unavailable("client gone", "watch stream")),
                        false,
                    );
                }
                continue;
            }
            tokio::select! {
                biased;
                changed = self.partition.changed() => {
                    if changed.is_err() {
                        return (Err(self.faults.unavailable("client gone", "watch stream")), false);
                    }
                }
                batch = self.batches.recv() => {
                    return match batch {
                        Some(batch) => (Ok(batch), true),
                        None => (Err(self.faults.unavailable("store dropped", "watch stream")), false),
                    };
                }
            }
        }
    }
}

#[async_trait]
impl Watcher for MemoryBackend {
    /// # Behavior
    ///
    /// - Delivers every put and delete of a key starting with `prefix` at a revision
    ///   `>= from_revision`, one `Vec` per revision, in order: first the history (replayed and
    ///   registered under the store's one lock, so there is no gap), then live changes through an
    ///   unbounded channel (the store never waits for a slow reader).
    /// - `None`, `Some(0)` or a negative revision start at the current revision + 1; a future
    ///   revision is allowed (nothing is delivered before it).
    /// - A put event carries the whole entry; a delete event carries `key` and `mod_revision` (the
    ///   delete's revision), with an empty value, lease 0 and create revision 0 (etcd without
    ///   `prev_kv`).
    /// - A `from_revision` older than the [compaction revision](MemoryBackend::compact) gives a
    ///   stream whose **first and only item** is [`Error::Compacted`] (as etcd: the watch is
    ///   created, then cancelled); the call itself succeeds.
    /// - Faults: the call is a call (latency, partition, `fail_next`); the stream of a client
    ///   partitioned with [`PartitionMode::Fail`] ends with [`Error::Unavailable`]; with
    ///   [`PartitionMode::Hang`] it delivers nothing until healed, then all it missed, in order.
    /// - If every handle on the store is dropped, the stream ends with [`Error::Unavailable`].
    /// - Dropping the stream unregisters the watch.
    async fn watch(&self, prefix: &str, from_revision: Option<Revision>) -> Result<WatchStream> {
        self.faults.gate("watch").await?;
        let partition = self.faults.subscribe();
        let fail_epoch = partition.borrow().fail_epoch;
        let (tx, batches) = mpsc::unbounded_channel();
        let registered = self.store.state().watch(prefix, from_revision, tx);
        let (start_revision, id) = match registered {
            Ok(started) => started,
            Err(error @ Error::Compacted { requested, .. }) => {
                debug!(
                    prefix,
                    requested, "memory store: watch from a compacted revision"
                );
                return Ok(WatchStream {
                    start_revision: requested,
                    events: futures::stream::once(async move { Err(error) }).boxed(),
                });
            }
            Err(error) => return Err(error),
        };
        let live = Live {
            batches,
            faults: self.faults.clone(),
            partition,
            fail_epoch,
            _registered: Registered {
                store: Arc::downgrade(&self.store),
                id,
            },
        };
        let events = futures::stream::unfold(Some(live), |live| async move {
            let mut live = live?;
            let (item, more) = live.next().await;
            Some((item, more.then_some(live)))
        })
        .boxed();
        Ok(WatchStream {
            start_revision,
            events,
        })
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn limits(&self) -> Limits {
        self.store.limits
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        self.faults.gate("grant_lease").await?;
        self.store.grant(ttl)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>> {
        self.faults.gate("keep_alive").await?;
        Ok(self.store.state().keep_alive(lease, Instant::now()))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.faults.gate("revoke_lease").await?;
        self.store.state().revoke(lease);
        Ok(())
    }

    async fn join(&self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined> {
        self.faults.gate("join").await?;
        self.store.state().join(key, lease, value)
    }

    async fn position(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
    ) -> Result<Position> {
        self.faults.gate("position").await?;
        Ok(self.store.state().position(key, entry_key, create_revision))
    }

    async fn holder(&self, key: &str) -> Result<(Option<Entry>, Revision)> {
        self.faults.gate("holder").await?;
        Ok(self.store.state().holder(key))
    }

    async fn entries(&self, key: &str) -> Result<Snapshot> {
        self.faults.gate("entries").await?;
        Ok(self.store.state().entries(key))
    }

    async fn delete_entry(&self, entry_key: &str, create_revision: Revision) -> Result<bool> {
        self.faults.gate("delete_entry").await?;
        Ok(self.store.state().delete_entry(entry_key, create_revision))
    }

    async fn update_value(
        &self,
        entry_key: &str,
        create_revision: Revision,
        value: &[u8],
    ) -> Result<Option<Revision>> {
        self.faults.gate("update_value").await?;
        self.store
            .state()
            .update_value(entry_key, create_revision, value)
    }

    async fn resume(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
        mod_revision: Revision,
        value: &[u8],
    ) -> Result<Resumption> {
        self.faults.gate("resume").await?;
        self.store
            .state()
            .resume(key, entry_key, create_revision, mod_revision, value)
    }
}
