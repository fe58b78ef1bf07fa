//! The conformance suite on a real etcd (one per test binary, see `locker_tests::etcd_server`),
//! every behaviour of `--test memory`, unchanged, in real time.

use locker_tests::etcd::EtcdHarness;

async fn harness(name: &str) -> EtcdHarness {
    EtcdHarness::new(name).await
}

locker_tests::conformance_suite!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    harness
);
