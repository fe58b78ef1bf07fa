//! The seed's mesh health monitoring: each service holds a lock on its own health record while it
//! is healthy; services watch the records of the services they depend on and react when one goes
//! offline.
//!
//! service-a depends on service-b and service-c; service-c depends on service-b and chooses to
//! go dark with it (the seed's "cascading blackout"). service-b becomes unhealthy, then recovers.
//!
//! Run it from the repository root, on the in-process memory backend or on a real etcd (the
//! `etcd` feature builds etcd-client, whose build script needs `protoc`):
//!
//! ```text
//! cargo run --example health_mesh
//! LOCKER_ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo run --features etcd --example health_mesh
//! ```

use std::error::Error;
use std::time::Duration;

use futures::StreamExt;
use locker_core::Locker;
use locker_examples::{Reports, Store, Timeline};
use tokio::sync::mpsc;

const TTL: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    run(&Store::from_env()?, &Timeline::start()).await
}

/// Three healthy services watch their dependencies; service-b goes down, service-c goes dark with
/// it, service-b comes back. Everything that happens is told on `t`.
pub(crate) async fn run(store: &Store, t: &Timeline) -> Result<(), Box<dyn Error>> {
    t.say("setup", format!("health mesh on {}", store.describe()));
    let (tx, mut reports) = Reports::channel();

    let a = store.process(TTL).await?;
    let b = store.process(TTL).await?;
    let c = store.process(TTL).await?;

    // Healthy services hold their records.
    let a_health = a.lock(record("service-a"), "ok").await?;
    let mut b_health = b.lock(record("service-b"), "ok").await?;
    let c_health = c.lock(record("service-c"), "ok").await?;
    for h in [&a_health, &b_health, &c_health] {
        h.wait_owned().await?;
    }
    t.say("mesh", "service-a, service-b and service-c are healthy");

    watch_dependency(&a, "service-a", "service-b", t.clone(), tx.clone())?;
    watch_dependency(&a, "service-a", "service-c", t.clone(), tx.clone())?;
    watch_dependency(&c, "service-c", "service-b", t.clone(), tx.clone())?;
    for _ in 0..3 {
        reports.next().await?;
    }

    t.say("service-b", "becomes unhealthy: gives up its health lock");
    b_health.release().await?;

    // service-c reacts to service-b going away by going dark itself.
    let mut c_health = Some(c_health);
    let mut offline = 0;
    while offline < 3 {
        let report = reports.next().await?;
        let b_offline_seen_by_c =
            report.watcher == "service-c" && report.service == "service-b" && !report.healthy;
        if let Some(h) = c_health.take_if(|_| b_offline_seen_by_c) {
            t.say(
                "service-c",
                "cannot work without service-b: gives up its own health lock",
            );
            h.release().await?;
        }
        if !report.healthy {
            offline += 1;
        }
    }

    t.say("service-b", "recovers: takes its health lock again");
    b_health = b.lock(record("service-b"), "ok").await?;
    b_health.wait_owned().await?;
    let mut recovered = 0;
    while recovered < 2 {
        let report = reports.next().await?;
        if report.healthy && report.service == "service-b" {
            recovered += 1;
        }
    }
    t.say(
        "done",
        "both dependants reacted to the outage and to the recovery",
    );
    drop(reports); // the watchers stop reporting
    b_health.release().await?;
    a_health.release().await?;
    Ok(())
}

fn record(service: &str) -> String {
    format!("health/{service}")
}

#[derive(Debug, Clone)]
struct Report {
    watcher: &'static str,
    service: &'static str,
    healthy: bool,
}

/// Watches `service`'s health record on behalf of `watcher`, reporting each change of health.
fn watch_dependency(
    locker: &Locker,
    watcher: &'static str,
    service: &'static str,
    t: Timeline,
    reports: mpsc::UnboundedSender<Report>,
) -> Result<(), locker_core::Error> {
    let mut changes = locker.watch(&record(service))?;
    tokio::spawn(async move {
        let mut last = None;
        while let Some(Ok(holder)) = changes.next().await {
            let healthy = holder.is_some();
            if last == Some(healthy) {
                continue;
            }
            if reports.is_closed() {
                break;
            }
            last = Some(healthy);
            if healthy {
                t.say(watcher, format!("sees {service} healthy: calling it"));
            } else {
                t.say(watcher, format!("sees {service} OFFLINE: stops calling it"));
            }
            let _ = reports.send(Report {
                watcher,
                service,
                healthy,
            });
        }
    });
    Ok(())
}
