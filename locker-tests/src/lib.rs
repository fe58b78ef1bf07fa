//! The conformance suite of locker: one `pub async fn` per behaviour of the public API
//! ([`suite`]) and one per clause of the backend contract, called on the backend directly
//! ([`contract`]), run unchanged on every backend through a [`Harness`]; plus the harnesses
//! themselves.
//!
//! A backend's test file instantiates the whole suite with one macro call, which makes one named
//! test per behaviour, and one per clause in a module `contract`:
//!
//! ```text
//! async fn harness(name: &str) -> MemoryHarness {
//!     MemoryHarness::new(name)
//! }
//!
//! locker_tests::conformance_suite!(#[tokio::test(start_paused = true)] harness);
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod calls;
pub mod chaos;
pub mod cluster;
pub mod contract;
pub mod etcd;
pub mod etcd_server;
pub mod harness;
pub mod interop;
pub mod memory;
pub mod proxy;
pub mod record;
pub mod suite;

pub use harness::{Client, ClientFaults, Cut, Harness, HistoryUse};

/// The examples of the workspace README, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
