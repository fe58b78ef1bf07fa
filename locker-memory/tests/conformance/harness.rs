//! The conformance harness of the memory backend: virtual time, in-process faults.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::backend::{Entry, LeaseId, is_entry_of};
use locker_memory::{Faults, MemoryBackend, PartitionMode};

use locker_tests::{
    Client, ClientFaults, Cut, Harness, HistoryClaim, HistoryUse, LeaseLog, RecordingBackend,
};

/// A harness over one [`MemoryBackend`] store, for one test.
#[derive(Debug)]
pub(crate) struct MemoryHarness {
    store: MemoryBackend,
    prefix: String,
    granted: LeaseLog,
    history: HistoryClaim,
}

impl MemoryHarness {
    /// A fresh store for the test `name`.
    pub(crate) fn new(name: &str) -> Self {
        locker_tests::init_logging();
        MemoryHarness {
            store: MemoryBackend::new(),
            prefix: format!("{name}/"),
            granted: LeaseLog::default(),
            // Each test has a store of its own: its history is nobody else's.
            history: HistoryClaim::own_store(),
        }
    }
}

struct MemoryFaults(Faults);

#[async_trait]
impl ClientFaults for MemoryFaults {
    async fn cut(&self, how: Cut) {
        self.0.partition(match how {
            Cut::Fail => PartitionMode::Fail,
            Cut::Hang => PartitionMode::Hang,
        });
    }

    async fn heal(&self) {
        self.0.heal();
    }

    async fn set_latency(&self, latency: Duration) {
        self.0.set_latency(latency);
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    async fn client(&self) -> Client {
        let backend = self.store.new_client();
        Client {
            faults: Arc::new(MemoryFaults(backend.faults())),
            backend: Arc::new(RecordingBackend::new(
                Arc::new(backend),
                self.granted.clone(),
            )),
        }
    }

    fn virtual_time(&self) -> bool {
        true
    }

    async fn entries(&self, key: &str) -> Vec<Entry> {
        let mut entries: Vec<Entry> = self
            .store
            .keys()
            .into_iter()
            .filter(|e| is_entry_of(&e.key, key))
            .collect();
        entries.sort_by_key(|e| e.create_revision);
        entries
    }

    async fn lease_exists(&self, lease: LeaseId) -> bool {
        self.store.leases().contains(&lease)
    }

    async fn expire_lease(&self, lease: LeaseId) {
        self.store.expire_lease(lease);
    }

    async fn delete_key(&self, key: &str) {
        self.store.delete_key(key);
    }

    async fn use_history(&self, how: HistoryUse) {
        self.history.claim(how).await;
    }

    async fn compact(&self) {
        self.history.assert_may_compact();
        self.store
            .compact(self.store.current_revision())
            .expect("compact at the current revision");
    }

    fn granted_leases(&self) -> Vec<LeaseId> {
        self.granted.all()
    }

    /// The store is the test's own: every key in it is the test's, under its prefix or not.
    async fn leftovers(&self, leases: &[LeaseId]) -> Vec<String> {
        let mut left: Vec<String> = self
            .store
            .keys()
            .into_iter()
            .map(|e| format!("key {}", e.key))
            .collect();
        let live = self.store.leases();
        left.extend(
            leases
                .iter()
                .filter(|l| live.contains(l))
                .map(|l| format!("lease {l:x}")),
        );
        left
    }
}
