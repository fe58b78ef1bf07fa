//! A backend wrapper that counts the calls core makes, so the bench can say which round trips an
//! operation costs (and how many keep-alives a session sends while holding many locks).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use locker_core::Result;
use locker_core::backend::{
    Entry, Joined, Lease, LeaseId, Limits, LockBackend, Position, Revision, Snapshot, WatchStream,
    Watcher,
};

/// The methods of the backend contract, in the order they are reported.
pub(crate) const METHODS: [&str; 10] = [
    "grant_lease",
    "keep_alive",
    "revoke_lease",
    "join",
    "position",
    "holder",
    "entries",
    "delete_entry",
    "update_value",
    "watch",
];

/// Call counters, one per method of [`METHODS`].
#[derive(Debug, Default)]
pub(crate) struct Counts {
    calls: [AtomicU64; 10],
}

/// A snapshot of [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Calls(pub(crate) [u64; 10]);

impl Counts {
    fn bump(&self, method: usize) {
        self.calls[method].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Calls {
        Calls(std::array::from_fn(|i| {
            self.calls[i].load(Ordering::Relaxed)
        }))
    }
}

impl Calls {
    /// The calls made since `earlier`.
    pub(crate) fn since(self, earlier: Calls) -> Calls {
        Calls(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }

    pub(crate) fn get(self, method: &str) -> u64 {
        METHODS
            .iter()
            .position(|m| *m == method)
            .map_or(0, |i| self.0[i])
    }

    pub(crate) fn total(self) -> u64 {
        self.0.iter().sum()
    }

    /// `join 1.00, delete_entry 1.00` per `ops` operations (methods never called are left out).
    pub(crate) fn per_op(self, ops: usize) -> String {
        let ops = ops.max(1) as f64;
        let parts: Vec<String> = METHODS
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(m, n)| format!("{m} {:.2}", n as f64 / ops))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

impl fmt::Display for Calls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.per_op(1))
    }
}

/// Delegates every call to `inner`, counting it.
#[derive(Debug)]
pub(crate) struct CountingBackend {
    inner: Arc<dyn LockBackend>,
    counts: Arc<Counts>,
}

impl CountingBackend {
    pub(crate) fn new(inner: Arc<dyn LockBackend>) -> (Self, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        (
            CountingBackend {
                inner,
                counts: counts.clone(),
            },
            counts,
        )
    }
}

#[async_trait]
impl Watcher for CountingBackend {
    async fn watch(&self, prefix: &str, from_revision: Option<Revision>) -> Result<WatchStream> {
        self.counts.bump(9);
        self.inner.watch(prefix, from_revision).await
    }
}

#[async_trait]
impl LockBackend for CountingBackend {
    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        self.counts.bump(0);
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>> {
        self.counts.bump(1);
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.counts.bump(2);
        self.inner.revoke_lease(lease).await
    }

    async fn join(&self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined> {
        self.counts.bump(3);
        self.inner.join(key, lease, value).await
    }

    async fn position(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
    ) -> Result<Position> {
        self.counts.bump(4);
        self.inner.position(key, entry_key, create_revision).await
    }

    async fn holder(&self, key: &str) -> Result<(Option<Entry>, Revision)> {
        self.counts.bump(5);
        self.inner.holder(key).await
    }

    async fn entries(&self, key: &str) -> Result<Snapshot> {
        self.counts.bump(6);
        self.inner.entries(key).await
    }

    async fn delete_entry(&self, entry_key: &str, create_revision: Revision) -> Result<bool> {
        self.counts.bump(7);
        self.inner.delete_entry(entry_key, create_revision).await
    }

    async fn update_value(
        &self,
        entry_key: &str,
        create_revision: Revision,
        value: &[u8],
    ) -> Result<bool> {
        self.counts.bump(8);
        self.inner
            .update_value(entry_key, create_revision, value)
            .await
    }
}
