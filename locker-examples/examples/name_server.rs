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

use std::time::Duration;

use futures::StreamExt;
use locker_core::LockOptions;
use locker_examples::{Store, Timeline};

const RECORD: &str = "www.example.com";
const TTL: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::from_env()?;
    let t = Timeline::start();
    t.say(
        "setup",
        format!("name server on {}, lease TTL {TTL:?}", store.describe()),
    );

    // Each host is its own process with its own lease, so one can die alone.
    let host_a = store.process(TTL).await?;
    let host_b = store.process(TTL).await?;
    let resolver = store.process(TTL).await?;

    // The resolver watches the record: the current state first, then every change.
    let mut changes = resolver.watch(RECORD)?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            match change {
                Ok(Some(holder)) => {
                    let ip = holder.value_str().unwrap_or("?").to_owned();
                    t.say(
                        "resolver",
                        format!("{RECORD} -> {ip} (fencing token {})", holder.token),
                    );
                    let _ = seen_tx.send(Some(ip));
                }
                Ok(None) => {
                    t.say("resolver", format!("{RECORD} -> nobody"));
                    let _ = seen_tx.send(None);
                }
                Err(err) => t.say("resolver", format!("watch failed: {err}")),
            }
        }
    });
    expect(&mut seen_rx, None).await?;

    let options = LockOptions::new().dedicated_session(TTL);
    let a = host_a
        .lock_with(RECORD, "10.1.1.1", options.clone())
        .await?;
    let token_a = a.wait_owned().await?;
    t.say(
        "host-a",
        format!("owns {RECORD} with 10.1.1.1 (token {token_a})"),
    );
    expect(&mut seen_rx, Some("10.1.1.1")).await?;

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
    expect(&mut seen_rx, Some("10.1.1.2")).await?;

    b.release().await?;
    t.say("host-b", "released the record (hand-off in one round trip)");
    expect(&mut seen_rx, None).await?;
    t.say("done", "the resolver followed every change");
    Ok(())
}

/// Waits (bounded) until the resolver reports `want`.
async fn expect(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
    want: Option<&str>,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(got)) if got.as_deref() == want => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) => return Err("the resolver's watch ended".into()),
            Err(_) => return Err(format!("the resolver did not see {want:?} in 30 s").into()),
        }
    }
}
