#![doc = include_str!("../README.md")]
// Links from other crates' pages that are built without this one's (`cargo doc --no-deps`) go to docs.rs.
#![doc(html_root_url = "https://docs.rs/locker-memory/0.1")]

mod backend;
mod faults;
mod store;
#[cfg(test)]
mod tests;

pub use backend::{MemoryBackend, MemoryBackendBuilder};
pub use faults::{Faults, PartitionMode};
