//! What the etcd backend does beyond the backend contract (whose clauses run on etcd in the
//! `conformance` test binary): etcd's rounding of TTLs, paging past deeper queues, many watches on
//! one stream, interop with etcd's lock service, streams across a restart, etcd's auth. On the etcd
//! [`EtcdServer::shared`] gives this binary, or a dedicated one; each test works under its own
//! prefix and revokes the leases it granted.

use std::time::Duration;

use etcd_client::{Client, LockOptions, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use locker_core::backend::{EventKind, entry_key};
use locker_core::{Error, LockBackend, Watcher};
use locker_etcd::EtcdBackend;
use locker_etcd::testing::{EtcdProcess, EtcdServer, enable_auth, unique_prefix};
use locker_tests::contract::next_events;

const TTL: Duration = Duration::from_secs(10);

/// The etcd of this test binary.
async fn shared() -> &'static EtcdServer {
    EtcdServer::shared().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn backend(test: &str) -> EtcdBackend {
    shared().await.backend(&unique_prefix(test)).await.unwrap()
}

/// etcd grants whole seconds, and at least its 2 s minimum: the backend rounds a TTL up, never
/// down (the contract's clause checks "at least"; this is etcd's rounding).
#[tokio::test]
async fn a_ttl_is_rounded_up_to_whole_seconds() {
    let backend = backend("lease").await;
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

/// A queue read pages past entries of deeper queues, even a dozen sharing one create revision (the
/// contract's `queues_are_isolated` cannot make those: only a raw transaction can).
#[tokio::test]
async fn queue_reads_page_past_deeper_entries_sharing_one_revision() {
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

/// A restart of etcd breaks every stream: a watch ends with a retryable error (the caller, core's
/// hub, resumes from the revision after the last one it saw, and nothing is missed), and
/// keep-alives re-open their stream without the caller noticing more than a pause.
#[tokio::test]
async fn a_restart_ends_watches_retryably_and_nothing_is_missed() {
    let mut etcd = EtcdProcess::start()
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
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.events.next())
        .await
        .expect("the broken watch ends in time");
    match ended {
        Some(Err(err)) => assert!(err.is_retryable(), "{err:?}"),
        other => panic!("the watch did not end with a retryable error: {other:?}"),
    }
    etcd.restart().await.unwrap();

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
    assert!(matches!(update, Some(Some(_))), "{update:?}");
    // Resumed from the revision after the last one seen: the update made meanwhile is there.
    let mut resumed = backend
        .watch("r/", Some(joined.revision + 1))
        .await
        .unwrap();
    let events = next_events(&mut resumed, 1).await;
    assert_eq!(events[0].entry.value, b"after");
    assert_eq!(
        events[0].entry.create_revision,
        joined.entry.create_revision
    );
    assert_eq!(backend.keep_alive(lease).await.unwrap(), Some(TTL));
    backend.revoke_lease(lease).await.unwrap();
    let events = next_events(&mut resumed, 1).await;
    assert_eq!(events[0].kind, EventKind::Delete);
}

/// A frozen etcd (say, of a test that failed before thawing it) stops as soon as it is dropped,
/// not after the 10 s given to an etcd that ignores SIGTERM: its supervisor has reaped it and
/// removed its directory when the drop returns.
#[tokio::test]
async fn a_frozen_etcd_stops_when_dropped() {
    let etcd = EtcdProcess::start()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let pid = etcd.pid().expect("running");
    let dir = etcd.dir().to_owned();
    etcd.pause().unwrap();
    drop(etcd);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "etcd was not reaped by its supervisor"
    );
    assert!(!dir.exists());
}

/// etcd's auth: refused credentials and keys outside the user's permission are PermissionDenied.
#[tokio::test]
async fn credentials_and_permissions_are_checked() {
    let etcd = EtcdProcess::start()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let mut admin = Client::connect(etcd.endpoints(), None).await.unwrap();
    enable_auth(&mut admin, "root-pw", "alice", "alice-pw", "app/")
        .await
        .unwrap();

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
