//! What only the memory backend has: exact revisions and lease ids (determinism), expiry at
//! exactly the TTL on paused time, the operator methods and the fault switches. The backend
//! contract itself is checked, on this backend and on etcd alike, by the clauses of
//! `locker_tests::contract` (`cargo test -p locker-memory --test conformance contract::`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use locker_core::backend::{
    EventKind, LeaseId, Limits, Revision, WatchEvent, WatchStream, entry_key,
};
use locker_core::{Error, LockBackend, Watcher};
use tokio::time::{Instant, sleep, timeout};

use crate::{MemoryBackend, PartitionMode};

const TTL: Duration = Duration::from_secs(10);
const SOON: Duration = Duration::from_secs(1);

async fn lease(backend: &MemoryBackend) -> LeaseId {
    backend.grant_lease(TTL).await.unwrap().id
}

/// The next batch, which must come within `SOON` (of paused time).
async fn next_batch(stream: &mut WatchStream) -> Vec<WatchEvent> {
    timeout(SOON, stream.events.next())
        .await
        .expect("a batch in time")
        .expect("the stream is open")
        .expect("a batch, not an error")
}

/// Whether the stream has nothing to deliver within `SOON`.
async fn is_quiet(stream: &mut WatchStream) -> bool {
    timeout(SOON, stream.events.next()).await.is_err()
}

fn revision_of(batch: &[WatchEvent]) -> Revision {
    let revision = batch[0].entry.mod_revision;
    assert!(batch.iter().all(|e| e.entry.mod_revision == revision));
    revision
}

fn keys_of(batch: &[WatchEvent]) -> Vec<&str> {
    batch.iter().map(|e| e.entry.key.as_str()).collect()
}

fn is_unavailable<T: std::fmt::Debug>(result: &Result<T, Error>) -> bool {
    matches!(result, Err(Error::Unavailable { .. }))
}

#[tokio::test]
async fn revisions_increase_by_one_per_write_and_only_per_write() {
    let b = MemoryBackend::new();
    assert_eq!(b.current_revision(), 1);
    let (l1, l2, l3) = (lease(&b).await, lease(&b).await, lease(&b).await);
    assert_eq!(b.current_revision(), 1, "grants make no revision");

    let j1 = b.join("k", l1, b"one").await.unwrap();
    assert_eq!(
        (j1.entry.create_revision, j1.entry.mod_revision, j1.revision),
        (2, 2, 2)
    );
    assert_eq!(j1.entry.key, entry_key("k", l1));
    assert_eq!(
        (j1.entry.lease, j1.entry.value.as_slice()),
        (l1, &b"one"[..])
    );
    let j2 = b.join("k", l2, b"two").await.unwrap();
    assert_eq!((j2.entry.create_revision, j2.revision), (3, 3));
    assert_eq!(j2.predecessor, Some(j1.entry.clone()));

    // Guarded operations that do not match make no revision.
    assert!(!b.delete_entry(&j2.entry.key, 2).await.unwrap());
    assert_eq!(b.update_value(&j2.entry.key, 99, b"x").await.unwrap(), None);
    assert_eq!(b.update_value("k/missing", 3, b"x").await.unwrap(), None);
    assert_eq!(b.current_revision(), 3);

    assert_eq!(
        b.update_value(&j2.entry.key, 3, b"2").await.unwrap(),
        Some(4)
    );
    assert_eq!(b.current_revision(), 4);
    let snapshot = b.entries("k").await.unwrap();
    assert_eq!(snapshot.revision, 4);
    assert_eq!(snapshot.entries[1].value, b"2");
    assert_eq!(snapshot.entries[1].lease, l2);
    assert_eq!(
        (
            snapshot.entries[1].create_revision,
            snapshot.entries[1].mod_revision
        ),
        (3, 4)
    );

    assert_eq!(b.keep_alive(l1).await.unwrap(), Some(TTL));
    let position = b.position("k", &j2.entry.key, 3).await.unwrap();
    assert_eq!(position.own.unwrap().mod_revision, 4);
    assert_eq!(position.predecessor, Some(j1.entry.clone()));
    assert_eq!(position.revision, 4);

    assert!(b.delete_entry(&j1.entry.key, 2).await.unwrap());
    assert_eq!(b.current_revision(), 5);
    assert_eq!(b.holder("k").await.unwrap().0.unwrap().key, j2.entry.key);

    b.revoke_lease(l2).await.unwrap();
    assert_eq!(
        b.current_revision(),
        6,
        "a revoke deletes its keys at one revision"
    );
    b.revoke_lease(l1).await.unwrap();
    b.revoke_lease(l1).await.unwrap();
    assert_eq!(
        b.current_revision(),
        6,
        "a lease without keys ends without a revision"
    );
    assert!(!b.delete_key("k/missing"));
    assert_eq!(b.current_revision(), 6);
    assert_eq!(b.holder("k").await.unwrap(), (None, 6));
    assert_eq!(b.leases(), vec![l3]);
    assert!(b.keys().is_empty());
    assert_eq!(b.lease_expired_at(l2), None, "a revoke is not an expiry");
}

