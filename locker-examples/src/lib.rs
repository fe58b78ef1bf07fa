//! What the examples of locker share: picking the store (the in-process memory backend by
//! default, etcd when `LOCKER_ETCD_ENDPOINTS` is set and the `etcd` feature is on), printing a
//! timeline, and hearing what the example's watchers report.
//!
//! The examples themselves are in `examples/`: `name_server.rs`, `health_mesh.rs` and
//! `leader_worker.rs`. Run them from the repository root:
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
//! Each example is an `async fn run(store, timeline)` that tells everything that happens on the
//! [`Timeline`], and a `main` of two lines; the tests (`tests/examples.rs`) call `run` on the
//! memory backend, on tokio's paused clock, and check the timeline it told.
//!
//! This package is not published: it is the examples' support code, not a library to depend on.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use locker_core::{LockBackend, Locker};
#[cfg(feature = "etcd")]
use locker_etcd::EtcdBackend;
use locker_memory::MemoryBackend;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The environment variable naming an etcd cluster to run the examples on (comma-separated
/// endpoints, e.g. `http://127.0.0.1:2379`).
pub const ENDPOINTS_VAR: &str = "LOCKER_ETCD_ENDPOINTS";

/// How long an example waits for a reaction before it gives up with an error.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Where the example's "processes" keep their locks.
pub enum Store {
    /// One in-process store; each process is a client of it.
    Memory(MemoryBackend),
    /// A real etcd cluster; each process connects on its own.
    #[cfg(feature = "etcd")]
    Etcd {
        /// The cluster's client endpoints.
        endpoints: Vec<String>,
        /// The prefix of every key (`locker/` unless set).
        prefix: String,
    },
}

impl Store {
    /// A fresh in-process store.
    pub fn memory() -> Store {
        Store::Memory(MemoryBackend::new())
    }

    /// Memory, unless `LOCKER_ETCD_ENDPOINTS` names an etcd cluster (comma-separated).
    ///
    /// # Errors
    ///
    /// [`NoEtcdSupport`] when `LOCKER_ETCD_ENDPOINTS` is set but the examples were built without
    /// the `etcd` feature: a run on memory instead would pass for a run on etcd.
    pub fn from_env() -> Result<Store, NoEtcdSupport> {
        Store::from_endpoints(std::env::var(ENDPOINTS_VAR).ok().as_deref())
    }

    /// Memory when `endpoints` is `None` or blank, else etcd at those comma-separated endpoints.
    ///
    /// # Errors
    ///
    /// [`NoEtcdSupport`] for endpoints when the examples were built without the `etcd` feature.
    pub fn from_endpoints(endpoints: Option<&str>) -> Result<Store, NoEtcdSupport> {
        match endpoints.map(str::trim) {
            None | Some("") => Ok(Store::memory()),
            #[cfg(feature = "etcd")]
            Some(list) => Ok(Store::Etcd {
                endpoints: list.split(',').map(|s| s.trim().to_owned()).collect(),
                prefix: locker_etcd::DEFAULT_PREFIX.to_owned(),
            }),
            #[cfg(not(feature = "etcd"))]
            Some(list) => Err(NoEtcdSupport::new(list)),
        }
    }

    /// A description for the first line of the timeline.
    pub fn describe(&self) -> String {
        match self {
            Store::Memory(_) => "the in-process memory backend".to_owned(),
            #[cfg(feature = "etcd")]
            Store::Etcd { endpoints, prefix } => {
                format!("etcd at {} (keys under {prefix})", endpoints.join(","))
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
            Store::Etcd { endpoints, prefix } => Arc::new(
                EtcdBackend::builder()
                    .endpoints(endpoints.clone())
                    .prefix(prefix.clone())
                    .connect()
                    .await?,
            ),
        };
        Locker::builder(backend).ttl(ttl).build()
    }
}

/// `LOCKER_ETCD_ENDPOINTS` is set, but the examples were built without the `etcd` feature.
///
/// Its `Debug` is its message, so that a `main` returning it prints the message as it is.
pub struct NoEtcdSupport {
    endpoints: String,
    example: String,
}

impl NoEtcdSupport {
    #[cfg_attr(feature = "etcd", allow(dead_code))]
    fn new(endpoints: &str) -> Self {
        // The running example's name, for the command to type: cargo names its binary after it.
        let example = std::env::args_os()
            .next()
            .and_then(|path| {
                let name = std::path::Path::new(&path).file_stem()?;
                Some(name.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "<example>".to_owned());
        NoEtcdSupport {
            endpoints: endpoints.to_owned(),
            example,
        }
    }
}

impl fmt::Display for NoEtcdSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let NoEtcdSupport { endpoints, example } = self;
        write!(
            f,
            "{ENDPOINTS_VAR} is set ({endpoints}), but this example was built without etcd \
             support.\nTurn it on with the `etcd` feature of locker-examples, from the repository \
             root:\n\n    {ENDPOINTS_VAR}={endpoints} cargo run --features etcd --example \
             {example}\n\nor unset {ENDPOINTS_VAR} to run on the in-process memory backend.",
        )
    }
}

impl fmt::Debug for NoEtcdSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for NoEtcdSupport {}

/// The story of a run, told as it happens: each line is printed with the time since the start
/// (tokio's clock: on a paused clock, the virtual time), and kept for [`Timeline::lines`].
///
/// Clones tell the same story, so a spawned watcher can take one.
#[derive(Clone)]
pub struct Timeline {
    start: Instant,
    lines: Arc<Mutex<Vec<Line>>>,
}

/// One line of a [`Timeline`]: who did or saw what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Who: `host-a`, `resolver`, `service-c`, ...
    pub who: String,
    /// What, e.g. `owns www.example.com with 10.1.1.1 (token 2)`.
    pub what: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<10} {}", self.who, self.what)
    }
}

