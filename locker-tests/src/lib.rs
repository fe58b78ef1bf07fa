// Links from other crates' pages that are built without this one's (`cargo doc --no-deps`) go to docs.rs.
#![doc(html_root_url = "https://docs.rs/locker-tests/0.1")]
//! The conformance suite of locker: one `pub async fn` per behaviour of the public API
//! ([`suite`]) and one per clause of the backend contract, called on the backend directly
//! ([`contract`]), run unchanged on every backend through a [`Harness`]; the recorder of believed
//! tenures ([`record`]) and the seeded chaos run with its safety checker ([`chaos`]).
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
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod calls;
pub mod chaos;
pub mod contract;
pub mod election;
pub mod harness;
pub mod record;
pub mod suite;

pub use harness::{
    Client, ClientFaults, Cut, Harness, HistoryClaim, HistoryUse, LeaseLog, RecordingBackend,
    init_logging,
};

/// What a [`Harness`] is written with, so a backend's tests need no other dependency for it.
pub use async_trait::async_trait;
/// The API under test.
pub use locker_core;
