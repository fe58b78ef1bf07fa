//! Recording who believed they owned what, and when, on the one monotonic clock of the process,
//! and checking that no two beliefs on a key overlap.

use std::sync::{Arc, Mutex};

use locker_core::{FencingToken, LockHandle, Ownership};
use tokio::time::Instant;

/// One tenure as its holder believed it: from the moment it was published as owned to the moment
/// it was published as no longer owned (or the local deadline passed, whichever came first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenure {
    /// Who held it (an index given by the test).
    pub client: usize,
    /// Its fencing token.
    pub token: FencingToken,
    /// When it began.
    pub from: Instant,
    /// When it ended; `None` while it lasts.
    pub until: Option<Instant>,
}

/// The tenures of every client on one key.
#[derive(Debug, Clone, Default)]
pub struct Tenures(Arc<Mutex<Vec<Tenure>>>);

impl Tenures {
    /// Records every tenure of `handle` as `client`'s, until the handle ends.
    pub fn follow(&self, client: usize, handle: &LockHandle) {
        let mut rx = handle.subscribe();
        let log = self.0.clone();
        tokio::spawn(async move {
            let mut current: Option<FencingToken> = None;
            loop {
                let state = *rx.borrow_and_update();
                current = note(&log, client, current, state, Instant::now());
                if rx.changed().await.is_err() {
                    if let Some(old) = current {
                        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                        end(&mut log, client, old, Instant::now());
                    }
                    return;
                }
            }
        });
    }

    /// Every tenure recorded so far, in the order they began.
    pub fn all(&self) -> Vec<Tenure> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        all.sort_by_key(|t| t.from);
        all
    }

    /// Panics if two clients' tenures overlap, or tokens do not increase in the order tenures
    /// began. Answers the number of tenures checked.
    pub fn assert_safe(&self) -> usize {
        let all = self.all();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                let a_end = a.until.unwrap_or_else(Instant::now);
                assert!(
                    a.client == b.client || b.from >= a_end,
                    "overlapping ownership: {a:?} and {b:?}"
                );
                assert!(b.token > a.token, "tokens not increasing: {a:?} then {b:?}");
            }
        }
        all.len()
    }
}

/// Records the change to `state` at `now`; answers the token now owned.
fn note(
    log: &Mutex<Vec<Tenure>>,
    client: usize,
    current: Option<FencingToken>,
    state: Ownership,
    now: Instant,
) -> Option<FencingToken> {
    let owned = match state {
        Ownership::Owned { token } | Ownership::Unconfirmed { token, .. } => Some(token),
        _ => None,
    };
    if current.is_some() && current == owned {
        return current;
    }
    let mut entries = log.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = current {
        end(&mut entries, client, old, now);
    }
    if let Some(token) = owned {
        entries.push(Tenure {
            client,
            token,
            from: now,
            until: None,
        });
    }
    owned
}

fn end(log: &mut [Tenure], client: usize, token: FencingToken, at: Instant) {
    if let Some(t) = log
        .iter_mut()
        .rev()
        .find(|t| t.client == client && t.token == token && t.until.is_none())
    {
        t.until = Some(at);
    }
}
