//! The conformance suite of locker: the behaviours every backend must show through the public API
//! ([`suite`]), one `pub async fn` each, run unchanged on every backend through a [`Harness`];
//! the recorder of believed tenures ([`record`]) and the seeded chaos run with its safety checker
//! ([`chaos`]).
//!
//! A backend's test file instantiates the whole suite with one macro call, which makes one named
//! test per behaviour:
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
pub mod harness;
pub mod record;
pub mod suite;

pub use harness::{Client, ClientFaults, Cut, Harness, RecordingBackend, init_logging};