/// As etcd: a TTL is rounded up to whole seconds (the rounding up to the minimum is a contract
/// clause), and one over `max_ttl` is refused; lease ids are the same on every run; the limits are
/// etcd's and can be set.
#[tokio::test]
async fn leases_are_rounded_up_and_deterministic() {
    let b = MemoryBackend::new();
    let secs = |s| Duration::from_secs(s);
    assert_eq!(b.grant_lease(secs(1)).await.unwrap().ttl, secs(2));
    assert_eq!(
        b.grant_lease(Duration::from_millis(2_500))
            .await
            .unwrap()
            .ttl,
        secs(3)
    );
    assert_eq!(
        b.grant_lease(secs(9_000_000_000)).await.unwrap().ttl,
        secs(9_000_000_000)
    );
    assert!(matches!(
        b.grant_lease(secs(9_000_000_001)).await,
        Err(Error::TtlOutOfRange { .. })
    ));
    let ids = b.leases();
    assert_eq!(ids.len(), 3);
    assert!(ids.iter().all(|id| *id > 0));

    let again = MemoryBackend::new();
    let mut ids_again = Vec::new();
    for _ in 0..3 {
        ids_again.push(lease(&again).await);
    }
    ids_again.sort_unstable();
    assert_eq!(ids, ids_again, "lease ids are the same on every run");

    let custom = MemoryBackend::builder()
        .limits(Limits {
            min_ttl: Duration::from_secs(5),
            ..MemoryBackend::DEFAULT_LIMITS
        })
        .build();
    assert_eq!(custom.grant_lease(secs(1)).await.unwrap().ttl, secs(5));
    assert_eq!(custom.limits().min_ttl, secs(5));
    assert_eq!(MemoryBackend::new().limits(), MemoryBackend::DEFAULT_LIMITS);
    let limits = MemoryBackend::DEFAULT_LIMITS;
    assert_eq!(
        (limits.max_key_len, limits.max_value_len),
        (2_243, 1_556_480)
    );
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_deletes_entries_at_exactly_the_ttl() {
    let b = MemoryBackend::new();
    let start = Instant::now();
    let l = lease(&b).await;
    let other = lease(&b).await;
    b.join("x", l, b"1").await.unwrap();
    b.join("y", l, b"2").await.unwrap();
    b.join("x", other, b"3").await.unwrap();
    let mut stream = b.watch("", None).await.unwrap();

    sleep(TTL / 2).await;
    assert_eq!(b.keep_alive(other).await.unwrap(), Some(TTL));
    sleep(TTL / 2 - Duration::from_millis(1)).await;
    assert_eq!(b.keys().len(), 3);
    assert!(b.leases().contains(&l));
    assert_eq!(b.lease_expired_at(l), None);

    sleep(Duration::from_millis(1)).await;
    assert_eq!(
        b.keys().len(),
        1,
        "both keys of the lease are gone at the TTL"
    );
    assert_eq!(b.keep_alive(l).await.unwrap(), None);
    assert_eq!(b.lease_expired_at(l), Some(start + TTL));
    assert_eq!(b.current_revision(), 5);
    let batch = next_batch(&mut stream).await;
    assert_eq!(keys_of(&batch), vec![entry_key("x", l), entry_key("y", l)]);
    for event in &batch {
        assert_eq!(event.kind, EventKind::Delete);
        assert_eq!(event.entry.mod_revision, 5);
        assert_eq!((event.entry.create_revision, event.entry.lease), (0, 0));
        assert!(event.entry.value.is_empty());
    }

    // The kept-alive lease runs out TTL after its keep-alive, by the expiry task alone.
    let batch = stream.events.next().await.unwrap().unwrap();
    assert_eq!(Instant::now(), start + TTL / 2 + TTL);
    assert_eq!(keys_of(&batch), vec![entry_key("x", other)]);
    assert_eq!(b.lease_expired_at(other), Some(start + TTL / 2 + TTL));
    assert!(b.leases().is_empty());
}

#[tokio::test(start_paused = true)]
async fn operator_expire_lease_and_delete_key() {
    let b = MemoryBackend::new();
    let l = lease(&b).await;
    let joined = b.join("k", l, b"v").await.unwrap();
    sleep(SOON).await;
    assert!(b.delete_key(&joined.entry.key));
    assert_eq!(b.current_revision(), 3);
    assert!(b.keys().is_empty());
    assert!(b.expire_lease(l));
    assert_eq!(b.current_revision(), 3, "the lease had no keys left");
    assert_eq!(b.lease_expired_at(l), Some(Instant::now()));
    assert!(!b.expire_lease(l));
    assert_eq!(b.keep_alive(l).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_store_ends_the_expiry_task() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let b = MemoryBackend::new();
    let other = b.new_client();
    lease(&b).await;
    lease(&other).await;
    assert_eq!(metrics.num_alive_tasks(), 1, "one expiry task per store");
    drop(b);
    drop(other);
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), 0);
}

