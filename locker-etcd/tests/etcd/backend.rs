//! The etcd backend's calls against a real etcd (the one [`EtcdServer::shared`] gives this
//! binary). Each test works under its own prefix and revokes the leases it granted.

use std::time::Duration;

use etcd_client::{Client, CompactionOptions, LockOptions, Permission, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use locker_core::backend::{Entry, EventKind, WatchEvent, WatchStream, entry_key};
use locker_core::{Error, LockBackend, Watcher};
use locker_etcd::EtcdBackend;
use locker_etcd::testing::{EtcdServer, start_etcd_binary, unique_prefix};
use tokio::sync::RwLock;

const TTL: Duration = Duration::from_secs(10);

/// Compaction removes history for every key: tests that read or watch past revisions hold this
/// for reading, the compaction test for writing.
static HISTORY: RwLock<()> = RwLock::const_new(());

/// The etcd of this test binary.
async fn shared() -> &'static EtcdServer {
    EtcdServer::shared().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn backend(test: &str) -> EtcdBackend {
    shared().await.backend(&unique_prefix(test)).await.unwrap()
}

async fn next_batch(stream: &mut WatchStream) -> Vec<WatchEvent> {
    tokio::time::timeout(Duration::from_secs(10), stream.events.next())
        .await
        .expect("a watch batch within 10 s")
        .expect("the watch stream goes on")
        .expect("a batch, not an error")
}

/// Reads batches until `count` events arrived.
async fn next_events(stream: &mut WatchStream, count: usize) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    while events.len() < count {
        events.extend(next_batch(stream).await);
    }
    events
}

#[tokio::test]
async fn lease_grant_keep_alive_revoke() {
    let backend = backend("lease").await;
    let lease = backend.grant_lease(TTL).await.unwrap();
    assert_eq!(lease.ttl, TTL);
    assert_eq!(backend.keep_alive(lease.id).await.unwrap(), Some(TTL));
    // Again, on the same stream.
    assert_eq!(backend.keep_alive(lease.id).await.unwrap(), Some(TTL));
    backend.revoke_lease(lease.id).await.unwrap();
    assert_eq!(backend.keep_alive(lease.id).await.unwrap(), None);
    // Revoking a lease that is gone is fine.
    backend.revoke_lease(lease.id).await.unwrap();

    // etcd rounds a short TTL up to its 2 s minimum, and a fraction of a second up to a second.
    let short = backend.grant_lease(Duration::from_millis(1)).await.unwrap();
    assert_eq!(short.ttl, Duration::from_secs(2));
    let fraction = backend
        .grant_lease(Duration::from_millis(3_500))
        .await
        .unwrap();
    assert_eq!(fraction.ttl, Duration::from_secs(4));
    backend.revoke_lease(short.id).await.unwrap();
    backend.revoke_lease(fraction.id).await.unwrap();
}

#[tokio::test]
async fn keep_alive_of_a_lease_revoked_elsewhere_is_none() {
    let backend = backend("revoked-elsewhere").await;
    let other = shared().await.backend(backend.prefix()).await.unwrap();
    // One lease with an open keep-alive stream here, one never refreshed here.
    let refreshed = backend.grant_lease(TTL).await.unwrap();
    let fresh = backend.grant_lease(TTL).await.unwrap();
    assert!(backend.keep_alive(refreshed.id).await.unwrap().is_some());
    other.revoke_lease(refreshed.id).await.unwrap();
    other.revoke_lease(fresh.id).await.unwrap();
    assert_eq!(backend.keep_alive(refreshed.id).await.unwrap(), None);
    assert_eq!(backend.keep_alive(fresh.id).await.unwrap(), None);
}

