#![doc = include_str!("../README.md")]
// Links from other crates' pages that are built without this one's (`cargo doc --no-deps`) go to docs.rs.
#![doc(html_root_url = "https://docs.rs/locker-core/0.1")]

pub mod backend;
mod driver;
mod election;
mod error;
mod fence;
mod handle;
mod hub;
mod locker;
mod machine;
#[cfg(test)]
mod machine_tests;
mod reaper;
mod resume;
mod retry;
mod session;
mod types;
mod watch;

pub use backend::{LockBackend, Watcher};
pub use election::{LeaderOptions, Leadership, StopWork};
pub use error::{Error, ErrorSource, FailureKind, LossReason, Result};
pub use fence::{Fence, FencingGate, Stale};
pub use handle::{LockGuard, LockHandle, Tenure};
pub use locker::{DEFAULT_TTL, IntoBackend, LockOptions, Locker, LockerBuilder};
pub use resume::{BadResumeToken, ResumeToken};
pub use types::{FencingToken, Holder, HolderUpdate, Ownership, OwnershipEvents, OwnershipWatch};
