#![doc = include_str!("../README.md")]

mod backend;
mod config;
mod error;
mod keepalive;
mod watch;

pub use backend::EtcdBackend;
pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PREFIX, DEFAULT_REQUEST_TIMEOUT,
    EtcdBackendBuilder,
};
/// etcd-client's TLS types, for [`EtcdBackendBuilder::tls`] (feature `tls`).
#[cfg(feature = "tls")]
pub use etcd_client::{Certificate, Identity, TlsOptions};
