//! The chaos run with its safety checker (`locker_tests::chaos`) on a real three-node etcd
//! cluster: each client reaches every member through proxies of its own; faults kill, freeze and
//! restart members, cut, black-hole and slow clients, and compact the history.
//!
//! `LOCKER_CHAOS_SECS` sets how long it runs (default: a short run for CI), `LOCKER_CHAOS_SEED`
//! the seed of the fault schedule (the summary line names it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{FencingToken, Locker};
use locker_etcd::testing::{EtcdCluster, LinkState, Proxy, unique_prefix};
use locker_tests::LeaseLog;
use locker_tests::chaos::{Fault, Plan, World, client_locker, run};
use locker_tests::suite::eventually;

const SEED: u64 = 20261126;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_three_node_cluster() {
    locker_tests::init_logging();
    let plan = Plan::from_env(SEED, 20);
    let cluster = EtcdCluster::start(3).await.expect("a three-node cluster");
    let prefix = format!("locker-chaos/{}", unique_prefix("chaos"));
    let world = Arc::new(EtcdWorld::new(cluster, prefix.clone(), plan.ttl).await);
    let report = run(world.clone(), &plan).await;
    report.assert_safe();
    // Nothing leaks: no entry under the run's prefix, no lease of its clients.
    let admin = world.admin();
    eventually("the run's entries are gone", || {
        let (mut admin, prefix) = (admin.clone(), prefix.clone());
        async move {
            let options = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            admin
                .get(prefix, Some(options))
                .await
                .is_ok_and(|r| r.count() == 0)
        }
    })
    .await;
    for lease in world.granted_leases() {
        eventually(&format!("lease {lease:x} is gone"), || {
            let mut admin = admin.clone();
            async move {
                admin
                    .lease_time_to_live(lease, None)
                    .await
                    .is_ok_and(|t| t.ttl() <= 0)
            }
        })
        .await;
    }
    let options = etcd_client::DeleteOptions::new().with_prefix();
    admin
        .clone()
        .delete(format!("chaos-resource/{prefix}"), Some(options))
        .await
        .unwrap();
}

/// Per client: its proxies (one per member) and its granted leases.
type Links = BTreeMap<usize, (Vec<Arc<Proxy>>, LeaseLog)>;

/// A write the etcd resource accepted: (revision, client, token).
type AcceptedWrite = (i64, usize, FencingToken);

/// The chaos world of a real three-node etcd cluster: each client reaches every member through
/// proxies of its own; the resource is an etcd key written only by a transaction that compares
/// the fencing token.
struct EtcdWorld {
    cluster: tokio::sync::Mutex<EtcdCluster>,
    endpoints: Vec<String>,
    prefix: String,
    admin: etcd_client::Client,
    links: Mutex<Links>,
    /// Per key, the writes the resource accepted: (revision, client, token).
    accepted: Mutex<BTreeMap<String, Vec<AcceptedWrite>>>,
    ttl: Duration,
}

impl EtcdWorld {
    /// A world on `cluster`, with every key under `prefix`.
    async fn new(cluster: EtcdCluster, prefix: String, ttl: Duration) -> Self {
        let admin = cluster.client().await.expect("an etcd client");
        EtcdWorld {
            endpoints: cluster.endpoints(),
            cluster: tokio::sync::Mutex::new(cluster),
            prefix,
            admin,
            links: Mutex::default(),
            accepted: Mutex::default(),
            ttl,
        }
    }

    /// The admin client (to check what is left).
    fn admin(&self) -> etcd_client::Client {
        self.admin.clone()
    }

    /// Every lease granted to the run's clients.
    fn granted_leases(&self) -> Vec<i64> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links
            .values()
            .flat_map(|(_, granted)| granted.all())
            .collect()
    }

    fn link(&self, client: usize) -> Option<(Vec<Arc<Proxy>>, LeaseLog)> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .cloned()
    }
}

