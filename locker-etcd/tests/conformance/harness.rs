//! The conformance harness of the etcd backend: one real etcd shared by the test binary, a key
//! prefix of its own per test, and a TCP [`Proxy`] per client for faults.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{CompactionOptions, GetOptions, SortOrder, SortTarget};
use locker_core::backend::{Entry, LeaseId, is_entry_of};
use locker_etcd::EtcdBackend;
use tokio::sync::{Mutex, RwLock};

use locker_etcd::testing::{EtcdServer, LinkState, Proxy, unique_prefix};
use locker_tests::{
    Client, ClientFaults, Cut, Harness, HistoryClaim, HistoryUse, LeaseLog, RecordingBackend,
};

/// The history of the etcd shared by the tests of this process (`EtcdServer::shared`): compaction is
/// store-wide, so tests that read or watch from past revisions hold this for reading, and tests
/// that compact hold it for writing (see [`Harness::use_history`]).
static SHARED_HISTORY: RwLock<()> = RwLock::const_new(());

/// A harness over an etcd (the one shared by the tests of this binary, unless told otherwise), for
/// one test: everything it makes lives under its own prefix.
pub(crate) struct EtcdHarness {
    endpoints: Vec<String>,
    /// Where the etcd comes from, for messages.
    describe: String,
    prefix: String,
    admin: Mutex<etcd_client::Client>,
    granted: LeaseLog,
    history: HistoryClaim,
}

impl std::fmt::Debug for EtcdHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdHarness")
            .field("etcd", &self.describe)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EtcdHarness {
    /// A harness for the test `name` on the shared etcd (started on first use).
    ///
    /// # Panics
    ///
    /// If no etcd can be found; the message says how to get one.
    pub(crate) async fn new(name: &str) -> Self {
        let etcd = EtcdServer::shared().await.unwrap_or_else(|e| panic!("{e}"));
        EtcdHarness::on(name, etcd.endpoints(), etcd.describe()).await
    }

    /// A harness for the test `name` on the etcd at `endpoints` (`describe` says which, for
    /// messages).
    pub(crate) async fn on(name: &str, endpoints: Vec<String>, describe: String) -> Self {
        locker_tests::init_logging();
        let admin = etcd_client::Client::connect(endpoints.clone(), None)
            .await
            .expect("an etcd client");
        EtcdHarness {
            endpoints,
            describe,
            prefix: format!("locker-test/{}", unique_prefix(name)),
            admin: Mutex::new(admin),
            granted: LeaseLog::default(),
            history: HistoryClaim::shared_store(&SHARED_HISTORY),
        }
    }

    /// The endpoints of the etcd under test.
    pub(crate) fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The full etcd key of the lock `key` (what `etcdctl lock`/`elect` would be given).
    pub(crate) fn etcd_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// An etcd client for what locker does not do (raw reads, compaction, leases).
    pub(crate) async fn admin(&self) -> etcd_client::Client {
        self.admin.lock().await.clone()
    }

    async fn upstream(&self) -> SocketAddr {
        let endpoint = self.endpoints[0].clone();
        let host = endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        let mut addrs = tokio::net::lookup_host(host.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot resolve etcd endpoint {endpoint}: {e}"));
        addrs
            .next()
            .unwrap_or_else(|| panic!("etcd endpoint {endpoint} resolves to nothing"))
    }
}

struct ProxyFaults(Proxy);

#[async_trait]
impl ClientFaults for ProxyFaults {
    async fn cut(&self, how: Cut) {
        self.0.set(match how {
            Cut::Fail => LinkState::Cut,
            Cut::Hang => LinkState::BlackHole,
        });
    }

    async fn heal(&self) {
        self.0.set(LinkState::Up);
    }

    async fn set_latency(&self, latency: Duration) {
        self.0.set_latency(latency);
    }
}

#[async_trait]
impl Harness for EtcdHarness {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn key(&self, name: &str) -> String {
        name.to_owned()
    }

    async fn client(&self) -> Client {
        let proxy = Proxy::start(self.upstream().await)
            .await
            .expect("start a proxy on loopback");
        let backend = EtcdBackend::builder()
            .endpoints([proxy.endpoint()])
            .prefix(self.prefix.clone())
            .request_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect through the proxy to {}: {e}", self.describe));
        Client {
            backend: Arc::new(RecordingBackend::new(
                Arc::new(backend),
                self.granted.clone(),
            )),
            faults: Arc::new(ProxyFaults(proxy)),
        }
    }

    fn virtual_time(&self) -> bool {
        false
    }

    async fn entries(&self, key: &str) -> Vec<Entry> {
        let queue = self.etcd_key(key);
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let response = self
            .admin()
            .await
            .get(format!("{queue}/"), Some(options))
            .await
            .expect("list entries");
        response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let full = kv.key_str().ok()?;
                if !is_entry_of(full, &queue) {
                    return None;
                }
                Some(Entry {
                    key: full.strip_prefix(&self.prefix)?.to_owned(),
                    value: kv.value().to_vec(),
                    lease: kv.lease(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                })
            })
            .collect()
    }

    async fn lease_exists(&self, lease: LeaseId) -> bool {
        match self.admin().await.lease_time_to_live(lease, None).await {
            Ok(response) => response.ttl() > 0,
            Err(_) => false,
        }
    }

    async fn expire_lease(&self, lease: LeaseId) {
        // etcd cannot be told to expire a lease; revoking it has the same effect on the store.
        let _ = self.admin().await.lease_revoke(lease).await;
    }

    async fn delete_key(&self, key: &str) {
        self.admin()
            .await
            .delete(self.etcd_key(key), None)
            .await
            .expect("delete");
    }

    async fn use_history(&self, how: HistoryUse) {
        self.history.claim(how).await;
    }

    async fn compact(&self) {
        self.history.assert_may_compact();
        let mut admin = self.admin().await;
        let revision = admin
            .get(self.prefix.clone(), None)
            .await
            .expect("read the revision")
            .header()
            .expect("a header")
            .revision();
        admin
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .expect("compact");
    }

    fn granted_leases(&self) -> Vec<LeaseId> {
        self.granted.all()
    }

    async fn leftovers(&self, leases: &[LeaseId]) -> Vec<String> {
        let response = self
            .admin()
            .await
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .expect("list the prefix");
        let mut left: Vec<String> = response
            .kvs()
            .iter()
            .map(|kv| format!("key {}", String::from_utf8_lossy(kv.key())))
            .collect();
        for &lease in leases {
            if self.lease_exists(lease).await {
                left.push(format!("lease {lease:x}"));
            }
        }
        left
    }
}
