//! A watch stream that nobody polls holds bounded memory, however much changes; polled again,
//! it says that changes were skipped and yields the current holder. Its own test binary: it counts the process's live
//! bytes with a counting allocator.

use std::alloc::System;
use std::time::Duration;

use futures::StreamExt;
use locker_core::{HolderUpdate, LockBackend, Locker};
use locker_memory::MemoryBackend;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Hand-offs made while the stream is left alone.
const HANDOFFS: usize = 100_000;

/// What the unpolled stream (and everything else of the locker) may grow by in all: far less
/// than the hand-offs' events (two per hand-off, over 100 bytes each, about 30 MB if kept), and
/// more than the one message a collapsed mailbox holds.
const GROWTH_LIMIT: i64 = 256 * 1024;

fn live_bytes(region: &Region<'_, System>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
}

#[tokio::test(start_paused = true)]
async fn an_unpolled_watch_stream_stays_bounded_through_100_000_handoffs_then_yields_the_holder() {
    let store = MemoryBackend::new();
    let locker = Locker::new(store.clone());
    let mut stream = locker.watch_updates("k").expect("watch_updates");
    let first = stream.next().await.expect("an item").expect("no error");
    assert_eq!(first, HolderUpdate::Holder(None), "nobody holds k yet");

    // Two contenders hand `k` to each other, straight on the store: every join and delete is an
    // event of the stream's queue.
    let ttl = Duration::from_secs(600);
    let leases = [
        store.grant_lease(ttl).await.expect("lease").id,
        store.grant_lease(ttl).await.expect("lease").id,
    ];
    let mut holder = store.join("k", leases[0], b"0").await.expect("join").entry;
    let region = Region::new(GLOBAL);
    for i in 0..HANDOFFS {
        let next = leases[(i + 1) % 2];
        let waiter = store.join("k", next, b"v").await.expect("join").entry;
        let deleted = store
            .delete_entry(&holder.key, holder.create_revision)
            .await
            .expect("delete");
        assert!(deleted, "the holder's entry is deleted");
        holder = waiter;
        // Let the locker's hub take the store's events (as a runtime with other tasks would).
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // The store's own history is not the stream's: drop it.
    store
        .compact(store.current_revision())
        .expect("compact the store's history");
    let grown = live_bytes(&region);
    assert!(
        grown < GROWTH_LIMIT,
        "through {HANDOFFS} hand-offs the unpolled stream grew the process by {grown} bytes \
         (limit {GROWTH_LIMIT})"
    );

    // Polled again: changes were skipped, and the holder as it is now.
    let skipped = stream.next().await.expect("an item").expect("no error");
    assert_eq!(skipped, HolderUpdate::Skipped, "the backlog was dropped");
    let now = match stream.next().await.expect("an item").expect("no error") {
        HolderUpdate::Holder(Some(holder)) => holder,
        other => panic!("expected the holder now, got {other:?}"),
    };
    assert_eq!(
        (now.lease, now.token.as_i64()),
        (holder.lease, holder.create_revision),
        "the stream yields the current holder"
    );
    store
        .revoke_lease(leases[0])
        .await
        .expect("revoke the first lease");
    store
        .revoke_lease(leases[1])
        .await
        .expect("revoke the second lease");
    locker.close().await;
}
