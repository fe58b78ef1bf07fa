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
