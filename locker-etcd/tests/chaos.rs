//! The chaos run with its safety checker (`locker_tests::chaos`) on a real three-node etcd
//! cluster with authentication on (tokens that expire every 2 s): each client reaches every
//! member through proxies of its own and logs in as a user that may touch the run's prefix only;
//! faults kill, freeze and restart members, cut, black-hole and slow clients, compact the history,
//! and revoke holders' leases (as root, the way an operator would).
//!
//! `LOCKER_CHAOS_SECS` sets how long it runs (default: a short run for CI), `LOCKER_CHAOS_SEED`
//! the seed of the fault schedule; a failing run prints the command that replays its schedule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{LockBackend, Locker};
use locker_etcd::EtcdBackend;
use locker_etcd::testing::{EtcdCluster, LinkState, Proxy, enable_auth, unique_prefix};
use locker_tests::LeaseLog;
use locker_tests::chaos::{
    Fault, Injected, Plan, World, client_locker, key_name, revoke_holder, run,
};
use locker_tests::suite::eventually;

const SEED: u64 = 20261126;
const ROOT_PASSWORD: &str = "chaos-root-pw";
const USER: &str = "chaos";
const PASSWORD: &str = "chaos-pw-5e1d";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_three_node_cluster_with_auth() {
    locker_tests::init_logging();
    let plan = Plan::from_env(SEED, 20);
    let cluster = EtcdCluster::start_with_args(3, &["--auth-token-ttl", "2"])
        .await
        .expect("a three-node cluster");
    let prefix = format!("locker-chaos/{}", unique_prefix("chaos"));
    let mut admin = cluster.client().await.expect("an etcd client");
    enable_auth(&mut admin, ROOT_PASSWORD, USER, PASSWORD, &prefix)
        .await
        .expect("authentication on");
    let world = Arc::new(EtcdWorld::new(cluster, prefix.clone(), plan.ttl).await);
    let report = run(world.clone(), &plan).await;
    report.assert_safe("locker-etcd");
    // Nothing leaks: no entry under the run's prefix, no lease of its clients. (A fresh client
    // of root's for each look: tokens expire every 2 s.)
    eventually("the run's entries are gone", || {
        let (world, prefix) = (world.clone(), prefix.clone());
        async move {
            let options = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            let Ok(mut root) = world.root().await else {
                return false;
            };
            root.get(prefix, Some(options))
                .await
                .is_ok_and(|r| r.count() == 0)
        }
    })
    .await;
    for lease in world.granted_leases() {
        eventually(&format!("lease {lease:x} is gone"), || {
            let world = world.clone();
            async move {
                let Ok(mut root) = world.root().await else {
                    return false;
                };
                root.lease_time_to_live(lease, None)
                    .await
                    .is_ok_and(|t| t.ttl() <= 0)
            }
        })
        .await;
    }
}

/// Per client: its proxies (one per member) and its granted leases.
type Links = BTreeMap<usize, (Vec<Arc<Proxy>>, LeaseLog)>;

/// The chaos world of a real three-node etcd cluster with authentication on: each client
/// reaches every member through proxies of its own, as the run's user; the operator (root)
/// reaches the members directly.
struct EtcdWorld {
    cluster: tokio::sync::Mutex<EtcdCluster>,
    endpoints: Vec<String>,
    prefix: String,
    /// Root's backend on the run's prefix: reads holders, revokes leases (and logs in again on
    /// its own when its token expires).
    operator: EtcdBackend,
    links: Mutex<Links>,
    ttl: Duration,
}

impl EtcdWorld {
    /// A world on `cluster` (authentication on), with every key under `prefix`.
    async fn new(cluster: EtcdCluster, prefix: String, ttl: Duration) -> Self {
        let endpoints = cluster.endpoints();
        let operator = EtcdBackend::builder()
            .endpoints(endpoints.clone())
            .prefix(prefix.clone())
            .user("root", ROOT_PASSWORD)
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connect as root");
        EtcdWorld {
            endpoints,
            cluster: tokio::sync::Mutex::new(cluster),
            prefix,
            operator,
            links: Mutex::default(),
            ttl,
        }
    }

