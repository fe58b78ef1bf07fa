//! Fenced writes on etcd: a transaction that compares the tenure's entry, so that a write made
//! after the tenure ended is refused however late it runs.

use locker_core::{Locker, LossReason};
use locker_etcd::etcd_client::TxnOp;
use locker_etcd::testing::{EtcdServer, unique_prefix};

/// A leader whose lease an operator revoked has its late fenced write refused, while the new
/// leader's goes through; the fence names the entry the store had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_leaders_late_fenced_write_is_refused_and_the_new_leaders_applied() {
    let etcd = EtcdServer::shared().await.unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!("locker-test/{}", unique_prefix("fenced"));
    let (a_backend, b_backend) = (
        etcd.backend(&prefix).await.unwrap(),
        etcd.backend(&prefix).await.unwrap(),
    );
    let (a, b) = (
        Locker::new(a_backend.clone()),
        Locker::new(b_backend.clone()),
    );
    let resource = format!("{prefix}resource").into_bytes();
    let mut admin = etcd.client().await.unwrap();

    let old = a.campaign("leader", "a").await.unwrap();
    let fence = old.fence().clone();
    assert_eq!(fence.key(), "leader");
    assert_eq!(fence.token(), old.token());
    let stored = admin.get(a_backend.fence_key(&fence), None).await.unwrap();
    let kv = &stored.kvs()[0];
    assert_eq!(
        kv.create_revision(),
        fence.token().as_i64(),
        "the fence names the entry"
    );
    assert_eq!(kv.lease(), fence.lease());
    let written = a_backend
        .txn_fenced(&fence, [TxnOp::put(resource.clone(), "a", None)])
        .await
        .unwrap();
    assert!(written.is_some(), "the holder's fenced write goes through");

    let waiting = tokio::spawn(async move { b.campaign("leader", "b").await });
    admin.lease_revoke(fence.lease()).await.unwrap();
    assert_eq!(old.lost().await, LossReason::LeaseGone);
    let new = waiting.await.unwrap().unwrap();
    assert!(new.token() > fence.token());
    let applied = b_backend
        .txn_fenced(new.fence(), [TxnOp::put(resource.clone(), "b", None)])
        .await
        .unwrap();
    assert!(
        applied.is_some(),
        "the new holder's fenced write goes through"
    );

    // The old holder's write, late: refused, and the resource keeps the new holder's value.
    let late = a_backend
        .txn_fenced(&fence, [TxnOp::put(resource.clone(), "a-late", None)])
        .await
        .unwrap();
    assert!(late.is_none(), "the old holder's late write was applied");
    let value = admin.get(resource.clone(), None).await.unwrap();
    assert_eq!(value.kvs()[0].value(), b"b");

    new.resign().await.unwrap();
    drop(old);
    admin.delete(resource, None).await.unwrap();
}
