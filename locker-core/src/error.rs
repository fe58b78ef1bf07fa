//! The one error type of locker.

use std::sync::Arc;
use std::time::Duration;

/// A store's error, kept as the source of an [`Error`]. Shared, so that an [`Error`] is `Clone`:
/// every caller that waits on a lock gets the error that stopped it, with its source.
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of locker.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in locker.
///
/// Bad input is rejected before any I/O, with a message naming the limit. Store failures keep their
/// source. [`Error::is_retryable`] tells a transient failure (worth retrying) from a permanent one.
///
/// `Clone`: the source is shared ([`ErrorSource`]), so the error that stopped a lock is answered,
/// whole, to every caller of [`LockHandle::wait_owned`](crate::LockHandle::wait_owned).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key is empty.
    #[error("invalid key: the key is empty")]
    EmptyKey,

    /// The key is longer than the store allows.
    #[error("invalid key: {len} bytes is over the limit of {max} bytes for a key")]
    KeyTooLong {
        /// The length of the key given, in bytes.
        len: usize,
        /// The longest key the store accepts, in bytes.
        max: usize,
    },

    /// The key has a shape no lock key may have: a leading or trailing `/`, an empty segment
    /// (`a//b`), or a NUL byte. See [`backend::check_key_shape`](crate::backend::check_key_shape)
    /// for why.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The value is larger than the store allows.
    #[error("invalid value: {len} bytes is over the limit of {max} bytes for a value")]
    ValueTooLarge {
        /// The size of the value given, in bytes.
        len: usize,
        /// The largest value the store accepts, in bytes.
        max: usize,
    },

    /// A lease TTL outside the range the store accepts.
    #[error("invalid TTL: {ttl:?} is outside the range {min:?} ..= {max:?} the store accepts")]
    TtlOutOfRange {
        /// The TTL given.
        ttl: Duration,
        /// The shortest TTL the store accepts.
        min: Duration,
        /// The longest TTL the store accepts.
        max: Duration,
    },

    /// A configuration value that cannot work, found before any I/O.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The lease is gone from the store (expired or revoked): everything held under it is lost.
    #[error("lease {lease:x} is gone from the store")]
    LeaseLost {
        /// The lease id.
        lease: i64,
    },

    /// The history asked for has been compacted away; re-read the current state and go on from there.
    #[error("revision {requested} has been compacted (compacted up to {compact_revision})")]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// The store's compaction revision: history before it is gone.
        compact_revision: i64,
    },

    /// The store cannot be reached right now (network, leader election, overload). Retryable.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What happened.
        message: String,
        /// The store's error, if any.
        #[source]
        source: Option<ErrorSource>,
    },

    /// The credentials were refused or the caller may not touch these keys. Permanent.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// What happened.
        message: String,
        /// The store's error, if any.
        #[source]
        source: Option<ErrorSource>,
    },

    /// Any other store failure; `retryable` says whether trying again can help.
    #[error("store error: {message}")]
    Backend {
        /// What happened.
        message: String,
        /// Whether the same call may succeed later.
        retryable: bool,
        /// The store's error, if any.
        #[source]
        source: Option<ErrorSource>,
    },

    /// Ownership was lost (lease gone, local deadline passed, or the entry deleted) before the
    /// operation could complete.
    #[error("lock on {key:?} is not owned: {reason}")]
    NotOwned {
        /// The lock key.
        key: String,
        /// Why.
        reason: LossReason,
    },

    /// The lock is closed: released, abandoned, or stopped (its handle can do nothing more).
    #[error("lock on {key:?} is closed")]
    Closed {
        /// The lock key.
        key: String,
    },
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    ///
    /// True for an unreachable store and other transient failures; false for bad input,
    /// permission errors and lost ownership.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Whether the input was rejected before any I/O.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::EmptyKey
                | Error::KeyTooLong { .. }
                | Error::InvalidKey { .. }
                | Error::ValueTooLarge { .. }
                | Error::TtlOutOfRange { .. }
                | Error::InvalidConfig(_)
        )
    }

    /// What kind of permanent failure this is, for [`Ownership::Failed`](crate::Ownership::Failed);
    /// `None` for a retryable one.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            _ if self.is_retryable() => None,
            Error::PermissionDenied { .. } => Some(FailureKind::PermissionDenied),
            _ if self.is_invalid_input() => Some(FailureKind::InvalidInput),
            _ => Some(FailureKind::Rejected),
        }
    }

    /// An [`Error::Unavailable`] with a message and no source.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: None,
        }
    }
}

/// Why a lock stopped for good on a store error ([`Ownership::Failed`](crate::Ownership::Failed));
/// the error itself is what [`LockHandle::wait_owned`](crate::LockHandle::wait_owned) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The store refused the credentials, or this user may not touch the lock's keys
    /// ([`Error::PermissionDenied`]).
    PermissionDenied,
    /// The store refused the request as invalid.
    InvalidInput,
    /// Another failure that trying again will not mend.
    Rejected,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureKind::PermissionDenied => "the store denied permission",
            FailureKind::InvalidInput => "the store refused the request as invalid",
            FailureKind::Rejected => "the store failed for good",
        })
    }
}

/// Why ownership of a lock ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// The lease is gone from the store: expired, or revoked (by an operator, `etcdctl lease
    /// revoke`, another client). The session's keep-alive said so, or, when the lock saw its entry
    /// deleted first, one lookup of the lease did.
    LeaseGone,
    /// Keep-alives failed until the local ownership deadline passed; the store may not have
    /// expired the lease yet, but it may at any moment, so ownership is no longer claimed.
    DeadlinePassed,
    /// The lock's entry was deleted by someone else (an operator, `etcdctl del`, another tool)
    /// while its lease lived on. (Also what a loss says when the entry was seen deleted and the
    /// lookup of its lease could not answer.)
    EntryDeleted,
    /// The owner stopped the lock: released, abandoned or dropped it (or it stopped on a
    /// permanent error).
    Stopped,
    /// A tenure to resume from its `ResumeToken` was taken up by another process first (or its
    /// entry was written since the token was exported): it is that process's now.
    ResumedElsewhere,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::LeaseGone => "the lease is gone from the store",
            LossReason::DeadlinePassed => "keep-alives failed until the local deadline passed",
            LossReason::EntryDeleted => "the lock entry was deleted by someone else",
            LossReason::Stopped => "the owner stopped the lock",
            LossReason::ResumedElsewhere => {
                "another process resumed this tenure first (or its entry was written since the \
                 resume token was exported)"
            }
        })
    }
}
