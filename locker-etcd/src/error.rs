//! Mapping etcd-client errors onto [`locker_core::Error`].
//!
//! Classification is by gRPC status code first, then by the few etcd messages that carry meaning
//! of their own:
//!
//! | etcd says                                              | locker error                          |
//! |--------------------------------------------------------|---------------------------------------|
//! | `Unavailable`, `DeadlineExceeded`, transport/IO errors, "h2 protocol error", closed channels | [`Error::Unavailable`] (retryable) |
//! | `PermissionDenied`, `Unauthenticated`, "authentication failed" | [`Error::PermissionDenied`]   |
//! | `NotFound` "requested lease not found"                 | [`Error::LeaseLost`]                  |
//! | `OutOfRange` "required revision has been compacted"    | [`Error::Compacted`]                  |
//! | `ResourceExhausted` ("too many requests")              | [`Error::Backend`], retryable         |
//! | anything else (`InvalidArgument`, `FailedPrecondition`, …) | [`Error::Backend`], not retryable |
//!
//! The etcd error is kept as the source.

use locker_core::backend::{LeaseId, Revision};
use locker_core::{Error, ErrorSource};
use tonic::Code;

/// What an operation was doing when etcd failed: used to fill in the fields of
/// [`Error::LeaseLost`] and [`Error::Compacted`], and the message.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Context {
    /// The operation, for the message ("txn", "lease grant", …).
    pub(crate) op: &'static str,
    /// The lease the operation named, if any.
    pub(crate) lease: Option<LeaseId>,
    /// The revision the operation read at, if any.
    pub(crate) revision: Option<Revision>,
}

impl Context {
    /// A context naming only the operation.
    pub(crate) const fn op(op: &'static str) -> Self {
        Context {
            op,
            lease: None,
            revision: None,
        }
    }

    /// The same context, naming the lease.
    pub(crate) const fn lease(mut self, lease: LeaseId) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The same context, naming the revision read at.
    pub(crate) const fn revision(mut self, revision: Revision) -> Self {
        self.revision = Some(revision);
        self
    }
}

/// How an etcd failure is classified, before it is turned into an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Unavailable,
    PermissionDenied,
    LeaseNotFound,
    Compacted,
    Retryable,
    Permanent,
}

const LEASE_NOT_FOUND: &str = "requested lease not found";
/// What etcd answers a request without credentials when authentication is on.
pub(crate) const NO_USER: &str = "user name is empty";
const COMPACTED: &str = "required revision has been compacted";

/// Message fragments of transport failures that tonic reports with a non-transport code.
const TRANSPORT_HINTS: &[&str] = &[
    "h2 protocol error",
    "transport error",
    "channel closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "error trying to connect",
    "stream closed",
];

fn mentions_transport(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    TRANSPORT_HINTS.iter().any(|hint| message.contains(hint))
}

fn classify_status(status: &tonic::Status) -> Class {
    let message = status.message();
    // A status that carries a source was made on this side of the wire from a broken connection
    // (tonic reports a request cut off by a closed connection as Cancelled, with the transport
    // error as source).
    if std::error::Error::source(status).is_some() {
        return Class::Unavailable;
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Class::Unavailable,
        Code::PermissionDenied | Code::Unauthenticated => Class::PermissionDenied,
        Code::NotFound if message.contains(LEASE_NOT_FOUND) => Class::LeaseNotFound,
        Code::OutOfRange if message.contains(COMPACTED) => Class::Compacted,
        // etcd 3.4 answers a wrong user name or password with InvalidArgument, and a request
        // without credentials (authentication on) likewise.
        Code::InvalidArgument
            if message.contains("authentication failed") || message.contains(NO_USER) =>
        {
            Class::PermissionDenied
        }
        Code::ResourceExhausted => Class::Retryable,
        // etcd answers this while its auth store changes under a request; a later request goes
        // through.
        Code::InvalidArgument if message.contains("revision of auth store is old") => {
            Class::Retryable
        }
        _ if mentions_transport(message) => Class::Unavailable,
        _ => Class::Permanent,
    }
}

