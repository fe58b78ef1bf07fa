//! What both examples share: picking the store (memory by default, etcd when
//! `LOCKER_ETCD_ENDPOINTS` is set) and printing a timeline.

use std::sync::Arc;
use std::time::Duration;

use locker_core::{LockBackend, Locker};
use locker_etcd::EtcdBackend;
use locker_memory::MemoryBackend;
use tokio::time::Instant;

/// Where the example's "processes" keep their locks.
pub(crate) enum Store {
    /// One in-process store; each process is a client of it.
    Memory(MemoryBackend),
    /// A real etcd cluster; each process connects on its own.
    Etcd(Vec<String>),
}

impl Store {
    /// Memory, unless `LOCKER_ETCD_ENDPOINTS` names an etcd cluster (comma-separated).
    pub(crate) fn from_env() -> Store {
        match std::env::var("LOCKER_ETCD_ENDPOINTS") {
            Ok(list) if !list.trim().is_empty() => {
                Store::Etcd(list.split(',').map(|s| s.trim().to_owned()).collect())
            }
            _ => Store::Memory(MemoryBackend::new()),
        }
    }

    /// A description for the first line of the timeline.
    pub(crate) fn describe(&self) -> String {
        match self {
            Store::Memory(_) => "the in-process memory backend".to_owned(),
            Store::Etcd(endpoints) => {
                format!("etcd at {} (keys under locker/)", endpoints.join(","))
            }
        }
    }

    /// A locker for one process, with a short TTL so that take-overs are quick to watch.
    pub(crate) async fn process(&self, ttl: Duration) -> Result<Locker, locker_core::Error> {
        let backend: Arc<dyn LockBackend> = match self {
            Store::Memory(store) => Arc::new(store.new_client()),
            Store::Etcd(endpoints) => Arc::new(
                EtcdBackend::builder()
                    .endpoints(endpoints.clone())
                    .connect()
                    .await?,
            ),
        };
        Locker::builder_arc(backend).ttl(ttl).build()
    }
}

/// Prints timeline lines with the time since the start.
#[derive(Clone, Copy)]
pub(crate) struct Timeline(Instant);

impl Timeline {
    pub(crate) fn start() -> Self {
        Timeline(Instant::now())
    }

    pub(crate) fn say(&self, who: &str, what: impl std::fmt::Display) {
        let t = self.0.elapsed();
        println!(
            "[{:>5}.{:03}s] {who:<10} {what}",
            t.as_secs(),
            t.subsec_millis()
        );
    }
}
