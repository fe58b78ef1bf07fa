//! Fault injection for one client of the memory store.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use locker_core::{Error, Result};
use tokio::sync::watch;
use tracing::{debug, trace};

/// How a partitioned client behaves; see [`Faults::partition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartitionMode {
    /// Every call fails at once with [`Error::Unavailable`], and every live watch stream of the
    /// client ends with an `Unavailable` item: a refused connection.
    Fail,
    /// Every call blocks (without using CPU) until [`Faults::heal`], then goes on normally; live
    /// watch streams deliver nothing until then, and then everything they missed, in order: a
    /// connection that stalls.
    Hang,
}

/// The partition state, published to hung calls and live watch streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartitionState {
    pub(crate) mode: Option<PartitionMode>,
    /// Bumped by every `partition(Fail)`: a watch stream that saw another epoch than its own was
    /// cut, even if the client healed before the stream was next polled.
    pub(crate) fail_epoch: u64,
}

#[derive(Debug, Default)]
struct Counters {
    latency: Duration,
    fail_next: u64,
    denied: bool,
}

pub(crate) struct FaultState {
    pub(crate) client: u64,
    partition: watch::Sender<PartitionState>,
    counters: Mutex<Counters>,
}

/// The fault injection switches of one client: a cheap handle (clone it freely) from
/// [`MemoryBackend::faults`](crate::MemoryBackend::faults).
///
/// Faults apply to the [`LockBackend`](locker_core::LockBackend) and
/// [`Watcher`](locker_core::Watcher) methods of that client (and of its clones) only: another
/// client from [`MemoryBackend::new_client`](crate::MemoryBackend::new_client) and the operator
/// methods ([`MemoryBackend::compact`](crate::MemoryBackend::compact) and the like) are not affected.
///
/// Every call of the client goes through these steps, in this order, before it touches the store
/// (so a call cancelled during any of them has done nothing):
///
/// 1. sleep for the [latency](Faults::set_latency), on tokio time;
/// 2. while [partitioned](Faults::partition) in [`PartitionMode::Hang`], wait for a change; in
///    [`PartitionMode::Fail`], fail with [`Error::Unavailable`];
/// 3. if the client is [denied](Faults::deny), fail with [`Error::PermissionDenied`];
/// 4. if [failures are queued](Faults::fail_next), take one and fail with
///    [`Error::Unavailable`];
/// 5. run the operation on the store, atomically.
#[derive(Clone)]
pub struct Faults {
    pub(crate) inner: Arc<FaultState>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counters = self.counters();
        f.debug_struct("Faults")
            .field("client", &self.inner.client)
            .field("partition", &self.partitioned())
            .field("latency", &counters.0)
            .field("fail_next", &counters.1)
            .finish()
    }
}

impl Faults {
    pub(crate) fn new(client: u64) -> Faults {
        let (partition, _) = watch::channel(PartitionState {
            mode: None,
            fail_epoch: 0,
        });
        Faults {
            inner: Arc::new(FaultState {
                client,
                partition,
                counters: Mutex::new(Counters::default()),
            }),
        }
    }

    fn counters(&self) -> (Duration, u64) {
        let counters = self
            .inner
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (counters.latency, counters.fail_next)
    }

    /// Cuts this client off the store, in `mode`, until [`heal`](Faults::heal).
    ///
    /// Switching from one mode to the other takes effect at once: calls hung in
    /// [`PartitionMode::Hang`] fail when the mode becomes [`PartitionMode::Fail`].
    pub fn partition(&self, mode: PartitionMode) {
        debug!(
            client = self.inner.client,
            ?mode,
            "memory store: client partitioned"
        );
        self.inner.partition.send_modify(|state| {
            state.mode = Some(mode);
            if mode == PartitionMode::Fail {
                state.fail_epoch += 1;
            }
        });
    }

    /// Ends a partition: hung calls go on, new calls reach the store again. Watch streams cut by
    /// a [`PartitionMode::Fail`] partition stay ended; open new ones.
    pub fn heal(&self) {
        debug!(client = self.inner.client, "memory store: client healed");
        self.inner.partition.send_modify(|state| state.mode = None);
    }

    /// The current partition, if any.
    pub fn partitioned(&self) -> Option<PartitionMode> {
        self.inner.partition.borrow().mode
    }

    /// Makes every call of this client first sleep `latency` on tokio time
    /// ([`Duration::ZERO`] for none, the default).
    pub fn set_latency(&self, latency: Duration) {
        debug!(
            client = self.inner.client,
            ?latency,
            "memory store: client latency set"
        );
        self.inner
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .latency = latency;
    }

    /// The latency set by [`set_latency`](Faults::set_latency).
    pub fn latency(&self) -> Duration {
        self.counters().0
    }

    /// Makes the next `n` calls of this client that get past latency and partition fail with
    /// [`Error::Unavailable`] (a [`watch`](locker_core::Watcher::watch) counts as a call; the
    /// items of a running watch stream do not). Replaces any count still pending; `0` clears it.
    pub fn fail_next(&self, n: u64) {
        debug!(
            client = self.inner.client,
            n, "memory store: client will fail its next calls"
        );
        self.inner
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .fail_next = n;
    }

    /// While `denied`, every call of this client that gets past latency and partition fails with
    /// [`Error::PermissionDenied`], a permanent error: a user whose role was taken away, or whose
    /// credentials the store no longer accepts. `false` (the default) lets calls through again.
    pub fn deny(&self, denied: bool) {
        debug!(
            client = self.inner.client,
            denied, "memory store: client permission"
        );
        self.inner
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .denied = denied;
    }

    fn denied(&self) -> bool {
        self.inner
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .denied
    }

    /// How many calls [`fail_next`](Faults::fail_next) still has to fail.
    pub fn pending_failures(&self) -> u64 {
        self.counters().1
    }

    /// Clears every fault: heals, zero latency, no queued failures, not denied.
    pub fn clear(&self) {
        self.heal();
        self.set_latency(Duration::ZERO);
        self.fail_next(0);
        self.deny(false);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<PartitionState> {
        self.inner.partition.subscribe()
    }

    fn take_failure(&self) -> bool {
        let mut counters = self
            .inner
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if counters.fail_next > 0 {
            counters.fail_next -= 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn unavailable(&self, why: &str, op: &str) -> Error {
        Error::unavailable(format!(
            "memory store client {}: {why} ({op})",
            self.inner.client
        ))
    }

    /// Steps 1 to 4 of a call (see the type's docs). Cancel-safe: it changes nothing until it
    /// takes a queued failure, after its last `.await`.
    pub(crate) async fn gate(&self, op: &str) -> Result<()> {
        let latency = self.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut partition = self.subscribe();
        loop {
            let mode = partition.borrow_and_update().mode;
            match mode {
                None => break,
                Some(PartitionMode::Fail) => return Err(self.unavailable("partitioned", op)),
                Some(PartitionMode::Hang) => {
                    trace!(client = self.inner.client, op, "memory store: call hangs");
                    if partition.changed().await.is_err() {
                        return Err(self.unavailable("client gone", op));
                    }
                }
            }
        }
        if self.denied() {
            debug!(client = self.inner.client, op, "memory store: call denied");
            return Err(Error::PermissionDenied {
                message: format!(
                    "memory store client {}: permission denied ({op})",
                    self.inner.client
                ),
                source: None,
            });
        }
        if self.take_failure() {
            debug!(
                client = self.inner.client,
                op, "memory store: injected failure"
            );
            return Err(self.unavailable("injected failure", op));
        }
        Ok(())
    }
}
