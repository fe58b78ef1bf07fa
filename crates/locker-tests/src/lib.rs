//! The conformance suite of locker: one `pub async fn` per behaviour, run unchanged on every
//! backend through a [`Harness`], plus the harnesses themselves.
//!
//! A backend's test file instantiates the whole suite with one macro call, which makes one named
//! test per behaviour:
//!
//! ```ignore
//! locker_tests::conformance_suite!(
//!     #[tokio::test(start_paused = true)]
//!     async fn harness(name) { locker_tests::memory::MemoryHarness::new(name) }
//! );
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod harness;
pub mod memory;
pub mod suite;

pub use harness::{Client, ClientFaults, Cut, Harness};
