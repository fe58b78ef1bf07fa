//! Fenced writes: what a tenure is fenced by ([`Fence`]), and a check for resources that keep the
//! highest token they have seen ([`FencingGate`]).
//!
//! A holder can lose its lock without knowing it for a moment (a pause, a partition: it stops
//! claiming at its local deadline, but a write it started just before may land after). A write
//! is safe when the resource itself refuses it once a later tenure exists:
//!
//! - **on etcd**, a transaction whose compare is that the tenure's entry still exists with its
//!   create revision (the token): `locker_etcd::EtcdBackend::txn_fenced`. However late it runs,
//!   a write made after the loss is refused, and nothing needs to be read first;
//! - **on any other resource**, the resource keeps the highest token it has accepted and refuses
//!   a lower one: [`FencingGate`].

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{LeaseId, entry_key};
use crate::types::FencingToken;

/// What one tenure of a lock is fenced by: its key, its entry's key in the store, the lease the
/// entry is bound to, and its fencing token (the entry's create revision). From
/// [`Tenure::fence`](crate::Tenure::fence) and [`LockGuard::fence`](crate::LockGuard::fence).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    key: Arc<str>,
    lease: LeaseId,
    token: FencingToken,
}

impl Fence {
    pub(crate) fn new(key: Arc<str>, lease: LeaseId, token: FencingToken) -> Self {
        Fence { key, lease, token }
    }

    /// The lock key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key of the tenure's entry, relative to the backend's root (`key/<lease hex>`, see
    /// [`entry_key`]); etcd's full key has the backend's prefix in front.
    pub fn entry_key(&self) -> String {
        entry_key(&self.key, self.lease)
    }

    /// The lease the entry is bound to.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The fencing token: the entry's create revision.
    pub fn token(&self) -> FencingToken {
        self.token
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fence")
            .field("key", &self.key)
            .field("lease", &format_args!("{:x}", self.lease))
            .field("token", &self.token.0)
            .finish()
    }
}

/// A write refused by a [`FencingGate`]: its token is below one the resource has accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fenced off: token {token} is below {highest}, which the resource has accepted")]
pub struct Stale {
    /// The token of the refused write.
    pub token: FencingToken,
    /// The highest token the resource has accepted.
    pub highest: FencingToken,
}

/// The check-and-bump a protected resource makes on every write: a write comes with its tenure's
/// token, and is refused if a higher token was accepted before; otherwise the token becomes the
/// highest. Keep one gate per lock key, with the resource (in the same process as it, under the
/// same lock as its data, or as a column that the write's own transaction compares and sets).
///
/// **A new holder registers its token before it trusts what it reads.** The holder before it may
/// not know yet that it lost the lock, and its late write can land between the new holder's read
/// and the new holder's first write, which then builds on data the new holder never saw. So a new
/// tenure first calls [`check_and_bump`](FencingGate::check_and_bump) with its token (a write of
/// nothing), and only then reads: from that moment the old holder's writes are refused.
///
/// ```
/// use locker_core::{FencingGate, FencingToken};
///
/// let gate = FencingGate::new();
/// let (old, new) = (FencingToken::from_i64(7), FencingToken::from_i64(9));
/// gate.check_and_bump(old)?; // the old holder writes
/// gate.check_and_bump(new)?; // the new holder registers before it reads
/// assert!(gate.check_and_bump(old).is_err()); // the old holder's late write is refused
/// gate.check_and_bump(new)?; // the new holder goes on
/// # Ok::<(), locker_core::Stale>(())
/// ```
#[derive(Debug, Default)]
pub struct FencingGate {
    highest: Mutex<Option<FencingToken>>,
}

impl FencingGate {
    /// A gate that has seen no token.
    pub fn new() -> Self {
        FencingGate::default()
    }

    /// Accepts `token` if it is at least the highest accepted so far (and makes it the highest),
    /// atomically.
    ///
    /// # Errors
    ///
    /// [`Stale`] if a higher token was accepted before: the write must not be made.
    pub fn check_and_bump(&self, token: FencingToken) -> Result<(), Stale> {
        let mut highest = self.highest.lock().unwrap_or_else(PoisonError::into_inner);
        match *highest {
            Some(h) if token < h => Err(Stale { token, highest: h }),
            _ => {
                *highest = Some(token);
                Ok(())
            }
        }
    }

    /// The highest token accepted so far.
    pub fn highest(&self) -> Option<FencingToken> {
        *self.highest.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