    /// A fresh client of root's (tokens expire every 2 s; a fresh client logs in now). Logging
    /// in fails while the cluster has no leader (a member killed or frozen): callers try again
    /// later.
    async fn root(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let options = etcd_client::ConnectOptions::new()
            .with_user("root", ROOT_PASSWORD)
            .with_connect_timeout(Duration::from_secs(2));
        etcd_client::Client::connect(self.endpoints.clone(), Some(options)).await
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

    /// The client that was granted `lease`.
    fn client_of(&self, lease: i64) -> Option<usize> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links
            .iter()
            .find(|(_, (_, granted))| granted.all().contains(&lease))
            .map(|(c, _)| *c)
    }

    fn set_link(&self, client: usize, state: LinkState, latency: Duration) {
        if let Some((proxies, _)) = self.link(client) {
            for proxy in proxies {
                proxy.set(state);
                proxy.set_latency(latency);
            }
        }
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
        let backend = EtcdBackend::builder()
            .endpoints(proxies.iter().map(|p| p.endpoint()))
            .prefix(self.prefix.clone())
            .user(USER, PASSWORD)
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

    async fn inject(&self, fault: Fault) -> Injected {
        match fault {
            Fault::KillMember(m) => {
                let _ = self.cluster.lock().await.kill(m);
            }
            Fault::PauseMember(m) => {
                let _ = self.cluster.lock().await.pause(m);
            }
            Fault::CutClient(c) => self.set_link(c, LinkState::Cut, Duration::ZERO),
            Fault::BlackHoleClient(c) => self.set_link(c, LinkState::BlackHole, Duration::ZERO),
            Fault::SlowClient(c) => self.set_link(c, LinkState::Up, Duration::from_millis(100)),
            Fault::Compact => {
                // Root logs in through the cluster's leader: during an election there is none,
                // and the store is not compacted this time.
                match self.root().await {
                    Ok(mut root) => {
                        if let Ok(read) = root.get("chaos-revision", None).await
                            && let Some(header) = read.header()
                        {
                            let _ = root.compact(header.revision(), None).await;
                        }
                    }
                    Err(err) => tracing::warn!(%err, "chaos: root could not log in to compact"),
                }
            }
            Fault::ExpireLease { key, isolate } => {
                let isolate_client = |client, isolated| {
                    let state = if isolated {
                        LinkState::BlackHole
                    } else {
                        LinkState::Up
                    };
                    self.set_link(client, state, Duration::ZERO);
                };
                let revoke = |lease| async move {
                    match self.operator.revoke_lease(lease).await {
                        Ok(()) => true,
                        Err(err) => {
                            tracing::warn!(%err, "chaos: the revocation failed");
                            false
                        }
                    }
                };
                return revoke_holder(
                    &self.operator,
                    &key_name(key),
                    self.ttl,
                    isolate,
                    |lease| self.client_of(lease),
                    isolate_client,
                    revoke,
                )
                .await;
            }
        }
        Injected::Done
    }

    async fn heal(&self, fault: Fault, injected: Injected) {
        match (fault, injected) {
            (Fault::KillMember(m), _) => {
                let mut cluster = self.cluster.lock().await;
                // A member that does not come back is a failed run, not a fault to tolerate.
                cluster.restart(m).await.expect("the member restarts");
            }
            (Fault::PauseMember(m), _) => {
                let _ = self.cluster.lock().await.resume(m);
            }
            (Fault::CutClient(c) | Fault::BlackHoleClient(c) | Fault::SlowClient(c), _) => {
                self.set_link(c, LinkState::Up, Duration::ZERO);
            }
            (Fault::ExpireLease { isolate: true, .. }, Injected::Revoked(revocation)) => {
                self.set_link(revocation.client, LinkState::Up, Duration::ZERO);
            }
            (Fault::Compact | Fault::ExpireLease { .. }, _) => {}
        }
    }
}