impl Timeline {
    /// Starts the clock.
    pub fn start() -> Self {
        Timeline {
            start: Instant::now(),
            lines: Arc::default(),
        }
    }

    /// Prints what `who` did or saw, after the time since the start.
    pub fn say(&self, who: &str, what: impl fmt::Display) {
        let t = self.start.elapsed();
        let line = Line {
            who: who.to_owned(),
            what: what.to_string(),
        };
        println!("[{:>5}.{:03}s] {line}", t.as_secs(), t.subsec_millis());
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }

    /// The lines said so far, in order, without their times.
    pub fn lines(&self) -> Vec<Line> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What an example's watchers report to its main flow.
pub struct Reports<T> {
    receiver: mpsc::UnboundedReceiver<T>,
}

impl<T> Reports<T> {
    /// The sender for the watchers, and the reports for the main flow. Dropping the reports
    /// closes the channel: the watchers can see it and stop.
    pub fn channel() -> (mpsc::UnboundedSender<T>, Reports<T>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (sender, Reports { receiver })
    }

    /// Waits (at most [`PATIENCE`]) for the next report.
    ///
    /// # Errors
    ///
    /// When no report comes in time, or every sender is gone.
    pub async fn next(&mut self) -> Result<T, String> {
        match tokio::time::timeout(PATIENCE, self.receiver.recv()).await {
            Ok(Some(report)) => Ok(report),
            Ok(None) => Err("the watchers stopped reporting".to_owned()),
            Err(_) => Err(format!("no report within {PATIENCE:?}")),
        }
    }

    /// Waits (at most [`PATIENCE`] in all) until a report is `want`, passing over the others.
    ///
    /// # Errors
    ///
    /// When `want` does not come in time, or every sender is gone.
    pub async fn wait_for(&mut self, want: &T) -> Result<(), String>
    where
        T: PartialEq + fmt::Debug,
    {
        let waited = tokio::time::timeout(PATIENCE, async {
            while self.next().await? != *want {}
            Ok(())
        });
        match waited.await {
            Ok(done) => done,
            Err(_) => Err(format!("no report of {want:?} within {PATIENCE:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_endpoints_are_the_memory_backend() {
        for endpoints in [None, Some(""), Some("  ")] {
            let store = Store::from_endpoints(endpoints).map(|s| s.describe());
            assert_eq!(store.ok().as_deref(), Some("the in-process memory backend"));
        }
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn endpoints_without_the_feature_say_how_to_turn_it_on() {
        let Err(err) = Store::from_endpoints(Some(" http://127.0.0.1:2379 ")) else {
            panic!("endpoints ran on memory although the etcd feature is off");
        };
        let message = format!("{err:?}");
        assert_eq!(message, err.to_string());
        assert!(message.contains("built without etcd support"), "{message}");
        assert!(
            message.contains(
                "LOCKER_ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo run --features etcd --example "
            ),
            "{message}"
        );
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn endpoints_with_the_feature_are_etcd() {
        let store = Store::from_endpoints(Some("http://a:2379, http://b:2379"));
        assert!(matches!(&store, Ok(Store::Etcd { endpoints, prefix })
                if endpoints == &["http://a:2379", "http://b:2379"] && prefix == "locker/"));
    }
}
