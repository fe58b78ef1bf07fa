//! The chaos run with its safety checker (`locker_tests::chaos`) on the memory backend, on
//! paused time, where the same seed gives the same history.
//!
//! `LOCKER_CHAOS_SECS` sets how long it runs (default: a short run), `LOCKER_CHAOS_SEED` the seed
//! of the fault schedule (a failing run prints the command that replays it, history and all).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use locker_core::Locker;
use locker_memory::{MemoryBackend, PartitionMode};
use locker_tests::LeaseLog;
use locker_tests::chaos::{
    Fault, Injected, Plan, Report, World, client_locker, key_name, revoke_holder, run,
};

const SEED: u64 = 20261126;

async fn memory_run(plan: &Plan) -> Report {
    let world = Arc::new(MemoryWorld::new(plan.ttl));
    let report = run(world.clone(), plan).await;
    // Let abandoned leases run out, then nothing is left.
    tokio::time::sleep(plan.ttl * 2).await;
    assert!(
        world.store().keys().is_empty(),
        "{:?}",
        world.store().keys()
    );
    assert!(
        world.store().leases().is_empty(),
        "{:?}",
        world.store().leases()
    );
    report
}

#[test]
fn chaos_on_memory_is_safe_and_replays() {
    locker_tests::init_logging();
    let plan = Plan::from_env(SEED, 60);
    let once = || {
        let mut runtime = tokio::runtime::Builder::new_current_thread();
        runtime.enable_all().start_paused(true);
        seed_runtime(&mut runtime, plan.seed);
        runtime.build().unwrap().block_on(memory_run(&plan))
    };
    let first = once();
    first.assert_safe("locker-memory");
    let second = once();
    assert_eq!(first, second, "the same seed gave another history");
    assert!(first.handoffs > 0, "{}", first.summary());
}

/// Seeds tokio's own random choices (select! branches, watch wake-up order), so that a run on
/// paused time is a function of its seed. Needs `--cfg tokio_unstable` (set for this workspace
/// in `.cargo/config.toml`).
#[cfg(tokio_unstable)]
fn seed_runtime(runtime: &mut tokio::runtime::Builder, seed: u64) {
    runtime.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
}

#[cfg(not(tokio_unstable))]
fn seed_runtime(_: &mut tokio::runtime::Builder, _: u64) {
    panic!(
        "the memory chaos run replays only with tokio's seeded runtime: build with \
         RUSTFLAGS=\"--cfg tokio_unstable\" (the workspace's .cargo/config.toml sets it; a \
         RUSTFLAGS variable of your own overrides that file)"
    );
}

/// The chaos world of the memory backend: one store, one client (with its own faults) per
/// contender, virtual time. No members to kill.
struct MemoryWorld {
    store: MemoryBackend,
    clients: Mutex<BTreeMap<usize, (MemoryBackend, LeaseLog)>>,
    ttl: Duration,
}

impl MemoryWorld {
    /// A fresh store.
    fn new(ttl: Duration) -> Self {
        MemoryWorld {
            store: MemoryBackend::new(),
            clients: Mutex::default(),
            ttl,
        }
    }

    /// The store (to check what is left in it).
    fn store(&self) -> &MemoryBackend {
        &self.store
    }

    fn client(&self, i: usize) -> Option<(MemoryBackend, LeaseLog)> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&i)
            .cloned()
    }

    /// The client that was granted `lease`.
    fn client_of(&self, lease: i64) -> Option<usize> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .iter()
            .find(|(_, (_, granted))| granted.all().contains(&lease))
            .map(|(c, _)| *c)
    }
}

#[async_trait]
impl World for MemoryWorld {
    fn members(&self) -> usize {
        0
    }

    async fn locker(&self, client: usize) -> Locker {
        let backend = self.store.new_client();
        let granted = LeaseLog::default();
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, (backend.clone(), granted.clone()));
        client_locker(Arc::new(backend), granted, client, self.ttl)
    }

    async fn inject(&self, fault: Fault) -> Injected {
        match fault {
            Fault::KillMember(_) | Fault::PauseMember(_) => {}
            Fault::CutClient(c) | Fault::BlackHoleClient(c) | Fault::SlowClient(c) => {
                if let Some((backend, _)) = self.client(c) {
                    let faults = backend.faults();
                    match fault {
                        Fault::CutClient(_) => faults.partition(PartitionMode::Fail),
                        Fault::BlackHoleClient(_) => faults.partition(PartitionMode::Hang),
                        _ => faults.set_latency(Duration::from_millis(150)),
                    }
                }
            }
            Fault::Compact => {
                let _ = self.store.compact(self.store.current_revision());
            }
            Fault::ExpireLease { key, isolate } => {
                let isolate_client = |client, isolated| {
                    if let Some((backend, _)) = self.client(client) {
                        if isolated {
                            backend.faults().partition(PartitionMode::Hang);
                        } else {
                            backend.faults().heal();
                        }
                    }
                };
                return revoke_holder(
                    &self.store,
                    &key_name(key),
                    self.ttl,
                    isolate,
                    |lease| self.client_of(lease),
                    isolate_client,
                    |lease| std::future::ready(self.store.expire_lease(lease)),
                )
                .await;
            }
        }
        Injected::Done
    }

    async fn heal(&self, fault: Fault, injected: Injected) {
        let client = match (fault, injected) {
            (Fault::CutClient(c) | Fault::BlackHoleClient(c) | Fault::SlowClient(c), _) => c,
            (Fault::ExpireLease { isolate: true, .. }, Injected::Revoked(revocation)) => {
                revocation.client
            }
            _ => return,
        };
        if let Some((backend, _)) = self.client(client) {
            backend.faults().heal();
            backend.faults().set_latency(Duration::ZERO);
        }
    }
}
