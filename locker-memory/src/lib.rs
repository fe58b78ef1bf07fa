#![doc = include_str!("../README.md")]

mod backend;
mod faults;
mod store;
#[cfg(test)]
mod tests;

pub use backend::{MemoryBackend, MemoryBackendBuilder};
pub use faults::{Faults, PartitionMode};
