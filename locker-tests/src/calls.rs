//! Counts of the backend calls core makes (kept by [`RecordingBackend`](crate::RecordingBackend)),
//! so tests and the benchmark can say which round trips an operation costs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A method of the backend contract, as [`RecordingBackend`](crate::RecordingBackend) counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// [`LockBackend::grant_lease`](locker_core::LockBackend::grant_lease).
    GrantLease,
    /// [`LockBackend::keep_alive`](locker_core::LockBackend::keep_alive).
    KeepAlive,
    /// [`LockBackend::revoke_lease`](locker_core::LockBackend::revoke_lease).
    RevokeLease,
    /// [`LockBackend::join`](locker_core::LockBackend::join).
    Join,
    /// [`LockBackend::position`](locker_core::LockBackend::position).
    Position,
    /// [`LockBackend::holder`](locker_core::LockBackend::holder).
    Holder,
    /// [`LockBackend::entries`](locker_core::LockBackend::entries).
    Entries,
    /// [`LockBackend::delete_entry`](locker_core::LockBackend::delete_entry).
    DeleteEntry,
    /// [`LockBackend::update_value`](locker_core::LockBackend::update_value).
    UpdateValue,
    /// [`LockBackend::resume`](locker_core::LockBackend::resume).
    Resume,
    /// [`Watcher::watch`](locker_core::Watcher::watch).
    Watch,
}

/// The names of the methods of the backend contract, in the order of [`Method`] (and of
/// [`Calls`]).
pub const METHODS: [&str; 11] = [
    "grant_lease",
    "keep_alive",
    "revoke_lease",
    "join",
    "position",
    "holder",
    "entries",
    "delete_entry",
    "update_value",
    "resume",
    "watch",
];

/// Call counters, one per method of [`METHODS`], and the watch events delivered.
#[derive(Debug, Default)]
pub struct Counts {
    calls: [AtomicU64; 11],
    events: AtomicU64,
}

/// A snapshot of [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls(pub [u64; 11]);

impl Counts {
    pub(crate) fn bump(&self, method: Method) {
        self.calls[method as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_events(&self, events: usize) {
        self.events.fetch_add(events as u64, Ordering::Relaxed);
    }

    /// The watch events the backend's watch streams have delivered so far, over all of them.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// The counts now.
    pub fn snapshot(&self) -> Calls {
        Calls(std::array::from_fn(|i| {
            self.calls[i].load(Ordering::Relaxed)
        }))
    }
}

impl Calls {
    /// The calls made since `earlier`.
    pub fn since(self, earlier: Calls) -> Calls {
        Calls(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }

    /// The calls of both snapshots together.
    pub fn plus(self, other: Calls) -> Calls {
        Calls(std::array::from_fn(|i| self.0[i] + other.0[i]))
    }

    /// The calls of `method` (by its name in [`METHODS`]; 0 for another name).
    pub fn get(self, method: &str) -> u64 {
        METHODS
            .iter()
            .position(|m| *m == method)
            .map_or(0, |i| self.0[i])
    }

    /// The calls of every method together.
    pub fn total(self) -> u64 {
        self.0.iter().sum()
    }

    /// `join 1.00, delete_entry 1.00` per `ops` operations (methods never called are left out).
    pub fn per_op(self, ops: usize) -> String {
        let ops = ops.max(1) as f64;
        let parts: Vec<String> = METHODS
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(m, n)| format!("{m} {:.2}", n as f64 / ops))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

impl fmt::Display for Calls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.per_op(1))
    }
}
