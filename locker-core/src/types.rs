//! The values locker hands out: fencing tokens, holders, ownership states.

use std::fmt;

use tokio::time::Instant;

use crate::backend::LeaseId;
use crate::error::{FailureKind, LossReason};

/// A number that is strictly greater for every later holder of a lock: the create revision of the
/// holder's entry in the store.
///
/// Pass it along with every write to a protected resource, and have the resource refuse a token
/// lower than the highest it has seen: a holder that was paused or partitioned past its lease
/// cannot then overwrite the work of the holder after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(transparent)
)]
pub struct FencingToken(pub(crate) i64);

impl FencingToken {
    /// The token as a number.
    pub fn as_i64(self) -> i64 {
        self.0
    }

    /// A token from a number (as stored by a protected resource).
    pub fn from_i64(value: i64) -> Self {
        FencingToken(value)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who holds a lock: the holder's value and fencing token.
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Holder {
    /// The value the holder set (an address, a name, "ok", ...).
    pub value: Vec<u8>,
    /// The holder's fencing token.
    pub token: FencingToken,
    /// The lease the holder's entry is bound to.
    pub lease: LeaseId,
}

/// What a stream of [`Locker::watch_updates`](crate::Locker::watch_updates) yields: the holder,
/// and what the stream knows about how current it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HolderUpdate {
    /// The holder now (`None`: nobody holds the key). The first item of a stream (after a
    /// `Stale` if the store may be unreachable as it starts), then one at every change of holder
    /// or of the holder's value.
    Holder(Option<Holder>),
    /// Changes were skipped: the store's history was compacted, or the reader fell so far
    /// behind that the stream dropped its backlog (a stream nobody polls holds bounded memory).
    /// The state is read afresh; a `Holder` follows if it differs from the last one yielded.
    Skipped,
    /// The store may be unreachable (the watch broke, or a read of the store failed or went
    /// unanswered for a third of the locker's TTL): the last holder yielded may be stale, and
    /// changes may not be reaching this client. Said once per outage the stream notices (one
    /// shorter than a probe may go unnoticed).
    Stale,
    /// The store is reachable again after a `Stale`, and the state was read afresh: the last
    /// `Holder` yielded (one comes just before this if it changed) is the store's.
    Current,
}

impl Holder {
    /// The value as UTF-8 text, if it is.
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

impl fmt::Debug for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Holder")
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("token", &self.token.0)
            .field("lease", &format_args!("{:x}", self.lease))
            .finish()
    }
}

/// What [`LockHandle::subscribe`](crate::LockHandle::subscribe) answers: tokio's
/// `watch::Receiver` of the latest published [`Ownership`] (states in between may be skipped; a
/// slow reader never holds anyone up).
pub type OwnershipWatch = tokio::sync::watch::Receiver<Ownership>;

/// What [`LockHandle::events`](crate::LockHandle::events) answers: tokio's `broadcast::Receiver`
/// of every published [`Ownership`] in order (a reader more than 64 behind is told it lagged).
pub type OwnershipEvents = tokio::sync::broadcast::Receiver<Ownership>;

/// Where a lock handle stands, published on every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Ownership {
    /// Trying to own: joining the queue, or waiting for the holders before this one.
    Acquiring,
    /// Owned, confirmed by the last keep-alive.
    Owned {
        /// The fencing token of this tenure.
        token: FencingToken,
    },
    /// Still owned, but keep-alives are failing, or one has gone unanswered for a third of the
    /// TTL (Curator's SUSPENDED): unless one succeeds, the lock is lost at `deadline`. A cautious
    /// caller stops protected work now.
    Unconfirmed {
        /// The fencing token of this tenure.
        token: FencingToken,
        /// When ownership ends unless a keep-alive succeeds (before the store could expire it).
        deadline: Instant,
    },
    /// Not owned any more, a moment before [`Ownership::Lost`] says why: the tenure's entry is gone
    /// from the store, and one lookup of its lease (a round trip) tells whether the lease ended
    /// there ([`LossReason::LeaseGone`]: revoked, or expired) or someone deleted the entry
    /// ([`LossReason::EntryDeleted`]). Published as soon as the entry is found gone, so that
    /// every subscriber stops claiming at once; `Lost` with the reason follows.
    Ending {
        /// The fencing token of the tenure that ended.
        token: FencingToken,
    },
    /// Ownership ended for `reason`. A [`LockHandle`](crate::LockHandle) then joins again
    /// ([`Ownership::Acquiring`]); a [`LockGuard`](crate::LockGuard) stays here.
    Lost {
        /// The fencing token of the tenure that ended.
        token: FencingToken,
        /// Why it ended.
        reason: LossReason,
    },
    /// The handle was released or abandoned, or a one-shot attempt ended. Terminal.
    Released,
    /// The store failed in a way trying again will not mend (permission denied on the lock's
    /// keys, say): the lock stopped. Terminal; [`LockHandle::wait_owned`](crate::LockHandle::wait_owned)
    /// answers the error.
    Failed {
        /// What kind of failure.
        kind: FailureKind,
    },
}

impl Ownership {
    /// Whether this state claims ownership ([`Ownership::Owned`] or [`Ownership::Unconfirmed`]).
    pub fn is_owned(&self) -> bool {
        matches!(
            self,
            Ownership::Owned { .. } | Ownership::Unconfirmed { .. }
        )
    }

    /// The fencing token of the current or last tenure, if any.
    pub fn token(&self) -> Option<FencingToken> {
        match *self {
            Ownership::Owned { token }
            | Ownership::Unconfirmed { token, .. }
            | Ownership::Ending { token }
            | Ownership::Lost { token, .. } => Some(token),
            _ => None,
        }
    }
}
