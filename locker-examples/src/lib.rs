//! What both examples share: picking the store (memory by default, etcd when
//! `LOCKER_ETCD_ENDPOINTS` is set) and printing a timeline.
//!
//! The examples themselves are in `examples/`: `name_server.rs` and `health_mesh.rs`. This package
//! is not published: it is the examples' support code, not a library to depend on.

use std::sync::Arc;
use std::time::Duration;

use locker_core::{LockBackend, Locker};
use locker_etcd::EtcdBackend;
use locker_memory::MemoryBackend;
use tokio::time::Instant;

/// Where the example's "processes" keep their locks.
pub enum Store {
    /// One in-process store; each process is a client of it.
    Memory(MemoryBackend),
    /// A real etcd cluster; each process connects on its own.
    Etcd(Vec<String>),
}

impl Store {
    /// Memory, unless `LOCKER_ETCD_ENDPOINTS` names an etcd cluster (comma-separated).
    pub fn from_env() -> Store {
        match std::env::var("LOCKER_ETCD_ENDPOINTS") {
            Ok(list) if !list.trim().is_empty() => {
                Store::Etcd(list.split(',').map(|s| s.trim().to_owned()).collect())
            }
            _ => Store::Memory(MemoryBackend::new()),
        }
    }

    /// A description for the first line of the timeline.
    pub fn describe(&self) -> String {
        match self {
            Store::Memory(_) => "the in-process memory backend".to_owned(),
            Store::Etcd(endpoints) => {
                format!("etcd at {} (keys under locker/)", endpoints.join(","))
            }
        }
    }

    /// A locker for one process, with a short TTL so that take-overs are quick to watch.
    ///
    /// # Errors
    ///
    /// When etcd cannot be reached, or `ttl` is out of range.
    pub async fn process(&self, ttl: Duration) -> Result<Locker, locker_core::Error> {
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
pub struct Timeline(Instant);

impl Timeline {
    /// Starts the clock.
    pub fn start() -> Self {
        Timeline(Instant::now())
    }

    /// Prints what `who` did or saw, after the time since the start.
    pub fn say(&self, who: &str, what: impl std::fmt::Display) {
        let t = self.0.elapsed();
        println!(
            "[{:>5}.{:03}s] {who:<10} {what}",
            t.as_secs(),
            t.subsec_millis()
        );
    }
}
