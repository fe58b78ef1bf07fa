#![doc = include_str!("../README.md")]
// Links from other crates' pages that are built without this one's (`cargo doc --no-deps`) go to docs.rs.
#![doc(html_root_url = "https://docs.rs/locker-etcd/0.1")]

mod backend;
mod config;
mod error;
mod keepalive;
#[cfg(feature = "testing")]
pub mod testing;
mod watch;

pub use backend::EtcdBackend;
pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PREFIX, DEFAULT_REQUEST_TIMEOUT,
    EtcdBackendBuilder,
};
/// etcd-client's TLS types, for [`EtcdBackendBuilder::tls`] (feature `tls`).
#[cfg(feature = "tls")]
pub use etcd_client::{Certificate, Identity, TlsOptions};

/// The etcd client this crate is built on, for [`EtcdBackend::from_client`] and for what locker
/// does not do: use it instead of a separate `etcd-client` dependency, so the versions match.
pub use etcd_client;

/// The examples of the workspace README, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
