//! The chaos run with its safety checker: on a real three-node etcd cluster, and on the memory
//! backend (where the same seed gives the same history).
//!
//! `LOCKER_CHAOS_SECS` sets how long it runs (default: a short run for CI), `LOCKER_CHAOS_SEED`
//! the seed of the fault schedule (a failing seed replays: the summary line names it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use locker_tests::chaos::{EtcdWorld, MemoryWorld, Plan, Report, run};
use locker_tests::cluster::EtcdCluster;
use locker_tests::etcd_server::unique_prefix;
use locker_tests::suite::eventually;

const SEED: u64 = 20261126;

fn assert_report(report: &Report) {
    println!("{}", report.summary());
    assert!(
        report.violations.is_empty(),
        "{}\nviolations:\n{}",
        report.summary(),
        report.violations.join("\n")
    );
    assert!(
        report.acquisitions > 0 && report.faults > 0,
        "{}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_three_node_cluster() {
    locker_tests::harness::init_logging();
    let plan = Plan::from_env(SEED, 20);
    let cluster = EtcdCluster::start(3).await.expect("a three-node cluster");
    let prefix = format!("locker-chaos/{}", unique_prefix("chaos"));
    let world = Arc::new(EtcdWorld::new(cluster, prefix.clone(), plan.ttl).await);
    let report = run(world.clone(), &plan).await;
    assert_report(&report);
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
    let plan = Plan::from_env(SEED, 60);
    let once = || {
        let mut runtime = tokio::runtime::Builder::new_current_thread();
        runtime.enable_all().start_paused(true);
        seed_runtime(&mut runtime, plan.seed);
        runtime.build().unwrap().block_on(memory_run(&plan))
    };
    let first = once();
    assert_report(&first);
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
