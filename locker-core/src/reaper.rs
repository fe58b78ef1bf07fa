//! The one clean-up path: every entry that a lock leaves behind (dropped, cancelled, lost,
//! released half-way, abandoned on a shared session, a join whose answer was lost) goes to its
//! locker's reaper, which deletes it (guarded by its create revision) in the background, retrying
//! with a [`Backoff`](crate::retry::Backoff) until done or until the entry's lease ends (then the
//! store deletes it anyway).

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::backend::{LockBackend, Revision};
use crate::error::Error;
use crate::locker::KeyClaim;
use crate::retry::Backoff;
use crate::session::Session;

/// What to remove.
#[derive(Debug)]
pub(crate) enum Target {
    /// This entry, if it still has this create revision.
    Entry {
        /// The entry's key.
        key: String,
        /// Its create revision.
        create_revision: Revision,
    },
    /// The entry `key` of the queue `queue`, if a join whose answer was lost made it: looked for
    /// at once, and once more `again_after` (a cancelled join may still reach the store after
    /// the first look; the model checker's counterexample: the entry then stays for as long as
    /// the session lives).
    UnseenJoin {
        /// The queue (lock key).
        queue: Arc<str>,
        /// The key the join's entry would have.
        key: String,
        /// When to look again.
        again_after: Duration,
    },
}

/// One entry (or possible entry) to remove.
#[derive(Debug)]
pub(crate) struct Job {
    /// What to remove.
    pub(crate) target: Target,
    /// The session of the entry's lease, while this client keeps it alive: once it is lost, the
    /// store removes the entry itself. `None`: tried until the store answers.
    pub(crate) session: Option<Arc<Session>>,
    /// How long to wait before the first try.
    pub(crate) after: Duration,
    /// Held until the entry is gone, so that another lock of the locker on the same key and
    /// session does not take the entry for its own meanwhile.
    pub(crate) claim: Option<KeyClaim>,
}

/// A locker's reaper.
#[derive(Debug)]
pub(crate) struct Reaper {
    backend: Arc<dyn LockBackend>,
    retry: (Duration, Duration),
}

impl Reaper {
    pub(crate) fn new(backend: Arc<dyn LockBackend>, retry: (Duration, Duration)) -> Self {
        Reaper { backend, retry }
    }

    /// Removes what `job` names, in the background (needs a tokio runtime; without one the
    /// lease's end removes it).
    pub(crate) fn reap(&self, job: Job, backoff_seed: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.backend.clone();
        let backoff = Backoff::new(self.retry.0, self.retry.1, backoff_seed);
        runtime.spawn(run(backend, job, backoff));
    }
}

async fn run(backend: Arc<dyn LockBackend>, job: Job, mut backoff: Backoff) {
    let Job {
        target,
        session,
        after,
        claim,
    } = job;
    if !after.is_zero() {
        tokio::time::sleep(after).await;
    }
    let lease_lost = || session.as_ref().is_some_and(|s| s.is_lost());
    match target {
        Target::Entry {
            key,
            create_revision,
        } => delete(&*backend, &key, create_revision, &session, &mut backoff).await,
        Target::UnseenJoin {
            queue,
            key,
            again_after,
        } => {
            for wait in [Duration::ZERO, again_after] {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                if lease_lost() {
                    break;
                }
                if let Some(create_revision) =
                    find(&*backend, &queue, &key, &lease_lost, &mut backoff).await
                {
                    delete(&*backend, &key, create_revision, &session, &mut backoff).await;
                }
            }
        }
    }
    drop(claim);
}

/// The create revision of the entry `key` of `queue`, if it is there. A failed read is tried
/// again: an entry forgotten here would block the key for as long as the session's lease is
/// kept alive.
async fn find(
    backend: &dyn LockBackend,
    queue: &str,
    key: &str,
    lease_lost: &(dyn Fn() -> bool + Sync),
    backoff: &mut Backoff,
) -> Option<Revision> {
    loop {
        match backend.entries(queue).await {
            Ok(snapshot) => {
                return snapshot
                    .entries
                    .into_iter()
                    .find(|e| e.key == key)
                    .map(|e| e.create_revision);
            }
            Err(_) if lease_lost() => return None,
            Err(err) if err.is_retryable() => {
                let delay = backoff.next_delay();
                debug!(entry = %key, error = %err, ?delay, "looking for an unseen join failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(err) => {
                warn!(entry = %key, error = %err, "cannot look for the entry of an unseen join; it stays until its lease ends");
                return None;
            }
        }
    }
}

/// Deletes the entry if it still has `create_revision`, retrying until done or until the lease
/// ends (then the store deletes it anyway).
async fn delete(
    backend: &dyn LockBackend,
    key: &str,
    create_revision: Revision,
    session: &Option<Arc<Session>>,
    backoff: &mut Backoff,
) {
    let lease_lost = || session.as_ref().is_some_and(|s| s.is_lost());
    loop {
        match backend.delete_entry(key, create_revision).await {
            Ok(_) | Err(Error::LeaseLost { .. }) => return,
            // The lease is no longer renewed: the entry goes with it.
            Err(_) if lease_lost() => return,
            // Nothing says whether the lease lives: a permanent error ends the attempt (the
            // lease's end removes the entry).
            Err(err) if session.is_none() && !err.is_retryable() => {
                warn!(entry = %key, error = %err, "clean-up failed; the entry stays until its lease ends");
                return;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                if err.is_retryable() {
                    debug!(entry = %key, error = %err, ?delay, "clean-up failed; retrying");
                } else if backoff.failures() == 1 {
                    warn!(entry = %key, error = %err, "clean-up failed; retrying while the lease lives");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}
