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

/// Interop with etcd's own recipes, through `etcdctl lock` and `etcdctl elect`.
mod interop {
    use locker_tests::etcd::EtcdHarness;
    use locker_tests::interop;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locker_waits_for_etcdctl_lock() {
        interop::locker_waits_for_etcdctl_lock(&EtcdHarness::new("interop-1").await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcdctl_lock_waits_for_locker() {
        interop::etcdctl_lock_waits_for_locker(&EtcdHarness::new("interop-2").await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcdctl_elect_is_seen_as_holder() {
        interop::etcdctl_elect_is_seen_as_holder(&EtcdHarness::new("interop-3").await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locker_holder_is_etcdctl_elect_leader() {
        interop::locker_holder_is_etcdctl_elect_leader(&EtcdHarness::new("interop-4").await).await;
    }
}

/// The testcontainers path: etcd in a Docker container (`LOCKER_ETCD_IMAGE`, or a local image
/// built from the etcd binary), and a lock hand-off through it.
#[path = "etcd/docker.rs"]
mod docker;

/// TLS and auth on dedicated etcd servers.
#[path = "etcd/security.rs"]
mod security;
