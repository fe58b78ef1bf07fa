//! The seed's name server: hosts lock their hostname record with their address as the value, and
//! resolvers watch the record.
//!
//! Two hosts compete for `www.example.com`; a resolver watches it; the owner dies (stops renewing
//! its lease, as a crashed process would); the other host takes over after the TTL and the
//! resolver sees the new address.
//!
//! Run it from the repository root, on the in-process memory backend or on a real etcd (the
//! `etcd` feature builds etcd-client, whose build script needs `protoc`):
//!
//! ```text
//! cargo run --example name_server
//! LOCKER_ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo run --features etcd --example name_server
//! ```

use std::error::Error;
use std::time::Duration;

use futures::StreamExt;
use locker_core::LockOptions;
use locker_examples::{Reports, Store, Timeline};

const RECORD: &str = "www.example.com";
const TTL: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    run(&Store::from_env()?, &Timeline::start()).await
}

/// Two hosts compete for the record while a resolver watches it; the owner dies, the other takes
/// over, then releases. Everything that happens is told on `t`.
pub(crate) async fn run(store: &Store, t: &Timeline) -> Result<(), Box<dyn Error>> {
    t.say(
        "setup",
        format!("name server on {}, lease TTL {TTL:?}", store.describe()),
    );

    // Each host is its own process with its own lease, so one can die alone.
    let host_a = store.process(TTL).await?;
    let host_b = store.process(TTL).await?;
    let resolver = store.process(TTL).await?;

    // The resolver watches the record: the current state first, then every change. It reports
    // each address it is told, so that the steps below can wait until it has seen them.
    let mut changes = resolver.watch(RECORD)?;
    let (resolver_tx, mut resolver_saw) = Reports::channel();
    let resolver_t = t.clone();
    tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            match change {
                Ok(Some(holder)) => {
                    let ip = holder.value_str().unwrap_or("?").to_owned();
                    resolver_t.say(
                        "resolver",
                        format!("{RECORD} -> {ip} (fencing token {})", holder.token),
                    );
                    let _ = resolver_tx.send(Some(ip));
                }
                Ok(None) => {
                    resolver_t.say("resolver", format!("{RECORD} -> nobody"));
                    let _ = resolver_tx.send(None);
                }
                Err(err) => resolver_t.say("resolver", format!("watch failed: {err}")),
            }
        }
    });
    resolver_saw.wait_for(&None).await?;

    let options = LockOptions::new().dedicated_session(TTL);
    let a = host_a
        .lock_with(RECORD, "10.1.1.1", options.clone())
        .await?;
    let token_a = a.wait_owned().await?;
    t.say(
        "host-a",
        format!("owns {RECORD} with 10.1.1.1 (token {token_a})"),
    );
    resolver_saw.wait_for(&Some("10.1.1.1".into())).await?;

    let b = host_b.lock_with(RECORD, "10.1.1.2", options).await?;
    let mut b_owned = b.owned_changes();
    if b_owned.next().await == Some(false) {
        t.say("host-b", "waiting: 10.1.1.1 holds the record");
    }
    let holder = host_b
        .get(RECORD)
        .await?
        .map(|h| h.value_str().unwrap_or("?").to_owned());
    t.say(
        "client",
        format!("get({RECORD}) = {}", holder.as_deref().unwrap_or("none")),
    );

    t.say(
        "host-a",
        "dies (stops renewing its lease; nothing is deleted)",
    );
    a.abandon();

    let token_b = b.wait_owned().await?;
    t.say(
        "host-b",
        format!("took over {RECORD} (token {token_b} > {token_a})"),
    );
    resolver_saw.wait_for(&Some("10.1.1.2".into())).await?;

    b.release().await?;
    t.say("host-b", "released the record (hand-off in one round trip)");
    resolver_saw.wait_for(&None).await?;
    t.say("done", "the resolver followed every change");
    Ok(())
}