fn classify(err: &etcd_client::Error) -> Class {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(status) => classify_status(status),
        E::TransportError(_) | E::IoError(_) => Class::Unavailable,
        E::LeaseKeepAliveError(message) if message.contains("lease not found") => {
            Class::LeaseNotFound
        }
        // The server closed the keep-alive stream before it answered.
        E::WatchError(message) if message.contains("failed to create lease keeper") => {
            Class::Unavailable
        }
        E::WatchError(message) | E::LeaseKeepAliveError(message) | E::ElectError(message) => {
            if mentions_transport(message) || message.contains("closed") {
                Class::Unavailable
            } else {
                Class::Permanent
            }
        }
        _ => Class::Permanent,
    }
}

/// Whether the failure is a broken connection or stream (worth re-creating a stream for).
pub(crate) fn is_unavailable(err: &etcd_client::Error) -> bool {
    classify(err) == Class::Unavailable
}

/// Whether the failure says the lease is gone.
pub(crate) fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    classify(err) == Class::LeaseNotFound
}

/// What went wrong, in a few words for a message: the status's own message and the deepest cause
/// under it ("tcp connect error: Connection refused (os error 111)"), never the nested dump of
/// the error's `Display` (which the error keeps as its source).
pub(crate) fn cause(err: &etcd_client::Error) -> String {
    let (message, below): (String, Option<&(dyn std::error::Error + 'static)>) = match err {
        etcd_client::Error::GRpcStatus(status) => (
            status.message().to_owned(),
            std::error::Error::source(status),
        ),
        etcd_client::Error::TransportError(transport) => {
            (transport.to_string(), std::error::Error::source(transport))
        }
        other => (other.to_string(), None),
    };
    let mut deepest = None;
    let mut next = below;
    while let Some(cause) = next {
        deepest = Some(cause);
        next = cause.source();
    }
    match deepest.map(ToString::to_string) {
        Some(root) if !message.contains(&root) && !message.is_empty() => {
            format!("{message}: {root}")
        }
        Some(root) => root,
        None => message,
    }
}

/// Maps an etcd-client error onto a locker error, keeping it as the source.
pub(crate) fn map_error(err: etcd_client::Error, ctx: Context) -> Error {
    let message = format!("etcd {} failed: {}", ctx.op, cause(&err));
    match (classify(&err), ctx.lease, ctx.revision) {
        (Class::Unavailable, _, _) => Error::Unavailable {
            message,
            source: Some(boxed(err)),
        },
        (Class::PermissionDenied, _, _) => Error::PermissionDenied {
            message,
            source: Some(boxed(err)),
        },
        (Class::LeaseNotFound, Some(lease), _) => Error::LeaseLost { lease },
        (Class::Compacted, _, Some(requested)) => Error::Compacted {
            requested,
            // etcd's message does not say up to where it compacted; a read at `requested`
            // failing means the compaction revision is above it.
            compact_revision: requested + 1,
        },
        (Class::Retryable, _, _) => Error::Backend {
            message,
            retryable: true,
            source: Some(boxed(err)),
        },
        // A lease or compaction error where the operation named no lease or revision, and
        // everything else.
        _ => Error::Backend {
            message,
            retryable: false,
            source: Some(boxed(err)),
        },
    }
}

/// Maps the cancel reason of a watch that etcd refused or cancelled (not a compaction).
pub(crate) fn map_cancel_reason(reason: &str) -> Error {
    let message = if reason.is_empty() {
        "etcd cancelled the watch".to_owned()
    } else {
        format!("etcd cancelled the watch: {reason}")
    };
    if reason.contains("permission denied") || reason.contains("invalid auth token") {
        Error::PermissionDenied {
            message,
            source: None,
        }
    } else {
        Error::Backend {
            message,
            retryable: false,
            source: None,
        }
    }
}

/// An [`Error::Unavailable`] for a request that did not finish in time.
pub(crate) fn timed_out(op: &str, timeout: std::time::Duration) -> Error {
    Error::unavailable(format!("etcd {op} timed out after {timeout:?}"))
}

fn boxed(err: etcd_client::Error) -> ErrorSource {
    std::sync::Arc::new(err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    fn map(err: etcd_client::Error) -> Error {
        map_error(err, Context::op("test").lease(0x1f).revision(7))
    }

    #[test]
    fn unreachable_is_unavailable_and_retryable() {
        for err in [
            status(
                Code::Unavailable,
                "error trying to connect: Connection refused",
            ),
            status(Code::DeadlineExceeded, "context deadline exceeded"),
            status(
                Code::Unknown,
                "h2 protocol error: error reading a body from connection",
            ),
            status(Code::Internal, "h2 protocol error: stream no longer needed"),
            status(Code::Unknown, "transport error"),
            // A request cut off by a closed connection, as tonic reports it.
            status(Code::Cancelled, "operation was canceled"),
            etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(
                std::io::Error::other("connection closed"),
            ))),
            etcd_client::Error::IoError(std::io::Error::other("reset")),
            etcd_client::Error::WatchError("channel closed".into()),
            etcd_client::Error::LeaseKeepAliveError("channel closed".into()),
        ] {
            let mapped = map(err);
            assert!(
                matches!(
                    mapped,
                    Error::Unavailable {
                        source: Some(_),
                        ..
                    }
                ),
                "{mapped:?}"
            );
            assert!(mapped.is_retryable());
        }
    }

    #[test]
    fn refused_credentials_are_permission_denied() {
        for err in [
            status(Code::PermissionDenied, "etcdserver: permission denied"),
            status(Code::Unauthenticated, "etcdserver: invalid auth token"),
            status(
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            // Authentication on, and the request came without credentials.
            status(Code::InvalidArgument, "etcdserver: user name is empty"),
        ] {
            let mapped = map(err);
            assert!(
                matches!(
                    mapped,
                    Error::PermissionDenied {
                        source: Some(_),
                        ..
                    }
                ),
                "{mapped:?}"
            );
            assert!(!mapped.is_retryable());
        }
    }

    #[test]
    fn missing_lease_is_lease_lost() {
        let mapped = map(status(
            Code::NotFound,
            "etcdserver: requested lease not found",
        ));
        assert!(
            matches!(mapped, Error::LeaseLost { lease: 0x1f }),
            "{mapped:?}"
        );
        let mapped = map(etcd_client::Error::LeaseKeepAliveError(
            "lease not found".into(),
        ));
        assert!(
            matches!(mapped, Error::LeaseLost { lease: 0x1f }),
            "{mapped:?}"
        );
        // Without a lease in the context it cannot name one: a permanent backend error.
        let mapped = map_error(
            status(Code::NotFound, "etcdserver: requested lease not found"),
            Context::op("test"),
        );
        assert!(
            matches!(
                mapped,
                Error::Backend {
                    retryable: false,
                    ..
                }
            ),
            "{mapped:?}"
        );
    }

    #[test]
    fn compacted_read_is_compacted() {
        let mapped = map(status(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        ));
        assert!(
            matches!(
                mapped,
                Error::Compacted {
                    requested: 7,
                    compact_revision: 8
                }
            ),
            "{mapped:?}"
        );
    }

    #[test]
    fn other_failures_are_permanent_backend_errors() {
        for err in [
            status(Code::InvalidArgument, "etcdserver: request is too large"),
            status(Code::FailedPrecondition, "etcdserver: some precondition"),
            status(Code::NotFound, "etcdserver: key not found"),
            status(
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            status(Code::Unknown, "etcdserver: something odd"),
            etcd_client::Error::InvalidArgs("empty endpoints".into()),
        ] {
            let mapped = map(err);
            assert!(
                matches!(
                    mapped,
                    Error::Backend {
                        retryable: false,
                        source: Some(_),
                        ..
                    }
                ),
                "{mapped:?}"
            );
        }
    }

    #[test]
    fn too_many_requests_is_retryable() {
        let mapped = map(status(
            Code::ResourceExhausted,
            "etcdserver: too many requests",
        ));
        assert!(
            matches!(
                mapped,
                Error::Backend {
                    retryable: true,
                    ..
                }
            ),
            "{mapped:?}"
        );
    }

    #[test]
    fn source_is_kept_and_message_names_the_operation() {
        let mapped = map_error(
            status(Code::Unavailable, "etcdserver: no leader"),
            Context::op("txn"),
        );
        assert!(mapped.to_string().contains("etcd txn failed"), "{mapped}");
        let source = std::error::Error::source(&mapped).unwrap();
        assert!(source.to_string().contains("no leader"), "{source}");
    }

    #[test]
    fn cancel_reasons() {
        assert!(matches!(
            map_cancel_reason("etcdserver: permission denied"),
            Error::PermissionDenied { .. }
        ));
        assert!(matches!(
            map_cancel_reason(""),
            Error::Backend {
                retryable: false,
                ..
            }
        ));
    }
}