/// The operator's compaction answers as etcd's does; what a watch then sees is a contract clause.
#[tokio::test(start_paused = true)]
async fn compaction() {
    let b = MemoryBackend::new();
    let l = lease(&b).await;
    for key in ["a", "b", "c", "d"] {
        b.join(key, l, b"v").await.unwrap(); // 2 ..= 5
    }
    assert_eq!(b.compact_revision(), 0);
    assert!(matches!(
        b.compact(6),
        Err(Error::Backend {
            retryable: false,
            ..
        })
    ));
    b.compact(4).unwrap();
    assert_eq!(b.compact_revision(), 4);
    assert!(matches!(
        b.compact(4),
        Err(Error::Compacted {
            requested: 4,
            compact_revision: 4
        })
    ));
    // From a compacted revision, the call succeeds and the stream's only item is the error.
    let mut stale = b.watch("", Some(3)).await.unwrap();
    assert_eq!(stale.start_revision, 3);
    assert!(matches!(
        stale.events.next().await,
        Some(Err(Error::Compacted {
            requested: 3,
            compact_revision: 4
        }))
    ));
    assert!(stale.events.next().await.is_none());
}

/// A watch may start at a future revision (nothing is delivered before it); a dropped stream
/// unregisters itself from the store.
#[tokio::test(start_paused = true)]
async fn future_watches_wait_and_dropped_watches_unregister() {
    let b = MemoryBackend::new();
    let l = lease(&b).await;
    let mut future = b.watch("q", Some(4)).await.unwrap();
    assert_eq!(future.start_revision, 4);
    let from_now = b.watch("q", None).await.unwrap();
    b.join("q", l, b"1").await.unwrap(); // 2
    b.join("q/deep", l, b"2").await.unwrap(); // 3
    assert!(is_quiet(&mut future).await);
    b.revoke_lease(l).await.unwrap(); // 4
    assert_eq!(revision_of(&next_batch(&mut future).await), 4);
    assert_eq!(b.watch_count(), 2);
    drop(future);
    assert_eq!(b.watch_count(), 1, "a dropped stream unregisters itself");
    drop(from_now);
    assert_eq!(b.watch_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn fail_partition_fails_calls_and_cuts_streams() {
    let b = MemoryBackend::new();
    let clone = b.clone();
    let other = b.new_client();
    let l = lease(&b).await;
    let mut stream = b.watch("k", None).await.unwrap();
    let mut other_stream = other.watch("k", None).await.unwrap();

    b.faults().partition(PartitionMode::Fail);
    assert_eq!(clone.faults().partitioned(), Some(PartitionMode::Fail));
    assert!(is_unavailable(&b.join("k", l, b"v").await));
    assert!(
        is_unavailable(&clone.keep_alive(l).await),
        "clones share faults"
    );
    assert!(is_unavailable(&b.watch("k", None).await));
    assert!(matches!(
        stream.events.next().await,
        Some(Err(Error::Unavailable { .. }))
    ));
    assert!(stream.events.next().await.is_none());

    // Another client, and the operator, are not affected.
    other.join("k", l, b"v").await.unwrap();
    assert_eq!(revision_of(&next_batch(&mut other_stream).await), 2);
    assert_eq!(b.keys().len(), 1);

    b.faults().heal();
    assert_eq!(b.holder("k").await.unwrap().1, 2);

    // A partition healed before the stream is polled still cuts it.
    let mut stream = b.watch("k", None).await.unwrap();
    b.faults().partition(PartitionMode::Fail);
    b.faults().heal();
    assert!(matches!(
        stream.events.next().await,
        Some(Err(Error::Unavailable { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn hang_partition_blocks_until_healed() {
    let b = MemoryBackend::new();
    let other = b.new_client();
    let l = lease(&b).await;
    let mut stream = b.watch("k", None).await.unwrap();

    b.faults().partition(PartitionMode::Hang);
    // A hung call that is dropped leaves nothing behind.
    assert!(timeout(SOON, b.join("k", l, b"dropped")).await.is_err());
    assert_eq!(other.entries("k").await.unwrap().entries.len(), 0);
    assert_eq!(b.current_revision(), 1);

    let hung = {
        let b = b.clone();
        tokio::spawn(async move { b.join("k", l, b"late").await })
    };
    let l2 = lease(&other).await;
    other.join("k", l2, b"first").await.unwrap(); // 2
    other.join("k/x", l2, b"more").await.unwrap(); // 3
    assert!(
        is_quiet(&mut stream).await,
        "a hung stream delivers nothing"
    );
    assert!(!hung.is_finished());

    b.faults().heal();
    let joined = hung.await.unwrap().unwrap();
    assert_eq!(joined.entry.create_revision, 4);
    let predecessor = joined.predecessor.expect("the entry of l2 before ours");
    assert_eq!(
        (predecessor.key, predecessor.lease),
        (entry_key("k", l2), l2)
    );
    for expected in 2..=4 {
        assert_eq!(revision_of(&next_batch(&mut stream).await), expected);
    }

    // Hang, then Fail: the hung call fails.
    b.faults().partition(PartitionMode::Hang);
    let hung = {
        let b = b.clone();
        tokio::spawn(async move { b.holder("k").await })
    };
    sleep(SOON).await;
    b.faults().partition(PartitionMode::Fail);
    assert!(is_unavailable(&hung.await.unwrap()));
}

#[tokio::test(start_paused = true)]
async fn latency_delays_every_call() {
    let b = MemoryBackend::new();
    b.faults().set_latency(Duration::from_millis(250));
    assert_eq!(b.clone().faults().latency(), Duration::from_millis(250));
    let start = Instant::now();
    b.holder("k").await.unwrap();
    b.watch("k", None).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    let other = b.new_client();
    let start = Instant::now();
    other.holder("k").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "latency is per client");
    b.faults().set_latency(Duration::ZERO);
    b.holder("k").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn fail_next_fails_exactly_n_calls() {
    let b = MemoryBackend::new();
    let other = b.new_client();
    b.faults().fail_next(3);
    assert!(
        is_unavailable(&b.watch("k", None).await),
        "watch counts as a call"
    );
    assert!(
        is_unavailable(&b.clone().grant_lease(TTL).await),
        "clones share the count"
    );
    other.holder("k").await.unwrap();
    assert_eq!(b.faults().pending_failures(), 1);
    assert!(is_unavailable(&b.holder("k").await));
    b.holder("k").await.unwrap();
    assert_eq!(b.faults().pending_failures(), 0);

    b.faults().fail_next(5);
    b.faults().set_latency(SOON);
    b.faults().partition(PartitionMode::Hang);
    b.faults().clear();
    assert_eq!(b.faults().partitioned(), None);
    let start = Instant::now();
    b.holder("k").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn deny_fails_every_call_permanently_until_lifted() {
    let b = MemoryBackend::new();
    let other = b.new_client();
    b.faults().deny(true);
    for result in [
        b.holder("k").await.map(drop),
        b.grant_lease(TTL).await.map(drop),
        b.watch("k", None).await.map(drop),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }
    other
        .holder("k")
        .await
        .expect("another client is not denied");
    b.faults().deny(false);
    b.holder("k").await.expect("lifted");
    b.faults().deny(true);
    b.faults().clear();
    b.holder("k").await.expect("cleared");
}

/// The error that stopped a lock is what every `wait_owned` answers, however many times and from
/// however many tasks (not `Closed` after the first).
#[tokio::test(start_paused = true)]
async fn every_wait_owned_answers_the_error_that_stopped_the_lock() {
    let b = MemoryBackend::new();
    b.faults().deny(true);
    let locker = locker_core::Locker::new(b.clone());
    let handle = std::sync::Arc::new(locker.lock("k", "v").await.unwrap());
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.wait_owned().await })
        })
        .collect();
    for waiter in waiters {
        let err = waiter.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    }
    for _ in 0..2 {
        let err = handle.wait_owned().await.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
        assert!(err.to_string().contains("permission denied"), "{err}");
    }
}
