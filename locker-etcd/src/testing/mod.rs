//! A real, throwaway etcd for tests (feature `testing`, off by default).
//!
//! For testing your own services against real etcd semantics (leases that expire, watches,
//! compaction) without a shared cluster:
//!
//! - [`EtcdServer::start`] finds or starts an etcd: `LOCKER_ETCD_ENDPOINTS` (an existing
//!   cluster), else an `etcd` binary (`LOCKER_ETCD_BIN` or `PATH`) started on free loopback ports
//!   in a temporary directory, else Docker through `testcontainers`. Without any of them it fails
//!   with a message that says how to get one, so a test never passes by skipping its work.
//!   [`EtcdServer::shared`] gives one server per test process; [`unique_prefix`] gives each test
//!   its own keys on it.
//! - [`EtcdProcess::start`] and its variants start a dedicated etcd that a test can stop, kill,
//!   freeze ([`EtcdProcess::pause`]) and restart; [`EtcdProcess::start_tls`] with a [`TestPki`]
//!   serves TLS; [`EtcdServer::start_docker`] runs one in a container of a given image.
//! - [`EtcdCluster`] is a cluster of such processes on loopback, for failover tests; with
//!   [`EtcdCluster::start_mtls`] it speaks mutual TLS, to clients and between members.
//! - [`Proxy`] sits between one client and etcd, to cut, black-hole, heal or slow that link.
//! - [`enable_auth`] turns authentication on, with a user limited to one prefix.
//!
//! Started servers stop when dropped, and in any case when the test process ends (even if it is
//! killed): each etcd runs under a small supervisor that notices the end of the process.
//!
//! ```toml
//! [dev-dependencies]
//! locker-etcd = { version = "0.1", features = ["testing"] }
//! ```
//!
//! ```no_run
//! use locker_core::Locker;
//! use locker_etcd::testing::{EtcdServer, unique_prefix};
//!
//! #[tokio::test]
//! async fn my_service_takes_over() -> Result<(), Box<dyn std::error::Error>> {
//!     let etcd = EtcdServer::shared().await?; // one etcd for every test of this binary
//!     let locker = Locker::new(etcd.backend(&unique_prefix("takes-over")).await?);
//!     let guard = locker.acquire("leader", "me").await?;
//!     // ... the service under test ...
//!     guard.release().await?;
//!     Ok(())
//! }
//! # fn main() {}
//! ```

mod cluster;
mod pki;
mod proxy;
mod server;

pub use cluster::EtcdCluster;
pub use pki::TestPki;
pub use proxy::{LinkState, Proxy};
pub use server::{EtcdProcess, EtcdServer, etcd_binary, unique_prefix};

/// Turns authentication on, through `admin` (a client of an etcd that does not have it on yet):
/// a `root` user with `root_password`, and `user` with `password`, who may read and write the
/// keys under `prefix` only (through a role named after the user).
///
/// # Errors
///
/// The first request etcd refuses.
pub async fn enable_auth(
    admin: &mut etcd_client::Client,
    root_password: &str,
    user: &str,
    password: &str,
    prefix: &str,
) -> Result<(), etcd_client::Error> {
    let role = format!("{user}-role");
    admin.user_add("root", root_password, None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.role_add(role.as_str()).await?;
    admin
        .role_grant_permission(
            role.as_str(),
            etcd_client::Permission::read_write(prefix).with_prefix(),
        )
        .await?;
    admin.user_add(user, password, None).await?;
    admin.user_grant_role(user, role.as_str()).await?;
    admin.auth_enable().await?;
    Ok(())
}