#[tokio::test]
async fn join_is_idempotent_and_answers_the_predecessor() {
    let backend = backend("join").await;
    let a = backend.grant_lease(TTL).await.unwrap().id;
    let b = backend.grant_lease(TTL).await.unwrap().id;

    let first = backend.join("k", a, b"value-a").await.unwrap();
    assert_eq!(first.entry.key, entry_key("k", a));
    assert_eq!(first.entry.key, format!("k/{a:x}"));
    assert_eq!(first.entry.value, b"value-a");
    assert_eq!(first.entry.lease, a);
    assert_eq!(first.entry.create_revision, first.revision);
    assert_eq!(first.predecessor, None, "first in the queue: the holder");

    // A second join under the same lease finds the same entry, value and place.
    let again = backend.join("k", a, b"other").await.unwrap();
    assert_eq!(again.entry, first.entry);
    assert_eq!(again.predecessor, None);
    assert!(again.revision >= first.revision);

    let second = backend.join("k", b, b"value-b").await.unwrap();
    assert_eq!(second.predecessor, Some(first.entry.clone()));
    assert!(second.entry.create_revision > first.entry.create_revision);

    let (holder, revision) = backend.holder("k").await.unwrap();
    assert_eq!(holder.as_ref(), Some(&first.entry));
    assert!(revision >= second.revision);

    let snapshot = backend.entries("k").await.unwrap();
    assert_eq!(
        snapshot.entries,
        vec![first.entry.clone(), second.entry.clone()]
    );

    let position = backend
        .position("k", &second.entry.key, second.entry.create_revision)
        .await
        .unwrap();
    assert_eq!(position.own.as_ref(), Some(&second.entry));
    assert_eq!(position.predecessor.as_ref(), Some(&first.entry));

    let position = backend
        .position("k", &first.entry.key, first.entry.create_revision)
        .await
        .unwrap();
    assert_eq!(position.own.as_ref(), Some(&first.entry));
    assert_eq!(position.predecessor, None);

    // Asked about another create revision, the entry is not "own".
    let position = backend
        .position("k", &first.entry.key, first.entry.create_revision + 1000)
        .await
        .unwrap();
    assert_eq!(position.own, None);

    backend.revoke_lease(a).await.unwrap();
    let (holder, _) = backend.holder("k").await.unwrap();
    assert_eq!(holder.as_ref(), Some(&second.entry));
    backend.revoke_lease(b).await.unwrap();
    let (holder, _) = backend.holder("k").await.unwrap();
    assert_eq!(holder, None);
    assert!(backend.entries("k").await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn queues_are_isolated() {
    let etcd = shared().await;
    let prefix = unique_prefix("isolation");
    let backend = etcd.backend(&prefix).await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let other = backend.grant_lease(TTL).await.unwrap().id;

    // Twelve entries of the deeper queue `a/b`, all created in one transaction (one create
    // revision), before anything in `a`: a holder read of `a` must page past them.
    let deeper = |queue: &str| {
        let queue = format!("{prefix}{queue}");
        Txn::new().and_then(
            (0..12)
                .map(|i| {
                    TxnOp::put(
                        format!("{queue}/{i:x}"),
                        "deep",
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    raw.txn(deeper("a/b")).await.unwrap();
    assert_eq!(backend.holder("a").await.unwrap().0, None);
    assert!(backend.entries("a").await.unwrap().entries.is_empty());

    let in_a = backend.join("a", lease, b"a").await.unwrap();
    assert_eq!(
        in_a.predecessor, None,
        "the predecessor in `a` is not from `a/b`"
    );
    assert_eq!(
        backend.holder("a").await.unwrap().0,
        Some(in_a.entry.clone())
    );

    // More deeper entries between the two entries of `a`: the predecessor read must page too.
    raw.txn(deeper("a/c")).await.unwrap();
    let second = backend.join("a", other, b"a2").await.unwrap();
    assert_eq!(second.predecessor, Some(in_a.entry.clone()));
    let position = backend
        .position("a", &second.entry.key, second.entry.create_revision)
        .await
        .unwrap();
    assert_eq!(position.predecessor, Some(in_a.entry.clone()));

    let in_ab = backend.join("ab", lease, b"ab").await.unwrap();
    let in_a_b = backend.join("a/b", other, b"a/b").await.unwrap();
    assert_eq!(in_ab.predecessor, None, "`ab` is its own queue");
    assert_eq!(
        in_a_b.predecessor.map(|e| e.value),
        Some(b"deep".to_vec()),
        "`a/b` holds the raw entries"
    );

    let entries = backend.entries("a").await.unwrap().entries;
    assert_eq!(entries, vec![in_a.entry.clone(), second.entry.clone()]);
    assert_eq!(
        backend.entries("ab").await.unwrap().entries,
        vec![in_ab.entry]
    );
    assert_eq!(backend.entries("a/b").await.unwrap().entries.len(), 13);

    backend.revoke_lease(lease).await.unwrap();
    backend.revoke_lease(other).await.unwrap();
    assert!(backend.entries("a/b").await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn delete_and_update_are_guarded_by_create_revision() {
    let etcd = shared().await;
    let prefix = unique_prefix("guarded");
    let backend = etcd.backend(&prefix).await.unwrap();
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let joined = backend.join("g", lease, b"one").await.unwrap();
    let entry = joined.entry;
    let revision = entry.create_revision;

    assert!(
        !backend
            .update_value(&entry.key, revision + 1, b"x")
            .await
            .unwrap()
    );
    assert!(!backend.update_value(&entry.key, 0, b"x").await.unwrap());
    assert!(
        backend
            .update_value(&entry.key, revision, b"two")
            .await
            .unwrap()
    );
    let entries = backend.entries("g").await.unwrap().entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].value, b"two");
    assert_eq!(entries[0].lease, lease, "the update keeps the lease");
    assert_eq!(entries[0].create_revision, revision, "and the place");
    assert!(entries[0].mod_revision > revision);

    assert!(
        !backend
            .delete_entry(&entry.key, revision - 1)
            .await
            .unwrap()
    );
    assert!(!backend.delete_entry(&entry.key, 0).await.unwrap());
    assert!(!backend.delete_entry("g/missing", revision).await.unwrap());
    assert!(backend.delete_entry(&entry.key, revision).await.unwrap());
    assert!(!backend.delete_entry(&entry.key, revision).await.unwrap());
    assert!(
        !backend
            .update_value(&entry.key, revision, b"three")
            .await
            .unwrap()
    );
    assert!(backend.entries("g").await.unwrap().entries.is_empty());

    // A re-join creates a new entry with a new place.
    let rejoined = backend.join("g", lease, b"four").await.unwrap();
    assert!(rejoined.entry.create_revision > revision);
    // The lease still carries it: revoking deletes it.
    backend.revoke_lease(lease).await.unwrap();
    assert!(backend.entries("g").await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn a_gone_lease_makes_join_fail_with_lease_lost() {
    let backend = backend("gone-lease").await;
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    backend.revoke_lease(lease).await.unwrap();
    match backend.join("k", lease, b"v").await {
        Err(Error::LeaseLost { lease: lost }) => assert_eq!(lost, lease),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert!(backend.entries("k").await.unwrap().entries.is_empty());
    // A lease that never existed, likewise.
    match backend.join("k", 0x7777_0000_1234, b"v").await {
        Err(Error::LeaseLost { lease }) => assert_eq!(lease, 0x7777_0000_1234),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert!(backend.entries("k").await.unwrap().entries.is_empty());

    // The same on a queue that is not empty (the join takes its other branch), and on one that
    // holds only entries of a deeper queue.
    let live = backend.grant_lease(TTL).await.unwrap().id;
    let holder = backend.join("k", live, b"holder").await.unwrap();
    backend.join("d/deeper", live, b"deep").await.unwrap();
    for queue in ["k", "d"] {
        for gone in [lease, 0x7777_0000_1234] {
            match backend.join(queue, gone, b"v").await {
                Err(Error::LeaseLost { lease: lost }) => assert_eq!(lost, gone),
                other => panic!("expected LeaseLost in {queue}, got {other:?}"),
            }
        }
    }
    assert_eq!(
        backend.entries("k").await.unwrap().entries,
        vec![holder.entry]
    );
    assert!(backend.entries("d").await.unwrap().entries.is_empty());
    backend.revoke_lease(live).await.unwrap();
}

#[tokio::test]
async fn join_on_an_empty_queue_creates_the_holder() {
    let backend = backend("join-empty").await;
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let joined = backend.join("e", lease, b"first").await.unwrap();
    assert_eq!(joined.predecessor, None);
    assert_eq!(joined.entry.key, entry_key("e", lease));
    assert_eq!(joined.entry.value, b"first");
    assert_eq!(joined.entry.lease, lease);
    assert_eq!(joined.entry.create_revision, joined.revision);
    assert_eq!(joined.entry.mod_revision, joined.revision);
    // The answer is what etcd stored.
    let snapshot = backend.entries("e").await.unwrap();
    assert_eq!(snapshot.entries, vec![joined.entry.clone()]);
    assert_eq!(backend.holder("e").await.unwrap().0, Some(joined.entry));
    backend.revoke_lease(lease).await.unwrap();
}

#[tokio::test]
async fn join_behind_two_answers_the_newer() {
    let backend = backend("join-behind-two").await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(backend.grant_lease(TTL).await.unwrap().id);
    }
    let first = backend.join("t", leases[0], b"1").await.unwrap();
    let second = backend.join("t", leases[1], b"2").await.unwrap();
    let third = backend.join("t", leases[2], b"3").await.unwrap();
    assert_eq!(first.predecessor, None);
    assert_eq!(second.predecessor, Some(first.entry.clone()));
    assert_eq!(third.predecessor, Some(second.entry.clone()));
    assert_eq!(third.entry.create_revision, third.revision);
    assert!(third.entry.create_revision > second.entry.create_revision);
    let position = backend
        .position("t", &third.entry.key, third.entry.create_revision)
        .await
        .unwrap();
    assert_eq!(
        position.predecessor, third.predecessor,
        "as position answers"
    );
    for lease in leases {
        backend.revoke_lease(lease).await.unwrap();
    }
}

#[tokio::test]
async fn join_ignores_entries_of_deeper_queues() {
    let etcd = shared().await;
    let prefix = unique_prefix("join-deeper");
    let backend = etcd.backend(&prefix).await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    let deep = backend.grant_lease(TTL).await.unwrap().id;
    let first = backend.grant_lease(TTL).await.unwrap().id;
    let second = backend.grant_lease(TTL).await.unwrap().id;
    // More than a page of keys of the deeper queue `a/b`, each at its own revision.
    let mut put_deep = async |range: std::ops::Range<u32>| {
        for i in range {
            raw.put(
                format!("{prefix}a/b/{i:x}"),
                "deep",
                Some(PutOptions::new().with_lease(deep)),
            )
            .await
            .unwrap();
        }
    };
    put_deep(0..10).await;
    let in_a = backend.join("a", first, b"a1").await.unwrap();
    assert_eq!(in_a.predecessor, None, "keys of `a/b` are not in `a`");
    assert_eq!(in_a.entry.create_revision, in_a.revision);

    // Newer deeper keys than the entry of `a`: the predecessor read pages past them.
    put_deep(10..30).await;
    let behind = backend.join("a", second, b"a2").await.unwrap();
    assert_eq!(behind.predecessor, Some(in_a.entry.clone()));
    // Retried, both find the same answers in the whole queue.
    let again = backend.join("a", second, b"a2").await.unwrap();
    assert_eq!(again.entry, behind.entry);
    assert_eq!(again.predecessor, Some(in_a.entry.clone()));
    let again = backend.join("a", first, b"a1").await.unwrap();
    assert_eq!((again.entry, again.predecessor), (in_a.entry.clone(), None));
    assert_eq!(
        backend.entries("a").await.unwrap().entries,
        vec![in_a.entry, behind.entry]
    );
    for lease in [deep, first, second] {
        backend.revoke_lease(lease).await.unwrap();
    }
}

#[tokio::test]
async fn a_retried_join_answers_its_own_place() {
    let backend = backend("join-retried").await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(backend.grant_lease(TTL).await.unwrap().id);
    }
    let mut joined = Vec::new();
    for (i, lease) in leases.iter().enumerate() {
        joined.push(
            backend
                .join("r", *lease, format!("v{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    let last = joined[2].revision;
    for (i, lease) in leases.iter().enumerate() {
        let again = backend.join("r", *lease, b"changed").await.unwrap();
        assert_eq!(
            again.entry, joined[i].entry,
            "the same entry, value and place"
        );
        let expected = i.checked_sub(1).map(|before| joined[before].entry.clone());
        assert_eq!(again.predecessor, expected, "the predecessor of entry {i}");
        assert!(again.revision >= last);
    }
    // With the middle one gone, the last waits for the first.
    backend.revoke_lease(leases[1]).await.unwrap();
    let again = backend.join("r", leases[2], b"v2").await.unwrap();
    assert_eq!(again.predecessor, Some(joined[0].entry.clone()));
    backend.revoke_lease(leases[0]).await.unwrap();
    backend.revoke_lease(leases[2]).await.unwrap();
}

#[tokio::test]
async fn watch_from_a_revision_sees_puts_and_deletes() {
    let _history = HISTORY.read().await;
    let backend = backend("watch").await;
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let joined = backend.join("w", lease, b"one").await.unwrap();
    let entry = joined.entry.clone();

    // From the join's revision: the join itself comes first.
    let mut stream = backend.watch("w/", Some(joined.revision)).await.unwrap();
    assert_eq!(stream.start_revision, joined.revision);
    // And a watch from now, on the same stream.
    let mut from_now = backend.watch("", None).await.unwrap();
    assert!(from_now.start_revision > joined.revision);
    let (_, read_at) = backend.holder("w").await.unwrap();
    assert!(read_at >= from_now.start_revision - 1);

    let first = next_batch(&mut stream).await;
    assert_eq!(
        first,
        vec![WatchEvent {
            kind: EventKind::Put,
            entry: entry.clone()
        }]
    );

    assert!(
        backend
            .update_value(&entry.key, entry.create_revision, b"two")
            .await
            .unwrap()
    );
    assert!(
        backend
            .delete_entry(&entry.key, entry.create_revision)
            .await
            .unwrap()
    );
    for stream in [&mut stream, &mut from_now] {
        let events = next_events(stream, 2).await;
        assert_eq!(events[0].kind, EventKind::Put);
        assert_eq!(
            events[0].entry.key, entry.key,
            "keys are relative to the root"
        );
        assert_eq!(events[0].entry.value, b"two");
        assert_eq!(events[0].entry.lease, lease);
        assert_eq!(events[0].entry.create_revision, entry.create_revision);
        assert_eq!(events[1].kind, EventKind::Delete);
        assert_eq!(events[1].entry.key, entry.key);
        assert_eq!(
            events[1].entry.mod_revision,
            events[0].entry.mod_revision + 1
        );
    }

    // Other keys under the root reach the root watch only.
    let other = backend.join("x", lease, b"x").await.unwrap();
    let events = next_events(&mut from_now, 1).await;
    assert_eq!(events[0].entry, other.entry);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.events.next())
            .await
            .is_err(),
        "the watch of `w/` saw a change of `x`"
    );

    // Dropping a watch leaves the others on the shared stream running.
    drop(from_now);
    let again = backend.join("w", lease, b"three").await.unwrap();
    assert_eq!(next_events(&mut stream, 1).await[0].entry, again.entry);
    backend.revoke_lease(lease).await.unwrap();
    let events = next_events(&mut stream, 1).await;
    assert_eq!(
        events[0].kind,
        EventKind::Delete,
        "the lease's end deletes the entry"
    );
}

#[tokio::test]
async fn many_watches_share_one_stream() {
    let backend = backend("many-watches").await;
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let mut streams = Vec::new();
    for i in 0..20 {
        streams.push(backend.watch(&format!("q{i}/"), None).await.unwrap());
    }
    for i in (0..20).rev() {
        backend.join(&format!("q{i}"), lease, b"v").await.unwrap();
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let events = next_events(stream, 1).await;
        assert_eq!(events[0].entry.key, entry_key(&format!("q{i}"), lease));
    }
    backend.revoke_lease(lease).await.unwrap();
}

#[tokio::test]
async fn a_compacted_revision_gives_compacted() {
    let _history = HISTORY.write().await;
    let etcd = shared().await;
    let backend = etcd.backend(&unique_prefix("compacted")).await.unwrap();
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let first = backend.join("c", lease, b"1").await.unwrap();
    // A watch that is already running is not disturbed by a compaction.
    let mut running = backend.watch("c/", Some(first.revision)).await.unwrap();
    assert_eq!(next_events(&mut running, 1).await[0].entry, first.entry);
    backend.join("d", lease, b"2").await.unwrap();
    let last = backend.join("e", lease, b"3").await.unwrap();

    let mut raw = etcd.client().await.unwrap();
    raw.compact(
        last.revision,
        Some(CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();

    let err = match backend.watch("", Some(first.revision)).await {
        Err(err) => err,
        Ok(mut stream) => tokio::time::timeout(Duration::from_secs(10), stream.events.next())
            .await
            .expect("an answer within 10 s")
            .expect("an error before the end")
            .expect_err("no events from a compacted revision"),
    };
    match err {
        Error::Compacted {
            requested,
            compact_revision,
        } => {
            assert_eq!(requested, first.revision);
            assert_eq!(compact_revision, last.revision);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }

    // From the compaction revision on, history is there.
    let mut stream = backend.watch("e/", Some(last.revision)).await.unwrap();
    assert_eq!(next_events(&mut stream, 1).await[0].entry, last.entry);

    let update = backend
        .update_value(&first.entry.key, first.entry.create_revision, b"after")
        .await
        .unwrap();
    assert!(update);
    let events = next_events(&mut running, 1).await;
    assert_eq!(events[0].entry.value, b"after");
    backend.revoke_lease(lease).await.unwrap();
}

/// etcd's own lock service (the Go `concurrency.Mutex` recipe, as `etcdctl lock` uses it) and
/// locker see each other's entries.
#[tokio::test]
async fn etcd_lock_service_interoperates() {
    let etcd = shared().await;
    let prefix = unique_prefix("interop");
    let backend = etcd.backend(&prefix).await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    let theirs = backend.grant_lease(TTL).await.unwrap().id;
    let ours = backend.grant_lease(TTL).await.unwrap().id;

    let locked = raw
        .lock(
            format!("{prefix}m"),
            Some(LockOptions::new().with_lease(theirs)),
        )
        .await
        .unwrap();
    let their_key = String::from_utf8(locked.key().to_vec()).unwrap();
    assert_eq!(their_key, format!("{prefix}{}", entry_key("m", theirs)));

    let joined = backend.join("m", ours, b"ours").await.unwrap();
    let predecessor = joined.predecessor.clone().expect("their entry before ours");
    assert_eq!(predecessor.key, entry_key("m", theirs));
    assert_eq!(predecessor.lease, theirs);
    let position = backend
        .position("m", &joined.entry.key, joined.entry.create_revision)
        .await
        .unwrap();
    assert_eq!(position.predecessor.map(|e| e.lease), Some(theirs));

    raw.unlock(locked.key()).await.unwrap();
    let (holder, _) = backend.holder("m").await.unwrap();
    assert_eq!(holder, Some(joined.entry));
    backend.revoke_lease(theirs).await.unwrap();
    backend.revoke_lease(ours).await.unwrap();
}

/// A restart of etcd breaks every stream; watches resume from where they were and keep-alives
/// re-open their stream, without the caller noticing more than a pause.
#[tokio::test]
async fn streams_survive_an_etcd_restart() {
    let mut etcd = start_etcd_binary()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let backend = etcd.backend(&unique_prefix("restart")).await.unwrap();
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let joined = backend.join("r", lease, b"before").await.unwrap();
    let mut stream = backend.watch("r/", Some(joined.revision)).await.unwrap();
    assert_eq!(next_events(&mut stream, 1).await[0].entry, joined.entry);
    assert!(backend.keep_alive(lease).await.unwrap().is_some());

    etcd.stop().unwrap();
    assert!(matches!(
        backend.keep_alive(lease).await,
        Err(Error::Unavailable { .. })
    ));
    etcd.start().await.unwrap();

    // Unary calls reconnect by themselves; give the channel a moment if needed.
    let mut update = None;
    for _ in 0..50 {
        match backend
            .update_value(&joined.entry.key, joined.entry.create_revision, b"after")
            .await
        {
            Ok(updated) => {
                update = Some(updated);
                break;
            }
            Err(err) if err.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(err) => panic!("{err:?}"),
        }
    }
    assert_eq!(update, Some(true));
    let events = next_events(&mut stream, 1).await;
    assert_eq!(events[0].entry.value, b"after");
    assert_eq!(
        events[0].entry.create_revision,
        joined.entry.create_revision
    );
    assert_eq!(backend.keep_alive(lease).await.unwrap(), Some(TTL));
    backend.revoke_lease(lease).await.unwrap();
    let events = next_events(&mut stream, 1).await;
    assert_eq!(events[0].kind, EventKind::Delete);
}

#[tokio::test]
async fn limits_match_etcd() {
    let backend = backend("limits").await;
    let limits = backend.limits();
    assert_eq!(limits.min_ttl, Duration::from_secs(2));
    assert_eq!(limits.max_ttl, Duration::from_secs(9_000_000_000));
    assert_eq!(limits.max_value_len, 1_572_864 - 16 * 1024);
    let prefix_len = backend.prefix().len();
    assert_eq!(limits.max_key_len, (16 * 1024 - 512) / 7 - prefix_len - 17);

    // The largest key and value together fit in one join.
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let key = "k".repeat(limits.max_key_len);
    let value = vec![b'v'; limits.max_value_len];
    let joined = backend.join(&key, lease, &value).await.unwrap();
    assert_eq!(joined.entry.value.len(), limits.max_value_len);
    let Entry { key: entry, .. } = joined.entry;
    assert!(entry.starts_with(&key));
    backend.revoke_lease(lease).await.unwrap();
}

/// etcd's auth: refused credentials and keys outside the user's permission are PermissionDenied.
#[tokio::test]
async fn credentials_and_permissions_are_checked() {
    let etcd = start_etcd_binary()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let mut admin = Client::connect(etcd.endpoints(), None).await.unwrap();
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("lockers").await.unwrap();
    admin
        .role_grant_permission("lockers", Permission::read_write("app/").with_prefix())
        .await
        .unwrap();
    admin.user_add("alice", "alice-pw", None).await.unwrap();
    admin.user_grant_role("alice", "lockers").await.unwrap();
    admin.auth_enable().await.unwrap();

    let builder = || {
        EtcdBackend::builder()
            .endpoints(etcd.endpoints())
            .connect_timeout(Duration::from_secs(5))
    };
    let err = builder()
        .prefix("app/")
        .user("alice", "wrong")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    assert!(!err.is_retryable());

    let err = builder()
        .prefix("other/")
        .user("alice", "alice-pw")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");

    let backend = builder()
        .prefix("app/")
        .user("alice", "alice-pw")
        .connect()
        .await
        .unwrap();
    assert!(!format!("{backend:?}").contains("alice-pw"));
    let lease = backend.grant_lease(TTL).await.unwrap().id;
    let joined = backend.join("k", lease, b"v").await.unwrap();
    assert_eq!(joined.predecessor, None);
    let mut stream = backend.watch("k/", Some(joined.revision)).await.unwrap();
    assert_eq!(next_events(&mut stream, 1).await[0].entry, joined.entry);
    backend.revoke_lease(lease).await.unwrap();

    // The same user under a prefix it may not touch, on an existing client.
    let client = Client::connect(
        etcd.endpoints(),
        Some(etcd_client::ConnectOptions::new().with_user("alice", "alice-pw")),
    )
    .await
    .unwrap();
    let outside = EtcdBackend::from_client_with_prefix(client, "other/");
    let lease = outside.grant_lease(TTL).await.unwrap().id;
    let err = outside.join("k", lease, b"v").await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    let err = outside.watch("k/", None).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    outside.revoke_lease(lease).await.unwrap();
}
