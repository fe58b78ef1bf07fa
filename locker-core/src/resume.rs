//! Resuming a tenure after a restart: the [`ResumeToken`] a held lock exports, and what a new
//! process does with it ([`LockOptions::resume`](crate::LockOptions::resume)).

use std::fmt;
use std::str::FromStr;

use crate::backend::{LeaseId, Revision};
use crate::types::FencingToken;

/// What a new process needs to continue a tenure of this one: the lock key, the entry's lease,
/// its create revision (the tenure's fencing token) and the revision of its last write.
///
/// From [`LockGuard::resume_token`](crate::LockGuard::resume_token) (and the same method of
/// [`Tenure`](crate::Tenure) and [`Leadership`](crate::Leadership)), while the tenure lasts. A
/// process restarted at once (after a crash, an upgrade, `kill -9`) passes it to
/// [`LockOptions::resume`](crate::LockOptions::resume): if the lease still lives and nobody
/// wrote the entry since, the lock continues the same tenure (the same token, no wait behind
/// its own old entry) and keeps the lease alive; otherwise it reports that tenure's loss, and
/// a handle joins the queue as any other lock.
///
/// # Where to keep it
///
/// In storage of the service's own that outlives the process and that only the next
/// incarnation of this service reads: a file in its state directory (written to a temporary
/// file and renamed, so that a crash never leaves half a token), its pod's volume. Export it
/// again after each [`set_value`](crate::LockGuard::set_value) (a write of the entry makes the
/// older token refused), and remove it when the lock is released. It is a string
/// ([`Display`](fmt::Display) and [`FromStr`]) and, with the `serde` feature, serializable.
///
/// # The other tenures of the lease
///
/// A token names a lease that may carry other tenures of the process that exported it (the
/// default session's lease carries every lock of a [`Locker`](crate::Locker)). Resuming one
/// keeps the whole lease alive, and with it the entries of the tenures nobody resumed: those
/// stay in their queues until the lease expires after the resumed locks end. Resume every
/// token the process exported, or none; a service with one lock, or one lock per
/// [`dedicated_session`](crate::LockOptions::dedicated_session), has no such tenures. A
/// taken-up lease is never revoked (another process may have resumed another of its tenures):
/// it expires once nobody keeps it alive.
///
/// # Two processes, one token
///
/// A token is taken up once: taking it up writes the entry, so a second process resuming the
/// same token is refused ([`LossReason::ResumedElsewhere`](crate::LossReason::ResumedElsewhere))
/// and waits its turn. But nothing tells the process that **exported** the token that another
/// took it up: if that process is still running (paused, partitioned, not yet killed), both
/// believe they own the lock until its next loss. Resume only a token whose process has exited,
/// and fence writes as always.
#[derive(Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ResumeToken {
    key: String,
    lease: LeaseId,
    token: FencingToken,
    written: Revision,
}

impl ResumeToken {
    pub(crate) fn new(key: String, lease: LeaseId, token: FencingToken, written: Revision) -> Self {
        ResumeToken {
            key,
            lease,
            token,
            written,
        }
    }

    /// The lock key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease the tenure's entry is bound to.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The tenure's fencing token (its entry's create revision).
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The revision of the entry's last write when the token was exported.
    pub fn written(&self) -> Revision {
        self.written
    }
}

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumeToken")
            .field("key", &self.key)
            .field("lease", &format_args!("{:x}", self.lease))
            .field("token", &self.token.0)
            .field("written", &self.written)
            .finish()
    }
}

/// `<lease hex>:<token>:<written>:<key>`, for instance `694d7c1e2a3b4c01:2:7:leader` (the key
/// last, as it may hold `:`).
impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:x}:{}:{}:{}",
            self.lease, self.token.0, self.written, self.key
        )
    }
}

/// A string that is not a [`ResumeToken`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a resume token ({why}): expected <lease hex>:<token>:<written>:<key>")]
pub struct BadResumeToken {
    why: &'static str,
}

impl FromStr for ResumeToken {
    type Err = BadResumeToken;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadResumeToken { why };
        // A line read from a file may end with its line break; a key may end with spaces.
        let mut parts = text.trim_end_matches(['\n', '\r']).splitn(4, ':');
        let mut next = |what| parts.next().filter(|p| !p.is_empty()).ok_or(bad(what));
        let lease = i64::from_str_radix(next("no lease")?, 16).map_err(|_| bad("a bad lease"))?;
        let token: i64 = next("no token")?.parse().map_err(|_| bad("a bad token"))?;
        let written: i64 = next("no revision")?
            .parse()
            .map_err(|_| bad("a bad revision"))?;
        let key = next("no key")?.to_owned();
        if lease <= 0 || token <= 0 || written < token {
            return Err(bad("numbers out of range"));
        }
        Ok(ResumeToken::new(key, lease, FencingToken(token), written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_from_its_text() {
        let token = ResumeToken::new("jobs/a:b".into(), 0x694d, FencingToken(2), 7);
        assert_eq!(token.to_string(), "694d:2:7:jobs/a:b");
        assert_eq!(token.to_string().parse::<ResumeToken>(), Ok(token.clone()));
        assert_eq!(format!("{token}\n").parse::<ResumeToken>(), Ok(token));
        let spaced = ResumeToken::new("k ".into(), 0x694d, FencingToken(2), 7);
        assert_eq!(spaced.to_string().parse::<ResumeToken>(), Ok(spaced));
        for bad in [
            "",
            "694d:2:7",
            "zz:2:7:k",
            "694d:x:7:k",
            "694d:2:1:k",
            "0:2:7:k",
        ] {
            assert!(bad.parse::<ResumeToken>().is_err(), "{bad:?}");
        }
    }
}
