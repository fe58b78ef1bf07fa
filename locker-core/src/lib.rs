#![doc = include_str!("../README.md")]

pub mod backend;
mod driver;
mod error;
mod handle;
mod hub;
mod locker;
mod machine;
#[cfg(test)]
mod machine_tests;
mod reaper;
mod retry;
mod session;
mod types;
mod watch;

pub use backend::{LockBackend, Watcher};
pub use error::{Error, ErrorSource, FailureKind, LossReason, Result};
pub use handle::{LockGuard, LockHandle, Tenure};
pub use locker::{DEFAULT_TTL, LockOptions, Locker, LockerBuilder};
pub use types::{FencingToken, Holder, HolderUpdate, Ownership};