#[async_trait]
impl World for EtcdWorld {
    fn members(&self) -> usize {
        self.endpoints.len()
    }

    async fn locker(&self, client: usize) -> Locker {
        let mut proxies = Vec::new();
        for endpoint in &self.endpoints {
            let addr = endpoint
                .trim_start_matches("http://")
                .parse()
                .expect("a loopback endpoint");
            proxies.push(Arc::new(Proxy::start(addr).await.expect("a proxy")));
        }
        let backend = locker_etcd::EtcdBackend::builder()
            .endpoints(proxies.iter().map(|p| p.endpoint()))
            .prefix(self.prefix.clone())
            .request_timeout(Duration::from_millis(700))
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connect to the cluster");
        let granted = LeaseLog::default();
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, (proxies, granted.clone()));
        client_locker(Arc::new(backend), granted, client, self.ttl)
    }

    async fn inject(&self, fault: Fault) {
        match fault {
            Fault::KillMember(m) => {
                let _ = self.cluster.lock().await.kill(m);
            }
            Fault::PauseMember(m) => {
                let _ = self.cluster.lock().await.pause(m);
            }
            Fault::CutClient(c) | Fault::BlackHoleClient(c) | Fault::SlowClient(c) => {
                if let Some((proxies, _)) = self.link(c) {
                    for proxy in proxies {
                        match fault {
                            Fault::CutClient(_) => proxy.set(LinkState::Cut),
                            Fault::BlackHoleClient(_) => proxy.set(LinkState::BlackHole),
                            _ => proxy.set_latency(Duration::from_millis(100)),
                        }
                    }
                }
            }
            Fault::Compact => {
                let mut admin = self.admin.clone();
                if let Ok(read) = admin.get("chaos-revision", None).await
                    && let Some(header) = read.header()
                {
                    let _ = admin.compact(header.revision(), None).await;
                }
            }
            Fault::ExpireLease(c) => {
                if let Some((_, granted)) = self.link(c) {
                    let last = granted.last();
                    if let Some(lease) = last {
                        let _ = self.admin.clone().lease_revoke(lease).await;
                    }
                }
            }
        }
    }

    async fn heal(&self, fault: Fault) {
        match fault {
            Fault::KillMember(m) => {
                let mut cluster = self.cluster.lock().await;
                // A member that does not come back is a failed run, not a fault to tolerate.
                cluster.restart(m).await.expect("the member restarts");
            }
            Fault::PauseMember(m) => {
                let _ = self.cluster.lock().await.resume(m);
            }
            Fault::CutClient(c) | Fault::BlackHoleClient(c) | Fault::SlowClient(c) => {
                if let Some((proxies, _)) = self.link(c) {
                    for proxy in proxies {
                        proxy.set(LinkState::Up);
                        proxy.set_latency(Duration::ZERO);
                    }
                }
            }
            Fault::Compact | Fault::ExpireLease(_) => {}
        }
    }

    async fn write_resource(&self, key: &str, client: usize, token: FencingToken) -> bool {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let resource = format!("chaos-resource/{}{key}", self.prefix);
        // Zero-padded, so that the store's byte-wise compare orders tokens as numbers.
        let padded = format!("{:020}", token.as_i64());
        let txn = Txn::new()
            .when([Compare::value(
                resource.clone(),
                CompareOp::Greater,
                padded.clone(),
            )])
            .or_else([TxnOp::put(resource, padded, None)]);
        let Ok(response) = self.admin.clone().txn(txn).await else {
            return false;
        };
        if response.succeeded() {
            return false; // the resource holds a higher token: a stale write, refused
        }
        let revision = response.header().map_or(0, |h| h.revision());
        self.accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_default()
            .push((revision, client, token));
        true
    }

    async fn resource_log(&self, key: &str) -> Vec<(usize, FencingToken)> {
        let mut log = self
            .accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default();
        log.sort_by_key(|(revision, _, _)| *revision);
        log.into_iter().map(|(_, c, t)| (c, t)).collect()
    }
}
