//! What the examples of locker share: picking the store (the in-process memory backend by
//! default, etcd when `LOCKER_ETCD_ENDPOINTS` is set and the `etcd` feature is on) and printing a
//! timeline.
//!
//! The examples themselves are in `examples/`: `name_server.rs` and `health_mesh.rs`. Run them
//! from the repository root:
//!
//! ```text
//! cargo run --example name_server                       # on the in-process memory backend
//! LOCKER_ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo run --features etcd --example name_server
//! ```
//!
//! The second runs on a real etcd (3.4 or later): the `etcd` feature builds etcd-client, whose
//! build script needs `protoc`. Without the feature, a set `LOCKER_ETCD_ENDPOINTS` is an error
//! that says how to turn it on, never a silent run on memory.
//!
//! This package is not published: it is the examples' support code, not a library to depend on.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use locker_core::{LockBackend, Locker};
#[cfg(feature = "etcd")]
use locker_etcd::EtcdBackend;
use locker_memory::MemoryBackend;
use tokio::time::Instant;

/// The environment variable naming an etcd cluster to run the examples on (comma-separated
/// endpoints, e.g. `http://127.0.0.1:2379`).
pub const ENDPOINTS_VAR: &str = "LOCKER_ETCD_ENDPOINTS";

/// Where the example's "processes" keep their locks.
pub enum Store {
    /// One in-process store; each process is a client of it.
    Memory(MemoryBackend),
    /// A real etcd cluster; each process connects on its own.
    #[cfg(feature = "etcd")]
    Etcd(Vec<String>),
}

impl Store {
    /// Memory, unless `LOCKER_ETCD_ENDPOINTS` names an etcd cluster (comma-separated).
    ///
    /// # Errors
    ///
    /// [`NoEtcdSupport`] when `LOCKER_ETCD_ENDPOINTS` is set but the examples were built without
    /// the `etcd` feature: running on memory instead would pass silently for a run on etcd.
    pub fn from_env() -> Result<Store, NoEtcdSupport> {
        match std::env::var(ENDPOINTS_VAR) {
            Ok(list) if !list.trim().is_empty() => Store::etcd(&list),
            _ => Ok(Store::Memory(MemoryBackend::new())),
        }
    }

    #[cfg(feature = "etcd")]
    fn etcd(list: &str) -> Result<Store, NoEtcdSupport> {
        Ok(Store::Etcd(
            list.split(',').map(|s| s.trim().to_owned()).collect(),
        ))
    }

    #[cfg(not(feature = "etcd"))]
    fn etcd(list: &str) -> Result<Store, NoEtcdSupport> {
        Err(NoEtcdSupport {
            endpoints: list.trim().to_owned(),
        })
    }

    /// A description for the first line of the timeline.
    pub fn describe(&self) -> String {
        match self {
            Store::Memory(_) => "the in-process memory backend".to_owned(),
            #[cfg(feature = "etcd")]
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
            #[cfg(feature = "etcd")]
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

/// `LOCKER_ETCD_ENDPOINTS` is set, but the examples were built without the `etcd` feature.
///
/// Its `Debug` is its message, so that a `main` returning it prints the message as it is.
pub struct NoEtcdSupport {
    endpoints: String,
}

impl fmt::Display for NoEtcdSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let example = std::env::args_os()
            .next()
            .and_then(|path| {
                std::path::Path::new(&path)
                    .file_stem()
                    .map(|name| name.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "<example>".to_owned());
        write!(
            f,
            "{ENDPOINTS_VAR} is set ({endpoints}), but this example was built without etcd \
             support.\nTurn it on with the `etcd` feature of locker-examples, from the repository \
             root:\n\n    {ENDPOINTS_VAR}={endpoints} cargo run --features etcd --example \
             {example}\n\nor unset {ENDPOINTS_VAR} to run on the in-process memory \
             backend.",
            endpoints = self.endpoints,
        )
    }
}

impl fmt::Debug for NoEtcdSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for NoEtcdSupport {}

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
