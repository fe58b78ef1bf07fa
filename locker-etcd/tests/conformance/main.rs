//! The conformance suite on a real etcd: every behaviour and backend-contract clause that the
//! memory backend runs, unchanged, in real time, on one etcd shared by the tests of this binary
//! (each under its own key prefix); and interop with etcd's own recipes through `etcdctl`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod interop;

use harness::EtcdHarness;

async fn harness(name: &str) -> EtcdHarness {
    EtcdHarness::new(name).await
}

locker_tests::conformance_suite!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    harness
);
