#![doc = include_str!("../README.md")]

pub mod backend;
mod error;
mod hub;
mod lock;
mod locker;
mod retry;
mod session;
mod types;
mod watch;

pub use backend::{LockBackend, Watcher};
pub use error::{BoxError, Error, LossReason, Result};
pub use lock::{LockGuard, LockHandle};
pub use locker::{DEFAULT_TTL, LockOptions, Locker, LockerBuilder};
pub use types::{FencingToken, Holder, Ownership};
